//! The configuration file: its TOML schema, defaults and validation, in one
//! place. Unknown keys and bad values are rejected with the file, the key and
//! the reason.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// PG-wire address for clients (port 0 picks a free port).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// HTTP address for /status and /metrics (port 0 picks a free port).
    #[serde(default = "default_http")]
    pub http: String,
    /// Largest client message accepted, in bytes; larger ones are refused.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// How many client connections the proxy accepts at once.
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: usize,
    /// On SIGINT/SIGTERM, how long running transactions may take to finish.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// Threads that run the sessions (0: one per CPU core). Where the
    /// proxy shares its cores with PostgreSQL, 1 costs less CPU per query.
    #[serde(default)]
    pub worker_threads: usize,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// TLS for client connections; absent: clients are answered 'N'.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// A session idle inside a transaction longer than this is ended
    /// (SQLSTATE 25P03), releasing its locks (0: never).
    #[serde(default)]
    pub idle_in_transaction_timeout_ms: u64,
    /// The file the config was read from: RELOAD re-reads it, and
    /// membership changes made at run time are written back to it.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_http() -> String {
    "127.0.0.1:8432".into()
}
fn default_max_message_size() -> usize {
    64 * 1024 * 1024
}
fn default_max_client_connections() -> usize {
    1000
}
const MAX_WORKER_THREADS: usize = 1024;

fn default_shutdown_timeout_ms() -> u64 {
    10_000
}

/// How clients authenticate to the proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub method: AuthMethod,
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    /// A client must finish its startup and login within this many ms.
    #[serde(default = "default_auth_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_auth_timeout_ms() -> u64 {
    60_000
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: AuthMethod::Trust,
            users: Vec::new(),
            timeout_ms: default_auth_timeout_ms(),
        }
    }
}

/// `trust` lets anyone in; `scram-sha-256` checks the listed users.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// TLS for client connections: the proxy's certificate and key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain (the proxy's first).
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Refuse clients that do not use TLS (SQLSTATE 28000).
    #[serde(default)]
    pub required: bool,
}

/// A user allowed to connect to the proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// The plain password (scram-sha-256); exclusive with `scram_verifier`.
    #[serde(default)]
    pub password: String,
    /// A stored SCRAM-SHA-256 verifier in `pg_authid.rolpassword` format,
    /// instead of `password`.
    #[serde(default)]
    pub scram_verifier: Option<String>,
    /// May use the admin console (the database `reprise`) under scram.
    #[serde(default)]
    pub admin: bool,
}

/// Health monitoring of every node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_failures_before_down")]
    pub failures_before_down: u32,
    /// Timeout for opening a backend connection for a client session.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long a write waits for a primary (during a failover or a
    /// switchover) before it fails.
    #[serde(default = "default_failover_wait_ms")]
    pub failover_wait_ms: u64,
}

fn default_failover_wait_ms() -> u64 {
    5000
}

fn default_interval_ms() -> u64 {
    500
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_failures_before_down() -> u32 {
    3
}
fn default_connect_timeout_ms() -> u64 {
    5000
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            failures_before_down: default_failures_before_down(),
            connect_timeout_ms: default_connect_timeout_ms(),
            failover_wait_ms: default_failover_wait_ms(),
        }
    }
}

/// Where statements go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Send autocommit reads to subscribers (false: everything to the primary).
    #[serde(default = "default_true")]
    pub read_scaling: bool,
    /// A session that has written reads only from nodes that have its
    /// writes (until replication tracks positions: from the primary).
    #[serde(default = "default_true")]
    pub read_your_writes: bool,
    /// A subscriber further behind than this is not read from (0: no limit).
    #[serde(default = "default_max_lag_ms")]
    pub max_lag_ms: u64,
}

fn default_max_lag_ms() -> u64 {
    10_000
}

