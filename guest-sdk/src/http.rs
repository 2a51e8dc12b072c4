//! HTTP for apps: read the whole request, return a whole response; call other apps and
//! services with a [`ClientRequest`].

use crate::bindings::exports::wasi::http::incoming_handler::{IncomingRequest, ResponseOutparam};
use crate::bindings::wasi::http::types::{Fields, Method, OutgoingBody, OutgoingResponse};
use crate::bindings::wasi::io::streams::{OutputStream, StreamError};
use serde::{de::DeserializeOwned, Serialize};

mod client;

pub use client::{get, ClientError, ClientRequest, ClientResponse, ErrorCode};

/// A request as the app sees it: the path is the part below the app's mount point.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, e.g. `/v1/items?limit=3`.
    pub path_with_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_with_query.split('?').next().unwrap_or("/")
    }

    /// The value of query parameter `name` (not percent-decoded).
    pub fn query(&self, name: &str) -> Option<&str> {
        let query = self.path_with_query.split_once('?')?.1;
        query
            .split('&')
            .find_map(|pair| match pair.split_once('=') {
                Some((key, value)) if key == name => Some(value),
                None if pair == name => Some(""),
                _ => None,
            })
    }

    /// The first value of header `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// The body parsed as JSON, or a 400 response saying why it is not what was expected.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Response> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Response::error(
                400,
                "invalid_json",
                &format!("the request body is not the JSON expected: {e}"),
            )
        })
    }
}

/// A response to send back: a body sent whole, then optionally a stream of chunks, each sent
/// to the client as soon as it is produced (server-sent events, token streaming).
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    stream: Option<Box<dyn Iterator<Item = Vec<u8>>>>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &self.body.len())
            .field("streaming", &self.stream.is_some())
            .finish()
    }
}

impl Response {
    /// A response with a body and no headers.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            stream: None,
        }
    }

    /// A response whose body is sent chunk by chunk as `chunks` yields them. If the client
    /// goes away, the iterator is dropped and the instance stops.
    pub fn stream(status: u16, chunks: impl Iterator<Item = Vec<u8>> + 'static) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            stream: Some(Box::new(chunks)),
        }
    }

    /// A `text/event-stream` response sending each item of `events` as one server-sent event
    /// (`data: …`).
    pub fn server_sent_events(events: impl Iterator<Item = String> + 'static) -> Self {
        Self::stream(
            200,
            events.map(|event| format!("data: {event}\n\n").into_bytes()),
        )
        .with_header("content-type", "text/event-stream")
        .with_header("cache-control", "no-cache")
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, body.into()).with_header("content-type", "text/plain; charset=utf-8")
    }

    /// An `application/json` response.
    pub fn json<T: Serialize>(status: u16, value: &T) -> Self {
        let body = serde_json::to_vec(value).expect("values serialise to JSON");
        Self::new(status, body).with_header("content-type", "application/json")
    }

    /// The platform's error shape: `{ "error": { "code": …, "message": … } }`.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        Self::json(
            status,
            &serde_json::json!({ "error": { "code": code, "message": message } }),
        )
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self
    }
}

/// Exports `$handler: fn(Request) -> Response` as the component's `wasi:http/incoming-handler`.
#[macro_export]
macro_rules! http_handler {
    ($handler:path) => {
        struct TensorletHttpHandler;

        impl $crate::bindings::exports::wasi::http::incoming_handler::Guest for TensorletHttpHandler {
            fn handle(
                request: $crate::bindings::exports::wasi::http::incoming_handler::IncomingRequest,
                response_out: $crate::bindings::exports::wasi::http::incoming_handler::ResponseOutparam,
            ) {
                $crate::http::serve(request, response_out, $handler)
            }
        }

        $crate::bindings::export_inference_app!(TensorletHttpHandler with_types_in $crate::bindings);
    };
}

fn method_name(method: Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other,
    }
}

fn read_request(request: IncomingRequest) -> Result<Request, String> {
    let method = method_name(request.method());
    let path_with_query = request.path_with_query().unwrap_or_else(|| "/".into());
    let headers = request.headers().entries();
    let incoming = request
        .consume()
        .map_err(|()| "the request body was already taken".to_string())?;
    let mut body = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|()| "the request body stream was already taken".to_string())?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(error)) => {
                    return Err(format!(
                        "reading the request body failed: {}",
                        error.to_debug_string()
                    ))
                }
            }
        }
    }
    Ok(Request {
        method,
        path_with_query,
        headers,
        body,
    })
}

/// Runs `handler` on an incoming request and sends its response; used by [`http_handler!`].
pub fn serve(
    request: IncomingRequest,
    response_out: ResponseOutparam,
    handler: impl FnOnce(Request) -> Response,
) {
    let response = match read_request(request) {
        Ok(request) => handler(request),
        Err(message) => Response::error(400, "bad_request", &message),
    };
    let headers = Fields::new();
    for (name, value) in &response.headers {
        // A header the host forbids (e.g. `connection`) is left out rather than failing the
        // whole response.
        let _ = headers.append(name, value);
    }
    let outgoing = OutgoingResponse::new(headers);
    let _ = outgoing.set_status_code(response.status);
    let body = outgoing.body().expect("a new response has a body");
    ResponseOutparam::set(response_out, Ok(outgoing));
    {
        let stream = body.write().expect("a new body has a stream");
        if write_all(&stream, &response.body).is_err() {
            return;
        }
        for chunk in response.stream.into_iter().flatten() {
            if write_all(&stream, &chunk).is_err() {
                return;
            }
        }
    }
    let _ = OutgoingBody::finish(body, None);
}

/// Writes `bytes` to `stream` and flushes it, in pieces of at most 4096 bytes: the most one
/// `blocking-write-and-flush` takes.
fn write_all(stream: &OutputStream, bytes: &[u8]) -> Result<(), StreamError> {
    bytes
        .chunks(4096)
        .try_for_each(|chunk| stream.blocking_write_and_flush(chunk))
}
