//! The admin console: the database `reprise` on the client port. It speaks
//! the simple query protocol and answers `SHOW GROUPS`, `SHOW NODES`,
//! `SWITCHOVER`, `RESEED` and `HELP`.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::group::failover::{self, Policy};
use crate::group::{Group, NodeState};
use crate::server::Shared;
use crate::wire::MessageStream;
use crate::wire::messages::{self, PgError, Reader};
use crate::wire::tls::{ClientRead, ClientWrite};

/// A command's answer: a table, or an error.
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
}

/// Serves the console on an authenticated connection.
pub async fn serve(
    shared: Arc<Shared>,
    reader: &mut MessageStream<ClientRead>,
    wr: &mut ClientWrite,
) {
    let mut out = BytesMut::new();
    messages::parameter_status("server_version", "15.0 (Reprise admin console)", &mut out);
    messages::parameter_status("client_encoding", "UTF8", &mut out);
    messages::parameter_status("standard_conforming_strings", "on", &mut out);
    messages::ready_for_query(b'I', &mut out);
    let mut skipping = false;
    loop {
        if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        out.clear();
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            _ => return,
        };
        match frame.tag {
            b'Q' => {
                let sql = Reader::new(frame.body()).cstr().unwrap_or("").to_string();
                for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    match run(&shared, stmt).await {
                        Ok(t) => write_table(&t, &mut out),
                        Err(e) => {
                            e.encode(&mut out);
                            break;
                        }
                    }
                }
                if sql.trim().trim_matches(';').is_empty() {
                    messages::put_message(b'I', &[], &mut out);
                }
                messages::ready_for_query(b'I', &mut out);
            }
            b'X' => return,
            _ => {
                // Like PostgreSQL after an error: one error, then everything
                // up to the Sync is skipped.
                if !skipping {
                    PgError::error(
                        "0A000",
                        "the admin console supports only simple queries (no extended protocol)",
                    )
                    .encode(&mut out);
                    skipping = true;
                }
                if frame.tag == b'S' {
                    skipping = false;
                    messages::ready_for_query(b'I', &mut out);
                }
            }
        }
    }
}

fn write_table(t: &Table, out: &mut BytesMut) {
    messages::row_description(&t.columns, out);
    for r in &t.rows {
        let vals: Vec<Option<&str>> = r.iter().map(|v| v.as_deref()).collect();
        messages::data_row(&vals, out);
    }
    messages::command_complete(&t.tag, out);
}

const COMMANDS: &str =
    "SHOW GROUPS, SHOW NODES, SWITCHOVER <group> TO <node>, RESEED <group> <node>, HELP";

/// A parsed console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowGroups,
    ShowNodes,
    Switchover { group: String, node: String },
    Reseed { group: String, node: String },
    Help,
}