/// Replaying committed write transactions on the subscribers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Log write transactions and replay them on every subscriber.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Acknowledge a COMMIT only after this many subscribers applied it.
    #[serde(default)]
    pub sync_replicas: usize,
    /// How long a COMMIT waits for `sync_replicas` before failing (ms).
    #[serde(default = "default_sync_timeout_ms")]
    pub sync_timeout_ms: u64,
    /// Flow control: a COMMIT is acknowledged only while every live
    /// subscriber is at most this many entries behind (0: no limit).
    #[serde(default = "default_max_lag_entries")]
    pub max_lag_entries: u64,
    /// Re-seed a divergent node automatically (false: wait for `RESEED`).
    #[serde(default)]
    pub auto_reseed: bool,
    /// Where `pg_dump` and `psql` are, for seeding (default: found like
    /// the local tools: $REPRISE_PG_BINDIR, PATH, `pg_config --bindir`).
    #[serde(default)]
    pub pg_bin_dir: Option<String>,
    /// Run VERIFY on every group this often (seconds; 0: only on demand).
    #[serde(default)]
    pub verify_interval_s: u64,
    /// Log entries every copy keeps behind the head; older ones that every
    /// live copy has applied are deleted (0: the log is never trimmed). A
    /// copy that was down while its next entries were trimmed is re-seeded.
    #[serde(default = "default_log_keep_entries")]
    pub log_keep_entries: u64,
}

fn default_log_keep_entries() -> u64 {
    1_000_000
}

fn default_max_lag_entries() -> u64 {
    1000
}

fn default_sync_timeout_ms() -> u64 {
    10_000
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            enabled: true,
            sync_replicas: 0,
            sync_timeout_ms: default_sync_timeout_ms(),
            max_lag_entries: default_max_lag_entries(),
            auto_reseed: false,
            pg_bin_dir: None,
            verify_interval_s: 0,
            log_keep_entries: default_log_keep_entries(),
        }
    }
}

fn default_true() -> bool {
    true
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            read_scaling: true,
            read_your_writes: true,
            max_lag_ms: default_max_lag_ms(),
        }
    }
}

/// A redundancy group: one logical database served by several nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Clients pick the group by this database name.
    pub name: String,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeConfig>,
    /// How many clients may be connected to this group at once (0: only
    /// the global `max_client_connections` applies).
    #[serde(default)]
    pub max_client_connections: usize,
}

/// One PostgreSQL database holding a full copy of the group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database name on the node; defaults to the group name.
    #[serde(default)]
    pub dbname: Option<String>,
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// Share of autocommit reads; 0 means this node never serves reads.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Breaks ties between equally advanced failover candidates (higher
    /// wins), and picks the first primary of a new group.
    #[serde(default)]
    pub priority: i32,
    /// How many backend connections the proxy opens to this node for
    /// client sessions (0: no limit besides the node's own).
    #[serde(default)]
    pub max_connections: usize,
    /// TLS to the node, as libpq's `sslmode`.
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM file of the CA(s) the node's certificate must chain to; needed
    /// by verify-ca and verify-full, and makes require verify the chain too.
    #[serde(default)]
    pub sslrootcert: Option<String>,
}

/// libpq's `sslmode` for connections to a node. Over a Unix socket TLS is
/// never used (as in libpq).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain text only.
    #[serde(rename = "disable")]
    Disable,
    /// TLS if the node offers it, else plain; the certificate is not checked.
    #[default]
    #[serde(rename = "prefer")]
    Prefer,
    /// TLS or fail; the certificate is checked only if `sslrootcert` is set.
    #[serde(rename = "require")]
    Require,
    /// TLS, and the certificate must chain to `sslrootcert`.
    #[serde(rename = "verify-ca")]
    VerifyCa,
    /// As verify-ca, and the certificate must name the node's host.
    #[serde(rename = "verify-full")]
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn default_weight() -> u32 {
    1
}

impl NodeConfig {
    /// The database name on the node.
    pub fn dbname<'a>(&'a self, group: &'a str) -> &'a str {
        self.dbname.as_deref().unwrap_or(group)
    }
}

