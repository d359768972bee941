//! Seeding: fills a node from a consistent snapshot of a healthy one.
//!
//! 1. On the source, a `REPEATABLE READ, READ ONLY` transaction exports its
//!    snapshot and reads the log position `seq` visible in it. It stays open
//!    until `pg_dump --snapshot` has finished (pg_dump needs it alive).
//! 2. `pg_dump` starts; its first output bytes prove that it connected,
//!    imported the snapshot and locked every table. Nothing on the target
//!    has been touched before that.
//! 3. One `psql --single-transaction` on the target runs, in this order: the
//!    wipe (every non-system schema, user extensions, event triggers,
//!    publications, foreign-data wrappers, large objects; `public` is
//!    recreated in its initdb state), the dump streamed from pg_dump, then
//!    the node's own state (sequence states as of `seq`, `reprise.node` set
//!    to subscriber at the new term) and a check that the restored log ends
//!    at `seq`. Either all of it commits or the target is left untouched:
//!    a failed seed never leaves a half-filled node that claims a position.
//! 4. The target is read back over a separate connection.
//!
//! Dropping the future kills both tools (psql before it could commit), so a
//! cancelled seed also leaves the target as it was. Not wiped: subscriptions
//! (dropping one with a slot cannot run in a transaction block) and default
//! privileges granted database-wide (`ALTER DEFAULT PRIVILEGES` without
//! `IN SCHEMA`); a subscription of the same name makes the restore fail.
//!
//! Ownership and privileges are kept (no `--no-owner`/`--no-privileges`):
//! every copy serves reads and replays writes as the same roles, so who owns
//! what must be identical too. Roles are cluster-wide and not part of a
//! dump; a restore into a server that lacks one fails with psql's
//! `role "…" does not exist`, and the target stays as it was.
//!
//! Sequences are not transactional: pg_dump reads their current values,
//! which writers may have moved past the snapshot. Every logged transaction
//! that changes a sequence records the states before and after it, so the
//! value as of `seq` is the "before" state of the first later entry that
//! changed it; those are read once the transactions that were running when
//! pg_dump finished have ended (bounded wait).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::{SCHEMA_SQL, SeqState, sequences_column};
use crate::backend::Target;
use crate::group::health::connect_config;
use crate::local::{PgBin, is_executable, path_dirs};

/// What a finished seed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    /// The log position of the snapshot: the applier replays after it.
    pub seq: u64,
    /// Bytes of dump streamed from pg_dump into psql.
    pub bytes: u64,
    pub duration: Duration,
}

/// The config key named when the tools cannot be found.
const BIN_DIR_KEY: &str = "replication.pg_bin_dir";
/// Bytes read from pg_dump per write into psql.
const CHUNK: usize = 64 * 1024;
/// How often the restore reports how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long to wait for source transactions that may have moved sequences.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);
/// How much of a tool's stderr an error message keeps (the end of it).
const STDERR_TAIL: usize = 8 * 1024;
/// Objects with lower OIDs were created by initdb (FirstNormalObjectId).
const FIRST_NORMAL_OID: u32 = 16384;

