//! What a client statement does, as far as routing cares.
//!
//! [`classify`] parses a query string with pg_query (PostgreSQL's own
//! parser) and reports whether every statement only reads, whether it opens
//! or ends a transaction block, which session settings it makes and whether
//! it creates session state that pins the session to the primary.
//! [`Classifier`] adds a cache keyed by [`cache_key`], so statements that
//! differ only in literal values are parsed once.
//!
//! When unsure, the answer is always the conservative one: not read-only.
//!
//! Known limits (the classifier sees text, not the catalog): volatile
//! functions hidden behind views, operators, casts, domain checks or
//! attribute notation (`t.f` for `f(t)`) are not seen; the text is lexed
//! with `standard_conforming_strings = on`, so a session that sets it is
//! pinned (see [`Classification::pin_reason`]).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pg_query::NodeEnum;
use pg_query::protobuf::{self, TransactionStmtKind, VariableSetKind, a_const};
use serde_json::Value;

use super::catalog::FunctionCatalog;
use super::normalize::{cache_key, trim_sql};

/// `DECLARE … WITH HOLD` (CURSOR_OPT_HOLD in parsenodes.h).
const CURSOR_OPT_HOLD: i32 = 0x0020;

/// Cache entries per generation; the cache holds at most two generations.
const CACHE_GENERATION: usize = 5_000;

/// Longer keys are not cached (bulk statements rarely repeat and would
/// make the cache's memory unbounded).
const MAX_CACHED_KEY: usize = 4096;

/// Session-level advisory locks, held until released or the session ends.
const SESSION_ADVISORY_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Volatile built-ins that change no data besides those whose value
/// differs between runs (`random()`, `gen_random_uuid()`…, the write
/// analysis's list): they read the transaction, the session's sequences or
/// the clock. A read calling any of them runs on the primary but needs no
/// replay. (A user function of the same name in another schema is not one
/// of them.)
const EFFECT_FREE_SERVER_READS: &[&str] = &[
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "currval",
    "lastval",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
];

fn effect_free_volatile(name: &str) -> bool {
    crate::replication::determinism::VOLATILE_FUNCTIONS.contains(&name)
        || EFFECT_FREE_SERVER_READS.contains(&name)
}

/// Settings that only last for the current transaction: never replayed.
const TRANSACTION_SETTINGS: &[&str] = &[
    "transaction_read_only",
    "transaction_isolation",
    "transaction_deferrable",
    "TRANSACTION",
    "TRANSACTION SNAPSHOT",
];

/// What a query string does, as far as routing cares.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// Every statement only reads and may run on a subscriber in autocommit:
    /// SELECT/VALUES/TABLE without locking clauses, INTO or data-modifying
    /// CTEs and calling only read-safe functions; SHOW; EXPLAIN without
    /// ANALYZE of such a query; `COPY … TO STDOUT` of a table or such a
    /// query. True for a string with no statement at all.
    pub read_only: bool,
    /// `Some(read_only)` when a statement is BEGIN or START TRANSACTION (the
    /// last one if several): `Some(true)` for `READ ONLY`.
    pub begin: Option<bool>,
    /// `Some(read_only)` when a statement sets the access mode of the
    /// transaction under way (the last one if several): `SET TRANSACTION
    /// READ ONLY | READ WRITE`, `SET [LOCAL] transaction_read_only = …`.
    /// (Session defaults are session settings.)
    pub tx_access: Option<bool>,
    /// `Some(snapshot)` when a statement sets the isolation level of the
    /// transaction under way (the last one if several): `Some(true)` for
    /// REPEATABLE READ and SERIALIZABLE (`SET TRANSACTION ISOLATION LEVEL
    /// …`, `SET [LOCAL] transaction_isolation = …`).
    pub tx_isolation: Option<bool>,
    /// Statements that set the transaction under way (`SET TRANSACTION …`,
    /// `SET [LOCAL] transaction_isolation | transaction_read_only |
    /// transaction_deferrable = …`): they take no snapshot.
    pub tx_settings: usize,
    /// Of those, `SET TRANSACTION` of modes only (isolation level, READ
    /// ONLY / WRITE, DEFERRABLE): right after a BEGIN, it cannot fail.
    pub tx_modes: usize,
    /// Statements that only change settings and no data: session settings
    /// (`session_settings`, `bound_settings`), local ones (`local_settings`,
    /// `bound_local_settings`), and those of the transaction under way
    /// (`SET TRANSACTION …`, `SET [LOCAL] transaction_isolation |
    /// transaction_read_only | transaction_deferrable = …`, not replayed: a
    /// copy's replay has its own transaction).
    pub setting_statements: usize,
    /// `SET LOCAL name …` of ordinary settings (not the role or session
    /// authorization), as source text: they change no data, and are
    /// replayed with the transaction's entry should it write.
    pub local_settings: Vec<String>,
    /// A statement ends a transaction block: COMMIT, END, ROLLBACK, ABORT,
    /// PREPARE TRANSACTION, COMMIT PREPARED, ROLLBACK PREPARED.
    pub ends_tx: bool,
    /// The transaction state the string leaves behind if it all succeeds,
    /// judged by its last transaction-control statement; `None` if it has
    /// none.
    pub tx_after: Option<TxAfter>,
    /// Session-level settings to replay on every backend the session uses,
    /// as their source text without surrounding comments or `;` (so they
    /// can be joined with `;`): SET, RESET, RESET ALL, SET ROLE, SET SESSION
    /// AUTHORIZATION, SET SESSION CHARACTERISTICS, DISCARD ALL. Not SET
    /// LOCAL nor transaction-scoped settings.
    pub session_settings: Vec<String>,
    /// Session-level `set_config` calls whose name or value is a Bind
    /// parameter: settings like `session_settings` once a Bind gives the
    /// values (see `set_config_sql`).
    pub bound_settings: Vec<[SettingArg; 2]>,
    /// `set_config(name, value, true)` calls like `bound_settings`: local
    /// settings (see `local_settings`) once a Bind gives the values.
    pub bound_local_settings: Vec<[SettingArg; 2]>,
    /// SAVEPOINT, RELEASE [SAVEPOINT] and ROLLBACK TO [SAVEPOINT]
    /// statements: part of a write transaction's entry, but they change no
    /// data themselves.
    pub savepoints: usize,
    /// Statements that only read, calling only read-safe functions (what
    /// `read_only` says of every statement).
    pub reads: usize,
    /// Why the session must be pinned to the primary from now on, if it
    /// must: "LISTEN", "temporary table", "temporary object", "advisory
    /// lock", "cursor WITH HOLD", "PREPARE", "set_config",
    /// "standard_conforming_strings".
    pub pin_reason: Option<&'static str>,
    /// The text did not parse: route it to the primary, which reports the
    /// real error. Also set for valid statements too deeply nested for
    /// pg_query to hand back (about 50 chained binary operators): nothing
    /// else in the classification is known then.
    pub parse_error: bool,
    /// Number of statements in the string (0 when it did not parse).
    pub statements: usize,
    /// What the string does to SQL-level prepared statements (PREPARE,
    /// EXECUTE, DEALLOCATE, DISCARD ALL), in order.
    pub prepared: Vec<SqlPrepared>,
    /// A COPY reads a file or a program's output on the server: it would
    /// read each node's own.
    pub copy_from_server: bool,
    /// COPY statements that only read and write what they read to a file
    /// or a program on the server: they run on the primary alone and
    /// change no data.
    pub copy_to_server: usize,
    /// Statements that only read but call volatile built-ins that change
    /// no data (`random()`, `gen_random_uuid()`, `clock_timestamp()`,
    /// `txid_current()`, `currval()`, `pg_sleep()`…): they run on the
    /// primary, as every volatile call does, and are not logged (nothing
    /// to replay).
    pub primary_reads: usize,
    /// Cursors the string declares, each with whether its query may write
    /// (its FETCHes then run those writes).
    pub cursors_declared: Vec<(String, bool)>,
    /// Cursors that FETCH, MOVE or CLOSE use (None: CLOSE ALL).
    pub cursors_used: Vec<Option<String>>,
    /// Cursors that an UPDATE or DELETE … WHERE CURRENT OF names.
    pub current_of: Vec<String>,
    /// A statement calls `pg_export_snapshot()`: the snapshot it names
    /// exists on the node that ran it.
    pub exports_snapshot: bool,
    /// `SET TRANSACTION SNAPSHOT 'id'`: the snapshot a transaction takes
    /// from another, which exists only on the node that exported it.
    pub imports_snapshot: Option<String>,
}

/// A statement about an SQL-level prepared statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlPrepared {
    /// `PREPARE name … AS …`, with its source text.
    Prepare { name: String, text: String },
    /// `EXECUTE name …`.
    Execute(String),
    /// `DEALLOCATE name`; `None`: `DEALLOCATE ALL`.
    Deallocate(Option<String>),
    /// `DISCARD ALL` (also counted among the session settings).
    DiscardAll,
}

