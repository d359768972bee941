//! ADD NODE, REMOVE NODE and MOVE NODE: changing a group's members while
//! it serves. A change takes effect at once and is written back to the
//! config file (comments and layout kept), so it survives a restart and a
//! later RELOAD of the same file sees nothing to do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, NodeConfig};
use crate::group::failover::{self, Policy};
use crate::group::{Group, NodeState};
use crate::server::Shared;
use crate::wire::messages::PgError;

/// What ADD NODE did.
pub struct Added {
    pub group: String,
    pub node: String,
    pub seq: u64,
    pub bytes: u64,
    pub duration: Duration,
    /// Why the change is not in the config file, if it is not.
    pub unsaved: Option<String>,
}

/// Parses `key=value` options of ADD NODE into a node's config.
pub fn node_options(name: &str, words: &[String]) -> Result<NodeConfig, PgError> {
    let mut table = toml::Table::new();
    table.insert("name".into(), toml::Value::String(name.to_string()));
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(PgError::error(
                "42601",
                format!("expected key=value, found \"{w}\""),
            )
            .with_hint("ADD NODE <group> <node> host=… port=… [dbname=… user=… password=… weight=… priority=… max_connections=… sslmode=… sslrootcert=…]"));
        };
        let k = k.trim().to_ascii_lowercase();
        let value = match k.as_str() {
            "port" | "weight" | "priority" | "max_connections" => {
                toml::Value::Integer(v.parse().map_err(|_| {
                    PgError::error("22023", format!("{k} must be a whole number, not \"{v}\""))
                })?)
            }
            _ => toml::Value::String(v.to_string()),
        };
        if table.insert(k.clone(), value).is_some() {
            return Err(PgError::error("42601", format!("{k} is given twice")));
        }
    }
    if !table.contains_key("host") || !table.contains_key("port") {
        return Err(PgError::error("42601", "ADD NODE needs host=… and port=…"));
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| PgError::error("22023", format!("bad node option: {e}")))
}

/// Splits a command into words; single quotes group (with '' for a quote).
pub fn words(command: &str) -> Result<Vec<String>, PgError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = command.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            cur.push('\'');
                        }
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => {
                            return Err(PgError::error(
                                "42601",
                                "unterminated quoted string in admin command",
                            ));
                        }
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// The running group a command names (42704 listing the groups if none).
pub fn named_group(shared: &Shared, name: &str) -> Result<Arc<Group>, PgError> {
    shared.group(name).ok_or_else(|| {
        PgError::error("42704", format!("no group \"{name}\"")).with_hint(format!(
            "the groups are: {}",
            shared.group_names().join(", ")
        ))
    })
}

/// Adds `node` to `group`: seeds it online from a snapshot, then it
/// catches up and serves reads.
pub async fn add_node(shared: &Shared, group: &str, node: NodeConfig) -> Result<Added, PgError> {
    let _changes = shared.changes.lock().await;
    let g = named_group(shared, group)?;
    let mut config = Config::clone(&shared.config());
    let gc = config
        .groups
        .iter_mut()
        .find(|c| c.name == group)
        .expect("running groups are configured");
    if g.node_index(&node.name).is_some() || gc.nodes.iter().any(|n| n.name == node.name) {
        return Err(PgError::error(
            "42710",
            format!("group \"{group}\" already has a node \"{}\"", node.name),
        ));
    }
    gc.nodes.push(node.clone());
    config
        .validate()
        .map_err(|(key, reason)| PgError::error("22023", format!("key `{key}`: {reason}")))?;
    let unsaved = check_writable(&config);
    let seeded = join(shared, &g, &node).await?;
    let unsaved = install(shared, config, unsaved, |doc| {
        add_to_file(doc, group, &node)
    })?;
    Ok(Added {
        group: group.to_string(),
        node: node.name.clone(),
        seq: seeded.seq,
        bytes: seeded.bytes,
        duration: seeded.duration,
        unsaved,
    })
}

