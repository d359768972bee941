//! A small hand-written SQL lexer: cache keys and comment trimming.
//!
//! It runs on every client statement, before and instead of the real parser,
//! so it is one pass over the bytes with no allocation besides the output.
//! It follows PostgreSQL's lexer with `standard_conforming_strings = on`
//! (the same assumption pg_query makes) and gives up — returns `None` — on
//! anything it is not sure about.
//!
//! # Why a key may merge literals
//!
//! [`cache_key`] keeps every token except literals and whitespace, and
//! keeps whether two tokens were adjacent. Numbers become `0` and strings
//! of every kind become `''`: placeholders that are themselves literals of
//! the same class, so they cannot be confused with the `?` operator. Two
//! texts with the same key therefore differ only in literal values, and if
//! both parse they have the same statement kinds, functions and clauses.
//! (Texts where that is not true, like `'a' 'b'` next to a valid
//! continuation, fail to parse: a wrong cached answer for them only sends a
//! syntax error to a different node, which reports it just the same.)

/// What the lexer found at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// Whitespace or a comment.
    Space,
    /// A numeric literal (including trailing junk, which PostgreSQL rejects).
    Number,
    /// A string literal of any kind: `'…'`, `E'…'`, `B'…'`, `X'…'`, `N'…'`,
    /// `U&'…'`, `$tag$…$tag$`.
    Str,
    /// Anything kept as written: identifiers, quoted identifiers, `$n`
    /// parameters, operator and punctuation characters.
    Verbatim,
}

/// The lexer cannot tell where a token ends (unterminated quote or comment)
/// or the text holds something it does not handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unsure;

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

fn is_dollar_tag_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// The token starting at `i` (which must be in bounds): its kind and end.
fn next_token(b: &[u8], i: usize) -> Result<(Tok, usize), Unsure> {
    let at = |k: usize| b.get(k).copied().unwrap_or(0);
    let c = b[i];
    match c {
        _ if is_space(c) => {
            let mut j = i + 1;
            while j < b.len() && is_space(b[j]) {
                j += 1;
            }
            Ok((Tok::Space, j))
        }
        b'-' if at(i + 1) == b'-' => {
            let mut j = i + 2;
            while j < b.len() && !matches!(b[j], b'\n' | b'\r') {
                j += 1;
            }
            Ok((Tok::Space, j))
        }
        b'/' if at(i + 1) == b'*' => block_comment_end(b, i).map(|j| (Tok::Space, j)),
        b'\'' => standard_string_end(b, i + 1).map(|j| (Tok::Str, j)),
        b'"' => quoted_ident_end(b, i + 1).map(|j| (Tok::Verbatim, j)),
        b'$' if at(i + 1).is_ascii_digit() => {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            Ok((Tok::Verbatim, j))
        }
        b'$' => match dollar_string_end(b, i)? {
            Some(j) => Ok((Tok::Str, j)),
            None => Ok((Tok::Verbatim, i + 1)),
        },
        b'0'..=b'9' => Ok((Tok::Number, number_end(b, i))),
        b'.' if at(i + 1).is_ascii_digit() => Ok((Tok::Number, number_end(b, i))),
        b'e' | b'E' if at(i + 1) == b'\'' => escape_string_end(b, i + 2).map(|j| (Tok::Str, j)),
        b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if at(i + 1) == b'\'' => {
            standard_string_end(b, i + 2).map(|j| (Tok::Str, j))
        }
        b'u' | b'U' if at(i + 1) == b'&' && at(i + 2) == b'\'' => {
            standard_string_end(b, i + 3).map(|j| (Tok::Str, j))
        }
        // U&"…" identifiers take their meaning from a UESCAPE literal that
        // the key would drop.
        b'u' | b'U' if at(i + 1) == b'&' && at(i + 2) == b'"' => Err(Unsure),
        _ if is_ident_start(c) => {
            let mut j = i + 1;
            while j < b.len() && is_ident_cont(b[j]) {
                j += 1;
            }
            Ok((Tok::Verbatim, j))
        }
        0 => Err(Unsure),
        _ => Ok((Tok::Verbatim, i + 1)),
    }
}

/// End of a (nested) `/* */` comment starting at `i`.
fn block_comment_end(b: &[u8], i: usize) -> Result<usize, Unsure> {
    let mut depth = 0usize;
    let mut j = i;
    while j + 1 < b.len() {
        match (b[j], b[j + 1]) {
            (b'/', b'*') => {
                depth += 1;
                j += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                j += 2;
                if depth == 0 {
                    return Ok(j);
                }
            }
            _ => j += 1,
        }
    }
    Err(Unsure)
}

/// End of a `'…'` string whose body starts at `j` (`''` is a quote).
fn standard_string_end(b: &[u8], mut j: usize) -> Result<usize, Unsure> {
    while j < b.len() {
        if b[j] == b'\'' {
            if b.get(j + 1) == Some(&b'\'') {
                j += 2;
                continue;
            }
            return Ok(j + 1);
        }
        j += 1;
    }
    Err(Unsure)
}

