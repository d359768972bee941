//! Driver compatibility: every suite of tests/clients (its README is the
//! contract) runs through Reprise and then directly against a node, with
//! the same assertions. The nodes then show where the suite's reads and
//! writes landed, and every copy must be identical. The results go to
//! `target/compat/<driver>.json` and to the table in README.md.

mod common;
#[path = "clients/sqlx/suite.rs"]
mod sqlx_suite;
#[path = "clients/tokio_postgres/suite.rs"]
mod tokio_postgres_suite;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

/// The features every suite checks, in the table's column order.
const COMMON: &[&str] = &[
    "routing",
    "read_own_write",
    "error_recovery",
    "cancel",
    "transaction",
];

/// Node settings: every write statement is logged with the client's
/// application_name, so the logs show which node ran a suite's writes.
const NODE_SETTINGS: &[(&str, &str)] =
    &[("log_statement", "mod"), ("log_line_prefix", "%m [%p] %a ")];

/// How long one run of a suite may take.
const SUITE_LIMIT: Duration = Duration::from_secs(120);
/// How long the whole test of one driver may take.
const DRIVER_LIMIT: Duration = Duration::from_secs(420);
/// The routing feature's reads and writes (tests/clients/README.md).
const ROUTED_READS: i64 = 20;
const ROUTED_WRITES: usize = 5;
/// Backends publish their table counters when idle at most every 10 s.
const COUNTER_WAIT: Duration = Duration::from_secs(20);

const TABLE_START: &str = "<!-- compat:start -->";
const TABLE_END: &str = "<!-- compat:end -->";
const UPDATE_VAR: &str = "REPRISE_UPDATE_COMPAT";

/// One feature a suite checked: a line of its output.
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    pub feature: String,
    pub ok: bool,
    #[serde(default)]
    pub detail: String,
}

impl Record {
    /// A record from a check's outcome: its detail, or what went wrong.
    pub fn new(feature: &str, outcome: Result<String, String>) -> Record {
        let (ok, detail) = match outcome {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Record {
            feature: feature.to_string(),
            ok,
            detail,
        }
    }
}

/// How long one feature of an in-process suite may take.
const FEATURE_LIMIT: Duration = Duration::from_secs(30);

/// Runs one feature's check of an in-process suite, within [`FEATURE_LIMIT`].
pub async fn feature(name: &str, check: impl Future<Output = Result<String, String>>) -> Record {
    let outcome = tokio::time::timeout(FEATURE_LIMIT, check)
        .await
        .unwrap_or_else(|_| Err(format!("did not finish within {FEATURE_LIMIT:?}")));
    Record::new(name, outcome)
}

/// `Err(what())` unless `cond`: for the in-process suites' checks.
pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

/// Where a suite connects (the `PG*` variables of a script suite).
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub db: String,
    /// "proxy" or "direct".
    pub mode: &'static str,
}

/// An in-process suite: connects to the target, returns its records.
pub type InProcess = fn(Target) -> Pin<Box<dyn Future<Output = Vec<Record>> + Send>>;

enum Suite {
    /// `tests/clients/<name>/run`. `probe` (run with `sh -c` in that
    /// directory) fails when the runtime is missing; `install` says what
    /// to install then.
    Script {
        probe: &'static str,
        install: &'static str,
    },
    /// Written in Rust, in `tests/clients/<name>/suite.rs`.
    InProcess(InProcess),
}

struct Driver {
    /// Names the directory, the tables (`compat_<name>_*`) and the
    /// application_name (`compat-<name>`).
    name: &'static str,
    /// The table's row heading.
    label: &'static str,
    suite: Suite,
}

