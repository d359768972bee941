//! Load limits and bad input: thousands of idle clients, connection storms,
//! the client limit, a client that stops reading, and a matrix of malformed
//! input — each answered with a clear error or a clean close while the other
//! sessions go on unaffected.
//!
//! The proxy runs in this process, so the process's descriptors and memory
//! (/proc/self) are the proxy's plus the test's own clients. The tests take a
//! lock so that they measure one at a time even under `--test-threads=N`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// The process: descriptors, memory, the proxy's client gauge, node backends.
// ---------------------------------------------------------------------------

/// One test of this file at a time: they measure the whole process.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    capture_logs();
    LOCK.lock().await
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of this process (proxy and test), in KiB.
fn rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: i64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `reprise_client_connections` of group `app` in /metrics.
async fn client_gauge(proxy: &Proxy) -> i64 {
    proxy
        .http_get("/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with("reprise_client_connections{") && l.contains("group=\"app\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as i64
}

/// Client backends on node `i`, by application_name, other than the proxy's
/// control connections and the one asking.
async fn node_backends(g: &TestGroup, i: usize) -> Vec<(String, i64)> {
    g.direct(i)
        .await
        .query(
            "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
               AND application_name <> 'reprise-control' \
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn total(backends: &[(String, i64)]) -> i64 {
    backends.iter().map(|(_, n)| n).sum()
}

/// Client backends on every node.
async fn all_backends(g: &TestGroup) -> i64 {
    let mut n = 0;
    for i in 0..g.cluster.nodes.len() {
        n += total(&node_backends(g, i).await);
    }
    n
}

// ---------------------------------------------------------------------------
// The proxy's log, captured in-process.
// ---------------------------------------------------------------------------

/// Log output of the whole process while `CAPTURING` is on.
static CAPTURED: Mutex<String> = Mutex::new(String::new());
static CAPTURING: AtomicBool = AtomicBool::new(false);

struct CaptureWriter {
    echo: bool,
}

impl std::io::Write for CaptureWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if CAPTURING.load(Ordering::Relaxed) {
            CAPTURED
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(b));
        }
        if self.echo {
            let _ = std::io::stderr().write_all(b);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a process-wide subscriber (INFO, or REPRISE_LOG, which also
/// echoes to stderr) whose lines [`log_lines`] can read. This binary's
/// tests take [`serial`], so the lines seen are those of one test.
fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let echo = std::env::var_os("REPRISE_LOG").is_some();
        let filter = tracing_subscriber::EnvFilter::try_from_env("REPRISE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || CaptureWriter { echo })
            .try_init();
    });
}

/// Local addresses of the raw connections opened while capturing: the
/// proxy logs them as `peer`.
static RAW_PEERS: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

/// A point in the captured log (and in the list of raw connections).
#[derive(Clone, Copy)]
struct LogMark {
    log: usize,
    peers: usize,
}

fn log_mark() -> LogMark {
    LogMark {
        log: CAPTURED.lock().unwrap().len(),
        peers: RAW_PEERS.lock().unwrap().len(),
    }
}

/// The INFO, WARN and ERROR lines logged since `mark` about the raw
/// connections opened since then: those naming one of them as `peer`, and
/// session lines naming no peer at all (which client they are about cannot
/// be told; background lines of monitors and appliers are left out).
fn log_lines(mark: LogMark) -> Vec<String> {
    let peers: Vec<String> = RAW_PEERS.lock().unwrap()[mark.peers..]
        .iter()
        .map(|p| format!("peer={p}"))
        .collect();
    CAPTURED.lock().unwrap()[mark.log..]
        .lines()
        .filter(|l| l.contains(" INFO ") || l.contains(" WARN ") || l.contains("ERROR "))
        .filter(|l| {
            peers.iter().any(|p| names_peer(l, p))
                || (l.contains("reprise::session") && !l.contains("peer="))
        })
        .map(str::to_string)
        .collect()
}

/// Whether `line` contains `peer` as a whole field value (`peer=…:123` is
/// not `peer=…:1234`).
fn names_peer(line: &str, peer: &str) -> bool {
    line.match_indices(peer).any(|(i, _)| {
        !line[i + peer.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

// ---------------------------------------------------------------------------
// A raw protocol client.
// ---------------------------------------------------------------------------

/// A message from the server: its type byte and body.
#[derive(Debug, Clone)]
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

impl Msg {
    /// A field of an ErrorResponse or NoticeResponse.
    fn field(&self, f: u8) -> String {
        let mut rest = &self.body[..];
        while let Some((&t, tail)) = rest.split_first() {
            if t == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            if t == f {
                return String::from_utf8_lossy(&tail[..end]).into_owned();
            }
            rest = &tail[(end + 1).min(tail.len())..];
        }
        String::new()
    }

    fn code(&self) -> String {
        self.field(b'C')
    }

    /// Severity, SQLSTATE, message and hint of an error, for assertions.
    fn error_text(&self) -> String {
        format!(
            "{} {}: {} (hint: {})",
            self.field(b'V'),
            self.code(),
            self.field(b'M'),
            self.field(b'H')
        )
    }

    /// The authentication request code of an 'R' message.
    fn auth_code(&self) -> i32 {
        i32::from_be_bytes(self.body[..4].try_into().unwrap())
    }

    /// "R10", "E", "Z"… for comparing message sequences.
    fn kind(&self) -> String {
        if self.tag == b'R' && self.body.len() >= 4 {
            format!("R{}", self.auth_code())
        } else {
            (self.tag as char).to_string()
        }
    }
}

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq)]
enum Ended {
    Eof,
    /// Closed in the middle of a message (bytes left over).
    Partial(usize),
    Error(String),
    Timeout,
}

/// A raw client connection.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

const WAIT: Duration = Duration::from_secs(10);

impl Raw {
    async fn connect(addr: SocketAddr) -> std::io::Result<Raw> {
        let s = TcpStream::connect(addr).await?;
        if CAPTURING.load(Ordering::Relaxed) {
            RAW_PEERS.lock().unwrap().push(s.local_addr()?);
        }
        Ok(Raw { s, buf: Vec::new() })
    }

    /// Writes bytes; a failed write (the proxy closed) is not an error here.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes).await;
    }

    fn take(&mut self) -> Option<Msg> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
        let total = 1 + len.max(4);
        if self.buf.len() < total {
            return None;
        }
        let m = Msg {
            tag: self.buf[0],
            body: self.buf[5..total].to_vec(),
        };
        self.buf.drain(..total);
        Some(m)
    }

    /// The next message, or how the connection ended.
    async fn next(&mut self, limit: Duration) -> Result<Msg, Ended> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(m) = self.take() {
                return Ok(m);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return Err(Ended::Timeout),
                Ok(Ok(0)) if self.buf.is_empty() => return Err(Ended::Eof),
                Ok(Ok(0)) => return Err(Ended::Partial(self.buf.len())),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(Ended::Error(e.to_string())),
            }
        }
    }

    /// Messages up to and including the next ReadyForQuery.
    async fn until_ready(&mut self, limit: Duration) -> Result<Vec<Msg>, (Vec<Msg>, Ended)> {
        let mut out = Vec::new();
        loop {
            match self.next(limit).await {
                Ok(m) => {
                    let z = m.tag == b'Z';
                    out.push(m);
                    if z {
                        return Ok(out);
                    }
                }
                Err(e) => return Err((out, e)),
            }
        }
    }

    /// Every message until the connection ends.
    async fn until_closed(&mut self, limit: Duration) -> (Vec<Msg>, Ended) {
        let mut out = Vec::new();
        loop {
            match self.next(limit).await {
                Ok(m) => out.push(m),
                Err(e) => return (out, e),
            }
        }
    }

    /// Runs a simple query; its messages up to ReadyForQuery.
    async fn query(&mut self, sql: &str) -> Result<Vec<Msg>, String> {
        self.send(&query(sql)).await;
        self.until_ready(WAIT)
            .await
            .map_err(|(m, e)| format!("{sql}: ended {e:?} after {:?}", kinds(&m)))
    }

    /// Sends Terminate and waits for the proxy to close.
    async fn terminate(mut self) -> Ended {
        self.send(&msg(b'X', b"")).await;
        self.until_closed(WAIT).await.1
    }
}

fn kinds(msgs: &[Msg]) -> Vec<String> {
    msgs.iter().map(Msg::kind).collect()
}

fn errors(msgs: &[Msg]) -> Vec<&Msg> {
    msgs.iter().filter(|m| m.tag == b'E').collect()
}

/// The first column of the DataRows in `msgs`, as text.
fn first_column(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let len = i32::from_be_bytes(m.body[2..6].try_into().unwrap());
            if len < 0 {
                String::new()
            } else {
                String::from_utf8_lossy(&m.body[6..6 + len as usize]).into_owned()
            }
        })
        .collect()
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstr(sql))
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend(0i16.to_be_bytes());
    msg(b'P', &b)
}

