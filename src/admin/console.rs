//! The admin console: the database `reprise` on the client port. It speaks
//! the simple query protocol. SHOW commands are open to every user who may
//! log in; commands that act need an admin user. `HELP` lists them.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::membership;
use crate::group::NodeState;
use crate::group::failover::{self, Policy};
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
    user: &str,
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
                    match run(&shared, user, stmt).await {
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

/// Every command, as HELP lists them.
const COMMANDS: &[&str] = &[
    "SHOW GROUPS",
    "SHOW NODES",
    "SHOW CLIENTS",
    "SHOW LOG <group> [n]",
    "SHOW CONFIG",
    "SHOW STATS",
    "SWITCHOVER <group> TO <node>",
    "RESEED <group> <node>",
    "ADD NODE <group> <node> host=… port=… [dbname=… user=… password=… weight=… priority=… max_connections=… sslmode=… sslrootcert=…]",
    "REMOVE NODE <group> <node>",
    "MOVE NODE <node> TO <group>",
    "VERIFY <group>",
    "PAUSE <group>",
    "RESUME <group>",
    "RELOAD",
    "HELP",
];

/// A parsed console command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    ShowGroups,
    ShowNodes,
    ShowStats,
    ShowClients,
    ShowLog {
        group: String,
        count: i64,
    },
    ShowConfig,
    Switchover {
        group: String,
        node: String,
    },
    Reseed {
        group: String,
        node: String,
    },
    AddNode {
        group: String,
        node: crate::config::NodeConfig,
    },
    RemoveNode {
        group: String,
        node: String,
    },
    MoveNode {
        node: String,
        group: String,
    },
    Verify {
        group: String,
    },
    Pause {
        group: String,
    },
    Resume {
        group: String,
    },
    Reload,
    Help,
}

impl Command {
    /// Whether the command changes something (admin users only).
    pub fn acts(&self) -> bool {
        !matches!(
            self,
            Command::ShowGroups
                | Command::ShowNodes
                | Command::ShowStats
                | Command::ShowClients
                | Command::ShowLog { .. }
                | Command::ShowConfig
                | Command::Help
        )
    }
}