impl SqlPrepared {
    /// A statement that only defines or drops a prepared statement: it
    /// changes no data, like a session setting.
    pub fn is_definition(&self) -> bool {
        matches!(
            self,
            SqlPrepared::Prepare { .. } | SqlPrepared::Deallocate(_)
        )
    }

    /// Whether a CommandComplete with this tag (its body: the tag and a
    /// NUL) is the node completing this statement. An EXECUTE completes
    /// with the tag of the statement it runs: never this one.
    pub fn completed_by(&self, tag: &[u8]) -> bool {
        let tag = tag.strip_suffix(b"\0").unwrap_or(tag);
        match self {
            SqlPrepared::Prepare { .. } => tag == b"PREPARE",
            SqlPrepared::Deallocate(Some(_)) => tag == b"DEALLOCATE",
            SqlPrepared::Deallocate(None) => tag == b"DEALLOCATE ALL",
            SqlPrepared::DiscardAll => tag == b"DISCARD ALL",
            SqlPrepared::Execute(_) => false,
        }
    }
}

/// The transaction state a query string leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxAfter {
    /// A transaction block is open (BEGIN, START TRANSACTION).
    Open {
        /// It was declared `READ ONLY`.
        read_only: bool,
    },
    /// `COMMIT AND CHAIN` / `ROLLBACK AND CHAIN`: a new block is open with
    /// the characteristics of the one that ended.
    Chained,
    /// No transaction block is open.
    Closed,
}

impl Classification {
    /// The classification of a string with no statements.
    fn empty() -> Classification {
        Classification {
            read_only: true,
            begin: None,
            tx_access: None,
            tx_isolation: None,
            tx_settings: 0,
            tx_modes: 0,
            setting_statements: 0,
            local_settings: Vec::new(),
            ends_tx: false,
            tx_after: None,
            session_settings: Vec::new(),
            bound_settings: Vec::new(),
            bound_local_settings: Vec::new(),
            savepoints: 0,
            reads: 0,
            pin_reason: None,
            parse_error: false,
            statements: 0,
            prepared: Vec::new(),
            copy_from_server: false,
            copy_to_server: 0,
            primary_reads: 0,
            cursors_declared: Vec::new(),
            cursors_used: Vec::new(),
            current_of: Vec::new(),
            exports_snapshot: false,
            imports_snapshot: None,
        }
    }

    /// The classification of a string that did not parse.
    fn parse_error() -> Classification {
        Classification {
            read_only: false,
            parse_error: true,
            ..Classification::empty()
        }
    }

    fn pin(&mut self, reason: &'static str) {
        self.pin_reason.get_or_insert(reason);
    }
}

/// Classify one query string (which may hold several statements) against
/// `catalog`. Never panics, whatever the input.
pub fn classify(sql: &str, catalog: &FunctionCatalog) -> Classification {
    analyze(sql, catalog).0
}

/// The classification, and whether it may be cached under the text's
/// [`cache_key`] (it may not when it depends on literal values or keeps
/// source text: SET and friends).
fn analyze(sql: &str, catalog: &FunctionCatalog) -> (Classification, bool) {
    // No tree (valid SQL nested too deeply to walk included): "unsure",
    // so the primary.
    let Some(tree) = super::parsed::tree(sql) else {
        return (Classification::parse_error(), true);
    };
    let mut out = Classification::empty();
    let mut cacheable = true;
    out.statements = tree.stmts.len();
    // Whether the statements so far end with a BEGIN and the settings of
    // its block (`SET TRANSACTION …`): one that makes the block READ ONLY
    // or READ WRITE says what the block is, as if the BEGIN had said it.
    let mut opening_block = false;
    for (at, raw) in tree.stmts.iter().enumerate() {
        let Some(stmt) = raw.stmt.as_deref() else {
            out.read_only = false;
            opening_block = false;
            continue;
        };
        let Some(node) = stmt.node.as_ref() else {
            out.read_only = false;
            opening_block = false;
            continue;
        };
        opening_block = match node {
            NodeEnum::TransactionStmt(t) => matches!(
                TransactionStmtKind::try_from(t.kind),
                Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart)
            ),
            _ => opening_block && sets_block(Some(node)),
        };
        let scan = Scan::of(tree.json().map(|j| &j["stmts"][at]["stmt"]), catalog);
        // A session setting made with set_config calls of literals or Bind
        // parameters is replayed like SET: no need to keep the session on
        // the primary for it.
        let set_configs = match node {
            NodeEnum::SelectStmt(select)
                if scan.pin == Some("set_config") || (scan.pin.is_none() && scan.unsafe_call) =>
            {
                set_config_calls(select)
            }
            _ => None,
        };
        if let Some(reason) = scan.pin.filter(|_| set_configs.is_none()) {
            out.pin(reason);
        }
        let read = reads_only(node) && scan.read_safe();
        out.read_only &= read;
        out.reads += usize::from(read);
        if reads_only(node) && scan.reads_on_the_primary() {
            out.primary_reads += 1;
        }
        out.current_of.extend(scan.current_of.iter().cloned());
        out.exports_snapshot |= scan.exports_snapshot;
        match node {
            NodeEnum::TransactionStmt(t) => transaction(&mut out, t),
            NodeEnum::SelectStmt(_) if set_configs.is_some() => {
                cacheable = false;
                let calls = set_configs.unwrap_or_default();
                let (calls, local) = calls;
                out.setting_statements += 1;
                // In order: all kept as text, or all bound.
                let texts: Option<Vec<String>> = calls
                    .iter()
                    .map(|[n, v]| {
                        Some(set_config_sql(
                            &n.literal()??,
                            v.literal()?.as_deref(),
                            local,
                        ))
                    })
                    .collect();
                match (texts, local) {
                    (Some(t), false) => out.session_settings.extend(t),
                    (Some(t), true) => out.local_settings.extend(t),
                    (None, false) => out.bound_settings.extend(calls),
                    (None, true) => out.bound_local_settings.extend(calls),
                }
            }
            NodeEnum::VariableSetStmt(v) => {
                cacheable = false;
                let access = out.tx_access.take();
                variable_set(&mut out, v, || statement_text(sql, raw));
                match out.tx_access {
                    Some(read_only) if opening_block => out.begin = Some(read_only),
                    Some(_) => {}
                    None => out.tx_access = access,
                }
            }
            NodeEnum::DiscardStmt(d) if d.target == protobuf::DiscardMode::DiscardAll as i32 => {
                cacheable = false;
                out.setting_statements += 1;
                out.session_settings.push(statement_text(sql, raw));
                out.prepared.push(SqlPrepared::DiscardAll);
            }
            NodeEnum::ListenStmt(_) => out.pin("LISTEN"),
            NodeEnum::CopyStmt(c) if c.is_program || !c.filename.is_empty() => {
                if c.is_from {
                    out.copy_from_server = true;
                } else if inner(&c.query).is_none_or(reads_only) {
                    out.copy_to_server += 1;
                }
            }
            NodeEnum::PrepareStmt(p) => {
                // Keeps source text.
                cacheable = false;
                out.pin("PREPARE");
                out.prepared.push(SqlPrepared::Prepare {
                    name: p.name.clone(),
                    text: statement_text(sql, raw),
                });
            }
            NodeEnum::ExecuteStmt(e) => out.prepared.push(SqlPrepared::Execute(e.name.clone())),
            NodeEnum::DeallocateStmt(d) => out.prepared.push(SqlPrepared::Deallocate(
                (!d.isall && !d.name.is_empty()).then(|| d.name.clone()),
            )),
            NodeEnum::DeclareCursorStmt(d) => {
                if d.options & CURSOR_OPT_HOLD != 0 {
                    out.pin("cursor WITH HOLD");
                }
                let writes =
                    !(reads_only(node) && (scan.read_safe() || scan.reads_on_the_primary()));
                out.cursors_declared.push((d.portalname.clone(), writes));
            }
            NodeEnum::FetchStmt(f) => out.cursors_used.push(Some(f.portalname.clone())),
            NodeEnum::ClosePortalStmt(c) => out
                .cursors_used
                .push((!c.portalname.is_empty()).then(|| c.portalname.clone())),
            _ => {}
        }
    }
    (out, cacheable)
}

/// The source text of one statement: `stmt_len` 0 means "to the end".
fn statement_text(sql: &str, raw: &protobuf::RawStmt) -> String {
    let start = usize::try_from(raw.stmt_location).unwrap_or(0);
    let end = match usize::try_from(raw.stmt_len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(len) => start.saturating_add(len).min(sql.len()),
    };
    if let Some(text) = sql.get(start..end) {
        return trim_sql(text).to_owned();
    }
    // Offsets not on a character boundary: rebuild the statement instead.
    let single = protobuf::ParseResult {
        version: 0,
        stmts: vec![raw.clone()],
    };
    single.deparse(Default::default()).unwrap_or_default()
}