/// A Bind of `statement` to the unnamed portal without parameters.
fn bind(statement: &str) -> Vec<u8> {
    let mut b = cstr("");
    b.extend(cstr(statement));
    b.extend([0, 0, 0, 0, 0, 0]);
    msg(b'B', &b)
}

fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend(cstr(name));
    msg(b'D', &b)
}

fn execute(portal: &str) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend(0i32.to_be_bytes());
    msg(b'E', &b)
}

fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

const PROTOCOL_3_0: i32 = 3 << 16;
const CANCEL_REQUEST: i32 = 80877102;

/// A startup-phase packet: length, code, the rest as given.
fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
    let mut p = ((rest.len() + 8) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(rest);
    p
}

/// A parameter list, terminated.
fn params(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in pairs {
        b.extend(cstr(k));
        b.extend(cstr(v));
    }
    b.push(0);
    b
}

fn startup(pairs: &[(&str, &str)]) -> Vec<u8> {
    packet(PROTOCOL_3_0, &params(pairs))
}

/// A session through the proxy as `postgres` on `db`, read up to its first
/// ReadyForQuery.
async fn greeted_on(addr: SocketAddr, db: &str, app: &str) -> Result<Raw, String> {
    let mut r = Raw::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    r.send(&startup(&[
        ("user", "postgres"),
        ("database", db),
        ("application_name", app),
    ]))
    .await;
    let msgs = r
        .until_ready(Duration::from_secs(60))
        .await
        .map_err(|(m, e)| {
            format!(
                "no ReadyForQuery: ended {e:?} after {:?} {:?}",
                kinds(&m),
                errors(&m)
                    .iter()
                    .map(|e| e.error_text())
                    .collect::<Vec<_>>()
            )
        })?;
    if msgs.first().map(Msg::kind).as_deref() != Some("R0") || !errors(&msgs).is_empty() {
        return Err(format!("greeting {:?}", kinds(&msgs)));
    }
    Ok(r)
}

async fn greeted(addr: SocketAddr, app: &str) -> Result<Raw, String> {
    greeted_on(addr, "app", app).await
}

