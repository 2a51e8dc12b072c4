//! Running components: the engine, compiled components, the deployed apps and their
//! revisions (deploy, traffic, rollback, scale to zero), admission (per revision and node-wide)
//! and a fresh instance per request. [`dispatch`] is the path of one request through them.

mod admission;
mod app;
mod cache;
mod collector;
mod deploy;
pub mod dispatch;
mod engine;
mod instance;
mod lease;
mod outgoing;
mod output;
pub mod queue;
mod replica;

pub use admission::{read_body, BodyError, BodyReservation};
pub use app::{App, Revision, RevisionConfig};
pub use deploy::{DeployError, DeployOptions, Deployed};
pub use dispatch::ServedBody;
pub use instance::{InstanceBody, InstanceResources, InvokeError};
pub use replica::{AppReplica, AppVersion, DesiredState, Load, ReplicatedBucket};

use crate::apps::rate::RateLimits;
use crate::apps::secrets::Secrets;
use crate::apps::spec::{self, AppRecord};
use crate::apps::{AppRecords, StoredApp};
use crate::config::{Config, LimitsConfig};
use crate::store::blobs::{self, Blobs};
use crate::store::Store;
use crate::telemetry::Telemetry;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;
use wasmtime::component::Linker;
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// The node's component runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<instance::InstanceState>,
    /// Compiled components, on disk.
    compiled: engine::ComponentCache,
    blobs: Arc<Blobs>,
    store: Store,
    records: AppRecords,
    apps: RwLock<HashMap<String, Arc<App>>>,
    /// Serialises changes of records (deploys, traffic, removes), so that the records in sled,
    /// the apps in memory and the holds on blobs change together.
    changes: tokio::sync::Mutex<()>,
    admission: admission::Admission,
    limits: LimitsConfig,
    resources: InstanceResources,
    /// Responses of apps that cache them, in memory.
    responses: cache::ResponseCache,
    secrets: Secrets,
    /// The runtime itself, for calls between apps made from inside an instance.
    this: OnceLock<Weak<Runtime>>,
    /// Where queue messages go; set once the node has opened its job queue.
    queue_sink: OnceLock<Arc<dyn queue::QueueSink>>,
    /// What this node says of itself: the apps whose placement selects these run here.
    labels: BTreeMap<String, String>,
    _ticker: engine::EpochTicker,
}

/// Checks the 8-byte preamble: `\0asm`, then version 1 for core modules or layer 1 for
/// components.
fn check_preamble(bytes: &[u8]) -> Result<(), DeployError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(DeployError::NotWasm);
    }
    match bytes[4..8] {
        [1, 0, 0, 0] => Err(DeployError::CoreModule),
        [0x0d, 0, 1, 0] => Ok(()),
        _ => Err(DeployError::Invalid(
            "unknown WebAssembly version or layer".into(),
        )),
    }
}

/// Largest component the node takes (from the admin API or a peer).
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// How often revisions are checked for scaling to zero.
const IDLE_CHECK: Duration = Duration::from_secs(1);

impl Runtime {
    /// Builds the runtime and loads every deployed app, holding their revisions' components
    /// in `blobs`. Apps run here when their placement selects this node's `labels`; of those,
    /// revisions with `min_instances` above 0 are prepared now, the others start cold on
    /// their first request (a component not yet compiled by this engine is compiled now, so
    /// that no request waits for compilation). Blocking: call it at start-up.
    pub fn open(
        config: &Config,
        store: Store,
        blobs: Arc<Blobs>,
        models: Arc<crate::nn::ModelRegistry>,
        telemetry: Arc<Telemetry>,
        labels: BTreeMap<String, String>,
    ) -> anyhow::Result<Arc<Self>> {
        let engine = engine::build_engine(&config.limits)
            .map_err(|e| anyhow::anyhow!("cannot configure wasmtime: {e:#}"))?;
        let linker = instance::build_linker(&engine)
            .map_err(|e| anyhow::anyhow!("cannot link the host interfaces: {e:#}"))?;
        let cache = engine::ComponentCache::new(&engine, blobs.clone());
        let records = AppRecords::open(&store)?;
        let ticker = engine::EpochTicker::start(&engine);
        let runtime = Arc::new(Self {
            admission: admission::Admission::new(&config.limits),
            resources: InstanceResources {
                idle: instance::IdleInstances::new(config.limits.max_idle_instances),
                kv_usage: Arc::new(
                    crate::kv::KvUsage::open(
                        &store,
                        crate::kv::KvQuotas {
                            max_bytes: config.limits.kv_max_bytes_per_app,
                            max_keys: config.limits.kv_max_keys_per_app,
                            max_buckets: config.limits.kv_max_buckets_per_app as usize,
                        },
                    )
                    .map_err(|e| anyhow::anyhow!("cannot count key-value usage: {e}"))?,
                ),
                store: store.clone(),
                models,
                max_guest_model_bytes: config.nn.max_guest_model_bytes,
                epoch: ticker.ticks(),
                telemetry,
                leases: Arc::default(),
                node_id: Arc::from(config.cluster.node_id.as_deref().unwrap_or_default()),
            },
            responses: cache::ResponseCache::new(config.limits.response_cache_bytes),
            secrets: Secrets::open(&store, &config.data_dir)
                .map_err(|e| anyhow::anyhow!("cannot open the secrets: {e}"))?,
            engine,
            linker,
            compiled: cache,
            blobs,
            store,
            records,
            apps: RwLock::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
            limits: config.limits.clone(),
            this: OnceLock::new(),
            queue_sink: OnceLock::new(),
            labels,
            _ticker: ticker,
        });
        runtime
            .this
            .set(Arc::downgrade(&runtime))
            .expect("set once, here");
        runtime
            .resources
            .telemetry
            .metrics
            .register_collector(Box::new(collector::RuntimeCollector(Arc::downgrade(
                &runtime,
            ))));
        let stored = runtime.records.load_all(&runtime.limits)?;
        // Records of an older node were rewritten: make that durable before serving.
        runtime.store.flush_blocking()?;
        for app in stored {
            let revisions = runtime.build_revisions(&app, None);
            let rate = runtime.rate_limits(&app.record);
            let placed = runtime.places(&app.record);
            runtime.apps.write().expect("apps lock").insert(
                app.record.name.clone(),
                Arc::new(App::new(app.record, revisions, rate, placed)),
            );
        }
        Ok(runtime)
    }

