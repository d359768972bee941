//! One applier per subscriber: it reads the primary's log after the node's
//! applied seq and replays each entry in one transaction on the node,
//! inserting the same log row there (exactly once, crash-safe). A statement
//! that fails, or reports another command tag than on the primary, stops
//! the applier and marks the node divergent — never skipped.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{Notify, watch};
use tokio_postgres::AsyncMessage;

use super::{Entry, LogRow, SeqState, sequences_column, setval_sql};
use crate::backend::BackendConn;
use crate::group::health::{connect_config, error_text};
use crate::group::{Group, NodeState};
use crate::wire::messages::{self, Reader, put_cstr, put_message};

/// Why applying stopped.
#[derive(Debug)]
enum Stop {
    /// The node or the primary is unreachable: retry later.
    Transient(String),
    /// The node's copy no longer matches: mark it divergent.
    Divergent { seq: i64, reason: String },
}

/// Runs the applier of node `index` until shutdown.
pub async fn run(group: Arc<Group>, index: usize, mut shutdown: watch::Receiver<bool>) {
    let node = group.node(index).clone();
    loop {
        if stopped(&shutdown) {
            return;
        }
        let replaying = matches!(node.state(), NodeState::Up | NodeState::CatchingUp);
        let pause = if !replaying || index == group.primary() {
            Duration::from_millis(200)
        } else {
            match apply_loop(&group, index, &mut shutdown).await {
                Ok(()) => return,
                Err(Stop::Transient(e)) => {
                    tracing::debug!(group = %group.name, node = %node.name, error = %e, "applier will retry");
                    Duration::from_millis(300)
                }
                Err(Stop::Divergent { seq, reason }) => {
                    tracing::error!(group = %group.name, node = %node.name, seq, %reason, "node is divergent: its applier stopped");
                    node.mark_divergent(seq, reason);
                    Duration::from_millis(500)
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Publishes a node's new position.
fn note_applied(group: &Group, node: &crate::group::Node, p: &Prepared) {
    node.set_applied(p.seq as u64);
    node.set_applied_commit_ms(p.committed_us / 1000);
    group.applied_changed();
}

/// Shutdown was asked for, or the server is gone.
fn stopped(rx: &watch::Receiver<bool>) -> bool {
    rx.has_changed().is_err() || *rx.borrow()
}

/// Connects to the primary, LISTENs, and applies until an error.
async fn apply_loop(
    group: &Arc<Group>,
    index: usize,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Stop> {
    let node = group.node(index).clone();
    // The primary and term this run follows; a change ends the run.
    let run_term = group.term();
    let primary = group.node(group.primary()).clone();
    let mut events = group.events();
    let moved = move |g: &Group| g.term() != run_term;
    let transient = |e: &dyn std::fmt::Display| Stop::Transient(e.to_string());

    // The node: a control connection for its position, a raw one to replay.
    let (local, conn) = connect_config(&node.target)
        .connect(node.target.tls.connector())
        .await
        .map_err(|e| Stop::Transient(error_text(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = local
        .query_one("SELECT coalesce(max(seq), 0) FROM reprise.log", &[])
        .await
        .map_err(|e| transient(&e))?;
    let mut applied: i64 = row.get(0);
    node.set_applied(applied as u64);
    let mut replay = BackendConn::connect(&node.target, &[], Duration::from_secs(5))
        .await
        .map_err(|e| transient(&e))?;
    // Statements prepared on `replay`: they live and die with it (any
    // error ends this run and so the connection).
    let mut cache = StatementCache::default();

    // The primary: LISTEN for new entries.
    let (source, mut pconn) = connect_config(&primary.target)
        .connect(primary.target.tls.connector())
        .await
        .map_err(|e| Stop::Transient(error_text(&e)))?;
    let wake = Arc::new(Notify::new());
    // The highest seq the primary announced (the NOTIFY payloads).
    let announced = Arc::new(AtomicI64::new(0));
    let (w, a) = (wake.clone(), announced.clone());
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| pconn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let AsyncMessage::Notification(n) = m {
                if let Ok(seq) = n.payload().parse::<i64>() {
                    a.fetch_max(seq, Ordering::AcqRel);
                }
                w.notify_one();
            }
        }
        w.notify_one();
    });
    source
        .batch_execute(&format!("LISTEN {}", super::LOG_CHANNEL))
        .await
        .map_err(|e| transient(&e))?;
    if node.state() == NodeState::Up && group.head_seq() > applied as u64 {
        node.set_state(NodeState::CatchingUp);
    }

    let fetch = source
        .prepare(&format!(
            "SELECT seq, term, payload, prev_hash, hash, \
             (extract(epoch FROM committed_at) * 1000000)::bigint, sequences, captured \
             FROM reprise.log WHERE seq > $1 ORDER BY seq LIMIT {FETCH_ROWS}"
        ))
        .await
        .map_err(|e| transient(&e))?;
    // Read the primary's log first: this node may be far behind.
    let mut must_fetch = true;
    loop {
        if stopped(shutdown) {
            return Ok(());
        }
        if moved(group) || index == group.primary() {
            return Err(Stop::Transient("the group has a new primary".into()));
        }
        if !matches!(node.state(), NodeState::Up | NodeState::CatchingUp) {
            return Err(Stop::Transient(format!(
                "the node is {}",
                node.state().as_str()
            )));
        }
        let published = group.published.notified();
        tokio::pin!(published);
        published.as_mut().enable();
        let mut rows = Vec::new();
        if !must_fetch {
            // Rows this proxy's sessions committed: no read of the primary.
            let (recent, above) = group.recent_after(run_term, applied, FETCH_ROWS);
            rows = recent;
            let behind = announced
                .load(Ordering::Acquire)
                .max(group.head_seq() as i64)
                > applied;
            if rows.is_empty() && (above || behind) {
                // The next row may be on its way from a session whose
                // COMMIT answer is still in flight: give it a moment.
                let _ = tokio::time::timeout(Duration::from_millis(2), published).await;
                rows = group.recent_after(run_term, applied, FETCH_ROWS).0;
                must_fetch = rows.is_empty();
            } else if rows.is_empty() {
                tokio::select! {
                    _ = published => {}
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(1000)) => must_fetch = true,
                    _ = shutdown.changed() => {}
                    _ = events.changed() => {}
                }
                if source.is_closed() {
                    return Err(Stop::Transient("lost the connection to the primary".into()));
                }
                continue;
            }
            if !rows.is_empty() && node.state() == NodeState::CatchingUp {
                node.set_state(NodeState::Up);
            }
        }
        if must_fetch {
            must_fetch = false;
            // A hung primary never answers: a failover ends the wait.
            let after: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&applied];
            let fetched = tokio::select! {
                r = source.query(&fetch, &after) => r.map_err(|e| transient(&e))?,
                _ = group.until(&mut events, |g| g.term() != run_term) => {
                    return Err(Stop::Transient("the group has a new primary".into()));
                }
            };
            rows = fetched.iter().map(|r| Arc::new(log_row(r))).collect();
            if rows.len() == FETCH_ROWS {
                must_fetch = true;
            }
            if rows.is_empty() {
                if node.state() == NodeState::CatchingUp {
                    node.set_state(NodeState::Up);
                }
                continue;
            }
        }
        if let Some(next) = rows.first().map(|r| r.seq)
            && next > applied + 1
        {
            // Seqs have no holes: the entries this node needs next were
            // trimmed from the primary's log while it was away.
            return Err(Stop::Divergent {
                seq: applied + 1,
                reason: format!(
                    "entries {}..{} were trimmed from the primary's log before this node \
                     applied them (replication.log_keep_entries); it must be re-seeded",
                    applied + 1,
                    next - 1
                ),
            });
        }
        if let Some(last) = rows.last() {
            group.observe_head(run_term, last.seq as u64);
        }
        let mut batch: Vec<Prepared> = Vec::new();
        let mut bytes = 0usize;
        for row in &rows {
            let seq = row.seq;
            let entry =
                Entry::decode(&row.payload).map_err(|reason| Stop::Divergent { seq, reason })?;
            let nontx = entry.header.kind == super::NONTX;
            // Bounded so the node's answers never fill the socket while we
            // are still writing (both sides would wait on each other).
            if nontx || bytes > (1 << 20) || batch.len() >= 32 {
                let done = std::mem::take(&mut batch);
                bytes = 0;
                let _held = hold(group, &node, run_term).await?;
                apply_batch(&mut replay, &done, |p| {
                    applied = p.seq;
                    note_applied(group, &node, p);
                })
                .await?;
            }
            if nontx {
                let _held = hold(group, &node, run_term).await?;
                run_outside_transaction(&mut replay, seq, &entry).await?;
            }
            let p = prepare(row, &entry, nontx, &mut cache);
            bytes += p.buf.len();
            batch.push(p);
        }
        if !batch.is_empty() {
            let _held = hold(group, &node, run_term).await?;
            apply_batch(&mut replay, &batch, |p| {
                applied = p.seq;
                note_applied(group, &node, p);
            })
            .await?;
        }
        forget_applied_rows(group);
    }
}

/// Rows fetched from the primary's log at most per read.
const FETCH_ROWS: usize = 500;

/// A row of the log fetch.
fn log_row(r: &tokio_postgres::Row) -> LogRow {
    LogRow {
        seq: r.get(0),
        term: r.get(1),
        payload: Bytes::from(r.get::<_, Vec<u8>>(2)),
        prev_hash: r.get(3),
        hash: r.get(4),
        committed_us: r.get(5),
        sequences: r.get(6),
        captured: r.get(7),
    }
}

/// Drops the published rows every replaying subscriber has applied.
fn forget_applied_rows(group: &Group) {
    let primary = group.primary();
    let low = (0..group.slots())
        .filter(|&i| i != primary)
        .map(|i| group.node(i))
        .filter(|n| matches!(n.state(), NodeState::Up | NodeState::CatchingUp))
        .map(|n| n.applied())
        .min();
    if let Some(low) = low {
        group.forget_recent_through(low as i64);
    }
}

/// Takes the node's apply lock for one batch, if the primary this run
/// follows is still the primary and the node still replays.
async fn hold<'a>(
    group: &Group,
    node: &'a crate::group::Node,
    term: u64,
) -> Result<tokio::sync::MutexGuard<'a, ()>, Stop> {
    let guard = node.apply_lock.lock().await;
    if group.term() != term {
        return Err(Stop::Transient("the group has a new primary".into()));
    }
    if !matches!(node.state(), NodeState::Up | NodeState::CatchingUp) {
        return Err(Stop::Transient(format!(
            "the node is {}",
            node.state().as_str()
        )));
    }
    Ok(guard)
}

/// One entry encoded for replay: the bytes to send and what to expect.
struct Prepared {
    seq: i64,
    committed_us: i64,
    buf: BytesMut,
    layout: Layout,
    tags: Vec<String>,
    check_tags: bool,
}

/// How a prepared entry's answers are laid out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// BEGIN, the log row, the setup, each captured unit (this many) with
    /// its own ReadyForQuery, COMMIT.
    Units(usize),
    /// Plain DML in few round trips: BEGIN with the setup; the log row and
    /// the statements as one extended batch (one Sync); with `simple`, the
    /// captured simple queries as one string; COMMIT.
    Compact { simple: bool },
}

impl Layout {
    /// ReadyForQuery messages the entry's answers hold.
    fn rfqs(self) -> usize {
        match self {
            Layout::Units(n) => n + 4,
            Layout::Compact { simple } => 3 + simple as usize,
        }
    }
}

/// Encodes one entry as one transaction: setup, the captured messages, the
/// log row, COMMIT. An entry of plain DML replays its statements through
/// the node's statement cache; any other entry replays its messages as
/// captured, after DEALLOCATE ALL (it may prepare, deallocate or change the
/// tables the cached statements use).
fn prepare(row: &LogRow, entry: &Entry, nontx: bool, cache: &mut StatementCache) -> Prepared {
    let h = &entry.header;
    let (before, after): (Vec<SeqState>, Vec<SeqState>) =
        sequences_column(row.sequences.as_deref());
    let messages: &[u8] = if nontx { &[] } else { &entry.messages };
    // Bounded: ad-hoc statements (literals in the text) would otherwise
    // pile up on the node.
    // Temporary tables an entry makes must not outlive it on the replay
    // connection (the next entry could be another session's, whose
    // unqualified names they would shadow): an entry whose text mentions
    // one is replayed in full and drops them at its end.
    let cached = !nontx
        && only_dml(&h.tags)
        && h.prepares.is_empty()
        && !mentions_temp(messages)
        && cache.names.len() < MAX_CACHED;
    let mut setup = format!("{RESET_SESSION}; ");
    if !cached {
        setup.push_str("DEALLOCATE ALL; ");
    }
    for s in h.settings.iter().chain(&h.prepares) {
        setup.push_str(s);
        setup.push_str("; ");
    }
    setup.push_str(&format!(
        "SET LOCAL reprise.now = '{}'; {}",
        h.now.replace('\'', "''"),
        setval_sql(&before)
    ));
    if let Some(values) = &row.captured {
        // reprise.captured() returns these, in order, instead of computing.
        // Dollar-quoted: the entry's settings may turn
        // standard_conforming_strings off.
        setup.push_str(&format!(
            "SET LOCAL reprise.replay_values = {}; SET LOCAL reprise.replay_pos = '0'; ",
            super::dollar_quoted(values)
        ));
    }
    // The log row first, before anything else (setval is not transactional):
    // a second applier replaying the same entry (another proxy's) waits on
    // it and then fails on its key, having changed nothing.
    let mut buf = BytesMut::new();
    let compact = if cached && before.is_empty() {
        compact_kind(messages)
    } else {
        None
    };
    let layout = match compact {
        Some(simple) => {
            // Nothing non-transactional runs before the log row here (no
            // setval), so the setup may come first.
            buf.extend_from_slice(&messages::query(&format!("{REPLAY_BEGIN}; {setup}")));
            append_applied(&mut buf, row, cache);
            if simple {
                put_message(b'S', b"", &mut buf);
                joined_queries(messages, &mut buf);
            } else {
                let mut units = BytesMut::new();
                cache.rewrite(messages, &mut units);
                without_syncs(&units, &mut buf);
                put_message(b'S', b"", &mut buf);
            }
            Layout::Compact { simple }
        }
        None => {
            buf.extend_from_slice(&messages::query(REPLAY_BEGIN));
            append_applied(&mut buf, row, cache);
            put_message(b'S', b"", &mut buf);
            buf.extend_from_slice(&messages::query(&setup));
            if cached {
                cache.rewrite(messages, &mut buf);
            } else {
                cache.clear();
                buf.extend_from_slice(messages);
            }
            Layout::Units(count_units(messages))
        }
    };
    let discard = if cached || nontx {
        ""
    } else {
        "DISCARD TEMP; "
    };
    // Values asked for that the entry did not record are only allowed in
    // parts rolled back to a savepoint, which also drop the mark.
    let check = if row.captured.is_some() {
        "SELECT reprise.replay_check(); "
    } else {
        ""
    };
    buf.extend_from_slice(&messages::query(&format!(
        "{check}{}{discard}COMMIT",
        setval_sql(&after)
    )));
    Prepared {
        seq: row.seq,
        committed_us: row.committed_us,
        buf,
        layout,
        tags: h.tags.clone(),
        check_tags: !nontx,
    }
}

/// Whether an entry's messages can replay in the compact layout: only
/// extended-protocol statements (`Some(false)`: their Syncs can go, the
/// batch ends with one), or only simple queries (`Some(true)`: they can run
/// as one string). COPY data or a mix keeps the unit-by-unit layout.
fn compact_kind(messages: &[u8]) -> Option<bool> {
    let (mut simple, mut extended) = (false, false);
    let mut rest = messages;
    while !rest.is_empty() {
        let (tag, _, next) = split_frame(rest)?;
        match tag {
            b'Q' => simple = true,
            b'P' | b'B' | b'D' | b'E' | b'C' | b'S' => extended = true,
            _ => return None,
        }
        rest = next;
    }
    match (simple, extended) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ => None,
    }
}

