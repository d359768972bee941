//! The write path of a session: the group's write lock from the first write
//! statement, capture of every write with its bound parameters, the log
//! append inside the same transaction just before COMMIT, and the wait for
//! `sync_replicas`.

use std::collections::{HashSet, VecDeque};

use bytes::BytesMut;

use super::dispatch::{Item, Unit};
use super::{End, Session};
use crate::backend::Expect;
use crate::replication::{self, Entry, EntryHeader, determinism, routines, rowlocal};
use crate::route::{Classification, SqlPrepared};
use crate::wire::Frame;
use crate::wire::messages::{self, PgError, Reader};

/// A write transaction in progress on the primary.
#[derive(Debug, Default)]
pub struct WriteTx {
    /// The proxy opened it around an autocommit write: it commits it too.
    pub implicit: bool,
    /// Raw frontend messages to replay.
    pub capture: BytesMut,
    /// Statements whose Parse is already in the capture, by generation
    /// (unique within the session, so it names the definition).
    parsed: rustc_hash::FxHashSet<u64>,
    pub tags: Vec<String>,
    pub now: String,
    /// `reprise.sequences()` when the lock was taken.
    pub seqs_before: String,
    pub settings: Vec<String>,
    /// The lock or append failed: the transaction must not commit.
    pub failed: Option<PgError>,
    /// The failure of our own write-lock query when the client can retry
    /// it (a deadlock, a lock timeout…), not yet told: the primary answers
    /// the client's next statement "transaction is aborted", and the client
    /// gets this instead, with its SQLSTATE.
    pub lock_error: Option<PgError>,
    /// Our COMMIT of an implicit transaction failed for the client's own
    /// reasons (a deferred constraint, a serialization failure): the
    /// node's ErrorResponse, relayed as it is.
    commit_error: Option<Frame>,
    /// The seq the append returned.
    pub seq: Option<u64>,
    /// The entry's payload, once appended.
    payload: bytes::Bytes,
    /// The log row the append wrote (published to the appliers once the
    /// transaction committed).
    row: Option<replication::LogRow>,
    /// The client's own ReadyForQuery, held until the commit is settled.
    pub held_rfq: Option<Frame>,
    /// An implicit transaction around a simple Query: PostgreSQL commits
    /// one before it sends the last statement's CommandComplete, and sends
    /// none if the commit fails.
    pub simple: bool,
    /// That last CommandComplete, held until our COMMIT succeeded.
    pub held_complete: Option<Frame>,
    /// The append (and so the COMMIT) has been sent.
    pub committing: bool,
    /// The entry kind (see `replication::NONTX`).
    pub kind: String,
    /// The write lock is held exclusively (else shared: row-local writes).
    pub exclusive: bool,
    /// Only savepoint statements so far: captured, but no write lock
    /// taken and, should nothing else come, no entry.
    lock_deferred: bool,
    /// The primary reported the transaction block failed (status 'E'):
    /// its COMMIT only rolls back, so no entry is appended.
    aborted: bool,
    /// The transaction changed the schema.
    pub ddl: bool,
    /// The term its entry was appended in.
    pub term: u64,
    /// SQL-level prepared statements the entry replays first (their
    /// PREPARE texts): those its EXECUTE and DEALLOCATE statements use
    /// that were prepared before it.
    pub prepares: Vec<String>,
    /// Names of SQL-level prepared statements the entry has at this point
    /// of its capture (from `prepares` or a captured PREPARE).
    defined: rustc_hash::FxHashSet<String>,
    /// The capture before the client unit in flight. A unit that fails is
    /// taken out again — the client can only go on past it with ROLLBACK
    /// TO SAVEPOINT, which undoes it.
    unit_mark: CaptureMark,
}

/// Where a write transaction's capture stood before a client unit.
#[derive(Debug, Default)]
struct CaptureMark {
    bytes: usize,
    tags: usize,
    parsed: rustc_hash::FxHashSet<u64>,
    prepares: usize,
    defined: rustc_hash::FxHashSet<String>,
}

/// A unit the proxy sent for itself on the primary, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Own {
    /// The write lock for the session, before a snapshot-isolation BEGIN.
    SessionLock,
    Lock,
    /// The session's write lock released after its transaction failed.
    Unlock,
    Append,
    Commit,
    Rollback,
}

/// A statement the proxy runs for itself on the primary in every write
/// transaction: prepared once per connection (parsing and planning it on
/// every transaction cost the primary about as much as running it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnStatement {
    Begin,
    LockShared,
    LockExclusive,
    /// The session's write lock, taken before a snapshot-isolation BEGIN.
    SessionLock,
    /// The exclusive lock moved from the session to its transaction.
    LockFromSession,
    Upgrade,
    Append,
}

impl OwnStatement {
    /// Its name on the connection (clients' names are unlikely to clash).
    fn name(self) -> &'static str {
        match self {
            OwnStatement::Begin => "reprise.own.begin",
            OwnStatement::LockShared => "reprise.own.lock_shared",
            OwnStatement::LockExclusive => "reprise.own.lock",
            OwnStatement::SessionLock => "reprise.own.session_lock",
            OwnStatement::LockFromSession => "reprise.own.lock_from_session",
            OwnStatement::Upgrade => "reprise.own.upgrade",
            OwnStatement::Append => "reprise.own.append",
        }
    }

    fn sql(self, group: &str) -> String {
        match self {
            OwnStatement::Begin => "BEGIN".to_string(),
            OwnStatement::LockShared => replication::shared_lock_query(group),
            OwnStatement::LockExclusive => replication::lock_query(group),
            OwnStatement::SessionLock => replication::session_lock_query(group),
            OwnStatement::LockFromSession => replication::lock_from_session_query(group),
            OwnStatement::Upgrade => replication::upgrade_lock_query(group),
            OwnStatement::Append => {
                "SELECT * FROM reprise.append_row($1::bigint, $2::bytea, $3::text, $4::bigint)"
                    .to_string()
            }
        }
    }
}

/// The generation a connection's account of prepared statements gives the
/// proxy's own (clients' generations count up from 1).
pub(super) const OWN_GENERATION: u64 = u64::MAX;

/// The write-path part of a session's state.
#[derive(Debug, Default)]
pub struct WriteState {
    pub tx: Option<WriteTx>,
    pub own: VecDeque<Own>,
    /// Highest seq this session committed (read-your-writes).
    pub last_seq: u64,
    /// Temporary tables of this session: writes to them are not logged.
    pub temps: HashSet<String>,
    /// Tables given a DEFAULT the copies compute differently in the
    /// transaction under way: the catalog cannot know those defaults yet.
    pub declared_defaults: HashSet<String>,
    /// Tables created with a sequence default in the transaction under way:
    /// the catalog cannot know them yet.
    pub declared_numbered: HashSet<String>,
    /// SET statements for the client's startup parameters that change how
    /// values are read (TimeZone, DateStyle…), replayed with every entry.
    pub startup_settings: Vec<String>,
    /// The startup parameters make snapshot isolation the default.
    pub startup_snapshot: bool,
    /// The startup parameters make READ ONLY the default.
    pub startup_read_only: bool,
    /// `SET LOCAL` statements of the transaction block under way from
    /// before it wrote (or made a savepoint): its entry replays them first.
    /// (What follows is captured with the entry, in order.)
    pub tx_locals: Vec<String>,
    /// A command that runs outside a transaction, logged once it succeeded.
    pub nontx: Option<Frame>,
    /// The primary reported an error for the client unit in flight.
    pub unit_failed: bool,
    /// A committed transaction's ReadyForQuery waiting for subscribers:
    /// (seq, term, frame).
    pub sync_wait: Option<(u64, u64, Frame)>,
    /// The own unit whose ReadyForQuery just arrived.
    pub last_own: Option<Own>,
    /// The primary connection holds the write lock at session level (see
    /// `before_begin`): released as the transaction's lock is taken,
    /// or once the transaction ends if that failed.
    pub session_lock: bool,
    /// A snapshot-isolation block began (see `before_begin`): its write
    /// lock moves into the transaction before its first unit that takes a
    /// snapshot.
    pub pending_move: Option<LockMove>,
    /// The last client unit on the primary left its transaction block
    /// failed (ReadyForQuery 'E').
    pub block_aborted: bool,
    /// Row-locality of prepared statements' text, with the catalog epoch
    /// it was judged at: a prepared statement runs again and again, and
    /// normalising its text for the group's cache each time cost more
    /// than the rest of the write path's checks together.
    pub row_local_memo: rustc_hash::FxHashMap<String, (u64, bool)>,
}

/// The write lock of a block begun with snapshot isolation, not yet moved
/// into its transaction (see `Session::move_session_lock`).
#[derive(Debug, Clone, Copy)]
pub struct LockMove {
    /// The session took the lock before the BEGIN (`before_begin`).
    pub session_locked: bool,
    /// The block was made READ ONLY since: it will not write.
    pub read_only: bool,
}

/// Prepared statements' texts a session remembers the row-locality of.
const ROW_LOCAL_MEMO: usize = 1024;

/// SET statements for startup parameters that change how replayed
/// statements read their input.
pub fn startup_settings(params: &[(String, String)]) -> Vec<String> {
    startup_pairs(params)
        .iter()
        .filter(|(k, _)| {
            REPLAYED_AT_STARTUP
                .iter()
                .any(|r| r.eq_ignore_ascii_case(k))
        })
        .map(|(k, v)| format!("SET {k} = '{}'", v.replace('\'', "''")))
        .collect()
}

/// What the client's startup parameters make its transactions by
/// default: (REPEATABLE READ or SERIALIZABLE, READ ONLY).
pub fn startup_tx_defaults(params: &[(String, String)]) -> (bool, bool) {
    (
        TxDefault::SnapshotIsolation.at_startup(params),
        TxDefault::ReadOnly.at_startup(params),
    )
}

/// The startup parameters that change how replayed statements read their
/// input.
const REPLAYED_AT_STARTUP: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "search_path",
    "extra_float_digits",
    "bytea_output",
    "standard_conforming_strings",
];

/// The startup parameters as (name, value) pairs, with the settings given
/// in `options` as pairs of their own.
fn startup_pairs(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, v) in params {
        if k == "options" {
            // `-c name=value`, `-cname=value` and `--name=value` settings.
            let mut words = v.split_whitespace().peekable();
            while let Some(w) = words.next() {
                let setting = match w {
                    "-c" => words.next(),
                    _ => w.strip_prefix("-c").or_else(|| w.strip_prefix("--")),
                };
                if let Some((name, value)) = setting.and_then(|s| s.split_once('=')) {
                    pairs.push((name.to_string(), value.to_string()));
                }
            }
        } else {
            pairs.push((k.clone(), v.clone()));
        }
    }
    pairs
}

