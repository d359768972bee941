//! The redundancy group: its nodes, their states and roles, and the choice
//! of node for each unit of work.

pub mod failover;
pub mod health;
pub mod slots;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use metrics::{Counter, Gauge};
use serde::Serialize;
use tokio::sync::watch;

use crate::backend::Target;
use crate::config::{GroupConfig, NodeConfig};
use crate::route::Classifier;
use crate::route::catalog::FunctionCatalog;
use crate::route::policy::{Candidate, least_outstanding_of};

/// A node's health as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Up = 0,
    Down = 1,
    /// Reachable and replaying a backlog.
    CatchingUp = 2,
    /// Its copy stopped matching the primary: it needs re-seeding.
    Divergent = 3,
    /// Being filled from a snapshot of a healthy node.
    Seeding = 4,
    /// Taken out of the group (REMOVE NODE): never routed to, probed or
    /// applied to again; its index is never reused.
    Removed = 5,
}

impl NodeState {
    fn from_u8(v: u8) -> NodeState {
        match v {
            0 => NodeState::Up,
            2 => NodeState::CatchingUp,
            3 => NodeState::Divergent,
            4 => NodeState::Seeding,
            5 => NodeState::Removed,
            _ => NodeState::Down,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
            NodeState::CatchingUp => "catching_up",
            NodeState::Divergent => "divergent",
            NodeState::Seeding => "seeding",
            NodeState::Removed => "removed",
        }
    }
}

/// What a node does in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Subscriber,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Subscriber => "subscriber",
        }
    }
}

/// One node of a group, shared by sessions and monitors.
pub struct Node {
    pub name: String,
    pub group: String,
    pub config: NodeConfig,
    pub target: Target,
    state: AtomicU8,
    /// Client units sent to this node and not yet answered.
    pub outstanding: AtomicUsize,
    pub queries: Counter,
    up_gauge: Gauge,
    applied: AtomicU64,
    applied_commit_ms: AtomicI64,
    applied_gauge: Gauge,
    applied_total: Counter,
    /// Why the node is divergent, and at which seq.
    pub divergence: std::sync::Mutex<Option<(i64, String)>>,
    /// The group's change counter, bumped by every state change.
    events: Arc<watch::Sender<u64>>,
    /// Held by the applier while it replays, and by a promotion, so a node
    /// never takes writes while entries of the old primary are still
    /// being applied to it.
    pub apply_lock: tokio::sync::Mutex<()>,
    /// The proxy's control connection to the node (probes, promotion).
    pub control: health::ControlConn,
    /// A session saw the node refuse or reset a connection: probe now.
    pub suspect: tokio::sync::Notify,
    /// Share of autocommit reads (changed at run time by RELOAD).
    weight: std::sync::atomic::AtomicU32,
    /// Failover tie-break (changed at run time by RELOAD).
    priority: std::sync::atomic::AtomicI32,
    /// Turns true when the node leaves the group: its monitor and applier
    /// stop.
    stop: watch::Sender<bool>,
    /// Backend connections open to it for client sessions.
    connections: Arc<AtomicUsize>,
    /// Traffic counters and latency (SHOW STATS, /metrics).
    pub stats: crate::admin::stats::NodeStats,
    /// The group's recent events (state changes are recorded here).
    journal: Arc<crate::admin::events::Journal>,
}

impl Node {
    fn new(
        group: &GroupConfig,
        config: &NodeConfig,
        events: Arc<watch::Sender<u64>>,
        journal: Arc<crate::admin::events::Journal>,
    ) -> Node {
        let labels = [("group", group.name.clone()), ("node", config.name.clone())];
        Node {
            name: config.name.clone(),
            group: group.name.clone(),
            target: Target {
                host: config.host.clone(),
                port: config.port,
                user: config.user.clone(),
                password: config.password.clone(),
                dbname: config.dbname(&group.name).to_string(),
                tls: crate::backend::tls::NodeTls::from_config(config).unwrap_or_else(|e| {
                    // Validated at load; a CA file that went bad since makes
                    // every connection refuse the node rather than skip TLS.
                    tracing::error!(node = %config.name, error = %e, "sslrootcert");
                    crate::backend::tls::NodeTls::unusable(
                        config.sslmode,
                        config.sslrootcert.as_deref(),
                    )
                }),
            },
            config: config.clone(),
            state: AtomicU8::new(NodeState::Up as u8),
            outstanding: AtomicUsize::new(0),
            queries: metrics::counter!("reprise_node_queries_total", &labels),
            up_gauge: metrics::gauge!("reprise_node_up", &labels),
            applied: AtomicU64::new(0),
            applied_commit_ms: AtomicI64::new(0),
            applied_gauge: metrics::gauge!("reprise_node_applied_seq", &labels),
            applied_total: metrics::counter!("reprise_node_applied_entries_total", &labels),
            divergence: std::sync::Mutex::new(None),
            events,
            apply_lock: tokio::sync::Mutex::new(()),
            control: health::ControlConn::default(),
            suspect: tokio::sync::Notify::new(),
            weight: std::sync::atomic::AtomicU32::new(config.weight),
            priority: std::sync::atomic::AtomicI32::new(config.priority),
            stop: watch::channel(false).0,
            connections: Arc::new(AtomicUsize::new(0)),
            stats: crate::admin::stats::NodeStats::new(&group.name, &config.name),
            journal,
        }
    }