/// Copies `source`'s database into `target` from one snapshot: wipes the
/// target's non-system schemas (every schema except pg_catalog,
/// information_schema, pg_toast*, pg_temp*; `public` is dropped and
/// recreated empty in its initdb state when the source has one), then
/// `pg_dump --snapshot=<exported> | psql --single-transaction -v ON_ERROR_STOP=1`
/// into it, then sets `reprise.node` on the target to role 'subscriber' and
/// term `term`. Wipe, restore and node state commit as one transaction.
/// `bin_dir`: where pg_dump and psql are. `progress` is called with short
/// human-readable steps (e.g. "exported snapshot at seq 42", "restored 12.3 MB").
pub async fn seed(
    source: &Target,
    target: &Target,
    term: u64,
    bin_dir: &Path,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Seeded, String> {
    let started = Instant::now();
    let job = Job {
        source,
        target,
        pg_dump: tool(bin_dir, "pg_dump")?,
        psql: tool(bin_dir, "psql")?,
        term: i64::try_from(term).map_err(|_| format!("term {term} is out of range"))?,
    };
    let say = |msg: &str| {
        tracing::info!(source = %addr(source), target = %addr(target), "seed: {msg}");
        progress(msg);
    };

    let mut snap = Snapshot::export(source).await?;
    say(&format!("exported snapshot at seq {}", snap.seq));
    let target_db = connect(target, "target").await?;
    if snap.is_visible_from(&target_db).await {
        return Err(format!(
            "source {} and target {} are the same database: seeding it from itself \
             would wipe it",
            addr(source),
            addr(target)
        ));
    }
    let head = wipe_sql(&TargetCatalog::read(&target_db).await?, snap.has_public);
    let bytes = job.transfer(&mut snap, &head, &say).await?;
    say(&format!(
        "restored {} in {:.1} s",
        human(bytes),
        started.elapsed().as_secs_f64()
    ));

    check_target(&target_db, job.term, snap.seq).await?;
    say(&format!(
        "target is a subscriber at term {term}, seq {}",
        snap.seq
    ));
    Ok(Seeded {
        seq: snap.seq as u64,
        bytes,
        duration: started.elapsed(),
    })
}

/// One seed's endpoints and tools.
struct Job<'a> {
    source: &'a Target,
    target: &'a Target,
    pg_dump: PathBuf,
    psql: PathBuf,
    term: i64,
}

impl Job<'_> {
    /// Streams `head`, the dump and the node's state into one psql
    /// transaction on the target; returns the dump's size. On any failure
    /// psql is killed before it sees the end of its input, so it never
    /// commits.
    async fn transfer(
        &self,
        snap: &mut Snapshot,
        head: &str,
        say: &impl Fn(&str),
    ) -> Result<u64, String> {
        let (source, target) = (self.source, self.target);
        let mut dump = Tool::spawn(dump_command(&self.pg_dump, source, &snap.id), "pg_dump")?;
        let mut out = dump.child.stdout.take().expect("piped stdout");
        let (first, dump) = first_chunk(&mut out, dump, source).await?;
        say("pg_dump is streaming; wiping and restoring the target in one transaction");

        let mut restore = Tool::spawn(restore_command(&self.psql, target), "psql")?;
        let mut input = restore.child.stdin.take().expect("piped stdin");
        let copied = match input.write_all(head.as_bytes()).await {
            Ok(()) => copy(&first, &mut out, &mut input, say).await,
            Err(e) => Err(Broken::Write(e.to_string())),
        };
        drop(out);
        let bytes = match copied {
            Ok(bytes) => bytes,
            Err(broken) => return Err(broken.report(dump, restore, input, source, target).await),
        };
        if let Err(e) = dump.finish().await {
            restore.kill().await;
            return Err(format!("pg_dump from source {} failed: {e}", addr(source)));
        }
        say(&format!("dumped {} from the snapshot", human(bytes)));

        let tail = match snap.states_after_dump(say).await {
            Ok(states) => tail_sql(&states, self.term, snap.seq, !snap.has_reprise),
            Err(e) => {
                restore.kill().await;
                return Err(e);
            }
        };
        let written = input.write_all(tail.as_bytes()).await;
        drop(input);
        let failed = |e: String| format!("restoring into target {} failed: {e}", addr(target));
        restore.finish().await.map_err(failed)?;
        written.map_err(|e| failed(e.to_string()))?;
        Ok(bytes)
    }
}

