//! One backend connection to a node: connect, authenticate (trust, password,
//! md5, SCRAM-SHA-256), collect the server's parameters and cancel key.

pub mod tls;
pub mod tracker;

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::admin::stats::ConnStats;
use crate::wire::messages::{self, Reader, put_cstr, put_message};
use crate::wire::{FrameError, MessageStream};

pub use tracker::{Expect, Tracker, UnitOwner};

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
    /// TLS to the node (sslmode, CA).
    pub tls: tls::NodeTls,
}

/// Why a backend connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("authentication to {addr} failed: {reason}")]
    Auth { addr: String, reason: String },
    /// The server refused us with an ErrorResponse.
    #[error("{addr} refused the connection: {message} (SQLSTATE {code})")]
    Server {
        addr: String,
        code: String,
        message: String,
    },
    #[error("protocol error from {addr}: {reason}")]
    Protocol { addr: String, reason: String },
}

/// The read half of a TCP or Unix-socket connection.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a TCP or Unix-socket connection.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl Target {
    /// A host starting with `/` is a Unix-socket directory (as in libpq).
    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Where to connect, for messages.
    pub fn addr(&self) -> String {
        if self.is_unix() {
            format!("{}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Opens the socket: TCP with TCP_NODELAY, or Unix; then TLS as the
    /// node's sslmode says (never over a Unix socket).
    pub async fn open(&self) -> std::io::Result<(ReadHalf, WriteHalf)> {
        if self.is_unix() {
            let s = UnixStream::connect(self.addr()).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        } else {
            let s = TcpStream::connect((self.host.as_str(), self.port)).await?;
            s.set_nodelay(true)?;
            self.tls.start(s, &self.host).await
        }
    }
}

/// A live, authenticated connection to one node.
pub struct BackendConn {
    pub reader: MessageStream<ReadHalf>,
    pub writer: WriteHalf,
    /// The server process id and secret, for CancelRequest.
    pub pid: i32,
    pub secret: i32,
    pub host: String,
    pub port: u16,
    /// TLS settings, for cancel requests.
    pub tls: tls::NodeTls,
    /// ParameterStatus values the server reported at startup, in order.
    pub params: Vec<(String, String)>,
    /// Responses this connection still owes, and which of them to swallow.
    pub tracker: Tracker,
    /// Prepared statements present on this connection: name -> generation.
    /// (A fast hash: looked up for every Bind; the names are the client's
    /// own, in a map only its session uses.)
    pub prepared: rustc_hash::FxHashMap<String, u64>,
    /// How many of the session's SET statements were replayed here.
    pub settings_applied: usize,
    /// Counts against the node's `max_connections` while open.
    pub seat: Option<crate::group::Seat>,
    /// Bytes and unit send times not yet handed to the node's stats.
    pub stats: ConnStats,
}

/// Largest message accepted from a node (PostgreSQL's own limit is 1 GB).
const MAX_BACKEND_MESSAGE: usize = 1 << 30;

impl BackendConn {
    /// Connects and authenticates, passing the client's startup parameters.
    pub async fn connect(
        target: &Target,
        client_params: &[(String, String)],
        timeout: Duration,
    ) -> Result<BackendConn, ConnectError> {
        let addr = target.addr();
        match tokio::time::timeout(timeout, Self::connect_inner(target, client_params, &addr)).await
        {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(addr)),
        }
    }

    async fn connect_inner(
        target: &Target,
        client_params: &[(String, String)],
        addr: &str,
    ) -> Result<BackendConn, ConnectError> {
        let io = |source| ConnectError::Io {
            addr: addr.to_string(),
            source,
        };
        let (rd, mut writer) = target.open().await.map_err(io)?;
        let mut reader = MessageStream::new(rd, MAX_BACKEND_MESSAGE);

        let mut body = BytesMut::new();
        body.extend_from_slice(&crate::wire::startup::PROTOCOL_3_0.to_be_bytes());
        put_cstr(&mut body, "user");
        put_cstr(&mut body, &target.user);
        put_cstr(&mut body, "database");
        put_cstr(&mut body, &target.dbname);
        for (k, v) in client_params {
            if matches!(k.as_str(), "user" | "database" | "replication") {
                continue;
            }
            put_cstr(&mut body, k);
            put_cstr(&mut body, v);
        }
        body.extend_from_slice(&[0]);
        let mut packet = BytesMut::new();
        packet.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        packet.extend_from_slice(&body);
        writer.write_all(&packet).await.map_err(io)?;
        writer.flush().await.map_err(io)?;

        let proto = |reason: String| ConnectError::Protocol {
            addr: addr.to_string(),
            reason,
        };
        let mut scram: Option<ScramSha256> = None;
        let mut params = Vec::new();
        let (mut pid, mut secret) = (0, 0);
        loop {
            let frame = match reader.next().await {
                Ok(Some(f)) => f,
                Ok(None) => return Err(proto("connection closed during startup".into())),
                Err(FrameError::Io(e)) => return Err(io(e)),
                Err(e) => return Err(proto(e.to_string())),
            };
            let mut r = Reader::new(frame.body());
            match frame.tag {
                b'R' => {
                    let code = r.i32().ok_or_else(|| proto("short auth message".into()))?;
                    let reply = auth_reply(code, &mut r, target, &mut scram).map_err(|reason| {
                        ConnectError::Auth {
                            addr: addr.to_string(),
                            reason,
                        }
                    })?;
                    if let Some(reply) = reply {
                        writer.write_all(&reply).await.map_err(io)?;
                        writer.flush().await.map_err(io)?;
                    }
                }
                b'S' => {
                    let k = r.cstr().unwrap_or_default().to_string();
                    let v = r.cstr().unwrap_or_default().to_string();
                    params.push((k, v));
                }
                b'K' => {
                    pid = r.i32().unwrap_or(0);
                    secret = r.i32().unwrap_or(0);
                }
                b'E' => {
                    return Err(ConnectError::Server {
                        addr: addr.to_string(),
                        code: messages::error_code(frame.body()).unwrap_or_default(),
                        message: messages::error_message(frame.body()),
                    });
                }
                b'N' => {}
                b'Z' => break,
                b'v' => {} // NegotiateProtocolVersion: we asked for 3.0 only
                other => return Err(proto(format!("unexpected message {:?}", other as char))),
            }
        }
        Ok(BackendConn {
            reader,
            writer,
            pid,
            secret,
            host: target.host.clone(),
            port: target.port,
            tls: target.tls.clone(),
            params,
            tracker: Tracker::default(),
            prepared: Default::default(),
            settings_applied: 0,
            seat: None,
            stats: ConnStats::default(),
        })
    }

    /// Writes raw bytes to the node (flushed: TLS buffers until then).
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }
}

