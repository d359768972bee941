//! Traffic statistics per group and per node: units (queries), ended
//! transactions, errors, bytes, and latency per unit, for `SHOW STATS`,
//! `/metrics` and the status page.
//!
//! The hot path touches only relaxed atomics, a session-local [`ConnStats`]
//! and one of a few sharded latency histograms per node; Prometheus
//! counters that mirror the atomics are set when `/metrics` is read.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use metrics::Counter;
use serde::Serialize;
use tokio::sync::watch;

use super::console::Table;
use super::events::{Journal, now_ms};
use crate::group::{Group, NodeState};
use crate::server::Shared;

/// Latency histograms per node; a session records into one chosen by its
/// id, so concurrent sessions rarely share a lock.
const SHARDS: usize = 4;
/// Latency recorded up to this many microseconds (longer ones count as this).
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Lag samples kept per group: one a second, five minutes.
pub const HISTORY_LEN: usize = 300;
/// How often the lag history is sampled.
pub const HISTORY_INTERVAL: Duration = Duration::from_secs(1);

const STATES: [NodeState; 5] = [
    NodeState::Up,
    NodeState::Down,
    NodeState::CatchingUp,
    NodeState::Divergent,
    NodeState::Seeding,
];

/// Latency per unit, in microseconds, sharded.
struct Latency {
    shards: [Mutex<Histogram<u64>>; SHARDS],
}

