//! One generation on its lane: its sampler, the token it has sampled and waits to decode, how
//! far its KV cache sequence reaches, the text it has made, and the chunks its reader takes.
//! The lane decides when a sequence decodes; the sequence decides what it decodes and when it
//! is done.

use super::logprobs::{token_logprob, TokenLogprob};
use super::options::Options;
use super::text::GeneratedText;
use super::BackendError;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

/// Tokens a sequence may run ahead of its reader (more when its reader asks for bigger chunks):
/// a step decodes every sequence of a lane that is not this far ahead, whether or not its
/// reader is waiting at that moment.
const LOOKAHEAD_TOKENS: u32 = 8;

/// One generation's state on its lane.
pub(super) struct Sequence {
    sampler: LlamaSampler,
    /// The sampled token that the next step decodes; `None` once finished.
    pending: Option<LlamaToken>,
    /// Tokens in this sequence's KV cache.
    position: i32,
    prompt_tokens: usize,
    generated: u32,
    /// Tokens generated since the reader last took a chunk.
    unread: u32,
    /// Their log-probabilities, when the options ask for them.
    unread_logprobs: Vec<TokenLogprob>,
    options: Options,
    /// The text generated so far, and how much of it was handed out.
    text: GeneratedText,
    finish_reason: Option<&'static str>,
    /// Why decoding failed, reported to the reader instead of a chunk.
    failure: Option<String>,
}

/// What one `compute` hands back.
#[derive(Clone)]
pub(super) struct Chunk {
    pub(super) text: String,
    pub(super) finish_reason: Option<&'static str>,
    pub(super) prompt_tokens: usize,
    pub(super) generated: u32,
    /// The log-probabilities of the tokens generated since the last chunk, when asked for.
    pub(super) logprobs: Option<Vec<TokenLogprob>>,
}

impl Sequence {
    /// A generation of a prompt of `prompt_tokens` tokens, before any of them is decoded.
    pub(super) fn new(
        model: &LlamaModel,
        options: Options,
        prompt_tokens: usize,
    ) -> Result<Self, BackendError> {
        Ok(Self {
            sampler: sampler(model, &options)?,
            pending: None,
            position: 0,
            prompt_tokens,
            generated: 0,
            unread: 0,
            unread_logprobs: Vec::new(),
            options,
            text: GeneratedText::default(),
            finish_reason: None,
            failure: None,
        })
    }

    /// Adds `piece` of the prompt to `batch` as sequence `id`, after what its KV cache holds.
    /// Only the prompt's final token (of the `last` piece) asks for logits.
    pub(super) fn add_prompt_piece(
        &mut self,
        batch: &mut LlamaBatch,
        id: usize,
        piece: &[LlamaToken],
        last: bool,
    ) -> Result<(), BackendError> {
        for (offset, token) in piece.iter().enumerate() {
            let wants_logits = last && offset + 1 == piece.len();
            batch
                .add(*token, self.position, &[id as i32], wants_logits)
                .map_err(|e| BackendError::Runtime(e.to_string()))?;
            self.position += 1;
        }
        Ok(())
    }

    /// Adds the token the next step decodes to `batch` as sequence `id`, and returns whether
    /// it did: a finished sequence has none, and one too far ahead of its reader waits.
    pub(super) fn add_pending(
        &self,
        batch: &mut LlamaBatch,
        id: usize,
    ) -> Result<bool, BackendError> {
        let Some(token) = self.pending else {
            return Ok(false);
        };
        if self.unread >= self.options.chunk_tokens.max(LOOKAHEAD_TOKENS) {
            return Ok(false);
        }
        batch
            .add(token, self.position, &[id as i32], true)
            .map_err(|e| BackendError::Runtime(e.to_string()))?;
        Ok(true)
    }

    /// Once the prompt is decoded: samples the first token from the logits at `index` of the
    /// batch.
    pub(super) fn prompt_decoded(
        &mut self,
        context: &LlamaContext,
        index: i32,
        model: &LlamaModel,
        context_tokens: u32,
    ) {
        self.sample(context, index, model, context_tokens);
    }

    /// Once a step decoded the pending token: samples the next one from the logits at `index`
    /// of the batch.
    pub(super) fn pending_decoded(
        &mut self,
        context: &LlamaContext,
        index: i32,
        model: &LlamaModel,
        context_tokens: u32,
    ) {
        self.position += 1;
        self.sample(context, index, model, context_tokens);
    }

