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

/// State every session and monitor shares. The config, the groups and
/// the users change at run time (RELOAD, ADD/REMOVE/MOVE NODE).
pub struct Shared {
    config: arc_swap::ArcSwap<Config>,
    /// Bumped after each new config: sessions keep a copy and reload it
    /// only when this moves.
    config_version: std::sync::atomic::AtomicU64,
    /// Groups in config order.
    groups: std::sync::RwLock<Vec<Arc<Group>>>,
    users: std::sync::RwLock<Arc<HashMap<String, ScramSecret>>>,
    /// Set when `[tls]` is: SSLRequests are answered 'S' (fixed at start).
    tls: Option<tokio_rustls::TlsAcceptor>,
    pub cancel: Arc<CancelRegistry>,
    pub metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    /// Stops monitors, appliers and supervisors (after the sessions).
    stop: watch::Receiver<bool>,
    /// Serialises RELOAD and membership changes.
    pub changes: tokio::sync::Mutex<()>,
    /// Permits for client connections (`max_client_connections`).
    pub client_permits: Arc<Semaphore>,
    client_limit: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// The current config (cheap: sessions read it on every unit).
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    pub fn auth_method(&self) -> AuthMethod {
        self.config().auth.method
    }

    /// The TLS acceptor for clients, when `[tls]` is configured.
    pub fn tls_acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.tls.as_ref()
    }

    /// The SCRAM secret of a configured user.
    pub fn user_secret(&self, user: &str) -> Option<ScramSecret> {
        self.users.read().expect("users").get(user).cloned()
    }

    pub fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.groups
            .read()
            .expect("groups")
            .iter()
            .find(|g| g.name == name)
            .cloned()
    }

    /// Groups in config order.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().expect("groups").clone()
    }

    pub fn group_names(&self) -> Vec<String> {
        self.groups().iter().map(|g| g.name.clone()).collect()
    }

    /// The background tasks' stop signal.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    /// Installs a new config (already applied to the groups).
    pub fn set_config(&self, config: Arc<Config>) -> anyhow::Result<()> {
        let users = Arc::new(user_secrets(&config)?);
        *self.users.write().expect("users") = users;
        let old = self.client_limit.swap(
            config.max_client_connections,
            std::sync::atomic::Ordering::SeqCst,
        );
        let new = config.max_client_connections;
        if new > old {
            self.client_permits.add_permits(new - old);
        } else if new < old {
            self.client_permits.forget_permits(old - new);
        }
        self.config.store(config);
        self.config_version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Moves whenever a new config is installed.
    pub fn config_version(&self) -> u64 {
        self.config_version
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Adds a started group.
    pub fn insert_group(&self, group: Arc<Group>) {
        self.groups.write().expect("groups").push(group);
    }

    /// Takes a group out (RELOAD): new clients cannot pick it.
    pub fn remove_group(&self, name: &str) -> Option<Arc<Group>> {
        let mut groups = self.groups.write().expect("groups");
        let i = groups.iter().position(|g| g.name == name)?;
        Some(groups.remove(i))
    }

    /// Reorders the groups as the config lists them.
    pub fn order_groups(&self, names: &[String]) {
        self.groups.write().expect("groups").sort_by_key(|g| {
            names
                .iter()
                .position(|n| *n == g.name)
                .unwrap_or(usize::MAX)
        });
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
        let mut groups = Vec::new();
        for g in &config.groups {
            groups.push(start_group(&config, g, &stop_rx).await);
        }
        let users = user_secrets(&config)?;
        let shared = Arc::new(Shared {
            client_permits: Arc::new(Semaphore::new(config.max_client_connections)),
            client_limit: std::sync::atomic::AtomicUsize::new(config.max_client_connections),
            config: arc_swap::ArcSwap::new(config),
            config_version: std::sync::atomic::AtomicU64::new(0),
            groups: std::sync::RwLock::new(groups),
            users: std::sync::RwLock::new(Arc::new(users)),
            tls,
            cancel: Arc::new(CancelRegistry::default()),
            metrics,
            shutdown: shutdown_rx,
            stop: stop_rx,
            changes: tokio::sync::Mutex::new(()),
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
        let mut sessions = JoinSet::new();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| anyhow::anyhow!("cannot handle SIGHUP: {e}"))?;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        match crate::admin::reload::reload(&shared).await {
                            Ok(done) => tracing::info!(changes = %done.join("; "), "SIGHUP: config reloaded"),
                            Err(e) => tracing::error!(error = %e.message, "SIGHUP: the new config was refused; the old one keeps running"),
                        }
                    });
                }
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
                    match shared.client_permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            sessions.spawn(async move {
                                crate::session::serve(stream, shared).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            sessions.spawn(too_many(stream, shared.config().max_client_connections));
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
        let grace = Duration::from_millis(shared.config().shutdown_timeout_ms);
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

/// Creates a group, probes its nodes once and starts its supervisor, and
/// its nodes' monitors and appliers.
pub async fn start_group(
    config: &Config,
    g: &crate::config::GroupConfig,
    stop: &watch::Receiver<bool>,
) -> Arc<Group> {
    let group = Arc::new(Group::new(
        g,
        config.routing.read_scaling,
        config.routing.max_lag_ms,
    ));
    let policy = Policy::from_config(config);
    health::initial_probe(&group, &config.health, &policy).await;
    let group_stop = group.stop_signal(stop.clone());
    tokio::spawn(crate::admin::stats::sampler(
        group.clone(),
        group_stop.clone(),
    ));
    tokio::spawn(failover::supervise(
        group.clone(),
        policy.clone(),
        group_stop.clone(),
    ));
    if config.replication.enabled && config.replication.log_keep_entries > 0 {
        tokio::spawn(failover::trim_log(
            group.clone(),
            config.replication.log_keep_entries,
            group_stop.clone(),
        ));
    }
    if config.replication.verify_interval_s > 0 {
        tokio::spawn(crate::replication::verify::schedule(
            group.clone(),
            Duration::from_secs(config.replication.verify_interval_s),
            group_stop.clone(),
        ));
    }
    for i in 0..group.slots() {
        start_node(config, &group, i, &group_stop);
    }
    group
}

/// Starts the monitor and the applier of node `i`; they stop when the node
/// is removed or the group stops.
pub fn start_node(config: &Config, group: &Arc<Group>, i: usize, stop: &watch::Receiver<bool>) {
    let policy = Policy::from_config(config);
    let node_stop = group.node(i).stop_signal(stop.clone());
    tokio::spawn(health::monitor(
        group.clone(),
        i,
        config.health.clone(),
        policy,
        node_stop.clone(),
    ));
    if config.replication.enabled {
        tokio::spawn(crate::replication::applier::run(
            group.clone(),
            i,
            node_stop,
        ));
    }
}

/// The SCRAM secrets of the configured users.
fn user_secrets(config: &Config) -> anyhow::Result<HashMap<String, ScramSecret>> {
    config
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
        .collect()
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

/// The runtime that serves a config: `worker_threads` threads (0: one
/// per CPU core). One thread is a current-thread runtime: everything runs
/// on the thread that calls `block_on`, with none of the work-stealing
/// scheduler's bookkeeping (6% fewer instructions per query than a
/// one-worker multi-thread runtime, by callgrind).
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        b.worker_threads(worker_threads);
    }
    b.enable_all().build()
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
