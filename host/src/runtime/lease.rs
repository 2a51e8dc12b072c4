//! Leases (`tensorlet:platform/lease`): named locks with an expiry, one namespace per app, held
//! in the node's memory. A lease is released when the guest drops it, when its instance ends
//! for any reason (its resource table goes with the instance, and dropping a held lease
//! releases it), or when its time runs out and another instance takes the name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "tensorlet:platform/lease-imports",
        imports: { default: trappable },
        with: {
            "tensorlet:platform/lease.held": super::HeldLease,
        },
        require_store_data_send: true,
    });
}

use bindings::tensorlet::platform::lease;

/// The longest a lease may be taken or renewed for.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(300);
/// The longest lease name.
const MAX_NAME_BYTES: usize = 256;
/// Leases one app may hold at once.
pub const MAX_LEASES_PER_APP: usize = 1024;

/// Who holds a name, and until when.
struct Holder {
    token: u64,
    until: Instant,
}

/// Every app's leases on this node.
#[derive(Default)]
pub struct Leases {
    held: Mutex<HashMap<String, HashMap<String, Holder>>>,
    next_token: std::sync::atomic::AtomicU64,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Holder>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `name` for `app` for `ttl` unless someone holds it still; its token.
    fn acquire(&self, app: &str, name: &str, ttl: Duration) -> Result<Option<u64>, String> {
        let now = Instant::now();
        let mut held = self.lock();
        let names = held.entry(app.to_string()).or_default();
        if names.get(name).is_some_and(|holder| holder.until > now) {
            return Ok(None);
        }
        if !names.contains_key(name) && names.len() >= MAX_LEASES_PER_APP {
            names.retain(|_, holder| holder.until > now);
            if names.len() >= MAX_LEASES_PER_APP {
                return Err(format!("the app holds {MAX_LEASES_PER_APP} leases already"));
            }
        }
        let token = self
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        names.insert(
            name.to_string(),
            Holder {
                token,
                until: now + ttl,
            },
        );
        Ok(Some(token))
    }

    /// Extends the lease `token` holds; false when it no longer holds it (it ran out and
    /// someone took it, or it ran out and a renewal comes too late).
    fn renew(&self, app: &str, name: &str, token: u64, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut held = self.lock();
        match held.get_mut(app).and_then(|names| names.get_mut(name)) {
            Some(holder) if holder.token == token && holder.until > now => {
                holder.until = now + ttl;
                true
            }
            _ => false,
        }
    }

    /// Lets go of the lease `token` holds, if it still does.
    fn release(&self, app: &str, name: &str, token: u64) {
        let mut held = self.lock();
        if let Some(names) = held.get_mut(app) {
            if names.get(name).is_some_and(|holder| holder.token == token) {
                names.remove(name);
            }
            if names.is_empty() {
                held.remove(app);
            }
        }
    }
}

/// The value behind a `held` resource: released when dropped (by the guest, or with its
/// instance).
pub struct HeldLease {
    leases: Arc<Leases>,
    app: Arc<str>,
    name: String,
    token: u64,
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.leases.release(&self.app, &self.name, self.token);
    }
}

/// One instance's view of the leases: its app's namespace.
pub struct LeaseCtx {
    leases: Arc<Leases>,
    app: Arc<str>,
}

impl LeaseCtx {
    pub fn new(leases: Arc<Leases>, app: &str) -> Self {
        Self {
            leases,
            app: app.into(),
        }
    }
}

pub struct LeaseView<'a> {
    pub ctx: &'a LeaseCtx,
    pub table: &'a mut ResourceTable,
}

struct HasLeases;

impl HasData for HasLeases {
    type Data<'a> = LeaseView<'a>;
}

/// Gives components `tensorlet:platform/lease`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> LeaseView<'_>,
) -> wasmtime::Result<()> {
    lease::add_to_linker::<T, HasLeases>(linker, view)
}

fn ttl(ttl_ms: u32) -> Result<Duration, String> {
    let ttl = Duration::from_millis(u64::from(ttl_ms));
    if ttl.is_zero() || ttl > MAX_LEASE_TTL {
        return Err(format!(
            "a lease lasts 1 ms to {} s, not {ttl_ms} ms",
            MAX_LEASE_TTL.as_secs()
        ));
    }
    Ok(ttl)
}

impl lease::Host for LeaseView<'_> {
    fn acquire(
        &mut self,
        name: String,
        ttl_ms: u32,
    ) -> wasmtime::Result<Result<Option<Resource<HeldLease>>, String>> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Ok(Err(format!("a lease name is 1 to {MAX_NAME_BYTES} bytes")));
        }
        let ttl = match ttl(ttl_ms) {
            Ok(ttl) => ttl,
            Err(message) => return Ok(Err(message)),
        };
        let token = match self.ctx.leases.acquire(&self.ctx.app, &name, ttl) {
            Ok(Some(token)) => token,
            Ok(None) => return Ok(Ok(None)),
            Err(message) => return Ok(Err(message)),
        };
        let held = HeldLease {
            leases: self.ctx.leases.clone(),
            app: self.ctx.app.clone(),
            name,
            token,
        };
        Ok(Ok(Some(self.table.push(held)?)))
    }
}

impl lease::HostHeld for LeaseView<'_> {
    fn renew(&mut self, held: Resource<HeldLease>, ttl_ms: u32) -> wasmtime::Result<bool> {
        let held = self.table.get(&held)?;
        let Ok(ttl) = ttl(ttl_ms) else {
            return Ok(false);
        };
        Ok(held.leases.renew(&held.app, &held.name, held.token, ttl))
    }

    fn drop(&mut self, held: Resource<HeldLease>) -> wasmtime::Result<()> {
        self.table.delete(held)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_has_one_holder_until_it_lets_go_or_its_time_runs_out() {
        let leases = Leases::default();
        let first = leases
            .acquire("app", "order-1", Duration::from_millis(50))
            .unwrap()
            .unwrap();
        assert_eq!(
            leases.acquire("app", "order-1", Duration::from_secs(1)),
            Ok(None)
        );
        assert!(
            leases
                .acquire("other", "order-1", Duration::from_secs(1))
                .unwrap()
                .is_some(),
            "apps have their own names"
        );
        std::thread::sleep(Duration::from_millis(60));
        let second = leases
            .acquire("app", "order-1", Duration::from_secs(1))
            .unwrap()
            .unwrap();
        assert!(!leases.renew("app", "order-1", first, Duration::from_secs(1)));
        // The first holder's late release does not free the second's lease.
        leases.release("app", "order-1", first);
        assert_eq!(
            leases.acquire("app", "order-1", Duration::from_secs(1)),
            Ok(None)
        );
        assert!(leases.renew("app", "order-1", second, Duration::from_secs(1)));
        leases.release("app", "order-1", second);
        assert!(leases
            .acquire("app", "order-1", Duration::from_secs(1))
            .unwrap()
            .is_some());
    }

    #[test]
    fn an_app_holds_a_bounded_number_of_leases() {
        let leases = Leases::default();
        for i in 0..MAX_LEASES_PER_APP {
            leases
                .acquire("app", &i.to_string(), Duration::from_secs(60))
                .unwrap()
                .unwrap();
        }
        assert!(leases
            .acquire("app", "one-more", Duration::from_secs(60))
            .is_err());
        assert!(ttl(0).is_err() && ttl(300_001).is_err() && ttl(1).is_ok());
    }
}
