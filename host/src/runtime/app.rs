//! Deployed apps as the runtime serves them: an [`App`] routes each request to one of its
//! [`Revision`]s (by tag, number, sticky key or the traffic split) and a revision holds what
//! serving it needs: its concurrency gate, its prepared component while it is warm (dropped
//! when it scales to zero), the instances it keeps between requests when it reuses them, and
//! its counters.

use super::admission::Gate;
use super::instance::{IdleInstance, InstanceState};
use super::InvokeError;
use crate::apps::rate::RateLimits;
use crate::apps::traffic::{self, Split};
use crate::apps::{AppRecord, RevisionRecord};
use crate::store::blobs::Held;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use wasmtime_wasi_config::WasiConfigVariables;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// A deployed app, ready to route requests to its revisions.
pub struct App {
    /// What the node keeps about the app (traffic, rate limits, fallback, routes).
    pub record: AppRecord,
    /// Its revisions that are kept, by number.
    pub revisions: BTreeMap<u32, Arc<Revision>>,
    split: Split,
    tags: HashMap<String, u32>,
    /// Its rate limiters (kept across changes that leave the limits as they are).
    pub rate: Arc<RateLimits>,
    /// Its placement selects this node: it serves requests here (else peers serve them).
    pub placed: bool,
}

impl App {
    /// Its newest revision.
    pub fn latest(&self) -> Option<&Arc<Revision>> {
        self.revisions.get(&self.record.latest)
    }

    /// The app `record` serving `revisions` (which must hold every revision its split and
    /// fallback name), here when `placed`.
    pub fn new(
        record: AppRecord,
        revisions: BTreeMap<u32, Arc<Revision>>,
        rate: Arc<RateLimits>,
        placed: bool,
    ) -> Self {
        let split = Split::new(&record.traffic, record.latest);
        let tags = record
            .traffic
            .iter()
            .filter_map(|target| {
                let tag = target.tag.clone()?;
                Some((tag, traffic::resolve(target.revision, record.latest)))
            })
            .collect();
        Self {
            record,
            revisions,
            split,
            tags,
            rate,
            placed,
        }
    }

    /// The revision a request goes to: the one `selector` names (a tag or a revision number,
    /// from `/apps/<app>@<selector>/`), else by the split, keyed by `sticky` when given.
    pub fn route(
        &self,
        selector: Option<&str>,
        sticky: Option<&[u8]>,
    ) -> Result<Arc<Revision>, InvokeError> {
        let number = match selector {
            Some(selector) => match self.tags.get(selector) {
                Some(number) => *number,
                None => selector.parse::<u32>().map_err(|_| {
                    InvokeError::NotFound(format!(
                        "app {:?} has no tag {selector:?}",
                        self.record.name
                    ))
                })?,
            },
            None => self.split.pick(sticky),
        };
        self.revisions.get(&number).cloned().ok_or_else(|| {
            InvokeError::NotFound(format!(
                "app {:?} has no revision {number}",
                self.record.name
            ))
        })
    }
}

/// Counters of one revision, from node start.
#[derive(Default, Serialize)]
pub struct RevisionStats {
    /// Requests that found the revision warm (its component prepared).
    pub warm_starts: AtomicU64,
    /// Requests that had to prepare it first, from the compile cache (after scaling to zero
    /// or a node start).
    pub cold_starts: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Requests answered by the app's fallback instead.
    pub fallbacks: AtomicU64,
    /// Requests served by an instance an earlier request left (`requests_per_instance` > 1).
    pub instance_reuses: AtomicU64,
}

/// What a revision's instances read through `wasi:config`: its config values and its app's
/// secrets (which win), with the generation of those secrets (a change starts a new one, so
/// that cached answers computed with old secrets are not reused).
pub struct RevisionConfig {
    pub generation: u64,
    pub variables: Arc<WasiConfigVariables>,
}

