//! Running components: the engine, compiled components, one `InstancePre` per deployed app,
//! admission (a queue when the node is at its instance limit) and a fresh instance per request.

mod admission;
mod engine;
mod instance;
mod output;

pub use admission::BodyReservation;
pub use instance::{InstanceBody, InstanceResources, InvokeError};

use crate::apps::{self, AppRecord, AppSettings};
use crate::config::{Config, LimitsConfig};
use crate::store::blobs::{self, Blobs};
use crate::store::{self, Store, StoreError};
use bytes::Bytes;
use http_body_util::Full;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use wasmtime::component::Linker;
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// A deployed app, ready to instantiate.
pub struct App {
    pub record: AppRecord,
    pre: ProxyPre<instance::InstanceState>,
}

/// Why a deployment was refused.
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
    #[error("the component does not fit the tensorlet world (wasi:http proxy + wasi:nn + wasi:keyvalue): {0}")]
    WrongWorld(String),
    #[error("{0}")]
    InvalidSetting(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("component file I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The node's component runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<instance::InstanceState>,
    cache: engine::ComponentCache,
    blobs: Arc<Blobs>,
    store: Store,
    apps_tree: sled::Tree,
    apps: RwLock<HashMap<String, Arc<App>>>,
    /// Serialises deploys and removes of records, so that the records in sled, the apps in
    /// memory and the holds on blobs change together.
    changes: tokio::sync::Mutex<()>,
    admission: admission::Admission,
    limits: LimitsConfig,
    resources: InstanceResources,
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

impl Runtime {
    /// Builds the runtime and prepares every deployed app, holding their components in
    /// `blobs`. Blocking: compiling (or loading cached) components is CPU and file work; call
    /// it from a blocking context at start-up.
    pub fn open(
        config: &Config,
        store: Store,
        blobs: Arc<Blobs>,
        models: Arc<crate::nn::ModelRegistry>,
    ) -> anyhow::Result<Self> {
        let engine = engine::build_engine(&config.limits)
            .map_err(|e| anyhow::anyhow!("cannot configure wasmtime: {e:#}"))?;
        let linker = instance::build_linker(&engine)
            .map_err(|e| anyhow::anyhow!("cannot link the host interfaces: {e:#}"))?;
        let cache = engine::ComponentCache::new(&engine, blobs.clone());
        let apps_tree = store.tree("apps")?;
        let ticker = engine::EpochTicker::start(&engine);
        let runtime = Self {
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
            },
            engine,
            linker,
            cache,
            blobs,
            store,
            apps_tree,
            apps: RwLock::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
            limits: config.limits.clone(),
            _ticker: ticker,
        };
        for record in store::all_json::<AppRecord>(&runtime.apps_tree)? {
            runtime.blobs.adopt(&record.digest);
            let path = runtime.blobs.path(&record.digest);
            let prepared = std::fs::read(&path)
                .map_err(DeployError::from)
                .and_then(|bytes| {
                    if blobs::digest_of(&bytes) != record.digest {
                        return Err(DeployError::Invalid(format!(
                            "{} does not hold the component deployed (its SHA-256 differs): redeploy the app",
                            path.display()
                        )));
                    }
                    runtime.prepare(&record.digest, &bytes)
                });
            match prepared {
                Ok(pre) => {
                    let name = record.name.clone();
                    runtime
                        .apps
                        .write()
                        .expect("apps lock")
                        .insert(name, Arc::new(App { record, pre }));
                }
                Err(error) => {
                    tracing::error!(app = %record.name, %error, "deployed app could not be prepared")
                }
            }
        }
        Ok(runtime)
    }

    /// Compiles (or loads from the cache) and links a component. Blocking.
    fn prepare(
        &self,
        digest: &str,
        bytes: &[u8],
    ) -> Result<ProxyPre<instance::InstanceState>, DeployError> {
        check_preamble(bytes)?;
        let component = self
            .cache
            .load_or_compile(&self.engine, digest, bytes)
            .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| DeployError::WrongWorld(format!("{e:#}")))?;
        ProxyPre::new(pre).map_err(|e| {
            DeployError::WrongWorld(format!("it does not export wasi:http/incoming-handler, so it cannot serve requests ({e:#})"))
        })
    }

    /// Whether a compiled artifact for `digest` is already on disk.
    pub fn is_cached(&self, digest: &str) -> bool {
        self.cache.contains(digest)
    }

    /// Deploys (or replaces) `name`. Requests already running finish on the old version.
    pub async fn deploy(
        self: &Arc<Self>,
        name: &str,
        bytes: Bytes,
        settings: AppSettings,
    ) -> Result<AppRecord, DeployError> {
        if !apps::valid_name(name) {
            return Err(DeployError::InvalidName(name.to_string()));
        }
        check_preamble(&bytes)?;
        let (timeout_secs, memory_mib, max_body_bytes) =
            apps::settle(&settings, &self.limits).map_err(DeployError::InvalidSetting)?;
        let runtime = self.clone();
        let size_bytes = bytes.len() as u64;
        // Storing and compiling are file and seconds of CPU work: on the blocking pool. The
        // blob is stored first and held, so that its compiled artifact goes with it; a
        // component that does not compile lets it go again.
        let (held, pre) = tokio::task::spawn_blocking(move || {
            let held = runtime.blobs.put_bytes(&bytes)?;
            let pre = runtime.prepare(held.digest(), &bytes)?;
            Ok::<_, DeployError>((held, pre))
        })
        .await
        .map_err(|e| DeployError::Invalid(format!("compilation failed: {e}")))??;
        let _changing = self.changes.lock().await;
        let record = AppRecord {
            name: name.to_string(),
            digest: held.digest().to_string(),
            size_bytes,
            timeout_secs,
            memory_mib,
            max_body_bytes,
            models: settings.model_names(),
            native_guest_models: settings.native_guest_models.unwrap_or(false),
            deployed_at: store::unix_now(),
        };
        let replaced = store::get_json::<AppRecord>(&self.apps_tree, name)?;
        store::put_json(&self.apps_tree, name, &record)?;
        self.store.make_durable().await?;
        held.keep();
        self.apps.write().expect("apps lock").insert(
            name.to_string(),
            Arc::new(App {
                record: record.clone(),
                pre,
            }),
        );
        if let Some(replaced) = replaced {
            self.blobs.release_async(&replaced.digest).await;
        }
        Ok(record)
    }

    /// Removes an app; requests already running finish (their instances hold what they
    /// need). Its component's files go once no other app uses them.
    pub async fn remove(&self, name: &str) -> Result<Option<AppRecord>, StoreError> {
        let _changing = self.changes.lock().await;
        let Some(record) = store::get_json::<AppRecord>(&self.apps_tree, name)? else {
            return Ok(None);
        };
        self.apps_tree.remove(name)?;
        self.store.make_durable().await?;
        self.apps.write().expect("apps lock").remove(name);
        self.blobs.release_async(&record.digest).await;
        Ok(Some(record))
    }

    /// The deployed app called `name`.
    pub fn app(&self, name: &str) -> Option<Arc<App>> {
        self.apps.read().expect("apps lock").get(name).cloned()
    }

    /// Every deployed app, by name.
    pub fn apps(&self) -> Vec<AppRecord> {
        let mut records: Vec<_> = self
            .apps
            .read()
            .expect("apps lock")
            .values()
            .map(|a| a.record.clone())
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
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

    /// Creates an instance of `app` and drops it unused (see [`instance::instantiate_only`]).
    pub async fn instantiate_only(&self, app: &App) -> Result<(), InvokeError> {
        let _permit = self.admission.instance().await?;
        instance::instantiate_only(app, &self.resources).await
    }

    /// Runs one request on `app`. While the node is at its instance limit the request waits
    /// in the admission queue, within the queue's length and time limits.
    pub async fn invoke(
        &self,
        app: Arc<App>,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<InstanceBody>, InvokeError> {
        let permit = self.admission.instance().await?;
        instance::invoke(app, &self.resources, request, permit).await
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