/// Adds a node to a running group and seeds it; on failure the node is
/// taken out again.
pub async fn join(
    shared: &Shared,
    g: &Arc<Group>,
    node: &NodeConfig,
) -> Result<crate::replication::seed::Seeded, PgError> {
    let config = Arc::clone(&shared.config());
    let index = g.add_node(node).ok_or_else(|| {
        PgError::error(
            "54000",
            format!(
                "group \"{}\" has used all its {} node slots (a removed node keeps its slot until Reprise restarts)",
                g.name,
                crate::group::slots::MAX_NODE_SLOTS
            ),
        )
    })?;
    g.node(index).set_state(NodeState::Seeding);
    crate::server::start_node(&config, g, index, &g.stop_signal(shared.stop_signal()));
    let policy = Policy::from_config(&config);
    // In a task of its own: a console client that goes away does not stop
    // a seed halfway.
    let task = {
        let g = g.clone();
        tokio::spawn(async move { failover::reseed(&g, index, &policy).await })
    };
    match task.await.map_err(|e| e.to_string()).and_then(|r| r) {
        Ok(seeded) => {
            tracing::info!(group = %g.name, node = %node.name, seq = seeded.seq, "node added");
            g.stats.journal.record(
                Some(&node.name),
                "node_added",
                format!("seeded at seq {}", seeded.seq),
            );
            Ok(seeded)
        }
        Err(e) => {
            g.remove_node(index);
            Err(
                PgError::error("55000", format!("could not add node {}: {e}", node.name))
                    .with_hint(
                        "the node is not part of the group; fix the cause and run ADD NODE again",
                    ),
            )
        }
    }
}

/// Takes `node` out of `group`: nothing is routed or applied to it any
/// more. The primary cannot be removed.
pub async fn remove_node(
    shared: &Shared,
    group: &str,
    node: &str,
) -> Result<Option<String>, PgError> {
    let _changes = shared.changes.lock().await;
    let (g, index) = find(shared, group, node)?;
    let mut config = Config::clone(&shared.config());
    if let Some(gc) = config.groups.iter_mut().find(|c| c.name == group) {
        gc.nodes.retain(|n| n.name != node);
    }
    let unsaved = check_writable(&config);
    leave(shared, &g, index).await?;
    install(shared, config, unsaved, |doc| {
        remove_from_file(doc, group, node)
    })
}

/// Removes node `index` from a running group (checks first).
pub async fn leave(shared: &Shared, g: &Group, index: usize) -> Result<(), PgError> {
    let node = g.node(index);
    if index == g.primary() {
        return Err(PgError::error(
            "55000",
            format!("{} is the primary of group \"{}\"", node.name, g.name),
        )
        .with_hint(format!(
            "switch over first: SWITCHOVER {} TO <another node>",
            g.name
        )));
    }
    let need = shared.config().replication.sync_replicas;
    let others = g.members().len().saturating_sub(2);
    if need > others {
        return Err(PgError::error(
            "55000",
            format!(
                "removing {} would leave group \"{}\" {others} subscriber(s), fewer than sync_replicas = {need}",
                node.name, g.name
            ),
        ));
    }
    if node.state() == NodeState::Seeding {
        return Err(PgError::error(
            "55000",
            format!("{} is being seeded; wait until it finishes", node.name),
        ));
    }
    g.remove_node(index);
    // The applier finishes the entry it is replaying, then stops.
    let _applier = node.apply_lock.lock().await;
    node.control.reset().await;
    tracing::info!(group = %g.name, node = %node.name, "node removed");
    g.stats
        .journal
        .record(Some(&node.name), "node_removed", "left the group");
    Ok(())
}

