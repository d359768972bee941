//! Recent events of a group (failovers, switchovers, divergence, seeding,
//! node state changes) in a small ring buffer, for `/status` and the status
//! page. Events are rare: a mutex is fine.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Events kept per group.
pub const CAPACITY: usize = 200;

/// One thing that happened.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// Increasing within the group's journal.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `state`, `health` (why a node was marked down), `failover`,
    /// `failover_refused`, `switchover`,
    /// `switchover_failed`, `divergence`, `seed_start`, `seed_progress`,
    /// `seed_done` or `seed_failed`.
    pub kind: &'static str,
    pub detail: String,
}

/// A group's recent events, oldest first.
#[derive(Debug)]
pub struct Journal {
    group: String,
    inner: Mutex<(u64, VecDeque<Event>)>,
}

impl Journal {
    pub fn new(group: &str) -> Journal {
        Journal {
            group: group.to_string(),
            inner: Mutex::new((0, VecDeque::with_capacity(CAPACITY))),
        }
    }

    /// Records an event, dropping the oldest past [`CAPACITY`].
    pub fn record(&self, node: Option<&str>, kind: &'static str, detail: impl Into<String>) {
        let mut inner = self.inner.lock().expect("journal");
        inner.0 += 1;
        let event = Event {
            id: inner.0,
            at_ms: now_ms(),
            group: self.group.clone(),
            node: node.map(str::to_string),
            kind,
            detail: detail.into(),
        };
        if inner.1.len() == CAPACITY {
            inner.1.pop_front();
        }
        inner.1.push_back(event);
    }

    /// The last `n` events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        let inner = self.inner.lock().expect("journal");
        let skip = inner.1.len().saturating_sub(n);
        inner.1.iter().skip(skip).cloned().collect()
    }
}

/// Milliseconds since the epoch from the kernel's coarse clock (a few ms
/// behind at worst, and much cheaper): for timestamps only shown to people.
pub fn coarse_now_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } != 0 {
        return now_ms();
    }
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_in_order() {
        let j = Journal::new("app");
        for i in 0..CAPACITY + 5 {
            j.record(Some("n1"), "state", format!("event {i}"));
        }
        let all = j.recent(usize::MAX);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].detail, "event 5");
        assert_eq!(all.last().unwrap().id, (CAPACITY + 5) as u64);
        let last = j.recent(2);
        assert_eq!(last.len(), 2);
        assert_eq!(last[1].detail, format!("event {}", CAPACITY + 4));
        assert!(last[0].id < last[1].id);
    }
}
