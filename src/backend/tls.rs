//! TLS to a node, as libpq's `sslmode` says: the SSLRequest exchange on
//! the proxy's own backend connections, and a tokio-postgres connector for
//! the control, applier and seeding connections.
//!
//! | sslmode | TLS | certificate check |
//! |---|---|---|
//! | disable | never | — |
//! | prefer | if the node offers it | none |
//! | require | always | chain to `sslrootcert` if set, else none |
//! | verify-ca | always | chain to `sslrootcert` |
//! | verify-full | always | chain to `sslrootcert` and the node's host name |
//!
//! Over a Unix socket TLS is never used, as in libpq.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{NodeConfig, SslMode};

/// How to secure connections to one node. Cheap to clone. The default is
/// plain text (sslmode disable).
#[derive(Clone)]
pub struct NodeTls {
    pub mode: SslMode,
    pub rootcert: Option<String>,
    /// The rustls client config; None when `mode` is disable.
    config: Option<Arc<ClientConfig>>,
}

impl Default for NodeTls {
    fn default() -> Self {
        NodeTls::disabled()
    }
}

impl PartialEq for NodeTls {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode && self.rootcert == other.rootcert
    }
}

impl Eq for NodeTls {}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("mode", &self.mode)
            .field("rootcert", &self.rootcert)
            .finish()
    }
}

impl NodeTls {
    /// Plain text only (sslmode disable).
    pub fn disabled() -> NodeTls {
        NodeTls {
            mode: SslMode::Disable,
            rootcert: None,
            config: None,
        }
    }

    /// Builds the TLS settings of a node; the error says what is wrong
    /// with `sslrootcert` (the only part that can be).
    pub fn from_config(node: &NodeConfig) -> Result<NodeTls, String> {
        Self::new(node.sslmode, node.sslrootcert.as_deref())
    }

    /// Builds the TLS settings for a mode and an optional CA file.
    pub fn new(mode: SslMode, rootcert: Option<&str>) -> Result<NodeTls, String> {
        if mode == SslMode::Disable {
            return Ok(NodeTls::with_roots(mode, rootcert, None));
        }
        let roots = match rootcert {
            Some(path) => {
                let certs = crate::wire::tls::load_certs(path, "sslrootcert").map_err(|e| e.1)?;
                let mut roots = RootCertStore::empty();
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| format!("`{path}` holds an unusable CA certificate: {e}"))?;
                }
                Some(roots)
            }
            None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                return Err(format!(
                    "sslmode \"{}\" needs `sslrootcert`, the CA file the node's certificate \
                     is checked against",
                    mode.as_str()
                ));
            }
            None => None,
        };
        Ok(NodeTls::with_roots(mode, rootcert, roots))
    }

    /// Settings whose CA file could not be loaded: every TLS handshake
    /// fails (nothing chains to no CA) instead of going on unchecked.
    pub fn unusable(mode: SslMode, rootcert: Option<&str>) -> NodeTls {
        NodeTls::with_roots(mode, rootcert, Some(RootCertStore::empty()))
    }

    fn with_roots(mode: SslMode, rootcert: Option<&str>, roots: Option<RootCertStore>) -> NodeTls {
        let config = (mode != SslMode::Disable).then(|| {
            let provider = crate::wire::tls::provider();
            let verifier = Arc::new(Verifier {
                roots: roots.map(Arc::new),
                check_name: mode == SslMode::VerifyFull,
                provider: provider.clone(),
            });
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default TLS versions")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            config.alpn_protocols = vec![crate::wire::tls::ALPN.to_vec()];
            Arc::new(config)
        });
        NodeTls {
            mode,
            rootcert: rootcert.map(str::to_string),
            config,
        }
    }

    /// Whether a connection to `host` tries TLS at all.
    pub fn attempts(&self, host: &str) -> bool {
        self.config.is_some() && !host.starts_with('/')
    }

    /// Whether a node that refuses TLS must be refused in turn.
    pub fn required(&self) -> bool {
        !matches!(self.mode, SslMode::Disable | SslMode::Prefer)
    }

    /// The mode for tokio-postgres and libpq tools connecting to `host`.
    pub fn pg_mode(&self, host: &str) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as M;
        if !self.attempts(host) {
            M::Disable
        } else if self.required() {
            M::Require
        } else {
            M::Prefer
        }
    }

    /// A connector for tokio-postgres (never used when the mode is disable).
    pub fn connector(&self) -> PgTls {
        PgTls(self.clone())
    }

    /// The SSLRequest exchange on a fresh TCP connection to `host`, then the
    /// handshake if the node agreed. Returns the stream to speak the
    /// protocol on.
    pub async fn start(
        &self,
        mut stream: TcpStream,
        host: &str,
    ) -> io::Result<(super::ReadHalf, super::WriteHalf)> {
        let Some(config) = self.config.as_ref().filter(|_| self.attempts(host)) else {
            return Ok(split_plain(stream));
        };
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&8i32.to_be_bytes());
        request[4..].copy_from_slice(&crate::wire::startup::SSL_REQUEST.to_be_bytes());
        stream.write_all(&request).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' if !self.required() => return Ok(split_plain(stream)),
            b'N' => {
                return Err(io::Error::other(format!(
                    "the node does not accept TLS connections, and sslmode is \"{}\"",
                    self.mode.as_str()
                )));
            }
            other => {
                return Err(io::Error::other(format!(
                    "the node answered the SSLRequest with {:?} instead of 'S' or 'N'",
                    other as char
                )));
            }
        }
        let name = self.name_for(host)?;
        let tls = TlsConnector::from(config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "TLS handshake (sslmode \"{}\") failed: {e}",
                        self.mode.as_str()
                    ),
                )
            })?;
        let (r, w) = tokio::io::split(tls);
        Ok((Box::new(r), Box::new(w)))
    }
}

