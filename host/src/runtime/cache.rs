//! Response caching an app opts into: whole responses kept in memory, keyed by the app, its
//! revision and the request (method, path and query, body), and bounded by their total size.
//!
//! On the request path: [`request_allows_lookup`] → [`key`] → [`ResponseCache::lookup`]. On a
//! miss the app runs; [`storable_ttl`] decides from its status and headers whether, and for how
//! long, the response may be kept, and [`ResponseCache::capture`] wraps its body so that the
//! response is stored once it has streamed to the client in full.
//!
//! What is stored, as an operator would want it:
//! - Only `200 OK`. Error statuses (404 included) usually reflect passing state (a key not yet
//!   written, an overloaded backend) and caching them would pin the error for the TTL; `206`
//!   would need range handling; `203`/`204` are rare from apps and save little.
//! - Never a response that says `no-store`, `no-cache` or `private` (with or without field
//!   names), sets a cookie, or carries `Vary` at all: the key holds no request headers, so a
//!   response that varies on one could be served to the wrong client.
//! - `s-maxage` (or else `max-age`) can only shorten the app's TTL; `Expires` is ignored.
//! - A response whose `Cache-Control` is not readable text is not stored.
//!
//! Where work runs: lookups, inserts and moka's housekeeping (which runs inside those calls, a
//! bounded batch at a time) are short in-memory operations and run inline on the reactor.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, AGE, CACHE_CONTROL, PRAGMA, SET_COOKIE, VARY};
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use moka::sync::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Identifies one request to one revision of one app: a SHA-256 over its parts.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", hex::encode(self.0))
    }
}

/// The key of a request: SHA-256 over each part prefixed with its length, so that no two
/// different requests (`("ab", "c")` and `("a", "bc")` in adjacent parts) share a key.
///
/// The caller reads the whole request body before calling this; a new revision of the app
/// never sees the responses of the previous one.
pub fn key(
    app: &str,
    revision: u32,
    method: &Method,
    path_and_query: &str,
    body: &[u8],
) -> CacheKey {
    let mut hasher = Sha256::new();
    let revision = revision.to_be_bytes();
    for part in [
        app.as_bytes(),
        &revision,
        method.as_str().as_bytes(),
        path_and_query.as_bytes(),
        body,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    CacheKey(hasher.finalize().into())
}

/// Whether a cached response may answer a request: not when the client asks for a fresh one
/// (`Cache-Control: no-cache` or `no-store`, `Pragma: no-cache`) or sends a `Cache-Control`
/// that is not readable text.
pub fn request_allows_lookup(headers: &HeaderMap) -> bool {
    let Some(directives) = directives(headers) else {
        return false;
    };
    let pragma_no_cache = headers.get_all(PRAGMA).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case("no-cache"))
        })
    });
    !pragma_no_cache
        && !directives
            .iter()
            .any(|(name, _)| is_any(name, &["no-cache", "no-store"]))
}

/// Whether the response to a request may be stored: not when the client says `no-store` (its
/// request or the answer may be sensitive) or sends a `Cache-Control` that is not readable text.
pub fn request_allows_store(headers: &HeaderMap) -> bool {
    directives(headers).is_some_and(|directives| {
        !directives
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("no-store"))
    })
}