    /// A seat for one more backend connection, unless the node's
    /// `max_connections` are all taken.
    pub fn connection_seat(&self) -> Option<Seat> {
        Seat::take(&self.connections, self.config.max_connections)
    }

    /// Backend connections open to the node for client sessions.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Share of autocommit reads; 0 means never.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Failover tie-break: higher wins.
    pub fn priority(&self) -> i32 {
        self.priority.load(Ordering::Relaxed)
    }

    /// Applies a changed weight and priority (RELOAD).
    pub fn set_weights(&self, weight: u32, priority: i32) {
        self.weight.store(weight, Ordering::Relaxed);
        self.priority.store(priority, Ordering::Relaxed);
    }

    /// Turns true when the node is removed from its group or the server
    /// stops (`server_stop` is the server's own stop signal).
    pub fn stop_signal(&self, server_stop: watch::Receiver<bool>) -> watch::Receiver<bool> {
        stop_with(&self.stop, server_stop)
    }

    /// Whether the node was removed from its group.
    pub fn is_removed(&self) -> bool {
        self.state() == NodeState::Removed
    }

    pub fn state(&self) -> NodeState {
        NodeState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// The highest seq this node has committed.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn set_applied(&self, seq: u64) {
        let old = self.applied.swap(seq, Ordering::AcqRel);
        if seq > old {
            self.applied_total.increment(seq - old);
        }
        self.applied_gauge.set(seq as f64);
    }

    /// Commit time (ms since the epoch) of the last applied entry.
    pub fn set_applied_commit_ms(&self, ms: i64) {
        self.applied_commit_ms.store(ms, Ordering::Relaxed);
    }

    pub fn applied_commit_ms(&self) -> i64 {
        self.applied_commit_ms.load(Ordering::Relaxed)
    }

    /// The applier found a difference: stop routing here.
    pub fn mark_divergent(&self, seq: i64, reason: String) {
        self.journal.record(
            Some(&self.name),
            "divergence",
            format!("at seq {seq}: {reason}"),
        );
        *self.divergence.lock().expect("divergence") = Some((seq, reason));
        self.set_state(NodeState::Divergent);
        metrics::counter!("reprise_divergence_events_total",
            "group" => self.group.clone(), "node" => self.name.clone())
        .increment(1);
    }

    /// Records a new state; returns the previous one. A divergent node
    /// stays divergent until it is re-seeded (health probes do not clear it).
    pub fn set_state(&self, s: NodeState) -> NodeState {
        // Removal is final: a late probe or applier does not undo it.
        let old = match self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v != NodeState::Removed as u8).then_some(s as u8)
            }) {
            Ok(v) => NodeState::from_u8(v),
            Err(_) => return NodeState::Removed,
        };
        self.up_gauge
            .set(if s == NodeState::Up { 1.0 } else { 0.0 });
        if old != s {
            self.events.send_modify(|v| *v += 1);
            tracing::info!(group = %self.group, node = %self.name, from = old.as_str(), to = s.as_str(), "node state changed");
            self.journal.record(
                Some(&self.name),
                "state",
                format!("{} -> {}", old.as_str(), s.as_str()),
            );
            metrics::counter!("reprise_node_state_changes_total",
                "group" => self.group.clone(), "node" => self.name.clone(), "to" => s.as_str())
            .increment(1);
        }
        old
    }

    pub fn is_up(&self) -> bool {
        self.state() == NodeState::Up
    }

    /// Reachable: up or catching up (the primary and the health monitor
    /// care; reads only go to `Up` nodes).
    pub fn is_reachable(&self) -> bool {
        matches!(self.state(), NodeState::Up | NodeState::CatchingUp)
    }

    /// A unit was sent here.
    pub fn begin_unit(&self) {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.queries.increment(1);
    }

    /// `n` units sent here finished (or were abandoned).
    pub fn end_units(&self, n: usize) {
        if n > 0 {
            let _ = self
                .outstanding
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(n))
                });
        }
    }
}

