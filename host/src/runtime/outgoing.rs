//! Outgoing HTTP from an instance (`wasi:http/outgoing-handler`): a request to
//! `http://<app>.internal/…` is served by that app on this node, through the same path as a
//! client's request (its rate limits, revisions, limits, cache), without the network; a
//! request to a host the revision's `[outbound] allowed_hosts` names goes out, within the
//! revision's timeout; anything else is denied.

use super::admission::{read_body, BodyError};
use super::dispatch::{self, Decision};
use super::InvokeError;
use super::Runtime;
use crate::apps::outbound::{self, Destination};
use crate::telemetry::{valid_request_id, REQUEST_ID_HEADER};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::future::Future;
use std::sync::Weak;
use std::time::Duration;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// The outgoing calls one instance may make.
pub struct OutgoingPolicy {
    runtime: Weak<Runtime>,
    caller: Caller,
    allowed_hosts: Vec<String>,
    /// Calls between apps that led to this instance.
    depth: u32,
    max_depth: u32,
    /// The longest an outside call may wait to connect, for its first byte, between bytes.
    timeout: Duration,
    /// The id of the request the instance serves: calls to other apps carry it unless the
    /// guest set a valid one itself, so one id ties a pipeline's log lines together.
    request_id: String,
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

/// The app an instance runs for.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// Its name, the client key its calls to other apps are rate-limited under.
    pub app: String,
    /// Its tenant: it may call that tenant's apps and public ones.
    pub tenant: String,
}

impl OutgoingPolicy {
    /// The calls an instance of app `caller` may make: to `allowed_hosts`, at call depth
    /// `depth` (of at most `max_depth`), outside calls waiting at most `timeout` at each step.
    pub fn new(
        runtime: Weak<Runtime>,
        caller: Caller,
        allowed_hosts: Vec<String>,
        depth: u32,
        max_depth: u32,
        timeout: Duration,
        request_id: String,
    ) -> Self {
        Self {
            runtime,
            caller,
            allowed_hosts,
            depth,
            max_depth,
            timeout,
            request_id,
        }
    }

    /// The runtime the instance runs on (none for a policy that allows nothing).
    pub fn runtime(&self) -> Weak<Runtime> {
        self.runtime.clone()
    }

    /// A policy that allows nothing.
    pub fn denied() -> Self {
        Self::new(
            Weak::new(),
            Caller::default(),
            Vec::new(),
            0,
            0,
            Duration::ZERO,
            String::new(),
        )
    }
}

fn done() -> Box<dyn Future<Output = Result<(), Error>> + Send> {
    Box::new(async { Ok(()) })
}

impl WasiHttpHooks for OutgoingPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        let scheme = request.uri().scheme_str().unwrap_or("https").to_string();
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        match outbound::destination(&self.allowed_hosts, &scheme, &authority) {
            Destination::Denied => Box::new(async { Err(Error::HttpRequestDenied) }),
            Destination::Network => {
                let cap = |wanted: Option<Duration>| {
                    Some(wanted.map_or(self.timeout, |w| w.min(self.timeout)))
                };
                let options = options.unwrap_or_default();
                let options = RequestOptions {
                    connect_timeout: cap(options.connect_timeout),
                    first_byte_timeout: cap(options.first_byte_timeout),
                    between_bytes_timeout: cap(options.between_bytes_timeout),
                };
                Box::new(async move {
                    let (response, io) =
                        wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
                    Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as Box<_>))
                })
            }
            Destination::App(app) => {
                let runtime = self.runtime.clone();
                let caller = self.caller.clone();
                let depth = self.depth + 1;
                let max_depth = self.max_depth;
                let mut request = request;
                let guest_set_one = request
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(valid_request_id);
                if !guest_set_one {
                    if let Ok(id) = http::HeaderValue::try_from(self.request_id.as_str()) {
                        request.headers_mut().insert(REQUEST_ID_HEADER, id);
                    }
                }
                Box::new(async move {
                    let Some(runtime) = runtime.upgrade() else {
                        return Err(Error::HttpRequestDenied);
                    };
                    let response = if depth > max_depth {
                        dispatch::error_response(&InvokeError::TooDeep(depth))
                    } else {
                        call_app(&runtime, &app, request, &caller, depth).await
                    };
                    Ok((response, done()))
                })
            }
        }
    }
}

/// Serves a request from one app to `app` as a client's request would be, its errors as
/// responses (a 503 of the callee is the caller's to handle, as over the network).
async fn call_app(
    runtime: &Runtime,
    app: &str,
    request: http::Request<WasiBody>,
    caller: &Caller,
    depth: u32,
) -> http::Response<WasiBody> {
    let (mut parts, body) = request.into_parts();
    super::queue::strip_queue_headers(&mut parts.headers);
    // Another tenant's private app is not there for this caller.
    let reachable = runtime
        .app(app)
        .is_some_and(|callee| callee.record.public || callee.record.tenant == caller.tenant);
    if !reachable {
        let error = InvokeError::NotFound(format!(
            "no app named {app:?} this app may call is deployed on this node"
        ));
        return dispatch::error_response(&error);
    }
    let client = format!("app:{}", caller.app);
    let admitted = match runtime.admit(app, None, &parts.headers, &client) {
        Ok(Decision::Serve(admitted)) => admitted,
        Ok(Decision::Degraded(response)) => return response,
        Err(error) => return dispatch::error_response(&error),
    };
    // Bounded like a client's body: the callee's limit, and the node's budget for bodies in
    // memory, which the body holds until the call is answered.
    let limit = admitted.revision.record.spec.max_body_bytes;
    let mut reservation = runtime.body_reservation();
    let body = match read_body(body, limit, 0, &mut reservation).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let error = InvokeError::TooLarge(format!(
                "the request body is larger than app {app:?} accepts ({limit} bytes)"
            ));
            return dispatch::error_response(&error);
        }
        Err(BodyError::Refused(error)) => return dispatch::error_response(&error),
        Err(BodyError::Broken(error)) => {
            let error = InvokeError::AppError(format!(
                "the request body to app {app:?} could not be read: {error}"
            ));
            return dispatch::error_response(&error);
        }
    };
    let request = http::Request::from_parts(parts, Full::<Bytes>::new(body));
    let response = runtime.serve(admitted, request, depth).await;
    drop(reservation);
    match response {
        Ok(response) => response,
        Err(error) => dispatch::error_response(&error),
    }
}
