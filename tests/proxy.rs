//! The foundation: real clients through the proxy over real PostgreSQL
//! copies — psql, tokio-postgres, pgbench, cancel, bad input, health.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_ddl_dml_multi_statements_copy_and_errors() {
    let g = TestGroup::start(3, |_| {}).await;
    let url = g.proxy.url("app");

    // DDL, DML and a multi-statement string; the session reads its own writes.
    let (ok, out, err) = psql(
        &url,
        "CREATE TABLE t (id int PRIMARY KEY, v text);\n\
         INSERT INTO t VALUES (1, 'a'), (2, 'b');\n\
         UPDATE t SET v = 'B' WHERE id = 2; DELETE FROM t WHERE id = 1; SELECT v FROM t ORDER BY id;\n\
         ALTER TABLE t ADD COLUMN n int DEFAULT 7;\n\
         SELECT id, v, n FROM t;\n",
    );
    assert!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), "B\n2|B|7");

    // COPY in and out.
    let (ok, out, err) = psql(
        &url,
        "COPY t (id, v) FROM STDIN;\n10\tten\n11\televen\n\\.\n\
         COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT;\n\
         SELECT count(*) FROM t;\n",
    );
    assert!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), "10\tten\n11\televen\n3");

    // COPY TO STDOUT of a table every copy has is a read.
    let (ok, out, err) = psql(
        &url,
        "COPY (SELECT id FROM items WHERE id <= 3 ORDER BY id) TO STDOUT;\n",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1\n2\n3");

    // An error: the real SQLSTATE, and the session stays usable.
    let (ok, out, err) = psql(
        &url,
        "\\set ON_ERROR_STOP 0\n\\set VERBOSITY verbose\n\
         SELECT * FROM no_such_table;\n\
         INSERT INTO t VALUES (2, 'dup');\n\
         SELECT 1/0;\n\
         SELECT 'still here';\n",
    );
    assert!(ok, "{err}");
    assert!(err.contains("42P01"), "{err}");
    assert!(err.contains("23505"), "{err}");
    assert!(err.contains("22012"), "{err}");
    assert_eq!(out.trim(), "still here");

    // A syntax error comes from PostgreSQL itself.
    let (ok, _, err) = psql(&url, "\\set VERBOSITY verbose\nSELEC 1;\n");
    assert!(!ok);
    assert!(
        err.contains("42601") && err.contains("syntax error"),
        "{err}"
    );

    // Inside a transaction everything goes to one node and rolls back.
    let (ok, out, err) = psql(
        &url,
        "BEGIN; INSERT INTO t VALUES (50, 'x'); SELECT count(*) FROM t WHERE id = 50; ROLLBACK;\n\
         SELECT count(*) FROM t WHERE id = 50;\n",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1\n0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_statements_with_binary_parameters() {
    let g = TestGroup::start(3, |_| {}).await;
    let c = g.proxy.client("app").await;

    // A prepared read, executed many times with binary parameters: runs on
    // subscribers, prepared there on demand.
    let stmt = c
        .prepare("SELECT id, name, price::text, tags, meta, data, seen FROM items WHERE id = $1")
        .await
        .unwrap();
    for id in [1i32, 7, 42, 100] {
        let row = c.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), id);
        assert_eq!(row.get::<_, String>(1), format!("item {id}"));
        assert_eq!(row.get::<_, Vec<String>>(3), vec![format!("t{id}")]);
        let meta: serde_json::Value = row.get(4);
        assert_eq!(meta["n"], id);
        assert_eq!(row.get::<_, Vec<u8>>(5).len(), 16);
    }
    let rows = c
        .query(
            "SELECT id FROM items WHERE id = ANY($1) AND name LIKE $2 ORDER BY id",
            &[&vec![3i32, 5, 8], &"item %"],
        )
        .await
        .unwrap();
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![3, 5, 8]);

    // Writes with binary parameters, then reads of them on the same connection.
    let ins = c
        .prepare("INSERT INTO notes (body) VALUES ($1) RETURNING id")
        .await
        .unwrap();
    let id: i32 = c.query_one(&ins, &[&"hello"]).await.unwrap().get(0);
    let body: String = c
        .query_one("SELECT body FROM notes WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "hello");

    // A transaction with a prepared statement.
    let mut c = c;
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "UPDATE items SET name = $1 WHERE id = $2",
        &[&"renamed", &5i32],
    )
    .await
    .unwrap();
    let n: String = tx
        .query_one("SELECT name FROM items WHERE id = $1", &[&5i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, "renamed");
    tx.rollback().await.unwrap();

    // An error leaves the connection usable, and the statement still works.
    let e = c.query("SELECT 1/$1", &[&0i32]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22012");
    let row = c.query_one(&stmt, &[&9i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 9);
}

/// Runs pgbench -S through the proxy in one protocol mode.
fn pgbench_select(url_port: u16, mode: &str) -> String {
    let out = run(Command::new(pg_tool("pgbench"))
        .args(["-S", "-n", "-c", "4", "-j", "2", "-t", "200", "-M", mode])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &url_port.to_string(),
            "-U",
            "postgres",
            "app",
        ]));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "pgbench -M {mode}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_spreads_reads_over_subscribers() {
    let seed = "";
    let dir_setup = |_: &mut reprise::config::Config| {};
    let g = TestGroup::start_with(3, seed, dir_setup).await;
    // pgbench tables on every copy, directly.
    for i in 0..3 {
        pgbench_init(g.node(i), 1).unwrap();
    }
    let port = g.proxy.addr.port();
    for mode in ["simple", "extended", "prepared"] {
        let before = g.tup_returned().await;
        let out = tokio::task::spawn_blocking(move || pgbench_select(port, mode))
            .await
            .unwrap();
        assert!(
            out.contains("number of transactions actually processed: 800/800"),
            "{out}"
        );
        // Backends are closed with the sessions, which flushes their stats.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = g.tup_returned().await;
        let delta: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        // 800 point reads: each subscriber served a real share of them.
        assert!(
            delta[1] >= 200 && delta[2] >= 200,
            "mode {mode}: rows per node {delta:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_running_query() {
    let g = TestGroup::start(3, |_| {}).await;
    for sql in [
        // A volatile function: runs on the primary.
        "SELECT pg_sleep(30)",
        // A pure read: runs on a subscriber.
        "SELECT count(*) FROM generate_series(1, 2000000000)",
    ] {
        let c = g.proxy.client("app").await;
        let token = c.cancel_token();
        let q = tokio::spawn(async move { c.simple_query(sql).await.map(|_| c) });
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), q)
            .await
            .expect("cancel took effect")
            .unwrap();
        let Err(e) = r else {
            panic!("{sql}: the query was not cancelled")
        };
        assert_eq!(e.code().unwrap().code(), "57014", "{sql}: {e}");
    }
    // psql's cancel path (SIGINT → CancelRequest) works the same way.
    let url = g.proxy.url("app");
    let child = Command::new("psql")
        .args(["-X", "-c", "SELECT pg_sleep(30)", &url])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
}

