//! The seam between wasi-nn and the inference libraries: a [`Backend`] loads model bytes into
//! a [`Graph`] shared by every instance; a graph makes one [`ExecutionContext`] per guest
//! context, and contexts of one graph run concurrently (no graph-wide lock).
//!
//! Backends are ours rather than wasmtime-wasi-nn's so that guest input is validated before
//! it reaches a library (its ONNX backend panics on non-f32 input) and so that `compute` runs
//! on the blocking pool instead of the async reactor.
//!
//! An encoding may have several backends (onnx: tract, ONNX Runtime, OpenVINO). [`Backends::choose`]
//! picks one per model from the operator's choice, the node's defaults, each backend's
//! availability (a runtime library may be missing) and the execution target.

pub mod batching;
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(any(feature = "onnxruntime", feature = "openvino"))]
mod library;
#[cfg(feature = "llama")]
pub mod llama;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
#[cfg(feature = "openvino")]
pub mod openvino;
pub mod tract;

pub use super::bindings::wasi::nn::graph::ExecutionTarget;
pub use super::bindings::wasi::nn::tensor::TensorType;
use super::Encoding;
use crate::config::{GpuFallback, NnConfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The lower-case name of an execution target, as operators write it.
pub fn target_name(target: ExecutionTarget) -> &'static str {
    match target {
        ExecutionTarget::Cpu => "cpu",
        ExecutionTarget::Gpu => "gpu",
        ExecutionTarget::Tpu => "tpu",
    }
}

/// Reads `cpu`, `gpu` or `tpu`.
pub fn parse_target(name: &str) -> Option<ExecutionTarget> {
    match name {
        "cpu" => Some(ExecutionTarget::Cpu),
        "gpu" => Some(ExecutionTarget::Gpu),
        "tpu" => Some(ExecutionTarget::Tpu),
        _ => None,
    }
}

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
    /// The encoding of the models it loads.
    fn encoding(&self) -> Encoding;
    /// Why this backend cannot be used on this node (its runtime library is missing), if so.
    fn unavailable_reason(&self) -> Option<String> {
        None
    }
    /// The version of a runtime-linked library, once loaded.
    fn library_version(&self) -> Option<String> {
        None
    }
    /// Why this backend cannot run models on `target` here, if it cannot.
    fn target_unsupported(&self, target: ExecutionTarget) -> Option<String> {
        (target != ExecutionTarget::Cpu).then(|| "runs on the CPU only".to_string())
    }
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

    /// For models that generate text: their lanes and batches, as operators see them.
    fn generation_activity(&self) -> Option<GenerationActivity> {
        None
    }

    /// Whether each compute is independent of every other (no state between computes), so
    /// that computes may be joined into batches ([`batching`]).
    fn computes_independently(&self) -> bool {
        false
    }

    /// For models that batch their computes: their policy and batch sizes.
    fn batching_activity(&self) -> Option<batching::BatchingActivity> {
        None
    }
}

/// A loaded model whose contexts keep no state between computes (every backend but
/// llama.cpp, whose generations do): all contexts share the one model and run it
/// concurrently. [`share`] makes it a [`Graph`].
pub trait StatelessModel: Send + Sync + 'static {
    /// Runs the model on `inputs`. Blocking; the caller has checked for cancellation.
    fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError>;
}

/// The one way a backend shares a stateless model: every context holds the same `Arc`.
pub fn share(model: impl StatelessModel) -> Arc<dyn Graph> {
    Arc::new(SharedGraph(Arc::new(model)))
}

struct SharedGraph<M>(Arc<M>);

impl<M: StatelessModel> Graph for SharedGraph<M> {
    fn init_execution_context(&self) -> Result<Box<dyn ExecutionContext>, BackendError> {
        Ok(Box::new(SharedGraph(self.0.clone())))
    }

    fn computes_independently(&self) -> bool {
        true
    }
}

impl<M: StatelessModel> ExecutionContext for SharedGraph<M> {
    fn compute(
        &mut self,
        inputs: Vec<NamedTensor>,
        _cancel: &Cancellation,
    ) -> Result<Vec<NamedTensor>, BackendError> {
        self.0.run(inputs)
    }
}