/// Parses one command (keywords in any case; names as written).
pub fn parse(command: &str) -> Result<Command, PgError> {
    let original = membership::words(command)?;
    let words: Vec<String> = original.iter().map(|w| w.to_ascii_uppercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let name = |i: usize| original[i].to_string();
    match words.as_slice() {
        ["SHOW", "GROUPS"] => Ok(Command::ShowGroups),
        ["SHOW", "NODES"] => Ok(Command::ShowNodes),
        ["SHOW", "STATS"] => Ok(Command::ShowStats),
        ["SHOW", "CLIENTS"] => Ok(Command::ShowClients),
        ["SHOW", "CONFIG"] => Ok(Command::ShowConfig),
        ["SHOW", "LOG", _] => Ok(Command::ShowLog {
            group: name(2),
            count: 20,
        }),
        ["SHOW", "LOG", _, n] => Ok(Command::ShowLog {
            group: name(2),
            count: n
                .parse()
                .ok()
                .filter(|n| (1..=10_000).contains(n))
                .ok_or_else(|| {
                    PgError::error(
                        "22023",
                        format!("SHOW LOG: \"{n}\" is not a count from 1 to 10000"),
                    )
                })?,
        }),
        ["SWITCHOVER", _, "TO", _] => Ok(Command::Switchover {
            group: name(1),
            node: name(3),
        }),
        ["RESEED", _, _] => Ok(Command::Reseed {
            group: name(1),
            node: name(2),
        }),
        ["ADD", "NODE", _, _, ..] => Ok(Command::AddNode {
            group: name(2),
            node: membership::node_options(&original[3], &original[4..])?,
        }),
        ["REMOVE", "NODE", _, _] => Ok(Command::RemoveNode {
            group: name(2),
            node: name(3),
        }),
        ["MOVE", "NODE", _, "TO", _] => Ok(Command::MoveNode {
            node: name(2),
            group: name(4),
        }),
        ["VERIFY", _] => Ok(Command::Verify { group: name(1) }),
        ["PAUSE", _] => Ok(Command::Pause { group: name(1) }),
        ["RESUME", _] => Ok(Command::Resume { group: name(1) }),
        ["RELOAD"] => Ok(Command::Reload),
        ["HELP"] => Ok(Command::Help),
        _ => Err(
            PgError::error("42601", format!("unknown admin command \"{command}\""))
                .with_hint(format!("the commands are: {}", COMMANDS.join("; "))),
        ),
    }
}

/// Whether `user` may run commands that act (SHOW commands are open to
/// every user who may log in). Under trust, when no user is marked
/// admin, everyone is.
pub fn is_admin(config: &crate::config::Config, user: &str) -> bool {
    let listed = config.auth.users.iter().find(|u| u.name == user);
    match config.auth.method {
        crate::config::AuthMethod::Trust => {
            listed.is_some_and(|u| u.admin) || !config.auth.users.iter().any(|u| u.admin)
        }
        crate::config::AuthMethod::ScramSha256 => listed.is_some_and(|u| u.admin),
    }
}

/// Runs one console command for `user`.
pub async fn run(shared: &Arc<Shared>, user: &str, command: &str) -> Result<Table, PgError> {
    let cmd = parse(command)?;
    if cmd.acts() && !is_admin(&shared.config(), user) {
        return Err(PgError::error(
            "42501",
            format!(
                "permission denied: \"{}\" needs an admin user, and \"{user}\" is not one",
                command
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
        .with_hint("set admin = true on the user's [[auth.user]] entry"));
    }
    match cmd {
        Command::ShowGroups => Ok(show_groups(shared)),
        Command::ShowNodes => Ok(show_nodes(shared)),
        Command::ShowClients => Ok(show_clients(shared)),
        Command::ShowConfig => Ok(show_config(shared)),
        Command::ShowLog { group, count } => show_log(shared, &group, count).await,
        Command::ShowStats => Ok(super::stats::show_stats(shared)),
        Command::Switchover { group, node } => switchover(shared, &group, &node).await,
        Command::Reseed { group, node } => reseed(shared, &group, &node).await,
        Command::AddNode { group, node } => {
            let shared = shared.clone();
            let done =
                tokio::spawn(async move { membership::add_node(&shared, &group, node).await })
                    .await
                    .map_err(|e| PgError::error("XX000", e.to_string()))??;
            Ok(added(done, "ADD NODE"))
        }
        Command::RemoveNode { group, node } => {
            let unsaved = {
                let shared = shared.clone();
                let (group, node) = (group.clone(), node.clone());
                tokio::spawn(async move { membership::remove_node(&shared, &group, &node).await })
                    .await
                    .map_err(|e| PgError::error("XX000", e.to_string()))??
            };
            Ok(Table {
                columns: vec!["group", "node", "saved"],
                rows: vec![vec![
                    Some(group),
                    Some(node),
                    Some(unsaved.unwrap_or_else(|| "yes".into())),
                ]],
                tag: "REMOVE NODE".into(),
            })
        }
        Command::MoveNode { node, group } => {
            let shared = shared.clone();
            let done =
                tokio::spawn(async move { membership::move_node(&shared, &node, &group).await })
                    .await
                    .map_err(|e| PgError::error("XX000", e.to_string()))??;
            Ok(added(done, "MOVE NODE"))
        }
        Command::Verify { group } => verify(shared, &group).await,
        Command::Pause { group } => pause(shared, &group, true).await,
        Command::Resume { group } => pause(shared, &group, false).await,
        Command::Reload => {
            let shared = shared.clone();
            let done = tokio::spawn(async move { super::reload::reload(&shared).await })
                .await
                .map_err(|e| PgError::error("XX000", e.to_string()))??;
            Ok(Table {
                columns: vec!["change"],
                rows: done.into_iter().map(|c| vec![Some(c)]).collect(),
                tag: "RELOAD".into(),
            })
        }
        Command::Help => Ok(Table {
            columns: vec!["command"],
            rows: COMMANDS.iter().map(|c| vec![Some(c.to_string())]).collect(),
            tag: "HELP".into(),
        }),
    }
}

fn added(done: membership::Added, tag: &str) -> Table {
    Table {
        columns: vec!["group", "node", "seq", "bytes", "duration_ms", "saved"],
        rows: vec![vec![
            Some(done.group),
            Some(done.node),
            Some(done.seq.to_string()),
            Some(done.bytes.to_string()),
            Some(done.duration.as_millis().to_string()),
            Some(done.unsaved.unwrap_or_else(|| "yes".into())),
        ]],
        tag: tag.into(),
    }
}

fn ms_text(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

fn show_clients(shared: &Shared) -> Table {
    let rows: Vec<_> = shared
        .cancel
        .clients()
        .into_iter()
        .filter_map(|(pid, slot)| {
            let info = slot.info.get()?;
            let (state, since) = slot.state();
            Some(vec![
                Some(pid.to_string()),
                Some(info.group.clone()),
                Some(info.user.clone()),
                Some(info.addr.clone()),
                Some(info.application_name.clone()),
                Some(state.as_str().to_string()),
                Some(ms_text(since.max(info.connected_ms))),
                Some(ms_text(info.connected_ms)),
                slot.get()
                    .map(|t| format!("{}:{} pid {}", t.host, t.port, t.pid)),
            ])
        })
        .collect();
    Table {
        tag: format!("SHOW {}", rows.len()),
        columns: vec![
            "pid",
            "group",
            "user",
            "addr",
            "application_name",
            "state",
            "state_since",
            "connected_at",
            "backend",
        ],
        rows,
    }
}

fn show_config(shared: &Shared) -> Table {
    let mut config = crate::config::Config::clone(&shared.config());
    for u in &mut config.auth.users {
        if !u.password.is_empty() {
            u.password = "********".into();
        }
    }
    for g in &mut config.groups {
        for n in &mut g.nodes {
            if !n.password.is_empty() {
                n.password = "********".into();
            }
        }
    }
    let mut rows = Vec::new();
    let value = toml::Value::try_from(&config).unwrap_or(toml::Value::Table(Default::default()));
    flatten("", &value, &mut rows);
    if let Some(p) = &config.source {
        rows.insert(
            0,
            vec![Some("(file)".into()), Some(p.display().to_string())],
        );
    }
    Table {
        tag: format!("SHOW {}", rows.len()),
        columns: vec!["key", "value"],
        rows,
    }
}

/// `key = value` rows of a config tree, arrays of tables by index.
fn flatten(prefix: &str, v: &toml::Value, rows: &mut Vec<Vec<Option<String>>>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                flatten(&key(k), v, rows);
            }
        }
        toml::Value::Array(a) if a.iter().all(|x| x.is_table()) && !a.is_empty() => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), x, rows);
            }
        }
        toml::Value::String(s) => rows.push(vec![Some(prefix.to_string()), Some(s.clone())]),
        other => rows.push(vec![Some(prefix.to_string()), Some(other.to_string())]),
    }
}

