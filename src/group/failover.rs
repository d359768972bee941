//! Changes of a group's primary and membership: start-up (which node is
//! the primary), failover, switchover, rejoin (fence, then compare logs)
//! and re-seeding. One change at a time per group (`Group::topology`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::timeout;
use tokio_postgres::types::ToSql;

use super::{Group, Node, NodeState};
use crate::config::Config;
use crate::replication::seed;

/// Longest wait for one control query during a change.
const QUERY_LIMIT: Duration = Duration::from_secs(3);

/// What failover, switchover and seeding need from the config.
#[derive(Debug, Clone)]
pub struct Policy {
    pub sync_replicas: usize,
    pub auto_reseed: bool,
    pub pg_bin_dir: Option<String>,
    /// How long writes (and a switchover) wait for a primary.
    pub failover_wait: Duration,
    pub replicating: bool,
}

impl Policy {
    pub fn from_config(c: &Config) -> Policy {
        Policy {
            sync_replicas: c.replication.sync_replicas,
            auto_reseed: c.replication.auto_reseed,
            pg_bin_dir: c.replication.pg_bin_dir.clone(),
            failover_wait: Duration::from_millis(c.health.failover_wait_ms),
            replicating: c.replication.enabled,
        }
    }
}

/// A node's own record of itself, read from its `reprise` schema.
#[derive(Debug, Clone)]
pub struct Position {
    pub term: u64,
    pub role: String,
    /// The primary this node last heard of.
    pub primary: Option<String>,
    pub seq: u64,
    pub hash: String,
    /// The term of the last entry (0: no entry).
    pub last_term: u64,
    /// Tables outside the system and `reprise` schemas.
    pub user_tables: i64,
}

/// Runs one statement on a node's control connection, bounded in time.
async fn control(
    node: &Node,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, String> {
    let run = async {
        let client = node
            .control
            .get(&node.target)
            .await
            .map_err(|e| e.to_string())?;
        client.query(sql, params).await.map_err(|e| e.to_string())
    };
    match timeout(QUERY_LIMIT, run).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => {
            node.control.reset().await;
            Err(format!("node {}: {e}", node.name))
        }
        Err(_) => {
            node.control.reset().await;
            Err(format!(
                "node {}: no answer within {} ms",
                node.name,
                QUERY_LIMIT.as_millis()
            ))
        }
    }
}

/// Where a node is: its term, role and last log entry.
pub async fn position(node: &Node) -> Result<Position, String> {
    let rows = control(
        node,
        "SELECT n.term, n.role, n.primary_node, coalesce(l.seq, 0), coalesce(l.hash, ''), coalesce(l.term, 0), \
         (SELECT count(*) FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace \
          WHERE c.relkind IN ('r', 'p') \
            AND s.nspname NOT IN ('pg_catalog', 'information_schema', 'reprise') \
            AND s.nspname NOT LIKE 'pg\\_toast%' AND s.nspname NOT LIKE 'pg\\_temp%') \
         FROM reprise.node n \
         LEFT JOIN LATERAL (SELECT seq, hash, term FROM reprise.log ORDER BY seq DESC LIMIT 1) l ON true",
        &[],
    )
    .await?;
    let r = rows
        .first()
        .ok_or_else(|| format!("node {}: reprise.node is empty", node.name))?;
    Ok(Position {
        term: r.get::<_, i64>(0) as u64,
        role: r.get(1),
        primary: r.get(2),
        seq: r.get::<_, i64>(3) as u64,
        hash: r.get(4),
        last_term: r.get::<_, i64>(5) as u64,
        user_tables: r.get(6),
    })
}

/// Records a node's role and term (and the primary's name) in the node.
async fn record(node: &Node, term: u64, role: &str, primary: &str) -> Result<(), String> {
    control(
        node,
        "UPDATE reprise.node SET term = $1, role = $2, primary_node = $3",
        &[&(term as i64), &role, &primary],
    )
    .await
    .map(|_| ())
}

