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
//! holds up its lane's other generations only a piece at a time. Models are registered by file (`tensorlet model add`); a guest cannot
//! pass LLM weights through its memory.

mod options;
mod text;

use options::Options;
use text::GeneratedText;

use super::{
    Backend, BackendError, Cancellation, ComputeSlots, ExecutionContext, ExecutionTarget,
    GenerationActivity, Graph, NamedTensor, Tensor, TensorType,
};
use crate::nn::Encoding;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::Deserialize;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

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

/// How often a generation waiting for a free sequence looks whether its request went away.
const CANCEL_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// Tokens a sequence may run ahead of its reader (more when its reader asks for bigger chunks):
/// a step decodes every sequence of a lane that is not this far ahead, whether or not its
/// reader is waiting at that moment.
const LOOKAHEAD_TOKENS: u32 = 8;

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
        Ok(Arc::new(LlamaGraph(Arc::new(SharedModel {
            lanes: (0..lanes)
                .map(|_| Lane {
                    state: Mutex::new(LaneState {
                        context: None,
                        batch: LlamaBatch::new(512.max(batch_sequences as usize), 1),
                        sequences: (0..batch_sequences).map(|_| None).collect(),
                        next_ticket: 0,
                        serving: 0,
                        failed: false,
                    }),
                    turn_over: Condvar::new(),
                })
                .collect(),
            occupancy: Mutex::new(vec![0; lanes]),
            sequence_freed: Condvar::new(),
            waiting: AtomicU32::new(0),
            decode_passes: AtomicU64::new(0),
            decoded_tokens: AtomicU64::new(0),
            model,
            threads: self.threads.max(1) as i32,
            context_tokens,
            batch_sequences,
            compute_slots: self.compute_slots.clone(),
        }))))
    }
}

struct LlamaGraph(Arc<SharedModel>);

/// A loaded model and its lanes. The weights are loaded once; each lane is one llama.cpp
/// context (made when a generation first needs it, kept while the model stays loaded) whose KV
/// cache holds `batch_sequences` sequences of `context_tokens` each. A lane decodes the next
/// token of all its sequences in one batch; lanes decode side by side.
struct SharedModel {
    // Declared before `model`: lane contexts borrow the model and must be dropped first.
    lanes: Vec<Lane>,
    /// Sequences in use per lane; a new generation waits while every lane is full.
    occupancy: Mutex<Vec<u32>>,
    sequence_freed: Condvar,
    /// Generations waiting for a sequence.
    waiting: AtomicU32,
    /// llama.cpp forward passes of generation steps, and the tokens they decoded.
    decode_passes: AtomicU64,
    decoded_tokens: AtomicU64,
    model: LlamaModel,
    threads: i32,
    context_tokens: u32,
    batch_sequences: u32,
    compute_slots: ComputeSlots,
}

struct Lane {
    state: Mutex<LaneState>,
    /// Signalled when a step (or a prompt's decoding) ends.
    turn_over: Condvar,
}

struct LaneState {
    // Declared first: dropped before anything the context could refer to.
    context: Option<LlamaContext<'static>>,
    batch: LlamaBatch<'static>,
    /// Indexed by llama.cpp sequence id.
    sequences: Vec<Option<Sequence>>,
    /// Turns on this lane's context: the next ticket to hand out, and the one whose turn it
    /// is (a turn decodes one step or one piece of a prompt; the others wait for it).
    next_ticket: u64,
    serving: u64,
    /// llama.cpp failed to decode on this context; it is replaced once the lane is empty.
    failed: bool,
}

/// Where a generation lives: its lane and its sequence id there.
#[derive(Clone, Copy)]
struct SequenceSlot {
    lane: usize,
    sequence: usize,
}

impl Graph for LlamaGraph {
    fn init_execution_context(&self) -> Result<Box<dyn ExecutionContext>, BackendError> {
        Ok(Box::new(LlamaExecution {
            shared: self.0.clone(),
            slot: None,
            finished: None,
        }))
    }

