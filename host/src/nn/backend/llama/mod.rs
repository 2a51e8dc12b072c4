//! GGUF language models on llama.cpp (encoding `ggml`), following the generation convention
//! documented in `wit/README.md`: the first `compute` of a context takes a `prompt` (or chat
//! `messages`) and JSON `options` and returns the first chunk of text; each further `compute`
//! with no inputs returns the next chunk, until `finish_reason` is set.
//!
//! The weights are loaded once per model. Generations run in *lanes*: a lane is one llama.cpp
//! context whose KV cache holds several sequences, one per generation, and each of its steps
//! decodes the next token of all of them in one batch. A model has one lane per compute slot,
//! so generations first spread over the cores and then share batches. There is no decoder
//! thread: a generation that needs its next token while no step runs on its lane takes a
//! compute slot and runs the step for everyone (its neighbours find their tokens ready), and
//! sequences may run a few tokens ahead of their readers so that a step is not missed by one
//! who is busy sending. A prompt goes in by 512-token pieces, a turn each, so a long prompt
//! holds up its lane's other generations only a piece at a time. Models are registered by file
//! (`tensorlet model add`); a guest cannot pass LLM weights through its memory.
//!
//! This module is the backend, its graphs and their execution contexts; `lane` runs the lanes,
//! `sequence` is one generation on a lane, `context` holds a lane's llama.cpp context,
//! `options` reads a generation's options, `text` turns its tokens into text, `logprobs` says
//! how likely each token was and `tools` renders a chat offered tools with the model's own
//! Jinja template.

mod context;
mod lane;
mod logprobs;
mod options;
mod sequence;
mod text;
mod tools;

use lane::{SequenceSlot, SharedModel};
use options::Options;
use sequence::{Chunk, Sequence};

use super::{
    Backend, BackendError, Cancellation, ComputeSlots, ExecutionContext, ExecutionTarget,
    GenerationActivity, Graph, NamedTensor, Tensor, TensorType,
};
use crate::nn::Encoding;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use serde::Deserialize;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

/// llama.cpp's process-wide state, initialised once, logs silenced. Everything in the process
/// that uses llama.cpp must go through this one.
pub fn llama_backend() -> Result<&'static LlamaBackend, BackendError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            backend.void_logs();
            Ok(backend)
        })
        .as_ref()
        .map_err(|e| BackendError::Runtime(format!("llama.cpp failed to initialise: {e}")))
}

/// Locks `mutex` whether or not it is poisoned: a panic in one generation does not stop the
/// others.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Loads GGUF models with llama.cpp.
pub struct LlamaCppBackend {
    /// Threads each lane decodes with.
    pub threads: u32,
    /// Largest context window a generation gets (capped by the model's training context).
    pub max_context_tokens: u32,
    /// Lanes per model: llama.cpp contexts that decode side by side (one per compute slot).
    pub lanes: usize,
    /// Sequences (generations) one lane decodes together in one batch.
    pub batch_sequences: u32,
    /// A lane holds one of these while it decodes.
    pub compute_slots: ComputeSlots,
}

impl Backend for LlamaCppBackend {
    fn name(&self) -> &'static str {
        "llama.cpp"
    }

    fn encoding(&self) -> Encoding {
        Encoding::Ggml
    }

    fn load(
        &self,
        _bytes: &[u8],
        _target: ExecutionTarget,
    ) -> Result<Arc<dyn Graph>, BackendError> {
        Err(BackendError::Unsupported(
            "GGUF models are not loaded from guest memory: register the file with `tensorlet model add NAME FILE --encoding ggml` and use load-by-name".into(),
        ))
    }

    fn load_file(
        &self,
        path: &Path,
        target: ExecutionTarget,
    ) -> Result<Arc<dyn Graph>, BackendError> {
        if target != ExecutionTarget::Cpu {
            return Err(BackendError::Unsupported(format!(
                "this node's llama.cpp is built for the CPU only; execution target {target:?} is not available"
            )));
        }
        let mut magic = [0u8; 4];
        std::io::Read::read_exact(
            &mut std::fs::File::open(path)
                .map_err(|e| BackendError::InvalidModel(e.to_string()))?,
            &mut magic,
        )
        .map_err(|_| {
            BackendError::InvalidModel("not a GGUF model: the file is too short".into())
        })?;
        if &magic != b"GGUF" {
            return Err(BackendError::InvalidModel(
                "not a GGUF model: the file does not start with GGUF".into(),
            ));
        }
        let backend = llama_backend()?;
        let model = super::catch_panic("loading the GGUF model", || {
            LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()).map_err(|e| {
                BackendError::InvalidModel(format!(
                    "not a valid GGUF model: llama.cpp could not load it ({e})"
                ))
            })
        })?;
        // llama.cpp gives each sequence of a context a multiple of 256 tokens.
        let context_tokens = model.n_ctx_train().min(self.max_context_tokens).max(256) / 256 * 256;
        let (lanes, batch_sequences) = (
            self.lanes.max(1),
            self.batch_sequences
                .clamp(1, crate::config::MAX_LLM_BATCH_SEQUENCES),
        );
        Ok(Arc::new(LlamaGraph(Arc::new(SharedModel::new(
            model,
            lanes,
            batch_sequences,
            context_tokens,
            self.threads.max(1) as i32,
            self.compute_slots.clone(),
        )))))
    }
}

