//! Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677), as PostgreSQL does it.
//!
//! The proxy uses this to authenticate its own clients. The flow is:
//!
//! 1. send `AuthenticationSASL` advertising [`ScramServer::mechanisms`];
//! 2. feed the `SASLInitialResponse` (mechanism + data) to
//!    [`ScramServer::client_first`] and send the result in
//!    `AuthenticationSASLContinue`;
//! 3. feed the `SASLResponse` to [`ScramServer::client_final`] and send the
//!    result in `AuthenticationSASLFinal`, followed by `AuthenticationOk`.
//!
//! Channel binding (`SCRAM-SHA-256-PLUS`) is not supported. As in PostgreSQL,
//! the username inside the SCRAM messages is ignored: the user is the one from
//! the startup packet.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};

/// The SASL mechanism name of SCRAM-SHA-256.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The channel-binding variant, which is recognised only to be refused.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Iteration count used for new secrets (PostgreSQL's default).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length used for new secrets (PostgreSQL's default).
pub const DEFAULT_SALT_LEN: usize = 16;
/// Raw length of the server nonce before base64 (PostgreSQL's `SCRAM_RAW_NONCE_LEN`).
const SERVER_NONCE_LEN: usize = 18;

type HmacSha256 = Hmac<Sha256>;

/// Errors of a SCRAM exchange or of parsing a stored verifier.
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    /// A malformed message, a call out of order, or an invalid verifier; the
    /// string says what is wrong.
    #[error("{0}")]
    Protocol(String),
    /// The client proof did not match the stored key.
    #[error("password authentication failed")]
    WrongPassword,
    /// The client chose a mechanism other than SCRAM-SHA-256.
    #[error("unsupported SASL authentication mechanism \"{0}\"")]
    UnsupportedMechanism(String),
}

fn protocol(msg: impl Into<String>) -> ScramError {
    ScramError::Protocol(msg.into())
}

/// A user's SCRAM secret: what the server stores.
#[derive(Clone, Debug)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramSecret {
    /// Builds a secret from a plain password, with a random 16-byte salt and
    /// 4096 iterations.
    ///
    /// SASLprep is applied the way PostgreSQL (and libpq) do it: if the
    /// password is not valid for SASLprep, its raw bytes are used. The
    /// normalisation is delegated to `postgres_protocol::password::scram_sha_256`
    /// (whose output is PostgreSQL's verifier format) because the `stringprep`
    /// crate is not a direct dependency; its output is then parsed.
    pub fn from_password(password: &str) -> ScramSecret {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        match ScramSecret::parse(&verifier) {
            Ok(secret) => secret,
            // Not expected to happen; fall back to the raw bytes (which is
            // what SASLprep yields for any ASCII password anyway).
            Err(_) => {
                let mut salt = vec![0u8; DEFAULT_SALT_LEN];
                rand::rng().fill(&mut salt[..]);
                ScramSecret::from_prepared_password(password.as_bytes(), &salt, DEFAULT_ITERATIONS)
            }
        }
    }

    /// Builds a secret from an already SASLprep-ed password (raw bytes), a salt
    /// and an iteration count. For ASCII passwords SASLprep is the identity,
    /// so the password's bytes can be passed directly.
    ///
    /// `iterations` of 0 is treated as 1.
    pub fn from_prepared_password(password: &[u8], salt: &[u8], iterations: u32) -> ScramSecret {
        let iterations = iterations.max(1);
        let salted_password = hi(password, salt, iterations);
        let client_key = hmac_sha256(&salted_password, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac_sha256(&salted_password, b"Server Key");
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key,
            server_key,
        }
    }

    /// Parses PostgreSQL's stored verifier format
    /// `SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`
    /// (as in `pg_authid.rolpassword`).
    pub fn parse(verifier: &str) -> Result<ScramSecret, ScramError> {
        let bad = |what: &str| protocol(format!("invalid SCRAM verifier: {what}"));
        let mut parts = verifier.split('$');
        let (Some(method), Some(params), Some(keys), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad(
                "expected \"SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>\"",
            ));
        };
        if method != SCRAM_SHA_256 {
            return Err(bad("method is not SCRAM-SHA-256"));
        }
        let Some((iterations, salt)) = params.split_once(':') else {
            return Err(bad("missing ':' between iteration count and salt"));
        };
        let Some((stored_key, server_key)) = keys.split_once(':') else {
            return Err(bad("missing ':' between StoredKey and ServerKey"));
        };
        let iterations = if iterations.bytes().all(|b| b.is_ascii_digit()) {
            iterations.parse::<u32>().ok()
        } else {
            None
        };
        let iterations = match iterations {
            Some(i) if i > 0 => i,
            _ => return Err(bad("iteration count is not a positive integer")),
        };
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| bad("salt is not valid base64"))?;
        if salt.is_empty() {
            return Err(bad("salt is empty"));
        }
        let key = |b64: &str, name: &str| -> Result<[u8; 32], ScramError> {
            let raw = STANDARD
                .decode(b64)
                .map_err(|_| bad(&format!("{name} is not valid base64")))?;
            raw.try_into()
                .map_err(|_| bad(&format!("{name} is not 32 bytes long")))
        };
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key: key(stored_key, "StoredKey")?,
            server_key: key(server_key, "ServerKey")?,
        })
    }

    /// Formats the secret in PostgreSQL's stored verifier format.
    pub fn to_verifier(&self) -> String {
        format!(
            "{SCRAM_SHA_256}${}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key),
        )
    }
}

