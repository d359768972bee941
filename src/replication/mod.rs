//! Replication: the `reprise` schema, log entries, the write lock, and the
//! appliers that replay every committed write transaction on the
//! subscribers in commit order.

pub mod applier;
pub mod determinism;
pub mod routines;
pub mod rowlocal;
pub mod seed;
pub mod verify;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The `reprise` schema every node carries (versioned, idempotent).
pub const SCHEMA_SQL: &str = include_str!("../../sql/reprise.sql");

/// The channel appliers LISTEN on.
pub const LOG_CHANNEL: &str = "reprise_log";

/// The advisory-lock key of a group's write lock (stable across proxies).
pub fn lock_key(group: &str) -> i64 {
    // FNV-1a: stable, no dependency on std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in b"reprise write lock:".iter().chain(group.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h as i64
}

/// The key of the short lock that keeps append order equal to commit order
/// among transactions holding the write lock in shared mode.
pub fn order_key(group: &str) -> i64 {
    lock_key(group).wrapping_add(1)
}

/// Sets `reprise.now` (for rewritten time functions) to the transaction
/// timestamp and returns it.
const SET_NOW: &str = "set_config('reprise.now', to_char(now() AT TIME ZONE 'UTC', \
     'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), true)";

/// The write lock in shared mode (row-local writes only): sets the
/// transaction timestamp, no sequence snapshot (row-local statements never
/// touch sequences).
pub fn shared_lock_query(group: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock_shared({}), {SET_NOW}, NULL",
        lock_key(group)
    )
}

/// Upgrades a shared write lock to exclusive and snapshots sequences.
pub fn upgrade_lock_query(group: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock({}), NULL, reprise.sequences()",
        lock_key(group)
    )
}

/// The query that takes the write lock and reads what the entry needs:
/// the transaction timestamp (also set as `reprise.now` for rewritten time
/// functions) and the sequence states before the transaction writes.
pub fn lock_query(group: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock({}), {SET_NOW}, reprise.sequences()",
        lock_key(group)
    )
}

/// The write lock taken for the session, outside any transaction: a
/// REPEATABLE READ or SERIALIZABLE transaction's snapshot is taken when
/// its first query starts, so that query must not wait for the lock.
/// `lock_from_session_query` moves it to the transaction.
pub fn session_lock_query(group: &str) -> String {
    format!("SELECT pg_advisory_lock({})", lock_key(group))
}

/// `lock_query` for a session that holds the write lock already: the
/// transaction's lock is granted at once, then the session's is released
/// (in the same query, so nothing can fail between them but the query).
/// The fourth column says whether the session held it.
pub fn lock_from_session_query(group: &str) -> String {
    let key = lock_key(group);
    format!(
        "SELECT pg_advisory_xact_lock({key}), {SET_NOW}, reprise.sequences(), \
         pg_advisory_unlock({key})"
    )
}

/// Releases the session's write lock when `lock_from_session_query` could
/// not (its transaction had failed before it ran).
pub fn session_unlock_query(group: &str) -> String {
    format!("SELECT pg_advisory_unlock({})", lock_key(group))
}

/// A log row as the primary holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub seq: i64,
    pub term: i64,
    pub payload: Bytes,
    pub prev_hash: String,
    pub hash: String,
    pub sequences: Option<String>,
    /// Values the transaction captured on the primary (`reprise.captures()`).
    pub captured: Option<String>,
    /// The primary's commit time, µs since the epoch.
    pub committed_us: i64,
}

/// Log rows this proxy's sessions committed lately, so that its appliers
/// replay them without reading them back from the primary. Rows come in
/// as their COMMITs are answered, not quite in seq order; an applier
/// takes a run that continues its position, and reads the primary's log
/// for anything missing (rows of other proxies, commits whose outcome the
/// session could not see, rows dropped here for room).
#[derive(Debug, Default)]
pub struct RecentLog {
    /// The term of the rows held.
    term: u64,
    rows: std::collections::BTreeMap<i64, std::sync::Arc<LogRow>>,
    bytes: usize,
}

impl RecentLog {
    /// At most this many rows, or this many payload bytes, are held.
    const MAX_ROWS: usize = 4096;
    const MAX_BYTES: usize = 32 << 20;

    /// A row committed on the primary of `term`.
    pub fn publish(&mut self, term: u64, row: LogRow) {
        if term != self.term {
            self.rows.clear();
            self.bytes = 0;
            self.term = term;
        }
        self.bytes += row.payload.len();
        if let Some(old) = self.rows.insert(row.seq, std::sync::Arc::new(row)) {
            self.bytes -= old.payload.len();
        }
        while self.rows.len() > Self::MAX_ROWS || self.bytes > Self::MAX_BYTES {
            match self.rows.pop_first() {
                Some((_, r)) => self.bytes -= r.payload.len(),
                None => break,
            }
        }
    }

