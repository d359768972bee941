//! What the fuzz targets check, in one place.
//!
//! Included with `#[path = …] mod checks;` by every fuzz target
//! (`fuzz/fuzz_targets/*.rs`, run by libFuzzer) and by the plain regression
//! test `tests/fuzz_corpus.rs` (run by `cargo test`, which replays the
//! committed corpora and crash reproducers). Each check takes raw fuzz
//! input and panics when a property is violated; a panic that `src` itself
//! catches (pg_query's wrapper) is not a failure.
//!
//! Only crates the main package depends on are used here, so the file
//! compiles in both places.

#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use pg_query::NodeEnum;
use pg_query::protobuf::{Token, a_const};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use reprise::admin::console::{self, Command};
use reprise::config::Config;
use reprise::replication::applier::count_units;
use reprise::replication::determinism::analyze_write;
use reprise::replication::rowlocal::{RelCatalog, is_row_local};
use reprise::replication::{Entry, EntryHeader, parse_sequences, sequences_column, setval_sql};
use reprise::route::normalize::{cache_key, trim_sql};
use reprise::route::{Classification, Classifier, FunctionCatalog, classify};
use reprise::session;
use reprise::session::statements::{self, Statements};
use reprise::wire::messages::{self, PgError, Reader};
use reprise::wire::scram::{ScramError, ScramSecret, ScramServer};
use reprise::wire::startup::{self, MAX_STARTUP_PACKET, StartupPacket};
use reprise::wire::{Frame, FrameError, MessageStream};

/// A check of one fuzz input.
pub type Check = fn(&[u8]);

/// Every target: its name (the fuzz target and corpus folder) and check.
pub const TARGETS: &[(&str, Check)] = &[
    ("client_stream", client_stream),
    ("sql", sql),
    ("log_entry", log_entry),
    ("config", config),
    ("admin", admin),
];

// ---------------------------------------------------------------------------
// Fuzzer glue

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `check` under libFuzzer. libfuzzer-sys aborts on *every* panic,
/// including the ones `src` catches on purpose (pg_query's Rust wrapper can
/// panic on odd trees; the classifier treats that as "did not parse"), so
/// the hook only records the panic and the process aborts (a crash for
/// libFuzzer) only when one escapes the check.
pub fn guarded(check: fn(&[u8]), data: &[u8]) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let trace = std::backtrace::Backtrace::force_capture();
            LAST_PANIC.with(|l| *l.borrow_mut() = Some(format!("{info}\n{trace}")));
        }));
    });
    if std::panic::catch_unwind(|| check(data)).is_err() {
        let msg = LAST_PANIC
            .with(|l| l.borrow_mut().take())
            .unwrap_or_default();
        eprintln!("panic escaped the check: {msg}");
        std::process::abort();
    }
}

/// splitmix64: chunk sizes and poll patterns derived from the input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------
// client_stream: one client connection's bytes through every session state

/// A reader that hands out the input in chunks of input-chosen sizes and
/// sometimes is not ready (so the framing futures get dropped half-way:
/// `MessageStream::fill` claims to be cancel-safe).
struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    max_chunk: usize,
    stalls: bool,
    rng: Rng,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = this.rng.next();
        if this.stalls && r.is_multiple_of(3) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = (1 + (r >> 8) as usize % this.max_chunk)
            .min(this.data.len() - this.pos)
            .min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Where the session reads framed messages from.
trait Source {
    fn set_max_len(&mut self, max: usize);
    /// An untagged startup-phase packet, without its length word.
    fn startup(&mut self) -> Result<Option<Vec<u8>>, String>;
    fn frame(&mut self) -> Result<Option<Frame>, String>;
}

/// The real framing: `MessageStream` over the chunked reader, each future
/// polled a few times and dropped while pending, then made anew.
struct Stream<'a> {
    inner: MessageStream<Chunked<'a>>,
    rng: Rng,
}

/// Polls `$stream.inner.$method()` until it is ready, dropping each future
/// after one to three polls (the reader may stall at any poll) and making
/// it anew.
macro_rules! poll_dropping {
    ($stream:expr, $method:ident) => {{
        let mut cx = Context::from_waker(Waker::noop());
        let mut result = None;
        'outer: for _ in 0..1_000_000 {
            let polls = $stream.rng.next() % 3;
            let mut fut = std::pin::pin!($stream.inner.$method());
            for _ in 0..=polls {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    result = Some(v);
                    break 'outer;
                }
            }
        }
        result.expect("MessageStream made no progress (hang)")
    }};
}