    fn generation_activity(&self) -> Option<GenerationActivity> {
        let shared = &self.0;
        Some(GenerationActivity {
            lanes: shared.lanes.len(),
            sequences_per_lane: shared.batch_sequences,
            context_tokens: shared.context_tokens,
            running: lock(&shared.occupancy).iter().sum(),
            waiting: shared.waiting.load(Ordering::Relaxed),
            decode_passes: shared.decode_passes.load(Ordering::Relaxed),
            decoded_tokens: shared.decoded_tokens.load(Ordering::Relaxed),
        })
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

/// One generation's state on its lane.
struct Sequence {
    sampler: LlamaSampler,
    /// The sampled token that the next step decodes; `None` once finished.
    pending: Option<LlamaToken>,
    /// Tokens in this sequence's KV cache.
    position: i32,
    prompt_tokens: usize,
    generated: u32,
    /// Tokens generated since the reader last took a chunk.
    unread: u32,
    options: Options,
    /// The text generated so far, and how much of it was handed out.
    text: GeneratedText,
    finish_reason: Option<&'static str>,
    /// Why decoding failed, reported to the reader instead of a chunk.
    failure: Option<String>,
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
            (None, Some(messages)) => (shared.apply_chat_template(&messages)?, true),
            _ => {
                return Err(BackendError::InvalidArgument(
                    "pass exactly one of `prompt` and `messages`".into(),
                ))
            }
        };
        if !(1..shared.context_tokens).contains(&options.max_tokens) {
            return Err(BackendError::InvalidArgument(format!(
                "max_tokens must be between 1 and {}, not {}",
                shared.context_tokens - 1,
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
            .model
            .vocab()
            .tokenize(text.as_bytes(), true, parse_special);
        if tokens.is_empty() {
            return Err(BackendError::InvalidArgument("the prompt is empty".into()));
        }
        if tokens.len() >= shared.context_tokens as usize {
            return Err(BackendError::InvalidArgument(format!(
                "the prompt is {} tokens but the context window holds {}",
                tokens.len(),
                shared.context_tokens
            )));
        }

        self.release();
        self.finished = None;
        let sequence = Sequence {
            sampler: sampler(&shared.model, &options),
            pending: None,
            position: 0,
            prompt_tokens: tokens.len(),
            generated: 0,
            unread: 0,
            options,
            text: GeneratedText::default(),
            finish_reason: None,
            failure: None,
        };
        let reservation = shared.occupy_lane(cancel)?;
        let sequence = shared.prefill(reservation.lane, sequence, &tokens, cancel)?;
        self.slot = Some(SequenceSlot {
            lane: reservation.keep(),
            sequence,
        });
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
                    ..last.clone()
                }),
                None => Err(BackendError::InvalidArgument(
                    "no generation in progress: the first compute takes `prompt` or `messages`"
                        .into(),
                )),
            };
        };
        let chunk = self.wait_for_chunk(slot, cancel);
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

    /// Waits until the sequence has a chunk ready (decoding the lane's next step when no one
    /// else is) and takes it. Stops before the next step once `cancel` is set.
    fn wait_for_chunk(
        &self,
        slot: SequenceSlot,
        cancel: &Cancellation,
    ) -> Result<Chunk, BackendError> {
        let shared = &*self.shared;
        let lane = &shared.lanes[slot.lane];
        loop {
            cancel.check()?;
            // Tokens already made are taken even while another generation waits for its turn.
            if let Some(chunk) = sequence_of(&mut lock(&lane.state), slot).take_ready()? {
                return Ok(chunk);
            }
            let mut turn = lane.turn(&shared.compute_slots);
            // Another generation's step may have made the chunk while this one waited.
            if sequence_of(&mut turn.state, slot).is_ready() {
                continue;
            }
            shared.step(&mut turn.state)?;
        }
    }
}

fn sequence_of(state: &mut LaneState, slot: SequenceSlot) -> &mut Sequence {
    state.sequences[slot.sequence]
        .as_mut()
        .expect("a context's sequence stays on its lane until released")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Lane {
    /// The lane to decode on, alone, holding a compute slot. Turns are taken in the order
    /// they are asked for, so a generation that steps on and on cannot starve a new one's
    /// prompt. The slot is waited for without holding the lane, so that readers with tokens
    /// ready are not held up meanwhile.
    fn turn<'a>(&'a self, compute_slots: &ComputeSlots) -> Turn<'a> {
        let mut state = lock(&self.state);
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        while state.serving != ticket {
            state = self
                .turn_over
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(state);
        let claim = Claim(self);
        let permit = compute_slots.acquire_blocking();
        Turn {
            state: lock(&self.state),
            _permit: permit,
            _claim: claim,
        }
    }
}

/// Exclusive use of a lane for one step; others wait until it is dropped. Fields drop in
/// order: the lane is unlocked, the compute slot freed, then the claim ends.
struct Turn<'a> {
    state: MutexGuard<'a, LaneState>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _claim: Claim<'a>,
}

