//! Metrics through the `metrics` facade, exported as Prometheus text.
//!
//! Every series Reprise exports is listed in [`CATALOG`] with its type and
//! help text: the recorder is told about each one at install, so `/metrics`
//! carries `# HELP` lines and passes `promtool check metrics`, and the
//! README, the Grafana dashboard test and the promtool test share one list.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The kind of a Prometheus series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric: name, kind, labels (for the docs) and help text.
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static str,
    pub help: &'static str,
}

const fn m(name: &'static str, kind: Kind, labels: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

/// Name of the per-node latency histogram (seconds, with buckets).
pub const QUERY_DURATION: &str = "reprise_query_duration_seconds";

/// Bucket bounds (seconds) of [`QUERY_DURATION`]: 250 µs to 10 s.
pub const QUERY_DURATION_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric Reprise exports.
pub const CATALOG: &[Metric] = &[
    m(
        "reprise_node_up",
        Kind::Gauge,
        "group, node",
        "1 if the node is up (serving), else 0",
    ),
    m(
        "reprise_node_state",
        Kind::Gauge,
        "group, node, state",
        "1 for the node's current state (up, down, catching_up, divergent, seeding), 0 for the others",
    ),
    m(
        "reprise_node_primary",
        Kind::Gauge,
        "group, node",
        "1 if the node is the group's primary, else 0",
    ),
    m(
        "reprise_node_applied_seq",
        Kind::Gauge,
        "group, node",
        "Highest log seq the node has committed",
    ),
    m(
        "reprise_node_applied_entries_total",
        Kind::Counter,
        "group, node",
        "Log entries the node applied (its apply rate is the rate of this counter)",
    ),
    m(
        "reprise_node_lag_seq",
        Kind::Gauge,
        "group, node",
        "Log entries the node is behind the head",
    ),
    m(
        "reprise_node_lag_seconds",
        Kind::Gauge,
        "group, node",
        "How old the node's last applied entry is while it is behind, in seconds",
    ),
    m(
        "reprise_node_queries_total",
        Kind::Counter,
        "group, node",
        "Client units (a simple query or an extended-protocol batch up to Sync) sent to the node",
    ),
    m(
        "reprise_node_errors_total",
        Kind::Counter,
        "group, node",
        "ErrorResponses from the node relayed to clients",
    ),
    m(
        "reprise_node_transactions_total",
        Kind::Counter,
        "group, node, outcome",
        "Transactions ended on the node (autocommit statements included), by outcome: commit or rollback",
    ),
    m(
        "reprise_node_sent_bytes_total",
        Kind::Counter,
        "group, node",
        "Bytes the proxy sent to the node for client sessions",
    ),
    m(
        "reprise_node_received_bytes_total",
        Kind::Counter,
        "group, node",
        "Bytes the proxy received from the node for client sessions",
    ),
    m(
        QUERY_DURATION,
        Kind::Histogram,
        "group, node",
        "Time from sending a client unit to the node until its ReadyForQuery, in seconds",
    ),
    m(
        "reprise_node_state_changes_total",
        Kind::Counter,
        "group, node, to",
        "Node state changes, by the state entered",
    ),
    m(
        "reprise_divergence_events_total",
        Kind::Counter,
        "group, node",
        "Times the node was found divergent",
    ),
    m(
        "reprise_queries_total",
        Kind::Counter,
        "group, route",
        "Client units by route: primary or subscriber",
    ),
    m(
        "reprise_errors_total",
        Kind::Counter,
        "group, class",
        "ErrorResponses sent to clients (from nodes or from the proxy), by SQLSTATE class",
    ),
    m(
        "reprise_client_received_bytes_total",
        Kind::Counter,
        "group",
        "Bytes the proxy received from clients",
    ),
    m(
        "reprise_client_sent_bytes_total",
        Kind::Counter,
        "group",
        "Bytes the proxy sent to clients",
    ),
    m(
        "reprise_client_connections",
        Kind::Gauge,
        "group",
        "Client sessions open now",
    ),
    m(
        "reprise_client_connections_total",
        Kind::Counter,
        "group",
        "Client sessions opened",
    ),
    m(
        "reprise_log_head_seq",
        Kind::Gauge,
        "group",
        "Highest log seq committed on the primary",
    ),
    m(
        "reprise_group_term",
        Kind::Gauge,
        "group",
        "The group's term (raised at each promotion)",
    ),
    m(
        "reprise_failovers_total",
        Kind::Counter,
        "group",
        "Failovers: a subscriber promoted because the primary was down",
    ),
    m(
        "reprise_switchovers_total",
        Kind::Counter,
        "group",
        "Planned switchovers done",
    ),
    m(
        "reprise_seeds_total",
        Kind::Counter,
        "group",
        "Nodes filled from a snapshot",
    ),
    m(
        "reprise_verify_runs_total",
        Kind::Counter,
        "group",
        "VERIFY runs that compared the copies",
    ),
    m(
        "reprise_verify_seq",
        Kind::Gauge,
        "group",
        "Log position of the last VERIFY",
    ),
    m(
        "reprise_verify_mismatched_tables",
        Kind::Gauge,
        "group, node",
        "Tables that did not match the primary at the last VERIFY (0 before the first one)",
    ),
];

/// The process-wide Prometheus recorder (installed once, even when tests
/// start several servers in one process).
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the recorder on first use and returns a handle to it.
    pub fn install() -> Metrics {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new()
                    .set_buckets_for_metric(
                        Matcher::Full(QUERY_DURATION.to_string()),
                        QUERY_DURATION_BUCKETS,
                    )
                    .expect("buckets are not empty")
                    .build_recorder();
                let handle = recorder.handle();
                // Another recorder may already be installed (embedding apps).
                if metrics::set_global_recorder(recorder).is_ok() {
                    describe_all();
                }
                handle
            })
            .clone();
        Metrics { handle }
    }

    /// Moves recorded histogram samples into their buckets: without it
    /// they pile up in memory until the next scrape (or forever if none
    /// comes).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Prometheus exposition text.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    pub fn client_connected(&self, group: &str) {
        metrics::gauge!("reprise_client_connections", "group" => group.to_string()).increment(1.0);
        metrics::counter!("reprise_client_connections_total", "group" => group.to_string())
            .increment(1);
    }

    pub fn client_disconnected(&self, group: &str) {
        metrics::gauge!("reprise_client_connections", "group" => group.to_string()).decrement(1.0);
    }
}

/// Gives every metric of the catalog its help text.
fn describe_all() {
    for m in CATALOG {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_names_are_unique_prefixed_and_lint_clean() {
        let mut seen = std::collections::HashSet::new();
        for m in CATALOG {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("reprise_"), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            assert!(!m.name.ends_with("_ms"), "{}: use base units", m.name);
            assert!(!m.help.is_empty());
        }
    }
}