/// Every driver, in the table's row order.
const DRIVERS: &[Driver] = &[
    Driver {
        name: "psql",
        label: "psql (libpq)",
        suite: Suite::Script {
            probe: "command -v psql",
            install: "the PostgreSQL client (apt-get install postgresql-client)",
        },
    },
    Driver {
        name: "pgbench",
        label: "pgbench",
        suite: Suite::Script {
            probe: "command -v pgbench && command -v psql",
            install: "pgbench (apt-get install postgresql-contrib)",
        },
    },
    Driver {
        name: "psycopg",
        label: "psycopg 3 (Python)",
        suite: Suite::Script {
            probe: "python3 -c 'import psycopg'",
            install: "psycopg (python3 -m pip install -r tests/clients/psycopg/requirements.txt)",
        },
    },
    Driver {
        name: "asyncpg",
        label: "asyncpg (Python)",
        suite: Suite::Script {
            probe: "python3 -c 'import asyncpg'",
            install: "asyncpg (python3 -m pip install -r tests/clients/asyncpg/requirements.txt)",
        },
    },
    Driver {
        name: "node",
        label: "node-postgres (Node.js)",
        suite: Suite::Script {
            probe: "command -v node && test -d node_modules/pg",
            install: "Node.js and the suite's packages (apt-get install nodejs npm; \
                      npm ci --prefix tests/clients/node)",
        },
    },
    Driver {
        name: "jdbc",
        label: "pgJDBC (Java)",
        suite: Suite::Script {
            // The run script finds (or installs) the pgJDBC jar itself.
            probe: "command -v javac && command -v java",
            install: "a JDK and pgJDBC (apt-get install openjdk-17-jdk-headless \
                      libpostgresql-jdbc-java)",
        },
    },
    Driver {
        name: "tokio_postgres",
        label: "tokio-postgres (Rust)",
        suite: Suite::InProcess(tokio_postgres_suite::run),
    },
    Driver {
        name: "sqlx",
        label: "SQLx (Rust)",
        suite: Suite::InProcess(sqlx_suite::run),
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql() {
    check_driver("psql").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench() {
    check_driver("pgbench").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg() {
    check_driver("psycopg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg() {
    check_driver("asyncpg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node() {
    check_driver("node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc() {
    check_driver("jdbc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres() {
    check_driver("tokio_postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx() {
    check_driver("sqlx").await;
}

/// Runs a driver's suite through Reprise and directly, checks the nodes,
/// records the results, and fails with every problem found.
async fn check_driver(name: &'static str) {
    bounded(DRIVER_LIMIT, async move {
        let driver = DRIVERS.iter().find(|d| d.name == name).unwrap();
        if let Err(e) = runtime_present(driver) {
            panic!("{e}");
        }
        let g = TestGroup::start_with_settings(3, "", NODE_SETTINGS, |_| {}).await;
        let (proxy, mut problems) = through_reprise(&g, driver).await;
        let direct = directly(&g, driver).await;
        let results = merge(&proxy.records, &direct.records);
        eprintln!(
            "{name}: through Reprise {:?}, directly {:?}",
            proxy.took, direct.took
        );
        for f in &results {
            eprintln!(
                "  {:<24} proxy {:<5} direct {:<5} {}",
                f.feature,
                show(f.proxy),
                show(f.direct),
                f.proxy_detail
            );
        }
        let run_problems = |run: &Run, way: &str| -> Vec<String> {
            run.problems.iter().map(|p| format!("{way}: {p}")).collect()
        };
        problems.extend(run_problems(&proxy, "through Reprise"));
        problems.extend(run_problems(&direct, "directly"));
        problems.extend(feature_problems(&results));
        write_results(driver, &results);
        if let Err(e) = update_or_check_table(driver, &results) {
            problems.push(e);
        }
        assert!(
            problems.is_empty(),
            "{name}: {} problem(s):\n{}\n(suite output above; REPRISE_KEEP=1 keeps the node logs)",
            problems.len(),
            problems.join("\n")
        );
    })
    .await;
}

/// The run through Reprise, with what the nodes saw of it folded into its
/// `routing` record; and the problems found on the nodes.
async fn through_reprise(g: &TestGroup, driver: &Driver) -> (Run, Vec<String>) {
    let target = Target {
        host: "127.0.0.1".into(),
        port: g.proxy.addr.port(),
        user: "postgres".into(),
        db: "app".into(),
        mode: "proxy",
    };
    let mut run = run_suite(driver, &target).await;
    let mut problems = Vec::new();
    let caught_up = catch_up(g).await;
    if let Err(e) = &caught_up {
        problems.push(e.clone());
    }
    // The nodes' view of routing: reads on subscribers, writes on the primary.
    let reads = check_routing(g, driver.name).await;
    let writes = check_writes_logged(g, driver.name);
    if let Some(r) = run.records.iter_mut().find(|r| r.feature == "routing") {
        for check in [reads, writes] {
            let (Ok(d) | Err(d)) = &check;
            r.ok &= check.is_ok();
            r.detail = format!("{}; {d}", r.detail);
        }
    }
    if caught_up.is_ok()
        && let Err(e) = check_identical_on(g, &[0, 1, 2], LogCheck::Full).await
    {
        problems.push(format!("after the run through Reprise: {e}"));
    }
    (run, problems)
}

/// The run directly against node 0 (after the checks of the run through
/// Reprise: it writes to node 0 behind Reprise's back).
async fn directly(g: &TestGroup, driver: &Driver) -> Run {
    // It must not wait on locks of a session the proxy left behind (whose
    // failure was reported through Reprise already).
    let left = end_suite_sessions(g, driver.name).await;
    if left > 0 {
        eprintln!(
            "{}: ended {left} session(s) left on node 0 after the run through Reprise",
            driver.name
        );
    }
    let node = g.node(0);
    let target = Target {
        host: node.host().to_string(),
        port: node.port(),
        user: "postgres".into(),
        db: "app".into(),
        mode: "direct",
    };
    run_suite(driver, &target).await
}

/// Terminates the suite's sessions still open on node 0; returns how many.
async fn end_suite_sessions(g: &TestGroup, driver: &str) -> i64 {
    g.direct(0)
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&format!("compat-{driver}")],
        )
        .await
        .unwrap()
        .get(0)
}

/// The suite exists and its runtime is installed, or what to do.
fn runtime_present(driver: &Driver) -> Result<(), String> {
    let Suite::Script { probe, install } = &driver.suite else {
        return Ok(());
    };
    let dir = suite_dir(driver.name);
    let run = dir.join("run");
    let executable = std::fs::metadata(&run)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
        .unwrap_or(false);
    if !executable {
        return Err(format!(
            "{}: {} is missing or not executable: the suite is not written yet",
            driver.name,
            run.display()
        ));
    }
    let ok = std::process::Command::new("sh")
        .args(["-c", probe])
        .current_dir(&dir)
        .env("PATH", pg_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{}: the suite's runtime is missing (`{probe}` failed): install {install}; \
             scripts/install-deps installs it",
            driver.name
        ))
    }
}

fn suite_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// PATH with the PostgreSQL tools of the nodes' version first.
fn pg_path() -> String {
    let bin = reprise::local::PgBin::find().expect("PostgreSQL binaries");
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", bin.dir().display())
}

/// What one run of a suite produced.
struct Run {
    records: Vec<Record>,
    /// The run itself went wrong (crash, time limit, bad output).
    problems: Vec<String>,
    took: Duration,
}

async fn run_suite(driver: &Driver, target: &Target) -> Run {
    let start = Instant::now();
    let (records, problems) = match &driver.suite {
        Suite::Script { .. } => run_script(driver.name, target).await,
        Suite::InProcess(suite) => run_in_process(*suite, target).await,
    };
    Run {
        records,
        problems,
        took: start.elapsed(),
    }
}

async fn run_in_process(suite: InProcess, target: &Target) -> (Vec<Record>, Vec<String>) {
    let task = tokio::spawn(suite(target.clone()));
    match tokio::time::timeout(SUITE_LIMIT, task).await {
        Ok(Ok(records)) => (records, vec![]),
        Ok(Err(e)) => (vec![], vec![format!("the suite crashed: {e}")]),
        Err(_) => (
            vec![],
            vec![format!("the suite did not finish within {SUITE_LIMIT:?}")],
        ),
    }
}

/// Runs `tests/clients/<name>/run` in its own process group, killed whole
/// after [`SUITE_LIMIT`].
async fn run_script(name: &str, target: &Target) -> (Vec<Record>, Vec<String>) {
    let dir = suite_dir(name);
    let mut child = tokio::process::Command::new(dir.join("run"))
        .current_dir(&dir)
        .env("PATH", pg_path())
        .env("PGHOST", &target.host)
        .env("PGPORT", target.port.to_string())
        .env("PGUSER", &target.user)
        .env("PGDATABASE", &target.db)
        .env("COMPAT_MODE", target.mode)
        .env_remove("PGPASSWORD")
        .env_remove("PGOPTIONS")
        .env_remove("PGAPPNAME")
        .env_remove("PGSERVICE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}/run: {e}", dir.display()));
    let group = child.id().expect("child pid") as i32;
    let out = tokio::spawn(read_all(child.stdout.take().unwrap()));
    let err = tokio::spawn(read_all(child.stderr.take().unwrap()));
    let mut problems = Vec::new();
    let status = match tokio::time::timeout(SUITE_LIMIT, child.wait()).await {
        Ok(status) => Some(status.expect("wait for the suite")),
        Err(_) => {
            problems.push(format!("the suite did not finish within {SUITE_LIMIT:?}"));
            kill_group(group);
            let _ = child.wait().await;
            None
        }
    };
    // Reading ends when every process holding the pipes is gone.
    let readers = async { (out.await.unwrap(), err.await.unwrap()) };
    tokio::pin!(readers);
    let (out, err) = match tokio::time::timeout(Duration::from_secs(5), &mut readers).await {
        Ok(both) => both,
        Err(_) => {
            problems.push("the suite left processes running after it exited".into());
            kill_group(group);
            readers.await
        }
    };
    eprintln!(
        "---- {name} ({}) stderr ----\n{err}---- end of {name} stderr ----",
        target.mode
    );
    if let Some(s) = status.filter(|s| !s.success()) {
        problems.push(format!(
            "run exited with {s}; its stderr ends with:\n{}",
            tail(&err, 15)
        ));
    }
    let (records, bad) = parse_records(&out);
    problems.extend(bad);
    (records, problems)
}

/// SIGKILLs every process of the group the harness started for a suite.
fn kill_group(group: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group only.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

async fn read_all(mut r: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The records of a suite's stdout, and a problem per line that is not one
/// or repeats a feature.
fn parse_records(stdout: &str) -> (Vec<Record>, Vec<String>) {
    let mut records: Vec<Record> = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in stdout.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) if records.iter().any(|o| o.feature == r.feature) => {
                problems.push(format!("feature {} reported twice", r.feature))
            }
            Ok(r) => records.push(r),
            Err(e) => problems.push(format!(
                "stdout line {} is not a feature record ({e}): {line}",
                n + 1
            )),
        }
    }
    (records, problems)
}

/// Waits until every node applied the head (as /status says); gives up at
/// once when a node is divergent.
async fn catch_up(g: &TestGroup) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let status = g.proxy.status().await;
        let group = &status["groups"][0];
        let nodes = group["nodes"].as_array().cloned().unwrap_or_default();
        if nodes
            .iter()
            .all(|n| n["applied_seq"] == group["head_seq"] && n["state"] == "up")
        {
            return Ok(());
        }
        let divergent: Vec<String> = nodes
            .iter()
            .filter(|n| n["state"] == "divergent")
            .map(|n| format!("{}: {}", n["name"], n["divergence"]))
            .collect();
        if !divergent.is_empty() {
            return Err(format!(
                "replay failed on a subscriber (divergent): {}",
                divergent.join("; ")
            ));
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("the subscribers did not catch up: {status:#}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads of `compat_<driver>_reads` landed on the subscribers: their scan
/// counters add up to the routing feature's reads, the primary's stay
/// below that.
async fn check_routing(g: &TestGroup, driver: &str) -> Result<String, String> {
    let table = format!("compat_{driver}_reads");
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(g.direct(i).await);
    }
    let start = Instant::now();
    let counts = loop {
        let mut counts = Vec::new();
        for c in &clients {
            let n: i64 = c
                .query_one(
                    "SELECT coalesce(sum(seq_scan + coalesce(idx_scan, 0)), 0)::int8 \
                     FROM pg_stat_user_tables WHERE relname = $1",
                    &[&table],
                )
                .await
                .unwrap()
                .get(0);
            counts.push(n);
        }
        if counts[1] + counts[2] >= ROUTED_READS || start.elapsed() > COUNTER_WAIT {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let text = format!(
        "scans of {table}: primary {}, subscribers {} + {}",
        counts[0], counts[1], counts[2]
    );
    let subscribers = counts[1] + counts[2];
    if subscribers >= ROUTED_READS && counts[0] < subscribers {
        Ok(text)
    } else {
        Err(format!(
            "{text}: expected at least {ROUTED_READS} on the subscribers and fewer on the primary"
        ))
    }
}

/// The suite's INSERTs into `compat_<driver>_writes` ran on the primary
/// (node 0) under its application_name, and never on a subscriber under
/// it (replay runs under the applier's name).
fn check_writes_logged(g: &TestGroup, driver: &str) -> Result<String, String> {
    let pids: Vec<Vec<String>> = (0..3)
        .map(|i| logged_writes(&g.node(i).log_file(), driver))
        .collect();
    if pids[0].len() >= ROUTED_WRITES && pids[1].is_empty() && pids[2].is_empty() {
        return Ok(format!(
            "{} INSERTs into compat_{driver}_writes by compat-{driver} on the primary, none on \
             the subscribers",
            pids[0].len()
        ));
    }
    let mut text = format!(
        "INSERTs into compat_{driver}_writes logged under application_name compat-{driver}: \
         {} on the primary, {} and {} on the subscribers (expected at least {ROUTED_WRITES} on \
         the primary and none on the subscribers)",
        pids[0].len(),
        pids[1].len(),
        pids[2].len()
    );
    for (i, node_pids) in pids.iter().enumerate().skip(1) {
        let mut by: Vec<&String> = node_pids.iter().collect();
        by.dedup();
        if !by.is_empty() {
            text.push_str(&format!(
                "; {} ran them in backend(s) {by:?}: a client's write sent to a subscriber, \
                 or replay running under the client's application_name",
                g.node(i).name
            ));
        }
    }
    Err(text)
}

/// The backend pid of each line of a node log (`log_line_prefix = '%m
/// [%p] %a '`) where a session named `compat-<driver>` ran an INSERT into
/// `compat_<driver>_writes`.
fn logged_writes(log: &Path, driver: &str) -> Vec<String> {
    let text = std::fs::read(log).unwrap_or_default();
    let who = format!("] compat-{driver} ");
    let what = format!("insert into compat_{driver}_writes");
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.contains(&who) && l.contains(" LOG: "))
        .filter(|l| l.to_lowercase().contains(&what))
        .filter_map(|l| Some(l.split_once(" [")?.1.split_once(']')?.0.to_string()))
        .collect()
}

/// A feature's outcome both ways.
#[derive(Debug, Clone, serde::Serialize)]
struct FeatureResult {
    feature: String,
    /// None: not reported.
    proxy: Option<bool>,
    direct: Option<bool>,
    proxy_detail: String,
    direct_detail: String,
}

/// The features of both runs: the common ones first, then the others in
/// the order the suite reported them.
fn merge(proxy: &[Record], direct: &[Record]) -> Vec<FeatureResult> {
    let mut names: Vec<&str> = COMMON.to_vec();
    for r in proxy.iter().chain(direct) {
        if !names.contains(&r.feature.as_str()) {
            names.push(&r.feature);
        }
    }
    let find = |rs: &[Record], f: &str| rs.iter().find(|r| r.feature == f).cloned();
    names
        .into_iter()
        .map(|f| {
            let p = find(proxy, f);
            let d = find(direct, f);
            FeatureResult {
                feature: f.to_string(),
                proxy: p.as_ref().map(|r| r.ok),
                direct: d.as_ref().map(|r| r.ok),
                proxy_detail: p.map(|r| r.detail).unwrap_or_default(),
                direct_detail: d.map(|r| r.detail).unwrap_or_default(),
            }
        })
        .collect()
}

fn show(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "ok",
        Some(false) => "FAIL",
        None => "-",
    }
}

/// Failed features, features reported one way only, missing common ones.
fn feature_problems(results: &[FeatureResult]) -> Vec<String> {
    let mut out = Vec::new();
    for f in results {
        let common = COMMON.contains(&f.feature.as_str());
        for (way, ok, detail) in [
            ("through Reprise", f.proxy, &f.proxy_detail),
            ("directly", f.direct, &f.direct_detail),
        ] {
            match ok {
                Some(true) => {}
                Some(false) => out.push(format!("{} fails {way}: {detail}", f.feature)),
                None if common => out.push(format!("common feature {} missing {way}", f.feature)),
                None => out.push(format!("{} not reported {way}", f.feature)),
            }
        }
    }
    out
}

/// The directory of the results: `target/compat`.
fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("compat")
}

/// Writes `target/compat/<driver>.json`.
fn write_results(driver: &Driver, results: &[FeatureResult]) {
    let dir = results_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!({
        "driver": driver.name,
        "label": driver.label,
        "features": results,
    });
    let path = dir.join(format!("{}.json", driver.name));
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap() + "\n")
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A cell of the table.
fn mark(f: &FeatureResult) -> &'static str {
    match (f.proxy == Some(true), f.direct == Some(true)) {
        (true, true) => "✓",
        (false, true) => "✗ Reprise",
        (true, false) => "✗ direct",
        (false, false) => "✗",
    }
}

/// The driver's row of the table.
fn table_row(label: &str, results: &[FeatureResult]) -> String {
    let mut cells = vec![label.to_string()];
    for c in COMMON {
        cells.push(match results.iter().find(|f| f.feature == *c) {
            Some(f) => mark(f).to_string(),
            None => "✗".to_string(),
        });
    }
    let specific: Vec<String> = results
        .iter()
        .filter(|f| !COMMON.contains(&f.feature.as_str()))
        .map(|f| format!("`{}` {}", f.feature, mark(f)))
        .collect();
    cells.push(specific.join(", "));
    format!("| {} |", cells.join(" | "))
}

/// The generated README section (between the markers) with these rows.
fn table_section(rows: &[String]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "<!-- generated: `{UPDATE_VAR}=1 cargo test --test clients` rewrites this table -->\n"
    ));
    s.push_str(
        "✓ works through Reprise and directly; ✗ Reprise: fails only through Reprise; \
         ✗ direct: fails only directly; ✗: fails both ways.\n\n",
    );
    s.push_str("| driver |");
    for c in COMMON {
        s.push_str(&format!(" `{c}` |"));
    }
    s.push_str(" driver-specific features |\n|---|");
    for _ in COMMON {
        s.push_str(":-:|");
    }
    s.push_str("---|\n");
    for r in rows {
        s.push_str(r);
        s.push('\n');
    }
    s
}

