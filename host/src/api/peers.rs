//! The node port: what peers of the cluster ask each other, over mutual TLS only. Every
//! request here comes from a node whose certificate the handshake verified; the handlers know
//! which node by its certificate, and refuse any other caller.

use super::connection::PeerCertificate;
use super::ApiError;
use crate::cluster::fleet::PeerState;
use crate::cluster::membership::{Refused, MAX_MESSAGE_BYTES};
use crate::cluster::Fleet;
use crate::node::Node;
use crate::store::blobs;
use crate::tenancy::SharedTenancy;
use crate::tls::cluster::node_id_of;
use crate::tls::peer::PeerTls;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// What the node port's handlers share.
#[derive(Clone)]
struct Peers {
    node: Arc<Node>,
    tls: Arc<PeerTls>,
    fleet: Arc<Fleet>,
}

/// The node a request comes from, as its certificate names it.
#[derive(Clone)]
struct Caller(String);

/// The node port's routes.
pub fn router(node: Arc<Node>, tls: Arc<PeerTls>, fleet: Arc<Fleet>) -> Router {
    let peers = Peers { node, tls, fleet };
    Router::new()
        .route("/cluster/v1/swim", post(swim))
        .route("/cluster/v1/state", get(state))
        .route("/cluster/v1/apps/{name}", get(app))
        .route("/cluster/v1/models/{name}", get(model))
        .route("/cluster/v1/crl", get(crl))
        .route("/cluster/v1/tenancy", get(tenancy))
        .route("/cluster/v1/blobs/{digest}", get(blob))
        .route("/cluster/v1/kv/{app}/{bucket}", get(kv_feed))
        .route("/cluster/v1/invoke/{app}", any(invoke))
        .route("/cluster/v1/invoke/{app}/", any(invoke))
        .route("/cluster/v1/invoke/{app}/{*rest}", any(invoke))
        .layer(DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
        .route_layer(middleware::from_fn_with_state(peers.clone(), member_only))
        .route("/cluster/v1/hello", get(hello))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such cluster route")
        })
        .with_state(peers)
}

/// Lets through requests of nodes of this cluster only (any verified certificate may say
/// hello), and tells the handlers which node asks.
async fn member_only(
    State(peers): State<Peers>,
    Extension(peer): Extension<PeerCertificate>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(caller) = node_id_of(&peer.0, &peers.tls.cluster()) else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "not a node of this cluster",
        )
        .into_response();
    };
    request.extensions_mut().insert(Caller(caller));
    next.run(request).await
}

/// `GET /cluster/v1/hello`: who answers, and who it sees asking.
async fn hello(
    State(peers): State<Peers>,
    Extension(peer): Extension<PeerCertificate>,
) -> Response {
    Json(json!({
        "cluster": peers.tls.cluster(),
        "node": peers.tls.node_id(),
        "peer": node_id_of(&peer.0, &peers.tls.cluster()),
    }))
    .into_response()
}

/// `POST /cluster/v1/swim`: a membership message from the calling node.
async fn swim(
    State(peers): State<Peers>,
    Extension(Caller(caller)): Extension<Caller>,
    message: Bytes,
) -> Response {
    match peers.fleet.membership.receive(&caller, message) {
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

/// `GET /cluster/v1/state`: the apps this node has and serves, its removals and its load.
async fn state(State(peers): State<Peers>) -> Result<Json<PeerState>, ApiError> {
    let runtime = &peers.node.runtime;
    Ok(Json(PeerState {
        desired: runtime.desired_state()?,
        load: runtime.load(),
        crl_issued_at: peers.tls.crl_issued_at(),
        tenancy: Some(peers.node.tenancy.shared()?.fingerprint()),
    }))
}

/// `GET /cluster/v1/apps/<name>`: the app's record and revisions, as stored here, and its
/// secrets (for members only, as every route here).
async fn app(State(peers): State<Peers>, Path(name): Path<String>) -> Result<Response, ApiError> {
    match peers.node.runtime.replica_of(&name)? {
        Some(app) => Ok(Json(app).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "app_not_found",
            format!("no app named {name:?} on this node"),
        )),
    }
}

/// `GET /cluster/v1/tenancy`: the tenants and key records (digests, never keys) this node
/// shares.
async fn tenancy(State(peers): State<Peers>) -> Result<Json<SharedTenancy>, ApiError> {
    Ok(Json(peers.node.tenancy.shared()?))
}

/// `GET /cluster/v1/crl`: the cluster CRL this node uses (PEM).
async fn crl(State(peers): State<Peers>) -> Result<Response, ApiError> {
    let pem = peers
        .tls
        .crl_pem()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_crl", "this node uses no CRL"))?;
    Ok(([(header::CONTENT_TYPE, "application/pkix-crl")], pem).into_response())
}

/// `GET /cluster/v1/models/<name>`: the model's record (its file is a blob).
async fn model(State(peers): State<Peers>, Path(name): Path<String>) -> Result<Response, ApiError> {
    match peers.node.models.record(&name) {
        Some(record) => Ok(Json(record).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model named {name:?} on this node"),
        )),
    }
}

/// Where in a replicated bucket's feed a peer reads from.
#[derive(serde::Deserialize)]
struct FeedQuery {
    /// The last sequence number it has seen (0: from the start).
    #[serde(default)]
    after: u64,
}

/// `GET /cluster/v1/kv/<app>/<bucket>?after=<seq>`: the changes after `after` of a replicated
/// bucket of an app that runs here, as a [`crate::kv::feed::FeedPage`].
async fn kv_feed(
    State(peers): State<Peers>,
    Path((app, bucket)): Path<(String, String)>,
    Query(query): Query<FeedQuery>,
) -> Result<Response, ApiError> {
    use crate::kv::feed::{PAGE_CHANGES, PAGE_VALUE_BYTES};
    let runtime = &peers.node.runtime;
    let Some(replicated) = runtime
        .replicated_buckets()
        .into_iter()
        .find(|replicated| replicated.app == app && replicated.bucket == bucket)
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "bucket_not_replicated",
            format!("no app {app:?} with replicated bucket {bucket:?} runs on this node"),
        ));
    };
    let feed = runtime.kv_feed(&replicated)?;
    let store_error =
        |message: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_error", message);
    let page =
        tokio::task::spawn_blocking(move || feed.page(query.after, PAGE_CHANGES, PAGE_VALUE_BYTES))
            .await
            .map_err(|e| store_error(e.to_string()))?
            .map_err(store_error)?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        page.encode(),
    )
        .into_response())
}

/// `GET /cluster/v1/blobs/<digest>`: a component (or any blob) of this node, streamed.
async fn blob(
    State(peers): State<Peers>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let missing = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "blob_not_found",
            format!("no blob {digest:?} on this node"),
        )
    };
    if !blobs::is_digest(&digest) {
        return Err(missing());
    }
    let file = tokio::fs::File::open(peers.node.runtime.blobs().path(&digest))
        .await
        .map_err(|_| missing())?;
    let length = file.metadata().await.map_err(|_| missing())?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response())
}

/// `ANY /cluster/v1/invoke/<app>[@<selector>]/<path>`: a request a peer forwards, served here
/// (never forwarded again). The peer authenticated its client.
async fn invoke(
    State(peers): State<Peers>,
    Extension(Caller(caller)): Extension<Caller>,
    request: Request,
) -> Response {
    let mut response = super::invoke::serve_forwarded(&peers.node, &caller, request).await;
    if let Ok(me) = header::HeaderValue::from_str(peers.tls.node_id()) {
        response
            .headers_mut()
            .insert(crate::cluster::forwarding::SERVED_BY, me);
    }
    response
}