/// Writes to tables the catalog did not know when they were classified:
/// the catalog is reloaded now and they are checked again, so the first
/// write to a table made behind the proxy cannot slip a volatile default
/// past the check. Returns the rewrites to make (text as it would be sent
/// → text with its volatile defaults captured), or the refusal.
pub(super) async fn recheck_defaults(
    group: &crate::group::Group,
    sqls: &[String],
) -> Result<Vec<(String, String)>, PgError> {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    let Some(catalog) = group.fresh_rel_catalog(WAIT).await else {
        // Unchecked, it could replay with other values on every copy.
        return Err(PgError::error(
            "55000",
            format!(
                "Reprise could not load the table catalog within {} s to check this write for volatile values",
                WAIT.as_secs()
            ),
        )
        .with_hint("retry the statement; the primary may be busy or unreachable"));
    };
    let mut rewrites = Vec::new();
    for sql in sqls {
        let keyed = sql.contains("reprise.captured(");
        if let Some(text) = capture_rows(sql, keyed, &catalog, &mut false)? {
            rewrites.push((sql.clone(), text));
        }
    }
    Ok(rewrites)
}

/// `text` with its values captured by row where the catalog asks for it:
/// UPDATEs capturing values (`keyed`) get them keyed by row, and INSERTs
/// that leave volatile defaults get those defaults named and captured.
/// None when nothing changes; the 0A000 refusal when a write cannot be
/// made safe. Sets `unknown` when a written table is not in the catalog.
fn capture_rows(
    text: &str,
    keyed: bool,
    catalog: &rowlocal::RelCatalog,
    unknown: &mut bool,
) -> Result<Option<String>, PgError> {
    if let Some(dependence) = rowlocal::storage_order_dependence(text, catalog, &[]) {
        return Err(storage_order_refusal(dependence));
    }
    routine_check(text, catalog, unknown)?;
    let mut out = None;
    let mut keyed = keyed;
    if let Some(expanded) = rowlocal::expand_update_defaults(text, catalog) {
        // `SET col = DEFAULT`: captured as the default's expression written
        // out would be, or refused as it would be.
        let a = determinism::analyze_write(&expanded);
        if let Some(reason) = a.refused {
            return Err(PgError::error("0A000", reason));
        }
        let captured = a.rewritten.ok_or_else(|| {
            PgError::error(
                "0A000",
                "this UPDATE sets a column to a default each copy would compute differently",
            )
            .with_hint("set the column to a value instead")
        })?;
        keyed |= a.update_captures;
        out = Some(captured);
    }
    if keyed {
        let current = out.as_deref().unwrap_or(text);
        out = Some(rowlocal::key_captures(current, catalog).ok_or_else(multi_row_capture)?);
    }
    let current = out.as_deref().unwrap_or(text);
    if let Some(captured) =
        rowlocal::capture_volatile_defaults(current, catalog, unknown).map_err(default_refusal)?
    {
        out = Some(captured);
    }
    Ok(out.filter(|t| t != text))
}

/// The statements of DO blocks and routine bodies in `text`, checked as
/// [`capture_rows`] checks a client's: run on each copy as written, a
/// volatile default they leave or rows they number in storage order cannot
/// be captured, so such a body is refused (a function when it is created,
/// as every later call would diverge). Computed dynamic SQL is not seen.
fn routine_check(
    text: &str,
    catalog: &rowlocal::RelCatalog,
    unknown: &mut bool,
) -> Result<(), PgError> {
    for body in routines::routine_bodies(text) {
        let what = body.what;
        let inside = |e: PgError| {
            PgError::error("0A000", format!("in this {what}: {}", e.message)).with_hint(format!(
                "Reprise cannot capture values inside a {what}: {}",
                e.hint.as_deref().unwrap_or("write the value out")
            ))
        };
        for stmt in &body.statements {
            if let Some(dependence) = rowlocal::storage_order_dependence(stmt, catalog, &[]) {
                return Err(inside(storage_order_refusal(dependence)));
            }
            if let Some(reason) = rowlocal::volatile_default_use(stmt, catalog, unknown) {
                return Err(inside(PgError::error("0A000", reason).with_hint(
                    "give the column a value in the INSERT, or make its default deterministic",
                )));
            }
            if rowlocal::expand_update_defaults(stmt, catalog).is_some() {
                return Err(inside(
                    PgError::error(
                        "0A000",
                        "an UPDATE sets a column to a default each copy would compute differently",
                    )
                    .with_hint("set the column to a value instead"),
                ));
            }
        }
        for lp in &body.loops {
            let Some((table, quoted)) = lp
                .body
                .iter()
                .find_map(|s| rowlocal::numbers_rows(s, catalog))
            else {
                continue;
            };
            // The loop's rows get numbers in the order its query returns
            // them: as an INSERT … SELECT into that table would.
            let as_insert = format!("INSERT INTO {quoted} {}", lp.query);
            if rowlocal::storage_order_dependence(&as_insert, catalog, &[]).is_some() {
                return Err(PgError::error(
                    "0A000",
                    format!(
                        "in this {what}: a loop over `{}` writes {table}, whose rows are numbered \
                         (a sequence default or a numbering row trigger), once per row in the order \
                         the query returns them; without an ORDER BY on a unique key that order is \
                         storage order, which differs between the copies of the group",
                        lp.query
                    ),
                )
                .with_hint("end the loop query's ORDER BY with a unique key"));
            }
        }
    }
    Ok(())
}

/// The log append of a REPEATABLE READ or SERIALIZABLE transaction found
/// the log's head taken: PostgreSQL takes such a transaction's snapshot
/// as its first statement (our write-lock query) starts, before the lock
/// is granted, so a transaction that committed while it waited is not in
/// its snapshot. Its reads may miss that transaction's writes, which the
/// copies replay before it: it cannot commit, as PostgreSQL's own
/// serialization failures cannot.
fn stale_snapshot_error() -> PgError {
    PgError::error(
        "40001",
        "could not serialize access: another write transaction committed after this \
         transaction's snapshot was taken and before it got the group's write lock",
    )
    .with_hint("retry the transaction")
}

/// A write that depends on storage order (see
/// `rowlocal::storage_order_dependence`).
fn storage_order_refusal(dependence: rowlocal::OrderDependence) -> PgError {
    use rowlocal::{Numbering, OrderDependence};
    const TIES: &str = "it names neither a row key of the table read nor every selected column";
    match dependence {
        OrderDependence::Numbered {
            table,
            by: Numbering::Sequence,
            ties,
        } => PgError::error(
            "0A000",
            if ties {
                format!(
                    "INSERT … SELECT into {table}, which takes values from a sequence, has an \
                     ORDER BY that can leave ties ({TIES}): the copies could number tied rows \
                     differently"
                )
            } else {
                format!(
                    "INSERT … SELECT (or MERGE … INSERT) into {table}, which takes values from \
                     a sequence, has no ORDER BY: the copies could read the rows in another \
                     order and number them differently"
                )
            },
        )
        .with_hint(
            "order the selected rows by a unique key (end the ORDER BY with it); for a MERGE, \
             insert the new rows with INSERT … SELECT … ORDER BY",
        ),
        OrderDependence::Numbered { table, .. } => PgError::error(
            "0A000",
            format!(
                "this write may change several rows of {table}, whose row trigger takes sequence \
                 values (or writes a table that does): it runs for the rows in the order the \
                 statement visits them, which is storage order and differs between the copies \
                 of the group, so they would number the rows differently"
            ),
        )
        .with_hint(
            "change the rows one at a time by a unique key, or give INSERT … SELECT an ORDER BY \
             on a unique key",
        ),
        OrderDependence::MultiMatch { target, source } => PgError::error(
            "0A000",
            format!(
                "this UPDATE … FROM sets {target} from {source}, but its WHERE does not join a \
                 unique key of {source}: where several rows of {source} match one row of \
                 {target}, PostgreSQL uses the first it reads, which is storage order and \
                 differs between the copies of the group"
            ),
        )
        .with_hint(format!(
            "join {source} on a unique key (all its columns, with =), or read it through a \
             subquery that leaves one row per key (GROUP BY, DISTINCT ON … ORDER BY)"
        )),
        OrderDependence::DistinctOn => PgError::error(
            "0A000",
            format!(
                "DISTINCT ON in a write with an ORDER BY that can leave ties ({TIES}) keeps, of \
                 tied rows, the first in storage order, which differs between copies of the group"
            ),
        )
        .with_hint("end the ORDER BY with a unique key, e.g. ORDER BY account, created_at, id"),
        OrderDependence::OrderedCall { function } => PgError::error(
            "0A000",
            format!(
                "{function}() in a write with an ORDER BY that can leave ties (it names neither \
                 a row key of each table read nor, for an aggregate, every argument) sees tied \
                 rows in storage order, which differs between copies of the group"
            ),
        )
        .with_hint("end its ORDER BY with a unique key, e.g. ORDER BY created_at, id"),
        OrderDependence::Limited => PgError::error(
            "0A000",
            format!(
                "LIMIT or OFFSET in a write with an ORDER BY that can leave ties ({TIES}) picks \
                 among tied rows in storage order, which differs between copies of the group"
            ),
        )
        .with_hint("end the ORDER BY with a unique key, e.g. ORDER BY created_at, id"),
    }
}

/// The target of an `INSERT … SELECT nextval(…), …` without ORDER BY: it
/// numbers the rows in the order it reads them.
fn nextval_in_unordered_insert_select(a: &determinism::WriteAnalysis, sql: &str) -> Option<String> {
    if a.uses_nextval && !insert_selects_ordered(sql) {
        a.insert_select_targets.first().cloned()
    } else {
        None
    }
}

/// Volatile values in the SET list of an UPDATE that may change several
/// rows: the copies could compute them for the rows in another order.
fn multi_row_capture() -> PgError {
    PgError::error(
        "0A000",
        "volatile values (random(), gen_random_uuid(), clock_timestamp(), …) in an UPDATE that \
         may change several rows are captured only when the table has a primary key (or a unique \
         key without NULLs) and the UPDATE has no FROM or WITH: each copy could give the rows \
         different values",
    )
    .with_hint("give the table a primary key, update one row at a time by its key, or compute the values in the application")
}

fn default_refusal(reason: String) -> PgError {
    let hint = if reason.starts_with("this COPY") {
        "give the column its values in the COPY data (name it in COPY's column list), load the \
         rows with INSERT … VALUES naming the other columns (its default's value is then \
         captured), or make its default deterministic"
    } else {
        "name the column in the INSERT's column list (its default's value is then captured), \
         give it a value, or make its default deterministic"
    };
    PgError::error("0A000", reason).with_hint(hint)
}

/// Statements that are per-node maintenance: never logged.
pub fn is_maintenance(sql: &str) -> bool {
    first_word_in(
        sql,
        &[
            "VACUUM",
            "ANALYZE",
            "ANALYSE",
            "CHECKPOINT",
            "CLUSTER",
            "REINDEX",
            "LOAD",
        ],
    )
}