impl Source for Stream<'_> {
    fn set_max_len(&mut self, max: usize) {
        self.inner.set_max_len(max);
    }

    fn startup(&mut self) -> Result<Option<Vec<u8>>, String> {
        poll_dropping!(self, next_startup)
            .map(|o| o.map(|b| b.to_vec()))
            .map_err(|e| e.to_string())
    }

    fn frame(&mut self) -> Result<Option<Frame>, String> {
        poll_dropping!(self, next).map_err(|e| e.to_string())
    }
}

/// A framer written from the protocol description, over the whole input.
struct Reference<'a> {
    data: &'a [u8],
    pos: usize,
    max: usize,
}

impl Source for Reference<'_> {
    fn set_max_len(&mut self, max: usize) {
        self.max = max;
    }

    fn startup(&mut self) -> Result<Option<Vec<u8>>, String> {
        let rest = &self.data[self.pos..];
        if rest.len() >= 4 {
            let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            if len < 8 {
                return Err(FrameError::BadLength(len).to_string());
            }
            let len = len as usize;
            if len > self.max {
                return Err(FrameError::TooLarge { len, max: self.max }.to_string());
            }
            if rest.len() >= len {
                self.pos += len;
                return Ok(Some(rest[4..len].to_vec()));
            }
        }
        if rest.is_empty() {
            Ok(None)
        } else {
            Err(FrameError::Truncated.to_string())
        }
    }

    fn frame(&mut self) -> Result<Option<Frame>, String> {
        let rest = &self.data[self.pos..];
        if rest.is_empty() {
            return Ok(None);
        }
        if rest.len() < 5 {
            return Err(FrameError::Truncated.to_string());
        }
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 {
            return Err(FrameError::BadLength(len).to_string());
        }
        let total = len as usize + 1;
        if total > self.max {
            return Err(FrameError::TooLarge {
                len: len as usize,
                max: self.max,
            }
            .to_string());
        }
        if rest.len() < total {
            return Err(FrameError::Truncated.to_string());
        }
        self.pos += total;
        Ok(Some(Frame {
            tag: rest[0],
            raw: bytes::Bytes::copy_from_slice(&rest[..total]),
        }))
    }
}

/// How the input drives the session: a 4-byte header, then the client's
/// bytes.
struct Opts {
    /// 0: from the startup packet; 1: from authentication; 2: ready.
    phase: u8,
    /// Authenticate with SCRAM-SHA-256 (else trust).
    scram: bool,
    /// Largest message in the ready phase (`max_message_size`).
    max_len: usize,
}

/// The fixed SCRAM user (2 iterations: cheap, same code paths).
const PASSWORD: &[u8] = b"fuzz-password";
const SALT: &[u8] = b"fuzz-salt-16byte";
const ITERATIONS: u32 = 2;
static SECRET: LazyLock<ScramSecret> =
    LazyLock::new(|| ScramSecret::from_prepared_password(PASSWORD, SALT, ITERATIONS));

static CATALOG: LazyLock<FunctionCatalog> = LazyLock::new(FunctionCatalog::builtin);
static SELECT_1: LazyLock<Arc<Classification>> =
    LazyLock::new(|| Arc::new(classify("select 1", &CATALOG)));

/// The client side of a connection: a 4-byte header (phase and auth
/// flags, chunking, `max_message_size`) and the bytes the client sends.
/// The session's reading is replayed against the real framing
/// (`MessageStream`, chunked, futures dropped half-way) and against a
/// reference framer: both must see the same messages and the same errors.
///
/// In the SCRAM phase the second message may say `@N` for the combined
/// nonce and end in `,p=@P` for the right proof (the server nonce is
/// random); the exchange must then succeed exactly when the message is
/// otherwise well-formed, and never without the right proof.
pub fn client_stream(data: &[u8]) {
    let [flags, chunk, seed, size, ..] = *data else {
        return;
    };
    let input = &data[4..];
    let opts = Opts {
        phase: (flags & 3).min(2),
        scram: flags & 4 != 0,
        max_len: 8 << (size % 14),
    };
    let max_chunk = if chunk < 128 {
        1 + usize::from(chunk % 16)
    } else {
        1 + usize::from(chunk - 128) * 512
    };
    let mut stream = Stream {
        inner: MessageStream::new(
            Chunked {
                data: input,
                pos: 0,
                max_chunk,
                stalls: flags & 8 != 0,
                rng: Rng(u64::from(seed)),
            },
            opts.max_len,
        ),
        rng: Rng(u64::from(seed) << 8),
    };
    let mut reference = Reference {
        data: input,
        pos: 0,
        max: opts.max_len,
    };
    let mut seen = Vec::new();
    run_session(&mut stream, &opts, &mut seen);
    let mut expected = Vec::new();
    run_session(&mut reference, &opts, &mut expected);
    assert_eq!(
        seen, expected,
        "MessageStream (chunks of up to {max_chunk} bytes) disagrees with the reference framer"
    );
}

