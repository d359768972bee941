//! Units of work and where they go: classification, the routing decision,
//! preparing statements on demand, replaying SETs, and what happens when a
//! backend is lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::statements::{self, StmtDef};
use super::{End, MAX_BATCH_BYTES, Session, fill_backend, write};
use crate::backend::{BackendConn, ConnectError, Expect};
use crate::group::NodeState;
use crate::replication::dollar_quoted;
use crate::route::classify::{set_config_sql, split_block_settings, split_transaction_control};
use crate::route::{Classification, SettingArg, SqlPrepared};
use crate::wire::Frame;
use crate::wire::messages::{self, PgError};

/// A part of a client's query string or batch that runs as a unit of its
/// own (see `Session::runs_split`).
#[derive(Debug)]
pub enum Part {
    /// Statements of a query string, classified when their turn comes
    /// (what ran before may have changed the catalog).
    Query(String),
    /// Messages of a batch, with a Sync of their own unless last.
    Unit(Box<Unit>),
}

/// Where a unit may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Only reads: any live node, preferably a subscriber.
    Read,
    /// Must run on the primary.
    Write,
    /// Runs anywhere and changes nothing (Parse/Describe only): the primary.
    Any,
}

/// A message and the statement definition it refers to.
#[derive(Debug, Clone)]
pub struct Item {
    pub frame: Frame,
    /// For Parse: the definition and the generation the name had before.
    /// For Bind/Describe-statement: the definition to make sure of.
    pub stmt: Option<(Arc<StmtDef>, Option<u64>)>,
}

/// A client unit: a simple Query, or extended messages ending in a Sync
/// (or a Flush, or a slice of a large batch).
#[derive(Debug, Clone)]
pub struct Unit {
    pub items: Vec<Item>,
    pub route: Route,
    /// SET statements the unit makes, to replay on other backends.
    pub settings: Vec<String>,
    /// The unit pins the session to the primary.
    pub pin: Option<&'static str>,
    /// ReadyForQuery messages the unit will produce.
    pub syncs: usize,
    /// It is a simple Query (destroys the unnamed statement).
    pub simple: bool,
    /// A node not to use (a retry after it failed).
    pub avoid: Option<usize>,
    /// It may change data (more than settings and transaction control).
    pub writes: bool,
    /// Of its writes, some are more than savepoints (SAVEPOINT, RELEASE,
    /// ROLLBACK TO are captured with a write transaction but need no
    /// write lock).
    pub changes_data: bool,
    /// It begins a transaction block: Some(read only).
    pub begin: Option<bool>,
    /// It sets the access mode of the transaction under way: Some(read
    /// only) (`SET TRANSACTION READ ONLY`…).
    pub tx_access: Option<bool>,
    /// It sets the isolation level of the transaction under way:
    /// Some(snapshot isolation) (`SET TRANSACTION ISOLATION LEVEL …`).
    pub tx_isolation: Option<bool>,
    /// Every statement it has sets the transaction under way (`SET
    /// TRANSACTION …`): none takes a snapshot.
    pub only_tx_settings: bool,
    /// It is a lone BEGIN or START TRANSACTION in a simple Query.
    pub lone_begin: bool,
    /// It is a lone `SET TRANSACTION` of modes in a simple Query.
    pub lone_tx_modes: bool,
    /// The client already has its answer (a BEGIN answered when it came,
    /// sent with the statement after it): nothing of it is relayed.
    pub answered: bool,
    /// It calls `pg_export_snapshot()`.
    pub exports_snapshot: bool,
    /// It takes the snapshot of another transaction (`SET TRANSACTION
    /// SNAPSHOT 'id'`).
    pub imports_snapshot: Option<String>,
    /// Its `SET LOCAL` statements of ordinary settings.
    pub local_settings: Vec<String>,
    /// It ends a transaction block.
    pub ends_tx: bool,
    /// It must not run: answer with this error instead.
    pub refused: Option<PgError>,
    /// Writes to tables the catalog did not know yet: checked again
    /// against a fresh catalog before the unit runs.
    pub recheck: Vec<String>,
    /// The Query as the client sent it, when it writes and holds
    /// transaction control among other statements, or holds `SET
    /// TRANSACTION` among others: it may have to run as separate queries
    /// (`Session::runs_split`, `dispatch`).
    pub whole: Option<Frame>,
    /// What it does to SQL-level prepared statements, in order (of its
    /// Query, or of the statements it binds).
    pub prepared: Vec<SqlPrepared>,
}

impl Unit {
    /// A Query that makes the node raise `e` (SQLSTATE, message, detail,
    /// hint): for an error that must abort the transaction block there.
    pub(super) fn raising(e: &PgError) -> Unit {
        let mut sql = format!(
            "RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {}",
            e.code,
            dollar_quoted(&e.message)
        );
        for (key, v) in [("DETAIL", &e.detail), ("HINT", &e.hint)] {
            if let Some(v) = v {
                sql.push_str(&format!(", {key} = {}", dollar_quoted(v)));
            }
        }
        let body = format!("BEGIN {sql}; END");
        Unit {
            items: vec![Item {
                frame: Frame {
                    tag: b'Q',
                    raw: messages::query(&format!("DO {}", dollar_quoted(&body))),
                },
                stmt: None,
            }],
            route: Route::Write,
            syncs: 1,
            simple: true,
            ..Unit::of_items(Vec::new())
        }
    }

    /// An extended-protocol unit of `items` (their statements already
    /// defined), classified by what they bind: a part of a split batch, or
    /// with no items the start of any batch.
    fn of_items(items: Vec<Item>) -> Unit {
        let mut unit = Unit {
            items: Vec::new(),
            route: Route::Any,
            settings: Vec::new(),
            pin: None,
            syncs: 0,
            simple: false,
            avoid: None,
            writes: false,
            changes_data: false,
            begin: None,
            tx_access: None,
            tx_isolation: None,
            only_tx_settings: false,
            lone_begin: false,
            lone_tx_modes: false,
            answered: false,
            exports_snapshot: false,
            imports_snapshot: None,
            local_settings: Vec::new(),
            ends_tx: false,
            refused: None,
            recheck: Vec::new(),
            whole: None,
            prepared: Vec::new(),
        };
        for item in &items {
            match (item.frame.tag, &item.stmt) {
                (b'B', Some((def, _))) => unit.note_bind(def, item.frame.body()),
                (b'B', None) => unit.route = Route::Write,
                (b'P', None) => unit.route = Route::Write,
                (b'S', _) => unit.syncs += 1,
                _ => {}
            }
        }
        unit.only_tx_settings = sets_only_the_transaction(&items);
        unit.items = items;
        unit
    }

    /// What `f` finds in the last statement the unit's messages refer to
    /// that it says something of: for a unit that only parses (a driver
    /// prepares a statement before it runs it), what its Bind would say.
    fn parsed<T>(&self, f: impl Fn(&Classification) -> Option<T>) -> Option<T> {
        let defs = self.items.iter().filter_map(|i| i.stmt.as_ref());
        defs.filter_map(|(d, _)| f(&d.class)).last()
    }

    /// What binding statement `def` (the Bind's body: `bind`) makes of the
    /// unit.
    fn note_bind(&mut self, def: &StmtDef, bind: &[u8]) {
        let c = &def.class;
        if !c.prepared.is_empty() {
            self.prepared.extend(def.sql_prepared());
        }
        let read =
            c.pin_reason.is_none() && !c.parse_error && (c.read_only || c.begin == Some(true));
        // The end of a READ ONLY block the batch began goes where the block
        // does.
        let ends_read_only_block =
            c.ends_tx && c.statements == 1 && self.begin == Some(true) && c.pin_reason.is_none();
        if !read && !ends_read_only_block {
            self.route = Route::Write;
        } else if self.route == Route::Any {
            self.route = Route::Read;
        }
        self.writes |= may_write(c);
        self.changes_data |= changes_data(c);
        self.begin = self.begin.or(c.begin);
        self.tx_access = c.tx_access.or(self.tx_access);
        self.tx_isolation = c.tx_isolation.or(self.tx_isolation);
        self.exports_snapshot |= c.exports_snapshot;
        if c.imports_snapshot.is_some() {
            self.imports_snapshot = c.imports_snapshot.clone();
        }
        self.local_settings.extend(c.local_settings.iter().cloned());
        self.ends_tx |= c.ends_tx;
        self.settings.extend(c.session_settings.iter().cloned());
        let bound = c
            .bound_settings
            .iter()
            .map(|s| (s, false))
            .chain(c.bound_local_settings.iter().map(|s| (s, true)));
        for ([name, value], local) in bound {
            let text = |a: &SettingArg| match a {
                SettingArg::Param(n) => statements::bound_text(&def.parse, bind, *n),
                _ => a.literal(),
            };
            match (text(name), text(value)) {
                (Some(Some(n)), Some(v)) => {
                    let sql = set_config_sql(&n, v.as_deref(), local);
                    match local {
                        true => self.local_settings.push(sql),
                        false => self.settings.push(sql),
                    }
                }
                // A value not read as text (or a NULL name, an error): kept
                // on the primary, as any other set_config.
                _ => self.pin = self.pin.or(Some("set_config")),
            }
        }
        self.pin = self.pin.or(c.pin_reason);
    }
}