/// How long a response may be kept, given the app's configured TTL; `None` if it may not be
/// stored at all (see the module documentation for the rules). A TTL of zero is `None`.
pub fn storable_ttl(
    status: StatusCode,
    headers: &HeaderMap,
    app_ttl: Duration,
) -> Option<Duration> {
    if status != StatusCode::OK || headers.contains_key(SET_COOKIE) || headers.contains_key(VARY) {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for (name, argument) in directives(headers)? {
        if is_any(name, &["no-store", "no-cache", "private"]) {
            return None;
        } else if name.eq_ignore_ascii_case("max-age") {
            max_age = Some(seconds(argument)?);
        } else if name.eq_ignore_ascii_case("s-maxage") {
            s_maxage = Some(seconds(argument)?);
        }
    }
    // A shared cache obeys `s-maxage` over `max-age`; either can only shorten the app's TTL.
    let ttl = s_maxage
        .or(max_age)
        .map_or(app_ttl, |limit| limit.min(app_ttl));
    (!ttl.is_zero()).then_some(ttl)
}

/// The directives of every `Cache-Control` field, as (name, unquoted argument); `None` if a
/// field is not visible ASCII.
fn directives(headers: &HeaderMap) -> Option<Vec<(&str, Option<&str>)>> {
    let mut directives = Vec::new();
    for value in headers.get_all(CACHE_CONTROL) {
        for item in value.to_str().ok()?.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            directives.push(match item.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim().trim_matches('"'))),
                None => (item, None),
            });
        }
    }
    Some(directives)
}

fn is_any(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// A delta-seconds argument; `None` if missing or not a number. One too large to count is
/// treated as "very long" (RFC 9111, 1.2.2), so that the app's TTL applies.
fn seconds(argument: Option<&str>) -> Option<Duration> {
    let argument = argument.filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))?;
    Some(Duration::from_secs(argument.parse().unwrap_or(u64::MAX)))
}

/// A stored response, with when it was stored and for how long it may be served.
struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored_at: Instant,
    ttl: Duration,
}

impl Stored {
    /// What the entry counts against the cache's bound: body, headers and bookkeeping.
    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        let bookkeeping = size_of::<Stored>() + size_of::<CacheKey>();
        u32::try_from(bookkeeping + headers + self.body.len()).unwrap_or(u32::MAX)
    }
}

/// Lets moka drop each entry when its own TTL runs out, so that expired entries stop counting
/// against the bound even if nobody asks for them again.
struct EntryTtl;

impl Expiry<CacheKey, Arc<Stored>> for EntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Stored>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<Stored>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Cached responses of every app on the node, bounded by their total size in bytes. Clones
/// share the same entries.
#[derive(Clone)]
pub struct ResponseCache {
    entries: Cache<CacheKey, Arc<Stored>>,
}

impl ResponseCache {
    /// An empty cache that keeps at most `max_bytes` of responses (bodies, headers and a small
    /// per-entry overhead), evicting the least useful entries past that.
    pub fn new(max_bytes: u64) -> Self {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key, stored: &Arc<Stored>| stored.weight())
            .expire_after(EntryTtl)
            .build();
        Self { entries }
    }

    /// The stored response for `key`, rebuilt with its status, headers and body and an `Age`
    /// header (whole seconds since it was stored); `None` on a miss, expired entries included.
    pub fn lookup(&self, key: &CacheKey) -> Option<Response<Bytes>> {
        let stored = self.entries.get(key)?;
        // moka reads its own clock; checking here too keeps `Age` within the TTL exactly.
        let age = stored.stored_at.elapsed();
        if age >= stored.ttl {
            self.entries.invalidate(key);
            return None;
        }
        let mut response = Response::new(stored.body.clone());
        *response.status_mut() = stored.status;
        *response.headers_mut() = stored.headers.clone();
        response
            .headers_mut()
            .insert(AGE, HeaderValue::from(age.as_secs()));
        Some(response)
    }

    /// Wraps `response`'s body so that the response (its status and headers as they are now)
    /// is stored under `key` for `ttl` once the body has ended, if its data fit in
    /// `max_body_bytes`. Call it after [`storable_ttl`] allowed the response, and before adding
    /// headers that belong to this exchange only (a request id), which a hit would replay.
    pub fn capture<B>(
        &self,
        key: CacheKey,
        ttl: Duration,
        max_body_bytes: u64,
        response: Response<B>,
    ) -> Response<CachingBody<B>>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        let (parts, inner) = response.into_parts();
        let fits = inner.size_hint().lower() <= max_body_bytes;
        let mut body = CachingBody {
            pending: fits.then(|| Pending {
                cache: self.clone(),
                key,
                status: parts.status,
                headers: parts.headers.clone(),
                ttl,
                body: BytesMut::new(),
                max_body_bytes,
            }),
            inner,
        };
        // A body that is already over (an empty one) may never be polled.
        if body.inner.is_end_stream() {
            body.finish();
        }
        Response::from_parts(parts, body)
    }
}

