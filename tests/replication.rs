//! Replication: every committed write transaction is replayed on every
//! subscriber in commit order, leaving identical copies.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn pgbench(port: u16, args: &[&str]) -> String {
    let out = run(Command::new(pg_tool("pgbench")).args(args).args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "app",
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_init_and_tpcb_leave_identical_copies() {
    let g = TestGroup::start_with(3, "", |_| {}).await;
    let port = g.proxy.addr.port();
    tokio::task::spawn_blocking(move || pgbench(port, &["-i", "-q", "-s", "2"]))
        .await
        .unwrap();
    // pgbench reads the scale from pgbench_branches in a new session, which
    // may be routed to a subscriber: let them apply the initialisation
    // first (read-your-writes is per session).
    wait_caught_up(&g, &[0, 1, 2], Duration::from_secs(60))
        .await
        .expect("the subscribers apply pgbench -i");
    // With `-M extended` every statement comes as Parse, Bind, Execute and
    // Sync together: the log must hold the Parse as rewritten for the
    // primary (CURRENT_TIMESTAMP read from the entry; a volatile default
    // captured), not as the client sent it.
    let script = std::env::temp_dir().join(format!("reprise-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set v random(1, 1000000)\n\
         INSERT INTO tokens (v) VALUES (:v);\n\
         INSERT INTO tokens VALUES (DEFAULT, :v + 1, DEFAULT);\n",
    )
    .unwrap();
    g.proxy
        .client("app")
        .await
        .batch_execute(
            "CREATE TABLE tokens (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), v int, \
             at timestamptz DEFAULT clock_timestamp())",
        )
        .await
        .unwrap();
    // The same in a pipeline (one Sync), in and out of a transaction block.
    let pipeline = script.with_extension("pipeline.sql");
    std::fs::write(
        &pipeline,
        "\\set v random(1, 1000000)\n\
         \\startpipeline\n\
         INSERT INTO tokens (v) VALUES (:v);\n\
         BEGIN;\n\
         INSERT INTO tokens VALUES (DEFAULT, :v + 1, DEFAULT);\n\
         COMMIT;\n\
         \\endpipeline\n",
    )
    .unwrap();
    let file = script.display().to_string();
    let piped = pipeline.display().to_string();
    tokio::task::spawn_blocking(move || {
        for mode in ["simple", "extended", "prepared"] {
            let out = pgbench(port, &["-c", "8", "-j", "2", "-T", "5", "-M", mode]);
            assert!(out.contains("number of failed transactions: 0"), "{out}");
            let mut scripts = vec![&file];
            if mode != "simple" {
                // pgbench runs pipelines with the extended protocol only.
                scripts.push(&piped);
            }
            for f in scripts {
                let args = ["-n", "-c", "4", "-t", "20", "-M", mode, "-f", f];
                let out = pgbench(port, &args);
                assert!(out.contains("number of failed transactions: 0"), "{out}");
            }
        }
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&pipeline);
    assert_identical(&g).await;
    // The history rows carry the primary's timestamps on every copy.
    let n: i64 = g
        .direct(2)
        .await
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 50, "history rows: {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_cases_that_break_naive_replay_stay_identical() {
    let g = TestGroup::start(3, |_| {}).await;
    let setup = g.proxy.client("app").await;
    setup
        .batch_execute(
            "CREATE TABLE events (id serial PRIMARY KEY, v int);
             CREATE TABLE totals (n bigint);
             CREATE TABLE counters (id int PRIMARY KEY, x int, hits int);
             INSERT INTO counters SELECT g, 0, 0 FROM generate_series(1, 5) g;",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let url = g.proxy.url("app");
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            for k in 0..25 {
                match w % 4 {
                    0 => {
                        c.execute("INSERT INTO events (v) VALUES ($1)", &[&k])
                            .await
                            .unwrap();
                    }
                    1 if k % 2 == 0 => {
                        c.execute("INSERT INTO totals SELECT count(*) FROM events", &[])
                            .await
                            .unwrap();
                    }
                    1 => {
                        // The write lock is taken for the session before
                        // the BEGIN, so the snapshot is taken under it:
                        // no commit can slip in between, and the COMMIT
                        // never fails with 40001 (as with PostgreSQL alone,
                        // where these inserts cannot conflict).
                        // The isolation level by BEGIN, or by the
                        // session's default (as JDBC sets it).
                        if k == 0 && w == 5 {
                            c.batch_execute(
                                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                            )
                            .await
                            .unwrap();
                        }
                        let begin = match w {
                            5 => "BEGIN",
                            _ => "BEGIN ISOLATION LEVEL REPEATABLE READ",
                        };
                        c.batch_execute(begin).await.unwrap();
                        c.execute("INSERT INTO totals SELECT count(*) FROM events", &[])
                            .await
                            .unwrap();
                        c.batch_execute("COMMIT").await.unwrap();
                    }
                    2 => {
                        c.execute(
                            "UPDATE counters SET x = x + 1, hits = hits + 1 WHERE id = $1",
                            &[&(k % 5 + 1)],
                        )
                        .await
                        .unwrap();
                    }
                    _ => {
                        c.execute("DELETE FROM counters WHERE hits = 10", &[])
                            .await
                            .unwrap();
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every acknowledged insert is there: 2 writers × 25 of them.
    let totals: i64 = setup
        .query_one("SELECT count(*) FROM totals", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(totals, 50);
    assert_identical(&g).await;
}

/// A REPEATABLE READ or SERIALIZABLE transaction (by its BEGIN, the
/// session's default isolation or the startup parameters) takes the write
/// lock for its session before its BEGIN and moves it to the transaction
/// in its first query: a writer that waited for another's commit sees it
/// and commits (it used to fail with 40001). When that first query cannot
/// run (the block failed in the same pipelined batch as its BEGIN), the
/// session's lock is released once the block ends: others can write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_isolation_writers_take_the_lock_before_their_snapshot() {
    let g = TestGroup::start(2, |_| {}).await;
    let c1 = g.proxy.client("app").await;
    let c2 = g.proxy.client("app").await;
    c2.batch_execute("CREATE TABLE snap_notes (v text); SET statement_timeout = '5s'")
        .await
        .unwrap();
    let mut raw = Raw::connect(&g.proxy).await;
    for begin in [
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ] {
        // The BEGIN and a failing query in one pipelined batch: the block
        // has failed before the lock query that follows the batch runs.
        let got = raw.batch(&[begin, "SELECT 1/0"]).await;
        assert_eq!(error_in(&got).as_deref(), Some("22012"), "{got:?}");
        // The other session writes while this one is in its failed block
        // and after it ended.
        let waiting = {
            let url = g.proxy.url("app");
            tokio::spawn(async move {
                let c = connect(&url).await;
                c.batch_execute("SET statement_timeout = '5s'")
                    .await
                    .unwrap();
                c.execute("INSERT INTO snap_notes VALUES ('while failed')", &[])
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut out = Vec::new();
        Raw::msg(&mut out, b'Q', b"ROLLBACK\0");
        raw.send(&out).await;
        assert_eq!(tags_in(&raw.until(b'Z').await), ["ROLLBACK", "ZI"]);
        waiting.await.unwrap().unwrap();
        c2.execute("INSERT INTO snap_notes VALUES ($1)", &[&begin])
            .await
            .unwrap();
        // The session itself goes on writing, in either kind of block.
        c1.batch_execute(&format!(
            "{begin}; INSERT INTO snap_notes VALUES ('c1'); COMMIT"
        ))
        .await
        .unwrap();
        c1.batch_execute(begin).await.unwrap();
        c1.execute("INSERT INTO snap_notes VALUES ('c1 again')", &[])
            .await
            .unwrap();
        c1.batch_execute("COMMIT").await.unwrap();
    }
    // A snapshot-isolation writer that waits for another's commit sees it:
    // its COMMIT does not fail. Begun so by BEGIN, by the session's
    // default isolation, or by the startup parameters.
    let mut startup: tokio_postgres::Config = g.proxy.url("app").parse().unwrap();
    startup.options("-c default_transaction_isolation=serializable");
    let (by_startup, conn) = startup.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let by_setting = g.proxy.client("app").await;
    by_setting
        .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let by_begin = g.proxy.client("app").await;
    for (how, waiter, begin) in [
        ("begin", &by_begin, "BEGIN ISOLATION LEVEL REPEATABLE READ"),
        ("setting", &by_setting, "BEGIN"),
        ("startup", &by_startup, "START TRANSACTION"),
    ] {
        c2.batch_execute("BEGIN; INSERT INTO snap_notes VALUES ('holder')")
            .await
            .unwrap();
        let sql =
            format!("{begin}; INSERT INTO snap_notes SELECT 'saw ' || count(*) FROM snap_notes");
        let wait = waiter.batch_execute(&sql);
        let commit = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c2.batch_execute("COMMIT").await
        };
        let (waited, committed) = tokio::join!(wait, commit);
        waited.unwrap();
        committed.unwrap();
        waiter
            .batch_execute("COMMIT")
            .await
            .unwrap_or_else(|e| panic!("{how}: {e:?}"));
    }
    // A session that goes away inside such a block leaves no lock behind.
    let c3 = g.proxy.client("app").await;
    c3.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    drop(c3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    c2.execute(
        "INSERT INTO snap_notes VALUES ('after a lost session')",
        &[],
    )
    .await
    .unwrap();
    let n: i64 = c2
        .query_one("SELECT count(*) FROM snap_notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2 * 4 + 3 * 2 + 1);
    wait_caught_up(&g, &[1], Duration::from_secs(10)).await;
    assert_identical(&g).await;
}

/// Where a transaction block runs is decided by its first statement, not
/// by its BEGIN alone: a lone BEGIN is answered at once and sent with the
/// statement after it. A block made READ ONLY by `SET TRANSACTION READ
/// ONLY` (or the session's default) runs on a subscriber; `BEGIN READ ONLY;
/// SET TRANSACTION READ WRITE` runs on the primary and its writes reach
/// every copy (they used to change one subscriber alone). A block already
/// running on a subscriber cannot become READ WRITE. A REPEATABLE READ or
/// SERIALIZABLE block may still be made READ ONLY or change its isolation
/// level after its BEGIN (the write lock query that followed the BEGIN
/// made that fail), and once READ ONLY it does not hold the write lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_blocks_run_where_their_first_statements_say() {
    let g = TestGroup::start(3, |_| {}).await;
    let primary_port = g.cluster.nodes[0].port().to_string();
    let setup = g.proxy.client("app").await;
    setup
        .batch_execute("CREATE TABLE access_notes (v text)")
        .await
        .unwrap();
    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    // Made READ ONLY after the BEGIN: a subscriber. Simple and extended.
    for (begin, access) in [
        ("BEGIN", "SET TRANSACTION READ ONLY"),
        (
            "START TRANSACTION",
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        ),
        (
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "SET LOCAL transaction_read_only = on",
        ),
    ] {
        let c = g.proxy.client("app").await;
        c.batch_execute(begin).await.unwrap();
        c.execute(access, &[]).await.unwrap();
        assert_ne!(served_port(&c).await, primary_port, "{begin}; {access}");
        c.batch_execute("COMMIT").await.unwrap();
        let c = g.proxy.client("app").await;
        c.batch_execute(begin).await.unwrap();
        c.batch_execute(access).await.unwrap();
        assert_ne!(served_port(&c).await, primary_port, "{begin}; {access}");
        c.batch_execute("COMMIT").await.unwrap();
    }
    // READ ONLY by the session's default: a subscriber; a block that may
    // write: the primary.
    let c = g.proxy.client("app").await;
    c.batch_execute("SET default_transaction_read_only = on")
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_ne!(served_port(&c).await, primary_port, "read-only default");
    c.batch_execute("COMMIT; SET default_transaction_read_only = off")
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        served_port(&c).await,
        primary_port,
        "a block that may write"
    );
    c.batch_execute("COMMIT").await.unwrap();
    // Pipelined without waiting, the answers are PostgreSQL's, in order;
    // an error in the block (here the first statement's) aborts it.
    let mut raw = Raw::connect(&g.proxy).await;
    let mut out = Vec::new();
    for q in [
        "BEGIN",
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET TRANSACTION READ ONLY",
        "SELECT count(*) FROM access_notes",
        "COMMIT",
        "BEGIN",
        "SELECT 1/0",
        "SELECT 1",
        "ROLLBACK",
    ] {
        Raw::msg(&mut out, b'Q', format!("{q}\0").as_bytes());
    }
    raw.send(&out).await;
    let mut tags = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..9 {
        let got = raw.until(b'Z').await;
        tags.extend(tags_in(&got));
        errors.extend(error_in(&got));
    }
    assert_eq!(
        tags,
        [
            "BEGIN", "ZT", "SET", "ZT", "SET", "ZT", "SELECT 1", "ZT", "COMMIT", "ZI", "BEGIN",
            "ZT", "ZE", "ZE", "ROLLBACK", "ZI"
        ]
    );
    assert_eq!(errors, ["22012", "25P02"]);
    // BEGIN READ ONLY made READ WRITE before its first query writes on
    // the primary, logged.
    let c = g.proxy.client("app").await;
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    c.batch_execute("SET TRANSACTION READ WRITE").await.unwrap();
    c.execute("INSERT INTO access_notes VALUES ('made read write')", &[])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    // On a subscriber, it cannot become READ WRITE.
    for sql in [
        "SET TRANSACTION READ WRITE",
        "SET LOCAL transaction_read_only = off",
        "RESET transaction_read_only",
        "SELECT set_config('transaction_read_only', 'off', true)",
        "SELECT set_config('transaction_read_only', 'off', false)",
    ] {
        let c = g.proxy.client("app").await;
        c.batch_execute("BEGIN READ ONLY").await.unwrap();
        assert_ne!(served_port(&c).await, primary_port, "{sql}");
        let e = c.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        assert!(db_text(&e).contains("READ WRITE"), "{sql}: {e:?}");
        let e = c
            .execute("INSERT INTO access_notes VALUES ('on a subscriber')", &[])
            .await
            .expect_err("the block failed");
        assert_eq!(sqlstate(&e), "25P02", "{sql}: {e:?}");
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    // Snapshot isolation, then READ ONLY or another level, before the
    // first query; simple and extended BEGIN.
    let c = g.proxy.client("app").await;
    for (default, begin, then) in [
        (
            "read committed",
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            "SET TRANSACTION READ ONLY",
        ),
        (
            "repeatable read",
            "BEGIN",
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
        ),
        ("serializable", "BEGIN", "SET TRANSACTION READ ONLY"),
        (
            "serializable",
            "START TRANSACTION",
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        ),
    ] {
        c.batch_execute(&format!("SET default_transaction_isolation = '{default}'"))
            .await
            .unwrap();
        for extended in [false, true] {
            let what = format!("{default}: {begin}; {then} (extended: {extended})");
            match extended {
                false => c.batch_execute(begin).await.unwrap(),
                true => drop(c.execute(begin, &[]).await.unwrap()),
            }
            c.batch_execute(then)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            c.query_one("SELECT count(*) FROM access_notes", &[])
                .await
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            c.batch_execute("COMMIT")
                .await
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        }
    }
    c.batch_execute("SET default_transaction_isolation = 'read committed'")
        .await
        .unwrap();
    // Made READ ONLY, a snapshot-isolation block leaves the others free
    // to write while it is open.
    let other = g.proxy.client("app").await;
    other
        .batch_execute("SET statement_timeout = '5s'")
        .await
        .unwrap();
    c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ", &[])
        .await
        .unwrap();
    c.execute("SET TRANSACTION READ ONLY", &[]).await.unwrap();
    c.query_one("SELECT count(*) FROM access_notes", &[])
        .await
        .unwrap();
    other
        .execute("INSERT INTO access_notes VALUES ('beside a reader')", &[])
        .await
        .expect("not held by the READ ONLY block");
    c.batch_execute("COMMIT").await.unwrap();
    // SET TRANSACTION ISOLATION LEVEL SERIALIZABLE right after a lone
    // BEGIN makes a snapshot-isolation writer: one that waits for
    // another's commit sees it, and its own COMMIT succeeds.
    other
        .batch_execute("BEGIN; INSERT INTO access_notes VALUES ('holder')")
        .await
        .unwrap();
    let wait = async {
        c.batch_execute("BEGIN").await?;
        c.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .await?;
        c.batch_execute("INSERT INTO access_notes SELECT 'saw ' || count(*) FROM access_notes")
            .await
    };
    let commit = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        other.batch_execute("COMMIT").await
    };
    let (waited, committed) = tokio::join!(wait, commit);
    waited.unwrap();
    committed.unwrap();
    c.batch_execute("COMMIT")
        .await
        .expect("the serializable writer commits");
    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    for i in 0..3 {
        let d = g.direct(i).await;
        let rows = strings(&d, "SELECT v FROM access_notes ORDER BY v").await;
        assert_eq!(
            rows,
            ["beside a reader", "holder", "made read write", "saw 3"],
            "node {i}"
        );
    }
    assert_identical(&g).await;
}

/// A block's settings sent in one query string with its other statements
/// act as in PostgreSQL: `BEGIN READ ONLY` or `SET TRANSACTION READ ONLY`
/// right after the BEGIN makes the string's block a subscriber's; a `SET
/// TRANSACTION ISOLATION LEVEL` right after the BEGIN (in its string or
/// the next) runs before the block's first query, so it may change the
/// level (no 25001) and a snapshot-isolation writer waits for the write
/// lock before its snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_settings_sent_with_other_statements_act_as_in_postgresql() {
    let g = TestGroup::start(3, |_| {}).await;
    let primary_port = g.cluster.nodes[0].port().to_string();
    let setup = g.proxy.client("app").await;
    setup
        .batch_execute("CREATE TABLE level_notes (v text)")
        .await
        .unwrap();
    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    // The first row's values of what a string returned.
    let first_row = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        msgs.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or_default().to_string())
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    };
    for sql in [
        "BEGIN READ ONLY; SELECT current_setting('port'); COMMIT",
        "START TRANSACTION READ ONLY; SELECT current_setting('port')",
        "BEGIN; SET TRANSACTION READ ONLY; SELECT current_setting('port'); COMMIT",
        "BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT current_setting('port'); END",
    ] {
        let c = g.proxy.client("app").await;
        let port = first_row(c.simple_query(sql).await.unwrap());
        assert_ne!(port, [primary_port.as_str()], "{sql}");
    }
    // A READ ONLY block whose first string pins the session: the primary.
    let c = g.proxy.client("app").await;
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    c.batch_execute(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; \
         DECLARE held CURSOR WITH HOLD FOR SELECT current_setting('port')",
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let port = first_row(c.simple_query("FETCH held").await.unwrap());
    assert_eq!(port, [primary_port.as_str()], "a READ ONLY block that pins");
    let c = g.proxy.client("app").await;
    let port = first_row(
        c.simple_query("BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT current_setting('port'); COMMIT")
            .await
            .unwrap(),
    );
    assert_eq!(port, [primary_port.as_str()], "a block that may write");
    // Another level set before the first query, in the BEGIN's string or
    // the next one, simple and extended BEGIN.
    for (k, (begin, then)) in [
        (
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "",
        ),
        ("BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", ""),
        (
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; ",
        ),
        ("BEGIN", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; "),
        (
            "BEGIN",
            "SET TRANSACTION READ WRITE; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; ",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        for extended in [false, true] {
            if extended && then.is_empty() {
                continue;
            }
            let what = format!("{begin} | {then} (extended: {extended})");
            let c = g.proxy.client("app").await;
            let rest = format!(
                "{then}INSERT INTO level_notes VALUES ('{k}{extended}'); \
                 SELECT current_setting('transaction_isolation'), current_setting('port')"
            );
            let row = if then.is_empty() {
                first_row(
                    c.simple_query(&format!("{begin}; {rest}; COMMIT"))
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e:?}")),
                )
            } else {
                match extended {
                    false => c.batch_execute(begin).await.unwrap(),
                    true => drop(c.execute(begin, &[]).await.unwrap()),
                }
                let row = first_row(
                    c.simple_query(&rest)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e:?}")),
                );
                c.batch_execute("COMMIT")
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e:?}"));
                row
            };
            assert_eq!(row, ["serializable", primary_port.as_str()], "{what}");
        }
    }
    // The same in one pipelined batch (as psycopg's pipeline mode sends
    // it): the settings go with the BEGIN, before the write lock.
    let mut raw = Raw::connect(&g.proxy).await;
    let got = raw
        .batch(&[
            "BEGIN",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "INSERT INTO level_notes VALUES ('batch')",
            "SELECT current_setting('transaction_isolation')",
            "COMMIT",
        ])
        .await;
    assert_eq!(error_in(&got), None, "{got:?}");
    assert_eq!(
        tags_in(&got),
        ["BEGIN", "SET", "INSERT 0 1", "SELECT 1", "COMMIT", "ZI"]
    );
    assert!(
        got.iter()
            .any(|(t, body)| *t == b'D' && body.ends_with(b"serializable")),
        "{got:?}"
    );
    // A whole READ ONLY block in one batch: a subscriber. (A new session:
    // this one's write may not have reached them yet.)
    let mut raw = Raw::connect(&g.proxy).await;
    let got = raw
        .batch(&[
            "BEGIN READ ONLY",
            "SELECT current_setting('port')",
            "COMMIT",
        ])
        .await;
    assert_eq!(tags_in(&got), ["BEGIN", "SELECT 1", "COMMIT", "ZI"]);
    let port = got.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert!(
        !port.1.ends_with(primary_port.as_bytes()),
        "a READ ONLY batch ran on the primary: {got:?}"
    );
    // A serializable writer whose level is set in its BEGIN's string, or
    // in the string after a lone BEGIN, waits for another's commit, sees
    // it, and commits.
    let other = g.proxy.client("app").await;
    for (k, (first, second)) in [
        (
            "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; INSERT INTO level_notes SELECT 'saw ' || count(*) FROM level_notes",
            None,
        ),
        (
            "BEGIN",
            Some("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; INSERT INTO level_notes SELECT 'then saw ' || count(*) FROM level_notes"),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        other
            .batch_execute(&format!("BEGIN; INSERT INTO level_notes VALUES ('holder {k}')"))
            .await
            .unwrap();
        let c = g.proxy.client("app").await;
        let wait = async {
            c.batch_execute(first).await?;
            if let Some(second) = second {
                c.batch_execute(second).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        };
        let commit = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            other.batch_execute("COMMIT").await
        };
        let (waited, committed) = tokio::join!(wait, commit);
        waited.unwrap_or_else(|e| panic!("{first}: {e:?}"));
        committed.unwrap();
        c.batch_execute("COMMIT")
            .await
            .unwrap_or_else(|e| panic!("{first}: the serializable writer commits: {e:?}"));
    }
    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    for i in 0..3 {
        let d = g.direct(i).await;
        let saw = strings(
            &d,
            "SELECT v FROM level_notes WHERE v LIKE '%saw%' ORDER BY v",
        )
        .await;
        // 8 rows of the level loop and the batch's, then holder 0 (seen:
        // 10), then the first writer's and holder 1 (seen: 12).
        assert_eq!(saw, ["saw 10", "then saw 12"], "node {i}");
    }
    assert_identical(&g).await;
}

/// A snapshot exported (`pg_export_snapshot()`) in a READ ONLY block on a
/// subscriber exists on that copy alone: a block that takes it (`SET
/// TRANSACTION SNAPSHOT`) right after its BEGIN runs there too, as
/// `pg_dump --jobs` does with its workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_snapshots_are_taken_on_the_copy_that_has_them() {
    let g = TestGroup::start(3, |_| {}).await;
    let setup = g.proxy.client("app").await;
    setup
        .batch_execute(
            "CREATE TABLE snap_a (v int); CREATE TABLE snap_b (v int);
             INSERT INTO snap_a VALUES (1); INSERT INTO snap_b VALUES (1)",
        )
        .await
        .unwrap();
    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    let exporter = g.proxy.client("app").await;
    exporter.batch_execute("BEGIN").await.unwrap();
    exporter
        .batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .unwrap();
    // Pipelined after another statement, whose answer comes first.
    let (before, exported) = tokio::join!(
        exporter.query_one("SELECT 1", &[]),
        exporter.query_one("SELECT pg_export_snapshot()", &[])
    );
    before.unwrap();
    let id: String = exported.unwrap().get(0);
    let exported_on = served_port(&exporter).await;
    assert_ne!(exported_on, g.cluster.nodes[0].port().to_string());
    // Written after the export: not in the snapshot.
    setup
        .batch_execute("INSERT INTO snap_a VALUES (2)")
        .await
        .unwrap();
    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    for k in 0..6 {
        let importer = g.proxy.client("app").await;
        importer.batch_execute("BEGIN").await.unwrap();
        importer
            .batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .unwrap();
        let take = format!("SET TRANSACTION SNAPSHOT '{id}'");
        match k % 2 {
            0 => importer.batch_execute(&take).await,
            _ => importer.execute(&take, &[]).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("importer {k}: {e:?}"));
        assert_eq!(served_port(&importer).await, exported_on, "importer {k}");
        let n: i64 = importer
            .query_one("SELECT count(*) FROM snap_a", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "importer {k} sees the exported snapshot");
        importer.batch_execute("COMMIT").await.unwrap();
    }
    // A block that may write runs on the primary, which has no such
    // snapshot.
    let writer = g.proxy.client("app").await;
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let e = writer
        .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{id}'"))
        .await
        .expect_err("not on the primary");
    assert_eq!(sqlstate(&e), "22023", "{e:?}");
    writer.batch_execute("ROLLBACK").await.unwrap();
    exporter.batch_execute("COMMIT").await.unwrap();
    // pg_dump with parallel workers, through the proxy.
    let bin = reprise::replication::seed::bin_dir(None).expect("pg_dump");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump");
    let status = std::process::Command::new(bin.join("pg_dump"))
        .args(["--format=directory", "--jobs=3", "--file"])
        .arg(&out)
        .arg(g.proxy.url("app"))
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump --jobs=3 through the proxy");
    assert_identical(&g).await;
}

/// Settings of the transaction under way (`SET TRANSACTION …`, `SET
/// LOCAL transaction_read_only`) are not writes: they take no write lock
/// (which, as a first query, made `SET TRANSACTION ISOLATION LEVEL` fail
/// with "must be called before any query") and a READ ONLY transaction,
/// however it was made so, logs nothing (its COMMIT failed, the log
/// append being refused in it). The replay of a READ WRITE block of a
/// session whose default is READ ONLY does not leave that default to the
/// next replay (which then could not write: the copy was found divergent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_settings_and_read_only_defaults_are_followed() {
    let g = TestGroup::start(2, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute("CREATE TABLE ro_notes (v text)")
        .await
        .unwrap();
    let logged = log_extent(&g, 0).await.0;
    // Read-only transactions calling a volatile function (a write for
    // routing): made so inside the block, by the session's default, or by
    // the startup parameters.
    for sets in [
        "SET TRANSACTION READ ONLY",
        "SET LOCAL transaction_read_only = on",
    ] {
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute(sets).await.unwrap();
        c.query_one("SELECT random()", &[]).await.unwrap();
        c.batch_execute("COMMIT")
            .await
            .unwrap_or_else(|e| panic!("{sets}: {e:?}"));
    }
    let by_default = g.proxy.client("app").await;
    by_default
        .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .unwrap();
    by_default.query_one("SELECT random()", &[]).await.unwrap();
    by_default.batch_execute("BEGIN").await.unwrap();
    by_default.query_one("SELECT random()", &[]).await.unwrap();
    by_default.batch_execute("COMMIT").await.unwrap();
    let e = by_default
        .execute("INSERT INTO ro_notes VALUES ('refused by the node')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "25006", "{e:?}");
    let mut startup: tokio_postgres::Config = g.proxy.url("app").parse().unwrap();
    startup.options("-c default_transaction_read_only=on");
    let (by_startup, conn) = startup.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    by_startup.query_one("SELECT random()", &[]).await.unwrap();
    assert_eq!(
        log_extent(&g, 0).await.0,
        logged,
        "read-only work was logged"
    );
    // A READ WRITE block in such a session writes and is logged.
    for s in [&by_default, &by_startup] {
        s.batch_execute("BEGIN READ WRITE").await.unwrap();
        s.execute("INSERT INTO ro_notes VALUES ('read write')", &[])
            .await
            .unwrap();
        s.batch_execute("COMMIT").await.unwrap();
    }
    // SET TRANSACTION ISOLATION LEVEL as the block's first query.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap();
    c.execute("INSERT INTO ro_notes VALUES ('serializable')", &[])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    // READ ONLY after a write: the entry could not be written at COMMIT.
    c.batch_execute("BEGIN; INSERT INTO ro_notes VALUES ('rolled back')")
        .await
        .unwrap();
    let e = c
        .batch_execute("SET TRANSACTION READ ONLY")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(log_extent(&g, 0).await.0, logged + 3);
    wait_caught_up(&g, &[1], Duration::from_secs(10)).await;
    let rows: i64 = g
        .direct(1)
        .await
        .query_one("SELECT count(*) FROM ro_notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 3, "{}", g.proxy.status().await);
    assert_identical(&g).await;
}

/// Bulk inserts whose rows come in the same order on every copy —
/// from `generate_series` or `unnest` without ORDER BY, or any query
/// ordered by a key — number their rows and capture their volatile
/// defaults, and from those functions the volatile calls of their target
/// lists (all used to be refused: without an ORDER BY, and volatile values
/// with any INSERT … SELECT). Rows read in storage order are still
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_inserts_in_a_fixed_order_are_numbered_and_captured() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute(
        "CREATE TABLE bulk_u (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
             at timestamptz DEFAULT clock_timestamp(), n int);
         CREATE TABLE bulk_s (id serial PRIMARY KEY, n int, made timestamptz DEFAULT clock_timestamp());",
    )
    .await
    .unwrap();
    for sql in [
        "INSERT INTO bulk_u (n) SELECT g FROM generate_series(1, 300) g",
        "INSERT INTO bulk_u (n) SELECT generate_series(301, 310)",
        "INSERT INTO bulk_u (n) SELECT x FROM unnest(ARRAY[7, 8, 9]) x",
        "INSERT INTO bulk_s (n) SELECT g FROM generate_series(1, 100) g",
        "INSERT INTO bulk_s (n) SELECT n FROM bulk_s ORDER BY id",
        "INSERT INTO bulk_u (n) SELECT n FROM bulk_s ORDER BY id LIMIT 5",
        // Volatile calls in such a query's target list.
        "INSERT INTO bulk_u (id, n) SELECT gen_random_uuid(), g FROM generate_series(2000, 2009) g",
        "INSERT INTO bulk_s (n, made) SELECT (random() * 100)::int, clock_timestamp() \
         FROM generate_series(1, 10)",
    ] {
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    // Bound, in a transaction block, with RETURNING.
    c.batch_execute("BEGIN").await.unwrap();
    let rows = c
        .query(
            "INSERT INTO bulk_u (n) SELECT g FROM generate_series($1::int, $2::int) g RETURNING id",
            &[&1000i32, &1019i32],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 20);
    c.batch_execute("COMMIT").await.unwrap();
    for sql in [
        "INSERT INTO bulk_u (n) SELECT n FROM bulk_s",
        "INSERT INTO bulk_s (n) SELECT n FROM bulk_s",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
    }
    let count = |t: &str| format!("SELECT count(*) FROM {t}");
    for (t, n) in [("bulk_u", 300 + 10 + 3 + 5 + 10 + 20), ("bulk_s", 210)] {
        let got: i64 = c.query_one(&count(t), &[]).await.unwrap().get(0);
        assert_eq!(got, n, "{t}");
    }
    assert_identical(&g).await;
}

/// `SET LOCAL` is not a write: a block that only sets and reads takes no
/// write lock and logs nothing (it used to be logged, holding the lock for
/// the block). Should the block write, its entry replays them first, and
/// those after its first write in order: the copies resolve the same
/// tables. One that failed, or was rolled back to a savepoint, is not
/// replayed. `SELECT set_config(…, true)` is handled the same way (it
/// pinned the session to the primary and was a write). A session `SET`
/// after the block's first write is replayed in its place too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_is_replayed_with_the_block_that_writes() {
    let g = TestGroup::start(2, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute(
        "CREATE SCHEMA other;
         CREATE TABLE public.where_to (v text);
         CREATE TABLE other.where_to (v text);",
    )
    .await
    .unwrap();
    let logged = log_extent(&g, 0).await.0;
    c.batch_execute("BEGIN; SET LOCAL statement_timeout = '5s'")
        .await
        .unwrap();
    c.batch_execute("SET LOCAL lock_timeout = '1s'")
        .await
        .unwrap();
    c.query_one("SELECT count(*) FROM where_to", &[])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        log_extent(&g, 0).await.0,
        logged,
        "a block that only read was logged"
    );
    // Before the first write, and after it.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET LOCAL search_path = other, public")
        .await
        .unwrap();
    c.execute("INSERT INTO where_to VALUES ('other 1')", &[])
        .await
        .unwrap();
    c.batch_execute("SET LOCAL search_path = public")
        .await
        .unwrap();
    c.execute("INSERT INTO where_to VALUES ('public 1')", &[])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    // Undone by the block's failure or a savepoint: not replayed.
    c.batch_execute("BEGIN").await.unwrap();
    assert!(
        c.batch_execute("SET LOCAL statement_timeout = 'soon'")
            .await
            .is_err()
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("BEGIN; SAVEPOINT a; SET LOCAL search_path = other, public; ROLLBACK TO a")
        .await
        .unwrap();
    c.execute("INSERT INTO where_to VALUES ('public 2')", &[])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    // The next block starts without them.
    c.execute("INSERT INTO where_to VALUES ('public 3')", &[])
        .await
        .unwrap();
    // A session setting after the block's first write replays there (it
    // used to be left out of the entry: the copies put 'other 2' in public).
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO where_to VALUES ('public 5')", &[])
        .await
        .unwrap();
    c.batch_execute("SET search_path = other, public")
        .await
        .unwrap();
    c.execute("INSERT INTO where_to VALUES ('other 2')", &[])
        .await
        .unwrap();
    c.batch_execute("COMMIT; RESET search_path").await.unwrap();
    // A SELECT of several session set_config calls is one statement: the
    // write after it in the same string is still a write (it was not
    // logged: the calls were counted as statements).
    c.batch_execute(
        "SELECT set_config('app.a', '1', false), set_config('app.b', '2', false); \
         INSERT INTO where_to VALUES ('public 4')",
    )
    .await
    .unwrap();
    // set_config(…, true), literal or bound, as PostgREST sets a request's
    // settings: the same.
    let logged = log_extent(&g, 0).await.0;
    c.batch_execute("BEGIN").await.unwrap();
    c.query(
        "SELECT set_config('request.user', $1, true), set_config('search_path', $2, true)",
        &[&"alice", &"other, public"],
    )
    .await
    .unwrap();
    c.query_one("SELECT count(*) FROM where_to", &[])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        log_extent(&g, 0).await.0,
        logged,
        "a block that only read was logged"
    );
    for set in [
        "SELECT set_config('search_path', 'other, public', true)",
        "SELECT set_config('search_path', $1, true)",
    ] {
        c.batch_execute("BEGIN").await.unwrap();
        match set.contains("$1") {
            true => c.query(set, &[&"other, public"]).await.unwrap(),
            false => c.query(set, &[]).await.unwrap(),
        };
        c.execute("INSERT INTO where_to VALUES ($1)", &[&set])
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
    }
    wait_caught_up(&g, &[1], Duration::from_secs(10)).await;
    for (table, rows) in [
        (
            "other.where_to",
            vec![
                "other 1",
                "other 2",
                "SELECT set_config('search_path', $1, true)",
                "SELECT set_config('search_path', 'other, public', true)",
            ],
        ),
        (
            "public.where_to",
            vec!["public 1", "public 2", "public 3", "public 4", "public 5"],
        ),
    ] {
        let mut got: Vec<String> = g
            .direct(1)
            .await
            .query(&format!("SELECT v FROM {table}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        got.sort();
        let mut rows = rows;
        rows.sort();
        assert_eq!(got, rows, "{table} on n2");
    }
    assert_identical(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nondeterministic_writes_are_identical_or_refused() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute(
        "CREATE TABLE stamped (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), d date DEFAULT CURRENT_DATE);
         CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
         CREATE TABLE src (v text);
         INSERT INTO src VALUES ('x'), ('y');",
    )
    .await
    .unwrap();
    for i in 0..5 {
        c.execute("INSERT INTO stamped DEFAULT VALUES", &[])
            .await
            .unwrap();
        // Rolled-back inserts consume sequence numbers on the primary only.
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("INSERT INTO stamped DEFAULT VALUES", &[])
            .await
            .unwrap();
        c.execute("INSERT INTO ident (v) VALUES ($1)", &[&format!("r{i}")])
            .await
            .unwrap();
        c.batch_execute("ROLLBACK").await.unwrap();
        c.execute("INSERT INTO ident (v) VALUES ($1)", &[&format!("v{i}")])
            .await
            .unwrap();
        c.execute(
            "UPDATE stamped SET at = now() WHERE id = (SELECT max(id) FROM stamped)",
            &[],
        )
        .await
        .unwrap();
    }
    c.execute("INSERT INTO ident (v) SELECT v FROM src ORDER BY v", &[])
        .await
        .unwrap();
    // The table catalog is reloaded shortly after the DDL above.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (sql, construct) in [
        ("INSERT INTO ident (v) SELECT v FROM src", "ORDER BY"),
        (
            "ALTER TABLE src ADD COLUMN u uuid DEFAULT gen_random_uuid()",
            "gen_random_uuid",
        ),
        ("UPDATE src SET v = md5(random()::text)", "random"),
        (
            "UPDATE src SET v = clock_timestamp()::text WHERE v > 'a'",
            "UPDATE",
        ),
        (
            "INSERT INTO stamped (at) SELECT clock_timestamp() FROM src",
            "clock_timestamp",
        ),
        (
            "CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.at := clock_timestamp(); RETURN NEW; END $$",
            "clock_timestamp",
        ),
        (
            "DELETE FROM src WHERE v = current_setting('app.who')",
            "current_setting",
        ),
        (
            "DELETE FROM src WHERE v IN (SELECT v FROM src LIMIT 1)",
            "ORDER BY",
        ),
        // Ordered beyond the DISTINCT ON list, but rows may still tie.
        (
            "INSERT INTO src SELECT DISTINCT ON (v) v || id FROM ident ORDER BY v, length(v)",
            "DISTINCT ON",
        ),
        // src has no unique key: one ident row may match several.
        (
            "UPDATE ident SET v = src.v FROM src WHERE src.v = ident.v",
            "UPDATE … FROM",
        ),
        // Ordered, but rows may tie.
        (
            "CREATE TABLE numbered_src AS SELECT v, row_number() OVER (ORDER BY length(v)) FROM src",
            "row_number",
        ),
        (
            "INSERT INTO src SELECT string_agg(v, ',' ORDER BY length(v)) FROM src",
            "string_agg",
        ),
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        let text = db_text(&e);
        assert!(
            text.starts_with("0A000") && text.contains(construct),
            "{sql}: {text}"
        );
    }
    // Reads that call volatile built-ins change nothing: they run (on the
    // primary) and are not logged; they used to be refused as writes.
    let head = |s: serde_json::Value| s["groups"][0]["head_seq"].as_u64();
    let before = head(g.proxy.status().await);
    for sql in [
        "SELECT gen_random_uuid() IS NOT NULL",
        "SELECT random() < 2, clock_timestamp() IS NOT NULL",
        "SELECT txid_current() > 0",
        "SELECT currval('stamped_id_seq') > 0",
    ] {
        let row = c.query_one(sql, &[]).await.unwrap();
        assert!(row.get::<_, bool>(0), "{sql}");
        c.batch_execute(sql).await.unwrap();
    }
    assert_eq!(head(g.proxy.status().await), before);
    // Orders without ties, and a function that gives tied rows one value.
    c.batch_execute(
        "CREATE TABLE ranked AS SELECT id, row_number() OVER (ORDER BY v, id) AS n, \
         rank() OVER (ORDER BY v) AS r, (SELECT string_agg(v, ',' ORDER BY v) FROM src) AS s \
         FROM ident",
    )
    .await
    .unwrap();
    // Joined on the source's key, one row matches: it runs.
    c.batch_execute("UPDATE src SET v = i.v FROM ident i WHERE i.id = 1 AND src.v = 'y'")
        .await
        .unwrap();
    // The session still works after refusals.
    c.execute("INSERT INTO stamped DEFAULT VALUES", &[])
        .await
        .unwrap();
    // A setting of this session (set_config, a startup parameter) written
    // into a row: the primary's value is captured (the replay's session
    // has neither; it used to write '' there).
    c.batch_execute("SELECT set_config('app.who', 'alice', false)")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO src VALUES (current_setting('app.who') || '@')")
        .await
        .unwrap();
    assert_identical(&g).await;
    let who: i64 = g
        .direct(2)
        .await
        .query_one("SELECT count(*) FROM src WHERE v = 'alice@'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, 1);
    // A sequence restarted elsewhere than its start: the replay used to
    // set it back to its start (and stop on a duplicate key).
    c.batch_execute(
        "CREATE TABLE restarted (id serial PRIMARY KEY, v text); INSERT INTO restarted (v) VALUES ('a')",
    )
    .await
    .unwrap();
    c.batch_execute("ALTER SEQUENCE restarted_id_seq RESTART WITH 100")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO restarted (v) VALUES ('b'), ('c')")
        .await
        .unwrap();
    assert_identical(&g).await;
    assert_eq!(ids_on(&g, 2, "restarted").await, [1, 100, 101]);
    // Numbers from a sequence given to rows in the order a statement reads
    // them: that order differs between copies (here: n2's rows clustered
    // in reverse), so they are captured by row or refused.
    c.batch_execute(
        "CREATE TABLE numbered (id int PRIMARY KEY, rev int, n bigint);
         CREATE INDEX numbered_rev ON numbered (rev); CREATE SEQUENCE numbers;",
    )
    .await
    .unwrap();
    c.batch_execute(
        "INSERT INTO numbered (id, rev) SELECT g, 100 - g FROM generate_series(1, 50) g",
    )
    .await
    .unwrap();
    wait_caught_up(&g, &[1, 2], Duration::from_secs(10)).await;
    g.direct(1)
        .await
        .batch_execute("CLUSTER numbered USING numbered_rev")
        .await
        .unwrap();
    c.batch_execute("UPDATE numbered SET n = nextval('numbers')")
        .await
        .unwrap();
    for sql in [
        "ALTER TABLE numbered ADD COLUMN m serial",
        "ALTER TABLE numbered ADD COLUMN m int GENERATED ALWAYS AS IDENTITY",
        "INSERT INTO src (v) SELECT nextval('numbers')::text FROM numbered",
        // Aggregates and window functions that depend on the row order.
        "INSERT INTO src (v) SELECT string_agg(id::text, ',') FROM numbered",
        "INSERT INTO src (v) SELECT row_number() OVER ()::text FROM numbered",
        "INSERT INTO src (v) SELECT DISTINCT ON (rev % 5) id::text FROM numbered ORDER BY rev % 5",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
    }
    c.batch_execute(
        "INSERT INTO src (v) SELECT string_agg(id::text, ',' ORDER BY id) FROM numbered;
         INSERT INTO src (v) SELECT (row_number() OVER (ORDER BY id) * 1000 + id)::text FROM numbered",
    )
    .await
    .unwrap();
    assert_identical(&g).await;
    // A row trigger that numbers what it logs runs for the rows in the
    // order the statement visits them; and a serial table's INSERT …
    // SELECT numbers rows in the order read. Both are checked even right
    // after the DDL, before the table catalog is reloaded.
    c.batch_execute(
        "CREATE TABLE numbered_log (id serial PRIMARY KEY, numbered_id int);
         CREATE FUNCTION log_numbered() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO numbered_log (numbered_id) VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER numbered_logged AFTER UPDATE ON numbered
           FOR EACH ROW EXECUTE FUNCTION log_numbered();
         CREATE TABLE renumbered (id serial PRIMARY KEY, numbered_id int);",
    )
    .await
    .unwrap();
    for sql in [
        "UPDATE numbered SET rev = rev",
        "INSERT INTO renumbered (numbered_id) SELECT id FROM numbered",
        // An ORDER BY that leaves ties (rev % 3 repeats) numbers or picks
        // the tied rows in storage order.
        "INSERT INTO renumbered (numbered_id) SELECT id FROM numbered ORDER BY rev % 3",
        "DELETE FROM numbered WHERE id IN (SELECT id FROM numbered ORDER BY rev % 3 LIMIT 5)",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
    }
    c.batch_execute(
        "UPDATE numbered SET rev = rev WHERE id = 7;
         INSERT INTO renumbered (numbered_id) SELECT id FROM numbered ORDER BY id;
         INSERT INTO renumbered (numbered_id) SELECT rev % 3 FROM numbered ORDER BY rev % 3;
         INSERT INTO renumbered (numbered_id) SELECT g * 10 FROM generate_series(1, 3) g ORDER BY g;
         DELETE FROM renumbered WHERE id IN
           (SELECT id FROM renumbered ORDER BY numbered_id % 3, id LIMIT 5);",
    )
    .await
    .unwrap();
    // The same for a serial table made in the same query string or
    // transaction (a migration), which the catalog cannot know yet.
    for (setup, write) in [
        (
            "",
            "CREATE TABLE migrated (id serial PRIMARY KEY, numbered_id int); \
             INSERT INTO migrated (numbered_id) SELECT id FROM numbered",
        ),
        (
            "BEGIN; CREATE TABLE migrated (id bigint GENERATED ALWAYS AS IDENTITY, numbered_id int)",
            "INSERT INTO migrated (numbered_id) SELECT id FROM numbered ORDER BY rev % 3",
        ),
    ] {
        if !setup.is_empty() {
            c.batch_execute(setup).await.unwrap();
        }
        let e = c.batch_execute(write).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{write}: {e:?}");
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    c.batch_execute(
        "CREATE TABLE migrated (id serial PRIMARY KEY, numbered_id int); \
         INSERT INTO migrated (numbered_id) SELECT id FROM numbered ORDER BY id",
    )
    .await
    .unwrap();
    // What one server counts or measures for itself.
    for sql in [
        "INSERT INTO src (v) SELECT count(*)::text FROM pg_stat_activity",
        "INSERT INTO src (v) VALUES (pg_database_size(current_database())::text)",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
    }
    assert_identical(&g).await;
    // A cached sequence hands each session values from its own cache,
    // which replay cannot follow.
    for sql in [
        "CREATE SEQUENCE cached CACHE 10",
        "ALTER SEQUENCE restarted_id_seq CACHE 10",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
    }
    // A column default that reads a session setting (an audit column):
    // the insert that leaves it to its default captures the value.
    c.batch_execute(
        "CREATE TABLE audited (id int PRIMARY KEY, who text DEFAULT current_setting('app.who'))",
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO audited (id) VALUES (1)")
        .await
        .unwrap();
    assert_identical(&g).await;
    let who: String = g
        .direct(2)
        .await
        .query_one("SELECT who FROM audited WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "alice");
    // Large objects: the server picks an OID from a counter of its own,
    // which a temporary table (on the primary alone) has moved on there.
    let t = g.proxy.client("app").await;
    t.batch_execute("CREATE TEMP TABLE moves_the_oid_counter (a int)")
        .await
        .unwrap();
    t.batch_execute("CREATE TABLE docs (id int PRIMARY KEY, body oid)")
        .await
        .unwrap();
    for sql in [
        "INSERT INTO docs VALUES (1, lo_from_bytea(0, 'one'))",
        "SELECT lo_create(0)",
        "SELECT lo_import('/etc/hostname')",
    ] {
        let e = t.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
    }
    t.batch_execute("INSERT INTO docs VALUES (2, lo_from_bytea(424242, 'two'))")
        .await
        .unwrap();
    assert_identical(&g).await;
    for i in 0..3 {
        let body: Vec<u8> = g
            .direct(i)
            .await
            .query_one("SELECT lo_get(body) FROM docs WHERE id = 2", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(body, b"two", "n{}", i + 1);
    }
    // `SET col = DEFAULT` where the default differs between copies: the
    // default's values are captured by row (keyed), or refused without a key.
    // Writes in the same query string or transaction as the definition of
    // such a default: the catalog cannot know it yet, so they are refused
    // (they used to run with each copy's own values).
    for (setup, write) in [
        (
            "",
            "CREATE TABLE early (id int PRIMARY KEY, tok uuid DEFAULT gen_random_uuid()); \
             INSERT INTO early (id) VALUES (1)",
        ),
        (
            "BEGIN; CREATE TABLE early (id int PRIMARY KEY, tok uuid DEFAULT gen_random_uuid())",
            "INSERT INTO early (id) VALUES (1)",
        ),
        (
            "BEGIN; CREATE TABLE early (id int PRIMARY KEY, tok uuid); \
             ALTER TABLE early ALTER COLUMN tok SET DEFAULT gen_random_uuid()",
            "INSERT INTO early (id) VALUES (1)",
        ),
    ] {
        if !setup.is_empty() {
            t.batch_execute(setup).await.unwrap();
        }
        let e = t.batch_execute(write).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{write}: {e:?}");
        t.batch_execute("ROLLBACK").await.unwrap();
    }
    t.batch_execute(
        "CREATE TABLE tokens (id int PRIMARY KEY, tok uuid DEFAULT gen_random_uuid());
         CREATE TABLE keyless (n int, tok uuid);
         ALTER TABLE keyless ALTER COLUMN tok SET DEFAULT gen_random_uuid();",
    )
    .await
    .unwrap();
    t.batch_execute(
        "INSERT INTO tokens (id, tok) SELECT g, NULL FROM generate_series(1, 20) g ORDER BY g;
         INSERT INTO keyless (n, tok) VALUES (1, NULL), (2, NULL);",
    )
    .await
    .unwrap();
    // And once committed, an insert in one string with another table's
    // definition is captured as usual.
    t.batch_execute("CREATE TABLE other (a int); INSERT INTO tokens (id) VALUES (21), (22)")
        .await
        .unwrap();
    t.batch_execute("UPDATE tokens SET tok = DEFAULT WHERE id > 5")
        .await
        .unwrap();
    let e = t
        .batch_execute("UPDATE keyless SET tok = DEFAULT")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    assert_identical(&g).await;
}

/// Two transactions that hold the write lock shared (row-local writes)
/// and then both need it exclusive deadlock; PostgreSQL picks one. That
/// one's client is told the deadlock (40P01, which drivers retry), not the
/// "transaction is aborted" its statement met behind the failed lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_deadlock_reaches_the_client_as_40p01() {
    let g = TestGroup::start(3, |_| {}).await;
    let c1 = g.proxy.client("app").await;
    let c2 = g.proxy.client("app").await;
    c1.batch_execute(
        "CREATE TABLE locked (id int PRIMARY KEY, v int);
         INSERT INTO locked VALUES (1, 0), (2, 0);",
    )
    .await
    .unwrap();
    c1.batch_execute("BEGIN; UPDATE locked SET v = v WHERE id = 1")
        .await
        .unwrap();
    c2.batch_execute("BEGIN; UPDATE locked SET v = v WHERE id = 2")
        .await
        .unwrap();
    let first = tokio::spawn(async move {
        let r = c1.batch_execute("UPDATE locked SET v = v + 1").await;
        (c1, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = c2.batch_execute("UPDATE locked SET v = v + 10").await;
    let (c1, first) = first.await.unwrap();
    let (ok, failed, loser) = match (&first, &second) {
        (Ok(()), Err(e)) => (&c1, &c2, e),
        (Err(e), Ok(())) => (&c2, &c1, e),
        other => panic!("one of them must lose the deadlock: {other:?}"),
    };
    assert_eq!(sqlstate(loser), "40P01", "{loser:?}");
    failed.batch_execute("ROLLBACK").await.unwrap();
    ok.batch_execute("COMMIT").await.unwrap();
    assert_identical(&g).await;
}

/// What PostgreSQL reports at the commit of an autocommit write reaches
/// the client as it is, though the proxy commits that transaction itself:
/// a deferred constraint's violation with its own SQLSTATE (it used to
/// arrive as XX000 "could not log the transaction"), a deferred trigger's
/// NOTICE and the session's own NOTIFY (both used to be swallowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_happens_at_an_autocommit_writes_commit_reaches_the_client() {
    use futures_util::StreamExt;
    let g = TestGroup::start(3, |_| {}).await;
    let (client, mut connection) =
        tokio_postgres::connect(&g.proxy.url("app"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let seen = match m {
                tokio_postgres::AsyncMessage::Notice(n) => format!("notice: {}", n.message()),
                tokio_postgres::AsyncMessage::Notification(n) => {
                    format!("notification: {} {}", n.channel(), n.payload())
                }
                _ => continue,
            };
            let _ = tx.send(seen);
        }
    });
    client
        .batch_execute(
            "CREATE TABLE parent (id int PRIMARY KEY);
             CREATE TABLE child (id int PRIMARY KEY,
                 p int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);
             CREATE FUNCTION said() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE NOTICE 'deferred trigger ran for %', NEW.id; RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER parent_said AFTER INSERT ON parent
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION said();",
        )
        .await
        .unwrap();
    for (how, r) in [
        (
            "simple",
            client
                .simple_query("INSERT INTO child VALUES (1, 42)")
                .await
                .map(drop),
        ),
        (
            "extended",
            client
                .execute("INSERT INTO child VALUES ($1, 43)", &[&2i32])
                .await
                .map(drop),
        ),
    ] {
        let e = r.expect_err(how);
        assert_eq!(sqlstate(&e), "23503", "{how}: {e:?}");
        assert!(db_text(&e).contains("child_p_fkey"), "{how}: {e:?}");
    }
    // In a simple Query PostgreSQL commits before it completes the last
    // statement: a failed commit sends no CommandComplete for it (it used
    // to arrive, "INSERT 0 1", before the error). Earlier statements of
    // the string complete as they run.
    let mut raw = Raw::connect(&g.proxy).await;
    for (sql, tags) in [
        ("INSERT INTO child VALUES (3, 44)", vec!["ZI"]),
        (
            "INSERT INTO parent VALUES (20); INSERT INTO child VALUES (4, 45)",
            vec!["INSERT 0 1", "ZI"],
        ),
        ("INSERT INTO parent VALUES (21)", vec!["INSERT 0 1", "ZI"]),
    ] {
        let mut out = Vec::new();
        Raw::msg(&mut out, b'Q', format!("{sql}\0").as_bytes());
        raw.send(&out).await;
        let got = raw.until(b'Z').await;
        let failed = tags.len() < sql.split(';').count() + 1;
        assert_eq!(tags_in(&got), tags, "{sql}: {got:?}");
        assert_eq!(error_in(&got).is_some(), failed, "{sql}: {got:?}");
    }
    // The session goes on; the rows that failed are nowhere.
    client
        .batch_execute("INSERT INTO parent VALUES (7)")
        .await
        .unwrap();
    client.batch_execute("LISTEN ch; ").await.unwrap();
    client.batch_execute("NOTIFY ch, 'own'").await.unwrap();
    client
        .execute("INSERT INTO parent VALUES ($1)", &[&8i32])
        .await
        .unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        seen.push(m);
    }
    assert_eq!(
        seen,
        [
            "notice: deferred trigger ran for 7",
            "notification: ch own",
            "notice: deferred trigger ran for 8",
        ]
    );
    assert_identical(&g).await;
    for i in 0..3 {
        let n: i64 = g
            .direct(i)
            .await
            .query_one("SELECT count(*) FROM child", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "node {i}");
    }
}

/// A session that sets a role writes as that role, on every copy (its
/// writes used to fail: the log append ran as that role, without rights on
/// the reprise schema); the next session's entries replay as its own user,
/// not the role a previous entry set. So does a session that sets its
/// session authorization. A session that DISCARDs ALL and then
/// writes leaves the subscribers replaying (DISCARD ALL, replayed inside
/// the entry's transaction, failed there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_discard_all_replicate() {
    let g = TestGroup::start(3, |_| {}).await;
    let admin = g.proxy.client("app").await;
    admin
        .batch_execute(
            "CREATE ROLE bob; CREATE SCHEMA bobs AUTHORIZATION bob;
             CREATE ROLE carol; CREATE SCHEMA carols AUTHORIZATION carol;
             CREATE TABLE roles_t (id int PRIMARY KEY, n serial);
             GRANT ALL ON roles_t, roles_t_n_seq TO bob, carol;",
        )
        .await
        .unwrap();
    let bob = g.proxy.client("app").await;
    bob.batch_execute("SET ROLE bob").await.unwrap();
    bob.batch_execute("INSERT INTO roles_t (id) VALUES (1)")
        .await
        .unwrap();
    bob.execute("INSERT INTO roles_t (id) VALUES ($1)", &[&2i32])
        .await
        .unwrap();
    bob.batch_execute("CREATE TABLE bobs.mine (id int)")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE TABLE theirs (id int); INSERT INTO roles_t (id) VALUES (3)")
        .await
        .unwrap();
    // The proxy's user (a superuser) acting as another user, as a restore
    // script made with pg_dump --use-set-session-authorization does: the
    // log is still written, with the sequence states (a rolled-back insert
    // took a number on the primary alone).
    let carol = g.proxy.client("app").await;
    carol
        .batch_execute("SET SESSION AUTHORIZATION carol")
        .await
        .unwrap();
    carol
        .batch_execute("BEGIN; INSERT INTO roles_t (id) VALUES (50); ROLLBACK")
        .await
        .unwrap();
    carol
        .batch_execute("INSERT INTO roles_t (id) VALUES (5); CREATE TABLE carols.hers (id int)")
        .await
        .unwrap();
    let reset = g.proxy.client("app").await;
    reset.batch_execute("SET search_path = bobs").await.unwrap();
    reset.batch_execute("DISCARD ALL").await.unwrap();
    reset
        .batch_execute("INSERT INTO roles_t (id) VALUES (4)")
        .await
        .unwrap();
    wait_caught_up(&g, &[1, 2], Duration::from_secs(10)).await;
    assert_identical(&g).await;
    for i in 0..3 {
        let c = g.direct(i).await;
        let owners = c
            .query(
                "SELECT tablename::text, tableowner::text FROM pg_tables
                 WHERE tablename IN ('mine', 'theirs', 'hers') ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        let owners: Vec<(String, String)> = owners.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            owners,
            [
                ("hers".to_string(), "carol".to_string()),
                ("mine".to_string(), "bob".to_string()),
                ("theirs".to_string(), "postgres".to_string())
            ],
            "node {i}"
        );
        assert_eq!(ids_on(&g, i, "roles_t").await, [1, 2, 3, 4, 5], "node {i}");
    }
}

/// Two-phase commit: a write transaction cannot be prepared (it would hold
/// the commit-order lock, and its entry would reach the subscribers before
/// COMMIT PREPARED decided it); the client is told why and nothing of it
/// stays. A transaction that only read is prepared and committed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_transaction_cannot_be_prepared_for_two_phase_commit() {
    let g =
        TestGroup::start_with_settings(2, SEED_SQL, &[("max_prepared_transactions", "4")], |_| {})
            .await;
    let c = g.proxy.client("app").await;
    c.batch_execute("CREATE TABLE twophase (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.batch_execute("BEGIN; SELECT count(*) FROM twophase")
        .await
        .unwrap();
    c.batch_execute("PREPARE TRANSACTION 'reads'")
        .await
        .unwrap();
    c.batch_execute("COMMIT PREPARED 'reads'").await.unwrap();
    let (_, _, head) = log_extent(&g, 0).await;
    for prepare in [
        "PREPARE TRANSACTION 'writes'",
        "SELECT 1; PREPARE TRANSACTION 'writes'",
    ] {
        c.batch_execute("BEGIN; INSERT INTO twophase VALUES (1)")
            .await
            .unwrap();
        let e = c.batch_execute(prepare).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{e:?}");
        // (PostgreSQL would refuse it too, for the NOTIFY of the log
        // append: a reason the client could not make sense of.)
        assert!(db_text(&e).contains("two-phase commit"), "{e:?}");
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    c.batch_execute("INSERT INTO twophase VALUES (2)")
        .await
        .unwrap();
    let prepared: i64 = g
        .direct(0)
        .await
        .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(prepared, 0);
    assert_eq!(log_extent(&g, 0).await.2, head + 1);
    wait_caught_up(&g, &[1], Duration::from_secs(10)).await;
    assert_identical(&g).await;
    for i in 0..2 {
        assert_eq!(ids_on(&g, i, "twophase").await, [2], "n{}", i + 1);
    }
}

/// Savepoints (as ORMs nest transactions) change no data: a transaction
/// that only reads between them takes no write lock and logs nothing, one
/// holding the lock shared keeps it shared (two such transactions used to
/// deadlock upgrading it), and a savepoint set before the first write is
/// still there to roll back to on every copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_need_no_write_lock_of_their_own() {
    let g = TestGroup::start(3, |_| {}).await;
    let c1 = g.proxy.client("app").await;
    let c2 = g.proxy.client("app").await;
    c1.batch_execute(
        "CREATE TABLE nested (id int PRIMARY KEY, v int);
         INSERT INTO nested VALUES (1, 0), (2, 0);",
    )
    .await
    .unwrap();
    let (_, _, head) = log_extent(&g, 0).await;
    c1.batch_execute("BEGIN; SAVEPOINT a; SELECT * FROM nested; RELEASE a; COMMIT")
        .await
        .unwrap();
    c1.batch_execute("BEGIN").await.unwrap();
    c1.execute("SAVEPOINT b", &[]).await.unwrap();
    c1.query("SELECT v FROM nested WHERE id = $1", &[&1])
        .await
        .unwrap();
    c1.execute("ROLLBACK TO SAVEPOINT b", &[]).await.unwrap();
    c1.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        log_extent(&g, 0).await.2,
        head,
        "read-only blocks log nothing"
    );

    // Two row-local transactions each set a savepoint while the other
    // holds the lock shared.
    c1.batch_execute("BEGIN; UPDATE nested SET v = v + 1 WHERE id = 1")
        .await
        .unwrap();
    c2.batch_execute("BEGIN; UPDATE nested SET v = v + 1 WHERE id = 2")
        .await
        .unwrap();
    let (r1, r2) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(
            c1.batch_execute("SAVEPOINT s1; UPDATE nested SET v = v + 10 WHERE id = 1"),
            c2.batch_execute("SAVEPOINT s2; UPDATE nested SET v = v + 10 WHERE id = 2")
        )
    })
    .await
    .expect("neither waits for the other");
    r1.unwrap();
    r2.unwrap();
    let modes = c1
        .query(
            "SELECT mode FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let modes: Vec<String> = modes.iter().map(|r| r.get(0)).collect();
    assert_eq!(modes, ["ShareLock"]);
    c1.batch_execute("ROLLBACK TO s1; COMMIT").await.unwrap();
    c2.batch_execute("COMMIT").await.unwrap();

    // A savepoint before the first write, a failed ROLLBACK TO while
    // nothing is written yet, then writes undone back to it.
    c1.batch_execute("BEGIN; SAVEPOINT first").await.unwrap();
    assert!(c1.batch_execute("ROLLBACK TO nowhere").await.is_err());
    c1.batch_execute(
        "ROLLBACK TO first; UPDATE nested SET v = v + 100 WHERE id = 1;
         SAVEPOINT second; UPDATE nested SET v = v + 100 WHERE id = 2;
         ROLLBACK TO first; UPDATE nested SET v = v + 1000 WHERE id = 2; COMMIT",
    )
    .await
    .unwrap();
    assert_identical(&g).await;
    for i in 0..3 {
        let rows = g
            .direct(i)
            .await
            .query("SELECT v FROM nested ORDER BY id", &[])
            .await
            .unwrap();
        let v: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(v, [1, 1011], "node {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_statement_aborts_the_transaction_block_like_any_error() {
    let g = TestGroup::start(2, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute("CREATE TABLE tt (id int PRIMARY KEY, v float8)")
        .await
        .unwrap();
    let refused = "INSERT INTO tt SELECT 2, random() FROM (VALUES (1)) v";
    let code = |r: Result<(), tokio_postgres::Error>| r.map_err(|e| sqlstate(&e)).err();

    // The block fails: what follows is ignored, COMMIT rolls back.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("INSERT INTO tt VALUES (1, 1)")
        .await
        .unwrap();
    // As Reprise makes it, with no trace of how the node was made to raise
    // it (it used to carry a CONTEXT line of a PL/pgSQL block).
    let e = c.batch_execute(refused).await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "0A000", "{e:?}");
    assert_eq!(db.where_(), None, "{e:?}");
    assert_eq!(db.file(), None, "{e:?}");
    assert_eq!(
        code(c.batch_execute("INSERT INTO tt VALUES (3, 3)").await).as_deref(),
        Some("25P02")
    );
    // Prepared statements too.
    assert_eq!(
        c.execute("SELECT $1::int", &[&1])
            .await
            .map_err(|e| sqlstate(&e))
            .err()
            .as_deref(),
        Some("25P02")
    );
    // (PostgreSQL answers it with ROLLBACK, not an error.)
    c.batch_execute("COMMIT").await.unwrap();

    // Through the extended protocol, and recovered with a savepoint.
    c.batch_execute("BEGIN; INSERT INTO tt VALUES (11, 1); SAVEPOINT a")
        .await
        .unwrap();
    let e = c
        .execute(
            "INSERT INTO tt SELECT $1, random() FROM (VALUES (1)) v",
            &[&12i32],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    c.batch_execute("ROLLBACK TO a; INSERT INTO tt VALUES (13, 1); COMMIT")
        .await
        .unwrap();

    // A query string runs up to the refused statement, as up to an error:
    // the first block commits, the second is left failed.
    let e = c
        .batch_execute(&format!(
            "BEGIN; INSERT INTO tt VALUES (21, 1); COMMIT; BEGIN; INSERT INTO tt VALUES (22, 1); {refused}; COMMIT"
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    assert_eq!(
        code(c.batch_execute("SELECT 1").await).as_deref(),
        Some("25P02")
    );
    c.batch_execute("ROLLBACK").await.unwrap();

    // Outside a block a refusal ends nothing: the session goes on.
    assert_eq!(
        code(c.batch_execute(refused).await).as_deref(),
        Some("0A000")
    );
    c.batch_execute("INSERT INTO tt VALUES (31, 1)")
        .await
        .unwrap();

    // Any failed statement that wrote nothing leaves the writes before it
    // in the entry (it used to take out the unit before it).
    c.batch_execute("BEGIN; INSERT INTO tt VALUES (41, 1); SAVEPOINT b")
        .await
        .unwrap();
    assert_eq!(
        code(c.batch_execute("SELECT 1 / 0").await).as_deref(),
        Some("22012")
    );
    c.batch_execute("ROLLBACK TO b; COMMIT").await.unwrap();

    assert_identical(&g).await;
    for i in 0..2 {
        assert_eq!(
            ids_on(&g, i, "tt").await,
            [11, 13, 21, 31, 41],
            "rows on n{}",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepared_statements_replicate_and_sessions_keep_their_own_names() {
    let g = TestGroup::start(3, |_| {}).await;
    let a = g.proxy.client("app").await;
    let b = g.proxy.client("app").await;
    a.batch_execute("CREATE TABLE tp (id int PRIMARY KEY, v text)")
        .await
        .unwrap();

    // Defined, run, dropped and run again (an error) in autocommit: the
    // DEALLOCATE used to stop every subscriber ("does not exist").
    a.batch_execute("PREPARE rd(int) AS SELECT v FROM tp WHERE id = $1")
        .await
        .unwrap();
    a.batch_execute("EXECUTE rd(1); DEALLOCATE rd")
        .await
        .unwrap();
    let e = a.batch_execute("EXECUTE rd(1)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000");

    // Two sessions, one name, different statements, interleaved: each
    // EXECUTE must replay its own session's statement.
    a.batch_execute("PREPARE ins(int) AS INSERT INTO tp VALUES ($1, 'a')")
        .await
        .unwrap();
    b.batch_execute("PREPARE ins(int) AS INSERT INTO tp VALUES ($1, 'b')")
        .await
        .unwrap();
    a.batch_execute("EXECUTE ins(1)").await.unwrap();
    b.batch_execute("EXECUTE ins(2)").await.unwrap();
    a.batch_execute("EXECUTE ins(3)").await.unwrap();

    // In a block: one prepared before it, one inside it, a DEALLOCATE of
    // the first; then the second after the block.
    a.batch_execute(
        "BEGIN; EXECUTE ins(4); PREPARE ins2(int) AS INSERT INTO tp VALUES ($1, 'c'); \
         EXECUTE ins2(5); DEALLOCATE ins; COMMIT",
    )
    .await
    .unwrap();
    a.batch_execute("EXECUTE ins2(6)").await.unwrap();
    // A failed EXECUTE in a block, recovered with a savepoint.
    a.batch_execute("BEGIN; SAVEPOINT s").await.unwrap();
    assert_eq!(
        sqlstate(&a.batch_execute("EXECUTE ins2(5)").await.unwrap_err()),
        "23505"
    );
    a.batch_execute("ROLLBACK TO s; EXECUTE ins2(7); COMMIT")
        .await
        .unwrap();
    // Nondeterministic values in a prepared write are captured like any.
    b.batch_execute("PREPARE rnd(int) AS INSERT INTO tp VALUES ($1, random()::text)")
        .await
        .unwrap();
    b.batch_execute(
        "EXECUTE rnd(8); DEALLOCATE ALL; PREPARE ins(int) AS INSERT INTO tp VALUES ($1, 'd')",
    )
    .await
    .unwrap();
    b.batch_execute("EXECUTE ins(9)").await.unwrap();
    // A PREPARE that failed defined nothing: the next one of that name
    // is the statement entries replay (the failed text used to be kept).
    let e = b
        .batch_execute("PREPARE late(int) AS INSERT INTO tp (id, v, w) VALUES ($1, 'x', 'x')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42703");
    b.batch_execute("PREPARE late(int) AS INSERT INTO tp VALUES ($1, 'e')")
        .await
        .unwrap();
    b.batch_execute("EXECUTE late(10)").await.unwrap();
    // Through the extended protocol (as most drivers send any SQL).
    b.execute("PREPARE ext(int) AS INSERT INTO tp VALUES ($1, 'f')", &[])
        .await
        .unwrap();
    b.execute("EXECUTE ext(11)", &[]).await.unwrap();
    b.execute("DEALLOCATE ext", &[]).await.unwrap();
    b.batch_execute("PREPARE ext(int) AS INSERT INTO tp VALUES ($1, 'g')")
        .await
        .unwrap();
    b.execute("EXECUTE ext(12)", &[]).await.unwrap();

    assert_identical(&g).await;
    for i in 0..3 {
        assert_eq!(
            ids_on(&g, i, "tp").await,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            "rows on n{}",
            i + 1
        );
        let st = g.proxy.status().await;
        let node = &st["groups"][0]["nodes"][i];
        assert_eq!(node["state"], "up", "n{}: {node}", i + 1);
    }
    let v: Vec<String> = g
        .direct(0)
        .await
        .query("SELECT v FROM tp WHERE id <= 3 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(v, ["a", "b", "a"]);
}

/// A statement that captures many values (a multi-row INSERT leaving
/// volatile defaults, an UPDATE of every row with random values) is
/// captured and replayed whole, each value once: the record is kept in
/// chunks, so its size does not multiply the work of each value (one
/// 20,000-row INSERT used to take minutes on the primary and again on each
/// copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_capturing_many_values_replicate_whole() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute(
        "CREATE TABLE many (id int PRIMARY KEY, v text, u uuid DEFAULT gen_random_uuid(), \
         at timestamptz DEFAULT clock_timestamp())",
    )
    .await
    .unwrap();
    let rows = 20_000;
    let values: Vec<String> = (0..rows).map(|i| format!("({i}, 'v{i}')")).collect();
    let insert = format!("INSERT INTO many (id, v) VALUES {}", values.join(", "));
    assert_eq!(c.execute(insert.as_str(), &[]).await.unwrap(), rows as u64);
    // Fewer values than columns, in a transaction with a savepoint.
    let short: Vec<String> = (rows..rows + 5_000).map(|i| format!("({i})")).collect();
    c.batch_execute(&format!(
        "BEGIN; INSERT INTO many VALUES {}; SAVEPOINT s; \
         INSERT INTO many (id) VALUES (-1), (-2); ROLLBACK TO SAVEPOINT s; COMMIT",
        short.join(", ")
    ))
    .await
    .unwrap();
    // Every row a new value, captured by its key.
    c.batch_execute("UPDATE many SET u = gen_random_uuid(), v = v || random()::text")
        .await
        .unwrap();
    let distinct: Vec<String> = strings(
        &c,
        "SELECT concat_ws(' ', count(*), count(DISTINCT u), count(at), count(v)) FROM many",
    )
    .await;
    assert_eq!(distinct, ["25000 25000 25000 20000"]);
    wait_caught_up(&g, &[0, 1, 2], Duration::from_secs(120)).await;
    assert_identical(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_values_in_inserts_are_captured_and_replayed() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute(
        "CREATE TABLE r (id int PRIMARY KEY, u uuid, x float8, at timestamptz, note text)",
    )
    .await
    .unwrap();
    // One prepared statement, many executions: a value per execution.
    let insert = c
        .prepare(
            "INSERT INTO r (id, u, x, at, note) \
             VALUES ($1, gen_random_uuid(), random() * $2, clock_timestamp(), md5(random()::text))",
        )
        .await
        .unwrap();
    for id in 0..20i32 {
        c.execute(&insert, &[&id, &1000.0f64]).await.unwrap();
    }
    // Settings that would lose digits or move times if values were
    // recorded as the session prints them.
    c.batch_execute(
        "SET extra_float_digits = 0; SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Tokyo';
         INSERT INTO r (id, u, x, at) VALUES
             (100, gen_random_uuid(), random(), clock_timestamp()),
             (101, gen_random_uuid(), random(), clock_timestamp());",
    )
    .await
    .unwrap();
    // A failed statement after a savepoint: its values are not replayed.
    c.batch_execute("BEGIN; INSERT INTO r (id, x) VALUES (200, random()); SAVEPOINT s")
        .await
        .unwrap();
    let e = c
        .batch_execute("INSERT INTO r (id, x) VALUES (201, random()), (200, random())")
        .await
        .expect_err("duplicate key");
    assert!(db_text(&e).starts_with("23505"), "{}", db_text(&e));
    c.batch_execute("ROLLBACK TO SAVEPOINT s; INSERT INTO r (id, x) VALUES (202, random())")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    // A session with a temporary table: its own writes are not logged and
    // keep their volatile calls; its logged writes are captured.
    c.batch_execute(
        "CREATE TEMP TABLE scratch (u uuid);
         INSERT INTO scratch VALUES (gen_random_uuid());
         INSERT INTO r (id, u) VALUES (300, gen_random_uuid());",
    )
    .await
    .unwrap();
    // A table made through the proxy with volatile defaults, written at
    // once (the catalog is reloaded after the DDL before the insert runs).
    c.batch_execute(
        "CREATE TABLE d (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), v int, \
         at timestamptz DEFAULT clock_timestamp())",
    )
    .await
    .unwrap();
    let insert_d = c.prepare("INSERT INTO d (v) VALUES ($1)").await.unwrap();
    for v in 0..10i32 {
        c.execute(&insert_d, &[&v]).await.unwrap();
    }
    c.batch_execute("INSERT INTO d DEFAULT VALUES")
        .await
        .unwrap();
    // INSERTs that run inside another statement: a WITH query, EXPLAIN
    // ANALYZE, a PREPAREd statement, COPY of a RETURNING.
    c.batch_execute(
        "WITH x AS (INSERT INTO d (v) VALUES (20) RETURNING id) SELECT count(*) FROM x;
         WITH x AS (INSERT INTO d DEFAULT VALUES RETURNING id) SELECT count(*) FROM x;
         EXPLAIN (ANALYZE, COSTS OFF) INSERT INTO d (v) VALUES (21);
         PREPARE put_d AS INSERT INTO d (v) VALUES ($1);
         EXECUTE put_d(22);",
    )
    .await
    .unwrap();
    let out = c
        .copy_out("COPY (INSERT INTO d (v) VALUES (23) RETURNING v) TO STDOUT")
        .await
        .unwrap();
    let out: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(out).await.unwrap();
    assert_eq!(out.concat(), b"23\n");
    // Values in column order (id, v, at): given, or DEFAULT captured.
    c.batch_execute(
        "INSERT INTO d VALUES ('00000000-0000-0000-0000-000000000001', 30, '2020-01-01');
         INSERT INTO d VALUES (DEFAULT, 31, DEFAULT);",
    )
    .await
    .unwrap();
    // Fewer values than columns: `at`, after the last value, is given its
    // captured default (a VALUES row, or a query in a fixed order).
    c.batch_execute(
        "INSERT INTO d VALUES (DEFAULT, 32);
         INSERT INTO d SELECT gen_random_uuid(), g FROM generate_series(35, 36) g;",
    )
    .await
    .unwrap();
    let insert_d_short = c
        .prepare("INSERT INTO d VALUES ($1::text::uuid)")
        .await
        .unwrap();
    for id in [2, 3] {
        let id = format!("00000000-0000-0000-0000-00000000000{id}");
        c.execute(&insert_d_short, &[&id]).await.unwrap();
    }
    for sql in [
        "INSERT INTO d (v) SELECT v FROM d",
        // Two statements capturing beside each other.
        "WITH x AS (INSERT INTO d (v) VALUES (24) RETURNING id) INSERT INTO d (v) VALUES (25)",
        // A query whose rows come in storage order.
        "INSERT INTO d SELECT gen_random_uuid(), v FROM d",
        "MERGE INTO d USING (VALUES (33)) s (v) ON d.v = s.v \
         WHEN NOT MATCHED THEN INSERT (v) VALUES (s.v)",
        "INSERT INTO d VALUES ('00000000-0000-0000-0000-000000000001', 34, now()) \
         ON CONFLICT (id) DO UPDATE SET at = DEFAULT",
    ] {
        let e = c
            .batch_execute(sql)
            .await
            .expect_err("a default the insert cannot name");
        assert!(db_text(&e).starts_with("0A000"), "{sql}: {}", db_text(&e));
    }
    // Through views: an INSERT leaves out what the table under the view
    // defaults; a column the view does not show cannot be named.
    c.batch_execute(
        "CREATE VIEW dv AS SELECT v, at, id FROM d;
         CREATE VIEW dv_hidden AS SELECT v, id FROM d;",
    )
    .await
    .unwrap();
    c.batch_execute(
        "INSERT INTO dv (v) VALUES (40);
         INSERT INTO dv VALUES (41, DEFAULT, DEFAULT);",
    )
    .await
    .unwrap();
    let e = c
        .batch_execute("INSERT INTO dv_hidden (v) VALUES (42)")
        .await
        .expect_err("a default the view does not show");
    assert!(
        db_text(&e).starts_with("0A000") && db_text(&e).contains("does not show"),
        "{}",
        db_text(&e)
    );
    let distinct: i64 = c
        .query_one("SELECT count(DISTINCT at) FROM d", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 25);
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT u), count(DISTINCT x), count(DISTINCT at) FROM r",
            &[],
        )
        .await
        .unwrap();
    let (n, u, x, at): (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(n, 25);
    assert_eq!(u, 23, "every generated uuid differs");
    assert_eq!(x, 24, "every random() differs");
    assert_eq!(at, 22, "every clock_timestamp() differs");
    // An UPDATE of one row (its WHERE fixes the key) captures too; one
    // that may change several rows is refused.
    let update = c
        .prepare("UPDATE r SET u = gen_random_uuid(), x = random() WHERE id = $1")
        .await
        .unwrap();
    for id in 0..5i32 {
        assert_eq!(c.execute(&update, &[&id]).await.unwrap(), 1);
    }
    c.batch_execute("UPDATE r SET at = clock_timestamp() WHERE id = 100 AND note IS NULL")
        .await
        .unwrap();
    // Several rows of a table with a primary key: each value is recorded
    // under its row's key, so a copy visiting the rows in another order
    // still gets the same values. Here n2 stores rows 0-9 at the end of its
    // heap (a no-op update made directly on it), so its scans meet them
    // last while the primary meets them first.
    wait_caught_up(&g, &[0, 1, 2], Duration::from_secs(30)).await;
    g.direct(1)
        .await
        .batch_execute("UPDATE r SET note = note WHERE id < 10")
        .await
        .unwrap();
    let scan_order = |i: usize| {
        let g = &g;
        async move {
            let c = g.direct(i).await;
            c.batch_execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
                .await
                .unwrap();
            let ids: Vec<i32> = c
                .query("SELECT id FROM r", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            ids
        }
    };
    assert_ne!(
        scan_order(0).await,
        scan_order(1).await,
        "n2 meets the rows in another order"
    );
    c.batch_execute("UPDATE r SET at = clock_timestamp(), x = random()")
        .await
        .unwrap();
    c.batch_execute(
        "UPDATE r SET u = gen_random_uuid() WHERE id >= 5;
         UPDATE r SET x = x + random() WHERE id < 10",
    )
    .await
    .unwrap();
    // Without a row key the rows cannot be told apart: refused.
    c.batch_execute("CREATE TABLE nokey (v int, x float8); INSERT INTO nokey (v) VALUES (1), (2)")
        .await
        .unwrap();
    for sql in [
        "UPDATE nokey SET x = random()",
        "UPDATE r SET x = random() FROM nokey WHERE nokey.v = r.id",
    ] {
        let e = c.batch_execute(sql).await.expect_err(sql);
        let text = db_text(&e);
        assert!(
            text.starts_with("0A000") && text.contains("UPDATE"),
            "{sql}: {text}"
        );
    }
    let row = c
        .query_one(
            "SELECT count(DISTINCT u), count(DISTINCT x), count(DISTINCT at) FROM r",
            &[],
        )
        .await
        .unwrap();
    let (u, x, at): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((u, x, at), (25, 25, 25), "a value per row");
    // Values taken in a part rolled back to a savepoint are not recorded;
    // the replay takes its own there, and rolls them back too.
    c.batch_execute(
        "BEGIN; UPDATE r SET x = random() WHERE id = 0; SAVEPOINT k;
         UPDATE r SET x = random() WHERE id = 1;
         INSERT INTO r (id, x) VALUES (900, random());
         ROLLBACK TO SAVEPOINT k; COMMIT",
    )
    .await
    .unwrap();
    assert_identical(&g).await;
    // Outside such a part, a value the entry did not record fails the
    // replay at its end.
    let n2 = g.direct(1).await;
    let check = |asks: &'static str| {
        format!(
            "BEGIN; SET LOCAL reprise.replay_values = '{{\"values\": [], \"keyed\": {{}}}}';
             SET LOCAL reprise.replay_pos = '0'; SAVEPOINT s; SELECT reprise.captured(1); SELECT reprise.captured_keyed(2, 'r:(2)');
             ROLLBACK TO SAVEPOINT s; {asks} SELECT reprise.replay_check(); ROLLBACK"
        )
    };
    n2.batch_execute(&check("")).await.unwrap();
    for asks in [
        "SELECT reprise.captured(1);",
        "SELECT reprise.captured_keyed(2, 'r:(2)');",
    ] {
        let e = n2.batch_execute(&check(asks)).await.expect_err(asks);
        assert!(db_text(&e).starts_with("XX000"), "{asks}: {}", db_text(&e));
        n2.batch_execute("ROLLBACK").await.unwrap();
    }
    // Each entry's hash covers the values captured with it.
    let (wrong, captured): (i64, i64) = {
        let row = g
            .direct(0)
            .await
            .query_one(
                "SELECT count(*) FILTER (WHERE hash <> encode(sha256(convert_to(prev_hash, 'UTF8') \
                 || payload || convert_to(coalesce(captured, ''), 'UTF8')), 'hex')), \
                 count(*) FILTER (WHERE captured IS NOT NULL) FROM reprise.log",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(wrong, 0);
    assert!(captured > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_ddl_settings_and_read_your_writes() {
    let g = TestGroup::start(3, |_| {}).await;
    let url = g.proxy.url("app");
    let (ok, out, err) = psql(
        &url,
        "CREATE SCHEMA s2; SET search_path = s2, public;\n\
         CREATE TABLE kv (k int PRIMARY KEY, v text);\n\
         COPY kv FROM STDIN;\n1\tone\n2\ttwo\n3\tthree\n\\.\n\
         CREATE INDEX kv_v ON kv (v); CREATE VIEW kv2 AS SELECT k * 2 AS k2 FROM kv;\n\
         CREATE SEQUENCE sq; SELECT nextval('sq'); SELECT nextval('sq');\n\
         SELECT count(*) FROM kv;\n",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1\n2\n3");
    // Settings made with set_config, as pg_dump's output makes them, are
    // replayed like SET.
    let (ok, _, err) = psql(
        &url,
        "SELECT pg_catalog.set_config('search_path', 's2', false);\n\
         SELECT set_config('TimeZone', 'Asia/Tokyo', false), set_config('DateStyle', 'SQL, DMY', false);\n\
         CREATE TABLE stamps (id int PRIMARY KEY, at timestamptz, d date);\n\
         INSERT INTO stamps VALUES (1, '01/02/2020 00:00', '03/04/2020');\n",
    );
    assert!(ok, "{err}");
    wait_caught_up(&g, &[1, 2], Duration::from_secs(10)).await;
    for i in 0..3 {
        let row = g
            .direct(i)
            .await
            .query_one(
                "SELECT extract(epoch FROM at)::bigint, d::text FROM s2.stamps",
                &[],
            )
            .await
            .unwrap();
        let (at, d): (i64, String) = (row.get(0), row.get(1));
        assert_eq!((at, d.as_str()), (1_580_482_800, "2020-04-03"), "node {i}");
    }
    // So are settings whose values come as Bind parameters (how drivers
    // that cannot bind SET's value set search_path): in binary from
    // tokio-postgres, in text from a hand-written Bind.
    let b = g.proxy.client("app").await;
    b.query("SELECT set_config('search_path', $1, false)", &[&"s2"])
        .await
        .unwrap();
    b.query(
        "SELECT set_config($1::text, $2, false)",
        &[&"TimeZone", &"America/New_York"],
    )
    .await
    .unwrap();
    b.execute(
        "INSERT INTO stamps VALUES (2, '2020-01-01 00:00', NULL)",
        &[],
    )
    .await
    .unwrap();
    // A NULL value resets the setting to its default, on every copy.
    b.query("SELECT set_config('TimeZone', $1, false)", &[&None::<&str>])
        .await
        .unwrap();
    b.batch_execute(
        "SELECT set_config('DateStyle', NULL, false);
         INSERT INTO stamps VALUES (4, '2020-01-01 00:00', '2020-05-06')",
    )
    .await
    .unwrap();
    let mut raw = Raw::connect(&g.proxy).await;
    let mut out = Vec::new();
    Raw::parse(&mut out, "", "SELECT set_config('TimeZone', $1, false)");
    Raw::bind(&mut out, "", &["UTC"]);
    Raw::execute(&mut out);
    Raw::msg(&mut out, b'S', b"");
    raw.send(&out).await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got), None, "{got:?}");
    let mut out = Vec::new();
    Raw::msg(
        &mut out,
        b'Q',
        b"SET search_path = s2, public; INSERT INTO stamps VALUES (3, '2020-01-01 00:00', NULL)\0",
    );
    raw.send(&out).await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got), None, "{got:?}");
    // RESET puts a setting back to the client's startup value, which the
    // replay's session does not have as its default.
    let (ok, _, err) = psql(
        &format!("{url}?options=-c%20TimeZone%3DAmerica%2FNew_York"),
        "SET search_path = s2; SET TimeZone = 'UTC'; RESET TimeZone;\n\
         INSERT INTO stamps VALUES (5, '2020-01-01 00:00', NULL);\n\
         SET TimeZone = 'UTC'; RESET ALL;\n\
         INSERT INTO s2.stamps VALUES (6, '2020-01-01 00:00', NULL);\n",
    );
    assert!(ok, "{err}");
    wait_caught_up(&g, &[1, 2], Duration::from_secs(10)).await;
    let mut reset_to_default = Vec::new();
    for i in 0..3 {
        let rows = g
            .direct(i)
            .await
            .query(
                "SELECT id, extract(epoch FROM at)::bigint FROM s2.stamps WHERE id > 1 ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        let got: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            got[..2],
            [(2, 1_577_854_800), (3, 1_577_836_800)],
            "node {i}"
        );
        reset_to_default.push(got[2]);
        assert_eq!(
            got[3..],
            [(5, 1_577_854_800), (6, 1_577_854_800)],
            "node {i}"
        );
    }
    // The nodes' default time zone (not New York's) on every copy.
    assert!(
        reset_to_default.iter().all(|r| *r == reset_to_default[0])
            && reset_to_default[0].1 != 1_577_854_800,
        "{reset_to_default:?}"
    );
    // A session that wrote reads its write at once, wherever the read goes.
    let c = g.proxy.client("app").await;
    for i in 0..30 {
        c.execute("INSERT INTO notes (body) VALUES ($1)", &[&format!("n{i}")])
            .await
            .unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM notes WHERE body = $1",
                &[&format!("n{i}")],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "read-your-writes");
    }
    // COPY to a file on the server writes it there, from the primary
    // alone: no entry makes every copy write it again. COPY from a file
    // or program on the server is refused: each copy would read its own.
    let file = std::env::temp_dir().join(format!("reprise-copy-{}.tsv", std::process::id()));
    let _ = std::fs::remove_file(&file);
    wait_caught_up(&g, &[1, 2], Duration::from_secs(10)).await;
    let (_, _, head) = log_extent(&g, 0).await;
    c.batch_execute(&format!("COPY s2.kv TO '{}'", file.display()))
        .await
        .unwrap();
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written, "1\tone\n2\ttwo\n3\tthree\n");
    assert_eq!(
        log_extent(&g, 0).await.2,
        head,
        "COPY TO a file is not logged"
    );
    for from in [
        format!("'{}'", file.display()),
        "PROGRAM 'cat /dev/null'".into(),
    ] {
        let e = c
            .batch_execute(&format!("COPY s2.kv FROM {from}"))
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{from}: {e:?}");
        assert!(db_text(&e).contains("COPY … FROM STDIN"), "{from}: {e:?}");
    }
    let _ = std::fs::remove_file(&file);
    assert_identical(&g).await;
}

/// Four sessions inserting `notes` rows named `{prefix}{writer}-{k}` until
/// an error; each returns the bodies whose insert was acknowledged.
fn note_writers(url: &str, prefix: &str, max: usize) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..4)
        .map(|w| {
            let (url, prefix) = (url.to_string(), prefix.to_string());
            tokio::spawn(async move {
                let c = connect(&url).await;
                let mut acked = Vec::new();
                for k in 0..max {
                    let body = format!("{prefix}{w}-{k}");
                    match c
                        .execute("INSERT INTO notes (body) VALUES ($1)", &[&body])
                        .await
                    {
                        Ok(_) => acked.push(body),
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect()
}

/// Every writer's acknowledged bodies, once the writers stopped.
async fn acknowledged(tasks: Vec<tokio::task::JoinHandle<Vec<String>>>) -> Vec<String> {
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_subscriber_catches_up_and_a_killed_proxy_loses_nothing() {
    let mut g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.execute("INSERT INTO notes (body) VALUES ('first')", &[])
        .await
        .unwrap();
    tokio::task::block_in_place(|| g.cluster.nodes[2].stop(reprise::local::StopMode::Fast))
        .unwrap();
    for i in 0..50 {
        c.execute(
            "INSERT INTO notes (body) VALUES ($1)",
            &[&format!("while down {i}")],
        )
        .await
        .unwrap();
    }
    tokio::task::block_in_place(|| g.cluster.nodes[2].start()).unwrap();
    drop(c);

    // Writers run while the proxy is killed (its tasks dropped mid-flight).
    let config = {
        let mut cfg = g.cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");
        cfg.health.interval_ms = 200;
        cfg.health.timeout_ms = 500;
        cfg.health.failures_before_down = 2;
        cfg
    };
    let tasks = note_writers(&g.proxy.url("app"), "w", 1000);
    tokio::time::sleep(Duration::from_millis(700)).await;
    g.proxy.kill();
    let acked = acknowledged(tasks).await;
    assert!(!acked.is_empty());
    g.proxy = Proxy::start(config).await;
    // A transaction cut off by the kill consumed a sequence number on the
    // primary only; the next logged write carries the sequence state over.
    let c = g.proxy.client("app").await;
    c.execute("INSERT INTO notes (body) VALUES ('after restart')", &[])
        .await
        .unwrap();
    assert_identical(&g).await;
    assert_present_once(&g, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replicas_acknowledges_only_applied_commits() {
    let g = TestGroup::start(3, |c| c.replication.sync_replicas = 1).await;
    let c = g.proxy.client("app").await;
    let subs = [g.direct(1).await, g.direct(2).await];
    for i in 0..40 {
        let body = format!("sync {i}");
        c.execute("INSERT INTO notes (body) VALUES ($1)", &[&body])
            .await
            .unwrap();
        let mut present = 0;
        for s in &subs {
            let n: i64 = s
                .query_one("SELECT count(*) FROM notes WHERE body = $1", &[&body])
                .await
                .unwrap()
                .get(0);
            present += n;
        }
        assert!(
            present >= 1,
            "{body} was acknowledged before any subscriber had it"
        );
    }
    assert_identical(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_time_zone_and_temporary_tables() {
    let g = TestGroup::start(3, |_| {}).await;
    let url = format!(
        "{}?options=-c%20TimeZone%3DAsia%2FTokyo",
        g.proxy.url("app")
    );
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE tz (t timestamptz);
         INSERT INTO tz VALUES ('2024-01-01 10:00');
         CREATE TEMP TABLE scratch (a int);
         INSERT INTO scratch VALUES (1), (2);
         UPDATE scratch SET a = a + 1;",
    )
    .await
    .unwrap();
    // A write that reads the temporary table could not be replayed (the
    // table is on the primary alone): refused, the session goes on.
    let e = c
        .execute(
            "INSERT INTO tz SELECT '2024-06-01 12:00'::timestamptz FROM scratch LIMIT 1",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{}", db_text(&e));
    // Logged strings of two more sessions make a temporary table of the
    // same name, next to a permanent one: the replay connection keeps no
    // temporary table from one entry to the next, so they neither collide
    // nor shadow the permanent table for a later session's write.
    for _ in 0..2 {
        let d = g.proxy.client("app").await;
        d.batch_execute(
            "CREATE TABLE IF NOT EXISTS scratch (a int);
             INSERT INTO tz VALUES ('2024-02-01 10:00');
             CREATE TEMP TABLE scratch (a int);
             INSERT INTO pg_temp.scratch VALUES (7);",
        )
        .await
        .unwrap();
    }
    let e2 = g.proxy.client("app").await;
    e2.batch_execute("INSERT INTO scratch VALUES (9)")
        .await
        .unwrap();
    let n: i64 = c
        .query_one("SELECT sum(a) FROM scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5);
    assert_identical(&g).await;
    let t: String = g
        .direct(1)
        .await
        .query_one("SELECT min(t)::text FROM tz", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, "2024-01-01 01:00:00+00");
    for i in 0..3 {
        let a: Vec<i32> = g
            .direct(i)
            .await
            .query("SELECT a FROM public.scratch", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(a, [9], "the permanent table on n{}", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_outside_transactions_get_their_own_entries() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute("CREATE INDEX CONCURRENTLY items_name ON items (name)")
        .await
        .unwrap();
    c.batch_execute("VACUUM ANALYZE items").await.unwrap();
    // Inside a transaction block PostgreSQL refuses it, as without Reprise.
    c.batch_execute("BEGIN").await.unwrap();
    let e = c
        .batch_execute("CREATE INDEX CONCURRENTLY items_price ON items (price)")
        .await
        .unwrap_err();
    assert!(
        db_text(&e).starts_with("0A000") || db_text(&e).starts_with("25001"),
        "{e:?}"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("DROP INDEX CONCURRENTLY items_name")
        .await
        .unwrap();
    c.batch_execute("CREATE INDEX CONCURRENTLY items_id_name ON items (id, name)")
        .await
        .unwrap();
    assert_identical(&g).await;
    for i in 0..3 {
        let d = g.direct(i).await;
        let idx = strings(
            &d,
            "SELECT indexname FROM pg_indexes WHERE tablename = 'items' ORDER BY 1",
        )
        .await;
        assert_eq!(idx, vec!["items_id_name", "items_pkey"], "n{}", i + 1);
    }
    // A procedure that commits inside cannot run in the transaction an
    // autocommit write is logged in: the client is told why, and nothing
    // of it stays anywhere.
    c.batch_execute(
        "CREATE TABLE steps (id int PRIMARY KEY);
         CREATE PROCEDURE in_steps() LANGUAGE plpgsql AS $$
         BEGIN FOR i IN 1..3 LOOP INSERT INTO steps VALUES (i); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    let e = c.batch_execute("CALL in_steps()").await.unwrap_err();
    let text = db_text(&e);
    assert!(text.starts_with("2D000"), "{text}");
    assert!(
        text.contains("autocommit write in one transaction"),
        "{text}"
    );
    c.batch_execute("SELECT 1").await.unwrap();
    assert_identical(&g).await;
    assert_eq!(ids_on(&g, 0, "steps").await, Vec::<i32>::new());
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `reprise serve` as a process and waits until it accepts clients.
async fn serve_process(config: &std::path::Path, port: u16) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_reprise"))
        .args(["serve", "--config"])
        .arg(config)
        .env("REPRISE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("reprise serve starts");
    let up = wait_until(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    assert!(up.is_some(), "reprise serve did not start listening");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_proxy_process_loses_nothing_beside_another_proxy() {
    // The in-process proxy of the harness keeps running: two proxies front
    // the group, and their appliers replay the same log without harm.
    let g = TestGroup::start(3, |_| {}).await;
    let (port, http) = (free_port(), free_port());
    let config = g.cluster.config(
        "app",
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{http}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reprise.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let mut child = serve_process(&path, port).await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/app");
    let tasks = note_writers(&url, "p", 100_000);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    let acked = acknowledged(tasks).await;
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );
    let mut child = serve_process(&path, port).await;
    // Backends of the killed process finish what they were doing (and may
    // consume sequence numbers) before they notice it is gone.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let c = connect(&url).await;
    c.execute("INSERT INTO notes (body) VALUES ('after restart')", &[])
        .await
        .unwrap();
    assert_identical(&g).await;
    assert_present_once(&g, &acked).await;
    for i in 0..3 {
        assert_no_duplicate_notes(&g, i).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A minimal raw frontend: messages out, messages in until a tag.
struct Raw {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(proxy: &Proxy) -> Raw {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for kv in ["user", "postgres", "database", "app"] {
            body.extend_from_slice(kv.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&body);
        s.write_all(&pkt).await.unwrap();
        let mut r = Raw { s, buf: Vec::new() };
        r.until(b'Z').await;
        r
    }

    fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
    }

    fn cstrs(parts: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        for p in parts {
            b.extend_from_slice(p.as_bytes());
            b.push(0);
        }
        b
    }

    fn parse(out: &mut Vec<u8>, name: &str, sql: &str) {
        let mut b = Self::cstrs(&[name, sql]);
        b.extend_from_slice(&0i16.to_be_bytes());
        Self::msg(out, b'P', &b);
    }

    fn bind(out: &mut Vec<u8>, stmt: &str, params: &[&str]) {
        let mut b = Self::cstrs(&["", stmt]);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        Self::msg(out, b'B', &b);
    }

    fn describe_statement(out: &mut Vec<u8>, name: &str) {
        let mut b = vec![b'S'];
        b.extend_from_slice(&Self::cstrs(&[name]));
        Self::msg(out, b'D', &b);
    }

    fn execute(out: &mut Vec<u8>) {
        Self::msg(out, b'E', b"\0\0\0\0\0");
    }

    /// Each statement as Parse, Bind, Execute, then one Sync: the answers
    /// up to the ReadyForQuery.
    async fn batch(&mut self, sqls: &[&str]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        for sql in sqls {
            statement(&mut out, sql);
        }
        Self::msg(&mut out, b'S', b"");
        self.send(&out).await;
        self.until(b'Z').await
    }

    async fn send(&mut self, out: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.s.write_all(out).await.unwrap();
    }

    /// Messages (tag, body) up to and including the first `tag`.
    async fn until(&mut self, tag: u8) -> Vec<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        loop {
            while self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() < len + 1 {
                    break;
                }
                let m: Vec<u8> = self.buf.drain(..len + 1).collect();
                let t = m[0];
                got.push((t, m[5..].to_vec()));
                if t == tag {
                    return got;
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(20), self.s.read(&mut chunk))
                .await
                .expect("the proxy answers")
                .unwrap();
            assert!(n > 0, "the proxy closed the connection; got {got:?}");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The SQLSTATE of the first ErrorResponse among messages.
fn error_in(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    body.split(|b| *b == 0)
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_described_and_flushed_before_they_run_are_replicated() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute("CREATE TABLE flushed (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut raw = Raw::connect(&g.proxy).await;
    // As asyncpg runs a statement the first time: Parse, Describe, Flush;
    // then Bind, Execute, Sync. Named, then unnamed, twice in one batch.
    for (name, ids) in [("s1", &["1", "2"][..]), ("", &["3", "4"][..])] {
        let mut out = Vec::new();
        Raw::parse(
            &mut out,
            name,
            "INSERT INTO flushed VALUES ($1::int, 'v' || $1)",
        );
        Raw::describe_statement(&mut out, name);
        Raw::msg(&mut out, b'H', b"");
        raw.send(&out).await;
        raw.until(b'n').await;
        let mut out = Vec::new();
        for id in ids {
            Raw::bind(&mut out, name, &[id]);
            Raw::execute(&mut out);
        }
        Raw::msg(&mut out, b'S', b"");
        raw.send(&out).await;
        let got = raw.until(b'Z').await;
        assert_eq!(error_in(&got), None, "{name:?}: {got:?}");
    }
    // A Parse refused (it would write a different random() on each copy)
    // defines nothing, as a failed Parse does not: a later Bind of its name
    // is answered that it does not exist, and nothing runs.
    let mut out = Vec::new();
    Raw::parse(
        &mut out,
        "refused",
        "INSERT INTO flushed SELECT 20, random()::text FROM (VALUES (1)) v",
    );
    Raw::msg(&mut out, b'S', b"");
    raw.send(&out).await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got).as_deref(), Some("0A000"), "{got:?}");
    let mut out = Vec::new();
    Raw::bind(&mut out, "refused", &[]);
    Raw::execute(&mut out);
    Raw::msg(&mut out, b'S', b"");
    raw.send(&out).await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got).as_deref(), Some("26000"), "{got:?}");
    // A lone Flush after a Sync does not keep the next read on the primary.
    let mut out = Vec::new();
    Raw::msg(&mut out, b'H', b"");
    raw.send(&out).await;

    // A failed statement undone with ROLLBACK TO SAVEPOINT is not replayed.
    c.batch_execute("BEGIN; INSERT INTO flushed VALUES (10, 'a'); SAVEPOINT sp")
        .await
        .unwrap();
    let dup = c
        .batch_execute("INSERT INTO flushed VALUES (10, 'dup')")
        .await
        .unwrap_err();
    assert_eq!(dup.code().map(|c| c.code()), Some("23505"));
    c.batch_execute("ROLLBACK TO SAVEPOINT sp; INSERT INTO flushed VALUES (11, 'b')")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();

    assert_identical(&g).await;
    for i in 0..3 {
        let n: i64 = g
            .direct(i)
            .await
            .query_one("SELECT count(*) FROM flushed", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 6, "rows on n{}", i + 1);
    }
    let status = g.proxy.status().await;
    for n in ["n2", "n3"] {
        assert_eq!(node_state(&status, n), "up", "{status:#}");
    }
}

/// Tables made outside the proxy (before it started, or directly on every
/// node) may have defaults that each copy would compute differently:
/// writes that leave such a column to its default get its value captured
/// when the INSERT can name the column, and are refused otherwise — never
/// silently replayed into different values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_defaults_of_tables_made_outside_the_proxy_are_captured_or_refused() {
    let seed = format!(
        "{SEED_SQL}\nCREATE TABLE tokens (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), v text, \
         at timestamptz DEFAULT clock_timestamp());"
    );
    let g = TestGroup::start_with(2, &seed, |_| {}).await;
    let c = connect(&g.proxy.url("app")).await;
    // The table catalog is loaded shortly after start.
    tokio::time::sleep(Duration::from_millis(800)).await;
    // With a column list, the defaults are named and their values captured.
    c.execute("INSERT INTO tokens (v) VALUES ($1), ($2)", &[&"a", &"b"])
        .await
        .expect("defaults captured");
    c.batch_execute(
        "INSERT INTO tokens (id, v, at) VALUES (DEFAULT, 'c', DEFAULT);
         INSERT INTO tokens DEFAULT VALUES;
         INSERT INTO tokens (v) VALUES ('d') RETURNING id;",
    )
    .await
    .expect("defaults captured");
    let given = c
        .execute(
            "INSERT INTO tokens (id, v, at) VALUES ('6d6f7ef4-3c1b-4b4e-9d4a-2b0c6c1d8e11', 'e', '2026-01-01')",
            &[],
        )
        .await
        .expect("every volatile default given a value");
    assert_eq!(given, 1);
    // Values in column order: the DEFAULT item, and `at` after the last
    // value, are given their captured defaults.
    c.batch_execute("INSERT INTO tokens VALUES (DEFAULT, 'f')")
        .await
        .expect("defaults captured in column order");
    // Where the columns cannot be named, still refused.
    for (sql, column) in [
        // (Rows read in storage order.)
        ("INSERT INTO tokens (v) SELECT v FROM tokens", "\"id\""),
        (
            "INSERT INTO tokens (id, v) SELECT gen_random_uuid(), v FROM tokens",
            "gen_random_uuid",
        ),
    ] {
        let e = c.batch_execute(sql).await.expect_err(sql);
        let text = db_text(&e);
        assert!(
            text.starts_with("0A000") && text.contains(column),
            "{sql}: {text}"
        );
    }
    // Inside DO blocks and routine bodies nothing can be captured: the
    // same statements are refused there, a function when it is created.
    c.batch_execute("CREATE TABLE numbered (id serial PRIMARY KEY, v text)")
        .await
        .unwrap();
    for (sql, words) in [
        (
            "DO $$ BEGIN INSERT INTO tokens (v) VALUES ('i'); END $$",
            &["DO block", "\"id\""][..],
        ),
        (
            "DO $$ BEGIN EXECUTE 'INSERT INTO tokens (v) VALUES (''i'')'; END $$",
            &["DO block", "\"id\""],
        ),
        (
            "CREATE FUNCTION add_token(t text) RETURNS void LANGUAGE sql AS $$ INSERT INTO tokens (v) VALUES (t) $$",
            &["function", "\"id\""],
        ),
        (
            "CREATE PROCEDURE restamp() LANGUAGE sql BEGIN ATOMIC UPDATE tokens SET at = DEFAULT; END",
            &["procedure", "a default"],
        ),
        (
            "CREATE FUNCTION copy_tokens() RETURNS void LANGUAGE plpgsql AS $$ DECLARE r record; BEGIN \
             FOR r IN SELECT v FROM tokens LOOP INSERT INTO numbered (v) VALUES (r.v); END LOOP; END $$",
            &["loop", "numbered"],
        ),
        (
            // A trigger function (its parse tree needed a repair to be read).
            "CREATE FUNCTION token_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             INSERT INTO tokens (v) VALUES (TG_OP || NEW.v); RETURN NEW; END $$",
            &["function", "\"id\""],
        ),
    ] {
        let e = c.batch_execute(sql).await.expect_err(sql);
        let text = db_text(&e);
        assert!(
            text.starts_with("0A000") && words.iter().all(|w| text.contains(w)),
            "{sql}: {text}"
        );
    }
    // What names its values, or loops in a fixed order, runs.
    c.batch_execute(
        "DO $$ BEGIN INSERT INTO tokens (id, v, at) VALUES ('0d6f7ef4-3c1b-4b4e-9d4a-2b0c6c1d8e12', 'j', '2026-01-02'); END $$;
         DO $$ DECLARE r record; BEGIN FOR r IN SELECT v FROM tokens ORDER BY id LOOP \
           INSERT INTO numbered (v) VALUES (r.v); END LOOP; END $$;
         CREATE FUNCTION add_numbered(t text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN INSERT INTO numbered (v) VALUES (t); END $$;
         SELECT add_numbered('k');
         CREATE FUNCTION number_it() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO numbered (v) VALUES (TG_OP || ':' || NEW.v); RETURN NEW; END $$;
         CREATE TRIGGER numbered_too AFTER INSERT ON tokens FOR EACH ROW EXECUTE FUNCTION number_it();
         INSERT INTO tokens (id, v, at) VALUES ('5b0f0a3e-9a53-4a0e-8f3c-1f2d3e4c5b6a', 'l', '2026-01-03');",
    )
    .await
    .expect("routines whose writes the copies repeat exactly");
    // Tables created directly on every node after the proxy started: the
    // very first write to each (extended and simple protocol) has the
    // catalog reloaded before it runs, and is captured or refused.
    for i in 0..2 {
        g.direct(i)
            .await
            .batch_execute(
                "CREATE TABLE later (id uuid DEFAULT gen_random_uuid(), v int);
                 CREATE TABLE later2 (v int, at timestamptz DEFAULT clock_timestamp());
                 CREATE TABLE later3 (v int, r float8 DEFAULT random());
                 CREATE TABLE plain (v int)",
            )
            .await
            .unwrap();
    }
    c.execute("INSERT INTO later (v) VALUES ($1)", &[&1i32])
        .await
        .expect("the first write to a new table, its default captured");
    c.batch_execute("INSERT INTO later2 (v) VALUES (1), (2)")
        .await
        .expect("the first simple-protocol write to a new table, its default captured");
    let e = c
        .batch_execute("INSERT INTO later3 SELECT v FROM later2")
        .await
        .expect_err("the first write to a new table that cannot name the default");
    assert!(
        db_text(&e).starts_with("0A000") && db_text(&e).contains("\"r\""),
        "{}",
        db_text(&e)
    );
    // A new table without such defaults is written at once.
    c.execute("INSERT INTO plain (v) VALUES (1)", &[])
        .await
        .expect("a new table without volatile defaults");
    let n: i64 = c
        .query_one("SELECT count(DISTINCT id) FROM tokens", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 9);
    let audited: i64 = c
        .query_one("SELECT count(*) FROM numbered WHERE v = 'INSERT:l'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 1, "the trigger ran");
    assert_identical(&g).await;
}

/// Cursors whose query only reads (psql's FETCH_COUNT, drivers'
/// server-side cursors) are not logged and take no write lock, in either
/// protocol; a cursor whose query writes, or that is declared FOR UPDATE,
/// has its FETCHes logged with the transaction, so every copy runs the
/// same writes. What would leave state on a subscriber is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_that_read_are_not_logged_and_cursors_that_write_are() {
    let g = TestGroup::start(3, |_| {}).await;
    let mut c = g.proxy.client("app").await;
    c.batch_execute(
        "CREATE TABLE stock (id int PRIMARY KEY, v text);
         INSERT INTO stock SELECT g, 'v' || g FROM generate_series(1, 20) g;
         CREATE TABLE made (id serial PRIMARY KEY, v text);
         CREATE FUNCTION make(i int) RETURNS int LANGUAGE sql AS
             'INSERT INTO made (v) VALUES (i::text) RETURNING id';",
    )
    .await
    .unwrap();
    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    let head = log_extent(&g, 0).await.2;
    c.batch_execute(
        "BEGIN; DECLARE r CURSOR FOR SELECT id FROM stock ORDER BY id;
         FETCH 2 FROM r; MOVE 1 IN r; CLOSE r; COMMIT",
    )
    .await
    .unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("DECLARE r CURSOR FOR SELECT id FROM stock ORDER BY id", &[])
        .await
        .unwrap();
    let rows = tx.query("FETCH 3 FROM r", &[]).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    tx.execute("CLOSE r", &[]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        log_extent(&g, 0).await.2,
        head,
        "reading cursors are not logged"
    );

    // A cursor whose query writes: its FETCHes (both protocols) are logged.
    c.batch_execute(
        "BEGIN; DECLARE w CURSOR FOR SELECT make(id) FROM stock WHERE id <= 6 ORDER BY id;
         FETCH 2 FROM w",
    )
    .await
    .unwrap();
    let rows = c.query("FETCH 3 FROM w", &[]).await.unwrap();
    assert_eq!(rows.len(), 3);
    c.batch_execute("CLOSE w; COMMIT").await.unwrap();
    // FOR UPDATE: WHERE CURRENT OF finds the same row on every copy.
    c.batch_execute(
        "BEGIN; DECLARE u CURSOR FOR SELECT id FROM stock ORDER BY id FOR UPDATE;
         FETCH 4 FROM u; UPDATE stock SET v = 'current' WHERE CURRENT OF u; COMMIT",
    )
    .await
    .unwrap();
    // Of a cursor that only reads, the copies would not know the row.
    c.batch_execute("BEGIN; DECLARE r CURSOR FOR SELECT id FROM stock ORDER BY id; FETCH 1 FROM r")
        .await
        .unwrap();
    let e = c
        .batch_execute("UPDATE stock SET v = 'x' WHERE CURRENT OF r")
        .await
        .expect_err("WHERE CURRENT OF a reading cursor");
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    // A READ ONLY transaction runs on a subscriber (of a session that has
    // not written, once they are caught up): state that outlives it would
    // stay there. (Right after the BEGIN, such a statement takes the
    // block to the primary instead.)
    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    for sql in [
        "DECLARE h CURSOR WITH HOLD FOR SELECT 1",
        "PREPARE p AS SELECT 1",
        "LISTEN somewhere",
    ] {
        let first = g.proxy.client("app").await;
        first.batch_execute("BEGIN READ ONLY").await.unwrap();
        first.batch_execute(sql).await.unwrap();
        assert_eq!(
            served_port(&first).await,
            g.cluster.nodes[0].port().to_string(),
            "{sql}"
        );
        first.batch_execute("ROLLBACK").await.unwrap();
        let reader = g.proxy.client("app").await;
        reader.batch_execute("BEGIN READ ONLY").await.unwrap();
        reader.batch_execute("SELECT 1").await.unwrap();
        let e = reader.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        assert!(
            db_text(&e).contains("READ ONLY transaction"),
            "{sql}: {e:?}"
        );
        reader.batch_execute("ROLLBACK").await.unwrap();
    }
    // Outside one, a cursor WITH HOLD keeps the session on the primary.
    c.batch_execute("BEGIN READ ONLY; SELECT 1; COMMIT")
        .await
        .unwrap();
    c.batch_execute(
        "BEGIN; DECLARE h CURSOR WITH HOLD FOR SELECT id FROM stock ORDER BY id; COMMIT",
    )
    .await
    .unwrap();
    let rows = c.query("FETCH 2 FROM h", &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    c.batch_execute("CLOSE h").await.unwrap();

    wait_caught_up(&g, &[1, 2], Duration::from_secs(20)).await;
    for i in 0..3 {
        let d = g.direct(i).await;
        let made: i64 = d
            .query_one("SELECT count(*) FROM made", &[])
            .await
            .unwrap()
            .get(0);
        let current: i32 = d
            .query_one("SELECT id FROM stock WHERE v = 'current'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!((made, current), (5, 4), "node {i}");
    }
    assert_identical(&g).await;
}

/// A COMMIT whose log append failed (here: the statement timeout struck
/// while the append waited for its turn) is answered with that failure; it
/// used to come back as a bare "ROLLBACK", which drivers take for success.
/// A READ ONLY transaction on the primary takes no lock and appends
/// nothing, whatever functions it calls; neither does LISTEN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_log_append_failed_reports_it() {
    let g = TestGroup::start(2, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute(
        "CREATE TABLE kv (id int PRIMARY KEY, v int);
         INSERT INTO kv VALUES (1, 0);
         CREATE FUNCTION looks() RETURNS int LANGUAGE sql AS 'SELECT 1';",
    )
    .await
    .unwrap();
    // (The table catalog is loaded: the UPDATE below takes the write lock
    // shared, and its append waits for the commit order.)
    c.batch_execute("UPDATE kv SET v = v WHERE id = 1")
        .await
        .unwrap();
    let holder = g.direct(0).await;
    let key = reprise::replication::order_key("app");
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();
    for sql in [
        "SET statement_timeout = '300ms'",
        "BEGIN",
        "UPDATE kv SET v = v + 1 WHERE id = 1",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let e = c
        .batch_execute("COMMIT")
        .await
        .expect_err("a COMMIT whose append failed");
    assert_eq!(sqlstate(&e), "57014", "{e:?}");
    assert!(db_text(&e).contains("could not log"), "{e:?}");
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    c.batch_execute("RESET statement_timeout").await.unwrap();
    let v: i32 = c.query_one("SELECT v FROM kv", &[]).await.unwrap().get(0);
    assert_eq!(v, 0, "rolled back");

    let head = log_extent(&g, 0).await.2;
    c.batch_execute("LISTEN somewhere; BEGIN READ ONLY")
        .await
        .unwrap();
    let n: i32 = c.query_one("SELECT looks()", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(log_extent(&g, 0).await.2, head, "nothing appended");
    c.batch_execute("UPDATE kv SET v = 5 WHERE id = 1")
        .await
        .unwrap();
    wait_caught_up(&g, &[1], Duration::from_secs(20)).await;
    assert_identical(&g).await;
}

/// Entries and the first and last seq of a node's log.
async fn log_extent(g: &TestGroup, i: usize) -> (i64, i64, i64) {
    let c = g.direct(i).await;
    let r = c
        .query_one(
            "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM reprise.log",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The log stays bounded: entries more than `log_keep_entries` behind the
/// head that every live copy applied are deleted on every copy. A copy
/// that was stopped while its next entries were trimmed cannot catch up
/// from the log: it is found divergent and (auto_reseed) re-seeded, and
/// ends identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_trimmed_and_a_copy_away_too_long_is_reseeded() {
    const KEEP: i64 = 20;
    let mut g = TestGroup::start(3, |c| {
        c.replication.log_keep_entries = KEEP as u64;
        c.replication.auto_reseed = true;
    })
    .await;
    let c = g.proxy.client("app").await;
    for i in 0..60 {
        c.execute("INSERT INTO notes (body) VALUES ($1)", &[&format!("a{i}")])
            .await
            .unwrap();
    }
    // Every copy applied everything: each keeps about KEEP entries (the
    // trim runs once a second, in steps of KEEP / 10).
    let trimmed = wait_until(Duration::from_secs(20), || async {
        let mut ok = true;
        for i in 0..3 {
            let (n, first, last) = log_extent(&g, i).await;
            ok &= first > 1 && n <= KEEP + 2 && last - first + 1 == n;
        }
        ok
    })
    .await;
    assert!(
        trimmed.is_some(),
        "logs not trimmed: {:?} {:?} {:?}",
        log_extent(&g, 0).await,
        log_extent(&g, 1).await,
        log_extent(&g, 2).await
    );

    // n3 is away while more than KEEP entries are written and trimmed.
    let (_, _, n3_last) = log_extent(&g, 2).await;
    tokio::task::block_in_place(|| g.cluster.nodes[2].stop(reprise::local::StopMode::Fast))
        .unwrap();
    for i in 0..60 {
        c.execute("INSERT INTO notes (body) VALUES ($1)", &[&format!("b{i}")])
            .await
            .unwrap();
    }
    let gone = wait_until(Duration::from_secs(20), || async {
        log_extent(&g, 0).await.1 > n3_last + 1
    })
    .await;
    assert!(gone.is_some(), "the primary kept n3's next entries");
    tokio::task::block_in_place(|| g.cluster.nodes[2].start()).unwrap();

    // Back, re-seeded from the primary (its log now starts where the
    // primary's does), and identical.
    let reseeded = wait_until(Duration::from_secs(60), || async {
        node_state(&g.proxy.status().await, "n3") == "up" && log_extent(&g, 2).await.1 > n3_last
    })
    .await;
    assert!(
        reseeded.is_some(),
        "n3 was not re-seeded: {}",
        g.proxy.status().await
    );
    c.execute("INSERT INTO notes (body) VALUES ('after')", &[])
        .await
        .unwrap();
    assert!(
        wait_caught_up(&g, &[0, 1, 2], Duration::from_secs(20))
            .await
            .is_some()
    );
    assert_identical_on(&g, &[0, 1, 2], LogCheck::Head).await;
}

/// The command tags and rows a simple query string produced.
fn tags_and_rows(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(format!("C{n}")),
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(format!("R{}", r.get(0)?)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_commit_in_one_query_string_are_replicated() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute("CREATE TABLE s (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // A block, a read after it: every result in order, one ReadyForQuery.
    let msgs = c
        .simple_query(
            "BEGIN; INSERT INTO s VALUES (1, 'a'); INSERT INTO s VALUES (2, 'b'); COMMIT; \
             SELECT count(*) FROM s",
        )
        .await
        .unwrap();
    assert_eq!(tags_and_rows(&msgs), ["C0", "C1", "C1", "C0", "R2", "C1"]);
    // An error ends the string there, as in one query: the block is left
    // failed and its COMMIT never ran.
    let e = c
        .batch_execute(
            "BEGIN; INSERT INTO s VALUES (3, 'c'); INSERT INTO s VALUES (1, 'dup'); COMMIT",
        )
        .await
        .unwrap_err();
    assert!(db_text(&e).starts_with("23505"), "{}", db_text(&e));
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert!(db_text(&e).starts_with("25P02"), "{}", db_text(&e));
    c.batch_execute("ROLLBACK").await.unwrap();
    // An implicit block ended by COMMIT, a block rolled back, a snapshot
    // isolation block, two blocks in one string.
    c.batch_execute("INSERT INTO s VALUES (4, 'd'); UPDATE s SET v = 'e' WHERE id = 4; COMMIT")
        .await
        .unwrap();
    c.batch_execute("BEGIN; DELETE FROM s; ROLLBACK")
        .await
        .unwrap();
    c.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE; UPDATE s SET v = v || '!'; COMMIT")
        .await
        .unwrap();
    c.batch_execute(
        "BEGIN; INSERT INTO s VALUES (5, 'f'); COMMIT; BEGIN; INSERT INTO s VALUES (6, 'g'); END;",
    )
    .await
    .unwrap();
    // The BEGIN runs before the write lock is taken: its READ ONLY holds.
    let e = c
        .batch_execute("BEGIN READ ONLY; INSERT INTO s VALUES (9, 'x')")
        .await
        .unwrap_err();
    assert!(db_text(&e).starts_with("25006"), "{}", db_text(&e));
    c.batch_execute("ROLLBACK").await.unwrap();
    // Left open by the string: the client commits it later.
    c.batch_execute(
        "BEGIN; INSERT INTO s VALUES (7, 'h'); COMMIT; BEGIN; INSERT INTO s VALUES (8, 'i')",
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    // psql sends a -c string as one query.
    let out = run(Command::new("psql").args([
        "-X",
        "-q",
        "-At",
        "-c",
        "BEGIN; UPDATE s SET v = upper(v) WHERE id > 4; COMMIT; \
         SELECT string_agg(v, ',' ORDER BY id) FROM s;",
        &g.proxy.url("app"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "a!,b!,e!,F,G,H,I");
    // A COPY FROM STDIN among the parts: its data flows between them.
    let copy = |sql: &str, data: &str| {
        use std::io::Write;
        // (Bounded: a proxy that stopped reading the data would hang psql.)
        let mut child = Command::new("timeout")
            .args([
                "30",
                "psql",
                "-X",
                "-q",
                "-At",
                "-c",
                sql,
                &g.proxy.url("app"),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(data.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = copy("BEGIN; COPY s FROM STDIN; COMMIT", "10\tj\n11\tk\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = copy("BEGIN; COPY s FROM STDIN; COMMIT", "12\tl\nbad\tm\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid input syntax"));
    let n: i64 = c
        .query_one("SELECT count(*) FROM s WHERE id >= 10", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let ids = ids_on(&g, 2, "s").await;
    // (A subscriber may still be applying: compared fully below.)
    assert!(
        ids.iter()
            .all(|i| [1, 2, 4, 5, 6, 7, 8, 10, 11].contains(i)),
        "{ids:?}"
    );
    assert_identical(&g).await;
}

/// The ids of `table` on node `i`, in order.
async fn ids_on(g: &TestGroup, i: usize, table: &str) -> Vec<i32> {
    g.direct(i)
        .await
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The command tags (and the ReadyForQuery status) among messages.
/// The port of the node serving the client's session now.
async fn served_port(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT current_setting('port')", &[])
        .await
        .unwrap()
        .get(0)
}

fn tags_in(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .filter_map(|(t, body)| match t {
            b'C' => Some(String::from_utf8_lossy(&body[..body.len() - 1]).to_string()),
            b'Z' => Some(format!("Z{}", body[0] as char)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_commit_in_one_batch_are_replicated() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute("CREATE TABLE pipe (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut raw = Raw::connect(&g.proxy).await;
    // As a pipelining driver sends a transaction: every statement before
    // one Sync, a named statement used twice, a read after the COMMIT.
    let batch = |statements: &[(&str, &str, &[&str])]| {
        let mut out = Vec::new();
        for (name, sql, params) in statements {
            if !sql.is_empty() {
                Raw::parse(&mut out, name, sql);
            }
            Raw::bind(&mut out, name, params);
            Raw::execute(&mut out);
        }
        Raw::msg(&mut out, b'S', b"");
        out
    };
    let insert = "INSERT INTO pipe VALUES ($1::int, $2)";
    raw.send(&batch(&[
        ("", "BEGIN", &[]),
        ("ins", insert, &["1", "a"]),
        ("ins", "", &["2", "b"]),
        ("", "COMMIT", &[]),
        ("", "SELECT count(*) FROM pipe", &[]),
    ]))
    .await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got), None, "{got:?}");
    assert_eq!(
        tags_in(&got),
        [
            "BEGIN",
            "INSERT 0 1",
            "INSERT 0 1",
            "COMMIT",
            "SELECT 1",
            "ZI"
        ]
    );
    // One ReadyForQuery for the batch: the next query's answer is its own.
    let mut out = Vec::new();
    Raw::msg(&mut out, b'Q', b"SELECT 1\0");
    raw.send(&out).await;
    assert_eq!(tags_in(&raw.until(b'Z').await), ["SELECT 1", "ZI"]);
    // An error ends the batch there: its COMMIT never runs.
    raw.send(&batch(&[
        ("", "BEGIN", &[]),
        ("ins", "", &["3", "c"]),
        ("ins", "", &["1", "dup"]),
        ("", "COMMIT", &[]),
    ]))
    .await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got).as_deref(), Some("23505"), "{got:?}");
    assert_eq!(tags_in(&got), ["BEGIN", "INSERT 0 1", "ZE"]);
    let mut out = Vec::new();
    Raw::msg(&mut out, b'Q', b"ROLLBACK\0");
    raw.send(&out).await;
    assert_eq!(tags_in(&raw.until(b'Z').await), ["ROLLBACK", "ZI"]);
    // Without BEGIN: the writes commit at their Sync, the COMMIT warns
    // that no transaction is open (as PostgreSQL does for this batch).
    raw.send(&batch(&[("ins", "", &["4", "d"]), ("", "COMMIT", &[])]))
        .await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got), None, "{got:?}");
    assert_eq!(tags_in(&got), ["INSERT 0 1", "COMMIT", "ZI"]);
    // A snapshot-isolation block: its BEGIN runs before the write lock.
    raw.send(&batch(&[
        ("", "BEGIN ISOLATION LEVEL SERIALIZABLE", &[]),
        ("ins", "", &["5", "e"]),
        ("", "SHOW transaction_isolation", &[]),
        ("", "COMMIT", &[]),
    ]))
    .await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got), None, "{got:?}");
    assert_eq!(
        tags_in(&got),
        ["BEGIN", "INSERT 0 1", "SHOW", "COMMIT", "ZI"]
    );
    let shown = got.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert!(
        String::from_utf8_lossy(&shown.1).contains("serializable"),
        "{shown:?}"
    );
    assert_identical(&g).await;
    for i in 0..3 {
        let ids = ids_on(&g, i, "pipe").await;
        assert_eq!(ids, [1, 2, 4, 5], "rows on n{}", i + 1);
    }
}

/// Parse, Bind and Execute of `sql` as the unnamed statement.
fn statement(out: &mut Vec<u8>, sql: &str) {
    Raw::parse(out, "", sql);
    Raw::bind(out, "", &[]);
    Raw::execute(out);
}

/// BEGIN and `first`, a Flush and their answers; then `then`, COMMIT and
/// Sync: the answers up to the ReadyForQuery.
async fn streamed_commit(raw: &mut Raw, first: &str, then: &str) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    statement(&mut out, "BEGIN");
    statement(&mut out, first);
    Raw::msg(&mut out, b'H', b"");
    raw.send(&out).await;
    assert_eq!(tags_in(&raw.until(b'C').await), ["BEGIN"]);
    assert_eq!(tags_in(&raw.until(b'C').await), ["INSERT 0 1"]);
    let mut out = Vec::new();
    statement(&mut out, then);
    statement(&mut out, "COMMIT");
    Raw::msg(&mut out, b'S', b"");
    raw.send(&out).await;
    raw.until(b'Z').await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_streamed_to_the_primary_is_checked_and_logged() {
    let g = TestGroup::start(2, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.batch_execute("CREATE TABLE pipe (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut raw = Raw::connect(&g.proxy).await;
    // Writes, a Flush (the driver reads their answers), more writes and
    // the COMMIT with the Sync: the batch streams to the primary as it
    // comes; it is ended before the COMMIT, which runs once every answer is
    // in and the log entry appended.
    let got = streamed_commit(
        &mut raw,
        "INSERT INTO pipe VALUES (1, 'a')",
        "INSERT INTO pipe VALUES (2, 'b')",
    )
    .await;
    assert_eq!(error_in(&got), None, "{got:?}");
    assert_eq!(tags_in(&got), ["INSERT 0 1", "COMMIT", "ZI"]);
    // An error in the streamed part: the COMMIT does not run, the block is
    // left failed, as without Reprise.
    let got = streamed_commit(
        &mut raw,
        "INSERT INTO pipe VALUES (7, 'g')",
        "INSERT INTO pipe VALUES (1, 'dup')",
    )
    .await;
    assert_eq!(error_in(&got).as_deref(), Some("23505"), "{got:?}");
    assert_eq!(tags_in(&got), ["ZE"]);
    let mut out = Vec::new();
    Raw::msg(&mut out, b'Q', b"ROLLBACK\0");
    raw.send(&out).await;
    assert_eq!(tags_in(&raw.until(b'Z').await), ["ROLLBACK", "ZI"]);
    // A COMMIT before a Flush cannot be logged with its writes' answers:
    // refused, and the transaction is gone (no write lock is left held).
    let mut out = Vec::new();
    statement(&mut out, "INSERT INTO pipe VALUES (3, 'c')");
    statement(&mut out, "COMMIT");
    Raw::msg(&mut out, b'H', b"");
    raw.send(&out).await;
    let got = raw.until(b'E').await;
    assert_eq!(error_in(&got).as_deref(), Some("0A000"), "{got:?}");
    let mut out = Vec::new();
    Raw::msg(&mut out, b'S', b"");
    raw.send(&out).await;
    assert_eq!(tags_in(&raw.until(b'Z').await), ["ZI"]);
    // A ROLLBACK in a streamed batch runs.
    let mut out = Vec::new();
    statement(&mut out, "BEGIN");
    statement(&mut out, "INSERT INTO pipe VALUES (6, 'f')");
    Raw::msg(&mut out, b'H', b"");
    statement(&mut out, "ROLLBACK");
    Raw::msg(&mut out, b'S', b"");
    raw.send(&out).await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got), None, "{got:?}");
    assert_eq!(tags_in(&got), ["BEGIN", "INSERT 0 1", "ROLLBACK", "ZI"]);
    // What a batch that does not stream would be refused, it is refused
    // streaming too: a value each copy would compute differently.
    let mut out = Vec::new();
    statement(&mut out, "BEGIN");
    statement(&mut out, "INSERT INTO pipe VALUES (8, 'h')");
    Raw::msg(&mut out, b'H', b"");
    raw.send(&out).await;
    raw.until(b'C').await;
    raw.until(b'C').await;
    let got = raw
        .batch(&[
            "INSERT INTO pipe SELECT 9, random()::text FROM (VALUES (1)) v",
            "COMMIT",
        ])
        .await;
    assert_eq!(error_in(&got).as_deref(), Some("0A000"), "{got:?}");
    let mut out = Vec::new();
    Raw::msg(&mut out, b'Q', b"ROLLBACK\0");
    raw.send(&out).await;
    assert_eq!(
        tags_in(&raw.until(b'Z').await).last().map(String::as_str),
        Some("ZI")
    );
    // A snapshot-isolation BEGIN streamed with writes cannot be honoured.
    let mut out = Vec::new();
    statement(&mut out, "BEGIN ISOLATION LEVEL SERIALIZABLE");
    statement(&mut out, "INSERT INTO pipe VALUES (10, 'j')");
    Raw::msg(&mut out, b'H', b"");
    Raw::msg(&mut out, b'S', b"");
    raw.send(&out).await;
    let got = raw.until(b'Z').await;
    assert_eq!(error_in(&got).as_deref(), Some("0A000"), "{got:?}");
    // Other sessions write on; this one too.
    tokio::time::timeout(
        Duration::from_secs(20),
        c.batch_execute("INSERT INTO pipe VALUES (4, 'd')"),
    )
    .await
    .expect("the write lock is free")
    .unwrap();
    let mut out = Vec::new();
    Raw::msg(&mut out, b'Q', b"INSERT INTO pipe VALUES (5, 'e')\0");
    raw.send(&out).await;
    assert_eq!(tags_in(&raw.until(b'Z').await), ["INSERT 0 1", "ZI"]);
    assert_identical(&g).await;
    for i in 0..2 {
        let ids = ids_on(&g, i, "pipe").await;
        assert_eq!(ids, [1, 2, 4, 5], "rows on n{}", i + 1);
    }
}