/// `Hi()` of RFC 5802: PBKDF2 with HMAC-SHA-256, one 32-byte block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mac = HmacSha256::new_from_slice(password).expect("HMAC accepts keys of any length");
    let mut u = mac.clone();
    u.update(salt);
    u.update(&1u32.to_be_bytes());
    let mut prev: [u8; 32] = u.finalize().into_bytes().into();
    let mut result = prev;
    for _ in 1..iterations {
        let mut u = mac.clone();
        u.update(&prev);
        prev = u.finalize().into_bytes().into();
        for (r, p) in result.iter_mut().zip(prev) {
            *r ^= p;
        }
    }
    result
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Constant-time equality of two equal-length byte arrays.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A printable character as defined by RFC 5802 (`%x21-2B / %x2D-7E`).
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

enum State {
    /// Waiting for the SASLInitialResponse.
    Initial,
    /// Waiting for the SASLResponse.
    Continue {
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
        /// Client nonce followed by server nonce.
        nonce: Vec<u8>,
        /// Expected `c=` value: base64 of the gs2 header.
        cbind: &'static [u8],
    },
    /// The exchange succeeded.
    Done,
    /// The exchange failed; nothing more is accepted.
    Failed,
}

/// One server-side SCRAM-SHA-256 exchange.
pub struct ScramServer {
    secret: ScramSecret,
    server_nonce: String,
    state: State,
}

impl ScramServer {
    /// Starts an exchange for a user with the given secret.
    pub fn new(secret: ScramSecret) -> ScramServer {
        let mut raw = [0u8; SERVER_NONCE_LEN];
        rand::rng().fill(&mut raw[..]);
        ScramServer::with_server_nonce(secret, STANDARD.encode(raw))
    }

    /// Starts an exchange with a fixed server nonce (tests and test vectors).
    fn with_server_nonce(secret: ScramSecret, server_nonce: String) -> ScramServer {
        ScramServer {
            secret,
            server_nonce,
            state: State::Initial,
        }
    }

