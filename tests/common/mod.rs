//! The integration-test harness: real PostgreSQL copies started with
//! `reprise::local`, and the proxy running in-process on port 0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Command, Output};
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
    _dir: tempfile::TempDir,
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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.http).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// /status as JSON.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.http_get("/status").await).expect("status JSON")
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
];

impl TestGroup {
    /// `n` identical copies of database `app` seeded with SEED_SQL, and the
    /// proxy in front with `tweak` applied to its config.
    pub async fn start(n: usize, tweak: impl FnOnce(&mut Config)) -> TestGroup {
        Self::start_with(n, SEED_SQL, tweak).await
    }

    /// Same, with another seed script (run with psql on the first copy).
    pub async fn start_with(n: usize, seed: &str, tweak: impl FnOnce(&mut Config)) -> TestGroup {
        let dir = tempfile::Builder::new()
            .prefix("reprise-t")
            .tempdir()
            .unwrap();
        let path = dir.path().to_path_buf();
        let seed = seed.to_string();
        let cluster = tokio::task::spawn_blocking(move || {
            LocalCluster::create(&path, n, "app", TEST_SETTINGS, |node| {
                if !seed.trim().is_empty() {
                    node.psql("app", &seed)?;
                }
                Ok(())
            })
        })
        .await
        .unwrap()
        .expect("local copies start");
        let mut config = cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");
        config.health.interval_ms = 200;
        config.health.timeout_ms = 500;
        config.health.failures_before_down = 2;
        tweak(&mut config);
        let proxy = Proxy::start(config).await;
        TestGroup {
            cluster,
            proxy,
            _dir: dir,
        }
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