/// A batch's messages (one Sync, at the end) split like a query string
/// (see `split_transaction_control`): a statement that ends a transaction
/// block, and a BEGIN that opens a part, go in a part of their own (their
/// Parse right before, Bind, Describe and Execute); the messages between
/// such statements stay together, but for the `SET TRANSACTION`
/// statements right after an opening BEGIN, which stay in its part (they
/// must run before the block's first query). Every part but the last gets
/// a Sync of its own, so a part is answered before the next is sent.
/// `None` when there is one part.
fn split_batch(items: &[Item]) -> Option<Vec<Vec<Item>>> {
    let class = |it: &Item| match (&it.stmt, it.frame.tag) {
        (Some((d, _)), b'B') => Some(d.class.clone()),
        _ => None,
    };
    let mut parts: Vec<Vec<Item>> = vec![Vec::new()];
    // The last part is a control statement's, until its Execute.
    let mut control = false;
    // The part before the last opens a block and holds nothing else but
    // the block's settings.
    let mut opening = false;
    for item in items {
        let c = class(item);
        if let Some(c) = &c
            && opening
            && lone_tx_modes(c)
            && parts.len() > 1
        {
            // Back into the BEGIN's part, with its Parse (and what else
            // came since), until its Execute.
            let since = parts.pop().expect("checked");
            let part = parts.last_mut().expect("checked");
            part.extend(since);
            part.push(item.clone());
            control = true;
            continue;
        }
        if c.is_some() {
            opening = false;
        }
        let last = parts.last_mut().expect("never empty");
        if let Some(c) = c
            && (c.ends_tx || c.begin.is_some())
        {
            let defines_it = last.last().is_some_and(|p| {
                p.frame.tag == b'P'
                    && match (&p.stmt, &item.stmt) {
                        (Some((a, _)), Some((b, _))) => Arc::ptr_eq(a, b),
                        _ => false,
                    }
            });
            let parse = if defines_it { last.pop() } else { None };
            // A BEGIN after statements of an implicit block makes it its
            // block: it stays with them.
            if c.ends_tx || last.is_empty() {
                if !last.is_empty() {
                    parts.push(Vec::new());
                }
                control = true;
                opening = !c.ends_tx;
            }
            let part = parts.last_mut().expect("never empty");
            part.extend(parse);
            part.push(item.clone());
            continue;
        }
        last.push(item.clone());
        if control && item.frame.tag == b'E' {
            parts.push(Vec::new());
            control = false;
        }
    }
    // What follows the last statement (its Sync, a Close) goes with it.
    let runs = |part: &[Item]| part.iter().any(|i| matches!(i.frame.tag, b'B' | b'E'));
    if parts.len() > 1 && !runs(parts.last().expect("never empty")) {
        let tail = parts.pop().expect("checked");
        parts.last_mut().expect("checked").extend(tail);
    }
    parts.retain(|p| !p.is_empty());
    if parts.len() < 2 {
        return None;
    }
    let last = parts.len() - 1;
    for part in &mut parts[..last] {
        part.push(Item {
            frame: Frame::new(b'S', b""),
            stmt: None,
        });
    }
    Some(parts)
}

/// Whether a classified string may change data: anything beyond session
/// settings, transaction control, prepared statement definitions and
/// reads (to the client or to a file on the primary, or calling volatile
/// built-ins that change nothing).
pub(super) fn may_write(c: &Classification) -> bool {
    !c.read_only && (c.parse_error || c.statements > control_statements(c) + c.reads)
}

/// Statements of a classified string that are settings, transaction
/// control, prepared statement definitions or reads changing no data.
fn control_statements(c: &Classification) -> usize {
    c.setting_statements
        + usize::from(c.begin.is_some())
        + usize::from(c.ends_tx)
        + c.prepared.iter().filter(|p| p.is_definition()).count()
        + c.copy_to_server
        + c.primary_reads
}

/// Whether a classified string is one `SET TRANSACTION` of modes
/// (isolation level, READ ONLY / WRITE, DEFERRABLE).
fn lone_tx_modes(c: &Classification) -> bool {
    c.statements == 1 && c.tx_modes == 1 && !c.parse_error
}

/// Whether every statement of a classified string sets the transaction
/// under way (and there is one).
fn only_tx_settings(c: &Classification) -> bool {
    !c.parse_error && c.statements > 0 && c.statements == c.tx_settings
}

/// Whether the statements extended messages parse, bind or describe all
/// set the transaction under way (and there is one).
fn sets_only_the_transaction(items: &[Item]) -> bool {
    let mut defs = items.iter().filter_map(|i| i.stmt.as_ref()).peekable();
    defs.peek().is_some() && defs.all(|(d, _)| only_tx_settings(&d.class))
}

/// Whether a classified string may change data with more than savepoint
/// statements (and reads between them).
fn changes_data(c: &Classification) -> bool {
    may_write(c) && (c.parse_error || c.statements > control_statements(c) + c.savepoints + c.reads)
}

impl Session {
    /// A simple Query as a unit, classified.
    pub(super) fn query_unit(&mut self, f: Frame) -> Unit {
        let sql = messages::Reader::new(f.body())
            .cstr()
            .unwrap_or("")
            .to_string();
        let class = self.group.classifier.classify(&sql);
        let cursors = self.cursor_statements(&class);
        let cursor_writes = cursors == Ok(true);
        let writes = may_write(&class) || cursor_writes;
        // Kept for a split (`runs_split`; leading `SET TRANSACTION`s, see
        // `dispatch`).
        let whole = (class.statements > 1
            && ((writes && (class.ends_tx || class.begin.is_some())) || class.tx_modes > 0))
            .then(|| f.clone());
        let mut unknown = false;
        let mut prepared = class.prepared.clone();
        let (f, refused) = match self.deterministic(&class, &sql, &mut unknown) {
            Ok(Some(new_sql)) => {
                if !prepared.is_empty() {
                    // A PREPARE is remembered as it was sent.
                    prepared = self.group.classifier.classify(&new_sql).prepared.clone();
                }
                (
                    Frame {
                        tag: b'Q',
                        raw: messages::query(&new_sql),
                    },
                    None,
                )
            }
            Ok(None) => (f, None),
            Err(e) => (f, Some(e)),
        };
        // The text as it will be sent, to check again once the catalog is in.
        let recheck = if unknown {
            vec![
                messages::Reader::new(f.body())
                    .cstr()
                    .unwrap_or("")
                    .to_string(),
            ]
        } else {
            Vec::new()
        };
        let refused = refused.or(cursors.err());
        let route = if class.pin_reason.is_some() || class.parse_error || cursor_writes {
            Route::Write
        } else if class.read_only || class.begin == Some(true) {
            Route::Read
        } else {
            Route::Write
        };
        Unit {
            items: vec![Item {
                frame: f,
                stmt: None,
            }],
            route,
            settings: class.session_settings.clone(),
            pin: class.pin_reason,
            syncs: 1,
            simple: true,
            avoid: None,
            writes,
            changes_data: changes_data(&class) || cursor_writes,
            begin: class.begin,
            tx_access: class.tx_access,
            tx_isolation: class.tx_isolation,
            only_tx_settings: only_tx_settings(&class),
            lone_begin: class.statements == 1 && class.begin.is_some() && !class.parse_error,
            lone_tx_modes: lone_tx_modes(&class),
            answered: false,
            exports_snapshot: class.exports_snapshot,
            imports_snapshot: class.imports_snapshot.clone(),
            local_settings: class.local_settings.clone(),
            ends_tx: class.ends_tx,
            refused,
            recheck,
            whole,
            prepared,
        }
    }

