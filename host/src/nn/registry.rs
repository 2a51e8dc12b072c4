//! The node's model registry: records in sled, files in the node's blob store (named by their
//! SHA-256 digest, held by the records), and each model loaded once into memory and shared by
//! all instances.
//! A registered model that no longer loads (its backend's library went away) stays listed,
//! with the reason, until it loads again at the next start or is replaced.

use super::backend::batching::{BatchPolicy, BatchedGraph, BatchingActivity};
use super::backend::{
    self, BackendError, Backends, ChoiceError, ExecutionTarget, GenerationActivity, Graph,
};
use super::Encoding;
use crate::store::blobs::Blobs;
use crate::store::{self, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// What the registry keeps about a model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelRecord {
    pub name: String,
    /// SHA-256 of the model file, hex.
    pub digest: String,
    pub encoding: Encoding,
    pub backend: String,
    /// The execution target it runs on (`cpu`, `gpu`).
    #[serde(default = "cpu")]
    pub target: String,
    /// Why it runs on the CPU although another target was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    pub size_bytes: u64,
    /// Seconds since the Unix epoch.
    pub added_at: u64,
    /// The tenant that owns it; `None` for the node's own models, which every app may load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// How concurrent computes are joined into batches; `None`: each runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchPolicy>,
}

impl ModelRecord {
    /// Whether apps of `tenant` may load it.
    pub fn usable_by(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|owner| owner == tenant)
    }
}

fn cpu() -> String {
    "cpu".to_string()
}

/// A registered model and whether it is in memory, as `tensorlet models` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    #[serde(flatten)]
    pub record: ModelRecord,
    pub loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_error: Option<String>,
    /// For LLMs: lanes, running generations and batch sizes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationActivity>,
    /// For models that batch their computes: the batches run so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batches: Option<BatchingActivity>,
}

