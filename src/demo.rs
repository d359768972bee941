//! `reprise demo`: a whole group on one machine from nothing, and the group
//! layout printout of `reprise check`.

use std::fmt::Write;
use std::future::Future;
use std::path::PathBuf;

use crate::config::Config;
use crate::local::LocalCluster;

/// Options of `reprise demo`.
pub struct DemoOptions {
    pub nodes: usize,
    pub port: u16,
    pub http_port: u16,
    pub dir: Option<PathBuf>,
}

/// Creates the local copies, serves until `shutdown`, then cleans up.
pub async fn run(opts: DemoOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=9).contains(&opts.nodes),
        "--nodes must be between 1 and 9"
    );
    let (dir, remove) = match &opts.dir {
        Some(d) => {
            anyhow::ensure!(
                !d.exists() || std::fs::read_dir(d)?.next().is_none(),
                "--dir {} is not empty: choose a new directory",
                d.display()
            );
            (d.clone(), false)
        }
        None => (
            std::env::temp_dir().join(format!("reprise-demo-{}", std::process::id())),
            true,
        ),
    };
    eprintln!(
        "reprise demo: creating {} PostgreSQL copies in {} …",
        opts.nodes,
        dir.display()
    );
    let nodes = opts.nodes;
    let dir2 = dir.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        LocalCluster::create(&dir2, nodes, "app", &[("fsync", "off")], |_| Ok(()))
    })
    .await??;
    let mut config = cluster.config(
        "app",
        &format!("127.0.0.1:{}", opts.port),
        &format!("127.0.0.1:{}", opts.http_port),
    );
    // RELOAD re-reads this file; ADD/REMOVE/MOVE NODE write to it.
    let file = dir.join("reprise.toml");
    if std::fs::write(&file, toml::to_string_pretty(&config).unwrap_or_default()).is_ok() {
        config.source = Some(file);
    }
    let server = crate::Server::bind(config.clone()).await?;
    let addr = server.client_addr();
    println!("{}", layout(&config));
    println!("Reprise is serving group `app` on {addr}:");
    println!("  psql \"postgres://postgres@{addr}/app\"");
    println!(
        "  status: http://{}/  (JSON at /status, metrics at /metrics)",
        server.http_addr()
    );
    println!("  admin:  psql \"postgres://postgres@{addr}/reprise\" -c 'SHOW NODES'");
    println!("Press Ctrl-C to stop and remove the copies.");
    let result = server.run(shutdown).await;
    eprintln!("reprise demo: stopping the copies …");
    let mut cluster = cluster;
    tokio::task::spawn_blocking(move || {
        cluster.stop();
        drop(cluster);
        if remove {
            let _ = std::fs::remove_dir_all(&dir);
        }
    })
    .await?;
    result
}

/// A human-readable layout of the config's groups.
pub fn layout(config: &Config) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "listen {} (clients, admin console: database `reprise`), http {}",
        config.listen, config.http
    );
    if let Some(tls) = &config.tls {
        let _ = writeln!(
            s,
            "tls cert={} key={}{}",
            tls.cert,
            tls.key,
            if tls.required { " (required)" } else { "" }
        );
    }
    for g in &config.groups {
        let _ = writeln!(s, "group {} ({} nodes)", g.name, g.nodes.len());
        for (i, n) in g.nodes.iter().enumerate() {
            let role = if i == 0 { "primary" } else { "subscriber" };
            let _ = writeln!(
                s,
                "  {:<10} {:<10} {}:{} dbname={} user={} weight={} sslmode={}",
                n.name,
                role,
                n.host,
                n.port,
                n.dbname(&g.name),
                n.user,
                n.weight,
                n.sslmode.as_str()
            );
        }
    }
    s
}
