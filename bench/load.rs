//! The load generator: N tokio-postgres connections to any PostgreSQL-wire
//! endpoint running one workload for a duration or a number of operations,
//! with latency percentiles from an HDR histogram.
//!
//! Workloads work on pgbench's tables (`pgbench -i`):
//!
//! - `select`: a point read of one random account;
//! - `tpcb`: pgbench's TPC-B-like read-write transaction;
//! - `mixed`: `tpcb` with probability `write_ratio`, else `select`;
//! - `rw-after-w`: set one of the client's own accounts to a new value in
//!   autocommit, then read it back on the same connection; a read that does
//!   not return the new value is a stale read;
//! - `wait-read`: a point read through `bench_wait_read(aid)`, a STABLE
//!   function that waits 2 ms server-side under a node-local advisory lock,
//!   so each node serves at most one at a time: a latency-bound read whose
//!   throughput grows with the number of nodes serving reads, not with CPU.
//!
//! With `mirrors`, every client also holds a connection to each mirror and
//! runs each operation, with the same values, on all its connections at
//! once; an operation counts when all of them finished. That is replication
//! by re-running everything everywhere with nothing in between: the
//! database work once per copy, the client's once — what the copies alone
//! cost a machine that hosts them all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    Select,
    Tpcb,
    Mixed,
    RwAfterW,
    WaitRead,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Select => "select",
            Workload::Tpcb => "tpcb",
            Workload::Mixed => "mixed",
            Workload::RwAfterW => "rw-after-w",
            Workload::WaitRead => "wait-read",
        }
    }
}

/// How statements reach the server: `simple` sends SQL text with the
/// values inlined, `extended` an unnamed Parse/Bind/Execute per statement,
/// `prepared` named statements prepared once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Simple,
    Extended,
    Prepared,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub url: String,
    pub workload: Workload,
    pub protocol: Protocol,
    pub clients: usize,
    /// Run this long…
    pub duration: Option<Duration>,
    /// …or this many operations in all (the first limit reached ends it).
    pub count: Option<u64>,
    /// `mixed`: the share of operations that are `tpcb` transactions.
    pub write_ratio: f64,
    /// At most this many operations per second in all (paced per client).
    pub rate: Option<f64>,
    /// A progress line on stderr every second.
    pub progress: bool,
    /// Endpoints that run every operation too, at the same time.
    pub mirrors: Vec<String>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub workload: Workload,
    pub protocol: Protocol,
    pub clients: usize,
    pub seconds: f64,
    /// Operations that succeeded (a `tpcb` transaction is one).
    pub ops: u64,
    pub ops_per_s: f64,
    pub errors: u64,
    /// `rw-after-w`: reads that did not see the write just before them.
    pub stale_reads: u64,
    /// `rw-after-w`: reads checked.
    pub checked_reads: u64,
    pub latency_ms: Latency,
    /// The first few distinct error messages.
    pub error_samples: Vec<String>,
}

impl LoadReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        let mut s = format!(
            "{:<11} {:<9} {:>7} {:>10} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            "workload",
            "protocol",
            "clients",
            "ops",
            "ops/s",
            "errors",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        );
        s += &format!(
            "{:<11} {:<9} {:>7} {:>10} {:>10.0} {:>7} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
            self.workload.name(),
            self.protocol.name(),
            self.clients,
            self.ops,
            self.ops_per_s,
            self.errors,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        );
        if self.workload == Workload::RwAfterW {
            s += &format!(
                "stale reads: {} of {} read-after-write checks\n",
                self.stale_reads, self.checked_reads
            );
        }
        for e in &self.error_samples {
            s += &format!("error: {e}\n");
        }
        s
    }
}

/// The statements the workloads use; every parameter is an int4.
const SQL: [&str; 9] = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
    "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
    "BEGIN",
    "END",
    "UPDATE pgbench_accounts SET abalance = $1 WHERE aid = $2",
    "SELECT bench_wait_read($1)",
];
const READ: usize = 0;
const UPDATE_ACCOUNT: usize = 1;
const UPDATE_TELLER: usize = 2;
const UPDATE_BRANCH: usize = 3;
const INSERT_HISTORY: usize = 4;
const BEGIN: usize = 5;
const END: usize = 6;
const SET_ACCOUNT: usize = 7;
const WAIT_READ: usize = 8;