/// A redundancy group.
pub struct Group {
    pub name: String,
    /// Every node the group ever had, by index: nodes added at run time are
    /// appended, removed ones stay as `Removed` so indexes never move.
    nodes: slots::NodeSlots<Node>,
    /// The group's configuration (nodes as first configured).
    config: GroupConfig,
    /// New work is held by PAUSE (maintenance) until RESUME.
    admin_paused: std::sync::atomic::AtomicBool,
    /// Clients connected to the group.
    clients: Arc<AtomicUsize>,
    /// Snapshots exported (`pg_export_snapshot()`) in transactions still
    /// open, by id: the node that has each.
    exported_snapshots: std::sync::Mutex<rustc_hash::FxHashMap<String, usize>>,
    /// The last VERIFY's result.
    pub last_verify: std::sync::Mutex<Option<Arc<crate::replication::verify::Report>>>,
    /// Turns true when the group is dropped from the configuration.
    retired: watch::Sender<bool>,
    primary: AtomicUsize,
    term: AtomicU64,
    pub classifier: Classifier,
    rotation: AtomicUsize,
    /// Send autocommit reads to subscribers.
    pub read_scaling: bool,
    /// The highest seq known committed on the primary.
    head: AtomicU64,
    /// Woken whenever a node applies entries.
    pub applied_notify: tokio::sync::Notify,
    /// Log rows this proxy's sessions committed lately (see `RecentLog`).
    recent: std::sync::Mutex<crate::replication::RecentLog>,
    /// Woken when a row is published to `recent`.
    pub published: tokio::sync::Notify,
    /// Readers skip subscribers further behind than this (ms).
    pub max_lag_ms: u64,
    /// Tables' unique keys, defaults and triggers, for row-local writes
    /// (None: unknown, every write takes the lock exclusively).
    rel_catalog: std::sync::RwLock<Option<Arc<crate::replication::rowlocal::RelCatalog>>>,
    /// Bumped by every schema change seen, so a catalog loaded before it is
    /// not trusted.
    rel_epoch: AtomicU64,
    /// A reload of the table catalog was asked for.
    rel_reload: std::sync::atomic::AtomicBool,
    /// Wakes the primary's monitor to reload the table catalog now.
    pub rel_wanted: tokio::sync::Notify,
    /// Woken when a table catalog was loaded.
    rel_loaded: tokio::sync::Notify,
    /// Row-locality of statement shapes under the current catalog.
    row_local_cache: std::sync::Mutex<std::collections::HashMap<String, bool>>,
    /// Bumped by every node state change and every promotion.
    events: Arc<watch::Sender<u64>>,
    /// The highest seq acknowledged to a client while `sync_replicas > 0`:
    /// a node that has not applied it must not be promoted.
    acked: AtomicU64,
    /// New write transactions wait (a switchover is under way).
    paused: std::sync::atomic::AtomicBool,
    /// The log head when the current primary was promoted: a commit of an
    /// older term above it was lost with the old primary.
    promoted_at: AtomicU64,
    /// Sessions with work in flight on the primary.
    inside: AtomicUsize,
    /// Woken when `paused` clears (sessions waiting to start work).
    pub gate: tokio::sync::Notify,
    /// Woken when `inside` drops to zero (a switchover waiting for it).
    pub drained: tokio::sync::Notify,
    /// Serialises failovers, switchovers and re-seeds.
    pub topology: tokio::sync::Mutex<()>,
    /// Traffic counters, recent events and lag history.
    pub stats: crate::admin::stats::GroupStats,
    /// ParameterStatus values a node reported to a session, by the
    /// session's startup parameters: later sessions with the same ones are
    /// greeted without opening a backend connection until they need one.
    greetings: std::sync::Mutex<std::collections::HashMap<String, Vec<(String, String)>>>,
}