/// One frame of raw messages: (tag, body, the rest); None if malformed.
fn split_frame(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let len = i32::from_be_bytes(b.get(1..5)?.try_into().ok()?);
    let len = usize::try_from(len).ok().filter(|&l| l >= 4)?;
    let body = b.get(5..len + 1)?;
    Some((b[0], body, &b[len + 1..]))
}

/// Copies frames to `out`, leaving out the Syncs (an error then skips the
/// rest of the batch, which ends the entry as a failed one anyway).
fn without_syncs(mut b: &[u8], out: &mut BytesMut) {
    while let Some((tag, body, next)) = split_frame(b) {
        if tag != b'S' {
            out.extend_from_slice(&b[..body.len() + 5]);
        }
        b = next;
    }
}

/// The texts of simple queries as one Query message, bytes as captured
/// (the session's client_encoding may not be UTF-8). Each text parsed on
/// its own on the primary, so only a trailing line comment can reach past
/// its end: the separator starts on a new line.
fn joined_queries(mut b: &[u8], out: &mut BytesMut) {
    let mut sql = Vec::new();
    while let Some((_, body, next)) = split_frame(b) {
        if !sql.is_empty() {
            sql.extend_from_slice(b"\n;\n");
        }
        sql.extend_from_slice(body.strip_suffix(b"\0").unwrap_or(body));
        b = next;
    }
    sql.push(0);
    put_message(b'Q', &sql, out);
}

