//! The HTTP port: `/status` (JSON), `/status/history` (JSON: the last
//! minutes of lag samples), `/metrics` (Prometheus text) and `/`, a live
//! status page.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;

use super::events::Event;
use super::stats::{HISTORY_INTERVAL, Sample};
use crate::group::GroupStatus;
use crate::server::Shared;

/// Events of each group in `/status`.
const STATUS_EVENTS: usize = 50;

/// The JSON of `/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub groups: Vec<GroupStatus>,
    pub client_connections: usize,
    /// Recent events of every group, oldest first.
    pub events: Vec<Event>,
}

/// Current status of every group.
pub fn status(shared: &Shared) -> Status {
    let groups = shared.groups();
    let mut events: Vec<Event> = groups
        .iter()
        .flat_map(|g| g.stats.journal.recent(STATUS_EVENTS))
        .collect();
    events.sort_by_key(|e| e.at_ms);
    let skip = events.len().saturating_sub(STATUS_EVENTS);
    events.drain(..skip);
    Status {
        groups: groups.iter().map(|g| g.status()).collect(),
        client_connections: shared.cancel.len(),
        events,
    }
}

/// The JSON of `/status/history`.
#[derive(Debug, Serialize)]
pub struct History {
    pub interval_ms: u64,
    pub groups: Vec<GroupHistory>,
}

/// One group's lag samples, oldest first.
#[derive(Debug, Serialize)]
pub struct GroupHistory {
    pub name: String,
    pub samples: Vec<Sample>,
}

/// The lag history of every group.
pub fn history(shared: &Shared) -> History {
    History {
        interval_ms: HISTORY_INTERVAL.as_millis() as u64,
        groups: shared
            .groups()
            .iter()
            .map(|g| GroupHistory {
                name: g.name.clone(),
                samples: g.stats.history(),
            })
            .collect(),
    }
}

/// Serves HTTP until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn handle<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/status" => {
            let body = serde_json::to_string_pretty(&status(shared)).expect("serializable");
            reply(StatusCode::OK, "application/json", body)
        }
        "/status/history" => {
            let body = serde_json::to_string(&history(shared)).expect("serializable");
            reply(StatusCode::OK, "application/json", body)
        }
        "/metrics" => {
            for g in shared.groups() {
                super::stats::publish(&g);
            }
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                shared.metrics.render(),
            )
        }
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /status, /status/history, /metrics or /\n".into(),
        ),
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

const PAGE: &str = include_str!("status.html");