/// The bin dir to use: `configured` if Some (it must hold pg_dump and psql),
/// else the dir of `PgBin::find()` when it holds them, else the first `PATH`
/// dir that does; else an error naming `replication.pg_bin_dir`.
pub fn bin_dir(configured: Option<&str>) -> Result<PathBuf, String> {
    if let Some(dir) = configured {
        let dir = PathBuf::from(dir);
        return match missing_tool(&dir) {
            None => Ok(dir),
            Some(name) => Err(format!(
                "{BIN_DIR_KEY} = {:?}: no executable {name} there; set it to the \
                 directory holding pg_dump and psql (see `pg_config --bindir`)",
                dir.display().to_string()
            )),
        };
    }
    if let Ok(bin) = PgBin::find()
        && missing_tool(bin.dir()).is_none()
    {
        return Ok(bin.dir().to_path_buf());
    }
    path_dirs()
        .find(|d| missing_tool(d).is_none())
        .ok_or_else(|| {
            format!(
                "pg_dump and psql not found (searched $REPRISE_PG_BINDIR, PATH, \
                 `pg_config --bindir`, /usr/lib/postgresql/*/bin): install the \
                 PostgreSQL client tools or set {BIN_DIR_KEY}"
            )
        })
}

/// The first of pg_dump and psql that `dir` lacks.
fn missing_tool(dir: &Path) -> Option<&'static str> {
    ["pg_dump", "psql"]
        .into_iter()
        .find(|name| !is_executable(&dir.join(name)))
}

/// The path of `name` in `bin_dir`, checked before anything is touched.
fn tool(bin_dir: &Path, name: &str) -> Result<PathBuf, String> {
    let path = bin_dir.join(name);
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(format!(
            "{name} not found in {} (set {BIN_DIR_KEY} to the directory holding pg_dump and psql)",
            bin_dir.display()
        ))
    }
}

/// `host:port/dbname`, for messages.
fn addr(t: &Target) -> String {
    format!("{}:{}/{}", t.host, t.port, t.dbname)
}

/// A tokio-postgres error with the server's detail and hint, if any.
fn pg_error(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return crate::group::health::error_text(e);
    };
    let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(d) = db.detail() {
        s.push_str(&format!("; {d}"));
    }
    if let Some(h) = db.hint() {
        s.push_str(&format!("; hint: {h}"));
    }
    s
}