async fn show_log(shared: &Shared, group: &str, count: i64) -> Result<Table, PgError> {
    let g = membership::named_group(shared, group)?;
    let primary = g.node(g.primary());
    let client = primary.control.get(&primary.target).await.map_err(|e| {
        PgError::error(
            "08006",
            format!("cannot reach the primary {}: {e}", primary.name),
        )
    })?;
    let rows = client
        .query(
            "SELECT seq, term, committed_at::text, length(payload), hash, payload \
             FROM reprise.log ORDER BY seq DESC LIMIT $1",
            &[&count],
        )
        .await
        .map_err(|e| PgError::error("XX000", format!("reading the log: {e}")))?;
    let rows = rows
        .iter()
        .map(|r| {
            let payload: Vec<u8> = r.get(5);
            vec![
                Some(r.get::<_, i64>(0).to_string()),
                Some(r.get::<_, i64>(1).to_string()),
                Some(r.get::<_, String>(2)),
                Some(r.get::<_, i32>(3).to_string()),
                Some(r.get::<_, String>(4)),
                Some(entry_summary(&payload)),
            ]
        })
        .collect::<Vec<_>>();
    Ok(Table {
        tag: format!("SHOW {}", rows.len()),
        columns: vec!["seq", "term", "committed_at", "bytes", "hash", "statements"],
        rows,
    })
}