/// Why a model operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model name {0:?}: use 1-128 letters, digits, '.', '_' or '-'")]
    InvalidName(String),
    #[error("invalid execution target {0:?}: use cpu, gpu or tpu")]
    InvalidTarget(String),
    #[error(transparent)]
    NoBackend(#[from] ChoiceError),
    #[error("{0}")]
    InvalidModel(String),
    #[error("cannot batch this model: {0}")]
    InvalidBatching(String),
    #[error("no model named {0:?} is registered on this node")]
    NotFound(String),
    #[error(
        "model name {0:?} is taken by another tenant: model names are node-wide, pick another"
    )]
    Taken(String),
    #[error("model {name:?} is registered but did not load: {reason}")]
    NotLoaded { name: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("model file I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

struct Entry {
    record: ModelRecord,
    /// The loaded model, or why it did not load.
    graph: Result<Arc<dyn Graph>, String>,
}

/// What `model add` asks for, besides the name and the file.
#[derive(Debug, Clone)]
pub struct Upload {
    pub encoding: Encoding,
    /// A backend by name; `None` lets the node choose.
    pub backend: Option<String>,
    /// `cpu`, `gpu` or `tpu`.
    pub target: String,
    /// SHA-256 of the file, hex.
    pub digest: String,
    pub size_bytes: u64,
    /// The tenant that owns it; `None` for a node-wide model.
    pub tenant: Option<String>,
    /// Dynamic batching of its computes, if wanted.
    pub batching: Option<BatchPolicy>,
}

/// The registry; one per node.
pub struct ModelRegistry {
    store: Store,
    tree: sled::Tree,
    blobs: Arc<Blobs>,
    backends: Backends,
    entries: RwLock<HashMap<String, Entry>>,
    /// Serialises adds and removes, so that the records in sled, the entries in memory and
    /// the holds on blobs change together.
    changes: tokio::sync::Mutex<()>,
}

fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl ModelRegistry {
    /// Opens the registry and loads every registered model with the backend and target it was
    /// registered with, holding their files in `blobs`. Blocking: call it from a blocking
    /// context at start-up. A model that no longer loads is logged and listed as not loaded.
    pub fn open(store: Store, blobs: Arc<Blobs>, backends: Backends) -> Result<Self, ModelError> {
        let tree = store.tree("models")?;
        let mut entries = HashMap::new();
        for record in store::all_json::<ModelRecord>(&tree)? {
            blobs.adopt(&record.digest);
            let graph = Self::load_registered(&backends, &blobs.path(&record.digest), &record);
            if let Err(error) = &graph {
                tracing::error!(model = %record.name, %error, "registered model could not be loaded");
            }
            entries.insert(record.name.clone(), Entry { record, graph });
        }
        Ok(Self {
            store,
            tree,
            blobs,
            backends,
            changes: tokio::sync::Mutex::new(()),
            entries: RwLock::new(entries),
        })
    }

    fn load_registered(
        backends: &Backends,
        file: &Path,
        record: &ModelRecord,
    ) -> Result<Arc<dyn Graph>, String> {
        let backend = backends
            .named(record.encoding, &record.backend)
            .ok_or_else(|| format!("this node has no {} backend", record.backend))?;
        if let Some(reason) = backend.unavailable_reason() {
            return Err(format!(
                "the {} backend is unavailable: {reason}",
                record.backend
            ));
        }
        let target = backend::parse_target(&record.target).unwrap_or(ExecutionTarget::Cpu);
        let size = std::fs::metadata(file).map_err(|e| format!("its file is missing: {e}"))?;
        if size.len() != record.size_bytes {
            return Err(format!(
                "its file holds {} bytes, not the {} registered: add the model again",
                size.len(),
                record.size_bytes
            ));
        }
        let file = file.to_path_buf();
        let graph = backends
            .threads()
            .run(move || backend.load_file(&file, target))
            .map_err(|e| e.to_string())?;
        Self::batched(backends, graph, record.batching).map_err(|e| e.to_string())
    }

    /// `graph`, batching its computes as `policy` says.
    fn batched(
        backends: &Backends,
        graph: Arc<dyn Graph>,
        policy: Option<BatchPolicy>,
    ) -> Result<Arc<dyn Graph>, ModelError> {
        let Some(policy) = policy else {
            return Ok(graph);
        };
        if !graph.computes_independently() {
            return Err(ModelError::InvalidBatching(
                "its computes depend on each other (an LLM's generations, which llama.cpp \
                 batches itself: [nn] llm_batch_sequences)"
                    .to_string(),
            ));
        }
        let slots = backends.compute_slots().clone();
        Ok(Arc::new(BatchedGraph::new(graph, policy, slots)))
    }

    /// The backends models can be loaded with.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The loaded graph registered as `name`, for an app of `tenant`: a model another tenant
    /// owns is not found.
    pub fn graph_for(&self, name: &str, tenant: &str) -> Result<Arc<dyn Graph>, ModelError> {
        match self.entries.read().expect("registry lock").get(name) {
            Some(entry) if !entry.record.usable_by(tenant) => {
                Err(ModelError::NotFound(name.to_string()))
            }
            None => Err(ModelError::NotFound(name.to_string())),
            Some(Entry {
                graph: Ok(graph), ..
            }) => Ok(graph.clone()),
            Some(Entry {
                graph: Err(reason), ..
            }) => Err(ModelError::NotLoaded {
                name: name.to_string(),
                reason: reason.clone(),
            }),
        }
    }

    /// The record of the model registered as `name`.
    pub fn record(&self, name: &str) -> Option<ModelRecord> {
        let entries = self.entries.read().expect("registry lock");
        entries.get(name).map(|entry| entry.record.clone())
    }

    /// Every registered model, by name, and whether it is loaded.
    pub fn list(&self) -> Vec<ModelStatus> {
        let mut models: Vec<_> = self
            .entries
            .read()
            .expect("registry lock")
            .values()
            .map(|entry| ModelStatus {
                record: entry.record.clone(),
                loaded: entry.graph.is_ok(),
                load_error: entry.graph.as_ref().err().cloned(),
                generation: entry
                    .graph
                    .as_ref()
                    .ok()
                    .and_then(|graph| graph.generation_activity()),
                batches: entry
                    .graph
                    .as_ref()
                    .ok()
                    .and_then(|graph| graph.batching_activity()),
            })
            .collect();
        models.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        models
    }

    /// Registers the model in `staged` (a file in the data dir) under `name`, replacing any
    /// model of that name, with the backend [`Backends::choose`] picks. The file is loaded
    /// first: one that does not load is refused and deleted (unless another model shares its
    /// bytes), and nothing changes.
    pub async fn add(
        &self,
        name: &str,
        staged: PathBuf,
        upload: Upload,
    ) -> Result<ModelRecord, ModelError> {
        let refuse = |error: ModelError, staged: &Path| {
            let _ = std::fs::remove_file(staged);
            Err(error)
        };
        if !valid_name(name) {
            return refuse(ModelError::InvalidName(name.to_string()), &staged);
        }
        let Some(target) = backend::parse_target(&upload.target) else {
            return refuse(ModelError::InvalidTarget(upload.target), &staged);
        };
        // Choosing may start a runtime-linked backend (its first use): blocking work.
        let backends = self.backends.clone();
        let (encoding, named) = (upload.encoding, upload.backend.clone());
        let chosen = tokio::task::spawn_blocking(move || {
            backends.choose(encoding, named.as_deref(), target)
        })
        .await
        .map_err(|e| ModelError::InvalidModel(format!("choosing a backend failed: {e}")));
        let choice = match chosen {
            Ok(Ok(choice)) => choice,
            Ok(Err(error)) => return refuse(error.into(), &staged),
            Err(error) => return refuse(error, &staged),
        };
        let _changing = self.changes.lock().await;
        let owner = self
            .entries
            .read()
            .expect("registry lock")
            .get(name)
            .map(|entry| entry.record.tenant.clone());
        if owner.is_some_and(|owner| owner != upload.tenant) {
            return refuse(ModelError::Taken(name.to_string()), &staged);
        }
        let (blobs, digest) = (self.blobs.clone(), upload.digest.clone());
        let backend = choice.backend.clone();
        let target = choice.target;
        // Storing, reading and optimising the model is blocking CPU and file work. A model that
        // does not load lets its blob go again.
        let (held, graph) = self
            .backends
            .threads()
            .spawn(move || {
                let held = blobs.put_file(&staged, &digest)?;
                match backend.load_file(&blobs.path(&digest), target) {
                    Ok(graph) => Ok((held, graph)),
                    Err(BackendError::InvalidModel(message)) => {
                        Err(ModelError::InvalidModel(message))
                    }
                    Err(other) => Err(ModelError::InvalidModel(format!(
                        "the model does not load: {other}"
                    ))),
                }
            })
            .await
            .map_err(|e| ModelError::InvalidModel(format!("loading the model failed: {e}")))??;
        let graph = match Self::batched(&self.backends, graph, upload.batching) {
            Ok(graph) => graph,
            Err(error) => {
                held.release_async().await;
                return Err(error);
            }
        };
        let record = ModelRecord {
            name: name.to_string(),
            digest: upload.digest,
            encoding: upload.encoding,
            backend: choice.backend.name().to_string(),
            target: backend::target_name(choice.target).to_string(),
            fallback: choice.fallback,
            size_bytes: upload.size_bytes,
            added_at: store::unix_now(),
            tenant: upload.tenant,
            batching: upload.batching,
        };
        store::put_json(&self.tree, name, &record)?;
        self.store.make_durable().await?;
        held.keep();
        let previous = self.entries.write().expect("registry lock").insert(
            name.to_string(),
            Entry {
                record: record.clone(),
                graph: Ok(graph),
            },
        );
        if let Some(previous) = previous {
            self.blobs.release_async(&previous.record.digest).await;
        }
        Ok(record)
    }

    /// Unregisters a model; instances that hold it keep it until they finish.
    pub async fn remove(&self, name: &str) -> Result<ModelRecord, ModelError> {
        let _changing = self.changes.lock().await;
        let record = self
            .entries
            .read()
            .expect("registry lock")
            .get(name)
            .map(|e| e.record.clone());
        let Some(record) = record else {
            return Err(ModelError::NotFound(name.to_string()));
        };
        self.tree.remove(name).map_err(StoreError::from)?;
        self.store.make_durable().await?;
        self.entries.write().expect("registry lock").remove(name);
        self.blobs.release_async(&record.digest).await;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::backend::Cancellation;
    use crate::testing::{fake_model, u8_tensor, FakeBackend, TempStore};

    fn product(graph: &Arc<dyn Graph>, values: &[u8]) -> Vec<u8> {
        let mut context = graph.init_execution_context().unwrap();
        let outputs = context
            .compute(
                vec![(String::new(), u8_tensor(values))],
                &Cancellation::default(),
            )
            .unwrap();
        outputs[0].1.data.clone()
    }

    #[tokio::test]
    async fn a_model_is_loaded_once_and_shared_and_kept_across_a_restart() {
        let store = TempStore::default();
        let fake = Arc::new(FakeBackend::default());
        let registry = store.registry(&fake);
        let (staged, upload) = store.upload(&fake_model(3));
        let record = registry.add("triple", staged, upload).await.unwrap();
        assert_eq!(
            (record.backend.as_str(), record.encoding),
            ("fake", Encoding::Onnx)
        );
        let (first, second) = (
            registry.graph_for("triple", "default").unwrap(),
            registry.graph_for("triple", "default").unwrap(),
        );
        assert!(Arc::ptr_eq(&first, &second), "each user got its own copy");
        assert_eq!(product(&first, &[1, 2]), vec![3, 6]);
        assert_eq!(fake.loads(), 1);

        drop((registry, first, second));
        let store = store.reopen();
        let registry = store.registry(&fake);
        store.blobs.sweep().unwrap();
        assert_eq!(
            product(&registry.graph_for("triple", "default").unwrap(), &[5]),
            vec![15]
        );
        assert_eq!(store.blob_files(), vec![record.digest]);
    }

    #[tokio::test]
    async fn a_tenants_model_is_its_own_and_its_name_is_taken_for_others() {
        let store = TempStore::default();
        let registry = store.registry(&Arc::new(FakeBackend::default()));
        let (staged, mut upload) = store.upload(&fake_model(2));
        upload.tenant = Some("acme".into());
        registry.add("double", staged, upload).await.unwrap();
        assert!(registry.graph_for("double", "acme").is_ok());
        assert!(matches!(
            registry.graph_for("double", "globex"),
            Err(ModelError::NotFound(_))
        ));
        let (staged, mut upload) = store.upload(&fake_model(3));
        upload.tenant = Some("globex".into());
        let taken = registry.add("double", staged.clone(), upload).await;
        assert!(matches!(taken, Err(ModelError::Taken(_))), "{taken:?}");
        assert!(!staged.exists());
        assert_eq!(
            product(&registry.graph_for("double", "acme").unwrap(), &[4]),
            vec![8]
        );
        // The node's own models are every tenant's to load.
        let (staged, upload) = store.upload(&fake_model(5));
        registry.add("node-wide", staged, upload).await.unwrap();
        assert!(registry.graph_for("node-wide", "globex").is_ok());
    }

    #[tokio::test]
    async fn a_model_that_does_not_load_changes_nothing() {
        let store = TempStore::default();
        let registry = store.registry(&Arc::new(FakeBackend::default()));
        let (staged, upload) = store.upload(b"not a model");
        let refused = registry.add("broken", staged.clone(), upload).await;
        assert!(
            matches!(refused, Err(ModelError::InvalidModel(_))),
            "{refused:?}"
        );
        assert!(registry.list().is_empty());
        assert!(store.blob_files().is_empty() && !staged.exists());
        let (staged, upload) = store.upload(&fake_model(2));
        let refused = registry.add("bad name!", staged.clone(), upload).await;
        assert!(matches!(refused, Err(ModelError::InvalidName(_))));
        assert!(store.blob_files().is_empty() && !staged.exists());
    }

    #[tokio::test]
    async fn models_sharing_bytes_share_one_file_until_the_last_goes() {
        let store = TempStore::default();
        let registry = store.registry(&Arc::new(FakeBackend::default()));
        for name in ["a", "b"] {
            let (staged, upload) = store.upload(&fake_model(2));
            registry.add(name, staged, upload).await.unwrap();
        }
        let shared = store.blob_files();
        assert_eq!(shared.len(), 1);
        // Replacing `a` with other bytes keeps the file `b` still uses.
        let (staged, upload) = store.upload(&fake_model(4));
        registry.add("a", staged, upload).await.unwrap();
        assert_eq!(store.blob_files().len(), 2);
        registry.remove("b").await.unwrap();
        assert!(!store.blob_files().contains(&shared[0]));
        registry.remove("a").await.unwrap();
        assert!(store.blob_files().is_empty());
        assert!(matches!(
            registry.remove("a").await,
            Err(ModelError::NotFound(_))
        ));
    }
}
