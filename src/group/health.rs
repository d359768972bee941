//! One monitor per node: a probe every `interval_ms`, each failing after
//! `timeout_ms`; `failures_before_down` consecutive failures mark the node
//! down, one success marks it up. Probes are started on schedule even while
//! an earlier one hangs, so a paused node (accepting TCP, never answering)
//! is found as fast as a dead one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;
use tokio::time::{MissedTickBehavior, interval, timeout};
use tokio_postgres::Client;

use super::failover::{self, Policy};
use super::{Group, Node, NodeState};
use crate::backend::Target;
use crate::config::HealthConfig;
use crate::route::catalog::FunctionCatalog;

/// A control connection to a node, reconnected on demand.
#[derive(Clone, Default)]
pub struct ControlConn {
    client: Arc<Mutex<Option<Arc<Client>>>>,
}

impl ControlConn {
    /// The connection, opened if needed.
    pub async fn get(&self, target: &Target) -> Result<Arc<Client>, tokio_postgres::Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let (client, conn) = connect_config(target)
            .connect(target.tls.connector())
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Drops the connection so the next use reconnects.
    pub async fn reset(&self) {
        *self.client.lock().await = None;
    }
}

/// tokio-postgres settings for a node; connect with
/// `target.tls.connector()`.
pub fn connect_config(target: &Target) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(&target.host)
        .port(target.port)
        .ssl_mode(target.tls.pg_mode(&target.host))
        .user(&target.user)
        .dbname(&target.dbname)
        .application_name("reprise-control")
        .connect_timeout(Duration::from_secs(5));
    if !target.password.is_empty() {
        c.password(&target.password);
    }
    c
}

/// A tokio-postgres error with what caused it: the server's message, or
/// the chain of sources (its own text is only the kind, such as "error
/// performing TLS handshake").
pub fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

/// One probe: a round trip on the control connection.
async fn probe(conn: &ControlConn, node: &Node) -> Result<(), String> {
    let client = conn.get(&node.target).await.map_err(|e| error_text(&e))?;
    client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| error_text(&e))
}

/// Probes once with the timeout, resetting the connection on failure.
pub async fn probe_once(conn: &ControlConn, node: &Node, limit: Duration) -> Result<(), String> {
    let r = match timeout(limit, probe(conn, node)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    };
    if r.is_err() {
        conn.reset().await;
    }
    r
}

/// Counts consecutive failures and decides the state: the pure part.
#[derive(Debug, Clone)]
pub struct Verdict {
    failures: u32,
    threshold: u32,
}

impl Verdict {
    pub fn new(threshold: u32) -> Verdict {
        Verdict {
            failures: 0,
            threshold,
        }
    }

    /// Feeds one probe result; returns the state to set, if it changes.
    pub fn observe(&mut self, ok: bool, current: NodeState) -> Option<NodeState> {
        if ok {
            self.failures = 0;
            (current == NodeState::Down).then_some(NodeState::Up)
        } else {
            self.failures = self.failures.saturating_add(1);
            (self.failures >= self.threshold
                && !matches!(
                    current,
                    NodeState::Down | NodeState::Divergent | NodeState::Seeding
                ))
            .then_some(NodeState::Down)
        }
    }

    /// Failed probes not yet enough to mark the node down: confirm quickly.
    pub fn confirming(&self) -> bool {
        self.failures > 0 && self.failures < self.threshold
    }
}

