//! The runtime's state as Prometheus metrics, read at each scrape of `/metrics`: instances
//! running, requests queued (the node's and each revision's), each revision's warm and cold
//! starts, cache hits and fallbacks, and each LLM's running and waiting generations.

use super::Runtime;
use crate::telemetry::metrics::family;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::sync::atomic::Ordering;
use std::sync::Weak;

/// Reads a runtime's state; holds it weakly, so the metrics never keep a stopped node alive.
#[derive(Debug)]
pub struct RuntimeCollector(pub Weak<Runtime>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevisionLabels {
    app: String,
    revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenerationLabels {
    model: String,
    state: &'static str,
}

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(runtime) = self.0.upgrade() else {
            return Ok(());
        };
        for (name, help, value) in [
            (
                "instances_running",
                "Instances running now, on the whole node",
                runtime.running_instances(),
            ),
            (
                "requests_queued",
                "Requests waiting for a slot of the node's now",
                runtime.queued_requests(),
            ),
            (
                "instances_idle",
                "Instances kept between requests of apps that reuse them, on the whole node",
                runtime.resources.idle.kept(),
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(metric)?;
        }

        type Read = fn(&super::app::Revision) -> u64;
        let per_revision: [(&str, &str, MetricType, Read); 9] = [
            ("revision_instances_running", "Instances of the revision running now (revisions with max_concurrency)", MetricType::Gauge, |r| r.gate.as_ref().map_or(0, |g| g.running() as u64)),
            ("revision_requests_queued", "Requests waiting for the revision's max_concurrency now", MetricType::Gauge, |r| r.gate.as_ref().map_or(0, |g| g.queued() as u64)),
            ("revision_instances_idle", "Instances of the revision kept for its next requests now (requests_per_instance above 1)", MetricType::Gauge, |r| r.idle_count() as u64),
            ("instance_reuses", "Requests served by an instance an earlier request of the revision left", MetricType::Counter, |r| r.stats.instance_reuses.load(Ordering::Relaxed)),
            ("warm_starts", "Requests that found the revision's component prepared", MetricType::Counter, |r| r.stats.warm_starts.load(Ordering::Relaxed)),
            ("cold_starts", "Requests that prepared the revision's component first (after scaling to zero or a start)", MetricType::Counter, |r| r.stats.cold_starts.load(Ordering::Relaxed)),
            ("cache_hits", "Responses served from the revision's response cache", MetricType::Counter, |r| r.stats.cache_hits.load(Ordering::Relaxed)),
            ("cache_misses", "Cacheable requests the revision's cache did not answer", MetricType::Counter, |r| r.stats.cache_misses.load(Ordering::Relaxed)),
            ("fallbacks", "Requests the app's fallback answered instead of the revision", MetricType::Counter, |r| r.stats.fallbacks.load(Ordering::Relaxed)),
        ];
        let apps = runtime.apps();
        for (name, help, kind, read) in per_revision {
            let values = apps
                .iter()
                .flat_map(|app| app.revisions.values())
                .map(|revision| {
                    let labels = RevisionLabels {
                        app: revision.record.app.clone(),
                        revision: revision.record.number.to_string(),
                    };
                    (labels, read(revision))
                })
                .collect();
            family(&mut encoder, name, help, kind, values)?;
        }

        let generations = runtime
            .resources
            .models
            .list()
            .into_iter()
            .filter_map(|model| Some((model.record.name, model.generation?)))
            .flat_map(|(model, activity)| {
                [("running", activity.running), ("waiting", activity.waiting)].map(
                    |(state, count)| {
                        let labels = GenerationLabels {
                            model: model.clone(),
                            state,
                        };
                        (labels, u64::from(count))
                    },
                )
            })
            .collect();
        family(
            &mut encoder,
            "llm_generations",
            "LLM generations now, by model and state (running, waiting for a sequence)",
            MetricType::Gauge,
            generations,
        )
    }
}
