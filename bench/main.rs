//! `reprise-bench`: measures Reprise against direct PostgreSQL in the same
//! run, on the same local copies, and prints the ratio.
//!
//! `reprise-bench overhead` runs `pgbench -S` (point reads) direct to one
//! node, through Reprise with that node alone, and through Reprise with
//! three copies, in each protocol mode (simple, extended, prepared).
//!
//! `reprise-bench failover` kills the primary under a steady write load
//! and measures how long writes stop, then does the same for planned
//! switchovers.
//!
//! `reprise-bench load` is a load generator for any PostgreSQL-wire
//! endpoint (load.rs); `reprise-bench compare` measures direct, PgBouncer,
//! Reprise and Pgpool-II with it in one run and draws charts (compare.rs,
//! charts.rs, pgpool.rs).

mod charts;
mod compare;
mod load;
mod pgpool;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::{Parser, Subcommand};
use reprise::config::Config;
use reprise::local::{LocalCluster, PgBin};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "reprise-bench",
    about = "Benchmarks Reprise against direct PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a workload against any PostgreSQL-wire endpoint holding
    /// pgbench's tables and reports throughput and latency percentiles.
    Load {
        /// e.g. postgres://postgres@127.0.0.1:6432/app
        #[arg(long)]
        url: String,
        #[arg(long, value_enum, default_value = "select")]
        workload: load::Workload,
        /// How statements are sent (simple: SQL text; extended: unnamed
        /// Parse/Bind/Execute; prepared: named statements prepared once).
        #[arg(long, value_enum, default_value = "prepared")]
        protocol: load::Protocol,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds to run (default 10 when --count is not given).
        #[arg(long)]
        duration: Option<f64>,
        /// Operations to run in all (a tpcb transaction is one).
        #[arg(long)]
        count: Option<u64>,
        /// `mixed`: the share of operations that are tpcb transactions.
        #[arg(long, default_value_t = 0.1)]
        write_ratio: f64,
        /// At most this many operations per second in all.
        #[arg(long)]
        rate: Option<f64>,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run until stopped (SIGINT/SIGTERM), printing a report every
        /// --duration seconds (the docker demo's steady load).
        #[arg(long)]
        forever: bool,
        /// Also run every operation, with the same values, on this endpoint
        /// at the same time (repeatable): re-execution on several copies with
        /// nothing in between.
        #[arg(long)]
        mirror: Vec<String>,
    },
    /// Direct, PgBouncer, Reprise (1, 2, 3 nodes) and Pgpool-II measured
    /// in one run on the same copies; results, summary and charts in
    /// --out-dir. Takes about 5 minutes on 2 cores.
    Compare {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 8)]
        duration: u64,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// Kills of the primary, then as many switchovers.
        #[arg(long, default_value_t = 5)]
        failover_runs: usize,
        /// 3 s per measurement and 3 failover runs (about 3 minutes).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "bench/results")]
        out_dir: PathBuf,
    },
    /// pgbench TPC-B direct to one node vs through Reprise with 3 copies,
    /// with subscriber lag during the run.
    Write {
        #[arg(long, default_value_t = 8)]
        clients: u32,
        #[arg(long, default_value_t = 20)]
        duration: u32,
        #[arg(long, default_value_t = 10)]
        scale: u32,
        #[arg(long, value_delimiter = ',', default_value = "simple,prepared")]
        modes: Vec<String>,
        /// Copies behind Reprise (1 shows the primary's own cost).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "bench/results/write.json")]
        out: PathBuf,
    },
    /// Write downtime when the primary is killed, and write pause of a
    /// planned switchover, under a steady write load (3 copies,
    /// sync_replicas = 1).
    Failover {
        /// Kills of the primary, then as many switchovers.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Writing connections.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value = "bench/results/failover.json")]
        out: PathBuf,
    },
    /// pgbench -S direct vs through Reprise (1 and 3 copies).
    Overhead {
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 15)]
        duration: u32,
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// Protocol modes to measure.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "simple,extended,prepared"
        )]
        modes: Vec<String>,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench/results/overhead.json")]
        out: PathBuf,
    },
}