/// A config that could not be loaded: which file, which key, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: key `{}`: {}", self.file, self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: String::new(),
            reason: format!("cannot read the file: {e}"),
        })?;
        let mut config = Config::parse(&text, &file)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
        config.validate().map_err(|(key, reason)| ConfigError {
            file: file.to_string(),
            key,
            reason,
        })?;
        Ok(config)
    }

    /// Checks values serde cannot: addresses, ranges, names, references.
    pub fn validate(&self) -> Result<(), (String, String)> {
        parse_addr(&self.listen).map_err(|r| ("listen".to_string(), r))?;
        parse_addr(&self.http).map_err(|r| ("http".to_string(), r))?;
        if self.max_message_size < 1024 {
            return Err((
                "max_message_size".into(),
                "must be at least 1024 bytes".into(),
            ));
        }
        if self.max_client_connections == 0 {
            return Err(("max_client_connections".into(), "must be at least 1".into()));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err((
                "worker_threads".into(),
                format!("must be at most {MAX_WORKER_THREADS} (0: one per CPU core)"),
            ));
        }
        let h = &self.health;
        for (key, v) in [
            ("health.interval_ms", h.interval_ms),
            ("health.timeout_ms", h.timeout_ms),
            ("health.connect_timeout_ms", h.connect_timeout_ms),
            ("auth.timeout_ms", self.auth.timeout_ms),
        ] {
            if v == 0 {
                return Err((key.into(), "must be greater than 0".into()));
            }
        }
        if h.failures_before_down == 0 {
            return Err((
                "health.failures_before_down".into(),
                "must be at least 1".into(),
            ));
        }
        self.validate_auth()?;
        if let Some(tls) = &self.tls {
            crate::wire::tls::server_config(tls)?;
        }
        self.validate_groups()?;
        let most = self.groups.iter().map(|g| g.nodes.len()).min().unwrap_or(1);
        if self.replication.sync_replicas >= most.max(1) && self.replication.sync_replicas > 0 {
            return Err((
                "replication.sync_replicas".into(),
                format!(
                    "is {} but a group has only {} subscriber(s)",
                    self.replication.sync_replicas,
                    most.saturating_sub(1)
                ),
            ));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), (String, String)> {
        let mut users = HashSet::new();
        for (i, u) in self.auth.users.iter().enumerate() {
            let key = format!("auth.user[{i}].name");
            if u.name.is_empty() {
                return Err((key, "must not be empty".into()));
            }
            if !users.insert(u.name.as_str()) {
                return Err((key, format!("user `{}` is listed twice", u.name)));
            }
            // A stored verifier is parsed at start; check it here too, so
            // that `reprise check` reports a bad one.
            if u.password.starts_with("SCRAM-SHA-256$")
                && let Err(e) = crate::wire::scram::ScramSecret::parse(&u.password)
            {
                return Err((format!("auth.user[{i}].password"), e.to_string()));
            }
            if let Some(v) = &u.scram_verifier {
                let key = format!("auth.user[{i}].scram_verifier");
                if !u.password.is_empty() {
                    return Err((
                        key,
                        "give either `password` or `scram_verifier`, not both".into(),
                    ));
                }
                if let Err(e) = crate::wire::scram::ScramSecret::parse(v) {
                    return Err((key, e.to_string()));
                }
            } else if self.auth.method == AuthMethod::ScramSha256 && u.password.is_empty() {
                return Err((
                    format!("auth.user[{i}].password"),
                    format!(
                        "user `{}` needs a `password` or a `scram_verifier` \
                         under method \"scram-sha-256\"",
                        u.name
                    ),
                ));
            }
        }
        if self.auth.method == AuthMethod::ScramSha256 && self.auth.users.is_empty() {
            return Err((
                "auth.user".into(),
                "method \"scram-sha-256\" needs at least one [[auth.user]] with a password".into(),
            ));
        }
        Ok(())
    }

    fn validate_groups(&self) -> Result<(), (String, String)> {
        if self.groups.is_empty() {
            return Err((
                "group".into(),
                "at least one [[group]] with nodes is required".into(),
            ));
        }
        let mut names = HashSet::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let gkey = format!("group[{gi}]");
            check_name(&g.name).map_err(|r| (format!("{gkey}.name"), r))?;
            if g.name == crate::admin::ADMIN_DATABASE {
                return Err((
                    format!("{gkey}.name"),
                    format!(
                        "`{}` is reserved for the admin console",
                        crate::admin::ADMIN_DATABASE
                    ),
                ));
            }
            if !names.insert(g.name.as_str()) {
                return Err((
                    format!("{gkey}.name"),
                    format!("group `{}` is defined twice", g.name),
                ));
            }
            if g.nodes.is_empty() {
                return Err((
                    format!("{gkey}.node"),
                    format!("group `{}` has no [[group.node]]", g.name),
                ));
            }
            if g.nodes.len() > crate::group::slots::MAX_NODE_SLOTS {
                return Err((
                    format!("{gkey}.node"),
                    format!(
                        "group `{}` has {} nodes; at most {} are supported",
                        g.name,
                        g.nodes.len(),
                        crate::group::slots::MAX_NODE_SLOTS
                    ),
                ));
            }
            let mut nodes = HashSet::new();
            for (ni, n) in g.nodes.iter().enumerate() {
                let nkey = format!("{gkey}.node[{ni}]");
                check_name(&n.name).map_err(|r| (format!("{nkey}.name"), r))?;
                if !nodes.insert(n.name.as_str()) {
                    return Err((
                        format!("{nkey}.name"),
                        format!("node `{}` is defined twice in group `{}`", n.name, g.name),
                    ));
                }
                if n.host.is_empty() {
                    return Err((format!("{nkey}.host"), "must not be empty".into()));
                }
                if n.port == 0 {
                    return Err((format!("{nkey}.port"), "must be 1-65535".into()));
                }
                if n.user.is_empty() {
                    return Err((format!("{nkey}.user"), "must not be empty".into()));
                }
                crate::backend::tls::NodeTls::from_config(n)
                    .map_err(|r| (format!("{nkey}.sslrootcert"), r))?;
            }
        }
        Ok(())
    }

    /// The listen address, parsed (validated at load).
    pub fn listen_addr(&self) -> SocketAddr {
        parse_addr(&self.listen).expect("validated")
    }

    /// The HTTP address, parsed (validated at load).
    pub fn http_addr(&self) -> SocketAddr {
        parse_addr(&self.http).expect("validated")
    }

    /// Finds a group by name.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("`{s}` is not an address like \"127.0.0.1:6432\""))
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err(format!("`{name}` is longer than 63 bytes"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "`{name}` may contain only letters, digits, `_` and `-`"
        ));
    }
    Ok(())
}

