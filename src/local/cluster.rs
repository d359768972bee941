//! Several identical local nodes: one is initialised, prepared, then copied.

use std::path::{Path, PathBuf};

use super::{LocalError, LocalNode, PgBin, StopMode};
use crate::config::{Config, GroupConfig, NodeConfig};

/// Fills `db` on a running node with pgbench's tables (`pgbench -i -q`).
pub fn pgbench_init(node: &LocalNode, db: &str, scale: u32) -> Result<(), LocalError> {
    let mut cmd = std::process::Command::new(node.bin().tool("pgbench"));
    cmd.args([
        "-i",
        "-q",
        "-s",
        &scale.to_string(),
        "-h",
        node.host(),
        "-p",
    ])
    .arg(node.port().to_string())
    .args(["-U", "postgres", db]);
    let out = cmd.output().map_err(|source| LocalError::Spawn {
        cmd: "pgbench -i".into(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LocalError::Command {
            cmd: format!("pgbench -i -s {scale}"),
            status: out.status.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).to_string(),
        })
    }
}

/// A set of local PostgreSQL copies holding the same database.
pub struct LocalCluster {
    pub nodes: Vec<LocalNode>,
    pub dir: PathBuf,
    pub db: String,
}

impl LocalCluster {
    /// Initialises `n` nodes under `dir` with database `db`: the first is
    /// created with initdb and `setup` runs on it (schema, data), then it is
    /// copied, so every node starts identical. All are left running.
    pub fn create(
        dir: &Path,
        n: usize,
        db: &str,
        settings: &[(&str, &str)],
        setup: impl FnOnce(&LocalNode) -> Result<(), LocalError>,
    ) -> Result<LocalCluster, LocalError> {
        let bin = PgBin::find()?;
        std::fs::create_dir_all(dir).map_err(|source| LocalError::Io {
            action: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut first = LocalNode::init(&bin, "n1", &dir.join("n1"))?;
        for (k, v) in settings {
            first.set(k, v);
        }
        first.start()?;
        first.create_database(db)?;
        setup(&first)?;
        first.stop(StopMode::Fast)?;
        let mut nodes = vec![];
        for i in 2..=n {
            let name = format!("n{i}");
            nodes.push(LocalNode::copy_from(&first, &name, &dir.join(&name))?);
        }
        nodes.insert(0, first);
        for node in &mut nodes {
            node.start()?;
        }
        Ok(LocalCluster {
            nodes,
            dir: dir.to_path_buf(),
            db: db.to_string(),
        })
    }

    /// A group config naming every node (the first is the primary). The
    /// proxy reaches local copies through their Unix sockets, which costs
    /// the kernel much less than loopback TCP.
    pub fn group_config(&self, group: &str) -> GroupConfig {
        GroupConfig {
            name: group.to_string(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeConfig {
                    name: n.name.clone(),
                    host: n.socket_dir().display().to_string(),
                    port: n.port(),
                    dbname: Some(self.db.clone()),
                    user: "postgres".into(),
                    password: String::new(),
                    weight: 1,
                    priority: 0,
                    max_connections: 0,
                    sslmode: Default::default(),
                    sslrootcert: None,
                })
                .collect(),
            max_client_connections: 0,
        }
    }

    /// A whole proxy config for this cluster on the given addresses.
    pub fn config(&self, group: &str, listen: &str, http: &str) -> Config {
        let text = format!("listen = \"{listen}\"\nhttp = \"{http}\"\n");
        let mut c = Config::parse(
            &format!("{text}[[group]]\nname = \"x\"\n[[group.node]]\nname = \"x\"\nport = 1\n"),
            "generated",
        )
        .expect("valid generated config");
        c.groups = vec![self.group_config(group)];
        c
    }

    /// Stops every node (fast).
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.stop(StopMode::Fast);
        }
    }
}
