//! ONNX Runtime through `ort` (=2.0.0-rc.10, load-dynamic): the library is found at start-up
//! ([`library`](super::library)) and checked before `ort` touches it, because `ort` panics on a
//! missing or too-old library. Without it the backend is reported unavailable, with the reason.
//!
//! `ort`'s `Session::run` takes `&mut self`, so a graph holds one session per compute slot of
//! the node (each with the node's inference threads) and a context takes a free one: as many
//! computes run at once as the node allows, without a graph-wide lock.

use super::library::LibrarySearch;
use super::{
    decode, encode, match_inputs, Backend, BackendError, ExecutionTarget, Graph, NamedTensor,
    StatelessModel, Tensor, TensorType,
};
use crate::config::NnConfig;
use crate::nn::Encoding;
use ort::execution_providers::{CUDAExecutionProvider, ExecutionProvider};
use ort::session::{Session, SessionInputValue};
use ort::tensor::TensorElementType;
use ort::value::{DynValue, ValueType};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};

/// ONNX models on ONNX Runtime. The library is found and started on first use (a node that
/// never uses it starts without paying for it).
pub struct OnnxRuntimeBackend {
    /// `[nn] onnxruntime_library`.
    configured: Option<std::path::PathBuf>,
    threads: usize,
    sessions_per_graph: usize,
}

/// `ort` binds one library per process: the first successful or failed start-up is kept.
static RUNTIME: OnceLock<Result<String, String>> = OnceLock::new();

fn start_runtime(path: &Path) -> Result<String, String> {
    let version = library_version(path)?;
    let minor: u32 = version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if minor < ort::MINOR_VERSION {
        return Err(format!(
            "{} is ONNX Runtime {version}; this build needs 1.{} or newer",
            path.display(),
            ort::MINOR_VERSION
        ));
    }
    let committed = std::panic::catch_unwind(|| {
        ort::init_from(path.to_string_lossy())
            .with_name("tensorlet")
            .with_telemetry(false)
            .commit()
    });
    match committed {
        Ok(Ok(_)) => Ok(version),
        Ok(Err(error)) => Err(format!("ONNX Runtime did not start: {error}")),
        Err(_) => Err(format!("ONNX Runtime at {} did not start", path.display())),
    }
}

/// Opens the library and reads its version, without going through `ort` (which panics).
fn library_version(path: &Path) -> Result<String, String> {
    // SAFETY: loading ONNX Runtime runs its initialisers, which have no preconditions; the
    // symbol is ONNX Runtime's documented entry point with this signature, and the returned
    // version string is static in the library, which is leaked (kept loaded) for `ort`.
    unsafe {
        let library = libloading::Library::new(path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        let api_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            library
                .get(b"OrtGetApiBase")
                .map_err(|e| format!("{} is not ONNX Runtime: {e}", path.display()))?;
        let base = api_base();
        if base.is_null() {
            return Err(format!("{} returned no API", path.display()));
        }
        let version = std::ffi::CStr::from_ptr(((*base).GetVersionString)())
            .to_string_lossy()
            .into_owned();
        std::mem::forget(library);
        Ok(version)
    }
}

impl OnnxRuntimeBackend {
    /// ONNX Runtime as `[nn]` says, with `threads` per inference; it starts on first use.
    pub fn new(config: &NnConfig, threads: usize) -> Self {
        Self {
            configured: config.onnxruntime_library.clone(),
            threads,
            sessions_per_graph: config.compute_slots(),
        }
    }

    /// The library's version, or why it cannot be used: found and started on the first call.
    /// Blocking then (a file search, a Python look-up, loading the library).
    fn runtime(&self) -> &'static Result<String, String> {
        RUNTIME.get_or_init(|| {
            let runtime = LibrarySearch {
                config_key: "onnxruntime_library",
                configured: self.configured.as_deref(),
                env_var: "ORT_DYLIB_PATH",
                python_package: "onnxruntime",
                package_dir: "capi",
                file_prefix: "libonnxruntime.so",
            }
            .find()
            .and_then(|path| start_runtime(&path));
            if let Err(reason) = &runtime {
                tracing::info!(%reason, "the onnxruntime backend is unavailable");
            }
            runtime
        })
    }
}

fn tensor_type(ty: TensorElementType) -> Option<TensorType> {
    match ty {
        TensorElementType::Float32 => Some(TensorType::Fp32),
        TensorElementType::Float64 => Some(TensorType::Fp64),
        TensorElementType::Int32 => Some(TensorType::I32),
        TensorElementType::Int64 => Some(TensorType::I64),
        TensorElementType::Uint8 => Some(TensorType::U8),
        _ => None,
    }
}

struct OrtGraph {
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    inputs: Vec<(String, TensorType)>,
}

fn invalid_model(e: impl std::fmt::Display) -> BackendError {
    BackendError::InvalidModel(format!("not a model ONNX Runtime can load: {e}"))
}

impl Backend for OnnxRuntimeBackend {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn encoding(&self) -> Encoding {
        Encoding::Onnx
    }

    fn unavailable_reason(&self) -> Option<String> {
        self.runtime().as_ref().err().cloned()
    }

    fn library_version(&self) -> Option<String> {
        self.runtime().as_ref().ok().cloned()
    }

    fn target_unsupported(&self, target: ExecutionTarget) -> Option<String> {
        match target {
            ExecutionTarget::Cpu => None,
            ExecutionTarget::Gpu => match CUDAExecutionProvider::default().is_available() {
                Ok(true) => None,
                _ => Some(
                    "this ONNX Runtime build has no CUDA execution provider (onnxruntime-gpu has one)"
                        .to_string(),
                ),
            },
            ExecutionTarget::Tpu => Some("ONNX Runtime has no TPU execution provider here".into()),
        }
    }

