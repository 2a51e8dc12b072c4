//! wasi-nn for components: the node's model registry, the backends behind it, and the host
//! side of the `wasi:nn` interfaces (the version wasmtime 48 vendors, see wit/deps/nn.wit).
//!
//! Models registered with `tensorlet model add` are loaded once per node and shared by every
//! instance through `load-by-name`; a guest may also `load` a small model from bytes. Every
//! `compute` runs on tokio's blocking pool so that inference never stalls the reactor.

pub mod backend;
mod encoding;
mod host;
mod registry;

use crate::telemetry::AppMeter;
pub use encoding::Encoding;
pub use registry::{ModelError, ModelRecord, ModelRegistry, ModelStatus, Upload};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wasmtime::component::{HasData, Linker, ResourceTable};

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasi:nn/ml",
        imports: {
            "wasi:nn/graph.load": async | trappable,
            "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
            default: trappable,
        },
        with: {
            "wasi:nn/graph.graph": super::host::GraphResource,
            "wasi:nn/tensor.tensor": super::backend::Tensor,
            "wasi:nn/inference.graph-execution-context": super::host::ContextResource,
            "wasi:nn/errors.error": super::host::NnError,
        },
        require_store_data_send: true,
    });
}

/// What one app's instances may do with wasi-nn.
#[derive(Debug, Clone)]
pub struct NnGrant {
    /// The app's tenant: it may load node-wide models and its tenant's own.
    pub tenant: String,
    /// Models the app declared; `load-by-name` refuses the rest.
    pub models: Vec<String>,
    /// Largest model the guest may pass as bytes to `load`.
    pub max_guest_model_bytes: u64,
    /// Host memory an instance may hold through wasi-nn at once: its tensors and the models it
    /// loaded from bytes. The app's memory limit: a guest cannot make the host hold more on its
    /// behalf than it may hold itself.
    pub max_host_bytes: u64,
    /// Whether `load` may hand guest bytes to a native library (ONNX Runtime, OpenVINO).
    /// Without it they go only to the pure-Rust backend (tract).
    pub native_guest_models: bool,
}

/// Per-request wasi-nn state: what this instance may reach and what it holds.
pub struct NnCtx {
    models: Arc<ModelRegistry>,
    grant: NnGrant,
    /// Bytes of tensors and guest-loaded models this instance holds on the host.
    held_bytes: u64,
    /// Set when the instance is stopped for holding too much, so that it is reported as a
    /// memory-limit failure.
    memory_hit: Arc<AtomicBool>,
    /// Where the instance's inference time and tokens are counted.
    meter: AppMeter,
}

impl NnCtx {
    /// State for one instance, sharing the node's loaded models.
    pub fn new(
        models: Arc<ModelRegistry>,
        grant: NnGrant,
        memory_hit: Arc<AtomicBool>,
        meter: AppMeter,
    ) -> Self {
        Self {
            models,
            grant,
            held_bytes: 0,
            memory_hit,
            meter,
        }
    }

    /// Counts `bytes` more held for this instance; a trap (reported as the app's memory
    /// limit) if that passes its budget.
    fn hold(&mut self, bytes: usize) -> wasmtime::Result<()> {
        let held = self.held_bytes.saturating_add(bytes as u64);
        if held > self.grant.max_host_bytes {
            self.memory_hit.store(true, Ordering::Relaxed);
            wasmtime::bail!(
                "wasi-nn tensors and models would hold {held} bytes on the host for this instance, past its memory limit of {} bytes",
                self.grant.max_host_bytes
            );
        }
        self.held_bytes = held;
        Ok(())
    }

    /// Counts `bytes` as no longer held.
    fn release(&mut self, bytes: usize) {
        self.held_bytes = self.held_bytes.saturating_sub(bytes as u64);
    }
}

/// The view of a store that the wasi-nn host functions work on.
pub struct NnView<'a> {
    pub ctx: &'a mut NnCtx,
    pub table: &'a mut ResourceTable,
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Adds the `wasi:nn` interfaces to a linker.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    bindings::Ml::add_to_linker::<T, HasNn>(linker, view)
}
