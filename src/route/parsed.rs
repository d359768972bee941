//! Statement texts parsed once.
//!
//! Routing and the write path each look at a statement's tree: the
//! classifier, the determinism and row-locality checks, the rewrites for
//! captured values. Each used to parse the text itself, and to convert the
//! tree to JSON; for a multi-row INSERT of thousands of rows that made the
//! proxy spend ten times as long as the node running it. The last few
//! texts parsed on this thread are kept with their tree (the analyses of
//! one statement run one after the other, without yielding), and the JSON
//! form is made once, when first asked for.

use std::cell::{OnceCell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;

use pg_query::protobuf::ParseResult;
use serde_json::Value;

/// How many texts each thread keeps.
const KEPT: usize = 4;

/// A statement text's parse tree.
pub struct Parsed {
    pub tree: ParseResult,
    json: OnceCell<Option<Value>>,
}

impl std::ops::Deref for Parsed {
    type Target = ParseResult;

    fn deref(&self) -> &ParseResult {
        &self.tree
    }
}

impl Parsed {
    /// The tree as JSON (`{"stmts": [...]}` with pg_query's field names).
    pub fn json(&self) -> Option<&Value> {
        self.json
            .get_or_init(|| serde_json::to_value(&self.tree).ok())
            .as_ref()
    }
}

/// Why a text has no tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Valid SQL nested deeper than the tree decoder's limit of 100
    /// messages (e.g. ~50 chained `||`).
    TooDeep,
    /// Not SQL PostgreSQL accepts (or a NUL byte, which the parser cannot
    /// take; or the parser's wrapper panicked on an odd tree).
    Invalid,
}

thread_local! {
    static KEPT_TREES: RefCell<Vec<(String, Rc<Parsed>)>> = const { RefCell::new(Vec::new()) };
}

/// The tree of `sql`, parsed now or found among this thread's last texts.
pub fn parse(sql: &str) -> Result<Rc<Parsed>, ParseError> {
    let found = KEPT_TREES.with_borrow(|kept| {
        kept.iter()
            .find(|(text, _)| text == sql)
            .map(|(_, p)| p.clone())
    });
    if let Some(parsed) = found {
        return Ok(parsed);
    }
    if sql.contains('\0') {
        return Err(ParseError::Invalid);
    }
    let result = panic::catch_unwind(AssertUnwindSafe(|| pg_query::parse(sql, 0)))
        .map_err(|_| ParseError::Invalid)?;
    let tree = match result {
        Ok(parsed) => parsed.protobuf,
        Err(pg_query::Error::Decode(e)) => {
            tracing::debug!(error = %e, "statement too deeply nested to walk");
            return Err(ParseError::TooDeep);
        }
        Err(e) => {
            tracing::trace!(error = %e, "statement did not parse");
            return Err(ParseError::Invalid);
        }
    };
    let parsed = Rc::new(Parsed {
        tree,
        json: OnceCell::new(),
    });
    KEPT_TREES.with_borrow_mut(|kept| {
        if kept.len() == KEPT {
            kept.remove(0);
        }
        kept.push((sql.to_string(), parsed.clone()));
    });
    Ok(parsed)
}

/// The tree of `sql`, or None when it does not parse.
pub fn tree(sql: &str) -> Option<Rc<Parsed>> {
    parse(sql).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_parsed_once_while_it_is_kept() {
        let a = tree("SELECT 1; INSERT INTO t VALUES (1)").unwrap();
        let again = tree("SELECT 1; INSERT INTO t VALUES (1)").unwrap();
        assert!(Rc::ptr_eq(&a, &again));
        assert_eq!(a.stmts.len(), 2);
        assert!(a.json().unwrap()["stmts"][1]["stmt"]["node"]["InsertStmt"].is_object());
        for i in 0..KEPT {
            tree(&format!("SELECT {i}")).unwrap();
        }
        let later = tree("SELECT 1; INSERT INTO t VALUES (1)").unwrap();
        assert!(!Rc::ptr_eq(&a, &later), "pushed out by newer texts");
        assert_eq!(parse("SELEC 1").err(), Some(ParseError::Invalid));
        assert_eq!(parse("SELECT '\0'").err(), Some(ParseError::Invalid));
        let deep = format!("SELECT {}", vec!["'a'"; 120].join(" || "));
        assert_eq!(parse(&deep).err(), Some(ParseError::TooDeep));
    }
}
