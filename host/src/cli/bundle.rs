//! Multi-file models (a BERT directory: weights, config, tokenizer) travel and are stored as one
//! uncompressed tar bundle, so that a model is still one upload and one digest. The bundle is
//! deterministic — entries sorted, times, owners and modes fixed — so the same directory
//! always has the same digest.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// The regular files under `dir`, as paths relative to it, sorted; hidden entries skipped.
fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let listing = std::fs::read_dir(dir.join(&relative))
            .with_context(|| format!("cannot read {}", dir.join(&relative).display()))?;
        for entry in listing {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = relative.join(entry.file_name());
            let kind = std::fs::metadata(entry.path())?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Writes the files under `dir` into the tar bundle `out`.
pub fn bundle_dir(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let files = files_under(dir)?;
    if files.is_empty() {
        anyhow::bail!("{} holds no model files", dir.display());
    }
    let target =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(target));
    builder.mode(tar::HeaderMode::Deterministic);
    for relative in files {
        let mut file = std::fs::File::open(dir.join(&relative))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(file.metadata()?.len());
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, &relative, &mut file)
            .with_context(|| format!("cannot bundle {}", relative.display()))?;
    }
    builder.into_inner()?.into_inner()?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_directory_gives_the_same_bytes_whatever_its_file_times() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("model/1_Pooling")).unwrap();
        std::fs::write(dir.path().join("model/config.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("model/1_Pooling/config.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("model/.gitattributes"), b"x").unwrap();
        let first = dir.path().join("first.tar");
        bundle_dir(&dir.path().join("model"), &first).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(dir.path().join("model/config.json"), b"{}").unwrap();
        let second = dir.path().join("second.tar");
        bundle_dir(&dir.path().join("model"), &second).unwrap();
        let first = std::fs::read(first).unwrap();
        assert_eq!(first, std::fs::read(second).unwrap());
        let names: Vec<String> = tar::Archive::new(first.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["1_Pooling/config.json", "config.json"]);
    }

    #[test]
    fn an_empty_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(bundle_dir(dir.path(), &dir.path().join("out.tar")).is_err());
    }
}
