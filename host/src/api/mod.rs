//! The HTTP edge: TLS accept, the router, `/healthz`, the admin API under `/v1/admin` and app
//! invocation under `/apps/<app>/…`.

mod admin;
mod error;
mod invoke;

pub use error::ApiError;

use crate::node::Node;
use axum::http::StatusCode;
use axum::routing::{any, get};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The whole router of a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/v1/admin", admin::router(node.clone()))
        .route("/apps/{app}", any(invoke::invoke))
        .route("/apps/{app}/", any(invoke::invoke))
        .route("/apps/{app}/{*rest}", any(invoke::invoke))
        .fallback(not_found)
        .with_state(node)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route: apps are under /apps/<app>/, the admin API under /v1/admin/",
    )
}

/// Accepts connections on `listener` until the task is dropped; HTTPS when `tls` is given.
/// Each connection is served on its own task, HTTP/1.1 or HTTP/2.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    let service = TowerToHyperService::new(router(node));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Running out of file descriptors is transient: back off instead of exiting.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let served = match acceptor {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                    Err(error) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                },
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}