/// The hash of entry `seq` on a node, if it has it.
async fn hash_at(node: &Node, seq: u64) -> Result<Option<String>, String> {
    let rows = control(
        node,
        "SELECT hash FROM reprise.log WHERE seq = $1",
        &[&(seq as i64)],
    )
    .await?;
    Ok(rows.first().map(|r| r.get(0)))
}

/// The first seq at which two logs differ, given that they agree on
/// nothing after `differs` (a hash chain: equal at k means equal below k).
async fn first_difference(a: &Node, b: &Node, differs: u64) -> Result<u64, String> {
    let (mut lo, mut hi) = (0u64, differs);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let (x, y) = (hash_at(a, mid).await?, hash_at(b, mid).await?);
        if x.is_some() && x == y {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

/// Decides who is primary when the proxy starts, from what the reachable
/// nodes say about themselves: the node the highest term names; in a new
/// group, the reachable node with the highest priority.
pub async fn choose_primary(group: &Group, positions: &[Option<Position>]) {
    let term = positions
        .iter()
        .flatten()
        .map(|p| p.term)
        .max()
        .unwrap_or(1);
    let claimed = positions.iter().enumerate().find_map(|(i, p)| {
        p.as_ref()
            .filter(|p| p.term == term && p.role == "primary")
            .map(|_| i)
    });
    let named = positions
        .iter()
        .flatten()
        .filter(|p| p.term == term)
        .find_map(|p| p.primary.as_deref().and_then(|n| group.node_index(n)));
    let chosen = claimed.or(named);
    match chosen {
        Some(i) => {
            group.set_primary(i, term);
            if let Some(p) = &positions[i] {
                group.observe_head(term, p.seq);
            }
        }
        None => {
            // A new group: nobody has been primary yet.
            let best = positions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.is_some())
                .max_by_key(|(i, _)| (group.node(*i).priority(), std::cmp::Reverse(*i)))
                .map(|(i, _)| i);
            let Some(i) = best else {
                return;
            };
            let node = &group.node(i);
            if let Err(e) = record(node, term, "primary", &node.name).await {
                tracing::error!(group = %group.name, node = %node.name, error = %e, "could not record the first primary");
            }
            group.set_primary(i, term);
            if let Some(p) = &positions[i] {
                group.observe_head(term, p.seq);
            }
        }
    }
    tracing::info!(group = %group.name, primary = %group.node(group.primary()).name, term, "primary chosen");
}

/// What a returning node needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejoin {
    /// Set this state.
    State(NodeState),
    /// An empty node: fill it from a snapshot.
    Seed,
}

/// A node is reachable again (or at start, or freshly seeded): fences it,
/// compares its log with the primary's and sets the state that follows
/// (`Seed` is left to the caller). Not while a failover or switchover is
/// choosing the primary.
pub async fn rejoin(group: &Group, index: usize) -> Result<Rejoin, String> {
    let change = group.topology.lock().await;
    let outcome = compare(group, index).await;
    drop(change);
    if let Ok(Rejoin::State(s)) = outcome
        && s != NodeState::Divergent
    {
        group.node(index).set_state(s);
    }
    outcome
}