    /// Mechanisms to advertise in `AuthenticationSASL`.
    pub fn mechanisms() -> &'static [&'static str] {
        &[SCRAM_SHA_256]
    }

    /// Whether the exchange completed successfully.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Handles the `SASLInitialResponse` (mechanism name and
    /// client-first-message); returns the server-first-message
    /// (`r=<client nonce + server nonce>,s=<salt b64>,i=<iterations>`).
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::Initial) {
            self.state = State::Failed;
            return Err(protocol(
                "unexpected SASLInitialResponse: the SCRAM exchange has already started",
            ));
        }
        self.state = State::Failed;
        if mechanism != SCRAM_SHA_256 {
            return Err(ScramError::UnsupportedMechanism(mechanism.to_owned()));
        }
        let first = parse_client_first(data)?;

        let mut nonce = first.client_nonce.to_vec();
        nonce.extend_from_slice(self.server_nonce.as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(
            format!(
                ",s={},i={}",
                STANDARD.encode(&self.secret.salt),
                self.secret.iterations
            )
            .as_bytes(),
        );

        self.state = State::Continue {
            client_first_bare: first.bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
            cbind: first.cbind,
        };
        Ok(server_first)
    }

    /// Handles the `SASLResponse` (client-final-message): verifies the
    /// channel binding, the nonce and the ClientProof; returns the
    /// server-final-message (`v=<ServerSignature b64>`).
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::Continue {
            client_first_bare,
            server_first,
            nonce,
            cbind,
        } = std::mem::replace(&mut self.state, State::Failed)
        else {
            return Err(protocol(
                "unexpected SASLResponse: no SCRAM client-first-message was accepted",
            ));
        };

        let fin = parse_client_final(data)?;
        if fin.cbind != cbind {
            return Err(protocol(
                "unexpected SCRAM channel-binding attribute in client-final-message",
            ));
        }
        if fin.nonce != nonce.as_slice() {
            return Err(protocol("SCRAM nonce mismatch"));
        }

        let mut auth_message = client_first_bare;
        auth_message.push(b',');
        auth_message.extend_from_slice(&server_first);
        auth_message.push(b',');
        auth_message.extend_from_slice(fin.without_proof);

        let client_signature = hmac_sha256(&self.secret.stored_key, &auth_message);
        let mut client_key = fin.proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let computed_stored_key: [u8; 32] = Sha256::digest(client_key).into();
        if !ct_eq(&computed_stored_key, &self.secret.stored_key) {
            return Err(ScramError::WrongPassword);
        }

        let server_signature = hmac_sha256(&self.secret.server_key, &auth_message);
        self.state = State::Done;
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

struct ClientFirst<'a> {
    /// Expected `c=` attribute of the client-final-message.
    cbind: &'static [u8],
    /// client-first-message-bare.
    bare: &'a [u8],
    client_nonce: &'a [u8],
}

struct ClientFinal<'a> {
    cbind: &'a [u8],
    nonce: &'a [u8],
    proof: [u8; 32],
    /// client-final-message-without-proof.
    without_proof: &'a [u8],
}

/// A cursor over a SCRAM message.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], what: &str) -> Result<Reader<'a>, ScramError> {
        if data.is_empty() {
            return Err(protocol(format!("malformed SCRAM message: empty {what}")));
        }
        if data.contains(&0) {
            return Err(protocol(format!(
                "malformed SCRAM message: {what} contains a NUL byte"
            )));
        }
        Ok(Reader { data, pos: 0 })
    }

    fn peek(&self) -> Option<u8> {
        self.data.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn expect(&mut self, byte: u8) -> Result<(), ScramError> {
        match self.peek() {
            Some(b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            Some(b) => Err(protocol(format!(
                "malformed SCRAM message: expected '{}' at offset {}, found {}",
                byte as char,
                self.pos,
                describe(b)
            ))),
            None => Err(protocol(format!(
                "malformed SCRAM message: expected '{}', found end of message",
                byte as char
            ))),
        }
    }

    /// Reads up to the next ',' (not consumed) or the end.
    fn value(&mut self) -> &'a [u8] {
        let start = self.pos;
        let len = self.data[start..]
            .iter()
            .position(|&b| b == b',')
            .unwrap_or(self.data.len() - start);
        self.pos = start + len;
        &self.data[start..self.pos]
    }

    /// Reads `<attr>=<value>` for a specific attribute.
    fn attr(&mut self, attr: u8, name: &str) -> Result<&'a [u8], ScramError> {
        match self.peek() {
            Some(b) if b == attr => {}
            Some(b) => {
                return Err(protocol(format!(
                    "malformed SCRAM message: expected attribute '{}' ({name}), found {}",
                    attr as char,
                    describe(b)
                )));
            }
            None => {
                return Err(protocol(format!(
                    "malformed SCRAM message: expected attribute '{}' ({name}), found end of message",
                    attr as char
                )));
            }
        }
        self.pos += 1;
        self.expect(b'=')?;
        Ok(self.value())
    }

    /// Reads any `<letter>=<value>` attribute.
    fn any_attr(&mut self) -> Result<(u8, &'a [u8]), ScramError> {
        let attr = match self.peek() {
            Some(b) if b.is_ascii_alphabetic() => b,
            Some(b) => {
                return Err(protocol(format!(
                    "malformed SCRAM message: attribute expected, found {}",
                    describe(b)
                )));
            }
            None => {
                return Err(protocol(
                    "malformed SCRAM message: attribute expected, found end of message",
                ));
            }
        };
        self.pos += 1;
        self.expect(b'=')?;
        Ok((attr, self.value()))
    }
}

