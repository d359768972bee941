//! `reprise-bench`: measures Reprise against direct PostgreSQL in the same
//! run, on the same local copies, and prints the ratio.
//!
//! `reprise-bench overhead` runs `pgbench -S` (point reads) direct to one
//! node, through Reprise with that node alone, and through Reprise with
//! three copies, in each protocol mode (simple, extended, prepared).

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
        #[arg(long, default_value = "bench/results/write.json")]
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
        .init();
    match Cli::parse().command {
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
            out,
        } => write(clients, duration, scale, &modes, &out),
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
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
            let (tps, lat) = through_proxy(&rt, config.clone(), |port, _| {
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
    rt: &tokio::runtime::Runtime,
    config: Config,
    f: impl FnOnce(u16, &reprise::server::Shared) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let server = rt.block_on(reprise::Server::bind(config))?;
    let port = server.client_addr().port();
    let shared = server.shared();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(server.run(async {
        let _ = rx.await;
    }));
    let r = f(port, &shared);
    let _ = tx.send(());
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
    r
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
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = if root {
            let _ = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&pdir)
                .status();
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", exe]);
            c
        } else {
            Command::new(exe)
        };
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
    out: &PathBuf,
) -> anyhow::Result<()> {
    let bin = PgBin::find()?;
    let dir = tempfile::Builder::new().prefix("reprise-bench").tempdir()?;
    eprintln!("creating 4 local copies with pgbench scale {scale} (n4 is the direct reference) …");
    let mut cluster = pgbench_cluster(dir.path(), 4, scale)?;
    let direct = cluster.nodes.pop().expect("four nodes");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let config = cluster.config("app", "127.0.0.1:0", "127.0.0.1:0");
    let mut results = Vec::new();
    println!(
        "pgbench TPC-B, {clients} clients, {duration} s each, scale {scale}, 3 copies through Reprise"
    );
    println!(
        "{:<10} {:>11} {:>12} {:>7} {:>14} {:>14} {:>12}",
        "mode", "direct tps", "reprise tps", "ratio", "lag p50/p99", "lag ms p50/99", "identical"
    );
    for mode in modes {
        let args = ["-n", "-M", mode.as_str()];
        let (d_tps, _) = pgbench_run(&bin, direct.port(), &args, clients, duration)?;
        let measured = through_proxy(&rt, config.clone(), |port, shared| {
            let group = shared.group("app").expect("group app");
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sampler = {
                let (group, stop) = (group.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seqs = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                    let mut ms = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        for i in 1..group.nodes.len() {
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
            while (1..group.nodes.len()).any(|i| group.lag(i).0 > 0)
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
