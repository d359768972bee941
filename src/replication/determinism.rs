//! Determinism check for write statements (DESIGN.md, "Determinism: what
//! replay must neutralise").
//!
//! Every write statement the primary runs is replayed later on the
//! subscribers, so it must produce the same rows there. [`analyze_write`]
//! inspects one write SQL string (possibly several statements) before it runs
//! on the primary and says whether to run it unchanged, run a rewritten text
//! (on the primary *and* on replay), or refuse it (SQLSTATE 0A000).
//!
//! Time functions are rewritten to read the per-transaction timestamp that
//! the proxy stores with `SET LOCAL reprise.now = '…'` ([`NOW_EXPR`]).
//!
//! Detection walks the parse tree as serde JSON (so no node kind is missed);
//! rewriting splices replacements into the client's own text at the token
//! positions the parser reports, so everything else in the text (comments,
//! `$n` parameters, formatting) stays exactly as the client wrote it. The
//! result is parsed again before it is handed out.

use std::panic::{self, AssertUnwindSafe};

use pg_query::protobuf::{ScanToken, Token};
use serde_json::Value;

use crate::route::catalog::WINDOW_FUNCTIONS;

/// The setting the proxy fills with the primary's transaction timestamp.
pub const NOW_SETTING: &str = "reprise.now";

/// What every time function is rewritten to: the transaction timestamp taken
/// on the primary when set, else the local `now()` (e.g. a column default
/// evaluated by an INSERT made directly on a node).
pub const NOW_EXPR: &str =
    "COALESCE(NULLIF(current_setting('reprise.now', true), '')::timestamptz, now())";

/// The outcome of [`analyze_write`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WriteAnalysis {
    /// Some(new text) when the text must be rewritten (run the new text on the
    /// primary and on replay).
    pub rewritten: Option<String>,
    /// Some(reason) when the statement must be refused (SQLSTATE 0A000).
    pub refused: Option<String>,
    /// Target tables of `INSERT … SELECT` (not `INSERT … VALUES`), as written
    /// (`schema.table` when qualified).
    pub insert_select_targets: Vec<String>,
    /// A call to `nextval` or `setval` appears somewhere.
    pub uses_nextval: bool,
    /// The rewrite captures volatile values (`reprise.captured`).
    pub captures: bool,
    /// Some of them in an UPDATE's SET list: allowed only if the UPDATE
    /// changes at most one row (the caller checks against the catalog).
    pub update_captures: bool,
    /// Tables (their names, unqualified) given a column DEFAULT the copies
    /// would compute differently, by CREATE TABLE or ALTER TABLE: inserts
    /// capture its values only once the catalog knows it.
    pub declared_defaults: Vec<String>,
    /// Tables (unqualified names) created with a serial, identity or
    /// `nextval` default column: until committed the catalog does not know
    /// that they number the rows inserted.
    pub declared_numbered: Vec<String>,
}

/// Functions whose result differs between runs.
pub(crate) const VOLATILE_FUNCTIONS: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "gen_random_bytes",
    "gen_salt",
    "clock_timestamp",
    "timeofday",
];

/// Functions whose result belongs to one server.
const SERVER_FUNCTIONS: &[&str] = &[
    "txid_current",
    "txid_current_if_assigned",
    "txid_current_snapshot",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_current_snapshot",
    "pg_backend_pid",
    "inet_server_addr",
    "inet_server_port",
    "inet_client_addr",
    "inet_client_port",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    // Sizes, WAL positions and commit times: physical, and counted by
    // each server on its own.
    "pg_database_size",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_tablespace_size",
    "pg_relation_filenode",
    "pg_relation_filepath",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_last_committed_xact",
    "pg_xact_commit_timestamp",
    "pg_xact_status",
    "txid_status",
    // The server's own files and activity.
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_dir",
    "pg_blocking_pids",
    "pg_notification_queue_usage",
];

/// Relations (views) that show one server's activity, statistics or
/// configuration: `pg_stat_*` and `pg_statio_*` besides these.
const SERVER_RELATIONS: &[&str] = &[
    "pg_locks",
    "pg_prepared_xacts",
    "pg_prepared_statements",
    "pg_cursors",
    "pg_settings",
    "pg_file_settings",
    "pg_replication_slots",
    "pg_backend_memory_contexts",
    "pg_shmem_allocations",
];

fn is_server_relation(name: &str) -> bool {
    name.starts_with("pg_stat_")
        || name.starts_with("pg_statio_")
        || SERVER_RELATIONS.contains(&name)
}

/// Whether a column default's expression (as `pg_get_expr` prints it)
/// calls a function whose result differs between copies or runs: the
/// volatile and server functions above, `current_setting` (a setting of
/// the inserting session), or a time function or keyword that was not
/// rewritten to the primary's timestamp.
pub fn default_differs(expr: &str) -> bool {
    let e = expr.to_ascii_lowercase();
    if e.contains(NOW_SETTING) {
        return false;
    }
    // `call`: the word must be followed by `(` (a function call, not a
    // literal such as 'now').
    let word_at = |w: &str, call: bool| {
        e.match_indices(w).any(|(i, _)| {
            let before = e[..i].chars().next_back();
            let after = e[i + w.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '\'')
                && if call {
                    after == Some('(')
                } else {
                    !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                }
        })
    };
    VOLATILE_FUNCTIONS
        .iter()
        .chain(SERVER_FUNCTIONS)
        .chain(NOW_FUNCTIONS)
        .chain(&["current_setting"])
        .any(|f| word_at(f, true))
        || [
            "current_timestamp",
            "current_date",
            "current_time",
            "localtime",
            "localtimestamp",
        ]
        .iter()
        .any(|k| word_at(k, false))
}

/// Functions rewritten to [`NOW_EXPR`].
const NOW_FUNCTIONS: &[&str] = &["now", "transaction_timestamp", "statement_timestamp"];

/// System columns: physical, different on each copy.
const SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"];

/// The SQL value functions that read the clock (`CURRENT_TIMESTAMP` …).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Svf {
    CurrentDate,
    CurrentTime,
    CurrentTimestamp,
    LocalTime,
    LocalTimestamp,
}

impl Svf {
    /// From pg_query's `SqlValueFunctionOp` (1..=9) and its typmod.
    fn from_op(op: i64, typmod: i64) -> Option<(Svf, Option<i64>)> {
        let p = (typmod >= 0).then_some(typmod);
        Some(match op {
            1 => (Svf::CurrentDate, None),
            2 => (Svf::CurrentTime, None),
            3 => (Svf::CurrentTime, p),
            4 => (Svf::CurrentTimestamp, None),
            5 => (Svf::CurrentTimestamp, p),
            6 => (Svf::LocalTime, None),
            7 => (Svf::LocalTime, p),
            8 => (Svf::LocalTimestamp, None),
            9 => (Svf::LocalTimestamp, p),
            _ => return None,
        })
    }

    fn from_keyword(word: &str) -> Option<Svf> {
        Some(match word {
            "current_date" => Svf::CurrentDate,
            "current_time" => Svf::CurrentTime,
            "current_timestamp" => Svf::CurrentTimestamp,
            "localtime" => Svf::LocalTime,
            "localtimestamp" => Svf::LocalTimestamp,
            _ => return None,
        })
    }

    /// The replacement text, of the same SQL type as the original.
    fn replacement(self, precision: Option<i64>) -> String {
        let ty = match self {
            Svf::CurrentDate => "date",
            Svf::CurrentTime => "timetz",
            Svf::CurrentTimestamp => "timestamptz",
            Svf::LocalTime => "time",
            Svf::LocalTimestamp => "timestamp",
        };
        match (self, precision) {
            (Svf::CurrentTimestamp, None) => NOW_EXPR.to_string(),
            (Svf::CurrentDate, _) | (_, None) => format!("(({NOW_EXPR})::{ty})"),
            (_, Some(p)) => format!("(({NOW_EXPR})::{ty}({p}))"),
        }
    }
}

/// The expression replacing a special datetime literal (`'now'`, `'today'`,
/// …) cast to `type_name`; None when the pair is not time-dependent.
fn special_literal_expr(literal: &str, type_name: &str) -> Option<String> {
    let literal = literal.trim().to_ascii_lowercase();
    let date_like = matches!(type_name, "timestamptz" | "timestamp" | "date");
    let time_like = matches!(type_name, "time" | "timetz");
    match literal.as_str() {
        "now" if date_like || time_like => Some(NOW_EXPR.to_string()),
        "today" if date_like => Some(format!("(({NOW_EXPR})::date)")),
        "tomorrow" if date_like => Some(format!("(({NOW_EXPR})::date + 1)")),
        "yesterday" if date_like => Some(format!("(({NOW_EXPR})::date - 1)")),
        _ => None,
    }
}

fn volatile_reason(name: &str) -> String {
    format!(
        "{name}() is not deterministic: its value would differ on each copy of the group; \
         generate the value in the application and pass it as a parameter"
    )
}

fn server_reason(name: &str) -> String {
    format!(
        "{name}() returns a value that belongs to one server, so it would differ on each copy \
         of the group; compute it in the application and pass it as a parameter"
    )
}

fn refused_function_reason(name: &str) -> Option<String> {
    if VOLATILE_FUNCTIONS.contains(&name) {
        Some(volatile_reason(name))
    } else if is_server_function(name) {
        Some(server_reason(name))
    } else {
        None
    }
}

/// A function whose result belongs to one server: the list above and the
/// statistics accessors (`pg_stat_get_*`).
fn is_server_function(name: &str) -> bool {
    SERVER_FUNCTIONS.contains(&name) || name.starts_with("pg_stat_get_")
}

fn is_refused_function(name: &str) -> bool {
    VOLATILE_FUNCTIONS.contains(&name) || is_server_function(name)
}

