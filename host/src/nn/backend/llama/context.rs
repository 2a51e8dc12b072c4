//! A lane's llama.cpp context. llama-cpp-2 ties a context to its model by a borrow, but a lane
//! keeps its context for as long as the model stays loaded, in a structure that also holds the
//! model, which a borrow cannot express. [`LaneContext`] holds the context together with a
//! reference count on its model, so the model cannot go first; it is the one place where the
//! context's lifetime is asserted with `unsafe`.

use super::{llama_backend, lock, BackendError};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::DecodeError;
use std::sync::{Arc, Mutex};

/// llama.cpp may adjust a model while creating a context from it: creations are serialised
/// (generations themselves are not).
static CONTEXT_CREATION: Mutex<()> = Mutex::new(());

/// A llama.cpp context and the model it was made from.
pub(super) struct LaneContext {
    // Fields drop in the order they are declared: the context goes before this `Arc`, so the
    // model it borrows outlives it.
    context: LlamaContext<'static>,
    _model: Arc<LlamaModel>,
}

impl LaneContext {
    /// Makes a context of `model` with `params`.
    pub(super) fn new(
        model: Arc<LlamaModel>,
        params: LlamaContextParams,
    ) -> Result<Self, BackendError> {
        let context = {
            let _serialised = lock(&CONTEXT_CREATION);
            model.new_context(llama_backend()?, params).map_err(|e| {
                BackendError::Runtime(format!("llama.cpp could not make a context: {e}"))
            })?
        };
        // SAFETY: the context borrows the model inside the `Arc`, which stays where it is on
        // the heap however the `Arc` moves. The `Arc` is kept beside the context and dropped
        // after it (see the field order), and the context is only lent out for as long as
        // `self` is borrowed, so the model outlives every use of the context.
        let context =
            unsafe { std::mem::transmute::<LlamaContext<'_>, LlamaContext<'static>>(context) };
        Ok(Self {
            context,
            _model: model,
        })
    }

    /// The context, to sample from the logits of its last decode.
    pub(super) fn get(&self) -> &LlamaContext<'_> {
        &self.context
    }

    /// Decodes `batch`, keeping its tokens in their sequences' KV caches.
    pub(super) fn decode(&mut self, batch: &mut LlamaBatch) -> Result<(), DecodeError> {
        self.context.decode(batch)
    }

    /// Clears sequence `id` from the KV cache.
    pub(super) fn clear_sequence(&mut self, id: u32) {
        self.context.clear_kv_cache_seq(Some(id), None, None).ok();
    }
}
