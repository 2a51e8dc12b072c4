//! The job queue's depth as Prometheus metrics, read at each scrape: jobs queued, running and
//! dead, and completed ones kept, per app.

use super::JobStore;
use crate::telemetry::metrics::family;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;

/// Reads a job store's counts.
pub struct JobsCollector(pub JobStore);

impl std::fmt::Debug for JobsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobsCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobStateLabels {
    app: String,
    state: &'static str,
}

impl Collector for JobsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let values = self
            .0
            .stats_by_app()
            .into_iter()
            .flat_map(|(app, stats)| {
                [
                    ("queued", stats.queued),
                    ("running", stats.running),
                    ("dead", stats.dead),
                    ("completed", stats.completed),
                ]
                .map(|(state, count)| {
                    let labels = JobStateLabels {
                        app: app.clone(),
                        state,
                    };
                    (labels, count)
                })
            })
            .collect();
        family(
            &mut encoder,
            "jobs",
            "Async jobs now, by app and state (queued, running, dead, completed and kept)",
            MetricType::Gauge,
            values,
        )
    }
}