/// Splits a query string into the parts the write path runs one by one:
/// every statement that ends a transaction block (COMMIT, ROLLBACK, …)
/// is a part of its own, and so is a BEGIN or START TRANSACTION that
/// opens one (one that follows other statements of an implicit block
/// stays with them, which it turns into its block). The `SET TRANSACTION`
/// statements right after an opening BEGIN stay in its part: they must
/// run before the block's first query, and the write path may add one of
/// its own before the part that follows. The other statements stay
/// together, in order. Each part is the original text, its `;` included.
/// `None` when the string does not parse or is one part.
pub fn split_transaction_control(sql: &str) -> Option<Vec<String>> {
    let tree = super::parsed::tree(sql)?;
    // Where each part starts; a part runs to the start of the next.
    let mut starts: Vec<usize> = Vec::new();
    // Whether the last part may take more statements.
    let mut open = false;
    // Whether the last part opens a block and holds nothing else but the
    // block's settings.
    let mut opening = false;
    for raw in &tree.stmts {
        let start = usize::try_from(raw.stmt_location).ok()?;
        // What the statement does to the block, as `classify` judges it.
        let mut c = Classification::empty();
        let node = raw.stmt.as_deref().and_then(|s| s.node.as_ref());
        if let Some(NodeEnum::TransactionStmt(t)) = node {
            transaction(&mut c, t);
        }
        if opening && sets_block(node) {
            continue;
        }
        let control = c.ends_tx || (c.begin.is_some() && !open);
        if control || !open {
            starts.push(if starts.is_empty() { 0 } else { start });
        }
        open = !control;
        opening = control && c.begin.is_some();
    }
    if starts.len() < 2 {
        return None;
    }
    // Text between statements (a comment, a stray `;`) stays with the part
    // before it, so the parts together are the whole string.
    let mut out = Vec::with_capacity(starts.len());
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(sql.len());
        out.push(sql.get(start..end)?.to_string());
    }
    Some(out)
}

/// Whether a statement sets the transaction under way (`SET TRANSACTION
/// …`, `SET [LOCAL] transaction_isolation | transaction_read_only |
/// transaction_deferrable = …`): right after a BEGIN, part of its block's
/// opening.
fn sets_block(node: Option<&NodeEnum>) -> bool {
    matches!(node, Some(NodeEnum::VariableSetStmt(v))
        if TRANSACTION_SETTINGS.contains(&v.name.as_str()))
}

/// Splits a query string that starts with `SET TRANSACTION …` statements
/// (of modes: isolation level, READ ONLY / WRITE, DEFERRABLE) followed by
/// others into those settings and the rest: right after a BEGIN, the
/// write path may have to run a query of its own between them (the
/// settings must come before the block's first query). `None` when the
/// string does not start so, or holds nothing else.
pub fn split_block_settings(sql: &str) -> Option<[String; 2]> {
    let tree = super::parsed::tree(sql)?;
    let settings = tree
        .stmts
        .iter()
        .take_while(|raw| {
            matches!(raw.stmt.as_deref().and_then(|s| s.node.as_ref()),
                Some(NodeEnum::VariableSetStmt(v)) if v.name == "TRANSACTION")
        })
        .count();
    let rest = tree.stmts.get(settings).filter(|_| settings > 0)?;
    let at = usize::try_from(rest.stmt_location).ok()?;
    Some([sql.get(..at)?.to_string(), sql.get(at..)?.to_string()])
}

/// Whether a statement's kind only reads, before looking inside it.
fn reads_only(node: &NodeEnum) -> bool {
    match node {
        NodeEnum::SelectStmt(s) => s.into_clause.is_none(),
        NodeEnum::VariableShowStmt(_) => true,
        // A cursor's statements read, if its query does (a cursor whose
        // query writes runs the writes as it is fetched: the session logs
        // those FETCHes, see `Classification::cursors_declared`).
        NodeEnum::DeclareCursorStmt(d) => inner(&d.query).is_some_and(reads_only),
        NodeEnum::FetchStmt(_) | NodeEnum::ClosePortalStmt(_) => true,
        // Change no data (LISTEN keeps the session on the primary).
        NodeEnum::ListenStmt(_) | NodeEnum::UnlistenStmt(_) => true,
        NodeEnum::ExplainStmt(e) => {
            // Any ANALYZE option, even `ANALYZE false`, counts: literal
            // values are not part of the cache key.
            let analyze = e.options.iter().any(|o| match &o.node {
                Some(NodeEnum::DefElem(d)) => d.defname.eq_ignore_ascii_case("analyze"),
                _ => true,
            });
            !analyze && inner(&e.query).is_some_and(reads_only)
        }
        NodeEnum::CopyStmt(c) => {
            !c.is_from
                && !c.is_program
                && c.filename.is_empty()
                && match inner(&c.query) {
                    Some(q) => reads_only(q),
                    None => c.relation.is_some(),
                }
        }
        _ => false,
    }
}

/// The statement inside EXPLAIN, COPY (…) or DECLARE.
fn inner(query: &Option<Box<protobuf::Node>>) -> Option<&NodeEnum> {
    query.as_deref().and_then(|n| n.node.as_ref())
}

/// BEGIN, COMMIT and friends.
fn transaction(out: &mut Classification, t: &protobuf::TransactionStmt) {
    match TransactionStmtKind::try_from(t.kind) {
        Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => {
            let read_only = tx_read_only(&t.options).unwrap_or(false);
            out.begin = Some(read_only);
            out.tx_after = Some(TxAfter::Open { read_only });
        }
        Ok(TransactionStmtKind::TransStmtCommit | TransactionStmtKind::TransStmtRollback) => {
            out.ends_tx = true;
            out.tx_after = Some(if t.chain {
                TxAfter::Chained
            } else {
                TxAfter::Closed
            });
        }
        Ok(
            TransactionStmtKind::TransStmtPrepare
            | TransactionStmtKind::TransStmtCommitPrepared
            | TransactionStmtKind::TransStmtRollbackPrepared,
        ) => {
            out.ends_tx = true;
            out.tx_after = Some(TxAfter::Closed);
        }
        Ok(
            TransactionStmtKind::TransStmtSavepoint
            | TransactionStmtKind::TransStmtRelease
            | TransactionStmtKind::TransStmtRollbackTo,
        ) => out.savepoints += 1,
        _ => {}
    }
}

/// `Some(read_only)` if transaction options (`DefElem`s as the grammar
/// builds them for READ ONLY / READ WRITE) set the access mode.
fn tx_read_only(options: &[protobuf::Node]) -> Option<bool> {
    options.iter().rev().find_map(|o| match &o.node {
        Some(NodeEnum::DefElem(d)) if d.defname == "transaction_read_only" => {
            Some(d.arg.as_deref().is_some_and(is_on))
        }
        _ => None,
    })
}

/// `Some(snapshot)` if transaction options set the isolation level:
/// `Some(true)` for REPEATABLE READ or SERIALIZABLE.
fn tx_isolation(options: &[protobuf::Node]) -> Option<bool> {
    options.iter().rev().find_map(|o| match &o.node {
        Some(NodeEnum::DefElem(d)) if d.defname == "transaction_isolation" => {
            d.arg.as_deref().and_then(snapshot_level)
        }
        _ => None,
    })
}

/// `Some(snapshot)` for an isolation level's name: `Some(true)` for the
/// levels that keep one snapshot for the whole transaction.
fn snapshot_level(node: &protobuf::Node) -> Option<bool> {
    let Some(NodeEnum::AConst(protobuf::AConst {
        val: Some(a_const::Val::Sval(s)),
        ..
    })) = &node.node
    else {
        return None;
    };
    let level = s.sval.to_ascii_lowercase();
    match level.trim() {
        "repeatable read" | "serializable" => Some(true),
        "read committed" | "read uncommitted" => Some(false),
        _ => None,
    }
}

/// Whether a setting's value means "on": 1, true, on, yes (only exact
/// spellings: a missed "on" just routes to the primary).
fn is_on(node: &protobuf::Node) -> bool {
    let Some(NodeEnum::AConst(c)) = &node.node else {
        return false;
    };
    match &c.val {
        Some(a_const::Val::Ival(i)) => i.ival != 0,
        Some(a_const::Val::Boolval(b)) => b.boolval,
        Some(a_const::Val::Sval(s)) => ["on", "true", "yes", "1", "t", "y"]
            .iter()
            .any(|v| s.sval.eq_ignore_ascii_case(v)),
        _ => false,
    }
}

