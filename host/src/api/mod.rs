//! The HTTP edge: connections and their limits, the router, `/healthz`, `/metrics`, the admin
//! API under `/v1/admin`, app invocation under `/apps/<app>/…` and the routes apps declare,
//! and async invocation under `/async/<app>/…` with its jobs at `/jobs/<id>`.

mod admin;
mod auth;
mod connection;
mod dashboard;
mod error;
mod invoke;
mod jobs;
mod openapi;
mod peers;
mod telemetry;
mod tenants;

pub use connection::{raise_open_file_limit, ConnectionStats, PeerCertificate, TlsSource};
pub use error::ApiError;
pub use telemetry::parse_since;

use crate::node::Node;
use crate::telemetry::{self as node_telemetry, REQUEST_ID_HEADER};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::Instrument;

/// The whole router of a node.
fn router(node: Arc<Node>) -> Router {
    let (admin, admin_api) = admin::router(node.clone()).split_for_parts();
    let document: Arc<str> = openapi::document(admin_api)
        .to_json()
        .expect("the OpenAPI document serialises")
        .into();
    Router::new()
        .route(
            "/openapi.json",
            get(move || async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    document.to_string(),
                )
            }),
        )
        .route("/healthz", get(healthz))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/style.css", get(dashboard::style))
        .route(
            "/metrics",
            get(metrics).route_layer(middleware::from_fn_with_state(
                node.clone(),
                auth::require_key,
            )),
        )
        .nest("/v1/admin", admin)
        .route("/async/{app}", post(jobs::enqueue))
        .route("/async/{app}/", post(jobs::enqueue))
        .route("/async/{app}/{*rest}", post(jobs::enqueue))
        .route("/jobs/{id}", get(jobs::status))
        .route("/jobs/{id}/result", get(jobs::result))
        .route("/apps/{app}", any(invoke::invoke))
        .route("/apps/{app}/", any(invoke::invoke))
        .route("/apps/{app}/{*rest}", any(invoke::invoke))
        .fallback(invoke::routed)
        .layer(middleware::from_fn(request_id))
        .with_state(node)
}

/// Gives every request an id (the client's `x-request-id` when it is a valid one, else a
/// fresh one): the app sees it, the response carries it back, and the request's trace span
/// and log lines are tagged with it.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| node_telemetry::valid_request_id(id))
        .map_or_else(node_telemetry::new_request_id, str::to_string);
    let value = HeaderValue::try_from(id.as_str()).expect("request ids are valid header values");
    request
        .headers_mut()
        .insert(REQUEST_ID_HEADER, value.clone());
    // A job's id is what lets its holder read it: it stays out of traces.
    let path = match request.uri().path() {
        path if path.starts_with("/jobs/") => "/jobs/{id}",
        path => path,
    }
    .to_string();
    let span = tracing::info_span!("request", id = %id, method = %request.method(), path);
    let mut response = next.run(request).instrument(span).await;
    response.headers_mut().insert(REQUEST_ID_HEADER, value);
    response
}

/// The node's metrics in Prometheus' text format (the operator's key required).
async fn metrics(
    State(node): State<Arc<Node>>,
    axum::Extension(principal): axum::Extension<crate::tenancy::Principal>,
) -> Response {
    if let Err(error) = auth::operator(&principal) {
        return error.into_response();
    }
    (
        [(header::CONTENT_TYPE, node_telemetry::metrics::CONTENT_TYPE)],
        node.telemetry.metrics.encode(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Serves the node's API on `listener` until the task is dropped; HTTPS when `tls` is given,
/// under the connection limits of `[server]`, counting connections in `connections`.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    connections: Arc<ConnectionStats>,
) {
    let limits = node.config.server.clone();
    let router = router(node).layer(axum::Extension(connections.clone()));
    let tls = tls.map(|tls| Arc::new(connection::FixedTls(tls)) as Arc<dyn TlsSource>);
    connection::accept_loop(router, listener, tls, limits, connections).await;
}

/// Serves the node port on `listener` until the task is dropped: mutual TLS as `tls` has it
/// now (reloaded files apply to new connections), under the same connection limits.
pub async fn serve_peers(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Arc<crate::tls::peer::PeerTls>,
    fleet: Arc<crate::cluster::Fleet>,
    connections: Arc<ConnectionStats>,
) {
    let limits = node.config.server.clone();
    let router = peers::router(node, tls.clone(), fleet);
    connection::accept_loop(router, listener, Some(tls), limits, connections).await;
}
