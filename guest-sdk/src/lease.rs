//! Leases: named locks with an expiry, one namespace per app (`tensorlet:platform/lease`).
//! A lease is let go when the [`Lease`] is dropped, when the instance ends (a trap or a
//! timeout included) or when its time runs out, so a crashed step never holds a lock for ever.
//!
//! ```ignore
//! let Some(lease) = tensorlet_sdk::lease::acquire("order-42", Duration::from_secs(10))? else {
//!     return Response::text(409, "order 42 is being processed");
//! };
//! // … work that must not run twice at once …
//! drop(lease);
//! ```

use crate::bindings::tensorlet::platform::lease;
use std::time::Duration;

/// A lease this instance holds; released when dropped.
pub struct Lease(lease::Held);

impl Lease {
    /// Extends the lease to `ttl` from now. False when it had already run out: another
    /// instance may hold the name, and this one must stop acting as its holder.
    pub fn renew(&self, ttl: Duration) -> bool {
        self.0.renew(millis(ttl))
    }
}

fn millis(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX)
}

/// Takes lease `name` for `ttl` (at most 5 minutes); `None` while another instance holds it.
pub fn acquire(name: &str, ttl: Duration) -> Result<Option<Lease>, String> {
    Ok(lease::acquire(name, millis(ttl))?.map(Lease))
}
