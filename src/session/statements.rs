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

/// The text a Bind gives parameter `n` (from 1) of the statement `parse`
/// defines: a value sent as text, or in binary for a parameter of type
/// text (declared so, or left for the server to infer); `Some(None)` for
/// NULL. None for binary of any other type and for a malformed message.
pub fn bound_text(parse: &Frame, bind: &[u8], n: usize) -> Option<Option<String>> {
    const TEXT_OIDS: [i32; 3] = [0, 25, 1043];
    let i = n.checked_sub(1)?;
    let mut p = Reader::new(parse.body());
    p.cstr()?;
    p.cstr()?;
    let declared = usize::try_from(p.i16()?).ok()?;
    let oid = if i < declared {
        p.bytes(4 * i)?;
        p.i32()?
    } else {
        0
    };
    let mut b = Reader::new(bind);
    b.cstr()?;
    b.cstr()?;
    let formats = usize::try_from(b.i16()?).ok()?;
    let mut format = 0;
    for k in 0..formats {
        let f = b.i16()?;
        if k == i || formats == 1 {
            format = f;
        }
    }
    let count = usize::try_from(b.i16()?).ok()?;
    if i >= count {
        return None;
    }
    for _ in 0..i {
        let len = b.i32()?;
        if len > 0 {
            b.bytes(len as usize)?;
        }
    }
    let len = b.i32()?;
    if len == -1 {
        return Some(None);
    }
    let value = b.bytes(usize::try_from(len).ok()?)?;
    (format == 0 || TEXT_OIDS.contains(&oid))
        .then(|| std::str::from_utf8(value).ok().map(str::to_string))
        .flatten()
        .map(Some)
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

    #[test]
    fn bound_text_reads_text_parameters() {
        let parse = |types: &[i32]| {
            let mut b = BytesMut::new();
            put_cstr(&mut b, "");
            put_cstr(&mut b, "select set_config($1, $2, false)");
            b.extend_from_slice(&(types.len() as i16).to_be_bytes());
            for t in types {
                b.extend_from_slice(&t.to_be_bytes());
            }
            Frame::new(b'P', &b)
        };
        let bind = |formats: &[i16], values: &[Option<&[u8]>]| {
            let mut b = BytesMut::new();
            put_cstr(&mut b, "");
            put_cstr(&mut b, "");
            b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
            for f in formats {
                b.extend_from_slice(&f.to_be_bytes());
            }
            b.extend_from_slice(&(values.len() as i16).to_be_bytes());
            for v in values {
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
        };
        let some = |v: &str| Some(Some(v.to_string()));
        let text = bind(&[], &[Some(b"search_path"), Some(b"s2, public")]);
        assert_eq!(bound_text(&parse(&[]), &text, 1), some("search_path"));
        assert_eq!(bound_text(&parse(&[]), &text, 2), some("s2, public"));
        assert_eq!(bound_text(&parse(&[]), &text, 3), None);
        assert_eq!(bound_text(&parse(&[]), &text, 0), None);
        // Binary is read only for a parameter of type text.
        let binary = bind(&[0, 1], &[Some(b"TimeZone"), Some(b"UTC")]);
        assert_eq!(bound_text(&parse(&[]), &binary, 2), some("UTC"));
        assert_eq!(bound_text(&parse(&[25, 1043]), &binary, 2), some("UTC"));
        assert_eq!(bound_text(&parse(&[25, 23]), &binary, 2), None);
        assert_eq!(bound_text(&parse(&[25, 23]), &binary, 1), some("TimeZone"));
        // NULL (a reset) is told apart from a cut message.
        let null = bind(&[1], &[Some(b"TimeZone"), None]);
        assert_eq!(bound_text(&parse(&[]), &null, 2), Some(None));
        assert_eq!(bound_text(&parse(&[]), &text[..text.len() - 8], 2), None);
    }
}
