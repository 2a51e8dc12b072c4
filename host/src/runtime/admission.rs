//! Admission: how many instances run at once, how many requests may wait for one and for how
//! long, and how many request-body bytes the node holds in memory at once. Past any of these a
//! request is refused at once with 503 and `Retry-After`, never left waiting without bound.

use super::InvokeError;
use crate::config::LimitsConfig;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a refused client is told to wait before it tries again, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// The node's admission limits (`[limits]`).
pub struct Admission {
    instances: Arc<Semaphore>,
    max_instances: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    queue_timeout: Duration,
    body_bytes: Arc<Semaphore>,
}

impl Admission {
    pub fn new(limits: &LimitsConfig) -> Self {
        let max_instances = limits.max_concurrent_instances.max(1) as usize;
        let body_bytes = usize::try_from(limits.max_buffered_body_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            instances: Arc::new(Semaphore::new(max_instances)),
            max_instances,
            waiting: AtomicUsize::new(0),
            max_waiting: limits.max_queued_requests as usize,
            queue_timeout: Duration::from_secs(limits.queue_timeout_secs),
            body_bytes: Arc::new(Semaphore::new(body_bytes)),
        }
    }

    /// A slot to run an instance in: at once if one is free, else after waiting in the queue
    /// (in arrival order) for at most the queue timeout. A full queue refuses at once.
    pub async fn instance(&self) -> Result<OwnedSemaphorePermit, InvokeError> {
        if let Ok(permit) = self.instances.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _in_queue = Waiting(&self.waiting);
        if queued >= self.max_waiting {
            return Err(overloaded(format!(
                "the node is at its limit of {} running instances and {} waiting requests",
                self.max_instances, self.max_waiting
            )));
        }
        let acquired =
            tokio::time::timeout(self.queue_timeout, self.instances.clone().acquire_owned()).await;
        match acquired {
            Ok(permit) => Ok(permit.expect("the instance semaphore is never closed")),
            Err(_) => Err(overloaded(format!(
                "no instance became free within {} s (the node runs at most {} at once)",
                self.queue_timeout.as_secs(),
                self.max_instances
            ))),
        }
    }

    /// Instances running now.
    pub fn running(&self) -> usize {
        self.max_instances - self.instances.available_permits()
    }

    /// Requests waiting for an instance now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed).min(self.max_waiting)
    }

    /// An empty claim on the node's request-body budget, to [`BodyReservation::grow`] as a
    /// body arrives.
    pub fn body_reservation(&self) -> BodyReservation {
        BodyReservation {
            budget: self.body_bytes.clone(),
            held: None,
        }
    }
}

/// Counts a request in the queue while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn overloaded(reason: String) -> InvokeError {
    InvokeError::Overloaded {
        reason,
        retry_after_secs: RETRY_AFTER_SECS,
    }
}

/// Bytes of request bodies held in memory, given back to the node's budget when dropped.
pub struct BodyReservation {
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

impl BodyReservation {
    /// Claims `bytes` more, or refuses at once if the node's budget does not have them.
    pub fn grow(&mut self, bytes: usize) -> Result<(), InvokeError> {
        if bytes == 0 {
            return Ok(());
        }
        let refused = || {
            overloaded(
                "the node holds as many request bodies in memory as it may (limits.max_buffered_body_bytes)"
                    .into(),
            )
        };
        let bytes = u32::try_from(bytes).map_err(|_| refused())?;
        let permit = self
            .budget
            .clone()
            .try_acquire_many_owned(bytes)
            .map_err(|_| refused())?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Ok(())
    }
}
