//! What the node tells its operator about the work it does: Prometheus metrics
//! ([`metrics`]), per-app logs on disk ([`logs`]), metering per app and hour ([`usage`]),
//! trace spans exported over OTLP ([`otlp`]), and the request ids that tie a response, its
//! log lines and its trace together.
//!
//! Every request an app serves (from a client, another app or a job worker) goes through one
//! [`RequestObservation`], which records it once for all three.

pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod usage;

use crate::store::{Store, StoreError};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use logs::AppLogs;
use metrics::{Metrics, RequestLabels, RevisionLabels};
use serde::{Deserialize, Serialize};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use usage::{Meter, UsageRecord};

/// The header that carries a request's id, to the app and back to the client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// `[telemetry]`: what the node keeps of its apps' logs and usage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Log lines kept per app (its newest); older ones are deleted as new ones come.
    pub log_lines_per_app: usize,
    /// Hours of usage kept per app; older hours are deleted.
    pub usage_retention_hours: u64,
    /// How often usage counted in memory is written to the database, in seconds.
    pub usage_persist_secs: u64,
    /// An OpenTelemetry collector's OTLP/HTTP base URL (`http://collector:4318`): request
    /// spans are exported there. Unset: no export.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the spans carry.
    pub otlp_service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_lines_per_app: 10_000,
            usage_retention_hours: usage::DEFAULT_RETENTION_HOURS,
            usage_persist_secs: usage::DEFAULT_PERSIST_INTERVAL.as_secs(),
            otlp_endpoint: None,
            otlp_service_name: "tensorlet".into(),
        }
    }
}

impl TelemetryConfig {
    /// Checks the values, naming the key and the range it takes.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1_000_000).contains(&self.log_lines_per_app) {
            return Err("telemetry.log_lines_per_app must be 1–1000000".into());
        }
        if self.usage_retention_hours == 0 {
            return Err("telemetry.usage_retention_hours must be at least 1".into());
        }
        if !(1..=3600).contains(&self.usage_persist_secs) {
            return Err("telemetry.usage_persist_secs must be 1–3600".into());
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri: http::Uri = endpoint
                .parse()
                .map_err(|_| format!("telemetry.otlp_endpoint {endpoint:?} is not a URL"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!(
                    "telemetry.otlp_endpoint {endpoint:?} must be an http(s) URL"
                ));
            }
        }
        Ok(())
    }
}

/// The node's metrics, logs and meter.
pub struct Telemetry {
    pub metrics: Metrics,
    pub logs: AppLogs,
    pub meter: Meter,
    config: TelemetryConfig,
}

impl Telemetry {
    /// Opens the logs and the meter kept in `store`.
    pub fn open(store: &Store, config: &TelemetryConfig) -> Result<Self, StoreError> {
        let metrics = Metrics::new(store.flush_seconds());
        let logs = AppLogs::open(store, config.log_lines_per_app)?;
        metrics.register_collector(Box::new(LogsCollector(logs.clone())));
        Ok(Self {
            metrics,
            logs,
            meter: Meter::open(store)?,
            config: config.clone(),
        })
    }

    /// Writes usage to the database every `usage_persist_secs` (and prunes what is older than
    /// the retention once an hour) until `shutdown`, then once more.
    pub fn start_persisting(
        self: &Arc<Self>,
        store: Store,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let persist = usage::spawn_persist_loop(
            self.meter.clone(),
            store.clone(),
            Duration::from_secs(self.config.usage_persist_secs),
            shutdown.clone(),
        );
        let meter = self.meter.clone();
        let retention = self.config.usage_retention_hours;
        let prune = tokio::spawn(async move {
            let mut hourly = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = hourly.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                let now = usage::unix_hour(crate::store::unix_now());
                let meter = meter.clone();
                let pruned =
                    tokio::task::spawn_blocking(move || meter.prune(now.saturating_sub(retention)))
                        .await;
                match pruned {
                    Ok(Ok(0)) => {}
                    Ok(Ok(rows)) => {
                        tracing::info!(rows, "deleted usage older than the retention");
                        if let Err(error) = store.make_durable().await {
                            tracing::error!(%error, "flushing the pruned usage failed");
                        }
                    }
                    Ok(Err(error)) => tracing::error!(%error, "pruning usage failed"),
                    Err(error) => tracing::error!(%error, "pruning usage panicked"),
                }
            }
        });
        vec![persist, prune]
    }
}

/// Lines the per-app logs dropped (their queue was full, or the database refused them).
struct LogsCollector(AppLogs);

impl std::fmt::Debug for LogsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogsCollector")
    }
}