/// Turns a TOML/serde error into file + key + reason.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let mut key = String::new();
    let mut where_ = String::new();
    if let Some(span) = e.span() {
        let start = span.start.min(text.len());
        let line_no = text[..start].matches('\n').count();
        where_ = format!(" (line {})", line_no + 1);
        let lines: Vec<&str> = text.lines().collect();
        // The section the line is in, and the key on the line.
        let section = lines[..line_no.min(lines.len())]
            .iter()
            .rev()
            .map(|l| l.trim())
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
        if let Some(line) = lines.get(line_no)
            && let Some((k, _)) = line.split_once('=')
            && !line.trim_start().starts_with('[')
        {
            let k = k.trim().trim_matches('"');
            key = match section {
                Some(s) => format!("{s}.{k}"),
                None => k.to_string(),
            };
        } else if let Some(s) = section {
            key = s;
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let field = &rest[..end];
        if !key.ends_with(field) {
            key = field.to_string();
        }
    }
    ConfigError {
        file: file.to_string(),
        key,
        reason: format!("{message}{where_}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:6432"
http = "127.0.0.1:8432"

[auth]
method = "scram-sha-256"
[[auth.user]]
name = "app"
password = "secret"

[health]
interval_ms = 500
timeout_ms = 1000
failures_before_down = 3

[[group]]
name = "app"
[[group.node]]
name = "n1"
host = "127.0.0.1"
port = 5433
user = "postgres"
password = ""
weight = 1
[[group.node]]
name = "n2"
port = 5434
weight = 0
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(GOOD, "good.toml").unwrap();
        assert_eq!(c.auth.method, AuthMethod::ScramSha256);
        assert_eq!(c.groups[0].nodes.len(), 2);
        assert_eq!(c.groups[0].nodes[0].dbname("app"), "app");
        assert_eq!(c.groups[0].nodes[1].weight, 0);
        assert_eq!(c.groups[0].nodes[1].host, "127.0.0.1");
        assert_eq!(c.health.failures_before_down, 3);
    }

    fn err(text: &str) -> ConfigError {
        Config::parse(text, "bad.toml").unwrap_err()
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&GOOD.replace("weight = 0", "weight = 0\nwieght = 2"));
        assert_eq!(e.key, "group.node.wieght", "{e}");
        assert!(e.to_string().starts_with("bad.toml"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = err(&GOOD.replace("listen = \"127.0.0.1:6432\"", "listen = \"nowhere\""));
        assert_eq!(e.key, "listen");
        let e = err(&GOOD.replace("failures_before_down = 3", "failures_before_down = 0"));
        assert_eq!(e.key, "health.failures_before_down");
        let e = err(&GOOD.replace("method = \"scram-sha-256\"", "method = \"md5\""));
        assert!(e.reason.contains("unknown variant"), "{e}");
        let e = err(&GOOD.replace("port = 5434", "port = 70000"));
        assert_eq!(e.key, "group.node.port", "{e}");
        let e = err(&GOOD.replace("name = \"n2\"", "name = \"n1\""));
        assert_eq!(e.key, "group[0].node[1].name");
        let e = err(&GOOD.replace(
            "name = \"app\"\n[[group.node]]",
            "name = \"reprise\"\n[[group.node]]",
        ));
        assert_eq!(e.key, "group[0].name");
        let e = err(&GOOD.replace(
            "listen = \"127.0.0.1:6432\"",
            "listen = \"127.0.0.1:6432\"\nworker_threads = 5000",
        ));
        assert_eq!(e.key, "worker_threads", "{e}");
        let e = err(&GOOD.replace(
            "listen = \"127.0.0.1:6432\"",
            "listen = \"127.0.0.1:6432\"\nworker_threads = -1",
        ));
        assert!(e.to_string().contains("worker_threads"), "{e}");
    }

    #[test]
    fn too_many_nodes_are_refused() {
        let nodes: String = (0..=crate::group::slots::MAX_NODE_SLOTS)
            .map(|i| format!("[[group.node]]\nname = \"n{i}\"\nport = {}\n", 1000 + i))
            .collect();
        let e = err(&format!("[[group]]\nname = \"app\"\n{nodes}"));
        assert_eq!(e.key, "group[0].node", "{e}");
        assert!(e.reason.contains("at most"), "{e}");
    }

    #[test]
    fn a_group_is_required() {
        let e = err("listen = \"127.0.0.1:0\"");
        assert_eq!(e.key, "group");
    }

    #[test]
    fn a_bad_stored_verifier_is_named() {
        // `reprise check` accepted it; only `serve` refused it at start.
        let e = err(
            "[auth]\nmethod = \"scram-sha-256\"\n[[auth.user]]\nname = \"app\"\n\
             password = \"SCRAM-SHA-256$4096:!!$x:y\"\n\
             [[group]]\nname = \"app\"\n[[group.node]]\nname = \"n1\"\n",
        );
        assert_eq!(e.key, "auth.user[0].password");
        assert!(e.reason.contains("invalid SCRAM verifier"), "{e}");
    }

    const VERIFIER_USER: &str =
        "[auth]\nmethod = \"scram-sha-256\"\n[[auth.user]]\nname = \"app\"\n";
    const ONE_NODE: &str = "[[group]]\nname = \"app\"\n[[group.node]]\nname = \"n1\"\n";

    #[test]
    fn a_scram_verifier_is_checked_and_exclusive_with_a_password() {
        let good = crate::wire::scram::ScramSecret::from_password("pw").to_verifier();
        let c = Config::parse(
            &format!("{VERIFIER_USER}scram_verifier = \"{good}\"\n{ONE_NODE}"),
            "v.toml",
        )
        .unwrap();
        assert_eq!(
            c.auth.users[0].scram_verifier.as_deref(),
            Some(good.as_str())
        );

        let e = err(&format!(
            "{VERIFIER_USER}scram_verifier = \"SCRAM-SHA-256$4096:c2FsdA==$short:key\"\n{ONE_NODE}"
        ));
        assert_eq!(e.key, "auth.user[0].scram_verifier", "{e}");
        assert!(e.reason.contains("invalid SCRAM verifier"), "{e}");

        let e = err(&format!(
            "{VERIFIER_USER}password = \"pw\"\nscram_verifier = \"{good}\"\n{ONE_NODE}"
        ));
        assert_eq!(e.key, "auth.user[0].scram_verifier", "{e}");
        assert!(e.reason.contains("not both"), "{e}");

        let e = err(&format!("{VERIFIER_USER}{ONE_NODE}"));
        assert_eq!(e.key, "auth.user[0].password", "{e}");
    }

    #[test]
    fn tls_files_and_sslmodes_are_checked() {
        let e = err(&format!(
            "[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n{ONE_NODE}"
        ));
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(e.reason.contains("/nonexistent/c.pem"), "{e}");

        let c = Config::parse(ONE_NODE, "d.toml").unwrap();
        assert_eq!(c.groups[0].nodes[0].sslmode, SslMode::Prefer);
        assert!(c.tls.is_none());

        let e = err(&format!("{ONE_NODE}sslmode = \"verify-full\"\n"));
        assert_eq!(e.key, "group[0].node[0].sslrootcert", "{e}");
        let e = err(&format!(
            "{ONE_NODE}sslmode = \"verify-ca\"\nsslrootcert = \"/nonexistent/ca.pem\"\n"
        ));
        assert_eq!(e.key, "group[0].node[0].sslrootcert", "{e}");
        let e = err(&format!("{ONE_NODE}sslmode = \"allow\"\n"));
        assert!(e.reason.contains("unknown variant"), "{e}");
    }
}