fn describe(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

/// Parses a client-first-message:
/// `gs2-cbind-flag "," [authzid] "," [reserved-mext ","] username "," nonce ["," extensions]`.
fn parse_client_first(data: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    let mut r = Reader::new(data, "client-first-message")?;
    let cbind: &'static [u8] = match r.peek() {
        Some(b'n') => b"biws",
        Some(b'y') => b"eSws",
        Some(b'p') => {
            return Err(protocol(
                "client requested SCRAM channel binding (\"p=\"), which is not supported",
            ));
        }
        Some(b) => {
            return Err(protocol(format!(
                "malformed SCRAM message: unexpected channel-binding flag {}",
                describe(b)
            )));
        }
        None => {
            return Err(protocol(
                "malformed SCRAM message: empty client-first-message",
            ));
        }
    };
    r.pos += 1;
    r.expect(b',')?;
    if r.peek() == Some(b'a') {
        return Err(protocol(
            "client uses SCRAM authorization identity, but it is not supported",
        ));
    }
    r.expect(b',')?;

    let bare_start = r.pos;
    if r.peek() == Some(b'm') {
        return Err(protocol("client requires an unsupported SCRAM extension"));
    }
    // The username is ignored: the user is the one from the startup packet.
    let _username = r.attr(b'n', "username")?;
    r.expect(b',')?;
    let client_nonce = r.attr(b'r', "nonce")?;
    if client_nonce.is_empty() {
        return Err(protocol("malformed SCRAM message: empty client nonce"));
    }
    if !client_nonce.iter().all(|&b| is_printable(b)) {
        return Err(protocol(
            "malformed SCRAM message: client nonce contains non-printable characters",
        ));
    }
    while !r.at_end() {
        r.expect(b',')?;
        r.any_attr()?;
    }
    Ok(ClientFirst {
        cbind,
        bare: &data[bare_start..],
        client_nonce,
    })
}

