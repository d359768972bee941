//! TLS between clients and the proxy and between the proxy and its nodes,
//! and stored SCRAM verifiers — with psql, tokio-postgres over rustls and
//! real PostgreSQL servers that refuse plain TCP.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use reprise::backend::tls::NodeTls;
use reprise::config::{AuthMethod, Config, SslMode, TlsConfig, UserConfig};

/// A test CA and a certificate it signed for `localhost` and 127.0.0.1,
/// as PEM text and as files in a temp dir.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    cert_pem: String,
    key_pem: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Reprise test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    Pki {
        ca: write("ca.crt", &ca.pem()),
        cert: write("server.crt", &cert_pem),
        key: write("server.key", &key_pem),
        cert_pem,
        key_pem,
        _dir: dir,
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `[tls]` with the test certificate.
fn client_tls(pki: &Pki, required: bool) -> impl FnOnce(&mut Config) {
    let tls = TlsConfig {
        cert: path(&pki.cert),
        key: path(&pki.key),
        required,
    };
    move |c: &mut Config| c.tls = Some(tls)
}

/// A libpq conninfo for the proxy with extra keywords.
fn conninfo(proxy: &Proxy, db: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10 {extra}",
        proxy.addr.port()
    )
}

/// A tokio-postgres client over rustls that checks the certificate against
/// `ca` and the name 127.0.0.1 (verify-full).
async fn verified_client(
    proxy: &Proxy,
    db: &str,
    ca: &Path,
) -> Result<(tokio_postgres::Client, NodeTls), tokio_postgres::Error> {
    let tls = NodeTls::new(SslMode::VerifyFull, Some(&path(ca))).unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.addr.port())
        .user("postgres")
        .dbname(db)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, conn) = config.connect(tls.connector()).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, tls))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_use_tls_for_sessions_the_console_and_cancels() {
    let pki = pki();
    let g = TestGroup::start(1, client_tls(&pki, false)).await;

    // psql with sslmode=require: the session is encrypted.
    let (ok, out, err) = psql(
        &conninfo(&g.proxy, "app", "sslmode=require"),
        "SELECT count(*) FROM items;\n\\conninfo\n",
    );
    assert!(ok, "psql sslmode=require failed: {err}");
    assert!(out.starts_with("100\n"), "{out}");
    assert!(
        out.contains("SSL connection") || out.contains("SSL Connection"),
        "\\conninfo does not report SSL: {out}"
    );

    // libpq checks the proxy's certificate against the CA and the host.
    let (ok, out, err) = psql(
        &conninfo(
            &g.proxy,
            "app",
            &format!("sslmode=verify-full sslrootcert={}", path(&pki.ca)),
        ),
        "INSERT INTO notes (body) VALUES ('over tls') RETURNING body;\n",
    );
    assert!(ok, "psql sslmode=verify-full failed: {err}");
    assert_eq!(out.trim(), "over tls");

    // Plain clients still get in when TLS is not required.
    for mode in ["prefer", "disable"] {
        let (ok, out, err) = psql(
            &conninfo(&g.proxy, "app", &format!("sslmode={mode}")),
            "SELECT 1;\n",
        );
        assert!(ok, "psql sslmode={mode} failed: {err}");
        assert_eq!(out.trim(), "1");
    }

    // The admin console takes the same path.
    let (ok, out, err) = psql(
        &conninfo(&g.proxy, "reprise", "sslmode=require"),
        "SHOW NODES;\n",
    );
    assert!(ok, "the console over TLS failed: {err}");
    assert!(out.contains("n1"), "{out}");

    // Plain bytes sent right after an SSLRequest are never read as the
    // startup packet: they go to the TLS handshake, which fails.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(g.proxy.addr).await.unwrap();
        let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let mut startup = vec![0, 3, 0, 0];
        for part in ["user", "postgres", "database", "app", ""] {
            startup.extend_from_slice(part.as_bytes());
            startup.push(0);
        }
        bytes.extend_from_slice(&((startup.len() + 4) as i32).to_be_bytes());
        bytes.extend_from_slice(&startup);
        s.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        assert_eq!(answer.first(), Some(&b'S'), "{answer:?}");
        // After 'S' only a TLS alert record (0x15) may follow, never an
        // AuthenticationOk ('R') or any other protocol message.
        assert!(
            answer.len() == 1 || answer[1] == 0x15,
            "plain bytes after the SSLRequest were answered: {answer:?}"
        );
    }

    // A rustls client verifying the certificate (verify-full, 127.0.0.1),
    // and a cancel request that goes over TLS too.
    let (client, tls) = verified_client(&g.proxy, "app", &pki.ca)
        .await
        .expect("verify-full client connects");
    let row = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 100);
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    wait_sleeping(&g, 0).await;
    token.cancel_query(tls.connector()).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), sleeper)
        .await
        .expect("the cancel took effect")
        .unwrap()
        .expect_err("the sleep was cancelled");
    assert_eq!(sqlstate(&e), "57014", "{e}");
    // Every cancel over TLS ends cleanly: the proxy lets the client close
    // first instead of resetting the connection under its close_notify.
    for _ in 0..50 {
        token
            .cancel_query(tls.connector())
            .await
            .expect("a cancel request over TLS completes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_require_fails_and_required_tls_refuses_plain_clients() {
    // No [tls]: sslmode=require is refused by libpq itself ('N'). The
    // proxy reaches its (plain) copies over TCP with sslmode disable.
    let g = TestGroup::start(2, |c| {
        for n in &mut c.groups[0].nodes {
            n.host = "127.0.0.1".into();
            n.sslmode = SslMode::Disable;
        }
    })
    .await;
    let (ok, _, err) = psql(&conninfo(&g.proxy, "app", "sslmode=require"), "SELECT 1;\n");
    assert!(!ok, "sslmode=require succeeded without [tls]");
    assert!(err.contains("does not support SSL"), "{err}");
    for mode in ["prefer", "disable"] {
        let (ok, out, err) = psql(
            &conninfo(&g.proxy, "app", &format!("sslmode={mode}")),
            "SELECT 1;\n",
        );
        assert!(ok, "psql sslmode={mode} failed: {err}");
        assert_eq!(out.trim(), "1");
    }

    // required = true: a plain client is refused with 28000.
    let pki = pki();
    let mut config = g.config();
    client_tls(&pki, true)(&mut config);
    let strict = Proxy::start(config).await;
    let (ok, _, err) = psql(&conninfo(&strict, "app", "sslmode=disable"), "SELECT 1;\n");
    assert!(!ok, "a plain psql got in although TLS is required");
    assert!(err.contains("requires TLS"), "{err}");
    let e = tokio_postgres::connect(&strict.url("app"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("a plain tokio-postgres client is refused");
    assert_eq!(sqlstate(&e), "28000", "{e}");
    // The console too.
    let (ok, _, err) = psql(
        &conninfo(&strict, "reprise", "sslmode=disable"),
        "SHOW NODES;\n",
    );
    assert!(!ok && err.contains("requires TLS"), "{err}");
    // With TLS it works.
    let (ok, out, err) = psql(&conninfo(&strict, "app", "sslmode=require"), "SELECT 1;\n");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1");

    // sslmode disable to plain nodes: writes replicate, reads come back.
    let c = g.proxy.client("app").await;
    c.execute("INSERT INTO notes (body) VALUES ('plain')", &[])
        .await
        .unwrap();
    assert!(
        wait_caught_up(&g, &[0, 1], Duration::from_secs(60))
            .await
            .is_some(),
        "{:#}",
        g.proxy.status().await
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // sslmode require to those plain nodes: they are down, not used plain.
    let mut config = g.config();
    for n in &mut config.groups[0].nodes {
        n.host = "127.0.0.1".into();
        n.sslmode = SslMode::Require;
    }
    let demanding = Proxy::start(config).await;
    for node in ["n1", "n2"] {
        assert!(
            wait_node_state(&demanding, node, &["down"], Duration::from_secs(30))
                .await
                .is_some(),
            "{node} is not down: {:#}",
            demanding.status().await
        );
    }
}

/// Two copies that speak TLS only: `ssl = on` with the test certificate in
/// the data dir, and pg_hba refusing plain TCP. The proxy reaches them
/// over TCP with `mode` (and the CA for the verify modes).
async fn tls_nodes(pki: &Pki, mode: SslMode) -> TestGroup {
    let (cert, key) = (pki.cert_pem.clone(), pki.key_pem.clone());
    let ca = path(&pki.ca);
    TestGroup::start_prepared(
        2,
        SEED_SQL,
        &[],
        move |node| {
            node.write_data_file("server.crt", cert.as_bytes(), 0o600)?;
            node.write_data_file("server.key", key.as_bytes(), 0o600)?;
            node.prepend_hba("hostnossl all all all reject")?;
            node.psql("postgres", "ALTER SYSTEM SET ssl = on")?;
            Ok(())
        },
        move |c| over_tcp(c, &[mode, mode], &ca),
    )
    .await
}

/// Points every node at 127.0.0.1 with the given sslmodes and CA.
fn over_tcp(c: &mut Config, modes: &[SslMode], ca: &str) {
    for (n, mode) in c.groups[0].nodes.iter_mut().zip(modes) {
        n.host = "127.0.0.1".into();
        n.sslmode = *mode;
        n.sslrootcert = Some(ca.to_string());
    }
}

/// A direct client of node `i` through its Unix socket (pg_hba lets
/// local connections in; TCP needs TLS).
async fn local_client(g: &TestGroup, i: usize) -> tokio_postgres::Client {
    let node = g.node(i);
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(node.socket_dir())
        .port(node.port())
        .user("postgres")
        .dbname("app");
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Waits until node `i` runs `SELECT pg_sleep(60)`, so that a cancel
/// reaches the sleep itself (not a statement the proxy runs before it).
async fn wait_sleeping(g: &TestGroup, i: usize) {
    let c = local_client(g, i).await;
    let seen = wait_until(Duration::from_secs(30), || async {
        let row = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query = 'SELECT pg_sleep(60)' AND state = 'active' \
                 AND wait_event = 'PgSleep'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 1
    })
    .await;
    assert!(seen.is_some(), "the sleep never started on node {i}");
}

/// Waits for both copies to apply everything, then compares them.
async fn assert_copies_identical(g: &TestGroup) {
    assert!(
        wait_caught_up(g, &[0, 1], Duration::from_secs(60))
            .await
            .is_some(),
        "the copies did not catch up: {:#}",
        g.proxy.status().await
    );
    let a = digest(&local_client(g, 0).await).await;
    let b = digest(&local_client(g, 1).await).await;
    assert_eq!(a, b, "the copies differ");
}

/// Writes, reads, and proves the node saw the proxy's connection as TLS.
async fn writes_and_reads(g: &TestGroup, tag: &str) {
    let c = g.proxy.client("app").await;
    for i in 0..20 {
        c.execute(
            "INSERT INTO notes (body) VALUES ($1)",
            &[&format!("{tag} {i}")],
        )
        .await
        .unwrap();
    }
    c.execute("UPDATE items SET name = name || $1 WHERE id <= 10", &[&tag])
        .await
        .unwrap();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM notes WHERE body LIKE $1",
            &[&format!("{tag} %")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20);
    // Autocommit reads go to either copy; both see their link as TLS.
    for _ in 0..6 {
        let ssl: bool = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "a node served the proxy without TLS");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_require_tls_serve_replicate_reseed_and_cancel() {
    let pki = pki();
    let mut g = tls_nodes(&pki, SslMode::Require).await;

    // Plain TCP really is refused by the copies.
    let plain = tokio_postgres::connect(&g.node(0).url("app"), tokio_postgres::NoTls).await;
    assert!(plain.is_err(), "a copy accepted plain TCP");

    // sslmode = "require": reads, writes, replication.
    writes_and_reads(&g, "require").await;
    assert_copies_identical(&g).await;

    // A cancel request reaches a node behind TLS.
    let c = g.proxy.client("app").await;
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await });
    wait_sleeping(&g, 0).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), sleeper)
        .await
        .expect("the cancel took effect")
        .unwrap()
        .expect_err("the sleep was cancelled");
    assert_eq!(sqlstate(&e), "57014", "{e}");

    // Seeding (pg_dump | psql) connects with the node's sslmode too.
    let rows = tokio::time::timeout(
        Duration::from_secs(120),
        admin_named(&g.proxy, "RESEED app n2"),
    )
    .await
    .expect("RESEED finishes")
    .unwrap_or_else(|e| panic!("RESEED over TLS: {e}"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        wait_node_state(&g.proxy, "n2", &["up"], Duration::from_secs(60))
            .await
            .is_some()
    );
    writes_and_reads(&g, "after reseed").await;
    assert_copies_identical(&g).await;

    // verify-full on the primary, verify-ca on the subscriber.
    g.proxy.stop().await;
    let mut config = g.config();
    over_tcp(
        &mut config,
        &[SslMode::VerifyFull, SslMode::VerifyCa],
        &path(&pki.ca),
    );
    g.proxy = Proxy::start(config).await;
    writes_and_reads(&g, "verified").await;
    assert_copies_identical(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_be_reached_as_configured_is_down() {
    let pki = pki();
    let other = self::pki();
    let g = tls_nodes(&pki, SslMode::Require).await;

    // n1 without TLS (pg_hba refuses it), n2 checked against a CA that did
    // not sign its certificate.
    let mut config = g.config();
    over_tcp(
        &mut config,
        &[SslMode::Disable, SslMode::VerifyCa],
        &path(&other.ca),
    );
    let wrong = Proxy::start(config).await;
    for node in ["n1", "n2"] {
        assert!(
            wait_node_state(&wrong, node, &["down"], Duration::from_secs(30))
                .await
                .is_some(),
            "{node} is not down: {:#}",
            wrong.status().await
        );
    }
    let e = match tokio_postgres::connect(&wrong.url("app"), tokio_postgres::NoTls).await {
        Ok((c, conn)) => {
            tokio::spawn(conn);
            c.simple_query("SELECT 1").await.unwrap_err()
        }
        Err(e) => e,
    };
    let text = db_text(&e);
    assert!(text.contains("down"), "{text}");
    // Why each is down: pg_hba's refusal of plain TCP, and the certificate.
    let logs = std::fs::read_to_string(g.node(0).log_file()).unwrap();
    assert!(
        logs.contains("no encryption"),
        "n1's log shows no refusal of plain TCP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_scram_verifier_authenticates() {
    let verifier = postgres_protocol::password::scram_sha_256(b"s3cret");
    let g = TestGroup::start(1, move |c| {
        c.auth.method = AuthMethod::ScramSha256;
        c.auth.users = vec![UserConfig {
            name: "alice".into(),
            password: String::new(),
            scram_verifier: Some(verifier),
            admin: false,
        }];
    })
    .await;
    let right = format!("postgres://alice:s3cret@{}/app", g.proxy.addr);
    let c = connect(&right).await;
    let row = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 100);

    let wrong = format!("postgres://alice:secret@{}/app", g.proxy.addr);
    let e = tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    assert_eq!(sqlstate(&e), "28P01", "{e}");
}

#[test]
fn check_names_a_bad_tls_cert_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reprise.toml");
    std::fs::write(
        &file,
        "[tls]\ncert = \"/nonexistent/server.crt\"\nkey = \"/nonexistent/server.key\"\n\
         [[group]]\nname = \"app\"\n[[group.node]]\nname = \"n1\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_reprise"))
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert"), "{err}");
    assert!(err.contains("/nonexistent/server.crt"), "{err}");
}
