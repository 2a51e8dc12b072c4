//! The node port: what peers of the cluster ask each other, over mutual TLS only. Every
//! request here comes from a node whose certificate the handshake verified; the handlers know
//! which node by its certificate.

use super::connection::PeerCertificate;
use super::ApiError;
use crate::cluster::membership::{Refused, MAX_MESSAGE_BYTES};
use crate::cluster::Membership;
use crate::tls::cluster::node_id_of;
use crate::tls::peer::PeerTls;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// What the node port's handlers share.
#[derive(Clone)]
struct Peers {
    tls: Arc<PeerTls>,
    membership: Arc<Membership>,
}

impl Peers {
    /// The node a request comes from, as its certificate names it.
    fn caller(&self, peer: &PeerCertificate) -> Option<String> {
        node_id_of(&peer.0, &self.tls.cluster())
    }
}

/// The node port's routes.
pub fn router(tls: Arc<PeerTls>, membership: Arc<Membership>) -> Router {
    Router::new()
        .route("/cluster/v1/hello", get(hello))
        .route("/cluster/v1/swim", post(swim))
        .layer(DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such cluster route")
        })
        .with_state(Peers { tls, membership })
}

/// `GET /cluster/v1/hello`: who answers, and who it sees asking.
async fn hello(
    State(peers): State<Peers>,
    Extension(peer): Extension<PeerCertificate>,
) -> Response {
    Json(json!({
        "cluster": peers.tls.cluster(),
        "node": peers.tls.node_id(),
        "peer": peers.caller(&peer),
    }))
    .into_response()
}

/// `POST /cluster/v1/swim`: a membership message from the calling node.
async fn swim(
    State(peers): State<Peers>,
    Extension(peer): Extension<PeerCertificate>,
    message: Bytes,
) -> Response {
    let Some(caller) = peers.caller(&peer) else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "not a node of this cluster",
        )
        .into_response();
    };
    match peers.membership.receive(&caller, message) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => {
            let status = match refused {
                Refused::Busy => StatusCode::SERVICE_UNAVAILABLE,
                Refused::WrongSender => StatusCode::FORBIDDEN,
                Refused::NotMembership => StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, "refused", refused.to_string()).into_response()
        }
    }
}