/// Parses a client-final-message:
/// `channel-binding "," nonce ["," extensions] "," proof`.
fn parse_client_final(data: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    let mut r = Reader::new(data, "client-final-message")?;
    let cbind = r.attr(b'c', "channel binding")?;
    r.expect(b',')?;
    let nonce = r.attr(b'r', "nonce")?;
    loop {
        if r.at_end() {
            return Err(protocol(
                "malformed SCRAM message: client-final-message has no proof",
            ));
        }
        let comma = r.pos;
        r.expect(b',')?;
        let (attr, value) = r.any_attr()?;
        if attr != b'p' {
            continue; // extension: ignored
        }
        if !r.at_end() {
            return Err(protocol(
                "malformed SCRAM message: garbage at the end of client-final-message",
            ));
        }
        let proof = STANDARD
            .decode(value)
            .map_err(|_| protocol("malformed SCRAM message: proof is not valid base64"))?;
        let proof: [u8; 32] = proof
            .try_into()
            .map_err(|_| protocol("malformed SCRAM message: proof is not 32 bytes long"))?;
        return Ok(ClientFinal {
            cbind,
            nonce,
            proof,
            without_proof: &data[..comma],
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a full exchange with postgres-protocol's client.
    fn exchange(
        secret: ScramSecret,
        password: &str,
        binding: ChannelBinding,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let mut server = ScramServer::new(secret);
        let server_first = server.client_first(SCRAM_SHA_256, client.message())?;
        client
            .update(&server_first)
            .expect("client accepts server-first");
        let server_final = server.client_final(client.message())?;
        client
            .finish(&server_final)
            .expect("client verifies server signature");
        assert!(server.is_done());
        Ok(())
    }

    #[test]
    fn full_exchange_plain_password() {
        let secret = ScramSecret::from_password("s3cret pässword");
        assert_eq!(secret.iterations, DEFAULT_ITERATIONS);
        assert_eq!(secret.salt.len(), DEFAULT_SALT_LEN);
        exchange(
            secret.clone(),
            "s3cret pässword",
            ChannelBinding::unsupported(),
        )
        .unwrap();
        // "y,," (client supports channel binding, thinks server does not).
        exchange(secret, "s3cret pässword", ChannelBinding::unrequested()).unwrap();
    }

    #[test]
    fn full_exchange_parsed_verifier() {
        let verifier = postgres_protocol::password::scram_sha_256(b"hunter2");
        let secret = ScramSecret::parse(&verifier).unwrap();
        exchange(secret, "hunter2", ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn prepared_password_exchange() {
        let secret = ScramSecret::from_prepared_password(b"pencil", b"saltsalt", 1000);
        exchange(secret, "pencil", ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn saslprep_is_applied() {
        // U+00AD (soft hyphen) is mapped to nothing by SASLprep, so both
        // spellings are the same password; the client applies SASLprep too.
        let secret = ScramSecret::from_password("pass\u{00AD}word");
        let plain =
            ScramSecret::from_prepared_password(b"password", &secret.salt, secret.iterations);
        assert_eq!(plain.stored_key, secret.stored_key);
        exchange(secret.clone(), "password", ChannelBinding::unsupported()).unwrap();
        exchange(secret, "pass\u{00AD}word", ChannelBinding::unsupported()).unwrap();
        // Empty password: still a valid exchange.
        let secret = ScramSecret::from_password("");
        exchange(secret, "", ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn wrong_password() {
        let secret = ScramSecret::from_password("right");
        let err = exchange(secret.clone(), "wrong", ChannelBinding::unsupported()).unwrap_err();
        assert!(matches!(err, ScramError::WrongPassword), "{err:?}");
        let secret =
            ScramSecret::parse(&postgres_protocol::password::scram_sha_256(b"right")).unwrap();
        let err = exchange(secret, "Right", ChannelBinding::unsupported()).unwrap_err();
        assert!(matches!(err, ScramError::WrongPassword), "{err:?}");
    }

    /// Runs client-first, then returns the server and the client's final message.
    fn start(password: &str) -> (ScramServer, String) {
        let secret = ScramSecret::from_password(password);
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut server = ScramServer::new(secret);
        let server_first = server
            .client_first(SCRAM_SHA_256, client.message())
            .unwrap();
        client.update(&server_first).unwrap();
        let fin = String::from_utf8(client.message().to_vec()).unwrap();
        (server, fin)
    }

    #[test]
    fn tampered_nonce() {
        let (mut server, fin) = start("pw");
        // Change the last character of the server nonce part.
        let r = fin.find(",r=").unwrap() + 3;
        let p = fin.find(",p=").unwrap();
        let mut nonce = fin[r..p].to_string();
        let last = nonce.pop().unwrap();
        nonce.push(if last == 'A' { 'B' } else { 'A' });
        let tampered = format!("{}{}{}", &fin[..r], nonce, &fin[p..]);
        let err = server.client_final(tampered.as_bytes()).unwrap_err();
        assert!(matches!(err, ScramError::Protocol(_)), "{err:?}");

        // Only part of the combined nonce.
        let (mut server, fin) = start("pw");
        let tampered = format!("{}{}", &fin[..r], &fin[p - 24..]);
        assert!(server.client_final(tampered.as_bytes()).is_err());
    }

    #[test]
    fn tampered_channel_binding_and_proof() {
        let (mut server, fin) = start("pw");
        let tampered = fin.replacen("c=biws", "c=eSws", 1);
        assert!(matches!(
            server.client_final(tampered.as_bytes()),
            Err(ScramError::Protocol(_))
        ));

        let (mut server, fin) = start("pw");
        let p = fin.find(",p=").unwrap() + 3;
        let mut proof = STANDARD.decode(&fin[p..]).unwrap();
        proof[0] ^= 1;
        let tampered = format!("{}{}", &fin[..p], STANDARD.encode(proof));
        assert!(matches!(
            server.client_final(tampered.as_bytes()),
            Err(ScramError::WrongPassword)
        ));

        // Extensions before the proof are allowed but are part of AuthMessage,
        // so inserting one invalidates the proof.
        let (mut server, fin) = start("pw");
        let p = fin.find(",p=").unwrap();
        let tampered = format!("{},x=ext{}", &fin[..p], &fin[p..]);
        assert!(matches!(
            server.client_final(tampered.as_bytes()),
            Err(ScramError::WrongPassword)
        ));
    }

    #[test]
    fn mechanisms_and_channel_binding_rejection() {
        assert_eq!(ScramServer::mechanisms(), &["SCRAM-SHA-256"]);
        let secret = ScramSecret::from_password("pw");
        let mut server = ScramServer::new(secret.clone());
        assert!(matches!(
            server.client_first(SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::UnsupportedMechanism(m)) if m == SCRAM_SHA_256_PLUS
        ));
        let mut server = ScramServer::new(secret.clone());
        assert!(matches!(
            server.client_first("PLAIN", b"n,,n=,r=abc"),
            Err(ScramError::UnsupportedMechanism(_))
        ));
        let mut server = ScramServer::new(secret.clone());
        assert!(matches!(
            server.client_first(SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::Protocol(_))
        ));
        // Authorization identity and mandatory extensions are refused.
        for msg in [&b"n,a=bob,n=,r=abc"[..], b"n,,m=ext,n=,r=abc"] {
            let mut server = ScramServer::new(secret.clone());
            assert!(matches!(
                server.client_first(SCRAM_SHA_256, msg),
                Err(ScramError::Protocol(_))
            ));
        }
        // Accepted forms: n,, and y,, with any username and trailing extensions.
        for msg in [
            &b"n,,n=,r=abc"[..],
            b"y,,n=someone,r=abc",
            b"n,,n=*,r=abc,x=1",
        ] {
            let mut server = ScramServer::new(secret.clone());
            let first = server.client_first(SCRAM_SHA_256, msg).unwrap();
            assert!(first.starts_with(b"r=abc"));
        }
    }

    #[test]
    fn wrong_order_of_calls() {
        let secret = ScramSecret::from_password("pw");
        let mut server = ScramServer::new(secret.clone());
        assert!(matches!(
            server.client_final(b"c=biws,r=abc,p=AAAA"),
            Err(ScramError::Protocol(_))
        ));

        let mut server = ScramServer::new(secret.clone());
        server.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").unwrap();
        assert!(matches!(
            server.client_first(SCRAM_SHA_256, b"n,,n=,r=abc"),
            Err(ScramError::Protocol(_))
        ));

        // After a successful exchange nothing more is accepted.
        let (mut server, fin) = start("pw");
        server.client_final(fin.as_bytes()).unwrap();
        assert!(server.is_done());
        assert!(server.client_final(fin.as_bytes()).is_err());
        assert!(server.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").is_err());

        // After a failure the correct message is no longer accepted.
        let (mut server, fin) = start("pw");
        assert!(server.client_final(b"garbage").is_err());
        assert!(server.client_final(fin.as_bytes()).is_err());
    }

    #[test]
    fn garbage_client_first() {
        let secret = ScramSecret::from_password("pw");
        let cases: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"n,,",
            b"n,,n",
            b"n,,n=",
            b"n,,n=,",
            b"n,,n=,r",
            b"n,,n=,r=",
            b"n,,r=abc",
            b"x,,n=,r=abc",
            b"n,,n=,r=a\x01c",
            b"n,,n=,r=a\0c",
            b"n,,n=,r=\xff\xfe",
            b"n,,n=,r=abc,",
            b"n,,n=,r=abc,1=x",
            b"\xff\xff\xff",
            b",,,,",
        ];
        for &case in cases {
            let mut server = ScramServer::new(secret.clone());
            let res = server.client_first(SCRAM_SHA_256, case);
            assert!(
                matches!(res, Err(ScramError::Protocol(_))),
                "{:?} -> {res:?}",
                String::from_utf8_lossy(case)
            );
        }
        // Every prefix of a valid message: no panic (some prefixes are valid).
        let msg = b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL";
        for len in 0..=msg.len() {
            let mut server = ScramServer::new(secret.clone());
            let res = server.client_first(SCRAM_SHA_256, &msg[..len]);
            assert_eq!(res.is_ok(), len > msg.len() - 24, "len {len}");
        }
    }

    #[test]
    fn garbage_client_final() {
        let (_, fin) = start("pw");
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"c".to_vec(),
            b"c=biws".to_vec(),
            b"c=biws,".to_vec(),
            b"c=biws,r=".to_vec(),
            b"r=abc,c=biws,p=AAAA".to_vec(),
            format!("{fin},x=y").into_bytes(),
            fin.replacen(",p=", ",p=!!", 1).into_bytes(),
            fin.replacen(",p=", ",p=AAAA", 1).into_bytes(),
            fin.replacen(",p=", ",q=", 1).into_bytes(),
            fin.replacen(",p=", "\0,p=", 1).into_bytes(),
            b"\xff\xfe\xfd".to_vec(),
        ];
        for case in &cases {
            let (mut server, _) = start("pw");
            let res = server.client_final(case);
            assert!(
                matches!(res, Err(ScramError::Protocol(_))),
                "{:?} -> {res:?}",
                String::from_utf8_lossy(case)
            );
        }
        // Every strict prefix of the valid message fails (same exchange
        // replayed with a fixed server nonce).
        let secret = ScramSecret::from_password("pw");
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let client_first = client.message().to_vec();
        let fresh = || {
            let mut s = ScramServer::with_server_nonce(secret.clone(), "srvnonce".into());
            let server_first = s.client_first(SCRAM_SHA_256, &client_first).unwrap();
            (s, server_first)
        };
        let (_, server_first) = fresh();
        client.update(&server_first).unwrap();
        let fin = client.message().to_vec();
        for len in 0..fin.len() {
            let (mut s, _) = fresh();
            assert!(s.client_final(&fin[..len]).is_err(), "len {len}");
        }
        let (mut s, _) = fresh();
        let server_final = s.client_final(&fin).unwrap();
        client.finish(&server_final).unwrap();
    }

    #[test]
    fn random_bytes_never_panic() {
        let secret = ScramSecret::from_prepared_password(b"pw", b"salt", 1);
        let mut rng = rand::rng();
        let alphabet = b"nyprcmaxp=,ABC+/\0\xff12";
        for i in 0..5000 {
            let len = rng.random_range(0..64);
            let data: Vec<u8> = if i % 2 == 0 {
                (0..len).map(|_| rng.random()).collect()
            } else {
                (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect()
            };
            let mut server = ScramServer::new(secret.clone());
            let _ = server.client_first(SCRAM_SHA_256, &data);
            let mut server = ScramServer::new(secret.clone());
            server.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").unwrap();
            assert!(server.client_final(&data).is_err());
        }
    }

    #[test]
    fn rfc7677_vector() {
        // RFC 7677 section 3, password "pencil".
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let secret = ScramSecret::from_prepared_password(b"pencil", &salt, 4096);
        let mut server =
            ScramServer::with_server_nonce(secret, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        let server_first = server
            .client_first(SCRAM_SHA_256, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            .unwrap();
        assert_eq!(
            server_first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let server_final = server
            .client_final(
                b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                  p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            )
            .unwrap();
        assert_eq!(
            server_final,
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn pbkdf2_vectors() {
        // RFC 7914 section 11 (first 32-byte block).
        assert_eq!(
            hi(b"passwd", b"salt", 1),
            [
                0x55, 0xac, 0x04, 0x6e, 0x56, 0xe3, 0x08, 0x9f, 0xec, 0x16, 0x91, 0xc2, 0x25, 0x44,
                0xb6, 0x05, 0xf9, 0x41, 0x85, 0x21, 0x6d, 0xde, 0x04, 0x65, 0xe6, 0x8b, 0x9d, 0x57,
                0xc2, 0x0d, 0xac, 0xbc
            ]
        );
        // PBKDF2-HMAC-SHA256("password", "salt", 4096, 32).
        let expected: Vec<u8> = (0..32)
            .map(|i| {
                u8::from_str_radix(
                    &"c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
                        [2 * i..2 * i + 2],
                    16,
                )
                .unwrap()
            })
            .collect();
        assert_eq!(hi(b"password", b"salt", 4096).to_vec(), expected);
    }

    #[test]
    fn verifier_round_trip() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        let secret = ScramSecret::parse(&verifier).unwrap();
        assert_eq!(secret.to_verifier(), verifier);
        let secret = ScramSecret::from_password("pw");
        let again = ScramSecret::parse(&secret.to_verifier()).unwrap();
        assert_eq!(again.iterations, secret.iterations);
        assert_eq!(again.salt, secret.salt);
        assert_eq!(again.stored_key, secret.stored_key);
        assert_eq!(again.server_key, secret.server_key);
        // Same password, same salt and iterations as postgres-protocol → same keys.
        let prepared = ScramSecret::from_prepared_password(b"pw", &secret.salt, secret.iterations);
        assert_eq!(prepared.stored_key, secret.stored_key);
        assert_eq!(prepared.server_key, secret.server_key);
    }

    #[test]
    fn verifier_parse_errors() {
        let good = ScramSecret::from_password("pw").to_verifier();
        let (_, rest) = good.split_once('$').unwrap();
        let (params, keys) = rest.split_once('$').unwrap();
        let (_, salt) = params.split_once(':').unwrap();
        let (stored, server) = keys.split_once(':').unwrap();
        let short = STANDARD.encode([0u8; 31]);
        let cases = [
            String::new(),
            "md5abcdef".to_string(),
            format!("SCRAM-SHA-1$4096:{salt}${keys}"),
            format!("SCRAM-SHA-256$4096:{salt}"),
            format!("SCRAM-SHA-256$4096{salt}${keys}"),
            format!("SCRAM-SHA-256$0:{salt}${keys}"),
            format!("SCRAM-SHA-256$-1:{salt}${keys}"),
            format!("SCRAM-SHA-256$+5:{salt}${keys}"),
            format!("SCRAM-SHA-256$99999999999:{salt}${keys}"),
            format!("SCRAM-SHA-256$x:{salt}${keys}"),
            format!("SCRAM-SHA-256$4096:${keys}"),
            format!("SCRAM-SHA-256$4096:!!${keys}"),
            format!("SCRAM-SHA-256$4096:{salt}${stored}{server}"),
            format!("SCRAM-SHA-256$4096:{salt}${short}:{server}"),
            format!("SCRAM-SHA-256$4096:{salt}${stored}:{short}"),
            format!("SCRAM-SHA-256$4096:{salt}${stored}:@@@"),
            format!("{good}$extra"),
        ];
        for case in &cases {
            let err = ScramSecret::parse(case).unwrap_err();
            assert!(
                matches!(&err, ScramError::Protocol(m) if m.starts_with("invalid SCRAM verifier")),
                "{case:?} -> {err:?}"
            );
        }
    }
}
