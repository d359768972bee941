//! What a backend connection still owes us, in order, so that responses to
//! messages the proxy injected (a Parse of a statement the client prepared
//! on another node, a replayed SET) are swallowed and everything else is
//! forwarded untouched.

use std::collections::VecDeque;

/// One response we wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// ParseComplete for a Parse of statement `name`.
    Parse { injected: bool, name: String },
    /// CloseComplete.
    Close { injected: bool },
    /// ReadyForQuery ending a unit (a Sync or a simple Query). An injected
    /// unit's responses are all swallowed.
    Sync { injected: bool },
    /// ReadyForQuery ending a client unit that is part of a write
    /// transaction: its command tags are recorded for replay checks.
    Captured,
    /// ReadyForQuery ending a unit the proxy sent for itself whose rows and
    /// errors it reads (the write lock, the log append).
    Own,
}

/// Whom the unit being answered belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitOwner {
    Client,
    ClientCaptured,
    Injected,
    Own,
}

/// What to do with one message from the node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Send it on to the client.
    pub forward: bool,
    /// A client unit finished (its ReadyForQuery arrived).
    pub unit_done: bool,
    /// Statements whose Parse was skipped because of an error: they do not
    /// exist on this connection.
    pub not_prepared: Vec<String>,
    /// The unit the message belongs to.
    pub owner: Option<UnitOwner>,
}

/// The ordered list of expected responses.
#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Expect>,
    client_units: usize,
}

impl Tracker {
    pub fn push(&mut self, e: Expect) {
        if matches!(e, Expect::Sync { injected: false } | Expect::Captured) {
            self.client_units += 1;
        }
        self.queue.push_back(e);
    }

    fn unit_end(e: &Expect) -> Option<UnitOwner> {
        match e {
            Expect::Sync { injected: false } => Some(UnitOwner::Client),
            Expect::Sync { injected: true } => Some(UnitOwner::Injected),
            Expect::Captured => Some(UnitOwner::ClientCaptured),
            Expect::Own => Some(UnitOwner::Own),
            _ => None,
        }
    }

    /// Client units sent but not finished.
    pub fn client_units(&self) -> usize {
        self.client_units
    }

    /// Nothing is owed.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whom the unit now being answered belongs to.
    pub fn owner(&self) -> Option<UnitOwner> {
        self.queue.iter().find_map(Self::unit_end)
    }

    /// Accounts for one message from the node.
    pub fn on_message(&mut self, tag: u8) -> Outcome {
        let owner = self.owner();
        let injected_unit = matches!(owner, Some(UnitOwner::Injected | UnitOwner::Own));
        let mut out = Outcome {
            forward: !injected_unit,
            owner,
            ..Outcome::default()
        };
        match tag {
            b'1' => {
                if let Some(i) = self.position(|e| matches!(e, Expect::Parse { .. }))
                    && let Some(Expect::Parse { injected: true, .. }) = self.queue.remove(i)
                {
                    out.forward = false;
                }
            }
            b'3' => {
                if let Some(i) = self.position(|e| matches!(e, Expect::Close { .. }))
                    && let Some(Expect::Close { injected: true }) = self.queue.remove(i)
                {
                    out.forward = false;
                }
            }
            b'E' => {
                // Everything up to the unit's Sync is skipped by the server.
                let end = self
                    .position(|e| Self::unit_end(e).is_some())
                    .unwrap_or(self.queue.len());
                for e in self.queue.drain(..end) {
                    if let Expect::Parse { name, .. } = e {
                        out.not_prepared.push(name);
                    }
                }
            }
            b'Z' => {
                while let Some(e) = self.queue.pop_front() {
                    if let Some(o) = Self::unit_end(&e) {
                        let client = matches!(o, UnitOwner::Client | UnitOwner::ClientCaptured);
                        out.forward = client;
                        if client {
                            self.client_units = self.client_units.saturating_sub(1);
                            out.unit_done = true;
                        }
                        break;
                    }
                }
            }
            // Notifications are asynchronous: always the client's.
            b'A' => out.forward = true,
            _ => {}
        }
        out
    }

    fn position(&self, f: impl Fn(&Expect) -> bool) -> Option<usize> {
        let end = self
            .queue
            .iter()
            .position(|e| Self::unit_end(e).is_some())
            .map(|i| i + 1)
            .unwrap_or(self.queue.len());
        self.queue.iter().take(end).position(f)
    }

    /// Forgets everything (the connection is being dropped).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.client_units = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(injected: bool, name: &str) -> Expect {
        Expect::Parse {
            injected,
            name: name.into(),
        }
    }

    /// The session relays these tags in place without asking the tracker
    /// (`Session::drain_backend`): that is only right while they change
    /// nothing here.
    #[test]
    fn plain_answers_change_no_state() {
        let mut t = Tracker::default();
        t.push(parse(true, "s1"));
        t.push(Expect::Close { injected: false });
        t.push(Expect::Sync { injected: false });
        let before = (t.queue.clone(), t.client_units());
        for &tag in b"2DCTtnsNIcdHWV" {
            let o = t.on_message(tag);
            assert!(o.forward && !o.unit_done && o.not_prepared.is_empty());
            assert_eq!(o.owner, Some(UnitOwner::Client));
            assert_eq!(
                (t.queue.clone(), t.client_units()),
                before,
                "tag {}",
                tag as char
            );
        }
    }

    #[test]
    fn injected_parse_complete_is_swallowed() {
        let mut t = Tracker::default();
        t.push(parse(true, "s1"));
        t.push(Expect::Sync { injected: false });
        assert!(!t.on_message(b'1').forward);
        assert!(t.on_message(b'2').forward); // BindComplete
        assert!(t.on_message(b'D').forward);
        assert!(t.on_message(b'C').forward);
        let z = t.on_message(b'Z');
        assert!(z.forward && z.unit_done);
        assert!(t.is_idle());
        assert_eq!(t.client_units(), 0);
    }

    #[test]
    fn injected_unit_is_swallowed_whole_but_not_its_notifications() {
        let mut t = Tracker::default();
        t.push(Expect::Sync { injected: true });
        t.push(Expect::Sync { injected: false });
        assert_eq!(t.client_units(), 1);
        assert!(!t.on_message(b'C').forward);
        assert!(!t.on_message(b'S').forward);
        assert!(t.on_message(b'A').forward);
        let z = t.on_message(b'Z');
        assert!(!z.forward && !z.unit_done);
        assert!(t.on_message(b'T').forward);
        assert!(t.on_message(b'Z').unit_done);
    }

    #[test]
    fn an_error_skips_the_rest_of_the_unit() {
        let mut t = Tracker::default();
        t.push(parse(false, "a"));
        t.push(parse(true, "b"));
        t.push(Expect::Close { injected: true });
        t.push(Expect::Sync { injected: false });
        t.push(parse(true, "c"));
        t.push(Expect::Sync { injected: false });
        assert!(t.on_message(b'1').forward); // a, the client's
        let e = t.on_message(b'E');
        assert!(e.forward);
        assert_eq!(e.not_prepared, vec!["b".to_string()]);
        assert!(t.on_message(b'Z').unit_done);
        assert!(!t.on_message(b'1').forward); // c, injected in the next unit
        assert!(t.on_message(b'Z').unit_done);
        assert!(t.is_idle());
    }
}
