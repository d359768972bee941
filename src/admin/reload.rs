//! RELOAD (and SIGHUP): re-read the config file and apply what changed.
//! The new config is checked whole first; a broken one is refused and the
//! old one keeps running. Groups whose definition did not change, and
//! their sessions, are not touched.

use std::sync::Arc;

use crate::config::{Config, GroupConfig, NodeConfig};
use crate::server::Shared;
use crate::wire::messages::PgError;

/// What to do to one running group.
#[derive(Debug, Default, PartialEq)]
pub struct GroupPlan {
    pub remove: Vec<String>,
    pub add: Vec<NodeConfig>,
    /// (node, weight, priority)
    pub reweight: Vec<(String, u32, i32)>,
}

/// Everything a reload changes.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub new_groups: Vec<String>,
    pub dropped_groups: Vec<String>,
    pub changed: Vec<(String, GroupPlan)>,
    /// Settings that only take effect at restart.
    pub restart: Vec<String>,
}

/// Compares two configs.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    for g in &new.groups {
        match old.groups.iter().find(|o| o.name == g.name) {
            None => p.new_groups.push(g.name.clone()),
            Some(o) => {
                let gp = group_plan(o, g);
                if gp != GroupPlan::default() {
                    p.changed.push((g.name.clone(), gp));
                }
            }
        }
    }
    for o in &old.groups {
        if !new.groups.iter().any(|g| g.name == o.name) {
            p.dropped_groups.push(o.name.clone());
        }
    }
    let mut restart = |key: &str, differs: bool| {
        if differs {
            p.restart.push(key.to_string());
        }
    };
    restart("listen", old.listen != new.listen);
    restart("http", old.http != new.http);
    restart("worker_threads", old.worker_threads != new.worker_threads);
    restart("tls", old.tls != new.tls);
    restart("health", old.health != new.health);
    restart(
        "routing.read_scaling",
        old.routing.read_scaling != new.routing.read_scaling,
    );
    restart(
        "routing.max_lag_ms",
        old.routing.max_lag_ms != new.routing.max_lag_ms,
    );
    restart(
        "replication.enabled",
        old.replication.enabled != new.replication.enabled,
    );
    restart(
        "replication.log_keep_entries",
        old.replication.log_keep_entries != new.replication.log_keep_entries,
    );
    restart(
        "replication.verify_interval_s",
        old.replication.verify_interval_s != new.replication.verify_interval_s,
    );
    p
}

fn group_plan(old: &GroupConfig, new: &GroupConfig) -> GroupPlan {
    let mut gp = GroupPlan::default();
    for o in &old.nodes {
        match new.nodes.iter().find(|n| n.name == o.name) {
            None => gp.remove.push(o.name.clone()),
            Some(n) if same_connection(o, n, &old.name) => {
                if (o.weight, o.priority) != (n.weight, n.priority) {
                    gp.reweight.push((n.name.clone(), n.weight, n.priority));
                }
            }
            // Another database: the node leaves and a new one joins.
            Some(n) => {
                gp.remove.push(o.name.clone());
                gp.add.push(n.clone());
            }
        }
    }
    for n in &new.nodes {
        if !old.nodes.iter().any(|o| o.name == n.name) {
            gp.add.push(n.clone());
        }
    }
    gp
}

fn same_connection(a: &NodeConfig, b: &NodeConfig, group: &str) -> bool {
    (
        &a.host,
        a.port,
        a.dbname(group),
        &a.user,
        &a.password,
        a.max_connections,
        a.sslmode,
        &a.sslrootcert,
    ) == (
        &b.host,
        b.port,
        b.dbname(group),
        &b.user,
        &b.password,
        b.max_connections,
        b.sslmode,
        &b.sslrootcert,
    )
}