/// Fences node `index` (subscriber, current term), then compares its log
/// with the primary's; marks it divergent if it differs.
async fn compare(group: &Group, index: usize) -> Result<Rejoin, String> {
    let node = &group.node(index);
    let p = group.primary();
    // A node that was never part of the group gets the schema first.
    super::health::install_schema(group, &node.control, node)
        .await
        .map_err(|e| format!("node {}: installing the reprise schema: {e}", node.name))?;
    let pos = position(node).await?;
    if index == p {
        return Ok(Rejoin::State(NodeState::Up));
    }
    let primary = &group.node(p);
    if pos.role != "subscriber"
        || pos.term != group.term()
        || pos.primary.as_deref() != Some(primary.name.as_str())
    {
        record(node, group.term(), "subscriber", &primary.name).await?;
        if pos.role == "primary" {
            tracing::warn!(group = %group.name, node = %node.name, old_term = pos.term, term = group.term(), "demoted a returning primary");
        }
    }
    if !primary.is_up() {
        // Entries of the current term all come from the current primary:
        // such a log is a prefix of its history, and the node may even
        // replace it. Anything older waits for the primary to compare.
        if pos.last_term == group.term() || (pos.seq == 0 && pos.user_tables > 0) {
            return Ok(Rejoin::State(NodeState::CatchingUp));
        }
        return Err(format!(
            "the primary {} is not up to compare with",
            primary.name
        ));
    }
    let head = position(primary).await?;
    if pos.seq == 0 {
        if pos.user_tables == 0 && (head.user_tables > 0 || head.seq > 0) {
            return Ok(Rejoin::Seed);
        }
        return Ok(Rejoin::State(if head.seq == 0 {
            NodeState::Up
        } else {
            NodeState::CatchingUp
        }));
    }
    let theirs = hash_at(primary, pos.seq).await?;
    if theirs.is_none() && pos.seq <= head.seq {
        // The primary's log holds every entry up to its head unless it was
        // trimmed: this node was away longer than the log keeps.
        node.mark_divergent(
            pos.seq as i64 + 1,
            format!(
                "the primary {}'s log no longer holds entry {} (trimmed while this node was away: \
                 replication.log_keep_entries); it must be re-seeded",
                primary.name, pos.seq
            ),
        );
        return Ok(Rejoin::State(NodeState::Divergent));
    }
    if theirs.as_deref() == Some(pos.hash.as_str()) {
        return Ok(Rejoin::State(if pos.seq >= head.seq {
            NodeState::Up
        } else {
            NodeState::CatchingUp
        }));
    }
    let first = first_difference(node, primary, pos.seq).await?;
    let reason = if first > head.seq {
        format!(
            "it has entries {first}..{} that the group never accepted (the primary {} ends at {})",
            pos.seq, primary.name, head.seq
        )
    } else {
        format!(
            "its log differs from the primary {}'s from seq {first} on",
            primary.name
        )
    };
    node.mark_divergent(first as i64, reason);
    Ok(Rejoin::State(NodeState::Divergent))
}

/// Runs a rejoin and applies its outcome; seeding runs in the background.
pub async fn rejoin_and_apply(group: &Arc<Group>, index: usize, policy: &Policy) -> bool {
    let node = &group.node(index);
    match rejoin(group, index).await {
        Ok(Rejoin::State(_)) => true,
        Ok(Rejoin::Seed) => {
            tracing::info!(group = %group.name, node = %node.name, "an empty node joins: seeding it");
            spawn_reseed(group, index, policy);
            true
        }
        Err(e) => {
            tracing::warn!(group = %group.name, node = %node.name, error = %e, "node is reachable but cannot rejoin yet");
            false
        }
    }
}

/// Re-seeds node `index` in the background (it is `seeding` from now on).
fn spawn_reseed(group: &Arc<Group>, index: usize, policy: &Policy) {
    group.node(index).set_state(NodeState::Seeding);
    let (group, policy) = (group.clone(), policy.clone());
    tokio::spawn(async move {
        if let Err(e) = reseed(&group, index, &policy).await {
            tracing::error!(group = %group.name, error = %e, "seeding failed");
        }
    });
}

/// Keeps the log bounded: every second, deletes on every live copy the
/// entries more than `keep` behind the head that every live copy has
/// applied. A copy that is down meanwhile may find its next entries gone
/// when it returns; it is then divergent and re-seeded.
pub async fn trim_log(group: Arc<Group>, keep: u64, mut shutdown: watch::Receiver<bool>) {
    let step = (keep / 10).max(1);
    let mut trimmed = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
        }
        let Some((point, live)) = trim_point(&group, keep) else {
            continue;
        };
        if point < trimmed + step {
            continue;
        }
        let mut done = true;
        for n in &live {
            if let Err(e) = control(
                n,
                "DELETE FROM reprise.log WHERE seq < $1",
                &[&(point as i64)],
            )
            .await
            {
                tracing::warn!(group = %group.name, node = %n.name, error = %e, "log trim failed; will retry");
                done = false;
            }
        }
        if done {
            tracing::debug!(group = %group.name, below = point, "log trimmed");
            trimmed = point;
        }
    }
}