    /// An extended-protocol message: buffered until Sync, or streamed into
    /// an open batch.
    pub(super) async fn extended(&mut self, f: Frame) -> Result<(), End> {
        if self.discard_until_sync {
            return Ok(());
        }
        if let Some(i) = self.open_batch {
            let mut unit = self.batch_unit(vec![f]);
            unit.syncs = 0;
            if self.commits_stream(&unit) {
                return self.cut_stream(i, unit).await;
            }
            return self.send_unit(i, unit, false).await;
        }
        self.batch_bytes += f.raw.len();
        self.batch.push(f);
        if self.batch_bytes > MAX_BATCH_BYTES {
            // Too much to hold: stream this batch to the primary.
            self.open_partial_batch().await?;
        }
        Ok(())
    }

    /// Flush: send what is buffered now and keep the batch open on that node.
    pub(super) async fn flush_message(&mut self, f: Frame) -> Result<(), End> {
        if self.discard_until_sync {
            return Ok(());
        }
        if self.batch.is_empty() && self.open_batch.is_none() {
            // Nothing buffered: what the nodes sent is relayed anyway.
            return Ok(());
        }
        self.batch_bytes += f.raw.len();
        self.batch.push(f);
        if let Some(i) = self.open_batch {
            let frames = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            let mut unit = self.batch_unit(frames);
            unit.syncs = 0;
            return self.send_unit(i, unit, false).await;
        }
        self.open_partial_batch().await
    }

    /// Sync: the batch is complete; route it as one unit.
    pub(super) async fn sync(&mut self, f: Frame) -> Result<(), End> {
        if self.discard_until_sync {
            self.discard_until_sync = false;
            self.batch.clear();
            self.batch_bytes = 0;
            let status = self.discard_status.take();
            messages::ready_for_query(status.unwrap_or(self.status_byte()), &mut self.out);
            return Ok(());
        }
        let mut frames = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        frames.push(f);
        let unit = self.batch_unit_from(&mut frames);
        // Emptied, its room kept for the next batch.
        self.batch = frames;
        match self.open_batch.take() {
            Some(i) => self.send_unit(i, unit, false).await,
            None => self.dispatch(unit).await,
        }
    }

    /// A Query in the middle of an unfinished batch: send the batch first.
    pub(super) async fn flush_partial_batch(&mut self) -> Result<(), End> {
        if !self.batch.is_empty() && self.open_batch.is_none() {
            self.open_partial_batch().await?;
        }
        if let Some(i) = self.open_batch.take() {
            let frames = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            if !frames.is_empty() {
                let mut unit = self.batch_unit(frames);
                unit.syncs = 0;
                self.send_unit(i, unit, false).await?;
            }
        }
        self.batch_capture = None;
        Ok(())
    }

    /// The Bind of a COMMIT in a batch streaming to the primary that wrote:
    /// the node's part of the batch ends here with a Sync of ours (its
    /// answer is not the client's), and the COMMIT and what follows wait for
    /// the client's Sync, to run as a unit of their own once every answer of
    /// the writes is in and the log entry can be appended.
    async fn cut_stream(&mut self, i: usize, commit: Unit) -> Result<(), End> {
        self.open_batch = None;
        self.stream_cut = true;
        let end = self.batch_unit(vec![Frame::new(b'S', b"")]);
        self.send_unit(i, end, false).await?;
        for item in commit.items {
            self.batch_bytes += item.frame.raw.len();
            self.batch.push(item.frame);
        }
        Ok(())
    }

    /// Starts streaming the buffered batch: to the transaction's node, or the
    /// primary (a batch without its Sync cannot be judged a pure read).
    async fn open_partial_batch(&mut self) -> Result<(), End> {
        let frames = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let mut unit = self.batch_unit(frames);
        unit.syncs = 0;
        if !self.deferred.is_empty() {
            let deferred = std::mem::take(&mut self.deferred);
            self.release_begin(deferred, &unit).await?;
            if let Some(e) = self.in_lost_transaction(&unit) {
                self.put_error(&e);
                self.discard_until_sync = true;
                return Ok(());
            }
        }
        unit.route = Route::Write;
        // Its statements will likely run before the Sync, and nothing can be
        // injected once it streams: a Parse that may write takes the write
        // lock now.
        let parsed = |f: fn(&Classification) -> bool| {
            unit.items
                .iter()
                .any(|i| i.frame.tag == b'P' && i.stmt.as_ref().is_some_and(|(d, _)| f(&d.class)))
        };
        let (writes, changes) = (parsed(may_write), parsed(changes_data));
        unit.writes |= writes;
        unit.changes_data |= changes;
        let target = match self.busy_backend() {
            Some(b) => b,
            None => match self.choose(&unit) {
                Ok(i) => i,
                Err(e) => {
                    self.put_error(&e);
                    self.discard_until_sync = true;
                    return Ok(());
                }
            },
        };
        self.open_batch = Some(target);
        self.send_unit(target, unit, false).await
    }

    /// Classifies extended messages and records their statements.
    pub(super) fn batch_unit(&mut self, mut frames: Vec<Frame>) -> Unit {
        self.batch_unit_from(&mut frames)
    }

    /// [`Session::batch_unit`] taking the messages out of `frames`.
    fn batch_unit_from(&mut self, frames: &mut Vec<Frame>) -> Unit {
        let mut unit = Unit::of_items(Vec::with_capacity(frames.len()));
        for frame in frames.drain(..) {
            let mut stmt = None;
            match frame.tag {
                b'P' => {
                    if let Some((name, query)) = statements::parse_fields(frame.body()) {
                        let name = name.to_string();
                        let query = query.to_string();
                        let class = self.group.classifier.classify(&query);
                        let mut unknown = false;
                        let parse = match self.deterministic(&class, &query, &mut unknown) {
                            Ok(Some(new_sql)) => statements::rewrite_parse(&frame, &new_sql),
                            Ok(None) => frame.clone(),
                            Err(e) => {
                                unit.refused.get_or_insert(e);
                                frame.clone()
                            }
                        };
                        if unknown && let Some((_, sent)) = statements::parse_fields(parse.body()) {
                            unit.recheck.push(sent.to_string());
                        }
                        stmt = Some(self.statements.define(&name, parse, class));
                    } else {
                        unit.route = Route::Write;
                    }
                }
                b'B' => match statements::bind_statement(frame.body()) {
                    Some(name) => match self.statements.get(name) {
                        Some(def) => {
                            unit.note_bind(&def, frame.body());
                            match self.cursor_statements(&def.class) {
                                Ok(false) => {}
                                Ok(true) => {
                                    unit.writes = true;
                                    unit.changes_data = true;
                                    unit.route = Route::Write;
                                }
                                Err(e) => {
                                    unit.refused.get_or_insert(e);
                                }
                            }
                            stmt = Some((def, None));
                        }
                        None => unit.route = Route::Write,
                    },
                    None => unit.route = Route::Write,
                },
                b'D' => {
                    if let Some((b'S', name)) = statements::target(frame.body()) {
                        stmt = self.statements.get(name).map(|d| (d, None));
                    }
                }
                b'C' => {
                    if let Some((b'S', name)) = statements::target(frame.body()) {
                        self.statements.close(name);
                    }
                }
                b'S' => unit.syncs += 1,
                _ => {}
            }
            unit.items.push(Item { frame, stmt });
        }
        unit.only_tx_settings = sets_only_the_transaction(&unit.items);
        unit
    }

    /// What the cursor statements of `c` make of its unit: whether it must
    /// be logged as a write (it fetches from, moves or closes a cursor
    /// whose query writes), or the refusal of a WHERE CURRENT OF a cursor
    /// whose reads were not logged (the copies would have no such cursor).
    fn cursor_statements(&mut self, c: &Classification) -> Result<bool, PgError> {
        if !self.replicating() {
            return Ok(false);
        }
        for (name, writes) in &c.cursors_declared {
            self.writing_cursors.retain(|n| n != name);
            if *writes {
                self.writing_cursors.push(name.clone());
            }
        }
        if let Some(name) = c
            .current_of
            .iter()
            .find(|n| !self.writing_cursors.contains(n))
        {
            return Err(PgError::error(
                "0A000",
                format!(
                    "WHERE CURRENT OF {name}: the cursor only reads, so Reprise runs its FETCHes \
                     on the primary alone and the other copies could not tell which row it is on"
                ),
            )
            .with_hint(
                "declare the cursor FOR UPDATE (its FETCHes are then replayed too), or change \
                 the row by its key",
            ));
        }
        let writes = c.cursors_used.iter().any(|used| match used {
            Some(name) => self.writing_cursors.contains(name),
            None => !self.writing_cursors.is_empty(),
        });
        if c.ends_tx {
            // Cursors WITH HOLD are read from their stored rows after it.
            self.writing_cursors.clear();
        }
        Ok(writes)
    }

