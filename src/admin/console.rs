//! The admin console: the database `reprise` on the client port. It speaks
//! the simple query protocol and answers `SHOW GROUPS`, `SHOW NODES` and
//! `HELP`.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::server::Shared;
use crate::wire::MessageStream;
use crate::wire::messages::{self, PgError, Reader};

/// A command's answer: a table, or an error.
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
}

/// Serves the console on an authenticated connection.
pub async fn serve(
    shared: Arc<Shared>,
    reader: &mut MessageStream<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
) {
    let mut out = BytesMut::new();
    messages::parameter_status("server_version", "15.0 (Reprise admin console)", &mut out);
    messages::parameter_status("client_encoding", "UTF8", &mut out);
    messages::parameter_status("standard_conforming_strings", "on", &mut out);
    messages::ready_for_query(b'I', &mut out);
    loop {
        if wr.write_all(&out).await.is_err() {
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
                    match run(&shared, stmt) {
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
                PgError::error(
                    "0A000",
                    "the admin console supports only simple queries (no extended protocol)",
                )
                .encode(&mut out);
                if frame.tag == b'S' {
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

const COMMANDS: &str = "SHOW GROUPS, SHOW NODES, HELP";

/// Runs one console command.
pub fn run(shared: &Shared, command: &str) -> Result<Table, PgError> {
    let words: Vec<String> = command
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["SHOW", "GROUPS"] => Ok(show_groups(shared)),
        ["SHOW", "NODES"] => Ok(show_nodes(shared)),
        ["HELP"] => Ok(Table {
            columns: vec!["command"],
            rows: COMMANDS
                .split(", ")
                .map(|c| vec![Some(c.to_string())])
                .collect(),
            tag: "HELP".into(),
        }),
        _ => Err(
            PgError::error("42601", format!("unknown admin command \"{command}\""))
                .with_hint(format!("the commands are: {COMMANDS}")),
        ),
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
                Some(n.host),
                Some(n.port.to_string()),
                Some(n.weight.to_string()),
                Some(n.outstanding.to_string()),
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
            "host",
            "port",
            "weight",
            "in_flight",
        ],
        rows,
    }
}
