//! Operating live groups: several groups in one proxy, membership changes
//! under write load checked by VERIFY, RELOAD (and SIGHUP), the admin
//! console's other commands, and the client and connection limits.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use reprise::config::{Config, GroupConfig};
use reprise::local::LocalCluster;

const TEST_LIMIT: Duration = Duration::from_secs(300);

/// `n` identical local copies (database `app` seeded with SEED_SQL).
async fn copies(n: usize) -> (tempfile::TempDir, LocalCluster) {
    let dir = tempfile::Builder::new()
        .prefix("reprise-ops")
        .tempdir()
        .unwrap();
    let path = dir.path().to_path_buf();
    let cluster = tokio::task::spawn_blocking(move || {
        let settings: Vec<(&str, &str)> = TEST_SETTINGS.to_vec();
        LocalCluster::create(&path, n, "app", &settings, |node| {
            node.psql("app", SEED_SQL)?;
            Ok(())
        })
    })
    .await
    .unwrap()
    .expect("local copies start");
    (dir, cluster)
}

/// The harness config with the cluster's nodes split into groups:
/// `layout` lists (group, node indexes).
fn grouped(cluster: &LocalCluster, layout: &[(&str, &[usize])]) -> Config {
    let mut config = test_config(cluster);
    let all = config.groups.remove(0);
    for (name, nodes) in layout {
        config.groups.push(GroupConfig {
            name: name.to_string(),
            nodes: nodes.iter().map(|&i| all.nodes[i].clone()).collect(),
            max_client_connections: 0,
        });
    }
    config
}

/// Writes `config` to `dir/reprise.toml` and loads it back, so the proxy
/// knows its file (RELOAD, membership changes written back).
fn to_file(config: &Config, dir: &Path) -> (PathBuf, Config) {
    let path = dir.join("reprise.toml");
    std::fs::write(&path, toml::to_string_pretty(config).unwrap()).unwrap();
    let loaded = Config::load(&path).expect("the written config loads");
    (path, loaded)
}

fn group_of<'a>(status: &'a serde_json::Value, group: &str) -> &'a serde_json::Value {
    status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == group)
        .unwrap_or_else(|| panic!("no group {group} in {status:#}"))
}

