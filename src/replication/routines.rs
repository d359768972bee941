//! The statements inside DO blocks and `sql`/`plpgsql` routine bodies.
//!
//! A write the client sends is checked against the table catalog before it
//! runs: a volatile default it leaves is captured, rows numbered in storage
//! order are refused. The same statements inside a DO block or a function
//! run on each copy as they are written, where nothing can be captured, so
//! they are found here and checked the same way (see
//! `session::write::routine_refusal`).

use serde_json::Value;

/// A DO block, function or procedure body of a statement.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RoutineBody {
    /// "DO block", "function" or "procedure".
    pub what: &'static str,
    /// Every SQL statement of the body, loops' included.
    pub statements: Vec<String>,
    /// `FOR … IN query LOOP` loops whose body has statements: what it
    /// does runs for the query's rows in the order the query returns them.
    pub loops: Vec<Loop>,
}

/// A `FOR … IN query LOOP` loop.
#[derive(Debug, PartialEq, Eq)]
pub struct Loop {
    pub query: String,
    /// The SQL statements of its body, inner loops' included.
    pub body: Vec<String>,
}

/// The routine bodies of the statements in `sql` that Reprise can read:
/// DO blocks and CREATE FUNCTION/PROCEDURE in `sql` or `plpgsql`, and what
/// their EXECUTEs of constant strings run; computed dynamic SQL cannot be
/// read.
pub fn routine_bodies(sql: &str) -> Vec<RoutineBody> {
    // Every write with a catalog passes here: most have none.
    if !["do", "function", "procedure"]
        .iter()
        .any(|w| has_word(sql, w))
    {
        return Vec::new();
    }
    let Some(parsed) = crate::route::parsed::tree(sql) else {
        return Vec::new();
    };
    let Some(tree) = parsed.json() else {
        return Vec::new();
    };
    let mut bodies = Vec::new();
    for stmt in tree["stmts"].as_array().into_iter().flatten() {
        let node = &stmt["stmt"]["node"];
        let start = stmt["stmt_location"].as_u64().unwrap_or(0) as usize;
        let text = match stmt["stmt_len"].as_u64().unwrap_or(0) as usize {
            0 => sql.get(start..),
            len => sql.get(start..start + len),
        }
        .unwrap_or("");
        let (what, language, body) = if let Some(d) = node.get("DoStmt") {
            let (language, _) = routine_options(&d["args"]);
            ("DO block", language.unwrap_or("plpgsql".into()), None)
        } else if let Some(f) = node.get("CreateFunctionStmt") {
            let (language, body) = routine_options(&f["options"]);
            let what = if f["is_procedure"] == true {
                "procedure"
            } else {
                "function"
            };
            if !f["sql_body"].is_null() {
                // BEGIN ATOMIC … END: its statements are in the tree.
                bodies.push(RoutineBody {
                    what,
                    statements: atomic_statements(text),
                    loops: Vec::new(),
                });
                continue;
            }
            (what, language.unwrap_or_default(), body)
        } else {
            continue;
        };
        let found = match language.to_ascii_lowercase().as_str() {
            "plpgsql" => plpgsql_body(text),
            "sql" => body.map(|b| split(&b)).map(|statements| RoutineBody {
                statements,
                ..RoutineBody::default()
            }),
            _ => None,
        };
        if let Some(mut found) = found {
            found.what = what;
            bodies.push(found);
        }
    }
    bodies
}

/// `word` (lower case ASCII) appears in `sql` as a word of its own.
fn has_word(sql: &str, word: &str) -> bool {
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = sql.as_bytes();
    let n = word.len();
    (0..bytes.len().saturating_sub(n - 1)).any(|i| {
        bytes[i..i + n].eq_ignore_ascii_case(word.as_bytes())
            && (i == 0 || !is_word(bytes[i - 1]))
            && bytes.get(i + n).is_none_or(|&b| !is_word(b))
    })
}

/// LANGUAGE and the AS string of DO's or CREATE FUNCTION's options.
fn routine_options(options: &Value) -> (Option<String>, Option<String>) {
    let mut language = None;
    let mut body = None;
    for opt in options.as_array().into_iter().flatten() {
        let def = &opt["node"]["DefElem"];
        let arg = &def["arg"]["node"];
        match def["defname"].as_str() {
            Some("language") => language = arg["String"]["sval"].as_str().map(str::to_string),
            Some("as") => {
                body = arg["String"]["sval"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| {
                        // CREATE FUNCTION … AS 'body' is a one-string list.
                        match arg["List"]["items"].as_array().map(Vec::as_slice) {
                            Some([only]) => {
                                only["node"]["String"]["sval"].as_str().map(str::to_string)
                            }
                            _ => None,
                        }
                    })
            }
            _ => {}
        }
    }
    (language, body)
}

