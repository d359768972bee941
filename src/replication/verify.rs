//! VERIFY: proof that the copies are identical. A checksum entry written
//! through the log makes every node compute per-table row counts and
//! checksums at the same seq; the proxy then compares them.

use serde::Serialize;

/// One table on one node.
#[derive(Debug, Clone, Serialize)]
pub struct TableCheck {
    pub table: String,
    pub node: String,
    pub rows: Option<i64>,
    pub checksum: Option<String>,
    /// `match`, `MISMATCH`, or why the node could not be compared.
    pub result: String,
}

/// The outcome of one VERIFY.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub group: String,
    pub seq: u64,
    pub at_ms: i64,
    pub checks: Vec<TableCheck>,
}

/// What /status shows of the last VERIFY.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seq: u64,
    pub at_ms: i64,
    pub tables: usize,
    pub mismatches: usize,
    /// `table@node` of each mismatch.
    pub mismatched: Vec<String>,
}

impl Report {
    pub fn summary(&self) -> Summary {
        let bad: Vec<&TableCheck> = self.checks.iter().filter(|c| c.result != "match").collect();
        let mut tables: Vec<&str> = self.checks.iter().map(|c| c.table.as_str()).collect();
        tables.sort();
        tables.dedup();
        Summary {
            seq: self.seq,
            at_ms: self.at_ms,
            tables: tables.len(),
            mismatches: bad.len(),
            mismatched: bad
                .iter()
                .map(|c| format!("{}@{}", c.table, c.node))
                .collect(),
        }
    }
}

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::group::{Group, NodeState};
use crate::replication::{Entry, EntryHeader};

/// A node's (rows, checksum) per table.
type Checksums = BTreeMap<String, (i64, String)>;

/// How long VERIFY waits for the subscribers to reach the checksum entry.
pub const WAIT: Duration = Duration::from_secs(30);

/// Writes a checksum entry through the log, waits until every live
/// subscriber applied it, and compares every node with the primary.
pub async fn verify(group: &Arc<Group>, wait: Duration) -> Result<Arc<Report>, String> {
    let (term, primary) = (group.term(), group.primary());
    let node = group.node(primary);
    if !node.is_reachable() {
        return Err(format!(
            "the primary {} is {}",
            node.name,
            node.state().as_str()
        ));
    }
    let id = (rand::random::<u64>() >> 1) as i64;
    let seq = append_checksum(group, &node.target, term, id).await?;
    group.observe_head(term, seq);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = group.applied_notify.notified();
        let waiting = group.members().iter().any(|n| {
            matches!(n.state(), NodeState::Up | NodeState::CatchingUp) && n.applied() < seq
        });
        if !waiting {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    let mut results: Vec<(String, Result<Checksums, String>)> = Vec::new();
    for (i, n) in group.nodes().iter().enumerate() {
        if n.is_removed() {
            continue;
        }
        let r = if i != primary && n.applied() < seq {
            Err(format!(
                "not compared: {} at seq {} (the checksum is at {seq})",
                n.state().as_str(),
                n.applied()
            ))
        } else {
            read_checksums(&n.control, &n.target, id).await
        };
        results.push((n.name.clone(), r));
    }
    if let Some((_, Err(e))) = results.iter().find(|(n, _)| *n == node.name) {
        return Err(format!("reading the primary's checksums: {e}"));
    }
    let checks = judge(&results, &node.name);
    let report = Arc::new(Report {
        group: group.name.clone(),
        seq,
        at_ms: crate::admin::events::now_ms(),
        checks,
    });
    publish(group, &report);
    let s = report.summary();
    group.stats.journal.record(
        None,
        "verify",
        if s.mismatches == 0 {
            format!("seq {}: {} tables match on every node", s.seq, s.tables)
        } else {
            format!("seq {}: MISMATCH {}", s.seq, s.mismatched.join(", "))
        },
    );
    *group.last_verify.lock().expect("verify") = Some(report.clone());
    Ok(report)
}

/// Compares the nodes table by table. The reference for a table is the
/// (rows, checksum) most nodes agree on — so a copy changed behind the
/// proxy is the one reported, even when it is the primary — and the
/// primary's when there is no majority. A table missing on a node is a
/// mismatch there; a node that could not be read is reported with why.
fn judge(results: &[(String, Result<Checksums, String>)], primary: &str) -> Vec<TableCheck> {
    let mut tables: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flat_map(|m| m.keys())
        .collect();
    tables.sort();
    tables.dedup();
    let mut checks = Vec::new();
    for table in tables {
        let values: Vec<(&str, Option<&(i64, String)>)> = results
            .iter()
            .filter_map(|(n, r)| r.as_ref().ok().map(|m| (n.as_str(), m.get(table))))
            .collect();
        let count = |v: Option<&(i64, String)>| values.iter().filter(|(_, x)| *x == v).count();
        let primary_value = values
            .iter()
            .find(|(n, _)| *n == primary)
            .and_then(|(_, v)| *v);
        let best = values.iter().map(|(_, v)| count(*v)).max().unwrap_or(0);
        let leaders: Vec<Option<&(i64, String)>> = values
            .iter()
            .map(|(_, v)| *v)
            .filter(|v| count(*v) == best)
            .collect();
        let reference = if leaders.iter().all(|v| *v == leaders[0]) {
            leaders[0]
        } else {
            primary_value
        };
        for (name, r) in results {
            let (rows, checksum, result) = match r {
                Err(e) => (None, None, e.clone()),
                Ok(m) => {
                    let mine = m.get(table);
                    let ok = mine.is_some() && mine == reference;
                    (
                        mine.map(|v| v.0),
                        mine.map(|v| v.1.clone()),
                        if ok { "match" } else { "MISMATCH" }.to_string(),
                    )
                }
            };
            checks.push(TableCheck {
                table: table.clone(),
                node: name.clone(),
                rows,
                checksum,
                result,
            });
        }
    }
    checks
}

/// The checksum entry, committed on the primary under the exclusive write
/// lock like any write transaction; returns its seq.
async fn append_checksum(
    group: &Group,
    target: &crate::backend::Target,
    term: u64,
    id: i64,
) -> Result<u64, String> {
    let (client, conn) = crate::group::health::connect_config(target)
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let e = |e: tokio_postgres::Error| e.to_string();
    client.batch_execute("BEGIN").await.map_err(e)?;
    let row = client
        .query_one(&super::lock_query(&group.name), &[])
        .await
        .map_err(e)?;
    let now: String = row.get(1);
    let sql = format!("SELECT reprise.checksum_tables({id})");
    client.simple_query(&sql).await.map_err(e)?;
    let mut messages = bytes::BytesMut::new();
    crate::wire::messages::put_message(b'Q', format!("{sql}\0").as_bytes(), &mut messages);
    let entry = Entry {
        header: EntryHeader {
            now,
            settings: Vec::new(),
            tags: vec!["SELECT 1".into()],
            kind: String::new(),
            prepares: Vec::new(),
        },
        messages: messages.freeze(),
    };
    let seq: i64 = client
        .query_one(
            "SELECT reprise.append($1, $2, NULL::text)",
            &[&(term as i64), &entry.encode().to_vec()],
        )
        .await
        .map_err(e)?
        .get(0);
    client.batch_execute("COMMIT").await.map_err(e)?;
    Ok(seq as u64)
}

async fn read_checksums(
    conn: &crate::group::health::ControlConn,
    target: &crate::backend::Target,
    id: i64,
) -> Result<Checksums, String> {
    let client = conn.get(target).await.map_err(|e| e.to_string())?;
    let rows = client
        .query(
            "SELECT tbl, row_count, checksum FROM reprise.checksum WHERE verify_id = $1",
            &[&id],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2))))
        .collect())
}