/// Connects with tokio-postgres, driving the connection in a task.
async fn connect(t: &Target, role: &str) -> Result<Client, String> {
    let mut config = connect_config(t);
    config.application_name("reprise-seed");
    let (client, conn) = config
        .connect(t.tls.connector())
        .await
        .map_err(|e| format!("could not connect to {role} {}: {}", addr(t), pg_error(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The exporting transaction on the source, open until pg_dump is done.
struct Snapshot {
    client: Client,
    source: Target,
    id: String,
    /// The highest log seq visible in the snapshot (0 without a log).
    seq: i64,
    has_reprise: bool,
    has_public: bool,
}

impl Snapshot {
    /// Opens the transaction, exports its snapshot and reads what the
    /// seed needs from it. Existence is checked through the catalogs so
    /// that it is judged by the snapshot too.
    async fn export(source: &Target) -> Result<Snapshot, String> {
        let client = connect(source, "source").await?;
        let fail = |e: tokio_postgres::Error| {
            format!(
                "exporting a snapshot on source {} failed: {}",
                addr(source),
                pg_error(&e)
            )
        };
        client
            .batch_execute(
                "SET idle_in_transaction_session_timeout = 0; \
                 BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            )
            .await
            .map_err(fail)?;
        let row = client
            .query_one(
                "SELECT pg_export_snapshot(), \
                 (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE n.nspname = 'reprise' AND c.relname IN ('log', 'node') \
                  AND c.relkind IN ('r', 'p')) = 2, \
                 EXISTS (SELECT FROM pg_namespace WHERE nspname = 'public')",
                &[],
            )
            .await
            .map_err(fail)?;
        let has_reprise: bool = row.get(1);
        let seq = if has_reprise {
            let r = client
                .query_one("SELECT coalesce(max(seq), 0)::bigint FROM reprise.log", &[])
                .await
                .map_err(fail)?;
            r.get(0)
        } else {
            0
        };
        Ok(Snapshot {
            id: row.get(0),
            client,
            source: source.clone(),
            seq,
            has_reprise,
            has_public: row.get(2),
        })
    }

    /// Whether `client` is connected to the source's own database: only
    /// there can a transaction import the exported snapshot.
    async fn is_visible_from(&self, client: &Client) -> bool {
        if client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .is_err()
        {
            return false;
        }
        let set = format!("SET TRANSACTION SNAPSHOT {}", literal(&self.id));
        let same = client.batch_execute(&set).await.is_ok();
        let _ = client.batch_execute("ROLLBACK").await;
        same
    }

    /// Once pg_dump has exited: ends the snapshot, waits (bounded) for the
    /// source transactions that may have moved a sequence before pg_dump
    /// read it, and returns the sequence states as of `seq`.
    async fn states_after_dump(&mut self, say: &impl Fn(&str)) -> Result<Vec<SeqState>, String> {
        let source = addr(&self.source);
        let fail = |what: &str, e: tokio_postgres::Error| {
            format!("{what} on source {source} failed: {}", pg_error(&e))
        };
        // Writers that change sequences hold the group's write lock (an
        // advisory lock); replaying appliers have an xid.
        let row = self
            .client
            .query_one(
                "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}') FROM pg_locks \
                 WHERE granted AND pid <> pg_backend_pid() \
                 AND locktype IN ('advisory', 'transactionid')",
                &[],
            )
            .await
            .map_err(|e| fail("listing open transactions", e))?;
        let open: Vec<String> = row.get(0);
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| fail("ending the snapshot", e))?;
        if !self.has_reprise {
            return Ok(Vec::new());
        }
        if !self.wait_for(&open).await.map_err(|e| fail("waiting", e))? {
            say(&format!(
                "source transactions still open after {} s: sequence states may run \
                 ahead until the applier replays them",
                IN_FLIGHT_WAIT.as_secs()
            ));
        }
        let rows = self
            .client
            .query(
                "SELECT sequences FROM reprise.log WHERE seq > $1 AND sequences IS NOT NULL \
                 ORDER BY seq",
                &[&self.seq],
            )
            .await
            .map_err(|e| fail(&format!("reading the log after seq {}", self.seq), e))?;
        let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(states_at(&columns))
    }

    /// Waits until none of the virtual transactions `open` runs any more;
    /// false if some still do after `IN_FLIGHT_WAIT`.
    async fn wait_for(&self, open: &[String]) -> Result<bool, tokio_postgres::Error> {
        let until = Instant::now() + IN_FLIGHT_WAIT;
        while !open.is_empty() {
            let row = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_locks \
                     WHERE locktype = 'virtualxid' AND virtualxid = ANY($1)",
                    &[&open],
                )
                .await?;
            if row.get::<_, i64>(0) == 0 {
                break;
            }
            if Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(true)
    }
}

/// The sequence states as of a log position, from the `sequences` columns
/// of the entries after it (in order): for each sequence, the state before
/// the first entry that changed it. A sequence first seen without a
/// "before" state was created after the position and is left alone.
fn states_at(columns: &[String]) -> Vec<SeqState> {
    let mut decided: Vec<String> = Vec::new();
    let mut states = Vec::new();
    for column in columns {
        let (before, after) = sequences_column(Some(column));
        for s in after {
            if decided.contains(&s.0) {
                continue;
            }
            if let Some(b) = before.iter().find(|b| b.0 == s.0) {
                states.push(b.clone());
            }
            decided.push(s.0);
        }
    }
    states
}

/// What the wipe must remove on the target.
#[derive(Debug, Default)]
struct TargetCatalog {
    version: i32,
    bootstrap_user: String,
    event_triggers: Vec<String>,
    publications: Vec<String>,
    extensions: Vec<String>,
    schemas: Vec<String>,
    wrappers: Vec<String>,
    large_objects: bool,
}

impl TargetCatalog {
    async fn read(client: &Client) -> Result<TargetCatalog, String> {
        let settings = texts(
            client,
            "SELECT current_setting('server_version_num') \
             UNION ALL SELECT rolname::text FROM pg_roles WHERE oid = 10 \
             UNION ALL SELECT (EXISTS (SELECT FROM pg_largeobject_metadata))::text",
        )
        .await?;
        let [version, bootstrap_user, large_objects] = <[String; 3]>::try_from(settings)
            .map_err(|_| "reading the target's catalog failed: bad settings row".to_string())?;
        Ok(TargetCatalog {
            version: version.parse().unwrap_or(0),
            bootstrap_user,
            large_objects: large_objects == "true",
            event_triggers: texts(
                client,
                "SELECT evtname::text FROM pg_event_trigger ORDER BY 1",
            )
            .await?,
            publications: texts(
                client,
                "SELECT pubname::text FROM pg_publication ORDER BY 1",
            )
            .await?,
            extensions: texts(
                client,
                &format!(
                    "SELECT extname::text FROM pg_extension \
                     WHERE oid >= {FIRST_NORMAL_OID} ORDER BY 1"
                ),
            )
            .await?,
            schemas: texts(
                client,
                "SELECT nspname::text FROM pg_namespace \
                 WHERE nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND nspname NOT LIKE 'pg\\_toast%' AND nspname NOT LIKE 'pg\\_temp%' \
                 ORDER BY 1",
            )
            .await?,
            wrappers: texts(
                client,
                "SELECT fdwname::text FROM pg_foreign_data_wrapper ORDER BY 1",
            )
            .await?,
        })
    }
}

/// The first column of every row of a query, as text.
async fn texts(client: &Client, sql: &str) -> Result<Vec<String>, String> {
    let rows = client
        .query(sql, &[])
        .await
        .map_err(|e| format!("reading the target's catalog failed: {}", pg_error(&e)))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A quoted SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SQL that empties the target, run first in the restoring transaction.
/// Event triggers go first (they could fire on the drops); extensions
/// created after initdb go even when installed in pg_catalog (pg_dump
/// recreates the source's); `public`, when the source has one, is recreated
/// as initdb leaves it, the state pg_dump's output for `public` (owner,
/// comment, grants) is relative to.
fn wipe_sql(c: &TargetCatalog, public: bool) -> String {
    let mut sql = String::from("SET client_min_messages = warning;\n");
    let mut each = |template: &str, names: &[String]| {
        for n in names {
            sql.push_str(&template.replace("{}", &super::quoted_ident(n)));
            sql.push('\n');
        }
    };
    each("DROP EVENT TRIGGER IF EXISTS {};", &c.event_triggers);
    each("DROP PUBLICATION IF EXISTS {};", &c.publications);
    each("DROP EXTENSION IF EXISTS {} CASCADE;", &c.extensions);
    each("DROP SCHEMA IF EXISTS {} CASCADE;", &c.schemas);
    each(
        "DROP FOREIGN DATA WRAPPER IF EXISTS {} CASCADE;",
        &c.wrappers,
    );
    if c.large_objects {
        sql.push_str("SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;\n");
    }
    if public {
        sql.push_str(&if c.version >= 150000 {
            "CREATE SCHEMA public AUTHORIZATION pg_database_owner;\n\
             GRANT USAGE ON SCHEMA public TO PUBLIC;\n"
                .to_string()
        } else {
            format!(
                "CREATE SCHEMA public AUTHORIZATION {};\nGRANT ALL ON SCHEMA public TO PUBLIC;\n",
                super::quoted_ident(&c.bootstrap_user)
            )
        });
        sql.push_str("COMMENT ON SCHEMA public IS 'standard public schema';\n");
    }
    sql.push_str("RESET client_min_messages;\n");
    sql
}

/// The SQL run last in the restoring transaction: the `reprise` schema if
/// the source had none, sequence states as of `seq`, the node's role and
/// term, and the check that the restored log ends at `seq`.
fn tail_sql(states: &[SeqState], term: i64, seq: i64, install_schema: bool) -> String {
    let mut sql = String::from("\n-- reprise seed: this node's state as of the snapshot\n");
    if install_schema {
        sql.push_str(SCHEMA_SQL);
        sql.push('\n');
    }
    for SeqState(name, last, start) in states {
        let (value, called) = match last {
            Some(v) => (*v, "true"),
            None => (*start, "false"),
        };
        sql.push_str(&format!(
            "SELECT pg_catalog.setval(c, {value}, {called}) \
             FROM pg_catalog.to_regclass({}) c WHERE c IS NOT NULL;\n",
            literal(name)
        ));
    }
    sql.push_str(&format!(
        "UPDATE reprise.node SET role = 'subscriber', term = {term};\n\
         DO $reprise_seed$\n\
         DECLARE v_seq bigint := (SELECT coalesce(max(seq), 0) FROM reprise.log);\n\
         BEGIN\n\
         IF (SELECT count(*) FROM reprise.node) <> 1 THEN\n\
         RAISE EXCEPTION 'reprise seed: reprise.node must hold one row';\n\
         END IF;\n\
         IF v_seq <> {seq} THEN\n\
         RAISE EXCEPTION 'reprise seed: the restored log ends at seq %, the snapshot at seq {seq}', v_seq;\n\
         END IF;\n\
         END\n\
         $reprise_seed$;\n"
    ));
    sql
}

/// Reads the committed result back on the target.
async fn check_target(client: &Client, term: i64, seq: i64) -> Result<(), String> {
    let row = client
        .query_one(
            "SELECT n.role, n.term, (SELECT coalesce(max(seq), 0)::bigint FROM reprise.log) \
             FROM reprise.node n",
            &[],
        )
        .await
        .map_err(|e| format!("checking the seeded target failed: {}", pg_error(&e)))?;
    let (role, t, s): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    if role != "subscriber" || t != term || s != seq {
        return Err(format!(
            "the seeded target reads role {role}, term {t}, seq {s}; expected subscriber, \
             term {term}, seq {seq} (was it changed meanwhile?)"
        ));
    }
    Ok(())
}

/// libpq connection arguments (`-d` as a conninfo so any name is safe)
/// and environment.
fn connection_args(cmd: &mut Command, t: &Target) {
    let dbname = format!(
        "dbname='{}'",
        t.dbname.replace('\\', "\\\\").replace('\'', "\\'")
    );
    cmd.arg("-h")
        .arg(&t.host)
        .arg("-p")
        .arg(t.port.to_string())
        .arg("-U")
        .arg(&t.user)
        .arg("-d")
        .arg(dbname)
        .arg("-w")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGAPPNAME", "reprise-seed")
        // The node's own sslmode, so the tools connect as the proxy does.
        .env("PGSSLMODE", t.tls.mode.as_str());
    match &t.tls.rootcert {
        Some(ca) => cmd.env("PGSSLROOTCERT", ca),
        None => cmd.env_remove("PGSSLROOTCERT"),
    };
    if !t.password.is_empty() {
        cmd.env("PGPASSWORD", &t.password);
    }
}

/// `pg_dump --snapshot=ID` of the whole database, plain SQL on stdout.
fn dump_command(pg_dump: &Path, source: &Target, snapshot: &str) -> Command {
    let mut cmd = Command::new(pg_dump);
    cmd.arg(format!("--snapshot={snapshot}"))
        .arg("--format=plain");
    connection_args(&mut cmd, source);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    cmd
}

/// `psql --single-transaction` reading the script from stdin.
fn restore_command(psql: &Path, target: &Target) -> Command {
    let mut cmd = Command::new(psql);
    cmd.args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        "-f",
        "-",
    ]);
    connection_args(&mut cmd, target);
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    cmd
}

/// A running client tool and the end of its stderr.
struct Tool {
    name: &'static str,
    child: Child,
    stderr: JoinHandle<String>,
}

impl Tool {
    fn spawn(mut cmd: Command, name: &'static str) -> Result<Tool, String> {
        cmd.stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("could not start {name}: {e}"))?;
        let stderr = tokio::spawn(tail(child.stderr.take().expect("piped stderr")));
        Ok(Tool {
            name,
            child,
            stderr,
        })
    }

    /// Waits for the exit; Err with the status and stderr if it failed.
    async fn finish(mut self) -> Result<(), String> {
        let status = self.child.wait().await;
        let stderr = self.stderr.await.unwrap_or_default();
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) if stderr.is_empty() => Err(format!("{} exited with {s}", self.name)),
            Ok(s) => Err(format!("{} exited with {s}: {stderr}", self.name)),
            Err(e) => Err(format!("waiting for {} failed: {e}", self.name)),
        }
    }

    /// Kills it (psql: before it could commit) and returns its stderr.
    async fn kill(mut self) -> String {
        let _ = self.child.kill().await;
        self.stderr.await.unwrap_or_default()
    }
}