/// The lane's current turn, passed to the next ticket when this value goes (on unwind too).
struct Claim<'a>(&'a Lane);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).serving += 1;
        self.0.turn_over.notify_all();
    }
}

/// A place on a lane taken for a new generation; given back when dropped unless kept.
struct Reservation<'a> {
    shared: &'a SharedModel,
    lane: usize,
    kept: bool,
}

impl Reservation<'_> {
    /// Keeps the place (the generation's sequence now holds it); returns the lane.
    fn keep(mut self) -> usize {
        self.kept = true;
        self.lane
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.shared.vacate(self.lane);
        }
    }
}

impl SharedModel {
    /// Picks the lane for a new generation: the least busy one, so that generations spread
    /// over the cores before they share batches; waits while all are full.
    /// Gives up (without a place) once `cancel` is set.
    fn occupy_lane(&self, cancel: &Cancellation) -> Result<Reservation<'_>, BackendError> {
        let mut occupancy = lock(&self.occupancy);
        loop {
            cancel.check()?;
            let least_busy = (0..occupancy.len())
                .min_by_key(|&lane| occupancy[lane])
                .expect("at least one lane");
            if occupancy[least_busy] < self.batch_sequences {
                occupancy[least_busy] += 1;
                return Ok(Reservation {
                    shared: self,
                    lane: least_busy,
                    kept: false,
                });
            }
            self.waiting.fetch_add(1, Ordering::Relaxed);
            // Woken when a sequence is freed; the timeout only lets a cancelled wait end.
            occupancy = self
                .sequence_freed
                .wait_timeout(occupancy, CANCEL_CHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Gives a generation's sequence and its place on the lane back.
    fn release(&self, slot: SequenceSlot) {
        self.free_sequence(slot);
        self.vacate(slot.lane);
    }

    /// Clears a sequence from its lane's KV cache and frees its id. A lane whose context
    /// failed to decode gets a fresh context once its last sequence is gone.
    fn free_sequence(&self, slot: SequenceSlot) {
        let mut state = lock(&self.lanes[slot.lane].state);
        if let Some(context) = state.context.as_mut() {
            context
                .clear_kv_cache_seq(Some(slot.sequence as u32), None, None)
                .ok();
        }
        state.sequences[slot.sequence] = None;
        if state.failed && state.sequences.iter().all(Option::is_none) {
            state.context = None;
            state.failed = false;
        }
    }

    /// Gives back a place `occupy_lane` took, waking a generation waiting for one.
    fn vacate(&self, lane: usize) {
        lock(&self.occupancy)[lane] -= 1;
        self.sequence_freed.notify_one();
    }

    /// Decodes a prompt into a free sequence of `lane` and samples its first token; returns
    /// the sequence id. Each 512-token piece of the prompt is a turn of its own, so the lane's
    /// other generations go on between the pieces of a long prompt.
    fn prefill(
        &self,
        lane: usize,
        sequence: Sequence,
        tokens: &[LlamaToken],
        cancel: &Cancellation,
    ) -> Result<usize, BackendError> {
        let id = {
            let mut state = lock(&self.lanes[lane].state);
            let id = state
                .sequences
                .iter()
                .position(Option::is_none)
                .ok_or_else(|| BackendError::Runtime("the lane has no free sequence".into()))?;
            // Not pending yet: steps pass it by until its prompt is in.
            state.sequences[id] = Some(sequence);
            id
        };
        let pieces = tokens.chunks(512).count();
        for (index, piece) in tokens.chunks(512).enumerate() {
            let last = index + 1 == pieces;
            let mut turn = self.lanes[lane].turn(&self.compute_slots);
            let decoded = cancel
                .check()
                .and_then(|()| self.decode_prompt_piece(&mut turn.state, id, piece, last));
            if let Err(error) = decoded {
                drop(turn);
                self.free_sequence(SequenceSlot { lane, sequence: id });
                return Err(error);
            }
        }
        Ok(id)
    }

    /// Decodes `piece` of sequence `id`'s prompt; after the `last` piece, samples its first
    /// token.
    fn decode_prompt_piece(
        &self,
        state: &mut LaneState,
        id: usize,
        piece: &[LlamaToken],
        last: bool,
    ) -> Result<(), BackendError> {
        let LaneState {
            context,
            batch,
            sequences,
            failed,
            ..
        } = state;
        let context = self.lane_context(context)?;
        let sequence = sequences[id]
            .as_mut()
            .ok_or_else(|| BackendError::Runtime("the sequence was freed".into()))?;
        batch.clear();
        for (offset, token) in piece.iter().enumerate() {
            let wants_logits = last && offset + 1 == piece.len();
            batch
                .add(*token, sequence.position, &[id as i32], wants_logits)
                .map_err(|e| BackendError::Runtime(e.to_string()))?;
            sequence.position += 1;
        }
        if let Err(error) = context.decode(batch) {
            *failed = true;
            return Err(BackendError::Runtime(format!(
                "decoding the prompt failed: {error}"
            )));
        }
        if last {
            let token = sequence.sampler.sample(context, batch.n_tokens() - 1);
            sequence.accept(token, &self.model, self.context_tokens);
        }
        Ok(())
    }

    /// The lane's llama.cpp context, made on first use.
    fn lane_context<'a>(
        &self,
        slot: &'a mut Option<LlamaContext<'static>>,
    ) -> Result<&'a mut LlamaContext<'static>, BackendError> {
        if slot.is_none() {
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(self.context_tokens * self.batch_sequences))
                .with_n_seq_max(self.batch_sequences)
                // A KV cache per sequence: attention looks at its own sequence only.
                .with_kv_unified(false)
                .with_n_batch(512)
                .with_n_threads(self.threads)
                .with_n_threads_batch(self.threads);
            let context = {
                let _serialised = lock(&CONTEXT_CREATION);
                self.model
                    .new_context(llama_backend()?, params)
                    .map_err(|e| {
                        BackendError::Runtime(format!("llama.cpp could not make a context: {e}"))
                    })?
            };
            // SAFETY: the context borrows `self.model`, which lives in the same `Arc`ed
            // `SharedModel` (it never moves) and is declared after `lanes`, so every lane
            // context is dropped before the model.
            *slot = Some(unsafe {
                std::mem::transmute::<LlamaContext<'_>, LlamaContext<'static>>(context)
            });
        }
        Ok(slot.as_mut().expect("made above"))
    }

