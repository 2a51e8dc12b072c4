//! Rate limits of an app: `rate_limit` caps the requests the app as a whole takes,
//! `client_rate_limit` those one client may send it. Both are GCRA limiters (governor): a
//! sustained rate per second and a burst allowed after a quiet spell.
//!
//! The client limit is checked first, so a client over its own limit is refused without
//! spending the app's budget, which stays for the others. A request the app limit refuses has
//! still counted against its client's limit: retrying does not get around either.
//!
//! The caller decides what a client is (its IP address, for IPv6 a /64 prefix since one host
//! commonly holds a whole /64; `app:<name>` for calls between apps) and passes it as a string.
//!
//! One state is kept per client, up to `max_clients`. Past that, states that are back to
//! fresh (their client has been quiet for `(burst + 1) / per_second` seconds at most) are
//! forgotten, at most once a second; if every tracked client is still active, NEW clients are
//! refused (scope [`Scope::Client`]) until some go quiet, while known clients keep their
//! service. The alternative, clearing all states, would let anyone who rotates through many
//! addresses reset every client's limit, their own included; refusing keeps memory bounded and
//! the limits honest, and an attacker must keep `max_clients` distinct clients active to keep
//! the table full.
//!
//! Where work runs: inline on the reactor. A check is a few atomic operations on one shard of
//! a concurrent map; forgetting stale clients walks the map (bounded by `max_clients`) at
//! most once a second, without holding a lock other checks wait on.

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest `per_second` and `burst` a spec may ask for.
const MAX_RATE: u32 = 1_000_000;

/// How often, at most, stale client states are looked for when the table is full.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A rate limit as a deployment declares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Requests per second, sustained.
    pub per_second: u32,
    /// Requests that may come at once after a quiet spell.
    pub burst: u32,
}

impl RateLimitSpec {
    /// Checks that both numbers are between 1 and 1 000 000.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [("per_second", self.per_second), ("burst", self.burst)] {
            if !(1..=MAX_RATE).contains(&value) {
                return Err(format!(
                    "rate limit {name} must be between 1 and {MAX_RATE}, not {value}"
                ));
            }
        }
        Ok(())
    }

    /// The quota, with numbers out of range brought into it (specs are validated on deploy).
    fn quota(&self) -> Quota {
        let clamp = |value: u32| NonZeroU32::new(value.min(MAX_RATE)).unwrap_or(NonZeroU32::MIN);
        Quota::per_second(clamp(self.per_second)).allow_burst(clamp(self.burst))
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The app as a whole takes no more requests for now.
    App,
    /// This client sent more than its share, or it is new and the app already tracks as many
    /// clients as it may.
    Client,
}

/// A request refused by a rate limit, and how long until one may pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} rate limit is reached; retry in {} s",
    match .scope { Scope::App => "the app's", Scope::Client => "the per-client" },
    self.retry_after_secs()
)]
pub struct RateLimited {
    /// Which limit refused the request.
    pub scope: Scope,
    /// How long until a request could pass (it may be zero when the refusal is a near miss).
    pub retry_after: Duration,
}

impl RateLimited {
    /// `retry_after` in whole seconds, rounded up and at least 1: the `Retry-After` header.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// The per-client states, shared between governor's limiter and [`ClientLimits`], which needs
/// to ask whether a client is tracked (the limiter cannot say).
struct SharedStates(Arc<DashMapStateStore<String>>);

impl StateStore for SharedStates {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<String> for SharedStates {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

type NoOp<C> = NoOpMiddleware<<C as Clock>::Instant>;

/// The per-client limit, with its bounded table of client states.
struct ClientLimits<C: Clock> {
    limiter: RateLimiter<String, SharedStates, C, NoOp<C>>,
    states: Arc<DashMapStateStore<String>>,
    max_clients: usize,
    /// What the sweep schedule counts from.
    epoch: C::Instant,
    /// When the next sweep may run, in nanoseconds since `epoch`.
    next_sweep: AtomicU64,
}

impl<C: Clock> ClientLimits<C> {
    fn new(spec: &RateLimitSpec, max_clients: usize, clock: C) -> Self {
        let states = Arc::new(DashMapStateStore::default());
        let epoch = clock.now();
        Self {
            limiter: RateLimiter::new(spec.quota(), SharedStates(states.clone()), clock),
            states,
            max_clients: max_clients.max(1),
            epoch,
            next_sweep: AtomicU64::new(0),
        }
    }

