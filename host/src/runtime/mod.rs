//! Running components: the engine, compiled components, one `InstancePre` per deployed app,
//! admission (a queue when the node is at its instance limit) and a fresh instance per request.

mod engine;
mod instance;

pub use instance::{InstanceResources, InvokeError};

use crate::config::{Config, LimitsConfig};
use crate::store::{self, Store, StoreError};
use bytes::Bytes;
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio::sync::Semaphore;
use wasmtime::component::Linker;
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// What the node keeps about a deployed app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppRecord {
    pub name: String,
    /// SHA-256 of the component, hex; the component is stored under this name.
    pub digest: String,
    pub size_bytes: u64,
    pub timeout_secs: u64,
    pub memory_mib: u64,
    pub max_body_bytes: u64,
    /// Models the app may load by name; others are refused (`security`).
    #[serde(default)]
    pub models: Vec<String>,
    /// Seconds since the Unix epoch.
    pub deployed_at: u64,
}

/// Per-deployment settings; unset ones take the node's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppSettings {
    pub timeout_secs: Option<u64>,
    pub memory_mib: Option<u64>,
    pub max_body_bytes: Option<u64>,
    /// Comma-separated names of the models the app may load.
    pub models: Option<String>,
}

impl AppSettings {
    /// The declared model names.
    pub fn model_names(&self) -> Vec<String> {
        self.models
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect()
    }
}

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
    components_dir: PathBuf,
    store: Store,
    apps_tree: sled::Tree,
    apps: RwLock<HashMap<String, Arc<App>>>,
    admission: Arc<Semaphore>,
    limits: LimitsConfig,
    resources: InstanceResources,
    _ticker: engine::EpochTicker,
}

