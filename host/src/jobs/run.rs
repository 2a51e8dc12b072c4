//! How the node runs a job: the stored request goes through the same path as a client's
//! (the app's rate limits, traffic split, limits and fallback; the job id is its request id),
//! its answer is kept (bounded), and each attempt is counted in the metrics and the app's
//! usage. A job's callback URL, which only a host the app may call can be, is POSTed the
//! job's status once it is completed or dead. Messages components send to named queues
//! become jobs of the app that consumes the queue.

use super::worker::{BoxFuture, Executor, Outcome};
use super::{JobRecord, JobState, JobsConfig};
use crate::cluster::forwarding::{self, Forward};
use crate::cluster::Fleet;
use crate::runtime::dispatch::Decision;
use crate::runtime::queue::{Message, QueueSink, PRODUCER_HEADER, QUEUE_HEADER};
use crate::runtime::Runtime;
use crate::telemetry::metrics::JobLabels;
use crate::telemetry::{Telemetry, REQUEST_ID_HEADER};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::time::Duration;

/// The client key of jobs the node made itself (queue messages), for rate limits.
const JOB_CLIENT: &str = "jobs";

/// Runs jobs on a node's runtime, or, for an app placed on other nodes of its cluster, on one
/// of them (forwarded; the job and its result stay on this node).
pub struct RuntimeExecutor {
    runtime: Arc<Runtime>,
    telemetry: Arc<Telemetry>,
    fleet: Option<Arc<Fleet>>,
    max_result_bytes: usize,
    callbacks: reqwest::Client,
}

impl RuntimeExecutor {
    pub fn new(
        runtime: Arc<Runtime>,
        telemetry: Arc<Telemetry>,
        fleet: Option<Arc<Fleet>>,
        config: &JobsConfig,
    ) -> anyhow::Result<Self> {
        let callbacks = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(config.callback_timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            runtime,
            telemetry,
            fleet,
            max_result_bytes: config.max_result_bytes,
            callbacks,
        })
    }

    async fn run(&self, job: JobRecord, body: Bytes) -> Outcome {
        let request = match job_request(&job, body) {
            Ok(request) => request,
            Err(error) => {
                return Outcome::Failed {
                    error,
                    retryable: false,
                }
            }
        };
        let failed = |error: crate::runtime::InvokeError| {
            let status = error.status().as_u16();
            Outcome::Failed {
                error: error.to_string(),
                retryable: status >= 500 || status == 429 || status == 408,
            }
        };
        // Admitted under the rate limits of the client that asked for it: one client's flood
        // of jobs is that client's to wait for, not everyone's.
        let client = job.client.as_deref().unwrap_or(JOB_CLIENT);
        if let Some(outcome) = self.run_elsewhere(&job, &request, client).await {
            return outcome;
        }
        let response = match self
            .runtime
            .admit(&job.app, None, request.headers(), client)
        {
            Ok(Decision::Serve(admitted)) => match self.runtime.serve(admitted, request, 0).await {
                Ok(response) => response,
                Err(error) => return failed(error),
            },
            Ok(Decision::Degraded(response)) => response,
            Err(error) => return failed(error),
        };
        self.outcome(response).await
    }

    /// Forwards the job's request to a peer when its app is placed on other nodes and one of
    /// them serves it; `None` when it is to run here.
    async fn run_elsewhere(
        &self,
        job: &JobRecord,
        request: &http::Request<Full<Bytes>>,
        client: &str,
    ) -> Option<Outcome> {
        let fleet = self.fleet.as_ref()?;
        let app = self.runtime.app(&job.app).filter(|app| !app.placed)?;
        let timeout = app.latest().map_or(0, |latest| {
            latest.record.spec.timeout_secs + latest.record.spec.queue_timeout_secs
        });
        let body = request.body().clone().collect().await.ok()?.to_bytes();
        let forwarded = fleet
            .forward(Forward {
                app: &job.app,
                selector: None,
                path: &job.path,
                method: request.method().clone(),
                headers: request.headers().clone(),
                body,
                client,
                timeout: Duration::from_secs(timeout) + forwarding::GRACE,
            })
            .await;
        Some(match forwarded {
            Ok(response) => self.outcome(response).await,
            Err(error) => Outcome::Failed {
                error: error.to_string(),
                retryable: true,
            },
        })
    }

    /// The job's outcome from the app's response (its body kept up to `max_result_bytes`).
    async fn outcome<B>(&self, response: http::Response<B>) -> Outcome
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let (parts, mut body) = response.into_parts();
        let mut kept = Vec::new();
        let mut body_bytes = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        body_bytes += data.len() as u64;
                        let room = (self.max_result_bytes + 1).saturating_sub(kept.len());
                        kept.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Err(error) => {
                    return Outcome::Failed {
                        error: format!("the app's response broke off: {error}"),
                        retryable: true,
                    }
                }
            }
        }
        Outcome::Answered {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter_map(|(name, value)| {
                    Some((name.to_string(), value.to_str().ok()?.to_string()))
                })
                .collect(),
            body: Bytes::from(kept),
            body_bytes,
        }
    }
}

