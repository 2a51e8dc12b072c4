//! Export of the node's trace spans (one per request, tagged with its request id, with the
//! spans of its app and its models' computes inside) to an OpenTelemetry collector over
//! OTLP/HTTP, when `[telemetry] otlp_endpoint` names one. Spans are batched on the exporter's
//! own thread (a bounded queue: spans past it are dropped, never waited for) and sent every
//! second; a collector that is down costs the node nothing but those spans.

use super::TelemetryConfig;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use std::time::Duration;

/// Spans waiting for export at most; more are dropped.
const MAX_QUEUED_SPANS: usize = 4096;
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The tracer provider exporting to the configured collector, if there is one. Builds a
/// blocking HTTP client: call it before the async runtime starts.
pub fn provider(config: &TelemetryConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let batches = BatchConfigBuilder::default()
        .with_max_queue_size(MAX_QUEUED_SPANS)
        .with_scheduled_delay(Duration::from_secs(1))
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batches)
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name(config.otlp_service_name.clone())
                    .build(),
            )
            .build(),
    ))
}

/// The `tracing` layer that hands spans to `provider`.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("tensorlet"))
}
