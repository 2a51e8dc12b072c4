//! The path of one request through an app, the same for a client's request and for a call
//! from another app (`http://<app>.internal/`): the app's rate limits, the revision the
//! traffic split (or a tag, or a sticky key) picks, the response cache, admission (the
//! revision's gate, then the node's), a fresh instance, and the app's fallback when the
//! revision sheds load or fails.

use super::app::{App, Revision, RevisionConfig};
use super::cache;
use super::instance::{self, InvokeError, Launch};
use super::outgoing::OutgoingPolicy;
use super::Runtime;
use crate::apps::rate::Scope;
use crate::telemetry::RequestObservation;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// The body of every response the runtime serves: an instance's, a cached one, a fixed one.
pub type ServedBody = http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Which revision answered (`tensorlet-revision`).
pub const REVISION_HEADER: &str = "tensorlet-revision";
/// `hit` or `miss`, for apps with a response cache (`tensorlet-cache`).
pub const CACHE_HEADER: &str = "tensorlet-cache";
/// Why the app's fallback answered instead (`tensorlet-fallback`).
pub const FALLBACK_HEADER: &str = "tensorlet-fallback";

/// A request the app's limits let through, and where it goes.
pub struct Admitted {
    pub app: Arc<App>,
    /// The revision the request was routed to (its counters count the request).
    pub revision: Arc<Revision>,
    /// Set when the app sheds this request to its fallback revision (the reason).
    degraded: Option<&'static str>,
}

/// What [`Runtime::admit`] decided.
pub enum Decision {
    Serve(Admitted),
    /// The app is shedding load and its fallback is a fixed response.
    Degraded(http::Response<ServedBody>),
}

fn fixed(body: Bytes) -> ServedBody {
    Full::new(body)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn set_header(response: &mut http::Response<ServedBody>, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(name), value);
    }
}

/// The body of every error the node answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// What went wrong: a code a program can match on, and a message for a person.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ErrorDetail<'a> {
    /// E.g. `app_not_found`, `rate_limited`, `invalid_deployment`.
    code: &'a str,
    message: &'a str,
}

/// The JSON body of every error the node answers: `{"error": {"code", "message"}}`.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::to_string(&ErrorBody {
        error: ErrorDetail { code, message },
    })
    .expect("error bodies serialise")
}

/// An error as a response, for calls between apps (the API edge answers clients the same).
pub fn error_response(error: &InvokeError) -> http::Response<ServedBody> {
    let body = error_body(error.code(), &error.to_string());
    let mut response = http::Response::new(fixed(Bytes::from(body)));
    *response.status_mut() = error.status();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = error.retry_after_secs() {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, seconds.into());
    }
    response
}

/// Whether a request carries credentials: its answer is for its sender only, never cached.
fn has_credentials(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::AUTHORIZATION) || headers.contains_key(http::header::COOKIE)
}

impl Runtime {
    /// Looks `app` up, picks the revision — `selector` (a tag or number) when given, else the
    /// split, kept stable per client by the app's sticky header when the request has it —
    /// and applies the app's rate limits for `client`. Over the client's limit: 429. Over the
    /// app's: its fallback when it has one, else 429.
    pub fn admit(
        &self,
        app: &str,
        selector: Option<&str>,
        headers: &http::HeaderMap,
        client: &str,
    ) -> Result<Decision, InvokeError> {
        let app = self.app(app).ok_or_else(|| {
            InvokeError::NotFound(format!("no app named {app:?} is deployed on this node"))
        })?;
        let sticky = app
            .record
            .sticky_header
            .as_ref()
            .and_then(|name| headers.get(name.as_str()))
            .map(HeaderValue::as_bytes);
        let revision = app.route(selector, sticky)?;
        let Err(limited) = app.rate.check(client) else {
            return Ok(Decision::Serve(Admitted {
                app,
                revision,
                degraded: None,
            }));
        };
        let limited_error = InvokeError::RateLimited {
            reason: match limited.scope {
                Scope::Client => format!(
                    "this client is over app {:?}'s per-client rate limit",
                    app.record.name
                ),
                Scope::App => format!("app {:?} is over its rate limit", app.record.name),
            },
            retry_after_secs: limited.retry_after_secs(),
        };
        let fallback = match (limited.scope, &app.record.fallback) {
            (Scope::App, Some(fallback)) => fallback,
            _ => {
                self.observe(&app, &revision, 0)
                    .refused(limited_error.status().as_u16());
                return Err(limited_error);
            }
        };
        revision.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        let Some(number) = fallback.revision else {
            let response = fixed_fallback(&app, "rate_limited");
            let status = response.status().as_u16();
            let observation = self.observe(&app, &revision, 0);
            return Ok(Decision::Degraded(
                response.map(|body| observation.answered(status, body).boxed_unsync()),
            ));
        };
        let Some(target) = app.revisions.get(&number).cloned() else {
            self.observe(&app, &revision, 0)
                .refused(limited_error.status().as_u16());
            return Err(limited_error);
        };
        Ok(Decision::Serve(Admitted {
            app,
            revision: target,
            degraded: Some("rate_limited"),
        }))
    }

