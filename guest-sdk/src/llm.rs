//! Text generation through wasi-nn, following the convention in `wit/README.md`: the first
//! `compute` of an execution context carries the prompt (or chat messages) and options and
//! returns the first chunk; each further `compute` returns the next chunk, until the host sets
//! `finish_reason`. [`generate`] and [`chat`] wrap that as an iterator of text chunks;
//! [`embed`] turns texts into vectors with an embedding model.
//!
//! ```ignore
//! let mut generation = tensorlet_sdk::llm::chat("smollm2", &[Message::user("Hi!")], &Options::default())?;
//! for chunk in &mut generation {
//!     print!("{}", chunk?);
//! }
//! println!("\n{:?} {:?}", generation.finish_reason(), generation.usage());
//! ```

use crate::nn::{Context, Graph, NnError, Tensor, TensorType};
use serde::{Deserialize, Serialize};

/// Generation settings; `None` fields take the host's defaults.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Options {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// 0 means greedy decoding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    /// Drops tokens less likely than this share of the likeliest one (0 = off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// OpenAI's penalties over the completion so far: once per token present (presence) and
    /// per time it was generated (frequency), −2 to 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Added to these tokens' logits (by the model's token id) at every step, −100 to 100:
    /// −100 bans a token, 100 forces it.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub logit_bias: std::collections::BTreeMap<i32, f32>,
    /// Report each token's log-probability and this many likeliest alternatives (0–20); see
    /// [`Generation::take_logprobs`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Tokens per chunk at least (default 1: stream token by token; a chunk also carries
    /// tokens that were already generated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_tokens: Option<u32>,
    /// A GBNF grammar (llama.cpp's) the generated text must follow, from its rule `root`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grammar: Option<String>,
}

/// A chat message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message from the user.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// Token counts of a generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// How likely the model found a generated token (under its own distribution, before sampling
/// settings reshape it), with its likeliest alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Likeliest first.
    pub top_logprobs: Vec<Candidate>,
}

/// One token the model could have generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A running generation: iterate it for text chunks.
pub struct Generation {
    context: Context,
    first_inputs: Option<Vec<(String, Tensor)>>,
    finish_reason: Option<String>,
    usage: Usage,
    logprobs: Vec<TokenLogprob>,
}

fn text_tensor(text: &str) -> Tensor {
    Tensor {
        dimensions: vec![text.len() as u32],
        ty: TensorType::U8,
        data: text.as_bytes().to_vec(),
    }
}

fn start(
    model: &str,
    mut inputs: Vec<(String, Tensor)>,
    options: &Options,
) -> Result<Generation, NnError> {
    let context = Graph::by_name(model)?.context()?;
    let options = serde_json::to_string(options).expect("options serialise");
    inputs.push(("options".to_string(), text_tensor(&options)));
    Ok(Generation {
        context,
        first_inputs: Some(inputs),
        finish_reason: None,
        usage: Usage::default(),
        logprobs: Vec::new(),
    })
}

/// Generates a continuation of `prompt` (no chat template) with model `model`.
pub fn generate(model: &str, prompt: &str, options: &Options) -> Result<Generation, NnError> {
    start(model, vec![("prompt".into(), text_tensor(prompt))], options)
}

/// Answers a conversation with model `model`, using the chat template from its metadata.
pub fn chat(model: &str, messages: &[Message], options: &Options) -> Result<Generation, NnError> {
    let messages = serde_json::to_string(messages).expect("messages serialise");
    start(
        model,
        vec![("messages".into(), text_tensor(&messages))],
        options,
    )
}

/// Answers a conversation offered `tools`, with the model's own (Jinja) chat template: the
/// messages and tools are OpenAI's JSON shapes, so messages may carry `tool_calls` and tool
/// results. A model whose template knows no tools refuses (`invalid-argument`).
pub fn chat_with_tools(
    model: &str,
    messages: &[serde_json::Value],
    tools: &[serde_json::Value],
    options: &Options,
) -> Result<Generation, NnError> {
    let messages = serde_json::to_string(messages).expect("messages serialise");
    let tools = serde_json::to_string(tools).expect("tools serialise");
    let inputs = vec![
        ("messages".into(), text_tensor(&messages)),
        ("tools".into(), text_tensor(&tools)),
    ];
    start(model, inputs, options)
}

impl Generation {
    /// Why the generation ended (`stop` or `length`), once it has.
    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }

    /// Token counts so far.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// The log-probabilities of the tokens generated since the last call, when the options
    /// asked for them. A token's text may reach the iterator later than its log-probability
    /// (a character split across tokens, text that may begin a stop string).
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.logprobs)
    }

    /// Runs the generation to the end and returns all its text.
    pub fn text(&mut self) -> Result<String, NnError> {
        self.collect()
    }
}

impl Iterator for Generation {
    type Item = Result<String, NnError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.finish_reason.is_some() && self.first_inputs.is_none() {
                return None;
            }
            let inputs = self.first_inputs.take().unwrap_or_default();
            let outputs = match self.context.compute(inputs) {
                Ok(outputs) => outputs,
                Err(error) => {
                    self.finish_reason = Some("error".into());
                    return Some(Err(error));
                }
            };
            let mut text = String::new();
            for (name, tensor) in outputs {
                let value = String::from_utf8_lossy(&tensor.data).into_owned();
                match name.as_str() {
                    "text" => text = value,
                    "finish_reason" if !value.is_empty() => self.finish_reason = Some(value),
                    "usage" => self.usage = serde_json::from_str(&value).unwrap_or(self.usage),
                    "logprobs" => {
                        let logprobs: Vec<TokenLogprob> =
                            serde_json::from_slice(&tensor.data).unwrap_or_default();
                        self.logprobs.extend(logprobs);
                    }
                    _ => {}
                }
            }
            // A token may end mid-character: its text arrives with the next chunk.
            if !text.is_empty() {
                return Some(Ok(text));
            }
        }
    }
}

/// Sentence embeddings of several texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector per text, in the order given.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read from the texts.
    pub prompt_tokens: u32,
}

/// Embeds `texts` with the embedding model registered as `model` (convention in
/// `wit/README.md`: JSON texts in, `embeddings [n, dim]` f32 and `usage` out).
pub fn embed(model: &str, texts: &[&str]) -> Result<Embeddings, NnError> {
    let texts = serde_json::to_string(texts).expect("texts serialise");
    let outputs =
        Graph::by_name(model)?.compute(vec![("texts".to_string(), text_tensor(&texts))])?;
    let mut embeddings = Embeddings {
        vectors: Vec::new(),
        prompt_tokens: 0,
    };
    for (name, tensor) in outputs {
        match name.as_str() {
            "embeddings" => {
                let width = tensor.dimensions.get(1).copied().unwrap_or(0).max(1) as usize;
                let values = tensor.to_f32().ok_or_else(|| NnError {
                    code: crate::nn::ErrorCode::InvalidArgument,
                    message: format!("model {model:?} is not an embedding model: its `embeddings` output is not f32"),
                })?;
                embeddings.vectors = values.chunks(width).map(<[f32]>::to_vec).collect();
            }
            "usage" => {
                #[derive(Deserialize)]
                struct EmbeddingUsage {
                    prompt_tokens: u32,
                }
                if let Ok(usage) = serde_json::from_slice::<EmbeddingUsage>(&tensor.data) {
                    embeddings.prompt_tokens = usage.prompt_tokens;
                }
            }
            _ => {}
        }
    }
    Ok(embeddings)
}
