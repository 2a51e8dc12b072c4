//! Backup and restore of a node's state for disaster recovery: one tar file holding the sled
//! database, the blobs (components and models), the TLS identity, the admin token and the
//! secrets key, with a manifest of every file's SHA-256. A backup is taken of a stopped node,
//! holding sled's lock while it reads, so the database and the blobs are one consistent state;
//! compiled components are left out (a restored node compiles them again for its own CPU).
//! A restore checks every digest and that the database opens before the data dir appears.

use super::Store;
use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The manifest's name inside the archive.
const MANIFEST: &str = "tensorlet-backup.json";

/// What a backup holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// The version of tensorlet that wrote it.
    pub version: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub files: Vec<FileEntry>,
}

/// One file of a backup: its path in the data dir, size, digest and mode.
#[derive(Debug, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub mode: u32,
}

/// Whether a file under `blobs/` is a blob (named by its digest), not a derived file.
fn is_blob(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn digest_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), size))
}

/// The files of the data dir a backup keeps, relative to it, sorted: all but the top-level
/// entries in `skip` and the files derived from blobs.
fn kept_files(data_dir: &Path, skip: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = Vec::new();
    for entry in std::fs::read_dir(data_dir)? {
        let name = entry?.file_name();
        if !skip.iter().any(|skipped| name.as_os_str() == *skipped) {
            pending.push(PathBuf::from(name));
        }
    }
    while let Some(relative) = pending.pop() {
        let path = data_dir.join(&relative);
        if path.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                let name = entry?.file_name();
                let derived = relative == Path::new("blobs") && !is_blob(&name.to_string_lossy());
                if !derived {
                    pending.push(relative.join(name));
                }
            }
        } else {
            files.push(relative);
        }
    }
    files.sort();
    Ok(files)
}

/// Writes a backup of the stopped node in `data_dir` to `out`, leaving out the top-level
/// entries in `skip` (what is not state: uploads in progress, a running node's endpoint);
/// returns its manifest. Refuses while a node runs on `data_dir`, and a blob whose bytes no
/// longer match its name.
pub fn backup(data_dir: &Path, out: &Path, skip: &[&str]) -> anyhow::Result<Manifest> {
    let db = data_dir.join("db");
    if !db.exists() {
        bail!("{} holds no node (no db/)", data_dir.display());
    }
    // Held open until the archive is written: no node can start on it meanwhile.
    let store = Store::open(&db).map_err(|error| {
        anyhow!("cannot open the database ({error}); a backup is taken of a stopped node: stop the node using {} first", data_dir.display())
    })?;
    store.flush_blocking()?;
    let mut files = Vec::new();
    for relative in kept_files(data_dir, skip)? {
        let path = data_dir.join(&relative);
        let (sha256, size) = digest_file(&path)?;
        let name = relative.to_string_lossy().into_owned();
        if let Some(blob) = name.strip_prefix("blobs/") {
            if blob != sha256 {
                bail!("blob {blob} is damaged (its bytes hash to {sha256}); nothing was written");
            }
        }
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        files.push(FileEntry {
            path: name,
            size,
            sha256,
            mode,
        });
    }
    let manifest = Manifest {
        version: env!("CARGO_PKG_VERSION").to_string(),
        created_at: super::unix_now(),
        files,
    };
    let staged = out.with_extension("partial");
    let written = (|| -> anyhow::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staged)
            .with_context(|| format!("cannot write {}", staged.display()))?;
        let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
        let json = serde_json::to_vec_pretty(&manifest)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o600);
        header.set_cksum();
        archive.append_data(&mut header, MANIFEST, json.as_slice())?;
        for entry in &manifest.files {
            archive.append_path_with_name(data_dir.join(&entry.path), &entry.path)?;
        }
        let mut writer = archive.into_inner()?;
        writer.flush()?;
        writer
            .into_inner()
            .map_err(|e| anyhow!("{}", e.error()))?
            .sync_all()?;
        Ok(())
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&staged);
        return Err(error);
    }
    std::fs::rename(&staged, out)?;
    drop(store);
    Ok(manifest)
}

/// Restores the backup `archive` into `data_dir`, which must not exist or be empty. Every
/// file is checked against the manifest and the database must open before `data_dir` is
/// made; a damaged backup leaves nothing behind.
pub fn restore(archive: &Path, data_dir: &Path) -> anyhow::Result<Manifest> {
    if data_dir.exists() && std::fs::read_dir(data_dir)?.next().is_some() {
        bail!(
            "{} is not empty: restore into a new data dir",
            data_dir.display()
        );
    }
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let mut staging = Staging {
        path: parent.join(format!(".tensorlet-restore-{:016x}", rand::random::<u64>())),
        done: false,
    };
    super::files::create_private_dir(&staging.path)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(
        std::fs::File::open(archive)
            .with_context(|| format!("cannot open {}", archive.display()))?,
    ));
    let mut manifest: Option<Manifest> = None;
    let mut seen = Vec::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if name == MANIFEST {
            let mut json = Vec::new();
            entry.read_to_end(&mut json)?;
            manifest =
                Some(serde_json::from_slice(&json).context("the backup's manifest is damaged")?);
            continue;
        }
        let expected = manifest
            .as_ref()
            .and_then(|m| m.files.iter().find(|f| f.path == name))
            .ok_or_else(|| anyhow!("{name} is in the archive but not in its manifest: not a tensorlet backup, or a damaged one"))?;
        // `unpack_in` refuses paths that leave the folder (`..`, absolute ones).
        if !entry.unpack_in(&staging.path)? {
            bail!("{name} would land outside the data dir");
        }
        let path = staging.path.join(&name);
        let (sha256, _) = digest_file(&path)?;
        if sha256 != expected.sha256 {
            bail!(
                "{name} is damaged in the backup (SHA-256 {sha256}, the manifest says {})",
                expected.sha256
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(expected.mode))?;
        seen.push(name);
    }
    let manifest = manifest.ok_or_else(|| {
        anyhow!(
            "{} is not a tensorlet backup (no manifest)",
            archive.display()
        )
    })?;
    if let Some(missing) = manifest.files.iter().find(|f| !seen.contains(&f.path)) {
        bail!("{} is missing from the backup", missing.path);
    }
    drop(Store::open(&staging.path.join("db")).context("the restored database does not open")?);
    if data_dir.exists() {
        std::fs::remove_dir(data_dir)?;
    }
    std::fs::rename(&staging.path, data_dir)?;
    staging.done = true;
    super::files::sync_dir(parent)?;
    Ok(manifest)
}

/// A restore's folder until it becomes the data dir: removed if the restore fails.
struct Staging {
    path: PathBuf,
    done: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
