//! The node's sled database: what lives in which tree, how it is opened, and how writes become
//! durable.
//!
//! Trees: `apps` (app name → [`crate::apps::AppRecord`] JSON), `models` (model name →
//! [`crate::nn::ModelRecord`] JSON) and one `kv/<app>/<bucket>` tree per key-value bucket.
//! Component and model bytes live as files named by their SHA-256 digest beside the database
//! ([`blobs`]).
//!
//! sled makes writes durable only on `flush`, which costs ~0.1 ms. [`Store::make_durable`]
//! groups the flushes of concurrent writers into one (group commit) and runs it on the
//! store's own flush thread: never on the async reactor, and never queued behind inference on
//! tokio's blocking pool, so a node busy with generations still acknowledges writes promptly.

pub mod backup;
pub mod blobs;
pub mod files;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Errors from the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database at {path} cannot be opened: {source}. If the node was stopped abruptly the store may be damaged: move that folder aside (or restore a backup) and start again")]
    Open { path: String, source: sled::Error },
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record {key} is not valid: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("flushing the database failed: {0}")]
    Flush(String),
}

/// A handle on the node's database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    commits: Arc<GroupCommit>,
    /// How long each flush took (exported as a metric).
    flush_seconds: Histogram,
}

struct GroupCommit {
    /// Tickets handed to writers after their write; a flush that starts after reading ticket
    /// `n` covers every write holding a ticket `<= n`.
    issued: AtomicU64,
    /// The highest ticket known to be durable; the lock also serialises flushes.
    durable: tokio::sync::Mutex<u64>,
    /// The flush thread's queue (each request carries where to send the outcome), and the
    /// thread, joined when the last handle goes so that the database is closed by then.
    flusher: Option<std::sync::mpsc::Sender<FlushRequest>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        drop(self.flusher.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type FlushRequest = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// Starts the thread that flushes `db` on request; it ends when the last [`Store`] is gone.
fn start_flusher(
    db: sled::Db,
    flush_seconds: Histogram,
) -> std::io::Result<(
    std::sync::mpsc::Sender<FlushRequest>,
    std::thread::JoinHandle<()>,
)> {
    // Requests are sent under the group-commit lock, one at a time: the queue stays short
    // (longer only by writers that gave up waiting), and sending never blocks the reactor.
    let (sender, receiver) = std::sync::mpsc::channel::<FlushRequest>();
    let thread = std::thread::Builder::new()
        .name("tensorlet-flush".into())
        .spawn(move || {
            for reply in receiver {
                let started = std::time::Instant::now();
                let flushed = db.flush().map(drop).map_err(StoreError::from);
                flush_seconds.observe(started.elapsed().as_secs_f64());
                let _ = reply.send(flushed);
            }
        })?;
    Ok((sender, thread))
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.display().to_string(),
                source,
            })?;
        // 50 µs … 0.8 s.
        let flush_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 15));
        let (flusher, thread) = start_flusher(db.clone(), flush_seconds.clone())
            .map_err(|e| StoreError::Flush(format!("cannot start the flush thread: {e}")))?;
        Ok(Self {
            db,
            commits: Arc::new(GroupCommit {
                issued: AtomicU64::new(0),
                durable: tokio::sync::Mutex::new(0),
                flusher: Some(flusher),
                thread: Some(thread),
            }),
            flush_seconds,
        })
    }

    /// The latency of this store's flushes.
    pub fn flush_seconds(&self) -> Histogram {
        self.flush_seconds.clone()
    }

    /// Opens a named tree.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Names of all trees whose name starts with `prefix`.
    pub fn tree_names(&self, prefix: &str) -> Vec<String> {
        self.db
            .tree_names()
            .into_iter()
            .filter_map(|name| String::from_utf8(name.to_vec()).ok())
            .filter(|name| name.starts_with(prefix))
            .collect()
    }

    /// Drops a tree and everything in it.
    pub fn drop_tree(&self, name: &str) -> Result<(), StoreError> {
        self.db.drop_tree(name)?;
        Ok(())
    }

    /// Returns once every write made before this call is on disk. Concurrent callers share
    /// one flush.
    pub async fn make_durable(&self) -> Result<(), StoreError> {
        let ticket = self.commits.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = self.commits.durable.lock().await;
        if *durable >= ticket {
            return Ok(());
        }
        let covered = self.commits.issued.load(Ordering::SeqCst);
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let gone = || StoreError::Flush("the flush thread stopped".into());
        let flusher = self.commits.flusher.as_ref().ok_or_else(gone)?;
        flusher.send(reply).map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())??;
        *durable = covered;
        Ok(())
    }

    /// Flushes from a synchronous context (start-up, shutdown, tests).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Seconds since the Unix epoch, as records store times.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a JSON record.
pub fn get_json<T: DeserializeOwned>(
    tree: &sled::Tree,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    key: key.to_string(),
                    source,
                })
        }
    }
}

/// Writes a JSON record (not yet durable: call [`Store::make_durable`]).
pub fn put_json<T: Serialize>(tree: &sled::Tree, key: &str, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(value).expect("records serialise");
    tree.insert(key, bytes)?;
    Ok(())
}

/// Reads every JSON record of a tree.
pub fn all_json<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .map(|entry| {
            let (key, bytes) = entry?;
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes_and_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = store.tree("t").unwrap();
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let store = store.clone();
            let tree = tree.clone();
            tasks.push(tokio::spawn(async move {
                tree.insert(i.to_be_bytes(), &b"v"[..]).unwrap();
                store.make_durable().await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        drop(tree);
        drop(store);
        let reopened = crate::testing::open_store(dir.path());
        assert_eq!(reopened.tree("t").unwrap().len(), 64);
    }

    #[test]
    fn a_damaged_database_is_reported_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("conf"), b"not a sled config").unwrap();
        std::fs::write(dir.path().join("db"), vec![0xffu8; 4096]).unwrap();
        match Store::open(dir.path()) {
            Err(error) => assert!(
                error.to_string().contains("move that folder aside"),
                "{error}"
            ),
            Ok(_) => panic!("a damaged store opened"),
        }
    }
}