/// A response on its way to the cache: what a hit will replay, and the body so far.
struct Pending {
    cache: ResponseCache,
    key: CacheKey,
    status: StatusCode,
    headers: HeaderMap,
    ttl: Duration,
    body: BytesMut,
    max_body_bytes: u64,
}

/// A response body that streams its frames through unchanged while copying its data aside,
/// and stores the whole response in the cache when it ends. Nothing is stored if the body
/// fails, is dropped before its end, grows past the cap, or sends trailers (a hit could not
/// replay them); the frames pass through all the same.
pub struct CachingBody<B> {
    inner: B,
    /// `None` once the response is stored or can no longer be.
    pending: Option<Pending>,
}

impl<B: Body<Data = Bytes> + Unpin> CachingBody<B> {
    /// Stores the response if it is still on its way.
    fn finish(&mut self) {
        if let Some(pending) = self.pending.take() {
            let stored = Stored {
                status: pending.status,
                headers: pending.headers,
                body: pending.body.freeze(),
                stored_at: Instant::now(),
                ttl: pending.ttl,
            };
            pending.cache.entries.insert(pending.key, Arc::new(stored));
        }
    }

    /// Copies a data frame aside, or gives up storing past the cap.
    fn copy(&mut self, data: &Bytes) {
        if let Some(pending) = &mut self.pending {
            if (pending.body.len() + data.len()) as u64 <= pending.max_body_bytes {
                pending.body.extend_from_slice(data);
            } else {
                self.pending = None;
            }
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CachingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => {
                    this.copy(data);
                    // hyper stops polling a body that says it is over after its last frame.
                    if this.inner.is_end_stream() {
                        this.finish();
                    }
                }
                None => this.pending = None,
            },
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.pending = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use proptest::prelude::*;
    use std::collections::VecDeque;

    const TTL: Duration = Duration::from_secs(60);

    /// A body that yields the frames it is given, one per poll, then ends.
    struct Scripted(VecDeque<Result<Frame<Bytes>, &'static str>>);

    impl Scripted {
        fn chunks(chunks: &[&'static str]) -> Self {
            Self(
                chunks
                    .iter()
                    .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                    .collect(),
            )
        }
    }

    impl Body for Scripted {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn response<B>(body: B) -> Response<B> {
        Response::builder()
            .header("content-type", "text/plain")
            .body(body)
            .unwrap()
    }

    fn some_key(path: &str) -> CacheKey {
        key("app", 1, &Method::GET, path, b"")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[tokio::test]
    async fn a_stored_response_is_a_hit() {
        let cache = ResponseCache::new(1 << 20);
        let k = some_key("/a");
        assert!(cache.lookup(&k).is_none());
        let sent = cache.capture(k, TTL, 1024, response(Scripted::chunks(&["hel", "lo"])));
        let streamed = sent.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(streamed, "hello");

        let hit = cache.lookup(&k).expect("stored");
        assert_eq!(hit.status(), StatusCode::OK);
        assert_eq!(hit.headers()["content-type"], "text/plain");
        let age: u64 = hit.headers()[AGE].to_str().unwrap().parse().unwrap();
        assert!(age < TTL.as_secs());
        assert_eq!(hit.body(), "hello");
        assert!(cache.lookup(&some_key("/b")).is_none());
    }

    #[tokio::test]
    async fn a_body_that_says_it_is_over_is_stored_without_a_final_poll() {
        let cache = ResponseCache::new(1 << 20);
        let (full, empty) = (some_key("/full"), some_key("/empty"));
        let mut body = cache
            .capture(full, TTL, 1024, response(Full::new(Bytes::from("x"))))
            .into_body();
        body.frame().await.unwrap().unwrap();
        assert!(body.is_end_stream());
        assert_eq!(cache.lookup(&full).unwrap().body(), "x");

        drop(cache.capture(empty, TTL, 1024, response(Full::new(Bytes::new()))));
        assert_eq!(cache.lookup(&empty).unwrap().body(), "");
    }

    #[tokio::test]
    async fn an_expired_entry_misses() {
        let cache = ResponseCache::new(1 << 20);
        let k = some_key("/a");
        let ttl = Duration::from_millis(1);
        let sent = cache.capture(k, ttl, 1024, response(Full::new(Bytes::from("x"))));
        sent.into_body().collect().await.unwrap();
        // Sleeping past the TTL can only make the entry more expired.
        std::thread::sleep(ttl * 20);
        assert!(cache.lookup(&k).is_none());
    }

    #[tokio::test]
    async fn a_body_past_the_cap_streams_intact_but_is_not_stored() {
        let cache = ResponseCache::new(1 << 20);
        let k = some_key("/a");
        let chunks = ["0123456789"; 5];
        let sent = cache.capture(k, TTL, 25, response(Scripted::chunks(&chunks)));
        let streamed = sent.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(streamed, chunks.concat());
        assert!(cache.lookup(&k).is_none());

        // Known to be too long up front: nothing is copied, nothing stored.
        let sent = cache.capture(k, TTL, 3, response(Full::new(Bytes::from("long"))));
        assert_eq!(sent.into_body().collect().await.unwrap().to_bytes(), "long");
        assert!(cache.lookup(&k).is_none());
    }

    #[tokio::test]
    async fn a_body_dropped_half_way_is_not_stored() {
        let cache = ResponseCache::new(1 << 20);
        let k = some_key("/a");
        let mut body = cache
            .capture(k, TTL, 1024, response(Scripted::chunks(&["a", "b"])))
            .into_body();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        drop(body);
        assert!(cache.lookup(&k).is_none());
    }

    #[tokio::test]
    async fn a_failing_body_is_not_stored() {
        let cache = ResponseCache::new(1 << 20);
        let k = some_key("/a");
        let frames = VecDeque::from([Ok(Frame::data(Bytes::from("a"))), Err("broken")]);
        let mut body = cache
            .capture(k, TTL, 1024, response(Scripted(frames)))
            .into_body();
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(body.frame().await.unwrap().unwrap_err(), "broken");
        // Even if the body then ends as if all were well.
        assert!(body.frame().await.is_none());
        assert!(cache.lookup(&k).is_none());
    }

    #[tokio::test]
    async fn trailers_pass_through_and_the_response_is_not_stored() {
        let cache = ResponseCache::new(1 << 20);
        let k = some_key("/a");
        let trailers = headers(&[("x-checksum", "1")]);
        let frames = VecDeque::from([
            Ok(Frame::data(Bytes::from("a"))),
            Ok(Frame::trailers(trailers.clone())),
        ]);
        let sent = cache.capture(k, TTL, 1024, response(Scripted(frames)));
        let collected = sent.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert!(cache.lookup(&k).is_none());
    }

    #[test]
    fn the_byte_bound_evicts() {
        let max_bytes = 64 * 1024;
        let cache = ResponseCache::new(max_bytes);
        let body = Bytes::from(vec![7u8; 1000]);
        for i in 0..1000 {
            let stored = Stored {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: body.clone(),
                stored_at: Instant::now(),
                ttl: TTL,
            };
            cache
                .entries
                .insert(some_key(&format!("/{i}")), Arc::new(stored));
        }
        cache.entries.run_pending_tasks();
        assert!(cache.entries.weighted_size() <= max_bytes);
        assert!(cache.entries.entry_count() > 0);
    }

    #[test]
    fn only_what_may_be_shared_is_stored() {
        let ok = StatusCode::OK;
        assert_eq!(storable_ttl(ok, &HeaderMap::new(), TTL), Some(TTL));
        for refused in [
            &[("cache-control", "no-store")][..],
            &[("cache-control", "public, No-Cache")],
            &[("cache-control", "private")],
            &[("cache-control", "private=\"x-user\"")],
            &[("cache-control", "max-age=0")],
            &[("cache-control", "max-age=soon")],
            &[
                ("cache-control", "max-age=60"),
                ("cache-control", "no-store"),
            ],
            &[("set-cookie", "session=1")],
            &[("vary", "*")],
            &[("vary", "accept-language")],
        ] {
            assert_eq!(
                storable_ttl(ok, &headers(refused), TTL),
                None,
                "{refused:?}"
            );
        }
        for status in [201, 203, 204, 206, 301, 404, 500] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                storable_ttl(status, &HeaderMap::new(), TTL),
                None,
                "{status}"
            );
        }
    }

    #[test]
    fn max_age_lowers_the_ttl_but_never_raises_it() {
        let ok = StatusCode::OK;
        let ttl = |pairs| storable_ttl(ok, &headers(pairs), TTL);
        let secs = Duration::from_secs;
        assert_eq!(
            ttl(&[("cache-control", "public, max-age=10")]),
            Some(secs(10))
        );
        assert_eq!(ttl(&[("cache-control", "max-age=\"10\"")]), Some(secs(10)));
        assert_eq!(ttl(&[("cache-control", "max-age=3600")]), Some(TTL));
        assert_eq!(
            ttl(&[("cache-control", "max-age=999999999999999999999999")]),
            Some(TTL)
        );
        assert_eq!(
            ttl(&[("cache-control", "max-age=10, s-maxage=20")]),
            Some(secs(20))
        );
        assert_eq!(
            ttl(&[("cache-control", "s-maxage=5, max-age=20")]),
            Some(secs(5))
        );
    }

    #[test]
    fn requests_can_ask_for_a_fresh_response() {
        assert!(request_allows_lookup(&HeaderMap::new()));
        assert!(request_allows_lookup(&headers(&[(
            "cache-control",
            "max-age=60"
        )])));
        for bypass in [
            &[("cache-control", "no-cache")][..],
            &[("cache-control", "max-age=0, NO-STORE")],
            &[("pragma", "no-cache")],
        ] {
            assert!(!request_allows_lookup(&headers(bypass)), "{bypass:?}");
        }
        assert!(request_allows_store(&headers(&[(
            "cache-control",
            "no-cache"
        )])));
        assert!(!request_allows_store(&headers(&[(
            "cache-control",
            "no-store"
        )])));
    }

    #[test]
    fn keys_differ_in_every_part() {
        let base = key("app", 1, &Method::POST, "/v1/run?x=1", b"{}");
        for other in [
            key("app2", 1, &Method::POST, "/v1/run?x=1", b"{}"),
            key("app", 2, &Method::POST, "/v1/run?x=1", b"{}"),
            key("app", 1, &Method::PUT, "/v1/run?x=1", b"{}"),
            key("app", 1, &Method::POST, "/v1/run?x=2", b"{}"),
            key("app", 1, &Method::POST, "/v1/run?x=1", b"{ }"),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(base, key("app", 1, &Method::POST, "/v1/run?x=1", b"{}"));
        assert_ne!(
            key("app", 1, &Method::GET, "ab", b"c"),
            key("app", 1, &Method::GET, "a", b"bc")
        );
    }

    proptest! {
        #[test]
        fn moving_bytes_between_parts_changes_the_key(
            text in "[a-z/?=]{0,24}",
            first in 0usize..=24,
            second in 0usize..=24,
        ) {
            let (first, second) = (first.min(text.len()), second.min(text.len()));
            prop_assume!(first != second);
            let split = |at: usize| text.split_at(at);
            let ((a1, b1), (a2, b2)) = (split(first), split(second));
            let get = Method::GET;
            prop_assert_ne!(key(a1, 0, &get, b1, b""), key(a2, 0, &get, b2, b""));
            prop_assert_ne!(
                key("app", 0, &get, a1, b1.as_bytes()),
                key("app", 0, &get, a2, b2.as_bytes())
            );
        }
    }
}
