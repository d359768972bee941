//! Observability against real nodes: `/metrics` passes `promtool check
//! metrics` and carries every series Reprise documents, the Grafana
//! dashboard only queries series that exist, `SHOW STATS` counts what the
//! clients did, and `/status` and `/status/history` carry the events and
//! the lag history the status page draws.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use reprise::admin::metrics::{CATALOG, Kind};

const TEST_LIMIT: Duration = Duration::from_secs(240);

/// Some reads, commits, a rollback and a unique violation through the
/// proxy; returns once every node applied the writes.
async fn traffic(g: &TestGroup) {
    let c = g.proxy.client("app").await;
    for _ in 0..20 {
        c.simple_query("SELECT count(*) FROM items").await.unwrap();
    }
    c.execute("INSERT INTO notes (body) VALUES ('autocommit')", &[])
        .await
        .unwrap();
    // (COMMIT in a query of its own: the proxy logs the transaction first.)
    for sql in [
        "BEGIN",
        "INSERT INTO notes (body) VALUES ('kept')",
        "COMMIT",
        "BEGIN",
        "INSERT INTO notes (body) VALUES ('dropped')",
        "ROLLBACK",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let e = c
        .execute("INSERT INTO items (id, name) VALUES (1, 'duplicate')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    // The error arrives before the unit's ReadyForQuery: one more round
    // trip makes sure that unit is over.
    c.simple_query("SELECT 1").await.unwrap();
    let n = g.cluster.nodes.len();
    let all: Vec<usize> = (0..n).collect();
    wait_caught_up(g, &all, Duration::from_secs(30))
        .await
        .expect("every node applies the writes");
}

/// Metric names in exposition text (a histogram's `_bucket`, `_sum` and
/// `_count` series count under its own name too).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        names.insert(line[..end].to_string());
    }
    names
}

