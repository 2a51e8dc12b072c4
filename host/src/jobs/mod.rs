//! The durable queue behind asynchronous invocation (`POST /async/<app>/<path>`).
//!
//! A job is a stored request that workers ([`worker`]) run with the app's limits, retrying it
//! with exponential backoff on 5xx answers and timeouts until it completes or its attempts run
//! out and it becomes a dead letter. The contract: at least once execution, exactly once
//! completion record, dedupe by id and by an optional client idempotency key.
//!
//! Trees: `jobs` (id → [`JobRecord`] JSON), `job_bodies` (id → request body), `job_results`
//! (id → response body), `job_queue` (due time in ms, u64 big-endian, ++ id → empty: the order
//! workers take jobs in), `job_keys` (`<app>/<idempotency key>` → id) and `job_dead`
//! (`<app>/<id>` → empty: the dead letters). Every change that touches more than one tree is
//! one sled transaction, so a crash never leaves half a job; every change a client or a worker
//! relies on is made durable before it returns.
//!
//! A queued job has `next_attempt_ms` set and exactly one queue entry under that time; a job
//! in any other state has neither. Per-app counts of queued, running and dead jobs are kept in
//! memory (rebuilt on open) for the queue limit and for [`JobStore::stats`].

pub mod metrics;
pub mod run;
pub mod worker;

pub use worker::{spawn_workers, BoxFuture, Executor, Outcome};

use crate::store::{get_json, Store, StoreError};
use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};
use sled::Transactional;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// The first retry waits about this long; each further one twice as long.
const BACKOFF_BASE_MS: u64 = 1_000;
/// No retry waits longer than this.
const BACKOFF_CAP_MS: u64 = 5 * 60 * 1_000;
/// The longest idempotency key a client may send.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// The last error of a job whose last attempt was cut short by the node stopping.
const NODE_STOPPED: &str = "the node stopped during the last attempt";
/// Bytes of the due time at the start of a queue key.
const DUE_BYTES: usize = 8;

/// `[jobs]`: the workers, and bounds on what the queue keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Jobs run at once (each also takes an instance slot like any request).
    pub workers: usize,
    /// Attempts a job gets unless its client asks for others (`tensorlet-max-attempts`).
    pub max_attempts: u32,
    /// How long the POST to a job's callback URL may take.
    pub callback_timeout_secs: u64,
    /// Jobs an app may have queued or running at once; more are refused.
    pub max_queued_per_app: usize,
    /// The most attempts a client may ask for.
    pub max_attempts_cap: u32,
    /// Completed jobs (with their results) an app may have at once; past it new jobs are
    /// refused until old results expire.
    pub max_completed_per_app: usize,
    /// How long a completed job and its result are kept.
    pub result_ttl_secs: u64,
    /// Dead letters kept per app; the oldest goes when another job dies.
    pub max_dead_per_app: usize,
    /// Response bytes kept per job; the rest is cut off (see [`JobResult::body_truncated`]).
    pub max_result_bytes: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            max_attempts: 3,
            callback_timeout_secs: 10,
            max_queued_per_app: 1000,
            max_completed_per_app: 10_000,
            max_attempts_cap: 10,
            result_ttl_secs: 86_400,
            max_dead_per_app: 1000,
            max_result_bytes: 8 * 1024 * 1024,
        }
    }
}

impl JobsConfig {
    /// Checks the values, naming the key and the range it takes.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.workers) {
            return Err("jobs.workers must be 1–64".into());
        }
        if !(1..=100).contains(&self.max_attempts_cap) {
            return Err("jobs.max_attempts_cap must be 1–100".into());
        }
        if !(1..=self.max_attempts_cap).contains(&self.max_attempts) {
            return Err("jobs.max_attempts must be between 1 and jobs.max_attempts_cap".into());
        }
        if !(1..=300).contains(&self.callback_timeout_secs) {
            return Err("jobs.callback_timeout_secs must be 1–300".into());
        }
        if self.max_queued_per_app == 0
            || self.max_dead_per_app == 0
            || self.max_completed_per_app == 0
        {
            return Err(
                "jobs.max_queued_per_app and jobs.max_dead_per_app must be at least 1".into(),
            );
        }
        if self.result_ttl_secs == 0 {
            return Err("jobs.result_ttl_secs must be at least 1".into());
        }
        Ok(())
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker, due at `next_attempt_ms`.
    Queued,
    /// Taken by a worker.
    Running,
    /// The app answered with a status that is not retried (any but 5xx, 408 and 429).
    Completed,
    /// Attempts exhausted, or a failure that retrying cannot fix.
    Dead,
}

