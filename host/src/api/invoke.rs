//! `/apps/<app>/<path…>`: hands the request to the app (the runtime picks the revision by its
//! traffic split; `/apps/<app>@<tag or revision>/…` names one). The component sees the path
//! below its mount point (`/apps/classify/v1/x?y` arrives as `/v1/x?y`), so the same component
//! works wherever it is mounted.

use super::ApiError;
use crate::cluster::forwarding;
use crate::node::Node;
use crate::runtime::dispatch::Decision;
use crate::runtime::{read_body, BodyError};
use crate::tenancy::Principal;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use http_body_util::Full;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Runs the app named in the path on the request.
pub async fn invoke(State(node): State<Arc<Node>>, request: Request) -> Response {
    let Some((app, selector, path)) = split_app_path(request.uri(), "/apps/") else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no app in the path")
            .into_response();
    };
    let target = Target {
        app: app.to_string(),
        selector: selector.map(str::to_string),
        path,
    };
    match run(&node, request, target).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// A request outside `/apps/` and the node's own paths: the app whose `routes` cover its path
/// serves it, else 404.
pub async fn routed(State(node): State<Arc<Node>>, request: Request) -> Response {
    let path = request.uri().path();
    let route = (!crate::apps::spec::is_reserved(path))
        .then(|| node.runtime.app_for_route(path))
        .flatten();
    let Some((app, below)) = route else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route: apps are under /apps/<app>/ (or the routes they declare), the admin API under /v1/admin/",
        )
        .into_response();
    };
    let path = match request.uri().query() {
        Some(query) => format!("{below}?{query}"),
        None => below,
    };
    let target = Target {
        app,
        selector: None,
        path,
    };
    match run(&node, request, target).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// Which app a request goes to, and the path it sees.
struct Target {
    app: String,
    /// A tag or revision number (`/apps/<app>@<selector>/`).
    selector: Option<String>,
    /// Path and query below the app's mount point.
    path: String,
}

/// Splits `<prefix><app>[@<selector>]/<rest>?<query>` into the app name, the selector (a tag
/// or revision number) and the path the app sees.
fn split_app_path<'a>(uri: &'a Uri, prefix: &str) -> Option<(&'a str, Option<&'a str>, String)> {
    let below = uri.path().strip_prefix(prefix)?;
    let (mount, rest) = match below.split_once('/') {
        Some((mount, rest)) => (mount, format!("/{rest}")),
        None => (below, "/".to_string()),
    };
    let (app, selector) = match mount.split_once('@') {
        Some((app, selector)) => (app, Some(selector)),
        None => (mount, None),
    };
    let path = match uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest,
    };
    Some((app, selector, path))
}

/// Reads a request body for app `app_name` whole, before any instance starts (so a slow
/// client never holds one): bounded by `limit` (413 past it, with the connection closed since
/// the rest is left unread), by the node's budget for bodies in memory (`reservation`, 503
/// when spent), and by the body timeout (408).
pub async fn read_app_body(
    node: &Node,
    body: Body,
    headers: &header::HeaderMap,
    app_name: &str,
    limit: u64,
    reservation: &mut crate::runtime::BodyReservation,
) -> Result<bytes::Bytes, Response> {
    let too_large = || {
        let mut response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than app {app_name:?} accepts ({limit} bytes)"),
        )
        .into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        response
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let read_timeout = Duration::from_secs(node.config.server.body_read_timeout_secs);
    let read = read_body(body, limit, declared.unwrap_or(0), reservation);
    match tokio::time::timeout(read_timeout, read).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(BodyError::TooLarge)) => Err(too_large()),
        Ok(Err(BodyError::Refused(error))) => Err(ApiError::from(error).into_response()),
        Ok(Err(BodyError::Broken(error))) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("could not read the request body: {error}"),
        )
        .into_response()),
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    read_timeout.as_secs()
                ),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            Err(response)
        }
    }
}

/// Who a request comes from, for per-client rate limits: the API key it was authenticated
/// with, else its address, for IPv6 its /64 (which one host often holds whole). Never an
/// unchecked header, which would give every request a fresh budget.
pub(super) fn client_key(caller: Option<&Principal>, peer: Option<SocketAddr>) -> String {
    if let Some(caller) = caller {
        return format!("key:{}", caller.key_id);
    }
    match peer.map(|p| p.ip()) {
        Some(std::net::IpAddr::V6(ip)) if ip.to_ipv4_mapped().is_none() => {
            let segments = ip.segments();
            format!(
                "ip6:{:x}:{:x}:{:x}:{:x}::/64",
                segments[0], segments[1], segments[2], segments[3]
            )
        }
        Some(ip) => format!("ip:{}", ip.to_canonical()),
        None => "ip:unknown".into(),
    }
}

/// Runs a client's request: on a peer when the app runs elsewhere in the cluster or this node
/// is saturated, else here.
async fn run(node: &Node, request: Request, target: Target) -> Result<Response, ApiError> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    let (mut parts, body) = request.into_parts();
    crate::runtime::queue::strip_queue_headers(&mut parts.headers);
    // Hops are the node port's to record: a client's claim of one means nothing.
    parts.headers.remove(forwarding::FORWARDED_BY);
    parts.headers.remove(forwarding::CLIENT);
    let caller = super::auth::invoker(node, &target.app, &mut parts.headers)?;
    let client = client_key(caller.as_ref(), peer);
    if let (Some(fleet), Some(app)) = (node.fleet.get(), node.runtime.app(&target.app)) {
        let elsewhere = !app.placed || node.runtime.load().saturated();
        if elsewhere && !fleet.serving(&target.app).is_empty() {
            return forward(node, fleet, &app, parts, body, target, &client).await;
        }
    }
    serve_here(node, parts, body, target, &client).await
}

