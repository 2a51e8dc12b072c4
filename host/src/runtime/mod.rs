//! Running components: the engine, compiled components, the deployed apps and their
//! revisions (deploy, traffic, rollback, scale to zero), admission (per revision and node-wide)
//! and a fresh instance per request. [`dispatch`] is the path of one request through them.

mod admission;
mod app;
mod cache;
pub mod dispatch;
mod engine;
mod instance;
mod outgoing;
mod output;

pub use admission::{read_body, BodyError, BodyReservation};
pub use app::{App, Revision, RevisionConfig};
pub use dispatch::ServedBody;
pub use instance::{InstanceBody, InstanceResources, InvokeError};

use crate::apps::rate::RateLimits;
use crate::apps::secrets::{Secrets, SecretsError};
use crate::apps::spec::{self, AppRecord, DeploySpec, RevisionRecord};
use crate::apps::traffic::{self, RevisionRef, TrafficTarget};
use crate::apps::{self, AppRecords};
use crate::config::{Config, LimitsConfig};
use crate::store::blobs::{self, Blobs};
use crate::store::{self, Store, StoreError};
use bytes::Bytes;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;
use wasmtime::component::Linker;
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// Why a deployment (or a change of traffic, a rollback) was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("invalid app name {0:?}: use 1-63 lower-case letters, digits or '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("the upload is not a WebAssembly binary (it does not start with \\0asm)")]
    NotWasm,
    #[error("this is a core WebAssembly module, not a component: build it with `cargo build --target wasm32-wasip2` or `cargo component build`")]
    CoreModule,
    #[error("the component does not compile: {0}")]
    Invalid(String),
    #[error("the component does not fit the tensorlet world (wasi:http proxy + wasi:nn + wasi:keyvalue + wasi:config): {0}")]
    WrongWorld(String),
    #[error("{0}")]
    InvalidSetting(String),
    #[error("no app named {0:?} is deployed on this node")]
    NotFound(String),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("component file I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How a deployment applies.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeployOptions {
    /// Report what would change; change nothing.
    pub dry_run: bool,
    /// Change only what the request sets on the current deployment (a shorthand deploy),
    /// instead of taking it as the whole app (a manifest).
    pub overlay: bool,
}

/// Lets go of revisions taken out of service: at once when no request uses them any more
/// (their components' files are deleted before this returns, if nothing else holds them),
/// else when the last request using one ends.
async fn retire(revisions: Vec<Arc<Revision>>) {
    for revision in revisions {
        revision.retire();
        if let Ok(revision) = Arc::try_unwrap(revision) {
            revision.release().await;
        }
    }
}

/// What a deployment did (or, for a dry run, would do).
#[derive(Debug, Serialize)]
pub struct Deployed {
    pub app: AppRecord,
    /// The revision the deployment's settings live in (new or unchanged).
    pub revision: u32,
    /// Whether a new revision was made.
    pub created: bool,
    /// What changed, one line per setting: `path: old → new`.
    pub changes: Vec<String>,
}

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

/// How often revisions are checked for scaling to zero.
const IDLE_CHECK: Duration = Duration::from_secs(1);

