//! Cancel keys: the proxy hands each client its own (pid, secret) and
//! remembers which backend that client's work is running on, so a
//! CancelRequest reaches the right server process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::admin::events::coarse_now_ms;

/// Where to send a cancel: a node and its backend process key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    /// The node's TLS settings: the cancel goes the way queries do.
    pub tls: crate::backend::tls::NodeTls,
    pub pid: i32,
    pub secret: i32,
}

/// One session's cancel slot, updated when it moves to another backend,
/// and what SHOW CLIENTS shows of it.
#[derive(Debug, Default)]
pub struct CancelSlot {
    target: Mutex<Option<CancelTarget>>,
    /// Who the client is (set once, after login).
    pub info: std::sync::OnceLock<ClientInfo>,
    /// A [`ClientState`] as u8.
    state: AtomicU8,
    /// When the state last changed (ms since the epoch).
    since_ms: AtomicI64,
}

/// A client as SHOW CLIENTS lists it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub user: String,
    pub group: String,
    pub addr: String,
    pub application_name: String,
    pub connected_ms: i64,
}

/// What a client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Idle = 0,
    Active = 1,
    IdleInTransaction = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Active => "active",
            ClientState::IdleInTransaction => "idle in transaction",
        }
    }
}

impl CancelSlot {
    pub fn set(&self, t: CancelTarget) {
        *self.target.lock().expect("cancel slot") = Some(t);
    }

    pub fn get(&self) -> Option<CancelTarget> {
        self.target.lock().expect("cancel slot").clone()
    }

    /// Records what the client is doing (cheap when unchanged).
    pub fn set_state(&self, s: ClientState) {
        if self.state.swap(s as u8, Ordering::Relaxed) != s as u8 {
            self.since_ms.store(coarse_now_ms(), Ordering::Relaxed);
        }
    }

    /// The client's state and since when (ms since the epoch).
    pub fn state(&self) -> (ClientState, i64) {
        let s = match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Active,
            2 => ClientState::IdleInTransaction,
            _ => ClientState::Idle,
        };
        (s, self.since_ms.load(Ordering::Relaxed))
    }
}

/// All live sessions' cancel keys.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    next_pid: AtomicI32,
    sessions: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// Removes a session's key when the session ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry
            .sessions
            .lock()
            .expect("cancel registry")
            .remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Registers a new session and returns its key.
    pub fn register(self: &Arc<Self>) -> CancelGuard {
        let pid = self
            .next_pid
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            & 0x7fff_ffff;
        let secret: i32 = rand::random();
        let slot = Arc::new(CancelSlot::default());
        self.sessions
            .lock()
            .expect("cancel registry")
            .insert(pid, (secret, slot.clone()));
        CancelGuard {
            registry: self.clone(),
            pid,
            secret,
            slot,
        }
    }

    /// The backend to cancel for a client's key, if the key is valid.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let map = self.sessions.lock().expect("cancel registry");
        let (s, slot) = map.get(&pid)?;
        if *s != secret {
            return None;
        }
        slot.get()
    }

    /// Every live session: (pid, slot), by pid.
    pub fn clients(&self) -> Vec<(i32, Arc<CancelSlot>)> {
        let mut v: Vec<_> = self
            .sessions
            .lock()
            .expect("cancel registry")
            .iter()
            .map(|(pid, (_, slot))| (*pid, slot.clone()))
            .collect();
        v.sort_by_key(|(pid, _)| *pid);
        v
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.sessions.lock().expect("cancel registry").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_secret_finds_nothing_and_guard_unregisters() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register();
        let t = CancelTarget {
            host: "127.0.0.1".into(),
            port: 1,
            tls: Default::default(),
            pid: 42,
            secret: 7,
        };
        g.slot.set(t.clone());
        assert_eq!(reg.lookup(g.pid, g.secret), Some(t));
        assert_eq!(reg.lookup(g.pid, g.secret.wrapping_add(1)), None);
        let pid = g.pid;
        drop(g);
        assert!(reg.is_empty());
        assert_eq!(reg.lookup(pid, 0), None);
    }
}
