//! `reprise demo` as a user runs it: the built binary makes local copies,
//! says how to connect, psql connects through it (reads and writes), and
//! Ctrl-C stops it and removes the copies.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::psql;

/// Lines of a child's stream, sent on as they come.
fn lines_of(stream: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
}

/// The text after `prefix` in the first line that has it, within `limit`;
/// every line seen is kept in `seen` for the failure message.
fn wait_for(
    rx: &mpsc::Receiver<String>,
    prefix: &str,
    limit: Duration,
    seen: &mut Vec<String>,
) -> Option<String> {
    let deadline = Instant::now() + limit;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            return None;
        };
        seen.push(line.clone());
        if let Some(i) = line.find(prefix) {
            return Some(line[i + prefix.len()..].to_string());
        }
    }
    None
}

#[test]
fn the_demo_comes_up_serves_psql_and_cleans_up_on_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_reprise"))
        .args(["demo", "--nodes", "2", "--port", "0", "--http-port", "0"])
        .env("REPRISE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("reprise demo starts");
    let (tx, rx) = mpsc::channel();
    lines_of(child.stdout.take().expect("stdout"), tx.clone());
    lines_of(child.stderr.take().expect("stderr"), tx);
    let mut seen = Vec::new();

    let dir = wait_for(
        &rx,
        "PostgreSQL copies in ",
        Duration::from_secs(30),
        &mut seen,
    )
    .map(|rest| rest.trim_end_matches(" …").to_string());
    let url = wait_for(&rx, "  psql \"", Duration::from_secs(180), &mut seen)
        .map(|rest| rest.trim_end_matches('"').to_string());
    let (Some(dir), Some(url)) = (dir, url) else {
        let _ = child.kill();
        panic!(
            "the demo did not say how to connect; it printed:\n{}",
            seen.join("\n")
        );
    };
    assert!(url.ends_with("/app"), "{url}");
    assert!(std::path::Path::new(&dir).exists(), "{dir}");

    // Writes go to the primary and are replicated; reads work too.
    let (ok, out, err) = psql(
        &url,
        "CREATE TABLE demo_t (id int PRIMARY KEY, v text);\n\
         INSERT INTO demo_t VALUES (1, 'one'), (2, 'two');\n\
         SELECT string_agg(v, ',' ORDER BY id) FROM demo_t;\n",
    );
    assert!(ok, "psql through the demo failed: {err}");
    assert_eq!(out.trim(), "one,two");
    let admin = url.replace("/app", "/reprise");
    let (ok, out, err) = psql(&admin, "SHOW NODES;\n");
    assert!(ok, "the admin console failed: {err}");
    assert!(
        out.contains("n1") && out.contains("n2"),
        "SHOW NODES lists both copies: {out}"
    );

    // Ctrl-C: the demo stops and removes its copies.
    let pid = child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not stop within 60 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the demo exited with {status}");
    assert!(
        !std::path::Path::new(&dir).exists(),
        "the demo left its copies in {dir}"
    );
}