/// Inspect one write SQL string before it runs on the primary.
///
/// Never panics on any input. A string that does not parse gives the
/// all-default analysis (no rewrite, not refused: the server will report the
/// syntax error).
pub fn analyze_write(sql: &str) -> WriteAnalysis {
    if !might_matter(sql) {
        return WriteAnalysis::default();
    }
    panic::catch_unwind(AssertUnwindSafe(|| analyze(sql))).unwrap_or_default()
}

/// Substrings (lower case) one of which any statement [`analyze`] would
/// rewrite, refuse or report contains.
const NEEDLES: &[&str] = &[
    "now",
    "current_",
    "localtime",
    "today",
    "tomorrow",
    "yesterday",
    "_timestamp",
    "random",
    "uuid",
    "gen_salt",
    "setseed",
    "timeofday",
    "txid",
    "xact",
    "snapshot",
    "pid",
    "inet_",
    "postmaster",
    "size",
    "pg_relation_file",
    "wal_",
    "committed",
    "commit_timestamp",
    "_status",
    "conf_load",
    "pg_read",
    "pg_ls_",
    "pg_stat",
    "notification",
    "pg_locks",
    "pg_prepared",
    "pg_cursors",
    "settings",
    "pg_replication",
    "memory_contexts",
    "shmem",
    "age(",
    "age (",
    "ctid",
    "xmin",
    "xmax",
    "cmin",
    "cmax",
    "tableoid",
    "tablesample",
    "skip",
    "insert",
    "nextval",
    "setval",
    "function",
    "procedure",
    "limit",
    "offset",
    "fetch",
    "lo_",
    "cache",
    "serial",
    "identity",
    "_agg",
    "over",
    "distinct",
];

/// Cheap pre-filter so that the common statement without any of the
/// constructs is not parsed at all.
fn might_matter(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    NEEDLES.iter().any(|n| lower.contains(n))
        || lower
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|w| w == "do")
}

fn analyze(sql: &str) -> WriteAnalysis {
    let tree = match crate::route::parsed::parse(sql) {
        Ok(parsed) => parsed,
        // Valid SQL nested deeper than prost's decode limit: no tree to walk.
        Err(crate::route::parsed::ParseError::TooDeep) => return crude_analysis(sql),
        Err(_) => return WriteAnalysis::default(),
    };
    let Some(json) = tree.json() else {
        return crude_analysis(sql);
    };
    let tokens = scan(sql).unwrap_or_default();
    let mut walker = Walker {
        sql,
        tokens: &tokens,
        edits: Vec::new(),
        refused: None,
        insert_select_targets: Vec::new(),
        uses_nextval: false,
        captures: false,
        update_captures: false,
        stored_defaults: 0,
    };
    let mut declared_defaults = Vec::new();
    let mut declared_numbered = Vec::new();
    if let Some(stmts) = json.get("stmts").and_then(Value::as_array) {
        for stmt in stmts {
            let stored_before = walker.stored_defaults;
            let ctx = Ctx {
                data_modifying: has_data_modification(stmt),
                ddl_expression: false,
                values: Values::No,
                create_table: false,
                stored_default: false,
                in_exists: false,
            };
            walker.walk(stmt, ctx);
            if walker.stored_defaults > stored_before {
                let node = &stmt["stmt"]["node"];
                let rel = node
                    .get("CreateStmt")
                    .or_else(|| node.get("AlterTableStmt"))
                    .and_then(|n| n["relation"]["relname"].as_str());
                declared_defaults.extend(rel.map(str::to_string));
            }
            if let Some(create) = stmt["stmt"]["node"].get("CreateStmt")
                && create["table_elts"]
                    .as_array()
                    .is_some_and(|cols| cols.iter().any(|c| numbers_rows(Some(c))))
            {
                declared_numbered
                    .extend(create["relation"]["relname"].as_str().map(str::to_string));
            }
        }
    }
    let mut analysis = WriteAnalysis {
        rewritten: None,
        refused: walker.refused,
        insert_select_targets: walker.insert_select_targets,
        uses_nextval: walker.uses_nextval,
        captures: walker.captures,
        update_captures: walker.update_captures,
        declared_defaults,
        declared_numbered,
    };
    if analysis.refused.is_some() || walker.edits.is_empty() {
        return analysis;
    }
    match apply_edits(sql, walker.edits) {
        Some(text) if parses(&text) => analysis.rewritten = Some(text),
        _ => {
            analysis.refused = Some(
                "reprise could not rewrite the time functions of this statement safely \
                 (now(), CURRENT_TIMESTAMP, …); pass the timestamp as a parameter instead"
                    .to_string(),
            )
        }
    }
    analysis
}

/// The scanner's tokens. (`pg_query::scan_tokens` builds a slice from a null
/// pointer when there are no tokens, which aborts in debug builds.)
pub(crate) fn scan(sql: &str) -> Option<Vec<ScanToken>> {
    if sql.trim().is_empty() {
        return Some(Vec::new());
    }
    pg_query::scan(sql).ok().map(|r| r.tokens)
}

pub(crate) fn parses(sql: &str) -> bool {
    crate::route::parsed::tree(sql).is_some()
}

/// A replacement of `sql[start..end]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Edit {
    pub start: usize,
    pub end: usize,
    pub text: String,
}

impl Edit {
    /// `text` put in at byte `at`, replacing nothing.
    pub(crate) fn insert(at: usize, text: String) -> Edit {
        Edit {
            start: at,
            end: at,
            text,
        }
    }
}

/// Splice non-overlapping edits into `text`; None if they overlap or do not
/// fall on character boundaries.
pub(crate) fn apply_edits(text: &str, mut edits: Vec<Edit>) -> Option<String> {
    edits.sort_by_key(|e| (e.start, e.end));
    let mut out = String::with_capacity(text.len() + edits.len() * NOW_EXPR.len());
    let mut pos = 0;
    for edit in &edits {
        if edit.start < pos || edit.end < edit.start {
            return None;
        }
        out.push_str(text.get(pos..edit.start)?);
        out.push_str(&edit.text);
        pos = edit.end;
    }
    out.push_str(text.get(pos..)?);
    Some(out)
}

#[derive(Debug, Clone, Copy)]
struct Ctx {
    /// The top-level statement changes data (INSERT/UPDATE/DELETE/MERGE
    /// anywhere in it, or SELECT INTO / CREATE TABLE AS).
    data_modifying: bool,
    /// Inside a column definition, constraint or ALTER TABLE command.
    ddl_expression: bool,
    /// Where an `INSERT … VALUES` row list is (its rows are evaluated once
    /// each, in order, so volatile values there can be captured).
    values: Values,
    /// Inside a CREATE TABLE.
    create_table: bool,
    /// Inside a column DEFAULT that is stored, not evaluated (CREATE TABLE,
    /// ALTER COLUMN … SET DEFAULT): inserts capture its value.
    stored_default: bool,
    /// Right under an `EXISTS (…)`: which rows its SELECT returns does not
    /// matter, only whether there are any.
    in_exists: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Values {
    /// Not on the way to an INSERT's VALUES lists.
    No,
    /// Between the InsertStmt and its VALUES lists.
    Pending,
    /// Inside the VALUES lists of an INSERT, or the target list of its
    /// query when that returns rows in a fixed order.
    Inside,
    /// An INSERT's query that returns rows in the same order on every copy
    /// (`rowlocal::fixed_order`): its target list's volatile values are
    /// captured in that order.
    FixedOrder,
    /// Between an UpdateStmt and its SET list.
    UpdatePending,
    /// Inside the SET list of an UPDATE (captured only when the UPDATE
    /// changes at most one row: see `WriteAnalysis::update_captures`).
    UpdateSet,
}

/// Whether a volatile function's value is captured (the call wrapped in
/// `reprise.captured`) where it appears in an INSERT's VALUES rows or an
/// UPDATE's SET list: all of them but `setseed`, which returns nothing and
/// only changes the session's random state.
fn is_captured(name: &str) -> bool {
    VOLATILE_FUNCTIONS.contains(&name) && name != "setseed"
}

/// Aggregates whose result depends on the order they see their rows in.
pub(crate) const ORDER_SENSITIVE_AGGREGATES: &[&str] = &[
    "string_agg",
    "array_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "xmlagg",
];

/// Why a call in a write depends on the order rows are read in (storage
/// order, which differs between copies): an order-sensitive aggregate
/// without an ORDER BY of its own, or such a window function (or one of
/// those aggregates as a window) over a window without ORDER BY. (Every
/// built-in window function depends on the order of its window.)
fn order_sensitive_reason(name: &str, call: &Value) -> Option<String> {
    let empty = |v: &Value| v.as_array().is_none_or(Vec::is_empty);
    let aggregate = ORDER_SENSITIVE_AGGREGATES.contains(&name);
    let unordered = match call.get("over").filter(|w| !w.is_null()) {
        Some(w) => {
            let named = w["name"].as_str().is_some_and(|n| !n.is_empty())
                || w["refname"].as_str().is_some_and(|n| !n.is_empty());
            (aggregate || WINDOW_FUNCTIONS.contains(&name)) && !named && empty(&w["order_clause"])
        }
        None => aggregate && empty(&call["agg_order"]),
    };
    unordered.then(|| {
        format!(
            "{name}() without ORDER BY in a write depends on the order the rows are read in, \
             which differs between the copies of the group; give it an ORDER BY (on a unique \
             key, for the order to be total)"
        )
    })
}

/// A `SELECT DISTINCT ON (…)` whose ORDER BY does not go beyond the
/// DISTINCT ON expressions: which row of each group it keeps is arbitrary.
fn picks_one_of_ties(select: &Value) -> bool {
    let len = |k: &str| select.get(k).and_then(Value::as_array).map_or(0, Vec::len);
    distinct_on(select) && len("sort_clause") <= len("distinct_clause")
}

/// A `SELECT DISTINCT ON (…)` (not a plain DISTINCT).
pub(crate) fn distinct_on(select: &Value) -> bool {
    select
        .get("distinct_clause")
        .and_then(Value::as_array)
        .is_some_and(|d| d.iter().any(|e| !e["node"].is_null()))
}

/// Whether an added column (`ColumnDef` under `def`) takes its values from
/// a sequence: a serial type, an identity, or a nextval() default.
fn numbers_rows(def: Option<&Value>) -> bool {
    let Some(col) = def
        .and_then(|d| d.get("node"))
        .and_then(|n| n.get("ColumnDef"))
    else {
        return false;
    };
    let type_name = col["type_name"]["names"]
        .as_array()
        .and_then(|n| n.last())
        .and_then(string_node)
        .unwrap_or("");
    let serial = matches!(
        type_name,
        "serial" | "bigserial" | "smallserial" | "serial2" | "serial4" | "serial8"
    );
    let from_sequence = col["constraints"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            let c = &c["node"]["Constraint"];
            let contype = c["contype"].as_i64();
            contype == Some(pg_query::protobuf::ConstrType::ConstrIdentity as i64)
                || contype == Some(pg_query::protobuf::ConstrType::ConstrDefault as i64)
                    && c["raw_expr"].to_string().contains("\"nextval\"")
        });
    serial || from_sequence
}

