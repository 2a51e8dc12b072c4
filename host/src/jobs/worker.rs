//! The workers that run queued jobs: each takes a due job from the [`JobStore`], hands it to
//! the runtime (an [`Executor`]) and records the outcome; one more task expires old results.
//!
//! A worker never spins and never panics on a store error: it logs it and waits a second. On
//! shutdown it stops at once; a job it was running stays `running`, and the next start
//! requeues it (at least once execution).

use super::{now_ms, JobError, JobRecord, JobResult, JobState, JobStore};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest a worker waits before looking at the queue again, whatever it was told.
const MAX_IDLE: Duration = Duration::from_secs(1);
/// How long a worker waits after a store error.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How often completed jobs past their time to live are deleted.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

/// A boxed future that can move between threads.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What runs a job: the runtime, which instantiates the app with its limits.
pub trait Executor: Send + Sync + 'static {
    /// Runs the job's request (`body` is its request body) and says how it went.
    fn execute(&self, job: JobRecord, body: Bytes) -> BoxFuture<'_, Outcome>;

    /// Called after each attempt is recorded, with the job as it now stands (queued again,
    /// completed or dead). Does nothing by default.
    fn attempted(&self, _job: &JobRecord) {}

    /// Called once a job with a callback is completed or dead, to report its status there.
    /// The worker waits for it, so it should be bounded in time. Does nothing by default.
    fn notify<'a>(&'a self, _job: &'a JobRecord) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// How one attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The app answered. 5xx, 408 and 429 are retried; anything else completes the job.
    Answered {
        status: u16,
        headers: Vec<(String, String)>,
        /// The body, or its start when it is longer than the job may keep.
        body: Bytes,
        /// The whole body's length.
        body_bytes: u64,
    },
    /// The host could not get an answer (timeout, trap, out of memory...). Retried when
    /// `retryable`, else the job is dead at once.
    Failed { error: String, retryable: bool },
}

/// Whether an answer with `status` is worth another attempt.
fn is_retried(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// Starts `workers` workers and the expiry task (the last handle). They run until `shutdown`
/// is cancelled.
pub fn spawn_workers(
    store: JobStore,
    executor: Arc<dyn Executor>,
    workers: usize,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let mut handles: Vec<JoinHandle<()>> = (0..workers)
        .map(|_| {
            tokio::spawn(run_worker(
                store.clone(),
                executor.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    handles.push(tokio::spawn(run_expiry(store, shutdown)));
    handles
}

async fn run_worker(store: JobStore, executor: Arc<dyn Executor>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        match store.claim(now_ms()).await {
            Ok(Some((job, body))) => {
                let id = job.id.clone();
                let outcome = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    outcome = executor.execute(job, body) => outcome,
                };
                match record_outcome(&store, &id, outcome).await {
                    Ok(Some(recorded)) => {
                        executor.attempted(&recorded);
                        if recorded.state != JobState::Queued && recorded.callback.is_some() {
                            tokio::select! {
                                biased;
                                () = shutdown.cancelled() => return,
                                () = executor.notify(&recorded) => {}
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(JobError::NotFound) => {
                        tracing::debug!(job = %id, "the job was deleted while it ran");
                    }
                    Err(error) => {
                        tracing::warn!(job = %id, %error, "cannot record the outcome of a job");
                        pause(ERROR_PAUSE, &shutdown).await;
                    }
                }
            }
            Ok(None) => wait_for_work(&store, &shutdown).await,
            Err(error) => {
                tracing::warn!(%error, "cannot take a job from the queue");
                pause(ERROR_PAUSE, &shutdown).await;
            }
        }
    }
}

/// Records an attempt's outcome; returns the job as it now stands (queued for another
/// attempt, completed or dead), or `None` when it was final already.
async fn record_outcome(
    store: &JobStore,
    id: &str,
    outcome: Outcome,
) -> Result<Option<JobRecord>, JobError> {
    let recorded = match outcome {
        Outcome::Answered { status, .. } if is_retried(status) => {
            store
                .retry_or_dead(id, format!("the app answered {status}"), now_ms())
                .await?
        }
        Outcome::Answered {
            status,
            headers,
            body,
            body_bytes,
        } => {
            let result = JobResult {
                status,
                headers,
                body_bytes,
                body_truncated: false,
            };
            return store.record_completion(id, result, body).await;
        }
        Outcome::Failed {
            error,
            retryable: true,
        } => store.retry_or_dead(id, error, now_ms()).await?,
        Outcome::Failed {
            error,
            retryable: false,
        } => store.bury(id, error, now_ms()).await?,
    };
    Ok(recorded)
}

/// Waits for a newly queued job, the next due time or a second, whichever comes first.
async fn wait_for_work(store: &JobStore, shutdown: &CancellationToken) {
    let wait = match store.next_due_ms() {
        Ok(Some(due)) => Duration::from_millis(due.saturating_sub(now_ms())).min(MAX_IDLE),
        Ok(None) => MAX_IDLE,
        Err(error) => {
            tracing::warn!(%error, "cannot read when the next job is due");
            MAX_IDLE
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = store.wait_for_queued() => {}
        () = tokio::time::sleep(wait) => {}
    }
}

async fn pause(duration: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(duration) => {}
    }
}

/// Deletes completed jobs past their time to live, now and every minute.
async fn run_expiry(store: JobStore, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(EXPIRY_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.expire(now_ms()).await {
            Ok(0) => {}
            Ok(expired) => tracing::debug!(expired, "deleted expired job results"),
            Err(error) => tracing::warn!(%error, "cannot delete expired job results"),
        }
    }
}
