//! The redundancy group: its nodes, their states and roles, and the choice
//! of node for each unit of work.

pub mod health;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use metrics::{Counter, Gauge};
use serde::Serialize;

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
}

impl NodeState {
    fn from_u8(v: u8) -> NodeState {
        match v {
            0 => NodeState::Up,
            _ => NodeState::Down,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
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
}

impl Node {
    fn new(group: &GroupConfig, config: &NodeConfig) -> Node {
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
            },
            config: config.clone(),
            state: AtomicU8::new(NodeState::Up as u8),
            outstanding: AtomicUsize::new(0),
            queries: metrics::counter!("reprise_node_queries_total", &labels),
            up_gauge: metrics::gauge!("reprise_node_up", &labels),
        }
    }

    pub fn state(&self) -> NodeState {
        NodeState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Records a new state; returns the previous one.
    pub fn set_state(&self, s: NodeState) -> NodeState {
        let old = NodeState::from_u8(self.state.swap(s as u8, Ordering::Relaxed));
        self.up_gauge
            .set(if s == NodeState::Up { 1.0 } else { 0.0 });
        if old != s {
            tracing::info!(group = %self.group, node = %self.name, from = old.as_str(), to = s.as_str(), "node state changed");
            metrics::counter!("reprise_node_state_changes_total",
                "group" => self.group.clone(), "node" => self.name.clone(), "to" => s.as_str())
            .increment(1);
        }
        old
    }

    pub fn is_up(&self) -> bool {
        self.state() == NodeState::Up
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
    pub nodes: Vec<Arc<Node>>,
    primary: AtomicUsize,
    term: AtomicU64,
    pub classifier: Classifier,
    rotation: AtomicUsize,
    /// Send autocommit reads to subscribers.
    pub read_scaling: bool,
}

impl Group {
    pub fn new(config: &GroupConfig, read_scaling: bool) -> Group {
        Group {
            name: config.name.clone(),
            nodes: config
                .nodes
                .iter()
                .map(|n| Arc::new(Node::new(config, n)))
                .collect(),
            primary: AtomicUsize::new(0),
            term: AtomicU64::new(1),
            classifier: Classifier::new(FunctionCatalog::builtin()),
            rotation: AtomicUsize::new(0),
            read_scaling,
        }
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
        let primary = self.primary();
        if self.read_scaling {
            let n = self.nodes.len();
            let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
            let candidates = (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| i != primary && Some(i) != exclude && self.nodes[i].is_up())
                .map(|i| Candidate {
                    index: i,
                    outstanding: self.nodes[i].outstanding.load(Ordering::Relaxed),
                    weight: self.nodes[i].config.weight,
                });
            if let Some(pick) = least_outstanding_of(candidates) {
                return Some(pick);
            }
        }
        (Some(primary) != exclude && self.nodes[primary].is_up()).then_some(primary)
    }

    /// Like [`Group::pick_reader`], but keeps `prefer` (the session's last
    /// reader) while its load is within one request of the best choice, so
    /// a session's reads stay on one backend connection.
    pub fn pick_reader_near(&self, exclude: Option<usize>, prefer: Option<usize>) -> Option<usize> {
        let best = self.pick_reader(exclude)?;
        let Some(p) = prefer else {
            return Some(best);
        };
        if p == best {
            return Some(best);
        }
        let node = &self.nodes[p];
        let eligible = self.read_scaling
            && p != self.primary()
            && node.is_up()
            && node.config.weight > 0
            && best != self.primary();
        if !eligible {
            return Some(best);
        }
        let load = |i: usize| self.nodes[i].outstanding.load(Ordering::Relaxed) as u64 + 1;
        let (wp, wb) = (
            node.config.weight as u64,
            self.nodes[best].config.weight as u64,
        );
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
            primary: self.nodes[primary].name.clone(),
            nodes: self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| NodeStatus {
                    name: n.name.clone(),
                    role: self.role(i),
                    state: n.state(),
                    host: n.config.host.clone(),
                    port: n.config.port,
                    weight: n.config.weight,
                    outstanding: n.outstanding.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

/// A group as /status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub term: u64,
    pub primary: String,
    pub nodes: Vec<NodeStatus>,
}

/// A node as /status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub role: Role,
    pub state: NodeState,
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub outstanding: usize,
}
