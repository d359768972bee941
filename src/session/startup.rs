//! The start of a client connection after the encryption negotiation
//! (`wire::tls`): cancel requests, protocol negotiation, and
//! authentication.

use std::sync::OnceLock;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::config::AuthMethod;
use crate::server::Shared;
use crate::wire::messages::{self, PgError, Reader};
use crate::wire::scram::{ScramError, ScramSecret, ScramServer};
use crate::wire::startup::{self, MAX_STARTUP_PACKET, StartupPacket};
use crate::wire::tls::ClientRead;
use crate::wire::{FrameError, MessageStream};

/// What the client asked for once the startup phase is over.
pub enum Opening {
    /// A session: its startup parameters.
    Session { params: Vec<(String, String)> },
    /// A cancel request, already handled.
    Cancelled,
    /// The client went away.
    Gone,
}

/// Reads startup packets until a session starts or the connection ends.
pub async fn read_startup<W: AsyncWrite + Unpin>(
    shared: &Shared,
    reader: &mut MessageStream<ClientRead>,
    writer: &mut W,
    tls: bool,
) -> Result<Opening, PgError> {
    reader.set_max_len(MAX_STARTUP_PACKET);
    loop {
        let packet = match reader.next_startup().await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(Opening::Gone),
            Err(FrameError::Io(_)) | Err(FrameError::Truncated) => return Ok(Opening::Gone),
            Err(e) => {
                return Err(PgError::fatal(
                    "08P01",
                    format!("invalid startup packet: {e}"),
                ));
            }
        };
        match startup::parse(&packet) {
            Ok(StartupPacket::Ssl) | Ok(StartupPacket::GssEnc) if tls => {
                return Err(PgError::fatal(
                    "08P01",
                    "encryption requested again on a TLS connection",
                ));
            }
            Ok(StartupPacket::Ssl) | Ok(StartupPacket::GssEnc) => {
                // After an 'N' (wire::tls answered the first request): go on
                // in plain text.
                send(writer, b"N").await?;
            }
            Ok(StartupPacket::Cancel { pid, secret }) => {
                if let Some(t) = shared.cancel.lookup(pid, secret) {
                    tracing::info!(pid, backend_pid = t.pid, node = %format!("{}:{}", t.host, t.port), "forwarding cancel request");
                    // Bounded: with TLS it waits for the node's answer to
                    // the SSLRequest, and a hung node must not hold the client.
                    let limit =
                        std::time::Duration::from_millis(shared.config().health.connect_timeout_ms);
                    let cancel = crate::backend::cancel(&t.host, t.port, &t.tls, t.pid, t.secret);
                    match tokio::time::timeout(limit, cancel).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(pid, error = %e, "cancel request not delivered")
                        }
                        Err(_) => tracing::warn!(
                            pid,
                            "cancel request not delivered: the node did not answer in time"
                        ),
                    }
                }
                return Ok(Opening::Cancelled);
            }
            Ok(StartupPacket::Startup { minor, params }) => {
                if minor > 0 || params.iter().any(|(k, _)| k.starts_with("_pq_.")) {
                    send(writer, &negotiation(&params)).await?;
                }
                let params = params
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with("_pq_."))
                    .collect();
                return Ok(Opening::Session { params });
            }
            Err(e) => {
                let code = match e {
                    startup::StartupError::Version { .. } => "0A000",
                    startup::StartupError::Malformed(_) => "08P01",
                };
                return Err(PgError::fatal(code, e.to_string()));
            }
        }
    }
}

fn gone() -> PgError {
    PgError::fatal("08006", "client connection lost")
}

/// Writes and flushes (a TLS stream holds its records until flushed).
async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> Result<(), PgError> {
    writer.write_all(bytes).await.map_err(|_| gone())?;
    writer.flush().await.map_err(|_| gone())
}

/// The NegotiateProtocolVersion message, for a client that asked for 3.x
/// (x > 0) or for `_pq_` options: we speak 3.0 (the whole version, major in
/// the high 16 bits, as PostgreSQL sends it and libpq reads it) and none of
/// those options.
fn negotiation(params: &[(String, String)]) -> BytesMut {
    const PROTOCOL_3_0: i32 = 3 << 16;
    let unsupported: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    let mut body = BytesMut::new();
    body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    body.extend_from_slice(&(unsupported.len() as i32).to_be_bytes());
    for o in unsupported {
        messages::put_cstr(&mut body, o);
    }
    let mut out = BytesMut::new();
    messages::put_message(b'v', &body, &mut out);
    out
}

