//! OpenVINO, runtime-linked: the C library is found at start-up
//! ([`library`](super::library); the pip wheel ships it as `libopenvino_c.so.<ver>`, a name
//! OpenVINO's own finder does not look for) and loaded by path. Without it the backend is
//! reported unavailable, with the reason. Inference precision is pinned to f32 so that results
//! match the other backends on CPUs with bf16 units.
//!
//! A compiled model hands out infer requests one at a time (`&mut`), so a graph creates one
//! request per compute slot of the node up front; a context takes a free one.

use super::library::LibrarySearch;
use super::{
    match_inputs, Backend, BackendError, ExecutionTarget, Graph, NamedTensor, StatelessModel,
    Tensor, TensorType,
};
use crate::config::NnConfig;
use crate::nn::Encoding;
use openvino::{CompiledModel, Core, DeviceType, ElementType, InferRequest, RwPropertyKey, Shape};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};

/// ONNX models on OpenVINO. The library is found and started on first use (a node that never
/// uses it starts without paying for it).
pub struct OpenVinoBackend {
    config: NnConfig,
    threads: usize,
    runtime: OnceLock<Runtime>,
    requests_per_graph: usize,
}

/// OpenVINO once started.
struct Runtime {
    /// The core, or why it cannot be used.
    core: Result<Mutex<Core>, String>,
    /// OpenVINO's build number, once loaded.
    version: Option<String>,
    has_gpu: bool,
}

fn start_core(config: &NnConfig, threads: usize) -> Result<Core, String> {
    let path = LibrarySearch {
        config_key: "openvino_library",
        configured: config.openvino_library.as_deref(),
        env_var: "OPENVINO_LIBRARY",
        python_package: "openvino",
        package_dir: "libs",
        file_prefix: "libopenvino_c.so",
    }
    .find()?;
    openvino_sys::library::load_from(path.clone())
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    let mut core = Core::new().map_err(|e| format!("OpenVINO did not start: {e}"))?;
    let threads = threads.to_string();
    for (key, value) in [
        (RwPropertyKey::HintInferencePrecision, "f32"),
        (RwPropertyKey::InferenceNumThreads, threads.as_str()),
    ] {
        core.set_property(&DeviceType::CPU, &key, value)
            .map_err(|e| format!("OpenVINO refused a CPU setting: {e}"))?;
    }
    Ok(core)
}

impl OpenVinoBackend {
    /// OpenVINO as `[nn]` says, with `threads` per inference; it starts on first use.
    pub fn new(config: &NnConfig, threads: usize) -> Self {
        Self {
            config: config.clone(),
            threads,
            runtime: OnceLock::new(),
            requests_per_graph: config.compute_slots(),
        }
    }

    /// OpenVINO, started on the first call (blocking then: a file search, a Python look-up,
    /// loading the library and its plugins).
    fn runtime(&self) -> &Runtime {
        self.runtime.get_or_init(|| {
            let core = start_core(&self.config, self.threads);
            if let Err(reason) = &core {
                tracing::info!(%reason, "the openvino backend is unavailable");
            }
            let has_gpu = core.as_ref().is_ok_and(|core| {
                core.available_devices()
                    .is_ok_and(|devices| devices.iter().any(|d| d.as_ref().starts_with("GPU")))
            });
            // The library is loaded once the core exists, so asking for its version cannot
            // panic.
            let version = core.is_ok().then(|| openvino::version().build_number);
            Runtime {
                core: core.map(Mutex::new),
                version,
                has_gpu,
            }
        })
    }
}

fn tensor_type(ty: ElementType) -> Option<TensorType> {
    match ty {
        ElementType::F32 => Some(TensorType::Fp32),
        ElementType::F64 => Some(TensorType::Fp64),
        ElementType::I32 => Some(TensorType::I32),
        ElementType::I64 => Some(TensorType::I64),
        ElementType::U8 => Some(TensorType::U8),
        _ => None,
    }
}

fn element_type(ty: TensorType) -> ElementType {
    match ty {
        TensorType::Fp32 => ElementType::F32,
        TensorType::Fp64 => ElementType::F64,
        TensorType::I32 => ElementType::I32,
        TensorType::I64 => ElementType::I64,
        TensorType::U8 => ElementType::U8,
        TensorType::Fp16 => ElementType::F16,
        TensorType::Bf16 => ElementType::Bf16,
    }
}

struct OpenVinoGraph {
    /// Kept alive for its requests.
    _compiled: Mutex<CompiledModel>,
    requests: Vec<Mutex<InferRequest>>,
    next: AtomicUsize,
    inputs: Vec<(String, TensorType)>,
    outputs: Vec<String>,
}

fn invalid_model(e: impl std::fmt::Display) -> BackendError {
    BackendError::InvalidModel(format!("not a model OpenVINO can load: {e}"))
}

