//! The integration-test harness: real PostgreSQL copies started with
//! `reprise::local`, and the proxy running in-process on port 0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reprise::config::Config;
use reprise::local::{LocalCluster, LocalError, LocalNode};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Schema and rows every copy starts with.
pub const SEED_SQL: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2), tags text[], meta jsonb, data bytea, seen timestamptz);
INSERT INTO items SELECT g, 'item ' || g, g * 1.5, ARRAY['t' || g], jsonb_build_object('n', g), decode(md5(g::text), 'hex'), '2024-01-01'::timestamptz + g * interval '1 hour' FROM generate_series(1, 100) g;
CREATE TABLE notes (id serial PRIMARY KEY, body text);
";

/// A group of local copies with the proxy in front.
pub struct TestGroup {
    pub cluster: LocalCluster,
    pub proxy: Proxy,
    _dir: Option<tempfile::TempDir>,
}

/// The proxy running in-process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Proxy {
    /// Starts the proxy with a config.
    pub async fn start(config: Config) -> Proxy {
        let server = reprise::Server::bind(config).await.expect("proxy binds");
        let addr = server.client_addr();
        let http = server.http_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Proxy {
            addr,
            http,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the proxy and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }

    /// Kills the proxy abruptly: its tasks are dropped mid-flight, like a
    /// SIGKILL of the process (every client and node connection is cut).
    pub fn kill(&mut self) {
        self.stop.take();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// libpq URL of a database through the proxy.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}/{db}", self.addr)
    }

    /// GET a path on the HTTP port.
    pub async fn http_get(&self, path: &str) -> String {
        http_get_at(self.http, path).await
    }

    /// /status as JSON.
    pub async fn status(&self) -> serde_json::Value {
        status_at(self.http).await
    }

    /// A tokio-postgres client through the proxy.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        connect(&self.url(db)).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// GET a path on a proxy's HTTP address.
pub async fn http_get_at(http: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// /status of a proxy's HTTP address, as JSON.
pub async fn status_at(http: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http_get_at(http, "/status").await).expect("status JSON")
}

/// Connects with tokio-postgres and drives the connection in a task.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Fast settings for test servers.
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    // Lock waits in the node logs, to explain a slow test.
    ("log_lock_waits", "on"),
    ("deadlock_timeout", "200ms"),
];

/// The harness's proxy config for a cluster: ports picked by the system,
/// a probe every 200 ms failing after 500 ms, two failures mark a node down.
pub fn test_config(cluster: &LocalCluster) -> Config {
    let mut config = cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");
    config.health.interval_ms = 200;
    config.health.timeout_ms = 500;
    config.health.failures_before_down = 2;
    config
}

impl Drop for TestGroup {
    /// REPRISE_KEEP=1 keeps the nodes' directories (and logs) for a look.
    fn drop(&mut self) {
        if std::env::var_os("REPRISE_KEEP").is_some()
            && let Some(d) = self._dir.take()
        {
            eprintln!("kept {}", d.keep().display());
        }
    }
}

impl TestGroup {
    /// `n` identical copies of database `app` seeded with SEED_SQL, and the
    /// proxy in front with `tweak` applied to its config.
    pub async fn start(n: usize, tweak: impl FnOnce(&mut Config)) -> TestGroup {
        Self::start_with(n, SEED_SQL, tweak).await
    }

    /// Same, with another seed script (run with psql on the first copy).
    pub async fn start_with(n: usize, seed: &str, tweak: impl FnOnce(&mut Config)) -> TestGroup {
        Self::start_with_settings(n, seed, &[], tweak).await
    }

    /// Same, with server settings added to (or replacing) [`TEST_SETTINGS`]
    /// on every copy, e.g. `("log_statement", "mod")`.
    pub async fn start_with_settings(
        n: usize,
        seed: &str,
        extra: &[(&str, &str)],
        tweak: impl FnOnce(&mut Config),
    ) -> TestGroup {
        Self::start_prepared(n, seed, extra, |_| Ok(()), tweak).await
    }

