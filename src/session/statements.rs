//! Prepared statements of one client session, independent of the node
//! that runs them: a statement the client prepared on one node is prepared
//! on demand on whichever node later runs it.

use std::sync::Arc;

use bytes::BytesMut;

use crate::route::Classification;
use crate::route::SqlPrepared;
use crate::wire::Frame;
use crate::wire::messages::{Reader, put_cstr, put_message};

/// A statement as the client defined it.
#[derive(Debug)]
pub struct StmtDef {
    pub name: String,
    /// Changes each time the client (re)defines the name.
    pub generation: u64,
    /// The client's Parse message, replayed verbatim on other nodes.
    pub parse: Frame,
    pub class: Arc<Classification>,
    /// The text of `parse` (read once: the write path looks at it on
    /// every execution).
    pub sql: String,
}

impl StmtDef {
    /// What executing it does to SQL-level prepared statements (a PREPARE
    /// with its text as sent to the node).
    pub fn sql_prepared(&self) -> impl Iterator<Item = SqlPrepared> + '_ {
        self.class.prepared.iter().map(|p| match p {
            SqlPrepared::Prepare { name, .. } => SqlPrepared::Prepare {
                name: name.clone(),
                text: self.sql.clone(),
            },
            other => other.clone(),
        })
    }
}

/// The session's statements by name ("" is the unnamed statement).
#[derive(Debug, Default)]
pub struct Statements {
    /// A fast hash: looked up for every Bind, keys are this client's own.
    defs: rustc_hash::FxHashMap<String, Arc<StmtDef>>,
    next_generation: u64,
}

impl Statements {
    /// Records a Parse; returns the new definition and the generation the
    /// name had before (None if it was not defined).
    pub fn define(
        &mut self,
        name: &str,
        parse: Frame,
        class: Arc<Classification>,
    ) -> (Arc<StmtDef>, Option<u64>) {
        self.next_generation += 1;
        let sql = parse_fields(parse.body())
            .map(|(_, q)| q.to_string())
            .unwrap_or_default();
        let def = Arc::new(StmtDef {
            name: name.to_string(),
            generation: self.next_generation,
            parse,
            class,
            sql,
        });
        let previous = self
            .defs
            .insert(name.to_string(), def.clone())
            .map(|d| d.generation);
        (def, previous)
    }

    pub fn get(&self, name: &str) -> Option<Arc<StmtDef>> {
        self.defs.get(name).cloned()
    }

    pub fn close(&mut self, name: &str) {
        self.defs.remove(name);
    }
}

/// Parse: statement name and query text.
pub fn parse_fields(body: &[u8]) -> Option<(&str, &str)> {
    let mut r = Reader::new(body);
    let name = r.cstr()?;
    let query = r.cstr()?;
    Some((name, query))
}

/// Bind: portal and statement names.
pub fn bind_statement(body: &[u8]) -> Option<&str> {
    let mut r = Reader::new(body);
    r.cstr()?;
    r.cstr()
}

/// Describe or Close: kind ('S' or 'P') and name.
pub fn target(body: &[u8]) -> Option<(u8, &str)> {
    let mut r = Reader::new(body);
    let kind = r.u8()?;
    Some((kind, r.cstr()?))
}

/// The same Parse with another query text (parameter types kept).
pub fn rewrite_parse(parse: &Frame, sql: &str) -> Frame {
    let body = parse.body();
    let mut r = Reader::new(body);
    let (Some(name), Some(_)) = (r.cstr(), r.cstr()) else {
        return parse.clone();
    };
    let mut b = BytesMut::new();
    put_cstr(&mut b, name);
    put_cstr(&mut b, sql);
    b.extend_from_slice(r.rest());
    let mut raw = BytesMut::new();
    put_message(b'P', &b, &mut raw);
    Frame {
        tag: b'P',
        raw: raw.freeze(),
    }
}

/// A Close of a prepared statement.
pub fn close_statement(name: &str) -> Frame {
    let mut body = BytesMut::new();
    body.extend_from_slice(b"S");
    put_cstr(&mut body, name);
    let mut raw = BytesMut::new();
    put_message(b'C', &body, &mut raw);
    Frame {
        tag: b'C',
        raw: raw.freeze(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_extended_messages() {
        let mut body = BytesMut::new();
        put_cstr(&mut body, "s1");
        put_cstr(&mut body, "select $1");
        body.extend_from_slice(&0i16.to_be_bytes());
        assert_eq!(parse_fields(&body), Some(("s1", "select $1")));
        assert_eq!(parse_fields(b"s1"), None);
        let mut bind = BytesMut::new();
        put_cstr(&mut bind, "");
        put_cstr(&mut bind, "s1");
        assert_eq!(bind_statement(&bind), Some("s1"));
        assert_eq!(target(b"Sabc\0"), Some((b'S', "abc")));
        assert_eq!(target(b""), None);
        let c = close_statement("x");
        assert_eq!(target(c.body()), Some((b'S', "x")));
    }

    #[test]
    fn redefining_a_name_changes_its_generation() {
        let mut s = Statements::default();
        let class = Arc::new(crate::route::classify(
            "select 1",
            &crate::route::FunctionCatalog::builtin(),
        ));
        let f = Frame::new(b'P', b"a\0select 1\0\0\0");
        let (d1, prev) = s.define("a", f.clone(), class.clone());
        assert_eq!(prev, None);
        let (d2, prev) = s.define("a", f, class);
        assert_eq!(prev, Some(d1.generation));
        assert_ne!(d1.generation, d2.generation);
        s.close("a");
        assert!(s.get("a").is_none());
    }
}