/// How an LLM is serving its generations (`/v1/admin/models`; `tensorlet models` shows the
/// running and waiting ones).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenerationActivity {
    /// llama.cpp contexts that decode side by side, and the sequences each decodes together.
    pub lanes: usize,
    pub sequences_per_lane: u32,
    /// Context window of each generation, in tokens.
    pub context_tokens: u32,
    /// Generations running now, and those waiting for a free sequence.
    pub running: u32,
    pub waiting: u32,
    /// llama.cpp forward passes that decoded generated tokens since the model was loaded, and
    /// those tokens: their ratio is the mean batch size.
    pub decode_passes: u64,
    pub decoded_tokens: u64,
}

/// One guest's use of a graph. `compute` blocks: callers run it on tokio's blocking pool.
pub trait ExecutionContext: Send {
    /// Runs the model on `inputs` (by input name) and returns every output by name. A
    /// backend that computes step by step (an LLM generation) stops at the next step once
    /// `cancel` is set; the others run to the end, since the caller checks `cancel` first.
    fn compute(
        &mut self,
        inputs: Vec<NamedTensor>,
        cancel: &Cancellation,
    ) -> Result<Vec<NamedTensor>, BackendError>;

    /// Whether `compute` holds a [`ComputeSlots`] slot only while it really computes, taking
    /// it itself. Otherwise the caller holds one for the whole call. (llama.cpp generations
    /// wait for each other's batched steps, which must not tie up slots.)
    fn takes_compute_slots_itself(&self) -> bool {
        false
    }
}

/// The threads inference runs on: tokio blocking threads of their own, at a lower CPU priority
/// than the threads that serve requests and flush the store (`[nn] inference_sched_idle`,
/// `inference_nice`). With every core decoding, a request to another app then still gets a
/// core at once instead of waiting for a scheduler time slice. Threads a library starts from
/// them (llama.cpp's, ONNX Runtime's) inherit the priority.
#[derive(Clone)]
pub struct InferenceThreads(Arc<InferenceRuntime>);

struct InferenceRuntime(Option<tokio::runtime::Runtime>);

impl Drop for InferenceRuntime {
    fn drop(&mut self) {
        // A runtime may be dropped on the reactor only this way.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl InferenceThreads {
    /// Blocking threads at `priority` below the node's.
    pub fn new(priority: ThreadPriority) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tensorlet-inference")
            .on_thread_start(move || lower_this_threads_priority(priority))
            .build()?;
        Ok(Self(Arc::new(InferenceRuntime(Some(runtime)))))
    }

    /// Runs blocking inference work `f` on these threads.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> tokio::task::JoinHandle<R> {
        self.0
             .0
            .as_ref()
            .expect("the runtime is taken only when dropped")
            .spawn_blocking(f)
    }

    /// Runs `f` on these threads and waits for it, from blocking code.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        drop(self.spawn(move || {
            let _ = sender.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        }));
        match receiver.recv() {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("the inference threads stopped"),
        }
    }
}

/// How inference threads run beside the node's own (`[nn] inference_nice`,
/// `inference_sched_idle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPriority {
    /// Nice steps below the node's priority.
    pub nice: u32,
    /// Run under `SCHED_IDLE`: any other runnable thread of the node preempts them at once.
    pub sched_idle: bool,
}

impl ThreadPriority {
    /// The priority `[nn]` gives inference threads.
    pub fn of(config: &NnConfig) -> Self {
        Self {
            nice: config.inference_nice,
            sched_idle: config.inference_sched_idle,
        }
    }
}

/// Lowers the calling thread's priority as `priority` says (on Linux, priority is per thread;
/// threads it starts inherit it).
pub fn lower_this_threads_priority(priority: ThreadPriority) {
    if priority.sched_idle {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain system call on the calling thread (pid 0) with a valid parameter;
        // a failure leaves the policy as it was.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot run an inference thread under SCHED_IDLE"
            );
        }
    }
    let steps = priority.nice;
    if steps == 0 {
        return;
    }
    // SAFETY: plain system calls on the calling thread (who = 0); errors are reported by
    // return value, and a failure leaves the priority as it was.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        let target = (current + steps as i32).min(19);
        if libc::setpriority(libc::PRIO_PROCESS, 0, target) != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot lower the priority of an inference thread"
            );
        }
    }
}

/// Set when the request a computation serves has gone away (its client left, its app timed
/// out or trapped): work that has not started is skipped, and a generation stops within one
/// decode step.
#[derive(Clone, Debug, Default)]
pub struct Cancellation(Arc<AtomicBool>);