/// End of an `E'…'` string whose body starts at `j` (backslash escapes).
fn escape_string_end(b: &[u8], mut j: usize) -> Result<usize, Unsure> {
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'\'' if b.get(j + 1) == Some(&b'\'') => j += 2,
            b'\'' => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err(Unsure)
}

/// End of a `"…"` identifier whose body starts at `j` (`""` is a quote).
fn quoted_ident_end(b: &[u8], mut j: usize) -> Result<usize, Unsure> {
    while j < b.len() {
        if b[j] == b'"' {
            if b.get(j + 1) == Some(&b'"') {
                j += 2;
                continue;
            }
            return Ok(j + 1);
        }
        j += 1;
    }
    Err(Unsure)
}

/// If a `$tag$` delimiter starts at `i`, the end of the dollar-quoted string.
fn dollar_string_end(b: &[u8], i: usize) -> Result<Option<usize>, Unsure> {
    let mut k = i + 1;
    if k < b.len() && is_ident_start(b[k]) {
        k += 1;
        while k < b.len() && is_dollar_tag_cont(b[k]) {
            k += 1;
        }
    }
    if b.get(k) != Some(&b'$') {
        return Ok(None);
    }
    let delim = &b[i..=k];
    let body = k + 1;
    match b[body..].windows(delim.len()).position(|w| w == delim) {
        Some(p) => Ok(Some(body + p + delim.len())),
        None => Err(Unsure),
    }
}

/// End of a numeric literal starting at `i` (a digit, or `.` and a digit).
fn number_end(b: &[u8], i: usize) -> usize {
    let at = |k: usize| b.get(k).copied().unwrap_or(0);
    let digits = |mut j: usize| {
        while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'_') {
            j += 1;
        }
        j
    };
    let mut j = i;
    if b[i] == b'0' && matches!(at(i + 1), b'x' | b'X' | b'o' | b'O' | b'b' | b'B') {
        // 0x1F, 0o17, 0b101: digits of any base, then junk, all one token.
        j += 2;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
    } else {
        if b[j] != b'.' {
            j = digits(j);
        }
        // `1..5` is the integer 1 followed by `..`.
        if at(j) == b'.' && at(j + 1) != b'.' {
            j = digits(j + 1);
        }
        if matches!(at(j), b'e' | b'E') {
            let mut k = j + 1;
            if matches!(at(k), b'+' | b'-') {
                k += 1;
            }
            if at(k).is_ascii_digit() {
                j = digits(k);
            }
        }
    }
    // An identifier glued to a number is "trailing junk" to PostgreSQL.
    if j < b.len() && is_ident_start(b[j]) {
        while j < b.len() && is_ident_cont(b[j]) {
            j += 1;
        }
    }
    j
}

/// A cache key for `sql`: the text with comments dropped, whitespace runs
/// collapsed to one space, numeric literals replaced by `0` and string
/// literals of every kind (`'…'`, `E'…'`, `B'…'`, `X'…'`, `N'…'`, `U&'…'`,
/// `$tag$…$tag$`) by `''`. Identifiers (quoted ones verbatim), keywords,
/// operators and `$n` parameters are kept, in their original case.
///
/// Texts that differ only in literal values get the same key. Returns
/// `None` when unsure (unterminated quote or comment, `U&"…"` identifiers,
/// NUL bytes): the caller then classifies without the cache.
pub fn cache_key(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    let mut key = String::with_capacity(sql.len());
    let mut space = false;
    let mut i = 0;
    while i < b.len() {
        let (tok, end) = next_token(b, i).ok()?;
        if tok == Tok::Space {
            space = true;
        } else {
            if space && !key.is_empty() {
                key.push(' ');
            }
            space = false;
            match tok {
                Tok::Number => key.push('0'),
                Tok::Str => key.push_str("''"),
                _ => key.push_str(sql.get(i..end)?),
            }
        }
        i = end;
    }
    Some(key)
}

/// `sql` from its first token on: leading white space and comments
/// skipped, the rest not scanned.
pub fn trim_start_sql(sql: &str) -> &str {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let Ok((tok, end)) = next_token(b, i) else {
            return sql.trim_start();
        };
        if tok != Tok::Space {
            return sql.get(i..).unwrap_or(sql);
        }
        i = end;
    }
    ""
}

