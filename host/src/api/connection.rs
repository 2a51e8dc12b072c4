//! One client connection, from accept to close, and the limits that keep a hostile or broken
//! client from holding the node: a cap on open connections (beyond it a new one is closed at
//! once), the TLS handshake timeout, HTTP/1 header and HTTP/2 stream limits, and a watchdog
//! that closes a connection that sits idle or stops reading its responses. Every limit is a
//! `[server]` key ([`ServerConfig`]).

use crate::config::ServerConfig;
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often a connection's watchdog looks at it: idle and write-stall closes happen at most
/// this late.
const WATCH_TICK: Duration = Duration::from_millis(500);

/// What the node's connections are doing, for `/v1/admin/status`.
pub struct ConnectionStats {
    max: u32,
    slots: Arc<Semaphore>,
    refused: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_closes: AtomicU64,
    write_stalls: AtomicU64,
}

impl ConnectionStats {
    /// Stats for a node that holds at most `max` connections.
    pub fn new(max: u32) -> Self {
        Self {
            max,
            slots: Arc::new(Semaphore::new(max as usize)),
            refused: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            idle_closes: AtomicU64::new(0),
            write_stalls: AtomicU64::new(0),
        }
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.max as usize - self.slots.available_permits()
    }

    /// The figures as JSON: open, max, and the connections closed by each limit since start.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "open": self.open(),
            "max": self.max,
            "refused_at_cap": self.refused.load(Ordering::Relaxed),
            "tls_handshake_timeouts": self.handshake_timeouts.load(Ordering::Relaxed),
            "idle_closed": self.idle_closes.load(Ordering::Relaxed),
            "write_stalled": self.write_stalls.load(Ordering::Relaxed),
        })
    }
}

/// Raises this process's soft open-file limit to its hard limit (as servers do) and returns
/// the soft limit in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Where a listener's TLS configuration comes from: asked at each new connection, so that a
/// certificate, CA or CRL loaded again applies from the next connection on.
pub trait TlsSource: Send + Sync + 'static {
    fn current(&self) -> Arc<rustls::ServerConfig>;
}

/// A configuration that never changes.
pub struct FixedTls(pub Arc<rustls::ServerConfig>);

impl TlsSource for FixedTls {
    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0.clone()
    }
}

/// The certificate a client presented in the TLS handshake (verified by the listener's
/// configuration), given to handlers as a request extension.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<rustls::pki_types::CertificateDer<'static>>);

/// Accepts connections on `listener` until the task is dropped; HTTPS when `tls` is given.
/// Each connection is served on its own task, HTTP/1.1 or HTTP/2.
pub async fn accept_loop(
    router: Router,
    listener: TcpListener,
    tls: Option<Arc<dyn TlsSource>>,
    limits: ServerConfig,
    stats: Arc<ConnectionStats>,
) {
    let http = Arc::new(http_builder(&limits));
    let limits = Arc::new(limits);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Running out of file descriptors is transient: back off instead of exiting.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // At the cap a new connection is closed at once: nothing waits in a queue for a slot.
        let Ok(slot) = stats.slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            peer,
            router: router.clone(),
            http: http.clone(),
            limits: limits.clone(),
            stats: stats.clone(),
            _slot: slot,
        };
        let acceptor = tls
            .as_ref()
            .map(|tls| tokio_rustls::TlsAcceptor::from(tls.current()));
        tokio::spawn(async move {
            connection.serve(tcp, acceptor).await;
            tracing::trace!(%peer, "connection closed");
        });
    }
}

/// The HTTP/1 and HTTP/2 settings every connection is served with.
fn http_builder(limits: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper turns its header timeout off unless a timer is set (above). It runs from the
        // moment the connection waits for a request head, so it also ends idle keep-alives.
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs))
        .max_buf_size(limits.max_header_bytes as usize)
        .max_headers(128);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes)
        .initial_stream_window_size(limits.http2_stream_window_bytes)
        .initial_connection_window_size(limits.http2_connection_window_bytes)
        .max_send_buf_size(limits.http2_stream_window_bytes as usize)
        .keep_alive_interval(Duration::from_secs(limits.http2_keep_alive_secs))
        .keep_alive_timeout(Duration::from_secs(limits.http2_keep_alive_secs));
    builder
}