/// Re-reads the config file and applies it; returns what changed.
pub async fn reload(shared: &Arc<Shared>) -> Result<Vec<String>, PgError> {
    let _changes = shared.changes.lock().await;
    let old = Arc::clone(&shared.config());
    let Some(path) = old.source.clone() else {
        return Err(PgError::error(
            "F0000",
            "RELOAD needs a config file: this proxy's config was not read from one",
        ));
    };
    let mut new = Config::load(&path).map_err(|e| {
        PgError::error("F0000", format!("the new config was refused: {e}"))
            .with_hint("the running config is unchanged; fix the file and RELOAD again")
    })?;
    let plan = plan(&old, &new);
    // Refuse the whole reload before changing anything.
    for (name, gp) in &plan.changed {
        let g = shared.group(name).expect("running groups are configured");
        for r in &gp.remove {
            if g.node_index(r) == Some(g.primary()) {
                return Err(PgError::error(
                    "F0000",
                    format!("the new config drops {r}, the primary of group \"{name}\""),
                )
                .with_hint(format!(
                    "SWITCHOVER {name} TO <another node> first; the running config is unchanged"
                )));
            }
        }
    }
    // What needs a restart keeps its running value.
    new.listen = old.listen.clone();
    new.http = old.http.clone();
    new.worker_threads = old.worker_threads;
    let mut done = Vec::new();
    for name in &plan.dropped_groups {
        if let Some(g) = shared.remove_group(name) {
            g.retire();
            done.push(format!("group {name} removed"));
        }
    }
    for (name, gp) in &plan.changed {
        let g = shared.group(name).expect("running groups are configured");
        for (node, weight, priority) in &gp.reweight {
            if let Some(i) = g.node_index(node) {
                g.node(i).set_weights(*weight, *priority);
                done.push(format!(
                    "{name}.{node}: weight {weight}, priority {priority}"
                ));
            }
        }
        for r in &gp.remove {
            if let Some(i) = g.node_index(r) {
                super::membership::leave(shared, &g, i).await?;
                done.push(format!("{name}.{r} removed"));
            }
        }
        for a in &gp.add {
            let seeded = super::membership::join(shared, &g, a).await?;
            done.push(format!(
                "{name}.{} added (seeded at seq {})",
                a.name, seeded.seq
            ));
        }
    }
    for name in &plan.new_groups {
        let gc = new
            .groups
            .iter()
            .find(|g| g.name == *name)
            .expect("planned from it");
        let g = crate::server::start_group(&new, gc, &shared.stop_signal()).await;
        shared.insert_group(g);
        done.push(format!("group {name} added"));
    }
    shared.order_groups(
        &new.groups
            .iter()
            .map(|g| g.name.clone())
            .collect::<Vec<_>>(),
    );
    for key in &plan.restart {
        done.push(format!("{key} changed: takes effect at restart"));
    }
    if old.auth != new.auth {
        done.push("auth updated".into());
    }
    shared
        .set_config(Arc::new(new))
        .map_err(|e| PgError::error("F0000", e.to_string()))?;
    if done.is_empty() {
        done.push("no changes".into());
    }
    tracing::info!(changes = %done.join("; "), "config reloaded");
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(text, "t.toml").unwrap()
    }

    #[test]
    fn plans_only_what_changed() {
        let old = cfg(r#"
[[group]]
name = "a"
[[group.node]]
name = "a1"
port = 1
[[group.node]]
name = "a2"
port = 2
[[group]]
name = "b"
[[group.node]]
name = "b1"
port = 3
"#);
        let new = cfg(r#"
listen = "127.0.0.1:7000"
worker_threads = 1
[[group]]
name = "a"
[[group.node]]
name = "a1"
port = 1
weight = 5
[[group.node]]
name = "a2"
port = 22
[[group.node]]
name = "a3"
port = 4
[[group]]
name = "c"
[[group.node]]
name = "c1"
port = 5
"#);
        let p = plan(&old, &new);
        assert_eq!(p.new_groups, ["c"]);
        assert_eq!(p.dropped_groups, ["b"]);
        assert_eq!(p.changed.len(), 1);
        let (name, gp) = &p.changed[0];
        assert_eq!(name, "a");
        assert_eq!(gp.reweight, [("a1".to_string(), 5, 0)]);
        assert_eq!(gp.remove, ["a2"]);
        let added: Vec<&str> = gp.add.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(added, ["a2", "a3"]);
        assert_eq!(p.restart, ["listen", "worker_threads"]);
        assert_eq!(plan(&old, &old), Plan::default());
    }
}
