//! openai: the OpenAI HTTP API over the node's models, so every OpenAI client works against a
//! tensorlet node. Mount it and point a client's base URL at `https://node/apps/openai/v1`.
//!
//! - `GET /v1/models`: the models this app was deployed with (`--model NAME`).
//! - `POST /v1/chat/completions`: chat through the model's own chat template; `"stream": true`
//!   answers with server-sent events, token by token.
//! - `POST /v1/completions`: plain continuation of a prompt, streaming too.
//! - `POST /v1/embeddings`: vectors from an embedding model, as floats or base64.
//!
//! Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use tensorlet_sdk::http::{Request, Response};
use tensorlet_sdk::llm::{self, Generation, Message, Options};
use tensorlet_sdk::nn::{ErrorCode, NnError};

/// Largest `max_tokens` accepted, before the model's own context limit applies.
const MAX_TOKENS_LIMIT: u32 = 4096;

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields of a (chat) completion request that this component honours.
#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u32>,
    stop: Option<Stop>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn openai_error(
    status: u16,
    kind: &str,
    code: &str,
    param: Option<&str>,
    message: &str,
) -> Response {
    Response::json(
        status,
        &json!({ "error": { "message": message, "type": kind, "param": param, "code": code } }),
    )
}

fn declared_models() -> Vec<String> {
    std::env::var("TENSORLET_MODELS")
        .unwrap_or_default()
        .split(',')
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn completion_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}",
        tensorlet_sdk::bindings::wasi::random::random::get_random_u64()
    )
}

fn nn_error(error: &NnError, model: &str) -> Response {
    match error.code {
        ErrorCode::NotFound | ErrorCode::Security => openai_error(
            404,
            "invalid_request_error",
            "model_not_found",
            Some("model"),
            &format!("The model `{model}` does not exist: {}", error.message),
        ),
        ErrorCode::InvalidArgument => openai_error(
            400,
            "invalid_request_error",
            "invalid_value",
            None,
            &error.message,
        ),
        _ => openai_error(
            500,
            "server_error",
            "inference_failed",
            None,
            &error.message,
        ),
    }
}

fn list_models() -> Response {
    let data: Vec<Value> = declared_models()
        .iter()
        .map(|id| json!({ "id": id, "object": "model", "created": 0, "owned_by": "tensorlet" }))
        .collect();
    Response::json(200, &json!({ "object": "list", "data": data }))
}

/// The request's JSON body, or OpenAI's 400 answer saying why it is not one.
fn parse_body<T: serde::de::DeserializeOwned>(request: &Request) -> Result<T, Response> {
    serde_json::from_slice(&request.body).map_err(|e| {
        openai_error(
            400,
            "invalid_request_error",
            "invalid_json",
            None,
            &format!("Invalid request body: {e}"),
        )
    })
}

/// Chat or text completion: `chat` picks the request and answer shapes.
fn complete(request: &Request, chat: bool) -> Response {
    let body: CompletionRequest = match parse_body(request) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if !declared_models().contains(&body.model) {
        let message = format!(
            "The model `{}` does not exist or you do not have access to it.",
            body.model
        );
        return openai_error(
            404,
            "invalid_request_error",
            "model_not_found",
            Some("model"),
            &message,
        );
    }
    if let Some(max_tokens) = body
        .max_tokens
        .filter(|n| !(1..=MAX_TOKENS_LIMIT).contains(n))
    {
        let message =
            format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, not {max_tokens}");
        return openai_error(
            400,
            "invalid_request_error",
            "invalid_value",
            Some("max_tokens"),
            &message,
        );
    }
    let options = Options {
        max_tokens: Some(body.max_tokens.unwrap_or(256)),
        temperature: body.temperature,
        top_p: body.top_p,
        seed: body.seed,
        stop: match body.stop {
            Some(Stop::One(stop)) => vec![stop],
            Some(Stop::Many(stops)) => stops,
            None => Vec::new(),
        },
        chunk_tokens: (!body.stream).then_some(MAX_TOKENS_LIMIT),
        ..Options::default()
    };
    let started = match (chat, &body.messages, &body.prompt) {
        (true, Some(messages), _) => llm::chat(&body.model, messages, &options),
        (false, _, Some(prompt)) => llm::generate(&body.model, prompt, &options),
        (true, None, _) => {
            return openai_error(
                400,
                "invalid_request_error",
                "missing_field",
                Some("messages"),
                "`messages` is required",
            )
        }
        (false, _, None) => {
            return openai_error(
                400,
                "invalid_request_error",
                "missing_field",
                Some("prompt"),
                "`prompt` is required",
            )
        }
    };
    let mut generation = match started {
        Ok(generation) => generation,
        Err(error) => return nn_error(&error, &body.model),
    };
    // Run the first step before answering, so that a bad prompt is an HTTP error, not a
    // broken stream.
    let first = match generation.next().transpose() {
        Ok(first) => first,
        Err(error) => return nn_error(&error, &body.model),
    };
    let shape = Shape {
        chat,
        id: completion_id(if chat { "chatcmpl" } else { "cmpl" }),
        created: now(),
        model: body.model,
    };
    if body.stream {
        let include_usage = body.stream_options.unwrap_or_default().include_usage;
        Response::server_sent_events(Events::new(shape, generation, first, include_usage))
    } else {
        let mut text = first.unwrap_or_default();
        for chunk in &mut generation {
            match chunk {
                Ok(chunk) => text.push_str(&chunk),
                Err(error) => return nn_error(&error, &shape.model),
            }
        }
        Response::json(200, &shape.whole(&text, &generation))
    }
}