#[derive(Debug, Serialize)]
struct Measurement {
    mode: String,
    target: String,
    tps: f64,
    latency_ms: f64,
    ratio_to_direct: f64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REPRISE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        // The proxy's log stays out of the results on stdout.
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Load {
            url,
            workload,
            protocol,
            clients,
            duration,
            count,
            write_ratio,
            rate,
            json,
            forever,
            mirror,
        } => {
            let opts = load::LoadOptions {
                url,
                workload,
                protocol,
                clients,
                duration: match (duration, count) {
                    (None, None) => Some(Duration::from_secs(10)),
                    (d, _) => d.map(Duration::from_secs_f64),
                },
                count,
                write_ratio,
                rate,
                progress: !forever,
                mirrors: mirror,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                loop {
                    let report = load::run(&opts).await?;
                    print!("{}", report.table());
                    if let Some(path) = &json {
                        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
                    }
                    if !forever {
                        return anyhow::Ok(());
                    }
                }
            })
        }
        Cmd::Compare {
            duration,
            clients,
            scale,
            failover_runs,
            quick,
            out_dir,
        } => compare::run(&compare::Options {
            duration: if quick { 3 } else { duration },
            clients,
            scale,
            failover_runs: if quick { 3 } else { failover_runs },
            out_dir,
        }),
        Cmd::Overhead {
            clients,
            duration,
            scale,
            modes,
            out,
        } => overhead(clients, duration, scale, &modes, &out),
        Cmd::Write {
            clients,
            duration,
            scale,
            modes,
            nodes,
            out,
        } => write(clients, duration, scale, &modes, nodes, &out),
        Cmd::Failover { runs, clients, out } => failover::run(runs, clients, &out).map(drop),
    }
}

/// Runs pgbench and returns (tps, average latency ms).
fn pgbench(
    bin: &PgBin,
    port: u16,
    mode: &str,
    clients: u32,
    duration: u32,
) -> anyhow::Result<(f64, f64)> {
    pgbench_run(bin, port, &["-S", "-n", "-M", mode], clients, duration)
}

/// Runs pgbench with `args` and returns (tps, average latency ms).
fn pgbench_run(
    bin: &PgBin,
    port: u16,
    args: &[&str],
    clients: u32,
    duration: u32,
) -> anyhow::Result<(f64, f64)> {
    let out = Command::new(bin.tool("pgbench"))
        .args(args)
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &duration.to_string(),
        ])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "app",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let tps = field("tps").ok_or_else(|| anyhow::anyhow!("no tps in pgbench output:\n{text}"))?;
    let lat = field("latency average").unwrap_or(0.0);
    Ok((tps, lat))
}

fn overhead(
    clients: u32,
    duration: u32,
    scale: u32,
    modes: &[String],
    out: &PathBuf,
) -> anyhow::Result<()> {
    let bin = PgBin::find()?;
    let dir = tempfile::Builder::new().prefix("reprise-bench").tempdir()?;
    eprintln!("creating 3 local copies with pgbench scale {scale} …");
    let cluster = pgbench_cluster(dir.path(), 3, scale)?;
    let direct_port = cluster.nodes[0].port();
    let mut one = cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");
    one.groups[0].nodes.truncate(1);
    let three = cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");

    let pgbouncer = match PgBouncer::start(dir.path(), &cluster.nodes[0]) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("PgBouncer is not measured: {e}");
            None
        }
    };
    let mut results = Vec::new();
    println!(
        "pgbench -S, {clients} clients, {duration} s each, scale {scale}, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<10} {:<18} {:>10} {:>12} {:>8}",
        "mode", "target", "tps", "latency ms", "ratio"
    );
    for mode in modes {
        // Warm the caches once, unmeasured.
        pgbench(&bin, direct_port, mode, clients, 2)?;
        let (d_tps, d_lat) = pgbench(&bin, direct_port, mode, clients, duration)?;
        let mut row = |target: &str, tps: f64, lat: f64| {
            let ratio = tps / d_tps;
            println!("{mode:<10} {target:<18} {tps:>10.0} {lat:>12.3} {ratio:>8.2}");
            results.push(Measurement {
                mode: mode.clone(),
                target: target.into(),
                tps,
                latency_ms: lat,
                ratio_to_direct: ratio,
            });
        };
        row("direct", d_tps, d_lat);
        if let Some(pgb) = &pgbouncer {
            let (tps, lat) = pgbench(&bin, pgb.port, mode, clients, duration)?;
            row("pgbouncer session", tps, lat);
        }
        for (name, config) in [("reprise 1 node", &one), ("reprise 3 nodes", &three)] {
            let (tps, lat) = through_proxy(config.clone(), |port, _| {
                pgbench(&bin, port, mode, clients, duration)
            })?;
            row(name, tps, lat);
        }
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&results)?)?;
    eprintln!("results written to {}", out.display());
    drop(cluster);
    Ok(())
}

/// `n` identical local copies of database `app` with pgbench tables.
fn pgbench_cluster(dir: &std::path::Path, n: usize, scale: u32) -> anyhow::Result<LocalCluster> {
    Ok(LocalCluster::create(
        dir,
        n,
        "app",
        &[
            ("fsync", "off"),
            ("max_connections", "200"),
            ("shared_buffers", "256MB"),
        ],
        |node| reprise::local::pgbench_init(node, "app", scale),
    )?)
}