/// `bench_wait_read(aid)`: STABLE, so a proxy may send it to a subscriber;
/// it waits 2 ms holding a node-local advisory lock, so one node runs one
/// at a time whatever the number of cores.
pub const WAIT_READ_FUNCTION: &str = "CREATE OR REPLACE FUNCTION bench_wait_read(a int) RETURNS int \
     LANGUAGE plpgsql STABLE AS $$ BEGIN \
     PERFORM pg_advisory_xact_lock(727272); PERFORM pg_sleep(0.002); \
     RETURN (SELECT abalance FROM pgbench_accounts WHERE aid = a); END $$";

/// One connection and its statements in the chosen protocol.
struct Conn {
    client: Client,
    protocol: Protocol,
    prepared: Vec<Statement>,
}

impl Conn {
    async fn open(url: &str, protocol: Protocol, workload: Workload) -> anyhow::Result<Conn> {
        let client = connect(url).await?;
        let mut prepared = Vec::new();
        if protocol == Protocol::Prepared {
            for (i, sql) in SQL.iter().enumerate() {
                // Prepare only what this workload runs: the function of
                // `wait-read` need not exist for the others.
                let needed = match workload {
                    Workload::WaitRead => i == WAIT_READ,
                    _ => i != WAIT_READ,
                };
                prepared.push(if needed {
                    client.prepare(sql).await?
                } else {
                    client.prepare("SELECT 1").await?
                });
            }
        }
        Ok(Conn {
            client,
            protocol,
            prepared,
        })
    }

    /// Runs statement `i` with `params`; the first column of the first
    /// row, if any, as an integer.
    async fn run(&self, i: usize, params: &[i32]) -> Result<Option<i64>, tokio_postgres::Error> {
        match self.protocol {
            Protocol::Simple => {
                let mut sql = SQL[i].to_string();
                for (n, v) in params.iter().enumerate().rev() {
                    sql = sql.replace(&format!("${}", n + 1), &v.to_string());
                }
                let msgs = self.client.simple_query(&sql).await?;
                Ok(msgs.iter().find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                    _ => None,
                }))
            }
            Protocol::Extended => {
                let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
                    .iter()
                    .map(|v| (v as &(dyn ToSql + Sync), Type::INT4))
                    .collect();
                let rows = self.client.query_typed(SQL[i], &typed).await?;
                Ok(first_int(&rows))
            }
            Protocol::Prepared => {
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let rows = self.client.query(&self.prepared[i], &refs).await?;
                Ok(first_int(&rows))
            }
        }
    }
}

fn first_int(rows: &[tokio_postgres::Row]) -> Option<i64> {
    let row = rows.first()?;
    row.try_get::<_, Option<i32>>(0)
        .ok()
        .flatten()
        .map(i64::from)
}

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The size of pgbench's tables at the endpoint.
#[derive(Debug, Clone, Copy)]
struct Scale {
    branches: i32,
}

impl Scale {
    fn accounts(self) -> i32 {
        self.branches * 100_000
    }
    fn tellers(self) -> i32 {
        self.branches * 10
    }
}

/// Shared between the clients and the progress line.
struct Shared {
    stop: AtomicBool,
    /// Operations started (for `count`).
    tickets: AtomicU64,
    ops: AtomicU64,
    errors: AtomicU64,
    stale: AtomicU64,
}

/// One client's results.
struct ClientResult {
    hist: Histogram<u64>,
    checked: u64,
    errors: Vec<String>,
}