/// Why a call of a large object function would differ between copies:
/// the server picks the new object's OID (from a counter of its own) unless
/// the call names a nonzero OID as a literal, and `lo_import` reads a file
/// on the server.
fn large_object_reason(name: &str, call: &Value) -> Option<String> {
    let literal_oid = || {
        let mut arg = call
            .get("args")
            .and_then(Value::as_array)
            .and_then(|a| a.first())?
            .get("node")?;
        // `12345::oid`
        while let Some(inner) = arg.get("TypeCast").and_then(|c| c.get("arg")?.get("node")) {
            arg = inner;
        }
        let val = arg.get("AConst")?.get("val")?;
        let oid = match val.get("Ival") {
            Some(i) => i.get("ival").and_then(Value::as_i64).unwrap_or(0),
            None => val
                .get("Sval")?
                .get("sval")?
                .as_str()?
                .trim()
                .parse()
                .ok()?,
        };
        (oid != 0).then_some(oid)
    };
    match name {
        "lo_import" => Some(
            "lo_import() reads a file on the server: each copy of the group would read its \
             own; send the data with lo_from_bytea(oid, data)"
                .to_string(),
        ),
        "lo_creat" => Some(format!(
            "{name}() lets the server pick the large object's OID, which would differ on each \
             copy of the group; use lo_create(oid) with an OID the application chooses"
        )),
        "lo_create" | "lo_from_bytea" if literal_oid().is_none() => Some(format!(
            "{name}() without an OID given as a nonzero literal lets the server pick the large \
             object's OID, which would differ on each copy of the group; pass the OID the \
             application chooses as a literal, e.g. {name}(424242{})",
            if name == "lo_from_bytea" {
                ", data"
            } else {
                ""
            }
        )),
        _ => None,
    }
}

/// A `current_setting('reprise.…')` call: Reprise's own settings, which
/// replay sets itself (the primary's timestamp in `NOW_EXPR`, …).
fn reads_own_setting(call: &Value) -> bool {
    call.get("args")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(|a| a.get("node"))
        .and_then(|n| n.get("AConst"))
        .and_then(|c| c.get("val"))
        .and_then(|v| v.get("Sval"))
        .and_then(|s| s.get("sval"))
        .and_then(Value::as_str)
        .is_some_and(|n| n.starts_with("reprise."))
}

/// The call that captures an expression's value on the primary and
/// replays it on the other copies.
pub fn captured_call(expr: &str) -> String {
    format!("reprise.captured({expr})")
}

struct Walker<'a> {
    sql: &'a str,
    tokens: &'a [ScanToken],
    edits: Vec<Edit>,
    refused: Option<String>,
    insert_select_targets: Vec<String>,
    uses_nextval: bool,
    captures: bool,
    update_captures: bool,
    /// Column DEFAULTs seen that the copies would compute differently.
    stored_defaults: usize,
}

