//! The job queue's depth as Prometheus metrics, read at each scrape: jobs queued, running and
//! dead, and completed ones kept, per app.

use super::JobStore;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
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
        let mut metric = encoder.encode_descriptor(
            "jobs",
            "Async jobs now, by app and state (queued, running, dead, completed and kept)",
            None,
            MetricType::Gauge,
        )?;
        for (app, stats) in self.0.stats_by_app() {
            for (state, count) in [
                ("queued", stats.queued),
                ("running", stats.running),
                ("dead", stats.dead),
                ("completed", stats.completed),
            ] {
                let labels = JobStateLabels {
                    app: app.clone(),
                    state,
                };
                ConstGauge::new(count as i64).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