/// The request a job stored, as the app receives it.
fn job_request(job: &JobRecord, body: Bytes) -> Result<http::Request<Full<Bytes>>, String> {
    let host = job
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .map_or("localhost", |(_, value)| value.as_str());
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = job
        .method
        .parse()
        .map_err(|_| format!("the job's method {:?} is not valid", job.method))?;
    *request.uri_mut() = format!("https://{host}{}", job.path)
        .parse()
        .map_err(|e| format!("the job's path is not a valid URI: {e}"))?;
    for (name, value) in &job.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(name.as_str()),
            http::HeaderValue::try_from(value.as_str()),
        ) {
            request.headers_mut().append(name, value);
        }
    }
    let id = http::HeaderValue::try_from(job.id.as_str()).map_err(|e| e.to_string())?;
    request.headers_mut().insert(REQUEST_ID_HEADER, id);
    Ok(request)
}

/// What a callback receives: the job's status, without its result body (at `/jobs/<id>/result`).
pub fn status_json(job: &JobRecord) -> serde_json::Value {
    serde_json::json!({
        "id": job.id,
        "app": job.app,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
        "next_attempt_ms": job.next_attempt_ms,
        "last_error": job.last_error,
        "result": job.result,
        "result_url": format!("/jobs/{}/result", job.id),
    })
}

impl Executor for RuntimeExecutor {
    fn execute(&self, job: JobRecord, body: Bytes) -> BoxFuture<'_, Outcome> {
        Box::pin(self.run(job, body))
    }

    fn attempted(&self, job: &JobRecord) {
        let outcome = match job.state {
            JobState::Queued => "retried",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Running => return,
        };
        self.telemetry
            .metrics
            .jobs
            .get_or_create(&JobLabels {
                app: job.app.clone(),
                outcome,
            })
            .inc();
        self.telemetry
            .meter
            .record(&job.app, |usage| usage.jobs += 1);
    }

    fn notify<'a>(&'a self, job: &'a JobRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(url) = &job.callback else {
                return;
            };
            let sent = self
                .callbacks
                .post(url)
                .header(REQUEST_ID_HEADER, job.id.as_str())
                .json(&status_json(job))
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => {
                    tracing::warn!(job = %job.id, status = %response.status(), "the job's callback refused its status")
                }
                Err(error) => {
                    tracing::warn!(job = %job.id, %error, "the job's callback could not be reached")
                }
            }
        })
    }
}

/// Delivers queue messages as jobs of their consumer (`POST /queues/<queue>`).
pub struct JobQueueSink {
    jobs: super::JobStore,
    max_attempts: u32,
}

impl JobQueueSink {
    pub fn new(jobs: super::JobStore, config: &JobsConfig) -> Self {
        Self {
            jobs,
            max_attempts: config.max_attempts,
        }
    }
}

impl QueueSink for JobQueueSink {
    fn send(
        &self,
        message: Message,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(async move {
            let job = super::NewJob {
                app: message.consumer,
                method: "POST".into(),
                path: format!("/queues/{}", message.queue),
                headers: vec![
                    ("content-type".into(), "application/octet-stream".into()),
                    (QUEUE_HEADER.into(), message.queue),
                    (PRODUCER_HEADER.into(), message.producer),
                ],
                body: Bytes::from(message.body),
                max_attempts: self.max_attempts,
                callback: None,
                idempotency_key: None,
                client: None,
            };
            self.jobs
                .enqueue(job)
                .await
                .map(|enqueued| enqueued.id)
                .map_err(|error| error.to_string())
        })
    }
}