/// Whether captured messages mention a temporary object (`TEMP`,
/// `TEMPORARY`, `pg_temp`, in any case; a false match only costs speed).
fn mentions_temp(messages: &[u8]) -> bool {
    super::mentions(messages, b"temp")
}

/// Whether every statement of an entry was plain DML (by its command tags
/// on the primary): then it cannot have changed what cached statements mean.
fn only_dml(tags: &[String]) -> bool {
    tags.iter().all(|t| {
        matches!(
            t.split(' ').next().unwrap_or(""),
            "INSERT" | "UPDATE" | "DELETE" | "SELECT" | "COPY" | "MERGE"
        )
    })
}

/// At most this many statements stay prepared per replay connection.
const MAX_CACHED: usize = 500;

/// The statements an applier prepared on its replay connection, by their
/// text and parameter types: a captured Parse of the same statement is not
/// sent again (no parse and plan per entry), and the entry's Bind,
/// Describe and Close use the cached name.
#[derive(Default)]
struct StatementCache {
    /// Parse body after the name (query, parameter types) → cached name.
    names: std::collections::HashMap<Bytes, String>,
    next: u64,
}

impl StatementCache {
    /// The node dropped every prepared statement (DEALLOCATE ALL).
    fn clear(&mut self) {
        self.names.clear();
    }