/// The statements of a `plpgsql` DO block or CREATE FUNCTION statement.
fn plpgsql_body(stmt: &str) -> Option<RoutineBody> {
    let functions = parse_plpgsql(stmt)?;
    let mut body = RoutineBody::default();
    collect(&functions, &mut body);
    Some(body)
}

/// The PL/pgSQL parse tree of a DO block or CREATE FUNCTION statement.
///
/// `pg_query::parse_plpgsql` fails on every trigger function: the library
/// prints a trigger's implicit variables (TG_OP, TG_NAME, …) as `{}}`, one
/// closing brace too many, so its JSON does not parse (and trigger bodies
/// went unchecked). The text is read from the library here and repaired.
fn parse_plpgsql(stmt: &str) -> Option<Value> {
    use std::ffi::{CStr, CString, c_char, c_void};
    /// `PgQueryPlpgsqlParseResult` of pg_query.h.
    #[repr(C)]
    struct ParseResult {
        funcs: *mut c_char,
        error: *mut c_void,
    }
    unsafe extern "C" {
        fn pg_query_parse_plpgsql(input: *const c_char) -> ParseResult;
        fn pg_query_free_plpgsql_parse_result(result: ParseResult);
    }
    let input = CString::new(stmt).ok()?;
    // SAFETY: the library's own entry points (linked through the pg_query
    // crate, which calls them the same way): a NUL-terminated input, the
    // result read only before it is freed, and freed once.
    let text = unsafe {
        let result = pg_query_parse_plpgsql(input.as_ptr());
        let text = (result.error.is_null() && !result.funcs.is_null())
            .then(|| CStr::from_ptr(result.funcs).to_string_lossy().into_owned());
        pg_query_free_plpgsql_parse_result(result);
        text
    }?;
    serde_json::from_str(&repair_plpgsql_json(&text)).ok()
}

/// Drops the extra brace of each `{}}` that stands as an array element
/// (after `[` or `,`, outside strings): valid JSON never has one there.
fn repair_plpgsql_json(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if bytes[i..].starts_with(b"{}}") && matches!(out.last(), Some(b'[' | b',')) {
            out.extend_from_slice(b"{}");
            i += 3;
            continue;
        }
        out.push(b);
        i += 1;
    }
    // Only ASCII bytes were dropped.
    String::from_utf8(out).unwrap_or_default()
}

/// Walks a PL/pgSQL tree for its SQL statements and its loops over queries.
fn collect(v: &Value, body: &mut RoutineBody) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect(i, body)),
        Value::Object(map) => {
            for (kind, node) in map {
                match kind.as_str() {
                    // A whole SQL statement (parse mode 0; expressions are
                    // other modes).
                    "PLpgSQL_expr" if node["parseMode"].as_i64().unwrap_or(0) == 0 => {
                        if let Some(q) = node["query"].as_str() {
                            body.statements.push(q.to_string());
                        }
                    }
                    // EXECUTE of a constant string is that statement.
                    "PLpgSQL_stmt_dynexecute" => {
                        let expr = node["query"]["PLpgSQL_expr"]["query"].as_str();
                        if let Some(sql) = expr.and_then(constant_string) {
                            body.statements.extend(split(&sql));
                        }
                        collect(&node["params"], body);
                    }
                    "PLpgSQL_stmt_fors" | "PLpgSQL_stmt_dynfors" => {
                        let mut inner = RoutineBody::default();
                        collect(&node["body"], &mut inner);
                        let text = node["query"]["PLpgSQL_expr"]["query"].as_str();
                        let constant = match kind.as_str() {
                            "PLpgSQL_stmt_dynfors" => text.and_then(constant_string),
                            _ => text.map(str::to_string),
                        };
                        let query = constant.as_deref();
                        if let Some(q) = query {
                            body.statements.push(q.to_string());
                            if !inner.statements.is_empty() {
                                body.loops.push(Loop {
                                    query: q.to_string(),
                                    body: inner.statements.clone(),
                                });
                            }
                        }
                        body.statements.append(&mut inner.statements);
                        body.loops.append(&mut inner.loops);
                    }
                    _ => collect(node, body),
                }
            }
        }
        _ => {}
    }
}

/// The value of a PL/pgSQL expression that is one string constant
/// (`'INSERT … ''x'' …'`, `$q$…$q$`): what an EXECUTE of it runs. None for
/// anything computed.
fn constant_string(expr: &str) -> Option<String> {
    let sql = format!("SELECT {expr}");
    let parsed = crate::route::parsed::tree(&sql)?;
    let tree = parsed.json()?;
    let [stmt] = tree["stmts"].as_array()?.as_slice() else {
        return None;
    };
    let [target] = stmt["stmt"]["node"]["SelectStmt"]["target_list"]
        .as_array()?
        .as_slice()
    else {
        return None;
    };
    let value = &target["node"]["ResTarget"]["val"]["node"]["AConst"]["val"]["Sval"]["sval"];
    value.as_str().map(str::to_string)
}