    /// Up to `max` rows of `term` that follow `seq` without a hole.
    pub fn after(&self, term: u64, seq: i64, max: usize) -> Vec<std::sync::Arc<LogRow>> {
        if term != self.term {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&s, row) in self.rows.range(seq + 1..) {
            if s != seq + 1 + out.len() as i64 || out.len() >= max {
                break;
            }
            out.push(row.clone());
        }
        out
    }

    /// Whether a row of `term` above `seq` is held (one before it may
    /// still be on its way).
    pub fn has_above(&self, term: u64, seq: i64) -> bool {
        term == self.term && self.rows.range(seq + 1..).next().is_some()
    }

    /// Rows up to `seq` are applied everywhere they are wanted.
    pub fn forget_through(&mut self, seq: i64) {
        while let Some(entry) = self.rows.first_entry() {
            if *entry.key() > seq {
                break;
            }
            self.bytes -= entry.remove().payload.len();
        }
    }
}

/// What one log entry replays.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EntryHeader {
    /// The primary's transaction timestamp (ISO 8601, UTC).
    pub now: String,
    /// Session settings to re-establish first (SET statements).
    pub settings: Vec<String>,
    /// Command tags the primary reported for the replayed messages.
    pub tags: Vec<String>,
    /// `""` for a transaction; `"nontx"` for a command that cannot run in
    /// a transaction block (CREATE INDEX CONCURRENTLY): replayed on its
    /// own, idempotently, before the entry is recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// SQL-level prepared statements to PREPARE first (their source
    /// text): those the entry's EXECUTE and DEALLOCATE statements use that
    /// the session prepared before the transaction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prepares: Vec<String>,
}

/// The entry kind of commands that run outside a transaction block.
pub const NONTX: &str = "nontx";

/// A sequence's state in `reprise.sequences()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqState(pub String, pub Option<i64>, pub i64);

/// A log entry: the header and the raw frontend messages to replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub header: EntryHeader,
    pub messages: Bytes,
}

impl Entry {
    /// Payload bytes: header length (u32), header JSON, messages.
    pub fn encode(&self) -> Bytes {
        let header = serde_json::to_vec(&self.header).expect("serializable");
        let mut b = BytesMut::with_capacity(4 + header.len() + self.messages.len());
        b.put_u32(header.len() as u32);
        b.extend_from_slice(&header);
        b.extend_from_slice(&self.messages);
        b.freeze()
    }

    pub fn decode(payload: &[u8]) -> Result<Entry, String> {
        if payload.len() < 4 {
            return Err("payload shorter than its header length".into());
        }
        let n = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        let header = payload
            .get(4..4 + n)
            .ok_or("payload shorter than its header")?;
        let header: EntryHeader =
            serde_json::from_slice(header).map_err(|e| format!("bad entry header: {e}"))?;
        Ok(Entry {
            header,
            messages: Bytes::copy_from_slice(&payload[4 + n..]),
        })
    }
}

/// Parses `reprise.sequences()` output.
pub fn parse_sequences(json: &str) -> Vec<SeqState> {
    serde_json::from_str::<Vec<(String, Option<i64>, i64)>>(json)
        .map(|v| v.into_iter().map(|(n, l, s)| SeqState(n, l, s)).collect())
        .unwrap_or_default()
}

/// The (before, after) states of changed sequences from a log row's
/// `sequences` column.
pub fn sequences_column(column: Option<&str>) -> (Vec<SeqState>, Vec<SeqState>) {
    let Some(text) = column else {
        return (Vec::new(), Vec::new());
    };
    let v: Vec<serde_json::Value> = serde_json::from_str(text).unwrap_or_default();
    let list = |i: usize| parse_sequences(&v.get(i).map(|x| x.to_string()).unwrap_or_default());
    changed_sequences(&list(0), &list(1))
}

/// Sequences whose state the transaction changed: (before, after) lists.
pub fn changed_sequences(
    before: &[SeqState],
    after: &[SeqState],
) -> (Vec<SeqState>, Vec<SeqState>) {
    let mut b = Vec::new();
    let mut a = Vec::new();
    for s in after {
        match before.iter().find(|x| x.0 == s.0) {
            Some(old) if old.1 == s.1 => {}
            Some(old) => {
                b.push(old.clone());
                a.push(s.clone());
            }
            None => a.push(s.clone()),
        }
    }
    (b, a)
}