    /// The statements a refused unit's Parses defined are forgotten, as
    /// PostgreSQL keeps none of a failed Parse: a later Bind of the name
    /// must not run the refused text (the primary answers that it does not
    /// exist).
    fn forget_parses(&mut self, unit: &Unit) {
        for item in &unit.items {
            if item.frame.tag == b'P'
                && let Some((def, _)) = &item.stmt
                && self
                    .statements
                    .get(&def.name)
                    .is_some_and(|d| d.generation == def.generation)
            {
                self.statements.close(&def.name);
            }
        }
    }

    /// The backend with client units in flight, if any.
    pub(super) fn busy_backend(&self) -> Option<usize> {
        if !self.write.own.is_empty() || self.write.sync_wait.is_some() {
            return Some(self.group.primary());
        }
        self.backends
            .iter()
            .position(|b| b.as_ref().is_some_and(|c| !c.tracker.is_idle()))
    }

    /// Picks the node for a unit that is not forced elsewhere.
    fn choose(&self, unit: &Unit) -> Result<usize, PgError> {
        if let Some(i) = self.tx_node {
            return Ok(i);
        }
        if let Some(i) = self.snapshot_node(unit) {
            return Ok(i);
        }
        let primary = self.group.primary();
        if self.pinned.is_some() || unit.pin.is_some() {
            return Ok(primary);
        }
        match unit.route {
            Route::Read => {
                let routing = &self.cfg.routing;
                let replicating = self.cfg.replication.enabled;
                if self.wrote && routing.read_your_writes && !replicating {
                    // Without replication only the primary has this session's writes.
                    return Ok(primary);
                }
                // Read-your-writes: only nodes that applied the session's last commit.
                let min_seq = if routing.read_your_writes {
                    self.write.last_seq
                } else {
                    0
                };
                self.group
                    .pick_reader_near(
                        unit.avoid,
                        self.last_reader.filter(|&r| Some(r) != unit.avoid),
                        min_seq,
                    )
                    .ok_or_else(no_node)
            }
            Route::Write | Route::Any => Ok(primary),
        }
    }

    /// The node that exported the snapshot a unit beginning a READ ONLY
    /// block takes (`SET TRANSACTION SNAPSHOT`), while that node is up: it
    /// alone has that snapshot. (A block that may write runs on the
    /// primary.)
    fn snapshot_node(&self, unit: &Unit) -> Option<usize> {
        let id = unit.imports_snapshot.as_deref()?;
        if unit.begin != Some(true) {
            return None;
        }
        let node = self.group.snapshot_node(id)?;
        self.group.node(node).is_up().then_some(node)
    }

    /// A unit that would pin the session, in a transaction that runs on a
    /// subscriber (BEGIN READ ONLY): what it leaves in the session (a
    /// cursor WITH HOLD, a prepared statement, LISTEN, a session lock)
    /// would stay on that subscriber, out of reach of the session's later
    /// statements, which run on the primary.
    fn pin_on_subscriber(&self, unit: &Unit) -> Option<PgError> {
        let reason = unit.pin?;
        let node = self.tx_node.filter(|&n| n != self.group.primary())?;
        Some(
            PgError::error(
                "0A000",
                format!(
                    "{reason} in a READ ONLY transaction: Reprise runs the transaction on the \
                     subscriber {}, where what this statement leaves in the session would stay, \
                     out of reach of the session's later statements, which run on the primary",
                    self.group.node(node).name
                ),
            )
            .with_hint("run it outside the READ ONLY transaction, or begin the transaction without READ ONLY"),
        )
    }

    /// A unit that would make a READ ONLY transaction running on a
    /// subscriber READ WRITE: its writes would change that copy alone.
    fn read_write_on_subscriber(&self, unit: &Unit) -> Option<PgError> {
        let node = self.tx_node.filter(|&n| n != self.group.primary())?;
        // (set_config calls of it, whose value is not judged: see
        // `set_config_sql`.)
        let set_config = || {
            let call = b"set_config($r$transaction_read_only$r$";
            (unit.local_settings.iter().chain(&unit.settings))
                .any(|s| crate::replication::mentions(s.as_bytes(), call))
        };
        if unit.tx_access != Some(false) && !set_config() {
            return None;
        }
        Some(
            PgError::error(
                "0A000",
                format!(
                    "Reprise runs this READ ONLY transaction on the subscriber {}: it cannot \
                     become READ WRITE there",
                    self.group.node(node).name
                ),
            )
            .with_hint("begin the transaction without READ ONLY"),
        )
    }

    /// Whether a unit may join the work in flight on backend `b`.
    fn may_join(&self, b: usize, unit: &Unit) -> bool {
        let primary = self.group.primary();
        if !self.write.own.is_empty()
            || self.write.sync_wait.is_some()
            || self.write.tx.as_ref().is_some_and(|t| t.implicit)
            // In a write transaction one unit at a time: a unit that fails
            // is taken out of the capture when its ReadyForQuery arrives.
            || (self.write.tx.is_some() && b == primary)
            || (self.write.tx.is_none() && unit.writes && b == primary)
        {
            // The write path needs the answers so far before going on.
            return false;
        }
        if b == primary || self.tx_node == Some(b) {
            return true;
        }
        // A subscriber: only more reads, and never when pinning.
        self.pinned.is_none()
            && unit.pin.is_none()
            && unit.route == Route::Read
            && self.group.node(b).is_up()
    }

    /// Routes a complete unit: now, or after the busy backend finishes.
    pub(super) async fn dispatch(&mut self, mut unit: Unit) -> Result<(), End> {
        if !self.deferred.is_empty() && unit.lone_tx_modes && unit.refused.is_none() {
            // `SET TRANSACTION` right after the BEGIN: answered now too.
            messages::command_complete("SET", &mut self.out);
            messages::ready_for_query(b'T', &mut self.out);
            self.deferred.push(unit);
            return Ok(());
        }
        if unit.whole.is_some()
            && (!self.deferred.is_empty() || self.tx_node.is_some())
            && let Some(parts) = unit.whole.as_ref().and_then(|f| {
                messages::Reader::new(f.body())
                    .cstr()
                    .and_then(split_block_settings)
            })
        {
            // `SET TRANSACTION …; <more>` in a block (right after its
            // BEGIN, where it may set the level): the settings first, on
            // their own, then the rest, after what the write path may have
            // to run before it (the write lock, or its move from the
            // session, `move_session_lock`).
            if self.busy_backend().is_some() {
                self.pending = Some(unit);
                return Ok(());
            }
            let pin = unit.pin;
            unit = self.split_into(parts.into_iter().map(Part::Query));
            if !self.deferred.is_empty() {
                // The deferred BEGIN goes where the whole string can run:
                // the primary, should the rest pin the session.
                unit.pin = unit.pin.or(pin);
            }
        }
        if !self.deferred.is_empty() {
            let deferred = std::mem::take(&mut self.deferred);
            self.release_begin(deferred, &unit).await?;
        } else if self.defers_begin(&unit) {
            // Answered now; sent with what follows, which tells where the
            // block runs (`release_begin`).
            messages::command_complete("BEGIN", &mut self.out);
            messages::ready_for_query(b'T', &mut self.out);
            self.unit_seen = Default::default();
            self.deferred.push(unit);
            return Ok(());
        }
        if unit.whole.is_some() && self.runs_split(&unit) {
            // Split once nothing is in flight: the next ReadyForQuery is
            // then the first part's.
            if self.busy_backend().is_some() {
                self.pending = Some(unit);
                return Ok(());
            }
            let parts = unit.whole.take().and_then(|f| {
                messages::Reader::new(f.body())
                    .cstr()
                    .and_then(split_transaction_control)
            });
            if let Some(parts) = parts {
                unit = self.split_into(parts.into_iter().map(Part::Query));
            }
        }
        self.recheck(&mut unit).await;
        if !unit.simple && self.runs_split(&unit) {
            // A batch (its statements defined, its rewrites made).
            if self.busy_backend().is_some() {
                self.pending = Some(unit);
                return Ok(());
            }
            if let Some(parts) = split_batch(&unit.items) {
                unit = self.split_into(
                    parts
                        .into_iter()
                        .map(|p| Part::Unit(Box::new(Unit::of_items(p)))),
                );
            }
        }
        let refusal = unit
            .refused
            .clone()
            .or_else(|| self.pin_on_subscriber(&unit))
            .or_else(|| self.read_write_on_subscriber(&unit))
            .or_else(|| self.write_check(&unit).err());
        if let Some(e) = refusal {
            self.forget_parses(&unit);
            // Answers keep their order: wait for what is in flight first.
            if self.busy_backend().is_some() {
                self.pending = Some(unit);
                return Ok(());
            }
            if let Some(node) = self.tx_node
                && unit.syncs == 1
            {
                // In a transaction block an error aborts the block: the
                // block's node raises it, so that what follows (25P02,
                // COMMIT answered with ROLLBACK) is PostgreSQL's own.
                self.group
                    .stats
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.raised = Some(e.clone());
                return self.send_unit(node, Unit::raising(&e), false).await;
            }
            return self.fail_unit(&unit, e);
        }
        if self.lost_tx.is_some() {
            if self.busy_backend().is_some() {
                self.pending = Some(unit);
                return Ok(());
            }
            if let Some(e) = self.in_lost_transaction(&unit) {
                return self.fail_unit(&unit, e);
            }
        }
        if let Some(b) = self.busy_backend() {
            if self.may_join(b, &unit) {
                self.retry = None;
                return self.send_unit(b, unit, false).await;
            }
            self.pending = Some(unit);
            return Ok(());
        }
        if let Some(reason) = unit.pin
            && self.pinned.is_none()
        {
            self.span
                .in_scope(|| tracing::debug!(reason, "session pinned to the primary"));
            self.pinned = Some(reason);
        }
        let target = match self.target(&unit).await {
            Ok(i) => i,
            Err(e) => return self.fail_unit(&unit, e),
        };
        let retryable = unit.route == Route::Read && self.tx_node.is_none();
        self.send_unit(target, unit, retryable).await
    }