    fn load(&self, bytes: &[u8], target: ExecutionTarget) -> Result<Arc<dyn Graph>, BackendError> {
        if let Some(reason) = self
            .unavailable_reason()
            .or_else(|| self.target_unsupported(target))
        {
            return Err(BackendError::Unsupported(format!("onnxruntime: {reason}")));
        }
        let session = || -> Result<Session, BackendError> {
            let mut builder = Session::builder()
                .and_then(|b| b.with_intra_threads(self.threads))
                .and_then(|b| b.with_inter_threads(1))
                // Idle workers spinning for work would take CPU from other apps and models.
                .and_then(|b| b.with_intra_op_spinning(false))
                .and_then(|b| b.with_inter_op_spinning(false))
                .map_err(|e| BackendError::Runtime(e.to_string()))?;
            if target == ExecutionTarget::Gpu {
                builder = builder
                    .with_execution_providers([CUDAExecutionProvider::default()
                        .build()
                        .error_on_failure()])
                    .map_err(|e| BackendError::Unsupported(format!("CUDA did not start: {e}")))?;
            }
            builder.commit_from_memory(bytes).map_err(invalid_model)
        };
        let first = super::catch_panic("loading the ONNX model", session)?;
        let mut inputs = Vec::new();
        for input in &first.inputs {
            let ty = match &input.input_type {
                ValueType::Tensor { ty, .. } => tensor_type(*ty),
                _ => None,
            }
            .ok_or_else(|| {
                BackendError::InvalidModel(format!(
                    "input {:?} is {:?}; wasi-nn tensors can be f32, f64, i32, i64 or u8",
                    input.name, input.input_type
                ))
            })?;
            inputs.push((input.name.clone(), ty));
        }
        let mut sessions = vec![Mutex::new(first)];
        for _ in 1..self.sessions_per_graph {
            sessions.push(Mutex::new(super::catch_panic(
                "loading the ONNX model",
                session,
            )?));
        }
        Ok(super::share(OrtGraph {
            sessions,
            next: AtomicUsize::new(0),
            inputs,
        }))
    }
}

fn ort_value(tensor: Tensor) -> Result<SessionInputValue<'static>, ort::Error> {
    let shape: Vec<i64> = tensor.dimensions.iter().map(|&d| d as i64).collect();
    let data = &tensor.data;
    Ok(match tensor.ty {
        TensorType::Fp32 => {
            ort::value::Tensor::from_array((shape, decode(data, f32::from_le_bytes)))?.into()
        }
        TensorType::Fp64 => {
            ort::value::Tensor::from_array((shape, decode(data, f64::from_le_bytes)))?.into()
        }
        TensorType::I32 => {
            ort::value::Tensor::from_array((shape, decode(data, i32::from_le_bytes)))?.into()
        }
        TensorType::I64 => {
            ort::value::Tensor::from_array((shape, decode(data, i64::from_le_bytes)))?.into()
        }
        TensorType::U8 => ort::value::Tensor::from_array((shape, data.clone()))?.into(),
        TensorType::Fp16 | TensorType::Bf16 => {
            unreachable!("match_inputs admits only the model's declared types")
        }
    })
}

fn host_tensor(name: &str, value: &DynValue) -> Result<Tensor, BackendError> {
    let runtime = |e: ort::Error| BackendError::Runtime(format!("output {name:?}: {e}"));
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => tensor_type(*ty),
        _ => None,
    }
    .ok_or_else(|| {
        BackendError::Unsupported(format!(
            "output {name:?} is {:?}, which wasi-nn cannot carry",
            value.dtype()
        ))
    })?;
    let (shape, data) = match ty {
        TensorType::Fp32 => value
            .try_extract_tensor::<f32>()
            .map(|(s, v)| (s.to_vec(), encode(v, f32::to_le_bytes))),
        TensorType::Fp64 => value
            .try_extract_tensor::<f64>()
            .map(|(s, v)| (s.to_vec(), encode(v, f64::to_le_bytes))),
        TensorType::I32 => value
            .try_extract_tensor::<i32>()
            .map(|(s, v)| (s.to_vec(), encode(v, i32::to_le_bytes))),
        TensorType::I64 => value
            .try_extract_tensor::<i64>()
            .map(|(s, v)| (s.to_vec(), encode(v, i64::to_le_bytes))),
        TensorType::U8 => value
            .try_extract_tensor::<u8>()
            .map(|(s, v)| (s.to_vec(), v.to_vec())),
        TensorType::Fp16 | TensorType::Bf16 => unreachable!("tensor_type maps to neither"),
    }
    .map_err(runtime)?;
    Ok(Tensor {
        dimensions: shape.iter().map(|&d| d as u32).collect(),
        ty,
        data,
    })
}

impl StatelessModel for OrtGraph {
    fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        let inputs = match_inputs(inputs, &self.inputs)?;
        let mut values: Vec<(String, SessionInputValue<'static>)> = Vec::new();
        for (name, tensor) in inputs {
            let value = ort_value(tensor)
                .map_err(|e| BackendError::InvalidArgument(format!("input {name:?}: {e}")))?;
            values.push((name, value));
        }
        super::catch_panic("running the ONNX model", || {
            let mut session = super::take_slot(&self.sessions, &self.next);
            let outputs = session
                .run(values)
                .map_err(|e| BackendError::Runtime(e.to_string()))?;
            outputs
                .iter()
                .map(|(name, value)| Ok((name.to_string(), host_tensor(name, &value)?)))
                .collect()
        })
    }
}