/// The table's rows in a README: (label, line).
fn table_rows(section: &str) -> Vec<(String, String)> {
    section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| driver |"))
        .map(|l| {
            let label = l[2..].split(" |").next().unwrap_or("").to_string();
            (label, l.to_string())
        })
        .collect()
}

/// The part of `readme` between the markers: (start, end) byte offsets.
fn section_bounds(readme: &str) -> Option<(usize, usize)> {
    let start = readme.find(TABLE_START)? + TABLE_START.len();
    let end = start + readme[start..].find(TABLE_END)?;
    Some((start, end))
}

/// `readme` with the driver's row replaced (or added), rows in [`DRIVERS`]
/// order; None if the markers are missing.
fn with_row(readme: &str, label: &str, row: &str) -> Option<String> {
    let (start, end) = section_bounds(readme)?;
    let mut rows = table_rows(&readme[start..end]);
    rows.retain(|(l, _)| l != label);
    rows.push((label.to_string(), row.to_string()));
    let order = |l: &str| {
        DRIVERS
            .iter()
            .position(|d| d.label == l)
            .unwrap_or(usize::MAX)
    };
    rows.sort_by_key(|(l, _)| order(l));
    let lines: Vec<String> = rows.into_iter().map(|(_, r)| r).collect();
    Some(format!(
        "{}\n{}{}",
        &readme[..start],
        table_section(&lines),
        &readme[end..]
    ))
}