/// A secret for a user that does not exist, so a failed login does not
/// tell whether the user exists: random keys, and a salt that is the same
/// for the same name every time (a keyed hash, as real users' salts are
/// stable) but unlike any other name's.
fn decoy_secret(user: &str) -> ScramSecret {
    static DECOY: OnceLock<(ScramSecret, [u8; 32])> = OnceLock::new();
    let (secret, key) = DECOY.get_or_init(|| {
        (
            ScramSecret::from_password(&format!("{:x}", rand::random::<u128>())),
            rand::random(),
        )
    });
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(user.as_bytes());
    let mut decoy = secret.clone();
    decoy.salt = mac.finalize().into_bytes()[..secret.salt.len().clamp(1, 32)].to_vec();
    decoy
}

fn auth_failed(user: &str) -> PgError {
    PgError::fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

/// Authenticates the client as `user` by the configured method.
pub async fn authenticate<W: AsyncWrite + Unpin>(
    shared: &Shared,
    user: &str,
    reader: &mut MessageStream<ClientRead>,
    writer: &mut W,
) -> Result<(), PgError> {
    let mut out = BytesMut::new();
    if shared.auth_method() == AuthMethod::Trust {
        messages::auth_ok(&mut out);
        return send(writer, &out).await;
    }
    let secret = shared.user_secret(user);
    let known = secret.is_some();
    let mut server = ScramServer::new(secret.unwrap_or_else(|| decoy_secret(user)));
    messages::auth_sasl(ScramServer::mechanisms(), &mut out);
    send(writer, &out).await?;

    let first = read_password_message(reader).await?;
    let mut r = Reader::new(first.body());
    let mechanism = r.cstr().ok_or_else(|| malformed("SASLInitialResponse"))?;
    let len = r.i32().ok_or_else(|| malformed("SASLInitialResponse"))?;
    let data = if len < 0 { &[][..] } else { r.rest() };
    let reply = server
        .client_first(mechanism, data)
        .map_err(|e| scram_error(e, user))?;
    let mut out = BytesMut::new();
    messages::auth_sasl_continue(reply, &mut out);
    send(writer, &out).await?;

    let last = read_password_message(reader).await?;
    let reply = server
        .client_final(last.body())
        .map_err(|e| scram_error(e, user))?;
    if !known {
        return Err(auth_failed(user));
    }
    let mut out = BytesMut::new();
    messages::auth_sasl_final(reply, &mut out);
    messages::auth_ok(&mut out);
    send(writer, &out).await
}

fn malformed(what: &str) -> PgError {
    PgError::fatal("08P01", format!("malformed {what} message"))
}

fn scram_error(e: ScramError, user: &str) -> PgError {
    match e {
        ScramError::WrongPassword => auth_failed(user),
        ScramError::UnsupportedMechanism(m) => PgError::fatal(
            "28000",
            format!("SASL authentication mechanism {m} is not supported; use SCRAM-SHA-256"),
        ),
        ScramError::Protocol(m) if m.starts_with("malformed") => PgError::fatal("08P01", m),
        ScramError::Protocol(m) => PgError::fatal("08P01", format!("malformed SCRAM message: {m}")),
    }
}

async fn read_password_message(
    reader: &mut MessageStream<ClientRead>,
) -> Result<crate::wire::Frame, PgError> {
    match reader.next().await {
        Ok(Some(f)) if f.tag == b'p' => Ok(f),
        Ok(Some(f)) => Err(PgError::fatal(
            "08P01",
            format!(
                "expected a password message during authentication, got message type {:?}",
                f.tag as char
            ),
        )),
        Ok(None) => Err(gone()),
        Err(e) => Err(PgError::fatal("08P01", format!("invalid message: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_users_get_stable_salts_unlike_each_other() {
        let a = decoy_secret("mallory");
        assert_eq!(a.salt, decoy_secret("mallory").salt);
        assert_ne!(a.salt, decoy_secret("trudy").salt);
        assert_eq!(a.salt.len(), ScramSecret::from_password("x").salt.len());
    }
}
