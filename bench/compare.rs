//! `reprise-bench compare`: every system measured in one run, on the same
//! local copies, with the load generator of `load.rs`; each figure as a
//! ratio to direct.
//!
//! Four copies are made from one `pgbench -i` (scale 10): n4 alone is
//! "direct" (and PgBouncer's backend), n1–n3 are the group behind Reprise
//! and behind Pgpool-II. Reprise runs in this process; the load generator
//! has a runtime of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reprise::config::Config;
use reprise::local::{LocalCluster, LocalNode};
use serde::Serialize;

use crate::Proxy;
use crate::charts::{self, Bar};
use crate::failover;
use crate::load::{self, LoadOptions, LoadReport, Protocol, Workload};
use crate::pgpool::Pgpool;
use crate::{PgBouncer, pgbench_digest};

pub struct Options {
    pub duration: u64,
    pub clients: usize,
    pub scale: u32,
    pub failover_runs: usize,
    pub out_dir: PathBuf,
}

pub const DIRECT: &str = "direct (1 node)";
pub const PGBOUNCER: &str = "PgBouncer (session)";
pub const REPRISE_1: &str = "Reprise, 1 node";
pub const REPRISE_2: &str = "Reprise, 2 nodes";
pub const REPRISE_3: &str = "Reprise, 3 nodes";
pub const PGPOOL: &str = "Pgpool-II, 3 nodes";
pub const COPIES_ALONE: &str = "3 copies, no proxy";

/// One measurement.
#[derive(Debug, Serialize)]
struct Measurement {
    scenario: String,
    system: String,
    /// Throughput divided by direct's in the same scenario.
    ratio_to_direct: Option<f64>,
    report: LoadReport,
}

/// What the write run through Reprise saw of its subscribers.
#[derive(Debug, Serialize)]
struct Lag {
    /// Every sample of every subscriber.
    lag_seq_p50: u64,
    lag_seq_p99: u64,
    lag_seq_max: u64,
    lag_ms_p50: u64,
    lag_ms_p99: u64,
    lag_ms_max: u64,
    /// From the end of the run until every subscriber applied the head.
    catch_up_ms: f64,
    /// (seconds since the start, node, lag_seq, lag_ms)
    samples: Vec<(f64, String, u64, u64)>,
}

/// Whether the copies hold the same rows after a workload.
#[derive(Debug, Serialize)]
struct Copies {
    system: String,
    what: String,
    identical: bool,
    /// The columns whose values differ between copies (nondeterminism).
    diverged_columns: Vec<String>,
    digests: Vec<String>,
    nondeterminism: Option<NdOutcome>,
}

#[derive(Debug, Serialize)]
struct ReadYourWrites {
    read_your_writes: bool,
    stale_reads: u64,
    checked_reads: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    date: String,
    machine: String,
    duration_s: u64,
    clients: usize,
    scale: u32,
    measurements: Vec<Measurement>,
    write_lag: Option<Lag>,
    copies: Vec<Copies>,
    read_your_writes: Vec<ReadYourWrites>,
    failover: BTreeMap<String, failover::Stat>,
    failover_lost_writes: usize,
    failover_copies_identical: bool,
    wall_time_s: f64,
}

struct Runner {
    load_rt: tokio::runtime::Runtime,
    duration: Duration,
    clients: usize,
    measurements: Vec<Measurement>,
}

impl Runner {
    /// The point reads in every protocol mode, then `wait-read`.
    fn reads(&mut self, system: &str, url: &str) -> anyhow::Result<()> {
        for (scenario, protocol) in SELECT_SCENARIOS {
            self.measure(scenario, system, url, Workload::Select, protocol)?;
        }
        self.measure(
            WAIT_READ,
            system,
            url,
            Workload::WaitRead,
            Protocol::Prepared,
        )?;
        Ok(())
    }

    fn measure(
        &mut self,
        scenario: &str,
        system: &str,
        url: &str,
        workload: Workload,
        protocol: Protocol,
    ) -> anyhow::Result<&LoadReport> {
        self.measure_mirrored(scenario, system, url, &[], workload, protocol)
    }

