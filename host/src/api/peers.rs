//! The node port: what peers of the cluster ask each other, over mutual TLS only. Every
//! request here comes from a node whose certificate the handshake verified; the handlers know
//! which node by its certificate.

use super::connection::PeerCertificate;
use crate::tls::cluster::node_id_of;
use crate::tls::peer::PeerTls;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// The node port's routes.
pub fn router(tls: Arc<PeerTls>) -> Router {
    Router::new()
        .route("/cluster/v1/hello", get(hello))
        .fallback(|| async {
            super::ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such cluster route")
        })
        .with_state(tls)
}

/// `GET /cluster/v1/hello`: who answers, and who it sees asking.
async fn hello(
    State(tls): State<Arc<PeerTls>>,
    Extension(peer): Extension<PeerCertificate>,
) -> Response {
    let cluster = tls.cluster();
    Json(json!({
        "cluster": cluster,
        "node": tls.node_id(),
        "peer": node_id_of(&peer.0, &cluster),
    }))
    .into_response()
}
