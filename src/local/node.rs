//! One local PostgreSQL server: its data dir, port, and lifecycle.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::os::{self, PgUser};
use super::{LocalError, PgBin};

/// The address every local node listens on.
const HOST: &str = "127.0.0.1";
/// How often `start` retries with a new port when the chosen one got taken.
const START_ATTEMPTS: usize = 5;
/// `pg_ctl -t`: seconds to wait for start/stop.
const PG_CTL_TIMEOUT: &str = "60";
/// Connect timeout used by [`LocalNode::psql`].
const PSQL_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest socket dir we use: sun_path holds 107 bytes including `/.s.PGSQL.NNNNN`.
const MAX_SOCKET_DIR_LEN: usize = 85;

/// How `pg_ctl stop` shuts the server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for all clients to disconnect.
    Smart,
    /// Disconnect clients, roll back, shut down cleanly.
    Fast,
    /// Abort without a checkpoint; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    /// The `pg_ctl -m` argument.
    fn as_str(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A local PostgreSQL server on 127.0.0.1, owned by this process: dropping
/// it stops the server (immediate mode).
///
/// Files: the data dir `<dir>`, the server log `<dir>.log` and the unix
/// socket dir `<dir>.sock` next to it (or a short dir in /tmp when that path
/// is too long for a unix socket).
#[derive(Debug)]
pub struct LocalNode {
    /// A name for messages and logs, e.g. "node1".
    pub name: String,
    bin: PgBin,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    port: Option<u16>,
    settings: Vec<(String, String)>,
}

impl LocalNode {
    /// initdb a new data dir at `dir` (must not exist or be empty):
    /// `initdb -D dir -U postgres -A trust -E UTF8 --locale=C --no-sync`
    /// (as `postgres` when root). Does not start it.
    pub fn init(bin: &PgBin, name: &str, dir: &Path) -> Result<LocalNode, LocalError> {
        let dir = os::absolute(dir)?;
        os::prepare_dir(&dir)?;
        let mut cmd = os::server_command(&bin.dir().join("initdb"))?;
        cmd.arg("-D").arg(&dir).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        os::run(&mut cmd, || None)?;
        tracing::debug!(node = name, dir = %dir.display(), "initdb done");
        LocalNode::new(bin.clone(), name, dir, Vec::new())
    }

    /// Copies a stopped node's data dir (`cp -a`, keeping ownership) into
    /// `dir` (must not exist or be empty) and returns a new node with the same
    /// settings and no port yet — much faster than initdb; used by tests to
    /// make identical copies. The copied `postmaster.pid` is removed.
    pub fn copy_from(
        template: &LocalNode,
        name: &str,
        dir: &Path,
    ) -> Result<LocalNode, LocalError> {
        if template.is_running() {
            return Err(LocalError::Running(template.name.clone()));
        }
        let dir = os::absolute(dir)?;
        os::prepare_dir(&dir)?;
        let mut cmd = Command::new("cp");
        cmd.arg("-a").arg(template.data_dir.join(".")).arg(&dir);
        os::run(&mut cmd, || None)?;
        remove_if_exists(&dir.join("postmaster.pid"))?;
        LocalNode::new(template.bin.clone(), name, dir, template.settings.clone())
    }

    /// A node for an initialised data dir.
    fn new(
        bin: PgBin,
        name: &str,
        data_dir: PathBuf,
        settings: Vec<(String, String)>,
    ) -> Result<LocalNode, LocalError> {
        let socket_dir = socket_dir_for(&data_dir)?;
        Ok(LocalNode {
            name: name.to_string(),
            bin,
            data_dir,
            socket_dir,
            port: None,
            settings,
        })
    }

    /// Adds an extra `-c key=value` server setting applied at the next start
    /// (e.g. ("fsync","off"), ("max_connections","200")); replaces an earlier
    /// value for the same key.
    pub fn set(&mut self, key: &str, value: &str) {
        self.settings.retain(|(k, _)| k != key);
        self.settings.push((key.to_string(), value.to_string()));
    }

    /// Writes a file into the data dir (owned by `postgres` when root) with
    /// the given mode, e.g. `server.key` at 0o600; returns its path.
    pub fn write_data_file(
        &self,
        name: &str,
        contents: &[u8],
        mode: u32,
    ) -> Result<PathBuf, LocalError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data_dir.join(name);
        fs::write(&path, contents).map_err(|e| LocalError::io("write", &path, e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| LocalError::io("chmod", &path, e))?;
        chown_to(&path, os::pg_user()?)?;
        Ok(path)
    }

    /// Puts `line` first in `pg_hba.conf`, so it wins over initdb's lines
    /// (e.g. `hostnossl all all all reject`); read at the next start or
    /// reload.
    pub fn prepend_hba(&self, line: &str) -> Result<(), LocalError> {
        let path = self.data_dir.join("pg_hba.conf");
        let old = fs::read_to_string(&path).map_err(|e| LocalError::io("read", &path, e))?;
        fs::write(&path, format!("{line}\n{old}")).map_err(|e| LocalError::io("write", &path, e))
    }

    /// The extra settings, in the order they are passed.
    pub fn settings(&self) -> &[(String, String)] {
        &self.settings
    }

    /// Starts the postmaster on 127.0.0.1 — on the port previously used or set
    /// with [`set_port`](Self::set_port), else on a free port (retried with a
    /// new one if it got taken meanwhile) — and returns once it accepts
    /// connections. Removes a stale `postmaster.pid` left by a crash. Does
    /// nothing if it is already running.
    pub fn start(&mut self) -> Result<(), LocalError> {
        if self.is_running() {
            return Ok(());
        }
        self.prepare_run_files()?;
        let fixed = self.port;
        let mut attempt = 1;
        loop {
            let port = match fixed {
                Some(port) => port,
                None => os::free_port()?,
            };
            match self.pg_ctl_start(port) {
                Ok(()) => {
                    self.port = Some(port);
                    tracing::info!(node = %self.name, port, dir = %self.data_dir.display(), "started local PostgreSQL");
                    return Ok(());
                }
                Err(LocalError::Command { ref detail, .. })
                    if fixed.is_none()
                        && attempt < START_ATTEMPTS
                        && detail.contains("Address already in use") =>
                {
                    tracing::debug!(node = %self.name, port, "port taken, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates the socket dir and log file (owned by `postgres` when root)
    /// and removes lock files left by a crash.
    fn prepare_run_files(&self) -> Result<(), LocalError> {
        let user = os::pg_user()?;
        let sock = &self.socket_dir;
        fs::create_dir_all(sock).map_err(|e| LocalError::io("create directory", sock, e))?;
        fs::set_permissions(sock, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| LocalError::io("chmod", sock, e))?;
        chown_to(sock, user)?;
        let log = self.log_file();
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| LocalError::io("create log file", &log, e))?;
        chown_to(&log, user)?;
        // The server refuses to start over a lock file whose pid is alive;
        // after a kill the pid may be a zombie nobody reaps, or reused.
        remove_if_exists(&self.data_dir.join("postmaster.pid"))?;
        for entry in fs::read_dir(sock).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }

    /// One `pg_ctl start -w` on `port`.
    fn pg_ctl_start(&self, port: u16) -> Result<(), LocalError> {
        let log = self.log_file();
        let from = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = os::server_command(&self.bin.dir().join("pg_ctl"))?;
        cmd.args(["start", "-w", "-t", PG_CTL_TIMEOUT, "-D"])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(self.server_options(port));
        os::run(&mut cmd, || os::log_tail(&log, from)).map(drop)
    }

    /// The `pg_ctl -o` string: listen address, port, socket dir, settings.
    fn server_options(&self, port: u16) -> String {
        let mut opts = vec![
            "-p".to_string(),
            port.to_string(),
            "-c".to_string(),
            format!("listen_addresses={HOST}"),
            "-k".to_string(),
            self.socket_dir.to_string_lossy().into_owned(),
            "-c".to_string(),
            "max_connections=200".to_string(),
        ];
        for (k, v) in &self.settings {
            opts.push("-c".to_string());
            opts.push(format!("{k}={v}"));
        }
        let quoted: Vec<String> = opts.iter().map(|o| os::shell_quote(o)).collect();
        quoted.join(" ")
    }

    /// Sets the port for the next start (e.g. to restart on a known port).
    pub fn set_port(&mut self, port: u16) {
        self.port = Some(port);
    }

    /// The port the node listens on (or will, after `set_port`); 0 before the
    /// first start.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(0)
    }

    /// The host the node listens on: "127.0.0.1".
    pub fn host(&self) -> &str {
        HOST
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The unix socket directory (private to this node).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log: `<data dir>.log`.
    pub fn log_file(&self) -> PathBuf {
        let mut name = self.data_dir.as_os_str().to_owned();
        name.push(".log");
        PathBuf::from(name)
    }

    /// The PostgreSQL bin dir this node uses.
    pub fn bin(&self) -> &PgBin {
        &self.bin
    }

    /// `pg_ctl stop -m smart|fast|immediate -w`. Does nothing if not running.
    pub fn stop(&mut self, mode: StopMode) -> Result<(), LocalError> {
        if !self.is_running() {
            return Ok(());
        }
        let pm = self.running_pid();
        let log = self.log_file();
        let mut cmd = os::server_command(&self.bin.dir().join("pg_ctl"))?;
        cmd.args([
            "stop",
            "-w",
            "-t",
            PG_CTL_TIMEOUT,
            "-m",
            mode.as_str(),
            "-D",
        ])
        .arg(&self.data_dir);
        os::run(&mut cmd, || os::log_tail(&log, 0))?;
        // pg_ctl returns once the pid file is gone, which the postmaster
        // removes a moment before it exits.
        if let Some(pm) = pm {
            os::wait_dead(&[pm], Duration::from_secs(10));
        }
        tracing::info!(node = %self.name, mode = mode.as_str(), "stopped local PostgreSQL");
        Ok(())
    }

    /// SIGKILLs the postmaster and all its children, like a machine crash.
    /// The node can be started again afterwards (crash recovery). Does
    /// nothing if not running.
    pub fn kill(&mut self) -> Result<(), LocalError> {
        let Some(pm) = self.running_pid() else {
            return Ok(());
        };
        // Freeze the postmaster first so it cannot fork while we list its children.
        self.stop_and_wait(pm)?;
        let mut pids = os::descendants(pm);
        pids.push(pm);
        for &pid in &pids {
            os::signal(pid, libc::SIGKILL).map_err(|e| self.process_error("SIGKILL", pid, e))?;
        }
        let left = os::wait_dead(&pids, Duration::from_secs(10));
        if !left.is_empty() {
            return Err(LocalError::Process {
                name: self.name.clone(),
                what: format!("processes {left:?} still alive 10s after SIGKILL"),
            });
        }
        tracing::info!(node = %self.name, pid = pm, "killed local PostgreSQL");
        Ok(())
    }

    /// SIGSTOPs the postmaster and all its children: the node still accepts
    /// TCP connections (kernel backlog) but never answers.
    pub fn pause(&self) -> Result<(), LocalError> {
        let pm = self
            .running_pid()
            .ok_or_else(|| LocalError::NotRunning(self.name.clone()))?;
        self.stop_and_wait(pm)?;
        for pid in os::descendants(pm) {
            os::signal(pid, libc::SIGSTOP).map_err(|e| self.process_error("SIGSTOP", pid, e))?;
        }
        Ok(())
    }

    /// SIGCONTs the postmaster and all its children (undoes [`pause`](Self::pause)).
    pub fn resume(&self) -> Result<(), LocalError> {
        let pm = self
            .running_pid()
            .ok_or_else(|| LocalError::NotRunning(self.name.clone()))?;
        for pid in os::descendants(pm) {
            os::signal(pid, libc::SIGCONT).map_err(|e| self.process_error("SIGCONT", pid, e))?;
        }
        os::signal(pm, libc::SIGCONT).map_err(|e| self.process_error("SIGCONT", pm, e))
    }

    /// SIGSTOPs `pid` and waits until it is stopped (so it cannot fork any more).
    fn stop_and_wait(&self, pid: i32) -> Result<(), LocalError> {
        os::signal(pid, libc::SIGSTOP).map_err(|e| self.process_error("SIGSTOP", pid, e))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while os::alive(pid) && !os::stopped(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// An error for a failed signal.
    fn process_error(&self, sig: &str, pid: i32, e: std::io::Error) -> LocalError {
        LocalError::Process {
            name: self.name.clone(),
            what: format!("could not send {sig} to pid {pid}: {e}"),
        }
    }

    /// The pid in the first line of `<datadir>/postmaster.pid`, if the file exists.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The postmaster pid if that process is alive and is PostgreSQL.
    fn running_pid(&self) -> Option<i32> {
        self.postmaster_pid()
            .filter(|&pid| os::alive(pid) && os::is_postgres(pid))
    }

    /// Whether the postmaster is alive (also true while paused).
    pub fn is_running(&self) -> bool {
        self.running_pid().is_some()
    }

    /// Runs SQL through `psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p PORT
    /// -U postgres -d DB -c SQL` (30 s connect timeout) and returns stdout
    /// without the final newline; the error includes psql's stderr.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, LocalError> {
        self.psql_with_timeout(db, sql, PSQL_CONNECT_TIMEOUT)
    }

    /// [`psql`](Self::psql) with the given connect timeout (`PGCONNECT_TIMEOUT`,
    /// whole seconds, at least 2 as libpq enforces).
    pub fn psql_with_timeout(
        &self,
        db: &str,
        sql: &str,
        connect_timeout: Duration,
    ) -> Result<String, LocalError> {
        let port = self
            .port
            .ok_or_else(|| LocalError::NotRunning(self.name.clone()))?;
        let mut cmd = Command::new(self.bin.tool("psql"));
        cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p"])
            .arg(port.to_string())
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .env(
                "PGCONNECT_TIMEOUT",
                connect_timeout.as_secs().max(2).to_string(),
            )
            .stdin(Stdio::null());
        let out = os::run(&mut cmd, || None)?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.ends_with('\n') {
            text.pop();
        }
        Ok(text)
    }

    /// `CREATE DATABASE "db"`.
    pub fn create_database(&self, db: &str) -> Result<(), LocalError> {
        let ident = format!("\"{}\"", db.replace('"', "\"\""));
        self.psql("postgres", &format!("CREATE DATABASE {ident}"))
            .map(drop)
    }

    /// libpq URL: `postgres://postgres@127.0.0.1:PORT/DB` (`db` is not escaped).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{HOST}:{}/{db}", self.port())
    }
}

impl Drop for LocalNode {
    /// If running: resume (in case paused), stop immediate (SIGKILL if that
    /// fails), then remove the socket dir. Errors are ignored.
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.resume();
            if self.stop(StopMode::Immediate).is_err() {
                let _ = self.kill();
            }
        }
        if !self.is_running() {
            let _ = fs::remove_dir_all(&self.socket_dir);
        }
    }
}

/// `<dir>.sock`, or a fresh short dir in /tmp when that is too long for a
/// unix socket path.
fn socket_dir_for(data_dir: &Path) -> Result<PathBuf, LocalError> {
    let mut sibling = data_dir.as_os_str().to_owned();
    sibling.push(".sock");
    if sibling.len() <= MAX_SOCKET_DIR_LEN {
        return Ok(PathBuf::from(sibling));
    }
    os::short_temp_dir()
}

/// chowns `path` to `user` when we are root.
fn chown_to(path: &Path, user: Option<PgUser>) -> Result<(), LocalError> {
    match user {
        Some(u) => std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(|e| LocalError::io("chown to postgres", path, e)),
        None => Ok(()),
    }
}

/// Removes a file; a missing file is fine.
fn remove_if_exists(path: &Path) -> Result<(), LocalError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(LocalError::io("remove", path, e))
        }
        _ => Ok(()),
    }
}