/// What the app answered, as stored with a completed job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The size of the body the app answered (set by [`JobStore::complete`]).
    pub body_bytes: u64,
    /// Whether the stored body was cut to [`JobsConfig::max_result_bytes`] (set by
    /// [`JobStore::complete`]).
    pub body_truncated: bool,
}

/// A job as stored in the `jobs` tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// 32 lowercase hex characters (128 random bits).
    pub id: String,
    pub app: String,
    pub method: String,
    /// The path and query the app sees.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub state: JobState,
    /// Attempts started so far (counted when a worker takes the job).
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// When the job is due; set exactly while it is queued.
    pub next_attempt_ms: Option<u64>,
    pub last_error: Option<String>,
    pub result: Option<JobResult>,
    /// Where the runtime reports the outcome ([`Executor::notify`]).
    pub callback: Option<String>,
    pub idempotency_key: Option<String>,
    /// Who asked for it: the rate-limit key its runs are admitted under (`None`: the node's).
    #[serde(default)]
    pub client: Option<String>,
}

/// A request to run later, as the API layer hands it over.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub app: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub max_attempts: u32,
    pub callback: Option<String>,
    pub idempotency_key: Option<String>,
    pub client: Option<String>,
}

/// The answer to an enqueue: the job's id, and whether it already existed (same idempotency
/// key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub id: String,
    pub existing: bool,
}

/// Jobs by state, for one app or all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobStats {
    pub queued: u64,
    pub running: u64,
    pub dead: u64,
    /// Completed jobs whose results are kept.
    pub completed: u64,
}

impl JobStats {
    fn counter(&mut self, state: JobState) -> Option<&mut u64> {
        match state {
            JobState::Queued => Some(&mut self.queued),
            JobState::Running => Some(&mut self.running),
            JobState::Dead => Some(&mut self.dead),
            JobState::Completed => Some(&mut self.completed),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Errors from the job queue; the API layer maps them to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("app {app} already has {limit} jobs queued or running; try again later")]
    QueueFull { app: String, limit: usize },
    #[error(
        "app {app} keeps {limit} completed jobs' results already; try again once older ones expire"
    )]
    ResultsFull { app: String, limit: usize },
    #[error("no such job")]
    NotFound,
}

impl From<sled::Error> for JobError {
    fn from(error: sled::Error) -> Self {
        Self::Store(error.into())
    }
}

/// The durable job queue; cheap to clone.
#[derive(Clone)]
pub struct JobStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    limits: JobsConfig,
    jobs: sled::Tree,
    bodies: sled::Tree,
    results: sled::Tree,
    queue: sled::Tree,
    keys: sled::Tree,
    dead: sled::Tree,
    counts: Mutex<HashMap<String, JobStats>>,
    /// Woken when a job is queued due now.
    wake: Notify,
}

/// The six trees inside one transaction.
struct Tx<'a> {
    jobs: &'a TransactionalTree,
    bodies: &'a TransactionalTree,
    results: &'a TransactionalTree,
    queue: &'a TransactionalTree,
    keys: &'a TransactionalTree,
    dead: &'a TransactionalTree,
}

type TxResult<T, E = JobError> = ConflictableTransactionResult<T, E>;

