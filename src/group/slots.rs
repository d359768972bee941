//! A group's nodes by index.
//!
//! Append-only: a node added at run time takes the next slot and a removed
//! one keeps its slot (as `Removed`), so an index names the same node for
//! the life of the process. That makes reading a node a plain load, which
//! the session loop does several times per query.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// How many nodes a group can have over the life of the process, removed
/// ones included.
pub const MAX_NODE_SLOTS: usize = 256;

pub struct NodeSlots<T> {
    slots: Box<[OnceLock<Arc<T>>]>,
    len: AtomicUsize,
    push: Mutex<()>,
}

impl<T> NodeSlots<T> {
    /// Slots holding `nodes` (at most `MAX_NODE_SLOTS`; more are dropped,
    /// which config validation rules out).
    pub fn new(nodes: impl IntoIterator<Item = Arc<T>>) -> Self {
        let s = NodeSlots {
            slots: (0..MAX_NODE_SLOTS).map(|_| OnceLock::new()).collect(),
            len: AtomicUsize::new(0),
            push: Mutex::new(()),
        };
        for n in nodes {
            s.push(n);
        }
        s
    }

    /// Appends a node; its index, or None when every slot is used.
    pub fn push(&self, node: Arc<T>) -> Option<usize> {
        let _one_at_a_time = self.push.lock().expect("slots");
        let i = self.len.load(Ordering::Acquire);
        let slot = self.slots.get(i)?;
        let _ = slot.set(node);
        self.len.store(i + 1, Ordering::Release);
        Some(i)
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> Option<&Arc<T>> {
        if i < self.len() {
            self.slots[i].get()
        } else {
            None
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<T>> {
        self.slots[..self.len()].iter().filter_map(|s| s.get())
    }
}

impl<T> std::ops::Index<usize> for NodeSlots<T> {
    type Output = Arc<T>;

    fn index(&self, i: usize) -> &Arc<T> {
        self.get(i)
            .unwrap_or_else(|| panic!("node index {i} out of range ({} nodes)", self.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_stay_put_and_a_full_table_refuses_more() {
        let s = NodeSlots::new([Arc::new("a"), Arc::new("b")]);
        assert_eq!(s.len(), 2);
        assert_eq!(*s[1], "b");
        assert!(s.get(2).is_none());
        assert_eq!(s.push(Arc::new("c")), Some(2));
        assert_eq!(s.iter().map(|n| **n).collect::<Vec<_>>(), ["a", "b", "c"]);
        while s.len() < MAX_NODE_SLOTS {
            s.push(Arc::new("x")).expect("room");
        }
        assert_eq!(s.push(Arc::new("y")), None);
        assert_eq!(s.len(), MAX_NODE_SLOTS);
    }

    #[test]
    fn readers_see_nodes_added_by_another_thread() {
        let s = Arc::new(NodeSlots::new([Arc::new(0usize)]));
        let w = {
            let s = s.clone();
            std::thread::spawn(move || {
                for k in 1..100 {
                    s.push(Arc::new(k));
                }
            })
        };
        // Every index below len() is readable while pushes go on.
        for _ in 0..10_000 {
            let n = s.len();
            assert_eq!(**s.get(n - 1).expect("published"), n - 1);
        }
        w.join().unwrap();
        assert_eq!(s.len(), 100);
    }
}
