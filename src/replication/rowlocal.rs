//! Row-local statements: writes whose effect PostgreSQL's own row locks
//! already order correctly, so they need the group's write lock only in
//! shared mode (DESIGN.md, "The write path", step 2).
//!
//! A statement is row-local when it is one of:
//! - `INSERT INTO t … VALUES (…)` of parameters, constants and pure
//!   expressions, into a table without sequence/identity defaults or
//!   triggers, with no `ON CONFLICT`;
//! - `UPDATE t SET c = <pure expression of t's columns and parameters>
//!   WHERE <equalities fixing a unique key> [AND pure conditions]`, setting
//!   no unique-key column, on a table without triggers;
//! - `DELETE FROM t WHERE <equalities fixing a unique key> …`.
//!
//! Anything else — or any doubt (unknown table, ambiguous name, catalog not
//! loaded) — is not row-local and takes the lock exclusively.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// What row-locality needs to know about a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Column sets of unique indexes (no predicate, no expressions).
    pub uniques: Vec<Vec<String>>,
    /// A unique column set without NULLs (the primary key, or a unique
    /// index over NOT NULL columns): it names each row.
    pub row_key: Option<Vec<String>>,
    /// A column defaults to `nextval` or is an identity column.
    pub sequence_default: bool,
    /// The table has user triggers.
    pub triggers: bool,
    /// A row trigger of the table takes sequence values, or writes a table
    /// that does (its function's text names one): it numbers the rows in
    /// the order a statement visits them.
    pub numbering_triggers: bool,
    /// Columns whose default the copies would compute differently
    /// (a volatile function, or a time function not rewritten to the
    /// primary's timestamp): (column, default expression).
    pub volatile_defaults: Vec<(String, String)>,
    /// The place (from 1) of each of those columns among the table's
    /// columns, where the catalog gave it: an INSERT without a column list
    /// gives its values in that order.
    pub default_positions: Vec<(String, usize)>,
}

impl TableInfo {
    /// The index among the table's columns of a column with a default,
    /// where the catalog gave its place (an INSERT without a column list
    /// gives its values in that order).
    pub fn index_of(&self, column: &str) -> Option<usize> {
        let (_, place) = self.default_positions.iter().find(|(c, _)| c == column)?;
        place.checked_sub(1)
    }

    /// A column an INSERT cannot name: one of the table under a view that
    /// the view does not show (its place is 0).
    pub fn hidden(&self, column: &str) -> bool {
        self.default_positions
            .iter()
            .any(|(c, place)| c == column && *place == 0)
    }
}

/// A row of [`RelCatalog::LOAD_SQL`].
pub type CatalogRow = (String, String, String, bool, bool, String, bool);

/// Tables by name, as loaded from the primary's catalog.
#[derive(Debug, Clone, Default)]
pub struct RelCatalog {
    tables: HashMap<String, Vec<(String, TableInfo)>>,
    /// Some table has [`TableInfo::numbering_triggers`].
    numbering_triggers: bool,
}

impl RelCatalog {
    /// Rows: schema, table, unique column lists (`a,b;c`, a list starting
    /// with `*` has no NULLs: a row key), sequence default, triggers, column
    /// defaults (see [`RelCatalog::from_full_rows`]), numbering row triggers.
    pub const LOAD_SQL: &'static str = "SELECT n.nspname::text, c.relname::text, \
        coalesce((SELECT string_agg(CASE WHEN i.indisprimary OR NOT EXISTS (SELECT 1 FROM unnest(i.indkey) k \
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k WHERE NOT a.attnotnull) \
                  THEN '*' ELSE '' END \
              || (SELECT string_agg(a.attname::text, ',' ORDER BY a.attname) \
              FROM unnest(i.indkey) k JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k), ';') \
          FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique AND i.indpred IS NULL \
          AND i.indexprs IS NULL), ''), \
        EXISTS (SELECT 1 FROM pg_attrdef d WHERE d.adrelid = c.oid \
                AND pg_get_expr(d.adbin, d.adrelid) LIKE '%nextval(%') \
          OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attidentity <> ''), \
        EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal), \
        coalesce((SELECT string_agg(a.attname::text || chr(31) \
              || CASE WHEN EXISTS (SELECT 1 FROM pg_depend dep JOIN pg_proc p ON p.oid = dep.refobjid \
                          WHERE dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid \
                          AND dep.refclassid = 'pg_proc'::regclass AND p.provolatile = 'v') \
                      THEN '!' ELSE '' END \
              || pg_get_expr(d.adbin, d.adrelid) || chr(31) \
              || (SELECT count(*) FROM pg_attribute b WHERE b.attrelid = c.oid AND b.attnum > 0 \
                  AND b.attnum <= a.attnum AND NOT b.attisdropped), chr(30)) \
          FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum \
          WHERE d.adrelid = c.oid AND NOT a.attisdropped \
          AND pg_get_expr(d.adbin, d.adrelid) NOT LIKE '%nextval(%'), ''), \
        EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
          WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND (t.tgtype & 1) = 1 \
          AND (p.prosrc ~* '\\m(nextval|setval|currval|lastval)\\M' \
            OR EXISTS (SELECT 1 FROM pg_class s JOIN pg_attribute a ON a.attrelid = s.oid \
              LEFT JOIN pg_attrdef d ON d.adrelid = s.oid AND d.adnum = a.attnum \
              WHERE s.relkind IN ('r', 'p') AND NOT a.attisdropped \
              AND (a.attidentity <> '' OR pg_get_expr(d.adbin, d.adrelid) LIKE '%nextval(%') \
              AND p.prosrc ~* ('\\m' || s.relname || '\\M')))) \
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE c.relkind IN ('r', 'p') \
        AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'reprise') \
        AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast%'";

    /// Rows of the same shape for views: an INSERT into an auto-updatable
    /// view fills the columns it leaves out with the view's own default or
    /// else the default of the one table under it (a column of the same
    /// name). Columns of that table the view does not show get place 0:
    /// an INSERT through the view cannot name them.
    pub const VIEWS_SQL: &'static str = "SELECT n.nspname::text, v.relname::text, '', \
        EXISTS (SELECT 1 FROM pg_attribute ba LEFT JOIN pg_attrdef bd \
                  ON bd.adrelid = ba.attrelid AND bd.adnum = ba.attnum \
                WHERE ba.attrelid = b.oid AND NOT ba.attisdropped AND ba.attnum > 0 \
                AND (ba.attidentity <> '' OR pg_get_expr(bd.adbin, bd.adrelid) LIKE '%nextval(%')), \
        EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid IN (v.oid, b.oid) AND NOT t.tgisinternal), \
        coalesce((SELECT string_agg(x.attname::text || chr(31) \
              || CASE WHEN EXISTS (SELECT 1 FROM pg_depend dep JOIN pg_proc p ON p.oid = dep.refobjid \
                          WHERE dep.classid = 'pg_attrdef'::regclass AND dep.objid = x.doid \
                          AND dep.refclassid = 'pg_proc'::regclass AND p.provolatile = 'v') \
                      THEN '!' ELSE '' END \
              || x.expr || chr(31) || x.place, chr(30)) \
          FROM (SELECT a.attname, coalesce(vd.oid, bd.oid) AS doid, \
                  coalesce(pg_get_expr(vd.adbin, vd.adrelid), pg_get_expr(bd.adbin, bd.adrelid)) AS expr, \
                  (SELECT count(*) FROM pg_attribute c WHERE c.attrelid = v.oid AND c.attnum > 0 \
                   AND c.attnum <= a.attnum AND NOT c.attisdropped) AS place \
                FROM pg_attribute a \
                LEFT JOIN pg_attrdef vd ON vd.adrelid = v.oid AND vd.adnum = a.attnum \
                LEFT JOIN pg_attribute ba ON ba.attrelid = b.oid AND ba.attname = a.attname \
                  AND NOT ba.attisdropped \
                LEFT JOIN pg_attrdef bd ON bd.adrelid = b.oid AND bd.adnum = ba.attnum \
                WHERE a.attrelid = v.oid AND a.attnum > 0 AND NOT a.attisdropped \
                UNION ALL \
                SELECT ba.attname, bd.oid, pg_get_expr(bd.adbin, bd.adrelid), 0 \
                FROM pg_attribute ba JOIN pg_attrdef bd ON bd.adrelid = b.oid AND bd.adnum = ba.attnum \
                WHERE ba.attrelid = b.oid AND NOT ba.attisdropped AND NOT EXISTS \
                  (SELECT 1 FROM pg_attribute a WHERE a.attrelid = v.oid AND a.attname = ba.attname)) x \
          WHERE x.expr IS NOT NULL AND x.expr NOT LIKE '%nextval(%'), ''), \
        false \
        FROM pg_class v JOIN pg_namespace n ON n.oid = v.relnamespace \
        CROSS JOIN LATERAL (SELECT CASE WHEN count(DISTINCT d.refobjid) = 1 THEN min(d.refobjid) END AS oid \
          FROM pg_rewrite r JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid \
          JOIN pg_class t ON t.oid = d.refobjid AND t.relkind IN ('r', 'p') \
          WHERE r.ev_class = v.oid) b \
        WHERE v.relkind = 'v' \
        AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'reprise') \
        AND n.nspname NOT LIKE 'pg_temp%'";

    pub fn from_rows<I: IntoIterator<Item = (String, String, String, bool, bool)>>(
        rows: I,
    ) -> RelCatalog {
        Self::from_full_rows(
            rows.into_iter()
                .map(|(s, n, u, q, t)| (s, n, u, q, t, String::new(), false)),
        )
    }

    /// Rows of [`RelCatalog::LOAD_SQL`], with the column defaults
    /// (`column` US `expression` [US `place among the columns`], RS
    /// between columns; the expression starts
    /// with `!` when it calls a volatile user function), and whether row
    /// triggers number rows. Only the defaults the copies would compute
    /// differently are kept.
    pub fn from_full_rows<I: IntoIterator<Item = CatalogRow>>(rows: I) -> RelCatalog {
        let mut tables: HashMap<String, Vec<(String, TableInfo)>> = HashMap::new();
        for (schema, name, uniques, sequence_default, triggers, defaults, numbering_triggers) in
            rows
        {
            let mut default_positions = Vec::new();
            let volatile_defaults = defaults
                .split('\u{1e}')
                .filter_map(|d| {
                    let mut parts = d.split('\u{1f}');
                    let (c, e) = (parts.next()?, parts.next()?);
                    if let Some(at) = parts.next().and_then(|p| p.parse::<usize>().ok()) {
                        default_positions.push((c.to_string(), at));
                    }
                    match e.strip_prefix('!') {
                        Some(e) => Some((c.to_string(), e.to_string())),
                        None => super::determinism::default_differs(e)
                            .then(|| (c.to_string(), e.to_string())),
                    }
                })
                .collect();
            let mut row_key: Option<Vec<String>> = None;
            let uniques = uniques
                .split(';')
                .filter(|u| !u.is_empty())
                .map(|u| {
                    let cols: Vec<String> = u
                        .trim_start_matches('*')
                        .split(',')
                        .map(str::to_string)
                        .collect();
                    if u.starts_with('*') && row_key.is_none() {
                        row_key = Some(cols.clone());
                    }
                    cols
                })
                .collect();
            tables.entry(name).or_default().push((
                schema,
                TableInfo {
                    uniques,
                    row_key,
                    sequence_default,
                    triggers,
                    numbering_triggers,
                    volatile_defaults,
                    default_positions,
                },
            ));
        }
        let numbering_triggers = tables
            .values()
            .flatten()
            .any(|(_, info)| info.numbering_triggers);
        RelCatalog {
            tables,
            numbering_triggers,
        }
    }

    /// Whether some table has row triggers that number rows.
    pub fn has_numbering_triggers(&self) -> bool {
        self.numbering_triggers
    }

    /// The table a statement names; None when unknown or ambiguous.
    pub fn lookup(&self, schema: &str, name: &str) -> Option<&TableInfo> {
        let candidates = self.tables.get(name)?;
        if schema.is_empty() {
            match candidates.as_slice() {
                [(_, info)] => Some(info),
                _ => None,
            }
        } else {
            candidates.iter().find(|(s, _)| s == schema).map(|(_, i)| i)
        }
    }
}

/// The statements a parsed statement (`node`, as `{"InsertStmt": …}`)
/// runs, by kind: itself, the query of a PREPARE, EXPLAIN or COPY, and its
/// data-modifying WITH queries at any depth. `nested` is true for the WITH
/// queries: they run beside the statement that holds them.
pub(crate) fn statements_run(node: &Value) -> Vec<Run<'_>> {
    fn walk<'a>(node: &'a Value, nested: bool, out: &mut Vec<Run<'a>>) {
        let Some((kind, s)) = node.as_object().and_then(|o| o.iter().next()) else {
            return;
        };
        match kind.as_str() {
            "PrepareStmt" | "ExplainStmt" => walk(&s["query"]["node"], nested, out),
            "CopyStmt" if s["query"].is_object() => walk(&s["query"]["node"], nested, out),
            _ => out.push(Run {
                kind,
                stmt: s,
                nested,
            }),
        }
        let with_clauses = [
            &s["with_clause"],
            &s["select_stmt"]["node"]["SelectStmt"]["with_clause"],
        ];
        for cte in with_clauses
            .into_iter()
            .filter_map(|w| w["ctes"].as_array())
            .flatten()
        {
            walk(
                &cte["node"]["CommonTableExpr"]["ctequery"]["node"],
                true,
                out,
            );
        }
    }
    let mut out = Vec::new();
    walk(node, false, &mut out);
    out
}