/// The commands logged as their own (non-transactional) entries.
pub const INDEX_CONCURRENTLY: &str = "CREATE/DROP INDEX CONCURRENTLY";

/// Statements that cannot run inside a transaction block.
pub fn not_in_transaction(sql: &str) -> Option<&'static str> {
    // Only these commands can be any of them: DML is answered without
    // scanning the whole text.
    if !first_word_in(sql, &["CREATE", "DROP", "ALTER"]) {
        return None;
    }
    let upper = sql.to_ascii_uppercase();
    let words: Vec<&str> = upper.split_whitespace().collect();
    let has = |a: &str, b: &str| words.windows(2).any(|w| w[0] == a && w[1] == b);
    if has("INDEX", "CONCURRENTLY") {
        return Some(INDEX_CONCURRENTLY);
    }
    match words.first().copied() {
        Some("CREATE") if words.get(1) == Some(&"DATABASE") => Some("CREATE DATABASE"),
        Some("DROP") if words.get(1) == Some(&"DATABASE") => Some("DROP DATABASE"),
        Some("ALTER") if words.get(1) == Some(&"SYSTEM") => Some("ALTER SYSTEM"),
        Some("CREATE") if words.get(1) == Some(&"TABLESPACE") => Some("CREATE TABLESPACE"),
        _ => None,
    }
}

/// Whether every statement of `sql` only touches temporary tables (which
/// live on the primary alone and are not logged). Learns the names of the
/// temporary tables it creates or drops.
pub fn temp_only(sql: &str, temps: &mut HashSet<String>) -> bool {
    // The wrapper can panic on odd trees: treat that as "not temporary".
    let Some(parsed) = crate::route::parsed::tree(sql) else {
        return false;
    };
    let Some(stmts) = parsed.json().and_then(|j| j["stmts"].as_array()) else {
        return false;
    };
    let mut all = !stmts.is_empty();
    for raw in stmts {
        let Some(v) = raw.get("stmt") else {
            return false;
        };
        let v = v.get("node").unwrap_or(v);
        let relation_is_temp = |rel: &serde_json::Value, temps: &HashSet<String>| {
            rel["schemaname"].as_str() == Some("pg_temp")
                || rel["relpersistence"].as_str() == Some("t")
                || rel["relname"].as_str().is_some_and(|n| temps.contains(n))
        };
        let this = if let Some(c) = v.get("CreateStmt") {
            let rel = &c["relation"];
            let t = rel["relpersistence"].as_str() == Some("t");
            if t && let Some(n) = rel["relname"].as_str() {
                temps.insert(n.to_string());
            }
            t
        } else if let Some(c) = v.get("CreateTableAsStmt") {
            let rel = &c["into"]["rel"];
            let t = rel["relpersistence"].as_str() == Some("t");
            if t && let Some(n) = rel["relname"].as_str() {
                temps.insert(n.to_string());
            }
            t
        } else if let Some(st) = ["InsertStmt", "UpdateStmt", "DeleteStmt"]
            .iter()
            .find_map(|k| v.get(*k))
        {
            relation_is_temp(&st["relation"], temps)
        } else if let Some(t) = v.get("TruncateStmt") {
            t["relations"].as_array().is_some_and(|rels| {
                rels.iter()
                    .all(|r| relation_is_temp(&r["node"]["RangeVar"], temps))
            })
        } else if let Some(d) = v.get("DropStmt") {
            let names: Vec<String> = d["objects"]
                .as_array()
                .map(|objs| {
                    objs.iter()
                        .filter_map(|o| {
                            o["node"]["List"]["items"]
                                .as_array()
                                .and_then(|items| items.last())
                                .and_then(|i| i["node"]["String"]["sval"].as_str())
                                .map(str::to_string)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let t = !names.is_empty() && names.iter().all(|n| temps.contains(n));
            if t {
                for n in &names {
                    temps.remove(n);
                }
            }
            t
        } else {
            false
        };
        all &= this;
    }
    all
}

/// A temporary relation `sql` refers to (besides being its only target,
/// which `temp_only` covers), if any: a table of this session's `temps`
/// or one named in `pg_temp`. It exists on the primary alone, so a write
/// that reads it cannot be replayed anywhere else.
pub fn temp_reference(sql: &str, temps: &HashSet<String>) -> Option<String> {
    // Every write passes here: no copy of the text for the common case.
    if temps.is_empty() && !replication::mentions(sql.as_bytes(), b"pg_temp") {
        return None;
    }
    let parsed = crate::route::parsed::tree(sql)?;
    let v = parsed.json()?;
    // Names a WITH clause defines are not tables; a temporary table the
    // text itself makes is made again where it is replayed.
    let mut ctes = HashSet::new();
    let mut made = HashSet::new();
    walk_json(v, &mut |node| {
        if let Some(name) = node
            .get("CommonTableExpr")
            .and_then(|c| c["ctename"].as_str())
        {
            ctes.insert(name.to_string());
        }
        if let Some(rel) = node.get("RangeVar")
            && rel["relpersistence"].as_str() == Some("t")
            && let Some(name) = rel["relname"].as_str()
        {
            made.insert(name.to_string());
        }
    });
    let mut found = None;
    walk_json(v, &mut |node| {
        let Some(rel) = node.get("RangeVar") else {
            return;
        };
        let name = rel["relname"].as_str().unwrap_or_default();
        let schema = rel["schemaname"].as_str().unwrap_or_default();
        let temp = schema == "pg_temp"
            || schema.is_empty() && temps.contains(name) && !ctes.contains(name);
        if temp && !made.contains(name) && found.is_none() {
            found = Some(name.to_string());
        }
    });
    found
}

/// Calls `f` on every JSON object in `v`, depth first.
fn walk_json(
    v: &serde_json::Value,
    f: &mut impl FnMut(&serde_json::Map<String, serde_json::Value>),
) {
    match v {
        serde_json::Value::Object(m) => {
            f(m);
            for child in m.values() {
                walk_json(child, f);
            }
        }
        serde_json::Value::Array(a) => {
            for child in a {
                walk_json(child, f);
            }
        }
        _ => {}
    }
}

/// Whether every `INSERT … SELECT` in `sql` orders its rows.
pub fn insert_selects_ordered(sql: &str) -> bool {
    let Some(parsed) = crate::route::parsed::tree(sql) else {
        return false;
    };
    let Some(stmts) = parsed.json().and_then(|j| j["stmts"].as_array()) else {
        return false;
    };
    stmts.iter().all(|raw| {
        let Some(v) = raw.get("stmt") else {
            return true;
        };
        match v["node"].get("InsertStmt") {
            Some(ins) => {
                let sel = &ins["select_stmt"]["node"]["SelectStmt"];
                let is_values = sel["values_lists"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty());
                is_values || sel["sort_clause"].as_array().is_some_and(|a| !a.is_empty())
            }
            None => true,
        }
    })
}

/// Statements that change the schema.
pub fn is_ddl(sql: &str) -> bool {
    first_word_in(sql, &["CREATE", "ALTER", "DROP", "COMMENT"])
}

/// Whether a unit holds a BEGIN asking for snapshot isolation.
fn sqls_isolated(unit: &Unit) -> bool {
    unit_sql(unit).iter().any(|sql| {
        crate::route::normalize::trim_sql(sql)
            .split(';')
            .any(snapshot_isolation)
    })
}

/// A session setting's words, lowercased, without a final semicolon and
/// with `=` apart (`SET a=DEFAULT`).
fn setting_words(sql: &str) -> Vec<String> {
    crate::route::normalize::trim_start_sql(sql)
        .trim_end()
        .trim_end_matches(';')
        .replace('=', " = ")
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Whether a session setting is a DISCARD ALL or a RESET ALL: every
/// setting back to the session's defaults, the startup parameters'.
fn resets_all(sql: &str) -> bool {
    matches!(
        setting_words(sql).as_slice(),
        [a, b] if (a == "discard" || a == "reset") && b == "all"
    )
}

/// A session setting that a replay could not take in the middle of an
/// entry as the primary took it: the role or session authorization (the
/// replay's own work after the entry runs as the session's user), and
/// resets (they go back to the startup values, which the replay's session
/// does not have).
fn replays_differently(sql: &str) -> bool {
    let words = setting_words(sql);
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    reset_name(sql).is_some()
        || matches!(
            w.as_slice(),
            ["set", "role", ..]
                | ["set", "session", "authorization", ..]
                | ["set", "session", "role", ..]
                | ["reset" | "discard", ..]
        )
}

/// The setting a `RESET name` or `SET [SESSION] name TO DEFAULT` puts back
/// to the session's default (lowercased), if it is one.
fn reset_name(sql: &str) -> Option<String> {
    let words = setting_words(sql);
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["reset", name] if *name != "all" => Some(name.to_string()),
        ["set", "session", name, "to" | "=", "default"] | ["set", name, "to" | "=", "default"] => {
            Some(name.to_string())
        }
        _ => None,
    }
}

/// The settings an entry replays, from the SETs that give the startup
/// parameters and the session's settings in order. The replay's session
/// defaults are not the client's startup parameters, so: a DISCARD ALL or
/// RESET ALL (back to the startup values, where the replay starts anyway)
/// drops what came before it, itself too (DISCARD ALL cannot run in the
/// entry's transaction); a RESET of a startup parameter is followed by
/// that parameter's SET. The application name is left out (the applier
/// would show up as the client on every subscriber).
fn replayed_settings(startup: &[String], session: &[String]) -> Vec<String> {
    let from = session
        .iter()
        .rposition(|s| resets_all(s))
        .map_or(0, |i| i + 1);
    let mut settings = startup.to_vec();
    for s in &session[from..] {
        if s.to_ascii_lowercase().contains("application_name") {
            continue;
        }
        settings.push(s.clone());
        if let Some(name) = reset_name(s) {
            let again = startup
                .iter()
                .find(|st| setting_words(st).get(1).is_some_and(|n| *n == name));
            settings.extend(again.cloned());
        }
    }
    settings
}

/// Whether a unit holds a PREPARE TRANSACTION.
fn prepares_transaction(unit: &Unit) -> bool {
    unit_sql(unit).iter().any(|sql| {
        crate::route::normalize::trim_sql(sql).split(';').any(|s| {
            let mut words = crate::route::normalize::trim_start_sql(s).split_whitespace();
            words
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("PREPARE"))
                && words
                    .next()
                    .is_some_and(|w| w.eq_ignore_ascii_case("TRANSACTION"))
        })
    })
}

/// A BEGIN/START TRANSACTION asking for REPEATABLE READ or SERIALIZABLE.
pub fn snapshot_isolation(sql: &str) -> bool {
    begins_with_snapshot(sql, false)
}

/// A BEGIN/START TRANSACTION that opens a REPEATABLE READ or SERIALIZABLE
/// transaction that may write, given whether the session's default
/// isolation is one of those (`by_default`).
fn begins_with_snapshot(sql: &str, by_default: bool) -> bool {
    if !first_word_in(sql, &["BEGIN", "START"]) {
        return false;
    }
    let upper = sql.to_ascii_uppercase();
    if upper.contains("READ ONLY") {
        return false;
    }
    match upper.contains("ISOLATION") {
        true => upper.contains("REPEATABLE") || upper.contains("SERIALIZABLE"),
        false => by_default,
    }
}

/// A default of the session's transactions that its settings can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxDefault {
    /// REPEATABLE READ or SERIALIZABLE.
    SnapshotIsolation,
    /// READ ONLY.
    ReadOnly,
}

impl TxDefault {
    fn setting(self) -> &'static str {
        match self {
            TxDefault::SnapshotIsolation => "default_transaction_isolation",
            TxDefault::ReadOnly => "default_transaction_read_only",
        }
    }

    /// Whether a value of the setting (lowercased, maybe quoted; its first
    /// word) gives this default.
    fn value_gives(self, value: &str) -> bool {
        let v = value.trim_matches(['\'', '"', '\\']);
        match self {
            TxDefault::SnapshotIsolation => {
                v.starts_with("repeatable") || v.starts_with("serializable")
            }
            TxDefault::ReadOnly => v == "on" || v == "1" || v.starts_with(['t', 'y']),
        }
    }

    /// From the transaction modes of `SET SESSION CHARACTERISTICS AS
    /// TRANSACTION` (lowercased words, commas off): Some(gives it) if they
    /// set it.
    fn in_modes(self, modes: &[&str]) -> Option<bool> {
        modes.windows(2).rev().find_map(|p| match (self, p) {
            (TxDefault::SnapshotIsolation, ["level", level]) => Some(self.value_gives(level)),
            (TxDefault::ReadOnly, ["read", "only"]) => Some(true),
            (TxDefault::ReadOnly, ["read", "write"]) => Some(false),
            _ => None,
        })
    }

    /// What a session setting does to this default: `Some(gives it)` if it
    /// sets it (`startup`, the session's default at its start, if it resets
    /// it), None if it is about something else.
    fn set_by(self, sql: &str, startup: bool) -> Option<bool> {
        if !replication::mentions(sql.as_bytes(), b"transaction") {
            return None;
        }
        let words: Vec<String> = setting_words(sql)
            .into_iter()
            .map(|w| w.trim_end_matches(',').to_string())
            .collect();
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        let name = self.setting();
        match w.as_slice() {
            [
                "set",
                "session",
                "characteristics",
                "as",
                "transaction",
                modes @ ..,
            ] => self.in_modes(modes),
            ["reset", n] if *n == name => Some(startup),
            ["set", "session", n, _, value, ..] | ["set", n, _, value, ..] if *n == name => {
                match *value {
                    "default" => Some(startup),
                    v => Some(self.value_gives(v)),
                }
            }
            _ => None,
        }
    }

    /// Whether the client's startup parameters give this default.
    fn at_startup(self, params: &[(String, String)]) -> bool {
        startup_pairs(params)
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(self.setting()))
            .is_some_and(|(_, v)| self.value_gives(&v.to_ascii_lowercase()))
    }
}