/// One revision as the runtime serves it. It holds its component's blob while it lives: a
/// revision removed while requests still use it keeps its files until the last one ends.
pub struct Revision {
    pub record: RevisionRecord,
    /// The tenant its app belongs to: what its instances may reach (models, buckets) is that
    /// tenant's.
    pub tenant: String,
    /// Its own concurrency limit and queue, when it declares `max_concurrency`.
    pub gate: Option<Gate>,
    /// What its cached responses are filed under: its app, component and settings, so that a
    /// revision of the same number after the app was removed and deployed again never sees
    /// another's answers.
    pub cache_scope: String,
    /// The prepared component while warm; `None` once scaled to zero.
    prepared: tokio::sync::Mutex<Option<ProxyPre<InstanceState>>>,
    /// Instances that served a request and wait for the next (`requests_per_instance` > 1),
    /// the most recently used last.
    idle: std::sync::Mutex<Vec<IdleInstance>>,
    config: RwLock<Arc<RevisionConfig>>,
    /// The hold on the component's blob, let go when the revision goes once retired.
    hold: Option<Held>,
    /// Its record is deleted: the last request using it lets its component go.
    retired: AtomicBool,
    /// When a request last started, in milliseconds since `born`.
    last_used_ms: AtomicU64,
    born: Instant,
    pub stats: RevisionStats,
}

impl Drop for Revision {
    /// A retired revision lets its blob go with its last user; one dropped because the node
    /// stops keeps it (its record still holds it).
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            if self.retired.load(Ordering::Relaxed) {
                hold.release_in_background();
            } else {
                hold.keep();
            }
        }
    }
}

impl Revision {
    /// The revision `record`, holding its component's blob with `hold`, prepared already or
    /// not, with its app's `secrets`.
    pub fn new(
        record: RevisionRecord,
        tenant: &str,
        hold: Held,
        prepared: Option<ProxyPre<InstanceState>>,
        secrets: &[(String, String)],
    ) -> Self {
        let gate = record.spec.max_concurrency.map(|slots| {
            Gate::new(
                format!("app {} (revision {})", record.app, record.number),
                slots as usize,
                record.spec.max_queued as usize,
                Duration::from_secs(record.spec.queue_timeout_secs),
            )
        });
        let settings = serde_json::to_vec(&record.spec).expect("records serialise");
        let cache_scope = format!(
            "{}/{}/{}",
            crate::tenancy::scoped_name(tenant, &record.app),
            record.digest,
            crate::store::blobs::digest_of(&settings)
        );
        let config = RwLock::new(Arc::new(RevisionConfig {
            generation: 0,
            variables: Arc::new(config_variables(&record, secrets)),
        }));
        Self {
            cache_scope,
            config,
            hold: Some(hold),
            retired: AtomicBool::new(false),
            record,
            tenant: tenant.to_string(),
            gate,
            prepared: tokio::sync::Mutex::new(prepared),
            idle: std::sync::Mutex::new(Vec::new()),
            last_used_ms: AtomicU64::new(0),
            born: Instant::now(),
            stats: RevisionStats::default(),
        }
    }

    /// What its instances read through `wasi:config` now.
    pub fn config(&self) -> Arc<RevisionConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Gives the revision its app's new secrets. Kept instances go: a guest may have read
    /// the old ones into its memory.
    pub fn set_secrets(&self, secrets: &[(String, String)]) {
        let mut config = self.config.write().expect("config lock");
        *config = Arc::new(RevisionConfig {
            generation: config.generation + 1,
            variables: Arc::new(config_variables(&self.record, secrets)),
        });
        drop(config);
        self.drop_idle();
    }

    fn idle_instances(&self) -> std::sync::MutexGuard<'_, Vec<IdleInstance>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The instance that served this revision's last request and waits for the next, if any.
    pub fn take_idle(&self) -> Option<IdleInstance> {
        let instance = self.idle_instances().pop();
        if instance.is_some() {
            self.stats.instance_reuses.fetch_add(1, Ordering::Relaxed);
        }
        instance
    }

    /// Instances kept for the next requests now.
    pub fn idle_count(&self) -> usize {
        self.idle_instances().len()
    }

    /// Keeps `instance` for a next request while the revision is warm (else hands it back).
    pub fn keep_idle(&self, instance: IdleInstance) -> Result<(), IdleInstance> {
        if !self.is_warm() {
            return Err(instance);
        }
        self.idle_instances().push(instance);
        Ok(())
    }