    /// `measure`, every operation also run on each of `mirrors`.
    fn measure_mirrored(
        &mut self,
        scenario: &str,
        system: &str,
        url: &str,
        mirrors: &[String],
        workload: Workload,
        protocol: Protocol,
    ) -> anyhow::Result<&LoadReport> {
        let opts = LoadOptions {
            url: url.to_string(),
            workload,
            protocol,
            clients: self.clients,
            duration: Some(self.duration),
            count: None,
            write_ratio: 0.0,
            rate: None,
            progress: false,
            mirrors: mirrors.to_vec(),
        };
        let report = self
            .load_rt
            .block_on(load::run(&opts))
            .map_err(|e| anyhow::anyhow!("{scenario} through {system}: {e:#}"))?;
        let direct = self
            .measurements
            .iter()
            .find(|m| m.scenario == scenario && m.system == DIRECT)
            .map(|m| m.report.ops_per_s);
        let ratio = direct.map(|d| report.ops_per_s / d);
        println!(
            "{:<24} {:<22} {:>9.0} {:>8.3} {:>8.3} {:>8.3} {:>7} {:>7}",
            scenario,
            system,
            report.ops_per_s,
            report.latency_ms.p50,
            report.latency_ms.p99,
            report.latency_ms.max,
            ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into()),
            report.errors
        );
        for e in &report.error_samples {
            println!("    error: {e}");
        }
        self.measurements.push(Measurement {
            scenario: scenario.to_string(),
            system: system.to_string(),
            ratio_to_direct: ratio,
            report,
        });
        Ok(&self.measurements.last().expect("just pushed").report)
    }

    /// Starts Reprise on `config`, runs `f`, stops it.
    fn with_reprise<T>(
        &mut self,
        config: Config,
        f: impl FnOnce(&mut Runner, &Proxy) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let proxy = Proxy::start(config)?;
        let r = f(self, &proxy);
        proxy.stop();
        r
    }
}

