//! The server: shared state, the accept loop, graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::admin::metrics::Metrics;
use crate::config::{AuthMethod, Config};
use crate::group::failover::{self, Policy};
use crate::group::{Group, health};
use crate::session::cancel::CancelRegistry;
use crate::wire::messages::PgError;
use crate::wire::scram::ScramSecret;

/// State every session and monitor shares.
pub struct Shared {
    config: Arc<Config>,
    groups: HashMap<String, Arc<Group>>,
    group_order: Vec<String>,
    users: HashMap<String, ScramSecret>,
    /// Set when `[tls]` is: SSLRequests are answered 'S'.
    tls: Option<tokio_rustls::TlsAcceptor>,
    pub cancel: Arc<CancelRegistry>,
    pub metrics: Metrics,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn auth_method(&self) -> AuthMethod {
        self.config.auth.method
    }

    /// The TLS acceptor for clients, when `[tls]` is configured.
    pub fn tls_acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.tls.as_ref()
    }

    /// The SCRAM secret of a configured user.
    pub fn user_secret(&self, user: &str) -> Option<ScramSecret> {
        self.users.get(user).cloned()
    }

    pub fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.groups.get(name).cloned()
    }

    /// Groups in config order.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.group_order
            .iter()
            .filter_map(|n| self.groups.get(n).cloned())
            .collect()
    }

    pub fn group_names(&self) -> Vec<String> {
        self.group_order.clone()
    }

    /// Turns true when the server begins to shut down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}

/// A bound, ready server: `run` serves until the shutdown future resolves.
pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    http: TcpListener,
    shutdown_tx: watch::Sender<bool>,
    /// Stops monitors, appliers and supervisors (after the sessions).
    stop_tx: watch::Sender<bool>,
}

impl Server {
    /// Binds the ports, probes every node once and starts the monitors.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        raise_fd_limit();
        let config = Arc::new(config);
        let tls = match &config.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(
                crate::wire::tls::server_config(t)
                    .map_err(|(key, reason)| anyhow::anyhow!("key `{key}`: {reason}"))?,
            )),
            None => None,
        };
        let listener = TcpListener::bind(config.listen_addr()).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (key `listen`): {e}", config.listen)
        })?;
        let http = TcpListener::bind(config.http_addr())
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (key `http`): {e}", config.http))?;
        // Sessions drain first; monitors, appliers and the supervisor stop
        // only after them (a COMMIT waiting for a subscriber needs them).
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        // Before any metric handle is created, or those handles go nowhere.
        let metrics = Metrics::install();
        let mut groups = HashMap::new();
        let mut group_order = Vec::new();
        for g in &config.groups {
            let group = Arc::new(Group::new(
                g,
                config.routing.read_scaling,
                config.routing.max_lag_ms,
            ));
            let policy = Policy::from_config(&config);
            health::initial_probe(&group, &config.health, &policy).await;
            tokio::spawn(failover::supervise(
                group.clone(),
                policy.clone(),
                stop_rx.clone(),
            ));
            for i in 0..group.nodes.len() {
                tokio::spawn(health::monitor(
                    group.clone(),
                    i,
                    config.health.clone(),
                    policy.clone(),
                    stop_rx.clone(),
                ));
                if config.replication.enabled {
                    tokio::spawn(crate::replication::applier::run(
                        group.clone(),
                        i,
                        stop_rx.clone(),
                    ));
                }
            }
            group_order.push(g.name.clone());
            groups.insert(g.name.clone(), group);
        }
        let users = config
            .auth
            .users
            .iter()
            .map(|u| {
                let secret = if let Some(v) = &u.scram_verifier {
                    ScramSecret::parse(v).map_err(|e| {
                        anyhow::anyhow!("key `auth.user.scram_verifier` of user `{}`: {e}", u.name)
                    })?
                } else if u.password.starts_with("SCRAM-SHA-256$") {
                    ScramSecret::parse(&u.password).map_err(|e| {
                        anyhow::anyhow!("key `auth.user.password` of user `{}`: {e}", u.name)
                    })?
                } else {
                    ScramSecret::from_password(&u.password)
                };
                Ok((u.name.clone(), secret))
            })
            .collect::<anyhow::Result<_>>()?;
        let shared = Arc::new(Shared {
            config,
            groups,
            group_order,
            users,
            tls,
            cancel: Arc::new(CancelRegistry::default()),
            metrics,
            shutdown: shutdown_rx,
        });
        Ok(Server {
            shared,
            listener,
            http,
            shutdown_tx,
            stop_tx,
        })
    }

    /// The PG-wire address clients connect to.
    pub fn client_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound")
    }

    /// The HTTP address of /status and /metrics.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("bound")
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets running
    /// transactions finish (up to `shutdown_timeout_ms`) and closes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            shared,
            listener,
            http,
            shutdown_tx,
            stop_tx,
        } = self;
        // Aborted when this future ends or is dropped: a server that is gone
        // answers nothing (stop_tx and shutdown_tx, dropped with it, stop the
        // background tasks and sessions).
        let http_task = AbortOnDrop(tokio::spawn(crate::admin::http::serve(
            http,
            shared.clone(),
        )));
        let limit = Arc::new(Semaphore::new(shared.config.max_client_connections));
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let shared = shared.clone();
                    match limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            sessions.spawn(async move {
                                crate::session::serve(stream, shared).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            sessions.spawn(too_many(stream, shared.config.max_client_connections));
                        }
                    }
                }
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                _ = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: no new connections; waiting for running transactions");
        drop(listener);
        let _ = shutdown_tx.send(true);
        let grace = Duration::from_millis(shared.config.shutdown_timeout_ms);
        let drained = tokio::time::timeout(grace, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown timeout reached; closing the remaining sessions");
            sessions.abort_all();
            while sessions.join_next().await.is_some() {}
        }
        let _ = stop_tx.send(true);
        drop(http_task);
        Ok(())
    }
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Refuses a connection over the limit with SQLSTATE 53300.
async fn too_many(stream: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let mut stream = stream;
    let mut out = bytes::BytesMut::new();
    PgError::fatal(
        "53300",
        format!("sorry, too many clients already (max_client_connections = {max})"),
    )
    .encode(&mut out);
    let _ = stream.write_all(&out).await;
}

/// Binds and serves a config until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::bind(config).await?.run(shutdown).await
}

/// Raises the open-file limit to its hard maximum: every client costs a
/// descriptor, and the default soft limit is often 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(from = old, to = lim.rlim_max, "raised the open-file limit");
            }
        }
    }
}