impl Cancellation {
    /// Marks the computation as no longer wanted.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// `Err` once cancelled, for `?` between steps.
    pub fn check(&self) -> Result<(), BackendError> {
        if self.0.load(Ordering::Relaxed) {
            Err(BackendError::Runtime(
                "cancelled: the request this computation served went away".into(),
            ))
        } else {
            Ok(())
        }
    }
}

/// Cancels its [`Cancellation`] when dropped, unless [`CancelOnDrop::disarm`]ed first: held by
/// the future that awaits a computation, so that dropping the future (the request went away)
/// tells the computation.
pub struct CancelOnDrop(Option<Cancellation>);

impl CancelOnDrop {
    pub fn new(cancel: Cancellation) -> Self {
        Self(Some(cancel))
    }

    /// The computation ended while its request was still there: nothing to cancel.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            cancel.cancel();
        }
    }
}

/// Counts computations running on the blocking pool (one per `compute` call in progress).
#[derive(Clone, Default)]
pub struct RunningComputes(Arc<AtomicUsize>);

impl RunningComputes {
    /// Counts one computation until the returned guard is dropped.
    pub fn enter(&self) -> RunningCompute {
        self.0.fetch_add(1, Ordering::Relaxed);
        RunningCompute(self.0.clone())
    }

    /// Computations running now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One computation counted by [`RunningComputes`].
pub struct RunningCompute(Arc<AtomicUsize>);

impl Drop for RunningCompute {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The node's compute slots: an inference computes only while it holds one, so that no more
/// run at once than the cores hold at `[nn] threads` each
/// ([`crate::config::NnConfig::compute_slots`]). Waiters get slots in turn.
#[derive(Clone)]
pub struct ComputeSlots(Arc<tokio::sync::Semaphore>);

impl ComputeSlots {
    pub fn new(slots: usize) -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(slots.max(1))))
    }

    /// Waits for a slot.
    pub async fn acquire(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.0
            .clone()
            .acquire_owned()
            .await
            .expect("the compute slots are never closed")
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// Waits for a slot from a thread of tokio's blocking pool.
    pub fn acquire_blocking(&self) -> tokio::sync::OwnedSemaphorePermit {
        tokio::runtime::Handle::current().block_on(self.acquire())
    }
}

/// What an operator sees of a backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendInfo {
    pub name: &'static str,
    pub encoding: Encoding,
    pub available: bool,
    /// The runtime library's version, for runtime-linked backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why it is unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The execution targets it can use here.
    pub targets: Vec<&'static str>,
}

/// The backend picked for a model, and where it runs.
#[derive(Clone)]
pub struct Choice {
    pub backend: Arc<dyn Backend>,
    pub target: ExecutionTarget,
    /// Set when the model runs on the CPU although another target was asked for.
    pub fallback: Option<String>,
}

/// Why no backend could be picked.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    #[error(
        "this node was built without a backend for {encoding} models (encodings: {available})"
    )]
    UnknownEncoding {
        encoding: Encoding,
        available: String,
    },
    #[error("no backend {backend:?} loads {encoding} models here (backends for {encoding}: {available})")]
    UnknownBackend {
        backend: String,
        encoding: Encoding,
        available: String,
    },
    #[error("{0}")]
    Unavailable(String),
}

/// The backends this node has, and its rules for picking one.
#[derive(Clone)]
pub struct Backends {
    all: Vec<Arc<dyn Backend>>,
    gpu_fallback: GpuFallback,
    default_backends: BTreeMap<Encoding, String>,
    compute_slots: ComputeSlots,
    running: RunningComputes,
    threads: InferenceThreads,
}