    /// Takes out the kept instance of `number` (to let it go), if it still waits here.
    pub fn remove_idle(&self, number: u64) -> Option<IdleInstance> {
        let mut idle = self.idle_instances();
        let index = idle
            .iter()
            .position(|instance| instance.number() == number)?;
        Some(idle.remove(index))
    }

    /// Drops every kept instance (outside the lock: dropping a store runs the destructors
    /// of the guest's resources).
    fn drop_idle(&self) {
        let idle = std::mem::take(&mut *self.idle_instances());
        drop(idle);
    }

    /// Marks the revision's record deleted: when the last request using it ends, its
    /// component's blob is let go.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Lets go of the component's blob of a retired revision nothing uses any more, and waits
    /// for its deletion if it was the last hold.
    pub async fn release(mut self) {
        if let Some(hold) = self.hold.take() {
            hold.release_async().await;
        }
    }

    /// The prepared component, preparing it with `prepare` (blocking: it reads the compile
    /// cache) when the revision is cold. Concurrent cold requests prepare it once.
    pub async fn prepared<F>(&self, prepare: F) -> Result<ProxyPre<InstanceState>, InvokeError>
    where
        F: FnOnce() -> Result<ProxyPre<InstanceState>, InvokeError> + Send + 'static,
    {
        self.last_used_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut slot = self.prepared.lock().await;
        if let Some(pre) = slot.as_ref() {
            self.stats.warm_starts.fetch_add(1, Ordering::Relaxed);
            return Ok(pre.clone());
        }
        let pre = tokio::task::spawn_blocking(prepare).await.map_err(|e| {
            InvokeError::Instantiate(format!("preparing the component failed: {e}"))
        })??;
        self.stats.cold_starts.fetch_add(1, Ordering::Relaxed);
        *slot = Some(pre.clone());
        Ok(pre)
    }

    /// The prepared component if the revision is warm now (without waiting for a cold start
    /// in progress).
    pub fn prepared_now(&self) -> Option<ProxyPre<InstanceState>> {
        self.prepared.try_lock().ok().and_then(|slot| slot.clone())
    }

    /// Whether the revision is warm (its component prepared; not while a cold start runs).
    pub fn is_warm(&self) -> bool {
        self.prepared.try_lock().is_ok_and(|slot| slot.is_some())
    }

    /// Scales the revision to zero if it may (`min_instances = 0`) and no request started
    /// within its idle timeout. Requests still running keep what they use.
    pub fn scale_to_zero_if_idle(&self) -> bool {
        if self.record.spec.min_instances > 0 {
            return false;
        }
        let idle_ms = (self.born.elapsed().as_millis() as u64)
            .saturating_sub(self.last_used_ms.load(Ordering::Relaxed));
        if idle_ms < self.record.spec.idle_timeout_secs * 1000 {
            return false;
        }
        self.scale_to_zero()
    }

    /// Lets go of the prepared component now (unless a cold start holds it); whether the
    /// revision was warm. Its next request starts cold.
    pub fn scale_to_zero(&self) -> bool {
        let scaled = match self.prepared.try_lock() {
            Ok(mut slot) => slot.take().is_some(),
            Err(_) => false,
        };
        if scaled {
            self.drop_idle();
        }
        scaled
    }

    /// What the admin API shows of the revision: its record, whether it is warm, its load and
    /// counters.
    pub fn describe(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&self.record).expect("records serialise");
        let stats = serde_json::to_value(&self.stats).expect("counters serialise");
        value["warm"] = self.is_warm().into();
        value["running"] = self.gate.as_ref().map_or(0, Gate::running).into();
        value["queued"] = self.gate.as_ref().map_or(0, Gate::queued).into();
        value["idle_instances"] = self.idle_count().into();
        value["stats"] = stats;
        value
    }
}

/// A revision's config values and its app's secrets (a secret wins over a value of the same
/// key).
fn config_variables(record: &RevisionRecord, secrets: &[(String, String)]) -> WasiConfigVariables {
    record
        .spec
        .config
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .chain(
            secrets
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
        .collect()
}
