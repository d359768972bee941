//! A TCP relay in front of a node, switchable at run time between passing
//! bytes, a closed port, a hung network and a slow one: network faults
//! between the proxy and one node, without touching the node itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reprise::config::Config;
use reprise::local::LocalNode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a [`Relay`] does with the traffic between the proxy and its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Forward every byte as it comes.
    Pass,
    /// A closed port: every open connection is closed, and new ones are
    /// reset as soon as they are accepted.
    Drop,
    /// A hung network: connections are accepted, but no byte moves either
    /// way until the mode changes (then the held bytes flow again).
    Pause,
    /// Every chunk waits this long before it is forwarded.
    Delay(Duration),
}

impl RelayMode {
    /// A short name for logs and histories: pass, drop, pause, delay.
    pub fn kind(&self) -> &'static str {
        match self {
            RelayMode::Pass => "pass",
            RelayMode::Drop => "drop",
            RelayMode::Pause => "pause",
            RelayMode::Delay(_) => "delay",
        }
    }
}

/// A relay listening on 127.0.0.1 (a port picked by the system) that
/// forwards each connection to a node's Unix socket.
pub struct Relay {
    pub addr: SocketAddr,
    upstream: PathBuf,
    mode: watch::Sender<RelayMode>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Starts a relay to the Unix socket `upstream` (e.g.
    /// `<socket dir>/.s.PGSQL.<port>`). Needs a tokio runtime (not async, so
    /// it can run inside a config tweak).
    pub fn start(upstream: &Path) -> Relay {
        let std = std::net::TcpListener::bind("127.0.0.1:0").expect("relay binds");
        std.set_nonblocking(true).expect("nonblocking relay socket");
        let addr = std.local_addr().expect("relay address");
        let listener = TcpListener::from_std(std).expect("relay listener");
        let (mode, rx) = watch::channel(RelayMode::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream.to_path_buf(),
            rx,
            accepted.clone(),
        ));
        Relay {
            addr,
            upstream: upstream.to_path_buf(),
            mode,
            accepted,
            task,
        }
    }

    /// A relay to a local node's Unix socket.
    pub fn to_node(node: &LocalNode) -> Relay {
        Relay::start(&node.socket_dir().join(format!(".s.PGSQL.{}", node.port())))
    }

    /// Switches the relay; applies to open connections at once.
    pub fn set(&self, mode: RelayMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> RelayMode {
        *self.mode.borrow()
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> &Path {
        &self.upstream
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.mode.send_replace(RelayMode::Drop);
        self.task.abort();
    }
}

/// Puts a relay in front of every node of every group of `config` whose
/// host is a Unix socket directory, and points the config at the relays
/// (host 127.0.0.1, the relay's port). Returns the relays in node order.
pub fn relay_nodes(config: &mut Config) -> Vec<Relay> {
    let mut relays = Vec::new();
    for g in &mut config.groups {
        for n in &mut g.nodes {
            if !n.host.starts_with('/') {
                continue;
            }
            let relay = Relay::start(&Path::new(&n.host).join(format!(".s.PGSQL.{}", n.port)));
            n.host = relay.addr.ip().to_string();
            n.port = relay.addr.port();
            relays.push(relay);
        }
    }
    relays
}

async fn accept_loop(
    listener: TcpListener,
    upstream: PathBuf,
    mode: watch::Receiver<RelayMode>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == RelayMode::Drop {
            reset(client);
            continue;
        }
        let (upstream, mode) = (upstream.clone(), mode.clone());
        tokio::spawn(async move {
            let server = match UnixStream::connect(&upstream).await {
                Ok(s) => s,
                Err(_) => return reset(client),
            };
            let _ = client.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            // Either direction ending ends the connection: a pump returns
            // only after writing everything it read.
            tokio::select! {
                _ = pump(cr, sw, mode.clone()) => {}
                _ = pump(sr, cw, mode) => {}
            }
        });
    }
}

/// Closes a connection with a reset, like a port nobody listens on.
fn reset(s: TcpStream) {
    // A zero linger does not block: the close sends a RST at once.
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Copies `r` to `w` chunk by chunk as the mode allows; returns at end of
/// stream, on an error, or when the relay drops its connections.
async fn pump(
    mut r: impl AsyncRead + Unpin,
    mut w: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<RelayMode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = mode.wait_for(|m| *m == RelayMode::Drop) => return,
        };
        loop {
            let m = *mode.borrow_and_update();
            match m {
                RelayMode::Pass => break,
                RelayMode::Drop => return,
                RelayMode::Pause => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                RelayMode::Delay(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => break,
                        _ = mode.changed() => {}
                    }
                }
            }
        }
        let written = tokio::select! {
            r = w.write_all(&buf[..n]) => r.is_ok(),
            _ = mode.wait_for(|m| *m == RelayMode::Drop) => false,
        };
        if !written {
            return;
        }
    }
    let _ = w.shutdown().await;
}
