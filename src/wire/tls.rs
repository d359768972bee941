//! TLS for client connections: loading the proxy's certificate and key,
//! and the SSLRequest / GSSENCRequest negotiation that precedes a startup
//! packet.
//!
//! The negotiation reads exactly one request packet at a time straight
//! from the socket, so no plain-text byte sent after an SSLRequest is ever
//! read as if it had come over TLS: it reaches the TLS handshake, which
//! fails.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::startup::{GSSENC_REQUEST, SSL_REQUEST};
use crate::config::TlsConfig;

/// The ALPN protocol name PostgreSQL registered for its wire protocol.
pub const ALPN: &[u8] = b"postgresql";

/// The read side of a client connection, plain or TLS.
pub type ClientRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write side of a client connection, plain or TLS. Callers flush
/// after writing: TLS keeps records buffered until then.
pub type ClientWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The crypto provider for every TLS session: pure Rust (`ring`).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the PEM certificate chain of `key` (a config key, for errors).
pub fn load_certs(path: &str, key: &str) -> Result<Vec<CertificateDer<'static>>, (String, String)> {
    let pem =
        std::fs::read(path).map_err(|e| (key.to_string(), format!("cannot read `{path}`: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            (
                key.to_string(),
                format!("`{path}` is not a PEM certificate file: {e}"),
            )
        })?;
    if certs.is_empty() {
        return Err((
            key.to_string(),
            format!("`{path}` holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        ));
    }
    Ok(certs)
}

/// The rustls server config for `[tls]`, with errors naming `tls.cert` or
/// `tls.key`.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, (String, String)> {
    let certs = load_certs(&tls.cert, "tls.cert")?;
    let pem = std::fs::read(&tls.key).map_err(|e| {
        (
            "tls.key".to_string(),
            format!("cannot read `{}`: {e}", tls.key),
        )
    })?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        (
            "tls.key".to_string(),
            format!("`{}` holds no PEM private key: {e}", tls.key),
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls".to_string(), e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            (
                "tls.key".to_string(),
                format!("does not fit the certificate in `{}`: {e}", tls.cert),
            )
        })?;
    // As PostgreSQL 17+: a client that offers ALPN must offer this one.
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A client connection after the encryption negotiation.
pub struct Negotiated {
    pub reader: ClientRead,
    pub writer: ClientWrite,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Answers encryption requests until the client sends anything else, then
/// hands the connection on (with the bytes already read in front). With an
/// acceptor an SSLRequest is answered 'S' and TLS begins; without one, and
/// for GSSENCRequest always, the answer is 'N'.
pub async fn negotiate(
    mut stream: TcpStream,
    acceptor: Option<&TlsAcceptor>,
) -> std::io::Result<Negotiated> {
    loop {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        if i32::from_be_bytes(len) != 8 {
            return Ok(plain(stream, len.to_vec()));
        }
        let mut code = [0u8; 4];
        stream.read_exact(&mut code).await?;
        match i32::from_be_bytes(code) {
            SSL_REQUEST if acceptor.is_some() => {
                stream.write_all(b"S").await?;
                let tls = acceptor.expect("checked").accept(stream).await?;
                let (reader, writer) = tokio::io::split(tls);
                return Ok(Negotiated {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    tls: true,
                });
            }
            SSL_REQUEST | GSSENC_REQUEST => stream.write_all(b"N").await?,
            _ => {
                let mut head = len.to_vec();
                head.extend_from_slice(&code);
                return Ok(plain(stream, head));
            }
        }
    }
}

/// A plain connection whose first `head` bytes were already read.
fn plain(stream: TcpStream, head: Vec<u8>) -> Negotiated {
    let (reader, writer) = stream.into_split();
    Negotiated {
        reader: Box::new(std::io::Cursor::new(head).chain(reader)),
        writer: Box::new(writer),
        tls: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cert: &str, key: &str) -> TlsConfig {
        TlsConfig {
            cert: cert.into(),
            key: key.into(),
            required: false,
        }
    }

    #[test]
    fn bad_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem").display().to_string();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a pem file\n").unwrap();
        let junk = junk.display().to_string();

        let (key, reason) = server_config(&config(&missing, &missing)).unwrap_err();
        assert_eq!(key, "tls.cert");
        assert!(reason.contains("cannot read"), "{reason}");
        let (key, reason) = server_config(&config(&junk, &junk)).unwrap_err();
        assert_eq!(key, "tls.cert");
        assert!(reason.contains("no PEM certificate"), "{reason}");

        // A good certificate: a missing key, a junk key, another key.
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert = write("cert.pem", &cert.pem());
        let good_key = write("key.pem", &key.serialize_pem());
        let other_key = write(
            "other.pem",
            &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        );
        assert_eq!(
            server_config(&config(&cert, &missing)).unwrap_err().0,
            "tls.key"
        );
        assert_eq!(
            server_config(&config(&cert, &junk)).unwrap_err().0,
            "tls.key"
        );
        let (key, reason) = server_config(&config(&cert, &other_key)).unwrap_err();
        assert_eq!(key, "tls.key");
        assert!(reason.contains("does not fit"), "{reason}");
        server_config(&config(&cert, &good_key)).unwrap();
    }
}
