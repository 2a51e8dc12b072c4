//! The node's Prometheus metrics, served at `/metrics` in the text exposition format.
//!
//! Two kinds: what the request path records as it happens (request counts and latency per app
//! and revision, model compute time, LLM tokens, job outcomes, store flush latency), held in
//! the families below; and what is read off the node's own state at each scrape (instances,
//! queues, cold starts, LLM running and waiting, jobs queued), by collectors the modules that
//! own that state register, so no number is counted twice.
//!
//! Label values are app names, revision numbers and model names: the node bounds how many of
//! each exist, and a removed app's series are dropped ([`Metrics::forget_app`]), so a client
//! cannot grow the series without bound (unknown app names are never a label).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// The content type of the text exposition format, as Prometheus asks for it.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A request's app, revision and status class (`2xx` … `5xx`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub app: String,
    pub revision: String,
    pub class: &'static str,
}

/// An app's revision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    pub app: String,
    pub revision: String,
}

/// A model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

/// A model and a kind of token (`prompt` or `completion`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub kind: &'static str,
}

/// An app and how one of its async jobs' attempts ended (`completed`, `retried`, `dead`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub app: String,
    pub outcome: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms … 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The metrics the node records, and the registry that also holds the scrape-time collectors.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RevisionLabels>,
    pub model_compute: HistogramFamily<ModelLabels>,
    pub llm_tokens: Family<TokenLabels, Counter>,
    pub jobs: Family<JobLabels, Counter>,
}

impl Metrics {
    /// The node's metrics; `store_flush` is the store's own flush-latency histogram.
    pub fn new(store_flush: Histogram) -> Self {
        let mut registry = Registry::with_prefix("tensorlet");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by app, revision and status class",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RevisionLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from a request's admission to its response head, by app and revision",
            request_duration.clone(),
        );
        let model_compute: HistogramFamily<ModelLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "model_compute_seconds",
            "Time of one wasi-nn compute call, by model",
            model_compute.clone(),
        );
        let llm_tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "llm_tokens",
            "LLM tokens processed, by model and kind (prompt, completion)",
            llm_tokens.clone(),
        );
        let jobs = Family::<JobLabels, Counter>::default();
        registry.register(
            "job_attempts",
            "Async job attempts, by app and outcome (completed, retried, dead)",
            jobs.clone(),
        );
        registry.register(
            "store_flush_seconds",
            "Time of one flush of the node's database (group commit)",
            store_flush,
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            request_duration,
            model_compute,
            llm_tokens,
            jobs,
        }
    }

    /// Adds a collector whose metrics are read at each scrape.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry().register_collector(collector);
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every metric in the text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail, and the families encode without errors of their own.
        if prometheus_client::encoding::text::encode(&mut text, &self.registry()).is_err() {
            tracing::error!("encoding the metrics failed");
        }
        text
    }

    /// Drops every series of a removed app (its revisions' request counts and latencies, its
    /// jobs' outcomes).
    pub fn forget_app(&self, app: &str, revisions: impl IntoIterator<Item = u32>) {
        self.forget_revisions(app, revisions);
        for outcome in JOB_OUTCOMES {
            self.jobs.remove(&JobLabels {
                app: app.to_string(),
                outcome,
            });
        }
    }

    /// Drops the series of deleted revisions of `app`.
    pub fn forget_revisions(&self, app: &str, revisions: impl IntoIterator<Item = u32>) {
        for revision in revisions {
            let revision = revision.to_string();
            for class in STATUS_CLASSES {
                self.requests.remove(&RequestLabels {
                    app: app.to_string(),
                    revision: revision.clone(),
                    class,
                });
            }
            self.request_duration.remove(&RevisionLabels {
                app: app.to_string(),
                revision,
            });
        }
    }
}

/// Writes one metric family of `kind` (a counter or a gauge) whose series are `values`: what
/// the collectors that read state at scrape time write.
pub fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: Vec<(L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let series = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(series)?,
            _ => ConstGauge::new(value as i64).encode(series)?,
        }
    }
    Ok(())
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const JOB_OUTCOMES: [&str; 3] = ["completed", "retried", "dead"];

/// `2xx` for 200, and so on.
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES
        .get(usize::from(status / 100).saturating_sub(1))
        .copied()
        .unwrap_or("5xx")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_requests_appear_in_the_exposition_and_a_removed_app_leaves_it() {
        let metrics = Metrics::new(latency_histogram());
        let labels = RequestLabels {
            app: "hello".into(),
            revision: "2".into(),
            class: status_class(204),
        };
        metrics.requests.get_or_create(&labels).inc();
        metrics
            .request_duration
            .get_or_create(&RevisionLabels {
                app: "hello".into(),
                revision: "2".into(),
            })
            .observe(0.003);
        let text = metrics.encode();
        assert!(
            text.contains(r#"tensorlet_requests_total{app="hello",revision="2",class="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains("tensorlet_request_duration_seconds_bucket{"));
        metrics.forget_app("hello", [2]);
        assert!(!metrics.encode().contains(r#"app="hello""#));
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(999), "5xx");
    }
}