    /// Serves an admitted request: from the cache when the revision keeps one and has the
    /// answer, else in a fresh instance; on a failure or when shedding, by the app's fallback.
    /// `depth` counts the calls between apps that led here. The request is recorded (metrics,
    /// usage) under the revision it was routed to.
    pub async fn serve(
        &self,
        admitted: Admitted,
        request: http::Request<Full<Bytes>>,
        depth: u32,
    ) -> Result<http::Response<ServedBody>, InvokeError> {
        if !admitted.app.placed {
            return Err(InvokeError::NotPlaced(format!(
                "app {:?} runs on other nodes of the cluster (its placement does not select this one) and none of them took the request",
                admitted.app.record.name
            )));
        }
        let bytes_in = hyper::body::Body::size_hint(request.body()).lower();
        let observation = self.observe(&admitted.app, &admitted.revision, bytes_in);
        let span = tracing::info_span!(
            "app",
            app = %admitted.app.record.name,
            revision = admitted.revision.record.number,
            depth
        );
        match self
            .serve_observed(admitted, request, depth)
            .instrument(span)
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                Ok(response.map(|body| observation.answered(status, body).boxed_unsync()))
            }
            Err(error) => {
                observation.refused(error.status().as_u16());
                Err(error)
            }
        }
    }

    /// Starts recording a request to `revision`.
    pub fn observe(&self, app: &App, revision: &Revision, bytes_in: u64) -> RequestObservation {
        RequestObservation::start(
            self.resources.telemetry.clone(),
            &app.record.tenant,
            &app.record.name,
            revision.record.number,
            bytes_in,
        )
    }

    async fn serve_observed(
        &self,
        admitted: Admitted,
        request: http::Request<Full<Bytes>>,
        depth: u32,
    ) -> Result<http::Response<ServedBody>, InvokeError> {
        let Admitted {
            app,
            revision,
            degraded,
        } = admitted;
        let config = revision.config();
        let cache = revision
            .record
            .spec
            .cache
            .clone()
            .filter(|_| !has_credentials(request.headers()));
        let cache_key = match &cache {
            Some(_) if cache::request_allows_lookup(request.headers()) => {
                let body = request
                    .body()
                    .clone()
                    .collect()
                    .await
                    .map_or_else(|never| match never {}, |b| b.to_bytes());
                // The authority is part of the key: an app that writes its host into its
                // answer must not serve one client's forged Host to others.
                let target = format!(
                    "{}{}",
                    request.uri().authority().map_or("", |a| a.as_str()),
                    request.uri().path_and_query().map_or("/", |p| p.as_str())
                );
                Some(cache::key(
                    &format!("{}#{}", revision.cache_scope, config.generation),
                    revision.record.number,
                    request.method(),
                    &target,
                    &body,
                ))
            }
            _ => None,
        };
        if let Some(key) = &cache_key {
            if let Some(hit) = self.responses.lookup(key) {
                revision.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                let mut response = hit.map(fixed);
                set_header(
                    &mut response,
                    REVISION_HEADER,
                    revision.record.number.to_string(),
                );
                set_header(&mut response, CACHE_HEADER, "hit".into());
                if let Some(reason) = degraded {
                    set_header(&mut response, FALLBACK_HEADER, reason.into());
                }
                return Ok(response);
            }
        }
        if cache.is_some() {
            // A request that bypasses the cache (`Cache-Control: no-cache`) is a miss too.
            revision.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        let fallback_request = app
            .record
            .fallback
            .is_some()
            .then(|| clone_request(&request));
        let stored_headers = request.headers().clone();
        match self.run(&revision, config, request, depth).await {
            Ok(response) => {
                let ttl = match (&cache, cache_key) {
                    (Some(spec), Some(key)) if cache::request_allows_store(&stored_headers) => {
                        cache::storable_ttl(
                            response.status(),
                            response.headers(),
                            Duration::from_secs(spec.ttl_secs),
                        )
                        .map(|ttl| (key, ttl, spec.max_entry_bytes))
                    }
                    _ => None,
                };
                let mut response = match ttl {
                    Some((key, ttl, max_bytes)) => self
                        .responses
                        .capture(key, ttl, max_bytes, strip_node_headers(response))
                        .map(BodyExt::boxed_unsync),
                    None => strip_node_headers(response).map(BodyExt::boxed_unsync),
                };
                set_header(
                    &mut response,
                    REVISION_HEADER,
                    revision.record.number.to_string(),
                );
                if cache.is_some() {
                    set_header(&mut response, CACHE_HEADER, "miss".into());
                }
                if let Some(reason) = degraded {
                    set_header(&mut response, FALLBACK_HEADER, reason.into());
                }
                Ok(response)
            }
            Err(error) if degraded.is_none() && error.is_shedding_or_failure() => {
                let (Some(request), Some(fallback)) = (fallback_request, &app.record.fallback)
                else {
                    return Err(error);
                };
                revision.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(app = %app.record.name, revision = revision.record.number, %error, "serving the app's fallback");
                let Some(number) = fallback.revision else {
                    return Ok(fixed_fallback(&app, error.code()));
                };
                // A fallback to the revision that just failed would fail (or wait) again.
                let target = match app.revisions.get(&number) {
                    Some(target) if number != revision.record.number => target.clone(),
                    _ => return Err(error),
                };
                let code = error.code();
                let config = target.config();
                let response = self.run(&target, config, request, depth).await?;
                let mut response = strip_node_headers(response).map(BodyExt::boxed_unsync);
                set_header(&mut response, REVISION_HEADER, number.to_string());
                set_header(&mut response, FALLBACK_HEADER, code.into());
                Ok(response)
            }
            Err(error) => Err(error),
        }
    }

    /// Serves `request` on `app` as a client on this machine would be served: the entry of
    /// in-process callers (the benchmark).
    pub async fn invoke(
        &self,
        app: Arc<App>,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<ServedBody>, InvokeError> {
        match self.admit(&app.record.name, None, request.headers(), "local")? {
            Decision::Serve(admitted) => self.serve(admitted, request, 0).await,
            Decision::Degraded(response) => Ok(response),
        }
    }

    /// Runs `request` in a fresh instance of `revision`, once admitted to a slot. A call from
    /// another app (`depth` > 0) takes no slot of the node's: its caller holds one already,
    /// and a callee waiting for the slots its callers hold would wait for ever.
    async fn run(
        &self,
        revision: &Arc<Revision>,
        config: Arc<RevisionConfig>,
        request: http::Request<Full<Bytes>>,
        depth: u32,
    ) -> Result<http::Response<instance::InstanceBody>, InvokeError> {
        let slot = self
            .admission
            .slot(revision.gate.as_ref(), depth == 0)
            .await?;
        let pre = self.warm(revision).await?;
        let outgoing = OutgoingPolicy::new(
            self.this.get().cloned().unwrap_or_default(),
            super::outgoing::Caller {
                app: revision.record.app.clone(),
                tenant: revision.tenant.clone(),
            },
            revision.record.spec.allowed_hosts.clone(),
            depth,
            self.limits.max_call_depth,
            Duration::from_secs(revision.record.spec.timeout_secs),
            request
                .headers()
                .get(crate::telemetry::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        );
        let launch = Launch {
            pre,
            revision: revision.clone(),
            config: config.variables.clone(),
            outgoing,
        };
        instance::invoke(launch, &self.resources, request, slot).await
    }
}

/// A guest's response without the headers the node sets (`tensorlet-*`), which a guest must
/// not forge.
fn strip_node_headers<B>(mut response: http::Response<B>) -> http::Response<B> {
    for name in [REVISION_HEADER, CACHE_HEADER, FALLBACK_HEADER] {
        response.headers_mut().remove(name);
    }
    response
}

/// A copy of a buffered request, to run again on the fallback revision.
fn clone_request(request: &http::Request<Full<Bytes>>) -> http::Request<Full<Bytes>> {
    let mut copy = http::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// The app's fixed fallback response, marked with why it was served.
fn fixed_fallback(app: &App, reason: &str) -> http::Response<ServedBody> {
    let fallback = app.record.fallback.clone().unwrap_or_default();
    let mut response = http::Response::new(fixed(Bytes::from(fallback.body.unwrap_or_default())));
    *response.status_mut() =
        http::StatusCode::from_u16(fallback.status.unwrap_or(200)).unwrap_or(http::StatusCode::OK);
    if let Ok(value) = HeaderValue::try_from(
        fallback
            .content_type
            .unwrap_or_else(|| "text/plain; charset=utf-8".into()),
    ) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    set_header(&mut response, FALLBACK_HEADER, reason.to_string());
    response
}