/// Whether a transaction-ending statement is a rollback.
pub fn is_rollback(sql: &str) -> bool {
    first_word_in(sql, &["ROLLBACK", "ABORT"])
}

/// The statement's first keyword as written (after comments and an opening
/// parenthesis).
fn first_word(sql: &str) -> &str {
    crate::route::normalize::trim_start_sql(sql)
        .trim_start_matches('(')
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
}

/// Whether the statement's first keyword is one of `words` (upper case).
fn first_word_in(sql: &str, words: &[&str]) -> bool {
    let first = first_word(sql);
    words.iter().any(|w| w.eq_ignore_ascii_case(first))
}

/// The SQL text of a unit's statements (simple Query or Binds); for a unit
/// that only prepares (the start of a streamed batch), the statements it
/// prepares.
pub fn unit_sql(unit: &Unit) -> Vec<&str> {
    fn sql_of(i: &Item) -> Option<&str> {
        i.stmt.as_ref().map(|(d, _)| d.sql.as_str())
    }
    let run: Vec<&str> = unit
        .items
        .iter()
        .filter_map(|i| match i.frame.tag {
            b'Q' => Reader::new(i.frame.body()).cstr(),
            b'B' => sql_of(i),
            _ => None,
        })
        .collect();
    if !run.is_empty() {
        return run;
    }
    unit.items
        .iter()
        .filter(|i| i.frame.tag == b'P')
        .filter_map(sql_of)
        .collect()
}

impl Session {
    pub(super) fn replicating(&self) -> bool {
        self.cfg.replication.enabled
    }

    /// For a statement that may write: the text to run instead (same on the
    /// primary and on replay), or the 0A000 refusal of a construct that
    /// replay cannot reproduce.
    /// Sets `unknown` when it writes to a table the catalog does not know
    /// yet (see `recheck_defaults`).
    pub(super) fn deterministic(
        &self,
        class: &Classification,
        sql: &str,
        unknown: &mut bool,
    ) -> Result<Option<String>, PgError> {
        // Reads of effect-free volatile built-ins are not logged. (A PREPARE
        // is not a write either, but its text is what EXECUTE replays.)
        let unlogged_reads = class.primary_reads > 0
            && class.prepared.is_empty()
            && !super::dispatch::may_write(class);
        if !self.replicating() || class.read_only || unlogged_reads || class.parse_error {
            return Ok(None);
        }
        if self.pinned.is_some() && temp_only(sql, &mut self.write.temps.clone()) {
            // Not logged: runs on the primary alone, as written (a captured
            // value there would not be in any entry).
            return Ok(None);
        }
        if class.copy_from_server {
            return Err(PgError::error(
                "0A000",
                "COPY FROM a file or a program on the server would read each copy's own file \
                 or program: the copies could differ",
            )
            .with_hint(
                "send the data from the client with COPY … FROM STDIN (in psql: \\copy … from 'file')",
            ));
        }
        if let Some(table) = temp_reference(sql, &self.write.temps) {
            return Err(PgError::error(
                "0A000",
                format!(
                    "this write reads the temporary table {table}, which exists only on the primary: \
                     the copies could not replay it"
                ),
            )
            .with_hint(
                "write the rows with their values (INSERT … VALUES, COPY), or use a permanent table",
            ));
        }
        let a = determinism::analyze_write(sql);
        if let Some(reason) = a.refused {
            return Err(PgError::error("0A000", reason));
        }
        if !(self.write.declared_defaults.is_empty() && a.declared_defaults.is_empty())
            && let Some(table) = rowlocal::written_tables(sql).into_iter().find(|t| {
                self.write.declared_defaults.contains(t) || a.declared_defaults.contains(t)
            })
        {
            return Err(PgError::error(
                "0A000",
                format!(
                    "this write to {table} follows, in the same transaction or query string, a \
                     column DEFAULT of {table} that each copy would compute differently: Reprise \
                     captures such a default's values only once the definition is committed"
                ),
            )
            .with_hint("commit the CREATE TABLE or ALTER TABLE first, then write to the table"));
        }
        if let Some(table) = nextval_in_unordered_insert_select(&a, sql) {
            // Without the catalog: `capture_rows` checks sequence defaults.
            return Err(storage_order_refusal(rowlocal::OrderDependence::Numbered {
                table,
                by: rowlocal::Numbering::Sequence,
                ties: false,
            }));
        }
        if !(a.declared_numbered.is_empty() && self.write.declared_numbered.is_empty()) {
            // Tables created in this transaction: the catalog does not have
            // them (capture_rows checks the others).
            let declared: Vec<String> = (a.declared_numbered.iter())
                .chain(&self.write.declared_numbered)
                .cloned()
                .collect();
            let catalog = self.group.rel_catalog().unwrap_or_default();
            if let Some(dependence) = rowlocal::storage_order_dependence(sql, &catalog, &declared) {
                return Err(storage_order_refusal(dependence));
            }
        }
        let mut rewritten = a.rewritten;
        match self.group.rel_catalog() {
            Some(catalog) => {
                let mut new_table = false;
                let text = rewritten.as_deref().unwrap_or(sql);
                if let Some(captured) =
                    capture_rows(text, a.update_captures, &catalog, &mut new_table)?
                {
                    rewritten = Some(captured);
                }
                if new_table {
                    // Made directly on the nodes: have the catalog reloaded.
                    self.group.request_rel_catalog();
                    // The write waits for it (a temporary table of this
                    // session did not get here: see temp_only above).
                    *unknown = true;
                }
            }
            // No catalog yet (start, or a schema change since): a write that
            // captures by row, may leave defaults or may fire numbering
            // triggers waits for it and is checked then (see recheck_defaults).
            None => {
                const WRITES: &[&str] = &["INSERT", "COPY", "WITH", "UPDATE", "DELETE", "MERGE"];
                *unknown = a.update_captures
                    || first_word_in(sql, WRITES)
                    || routines::routine_bodies(sql)
                        .iter()
                        .flat_map(|b| &b.statements)
                        .any(|s| first_word_in(s, WRITES));
            }
        }
        Ok(rewritten)
    }

    /// Whether the unit at the primary must be logged, and how: called
    /// before it is sent. Returns an error to answer instead of running it.
    pub(super) fn write_check(&self, unit: &Unit) -> Result<(), PgError> {
        let logged = self.write.tx.as_ref().is_some_and(|t| !t.lock_deferred);
        if self.replicating() && unit.ends_tx && logged && prepares_transaction(unit) {
            // Prepared, it would keep the commit-order lock (every other
            // commit waits) and its entry would reach the subscribers before
            // COMMIT PREPARED or ROLLBACK PREPARED decided it.
            return Err(PgError::error(
                "0A000",
                "Reprise cannot prepare a write transaction for two-phase commit: its log entry commits with it",
            )
            .with_hint("COMMIT it instead (PREPARE TRANSACTION works for transactions that only read)"));
        }
        if self.replicating() && logged && unit.tx_access == Some(true) {
            // Its entry is appended at COMMIT: no longer possible then.
            return Err(PgError::error(
                "0A000",
                "Reprise cannot make a transaction READ ONLY after it wrote: its log entry is written at COMMIT",
            )
            .with_hint("set READ ONLY before the transaction's first write"));
        }
        if !self.replicating() || !unit.writes {
            return Ok(());
        }
        for sql in unit_sql(unit) {
            if let Some(what) = not_in_transaction(sql) {
                if what == INDEX_CONCURRENTLY && unit.simple && self.tx_node.is_none() {
                    continue;
                }
                return Err(PgError::error(
                    "0A000",
                    format!("{what} is not replicated by Reprise yet"),
                )
                .with_hint("run it on each node directly"));
            }
        }
        if self.begins_isolated(unit) {
            return Err(PgError::error(
                "0A000",
                "Reprise needs BEGIN ISOLATION LEVEL REPEATABLE READ/SERIALIZABLE in a query of its own before writes",
            )
            .with_hint("send the BEGIN and the writes as separate queries (in the extended protocol: each followed by its own Sync)"));
        }
        if unit.ends_tx {
            return Err(PgError::error(
                "0A000",
                "Reprise needs COMMIT in a query of its own after writes, so that it can log the transaction first",
            )
            .with_hint("send the writes and COMMIT as separate queries (in the extended protocol: each followed by its own Sync)"));
        }
        Ok(())
    }

