//! One client session: the startup phase, then a loop that reads client
//! messages, groups them into units (a simple Query, or extended-protocol
//! messages up to a Sync), routes each unit to a node and relays the node's
//! responses untouched.

pub mod cancel;
mod dispatch;
mod gate;
pub mod startup;
pub mod statements;
mod write;

// The write path's pure text helpers, public for the fuzz targets (fuzz/).
pub use write::{
    insert_selects_ordered, is_ddl, is_maintenance, is_rollback, not_in_transaction,
    snapshot_isolation, startup_settings, temp_only,
};

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::backend::{BackendConn, UnitOwner};
use crate::group::{Group, NodeState};
use crate::route::SqlPrepared;
use crate::server::Shared;
use crate::wire::messages::{self, PgError};
use crate::wire::tls::{ClientRead, ClientWrite};
use crate::wire::{Frame, FrameError, MessageStream};

use cancel::{CancelGuard, CancelTarget};
use dispatch::Unit;
use statements::Statements;

/// Bytes of extended-protocol messages buffered before a Sync; past this
/// the batch is streamed to the primary instead of buffered.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Flush to the client once this much output is waiting.
const FLUSH_AT: usize = 64 * 1024;

/// Serves one client connection to the end.
pub async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // A client that never finishes its startup and login would hold a
    // connection slot forever.
    let limit = std::time::Duration::from_millis(shared.config().auth.timeout_ms);
    let deadline = tokio::time::Instant::now() + limit;
    let Some(crate::wire::tls::Negotiated {
        reader: rd,
        writer: mut wr,
        tls,
    }) = encryption(stream, &shared, deadline, &peer).await
    else {
        return;
    };
    let mut reader = MessageStream::new(rd, shared.config().max_message_size);
    let result =
        match tokio::time::timeout_at(deadline, open(&shared, &mut reader, &mut wr, tls)).await {
            Ok(r) => r,
            Err(_) => Err(PgError::fatal(
                "08006",
                format!(
                    "the startup and login did not finish within {} ms (auth.timeout_ms)",
                    limit.as_millis()
                ),
            )),
        };
    let (params, group, user) = match result {
        Ok(Some(v)) => v,
        Ok(None) => return,
        Err(e) => {
            tracing::info!(%peer, error = %e, "connection refused");
            refuse(&mut wr, &e).await;
            return;
        }
    };
    let Some(group) = group else {
        crate::admin::console::serve(shared.clone(), &user, &mut reader, &mut wr).await;
        return;
    };
    let limit = shared
        .config()
        .groups
        .iter()
        .find(|g| g.name == group.name)
        .map_or(0, |g| g.max_client_connections);
    let Some(_seat) = group.client_seat(limit) else {
        let e = PgError::fatal(
            "53300",
            format!(
                "sorry, too many clients already for group \"{}\" (its max_client_connections = {limit})",
                group.name
            ),
        );
        refuse(&mut wr, &e).await;
        return;
    };
    let span = tracing::info_span!("session", group = %group.name, %user, %peer);
    let guard = shared.cancel.register();
    let app = params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let _ = guard.slot.info.set(cancel::ClientInfo {
        user: user.clone(),
        group: group.name.clone(),
        addr: peer.clone(),
        application_name: app,
        connected_ms: crate::admin::events::now_ms(),
    });
    reader.set_max_len(shared.config().max_message_size);
    let mut session = Session::new(
        shared.clone(),
        group,
        reader,
        wr,
        params,
        guard,
        span.clone(),
    );
    // Not instrumented: entering the span on every poll of the session loop
    // costs more than the loop's own work per query. The loop's log lines
    // enter it themselves (`Session::span`).
    let result = session.run().await;
    {
        use tracing::Instrument;
        session.finish(result).instrument(span).await;
    }
}

/// The SSLRequest exchange (and TLS handshake) by `deadline`; None when
/// the client went away or took too long.
async fn encryption(
    stream: TcpStream,
    shared: &Shared,
    deadline: tokio::time::Instant,
    peer: &str,
) -> Option<crate::wire::tls::Negotiated> {
    let negotiation = crate::wire::tls::negotiate(stream, shared.tls_acceptor());
    match tokio::time::timeout_at(deadline, negotiation).await {
        Ok(Ok(n)) => Some(n),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "connection closed during the TLS negotiation");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "the TLS negotiation did not finish within auth.timeout_ms");
            None
        }
    }
}

/// Startup and authentication; returns the parameters, group and user.
async fn open(
    shared: &Arc<Shared>,
    reader: &mut MessageStream<ClientRead>,
    wr: &mut ClientWrite,
    tls: bool,
) -> Result<Option<(Vec<(String, String)>, Option<Arc<Group>>, String)>, PgError> {
    let params = match startup::read_startup(shared, reader, wr, tls).await? {
        startup::Opening::Session { params } => params,
        startup::Opening::Cancelled => {
            linger(reader, wr).await;
            return Ok(None);
        }
        startup::Opening::Gone => return Ok(None),
    };
    if !tls && shared.config().tls.as_ref().is_some_and(|t| t.required) {
        return Err(PgError::fatal(
            "28000",
            "this server requires TLS (SSL) connections: connect with sslmode=require",
        )
        .with_hint("the proxy's [tls] section sets required = true"));
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let Some(user) = get("user") else {
        return Err(PgError::fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        ));
    };
    if let Some(r) = get("replication")
        && r != "false"
        && r != "0"
        && r != "off"
    {
        return Err(PgError::fatal(
            "0A000",
            "replication connections are not supported by Reprise: connect to a node directly",
        ));
    }
    let database = get("database").unwrap_or_else(|| user.clone());
    startup::authenticate(shared, &user, reader, wr).await?;
    if database == crate::admin::ADMIN_DATABASE {
        // The console runs after the login timeout, like a session.
        return Ok(Some((params, None, user)));
    }
    let Some(group) = shared.group(&database) else {
        return Err(
            PgError::fatal("3D000", format!("database \"{database}\" does not exist")).with_hint(
                format!(
                    "Reprise serves the groups {}; connect with one of them as the database name",
                    shared.group_names().join(", ")
                ),
            ),
        );
    };
    Ok(Some((params, Some(group), user)))
}

