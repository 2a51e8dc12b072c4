//! GGUF language models on llama.cpp (encoding `ggml`), following the generation convention
//! documented in `wit/README.md`: the first `compute` of a context takes a `prompt` (or chat
//! `messages`) and JSON `options` and returns the first chunk of text; each further `compute`
//! with no inputs returns the next chunk, until `finish_reason` is set.
//!
//! The weights are loaded once per model (`Arc<LlamaModel>`); every execution context has its
//! own llama.cpp context (its own KV cache), so generations run side by side with no lock
//! around the model. Models are registered by file (`tensorlet model add`); a guest cannot
//! pass LLM weights through its memory.

use super::{
    Backend, BackendError, ExecutionContext, ExecutionTarget, Graph, NamedTensor, Tensor,
    TensorType,
};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use serde::Deserialize;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

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

/// llama.cpp may adjust a model while creating a context from it: creations are serialised
/// (generations themselves are not).
static CONTEXT_CREATION: Mutex<()> = Mutex::new(());

/// Loads GGUF models with llama.cpp.
pub struct LlamaCppBackend {
    /// Threads each generation decodes with.
    pub threads: u32,
    /// Largest context window a generation gets (capped by the model's training context).
    pub max_context_tokens: u32,
}

impl Backend for LlamaCppBackend {
    fn name(&self) -> &'static str {
        "llama.cpp"
    }

    fn encoding(&self) -> &'static str {
        "ggml"
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
        let context_tokens = model
            .n_ctx_train()
            .clamp(256, self.max_context_tokens.max(256));
        Ok(Arc::new(LlamaGraph {
            model: Arc::new(model),
            threads: self.threads.max(1) as i32,
            context_tokens,
        }))
    }
}

struct LlamaGraph {
    model: Arc<LlamaModel>,
    threads: i32,
    context_tokens: u32,
}

impl Graph for LlamaGraph {
    fn init_execution_context(&self) -> Result<Box<dyn ExecutionContext>, BackendError> {
        Ok(Box::new(LlamaExecution {
            generation: None,
            model: self.model.clone(),
            threads: self.threads,
            context_tokens: self.context_tokens,
        }))
    }
}

/// One guest context: at most one generation at a time.
struct LlamaExecution {
    // Declared before `model`: a generation borrows the model and must be dropped first.
    generation: Option<Generation>,
    model: Arc<LlamaModel>,
    threads: i32,
    context_tokens: u32,
}

/// Generation settings (the JSON `options` tensor).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Options {
    max_tokens: u32,
    temperature: f32,
    top_p: f32,
    top_k: i32,
    repeat_penalty: f32,
    seed: Option<u32>,
    stop: Vec<String>,
    /// Tokens per `compute` call: 1 streams token by token; a large value returns everything
    /// at once.
    chunk_tokens: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            repeat_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            chunk_tokens: 1,
        }
    }
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