/// Answers one Authentication request; None when nothing is to be sent.
fn auth_reply(
    code: i32,
    r: &mut Reader<'_>,
    target: &Target,
    scram: &mut Option<ScramSha256>,
) -> Result<Option<BytesMut>, String> {
    let mut out = BytesMut::new();
    match code {
        0 => return Ok(None),
        3 => {
            let mut body = BytesMut::new();
            put_cstr(&mut body, &target.password);
            put_message(b'p', &body, &mut out);
        }
        5 => {
            let salt = r.bytes(4).ok_or("short md5 salt")?;
            let hash = postgres_protocol::authentication::md5_hash(
                target.user.as_bytes(),
                target.password.as_bytes(),
                [salt[0], salt[1], salt[2], salt[3]],
            );
            let mut body = BytesMut::new();
            put_cstr(&mut body, &hash);
            put_message(b'p', &body, &mut out);
        }
        10 => {
            let mut has_scram = false;
            while let Some(m) = r.cstr() {
                if m.is_empty() {
                    break;
                }
                has_scram |= m == "SCRAM-SHA-256";
            }
            if !has_scram {
                return Err("the server offers no SASL mechanism this proxy supports".into());
            }
            let s = ScramSha256::new(target.password.as_bytes(), ChannelBinding::unsupported());
            let mut body = BytesMut::new();
            put_cstr(&mut body, "SCRAM-SHA-256");
            body.extend_from_slice(&(s.message().len() as i32).to_be_bytes());
            body.extend_from_slice(s.message());
            put_message(b'p', &body, &mut out);
            *scram = Some(s);
        }
        11 => {
            let s = scram.as_mut().ok_or("SASL continue without SASL start")?;
            s.update(r.rest()).map_err(|e| e.to_string())?;
            put_message(b'p', s.message(), &mut out);
        }
        12 => {
            let s = scram.as_mut().ok_or("SASL final without SASL start")?;
            s.finish(r.rest()).map_err(|e| e.to_string())?;
            return Ok(None);
        }
        other => return Err(format!("unsupported authentication request {other}")),
    }
    Ok(Some(out))
}

/// Sends a CancelRequest for a backend process, over TLS when the node's
/// sslmode makes the proxy's connections use it.
pub async fn cancel(
    host: &str,
    port: u16,
    tls: &tls::NodeTls,
    pid: i32,
    secret: i32,
) -> std::io::Result<()> {
    let target = Target {
        host: host.to_string(),
        port,
        user: String::new(),
        password: String::new(),
        dbname: String::new(),
        tls: tls.clone(),
    };
    let (_, mut s) = target.open().await?;
    let mut packet = Vec::with_capacity(16);
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&crate::wire::startup::CANCEL_REQUEST.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    s.write_all(&packet).await?;
    s.flush().await?;
    // Delivered; the node may close first, so the close can fail.
    let _ = s.shutdown().await;
    Ok(())
}