/// How answers of one request look.
struct Shape {
    chat: bool,
    id: String,
    created: u64,
    model: String,
}

fn usage(generation: &Generation) -> Value {
    let usage = generation.usage();
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

impl Shape {
    fn whole(&self, text: &str, generation: &Generation) -> Value {
        let finish = generation.finish_reason().unwrap_or("stop");
        let choice = if self.chat {
            json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish, "logprobs": null })
        } else {
            json!({ "index": 0, "text": text, "finish_reason": finish, "logprobs": null })
        };
        let object = if self.chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice], "usage": usage(generation) })
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = if self.chat {
            let delta = match text {
                Some(text) => json!({ "role": "assistant", "content": text }),
                None => json!({}),
            };
            json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null })
        } else {
            json!({ "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null })
        };
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice] })
    }
}

/// The server-sent events of a streamed completion: a chunk per piece of text, a last chunk
/// with the finish reason, optionally the usage, then `[DONE]`.
struct Events {
    shape: Shape,
    generation: Generation,
    first: Option<String>,
    include_usage: bool,
    stage: Stage,
}

enum Stage {
    Text,
    Usage,
    Done,
    Over,
}

impl Events {
    fn new(
        shape: Shape,
        generation: Generation,
        first: Option<String>,
        include_usage: bool,
    ) -> Self {
        Self {
            shape,
            generation,
            first,
            include_usage,
            stage: Stage::Text,
        }
    }
}

impl Iterator for Events {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        match self.stage {
            Stage::Text => {
                let next = match self.first.take() {
                    Some(text) => Some(Ok(text)),
                    None => self.generation.next(),
                };
                match next {
                    Some(Ok(text)) => Some(self.shape.chunk(Some(&text), None).to_string()),
                    Some(Err(error)) => {
                        self.stage = Stage::Done;
                        Some(json!({ "error": { "message": error.message, "type": "server_error", "param": null, "code": "inference_failed" } }).to_string())
                    }
                    None => {
                        self.stage = if self.include_usage {
                            Stage::Usage
                        } else {
                            Stage::Done
                        };
                        let finish = self
                            .generation
                            .finish_reason()
                            .unwrap_or("stop")
                            .to_string();
                        Some(self.shape.chunk(None, Some(&finish)).to_string())
                    }
                }
            }
            Stage::Usage => {
                self.stage = Stage::Done;
                let mut chunk = self.shape.chunk(None, None);
                chunk["choices"] = json!([]);
                chunk["usage"] = usage(&self.generation);
                Some(chunk.to_string())
            }
            Stage::Done => {
                self.stage = Stage::Over;
                Some("[DONE]".to_string())
            }
            Stage::Over => None,
        }
    }
}

/// Texts given to `/v1/embeddings` as `input`.
#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: EmbeddingInput,
    #[serde(default)]
    encoding_format: Option<String>,
}

fn embeddings(request: &Request) -> Response {
    let body: EmbeddingRequest = match parse_body(request) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let texts = match &body.input {
        EmbeddingInput::One(text) => vec![text.as_str()],
        EmbeddingInput::Many(texts) => texts.iter().map(String::as_str).collect(),
    };
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return openai_error(
                400,
                "invalid_request_error",
                "invalid_value",
                Some("encoding_format"),
                &format!("encoding_format must be float or base64, not {other:?}"),
            )
        }
    };
    let embeddings = match llm::embed(&body.model, &texts) {
        Ok(embeddings) => embeddings,
        Err(error) => return nn_error(&error, &body.model),
    };
    let data: Vec<Value> = embeddings
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    Response::json(
        200,
        &json!({
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": { "prompt_tokens": embeddings.prompt_tokens, "total_tokens": embeddings.prompt_tokens },
        }),
    )
}

fn handle(request: Request) -> Response {
    match (request.method.as_str(), request.path()) {
        ("GET", "/v1/models") => list_models(),
        ("POST", "/v1/chat/completions") => complete(&request, true),
        ("POST", "/v1/completions") => complete(&request, false),
        ("POST", "/v1/embeddings") => embeddings(&request),
        _ => openai_error(
            404,
            "invalid_request_error",
            "unknown_url",
            None,
            &format!("Unknown request URL: {} {}", request.method, request.path()),
        ),
    }
}

tensorlet_sdk::http_handler!(handle);