/// One accepted connection and the slot it holds under the cap.
struct Connection {
    /// The client's address, given to handlers as `ConnectInfo` (per-client rate limits).
    peer: std::net::SocketAddr,
    router: Router,
    http: Arc<auto::Builder<TokioExecutor>>,
    limits: Arc<ServerConfig>,
    stats: Arc<ConnectionStats>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, acceptor: Option<tokio_rustls::TlsAcceptor>) {
        let activity = Arc::new(Activity::new());
        let tcp = Watched {
            inner: tcp,
            activity: activity.clone(),
        };
        match acceptor {
            Some(acceptor) => {
                let handshake = Duration::from_secs(self.limits.tls_handshake_timeout_secs);
                match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let peer_certificate = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|cert| PeerCertificate(Arc::new(cert.clone().into_owned())));
                        self.serve_http(stream, activity, peer_certificate).await
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => {
                        self.stats
                            .handshake_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            None => self.serve_http(tcp, activity, None).await,
        }
    }

    /// Serves HTTP on `io` while a watchdog closes it gracefully once no request has been in
    /// flight for the idle timeout, and at once when a response write has been stuck (the
    /// client does not read) for the write timeout.
    async fn serve_http<IO>(
        &self,
        io: IO,
        activity: Arc<Activity>,
        peer_certificate: Option<PeerCertificate>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        activity.mark();
        let router = self.router.clone();
        let requests = activity.clone();
        let peer = axum::extract::ConnectInfo(self.peer);
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(peer);
            if let Some(certificate) = &peer_certificate {
                request.extensions_mut().insert(certificate.clone());
            }
            let in_flight = InFlight::begin(requests.clone());
            let mut router = router.clone();
            async move {
                let response = tower_service::Service::call(&mut router, request).await;
                response.map(|response| response.map(|body| TrackedBody::new(body, in_flight)))
            }
        });
        let connection = self.http.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let idle_timeout = Duration::from_secs(self.limits.idle_timeout_secs);
        let write_timeout = Duration::from_secs(self.limits.write_timeout_secs);
        let mut closing_since: Option<Instant> = None;
        let mut watch = tokio::time::interval(WATCH_TICK);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    return;
                }
                _ = watch.tick() => {
                    if activity.write_stalled_for() > write_timeout
                        || activity.frame_stalled_for() > write_timeout
                    {
                        // Dropping the connection drops what it serves: instances, bodies.
                        self.stats.write_stalls.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    if closing_since.is_some_and(|since| since.elapsed() > write_timeout) {
                        return;
                    }
                    if closing_since.is_none() && activity.idle_for() > idle_timeout {
                        self.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
                        connection.as_mut().graceful_shutdown();
                        closing_since = Some(Instant::now());
                    }
                }
            }
        }
    }
}

/// What a connection is doing, shared by its socket, its requests and its watchdog. Times
/// are milliseconds since `epoch`.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When a request last started or ended (or the connection was established).
    last_change: AtomicU64,
    /// When the socket last refused a write for being full, plus one; 0 while writes pass.
    write_blocked_since: AtomicU64,
    /// Response frames handed to hyper and not yet followed by a poll for the next one, and
    /// when a response body was last polled. HTTP/2 stops polling a stream's body while the
    /// client grants it no window: the socket never fills, but the frame waits.
    frames_held: AtomicUsize,
    body_polled: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_change: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
            frames_held: AtomicUsize::new(0),
            body_polled: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn mark(&self) {
        self.last_change.store(self.now(), Ordering::Relaxed);
    }

    /// How long no request has been in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let since = self.last_change.load(Ordering::Relaxed);
        Duration::from_millis(self.now().saturating_sub(since))
    }

    /// How long the socket has refused writes (zero while they pass).
    fn write_stalled_for(&self) -> Duration {
        match self.write_blocked_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(self.now().saturating_sub(since - 1)),
        }
    }

    /// How long a response frame has waited for the connection to take it (zero while none
    /// waits).
    fn frame_stalled_for(&self) -> Duration {
        if self.frames_held.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        let since = self.body_polled.load(Ordering::Relaxed);
        Duration::from_millis(self.now().saturating_sub(since))
    }

    fn write_result<T>(&self, poll: Poll<T>) -> Poll<T> {
        if poll.is_pending() {
            if self.write_blocked_since.load(Ordering::Relaxed) == 0 {
                self.write_blocked_since
                    .store(self.now() + 1, Ordering::Relaxed);
            }
        } else {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        }
        poll
    }
}

/// A request in flight on a connection, from its head until its response body is done or
/// dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.mark();
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.mark();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until it is done or dropped,
/// and notes when a frame it handed out waits to be sent.
struct TrackedBody<B> {
    body: B,
    in_flight: InFlight,
    /// A frame was handed out and the body has not been polled since.
    holding_frame: bool,
}

impl<B> TrackedBody<B> {
    fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            in_flight,
            holding_frame: false,
        }
    }

    fn release_frame(&mut self) {
        if std::mem::take(&mut self.holding_frame) {
            self.in_flight.0.frames_held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<B> Drop for TrackedBody<B> {
    fn drop(&mut self) {
        self.release_frame();
    }
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let activity = &this.in_flight.0;
        activity
            .body_polled
            .store(activity.now(), Ordering::Relaxed);
        if std::mem::take(&mut this.holding_frame) {
            activity.frames_held.fetch_sub(1, Ordering::Relaxed);
        }
        let poll = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &poll {
            this.holding_frame = true;
            activity.frames_held.fetch_add(1, Ordering::Relaxed);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The TCP socket of a connection, noting when writes stall.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_result(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_result(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.activity.write_result(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
