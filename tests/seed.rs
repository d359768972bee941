//! Seeding a node from a consistent snapshot of another one while writes
//! keep running on the source.
//!
//! Self-contained (no `mod common`): it only needs two local copies and
//! direct connections, no proxy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reprise::backend::Target;
use reprise::local::{LocalCluster, LocalNode, PgBin};
use reprise::replication::seed::{Seeded, bin_dir, seed};
use reprise::replication::{SCHEMA_SQL, lock_query};
use tokio_postgres::{Client, NoTls};

/// Fast settings for test servers.
const SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
];

/// The source: tables of several kinds, an extension, a large object.
const SOURCE_SQL: &str = "
UPDATE reprise.node SET role = 'primary', term = 1;
CREATE EXTENSION citext;
CREATE SCHEMA shop;
CREATE TABLE shop.orders (id serial PRIMARY KEY, seq bigint NOT NULL, ticket bigint NOT NULL,
                          doc jsonb NOT NULL, email citext NOT NULL);
CREATE INDEX orders_doc ON shop.orders USING gin (doc);
CREATE SEQUENCE shop.tickets START 1000;
CREATE VIEW shop.recent AS SELECT id, seq, doc->>'n' AS n FROM shop.orders ORDER BY seq DESC LIMIT 10;
CREATE TABLE public.kv (k text PRIMARY KEY, v jsonb NOT NULL);
INSERT INTO public.kv SELECT 'k' || g, jsonb_build_object('g', g) FROM generate_series(1, 500) g;
INSERT INTO public.kv VALUES ('last', '0');
CREATE TABLE public.big (id bigint PRIMARY KEY, body text NOT NULL);
INSERT INTO public.big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 100000) g;
SELECT lo_from_bytea(4242, 'source blob');
CREATE ROLE app_owner;
CREATE TABLE public.owned (x int);
ALTER TABLE public.owned OWNER TO app_owner;
";

/// The target, different in every way the wipe must undo.
const TARGET_SQL: &str = "
UPDATE reprise.node SET role = 'primary', term = 3;
INSERT INTO reprise.log (seq, term, payload, prev_hash, hash)
SELECT g, 3, 'other history', '', md5(g::text) FROM generate_series(1, 10) g;
CREATE SCHEMA junk;
CREATE TABLE junk.t (x int);
INSERT INTO junk.t VALUES (1), (2);
CREATE EXTENSION citext SCHEMA junk;
CREATE EXTENSION hstore;
CREATE TABLE public.extra (x int);
CREATE TABLE public.kv (k text PRIMARY KEY, v jsonb NOT NULL);
INSERT INTO public.kv VALUES ('other', '1');
CREATE SCHEMA shop;
CREATE SEQUENCE shop.tickets START 5;
SELECT lo_from_bytea(4242, 'target blob');
SELECT lo_from_bytea(4343, 'only on the target');
COMMENT ON SCHEMA public IS 'target';
REVOKE USAGE ON SCHEMA public FROM PUBLIC;
CREATE FUNCTION junk.deny() RETURNS event_trigger LANGUAGE plpgsql AS
  $$ BEGIN RAISE EXCEPTION 'no drops here'; END $$;
CREATE EVENT TRIGGER deny_drops ON sql_drop EXECUTE FUNCTION junk.deny();
";

/// Connects with tokio-postgres and drives the connection in a task.
async fn connect(node: &LocalNode) -> Client {
    let url = node.url("app");
    let (client, conn) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The source is reached through its Unix socket, the target over TCP.
fn target_of(node: &LocalNode, unix: bool) -> Target {
    Target {
        host: if unix {
            node.socket_dir().display().to_string()
        } else {
            node.host().to_string()
        },
        port: node.port(),
        user: "postgres".into(),
        password: String::new(),
        dbname: "app".into(),
        tls: Default::default(),
    }
}

/// Two copies of an empty `app` database, left running; stopped before
/// their directory goes.
struct Nodes {
    cluster: LocalCluster,
    _dir: tempfile::TempDir,
}

async fn two_nodes() -> Nodes {
    let dir = tempfile::Builder::new()
        .prefix("reprise-seed")
        .tempdir()
        .unwrap();
    let path = dir.path().to_path_buf();
    let cluster = tokio::task::spawn_blocking(move || {
        LocalCluster::create(&path, 2, "app", SETTINGS, |_| Ok(()))
    })
    .await
    .unwrap()
    .expect("local copies start");
    Nodes { cluster, _dir: dir }
}

/// One logged write, as the proxy makes it: the write lock and sequence
/// states first, one order (recording its log seq, serial id and ticket),
/// the `last` key, then the log entry. Returns the entry's seq.
async fn write(c: &mut Client) -> Result<i64, tokio_postgres::Error> {
    let tx = c.transaction().await?;
    let before: String = tx.query_one(&lock_query("app"), &[]).await?.get(2);
    let seq: i64 = tx
        .query_one("SELECT coalesce(max(seq), 0) + 1 FROM reprise.log", &[])
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO shop.orders (seq, ticket, doc, email) \
         VALUES ($1, nextval('shop.tickets'), \
                 jsonb_build_object('n', $1::bigint, 'at', clock_timestamp()), $2)",
        &[&seq, &format!("User{seq}@X.org")],
    )
    .await?;
    tx.execute(
        "UPDATE public.kv SET v = to_jsonb($1::bigint) WHERE k = 'last'",
        &[&seq],
    )
    .await?;
    let payload = format!("entry {seq}").into_bytes();
    let appended: i64 = tx
        .query_one("SELECT reprise.append(1, $1, $2)", &[&payload, &before])
        .await?
        .get(0);
    assert_eq!(appended, seq, "one writer: the log seq is predictable");
    tx.commit().await?;
    Ok(seq)
}