fn members(status: &serde_json::Value, group: &str) -> Vec<String> {
    group_of(status, group)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

fn state_in(status: &serde_json::Value, group: &str, node: &str) -> String {
    group_of(status, group)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".into())
}

/// Waits until every member of `group` is up and has applied its head.
async fn wait_group_caught_up(proxy: &Proxy, group: &str, limit: Duration) {
    let done = wait_until(limit, || async {
        let s = proxy.status().await;
        let g = group_of(&s, group);
        let head = g["head_seq"].as_u64().unwrap();
        g["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "up" && n["applied_seq"].as_u64() == Some(head))
    })
    .await;
    assert!(
        done.is_some(),
        "group {group} did not catch up: {:#}",
        proxy.status().await
    );
}

/// The `ADD NODE` options of a local node (reached over its socket).
fn node_options(cluster: &LocalCluster, i: usize) -> String {
    let n = &cluster.nodes[i];
    format!(
        "host={} port={} dbname=app user=postgres",
        n.socket_dir().display(),
        n.port()
    )
}

/// VERIFY rows as (table, node, result).
async fn verify(proxy: &Proxy, group: &str) -> Vec<(String, String, String)> {
    let rows = admin_named(proxy, &format!("VERIFY {group}"))
        .await
        .unwrap_or_else(|e| panic!("VERIFY {group}: {e}"));
    rows.iter()
        .map(|r| {
            (
                column(r, "table").to_string(),
                column(r, "node").to_string(),
                column(r, "result").to_string(),
            )
        })
        .collect()
}

fn assert_all_match(rows: &[(String, String, String)], nodes: &[&str]) {
    for want in ["public.items", "public.notes"] {
        for n in nodes {
            assert!(
                rows.iter().any(|(t, m, _)| t == want && m == n),
                "VERIFY has no row for {want} on {n}: {rows:?}"
            );
        }
    }
    for (t, n, r) in rows {
        assert_eq!(r, "match", "{t} on {n}: {rows:?}");
        assert!(nodes.contains(&n.as_str()), "{n} is not a member: {rows:?}");
    }
}

/// An admin command's SQLSTATE and message when it fails.
async fn admin_error(proxy: &Proxy, user: &str, sql: &str) -> Option<(String, String)> {
    let url = format!("postgres://{user}@{}/reprise", proxy.addr);
    let c = connect(&url).await;
    match c.simple_query(sql).await {
        Ok(_) => None,
        Err(e) => Some((sqlstate(&e), db_text(&e))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_in_one_group_leaves_the_other_untouched() {
    bounded(TEST_LIMIT, async {
        let (_dir, mut cluster) = copies(4).await;
        let config = grouped(&cluster, &[("app", &[0, 1]), ("other", &[2, 3])]);
        let proxy = Proxy::start(config).await;
        let before = proxy.status().await;
        let other_term = group_of(&before, "other")["term"].as_u64().unwrap();
        let app_writers = Writers::start(&proxy.url("app"), "a", 2).await;
        let other_writers = Writers::start(&proxy.url("other"), "o", 3).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let killed = Instant::now();
        tokio::task::block_in_place(|| cluster.nodes[0].kill()).expect("kill n1");
        let moved = wait_until(Duration::from_secs(20), || async {
            group_of(&proxy.status().await, "app")["primary"] == "n2"
        })
        .await;
        assert!(
            moved.is_some(),
            "app did not fail over: {:#}",
            proxy.status().await
        );
        assert!(
            app_writers
                .wait_all_acked_since(Instant::now(), Duration::from_secs(20))
                .await,
            "app's writers did not write again"
        );
        // The other group's writers went on the whole time.
        assert!(
            other_writers
                .wait_all_acked_since(killed + Duration::from_millis(500), Duration::from_secs(10))
                .await
        );
        let after = proxy.status().await;
        let app_logs = app_writers.stop().await;
        let other_logs = other_writers.stop().await;
        assert_writers_kept_connections(&app_logs);
        assert_writers_kept_connections(&other_logs);
        let errors: usize = other_logs.iter().map(|l| l.errors.len()).sum();
        assert_eq!(
            errors,
            0,
            "the other group's clients saw errors:\n{}",
            describe_errors(&other_logs)
        );
        let other = group_of(&after, "other");
        assert_eq!(other["term"].as_u64().unwrap(), other_term);
        assert_eq!(other["primary"], "n3");
        for n in ["n3", "n4"] {
            assert_eq!(state_in(&after, "other", n), "up");
        }
        // Every acknowledged commit of the other group is on both its copies.
        let acked = all_acked(&other_logs);
        assert!(!acked.is_empty());
        wait_group_caught_up(&proxy, "other", Duration::from_secs(30)).await;
        for i in [2, 3] {
            assert_present_once_at(&cluster.nodes[i], &acked).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_remove_and_move_under_load_end_verified_and_survive_a_restart() {
    bounded(TEST_LIMIT, async {
        let (dir, cluster) = copies(4).await;
        // app: n1, n2; other: n4; n3 is spare.
        let config = grouped(&cluster, &[("app", &[0, 1]), ("other", &[3])]);
        let (path, config) = to_file(&config, dir.path());
        let mut proxy = Proxy::start(config).await;
        let app_writers = Writers::start(&proxy.url("app"), "a", 3).await;
        let other_writers = Writers::start(&proxy.url("other"), "o", 2).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let rows = admin_named(
            &proxy,
            &format!("ADD NODE app n3 {}", node_options(&cluster, 2)),
        )
        .await
        .expect("ADD NODE");
        eprintln!("ADD NODE: {rows:?}");
        assert_eq!(column(&rows[0], "saved"), "yes");
        let up = wait_until(Duration::from_secs(60), || async {
            state_in(&proxy.status().await, "app", "n3") == "up"
        })
        .await;
        assert!(
            up.is_some(),
            "n3 did not come up: {:#}",
            proxy.status().await
        );
        // A duplicate is refused.
        let e = admin(
            &proxy,
            &format!("ADD NODE app n3 {}", node_options(&cluster, 2)),
        )
        .await
        .unwrap_err();
        assert!(e.contains("already has"), "{e}");

        let rows = admin_named(&proxy, "MOVE NODE n2 TO other")
            .await
            .expect("MOVE NODE");
        eprintln!("MOVE NODE: {rows:?}");
        let up = wait_until(Duration::from_secs(60), || async {
            state_in(&proxy.status().await, "other", "n2") == "up"
        })
        .await;
        assert!(
            up.is_some(),
            "n2 did not join other: {:#}",
            proxy.status().await
        );

        // The primary cannot be removed.
        let e = admin(&proxy, "REMOVE NODE other n4").await.unwrap_err();
        assert!(e.contains("primary") && e.contains("SWITCHOVER"), "{e}");

        // VERIFY under load: every table matches on every member.
        assert_all_match(&verify(&proxy, "app").await, &["n1", "n3"]);
        assert_all_match(&verify(&proxy, "other").await, &["n4", "n2"]);

        admin(&proxy, "REMOVE NODE app n3")
            .await
            .expect("REMOVE NODE");
        let s = proxy.status().await;
        assert_eq!(members(&s, "app"), ["n1"]);
        assert_eq!(members(&s, "other"), ["n4", "n2"]);

        let app_logs = app_writers.stop().await;
        let other_logs = other_writers.stop().await;
        for logs in [&app_logs, &other_logs] {
            assert_writers_kept_connections(logs);
            let errors: usize = logs.iter().map(|l| l.errors.len()).sum();
            assert_eq!(errors, 0, "writers saw errors:\n{}", describe_errors(logs));
        }
        wait_group_caught_up(&proxy, "other", Duration::from_secs(30)).await;
        let acked = all_acked(&other_logs);
        for i in [3, 1] {
            assert_present_once_at(&cluster.nodes[i], &acked).await;
        }
        assert_all_match(&verify(&proxy, "other").await, &["n4", "n2"]);

        // A row changed behind the proxy on n2 is reported for exactly that
        // table and node.
        let n2 = connect(&cluster.nodes[1].url("app")).await;
        n2.execute("UPDATE items SET name = 'tampered' WHERE id = 7", &[])
            .await
            .unwrap();
        let rows = verify(&proxy, "other").await;
        let bad: Vec<_> = rows.iter().filter(|(_, _, r)| r != "match").collect();
        assert_eq!(
            bad,
            [&(
                "public.items".to_string(),
                "n2".to_string(),
                "MISMATCH".to_string()
            )],
            "{rows:?}"
        );
        let s = proxy.status().await;
        assert_eq!(group_of(&s, "other")["verify"]["mismatches"], 1, "{s:#}");
        let metrics = proxy.http_get("/metrics").await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("reprise_verify_mismatched_tables")
                    && l.contains("node=\"n2\"")
                    && l.ends_with(" 1")),
            "{metrics}"
        );

        // The changes are in the file, and a restarted proxy has them.
        let saved = Config::load(&path).unwrap();
        let names = |g: &str| -> Vec<String> {
            saved
                .groups
                .iter()
                .find(|x| x.name == g)
                .unwrap()
                .nodes
                .iter()
                .map(|n| n.name.clone())
                .collect()
        };
        assert_eq!(names("app"), ["n1"]);
        assert_eq!(names("other"), ["n4", "n2"]);
        proxy.stop().await;
        let proxy = Proxy::start(saved).await;
        let s = proxy.status().await;
        assert_eq!(members(&s, "app"), ["n1"]);
        assert_eq!(members(&s, "other"), ["n4", "n2"]);
        wait_group_caught_up(&proxy, "other", Duration::from_secs(30)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_refuses_a_broken_config_and_applies_a_valid_change() {
    bounded(TEST_LIMIT, async {
        let (dir, cluster) = copies(5).await;
        let config = grouped(&cluster, &[("app", &[0, 1]), ("other", &[2])]);
        let (path, config) = to_file(&config, dir.path());
        let good = std::fs::read_to_string(&path).unwrap();
        let proxy = Proxy::start(config).await;
        // A session of the other group in an open transaction, and one of
        // the changed group.
        let other = connect(&proxy.url("other")).await;
        other
            .batch_execute("BEGIN; INSERT INTO notes (body) VALUES ('before reload')")
            .await
            .unwrap();
        let app = connect(&proxy.url("app")).await;
        app.execute("INSERT INTO notes (body) VALUES ('app before')", &[])
            .await
            .unwrap();
        let layout = || async {
            admin_named(&proxy, "SHOW NODES")
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    ["group", "node", "role", "weight"]
                        .map(|c| column(r, c).to_string())
                        .join(" ")
                })
                .collect::<Vec<_>>()
        };
        let before = layout().await;

        std::fs::write(&path, format!("{good}\nbogus_key = 1\n")).unwrap();
        let (code, text) = admin_error(&proxy, "postgres", "RELOAD")
            .await
            .expect("refused");
        assert_eq!(code, "F0000", "{text}");
        assert!(text.contains("bogus_key"), "says why: {text}");
        assert_eq!(layout().await, before);

        // A valid change: a new weight for n2, a new node n4 in app.
        let mut changed: toml::Table = toml::from_str(&good).unwrap();
        let groups = changed.get_mut("group").unwrap().as_array_mut().unwrap();
        let app_group = groups
            .iter_mut()
            .find(|g| g["name"].as_str() == Some("app"))
            .unwrap();
        let nodes = app_group.get_mut("node").unwrap().as_array_mut().unwrap();
        nodes[1]
            .as_table_mut()
            .unwrap()
            .insert("weight".into(), toml::Value::Integer(3));
        let mut n4 = nodes[1].as_table().unwrap().clone();
        n4.insert("name".into(), "n4".into());
        n4.insert(
            "port".into(),
            toml::Value::Integer(cluster.nodes[3].port() as i64),
        );
        n4.insert(
            "host".into(),
            cluster.nodes[3].socket_dir().display().to_string().into(),
        );
        n4.insert("weight".into(), toml::Value::Integer(1));
        nodes.push(toml::Value::Table(n4.clone()));
        // And a new group, "third", on n5.
        let mut n5 = n4;
        n5.insert("name".into(), "n5".into());
        n5.insert(
            "port".into(),
            toml::Value::Integer(cluster.nodes[4].port() as i64),
        );
        n5.insert(
            "host".into(),
            cluster.nodes[4].socket_dir().display().to_string().into(),
        );
        let mut third = toml::Table::new();
        third.insert("name".into(), "third".into());
        third.insert(
            "node".into(),
            toml::Value::Array(vec![toml::Value::Table(n5)]),
        );
        groups.push(toml::Value::Table(third));
        std::fs::write(&path, toml::to_string(&changed).unwrap()).unwrap();
        let rows = admin(&proxy, "RELOAD").await.expect("RELOAD");
        eprintln!("RELOAD: {rows:?}");
        let text = format!("{rows:?}");
        assert!(text.contains("app.n2: weight 3"), "{text}");
        assert!(text.contains("app.n4 added"), "{text}");
        let s = proxy.status().await;
        assert_eq!(members(&s, "app"), ["n1", "n2", "n4"]);
        let weight = group_of(&s, "app")["nodes"][1]["weight"].as_u64();
        assert_eq!(weight, Some(3));
        assert!(text.contains("group third added"), "{text}");
        let third = connect(&proxy.url("third")).await;
        third
            .execute("INSERT INTO notes (body) VALUES ('third')", &[])
            .await
            .expect("the new group serves");
        // The sessions went on: the other group's transaction commits.
        other
            .batch_execute("INSERT INTO notes (body) VALUES ('after reload')")
            .await
            .expect("the other group's session survived");
        other.batch_execute("COMMIT").await.expect("it commits");
        app.execute("INSERT INTO notes (body) VALUES ('app after')", &[])
            .await
            .expect("the changed group's session survived");
        wait_group_caught_up(&proxy, "app", Duration::from_secs(60)).await;
        assert_all_match(&verify(&proxy, "app").await, &["n1", "n2", "n4"]);

        // SIGHUP does the same: weight back to 1, and the group "other" goes.
        let groups = changed.get_mut("group").unwrap().as_array_mut().unwrap();
        groups.retain(|g| g["name"].as_str() != Some("other"));
        std::fs::write(
            &path,
            toml::to_string(&changed)
                .unwrap()
                .replacen("weight = 3", "weight = 1", 1),
        )
        .unwrap();
        let pid = std::process::id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        let reloaded = wait_until(Duration::from_secs(10), || async {
            group_of(&proxy.status().await, "app")["nodes"][1]["weight"].as_u64() == Some(1)
        })
        .await;
        assert!(
            reloaded.is_some(),
            "SIGHUP did not reload: {:#}",
            proxy.status().await
        );
        // The dropped group's idle session is ended; new ones are refused.
        let gone = wait_until(Duration::from_secs(10), || async { other.is_closed() }).await;
        assert!(gone.is_some(), "the removed group's session was not ended");
        let e = tokio_postgres::connect(&proxy.url("other"), tokio_postgres::NoTls)
            .await
            .err()
            .expect("the removed group is gone");
        assert_eq!(sqlstate(&e), "3D000", "{}", db_text(&e));
        third
            .execute("INSERT INTO notes (body) VALUES ('third again')", &[])
            .await
            .expect("the other groups' sessions go on");

        // A row changed behind the proxy on the primary itself: the two
        // subscribers agree, so the primary is the copy reported.
        wait_group_caught_up(&proxy, "app", Duration::from_secs(30)).await;
        let n1 = connect(&cluster.nodes[0].url("app")).await;
        n1.execute("UPDATE items SET price = price + 1 WHERE id = 3", &[])
            .await
            .unwrap();
        let rows = verify(&proxy, "app").await;
        let bad: Vec<_> = rows.iter().filter(|(_, _, r)| r != "match").collect();
        assert_eq!(
            bad,
            [&(
                "public.items".to_string(),
                "n1".to_string(),
                "MISMATCH".to_string()
            )],
            "{rows:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn console_shows_clients_log_config_and_pauses_writes() {
    bounded(TEST_LIMIT, async {
        let g = TestGroup::start(2, |c| {
            c.auth.timeout_ms = 1500;
            c.auth.users = vec![
                reprise::config::UserConfig {
                    name: "boss".into(),
                    password: String::new(),
                    admin: true,
                    scram_verifier: None,
                },
                reprise::config::UserConfig {
                    name: "app".into(),
                    password: "not shown".into(),
                    admin: false,
                    scram_verifier: None,
                },
            ];
        })
        .await;
        let proxy = &g.proxy;
        let url = format!(
            "postgres://postgres@{}/app?application_name=watched",
            proxy.addr
        );
        let c = connect(&url).await;
        c.execute("INSERT INTO notes (body) VALUES ('logged; entry')", &[])
            .await
            .unwrap();
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();

        let boss = format!("postgres://boss@{}/reprise", proxy.addr);
        let console = connect(&boss).await;
        let rows = simple_rows(&console, "SHOW CLIENTS").await;
        let me = rows
            .iter()
            .find(|r| column(r, "application_name") == "watched")
            .unwrap_or_else(|| panic!("{rows:?}"));
        assert_eq!(column(me, "group"), "app");
        assert_eq!(column(me, "user"), "postgres");
        assert_eq!(column(me, "state"), "idle in transaction");
        c.batch_execute("COMMIT").await.unwrap();

        let rows = simple_rows(&console, "SHOW LOG app 5").await;
        assert!(!rows.is_empty() && rows.len() <= 5);
        assert!(
            rows.iter()
                .any(|r| column(r, "statements").contains("INSERT INTO notes")),
            "{rows:?}"
        );
        let seqs: Vec<i64> = rows
            .iter()
            .map(|r| column(r, "seq").parse().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] > w[1]),
            "newest first: {seqs:?}"
        );

        // The console outlives the login timeout (auth.timeout_ms = 1500).
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let rows = simple_rows(&console, "SHOW CONFIG").await;
        assert!(
            rows.iter()
                .any(|r| column(r, "key") == "group[0].node[1].name")
        );
        assert!(
            !format!("{rows:?}").contains("not shown"),
            "passwords are masked"
        );

        // PAUSE holds writes until RESUME.
        simple_rows(&console, "PAUSE app").await;
        assert_eq!(g.proxy.status().await["groups"][0]["paused"], true);
        let writer = connect(&proxy.url("app")).await;
        let held = tokio::spawn(async move {
            let t = Instant::now();
            writer
                .execute("INSERT INTO notes (body) VALUES ('held')", &[])
                .await
                .map(|_| t.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!held.is_finished(), "the write waits while paused");
        simple_rows(&console, "RESUME app").await;
        let waited = held.await.unwrap().expect("the held write goes through");
        assert!(waited >= Duration::from_millis(700), "{waited:?}");

        // Acting commands need an admin; SHOW does not.
        let (code, text) = admin_error(proxy, "app", "SWITCHOVER app TO n2")
            .await
            .unwrap();
        assert_eq!(code, "42501", "{text}");
        assert!(admin_error(proxy, "app", "SHOW NODES").await.is_none());
        assert_eq!(g.proxy.status().await["groups"][0]["primary"], "n1");
        let (code, text) = admin_error(proxy, "boss", "FLY AWAY").await.unwrap();
        assert_eq!(code, "42601");
        assert!(
            text.contains("VERIFY <group>") && text.contains("SHOW CLIENTS"),
            "{text}"
        );
    })
    .await;
}

async fn simple_rows(c: &tokio_postgres::Client, sql: &str) -> Vec<Vec<(String, String)>> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", db_text(&e)))
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_refuse_clearly_and_end_idle_transactions() {
    bounded(TEST_LIMIT, async {
        let g = TestGroup::start(2, |c| {
            c.groups[0].max_client_connections = 2;
            c.groups[0].nodes[0].max_connections = 1;
            c.routing.read_scaling = false;
            c.idle_in_transaction_timeout_ms = 400;
        })
        .await;
        let url = g.proxy.url("app");
        let a = connect(&url).await;
        a.simple_query("SELECT 1").await.unwrap();
        // The node's one backend connection is a's: b is refused with 53300.
        let b = connect(&url).await;
        let e = b.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e), "53300", "{}", db_text(&e));
        assert!(db_text(&e).contains("max_connections"), "{}", db_text(&e));
        // A third client of the group is refused at connect.
        let e = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .err()
            .expect("a third client is refused");
        assert_eq!(sqlstate(&e), "53300", "{}", db_text(&e));
        assert!(db_text(&e).contains("max_client_connections"));
        drop(b);
        // An idle transaction is ended after the timeout; its lock goes.
        a.batch_execute("BEGIN; UPDATE items SET name = 'locked' WHERE id = 1")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let e = a.simple_query("SELECT 1").await.unwrap_err();
        assert!(sqlstate(&e) == "25P03" || a.is_closed(), "{}", db_text(&e));
        let c = wait_connect(&url).await;
        let name: String = c
            .query_one("SELECT name FROM items WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "item 1", "the idle transaction was rolled back");
    })
    .await;
}

/// Connects once the group has a free client seat again.
async fn wait_connect(url: &str) -> tokio_postgres::Client {
    for _ in 0..50 {
        if let Ok((c, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no client seat came free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_cannot_be_seeded_is_not_added() {
    bounded(TEST_LIMIT, async {
        let g = TestGroup::start(2, |_| {}).await;
        // Port 1 on loopback: nothing listens there.
        let (code, text) = admin_error(
            &g.proxy,
            "postgres",
            "ADD NODE app ghost host=127.0.0.1 port=1 dbname=app user=postgres",
        )
        .await
        .expect("refused");
        assert_eq!(code, "55000", "{text}");
        assert!(text.contains("ghost"), "{text}");
        let s = g.proxy.status().await;
        assert_eq!(members(&s, "app"), ["n1", "n2"], "{s:#}");
        // Bad options are refused before anything happens.
        let (code, _) = admin_error(&g.proxy, "postgres", "ADD NODE app x host=h port=abc")
            .await
            .unwrap();
        assert_eq!(code, "22023");
        let (code, _) = admin_error(&g.proxy, "postgres", "ADD NODE nogroup x host=h port=1")
            .await
            .unwrap();
        assert_eq!(code, "42704");
        // The group still serves writes, replicated to both copies.
        let c = connect(&g.proxy.url("app")).await;
        c.execute(
            "INSERT INTO notes (body) VALUES ('after a failed add')",
            &[],
        )
        .await
        .unwrap();
        assert_identical(&g).await;
    })
    .await;
}