impl Walker<'_> {
    fn refuse(&mut self, reason: String) {
        if self.refused.is_none() {
            self.refused = Some(reason);
        }
    }

    fn cannot_rewrite(&mut self, what: &str) {
        self.refuse(format!(
            "reprise could not rewrite {what} in this statement so that every copy of the \
             group gets the same value; pass the timestamp as a parameter instead"
        ));
    }

    fn walk(&mut self, value: &Value, ctx: Ctx) {
        match value {
            Value::Array(items) => {
                for item in items {
                    self.walk(item, ctx);
                }
            }
            Value::Object(map) => {
                for (key, child) in map {
                    if !self.visit(key, child, ctx) {
                        continue;
                    }
                    let mut child_ctx = match key.as_str() {
                        "ColumnDef" | "Constraint" | "AlterTableCmd" => Ctx {
                            ddl_expression: true,
                            ..ctx
                        },
                        _ => ctx,
                    };
                    child_ctx.in_exists = key == "SubLink"
                        && child.get("sub_link_type").and_then(Value::as_i64)
                            == Some(pg_query::protobuf::SubLinkType::ExistsSublink as i64)
                        || ctx.in_exists && key != "SelectStmt";
                    match key.as_str() {
                        "CreateStmt" => child_ctx.create_table = true,
                        "Constraint" => {
                            child_ctx.stored_default = ctx.create_table
                                && child.get("contype").and_then(Value::as_i64)
                                    == Some(pg_query::protobuf::ConstrType::ConstrDefault as i64);
                        }
                        "AlterTableCmd" => {
                            child_ctx.stored_default = child.get("subtype").and_then(Value::as_i64)
                                == Some(pg_query::protobuf::AlterTableType::AtColumnDefault as i64);
                        }
                        _ => {}
                    }
                    child_ctx.values = match (ctx.values, key.as_str()) {
                        (_, "InsertStmt") => Values::Pending,
                        (_, "UpdateStmt") => Values::UpdatePending,
                        (Values::UpdatePending, "target_list") => Values::UpdateSet,
                        (Values::UpdateSet, "SubLink" | "SelectStmt") => Values::No,
                        (Values::UpdateSet, _) => Values::UpdateSet,
                        (Values::Pending, "SelectStmt")
                            if child["values_lists"].as_array().is_none_or(Vec::is_empty)
                                && super::rowlocal::fixed_order(child) =>
                        {
                            Values::FixedOrder
                        }
                        (Values::Pending, "select_stmt" | "node" | "SelectStmt") => Values::Pending,
                        (Values::FixedOrder, "target_list") => Values::Inside,
                        (Values::Pending, "values_lists") => Values::Inside,
                        (Values::Inside, "SubLink" | "SelectStmt") => Values::No,
                        (Values::Inside, _) => Values::Inside,
                        _ => Values::No,
                    };
                    self.walk(child, child_ctx);
                }
            }
            _ => {}
        }
    }

    /// Look at one node (`kind` is the node type tag); false to skip its
    /// subtree.
    fn visit(&mut self, kind: &str, node: &Value, ctx: Ctx) -> bool {
        match kind {
            "FuncCall" => return self.visit_func_call(node, ctx),
            "SqlvalueFunction" => {
                let op = node.get("op").and_then(Value::as_i64).unwrap_or(0);
                let typmod = node.get("typmod").and_then(Value::as_i64).unwrap_or(-1);
                if let Some((svf, precision)) = Svf::from_op(op, typmod) {
                    let loc = location(node);
                    match self.svf_span(loc, precision.is_some()) {
                        Some((start, end)) => self.edits.push(Edit {
                            start,
                            end,
                            text: svf.replacement(precision),
                        }),
                        None => self.cannot_rewrite("a CURRENT_TIMESTAMP-like expression"),
                    }
                }
            }
            "TypeCast" => self.visit_type_cast(node),
            "AlterTableCmd"
                if node.get("subtype").and_then(Value::as_i64)
                    == Some(pg_query::protobuf::AlterTableType::AtAddColumn as i64)
                    && numbers_rows(node.get("def")) =>
            {
                self.refuse(
                    "ADD COLUMN with a serial type, an identity or a nextval() default numbers the \
                     existing rows in storage order, which differs between the copies of the group; \
                     add the column without it, then fill it in key order (e.g. UPDATE … FROM \
                     (SELECT key, row_number() OVER (ORDER BY key) …)), then set the default"
                        .to_string(),
                );
            }
            "DefElem" if node.get("defname").and_then(Value::as_str) == Some("cache") => {
                let cache = node
                    .get("arg")
                    .and_then(|a| a.get("node"))
                    .and_then(|n| n.get("Integer"))
                    .map(|i| i.get("ival").and_then(Value::as_i64).unwrap_or(0));
                if cache.is_some_and(|c| c > 1) {
                    self.refuse(
                        "a sequence with CACHE above 1 hands each session values from a cache \
                         of its own, which the other copies of the group cannot follow; \
                         leave CACHE at 1"
                            .to_string(),
                    );
                }
            }
            "ColumnRef" => {
                let last = node
                    .get("fields")
                    .and_then(Value::as_array)
                    .and_then(|f| f.last())
                    .and_then(string_node);
                if let Some(col) = last.filter(|c| SYSTEM_COLUMNS.contains(c)) {
                    self.refuse(format!(
                        "the system column {col} is not the same on each copy of the group \
                         (it reflects where and when a row was stored); identify rows by a key \
                         instead"
                    ));
                }
            }
            "RangeVar" if ctx.data_modifying => {
                let name = node
                    .get("relname")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let schema = node.get("schemaname").and_then(Value::as_str);
                if schema.is_none_or(|s| s.is_empty() || s == "pg_catalog")
                    && is_server_relation(name)
                {
                    self.refuse(format!(
                        "{name} shows the activity, statistics or settings of one server, which \
                         differ on each copy of the group; a write cannot use it (read it in a \
                         query of its own and pass the values as parameters)"
                    ));
                }
            }
            "RangeTableSample" => self.refuse(
                "TABLESAMPLE picks different rows on each copy of the group; select the rows \
                 by key instead"
                    .to_string(),
            ),
            // wait_policy 2 is LockWaitPolicy::LockWaitSkip.
            "LockingClause"
                if ctx.data_modifying
                    && node.get("wait_policy").and_then(Value::as_i64) == Some(2) =>
            {
                self.refuse(
                    "FOR UPDATE/SHARE SKIP LOCKED inside a write picks rows depending on \
                     concurrent locks, so replay could change different rows; select the \
                     rows by key instead"
                        .to_string(),
                );
            }
            "SelectStmt"
                if ctx.data_modifying
                    && !ctx.in_exists
                    && ["limit_count", "limit_offset"]
                        .iter()
                        .any(|k| node.get(*k).is_some_and(|v| !v.is_null()))
                    && node
                        .get("sort_clause")
                        .and_then(Value::as_array)
                        .is_none_or(Vec::is_empty) =>
            {
                self.refuse(
                    "LIMIT or OFFSET without ORDER BY in a write picks rows in storage order, \
                     which differs between copies of the group; add an ORDER BY on a unique key"
                        .to_string(),
                );
            }
            "SelectStmt" if ctx.data_modifying && !ctx.in_exists && picks_one_of_ties(node) => {
                self.refuse(
                    "DISTINCT ON in a write keeps one row of each group, chosen by its ORDER BY; \
                     without more ORDER BY columns than the DISTINCT ON list the row kept follows \
                     storage order, which differs between copies of the group; order the rows \
                     of each group by a unique key"
                        .to_string(),
                );
            }
            "InsertStmt" => self.visit_insert(node),
            // Our own NOW_EXPR (e.g. analysing an already rewritten text):
            // its fallback now() must stay as it is.
            "CoalesceExpr" => return !is_now_expr(node),
            "CreateFunctionStmt" => {
                let what = if node.get("is_procedure").and_then(Value::as_bool) == Some(true) {
                    "procedure"
                } else {
                    "function"
                };
                let options = node.get("options");
                self.visit_routine_body(options, what, "sql");
            }
            "DoStmt" => self.visit_routine_body(node.get("args"), "DO block", "plpgsql"),
            _ => {}
        }
        true
    }

    /// Wraps the call at `node` in `reprise.captured` (or refuses with
    /// `reason` when its text cannot be found).
    fn capture(&mut self, node: &Value, ctx: Ctx, reason: String) {
        self.update_captures |= ctx.values == Values::UpdateSet;
        match self.call_span(location(node)) {
            Some((start, end)) => {
                let call = self.sql.get(start..end).unwrap_or_default().to_string();
                self.edits.push(Edit {
                    start,
                    end,
                    text: captured_call(&call),
                });
                self.captures = true;
            }
            None => self.refuse(reason),
        }
    }

    /// A function call; false when its arguments are not to be looked at.
    fn visit_func_call(&mut self, node: &Value, ctx: Ctx) -> bool {
        let names = super::function_names(node);
        let Some(&name) = names.last() else {
            return true;
        };
        if names == ["reprise", "captured"] {
            // Already captured (an analysed rewrite): replayed as recorded.
            return false;
        }
        let builtin = names.len() == 1 || (names.len() == 2 && names[0] == "pg_catalog");
        if builtin
            && ctx.data_modifying
            && let Some(reason) = order_sensitive_reason(name, node)
        {
            self.refuse(reason);
            return true;
        }
        if builtin && (name == "nextval" || name == "setval") {
            self.uses_nextval = true;
        }
        let capturable = matches!(ctx.values, Values::Inside | Values::UpdateSet);
        // An UPDATE visits its rows in storage order, which differs between
        // copies: the numbers nextval gives them are captured by row.
        let row_order_nextval = name == "nextval" && ctx.values == Values::UpdateSet;
        if builtin && capturable && !ctx.ddl_expression && (is_captured(name) || row_order_nextval)
        {
            self.capture(node, ctx, volatile_reason(name));
            // Its value is replayed as recorded, whatever its arguments do.
            return false;
        }
        if builtin
            && name == "current_setting"
            && ctx.data_modifying
            && !ctx.ddl_expression
            && !ctx.stored_default
            && !reads_own_setting(node)
        {
            // A setting of the client's session (set_config, a startup
            // parameter): the replay's session does not have it.
            let reason = "current_setting() in a write reads a setting of this session, which the \
                          other copies' replay does not have; pass the value as a parameter"
                .to_string();
            if capturable {
                self.capture(node, ctx, reason);
            } else {
                self.refuse(reason);
            }
            return false;
        }
        let session_setting = name == "current_setting" && !reads_own_setting(node);
        if builtin && ctx.stored_default && (is_captured(name) || session_setting) {
            // A stored default: the inserts that use it capture its value
            // (or are refused when they cannot name the column).
            self.stored_defaults += 1;
            return true;
        }
        if builtin && let Some(reason) = large_object_reason(name, node) {
            self.refuse(reason);
            return true;
        }
        if let Some(reason) = refused_function_reason(name) {
            if ctx.ddl_expression {
                self.refuse(format!(
                    "a column DEFAULT, CHECK or ALTER … USING expression that calls {name}() would give a different value \
                     on each copy of the group; generate the value in the application and pass \
                     it as a parameter"
                ));
            } else {
                self.refuse(reason);
            }
            return true;
        }
        let args = node.get("args").and_then(Value::as_array);
        let no_args = args.is_none_or(Vec::is_empty);
        if builtin && name == "age" && args.is_some_and(|a| a.len() == 1) {
            // age(x) is age(current_date, x): the primary's date, written
            // out, so that replay on another day agrees.
            match self.call_open(location(node)) {
                Some((_, open)) => self.edits.push(Edit::insert(
                    self.tokens[open].end as usize,
                    format!("{}, ", Svf::CurrentDate.replacement(None)),
                )),
                None => self.cannot_rewrite("age()"),
            }
        }
        if builtin && no_args && NOW_FUNCTIONS.contains(&name) {
            match self.call_span(location(node)) {
                Some((start, end)) => self.edits.push(Edit {
                    start,
                    end,
                    text: NOW_EXPR.to_string(),
                }),
                None => self.cannot_rewrite(&format!("{name}()")),
            }
        }
        true
    }

    fn visit_type_cast(&mut self, node: &Value) {
        let Some(literal) = node
            .get("arg")
            .and_then(|a| a.get("node"))
            .and_then(|n| n.get("AConst"))
        else {
            return;
        };
        let Some(sval) = literal
            .get("val")
            .and_then(|v| v.get("Sval"))
            .and_then(|s| s.get("sval"))
            .and_then(Value::as_str)
        else {
            return;
        };
        let Some(type_name) = node.get("type_name") else {
            return;
        };
        let is_array = type_name
            .get("array_bounds")
            .and_then(Value::as_array)
            .is_some_and(|b| !b.is_empty());
        let last = type_name
            .get("names")
            .and_then(Value::as_array)
            .and_then(|n| n.last())
            .and_then(string_node);
        let Some(ty) = last.filter(|_| !is_array) else {
            return;
        };
        let Some(expr) = special_literal_expr(sval, ty) else {
            return;
        };
        let lit_loc = location(literal);
        let type_loc = location(type_name);
        let Some(lit) = self
            .token_at(lit_loc)
            .filter(|&i| is_string_token(&self.tokens[i]))
        else {
            self.cannot_rewrite(&format!("'{sval}'::{ty}"));
            return;
        };
        let lit_tok = &self.tokens[lit];
        let (start, end) = (lit_tok.start as usize, lit_tok.end as usize);
        if type_loc >= 0 && type_loc < lit_loc {
            // `timestamp 'now'`: replace the type and the literal together.
            let Some(type_text) = self.sql.get(type_loc as usize..start) else {
                self.cannot_rewrite(&format!("{ty} '{sval}'"));
                return;
            };
            let text = format!("(({expr})::{})", type_text.trim());
            self.edits.push(Edit {
                start: type_loc as usize,
                end,
                text,
            });
        } else {
            // `'now'::timestamptz`, `CAST('now' AS date)`: replace the literal,
            // keep the cast.
            self.edits.push(Edit {
                start,
                end,
                text: format!("({expr})"),
            });
        }
    }

    fn visit_insert(&mut self, node: &Value) {
        let Some(select) = node
            .get("select_stmt")
            .and_then(|s| s.get("node"))
            .filter(|s| !s.is_null())
        else {
            return; // DEFAULT VALUES
        };
        let plain_values = select
            .get("SelectStmt")
            .and_then(|s| s.get("values_lists"))
            .and_then(Value::as_array)
            .is_some_and(|v| !v.is_empty());
        if plain_values {
            return;
        }
        let Some(rel) = node.get("relation") else {
            return;
        };
        let schema = rel.get("schemaname").and_then(Value::as_str).unwrap_or("");
        let name = rel.get("relname").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() {
            return;
        }
        let target = if schema.is_empty() {
            name.to_string()
        } else {
            format!("{schema}.{name}")
        };
        if !self.insert_select_targets.contains(&target) {
            self.insert_select_targets.push(target);
        }
    }

    /// `CREATE FUNCTION … AS $$ body $$` and `DO $$ body $$`: the body is a
    /// string the parser does not look into.
    fn visit_routine_body(&mut self, options: Option<&Value>, what: &str, default_lang: &str) {
        let mut language = default_lang.to_string();
        let mut body: Option<(&str, i64)> = None;
        for opt in options.and_then(Value::as_array).into_iter().flatten() {
            let Some(def) = opt.get("node").and_then(|n| n.get("DefElem")) else {
                continue;
            };
            let arg = def.get("arg");
            match def.get("defname").and_then(Value::as_str) {
                Some("language") => {
                    if let Some(l) = arg.and_then(string_node) {
                        language = l.to_ascii_lowercase();
                    }
                }
                Some("as") => {
                    let arg_loc = def
                        .get("arg_location")
                        .and_then(Value::as_i64)
                        .unwrap_or(-1);
                    if let Some(s) = arg.and_then(string_node) {
                        body = Some((s, arg_loc));
                    } else if let Some(items) = arg
                        .and_then(|a| a.get("node"))
                        .and_then(|n| n.get("List"))
                        .and_then(|l| l.get("items"))
                        .and_then(Value::as_array)
                    {
                        // Two strings: object file and symbol of a C function.
                        if let [only] = items.as_slice() {
                            body = string_node(only).map(|s| (s, arg_loc));
                        }
                    }
                }
                _ => {}
            }
        }
        let Some((body, arg_loc)) = body else { return };
        match language.as_str() {
            "sql" | "plpgsql" => {}
            "c" | "internal" => return,
            _ => {
                // Another procedural language: look for calls, do not rewrite.
                if let Some(name) = crude_find_call(body, is_refused_function) {
                    self.refuse(routine_reason(what, &name));
                }
                return;
            }
        }
        let (edits, refused) = analyze_body(body);
        if let Some(name) = refused {
            self.refuse(routine_reason(what, &name));
            return;
        }
        if edits.is_empty() {
            return;
        }
        let new_body = apply_edits(body, edits);
        let tok = self
            .token_at(arg_loc)
            .filter(|&i| is_string_token(&self.tokens[i]));
        match (new_body, tok) {
            (Some(new_body), Some(i)) => {
                let tok = &self.tokens[i];
                self.edits.push(Edit {
                    start: tok.start as usize,
                    end: tok.end as usize,
                    text: dollar_quote(&new_body),
                });
            }
            _ => self.cannot_rewrite(&format!("the time functions in the body of this {what}")),
        }
    }

    fn token_at(&self, loc: i64) -> Option<usize> {
        let loc = i32::try_from(loc).ok().filter(|l| *l >= 0)?;
        self.tokens.binary_search_by_key(&loc, |t| t.start).ok()
    }

    /// Tokens of a function call starting at `loc`: its first and its `(`.
    fn call_open(&self, loc: i64) -> Option<(usize, usize)> {
        let first = self.token_at(loc)?;
        let open = (first..self.tokens.len().min(first + 6))
            .find(|&i| self.tokens[i].token == Token::Ascii40 as i32)?;
        Some((first, open))
    }

    /// Span of a function call starting at `loc`: name … matching `)`.
    fn call_span(&self, loc: i64) -> Option<(usize, usize)> {
        let (first, open) = self.call_open(loc)?;
        let close = matching_paren(self.tokens, open)?;
        Some((
            self.tokens[first].start as usize,
            self.tokens[close].end as usize,
        ))
    }

    /// Span of `CURRENT_TIMESTAMP` or `CURRENT_TIMESTAMP(p)` at `loc`.
    fn svf_span(&self, loc: i64, has_precision: bool) -> Option<(usize, usize)> {
        let first = self.token_at(loc)?;
        let mut last = first;
        if has_precision {
            let open = first + 1;
            if self.tokens.get(open)?.token != Token::Ascii40 as i32 {
                return None;
            }
            last = matching_paren(self.tokens, open)?;
        }
        Some((
            self.tokens[first].start as usize,
            self.tokens[last].end as usize,
        ))
    }
}