/// The last `STDERR_TAIL` bytes a stream yields, trimmed.
async fn tail(mut r: impl AsyncRead + Unpin) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > STDERR_TAIL {
            kept.drain(..kept.len() - STDERR_TAIL);
        }
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

/// pg_dump's first output: it has connected, imported the snapshot and
/// locked every table. If it ends without output, its error.
async fn first_chunk(
    out: &mut ChildStdout,
    dump: Tool,
    source: &Target,
) -> Result<(Vec<u8>, Tool), String> {
    let mut first = vec![0u8; CHUNK];
    let n = match out.read(&mut first).await {
        Ok(n) => n,
        Err(e) => {
            let stderr = dump.kill().await;
            return Err(format!("reading pg_dump's output failed: {e} {stderr}"));
        }
    };
    if n == 0 {
        let why = match dump.finish().await {
            Err(e) => e,
            Ok(()) => "pg_dump wrote nothing".to_string(),
        };
        return Err(format!(
            "pg_dump from source {} failed: {why}",
            addr(source)
        ));
    }
    first.truncate(n);
    Ok((first, dump))
}

/// Why streaming stopped early.
enum Broken {
    /// Reading pg_dump's output failed.
    Read(String),
    /// psql stopped reading (it failed).
    Write(String),
}

impl Broken {
    /// Stops both tools and says what failed. psql is killed before it
    /// sees the end of its input, so it never commits a partial restore.
    async fn report(
        self,
        dump: Tool,
        restore: Tool,
        input: ChildStdin,
        source: &Target,
        target: &Target,
    ) -> String {
        match self {
            Broken::Write(e) => {
                let stderr = restore.kill().await;
                drop(input);
                dump.kill().await;
                let why = if stderr.is_empty() { e } else { stderr };
                format!("restoring into target {} failed: {why}", addr(target))
            }
            Broken::Read(e) => {
                restore.kill().await;
                drop(input);
                let stderr = dump.kill().await;
                format!(
                    "reading pg_dump's output from source {} failed: {e} {stderr}",
                    addr(source)
                )
            }
        }
    }
}