/// One statement of [`statements_run`].
pub(crate) struct Run<'a> {
    /// The node's kind, e.g. `InsertStmt`.
    pub kind: &'a str,
    pub stmt: &'a Value,
    pub nested: bool,
}

/// An `INSERT … VALUES` (or `DEFAULT VALUES`) that leaves columns with
/// volatile defaults to those defaults, rewritten to give them the default
/// expression wrapped in `reprise.captured` (row capture: the primary's
/// values are replayed). Without a column list, the values are the
/// table's first columns: a VALUES row is given the columns up to the last
/// volatile-default one, a query the captured defaults when they are the
/// columns right after its own. Ok(None) when nothing needs it; Err(reason)
/// when such a write cannot be rewritten (a query in no fixed order, a
/// query followed by a column it cannot give its default, `*`, COPY): it
/// is refused as before. Sets `unknown` as
/// [`volatile_default_use`] does.
pub fn capture_volatile_defaults(
    sql: &str,
    catalog: &RelCatalog,
    unknown: &mut bool,
) -> Result<Option<String>, String> {
    use super::determinism::{Edit, apply_edits, captured_call, parses, scan};
    use pg_query::protobuf::Token;
    let Some(reason) = volatile_default_use(sql, catalog, unknown) else {
        return Ok(None);
    };
    let Some(parsed) = crate::route::parsed::tree(sql) else {
        return Err(reason);
    };
    let tree = parsed.json().ok_or_else(|| reason.clone())?;
    let tokens = scan(sql).ok_or_else(|| reason.clone())?;
    let is = |i: usize, t: Token| tokens.get(i).is_some_and(|k| k.token == t as i32);
    let token_at = |loc: i64| {
        let loc = i32::try_from(loc).ok()?;
        tokens.binary_search_by_key(&loc, |t| t.start).ok()
    };
    let quote = super::quoted_ident;
    let captured = |e: &str| captured_call(&format!("({e})"));
    let mut edits: Vec<Edit> = Vec::new();
    let stmts = tree["stmts"].as_array().ok_or_else(|| reason.clone())?;
    let inserts = stmts.iter().enumerate().flat_map(|(k, stmt)| {
        statements_run(&stmt["stmt"]["node"])
            .into_iter()
            .filter(|run| run.kind == "InsertStmt")
            .map(move |run| (k, run))
    });
    // The INSERTs that capture values (their statement's index, whether
    // nested): values are replayed in the order they were taken, which is
    // plain unless a WITH query takes some beside other statements.
    let mut capturing: Vec<(usize, bool)> = Vec::new();
    for (k, run) in inserts {
        let ins = run.stmt;
        let rel = &ins["relation"];
        let schema = rel["schemaname"].as_str().unwrap_or("");
        let name = rel["relname"].as_str().unwrap_or("");
        let Some(info) = catalog.lookup(schema, name) else {
            continue;
        };
        if info.volatile_defaults.is_empty() {
            continue;
        }
        let before = edits.len();
        let cols: Vec<(String, i64)> = ins["cols"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| {
                        let t = &c["node"]["ResTarget"];
                        Some((t["name"].as_str()?.to_string(), t["location"].as_i64()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let select = &ins["select_stmt"]["node"];
        // A DEFAULT item given the default's captured expression.
        let default_edit = |d: &Value, expr: &str| -> Result<Edit, String> {
            let t = token_at(d["location"].as_i64().unwrap_or(-1)).ok_or_else(|| reason.clone())?;
            Ok(Edit {
                start: tokens[t].start as usize,
                end: tokens[t].end as usize,
                text: captured(expr),
            })
        };
        'edits: {
            if select.is_null() {
                // DEFAULT VALUES, after the table's name: name every
                // volatile-default column.
                let start = rel["location"].as_i64().unwrap_or(0) as usize;
                let first = tokens.partition_point(|t| (t.start as usize) < start);
                let at = (first..tokens.len().saturating_sub(1))
                    .find(|&i| is(i, Token::Default) && is(i + 1, Token::Values))
                    .ok_or_else(|| reason.clone())?;
                let names: Vec<String> = info
                    .volatile_defaults
                    .iter()
                    .map(|(c, _)| quote(c))
                    .collect();
                let exprs: Vec<String> = info
                    .volatile_defaults
                    .iter()
                    .map(|(_, e)| captured(e))
                    .collect();
                edits.push(Edit {
                    start: tokens[at].start as usize,
                    end: tokens[at + 1].end as usize,
                    text: format!("({}) VALUES ({})", names.join(", "), exprs.join(", ")),
                });
                break 'edits;
            }
            let rows = select["SelectStmt"]["values_lists"]
                .as_array()
                .filter(|r| !r.is_empty());
            let sel = &select["SelectStmt"];
            let query =
                rows.is_none() && !sel.is_null() && (fixed_order(sel) || total_order(sel, catalog));
            // Where the query's target list ends in the text.
            let targets_end = || {
                let last = sel["target_list"].as_array()?.last()?;
                let first = token_at(last["node"]["ResTarget"]["location"].as_i64()?)?;
                target_list_end(&tokens, first)
            };
            if cols.is_empty() {
                // Values in the table's column order. Each volatile-default
                // column by its index among them.
                let places: Vec<(usize, &str)> = info
                    .volatile_defaults
                    .iter()
                    .map(|(c, e)| Some((info.index_of(c)?, e.as_str())))
                    .collect::<Option<_>>()
                    .ok_or_else(|| reason.clone())?;
                let last = places.iter().map(|(at, _)| *at).max().unwrap_or(0);
                // What a row of `width` values gets after its last: each
                // column up to the last volatile-default one, its default
                // captured or (`fill`) left to the default.
                let rest = |width: usize, fill: Option<&str>| -> Option<String> {
                    let items = (width..=last)
                        .map(|at| match places.iter().find(|(p, _)| *p == at) {
                            Some((_, e)) => Some(captured(e)),
                            None => fill.map(str::to_string),
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Some(format!(", {}", items.join(", ")))
                };
                let Some(rows) = rows else {
                    // A query: its target list is given the captured
                    // defaults after its own columns, when they follow them
                    // (a column between would need its own default).
                    let width = Given::of(run.kind, ins).and_then(|g| g.first()?.width);
                    let Some(width) = width.filter(|w| query && *w <= last) else {
                        return Err(reason);
                    };
                    let end = targets_end().ok_or_else(|| reason.clone())?;
                    edits.push(Edit::insert(
                        end,
                        rest(width, None).ok_or_else(|| reason.clone())?,
                    ));
                    break 'edits;
                };
                // VALUES rows: each DEFAULT item is captured where it stands;
                // a row that ends before a volatile-default column is given
                // the columns up to it (DEFAULT for the others, as if left out).
                let from = rel["location"].as_i64().unwrap_or(0) as usize;
                let from = tokens.partition_point(|t| (t.start as usize) < from);
                for (close, items) in
                    values_rows(&tokens, from, rows).ok_or_else(|| reason.clone())?
                {
                    for (at, expr) in &places {
                        if let Some(d) = items.get(*at).and_then(|i| i["node"].get("SetToDefault"))
                        {
                            edits.push(default_edit(d, expr)?);
                        }
                    }
                    if items.len() <= last {
                        let text = rest(items.len(), Some("DEFAULT")).expect("filled");
                        edits.push(Edit::insert(tokens[close].start as usize, text));
                    }
                }
                break 'edits;
            }
            if !(rows.is_some() || query) {
                return Err(reason);
            }
            // Columns left out of the list, and DEFAULT items of listed ones.
            let missing: Vec<&(String, String)> = info
                .volatile_defaults
                .iter()
                .filter(|(c, _)| !cols.iter().any(|(n, _)| n == c))
                .collect();
            if missing.iter().any(|(c, _)| info.hidden(c)) {
                // A column of the table under a view that the view does not show.
                return Err(reason);
            }
            let close_cols = {
                let last =
                    token_at(cols.last().expect("not empty").1).ok_or_else(|| reason.clone())?;
                (last..tokens.len())
                    .find(|&i| is(i, Token::Ascii41))
                    .ok_or_else(|| reason.clone())?
            };
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(|(c, _)| quote(c)).collect();
                let at = tokens[close_cols].start as usize;
                edits.push(Edit::insert(at, format!(", {}", names.join(", "))));
            }
            let Some(rows) = rows else {
                if missing.is_empty() {
                    break 'edits;
                }
                // A query whose rows come in the same order on every copy
                // (the copies replay the captured values in that order):
                // the defaults' expressions after its target list, which
                // PostgreSQL evaluates after any sort (they are volatile).
                let end = targets_end().ok_or_else(|| reason.clone())?;
                let exprs: Vec<String> = missing.iter().map(|(_, e)| captured(e)).collect();
                edits.push(Edit::insert(end, format!(", {}", exprs.join(", "))));
                break 'edits;
            };
            for (close, items) in
                values_rows(&tokens, close_cols, rows).ok_or_else(|| reason.clone())?
            {
                for (k, item) in items.iter().enumerate() {
                    let Some(d) = item["node"].get("SetToDefault") else {
                        continue;
                    };
                    if let Some((_, expr)) = cols
                        .get(k)
                        .and_then(|(c, _)| info.volatile_defaults.iter().find(|(v, _)| v == c))
                    {
                        edits.push(default_edit(d, expr)?);
                    }
                }
                if !missing.is_empty() {
                    let exprs: Vec<String> = missing.iter().map(|(_, e)| captured(e)).collect();
                    let at = tokens[close].start as usize;
                    edits.push(Edit::insert(at, format!(", {}", exprs.join(", "))));
                }
            }
        }
        if edits.len() > before {
            capturing.push((k, run.nested));
        }
    }
    let beside_others = |&(k, nested): &(usize, bool)| {
        let stmt = &stmts[k];
        let start = stmt["stmt_location"].as_u64().unwrap_or(0) as usize;
        let end = match stmt["stmt_len"].as_u64().unwrap_or(0) as usize {
            0 => sql.len(),
            len => start + len,
        };
        let text = sql.get(start..end).unwrap_or(sql);
        nested
            && (capturing.iter().filter(|(j, _)| *j == k).count() > 1
                || text.contains(captured_call("").trim_end_matches(')')))
    };
    if capturing.iter().any(beside_others) {
        return Err(format!(
            "{reason}, in a WITH query beside other values to capture, which the copies \
             could compute in another order; run that INSERT as a statement of its own"
        ));
    }
    match apply_edits(sql, edits) {
        Some(text) if text != sql && parses(&text) => Ok(Some(text)),
        _ => Err(reason),
    }
}

/// The rows of an INSERT's VALUES list, found in the text from the first
/// VALUES token at or after token `from`: the token index of each row's
/// closing parenthesis, and the row's items. None when the text does not
/// match the tree.
fn values_rows<'v>(
    tokens: &[pg_query::protobuf::ScanToken],
    from: usize,
    rows: &'v [Value],
) -> Option<Vec<(usize, &'v [Value])>> {
    use pg_query::protobuf::Token;
    let is = |i: usize, t: Token| tokens.get(i).is_some_and(|k| k.token == t as i32);
    let mut i = (from..tokens.len()).find(|&i| is(i, Token::Values))? + 1;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if !is(i, Token::Ascii40) {
            return None;
        }
        let close = super::determinism::matching_paren(tokens, i)?;
        let items = row["node"]["List"]["items"].as_array();
        out.push((close, items.map_or(&[][..], Vec::as_slice)));
        i = close + 1;
        if is(i, Token::Ascii44) {
            i += 1;
        }
    }
    Some(out)
}

/// The tables (unqualified names) that the INSERT, UPDATE and COPY FROM
/// statements of `sql` write, in WITH queries and PREPAREs too.
pub fn written_tables(sql: &str) -> Vec<String> {
    let Some(parsed) = crate::route::parsed::tree(sql) else {
        return Vec::new();
    };
    let Some(tree) = parsed.json() else {
        return Vec::new();
    };
    let stmts = tree["stmts"].as_array().cloned().unwrap_or_default();
    stmts
        .iter()
        .flat_map(|stmt| statements_run(&stmt["stmt"]["node"]))
        .filter(|run| match run.kind {
            "InsertStmt" | "UpdateStmt" => true,
            "CopyStmt" => run.stmt["is_from"] == true,
            _ => false,
        })
        .filter_map(|run| run.stmt["relation"]["relname"].as_str().map(str::to_string))
        .collect()
}

/// What numbers rows in the order a write visits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbering {
    /// The target's sequence or identity default (an `INSERT … SELECT`).
    Sequence,
    /// Row triggers of the target ([`TableInfo::numbering_triggers`]).
    Triggers,
}

/// How a write depends on the order rows are stored in, which differs
/// between copies (see [`storage_order_dependence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderDependence {
    /// Rows of `table` are numbered in the order the write visits them.
    /// `ties`: an ORDER BY is there but can leave ties.
    Numbered {
        table: String,
        by: Numbering,
        ties: bool,
    },
    /// A LIMIT or OFFSET whose ORDER BY can leave ties.
    Limited,
    /// A DISTINCT ON whose ORDER BY can leave ties within a group.
    DistinctOn,
    /// An order-sensitive aggregate or window function whose ORDER BY can
    /// leave ties.
    OrderedCall { function: String },
    /// An `UPDATE … FROM` whose SET list reads `source`, of which several
    /// rows may match one row of `target`: PostgreSQL then uses the first
    /// it reads.
    MultiMatch { target: String, source: String },
}

