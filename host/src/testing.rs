//! The in-process test layer, beside the end-to-end tests: a temporary store (sled and blobs
//! in a folder deleted afterwards) and a fake inference backend, so that the registry,
//! key-value atomics, wasi-nn permissions and limits are tested through their real code
//! without a daemon, a component or a model library.

use crate::config::NnConfig;
use crate::nn::backend::{
    self, Backend, BackendError, Backends, ExecutionTarget, Graph, NamedTensor, StatelessModel,
    Tensor, TensorType,
};
use crate::nn::{Encoding, ModelRegistry, Upload};
use crate::store::blobs::{self, Blobs};
use crate::store::Store;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A node's storage in a temporary folder: the sled database and the blob store.
pub struct TempStore {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub blobs: Arc<Blobs>,
}

/// Opens the store in `dir`. Reopening a folder just after the last handle on it went can
/// find sled's background flusher still holding the file lock for a moment (in one process
/// only: a restarted node never sees it): try again then, for up to 5 s.
pub fn open_store(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(dir) {
            Ok(store) => return store,
            Err(crate::store::StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => panic!("{error}"),
        }
    }
}

impl Default for TempStore {
    fn default() -> Self {
        Self::open_in(tempfile::tempdir().expect("a temporary folder"))
    }
}

impl TempStore {
    /// The same folder opened again, as a restarted node would.
    pub fn reopen(self) -> Self {
        let Self { dir, store, blobs } = self;
        drop((store, blobs));
        Self::open_in(dir)
    }

    fn open_in(dir: tempfile::TempDir) -> Self {
        let store = open_store(&dir.path().join("db"));
        let blobs = Blobs::open(&dir.path().join("blobs")).expect("the blob store opens");
        Self { dir, store, blobs }
    }

    /// The names of the files in the blob store, sorted.
    pub fn blob_files(&self) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path().join("blobs"))
            .expect("blobs/ exists")
            .map(|e| {
                e.expect("a folder entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// A model registry on this store whose only backend is a [`FakeBackend`].
    pub fn registry(&self, fake: &Arc<FakeBackend>) -> Arc<ModelRegistry> {
        let backends = Backends::new(vec![fake.clone()], &NnConfig::default())
            .expect("no default backends are configured");
        Arc::new(
            ModelRegistry::open(self.store.clone(), self.blobs.clone(), backends)
                .expect("the registry opens"),
        )
    }

    /// Writes `bytes` as an upload in progress and describes it as the admin API would.
    pub fn upload(&self, bytes: &[u8]) -> (PathBuf, Upload) {
        let staged = self
            .dir
            .path()
            .join(format!("upload-{:016x}", rand::random::<u64>()));
        std::fs::write(&staged, bytes).expect("writing the upload");
        let upload = Upload {
            encoding: Encoding::Onnx,
            backend: None,
            target: "cpu".into(),
            digest: blobs::digest_of(bytes),
            size_bytes: bytes.len() as u64,
            tenant: None,
            batching: None,
        };
        (staged, upload)
    }
}

/// Model bytes the [`FakeBackend`] loads: `fake-model:<factor>`.
pub fn fake_model(factor: u8) -> Vec<u8> {
    format!("fake-model:{factor}").into_bytes()
}

/// An ONNX backend named `fake` that loads [`fake_model`] bytes into a model multiplying its
/// one U8 input by the factor, and counts its loads.
#[derive(Default)]
pub struct FakeBackend {
    loads: AtomicUsize,
}

impl FakeBackend {
    pub fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }
}

struct Multiply(u8);

impl StatelessModel for Multiply {
    fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        let [(_, input)] = <[NamedTensor; 1]>::try_from(inputs)
            .map_err(|_| BackendError::InvalidArgument("one input, please".into()))?;
        Ok(vec![(
            "product".into(),
            Tensor {
                data: input.data.iter().map(|v| v.wrapping_mul(self.0)).collect(),
                ..input
            },
        )])
    }
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn encoding(&self) -> Encoding {
        Encoding::Onnx
    }

    fn load(&self, bytes: &[u8], _target: ExecutionTarget) -> Result<Arc<dyn Graph>, BackendError> {
        let factor = std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.strip_prefix("fake-model:"))
            .and_then(|factor| factor.parse().ok())
            .ok_or_else(|| BackendError::InvalidModel("not a fake model".into()))?;
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok(backend::share(Multiply(factor)))
    }
}

/// A U8 tensor of `values`, one dimension.
pub fn u8_tensor(values: &[u8]) -> Tensor {
    Tensor {
        dimensions: vec![values.len() as u32],
        ty: TensorType::U8,
        data: values.to_vec(),
    }
}