impl Runtime {
    /// Builds the runtime and loads every deployed app, holding their revisions' components
    /// in `blobs`. Revisions with `min_instances` above 0 are prepared now; the others start
    /// cold on their first request (a component not yet compiled by this engine is compiled
    /// now, so that no request waits for compilation). Blocking: call it at start-up.
    pub fn open(
        config: &Config,
        store: Store,
        blobs: Arc<Blobs>,
        models: Arc<crate::nn::ModelRegistry>,
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
            _ticker: ticker,
        });
        runtime
            .this
            .set(Arc::downgrade(&runtime))
            .expect("set once, here");
        let stored = runtime.records.load_all(&runtime.limits)?;
        // Records of an older node were rewritten: make that durable before serving.
        runtime.store.flush_blocking()?;
        for app in stored {
            let name = app.record.name.clone();
            let secrets = runtime.secrets.values(&name).unwrap_or_else(|error| {
                tracing::error!(app = %name, %error, "secrets could not be read");
                Vec::new()
            });
            let mut revisions = BTreeMap::new();
            for (number, record) in app.revisions {
                let hold = runtime.blobs.hold(record.digest.clone());
                let prepared = if record.spec.min_instances > 0
                    || !runtime.is_compiled(&record.digest)
                {
                    match runtime.load_prepared(&record.digest) {
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
                    number,
                    Arc::new(Revision::new(record, hold, prepared, &secrets)),
                );
            }
            let rate = runtime.rate_limits(&app.record);
            runtime
                .apps
                .write()
                .expect("apps lock")
                .insert(name, Arc::new(App::new(app.record, revisions, rate)));
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

    /// Applies a deployment to `name`: a new revision when the component or the revision's
    /// settings differ from the newest revision's (none otherwise: deploying the same
    /// manifest twice changes nothing), and the app-level settings (traffic, rate limits,
    /// fallback, routes). `component` `None` keeps the newest revision's component. A manifest
    /// describes the whole app; with `options.overlay` the request only changes what it sets
    /// on the current deployment (the CLI's flags, a bare component). A dry run checks and
    /// reports the changes without applying them. Requests already running finish on the
    /// revision they started on.
    pub async fn deploy(
        self: &Arc<Self>,
        name: &str,
        component: Option<Bytes>,
        request: DeploySpec,
        options: DeployOptions,
    ) -> Result<Deployed, DeployError> {
        if !apps::valid_name(name) {
            return Err(DeployError::InvalidName(name.to_string()));
        }
        if let Some(named) = request.app.name.as_deref().filter(|named| *named != name) {
            return Err(DeployError::InvalidSetting(format!(
                "the manifest names app {named:?}, not {name:?}"
            )));
        }
        // Storing and compiling are file and seconds of CPU work: on the blocking pool. The
        // blob is stored first and held, so that its compiled artifact goes with it; a
        // component that does not compile lets it go again.
        let fresh = match component {
            Some(bytes) => {
                check_preamble(&bytes)?;
                let runtime = self.clone();
                let size = bytes.len() as u64;
                let (held, pre) = tokio::task::spawn_blocking(move || {
                    let held = runtime.blobs.put_bytes(&bytes)?;
                    let pre = runtime.prepare(held.digest(), &bytes)?;
                    Ok::<_, DeployError>((held, pre))
                })
                .await
                .map_err(|e| DeployError::Invalid(format!("compilation failed: {e}")))??;
                Some((held, pre, size))
            }
            None => None,
        };
        let _changing = self.changes.lock().await;
        let stored = self.records.get(name)?;
        let newest = stored
            .as_ref()
            .and_then(|app| app.revisions.get(&app.record.latest));
        let request = match (options.overlay, &stored, newest) {
            (true, Some(app), Some(newest)) => {
                DeploySpec::of(&app.record, &newest.spec).overlay(request)
            }
            _ => request,
        };
        let settled = spec::settle(&request, &self.limits).map_err(DeployError::InvalidSetting)?;
        let (digest, size_bytes) = match (&fresh, newest) {
            (Some((held, _, size)), _) => (held.digest().to_string(), *size),
            (None, Some(newest)) => (newest.digest.clone(), newest.size_bytes),
            (None, None) => {
                return Err(DeployError::InvalidSetting(format!(
                    "app {name:?} is not deployed yet: give its component"
                )))
            }
        };
        let now = store::unix_now();
        let before = match &stored {
            Some(app) => app.record.clone(),
            None => AppRecord::new(name, now),
        };
        let new_revision = newest
            .is_none_or(|newest| newest.digest != digest || newest.spec != settled)
            .then(|| RevisionRecord {
                app: name.to_string(),
                number: before.next_revision,
                digest: digest.clone(),
                size_bytes,
                created_at: now,
                spec: settled.clone(),
            });
        let mut after = before.with_policy(&request);
        if let Some(revision) = &new_revision {
            after.latest = revision.number;
            after.next_revision = revision.number + 1;
        }
        let mut numbers: Vec<u32> = stored
            .as_ref()
            .map(|app| app.revisions.keys().copied().collect())
            .unwrap_or_default();
        numbers.extend(new_revision.as_ref().map(|r| r.number));
        after
            .validate(&numbers)
            .map_err(DeployError::InvalidSetting)?;
        for route in &after.routes {
            if let Some(other) = self
                .apps()
                .into_iter()
                .find(|other| other.record.name != name && other.record.routes.contains(route))
            {
                return Err(DeployError::InvalidSetting(format!(
                    "app.routes: {route:?} is already app {:?}'s",
                    other.record.name
                )));
            }
        }
        let pruned = self.prunable(&after, &numbers);
        let view = |record: &AppRecord, revision: Option<&RevisionRecord>| {
            serde_json::json!({
                "component": revision.map(|r| r.digest.clone()),
                "revision": revision.map(|r| &r.spec),
                "traffic": record.traffic,
                "sticky_header": record.sticky_header,
                "rate_limit": record.rate_limit,
                "client_rate_limit": record.client_rate_limit,
                "fallback": record.fallback,
                "routes": record.routes,
            })
        };
        let changes = spec::diff(
            &view(&before, newest),
            &view(&after, new_revision.as_ref().or(newest)),
        );
        let unchanged = new_revision.is_none() && after == before;
        if options.dry_run || unchanged {
            return Ok(Deployed {
                revision: after.latest,
                app: if unchanged { before } else { after },
                created: false,
                changes,
            });
        }
        after.updated_at = now;
        self.records
            .commit(&after, new_revision.as_ref(), &pruned)?;
        self.store.make_durable().await?;

        let current = self.app(name);
        let mut revisions: BTreeMap<u32, Arc<Revision>> = current
            .as_ref()
            .map(|app| app.revisions.clone())
            .unwrap_or_default();
        let retired: Vec<Arc<Revision>> = pruned
            .iter()
            .filter_map(|number| revisions.remove(number))
            .collect();
        if let Some(record) = new_revision.clone() {
            let (hold, prepared) = match fresh {
                Some((held, pre, _)) => (held, Some(pre)),
                // The same component with new settings: the newest revision's preparation
                // serves it as well.
                None => (
                    self.blobs.hold(record.digest.clone()),
                    newest
                        .and_then(|n| revisions.get(&n.number))
                        .and_then(|previous| previous.prepared_now()),
                ),
            };
            let prepared = match prepared {
                None if record.spec.min_instances > 0 => {
                    let (runtime, digest) = (self.clone(), record.digest.clone());
                    tokio::task::spawn_blocking(move || runtime.load_prepared(&digest))
                        .await
                        .map_err(|e| DeployError::Invalid(format!("preparing failed: {e}")))?
                        .ok()
                }
                prepared => prepared,
            };
            let secrets = self.secrets.values(name)?;
            revisions.insert(
                record.number,
                Arc::new(Revision::new(record, hold, prepared, &secrets)),
            );
        }
        let rate = match &current {
            Some(app)
                if app.record.rate_limit == after.rate_limit
                    && app.record.client_rate_limit == after.client_rate_limit =>
            {
                app.rate.clone()
            }
            _ => self.rate_limits(&after),
        };
        self.apps.write().expect("apps lock").insert(
            name.to_string(),
            Arc::new(App::new(after.clone(), revisions, rate)),
        );
        drop(current);
        retire(retired).await;
        Ok(Deployed {
            revision: after.latest,
            app: after,
            created: new_revision.is_some(),
            changes,
        })
    }

    /// Revisions to delete so that at most `max_revisions_per_app` are kept: the oldest that
    /// no traffic target, tag or fallback names.
    fn prunable(&self, record: &AppRecord, numbers: &[u32]) -> Vec<u32> {
        let keep = self.limits.max_revisions_per_app as usize;
        let mut needed: Vec<u32> = traffic::referenced(&record.traffic, record.latest).collect();
        needed.push(record.latest);
        needed.extend(record.fallback.as_ref().and_then(|f| f.revision));
        let mut candidates: Vec<u32> = numbers
            .iter()
            .copied()
            .filter(|n| !needed.contains(n))
            .collect();
        candidates.sort_unstable();
        let excess = numbers.len().saturating_sub(keep);
        candidates.into_iter().take(excess).collect()
    }

    /// Sets how `name`'s requests are split across its revisions; `sticky_header` `None`
    /// keeps the app's. Requests already running finish on theirs.
    pub async fn set_traffic(
        &self,
        name: &str,
        split: Vec<TrafficTarget>,
        sticky_header: Option<Option<String>>,
    ) -> Result<AppRecord, DeployError> {
        let _changing = self.changes.lock().await;
        self.set_traffic_locked(name, split, sticky_header).await
    }

    async fn set_traffic_locked(
        &self,
        name: &str,
        split: Vec<TrafficTarget>,
        sticky_header: Option<Option<String>>,
    ) -> Result<AppRecord, DeployError> {
        let stored = self
            .records
            .get(name)?
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        let mut after = stored.record.clone();
        after.traffic = split;
        if let Some(header) = sticky_header {
            after.sticky_header = header.map(|h| h.to_ascii_lowercase());
        }
        let numbers: Vec<u32> = stored.revisions.keys().copied().collect();
        after
            .validate(&numbers)
            .map_err(DeployError::InvalidSetting)?;
        after.updated_at = store::unix_now();
        self.records.commit(&after, None, &[])?;
        self.store.make_durable().await?;
        let current = self
            .app(name)
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        self.apps.write().expect("apps lock").insert(
            name.to_string(),
            Arc::new(App::new(
                after.clone(),
                current.revisions.clone(),
                current.rate.clone(),
            )),
        );
        Ok(after)
    }

    /// Sends all of `name`'s traffic to `revision`, or, without one, to the revision before
    /// the one that has all of it now. Tags stay, with no share.
    pub async fn rollback(
        &self,
        name: &str,
        revision: Option<u32>,
    ) -> Result<AppRecord, DeployError> {
        let _changing = self.changes.lock().await;
        let stored = self
            .records
            .get(name)?
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        let record = &stored.record;
        let target = match revision {
            Some(number) => number,
            None => {
                let mut serving: Vec<u32> = record
                    .traffic
                    .iter()
                    .filter(|t| t.percent > 0)
                    .map(|t| traffic::resolve(t.revision, record.latest))
                    .collect();
                serving.dedup();
                let [current] = serving[..] else {
                    return Err(DeployError::InvalidSetting(
                        "traffic is split across revisions: name the revision to roll back to"
                            .into(),
                    ));
                };
                *stored
                    .revisions
                    .range(..current)
                    .next_back()
                    .ok_or_else(|| {
                        DeployError::InvalidSetting(format!(
                            "revision {current} is the oldest one kept: there is none to roll back to"
                        ))
                    })?
                    .0
            }
        };
        let mut split = vec![TrafficTarget {
            revision: RevisionRef::Number(target),
            percent: 100,
            tag: None,
        }];
        split.extend(
            record
                .traffic
                .iter()
                .filter(|t| t.tag.is_some())
                .map(|t| TrafficTarget {
                    percent: 0,
                    ..t.clone()
                }),
        );
        self.set_traffic_locked(name, split, None).await
    }

    /// Removes an app with its revisions and secrets; requests already running finish (their
    /// revisions hold what they need). Its components' files go once nothing uses them.
    pub async fn remove(&self, name: &str) -> Result<Option<AppRecord>, DeployError> {
        let _changing = self.changes.lock().await;
        let Some(stored) = self.records.get(name)? else {
            return Ok(None);
        };
        self.records.remove_app(name)?;
        self.secrets.remove_app(name)?;
        self.store.make_durable().await?;
        let removed = self.apps.write().expect("apps lock").remove(name);
        if let Some(app) = removed {
            let revisions = app.revisions.values().cloned().collect();
            drop(app);
            retire(revisions).await;
        }
        Ok(Some(stored.record))
    }

    /// Sets secret `key` of app `name` (stored encrypted); its next requests see it.
    pub async fn set_secret(&self, name: &str, key: &str, value: &[u8]) -> Result<(), DeployError> {
        let _changing = self.changes.lock().await;
        let app = self
            .app(name)
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        self.secrets.set(name, key, value)?;
        self.store.make_durable().await?;
        self.give_secrets(&app)
    }

    /// Removes secret `key` of app `name`; whether it was there.
    pub async fn remove_secret(&self, name: &str, key: &str) -> Result<bool, DeployError> {
        let _changing = self.changes.lock().await;
        let app = self
            .app(name)
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        let removed = self.secrets.remove(name, key)?;
        self.store.make_durable().await?;
        self.give_secrets(&app)?;
        Ok(removed)
    }

    /// The names (never the values) of app `name`'s secrets.
    pub fn secret_names(&self, name: &str) -> Result<Vec<String>, DeployError> {
        Ok(self.secrets.names(name)?)
    }

    /// Gives `app`'s revisions its secrets as they are now.
    fn give_secrets(&self, app: &App) -> Result<(), DeployError> {
        let secrets = self.secrets.values(&app.record.name)?;
        for revision in app.revisions.values() {
            revision.set_secrets(&secrets);
        }
        Ok(())
    }

    /// The deployed app called `name`.
    pub fn app(&self, name: &str) -> Option<Arc<App>> {
        self.apps.read().expect("apps lock").get(name).cloned()
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