const SELECT_SCENARIOS: [(&str, Protocol); 3] = [
    ("select simple", Protocol::Simple),
    ("select extended", Protocol::Extended),
    ("select prepared", Protocol::Prepared),
];
const WAIT_READ: &str = "wait-read (latency-bound)";
const TPCB: &str = "tpcb prepared";

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out_dir)?;
    let dir = tempfile::Builder::new().prefix("reprise-bench").tempdir()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    eprintln!(
        "creating 4 local copies with pgbench scale {} (n4 is direct, n1–n3 the group) …",
        opts.scale
    );
    let mut cluster = LocalCluster::create(
        dir.path(),
        4,
        "app",
        &[
            ("fsync", "off"),
            ("max_connections", "200"),
            ("shared_buffers", "256MB"),
        ],
        |node| {
            reprise::local::pgbench_init(node, "app", opts.scale)?;
            node.psql("app", load::WAIT_READ_FUNCTION).map(drop)
        },
    )?;
    let direct = cluster.nodes.pop().expect("four nodes");
    let direct_url = direct.url("app");
    let mut runner = Runner {
        load_rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        duration: Duration::from_secs(opts.duration),
        clients: opts.clients,
        measurements: Vec::new(),
    };
    println!(
        "compare: {} clients, {} s per measurement, pgbench scale {}, {cores} cores; \
         ratio = ops/s ÷ direct's ops/s in the same scenario",
        opts.clients, opts.duration, opts.scale
    );
    // Warm every copy's caches, unmeasured.
    for node in cluster.nodes.iter().chain(std::iter::once(&direct)) {
        let warm = LoadOptions {
            url: node.url("app"),
            workload: Workload::Select,
            protocol: Protocol::Prepared,
            clients: opts.clients,
            duration: Some(Duration::from_secs(2)),
            count: None,
            write_ratio: 0.0,
            rate: None,
            progress: false,
            mirrors: Vec::new(),
        };
        runner.load_rt.block_on(load::run(&warm))?;
    }
    println!(
        "{:<24} {:<22} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7}",
        "scenario", "system", "ops/s", "p50 ms", "p99 ms", "max ms", "ratio", "errors"
    );

    // Direct, then PgBouncer in front of the same node.
    runner.reads(DIRECT, &direct_url)?;
    runner.measure(
        TPCB,
        DIRECT,
        &direct_url,
        Workload::Tpcb,
        Protocol::Prepared,
    )?;
    match PgBouncer::start(dir.path(), &direct) {
        Ok(pgb) => {
            let url = format!("postgres://postgres@127.0.0.1:{}/app", pgb.port);
            for (scenario, protocol) in SELECT_SCENARIOS {
                runner.measure(scenario, PGBOUNCER, &url, Workload::Select, protocol)?;
            }
            // What a proxy that only forwards keeps of single-node writes:
            // the ceiling for any proxy on this machine.
            runner.measure(TPCB, PGBOUNCER, &url, Workload::Tpcb, Protocol::Prepared)?;
        }
        Err(e) => eprintln!("PgBouncer is not measured: {e}"),
    }

    // Reprise with 1, 2 and 3 nodes.
    let three = cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");
    let mut one = three.clone();
    one.groups[0].nodes.truncate(1);
    let mut two = three.clone();
    two.groups[0].nodes.truncate(2);
    runner.with_reprise(one, |r, p| r.reads(REPRISE_1, &p.url("app")))?;
    runner.with_reprise(two, |r, p| {
        r.measure(
            "select prepared",
            REPRISE_2,
            &p.url("app"),
            Workload::Select,
            Protocol::Prepared,
        )?;
        r.measure(
            WAIT_READ,
            REPRISE_2,
            &p.url("app"),
            Workload::WaitRead,
            Protocol::Prepared,
        )?;
        Ok(())
    })?;
    let mut copies = Vec::new();
    let mut ryw = Vec::new();
    let write_lag = runner.with_reprise(three.clone(), |r, p| {
        r.reads(REPRISE_3, &p.url("app"))?;
        let lag = write_run(r, p)?;
        copies.push(pgbench_copies(REPRISE_3, &cluster.nodes)?);
        let rep = r.measure(
            "rw-after-w (read_your_writes)",
            REPRISE_3,
            &p.url("app"),
            Workload::RwAfterW,
            Protocol::Prepared,
        )?;
        ryw.push(ReadYourWrites {
            read_your_writes: true,
            stale_reads: rep.stale_reads,
            checked_reads: rep.checked_reads,
        });
        let nd = nondeterminism(&r.load_rt, &p.url("app"), &cluster.nodes, "nd_reprise")?;
        wait_caught_up(p)?;
        copies.push(nd_copies(REPRISE_3, &cluster.nodes, "nd_reprise", nd)?);
        Ok(lag)
    })?;
    let mut no_ryw = three;
    no_ryw.routing.read_your_writes = false;
    runner.with_reprise(no_ryw, |r, p| {
        let rep = r.measure(
            "rw-after-w (no read_your_writes)",
            REPRISE_3,
            &p.url("app"),
            Workload::RwAfterW,
            Protocol::Prepared,
        )?;
        ryw.push(ReadYourWrites {
            read_your_writes: false,
            stale_reads: rep.stale_reads,
            checked_reads: rep.checked_reads,
        });
        wait_caught_up(p)
    })?;

    // Pgpool-II in native replication mode over the same three copies.
    let nodes: Vec<&LocalNode> = cluster.nodes.iter().collect();
    match Pgpool::start(dir.path(), &nodes, opts.clients) {
        Ok(pool) => {
            let url = pool.url("app");
            runner.reads(PGPOOL, &url)?;
            runner.measure(TPCB, PGPOOL, &url, Workload::Tpcb, Protocol::Prepared)?;
            copies.push(pgbench_copies(PGPOOL, &cluster.nodes)?);
            let nd = nondeterminism(&runner.load_rt, &url, &cluster.nodes, "nd_pgpool")?;
            copies.push(nd_copies(PGPOOL, &cluster.nodes, "nd_pgpool", nd)?);
        }
        Err(e) => eprintln!("Pgpool-II is not measured: {e}"),
    }
    // The same transactions run on all three copies at once with nothing in
    // between: what the copies' own work leaves of direct's throughput on
    // this machine, the ceiling for any replication that re-executes writes
    // on every copy. Last, because it makes the copies differ.
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url("app")).collect();
    runner.measure_mirrored(
        TPCB,
        COPIES_ALONE,
        &urls[0],
        &urls[1..],
        Workload::Tpcb,
        Protocol::Prepared,
    )?;
    drop(direct);
    cluster.stop();
    drop(cluster);

    for c in &copies {
        println!(
            "copies after {} through {}: {}{}",
            c.what,
            c.system,
            if c.identical { "identical" } else { "DIVERGED" },
            if c.diverged_columns.is_empty() {
                String::new()
            } else {
                format!(" (columns that differ: {})", c.diverged_columns.join(", "))
            }
        );
    }
    for c in &copies {
        if let Some(nd) = &c.nondeterminism {
            println!(
                "nondeterminism through {}: {} statements, {} refused{}{}",
                c.system,
                nd.statements,
                nd.refused,
                nd.refusal
                    .as_ref()
                    .map(|r| format!(" (first: {r})"))
                    .unwrap_or_default(),
                nd.ddl_refused
                    .as_ref()
                    .map(|r| format!("; CREATE TABLE refused ({r}), created on each node directly"))
                    .unwrap_or_default()
            );
        }
    }
    for r in &ryw {
        println!(
            "rw-after-w through Reprise, read_your_writes = {}: {} stale of {} reads",
            r.read_your_writes, r.stale_reads, r.checked_reads
        );
    }

    eprintln!(
        "failover and switchover ({} runs each) …",
        opts.failover_runs
    );
    let fo = failover::run(opts.failover_runs, 4, &opts.out_dir.join("failover.json"))?;

    let report = Report {
        date: date(),
        machine: format!("{cores} vCPU, {} GiB RAM", memory_gib()),
        duration_s: opts.duration,
        clients: opts.clients,
        scale: opts.scale,
        measurements: runner.measurements,
        write_lag: Some(write_lag),
        copies,
        read_your_writes: ryw,
        failover: fo.summary,
        failover_lost_writes: fo.lost_acknowledged_writes,
        failover_copies_identical: fo.copies_identical,
        wall_time_s: started.elapsed().as_secs_f64(),
    };
    std::fs::write(
        opts.out_dir.join("compare.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    draw(&report, fo.timeline.as_ref(), &opts.out_dir)?;
    std::fs::write(opts.out_dir.join("summary.md"), summary(&report))?;
    println!(
        "compare took {:.0} s; results in {}",
        report.wall_time_s,
        opts.out_dir.display()
    );
    Ok(())
}

/// TPC-B through Reprise with 3 copies, sampling every subscriber's lag
/// from /status every 100 ms.
fn write_run(r: &mut Runner, p: &Proxy) -> anyhow::Result<Lag> {
    let stop = Arc::new(AtomicBool::new(false));
    let http = p.http;
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = failover::status(http) {
                    let primary = s["groups"][0]["primary"].as_str().unwrap_or("").to_string();
                    for n in s["groups"][0]["nodes"].as_array().into_iter().flatten() {
                        let name = n["name"].as_str().unwrap_or("").to_string();
                        if name != primary {
                            samples.push((
                                start.elapsed().as_secs_f64(),
                                name,
                                n["lag_seq"].as_u64().unwrap_or(0),
                                n["lag_ms"].as_u64().unwrap_or(0),
                            ));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let measured = r.measure(
        TPCB,
        REPRISE_3,
        &p.url("app"),
        Workload::Tpcb,
        Protocol::Prepared,
    );
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("lag sampler");
    measured?;
    let catch_up = wait_caught_up(p)?;
    let mut seqs = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut ms = hdrhistogram::Histogram::<u64>::new(3)?;
    for (_, _, s, m) in &samples {
        seqs.record(*s)?;
        ms.record(*m)?;
    }
    let lag = Lag {
        lag_seq_p50: seqs.value_at_quantile(0.5),
        lag_seq_p99: seqs.value_at_quantile(0.99),
        lag_seq_max: seqs.max(),
        lag_ms_p50: ms.value_at_quantile(0.5),
        lag_ms_p99: ms.value_at_quantile(0.99),
        lag_ms_max: ms.max(),
        catch_up_ms: catch_up.as_secs_f64() * 1000.0,
        samples,
    };
    println!(
        "subscriber lag during {TPCB} through {REPRISE_3}: entries p50 {} p99 {} max {}, \
         ms p50 {} p99 {} max {}; caught up {:.0} ms after the run",
        lag.lag_seq_p50,
        lag.lag_seq_p99,
        lag.lag_seq_max,
        lag.lag_ms_p50,
        lag.lag_ms_p99,
        lag.lag_ms_max,
        lag.catch_up_ms
    );
    Ok(lag)
}

/// Waits until every node applied the log head (at most 2 minutes).
fn wait_caught_up(p: &Proxy) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let s = failover::status(p.http)?;
        let g = &s["groups"][0];
        let head = g["head_seq"].as_u64();
        if g["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|n| n["applied_seq"].as_u64() == head)
        {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "subscribers did not catch up within 120 s: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pgbench_copies(system: &str, nodes: &[LocalNode]) -> anyhow::Result<Copies> {
    let digests: Vec<String> = nodes
        .iter()
        .map(pgbench_digest)
        .collect::<anyhow::Result<_>>()?;
    Ok(Copies {
        system: system.into(),
        what: "tpcb (pgbench tables)".into(),
        identical: digests.iter().all(|d| d == &digests[0]),
        diverged_columns: Vec::new(),
        digests,
        nondeterminism: None,
    })
}

/// What the nondeterminism workload saw through a system.
#[derive(Debug, Default, Serialize)]
struct NdOutcome {
    /// The system refused the CREATE TABLE (the table was then created
    /// on every node directly, as if it existed before).
    ddl_refused: Option<String>,
    statements: u64,
    /// Statements the system refused, and the first refusal.
    refused: u64,
    refusal: Option<String>,
}

/// The nondeterminism workload: concurrent inserts into a table whose
/// rows get a serial id, a `gen_random_uuid()` and a `clock_timestamp()`
/// from column defaults, and every 10 rows an update that sets a column
/// to `random()`.
fn nondeterminism(
    rt: &tokio::runtime::Runtime,
    url: &str,
    nodes: &[LocalNode],
    table: &str,
) -> anyhow::Result<NdOutcome> {
    const CLIENTS: i32 = 4;
    const ROWS: i32 = 150;
    let ddl = format!(
        "CREATE TABLE {table} (id serial PRIMARY KEY, u uuid DEFAULT gen_random_uuid(), \
         r float8, t timestamptz DEFAULT clock_timestamp(), client int, n int)"
    );
    let mut outcome = NdOutcome::default();
    let created = rt.block_on(async {
        load::connect(url)
            .await?
            .batch_execute(&ddl)
            .await
            .map_err(anyhow::Error::from)
    });
    if let Err(e) = created {
        let msg = e
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|e| e.as_db_error())
            .map(|d| format!("{}: {}", d.code().code(), d.message()))
            .unwrap_or_else(|| format!("{e:#}"));
        for node in nodes {
            node.psql("app", &ddl)?;
        }
        outcome.ddl_refused = Some(msg);
    }
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let (url, table) = (url.to_string(), table.to_string());
            tasks.push(tokio::spawn(async move {
                let c = load::connect(&url).await?;
                let mut done = (0u64, 0u64, None::<String>);
                let mut run = async |sql: String| {
                    done.0 += 1;
                    if let Err(e) = c.simple_query(&sql).await {
                        done.1 += 1;
                        if done.2.is_none() {
                            done.2 = Some(match e.as_db_error() {
                                Some(d) => format!("{}: {}", d.code().code(), d.message()),
                                None => e.to_string(),
                            });
                        }
                    }
                };
                for n in 0..ROWS {
                    // id, u and t from the column defaults.
                    run(format!("INSERT INTO {table} (client, n) VALUES ({client}, {n})"))
                        .await;
                    if n % 10 == 9 {
                        run(format!(
                            "UPDATE {table} SET r = random() WHERE client = {client} AND n > {n} - 5"
                        ))
                        .await;
                    }
                }
                anyhow::Ok(done)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await??);
        }
        anyhow::Ok(all)
    })?;
    for (statements, refused, refusal) in results {
        outcome.statements += statements;
        outcome.refused += refused;
        if outcome.refusal.is_none() {
            outcome.refusal = refusal;
        }
    }
    Ok(outcome)
}

fn nd_copies(
    system: &str,
    nodes: &[LocalNode],
    table: &str,
    outcome: NdOutcome,
) -> anyhow::Result<Copies> {
    let columns = ["id", "u", "r", "t"];
    let mut per_node = Vec::new();
    for node in nodes {
        let mut row = Vec::new();
        for col in columns {
            row.push(node.psql(
                "app",
                &format!(
                    "SELECT count(*) || ':' || md5(string_agg({col}::text, ',' ORDER BY client, n)) FROM {table}"
                ),
            )?);
        }
        per_node.push(row);
    }
    let diverged_columns: Vec<String> = columns
        .iter()
        .enumerate()
        .filter(|(i, _)| per_node.iter().any(|r| r[*i] != per_node[0][*i]))
        .map(|(_, c)| c.to_string())
        .collect();
    Ok(Copies {
        system: system.into(),
        what: format!("nondeterminism ({table})"),
        identical: diverged_columns.is_empty(),
        diverged_columns,
        digests: per_node.iter().map(|r| r.join(" ")).collect(),
        nondeterminism: Some(outcome),
    })
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn memory_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| (kb + 512 * 1024) / (1024 * 1024))
        .unwrap_or(0)
}

fn find<'a>(r: &'a Report, scenario: &str, system: &str) -> Option<&'a Measurement> {
    r.measurements
        .iter()
        .find(|m| m.scenario == scenario && m.system == system)
}