/// `SELECT 1` on a raw session answers 1.
async fn select_one(r: &mut Raw) -> Result<(), String> {
    let msgs = r.query("SELECT 1").await?;
    if first_column(&msgs) != ["1"] || !errors(&msgs).is_empty() {
        return Err(format!(
            "SELECT 1 answered {:?} {:?}",
            kinds(&msgs),
            errors(&msgs)
                .iter()
                .map(|e| e.error_text())
                .collect::<Vec<_>>()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// A session that keeps working while something else happens.
// ---------------------------------------------------------------------------

/// A client running queries (and, if `writes`, inserts) until stopped.
struct Healthy {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(usize, Vec<String>)>,
}

impl Healthy {
    async fn start(url: &str, writes: bool) -> Healthy {
        let c = connect(url).await;
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ran, mut errors) = (0, Vec::new());
            while !halt.load(Ordering::Relaxed) {
                ran += 1;
                let r = tokio::time::timeout(WAIT, c.query_one("SELECT count(*) FROM items", &[]));
                match r.await {
                    Ok(Ok(row)) if row.get::<_, i64>(0) == 100 => {}
                    Ok(Ok(row)) => errors.push(format!("count {}", row.get::<_, i64>(0))),
                    Ok(Err(e)) => errors.push(db_text(&e)),
                    Err(_) => errors.push("a query took more than 10 s".into()),
                }
                if writes && ran % 5 == 0 {
                    let body = format!("healthy {ran}");
                    let r = tokio::time::timeout(
                        WAIT,
                        c.execute("INSERT INTO notes (body) VALUES ($1)", &[&body]),
                    )
                    .await;
                    match r {
                        Ok(Ok(1)) => {}
                        Ok(Ok(n)) => errors.push(format!("insert of {n} rows")),
                        Ok(Err(e)) => errors.push(db_text(&e)),
                        Err(_) => errors.push("an insert took more than 10 s".into()),
                    }
                }
                if c.is_closed() {
                    errors.push("connection closed".into());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ran, errors)
        });
        Healthy { stop, task }
    }

    /// Stops it and asserts it never saw an error.
    async fn check(self, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (ran, errors) = self.task.await.unwrap();
        eprintln!("{what}: {ran} rounds, {} errors", errors.len());
        assert!(errors.is_empty(), "{what} was affected: {errors:?}");
        assert!(ran > 0, "{what} ran nothing");
    }
}

// ---------------------------------------------------------------------------
// 1. Idle clients
// ---------------------------------------------------------------------------

const IDLE_CLIENTS: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_clients_cost_little() {
    let _serial = serial().await;
    bounded(Duration::from_secs(300), async {
        let g = TestGroup::start(1, |c| c.max_client_connections = 5000).await;
        let addr = g.proxy.addr;
        // The first client with these parameters opens a backend, and its
        // greeting is remembered for the others.
        let mut first = greeted(addr, "limits-idle").await.unwrap();
        select_one(&mut first).await.unwrap();
        let fds0 = open_fds();
        let rss0 = rss_kib();
        let gauge0 = client_gauge(&g.proxy).await;
        let backends0 = node_backends(&g, 0).await;
        let started = Instant::now();

        let gate = Arc::new(Semaphore::new(50));
        let mut tasks = Vec::with_capacity(IDLE_CLIENTS);
        for _ in 0..IDLE_CLIENTS {
            let permit = gate.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let r = greeted(addr, "limits-idle").await;
                drop(permit);
                r
            }));
        }
        let mut idle = Vec::with_capacity(IDLE_CLIENTS);
        let mut failed = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(r) => idle.push(r),
                Err(e) => failed.push(e),
            }
        }
        eprintln!(
            "{} clients greeted in {:?}, {} failed",
            idle.len(),
            started.elapsed(),
            failed.len()
        );
        assert!(
            failed.is_empty(),
            "{} clients got no ReadyForQuery, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        // Let the proxy settle (nothing should be opening anything).
        tokio::time::sleep(Duration::from_millis(500)).await;

        let fds1 = open_fds();
        let rss1 = rss_kib();
        let gauge1 = client_gauge(&g.proxy).await;
        let backends1 = node_backends(&g, 0).await;
        let per_client = (rss1 - rss0) * 1024 / IDLE_CLIENTS as i64;
        eprintln!(
            "idle: fds {fds0} -> {fds1} (+{}), RSS {} -> {} ({} B per client), \
             gauge {gauge0} -> {gauge1}, node backends {backends0:?} -> {backends1:?}",
            fds1 - fds0,
            mib(rss0),
            mib(rss1),
            per_client
        );
        assert_eq!(
            gauge1 - gauge0,
            IDLE_CLIENTS as i64,
            "reprise_client_connections"
        );
        assert!(
            total(&backends1) < 20,
            "idle clients opened backends on the node: {backends1:?}"
        );
        // Two descriptors per client: ours and the proxy's.
        assert!(
            fds1 >= fds0 + 2 * IDLE_CLIENTS && fds1 <= fds0 + 2 * IDLE_CLIENTS + 50,
            "descriptors {fds0} -> {fds1} for {IDLE_CLIENTS} idle clients"
        );
        assert!(
            per_client < 200 * 1024,
            "{per_client} bytes of memory per idle client"
        );

        // Meanwhile a fresh client works, and so does any idle one.
        let c = g.proxy.client("app").await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 100);
        drop(c);
        let mut woken = idle.swap_remove(IDLE_CLIENTS / 2);
        select_one(&mut woken).await.unwrap();
        drop(woken);

        // All of them leave (without a Terminate).
        let closed = Instant::now();
        drop(idle);
        let proxy = &g.proxy;
        let back = wait_until(Duration::from_secs(30), || async {
            open_fds() <= fds0 + 2 && client_gauge(proxy).await == gauge0
        })
        .await;
        let (fds2, gauge2, rss2) = (open_fds(), client_gauge(proxy).await, rss_kib());
        eprintln!(
            "after closing: fds {fds2}, gauge {gauge2}, RSS {} ({:?} after closing)",
            mib(rss2),
            back.map(|_| closed.elapsed())
        );
        assert!(
            back.is_some(),
            "descriptors ({fds0} -> {fds2}) or reprise_client_connections ({gauge0} -> {gauge2}) \
             did not come back after the clients left"
        );
        select_one(&mut first).await.unwrap();
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. Connection storms
// ---------------------------------------------------------------------------

/// `tasks` tasks each doing `rounds` connect → `SELECT 1` → disconnect.
/// Even tasks use tokio-postgres and say goodbye; odd ones use raw sockets
/// and vanish: after the answer, after the answer with a reset (linger 0),
/// or before the answer of a query that is still running.
async fn storm(proxy: &Proxy, tasks: usize, rounds: usize) -> Vec<String> {
    let addr = proxy.addr;
    let url = format!("{}?application_name=limits-storm", proxy.url("app"));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for k in 0..rounds {
                let r = if t % 2 == 0 {
                    polite_round(&url).await
                } else {
                    abrupt_round(addr, k).await
                };
                if let Err(e) = r {
                    errors.push(format!("task {t} round {k}: {e}"));
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for h in handles {
        errors.extend(h.await.unwrap());
    }
    errors
}

async fn polite_round(url: &str) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect: {}", db_text(&e)))?;
    let conn = tokio::spawn(conn);
    let rows = client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| db_text(&e))?;
    let values: Vec<Option<&str>> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0)),
            _ => None,
        })
        .collect();
    if values != [Some("1")] {
        return Err(format!("SELECT 1 answered {values:?}"));
    }
    drop(client);
    tokio::time::timeout(WAIT, conn)
        .await
        .map_err(|_| "the connection did not end after Terminate".to_string())?
        .unwrap()
        .map_err(|e| format!("connection: {e}"))
}