    /// The cached name of a Parse body's statement, and the Parse to send
    /// first if the node does not have it yet.
    fn statement(&mut self, parse_rest: &[u8], out: &mut BytesMut) -> String {
        if let Some(name) = self.names.get(parse_rest) {
            return name.clone();
        }
        self.next += 1;
        let name = format!("reprise_{}", self.next);
        let mut body = BytesMut::new();
        put_cstr(&mut body, &name);
        body.extend_from_slice(parse_rest);
        put_message(b'P', &body, out);
        self.names
            .insert(Bytes::copy_from_slice(parse_rest), name.clone());
        name
    }

    /// Appends an entry's captured messages to `out`, with its statements
    /// renamed to cached ones.
    fn rewrite(&mut self, messages: &[u8], out: &mut BytesMut) {
        // The entry's own statement names → cached names.
        let mut local: std::collections::HashMap<&str, String> = Default::default();
        let mut rest = messages;
        while rest.len() >= 5 {
            let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
            let Some(len) = usize::try_from(len)
                .ok()
                .filter(|&l| l >= 4 && l < rest.len())
            else {
                out.extend_from_slice(rest);
                return;
            };
            let (tag, body, raw) = (rest[0], &rest[5..len + 1], &rest[..len + 1]);
            rest = &rest[len + 1..];
            let mut r = Reader::new(body);
            match tag {
                b'P' => match r.cstr() {
                    Some(own) => {
                        let name = self.statement(r.rest(), out);
                        local.insert(own, name);
                    }
                    None => out.extend_from_slice(raw),
                },
                b'B' => {
                    let renamed = r.cstr().and_then(|portal| {
                        let name = local.get(r.cstr()?)?;
                        let mut b = BytesMut::new();
                        put_cstr(&mut b, portal);
                        put_cstr(&mut b, name);
                        b.extend_from_slice(r.rest());
                        Some(b)
                    });
                    match renamed {
                        Some(b) => put_message(b'B', &b, out),
                        None => out.extend_from_slice(raw),
                    }
                }
                b'D' | b'C' if r.u8() == Some(b'S') => {
                    let stmt = r.cstr();
                    let name = stmt.and_then(|s| local.get(s).cloned());
                    match (tag, stmt, name) {
                        // The cached statement stays; only the entry's name
                        // for it goes (nothing checks the CloseComplete).
                        (b'C', Some(stmt), Some(_)) => {
                            local.remove(stmt);
                        }
                        (b'D', _, Some(n)) => {
                            let mut b = BytesMut::new();
                            b.extend_from_slice(b"S");
                            put_cstr(&mut b, &n);
                            put_message(b'D', &b, out);
                        }
                        _ => out.extend_from_slice(raw),
                    }
                }
                _ => out.extend_from_slice(raw),
            }
        }
        out.extend_from_slice(rest);
    }
}

