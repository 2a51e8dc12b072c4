//! The node's one content-addressed file store: components and models are blobs in
//! `<data-dir>/blobs/`, each named by the SHA-256 of its bytes, and files derived from a blob
//! (a compiled component) sit beside it as `<digest>.<tag>`.
//!
//! Blobs are reference-counted. Every record that points to a blob (an app, a model) holds
//! it; the count lives in memory and is rebuilt at start from the records, which are the
//! truth. A blob whose last hold goes is deleted with its derived files. Records are written
//! after their blob is durable and removed before it is deleted, so a crash in between leaves
//! at worst an unreferenced blob, which [`Blobs::sweep`] deletes at the next start.
//!
//! One blob may serve several records of different kinds (two apps, or an app and a model
//! uploaded with the same bytes): they share the file and its count.

use super::files;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Why a stream could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("it is larger than {0} bytes")]
    TooLarge(u64),
    #[error("reading it failed: {0}")]
    Read(String),
    #[error("writing it failed: {0}")]
    Io(#[from] io::Error),
}

/// A stream written to a file in `tmp_dir` and fsynced: its path, SHA-256 and size, ready
/// for [`Blobs::put_file`]. More than `limit` bytes, or a broken stream, is an error, and the
/// file is deleted.
pub async fn stage_stream<S, E>(
    tmp_dir: &Path,
    mut stream: S,
    limit: u64,
) -> Result<(PathBuf, String, u64), StageError>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    tokio::fs::create_dir_all(tmp_dir).await?;
    let staged = tmp_dir.join(format!("upload-{:016x}", rand::random::<u64>()));
    let written = async {
        let mut file = tokio::fs::File::create(&staged).await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| StageError::Read(e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(StageError::TooLarge(limit));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        Ok((hex::encode(hasher.finalize()), size))
    }
    .await;
    match written {
        Ok((digest, size)) => Ok((staged, digest, size)),
        Err(error) => {
            let _ = tokio::fs::remove_file(&staged).await;
            Err(error)
        }
    }
}

/// The blob store; one per node, shared by the runtime and the model registry.
pub struct Blobs {
    dir: PathBuf,
    /// Holds per digest. A digest absent here has no hold.
    holds: Mutex<HashMap<String, usize>>,
}

/// A hold on a blob taken by [`Blobs::put_bytes`] or [`Blobs::put_file`]: released when
/// dropped, unless [`Held::keep`] hands it to the record that now points to the blob.
#[must_use = "a hold is released when dropped"]
pub struct Held {
    blobs: Arc<Blobs>,
    digest: String,
    kept: bool,
}

impl Held {
    /// The blob's digest.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Keeps the hold for a record written durably; [`Blobs::release`] lets it go.
    pub fn keep(mut self) -> String {
        self.kept = true;
        std::mem::take(&mut self.digest)
    }
}

impl Held {
    /// Lets the hold go without blocking async code: if it was the last, the blob is deleted
    /// on the blocking pool (at once outside a tokio runtime).
    pub fn release_in_background(self) {
        let blobs = self.blobs.clone();
        let digest = self.keep();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || blobs.release(&digest))),
            Err(_) => blobs.release(&digest),
        }
    }

    /// Lets the hold go from async code and waits until a last hold's blob is deleted.
    pub async fn release_async(self) {
        let blobs = self.blobs.clone();
        let digest = self.keep();
        blobs.release_async(&digest).await;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.kept {
            self.blobs.release(&self.digest);
        }
    }
}