/// The statements of a `BEGIN ATOMIC … END` body in `stmt`.
fn atomic_statements(stmt: &str) -> Vec<String> {
    use pg_query::protobuf::Token;
    let Some(tokens) = super::determinism::scan(stmt) else {
        return Vec::new();
    };
    let atomic = tokens
        .windows(2)
        .position(|w| w[0].token == Token::BeginP as i32 && w[1].token == Token::Atomic as i32);
    let end = tokens.iter().rposition(|t| t.token == Token::EndP as i32);
    match (atomic, end) {
        (Some(a), Some(e)) if a + 2 <= e => {
            let from = tokens[a + 1].end as usize;
            let to = tokens[e].start as usize;
            stmt.get(from..to).map(split).unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// A string of SQL statements, one by one.
fn split(sql: &str) -> Vec<String> {
    match pg_query::split_with_parser(sql) {
        Ok(parts) => parts
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Err(_) => vec![sql.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trigger functions are read too (the library's JSON of them needs
    /// the repair), with NEW and TG_ variables in their statements.
    #[test]
    fn trigger_functions_give_their_statements() {
        let b = routine_bodies(
            "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             INSERT INTO audit_log(what) VALUES (TG_OP || ':' || NEW.v); \
             NEW.changed := now(); RETURN NEW; END $$",
        );
        assert_eq!(b.len(), 1);
        assert_eq!(
            b[0].statements,
            vec!["INSERT INTO audit_log(what) VALUES (TG_OP || ':' || NEW.v)"]
        );
        assert_eq!(
            repair_plpgsql_json(r#"{"a":[{"x":{}},{}},{}}],"s":",{}}[{}}","b":{}}"#),
            r#"{"a":[{"x":{}},{},{}],"s":",{}}[{}}","b":{}}"#
        );
    }

    #[test]
    fn do_blocks_and_routines_give_their_statements() {
        let b = routine_bodies(
            "DO $$ BEGIN INSERT INTO items(name) VALUES ('x'); \
             IF true THEN UPDATE items SET qty = DEFAULT; END IF; END $$",
        );
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].what, "DO block");
        assert_eq!(
            b[0].statements,
            vec![
                "INSERT INTO items(name) VALUES ('x')",
                "UPDATE items SET qty = DEFAULT"
            ]
        );
        assert!(b[0].loops.is_empty());

        let b = routine_bodies(
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $f$ DECLARE r record; BEGIN \
             FOR r IN SELECT v FROM src LOOP INSERT INTO dst(v) VALUES (r.v); END LOOP; \
             FOR r IN SELECT 1 LOOP NULL; END LOOP; END $f$",
        );
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].what, "function");
        assert_eq!(
            b[0].loops,
            vec![Loop {
                query: "SELECT v FROM src".into(),
                body: vec!["INSERT INTO dst(v) VALUES (r.v)".into()],
            }]
        );
        assert!(
            b[0].statements
                .contains(&"INSERT INTO dst(v) VALUES (r.v)".to_string())
        );

        let b = routine_bodies(
            "SELECT 1; CREATE PROCEDURE p(n text) LANGUAGE sql AS 'INSERT INTO t(a) VALUES (n); DELETE FROM u'",
        );
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].what, "procedure");
        assert_eq!(
            b[0].statements,
            vec!["INSERT INTO t(a) VALUES (n)", "DELETE FROM u"]
        );

        let b = routine_bodies(
            "CREATE FUNCTION g(n text) RETURNS void LANGUAGE sql BEGIN ATOMIC INSERT INTO t(a) VALUES (n); END",
        );
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].statements, vec!["INSERT INTO t(a) VALUES (n)"]);

        // EXECUTE of a constant string runs that string; of anything
        // computed, it cannot be read.
        let b = routine_bodies(
            "DO $$ DECLARE r record; BEGIN EXECUTE 'INSERT INTO t(a) VALUES (''x'')'; \
             EXECUTE 'DELETE FROM ' || 't'; \
             FOR r IN EXECUTE 'SELECT v FROM src' LOOP INSERT INTO dst(v) VALUES (r.v); END LOOP; END $$",
        );
        assert_eq!(
            b[0].statements,
            vec![
                "INSERT INTO t(a) VALUES ('x')",
                "SELECT v FROM src",
                "INSERT INTO dst(v) VALUES (r.v)"
            ]
        );
        assert_eq!(b[0].loops[0].query, "SELECT v FROM src");

        // Other languages, and statements with no body, give none.
        assert!(has_word("x; DO $$", "do") && has_word("do", "do"));
        assert!(!has_word("INSERT INTO todo VALUES ('done')", "do"));
        assert!(
            routine_bodies("CREATE FUNCTION c() RETURNS int LANGUAGE c AS 'lib', 'sym'").is_empty()
        );
        assert!(routine_bodies("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING").is_empty());
    }
}