/// Starts Reprise in this process, runs `f` against its port, stops it.
/// `f` gets the client port and the server's shared state.
fn through_proxy<T>(
    config: Config,
    f: impl FnOnce(u16, &reprise::server::Shared) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let proxy = Proxy::start(config)?;
    let r = f(proxy.port, &proxy.shared);
    proxy.stop();
    r
}

/// Reprise running in this process as `reprise serve` runs it with
/// `worker_threads = 1` (one thread, as PgBouncer has): its own thread and
/// runtime, apart from the load. Where the proxy shares two cores with
/// PostgreSQL and the load, as here, one thread costs less CPU per query
/// than one per core at the same or higher throughput.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    pub(crate) http: std::net::SocketAddr,
    pub(crate) shared: std::sync::Arc<reprise::server::Shared>,
    /// Sending (or dropping) it stops the server.
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

type Started = (
    u16,
    std::net::SocketAddr,
    std::sync::Arc<reprise::server::Shared>,
);

impl Proxy {
    pub(crate) fn start(config: Config) -> anyhow::Result<Proxy> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<Started>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("reprise".into())
            .spawn(move || {
                let rt = match reprise::runtime(1) {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    match reprise::Server::bind(config).await {
                        Ok(server) => {
                            let started = (
                                server.client_addr().port(),
                                server.http_addr(),
                                server.shared(),
                            );
                            let _ = ready_tx.send(Ok(started));
                            let _ = server
                                .run(async {
                                    let _ = stopped.await;
                                })
                                .await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        let (port, http, shared) = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the proxy thread ended before it started"))??;
        Ok(Proxy {
            port,
            http,
            shared,
            stop,
            thread,
        })
    }

    pub(crate) fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops it the way SIGTERM does and waits for its thread.
    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// PgBouncer in session mode in front of one node, as the overhead
/// reference (Debian package `pgbouncer`).
struct PgBouncer {
    port: u16,
    child: std::process::Child,
}

impl PgBouncer {
    fn start(dir: &std::path::Path, node: &reprise::local::LocalNode) -> anyhow::Result<PgBouncer> {
        let exe = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or_else(|| {
                anyhow::anyhow!("pgbouncer is not installed (apt-get install pgbouncer)")
            })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let pdir = dir.join("pgbouncer");
        std::fs::create_dir_all(&pdir)?;
        let ini = pdir.join("pgbouncer.ini");
        std::fs::write(pdir.join("users.txt"), "\"postgres\" \"\"\n")?;
        std::fs::write(
            &ini,
            format!(
                "[databases]\napp = host={} port={} dbname=app user=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n\
                 auth_file = {}\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 50\n\
                 logfile = {}\nunix_socket_dir =\n",
                node.socket_dir().display(),
                node.port(),
                pdir.join("users.txt").display(),
                pdir.join("pgbouncer.log").display(),
            ),
        )?;
        let mut cmd = Command::new(exe);
        pgpool::as_postgres(&mut cmd, &pdir)?;
        let child = cmd
            .arg(&ini)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(PgBouncer { port, child });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!(
            "pgbouncer did not start; see {}",
            pdir.join("pgbouncer.log").display()
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Serialize)]
struct WriteMeasurement {
    mode: String,
    direct_tps: f64,
    reprise_tps: f64,
    ratio_to_direct: f64,
    lag_seq_p50: u64,
    lag_seq_p99: u64,
    lag_seq_max: u64,
    lag_ms_p50: u64,
    lag_ms_p99: u64,
    catch_up_ms: u128,
    copies_identical: bool,
}

/// A digest of the pgbench tables on one node.
fn pgbench_digest(node: &reprise::local::LocalNode) -> anyhow::Result<String> {
    Ok(node.psql(
        "app",
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || '/' || \
                (SELECT sum(bbalance) FROM pgbench_branches) || '/' || \
                (SELECT sum(tbalance) FROM pgbench_tellers) || '/' || \
                (SELECT count(*) || ':' || md5(string_agg(h::text, ',' ORDER BY h::text)) FROM pgbench_history h)",
    )?)
}

fn write(
    clients: u32,
    duration: u32,
    scale: u32,
    modes: &[String],
    nodes: usize,
    out: &PathBuf,
) -> anyhow::Result<()> {
    anyhow::ensure!((1..=3).contains(&nodes), "--nodes is 1, 2 or 3");
    let bin = PgBin::find()?;
    let dir = tempfile::Builder::new().prefix("reprise-bench").tempdir()?;
    eprintln!("creating 4 local copies with pgbench scale {scale} (n4 is the direct reference) …");
    let mut cluster = pgbench_cluster(dir.path(), 4, scale)?;
    let direct = cluster.nodes.pop().expect("four nodes");
    let mut config = cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");
    config.groups[0].nodes.truncate(nodes);
    cluster.nodes.truncate(nodes);
    let mut results = Vec::new();
    println!(
        "pgbench TPC-B, {clients} clients, {duration} s each, scale {scale}, {nodes} copies through Reprise"
    );
    println!(
        "{:<10} {:>11} {:>12} {:>7} {:>14} {:>14} {:>12}",
        "mode", "direct tps", "reprise tps", "ratio", "lag p50/p99", "lag ms p50/99", "identical"
    );
    for mode in modes {
        let args = ["-n", "-M", mode.as_str()];
        let (d_tps, _) = pgbench_run(&bin, direct.port(), &args, clients, duration)?;
        let measured = through_proxy(config.clone(), |port, shared| {
            let group = shared.group("app").expect("group app");
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sampler = {
                let (group, stop) = (group.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seqs = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                    let mut ms = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        for i in 1..group.slots() {
                            let (s, m) = group.lag(i);
                            let _ = seqs.record(s);
                            let _ = ms.record(m);
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    (seqs, ms)
                })
            };
            let (r_tps, _) = pgbench_run(&bin, port, &args, clients, duration)?;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let (seqs, ms) = sampler.join().expect("sampler");
            let start = std::time::Instant::now();
            while (1..group.slots()).any(|i| group.lag(i).0 > 0)
                && start.elapsed() < Duration::from_secs(120)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let catch_up = start.elapsed().as_millis();
            let digests: Vec<String> = cluster
                .nodes
                .iter()
                .map(pgbench_digest)
                .collect::<anyhow::Result<_>>()?;
            let identical = digests.iter().all(|d| d == &digests[0]);
            Ok((r_tps, seqs, ms, catch_up, identical))
        })?;
        let (r_tps, seqs, ms, catch_up, identical) = measured;
        let m = WriteMeasurement {
            mode: mode.clone(),
            direct_tps: d_tps,
            reprise_tps: r_tps,
            ratio_to_direct: r_tps / d_tps,
            lag_seq_p50: seqs.value_at_quantile(0.5),
            lag_seq_p99: seqs.value_at_quantile(0.99),
            lag_seq_max: seqs.max(),
            lag_ms_p50: ms.value_at_quantile(0.5),
            lag_ms_p99: ms.value_at_quantile(0.99),
            catch_up_ms: catch_up,
            copies_identical: identical,
        };
        println!(
            "{:<10} {:>11.0} {:>12.0} {:>7.2} {:>14} {:>14} {:>12}",
            m.mode,
            m.direct_tps,
            m.reprise_tps,
            m.ratio_to_direct,
            format!("{}/{}", m.lag_seq_p50, m.lag_seq_p99),
            format!("{}/{}", m.lag_ms_p50, m.lag_ms_p99),
            m.copies_identical
        );
        results.push(m);
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&results)?)?;
    eprintln!("results written to {}", out.display());
    drop(direct);
    Ok(())
}

/// `reprise-bench failover`: write downtime when the primary is killed,
/// and the write pause of planned switchovers, under a steady load.
mod failover {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use reprise::local::LocalCluster;
    use serde::Serialize;

    /// Health settings of the measured proxy.
    const INTERVAL_MS: u64 = 200;
    const TIMEOUT_MS: u64 = 500;
    const FAILURES_BEFORE_DOWN: u32 = 2;
    const SYNC_REPLICAS: usize = 1;

    /// One write step longer than this counts as a hang (the client
    /// reconnects).
    const STEP_LIMIT: Duration = Duration::from_secs(30);

    #[derive(Debug, Serialize)]
    struct Settings {
        nodes: usize,
        clients: usize,
        runs: usize,
        interval_ms: u64,
        timeout_ms: u64,
        failures_before_down: u32,
        failover_wait_ms: u64,
        sync_replicas: usize,
        cores: usize,
    }

    #[derive(Debug, Serialize)]
    struct FailoverRun {
        run: usize,
        killed: String,
        new_primary: String,
        term: u64,
        /// From the moment every process of the primary is dead to the
        /// first write acknowledged on any connection (started after it).
        first_write_ms: f64,
        /// The same, for the last connection to write again.
        all_clients_ms: f64,
        client_errors: usize,
        /// "caught up" or "re-seeded".
        rejoin: String,
        /// From the restart of the killed node until it is up.
        rejoin_ms: f64,
    }

    #[derive(Debug, Serialize)]
    struct SwitchoverRun {
        run: usize,
        from: String,
        to: String,
        term: u64,
        /// As the SWITCHOVER command reports it.
        write_pause_ms: f64,
        /// The longest time a connection went without an acknowledged
        /// write around the switchover.
        longest_gap_ms: f64,
        /// How long the SWITCHOVER command took.
        command_ms: f64,
        client_errors: usize,
        /// Why the command failed, if it did (the other figures are then
        /// left out of the summary).
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    }

    #[derive(Debug, Serialize)]
    pub(crate) struct Stat {
        pub(crate) median: f64,
        pub(crate) max: f64,
    }

    /// Every connection's writes around the first kill, in ms relative to
    /// it: when each acknowledged write was acknowledged, when each error
    /// came back.
    #[derive(Debug, Serialize)]
    pub(crate) struct Timeline {
        pub(crate) first_write_ms: f64,
        pub(crate) from_ms: f64,
        pub(crate) to_ms: f64,
        pub(crate) oks: Vec<Vec<f64>>,
        pub(crate) errors: Vec<Vec<f64>>,
    }

    #[derive(Debug, Serialize)]
    pub(crate) struct Report {
        settings: Settings,
        failovers: Vec<FailoverRun>,
        switchovers: Vec<SwitchoverRun>,
        pub(crate) summary: BTreeMap<String, Stat>,
        pub(crate) acknowledged_writes: usize,
        pub(crate) lost_acknowledged_writes: usize,
        pub(crate) copies_identical: bool,
        pub(crate) timeline: Option<Timeline>,
    }

    impl Timeline {
        /// The window [from, to] ms around `killed`, from the logs.
        fn of(
            logs: &[LoadLog],
            killed: Instant,
            first_write_ms: f64,
            from_ms: f64,
            to_ms: f64,
        ) -> Timeline {
            let rel = |t: Instant| {
                if t >= killed {
                    ms(t - killed)
                } else {
                    -ms(killed - t)
                }
            };
            let keep = |v: f64| v >= from_ms && v <= to_ms;
            Timeline {
                first_write_ms,
                from_ms,
                to_ms,
                oks: logs
                    .iter()
                    .map(|l| {
                        l.oks
                            .iter()
                            .map(|(_, e, _)| rel(*e))
                            .filter(|v| keep(*v))
                            .collect()
                    })
                    .collect(),
                errors: logs
                    .iter()
                    .map(|l| {
                        l.errors
                            .iter()
                            .map(|(t, _)| rel(*t))
                            .filter(|v| keep(*v))
                            .collect()
                    })
                    .collect(),
            }
        }
    }

    /// One connection's acknowledged writes (started, acknowledged) and
    /// errors.
    #[derive(Debug, Default, Clone)]
    struct LoadLog {
        oks: Vec<(Instant, Instant, i64)>,
        errors: Vec<(Instant, String)>,
        reconnects: usize,
    }

    impl LoadLog {
        fn first_ok_started_after(&self, t: Instant) -> Option<Instant> {
            self.oks
                .iter()
                .find(|(s, _, _)| *s >= t)
                .map(|(_, e, _)| *e)
        }

        /// The longest time without an acknowledgement within [from, to].
        fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
            let mut last = from;
            let mut gap = Duration::ZERO;
            for &(_, end, _) in self.oks.iter().filter(|(_, e, _)| *e >= from && *e <= to) {
                gap = gap.max(end - last);
                last = end;
            }
            gap.max(to.saturating_duration_since(last))
        }
    }

    /// `clients` connections inserting rows in autocommit as fast as they
    /// are acknowledged; a failed insert is retried with the next key, a
    /// closed connection is reopened.
    struct Load {
        stop: Arc<AtomicBool>,
        logs: Vec<Arc<Mutex<LoadLog>>>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl Load {
        fn start(rt: &tokio::runtime::Runtime, url: &str, clients: usize) -> anyhow::Result<Load> {
            let stop = Arc::new(AtomicBool::new(false));
            let mut logs = Vec::new();
            let mut tasks = Vec::new();
            for id in 0..clients {
                let client = rt.block_on(connect(url))?;
                let log = Arc::new(Mutex::new(LoadLog::default()));
                tasks.push(rt.spawn(load_loop(
                    client,
                    url.to_string(),
                    id as i32,
                    log.clone(),
                    stop.clone(),
                )));
                logs.push(log);
            }
            Ok(Load { stop, logs, tasks })
        }

        fn snapshot(&self) -> Vec<LoadLog> {
            self.logs
                .iter()
                .map(|l| l.lock().expect("load log").clone())
                .collect()
        }

        fn errors(&self) -> usize {
            self.logs
                .iter()
                .map(|l| l.lock().expect("load log").errors.len())
                .sum()
        }

        fn stop(self, rt: &tokio::runtime::Runtime) -> Vec<LoadLog> {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.tasks {
                let _ = rt.block_on(t);
            }
            self.logs
                .iter()
                .map(|l| std::mem::take(&mut *l.lock().expect("load log")))
                .collect()
        }
    }

    async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    async fn load_loop(
        mut c: tokio_postgres::Client,
        url: String,
        id: i32,
        log: Arc<Mutex<LoadLog>>,
        stop: Arc<AtomicBool>,
    ) {
        let mut k: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            k += 1;
            let started = Instant::now();
            let r = tokio::time::timeout(
                STEP_LIMIT,
                c.execute(
                    "INSERT INTO bench_writes (client, k) VALUES ($1, $2)",
                    &[&id, &k],
                ),
            )
            .await;
            let hung = r.is_err();
            let error = match r {
                Ok(Ok(_)) => {
                    log.lock()
                        .expect("load log")
                        .oks
                        .push((started, Instant::now(), k));
                    continue;
                }
                Ok(Err(e)) => e
                    .code()
                    .map(|c| c.code().to_string())
                    .unwrap_or_else(|| format!("no SQLSTATE: {e}")),
                Err(_) => "no answer".to_string(),
            };
            log.lock()
                .expect("load log")
                .errors
                .push((Instant::now(), error));
            if c.is_closed() || hung {
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(n) = connect(&url).await {
                        c = n;
                        log.lock().expect("load log").reconnects += 1;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// GET /status.
    pub(crate) fn status(http: SocketAddr) -> anyhow::Result<serde_json::Value> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(http)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok(serde_json::from_str(body)?)
    }

    fn primary_of(s: &serde_json::Value) -> String {
        s["groups"][0]["primary"].as_str().unwrap_or("").to_string()
    }

    fn term_of(s: &serde_json::Value) -> u64 {
        s["groups"][0]["term"].as_u64().unwrap_or(0)
    }

    fn nodes_of(s: &serde_json::Value) -> Vec<serde_json::Value> {
        s["groups"][0]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn state_of(s: &serde_json::Value, node: &str) -> String {
        nodes_of(s)
            .iter()
            .find(|n| n["name"] == node)
            .and_then(|n| n["state"].as_str())
            .unwrap_or("")
            .to_string()
    }

    /// Polls `f` every 20 ms until it is true; fails after `limit`.
    fn wait_for(
        limit: Duration,
        what: &str,
        mut f: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f()? {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("{what}: not within {limit:?}")
    }

    /// Runs an admin console command; each row as column → value.
    async fn admin(url: &str, sql: &str) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
        let c = connect(url).await?;
        let messages = c.simple_query(sql).await?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    r.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, col)| {
                            (col.name().to_string(), r.get(i).unwrap_or("").to_string())
                        })
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    fn stat(values: impl Iterator<Item = f64>) -> Stat {
        let mut v: Vec<f64> = values.collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let median = match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Stat {
            median,
            max: v.last().copied().unwrap_or(0.0),
        }
    }

    pub fn run(runs: usize, clients: usize, out: &Path) -> anyhow::Result<Report> {
        let dir = tempfile::Builder::new().prefix("reprise-bench").tempdir()?;
        eprintln!("creating 3 local copies …");
        let mut cluster = LocalCluster::create(
            dir.path(),
            3,
            "app",
            &[("fsync", "off"), ("max_connections", "200")],
            |node| {
                node.psql(
                    "app",
                    "CREATE TABLE bench_writes (client int, k bigint, PRIMARY KEY (client, k))",
                )
                .map(drop)
            },
        )?;
        let mut config = cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");
        config.health.interval_ms = INTERVAL_MS;
        config.health.timeout_ms = TIMEOUT_MS;
        config.health.failures_before_down = FAILURES_BEFORE_DOWN;
        config.replication.sync_replicas = SYNC_REPLICAS;
        let settings = Settings {
            nodes: 3,
            clients,
            runs,
            interval_ms: INTERVAL_MS,
            timeout_ms: TIMEOUT_MS,
            failures_before_down: FAILURES_BEFORE_DOWN,
            failover_wait_ms: config.health.failover_wait_ms,
            sync_replicas: SYNC_REPLICAS,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
        };
        println!(
            "failover: 3 copies, {clients} writing connections (autocommit INSERT, retried), \
             sync_replicas = {SYNC_REPLICAS}, health: a probe every {INTERVAL_MS} ms, \
             timeout {TIMEOUT_MS} ms, down after {FAILURES_BEFORE_DOWN} failures, \
             failover_wait_ms = {}, {} cores",
            settings.failover_wait_ms, settings.cores
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let proxy = crate::Proxy::start(config)?;
        let http = proxy.http;
        let admin_url = proxy.url("reprise");
        let load = Load::start(&rt, &proxy.url("app"), clients)?;
        std::thread::sleep(Duration::from_secs(2));

        println!(
            "{:<4} {:<7} {:<12} {:>5} {:>15} {:>15} {:>7} {:>12} {:>10}",
            "run",
            "killed",
            "new primary",
            "term",
            "first write ms",
            "all clients ms",
            "errors",
            "rejoin",
            "rejoin ms"
        );
        let mut failovers = Vec::new();
        let mut timeline = None;
        for run in 1..=runs {
            let s = status(http)?;
            let killed_name = primary_of(&s);
            let p = cluster
                .nodes
                .iter()
                .position(|n| n.name == killed_name)
                .ok_or_else(|| anyhow::anyhow!("no primary in {s:#}"))?;
            let errors_before = load.errors();
            cluster.nodes[p].kill()?;
            let killed = Instant::now();
            wait_for(
                Duration::from_secs(60),
                "every connection writes again",
                || {
                    Ok(load
                        .snapshot()
                        .iter()
                        .all(|l| l.first_ok_started_after(killed).is_some()))
                },
            )
            .map_err(|e| anyhow::anyhow!("{e}; status: {:#}", status(http).unwrap_or_default()))?;
            let firsts: Vec<Duration> = load
                .snapshot()
                .iter()
                .filter_map(|l| l.first_ok_started_after(killed))
                .map(|t| t - killed)
                .collect();
            let s = status(http)?;
            let client_errors = load.errors() - errors_before;
            let first_ms = ms(*firsts.iter().min().unwrap_or(&Duration::ZERO));

            cluster.nodes[p].start()?;
            let back = Instant::now();
            let mut state = String::new();
            wait_for(Duration::from_secs(180), "the killed node rejoins", || {
                state = state_of(&status(http)?, &killed_name);
                Ok(state == "up" || state == "divergent")
            })?;
            let rejoin = if state == "divergent" {
                let rows = rt.block_on(admin(&admin_url, &format!("RESEED app {killed_name}")))?;
                eprintln!("run {run}: {killed_name} was divergent, re-seeded: {rows:?}");
                wait_for(Duration::from_secs(180), "the re-seeded node is up", || {
                    Ok(state_of(&status(http)?, &killed_name) == "up")
                })?;
                "re-seeded"
            } else {
                "caught up"
            };
            if timeline.is_none() {
                // From shortly before the kill to well after writes resumed.
                let to = (first_ms * 2.5).max(600.0);
                timeline = Some(Timeline::of(&load.snapshot(), killed, first_ms, -400.0, to));
            }
            let r = FailoverRun {
                run,
                killed: killed_name,
                new_primary: primary_of(&s),
                term: term_of(&s),
                first_write_ms: first_ms,
                all_clients_ms: ms(*firsts.iter().max().unwrap_or(&Duration::ZERO)),
                client_errors,
                rejoin: rejoin.to_string(),
                rejoin_ms: ms(back.elapsed()),
            };
            println!(
                "{:<4} {:<7} {:<12} {:>5} {:>15.0} {:>15.0} {:>7} {:>12} {:>10.0}",
                r.run,
                r.killed,
                r.new_primary,
                r.term,
                r.first_write_ms,
                r.all_clients_ms,
                r.client_errors,
                r.rejoin,
                r.rejoin_ms
            );
            failovers.push(r);
            std::thread::sleep(Duration::from_secs(1));
        }

        println!(
            "{:<4} {:<6} {:<6} {:>5} {:>15} {:>15} {:>11} {:>7}",
            "run", "from", "to", "term", "write_pause_ms", "longest gap ms", "command ms", "errors"
        );
        let mut switchovers = Vec::new();
        for run in 1..=runs {
            let s = status(http)?;
            let from = primary_of(&s);
            let candidates: Vec<String> = nodes_of(&s)
                .iter()
                .filter(|n| n["name"] != from.as_str() && n["state"] == "up")
                .filter_map(|n| n["name"].as_str().map(str::to_string))
                .collect();
            anyhow::ensure!(!candidates.is_empty(), "no switchover target: {s:#}");
            let to = candidates[run % candidates.len()].clone();
            let errors_before = load.errors();
            let asked = Instant::now();
            let answer = rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(120),
                    admin(&admin_url, &format!("SWITCHOVER app TO {to}")),
                )
                .await
            });
            let done = Instant::now();
            std::thread::sleep(Duration::from_secs(1));
            let (row, error) = match answer {
                Ok(Ok(rows)) if rows.len() == 1 => (rows[0].clone(), None),
                Ok(Ok(rows)) => (BTreeMap::new(), Some(format!("rows: {rows:?}"))),
                Ok(Err(e)) => (BTreeMap::new(), Some(format!("{e:#}"))),
                Err(_) => (BTreeMap::new(), Some("no answer within 120 s".into())),
            };
            if let Some(e) = &error {
                eprintln!("run {run}: SWITCHOVER app TO {to} failed: {e}");
            }
            let field = |c: &str| row.get(c).cloned().unwrap_or_default();
            let gap = load
                .snapshot()
                .iter()
                .map(|l| {
                    l.longest_gap(
                        asked - Duration::from_secs(1),
                        done + Duration::from_secs(1),
                    )
                })
                .max()
                .unwrap_or_default();
            let r = SwitchoverRun {
                run,
                from,
                to,
                term: field("term").parse().unwrap_or(0),
                write_pause_ms: field("write_pause_ms").parse().unwrap_or(f64::NAN),
                longest_gap_ms: ms(gap),
                command_ms: ms(done - asked),
                client_errors: load.errors() - errors_before,
                error,
            };
            println!(
                "{:<4} {:<6} {:<6} {:>5} {:>15.0} {:>15.0} {:>11.0} {:>7}",
                r.run,
                r.from,
                r.to,
                r.term,
                r.write_pause_ms,
                r.longest_gap_ms,
                r.command_ms,
                r.client_errors
            );
            switchovers.push(r);
        }

        let logs = load.stop(&rt);
        let reconnects: usize = logs.iter().map(|l| l.reconnects).sum();
        // Every acknowledged write is on every copy, and the copies match.
        let caught_up = wait_for(
            Duration::from_secs(120),
            "every copy applied the head",
            || {
                let s = status(http)?;
                let head = s["groups"][0]["head_seq"].as_u64();
                Ok(nodes_of(&s)
                    .iter()
                    .all(|n| n["state"] == "up" && n["applied_seq"].as_u64() == head))
            },
        );
        if let Err(e) = &caught_up {
            eprintln!("{e}; status: {:#}", status(http).unwrap_or_default());
        }
        let mut lost = 0;
        let mut digests = Vec::new();
        for node in &cluster.nodes {
            let rows = node.psql("app", "SELECT client || ':' || k FROM bench_writes")?;
            let present: std::collections::HashSet<&str> = rows.lines().collect();
            let missing = logs
                .iter()
                .enumerate()
                .flat_map(|(id, l)| l.oks.iter().map(move |(_, _, k)| format!("{id}:{k}")))
                .filter(|key| !present.contains(key.as_str()))
                .count();
            lost = lost.max(missing);
            digests.push(node.psql(
                "app",
                "SELECT count(*) || ':' || md5(string_agg(client || ':' || k, ',' ORDER BY client, k)) FROM bench_writes",
            )?);
        }
        let acknowledged: usize = logs.iter().map(|l| l.oks.len()).sum();
        let identical = caught_up.is_ok() && digests.iter().all(|d| d == &digests[0]);
        proxy.stop();

        let mut summary = BTreeMap::new();
        summary.insert(
            "failover_first_write_ms".to_string(),
            stat(failovers.iter().map(|r| r.first_write_ms)),
        );
        summary.insert(
            "failover_all_clients_ms".to_string(),
            stat(failovers.iter().map(|r| r.all_clients_ms)),
        );
        summary.insert(
            "rejoin_ms".to_string(),
            stat(failovers.iter().map(|r| r.rejoin_ms)),
        );
        let done: Vec<&SwitchoverRun> = switchovers.iter().filter(|r| r.error.is_none()).collect();
        summary.insert(
            "switchover_write_pause_ms".to_string(),
            stat(done.iter().map(|r| r.write_pause_ms)),
        );
        summary.insert(
            "switchover_longest_gap_ms".to_string(),
            stat(done.iter().map(|r| r.longest_gap_ms)),
        );
        if done.len() < switchovers.len() {
            println!(
                "{} of {} switchovers failed (see \"error\" in the JSON)",
                switchovers.len() - done.len(),
                switchovers.len()
            );
        }
        println!("{:<28} {:>10} {:>10}", "metric", "median", "max");
        for (k, v) in &summary {
            println!("{k:<28} {:>10.0} {:>10.0}", v.median, v.max);
        }
        println!(
            "{acknowledged} writes acknowledged, {lost} of them missing on some copy, \
             copies identical: {identical}, {reconnects} reconnects"
        );
        let report = Report {
            settings,
            failovers,
            switchovers,
            summary,
            acknowledged_writes: acknowledged,
            lost_acknowledged_writes: lost,
            copies_identical: identical,
            timeline,
        };
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
        eprintln!("results written to {}", out.display());
        cluster.stop();
        Ok(report)
    }
}
