//! Metrics through the `metrics` facade, exported as Prometheus text.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide Prometheus recorder (installed once, even when tests
/// start several servers in one process).
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the recorder on first use and returns a handle to it.
    pub fn install() -> Metrics {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new().build_recorder();
                let handle = recorder.handle();
                // Another recorder may already be installed (embedding apps).
                let _ = metrics::set_global_recorder(recorder);
                handle
            })
            .clone();
        Metrics { handle }
    }

    /// Prometheus exposition text.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    pub fn client_connected(&self, group: &str) {
        metrics::gauge!("reprise_client_connections", "group" => group.to_string()).increment(1.0);
        metrics::counter!("reprise_client_connections_total", "group" => group.to_string())
            .increment(1);
    }

    pub fn client_disconnected(&self, group: &str) {
        metrics::gauge!("reprise_client_connections", "group" => group.to_string()).decrement(1.0);
    }
}