struct Generation {
    // Declared first: dropped before anything it borrows.
    context: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    sampler: LlamaSampler,
    position: i32,
    prompt_tokens: usize,
    generated: u32,
    options: Options,
    /// Bytes of a character split across tokens.
    partial_utf8: Vec<u8>,
    /// All text generated so far, and how much of it was handed out.
    text: String,
    emitted: usize,
    finish_reason: Option<&'static str>,
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
    fn start(&mut self, inputs: Vec<NamedTensor>) -> Result<(), BackendError> {
        let (mut prompt, mut messages, mut options) = (None, None, Options::default());
        for (name, tensor) in &inputs {
            match name.as_str() {
                "prompt" => prompt = Some(utf8(tensor, "prompt")?),
                "messages" => {
                    let json = utf8(tensor, "messages")?;
                    messages = Some(
                        serde_json::from_str::<Vec<Message>>(&json)
                            .map_err(|e| BackendError::InvalidArgument(format!("`messages` must be a JSON list of {{role, content}}: {e}")))?,
                    );
                }
                "options" => {
                    options = serde_json::from_str(&utf8(tensor, "options")?)
                        .map_err(|e| BackendError::InvalidArgument(format!("invalid `options`: {e}")))?;
                }
                other => {
                    return Err(BackendError::InvalidArgument(format!(
                        "unknown input {other:?}: a generation takes `prompt` or `messages`, and `options`"
                    )))
                }
            }
        }
        let (text, parse_special) = match (prompt, messages) {
            (Some(prompt), None) => (prompt, false),
            (None, Some(messages)) => (self.apply_chat_template(&messages)?, true),
            _ => {
                return Err(BackendError::InvalidArgument(
                    "pass exactly one of `prompt` and `messages`".into(),
                ))
            }
        };
        if !(1..self.context_tokens).contains(&options.max_tokens) {
            return Err(BackendError::InvalidArgument(format!(
                "max_tokens must be between 1 and {}, not {}",
                self.context_tokens - 1,
                options.max_tokens
            )));
        }
        if options.chunk_tokens == 0 {
            return Err(BackendError::InvalidArgument(
                "chunk_tokens must be at least 1".into(),
            ));
        }
        let tokens = self
            .model
            .vocab()
            .tokenize(text.as_bytes(), true, parse_special);
        if tokens.is_empty() {
            return Err(BackendError::InvalidArgument("the prompt is empty".into()));
        }
        if tokens.len() >= self.context_tokens as usize {
            return Err(BackendError::InvalidArgument(format!(
                "the prompt is {} tokens but the context window holds {}",
                tokens.len(),
                self.context_tokens
            )));
        }

        // Drop any previous generation before making a new context.
        self.generation = None;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.context_tokens))
            .with_n_batch(512)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let context = {
            let _serialised = CONTEXT_CREATION.lock().unwrap_or_else(|p| p.into_inner());
            self.model
                .new_context(llama_backend()?, params)
                .map_err(|e| {
                    BackendError::Runtime(format!("llama.cpp could not make a context: {e}"))
                })?
        };
        // SAFETY: the context borrows the model behind `self.model`, an `Arc` whose target
        // never moves and which `LlamaExecution` keeps alive for as long as the generation
        // (the `generation` field is declared, and so dropped, before `model`).
        let context: LlamaContext<'static> = unsafe { std::mem::transmute(context) };

        let mut generation = Generation {
            context,
            batch: LlamaBatch::new(512, 1),
            sampler: sampler(&self.model, &options),
            position: 0,
            prompt_tokens: tokens.len(),
            generated: 0,
            options,
            partial_utf8: Vec::new(),
            text: String::new(),
            emitted: 0,
            finish_reason: None,
        };
        let chunks = tokens.chunks(512).count();
        for (index, chunk) in tokens.chunks(512).enumerate() {
            generation.batch.clear();
            for (offset, token) in chunk.iter().enumerate() {
                let wants_logits = index + 1 == chunks && offset + 1 == chunk.len();
                generation
                    .batch
                    .add(*token, generation.position, &[0], wants_logits)
                    .map_err(|e| BackendError::Runtime(e.to_string()))?;
                generation.position += 1;
            }
            generation
                .context
                .decode(&mut generation.batch)
                .map_err(|e| BackendError::Runtime(format!("decoding the prompt failed: {e}")))?;
        }
        self.generation = Some(generation);
        Ok(())
    }

    fn apply_chat_template(&self, messages: &[Message]) -> Result<String, BackendError> {
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BackendError::InvalidArgument(format!("invalid message: {e}")))?;
        let builtin_chatml =
            || LlamaChatTemplate::new("chatml").map_err(|e| BackendError::Runtime(e.to_string()));
        let template = self
            .model
            .chat_template(None)
            .or_else(|_| builtin_chatml())?;
        match self.model.apply_chat_template(&template, &chat, true) {
            Ok(prompt) => Ok(prompt),
            // llama.cpp recognises templates by pattern; an unknown one falls back to ChatML.
            Err(_) => self
                .model
                .apply_chat_template(&builtin_chatml()?, &chat, true)
                .map_err(|e| {
                    BackendError::Runtime(format!("applying the chat template failed: {e}"))
                }),
        }
    }
}

