//! The live status page in a real headless browser (Debian `chromium`):
//! its script renders every node's name, role and state from `/status`,
//! and after the primary is killed it shows the new primary and the
//! failover event.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const TEST_LIMIT: Duration = Duration::from_secs(300);

fn chromium() -> std::path::PathBuf {
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = std::path::Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("chromium is not installed: run scripts/install-deps (Debian package `chromium`)");
}

/// The DOM of `url` after its scripts ran (a few seconds of virtual time).
fn dump_dom(browser: &std::path::Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    // Bounded: a browser that hangs fails the test instead of blocking it.
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..600 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: a plain kill(2) of the browser this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        })
    };
    let out = child.wait_with_output().expect("chromium runs");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watchdog.join();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium --dump-dom failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// The start tag of the element with this id, e.g. `<tr id="…" …>`.
fn tag_with_id<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

/// An attribute of a start tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    let len = tag[at..].find('"')?;
    Some(&tag[at..at + len])
}

/// (role, state) of a node as the page rendered it.
fn rendered_node(dom: &str, node: &str) -> (String, String) {
    let tag = tag_with_id(dom, &format!("node-app-{node}"))
        .unwrap_or_else(|| panic!("node {node} is not on the page:\n{dom}"));
    (
        attr(tag, "data-role").unwrap_or_default().to_string(),
        attr(tag, "data-state").unwrap_or_default().to_string(),
    )
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_nodes_and_shows_a_failover() {
    let browser = chromium();
    bounded(TEST_LIMIT, async move {
        let mut g = TestGroup::start(3, |_| {}).await;
        let url = format!("http://{}/", g.proxy.http);

        // What the server sends has no node in it: the script renders them.
        let page = g.proxy.http_get("/").await;
        assert!(!page.contains("node-app-n1") && !page.contains("data-node=\"n1\""));

        let dom = blocking(|| dump_dom(&browser, &url));
        assert!(
            dom.contains("data-loaded=\"true\""),
            "the page loaded /status:\n{dom}"
        );
        let status = g.proxy.status().await;
        for n in status["groups"][0]["nodes"].as_array().unwrap() {
            let name = n["name"].as_str().unwrap();
            let (role, state) = rendered_node(&dom, name);
            assert_eq!(role, n["role"].as_str().unwrap(), "role of {name}");
            assert_eq!(state, n["state"].as_str().unwrap(), "state of {name}");
            assert!(
                dom.contains(&format!("<td class=\"name\">{name}</td>")),
                "{name}:\n{dom}"
            );
        }
        assert_eq!(rendered_node(&dom, "n1").0, "primary");
        let section = tag_with_id(&dom, "group-app").expect("the group's section");
        assert_eq!(attr(section, "data-primary"), Some("n1"));
        assert!(tag_with_id(&dom, "lag-app").is_some_and(|t| t.starts_with("<canvas")));

        // Kill the primary; wait for the failover through /status.
        blocking(|| g.cluster.nodes[0].kill()).unwrap();
        let failed_over = wait_until(Duration::from_secs(60), || async {
            let s = g.proxy.status().await;
            primary_of(&s) != "n1" && node_state(&s, "n1") == "down"
        })
        .await;
        assert!(
            failed_over.is_some(),
            "no failover: {:#}",
            g.proxy.status().await
        );
        let new_primary = primary_of(&g.proxy.status().await);

        let dom = blocking(|| dump_dom(&browser, &url));
        let section = tag_with_id(&dom, "group-app").expect("the group's section");
        assert_eq!(
            attr(section, "data-primary"),
            Some(new_primary.as_str()),
            "{dom}"
        );
        assert_eq!(rendered_node(&dom, &new_primary).0, "primary", "{dom}");
        assert_eq!(
            rendered_node(&dom, "n1"),
            ("subscriber".into(), "down".into()),
            "{dom}"
        );
        let event = dom
            .split("<li ")
            .skip(1)
            .find(|li| li.contains("data-kind=\"failover\""))
            .unwrap_or_else(|| panic!("no failover event on the page:\n{dom}"));
        assert!(
            event.contains(&format!("data-node=\"{new_primary}\"")),
            "{event}"
        );
        assert!(
            event.contains(&format!("n1 -&gt; {new_primary}")),
            "{event}"
        );
        g.proxy.stop().await;
    })
    .await;
}