impl Group {
    /// Snapshot `id` was exported on node `node` (until `forget_snapshots`).
    pub fn snapshot_exported(&self, id: String, node: usize) {
        let mut map = self
            .exported_snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.insert(id, node);
    }

    /// The node holding exported snapshot `id`, if it is known.
    pub fn snapshot_node(&self, id: &str) -> Option<usize> {
        let map = self
            .exported_snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(id).copied()
    }

    /// The exporting transaction of these snapshots ended.
    pub fn forget_snapshots(&self, ids: &[String]) {
        let mut map = self
            .exported_snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for id in ids {
            map.remove(id);
        }
    }

    pub fn new(config: &GroupConfig, read_scaling: bool, max_lag_ms: u64) -> Group {
        let events = Arc::new(watch::channel(0u64).0);
        let stats = crate::admin::stats::GroupStats::new(&config.name);
        Group {
            name: config.name.clone(),
            nodes: slots::NodeSlots::new(
                config
                    .nodes
                    .iter()
                    .map(|n| Arc::new(Node::new(config, n, events.clone(), stats.journal.clone()))),
            ),
            config: config.clone(),
            admin_paused: std::sync::atomic::AtomicBool::new(false),
            last_verify: std::sync::Mutex::new(None),
            clients: Arc::new(AtomicUsize::new(0)),
            exported_snapshots: Default::default(),
            retired: watch::channel(false).0,
            primary: AtomicUsize::new(0),
            term: AtomicU64::new(1),
            classifier: Classifier::new(FunctionCatalog::builtin()),
            rotation: AtomicUsize::new(0),
            read_scaling,
            head: AtomicU64::new(0),
            applied_notify: tokio::sync::Notify::new(),
            recent: Default::default(),
            published: tokio::sync::Notify::new(),
            max_lag_ms,
            rel_catalog: std::sync::RwLock::new(None),
            rel_epoch: AtomicU64::new(0),
            rel_reload: std::sync::atomic::AtomicBool::new(false),
            rel_wanted: tokio::sync::Notify::new(),
            rel_loaded: tokio::sync::Notify::new(),
            row_local_cache: std::sync::Mutex::new(std::collections::HashMap::new()),
            events,
            acked: AtomicU64::new(0),
            paused: std::sync::atomic::AtomicBool::new(false),
            inside: AtomicUsize::new(0),
            promoted_at: AtomicU64::new(u64::MAX),
            gate: tokio::sync::Notify::new(),
            drained: tokio::sync::Notify::new(),
            topology: tokio::sync::Mutex::new(()),
            stats,
            greetings: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The ParameterStatus values for a session with these startup
    /// parameters, if a node reported them before.
    pub fn greeting(&self, params: &[(String, String)]) -> Option<Vec<(String, String)>> {
        let key = greeting_key(params);
        self.greetings.lock().expect("greetings").get(&key).cloned()
    }

    /// Remembers what a node reported for these startup parameters.
    pub fn remember_greeting(&self, params: &[(String, String)], status: Vec<(String, String)>) {
        let mut cache = self.greetings.lock().expect("greetings");
        if cache.len() >= 1000 {
            cache.clear();
        }
        cache.insert(greeting_key(params), status);
    }

    /// A receiver that sees every node state change and promotion.
    pub fn events(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// Returns once `done` holds, looking again at every change (never, if
    /// the group is gone).
    pub async fn until(&self, events: &mut watch::Receiver<u64>, done: impl Fn(&Group) -> bool) {
        while !done(self) {
            if events.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Something changed that sessions and appliers must look at.
    pub fn bump(&self) {
        self.events.send_modify(|v| *v += 1);
    }

    /// Every node by index, removed ones included (check `is_removed`).
    pub fn nodes(&self) -> &slots::NodeSlots<Node> {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Arc<Node> {
        &self.nodes[i]
    }

    /// How many node slots there are (removed nodes included).
    pub fn slots(&self) -> usize {
        self.nodes.len()
    }

    /// Nodes that are members now (not removed).
    pub fn members(&self) -> Vec<Arc<Node>> {
        self.nodes
            .iter()
            .filter(|n| !n.is_removed())
            .cloned()
            .collect()
    }

    /// The configuration the group was created with.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// Index of the member named `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name && !n.is_removed())
    }

    /// Adds a node (in state `Down`, so nothing routes to it until its
    /// monitor and a seed bring it up); returns its index, or None when
    /// the group has used all its node slots.
    pub fn add_node(&self, config: &NodeConfig) -> Option<usize> {
        let node = Arc::new(Node::new(
            &self.config,
            config,
            self.events.clone(),
            self.stats.journal.clone(),
        ));
        node.set_state(NodeState::Down);
        let index = self.nodes.push(node)?;
        self.bump();
        Some(index)
    }

    /// Takes node `i` out of the group: nothing routes to it, and its
    /// monitor and applier stop.
    pub fn remove_node(&self, i: usize) {
        let node = self.node(i);
        node.set_state(NodeState::Removed);
        let _ = node.stop.send(true);
        self.bump();
        self.applied_changed();
    }

    /// The group left the configuration (RELOAD): its tasks stop and its
    /// sessions end.
    pub fn retire(&self) {
        let _ = self.retired.send(true);
        for n in self.nodes.iter() {
            let _ = n.stop.send(true);
        }
        self.bump();
    }

    pub fn is_retired(&self) -> bool {
        *self.retired.borrow()
    }

    /// Turns true when the group is retired or the server stops.
    pub fn stop_signal(&self, server_stop: watch::Receiver<bool>) -> watch::Receiver<bool> {
        stop_with(&self.retired, server_stop)
    }

    /// A seat for one more client, unless `limit` (0: none) are connected.
    pub fn client_seat(&self, limit: usize) -> Option<Seat> {
        Seat::take(&self.clients, limit)
    }

    /// PAUSE: hold new work on the primary until RESUME.
    pub fn admin_pause(&self, on: bool) {
        self.admin_paused.store(on, Ordering::SeqCst);
        if !on {
            self.gate.notify_waiters();
        }
        self.bump();
    }

    pub fn admin_paused(&self) -> bool {
        self.admin_paused.load(Ordering::SeqCst)
    }

    /// A commit at `seq` was acknowledged to a client under sync_replicas.
    pub fn note_acked(&self, seq: u64) {
        self.acked.fetch_max(seq, Ordering::AcqRel);
    }

    /// The highest seq acknowledged under sync_replicas.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Makes node `index` the primary at `term` whose log ends at `head`.
    /// The term is raised first, so no write reaches the new primary with
    /// the old one.
    pub fn promote(&self, index: usize, term: u64, head: u64) {
        self.promoted_at.store(head, Ordering::SeqCst);
        self.term.store(term, Ordering::SeqCst);
        self.head.store(head, Ordering::SeqCst);
        let node = self.node(index);
        node.set_applied(head);
        self.primary.store(index, Ordering::SeqCst);
        // Its log is the group's history now: it is not behind anyone.
        node.set_state(NodeState::Up);
        self.bump();
        self.applied_changed();
    }

    /// The head when the current primary was promoted.
    pub fn promoted_at(&self) -> u64 {
        self.promoted_at.load(Ordering::SeqCst)
    }

    /// Sets the term and primary found at start, without counting a change.
    pub fn set_primary(&self, index: usize, term: u64) {
        self.term.store(term, Ordering::SeqCst);
        self.primary.store(index, Ordering::SeqCst);
    }

    /// Holds new write transactions (switchover); in-flight ones go on.
    pub fn pause_writes(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume_writes(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.gate.notify_waiters();
    }

    pub fn writes_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst) || self.admin_paused()
    }

    /// A session starts work on the primary; false if writes are paused
    /// (the session must wait at the gate and try again).
    pub fn enter(&self) -> bool {
        self.inside.fetch_add(1, Ordering::SeqCst);
        if self.writes_paused() {
            self.leave();
            return false;
        }
        true
    }

    /// A session's work on the primary is finished.
    pub fn leave(&self) {
        if self.inside.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Sessions with work in flight on the primary.
    pub fn inside(&self) -> usize {
        self.inside.load(Ordering::SeqCst)
    }

    /// The table catalog, if it is current.
    pub fn rel_catalog(&self) -> Option<Arc<crate::replication::rowlocal::RelCatalog>> {
        self.rel_catalog.read().expect("rel catalog").clone()
    }

    /// A schema change happened or is about to: forget the table catalog.
    pub fn invalidate_rel_catalog(&self) {
        self.rel_epoch.fetch_add(1, Ordering::AcqRel);
        *self.rel_catalog.write().expect("rel catalog") = None;
        self.row_local_cache
            .lock()
            .expect("row-local cache")
            .clear();
    }

    /// Whether a write statement is row-local, cached by its shape.
    pub fn row_local_cached(&self, sql: &str, compute: impl FnOnce() -> bool) -> bool {
        let key = crate::route::normalize::cache_key(sql);
        if let Some(k) = &key
            && let Some(v) = self.row_local_cache.lock().expect("row-local cache").get(k)
        {
            return *v;
        }
        let epoch = self.rel_epoch();
        let v = compute();
        if let Some(k) = key {
            let mut cache = self.row_local_cache.lock().expect("row-local cache");
            if self.rel_epoch() == epoch {
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(k, v);
            }
        }
        v
    }

    /// A write named a table the catalog does not know: the primary's
    /// monitor reloads it at its next probe.
    pub fn request_rel_catalog(&self) {
        self.rel_reload.store(true, Ordering::Relaxed);
    }

    /// Whether a reload was asked for (and clears the request).
    pub fn take_rel_catalog_request(&self) -> bool {
        self.rel_reload.swap(false, Ordering::Relaxed)
    }

    /// The epoch to pass to `set_rel_catalog` after loading.
    pub fn rel_epoch(&self) -> u64 {
        self.rel_epoch.load(Ordering::Acquire)
    }

    /// Installs a loaded catalog unless the schema changed meanwhile.
    pub fn set_rel_catalog(&self, epoch: u64, c: crate::replication::rowlocal::RelCatalog) {
        {
            let mut slot = self.rel_catalog.write().expect("rel catalog");
            if self.rel_epoch() == epoch {
                *slot = Some(Arc::new(c));
            }
        }
        self.rel_loaded.notify_waiters();
    }

    /// Has the primary's monitor reload the table catalog now and waits
    /// for it (at most `within`); None if no load finished in time.
    ///
    /// Only a load that starts after this call counts: one already under
    /// way may have read the tables before the change that sent the caller
    /// here (a CREATE TABLE that committed while it ran), so the catalog is
    /// invalidated first and such a load is not installed.
    pub async fn fresh_rel_catalog(
        &self,
        within: std::time::Duration,
    ) -> Option<Arc<crate::replication::rowlocal::RelCatalog>> {
        self.invalidate_rel_catalog();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let loaded = self.rel_loaded.notified();
            if let Some(c) = self.rel_catalog() {
                return Some(c);
            }
            self.request_rel_catalog();
            self.rel_wanted.notify_one();
            if tokio::time::timeout_at(deadline, loaded).await.is_err() {
                return self.rel_catalog();
            }
        }
    }

    /// The log head: the highest committed seq seen.
    pub fn head_seq(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Raises the head to `seq`, committed on the primary of `term`, if it
    /// is higher (news from an older term's primary is ignored).
    pub fn observe_head(&self, term: u64, seq: u64) {
        if term != self.term() {
            return;
        }
        self.head.fetch_max(seq, Ordering::AcqRel);
        let p = self.node(self.primary());
        if p.applied() < seq {
            p.set_applied(seq);
        }
    }

    /// A session's transaction committed with this log row on the primary
    /// of `term`: the appliers may replay it without reading it back.
    pub fn publish(&self, term: u64, row: crate::replication::LogRow) {
        if term != self.term() || self.slots() < 2 {
            return;
        }
        self.recent.lock().expect("recent log").publish(term, row);
        self.published.notify_waiters();
    }

    /// Rows published in `term` that continue `seq` (see `RecentLog::after`).
    pub fn recent_after(
        &self,
        term: u64,
        seq: i64,
        max: usize,
    ) -> (Vec<Arc<crate::replication::LogRow>>, bool) {
        let recent = self.recent.lock().expect("recent log");
        let rows = recent.after(term, seq, max);
        let above = rows.is_empty() && recent.has_above(term, seq);
        (rows, above)
    }

    /// Every subscriber applied `seq`: its published rows can go.
    pub fn forget_recent_through(&self, seq: i64) {
        self.recent.lock().expect("recent log").forget_through(seq);
    }

    /// Wakes everyone waiting for nodes to apply entries.
    pub fn applied_changed(&self) {
        self.applied_notify.notify_waiters();
    }

    /// Subscribers that have applied `seq`.
    pub fn subscribers_at(&self, seq: u64) -> usize {
        let p = self.primary();
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != p && !n.is_removed() && n.applied() >= seq)
            .count()
    }

    /// Whether a commit at `seq` may be acknowledged: `need` subscribers
    /// applied it, and no live subscriber is more than `max_lag` entries
    /// behind (flow control: writers slow down to what apply sustains).
    pub fn ack_ready(&self, seq: u64, need: usize, max_lag: u64) -> bool {
        if need > 0 && self.subscribers_at(seq) < need {
            return false;
        }
        if max_lag == 0 {
            return true;
        }
        let p = self.primary();
        self.nodes
            .iter()
            .enumerate()
            .all(|(i, n)| i == p || !n.is_up() || seq.saturating_sub(n.applied()) <= max_lag)
    }

    /// Replication lag of node `i`: (entries, milliseconds).
    pub fn lag(&self, i: usize) -> (u64, u64) {
        let head = self.head_seq();
        let node = &self.nodes[i];
        let seqs = head.saturating_sub(node.applied());
        if seqs == 0 || i == self.primary() {
            return (0, 0);
        }
        let now = crate::admin::events::now_ms();
        let since = node.applied_commit_ms();
        let ms = if since > 0 {
            (now - since).max(0) as u64
        } else {
            0
        };
        (seqs, ms)
    }

    /// Sets the lag and log-size gauges (called before metrics are read).
    pub fn publish_lag(&self) {
        metrics::gauge!("reprise_log_head_seq", "group" => self.name.clone())
            .set(self.head_seq() as f64);
        for (i, n) in self.nodes.iter().enumerate() {
            if n.is_removed() {
                continue;
            }
            let (seqs, ms) = self.lag(i);
            let labels = [("group", self.name.clone()), ("node", n.name.clone())];
            metrics::gauge!("reprise_node_lag_seq", &labels).set(seqs as f64);
            metrics::gauge!("reprise_node_lag_seconds", &labels).set(ms as f64 / 1000.0);
        }
    }

    /// Whether node `i` may serve a read that must see `min_seq`.
    pub fn fresh_enough(&self, i: usize, min_seq: u64) -> bool {
        let node = &self.nodes[i];
        if node.applied() < min_seq {
            return false;
        }
        self.max_lag_ms == 0 || self.lag(i).1 <= self.max_lag_ms
    }

    /// Index of the primary node.
    pub fn primary(&self) -> usize {
        self.primary.load(Ordering::Relaxed)
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Relaxed)
    }

    pub fn role(&self, index: usize) -> Role {
        if index == self.primary() {
            Role::Primary
        } else {
            Role::Subscriber
        }
    }

    /// The node for an autocommit read, never `exclude`: a live subscriber by
    /// least outstanding requests and weight, else the primary.
    pub fn pick_reader(&self, exclude: Option<usize>) -> Option<usize> {
        self.pick_reader_at(exclude, 0)
    }

    /// A reader that has applied at least `min_seq` and is within the lag
    /// limit; the primary if no subscriber is.
    pub fn pick_reader_at(&self, exclude: Option<usize>, min_seq: u64) -> Option<usize> {
        let primary = self.primary();
        let nodes = &self.nodes;
        if self.read_scaling {
            let n = nodes.len();
            let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
            let candidates = (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| {
                    i != primary
                        && Some(i) != exclude
                        && nodes[i].is_up()
                        && self.fresh_enough(i, min_seq)
                })
                .map(|i| Candidate {
                    index: i,
                    outstanding: nodes[i].outstanding.load(Ordering::Relaxed),
                    weight: nodes[i].weight(),
                });
            if let Some(pick) = least_outstanding_of(candidates) {
                return Some(pick);
            }
        }
        (Some(primary) != exclude && nodes[primary].is_up()).then_some(primary)
    }

    /// Like [`Group::pick_reader`], but keeps `prefer` (the session's last
    /// reader) while its load is within one request of the best choice, so
    /// a session's reads stay on one backend connection.
    pub fn pick_reader_near(
        &self,
        exclude: Option<usize>,
        prefer: Option<usize>,
        min_seq: u64,
    ) -> Option<usize> {
        let best = self.pick_reader_at(exclude, min_seq)?;
        let Some(p) = prefer else {
            return Some(best);
        };
        if p == best {
            return Some(best);
        }
        let nodes = &self.nodes;
        let Some(node) = nodes.get(p) else {
            return Some(best);
        };
        let eligible = self.read_scaling
            && p != self.primary()
            && node.is_up()
            && self.fresh_enough(p, min_seq)
            && node.weight() > 0
            && best != self.primary();
        if !eligible {
            return Some(best);
        }
        let load = |i: usize| nodes[i].outstanding.load(Ordering::Relaxed) as u64 + 1;
        let (wp, wb) = (node.weight() as u64, nodes[best].weight() as u64);
        if load(p) * wb <= (load(best) + 1) * wp {
            Some(p)
        } else {
            Some(best)
        }
    }

    /// Status for /status and the admin console.
    pub fn status(&self) -> GroupStatus {
        let primary = self.primary();
        GroupStatus {
            name: self.name.clone(),
            term: self.term(),
            primary: self.node(primary).name.clone(),
            head_seq: self.head_seq(),
            paused: self.admin_paused(),
            verify: self
                .last_verify
                .lock()
                .expect("verify")
                .as_ref()
                .map(|r| r.summary()),
            nodes: self
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.is_removed())
                .map(|(i, n)| NodeStatus {
                    name: n.name.clone(),
                    role: self.role(i),
                    state: n.state(),
                    applied_seq: if i == primary {
                        self.head_seq()
                    } else {
                        n.applied()
                    },
                    lag_seq: self.lag(i).0,
                    lag_ms: self.lag(i).1,
                    divergence: n
                        .divergence
                        .lock()
                        .expect("divergence")
                        .as_ref()
                        .map(|(seq, why)| format!("at seq {seq}: {why}")),
                    host: n.config.host.clone(),
                    port: n.config.port,
                    weight: n.weight(),
                    outstanding: n.outstanding.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

/// A receiver of `own` that also turns true when `outer` does (a node's or
/// group's stop follows the server's); the forwarding task ends when every
/// receiver is gone.
fn stop_with(own: &watch::Sender<bool>, mut outer: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let rx = own.subscribe();
    let tx = own.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = outer.wait_for(|s| *s) => { let _ = tx.send(true); }
            _ = tx.closed() => {}
        }
    });
    rx
}

/// One of a limited number of places (a client of a group, a backend
/// connection to a node), given back when dropped.
#[derive(Debug)]
pub struct Seat(Arc<AtomicUsize>);

impl Seat {
    /// Takes a place unless `limit` (0: no limit) are taken.
    fn take(count: &Arc<AtomicUsize>, limit: usize) -> Option<Seat> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Seat(count.clone()))
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The startup parameters that decide what a node reports at startup.
fn greeting_key(params: &[(String, String)]) -> String {
    let mut sorted: Vec<String> = params.iter().map(|(k, v)| format!("{k}\0{v}")).collect();
    sorted.sort();
    sorted.join("\0\0")
}

/// A group as /status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub term: u64,
    pub primary: String,
    pub head_seq: u64,
    /// New work is held by PAUSE.
    pub paused: bool,
    /// The last VERIFY, if any ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<crate::replication::verify::Summary>,
    pub nodes: Vec<NodeStatus>,
}

/// A node as /status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub role: Role,
    pub state: NodeState,
    pub applied_seq: u64,
    pub lag_seq: u64,
    pub lag_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub divergence: Option<String>,
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub outstanding: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::rowlocal::RelCatalog;
    use std::time::Duration;

    fn group() -> Arc<Group> {
        let config: GroupConfig =
            toml::from_str("name = \"g\"\n[[node]]\nname = \"n1\"\nport = 1\n").expect("config");
        Arc::new(Group::new(&config, true, 1000))
    }

    #[tokio::test]
    async fn a_fresh_catalog_comes_from_a_load_begun_after_the_request() {
        let g = group();
        // A load begins (it reads the tables as they are now)…
        let early = g.rel_epoch();
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.fresh_rel_catalog(Duration::from_secs(10)).await }
        });
        // …a session asks for a fresh catalog (the monitor hears it)…
        g.rel_wanted.notified().await;
        // …and the early load finishes: it is not installed.
        g.set_rel_catalog(early, RelCatalog::default());
        assert!(g.rel_catalog().is_none());
        // The load the request started is.
        g.rel_wanted.notified().await;
        g.set_rel_catalog(g.rel_epoch(), RelCatalog::default());
        let got = waiter.await.expect("joined").expect("a catalog");
        assert!(Arc::ptr_eq(&got, &g.rel_catalog().expect("installed")));
    }

    #[tokio::test]
    async fn no_fresh_catalog_when_no_load_finishes() {
        let g = group();
        g.set_rel_catalog(g.rel_epoch(), RelCatalog::default());
        assert!(
            g.fresh_rel_catalog(Duration::from_millis(50))
                .await
                .is_none()
        );
    }
}
