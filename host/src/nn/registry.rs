//! The node's model registry: records in sled, files in `<data-dir>/models/` named by their
//! SHA-256 digest, and each model loaded once into memory and shared by all instances.

use super::backend::{BackendError, Backends, ExecutionTarget, Graph};
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
    pub encoding: String,
    pub backend: String,
    pub size_bytes: u64,
    /// Seconds since the Unix epoch.
    pub added_at: u64,
}

/// Why a model operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model name {0:?}: use 1-128 letters, digits, '.', '_' or '-'")]
    InvalidName(String),
    #[error("this node has no backend for encoding {encoding:?} (available: {available})")]
    UnknownEncoding { encoding: String, available: String },
    #[error("{0}")]
    InvalidModel(String),
    #[error("no model named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("model file I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

struct Loaded {
    record: ModelRecord,
    graph: Arc<dyn Graph>,
}

/// The registry; one per node.
pub struct ModelRegistry {
    store: Store,
    tree: sled::Tree,
    dir: PathBuf,
    backends: Backends,
    loaded: RwLock<HashMap<String, Loaded>>,
}

fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl ModelRegistry {
    /// Opens the registry and loads every registered model. Blocking: call it from a blocking
    /// context at start-up. A model that no longer loads is logged and left out.
    pub fn open(store: Store, dir: &Path, backends: Backends) -> Result<Self, ModelError> {
        std::fs::create_dir_all(dir)?;
        let tree = store.tree("models")?;
        let mut loaded = HashMap::new();
        for record in store::all_json::<ModelRecord>(&tree)? {
            let path = dir.join(&record.digest);
            let result = backends
                .for_encoding(&record.encoding)
                .ok_or_else(|| format!("no backend for encoding {}", record.encoding))
                .and_then(|backend| {
                    backend
                        .load_file(&path, ExecutionTarget::Cpu)
                        .map_err(|e| e.to_string())
                });
            match result {
                Ok(graph) => {
                    loaded.insert(record.name.clone(), Loaded { record, graph });
                }
                Err(error) => {
                    tracing::error!(model = %record.name, %error, "registered model could not be loaded")
                }
            }
        }
        Ok(Self {
            store,
            tree,
            dir: dir.to_path_buf(),
            backends,
            loaded: RwLock::new(loaded),
        })
    }

    /// The backends models can be loaded with.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The loaded graph registered as `name`.
    pub fn graph(&self, name: &str) -> Option<Arc<dyn Graph>> {
        self.loaded
            .read()
            .expect("registry lock")
            .get(name)
            .map(|l| l.graph.clone())
    }

    /// Every registered model, by name.
    pub fn list(&self) -> Vec<ModelRecord> {
        let mut records: Vec<_> = self
            .loaded
            .read()
            .expect("registry lock")
            .values()
            .map(|l| l.record.clone())
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// Registers the model in `staged` (a file in the data dir) under `name`, replacing any
    /// model of that name. The file is loaded first: one that does not load is refused and
    /// deleted, and nothing changes.
    pub async fn add(
        &self,
        name: &str,
        encoding: &str,
        staged: PathBuf,
        digest: String,
        size_bytes: u64,
    ) -> Result<ModelRecord, ModelError> {
        let refuse = |error: ModelError, staged: &Path| {
            let _ = std::fs::remove_file(staged);
            Err(error)
        };
        if !valid_name(name) {
            return refuse(ModelError::InvalidName(name.to_string()), &staged);
        }
        let Some(backend) = self.backends.for_encoding(encoding) else {
            let available = self
                .backends
                .describe()
                .iter()
                .map(|(_, e)| *e)
                .collect::<Vec<_>>()
                .join(", ");
            return refuse(
                ModelError::UnknownEncoding {
                    encoding: encoding.to_string(),
                    available,
                },
                &staged,
            );
        };
        let final_path = self.dir.join(&digest);
        let backend_name = backend.name();
        // Reading and optimising the model is blocking CPU and file work.
        let graph = tokio::task::spawn_blocking(move || -> Result<Arc<dyn Graph>, ModelError> {
            match backend.load_file(&staged, ExecutionTarget::Cpu) {
                Ok(graph) => {
                    std::fs::rename(&staged, &final_path)?;
                    Ok(graph)
                }
                Err(error) => {
                    let _ = std::fs::remove_file(&staged);
                    Err(match error {
                        BackendError::InvalidModel(message) => ModelError::InvalidModel(message),
                        other => {
                            ModelError::InvalidModel(format!("the model does not load: {other}"))
                        }
                    })
                }
            }
        })
        .await
        .map_err(|e| ModelError::InvalidModel(format!("loading the model failed: {e}")))??;
        let record = ModelRecord {
            name: name.to_string(),
            digest,
            encoding: encoding.to_string(),
            backend: backend_name.to_string(),
            size_bytes,
            added_at: store::unix_now(),
        };
        store::put_json(&self.tree, name, &record)?;
        self.store.make_durable().await?;
        let previous = self.loaded.write().expect("registry lock").insert(
            name.to_string(),
            Loaded {
                record: record.clone(),
                graph,
            },
        );
        if let Some(previous) = previous {
            self.remove_file_if_unused(&previous.record.digest);
        }
        Ok(record)
    }

    /// Unregisters a model; instances that hold it keep it until they finish.
    pub async fn remove(&self, name: &str) -> Result<ModelRecord, ModelError> {
        let record = self
            .loaded
            .read()
            .expect("registry lock")
            .get(name)
            .map(|l| l.record.clone());
        let Some(record) = record else {
            return Err(ModelError::NotFound(name.to_string()));
        };
        self.tree.remove(name).map_err(StoreError::from)?;
        self.store.make_durable().await?;
        self.loaded.write().expect("registry lock").remove(name);
        self.remove_file_if_unused(&record.digest);
        Ok(record)
    }

    fn remove_file_if_unused(&self, digest: &str) {
        let used = self
            .loaded
            .read()
            .expect("registry lock")
            .values()
            .any(|l| l.record.digest == digest);
        if !used {
            let _ = std::fs::remove_file(self.dir.join(digest));
        }
    }
}
