//! Outgoing requests through `wasi:http/outgoing-handler`: a blocking client that sends a
//! whole body and reads the whole response.
//!
//! The node lets an app reach only the hosts its manifest allows (`[outbound] allowed_hosts`);
//! `http://<app>.internal/<path>` is another app on the same node, reached without the
//! network. See `wit/README.md`.

use super::{write_all, Response};
use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    self, Fields, FutureIncomingResponse, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;
use serde::{de::DeserializeOwned, Serialize};

pub use types::ErrorCode;

/// A request to send to another app or service, built like a [`Response`]:
///
/// ```ignore
/// use tensorlet_sdk::http::ClientRequest;
///
/// let response = ClientRequest::post("http://embeddings.internal/v1/embeddings")
///     .with_json(&serde_json::json!({ "model": "minilm", "input": ["hello"] }))
///     .send()?;
/// ```
#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub method: String,
    /// An absolute `http://` or `https://` URL: scheme, host (and port), path and query.
    pub url: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// The response to a [`ClientRequest`], read whole.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// A request that got no response (or a response that could not be read), with the
/// `wasi:http` error code when the host gave one, e.g. `HttpRequestDenied` for a host the app
/// may not reach or `ConnectionRefused`.
#[derive(Debug, Clone)]
pub struct ClientError {
    pub code: Option<ErrorCode>,
    /// What failed, naming the request and the error code.
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}

/// Sends `GET url` and reads the whole response.
pub fn get(url: &str) -> Result<ClientResponse, ClientError> {
    ClientRequest::get(url).send()
}

impl ClientRequest {
    /// A request with no headers and no body.
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            method: method.to_string(),
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `GET` request.
    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` request; give it a body with [`Self::with_body`] or [`Self::with_json`].
    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    /// Sets the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the body to `value` as JSON, with `content-type: application/json`.
    pub fn with_json<T: Serialize>(self, value: &T) -> Self {
        let body = serde_json::to_vec(value).expect("values serialise to JSON");
        self.with_header("content-type", "application/json")
            .with_body(body)
    }

    /// Sends the request and waits for the whole response. This blocks the instance (not the
    /// node) until the response has arrived or failed; the app's request timeout bounds it.
    pub fn send(self) -> Result<ClientResponse, ClientError> {
        let fail = |code: Option<ErrorCode>, what: &str| ClientError {
            message: match &code {
                Some(code) => format!("{} {}: {what}: {}", self.method, self.url, code_name(code)),
                None => format!("{} {}: {what}", self.method, self.url),
            },
            code,
        };
        let target = Target::parse(&self.url).map_err(|why| fail(None, &why))?;

        let headers = Fields::new();
        for (name, value) in &self.headers {
            headers
                .append(name, value)
                .map_err(|e| fail(None, &format!("header {name:?} is not allowed: {e:?}")))?;
        }
        let has_body = !self.body.is_empty();
        if has_body
            && !self
                .headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        {
            // A known length spares the receiver a chunked body.
            let length = self.body.len().to_string();
            headers
                .append("content-length", length.as_bytes())
                .map_err(|e| fail(None, &format!("setting content-length failed: {e:?}")))?;
        }

        let request = OutgoingRequest::new(headers);
        request
            .set_method(&method(&self.method))
            .map_err(|()| fail(None, "the method is not valid"))?;
        request
            .set_scheme(Some(&target.scheme))
            .map_err(|()| fail(None, "the scheme is not valid"))?;
        request
            .set_authority(Some(&target.authority))
            .map_err(|()| fail(None, "the host is not valid"))?;
        request
            .set_path_with_query(Some(&target.path_with_query))
            .map_err(|()| fail(None, "the path is not valid"))?;
        // Without a body the host sends none; with one, its stream is written after `handle`,
        // while the host is already sending, so a body of any size flows through.
        let body = has_body.then(|| request.body().expect("a new request has a body"));

        let future = outgoing_handler::handle(request, None)
            .map_err(|code| fail(Some(code), "the request was refused"))?;
        let written = match body {
            Some(body) => write_body(body, &self.body),
            None => Ok(()),
        };
        // When writing failed, the response (or its error) usually says why.
        let response = match (wait(&future), written) {
            (Ok(response), Ok(())) => response,
            (Err(code), _) => return Err(fail(Some(code), "the request failed")),
            (Ok(_), Err(code)) => return Err(fail(code, "sending the body failed")),
        };
        read_response(response).map_err(|code| fail(code, "reading the response failed"))
    }
}

impl ClientResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError {
            code: None,
            message: format!(
                "the response (status {}) is not the JSON expected: {e}",
                self.status
            ),
        })
    }
}

/// Passes a response on unchanged, e.g. to proxy another app.
impl From<ClientResponse> for Response {
    fn from(response: ClientResponse) -> Self {
        let mut forwarded = Response::new(response.status, response.body);
        forwarded.headers = response.headers;
        forwarded
    }
}

/// The error code as its Rust name, e.g. `HttpRequestDenied` or `InternalError(Some("…"))`.
fn code_name(code: &ErrorCode) -> String {
    let name = format!("{code:?}");
    name.strip_prefix("ErrorCode::")
        .map(str::to_string)
        .unwrap_or(name)
}

fn method(name: &str) -> Method {
    match name.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        _ => Method::Other(name.to_string()),
    }
}

/// Where a URL points, in the parts `outgoing-request` takes.
struct Target {
    scheme: Scheme,
    authority: String,
    path_with_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("the URL has no scheme (http:// or https://)")?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => Scheme::Other(other.to_string()),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if authority.is_empty() {
            return Err("the URL has no host".into());
        }
        if authority.contains('@') {
            return Err("credentials in the URL are not supported; send a header".into());
        }
        let path_with_query = match path {
            "" => "/".to_string(),
            query if query.starts_with('?') => format!("/{query}"),
            path => path.to_string(),
        };
        Ok(Self {
            scheme,
            authority: authority.to_string(),
            path_with_query,
        })
    }
}

/// Writes `bytes` as the whole body and finishes it; the error is the host's code when it
/// gave one.
fn write_body(body: OutgoingBody, bytes: &[u8]) -> Result<(), Option<ErrorCode>> {
    {
        let stream = body.write().map_err(|()| None)?;
        write_all(&stream, bytes).map_err(|error| stream_error_code(&error))?;
        // The stream is a child of the body: it goes before the body is finished.
    }
    OutgoingBody::finish(body, None).map_err(Some)
}

/// Blocks until the response has arrived or failed.
fn wait(future: &FutureIncomingResponse) -> Result<IncomingResponse, ErrorCode> {
    let ready = future.subscribe();
    loop {
        match future.get() {
            Some(Ok(result)) => return result,
            Some(Err(())) => unreachable!("a response is taken once"),
            None => ready.block(),
        }
    }
}

fn read_response(response: IncomingResponse) -> Result<ClientResponse, Option<ErrorCode>> {
    let status = response.status();
    let headers = response.headers().entries();
    let incoming = response.consume().map_err(|()| None)?;
    let mut body = Vec::new();
    {
        let stream = incoming.stream().map_err(|()| None)?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(error) => return Err(stream_error_code(&error)),
            }
        }
    }
    Ok(ClientResponse {
        status,
        headers,
        body,
    })
}

fn stream_error_code(error: &StreamError) -> Option<ErrorCode> {
    match error {
        StreamError::LastOperationFailed(error) => Some(
            types::http_error_code(error)
                .unwrap_or_else(|| ErrorCode::InternalError(Some(error.to_debug_string()))),
        ),
        StreamError::Closed => None,
    }
}