/// After a cancel request: closes our side, then waits briefly for the
/// client to close its own. Closing while a TLS client's close_notify is
/// still unread would reset the connection under it, failing its cancel.
async fn linger(reader: &mut MessageStream<ClientRead>, wr: &mut ClientWrite) {
    let _ = wr.shutdown().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Ok(Some(_)) = reader.next().await {}
    })
    .await;
}

async fn refuse(wr: &mut ClientWrite, e: &PgError) {
    let mut out = BytesMut::new();
    e.encode(&mut out);
    let _ = wr.write_all(&out).await;
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

/// Why the session loop ended.
enum End {
    /// The client said Terminate or closed its socket.
    Client,
    /// A fatal error to report to the client first.
    Fatal(PgError),
}

/// The state of one client session.
pub struct Session {
    shared: Arc<Shared>,
    group: Arc<Group>,
    client: MessageStream<ClientRead>,
    client_wr: ClientWrite,
    /// Output for the client, flushed when input runs dry.
    out: BytesMut,
    /// Reused buffer for what goes to a backend.
    scratch: BytesMut,
    params: Vec<(String, String)>,
    /// Backend connections by node index, opened on first use.
    backends: Backends,
    /// The backend we are talking to (polled for its messages).
    current: Option<usize>,
    /// The subscriber this session last read from: it keeps reading there
    /// while that is about as idle as the best choice.
    last_reader: Option<usize>,
    /// The backend holding the client's open transaction.
    tx_node: Option<usize>,
    /// The transaction block was begun READ ONLY: PostgreSQL refuses its
    /// writes, so nothing of it is locked or logged (volatile functions
    /// it calls only read).
    tx_read_only: bool,
    /// The client's transaction died with its node (why): the session acts
    /// as in an aborted transaction until the client ends it.
    /// (Whether the client was told yet.)
    lost_tx: Option<(String, bool)>,
    /// A lone BEGIN the client was answered for, not sent yet, and the
    /// `SET TRANSACTION` statements after it: the unit after them tells
    /// where the block runs (`Session::release_begin`).
    deferred: Vec<dispatch::Unit>,
    /// The node running a unit that exports a snapshot: its rows are read
    /// for the snapshot's id.
    exporting: Option<usize>,
    exported: ExportedSnapshots,
    /// A refusal the transaction block's node was asked to raise (so that
    /// it aborts the block): the client gets it as made here, without the
    /// CONTEXT line of the node's RAISE.
    raised: Option<PgError>,
    /// Why the session is pinned to the primary, if it is.
    pinned: Option<&'static str>,
    /// Cursors whose query may write, declared in the open transaction:
    /// their FETCH, MOVE and CLOSE are logged with it (those of other
    /// cursors only read, and are not).
    writing_cursors: Vec<String>,
    /// The session has sent something that may change data.
    wrote: bool,
    /// The write path: lock, capture, log append, sync wait.
    write: write::WriteState,
    /// Session-level SET statements, replayed on every backend used.
    settings: Vec<String>,
    /// SQL-level prepared statements (PREPARE), by name: their source
    /// text, for the log entries that EXECUTE them.
    sql_prepared: rustc_hash::FxHashMap<String, String>,
    statements: Statements,
    /// Extended-protocol messages waiting for their Sync.
    batch: Vec<Frame>,
    batch_bytes: usize,
    /// A batch already streaming to this node until its Sync.
    open_batch: Option<usize>,
    /// Whether the batch streaming to the primary is captured for the log
    /// (None: no batch is streaming).
    batch_capture: Option<bool>,
    /// The last unit sent with a Sync or Query was a simple Query.
    last_unit_simple: bool,
    /// An extended-protocol COPY FROM STDIN started after its Sync was sent:
    /// the node ignores that Sync, and answers the client's next one.
    copy_sync_ignored: bool,
    /// Drop client messages until the next Sync (its backend was lost).
    discard_until_sync: bool,
    /// The ReadyForQuery status to answer that Sync with (None: the
    /// session's own).
    discard_status: Option<u8>,
    /// A batch streaming to the primary was ended before its COMMIT with a
    /// Sync of ours, still unanswered (see `Session::cut_stream`).
    stream_cut: bool,
    /// A unit that must wait until the busy backend is idle.
    pending: Option<Unit>,
    /// The rest of a client's query string that runs as separate queries
    /// (see `Session::runs_split`): each part is sent once the one before
    /// succeeded; their ReadyForQuery messages but the last are not relayed.
    pub(super) split: VecDeque<dispatch::Part>,
    /// A node asked the client for COPY data (CopyInResponse relayed) and
    /// the client has not ended it: its CopyData is read even between the
    /// parts of a split string.
    copy_in: bool,
    /// The last read unit, for one transparent retry if its node dies
    /// before answering.
    retry: Option<(usize, Unit)>,
    cancel: CancelGuard,
    cancel_target: Option<usize>,
    draining: bool,
    /// Node state changes and promotions since the session began.
    events: tokio::sync::watch::Receiver<u64>,
    /// Counted among the sessions with work on the primary (a switchover
    /// waits for them).
    pass: PrimaryPass,
    /// What the unit being answered told the client so far: whether it
    /// sent an error, and whether its last command tag ended a transaction.
    pub(super) unit_seen: UnitSeen,
    /// Bytes from the client not yet added to the group's stats.
    client_bytes_in: u64,
    /// The session's tracing span (group, user, peer), entered by the
    /// loop's log lines.
    span: tracing::Span,
    /// The config as of the start of this turn of the loop, and its
    /// version (`Shared::config_version`).
    cfg: Arc<crate::config::Config>,
    cfg_version: u64,
}

/// What a unit's responses showed, for counting transactions.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UnitSeen {
    error: bool,
    /// The last command tag was COMMIT (true) or ROLLBACK (false).
    end: Option<bool>,
}