/// The command tags of an entry and the start of its first statement.
fn entry_summary(payload: &[u8]) -> String {
    match crate::replication::Entry::decode(payload) {
        Ok(e) => {
            let mut s = e.header.tags.join(", ");
            if let Some(sql) = first_statement(&e.messages) {
                let sql: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
                let short: String = sql.chars().take(80).collect();
                s.push_str(&format!(": {short}"));
                if sql.chars().count() > 80 {
                    s.push('…');
                }
            }
            s
        }
        Err(e) => format!("(undecodable: {e})"),
    }
}

/// The SQL of the first Query or Parse message.
fn first_statement(messages: &[u8]) -> Option<String> {
    let mut at = 0;
    while at + 5 <= messages.len() {
        let tag = messages[at];
        let len = u32::from_be_bytes(messages[at + 1..at + 5].try_into().ok()?) as usize;
        let body = messages.get(at + 5..at + 1 + len)?;
        match tag {
            b'Q' => return Reader::new(body).cstr().map(str::to_string),
            b'P' => {
                let mut r = Reader::new(body);
                r.cstr()?;
                return r.cstr().map(str::to_string);
            }
            _ => at += 1 + len.max(4),
        }
    }
    None
}

async fn verify(shared: &Shared, group: &str) -> Result<Table, PgError> {
    let g = membership::named_group(shared, group)?;
    let report = tokio::spawn(async move {
        crate::replication::verify::verify(&g, crate::replication::verify::WAIT).await
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(|e| PgError::error("55000", format!("VERIFY could not run: {e}")))?;
    let rows = report
        .checks
        .iter()
        .map(|c| {
            vec![
                Some(report.group.clone()),
                Some(report.seq.to_string()),
                Some(c.table.clone()),
                Some(c.node.clone()),
                c.rows.map(|r| r.to_string()),
                c.checksum.clone(),
                Some(c.result.clone()),
            ]
        })
        .collect::<Vec<_>>();
    Ok(Table {
        tag: format!("VERIFY {}", rows.len()),
        columns: vec![
            "group", "seq", "table", "node", "rows", "checksum", "result",
        ],
        rows,
    })
}

/// PAUSE holds new work on the primary (until RESUME) and waits up to
/// the failover wait for work in flight to finish.
async fn pause(shared: &Shared, group: &str, on: bool) -> Result<Table, PgError> {
    let g = membership::named_group(shared, group)?;
    g.admin_pause(on);
    let mut in_flight = g.inside();
    if on {
        let limit = shared.config().health.failover_wait_ms;
        let _ = tokio::time::timeout(std::time::Duration::from_millis(limit), async {
            loop {
                let drained = g.drained.notified();
                if g.inside() == 0 {
                    break;
                }
                drained.await;
            }
        })
        .await;
        in_flight = g.inside();
    }
    Ok(Table {
        columns: vec!["group", "paused", "in_flight"],
        rows: vec![vec![
            Some(g.name.clone()),
            Some(on.to_string()),
            Some(in_flight.to_string()),
        ]],
        tag: if on { "PAUSE" } else { "RESUME" }.into(),
    })
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

async fn switchover(shared: &Shared, group: &str, node: &str) -> Result<Table, PgError> {
    let (g, i) = membership::find(shared, group, node)?;
    let policy = Policy::from_config(&shared.config());
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
    let (g, i) = membership::find(shared, group, node)?;
    let policy = Policy::from_config(&shared.config());
    if g.node(i).state() == NodeState::Seeding {
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
        assert_eq!(parse("SHOW stats").unwrap(), Command::ShowStats);
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