fn routine_reason(what: &str, name: &str) -> String {
    if what == "DO block" {
        format!(
            "a DO block that calls {name}() would give a different result on each copy of the \
             group; generate the value in the application and pass it as a parameter"
        )
    } else {
        format!(
            "a {what} that calls {name}() would give different results on each copy of the group \
             when a write calls it; generate the value in the application and pass it as a \
             parameter"
        )
    }
}

/// Rewrite time functions in a `sql`/`plpgsql` body. Returns the edits of the
/// body text and the first refused function called, if any.
fn analyze_body(body: &str) -> (Vec<Edit>, Option<String>) {
    let Some(tokens) = scan(body) else {
        // Not scannable as SQL: be conservative about refused calls, and
        // refuse time functions we cannot rewrite.
        let name = crude_find_call(body, |w| {
            is_refused_function(w) || NOW_FUNCTIONS.contains(&w) || Svf::from_keyword(w).is_some()
        });
        return (Vec::new(), name);
    };
    // Our own NOW_EXPR (an already rewritten body) stays as it is.
    let protected: Vec<(usize, usize)> = body
        .match_indices(NOW_EXPR)
        .map(|(i, m)| (i, i + m.len()))
        .collect();
    let text = |t: &ScanToken| body.get(t.start as usize..t.end as usize).unwrap_or("");
    let is_word = |t: &ScanToken| t.token == Token::Ident as i32 || t.keyword_kind != 0;
    let is_tok = |i: usize, kind: Token| tokens.get(i).is_some_and(|t| t.token == kind as i32);
    let word = |i: usize| {
        tokens
            .get(i)
            .filter(|t| is_word(t))
            .map(|t| text(t).to_ascii_lowercase())
    };
    let mut edits = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let tok = &tokens[i];
        let start = tok.start as usize;
        if protected.iter().any(|&(s, e)| start >= s && start < e) {
            i += 1;
            continue;
        }
        let after_dot = i > 0 && is_tok(i - 1, Token::Ascii46);
        if let Some(w) = word(i) {
            let call = is_tok(i + 1, Token::Ascii40);
            if call && is_refused_function(&w) {
                return (edits, Some(w));
            }
            if call && NOW_FUNCTIONS.contains(&w.as_str()) && is_tok(i + 2, Token::Ascii41) {
                let qualified_start = if after_dot {
                    (i >= 2 && word(i - 2).as_deref() == Some("pg_catalog"))
                        .then(|| tokens[i - 2].start as usize)
                } else {
                    Some(start)
                };
                if let Some(s) = qualified_start {
                    edits.push(Edit {
                        start: s,
                        end: tokens[i + 2].end as usize,
                        text: NOW_EXPR.to_string(),
                    });
                    i += 3;
                    continue;
                }
            }
            if !after_dot
                && tok.token != Token::Ident as i32
                && let Some(svf) = Svf::from_keyword(&w)
            {
                let precision = (svf != Svf::CurrentDate
                    && call
                    && is_tok(i + 2, Token::Iconst)
                    && is_tok(i + 3, Token::Ascii41))
                .then(|| text(&tokens[i + 2]).parse::<i64>().ok())
                .flatten();
                let end = if precision.is_some() {
                    tokens[i + 3].end as usize
                } else {
                    tok.end as usize
                };
                edits.push(Edit {
                    start,
                    end,
                    text: svf.replacement(precision),
                });
                i += if precision.is_some() { 4 } else { 1 };
                continue;
            }
        } else if tok.token == Token::Sconst as i32 && is_tok(i + 1, Token::Typecast) {
            // 'now'::timestamptz
            let lit = text(tok);
            let inner = lit
                .strip_prefix('\'')
                .and_then(|l| l.strip_suffix('\''))
                .unwrap_or("");
            let ty = word(i + 2).unwrap_or_default();
            if !is_tok(i + 3, Token::Ascii91)
                && let Some(expr) = special_literal_expr(inner, &ty)
            {
                edits.push(Edit {
                    start,
                    end: tok.end as usize,
                    text: format!("({expr})"),
                });
            }
        }
        i += 1;
    }
    (edits, None)
}

/// Quote `body` as a dollar-quoted string whose tag does not occur in it.
fn dollar_quote(body: &str) -> String {
    let mut n = 0u32;
    loop {
        let tag = if n == 0 {
            "$reprise$".to_string()
        } else {
            format!("$reprise{n}$")
        };
        if !body.contains(&tag) && !body.ends_with('$') {
            return format!("{tag}{body}{tag}");
        }
        if !body.contains(&tag) {
            // A body ending in `$` would run into the closing tag.
            return format!("{tag}{body}\n{tag}");
        }
        n += 1;
    }
}