/// What a session does with the client's messages, phase by phase, as
/// `session::startup` and the session loop do it; logs what it saw.
fn run_session(src: &mut impl Source, opts: &Opts, log: &mut Vec<String>) {
    let mut params = Vec::new();
    if opts.phase == 0 {
        src.set_max_len(MAX_STARTUP_PACKET);
        loop {
            let packet = match src.startup() {
                Ok(Some(p)) => p,
                Ok(None) => return log.push("gone".into()),
                Err(e) => return log.push(format!("invalid startup packet: {e}")),
            };
            match startup::parse(&packet) {
                Ok(StartupPacket::Ssl | StartupPacket::GssEnc) => log.push("N".into()),
                Ok(StartupPacket::Cancel { pid, secret }) => {
                    // (Bytes after the secret are ignored, as PostgreSQL 18
                    // allows longer keys.)
                    assert!(packet.len() >= 12);
                    return log.push(format!("cancel {pid} {secret}"));
                }
                Ok(StartupPacket::Startup { minor, params: p }) => {
                    check_startup_packet(&packet, minor, &p);
                    params = p
                        .into_iter()
                        .filter(|(k, _)| !k.starts_with("_pq_."))
                        .collect();
                    log.push(format!("startup 3.{minor} {params:?}"));
                    break;
                }
                Err(e) => return log.push(format!("refused: {e}")),
            }
        }
        check_startup_settings(&params);
    } else {
        src.set_max_len(MAX_STARTUP_PACKET);
    }
    if opts.phase <= 1 && opts.scram && !authenticate(src, log) {
        return;
    }
    ready(src, opts, &params, log);
}

/// A parsed startup packet is exactly its parameters, re-encoded.
fn check_startup_packet(packet: &[u8], minor: u16, params: &[(String, String)]) {
    let mut again = (3i32 << 16 | i32::from(minor)).to_be_bytes().to_vec();
    for (k, v) in params {
        assert!(!k.is_empty());
        again.extend_from_slice(k.as_bytes());
        again.push(0);
        again.extend_from_slice(v.as_bytes());
        again.push(0);
    }
    again.push(0);
    assert_eq!(again, packet, "startup packet does not re-encode to itself");
}

