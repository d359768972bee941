//! Tests against real PostgreSQL servers started by this module.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::*;

/// A fresh node in its own temp dir, with durability off for speed.
fn fresh_node(name: &str) -> (tempfile::TempDir, LocalNode) {
    let tmp = tempfile::tempdir().unwrap();
    let bin = PgBin::find().unwrap();
    let mut node = LocalNode::init(&bin, name, &tmp.path().join(name)).unwrap();
    node.set("fsync", "off");
    (tmp, node)
}

#[test]
fn finds_server_binaries_and_client_tools() {
    let bin = PgBin::find().unwrap();
    assert!(bin.dir().join("initdb").exists(), "{}", bin.dir().display());
    assert!(bin.dir().join("pg_ctl").exists());
    assert!(bin.tool("psql").exists());
    assert!(bin.tool("pgbench").exists());
}

#[test]
fn init_refuses_a_non_empty_dir() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("junk"), "x").unwrap();
    let bin = PgBin::find().unwrap();
    let err = LocalNode::init(&bin, "n", tmp.path()).unwrap_err();
    assert!(matches!(err, LocalError::DirNotEmpty(_)), "{err}");
}

#[test]
fn start_query_stop_copy_and_drop() {
    let (tmp, mut template) = fresh_node("template");
    template.start().unwrap();
    assert_ne!(template.port(), 0);
    assert_ne!(template.port(), 5432);
    assert_eq!(template.psql("postgres", "select 1").unwrap(), "1");
    assert_eq!(template.psql("postgres", "show fsync").unwrap(), "off");
    template.create_database("app").unwrap();
    template
        .psql("app", "create table t(x int); insert into t values (42)")
        .unwrap();
    assert_eq!(
        template.url("app"),
        format!("postgres://postgres@127.0.0.1:{}/app", template.port())
    );
    let err = template.psql("app", "select * from missing").unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    template.stop(StopMode::Fast).unwrap();
    assert!(!template.is_running());

    let mut copy = LocalNode::copy_from(&template, "copy", &tmp.path().join("copy")).unwrap();
    assert!(!copy.data_dir().join("postmaster.pid").exists());
    template.start().unwrap();
    copy.start().unwrap();
    assert_ne!(template.port(), copy.port());
    for node in [&template, &copy] {
        assert_eq!(node.psql("app", "select x from t").unwrap(), "42");
        assert_eq!(node.psql("postgres", "show fsync").unwrap(), "off");
    }

    let pid = copy.postmaster_pid().unwrap();
    let socket_dir = copy.socket_dir().to_path_buf();
    drop(copy);
    assert!(!os::alive(pid), "drop must stop the server");
    assert!(!socket_dir.exists());
    assert_eq!(template.psql("postgres", "select 1").unwrap(), "1");
}

#[test]
fn pause_resume_kill_and_restart() {
    let (_tmp, mut node) = fresh_node("n");

    // A port someone else holds: a clear error that names the cause and the log.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    node.set_port(busy.local_addr().unwrap().port());
    let err = node.start().unwrap_err().to_string();
    assert!(err.contains("Address already in use"), "{err}");
    assert!(err.contains(".log"), "{err}");
    drop(busy);

    node.set_port(os::free_port().unwrap());
    node.start().unwrap();
    let port = node.port();
    assert_eq!(node.psql("postgres", "select 1").unwrap(), "1");

    node.pause().unwrap();
    assert!(node.is_running());
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .expect("paused node still accepts TCP");
    let t = Instant::now();
    let err = node
        .psql_with_timeout("postgres", "select 1", Duration::from_secs(2))
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(err.to_string().contains("timeout"), "{err}");
    node.resume().unwrap();
    assert_eq!(node.psql("postgres", "select 1").unwrap(), "1");

    let pm = node.postmaster_pid().unwrap();
    let children = os::descendants(pm);
    assert!(!children.is_empty());
    node.kill().unwrap();
    assert!(!node.is_running());
    assert!(!os::alive(pm));
    assert!(children.iter().all(|&c| !os::alive(c)));

    node.start().unwrap();
    assert_eq!(node.port(), port, "restart keeps the port");
    assert_eq!(node.psql("postgres", "select 1").unwrap(), "1");
    node.stop(StopMode::Immediate).unwrap();
    assert!(!node.is_running());
}
