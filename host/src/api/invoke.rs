//! `/apps/<app>/<path…>`: hands the request to the app's component. The component sees the
//! path below its mount point (`/apps/classify/v1/x?y` arrives as `/v1/x?y`), so the same
//! component works wherever it is mounted.

use super::ApiError;
use crate::node::Node;
use crate::runtime::{BodyReservation, InvokeError};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::time::Duration;

/// Runs the app named in the path on the request.
pub async fn invoke(State(node): State<Arc<Node>>, request: Request) -> Response {
    match run(&node, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// Splits `/apps/<app>/<rest>?<query>` into the app name and the path the app sees.
fn split_app_path(uri: &Uri) -> Option<(&str, String)> {
    let below = uri.path().strip_prefix("/apps/")?;
    let (app, rest) = match below.split_once('/') {
        Some((app, rest)) => (app, format!("/{rest}")),
        None => (below, "/".to_string()),
    };
    let path = match uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest,
    };
    Some((app, path))
}

async fn run(node: &Node, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let (app_name, path) = split_app_path(&parts.uri)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no app in the path"))?;
    let app = node.runtime.app(app_name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "app_not_found",
            format!("no app named {app_name:?} is deployed on this node"),
        )
    })?;

    let limit = app.record.max_body_bytes;
    // The rest of the body is left unread, so the connection cannot carry another request:
    // the client is told to close it rather than finding out on its next request.
    let too_large = || {
        let mut response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request body is larger than app {:?} accepts ({limit} bytes)",
                app.record.name
            ),
        )
        .into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        response
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Ok(too_large());
    }
    // The body is read whole (bounded by the app's limit, the node's body budget and the body
    // timeout) before the instance starts, so a slow client never holds an instance.
    let mut reservation = node.runtime.body_reservation();
    let read_timeout = Duration::from_secs(node.config.server.body_read_timeout_secs);
    let read = read_body(body, limit, declared.unwrap_or(0), &mut reservation);
    let body = match tokio::time::timeout(read_timeout, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(BodyError::TooLarge)) => return Ok(too_large()),
        Ok(Err(BodyError::Refused(error))) => return Err(error.into()),
        Ok(Err(BodyError::Broken(error))) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("could not read the request body: {error}"),
            ));
        }
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
            return Ok(response);
        }
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

    let response = node.runtime.invoke(app, guest_request).await?;
    drop(reservation);
    Ok(response.map(Body::new))
}

/// Why a request body could not be read.
enum BodyError {
    TooLarge,
    Refused(InvokeError),
    Broken(axum::Error),
}

/// Reads a body of at most `limit` bytes, claiming its bytes from the node's budget as they
/// arrive (a declared length only sizes the buffer).
async fn read_body(
    mut body: Body,
    limit: u64,
    declared: u64,
    reservation: &mut BodyReservation,
) -> Result<Bytes, BodyError> {
    // The declared length is the client's word: it sizes the buffer only up to a small bound.
    let mut collected = BytesMut::with_capacity(declared.min(limit).min(64 << 10) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Broken)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = collected.len() + data.len();
        if total as u64 > limit {
            return Err(BodyError::TooLarge);
        }
        reservation.grow(data.len()).map_err(BodyError::Refused)?;
        collected.extend_from_slice(&data);
    }
    Ok(collected.freeze())
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
            let (app, rest) = split_app_path(&uri).unwrap();
            prop_assert!(!app.contains('/'));
            prop_assert!(rest.starts_with('/'));
        }
    }

    #[test]
    fn the_app_sees_the_path_below_its_mount_point() {
        let uri = "/apps/classify/v1/x?y=1".parse().unwrap();
        assert_eq!(
            split_app_path(&uri),
            Some(("classify", "/v1/x?y=1".to_string()))
        );
        let uri = "/apps/hello".parse().unwrap();
        assert_eq!(split_app_path(&uri), Some(("hello", "/".to_string())));
        let uri = "/apps/hello/".parse().unwrap();
        assert_eq!(split_app_path(&uri), Some(("hello", "/".to_string())));
    }
}