    /// A unit that writes and holds a COMMIT (or ROLLBACK, …) or a BEGIN:
    /// it runs only as separate units. The log append must precede the
    /// COMMIT; the write lock must follow the BEGIN (taken before it, the
    /// BEGIN would be ignored, its READ ONLY or isolation level with it).
    /// `write_check` refuses what cannot be split.
    pub(super) fn runs_split(&self, unit: &Unit) -> bool {
        // (A batch: the messages up to one Sync.)
        let control = (unit.ends_tx || (unit.begin.is_some() && self.tx_node.is_none()))
            && (unit.simple || unit.syncs == 1);
        // A refused query string still runs up to the refused statement,
        // as PostgreSQL runs a string up to an error: its parts are
        // classified (and refused) one by one. A refused batch is not
        // split: its parts would not carry the refusal.
        self.replicating()
            && control
            && unit.writes
            && (unit.refused.is_none() || unit.simple)
            && unit_sql(unit)
                .iter()
                .all(|sql| not_in_transaction(sql).is_none())
    }

    /// A message of a batch streaming to the primary binds a COMMIT (or
    /// PREPARE TRANSACTION, …) after the batch wrote: see `cut_stream`.
    pub(super) fn commits_stream(&self, unit: &Unit) -> bool {
        self.replicating()
            && unit.ends_tx
            && self.batch_capture == Some(true)
            && self.write.tx.is_some()
            && !unit_sql(unit).iter().any(|s| is_rollback(s))
    }

    /// The start of a batch streaming to the primary opens a READ ONLY,
    /// REPEATABLE READ or SERIALIZABLE block and writes: the write lock,
    /// which must come first, would make its BEGIN a no-op (a batch that is
    /// not streamed is split instead).
    pub(super) fn streamed_begin_refusal(&self, unit: &Unit) -> Option<PgError> {
        let special = unit.begin == Some(true) || self.begins_isolated(unit);
        (self.replicating() && unit.writes && special && self.batch_capture.is_none()).then(|| {
            PgError::error(
                "0A000",
                "Reprise needs a Sync after a READ ONLY, REPEATABLE READ or SERIALIZABLE BEGIN that a pipelined batch writes after, when the batch had a Flush (or was too large to hold)",
            )
            .with_hint("send a Sync after the BEGIN")
        })
    }

    /// The unit opens a REPEATABLE READ or SERIALIZABLE transaction block.
    fn begins_isolated(&self, unit: &Unit) -> bool {
        unit.begin.is_some() && self.tx_node.is_none() && sqls_isolated(unit)
    }

    /// A unit about to go to the primary: takes the write lock first if it
    /// writes and this transaction holds none. Returns whether to capture it.
    pub(super) fn before_primary_unit(&mut self, unit: &Unit, buf: &mut BytesMut) -> bool {
        if self.replicating() && !unit.writes && self.write.tx.is_some() {
            // Settings in a block that wrote: its entry began with the
            // settings of the block's start, and what follows must replay
            // under these too.
            let session =
                !unit.settings.is_empty() && !unit.settings.iter().any(|s| replays_differently(s));
            if session || !unit.local_settings.is_empty() {
                return true;
            }
        }
        if self.replicating() && !unit.writes && !unit.local_settings.is_empty() {
            // Settings for the rest of the block: no lock, no entry of
            // their own; replayed with the entry should the block write.
            if self.tx_node.is_some() || unit.begin.is_some() {
                let locals = unit.local_settings.iter().cloned();
                self.write.tx_locals.extend(locals);
            }
            return false;
        }
        if !self.replicating() || !unit.writes || (self.tx_read_only && self.write.tx.is_none()) {
            return false;
        }
        if self.tx_node.is_none() && unit.begin.is_none() && self.tx_default(TxDefault::ReadOnly) {
            // Autocommit under a READ ONLY default: the node refuses what
            // would change replicated data, and a log entry could not be
            // written.
            return false;
        }
        let sqls = unit_sql(unit);
        let maintenance = sqls.iter().all(|s| is_maintenance(s))
            || (self.pinned.is_some() && {
                let temps = &mut self.write.temps;
                sqls.iter().all(|s| temp_only(s, temps))
            });
        let ddl = sqls.iter().any(|s| is_ddl(s));
        if ddl {
            self.group.invalidate_rel_catalog();
            for s in &sqls {
                let a = determinism::analyze_write(s);
                self.write.declared_defaults.extend(a.declared_defaults);
                self.write.declared_numbered.extend(a.declared_numbered);
            }
        }
        // Savepoint statements change no data: they need no lock of their
        // own, and leave a shared lock shared. (Not at the start of a
        // streaming batch: nothing can be injected before what follows.)
        let savepoints_only = !unit.changes_data && unit.syncs > 0;
        let row_local = !ddl && (savepoints_only || self.row_local(&sqls, !unit.simple));
        if let Some(tx) = self.write.tx.as_mut() {
            let capture = !maintenance;
            if capture {
                tx.ddl |= ddl;
                if tx.lock_deferred && !savepoints_only {
                    // The first write after savepoints.
                    tx.lock_deferred = false;
                    tx.exclusive = !row_local;
                    self.push_lock(buf, false, !row_local);
                } else if !tx.lock_deferred && !tx.exclusive && !row_local {
                    tx.exclusive = true;
                    let p = self.group.primary();
                    self.push_own(p, buf, OwnStatement::Upgrade, &[], Own::Lock);
                }
            }
            return capture;
        }
        if maintenance {
            return false;
        }
        if sqls.len() == 1 && not_in_transaction(sqls[0]) == Some(INDEX_CONCURRENTLY) {
            // Runs on its own; logged after it succeeded.
            self.write.nontx = Some(unit.items[0].frame.clone());
            return false;
        }
        if savepoints_only {
            // Outside a transaction block the node refuses them.
            if self.tx_node.is_none() {
                return false;
            }
            let settings = self.entry_settings();
            self.write.tx = Some(WriteTx {
                lock_deferred: true,
                settings,
                ..WriteTx::default()
            });
            return true;
        }
        let implicit = self.tx_node.is_none() && unit.begin.is_none();
        self.push_lock(buf, self.tx_node.is_none(), !row_local);
        let settings = self.entry_settings();
        self.write.tx = Some(WriteTx {
            implicit,
            simple: implicit && unit.simple,
            exclusive: !row_local,
            ddl,
            settings,
            // Room for a few statements without growing on each one.
            capture: BytesMut::with_capacity(4096),
            ..WriteTx::default()
        });
        true
    }

    /// The settings an entry replays: the startup ones that change how
    /// values read, the session's SETs (see `replayed_settings`) and the
    /// block's SET LOCALs from before it wrote.
    fn entry_settings(&self) -> Vec<String> {
        let mut settings = replayed_settings(&self.write.startup_settings, &self.settings);
        settings.extend(self.write.tx_locals.iter().cloned());
        settings
    }

    /// Whether every statement is row-local (needs the lock only shared).
    /// `prepared`: the texts come from the extended protocol and are kept
    /// in the session's memo.
    fn row_local(&mut self, sqls: &[&str], prepared: bool) -> bool {
        let Some(catalog) = self.group.rel_catalog() else {
            return false;
        };
        let epoch = self.group.rel_epoch();
        let memo = &mut self.write.row_local_memo;
        !sqls.is_empty()
            && sqls.iter().all(|s| {
                if prepared
                    && let Some(&(e, v)) = memo.get(*s)
                    && e == epoch
                {
                    return v;
                }
                let v = self
                    .group
                    .row_local_cached(s, || rowlocal::is_row_local(s, &catalog));
                if prepared {
                    if memo.len() >= ROW_LOCAL_MEMO {
                        memo.clear();
                    }
                    memo.insert(s.to_string(), (epoch, v));
                }
                v
            })
    }

    /// The unit begins a REPEATABLE READ or SERIALIZABLE transaction that
    /// may write: it takes the write lock exclusively as its first
    /// statement (see `before_begin`, `after_snapshot_begin`), so that commit
    /// order stays a serial order for what it reads.
    pub(super) fn begins_snapshot_writer(&self, unit: &Unit) -> bool {
        if !self.replicating() || self.write.tx.is_some() || unit.begin != Some(false) {
            return false;
        }
        if let Some(snapshot) = unit.tx_isolation {
            // `SET TRANSACTION ISOLATION LEVEL` after the BEGIN.
            return snapshot;
        }
        let by_default = self.tx_default(TxDefault::SnapshotIsolation);
        unit_sql(unit)
            .iter()
            .any(|s| begins_with_snapshot(s, by_default))
    }

    /// Whether the session's transactions are REPEATABLE READ or
    /// SERIALIZABLE, or READ ONLY, unless they say otherwise, as far as the
    /// startup parameters and the session's settings tell (not a role's or
    /// a database's defaults).
    fn tx_default(&self, what: TxDefault) -> bool {
        let startup = match what {
            TxDefault::SnapshotIsolation => self.write.startup_snapshot,
            TxDefault::ReadOnly => self.write.startup_read_only,
        };
        let from = self
            .settings
            .iter()
            .rposition(|s| resets_all(s))
            .map_or(0, |i| i + 1);
        self.settings[from..]
            .iter()
            .fold(startup, |now, s| what.set_by(s, startup).unwrap_or(now))
    }

    /// Whether the transaction block a unit begins is READ ONLY.
    pub(super) fn begins_read_only(&self, unit: &Unit) -> bool {
        unit.begin == Some(true)
            || (!unit_sql(unit)
                .iter()
                .any(|s| s.to_ascii_uppercase().contains("READ WRITE"))
                && self.tx_default(TxDefault::ReadOnly))
    }

    /// Before the client's unit that begins a snapshot-isolation
    /// transaction (`begins_snapshot_writer`) goes to the primary `p`:
    /// outside a transaction, the session takes the write lock first. Such
    /// a transaction's snapshot is taken when its first query starts,
    /// before that query waits for a lock: waiting in the transaction, it
    /// would miss what committed meanwhile, and its log append would then
    /// fail with 40001. Returns whether it did.
    pub(super) fn before_begin(&mut self, buf: &mut BytesMut, p: usize) -> bool {
        if self.tx_node.is_some() {
            return false;
        }
        self.push_own(p, buf, OwnStatement::SessionLock, &[], Own::SessionLock);
        self.expect_own(p);
        true
    }