/// The seq below which no live copy needs the log (and that is more than
/// `keep` behind the head), with the live copies; None while the primary
/// is not up.
fn trim_point(group: &Group, keep: u64) -> Option<(u64, Vec<Arc<Node>>)> {
    let p = group.primary();
    if !group.node(p).is_up() {
        return None;
    }
    let mut point = group.head_seq().saturating_sub(keep);
    let mut live = Vec::new();
    for (i, n) in group.nodes().iter().enumerate() {
        if matches!(n.state(), NodeState::Up | NodeState::CatchingUp) {
            if i != p {
                point = point.min(n.applied());
            }
            live.push(n.clone());
        }
    }
    Some((point, live))
}

/// Watches the primary and fails over when it is down; re-seeds divergent
/// nodes when `auto_reseed` is on.
pub async fn supervise(group: Arc<Group>, policy: Policy, mut shutdown: watch::Receiver<bool>) {
    let mut events = group.events();
    let mut last_refusal = String::new();
    loop {
        if group.node(group.primary()).state() == NodeState::Down {
            let _change = group.topology.lock().await;
            if group.node(group.primary()).state() == NodeState::Down {
                match failover(&group, &policy).await {
                    Ok(()) => last_refusal.clear(),
                    Err(e) if e != last_refusal => {
                        tracing::error!(group = %group.name, error = %e, "no failover");
                        group
                            .stats
                            .journal
                            .record(None, "failover_refused", e.clone());
                        last_refusal = e;
                    }
                    Err(_) => {}
                }
            }
        }
        if policy.auto_reseed {
            for (i, n) in group.nodes().iter().enumerate() {
                if n.state() == NodeState::Divergent && i != group.primary() {
                    spawn_reseed(&group, i, &policy);
                }
            }
        }
        tokio::select! {
            r = events.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
        }
    }
}

/// Promotes the most advanced live subscriber. The caller holds
/// `group.topology`.
pub async fn failover(group: &Group, policy: &Policy) -> Result<(), String> {
    let old = group.primary();
    let started = Instant::now();
    let live: Vec<usize> = (0..group.slots())
        .filter(|&i| {
            i != old && matches!(group.node(i).state(), NodeState::Up | NodeState::CatchingUp)
        })
        .collect();
    if live.is_empty() {
        return Err(format!(
            "the primary {} is down and no subscriber is up to replace it",
            group.node(old).name
        ));
    }
    // Stop the candidates' appliers, so their positions hold still.
    let nodes = group.nodes();
    let mut held = Vec::new();
    for &i in &live {
        if let Ok(g) = timeout(QUERY_LIMIT, nodes[i].apply_lock.lock()).await {
            held.push((i, g));
        }
    }
    let mut positions = Vec::new();
    for (i, _) in &held {
        if let Ok(pos) = position(group.node(*i)).await {
            positions.push((*i, pos));
        }
    }
    // Another proxy in front of the same group may have promoted a node
    // already: follow it rather than start a rival term.
    if let Some((i, p)) = positions
        .iter()
        .find(|(_, p)| p.role == "primary" && p.term > group.term())
    {
        group.promote(*i, p.term, p.seq);
        tracing::warn!(group = %group.name, to = %group.node(*i).name, term = p.term, "failover: following a primary another proxy promoted");
        group.stats.journal.record(
            Some(&group.node(*i).name),
            "failover",
            format!(
                "{} -> {} at term {} (promoted by another proxy)",
                group.node(old).name,
                group.node(*i).name,
                p.term
            ),
        );
        return Ok(());
    }
    let max_term = positions
        .iter()
        .map(|(_, p)| p.term)
        .fold(group.term(), u64::max);
    let rank =
        |(i, p): &(usize, Position)| (p.seq, group.node(*i).priority(), std::cmp::Reverse(*i));
    let (new, pos) = positions
        .into_iter()
        .max_by_key(rank)
        .ok_or_else(|| "no subscriber answered".to_string())?;
    let acked = group.acked();
    if policy.sync_replicas > 0 && pos.seq < acked {
        return Err(format!(
            "refusing to promote {}: it has applied up to seq {} but seq {acked} was acknowledged to a client",
            group.node(new).name,
            pos.seq
        ));
    }
    let term = max_term + 1;
    let name = group.node(new).name.clone();
    record(group.node(new), term, "primary", &name).await?;
    for (i, _) in &held {
        if *i != new
            && let Err(e) = record(group.node(*i), term, "subscriber", &name).await
        {
            tracing::warn!(group = %group.name, error = %e, "could not record the new term");
        }
    }
    group.promote(new, term, pos.seq);
    drop(held);
    metrics::counter!("reprise_failovers_total", "group" => group.name.clone()).increment(1);
    group.stats.journal.record(
        Some(&name),
        "failover",
        format!(
            "{} -> {name} at term {term}, seq {}, in {} ms",
            group.node(old).name,
            pos.seq,
            started.elapsed().as_millis()
        ),
    );
    tracing::warn!(
        group = %group.name,
        from = %group.node(old).name,
        to = %name,
        term,
        seq = pos.seq,
        took_ms = started.elapsed().as_millis() as u64,
        "failover: promoted a new primary"
    );
    Ok(())
}