    /// Lets go of the prepared components of revisions idle past their idle timeout, every
    /// second, while the runtime lives. Call once from within the node's tokio runtime.
    pub fn start_scaling_to_zero(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(runtime) = this.upgrade() else {
                    return;
                };
                for app in runtime.apps() {
                    for revision in app.revisions.values() {
                        if revision.scale_to_zero_if_idle() {
                            tracing::debug!(app = %app.record.name, revision = revision.record.number, "scaled to zero");
                        }
                    }
                }
            }
        });
    }

    /// The revisions of `app` ready to serve, holding their components: those of `current`
    /// (the app as served now) whose record is unchanged as they are, the others new. Of an
    /// app placed here, revisions with `min_instances` above 0 are prepared, and components
    /// this engine has not compiled yet are compiled. Blocking.
    fn build_revisions(
        &self,
        app: &StoredApp,
        current: Option<&App>,
    ) -> BTreeMap<u32, Arc<Revision>> {
        let name = &app.record.name;
        let placed = self.places(&app.record);
        let secrets = self.secrets.values(name).unwrap_or_else(|error| {
            tracing::error!(app = %name, %error, "secrets could not be read");
            Vec::new()
        });
        let mut revisions = BTreeMap::new();
        for (number, record) in &app.revisions {
            let kept = current
                .filter(|current| current.record.tenant == app.record.tenant)
                .and_then(|current| current.revisions.get(number))
                .filter(|revision| revision.record == *record);
            if let Some(revision) = kept {
                revisions.insert(*number, revision.clone());
                continue;
            }
            let hold = self.blobs.hold(record.digest.clone());
            let prepared = if placed
                && (record.spec.min_instances > 0 || !self.is_compiled(&record.digest))
            {
                match self.load_prepared(&record.digest) {
                    Ok(pre) => Some(pre),
                    Err(error) => {
                        tracing::error!(app = %name, revision = number, %error, "revision could not be prepared");
                        None
                    }
                }
            } else {
                None
            };
            let prepared = prepared.filter(|_| record.spec.min_instances > 0);
            revisions.insert(
                *number,
                Arc::new(Revision::new(
                    record.clone(),
                    &app.record.tenant,
                    hold,
                    prepared,
                    &secrets,
                )),
            );
        }
        revisions
    }

    /// Whether the placement of `record` selects this node.
    pub fn places(&self, record: &AppRecord) -> bool {
        record.placement.selects(&self.labels)
    }

    /// The node's blob store.
    pub fn blobs(&self) -> &Arc<Blobs> {
        &self.blobs
    }

    /// What this node says of itself (its configured labels and the backends it has).
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    fn rate_limits(&self, record: &AppRecord) -> Arc<RateLimits> {
        Arc::new(RateLimits::new(
            record.rate_limit.clone(),
            record.client_rate_limit.clone(),
            self.limits.max_rate_limited_clients as usize,
        ))
    }

    /// Compiles (or loads from the cache) and links a component. Blocking.
    fn prepare(
        &self,
        digest: &str,
        bytes: &[u8],
    ) -> Result<ProxyPre<instance::InstanceState>, DeployError> {
        check_preamble(bytes)?;
        let component = self
            .compiled
            .load_or_compile(&self.engine, digest, bytes)
            .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        self.link(&component)
    }

    fn link(
        &self,
        component: &wasmtime::component::Component,
    ) -> Result<ProxyPre<instance::InstanceState>, DeployError> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| DeployError::WrongWorld(format!("{e:#}")))?;
        ProxyPre::new(pre).map_err(|e| {
            DeployError::WrongWorld(format!("it does not export wasi:http/incoming-handler, so it cannot serve requests ({e:#})"))
        })
    }

    /// The prepared component of blob `digest`: from the compile cache (a cold start), or
    /// compiled from the blob, which must still hash to its name. Blocking.
    fn load_prepared(
        &self,
        digest: &str,
    ) -> Result<ProxyPre<instance::InstanceState>, DeployError> {
        if let Some(component) = self.compiled.load(&self.engine, digest) {
            return self.link(&component);
        }
        let path = self.blobs.path(digest);
        let bytes = std::fs::read(&path)?;
        if blobs::digest_of(&bytes) != digest {
            return Err(DeployError::Invalid(format!(
                "{} does not hold the component deployed (its SHA-256 differs): redeploy the app",
                path.display()
            )));
        }
        self.prepare(digest, &bytes)
    }

    /// Whether a compiled artifact for `digest` is already on disk.
    fn is_compiled(&self, digest: &str) -> bool {
        self.compiled.contains(digest)
    }

    /// The deployed app called `name`.
    pub fn app(&self, name: &str) -> Option<Arc<App>> {
        self.apps.read().expect("apps lock").get(name).cloned()
    }

    /// The app whose manifest consumes `queue`, if one does.
    pub fn consumer_of(&self, queue: &str) -> Option<String> {
        let apps = self.apps.read().expect("apps lock");
        apps.values()
            .find(|app| app.record.consumes.iter().any(|q| q == queue))
            .map(|app| app.record.name.clone())
    }

    /// Where messages that components send to queues go (the node's job queue).
    pub fn set_queue_sink(&self, sink: Arc<dyn queue::QueueSink>) {
        if self.queue_sink.set(sink).is_err() {
            tracing::error!("the queue sink was set twice");
        }
    }

    /// The app a path outside `/apps/` is routed to by an app's `routes`, with the path the
    /// app sees: the longest route that covers the path wins.
    pub fn app_for_route(&self, path: &str) -> Option<(String, String)> {
        let apps = self.apps.read().expect("apps lock");
        let (route, app) = apps
            .values()
            .flat_map(|app| app.record.routes.iter().map(move |route| (route, app)))
            .filter(|(route, _)| spec::route_covers(route, path))
            .max_by_key(|(route, _)| {
                if route.as_str() == "/" {
                    0
                } else {
                    route.len()
                }
            })?;
        let below = if route == "/" {
            path
        } else {
            &path[route.len()..]
        };
        let below = if below.is_empty() { "/" } else { below };
        Some((app.record.name.clone(), below.to_string()))
    }

    /// Every deployed app, by name.
    pub fn apps(&self) -> Vec<Arc<App>> {
        let mut apps: Vec<_> = self
            .apps
            .read()
            .expect("apps lock")
            .values()
            .cloned()
            .collect();
        apps.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        apps
    }

    /// Instances running now.
    pub fn running_instances(&self) -> usize {
        self.admission.running()
    }

    /// Requests waiting for an instance now.
    pub fn queued_requests(&self) -> usize {
        self.admission.queued()
    }

    /// An empty claim on the node's budget for request bodies held in memory.
    pub fn body_reservation(&self) -> BodyReservation {
        self.admission.body_reservation()
    }

    /// Creates an instance of `revision` and drops it unused (see
    /// [`instance::instantiate_only`]).
    pub async fn instantiate_only(&self, revision: &Arc<Revision>) -> Result<(), InvokeError> {
        let _slot = self.admission.slot(revision.gate.as_ref(), true).await?;
        let pre = self.warm(revision).await?;
        instance::instantiate_only(&pre, revision, &self.resources).await
    }

    /// `revision`'s prepared component, preparing it from the compile cache if it is cold.
    async fn warm(
        &self,
        revision: &Arc<Revision>,
    ) -> Result<ProxyPre<instance::InstanceState>, InvokeError> {
        let this = self
            .this
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| InvokeError::Instantiate("the node is shutting down".into()))?;
        let (app, number) = (revision.record.app.clone(), revision.record.number);
        let digest = revision.record.digest.clone();
        revision
            .prepared(move || {
                this.load_prepared(&digest).map_err(|error| {
                    tracing::error!(%app, revision = number, %error, "a cold start failed");
                    InvokeError::Unusable(format!(
                        "revision {number} of app {app:?} cannot be prepared (the node's log says why)"
                    ))
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_tells_modules_components_and_junk_apart() {
        assert!(matches!(
            check_preamble(b"hello world"),
            Err(DeployError::NotWasm)
        ));
        assert!(matches!(
            check_preamble(b"\0asm\x01\0\0\0"),
            Err(DeployError::CoreModule)
        ));
        assert!(check_preamble(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