async fn abrupt_round(addr: SocketAddr, k: usize) -> Result<(), String> {
    let mut r = greeted(addr, "limits-storm").await?;
    match k % 3 {
        0 => select_one(&mut r).await?,
        1 => {
            select_one(&mut r).await?;
            reset_on_close(&r.s);
        }
        _ => {
            // A read that takes a moment: the client is gone before it ends.
            r.send(&query("SELECT count(*) FROM generate_series(1, 300000)"))
                .await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    drop(r);
    Ok(())
}

/// SO_LINGER 0: closing the socket sends a reset instead of a FIN.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger` for the given size only.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storms_leak_nothing() {
    let _serial = serial().await;
    bounded(Duration::from_secs(400), async {
        let g = TestGroup::start(2, |_| {}).await;
        let proxy = &g.proxy;
        let gr = &g;
        let idle_gauge = client_gauge(proxy).await;
        // A short storm first, so caches, pools and the allocator are warm.
        let errors = storm(&g.proxy, 8, 20).await;
        assert!(errors.is_empty(), "warm-up: {errors:?}");
        // (The node backends are compared with the count after the warm-up:
        // before it, the appliers' own connections may still be opening.)
        let settled = wait_until(Duration::from_secs(30), || async {
            client_gauge(proxy).await == idle_gauge
        })
        .await;
        assert!(settled.is_some(), "the warm-up storm left sessions behind");
        let (fds0, rss0, gauge0, backends0) = (
            open_fds(),
            rss_kib(),
            client_gauge(proxy).await,
            all_backends(&g).await,
        );
        eprintln!(
            "before: fds {fds0}, RSS {}, gauge {gauge0}, node backends {backends0}",
            mib(rss0)
        );

        let started = Instant::now();
        let errors = storm(&g.proxy, 8, 250).await;
        let took = started.elapsed();
        eprintln!(
            "storm: {} sessions in {took:?}, {} errors; RSS now {}",
            8 * 250,
            errors.len(),
            mib(rss_kib())
        );
        assert!(
            errors.is_empty(),
            "{} rounds failed, e.g. {:?}",
            errors.len(),
            &errors[..errors.len().min(10)]
        );

        let waited = Instant::now();
        let back = wait_until(Duration::from_secs(30), || async {
            open_fds() <= fds0 && client_gauge(proxy).await <= gauge0
        })
        .await;
        let nodes_back = wait_until(Duration::from_secs(30), || async {
            all_backends(gr).await <= backends0
        })
        .await;
        let (fds1, rss1, gauge1) = (open_fds(), rss_kib(), client_gauge(proxy).await);
        let mut per_node = Vec::new();
        for i in 0..2 {
            per_node.push(node_backends(&g, i).await);
        }
        eprintln!(
            "after ({:?}): fds {fds0} -> {fds1}, gauge {gauge0} -> {gauge1}, RSS {} -> {} \
             ({:+} KiB), node backends {per_node:?}",
            waited.elapsed(),
            mib(rss0),
            mib(rss1),
            rss1 - rss0
        );
        assert!(
            back.is_some(),
            "descriptors ({fds0} -> {fds1}) or reprise_client_connections ({gauge0} -> {gauge1}) \
             did not come back"
        );
        assert!(
            nodes_back.is_some(),
            "backends left on the nodes: {per_node:?} (before: {backends0})"
        );
        assert!(
            rss1 - rss0 < 64 * 1024,
            "memory grew by {} over {} sessions",
            mib(rss1 - rss0),
            8 * 250
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. The client limit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_clients_get_53300() {
    let _serial = serial().await;
    bounded(Duration::from_secs(120), async {
        let g = TestGroup::start(1, |c| c.max_client_connections = 20).await;
        let addr = g.proxy.addr;
        let url = g.proxy.url("app");
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(greeted(addr, "limits-limit").await.unwrap());
        }
        // Every client over the limit is told why, every time: a driver…
        let mut refusals = Vec::new();
        for _ in 0..20 {
            let e = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok(_) => panic!("a 21st client got in"),
                Err(e) => e,
            };
            refusals.push(format!("{} | {}", sqlstate(&e), db_text(&e)));
        }
        eprintln!("refused: {}", refusals[0]);
        let odd: Vec<&String> = refusals
            .iter()
            .filter(|r| !(r.starts_with("53300") && r.contains("too many clients")))
            .collect();
        assert!(
            odd.is_empty(),
            "{} of {} refused clients did not get 53300 with a message: {odd:?}",
            odd.len(),
            refusals.len()
        );
        // …and a raw client: a FATAL ErrorResponse, then the connection closes.
        for _ in 0..20 {
            let mut r = Raw::connect(addr).await.unwrap();
            r.send(&startup(&[("user", "postgres"), ("database", "app")]))
                .await;
            let (msgs, ended) = r.until_closed(WAIT).await;
            let e = errors(&msgs);
            assert!(
                e.len() == 1 && e[0].code() == "53300" && e[0].field(b'V') == "FATAL",
                "raw client over the limit: {:?} then {ended:?}",
                kinds(&msgs)
            );
            assert!(
                e[0].field(b'M').contains("max_client_connections = 20"),
                "{}",
                e[0].error_text()
            );
            assert!(ended != Ended::Timeout, "the refused connection stays open");
        }
        // The held clients still work.
        select_one(&mut held[0]).await.unwrap();

        // One leaves: a new client gets in (once the proxy has noticed).
        drop(held.pop());
        let left = Instant::now();
        let mut newcomer = None;
        while newcomer.is_none() && left.elapsed() < Duration::from_secs(10) {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    newcomer = Some(c);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        eprintln!("a new client got in {:?} after one left", left.elapsed());
        let newcomer = newcomer.expect("a client gets in after one left");
        newcomer.simple_query("SELECT 1").await.unwrap();
        // Full again.
        let e = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .err()
            .expect("the limit holds again");
        assert_eq!(sqlstate(&e), "53300", "{}", db_text(&e));
        for mut h in held {
            select_one(&mut h).await.unwrap();
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. A client that stops reading
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_does_not_stall_others() {
    let _serial = serial().await;
    bounded(Duration::from_secs(300), async {
        let g = TestGroup::start(1, |_| {}).await;
        let addr = g.proxy.addr;
        let url = g.proxy.url("app");
        let mut others = Vec::new();
        for _ in 0..4 {
            others.push(Arc::new(connect(&url).await));
        }
        for c in &others {
            c.simple_query("SELECT 1").await.unwrap();
        }
        let rss0 = rss_kib();

        // About 500 MB of rows, and a client that reads none of them.
        let mut slow = greeted(addr, "limits-slow").await.unwrap();
        slow.send(&query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 500000)",
        ))
        .await;
        let gr = &g;
        let blocked = wait_until(Duration::from_secs(60), || async {
            slow_backend(gr).await.is_some_and(|w| w == "ClientWrite")
        })
        .await;
        eprintln!(
            "slow client's backend: {:?} ({blocked:?}); RSS {} -> {}",
            slow_backend(&g).await,
            mib(rss0),
            mib(rss_kib())
        );
        assert!(
            blocked.is_some(),
            "the node never had to wait for the proxy to take the rows: {:?}",
            slow_backend(&g).await
        );

        // Others: 200 statements, reads and writes, all answered.
        let mut rss_peak = rss_kib();
        let started = Instant::now();
        let mut handles = Vec::new();
        for (w, c) in others.iter().enumerate() {
            let c = c.clone();
            handles.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                for k in 0..50 {
                    let r = if k % 5 == 4 {
                        let body = format!("slow-test {w} {k}");
                        tokio::time::timeout(
                            WAIT,
                            c.execute("INSERT INTO notes (body) VALUES ($1)", &[&body]),
                        )
                        .await
                        .map(|r| r.map(|_| ()))
                    } else {
                        tokio::time::timeout(
                            WAIT,
                            c.query_one("SELECT count(*) FROM items WHERE id <= $1", &[&k]),
                        )
                        .await
                        .map(|r| r.map(|_| ()))
                    };
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => errors.push(db_text(&e)),
                        Err(_) => errors.push(format!("statement {k} took more than 10 s")),
                    }
                }
                errors
            }));
        }
        let mut errors = Vec::new();
        for h in handles {
            errors.extend(h.await.unwrap());
            rss_peak = rss_peak.max(rss_kib());
        }
        eprintln!(
            "others: 200 statements in {:?}, {} errors",
            started.elapsed(),
            errors.len()
        );
        assert!(errors.is_empty(), "{errors:?}");

        // Still stalled a while later, and memory did not follow the rows.
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss_peak = rss_peak.max(rss_kib());
        let still = slow_backend(&g).await;
        eprintln!(
            "RSS while the slow client is stalled: {} -> peak {} (+{}); its backend: {still:?}",
            mib(rss0),
            mib(rss_peak),
            mib(rss_peak - rss0)
        );
        assert!(
            still.is_some(),
            "the slow client's query ended while it read nothing"
        );
        assert!(
            rss_peak - rss0 < 64 * 1024,
            "memory grew by {} while a client did not read",
            mib(rss_peak - rss0)
        );

        // The slow client leaves: its backend ends, everything else is fine.
        drop(slow);
        let gone = wait_until(Duration::from_secs(30), || async {
            slow_backend(gr).await.is_none()
        })
        .await;
        eprintln!("the slow client's backend ended {gone:?} after it left");
        assert!(gone.is_some(), "its backend is still there");
        for c in &others {
            let n: i64 = c
                .query_one("SELECT count(*) FROM items", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 100);
        }
        let c = g.proxy.client("app").await;
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM notes WHERE body LIKE 'slow-test %'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 40);
    })
    .await;
}

/// The wait event ('' when running) of the slow client's backend, if any.
async fn slow_backend(g: &TestGroup) -> Option<String> {
    g.direct(0)
        .await
        .query_opt(
            "SELECT coalesce(wait_event, '') FROM pg_stat_activity \
             WHERE application_name = 'limits-slow' AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

// ---------------------------------------------------------------------------
// 5. Bad input
// ---------------------------------------------------------------------------

/// What a bad input must get.
#[derive(Debug, Clone)]
enum Expect {
    /// A FATAL ErrorResponse with this SQLSTATE whose message names the
    /// problem (these words), then the connection closes.
    Fatal(&'static str, &'static [&'static str]),
    /// One ERROR with this SQLSTATE naming the problem, then ReadyForQuery;
    /// the session goes on.
    Error(&'static str, &'static [&'static str]),
    /// The connection closes without a word (there is no one to answer).
    Closed,
    /// No error; the session goes on.
    Fine,
    /// An answer of any kind; the session goes on.
    Answered,
    /// NegotiateProtocolVersion (3.0, these options unsupported), then a
    /// normal session.
    Negotiated(&'static [&'static str]),
}

/// Where the bad bytes are sent.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Instead of the startup packet (then our side is half-closed if asked).
    Startup { half_close: bool },
    /// After a good startup on this database.
    Session(&'static str),
}

struct Case {
    name: &'static str,
    phase: Phase,
    bytes: Vec<u8>,
    expect: Expect,
}

/// Whether an error's message (or detail, or hint) has all these words,
/// and does not say the same thing twice ("x: x: …").
fn names_it(e: &Msg, words: &[&str]) -> bool {
    let message = e.field(b'M');
    let parts: Vec<&str> = message.split(": ").collect();
    let stutters = parts.windows(2).any(|w| w[0] == w[1]);
    let text = format!("{message} {} {}", e.field(b'D'), e.field(b'H')).to_lowercase();
    !stutters && words.iter().all(|w| text.contains(&w.to_lowercase()))
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let start = Phase::Startup { half_close: false };
    let app = Phase::Session("app");
    let console = Phase::Session("reprise");
    let user = [("user", "postgres"), ("database", "app")];
    let good = startup(&user);
    let deep = format!("SELECT {}1{}", "1+(".repeat(3000), ")".repeat(3000));
    // Left-nested: the parser's stack stays flat but the tree is 100000 deep.
    let long = format!("SELECT 1{}", "+1".repeat(100_000));
    vec![
        // The startup packet.
        Case {
            name: "startup length below 8",
            phase: start,
            bytes: vec![0, 0, 0, 4, 0, 3, 0, 0],
            expect: Fatal("08P01", &["length 4"]),
        },
        Case {
            name: "startup length 0x7fffffff",
            phase: start,
            bytes: vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
            expect: Fatal("08P01", &["length", "maximum"]),
        },
        Case {
            name: "startup length negative",
            phase: start,
            bytes: vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0],
            expect: Fatal("08P01", &["length"]),
        },
        Case {
            name: "an HTTP request instead of a startup packet",
            phase: start,
            bytes: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            expect: Fatal("08P01", &["length", "maximum"]),
        },
        Case {
            name: "startup truncated, then end of stream",
            phase: Phase::Startup { half_close: true },
            bytes: good[..good.len() - 6].to_vec(),
            expect: Closed,
        },
        Case {
            name: "end of stream before any byte",
            phase: Phase::Startup { half_close: true },
            bytes: vec![],
            expect: Closed,
        },
        Case {
            name: "garbage code with a plausible length",
            phase: start,
            bytes: packet(0x7ead_beefu32 as i32, b"\x01\x02\x03\x04"),
            expect: Fatal("0A000", &["unsupported frontend protocol"]),
        },
        Case {
            name: "protocol 2.0",
            phase: start,
            bytes: packet(2 << 16, &params(&user)),
            expect: Fatal("0A000", &["protocol 2.0"]),
        },
        Case {
            name: "protocol 4.0",
            phase: start,
            bytes: packet(4 << 16, &params(&user)),
            expect: Fatal("0A000", &["protocol 4.0"]),
        },
        Case {
            name: "protocol 3.99 is negotiated down to 3.0",
            phase: start,
            bytes: packet(PROTOCOL_3_0 + 99, &params(&user)),
            expect: Negotiated(&[]),
        },
        Case {
            name: "protocol 3.2 with an unknown _pq_ option",
            phase: start,
            bytes: packet(
                PROTOCOL_3_0 + 2,
                &params(&[
                    ("user", "postgres"),
                    ("database", "app"),
                    ("_pq_.frobnicate", "on"),
                ]),
            ),
            expect: Negotiated(&["_pq_.frobnicate"]),
        },
        Case {
            name: "protocol 3.0 with an unknown _pq_ option",
            phase: start,
            bytes: packet(
                PROTOCOL_3_0,
                &params(&[
                    ("user", "postgres"),
                    ("database", "app"),
                    ("_pq_.frobnicate", "on"),
                ]),
            ),
            expect: Negotiated(&["_pq_.frobnicate"]),
        },
        Case {
            name: "unknown request code 1234.5681",
            phase: start,
            bytes: packet((1234 << 16) | 5681, &[]),
            expect: Fatal("0A000", &["1234.5681"]),
        },
        Case {
            name: "cancel request without its key",
            phase: start,
            bytes: packet(CANCEL_REQUEST, &[]),
            expect: Fatal("08P01", &["cancel"]),
        },
        Case {
            name: "cancel request for no session",
            phase: start,
            bytes: packet(CANCEL_REQUEST, &[0, 0, 0, 1, 0, 0, 0, 2]),
            expect: Closed,
        },
        Case {
            name: "parameter name not terminated",
            phase: start,
            bytes: packet(PROTOCOL_3_0, b"user\0postgres\0datab"),
            expect: Fatal("08P01", &["not terminated"]),
        },
        Case {
            name: "parameter value not terminated",
            phase: start,
            bytes: packet(PROTOCOL_3_0, b"user\0postg"),
            expect: Fatal("08P01", &["not terminated"]),
        },
        Case {
            name: "bytes after the parameter list",
            phase: start,
            bytes: packet(PROTOCOL_3_0, b"user\0postgres\0\0junk"),
            expect: Fatal("08P01", &["after the parameter list"]),
        },
        Case {
            name: "no user name",
            phase: start,
            bytes: startup(&[("database", "app")]),
            expect: Fatal("28000", &["user name"]),
        },
        Case {
            name: "a replication connection",
            phase: start,
            bytes: startup(&[
                ("user", "postgres"),
                ("database", "app"),
                ("replication", "database"),
            ]),
            expect: Fatal("0A000", &["replication"]),
        },
        // Messages after the startup.
        Case {
            name: "message length 0xFFFFFFF0",
            phase: app,
            bytes: vec![b'Q', 0xff, 0xff, 0xff, 0xf0],
            expect: Fatal("08P01", &["length"]),
        },
        Case {
            name: "message length 3",
            phase: app,
            bytes: vec![b'Q', 0, 0, 0, 3],
            expect: Fatal("08P01", &["length 3"]),
        },
        Case {
            name: "unknown message type 'z'",
            phase: app,
            bytes: msg(b'z', b"hello"),
            expect: Fatal("08P01", &["message type"]),
        },
        Case {
            name: "a fastpath function call",
            phase: app,
            bytes: msg(b'F', &[0, 0, 4, 210, 0, 0, 0, 0, 0, 0]),
            expect: Error("0A000", &["fastpath"]),
        },
        Case {
            name: "a Query without its terminating NUL",
            phase: app,
            bytes: msg(b'Q', b"SELECT 1"),
            expect: Error("08P01", &["invalid string"]),
        },
        Case {
            name: "invalid UTF-8 in a query",
            phase: app,
            bytes: msg(b'Q', b"SELECT '\xff\xfe'\0"),
            expect: Error("22021", &["invalid byte sequence"]),
        },
        Case {
            name: "a syntax error after a write in one query string",
            phase: app,
            bytes: query("INSERT INTO notes (body) VALUES ('limits-m1'); SELEC 2"),
            expect: Error("42601", &["syntax error"]),
        },
        Case {
            name: "Parse of SQL the parser rejects",
            phase: app,
            bytes: cat(&[parse("", "SELEC $1"), sync()]),
            expect: Error("42601", &["syntax error"]),
        },
        Case {
            name: "Bind to a statement that does not exist",
            phase: app,
            bytes: cat(&[bind("nope"), execute(""), sync()]),
            expect: Error("26000", &["\"nope\""]),
        },
        Case {
            name: "Describe of a statement that does not exist",
            phase: app,
            bytes: cat(&[describe(b'S', "nope"), sync()]),
            expect: Error("26000", &["\"nope\""]),
        },
        Case {
            name: "Execute of a portal that does not exist",
            phase: app,
            bytes: cat(&[execute("nope"), sync()]),
            expect: Error("34000", &["\"nope\""]),
        },
        Case {
            name: "Bind with too few parameters",
            phase: app,
            bytes: cat(&[
                parse("s1", "SELECT $1::int"),
                bind("s1"),
                execute(""),
                sync(),
            ]),
            expect: Error("08P01", &["0 parameters", "requires 1"]),
        },
        Case {
            name: "CopyData outside COPY",
            phase: app,
            bytes: cat(&[msg(b'd', b"junk\n"), query("SELECT 1")]),
            expect: Fine,
        },
        Case {
            name: "an empty query",
            phase: app,
            bytes: query(""),
            expect: Fine,
        },
        Case {
            name: "a deeply nested expression (3000 levels)",
            phase: app,
            bytes: query(&deep),
            expect: Answered,
        },
        Case {
            name: "an expression tree 100000 levels deep",
            phase: app,
            bytes: query(&long),
            expect: Answered,
        },
        // The admin console.
        Case {
            name: "unknown admin command",
            phase: console,
            bytes: query("FROB NODES"),
            expect: Error(
                "42601",
                &["unknown admin command", "SHOW NODES", "SWITCHOVER"],
            ),
        },
        Case {
            name: "extended protocol on the admin console",
            phase: console,
            bytes: cat(&[parse("", "SHOW NODES"), describe(b'S', ""), sync()]),
            expect: Error("0A000", &["simple"]),
        },
    ]
}

/// Runs one case; returns what went wrong, if anything.
async fn run_case(addr: SocketAddr, case: &Case) -> Result<(), String> {
    let mut r = match case.phase {
        Phase::Startup { .. } => Raw::connect(addr).await.map_err(|e| e.to_string())?,
        Phase::Session(db) => greeted_on(addr, db, "limits-bad").await?,
    };
    r.send(&case.bytes).await;
    if let Phase::Startup { half_close: true } = case.phase {
        let _ = r.s.shutdown().await;
    }
    let describe = |m: &[Msg]| {
        format!(
            "{:?} {:?}",
            kinds(m),
            errors(m).iter().map(|e| e.error_text()).collect::<Vec<_>>()
        )
    };
    match &case.expect {
        Expect::Fatal(code, words) => {
            let (msgs, ended) = r.until_closed(WAIT).await;
            let e = errors(&msgs);
            let ok = e.len() == 1
                && e[0].code() == *code
                && e[0].field(b'V') == "FATAL"
                && names_it(e[0], words)
                && ended != Ended::Timeout;
            if !ok {
                return Err(format!(
                    "expected FATAL {code} naming {words:?}, then a close; got {} then {ended:?}",
                    describe(&msgs)
                ));
            }
        }
        Expect::Closed => {
            let (msgs, ended) = r.until_closed(WAIT).await;
            if !msgs.is_empty() || ended == Ended::Timeout {
                return Err(format!(
                    "expected a silent close; got {} then {ended:?}",
                    describe(&msgs)
                ));
            }
        }
        Expect::Error(_, _) | Expect::Fine | Expect::Answered => {
            let msgs = r.until_ready(WAIT).await.map_err(|(m, e)| {
                format!(
                    "expected an answer and ReadyForQuery; got {} then {e:?}",
                    describe(&m)
                )
            })?;
            let e = errors(&msgs);
            match &case.expect {
                Expect::Error(code, words) => {
                    if e.len() != 1
                        || e[0].code() != *code
                        || e[0].field(b'V') != "ERROR"
                        || !names_it(e[0], words)
                    {
                        return Err(format!(
                            "expected one ERROR {code} naming {words:?}; got {}",
                            describe(&msgs)
                        ));
                    }
                }
                Expect::Fine if !e.is_empty() => {
                    return Err(format!("expected no error; got {}", describe(&msgs)));
                }
                _ => eprintln!("    answered {}", describe(&msgs)),
            }
            let check = match case.phase {
                Phase::Session("reprise") => "SHOW GROUPS",
                _ => "SELECT 1",
            };
            let after = r.query(check).await?;
            if !errors(&after).is_empty() || first_column(&after).is_empty() {
                return Err(format!("then {check} answered {}", describe(&after)));
            }
            let ended = r.terminate().await;
            if ended == Ended::Timeout {
                return Err("the session did not close after Terminate".into());
            }
        }
        Expect::Negotiated(options) => {
            let msgs = r
                .until_ready(WAIT)
                .await
                .map_err(|(m, e)| format!("got {} then {e:?}", describe(&m)))?;
            let v = &msgs[0];
            // The whole version, as PostgreSQL sends it (libpq 18 refuses
            // anything below 3.0).
            let version =
                i32::from_be_bytes(v.body.get(..4).unwrap_or(&[9; 4]).try_into().unwrap());
            let count = i32::from_be_bytes(v.body.get(4..8).unwrap_or(&[9; 4]).try_into().unwrap());
            let listed = String::from_utf8_lossy(v.body.get(8..).unwrap_or_default()).into_owned();
            let ok = v.tag == b'v'
                && version == PROTOCOL_3_0
                && count == options.len() as i32
                && options.iter().all(|o| listed.contains(o))
                && msgs.get(1).map(Msg::kind).as_deref() == Some("R0")
                && errors(&msgs).is_empty();
            if !ok {
                return Err(format!(
                    "expected NegotiateProtocolVersion (3.0, {options:?}) then a session; got {} \
                     (version {version:#x}, {count} options {listed:?})",
                    describe(&msgs)
                ));
            }
            select_one(&mut r).await?;
            r.terminate().await;
        }
    }
    Ok(())
}

/// A raw SCRAM-SHA-256 login: the message kinds seen, the salt and
/// iteration count offered, and the error or the session.
struct Login {
    kinds: Vec<String>,
    salt: String,
    iterations: String,
    error: Option<Msg>,
    ended: Option<Ended>,
    session: Option<Raw>,
}

async fn scram_login(addr: SocketAddr, user: &str, password: &str, db: &str) -> Login {
    let mut r = Raw::connect(addr).await.unwrap();
    r.send(&startup(&[("user", user), ("database", db)])).await;
    let mut login = Login {
        kinds: vec![],
        salt: String::new(),
        iterations: String::new(),
        error: None,
        ended: None,
        session: None,
    };
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let mut step = 0;
    loop {
        let m = match r.next(WAIT).await {
            Ok(m) => m,
            Err(e) => {
                login.ended = Some(e);
                return login;
            }
        };
        login.kinds.push(m.kind());
        match (m.tag, m.kind().as_str()) {
            (b'R', "R10") if step == 0 => {
                step = 1;
                let mut body = cstr("SCRAM-SHA-256");
                body.extend((scram.message().len() as i32).to_be_bytes());
                body.extend_from_slice(scram.message());
                r.send(&msg(b'p', &body)).await;
            }
            (b'R', "R11") if step == 1 => {
                step = 2;
                let first = String::from_utf8_lossy(&m.body[4..]).into_owned();
                for part in first.split(',') {
                    if let Some(s) = part.strip_prefix("s=") {
                        login.salt = s.to_string();
                    }
                    if let Some(i) = part.strip_prefix("i=") {
                        login.iterations = i.to_string();
                    }
                }
                scram.update(&m.body[4..]).unwrap();
                r.send(&msg(b'p', scram.message())).await;
            }
            (b'E', _) => {
                login.ended = Some(r.until_closed(WAIT).await.1);
                login.error = Some(m);
                return login;
            }
            (b'Z', _) => {
                login.session = Some(r);
                return login;
            }
            _ => {}
        }
    }
}

/// A raw login that sends `reply` instead of a SASLInitialResponse.
async fn sasl_answer(addr: SocketAddr, reply: &[u8]) -> (Vec<Msg>, Ended) {
    let mut r = Raw::connect(addr).await.unwrap();
    r.send(&startup(&[("user", "alice"), ("database", "app")]))
        .await;
    let first = r.next(WAIT).await.expect("an authentication request");
    assert_eq!(first.kind(), "R10");
    r.send(reply).await;
    r.until_closed(WAIT).await
}

/// What the bad inputs got, and what the proxy logged about each.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
    /// Inputs that made the proxy log more than one line.
    chatty: Vec<String>,
    /// Lines about a client that do not say which client.
    anonymous: Vec<String>,
    log: Vec<String>,
}

impl Report {
    /// Records the outcome of one input and the log lines since `mark`.
    async fn note(&mut self, name: &str, r: Result<(), String>, mark: LogMark) {
        // The proxy logs before it answers; a moment for any stragglers.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let lines = log_lines(mark);
        self.log
            .push(format!("{name}: {} log line(s)", lines.len()));
        for l in &lines {
            self.log.push(format!("    {l}"));
            if !l.contains("peer=") {
                self.anonymous.push(format!("{name}: {l}"));
            }
        }
        if lines.len() > 1 {
            self.chatty.push(format!("{name}: {lines:#?}"));
        }
        match r {
            Ok(()) => eprintln!("ok    {name}"),
            Err(e) => {
                eprintln!("FAIL  {name}: {e}");
                self.failures.push(format!("{name}: {e}"));
            }
        }
    }

    /// Prints the log per input; panics with every problem found.
    fn assert_clean(self) {
        eprintln!("proxy log per bad input:\n{}", self.log.join("\n"));
        let mut problems = Vec::new();
        if !self.failures.is_empty() {
            problems.push(format!(
                "{} bad inputs were not handled right:\n{}",
                self.failures.len(),
                self.failures.join("\n")
            ));
        }
        if !self.chatty.is_empty() {
            problems.push(format!(
                "bad inputs logged more than one line:\n{}",
                self.chatty.join("\n")
            ));
        }
        if !self.anonymous.is_empty() {
            problems.push(format!(
                "{} log lines about a client do not say which (no session span, no peer):\n{}",
                self.anonymous.len(),
                self.anonymous.join("\n")
            ));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    }
}

/// Captures the log while alive.
struct Capturing;

impl Capturing {
    fn start() -> Capturing {
        CAPTURED.lock().unwrap().clear();
        RAW_PEERS.lock().unwrap().clear();
        CAPTURING.store(true, Ordering::Relaxed);
        Capturing
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        CAPTURING.store(false, Ordering::Relaxed);
    }
}

/// Wrong passwords and unknown users: 28P01 with the same message, the same
/// exchange and nothing (salt included) that tells whether the user exists.
async fn password_cases(addr: SocketAddr, report: &mut Report) {
    let mark = log_mark();
    let ok = scram_login(addr, "alice", "secret", "app").await;
    let mut session = ok.session.expect("alice logs in");
    select_one(&mut session).await.unwrap();
    session.terminate().await;
    report.note("scram: the right password", Ok(()), mark).await;

    let mut logins = Vec::new();
    for (user, password) in [
        ("alice", "wrong"),
        ("mallory", "secret"),
        ("alice", "wrong again"),
        ("mallory", "whatever"),
        ("trudy", "secret"),
    ] {
        let mark = log_mark();
        let l = scram_login(addr, user, password, "app").await;
        let expected = format!("password authentication failed for user \"{user}\"");
        let r = match &l.error {
            Some(e)
                if e.code() == "28P01"
                    && e.field(b'M') == expected
                    && l.ended.as_ref().is_some_and(|e| *e != Ended::Timeout) =>
            {
                Ok(())
            }
            other => Err(format!(
                "expected 28P01 then a close; got {:?} {:?} then {:?}",
                l.kinds,
                other.as_ref().map(|e| e.error_text()),
                l.ended
            )),
        };
        let name = format!("scram: {user} with password {password:?}");
        report.note(&name, r, mark).await;
        logins.push(l);
    }
    let [wrong, unknown, wrong_again, unknown_again, other_unknown] = &logins[..] else {
        unreachable!()
    };
    let anonymized = |l: &Login| {
        l.error.as_ref().map(|e| {
            ["alice", "mallory", "trudy"]
                .iter()
                .fold(e.error_text(), |t, u| t.replace(u, "U"))
        })
    };
    let r = if wrong.kinds == unknown.kinds
        && wrong.iterations == unknown.iterations
        && anonymized(wrong) == anonymized(unknown)
    {
        Ok(())
    } else {
        Err(format!(
            "alice: {:?} i={} {:?}; mallory: {:?} i={} {:?}",
            wrong.kinds,
            wrong.iterations,
            anonymized(wrong),
            unknown.kinds,
            unknown.iterations,
            anonymized(unknown),
        ))
    };
    let name = "scram: a wrong password and an unknown user get the same answer";
    report.note(name, r, log_mark()).await;
    // A real user's salt is the same at every attempt; so must an unknown
    // user's be, and two unknown users must not share one, or comparing
    // salts tells which names exist.
    let salts = format!(
        "alice's salt {} then {}; mallory's {} then {}; trudy's {}",
        wrong.salt, wrong_again.salt, unknown.salt, unknown_again.salt, other_unknown.salt
    );
    eprintln!("{salts}");
    let r = if wrong.salt == wrong_again.salt
        && unknown.salt == unknown_again.salt
        && unknown.salt != other_unknown.salt
    {
        Ok(())
    } else {
        Err(salts)
    };
    let name = "scram: salts do not tell which users exist";
    report.note(name, r, log_mark()).await;
}

/// Broken SASL exchanges, and the console for a user who is no admin.
async fn sasl_cases(addr: SocketAddr, report: &mut Report) {
    let mut other_mechanism = cstr("SCRAM-SHA-1");
    other_mechanism.extend(4i32.to_be_bytes());
    other_mechanism.extend(b"n,,x");
    let mut junk = cstr("SCRAM-SHA-256");
    junk.extend(5i32.to_be_bytes());
    junk.extend(b"hello");
    let cases: [(&str, Vec<u8>, &str, &[&str]); 4] = [
        (
            "scram: an unsupported SASL mechanism",
            msg(b'p', &other_mechanism),
            "28000",
            &["SCRAM-SHA-1"],
        ),
        (
            "scram: a SASLInitialResponse without its mechanism",
            msg(b'p', b"SCRAM"),
            "08P01",
            &["SASLInitialResponse"],
        ),
        (
            "scram: a malformed client-first message",
            msg(b'p', &junk),
            "08P01",
            &["SCRAM"],
        ),
        (
            "scram: a Query instead of a password message",
            query("SELECT 1"),
            "08P01",
            &["password message"],
        ),
    ];
    for (name, reply, code, words) in cases {
        let mark = log_mark();
        let (msgs, ended) = sasl_answer(addr, &reply).await;
        let e = errors(&msgs);
        let r = if e.len() == 1
            && e[0].code() == code
            && names_it(e[0], words)
            && ended != Ended::Timeout
        {
            Ok(())
        } else {
            Err(format!(
                "expected {code} naming {words:?} then a close; got {:?} {:?} then {ended:?}",
                kinds(&msgs),
                e.iter().map(|e| e.error_text()).collect::<Vec<_>>()
            ))
        };
        report.note(name, r, mark).await;
    }

    // A user who is not an admin may look (SHOW) but not act.
    let mark = log_mark();
    let console = scram_login(addr, "alice", "secret", "reprise").await;
    let r = match console.session {
        Some(mut session) => {
            let show = session.query("SHOW NODES").await;
            let act = session.query("SWITCHOVER app TO n2").await;
            match (&show, &act) {
                (Ok(s), Ok(a))
                    if errors(s).is_empty()
                        && errors(a).len() == 1
                        && errors(a)[0].code() == "42501"
                        && names_it(errors(a)[0], &["admin", "SWITCHOVER"]) =>
                {
                    Ok(())
                }
                _ => Err(format!(
                    "expected SHOW NODES to answer and SWITCHOVER to get 42501; got {:?} and {:?}",
                    show.map(|m| kinds(&m)),
                    act.map(|m| errors(&m)
                        .iter()
                        .map(|e| e.error_text())
                        .collect::<Vec<_>>())
                )),
            }
        }
        None => Err(format!(
            "expected a console session; got {:?} {:?}",
            console.kinds,
            console.error.as_ref().map(|e| e.error_text())
        )),
    };
    let name = "scram: acting console commands for a user who is not an admin";
    report.note(name, r, mark).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_matrix() {
    let _serial = serial().await;
    bounded(Duration::from_secs(300), async {
        let g = TestGroup::start(2, |_| {}).await;
        // A second proxy over the same nodes, with passwords.
        let mut config = g.config();
        config.auth.method = reprise::config::AuthMethod::ScramSha256;
        config.auth.users = vec![reprise::config::UserConfig {
            name: "alice".into(),
            password: "secret".into(),
            scram_verifier: None,
            admin: false,
        }];
        let mut scram = Proxy::start(config).await;
        let scram_url = format!("postgres://alice:secret@{}/app", scram.addr);
        let healthy = Healthy::start(&g.proxy.url("app"), true).await;
        let healthy_scram = Healthy::start(&scram_url, false).await;

        let capturing = Capturing::start();
        let mut report = Report::default();
        for case in cases() {
            let mark = log_mark();
            let r = run_case(g.proxy.addr, &case).await;
            report.note(case.name, r, mark).await;
        }
        password_cases(scram.addr, &mut report).await;
        sasl_cases(scram.addr, &mut report).await;
        drop(capturing);

        // Nothing of the query string that failed to parse ran.
        for i in 0..2 {
            let n: i64 = g
                .direct(i)
                .await
                .query_one("SELECT count(*) FROM notes WHERE body = 'limits-m1'", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                n, 0,
                "node {i} has a write of a query string that failed to parse"
            );
        }
        healthy.check("the healthy session").await;
        healthy_scram
            .check("the healthy session with a password")
            .await;
        for n in ["n1", "n2"] {
            let state = wait_node_state(&g.proxy, n, &["up"], Duration::from_secs(30)).await;
            assert!(
                state.is_some(),
                "{n} is not up: {:#}",
                g.proxy.status().await
            );
        }
        scram.stop().await;
        report.assert_clean();
    })
    .await;
}