fn sampler(model: &LlamaModel, options: &Options) -> LlamaSampler {
    let mut chain = Vec::new();
    if options.repeat_penalty != 1.0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            64,
            options.repeat_penalty,
            0.0,
            0.0,
        ));
    }
    if options.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if options.top_k > 0 {
            chain.push(LlamaSampler::top_k(options.top_k));
        }
        chain.push(LlamaSampler::top_p(options.top_p.clamp(0.0, 1.0), 1));
        chain.push(LlamaSampler::temp(options.temperature));
        chain.push(LlamaSampler::dist(
            options.seed.unwrap_or_else(rand::random),
        ));
    }
    LlamaSampler::chain_simple(chain)
}

impl Generation {
    /// Generates up to `chunk_tokens` tokens and returns the text that became final.
    fn next_chunk(&mut self, model: &LlamaModel) -> Result<String, BackendError> {
        let vocab = model.vocab();
        for _ in 0..self.options.chunk_tokens {
            if self.finish_reason.is_some() {
                break;
            }
            let token = self
                .sampler
                .sample(&self.context, self.batch.n_tokens() - 1);
            if vocab.is_eog(token) {
                self.finish_reason = Some("stop");
                break;
            }
            self.generated += 1;
            vocab.token_to_piece_into(token, &mut self.partial_utf8, false, None);
            self.take_complete_utf8();
            if let Some(stop) = self
                .options
                .stop
                .iter()
                .filter_map(|s| self.text.find(s.as_str()))
                .min()
            {
                self.text.truncate(stop);
                self.finish_reason = Some("stop");
                break;
            }
            if self.generated >= self.options.max_tokens
                || self.position as u32 + 1 >= self.context.n_ctx()
            {
                self.finish_reason = Some("length");
                break;
            }
            self.batch.clear();
            self.batch
                .add(token, self.position, &[0], true)
                .map_err(|e| BackendError::Runtime(e.to_string()))?;
            self.position += 1;
            self.context
                .decode(&mut self.batch)
                .map_err(|e| BackendError::Runtime(format!("decoding failed: {e}")))?;
        }
        // Hold back what could still turn out to be the start of a stop sequence.
        let mut end = self.text.len();
        if self.finish_reason.is_none() {
            let hold = self
                .options
                .stop
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0);
            end = end.saturating_sub(hold).max(self.emitted);
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
        }
        let chunk = self.text[self.emitted..end].to_string();
        self.emitted = end;
        Ok(chunk)
    }

    /// Moves the complete characters of `partial_utf8` into `text`.
    fn take_complete_utf8(&mut self) {
        let valid = match std::str::from_utf8(&self.partial_utf8) {
            Ok(text) => text.len(),
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            // Invalid bytes (not merely incomplete) are replaced rather than kept forever.
            Err(_) => {
                let lossy = String::from_utf8_lossy(&self.partial_utf8).into_owned();
                self.text.push_str(&lossy);
                self.partial_utf8.clear();
                return;
            }
        };
        let complete: Vec<u8> = self.partial_utf8.drain(..valid).collect();
        self.text
            .push_str(std::str::from_utf8(&complete).expect("checked above"));
    }
}

impl ExecutionContext for LlamaExecution {
    fn compute(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        if !inputs.is_empty() {
            self.start(inputs)?;
        }
        let model = self.model.clone();
        let Some(generation) = self.generation.as_mut() else {
            return Err(BackendError::InvalidArgument(
                "no generation in progress: the first compute takes `prompt` or `messages`".into(),
            ));
        };
        let text =
            if generation.finish_reason.is_some() && generation.emitted == generation.text.len() {
                String::new()
            } else {
                generation.next_chunk(&model)?
            };
        let usage = serde_json::json!({
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.generated,
        });
        Ok(vec![
            ("text".to_string(), text_tensor(&text)),
            (
                "finish_reason".to_string(),
                text_tensor(generation.finish_reason.unwrap_or("")),
            ),
            ("usage".to_string(), text_tensor(&usage.to_string())),
        ])
    }
}