/// Which part of a replayed entry an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    Begin,
    LogRow,
    Setup,
    Statement,
    Commit,
}

impl Part {
    fn doing(self) -> &'static str {
        match self {
            Part::Begin => "beginning the transaction",
            Part::LogRow => "recording the entry",
            Part::Setup => "setting up the transaction",
            Part::Statement => "replaying a statement",
            Part::Commit => "committing",
        }
    }
}

/// The part an answer belongs to, after `rfqs` ReadyForQuery messages and
/// `completes` CommandCompletes since the last.
fn part_of(layout: Layout, rfqs: usize, completes: usize) -> Part {
    match layout {
        Layout::Units(units) => match rfqs {
            0 => Part::Begin,
            1 => Part::LogRow,
            2 => Part::Setup,
            r if r <= units + 2 => Part::Statement,
            _ => Part::Commit,
        },
        Layout::Compact { simple } => match (rfqs, completes) {
            (0, _) => Part::Setup,
            (1, 0) => Part::LogRow,
            (1, _) if simple => Part::LogRow,
            (1, _) => Part::Statement,
            (2, _) if simple => Part::Statement,
            _ => Part::Commit,
        },
    }
}

/// Reads one replayed entry's responses and checks them.
async fn read_result(conn: &mut BackendConn, p: &Prepared) -> Result<(), Stop> {
    let total = p.layout.rfqs();
    let mut rfqs = 0;
    // CommandCompletes since the last ReadyForQuery.
    let mut completes = 0;
    let mut tags = Vec::new();
    let mut error: Option<String> = None;
    let mut moved = false;
    while rfqs < total {
        let f = next_frame(conn).await?;
        let part = part_of(p.layout, rfqs, completes);
        match f.tag {
            b'Z' => {
                rfqs += 1;
                completes = 0;
            }
            b'C' => {
                if part == Part::Statement {
                    tags.push(Reader::new(f.body()).cstr().unwrap_or_default().to_string());
                }
                completes += 1;
            }
            b'E' if error.is_none() => {
                let code = messages::error_code(f.body()).unwrap_or_default();
                // The node's position moved under us (another proxy's
                // applier replayed this entry): not a divergence; re-read
                // the position.
                moved = part == Part::LogRow && matches!(code.as_str(), "40P03" | "23505");
                error = Some(format!(
                    "{}: {} (SQLSTATE {code})",
                    part.doing(),
                    messages::error_message(f.body()),
                ));
            }
            _ => {}
        }
    }
    if moved {
        return Err(Stop::Transient(format!(
            "entry {} was applied by another applier meanwhile",
            p.seq
        )));
    }
    if let Some(reason) = error {
        return Err(Stop::Divergent { seq: p.seq, reason });
    }
    if p.check_tags && tags != p.tags {
        return Err(Stop::Divergent {
            seq: p.seq,
            reason: format!(
                "the statements reported {tags:?} here but {:?} on the primary",
                p.tags
            ),
        });
    }
    Ok(())
}