impl prometheus_client::collector::Collector for LogsCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let counter = prometheus_client::metrics::counter::ConstCounter::new(self.0.dropped());
        let metric = encoder.encode_descriptor(
            "log_lines_dropped",
            "App log lines dropped because the log writer was behind",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// What one instance of an app records as it runs: inference time and tokens per model, and
/// CPU time.
#[derive(Clone)]
pub struct AppMeter {
    telemetry: Arc<Telemetry>,
    /// What the usage is metered under (see [`crate::tenancy::scoped_name`]).
    subject: Arc<str>,
}

impl AppMeter {
    /// The meter of app `app` of `tenant`.
    pub fn new(telemetry: Arc<Telemetry>, tenant: &str, app: &str) -> Self {
        Self {
            telemetry,
            subject: crate::tenancy::scoped_name(tenant, app).into(),
        }
    }

    /// One compute on `model` ran for `elapsed` (whether it succeeded or not).
    pub fn model_computed(&self, model: &str, elapsed: Duration) {
        self.telemetry
            .meter
            .record(&self.subject, |usage: &mut UsageRecord| {
                *usage.inference_us.entry(model.to_string()).or_default() +=
                    elapsed.as_micros() as u64;
            });
        self.telemetry
            .metrics
            .model_compute
            .get_or_create(&metrics::ModelLabels {
                model: model.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// `model` processed these tokens.
    pub fn tokens(&self, model: &str, prompt: u64, completion: u64) {
        if prompt == 0 && completion == 0 {
            return;
        }
        self.telemetry.meter.record(&self.subject, |usage| {
            usage.prompt_tokens += prompt;
            usage.completion_tokens += completion;
        });
        let metrics = &self.telemetry.metrics;
        for (kind, tokens) in [("prompt", prompt), ("completion", completion)] {
            if tokens > 0 {
                metrics
                    .llm_tokens
                    .get_or_create(&metrics::TokenLabels {
                        model: model.to_string(),
                        kind,
                    })
                    .inc_by(tokens);
            }
        }
    }
}

impl AppMeter {
    /// An instance ran guest code for `cpu`.
    pub fn cpu_used(&self, cpu: Duration) {
        self.telemetry.meter.record(&self.subject, |usage| {
            usage.cpu_us += cpu.as_micros() as u64;
        });
    }
}

/// A request id a client may choose: 1–128 characters of `[A-Za-z0-9._:-]`. Anything else is
/// replaced by one the node makes, so ids are safe to log and to put in headers.
pub fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A fresh request id: 128 random bits in hex.
pub fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// One request to one revision of an app, from its admission until its response body ends.
pub struct RequestObservation {
    telemetry: Arc<Telemetry>,
    app: String,
    /// What its usage is metered under (see [`crate::tenancy::scoped_name`]).
    subject: String,
    revision: u32,
    started: Instant,
    bytes_in: u64,
    status: u16,
}

impl RequestObservation {
    /// A request with a body of `bytes_in` bytes.
    pub fn start(
        telemetry: Arc<Telemetry>,
        tenant: &str,
        app: &str,
        revision: u32,
        bytes_in: u64,
    ) -> Self {
        Self {
            telemetry,
            app: app.to_string(),
            subject: crate::tenancy::scoped_name(tenant, app),
            revision,
            started: Instant::now(),
            bytes_in,
            status: 0,
        }
    }

    /// Meters the request once it is over: its status class, its time from admission to the
    /// end of its response body, and its bytes.
    fn meter(&self, bytes_out: u64) {
        let status = self.status;
        let wall_us = self.started.elapsed().as_micros() as u64;
        self.telemetry.meter.record(&self.subject, |usage| {
            usage.requests += 1;
            match status {
                429 | 503 => usage.shed += 1,
                408 | 504 => usage.timeouts += 1,
                400..=499 => usage.errors_client += 1,
                500.. => usage.errors_server += 1,
                _ => {}
            }
            usage.wall_us += wall_us;
            usage.bytes_in += self.bytes_in;
            usage.bytes_out += bytes_out;
        });
    }

    fn record_head(&mut self, status: u16) {
        self.status = status;
        let metrics = &self.telemetry.metrics;
        metrics
            .requests
            .get_or_create(&RequestLabels {
                app: self.app.clone(),
                revision: self.revision.to_string(),
                class: metrics::status_class(status),
            })
            .inc();
        metrics
            .request_duration
            .get_or_create(&RevisionLabels {
                app: self.app.clone(),
                revision: self.revision.to_string(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// The request was answered by the node, not the app (an error): recorded now.
    pub fn refused(mut self, status: u16) {
        self.record_head(status);
        self.meter(0);
    }

    /// The app answered with `status`: recorded now, and its body is counted as it streams.
    pub fn answered<B>(mut self, status: u16, body: B) -> ObservedBody<B> {
        self.record_head(status);
        ObservedBody {
            body,
            observation: Some(self),
            bytes_out: 0,
        }
    }
}

/// A response body whose bytes are counted until it ends or its client goes away.
pub struct ObservedBody<B> {
    body: B,
    observation: Option<RequestObservation>,
    bytes_out: u64,
}

impl<B> ObservedBody<B> {
    fn finish(&mut self) {
        if let Some(observation) = self.observation.take() {
            observation.meter(self.bytes_out);
        }
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ObservedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_a_client_may_choose() {
        assert!(valid_request_id("abc-123_x.y:z"));
        assert!(valid_request_id(&new_request_id()));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id("line\nbreak"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }
}