    /// Before unit `unit` of a block that began with snapshot isolation
    /// (`begins_snapshot_writer`) goes to the primary `p`: the block's
    /// write lock moves into the transaction before its first statement
    /// that takes a snapshot (`after_snapshot_begin`). Statements that only
    /// set the transaction (`SET TRANSACTION ISOLATION LEVEL …`, which
    /// must come before any query) go first; one that makes the block READ
    /// ONLY ends the need: the lock the session took is released instead.
    pub(super) fn move_session_lock(&mut self, unit: &Unit, buf: &mut BytesMut, p: usize) {
        let Some(pending) = self.write.pending_move.as_mut() else {
            return;
        };
        if unit.only_tx_settings {
            if let Some(read_only) = unit.tx_access {
                pending.read_only = read_only;
            }
            return;
        }
        if unit_sql(unit).is_empty() {
            // A Close, a Describe: no query.
            return;
        }
        let LockMove {
            session_locked,
            read_only,
        } = *pending;
        // READ ONLY later in the unit: the transaction will not write.
        let read_only = unit.tx_access.unwrap_or(read_only);
        self.write.pending_move = None;
        if self.write.block_aborted {
            // Nothing runs in it: the lock goes once the block ends.
            return;
        }
        if !read_only {
            self.after_snapshot_begin(buf, p, session_locked);
        } else if session_locked {
            self.push_session_unlock(buf, p);
            self.write.session_lock = false;
        }
    }

    /// Adds the release of the write lock the session took (`before_begin`)
    /// to `buf`, for the primary `p`.
    fn push_session_unlock(&mut self, buf: &mut BytesMut, p: usize) {
        let unlock = replication::session_unlock_query(&self.group.name);
        buf.extend_from_slice(&messages::query(&unlock));
        self.write.own.push_back(Own::Unlock);
        self.expect_own(p);
    }

    /// Takes the write lock exclusively as the first statement of a
    /// REPEATABLE READ or SERIALIZABLE transaction that may write
    /// (`begins_snapshot_writer`), from the session when `before_begin`
    /// took it (see there).
    fn after_snapshot_begin(&mut self, buf: &mut BytesMut, p: usize, session_locked: bool) {
        if session_locked {
            self.push_own(p, buf, OwnStatement::LockFromSession, &[], Own::Lock);
        } else {
            self.push_lock(buf, false, true);
        }
        self.expect_own(p);
        let settings = self.entry_settings();
        self.write.tx = Some(WriteTx {
            exclusive: true,
            settings,
            ..WriteTx::default()
        });
    }

    /// Adds the write-lock query (after a BEGIN if asked) to `buf`, for the
    /// primary.
    fn push_lock(&mut self, buf: &mut BytesMut, begin: bool, exclusive: bool) {
        let p = self.group.primary();
        if begin {
            self.bind_own(p, buf, OwnStatement::Begin, &[]);
        }
        let lock = if exclusive {
            OwnStatement::LockExclusive
        } else {
            OwnStatement::LockShared
        };
        self.push_own(p, buf, lock, &[], Own::Lock);
    }

    /// Adds one of the proxy's own statements to `buf` for connection `p`
    /// as a unit of its own (its Sync after it), answered as `kind`. The
    /// caller accounts for its answers on the connection.
    fn push_own(
        &mut self,
        p: usize,
        buf: &mut BytesMut,
        stmt: OwnStatement,
        params: &[(i16, Option<bytes::Bytes>)],
        kind: Own,
    ) {
        self.bind_own(p, buf, stmt, params);
        messages::put_message(b'S', b"", buf);
        self.write.own.push_back(kind);
    }

    /// Adds a Bind and Execute of one of the proxy's own statements to
    /// `buf` for connection `p`, first its Parse if `p` does not have it
    /// (after a Close, in case a DISCARD the proxy could not follow left
    /// it there after all). The caller ends the unit with a Sync.
    fn bind_own(
        &mut self,
        p: usize,
        buf: &mut BytesMut,
        stmt: OwnStatement,
        params: &[(i16, Option<bytes::Bytes>)],
    ) {
        let Some(conn) = self.backends[p].as_mut() else {
            return;
        };
        let name = stmt.name();
        if !conn.prepared.contains_key(name) {
            buf.extend_from_slice(&super::statements::close_statement(name).raw);
            conn.tracker.push(Expect::Close { injected: true });
            let mut parse = BytesMut::new();
            messages::put_cstr(&mut parse, name);
            messages::put_cstr(&mut parse, &stmt.sql(&self.group.name));
            parse.extend_from_slice(&0i16.to_be_bytes());
            messages::put_message(b'P', &parse, buf);
            conn.tracker.push(Expect::Parse {
                injected: true,
                name: name.to_string(),
            });
            conn.prepared.insert(name.to_string(), OWN_GENERATION);
        }
        let bind = crate::replication::applier::bind_body_for(name, params);
        messages::put_message(b'B', &bind, buf);
        messages::put_message(b'E', b"\0\0\0\0\0", buf);
    }

    /// Remembers where the capture stands before a client unit.
    pub(super) fn mark_capture(&mut self) {
        if let Some(tx) = self.write.tx.as_mut() {
            tx.unit_mark = CaptureMark {
                bytes: tx.capture.len(),
                tags: tx.tags.len(),
                parsed: tx.parsed.clone(),
                prepares: tx.prepares.len(),
                defined: tx.defined.clone(),
            };
        }
    }

    /// Copies a sent unit into the capture.
    pub(super) fn capture_unit(&mut self, items: &[Item], prepared: &[SqlPrepared]) {
        // An entry replays on a connection of its own: the SQL-level
        // prepared statements it uses but did not prepare come with it.
        for p in prepared {
            let Some(tx) = self.write.tx.as_ref() else {
                return;
            };
            let text = match p {
                SqlPrepared::Execute(name) | SqlPrepared::Deallocate(Some(name))
                    if !tx.defined.contains(name) =>
                {
                    self.sql_prepared_text(name)
                }
                _ => None,
            };
            let tx = self.write.tx.as_mut().expect("checked above");
            match p {
                SqlPrepared::Prepare { name, .. } => {
                    tx.defined.insert(name.clone());
                }
                SqlPrepared::Execute(name) | SqlPrepared::Deallocate(Some(name)) => {
                    if let Some(text) = text {
                        tx.prepares.push(text);
                        tx.defined.insert(name.clone());
                    }
                    if matches!(p, SqlPrepared::Deallocate(_)) {
                        tx.defined.remove(name);
                    }
                }
                SqlPrepared::Deallocate(None) | SqlPrepared::DiscardAll => tx.defined.clear(),
            }
        }
        let Some(tx) = self.write.tx.as_mut() else {
            return;
        };
        for item in items {
            let mut raw = &item.frame.raw;
            if let Some((def, _)) = &item.stmt {
                if item.frame.tag == b'P' {
                    tx.parsed.insert(def.generation);
                    // As sent to the primary: rewritten for determinism.
                    raw = &def.parse.raw;
                } else if tx.parsed.insert(def.generation) {
                    tx.capture.extend_from_slice(&def.parse.raw);
                }
            }
            if item.frame.tag != b'H' {
                tx.capture.extend_from_slice(raw);
            }
        }
    }