/// Replays a run of entries, pipelined: every entry is still its own
/// transaction, and an entry that fails makes every later one fail too
/// (`reprise.applied` checks the chain), so order is kept.
async fn apply_batch(
    conn: &mut BackendConn,
    batch: &[Prepared],
    mut applied: impl FnMut(&Prepared),
) -> Result<(), Stop> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut buf = BytesMut::new();
    for p in batch {
        buf.extend_from_slice(&p.buf);
    }
    conn.send(&buf)
        .await
        .map_err(|e| Stop::Transient(e.to_string()))?;
    let mut first_error = None;
    for p in batch {
        match read_result(conn, p).await {
            Ok(()) if first_error.is_none() => applied(p),
            Ok(()) => {}
            Err(Stop::Transient(e)) => return Err(Stop::Transient(e)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => {
            let _ = conn.send(&messages::query("ROLLBACK")).await;
            Err(e)
        }
        None => Ok(()),
    }
}

/// How a replay's transaction begins: its access mode and isolation said,
/// since the session defaults in force then are the previous entry's (its
/// `SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY`, say), its own
/// settings coming after the BEGIN. Replays run one at a time, each seeing
/// every commit before it: the serial order the write lock made.
const REPLAY_BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED, READ WRITE";

/// What the replay connection's session is put back to before each entry
/// sets its own settings: RESET ALL alone leaves the role and session
/// authorization a previous entry's SET ROLE / SET SESSION AUTHORIZATION
/// made.
const RESET_SESSION: &str = "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL";

/// Runs a command that cannot run in a transaction block (CREATE INDEX
/// CONCURRENTLY), idempotently: "already exists" / "does not exist" mean a
/// previous attempt got that far.
async fn run_outside_transaction(
    conn: &mut BackendConn,
    seq: i64,
    entry: &Entry,
) -> Result<(), Stop> {
    let mut setup = String::from(RESET_SESSION);
    for s in &entry.header.settings {
        setup.push_str("; ");
        setup.push_str(s);
    }
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&messages::query(&setup));
    buf.extend_from_slice(&entry.messages);
    conn.send(&buf)
        .await
        .map_err(|e| Stop::Transient(e.to_string()))?;
    let total = 1 + count_units(&entry.messages);
    let mut rfqs = 0;
    let mut error = None;
    while rfqs < total {
        let f = next_frame(conn).await?;
        match f.tag {
            b'Z' => rfqs += 1,
            b'E' if error.is_none() => {
                let code = messages::error_code(f.body()).unwrap_or_default();
                if !matches!(code.as_str(), "42P07" | "42704") {
                    error = Some(format!(
                        "replaying a non-transactional command: {} (SQLSTATE {code})",
                        messages::error_message(f.body())
                    ));
                }
            }
            _ => {}
        }
    }
    match error {
        Some(reason) => Err(Stop::Divergent { seq, reason }),
        None => Ok(()),
    }
}

/// The node's next message; a closed or broken connection, or a FATAL
/// error (the node closing it: shutdown, termination), is transient.
async fn next_frame(conn: &mut BackendConn) -> Result<crate::wire::Frame, Stop> {
    match conn.reader.next().await {
        Ok(Some(f)) if f.tag == b'E' && messages::error_is_fatal(f.body()) => {
            Err(Stop::Transient(format!(
                "the node closed the connection: {}",
                messages::error_message(f.body())
            )))
        }
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(Stop::Transient("the node closed the connection".into())),
        Err(e) => Err(Stop::Transient(e.to_string())),
    }
}

