//! Replication: the `reprise` schema, log entries, the write lock, and the
//! appliers that replay every committed write transaction on the
//! subscribers in commit order.

pub mod applier;
pub mod determinism;
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

/// The write lock in shared mode (row-local writes only): sets the
/// transaction timestamp, no sequence snapshot (row-local statements never
/// touch sequences).
pub fn shared_lock_query(group: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock_shared({}), \
         set_config('reprise.now', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), true), \
         NULL",
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
        "SELECT pg_advisory_xact_lock({}), \
         set_config('reprise.now', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), true), \
         reprise.sequences()",
        lock_key(group)
    )
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
}
