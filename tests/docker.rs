//! The docker-compose demo's files, checked as far as a machine without a
//! Docker daemon allows: docker/reprise.toml is a valid Reprise config for
//! the compose services, and `docker-compose config` accepts the compose
//! file (the Debian package `docker-compose`, installed by
//! scripts/install-deps).

use std::path::Path;
use std::process::Command;

fn docker_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/docker"))
}

#[test]
fn demo_config_is_valid_for_the_compose_services() {
    let config = reprise::config::Config::load(&docker_dir().join("reprise.toml"))
        .expect("docker/reprise.toml must pass `reprise check`");
    assert_eq!(config.groups.len(), 1);
    let group = &config.groups[0];
    assert_eq!(group.name, "app", "the load service connects to dbname=app");
    let hosts: Vec<&str> = group.nodes.iter().map(|n| n.host.as_str()).collect();
    assert_eq!(
        hosts,
        ["pg1", "pg2", "pg3"],
        "one node per postgres service"
    );
    assert!(group.nodes.iter().all(|n| n.port == 5432));
    // Prometheus scrapes the port Reprise serves HTTP on.
    let http_port = config.http.rsplit(':').next().expect("http address");
    let prometheus = std::fs::read_to_string(docker_dir().join("prometheus.yml")).unwrap();
    assert!(
        prometheus.contains(&format!("reprise:{http_port}")),
        "docker/prometheus.yml must scrape reprise:{http_port}"
    );
}

#[test]
fn compose_file_is_valid() {
    let compose = docker_dir().join("docker-compose.yml");
    let out = match Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .args(["config", "--services"])
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("docker-compose is not installed ({e}): run scripts/install-deps"),
    };
    assert!(
        out.status.success(),
        "docker-compose config rejected {}:\n{}",
        compose.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let services = String::from_utf8_lossy(&out.stdout);
    let mut services: Vec<&str> = services.lines().collect();
    services.sort_unstable();
    assert_eq!(
        services,
        [
            "grafana",
            "load",
            "pg1",
            "pg2",
            "pg3",
            "prometheus",
            "reprise",
            "seed"
        ]
    );
    // The files the compose file mounts or builds from, except Grafana's
    // provisioning (docker/grafana/, kept with the dashboard).
    for f in ["Dockerfile", "reprise.toml", "prometheus.yml"] {
        assert!(docker_dir().join(f).is_file(), "docker/{f} is missing");
    }
}