/// A client counted in the connection gauge while it lives.
struct ClientCount {
    shared: Arc<Shared>,
    group: String,
}

impl ClientCount {
    fn new(shared: Arc<Shared>, group: String) -> ClientCount {
        shared.metrics.client_connected(&group);
        ClientCount { shared, group }
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.shared.metrics.client_disconnected(&self.group);
    }
}

/// A session's place among those with work in flight on the primary.
struct PrimaryPass {
    group: Arc<Group>,
    held: bool,
}

impl PrimaryPass {
    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.group.leave();
        }
    }
}

impl Drop for PrimaryPass {
    fn drop(&mut self) {
        self.release();
    }
}

/// Snapshots the session's open transaction exported, known to the group
/// (`Group::snapshot_node`) until the transaction or the session ends.
struct ExportedSnapshots {
    group: Arc<Group>,
    ids: Vec<String>,
}

impl ExportedSnapshots {
    fn clear(&mut self) {
        if !self.ids.is_empty() {
            self.group.forget_snapshots(&self.ids);
            self.ids.clear();
        }
    }
}

impl Drop for ExportedSnapshots {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Whether a value is a snapshot id as `pg_export_snapshot()` makes them
/// (`00000003-0000001B-1`).
fn is_snapshot_id(v: &str) -> bool {
    let mut parts = v.split('-');
    let hex = |p: Option<&str>| {
        p.is_some_and(|p| p.len() == 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    hex(parts.next())
        && hex(parts.next())
        && parts
            .next()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_none()
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        group: Arc<Group>,
        client: MessageStream<ClientRead>,
        client_wr: ClientWrite,
        params: Vec<(String, String)>,
        cancel: CancelGuard,
        span: tracing::Span,
    ) -> Session {
        let (startup_snapshot, startup_read_only) = write::startup_tx_defaults(&params);
        let write = write::WriteState {
            startup_settings: write::startup_settings(&params),
            startup_snapshot,
            startup_read_only,
            ..write::WriteState::default()
        };
        Session {
            events: group.events(),
            pass: PrimaryPass {
                group: group.clone(),
                held: false,
            },
            exported: ExportedSnapshots {
                group: group.clone(),
                ids: Vec::new(),
            },
            group,
            client,
            client_wr,
            out: BytesMut::with_capacity(8192),
            scratch: BytesMut::with_capacity(8192),
            params,
            backends: Backends::default(),
            current: None,
            last_reader: None,
            tx_node: None,
            tx_read_only: false,
            lost_tx: None,
            deferred: Vec::new(),
            exporting: None,
            raised: None,
            pinned: None,
            writing_cursors: Vec::new(),
            wrote: false,
            write,
            settings: Vec::new(),
            sql_prepared: Default::default(),
            statements: Statements::default(),
            batch: Vec::new(),
            batch_bytes: 0,
            open_batch: None,
            batch_capture: None,
            last_unit_simple: true,
            copy_sync_ignored: false,
            discard_until_sync: false,
            discard_status: None,
            stream_cut: false,
            pending: None,
            split: VecDeque::new(),
            copy_in: false,
            retry: None,
            cancel,
            cancel_target: None,
            draining: false,
            unit_seen: UnitSeen::default(),
            client_bytes_in: 0,
            span,
            cfg_version: shared.config_version(),
            cfg: Arc::clone(&shared.config()),
            shared,
        }
    }

    /// Connects to the primary (or any live node), relays its parameters,
    /// sends our cancel key and the first ReadyForQuery.
    async fn greet(&mut self) -> Result<(), End> {
        if let Some(status) = self.group.greeting(&self.params) {
            // Seen before: no backend connection until there is work, so
            // idle clients cost the nodes nothing.
            for (k, v) in &status {
                messages::parameter_status(k, v, &mut self.out);
            }
            messages::backend_key_data(self.cancel.pid, self.cancel.secret, &mut self.out);
            messages::ready_for_query(b'I', &mut self.out);
            return Ok(());
        }
        let primary = self.group.primary();
        let mut order = vec![primary];
        order.extend((0..self.group.slots()).filter(|&i| i != primary));
        let mut last_error = None;
        for i in order {
            if i != primary && !self.group.node(i).is_up() {
                continue;
            }
            match self.connect(i).await {
                Ok(()) => {
                    let conn = self.backends[i].as_ref().expect("connected");
                    for (k, v) in &conn.params {
                        messages::parameter_status(k, v, &mut self.out);
                    }
                    self.group
                        .remember_greeting(&self.params, conn.params.clone());
                    messages::backend_key_data(self.cancel.pid, self.cancel.secret, &mut self.out);
                    messages::ready_for_query(b'I', &mut self.out);
                    self.current = Some(i);
                    return Ok(());
                }
                Err(e) => last_error = Some(e),
            }
        }
        let e = last_error.unwrap_or_else(|| PgError::fatal("08006", "no node is available"));
        Err(End::Fatal(PgError {
            severity: "FATAL",
            ..e
        }))
    }

    async fn run(&mut self) -> Result<(), End> {
        self.greet().await?;
        // Counted out even if this task is aborted.
        let _counted = ClientCount::new(self.shared.clone(), self.group.name.clone());
        self.main_loop().await
    }

    async fn main_loop(&mut self) -> Result<(), End> {
        // Long-lived waits for shutdown and group changes, not one per
        // iteration: each wait registers with a channel every session shares.
        // Gated: polled again only once woken, not on every turn.
        let mut shutdown = self.shared.shutdown_signal();
        let mut shutdown_changed = gate::Gated::new(shutdown.changed());
        let mut group_changed = gate::Gated::new(next_change(self.events.clone()));
        loop {
            self.refresh_config();
            if let Some(rfq) = self.wait_sync().await {
                self.forward_rfq(rfq, self.group.primary());
                continue;
            }
            // A unit that waited for a busy backend (or a read to retry).
            if let Some(unit) = self.pending.take() {
                if self.busy_backend().is_none() {
                    self.dispatch(unit).await?;
                } else {
                    self.pending = Some(unit);
                }
            }
            // Take every complete client message we may act on now.
            while self.pending.is_none() && (self.split.is_empty() || self.copy_in) {
                match self.client.try_next() {
                    Ok(Some(f)) => {
                        self.client_bytes_in += f.raw.len() as u64;
                        self.on_client_frame(f).await?
                    }
                    Ok(None) => break,
                    Err(e) => return Err(End::Fatal(frame_error(e))),
                }
            }
            // Before the flush: a client that sees its answer sees its state.
            let in_tx =
                self.tx_node.is_some() || self.lost_tx.is_some() || !self.deferred.is_empty();
            let quiet = self.quiet();
            self.cancel.slot.set_state(match (quiet, in_tx) {
                (false, _) => cancel::ClientState::Active,
                (true, true) => cancel::ClientState::IdleInTransaction,
                (true, false) => cancel::ClientState::Idle,
            });
            self.flush().await?;
            if self.draining && self.is_idle() {
                return Err(End::Fatal(if self.group.is_retired() {
                    PgError::fatal(
                        "57P01",
                        format!(
                            "terminating connection: group \"{}\" was removed from the configuration",
                            self.group.name
                        ),
                    )
                } else {
                    shutting_down()
                }));
            }
            let idle_tx_limit = match self.cfg.idle_in_transaction_timeout_ms {
                0 => None,
                ms => (quiet && in_tx).then(|| std::time::Duration::from_millis(ms)),
            };
            if self.pass.held && !self.busy_on_primary() {
                self.pass.release();
            }
            let reading_client = self.pending.is_none() && (self.split.is_empty() || self.copy_in);
            let polled = self.current.filter(|&i| self.backends[i].is_some());
            tokio::select! {
                // In this order, without drawing a random one: the rare
                // waits first so a busy session still sees them, the
                // node's answers before more client input.
                biased;
                _ = &mut shutdown_changed, if !self.draining => {
                    self.draining = true;
                }
                events = &mut group_changed => {
                    group_changed.set(next_change(events));
                    self.on_group_change();
                }
                r = fill_backend(&mut self.backends, polled), if polled.is_some() => {
                    self.backend_filled(polled.expect("guarded"), r).await?;
                },
                r = self.client.fill(), if reading_client => match r {
                    Ok(true) => {}
                    Ok(false) => return Err(End::Client),
                    Err(FrameError::Io(_)) => return Err(End::Client),
                    Err(e) => return Err(End::Fatal(frame_error(e))),
                },
                // Lazy: no timer is made unless the branch is enabled.
                _ = async { tokio::time::sleep(idle_tx_limit.unwrap_or_default()).await }, if idle_tx_limit.is_some() => {
                    return Err(End::Fatal(PgError::fatal(
                        "25P03",
                        format!(
                            "terminating connection due to idle-in-transaction timeout (idle_in_transaction_timeout_ms = {})",
                            idle_tx_limit.unwrap_or_default().as_millis()
                        ),
                    )));
                }
            }
        }
    }

    /// Picks up a config installed since the last turn (RELOAD).
    fn refresh_config(&mut self) {
        let v = self.shared.config_version();
        if v != self.cfg_version {
            self.cfg = Arc::clone(&self.shared.config());
            self.cfg_version = v;
        }
    }

    /// Drops connections to nodes that went down (or are being re-seeded):
    /// what they owed is answered with an error, a read is retried.
    fn on_group_change(&mut self) {
        if self.group.is_retired() {
            self.draining = true;
        }
        for i in 0..self.backends.len() {
            let state = self.group.node(i).state();
            if self.backends[i].is_some()
                && matches!(
                    state,
                    NodeState::Down | NodeState::Seeding | NodeState::Removed
                )
            {
                let why = format!("node {} is {}", self.group.node(i).name, state.as_str());
                self.backend_lost(i, why);
            }
        }
    }

    /// Work of this session is in flight on the primary.
    fn busy_on_primary(&self) -> bool {
        let p = self.group.primary();
        self.tx_node == Some(p)
            || self.write.tx.is_some()
            || !self.write.own.is_empty()
            || self.open_batch == Some(p)
            || self.backends[p]
                .as_ref()
                .is_some_and(|c| c.tracker.client_units() > 0)
    }

    /// No unit in flight, no open transaction, nothing being committed.
    fn is_idle(&self) -> bool {
        self.tx_node.is_none()
            && self.deferred.is_empty()
            && !self.busy_on_primary()
            && self.quiet()
    }

    /// Nothing of the client's is in flight or waiting (a transaction may
    /// be open).
    fn quiet(&self) -> bool {
        self.write.sync_wait.is_none()
            && self.open_batch.is_none()
            && self.batch.is_empty()
            && self.pending.is_none()
            && self.split.is_empty()
            && self
                .backends
                .iter()
                .flatten()
                .all(|b| b.tracker.client_units() == 0)
    }

    /// Writes waiting output to the client.
    async fn flush(&mut self) -> Result<(), End> {
        self.group.stats.client_bytes(
            std::mem::take(&mut self.client_bytes_in),
            self.out.len() as u64,
        );
        if !self.out.is_empty() {
            self.client_wr
                .write_all(&self.out)
                .await
                .map_err(|_| End::Client)?;
            self.client_wr.flush().await.map_err(|_| End::Client)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Handles one message from the client.
    async fn on_client_frame(&mut self, f: Frame) -> Result<(), End> {
        match f.tag {
            b'Q' => {
                self.flush_partial_batch().await?;
                let unit = self.query_unit(f);
                self.dispatch(unit).await
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => self.extended(f).await,
            b'H' => self.flush_message(f).await,
            b'S' if self.copy_sync_ignored => {
                // Ends the COPY: the node answers this Sync for the unit
                // already waiting for one.
                self.copy_sync_ignored = false;
                if let Some(i) = self.current {
                    self.capture_copy(&f);
                    self.send_raw(i, &f.raw).await?;
                }
                Ok(())
            }
            b'S' => self.sync(f).await,
            b'd' | b'c' | b'f' => {
                if f.tag != b'd' {
                    self.copy_in = false;
                }
                // COPY data goes to the backend running the COPY.
                if let Some(i) = self.current
                    && self.backends[i].is_some()
                {
                    self.capture_copy(&f);
                    self.send_raw(i, &f.raw).await?;
                }
                Ok(())
            }
            b'X' => Err(End::Client),
            b'F' => {
                // A fastpath function call: answered like a failed unit.
                let mut unit = self.batch_unit(Vec::new());
                unit.syncs = 1;
                unit.refused = Some(
                    PgError::error(
                        "0A000",
                        "the fastpath function call protocol is not supported by Reprise",
                    )
                    .with_hint("call the function with SELECT instead"),
                );
                self.dispatch(unit).await
            }
            other => Err(End::Fatal(PgError::fatal(
                "08P01",
                format!("invalid frontend message type {}", other),
            ))),
        }
    }

    /// What reading from backend `i` gave (`fill_backend`): relays what is
    /// complete, or counts the backend lost.
    async fn backend_filled(&mut self, i: usize, r: Result<bool, FrameError>) -> Result<(), End> {
        match r {
            Ok(true) => self.drain_backend(i).await?,
            Ok(false) => self.backend_lost(i, "the node closed the connection".into()),
            Err(e) => self.backend_lost(i, e.to_string()),
        }
        Ok(())
    }

    /// Relays everything complete from backend `i`.
    async fn drain_backend(&mut self, i: usize) -> Result<(), End> {
        loop {
            let Some(conn) = self.backends[i].as_mut() else {
                return Ok(());
            };
            // Most of what a node sends — rows, descriptions, completions —
            // answers a client's unit and changes no state: relayed in place.
            // (The tracker keeps no account of these tags.)
            if let Ok(Some((tag, raw))) = conn.reader.peek()
                && !matches!(tag, b'1' | b'3' | b'E' | b'Z' | b'G')
                && self.exporting.is_none()
                && !(tag == b'C'
                    && (conn.tracker.defines_pending()
                        || self.write.tx.as_ref().is_some_and(|t| t.failed.is_some())))
                && conn.tracker.owner() == Some(UnitOwner::Client)
            {
                let len = raw.len();
                if tag == b'C' {
                    self.unit_seen.end = transaction_end(&raw[5..]);
                }
                self.out.extend_from_slice(raw);
                conn.stats.received(len);
                conn.reader.consume(len);
                self.retry = None;
                if self.out.len() >= FLUSH_AT {
                    self.flush().await?;
                }
                continue;
            }
            let frame = match conn.reader.try_next() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.backend_lost(i, e.to_string());
                    return Ok(());
                }
            };
            conn.stats.received(frame.raw.len());
            if frame.tag == b'E' && messages::error_is_fatal(frame.body()) {
                // The node is closing this connection (shutdown, postmaster
                // gone, terminated): the client's connection to us lives on,
                // so it gets an ERROR for what was owed, not this FATAL.
                let why = format!(
                    "{} (SQLSTATE {})",
                    messages::error_message(frame.body()),
                    messages::error_code(frame.body()).unwrap_or_default()
                );
                self.backend_lost(i, why);
                return Ok(());
            }
            if frame.tag == b'G' && !self.last_unit_simple && self.open_batch != Some(i) {
                // COPY FROM STDIN through the extended protocol, its Sync
                // already sent: the node ignores that Sync in copy-in mode.
                self.copy_sync_ignored = true;
                self.copy_sync_moved();
            }
            if frame.tag == b'D' && self.exporting == Some(i) {
                for id in write::data_row(frame.body()).into_iter().flatten() {
                    if is_snapshot_id(&id) {
                        self.group.snapshot_exported(id.clone(), i);
                        self.exported.ids.push(id);
                    }
                }
            }
            let conn = self.backends[i].as_mut().expect("checked above");
            let outcome = conn.tracker.on_message(frame.tag);
            for name in &outcome.not_prepared {
                conn.prepared.remove(name);
            }
            let defined = match frame.tag {
                b'C' => conn.tracker.completed(frame.body()),
                _ => None,
            };
            let idle = conn.tracker.client_units() == 0;
            if let Some(p) = defined {
                // The proxy's own statements go with the client's: prepared
                // again at their next use.
                if let Some(conn) = self.backends[i].as_mut() {
                    let own = |g: &u64| *g == write::OWN_GENERATION;
                    match &p {
                        SqlPrepared::Deallocate(None) | SqlPrepared::DiscardAll => {
                            conn.prepared.retain(|_, g| !own(g))
                        }
                        SqlPrepared::Deallocate(Some(name))
                            if conn.prepared.get(name).is_some_and(own) =>
                        {
                            conn.prepared.remove(name);
                        }
                        _ => {}
                    }
                }
                self.sql_prepared_done(p);
            }
            match outcome.owner {
                Some(UnitOwner::Own) => {
                    // Notifications are the session's whatever they answer;
                    // notices at our COMMIT of an implicit transaction are
                    // the client's statement's (deferred triggers).
                    if frame.tag == b'A'
                        || (frame.tag == b'N'
                            && self.write.own.front() == Some(&write::Own::Commit))
                    {
                        self.out.extend_from_slice(&frame.raw);
                    }
                    self.on_own_message(&frame);
                    if frame.tag == b'Z' {
                        let kind = self.write.last_own.take();
                        if let Some(rfq) = kind.and_then(|k| self.on_own_done(k, true)) {
                            self.forward_rfq(rfq, i);
                        }
                    }
                    continue;
                }
                // (No owner yet: the Sync of a streamed, captured batch has
                // not been sent.)
                Some(UnitOwner::ClientCaptured) | None
                    if frame.tag == b'C'
                        && (outcome.owner.is_some() || self.batch_capture == Some(true)) =>
                {
                    if let Some(tx) = self.write.tx.as_mut() {
                        tx.tags.push(
                            messages::Reader::new(frame.body())
                                .cstr()
                                .unwrap_or("")
                                .to_string(),
                        );
                    }
                }
                _ => {}
            }
            if frame.tag == b'Z' && outcome.unit_done {
                self.retry = None;
                self.group.node(i).end_units(1);
                if let Some(conn) = self.backends[i].as_mut() {
                    conn.stats
                        .unit_done(&self.group.node(i).stats, self.cancel.pid as usize);
                }
                let rfq = if i == self.group.primary() {
                    self.on_primary_rfq(frame, i).await?
                } else {
                    Some(frame)
                };
                match rfq {
                    Some(rfq) if outcome.owner == Some(UnitOwner::Answered) => {
                        self.follow_rfq(&rfq, i);
                        if self.tx_node.is_none() {
                            self.lose_begin("the node did not open a transaction block");
                        }
                    }
                    Some(rfq) => self.forward_rfq(rfq, i),
                    None => {}
                }
                if idle && self.pending.is_some() {
                    // The main loop sends the waiting unit next.
                    self.flush().await?;
                    return Ok(());
                }
            } else if outcome.forward {
                self.retry = None;
                let mut lock_error = self.failed_commit(i, &frame);
                if frame.tag == b'E' && i == self.group.primary() {
                    self.write.unit_failed = true;
                    if messages::error_code(frame.body()).as_deref() == Some("25P02") {
                        // Aborted by our write-lock query's failure: the
                        // client is told that failure instead.
                        lock_error = self.write.tx.as_mut().and_then(|t| t.lock_error.take());
                    }
                }
                self.note_relayed(i, &frame);
                if let Some(c) = self.write.tx.as_mut().and_then(|t| t.held_complete.take()) {
                    // Not the last statement's: something followed it.
                    self.out.extend_from_slice(&c.raw);
                }
                if frame.tag == b'C'
                    && outcome.owner == Some(UnitOwner::ClientCaptured)
                    && let Some(tx) = self.write.tx.as_mut().filter(|t| t.simple)
                {
                    tx.held_complete = Some(frame);
                    continue;
                }
                let raised = match frame.tag {
                    b'E' => self
                        .raised
                        .take()
                        .filter(|e| messages::error_code(frame.body()).as_deref() == Some(e.code)),
                    _ => None,
                };
                match lock_error
                    .or(raised)
                    .or_else(|| self.wrapped_termination(i, &frame))
                {
                    Some(e) => e.encode(&mut self.out),
                    None => self.out.extend_from_slice(&frame.raw),
                }
            }
            if self.out.len() >= FLUSH_AT {
                self.flush().await?;
            }
        }
    }

    /// The next part of a split query string or batch, as a unit for the
    /// primary.
    pub(super) fn next_part(&mut self) -> Option<Unit> {
        let mut unit = match self.split.pop_front()? {
            dispatch::Part::Query(sql) => self.query_unit(Frame {
                tag: b'Q',
                raw: messages::query(&sql),
            }),
            dispatch::Part::Unit(unit) => *unit,
        };
        // Where the whole string would have run.
        unit.route = dispatch::Route::Write;
        Some(unit)
    }

    /// Forwards a ReadyForQuery from node `i` and follows its status; in
    /// a split query string, sends the next part instead while all went well.
    fn forward_rfq(&mut self, rfq: Frame, i: usize) {
        // An error ends a split string, as it would end one query.
        let failed = self.unit_seen.error;
        self.follow_rfq(&rfq, i);
        if std::mem::take(&mut self.stream_cut) {
            // The answer to our Sync that ended a streamed batch.
            if failed {
                self.abort_batch(rfq.body().first().copied().unwrap_or(b'I'));
            }
            return;
        }
        if failed {
            self.split.clear();
        }
        match self.next_part() {
            Some(unit) => self.pending = Some(unit),
            None => self.out.extend_from_slice(&rfq.raw),
        }
    }

    /// Follows the transaction status a ReadyForQuery from node `i` gives.
    fn follow_rfq(&mut self, rfq: &Frame, i: usize) {
        let status = rfq.body().first().copied().unwrap_or(b'I');
        self.copy_in = false;
        if self.backends[i]
            .as_ref()
            .is_none_or(|c| c.tracker.is_idle())
        {
            // (Units pipelined before the exporting one answer first.)
            self.exporting = None;
        }
        if status == b'I' {
            self.exported.clear();
            if !self.write.declared_defaults.is_empty() {
                self.write.declared_defaults.clear();
            }
            if !self.write.declared_numbered.is_empty() {
                self.write.declared_numbered.clear();
            }
            // A transaction ended: a block by its COMMIT or ROLLBACK tag
            // (none: it was lost), an autocommit unit by whether it failed.
            let seen = std::mem::take(&mut self.unit_seen);
            let committed = match seen.end {
                Some(c) => c,
                None => self.tx_node.is_none() && !seen.error,
            };
            if let Some(node) = self.group.nodes().get(i) {
                node.stats.transaction_ended(committed);
            }
        } else {
            self.unit_seen = UnitSeen::default();
        }
        self.tx_node = (status != b'I').then_some(i);
        self.tx_read_only &= status != b'I';
        if status == b'I' {
            self.write.tx_locals.clear();
        }
        self.raised = None;
    }

    /// The batch failed before the Sync that ended its streaming: as after
    /// an error, the rest of it (waiting, or still to come) does not run;
    /// the client's Sync is answered with `status`.
    fn abort_batch(&mut self, status: u8) {
        match self.pending.take() {
            Some(unit) if !unit.simple => {
                for _ in 0..unit.syncs {
                    messages::ready_for_query(status, &mut self.out);
                }
            }
            other => {
                self.pending = other;
                self.batch.clear();
                self.batch_bytes = 0;
                self.discard_until_sync = true;
                self.discard_status = Some(status);
            }
        }
    }

    /// Sends raw bytes to backend `i`; a failure counts as losing it.
    async fn send_raw(&mut self, i: usize, bytes: &[u8]) -> Result<(), End> {
        let Some(conn) = self.backends[i].as_mut() else {
            return Ok(());
        };
        conn.stats.sent(bytes.len());
        if let Err(e) = conn.send(bytes).await {
            self.backend_lost(i, e.to_string());
        }
        Ok(())
    }

    /// Counts an error the proxy itself sends to the client, and sends it.
    fn put_error(&mut self, e: &PgError) {
        self.unit_seen.error = true;
        // Nothing more of a split query string runs.
        self.split.clear();
        self.group.stats.error(e.code.as_bytes());
        e.encode(&mut self.out);
    }

    /// The client's COMMIT answered "ROLLBACK" because our log append
    /// failed (it aborted the transaction): the client is told that failure,
    /// not that its COMMIT rolled back as if it had been told before.
    fn failed_commit(&self, i: usize, frame: &Frame) -> Option<PgError> {
        if frame.tag != b'C'
            || i != self.group.primary()
            || !frame.body().starts_with(b"ROLLBACK\0")
        {
            return None;
        }
        let tx = (self.write.tx.as_ref()).filter(|t| t.committing && !t.implicit)?;
        tx.failed.clone()
    }

    /// Relays an error node `i` gave for the client's unit outside the
    /// unit's own answers (at our COMMIT of its implicit transaction).
    fn put_relayed_error(&mut self, i: usize, e: &Frame) {
        self.split.clear();
        self.note_relayed(i, e);
        self.out.extend_from_slice(&e.raw);
    }

    /// Counts a message from node `i` relayed to the client: its errors,
    /// and what ends a transaction.
    fn note_relayed(&mut self, i: usize, frame: &Frame) {
        match frame.tag {
            b'E' => {
                self.unit_seen.error = true;
                self.group
                    .node(i)
                    .stats
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.group
                    .stats
                    .error(crate::admin::stats::error_sqlstate(frame.body()));
            }
            b'C' => self.unit_seen.end = transaction_end(frame.body()),
            b'G' => self.copy_in = true,
            _ => {}
        }
    }

    /// The node completed a PREPARE, DEALLOCATE or DISCARD ALL the client
    /// sent: what entries replay for the statement names now.
    fn sql_prepared_done(&mut self, p: SqlPrepared) {
        match p {
            SqlPrepared::Prepare { name, text } => {
                self.sql_prepared.insert(name, text);
            }
            SqlPrepared::Deallocate(Some(name)) => {
                self.sql_prepared.remove(&name);
            }
            SqlPrepared::Deallocate(None) | SqlPrepared::DiscardAll => self.sql_prepared.clear(),
            SqlPrepared::Execute(_) => {}
        }
    }

    /// The text a PREPARE of `name` had, as the node will know it once
    /// what was sent to the primary before is done: a PREPARE of a name in
    /// use fails, a DEALLOCATE drops it.
    pub(super) fn sql_prepared_text(&self, name: &str) -> Option<String> {
        let mut text = self.sql_prepared.get(name).cloned();
        let primary = self.backends[self.group.primary()].as_ref();
        for p in primary.iter().flat_map(|c| c.tracker.pending_defines()) {
            match p {
                SqlPrepared::Prepare { name: n, text: t } if n == name && text.is_none() => {
                    text = Some(t.clone())
                }
                SqlPrepared::Deallocate(Some(n)) if n == name => text = None,
                SqlPrepared::Deallocate(None) | SqlPrepared::DiscardAll => text = None,
                _ => {}
            }
        }
        text
    }

    /// A procedure (or DO block) that commits or rolls back inside failed
    /// with "invalid transaction termination" because the proxy runs the
    /// autocommit write in a transaction of its own to log it: the client
    /// is told so, under the same SQLSTATE.
    fn wrapped_termination(&self, i: usize, frame: &Frame) -> Option<PgError> {
        let implicit = self.write.tx.as_ref().is_some_and(|t| t.implicit);
        if frame.tag != b'E' || i != self.group.primary() || !implicit {
            return None;
        }
        (messages::error_code(frame.body()).as_deref() == Some("2D000")).then(|| {
            PgError::error(
                "2D000",
                "invalid transaction termination: Reprise runs each autocommit write in one \
                 transaction so that it is logged and replayed whole, and a procedure that \
                 commits or rolls back inside cannot run in one",
            )
            .with_detail(
                messages::error_fields(frame.body())
                    .into_iter()
                    .find(|(c, _)| *c == b'W')
                    .map_or_else(|| messages::error_message(frame.body()), |(_, w)| w),
            )
            .with_hint(
                "commit from the client between the procedure's steps, or run it on each node \
                 directly",
            )
        })
    }

    /// Points cancel requests at backend `i`.
    fn set_cancel_target(&mut self, i: usize) {
        if self.cancel_target == Some(i) {
            return;
        }
        if let Some(conn) = &self.backends[i] {
            self.cancel.slot.set(CancelTarget {
                host: conn.host.clone(),
                port: conn.port,
                tls: conn.tls.clone(),
                pid: conn.pid,
                secret: conn.secret,
            });
            self.cancel_target = Some(i);
        }
    }

    /// Reports a fatal error (if any) and closes everything.
    async fn finish(mut self, result: Result<(), End>) {
        if let Err(End::Fatal(e)) = result {
            tracing::info!(error = %e, "closing session");
            self.put_error(&e);
        }
        let _ = self.flush().await;
        for (i, b) in self.backends.iter_mut().enumerate() {
            if let Some(mut conn) = b.take() {
                self.group.node(i).end_units(conn.tracker.client_units());
                conn.stats.lost(&self.group.node(i).stats);
                let _ = conn.send(&[b'X', 0, 0, 0, 4]).await;
            }
        }
        let _ = self.client_wr.shutdown().await;
    }
}

/// A session's backend connections by node index. Nodes added at run time
/// get higher indexes: the list grows when one is first used.
#[derive(Default)]
struct Backends {
    list: Vec<Option<BackendConn>>,
    /// Always `None`: what an index past the end reads.
    none: Option<BackendConn>,
}

impl std::ops::Index<usize> for Backends {
    type Output = Option<BackendConn>;
    fn index(&self, i: usize) -> &Option<BackendConn> {
        self.list.get(i).unwrap_or(&self.none)
    }
}

impl std::ops::IndexMut<usize> for Backends {
    fn index_mut(&mut self, i: usize) -> &mut Option<BackendConn> {
        if i >= self.list.len() {
            self.list.resize_with(i + 1, || None);
        }
        &mut self.list[i]
    }
}

impl std::ops::Deref for Backends {
    type Target = [Option<BackendConn>];
    fn deref(&self) -> &Self::Target {
        &self.list
    }
}

impl std::ops::DerefMut for Backends {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.list
    }
}

/// The next node state change or promotion; hands the receiver back for
/// the wait after it. The group (the sender) lives as long as the session.
async fn next_change(
    mut events: tokio::sync::watch::Receiver<u64>,
) -> tokio::sync::watch::Receiver<u64> {
    if events.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    events
}

/// Reads from the polled backend (cancel-safe).
async fn fill_backend(
    backends: &mut [Option<BackendConn>],
    i: Option<usize>,
) -> Result<bool, FrameError> {
    match i.and_then(|i| backends[i].as_mut()) {
        Some(conn) => conn.reader.fill().await,
        None => std::future::pending().await,
    }
}

/// What a CommandComplete tag says of the transaction: Some(true) for
/// COMMIT, Some(false) for ROLLBACK, None for any other statement.
fn transaction_end(tag: &[u8]) -> Option<bool> {
    if tag.starts_with(b"COMMIT") {
        Some(true)
    } else if tag.starts_with(b"ROLLBACK") {
        Some(false)
    } else {
        None
    }
}

fn frame_error(e: FrameError) -> PgError {
    match e {
        FrameError::TooLarge { .. } => PgError::fatal("54000", format!("message refused: {e}"))
            .with_hint("raise max_message_size in the Reprise config if this is legitimate"),
        _ => PgError::fatal("08P01", format!("invalid message from the client: {e}")),
    }
}

fn shutting_down() -> PgError {
    PgError::fatal(
        "57P01",
        "terminating connection because Reprise is shutting down",
    )
}