/// With REPRISE_UPDATE_COMPAT=1 rewrites the driver's row of the README
/// table; otherwise checks that the row matches this run.
fn update_or_check_table(driver: &Driver, results: &[FeatureResult]) -> Result<(), String> {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let row = table_row(driver.label, results);
    let update = std::env::var_os(UPDATE_VAR).is_some_and(|v| v == "1");
    // The driver tests run in parallel: one rewrite at a time.
    let _lock = update.then(|| ReadmeLock::take(&results_dir()));
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let Some((start, end)) = section_bounds(&readme) else {
        return Err(format!(
            "README.md has no {TABLE_START} … {TABLE_END} section for the compatibility table"
        ));
    };
    if update {
        let new = with_row(&readme, driver.label, &row).unwrap();
        std::fs::write(&readme_path, new).unwrap();
        return Ok(());
    }
    let rows = table_rows(&readme[start..end]);
    match rows.iter().find(|(l, _)| l == driver.label) {
        Some((_, r)) if *r == row => Ok(()),
        found => Err(format!(
            "the README compatibility table does not match this run (run \
             `{UPDATE_VAR}=1 cargo test --test clients` to rewrite it):\n  README: {}\n  run:    {row}",
            found.map(|(_, r)| r.as_str()).unwrap_or("(no row)")
        )),
    }
}