fn valid_app_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
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
    /// Builds the runtime and prepares every deployed app. Blocking: compiling (or loading
    /// cached) components is CPU and file work; call it from a blocking context at start-up.
    pub fn open(
        config: &Config,
        store: Store,
        models: Arc<crate::nn::ModelRegistry>,
    ) -> anyhow::Result<Self> {
        let engine = engine::build_engine(&config.limits)
            .map_err(|e| anyhow::anyhow!("cannot configure wasmtime: {e:#}"))?;
        let linker = instance::build_linker(&engine)
            .map_err(|e| anyhow::anyhow!("cannot link the host interfaces: {e:#}"))?;
        let cache = engine::ComponentCache::new(&engine, &config.data_dir.join("cache"))?;
        let components_dir = config.data_dir.join("components");
        std::fs::create_dir_all(&components_dir)?;
        let apps_tree = store.tree("apps")?;
        let ticker = engine::EpochTicker::start(&engine);
        let runtime = Self {
            admission: Arc::new(Semaphore::new(
                config.limits.max_concurrent_instances as usize,
            )),
            resources: InstanceResources {
                store: store.clone(),
                models,
                max_guest_model_bytes: config.nn.max_guest_model_bytes,
            },
            engine,
            linker,
            cache,
            components_dir,
            store,
            apps_tree,
            apps: RwLock::new(HashMap::new()),
            limits: config.limits.clone(),
            _ticker: ticker,
        };
        for record in store::all_json::<AppRecord>(&runtime.apps_tree)? {
            let path = runtime
                .components_dir
                .join(format!("{}.wasm", record.digest));
            let prepared = std::fs::read(&path)
                .map_err(DeployError::from)
                .and_then(|bytes| runtime.prepare(&record.digest, &bytes));
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

    fn settle(&self, settings: &AppSettings) -> Result<(u64, u64, u64), DeployError> {
        let timeout = settings.timeout_secs.unwrap_or(self.limits.timeout_secs);
        let memory = settings.memory_mib.unwrap_or(self.limits.memory_mib);
        let body = settings
            .max_body_bytes
            .unwrap_or(self.limits.max_body_bytes);
        if !(1..=3600).contains(&timeout) {
            return Err(DeployError::InvalidSetting(format!(
                "timeout_secs must be 1-3600, not {timeout}"
            )));
        }
        if !(1..=self.limits.max_memory_mib).contains(&memory) {
            return Err(DeployError::InvalidSetting(format!(
                "memory_mib must be 1-{} (the node's max_memory_mib), not {memory}",
                self.limits.max_memory_mib
            )));
        }
        if body > 1 << 30 {
            return Err(DeployError::InvalidSetting(format!(
                "max_body_bytes must be at most 1 GiB, not {body}"
            )));
        }
        Ok((timeout, memory, body))
    }

    /// Deploys (or replaces) `name`. Requests already running finish on the old version.
    pub async fn deploy(
        self: &Arc<Self>,
        name: &str,
        bytes: Bytes,
        settings: AppSettings,
    ) -> Result<AppRecord, DeployError> {
        if !valid_app_name(name) {
            return Err(DeployError::InvalidName(name.to_string()));
        }
        check_preamble(&bytes)?;
        let (timeout_secs, memory_mib, max_body_bytes) = self.settle(&settings)?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let runtime = self.clone();
        let digest_for_prepare = digest.clone();
        // Compiling is seconds of CPU work: it runs on the blocking pool.
        let pre = tokio::task::spawn_blocking(move || -> Result<_, DeployError> {
            let pre = runtime.prepare(&digest_for_prepare, &bytes)?;
            let path = runtime
                .components_dir
                .join(format!("{digest_for_prepare}.wasm"));
            if !path.exists() {
                let staged = path.with_extension("tmp");
                std::fs::write(&staged, &bytes)?;
                std::fs::rename(&staged, &path)?;
            }
            Ok((pre, bytes.len() as u64))
        })
        .await
        .map_err(|e| DeployError::Invalid(format!("compilation failed: {e}")))??;
        let (pre, size_bytes) = pre;
        let record = AppRecord {
            name: name.to_string(),
            digest,
            size_bytes,
            timeout_secs,
            memory_mib,
            max_body_bytes,
            models: settings.model_names(),
            deployed_at: store::unix_now(),
        };
        store::put_json(&self.apps_tree, name, &record)?;
        self.store.make_durable().await?;
        self.apps.write().expect("apps lock").insert(
            name.to_string(),
            Arc::new(App {
                record: record.clone(),
                pre,
            }),
        );
        Ok(record)
    }

    /// Removes an app; requests already running finish.
    pub async fn remove(&self, name: &str) -> Result<Option<AppRecord>, StoreError> {
        let Some(app) = self.apps.read().expect("apps lock").get(name).cloned() else {
            return Ok(None);
        };
        self.apps_tree.remove(name)?;
        self.store.make_durable().await?;
        self.apps.write().expect("apps lock").remove(name);
        Ok(Some(app.record.clone()))
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
        self.limits.max_concurrent_instances as usize - self.admission.available_permits()
    }

    /// Creates an instance of `app` and drops it unused (see [`instance::instantiate_only`]).
    pub async fn instantiate_only(&self, app: &App) -> Result<(), InvokeError> {
        let _permit = self
            .admission
            .acquire()
            .await
            .map_err(|e| InvokeError::Instantiate(e.to_string()))?;
        instance::instantiate_only(app, &self.resources).await
    }

    /// Runs one request on `app`. Waits in the admission queue while the node is at its
    /// instance limit, instead of failing.
    pub async fn invoke(
        &self,
        app: Arc<App>,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<HyperOutgoingBody>, InvokeError> {
        let permit = self
            .admission
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| InvokeError::Instantiate(e.to_string()))?;
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

    #[test]
    fn app_names_are_url_safe() {
        assert!(valid_app_name("classify"));
        assert!(valid_app_name("kv-counter2"));
        assert!(!valid_app_name("-x"));
        assert!(!valid_app_name("Hello"));
        assert!(!valid_app_name("a/b"));
        assert!(!valid_app_name(""));
    }
}