    /// The node for a unit (`choose`), once it may take the unit: new work
    /// on the primary waits while there is none (failover) or writes are
    /// held (switchover).
    async fn target(&mut self, unit: &Unit) -> Result<usize, PgError> {
        let target = self.choose(unit)?;
        if target == self.group.primary() && !self.pass.held && self.enter_primary().await? {
            // It may have changed meanwhile.
            return self.choose(unit);
        }
        Ok(target)
    }

    /// Whether a unit is a lone BEGIN to answer at once and send with the
    /// statement after it: when nothing else of the session is under way.
    fn defers_begin(&self, unit: &Unit) -> bool {
        unit.lone_begin
            && unit.refused.is_none()
            && self.tx_node.is_none()
            && self.lost_tx.is_none()
            && self.pinned.is_none()
            && self.pending.is_none()
            && self.split.is_empty()
            && self.open_batch.is_none()
            && self.busy_backend().is_none()
    }

    /// Sends the BEGIN the client was answered for (`defers_begin`), and
    /// the `SET TRANSACTION` statements answered after it, now that the unit
    /// after them, `next`, tells where the block runs: on a subscriber when
    /// it is READ ONLY (by those statements, `next`, or the session's
    /// default) and `next` pins nothing; where the snapshot `next` takes
    /// was exported (`SET TRANSACTION SNAPSHOT`); else on the primary, where
    /// a `SET TRANSACTION ISOLATION LEVEL` may make it a snapshot-isolation
    /// writer. Returns once the node answered them: `next` then runs in the
    /// block like any unit. Should the BEGIN not run, the block is lost
    /// (`lost_tx`), as if its node had died.
    pub(super) async fn release_begin(&mut self, units: Vec<Unit>, next: &Unit) -> Result<(), End> {
        let mut units = units.into_iter();
        let Some(mut begin) = units.next() else {
            return Ok(());
        };
        let settings: Vec<Unit> = units.collect();
        let next_access = next.tx_access.or_else(|| next.parsed(|c| c.tx_access));
        let next_isolation = next
            .tx_isolation
            .or_else(|| next.parsed(|c| c.tx_isolation));
        let access = settings
            .iter()
            .filter_map(|u| u.tx_access)
            .chain(next_access)
            .last();
        // (Of `next` only when it holds such settings alone: the lock query
        // of a snapshot-isolation writer would come before its setting.)
        let isolation = settings
            .iter()
            .filter_map(|u| u.tx_isolation)
            .chain(next_isolation.filter(|_| next.only_tx_settings))
            .last();
        let read_only = access.unwrap_or_else(|| self.begins_read_only(&begin));
        begin.begin = Some(read_only);
        begin.tx_isolation = isolation;
        begin.route = match read_only && next.pin.is_none() {
            true => Route::Read,
            false => Route::Write,
        };
        begin.answered = true;
        begin.imports_snapshot =
            (next.imports_snapshot.clone()).or_else(|| next.parsed(|c| c.imports_snapshot.clone()));
        let target = match self.target(&begin).await {
            Ok(i) => i,
            Err(e) => return self.answer_unsent(&begin, e),
        };
        self.send_unit(target, begin, false).await?;
        self.until_answered().await?;
        for mut unit in settings {
            let Some(node) = self.tx_node.filter(|_| self.lost_tx.is_none()) else {
                break;
            };
            unit.answered = true;
            self.send_unit(node, unit, false).await?;
            self.until_answered().await?;
        }
        Ok(())
    }

    /// Waits until the units sent already answered are done.
    async fn until_answered(&mut self) -> Result<(), End> {
        loop {
            let Some(i) = self.current.filter(|&i| {
                self.backends[i]
                    .as_ref()
                    .is_some_and(|c| c.tracker.answered_units() > 0)
            }) else {
                return Ok(());
            };
            tokio::select! {
                r = fill_backend(&mut self.backends, Some(i)) => self.backend_filled(i, r).await?,
                _ = self.events.changed() => self.on_group_change(),
            }
        }
    }

    /// The BEGIN the client was answered for could not run (`why`): the
    /// session acts as in a block whose node was lost.
    pub(super) fn lose_begin(&mut self, why: &str) {
        self.lost_tx = Some((format!("its BEGIN could not run: {why}"), false));
    }

    /// Writes to tables the catalog did not know when the unit was
    /// classified: checked against a fresh catalog (rewritten, or refused).
    async fn recheck(&mut self, unit: &mut Unit) {
        if unit.recheck.is_empty() || unit.refused.is_some() {
            return;
        }
        let sqls = std::mem::take(&mut unit.recheck);
        let group = self.group.clone();
        match super::write::recheck_defaults(&group, &sqls).await {
            Ok(rewrites) => {
                for (old, new) in rewrites {
                    self.rewrite_unit(unit, &old, &new);
                }
            }
            Err(e) => unit.refused = Some(e),
        }
    }

    /// Queues the parts of a split unit (ahead of what is left of one split
    /// before) and returns the first.
    fn split_into(&mut self, parts: impl DoubleEndedIterator<Item = Part>) -> Unit {
        for part in parts.rev() {
            self.split.push_front(part);
        }
        self.next_part().expect("a split has two parts or more")
    }