/// A finished switchover.
#[derive(Debug, Clone)]
pub struct Switched {
    pub old: String,
    pub new: String,
    pub term: u64,
    /// How long new writes were held.
    pub pause: Duration,
}

/// Planned change of primary: hold new writes, let in-flight ones finish,
/// wait for the target to catch up, promote it, release the writes.
pub async fn switchover(group: &Group, target: usize, policy: &Policy) -> Result<Switched, String> {
    let _change = group.topology.lock().await;
    let old = group.primary();
    let (from, to) = (&group.node(old), &group.node(target));
    if target == old {
        return Err(format!("{} is already the primary", to.name));
    }
    if !from.is_up() {
        return Err(format!("the primary {} is not up", from.name));
    }
    if !to.is_reachable() {
        return Err(format!(
            "{} is {}; only a node that is up can become the primary",
            to.name,
            to.state().as_str()
        ));
    }
    let started = Instant::now();
    group.pause_writes();
    let result = async {
        let deadline = started + policy.failover_wait;
        while group.inside() > 0 {
            let notified = group.drained.notified();
            if group.inside() == 0 {
                break;
            }
            if timeout(deadline.saturating_duration_since(Instant::now()), notified)
                .await
                .is_err()
            {
                return Err(format!(
                    "{} session(s) still have transactions open on the primary after {} ms",
                    group.inside(),
                    policy.failover_wait.as_millis()
                ));
            }
        }
        tracing::debug!(group = %group.name, waited_ms = started.elapsed().as_millis() as u64, "switchover: no transaction in flight");
        let head = position(from).await?.seq;
        while to.applied() < head {
            let notified = group.applied_notify.notified();
            if to.applied() >= head {
                break;
            }
            if timeout(deadline.saturating_duration_since(Instant::now()), notified)
                .await
                .is_err()
            {
                return Err(format!(
                    "{} did not catch up to seq {head} within {} ms (it is at {})",
                    to.name,
                    policy.failover_wait.as_millis(),
                    to.applied()
                ));
            }
        }
        tracing::debug!(group = %group.name, head, waited_ms = started.elapsed().as_millis() as u64, "switchover: the target caught up");
        let _applier = to.apply_lock.lock().await;
        let pos = position(to).await?;
        tracing::debug!(group = %group.name, waited_ms = started.elapsed().as_millis() as u64, "switchover: the target's applier stopped");
        if pos.seq != head {
            return Err(format!(
                "{} is at seq {} but the primary is at {head}",
                to.name, pos.seq
            ));
        }
        let term = group.term().max(pos.term) + 1;
        // Fence the old primary before the new one takes writes.
        record(from, term, "subscriber", &to.name).await?;
        record(to, term, "primary", &to.name).await?;
        for (i, n) in group.nodes().iter().enumerate() {
            if i != old && i != target && n.is_reachable() {
                let _ = record(n, term, "subscriber", &to.name).await;
            }
        }
        group.promote(target, term, head);
        Ok(term)
    }
    .await;
    group.resume_writes();
    let pause = started.elapsed();
    let term = match result {
        Ok(term) => term,
        Err(e) => {
            group.stats.journal.record(
                Some(&to.name),
                "switchover_failed",
                format!("{} -> {}: {e}", from.name, to.name),
            );
            return Err(e);
        }
    };
    metrics::counter!("reprise_switchovers_total", "group" => group.name.clone()).increment(1);
    group.stats.journal.record(
        Some(&to.name),
        "switchover",
        format!(
            "{} -> {} at term {term}, writes held {} ms",
            from.name,
            to.name,
            pause.as_millis()
        ),
    );
    tracing::info!(group = %group.name, from = %from.name, to = %to.name, term, pause_ms = pause.as_millis() as u64, "switchover done");
    Ok(Switched {
        old: from.name.clone(),
        new: to.name.clone(),
        term,
        pause,
    })
}