impl Tx<'_> {
    fn record<E: From<StoreError>>(&self, id: &str) -> TxResult<Option<JobRecord>, E> {
        match self.jobs.get(id)? {
            None => Ok(None),
            Some(bytes) => parse_record(id, &bytes)
                .map(Some)
                .map_err(|error| ConflictableTransactionError::Abort(error.into())),
        }
    }

    /// Job `id` taken off the queue to be made final, with the state it had; `None` when it
    /// is final already. NotFound when there is no such job.
    fn unfinished(&self, id: &str) -> TxResult<Option<(JobState, JobRecord)>> {
        let Some(mut record) = self.record(id)? else {
            return Err(ConflictableTransactionError::Abort(JobError::NotFound));
        };
        let previous = record.state;
        if matches!(previous, JobState::Completed | JobState::Dead) {
            return Ok(None);
        }
        if let Some(due) = record.next_attempt_ms.take() {
            self.queue.remove(queue_key(due, id))?;
        }
        Ok(Some((previous, record)))
    }

    fn put<E>(&self, record: &JobRecord) -> TxResult<(), E> {
        let bytes = serde_json::to_vec(record).expect("records serialise");
        self.jobs.insert(record.id.as_bytes(), bytes)?;
        Ok(())
    }

    /// Deletes a job with everything that refers to it.
    fn delete<E>(&self, record: &JobRecord) -> TxResult<(), E> {
        let id = record.id.as_str();
        self.jobs.remove(id)?;
        self.bodies.remove(id)?;
        self.results.remove(id)?;
        self.dead.remove(dead_key(&record.app, id).as_bytes())?;
        if let Some(due) = record.next_attempt_ms {
            self.queue.remove(queue_key(due, id))?;
        }
        if let Some(key) = &record.idempotency_key {
            let key = idempotency_key(&record.app, key);
            if self.keys.get(key.as_bytes())?.as_deref() == Some(id.as_bytes()) {
                self.keys.remove(key.as_bytes())?;
            }
        }
        Ok(())
    }
}

/// What a claim found at one queue entry.
enum Claim {
    /// Another worker took it first.
    Taken,
    /// The entry pointed at no queued job and was removed.
    Stale,
    Claimed(Box<JobRecord>, Bytes),
}