impl Backends {
    /// The backends built into this binary, configured from the node's `[nn]` section.
    /// Backends whose runtime library is missing are kept, and report why they are unavailable.
    /// Which ones there are depends on the cargo features the binary was built with (all by
    /// default; tract always). Refuses `[nn] default_backends` entries that name no encoding
    /// or no backend of it.
    pub fn builtin(config: &NnConfig) -> Result<Self, String> {
        let compute_slots = ComputeSlots::new(config.compute_slots());
        // tract alone (`--no-default-features`) takes no thread count.
        #[cfg_attr(
            not(any(
                feature = "onnxruntime",
                feature = "openvino",
                feature = "llama",
                feature = "candle"
            )),
            allow(unused_variables)
        )]
        let threads = config.inference_threads();
        let all: Vec<Arc<dyn Backend>> = vec![
            Arc::new(tract::TractBackend),
            #[cfg(feature = "onnxruntime")]
            Arc::new(onnxruntime::OnnxRuntimeBackend::new(
                config,
                threads as usize,
            )),
            #[cfg(feature = "openvino")]
            Arc::new(openvino::OpenVinoBackend::new(config, threads as usize)),
            #[cfg(feature = "llama")]
            Arc::new(llama::LlamaCppBackend {
                threads,
                max_context_tokens: config.max_context_tokens,
                lanes: config.compute_slots(),
                batch_sequences: config.llm_batch_sequences,
                compute_slots: compute_slots.clone(),
            }),
            #[cfg(feature = "candle")]
            Arc::new(candle::CandleBertBackend::new(
                threads as usize,
                ThreadPriority::of(config),
            )),
        ];
        Self::with_compute_slots(all, config, compute_slots)
    }

    /// Backends in order of preference, with the node's selection rules.
    pub fn new(all: Vec<Arc<dyn Backend>>, config: &NnConfig) -> Result<Self, String> {
        Self::with_compute_slots(all, config, ComputeSlots::new(config.compute_slots()))
    }

    fn with_compute_slots(
        all: Vec<Arc<dyn Backend>>,
        config: &NnConfig,
        compute_slots: ComputeSlots,
    ) -> Result<Self, String> {
        let mut default_backends = BTreeMap::new();
        for (key, name) in &config.default_backends {
            let encoding: Encoding = key
                .parse()
                .map_err(|e| format!("nn.default_backends.{key}: {e}"))?;
            let of_encoding: Vec<_> = all
                .iter()
                .filter(|b| b.encoding() == encoding)
                .cloned()
                .collect();
            if !of_encoding.iter().any(|b| b.name() == name) {
                return Err(format!(
                    "nn.default_backends.{key} = {name:?}: no such backend for {encoding} models in this build (backends: {})",
                    names(&of_encoding)
                ));
            }
            default_backends.insert(encoding, name.clone());
        }
        let threads = InferenceThreads::new(ThreadPriority::of(config))
            .map_err(|e| format!("cannot start the inference threads: {e}"))?;
        Ok(Self {
            all,
            gpu_fallback: config.gpu_fallback,
            default_backends,
            compute_slots,
            running: RunningComputes::default(),
            threads,
        })
    }

    /// Computations running on the blocking pool now (`/v1/admin/status`).
    pub fn running_computes(&self) -> &RunningComputes {
        &self.running
    }

    /// The threads loads and computations run on.
    pub fn threads(&self) -> &InferenceThreads {
        &self.threads
    }

    /// The slots every computation on this node's models takes turns for.
    pub fn compute_slots(&self) -> &ComputeSlots {
        &self.compute_slots
    }

    /// Picks the backend for a model of `encoding` on `target`: the one named, else the node's
    /// default for the encoding, else the first that is available and can use the target.
    /// A target none can use falls back to the CPU only when `[nn] gpu_fallback = "cpu"`.
    pub fn choose(
        &self,
        encoding: Encoding,
        backend: Option<&str>,
        target: ExecutionTarget,
    ) -> Result<Choice, ChoiceError> {
        let mut candidates: Vec<_> = self
            .all
            .iter()
            .filter(|b| b.encoding() == encoding)
            .cloned()
            .collect();
        if candidates.is_empty() {
            let mut encodings: Vec<_> = self.all.iter().map(|b| b.encoding().name()).collect();
            encodings.dedup();
            return Err(ChoiceError::UnknownEncoding {
                encoding,
                available: encodings.join(", "),
            });
        }
        if let Some(name) = backend {
            let available = names(&candidates);
            candidates.retain(|b| b.name() == name);
            if candidates.is_empty() {
                return Err(ChoiceError::UnknownBackend {
                    backend: name.to_string(),
                    encoding,
                    available,
                });
            }
        } else if let Some(default) = self.default_backends.get(&encoding) {
            candidates.sort_by_key(|b| b.name() != default);
        }
        let usable_on = |target: ExecutionTarget| {
            let mut reasons = Vec::new();
            for candidate in &candidates {
                let reason = candidate
                    .unavailable_reason()
                    .or_else(|| candidate.target_unsupported(target));
                match reason {
                    None => return Ok(candidate.clone()),
                    Some(reason) => reasons.push(format!("{}: {reason}", candidate.name())),
                }
            }
            Err(reasons.join("; "))
        };
        match usable_on(target) {
            Ok(backend) => Ok(Choice {
                backend,
                target,
                fallback: None,
            }),
            Err(reasons)
                if target != ExecutionTarget::Cpu && self.gpu_fallback == GpuFallback::Cpu =>
            {
                let backend = usable_on(ExecutionTarget::Cpu).map_err(|cpu_reasons| {
                    ChoiceError::Unavailable(format!(
                        "no backend can run {encoding} models on this node: {cpu_reasons}"
                    ))
                })?;
                let fallback = format!(
                    "{} requested, but {reasons}; running on the CPU ([nn] gpu_fallback = \"cpu\")",
                    target_name(target)
                );
                tracing::warn!(backend = backend.name(), %fallback, "execution target fell back");
                Ok(Choice {
                    backend,
                    target: ExecutionTarget::Cpu,
                    fallback: Some(fallback),
                })
            }
            Err(reasons) => {
                let hint = if target == ExecutionTarget::Cpu {
                    ""
                } else {
                    " (set [nn] gpu_fallback = \"cpu\" to run such models on the CPU instead)"
                };
                Err(ChoiceError::Unavailable(format!(
                    "no backend can run {encoding} models on {} on this node: {reasons}{hint}",
                    target_name(target)
                )))
            }
        }
    }

    /// The backend named `name` for `encoding`, as recorded for a registered model.
    pub fn named(&self, encoding: Encoding, name: &str) -> Option<Arc<dyn Backend>> {
        self.all
            .iter()
            .find(|b| b.encoding() == encoding && b.name() == name)
            .cloned()
    }

    /// Every backend, for status pages.
    pub fn describe(&self) -> Vec<BackendInfo> {
        self.all
            .iter()
            .map(|b| {
                let reason = b.unavailable_reason();
                BackendInfo {
                    name: b.name(),
                    encoding: b.encoding(),
                    available: reason.is_none(),
                    version: b.library_version(),
                    targets: [
                        ExecutionTarget::Cpu,
                        ExecutionTarget::Gpu,
                        ExecutionTarget::Tpu,
                    ]
                    .into_iter()
                    .filter(|t| reason.is_none() && b.target_unsupported(*t).is_none())
                    .map(target_name)
                    .collect(),
                    reason,
                }
            })
            .collect()
    }
}