struct LlamaGraph(Arc<SharedModel>);

impl Graph for LlamaGraph {
    fn init_execution_context(&self) -> Result<Box<dyn ExecutionContext>, BackendError> {
        Ok(Box::new(LlamaExecution {
            shared: self.0.clone(),
            slot: None,
            finished: None,
        }))
    }

    fn generation_activity(&self) -> Option<GenerationActivity> {
        Some(self.0.activity())
    }
}

/// One guest context: at most one generation at a time.
struct LlamaExecution {
    shared: Arc<SharedModel>,
    /// The running generation's sequence.
    slot: Option<SequenceSlot>,
    /// The last chunk of the generation that ended (its sequence already given back), which
    /// further `compute` calls repeat without text.
    finished: Option<Chunk>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn utf8(tensor: &Tensor, name: &str) -> Result<String, BackendError> {
    if tensor.ty != TensorType::U8 {
        return Err(BackendError::InvalidArgument(format!(
            "`{name}` must be a U8 tensor of UTF-8 bytes"
        )));
    }
    String::from_utf8(tensor.data.clone())
        .map_err(|_| BackendError::InvalidArgument(format!("`{name}` is not valid UTF-8")))
}

fn text_tensor(text: &str) -> Tensor {
    Tensor {
        dimensions: vec![text.len() as u32],
        ty: TensorType::U8,
        data: text.as_bytes().to_vec(),
    }
}

impl LlamaExecution {
    /// Parses a generation request, takes a sequence on a lane and decodes the prompt into it.
    fn start(
        &mut self,
        inputs: Vec<NamedTensor>,
        cancel: &Cancellation,
    ) -> Result<(), BackendError> {
        let shared = self.shared.clone();
        let (mut prompt, mut messages, mut options) = (None, None, Options::default());
        let mut tools = None;
        for (name, tensor) in &inputs {
            match name.as_str() {
                "prompt" => prompt = Some(utf8(tensor, "prompt")?),
                "messages" => messages = Some(utf8(tensor, "messages")?),
                "tools" => {
                    tools = Some(
                        serde_json::from_str::<Vec<serde_json::Value>>(&utf8(tensor, "tools")?)
                            .map_err(|e| BackendError::InvalidArgument(format!("`tools` must be a JSON list: {e}")))?,
                    );
                }
                "options" => {
                    options = serde_json::from_str(&utf8(tensor, "options")?)
                        .map_err(|e| BackendError::InvalidArgument(format!("invalid `options`: {e}")))?;
                }
                other => {
                    return Err(BackendError::InvalidArgument(format!(
                        "unknown input {other:?}: a generation takes `prompt` or `messages`, `tools` and `options`"
                    )))
                }
            }
        }
        let (text, parse_special) = match (prompt, messages, tools) {
            (Some(prompt), None, None) => (prompt, false),
            (None, Some(messages), None) => (apply_chat_template(shared.model(), &messages)?, true),
            (None, Some(messages), Some(tools)) => {
                (chat_with_tools(shared.model(), &messages, &tools)?, true)
            }
            _ => {
                return Err(BackendError::InvalidArgument(
                    "pass exactly one of `prompt` and `messages` (`tools` go with `messages`)"
                        .into(),
                ))
            }
        };
        if !(1..shared.context_tokens()).contains(&options.max_tokens) {
            return Err(BackendError::InvalidArgument(format!(
                "max_tokens must be between 1 and {}, not {}",
                shared.context_tokens() - 1,
                options.max_tokens
            )));
        }
        options.validate()?;
        if options.chunk_tokens == 0 {
            return Err(BackendError::InvalidArgument(
                "chunk_tokens must be at least 1".into(),
            ));
        }
        let tokens = shared
            .model()
            .vocab()
            .tokenize(text.as_bytes(), true, parse_special);
        if tokens.is_empty() {
            return Err(BackendError::InvalidArgument("the prompt is empty".into()));
        }
        if tokens.len() >= shared.context_tokens() as usize {
            return Err(BackendError::InvalidArgument(format!(
                "the prompt is {} tokens but the context window holds {}",
                tokens.len(),
                shared.context_tokens()
            )));
        }

        self.release();
        self.finished = None;
        let sequence = Sequence::new(shared.model(), options, tokens.len())?;
        self.slot = Some(shared.start_generation(sequence, &tokens, cancel)?);
        Ok(())
    }

    /// Gives this context's sequence back to its lane.
    fn release(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.shared.release(slot);
        }
    }

