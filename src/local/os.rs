//! Operating-system helpers: the `postgres` user, running commands, and the
//! postmaster's process tree in `/proc`.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::LocalError;

/// Lines of stderr / server log kept in error messages.
const TAIL_LINES: usize = 25;

/// The user the server tools must run as when we are root.
#[derive(Debug, Clone, Copy)]
pub(super) struct PgUser {
    pub uid: u32,
    pub gid: u32,
}

/// Whether we run as root (and so must switch to `postgres`).
pub(super) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The `postgres` user when we are root, `None` otherwise.
pub(super) fn pg_user() -> Result<Option<PgUser>, LocalError> {
    if !is_root() {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam takes a valid C string; the result points to static
    // storage that we copy out of immediately (we do not keep the pointer).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(LocalError::NoPostgresUser);
    }
    // SAFETY: pw is non-null and points to a valid passwd struct.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some(PgUser { uid, gid }))
}

/// A command for a server tool, wrapped in `runuser -u postgres --` when root.
pub(super) fn server_command(program: &Path) -> Result<Command, LocalError> {
    let mut cmd = if pg_user()?.is_some() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // The postgres user may not be allowed into our working directory.
    cmd.current_dir("/");
    Ok(cmd)
}

/// The command line of `cmd`, for messages.
pub(super) fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| shell_quote(&a.to_string_lossy())));
    parts.join(" ")
}

/// Runs `cmd` to completion; an error carries the tail of its output plus
/// `extra` (e.g. a server log tail, computed only on failure).
pub(super) fn run(
    cmd: &mut Command,
    extra: impl FnOnce() -> Option<String>,
) -> Result<Output, LocalError> {
    let line = describe(cmd);
    let out = cmd.output().map_err(|source| LocalError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let mut detail = tail(&String::from_utf8_lossy(&out.stderr), TAIL_LINES);
    let stdout = tail(&String::from_utf8_lossy(&out.stdout), TAIL_LINES);
    if !stdout.is_empty() {
        detail = format!("{detail}\n{stdout}").trim().to_string();
    }
    if let Some(more) = extra() {
        detail = format!("{detail}\n{more}");
    }
    Err(LocalError::Command {
        cmd: line,
        status: out.status.to_string(),
        detail,
    })
}

/// The last `n` non-empty lines of `text`.
pub(super) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The tail of the server log at `path` from byte `from`, labelled for messages.
pub(super) fn log_tail(path: &Path, from: u64) -> Option<String> {
    let bytes = fs::read(path).ok()?;
    let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = tail(&String::from_utf8_lossy(&bytes[start..]), TAIL_LINES);
    Some(format!(
        "--- server log {} (last lines) ---\n{text}",
        path.display()
    ))
}

/// Creates `dir` (empty or new) with mode 0700, owned by `postgres` when root,
/// and makes sure `postgres` can reach it.
pub(super) fn prepare_dir(dir: &Path) -> Result<(), LocalError> {
    if dir.exists() {
        let mut entries =
            fs::read_dir(dir).map_err(|e| LocalError::io("read directory", dir, e))?;
        if entries.next().is_some() {
            return Err(LocalError::DirNotEmpty(dir.to_path_buf()));
        }
    } else {
        fs::create_dir_all(dir).map_err(|e| LocalError::io("create directory", dir, e))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| LocalError::io("chmod", dir, e))?;
    if let Some(user) = pg_user()? {
        std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid))
            .map_err(|e| LocalError::io("chown to postgres", dir, e))?;
        make_reachable(dir, user)?;
    }
    Ok(())
}

/// Ensures every ancestor of `dir` is searchable by `user`. Blocking
/// ancestors get `g+x,o+x` when they are `dir`'s parent or lie inside the
/// system temp dir (e.g. a `tempfile::TempDir`); anything else is an error.
fn make_reachable(dir: &Path, user: PgUser) -> Result<(), LocalError> {
    use std::os::unix::fs::MetadataExt;
    let temp = fs::canonicalize(std::env::temp_dir()).unwrap_or_else(|_| "/tmp".into());
    let parent = dir.parent();
    let mut ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
    ancestors.reverse();
    for a in ancestors {
        let meta = fs::metadata(a).map_err(|e| LocalError::io("stat", a, e))?;
        let mode = meta.mode();
        let searchable = mode & 0o001 != 0
            || (meta.uid() == user.uid && mode & 0o100 != 0)
            || (meta.gid() == user.gid && mode & 0o010 != 0);
        if searchable {
            continue;
        }
        let canon = fs::canonicalize(a).unwrap_or_else(|_| a.to_path_buf());
        let fixable = Some(a) == parent || (canon.starts_with(&temp) && canon != temp);
        if !fixable {
            return Err(LocalError::Unreachable {
                dir: dir.to_path_buf(),
                blocker: a.to_path_buf(),
            });
        }
        fs::set_permissions(a, fs::Permissions::from_mode((mode & 0o7777) | 0o011))
            .map_err(|e| LocalError::io("chmod g+x,o+x", a, e))?;
    }
    Ok(())
}

/// Makes `path` absolute against the current directory.
pub(super) fn absolute(path: &Path) -> Result<PathBuf, LocalError> {
    std::path::absolute(path).map_err(|e| LocalError::io("resolve path", path, e))
}

/// Parses `/proc/<pid>/stat` into (state, ppid).
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is a live process (zombies count as dead: nobody may reap them).
pub(super) fn alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Whether `pid` is stopped by a signal (state `T`).
pub(super) fn stopped(pid: i32) -> bool {
    matches!(proc_stat(pid), Some(('T', _)))
}

/// Whether `pid` runs the PostgreSQL server binary (guards against a stale
/// `postmaster.pid` whose pid was reused).
pub(super) fn is_postgres(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| matches!(c.trim(), "postgres" | "postmaster"))
}

/// A new private directory `/tmp/reprise-XXXXXX` (short enough for unix sockets).
pub(super) fn short_temp_dir() -> Result<PathBuf, LocalError> {
    let mut template = b"/tmp/reprise-XXXXXX\0".to_vec();
    // SAFETY: template is a writable NUL-terminated buffer ending in XXXXXX,
    // which mkdtemp overwrites in place.
    let ptr = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if ptr.is_null() {
        let err = std::io::Error::last_os_error();
        return Err(LocalError::io(
            "create directory",
            "/tmp/reprise-XXXXXX",
            err,
        ));
    }
    template.pop();
    Ok(PathBuf::from(
        String::from_utf8_lossy(&template).into_owned(),
    ))
}

/// All live descendants of `pid` (children, grandchildren, …).
pub(super) fn descendants(pid: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some((state, ppid)) = proc_stat(child)
                && state != 'Z'
            {
                children.entry(ppid).or_default().push(child);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub(super) fn signal(pid: i32, sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Waits until none of `pids` is alive; returns the ones still alive at `timeout`.
pub(super) fn wait_dead(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback port that was free a moment ago.
pub(super) fn free_port() -> Result<u16, LocalError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| LocalError::io("bind", "127.0.0.1:0", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| LocalError::io("read address of", "127.0.0.1:0", e))?
        .port();
    Ok(port)
}

/// Quotes `s` for the `/bin/sh` that `pg_ctl -o` hands its options to.
pub(super) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("fsync=off"), "fsync=off");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn tail_keeps_last_non_empty_lines() {
        assert_eq!(tail("a\n\nb\nc\n\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
    }

    #[test]
    fn own_process_is_alive_and_has_no_bogus_children() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(!alive(i32::MAX));
        assert!(!descendants(me).contains(&me));
    }
}