fn names(backends: &[Arc<dyn Backend>]) -> String {
    backends
        .iter()
        .map(|b| b.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pairs the guest's inputs with a model's declared inputs `(name, type)`: the empty name
/// stands for the only input; unknown, missing or mistyped inputs and tensors whose bytes do
/// not match their dimensions are refused before they reach the library.
pub fn match_inputs(
    inputs: Vec<NamedTensor>,
    declared: &[(String, TensorType)],
) -> Result<Vec<NamedTensor>, BackendError> {
    let mut matched: Vec<NamedTensor> = Vec::with_capacity(declared.len());
    for (name, tensor) in inputs {
        let name = if name.is_empty() && declared.len() == 1 {
            declared[0].0.clone()
        } else {
            name
        };
        let Some((_, expected)) = declared.iter().find(|(n, _)| *n == name) else {
            return Err(BackendError::InvalidArgument(format!(
                "unknown input {name:?}; the model's inputs are {:?}",
                declared.iter().map(|(n, _)| n).collect::<Vec<_>>()
            )));
        };
        if tensor.ty != *expected {
            return Err(BackendError::InvalidArgument(format!(
                "input {name:?} must be {expected:?}, not {:?}",
                tensor.ty
            )));
        }
        tensor.validate()?;
        if tensor.dimensions.contains(&0) {
            return Err(BackendError::InvalidArgument(format!(
                "input {name:?} has an empty dimension {:?}",
                tensor.dimensions
            )));
        }
        matched.retain(|(n, _)| *n != name);
        matched.push((name, tensor));
    }
    if let Some((missing, _)) = declared
        .iter()
        .find(|(n, _)| !matched.iter().any(|(m, _)| m == n))
    {
        return Err(BackendError::InvalidArgument(format!(
            "missing input {missing:?}"
        )));
    }
    Ok(matched)
}

/// One of `slots` (sessions, infer requests) for a computation: a free one, or — all busy —
/// the next in turn, waited for. `next` spreads the turns.
pub fn take_slot<'a, T>(
    slots: &'a [std::sync::Mutex<T>],
    next: &std::sync::atomic::AtomicUsize,
) -> std::sync::MutexGuard<'a, T> {
    let start = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (0..slots.len())
        .find_map(|i| slots[(start + i) % slots.len()].try_lock().ok())
        .unwrap_or_else(|| {
            slots[start % slots.len()]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
}

/// Little-endian element bytes of `tensor` decoded into values.
pub fn decode<T, const N: usize>(data: &[u8], from_le: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|chunk| from_le(chunk.try_into().expect("chunks are N bytes")))
        .collect()
}

/// Values encoded as the little-endian bytes of a host tensor.
pub fn encode<T: Copy, const N: usize>(values: &[T], to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|v| to_le(*v)).collect()
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

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn tensor_type() -> impl Strategy<Value = TensorType> {
        prop_oneof![
            Just(TensorType::Fp16),
            Just(TensorType::Fp32),
            Just(TensorType::Fp64),
            Just(TensorType::Bf16),
            Just(TensorType::U8),
            Just(TensorType::I32),
            Just(TensorType::I64),
        ]
    }

    proptest! {
        /// Any shape and any byte count a guest sends is judged without panicking, and
        /// accepted exactly when the bytes hold the shape's elements.
        #[test]
        fn tensor_shapes_are_checked_exactly(
            dimensions in prop::collection::vec(any::<u32>(), 0..6),
            ty in tensor_type(),
            len in 0usize..4096,
        ) {
            let tensor = Tensor { dimensions: dimensions.clone(), ty, data: vec![0; len] };
            let expected = dimensions
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
                .and_then(|n| n.checked_mul(element_size(ty)));
            prop_assert_eq!(tensor.validate().is_ok(), expected == Some(len));
        }

        /// Model bytes from a guest never panic the pure-Rust backend: garbage is an error.
        #[test]
        fn garbage_models_are_refused_by_tract(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let loaded = catch_panic("load", || tract::TractBackend.load(&bytes, ExecutionTarget::Cpu));
            prop_assert!(loaded.is_err());
        }
    }
}