/// Sends raw bytes as a client and returns what the proxy answered.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    buf
}

fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_and_others_are_unaffected() {
    let g = TestGroup::start(2, |c| c.max_message_size = 1 << 20).await;
    let addr = g.proxy.addr;
    // A healthy session in the middle of a transaction throughout.
    let mut healthy = g.proxy.client("app").await;
    let tx = healthy.transaction().await.unwrap();
    tx.execute("INSERT INTO notes (body) VALUES ('before')", &[])
        .await
        .unwrap();

    // Garbage instead of a startup packet.
    let r = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.is_empty() || r[0] == b'E', "{r:?}");
    // A wrong protocol version.
    let mut p = startup_packet("postgres", "app");
    p[4..8].copy_from_slice(&(2i32 << 16).to_be_bytes());
    let r = raw_exchange(addr, &p).await;
    assert_eq!(r.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&r).contains("0A000"));
    // An absurd startup length.
    let r = raw_exchange(addr, &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).await;
    assert!(r.is_empty() || r[0] == b'E');
    // Unknown database: 3D000.
    let r = raw_exchange(addr, &startup_packet("postgres", "nope")).await;
    assert!(String::from_utf8_lossy(&r).contains("3D000"));

    // After a good startup: garbage, a truncated message, an oversized one.
    let mut good = startup_packet("postgres", "app");
    good.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 9, 1, 2, 3]);
    let r = raw_exchange(addr, &good).await;
    assert!(String::from_utf8_lossy(&r).contains("08P01"), "{r:?}");
    let mut trunc = startup_packet("postgres", "app");
    trunc.extend_from_slice(&[b'Q', 0, 0, 0, 100, b's', b'e']);
    let r = raw_exchange(addr, &trunc).await;
    assert!(r.contains(&b'Z'), "the session had started: {r:?}");
    let mut big = startup_packet("postgres", "app");
    big.extend_from_slice(&[b'Q', 0x40, 0, 0, 0]);
    let r = raw_exchange(addr, &big).await;
    let text = String::from_utf8_lossy(&r);
    assert!(
        text.contains("54000") && text.contains("larger than the maximum"),
        "{text}"
    );
    let mut neg = startup_packet("postgres", "app");
    neg.extend_from_slice(&[b'Q', 0xff, 0xff, 0xff, 0xf0]);
    let r = raw_exchange(addr, &neg).await;
    assert!(String::from_utf8_lossy(&r).contains("08P01"));
    // A huge Query through a real client is refused too, and says why.
    let c = g.proxy.client("app").await;
    let huge = format!("SELECT '{}'", "x".repeat(2 << 20));
    let e = c.simple_query(&huge).await.unwrap_err();
    assert!(db_text(&e).contains("maximum") || e.is_closed(), "{e:?}");

    // SSL and GSS encryption requests are refused cleanly, then plain text works.
    let mut ssl = vec![0, 0, 0, 8];
    ssl.extend_from_slice(&80877103i32.to_be_bytes());
    ssl.extend_from_slice(&startup_packet("postgres", "app"));
    let r = raw_exchange(addr, &ssl).await;
    assert_eq!(r.first(), Some(&b'N'));
    assert!(r.contains(&b'R'));

    // The healthy session never noticed.
    tx.execute("INSERT INTO notes (body) VALUES ('after')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let n: i64 = healthy
        .query_one(
            "SELECT count(*) FROM notes WHERE body IN ('before', 'after')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

/// Runs a read `n` times in a new session, then ends the session so the
/// nodes flush their statistics.
async fn reads(proxy: &Proxy, sql: &str, n: usize) {
    let c = proxy.client("app").await;
    for _ in 0..n {
        c.simple_query(sql).await.unwrap();
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_subscriber_is_marked_down_and_back_up() {
    let mut g = TestGroup::start(3, |c| {
        c.health.interval_ms = 200;
        c.health.timeout_ms = 400;
        c.health.failures_before_down = 3;
    })
    .await;
    let budget = Duration::from_millis(200 * 3 + 400);
    let status = g.proxy.status().await;
    assert_eq!(status["groups"][0]["primary"], "n1");
    for n in ["n1", "n2", "n3"] {
        assert_eq!(node_state(&status, n), "up");
    }
    let read = "SELECT count(*) FROM items";

    tokio::task::block_in_place(|| g.cluster.nodes[2].stop(reprise::local::StopMode::Fast))
        .unwrap();
    let stopped = std::time::Instant::now();
    let proxy = &g.proxy;
    let took = wait_until(Duration::from_secs(10), || async {
        node_state(&proxy.status().await, "n3") == "down"
    })
    .await
    .expect("n3 marked down");
    let since_stop = stopped.elapsed();
    assert!(
        since_stop <= budget + Duration::from_millis(300),
        "marked down after {since_stop:?} (budget {budget:?}, polled {took:?})"
    );
    // Reads keep working and go to n2 only.
    let before = g.tup_returned_of(&[0, 1]).await;
    reads(&g.proxy, read, 50).await;
    let after = g.tup_returned_of(&[0, 1]).await;
    assert!(
        after[1] - before[1] >= 50 * 100,
        "n2 served the reads: {before:?} -> {after:?}"
    );

    tokio::task::block_in_place(|| g.cluster.nodes[2].start()).unwrap();
    let proxy = &g.proxy;
    wait_until(Duration::from_secs(10), || async {
        node_state(&proxy.status().await, "n3") == "up"
    })
    .await
    .expect("n3 up again");
    let before = g.tup_returned().await;
    reads(&g.proxy, read, 50).await;
    let after = g.tup_returned().await;
    assert!(
        after[2] - before[2] >= 100,
        "n3 serves reads again: {before:?} -> {after:?}"
    );
}

/// A lone BEGIN is answered at once and sent with the statement after it
/// (see the README's routing). Should it not run then (here: the primary
/// is down and no failover comes), the client's block is lost as if its
/// node had died: 08006 for the statement, 25P02 after it, until its
/// ROLLBACK; then the session works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_whose_begin_cannot_run_is_lost_like_one_whose_node_died() {
    let mut g = TestGroup::start(1, |c| {
        c.health.interval_ms = 100;
        c.health.timeout_ms = 300;
        c.health.failures_before_down = 1;
        c.health.failover_wait_ms = 300;
    })
    .await;
    let c = g.proxy.client("app").await;
    c.batch_execute("BEGIN").await.unwrap();
    tokio::task::block_in_place(|| g.cluster.nodes[0].stop(reprise::local::StopMode::Fast))
        .unwrap();
    let proxy = &g.proxy;
    wait_until(Duration::from_secs(10), || async {
        node_state(&proxy.status().await, "n1") == "down"
    })
    .await
    .expect("n1 marked down");
    let e = c
        .batch_execute("SELECT 1")
        .await
        .expect_err("the block's BEGIN could not run");
    assert_eq!(sqlstate(&e), "08006", "{e:?}");
    assert!(db_text(&e).contains("BEGIN could not run"), "{e:?}");
    let e = c.batch_execute("SELECT 2").await.expect_err("block lost");
    assert_eq!(sqlstate(&e), "25P02", "{e:?}");
    tokio::task::block_in_place(|| g.cluster.nodes[0].start()).unwrap();
    wait_until(Duration::from_secs(10), || async {
        node_state(&proxy.status().await, "n1") == "up"
    })
    .await
    .expect("n1 up again");
    c.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 0);
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_admin_console() {
    let g = TestGroup::start(2, |_| {}).await;
    let c = g.proxy.client("app").await;
    c.simple_query("SELECT 1").await.unwrap();
    let s = g.proxy.status().await;
    assert_eq!(s["groups"][0]["name"], "app");
    assert_eq!(s["groups"][0]["term"], 1);
    assert_eq!(s["groups"][0]["nodes"][0]["role"], "primary");
    assert_eq!(s["groups"][0]["nodes"][1]["role"], "subscriber");
    let m = g.proxy.http_get("/metrics").await;
    assert!(
        m.contains("reprise_node_queries_total{group=\"app\",node=\"n2\"}"),
        "{m}"
    );
    // Other tests' servers in this process share the recorder: at least ours.
    let clients: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("reprise_client_connections{group=\"app\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(clients >= 1.0, "{m}");
    let page = g.proxy.http_get("/").await;
    assert!(page.contains("<title>Reprise status</title>"));

    let admin = g.proxy.client("reprise").await;
    let rows = admin.simple_query("SHOW NODES").await.unwrap();
    let names: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(1).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["n1", "n2"]);
    let e = admin.simple_query("FROB").await.unwrap_err();
    assert!(db_text(&e).contains("SHOW NODES"), "{e:?}");
}