/// Parses one command (keywords in any case; names as written).
pub fn parse(command: &str) -> Result<Command, PgError> {
    let original: Vec<&str> = command.split_whitespace().collect();
    let words: Vec<String> = original.iter().map(|w| w.to_ascii_uppercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let name = |i: usize| original[i].to_string();
    match words.as_slice() {
        ["SHOW", "GROUPS"] => Ok(Command::ShowGroups),
        ["SHOW", "NODES"] => Ok(Command::ShowNodes),
        ["SWITCHOVER", _, "TO", _] => Ok(Command::Switchover {
            group: name(1),
            node: name(3),
        }),
        ["RESEED", _, _] => Ok(Command::Reseed {
            group: name(1),
            node: name(2),
        }),
        ["HELP"] => Ok(Command::Help),
        _ => Err(
            PgError::error("42601", format!("unknown admin command \"{command}\""))
                .with_hint(format!("the commands are: {COMMANDS}")),
        ),
    }
}

/// Runs one console command.
pub async fn run(shared: &Shared, command: &str) -> Result<Table, PgError> {
    match parse(command)? {
        Command::ShowGroups => Ok(show_groups(shared)),
        Command::ShowNodes => Ok(show_nodes(shared)),
        Command::Switchover { group, node } => switchover(shared, &group, &node).await,
        Command::Reseed { group, node } => reseed(shared, &group, &node).await,
        Command::Help => Ok(Table {
            columns: vec!["command"],
            rows: COMMANDS
                .split(", ")
                .map(|c| vec![Some(c.to_string())])
                .collect(),
            tag: "HELP".into(),
        }),
    }
}

fn show_groups(shared: &Shared) -> Table {
    let rows: Vec<_> = shared
        .groups()
        .iter()
        .map(|g| {
            let s = g.status();
            let up = s.nodes.iter().filter(|n| n.state.as_str() == "up").count();
            vec![
                Some(s.name),
                Some(s.term.to_string()),
                Some(s.primary),
                Some(s.nodes.len().to_string()),
                Some(up.to_string()),
            ]
        })
        .collect();
    Table {
        tag: format!("SHOW {}", rows.len()),
        columns: vec!["group", "term", "primary", "nodes", "nodes_up"],
        rows,
    }
}

fn show_nodes(shared: &Shared) -> Table {
    let mut rows = Vec::new();
    for g in shared.groups() {
        for n in g.status().nodes {
            rows.push(vec![
                Some(g.name.clone()),
                Some(n.name),
                Some(n.role.as_str().to_string()),
                Some(n.state.as_str().to_string()),
                Some(n.applied_seq.to_string()),
                Some(n.lag_seq.to_string()),
                Some(n.lag_ms.to_string()),
                Some(n.host),
                Some(n.port.to_string()),
                Some(n.weight.to_string()),
                Some(n.outstanding.to_string()),
                n.divergence,
            ]);
        }
    }
    Table {
        tag: format!("SHOW {}", rows.len()),
        columns: vec![
            "group",
            "node",
            "role",
            "state",
            "applied_seq",
            "lag_seq",
            "lag_ms",
            "host",
            "port",
            "weight",
            "in_flight",
            "divergence",
        ],
        rows,
    }
}

/// The group and node index a command names.
fn find(shared: &Shared, group: &str, node: &str) -> Result<(Arc<Group>, usize), PgError> {
    let g = shared.group(group).ok_or_else(|| {
        PgError::error("42704", format!("no group \"{group}\"")).with_hint(format!(
            "the groups are: {}",
            shared.group_names().join(", ")
        ))
    })?;
    let i = g.node_index(node).ok_or_else(|| {
        let names: Vec<&str> = g.nodes.iter().map(|n| n.name.as_str()).collect();
        PgError::error("42704", format!("no node \"{node}\" in group \"{group}\""))
            .with_hint(format!("its nodes are: {}", names.join(", ")))
    })?;
    Ok((g, i))
}

async fn switchover(shared: &Shared, group: &str, node: &str) -> Result<Table, PgError> {
    let (g, i) = find(shared, group, node)?;
    let policy = Policy::from_config(shared.config());
    // In a task of its own: a console client that goes away must not leave
    // writes held halfway.
    let task = {
        let g = g.clone();
        tokio::spawn(async move { failover::switchover(&g, i, &policy).await })
    };
    let done = task
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|e| PgError::error("55000", format!("switchover refused or failed: {e}")))?;
    Ok(Table {
        columns: vec![
            "group",
            "old_primary",
            "new_primary",
            "term",
            "write_pause_ms",
        ],
        rows: vec![vec![
            Some(g.name.clone()),
            Some(done.old),
            Some(done.new),
            Some(done.term.to_string()),
            Some(done.pause.as_millis().to_string()),
        ]],
        tag: "SWITCHOVER".into(),
    })
}

async fn reseed(shared: &Shared, group: &str, node: &str) -> Result<Table, PgError> {
    let (g, i) = find(shared, group, node)?;
    let policy = Policy::from_config(shared.config());
    if g.nodes[i].state() == NodeState::Seeding {
        return Err(PgError::error(
            "55000",
            format!("{node} is already being seeded"),
        ));
    }
    let task = {
        let g = g.clone();
        tokio::spawn(async move { failover::reseed(&g, i, &policy).await })
    };
    let done = task
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|e| PgError::error("55000", format!("re-seeding {node} failed: {e}")))?;
    Ok(Table {
        columns: vec!["group", "node", "seq", "bytes", "duration_ms"],
        rows: vec![vec![
            Some(g.name.clone()),
            Some(node.to_string()),
            Some(done.seq.to_string()),
            Some(done.bytes.to_string()),
            Some(done.duration.as_millis().to_string()),
        ]],
        tag: "RESEED".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_in_any_case_and_refuses_others() {
        assert_eq!(parse("show nodes").unwrap(), Command::ShowNodes);
        assert_eq!(
            parse("switchover app TO n2").unwrap(),
            Command::Switchover {
                group: "app".into(),
                node: "n2".into()
            }
        );
        assert_eq!(
            parse(" RESEED App N1 ").unwrap(),
            Command::Reseed {
                group: "App".into(),
                node: "N1".into()
            }
        );
        let e = parse("DROP NODE x").unwrap_err();
        assert_eq!(e.code, "42601");
        assert!(parse("").is_err());
        assert!(parse("SWITCHOVER app n2").is_err());
    }
}
