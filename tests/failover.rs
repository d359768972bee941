//! Failover, switchover, rejoin and seeding: the group keeps taking writes
//! when its primary dies, hangs or is replaced on purpose, loses no
//! acknowledged commit, fences the old primary, and every copy ends
//! identical.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use reprise::local::{LocalError, LocalNode, PgBin, StopMode};

/// SQLSTATEs a client may see for a transaction that was running on a
/// primary that failed: connection failure, admin shutdown, transaction
/// resolution unknown (COMMIT in flight), the fencing refusal of an old
/// primary's log append, and "transaction aborted" (25P02) — what the next
/// statement of a lost transaction gets once the session has answered one
/// unit with 08006. tokio-postgres closes each statement it prepared with a
/// Close + Sync it does not wait for; when that unit is the one in flight,
/// the 08006 goes to it and the client's next statement sees 25P02.
const FAILOVER_CODES: &[&str] = &["08006", "57P01", "08007", "40P02", "25P02"];

/// How long every test may run before it fails instead of hanging.
const TEST_LIMIT: Duration = Duration::from_secs(300);

/// Runs a blocking node operation (pg_ctl, signals) on this worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Every writer error has a failover SQLSTATE.
fn assert_failover_codes(logs: &[WriterLog]) {
    for l in logs {
        for e in &l.errors {
            assert!(
                FAILOVER_CODES.contains(&e.code.as_str()),
                "unexpected error {} at {}: {}\nall errors:\n{}",
                e.code,
                e.step,
                e.message,
                describe_errors(logs)
            );
        }
    }
}

/// Prints how long each writer took to get a write acknowledged after
/// `since`, and the errors they saw.
fn report_resumption(what: &str, since: Instant, logs: &[WriterLog]) {
    let times: Vec<Option<Duration>> = logs
        .iter()
        .map(|l| l.first_ok_started_after(since).map(|t| t - since))
        .collect();
    let known: Vec<Duration> = times.iter().flatten().copied().collect();
    eprintln!(
        "{what}: first acknowledged write per writer after {times:?} (first {:?}, last {:?})",
        known.iter().min(),
        known.iter().max()
    );
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for e in logs.iter().flat_map(|l| &l.errors) {
        *codes
            .entry(format!("{} at {}", e.code, e.step))
            .or_default() += 1;
    }
    eprintln!("{what}: errors seen by the writers: {codes:?}");
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    eprintln!("{what}: {acked} transactions acknowledged");
}

/// Asserts that every writer wrote again, on its own connection, after
/// `since`.
fn assert_every_writer_resumed(since: Instant, logs: &[WriterLog]) {
    for (w, l) in logs.iter().enumerate() {
        assert!(
            l.first_ok_started_after(since).is_some(),
            "writer {w} had no write acknowledged afterwards:\n{}",
            describe_errors(logs)
        );
    }
}

/// Records every distinct (primary, term) /status shows until stopped.
struct PrimaryWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(String, u64)>>,
}

impl PrimaryWatch {
    fn start(http: SocketAddr) -> PrimaryWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen: Vec<(String, u64)> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let s = status_at(http).await;
                let now = (primary_of(&s), term_of(&s));
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        });
        PrimaryWatch { stop, task }
    }

    async fn stop(self) -> Vec<(String, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("status watch")
    }
}