    /// The capture ends with the Sync of a unit that turned out to be COPY
    /// FROM STDIN: on replay it must come after the copy data (a node in
    /// copy-in mode ignores it), where the client's next Sync puts it.
    pub(super) fn copy_sync_moved(&mut self) {
        const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];
        if let Some(tx) = self.write.tx.as_mut()
            && tx.capture.ends_with(&SYNC)
        {
            let n = tx.capture.len() - SYNC.len();
            tx.capture.truncate(n);
        }
    }

    /// COPY data of a captured COPY FROM STDIN.
    pub(super) fn capture_copy(&mut self, f: &Frame) {
        if let Some(tx) = self.write.tx.as_mut()
            && self.current == Some(self.group.primary())
        {
            tx.capture.extend_from_slice(&f.raw);
        }
    }

    /// A COMMIT unit in a write transaction: append the entry first.
    pub(super) fn before_commit(&mut self, unit: &Unit, buf: &mut BytesMut, p: usize) {
        let logged = |t: &WriteTx| !t.aborted && !t.lock_deferred;
        if !self.write.tx.as_ref().is_some_and(logged) || !unit.ends_tx || unit.writes {
            return;
        }
        if unit_sql(unit).iter().any(|s| is_rollback(s)) {
            return;
        }
        self.inject_append(buf, p);
    }

    /// Adds the log append (Parse/Bind/Execute/Sync) to `buf`; when the
    /// write lock is only shared, the append takes the commit-order lock.
    fn inject_append(&mut self, buf: &mut BytesMut, p: usize) {
        let Some(tx) = self.write.tx.as_mut() else {
            return;
        };
        let entry = Entry {
            header: EntryHeader {
                now: tx.now.clone(),
                settings: tx.settings.clone(),
                tags: tx.tags.clone(),
                kind: tx.kind.clone(),
                prepares: tx.prepares.clone(),
            },
            messages: tx.capture.split().freeze(),
        };
        tx.committing = true;
        let payload = entry.encode();
        let term = self.group.term();
        tx.term = term;
        tx.payload = payload.clone();
        let params = [
            (0i16, Some(bytes::Bytes::from(term.to_string()))),
            (1, Some(payload)),
            (
                0,
                (!tx.seqs_before.is_empty()).then(|| bytes::Bytes::from(tx.seqs_before.clone())),
            ),
            (
                0,
                (!tx.exclusive).then(|| {
                    bytes::Bytes::from(replication::order_key(&self.group.name).to_string())
                }),
            ),
        ];
        self.push_own(p, buf, OwnStatement::Append, &params, Own::Append);
        self.expect_own(p);
    }

    /// The primary connection is gone: forget the write transaction.
    /// Returns (its outcome is unknown, a client ReadyForQuery was held).
    pub(super) fn write_lost(&mut self) -> (bool, bool) {
        self.write.own.clear();
        self.write.last_own = None;
        self.write.session_lock = false;
        self.write.pending_move = None;
        match self.write.tx.take() {
            Some(tx) => (tx.committing, tx.held_rfq.is_some()),
            None => (false, false),
        }
    }

    /// A message from the primary that belongs to one of our own units.
    pub(super) fn on_own_message(&mut self, f: &Frame) {
        let Some(kind) = self.write.own.front().copied() else {
            return;
        };
        match f.tag {
            b'D' if kind == Own::SessionLock => self.write.session_lock = true,
            b'E' if matches!(kind, Own::SessionLock | Own::Unlock) => {
                // Not taken (timeout, cancel): the transaction's own lock
                // query waits for it instead, as it would have anyway.
                self.span.in_scope(|| {
                    tracing::debug!(
                        error = messages::error_message(f.body()),
                        ?kind,
                        "session write lock"
                    )
                });
            }
            b'D' => {
                let cols = data_row(f.body());
                if let Some(tx) = self.write.tx.as_mut() {
                    match kind {
                        Own::Lock if cols.len() >= 3 => {
                            if let Some(now) = cols[1].clone() {
                                tx.now = now;
                            }
                            if let Some(seqs) = cols[2].clone() {
                                tx.seqs_before = seqs;
                            }
                            if cols.get(3).is_some_and(|c| c.as_deref() == Some("t")) {
                                self.write.session_lock = false;
                            }
                        }
                        Own::Append => {
                            tx.seq = cols.first().cloned().flatten().and_then(|v| v.parse().ok());
                            tx.row = appended_row(&cols, tx.term, &tx.payload);
                        }
                        _ => {}
                    }
                }
            }
            b'E' if kind == Own::Commit => {
                // The client's statement failed at its commit; the entry
                // appended before rolled back with it.
                if let Some(tx) = self.write.tx.as_mut() {
                    tx.commit_error = Some(f.clone());
                }
            }
            b'E' => {
                // Failures a client retries keep their SQLSTATE.
                const RETRYABLE: &[&str] = &["40P01", "40001", "55P03", "57014"];
                let code = messages::error_code(f.body()).unwrap_or_default();
                let retryable = RETRYABLE.iter().find(|c| **c == code).copied();
                let what = match kind {
                    Own::Lock => "take the group's write lock",
                    _ => "log the transaction",
                };
                let message = format!(
                    "Reprise could not {what}: {}",
                    messages::error_message(f.body())
                );
                // (By the constraint's name field: messages may be translated.)
                let stale_snapshot = kind == Own::Append
                    && code == "23505"
                    && messages::error_fields(f.body())
                        .iter()
                        .any(|(field, v)| *field == b'n' && v == "log_pkey");
                let e = match retryable {
                    _ if stale_snapshot => stale_snapshot_error(),
                    Some(code) => PgError::error(code, message).with_hint("retry the transaction"),
                    None => PgError::error("XX000", message),
                };
                self.span
                    .in_scope(|| tracing::error!(error = %e, ?kind, "write path failed"));
                if let Some(tx) = self.write.tx.as_mut()
                    && tx.failed.is_none()
                {
                    if kind == Own::Lock && retryable.is_some() {
                        tx.lock_error = Some(e.clone());
                    }
                    tx.failed = Some(e);
                }
            }
            b'Z' => {
                self.write.last_own = self.write.own.pop_front();
            }
            _ => {}
        }
    }

    /// The ReadyForQuery of a client unit from the primary. Returns the frame
    /// to forward now, if any (None: held until the commit is settled).
    pub(super) async fn on_primary_rfq(
        &mut self,
        f: Frame,
        p: usize,
    ) -> Result<Option<Frame>, End> {
        let status = f.body().first().copied().unwrap_or(b'I');
        let failed_unit = std::mem::take(&mut self.write.unit_failed);
        self.write.block_aborted = status == b'E';
        if status == b'I' {
            self.write.pending_move = None;
        }
        if status == b'I' && std::mem::take(&mut self.write.session_lock) {
            // The transaction failed before its lock query moved the lock.
            let mut buf = BytesMut::new();
            self.push_session_unlock(&mut buf, p);
            self.send_raw(p, &buf).await?;
        }
        if let Some(q) = self.write.nontx.take()
            && !failed_unit
        {
            // It ran: log it in a small transaction of its own.
            let settings = self.entry_settings();
            self.write.tx = Some(WriteTx {
                implicit: true,
                capture: BytesMut::from(&q.raw[..]),
                settings,
                kind: replication::NONTX.to_string(),
                held_rfq: Some(f),
                ..WriteTx::default()
            });
            let mut buf = BytesMut::new();
            self.push_lock(&mut buf, true, true);
            if let Some(tx) = self.write.tx.as_mut() {
                tx.exclusive = true;
            }
            self.expect_own(p);
            self.inject_commit(&mut buf, p);
            self.send_raw(p, &buf).await?;
            return Ok(None);
        }
        let Some(tx) = self.write.tx.as_mut() else {
            return Ok(Some(f));
        };
        if !tx.implicit {
            tx.aborted = status == b'E';
        }
        if failed_unit && !tx.implicit {
            // Its statements did not happen (what ran before the error is
            // undone by the ROLLBACK TO SAVEPOINT that must follow).
            let mark = std::mem::take(&mut tx.unit_mark);
            tx.capture.truncate(mark.bytes);
            tx.tags.truncate(mark.tags);
            tx.parsed = mark.parsed;
            tx.prepares.truncate(mark.prepares);
            tx.defined = mark.defined;
        }
        if tx.implicit {
            // Our own transaction around an autocommit write: settle it.
            let mut buf = BytesMut::new();
            let failed = status == b'E' || tx.failed.is_some();
            tx.held_rfq = Some(f);
            if failed {
                buf.extend_from_slice(&messages::query("ROLLBACK"));
                self.write.own.push_back(Own::Rollback);
                self.expect_own(p);
            } else {
                self.inject_commit(&mut buf, p);
            }
            self.send_raw(p, &buf).await?;
            return Ok(None);
        }
        if status == b'I' {
            // An explicit transaction ended (COMMIT or ROLLBACK; a COMMIT
            // that failed rolled the appended entry back too).
            let tx = self.write.tx.take().expect("checked");
            if let Some(seq) = tx.seq
                && !failed_unit
            {
                return Ok(self.committed(seq, tx.term, f, tx.ddl, tx.row));
            }
        }
        Ok(Some(f))
    }

    /// One more own unit's answers are due from the primary `p`.
    fn expect_own(&mut self, p: usize) {
        if let Some(conn) = self.backends[p].as_mut() {
            conn.tracker.push(Expect::Own);
        }
    }

    /// The log append and our COMMIT of an implicit transaction.
    fn inject_commit(&mut self, buf: &mut BytesMut, p: usize) {
        self.inject_append(buf, p);
        buf.extend_from_slice(&messages::query("COMMIT"));
        self.write.own.push_back(Own::Commit);
        self.expect_own(p);
    }

    /// Our own COMMIT/ROLLBACK of an implicit transaction finished.
    pub(super) fn on_own_done(&mut self, kind: Own, ok: bool) -> Option<Frame> {
        if !matches!(kind, Own::Commit | Own::Rollback) {
            return None;
        }
        let tx = self.write.tx.take()?;
        let held = tx.held_rfq?;
        let idle = Frame::new(b'Z', b"I");
        if let Some(e) = tx.commit_error {
            self.put_relayed_error(self.group.primary(), &e);
            return Some(idle);
        }
        match (kind, ok, tx.seq, tx.failed) {
            (Own::Commit, true, Some(seq), None) => {
                if let Some(c) = tx.held_complete {
                    self.out.extend_from_slice(&c.raw);
                }
                self.committed(seq, tx.term, idle, tx.ddl, tx.row)
            }
            (_, _, _, Some(e)) => {
                self.put_error(&e);
                Some(idle)
            }
            (Own::Commit, _, _, None) => {
                self.put_error(&PgError::error(
                    "40000",
                    "the transaction could not be committed; it was rolled back",
                ));
                Some(idle)
            }
            _ => {
                let _ = held;
                Some(idle)
            }
        }
    }

    /// A transaction committed at `seq`: remember it, maybe wait for subscribers.
    fn committed(
        &mut self,
        seq: u64,
        term: u64,
        rfq: Frame,
        ddl: bool,
        row: Option<replication::LogRow>,
    ) -> Option<Frame> {
        if ddl {
            // A schema change committed: reload the table catalog after it.
            self.group.invalidate_rel_catalog();
        }
        if let Some(row) = row {
            self.group.publish(term, row);
        }
        self.write.last_seq = self.write.last_seq.max(seq);
        self.group.observe_head(term, seq);
        let r = &self.cfg.replication;
        if !self
            .group
            .ack_ready(seq, r.sync_replicas, r.max_lag_entries)
        {
            self.write.sync_wait = Some((seq, term, rfq));
            return None;
        }
        if r.sync_replicas > 0 {
            self.group.note_acked(seq);
        }
        Some(rfq)
    }

    /// Waits until `sync_replicas` subscribers applied the pending commit
    /// (or flow control allows it); returns the held ReadyForQuery. If the
    /// primary fails meanwhile, the commit is acknowledged only if the new
    /// primary has it.
    pub(super) async fn wait_sync(&mut self) -> Option<Frame> {
        let (seq, term, _) = self.write.sync_wait.as_ref()?;
        let (seq, term) = (*seq, *term);
        // This turn's config, held across the waits below.
        let cfg = std::sync::Arc::clone(&self.cfg);
        let (r, failover_wait_ms) = (&cfg.replication, cfg.health.failover_wait_ms);
        let need = r.sync_replicas;
        let limit = std::time::Duration::from_millis(r.sync_timeout_ms);
        let failover_wait = std::time::Duration::from_millis(failover_wait_ms);
        let group = self.group.clone();
        let old_primary = group.node(group.primary()).name.clone();
        let started = std::time::Instant::now();
        let outcome = loop {
            let notified = group.applied_notify.notified();
            if group.term() != term {
                break if seq <= group.promoted_at() {
                    SyncOutcome::Ready
                } else {
                    SyncOutcome::Lost
                };
            }
            if group.ack_ready(seq, need, r.max_lag_entries) {
                break SyncOutcome::Ready;
            }
            let primary_down = !group.node(group.primary()).is_up();
            let deadline = started
                + limit
                + if primary_down {
                    failover_wait
                } else {
                    Default::default()
                };
            let now = std::time::Instant::now();
            if now >= deadline {
                break if primary_down {
                    SyncOutcome::Unknown
                } else {
                    SyncOutcome::TimedOut
                };
            }
            // Node state changes do not wake this: look again soon.
            let nap = (deadline - now).min(std::time::Duration::from_millis(100));
            let _ = tokio::time::timeout(nap, notified).await;
        };
        let (_, _, rfq) = self.write.sync_wait.take().expect("waiting");
        match outcome {
            SyncOutcome::Ready => {}
            SyncOutcome::TimedOut => {
                if group.subscribers_at(seq) < need {
                    messages::notice(
                        &format!(
                            "the transaction committed on the primary (seq {seq}) but fewer than {need} subscribers applied it within {} ms",
                            limit.as_millis()
                        ),
                        &mut self.out,
                    );
                }
            }
            SyncOutcome::Lost => {
                self.put_error(&PgError::error(
                    "08007",
                    format!(
                        "the transaction committed on the primary {old_primary} (seq {seq}), which failed before any subscriber applied it: it is not part of the group's history"
                    ),
                )
                .with_hint("the group failed over to another primary; run the transaction again")
                );
                return Some(rfq);
            }
            SyncOutcome::Unknown => {
                self.put_error(&PgError::error(
                    "08007",
                    format!(
                        "the transaction committed on the primary {old_primary} (seq {seq}), which stopped answering before a subscriber applied it: whether it survives is unknown"
                    ),
                )
                .with_hint("check whether its changes are present before retrying")
                );
                return Some(rfq);
            }
        }
        if need > 0 {
            group.note_acked(seq);
        }
        Some(rfq)
    }
}