/// Runs a node's monitor until `shutdown` turns true. A node found up
/// again after being down rejoins (fenced, then compared with the
/// primary) before it serves anything.
pub async fn monitor(
    group: Arc<Group>,
    index: usize,
    health: HealthConfig,
    policy: Policy,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = group.node(index).clone();
    let conn = node.control.clone();
    let limit = Duration::from_millis(health.timeout_ms);
    let mut tick = interval(Duration::from_millis(health.interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut verdict = Verdict::new(health.failures_before_down);
    let mut probes = JoinSet::new();
    let mut catalog_loaded = false;
    // Tables changed behind the proxy's back show up at the next reload.
    let mut rel_loaded_at = tokio::time::Instant::now();
    let spawn_probe = |probes: &mut JoinSet<_>, delay: Duration| {
        let (conn, node) = (conn.clone(), node.clone());
        probes.spawn(async move {
            tokio::time::sleep(delay).await;
            probe_once(&conn, &node, limit).await
        });
    };
    loop {
        tokio::select! {
            _ = tick.tick() => spawn_probe(&mut probes, Duration::ZERO),
            _ = group.rel_wanted.notified(), if index == group.primary() => {
                // A session writes to a table the catalog does not know.
                if index != group.primary() {
                    // Switched over since this wait began: this node may not
                    // have applied the change the session asks about yet.
                    // The new primary's monitor takes the request.
                    group.rel_wanted.notify_one();
                } else if node.is_reachable() {
                    group.take_rel_catalog_request();
                    load_rel_catalog(&group, &conn, &node).await;
                    rel_loaded_at = tokio::time::Instant::now();
                }
            }
            _ = node.suspect.notified() => {
                // A session saw a refused or reset connection: confirm now.
                if node.is_reachable() && !verdict.confirming() {
                    spawn_probe(&mut probes, Duration::ZERO);
                }
            }
            Some(done) = probes.join_next() => {
                let result = done.unwrap_or_else(|e| Err(e.to_string()));
                if let Err(e) = &result {
                    tracing::debug!(group = %group.name, node = %node.name, error = %e, "probe failed");
                }
                match verdict.observe(result.is_ok(), node.state()) {
                    Some(NodeState::Down) => {
                        let why = result.err().unwrap_or_default();
                        tracing::warn!(group = %group.name, node = %node.name, error = %why, "node is down");
                        node.set_state(NodeState::Down);
                        group.stats.journal.record(
                            Some(&node.name),
                            "health",
                            format!("{} failed probes: {why}", health.failures_before_down),
                        );
                    }
                    Some(_) => {
                        // Still down if it cannot rejoin yet: the next
                        // probe tries again.
                        failover::rejoin_and_apply(&group, index, &policy).await;
                    }
                    None if verdict.confirming() && probes.len() < 4 => {
                        spawn_probe(&mut probes, Duration::from_millis(50));
                    }
                    None => {}
                }
                if node.is_reachable() && index == group.primary() {
                    if !catalog_loaded {
                        catalog_loaded = load_catalog(&group, &conn, &node).await;
                    }
                    if group.rel_catalog().is_none()
                        || rel_loaded_at.elapsed() >= REL_CATALOG_REFRESH
                        || group.take_rel_catalog_request()
                    {
                        load_rel_catalog(&group, &conn, &node).await;
                        rel_loaded_at = tokio::time::Instant::now();
                    }
                }
            }
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() { break; }
            }
        }
    }
    probes.abort_all();
}

/// How often the primary's monitor reloads the table catalog, so tables
/// created or altered directly on the nodes are known.
const REL_CATALOG_REFRESH: Duration = Duration::from_secs(10);

/// Loads the table catalog (unique keys, defaults, triggers) from a node.
pub async fn load_rel_catalog(group: &Group, conn: &ControlConn, node: &Node) {
    let epoch = group.rel_epoch();
    let Ok(client) = conn.get(&node.target).await else {
        return;
    };
    use crate::replication::rowlocal::RelCatalog;
    let loaded = match client.query(RelCatalog::LOAD_SQL, &[]).await {
        Ok(mut rows) => client.query(RelCatalog::VIEWS_SQL, &[]).await.map(|views| {
            rows.extend(views);
            rows
        }),
        Err(e) => Err(e),
    };
    match loaded {
        Ok(rows) => {
            let rows = rows.iter().map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                    r.get(6),
                )
            });
            group.set_rel_catalog(epoch, RelCatalog::from_full_rows(rows));
        }
        Err(e) => {
            tracing::warn!(group = %group.name, node = %node.name, error = %e, "could not load the table catalog");
        }
    }
}

/// Loads function volatility from a node into the group's classifier.
pub async fn load_catalog(group: &Group, conn: &ControlConn, node: &Node) -> bool {
    let Ok(client) = conn.get(&node.target).await else {
        return false;
    };
    match client.query(FunctionCatalog::LOAD_SQL, &[]).await {
        Ok(rows) => {
            let rows = rows.iter().map(|r| {
                let vol: i8 = r.get(2);
                (
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    vol as u8 as char,
                )
            });
            group
                .classifier
                .set_catalog(FunctionCatalog::from_rows(rows));
            true
        }
        Err(e) => {
            tracing::warn!(group = %group.name, node = %node.name, error = %e, "could not load the function catalog");
            false
        }
    }
}