/// Units (each ending in a ReadyForQuery) in raw frontend messages.
pub fn count_units(messages: &[u8]) -> usize {
    let mut n = 0;
    let mut rest = messages;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        // A length below 4 is malformed: stop there (a negative one made
        // `len + 1` overflow: a panic, or an endless loop in release).
        let Some(len) = usize::try_from(len).ok().filter(|&l| l >= 4) else {
            break;
        };
        if matches!(rest[0], b'Q' | b'S') {
            n += 1;
        }
        rest = rest.get(len + 1..).unwrap_or(&[]);
    }
    n
}

/// `SELECT reprise.applied(…)` with the payload as a binary parameter, as
/// a cached statement (the caller ends the batch with a Sync).
fn append_applied(buf: &mut BytesMut, row: &LogRow, cache: &mut StatementCache) {
    let mut parse = BytesMut::new();
    put_cstr(
        &mut parse,
        "SELECT reprise.applied($1::bigint, $2::bigint, $3::bytea, $4::text, $5::text, $6::text, \
         to_timestamp($7::bigint / 1000000.0), $8::text)",
    );
    parse.extend_from_slice(&0i16.to_be_bytes());
    let name = cache.statement(&parse, buf);
    let params: [(i16, Option<Bytes>); 8] = [
        (0, Some(Bytes::from(row.seq.to_string()))),
        (0, Some(Bytes::from(row.term.to_string()))),
        (1, Some(row.payload.clone())),
        (0, Some(Bytes::from(row.prev_hash.to_string()))),
        (0, Some(Bytes::from(row.hash.to_string()))),
        (0, row.sequences.clone().map(Bytes::from)),
        (0, Some(Bytes::from(row.committed_us.to_string()))),
        (0, row.captured.clone().map(Bytes::from)),
    ];
    put_message(b'B', &bind_body_for(&name, &params), buf);
    put_message(b'E', b"\0\0\0\0\0", buf);
}

/// A Bind body for the unnamed portal and statement (None is NULL).
pub fn bind_body(params: &[(i16, Option<Bytes>)]) -> BytesMut {
    bind_body_for("", params)
}