/// The rows of the throughput and latency charts: (scenario, system).
fn chart_rows(r: &Report) -> Vec<(&Measurement, String)> {
    let mut rows = Vec::new();
    let order: Vec<(&str, Vec<&str>)> = vec![
        (
            "select simple",
            vec![DIRECT, PGBOUNCER, REPRISE_1, REPRISE_3, PGPOOL],
        ),
        (
            "select extended",
            vec![DIRECT, PGBOUNCER, REPRISE_1, REPRISE_3, PGPOOL],
        ),
        (
            "select prepared",
            vec![DIRECT, PGBOUNCER, REPRISE_1, REPRISE_2, REPRISE_3, PGPOOL],
        ),
        (
            WAIT_READ,
            vec![DIRECT, REPRISE_1, REPRISE_2, REPRISE_3, PGPOOL],
        ),
        (
            TPCB,
            vec![DIRECT, PGBOUNCER, COPIES_ALONE, REPRISE_3, PGPOOL],
        ),
    ];
    for (scenario, systems) in order {
        for system in systems {
            if let Some(m) = find(r, scenario, system) {
                rows.push((m, format!("{scenario} · {system}")));
            }
        }
    }
    rows
}

fn draw(r: &Report, timeline: Option<&failover::Timeline>, out: &Path) -> anyhow::Result<()> {
    let rows = chart_rows(r);
    let when = format!(
        "{}, {}, {} clients, {} s each",
        r.date, r.machine, r.clients, r.duration_s
    );
    charts::bars(
        &out.join("throughput.png"),
        &format!("Throughput ÷ direct PostgreSQL — {when}"),
        "ops/s ÷ direct's ops/s in the same scenario (line: direct = 1)",
        &rows
            .iter()
            .map(|(m, label)| Bar {
                label: label.clone(),
                value: m.ratio_to_direct.unwrap_or(1.0),
                color: charts::system_color(&m.system),
                text: format!(
                    "{:.2}×  ({:.0}/s)",
                    m.ratio_to_direct.unwrap_or(1.0),
                    m.report.ops_per_s
                ),
            })
            .collect::<Vec<_>>(),
        Some(1.0),
    )?;
    charts::bars(
        &out.join("latency-p99.png"),
        &format!("p99 latency — {when}"),
        "p99 latency per operation (ms; a tpcb operation is a whole transaction)",
        &rows
            .iter()
            .map(|(m, label)| Bar {
                label: label.clone(),
                value: m.report.latency_ms.p99,
                color: charts::system_color(&m.system),
                text: format!("{:.2} ms", m.report.latency_ms.p99),
            })
            .collect::<Vec<_>>(),
        None,
    )?;
    if let Some(lag) = &r.write_lag {
        let mut by_node: BTreeMap<&str, Vec<(f64, f64, f64)>> = BTreeMap::new();
        for (t, node, s, m) in &lag.samples {
            by_node
                .entry(node.as_str())
                .or_default()
                .push((*t, *s as f64, *m as f64));
        }
        let series: Vec<charts::LagSeries> = by_node
            .into_iter()
            .map(|(node, points)| charts::LagSeries {
                node: format!("subscriber {node}"),
                points,
            })
            .collect();
        charts::lag(
            &out.join("lag.png"),
            &format!(
                "Subscriber lag during TPC-B through Reprise (3 nodes, {} clients) — {}",
                r.clients, r.date
            ),
            &series,
        )?;
    }
    if let Some(t) = timeline {
        let clients: Vec<charts::ClientTimeline> = t
            .oks
            .iter()
            .zip(&t.errors)
            .map(|(oks, errors)| charts::ClientTimeline {
                oks: oks.clone(),
                errors: errors.clone(),
            })
            .collect();
        charts::failover(
            &out.join("failover.png"),
            &format!(
                "Failover: writes per connection around the kill of the primary — {}",
                r.date
            ),
            &clients,
            t.from_ms,
            t.to_ms,
            t.first_write_ms,
        )?;
    }
    Ok(())
}