/// Sends a request on to a peer that serves `app`. When none can take it, an app placed here
/// runs it here after all; one that is not gets a 503. A peer that took it and failed is a 502
/// (the request may have run: it does not run again).
async fn forward(
    node: &Node,
    fleet: &crate::cluster::Fleet,
    app: &crate::runtime::App,
    parts: http::request::Parts,
    body: Body,
    target: Target,
    client: &str,
) -> Result<Response, ApiError> {
    let (limit, timeout_secs) = app.revisions.values().fold((0, 0), |(limit, timeout), r| {
        let spec = &r.record.spec;
        (
            limit.max(spec.max_body_bytes),
            timeout.max(spec.timeout_secs + spec.queue_timeout_secs),
        )
    });
    let mut reservation = node.runtime.body_reservation();
    let body = match read_app_body(
        node,
        body,
        &parts.headers,
        &target.app,
        limit,
        &mut reservation,
    )
    .await
    {
        Ok(body) => body,
        Err(response) => return Ok(response),
    };
    let forwarded = fleet
        .forward(forwarding::Forward {
            app: &target.app,
            selector: target.selector.as_deref(),
            path: &target.path,
            method: parts.method.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
            client,
            timeout: Duration::from_secs(timeout_secs) + forwarding::GRACE,
        })
        .await;
    drop(reservation);
    match forwarded {
        Ok(response) => Ok(response),
        Err(error) if error.may_have_run() => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "peer_failed",
            error.to_string(),
        )),
        Err(error) if app.placed => {
            tracing::debug!(%error, "no peer took the request; serving it here");
            serve_here(node, parts, Body::from(body), target, client).await
        }
        Err(error) => Err(ApiError::from(crate::runtime::InvokeError::NotPlaced(
            error.to_string(),
        ))),
    }
}

/// Serves a request a peer (node `from`) forwarded: here, never forwarded again; the peer
/// authenticated its client and says who it is for rate limits.
pub async fn serve_forwarded(node: &Node, from: &str, request: Request) -> Response {
    let Some((app, selector, path)) = split_app_path(request.uri(), "/cluster/v1/invoke/") else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no app in the path")
            .into_response();
    };
    let target = Target {
        app: app.to_string(),
        selector: selector.map(str::to_string),
        path,
    };
    let (mut parts, body) = request.into_parts();
    crate::runtime::queue::strip_queue_headers(&mut parts.headers);
    let client = parts
        .headers
        .remove(forwarding::CLIENT)
        .and_then(|value| value.to_str().ok().map(str::to_string))
        .unwrap_or_else(|| format!("node:{from}"));
    match serve_here(node, parts, body, target, &client).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// Runs a request on this node: admission, the body read whole, an instance.
async fn serve_here(
    node: &Node,
    parts: http::request::Parts,
    body: Body,
    target: Target,
    client: &str,
) -> Result<Response, ApiError> {
    let Target {
        app: app_name,
        selector,
        path,
    } = target;
    let app_name = app_name.as_str();
    let selector = selector.as_deref();
    let admitted = match node
        .runtime
        .admit(app_name, selector, &parts.headers, client)?
    {
        Decision::Serve(admitted) => admitted,
        Decision::Degraded(response) => return Ok(response.map(Body::new)),
    };

    let limit = admitted.revision.record.spec.max_body_bytes;
    let mut reservation = node.runtime.body_reservation();
    let body = match read_app_body(
        node,
        body,
        &parts.headers,
        app_name,
        limit,
        &mut reservation,
    )
    .await
    {
        Ok(body) => body,
        Err(response) => return Ok(response),
    };

    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "localhost".to_string());
    let scheme = if node.tls_fingerprint.is_some() {
        "https"
    } else {
        "http"
    };
    let uri: Uri = format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_uri",
                format!("invalid request URI: {e}"),
            )
        })?;
    let mut guest_request = http::Request::new(Full::new(body));
    *guest_request.method_mut() = parts.method;
    *guest_request.uri_mut() = uri;
    *guest_request.headers_mut() = parts.headers;

    let response = node.runtime.serve(admitted, guest_request, 0).await?;
    drop(reservation);
    Ok(response.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::split_app_path;
    use proptest::prelude::*;

    proptest! {
        /// Whatever path a client sends under /apps/, the app name is one path segment and
        /// the app sees the rest.
        #[test]
        fn any_app_path_splits_into_one_segment_and_the_rest(path in "/apps/[a-zA-Z0-9._~%-]{0,20}(/[a-zA-Z0-9._~%/-]{0,30})?") {
            let uri: axum::http::Uri = path.parse().unwrap();
            let (app, _, rest) = split_app_path(&uri, "/apps/").unwrap();
            prop_assert!(!app.contains('/'));
            prop_assert!(rest.starts_with('/'));
        }
    }

    #[test]
    fn the_app_sees_the_path_below_its_mount_point() {
        let uri = "/apps/classify/v1/x?y=1".parse().unwrap();
        assert_eq!(
            split_app_path(&uri, "/apps/"),
            Some(("classify", None, "/v1/x?y=1".to_string()))
        );
        let uri = "/apps/hello".parse().unwrap();
        assert_eq!(
            split_app_path(&uri, "/apps/"),
            Some(("hello", None, "/".to_string()))
        );
        let uri = "/apps/hello/".parse().unwrap();
        assert_eq!(
            split_app_path(&uri, "/apps/"),
            Some(("hello", None, "/".to_string()))
        );
        let uri = "/apps/hello@canary/x".parse().unwrap();
        assert_eq!(
            split_app_path(&uri, "/apps/"),
            Some(("hello", Some("canary"), "/x".to_string()))
        );
    }
}
