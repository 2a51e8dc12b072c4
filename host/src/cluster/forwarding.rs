//! Forwarding: a request for an app that this node does not run (its placement selects other
//! nodes) or that finds this node saturated goes over mutual TLS to a peer that serves the
//! app, picked by the power of two choices on the load peers last reported. The request body
//! was read whole first (as for a request served here, so a slow client holds no peer's
//! instance); the response streams back as the peer sends it. The peer serves a forwarded
//! request itself, never forwarding it again, so a request makes at most one hop; the hop is
//! recorded in `tensorlet-forwarded-by` (to the peer) and `tensorlet-served-by` (to the
//! client).

use super::client;
use super::fleet::Fleet;
use super::Member;
use crate::runtime::Load;
use axum::body::Body;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use rand::seq::SliceRandom;
use std::time::Duration;

/// The node a forwarded request comes from, as the peer receives it.
pub const FORWARDED_BY: &str = "tensorlet-forwarded-by";
/// The node that served a response, as the client receives it.
pub const SERVED_BY: &str = "tensorlet-served-by";
/// Who the request comes from, for the peer's per-client rate limits.
pub const CLIENT: &str = "tensorlet-client";
/// How much longer than an app's own timeout and queue wait a forwarded request may take to
/// start answering (the hop, and a peer's cold start).
pub const GRACE: Duration = Duration::from_secs(10);
/// Peers tried for one request (the next only when the last could not take it).
const MAX_TRIES: usize = 3;

/// A request to forward: to app `app` (at `selector`, when given), path and query `path`
/// below its mount point.
pub struct Forward<'a> {
    pub app: &'a str,
    pub selector: Option<&'a str>,
    pub path: &'a str,
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The client's key for rate limits (its API key's id or its address).
    pub client: &'a str,
    /// How long the peer has to start answering.
    pub timeout: Duration,
}

/// Why no peer answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no other node of the cluster serves app {0:?} now")]
    NoPeer(String),
    /// No peer took the request: it did not run anywhere.
    #[error("node {peer} could not take the request for app {app:?}: {reason}")]
    NotTaken {
        peer: String,
        app: String,
        reason: String,
    },
    /// A peer took the request and failed before answering: it may have run.
    #[error("node {peer} took the request for app {app:?} but failed: {reason}")]
    Failed {
        peer: String,
        app: String,
        reason: String,
    },
}

impl ForwardError {
    /// Whether the request may have run on a peer (and so must not run again).
    pub fn may_have_run(&self) -> bool {
        matches!(self, ForwardError::Failed { .. })
    }
}

/// Headers that belong to one connection, not to the request or response.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// The order to try peers in: the less loaded of two picked at random first (the power of
/// two choices), then the rest at random; saturated peers last.
pub fn order(mut candidates: Vec<(Member, Load)>) -> Vec<Member> {
    candidates.shuffle(&mut rand::thread_rng());
    if candidates.len() >= 2 && candidates[1].1.per_slot() < candidates[0].1.per_slot() {
        candidates.swap(0, 1);
    }
    candidates.sort_by_key(|(_, load)| load.saturated());
    candidates.into_iter().map(|(member, _)| member).collect()
}

impl Fleet {
    /// Sends `request` to a peer that serves its app and returns the peer's response, its body
    /// streaming. A peer that cannot be reached, or that sheds the request before running it
    /// (503), makes way for the next.
    pub async fn forward(
        &self,
        request: Forward<'_>,
    ) -> Result<http::Response<Body>, ForwardError> {
        let peers = order(self.serving(request.app));
        if peers.is_empty() {
            return Err(ForwardError::NoPeer(request.app.to_string()));
        }
        let mount = match request.selector {
            Some(selector) => format!("{}@{selector}", request.app),
            None => request.app.to_string(),
        };
        let mut headers = request.headers.clone();
        strip_hop_by_hop(&mut headers);
        headers.insert(
            FORWARDED_BY,
            HeaderValue::from_str(self.clients.node_id()).expect("node ids are header values"),
        );
        if let Ok(client) = HeaderValue::from_str(request.client) {
            headers.insert(CLIENT, client);
        }
        let mut last_error = None;
        for peer in peers.iter().take(MAX_TRIES) {
            let Some(client) = self.clients.client(peer) else {
                continue;
            };
            let url = client::url(peer, &format!("/cluster/v1/invoke/{mount}{}", request.path));
            let sent = client
                .request(request.method.clone(), url)
                .headers(headers.clone())
                .body(request.body.clone())
                .timeout(request.timeout)
                .send()
                .await;
            let (peer_id, app) = (peer.id.clone(), request.app.to_string());
            let response = match sent {
                Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    last_error = Some(ForwardError::NotTaken {
                        peer: peer_id,
                        app,
                        reason: "it shed the request (503)".into(),
                    });
                    continue;
                }
                Ok(response) => response,
                Err(error) if error.is_connect() => {
                    last_error = Some(ForwardError::NotTaken {
                        peer: peer_id,
                        app,
                        reason: error.to_string(),
                    });
                    continue;
                }
                Err(error) => {
                    return Err(ForwardError::Failed {
                        peer: peer_id,
                        app,
                        reason: error.to_string(),
                    })
                }
            };
            return Ok(into_response(response, &peer.id));
        }
        Err(last_error.unwrap_or_else(|| ForwardError::NoPeer(request.app.to_string())))
    }
}

/// A peer's response as this node sends it on, marked with who served it.
fn into_response(response: reqwest::Response, peer: &str) -> http::Response<Body> {
    let status = response.status();
    let mut headers = response.headers().clone();
    strip_hop_by_hop(&mut headers);
    if let Ok(peer) = HeaderValue::from_str(peer) {
        headers.insert(SERVED_BY, peer);
    }
    let body = Body::from_stream(response.bytes_stream().map_err(std::io::Error::other));
    let mut forwarded = http::Response::new(body);
    *forwarded.status_mut() = status;
    *forwarded.headers_mut() = headers;
    forwarded
}

/// Drops the headers of one connection: those of [`is_hop_by_hop`] and those `Connection`
/// names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in hop.into_iter().chain(named) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            bump: 0,
            labels: Default::default(),
        }
    }

    fn load(running: usize, queued: usize) -> Load {
        Load {
            running,
            queued,
            max_running: 4,
            max_queued: 4,
        }
    }

    #[test]
    fn the_headers_of_one_connection_stay_behind() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn of_two_peers_the_less_loaded_goes_first_and_a_saturated_one_last() {
        for _ in 0..50 {
            let order = order(vec![
                (member("busy"), load(4, 2)),
                (member("idle"), load(0, 0)),
            ]);
            assert_eq!(order[0].id, "idle");
            let order = order_of_three();
            assert_eq!(order.last().unwrap().id, "full");
        }
    }

    fn order_of_three() -> Vec<Member> {
        order(vec![
            (member("full"), load(4, 4)),
            (member("a"), load(1, 0)),
            (member("b"), load(2, 0)),
        ])
    }
}