pub(crate) fn matching_paren(tokens: &[ScanToken], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate().skip(open) {
        if t.token == Token::Ascii40 as i32 {
            depth += 1;
        } else if t.token == Token::Ascii41 as i32 {
            depth = depth.checked_sub(1)?;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

fn is_string_token(t: &ScanToken) -> bool {
    t.token == Token::Sconst as i32 || t.token == Token::Usconst as i32
}

fn location(node: &Value) -> i64 {
    node.get("location").and_then(Value::as_i64).unwrap_or(-1)
}

/// The text of a `{"node": {"String": {"sval": …}}}` node.
fn string_node(v: &Value) -> Option<&str> {
    v.get("node")?.get("String")?.get("sval")?.as_str()
}

/// Is this CoalesceExpr our own [`NOW_EXPR`]?
fn is_now_expr(node: &Value) -> bool {
    let Some([first, second]) = node
        .get("args")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    else {
        return false;
    };
    let fallback = second.get("node").and_then(|n| n.get("FuncCall"));
    let fallback_is_now = fallback.is_some_and(|f| {
        f.get("args")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
            && f.get("funcname")
                .and_then(Value::as_array)
                .is_some_and(|n| n.len() == 1 && string_node(&n[0]) == Some("now"))
    });
    if !fallback_is_now {
        return false;
    }
    let text = first.to_string();
    text.contains("\"current_setting\"") && text.contains(&format!("\"{NOW_SETTING}\""))
}

/// Does a statement change data (so SKIP LOCKED in it matters)?
pub(crate) fn has_data_modification(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.iter().any(has_data_modification),
        Value::Object(map) => map.iter().any(|(k, child)| {
            matches!(
                k.as_str(),
                "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" | "CreateTableAsStmt"
            ) || (k == "into_clause" && !child.is_null())
                || has_data_modification(child)
        }),
        _ => false,
    }
}

/// First word (case-insensitive, ASCII) matching `pred` that is followed by
/// `(`; ignores strings and comments, so it errs on the side of finding.
fn crude_find_call(text: &str, pred: impl Fn(&str) -> bool) -> Option<String> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let w = text[start..i].to_ascii_lowercase();
            let next = bytes[i..].iter().find(|b| !b.is_ascii_whitespace());
            if pred(&w) && (next == Some(&b'(') || Svf::from_keyword(&w).is_some()) {
                return Some(w);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// For statements we could not get a tree for (too deeply nested): refuse
/// if anything we would have rewritten or refused might be in it.
fn crude_analysis(sql: &str) -> WriteAnalysis {
    let lower = sql.to_ascii_lowercase();
    let mut analysis = WriteAnalysis {
        uses_nextval: lower.contains("nextval") || lower.contains("setval"),
        ..WriteAnalysis::default()
    };
    let call = crude_find_call(sql, |w| {
        is_refused_function(w) || NOW_FUNCTIONS.contains(&w) || Svf::from_keyword(w).is_some()
    });
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    let other = words
        .iter()
        .find(|w| SYSTEM_COLUMNS.contains(w) || **w == "tablesample" || **w == "now");
    if let Some(what) = call.or(other.map(|w| w.to_string())) {
        analysis.refused = Some(format!(
            "this statement is nested too deeply for reprise to check that it gives the same \
             result on each copy of the group (it mentions {what}); simplify it or pass the \
             value as a parameter"
        ));
    }
    analysis
}

#[cfg(test)]
mod tests {

    #[test]
    fn defaults_that_differ_between_copies() {
        for e in [
            "gen_random_uuid()",
            "now()",
            "CURRENT_TIMESTAMP",
            "(random() * 10)::integer",
            "clock_timestamp()",
            "public.uuid_generate_v4()",
            "current_setting('app.user'::text)",
        ] {
            assert!(default_differs(e), "{e}");
        }
        for e in [
            "0",
            "'now'::text",
            "COALESCE(NULLIF(current_setting('reprise.now', true), '')::timestamptz, now())",
            "my_random_label()",
            "lower('x')",
        ] {
            assert!(!default_differs(e), "{e}");
        }
    }

    use super::*;

    fn rewritten(sql: &str) -> String {
        let a = analyze_write(sql);
        assert_eq!(a.refused, None, "{sql}");
        let out = a
            .rewritten
            .unwrap_or_else(|| panic!("no rewrite for {sql}"));
        assert!(parses(&out), "rewrite does not parse: {out}");
        assert!(out.contains("current_setting('reprise.now'"), "{out}");
        // Idempotent: the rewritten text needs no further rewrite.
        let again = analyze_write(&out);
        assert_eq!(again.rewritten, None, "rewrite of {out}");
        assert_eq!(again.refused, None, "{out}");
        out
    }

    fn refused(sql: &str) -> String {
        let a = analyze_write(sql);
        assert_eq!(a.rewritten, None, "{sql}");
        a.refused.unwrap_or_else(|| panic!("not refused: {sql}"))
    }

    #[test]
    fn rewrites_time_functions() {
        let cases: &[(&str, &[&str])] = &[
            ("INSERT INTO h (mtime) VALUES (CURRENT_TIMESTAMP)", &[]),
            (
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
                &["$1", "$2", "$3", "$4"],
            ),
            ("UPDATE t SET d = now() WHERE id = $1", &["$1"]),
            ("UPDATE t SET d = pg_catalog.now() WHERE id = $1", &["$1"]),
            ("update t set d = NOW ( ) returning id, now()", &[]),
            (
                "CREATE TABLE e (id bigserial primary key, at timestamptz DEFAULT now())",
                &["bigserial"],
            ),
            (
                "ALTER TABLE e ALTER COLUMN at SET DEFAULT current_timestamp",
                &["SET DEFAULT"],
            ),
            (
                "alter table e add column c date default current_date",
                &["::date"],
            ),
            ("insert into t values ('now'::timestamptz)", &[]),
            ("insert into t values (timestamp 'now')", &["::timestamp"]),
            (
                "insert into t values (timestamp with time zone 'NOW')",
                &["::timestamp with time zone"],
            ),
            ("insert into t values (cast('today' as date))", &["::date"]),
            (
                "insert into t values (CURRENT_TIMESTAMP(3))",
                &["timestamptz(3)"],
            ),
            (
                "insert into t values (localtimestamp(2), localtime)",
                &["timestamp(2)", "::time)"],
            ),
            ("insert into t values (current_time(1))", &["timetz(1)"]),
            (
                "insert into t values (transaction_timestamp(), statement_timestamp())",
                &[],
            ),
            (
                "delete from t where at < now() - interval '1 day'",
                &["interval '1 day'"],
            ),
            (
                "insert into a values (1); -- keep me\nupdate b set x = now() where y = $1",
                &["-- keep me", "$1", "insert into a values (1);"],
            ),
            (
                "with x as (update t set d = now() returning *) insert into l select * from x",
                &[],
            ),
            (
                "insert into t values (1) on conflict (id) do update set d = now()",
                &[],
            ),
        ];
        for (sql, keep) in cases {
            let out = rewritten(sql);
            for k in *keep {
                assert!(out.contains(k), "{out} lacks {k}");
            }
            assert!(
                !out.to_ascii_lowercase().contains("current_timestamp"),
                "{out}"
            );
        }
    }

    #[test]
    fn exact_replacement_text() {
        assert_eq!(
            analyze_write("UPDATE t SET d = now() WHERE id = $1").rewritten,
            Some(format!("UPDATE t SET d = {NOW_EXPR} WHERE id = $1"))
        );
        assert_eq!(
            analyze_write("insert into t values (CURRENT_DATE)").rewritten,
            Some(format!("insert into t values ((({NOW_EXPR})::date))"))
        );
        assert_eq!(
            analyze_write("insert into t values ('now'::timestamptz)").rewritten,
            Some(format!("insert into t values (({NOW_EXPR})::timestamptz)"))
        );
    }

    #[test]
    fn passes_through_unchanged() {
        for sql in [
            "select 1",
            "insert into t values (1)",
            "INSERT INTO t VALUES ($1, 'now')",
            "update t set a = a + 1 where id = $1",
            "select pg_sleep(1)",
            "insert into t values (uuid_generate_v5(uuid_ns_url(), 'x'))",
            "insert into t values ('epoch'::timestamptz, 'today'::time)",
            "insert into t (x) values (myschema.now())",
            "select * from q for update skip locked",
            "create table t (a int)",
        ] {
            let a = analyze_write(sql);
            assert_eq!(a.rewritten, None, "{sql}");
            assert_eq!(a.refused, None, "{sql}");
        }
    }

    #[test]
    fn refuses_functions() {
        for name in VOLATILE_FUNCTIONS.iter().chain(SERVER_FUNCTIONS) {
            if !is_captured(name) {
                let sql = format!("insert into t (v) values ({name}())");
                let reason = refused(&sql);
                assert!(reason.contains(&format!("{name}()")), "{reason}");
            }
            let sql = format!("UPDATE t SET v = {}() WHERE id = $1", name.to_uppercase());
            if is_captured(name) {
                // Captured; the session allows it only for one row.
                let a = analyze_write(&sql);
                assert!(a.update_captures && a.refused.is_none(), "{sql}");
            } else {
                let reason = refused(&sql);
                assert!(reason.contains(&format!("{name}()")), "{reason}");
            }
        }
        let a = analyze_write("UPDATE t SET token = md5(random()::text)");
        assert_eq!(
            a.rewritten.as_deref(),
            Some("UPDATE t SET token = md5(reprise.captured(random())::text)")
        );
        assert!(a.update_captures);
        let reason = refused("UPDATE t SET v = 1 WHERE random() < 0.5");
        assert!(reason.contains("random()"), "{reason}");
        refused("UPDATE t SET v = (SELECT random()) WHERE id = 1");
        refused("insert into t select * from s order by random() limit 1");
        refused("insert into t values (public.uuid_generate_v4())");
        refused("insert into t select gen_random_uuid() from s");
        refused("insert into t values ((select random()))");
        refused("insert into t select * from (values (random())) v");
        refused("insert into t values (1) on conflict (id) do update set r = random()");
        // Something that looks like our own NOW_EXPR but is not.
        refused(
            "delete from t where d < coalesce(current_setting('reprise.now', true)::timestamptz, clock_timestamp())",
        );
        rewritten("UPDATE t SET d = now() WHERE id = $1; update u set e = CURRENT_DATE");
    }

    #[test]
    fn captures_volatile_values_in_insert_values() {
        for name in VOLATILE_FUNCTIONS.iter().filter(|n| is_captured(n)) {
            let sql = format!("insert into t (v) values ({name}())");
            let a = analyze_write(&sql);
            assert_eq!(a.refused, None, "{sql}");
            assert!(a.captures, "{sql}");
            assert_eq!(
                a.rewritten.as_deref(),
                Some(format!("insert into t (v) values (reprise.captured({name}()))").as_str())
            );
        }
        let a = analyze_write(
            "INSERT INTO t (a, b, c) VALUES ($1, md5(random()::text), now()), ($2, gen_random_uuid(), random_normal(0, 1))",
        );
        assert_eq!(a.refused, None);
        let out = a.rewritten.expect("rewritten");
        assert!(parses(&out), "{out}");
        assert!(
            out.contains("md5(reprise.captured(random())::text)"),
            "{out}"
        );
        assert!(out.contains("reprise.captured(gen_random_uuid())"), "{out}");
        assert!(
            out.contains("reprise.captured(random_normal(0, 1))"),
            "{out}"
        );
        assert!(out.contains("current_setting('reprise.now'"), "{out}");
        // Idempotent: a captured call is not captured again.
        let again = analyze_write(&out);
        assert_eq!((again.rewritten, again.refused), (None, None), "{out}");
        // The target list of a query whose rows come in a fixed order.
        for (sql, expected) in [
            (
                "insert into t (id, v) select gen_random_uuid(), g from generate_series(1, 9) g",
                "insert into t (id, v) select reprise.captured(gen_random_uuid()), g from generate_series(1, 9) g",
            ),
            (
                "insert into t (v) select round(random() * 100) from generate_series(1, $1)",
                "insert into t (v) select round(reprise.captured(random()) * 100) from generate_series(1, $1)",
            ),
            (
                "insert into t (v) select random()",
                "insert into t (v) select reprise.captured(random())",
            ),
        ] {
            let a = analyze_write(sql);
            assert_eq!(a.refused, None, "{sql}");
            assert_eq!(a.rewritten.as_deref(), Some(expected), "{sql}");
        }
        // Elsewhere in it, or rows in storage order, or regrouped.
        for sql in [
            "insert into t (v) select g from generate_series(1, 9) g where random() < 0.5",
            "insert into t (v) select random() from s",
            "insert into t (v) select distinct random() from generate_series(1, 9)",
            "insert into t (v) select (select random()) from generate_series(1, 9)",
        ] {
            assert!(analyze_write(sql).refused.is_some(), "{sql}");
        }
    }

    #[test]
    fn defaults_that_differ_are_reported_where_declared() {
        let declared = |sql: &str| analyze_write(sql).declared_defaults;
        assert_eq!(
            declared(
                "CREATE TABLE a (id int, u uuid DEFAULT gen_random_uuid()); \
                 CREATE TABLE b (id int DEFAULT 1); \
                 ALTER TABLE c ALTER COLUMN at SET DEFAULT clock_timestamp(); \
                 CREATE TABLE d (who text DEFAULT current_setting('app.who'))"
            ),
            ["a", "c", "d"]
        );
        assert!(declared("CREATE TABLE e (at timestamptz DEFAULT now())").is_empty());
        assert!(declared("INSERT INTO a (id, u) VALUES (1, gen_random_uuid())").is_empty());
    }

    #[test]
    fn sequence_numbers_in_storage_order_are_captured_or_refused() {
        for sql in [
            "ALTER TABLE t ADD COLUMN n serial",
            "ALTER TABLE t ADD COLUMN n bigint GENERATED ALWAYS AS IDENTITY",
            "ALTER TABLE t ADD COLUMN n bigint DEFAULT nextval('s')",
        ] {
            let refused = analyze_write(sql).refused;
            assert!(refused.is_some_and(|r| r.contains("ADD COLUMN")), "{sql}");
        }
        for sql in [
            "ALTER TABLE t ADD COLUMN n int DEFAULT 0",
            "ALTER TABLE t ALTER COLUMN n SET DEFAULT nextval('s')",
            "CREATE TABLE t (id serial)",
            "INSERT INTO t (n) VALUES (nextval('s'))",
        ] {
            let a = analyze_write(sql);
            assert_eq!((a.refused, a.captures), (None, false), "{sql}");
        }
        let a = analyze_write("UPDATE t SET n = nextval('s') WHERE v > 1");
        assert!(a.update_captures, "keyed by row, or refused without a key");
    }

    #[test]
    fn order_sensitive_aggregates_in_writes_need_an_order() {
        for sql in [
            "INSERT INTO s VALUES (1, (SELECT string_agg(name, ',') FROM u))",
            "UPDATE s SET names = (SELECT array_agg(id) FROM u)",
            "INSERT INTO s SELECT id, row_number() OVER () FROM u",
            "CREATE TABLE s AS SELECT id, lag(id) OVER (PARTITION BY g) FROM u",
            "INSERT INTO s SELECT g, jsonb_agg(x) OVER (PARTITION BY g) FROM u",
        ] {
            let refused = analyze_write(sql).refused;
            assert!(refused.is_some_and(|r| r.contains("ORDER BY")), "{sql}");
        }
        for sql in [
            "INSERT INTO s VALUES (1, (SELECT string_agg(name, ',' ORDER BY id) FROM u))",
            "INSERT INTO s SELECT id, row_number() OVER (ORDER BY id) FROM u",
            "INSERT INTO s SELECT g, count(*), sum(x) OVER () FROM u GROUP BY g",
            "INSERT INTO s SELECT id, rank() OVER w FROM u WINDOW w AS (ORDER BY id)",
            "SELECT string_agg(name, ',') FROM u",
        ] {
            assert_eq!(analyze_write(sql).refused, None, "{sql}");
        }
        let distinct = |sql: &str| {
            analyze_write(sql)
                .refused
                .is_some_and(|r| r.contains("DISTINCT"))
        };
        assert!(distinct("INSERT INTO s SELECT DISTINCT ON (g) g, v FROM u"));
        assert!(distinct(
            "INSERT INTO s SELECT DISTINCT ON (g) g, v FROM u ORDER BY g"
        ));
        assert!(!distinct(
            "INSERT INTO s SELECT DISTINCT ON (g) g, v FROM u ORDER BY g, id"
        ));
        assert!(!distinct("INSERT INTO s SELECT DISTINCT g, v FROM u"));
    }

    #[test]
    fn cached_sequences_are_refused() {
        for sql in [
            "CREATE SEQUENCE s CACHE 10",
            "ALTER SEQUENCE s CACHE 20",
            "CREATE TABLE t (id int GENERATED ALWAYS AS IDENTITY (CACHE 5))",
            "ALTER TABLE t ALTER COLUMN id SET CACHE 5",
        ] {
            let refused = analyze_write(sql).refused;
            assert!(refused.is_some_and(|r| r.contains("CACHE")), "{sql}");
        }
        for sql in [
            "CREATE SEQUENCE s CACHE 1",
            "CREATE SEQUENCE s INCREMENT 5",
            "ALTER SEQUENCE s RESTART",
        ] {
            assert_eq!(analyze_write(sql).refused, None, "{sql}");
        }
    }

    #[test]
    fn large_objects_need_an_oid_the_application_chose() {
        for sql in [
            "SELECT lo_create(0)",
            "SELECT lo_creat(-1)",
            "INSERT INTO t VALUES (1, lo_from_bytea(0, 'x'))",
            "INSERT INTO t VALUES (1, lo_from_bytea($1, 'x'))",
            "SELECT pg_catalog.lo_create('0'::oid)",
            "SELECT lo_import('/etc/hosts', 5000)",
        ] {
            let a = analyze_write(sql);
            assert!(a.refused.is_some_and(|r| r.contains("lo_")), "{sql}");
        }
        for sql in [
            "SELECT lo_create(424242)",
            "SELECT lo_create('424242'::oid)",
            "INSERT INTO t VALUES (1, lo_from_bytea(5000, 'x'))",
            "SELECT lo_unlink(5000)",
            "SELECT lo_put(5000, 0, 'y')",
        ] {
            assert_eq!(analyze_write(sql).refused, None, "{sql}");
        }
    }

    #[test]
    fn session_settings_in_writes_are_captured_or_refused() {
        let a = analyze_write("INSERT INTO t (a, b) VALUES (1, current_setting('app.user'))");
        assert_eq!(a.refused, None);
        let out = a.rewritten.expect("captured");
        assert!(
            out.contains("reprise.captured(current_setting('app.user'))"),
            "{out}"
        );
        let a = analyze_write("UPDATE t SET owner = current_setting('app.user') WHERE id = 1");
        assert!(a.update_captures, "{a:?}");
        let r = refused("DELETE FROM t WHERE owner = current_setting('app.user')");
        assert!(r.contains("current_setting"), "{r}");
        // Reprise's own settings, reads and stored defaults are left alone.
        for sql in [
            "DELETE FROM t WHERE d < current_setting('reprise.now', true)::timestamptz",
            "SELECT current_setting('app.user')",
            "CREATE TABLE t (owner text DEFAULT current_setting('app.user'))",
        ] {
            let a = analyze_write(sql);
            assert_eq!((a.refused, a.rewritten), (None, None), "{sql}");
        }
    }

    #[test]
    fn limits_without_order_in_writes_are_refused() {
        for sql in [
            "DELETE FROM t WHERE id IN (SELECT id FROM t WHERE done LIMIT 100)",
            "UPDATE t SET a = 1 WHERE id = (SELECT id FROM t OFFSET 3 LIMIT 1)",
            "INSERT INTO t SELECT * FROM s LIMIT 10",
            "INSERT INTO t SELECT * FROM s FETCH FIRST 2 ROWS ONLY",
            "CREATE TABLE t2 AS SELECT * FROM s LIMIT 5",
            "DELETE FROM t WHERE EXISTS (SELECT 1 FROM s WHERE s.id IN (SELECT id FROM u LIMIT 1))",
        ] {
            let r = refused(sql);
            assert!(r.contains("ORDER BY"), "{sql}: {r}");
        }
        for sql in [
            "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY id LIMIT 100)",
            "DELETE FROM t WHERE EXISTS (SELECT 1 FROM s WHERE s.id = t.id LIMIT 1)",
            "SELECT * FROM t LIMIT 1",
        ] {
            let a = analyze_write(sql);
            assert_eq!((a.refused, a.rewritten), (None, None), "{sql}");
        }
    }

    #[test]
    fn refuses_other_constructs() {
        let r = refused("delete from t where ctid in (select ctid from t order by id limit 10)");
        assert!(r.contains("ctid"), "{r}");
        let r = refused("update t set a = 1 where t.xmin = 5");
        assert!(r.contains("xmin"), "{r}");
        refused("insert into t select * from s tablesample system (10)");
        let r = refused(
            "delete from q where id = (select id from q order by id for update skip locked limit 1)",
        );
        assert!(r.contains("SKIP LOCKED"), "{r}");
        refused(
            "with j as (select id from q for update skip locked limit 1) update q set done = true from j where q.id = j.id",
        );
        // A stored default is not evaluated by the DDL: allowed (the
        // inserts that use it capture its value).
        for sql in [
            "CREATE TABLE t (id uuid DEFAULT gen_random_uuid() PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())",
            "alter table t alter column id set default gen_random_uuid()",
        ] {
            let a = analyze_write(sql);
            assert_eq!((a.refused, a.rewritten), (None, None), "{sql}");
        }
        // Evaluated for existing rows, or at every write: refused.
        let r = refused("alter table t add column u uuid DEFAULT gen_random_uuid()");
        assert!(
            r.contains("DEFAULT") && r.contains("gen_random_uuid()"),
            "{r}"
        );
        let r = refused("CREATE TABLE t (x float8 CHECK (x < random()))");
        assert!(r.contains("random()"), "{r}");
        refused("CREATE TABLE t (id bigint DEFAULT txid_current())");
        refused("create table t (a float check (a < random()))");
    }

    #[test]
    fn one_servers_state_is_refused_in_writes() {
        for sql in [
            "insert into t values (1, pg_database_size('app'))",
            "update t set n = pg_relation_size('t') where id = 1",
            "insert into t select 1, pg_stat_get_live_tuples('t'::regclass)",
            "insert into t values (1, inet_client_addr())",
            "insert into t values (1, pg_current_wal_lsn())",
        ] {
            let r = refused(sql);
            assert!(r.contains("belongs to one server"), "{sql}: {r}");
        }
        for (sql, view) in [
            (
                "insert into t select count(*) from pg_stat_activity",
                "pg_stat_activity",
            ),
            (
                "insert into t select n_live_tup from pg_catalog.pg_stat_user_tables",
                "pg_stat_user_tables",
            ),
            (
                "update t set n = (select count(*) from pg_locks)",
                "pg_locks",
            ),
            (
                "insert into t select setting from pg_settings where name = 'port'",
                "pg_settings",
            ),
        ] {
            let r = refused(sql);
            assert!(r.contains(view) && r.contains("one server"), "{sql}: {r}");
        }
        // Read on their own, or a table of the application's that happens
        // to share a name in another schema: not refused.
        for sql in [
            "select count(*) from pg_stat_activity",
            "insert into app.pg_settings select 1",
            "insert into t select 1 from my_stats",
        ] {
            assert!(analyze_write(sql).refused.is_none(), "{sql}");
        }
    }

    #[test]
    fn age_of_one_argument_counts_from_the_primarys_date() {
        let date = Svf::CurrentDate.replacement(None);
        assert_eq!(
            rewritten("update p set years = extract(year from age(born)) where id = 1"),
            format!("update p set years = extract(year from age({date}, born)) where id = 1")
        );
        assert_eq!(
            rewritten("insert into p values (AGE(now()))"),
            format!("insert into p values (AGE({date}, {NOW_EXPR}))")
        );
        // Two arguments: the application gave both dates.
        let a = analyze_write("update p set a = age('2020-01-01', born)");
        assert_eq!((a.refused, a.rewritten), (None, None));
    }

    #[test]
    fn function_bodies() {
        let r = refused(
            "CREATE FUNCTION f() RETURNS timestamptz LANGUAGE plpgsql AS $$ BEGIN RETURN clock_timestamp(); END $$",
        );
        assert!(
            r.contains("clock_timestamp()") && r.contains("function"),
            "{r}"
        );
        refused("create procedure p() language sql as 'insert into t values (random())'");
        refused("do $$ begin insert into t values (gen_random_uuid()); end $$");
        refused(
            "create function f() returns int language plpython3u as $$ import random; return random.random() $$",
        );
        // A comment or string mentioning the name is fine.
        assert_eq!(
            analyze_write(
                "create function f() returns text language sql as $$ select 'random()' -- random()\n$$"
            )
            .refused,
            None
        );

        let out = rewritten(
            "CREATE OR REPLACE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n  NEW.mtime := now();\n  NEW.d := CURRENT_DATE;\n  NEW.s := 'now'::timestamptz;\n  RETURN NEW;\nEND\n$$",
        );
        assert!(out.contains("$reprise$"), "{out}");
        assert!(!out.contains("now();"), "{out}");
        let out =
            rewritten("create function f() returns timestamptz language sql as 'select now()'");
        assert!(out.contains("$reprise$select COALESCE("), "{out}");
        rewritten("create function f() returns timestamptz begin atomic select now(); end");
        rewritten(
            "create function f(t timestamptz default now()) returns int language sql as 'select 1'",
        );
        rewritten("do $$ begin update t set d = current_timestamp; end $$");
        // No time function: text unchanged.
        assert_eq!(
            analyze_write("create function f() returns int language sql as $$ select 1 $$"),
            WriteAnalysis::default()
        );
        // C functions are not looked into.
        assert_eq!(
            analyze_write("create function f() returns int language c as 'random', 'random' "),
            WriteAnalysis::default()
        );
    }

    #[test]
    fn insert_select_targets_and_nextval() {
        assert_eq!(
            analyze_write("insert into t (a) select x from s").insert_select_targets,
            vec!["t".to_string()]
        );
        assert_eq!(
            analyze_write("insert into public.t select * from s where a = $1")
                .insert_select_targets,
            vec!["public.t".to_string()]
        );
        assert_eq!(
            analyze_write("insert into t select 1 union all select 2").insert_select_targets,
            vec!["t".to_string()]
        );
        assert!(
            analyze_write("insert into t values (1)")
                .insert_select_targets
                .is_empty()
        );
        assert!(
            analyze_write("insert into t default values")
                .insert_select_targets
                .is_empty()
        );
        let a = analyze_write("insert into t values (nextval('s'))");
        assert!(a.uses_nextval);
        assert_eq!(a.rewritten, None);
        assert!(analyze_write("select setval('s', 5)").uses_nextval);
        assert!(!analyze_write("insert into t values (1)").uses_nextval);
    }

    #[test]
    fn unparsable_is_default() {
        for sql in [
            "",
            "insert into",
            "update t set d = now( where",
            "\0",
            "select $$",
        ] {
            assert_eq!(analyze_write(sql), WriteAnalysis::default(), "{sql:?}");
        }
    }

    #[test]
    fn deep_nesting_is_checked_crudely() {
        let nest = |inner: &str| {
            format!(
                "insert into t values ({}{inner}{})",
                "abs(".repeat(200),
                ")".repeat(200)
            )
        };
        assert!(matches!(
            pg_query::parse(&nest("1"), 0),
            Err(pg_query::Error::Decode(_))
        ));
        assert_eq!(analyze_write(&nest("1")), WriteAnalysis::default());
        // Never passed through as is.
        let a = analyze_write(&nest("now()"));
        assert!(a.rewritten.is_some() || a.refused.is_some());
        assert!(analyze_write(&nest("random()")).refused.is_some());
        // Parentheses are not nodes: deeply parenthesised text is analysed.
        let parens = format!(
            "insert into t values ({}now(){})",
            "(".repeat(300),
            ")".repeat(300)
        );
        assert!(analyze_write(&parens).rewritten.is_some());
    }

    #[test]
    fn no_panic_on_garbage() {
        let fragments = [
            "insert into t values (",
            "now()",
            "CURRENT_TIMESTAMP(",
            "'now'::",
            "timestamp 'now'",
            "$$",
            "$1",
            ")",
            "select ctid from",
            "create function f() returns int language plpgsql as $$",
            "begin",
            "end",
            ";",
            "'",
            "\"",
            "--",
            "/*",
            "*/",
            "é",
            "日本",
            "random()",
            "update t set a =",
            "where",
            "tablesample",
            "E'\\\\'",
            "U&'\\0041'",
            "do $x$",
            "$x$",
            "(",
            "::timestamptz",
            "current_date",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let n = next() % 8;
            let mut sql = String::new();
            for _ in 0..n {
                if next() % 5 == 0 {
                    let len = next() % 12;
                    for _ in 0..len {
                        let c = char::from_u32((next() % 0x3000) as u32).unwrap_or('x');
                        sql.push(c);
                    }
                } else {
                    sql.push_str(fragments[(next() as usize) % fragments.len()]);
                }
                sql.push(' ');
            }
            let a = analyze_write(&sql);
            let unfiltered =
                panic::catch_unwind(AssertUnwindSafe(|| analyze(&sql))).unwrap_or_default();
            assert_eq!(a, unfiltered, "{sql:?}");
            if let Some(out) = &a.rewritten {
                assert!(parses(out), "{sql:?} -> {out:?}");
            }
        }
    }
}