    /// Decodes the next token of every sequence of the lane that has one pending and is not
    /// too far ahead of its reader, in one batch, and samples each one's next token.
    fn step(&self, state: &mut LaneState) -> Result<(), BackendError> {
        let LaneState {
            context,
            batch,
            sequences,
            failed,
            ..
        } = state;
        let context = self.lane_context(context)?;
        batch.clear();
        let mut members = Vec::new();
        for (id, sequence) in sequences.iter_mut().enumerate() {
            let Some(sequence) = sequence else { continue };
            let Some(token) = sequence.pending else {
                continue;
            };
            if sequence.unread >= sequence.options.chunk_tokens.max(LOOKAHEAD_TOKENS) {
                continue;
            }
            batch
                .add(token, sequence.position, &[id as i32], true)
                .map_err(|e| BackendError::Runtime(e.to_string()))?;
            members.push(id);
        }
        if let Err(error) = context.decode(batch) {
            *failed = true;
            let failure = format!("decoding failed: {error}");
            for &id in &members {
                if let Some(sequence) = sequences[id].as_mut() {
                    sequence.pending = None;
                    sequence.failure = Some(failure.clone());
                }
            }
            return Err(BackendError::Runtime(failure));
        }
        // llama.cpp decodes sequences with separate KV caches together only when their ids
        // are consecutive: each run of consecutive ids is one forward pass.
        let passes = 1 + members.windows(2).filter(|w| w[1] != w[0] + 1).count();
        self.decode_passes
            .fetch_add(passes as u64, Ordering::Relaxed);
        self.decoded_tokens
            .fetch_add(members.len() as u64, Ordering::Relaxed);
        for (index, &id) in members.iter().enumerate() {
            let Some(sequence) = sequences[id].as_mut() else {
                continue;
            };
            sequence.position += 1;
            let token = sequence.sampler.sample(context, index as i32);
            sequence.accept(token, &self.model, self.context_tokens);
        }
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

/// What one `compute` hands back.
#[derive(Clone)]
struct Chunk {
    text: String,
    finish_reason: Option<&'static str>,
    prompt_tokens: usize,
    generated: u32,
}

impl Sequence {
    /// Takes a freshly sampled token: ends the generation (end of sequence, a stop string,
    /// max_tokens, a full context window) or queues the token for the next step.
    fn accept(&mut self, token: LlamaToken, model: &LlamaModel, context_tokens: u32) {
        self.pending = None;
        let vocab = model.vocab();
        if vocab.is_eog(token) {
            self.finish_reason = Some("stop");
            return;
        }
        self.generated += 1;
        self.unread += 1;
        let mut piece = Vec::new();
        vocab.token_to_piece_into(token, &mut piece, false, None);
        if self.text.push_piece(&piece, &self.options.stop) {
            self.finish_reason = Some("stop");
        } else if self.generated >= self.options.max_tokens
            || self.position as u32 + 1 >= context_tokens
        {
            self.finish_reason = Some("length");
        } else {
            self.pending = Some(token);
        }
    }

    /// Whether a reader would get a chunk now: `chunk_tokens` new tokens, or the end.
    fn is_ready(&self) -> bool {
        self.finish_reason.is_some()
            || self.failure.is_some()
            || self.unread >= self.options.chunk_tokens
    }

    /// The text that became final since the last chunk, if a chunk is ready.
    fn take_ready(&mut self) -> Result<Option<Chunk>, BackendError> {
        if let Some(failure) = &self.failure {
            return Err(BackendError::Runtime(failure.clone()));
        }
        if !self.is_ready() {
            return Ok(None);
        }
        self.unread = 0;
        let text = self
            .text
            .take(self.finish_reason.is_some(), &self.options.stop);
        Ok(Some(Chunk {
            text,
            finish_reason: self.finish_reason,
            prompt_tokens: self.prompt_tokens,
            generated: self.generated,
        }))
    }
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
        Ok(vec![
            ("text".to_string(), text_tensor(&chunk.text)),
            (
                "finish_reason".to_string(),
                text_tensor(chunk.finish_reason.unwrap_or("")),
            ),
            ("usage".to_string(), text_tensor(&usage.to_string())),
        ])
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