/// The SET statements made from startup parameters are replayed on every
/// node: each must be exactly one plain SET of one string value, whatever
/// the client sent (no way to smuggle another statement in).
fn check_startup_settings(params: &[(String, String)]) {
    for set in session::startup_settings(params) {
        let parsed = pg_query::parse(&set, 0).unwrap_or_else(|e| panic!("{set:?}: {e}"));
        let stmts = &parsed.protobuf.stmts;
        assert_eq!(stmts.len(), 1, "{set:?} is not one statement");
        let node = stmts[0].stmt.as_ref().and_then(|s| s.node.as_ref());
        let Some(NodeEnum::VariableSetStmt(v)) = node else {
            panic!("{set:?} is not a SET: {node:?}");
        };
        assert!(!v.is_local, "{set:?}");
        assert_eq!(v.args.len(), 1, "{set:?} sets {} values", v.args.len());
        let value = v.args[0].node.as_ref();
        assert!(
            matches!(value, Some(NodeEnum::AConst(c)) if matches!(c.val, Some(a_const::Val::Sval(_)))),
            "{set:?} does not set a string: {value:?}"
        );
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// RFC 5802's keys for the fixed user, computed independently of src.
fn client_and_server_key() -> ([u8; 32], [u8; 32]) {
    // Hi() = PBKDF2-HMAC-SHA-256, one block.
    let mut salt = SALT.to_vec();
    salt.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(PASSWORD, &salt);
    let mut salted = u;
    for _ in 1..ITERATIONS {
        u = hmac(PASSWORD, &u);
        for (s, x) in salted.iter_mut().zip(u) {
            *s ^= x;
        }
    }
    (hmac(&salted, b"Client Key"), hmac(&salted, b"Server Key"))
}

/// The SASL exchange as `session::startup::authenticate` runs it.
fn authenticate(src: &mut impl Source, log: &mut Vec<String>) -> bool {
    let (client_key, server_key) = client_and_server_key();
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    assert_eq!(
        SECRET.stored_key, stored_key,
        "ScramSecret: wrong StoredKey"
    );
    assert_eq!(
        SECRET.server_key, server_key,
        "ScramSecret: wrong ServerKey"
    );

    let mut server = ScramServer::new(SECRET.clone());
    let Some(first) = password_message(src, log) else {
        return false;
    };
    let mut r = Reader::new(first.body());
    let (Some(mechanism), Some(len)) = (r.cstr(), r.i32()) else {
        log.push("malformed SASLInitialResponse".into());
        return false;
    };
    let data = if len < 0 { &[][..] } else { r.rest() };
    let server_first = match server.client_first(mechanism, data) {
        Ok(reply) => reply,
        Err(e) => {
            log.push(format!("client-first refused: {}", scram_kind(&e)));
            return false;
        }
    };
    // The reply is r=<client nonce><server nonce>,s=<salt>,i=<iterations>.
    assert!(data.len() > 3 && data[1] == b',' && data[2] == b',');
    let bare = &data[3..];
    let client_nonce = bare
        .split(|&b| b == b',')
        .nth(1)
        .and_then(|a| a.strip_prefix(b"r="))
        .expect("accepted client-first has a nonce");
    let tail = format!(",s={},i={ITERATIONS}", STANDARD.encode(SALT));
    let nonce = server_first
        .strip_prefix(b"r=")
        .and_then(|s| s.strip_suffix(tail.as_bytes()))
        .expect("server-first-message layout");
    assert!(nonce.starts_with(client_nonce) && nonce.len() > client_nonce.len());
    assert!(!server.is_done());
    log.push("client-first accepted".into());

    let Some(last) = password_message(src, log) else {
        return false;
    };
    let mut msg = replace_all(last.body(), b"@N", nonce);
    let with_proof = msg.ends_with(b",p=@P");
    let mut expected_final = Vec::new();
    if with_proof {
        msg.truncate(msg.len() - 5);
        let mut auth_message = bare.to_vec();
        auth_message.push(b',');
        auth_message.extend_from_slice(&server_first);
        auth_message.push(b',');
        auth_message.extend_from_slice(&msg);
        let signature = hmac(&stored_key, &auth_message);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        msg.extend_from_slice(b",p=");
        msg.extend_from_slice(STANDARD.encode(proof).as_bytes());
        expected_final =
            format!("v={}", STANDARD.encode(hmac(&server_key, &auth_message))).into_bytes();
    }
    match server.client_final(&msg) {
        Ok(reply) => {
            assert!(
                with_proof,
                "accepted a client-final-message without the right proof"
            );
            assert_eq!(reply, expected_final, "wrong ServerSignature");
            assert!(server.is_done());
            log.push("authenticated".into());
            true
        }
        Err(e) => {
            assert!(
                !(with_proof && matches!(e, ScramError::WrongPassword)),
                "the right proof was refused: {:?}",
                String::from_utf8_lossy(&msg)
            );
            assert!(!server.is_done());
            log.push(format!("client-final refused: {}", scram_kind(&e)));
            false
        }
    }
}

fn scram_kind(e: &ScramError) -> &'static str {
    match e {
        ScramError::Protocol(_) => "protocol",
        ScramError::WrongPassword => "wrong password",
        ScramError::UnsupportedMechanism(_) => "mechanism",
    }
}

/// The next message, which must be a PasswordMessage ('p').
fn password_message(src: &mut impl Source, log: &mut Vec<String>) -> Option<Frame> {
    match src.frame() {
        Ok(Some(f)) if f.tag == b'p' => Some(f),
        Ok(Some(f)) => {
            log.push(format!("expected a password message, got {}", f.tag));
            None
        }
        Ok(None) => {
            log.push("gone".into());
            None
        }
        Err(e) => {
            log.push(format!("invalid message: {e}"));
            None
        }
    }
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// The ready phase: every message through the readers the session uses,
/// the capture of what a write would log, and its log entry.
fn ready(src: &mut impl Source, opts: &Opts, params: &[(String, String)], log: &mut Vec<String>) {
    src.set_max_len(opts.max_len);
    let mut statements = Statements::default();
    let mut capture = BytesMut::new();
    let mut units = 0;
    loop {
        let f = match src.frame() {
            Ok(Some(f)) => f,
            Ok(None) => break log.push("end".into()),
            Err(e) => break log.push(format!("fatal: {e}")),
        };
        check_frame(&f);
        check_error_fields(f.body());
        let mut note = String::new();
        match f.tag {
            b'Q' => {
                let sql = Reader::new(f.body()).cstr().unwrap_or("");
                check_error_response(sql);
                units += 1;
                note = format!("{}", sql.len());
            }
            b'P' => match statements::parse_fields(f.body()) {
                Some((name, query)) => {
                    check_rewrite_parse(&f, name, query);
                    statements.define(name, f.clone(), SELECT_1.clone());
                    note = format!("{name:?}");
                }
                None => note = "malformed".into(),
            },
            b'B' => {
                note = match statements::bind_statement(f.body()) {
                    Some(name) => format!("{name:?} {}", statements.get(name).is_some()),
                    None => "malformed".into(),
                }
            }
            b'D' | b'C' => {
                if let Some((b'S', name)) = statements::target(f.body()) {
                    if f.tag == b'C' {
                        statements.close(name);
                    }
                    note = format!("{name:?} {}", statements.get(name).is_some());
                }
            }
            b'S' => units += 1,
            b'E' | b'H' | b'd' | b'c' | b'f' => {}
            b'X' => break log.push("terminate".into()),
            other => break log.push(format!("invalid frontend message type {other}")),
        }
        if f.tag != b'H' {
            capture.extend_from_slice(&f.raw);
        }
        log.push(format!("{} {} {note}", f.tag as char, f.raw.len()));
    }
    // The applier counts the units of what was captured to know how many
    // ReadyForQuery to wait for.
    assert_eq!(count_units(&capture), units, "count_units of the capture");
    let entry = Entry {
        header: EntryHeader {
            now: "2024-01-01T00:00:00Z".into(),
            settings: session::startup_settings(params),
            tags: log.clone(),
            kind: String::new(),
            prepares: Vec::new(),
        },
        messages: capture.freeze(),
    };
    let decoded = Entry::decode(&entry.encode()).expect("an encoded entry decodes");
    assert_eq!(decoded, entry);
}

/// A frame's length word matches its size; `Frame::new` rebuilds it.
fn check_frame(f: &Frame) {
    let len = i32::from_be_bytes([f.raw[1], f.raw[2], f.raw[3], f.raw[4]]);
    assert_eq!(len as usize + 1, f.raw.len());
    assert_eq!(f.tag, f.raw[0]);
    assert_eq!(Frame::new(f.tag, f.body()).raw, f.raw);
}

/// ErrorResponse fields are exactly a prefix of the body.
fn check_error_fields(body: &[u8]) {
    let fields = messages::error_fields(body);
    let mut again = Vec::new();
    for (code, value) in &fields {
        assert_ne!(*code, 0);
        again.push(*code);
        again.extend_from_slice(value.as_bytes());
        again.push(0);
    }
    assert!(body.starts_with(&again), "error fields are not a prefix");
    let find = |c: u8| fields.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone());
    assert_eq!(messages::error_code(body), find(b'C'));
    assert_eq!(
        messages::error_message(body),
        find(b'M').unwrap_or_default()
    );
    let _ = messages::error_is_fatal(body);
}

/// An error that quotes client text (as the admin console does) reads back
/// as it was written.
fn check_error_response(text: &str) {
    let mut out = BytesMut::new();
    PgError::error("42601", text)
        .with_hint(text)
        .encode(&mut out);
    assert_eq!(out[0], b'E');
    let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]);
    assert_eq!(len as usize + 1, out.len());
    assert_eq!(messages::error_message(&out[5..]), text);
    assert_eq!(messages::error_code(&out[5..]).as_deref(), Some("42601"));
    assert!(!messages::error_is_fatal(&out[5..]));
}