fn runtime(e: impl std::fmt::Display) -> BackendError {
    BackendError::Runtime(e.to_string())
}

impl Backend for OpenVinoBackend {
    fn name(&self) -> &'static str {
        "openvino"
    }

    fn encoding(&self) -> Encoding {
        Encoding::Onnx
    }

    fn unavailable_reason(&self) -> Option<String> {
        self.runtime().core.as_ref().err().cloned()
    }

    fn library_version(&self) -> Option<String> {
        self.runtime().version.clone()
    }

    fn target_unsupported(&self, target: ExecutionTarget) -> Option<String> {
        match target {
            ExecutionTarget::Cpu => None,
            ExecutionTarget::Gpu if self.runtime().has_gpu => None,
            ExecutionTarget::Gpu => Some("OpenVINO finds no (Intel) GPU device here".into()),
            ExecutionTarget::Tpu => Some("OpenVINO has no TPU device".into()),
        }
    }

    fn load(&self, bytes: &[u8], target: ExecutionTarget) -> Result<Arc<dyn Graph>, BackendError> {
        let core = match &self.runtime().core {
            Ok(core) => core,
            Err(reason) => return Err(BackendError::Unsupported(format!("openvino: {reason}"))),
        };
        if let Some(reason) = self.target_unsupported(target) {
            return Err(BackendError::Unsupported(format!("openvino: {reason}")));
        }
        let device = if target == ExecutionTarget::Gpu {
            DeviceType::GPU
        } else {
            DeviceType::CPU
        };
        super::catch_panic("loading the ONNX model", || {
            let mut core = core
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let model = core
                .read_model_from_buffer(bytes, None)
                .map_err(invalid_model)?;
            let mut inputs = Vec::new();
            for index in 0..model.get_inputs_len().map_err(invalid_model)? {
                let node = model.get_input_by_index(index).map_err(invalid_model)?;
                let name = node.get_name().map_err(invalid_model)?;
                let ty = node.get_element_type().map_err(invalid_model)?;
                let ty = tensor_type(ty).ok_or_else(|| {
                    BackendError::InvalidModel(format!(
                        "input {name:?} is {ty:?}; wasi-nn tensors can be f32, f64, i32, i64 or u8"
                    ))
                })?;
                inputs.push((name, ty));
            }
            let mut outputs = Vec::new();
            for index in 0..model.get_outputs_len().map_err(invalid_model)? {
                let node = model.get_output_by_index(index).map_err(invalid_model)?;
                outputs.push(node.get_name().map_err(invalid_model)?);
            }
            let mut compiled = core.compile_model(&model, device).map_err(invalid_model)?;
            let requests = (0..self.requests_per_graph)
                .map(|_| compiled.create_infer_request().map(Mutex::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(runtime)?;
            Ok(super::share(OpenVinoGraph {
                _compiled: Mutex::new(compiled),
                requests,
                next: AtomicUsize::new(0),
                inputs,
                outputs,
            }))
        })
    }
}

impl OpenVinoGraph {
    fn infer(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        let mut request = super::take_slot(&self.requests, &self.next);
        for (name, tensor) in inputs {
            let dimensions: Vec<i64> = tensor.dimensions.iter().map(|&d| d as i64).collect();
            let shape = Shape::new(&dimensions).map_err(runtime)?;
            let mut value =
                openvino::Tensor::new(element_type(tensor.ty), &shape).map_err(runtime)?;
            value
                .get_raw_data_mut()
                .map_err(runtime)?
                .copy_from_slice(&tensor.data);
            request
                .set_tensor(&name, &value)
                .map_err(|e| BackendError::InvalidArgument(format!("input {name:?}: {e}")))?;
        }
        request.infer().map_err(runtime)?;
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for (index, name) in self.outputs.iter().enumerate() {
            let value = request.get_output_tensor_by_index(index).map_err(runtime)?;
            let element = value.get_element_type().map_err(runtime)?;
            let ty = tensor_type(element).ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "output {name:?} is {element:?}, which wasi-nn cannot carry"
                ))
            })?;
            let shape = value.get_shape().map_err(runtime)?;
            let data = if value.get_byte_size().map_err(runtime)? == 0 {
                Vec::new()
            } else {
                value.get_raw_data().map_err(runtime)?.to_vec()
            };
            outputs.push((
                name.clone(),
                Tensor {
                    dimensions: shape.get_dimensions().iter().map(|&d| d as u32).collect(),
                    ty,
                    data,
                },
            ));
        }
        Ok(outputs)
    }
}

impl StatelessModel for OpenVinoGraph {
    fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        let inputs = match_inputs(inputs, &self.inputs)?;
        super::catch_panic("running the ONNX model", || self.infer(inputs))
    }
}
