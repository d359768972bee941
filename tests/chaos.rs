//! Chaos soak: a bank workload runs through Reprise while nodes are killed,
//! paused, cut off or slowed down behind relays, the proxy is restarted or
//! killed, and the primary is switched over — one fault at a time, from a
//! seeded schedule. Then everything heals and the test proves that nothing
//! was lost: money is conserved, every acknowledged transfer and event is on
//! every copy exactly once, no definitely failed one is anywhere, the copies
//! are identical, and no connection leaked.
//!
//! `REPRISE_CHAOS_SECS` (default 45) sets how long faults are injected,
//! `REPRISE_CHAOS_SEED` replays a schedule, `REPRISE_CHAOS_CLIENTS` (default
//! 6) sets the number of bank clients and `REPRISE_CHAOS_FAULTS` (e.g.
//! `kill_node,switchover`) limits the fault kinds. The history (operations
//! and faults, JSON lines) is written to `target/chaos/history-<seed>.jsonl`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reprise::config::Config;
use serde_json::json;
use tokio::sync::watch;

/// The soak's group (clients connect with this database name; the nodes'
/// database is `app`).
const GROUP: &str = "bank";
const ACCOUNTS: i32 = 50;
const START_BALANCE: i64 = 1000;
const TOTAL: i64 = ACCOUNTS as i64 * START_BALANCE;

/// The bank, created through Reprise (so that the `now()` default is
/// rewritten for replay, as for any schema change a user makes).
const BANK_SQL: &str = "
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 50) g;
CREATE TABLE transfers (id text PRIMARY KEY, from_id int NOT NULL, to_id int NOT NULL,
                        amount bigint NOT NULL, at timestamptz NOT NULL);
CREATE TABLE events (id serial PRIMARY KEY, body text NOT NULL, at timestamptz NOT NULL DEFAULT now());
";

/// Longest wait for one client step: far beyond any failover, so only a
/// hang reaches it.
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for the group to heal between two faults.
const HEALTHY_LIMIT: Duration = Duration::from_secs(120);
/// Time for setup and for the final heal and checks, on top of the soak.
const SETUP_LIMIT: Duration = Duration::from_secs(180);
const HEAL_LIMIT: Duration = Duration::from_secs(420);
/// The longest time the group may go without acknowledging any write.
const MAX_WRITE_GAP: Duration = Duration::from_secs(45);
/// `application_name` of the bank clients and of the test's own checks.
const CLIENT_APP: &str = "chaos-bank";
/// Connections the proxy opens for itself (its backends for client
/// sessions carry the client's application_name; the applier's replay
/// connection has none).
const INTERNAL_APPS: &[&str] = &["reprise-control", "reprise-seed", ""];

/// What the soak is asked to do.
#[derive(Debug, Clone)]
struct Settings {
    secs: u64,
    seed: u64,
    clients: usize,
    faults: Vec<Fault>,
}

fn settings() -> Settings {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let faults = match env("REPRISE_CHAOS_FAULTS") {
        None => Fault::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|n| {
                Fault::ALL
                    .into_iter()
                    .find(|f| f.name() == n.trim())
                    .unwrap_or_else(|| panic!("REPRISE_CHAOS_FAULTS: unknown fault {n:?}"))
            })
            .collect(),
    };
    Settings {
        secs: env("REPRISE_CHAOS_SECS").map_or(45, |v| v.parse().expect("REPRISE_CHAOS_SECS")),
        seed: env("REPRISE_CHAOS_SEED")
            .map_or_else(rand::random, |v| v.parse().expect("REPRISE_CHAOS_SEED")),
        clients: env("REPRISE_CHAOS_CLIENTS")
            .map_or(6, |v| v.parse().expect("REPRISE_CHAOS_CLIENTS")),
        faults,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_loses_nothing() {
    let s = settings();
    let limit = Duration::from_secs(s.secs) + SETUP_LIMIT + HEAL_LIMIT;
    bounded(limit, soak(s)).await;
}

// ---------------------------------------------------------------- history

/// Every operation and fault, as JSON lines, with milliseconds since the
/// start of the soak.
struct History {
    t0: Instant,
    path: PathBuf,
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl History {
    fn create(seed: u64) -> History {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let dir = target.join("chaos");
        std::fs::create_dir_all(&dir).expect("create target/chaos");
        let path = dir.join(format!("history-{seed}.jsonl"));
        let file = std::fs::File::create(&path).expect("create the history file");
        History {
            t0: Instant::now(),
            path,
            out: Mutex::new(std::io::BufWriter::new(file)),
        }
    }

    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn ms_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_millis() as u64
    }

    fn write(&self, v: serde_json::Value) {
        let mut out = self.out.lock().unwrap();
        let _ = writeln!(out, "{v}");
    }

    fn flush(&self) {
        let _ = self.out.lock().unwrap().flush();
    }
}

// --------------------------------------------------------------- workload

/// How an operation ended, as its client saw it.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Acked,
    /// An error that leaves nothing behind: before COMMIT was sent, or a
    /// COMMIT refused with a definite SQLSTATE.
    Failed {
        step: &'static str,
        code: String,
    },
    /// The COMMIT was in flight: 08007, a lost connection or no answer.
    /// `lost` when the proxy said it is not part of the group's history.
    Unknown {
        step: &'static str,
        code: String,
        lost: bool,
    },
}

impl Outcome {
    fn name(&self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Failed { .. } => "failed",
            Outcome::Unknown { .. } => "unknown",
        }
    }
}

/// Why one client step failed.
#[derive(Debug)]
enum StepError {
    /// An ErrorResponse.
    Db { code: String, message: String },
    /// The connection broke (no SQLSTATE).
    Conn(String),
    /// No answer within [`STEP_LIMIT`].
    Timeout,
    /// The statement ran but touched an unexpected number of rows.
    Rows(u64),
}

impl StepError {
    fn code(&self) -> String {
        match self {
            StepError::Db { code, .. } => code.clone(),
            StepError::Conn(_) => "connection".into(),
            StepError::Timeout => "timeout".into(),
            StepError::Rows(_) => "rows".into(),
        }
    }

    fn message(&self) -> String {
        match self {
            StepError::Db { message, .. } | StepError::Conn(message) => message.clone(),
            StepError::Timeout => format!("no answer within {STEP_LIMIT:?}"),
            StepError::Rows(n) => format!("touched {n} rows, expected 1"),
        }
    }

    /// The outcome of a transaction that failed at `step`. Nothing can
    /// commit before COMMIT is sent; a COMMIT (or autocommit write) whose
    /// answer is 08007, a broken connection or silence may have committed.
    fn outcome(&self, step: &'static str, at_commit: bool) -> Outcome {
        let unknown = match self {
            StepError::Db { code, .. } => code == "08007",
            StepError::Conn(_) | StepError::Timeout => true,
            StepError::Rows(_) => false,
        };
        if at_commit && unknown {
            Outcome::Unknown {
                step,
                code: self.code(),
                lost: self.message().contains("not part of the group's history"),
            }
        } else {
            Outcome::Failed {
                step,
                code: self.code(),
            }
        }
    }
}

fn step_error(e: tokio_postgres::Error) -> StepError {
    match e.as_db_error() {
        Some(d) => StepError::Db {
            code: d.code().code().to_string(),
            message: d.message().to_string(),
        },
        None => StepError::Conn(e.to_string()),
    }
}

/// Runs one client step with the step limit.
async fn step<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StepError> {
    match tokio::time::timeout(STEP_LIMIT, f).await {
        Err(_) => Err(StepError::Timeout),
        Ok(r) => r.map_err(step_error),
    }
}

/// A transfer a client attempted.
#[derive(Debug, Clone)]
struct Transfer {
    id: String,
    from: i32,
    to: i32,
    amount: i64,
    outcome: Outcome,
}

/// An event a client attempted to insert.
#[derive(Debug, Clone)]
struct Event {
    body: String,
    outcome: Outcome,
}