/// Runs the workload and reports.
pub async fn run(opts: &LoadOptions) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(opts.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        opts.duration.is_some() || opts.count.is_some(),
        "give --duration or --count"
    );
    let first = connect(&opts.url).await?;
    let branches: i64 = first
        .query_one("SELECT count(*) FROM pgbench_branches", &[])
        .await
        .map_err(|e| {
            anyhow::anyhow!("reading pgbench_branches at the endpoint failed ({e}); create the tables with `pgbench -i`")
        })?
        .get(0);
    anyhow::ensure!(branches > 0, "pgbench_branches is empty: run `pgbench -i`");
    let scale = Scale {
        branches: branches as i32,
    };
    if opts.workload == Workload::WaitRead {
        let missing: bool = first
            .query_one(
                "SELECT to_regprocedure('bench_wait_read(integer)') IS NULL",
                &[],
            )
            .await?
            .get(0);
        if missing {
            first.batch_execute(WAIT_READ_FUNCTION).await?;
        }
    }
    drop(first);

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        tickets: AtomicU64::new(0),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stale: AtomicU64::new(0),
    });
    // Every connection is open before the clock starts.
    let mut conns = Vec::new();
    for _ in 0..opts.clients {
        conns.push(open_all(opts).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (id, conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(client_loop(
            id,
            conn,
            opts.clone(),
            scale,
            shared.clone(),
        )));
    }
    let progress = opts.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let ops = shared.ops.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>4.0}s] {:>8} ops/s  total {:>9}  errors {}  stale {}",
                    start.elapsed().as_secs_f64(),
                    ops - last,
                    ops,
                    shared.errors.load(Ordering::Relaxed),
                    shared.stale.load(Ordering::Relaxed)
                );
                last = ops;
            }
        })
    });
    if let Some(d) = opts.duration {
        let deadline = tokio::time::sleep(d);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    if tasks.iter().all(|t| t.is_finished()) { break; }
                }
            }
        }
        shared.stop.store(true, Ordering::Relaxed);
    }
    let mut hist = new_histogram();
    let mut checked = 0;
    let mut samples: Vec<String> = Vec::new();
    for t in tasks {
        let r = t.await?;
        hist.add(&r.hist)?;
        checked += r.checked;
        for e in r.errors {
            if samples.len() < 5 && !samples.contains(&e) {
                samples.push(e);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let ops = shared.ops.load(Ordering::Relaxed);
    Ok(LoadReport {
        workload: opts.workload,
        protocol: opts.protocol,
        clients: opts.clients,
        seconds,
        ops,
        ops_per_s: ops as f64 / seconds,
        errors: shared.errors.load(Ordering::Relaxed),
        stale_reads: shared.stale.load(Ordering::Relaxed),
        checked_reads: checked,
        latency_ms: Latency {
            mean: hist.mean() / 1000.0,
            p50: ms(hist.value_at_quantile(0.5)),
            p90: ms(hist.value_at_quantile(0.9)),
            p99: ms(hist.value_at_quantile(0.99)),
            p999: ms(hist.value_at_quantile(0.999)),
            max: ms(hist.max()),
        },
        error_samples: samples,
    })
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

/// A client's connection to the endpoint, then one to each mirror.
async fn open_all(opts: &LoadOptions) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(1 + opts.mirrors.len());
    for url in std::iter::once(&opts.url).chain(&opts.mirrors) {
        conns.push(Conn::open(url, opts.protocol, opts.workload).await?);
    }
    Ok(conns)
}

async fn client_loop(
    id: usize,
    mut conns: Vec<Conn>,
    opts: LoadOptions,
    scale: Scale,
    shared: Arc<Shared>,
) -> ClientResult {
    let mut rng = StdRng::seed_from_u64(0x5eed_0000 + id as u64);
    let mut result = ClientResult {
        hist: new_histogram(),
        checked: 0,
        errors: Vec::new(),
    };
    // `rw-after-w`: values unique to this client, on accounts only it
    // touches (aid ≡ id mod clients).
    let mut value = (id as i32 + 1) * 10_000_000;
    let interval = opts
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(opts.clients as f64 / r));
    let mut next = tokio::time::Instant::now();
    loop {
        if let Some(i) = interval {
            tokio::time::sleep_until(next).await;
            next = (next + i).max(tokio::time::Instant::now() - i);
        }
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(count) = opts.count
            && shared.tickets.fetch_add(1, Ordering::Relaxed) >= count
        {
            break;
        }
        value += 1;
        let started = Instant::now();
        // Every connection draws the same values from its own copy of the
        // generator; the last copy carries on.
        let mut rngs = vec![rng.clone(); conns.len()];
        let outcome = if let [conn] = conns.as_slice() {
            operation(conn, &mut rngs[0], &opts, scale, id, value).await
        } else {
            let all = conns
                .iter()
                .zip(rngs.iter_mut())
                .map(|(conn, rng)| operation(conn, rng, &opts, scale, id, value));
            futures_util::future::join_all(all)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map(|fresh| fresh.into_iter().next().flatten())
        };
        rng = rngs.pop().expect("one connection at least");
        match outcome {
            Ok(fresh) => {
                let _ = result
                    .hist
                    .record(started.elapsed().as_micros().max(1) as u64);
                shared.ops.fetch_add(1, Ordering::Relaxed);
                if let Some(fresh) = fresh {
                    result.checked += 1;
                    if !fresh {
                        shared.stale.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if result.errors.len() < 5 {
                    result.errors.push(error_text(&e));
                }
                if conns.iter().any(|c| c.client.is_closed()) {
                    // Reopen, unless the run is over.
                    loop {
                        if shared.stop.load(Ordering::Relaxed) {
                            return result;
                        }
                        if let Ok(c) = open_all(&opts).await {
                            conns = c;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                } else {
                    for conn in &conns {
                        let _ = conn.client.simple_query("ROLLBACK").await;
                    }
                }
            }
        }
    }
    result
}

/// One operation of the workload on one connection; for `rw-after-w`,
/// whether the read saw the write.
async fn operation(
    conn: &Conn,
    rng: &mut StdRng,
    opts: &LoadOptions,
    scale: Scale,
    id: usize,
    value: i32,
) -> Result<Option<bool>, tokio_postgres::Error> {
    match opts.workload {
        Workload::Select => select(conn, rng, scale).await.map(|_| None),
        Workload::WaitRead => {
            let aid = rng.random_range(1..=scale.accounts());
            conn.run(WAIT_READ, &[aid]).await.map(|_| None)
        }
        Workload::Tpcb => tpcb(conn, rng, scale).await.map(|_| None),
        Workload::Mixed => {
            if rng.random_bool(opts.write_ratio.clamp(0.0, 1.0)) {
                tpcb(conn, rng, scale).await.map(|_| None)
            } else {
                select(conn, rng, scale).await.map(|_| None)
            }
        }
        Workload::RwAfterW => {
            let slots = (scale.accounts() - 1 - id as i32) / opts.clients as i32;
            let aid = 1 + id as i32 + opts.clients as i32 * rng.random_range(0..slots.max(1));
            read_after_write(conn, aid, value).await.map(Some)
        }
    }
}

fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

async fn select(conn: &Conn, rng: &mut StdRng, scale: Scale) -> Result<(), tokio_postgres::Error> {
    let aid = rng.random_range(1..=scale.accounts());
    conn.run(READ, &[aid]).await.map(drop)
}

/// pgbench's built-in TPC-B-like script.
async fn tpcb(conn: &Conn, rng: &mut StdRng, scale: Scale) -> Result<(), tokio_postgres::Error> {
    let aid = rng.random_range(1..=scale.accounts());
    let bid = rng.random_range(1..=scale.branches);
    let tid = rng.random_range(1..=scale.tellers());
    let delta = rng.random_range(-5000..=5000);
    conn.run(BEGIN, &[]).await?;
    conn.run(UPDATE_ACCOUNT, &[delta, aid]).await?;
    conn.run(READ, &[aid]).await?;
    conn.run(UPDATE_TELLER, &[delta, tid]).await?;
    conn.run(UPDATE_BRANCH, &[delta, bid]).await?;
    conn.run(INSERT_HISTORY, &[tid, bid, aid, delta]).await?;
    conn.run(END, &[]).await?;
    Ok(())
}

/// Sets account `aid` to `value` in autocommit and reads it back; true if
/// the read saw the value.
async fn read_after_write(
    conn: &Conn,
    aid: i32,
    value: i32,
) -> Result<bool, tokio_postgres::Error> {
    conn.run(SET_ACCOUNT, &[value, aid]).await?;
    let seen = conn.run(READ, &[aid]).await?;
    Ok(seen == Some(i64::from(value)))
}