/// Installs the `reprise` schema if missing, or upgrades it.
pub async fn install_schema(
    group: &Group,
    conn: &ControlConn,
    node: &Node,
) -> Result<(), tokio_postgres::Error> {
    let client = conn.get(&node.target).await?;
    let exists = client
        .query_one("SELECT to_regclass('reprise.log') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0);
    if !exists {
        tracing::info!(group = %group.name, node = %node.name, "installing the reprise schema");
    }
    // Idempotent: creates what is missing and upgrades the functions —
    // without a NOTICE in the proxy's log for each part that exists.
    client
        .batch_execute("SET client_min_messages = warning")
        .await?;
    let installed = client.batch_execute(crate::replication::SCHEMA_SQL).await;
    let reset = client.batch_execute("RESET client_min_messages").await;
    installed.and(reset)?;
    // Made before Reprise (writes through it refuse to make them).
    let cached: Vec<String> = client
        .query(
            "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences \
             WHERE cache_size > 1 AND schemaname <> 'reprise' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !cached.is_empty() {
        tracing::warn!(
            group = %group.name,
            node = %node.name,
            sequences = %cached.join(", "),
            "sequences with CACHE above 1: each session takes values from a cache of its own, \
             which replay cannot follow; the copies will differ once two sessions use one \
             (fix: ALTER SEQUENCE … CACHE 1)"
        );
    }
    Ok(())
}

/// Probes every node once, in parallel, installs the schema, chooses the
/// primary from what the nodes record, and lets the others rejoin: the
/// group starts with true states.
pub async fn initial_probe(group: &Arc<Group>, health: &HealthConfig, policy: &Policy) {
    let limit = Duration::from_millis(health.timeout_ms);
    let mut set = JoinSet::new();
    for (i, node) in group.nodes().iter().enumerate() {
        let (node, group) = (node.clone(), group.clone());
        set.spawn(async move {
            let ok = probe_once(&node.control, &node, limit).await;
            if let Err(e) = &ok {
                tracing::warn!(group = %group.name, node = %node.name, error = %e, "node is not reachable at start");
                node.set_state(NodeState::Down);
                return (i, None);
            }
            if let Err(e) = install_schema(&group, &node.control, &node).await {
                tracing::error!(group = %group.name, node = %node.name, error = %e, "could not install the reprise schema");
                node.set_state(NodeState::Down);
                return (i, None);
            }
            match failover::position(&node).await {
                Ok(p) => {
                    node.set_applied(p.seq);
                    (i, Some(p))
                }
                Err(e) => {
                    tracing::error!(group = %group.name, node = %node.name, error = %e, "could not read the node's position");
                    node.set_state(NodeState::Down);
                    (i, None)
                }
            }
        });
    }
    let mut positions = vec![None; group.slots()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, p)) = done {
            positions[i] = p;
        }
    }
    failover::choose_primary(group, &positions).await;
    let p = group.primary();
    if policy.sync_replicas > 0 {
        // What an earlier proxy acknowledged is unknown; every acknowledged
        // commit is on some subscriber, so the furthest one bounds it.
        let furthest = positions
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != p)
            .filter_map(|(_, pos)| pos.as_ref().map(|pos| pos.seq))
            .max()
            .unwrap_or(0);
        group.note_acked(furthest);
    }
    if positions[p].is_some() {
        group.node(p).set_state(NodeState::Up);
        load_catalog(group, &group.node(p).control, group.node(p)).await;
        load_rel_catalog(group, &group.node(p).control, group.node(p)).await;
    } else {
        group.node(p).set_state(NodeState::Down);
    }
    for (i, pos) in positions.iter().enumerate() {
        if i != p && pos.is_some() && !failover::rejoin_and_apply(group, i, policy).await {
            group.node(i).set_state(NodeState::Down);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_after_threshold_up_after_one_success() {
        let mut v = Verdict::new(3);
        let mut s = NodeState::Up;
        for expect in [None, None, Some(NodeState::Down)] {
            let r = v.observe(false, s);
            assert_eq!(r, expect);
            if let Some(n) = r {
                s = n;
            }
        }
        assert_eq!(v.observe(false, s), None);
        assert_eq!(v.observe(true, s), Some(NodeState::Up));
        s = NodeState::Up;
        // A single failure between successes does not mark it down.
        assert_eq!(v.observe(false, s), None);
        assert_eq!(v.observe(true, s), None);
        assert_eq!(v.observe(false, s), None);
        assert_eq!(v.observe(false, s), None);
    }
}