/// Writes in a loop until `stop`; returns how many writes it made.
fn start_writer(mut c: Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            write(&mut c).await.expect("writer");
            n += 1;
        }
        n
    })
}

/// Every row of a query, each as text.
async fn rows(c: &Client, sql: &str, seq: i64) -> Vec<String> {
    let with_seq = sql.contains("$1");
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        if with_seq { vec![&seq] } else { vec![] };
    c.query(sql, &params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect()
}

/// The non-system schemas and every relation in them, with their owners.
const CATALOG_SQL: &str = "SELECT n.nspname || '.' || coalesce(c.relname, '') || ' ' || \
     coalesce(c.relkind::text, '') || ' ' || coalesce(c.relowner::regrole::text, '') \
     FROM pg_namespace n LEFT JOIN pg_class c ON c.relnamespace = n.oid \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_t%' ORDER BY 1";

/// What a user can see of the `public` schema itself.
const PUBLIC_SQL: &str = "SELECT nspowner::regrole::text || ' ' || coalesce(nspacl::text, '-') \
     || ' ' || coalesce(obj_description(oid, 'pg_namespace'), '-') \
     FROM pg_namespace WHERE nspname = 'public'";

/// Seeds and prints the steps it reports.
async fn seed_logged(
    source: &Target,
    target: &Target,
    term: u64,
) -> (Result<Seeded, String>, Vec<String>) {
    let steps = Mutex::new(Vec::new());
    let progress = |s: &str| {
        println!("seed: {s}");
        steps.lock().unwrap().push(s.to_string());
    };
    let bin = bin_dir(None).expect("pg_dump and psql");
    let r = seed(source, target, term, &bin, &progress).await;
    (r, steps.into_inner().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeds_a_divergent_node_from_a_snapshot_while_writes_run() {
    tokio::time::timeout(Duration::from_secs(240), scenario())
        .await
        .expect("the seed scenario finished in time");
}

async fn scenario() {
    let nodes = two_nodes().await;
    let (n0, n1) = (&nodes.cluster.nodes[0], &nodes.cluster.nodes[1]);
    let (mut c0, c1) = (connect(n0).await, connect(n1).await);
    c0.batch_execute(SCHEMA_SQL).await.unwrap();
    c0.batch_execute(SOURCE_SQL).await.unwrap();
    c1.batch_execute(SCHEMA_SQL).await.unwrap();
    c1.batch_execute(TARGET_SQL).await.unwrap();
    for _ in 0..3 {
        write(&mut c0).await.unwrap();
    }
    let (source, target) = (target_of(n0, true), target_of(n1, false));

    // The target lacks the role owning a table: the restore fails and the
    // target is left exactly as it was.
    let before = rows(&c1, CATALOG_SQL, 0).await;
    let (failed, _) = seed_logged(&source, &target, 7).await;
    let err = failed.expect_err("a missing role fails the restore");
    println!("failed seed: {err}");
    assert!(err.contains("target") && err.contains("app_owner"), "{err}");
    assert_eq!(rows(&c1, CATALOG_SQL, 0).await, before, "target untouched");
    c1.batch_execute("CREATE ROLE app_owner").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(connect(n0).await, stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (seeded, steps) = seed_logged(&source, &target, 7).await;
    let seeded = seeded.expect("seed succeeds");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    println!("seeded {seeded:?}; the writer made {writes} writes");
    let s = seeded.seq as i64;
    let head: i64 = c0
        .query_one("SELECT max(seq) FROM reprise.log", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        s > 3 && head > s,
        "writes ran before and during the seed: seq {s}, head {head}"
    );
    assert!(seeded.bytes > 1_000_000, "{seeded:?}");
    assert!(
        steps[0].starts_with(&format!("exported snapshot at seq {s}")),
        "{steps:?}"
    );

    check_as_of(&c0, &c1, s).await;

    // Seeding again over a seeded node, with no writes: identical copies.
    let (again, _) = seed_logged(&source, &target, 8).await;
    assert_eq!(again.expect("second seed").seq as i64, head);
    for sql in [
        CATALOG_SQL,
        PUBLIC_SQL,
        "SELECT o::text FROM shop.orders o ORDER BY id",
        "SELECT kv::text FROM public.kv ORDER BY k",
        "SELECT l::text FROM reprise.log l ORDER BY seq",
        "SELECT last_value || ' ' || is_called FROM shop.tickets",
    ] {
        assert_eq!(rows(&c0, sql, 0).await, rows(&c1, sql, 0).await, "{sql}");
    }
    let node: String = c1
        .query_one("SELECT role || ' ' || term FROM reprise.node", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(node, "subscriber 8");

    // A node is never seeded from itself (here reached by two addresses).
    let (itself, _) = seed_logged(&source, &target_of(n0, false), 9).await;
    let err = itself.expect_err("seeding a node from itself");
    assert!(err.contains("same database"), "{err}");
    assert_eq!(
        rows(&c0, CATALOG_SQL, 0).await,
        rows(&c1, CATALOG_SQL, 0).await
    );
}

/// Node 1 holds exactly node 0's database as of log position `s`.
async fn check_as_of(c0: &Client, c1: &Client, s: i64) {
    // Schema: same schemas, relations and owners; nothing of the target's.
    let catalog = rows(c1, CATALOG_SQL, 0).await;
    assert_eq!(catalog, rows(c0, CATALOG_SQL, 0).await);
    assert!(
        !catalog
            .iter()
            .any(|r| r.starts_with("junk.") || r.contains("extra"))
    );
    assert!(
        catalog.contains(&"public.owned r app_owner".to_string()),
        "{catalog:?}"
    );
    assert!(
        catalog.contains(&"shop.orders_doc i postgres".to_string()),
        "{catalog:?}"
    );
    assert_eq!(rows(c1, PUBLIC_SQL, 0).await, rows(c0, PUBLIC_SQL, 0).await);
    let ext = "SELECT extname || ' ' || extnamespace::regnamespace FROM pg_extension ORDER BY 1";
    assert_eq!(
        rows(c1, ext, 0).await,
        ["citext public", "plpgsql pg_catalog"]
    );
    assert!(
        rows(c1, "SELECT evtname::text FROM pg_event_trigger", 0)
            .await
            .is_empty()
    );
    let blobs = "SELECT oid::text || ' ' || convert_from(lo_get(oid), 'UTF8') \
                 FROM pg_largeobject_metadata ORDER BY oid";
    assert_eq!(rows(c1, blobs, 0).await, ["4242 source blob"]);

    // Data as of s.
    for sql in [
        "SELECT o::text FROM shop.orders o WHERE seq <= $1 ORDER BY id",
        "SELECT l::text FROM reprise.log l WHERE seq <= $1 ORDER BY seq",
        "SELECT kv::text FROM public.kv WHERE k <> 'last' ORDER BY k",
        "SELECT count(*) || ' ' || md5(string_agg(b::text, ',' ORDER BY id)) FROM public.big b",
        "SELECT pg_get_viewdef('shop.recent')",
    ] {
        assert_eq!(rows(c1, sql, s).await, rows(c0, sql, s).await, "{sql}");
    }
    let last = rows(c1, "SELECT v::text FROM public.kv WHERE k = 'last'", 0).await;
    assert_eq!(last, [s.to_string()]);
    assert_eq!(
        rows(c1, "SELECT count(*)::text FROM shop.recent", 0).await,
        ["10"]
    );

    // The node's own state, and sequences as they were at s.
    let node = "SELECT role || ' ' || term || ' ' || (SELECT max(seq) FROM reprise.log) \
                FROM reprise.node";
    assert_eq!(rows(c1, node, 0).await, [format!("subscriber 7 {s}")]);
    let at_s = rows(
        c0,
        "SELECT ticket || ' ' || id FROM shop.orders WHERE seq = $1",
        s,
    )
    .await;
    let now = rows(
        c1,
        "SELECT t.last_value || ' ' || o.last_value FROM shop.tickets t, shop.orders_id_seq o \
         WHERE t.is_called AND o.is_called",
        0,
    )
    .await;
    assert_eq!(now, at_s, "sequences as of seq {s}");
}

#[tokio::test]
async fn an_unreachable_source_fails_fast_and_names_it() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let nowhere = Target {
        host: "127.0.0.1".into(),
        port,
        user: "postgres".into(),
        password: String::new(),
        dbname: "app".into(),
        tls: Default::default(),
    };
    let started = Instant::now();
    let (r, steps) = seed_logged(&nowhere, &nowhere, 1).await;
    let err = r.expect_err("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains(&format!("source 127.0.0.1:{port}/app")),
        "{err}"
    );
    assert!(steps.is_empty(), "{steps:?}");
}

#[test]
fn bin_dir_checks_a_configured_dir_and_finds_one_otherwise() {
    let e = bin_dir(Some("/nonexistent")).unwrap_err();
    assert!(
        e.contains("replication.pg_bin_dir") && e.contains("/nonexistent"),
        "{e}"
    );
    let found = bin_dir(None).expect("pg_dump and psql are installed");
    assert!(found.join("pg_dump").exists() && found.join("psql").exists());
    let server = PgBin::find().unwrap();
    let configured = server.dir().to_str().unwrap();
    assert_eq!(bin_dir(Some(configured)).unwrap(), server.dir());
}