/// `rewrite_parse` changes the query text and nothing else.
fn check_rewrite_parse(f: &Frame, name: &str, query: &str) {
    let sql = "SELECT 1";
    let new = statements::rewrite_parse(f, sql);
    check_frame(&new);
    assert_eq!(new.tag, b'P');
    assert_eq!(statements::parse_fields(new.body()), Some((name, sql)));
    let old_rest = &f.body()[name.len() + query.len() + 2..];
    let new_rest = &new.body()[name.len() + sql.len() + 2..];
    assert_eq!(old_rest, new_rest, "parameter types changed");
}

// ---------------------------------------------------------------------------
// sql: the classifier, its cache key, the determinism rewrite, write helpers

/// Tables the row-locality check knows.
static RELS: LazyLock<RelCatalog> = LazyLock::new(|| {
    let t = |s: &str, n: &str, u: &str, seq: bool, trg: bool| {
        (s.to_string(), n.to_string(), u.to_string(), seq, trg)
    };
    RelCatalog::from_rows([
        t("public", "t", "id;a,b", false, false),
        t("public", "accounts", "aid", false, false),
        t("public", "s", "id", true, false),
        t("public", "g", "id", false, true),
        t("other", "t", "id", false, false),
    ])
});

fn parses(sql: &str) -> Option<usize> {
    let r = std::panic::catch_unwind(|| pg_query::parse(sql, 0)).ok()?;
    r.ok().map(|p| p.protobuf.stmts.len())
}