/// A write of `sql` that depends on storage order, which differs between
/// copies:
/// - rows numbered in the order they are visited: an `INSERT … SELECT`
///   into a table with a sequence default or numbering row triggers whose
///   ORDER BY is missing or can leave ties; a MERGE that inserts into such
///   a table; an UPDATE or DELETE whose WHERE does not fix a unique key, or
///   a MERGE, on a table with numbering row triggers;
/// - a LIMIT or OFFSET in a write whose ORDER BY can leave ties (without
///   ORDER BY the write analysis refuses it already).
///
/// An ORDER BY leaves no ties when it names every selected column (tied
/// rows are then equal) or a row key of the one table read.
///
/// `declared`: tables the catalog does not know yet (created in this
/// transaction) that have a sequence default.
pub fn storage_order_dependence(
    sql: &str,
    catalog: &RelCatalog,
    declared: &[String],
) -> Option<OrderDependence> {
    let has = |w: &[u8]| super::mentions(sql.as_bytes(), w);
    if !(catalog.has_numbering_triggers()
        || (has(b"insert") && has(b"select"))
        || has(b"merge")
        || (has(b"update") && has(b"from"))
        || has(b"limit")
        || has(b"distinct")
        || has(b"offset")
        || has(b"fetch")
        || (has(b"order") && (has(b"over") || has(b"agg"))))
    {
        return None;
    }
    let parsed = crate::route::parsed::tree(sql)?;
    parsed.json()?["stmts"].as_array()?.iter().find_map(|raw| {
        let tree = raw.get("stmt")?;
        let modifies = super::determinism::has_data_modification(tree);
        let scope = Scope {
            catalog,
            declared,
            modifies,
        };
        order_dependence(tree, &scope)
    })
}

/// What [`order_dependence`] looks at a statement with.
struct Scope<'a> {
    catalog: &'a RelCatalog,
    declared: &'a [String],
    /// The statement changes data.
    modifies: bool,
}

/// A table created in this transaction with a sequence default.
static DECLARED_NUMBERED: TableInfo = TableInfo {
    uniques: Vec::new(),
    row_key: None,
    sequence_default: true,
    triggers: false,
    numbering_triggers: false,
    volatile_defaults: Vec::new(),
    default_positions: Vec::new(),
};

fn order_dependence(v: &Value, scope: &Scope) -> Option<OrderDependence> {
    let catalog = scope.catalog;
    match v {
        Value::Array(items) => items.iter().find_map(|i| order_dependence(i, scope)),
        Value::Object(map) => map.iter().find_map(|(kind, node)| {
            if kind == "SubLink"
                && node["sub_link_type"].as_i64()
                    == Some(pg_query::protobuf::SubLinkType::ExistsSublink as i64)
            {
                // Which rows EXISTS finds does not matter, only whether.
                return None;
            }
            let found = match kind.as_str() {
                "SelectStmt" => {
                    let limited = ["limit_count", "limit_offset"]
                        .iter()
                        .any(|k| !node[*k].is_null());
                    let distinct_on = super::determinism::distinct_on(node);
                    (scope.modifies
                        && (limited || distinct_on)
                        && !empty(&node["sort_clause"])
                        && !total_order(node, catalog))
                    .then_some(if limited {
                        OrderDependence::Limited
                    } else {
                        OrderDependence::DistinctOn
                    })
                    .or_else(|| {
                        scope
                            .modifies
                            .then(|| ordered_call_with_ties(node, catalog))
                            .flatten()
                            .map(|function| OrderDependence::OrderedCall { function })
                    })
                }
                "UpdateStmt" => {
                    ambiguous_update_from(node, catalog).or_else(|| numbered(kind, node, scope))
                }
                _ => numbered(kind, node, scope),
            };
            found.or_else(|| order_dependence(node, scope))
        }),
        _ => None,
    }
}

/// An order-sensitive call in the target list of `sel` (in a write) whose
/// ORDER BY can leave ties: an aggregate such as `string_agg(x, ',' ORDER
/// BY y)`, whose ORDER BY must name its arguments or a key of each table
/// read, or a window function such as `row_number() OVER (ORDER BY y)`,
/// whose PARTITION BY and ORDER BY must name a key of each table read.
/// (`rank()` and its kin give tied rows one value; plain aggregates over a
/// window add up peers together.) The function's name, if one is found.
/// Calls without any ORDER BY are the write analysis's to refuse.
fn ordered_call_with_ties(sel: &Value, catalog: &RelCatalog) -> Option<String> {
    use super::determinism::ORDER_SENSITIVE_AGGREGATES;
    use crate::route::catalog::WINDOW_FUNCTIONS;
    const TIE_SAFE: &[&str] = &["rank", "dense_rank", "percent_rank", "cume_dist"];
    fn calls<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| calls(i, out)),
            Value::Object(map) => {
                for (kind, node) in map {
                    match kind.as_str() {
                        // Subqueries are visited as SELECTs of their own.
                        "SubLink" | "SelectStmt" => {}
                        "FuncCall" => {
                            out.push(node);
                            calls(node, out);
                        }
                        _ => calls(node, out),
                    }
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    calls(&sel["target_list"], &mut found);
    found.into_iter().find_map(|call| {
        let name = *super::function_names(call).last()?;
        let aggregate = ORDER_SENSITIVE_AGGREGATES.contains(&name);
        let over = call.get("over").filter(|w| !w.is_null());
        let (order, targets): (Vec<Value>, Vec<Value>) = match over {
            Some(w) => {
                if TIE_SAFE.contains(&name) || !(aggregate || WINDOW_FUNCTIONS.contains(&name)) {
                    return None;
                }
                let sort_by = |e: &Value| serde_json::json!({"node": {"SortBy": {"node": e}}});
                let partition = w["partition_clause"].as_array().into_iter().flatten();
                let order = w["order_clause"].as_array().into_iter().flatten();
                (
                    partition.map(sort_by).chain(order.cloned()).collect(),
                    Vec::new(),
                )
            }
            None if aggregate => {
                let args = call["args"].as_array().into_iter().flatten();
                let target = |e: &Value| serde_json::json!({"node": {"ResTarget": {"val": e}}});
                let order = call["agg_order"].as_array().into_iter().flatten();
                (order.cloned().collect(), args.map(target).collect())
            }
            None => return None,
        };
        if order.is_empty() {
            return None;
        }
        let as_select = serde_json::json!({
            "sort_clause": order,
            "target_list": targets,
            "from_clause": sel["from_clause"],
        });
        (!total_order(&as_select, catalog)).then(|| name.to_string())
    })
}

/// A statement node (`kind`) that numbers rows in the order it visits them.
fn numbered(kind: &str, node: &Value, scope: &Scope) -> Option<OrderDependence> {
    let catalog = scope.catalog;
    let (info, alias) = table(node, catalog).or_else(|| {
        let name = node["relation"]["relname"].as_str()?;
        scope
            .declared
            .iter()
            .any(|t| t == name)
            .then(|| (&DECLARED_NUMBERED, name.to_string()))
    })?;
    let (by, ties) = match kind {
        "UpdateStmt" | "DeleteStmt"
            if info.numbering_triggers
                && !fixes_unique_key(&node["where_clause"], info, &alias) =>
        {
            (Numbering::Triggers, false)
        }
        "InsertStmt" => {
            let sel = &node["select_stmt"]["node"]["SelectStmt"];
            if empty(&node["select_stmt"])
                || !empty(&sel["values_lists"])
                || total_order(sel, catalog)
                || fixed_order(sel)
            {
                return None;
            }
            let by = if info.sequence_default {
                Numbering::Sequence
            } else if info.numbering_triggers {
                Numbering::Triggers
            } else {
                return None;
            };
            (by, !empty(&sel["sort_clause"]))
        }
        "MergeStmt" if info.numbering_triggers => (Numbering::Triggers, false),
        "MergeStmt" if info.sequence_default && merge_inserts(node) => (Numbering::Sequence, false),
        _ => return None,
    };
    let table = name_as_written(&node["relation"])?;
    Some(OrderDependence::Numbered { table, by, ties })
}

/// The table a statement numbers rows of each time it runs, as written
/// and as a quoted name: an INSERT into a table with a sequence default or
/// numbering row triggers, an UPDATE, DELETE or MERGE of one with
/// numbering triggers. Run once per row of a loop, such a statement
/// numbers the loop's rows in the order the loop visits them.
pub fn numbers_rows(sql: &str, catalog: &RelCatalog) -> Option<(String, String)> {
    let parsed = crate::route::parsed::tree(sql)?;
    let tree = parsed.json()?;
    tree["stmts"].as_array()?.iter().find_map(|stmt| {
        let (kind, node) = stmt["stmt"]["node"].as_object()?.iter().next()?;
        let (info, _) = table(node, catalog)?;
        let numbers = match kind.as_str() {
            "InsertStmt" => info.sequence_default || info.numbering_triggers,
            "UpdateStmt" | "DeleteStmt" | "MergeStmt" => info.numbering_triggers,
            _ => false,
        };
        let rv = &node["relation"];
        let name = super::quoted_ident(rv["relname"].as_str()?);
        let quoted = match rv["schemaname"].as_str().unwrap_or("") {
            "" => name,
            schema => format!("{}.{name}", super::quoted_ident(schema)),
        };
        numbers
            .then(|| Some((name_as_written(rv)?, quoted)))
            .flatten()
    })
}

/// An `UPDATE … FROM` whose SET list reads a table of the FROM list (by
/// its name or alias) whose WHERE does not fix one of its unique keys:
/// several of its rows may then join one target row, and the copies would
/// each use the first in their own storage order. Tables only: a
/// subquery, VALUES list or function in FROM is taken as it comes.
fn ambiguous_update_from(update: &Value, catalog: &RelCatalog) -> Option<OrderDependence> {
    let from = update["from_clause"].as_array().filter(|f| !f.is_empty())?;
    let mut conjuncts = Vec::new();
    flatten_and(&update["where_clause"], &mut conjuncts);
    let mut read = Vec::new();
    for t in update["target_list"].as_array().into_iter().flatten() {
        collect_qualifiers(&t["node"]["ResTarget"]["val"], &mut read);
    }
    from.iter().find_map(|item| {
        let rv = &item["node"]["RangeVar"];
        let (info, alias) = range_var_table(rv, catalog)?;
        if !read.contains(&alias) {
            return None;
        }
        // Columns of the source set equal to something else.
        let mut fixed = HashSet::new();
        for c in &conjuncts {
            let e = &c["node"]["AExpr"];
            if e["kind"].as_i64() == Some(1) && op_name(e) == Some("=") {
                let (l, r) = (&e["lexpr"], &e["rexpr"]);
                for (col, other) in [(l, r), (r, l)] {
                    let mut others = Vec::new();
                    collect_qualifiers(other, &mut others);
                    if let Some(name) = qualified_column(col, &alias)
                        && !others.contains(&alias)
                    {
                        fixed.insert(name);
                    }
                }
            }
        }
        (!fixes_a_unique(info, &fixed)).then(|| OrderDependence::MultiMatch {
            target: name_as_written(&update["relation"]).unwrap_or_default(),
            source: name_as_written(rv).unwrap_or_default(),
        })
    })
}

/// The qualifiers of the qualified column references in `v`.
fn collect_qualifiers(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect_qualifiers(i, out)),
        Value::Object(map) => {
            // (`s.*` counts too: its last field is not a name.)
            if let Some(fields) = map.get("ColumnRef").and_then(|c| c["fields"].as_array())
                && fields.len() >= 2
                && let Some(q) = fields[fields.len() - 2]["node"]["String"]["sval"].as_str()
            {
                out.push(q.to_string());
            }
            map.values().for_each(|n| collect_qualifiers(n, out));
        }
        _ => {}
    }
}

