//! Log-probabilities in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
//! top_logprobs}]}` and the legacy completions' parallel lists (`tokens`, `token_logprobs`,
//! `top_logprobs` as token → log-probability maps, `text_offset`).

use serde_json::{json, Map, Value};
use tensorlet_sdk::llm::TokenLogprob;

/// What a request asked for: none, or each token's log-probability with this many
/// alternatives.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    No,
    Yes { alternatives: u32 },
}

/// Chat's `logprobs` of `tokens`.
pub fn chat(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|token| {
            let top: Vec<Value> = token
                .top_logprobs
                .iter()
                .map(|c| json!({ "token": c.token, "logprob": c.logprob, "bytes": c.bytes }))
                .collect();
            json!({ "token": token.token, "logprob": token.logprob, "bytes": token.bytes, "top_logprobs": top })
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// The legacy completions' `logprobs` of `tokens`, the first of them `offset` characters into
/// the text (the prompt's length, then what came before); moves `offset` past them.
pub fn completion(tokens: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for token in tokens {
        text_offset.push(*offset);
        *offset += token.token.chars().count();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|token| {
            let alternatives: Map<String, Value> = token
                .top_logprobs
                .iter()
                .map(|c| (c.token.clone(), json!(c.logprob)))
                .collect();
            Value::Object(alternatives)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}