/// Whether `text` contains `word` in any ASCII case, without copying the
/// text (a pre-check that runs on every write).
pub fn mentions(text: &[u8], word: &[u8]) -> bool {
    text.windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// The names of a `FuncCall` node in pg_query's JSON form, as written
/// (`["pg_catalog", "now"]`); empty when it has none.
pub(crate) fn function_names(call: &serde_json::Value) -> Vec<&str> {
    call["funcname"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node"]["String"]["sval"].as_str())
        .collect()
}

/// `name` as a quoted SQL identifier.
pub fn quoted_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a dollar-quoted SQL literal (safe whatever
/// standard_conforming_strings is), with a tag the text cannot end early.
pub fn dollar_quoted(text: &str) -> String {
    let mut tag = String::from("$r$");
    // The literal ends at the tag's first occurrence after the opening one.
    while format!("{text}{tag}").find(&tag) != Some(text.len()) {
        tag.insert(1, 'r');
    }
    format!("{tag}{text}{tag}")
}

/// SQL that puts sequences into the given states.
pub fn setval_sql(states: &[SeqState]) -> String {
    states
        .iter()
        .map(|SeqState(name, last, start)| match last {
            Some(v) => format!("SELECT setval('{}', {v}, true);", name.replace('\'', "''")),
            None => format!(
                "SELECT setval('{}', {start}, false);",
                name.replace('\'', "''")
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip() {
        let e = Entry {
            header: EntryHeader {
                now: "2026-01-01T00:00:00.000001Z".into(),
                settings: vec!["SET search_path = a".into()],
                tags: vec!["INSERT 0 2".into()],
                kind: String::new(),
                prepares: Vec::new(),
            },
            messages: Bytes::from_static(b"Q\0\0\0\x0dselect 1\0"),
        };
        assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        assert!(Entry::decode(b"\0\0").is_err());
        assert!(Entry::decode(b"\0\0\0\x09{}").is_err());
    }

    #[test]
    fn only_changed_sequences_are_logged() {
        let before = parse_sequences(r#"[["public.a", 5, 1], ["public.b", null, 1]]"#);
        let after =
            parse_sequences(r#"[["public.a", 5, 1], ["public.b", 2, 1], ["public.c", 1, 1]]"#);
        let (b, a) = changed_sequences(&before, &after);
        assert_eq!(b, vec![SeqState("public.b".into(), None, 1)]);
        assert_eq!(a.len(), 2);
        assert_eq!(setval_sql(&b), "SELECT setval('public.b', 1, false);");
    }

    #[test]
    fn lock_keys_differ_per_group_and_are_stable() {
        assert_eq!(lock_key("app"), lock_key("app"));
        assert_ne!(lock_key("app"), lock_key("app2"));
    }

    fn row(seq: i64) -> LogRow {
        LogRow {
            seq,
            term: 2,
            payload: Bytes::from(vec![0u8; 10]),
            prev_hash: String::new(),
            hash: String::new(),
            sequences: None,
            captured: None,
            committed_us: 0,
        }
    }

    #[test]
    fn recent_rows_are_handed_out_in_runs_without_holes() {
        let mut r = RecentLog::default();
        for s in [3, 1, 2, 5] {
            r.publish(2, row(s));
        }
        let seqs = |v: Vec<std::sync::Arc<LogRow>>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(r.after(2, 0, 10)), [1, 2, 3]);
        assert_eq!(seqs(r.after(2, 1, 1)), [2]);
        // 4 is missing: nothing after 3 yet, but something above it.
        assert!(r.after(2, 3, 10).is_empty());
        assert!(r.has_above(2, 3));
        assert!(!r.has_above(2, 5));
        // Another term's rows are not this run's.
        assert!(r.after(3, 0, 10).is_empty());
        r.forget_through(2);
        assert!(r.after(2, 0, 10).is_empty());
        assert_eq!(seqs(r.after(2, 2, 10)), [3]);
        // A new term starts over.
        r.publish(3, row(9));
        assert!(r.after(2, 2, 10).is_empty());
        assert!(!r.has_above(2, 0));
        assert_eq!(r.bytes, 10);
        // Bounded by count.
        for s in 10..(10 + RecentLog::MAX_ROWS as i64 + 5) {
            r.publish(3, row(s));
        }
        assert_eq!(r.rows.len(), RecentLog::MAX_ROWS);
        assert!(r.after(3, 8, 1).is_empty());
    }

    #[test]
    fn dollar_quoted_text_ends_where_it_should() {
        assert_eq!(dollar_quoted("it's"), "$r$it's$r$");
        assert_eq!(dollar_quoted("a $r$ b"), "$rr$a $r$ b$rr$");
        // A text ending in part of the tag would close it early.
        assert_eq!(dollar_quoted("x$r"), "$rr$x$r$rr$");
        assert_eq!(dollar_quoted("x$"), "$r$x$$r$");
    }
}