/// Metrics of a VERIFY: runs, and mismatched tables per node.
fn publish(group: &Group, report: &Report) {
    metrics::counter!("reprise_verify_runs_total", "group" => group.name.clone()).increment(1);
    metrics::gauge!("reprise_verify_seq", "group" => group.name.clone()).set(report.seq as f64);
    for n in group.members() {
        let bad = report
            .checks
            .iter()
            .filter(|c| c.node == n.name && c.result != "match")
            .count();
        metrics::gauge!("reprise_verify_mismatched_tables",
            "group" => group.name.clone(), "node" => n.name.clone())
        .set(bad as f64);
    }
}

/// Runs VERIFY every `every` until the group stops.
pub async fn schedule(group: Arc<Group>, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match verify(&group, WAIT).await {
            Ok(r) => {
                let s = r.summary();
                if s.mismatches > 0 {
                    tracing::error!(group = %group.name, seq = s.seq, mismatched = ?s.mismatched, "VERIFY found differences");
                } else {
                    tracing::info!(group = %group.name, seq = s.seq, tables = s.tables, "VERIFY: every copy matches");
                }
            }
            Err(e) => {
                tracing::warn!(group = %group.name, error = %e, "scheduled VERIFY could not run")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, tables: &[(&str, i64, &str)]) -> (String, Result<Checksums, String>) {
        (
            name.to_string(),
            Ok(tables
                .iter()
                .map(|(t, n, c)| (t.to_string(), (*n, c.to_string())))
                .collect()),
        )
    }

    fn bad(checks: &[TableCheck]) -> Vec<(String, String)> {
        checks
            .iter()
            .filter(|c| c.result != "match")
            .map(|c| (c.table.clone(), c.node.clone()))
            .collect()
    }

    #[test]
    fn the_copy_that_differs_is_reported_even_the_primary() {
        let same = [("a", 1, "x"), ("b", 2, "y")];
        let results = vec![
            node("p", &[("a", 1, "CHANGED"), ("b", 2, "y")]),
            node("s1", &same),
            node("s2", &same),
        ];
        assert_eq!(bad(&judge(&results, "p")), [("a".into(), "p".into())]);
        let results = vec![
            node("p", &same),
            node("s1", &[("a", 1, "x")]),
            node("s2", &same),
        ];
        assert_eq!(bad(&judge(&results, "p")), [("b".into(), "s1".into())]);
    }

    #[test]
    fn without_a_majority_the_primary_decides_and_unread_nodes_say_why() {
        let results = vec![
            node("p", &[("a", 1, "x")]),
            node("s1", &[("a", 1, "other")]),
            ("s2".to_string(), Err("not compared: down".to_string())),
        ];
        let checks = judge(&results, "p");
        assert_eq!(
            bad(&checks),
            [("a".into(), "s1".into()), ("a".into(), "s2".into())]
        );
        assert_eq!(checks[2].result, "not compared: down");
    }
}