/// Streams `first`, then the rest of pg_dump's output, into psql; returns
/// the dump's size.
async fn copy(
    first: &[u8],
    out: &mut ChildStdout,
    input: &mut ChildStdin,
    say: &impl Fn(&str),
) -> Result<u64, Broken> {
    let write = |e: std::io::Error| Broken::Write(e.to_string());
    input.write_all(first).await.map_err(write)?;
    let mut bytes = first.len() as u64;
    let mut shown = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = out
            .read(&mut buf)
            .await
            .map_err(|e| Broken::Read(e.to_string()))?;
        if n == 0 {
            return Ok(bytes);
        }
        input.write_all(&buf[..n]).await.map_err(write)?;
        bytes += n as u64;
        if shown.elapsed() >= PROGRESS_EVERY {
            say(&format!("restoring: {} so far", human(bytes)));
            shown = Instant::now();
        }
    }
}

/// A byte count for people: "812 B", "12.3 kB", "12.3 MB", "1.2 GB".
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.1} GB", b / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_before_the_first_later_change_wins() {
        let columns = vec![
            // entry S+1 moves a from 5 to 6 and creates c
            r#"[[["public.a",5,1]],[["public.a",6,1],["public.c",1,1]]]"#.to_string(),
            // entry S+2 moves a again and c, and b from never-called
            r#"[[["public.a",6,1],["public.b",null,1],["public.c",1,1]],[["public.a",7,1],["public.b",1,1],["public.c",2,1]]]"#.to_string(),
        ];
        assert_eq!(
            states_at(&columns),
            vec![
                SeqState("public.a".into(), Some(5), 1),
                SeqState("public.b".into(), None, 1),
            ]
        );
    }

    #[test]
    fn wipe_drops_everything_and_recreates_public_as_initdb_does() {
        let c = TargetCatalog {
            version: 150004,
            bootstrap_user: "postgres".into(),
            event_triggers: vec!["no drops".into()],
            schemas: vec!["junk\"x".into(), "public".into(), "reprise".into()],
            extensions: vec!["citext".into()],
            large_objects: true,
            ..TargetCatalog::default()
        };
        let sql = wipe_sql(&c, true);
        let pos = |s: &str| {
            sql.find(s)
                .unwrap_or_else(|| panic!("{s} missing in {sql}"))
        };
        assert!(pos("DROP EVENT TRIGGER IF EXISTS \"no drops\";") < pos("DROP EXTENSION"));
        assert!(pos("DROP EXTENSION IF EXISTS \"citext\" CASCADE;") < pos("DROP SCHEMA"));
        pos("DROP SCHEMA IF EXISTS \"junk\"\"x\" CASCADE;");
        pos("lo_unlink");
        assert!(
            pos("DROP SCHEMA IF EXISTS \"reprise\"")
                < pos("CREATE SCHEMA public AUTHORIZATION pg_database_owner;")
        );
        pos("GRANT USAGE ON SCHEMA public TO PUBLIC;");
        assert!(!wipe_sql(&c, false).contains("CREATE SCHEMA"));
        let old = wipe_sql(
            &TargetCatalog {
                version: 140000,
                ..c
            },
            true,
        );
        assert!(old.contains("AUTHORIZATION \"postgres\";\nGRANT ALL ON SCHEMA public TO PUBLIC;"));
    }

    #[test]
    fn tail_sets_sequences_node_and_checks_the_position() {
        let states = vec![
            SeqState("shop.\"odd'name\"".into(), Some(41), 1),
            SeqState("public.b".into(), None, 7),
        ];
        let sql = tail_sql(&states, 7, 42, false);
        assert!(
            sql.contains("setval(c, 41, true) FROM pg_catalog.to_regclass('shop.\"odd''name\"')")
        );
        assert!(sql.contains("setval(c, 7, false)"));
        assert!(sql.contains("SET role = 'subscriber', term = 7;"));
        assert!(sql.contains("IF v_seq <> 42 THEN"));
        assert!(!sql.contains("CREATE SCHEMA IF NOT EXISTS reprise"));
        assert!(tail_sql(&[], 1, 0, true).contains("CREATE SCHEMA IF NOT EXISTS reprise"));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(812), "812 B");
        assert_eq!(human(12_345_678), "12.3 MB");
        assert_eq!(human(1_200_000_000), "1.2 GB");
    }

    #[test]
    fn a_configured_dir_without_the_tools_names_the_key() {
        let e = bin_dir(Some("/nonexistent")).unwrap_err();
        assert!(e.contains("replication.pg_bin_dir"), "{e}");
        assert!(e.contains("/nonexistent"), "{e}");
    }

    #[test]
    fn the_seed_future_is_send() {
        fn send<T: Send>(_: &T) {}
        let t = Target {
            host: "h".into(),
            port: 1,
            user: "u".into(),
            password: String::new(),
            dbname: "d".into(),
            tls: Default::default(),
        };
        let progress = |_: &str| {};
        let f = seed(&t, &t, 1, Path::new("/x"), &progress);
        send(&f);
    }
}