    /// Waits until the group has a primary that takes new work, up to
    /// `failover_wait_ms`, and counts this session in. Whether it had to
    /// wait (the primary may have changed meanwhile).
    async fn enter_primary(&mut self) -> Result<bool, PgError> {
        let wait = Duration::from_millis(self.cfg.health.failover_wait_ms);
        // Set once the first try failed (the common case reads no clock).
        let mut until = None;
        loop {
            let opened = self.group.gate.notified();
            if self.group.node(self.group.primary()).is_up() && self.group.enter() {
                self.pass.held = true;
                return Ok(until.is_some());
            }
            let now = tokio::time::Instant::now();
            let deadline = *until.get_or_insert(now + wait);
            // A switchover bounds its own pause: wait it out.
            if now >= deadline && !self.group.writes_paused() {
                return Err(self.no_primary(wait));
            }
            let nap = deadline
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(10), Duration::from_millis(100));
            tokio::select! {
                _ = opened => {}
                _ = self.events.changed() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// The primary refused a connection: have it probed now, and wait for it
    /// to come back or for a failover, up to `failover_wait_ms`.
    async fn reconnect_primary(&mut self, first: PgError) -> Result<usize, PgError> {
        let wait = Duration::from_millis(self.cfg.health.failover_wait_ms);
        let deadline = tokio::time::Instant::now() + wait;
        let mut last = first;
        loop {
            let p = self.group.primary();
            self.group.node(p).suspect.notify_one();
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(last);
            }
            let nap = (deadline - now).min(Duration::from_millis(50));
            tokio::select! {
                _ = self.events.changed() => {}
                _ = tokio::time::sleep(nap) => {}
            }
            let p = self.group.primary();
            if self.group.node(p).is_up() {
                match self.connect(p).await {
                    Ok(()) => return Ok(p),
                    Err(e) => last = e,
                }
            } else {
                last = self.no_primary(wait);
            }
        }
    }

    /// The error for work that found no primary in time.
    fn no_primary(&self, waited: Duration) -> PgError {
        let p = &self.group.node(self.group.primary());
        let why = if self.group.writes_paused() {
            "writes are held for a switchover".to_string()
        } else {
            format!("the primary {} is {}", p.name, p.state().as_str())
        };
        PgError::error(
            "08006",
            format!(
                "no primary is available in group {}: {why}, and no failover completed within {} ms",
                self.group.name,
                waited.as_millis()
            ),
        )
        .with_hint("the session is still usable; retry the transaction (see SHOW NODES on the admin console)")
    }

    /// The client's transaction died with its node: everything but the end
    /// of the transaction fails, like in a transaction PostgreSQL aborted.
    /// Returns the error to answer, or None to run the unit (a ROLLBACK,
    /// which then finds no transaction in progress).
    fn in_lost_transaction(&mut self, unit: &Unit) -> Option<PgError> {
        let (why, told) = self.lost_tx.clone()?;
        if write::unit_sql(unit).iter().any(|s| write::is_rollback(s)) {
            self.lost_tx = None;
            return None;
        }
        if unit.ends_tx {
            self.lost_tx = None;
            return Some(
                PgError::error(
                    "08006",
                    format!("the transaction was not committed: {why}; it has been rolled back"),
                )
                .with_hint("run the transaction again; it will run on the group's primary"),
            );
        }
        if !told {
            // The first the client hears of it.
            self.lost_tx = Some((why.clone(), true));
            return Some(
                PgError::error(
                    "08006",
                    format!("the transaction was lost: {why}; it did not commit"),
                )
                .with_hint("send ROLLBACK, then run the transaction again; it will run on the group's primary"),
            );
        }
        Some(
            PgError::error(
                "25P02",
                format!(
                    "current transaction is aborted, commands ignored until end of transaction block: {why}"
                ),
            )
            .with_hint("send ROLLBACK; the next transaction runs on the group's primary"),
        )
    }

    /// A part of a streamed batch that cannot run: a write after a start
    /// that did not write (the write lock cannot be taken there), or a
    /// COMMIT before the batch's Sync (the log entry could not be complete).
    /// As an error in a batch would, it aborts the transaction: the node's
    /// part of the batch is ended with a Sync and rolled back (answers
    /// dropped); the client gets the error, nothing until its own Sync, and
    /// then, in a transaction block, a failed block until its ROLLBACK.
    async fn refuse_in_batch(
        &mut self,
        target: usize,
        unit: &Unit,
        mut buf: BytesMut,
        e: PgError,
    ) -> Result<(), End> {
        let in_block =
            self.tx_node.is_some() || self.write.tx.as_ref().is_some_and(|t| !t.implicit);
        if let Some(conn) = self.backends[target].as_mut() {
            buf.extend_from_slice(&[b'S', 0, 0, 0, 4]);
            conn.tracker.push(Expect::Sync { injected: true });
            buf.extend_from_slice(&messages::query("ROLLBACK"));
            conn.tracker.push(Expect::Sync { injected: true });
        }
        self.write_lost();
        if self.tx_node == Some(target) {
            self.tx_node = None;
        }
        if in_block {
            self.lost_tx = Some((e.message.clone(), true));
        }
        let bytes = buf.split().freeze();
        self.scratch = buf;
        self.open_batch = None;
        self.batch_capture = None;
        self.answer_unsent(unit, e)?;
        self.send_raw(target, &bytes).await
    }

    /// Answers a unit that could not be sent anywhere.
    fn answer_unsent(&mut self, unit: &Unit, e: PgError) -> Result<(), End> {
        if unit.answered {
            self.lose_begin(&e.message);
            return Ok(());
        }
        if unit.syncs == 0 {
            self.put_error(&e);
            self.open_batch = None;
            self.batch_capture = None;
            self.discard_until_sync = true;
            return Ok(());
        }
        self.fail_unit(unit, e)
    }

    /// Answers a unit with an error instead of running it.
    fn fail_unit(&mut self, unit: &Unit, e: PgError) -> Result<(), End> {
        self.group.stats.refused.fetch_add(
            unit.syncs.max(1) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        for _ in 0..unit.syncs.max(1) {
            self.put_error(&e);
            messages::ready_for_query(self.status_byte(), &mut self.out);
        }
        // Answered here, not by a node: no transaction ended.
        self.unit_seen = Default::default();
        Ok(())
    }

    /// Replaces the text `old` of a unit's Query, or of a statement it
    /// parses (redefined, and so are the unit's Binds of it), with `new`.
    fn rewrite_unit(&mut self, unit: &mut Unit, old: &str, new: &str) {
        let mut redefined: Vec<(Arc<StmtDef>, Arc<StmtDef>)> = Vec::new();
        for item in &mut unit.items {
            match item.frame.tag {
                b'Q' if messages::Reader::new(item.frame.body()).cstr() == Some(old) => {
                    item.frame = Frame {
                        tag: b'Q',
                        raw: messages::query(new),
                    };
                }
                b'P' => {
                    let Some((def, previous)) = item.stmt.clone() else {
                        continue;
                    };
                    if def.sql != old {
                        continue;
                    }
                    let parse = statements::rewrite_parse(&def.parse, new);
                    let (fresh, _) = self.statements.define(&def.name, parse, def.class.clone());
                    item.stmt = Some((fresh.clone(), previous));
                    redefined.push((def, fresh));
                }
                _ => {
                    if let Some((def, previous)) = item.stmt.clone()
                        && let Some((_, fresh)) =
                            redefined.iter().find(|(o, _)| Arc::ptr_eq(o, &def))
                    {
                        item.stmt = Some((fresh.clone(), previous));
                    }
                }
            }
        }
    }

    fn status_byte(&self) -> u8 {
        if self.lost_tx.is_some() {
            b'E'
        } else if self.tx_node.is_some() || !self.deferred.is_empty() {
            b'T'
        } else {
            b'I'
        }
    }

    /// Opens the backend connection to node `i`.
    pub(super) async fn connect(&mut self, i: usize) -> Result<(), PgError> {
        if self.backends[i].is_some() {
            return Ok(());
        }
        let node = self.group.node(i).clone();
        let Some(seat) = node.connection_seat() else {
            return Err(PgError::error(
                "53300",
                format!(
                    "node {} has all its backend connections in use (max_connections = {})",
                    node.name, node.config.max_connections
                ),
            )
            .with_hint(
                "raise max_connections on the node's [[group.node]] entry, or retry later",
            ));
        };
        let timeout = Duration::from_millis(self.cfg.health.connect_timeout_ms);
        // A node found down meanwhile (e.g. paused) ends the attempt.
        let mut events = self.group.events();
        let down = self
            .group
            .until(&mut events, |_| node.state() == NodeState::Down);
        let attempt = tokio::select! {
            r = BackendConn::connect(&node.target, &self.params, timeout) => r,
            _ = down => {
                return Err(PgError::error(
                    "08006",
                    format!("could not connect to node {}: it is down", node.name),
                ));
            }
        };
        match attempt {
            Ok(mut conn) => {
                conn.seat = Some(seat);
                self.backends[i] = Some(conn);
                Ok(())
            }
            Err(e) => {
                self.span.in_scope(
                    || tracing::warn!(node = %node.name, error = %e, "backend connection failed"),
                );
                Err(match e {
                    ConnectError::Server { code, message, .. } => {
                        let code = static_code(&code);
                        PgError::error(code, format!("node {}: {message}", node.name))
                    }
                    other => PgError::error(
                        "08006",
                        format!("could not connect to node {}: {other}", node.name),
                    ),
                })
            }
        }
    }

    /// Sends a unit to node `i`, connecting and catching it up first. A
    /// `retryable` unit is kept until its first response, so that it can run
    /// elsewhere if the node dies before answering.
    pub(super) async fn send_unit(
        &mut self,
        i: usize,
        mut unit: Unit,
        retryable: bool,
    ) -> Result<(), End> {
        if unit.syncs == 0 && self.open_batch == Some(i) {
            // Streaming: what `dispatch` checks for a whole batch is checked
            // for each part as it comes.
            self.recheck(&mut unit).await;
            let refusal = unit
                .refused
                .clone()
                .or_else(|| self.streamed_begin_refusal(&unit));
            if let Some(e) = refusal {
                self.forget_parses(&unit);
                return self.refuse_in_batch(i, &unit, BytesMut::new(), e).await;
            }
        }
        if unit.begin.is_some() && self.tx_node.is_none() {
            self.tx_read_only = self.begins_read_only(&unit);
        }
        if let Some(read_only) = unit.tx_access
            && (self.tx_node.is_some() || unit.begin.is_some())
        {
            // (Refused by the node once the transaction ran a query: then
            // nothing of it matters any more.)
            self.tx_read_only = read_only;
        }
        let mut target = i;
        if let Err(e) = self.connect(target).await {
            self.group.node(target).suspect.notify_one();
            if target == self.group.primary() && self.tx_node.is_none() {
                match self.reconnect_primary(e).await {
                    Ok(p) => return Box::pin(self.send_unit(p, unit, retryable)).await,
                    Err(e) => return self.answer_unsent(&unit, e),
                }
            }
            // A read may go elsewhere; anything else fails.
            let other = (unit.route == Route::Read && self.tx_node.is_none())
                .then(|| self.group.pick_reader(Some(i)))
                .flatten();
            match other {
                Some(o) if self.connect(o).await.is_ok() => target = o,
                _ => return self.answer_unsent(&unit, e),
            }
        }
        let primary = self.group.primary();
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let continuing = self.batch_capture.filter(|_| target == primary);
        if unit.syncs == 0
            && unit.ends_tx
            && self.open_batch == Some(target)
            && self.cfg.replication.enabled
            && (unit.writes || continuing == Some(true) || self.write.tx.is_some())
            && !write::unit_sql(&unit).iter().any(|s| write::is_rollback(s))
        {
            // A COMMIT in a batch streaming to the primary (sent on as it
            // comes, after a Flush or past the batch size limit): the
            // answers of its writes may still be on their way, and the log
            // entry must hold them before the COMMIT is sent.
            let e = PgError::error(
                "0A000",
                "Reprise needs a Sync between a pipelined batch's writes and its COMMIT when the batch had a Flush (or was too large to hold)",
            )
            .with_hint("send a Sync before the COMMIT");
            return self.refuse_in_batch(target, &unit, buf, e).await;
        }
        if continuing.is_none() && target == primary {
            // (Its answers accounted for.)
            self.move_session_lock(&unit, &mut buf, target);
        }
        let moved = buf.len();
        let captured = match continuing {
            // More of a batch already streaming: nothing may be injected
            // between its messages (a Query would destroy its unnamed
            // statement and portal), and it is captured like its start.
            Some(c) => {
                if unit.writes && !c && self.cfg.replication.enabled {
                    let e = PgError::error(
                        "0A000",
                        "Reprise needs a pipelined batch to write before its first Flush: this write came after a Flush of statements that only read",
                    )
                    .with_hint("send a Sync before the write, or put the write first");
                    return self.refuse_in_batch(target, &unit, buf, e).await;
                }
                c
            }
            None => target == primary && self.before_primary_unit(&unit, &mut buf),
        };
        if continuing.is_none() && unit.syncs == 0 && self.open_batch == Some(target) {
            // The start of a streamed batch.
            self.batch_capture = Some(captured);
        }
        if continuing.is_none() && target == primary {
            // Every unit, captured or not: one that fails takes out what
            // it captured, and nothing before it.
            self.mark_capture();
        }
        if buf.len() > moved
            && let Some(conn) = self.backends[target].as_mut()
        {
            // The write lock query before_primary_unit added.
            conn.tracker.push(Expect::Own);
        }
        if target == primary {
            self.before_commit(&unit, &mut buf, target);
        }
        if captured {
            self.capture_unit(&unit.items, &unit.prepared);
        }
        let snapshot_begin = target == primary && self.begins_snapshot_writer(&unit);
        // (Not in the middle of a streaming batch: nothing may come between
        // its messages.)
        let session_locked =
            snapshot_begin && continuing.is_none() && self.before_begin(&mut buf, target);
        let conn = self.backends[target].as_mut().expect("connected");
        // Replay SETs this backend has not seen.
        while conn.settings_applied < self.settings.len() {
            buf.extend_from_slice(&messages::query(&self.settings[conn.settings_applied]));
            conn.tracker.push(Expect::Sync { injected: true });
            conn.settings_applied += 1;
        }
        for item in &unit.items {
            expect_definitions(conn, item, &unit.prepared);
            emit(conn, item, &mut buf, captured, unit.answered);
        }
        if snapshot_begin {
            self.write.pending_move = Some(write::LockMove {
                session_locked,
                read_only: false,
            });
        }
        let conn = self.backends[target].as_mut().expect("connected");
        if unit.simple {
            conn.prepared.remove("");
        }
        if !unit.settings.is_empty() {
            self.settings.extend(unit.settings.iter().cloned());
            conn.settings_applied = self.settings.len();
        }
        for _ in 0..unit.syncs {
            self.group.node(target).begin_unit();
        }
        if unit.syncs > 0 {
            let node = &self.group.node(target);
            node.stats
                .queries
                .fetch_add(unit.syncs as u64, std::sync::atomic::Ordering::Relaxed);
            self.group.stats.routed(unit.syncs, target == primary);
            if let Some(conn) = self.backends[target].as_mut() {
                conn.stats.units_sent(unit.syncs);
            }
            // The batch (if one was streaming) ends with this Sync.
            self.batch_capture = None;
            self.last_unit_simple = unit.simple;
        }
        self.wrote |= unit.writes;
        if unit.route == Route::Read {
            self.last_reader = Some(target);
        }
        if unit.exports_snapshot {
            self.exporting = Some(target);
        }
        self.current = Some(target);
        self.set_cancel_target(target);
        self.retry = retryable.then_some((target, unit));
        let r = self.send_raw(target, &buf).await;
        self.scratch = buf;
        r
    }

    /// Backend `i` is gone: answer what it owed, or queue a read for one
    /// retry on another node.
    pub(super) fn backend_lost(&mut self, i: usize, why: String) {
        let Some(mut conn) = self.backends[i].take() else {
            return;
        };
        let node = self.group.node(i).clone();
        self.span.in_scope(
            || tracing::warn!(node = %node.name, error = %why, "lost backend connection"),
        );
        // Evidence the node may be gone: have it probed now.
        node.suspect.notify_one();
        let owed = conn.tracker.client_units();
        let answered = conn.tracker.answered_units();
        let in_flight = !conn.tracker.is_idle();
        conn.tracker.clear();
        conn.stats.lost(&node.stats);
        node.end_units(owed + answered);
        if answered > 0 {
            self.lose_begin(&format!("lost the connection to node {}: {why}", node.name));
        }
        if self.current == Some(i) {
            self.current = None;
        }
        if self.cancel_target == Some(i) {
            self.cancel_target = None;
        }
        let in_tx = self.tx_node == Some(i);
        if in_tx {
            self.tx_node = None;
        }
        if let Some((r, mut unit)) = self.retry.take()
            && r == i
            && owed == 1
            && !in_tx
            && self.pending.is_none()
            && self.group.pick_reader(Some(i)).is_some()
        {
            self.span
                .in_scope(|| tracing::info!(node = %node.name, "retrying a read on another node"));
            unit.avoid = Some(i);
            self.pending = Some(unit);
            return;
        }
        let e = PgError::error(
            "08006",
            format!("lost the connection to node {}: {why}", node.name),
        )
        .with_hint("the statement did not complete; the session is still usable");
        let mut owed = owed;
        let mut unknown = false;
        // The write path's state lives on the connection to the primary
        // the write began on. The group may have failed over before this
        // session saw the loss: the node is no longer the primary, but it
        // is the connection in flight or the transaction's (no other unit
        // runs beside a write). Left behind, that state would hold every
        // later unit of the session.
        let carried_writes = i == self.group.primary() || in_tx || in_flight;
        let e = if carried_writes {
            let (committing, held) = self.write_lost();
            unknown = committing;
            owed += usize::from(held);
            if unknown {
                PgError::error(
                    "08007",
                    format!(
                        "lost the connection to the primary {} while committing: the transaction may or may not have committed",
                        node.name
                    ),
                )
                .with_hint("check whether its changes are present before retrying")
            } else {
                e
            }
        } else {
            e
        };
        if in_tx && !unknown {
            // The client is still inside its transaction, which is gone.
            self.lost_tx = Some((format!("its node {} was lost ({why})", node.name), owed > 0));
        }
        for _ in 0..owed {
            self.put_error(&e);
            messages::ready_for_query(self.status_byte(), &mut self.out);
        }
        if self.open_batch == Some(i) {
            self.open_batch = None;
            self.batch_capture = None;
            if owed == 0 {
                self.put_error(&e);
            }
            self.discard_until_sync = true;
        }
    }
}

/// Before a Query or Bind that defines or drops SQL-level prepared
/// statements: their completions to wait for (`Session::sql_prepared`
/// follows the node, not what was sent).
fn expect_definitions(conn: &mut BackendConn, item: &Item, query: &[SqlPrepared]) {
    let expect = |p: SqlPrepared| {
        if !matches!(p, SqlPrepared::Execute(_)) {
            conn.tracker.push(Expect::Defines(p));
        }
    };
    match (item.frame.tag, &item.stmt) {
        (b'Q', _) => query.iter().cloned().for_each(expect),
        (b'B', Some((def, _))) if !def.class.prepared.is_empty() => {
            def.sql_prepared().for_each(expect)
        }
        _ => {}
    }
}

/// Writes one item for `conn`, preparing its statement there first if the
/// client prepared it elsewhere.
fn emit(conn: &mut BackendConn, item: &Item, buf: &mut BytesMut, captured: bool, answered: bool) {
    let f = &item.frame;
    match (f.tag, &item.stmt) {
        (b'P', Some((def, previous))) => {
            if !def.name.is_empty()
                && let Some(g) = conn.prepared.get(&def.name)
                && Some(*g) != *previous
            {
                // A stale copy from before the client closed the name here.
                buf.extend_from_slice(&statements::close_statement(&def.name).raw);
                conn.tracker.push(Expect::Close { injected: true });
            }
            conn.prepared.insert(def.name.clone(), def.generation);
            conn.tracker.push(Expect::Parse {
                injected: false,
                name: def.name.clone(),
            });
        }
        (b'B' | b'D', Some((def, _))) if conn.prepared.get(&def.name) != Some(&def.generation) => {
            if !def.name.is_empty() && conn.prepared.contains_key(&def.name) {
                buf.extend_from_slice(&statements::close_statement(&def.name).raw);
                conn.tracker.push(Expect::Close { injected: true });
            }
            buf.extend_from_slice(&def.parse.raw);
            conn.tracker.push(Expect::Parse {
                injected: true,
                name: def.name.clone(),
            });
            conn.prepared.insert(def.name.clone(), def.generation);
        }
        (b'P', None) => conn.tracker.push(Expect::Parse {
            injected: false,
            name: String::new(),
        }),
        (b'C', _) => {
            if let Some((b'S', name)) = statements::target(f.body()) {
                conn.prepared.remove(name);
            }
            conn.tracker.push(Expect::Close { injected: false });
        }
        (b'S' | b'Q', _) if answered => conn.tracker.push(Expect::Answered),
        (b'S' | b'Q', _) if captured => conn.tracker.push(Expect::Captured),
        (b'S' | b'Q', _) => conn.tracker.push(Expect::Sync { injected: false }),
        _ => {}
    }
    match (f.tag, &item.stmt) {
        // A Parse goes out as recorded (possibly rewritten for determinism).
        (b'P', Some((def, _))) => buf.extend_from_slice(&def.parse.raw),
        _ => buf.extend_from_slice(&f.raw),
    }
}

fn no_node() -> PgError {
    PgError::error("08006", "no node of the group is available")
        .with_hint("check the nodes' state at /status")
}

/// SQLSTATEs are five ASCII characters; keep the server's if it is one we
/// know, else report a connection failure.
fn static_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "28P01", "28000", "3D000", "53300", "57P03", "08006", "08001", "42501",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("08006")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{FunctionCatalog, classify};

    /// Items of a batch written as "P:sql", "B", "E", "S" (one unnamed
    /// statement at a time).
    fn batch(spec: &[&str]) -> Vec<Item> {
        let mut statements = statements::Statements::default();
        spec.iter()
            .map(|m| {
                let (tag, sql) = m.split_once(':').unwrap_or((m, ""));
                let tag = tag.as_bytes()[0];
                let mut body = Vec::new();
                if tag == b'P' {
                    body.extend_from_slice(b"\0");
                    body.extend_from_slice(sql.as_bytes());
                    body.extend_from_slice(b"\0\0\0");
                }
                let frame = Frame::new(tag, &body);
                let stmt = match tag {
                    b'P' => {
                        let class = Arc::new(classify(sql, &FunctionCatalog::builtin()));
                        Some(statements.define("", frame.clone(), class))
                    }
                    b'B' => statements.get("").map(|d| (d, None)),
                    _ => None,
                };
                Item { frame, stmt }
            })
            .collect()
    }

    fn tags(parts: &[Vec<Item>]) -> Vec<String> {
        parts
            .iter()
            .map(|p| p.iter().map(|i| i.frame.tag as char).collect())
            .collect()
    }

    #[test]
    fn a_batch_is_split_around_its_commits() {
        let items = batch(&[
            "P:BEGIN",
            "B",
            "E",
            "P:INSERT INTO t VALUES (1)",
            "B",
            "E",
            "P:COMMIT",
            "B",
            "E",
            "P:SELECT 1",
            "B",
            "E",
            "S",
        ]);
        let parts = split_batch(&items).unwrap();
        // The BEGIN, the writes, the COMMIT (each with its Parse), the read
        // after it with the client's Sync; a Sync added to all but the last.
        assert_eq!(tags(&parts), ["PBES", "PBES", "PBES", "PBES"]);
        let units: Vec<Unit> = parts.into_iter().map(Unit::of_items).collect();
        assert!(!units[0].writes && units[0].begin == Some(false));
        assert!(units[1].writes && !units[1].ends_tx && units[1].begin.is_none());
        assert!(!units[2].writes && units[2].ends_tx);
        assert_eq!(units[3].route, Route::Read);
        assert!(units.iter().all(|u| u.syncs == 1));
        // The block's settings stay with its BEGIN.
        let items = batch(&[
            "P:BEGIN",
            "B",
            "E",
            "P:SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "B",
            "D",
            "E",
            "P:SET TRANSACTION READ WRITE",
            "B",
            "E",
            "P:UPDATE t SET v = 1",
            "B",
            "E",
            "P:SET TRANSACTION READ ONLY",
            "B",
            "E",
            "P:COMMIT",
            "B",
            "E",
            "S",
        ]);
        let parts = split_batch(&items).unwrap();
        assert_eq!(tags(&parts), ["PBEPBDEPBES", "PBEPBES", "PBES"]);
        let units: Vec<Unit> = parts.into_iter().map(Unit::of_items).collect();
        assert!(!units[0].writes && units[0].begin == Some(false));
        assert_eq!(units[0].tx_isolation, Some(true));
        assert!(units[1].writes && units[2].ends_tx);
        // A BEGIN after a write joins it (it makes the implicit block its
        // transaction), as in a query string.
        let items = batch(&[
            "P:DELETE FROM t",
            "B",
            "E",
            "P:BEGIN",
            "B",
            "E",
            "P:UPDATE t SET v = 2",
            "B",
            "E",
            "S",
        ]);
        assert!(split_batch(&items).is_none());

        // A COMMIT last keeps the client's Sync.
        let items = batch(&["P:UPDATE t SET v = 1", "B", "E", "P:COMMIT", "B", "E", "S"]);
        assert_eq!(tags(&split_batch(&items).unwrap()), ["PBES", "PBES"]);
        // A COMMIT parsed but never bound runs nothing.
        let items = batch(&["P:COMMIT", "P:DELETE FROM t", "B", "E", "S"]);
        assert!(split_batch(&items).is_none());
        // Nothing to split.
        for spec in [
            &["P:INSERT INTO t VALUES (1)", "B", "E", "S"][..],
            &["P:COMMIT", "B", "E", "S"][..],
        ] {
            assert!(split_batch(&batch(spec)).is_none(), "{spec:?}");
        }
    }

    #[test]
    fn a_raised_error_keeps_its_text() {
        let u = Unit::raising(&PgError::error("0A000", "no $r$").with_hint("h"));
        let sql = String::from_utf8_lossy(u.items[0].frame.body()).to_string();
        assert_eq!(
            sql,
            "DO $rrr$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = $rr$no $r$$rr$, HINT = $r$h$r$; END$rrr$\0"
        );
    }
}
