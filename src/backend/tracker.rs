//! What a backend connection still owes us, in order, so that responses to
//! messages the proxy injected (a Parse of a statement the client prepared
//! on another node, a replayed SET) are swallowed and everything else is
//! forwarded untouched.

use std::collections::VecDeque;

use crate::route::SqlPrepared;

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
    /// ReadyForQuery ending a client unit the client already has the
    /// answer to (a BEGIN answered when it came, sent later): nothing of it
    /// is relayed.
    Answered,
    /// ReadyForQuery ending a unit the proxy sent for itself whose rows and
    /// errors it reads (the write lock, the log append).
    Own,
    /// The CommandComplete of an SQL-level PREPARE, DEALLOCATE or DISCARD
    /// ALL in a client unit: the session's account of its prepared
    /// statements changes only once the node has done it.
    Defines(SqlPrepared),
}

/// Whom the unit being answered belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitOwner {
    Client,
    ClientCaptured,
    Answered,
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
    /// `Answered` in the queue.
    answered: usize,
    /// `Defines` in the queue.
    defines: usize,
}

impl Tracker {
    pub fn push(&mut self, e: Expect) {
        match e {
            Expect::Sync { injected: false } | Expect::Captured => self.client_units += 1,
            Expect::Answered => self.answered += 1,
            Expect::Defines(_) => self.defines += 1,
            _ => {}
        }
        self.queue.push_back(e);
    }

    /// SQL-level prepared statement changes sent and not yet completed
    /// (checked before relaying a CommandComplete in place).
    pub fn defines_pending(&self) -> bool {
        self.defines > 0
    }

    /// Those changes, in the order they were sent.
    pub fn pending_defines(&self) -> impl Iterator<Item = &SqlPrepared> {
        self.queue.iter().filter_map(|e| match e {
            Expect::Defines(p) => Some(p),
            _ => None,
        })
    }

    /// A CommandComplete arrived (`tag`: its body): the change it
    /// completes, if it completes one of the unit being answered.
    pub fn completed(&mut self, tag: &[u8]) -> Option<SqlPrepared> {
        if self.defines == 0 {
            return None;
        }
        let i = self.position(|e| matches!(e, Expect::Defines(p) if p.completed_by(tag)))?;
        match self.queue.remove(i) {
            Some(Expect::Defines(p)) => {
                self.defines -= 1;
                Some(p)
            }
            _ => None,
        }
    }

    fn unit_end(e: &Expect) -> Option<UnitOwner> {
        match e {
            Expect::Sync { injected: false } => Some(UnitOwner::Client),
            Expect::Sync { injected: true } => Some(UnitOwner::Injected),
            Expect::Captured => Some(UnitOwner::ClientCaptured),
            Expect::Answered => Some(UnitOwner::Answered),
            Expect::Own => Some(UnitOwner::Own),
            _ => None,
        }
    }

    /// Client units sent but not finished.
    pub fn client_units(&self) -> usize {
        self.client_units
    }

    /// Client units already answered, sent but not finished.
    pub fn answered_units(&self) -> usize {
        self.answered
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
        let injected_unit = matches!(
            owner,
            Some(UnitOwner::Injected | UnitOwner::Own | UnitOwner::Answered)
        );
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
                    match e {
                        Expect::Parse { name, .. } => out.not_prepared.push(name),
                        // Skipped, or it was the one that failed.
                        Expect::Defines(_) => self.defines -= 1,
                        _ => {}
                    }
                }
            }
            b'Z' => {
                while let Some(e) = self.queue.pop_front() {
                    if let Expect::Defines(_) = e {
                        self.defines -= 1;
                    }
                    if let Some(o) = Self::unit_end(&e) {
                        let client = matches!(o, UnitOwner::Client | UnitOwner::ClientCaptured);
                        out.forward = client;
                        if client {
                            self.client_units = self.client_units.saturating_sub(1);
                            out.unit_done = true;
                        } else if o == UnitOwner::Answered {
                            self.answered = self.answered.saturating_sub(1);
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
        self.answered = 0;
        self.defines = 0;
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

    /// An SQL PREPARE counts once the node completed it: one that failed,
    /// was skipped, or belongs to a later unit does not.
    #[test]
    fn sql_definitions_count_once_completed_in_their_unit() {
        let prepare = |name: &str| {
            Expect::Defines(SqlPrepared::Prepare {
                name: name.into(),
                text: format!("PREPARE {name} AS SELECT 1"),
            })
        };
        let name = |p: Option<SqlPrepared>| match p {
            Some(SqlPrepared::Prepare { name, .. }) => Some(name),
            _ => None,
        };
        let mut t = Tracker::default();
        // `PREPARE a …; PREPARE b …; PREPARE c …` where b fails.
        t.push(prepare("a"));
        t.push(prepare("b"));
        t.push(prepare("c"));
        t.push(Expect::Sync { injected: false });
        // `PREPARE d …` not completed; then `PREPARE e …`, pipelined.
        t.push(prepare("d"));
        t.push(Expect::Sync { injected: false });
        t.push(prepare("e"));
        t.push(Expect::Sync { injected: false });
        assert!(t.defines_pending());
        assert_eq!(t.completed(b"SELECT 1\0"), None);
        assert_eq!(name(t.completed(b"PREPARE\0")), Some("a".into()));
        assert!(t.on_message(b'E').forward);
        assert!(t.on_message(b'Z').unit_done);
        let left: Vec<_> = t.pending_defines().cloned().collect();
        assert_eq!(left.len(), 2, "b and c are gone with their unit: {left:?}");
        assert!(t.on_message(b'Z').unit_done);
        assert_eq!(name(t.completed(b"PREPARE\0")), Some("e".into()));
        assert!(t.on_message(b'Z').unit_done);
        assert!(!t.defines_pending() && t.is_idle());
    }

    /// A unit the client already has the answer to is relayed in nothing,
    /// finishes like a client unit, and is counted apart.
    #[test]
    fn answered_units_relay_nothing() {
        let mut t = Tracker::default();
        t.push(Expect::Answered);
        t.push(Expect::Sync { injected: false });
        assert_eq!((t.client_units(), t.answered_units()), (1, 1));
        let c = t.on_message(b'C');
        assert!(!c.forward && !c.unit_done);
        assert_eq!(c.owner, Some(UnitOwner::Answered));
        let z = t.on_message(b'Z');
        assert!(!z.forward && z.unit_done);
        assert_eq!((t.client_units(), t.answered_units()), (1, 0));
        assert!(t.on_message(b'A').forward);
        assert!(t.on_message(b'C').forward);
        let z = t.on_message(b'Z');
        assert!(z.forward && z.unit_done && t.is_idle());
    }
}