/// What one client did.
#[derive(Debug, Default)]
struct ClientReport {
    transfers: Vec<Transfer>,
    events: Vec<Event>,
    reads: u64,
    read_errors: u64,
    /// Total-balance reads that did not see the total.
    bad_reads: Vec<String>,
    ryw_checks: u64,
    /// An acknowledged transfer the same session then did not read back.
    ryw_violations: Vec<String>,
    reconnects: u64,
    connect_failures: u64,
    /// Steps that got no answer within [`STEP_LIMIT`].
    hangs: Vec<String>,
    /// COMMITs acknowledged with a WARNING notice (too few subscribers).
    warned: u64,
    /// Transactions whose connection broke without an ErrorResponse after
    /// BEGIN: (started ms, ended ms, what). Only a killed proxy may do that.
    cut: Vec<(u64, u64, String)>,
    /// When each acknowledged write was acknowledged (ms since start).
    acks_ms: Vec<u64>,
    /// Errors by "step SQLSTATE".
    errors: BTreeMap<String, u64>,
}

/// A bank client's connection with its prepared statements.
struct Conn {
    client: tokio_postgres::Client,
    notices: Arc<Mutex<Vec<String>>>,
    debit: tokio_postgres::Statement,
    credit: tokio_postgres::Statement,
    insert_transfer: tokio_postgres::Statement,
    insert_event: tokio_postgres::Statement,
    total: tokio_postgres::Statement,
    find_transfer: tokio_postgres::Statement,
}

impl Conn {
    async fn open(url: &str) -> Result<Conn, String> {
        let open = async {
            let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| db_text(&e))?;
            let notices = Arc::new(Mutex::new(Vec::new()));
            let seen = notices.clone();
            tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(m)) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notice(n) = m {
                        seen.lock()
                            .unwrap()
                            .push(format!("{}: {}", n.severity(), n.message()));
                    }
                }
            });
            let prepare = |sql: &'static str| {
                let client = &client;
                async move { client.prepare(sql).await.map_err(|e| db_text(&e)) }
            };
            Ok::<_, String>(Conn {
                debit: prepare("UPDATE accounts SET balance = balance - $1 WHERE id = $2").await?,
                credit: prepare("UPDATE accounts SET balance = balance + $1 WHERE id = $2").await?,
                insert_transfer: prepare(
                    "INSERT INTO transfers (id, from_id, to_id, amount, at) \
                     VALUES ($1, $2, $3, $4, now())",
                )
                .await?,
                insert_event: prepare("INSERT INTO events (body) VALUES ($1)").await?,
                total: prepare("SELECT sum(balance)::bigint FROM accounts").await?,
                find_transfer: prepare("SELECT count(*) FROM transfers WHERE id = $1").await?,
                client,
                notices,
            })
        };
        match tokio::time::timeout(Duration::from_secs(15), open).await {
            Ok(r) => r,
            Err(_) => Err("no connection within 15 s".into()),
        }
    }

    fn take_notices(&self) -> Vec<String> {
        std::mem::take(&mut *self.notices.lock().unwrap())
    }
}

/// One bank client: a persistent connection (reopened when it breaks, to
/// whatever address the proxy has now) doing transfers, events and reads
/// until stopped.
struct Client {
    k: usize,
    rng: StdRng,
    url: watch::Receiver<String>,
    hist: Arc<History>,
    report: ClientReport,
    n: u64,
}