/// `sql` without leading and trailing whitespace and comments, so that a
/// statement's text can be joined with others by `;` (a trailing `--`
/// comment would swallow what follows). When the lexer is unsure it only
/// trims whitespace.
pub fn trim_sql(sql: &str) -> &str {
    let b = sql.as_bytes();
    let mut first = None;
    let mut last = 0;
    let mut i = 0;
    while i < b.len() {
        let Ok((tok, end)) = next_token(b, i) else {
            return sql.trim();
        };
        if tok != Tok::Space {
            first.get_or_insert(i);
            last = end;
        }
        i = end;
    }
    match first {
        Some(first) => sql.get(first..last).unwrap_or(sql.trim()),
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sql: &str) -> String {
        cache_key(sql).unwrap_or_else(|| panic!("no key for {sql:?}"))
    }

    #[test]
    fn literals_become_placeholders() {
        let cases = [
            ("select 1", "select 0"),
            (
                "select 12345, 1.5, .5, 1e5, 1.5E-3, 1_000",
                "select 0, 0, 0, 0, 0, 0",
            ),
            ("select 0x1F, 0o17, 0b101", "select 0, 0, 0"),
            ("select -1", "select -0"),
            ("select 'abc'", "select ''"),
            ("select 'it''s'", "select ''"),
            ("select E'a\\'b', e'\\\\'", "select '', ''"),
            ("select 'a\\'", "select ''"),
            (
                "select B'101', X'1F', N'x', U&'d\\0061t'",
                "select '', '', '', ''",
            ),
            ("select $$a 'b' c$$", "select ''"),
            ("select $fn$ $$ $x$ $fn$", "select ''"),
            ("select $1, $23", "select $1, $23"),
            ("select t1, x2y, a$b from t", "select t1, x2y, a$b from t"),
            (
                "select \"Quoted \"\" 1\" from \"T\"",
                "select \"Quoted \"\" 1\" from \"T\"",
            ),
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 42",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 0",
            ),
            (
                "select a[1:2], b::int, c->>'k'",
                "select a[0:0], b::int, c->>''",
            ),
            ("select 1..5", "select 0.0"),
            ("select 123abc", "select 0"),
            ("select $1::text || 'x'", "select $1::text || ''"),
        ];
        for (sql, want) in cases {
            assert_eq!(key(sql), want, "{sql}");
        }
    }

    #[test]
    fn comments_and_whitespace_are_dropped() {
        let cases = [
            ("  select\n\t1  ", "select 0"),
            ("select 1 -- trailing", "select 0"),
            ("-- leading\nselect 1", "select 0"),
            ("select /* c */ 1", "select 0"),
            ("select /* outer /* inner */ still */ 1", "select 0"),
            ("select a/**/b", "select a b"),
            ("select 1*--c\n2", "select 0* 0"),
            ("", ""),
            ("-- only a comment", ""),
        ];
        for (sql, want) in cases {
            assert_eq!(key(sql), want, "{sql}");
        }
    }

    #[test]
    fn keys_separate_what_matters() {
        assert_eq!(
            key("select * from t where a = 1"),
            key("select  *  from t where a = 999")
        );
        assert_eq!(key("select 'x'"), key("select $q$y$q$"));
        assert_ne!(key("select a"), key("select b"));
        assert_ne!(key("select a"), key("SELECT a"), "case is kept");
        assert_ne!(key("select \"A\""), key("select \"a\""));
        assert_ne!(
            key("select a ? b"),
            key("select a 'x' b"),
            "? is an operator"
        );
        assert_ne!(key("select 1 abc"), key("select 1abc"));
        assert_ne!(key("select - -1"), key("select --1\n"));
        assert_ne!(key("select $1"), key("select 1"));
        assert_ne!(key("select nextval('s')"), key("select lower('s')"));
        // Identifiers are not eaten by the literal prefixes.
        assert_eq!(key("select xe'a', be, e"), "select xe'', be, e");
    }

    #[test]
    fn unsure_inputs_have_no_key() {
        for sql in [
            "select 'abc",
            "select E'abc\\'",
            "select \"abc",
            "select /* abc",
            "select /* /* */",
            "select $$abc",
            "select $a$ abc $b$",
            "select U&\"d\\0061t\"",
            "select 1\0",
            "select e'",
            "select '",
        ] {
            assert_eq!(cache_key(sql), None, "{sql:?}");
        }
    }

    #[test]
    fn lone_dollars_and_odd_bytes_are_kept() {
        assert_eq!(key("select $ 1"), "select $ 0");
        assert_eq!(key("select $a"), "select $a");
        assert_eq!(key("select é, 'é'"), "select é, ''");
        assert_eq!(key("select \u{7}"), "select \u{7}");
    }

    #[test]
    fn trim_drops_surrounding_comments() {
        assert_eq!(trim_sql("  set x = 1 -- c"), "set x = 1");
        assert_eq!(
            trim_sql("/* a */ set x = 'a -- b' /* c */\n"),
            "set x = 'a -- b'"
        );
        assert_eq!(trim_sql(" -- only"), "");
        assert_eq!(trim_sql(" set x = 'oops "), "set x = 'oops");
        assert_eq!(
            trim_start_sql("/* a */ -- b\n set x = 1 -- c"),
            "set x = 1 -- c"
        );
        assert_eq!(trim_start_sql(" -- only"), "");
    }

    /// A tiny deterministic generator, so the tests need no extra crate.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407))
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng::new(7);
        for _ in 0..5000 {
            let len = rng.below(40);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = cache_key(&text);
            let _ = trim_sql(&text);
            let ascii: String = bytes
                .iter()
                .map(|b| char::from(b"'\"$e-/*.0x9 \nE&U_;"[*b as usize % 18]))
                .collect();
            let _ = cache_key(&ascii);
            let _ = trim_sql(&ascii);
        }
    }
}
