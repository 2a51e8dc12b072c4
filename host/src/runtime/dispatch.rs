//! The path of one request through an app, the same for a client's request and for a call
//! from another app (`http://<app>.internal/`): the app's rate limits, the revision the
//! traffic split (or a tag, or a sticky key) picks, the response cache, admission (the
//! revision's gate, then the node's), a fresh instance, and the app's fallback when the
//! revision sheds load or fails.

use super::app::{App, Revision};
use super::cache;
use super::instance::{self, InvokeError, Launch};
use super::outgoing::OutgoingPolicy;
use super::Runtime;
use crate::apps::rate::Scope;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi_config::WasiConfigVariables;

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
    pub revision: Arc<Revision>,
    /// Set when the app sheds this request to its fallback revision (the reason).
    degraded: Option<&'static str>,
}

/// What [`Runtime::admit`] decided.
pub enum Admission {
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

/// A JSON error response, as the API edge answers it, for calls between apps.
pub fn error_response(error: &InvokeError) -> http::Response<ServedBody> {
    let body =
        serde_json::json!({ "error": { "code": error.code(), "message": error.to_string() } });
    let mut response = http::Response::new(fixed(Bytes::from(body.to_string())));
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

impl Runtime {
    /// Looks `app` up and applies its rate limits for `client`, then picks the revision:
    /// `selector` (a tag or number) when given, else the split, kept stable per client by the
    /// app's sticky header when the request has it. Over the client's limit: 429. Over the
    /// app's: its fallback when it has one, else 429.
    pub fn admit(
        &self,
        app: &str,
        selector: Option<&str>,
        headers: &http::HeaderMap,
        client: &str,
    ) -> Result<Admission, InvokeError> {
        let app = self.app(app).ok_or_else(|| {
            InvokeError::NotFound(format!("no app named {app:?} is deployed on this node"))
        })?;
        let mut degraded = None;
        if let Err(limited) = app.rate.check(client) {
            let error = InvokeError::RateLimited {
                reason: match limited.scope {
                    Scope::Client => format!(
                        "this client is over app {:?}'s per-client rate limit",
                        app.record.name
                    ),
                    Scope::App => format!("app {:?} is over its rate limit", app.record.name),
                },
                retry_after_secs: limited.retry_after_secs(),
            };
            match (&limited.scope, &app.record.fallback) {
                (Scope::App, Some(fallback)) => match fallback.revision {
                    Some(_) => degraded = Some("rate_limited"),
                    None => {
                        let revision = app.revisions.get(&app.record.latest).cloned();
                        if let Some(revision) = revision {
                            revision.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(Admission::Degraded(fixed_fallback(&app, "rate_limited")));
                    }
                },
                _ => return Err(error),
            }
        }
        let revision = match (
            degraded,
            app.record.fallback.as_ref().and_then(|f| f.revision),
        ) {
            (Some(_), Some(number)) => app.revisions.get(&number).cloned().ok_or_else(|| {
                InvokeError::NotFound(format!(
                    "app {:?} has no revision {number}",
                    app.record.name
                ))
            })?,
            _ => {
                let sticky = app
                    .record
                    .sticky_header
                    .as_ref()
                    .and_then(|name| headers.get(name.as_str()))
                    .map(HeaderValue::as_bytes);
                app.route(selector, sticky)?
            }
        };
        Ok(Admission::Serve(Admitted {
            app,
            revision,
            degraded,
        }))
    }

    /// Serves an admitted request: from the cache when the revision keeps one and has the
    /// answer, else in a fresh instance; on a failure or when shedding, by the app's fallback.
    /// `depth` counts the calls between apps that led here.
    pub async fn serve(
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
        let cache = revision.record.spec.cache.clone();
        let cache_key = match &cache {
            Some(_) if cache::request_allows_lookup(request.headers()) => {
                let body = request
                    .body()
                    .clone()
                    .collect()
                    .await
                    .map_or_else(|never| match never {}, |b| b.to_bytes());
                let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
                Some(cache::key(
                    &revision.cache_scope,
                    revision.record.number,
                    request.method(),
                    path,
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
        match self.run(&revision, request, depth).await {
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
                        .capture(key, ttl, max_bytes, response)
                        .map(BodyExt::boxed_unsync),
                    None => response.map(BodyExt::boxed_unsync),
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
                    revision.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    set_header(&mut response, FALLBACK_HEADER, reason.into());
                }
                Ok(response)
            }
            Err(error) if degraded.is_none() && error.is_shedding_or_failure() => {
                let Some(request) = fallback_request else {
                    return Err(error);
                };
                let fallback = app.record.fallback.as_ref().expect("checked above");
                revision.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(app = %app.record.name, revision = revision.record.number, %error, "serving the app's fallback");
                let Some(number) = fallback.revision else {
                    return Ok(fixed_fallback(&app, error.code()));
                };
                let Some(target) = app.revisions.get(&number).cloned() else {
                    return Err(error);
                };
                let code = error.code();
                let mut response = self
                    .run(&target, request, depth)
                    .await?
                    .map(BodyExt::boxed_unsync);
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
            Admission::Serve(admitted) => self.serve(admitted, request, 0).await,
            Admission::Degraded(response) => Ok(response),
        }
    }

    /// Runs `request` in a fresh instance of `revision`, once admitted to a slot.
    async fn run(
        &self,
        revision: &Arc<Revision>,
        request: http::Request<Full<Bytes>>,
        depth: u32,
    ) -> Result<http::Response<instance::InstanceBody>, InvokeError> {
        let slot = self.admission.slot(revision.gate.as_ref()).await?;
        let pre = self.warm(revision).await?;
        let config: WasiConfigVariables = revision
            .record
            .spec
            .config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(
                self.secrets_of(&revision.record.app)
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .collect();
        let outgoing = OutgoingPolicy::new(
            self.this.get().cloned().unwrap_or_default(),
            revision.record.app.clone(),
            revision.record.spec.allowed_hosts.clone(),
            depth,
            self.limits.max_call_depth,
            Duration::from_secs(revision.record.spec.timeout_secs),
        );
        let launch = Launch {
            pre,
            revision: revision.clone(),
            config,
            outgoing,
        };
        instance::invoke(launch, &self.resources, request, slot).await
    }
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
