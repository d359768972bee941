//! The few messages the proxy builds itself or must look inside. Everything
//! else is forwarded as raw bytes.

use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::{
    CommandComplete, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};

/// An error the proxy reports to a client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// ERROR or FATAL.
    pub severity: &'static str,
    /// The five-character SQLSTATE.
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    /// An ERROR: the session goes on.
    pub fn error(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "ERROR",
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A FATAL error: the connection is closed after it.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "FATAL",
            ..PgError::error(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> PgError {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> PgError {
        self.detail = Some(detail.into());
        self
    }

    /// Appends the ErrorResponse to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut fields = vec![
            (b'S', self.severity.to_string()),
            (b'V', self.severity.to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        encode(&ErrorResponse::new(fields), out);
    }

    /// The SQLSTATE class (first two characters), for metrics.
    pub fn class(&self) -> &'static str {
        &self.code[..2]
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

fn encode<M: Message>(m: &M, out: &mut BytesMut) {
    m.encode(out).expect("encoding into a BytesMut cannot fail");
}

pub fn ready_for_query(status: u8, out: &mut BytesMut) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(&ReadyForQuery::new(status), out);
}

pub fn command_complete(tag: &str, out: &mut BytesMut) {
    encode(&CommandComplete::new(tag.to_string()), out);
}

pub fn notice(message: &str, out: &mut BytesMut) {
    let fields = vec![
        (b'S', "NOTICE".to_string()),
        (b'V', "NOTICE".to_string()),
        (b'C', "00000".to_string()),
        (b'M', message.to_string()),
    ];
    encode(&NoticeResponse::new(fields), out);
}

pub fn auth_ok(out: &mut BytesMut) {
    encode(&Authentication::Ok, out);
}

pub fn auth_sasl(mechanisms: &[&str], out: &mut BytesMut) {
    encode(
        &Authentication::SASL(mechanisms.iter().map(|m| m.to_string()).collect()),
        out,
    );
}

pub fn auth_sasl_continue(data: Vec<u8>, out: &mut BytesMut) {
    encode(&Authentication::SASLContinue(data.into()), out);
}

pub fn auth_sasl_final(data: Vec<u8>, out: &mut BytesMut) {
    encode(&Authentication::SASLFinal(data.into()), out);
}

pub fn parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    encode(
        &ParameterStatus::new(name.to_string(), value.to_string()),
        out,
    );
}

pub fn backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    encode(&BackendKeyData::new(pid, SecretKey::I32(secret)), out);
}

/// A RowDescription of text columns (type `text`, oid 25).
pub fn row_description(columns: &[&str], out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for c in columns {
        put_cstr(&mut body, c);
        body.extend_from_slice(&0i32.to_be_bytes()); // table oid
        body.extend_from_slice(&0i16.to_be_bytes()); // column number
        body.extend_from_slice(&25i32.to_be_bytes()); // text
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes()); // text format
    }
    put_message(b'T', &body, out);
}

/// A DataRow of text values (None is NULL).
pub fn data_row(values: &[Option<&str>], out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        match v {
            Some(v) => {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    put_message(b'D', &body, out);
}

/// Appends a tagged message.
pub fn put_message(tag: u8, body: &[u8], out: &mut BytesMut) {
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(&[0]);
}

/// A simple Query message.
pub fn query(sql: &str) -> bytes::Bytes {
    let mut body = BytesMut::with_capacity(sql.len() + 1);
    put_cstr(&mut body, sql);
    let mut out = BytesMut::with_capacity(sql.len() + 6);
    put_message(b'Q', &body, &mut out);
    out.freeze()
}

/// A cursor over a message body for reading its fields.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// A NUL-terminated string; None if malformed.
    pub fn cstr(&mut self) -> Option<&'a str> {
        let end = self.buf.iter().position(|&b| b == 0)?;
        let s = std::str::from_utf8(&self.buf[..end]).ok()?;
        self.buf = &self.buf[end + 1..];
        Some(s)
    }

    pub fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    pub fn i16(&mut self) -> Option<i16> {
        let b = self.bytes(2)?;
        Some(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Option<i32> {
        let b = self.bytes(4)?;
        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(b)
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

/// Fields of an ErrorResponse or NoticeResponse body.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut r = Reader::new(body);
    let mut out = Vec::new();
    while let Some(code) = r.u8() {
        if code == 0 {
            break;
        }
        match r.cstr() {
            Some(v) => out.push((code, v.to_string())),
            None => break,
        }
    }
    out
}

/// The SQLSTATE of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> Option<String> {
    error_fields(body)
        .into_iter()
        .find(|(c, _)| *c == b'C')
        .map(|(_, v)| v)
}

/// The message text of an ErrorResponse body.
pub fn error_message(body: &[u8]) -> String {
    error_fields(body)
        .into_iter()
        .find(|(c, _)| *c == b'M')
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// Whether an ErrorResponse ends the connection (FATAL or PANIC).
pub fn error_is_fatal(body: &[u8]) -> bool {
    let fields = error_fields(body);
    // 'V' is never localized; older servers only send 'S'.
    let severity = fields
        .iter()
        .find(|(c, _)| *c == b'V')
        .or_else(|| fields.iter().find(|(c, _)| *c == b'S'))
        .map(|(_, v)| v.as_str());
    matches!(severity, Some("FATAL" | "PANIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_errors_are_recognised() {
        let mut out = BytesMut::new();
        PgError::fatal("57P01", "terminating connection").encode(&mut out);
        assert!(error_is_fatal(&out[5..]));
        out.clear();
        PgError::error("42P01", "no such table").encode(&mut out);
        assert!(!error_is_fatal(&out[5..]));
    }

    #[test]
    fn error_response_round_trip() {
        let mut out = BytesMut::new();
        PgError::error("57014", "canceling statement")
            .with_hint("try again")
            .encode(&mut out);
        assert_eq!(out[0], b'E');
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
        assert_eq!(error_code(&out[5..]).as_deref(), Some("57014"));
        assert_eq!(error_message(&out[5..]), "canceling statement");
    }

    #[test]
    fn reader_never_panics_on_short_input() {
        let mut r = Reader::new(b"ab");
        assert_eq!(r.cstr(), None);
        assert_eq!(r.i32(), None);
        assert_eq!(r.i16(), Some(i16::from_be_bytes([b'a', b'b'])));
        assert_eq!(r.u8(), None);
        assert!(error_fields(b"Cxx").is_empty());
    }
}