/// A column reference qualified with `alias`: the column's name.
fn qualified_column(v: &Value, alias: &str) -> Option<String> {
    match column_ref(&v["node"]["ColumnRef"])?.as_slice() {
        [.., t, c] if *t == alias => Some(c.to_string()),
        _ => None,
    }
}

/// The names of a ColumnRef node (`t.c` → `["t", "c"]`); None for `*`.
fn column_ref(cref: &Value) -> Option<Vec<&str>> {
    cref["fields"]
        .as_array()?
        .iter()
        .map(|f| f["node"]["String"]["sval"].as_str())
        .collect()
}

/// A MERGE with a `WHEN NOT MATCHED THEN INSERT`.
fn merge_inserts(merge: &Value) -> bool {
    merge_actions(merge, pg_query::protobuf::CmdType::CmdInsert)
        .next()
        .is_some()
}

/// The `WHEN … THEN` clauses of a MERGE that do `command` (INSERT, UPDATE).
fn merge_actions(
    merge: &Value,
    command: pg_query::protobuf::CmdType,
) -> impl Iterator<Item = &Value> {
    merge["merge_when_clauses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| &c["node"]["MergeWhenClause"])
        .filter(move |c| c["command_type"].as_i64() == Some(command as i64))
}

/// Whether a SELECT's ORDER BY fixes the order of its rows: it names every
/// selected column but constants (rows that tie are equal), or a key of
/// every source it reads (a table's row key, `generate_series`' column).
fn total_order(sel: &Value, catalog: &RelCatalog) -> bool {
    let Some(sorts) = sel["sort_clause"].as_array().filter(|a| !a.is_empty()) else {
        return false;
    };
    let keys: Vec<Value> = sorts
        .iter()
        .map(|s| without_locations(&s["node"]["SortBy"]["node"]))
        .collect();
    let targets = sel["target_list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let covers_every_column = !targets.is_empty()
        && targets.iter().enumerate().all(|(i, t)| {
            let rt = &t["node"]["ResTarget"];
            if is_value(&rt["val"]) {
                // The same in every row.
                return true;
            }
            let val = without_locations(&rt["val"]);
            keys.iter().any(|k| {
                *k == val
                    || k["node"]["AConst"]["ival"]["ival"].as_i64() == Some(i as i64 + 1)
                    || rt["name"]
                        .as_str()
                        .is_some_and(|n| column_name(k, "").as_deref() == Some(n))
            })
        });
    if covers_every_column {
        return true;
    }
    let from = sel["from_clause"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut sources = Vec::new();
    if !from.iter().all(|item| range_vars(item, &mut sources)) {
        return false;
    }
    // A row of a join is one row of each source: a key of each orders the
    // rows without ties.
    !sources.is_empty()
        && sources.iter().all(|source| {
            let Some((alias, key)) = source_key(source, catalog) else {
                return false;
            };
            let ordered: HashSet<String> =
                keys.iter().filter_map(|k| column_name(k, &alias)).collect();
            key.iter().all(|c| ordered.contains(c))
        })
}

/// Where a SELECT's target list ends, in bytes: the end of the last token
/// before the first clause keyword, set operation, `;` or closing
/// parenthesis outside any parentheses that follows token `from` (the
/// last item's first), or of the last token.
fn target_list_end(tokens: &[pg_query::protobuf::ScanToken], from: usize) -> Option<usize> {
    use pg_query::protobuf::Token;
    const ENDS: &[Token] = &[
        Token::From,
        Token::Where,
        Token::GroupP,
        Token::Having,
        Token::Window,
        Token::Order,
        Token::Limit,
        Token::Offset,
        Token::Fetch,
        Token::For,
        Token::On,
        Token::Returning,
        Token::Union,
        Token::Intersect,
        Token::Except,
        Token::Into,
        Token::Ascii59,
    ];
    let mut depth = 0i32;
    let mut end = None;
    for t in &tokens[from..] {
        let kind = Token::try_from(t.token).ok()?;
        match kind {
            Token::Ascii41 | Token::Ascii93 if depth == 0 => return end,
            k if depth == 0 && ENDS.contains(&k) => return end,
            Token::Ascii40 | Token::Ascii91 => depth += 1,
            Token::Ascii41 | Token::Ascii93 => depth -= 1,
            _ => {}
        }
        end = Some(t.end as usize);
    }
    end
}

/// A SELECT whose rows come in the same order on every copy without an
/// ORDER BY: those of one `generate_series` or `unnest` call (which return
/// them in the order of their arguments), or of no FROM item at all (one
/// row, or what such calls in its target list return), with nothing that
/// regroups them (GROUP BY, DISTINCT, HAVING, a window, a set operation).
/// Filtering (WHERE) and LIMIT keep the order.
pub(crate) fn fixed_order(sel: &Value) -> bool {
    let regroups = [
        "group_clause",
        "distinct_clause",
        "window_clause",
        "sort_clause",
    ]
    .iter()
    .any(|k| !empty(&sel[*k]))
        || !sel["having_clause"].is_null()
        || !sel["larg"].is_null();
    if regroups {
        return false;
    }
    match sel["from_clause"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        [] => true,
        [item] => item["node"].get("RangeFunction").is_some_and(|rf| {
            let calls = rf["functions"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            !calls.is_empty()
                && calls.iter().all(|f| {
                    let call = &f["node"]["List"]["items"][0]["node"]["FuncCall"];
                    matches!(
                        super::function_names(call).as_slice(),
                        ["generate_series" | "unnest"]
                            | ["pg_catalog", "generate_series" | "unnest"]
                    )
                })
        }),
        _ => false,
    }
}

/// The name a FROM source is referred to by, and the columns that name each
/// of its rows: a table's row key, or `generate_series`'s one column.
fn source_key(source: &Value, catalog: &RelCatalog) -> Option<(String, Vec<String>)> {
    if let Some(rv) = source.get("RangeVar") {
        let (info, alias) = range_var_table(rv, catalog)?;
        return Some((alias, info.row_key.clone()?));
    }
    let rf = source.get("RangeFunction")?;
    let [function] = rf["functions"].as_array()?.as_slice() else {
        return None;
    };
    let call = &function["node"]["List"]["items"][0]["node"]["FuncCall"];
    if !matches!(
        super::function_names(call).as_slice(),
        ["generate_series"] | ["pg_catalog", "generate_series"]
    ) || rf["ordinality"].as_bool() == Some(true)
    {
        return None;
    }
    let alias = rf["alias"]["aliasname"]
        .as_str()
        .unwrap_or("generate_series");
    let column = match rf["alias"]["colnames"].as_array().and_then(|c| c.first()) {
        Some(c) => c["node"]["String"]["sval"].as_str()?,
        None => alias,
    };
    Some((alias.to_string(), vec![column.to_string()]))
}

/// The sources a FROM item reads (tables and functions), when it is only
/// those and joins of them (false for a subquery…).
fn range_vars<'a>(item: &'a Value, out: &mut Vec<&'a Value>) -> bool {
    let node = &item["node"];
    if node.get("RangeVar").is_some() || node.get("RangeFunction").is_some() {
        out.push(node);
        true
    } else if let Some(join) = node.get("JoinExpr") {
        range_vars(&join["larg"], out) && range_vars(&join["rarg"], out)
    } else {
        false
    }
}

/// A node tree without its `location` fields (the same expression written
/// twice compares equal).
fn without_locations(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| k.as_str() != "location")
                .map(|(k, c)| (k.clone(), without_locations(c)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_locations).collect()),
        other => other.clone(),
    }
}

/// An UPDATE that sets a column whose default the copies would compute
/// differently to `DEFAULT`, with that `DEFAULT` replaced by the default's
/// expression: the write analysis then captures its values by row, as it
/// would the expression written out. None when there is no such UPDATE.
pub fn expand_update_defaults(sql: &str, catalog: &RelCatalog) -> Option<String> {
    use super::determinism::{Edit, apply_edits, scan};
    // Every write with a catalog passes here: no copy of the text.
    if !super::mentions(sql.as_bytes(), b"default") {
        return None;
    }
    let parsed = crate::route::parsed::tree(sql)?;
    let tree = parsed.json()?;
    let tokens = scan(sql)?;
    let mut edits = Vec::new();
    let stmts = tree["stmts"].as_array()?;
    // SET lists: of an UPDATE, an INSERT's ON CONFLICT DO UPDATE, a
    // MERGE's UPDATE actions.
    fn set_lists<'a>(run: &Run<'a>) -> Vec<&'a Value> {
        match run.kind {
            "UpdateStmt" => vec![&run.stmt["target_list"]],
            "InsertStmt" => vec![&run.stmt["on_conflict_clause"]["target_list"]],
            "MergeStmt" => merge_actions(run.stmt, pg_query::protobuf::CmdType::CmdUpdate)
                .map(|c| &c["target_list"])
                .collect(),
            _ => Vec::new(),
        }
    }
    for run in stmts
        .iter()
        .flat_map(|stmt| statements_run(&stmt["stmt"]["node"]))
    {
        let rel = &run.stmt["relation"];
        let schema = rel["schemaname"].as_str().unwrap_or("");
        let Some(info) = catalog.lookup(schema, rel["relname"].as_str().unwrap_or("")) else {
            continue;
        };
        let targets = set_lists(&run)
            .into_iter()
            .filter_map(Value::as_array)
            .flatten();
        for target in targets {
            let t = &target["node"]["ResTarget"];
            let Some(d) = t["val"]["node"].get("SetToDefault") else {
                continue;
            };
            let column = t["name"].as_str().unwrap_or("");
            let Some((_, expr)) = info.volatile_defaults.iter().find(|(c, _)| c == column) else {
                continue;
            };
            let at = d["location"].as_i64().unwrap_or(-1);
            let token = tokens.iter().find(|k| k.start as i64 == at)?;
            edits.push(Edit {
                start: token.start as usize,
                end: token.end as usize,
                text: format!("({expr})"),
            });
        }
    }
    if edits.is_empty() {
        return None;
    }
    apply_edits(sql, edits)
}