/// Whether `name` is a SHA-256 digest in lower-case hex, as blobs are named.
pub fn is_digest(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The SHA-256 of `bytes`, in lower-case hex.
pub fn digest_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The SHA-256 of the file at `path`, read in pieces.
pub fn digest_of_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Blobs {
    /// Opens the store in `dir`, removing what interrupted writes left there. Nothing is held
    /// yet: the owners of records [`Blobs::adopt`] theirs, then [`Blobs::sweep`] runs.
    pub fn open(dir: &Path) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        files::remove_staged(dir)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            holds: Mutex::new(HashMap::new()),
        }))
    }

    /// Where the blob `digest` is kept.
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest)
    }

    /// Where a file derived from blob `digest` and named by `tag` is kept; it is deleted with
    /// the blob.
    pub fn derived_path(&self, digest: &str, tag: &str) -> PathBuf {
        self.dir.join(format!("{digest}.{tag}"))
    }

    /// Counts a hold of a record read at start.
    pub fn adopt(&self, digest: &str) {
        *lock(&self.holds).entry(digest.to_string()).or_default() += 1;
    }

    /// Deletes every file that no record holds: blobs whose record was never written or was
    /// removed before a crash, and their derived files. Run once, after every owner adopted
    /// its records. Returns how many files went.
    pub fn sweep(&self) -> io::Result<usize> {
        let holds = lock(&self.holds);
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            let digest = name.split('.').next().unwrap_or_default();
            if !holds.contains_key(digest) {
                std::fs::remove_file(self.dir.join(&*name))?;
                removed += 1;
            }
        }
        if removed > 0 {
            files::sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Stores `bytes` and holds the blob. A blob already there is kept only if its bytes
    /// still hash to its name; otherwise it is written again.
    pub fn put_bytes(self: &Arc<Self>, bytes: &[u8]) -> io::Result<Held> {
        let held = self.hold(digest_of(bytes));
        let path = self.path(&held.digest);
        let intact = std::fs::read(&path).is_ok_and(|kept| digest_of(&kept) == held.digest);
        if !intact {
            files::write_durably(&path, bytes, 0o644)?;
        }
        Ok(held)
    }

    /// Moves the file at `staged` (whose SHA-256 is `digest`) into the store and holds the
    /// blob. When an intact blob of that digest is already there, the staged file is deleted
    /// instead. On error the staged file is deleted too.
    pub fn put_file(self: &Arc<Self>, staged: &Path, digest: &str) -> io::Result<Held> {
        let held = self.hold(digest.to_string());
        let path = self.path(digest);
        let stored = if digest_of_file(&path).is_ok_and(|kept| kept == digest) {
            std::fs::remove_file(staged)
        } else {
            files::commit(staged, &path)
        };
        if let Err(error) = stored {
            let _ = std::fs::remove_file(staged);
            return Err(error);
        }
        Ok(held)
    }

    /// Takes a hold of `digest`, so that the blob cannot be deleted while it is written or a
    /// record (a revision, a model) uses it.
    pub fn hold(self: &Arc<Self>, digest: String) -> Held {
        self.adopt(&digest);
        Held {
            blobs: self.clone(),
            digest,
            kept: false,
        }
    }

    /// Lets one hold of `digest` go; the last deletes the blob and its derived files.
    pub fn release(&self, digest: &str) {
        let mut holds = lock(&self.holds);
        let Some(count) = holds.get_mut(digest) else {
            tracing::warn!(digest, "released a blob that was not held");
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        holds.remove(digest);
        // Deleted under the lock: a put of the same digest waits, then writes it anew.
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().split('.').next() == Some(digest) {
                if let Err(error) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), %error, "cannot delete an unused blob");
                }
            }
        }
        let _ = files::sync_dir(&self.dir);
    }

    /// [`Blobs::release`] from async code: deleting and syncing the folder is blocking I/O,
    /// done on the blocking pool while the caller waits.
    pub async fn release_async(self: &Arc<Self>, digest: &str) {
        let (blobs, digest) = (self.clone(), digest.to_string());
        if let Err(error) = tokio::task::spawn_blocking(move || blobs.release(&digest)).await {
            tracing::warn!(%error, "releasing a blob failed");
        }
    }

    /// Moves the files of a node from before the blob store (`components/<digest>.wasm`,
    /// `models/<digest>`) into it, and deletes the old compile cache, so that an upgraded node
    /// keeps its apps and models.
    pub fn adopt_legacy_folders(&self, data_dir: &Path) -> io::Result<()> {
        for (folder, suffix) in [("components", ".wasm"), ("models", "")] {
            let legacy = data_dir.join(folder);
            let Ok(entries) = std::fs::read_dir(&legacy) else {
                continue;
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                match name.strip_suffix(suffix) {
                    Some(digest) if is_digest(digest) => {
                        std::fs::rename(entry.path(), self.path(digest))?
                    }
                    _ => std::fs::remove_file(entry.path())?,
                }
            }
            std::fs::remove_dir(&legacy)?;
        }
        let cache = data_dir.join("cache");
        if cache.exists() {
            std::fs::remove_dir_all(cache)?;
        }
        files::sync_dir(&self.dir)?;
        files::sync_dir(data_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(blobs: &Blobs) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(&blobs.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_blob_goes_with_its_last_hold_and_takes_its_derived_files() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let first = blobs.put_bytes(b"component").unwrap().keep();
        let second = blobs.put_bytes(b"component").unwrap().keep();
        assert_eq!(first, second);
        std::fs::write(blobs.derived_path(&first, "engine.cwasm"), b"compiled").unwrap();
        assert_eq!(names(&blobs).len(), 2);
        blobs.release(&first);
        assert_eq!(names(&blobs).len(), 2, "one record still holds it");
        blobs.release(&first);
        assert!(names(&blobs).is_empty());
    }

    #[test]
    fn a_hold_not_kept_lets_a_new_blob_go_but_not_a_shared_one() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        drop(blobs.put_bytes(b"refused upload").unwrap());
        assert!(names(&blobs).is_empty());
        let kept = blobs.put_bytes(b"shared").unwrap().keep();
        drop(blobs.put_bytes(b"shared").unwrap());
        assert_eq!(names(&blobs), vec![kept]);
    }

    #[test]
    fn a_damaged_blob_is_written_again_and_staged_files_are_moved_in() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let digest = blobs.put_bytes(b"model bytes").unwrap().keep();
        std::fs::write(blobs.path(&digest), b"bit rot").unwrap();
        let again = blobs.put_bytes(b"model bytes").unwrap().keep();
        assert_eq!(std::fs::read(blobs.path(&again)).unwrap(), b"model bytes");

        let staged = dir.path().join("upload");
        std::fs::write(&staged, b"uploaded model").unwrap();
        let held = blobs
            .put_file(&staged, &digest_of(b"uploaded model"))
            .unwrap();
        assert!(!staged.exists());
        assert_eq!(
            std::fs::read(blobs.path(held.digest())).unwrap(),
            b"uploaded model"
        );
    }

    #[test]
    fn the_sweep_deletes_what_no_record_holds() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let held = blobs.put_bytes(b"deployed").unwrap().keep();
        let orphan = blobs.put_bytes(b"record never written").unwrap().keep();
        std::fs::write(blobs.derived_path(&orphan, "x.cwasm"), b"").unwrap();
        std::fs::write(dir.path().join(".partial.0123.tmp"), b"").unwrap();
        drop(blobs);

        let reopened = Blobs::open(dir.path()).unwrap();
        reopened.adopt(&held);
        assert_eq!(reopened.sweep().unwrap(), 2);
        assert_eq!(names(&reopened), vec![held]);
    }

    #[test]
    fn files_of_an_older_node_are_adopted() {
        let data = tempfile::tempdir().unwrap();
        let digest = digest_of(b"old component");
        std::fs::create_dir_all(data.path().join("components")).unwrap();
        std::fs::create_dir_all(data.path().join("cache")).unwrap();
        std::fs::write(
            data.path()
                .join("components")
                .join(format!("{digest}.wasm")),
            b"old component",
        )
        .unwrap();
        let blobs = Blobs::open(&data.path().join("blobs")).unwrap();
        blobs.adopt_legacy_folders(data.path()).unwrap();
        assert_eq!(names(&blobs), vec![digest]);
        assert!(!data.path().join("components").exists());
        assert!(!data.path().join("cache").exists());
    }
}