/// An exclusive flock on `target/compat/.readme.lock`, held while alive.
struct ReadmeLock {
    _file: std::fs::File,
}

impl ReadmeLock {
    fn take(dir: &Path) -> ReadmeLock {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).unwrap();
        let f = std::fs::File::create(dir.join(".readme.lock")).unwrap();
        // SAFETY: flock(2) on a descriptor this File owns.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        ReadmeLock { _file: f }
    }
}

#[test]
fn table_rows_are_replaced_in_driver_order() {
    let results = vec![
        FeatureResult {
            feature: "routing".into(),
            proxy: Some(true),
            direct: Some(true),
            proxy_detail: String::new(),
            direct_detail: String::new(),
        },
        FeatureResult {
            feature: "copy".into(),
            proxy: Some(false),
            direct: Some(true),
            proxy_detail: String::new(),
            direct_detail: String::new(),
        },
    ];
    let row = table_row("pgbench", &results);
    assert_eq!(row, "| pgbench | ✓ | ✗ | ✗ | ✗ | ✗ | `copy` ✗ Reprise |");
    let readme = format!("# R\n{TABLE_START}\nold\n{TABLE_END}\nafter\n");
    let once = with_row(&readme, "pgbench", &row).unwrap();
    let twice = with_row(&once, "psql (libpq)", "| psql (libpq) | ✓ |").unwrap();
    let again = with_row(&twice, "pgbench", "| pgbench | ✓ |").unwrap();
    let rows: Vec<String> = table_rows(&again).into_iter().map(|(_, r)| r).collect();
    assert_eq!(rows, ["| psql (libpq) | ✓ |", "| pgbench | ✓ |"]);
    assert!(again.starts_with("# R\n"), "{again}");
    assert!(again.ends_with(&format!("{TABLE_END}\nafter\n")), "{again}");
    assert!(!again.contains("old"), "{again}");
}

#[test]
fn a_missing_suite_or_runtime_fails_saying_what_to_do() {
    let missing = Driver {
        name: "no_such_driver",
        label: "none",
        suite: Suite::Script {
            probe: "true",
            install: "nothing",
        },
    };
    let e = runtime_present(&missing).unwrap_err();
    assert!(e.contains("not written yet"), "{e}");
    let no_runtime = Driver {
        name: "psql",
        label: "psql",
        suite: Suite::Script {
            probe: "false",
            install: "the thing (apt-get install thing)",
        },
    };
    let e = runtime_present(&no_runtime).unwrap_err();
    assert!(
        e.contains("apt-get install thing") && e.contains("scripts/install-deps"),
        "{e}"
    );
}