/// What an INSERT, a MERGE's INSERT action or a COPY FROM gives the
/// columns of the row it writes.
struct Given<'a> {
    /// The column list; empty: columns in table order.
    cols: Vec<String>,
    /// The items of each VALUES row (a DEFAULT item leaves its column to
    /// its default); empty for a query or COPY.
    rows: Vec<&'a [Value]>,
    /// How many columns, in table order, a write without a column list
    /// gives (`usize::MAX`: all); None when it cannot be told.
    width: Option<usize>,
}

impl<'a> Given<'a> {
    /// For each row-writing part of `stmt` (a [`statements_run`] node of
    /// `kind`): an INSERT, each INSERT action of a MERGE, a COPY FROM.
    /// None for other statements.
    fn of(kind: &str, stmt: &'a Value) -> Option<Vec<Given<'a>>> {
        let names = |list: &Value| -> Vec<String> {
            list.as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    c["node"]["ResTarget"]["name"]
                        .as_str()
                        .or(c["node"]["String"]["sval"].as_str())
                })
                .map(str::to_string)
                .collect()
        };
        let items = |v: &'a Value| v.as_array().map(Vec::as_slice).unwrap_or_default();
        match kind {
            "InsertStmt" => {
                let select = &stmt["select_stmt"]["node"]["SelectStmt"];
                let rows: Vec<&[Value]> = select["values_lists"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|row| items(&row["node"]["List"]["items"]))
                    .collect();
                let width = if stmt["select_stmt"].is_null() {
                    Some(0) // DEFAULT VALUES
                } else if let Some(row) = rows.first() {
                    Some(row.len())
                } else {
                    let targets = select["target_list"].as_array();
                    let star = |t: &Value| {
                        t["node"]["ResTarget"]["val"]["node"]["ColumnRef"]["fields"]
                            .as_array()
                            .is_some_and(|f| f.iter().any(|f| f["node"].get("AStar").is_some()))
                    };
                    targets.filter(|t| !t.iter().any(star)).map(Vec::len)
                };
                Some(vec![Given {
                    cols: names(&stmt["cols"]),
                    rows,
                    width,
                }])
            }
            "MergeStmt" => Some(
                merge_actions(stmt, pg_query::protobuf::CmdType::CmdInsert)
                    .map(|c| {
                        let values = items(&c["values"]);
                        Given {
                            cols: names(&c["target_list"]),
                            rows: vec![values],
                            width: Some(values.len()),
                        }
                    })
                    .collect(),
            ),
            "CopyStmt" if stmt["is_from"] == true => Some(vec![Given {
                cols: names(&stmt["attlist"]),
                rows: Vec::new(),
                width: Some(usize::MAX),
            }]),
            _ => None,
        }
    }

    /// Where the write gives `column`: its index in the column list or a
    /// VALUES row. None when it leaves the column out.
    fn index_of(&self, info: &TableInfo, column: &str) -> Option<usize> {
        if self.cols.is_empty() {
            let at = info.index_of(column)?;
            (at < self.width?).then_some(at)
        } else {
            self.cols.iter().position(|c| c == column)
        }
    }

    /// The volatile-default columns of `info` this write leaves to their
    /// defaults: left out, or given DEFAULT in some VALUES row.
    fn defaults_left<'i>(&self, info: &'i TableInfo) -> Vec<&'i (String, String)> {
        info.volatile_defaults
            .iter()
            .filter(|(c, _)| match self.index_of(info, c) {
                None => true,
                Some(at) => self.rows.iter().any(|row| {
                    row.get(at)
                        .is_some_and(|item| item["node"].get("SetToDefault").is_some())
                }),
            })
            .collect()
    }
}

/// Why an INSERT, MERGE or COPY in `sql` would leave a column to a default the
/// copies compute differently (None: it names every such column). Sets
/// `unknown` when it writes to a table the catalog does not know.
pub fn volatile_default_use(sql: &str, catalog: &RelCatalog, unknown: &mut bool) -> Option<String> {
    let parsed = crate::route::parsed::tree(sql)?;
    let tree = parsed.json()?;
    let stmts = tree["stmts"].as_array()?;
    for run in stmts
        .iter()
        .flat_map(|stmt| statements_run(&stmt["stmt"]["node"]))
    {
        let Some(given) = Given::of(run.kind, run.stmt) else {
            continue;
        };
        let rel = &run.stmt["relation"];
        let schema = rel["schemaname"].as_str().unwrap_or("");
        let name = rel["relname"].as_str().unwrap_or("");
        let Some(info) = catalog.lookup(schema, name) else {
            // A temporary table, or one made on the nodes since the last
            // catalog load (an unqualified name found in several schemas
            // is known, only ambiguous).
            *unknown |= rel["relpersistence"].as_str() != Some("t")
                && (!schema.is_empty() || !catalog.tables.contains_key(name));
            continue;
        };
        let mut left: Vec<&(String, String)> = Vec::new();
        for d in given.iter().flat_map(|g| g.defaults_left(info)) {
            if !left.contains(&d) {
                left.push(d);
            }
        }
        if !left.is_empty() {
            let list: Vec<String> = left
                .iter()
                .map(|(c, e)| match info.hidden(c) {
                    true => format!(
                        "\"{c}\" (default {e}, of the table under the view, which does not show it)"
                    ),
                    false => format!("\"{c}\" (default {e})"),
                })
                .collect();
            let what = match run.kind {
                "CopyStmt" => "COPY",
                _ => "write",
            };
            return Some(format!(
                "this {what} leaves {} of {name} to defaults each copy would compute differently",
                list.join(", ")
            ));
        }
    }
    None
}

/// Functions a row-local expression may call (pure, read nothing else).
const PURE_FUNCTIONS: &[&str] = &[
    "now",
    "current_setting",
    "lower",
    "upper",
    "abs",
    "round",
    "length",
    "md5",
    "concat",
    "substr",
    "substring",
    "btrim",
    "trim",
    "greatest",
    "least",
    "coalesce",
    "nullif",
    "to_timestamp",
    "date_trunc",
    "jsonb_set",
    "jsonb_build_object",
    "json_build_object",
];

/// Whether `sql` is one row-local write statement.
pub fn is_row_local(sql: &str, catalog: &RelCatalog) -> bool {
    let Some(parsed) = crate::route::parsed::tree(sql) else {
        return false;
    };
    // Savepoint statements change no data: they go with a row-local write
    // (one statement that writes), or alone.
    let savepoint = |node: &pg_query::NodeEnum| {
        use pg_query::protobuf::TransactionStmtKind as K;
        matches!(node, pg_query::NodeEnum::TransactionStmt(t)
            if matches!(K::try_from(t.kind), Ok(K::TransStmtSavepoint | K::TransStmtRelease | K::TransStmtRollbackTo)))
    };
    let stmts = &parsed.stmts;
    let mut writes = stmts
        .iter()
        .map(|raw| raw.stmt.as_ref().and_then(|s| s.node.as_ref()))
        .enumerate()
        .filter(|(_, n)| !n.is_some_and(savepoint));
    let at = match (writes.next(), writes.next()) {
        (None, _) => return !stmts.is_empty(),
        (Some((at, Some(_))), None) => at,
        _ => return false,
    };
    let Some(v) = parsed.json().map(|j| &j["stmts"][at]["stmt"]["node"]) else {
        return false;
    };
    if let Some(ins) = v.get("InsertStmt") {
        insert_row_local(ins, catalog)
    } else if let Some(upd) = v.get("UpdateStmt") {
        update_row_local(upd, catalog)
    } else if let Some(del) = v.get("DeleteStmt") {
        delete_row_local(del, catalog)
    } else {
        false
    }
}

/// The UPDATEs of `sql` that capture values (`reprise.captured(…)` in
/// their SET lists), made safe for replay: in a table with a row key the
/// calls become `reprise.captured_keyed(…, key)`, so each value is
/// recorded under the row it was computed for and replay finds it whatever
/// order that copy visits the rows in; an UPDATE whose WHERE fixes a
/// unique key (one row) keeps its ordered capture. None when some UPDATE
/// qualifies for neither (several rows and no row key, or FROM / WITH):
/// the statement is then refused.
pub fn key_captures(sql: &str, catalog: &RelCatalog) -> Option<String> {
    use super::determinism::{Edit, apply_edits, matching_paren, parses, scan};
    use pg_query::protobuf::Token;
    let parsed = crate::route::parsed::tree(sql)?;
    let tokens = scan(sql)?;
    let is = |i: usize, t: Token| tokens.get(i).is_some_and(|k| k.token == t as i32);
    let text = |i: usize| {
        tokens
            .get(i)
            .and_then(|t| sql.get(t.start as usize..t.end as usize))
            .unwrap_or("")
    };
    let mut edits = Vec::new();
    for (at, raw) in parsed.stmts.iter().enumerate() {
        let start = raw.stmt_location.max(0) as usize;
        let end = match raw.stmt_len {
            n if n > 0 => start + n as usize,
            _ => sql.len(),
        };
        // The captured calls of this statement: (name token, open paren).
        let calls: Vec<(usize, usize)> = (0..tokens.len())
            .filter(|&i| {
                (start..end).contains(&(tokens[i].start as usize))
                    && text(i).eq_ignore_ascii_case("reprise")
                    && is(i + 1, Token::Ascii46)
                    && text(i + 2).eq_ignore_ascii_case("captured")
                    && is(i + 3, Token::Ascii40)
            })
            .map(|i| (i + 2, i + 3))
            .collect();
        if calls.is_empty() {
            continue;
        }
        let v = parsed.json()?["stmts"][at].get("stmt")?;
        let Some(upd) = v["node"].get("UpdateStmt") else {
            continue; // INSERT … VALUES: ordered capture
        };
        if !empty(&upd["from_clause"]) || !empty(&upd["with_clause"]) {
            return None;
        }
        let (info, alias) = table(upd, catalog)?;
        let Some(key) = info.row_key.as_ref() else {
            if fixes_unique_key(&upd["where_clause"], info, &alias) {
                continue; // one row: ordered capture
            }
            return None;
        };
        // As written: the same text runs on every copy.
        let label = name_as_written(&upd["relation"])?;
        let cols: Vec<String> = key.iter().map(|c| super::quoted_ident(c)).collect();
        let key_expr = format!(
            ", '{}:' || ROW({})::text",
            label.replace('\'', "''"),
            cols.join(", ")
        );
        for (name, open) in calls {
            let close = matching_paren(&tokens, open)?;
            edits.push(Edit {
                start: tokens[name].start as usize,
                end: tokens[name].end as usize,
                text: "captured_keyed".to_string(),
            });
            edits.push(Edit::insert(tokens[close].start as usize, key_expr.clone()));
        }
    }
    if edits.is_empty() {
        return Some(sql.to_string());
    }
    apply_edits(sql, edits).filter(|t| parses(t))
}

fn empty(v: &Value) -> bool {
    v.is_null() || v.as_array().is_some_and(|a| a.is_empty())
}

/// The table a statement writes (its `relation`), and the name it goes by
/// in the statement.
fn table<'a>(stmt: &Value, catalog: &'a RelCatalog) -> Option<(&'a TableInfo, String)> {
    range_var_table(&stmt["relation"], catalog)
}

/// The table a RangeVar names, and its alias (or name).
fn range_var_table<'a>(rv: &Value, catalog: &'a RelCatalog) -> Option<(&'a TableInfo, String)> {
    let name = rv["relname"].as_str()?;
    let info = catalog.lookup(rv["schemaname"].as_str().unwrap_or(""), name)?;
    let alias = rv["alias"]["aliasname"]
        .as_str()
        .unwrap_or(name)
        .to_string();
    Some((info, alias))
}

/// A RangeVar's table as the statement writes it: `schema.table` when
/// qualified.
fn name_as_written(rv: &Value) -> Option<String> {
    let name = rv["relname"].as_str()?;
    Some(match rv["schemaname"].as_str().unwrap_or("") {
        "" => name.to_string(),
        schema => format!("{schema}.{name}"),
    })
}