/// `reprise.node` (term, role) of a node, or None if it cannot be read
/// within two seconds.
async fn try_term_role(url: &str) -> Option<(i64, String)> {
    let read = async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let row = c
            .query_one("SELECT term, role FROM reprise.node", &[])
            .await
            .ok()?;
        Some((row.get(0), row.get(1)))
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// Writes on `c` until one is acknowledged (each attempt bounded), for at
/// most `limit`; returns the body written and how long it took.
async fn write_until_ok(
    c: &tokio_postgres::Client,
    what: &str,
    limit: Duration,
) -> (String, Duration) {
    let start = Instant::now();
    let mut last = String::new();
    let mut attempt = 0;
    while start.elapsed() < limit {
        attempt += 1;
        let body = format!("{what} {attempt}");
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            c.execute("INSERT INTO notes (body) VALUES ($1)", &[&body]),
        )
        .await;
        match r {
            Ok(Ok(_)) => return (body, start.elapsed()),
            Ok(Err(e)) => last = db_text(&e),
            Err(_) => last = "no answer within 15 s".into(),
        }
        assert!(!c.is_closed(), "the connection was closed: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no write succeeded within {limit:?} on the same connection; last error: {last}");
}

/// Two writes on `c` while no primary can be had: each must fail (not
/// hang, not succeed) with an ErrorResponse within `wait` plus a margin,
/// and the second (which surely waited for a primary) must say so. The
/// connection stays open. Returns the errors' texts.
async fn assert_writes_fail_clearly(c: &tokio_postgres::Client, wait: Duration) -> Vec<String> {
    let limit = wait + Duration::from_secs(10);
    let mut texts = Vec::new();
    for attempt in 0..2 {
        let body = format!("without a primary {attempt}");
        let t = Instant::now();
        let r = tokio::time::timeout(
            limit,
            c.execute("INSERT INTO notes (body) VALUES ($1)", &[&body]),
        )
        .await;
        let took = t.elapsed();
        let e = match r {
            Err(_) => {
                panic!("write {attempt} still waiting after {limit:?}: it must fail, not hang")
            }
            Ok(Ok(_)) => panic!("write {attempt} succeeded although no node could be primary"),
            Ok(Err(e)) => e,
        };
        eprintln!(
            "write {attempt} without a primary failed after {took:?}: {}",
            db_text(&e)
        );
        assert!(
            e.as_db_error().is_some(),
            "an ErrorResponse, not a dropped connection: {e:?}"
        );
        assert!(!c.is_closed(), "the client connection stays open");
        texts.push(db_text(&e));
    }
    let last = texts[1].to_lowercase();
    assert!(
        last.contains("primary") || last.contains("failover"),
        "the error says that there is no primary: {}",
        texts[1]
    );
    texts
}

/// How the primary dies.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// SIGKILL of the postmaster and every child.
    Everything,
    /// SIGKILL of the postmaster alone: its backends live on until they
    /// notice, as after a crash of the postmaster process.
    PostmasterOnly,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_under_load_fails_over_without_losing_acknowledged_commits() {
    kill_primary_under_load(Kill::Everything).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_only_the_primarys_postmaster_fails_over_the_same_way() {
    kill_primary_under_load(Kill::PostmasterOnly).await;
}

async fn kill_primary_under_load(how: Kill) {
    bounded(TEST_LIMIT, async move {
        let mut g = TestGroup::start(3, |c| c.replication.sync_replicas = 1).await;
        let writers = Writers::start(&g.proxy.url("app"), "k", 4).await;
        // A session idle inside a transaction when the primary dies.
        let idle = g.proxy.client("app").await;
        idle.batch_execute("BEGIN").await.unwrap();
        idle.execute("INSERT INTO notes (body) VALUES ('idle in transaction')", &[])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;

        match how {
            Kill::Everything => blocking(|| g.cluster.nodes[0].kill()).unwrap(),
            Kill::PostmasterOnly => {
                let pid = g.cluster.nodes[0].postmaster_pid().expect("n1 runs");
                // SAFETY: a plain kill(2) of a process this test started.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            }
        }
        let killed = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Its transaction is gone with the primary: the next statement of
        // that transaction gets an error, not a run elsewhere without it.
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            idle.execute(
                "UPDATE notes SET body = 'idle, then updated' WHERE body = 'idle in transaction'",
                &[],
            ),
        )
        .await
        .expect("the statement after the loss answers");
        match &r {
            Ok(n) => panic!(
                "the UPDATE of a transaction whose primary died ran anyway ({n} rows): \
                 it must fail with one of {FAILOVER_CODES:?}"
            ),
            Err(e) => {
                eprintln!("the idle transaction's next statement: {}", db_text(e));
                assert!(
                    FAILOVER_CODES.contains(&sqlstate(e).as_str()),
                    "{}",
                    db_text(e)
                );
            }
        }
        assert!(!idle.is_closed(), "the idle session keeps its connection");
        idle.batch_execute("ROLLBACK").await.unwrap();
        write_until_ok(&idle, "idle session, next transaction", Duration::from_secs(30)).await;
        writers
            .wait_all_acked_since(killed, Duration::from_secs(60))
            .await;
        let logs = writers.stop().await;
        report_resumption("after the kill of n1", killed, &logs);
        assert_writers_kept_connections(&logs);
        assert_every_writer_resumed(killed, &logs);
        assert_failover_codes(&logs);

        let status = g.proxy.status().await;
        let primary = primary_of(&status);
        let term = term_of(&status);
        eprintln!("new primary {primary} at term {term}");
        assert!(
            primary == "n2" || primary == "n3",
            "a surviving node is primary: {status:#}"
        );
        assert!(term > 1, "the term was raised: {status:#}");
        let p = index_of(&g, &primary);
        assert_eq!(
            node_term_role(&g, p).await,
            (term as i64, "primary".to_string()),
            "the new primary records its term and role"
        );
        let acked = all_acked(&logs);
        assert_identical_on(&g, &[1, 2], LogCheck::Full).await;
        assert_present_once_on(&g, &[1, 2], &acked).await;
        for i in [1, 2] {
            assert_no_duplicate_notes(&g, i).await;
            let n: i64 = g
                .direct(i)
                .await
                .query_one(
                    "SELECT count(*) FROM notes WHERE body LIKE 'idle%transaction' OR body LIKE 'idle, then%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0, "the uncommitted transaction left nothing behind");
        }

        // The old primary comes back: demoted first, then caught up, or
        // divergent (a commit in flight at the kill) and re-seeded.
        // Orphaned backends of a killed postmaster exit once they notice;
        // until then the data directory cannot be started again.
        let mut started = blocking(|| g.cluster.nodes[0].start());
        for _ in 0..60 {
            if started.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            started = blocking(|| g.cluster.nodes[0].start());
        }
        started.unwrap();
        eprintln!("{how:?}: n1 restarted");
        let back = Instant::now();
        let state = wait_node_state(
            &g.proxy,
            "n1",
            &["up", "divergent"],
            Duration::from_secs(120),
        )
        .await;
        eprintln!("n1 is {state:?} {:?} after its restart", back.elapsed());
        assert!(
            state.is_some(),
            "n1 neither rejoined nor was found divergent: {:#}",
            g.proxy.status().await
        );
        reseed_if_divergent(&g, 0).await;
        assert_identical_on(&g, &[0, 1, 2], LogCheck::Head).await;
        assert_present_once(&g, &acked).await;
        assert_no_duplicate_notes(&g, 0).await;
        let status = g.proxy.status().await;
        assert_eq!(primary_of(&status), primary, "the rejoin kept the primary");
        assert_eq!(
            node_term_role(&g, 0).await,
            (term_of(&status) as i64, "subscriber".to_string()),
            "the old primary is a subscriber of the current term"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_primary_is_replaced_and_rejoins_without_taking_writes() {
    bounded(TEST_LIMIT, async move {
        let g = TestGroup::start(3, |c| c.replication.sync_replicas = 1).await;
        let writers = Writers::start(&g.proxy.url("app"), "p", 4).await;
        tokio::time::sleep(Duration::from_secs(1)).await;

        blocking(|| g.cluster.nodes[0].pause()).unwrap();
        let paused = Instant::now();
        let resumed = writers
            .wait_all_acked_since(paused, Duration::from_secs(60))
            .await;
        report_resumption("after the pause of n1", paused, &writers.snapshot());
        assert!(
            resumed,
            "the writers did not all write again while n1 hangs:\n{}",
            describe_errors(&writers.snapshot())
        );
        let status = g.proxy.status().await;
        let (primary, term) = (primary_of(&status), term_of(&status));
        eprintln!("new primary {primary} at term {term}");
        assert!(
            primary != "n1" && term > 1,
            "a new primary of a new term: {status:#}"
        );

        // The hung primary wakes up: it is fenced and never takes writes.
        let watch = PrimaryWatch::start(g.proxy.http);
        blocking(|| g.cluster.nodes[0].resume()).unwrap();
        let woke = Instant::now();
        let n1_url = g.node(0).url("app");
        let fenced = wait_until(Duration::from_secs(30), || async {
            try_term_role(&n1_url).await == Some((term as i64, "subscriber".to_string()))
        })
        .await;
        eprintln!(
            "n1 after it woke up: {:?} (fenced after {fenced:?})",
            try_term_role(&n1_url).await
        );
        assert!(
            fenced.is_some(),
            "n1's reprise.node was not set to subscriber at term {term}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let again = writers
            .wait_all_acked_since(woke, Duration::from_secs(30))
            .await;
        let logs = writers.stop().await;
        let seen = watch.stop().await;
        assert!(
            again,
            "writes after n1 woke up:\n{}",
            describe_errors(&logs)
        );
        assert_writers_kept_connections(&logs);
        assert_every_writer_resumed(paused, &logs);
        assert_failover_codes(&logs);
        assert_eq!(
            seen,
            vec![(primary.clone(), term)],
            "the primary stayed {primary} at term {term} after n1 woke up"
        );

        let state = wait_node_state(
            &g.proxy,
            "n1",
            &["up", "divergent"],
            Duration::from_secs(120),
        )
        .await;
        assert!(
            state.is_some(),
            "n1 neither rejoined nor was found divergent: {:#}",
            g.proxy.status().await
        );
        // Entries of the new term on n1 can only be replayed ones: the same
        // seq and hash as on the new primary.
        let p = index_of(&g, &primary);
        let mine = g
            .direct(0)
            .await
            .query(
                "SELECT seq, hash FROM reprise.log WHERE term >= $1 ORDER BY seq",
                &[&(term as i64)],
            )
            .await
            .unwrap();
        let seqs: Vec<i64> = mine.iter().map(|r| r.get(0)).collect();
        let theirs: std::collections::HashMap<i64, String> = g
            .direct(p)
            .await
            .query(
                "SELECT seq, hash FROM reprise.log WHERE seq = ANY($1)",
                &[&seqs],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for r in &mine {
            let (seq, hash): (i64, String) = (r.get(0), r.get(1));
            assert_eq!(
                theirs.get(&seq),
                Some(&hash),
                "n1 holds an entry {seq} of term {term} that {primary} does not"
            );
        }
        eprintln!(
            "n1 is {state:?}; it holds {} entries of term {term}",
            mine.len()
        );
        if state.as_deref() == Some("divergent") {
            // A divergent node replays nothing: none of the writes made
            // after it woke up may be there.
            let later: Vec<String> = logs
                .iter()
                .flat_map(|l| l.acked_started_after(woke))
                .collect();
            let n: i64 = g
                .direct(0)
                .await
                .query_one("SELECT count(*) FROM notes WHERE body = ANY($1)", &[&later])
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                n, 0,
                "writes made after n1 woke up landed on the divergent n1"
            );
            reseed_if_divergent(&g, 0).await;
        }
        let acked = all_acked(&logs);
        assert_identical_on(&g, &[0, 1, 2], LogCheck::Head).await;
        assert_present_once(&g, &acked).await;
        for i in 0..3 {
            assert_no_duplicate_notes(&g, i).await;
        }
        let status = g.proxy.status().await;
        assert_eq!(primary_of(&status), primary);
        assert_eq!(
            node_term_role(&g, 0).await,
            (term_of(&status) as i64, "subscriber".to_string())
        );
    })
    .await;
}

/// Right after a switchover, a table made with a volatile default and
/// written at once has the default's values captured as anywhere else:
/// the table catalog the write waits for is loaded from the new primary,
/// not from the old one, which may not have applied the CREATE TABLE yet
/// (its values were then computed on each copy and differed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_right_after_a_switchover_capture_volatile_defaults() {
    bounded(TEST_LIMIT, async move {
        let g = TestGroup::start(3, |_| {}).await;
        let c = g.proxy.client("app").await;
        for (round, target) in ["n2", "n3", "n1", "n2"].iter().enumerate() {
            admin(&g.proxy, &format!("SWITCHOVER app TO {target}"))
                .await
                .unwrap_or_else(|e| panic!("SWITCHOVER app TO {target}: {e}"));
            for sql in [
                format!("CREATE TABLE fresh_{round} (id int PRIMARY KEY, u uuid DEFAULT gen_random_uuid())"),
                format!("INSERT INTO fresh_{round} (id) SELECT g FROM generate_series(1, 100) g"),
                format!("INSERT INTO fresh_{round} (id) VALUES (101)"),
            ] {
                c.batch_execute(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {}", db_text(&e)));
            }
        }
        wait_caught_up(&g, &[0, 1, 2], Duration::from_secs(30)).await;
        assert_identical(&g).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_nothing() {
    bounded(TEST_LIMIT, async move {
        let g = TestGroup::start(3, |_| {}).await;
        let writers = Writers::start(&g.proxy.url("app"), "s", 4).await;
        tokio::time::sleep(Duration::from_secs(1)).await;

        for (target, old) in [("n2", "n1"), ("n1", "n2")] {
            let before = term_of(&g.proxy.status().await);
            let asked = Instant::now();
            let rows = tokio::time::timeout(
                Duration::from_secs(120),
                admin_named(&g.proxy, &format!("SWITCHOVER app TO {target}")),
            )
            .await
            .expect("SWITCHOVER finishes")
            .unwrap_or_else(|e| panic!("SWITCHOVER app TO {target}: {e}"));
            let done = Instant::now();
            assert_eq!(rows.len(), 1, "SWITCHOVER returns one row: {rows:?}");
            let row = &rows[0];
            eprintln!(
                "SWITCHOVER app TO {target} took {:?}: {row:?}",
                done - asked
            );
            assert_eq!(column(row, "group"), "app");
            assert_eq!(column(row, "old_primary"), old);
            assert_eq!(column(row, "new_primary"), target);
            let term: u64 = column(row, "term").parse().expect("term is a number");
            assert!(term > before, "term {term} after {before}");
            let pause: u64 = column(row, "write_pause_ms")
                .parse()
                .expect("write_pause_ms is a number");
            eprintln!("writes paused {pause} ms");

            let status = g.proxy.status().await;
            assert_eq!(primary_of(&status), target, "{status:#}");
            assert_eq!(term_of(&status), term);
            let continued = writers
                .wait_all_acked_since(done, Duration::from_secs(30))
                .await;
            let logs = writers.snapshot();
            assert!(continued, "writes continue after the switchover");
            let gaps: Vec<Duration> = logs
                .iter()
                .map(|l| {
                    l.longest_gap(
                        asked - Duration::from_millis(500),
                        done + Duration::from_secs(1),
                    )
                })
                .collect();
            eprintln!("longest gap between acknowledged writes per writer: {gaps:?}");
            eprintln!("client errors so far:\n{}", describe_errors(&logs));
            let (t, role) = node_term_role(&g, index_of(&g, target)).await;
            assert_eq!((t as u64, role.as_str()), (term, "primary"));
            let (_, role) = node_term_role(&g, index_of(&g, old)).await;
            assert_eq!(role, "subscriber", "{old} was demoted");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        let logs = writers.stop().await;
        assert!(
            describe_errors(&logs).is_empty(),
            "no client transaction fails in a switchover:\n{}",
            describe_errors(&logs)
        );
        let acked = all_acked(&logs);
        eprintln!("{} transactions acknowledged", acked.len());
        assert_identical(&g).await;
        assert_present_once(&g, &acked).await;
        for i in 0..3 {
            assert_no_duplicate_notes(&g, i).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_restarted_in_turn_and_a_fresh_node_end_identical() {
    bounded(TEST_LIMIT, async move {
        let mut g = TestGroup::start(3, |_| {}).await;
        let writers = Writers::start(&g.proxy.url("app"), "r", 4).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in [1, 2] {
            let name = g.cluster.nodes[i].name.clone();
            blocking(|| g.cluster.nodes[i].stop(StopMode::Fast)).unwrap();
            let down = wait_node_state(&g.proxy, &name, &["down"], Duration::from_secs(30)).await;
            assert!(down.is_some(), "{name} was not marked down");
            tokio::time::sleep(Duration::from_secs(1)).await;
            blocking(|| g.cluster.nodes[i].start()).unwrap();
            let up = wait_node_state(&g.proxy, &name, &["up"], Duration::from_secs(60)).await;
            assert!(
                up.is_some(),
                "{name} did not come back up: {:#}",
                g.proxy.status().await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let logs = writers.stop().await;
        assert!(
            describe_errors(&logs).is_empty(),
            "restarting subscribers fails no write:\n{}",
            describe_errors(&logs)
        );
        let mut acked = all_acked(&logs);
        assert_identical(&g).await;
        assert_present_once(&g, &acked).await;

        // A fresh node with an empty database joins the group.
        let dir = g.cluster.dir.join("n4");
        let fresh = blocking(|| -> Result<LocalNode, LocalError> {
            let mut n = LocalNode::init(&PgBin::find()?, "n4", &dir)?;
            for (k, v) in TEST_SETTINGS {
                n.set(k, v);
            }
            n.start()?;
            n.create_database("app")?;
            Ok(n)
        })
        .unwrap();
        g.proxy.stop().await;
        g.cluster.nodes.push(fresh);
        let config = g.config();
        let asked = Instant::now();
        g.proxy = Proxy::start(config).await;
        let writers = Writers::start(&g.proxy.url("app"), "f", 4).await;
        let state = wait_node_state(
            &g.proxy,
            "n4",
            &["up", "divergent"],
            Duration::from_secs(180),
        )
        .await;
        eprintln!("n4 {state:?} {:?} after the proxy started", asked.elapsed());
        assert_eq!(
            state.as_deref(),
            Some("up"),
            "the fresh node n4 was not seeded: {:#}",
            g.proxy.status().await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let logs = writers.stop().await;
        assert!(
            describe_errors(&logs).is_empty(),
            "seeding a node fails no write:\n{}",
            describe_errors(&logs)
        );
        acked.extend(all_acked(&logs));
        assert_identical_on(&g, &[0, 1, 2, 3], LogCheck::Head).await;
        assert_present_once(&g, &acked).await;
        assert_no_duplicate_notes(&g, 3).await;
        let (_, role) = node_term_role(&g, 3).await;
        assert_eq!(role, "subscriber");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_promotable_primary_makes_writes_wait_then_fail_clearly() {
    bounded(TEST_LIMIT, async move {
        let wait = Duration::from_millis(1500);
        let mut g = TestGroup::start(2, |c| c.health.failover_wait_ms = 1500).await;
        let c = g.proxy.client("app").await;
        c.execute("INSERT INTO notes (body) VALUES ('before')", &[])
            .await
            .unwrap();
        blocking(|| g.cluster.nodes[1].stop(StopMode::Fast)).unwrap();
        let down = wait_node_state(&g.proxy, "n2", &["down"], Duration::from_secs(30)).await;
        assert!(down.is_some(), "n2 was not marked down");
        blocking(|| g.cluster.nodes[0].kill()).unwrap();
        let down = wait_node_state(&g.proxy, "n1", &["down"], Duration::from_secs(30)).await;
        assert!(down.is_some(), "n1 was not marked down");

        assert_writes_fail_clearly(&c, wait).await;

        blocking(|| g.cluster.nodes[0].start()).unwrap();
        let (body, took) = write_until_ok(&c, "after n1 restarted", Duration::from_secs(60)).await;
        eprintln!("a write on the same connection succeeded {took:?} after n1 restarted");
        let n: i64 = g
            .direct(0)
            .await
            .query_one("SELECT count(*) FROM notes WHERE body = $1", &[&body])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        assert_eq!(primary_of(&g.proxy.status().await), "n1");
    })
    .await;
}

/// Writes `n` notes one by one (each must be acknowledged within 30 s)
/// while n2 hangs; returns their bodies.
async fn notes_while_n2_hangs(c: &tokio_postgres::Client, n: usize) -> Vec<String> {
    let mut acked = Vec::new();
    for i in 0..n {
        let body = format!("while n2 hangs {i}");
        tokio::time::timeout(
            Duration::from_secs(30),
            c.execute("INSERT INTO notes (body) VALUES ($1)", &[&body]),
        )
        .await
        .expect("write while n2 hangs")
        .unwrap();
        acked.push(body);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_is_refused_when_it_could_lose_an_acknowledged_commit() {
    bounded(TEST_LIMIT, async move {
        let wait = Duration::from_millis(1500);
        let mut g = TestGroup::start(3, |c| {
            c.replication.sync_replicas = 1;
            c.health.failover_wait_ms = 1500;
        })
        .await;
        let c = g.proxy.client("app").await;
        c.execute("INSERT INTO notes (body) VALUES ('before')", &[])
            .await
            .unwrap();
        assert_identical(&g).await;

        // n2 stops applying; n3 acknowledges the next commits alone. n2 is
        // marked down first: an applier that is still running takes the
        // proxy's own recent commits from memory, which would let n2 catch
        // up even after the primary dies.
        blocking(|| g.cluster.nodes[1].pause()).unwrap();
        let n2_down = wait_node_state(&g.proxy, "n2", &["down"], Duration::from_secs(30)).await;
        assert!(n2_down.is_some(), "the paused n2 was not marked down");
        let acked = notes_while_n2_hangs(&c, 20).await;
        let on_n3: i64 = g
            .direct(2)
            .await
            .query_one("SELECT count(*) FROM notes WHERE body = ANY($1)", &[&acked])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            on_n3, 20,
            "sync_replicas = 1: n3 has every acknowledged commit"
        );

        // Only n2 is left, and it lacks acknowledged commits.
        blocking(|| g.cluster.nodes[2].stop(StopMode::Fast)).unwrap();
        blocking(|| g.cluster.nodes[0].kill()).unwrap();
        blocking(|| g.cluster.nodes[1].resume()).unwrap();
        let watch = PrimaryWatch::start(g.proxy.http);
        let down = wait_node_state(&g.proxy, "n1", &["down"], Duration::from_secs(30)).await;
        assert!(down.is_some(), "n1 was not marked down");
        assert_writes_fail_clearly(&c, wait).await;
        // Time in which a wrong promotion of n2 would show.
        tokio::time::sleep(Duration::from_secs(2)).await;

        // n3 returns with every acknowledged commit: it is promoted.
        blocking(|| g.cluster.nodes[2].start()).unwrap();
        let proxy = &g.proxy;
        let promoted = wait_until(Duration::from_secs(60), || async {
            primary_of(&proxy.status().await) == "n3"
        })
        .await;
        eprintln!("n3 promoted {promoted:?} after its restart");
        assert!(
            promoted.is_some(),
            "n3 was not promoted: {:#}",
            g.proxy.status().await
        );
        let (_, took) = write_until_ok(&c, "after n3 returned", Duration::from_secs(60)).await;
        eprintln!("a write on the same connection succeeded {took:?} after n3 was promoted");
        let seen = watch.stop().await;
        eprintln!("primaries seen: {seen:?}");
        assert!(
            !seen.iter().any(|(p, _)| p == "n2"),
            "n2 lacked acknowledged commits but was promoted: {seen:?}"
        );
        assert_identical_on(&g, &[1, 2], LogCheck::Full).await;
        assert_present_once_on(&g, &[1, 2], &acked).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_catches_up_on_the_proxys_commits_after_the_primary_died() {
    bounded(TEST_LIMIT, async move {
        // Slow failure detection: the paused subscriber stays `up`, and the
        // dead primary is not replaced while the test looks.
        let mut g = TestGroup::start(2, |c| {
            c.health.interval_ms = 200;
            c.health.failures_before_down = 500;
        })
        .await;
        let c = g.proxy.client("app").await;
        c.execute("INSERT INTO notes (body) VALUES ('before')", &[])
            .await
            .unwrap();
        assert_identical(&g).await;

        // n2 hangs while commits are acknowledged by the primary alone.
        blocking(|| g.cluster.nodes[1].pause()).unwrap();
        let acked = notes_while_n2_hangs(&c, 30).await;
        // The primary dies with them; then n2 answers again. Its applier
        // replays them from the rows this proxy's sessions committed: the
        // primary's log cannot be read any more.
        blocking(|| g.cluster.nodes[0].kill()).unwrap();
        blocking(|| g.cluster.nodes[1].resume()).unwrap();
        let n2 = g.direct(1).await;
        let caught_up = wait_until(Duration::from_secs(30), || async {
            let n: i64 = n2
                .query_one("SELECT count(*) FROM notes WHERE body = ANY($1)", &[&acked])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            n == acked.len() as i64
        })
        .await;
        assert!(
            caught_up.is_some(),
            "n2 did not replay the commits acknowledged while it hung: {:#}",
            g.proxy.status().await
        );
        // As the primary logged them: the same log rows, hash chain intact.
        let log: Vec<(i64, String, String)> = n2
            .query(
                "SELECT seq, prev_hash, hash FROM reprise.log ORDER BY seq",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert!(log.len() > acked.len(), "log rows on n2: {}", log.len());
        for pair in log.windows(2) {
            assert_eq!(pair[1].0, pair[0].0 + 1, "seqs follow each other");
            assert_eq!(
                pair[1].1, pair[0].2,
                "entry {} continues the chain",
                pair[1].0
            );
        }
        let n: i64 = n2
            .query_one("SELECT count(*) FROM notes", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, acked.len() as i64 + 1, "no row twice, none missing");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_in_flight_on_a_dying_node_is_retried_elsewhere() {
    bounded(TEST_LIMIT, async move {
        const READ: &str = "SELECT count(*) FROM generate_series(1, 2000000)";
        let mut g = TestGroup::start(3, |_| {}).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..4 {
            let c = g.proxy.client("app").await;
            let stop = stop.clone();
            readers.push(tokio::spawn(async move {
                let mut done = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = tokio::time::timeout(Duration::from_secs(30), c.query_one(READ, &[]))
                        .await
                        .expect("a read finishes");
                    let n: Result<i64, String> = r.map(|row| row.get(0)).map_err(|e| db_text(&e));
                    done.push((Instant::now(), n));
                }
                (done, c.is_closed())
            }));
        }
        // Kill n3 while it runs one of the reads.
        let n3 = g.direct(2).await;
        let running = wait_until(Duration::from_secs(20), || async {
            n3.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                 AND query LIKE '%generate_series(1, 2000000)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
        })
        .await;
        assert!(running.is_some(), "no read ran on n3");
        drop(n3);
        blocking(|| g.cluster.nodes[2].kill()).unwrap();
        let killed = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        for (r, t) in readers.into_iter().enumerate() {
            let (done, closed) = t.await.unwrap();
            assert!(!closed, "reader {r} lost its connection");
            for (_, n) in &done {
                assert_eq!(n, &Ok(2_000_000), "reader {r}");
            }
            assert!(
                done.iter().any(|(at, _)| *at > killed),
                "reader {r} read after the kill"
            );
            eprintln!("reader {r}: {} reads, all correct", done.len());
        }
    })
    .await;
}

/// Values captured on the primary (row capture) are kept in every copy's
/// log: a node that was down catches up after a switchover from the new
/// primary's log — entries that primary only replayed — and ends identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_values_survive_a_switchover_and_a_catch_up_from_the_new_primary() {
    bounded(TEST_LIMIT, async move {
        let mut g = TestGroup::start(3, |_| {}).await;
        let c = g.proxy.client("app").await;
        c.batch_execute(
            "CREATE TABLE cap (id int PRIMARY KEY, u uuid DEFAULT gen_random_uuid(), x float8)",
        )
        .await
        .unwrap();
        let n3 = g.cluster.nodes[2].name.clone();
        blocking(|| g.cluster.nodes[2].stop(StopMode::Fast)).unwrap();
        let down = wait_node_state(&g.proxy, &n3, &["down"], Duration::from_secs(30)).await;
        assert!(down.is_some(), "{n3} was not marked down");
        let insert = c
            .prepare("INSERT INTO cap (id, x) VALUES ($1, random())")
            .await
            .unwrap();
        for id in 0..20i32 {
            c.execute(&insert, &[&id]).await.unwrap();
        }
        let target = g.cluster.nodes[1].name.clone();
        admin_named(&g.proxy, &format!("SWITCHOVER app TO {target}"))
            .await
            .expect("SWITCHOVER finishes");
        blocking(|| g.cluster.nodes[2].start()).unwrap();
        let up = wait_node_state(&g.proxy, &n3, &["up"], Duration::from_secs(60)).await;
        assert!(
            up.is_some(),
            "{n3} did not come back: {:#}",
            g.proxy.status().await
        );
        let c = g.proxy.client("app").await;
        for id in 20..25i32 {
            c.execute("INSERT INTO cap (id, x) VALUES ($1, random())", &[&id])
                .await
                .unwrap();
        }
        assert_eq!(primary_of(&g.proxy.status().await), target);
        let n: i64 = c
            .query_one("SELECT count(DISTINCT u) + count(DISTINCT x) FROM cap", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 50);
        assert_identical(&g).await;
    })
    .await;
}