    /// The next chunk of the generation. Once it ends (or fails) its sequence goes back to the
    /// lane at once, so a guest that keeps its context does not hold a sequence.
    fn next_chunk(&mut self, cancel: &Cancellation) -> Result<Chunk, BackendError> {
        let Some(slot) = self.slot else {
            return match &self.finished {
                Some(last) => Ok(Chunk {
                    text: String::new(),
                    logprobs: last.logprobs.as_ref().map(|_| Vec::new()),
                    ..last.clone()
                }),
                None => Err(BackendError::InvalidArgument(
                    "no generation in progress: the first compute takes `prompt` or `messages`"
                        .into(),
                )),
            };
        };
        let chunk = self.shared.wait_for_chunk(slot, cancel);
        match &chunk {
            Ok(chunk) if chunk.finish_reason.is_none() => {}
            Ok(chunk) => {
                self.release();
                self.finished = Some(chunk.clone());
            }
            Err(_) => self.release(),
        }
        chunk
    }
}

/// The prompt for chat `messages` (JSON `[{role, content}]`), by the model's chat template
/// (ChatML if it has none, or one llama.cpp does not know).
fn apply_chat_template(model: &LlamaModel, messages: &str) -> Result<String, BackendError> {
    let messages: Vec<Message> = serde_json::from_str(messages).map_err(|e| {
        BackendError::InvalidArgument(format!(
            "`messages` must be a JSON list of {{role, content}}: {e}"
        ))
    })?;
    let chat = messages
        .iter()
        .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BackendError::InvalidArgument(format!("invalid message: {e}")))?;
    let builtin_chatml =
        || LlamaChatTemplate::new("chatml").map_err(|e| BackendError::Runtime(e.to_string()));
    let template = model.chat_template(None).or_else(|_| builtin_chatml())?;
    match model.apply_chat_template(&template, &chat, true) {
        Ok(prompt) => Ok(prompt),
        // llama.cpp recognises templates by pattern; an unknown one falls back to ChatML.
        Err(_) => model
            .apply_chat_template(&builtin_chatml()?, &chat, true)
            .map_err(|e| BackendError::Runtime(format!("applying the chat template failed: {e}"))),
    }
}

/// The prompt for chat `messages` offered `tools` (OpenAI's shapes: messages may carry
/// `tool_calls` and tool results), by the model's own Jinja template.
fn chat_with_tools(
    model: &LlamaModel,
    messages: &str,
    tools: &[serde_json::Value],
) -> Result<String, BackendError> {
    let messages: Vec<serde_json::Value> = serde_json::from_str(messages)
        .ok()
        .filter(|list: &Vec<serde_json::Value>| list.iter().all(|m| m["role"].is_string()))
        .ok_or_else(|| {
            BackendError::InvalidArgument(
                "`messages` must be a JSON list of objects, each with a `role`".into(),
            )
        })?;
    let template = model
        .chat_template(None)
        .ok()
        .and_then(|template| template.to_string().ok())
        .ok_or_else(|| {
            BackendError::InvalidArgument(
                "this model has no chat template, so it cannot be offered tools".into(),
            )
        })?;
    let vocab = model.vocab();
    let token_text =
        |token| String::from_utf8_lossy(&vocab.token_to_piece(token, true, None)).into_owned();
    let bos = token_text(vocab.bos());
    let prompt = tools::render(&template, &messages, tools, &bos, &token_text(vocab.eos()))?;
    // Tokenising adds the model's BOS itself: a template that writes it too would double it.
    Ok(match prompt.strip_prefix(bos.as_str()) {
        Some(rest) if vocab.should_add_bos() && !bos.is_empty() => rest.to_string(),
        _ => prompt,
    })
}

impl ExecutionContext for LlamaExecution {
    fn compute(
        &mut self,
        inputs: Vec<NamedTensor>,
        cancel: &Cancellation,
    ) -> Result<Vec<NamedTensor>, BackendError> {
        if !inputs.is_empty() {
            self.start(inputs, cancel)?;
        }
        let chunk = self.next_chunk(cancel)?;
        let usage = serde_json::json!({
            "prompt_tokens": chunk.prompt_tokens,
            "completion_tokens": chunk.generated,
        });
        let mut outputs = vec![
            ("text".to_string(), text_tensor(&chunk.text)),
            (
                "finish_reason".to_string(),
                text_tensor(chunk.finish_reason.unwrap_or("")),
            ),
            ("usage".to_string(), text_tensor(&usage.to_string())),
        ];
        if let Some(logprobs) = &chunk.logprobs {
            let logprobs = serde_json::to_string(logprobs)
                .map_err(|e| BackendError::Runtime(e.to_string()))?;
            outputs.push(("logprobs".to_string(), text_tensor(&logprobs)));
        }
        Ok(outputs)
    }

    fn takes_compute_slots_itself(&self) -> bool {
        true
    }
}

impl Drop for LlamaExecution {
    /// Contexts are dropped with their instance, on the async reactor: the release, which may
    /// wait for the lane's current step, goes to the blocking pool.
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let shared = self.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || shared.release(slot))),
            Err(_) => shared.release(slot),
        }
    }
}