    /// Samples the next token from the logits at `index` of the batch (with its
    /// log-probabilities, when asked for) and takes it.
    fn sample(
        &mut self,
        context: &LlamaContext,
        index: i32,
        model: &LlamaModel,
        context_tokens: u32,
    ) {
        let token = self.sampler.sample(context, index);
        let logprob = self.options.logprobs.map(|top| {
            let piece = |id: usize| {
                let mut bytes = Vec::new();
                let token = LlamaToken::new(id as i32);
                model
                    .vocab()
                    .token_to_piece_into(token, &mut bytes, false, None);
                bytes
            };
            token_logprob(context.get_logits_ith(index), token.0 as usize, top, piece)
        });
        self.accept(token, logprob, model, context_tokens);
    }

    /// Ends the generation with `failure`, which its reader gets instead of a chunk.
    pub(super) fn fail(&mut self, failure: String) {
        self.pending = None;
        self.failure = Some(failure);
    }

    /// Takes a freshly sampled token: ends the generation (end of sequence, a stop string,
    /// max_tokens, a full context window) or queues the token for the next step. The end of
    /// sequence token is not part of the answer, nor of its log-probabilities.
    fn accept(
        &mut self,
        token: LlamaToken,
        logprob: Option<TokenLogprob>,
        model: &LlamaModel,
        context_tokens: u32,
    ) {
        self.pending = None;
        let vocab = model.vocab();
        if vocab.is_eog(token) {
            self.finish_reason = Some("stop");
            return;
        }
        self.generated += 1;
        self.unread += 1;
        self.unread_logprobs.extend(logprob);
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
    pub(super) fn is_ready(&self) -> bool {
        self.finish_reason.is_some()
            || self.failure.is_some()
            || self.unread >= self.options.chunk_tokens
    }

    /// The text that became final since the last chunk, if a chunk is ready.
    pub(super) fn take_ready(&mut self) -> Result<Option<Chunk>, BackendError> {
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
            logprobs: self
                .options
                .logprobs
                .map(|_| std::mem::take(&mut self.unread_logprobs)),
        }))
    }
}

/// The sampler `options` ask for: greedy at temperature 0, otherwise top-k, top-p, min-p and
/// temperature before a seeded draw; before either a repeat penalty over the last 64 tokens
/// and presence and frequency penalties over the whole completion; and first of all the
/// grammar, when there is one, which leaves only the tokens it allows, then the logit biases.
fn sampler(model: &LlamaModel, options: &Options) -> Result<LlamaSampler, BackendError> {
    let mut chain = Vec::new();
    if let Some(grammar) = &options.grammar {
        let constrained = LlamaSampler::grammar(model, grammar, "root")
            .map_err(|e| BackendError::InvalidArgument(format!("the grammar: {e}")))?;
        chain.push(constrained);
    }
    if !options.logit_bias.is_empty() {
        let vocabulary = model.n_vocab();
        let mut biases = Vec::with_capacity(options.logit_bias.len());
        for (&token, &bias) in &options.logit_bias {
            if !(0..vocabulary).contains(&token) {
                return Err(BackendError::InvalidArgument(format!(
                    "logit_bias names token {token}, but the model's tokens are 0 to {}",
                    vocabulary - 1
                )));
            }
            biases.push(LlamaLogitBias::new(LlamaToken::new(token), bias));
        }
        chain.push(LlamaSampler::logit_bias(vocabulary, &biases));
    }
    if options.repeat_penalty != 1.0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            64,
            options.repeat_penalty,
            0.0,
            0.0,
        ));
    }
    if options.presence_penalty != 0.0 || options.frequency_penalty != 0.0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            i32::try_from(options.max_tokens).unwrap_or(i32::MAX),
            1.0,
            options.frequency_penalty,
            options.presence_penalty,
        ));
    }
    if options.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if options.top_k > 0 {
            chain.push(LlamaSampler::top_k(options.top_k));
        }
        chain.push(LlamaSampler::top_p(options.top_p.clamp(0.0, 1.0), 1));
        if options.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(options.min_p, 1));
        }
        chain.push(LlamaSampler::temp(options.temperature));
        chain.push(LlamaSampler::dist(
            options.seed.unwrap_or_else(rand::random),
        ));
    }
    Ok(LlamaSampler::chain_simple(chain))
}