/// Moves `node` from whichever group has it to `to`: it leaves its group,
/// then joins `to` with a fresh seed (its database keeps its name).
pub async fn move_node(shared: &Shared, node: &str, to: &str) -> Result<Added, PgError> {
    let _changes = shared.changes.lock().await;
    let owners: Vec<Arc<Group>> = shared
        .groups()
        .into_iter()
        .filter(|g| g.node_index(node).is_some())
        .collect();
    let from = match owners.as_slice() {
        [g] => g.clone(),
        [] => {
            return Err(PgError::error(
                "42704",
                format!("no group has a node \"{node}\""),
            ));
        }
        _ => {
            return Err(
                PgError::error("42725", format!("several groups have a node \"{node}\""))
                    .with_hint("use REMOVE NODE and ADD NODE instead"),
            );
        }
    };
    let target = named_group(shared, to)?;
    if from.name == to {
        return Err(PgError::error(
            "55000",
            format!("{node} is already in group \"{to}\""),
        ));
    }
    if target.node_index(node).is_some() {
        return Err(PgError::error(
            "42710",
            format!("group \"{to}\" already has a node \"{node}\""),
        ));
    }
    let index = from.node_index(node).expect("found above");
    let mut moved = from.node(index).config.clone();
    // The node is the same database: name it explicitly, since the
    // default (the group's name) changes with the group.
    moved.dbname = Some(from.node(index).target.dbname.clone());
    let mut config = Config::clone(&shared.config());
    for gc in config.groups.iter_mut() {
        if gc.name == from.name {
            gc.nodes.retain(|n| n.name != node);
        } else if gc.name == to {
            gc.nodes.push(moved.clone());
        }
    }
    config
        .validate()
        .map_err(|(key, reason)| PgError::error("22023", format!("key `{key}`: {reason}")))?;
    let unsaved = check_writable(&config);
    leave(shared, &from, index).await?;
    let seeded = join(shared, &target, &moved).await.map_err(|e| {
        PgError::error(
            "55000",
            format!(
                "{node} left group \"{}\" but could not join \"{to}\": {}",
                from.name, e.message
            ),
        )
    })?;
    let unsaved = install(shared, config, unsaved, |doc| {
        remove_from_file(doc, &from.name, node)?;
        add_to_file(doc, to, &moved)
    })?;
    Ok(Added {
        group: to.to_string(),
        node: node.to_string(),
        seq: seeded.seq,
        bytes: seeded.bytes,
        duration: seeded.duration,
        unsaved,
    })
}

/// The group and member index a command names.
pub fn find(shared: &Shared, group: &str, node: &str) -> Result<(Arc<Group>, usize), PgError> {
    let g = named_group(shared, group)?;
    let i = g.node_index(node).ok_or_else(|| {
        let names: Vec<String> = g.members().iter().map(|n| n.name.clone()).collect();
        PgError::error("42704", format!("no node \"{node}\" in group \"{group}\""))
            .with_hint(format!("its nodes are: {}", names.join(", ")))
    })?;
    Ok((g, i))
}

/// Why a change could not be saved to the config file, checked before it
/// is made (None: it can be).
fn check_writable(config: &Config) -> Option<String> {
    let Some(path) = &config.source else {
        return Some("the config was not read from a file: the change lasts until restart".into());
    };
    match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "cannot write {}: {e}; the change lasts until restart",
            path.display()
        )),
    }
}

/// Makes `config` the running one after a membership change, and applies
/// `edit` to its file unless `unsaved` already says why it cannot be;
/// returns why the change is not in the file, if it is not.
fn install(
    shared: &Shared,
    config: Config,
    unsaved: Option<String>,
    edit: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<(), String>,
) -> Result<Option<String>, PgError> {
    let unsaved = unsaved.or_else(|| {
        save(&config, edit)
            .err()
            .map(|e| format!("the config file was not updated: {e}"))
    });
    shared
        .set_config(Arc::new(config))
        .map_err(|e| PgError::error("F0000", e.to_string()))?;
    Ok(unsaved)
}

/// Applies `edit` to the config file, keeping its comments and layout.
fn save(
    config: &Config,
    edit: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<(), String>,
) -> Result<(), String> {
    let path = config.source.as_deref().ok_or("no config file")?;
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    edit(&mut doc)?;
    write_atomically(path, &doc.to_string())
}

fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("reprise-tmp");
    std::fs::write(&tmp, text).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

/// The `[[group]]` table named `group` in a config document.
fn group_table<'a>(
    doc: &'a mut toml_edit::DocumentMut,
    group: &str,
) -> Result<&'a mut toml_edit::Table, String> {
    doc.get_mut("group")
        .and_then(|g| g.as_array_of_tables_mut())
        .ok_or("the file has no [[group]] tables")?
        .iter_mut()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(group))
        .ok_or_else(|| format!("the file has no [[group]] named \"{group}\""))
}