/// Fills node `index` from a snapshot of a healthy node, then lets it
/// catch up. The node is `seeding` meanwhile; on failure it is divergent.
pub async fn reseed(group: &Group, index: usize, policy: &Policy) -> Result<seed::Seeded, String> {
    let node = &group.node(index);
    if index == group.primary() {
        return Err(format!(
            "{} is the primary; switch over before re-seeding it",
            node.name
        ));
    }
    node.set_state(NodeState::Seeding);
    *node.divergence.lock().expect("divergence") = None;
    let result = async {
        let _applier = node.apply_lock.lock().await;
        let p = group.primary();
        let source = (0..group.slots())
            .find(|&i| i != index && i != p && group.node(i).is_up())
            .unwrap_or(p);
        let src = &group.node(source);
        if !src.is_up() {
            return Err(format!("no node is up to seed {} from", node.name));
        }
        let bin = seed::bin_dir(policy.pg_bin_dir.as_deref())?;
        let (g, n) = (group.name.clone(), node.name.clone());
        let journal = group.stats.journal.clone();
        let progress = move |step: &str| {
            tracing::info!(group = %g, node = %n, "seeding: {step}");
            journal.record(Some(&n), "seed_progress", step);
        };
        tracing::info!(group = %group.name, node = %node.name, from = %src.name, "seeding from a snapshot");
        group.stats.journal.record(
            Some(&node.name),
            "seed_start",
            format!("from a snapshot of {}", src.name),
        );
        node.control.reset().await;
        let seeded = seed::seed(&src.target, &node.target, group.term(), &bin, &progress).await?;
        node.control.reset().await;
        node.set_applied(seeded.seq);
        Ok(seeded)
    }
    .await;
    match result {
        Ok(seeded) => {
            metrics::counter!("reprise_seeds_total", "group" => group.name.clone()).increment(1);
            tracing::info!(group = %group.name, node = %node.name, seq = seeded.seq, bytes = seeded.bytes, took_ms = seeded.duration.as_millis() as u64, "seeded");
            group.stats.journal.record(
                Some(&node.name),
                "seed_done",
                format!(
                    "at seq {}, {} bytes in {} ms",
                    seeded.seq,
                    seeded.bytes,
                    seeded.duration.as_millis()
                ),
            );
            if !matches!(rejoin(group, index).await, Ok(Rejoin::State(_))) {
                node.set_state(NodeState::CatchingUp);
            }
            Ok(seeded)
        }
        Err(e) => {
            group
                .stats
                .journal
                .record(Some(&node.name), "seed_failed", e.clone());
            node.mark_divergent(0, format!("seeding failed: {e}"));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_reads_the_config() {
        let mut c = Config::parse(
            "[[group]]\nname = \"app\"\n[[group.node]]\nname = \"a\"\n",
            "t.toml",
        )
        .unwrap();
        c.replication.auto_reseed = true;
        c.health.failover_wait_ms = 1234;
        let p = Policy::from_config(&c);
        assert!(p.auto_reseed);
        assert_eq!(p.failover_wait, Duration::from_millis(1234));
        assert_eq!(p.sync_replicas, 0);
    }
}