#[cfg(test)]
mod inference_threads {
    use super::*;

    fn priority() -> i32 {
        // SAFETY: a plain system call about the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// The calling thread's scheduling policy.
    fn policy() -> i32 {
        // SAFETY: a plain system call about the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[tokio::test]
    async fn inference_runs_below_the_request_path_and_panics_stay_its_own() {
        let threads = InferenceThreads::new(ThreadPriority {
            nice: 5,
            sched_idle: false,
        })
        .unwrap();
        let here = priority();
        let there = threads.spawn(priority).await.unwrap();
        assert_eq!(there, (here + 5).min(19));
        assert_eq!(threads.spawn(policy).await.unwrap(), policy());
        assert_eq!(priority(), here, "the caller's thread was lowered");
        let blocking = threads.clone();
        let run = tokio::task::spawn_blocking(move || blocking.run(priority)).await;
        assert_eq!(run.unwrap(), (here + 5).min(19));
        let panicked = tokio::task::spawn_blocking(move || threads.run(|| panic!("a bad model")));
        assert!(panicked.await.is_err());
    }

    #[tokio::test]
    async fn idle_scheduling_leaves_the_callers_thread_as_it_was() {
        let threads = InferenceThreads::new(ThreadPriority::of(&NnConfig::default())).unwrap();
        assert_eq!(threads.spawn(policy).await.unwrap(), libc::SCHED_IDLE);
        assert_ne!(
            policy(),
            libc::SCHED_IDLE,
            "the caller's thread was changed"
        );
    }
}

#[cfg(all(test, feature = "openvino"))]
mod tests {
    use super::*;

    /// tract, and OpenVINO pointed at a library that does not exist.
    fn backends(gpu_fallback: GpuFallback, default_onnx: Option<&str>) -> Backends {
        let config = NnConfig {
            gpu_fallback,
            openvino_library: Some("/nonexistent/libopenvino_c.so".into()),
            default_backends: default_onnx
                .map(|b| [("onnx".to_string(), b.to_string())].into())
                .unwrap_or_default(),
            ..NnConfig::default()
        };
        Backends::new(
            vec![
                Arc::new(openvino::OpenVinoBackend::new(&config, 1)),
                Arc::new(tract::TractBackend),
            ],
            &config,
        )
        .unwrap()
    }

    fn unavailable(result: Result<Choice, ChoiceError>) -> String {
        match result {
            Err(ChoiceError::Unavailable(reason)) => reason,
            Err(other) => panic!("wrong error: {other}"),
            Ok(choice) => panic!("chose {}", choice.backend.name()),
        }
    }

    #[test]
    fn an_unavailable_backend_is_skipped_or_refused_with_its_reason() {
        let backends = backends(GpuFallback::Fail, Some("openvino"));
        let info = backends.describe();
        assert!(!info[0].available && info[0].targets.is_empty());
        assert!(info[0].reason.as_deref().unwrap().contains("/nonexistent"));
        let choice = backends
            .choose(Encoding::Onnx, None, ExecutionTarget::Cpu)
            .unwrap();
        assert_eq!(choice.backend.name(), "tract");
        let reason =
            unavailable(backends.choose(Encoding::Onnx, Some("openvino"), ExecutionTarget::Cpu));
        assert!(
            reason.contains("openvino: [nn] openvino_library names /nonexistent"),
            "{reason}"
        );
        assert!(matches!(
            backends.choose(Encoding::Onnx, Some("tensorrt"), ExecutionTarget::Cpu),
            Err(ChoiceError::UnknownBackend { .. })
        ));
        assert!(matches!(
            backends.choose(Encoding::Ggml, None, ExecutionTarget::Cpu),
            Err(ChoiceError::UnknownEncoding { .. })
        ));
    }

    #[test]
    fn default_backends_that_name_nothing_here_are_refused() {
        let config = |encoding: &str, backend: &str| NnConfig {
            default_backends: [(encoding.to_string(), backend.to_string())].into(),
            ..NnConfig::default()
        };
        let tract_only = || vec![Arc::new(tract::TractBackend) as Arc<dyn Backend>];
        assert!(Backends::new(tract_only(), &config("onnx", "tract")).is_ok());
        let error = Backends::new(tract_only(), &config("onx", "tract"))
            .err()
            .unwrap();
        assert!(
            error.contains("nn.default_backends.onx: unknown encoding"),
            "{error}"
        );
        let error = Backends::new(tract_only(), &config("onnx", "onnxruntime"))
            .err()
            .unwrap();
        assert!(
            error.contains("no such backend for onnx models in this build (backends: tract)"),
            "{error}"
        );
    }

    #[test]
    fn gpu_falls_back_to_the_cpu_only_when_configured_and_says_so() {
        let reason = unavailable(backends(GpuFallback::Fail, None).choose(
            Encoding::Onnx,
            None,
            ExecutionTarget::Gpu,
        ));
        assert!(
            reason.contains("tract: runs on the CPU only") && reason.contains("gpu_fallback"),
            "{reason}"
        );
        let choice = backends(GpuFallback::Cpu, None)
            .choose(Encoding::Onnx, None, ExecutionTarget::Gpu)
            .unwrap();
        assert_eq!(choice.target, ExecutionTarget::Cpu);
        assert_eq!(choice.backend.name(), "tract");
        assert!(choice.fallback.unwrap().starts_with("gpu requested"));
    }

    #[test]
    fn inputs_are_matched_to_the_declared_ones_before_a_library_sees_them() {
        let declared = vec![("x".to_string(), TensorType::Fp32)];
        let tensor = |ty, bytes: usize| Tensor {
            dimensions: vec![1, 2],
            ty,
            data: vec![0; bytes],
        };
        let matched = match_inputs(
            vec![(String::new(), tensor(TensorType::Fp32, 8))],
            &declared,
        )
        .unwrap();
        assert_eq!(matched[0].0, "x");
        for bad in [
            vec![("x".to_string(), tensor(TensorType::I64, 16))],
            vec![("x".to_string(), tensor(TensorType::Fp32, 7))],
            vec![("y".to_string(), tensor(TensorType::Fp32, 8))],
            vec![],
        ] {
            assert!(matches!(
                match_inputs(bad, &declared),
                Err(BackendError::InvalidArgument(_))
            ));
        }
    }
}
