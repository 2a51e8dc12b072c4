//! The lanes of a loaded model, where its generations run. A lane is one llama.cpp context
//! whose KV cache holds several sequences, one per generation; a step decodes the next token of
//! all of them in one batch. A new generation takes a place on the least busy lane. Work on a
//! lane goes in turns, taken in the order they are asked for, each holding a compute slot: a
//! turn decodes one step for the whole lane, or one 512-token piece of a prompt. Everything
//! here blocks; it runs on the blocking threads that `compute` calls run on.

use super::context::LaneContext;
use super::sequence::{Chunk, Sequence};
use super::{lock, BackendError, Cancellation, ComputeSlots, GenerationActivity};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// How often a generation waiting for a free sequence looks whether its request went away.
const CANCEL_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// A loaded model and its lanes. The weights are loaded once; each lane is one llama.cpp
/// context (made when a generation first needs it, kept while the model stays loaded) whose KV
/// cache holds `batch_sequences` sequences of `context_tokens` each. A lane decodes the next
/// token of all its sequences in one batch; lanes decode side by side.
pub(super) struct SharedModel {
    lanes: Vec<Lane>,
    /// Sequences in use per lane; a new generation waits while every lane is full.
    occupancy: Mutex<Vec<u32>>,
    sequence_freed: Condvar,
    /// Generations waiting for a sequence.
    waiting: AtomicU32,
    /// llama.cpp forward passes of generation steps, and the tokens they decoded.
    decode_passes: AtomicU64,
    decoded_tokens: AtomicU64,
    model: Arc<LlamaModel>,
    threads: i32,
    context_tokens: u32,
    batch_sequences: u32,
    compute_slots: ComputeSlots,
}

/// Where a generation lives: its lane and its sequence id there.
#[derive(Clone, Copy)]
pub(super) struct SequenceSlot {
    lane: usize,
    sequence: usize,
}

struct Lane {
    state: Mutex<LaneState>,
    /// Signalled when a step (or a prompt's decoding) ends.
    turn_over: Condvar,
}

struct LaneState {
    context: Option<LaneContext>,
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

impl SharedModel {
    /// `lanes` lanes of `batch_sequences` sequences of `context_tokens` each, decoding with
    /// `threads` threads and holding one of `compute_slots` while they do.
    pub(super) fn new(
        model: LlamaModel,
        lanes: usize,
        batch_sequences: u32,
        context_tokens: u32,
        threads: i32,
        compute_slots: ComputeSlots,
    ) -> Self {
        Self {
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
            model: Arc::new(model),
            threads,
            context_tokens,
            batch_sequences,
            compute_slots,
        }
    }

    pub(super) fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The context window of one generation.
    pub(super) fn context_tokens(&self) -> u32 {
        self.context_tokens
    }

    /// What the lanes are doing, and have done since the model was loaded.
    pub(super) fn activity(&self) -> GenerationActivity {
        GenerationActivity {
            lanes: self.lanes.len(),
            sequences_per_lane: self.batch_sequences,
            context_tokens: self.context_tokens,
            running: lock(&self.occupancy).iter().sum(),
            waiting: self.waiting.load(Ordering::Relaxed),
            decode_passes: self.decode_passes.load(Ordering::Relaxed),
            decoded_tokens: self.decoded_tokens.load(Ordering::Relaxed),
        }
    }

    /// Starts a generation: takes a place on a lane for `sequence` (waiting while all are
    /// full) and decodes its prompt `tokens` there. Gives up, leaving no trace, once `cancel`
    /// is set or if decoding fails.
    pub(super) fn start_generation(
        &self,
        sequence: Sequence,
        tokens: &[LlamaToken],
        cancel: &Cancellation,
    ) -> Result<SequenceSlot, BackendError> {
        let reservation = self.occupy_lane(cancel)?;
        let sequence = self.prefill(reservation.lane, sequence, tokens, cancel)?;
        Ok(SequenceSlot {
            lane: reservation.keep(),
            sequence,
        })
    }

    /// Waits until the sequence has a chunk ready (decoding the lane's next step when no one
    /// else is) and takes it. Stops before the next step once `cancel` is set.
    pub(super) fn wait_for_chunk(
        &self,
        slot: SequenceSlot,
        cancel: &Cancellation,
    ) -> Result<Chunk, BackendError> {
        let lane = &self.lanes[slot.lane];
        loop {
            cancel.check()?;
            // Tokens already made are taken even while another generation waits for its turn.
            if let Some(chunk) = sequence_of(&mut lock(&lane.state), slot).take_ready()? {
                return Ok(chunk);
            }
            let mut turn = lane.turn(&self.compute_slots);
            // Another generation's step may have made the chunk while this one waited.
            if sequence_of(&mut turn.state, slot).is_ready() {
                continue;
            }
            self.step(&mut turn.state)?;
        }
    }

    /// Gives a generation's sequence and its place on the lane back.
    pub(super) fn release(&self, slot: SequenceSlot) {
        self.free_sequence(slot);
        self.vacate(slot.lane);
    }

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

    /// Gives back a place `occupy_lane` took, waking a generation waiting for one.
    fn vacate(&self, lane: usize) {
        lock(&self.occupancy)[lane] -= 1;
        self.sequence_freed.notify_one();
    }

    /// Clears a sequence from its lane's KV cache and frees its id. A lane whose context
    /// failed to decode gets a fresh context once its last sequence is gone.
    fn free_sequence(&self, slot: SequenceSlot) {
        let mut state = lock(&self.lanes[slot.lane].state);
        if let Some(context) = state.context.as_mut() {
            context.clear_sequence(slot.sequence as u32);
        }
        state.sequences[slot.sequence] = None;
        if state.failed && state.sequences.iter().all(Option::is_none) {
            state.context = None;
            state.failed = false;
        }
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
        sequence.add_prompt_piece(batch, id, piece, last)?;
        if let Err(error) = context.decode(batch) {
            *failed = true;
            return Err(BackendError::Runtime(format!(
                "decoding the prompt failed: {error}"
            )));
        }
        if last {
            sequence.prompt_decoded(
                context.get(),
                batch.n_tokens() - 1,
                &self.model,
                self.context_tokens,
            );
        }
        Ok(())
    }

    /// The lane's llama.cpp context, made on first use.
    fn lane_context<'a>(
        &self,
        slot: &'a mut Option<LaneContext>,
    ) -> Result<&'a mut LaneContext, BackendError> {
        if slot.is_none() {
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(self.context_tokens * self.batch_sequences))
                .with_n_seq_max(self.batch_sequences)
                // A KV cache per sequence: attention looks at its own sequence only.
                .with_kv_unified(false)
                .with_n_batch(512)
                .with_n_threads(self.threads)
                .with_n_threads_batch(self.threads);
            *slot = Some(LaneContext::new(self.model.clone(), params)?);
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
            if sequence.add_pending(batch, id)? {
                members.push(id);
            }
        }
        if let Err(error) = context.decode(batch) {
            *failed = true;
            let failure = format!("decoding failed: {error}");
            for &id in &members {
                if let Some(sequence) = sequences[id].as_mut() {
                    sequence.fail(failure.clone());
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
            sequence.pending_decoded(
                context.get(),
                index as i32,
                &self.model,
                self.context_tokens,
            );
        }
        Ok(())
    }
}

fn sequence_of(state: &mut LaneState, slot: SequenceSlot) -> &mut Sequence {
    state.sequences[slot.sequence]
        .as_mut()
        .expect("a context's sequence stays on its lane until released")
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