    /// Same, with `prepare` run on the first copy after the seed script,
    /// before it is stopped and copied (files in the data dir, pg_hba.conf,
    /// ALTER SYSTEM: every copy starts with them).
    pub async fn start_prepared(
        n: usize,
        seed: &str,
        extra: &[(&str, &str)],
        prepare: impl FnOnce(&LocalNode) -> Result<(), LocalError> + Send + 'static,
        tweak: impl FnOnce(&mut Config),
    ) -> TestGroup {
        // REPRISE_LOG=info (or debug) shows the proxy's log in test output.
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("REPRISE_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::Builder::new()
            .prefix("reprise-t")
            .tempdir()
            .unwrap();
        let path = dir.path().to_path_buf();
        let seed = seed.to_string();
        let settings: Vec<(String, String)> = TEST_SETTINGS
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cluster = tokio::task::spawn_blocking(move || {
            let settings: Vec<(&str, &str)> = settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            LocalCluster::create(&path, n, "app", &settings, |node| {
                if !seed.trim().is_empty() {
                    node.psql("app", &seed)?;
                }
                prepare(node)
            })
        })
        .await
        .unwrap()
        .expect("local copies start");
        let mut config = test_config(&cluster);
        tweak(&mut config);
        let proxy = Proxy::start(config).await;
        TestGroup {
            cluster,
            proxy,
            _dir: Some(dir),
        }
    }

    /// A proxy config naming every node of the cluster (as it is now),
    /// with the harness's health settings.
    pub fn config(&self) -> Config {
        test_config(&self.cluster)
    }

    pub fn node(&self, i: usize) -> &LocalNode {
        &self.cluster.nodes[i]
    }

    /// A direct tokio-postgres client to node `i`.
    pub async fn direct(&self, i: usize) -> tokio_postgres::Client {
        connect(&self.node(i).url("app")).await
    }

    /// Rows returned per node (pg_stat_database.tup_returned), to see where
    /// reads landed. Backends flush these when they exit, so end the
    /// sessions whose reads you count first.
    pub async fn tup_returned(&self) -> Vec<i64> {
        let all: Vec<usize> = (0..self.cluster.nodes.len()).collect();
        self.tup_returned_of(&all).await
    }

    /// The same for some nodes only (the others may be down).
    pub async fn tup_returned_of(&self, nodes: &[usize]) -> Vec<i64> {
        let mut out = vec![];
        for &i in nodes {
            let c = self.direct(i).await;
            let row = c
                .query_one(
                    "SELECT tup_returned FROM pg_stat_database WHERE datname = 'app'",
                    &[],
                )
                .await
                .unwrap();
            out.push(row.get::<_, i64>(0));
        }
        out
    }
}

/// Runs a command, returning its output (panics if it cannot start).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// psql through a URL with a script on stdin; returns (status ok, stdout, stderr).
pub fn psql(url: &str, script: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("psql")
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Path of a PostgreSQL tool (pgbench, pg_dump…).
pub fn pg_tool(name: &str) -> std::path::PathBuf {
    reprise::local::PgBin::find()
        .expect("PostgreSQL binaries")
        .tool(name)
}

/// Polls `f` until it returns true or `limit` passes; returns the time it took.
pub async fn wait_until<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The state of a node in /status.
pub fn node_state(status: &serde_json::Value, node: &str) -> String {
    status["groups"][0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Seeds pgbench tables on a local node.
pub fn pgbench_init(node: &LocalNode, scale: u32) -> Result<(), LocalError> {
    reprise::local::pgbench_init(node, "app", scale)
}

/// The server's message and hint of a database error, for assertions.
pub fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{} {} {}",
            d.code().code(),
            d.message(),
            d.hint().unwrap_or_default()
        ),
        None => e.to_string(),
    }
}

/// Runs a test body in its own task and fails the test if it takes longer
/// than `limit`, so a hang fails instead of blocking CI. A panic in the body
/// is passed on.
pub async fn bounded<F>(limit: Duration, body: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task = tokio::spawn(body);
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(e)) => panic!("test body failed: {e}"),
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Which part of `reprise.log` two copies must share to count as identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogCheck {
    /// Every log row (seq, term, payload, hashes, commit time).
    Full,
    /// The head entry's seq, term and hash only: the hash chain makes equal
    /// heads mean equal histories, and a re-seeded node may hold only the
    /// tail of the log.
    Head,
}

/// The first column of what a query returns, as text.
pub async fn strings(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until every node has applied the head, then checks that every
/// user table and sequence (and the whole log) is identical on every copy.
pub async fn assert_identical(g: &TestGroup) {
    let all: Vec<usize> = (0..g.cluster.nodes.len()).collect();
    assert_identical_on(g, &all, LogCheck::Full).await;
}

/// Waits until the nodes `nodes` (indices) are up and have applied the
/// head, then checks that their user tables, sequences and logs (as `log`
/// says) are identical. Other nodes may be down.
pub async fn assert_identical_on(g: &TestGroup, nodes: &[usize], log: LogCheck) {
    if let Err(e) = check_identical_on(g, nodes, log).await {
        panic!("{e}");
    }
}

/// [`assert_identical_on`] returning what differs instead of panicking.
pub async fn check_identical_on(
    g: &TestGroup,
    nodes: &[usize],
    log: LogCheck,
) -> Result<(), String> {
    let names: Vec<String> = nodes
        .iter()
        .map(|&i| g.cluster.nodes[i].name.clone())
        .collect();
    if wait_caught_up(g, nodes, Duration::from_secs(60))
        .await
        .is_none()
    {
        let status = g.proxy.status().await;
        return Err(format!("copies {names:?} did not catch up: {status:#}"));
    }
    let mut digests = Vec::new();
    for &i in nodes {
        digests.push(digest_with(&g.direct(i).await, log).await);
    }
    for (k, d) in digests.iter().enumerate().skip(1) {
        if &digests[0] != d {
            return Err(format!(
                "node {} differs from node {}:\n{}",
                names[k],
                names[0],
                digest_diff(&digests[0], d)
            ));
        }
    }
    Ok(())
}

/// The entries of two digests that differ, one per line.
fn digest_diff(a: &[(String, String)], b: &[(String, String)]) -> String {
    let find = |d: &[(String, String)], k: &str| {
        d.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "(missing)".into())
    };
    let mut keys: Vec<&String> = a.iter().chain(b).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (find(a, k), find(b, k));
            (x != y).then(|| format!("  {k}: {y} vs {x}"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits up to `limit` until the nodes `nodes` (indices) are up and their
/// applied_seq in /status equals head_seq; returns the time it took.
pub async fn wait_caught_up(g: &TestGroup, nodes: &[usize], limit: Duration) -> Option<Duration> {
    let names: Vec<&str> = nodes
        .iter()
        .map(|&i| g.cluster.nodes[i].name.as_str())
        .collect();
    let proxy = &g.proxy;
    wait_until(limit, || async {
        let s = proxy.status().await;
        let head = s["groups"][0]["head_seq"].as_u64().unwrap_or(0);
        s["groups"][0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| names.iter().any(|m| n["name"] == *m))
            .all(|n| n["applied_seq"].as_u64() == Some(head) && n["state"] == "up")
    })
    .await
}

/// A digest of every user table's rows, every sequence's state, and the
/// whole log.
pub async fn digest(c: &tokio_postgres::Client) -> Vec<(String, String)> {
    digest_with(c, LogCheck::Full).await
}

/// A digest of every user table's rows and every sequence's state, with
/// the log as `log` says.
pub async fn digest_with(c: &tokio_postgres::Client, log: LogCheck) -> Vec<(String, String)> {
    let tables = c
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') \
             AND schemaname NOT LIKE 'pg_temp%' \
             AND (schemaname, tablename) <> ('reprise', 'node') \
             AND ($1 OR (schemaname, tablename) <> ('reprise', 'log')) ORDER BY 1",
            &[&(log == LogCheck::Full)],
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    for t in tables {
        let name: String = t.get(0);
        let row = c
            .query_one(
                &format!(
                    "SELECT count(*)::text || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '') FROM {name} x"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((name, row.get(0)));
    }
    if log == LogCheck::Head {
        let head: String = c
            .query_one(
                "SELECT coalesce((SELECT seq || ':' || term || ':' || hash FROM reprise.log \
                 ORDER BY seq DESC LIMIT 1), 'empty')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        out.push(("reprise.log head".into(), head));
    }
    let seqs = c
        .query(
            "SELECT format('%I.%I', schemaname, sequencename), coalesce(last_value::text, 'null') \
             FROM pg_sequences WHERE schemaname <> 'reprise' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    for s in seqs {
        out.push((s.get(0), s.get(1)));
    }
    out
}

/// Every acknowledged insert is there exactly once, on every copy.
pub async fn assert_present_once(g: &TestGroup, acked: &[String]) {
    let all: Vec<usize> = (0..g.cluster.nodes.len()).collect();
    assert_present_once_on(g, &all, acked).await;
}

/// Every acknowledged insert is there exactly once on the nodes `nodes`.
pub async fn assert_present_once_on(g: &TestGroup, nodes: &[usize], acked: &[String]) {
    for &i in nodes {
        assert_present_once_at(&g.cluster.nodes[i], acked).await;
    }
}

/// Every acknowledged body is in `node`'s `notes` exactly once.
pub async fn assert_present_once_at(node: &LocalNode, acked: &[String]) {
    let rows = connect(&node.url("app"))
        .await
        .query(
            "SELECT body, count(*) FROM notes WHERE body = ANY($1) GROUP BY body",
            &[&acked],
        )
        .await
        .unwrap();
    let counts: std::collections::HashMap<String, i64> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for body in acked {
        assert_eq!(counts.get(body), Some(&1), "{body} on {}", node.name);
    }
}

/// No `notes` body appears twice on node `i` (every writer body is unique,
/// so a duplicate is a transaction applied twice).
pub async fn assert_no_duplicate_notes(g: &TestGroup, i: usize) {
    let dup: i64 = g
        .direct(i)
        .await
        .query_one(
            "SELECT count(*) FROM (SELECT body FROM notes GROUP BY body HAVING count(*) > 1) x",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        dup, 0,
        "a transaction applied twice on {}",
        g.cluster.nodes[i].name
    );
}

/// The admin console (database `reprise`): runs `sql` with the simple
/// query protocol and returns the rows as text (NULL as "").
pub async fn admin(proxy: &Proxy, sql: &str) -> Result<Vec<Vec<String>>, String> {
    Ok(admin_named(proxy, sql)
        .await?
        .into_iter()
        .map(|r| r.into_iter().map(|(_, v)| v).collect())
        .collect())
}

/// The same, each row as (column, value) pairs in column order.
pub async fn admin_named(proxy: &Proxy, sql: &str) -> Result<Vec<Vec<(String, String)>>, String> {
    let (client, conn) = tokio_postgres::connect(&proxy.url("reprise"), tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to the admin console: {}", db_text(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let messages = client.simple_query(sql).await.map_err(|e| db_text(&e))?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// A column of an [`admin_named`] row.
pub fn column<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
    row.iter()
        .find(|(c, _)| c == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no column {name} in {row:?}"))
}

/// A field of a node in /status.
pub fn node_field(status: &serde_json::Value, node: &str, field: &str) -> serde_json::Value {
    status["groups"][0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .map(|n| n[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// The primary's name in /status.
pub fn primary_of(status: &serde_json::Value) -> String {
    status["groups"][0]["primary"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The group's term in /status.
pub fn term_of(status: &serde_json::Value) -> u64 {
    status["groups"][0]["term"].as_u64().unwrap_or(0)
}

/// Waits until node `node` is in one of `states`; returns the state, or
/// None after `limit`. Prints every state seen on the way.
pub async fn wait_node_state(
    proxy: &Proxy,
    node: &str,
    states: &[&str],
    limit: Duration,
) -> Option<String> {
    let start = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    while start.elapsed() < limit {
        let s = node_state(&proxy.status().await, node);
        if seen.last() != Some(&s) {
            eprintln!("{node}: {s} after {:?}", start.elapsed());
            seen.push(s.clone());
        }
        if states.contains(&s.as_str()) {
            return Some(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// If node `i` is divergent, runs `RESEED app <node>` on the console and
/// returns its row; then waits until the node is up. Returns None if it
/// was not divergent.
pub async fn reseed_if_divergent(g: &TestGroup, i: usize) -> Option<Vec<(String, String)>> {
    let name = g.cluster.nodes[i].name.clone();
    let status = g.proxy.status().await;
    if node_state(&status, &name) != "divergent" {
        return None;
    }
    eprintln!(
        "{name} is divergent: {}",
        node_field(&status, &name, "divergence")
    );
    let divergence = node_field(&status, &name, "divergence");
    assert!(
        divergence.as_str().is_some_and(|d| d.contains("seq")),
        "a divergent node names the first differing seq: {status:#}"
    );
    let rows = tokio::time::timeout(
        Duration::from_secs(120),
        admin_named(&g.proxy, &format!("RESEED app {name}")),
    )
    .await
    .expect("RESEED finishes")
    .unwrap_or_else(|e| panic!("RESEED app {name}: {e}"));
    assert_eq!(rows.len(), 1, "RESEED returns one row: {rows:?}");
    let row = rows.into_iter().next().unwrap();
    eprintln!("RESEED app {name}: {row:?}");
    assert_eq!(column(&row, "node"), name);
    let up = wait_node_state(&g.proxy, &name, &["up"], Duration::from_secs(120)).await;
    assert!(
        up.is_some(),
        "{name} is not up after RESEED: {:#}",
        g.proxy.status().await
    );
    Some(row)
}

/// `reprise.node` of node `i`: (term, role).
pub async fn node_term_role(g: &TestGroup, i: usize) -> (i64, String) {
    let row = g
        .direct(i)
        .await
        .query_one("SELECT term, role FROM reprise.node", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The index of the node named `name`.
pub fn index_of(g: &TestGroup, name: &str) -> usize {
    g.cluster
        .nodes
        .iter()
        .position(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// The SQLSTATE of an error, or why there is none.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| "none".to_string())
}

/// How long one write step may take before a writer gives up: far more
/// than any failover wait, so only a hang reaches it.
pub const WRITE_STEP_LIMIT: Duration = Duration::from_secs(45);

/// A failed write transaction, as a writer saw it.
#[derive(Debug, Clone)]
pub struct WriteError {
    pub at: Instant,
    /// The step that failed: "insert" (autocommit), "begin", "tx insert",
    /// "tx update", "commit".
    pub step: &'static str,
    pub code: String,
    pub message: String,
}

/// What one writer did.
#[derive(Debug, Clone, Default)]
pub struct WriterLog {
    /// Bodies whose transaction was acknowledged.
    pub acked: Vec<String>,
    /// (started, acknowledged) of each acknowledged transaction.
    pub oks: Vec<(Instant, Instant)>,
    pub errors: Vec<WriteError>,
    /// The connection was closed (the writer stopped): why.
    pub closed: Option<String>,
    /// A step took longer than [`WRITE_STEP_LIMIT`] (the writer stopped).
    pub hung: Option<String>,
}

impl WriterLog {
    /// When the first transaction that started at or after `t` was
    /// acknowledged.
    pub fn first_ok_started_after(&self, t: Instant) -> Option<Instant> {
        self.oks.iter().find(|(s, _)| *s >= t).map(|(_, e)| *e)
    }

    /// Bodies of the acknowledged transactions that started at or after `t`.
    pub fn acked_started_after(&self, t: Instant) -> Vec<String> {
        self.acked
            .iter()
            .zip(&self.oks)
            .filter(|(_, (s, _))| *s >= t)
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// The longest time between two acknowledgements of this writer that
    /// both fall in `[from, to]`, also counting from `from` to the first.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut last = from;
        let mut gap = Duration::ZERO;
        for &(_, end) in self.oks.iter().filter(|(_, e)| *e >= from && *e <= to) {
            gap = gap.max(end - last);
            last = end;
        }
        gap
    }
}

/// Sessions writing `notes` through one persistent connection each, until
/// stopped: two autocommit inserts, then one explicit transaction (BEGIN,
/// INSERT a placeholder, UPDATE it to the body, COMMIT), and so on. Bodies
/// are `{prefix}{writer}-{k}`, never reused. An error is recorded, the
/// transaction rolled back, and the writer goes on on the same connection.
pub struct Writers {
    stop: Arc<AtomicBool>,
    logs: Vec<Arc<Mutex<WriterLog>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writers {
    /// Connects `n` writers to `url` and starts them.
    pub async fn start(url: &str, prefix: &str, n: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut logs = Vec::new();
        let mut tasks = Vec::new();
        for w in 0..n {
            let client = connect(url).await;
            let log = Arc::new(Mutex::new(WriterLog::default()));
            tasks.push(tokio::spawn(write_loop(
                client,
                format!("{prefix}{w}-"),
                log.clone(),
                stop.clone(),
            )));
            logs.push(log);
        }
        Writers { stop, logs, tasks }
    }

    /// A copy of every writer's log so far.
    pub fn snapshot(&self) -> Vec<WriterLog> {
        self.logs
            .iter()
            .map(|l| l.lock().unwrap().clone())
            .collect()
    }

    /// Whether every writer had a transaction acknowledged that started at
    /// or after `t`.
    pub fn all_acked_since(&self, t: Instant) -> bool {
        self.snapshot()
            .iter()
            .all(|l| l.first_ok_started_after(t).is_some())
    }

    /// Waits up to `limit` until every writer had a transaction
    /// acknowledged that started at or after `t`.
    pub async fn wait_all_acked_since(&self, t: Instant, limit: Duration) -> bool {
        wait_until(limit, || async { self.all_acked_since(t) })
            .await
            .is_some()
    }

    /// Stops the writers and returns their logs.
    pub async fn stop(self) -> Vec<WriterLog> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer task");
        }
        self.logs
            .iter()
            .map(|l| std::mem::take(&mut *l.lock().unwrap()))
            .collect()
    }
}

/// Every acknowledged body of every writer.
pub fn all_acked(logs: &[WriterLog]) -> Vec<String> {
    logs.iter().flat_map(|l| l.acked.iter().cloned()).collect()
}

/// Every writer's errors, closed connections and hangs, as lines.
pub fn describe_errors(logs: &[WriterLog]) -> String {
    let mut out = String::new();
    for (w, l) in logs.iter().enumerate() {
        for e in &l.errors {
            out.push_str(&format!(
                "writer {w}: {} {}: {}\n",
                e.step, e.code, e.message
            ));
        }
        if let Some(c) = &l.closed {
            out.push_str(&format!("writer {w}: connection closed: {c}\n"));
        }
        if let Some(h) = &l.hung {
            out.push_str(&format!("writer {w}: hung: {h}\n"));
        }
    }
    out
}

/// Panics if a writer lost its connection or hung.
pub fn assert_writers_kept_connections(logs: &[WriterLog]) {
    for (w, l) in logs.iter().enumerate() {
        assert!(
            l.closed.is_none() && l.hung.is_none(),
            "writer {w} lost its connection or hung:\n{}",
            describe_errors(logs)
        );
    }
}

async fn write_loop(
    c: tokio_postgres::Client,
    prefix: String,
    log: Arc<Mutex<WriterLog>>,
    stop: Arc<AtomicBool>,
) {
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let body = format!("{prefix}{k}");
        let started = Instant::now();
        let r = tokio::time::timeout(WRITE_STEP_LIMIT, write_once(&c, &body, k.is_multiple_of(3)))
            .await;
        match r {
            Err(_) => {
                log.lock().unwrap().hung = Some(format!(
                    "writing {body} took more than {WRITE_STEP_LIMIT:?}"
                ));
                return;
            }
            Ok(Ok(())) => {
                let mut l = log.lock().unwrap();
                l.acked.push(body);
                l.oks.push((started, Instant::now()));
            }
            Ok(Err((step, code, message))) => {
                log.lock().unwrap().errors.push(WriteError {
                    at: Instant::now(),
                    step,
                    code,
                    message,
                });
                if c.is_closed() {
                    log.lock().unwrap().closed = Some(format!("after an error at {step}"));
                    return;
                }
                let rollback = tokio::time::timeout(WRITE_STEP_LIMIT, c.batch_execute("ROLLBACK"));
                if rollback.await.is_err() {
                    log.lock().unwrap().hung = Some("ROLLBACK hung".into());
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One write transaction; on failure (step, SQLSTATE, message).
async fn write_once(
    c: &tokio_postgres::Client,
    body: &str,
    explicit: bool,
) -> Result<(), (&'static str, String, String)> {
    let fail =
        |step: &'static str| move |e: tokio_postgres::Error| (step, sqlstate(&e), db_text(&e));
    if !explicit {
        c.execute("INSERT INTO notes (body) VALUES ($1)", &[&body])
            .await
            .map_err(fail("insert"))?;
        return Ok(());
    }
    let placeholder = format!("{body} (pending)");
    c.batch_execute("BEGIN").await.map_err(fail("begin"))?;
    c.execute("INSERT INTO notes (body) VALUES ($1)", &[&placeholder])
        .await
        .map_err(fail("tx insert"))?;
    let n = c
        .execute(
            "UPDATE notes SET body = $1 WHERE body = $2",
            &[&body, &placeholder],
        )
        .await
        .map_err(fail("tx update"))?;
    if n != 1 {
        return Err((
            "tx update",
            "rows".into(),
            format!(
                "the UPDATE of the row this transaction just inserted matched {n} rows: \
                 the transaction's statements did not run in one backend transaction"
            ),
        ));
    }
    c.batch_execute("COMMIT").await.map_err(fail("commit"))?;
    Ok(())
}

pub mod relay;
#[allow(unused_imports)]
pub use relay::{Relay, RelayMode, relay_nodes};

impl Proxy {
    /// [`Proxy::start`] that reports a failed bind (e.g. the port is still
    /// taken) instead of panicking.
    pub async fn try_start(config: Config) -> anyhow::Result<Proxy> {
        let server = reprise::Server::bind(config).await?;
        let addr = server.client_addr();
        let http = server.http_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Ok(Proxy {
            addr,
            http,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// Whether the proxy's task ended although nobody stopped or killed it.
    pub fn ended_by_itself(&self) -> bool {
        self.stop.is_some() && self.task.as_ref().is_some_and(|t| t.is_finished())
    }

    /// Stops the proxy (as [`Proxy::stop`]) and says how its task ended:
    /// Err if it panicked, returned an error, or did not end within `limit`.
    pub async fn stop_checked(&mut self, limit: Duration) -> Result<(), String> {
        let by_itself = self.ended_by_itself();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let Some(t) = self.task.take() else {
            return Ok(());
        };
        let r = match tokio::time::timeout(limit, t).await {
            Err(_) => Err(format!("the proxy did not stop within {limit:?}")),
            Ok(Err(e)) if e.is_panic() => Err(format!("the proxy task panicked: {e}")),
            Ok(Err(e)) => Err(format!("the proxy task failed: {e}")),
            Ok(Ok(Err(e))) => Err(format!("the proxy returned an error: {e:#}")),
            Ok(Ok(Ok(()))) => Ok(()),
        };
        match r {
            Ok(()) if by_itself => Err("the proxy task ended by itself".into()),
            r => r,
        }
    }
}