fn insert_row_local(ins: &Value, catalog: &RelCatalog) -> bool {
    let Some((info, alias)) = table(ins, catalog) else {
        return false;
    };
    if info.sequence_default
        || info.triggers
        || !empty(&ins["on_conflict_clause"])
        || !empty(&ins["with_clause"])
    {
        return false;
    }
    let select = &ins["select_stmt"]["node"]["SelectStmt"];
    let Some(rows) = select["values_lists"].as_array() else {
        return false;
    };
    if rows.is_empty() || !empty(&select["from_clause"]) || !empty(&select["with_clause"]) {
        return false;
    }
    // VALUES may not read the table at all.
    rows.iter().all(|row| {
        row["node"]["List"]["items"]
            .as_array()
            .is_some_and(|items| items.iter().all(|e| pure(e, &alias, false)))
    })
}

fn update_row_local(upd: &Value, catalog: &RelCatalog) -> bool {
    let Some((info, alias)) = table(upd, catalog) else {
        return false;
    };
    if info.triggers || !empty(&upd["from_clause"]) || !empty(&upd["with_clause"]) {
        return false;
    }
    let key_columns: HashSet<&str> = info.uniques.iter().flatten().map(String::as_str).collect();
    let Some(targets) = upd["target_list"].as_array() else {
        return false;
    };
    for t in targets {
        let rt = &t["node"]["ResTarget"];
        let Some(col) = rt["name"].as_str() else {
            return false;
        };
        if key_columns.contains(col)
            || !empty(&rt["indirection"])
            || !pure(&rt["val"], &alias, true)
        {
            return false;
        }
    }
    fixes_unique_key(&upd["where_clause"], info, &alias)
}

fn delete_row_local(del: &Value, catalog: &RelCatalog) -> bool {
    let Some((info, alias)) = table(del, catalog) else {
        return false;
    };
    if !empty(&del["using_clause"]) || !empty(&del["with_clause"]) {
        return false;
    }
    fixes_unique_key(&del["where_clause"], info, &alias)
}

/// The WHERE clause is an AND of pure conditions including `col = value`
/// for every column of some unique index.
fn fixes_unique_key(clause: &Value, info: &TableInfo, alias: &str) -> bool {
    let mut conjuncts = Vec::new();
    flatten_and(clause, &mut conjuncts);
    if conjuncts.is_empty() {
        return false;
    }
    let mut fixed: HashSet<String> = HashSet::new();
    for c in conjuncts {
        if !pure(c, alias, true) {
            return false;
        }
        let e = &c["node"]["AExpr"];
        if e["kind"].as_i64() == Some(1) && op_name(e) == Some("=") {
            let (l, r) = (&e["lexpr"], &e["rexpr"]);
            for (col, val) in [(l, r), (r, l)] {
                if let Some(name) = column_name(col, alias)
                    && is_value(val)
                {
                    fixed.insert(name);
                }
            }
        }
    }
    fixes_a_unique(info, &fixed)
}

/// `fixed` holds every column of one of the table's unique keys.
fn fixes_a_unique(info: &TableInfo, fixed: &HashSet<String>) -> bool {
    info.uniques
        .iter()
        .any(|u| !u.is_empty() && u.iter().all(|c| fixed.contains(c)))
}

fn flatten_and<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    let b = &v["node"]["BoolExpr"];
    if b["boolop"].as_i64() == Some(1) {
        if let Some(args) = b["args"].as_array() {
            for a in args {
                flatten_and(a, out);
            }
        }
    } else if !v.is_null() {
        out.push(v);
    }
}

fn op_name(e: &Value) -> Option<&str> {
    e["name"].as_array()?.last()?["node"]["String"]["sval"].as_str()
}

/// A column of the target table, by its (possibly qualified) reference.
fn column_name(v: &Value, alias: &str) -> Option<String> {
    match column_ref(&v["node"]["ColumnRef"])?.as_slice() {
        [c] => Some(c.to_string()),
        [t, c] if *t == alias => Some(c.to_string()),
        _ => None,
    }
}

/// A parameter or constant (possibly cast).
fn is_value(v: &Value) -> bool {
    let n = &v["node"];
    n.get("ParamRef").is_some()
        || n.get("AConst").is_some()
        || n.get("TypeCast").is_some_and(|c| is_value(&c["arg"]))
}

