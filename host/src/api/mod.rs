//! The HTTP edge: connections and their limits, the router, `/healthz`, the admin API under
//! `/v1/admin`, and app invocation under `/apps/<app>/…` and the routes apps declare.

mod admin;
mod connection;
mod error;
mod invoke;

pub use connection::{raise_open_file_limit, ConnectionStats};
pub use error::ApiError;

use crate::node::Node;
use axum::routing::{any, get};
use axum::Router;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The whole router of a node.
fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/v1/admin", admin::router(node.clone()))
        .route("/apps/{app}", any(invoke::invoke))
        .route("/apps/{app}/", any(invoke::invoke))
        .route("/apps/{app}/{*rest}", any(invoke::invoke))
        .fallback(invoke::routed)
        .with_state(node)
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
    connection::accept_loop(router, listener, tls, limits, connections).await;
}
