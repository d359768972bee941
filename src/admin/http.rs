//! The HTTP port: `/status` (JSON), `/metrics` (Prometheus text) and `/`,
//! a small status page.

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

use crate::group::GroupStatus;
use crate::server::Shared;

/// The JSON of `/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub groups: Vec<GroupStatus>,
    pub client_connections: usize,
}

/// Current status of every group.
pub fn status(shared: &Shared) -> Status {
    Status {
        groups: shared.groups().iter().map(|g| g.status()).collect(),
        client_connections: shared.cancel.len(),
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
        "/metrics" => {
            for g in shared.groups() {
                g.publish_lag();
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
            "not found: try /status, /metrics or /\n".into(),
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