/// How a wait for subscribers ended.
enum SyncOutcome {
    Ready,
    /// Acknowledged with a notice: the primary is fine, subscribers slow.
    TimedOut,
    /// A failover dropped the commit.
    Lost,
    /// The primary is down and no failover settled it in time.
    Unknown,
}

/// Columns of a DataRow as text.
pub(super) fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut r = Reader::new(body);
    let n = r.i16().unwrap_or(0).max(0) as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match r.i32() {
            Some(len) if len >= 0 => out.push(
                r.bytes(len as usize)
                    .map(|b| String::from_utf8_lossy(b).to_string()),
            ),
            _ => out.push(None),
        }
    }
    out
}

/// The log row `reprise.append_row` answered with (its columns: seq,
/// prev_hash, hash, sequences, captured, committed_us). None if a column
/// is not plain ASCII: the text came in the session's client_encoding,
/// which may not be the UTF-8 the appliers read the log in, so they read
/// that row from the primary instead.
fn appended_row(
    cols: &[Option<String>],
    term: u64,
    payload: &bytes::Bytes,
) -> Option<replication::LogRow> {
    if cols.iter().flatten().any(|c| !c.is_ascii()) {
        return None;
    }
    let col = |i: usize| cols.get(i).cloned().flatten();
    Some(replication::LogRow {
        seq: col(0)?.parse().ok()?,
        term: i64::try_from(term).ok()?,
        payload: payload.clone(),
        prev_hash: col(1)?,
        hash: col(2)?,
        sequences: col(3),
        captured: col(4),
        committed_us: col(5)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_kinds() {
        assert!(is_maintenance("vacuum analyze pgbench_accounts"));
        assert!(is_maintenance("  ANALYZE t"));
        assert!(!is_maintenance("insert into vacuum values (1)"));
        assert_eq!(
            not_in_transaction("create index concurrently i on t (a)"),
            Some("CREATE/DROP INDEX CONCURRENTLY")
        );
        assert_eq!(not_in_transaction("create index i on t (a)"), None);
        assert!(is_rollback("rollback"));
        assert!(is_rollback(" ABORT;"));
        assert!(!is_rollback("commit"));
        assert!(is_ddl("/* c */ Alter table t add b int"));
        assert!(is_ddl("(create table x (a int))"));
        assert!(!is_ddl("update creates set a = 1"));
        assert_eq!(
            not_in_transaction("-- c\n Drop Index Concurrently i"),
            Some("CREATE/DROP INDEX CONCURRENTLY")
        );
        assert_eq!(
            not_in_transaction("update t set x = 'index concurrently'"),
            None
        );
        assert_eq!(
            not_in_transaction("alter system set work_mem = '1MB'"),
            Some("ALTER SYSTEM")
        );
    }

    #[test]
    fn resets_go_back_to_the_startup_values() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let startup = v(&["SET TimeZone = 'Asia/Tokyo'", "SET DateStyle = 'German'"]);
        let got = replayed_settings(
            &startup,
            &v(&[
                "SET search_path = s2",
                "SET timezone = 'UTC'",
                "reset all",
                "SET TimeZone TO 'UTC'",
                "RESET timezone;",
                "SET application_name = 'x'",
                "set session DateStyle=default",
                "RESET search_path",
            ]),
        );
        assert_eq!(
            got,
            v(&[
                "SET TimeZone = 'Asia/Tokyo'",
                "SET DateStyle = 'German'",
                "SET TimeZone TO 'UTC'",
                "RESET timezone;",
                "SET TimeZone = 'Asia/Tokyo'",
                "set session DateStyle=default",
                "SET DateStyle = 'German'",
                "RESET search_path",
            ])
        );
        let got = replayed_settings(&startup, &v(&["SET a.b = 1", "DISCARD ALL"]));
        assert_eq!(got, startup);
        assert!(!resets_all("DISCARD PLANS") && !resets_all("RESET ROLE"));
        assert_eq!(reset_name("SET a.b TO 'default'"), None);
    }

    #[test]
    fn startup_parameters_become_settings() {
        let p = |k: &str, v: &str| (k.to_string(), v.to_string());
        let s = startup_settings(&[
            p("user", "app"),
            p("TimeZone", "Asia/Tokyo"),
            p(
                "options",
                "-c DateStyle=German --search_path=a,b -cwork_mem=1MB",
            ),
        ]);
        assert_eq!(
            s,
            vec![
                "SET TimeZone = 'Asia/Tokyo'",
                "SET DateStyle = 'German'",
                "SET search_path = 'a,b'",
            ]
        );
    }

    #[test]
    fn temporary_table_writes_are_recognised() {
        let mut temps = HashSet::new();
        assert!(temp_only("create temp table tt (a int)", &mut temps));
        assert!(temps.contains("tt"));
        assert!(temp_only(
            "insert into tt values (1); update tt set a = 2",
            &mut temps
        ));
        assert!(!temp_only(
            "insert into tt values (1); insert into real values (1)",
            &mut temps
        ));
        assert!(!temp_only("insert into real values (1)", &mut temps));
        assert!(temp_only(
            "insert into pg_temp.other values (1)",
            &mut temps
        ));
        assert!(temp_only("drop table tt", &mut temps));
        assert!(!temps.contains("tt"));
        assert!(!temp_only("create table t (a int)", &mut temps));
        assert!(!temp_only("selec", &mut temps));
    }

    #[test]
    fn writes_that_read_temporary_tables_are_found() {
        let temps: HashSet<String> = ["tmp".to_string()].into();
        let found = |sql| temp_reference(sql, &temps);
        assert_eq!(
            found("insert into real select * from tmp").as_deref(),
            Some("tmp")
        );
        assert_eq!(
            found("update real set v = t.v from tmp t where t.id = real.id").as_deref(),
            Some("tmp")
        );
        assert_eq!(
            found("delete from real where id in (select id from tmp)").as_deref(),
            Some("tmp")
        );
        assert_eq!(
            found("create table r2 as select * from tmp").as_deref(),
            Some("tmp")
        );
        assert_eq!(
            found("insert into real select * from pg_temp.other").as_deref(),
            Some("other")
        );
        assert_eq!(found("insert into real values (1)"), None);
        assert_eq!(found("insert into real select * from app.tmp"), None);
        assert_eq!(
            found("with tmp as (select 1 as id) insert into real select id from tmp"),
            None
        );
        assert_eq!(
            temp_reference("insert into real select * from tmp", &HashSet::new()),
            None
        );
        // Made by the same text: replayed with it.
        assert_eq!(
            found(
                "insert into real values (1); create temp table x (a int); insert into pg_temp.x values (1)"
            ),
            None
        );
    }

    #[test]
    fn transaction_defaults_from_settings() {
        let iso = |sql| TxDefault::SnapshotIsolation.set_by(sql, false);
        let ro = |sql| TxDefault::ReadOnly.set_by(sql, false);
        for (sql, snapshot, read_only) in [
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
                Some(true),
                None,
            ),
            (
                "set session characteristics as transaction read write, isolation level serializable",
                Some(true),
                Some(false),
            ),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED, READ ONLY",
                Some(false),
                Some(true),
            ),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                None,
                Some(true),
            ),
            (
                "SET default_transaction_isolation = 'repeatable read'",
                Some(true),
                None,
            ),
            (
                "set session default_transaction_isolation to serializable",
                Some(true),
                None,
            ),
            (
                "SET default_transaction_isolation='read committed'",
                Some(false),
                None,
            ),
            (
                "SET default_transaction_isolation TO DEFAULT",
                Some(false),
                None,
            ),
            ("SET default_transaction_read_only = on", None, Some(true)),
            (
                "set default_transaction_read_only to 'true'",
                None,
                Some(true),
            ),
            ("SET default_transaction_read_only = off", None, Some(false)),
            ("SET search_path = transaction_isolation", None, None),
            ("SET TRANSACTION READ ONLY", None, None),
        ] {
            assert_eq!(iso(sql), snapshot, "{sql}");
            assert_eq!(ro(sql), read_only, "{sql}");
        }
        assert_eq!(
            TxDefault::SnapshotIsolation.set_by("RESET default_transaction_isolation", true),
            Some(true)
        );
        let options = |o: &str| [("options".to_string(), o.to_string())];
        assert_eq!(
            startup_tx_defaults(&options("-c default_transaction_isolation=serializable")),
            (true, false)
        );
        assert_eq!(
            startup_tx_defaults(&options("--default_transaction_read_only=on")),
            (false, true)
        );
        assert_eq!(
            startup_tx_defaults(&[(
                "default_transaction_isolation".to_string(),
                "read committed".to_string()
            )]),
            (false, false)
        );
        assert!(begins_with_snapshot("BEGIN", true));
        assert!(begins_with_snapshot("START TRANSACTION READ WRITE", true));
        assert!(!begins_with_snapshot(
            "BEGIN ISOLATION LEVEL READ COMMITTED",
            true
        ));
        assert!(!begins_with_snapshot("BEGIN READ ONLY", true));
        assert!(!begins_with_snapshot("BEGIN", false));
    }

    #[test]
    fn snapshot_isolation_begins() {
        assert!(snapshot_isolation("BEGIN ISOLATION LEVEL REPEATABLE READ"));
        assert!(snapshot_isolation(
            "start transaction isolation level serializable"
        ));
        assert!(!snapshot_isolation(
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY"
        ));
        assert!(!snapshot_isolation("BEGIN"));
        assert!(!snapshot_isolation("insert into t values ('serializable')"));
    }

    #[test]
    fn insert_select_order() {
        assert!(insert_selects_ordered(
            "insert into t (v) select v from s order by v"
        ));
        assert!(!insert_selects_ordered("insert into t (v) select v from s"));
        assert!(insert_selects_ordered("insert into t values (1)"));
        assert!(insert_selects_ordered("update t set v = 1"));
    }

    #[test]
    fn data_row_columns() {
        let mut b = BytesMut::new();
        messages::data_row(&[Some("1"), None, Some("x")], &mut b);
        assert_eq!(
            data_row(&b[5..]),
            vec![Some("1".to_string()), None, Some("x".to_string())]
        );
    }
}