    fn check(&self, client: &str) -> Result<(), RateLimited> {
        if !self.states.contains_key(client) && self.states.len() >= self.max_clients {
            self.make_room()?;
        }
        self.limiter
            .check_key(&client.to_owned())
            .map_err(|not_until| refusal(Scope::Client, &not_until, self.limiter.clock()))
    }

    /// Forgets clients whose state is back to fresh, unless that was tried less than
    /// [`SWEEP_INTERVAL`] ago; refuses the new client if the table is still full.
    fn make_room(&self) -> Result<(), RateLimited> {
        let now = u64::from(self.limiter.clock().now().duration_since(self.epoch));
        let next = self.next_sweep.load(Ordering::Relaxed);
        let interval = u64::from(Nanos::from(SWEEP_INTERVAL));
        let mut retry_at = next;
        if now >= next {
            retry_at = now + interval;
            // One caller sweeps; the others go on without waiting for it.
            if self
                .next_sweep
                .compare_exchange(next, retry_at, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.limiter.retain_recent();
                if self.states.len() < self.max_clients {
                    return Ok(());
                }
            }
        }
        Err(RateLimited {
            scope: Scope::Client,
            retry_after: Duration::from_nanos(retry_at.saturating_sub(now)),
        })
    }
}

/// The refusal for `not_until`, with the wait counted from now.
fn refusal<C: Clock>(scope: Scope, not_until: &NotUntil<C::Instant>, clock: &C) -> RateLimited {
    RateLimited {
        scope,
        retry_after: not_until.wait_time_from(clock.now()),
    }
}

/// The rate limits of one app: for the app as a whole and per client, either optional.
pub struct RateLimits<C: Clock = DefaultClock> {
    app: Option<RateLimiter<NotKeyed, InMemoryState, C, NoOp<C>>>,
    clients: Option<ClientLimits<C>>,
}

impl RateLimits {
    /// Limits from an app's specs (validated on deploy; numbers out of range are brought into
    /// it), tracking at most `max_clients` clients (at least 1).
    pub fn new(
        app: Option<RateLimitSpec>,
        client: Option<RateLimitSpec>,
        max_clients: usize,
    ) -> Self {
        Self::with_clock(app, client, max_clients, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// [`RateLimits::new`] on `clock` (tests pass a fake one).
    fn with_clock(
        app: Option<RateLimitSpec>,
        client: Option<RateLimitSpec>,
        max_clients: usize,
        clock: C,
    ) -> Self {
        Self {
            app: app.map(|spec| RateLimiter::direct_with_clock(spec.quota(), clock.clone())),
            clients: client.map(|spec| ClientLimits::new(&spec, max_clients, clock)),
        }
    }

    /// Lets one request from `client` through, or says which limit refused it and for how
    /// long. The client's limit is checked first (see the module documentation).
    pub fn check(&self, client: &str) -> Result<(), RateLimited> {
        if let Some(clients) = &self.clients {
            clients.check(client)?;
        }
        if let Some(app) = &self.app {
            app.check()
                .map_err(|not_until| refusal(Scope::App, &not_until, app.clock()))?;
        }
        Ok(())
    }

    /// How many clients have a state now (at most `max_clients`, plus at most one per check
    /// running concurrently with the one that filled the table).
    pub fn tracked_clients(&self) -> usize {
        self.clients
            .as_ref()
            .map_or(0, |clients| clients.states.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn spec(per_second: u32, burst: u32) -> Option<RateLimitSpec> {
        Some(RateLimitSpec { per_second, burst })
    }

    fn limits(
        app: Option<RateLimitSpec>,
        client: Option<RateLimitSpec>,
        max_clients: usize,
    ) -> (RateLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(app, client, max_clients, clock.clone());
        (limits, clock)
    }

    #[test]
    fn a_burst_passes_then_requests_wait() {
        let (limits, clock) = limits(spec(2, 3), None, 10);
        for _ in 0..3 {
            limits.check("a").unwrap();
        }
        let refused = limits.check("b").unwrap_err();
        assert_eq!(refused.scope, Scope::App);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(refused.retry_after_secs(), 1);
        assert_eq!(
            refused.to_string(),
            "the app's rate limit is reached; retry in 1 s"
        );
        clock.advance(refused.retry_after);
        limits.check("b").unwrap();
        assert!(limits.check("b").is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let refused = |retry_after| RateLimited {
            scope: Scope::Client,
            retry_after,
        };
        assert_eq!(refused(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(refused(Duration::from_secs(2)).retry_after_secs(), 2);
        assert_eq!(refused(Duration::from_millis(2001)).retry_after_secs(), 3);
    }

    #[test]
    fn clients_have_their_own_limits() {
        let (limits, _clock) = limits(None, spec(1, 1), 10);
        limits.check("a").unwrap();
        let refused = limits.check("a").unwrap_err();
        assert_eq!(refused.scope, Scope::Client);
        assert!(refused.retry_after > Duration::ZERO);
        limits.check("b").unwrap();
        assert_eq!(limits.tracked_clients(), 2);
    }

    #[test]
    fn a_client_over_its_limit_does_not_spend_the_apps() {
        let (limits, _clock) = limits(spec(1, 4), spec(1, 2), 10);
        for _ in 0..2 {
            limits.check("noisy").unwrap();
        }
        for _ in 0..8 {
            assert_eq!(limits.check("noisy").unwrap_err().scope, Scope::Client);
        }
        // The app has spent 2 of its 4: two more clients' requests pass.
        limits.check("quiet").unwrap();
        limits.check("quiet").unwrap();
        assert_eq!(limits.check("other").unwrap_err().scope, Scope::App);
    }

    #[test]
    fn without_limits_everything_passes() {
        let (limits, _clock) = limits(None, None, 10);
        for i in 0..100 {
            limits.check(&i.to_string()).unwrap();
        }
        assert_eq!(limits.tracked_clients(), 0);
    }

    #[test]
    fn tracked_clients_stay_bounded_under_many_keys() {
        let max_clients = 1_000;
        let (limits, clock) = limits(None, spec(10, 5), max_clients);
        let mut refused = 0;
        for i in 0..100_000 {
            if let Err(refusal) = limits.check(&format!("client-{i}")) {
                assert_eq!(refusal.scope, Scope::Client);
                assert!(refusal.retry_after > Duration::ZERO);
                refused += 1;
            }
            assert!(limits.tracked_clients() <= max_clients);
        }
        assert_eq!(refused, 100_000 - max_clients);
        // Known clients keep their service while new ones are refused.
        limits.check("client-0").unwrap();

        // Once the tracked clients have been quiet long enough, new ones get in again.
        clock.advance(Duration::from_secs(2));
        limits.check("newcomer").unwrap();
        assert!(limits.tracked_clients() <= max_clients);
    }

    #[test]
    fn limits_on_the_real_clock_track_at_least_one_client() {
        let limits = RateLimits::new(None, spec(1, 1), 0);
        limits.check("a").unwrap();
        assert_eq!(limits.tracked_clients(), 1);
    }

    #[test]
    fn specs_are_validated() {
        for (per_second, burst) in [(1, 1), (1_000_000, 1_000_000)] {
            assert_eq!(RateLimitSpec { per_second, burst }.validate(), Ok(()));
        }
        for (per_second, burst) in [(0, 1), (1, 0), (1_000_001, 1), (1, u32::MAX)] {
            assert!(RateLimitSpec { per_second, burst }.validate().is_err());
        }
        let spec: RateLimitSpec = toml::from_str("per_second = 5\nburst = 10").unwrap();
        assert_eq!(
            spec,
            RateLimitSpec {
                per_second: 5,
                burst: 10
            }
        );
        assert!(toml::from_str::<RateLimitSpec>("per_second = 5\nburst = 10\nrate = 1").is_err());
    }
}