impl Client {
    async fn run(mut self, stop: Arc<AtomicBool>) -> ClientReport {
        let mut conn: Option<Conn> = None;
        let mut connected_before = false;
        while !stop.load(Ordering::Relaxed) {
            if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
                conn = None;
                let url = self.url.borrow().clone();
                match Conn::open(&url).await {
                    Ok(c) => {
                        if connected_before {
                            self.report.reconnects += 1;
                            self.hist.write(
                                json!({"t": self.hist.ms(), "type": "reconnect", "client": self.k}),
                            );
                        }
                        connected_before = true;
                        conn = Some(c);
                    }
                    Err(e) => {
                        self.report.connect_failures += 1;
                        *self
                            .report
                            .errors
                            .entry(format!("connect: {}", short(&e)))
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let c = conn.as_ref().expect("connected");
            self.n += 1;
            let roll = self.rng.random_range(0..100);
            let usable = if roll < 70 {
                self.transfer(c).await
            } else if roll < 90 {
                self.event(c).await
            } else {
                self.read_total(c).await
            };
            if !usable {
                conn = None;
            }
            let pause = self.rng.random_range(5..20);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        self.report
    }

    /// A transfer in an explicit transaction; returns whether the
    /// connection is still usable.
    async fn transfer(&mut self, c: &Conn) -> bool {
        let from = self.rng.random_range(1..=ACCOUNTS);
        let mut to = self.rng.random_range(1..ACCOUNTS);
        if to >= from {
            to += 1;
        }
        let amount: i64 = self.rng.random_range(1..=100);
        let id = format!("t{}-{}", self.k, self.n);
        let check_ryw = self.rng.random_range(0..4) == 0;
        let started = Instant::now();
        c.take_notices();
        let r = async {
            step(c.client.batch_execute("BEGIN"))
                .await
                .map_err(|e| ("begin", e))?;
            for (st, name, account) in [(&c.debit, "debit", from), (&c.credit, "credit", to)] {
                let n = step(c.client.execute(st, &[&amount, &account]))
                    .await
                    .map_err(|e| (name, e))?;
                if n != 1 {
                    return Err((name, StepError::Rows(n)));
                }
            }
            step(
                c.client
                    .execute(&c.insert_transfer, &[&id, &from, &to, &amount]),
            )
            .await
            .map_err(|e| ("insert", e))?;
            step(c.client.batch_execute("COMMIT"))
                .await
                .map_err(|e| ("commit", e))
        }
        .await;
        let (outcome, err) = match &r {
            Ok(()) => (Outcome::Acked, None),
            Err((s, e)) => (e.outcome(s, *s == "commit"), Some((*s, e))),
        };
        let warned = self.note(&outcome, err, c);
        self.hist.write(json!({
            "t": self.hist.ms(), "type": "transfer", "client": self.k, "id": id,
            "from": from, "to": to, "amount": amount, "outcome": outcome.name(),
            "step": err.map(|(s, _)| s), "code": err.map(|(_, e)| e.code()),
            "message": err.map(|(_, e)| e.message()), "warned": warned,
            "took_ms": started.elapsed().as_millis() as u64,
        }));
        if let Some((st, StepError::Conn(m))) = err
            && st != "begin"
        {
            let what = format!("client {} transfer {id} at {st}: {m}", self.k);
            let ended = self.hist.ms();
            let began = ended.saturating_sub(started.elapsed().as_millis() as u64);
            self.report.cut.push((began, ended, what));
        }
        let broken = matches!(err, Some((_, StepError::Timeout)));
        self.report.transfers.push(Transfer {
            id: id.clone(),
            from,
            to,
            amount,
            outcome: outcome.clone(),
        });
        if broken || c.client.is_closed() {
            return false;
        }
        if err.is_some() {
            // Leave the failed transaction (harmless outside one).
            return step(c.client.batch_execute("ROLLBACK")).await.is_ok();
        }
        if check_ryw {
            return self.read_back(c, &id).await;
        }
        true
    }

    /// Reads an acknowledged transfer back on the same session.
    async fn read_back(&mut self, c: &Conn, id: &str) -> bool {
        self.report.ryw_checks += 1;
        match step(c.client.query_one(&c.find_transfer, &[&id])).await {
            Ok(row) => {
                let n: i64 = row.get(0);
                if n != 1 {
                    let v = format!("{id} read back {n} times at {} ms", self.hist.ms());
                    self.hist.write(json!({"t": self.hist.ms(), "type": "ryw_violation", "client": self.k, "id": id, "count": n}));
                    self.report.ryw_violations.push(v);
                }
                true
            }
            Err(e) => {
                self.report.read_errors += 1;
                self.count_error("read back", &e);
                !matches!(e, StepError::Timeout) && !c.client.is_closed()
            }
        }
    }

    /// An autocommit insert into a table with a serial and a now() default.
    async fn event(&mut self, c: &Conn) -> bool {
        let body = format!("e{}-{}", self.k, self.n);
        let started = Instant::now();
        c.take_notices();
        let r = step(c.client.execute(&c.insert_event, &[&body])).await;
        let err = r.as_ref().err().map(|e| ("event", e));
        let outcome = match &r {
            Ok(1) => Outcome::Acked,
            Ok(n) => Outcome::Failed {
                step: "event",
                code: format!("{n} rows"),
            },
            Err(e) => e.outcome("event", true),
        };
        let warned = self.note(&outcome, err, c);
        self.hist.write(json!({
            "t": self.hist.ms(), "type": "event", "client": self.k, "body": body,
            "outcome": outcome.name(), "code": err.map(|(_, e)| e.code()),
            "message": err.map(|(_, e)| e.message()), "warned": warned,
            "took_ms": started.elapsed().as_millis() as u64,
        }));
        self.report.events.push(Event { body, outcome });
        !matches!(err, Some((_, StepError::Timeout))) && !c.client.is_closed()
    }

    /// An autocommit read of the total, served by any copy: it must always
    /// see the whole bank.
    async fn read_total(&mut self, c: &Conn) -> bool {
        self.report.reads += 1;
        match step(c.client.query_one(&c.total, &[])).await {
            Ok(row) => {
                let sum: i64 = row.get(0);
                if sum != TOTAL {
                    self.hist.write(json!({"t": self.hist.ms(), "type": "bad_read", "client": self.k, "sum": sum}));
                    self.report
                        .bad_reads
                        .push(format!("total {sum} at {} ms", self.hist.ms()));
                }
                true
            }
            Err(e) => {
                self.report.read_errors += 1;
                self.count_error("read", &e);
                !matches!(e, StepError::Timeout) && !c.client.is_closed()
            }
        }
    }

    /// Counts an operation's outcome; returns whether its COMMIT came with
    /// a WARNING.
    fn note(
        &mut self,
        outcome: &Outcome,
        err: Option<(&'static str, &StepError)>,
        c: &Conn,
    ) -> bool {
        if let Some((s, e)) = err {
            self.count_error(s, e);
        }
        let warned = c.take_notices().iter().any(|n| n.starts_with("WARNING"));
        if *outcome == Outcome::Acked {
            self.report.acks_ms.push(self.hist.ms());
            if warned {
                self.report.warned += 1;
            }
        }
        warned
    }

    fn count_error(&mut self, s: &str, e: &StepError) {
        if matches!(e, StepError::Timeout) {
            self.report
                .hangs
                .push(format!("client {} {s} at {} ms", self.k, self.hist.ms()));
        }
        *self
            .report
            .errors
            .entry(format!("{s} {}", e.code()))
            .or_default() += 1;
    }
}

/// The first line of an error, for counting.
fn short(e: &str) -> String {
    e.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(80)
        .collect()
}

/// The bank clients.
struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<ClientReport>>,
}

impl Workload {
    fn start(n: usize, seed: u64, url: &watch::Receiver<String>, hist: &Arc<History>) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|k| {
                let client = Client {
                    k,
                    rng: StdRng::seed_from_u64(
                        seed.wrapping_add(1 + k as u64)
                            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ),
                    url: url.clone(),
                    hist: hist.clone(),
                    report: ClientReport::default(),
                    n: 0,
                };
                tokio::spawn(client.run(stop.clone()))
            })
            .collect();
        Workload { stop, tasks }
    }

    /// Stops the clients (each ends its current operation) and returns
    /// their reports; a client that does not end in time is an error.
    async fn stop(self) -> Result<Vec<ClientReport>, String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for (k, t) in self.tasks.into_iter().enumerate() {
            match tokio::time::timeout(STEP_LIMIT * 6, t).await {
                Ok(Ok(r)) => out.push(r),
                Ok(Err(e)) => return Err(format!("client {k} failed: {e}")),
                Err(_) => return Err(format!("client {k} did not stop")),
            }
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------ faults

/// A kind of fault the injector applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// SIGKILL a node (postmaster and children), restart it later.
    KillNode,
    /// SIGSTOP a node, SIGCONT it later.
    PauseNode,
    /// The node's port closes (relay drop), then reopens.
    RelayDrop,
    /// The network to the node hangs (relay pause), then recovers.
    RelayPause,
    /// The network to the node is slow (relay delay per chunk).
    RelayDelay,
    /// SWITCHOVER to a live subscriber.
    Switchover,
    /// Stop the proxy gracefully and start a new one on the same ports.
    RestartProxy,
    /// Kill the proxy abruptly (tasks dropped) and start a new one.
    KillProxy,
}

impl Fault {
    const ALL: [Fault; 8] = [
        Fault::KillNode,
        Fault::PauseNode,
        Fault::RelayDrop,
        Fault::RelayPause,
        Fault::RelayDelay,
        Fault::Switchover,
        Fault::RestartProxy,
        Fault::KillProxy,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillNode => "kill_node",
            Fault::PauseNode => "pause_node",
            Fault::RelayDrop => "relay_drop",
            Fault::RelayPause => "relay_pause",
            Fault::RelayDelay => "relay_delay",
            Fault::Switchover => "switchover",
            Fault::RestartProxy => "restart_proxy",
            Fault::KillProxy => "kill_proxy",
        }
    }
}

/// One fault of the schedule: every random choice is drawn up front in a
/// fixed order, so a seed always gives the same schedule.
#[derive(Debug, Clone)]
struct Plan {
    fault: Fault,
    /// Hit the primary (else a subscriber).
    primary: bool,
    /// Which subscriber (or switchover target): an index into the
    /// subscribers in config order.
    pick: usize,
    /// How long the fault lasts (for a proxy fault: how long it is down).
    hold: Duration,
    delay: Duration,
    /// Quiet time after the group healed, before the next fault.
    gap: Duration,
}

impl Plan {
    fn draw(rng: &mut StdRng, kinds: &[Fault]) -> Plan {
        Plan {
            fault: kinds[rng.random_range(0..kinds.len())],
            primary: rng.random_bool(0.5),
            pick: rng.random_range(0..2),
            hold: Duration::from_millis(rng.random_range(1000..4000)),
            delay: Duration::from_millis(rng.random_range(20..300)),
            gap: Duration::from_millis(rng.random_range(2000..5000)),
        }
    }
}

/// A fault as it happened.
#[derive(Debug, Clone)]
struct FaultRecord {
    fault: Fault,
    node: String,
    started_ms: u64,
    healed_ms: u64,
    error: Option<String>,
}

/// The group under test, its relays and the fault injector's state.
struct Chaos {
    g: TestGroup,
    relays: Vec<Relay>,
    /// The proxy config (nodes behind the relays).
    config: Config,
    url: watch::Sender<String>,
    hist: Arc<History>,
    faults: Vec<FaultRecord>,
    /// Things the proxy must never do (end by itself, fail to stop…).
    proxy_problems: Vec<String>,
    proxies_started: usize,
}

/// The URL bank clients use for a proxy.
fn client_url(p: &Proxy) -> String {
    format!("{}?application_name={CLIENT_APP}", p.url(GROUP))
}

/// /status, or None if the HTTP port does not answer within 5 s.
async fn try_status(http: SocketAddr) -> Option<serde_json::Value> {
    let get = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
        s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        serde_json::from_str(buf.split_once("\r\n\r\n")?.1).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .ok()
        .flatten()
}

/// (name, role, state) of every node in a /status.
fn nodes_of(status: &serde_json::Value) -> Vec<(String, String, String)> {
    status["groups"][0]["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    let s = |k: &str| n[k].as_str().unwrap_or_default().to_string();
                    (s("name"), s("role"), s("state"))
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Chaos {
    async fn status(&self) -> Option<serde_json::Value> {
        try_status(self.g.proxy.http).await
    }

    /// Notes it if the proxy's task ended although nobody stopped it.
    fn check_proxy(&mut self) {
        if self.g.proxy.ended_by_itself() {
            let p = format!("the proxy task ended by itself at {} ms", self.hist.ms());
            if !self.proxy_problems.contains(&p) {
                self.proxy_problems.push(p);
            }
        }
    }

    /// Waits until every node is up; returns how long it took.
    async fn wait_healthy(&mut self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < limit {
            self.check_proxy();
            if let Some(s) = self.status().await {
                let nodes = nodes_of(&s);
                if !nodes.is_empty() && nodes.iter().all(|(_, _, st)| st == "up") {
                    return Ok(start.elapsed());
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "the group did not heal within {limit:?}: {}",
            last.map_or("no /status".into(), |s| format!("{s:#}"))
        ))
    }

    /// Node index and name a plan hits, from the current /status.
    async fn target(&self, plan: &Plan) -> Option<(usize, String)> {
        let status = self.status().await?;
        let primary = primary_of(&status);
        let name = if plan.primary {
            primary
        } else {
            let subs: Vec<String> = nodes_of(&status)
                .into_iter()
                .filter(|(n, _, _)| *n != primary)
                .map(|(n, _, _)| n)
                .collect();
            subs.get(plan.pick % subs.len().max(1))?.clone()
        };
        Some((index_of(&self.g, &name), name))
    }

    /// Applies one fault, holds it, heals it.
    async fn inject(&mut self, plan: &Plan) {
        let Some((i, node)) = self.target(plan).await else {
            self.proxy_problems.push(format!(
                "no /status before a fault at {} ms",
                self.hist.ms()
            ));
            return;
        };
        let started = Instant::now();
        let fault = plan.fault;
        let what = match fault {
            Fault::RelayDelay => format!("{} {node} ({:?} per chunk)", fault.name(), plan.delay),
            Fault::Switchover | Fault::RestartProxy | Fault::KillProxy => fault.name().into(),
            _ => format!("{} {node}", fault.name()),
        };
        match fault {
            Fault::Switchover => eprintln!("[{:>7} ms] fault: {what}", self.hist.ms()),
            _ => eprintln!(
                "[{:>7} ms] fault: {what} for {:?}",
                self.hist.ms(),
                plan.hold
            ),
        }
        let mut node_name = node.clone();
        let error = match fault {
            Fault::KillNode => self.kill_node(i, plan.hold).await,
            Fault::PauseNode => self.pause_node(i, plan.hold).await,
            Fault::RelayDrop => self.relay(i, RelayMode::Drop, plan.hold).await,
            Fault::RelayPause => self.relay(i, RelayMode::Pause, plan.hold).await,
            Fault::RelayDelay => self.relay(i, RelayMode::Delay(plan.delay), plan.hold).await,
            Fault::Switchover => {
                let (r, target) = self.switchover(plan.pick).await;
                node_name = target;
                r
            }
            Fault::RestartProxy => {
                node_name = String::new();
                self.restart_proxy(false, plan.hold).await
            }
            Fault::KillProxy => {
                node_name = String::new();
                self.restart_proxy(true, plan.hold).await
            }
        }
        .err();
        let healed = Instant::now();
        if let Some(e) = &error {
            eprintln!("[{:>7} ms] fault {what}: {e}", self.hist.ms());
        }
        let status = self.status().await;
        self.hist.write(json!({
            "t": self.hist.ms(), "type": "fault", "kind": fault.name(), "node": node_name,
            "started_ms": self.hist.ms_at(started), "healed_ms": self.hist.ms_at(healed),
            "hold_ms": plan.hold.as_millis() as u64,
            "delay_ms": (fault == Fault::RelayDelay).then_some(plan.delay.as_millis() as u64),
            "error": error, "primary_after": status.as_ref().map(primary_of),
            "term_after": status.as_ref().map(term_of),
        }));
        self.hist.flush();
        self.faults.push(FaultRecord {
            fault,
            node: node_name,
            started_ms: self.hist.ms_at(started),
            healed_ms: self.hist.ms_at(healed),
            error,
        });
    }

    async fn kill_node(&mut self, i: usize, hold: Duration) -> Result<(), String> {
        tokio::task::block_in_place(|| self.g.cluster.nodes[i].kill())
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(hold).await;
        self.start_node(i).await
    }

    /// Starts a stopped node, retrying while its old processes exit.
    async fn start_node(&mut self, i: usize) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..60 {
            match tokio::task::block_in_place(|| self.g.cluster.nodes[i].start()) {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(format!(
            "could not restart {}: {last}",
            self.g.cluster.nodes[i].name
        ))
    }

    async fn pause_node(&mut self, i: usize, hold: Duration) -> Result<(), String> {
        tokio::task::block_in_place(|| self.g.cluster.nodes[i].pause())
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(hold).await;
        tokio::task::block_in_place(|| self.g.cluster.nodes[i].resume()).map_err(|e| e.to_string())
    }

    async fn relay(&mut self, i: usize, mode: RelayMode, hold: Duration) -> Result<(), String> {
        self.relays[i].set(mode);
        tokio::time::sleep(hold).await;
        self.relays[i].set(RelayMode::Pass);
        Ok(())
    }

    /// SWITCHOVER to the `pick`-th live subscriber; returns its name.
    async fn switchover(&mut self, pick: usize) -> (Result<(), String>, String) {
        let Some(status) = self.status().await else {
            return (Err("no /status".into()), String::new());
        };
        let primary = primary_of(&status);
        let live: Vec<String> = nodes_of(&status)
            .into_iter()
            .filter(|(n, _, st)| *n != primary && st == "up")
            .map(|(n, _, _)| n)
            .collect();
        let Some(target) = live.get(pick % live.len().max(1)).cloned() else {
            return (Err("no live subscriber".into()), String::new());
        };
        let sql = format!("SWITCHOVER {GROUP} TO {target}");
        let r =
            match tokio::time::timeout(Duration::from_secs(60), admin(&self.g.proxy, &sql)).await {
                Err(_) => Err(format!("{sql}: no answer within 60 s")),
                Ok(Err(e)) => Err(format!("{sql}: {e}")),
                Ok(Ok(rows)) => {
                    eprintln!("[{:>7} ms] {sql}: {rows:?}", self.hist.ms());
                    Ok(())
                }
            };
        (r, target)
    }

    /// Stops (or kills) the proxy and, after `down`, starts a new one on
    /// the same client port (and the same HTTP port if it is free: a killed
    /// proxy's stays taken); clients reconnect to it.
    async fn restart_proxy(&mut self, kill: bool, down: Duration) -> Result<(), String> {
        let (addr, http) = (self.g.proxy.addr, self.g.proxy.http);
        self.check_proxy();
        if kill {
            self.g.proxy.kill();
        } else if let Err(e) = self.g.proxy.stop_checked(Duration::from_secs(30)).await {
            self.proxy_problems
                .push(format!("stopping the proxy at {} ms: {e}", self.hist.ms()));
        }
        tokio::time::sleep(down).await;
        let mut config = self.config.clone();
        let mut last = String::new();
        for attempt in 0..30 {
            (config.listen, config.http) = match attempt {
                0 => (addr.to_string(), http.to_string()),
                1..20 => (addr.to_string(), "127.0.0.1:0".into()),
                _ => ("127.0.0.1:0".into(), "127.0.0.1:0".into()),
            };
            match Proxy::try_start(config.clone()).await {
                Ok(p) => {
                    if p.addr != addr || p.http != http {
                        eprintln!(
                            "[{:>7} ms] the new proxy listens on {}/{} ({addr}/{http}: {last})",
                            self.hist.ms(),
                            p.addr,
                            p.http
                        );
                    }
                    self.g.proxy = p;
                    self.proxies_started += 1;
                    self.url.send_replace(client_url(&self.g.proxy));
                    return Ok(());
                }
                Err(e) => last = format!("{e:#}"),
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Err(format!("no new proxy could start: {last}"))
    }

    /// Undoes whatever fault may be left: relays pass, nodes run.
    async fn heal_everything(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for r in &self.relays {
            r.set(RelayMode::Pass);
        }
        for i in 0..self.g.cluster.nodes.len() {
            if self.g.cluster.nodes[i].is_running() {
                let _ = tokio::task::block_in_place(|| self.g.cluster.nodes[i].resume());
            } else if let Err(e) = self.start_node(i).await {
                errors.push(e);
            }
        }
        errors
    }
}

// ------------------------------------------------------------------ checks

/// One invariant and whether it held.
struct Verdict {
    name: String,
    ok: bool,
    detail: String,
}

fn verdict(name: &str, ok: bool, detail: impl Into<String>) -> Verdict {
    Verdict {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

/// A connection to node `i` for the test's own checks.
async fn check_conn(g: &TestGroup, i: usize) -> tokio_postgres::Client {
    connect(&format!(
        "{}?application_name=chaos-check",
        g.node(i).url("app")
    ))
    .await
}

/// Per node: (backends that are not the proxy's own, the proxy's own).
async fn backend_counts(g: &TestGroup) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for i in 0..g.cluster.nodes.len() {
        let c = check_conn(g, i).await;
        let internal: Vec<String> = INTERNAL_APPS.iter().map(|s| s.to_string()).collect();
        let row = c
            .query_one(
                "SELECT count(*) FILTER (WHERE NOT application_name = ANY($1)), \
                        count(*) FILTER (WHERE application_name = ANY($1)) \
                 FROM pg_stat_activity WHERE datname = 'app' AND backend_type = 'client backend' \
                 AND pid <> pg_backend_pid()",
                &[&internal],
            )
            .await
            .unwrap();
        out.push((row.get(0), row.get(1)));
    }
    out
}

/// `reprise_client_connections` of the soak's group in /metrics (0 if
/// absent). The gauge is process-wide, hence a group name of its own.
async fn client_gauge(p: &Proxy) -> f64 {
    p.http_get("/metrics")
        .await
        .lines()
        .find(|l| {
            l.starts_with("reprise_client_connections{")
                && l.contains(&format!("group=\"{GROUP}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The rows of the bank's tables that differ between the first copy and
/// each other one (a few per table), to explain a digest mismatch.
async fn row_differences(g: &TestGroup) -> String {
    let mut out = String::new();
    for table in ["accounts", "transfers", "events"] {
        let mut copies = Vec::new();
        for i in 0..g.cluster.nodes.len() {
            let rows: std::collections::BTreeSet<String> = check_conn(g, i)
                .await
                .query(&format!("SELECT x::text FROM {table} x"), &[])
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default();
            copies.push(rows);
        }
        for i in 1..copies.len() {
            let (a, b) = (&g.cluster.nodes[0].name, &g.cluster.nodes[i].name);
            for (x, y, only) in [(0, i, a), (i, 0, b)] {
                let diff: Vec<&String> = copies[x].difference(&copies[y]).take(5).collect();
                if !diff.is_empty() {
                    out.push_str(&format!(
                        "  {table} rows only on {only} (vs {}): {diff:?}\n",
                        if x == 0 { b } else { a }
                    ));
                }
            }
        }
    }
    out
}

/// Everything the clients attempted, by id and by body.
struct Attempts {
    transfers: HashMap<String, Transfer>,
    events: HashMap<String, Outcome>,
}

impl Attempts {
    fn of(reports: &[ClientReport]) -> Attempts {
        Attempts {
            transfers: reports
                .iter()
                .flat_map(|r| &r.transfers)
                .map(|t| (t.id.clone(), t.clone()))
                .collect(),
            events: reports
                .iter()
                .flat_map(|r| &r.events)
                .map(|e| (e.body.clone(), e.outcome.clone()))
                .collect(),
        }
    }
}

/// What one copy holds, checked against what the clients were told.
#[derive(Default)]
struct CopyCheck {
    /// Money not conserved, or balances that are not their transfers' sum.
    balances: Vec<String>,
    /// Rows missing, doubled, unexpected or different from what was sent.
    rows: Vec<String>,
    unknown_present: usize,
    unknown_absent: usize,
}

/// Adds a problem to a list, keeping the list short.
fn push_some(list: &mut Vec<String>, p: String) {
    if list.len() < 20 {
        list.push(p);
    } else if list.len() == 20 {
        list.push("…".into());
    }
}

impl CopyCheck {
    fn problem(&mut self, p: String) {
        push_some(&mut self.rows, p);
    }

    /// A row (count times) for an operation with this outcome.
    fn expect(&mut self, what: &str, outcome: Option<&Outcome>, count: i64) {
        match (outcome, count) {
            (None, _) => self.problem(format!("{what} is there but no client attempted it")),
            (Some(Outcome::Acked), 1) => {}
            (Some(Outcome::Acked), n) => {
                self.problem(format!("acknowledged {what} is there {n} times"))
            }
            (Some(Outcome::Failed { step, code }), n) if n > 0 => self.problem(format!(
                "{what} failed at {step} with {code} but is there {n} times"
            )),
            (Some(Outcome::Failed { .. }), _) => {}
            (Some(Outcome::Unknown { lost: true, .. }), n) if n > 0 => self.problem(format!(
                "{what} was reported as not part of the group's history but is there {n} times"
            )),
            (Some(Outcome::Unknown { .. }), 0) => self.unknown_absent += 1,
            (Some(Outcome::Unknown { .. }), 1) => self.unknown_present += 1,
            (Some(Outcome::Unknown { .. }), n) => {
                self.problem(format!("{what} (outcome unknown) is there {n} times"))
            }
        }
    }
}

/// Checks one copy's bank against the clients' history.
async fn check_copy(g: &TestGroup, i: usize, a: &Attempts) -> CopyCheck {
    let c = check_conn(g, i).await;
    let mut check = CopyCheck::default();
    let balances: HashMap<i32, i64> = c
        .query("SELECT id, balance FROM accounts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let total: i64 = balances.values().sum();
    if total != TOTAL || balances.len() != ACCOUNTS as usize {
        push_some(
            &mut check.balances,
            format!(
                "{} accounts hold {total} in all, not {ACCOUNTS} holding {TOTAL}",
                balances.len()
            ),
        );
    }
    // Transfers: each as attempted, and the balances exactly their effect.
    let mut expected: HashMap<i32, i64> = (1..=ACCOUNTS).map(|id| (id, START_BALANCE)).collect();
    let rows = c
        .query("SELECT id, from_id, to_id, amount FROM transfers", &[])
        .await
        .unwrap();
    let mut seen: HashMap<String, i64> = HashMap::new();
    for r in &rows {
        let (id, from, to, amount): (String, i32, i32, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        *seen.entry(id.clone()).or_default() += 1;
        *expected.entry(from).or_default() -= amount;
        *expected.entry(to).or_default() += amount;
        if let Some(t) = a.transfers.get(&id)
            && (t.from, t.to, t.amount) != (from, to, amount)
        {
            check.problem(format!(
                "transfer {id} is {from}->{to} {amount}, the client sent {}->{} {}",
                t.from, t.to, t.amount
            ));
        }
    }
    for (id, n) in &seen {
        check.expect(
            &format!("transfer {id}"),
            a.transfers.get(id).map(|t| &t.outcome),
            *n,
        );
    }
    for (id, t) in &a.transfers {
        if !seen.contains_key(id) {
            check.expect(&format!("transfer {id}"), Some(&t.outcome), 0);
        }
    }
    for (id, want) in &expected {
        let have = balances.get(id).copied().unwrap_or_default();
        if have != *want {
            push_some(
                &mut check.balances,
                format!("account {id} holds {have}, but its transfers on this copy make {want}"),
            );
        }
    }
    // Events.
    let rows = c
        .query("SELECT body, count(*) FROM events GROUP BY body", &[])
        .await
        .unwrap();
    let mut seen = HashMap::new();
    for r in &rows {
        let (body, n): (String, i64) = (r.get(0), r.get(1));
        check.expect(&format!("event {body}"), a.events.get(&body), n);
        seen.insert(body, n);
    }
    for (body, o) in &a.events {
        if !seen.contains_key(body) {
            check.expect(&format!("event {body}"), Some(o), 0);
        }
    }
    check
}

// -------------------------------------------------------------------- soak

async fn soak(s: Settings) {
    watch_proxy_panics();
    eprintln!(
        "chaos soak: seed {} ({} s, {} clients, faults {:?}); replay with REPRISE_CHAOS_SEED={}",
        s.seed,
        s.secs,
        s.clients,
        s.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
        s.seed
    );
    let (mut chaos, url) = Chaos::start(&s).await;
    let hist = chaos.hist.clone();
    let baseline = backend_counts(&chaos.g).await;
    eprintln!("backends per node at start (clients, proxy's own): {baseline:?}");

    let workload = Workload::start(s.clients, s.seed, &url, &hist);
    let run = chaos.run_faults(&s).await;
    eprintln!("[{:>7} ms] faults stop; healing", hist.ms());

    // Heal: everything runs again, the clients stop, the copies catch up.
    let heal_started = Instant::now();
    let heal_errors = chaos.heal_everything().await;
    let healthy = chaos.wait_healthy(HEALTHY_LIMIT).await;
    let reports = match workload.stop().await {
        Ok(r) => r,
        Err(e) => {
            hist.flush();
            panic!("{e}");
        }
    };
    eprintln!("[{:>7} ms] clients stopped", hist.ms());
    let mut verdicts = vec![chaos.healed(&run, heal_errors, healthy).await];
    let (conns, internal) = connection_verdicts(&chaos, &baseline).await;
    verdicts.extend(conns);
    let (data, unknown) = data_verdicts(&chaos.g, &reports).await;
    verdicts.extend(data);
    let gap = client_verdicts(&reports, &hist, &run, &chaos.faults, &mut verdicts);
    verdicts.push(chaos.proxy_verdict().await);

    let summary = Summary {
        s: &s,
        soak_took: run.took,
        heal_took: heal_started.elapsed(),
        reports: &reports,
        faults: &chaos.faults,
        proxies: chaos.proxies_started,
        unknown,
        gap,
        internal,
    };
    summary.print(&verdicts, &hist.path);
    hist.write(summary.json(&verdicts));
    hist.flush();
    let failed: Vec<&Verdict> = verdicts.iter().filter(|v| !v.ok).collect();
    assert!(
        failed.is_empty(),
        "chaos soak (seed {}) broke {} invariant(s); replay with REPRISE_CHAOS_SEED={}, history in {}:\n{}",
        s.seed,
        failed.len(),
        s.seed,
        hist.path.display(),
        failed
            .iter()
            .map(|v| format!("- {}: {}", v.name, v.detail))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The fault phase as it went.
struct Run {
    started: Instant,
    took: Duration,
    /// The group did not heal after a fault (the faults stopped there).
    unhealed: Vec<String>,
}

impl Chaos {
    /// Three copies behind relays, the proxy in front (sync_replicas = 1,
    /// auto_reseed), the bank created through it. Returns the URL clients
    /// follow across proxy restarts.
    async fn start(s: &Settings) -> (Chaos, watch::Receiver<String>) {
        let mut relays = Vec::new();
        let mut saved = None;
        let g = TestGroup::start_with(3, "", |c| {
            c.groups[0].name = GROUP.into();
            c.replication.sync_replicas = 1;
            c.replication.auto_reseed = true;
            c.health.failover_wait_ms = 3000;
            relays = relay_nodes(c);
            saved = Some(c.clone());
        })
        .await;
        g.proxy
            .client(GROUP)
            .await
            .batch_execute(BANK_SQL)
            .await
            .expect("create the bank through the proxy");
        let hist = Arc::new(History::create(s.seed));
        hist.write(json!({
            "t": 0, "type": "start", "seed": s.seed, "secs": s.secs, "clients": s.clients,
            "faults": s.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
        }));
        let (url, rx) = watch::channel(client_url(&g.proxy));
        let mut chaos = Chaos {
            g,
            relays,
            config: saved.expect("config"),
            url,
            hist,
            faults: Vec::new(),
            proxy_problems: Vec::new(),
            proxies_started: 1,
        };
        chaos
            .wait_healthy(Duration::from_secs(60))
            .await
            .expect("the group is up at start");
        (chaos, rx)
    }

    /// Injects faults from the seeded schedule, one at a time, until the
    /// soak's time is up; after each, waits for the group to heal.
    async fn run_faults(&mut self, s: &Settings) -> Run {
        let mut rng = StdRng::seed_from_u64(s.seed);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(s.secs);
        let mut unhealed = Vec::new();
        tokio::time::sleep(Duration::from_secs(2)).await;
        while Instant::now() < deadline {
            let plan = Plan::draw(&mut rng, &s.faults);
            self.inject(&plan).await;
            match self.wait_healthy(HEALTHY_LIMIT).await {
                Ok(took) => eprintln!("[{:>7} ms] healthy again after {took:?}", self.hist.ms()),
                Err(e) => {
                    eprintln!("{e}");
                    let at = self.hist.ms();
                    unhealed.push(format!("after {} at {at} ms: {e}", plan.fault.name()));
                    break;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(plan.gap.min(left)).await;
        }
        Run {
            started,
            took: started.elapsed(),
            unhealed,
        }
    }

    /// Whether the group healed after every fault and at the end: every
    /// node up with applied_seq = head_seq.
    async fn healed(
        &self,
        run: &Run,
        heal_errors: Vec<String>,
        healthy: Result<Duration, String>,
    ) -> Verdict {
        let caught_up = wait_caught_up(&self.g, &[0, 1, 2], Duration::from_secs(120)).await;
        let status = match caught_up {
            Some(_) => String::new(),
            None => format!(" {:#?}", self.status().await),
        };
        verdict(
            "the group healed after every fault, and at the end",
            run.unhealed.is_empty()
                && heal_errors.is_empty()
                && healthy.is_ok()
                && caught_up.is_some(),
            format!(
                "{:?} {heal_errors:?} {:?} caught up: {caught_up:?}{status}",
                run.unhealed,
                healthy.err()
            ),
        )
    }

    /// The proxy never panicked (anywhere in its code) nor ended by itself,
    /// and the last one stops cleanly.
    async fn proxy_verdict(&mut self) -> Verdict {
        self.check_proxy();
        if let Err(e) = self.g.proxy.stop_checked(Duration::from_secs(30)).await {
            self.proxy_problems
                .push(format!("stopping the proxy at the end: {e}"));
        }
        let panics = PROXY_PANICS.lock().unwrap().clone();
        verdict(
            "the proxy never panicked or ended by itself",
            self.proxy_problems.is_empty() && panics.is_empty(),
            format!("{:?} panics: {panics:?}", self.proxy_problems),
        )
    }
}

/// Panics raised in the proxy's own code (`src/`), in any task: a session
/// or monitor task that panics dies alone, so nothing else would notice.
static PROXY_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_proxy_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(l) = info.location()
                && l.file().starts_with("src/")
            {
                let what = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                PROXY_PANICS.lock().unwrap().push(format!("{l}: {what}"));
            }
            previous(info);
        }));
    });
}

/// Client connections back to 0 and backends back to the baseline once
/// the clients are gone; also the proxy's own backends over all nodes
/// (start, end), for the summary.
async fn connection_verdicts(chaos: &Chaos, baseline: &[(i64, i64)]) -> (Vec<Verdict>, (i64, i64)) {
    let g = &chaos.g;
    // The gauge is process-wide: sessions of a proxy killed in-process
    // (tasks dropped) never count themselves out, where a real crash takes
    // the gauge with it; so after a kill_proxy only /status counts.
    let killed = chaos.faults.iter().any(|f| f.fault == Fault::KillProxy);
    let conns = wait_until(Duration::from_secs(30), || async {
        let st = try_status(g.proxy.http).await;
        st.is_some_and(|st| st["client_connections"] == 0)
            && (killed || client_gauge(&g.proxy).await == 0.0)
    })
    .await;
    let st = try_status(g.proxy.http).await;
    let clients = verdict(
        "client connections back to 0 (/status, and /metrics unless a proxy was killed)",
        conns.is_some(),
        format!(
            "/status client_connections {}, reprise_client_connections {}{}",
            st.map_or("?".into(), |s| s["client_connections"].to_string()),
            client_gauge(&g.proxy).await,
            if killed {
                " (not checked: a proxy was killed)"
            } else {
                ""
            }
        ),
    );
    let back = wait_until(Duration::from_secs(30), || async {
        backend_counts(g)
            .await
            .iter()
            .zip(baseline)
            .all(|(now, start)| now.0 == start.0)
    })
    .await;
    let now = backend_counts(g).await;
    let backends = verdict(
        "backends per node other than the proxy's own back to the start",
        back.is_some(),
        format!("per node (clients, proxy's own) at start {baseline:?}, now {now:?}"),
    );
    let internal = (
        baseline.iter().map(|b| b.1).sum(),
        now.iter().map(|b| b.1).sum(),
    );
    (vec![clients, backends], internal)
}

/// Every copy against the clients' history, then the copies together.
/// Also returns the unknown outcomes (present, absent) on the first copy.
async fn data_verdicts(g: &TestGroup, reports: &[ClientReport]) -> (Vec<Verdict>, (usize, usize)) {
    let attempts = Attempts::of(reports);
    let (mut balances, mut rows) = (Vec::new(), Vec::new());
    let mut unknown = None;
    for i in 0..g.cluster.nodes.len() {
        let c = check_copy(g, i, &attempts).await;
        let name = &g.cluster.nodes[i].name;
        balances.extend(c.balances.iter().map(|p| format!("{name}: {p}")));
        rows.extend(c.rows.iter().map(|p| format!("{name}: {p}")));
        unknown.get_or_insert((c.unknown_present, c.unknown_absent));
    }
    let identical = match check_identical_on(g, &[0, 1, 2], LogCheck::Head).await {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("{e}\n{}", row_differences(g).await)),
    };
    let verdicts = vec![
        verdict(
            "total balance unchanged, every balance the sum of its transfers",
            balances.is_empty(),
            balances.join("\n"),
        ),
        verdict(
            "acked transfers and events present exactly once on every copy, failed ones nowhere",
            rows.is_empty(),
            rows.join("\n"),
        ),
        verdict(
            "all copies identical (tables, sequences, log head)",
            identical.is_ok(),
            identical.err().unwrap_or_default(),
        ),
    ];
    (verdicts, unknown.unwrap_or_default())
}

/// What the clients saw while it ran: reads, read-your-writes, hangs and
/// the longest time without an acknowledged write. Returns that gap (ms).
fn client_verdicts(
    reports: &[ClientReport],
    hist: &History,
    run: &Run,
    faults: &[FaultRecord],
    verdicts: &mut Vec<Verdict>,
) -> u64 {
    let all = |f: fn(&ClientReport) -> &Vec<String>| -> Vec<String> {
        reports.iter().flat_map(|r| f(r).iter().cloned()).collect()
    };
    let (bad_reads, ryw, hangs) = (
        all(|r| &r.bad_reads),
        all(|r| &r.ryw_violations),
        all(|r| &r.hangs),
    );
    let mut acks: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.acks_ms.iter().copied())
        .collect();
    acks.sort_unstable();
    let from = hist.ms_at(run.started);
    let (gap, gap_at) = longest_gap(&acks, from, from + run.took.as_millis() as u64);
    verdicts.push(verdict(
        "every read saw the whole bank",
        bad_reads.is_empty(),
        format!("{bad_reads:?}"),
    ));
    verdicts.push(verdict(
        "a session reads its acknowledged transfers back",
        ryw.is_empty(),
        format!("{ryw:?}"),
    ));
    verdicts.push(cut_verdict(reports, faults));
    verdicts.push(verdict(
        "no client step hung",
        hangs.is_empty(),
        format!("{hangs:?}"),
    ));
    verdicts.push(verdict(
        &format!("writes acknowledged at least every {MAX_WRITE_GAP:?}"),
        Duration::from_millis(gap) <= MAX_WRITE_GAP,
        format!("longest gap {gap} ms, from {gap_at} ms"),
    ));
    gap
}

/// A running transaction is never cut without an ErrorResponse ("never a
/// dropped socket"; a graceful stop lets running transactions finish),
/// unless a proxy was killed while it ran.
fn cut_verdict(reports: &[ClientReport], faults: &[FaultRecord]) -> Verdict {
    let kills: Vec<(u64, u64)> = faults
        .iter()
        .filter(|f| f.fault == Fault::KillProxy)
        .map(|f| (f.started_ms.saturating_sub(100), f.healed_ms + 1000))
        .collect();
    let cut: Vec<&String> = reports
        .iter()
        .flat_map(|r| &r.cut)
        .filter(|(from, to, _)| !kills.iter().any(|(a, b)| from <= b && to >= a))
        .map(|(_, _, what)| what)
        .collect();
    verdict(
        "no running transaction lost its connection without an error (unless the proxy was killed)",
        cut.is_empty(),
        format!("{} cut: {cut:?}", cut.len()),
    )
}

/// The longest stretch in [from, to] without an acknowledgement, and where
/// it starts (ms).
fn longest_gap(acks: &[u64], from: u64, to: u64) -> (u64, u64) {
    let mut last = from;
    let mut best = (0, from);
    for &t in acks.iter().filter(|&&t| t >= from && t <= to).chain([&to]) {
        if t - last > best.0 {
            best = (t - last, last);
        }
        last = t;
    }
    best
}

/// The numbers printed at the end.
struct Summary<'a> {
    s: &'a Settings,
    soak_took: Duration,
    heal_took: Duration,
    reports: &'a [ClientReport],
    faults: &'a [FaultRecord],
    proxies: usize,
    /// Unknown outcomes (present, absent) on the first copy.
    unknown: (usize, usize),
    gap: u64,
    /// The proxy's own backends over all nodes (start, end).
    internal: (i64, i64),
}

/// (attempted, acked, failed, unknown, lost) of some outcomes.
fn tally<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> (usize, usize, usize, usize, usize) {
    let mut t = (0, 0, 0, 0, 0);
    for o in outcomes {
        t.0 += 1;
        match o {
            Outcome::Acked => t.1 += 1,
            Outcome::Failed { .. } => t.2 += 1,
            Outcome::Unknown { lost, .. } => {
                t.3 += 1;
                t.4 += *lost as usize;
            }
        }
    }
    t
}

impl Summary<'_> {
    fn faults_by_kind(&self) -> BTreeMap<&'static str, (usize, usize)> {
        let mut by = BTreeMap::new();
        for f in self.faults {
            let e: &mut (usize, usize) = by.entry(f.fault.name()).or_default();
            e.0 += 1;
            e.1 += f.error.is_some() as usize;
        }
        by
    }

    fn transfers(&self) -> (usize, usize, usize, usize, usize) {
        tally(
            self.reports
                .iter()
                .flat_map(|r| &r.transfers)
                .map(|t| &t.outcome),
        )
    }

    fn events(&self) -> (usize, usize, usize, usize, usize) {
        tally(
            self.reports
                .iter()
                .flat_map(|r| &r.events)
                .map(|e| &e.outcome),
        )
    }

    fn sum(&self, f: fn(&ClientReport) -> u64) -> u64 {
        self.reports.iter().map(f).sum()
    }

    fn print(&self, verdicts: &[Verdict], path: &std::path::Path) {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "=== chaos soak: seed {}, {} clients, faults for {:.1} s, heal and checks {:.1} s ===",
            self.s.seed,
            self.s.clients,
            self.soak_took.as_secs_f64(),
            self.heal_took.as_secs_f64()
        ));
        line(format!("{:<16} {:>6} {:>8}", "fault", "count", "errors"));
        for (k, (n, e)) in self.faults_by_kind() {
            line(format!("{k:<16} {n:>6} {e:>8}"));
        }
        line(format!("{:<16} {:>6}", "total", self.faults.len()));
        line(format!(
            "{:<10} {:>9} {:>7} {:>7} {:>8} {:>6}",
            "", "attempted", "acked", "failed", "unknown", "lost"
        ));
        for (name, t) in [("transfers", self.transfers()), ("events", self.events())] {
            line(format!(
                "{name:<10} {:>9} {:>7} {:>7} {:>8} {:>6}",
                t.0, t.1, t.2, t.3, t.4
            ));
        }
        line(format!(
            "unknown outcomes on the copies: {} present, {} absent",
            self.unknown.0, self.unknown.1
        ));
        line(format!(
            "reads {} (errors {}), read-your-writes checks {}, acked with a WARNING {}",
            self.sum(|r| r.reads),
            self.sum(|r| r.read_errors),
            self.sum(|r| r.ryw_checks),
            self.sum(|r| r.warned)
        ));
        line(format!(
            "reconnects {}, failed connection attempts {}, proxies started {}, longest write gap {} ms",
            self.sum(|r| r.reconnects),
            self.sum(|r| r.connect_failures),
            self.proxies,
            self.gap
        ));
        line(format!(
            "the proxy's own backends over all nodes: {} at start, {} at the end",
            self.internal.0, self.internal.1
        ));
        let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
        for r in self.reports {
            for (k, n) in &r.errors {
                *errors.entry(k).or_default() += n;
            }
        }
        line(format!("client errors by step and SQLSTATE: {errors:?}"));
        if verdicts.iter().any(|v| !v.ok) {
            line("faults (started..healed ms):".into());
            for f in self.faults {
                line(format!(
                    "  {:>7}..{:<7} {} {} {}",
                    f.started_ms,
                    f.healed_ms,
                    f.fault.name(),
                    f.node,
                    f.error.as_deref().unwrap_or_default()
                ));
            }
        }
        for v in verdicts {
            line(format!("{} {}", if v.ok { "PASS" } else { "FAIL" }, v.name));
        }
        line(format!("history: {}", path.display()));
        eprint!("{out}");
    }

    fn json(&self, verdicts: &[Verdict]) -> serde_json::Value {
        let (t, e) = (self.transfers(), self.events());
        json!({
            "type": "summary", "seed": self.s.seed,
            "soak_ms": self.soak_took.as_millis() as u64, "heal_ms": self.heal_took.as_millis() as u64,
            "faults": self.faults_by_kind().into_iter().map(|(k, (n, _))| (k, n)).collect::<BTreeMap<_, _>>(),
            "transfers": {"attempted": t.0, "acked": t.1, "failed": t.2, "unknown": t.3, "lost": t.4},
            "events": {"attempted": e.0, "acked": e.1, "failed": e.2, "unknown": e.3, "lost": e.4},
            "reconnects": self.sum(|r| r.reconnects),
            "invariants": verdicts.iter().map(|v| json!({"name": v.name, "ok": v.ok, "detail": v.detail})).collect::<Vec<_>>(),
        })
    }
}

// ------------------------------------------------- reproductions of bugs

/// Found by the soak (restart_proxy): a graceful stop ("let running
/// transactions finish") stops the appliers at once, so a COMMIT waiting
/// for `sync_replicas` can never be acknowledged; its client waits until
/// `shutdown_timeout_ms`, then loses the connection without an
/// ErrorResponse, although the transaction committed on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_lets_a_commit_waiting_for_a_subscriber_finish() {
    bounded(Duration::from_secs(120), async {
        let mut relays = Vec::new();
        let mut g = TestGroup::start(3, |c| {
            c.replication.sync_replicas = 1;
            c.shutdown_timeout_ms = 5000;
            relays = relay_nodes(c);
        })
        .await;
        // The subscribers apply slowly, so a COMMIT waits a while for one.
        for r in &relays[1..] {
            r.set(RelayMode::Delay(Duration::from_millis(100)));
        }
        let c = g.proxy.client("app").await;
        c.batch_execute("BEGIN").await.unwrap();
        c.execute(
            "INSERT INTO notes (body) VALUES ('committing at shutdown')",
            &[],
        )
        .await
        .unwrap();
        let commit = tokio::spawn(async move {
            let t = Instant::now();
            let r = c.batch_execute("COMMIT").await.map_err(|e| db_text(&e));
            (r, t.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        g.proxy.stop().await;
        let (r, took) = commit.await.unwrap();
        let n: i64 = g
            .direct(0)
            .await
            .query_one(
                "SELECT count(*) FROM notes WHERE body = 'committing at shutdown'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        eprintln!("COMMIT in flight at shutdown: {r:?} after {took:?}; on the primary {n} time(s)");
        assert!(
            r.is_ok(),
            "a COMMIT in flight when the proxy began a graceful stop must finish \
             (the subscribers were slow, not gone): got {r:?} after {took:?}, \
             and the row is on the primary {n} time(s)"
        );
    })
    .await;
}

/// Found by the soak (restart_proxy): during a graceful stop a session is
/// closed with 57P01 as soon as the client's own statement is done, while
/// the proxy's append and COMMIT of that autocommit write are still in
/// flight: the write commits, but the client was told the connection was
/// terminated (57P01, which from PostgreSQL means it did not commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_never_fails_a_write_that_commits() {
    bounded(Duration::from_secs(240), async {
        let mut relays = Vec::new();
        let mut config = None;
        let mut g = TestGroup::start(2, |c| {
            c.shutdown_timeout_ms = 5000;
            relays = relay_nodes(c);
            config = Some(c.clone());
        })
        .await;
        let config = config.unwrap();
        // A slow primary: each round trip of the write path takes ~80 ms.
        relays[0].set(RelayMode::Delay(Duration::from_millis(40)));
        let mut wrong = Vec::new();
        let mut seen = Vec::new();
        for attempt in 0..8u64 {
            if attempt > 0 {
                g.proxy = Proxy::start(config.clone()).await;
            }
            let c = g.proxy.client("app").await;
            c.execute("INSERT INTO notes (body) VALUES ('warm-up')", &[])
                .await
                .unwrap();
            // Prepared first: the write is then one round trip.
            let insert = c
                .prepare("INSERT INTO notes (body) VALUES ($1)")
                .await
                .unwrap();
            let body = format!("autocommit at shutdown {attempt}");
            let b = body.clone();
            let sent = Instant::now();
            let write = tokio::spawn(async move {
                let r = c
                    .execute(&insert, &[&b])
                    .await
                    .map_err(|e| (sqlstate(&e), db_text(&e)));
                (r, sent.elapsed())
            });
            tokio::time::sleep(Duration::from_millis(30 * attempt)).await;
            g.proxy.stop().await;
            let stopped = sent.elapsed();
            let (r, took) = write.await.unwrap();
            let n: i64 = g
                .direct(0)
                .await
                .query_one("SELECT count(*) FROM notes WHERE body = $1", &[&body])
                .await
                .unwrap()
                .get(0);
            seen.push(format!(
                "stop after {} ms: {r:?} after {took:?} (stopped after {stopped:?}), present {n}",
                30 * attempt
            ));
            if let Err((code, text)) = &r
                && code != "08007"
                && n > 0
            {
                wrong.push(format!("stop after {} ms: {text}", 30 * attempt));
            }
        }
        eprintln!("{}", seen.join("\n"));
        assert!(
            wrong.is_empty(),
            "writes that committed although their client got an error other than 08007:\n{}",
            wrong.join("\n")
        );
    })
    .await;
}

/// Found by the soak (with the COMMIT above cut at shutdown_timeout_ms): a
/// session whose task is dropped (the shutdown timeout's abort, or an
/// embedder dropping the server) never decrements
/// `reprise_client_connections`; the metric should be counted by a guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_session_is_counted_out_of_the_client_gauge() {
    bounded(Duration::from_secs(120), async {
        const G: &str = "gauge";
        let mut g = TestGroup::start(1, |c| c.groups[0].name = G.into()).await;
        let gauge = |text: String| -> f64 {
            text.lines()
                .find(|l| {
                    l.starts_with("reprise_client_connections{")
                        && l.contains(&format!("group=\"{G}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let c = g.proxy.client(G).await;
        c.simple_query("SELECT 1").await.unwrap();
        assert_eq!(gauge(g.proxy.http_get("/metrics").await), 1.0);
        let config = {
            let mut c = g.config();
            c.groups[0].name = G.into();
            c
        };
        g.proxy.kill();
        g.proxy = Proxy::start(config).await;
        let zero = wait_until(Duration::from_secs(5), || async {
            gauge(g.proxy.http_get("/metrics").await) == 0.0
        })
        .await;
        drop(c);
        assert!(
            zero.is_some(),
            "no session is left, but reprise_client_connections{{group=\"{G}\"}} is {}",
            gauge(g.proxy.http_get("/metrics").await)
        );
    })
    .await;
}

/// Found by the soak (kill_proxy, which drops the server's future like an
/// embedder would): the HTTP task is spawned detached, so it keeps serving
/// the dead server's /status on its port and keeps the groups — and their
/// control connections to every node — alive; a new proxy cannot take the
/// HTTP port back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_server_releases_its_http_port_and_node_connections() {
    bounded(Duration::from_secs(120), async {
        let mut g = TestGroup::start(1, |_| {}).await;
        let http = g.proxy.http;
        let control = |g: &TestGroup| {
            let url = g.node(0).url("app");
            async move {
                connect(&url)
                    .await
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reprise-control'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
            }
        };
        eprintln!("control connections while the proxy runs: {}", control(&g).await);
        g.proxy.kill();
        let released = wait_until(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(http).await.is_err() && control(&g).await == 0
        })
        .await;
        assert!(
            released.is_some(),
            "5 s after the server's future was dropped, its HTTP port {http} answers: {} \
             and the node holds {} reprise-control connection(s)",
            tokio::net::TcpStream::connect(http).await.is_ok(),
            control(&g).await
        );
    })
    .await;
}
