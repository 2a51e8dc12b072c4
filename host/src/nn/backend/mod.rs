//! The seam between wasi-nn and the inference libraries: a [`Backend`] loads model bytes into
//! a [`Graph`] shared by every instance; a graph makes one [`ExecutionContext`] per guest
//! context, and contexts of one graph run concurrently (no graph-wide lock).
//!
//! Backends are ours rather than wasmtime-wasi-nn's so that guest input is validated before
//! it reaches a library (its ONNX backend panics on non-f32 input) and so that `compute` runs
//! on the blocking pool instead of the async reactor.

pub mod llama;
pub mod tract;

pub use super::bindings::wasi::nn::graph::ExecutionTarget;
pub use super::bindings::wasi::nn::tensor::TensorType;
use std::path::Path;
use std::sync::Arc;

/// A host-side tensor: the value behind a `wasi:nn/tensor.tensor` resource.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub dimensions: Vec<u32>,
    pub ty: TensorType,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("dimensions", &self.dimensions)
            .field("ty", &self.ty)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Size in bytes of one element of a tensor type.
pub fn element_size(ty: TensorType) -> usize {
    match ty {
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
        TensorType::U8 => 1,
    }
}

impl Tensor {
    /// Checks that `data` holds exactly the elements `dimensions` describe.
    pub fn validate(&self) -> Result<(), BackendError> {
        let elements = self
            .dimensions
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
            .ok_or_else(|| {
                BackendError::InvalidArgument(format!(
                    "tensor dimensions {:?} overflow",
                    self.dimensions
                ))
            })?;
        let expected = elements.checked_mul(element_size(self.ty));
        if expected != Some(self.data.len()) {
            return Err(BackendError::InvalidArgument(format!(
                "tensor of dimensions {:?} and type {:?} needs {} bytes but has {}",
                self.dimensions,
                self.ty,
                expected.map_or("too many".to_string(), |e| e.to_string()),
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// What went wrong in a backend; each maps to a wasi-nn error code.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The model bytes are not a model this backend can load.
    #[error("{0}")]
    InvalidModel(String),
    /// The guest passed tensors the model cannot take.
    #[error("{0}")]
    InvalidArgument(String),
    /// The backend cannot do what was asked (target, tensor type).
    #[error("{0}")]
    Unsupported(String),
    /// The library failed while running.
    #[error("{0}")]
    Runtime(String),
}

/// A named tensor, as `compute` takes and returns them.
pub type NamedTensor = (String, Tensor);

/// An inference library, able to load models of one encoding.
pub trait Backend: Send + Sync {
    /// Short name shown to operators (`tract`).
    fn name(&self) -> &'static str;
    /// The wasi-nn encoding it claims (`onnx`).
    fn encoding(&self) -> &'static str;
    /// Loads a model from bytes (a guest's `load`). Runs on a blocking thread.
    fn load(&self, bytes: &[u8], target: ExecutionTarget) -> Result<Arc<dyn Graph>, BackendError>;

    /// Loads a registered model from its file. Runs on a blocking thread; may take long for
    /// large models. Backends that map files (llama.cpp) override it.
    fn load_file(
        &self,
        path: &Path,
        target: ExecutionTarget,
    ) -> Result<Arc<dyn Graph>, BackendError> {
        let bytes = std::fs::read(path).map_err(|e| {
            BackendError::InvalidModel(format!("cannot read {}: {e}", path.display()))
        })?;
        self.load(&bytes, target)
    }
}

/// A loaded model, shared by every instance that uses it.
pub trait Graph: Send + Sync {
    /// Creates a context to run the model in; cheap.
    fn init_execution_context(&self) -> Result<Box<dyn ExecutionContext>, BackendError>;
}

/// One guest's use of a graph. `compute` blocks: callers run it on the blocking pool.
pub trait ExecutionContext: Send {
    /// Runs the model on `inputs` (by input name) and returns every output by name.
    fn compute(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError>;
}

/// The backends this node has, looked up by encoding.
#[derive(Clone)]
pub struct Backends(Vec<Arc<dyn Backend>>);

impl Backends {
    /// The backends built into this binary, configured from the node's `[nn]` section.
    pub fn builtin(config: &crate::config::NnConfig) -> Self {
        Self(vec![
            Arc::new(tract::TractBackend),
            Arc::new(llama::LlamaCppBackend {
                threads: config.inference_threads(),
                max_context_tokens: config.max_context_tokens,
            }),
        ])
    }

    /// The backend that loads `encoding`, if any.
    pub fn for_encoding(&self, encoding: &str) -> Option<Arc<dyn Backend>> {
        self.0.iter().find(|b| b.encoding() == encoding).cloned()
    }

    /// `(name, encoding)` of every backend, for status pages.
    pub fn describe(&self) -> Vec<(&'static str, &'static str)> {
        self.0.iter().map(|b| (b.name(), b.encoding())).collect()
    }
}

/// Runs library code, turning a panic into an error so that a bad model or input fails one
/// request instead of the node.
pub fn catch_panic<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(BackendError::Runtime(format!(
            "{what} failed inside the backend: {message}"
        )))
    })
}