impl NodeTls {
    /// The name the handshake uses for `host`: only verify-full checks it,
    /// so the others make do with any valid name.
    fn name_for(&self, host: &str) -> io::Result<ServerName<'static>> {
        match server_name(host) {
            Err(_) if self.mode != SslMode::VerifyFull => Ok(ServerName::try_from("localhost")
                .expect("a valid name")
                .to_owned()),
            r => r,
        }
    }
}

fn split_plain(stream: TcpStream) -> (super::ReadHalf, super::WriteHalf) {
    let (r, w) = stream.into_split();
    (Box::new(r), Box::new(w))
}

/// The name the certificate is checked against (verify-full only; the
/// others accept any name).
fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::other(format!(
            "`{host}` cannot be checked against a certificate: {e}"
        ))
    })
}

/// Checks the node's certificate as the mode says.
#[derive(Debug)]
struct Verifier {
    /// The CAs to chain to; None: the certificate is not checked.
    roots: Option<Arc<RootCertStore>>,
    /// Also check that the certificate names the host (verify-full).
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// tokio-postgres's `MakeTlsConnect` over rustls with a node's settings.
#[derive(Clone)]
pub struct PgTls(NodeTls);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    /// Called for every connection, even with sslmode disable (then the
    /// connector is never used).
    fn make_tls_connect(&mut self, host: &str) -> io::Result<PgTlsConnect> {
        Ok(PgTlsConnect {
            connector: self.0.config.clone().map(TlsConnector::from),
            name: self.0.name_for(host)?,
        })
    }
}

/// One handshake for tokio-postgres; without a connector (sslmode
/// disable) there is none.
pub struct PgTlsConnect {
    connector: Option<TlsConnector>,
    name: ServerName<'static>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = self.connector.ok_or_else(|| {
                io::Error::other("TLS is disabled for this node (sslmode disable)")
            })?;
            let tls = connector.connect(self.name, stream).await?;
            Ok(PgTlsStream(tls))
        })
    }
}

/// A TLS stream tokio-postgres talks over. No channel binding is offered:
/// the proxy does not use SCRAM-SHA-256-PLUS.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_need_a_ca_file() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let e = NodeTls::new(mode, None).unwrap_err();
            assert!(e.contains("sslrootcert"), "{e}");
        }
        let e = NodeTls::new(SslMode::Require, Some("/nonexistent/ca.pem")).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(NodeTls::new(SslMode::Require, None).unwrap().required());
        assert!(!NodeTls::new(SslMode::Prefer, None).unwrap().required());
        let unix = NodeTls::new(SslMode::Require, None).unwrap();
        assert!(!unix.attempts("/tmp/sock"));
        assert!(unix.attempts("127.0.0.1"));
        assert!(!NodeTls::disabled().attempts("127.0.0.1"));
    }
}
