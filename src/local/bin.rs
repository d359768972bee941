//! Finding the PostgreSQL server binaries.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::LocalError;

/// Environment variable that names the PostgreSQL bin directory explicitly.
pub const BINDIR_ENV: &str = "REPRISE_PG_BINDIR";

/// The directory holding the PostgreSQL server binaries (`initdb`, `pg_ctl`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBin {
    dir: PathBuf,
}

impl PgBin {
    /// Finds the server binaries: env `REPRISE_PG_BINDIR` if set, then `PATH`
    /// (a dir containing both `initdb` and `pg_ctl`, following symlinks to the
    /// real bin dir), then `pg_config --bindir`, then the newest version in
    /// `/usr/lib/postgresql/*/bin` (numeric sort).
    pub fn find() -> Result<PgBin, LocalError> {
        if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            return if has_server_tools(&dir) {
                Ok(PgBin { dir })
            } else {
                Err(LocalError::BadBinDir(dir))
            };
        }
        let found = from_path()
            .or_else(from_pg_config)
            .or_else(|| newest_in(Path::new("/usr/lib/postgresql")));
        found
            .map(|dir| PgBin { dir })
            .ok_or_else(|| LocalError::BinariesNotFound {
                searched:
                    "$REPRISE_PG_BINDIR, $PATH, `pg_config --bindir`, /usr/lib/postgresql/*/bin"
                        .to_string(),
            })
    }

    /// Uses `dir` as the bin directory without checking it.
    pub fn from_dir(dir: impl Into<PathBuf>) -> PgBin {
        PgBin { dir: dir.into() }
    }

    /// The bin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of tool `name` (e.g. "pgbench", "pg_dump", "psql"): in the bin
    /// dir if it is there, else the first match on `PATH`, else the (missing)
    /// path in the bin dir so that running it reports a clear error.
    pub fn tool(&self, name: &str) -> PathBuf {
        let own = self.dir.join(name);
        if is_executable(&own) {
            return own;
        }
        path_dirs()
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
            .unwrap_or(own)
    }
}

/// Whether `dir` holds both `initdb` and `pg_ctl`.
fn has_server_tools(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl"))
}

/// Whether `path` is an executable file (following symlinks).
pub(crate) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The directories on `PATH`.
pub(crate) fn path_dirs() -> impl Iterator<Item = PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).collect::<Vec<_>>().into_iter()
}

/// The first `PATH` dir with both tools. When `initdb` there is a symlink into
/// the real bin dir (e.g. `/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb`),
/// the real dir is returned so that `tool("pgbench")` and friends resolve too.
fn from_path() -> Option<PathBuf> {
    let dir = path_dirs().find(|d| has_server_tools(d))?;
    let real = fs::canonicalize(dir.join("initdb"))
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|real| has_server_tools(real));
    Some(real.unwrap_or(dir))
}

/// The dir printed by `pg_config --bindir`, if it has both tools.
fn from_pg_config() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    has_server_tools(&dir).then_some(dir)
}

/// The newest `<root>/<version>/bin` with both tools, versions sorted numerically.
fn newest_in(root: &Path) -> Option<PathBuf> {
    let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let key = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u64>>>()?;
            Some((key, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server_tools(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_wins_numerically() {
        let root = tempfile::tempdir().unwrap();
        for v in ["9.6", "10", "15", "abc"] {
            let bin = root.path().join(v).join("bin");
            fs::create_dir_all(&bin).unwrap();
            for tool in ["initdb", "pg_ctl"] {
                fs::write(bin.join(tool), "#!/bin/sh\n").unwrap();
                fs::set_permissions(bin.join(tool), fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        // 15 > 10 > 9.6 numerically, even though "9.6" > "15" as strings.
        assert_eq!(newest_in(root.path()), Some(root.path().join("15/bin")));
    }

    #[test]
    fn missing_binaries_error_says_how_to_install() {
        let err = LocalError::BinariesNotFound {
            searched: "x".into(),
        };
        assert!(err.to_string().contains("apt-get install postgresql"));
        assert!(err.to_string().contains("REPRISE_PG_BINDIR"));
    }
}