/// The value of the first series line starting with `prefix` (name and labels).
fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `reprise_…` identifiers in a PromQL expression.
fn metric_refs(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("reprise_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn promtool() -> std::path::PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join("promtool");
        if p.is_file() {
            return p;
        }
    }
    panic!("promtool is not installed: run scripts/install-deps (Debian package `prometheus`)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_the_dashboard_queries_only_exported_series() {
    let promtool = promtool();
    bounded(TEST_LIMIT, async move {
        let g = TestGroup::start(2, |_| {}).await;
        traffic(&g).await;
        let text = g.proxy.http_get("/metrics").await;

        // The exposition is valid and lint-clean.
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}\n--- /metrics ---\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        // Every documented series is there, before any failover or
        // divergence happened.
        let names = exported_names(&text);
        for m in CATALOG {
            assert!(
                names.contains(m.name),
                "{} missing from /metrics:\n{text}",
                m.name
            );
            if m.kind == Kind::Histogram {
                assert!(
                    text.contains(&format!("# TYPE {} histogram", m.name))
                        && text.contains(&format!("{}_bucket{{", m.name)),
                    "{} is not rendered as a histogram with buckets:\n{text}",
                    m.name
                );
            }
        }
        // (The other test's switchover may count in this process's recorder.)
        for series in [
            "reprise_failovers_total{group=\"app\"} 0",
            "reprise_switchovers_total{group=\"app\"} ",
            "reprise_divergence_events_total{group=\"app\",node=\"n2\"} 0",
            "reprise_node_state_changes_total{group=\"app\",node=\"n2\",to=\"divergent\"} 0",
            "reprise_node_primary{group=\"app\",node=\"n1\"} 1",
            "reprise_node_primary{group=\"app\",node=\"n2\"} 0",
            "reprise_node_state{group=\"app\",node=\"n2\",state=\"up\"} 1",
            "reprise_node_state{group=\"app\",node=\"n2\",state=\"down\"} 0",
        ] {
            assert!(text.contains(series), "no `{series}` in /metrics:\n{text}");
        }
        let by_class = value(&text, "reprise_errors_total{group=\"app\",class=\"23\"}");
        assert!(
            by_class >= Some(1.0),
            "the unique violation is counted:\n{text}"
        );
        let reads = value(
            &text,
            "reprise_queries_total{group=\"app\",route=\"subscriber\"}",
        );
        assert!(reads >= Some(1.0), "reads went to the subscriber:\n{text}");
        let writes = value(
            &text,
            "reprise_queries_total{group=\"app\",route=\"primary\"}",
        );
        assert!(writes >= Some(1.0), "writes went to the primary:\n{text}");
        let rollbacks = value(
            &text,
            "reprise_node_transactions_total{group=\"app\",node=\"n1\",outcome=\"rollback\"}",
        );
        assert!(
            rollbacks >= Some(2.0),
            "the ROLLBACK and the failed insert:\n{text}"
        );

        // The dashboard: valid JSON, a Prometheus data source on every
        // query, and only series /metrics exports.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docker/grafana/dashboards/reprise.json"
        );
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
        assert!(dash["title"].is_string() && dash["uid"].is_string());
        let vars = dash["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
            "a Prometheus data source variable"
        );
        let mut used = BTreeSet::new();
        let panels = dash["panels"].as_array().unwrap();
        for p in panels.iter().filter(|p| p["type"] != "row") {
            let title = p["title"].as_str().unwrap();
            assert_eq!(p["datasource"]["type"], "prometheus", "panel {title}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "panel {title} has no query");
            for t in targets {
                let expr = t["expr"].as_str().unwrap();
                let refs = metric_refs(expr);
                assert!(!refs.is_empty(), "panel {title}: {expr}");
                for r in refs {
                    assert!(
                        names.contains(&r),
                        "panel {title} queries {r}, which /metrics does not export"
                    );
                    used.insert(r);
                }
            }
        }
        for wanted in [
            "reprise_node_state",
            "reprise_node_primary",
            "reprise_node_lag_seq",
            "reprise_node_lag_seconds",
            "reprise_node_applied_entries_total",
            "reprise_queries_total",
            "reprise_query_duration_seconds_bucket",
            "reprise_errors_total",
            "reprise_client_connections",
            "reprise_failovers_total",
            "reprise_switchovers_total",
            "reprise_divergence_events_total",
        ] {
            assert!(used.contains(wanted), "no dashboard panel shows {wanted}");
        }
        assert!(
            panels.iter().any(
                |p| p["targets"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t["expr"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("histogram_quantile(0.99"))))
            ),
            "a p99 latency panel"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_counts_traffic_and_status_keeps_events_and_lag_history() {
    bounded(TEST_LIMIT, async move {
        let g = TestGroup::start(2, |_| {}).await;
        traffic(&g).await;

        let rows = admin_named(&g.proxy, "SHOW STATS").await.unwrap();
        assert_eq!(rows.len(), 3, "a group row and one per node: {rows:?}");
        let group = &rows[0];
        assert_eq!(column(group, "group"), "app");
        assert_eq!(column(group, "node"), "", "the group row has no node");
        let num = |r: &[(String, String)], c: &str| -> u64 {
            column(r, c)
                .parse()
                .unwrap_or_else(|_| panic!("{c} of {r:?}"))
        };
        assert!(num(group, "queries") >= 24, "{group:?}");
        assert!(num(group, "commits") >= 2, "{group:?}");
        assert!(num(group, "rollbacks") >= 2, "{group:?}");
        assert!(num(group, "errors") >= 1, "{group:?}");
        assert!(num(group, "bytes_in") > 0 && num(group, "bytes_out") > 0);
        assert!(!column(group, "p99_ms").is_empty(), "{group:?}");
        let n1 = rows.iter().find(|r| column(r, "node") == "n1").unwrap();
        let n2 = rows.iter().find(|r| column(r, "node") == "n2").unwrap();
        assert_eq!(column(n1, "role"), "primary");
        assert_eq!(column(n2, "role"), "subscriber");
        assert!(
            num(n1, "errors") >= 1,
            "the duplicate failed on the primary"
        );
        assert!(num(n2, "queries") >= 1, "reads reached the subscriber");
        assert!(num(n2, "bytes_in") > 0 && num(n2, "bytes_out") > 0);
        assert!(column(n2, "p50_ms").parse::<f64>().is_ok(), "{n2:?}");
        let help = admin(&g.proxy, "HELP").await.unwrap();
        assert!(help.iter().any(|r| r[0] == "SHOW STATS"), "{help:?}");
        let e = admin(&g.proxy, "SHOW STAT").await.unwrap_err();
        assert!(e.contains("SHOW STATS"), "{e}");

        // A switchover is an event; the nodes' state changes are too.
        admin(&g.proxy, "SWITCHOVER app TO n2").await.unwrap();
        let s = g.proxy.status().await;
        assert_eq!(primary_of(&s), "n2");
        let events = s["events"].as_array().expect("events in /status");
        let switch = events
            .iter()
            .find(|e| e["kind"] == "switchover")
            .unwrap_or_else(|| panic!("no switchover event: {events:?}"));
        assert_eq!(switch["group"], "app");
        assert_eq!(switch["node"], "n2");
        assert!(switch["detail"].as_str().unwrap().contains("n1 -> n2"));
        assert!(
            s["groups"][0]["nodes"][0]["applied_seq"].is_u64(),
            "the old shape stays"
        );

        // The lag history fills once a second with every node.
        let sampled = wait_until(Duration::from_secs(10), || async {
            let h: serde_json::Value =
                serde_json::from_str(&g.proxy.http_get("/status/history").await).unwrap();
            h["groups"][0]["samples"]
                .as_array()
                .is_some_and(|s| s.len() >= 2)
        })
        .await;
        assert!(sampled.is_some(), "no lag samples in /status/history");
        let h: serde_json::Value =
            serde_json::from_str(&g.proxy.http_get("/status/history").await).unwrap();
        assert_eq!(h["interval_ms"], 1000);
        assert_eq!(h["groups"][0]["name"], "app");
        let last = h["groups"][0]["samples"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        let nodes: Vec<&str> = last["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap())
            .collect();
        assert_eq!(nodes, ["n1", "n2"]);
        assert!(last["nodes"][0]["lag_seq"].is_u64() && last["at_ms"].is_i64());
    })
    .await;
}
