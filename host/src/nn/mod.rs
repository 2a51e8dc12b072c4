//! wasi-nn for components: the node's model registry, the backends behind it, and the host
//! side of the `wasi:nn` interfaces (the version wasmtime 48 vendors, see wit/deps/nn.wit).
//!
//! Models registered with `tensorlet model add` are loaded once per node and shared by every
//! instance through `load-by-name`; a guest may also `load` a small model from bytes. Every
//! `compute` runs on tokio's blocking pool so that inference never stalls the reactor.

pub mod backend;
mod host;
mod registry;

pub use registry::{ModelError, ModelRecord, ModelRegistry, ModelStatus, Upload};
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

/// Per-request wasi-nn state: what this instance may reach.
pub struct NnCtx {
    models: Arc<ModelRegistry>,
    max_guest_model_bytes: u64,
    /// Models this app declared; `load-by-name` refuses the rest.
    allowed: Vec<String>,
}

impl NnCtx {
    /// State for one instance, sharing the node's loaded models.
    pub fn new(
        models: Arc<ModelRegistry>,
        max_guest_model_bytes: u64,
        allowed: Vec<String>,
    ) -> Self {
        Self {
            models,
            max_guest_model_bytes,
            allowed,
        }
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