/// Any text: nothing panics, the classification is consistent, two texts
/// that differ only in literal values (and so share a cache key) classify
/// alike, session settings can be joined with `;`, and a rewrite of time
/// functions parses into as many statements as the original.
pub fn sql(data: &[u8]) {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let stmts = parses(sql);

    let c = classify(sql, &CATALOG);
    if c.parse_error {
        assert!(!c.read_only && c.statements == 0, "{c:?}");
    } else if let Some(n) = stmts {
        assert_eq!(c.statements, n);
    }
    if c.begin.is_some() || c.ends_tx {
        assert!(c.tx_after.is_some(), "{c:?}");
    }
    if !c.session_settings.is_empty() {
        // Replayed joined on other backends (and by the applier).
        let joined = c.session_settings.join("; ");
        assert_eq!(
            parses(&joined),
            Some(c.session_settings.len()),
            "session settings {:?} do not join",
            c.session_settings
        );
    }

    // The classifier's cache: same key, same answer.
    if let Some(variant) = literal_variant(sql) {
        let key = cache_key(sql);
        if key.is_some() && key == cache_key(&variant) {
            let fresh = classify(&variant, &CATALOG);
            if !c.parse_error && !fresh.parse_error {
                let classifier = Classifier::new(CATALOG.clone());
                let _ = classifier.classify(sql);
                let cached = classifier.classify(&variant);
                assert_eq!(
                    *cached, fresh,
                    "{sql:?} and {variant:?} share the cache key {key:?} but classify differently"
                );
            }
        }
    }

    let trimmed = trim_sql(sql);
    if !trimmed.is_empty() {
        let start = (trimmed.as_ptr() as usize).wrapping_sub(sql.as_ptr() as usize);
        assert!(start + trimmed.len() <= sql.len(), "trim_sql left the text");
    }
    assert_eq!(trimmed.trim(), trimmed);

    let a = analyze_write(sql);
    if let Some(text) = &a.rewritten {
        assert!(a.refused.is_none());
        let n = stmts.expect("a text that does not parse is not rewritten");
        assert_eq!(
            parses(text),
            Some(n),
            "the rewrite of {sql:?} does not parse as {n} statement(s): {text:?}"
        );
        // Rewriting is done once, before the primary runs the text; the
        // result must need no second pass (no time function left over).
        let again = analyze_write(text);
        assert!(
            again.rewritten.is_none() && again.refused.is_none(),
            "the rewrite of {sql:?} is not final: {text:?} -> {again:?}"
        );
    }

    let mut temps = HashSet::from(["tt".to_string()]);
    let _ = session::temp_only(sql, &mut temps);
    let _ = session::insert_selects_ordered(sql);
    let _ = session::not_in_transaction(sql);
    let _ = session::is_maintenance(sql);
    let _ = session::is_ddl(sql);
    let _ = session::snapshot_isolation(sql);
    let _ = session::is_rollback(sql);
    if is_row_local(sql, &RELS) {
        assert_eq!(stmts, Some(1), "row-local but not one statement");
        assert!(!c.read_only);
    }
}

