//! Named queues (`tensorlet:platform/queue`): a component sends a message to a queue by name;
//! the app whose manifest `consumes` that queue is triggered by it, as an async job (durable,
//! retried, dead-lettered like any job) that `POST`s the message to `/queues/<queue>`. The
//! producer never names the consumer, so either can be redeployed or replaced alone.

use super::Runtime;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use wasmtime::component::{HasData, Linker};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "tensorlet:platform/queue-imports",
        imports: {
            "tensorlet:platform/queue.send": async | trappable,
            default: trappable,
        },
        require_store_data_send: true,
    });
}

use bindings::tensorlet::platform::queue;

/// The header that tells a consumer which queue a message came from.
pub const QUEUE_HEADER: &str = "tensorlet-queue";
/// The header that tells a consumer which app sent the message.
pub const PRODUCER_HEADER: &str = "tensorlet-producer";

/// Removes the queue headers from a request that did not come from a queue: only the node
/// sets them, so a consumer can trust them.
pub fn strip_queue_headers(headers: &mut http::HeaderMap) {
    headers.remove(QUEUE_HEADER);
    headers.remove(PRODUCER_HEADER);
}

/// A message on its way to a queue's consumer.
pub struct Message {
    pub queue: String,
    pub consumer: String,
    pub producer: String,
    pub body: Vec<u8>,
}

/// Where messages are stored until their consumer runs (the node's job queue).
pub trait QueueSink: Send + Sync {
    /// Stores `message` durably; the id of the job that will deliver it.
    fn send(
        &self,
        message: Message,
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>>;
}

/// One instance's view: the app that sends, and the runtime that knows the consumers.
pub struct QueueCtx {
    runtime: Weak<Runtime>,
    producer: Arc<str>,
    /// The producer's tenant: its messages go only to its tenant's consumers.
    tenant: Arc<str>,
}

impl QueueCtx {
    pub fn new(runtime: Weak<Runtime>, producer: &str, tenant: &str) -> Self {
        Self {
            runtime,
            producer: producer.into(),
            tenant: tenant.into(),
        }
    }
}

struct HasQueue;

impl HasData for HasQueue {
    type Data<'a> = &'a mut QueueCtx;
}

/// Gives components `tensorlet:platform/queue`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> &mut QueueCtx,
) -> wasmtime::Result<()> {
    queue::add_to_linker::<T, HasQueue>(linker, view)
}

impl queue::Host for &mut QueueCtx {
    async fn send(
        &mut self,
        name: String,
        message: Vec<u8>,
    ) -> wasmtime::Result<Result<String, String>> {
        let Some(runtime) = self.runtime.upgrade() else {
            return Ok(Err("the node is shutting down".into()));
        };
        let consumer = runtime.consumer_of(&name).filter(|consumer| {
            runtime
                .app(consumer)
                .is_some_and(|app| *app.record.tenant == *self.tenant)
        });
        let Some(consumer) = consumer else {
            return Ok(Err(format!(
                "no app of this tenant consumes queue {name:?} (a consumer lists it in `app.consumes`)"
            )));
        };
        let limit = runtime
            .app(&consumer)
            .and_then(|app| app.latest().map(|r| r.record.spec.max_body_bytes))
            .unwrap_or(0);
        if message.len() as u64 > limit {
            return Ok(Err(format!(
                "the message is {} bytes; app {consumer:?} accepts at most {limit}",
                message.len()
            )));
        }
        let Some(sink) = runtime.queue_sink.get().cloned() else {
            return Ok(Err("this node has no job queue".into()));
        };
        Ok(sink
            .send(Message {
                queue: name,
                consumer,
                producer: self.producer.to_string(),
                body: message,
            })
            .await)
    }
}