/// Appends a `[[group.node]]` for `node` to the group's table.
pub fn add_to_file(
    doc: &mut toml_edit::DocumentMut,
    group: &str,
    node: &NodeConfig,
) -> Result<(), String> {
    let g = group_table(doc, group)?;
    if g.get("node").is_none() {
        g.insert(
            "node",
            toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()),
        );
    }
    let nodes = g
        .get_mut("node")
        .and_then(|n| n.as_array_of_tables_mut())
        .ok_or("the group's nodes are not [[group.node]] tables")?;
    let mut t = toml_edit::Table::new();
    t.insert("name", toml_edit::value(node.name.as_str()));
    t.insert("host", toml_edit::value(node.host.as_str()));
    t.insert("port", toml_edit::value(node.port as i64));
    if let Some(db) = &node.dbname {
        t.insert("dbname", toml_edit::value(db.as_str()));
    }
    t.insert("user", toml_edit::value(node.user.as_str()));
    if !node.password.is_empty() {
        t.insert("password", toml_edit::value(node.password.as_str()));
    }
    if node.weight != 1 {
        t.insert("weight", toml_edit::value(node.weight as i64));
    }
    if node.priority != 0 {
        t.insert("priority", toml_edit::value(node.priority as i64));
    }
    if node.sslmode != crate::config::SslMode::default() {
        t.insert("sslmode", toml_edit::value(node.sslmode.as_str()));
    }
    if let Some(ca) = &node.sslrootcert {
        t.insert("sslrootcert", toml_edit::value(ca.as_str()));
    }
    if node.max_connections != 0 {
        t.insert(
            "max_connections",
            toml_edit::value(node.max_connections as i64),
        );
    }
    nodes.push(t);
    Ok(())
}

/// Removes the `[[group.node]]` named `node` from the group's table.
pub fn remove_from_file(
    doc: &mut toml_edit::DocumentMut,
    group: &str,
    node: &str,
) -> Result<(), String> {
    let g = group_table(doc, group)?;
    let nodes = g
        .get_mut("node")
        .and_then(|n| n.as_array_of_tables_mut())
        .ok_or("the group's nodes are not [[group.node]] tables")?;
    let before = nodes.len();
    nodes.retain(|t| t.get("name").and_then(|n| n.as_str()) != Some(node));
    if nodes.len() == before {
        return Err(format!(
            "the file's group \"{group}\" has no node \"{node}\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# the proxy
listen = "127.0.0.1:6432"

[[group]]
name = "app"   # the app's data
[[group.node]]
name = "n1"
port = 5433

[[group.node]]
name = "n2"
port = 5434

[[group]]
name = "other"
[[group.node]]
name = "o1"
"#;

    #[test]
    fn file_edits_keep_comments_and_round_trip() {
        let mut doc: toml_edit::DocumentMut = FILE.parse().unwrap();
        let node = node_options(
            "n3",
            &words("host=10.0.0.3 port=5435 password='it''s' weight=2").unwrap(),
        )
        .unwrap();
        assert_eq!(node.password, "it's");
        add_to_file(&mut doc, "app", &node).unwrap();
        remove_from_file(&mut doc, "app", "n1").unwrap();
        let text = doc.to_string();
        assert!(text.contains("# the app's data"), "{text}");
        let c = Config::parse(&text, "t.toml").unwrap();
        let names: Vec<&str> = c.groups[0].nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n2", "n3"]);
        assert_eq!(c.groups[0].nodes[1], node);
        assert_eq!(c.groups[1].nodes.len(), 1);
        assert!(remove_from_file(&mut doc, "app", "zz").is_err());
        assert!(add_to_file(&mut doc, "nope", &node).is_err());
    }

    #[test]
    fn node_options_are_checked() {
        assert!(node_options("x", &words("host=h").unwrap()).is_err());
        assert_eq!(
            node_options("x", &words("host=h port=abc").unwrap())
                .unwrap_err()
                .code,
            "22023"
        );
        assert!(node_options("x", &words("host=h port=1 colour=red").unwrap()).is_err());
        assert!(node_options("x", &words("host=h port=1 port=2").unwrap()).is_err());
        assert!(words("a 'b").is_err());
    }
}