/// The text with every literal replaced by another of the same class (per
/// PostgreSQL's own scanner), if it has any.
fn literal_variant(sql: &str) -> Option<String> {
    if sql.trim().is_empty() || sql.contains('\0') {
        return None;
    }
    let tokens = std::panic::catch_unwind(|| pg_query::scan(sql))
        .ok()?
        .ok()?
        .tokens;
    let mut out = String::with_capacity(sql.len());
    let mut pos = 0;
    for t in &tokens {
        let with = match Token::try_from(t.token) {
            Ok(Token::Iconst) => "7",
            Ok(Token::Fconst) => "7.5",
            Ok(Token::Sconst) => "'zz'",
            Ok(Token::Bconst) => "B'1'",
            Ok(Token::Xconst) => "X'1'",
            _ => continue,
        };
        let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
        if start < pos {
            return None;
        }
        out.push_str(sql.get(pos..start)?);
        out.push_str(with);
        pos = end;
    }
    out.push_str(sql.get(pos..)?);
    (pos > 0).then_some(out)
}

// ---------------------------------------------------------------------------
// log_entry: log payloads and sequence states, as the applier reads them

/// First byte even: an entry payload (`Entry::decode`, then what the
/// applier does with it). Odd: a `sequences` column (JSON).
pub fn log_entry(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let _ = count_units(rest);
        if let Ok(entry) = Entry::decode(rest) {
            let _ = count_units(&entry.messages);
            let again = Entry::decode(&entry.encode()).expect("a re-encoded entry decodes");
            assert_eq!(again, entry);
        }
    } else {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let (before, after) = sequences_column(Some(text));
        for states in [before, after, parse_sequences(text)] {
            let sql = setval_sql(&states);
            if !states.is_empty() {
                assert_eq!(
                    parses(&sql),
                    Some(states.len()),
                    "setval_sql is not one SELECT per sequence: {sql:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// config

/// Any UTF-8 text: a config that loads serializes and loads again to the
/// same value; an error names the file and says why; stored SCRAM
/// verifiers parse back from their own formatting.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.starts_with("SCRAM-SHA-256$") {
        check_verifier(text);
    }
    match Config::parse(text, "fuzz.toml") {
        Ok(c) => {
            let _ = c.listen_addr();
            let _ = c.http_addr();
            let again = toml::to_string(&c).expect("a loaded config serializes");
            let reloaded = Config::parse(&again, "again.toml")
                .unwrap_or_else(|e| panic!("{again}\ndoes not load again: {e}"));
            assert_eq!(reloaded, c);
            for u in &c.auth.users {
                if u.password.starts_with("SCRAM-SHA-256$") {
                    check_verifier(&u.password);
                }
            }
        }
        Err(e) => {
            assert_eq!(e.file, "fuzz.toml");
            assert!(!e.reason.is_empty());
            assert!(!e.to_string().is_empty());
        }
    }
}

fn check_verifier(text: &str) {
    if let Ok(s) = ScramSecret::parse(text) {
        let again = ScramSecret::parse(&s.to_verifier()).expect("own verifier parses");
        assert_eq!(
            (
                again.iterations,
                &again.salt,
                again.stored_key,
                again.server_key
            ),
            (s.iterations, &s.salt, s.stored_key, s.server_key)
        );
    }
}

// ---------------------------------------------------------------------------
// admin

/// A console Query's text, split at `;` as the console does: each command
/// parses or gets 42601 quoting it; keywords are case-insensitive and
/// names are kept as written.
pub fn admin(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let text = text.split('\0').next().unwrap_or("");
    for stmt in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        match console::parse(stmt) {
            Ok(cmd) => {
                if let Command::Switchover { group, node } | Command::Reseed { group, node } = &cmd
                {
                    for name in [group, node] {
                        assert!(!name.is_empty() && !name.contains(char::is_whitespace));
                        assert!(stmt.contains(name.as_str()));
                    }
                }
                let lower = console::parse(&stmt.to_ascii_lowercase())
                    .expect("keywords are case-insensitive");
                assert_eq!(std::mem::discriminant(&lower), std::mem::discriminant(&cmd));
            }
            Err(e) => {
                assert_eq!(e.code, "42601");
                assert!(e.message.contains(stmt));
                check_error_response(stmt);
            }
        }
    }
}