/// bench/results/summary.md.
fn summary(r: &Report) -> String {
    let mut s = format!(
        "# `reprise-bench compare` — {}\n\n\
         {}, PostgreSQL 15 (local copies, `fsync=off`), pgbench scale {}, {} clients, \
         {} s per measurement, load generator and proxies on the same machine. \
         Ratio = ops/s ÷ direct's ops/s in the same scenario, same run. \
         The whole run took {:.0} s.\n\n",
        r.date, r.machine, r.scale, r.clients, r.duration_s, r.wall_time_s
    );
    s += "## Throughput and latency\n\n\
          | scenario | system | ops/s | ratio to direct | p50 ms | p99 ms | p99.9 ms | max ms | errors |\n\
          |---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for m in &r.measurements {
        let l = &m.report.latency_ms;
        s += &format!(
            "| {} | {} | {:.0} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
            m.scenario,
            m.system,
            m.report.ops_per_s,
            m.ratio_to_direct
                .map(|r| format!("{r:.2} ×"))
                .unwrap_or_else(|| "–".into()),
            l.p50,
            l.p99,
            l.p999,
            l.max,
            m.report.errors
        );
    }
    s += "\n`select`: a point read of one pgbench account (CPU-bound: on 2 cores the copies, \
          the proxy and the load generator share the same CPUs, so it cannot scale with copies). \
          `wait-read`: `SELECT bench_wait_read(aid)`, a STABLE function that holds a node-local \
          advisory lock for a 2 ms server-side wait, so each node serves one at a time \
          (latency-bound: it scales with the nodes serving reads, not with cores). \
          `tpcb`: pgbench's TPC-B-like transaction; through Reprise and Pgpool-II every \
          transaction is applied on all 3 copies, direct on one. `3 copies, no proxy`: every \
          client runs each TPC-B transaction, with the same values, on all three copies at \
          once with nothing in between — the copies' own work on this shared machine, the \
          ceiling for any replication that re-executes writes on every copy.\n\n";
    if let Some(l) = &r.write_lag {
        s += &format!(
            "## Subscriber lag during the TPC-B run through Reprise (3 nodes)\n\n\
             | | p50 | p99 | max |\n|---|---:|---:|---:|\n\
             | entries behind the head | {} | {} | {} |\n\
             | ms behind the head | {} | {} | {} |\n\n\
             Caught up {:.0} ms after the run ended (sampled from `/status` every 100 ms; \
             chart: `lag.png`).\n\n",
            l.lag_seq_p50,
            l.lag_seq_p99,
            l.lag_seq_max,
            l.lag_ms_p50,
            l.lag_ms_p99,
            l.lag_ms_max,
            l.catch_up_ms
        );
    }
    s += "## Read-your-writes (rw-after-w through Reprise, 3 nodes)\n\n\
          | `read_your_writes` | stale reads | reads checked |\n|---|---:|---:|\n";
    for y in &r.read_your_writes {
        s += &format!(
            "| {} | {} | {} |\n",
            y.read_your_writes, y.stale_reads, y.checked_reads
        );
    }
    s += "\n## Are the copies identical?\n\n\
          | system | workload | copies | columns that differ | statements refused |\n|---|---|---|---|---|\n";
    for c in &r.copies {
        s += &format!(
            "| {} | {} | {} | {} | {} |\n",
            c.system,
            c.what,
            if c.identical {
                "identical"
            } else {
                "**diverged**"
            },
            if c.diverged_columns.is_empty() {
                "–".to_string()
            } else {
                c.diverged_columns.join(", ")
            },
            match &c.nondeterminism {
                Some(nd) => format!(
                    "{} of {}{}",
                    nd.refused,
                    nd.statements,
                    nd.refusal
                        .as_ref()
                        .map(|r| format!(" (`{r}`)"))
                        .unwrap_or_default()
                ),
                None => "–".into(),
            }
        );
    }
    for c in &r.copies {
        if let Some(reason) = c
            .nondeterminism
            .as_ref()
            .and_then(|nd| nd.ddl_refused.as_ref())
        {
            s += &format!(
                "\n{} refused the `CREATE TABLE` itself (`{reason}`); the table was then created \
                 on each node directly, as a table that existed before the proxy was put in front, \
                 and the workload ran through {}.\n",
                c.system, c.system
            );
        }
    }
    s += "\nThe nondeterminism workload: 4 connections concurrently insert 150 rows each \
          (`INSERT … (client, n) VALUES (…)`) into a table with `id serial`, \
          `u uuid DEFAULT gen_random_uuid()` and `t timestamptz DEFAULT clock_timestamp()`, and \
          every 10 rows run `UPDATE … SET r = random() WHERE …`; then each column is compared \
          across the copies (md5 of its values ordered by client and row).\n\n";
    s += "## Failover and switchover (Reprise, 3 nodes, 4 writing connections)\n\n\
          | metric | median | max |\n|---|---:|---:|\n";
    for (k, v) in &r.failover {
        s += &format!("| {k} | {:.0} | {:.0} |\n", v.median, v.max);
    }
    s += &format!(
        "\nAcknowledged writes lost: {}; copies identical afterwards: {}. \
         Details: `failover.json`; the first kill: `failover.png`.\n",
        r.failover_lost_writes, r.failover_copies_identical
    );
    s
}