/// A Bind body of statement `stmt` for the unnamed portal.
pub fn bind_body_for(stmt: &str, params: &[(i16, Option<Bytes>)]) -> BytesMut {
    let mut b = BytesMut::new();
    put_cstr(&mut b, "");
    put_cstr(&mut b, stmt);
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for (fmt, _) in params {
        b.extend_from_slice(&fmt.to_be_bytes());
    }
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for (_, v) in params {
        match v {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of raw messages: (tag, body).
    fn frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while b.len() >= 5 {
            let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            out.push((b[0], b[5..len + 1].to_vec()));
            b = &b[len + 1..];
        }
        out
    }

    fn entry_messages(stmt: &str, sql: &str) -> BytesMut {
        let mut b = BytesMut::new();
        let mut parse = BytesMut::new();
        put_cstr(&mut parse, stmt);
        put_cstr(&mut parse, sql);
        parse.extend_from_slice(&0i16.to_be_bytes());
        put_message(b'P', &parse, &mut b);
        let mut bind = BytesMut::new();
        put_cstr(&mut bind, "");
        put_cstr(&mut bind, stmt);
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        put_message(b'B', &bind, &mut b);
        let mut describe = BytesMut::from(&b"S"[..]);
        put_cstr(&mut describe, stmt);
        put_message(b'D', &describe, &mut b);
        put_message(b'E', b"\0\0\0\0\0", &mut b);
        put_message(b'S', b"", &mut b);
        let mut close = BytesMut::from(&b"S"[..]);
        put_cstr(&mut close, stmt);
        put_message(b'C', &close, &mut b);
        b
    }

    #[test]
    fn replayed_statements_are_parsed_once_per_connection() {
        let mut cache = StatementCache::default();
        let mut first = BytesMut::new();
        cache.rewrite(&entry_messages("P_1", "update t set a = 1"), &mut first);
        let f = frames(&first);
        let tags: Vec<u8> = f.iter().map(|(t, _)| *t).collect();
        // Parsed under the cache's name; the entry's Close is dropped.
        assert_eq!(tags, b"PBDES");
        assert!(f[0].1.starts_with(b"reprise_1\0update t set a = 1\0"));
        assert_eq!(&f[1].1[..11], b"\0reprise_1\0");
        assert_eq!(f[2].1, b"Sreprise_1\0");

        // The same statement under another name in a later entry: no Parse.
        let mut second = BytesMut::new();
        cache.rewrite(&entry_messages("other", "update t set a = 1"), &mut second);
        let f = frames(&second);
        assert_eq!(f.iter().map(|(t, _)| *t).collect::<Vec<u8>>(), b"BDES");
        assert_eq!(&f[0].1[..11], b"\0reprise_1\0");
        assert_eq!(count_units(&second), 1);

        // Another text is another statement; after a clear, parsed again.
        let mut third = BytesMut::new();
        cache.rewrite(&entry_messages("", "delete from t"), &mut third);
        assert!(
            frames(&third)[0]
                .1
                .starts_with(b"reprise_2\0delete from t\0")
        );
        cache.clear();
        let mut fourth = BytesMut::new();
        cache.rewrite(&entry_messages("P_1", "update t set a = 1"), &mut fourth);
        assert_eq!(frames(&fourth)[0].0, b'P');
    }

    #[test]
    fn only_plain_dml_entries_use_the_cache() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(only_dml(&t(&[
            "INSERT 0 1",
            "UPDATE 3",
            "SELECT 1",
            "DELETE 0"
        ])));
        assert!(!only_dml(&t(&["INSERT 0 1", "ALTER TABLE"])));
        assert!(!only_dml(&t(&["DEALLOCATE ALL"])));
        assert!(!only_dml(&t(&["PREPARE"])));
    }

    #[test]
    fn counts_units_in_raw_messages() {
        let mut b = BytesMut::new();
        b.extend_from_slice(&messages::query("insert into t values (1)"));
        put_message(b'P', b"\0select 1\0\0\0", &mut b);
        put_message(b'B', b"\0\0\0\0\0\0\0\0", &mut b);
        put_message(b'E', b"\0\0\0\0\0", &mut b);
        put_message(b'S', b"", &mut b);
        put_message(b'd', b"1\t2\n", &mut b);
        assert_eq!(count_units(&b), 2);
        assert_eq!(count_units(&[]), 0);
        assert_eq!(count_units(&[b'Q', 0, 0]), 0);
    }

    #[test]
    fn count_units_stops_at_malformed_lengths() {
        // Found by the log_entry fuzz target: a negative length overflowed
        // (a panic in debug builds, an endless loop in release).
        let mut b = BytesMut::new();
        b.extend_from_slice(&messages::query("select 1"));
        b.extend_from_slice(&[b'Q', 0xff, 0xff, 0xff, 0xff, b'x', b'x']);
        assert_eq!(count_units(&b), 1);
        assert_eq!(count_units(&[b'S', 0x80, 0, 0, 0]), 0);
        assert_eq!(count_units(&[b'S', 0, 0, 0, 3, b'S', 0, 0, 0, 4]), 0);
        assert_eq!(count_units(&[b'S', 0, 0, 0, 4, b'S', 0, 0, 0, 4]), 2);
    }

    #[test]
    fn plain_statements_replay_in_few_round_trips() {
        let ext = entry_messages("s", "update t set a = 1");
        let mut simple = BytesMut::new();
        simple.extend_from_slice(&messages::query("update t set a = 1 -- note"));
        simple.extend_from_slice(&messages::query("delete from t;"));
        assert_eq!(compact_kind(&ext), Some(false));
        assert_eq!(compact_kind(&simple), Some(true));
        // A mix, COPY data, or a malformed frame keep the unit layout.
        let mut mixed = ext.clone();
        mixed.extend_from_slice(&simple);
        assert_eq!(compact_kind(&mixed), None);
        let mut copy = simple.clone();
        put_message(b'd', b"1\n", &mut copy);
        assert_eq!(compact_kind(&copy), None);
        assert_eq!(compact_kind(&[b'Q', 0, 0, 0, 9, b'x']), None);

        let mut out = BytesMut::new();
        without_syncs(&ext, &mut out);
        let kept: Vec<u8> = frames(&out).iter().map(|(t, _)| *t).collect();
        assert_eq!(kept, b"PBDEC");

        let mut q = BytesMut::new();
        joined_queries(&simple, &mut q);
        let f = frames(&q);
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0].1,
            b"update t set a = 1 -- note\n;\ndelete from t;\0".to_vec()
        );
    }

    #[test]
    fn answers_are_told_apart_by_part() {
        let units = Layout::Units(2);
        assert_eq!(units.rfqs(), 6);
        assert_eq!(part_of(units, 1, 0), Part::LogRow);
        assert_eq!(part_of(units, 3, 0), Part::Statement);
        assert_eq!(part_of(units, 4, 0), Part::Statement);
        assert_eq!(part_of(units, 5, 0), Part::Commit);
        let ext = Layout::Compact { simple: false };
        assert_eq!(ext.rfqs(), 3);
        assert_eq!(part_of(ext, 0, 3), Part::Setup);
        assert_eq!(part_of(ext, 1, 0), Part::LogRow);
        assert_eq!(part_of(ext, 1, 1), Part::Statement);
        assert_eq!(part_of(ext, 2, 0), Part::Commit);
        let simple = Layout::Compact { simple: true };
        assert_eq!(simple.rfqs(), 4);
        assert_eq!(part_of(simple, 1, 0), Part::LogRow);
        assert_eq!(part_of(simple, 2, 1), Part::Statement);
        assert_eq!(part_of(simple, 3, 0), Part::Commit);
    }
}