impl JobStore {
    /// Opens the queue's trees, recovers the jobs that were running when the node stopped
    /// (see `recover`) and counts what is queued, running and dead.
    pub fn open(store: &Store, limits: JobsConfig) -> Result<Self, StoreError> {
        let job_store = Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                limits,
                jobs: store.tree("jobs")?,
                bodies: store.tree("job_bodies")?,
                results: store.tree("job_results")?,
                queue: store.tree("job_queue")?,
                keys: store.tree("job_keys")?,
                dead: store.tree("job_dead")?,
                counts: Mutex::new(HashMap::new()),
                wake: Notify::new(),
            }),
        };
        if job_store.recover()? > 0 {
            store.flush_blocking()?;
        }
        Ok(job_store)
    }

    /// Puts every `running` job (the node died while running it) back in the queue, due now,
    /// with its attempts kept; one whose attempts are used up becomes a dead letter, so a job
    /// that kills the node every time stops. Rebuilds the counts. Returns how many jobs were
    /// found running.
    fn recover(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let mut counts: HashMap<String, JobStats> = HashMap::new();
        let mut interrupted = 0;
        for record in self.records() {
            let record = record?;
            let mut state = record.state;
            if state == JobState::Running {
                let id = record.id.clone();
                let recovered = self.transact::<_, StoreError>(|tx| {
                    let Some(mut record) = tx.record(&id)? else {
                        return Ok(None);
                    };
                    if record.state != JobState::Running {
                        return Ok(Some(record.state));
                    }
                    record.updated_ms = now;
                    if record.attempts >= record.max_attempts {
                        record.state = JobState::Dead;
                        record.last_error = Some(NODE_STOPPED.to_string());
                        tx.dead.insert(dead_key(&record.app, &id).as_bytes(), &[])?;
                    } else {
                        record.state = JobState::Queued;
                        record.next_attempt_ms = Some(now);
                        tx.queue.insert(queue_key(now, &id), &[])?;
                    }
                    tx.put(&record)?;
                    Ok(Some(record.state))
                })?;
                let Some(recovered) = recovered else { continue };
                tracing::info!(
                    job = %id,
                    app = %record.app,
                    state = ?recovered,
                    "recovered a job that was running when the node stopped"
                );
                interrupted += 1;
                state = recovered;
            }
            let stats = counts.entry(record.app).or_default();
            if let Some(counter) = stats.counter(state) {
                *counter += 1;
            }
        }
        counts.retain(|_, stats| !stats.is_empty());
        *self.counts() = counts;
        Ok(interrupted)
    }

    /// Stores a job durably and wakes a worker. With an idempotency key already seen for the
    /// app, returns that job's id instead (`existing: true`).
    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued, JobError> {
        self.validate(&job)?;
        let key = job
            .idempotency_key
            .as_deref()
            .map(|key| idempotency_key(&job.app, key));
        if let Some(key) = &key {
            if let Some(id) = self.inner.keys.get(key.as_bytes())? {
                return self.existing(key, &id).await;
            }
        }
        self.reserve_queued(&job.app)?;
        let now = now_ms();
        let record = JobRecord {
            id: new_id(),
            app: job.app,
            method: job.method,
            path: job.path,
            headers: job.headers,
            state: JobState::Queued,
            attempts: 0,
            max_attempts: job.max_attempts,
            created_ms: now,
            updated_ms: now,
            next_attempt_ms: Some(now),
            last_error: None,
            result: None,
            callback: job.callback,
            idempotency_key: job.idempotency_key,
            client: job.client,
        };
        let written = self.transact(|tx| {
            if let Some(key) = &key {
                if let Some(id) = tx.keys.get(key.as_bytes())? {
                    return Ok(Some(id));
                }
                tx.keys.insert(key.as_bytes(), record.id.as_bytes())?;
            }
            tx.put(&record)?;
            tx.bodies.insert(record.id.as_bytes(), job.body.as_ref())?;
            tx.queue.insert(queue_key(now, &record.id), &[])?;
            Ok(None)
        });
        match written {
            Ok(None) => {
                self.inner.store.make_durable().await?;
                self.inner.wake.notify_one();
                Ok(Enqueued {
                    id: record.id,
                    existing: false,
                })
            }
            Ok(Some(id)) => {
                self.shift(&record.app, Some(JobState::Queued), None);
                self.existing(key.as_deref().unwrap_or_default(), &id).await
            }
            Err(error) => {
                self.shift(&record.app, Some(JobState::Queued), None);
                Err(error)
            }
        }
    }

    /// The answer for an idempotency key already stored (durable before it is given).
    async fn existing(&self, key: &str, id: &[u8]) -> Result<Enqueued, JobError> {
        let id = String::from_utf8(id.to_vec()).map_err(|_| corrupt(key, "the id is not UTF-8"))?;
        self.inner.store.make_durable().await?;
        Ok(Enqueued { id, existing: true })
    }

    fn validate(&self, job: &NewJob) -> Result<(), JobError> {
        let cap = self.inner.limits.max_attempts_cap;
        let problem = if job.app.is_empty() || job.app.contains('/') {
            Some("the app name must be non-empty and without '/'".to_string())
        } else if job.method.is_empty() {
            Some("the method is empty".to_string())
        } else if !job.path.starts_with('/') {
            Some("the path must start with '/'".to_string())
        } else if !(1..=cap).contains(&job.max_attempts) {
            Some(format!("max_attempts must be between 1 and {cap}"))
        } else if job
            .idempotency_key
            .as_ref()
            .is_some_and(|key| key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES)
        {
            Some(format!(
                "the idempotency key must have 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            ))
        } else {
            None
        };
        problem.map_or(Ok(()), |problem| Err(JobError::Invalid(problem)))
    }

    /// The job called `id`.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, JobError> {
        Ok(get_json(&self.inner.jobs, id)?)
    }

    /// The stored response body of a completed job.
    pub fn result_body(&self, id: &str) -> Result<Option<Bytes>, JobError> {
        Ok(self
            .inner
            .results
            .get(id)?
            .map(|body| Bytes::from(body.to_vec())))
    }

    /// The request body a job was enqueued with.
    pub fn request_body(&self, id: &str) -> Result<Option<Bytes>, JobError> {
        Ok(self
            .inner
            .bodies
            .get(id)?
            .map(|body| Bytes::from(body.to_vec())))
    }

    /// Takes the first job due at or before `now_ms` for one worker: it is `running`, its
    /// attempts counted, durably, before it is returned with its request body. Several workers
    /// may claim at once; each job goes to exactly one.
    pub async fn claim(&self, now_ms: u64) -> Result<Option<(JobRecord, Bytes)>, JobError> {
        let Some((record, body)) = self.claim_due(now_ms)? else {
            return Ok(None);
        };
        self.shift(&record.app, Some(JobState::Queued), Some(JobState::Running));
        self.inner.store.make_durable().await?;
        Ok(Some((record, body)))
    }

    fn claim_due(&self, now_ms: u64) -> Result<Option<(JobRecord, Bytes)>, JobError> {
        for entry in self.inner.queue.iter() {
            let (key, _) = entry?;
            let Some((due, id)) = parse_queue_key(&key) else {
                tracing::warn!(key = ?key, "removing a queue entry that cannot be read");
                self.inner.queue.remove(&key)?;
                continue;
            };
            if due > now_ms {
                break;
            }
            let claim = self.transact(|tx| {
                if tx.queue.remove(key.as_ref())?.is_none() {
                    return Ok(Claim::Taken);
                }
                let Some(mut record) = tx.record(&id)? else {
                    return Ok(Claim::Stale);
                };
                if record.state != JobState::Queued || record.next_attempt_ms != Some(due) {
                    return Ok(Claim::Stale);
                }
                record.state = JobState::Running;
                record.attempts += 1;
                record.updated_ms = now_ms;
                record.next_attempt_ms = None;
                tx.put(&record)?;
                let body = tx.bodies.get(id.as_bytes())?;
                let body = body.map_or_else(Bytes::new, |body| Bytes::from(body.to_vec()));
                Ok(Claim::Claimed(Box::new(record), body))
            });
            match claim {
                Ok(Claim::Claimed(record, body)) => return Ok(Some((*record, body))),
                Ok(Claim::Taken) => {}
                Ok(Claim::Stale) => {
                    tracing::warn!(job = %id, "removed a queue entry without a queued job");
                }
                Err(error @ JobError::Store(StoreError::Corrupt { .. })) => {
                    // Take a corrupt job off the queue so it does not block the others; its
                    // record stays for inspection.
                    self.inner.queue.remove(&key)?;
                    return Err(error);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(None)
    }

    /// When the earliest queued job is due.
    pub fn next_due_ms(&self) -> Result<Option<u64>, JobError> {
        Ok(self
            .inner
            .queue
            .first()?
            .and_then(|(key, _)| parse_queue_key(&key))
            .map(|(due, _)| due))
    }

    /// Records that the app answered: the job is completed with `result` (its `body_bytes`
    /// is at least `body`'s length, and `body_truncated` is set here; `body` is kept up to
    /// [`JobsConfig::max_result_bytes`]). Durable before it returns. Returns false, changing
    /// nothing, when the job was already completed or dead.
    pub async fn complete(
        &self,
        id: &str,
        result: JobResult,
        body: Bytes,
    ) -> Result<bool, JobError> {
        Ok(self.record_completion(id, result, body).await?.is_some())
    }

    /// [`Self::complete`], returning the completed record (None when it already was final).
    async fn record_completion(
        &self,
        id: &str,
        result: JobResult,
        body: Bytes,
    ) -> Result<Option<JobRecord>, JobError> {
        let now = now_ms();
        let kept = body.len().min(self.inner.limits.max_result_bytes);
        // The executor may have kept only the start of a longer body: `result.body_bytes`
        // then says how long it was.
        let body_bytes = result.body_bytes.max(body.len() as u64);
        let result = JobResult {
            body_bytes,
            body_truncated: (kept as u64) < body_bytes,
            ..result
        };
        let completed = self.transact(|tx| {
            let Some((previous, mut record)) = tx.unfinished(id)? else {
                return Ok(None);
            };
            record.state = JobState::Completed;
            record.updated_ms = now;
            record.result = Some(result.clone());
            tx.put(&record)?;
            tx.results.insert(id.as_bytes(), &body[..kept])?;
            // A completed job never runs again: its request body is of no more use.
            tx.bodies.remove(id.as_bytes())?;
            Ok(Some((previous, record)))
        })?;
        let Some((previous, record)) = completed else {
            return Ok(None);
        };
        self.shift(&record.app, Some(previous), Some(JobState::Completed));
        self.inner.store.make_durable().await?;
        Ok(Some(record))
    }

    /// Records a failed attempt: back to the queue after [`backoff`] while attempts remain,
    /// else a dead letter. Durable before it returns. Returns the record as changed (its state
    /// says which), or None when the job was already completed or dead.
    pub async fn retry_or_dead(
        &self,
        id: &str,
        error: String,
        now_ms: u64,
    ) -> Result<Option<JobRecord>, JobError> {
        self.record_failure(id, error, now_ms, true).await
    }

    /// Makes a job a dead letter at once (a failure that retrying cannot fix). Durable before
    /// it returns; None when the job was already completed or dead.
    pub async fn bury(
        &self,
        id: &str,
        error: String,
        now_ms: u64,
    ) -> Result<Option<JobRecord>, JobError> {
        self.record_failure(id, error, now_ms, false).await
    }

    async fn record_failure(
        &self,
        id: &str,
        error: String,
        now_ms: u64,
        retryable: bool,
    ) -> Result<Option<JobRecord>, JobError> {
        let Some(current) = self.get(id)? else {
            return Err(JobError::NotFound);
        };
        let retry_at = now_ms
            .saturating_add(backoff(current.attempts, &mut rand::thread_rng()).as_millis() as u64);
        let dies = !retryable || current.attempts >= current.max_attempts;
        let evict = if dies && self.app_stats(&current.app).dead >= self.max_dead() {
            self.oldest_dead(&current.app)?
        } else {
            None
        };
        let changed = self.transact(|tx| {
            let Some((previous, mut record)) = tx.unfinished(id)? else {
                return Ok(None);
            };
            record.last_error = Some(error.clone());
            record.updated_ms = now_ms;
            let mut evicted = None;
            if !retryable || record.attempts >= record.max_attempts {
                record.state = JobState::Dead;
                tx.dead.insert(dead_key(&record.app, id).as_bytes(), &[])?;
                if let Some(victim) = evict.as_deref().filter(|victim| *victim != id) {
                    let victim_key = dead_key(&record.app, victim);
                    if tx.dead.get(victim_key.as_bytes())?.is_some() {
                        if let Some(victim) = tx.record(victim)? {
                            tx.delete(&victim)?;
                            evicted = Some(victim.id);
                        }
                    }
                }
            } else {
                record.state = JobState::Queued;
                record.next_attempt_ms = Some(retry_at);
                tx.queue.insert(queue_key(retry_at, id), &[])?;
            }
            tx.put(&record)?;
            Ok(Some((previous, record, evicted)))
        })?;
        let Some((previous, record, evicted)) = changed else {
            return Ok(None);
        };
        self.shift(&record.app, Some(previous), Some(record.state));
        if let Some(evicted) = evicted {
            self.shift(&record.app, Some(JobState::Dead), None);
            tracing::warn!(
                app = %record.app,
                job = %evicted,
                limit = self.inner.limits.max_dead_per_app,
                "dropped the app's oldest dead letter to keep its dead letters within the limit"
            );
        }
        self.inner.store.make_durable().await?;
        Ok(Some(record))
    }

    fn max_dead(&self) -> u64 {
        self.inner.limits.max_dead_per_app as u64
    }

    fn oldest_dead(&self, app: &str) -> Result<Option<String>, JobError> {
        Ok(self
            .dead_letters(app)?
            .into_iter()
            .min_by_key(|record| record.updated_ms)
            .map(|record| record.id))
    }

    /// The app's dead letters, most recent first, at most `limit`.
    pub fn list_dead(&self, app: &str, limit: usize) -> Result<Vec<JobRecord>, JobError> {
        let mut dead = self.dead_letters(app)?;
        dead.sort_by(|a, b| b.updated_ms.cmp(&a.updated_ms).then(a.id.cmp(&b.id)));
        dead.truncate(limit);
        Ok(dead)
    }

    fn dead_letters(&self, app: &str) -> Result<Vec<JobRecord>, JobError> {
        let mut records = Vec::new();
        for id in self.dead_ids(app)? {
            if let Some(bytes) = self.inner.jobs.get(id.as_bytes())? {
                records.extend(readable(id.as_bytes(), &bytes));
            }
        }
        Ok(records)
    }

    fn dead_ids(&self, app: &str) -> Result<Vec<String>, JobError> {
        let prefix = dead_key(app, "");
        self.inner
            .dead
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|key| {
                let key = key?;
                let id = key.get(prefix.len()..).unwrap_or_default();
                Ok(String::from_utf8_lossy(id).into_owned())
            })
            .collect()
    }

    /// Queues a dead letter of `app` again, due now, with its attempts reset. False when `id`
    /// is not a dead letter of `app`. Refused when the app's queue is full.
    pub async fn retry_dead(&self, app: &str, id: &str) -> Result<bool, JobError> {
        self.reserve_queued(app)?;
        let now = now_ms();
        let requeued = self.transact(|tx| {
            if tx.dead.remove(dead_key(app, id).as_bytes())?.is_none() {
                return Ok(false);
            }
            let Some(mut record) = tx.record(id)? else {
                return Ok(false);
            };
            if record.state != JobState::Dead {
                return Ok(false);
            }
            record.state = JobState::Queued;
            record.attempts = 0;
            record.updated_ms = now;
            record.next_attempt_ms = Some(now);
            tx.put(&record)?;
            tx.queue.insert(queue_key(now, id), &[])?;
            Ok(true)
        });
        match requeued {
            Ok(true) => {
                self.shift(app, Some(JobState::Dead), None);
                self.inner.store.make_durable().await?;
                self.inner.wake.notify_one();
                Ok(true)
            }
            other => {
                self.shift(app, Some(JobState::Queued), None);
                other
            }
        }
    }

    /// Deletes the app's dead letters with their bodies and idempotency keys; returns how
    /// many.
    pub async fn purge_dead(&self, app: &str) -> Result<usize, JobError> {
        let mut purged = 0;
        for id in self.dead_ids(app)? {
            let deleted = self.transact::<_, JobError>(|tx| {
                let Some(record) = tx.record(&id)? else {
                    tx.dead.remove(dead_key(app, &id).as_bytes())?;
                    tx.bodies.remove(id.as_bytes())?;
                    return Ok(false);
                };
                if record.state != JobState::Dead {
                    tx.dead.remove(dead_key(app, &id).as_bytes())?;
                    return Ok(false);
                }
                tx.delete(&record)?;
                Ok(true)
            })?;
            if deleted {
                self.shift(app, Some(JobState::Dead), None);
                purged += 1;
            }
        }
        self.inner.store.make_durable().await?;
        Ok(purged)
    }

    /// Deletes the completed jobs finished more than [`JobsConfig::result_ttl_secs`] before
    /// `now_ms`, with their bodies, results and idempotency keys; returns how many. Dead
    /// letters stay until purged.
    pub async fn expire(&self, now_ms: u64) -> Result<usize, JobError> {
        let ttl_ms = self.inner.limits.result_ttl_secs.saturating_mul(1000);
        let cutoff = now_ms.saturating_sub(ttl_ms);
        let expired = self.delete_where(|record| {
            record.state == JobState::Completed && record.updated_ms <= cutoff
        })?;
        if expired > 0 {
            self.inner.store.make_durable().await?;
        }
        Ok(expired)
    }

    /// Deletes every job of `app` (the app is being removed); returns how many. A worker
    /// still running one finds it gone when it reports.
    pub async fn remove_app(&self, app: &str) -> Result<usize, JobError> {
        let removed = self.delete_where(|record| record.app == app)?;
        self.inner.store.make_durable().await?;
        Ok(removed)
    }

    /// Deletes the jobs that match `condition`, each in its own transaction, checking the
    /// condition again inside it (not yet durable).
    fn delete_where(&self, condition: impl Fn(&JobRecord) -> bool) -> Result<usize, JobError> {
        let mut deleted = 0;
        for record in self.records() {
            let record = record?;
            if !condition(&record) {
                continue;
            }
            let gone = self.transact::<_, JobError>(|tx| match tx.record(&record.id)? {
                Some(current) if condition(&current) => {
                    tx.delete(&current)?;
                    Ok(Some(current))
                }
                _ => Ok(None),
            })?;
            if let Some(gone) = gone {
                self.shift(&gone.app, Some(gone.state), None);
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Jobs queued, running, dead and completed across all apps.
    pub fn stats(&self) -> JobStats {
        self.counts()
            .values()
            .fold(JobStats::default(), |total, app| JobStats {
                queued: total.queued + app.queued,
                running: total.running + app.running,
                dead: total.dead + app.dead,
                completed: total.completed + app.completed,
            })
    }

    /// Jobs queued, running, dead and completed per app (apps with none are left out).
    pub fn stats_by_app(&self) -> BTreeMap<String, JobStats> {
        self.counts()
            .iter()
            .map(|(app, stats)| (app.clone(), *stats))
            .collect()
    }

    /// Jobs queued, running and dead of one app.
    pub fn app_stats(&self, app: &str) -> JobStats {
        self.counts().get(app).copied().unwrap_or_default()
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobStats>> {
        self.inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more queued job for `app`, or refuses when its queue is full. Undo with
    /// `shift(app, Some(Queued), None)` when the job is not stored after all.
    fn reserve_queued(&self, app: &str) -> Result<(), JobError> {
        let limit = self.inner.limits.max_queued_per_app;
        let mut counts = self.counts();
        let stats = counts.entry(app.to_string()).or_default();
        let kept = self.inner.limits.max_completed_per_app;
        if stats.completed >= kept as u64 {
            if stats.is_empty() {
                counts.remove(app);
            }
            return Err(JobError::ResultsFull {
                app: app.to_string(),
                limit: kept,
            });
        }
        if stats.queued + stats.running >= limit as u64 {
            if stats.is_empty() {
                counts.remove(app);
            }
            return Err(JobError::QueueFull {
                app: app.to_string(),
                limit,
            });
        }
        stats.queued += 1;
        Ok(())
    }

    /// Moves one of `app`'s jobs from one counted state to another (None: not counted).
    fn shift(&self, app: &str, from: Option<JobState>, to: Option<JobState>) {
        let mut counts = self.counts();
        let stats = counts.entry(app.to_string()).or_default();
        if let Some(counter) = from.and_then(|state| stats.counter(state)) {
            *counter = counter.saturating_sub(1);
        }
        if let Some(counter) = to.and_then(|state| stats.counter(state)) {
            *counter += 1;
        }
        if stats.is_empty() {
            counts.remove(app);
        }
    }

    /// Every readable job record (unreadable ones are logged and skipped).
    fn records(&self) -> impl Iterator<Item = Result<JobRecord, StoreError>> + '_ {
        self.inner.jobs.iter().filter_map(|entry| match entry {
            Err(error) => Some(Err(error.into())),
            Ok((key, bytes)) => readable(&key, &bytes).map(Ok),
        })
    }

    /// Runs `change` as one transaction over all the queue's trees (not yet durable).
    fn transact<T, E: From<StoreError>>(
        &self,
        change: impl Fn(&Tx<'_>) -> TxResult<T, E>,
    ) -> Result<T, E> {
        let inner = &self.inner;
        (
            &inner.jobs,
            &inner.bodies,
            &inner.results,
            &inner.queue,
            &inner.keys,
            &inner.dead,
        )
            .transaction(|(jobs, bodies, results, queue, keys, dead)| {
                change(&Tx {
                    jobs,
                    bodies,
                    results,
                    queue,
                    keys,
                    dead,
                })
            })
            .map_err(|error| match error {
                TransactionError::Abort(error) => error,
                TransactionError::Storage(error) => StoreError::from(error).into(),
            })
    }

    /// Waits until a job is queued due now (or a permit from an earlier wake-up is used).
    async fn wait_for_queued(&self) {
        self.inner.wake.notified().await;
    }
}

/// How long to wait before the retry that follows attempt `attempt` (1 for the first):
/// 1 s × 2^(attempt-1), capped at 5 minutes, then drawn from [cap/2, cap] ("equal jitter").
pub fn backoff<R: Rng + ?Sized>(attempt: u32, rng: &mut R) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let cap_ms = (BACKOFF_BASE_MS << doublings).min(BACKOFF_CAP_MS);
    Duration::from_millis(rng.gen_range(cap_ms / 2..=cap_ms))
}

/// Milliseconds since the Unix epoch, as job records store times.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn new_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn queue_key(due_ms: u64, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(DUE_BYTES + id.len());
    key.extend_from_slice(&due_ms.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

fn parse_queue_key(key: &[u8]) -> Option<(u64, String)> {
    let (due, id) = key.split_first_chunk::<DUE_BYTES>()?;
    let id = std::str::from_utf8(id).ok().filter(|id| !id.is_empty())?;
    Some((u64::from_be_bytes(*due), id.to_string()))
}

fn dead_key(app: &str, id: &str) -> String {
    format!("{app}/{id}")
}

fn idempotency_key(app: &str, key: &str) -> String {
    format!("{app}/{key}")
}

fn parse_record(id: &str, bytes: &[u8]) -> Result<JobRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: id.to_string(),
        source,
    })
}

/// Parses a record found while scanning; an unreadable one is logged and skipped.
fn readable(key: &[u8], bytes: &[u8]) -> Option<JobRecord> {
    let key = String::from_utf8_lossy(key);
    parse_record(&key, bytes)
        .inspect_err(|error| tracing::warn!(%error, "skipping a job record that cannot be read"))
        .ok()
}

fn corrupt(key: &str, problem: &str) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        source: <serde_json::Error as serde::de::Error>::custom(problem),
    }
}

#[cfg(test)]
mod tests;