/// An argument of a session-level `set_config`: its text, NULL (as a
/// value: the setting's default, as RESET), or the Bind parameter that
/// gives it (`$n`, from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingArg {
    Text(String),
    Null,
    Param(usize),
}

impl SettingArg {
    /// The value written in the statement (`Some(None)`: NULL); None for
    /// a parameter.
    pub fn literal(&self) -> Option<Option<String>> {
        match self {
            SettingArg::Text(t) => Some(Some(t.clone())),
            SettingArg::Null => Some(None),
            SettingArg::Param(_) => None,
        }
    }
}

/// The statement a session setting made with `set_config` is replayed as
/// (`value` None: NULL, the setting's default).
pub fn set_config_sql(name: &str, value: Option<&str>, local: bool) -> String {
    let quote = crate::replication::dollar_quoted;
    format!(
        "SELECT pg_catalog.set_config({}, {}, {local})",
        quote(name),
        value.map_or_else(|| "NULL".to_string(), quote)
    )
}

/// `SELECT set_config('name', 'value', false)` — one call or several, and
/// nothing else (pg_dump starts its output so; drivers that cannot bind
/// SET's value send `set_config('search_path', $1, false)`): a session
/// setting as SET makes one, kept to be replayed as SET is (on the
/// session's other connections, and with its entries). Name and value are
/// string literals or parameters (`$1`, `$1::text`). With `true` for
/// `is_local` in every call instead (as PostgREST sets its request's
/// settings), local settings like `SET LOCAL`'s: the bool says which.
/// None for any other SELECT.
fn set_config_calls(select: &protobuf::SelectStmt) -> Option<(Vec<[SettingArg; 2]>, bool)> {
    let plain = select.from_clause.is_empty()
        && select.where_clause.is_none()
        && select.group_clause.is_empty()
        && select.having_clause.is_none()
        && select.with_clause.is_none()
        && select.into_clause.is_none()
        && select.values_lists.is_empty()
        && select.limit_count.is_none()
        && select.limit_offset.is_none()
        && select.op == protobuf::SetOperation::SetopNone as i32
        && !select.target_list.is_empty();
    if !plain {
        return None;
    }
    fn arg(node: &protobuf::Node) -> Option<SettingArg> {
        match &node.node {
            Some(NodeEnum::AConst(protobuf::AConst {
                val: Some(a_const::Val::Sval(s)),
                ..
            })) => Some(SettingArg::Text(s.sval.clone())),
            Some(NodeEnum::AConst(protobuf::AConst { isnull: true, .. })) => Some(SettingArg::Null),
            Some(NodeEnum::ParamRef(p)) if p.number > 0 => {
                Some(SettingArg::Param(p.number as usize))
            }
            // `$1::text`: the text the parameter gives.
            Some(NodeEnum::TypeCast(c)) => {
                let to_text = c.type_name.as_ref().is_some_and(|t| {
                    t.array_bounds.is_empty()
                        && matches!(
                            t.names.last().and_then(|n| n.node.as_ref()),
                            Some(NodeEnum::String(s)) if s.sval == "text"
                        )
                });
                match c.arg.as_deref().map(arg) {
                    Some(Some(SettingArg::Param(n))) if to_text => Some(SettingArg::Param(n)),
                    _ => None,
                }
            }
            _ => None,
        }
    }
    let mut settings = Vec::new();
    let mut locality = None;
    for target in &select.target_list {
        let Some(NodeEnum::ResTarget(t)) = &target.node else {
            return None;
        };
        let Some(NodeEnum::FuncCall(call)) = t.val.as_ref().and_then(|v| v.node.as_ref()) else {
            return None;
        };
        let names: Vec<&str> = call
            .funcname
            .iter()
            .filter_map(|n| match &n.node {
                Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        if !matches!(
            names.as_slice(),
            ["set_config"] | ["pg_catalog", "set_config"]
        ) {
            return None;
        }
        let [name, value, local] = call.args.as_slice() else {
            return None;
        };
        let Some(NodeEnum::AConst(protobuf::AConst {
            val: Some(a_const::Val::Boolval(b)),
            ..
        })) = &local.node
        else {
            return None;
        };
        if *locality.get_or_insert(b.boolval) != b.boolval {
            return None;
        }
        // A NULL name is an error the primary reports.
        let name = arg(name).filter(|a| *a != SettingArg::Null)?;
        settings.push([name, arg(value)?]);
    }
    Some((settings, locality?))
}

/// SET, RESET and SET TRANSACTION.
fn variable_set(
    out: &mut Classification,
    v: &protobuf::VariableSetStmt,
    text: impl FnOnce() -> String,
) {
    let kind = VariableSetKind::try_from(v.kind).unwrap_or(VariableSetKind::Undefined);
    let is_set = matches!(
        kind,
        VariableSetKind::VarSetValue | VariableSetKind::VarSetMulti
    );
    let access = match v.name.as_str() {
        "TRANSACTION" if is_set => tx_read_only(&v.args),
        "transaction_read_only" if is_set => v.args.first().map(is_on),
        // To the default, which may be READ WRITE.
        "transaction_read_only" => Some(false),
        _ => None,
    };
    if access.is_some() {
        out.tx_access = access;
    }
    let isolation = match v.name.as_str() {
        "TRANSACTION" => tx_isolation(&v.args),
        "transaction_isolation" => v.args.first().and_then(snapshot_level),
        _ => None,
    };
    if is_set && isolation.is_some() {
        out.tx_isolation = isolation;
    }
    if v.name == "TRANSACTION SNAPSHOT"
        && let Some(NodeEnum::AConst(protobuf::AConst {
            val: Some(a_const::Val::Sval(id)),
            ..
        })) = v.args.first().and_then(|a| a.node.as_ref())
    {
        out.imports_snapshot = Some(id.sval.clone());
    }
    if v.name == "standard_conforming_strings" {
        out.pin("standard_conforming_strings");
    }
    if TRANSACTION_SETTINGS.contains(&v.name.as_str()) {
        out.setting_statements += 1;
        out.tx_settings += 1;
        out.tx_modes += usize::from(v.name == "TRANSACTION");
    } else if v.is_local && is_set && !matches!(v.name.as_str(), "role" | "session_authorization") {
        out.setting_statements += 1;
        out.local_settings.push(text());
    } else if !v.is_local {
        out.setting_statements += 1;
        out.session_settings.push(text());
    }
}

/// What a walk over a whole statement tree found.
#[derive(Debug, Default)]
struct Scan {
    /// A function call that is not known to be read-safe.
    unsafe_call: bool,
    /// A call of a volatile built-in that changes no data
    /// (`effect_free_volatile`): the statement runs on the primary.
    primary_call: bool,
    /// FOR UPDATE / SHARE / NO KEY UPDATE / KEY SHARE somewhere.
    locking: bool,
    /// INSERT, UPDATE, DELETE or MERGE somewhere (e.g. in a CTE).
    modifies: bool,
    /// SELECT … INTO somewhere.
    into: bool,
    /// The first reason found to pin the session.
    pin: Option<&'static str>,
    /// Cursors named by WHERE CURRENT OF.
    current_of: Vec<String>,
    /// `pg_export_snapshot()` is called.
    exports_snapshot: bool,
}

impl Scan {
    /// Walk every node of `stmt` (its JSON form, None when it has none).
    /// pg_query's own `nodes()` visits only the
    /// node types it needs for table lists (not LIMIT, VALUES, function
    /// arguments…), so the tree is walked through its serde form instead:
    /// complete by construction, whatever node types hold the call.
    fn of(stmt: Option<&Value>, catalog: &FunctionCatalog) -> Scan {
        let mut scan = Scan::default();
        match stmt {
            Some(tree) => scan.walk(tree, catalog),
            None => scan.unsafe_call = true,
        }
        scan
    }

    /// Nothing found that writes, locks or calls something volatile.
    fn read_safe(&self) -> bool {
        !(self.unsafe_call || self.primary_call || self.locking || self.modifies || self.into)
    }

    /// Nothing that writes or locks, and volatile calls only of built-ins
    /// that change no data, at least one.
    fn reads_on_the_primary(&self) -> bool {
        self.primary_call && !(self.unsafe_call || self.locking || self.modifies || self.into)
    }

    fn pin(&mut self, reason: &'static str) {
        self.pin.get_or_insert(reason);
    }

    fn walk(&mut self, value: &Value, catalog: &FunctionCatalog) {
        match value {
            Value::Array(items) => items.iter().for_each(|item| self.walk(item, catalog)),
            Value::Object(fields) => {
                for (key, value) in fields {
                    match key.as_str() {
                        "FuncCall" => self.call(value, catalog),
                        "LockingClause" => self.locking = true,
                        "CurrentOfExpr" => {
                            if let Some(name) = value["cursor_name"].as_str() {
                                self.current_of.push(name.to_string());
                            }
                        }
                        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                            self.modifies = true
                        }
                        "into_clause" if !value.is_null() => self.into = true,
                        "relpersistence" if value == "t" => self.pin("temporary table"),
                        "schemaname" if value.as_str().is_some_and(is_temp_schema) => {
                            self.pin("temporary table")
                        }
                        "String" if value["sval"].as_str().is_some_and(is_temp_schema) => {
                            self.pin("temporary object")
                        }
                        _ => {}
                    }
                    self.walk(value, catalog);
                }
            }
            _ => {}
        }
    }

    /// A `FuncCall` node: `funcname` is a list of String nodes, optionally
    /// qualified (`schema.name` or `catalog.schema.name`).
    fn call(&mut self, call: &Value, catalog: &FunctionCatalog) {
        let names = crate::replication::function_names(call);
        let (schema, name) = match names.as_slice() {
            [.., schema, name] => (Some(*schema), *name),
            [name] => (None, *name),
            [] => {
                self.unsafe_call = true;
                return;
            }
        };
        if !catalog.is_read_safe(schema, name) {
            let builtin = schema.is_none_or(|s| s == "pg_catalog" || s == "public");
            if builtin && effect_free_volatile(name) {
                self.primary_call = true;
            } else {
                self.unsafe_call = true;
            }
        }
        if SESSION_ADVISORY_LOCKS.contains(&name) {
            self.pin("advisory lock");
        }
        self.exports_snapshot |= name == "pg_export_snapshot";
        // set_config(name, value, is_local): only a literal TRUE keeps the
        // setting inside the transaction (literals other than the keyword
        // are not part of the cache key).
        if name == "set_config" {
            let local = &call["args"][2]["node"]["AConst"]["val"]["Boolval"]["boolval"];
            if local != true {
                self.pin("set_config");
            }
        }
    }
}

/// `pg_temp` or a backend's `pg_temp_N`.
fn is_temp_schema(name: &str) -> bool {
    name == "pg_temp"
        || name
            .strip_prefix("pg_temp_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Thread-safe [`classify`] with a bounded cache keyed by [`cache_key`], so
/// statements that differ only in literal values are parsed once. A hit
/// costs one lexer pass and one hash lookup under a read lock.
///
/// Classifications that carry source text or depend on literal values
/// (SET, RESET, DISCARD ALL) are never cached, nor are keys longer than
/// 4 KiB. The cache keeps two generations of 5 000 entries: when the newer
/// one fills up, the older one is dropped; a hit in the older one copies the
/// entry forward, so entries in use survive.
pub struct Classifier {
    state: RwLock<State>,
}

struct State {
    catalog: Arc<FunctionCatalog>,
    recent: HashMap<String, Arc<Classification>>,
    older: HashMap<String, Arc<Classification>>,
}

impl Classifier {
    /// A classifier judging function calls by `catalog`.
    pub fn new(catalog: FunctionCatalog) -> Classifier {
        Classifier {
            state: RwLock::new(State {
                catalog: Arc::new(catalog),
                recent: HashMap::new(),
                older: HashMap::new(),
            }),
        }
    }

    /// Replace the catalog (e.g. once loaded from a node) and clear the cache.
    pub fn set_catalog(&self, catalog: FunctionCatalog) {
        let mut state = self.write();
        state.catalog = Arc::new(catalog);
        state.recent.clear();
        state.older.clear();
    }

    /// Classify `sql`, from the cache when a statement of the same shape was
    /// seen before.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        let key = cache_key(sql).filter(|k| k.len() <= MAX_CACHED_KEY);
        let catalog = {
            let state = self.read();
            if let Some(key) = &key {
                if let Some(hit) = state.recent.get(key) {
                    return Arc::clone(hit);
                }
                if let Some(hit) = state.older.get(key) {
                    let hit = Arc::clone(hit);
                    let catalog = Arc::clone(&state.catalog);
                    drop(state);
                    self.insert(key.clone(), &catalog, Arc::clone(&hit));
                    return hit;
                }
            }
            Arc::clone(&state.catalog)
        };
        let (classification, cacheable) = analyze(sql, &catalog);
        let classification = Arc::new(classification);
        if let (Some(key), true) = (key, cacheable) {
            self.insert(key, &catalog, Arc::clone(&classification));
        }
        classification
    }

    /// Number of cached classifications.
    pub fn cached(&self) -> usize {
        let state = self.read();
        state.recent.len() + state.older.len()
    }

    /// Cache `classification`, unless the catalog it was made with has been
    /// replaced meanwhile.
    fn insert(
        &self,
        key: String,
        catalog: &Arc<FunctionCatalog>,
        classification: Arc<Classification>,
    ) {
        let mut state = self.write();
        if !Arc::ptr_eq(&state.catalog, catalog) {
            return;
        }
        if state.recent.len() >= CACHE_GENERATION {
            state.older = std::mem::take(&mut state.recent);
        }
        state.recent.insert(key, classification);
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.read();
        f.debug_struct("Classifier")
            .field("functions", &state.catalog.len())
            .field("cached", &(state.recent.len() + state.older.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(sql: &str) -> Classification {
        classify(sql, &FunctionCatalog::builtin())
    }

    #[test]
    fn reads_calling_effect_free_volatile_builtins_run_on_the_primary_unlogged() {
        let catalog = FunctionCatalog::builtin();
        for (sql, primary_reads) in [
            ("select random()", 1),
            ("select gen_random_uuid(), lower('A')", 1),
            (
                "SELECT pg_catalog.clock_timestamp(); select txid_current()",
                2,
            ),
            ("select currval('s')", 1),
            ("select * from t order by random() limit 1", 1),
            ("select nextval('s')", 0),
            ("select random(), my_volatile_func()", 0),
            ("select other.random()", 0),
            ("select random() from t for update", 0),
            ("insert into t values (random())", 0),
            ("select lower('A')", 0),
        ] {
            let c = classify(sql, &catalog);
            assert_eq!(c.primary_reads, primary_reads, "{sql}");
            assert!(!c.read_only || primary_reads == 0, "{sql}");
        }
    }

    #[test]
    fn transaction_control_is_split_off() {
        let split = |sql: &str| split_transaction_control(sql);
        assert_eq!(
            split("BEGIN; INSERT INTO t VALUES (1); COMMIT;").unwrap(),
            ["BEGIN; ", "INSERT INTO t VALUES (1); ", "COMMIT;"]
        );
        assert_eq!(
            split("insert into t values (1); insert into t values (2); commit; select 1").unwrap(),
            [
                "insert into t values (1); insert into t values (2); ",
                "commit; ",
                "select 1"
            ]
        );
        // A BEGIN after statements of an implicit block makes it its
        // block: they stay together.
        assert_eq!(
            split("insert into t values (1); begin; update t set v = 2; commit").unwrap(),
            [
                "insert into t values (1); begin; update t set v = 2; ",
                "commit"
            ]
        );
        assert_eq!(
            split("-- a note\nSTART TRANSACTION ISOLATION LEVEL SERIALIZABLE;\nDELETE FROM t /* x */; ROLLBACK; ;").unwrap(),
            [
                "-- a note\nSTART TRANSACTION ISOLATION LEVEL SERIALIZABLE;\n",
                "DELETE FROM t /* x */; ",
                "ROLLBACK; ;"
            ]
        );
        // The block's settings stay with its BEGIN.
        assert_eq!(
            split("BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; set local transaction_read_only = off; UPDATE t SET v = 1; SET TRANSACTION READ ONLY; COMMIT").unwrap(),
            [
                "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; set local transaction_read_only = off; ",
                "UPDATE t SET v = 1; SET TRANSACTION READ ONLY; ",
                "COMMIT"
            ]
        );
        assert_eq!(
            split("BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '00000003-1'; SELECT 1; COMMIT; SET TRANSACTION READ ONLY").unwrap(),
            [
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '00000003-1'; ",
                "SELECT 1; ",
                "COMMIT; ",
                "SET TRANSACTION READ ONLY"
            ]
        );
        let settings = |sql: &str| split_block_settings(sql);
        assert_eq!(
            settings("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; set transaction read write;UPDATE t SET v = 1; COMMIT").unwrap(),
            [
                "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; set transaction read write;",
                "UPDATE t SET v = 1; COMMIT"
            ]
        );
        assert_eq!(
            settings("SET TRANSACTION READ ONLY; SET TRANSACTION DEFERRABLE"),
            None
        );
        assert_eq!(settings("SELECT 1; SET TRANSACTION READ ONLY"), None);
        assert_eq!(
            settings("SET LOCAL transaction_isolation = 'serializable'; SELECT 1"),
            None
        );
        // The parts together are the whole string.
        let sql = "BEGIN;UPDATE t SET s = 'é; COMMIT';COMMIT AND CHAIN;SELECT 1;END";
        let parts = split(sql).unwrap();
        assert_eq!(parts.concat(), sql);
        assert_eq!(parts.len(), 5);
        // Nothing to split, or nothing that parses.
        for sql in [
            "COMMIT",
            "insert into t values (1); insert into t values (2)",
            "BEGIN",
            "select 1; select 2",
            "BEGIN; COMMIT garbage",
        ] {
            assert_eq!(split(sql), None, "{sql}");
        }
    }

    #[test]
    fn reads() {
        for sql in [
            "",
            "-- nothing but a comment",
            "select 1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "select lower('A')",
            "select now()",
            "select count(*), max(a) from t group by b having sum(c) > 1",
            "select pg_catalog.lower(x) from t",
            "select * from t join u using (id) where t.x in (select y from v)",
            "select a from t union all select b from u",
            "values (1), (2)",
            "table t",
            "with x as (select 1) select * from x",
            "select * from generate_series(1, 10)",
            "select extract(epoch from now()), substring('abc' from 2), trim(' a ')",
            "select coalesce(a, 1), nullif(b, 2), greatest(1, 2), case when a then 1 end from t",
            "select current_date, current_user, localtimestamp",
            "select row_number() over (partition by a order by b) from t",
            "select string_agg(a, ',' order by a) filter (where a > 1) from t",
            "show search_path",
            "show all",
            "explain select 1",
            "explain (costs off, verbose) select * from t",
            "copy t to stdout",
            "copy (select * from t) to stdout with (format csv)",
            "select 1; select 2",
            "select $1::int + 1",
        ] {
            let got = c(sql);
            assert!(got.read_only, "{sql}: {got:?}");
            assert!(!got.parse_error, "{sql}");
            assert_eq!(got.pin_reason, None, "{sql}");
            assert!(got.session_settings.is_empty(), "{sql}");
        }
    }

    #[test]
    fn not_reads() {
        for sql in [
            "select nextval('s')",
            "select currval('s'), setval('s', 1)",
            "select * from t where id = nextval('s')",
            "select * from t limit (select nextval('s'))",
            "values (nextval('s'))",
            "select * from t for update",
            "select * from t for share",
            "select * from t for no key update",
            "select * from t for key share skip locked",
            "select * from (select * from t for update) x",
            "select * from t where a in (select b from u for share)",
            "with x as (delete from t returning *) select * from x",
            "with x as (insert into t values (1) returning *) select * from x",
            "with x as (update t set a = 1 returning *) select * from x",
            "select * into newt from t",
            "select my_volatile_func()",
            "select public.lower('A')",
            "select random()",
            "select * from t order by random()",
            "select count(*) filter (where random() > 0.5) from t",
            "select sum(a) over (order by nextval('s')) from t",
            "select lo_import('/etc/passwd')",
            "select pg_advisory_xact_lock(1)",
            "select txid_current()",
            "select pg_notify('c', 'x')",
            "insert into t values (1)",
            "update t set a = 1",
            "delete from t",
            "merge into t using u on t.id = u.id when matched then delete",
            "create table t (a int)",
            "drop table t",
            "truncate t",
            "call p()",
            "do $$ begin end $$",
            "lock table t",
            "vacuum t",
            "analyze t",
            "notify ch",
            "set search_path = a",
            "begin",
            "commit",
            "explain analyze delete from t",
            "explain analyze select 1",
            "explain (analyze false) select 1",
            "explain delete from t",
            "explain select nextval('s')",
            "copy t from stdin",
            "copy t to '/tmp/file'",
            "copy t to program 'cat'",
            "copy (delete from t returning *) to stdout",
            "copy (select nextval('s')) to stdout",
            "refresh materialized view m",
            "select 1; delete from t",
            "execute p(1)",
        ] {
            let got = c(sql);
            assert!(!got.read_only, "{sql}: {got:?}");
            assert!(!got.parse_error, "{sql}");
        }
    }

    #[test]
    fn parse_errors_go_to_the_primary() {
        for sql in ["selec 1", "select (", "select 'unterminated", "select 1\0"] {
            let got = c(sql);
            assert!(got.parse_error, "{sql}");
            assert!(!got.read_only, "{sql}");
            assert_eq!(got.statements, 0, "{sql}");
        }
        // Valid, but deeper than pg_query can hand back: unsure, so the primary.
        let chain: Vec<String> = (0..60).map(|i| format!("c{i}")).collect();
        assert!(c(&format!("select {}", chain.join(" || "))).parse_error);
        assert!(!c(&format!("select {}", chain[..20].join(" || "))).parse_error);
    }

    #[test]
    fn statement_counts() {
        assert_eq!(c("").statements, 0);
        assert_eq!(c("  ;  ").statements, 0);
        assert_eq!(c("select 1").statements, 1);
        assert_eq!(c("select 1; select 2;").statements, 2);
        assert!(c("select 1; select 2").read_only);
        assert!(c("").read_only);
    }

    #[test]
    fn transactions() {
        assert_eq!(c("BEGIN").begin, Some(false));
        assert_eq!(c("begin read only").begin, Some(true));
        assert_eq!(c("begin read write").begin, Some(false));
        assert_eq!(
            c("start transaction isolation level serializable, read only").begin,
            Some(true)
        );
        assert_eq!(
            c("start transaction read only deferrable").begin,
            Some(true)
        );
        assert_eq!(
            c("begin isolation level repeatable read").begin,
            Some(false)
        );
        assert_eq!(
            c("begin").tx_after,
            Some(TxAfter::Open { read_only: false })
        );
        assert_eq!(c("select 1").begin, None);
        assert_eq!(c("select 1").tx_after, None);
        for sql in [
            "commit",
            "end",
            "rollback",
            "abort",
            "prepare transaction 'x'",
            "commit prepared 'x'",
            "rollback prepared 'x'",
        ] {
            let got = c(sql);
            assert!(got.ends_tx, "{sql}");
            assert_eq!(got.tx_after, Some(TxAfter::Closed), "{sql}");
            assert_eq!(got.begin, None, "{sql}");
        }
        assert_eq!(c("commit and chain").tx_after, Some(TxAfter::Chained));
        for sql in ["savepoint a", "release a", "rollback to a"] {
            let got = c(sql);
            assert!(!got.ends_tx, "{sql}");
            assert_eq!(got.tx_after, None, "{sql}");
            assert_eq!(got.savepoints, 1, "{sql}");
        }
        assert_eq!(c("savepoint a; release savepoint a").savepoints, 2);
        let got = c("savepoint a; select 1; show x; select nextval('s'); release a");
        assert_eq!((got.savepoints, got.reads), (2, 2));
        assert_eq!(c("rollback").savepoints, 0);
        let got = c("begin; insert into t values (1); commit");
        assert_eq!(
            (got.begin, got.ends_tx, got.tx_after),
            (Some(false), true, Some(TxAfter::Closed))
        );
        assert!(!got.read_only);
        let got = c("commit; begin read only");
        assert_eq!(got.tx_after, Some(TxAfter::Open { read_only: true }));
    }

    #[test]
    fn transaction_read_only_settings() {
        // Settings right after a BEGIN say what its block is.
        for (sql, begin) in [
            (
                "begin; set transaction read only; select 1; commit",
                Some(true),
            ),
            (
                "start transaction isolation level serializable; set transaction isolation level repeatable read; set local transaction_read_only = on; select 1",
                Some(true),
            ),
            ("begin read only; set transaction read write", Some(false)),
            (
                "begin read only; set transaction isolation level serializable",
                Some(true),
            ),
            ("begin; select 1; set transaction read only", Some(false)),
            ("set transaction read only; begin", Some(false)),
            ("select 1; set transaction read only", None),
        ] {
            assert_eq!(c(sql).begin, begin, "{sql}");
        }
        for sql in [
            "set transaction read only",
            "set transaction isolation level serializable, read only",
            "set transaction_read_only = on",
            "set local transaction_read_only = 1",
        ] {
            assert_eq!(c(sql).tx_access, Some(true), "{sql}");
            assert_eq!(c(sql).setting_statements, 1, "{sql}");
        }
        for sql in [
            "set transaction read write",
            "set transaction_read_only = off",
            "reset transaction_read_only",
            "set local transaction_read_only to default",
        ] {
            assert_eq!(c(sql).tx_access, Some(false), "{sql}");
        }
        for sql in [
            "set transaction isolation level serializable",
            "set session characteristics as transaction read only",
            "set default_transaction_read_only to true",
            "begin read only",
            "select 1",
        ] {
            assert_eq!(c(sql).tx_access, None, "{sql}");
        }
        for (sql, snapshot) in [
            ("set transaction isolation level serializable", Some(true)),
            (
                "set transaction isolation level repeatable read, read only",
                Some(true),
            ),
            (
                "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
                Some(false),
            ),
            (
                "set local transaction_isolation = 'repeatable read'",
                Some(true),
            ),
            (
                "set transaction_isolation to 'read uncommitted'",
                Some(false),
            ),
            ("set transaction read only", None),
            ("set default_transaction_isolation = 'serializable'", None),
            (
                "set session characteristics as transaction isolation level serializable",
                None,
            ),
            ("begin isolation level serializable", None),
        ] {
            assert_eq!(c(sql).tx_isolation, snapshot, "{sql}");
        }
        assert_eq!(
            c("set transaction snapshot '00000003-0000001B-1'")
                .imports_snapshot
                .as_deref(),
            Some("00000003-0000001B-1")
        );
        assert!(c("select pg_catalog.pg_export_snapshot()").exports_snapshot);
        assert!(c("select 1, pg_export_snapshot() from t").exports_snapshot);
        assert!(!c("select pg_current_snapshot()").exports_snapshot);
        assert_eq!(c("set transaction read only").imports_snapshot, None);
        for (sql, n) in [
            ("set transaction isolation level serializable", 1),
            (
                "set transaction read only; set local transaction_deferrable = on",
                2,
            ),
            ("set transaction read only; select 1", 1),
            ("set local search_path = a", 0),
            ("set default_transaction_read_only = on", 0),
        ] {
            assert_eq!(c(sql).tx_settings, n, "{sql}");
        }
        for (sql, n) in [
            (
                "set transaction isolation level serializable, read only, deferrable",
                1,
            ),
            ("SET TRANSACTION READ WRITE", 1),
            ("set transaction snapshot '00000003-0000001B-1'", 0),
            ("set local transaction_isolation = 'serializable'", 0),
        ] {
            assert_eq!(c(sql).tx_modes, n, "{sql}");
        }
        assert_eq!(
            c("set transaction isolation level serializable").setting_statements,
            1
        );
        assert_eq!(
            c("set transaction snapshot '00000003-1'").setting_statements,
            1
        );
        assert_eq!(
            c("set session characteristics as transaction read only").setting_statements,
            1
        );
        assert_eq!(c("set local search_path = a").setting_statements, 1);
        assert_eq!(c("set local role bob").setting_statements, 0);
        // One statement, however many calls.
        let calls = c(
            "select set_config('a.b', 'x', true), set_config('a.c', $1, true); insert into t values (1)",
        );
        assert_eq!(calls.setting_statements, 1);
        assert_eq!(calls.local_settings.len(), 0);
        assert_eq!(calls.bound_local_settings.len(), 2);
        assert_eq!(calls.statements, 2);
        let calls = c("SELECT set_config('a.b', 'x', true), set_config('a.c', 'y', true)");
        assert_eq!(calls.local_settings.len(), 2);
        assert!(calls.pin_reason.is_none());
        // Mixed: neither.
        let mixed = c("SELECT set_config('a.b', 'x', true), set_config('a.c', 'y', false)");
        assert_eq!(mixed.setting_statements, 0);
        assert_eq!(mixed.pin_reason, Some("set_config"));
        assert_eq!(
            c("SET LOCAL statement_timeout = '5s'").local_settings,
            ["SET LOCAL statement_timeout = '5s'"]
        );
        for sql in [
            "set local role bob",
            "set statement_timeout = 1",
            "reset statement_timeout",
        ] {
            assert!(c(sql).local_settings.is_empty(), "{sql}");
        }
        // SET TRANSACTION is for this transaction only; the session default is replayed.
        assert!(c("set transaction read only").session_settings.is_empty());
        assert!(
            c("set transaction snapshot '00000003-1'")
                .session_settings
                .is_empty()
        );
        assert!(
            c("set transaction_isolation = 'serializable'")
                .session_settings
                .is_empty()
        );
        assert_eq!(
            c("set session characteristics as transaction read only").session_settings,
            ["set session characteristics as transaction read only"]
        );
    }

    #[test]
    fn session_settings_keep_their_source_text() {
        let got = c("set search_path = a; select 1");
        assert_eq!(got.session_settings, ["set search_path = a"]);
        assert!(!got.read_only);
        assert_eq!(got.statements, 2);
        assert!(c("set local x.y = 1").session_settings.is_empty());
        let cases: [(&str, &[&str]); 10] = [
            ("SET TIME ZONE 'UTC'", &["SET TIME ZONE 'UTC'"]),
            ("reset all", &["reset all"]),
            ("RESET search_path", &["RESET search_path"]),
            ("set role bob", &["set role bob"]),
            ("reset role", &["reset role"]),
            (
                "set session authorization bob",
                &["set session authorization bob"],
            ),
            ("DISCARD ALL", &["DISCARD ALL"]),
            ("discard plans", &[]),
            (
                "/* c */ set a.b = 'x -- y' -- trailing",
                &["set a.b = 'x -- y'"],
            ),
            (
                "set a.b = 1;\n  set a.c = 'é' ; select 1",
                &["set a.b = 1", "set a.c = 'é'"],
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(c(sql).session_settings, want, "{sql}");
        }
    }

    #[test]
    fn cursors_read_when_their_query_reads() {
        let got = c("declare r cursor for select id from t order by id");
        assert!(got.read_only);
        assert_eq!(got.cursors_declared, [("r".to_string(), false)]);
        for sql in [
            "declare w cursor for select f(id) from t",
            "declare u cursor for select id from t for update",
        ] {
            let got = c(sql);
            assert!(!got.read_only, "{sql}");
            assert!(got.cursors_declared[0].1, "{sql}");
        }
        // A volatile built-in that changes nothing: not a writing cursor.
        assert!(!c("declare n cursor for select random()").cursors_declared[0].1);
        for (sql, used) in [
            ("fetch 2 from r", Some("r")),
            ("move forward 3 in r", Some("r")),
            ("close r", Some("r")),
            ("close all", None),
        ] {
            let got = c(sql);
            assert!(got.read_only, "{sql}");
            assert_eq!(got.cursors_used, [used.map(str::to_string)], "{sql}");
        }
        let got = c("update t set v = 1 where current of r");
        assert!(!got.read_only);
        assert_eq!(got.current_of, ["r"]);
        assert_eq!(
            c("declare h cursor with hold for select 1").pin_reason,
            Some("cursor WITH HOLD")
        );
    }

    #[test]
    fn pins() {
        let cases = [
            ("listen ch", Some("LISTEN")),
            ("unlisten ch", None),
            ("create temp table x(a int)", Some("temporary table")),
            (
                "create temporary table x as select 1",
                Some("temporary table"),
            ),
            ("select 1 into temp x", Some("temporary table")),
            ("create table pg_temp.x(a int)", Some("temporary table")),
            ("create temp view v as select 1", Some("temporary table")),
            ("create temp sequence s", Some("temporary table")),
            (
                "create function pg_temp.f() returns int as 'select 1' language sql",
                Some("temporary object"),
            ),
            ("create table x(a int)", None),
            ("select pg_advisory_lock(1)", Some("advisory lock")),
            (
                "select pg_try_advisory_lock_shared(1, 2)",
                Some("advisory lock"),
            ),
            (
                "select * from t where pg_try_advisory_lock(id)",
                Some("advisory lock"),
            ),
            ("select pg_advisory_xact_lock(1)", None),
            ("select pg_advisory_unlock(1)", None),
            (
                "declare c cursor with hold for select 1",
                Some("cursor WITH HOLD"),
            ),
            ("declare c cursor for select 1", None),
            ("prepare p as select 1", Some("PREPARE")),
            ("deallocate p", None),
            // Session settings of literals or parameters are replayed like
            // SET; others are not.
            ("select set_config('a.b', 'c', false)", None),
            ("select set_config('a.b', $1, false)", None),
            (
                "select set_config('a.b', $1::int::text, false)",
                Some("set_config"),
            ),
            (
                "select set_config('a.b', $1 || 'x', false)",
                Some("set_config"),
            ),
            (
                "select set_config('a.b', 'c', false) from t",
                Some("set_config"),
            ),
            ("select set_config('a.b', 'c', 'off')", Some("set_config")),
            ("select set_config('a.b', 'c', true)", None),
            ("select set_config('a.b', NULL, false)", None),
            ("select set_config(NULL, 'c', false)", Some("set_config")),
            (
                "set standard_conforming_strings = off",
                Some("standard_conforming_strings"),
            ),
            ("select 1; listen a; create temp table x()", Some("LISTEN")),
        ];
        for (sql, want) in cases {
            assert_eq!(c(sql).pin_reason, want, "{sql}");
        }
        let got = c("select pg_advisory_lock(1)");
        assert!(!got.read_only);
        let got = c("SELECT pg_catalog.set_config('search_path', '', false), \
                     set_config('TimeZone', 'it''s', false)");
        assert_eq!(
            got.session_settings,
            [
                "SELECT pg_catalog.set_config($r$search_path$r$, $r$$r$, false)",
                "SELECT pg_catalog.set_config($r$TimeZone$r$, $r$it's$r$, false)"
            ]
        );
        assert!(got.pin_reason.is_none());
        assert_eq!(
            c("select set_config('TimeZone', NULL, false)").session_settings,
            ["SELECT pg_catalog.set_config($r$TimeZone$r$, NULL, false)"]
        );
        let got = c("select set_config($1, $2::text, false), set_config('TimeZone', 'UTC', false)");
        assert_eq!(
            got.bound_settings,
            [
                [SettingArg::Param(1), SettingArg::Param(2)],
                [
                    SettingArg::Text("TimeZone".into()),
                    SettingArg::Text("UTC".into())
                ]
            ]
        );
        assert!(got.session_settings.is_empty() && got.pin_reason.is_none());
    }

    #[test]
    fn sql_prepared_statements_are_listed_in_order() {
        let got = c(
            "PREPARE p(int) AS INSERT INTO t VALUES ($1); EXECUTE p(1); \
                     DEALLOCATE p; DEALLOCATE PREPARE q; DEALLOCATE ALL; DISCARD ALL",
        );
        assert_eq!(
            got.prepared,
            [
                SqlPrepared::Prepare {
                    name: "p".into(),
                    text: "PREPARE p(int) AS INSERT INTO t VALUES ($1)".into()
                },
                SqlPrepared::Execute("p".into()),
                SqlPrepared::Deallocate(Some("p".into())),
                SqlPrepared::Deallocate(Some("q".into())),
                SqlPrepared::Deallocate(None),
                SqlPrepared::DiscardAll,
            ]
        );
        let defs = got.prepared.iter().filter(|p| p.is_definition()).count();
        assert_eq!(defs, 4);
        assert!(c("select 1").prepared.is_empty());
        // Each is known by its own command tag, NUL-terminated as sent.
        let tags: [&[u8]; 6] = [
            b"PREPARE\0",
            b"INSERT 0 1\0",
            b"DEALLOCATE\0",
            b"DEALLOCATE\0",
            b"DEALLOCATE ALL\0",
            b"DISCARD ALL\0",
        ];
        for (i, p) in got.prepared.iter().enumerate() {
            for (j, tag) in tags.iter().enumerate() {
                let same_kind = tags[i] == *tag && i != 1;
                assert_eq!(p.completed_by(tag), same_kind, "{p:?} by {j}");
            }
        }
    }

    #[test]
    fn copies_with_server_files_are_told_apart() {
        for sql in [
            "COPY t FROM '/tmp/t.csv' CSV",
            "COPY t (a) FROM PROGRAM 'gunzip -c /tmp/t.gz'",
            "select 1; copy t from '/x'",
        ] {
            assert!(c(sql).copy_from_server, "{sql}");
        }
        for sql in [
            "COPY t FROM STDIN",
            "COPY t TO STDOUT",
            "COPY t TO '/tmp/x'",
        ] {
            assert!(!c(sql).copy_from_server, "{sql}");
        }
        let to = |sql| c(sql).copy_to_server;
        assert_eq!(to("COPY t TO '/tmp/t.csv'"), 1);
        assert_eq!(
            to("COPY (SELECT * FROM t) TO PROGRAM 'cat'; COPY t TO '/x'"),
            2
        );
        assert_eq!(to("COPY t TO STDOUT"), 0);
        // Writes as it copies: logged like any write.
        assert_eq!(to("COPY (DELETE FROM t RETURNING *) TO '/tmp/gone'"), 0);
        assert!(
            !c("COPY t TO '/tmp/t.csv'").read_only,
            "runs on the primary"
        );
    }

    #[test]
    fn catalog_from_rows_decides_functions() {
        let catalog = FunctionCatalog::from_rows([
            ("pg_catalog".to_owned(), "lower".to_owned(), 'i'),
            ("app".to_owned(), "price".to_owned(), 's'),
            ("app".to_owned(), "bump".to_owned(), 'v'),
        ]);
        assert!(classify("select lower(a), app.price(1), price(2) from t", &catalog).read_only);
        assert!(!classify("select bump()", &catalog).read_only);
        assert!(
            !classify("select now()", &catalog).read_only,
            "not in pg_proc rows"
        );
    }

    #[test]
    fn classifier_caches_by_shape() {
        let classifier = Classifier::new(FunctionCatalog::builtin());
        let a = classifier.classify("select * from t where id = 1");
        let b = classifier.classify("select * from t where id = 2");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.read_only);
        assert_eq!(classifier.cached(), 1);

        // SET results carry source text: never shared.
        let s1 = classifier.classify("set search_path = a");
        let s2 = classifier.classify("set search_path = b");
        assert_eq!(s1.session_settings, ["set search_path = a"]);
        assert_eq!(s2.session_settings, ["set search_path = b"]);
        assert_eq!(classifier.cached(), 1);

        // Unsure keys bypass the cache but still classify.
        assert!(classifier.classify("select 'oops").parse_error);
        assert_eq!(classifier.cached(), 1);

        // A new catalog clears the cache and changes answers.
        assert!(!classifier.classify("select app_fn(1)").read_only);
        classifier.set_catalog(FunctionCatalog::from_rows([(
            "public".to_owned(),
            "app_fn".to_owned(),
            'i',
        )]));
        assert_eq!(classifier.cached(), 0);
        assert!(classifier.classify("select app_fn(2)").read_only);
    }

    #[test]
    fn classifier_cache_is_bounded() {
        let classifier = Classifier::new(FunctionCatalog::builtin());
        for i in 0..(3 * CACHE_GENERATION) {
            classifier.classify(&format!("select c{i} from t"));
        }
        assert!(classifier.cached() <= 2 * CACHE_GENERATION);
        assert!(classifier.cached() >= CACHE_GENERATION);
    }

    #[test]
    fn classifier_is_shared_across_threads() {
        let classifier = Arc::new(Classifier::new(FunctionCatalog::builtin()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let classifier = Arc::clone(&classifier);
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let got =
                            classifier.classify(&format!("select a from t{} where b = {i}", i % 7));
                        assert!(got.read_only);
                        if t == 0 && i % 50 == 0 {
                            classifier.set_catalog(FunctionCatalog::builtin());
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// Same shape ⇒ same answer: texts that share a cache key classify alike.
    #[test]
    fn shared_keys_classify_alike() {
        let pairs = [
            (
                "select * from t where a = 1",
                "select * from t where a = 22.5e3",
            ),
            (
                "explain (analyze 1) select 1",
                "explain (analyze 0) select 1",
            ),
            (
                "select set_config('a', 'b', 'on')",
                "select set_config('a', 'b', 'off')",
            ),
            ("select $$x$$", "select E'y'"),
        ];
        for (a, b) in pairs {
            assert_eq!(cache_key(a), cache_key(b), "{a} / {b}");
            assert_eq!(c(a), c(b), "{a} / {b}");
        }
    }

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    #[test]
    fn random_input_never_panics() {
        const FRAGMENTS: &[&str] = &[
            "select ",
            "from t ",
            "where ",
            "1",
            "'a'",
            "'",
            "\"",
            "$$",
            "$1",
            "(",
            ")",
            ";",
            "--",
            "/*",
            "*/",
            "nextval(",
            "for update ",
            "with x as (",
            "delete from t ",
            "begin ",
            "commit ",
            "set x = ",
            "explain ",
            "analyze ",
            "copy t to stdout ",
            "E'\\'",
            "U&\"",
            "é",
            "\0",
            "\n",
            ",",
            "::int",
            "listen ",
            "create temp table x ",
            "values ",
            "union ",
            "over (",
            "order by ",
        ];
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let catalog = FunctionCatalog::builtin();
        let classifier = Classifier::new(FunctionCatalog::builtin());
        for _ in 0..3000 {
            let mut sql = String::new();
            for _ in 0..rng.below(12) {
                sql.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]);
            }
            let _ = classify(&sql, &catalog);
            let _ = classifier.classify(&sql);
            let bytes: Vec<u8> = (0..rng.below(24)).map(|_| rng.below(256) as u8).collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = classify(&text, &catalog);
            let _ = cache_key(&text);
        }
        // Deep nesting is refused by the parser's stack check, not a crash.
        let deep = format!("select {}1{}", "(select ".repeat(5000), ")".repeat(5000));
        let got = classify(&deep, &catalog);
        assert!(!got.read_only);
        let deep = format!("select {}1", "- ".repeat(100_000));
        let _ = classify(&deep, &catalog);
    }
}
