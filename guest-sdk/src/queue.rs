//! Named queues (`tensorlet:platform/queue`): send a message to a queue by name, and the app
//! that consumes it (its manifest lists the queue in `app.consumes`) is triggered by it as an
//! async job: `POST /queues/<queue>` with the message as the body, retried until it succeeds
//! or becomes a dead letter.

use crate::bindings::tensorlet::platform::queue;

/// Sends `message` to queue `name`; once this returns `Ok` the message is stored durably. The
/// id is the delivering job's (`/jobs/<id>`).
pub fn send(name: &str, message: &[u8]) -> Result<String, String> {
    queue::send(name, message)
}