impl Latency {
    fn new() -> Latency {
        Latency {
            shards: std::array::from_fn(|_| {
                Mutex::new(Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid bounds"))
            }),
        }
    }

    fn record(&self, us: u64, shard: usize) {
        let mut h = self.shards[shard % SHARDS].lock().expect("latency");
        h.saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// All shards in one histogram.
    fn merged(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid bounds");
        for s in &self.shards {
            let _ = all.add(&*s.lock().expect("latency"));
        }
        all
    }
}

/// One node's traffic.
pub struct NodeStats {
    group: String,
    node: String,
    pub queries: AtomicU64,
    pub errors: AtomicU64,
    pub committed: AtomicU64,
    pub rolled_back: AtomicU64,
    /// Bytes sent to the node for client sessions.
    pub bytes_sent: AtomicU64,
    /// Bytes received from the node for client sessions.
    pub bytes_received: AtomicU64,
    latency: Latency,
    duration: metrics::Histogram,
}

impl NodeStats {
    /// Registers the node's series, so they exist (at 0) before any event.
    pub fn new(group: &str, node: &str) -> NodeStats {
        let labels = [("group", group.to_string()), ("node", node.to_string())];
        metrics::counter!("reprise_divergence_events_total", &labels).increment(0);
        metrics::counter!("reprise_node_applied_entries_total", &labels).increment(0);
        metrics::gauge!("reprise_verify_mismatched_tables", &labels).increment(0.0);
        for s in STATES {
            metrics::counter!("reprise_node_state_changes_total",
                "group" => group.to_string(), "node" => node.to_string(), "to" => s.as_str())
            .increment(0);
        }
        NodeStats {
            group: group.to_string(),
            node: node.to_string(),
            queries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            rolled_back: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            latency: Latency::new(),
            duration: metrics::histogram!(super::metrics::QUERY_DURATION, &labels),
        }
    }

    /// A transaction ended on this node.
    pub fn transaction_ended(&self, committed: bool) {
        let c = if committed {
            &self.committed
        } else {
            &self.rolled_back
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn unit_done(&self, took: Duration, shard: usize) {
        self.latency.record(took.as_micros() as u64, shard);
        self.duration.record(took.as_secs_f64());
    }

    /// (p50, p99) latency in milliseconds, None before the first unit.
    pub fn percentiles_ms(&self) -> Option<(f64, f64)> {
        let h = self.latency.merged();
        percentiles(&h)
    }

    /// Sets the Prometheus series mirrored from the atomics.
    fn publish(&self) {
        let labels = [("group", self.group.clone()), ("node", self.node.clone())];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metrics::counter!("reprise_node_errors_total", &labels).absolute(get(&self.errors));
        metrics::counter!("reprise_node_sent_bytes_total", &labels).absolute(get(&self.bytes_sent));
        metrics::counter!("reprise_node_received_bytes_total", &labels)
            .absolute(get(&self.bytes_received));
        for (outcome, v) in [("commit", &self.committed), ("rollback", &self.rolled_back)] {
            metrics::counter!("reprise_node_transactions_total",
                "group" => self.group.clone(), "node" => self.node.clone(), "outcome" => outcome)
            .absolute(get(v));
        }
    }
}

fn percentiles(h: &Histogram<u64>) -> Option<(f64, f64)> {
    if h.is_empty() {
        return None;
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Some((ms(0.5), ms(0.99)))
}

/// What a session's backend connection counts between flushes to its node.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// When each client unit still owed was sent.
    sent_at: VecDeque<Instant>,
    bytes_sent: u64,
    bytes_received: u64,
}

impl ConnStats {
    /// `units` client units go out now.
    pub fn units_sent(&mut self, units: usize) {
        if self.sent_at.len() > 4096 {
            // Out of step with the answers (should not happen): start over.
            self.sent_at.clear();
        }
        if units > 0 {
            let now = Instant::now();
            self.sent_at.extend(std::iter::repeat_n(now, units));
        }
    }

    pub fn sent(&mut self, bytes: usize) {
        self.bytes_sent += bytes as u64;
    }

    pub fn received(&mut self, bytes: usize) {
        self.bytes_received += bytes as u64;
    }

    /// A client unit's ReadyForQuery arrived: records its latency and
    /// hands the byte counts to the node.
    pub fn unit_done(&mut self, node: &NodeStats, shard: usize) {
        if let Some(at) = self.sent_at.pop_front() {
            node.unit_done(at.elapsed(), shard);
        }
        self.flush(node);
    }

    /// Hands the byte counts to the node (also when the connection goes).
    pub fn flush(&mut self, node: &NodeStats) {
        if self.bytes_sent > 0 {
            node.bytes_sent
                .fetch_add(std::mem::take(&mut self.bytes_sent), Ordering::Relaxed);
        }
        if self.bytes_received > 0 {
            node.bytes_received
                .fetch_add(std::mem::take(&mut self.bytes_received), Ordering::Relaxed);
        }
    }

    /// The connection is gone: nothing it owed will be answered.
    pub fn lost(&mut self, node: &NodeStats) {
        self.sent_at.clear();
        self.flush(node);
    }
}

/// A group's traffic, events and lag history.
pub struct GroupStats {
    group: String,
    pub journal: Arc<Journal>,
    /// Units answered by the proxy itself (refused, or no node to run them).
    pub refused: AtomicU64,
    /// ErrorResponses sent to clients, from nodes or from the proxy.
    pub errors: AtomicU64,
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    route_primary: Counter,
    route_subscriber: Counter,
    error_classes: Mutex<HashMap<[u8; 2], Counter>>,
    history: Mutex<VecDeque<Sample>>,
}

impl GroupStats {
    /// Registers the group's series at 0, so they exist before any event.
    pub fn new(group: &str) -> GroupStats {
        let label = [("group", group.to_string())];
        for name in [
            "reprise_failovers_total",
            "reprise_switchovers_total",
            "reprise_seeds_total",
            "reprise_client_connections_total",
            "reprise_client_received_bytes_total",
            "reprise_client_sent_bytes_total",
            "reprise_verify_runs_total",
        ] {
            metrics::counter!(name, &label).increment(0);
        }
        metrics::gauge!("reprise_verify_seq", &label).increment(0.0);
        metrics::gauge!("reprise_client_connections", &label).increment(0.0);
        let route = |r: &'static str| metrics::counter!("reprise_queries_total", "group" => group.to_string(), "route" => r);
        GroupStats {
            group: group.to_string(),
            journal: Arc::new(Journal::new(group)),
            refused: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            route_primary: route("primary"),
            route_subscriber: route("subscriber"),
            error_classes: Mutex::new(HashMap::new()),
            history: Mutex::new(VecDeque::with_capacity(HISTORY_LEN)),
        }
    }

    /// `units` client units were sent to the primary or a subscriber.
    pub fn routed(&self, units: usize, primary: bool) {
        let c = if primary {
            &self.route_primary
        } else {
            &self.route_subscriber
        };
        c.increment(units as u64);
    }

    /// An ErrorResponse with this SQLSTATE went to a client.
    pub fn error(&self, sqlstate: &[u8]) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let class = match sqlstate {
            [a, b, ..] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => [*a, *b],
            _ => *b"XX",
        };
        let mut classes = self.error_classes.lock().expect("error classes");
        classes
            .entry(class)
            .or_insert_with(|| {
                let class = String::from_utf8_lossy(&class).into_owned();
                metrics::counter!("reprise_errors_total",
                    "group" => self.group.clone(), "class" => class)
            })
            .increment(1);
    }

    pub fn client_bytes(&self, received: u64, sent: u64) {
        if received > 0 {
            self.bytes_in.fetch_add(received, Ordering::Relaxed);
        }
        if sent > 0 {
            self.bytes_out.fetch_add(sent, Ordering::Relaxed);
        }
    }

    /// The lag samples kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .expect("history")
            .iter()
            .cloned()
            .collect()
    }

    fn push_sample(&self, s: Sample) {
        let mut h = self.history.lock().expect("history");
        if h.len() == HISTORY_LEN {
            h.pop_front();
        }
        h.push_back(s);
    }
}

/// The SQLSTATE of an ErrorResponse body, without allocating ("" if none).
pub fn error_sqlstate(body: &[u8]) -> &[u8] {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        if field == b'C' {
            return &tail[..end];
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    b""
}

/// One node in a lag sample.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSample {
    pub name: String,
    pub role: &'static str,
    pub state: &'static str,
    pub applied_seq: u64,
    pub lag_seq: u64,
    pub lag_ms: u64,
}

/// Every node of a group at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_ms: i64,
    pub head_seq: u64,
    pub nodes: Vec<NodeSample>,
}

/// Takes one lag sample of the group.
pub fn sample(group: &Group) {
    let s = group.status();
    group.stats.push_sample(Sample {
        at_ms: now_ms(),
        head_seq: s.head_seq,
        nodes: s
            .nodes
            .into_iter()
            .map(|n| NodeSample {
                name: n.name,
                role: n.role.as_str(),
                state: n.state.as_str(),
                applied_seq: n.applied_seq,
                lag_seq: n.lag_seq,
                lag_ms: n.lag_ms,
            })
            .collect(),
    });
}

/// Samples the group's lag every [`HISTORY_INTERVAL`] until `stop` turns
/// true, and folds latency samples into the Prometheus histograms' buckets
/// so they take no memory while nobody scrapes.
pub async fn sampler(group: Arc<Group>, mut stop: watch::Receiver<bool>) {
    let metrics = super::metrics::Metrics::install();
    let mut tick = tokio::time::interval(HISTORY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sample(&group);
                metrics.upkeep();
            }
            r = stop.changed() => if r.is_err() || *stop.borrow() { return },
        }
    }
}

