//! Admission: how many instances run at once (on the node, and per revision), how many
//! requests may wait for one and for how long, and how many request-body bytes the node holds in memory at once. Past any of these a
//! request is refused at once with 503 and `Retry-After`, never left waiting without bound.

use super::InvokeError;
use crate::config::LimitsConfig;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a refused client is told to wait before it tries again, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// A number of slots with a bounded, timed queue in front: the node's instance limit, and
/// each revision's `max_concurrency`.
pub struct Gate {
    slots: Arc<Semaphore>,
    max_slots: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    queue_timeout: Duration,
    /// Who is at the limit, for messages: "the node", "app hello (revision 3)".
    holder: String,
}

impl Gate {
    /// `max_slots` at once (at least 1) for `holder`, with at most `max_waiting` requests
    /// waiting at most `queue_timeout` for one.
    pub fn new(
        holder: String,
        max_slots: usize,
        max_waiting: usize,
        queue_timeout: Duration,
    ) -> Self {
        let max_slots = max_slots.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_slots)),
            max_slots,
            waiting: AtomicUsize::new(0),
            max_waiting,
            queue_timeout,
            holder,
        }
    }

    /// A slot: at once if one is free, else after waiting in the queue (in arrival order) for
    /// at most the queue timeout. A full queue refuses at once.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, InvokeError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _in_queue = Waiting(&self.waiting);
        if queued >= self.max_waiting {
            return Err(overloaded(format!(
                "{} is at its limit of {} running and {} waiting requests",
                self.holder, self.max_slots, self.max_waiting
            )));
        }
        let acquired =
            tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await;
        match acquired {
            Ok(permit) => Ok(permit.expect("a gate's semaphore is never closed")),
            Err(_) => Err(overloaded(format!(
                "no slot became free within {} s ({} runs at most {} requests at once)",
                self.queue_timeout.as_secs(),
                self.holder,
                self.max_slots
            ))),
        }
    }

    /// Requests running now.
    pub fn running(&self) -> usize {
        self.max_slots - self.slots.available_permits()
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed).min(self.max_waiting)
    }
}

/// The slots one running request holds: its revision's, if it has a limit, and the node's
/// (unless it is a call from another app, whose caller holds one).
pub struct Slot {
    _revision: Option<OwnedSemaphorePermit>,
    _node: Option<OwnedSemaphorePermit>,
}

/// The node's admission limits (`[limits]`).
pub struct Admission {
    instances: Gate,
    body_bytes: Arc<Semaphore>,
}

impl Admission {
    /// The node's limits as `[limits]` sets them.
    pub fn new(limits: &LimitsConfig) -> Self {
        let body_bytes = usize::try_from(limits.max_buffered_body_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            instances: Gate::new(
                "the node".into(),
                limits.max_concurrent_instances as usize,
                limits.max_queued_requests as usize,
                Duration::from_secs(limits.queue_timeout_secs),
            ),
            body_bytes: Arc::new(Semaphore::new(body_bytes)),
        }
    }

    /// A slot to run an instance in: first the revision's (when it limits its concurrency),
    /// then, when `node` says so, the node's, each within its queue's length and time.
    pub async fn slot(&self, revision: Option<&Gate>, node: bool) -> Result<Slot, InvokeError> {
        let revision = match revision {
            Some(gate) => Some(gate.enter().await?),
            None => None,
        };
        let node = match node {
            true => Some(self.instances.enter().await?),
            false => None,
        };
        Ok(Slot {
            _revision: revision,
            _node: node,
        })
    }

    /// Instances running now.
    pub fn running(&self) -> usize {
        self.instances.running()
    }

    /// Requests waiting for an instance now.
    pub fn queued(&self) -> usize {
        self.instances.queued()
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

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError<E> {
    /// Over the limit it was read under.
    TooLarge,
    /// The node's body budget is spent (503).
    Refused(InvokeError),
    /// The sender broke off or sent garbage.
    Broken(E),
}

/// Reads a body of at most `limit` bytes, claiming its bytes from the node's budget as they
/// arrive (a declared length only sizes the buffer): a client's request body, and the body of
/// a call from one app to another.
pub async fn read_body<B>(
    body: B,
    limit: u64,
    declared: u64,
    reservation: &mut BodyReservation,
) -> Result<Bytes, BodyError<B::Error>>
where
    B: hyper::body::Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    // The declared length is the sender's word: it sizes the buffer only up to a small bound.
    let mut collected = BytesMut::with_capacity(declared.min(limit).min(64 << 10) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Broken)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = collected.len() + data.len();
        if total as u64 > limit {
            return Err(BodyError::TooLarge);
        }
        reservation.grow(data.len()).map_err(BodyError::Refused)?;
        collected.extend_from_slice(&data);
    }
    Ok(collected.freeze())
}