/// An expression of parameters, constants, pure functions and (when
/// `columns_ok`) the target row's own columns.
fn pure(v: &Value, alias: &str, columns_ok: bool) -> bool {
    if v.is_null() {
        return true;
    }
    let Some(obj) = v["node"].as_object() else {
        return false;
    };
    let Some((kind, body)) = obj.iter().next() else {
        return false;
    };
    let sub = |x: &Value| pure(x, alias, columns_ok);
    let all = |x: &Value| x.as_array().is_none_or(|a| a.iter().all(sub));
    match kind.as_str() {
        "AConst" | "ParamRef" => true,
        "ColumnRef" => columns_ok && column_name(v, alias).is_some(),
        "TypeCast" => sub(&body["arg"]),
        "AExpr" => sub(&body["lexpr"]) && sub(&body["rexpr"]),
        "BoolExpr" => all(&body["args"]),
        "NullTest" | "BooleanTest" => sub(&body["arg"]),
        "CoalesceExpr" | "MinMaxExpr" => all(&body["args"]),
        "CaseExpr" => sub(&body["arg"]) && all(&body["args"]) && sub(&body["defresult"]),
        "CaseWhen" => sub(&body["expr"]) && sub(&body["result"]),
        "AArrayExpr" => all(&body["elements"]),
        "RowExpr" => all(&body["args"]),
        "List" => all(&body["items"]),
        "FuncCall" => {
            let names = super::function_names(body);
            names.last().is_some_and(|n| PURE_FUNCTIONS.contains(n))
                && empty(&body["over"])
                && all(&body["args"])
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> RelCatalog {
        let t = |s: &str, n: &str, u: &str, seq: bool, trig: bool| {
            (s.to_string(), n.to_string(), u.to_string(), seq, trig)
        };
        RelCatalog::from_rows([
            t("public", "pgbench_accounts", "*aid", false, false),
            t("public", "pgbench_history", "", false, false),
            t("public", "events", "id", true, false),
            t("public", "audited", "id", false, true),
            t("public", "pair", "a,b", false, false),
            t("s1", "dup", "id", false, false),
            t("s2", "dup", "id", false, false),
        ])
    }

    #[test]
    fn writes_that_leave_volatile_defaults_are_found() {
        let c = RelCatalog::from_full_rows([(
            "public".to_string(),
            "u".to_string(),
            "id".to_string(),
            false,
            false,
            "id\u{1f}gen_random_uuid()\u{1e}at\u{1f}now()\u{1e}n\u{1f}0\u{1e}f\u{1f}!my_volatile()\u{1e}\
             t\u{1f}COALESCE(NULLIF(current_setting('reprise.now', true), '')::timestamptz, now())"
                .to_string(),
            false,
        )]);
        let found = |sql: &str| volatile_default_use(sql, &c, &mut false);
        let r = found("INSERT INTO u (v) VALUES ('x')").unwrap();
        assert!(
            r.contains("\"id\"") && r.contains("gen_random_uuid()"),
            "{r}"
        );
        assert!(
            found("INSERT INTO u VALUES ('00000000-0000-0000-0000-000000000000', 'x', now())")
                .is_some()
        );
        let r = found("INSERT INTO u (id, v) VALUES ($1, 'x')").unwrap();
        assert!(r.contains("\"at\""), "{r}");
        assert!(
            found("INSERT INTO u (id, v, at) VALUES ($1, 'x', $2)")
                .unwrap()
                .contains("my_volatile")
        );
        assert!(found("INSERT INTO u (id, v, at, f) VALUES ($1, 'x', $2, 1)").is_none());
        assert!(found("INSERT INTO u (id, v, at) VALUES ($1, 'x', DEFAULT)").is_some());
        assert!(found("COPY u (v) FROM STDIN").is_some());
        assert!(found("COPY u (id, at, v, f) FROM STDIN").is_none());
        assert!(found("COPY u TO STDOUT").is_none());
        assert!(found("INSERT INTO other (v) VALUES (1)").is_none());
        let mut unknown = false;
        volatile_default_use("INSERT INTO other (v) VALUES (1)", &c, &mut unknown);
        assert!(unknown);
        assert!(found("UPDATE u SET v = 'y'").is_none());
        // Without a column list values go in column order (here u's
        // columns are id, v, at, f, t).
        let c = RelCatalog::from_full_rows([(
            "public".to_string(),
            "u".to_string(),
            "id".to_string(),
            false,
            false,
            "id\u{1f}gen_random_uuid()\u{1f}1\u{1e}at\u{1f}now()\u{1f}3".to_string(),
            false,
        )]);
        let found = |sql: &str| volatile_default_use(sql, &c, &mut false);
        for sql in [
            "INSERT INTO u VALUES ($1, 'x', now())",
            "INSERT INTO u VALUES ($1, 'x', now(), 1), ($2, 'y', now(), 2)",
            "INSERT INTO u SELECT $1, 'x', now()",
            "COPY u FROM STDIN",
            "MERGE INTO u USING s ON u.v = s.v WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v, s.at)",
            "MERGE INTO u USING s ON u.v = s.v \
             WHEN NOT MATCHED THEN INSERT (id, v, at) VALUES (s.id, s.v, s.at)",
        ] {
            assert_eq!(found(sql), None, "{sql}");
        }
        for (sql, left) in [
            ("INSERT INTO u VALUES ($1, 'x')", "\"at\""),
            (
                "INSERT INTO u VALUES ($1, 'x', now()), (DEFAULT, 'y', now())",
                "\"id\"",
            ),
            ("INSERT INTO u SELECT $1, 'x'", "\"at\""),
            ("INSERT INTO u SELECT * FROM w", "\"id\""),
            ("INSERT INTO u DEFAULT VALUES", "\"id\""),
            (
                "MERGE INTO u USING s ON u.v = s.v WHEN NOT MATCHED THEN INSERT (v) VALUES (s.v)",
                "\"id\"",
            ),
            (
                "MERGE INTO u USING s ON u.v = s.v WHEN NOT MATCHED THEN INSERT DEFAULT VALUES",
                "\"at\"",
            ),
            (
                "MERGE INTO u USING s ON u.v = s.v WHEN MATCHED THEN DELETE \
                 WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v, DEFAULT)",
                "\"at\"",
            ),
        ] {
            let r = found(sql).unwrap_or_else(|| panic!("{sql}"));
            assert!(r.contains(left), "{sql}: {r}");
        }
        for sql in [
            "WITH w AS (INSERT INTO u (v) VALUES (1) RETURNING 1) SELECT * FROM w",
            "WITH w AS (UPDATE u SET v = 2 RETURNING 1) INSERT INTO u (v) SELECT 1 FROM w",
            "EXPLAIN (ANALYZE) INSERT INTO u (v) VALUES (1)",
            "PREPARE p (text) AS INSERT INTO u (v) VALUES ($1)",
            "COPY (INSERT INTO u (v) VALUES (1) RETURNING id) TO STDOUT",
        ] {
            assert!(found(sql).is_some(), "{sql}");
        }
    }

    #[test]
    fn volatile_defaults_are_captured_where_the_insert_can_name_them() {
        let c = RelCatalog::from_full_rows([(
            "public".to_string(),
            "u".to_string(),
            "id".to_string(),
            false,
            false,
            "id\u{1f}gen_random_uuid()\u{1e}at\u{1f}clock_timestamp()".to_string(),
            false,
        )]);
        let rewrite = |sql: &str| capture_volatile_defaults(sql, &c, &mut false);
        assert_eq!(
            rewrite("INSERT INTO u (v) VALUES ($1), ($2) RETURNING id")
                .unwrap()
                .as_deref(),
            Some(
                "INSERT INTO u (v, \"id\", \"at\") VALUES ($1, reprise.captured((gen_random_uuid())), \
                 reprise.captured((clock_timestamp()))), ($2, reprise.captured((gen_random_uuid())), \
                 reprise.captured((clock_timestamp()))) RETURNING id"
            )
        );
        assert_eq!(
            rewrite("insert into u (id, v) values (DEFAULT, 'x')")
                .unwrap()
                .as_deref(),
            Some(
                "insert into u (id, v, \"at\") values (reprise.captured((gen_random_uuid())), 'x', \
                 reprise.captured((clock_timestamp())))"
            )
        );
        assert_eq!(
            rewrite("INSERT INTO u DEFAULT VALUES").unwrap().as_deref(),
            Some(
                "INSERT INTO u (\"id\", \"at\") VALUES (reprise.captured((gen_random_uuid())), \
                 reprise.captured((clock_timestamp())))"
            )
        );
        // Nothing to do, or nothing that can be done.
        assert_eq!(
            rewrite("INSERT INTO u (id, at, v) VALUES ($1, $2, $3)"),
            Ok(None)
        );
        assert_eq!(rewrite("INSERT INTO other (v) VALUES (1)"), Ok(None));
        assert!(rewrite("INSERT INTO u VALUES ($1, 'x')").is_err());
        // INSERT … SELECT whose rows come in the same order on every copy:
        // the captured defaults follow its target list.
        let c_ = "reprise.captured((gen_random_uuid())), reprise.captured((clock_timestamp()))";
        for (sql, expected) in [
            (
                "INSERT INTO u (v) SELECT 'x'",
                format!("INSERT INTO u (v, \"id\", \"at\") SELECT 'x', {c_}"),
            ),
            (
                "insert into u (v) select (g * 2)::text from generate_series(1, $1) g \
                 where g > 1 on conflict do nothing returning id",
                format!(
                    "insert into u (v, \"id\", \"at\") select (g * 2)::text, {c_} from \
                     generate_series(1, $1) g where g > 1 on conflict do nothing returning id"
                ),
            ),
            (
                "INSERT INTO u (v) (SELECT g::text FROM generate_series(1, 3) g ORDER BY g)",
                format!(
                    "INSERT INTO u (v, \"id\", \"at\") (SELECT g::text, {c_} FROM generate_series(1, 3) g ORDER BY g)"
                ),
            ),
        ] {
            assert_eq!(rewrite(sql), Ok(Some(expected)), "{sql}");
        }
        // Rows in storage order, or no column list.
        assert!(rewrite("INSERT INTO u (v) SELECT v FROM u").is_err());
        assert!(rewrite("INSERT INTO u SELECT g FROM generate_series(1, 3) g").is_err());
        assert!(rewrite("COPY u (v) FROM STDIN").is_err_and(|e| e.starts_with("this COPY")));
        // INSERTs run by other statements.
        assert_eq!(
            rewrite("WITH w AS (INSERT INTO u DEFAULT VALUES RETURNING id) SELECT * FROM w")
                .unwrap()
                .as_deref(),
            Some(
                "WITH w AS (INSERT INTO u (\"id\", \"at\") VALUES (reprise.captured((gen_random_uuid())), \
                 reprise.captured((clock_timestamp()))) RETURNING id) SELECT * FROM w"
            )
        );
        for sql in [
            "EXPLAIN ANALYZE INSERT INTO u (id, v) VALUES (DEFAULT, 1)",
            "PREPARE p AS INSERT INTO u (v) VALUES ($1)",
            "COPY (INSERT INTO u (v, at) VALUES (1, now()) RETURNING id) TO STDOUT",
            "WITH a AS (INSERT INTO u (v) VALUES (1) RETURNING id), \
             b AS (SELECT * FROM a) SELECT * FROM b",
        ] {
            let text = rewrite(sql).unwrap().unwrap();
            assert!(
                text.contains("reprise.captured((gen_random_uuid()))"),
                "{text}"
            );
        }
        // The WITH query's values and others would be taken in an order
        // the plan decides.
        for sql in [
            "WITH a AS (INSERT INTO u (v) VALUES (1) RETURNING id) INSERT INTO u (v) VALUES (2)",
            "WITH a AS (INSERT INTO u (v) VALUES (1) RETURNING id), \
             b AS (INSERT INTO u (v) VALUES (2) RETURNING id) SELECT * FROM a, b",
            "WITH a AS (INSERT INTO u (v) VALUES (1) RETURNING id) \
             SELECT reprise.captured((random())) FROM a",
        ] {
            assert!(rewrite(sql).unwrap_err().contains("WITH query"), "{sql}");
        }
        // Values in column order: DEFAULT items are captured in place; a
        // column after the last value cannot be.
        let c = RelCatalog::from_full_rows([(
            "public".to_string(),
            "u".to_string(),
            "id".to_string(),
            false,
            false,
            "id\u{1f}gen_random_uuid()\u{1f}1\u{1e}at\u{1f}clock_timestamp()\u{1f}3".to_string(),
            false,
        )]);
        let rewrite = |sql: &str| capture_volatile_defaults(sql, &c, &mut false);
        assert_eq!(
            rewrite("INSERT INTO u VALUES (DEFAULT, 1, $1), ($2, 2, DEFAULT)")
                .unwrap()
                .as_deref(),
            Some(
                "INSERT INTO u VALUES (reprise.captured((gen_random_uuid())), 1, $1), \
                 ($2, 2, reprise.captured((clock_timestamp())))"
            )
        );
        assert_eq!(rewrite("INSERT INTO u VALUES ($1, 1, $2)"), Ok(None));
        // A row that ends before a volatile-default column is given the
        // columns up to it; a query, when they follow its own.
        for (sql, expected) in [
            (
                "INSERT INTO u VALUES (DEFAULT, 1), ($1, 2) ON CONFLICT DO NOTHING",
                "INSERT INTO u VALUES (reprise.captured((gen_random_uuid())), 1, \
                 reprise.captured((clock_timestamp()))), ($1, 2, \
                 reprise.captured((clock_timestamp()))) ON CONFLICT DO NOTHING",
            ),
            (
                "insert into public.u as x overriding user value values ($1)",
                "insert into public.u as x overriding user value values ($1, DEFAULT, \
                 reprise.captured((clock_timestamp())))",
            ),
            (
                "INSERT INTO u SELECT $1, g FROM generate_series(1, 3) g RETURNING *",
                "INSERT INTO u SELECT $1, g, reprise.captured((clock_timestamp())) \
                 FROM generate_series(1, 3) g RETURNING *",
            ),
        ] {
            assert_eq!(rewrite(sql).unwrap().as_deref(), Some(expected), "{sql}");
        }
        for sql in [
            // A column between, whose default is not known here.
            "INSERT INTO u SELECT $1",
            // Rows in storage order; a width that cannot be told.
            "INSERT INTO u SELECT id, v FROM u",
            "INSERT INTO u SELECT * FROM generate_series(1, 3) g",
        ] {
            assert!(rewrite(sql).is_err(), "{sql}");
        }
        // A view that does not show a column of the table under it.
        let cv = RelCatalog::from_full_rows([(
            "public".to_string(),
            "uv".to_string(),
            String::new(),
            false,
            false,
            "id\u{1f}gen_random_uuid()\u{1f}0\u{1e}at\u{1f}clock_timestamp()\u{1f}2".to_string(),
            false,
        )]);
        for sql in [
            "INSERT INTO uv (v) VALUES (1)",
            "INSERT INTO uv VALUES (1, DEFAULT)",
        ] {
            let e = capture_volatile_defaults(sql, &cv, &mut false).unwrap_err();
            assert!(e.contains("does not show"), "{sql}");
        }
        assert!(
            rewrite(
                "MERGE INTO u USING s ON u.v = s.v WHEN NOT MATCHED THEN INSERT (v) VALUES (s.v)"
            )
            .is_err()
        );
        // Statements of one query string run one after the other.
        assert!(
            rewrite(
                "WITH a AS (INSERT INTO u (v) VALUES (1) RETURNING id) SELECT 1; \
                 INSERT INTO u DEFAULT VALUES"
            )
            .is_ok()
        );
        // The rewrite needs no further rewrite.
        let once = rewrite("INSERT INTO u (v, id) VALUES (1, DEFAULT)")
            .unwrap()
            .unwrap();
        assert_eq!(rewrite(&once), Ok(None), "{once}");
    }

    #[test]
    fn updates_to_volatile_defaults_are_written_out() {
        let c = RelCatalog::from_full_rows([(
            "public".to_string(),
            "u".to_string(),
            "*id".to_string(),
            false,
            false,
            "tok\u{1f}gen_random_uuid()".to_string(),
            false,
        )]);
        assert_eq!(
            expand_update_defaults("UPDATE u SET v = DEFAULT, tok = DEFAULT WHERE id < 3", &c)
                .as_deref(),
            Some("UPDATE u SET v = DEFAULT, tok = (gen_random_uuid()) WHERE id < 3")
        );
        assert_eq!(
            expand_update_defaults(
                "WITH w AS (UPDATE u SET tok = DEFAULT WHERE id = 1 RETURNING id) SELECT 1",
                &c
            )
            .as_deref(),
            Some(
                "WITH w AS (UPDATE u SET tok = (gen_random_uuid()) WHERE id = 1 RETURNING id) SELECT 1"
            )
        );
        assert_eq!(
            expand_update_defaults(
                "INSERT INTO u (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET tok = DEFAULT",
                &c
            )
            .as_deref(),
            Some(
                "INSERT INTO u (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET tok = (gen_random_uuid())"
            )
        );
        assert_eq!(
            expand_update_defaults(
                "MERGE INTO u USING s ON u.id = s.id WHEN MATCHED THEN UPDATE SET tok = DEFAULT \
                 WHEN NOT MATCHED THEN INSERT (id, tok) VALUES (s.id, DEFAULT)",
                &c
            )
            .as_deref(),
            Some(
                "MERGE INTO u USING s ON u.id = s.id WHEN MATCHED THEN UPDATE SET tok = (gen_random_uuid()) \
                 WHEN NOT MATCHED THEN INSERT (id, tok) VALUES (s.id, DEFAULT)"
            )
        );
        for sql in [
            "UPDATE u SET v = DEFAULT",
            "UPDATE other SET tok = DEFAULT",
            "INSERT INTO u (tok) VALUES (DEFAULT)",
            "UPDATE u SET tok = 'default'",
        ] {
            assert_eq!(expand_update_defaults(sql, &c), None, "{sql}");
        }
    }

    #[test]
    fn numbering_triggers_need_rows_in_a_fixed_order() {
        let row = |n: &str, numbering: bool| {
            let s = |x: &str| x.to_string();
            (
                s("public"),
                s(n),
                s("*id"),
                false,
                true,
                String::new(),
                numbering,
            )
        };
        let c = RelCatalog::from_full_rows([row("items", true), row("plain", false)]);
        let found = |sql: &str| match storage_order_dependence(sql, &c, &[]) {
            Some(OrderDependence::Numbered {
                table,
                by: Numbering::Triggers,
                ..
            }) => Some(table),
            None => None,
            other => panic!("{sql}: {other:?}"),
        };
        for sql in [
            "UPDATE items SET v = v + 1",
            "update items set v = 1 where v > 3",
            "DELETE FROM items WHERE v < 0",
            "INSERT INTO items (v) SELECT v FROM plain",
            "INSERT INTO items (v, w) SELECT v, w FROM plain ORDER BY w",
            "with d as (delete from plain returning v) update items set v = 0 from d where items.v = d.v",
            "MERGE INTO items i USING plain p ON i.id = p.id WHEN MATCHED THEN UPDATE SET v = p.v",
        ] {
            assert_eq!(found(sql).as_deref(), Some("items"), "{sql}");
        }
        for sql in [
            "UPDATE items SET v = v + 1 WHERE id = $1",
            "DELETE FROM items WHERE id = 3 AND v > 0",
            "INSERT INTO items (v) VALUES (1), (2)",
            "INSERT INTO items (v) SELECT v FROM plain ORDER BY id",
            "UPDATE plain SET v = 0",
            "SELECT * FROM items",
        ] {
            assert_eq!(found(sql), None, "{sql}");
        }
        // No table has such triggers: an UPDATE is not parsed.
        let none = RelCatalog::from_full_rows([row("items", false)]);
        assert_eq!(
            storage_order_dependence("UPDATE items SET v = 1", &none, &[]),
            None
        );
    }

    #[test]
    fn statements_that_number_rows_name_their_table() {
        let c = catalog();
        assert_eq!(
            numbers_rows("insert into public.events (v) values (1)", &c),
            Some(("public.events".into(), "\"public\".\"events\"".into()))
        );
        assert_eq!(
            numbers_rows("insert into events (v) select 1", &c),
            Some(("events".into(), "\"events\"".into()))
        );
        // No numbering trigger, no sequence default.
        assert_eq!(numbers_rows("update events set v = 1", &c), None);
        assert_eq!(
            numbers_rows("insert into pgbench_history values (1)", &c),
            None
        );
    }

    #[test]
    fn update_from_needs_one_source_row_per_target_row() {
        let c = catalog();
        let dep = |sql: &str| storage_order_dependence(sql, &c, &[]);
        let multi = |target: &str, source: &str| {
            Some(OrderDependence::MultiMatch {
                target: target.to_string(),
                source: source.to_string(),
            })
        };
        for (sql, expected) in [
            // history has no unique key: several rows may match.
            (
                "update pgbench_accounts a set abalance = h.delta from pgbench_history h where h.aid = a.aid",
                multi("pgbench_accounts", "pgbench_history"),
            ),
            // Half of pair's key.
            (
                "update events set v = p.c from pair p where p.a = events.v",
                multi("events", "pair"),
            ),
            (
                "update events e set v = public.pgbench_accounts.abalance from public.pgbench_accounts \
                 where public.pgbench_accounts.bid = e.id",
                multi("events", "public.pgbench_accounts"),
            ),
            // The whole key, to a column or a value.
            (
                "update events set v = p.c from pair p where p.a = events.v and p.b = 3",
                None,
            ),
            (
                "update pgbench_history h set delta = a.abalance from pgbench_accounts a where a.aid = h.aid",
                None,
            ),
            // The SET list does not read the source: any match gives the same.
            (
                "update events e set v = e.v + 1 from pgbench_history h where h.aid = e.id",
                None,
            ),
            // A subquery is taken as it comes.
            (
                "update events e set v = s.n from (select aid, count(*) n from pgbench_history group by aid) s \
                 where s.aid = e.id",
                None,
            ),
        ] {
            assert_eq!(dep(sql), expected, "{sql}");
        }
    }

    #[test]
    fn rows_numbered_or_picked_need_an_order_without_ties() {
        let c = catalog();
        let dep = |sql: &str| storage_order_dependence(sql, &c, &[]);
        let numbered = |table: &str, ties: bool| {
            Some(OrderDependence::Numbered {
                table: table.to_string(),
                by: Numbering::Sequence,
                ties,
            })
        };
        for (sql, expected) in [
            (
                "insert into public.events (v) select v from s",
                numbered("public.events", false),
            ),
            (
                "with x as (insert into events (v) select v from s returning id) select * from x",
                numbered("events", false),
            ),
            (
                "insert into events (v, w) select v % 3, w from s order by v % 3",
                numbered("events", true),
            ),
            (
                "insert into events (v, w) select aid, bid from pgbench_accounts a order by bid",
                numbered("events", true),
            ),
            (
                "insert into events (v) select a.abalance from pgbench_accounts a \
                 join pgbench_accounts b on a.bid = b.bid order by a.aid",
                numbered("events", true),
            ),
            (
                "insert into events (v, w) select x.v, x.w from (select v, w from s) x order by x.v",
                numbered("events", true),
            ),
            (
                "insert into events (v, w) select g, s.v from generate_series(1, 9) g, s order by g",
                numbered("events", true),
            ),
            (
                "insert into events (v, w) select x, x * 2 from unnest(array[1, 1]) x order by x",
                numbered("events", true),
            ),
            // Regrouped: no longer the function's order.
            (
                "insert into events (v) select g % 3 from generate_series(1, 9) g group by g % 3",
                numbered("events", false),
            ),
            (
                "insert into events (v) select distinct g % 3 from generate_series(1, 9) g",
                numbered("events", false),
            ),
            (
                "insert into events (v) select g from generate_series(1, 3) g \
                 union all select v from s",
                numbered("events", false),
            ),
            (
                "insert into events (v) select g from generate_series(1, 3) g, s",
                numbered("events", false),
            ),
            (
                "MERGE INTO events e USING s ON e.k = s.k WHEN NOT MATCHED THEN INSERT (k) VALUES (s.k)",
                numbered("events", false),
            ),
            (
                "delete from events where id in (select id from events order by at limit 10)",
                Some(OrderDependence::Limited),
            ),
            (
                "update pair set a = (select w from s order by v desc offset 1 limit 1) where b = 1",
                Some(OrderDependence::Limited),
            ),
            // Beyond the DISTINCT ON list, but tied rows may remain.
            (
                "insert into pgbench_history select distinct on (bid) bid, aid from pgbench_accounts \
                 order by bid, abalance desc",
                Some(OrderDependence::DistinctOn),
            ),
            (
                "create table t2 as select aid, row_number() over (order by bid) from pgbench_accounts",
                Some(OrderDependence::OrderedCall {
                    function: "row_number".into(),
                }),
            ),
            (
                "insert into pgbench_history (filler) select string_agg(filler, ',' order by bid) \
                 from pgbench_accounts group by bid",
                Some(OrderDependence::OrderedCall {
                    function: "string_agg".into(),
                }),
            ),
            (
                "update pair set b = (select array_agg(aid order by bid) from pgbench_accounts)",
                Some(OrderDependence::OrderedCall {
                    function: "array_agg".into(),
                }),
            ),
        ] {
            assert_eq!(dep(sql), expected, "{sql}");
        }
        for sql in [
            "create table t2 as select aid, row_number() over (order by bid, aid) from pgbench_accounts",
            "create table t2 as select aid, row_number() over (partition by aid order by bid) \
             from pgbench_accounts",
            "create table t2 as select aid, rank() over (order by bid) from pgbench_accounts",
            "create table t2 as select aid, sum(abalance) over (order by bid) from pgbench_accounts",
            "create table t2 as select bid, string_agg(filler, ',' order by filler) \
             from pgbench_accounts group by bid",
            "create table t2 as select bid, string_agg(filler, ',' order by bid, aid) \
             from pgbench_accounts group by bid",
            "select bid, string_agg(filler, ',' order by bid) from pgbench_accounts group by bid",
            // Every selected column ordered on: tied rows are equal.
            "insert into events (v) select v % 3 from s order by v % 3",
            "insert into events (v, w) select a, b * 2 as c from s order by 2, c, a",
            "insert into events (k, n) select k, n from s order by k, n desc",
            // Constants are the same in every row.
            "insert into events (v, w, k) select v, 0, $1 from s order by v",
            // generate_series' column names its rows.
            "insert into events (v, w) select g, g * 2 from generate_series(1, 9) g order by g",
            "insert into events (v, w) select n, 1 from generate_series(1, 9) as s(n) order by s.n",
            "insert into events (v, w) select generate_series, 0 from generate_series(1, 9) \
             order by generate_series",
            // generate_series and unnest return their rows in a fixed order.
            "insert into events (v) select g from generate_series(1, 9) g",
            "insert into events (v, w) select g, g * 2 from generate_series(1, $1) g where g % 2 = 0 limit 3",
            "insert into events (v) select x from unnest($1::int[]) with ordinality as u(x, n)",
            "insert into events (v) select generate_series(1, 9)",
            "insert into events (v, w) select 1, 2",
            // A row key of the one table read.
            "insert into events (v, w) select a.bid, a.abalance from pgbench_accounts a order by a.aid",
            "delete from events where id in (select id from events order by at, id limit 10)",
            // A row key of each table joined.
            "insert into events (v) select a.abalance from pgbench_accounts a \
             join pgbench_accounts b on a.bid = b.bid order by a.aid, b.aid",
            "insert into events (v) select a.abalance from pgbench_accounts a, pgbench_accounts b \
             order by b.aid, a.aid",
            "insert into events (v) values (1)",
            "insert into pgbench_history select * from s",
            // DISTINCT ON ordered to a row key, or over every column kept.
            "insert into pgbench_history select distinct on (bid) bid, abalance from pgbench_accounts \
             order by bid, abalance desc, aid",
            "insert into pgbench_history select distinct on (bid) bid, abalance from pgbench_accounts \
             order by bid, abalance",
            // A read is not a write.
            "select distinct on (bid) bid, abalance from pgbench_accounts order by bid",
            "MERGE INTO events e USING s ON e.k = s.k WHEN MATCHED THEN UPDATE SET v = s.v",
            // Not a write, or under EXISTS.
            "select id from events order by at limit 10",
            "delete from pair where exists (select 1 from s where s.a = pair.a order by s.v limit 1)",
        ] {
            assert_eq!(dep(sql), None, "{sql}");
        }
    }

    #[test]
    fn captures_in_multi_row_updates_are_keyed_by_row() {
        let c = RelCatalog::from_full_rows([
            (
                "public".to_string(),
                "k".to_string(),
                "*id;code".to_string(),
                true,
                false,
                String::new(),
                false,
            ),
            (
                "public".to_string(),
                "nk".to_string(),
                "code".to_string(),
                false,
                false,
                String::new(),
                false,
            ),
        ]);
        assert_eq!(
            key_captures(
                "UPDATE k SET r = reprise.captured(random()) WHERE v > 1",
                &c
            )
            .as_deref(),
            Some(
                "UPDATE k SET r = reprise.captured_keyed(random(), 'k:' || ROW(\"id\")::text) WHERE v > 1"
            )
        );
        // One row by a (nullable) unique key: ordered capture stays.
        let one = "UPDATE nk SET r = reprise.captured(random()) WHERE code = $1";
        assert_eq!(key_captures(one, &c).as_deref(), Some(one));
        // Several rows and no row key, or FROM: refused.
        assert_eq!(
            key_captures("UPDATE nk SET r = reprise.captured(random())", &c),
            None
        );
        assert_eq!(
            key_captures(
                "UPDATE k SET r = reprise.captured(random()) FROM nk WHERE nk.code = k.code",
                &c
            ),
            None
        );
        // Statements without captures are left alone.
        let plain = "UPDATE nk SET r = 1; INSERT INTO k (id) VALUES (reprise.captured(random()))";
        assert_eq!(key_captures(plain, &c).as_deref(), Some(plain));
    }

    #[test]
    fn tpcb_statements_are_row_local() {
        let c = catalog();
        assert!(is_row_local(
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            &c
        ));
        assert!(is_row_local(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, COALESCE(NULLIF(current_setting('reprise.now', true), '')::timestamptz, now()))",
            &c
        ));
        assert!(is_row_local(
            "DELETE FROM pgbench_accounts WHERE aid = 7",
            &c
        ));
        assert!(is_row_local(
            "UPDATE pair SET x = 1 WHERE a = $1 AND b = $2 AND x > 0",
            &c
        ));
        assert!(is_row_local("UPDATE s1.dup SET v = 1 WHERE id = 1", &c));
        // With savepoint statements around it.
        assert!(is_row_local(
            "SAVEPOINT a; DELETE FROM pgbench_accounts WHERE aid = 7; RELEASE SAVEPOINT a",
            &c
        ));
        assert!(is_row_local("ROLLBACK TO SAVEPOINT a", &c));
    }

    #[test]
    fn everything_else_is_not() {
        let c = catalog();
        for sql in [
            "UPDATE pgbench_accounts SET abalance = 0",
            "UPDATE pgbench_accounts SET abalance = 0 WHERE abalance = 10",
            "UPDATE pgbench_accounts SET aid = aid + 1 WHERE aid = 1",
            "UPDATE pgbench_accounts SET abalance = (SELECT 1) WHERE aid = 1",
            "UPDATE pgbench_accounts SET abalance = random() WHERE aid = 1",
            "UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 1 OR aid = 2",
            "UPDATE pgbench_accounts a SET abalance = 1 FROM pgbench_history h WHERE a.aid = h.aid",
            "UPDATE pair SET x = 1 WHERE a = 1",
            "INSERT INTO events (v) VALUES (1)",
            "INSERT INTO audited VALUES (1)",
            "UPDATE audited SET v = 1 WHERE id = 1",
            "INSERT INTO pgbench_history SELECT * FROM pgbench_history",
            "INSERT INTO pgbench_accounts VALUES (1) ON CONFLICT DO NOTHING",
            "INSERT INTO unknown VALUES (1)",
            "UPDATE dup SET v = 1 WHERE id = 1",
            "DELETE FROM pgbench_accounts WHERE abalance = 1",
            "INSERT INTO pgbench_history VALUES (1); INSERT INTO pgbench_history VALUES (2)",
            "SAVEPOINT a; UPDATE pgbench_accounts SET abalance = 0",
            "SELECT 1",
            "selec",
        ] {
            assert!(!is_row_local(sql, &c), "{sql}");
        }
    }
}