/// Sets the series computed from the group's state and atomics (called
/// before `/metrics` is rendered).
pub fn publish(group: &Group) {
    group.publish_lag();
    let label = [("group", group.name.clone())];
    metrics::gauge!("reprise_group_term", &label).set(group.term() as f64);
    metrics::counter!("reprise_client_received_bytes_total", &label)
        .absolute(group.stats.bytes_in.load(Ordering::Relaxed));
    metrics::counter!("reprise_client_sent_bytes_total", &label)
        .absolute(group.stats.bytes_out.load(Ordering::Relaxed));
    let primary = group.primary();
    for (i, n) in group.nodes().iter().enumerate() {
        if n.is_removed() {
            continue;
        }
        let labels = [("group", group.name.clone()), ("node", n.name.clone())];
        metrics::gauge!("reprise_node_primary", &labels).set(if i == primary { 1.0 } else { 0.0 });
        let state = n.state();
        for s in STATES {
            metrics::gauge!("reprise_node_state",
                "group" => group.name.clone(), "node" => n.name.clone(), "state" => s.as_str())
            .set(if s == state { 1.0 } else { 0.0 });
        }
        n.stats.publish();
    }
}

/// `SHOW STATS`: one row per group (node NULL), then one per node.
pub fn show_stats(shared: &Shared) -> Table {
    let mut rows = Vec::new();
    let n = |v: u64| Some(v.to_string());
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.3}"));
    for g in shared.groups() {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut all = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 2).expect("bounds");
        let (mut queries, mut committed, mut rolled_back) = (get(&g.stats.refused), 0, 0);
        let mut node_rows = Vec::new();
        for (i, node) in g.nodes().iter().enumerate() {
            if node.is_removed() {
                continue;
            }
            let s = &node.stats;
            let h = s.latency.merged();
            let _ = all.add(&h);
            let p = percentiles(&h);
            queries += get(&s.queries);
            committed += get(&s.committed);
            rolled_back += get(&s.rolled_back);
            node_rows.push(vec![
                Some(g.name.clone()),
                Some(node.name.clone()),
                Some(g.role(i).as_str().to_string()),
                n(get(&s.queries)),
                n(get(&s.committed)),
                n(get(&s.rolled_back)),
                n(get(&s.errors)),
                n(get(&s.bytes_received)),
                n(get(&s.bytes_sent)),
                ms(p.map(|p| p.0)),
                ms(p.map(|p| p.1)),
            ]);
        }
        let p = percentiles(&all);
        rows.push(vec![
            Some(g.name.clone()),
            None,
            None,
            n(queries),
            n(committed),
            n(rolled_back),
            n(get(&g.stats.errors)),
            n(get(&g.stats.bytes_in)),
            n(get(&g.stats.bytes_out)),
            ms(p.map(|p| p.0)),
            ms(p.map(|p| p.1)),
        ]);
        rows.extend(node_rows);
    }
    Table {
        tag: format!("SHOW {}", rows.len()),
        columns: vec![
            "group",
            "node",
            "role",
            "queries",
            "commits",
            "rollbacks",
            "errors",
            "bytes_in",
            "bytes_out",
            "p50_ms",
            "p99_ms",
        ],
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_sqlstate_of_an_error_response() {
        let body = b"SERROR\0VERROR\0C23505\0Mduplicate key\0\0";
        assert_eq!(error_sqlstate(body), b"23505");
        assert_eq!(error_sqlstate(b"SERROR\0Mno code\0\0"), b"");
        assert_eq!(error_sqlstate(b""), b"");
        assert_eq!(error_sqlstate(b"C4"), b"4");
    }

    #[test]
    fn latency_percentiles_merge_the_shards() {
        let l = Latency::new();
        for i in 1..=100u64 {
            l.record(i * 1000, i as usize);
        }
        let (p50, p99) = percentiles(&l.merged()).unwrap();
        assert!((49.0..=51.0).contains(&p50), "{p50}");
        assert!((98.0..=100.0).contains(&p99), "{p99}");
        assert!(percentiles(&Latency::new().merged()).is_none());
    }

    #[test]
    fn conn_stats_pair_units_with_answers_and_flush_bytes() {
        let node = NodeStats::new("stats-test", "n1");
        let mut c = ConnStats::default();
        c.units_sent(2);
        c.sent(100);
        c.received(40);
        c.unit_done(&node, 0);
        assert_eq!(node.bytes_sent.load(Ordering::Relaxed), 100);
        assert_eq!(node.bytes_received.load(Ordering::Relaxed), 40);
        assert!(node.percentiles_ms().is_some());
        c.received(5);
        c.lost(&node);
        assert_eq!(node.bytes_received.load(Ordering::Relaxed), 45);
        // The second unit was lost with the connection: nothing to pair.
        c.unit_done(&node, 0);
    }
}
