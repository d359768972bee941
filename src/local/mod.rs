//! Start and stop local PostgreSQL copies with `initdb` and `pg_ctl`.
//!
//! One implementation shared by `reprise demo`, the integration-test harness
//! and the benchmarks. Everything here is blocking std code: call it at setup
//! or from `spawn_blocking`.
//!
//! PostgreSQL refuses to run as root, so when we are root every server tool
//! runs as the `postgres` user (`runuser -u postgres -- …`) in directories
//! owned by that user. Servers listen on 127.0.0.1 on a free port (never
//! 5432) with their unix socket in a private directory.
//!
//! ```no_run
//! # fn main() -> Result<(), reprise::local::LocalError> {
//! use reprise::local::{LocalNode, PgBin, StopMode};
//! let bin = PgBin::find()?;
//! let mut node = LocalNode::init(&bin, "n1", std::path::Path::new("/tmp/demo/n1"))?;
//! node.set("fsync", "off");
//! node.start()?;
//! assert_eq!(node.psql("postgres", "select 1")?, "1");
//! node.stop(StopMode::Fast)?;
//! # Ok(())
//! # }
//! ```

mod bin;
mod cluster;
mod node;
mod os;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use bin::{BINDIR_ENV, PgBin};
pub(crate) use bin::{is_executable, path_dirs};
pub use cluster::{LocalCluster, pgbench_init};
pub use node::{LocalNode, StopMode};

/// What went wrong while managing a local PostgreSQL server.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// No directory holding `initdb` and `pg_ctl` was found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with \
         `apt-get install postgresql` (Debian/Ubuntu) or set REPRISE_PG_BINDIR \
         to the directory that holds them (searched: {searched})"
    )]
    BinariesNotFound {
        /// Where we looked, for the message.
        searched: String,
    },
    /// `REPRISE_PG_BINDIR` is set but does not hold the server binaries.
    #[error(
        "REPRISE_PG_BINDIR={0} does not contain initdb and pg_ctl: point it at the \
         PostgreSQL bin directory (see `pg_config --bindir`) or unset it"
    )]
    BadBinDir(PathBuf),
    /// We are root but there is no `postgres` user to run the server as.
    #[error(
        "running as root but user `postgres` does not exist: PostgreSQL refuses to \
         run as root; create the user (`apt-get install postgresql` does) or run as \
         a non-root user"
    )]
    NoPostgresUser,
    /// The data directory given to `init`/`copy_from` already has files.
    #[error("data directory {0} already exists and is not empty: pass a new or empty directory")]
    DirNotEmpty(PathBuf),
    /// The `postgres` user cannot reach the data directory.
    #[error(
        "user `postgres` cannot reach {dir}: {blocker} is not searchable by it; \
         use a directory under /tmp or make {blocker} world-searchable (chmod o+x)"
    )]
    Unreachable {
        /// The data directory.
        dir: PathBuf,
        /// The ancestor directory that blocks the way.
        blocker: PathBuf,
    },
    /// The operation needs a running server.
    #[error("node {0} is not running: start it first")]
    NotRunning(String),
    /// The operation needs a stopped server.
    #[error("node {0} is running: stop it first")]
    Running(String),
    /// A command could not be started at all.
    #[error("could not run `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{cmd}` failed ({status}):\n{detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// The exit status, e.g. `exit status: 1`.
        status: String,
        /// The tail of its stderr/stdout and, for server starts, of the server log.
        detail: String,
    },
    /// A file-system operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What we tried, e.g. "create directory".
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A signal could not be delivered or a process did not exit.
    #[error("node {name}: {what}")]
    Process {
        /// The node.
        name: String,
        /// What failed.
        what: String,
    },
}

impl LocalError {
    /// Builds an [`LocalError::Io`] for `action` on `path`.
    fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LocalError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
