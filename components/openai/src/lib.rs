//! openai: the OpenAI HTTP API over the node's models, so every OpenAI client works against a
//! tensorlet node. Mount it and point a client's base URL at `https://node/apps/openai/v1`.
//!
//! - `GET /v1/models`: the models this app was deployed with (`--model NAME`).
//! - `POST /v1/chat/completions`: chat through the model's own chat template; `"stream": true`
//!   answers with server-sent events, token by token; `n` choices, one after another.
//! - `POST /v1/completions`: plain continuation of a prompt, streaming too.
//! - `tools` and `tool_choice` through the model's own chat template ([`tools`]); structured
//!   output through grammars ([`grammar`]); log-probabilities in both APIs' shapes
//!   ([`logprobs`]).
//! - Every field of a request is honoured or refused by name ([`HONOURED`], [`REFUSED`],
//!   [`EMBEDDING_FIELDS`]): nothing is silently ignored.
//! - `POST /v1/embeddings`: vectors from an embedding model, as floats or base64.
//!
//! Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

mod grammar;
mod logprobs;
mod tools;

use base64::Engine;
use logprobs::Asked;
use serde::Deserialize;
use serde_json::{json, Value};
use tensorlet_sdk::http::{Request, Response};
use tensorlet_sdk::llm::{self, Generation, Message, Options, TokenLogprob};
use tensorlet_sdk::nn::{ErrorCode, NnError};

/// Largest `max_tokens` accepted, before the model's own context limit applies.
const MAX_TOKENS_LIMIT: u32 = 4096;
/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: u32 = 8;
/// Most alternatives per token: `top_logprobs` of a chat, `logprobs` of a completion (OpenAI's
/// bounds).
const MAX_CHAT_TOP_LOGPROBS: u32 = 20;
const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// The (chat) completion request fields this component honours (`user`, an end-user id for
/// the caller's own records, is accepted and has no effect on the answer).
const HONOURED: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_p",
    "logprobs",
    "top_logprobs",
    "seed",
    "stop",
    "n",
    "user",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logit_bias",
    "echo",
];

/// The fields OpenAI documents that this component does not honour: refused by name unless
/// they ask for what happens anyway (absent, `null`, `false`, `0`, empty, `"none"` or
/// `"auto"` tool choice without tools).
const REFUSED: &[&str] = &[
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "service_tier",
    "store",
    "metadata",
    "best_of",
    "suffix",
];

/// The embeddings request fields: honoured (`user` is accepted and has no effect), then
/// refused unless they ask for the default (`dimensions`: the model's vectors are not
/// truncated).
const EMBEDDING_FIELDS: (&[&str], &[&str]) = (
    &["model", "input", "encoding_format", "user"],
    &["dimensions"],
);

/// Whether a refused field's value asks only for what this component does anyway.
fn asks_for_the_default(field: &str, value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Number(number) => {
            number.as_f64() == Some(0.0) || (field == "best_of" && number.as_f64() == Some(1.0))
        }
        Value::String(text) => match field {
            "tool_choice" => text == "none" || text == "auto",
            "service_tier" => text == "auto" || text == "default",
            _ => text.is_empty(),
        },
        Value::Array(items) => items.is_empty(),
        Value::Object(object) => object.is_empty(),
        Value::Bool(true) => false,
    }
}

/// Refuses, by name, a field this component would otherwise ignore: one OpenAI documents and
/// this component does not honour (`refused`, unless it asks for the default), or one OpenAI
/// does not document.
fn refuse_unhonoured_fields(
    body: &Value,
    (honoured, refused): (&[&str], &[&str]),
) -> Result<(), Response> {
    let Some(fields) = body.as_object() else {
        return Err(openai_error(
            400,
            "invalid_request_error",
            "invalid_json",
            None,
            "The request body must be a JSON object",
        ));
    };
    for (field, value) in fields {
        if honoured.contains(&field.as_str()) {
            continue;
        }
        let message = if refused.contains(&field.as_str()) {
            if asks_for_the_default(field, value) {
                continue;
            }
            format!("`{field}` is not supported by this server: leave it out")
        } else {
            format!("Unrecognized request argument supplied: {field}")
        };
        return Err(openai_error(
            400,
            "invalid_request_error",
            "unsupported_parameter",
            Some(field),
            &message,
        ));
    }
    Ok(())
}

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
    messages: Option<Vec<Value>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    min_p: Option<f32>,
    /// A chat's `true`, or a completion's number of alternatives.
    #[serde(default)]
    logprobs: Option<Value>,
    top_logprobs: Option<u32>,
    #[serde(default)]
    logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    #[serde(default)]
    echo: bool,
    seed: Option<u32>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
}

/// `response_format`: its `type`, and for `json_schema` the schema.
#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<JsonSchemaFormat>,
}

/// `response_format.json_schema`: the schema (its `name` and `strict` change nothing here:
/// the answer always follows the schema).
#[derive(Deserialize)]
struct JsonSchemaFormat {
    #[serde(default)]
    schema: Option<Value>,
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
    serde_json::from_slice(&request.body).map_err(|e| invalid_body(&e))
}

fn invalid_body(error: &serde_json::Error) -> Response {
    openai_error(
        400,
        "invalid_request_error",
        "invalid_json",
        None,
        &format!("Invalid request body: {error}"),
    )
}

/// OpenAI's 400 answer for a value of `param` out of its range.
fn invalid_value(param: &str, message: &str) -> Response {
    openai_error(
        400,
        "invalid_request_error",
        "invalid_value",
        Some(param),
        message,
    )
}

/// Chat or text completion: `chat` picks the request and answer shapes.
fn complete(request: &Request, chat: bool) -> Response {
    let body: Value = match parse_body(request) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if let Err(response) = refuse_unhonoured_fields(&body, (HONOURED, REFUSED)) {
        return response;
    }
    let body: CompletionRequest = match serde_json::from_value(body) {
        Ok(body) => body,
        Err(error) => return invalid_body(&error),
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
    for (param, value) in [
        ("max_tokens", body.max_tokens),
        ("max_completion_tokens", body.max_completion_tokens),
    ] {
        if let Some(value) = value.filter(|n| !(1..=MAX_TOKENS_LIMIT).contains(n)) {
            let message = format!("{param} must be between 1 and {MAX_TOKENS_LIMIT}, not {value}");
            return invalid_value(param, &message);
        }
    }
    let choices = body.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&choices) {
        return invalid_value(
            "n",
            &format!("n must be between 1 and {MAX_CHOICES}, not {choices}"),
        );
    }
    for (param, value, range) in [
        ("presence_penalty", body.presence_penalty, -2.0..=2.0),
        ("frequency_penalty", body.frequency_penalty, -2.0..=2.0),
        ("min_p", body.min_p, 0.0..=1.0),
    ] {
        if let Some(value) = value.filter(|v| !range.contains(v)) {
            let message = format!(
                "{param} must be between {} and {}, not {value}",
                range.start(),
                range.end()
            );
            return invalid_value(param, &message);
        }
    }
    let asked = match logprobs_asked(chat, body.logprobs.as_ref(), body.top_logprobs) {
        Ok(asked) => asked,
        Err(response) => return response,
    };
    if chat && body.echo {
        return openai_error(
            400,
            "invalid_request_error",
            "unsupported_parameter",
            Some("echo"),
            "Unrecognized request argument supplied: echo",
        );
    }
    if body.echo && asked != Asked::No {
        return invalid_value(
            "echo",
            "echo with logprobs would need the prompt's log-probabilities, which are not computed",
        );
    }
    let mut logit_bias = std::collections::BTreeMap::new();
    for (token, bias) in body.logit_bias.unwrap_or_default() {
        match token.parse::<i32>() {
            Ok(id) if id >= 0 && (-100.0..=100.0).contains(&bias) => {
                logit_bias.insert(id, bias);
            }
            _ => {
                return invalid_value(
                    "logit_bias",
                    &format!(
                    "logit_bias maps token ids to biases from -100 to 100, not {token:?}: {bias}"
                ),
                )
            }
        }
    }
    if let (false, Some(field)) = (
        chat,
        [("tools", &body.tools), ("tool_choice", &body.tool_choice)]
            .into_iter()
            .find_map(|(field, value)| value.is_some().then_some(field)),
    ) {
        return openai_error(
            400,
            "invalid_request_error",
            "unsupported_parameter",
            Some(field),
            &format!("Unrecognized request argument supplied: {field}"),
        );
    }
    let offer = match tools::offer(
        body.tools.as_ref(),
        body.tool_choice.as_ref(),
        body.parallel_tool_calls,
    ) {
        Ok(offer) => offer,
        Err((param, message)) => return invalid_value(param, &message),
    };
    let tool_grammar = match offer.as_ref().and_then(tools::Offer::grammar) {
        Some(Ok(grammar)) => Some(grammar),
        Some(Err(why)) => {
            return invalid_value("tools", &format!("a function's parameters: {why}"))
        }
        None => None,
    };
    let grammar = match body.response_format.as_ref().map(|f| (f.kind.as_str(), f)) {
        None | Some(("text", _)) => None,
        Some(("json_object", _)) => Some(grammar::json_object()),
        Some(("json_schema", format)) => {
            let schema = format.json_schema.as_ref().and_then(|f| f.schema.clone());
            match grammar::json_schema(&schema.unwrap_or(Value::Bool(true))) {
                Ok(grammar) => Some(grammar),
                Err(why) => {
                    return invalid_value(
                        "response_format",
                        &format!("response_format.json_schema: {why}"),
                    )
                }
            }
        }
        Some((other, _)) => {
            return invalid_value(
                "response_format",
                &format!(
                    "response_format type must be text, json_object or json_schema, not {other:?}"
                ),
            )
        }
    };
    let grammar = match (tool_grammar, grammar) {
        (Some(_), Some(_)) => {
            return invalid_value(
                "response_format",
                "a structured response_format cannot be combined with a required tool call",
            )
        }
        (tools, format) => tools.or(format),
    };
    let options = Options {
        grammar,
        // The current name wins over the older one when a client sends both.
        max_tokens: Some(
            body.max_completion_tokens
                .or(body.max_tokens)
                .unwrap_or(256),
        ),
        temperature: body.temperature,
        top_p: body.top_p,
        top_k: body.top_k,
        repeat_penalty: body.repetition_penalty,
        min_p: body.min_p,
        presence_penalty: body.presence_penalty,
        frequency_penalty: body.frequency_penalty,
        logit_bias,
        logprobs: match asked {
            Asked::No => None,
            Asked::Yes { alternatives } => Some(alternatives),
        },
        seed: body.seed,
        stop: match body.stop {
            Some(Stop::One(stop)) => vec![stop],
            Some(Stop::Many(stops)) => stops,
            None => Vec::new(),
        },
        chunk_tokens: (!body.stream).then_some(MAX_TOKENS_LIMIT),
    };
    let input = match (chat, body.messages, body.prompt) {
        (true, Some(messages), _) => match offer {
            Some(offer) => Input::ToolChat(messages, offer),
            None => match plain_messages(messages) {
                Ok(messages) => Input::Chat(messages),
                Err(response) => return response,
            },
        },
        (false, _, Some(prompt)) => Input::Prompt(prompt),
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
    let choices = Choices {
        model: body.model,
        input,
        options,
        count: choices,
        logprobs: asked,
        echo: body.echo,
    };
    // Run the first step before answering, so that a bad prompt is an HTTP error, not a
    // broken stream.
    let (generation, first) = match choices.start(0) {
        Ok(started) => started,
        // The model refuses tools its template has no place for, or token ids past its
        // vocabulary: say which field.
        Err(error) if matches!(error.code, ErrorCode::InvalidArgument) => {
            match ["tools", "logit_bias"]
                .into_iter()
                .find(|f| error.message.contains(f))
            {
                Some(field) => return invalid_value(field, &error.message),
                None => return nn_error(&error, &choices.model),
            }
        }
        Err(error) => return nn_error(&error, &choices.model),
    };
    let shape = Shape {
        chat,
        id: completion_id(if chat { "chatcmpl" } else { "cmpl" }),
        created: now(),
        model: choices.model.clone(),
    };
    if body.stream {
        let include_usage = body.stream_options.unwrap_or_default().include_usage;
        Response::server_sent_events(Events::new(
            shape,
            choices,
            generation,
            first,
            include_usage,
        ))
    } else {
        let mut answers = Vec::new();
        let mut totals = Totals::default();
        let mut started = Some((generation, first));
        for index in 0..choices.count {
            let (mut generation, first) =
                match started.take().map_or_else(|| choices.start(index), Ok) {
                    Ok(started) => started,
                    Err(error) => return nn_error(&error, &shape.model),
                };
            let mut text = first.unwrap_or_default();
            for chunk in &mut generation {
                match chunk {
                    Ok(chunk) => text.push_str(&chunk),
                    Err(error) => return nn_error(&error, &shape.model),
                }
            }
            totals.add(&generation);
            let logprobs = choices.logprobs_json(generation.take_logprobs(), &mut choices.offset());
            answers.push(choices.answer(&text, generation.finish_reason(), logprobs));
        }
        Response::json(200, &shape.whole(&answers, &totals))
    }
}

/// What `logprobs` and `top_logprobs` ask for: a chat's `logprobs: true` with 0 to 20
/// alternatives, or a completion's `logprobs: 0` to `5` alternatives.
fn logprobs_asked(
    chat: bool,
    logprobs: Option<&Value>,
    top_logprobs: Option<u32>,
) -> Result<Asked, Response> {
    if !chat {
        if top_logprobs.is_some() {
            return Err(openai_error(
                400,
                "invalid_request_error",
                "unsupported_parameter",
                Some("top_logprobs"),
                "Unrecognized request argument supplied: top_logprobs",
            ));
        }
        return match logprobs {
            None | Some(Value::Null) => Ok(Asked::No),
            Some(value) => match value
                .as_u64()
                .filter(|n| *n <= u64::from(MAX_COMPLETION_LOGPROBS))
            {
                Some(alternatives) => Ok(Asked::Yes {
                    alternatives: alternatives as u32,
                }),
                None => Err(invalid_value(
                    "logprobs",
                    &format!("logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}"),
                )),
            },
        };
    }
    let wanted = match logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(wanted)) => *wanted,
        Some(_) => return Err(invalid_value("logprobs", "logprobs must be a boolean")),
    };
    match (wanted, top_logprobs) {
        (_, Some(top)) if top > MAX_CHAT_TOP_LOGPROBS => Err(invalid_value(
            "top_logprobs",
            &format!("top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}, not {top}"),
        )),
        (false, Some(top)) if top > 0 => Err(invalid_value(
            "top_logprobs",
            "top_logprobs requires logprobs to be true",
        )),
        (false, _) => Ok(Asked::No),
        (true, top) => Ok(Asked::Yes {
            alternatives: top.unwrap_or(0),
        }),
    }
}

/// Chat messages without tools: each a role and its text (a string, or a list of text
/// parts, joined).
fn plain_messages(messages: Vec<Value>) -> Result<Vec<Message>, Response> {
    let text = |content: &Value| match content {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|part| {
                (part["type"] == "text")
                    .then(|| part["text"].as_str())
                    .flatten()
            })
            .collect::<Option<Vec<&str>>>()
            .map(|parts| parts.concat()),
        _ => None,
    };
    messages
        .iter()
        .map(|message| {
            Some(Message {
                role: message["role"].as_str()?.to_string(),
                content: text(&message["content"])?,
            })
        })
        .collect::<Option<Vec<Message>>>()
        .ok_or_else(|| {
            invalid_value(
                "messages",
                "each message needs a role and text content (tool calls and results need `tools`)",
            )
        })
}

/// One choice of a whole (not streamed) answer: its text (none when it only calls tools), its
/// tool calls, why it ended and its log-probabilities.
struct Answer {
    content: Option<String>,
    tool_calls: Vec<Value>,
    finish: String,
    logprobs: Value,
}

/// What a completion continues: chat messages, chat messages offered tools, or a prompt.
enum Input {
    Chat(Vec<Message>),
    ToolChat(Vec<Value>, tools::Offer),
    Prompt(String),
}

/// The `n` choices of one request: each generated from the same input, one after another.
struct Choices {
    model: String,
    input: Input,
    options: Options,
    count: u32,
    logprobs: Asked,
    /// Completions: each choice's text starts with the prompt.
    echo: bool,
}

impl Choices {
    /// Whether answers are read for tool calls: whole, so a stream sends each choice at once.
    fn reads_tool_calls(&self) -> bool {
        matches!(&self.input, Input::ToolChat(_, offer) if offer.choice != tools::Choice::None)
    }

    /// A choice's answer from its whole `text`: with tools, the calls read from it, and the
    /// finish reason `tool_calls` when there are any (`length` still when the answer was cut).
    fn answer(&self, text: &str, finish: Option<&str>, logprobs: Value) -> Answer {
        let (content, tool_calls) = match &self.input {
            Input::ToolChat(_, offer) => offer.read(text, || completion_id("call")),
            _ => (Some(text.to_string()), Vec::new()),
        };
        let finish = match (tool_calls.is_empty(), finish) {
            (false, Some("length")) => "length",
            (false, _) => "tool_calls",
            (true, finish) => finish.unwrap_or("stop"),
        };
        Answer {
            content,
            tool_calls,
            finish: finish.to_string(),
            logprobs,
        }
    }

    /// Where a choice's text starts, for a completion's `text_offset`: after the prompt.
    fn offset(&self) -> usize {
        match &self.input {
            Input::Chat(_) | Input::ToolChat(..) => 0,
            Input::Prompt(prompt) => prompt.chars().count(),
        }
    }

    /// The `logprobs` of a choice's `tokens` (`null` unless asked for), in the shape of the
    /// request's API; `offset` is where they start in the text.
    fn logprobs_json(&self, tokens: Vec<TokenLogprob>, offset: &mut usize) -> Value {
        match (self.logprobs, &self.input) {
            (Asked::No, _) => Value::Null,
            (Asked::Yes { .. }, Input::Chat(_) | Input::ToolChat(..)) => logprobs::chat(&tokens),
            (Asked::Yes { .. }, Input::Prompt(_)) => logprobs::completion(&tokens, offset),
        }
    }

    /// Starts choice `index` and runs its first step. A seeded request gives each choice its
    /// own seed (the seed plus the index), so that choices differ where sampling allows.
    fn start(&self, index: u32) -> Result<(Generation, Option<String>), NnError> {
        let mut options = self.options.clone();
        options.seed = options.seed.map(|seed| seed.wrapping_add(index));
        let mut generation = match &self.input {
            Input::Chat(messages) => llm::chat(&self.model, messages, &options)?,
            Input::ToolChat(messages, offer) => {
                llm::chat_with_tools(&self.model, messages, &offer.tools, &options)?
            }
            Input::Prompt(prompt) => llm::generate(&self.model, prompt, &options)?,
        };
        let mut first = generation.next().transpose()?;
        if let (true, Input::Prompt(prompt)) = (self.echo, &self.input) {
            first = Some(format!("{prompt}{}", first.unwrap_or_default()));
        }
        Ok((generation, first))
    }
}

/// Token counts over a request's choices: the prompt once, every choice's completion.
#[derive(Default)]
struct Totals {
    prompt_tokens: u32,
    completion_tokens: u32,
}

impl Totals {
    fn add(&mut self, generation: &Generation) {
        let usage = generation.usage();
        self.prompt_tokens = usage.prompt_tokens;
        self.completion_tokens += usage.completion_tokens;
    }

    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// How answers of one request look.
struct Shape {
    chat: bool,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    /// The whole answer: each choice's text, finish reason and log-probabilities, and the
    /// token counts.
    fn whole(&self, answers: &[Answer], totals: &Totals) -> Value {
        let choices: Vec<Value> = answers
            .iter()
            .enumerate()
            .map(|(index, answer)| {
                let (finish, logprobs) = (&answer.finish, &answer.logprobs);
                if self.chat {
                    let mut message = json!({ "role": "assistant", "content": answer.content });
                    if !answer.tool_calls.is_empty() {
                        message["tool_calls"] = json!(answer.tool_calls);
                    }
                    json!({ "index": index, "message": message, "finish_reason": finish, "logprobs": logprobs })
                } else {
                    let text = answer.content.as_deref().unwrap_or("");
                    json!({ "index": index, "text": text, "finish_reason": finish, "logprobs": logprobs })
                }
            })
            .collect();
        let object = if self.chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices, "usage": totals.json() })
    }

    /// A streamed chunk of choice `index`: a piece of its text, or its finish reason, with
    /// the log-probabilities of the tokens since the last chunk.
    fn chunk(
        &self,
        index: u32,
        text: Option<&str>,
        finish: Option<&str>,
        logprobs: Value,
    ) -> Value {
        let choice = if self.chat {
            let delta = match text {
                Some(text) => json!({ "role": "assistant", "content": text }),
                None => json!({}),
            };
            json!({ "index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs })
        } else {
            json!({ "index": index, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": logprobs })
        };
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice] })
    }
}

/// The server-sent events of a streamed completion: for each choice in turn a chunk per piece
/// of text and a last chunk with its finish reason; optionally the usage; then `[DONE]`.
struct Events {
    shape: Shape,
    choices: Choices,
    /// The choice being streamed, and its generation (its first step already run).
    index: u32,
    generation: Generation,
    first: Option<String>,
    /// Where the current choice's next token starts in its text (for completions'
    /// `text_offset`).
    offset: usize,
    totals: Totals,
    include_usage: bool,
    stage: Stage,
    /// An event to send before any other: the error of a choice that did not start.
    pending: Option<String>,
    /// Once a choice read for tool calls was sent whole: its finish reason, for the next
    /// chunk.
    read_finish: Option<String>,
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
        choices: Choices,
        generation: Generation,
        first: Option<String>,
        include_usage: bool,
    ) -> Self {
        Self {
            shape,
            offset: choices.offset(),
            choices,
            index: 0,
            generation,
            first,
            totals: Totals::default(),
            include_usage,
            stage: Stage::Text,
            pending: None,
            read_finish: None,
        }
    }

    fn failed(&mut self, error: &NnError) -> String {
        self.stage = Stage::Done;
        json!({ "error": { "message": error.message, "type": "server_error", "param": null, "code": "inference_failed" } }).to_string()
    }

    /// The finish chunk of the current choice; then the next choice starts, or the stream
    /// goes on to its end.
    fn finish_choice(&mut self) -> String {
        self.totals.add(&self.generation);
        let finish = self.read_finish.take().unwrap_or_else(|| {
            self.generation
                .finish_reason()
                .unwrap_or("stop")
                .to_string()
        });
        let logprobs = self.logprobs_since_last_chunk();
        let chunk = self
            .shape
            .chunk(self.index, None, Some(&finish), logprobs)
            .to_string();
        if self.index + 1 < self.choices.count {
            match self.choices.start(self.index + 1) {
                Ok((generation, first)) => {
                    self.index += 1;
                    self.generation = generation;
                    self.first = first;
                    self.offset = self.choices.offset();
                }
                Err(error) => self.pending = Some(self.failed(&error)),
            }
        } else {
            self.stage = if self.include_usage {
                Stage::Usage
            } else {
                Stage::Done
            };
        }
        chunk
    }

    /// The current choice whole, read for tool calls: one chunk with its text and its calls.
    fn whole_choice(&mut self) -> String {
        let mut text = self.first.take().unwrap_or_default();
        for chunk in &mut self.generation {
            match chunk {
                Ok(chunk) => text.push_str(&chunk),
                Err(error) => return self.failed(&error),
            }
        }
        let logprobs = self.logprobs_since_last_chunk();
        let answer = self
            .choices
            .answer(&text, self.generation.finish_reason(), logprobs.clone());
        let mut delta = json!({ "role": "assistant", "content": answer.content });
        if !answer.tool_calls.is_empty() {
            let calls: Vec<Value> = answer
                .tool_calls
                .iter()
                .enumerate()
                .map(|(index, call)| {
                    let mut call = call.clone();
                    call["index"] = json!(index);
                    call
                })
                .collect();
            delta["tool_calls"] = json!(calls);
        }
        self.read_finish = Some(answer.finish);
        let mut chunk = self.shape.chunk(self.index, None, None, logprobs);
        chunk["choices"][0]["delta"] = delta;
        chunk.to_string()
    }

    /// The `logprobs` of the current choice's tokens since its last chunk.
    fn logprobs_since_last_chunk(&mut self) -> Value {
        let tokens = self.generation.take_logprobs();
        self.choices.logprobs_json(tokens, &mut self.offset)
    }
}

impl Iterator for Events {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if let Some(event) = self.pending.take() {
            return Some(event);
        }
        match self.stage {
            Stage::Text if self.read_finish.is_some() => Some(self.finish_choice()),
            Stage::Text if self.choices.reads_tool_calls() => Some(self.whole_choice()),
            Stage::Text => {
                let next = match self.first.take() {
                    Some(text) => Some(Ok(text)),
                    None => self.generation.next(),
                };
                match next {
                    Some(Ok(text)) => {
                        let logprobs = self.logprobs_since_last_chunk();
                        let chunk = self.shape.chunk(self.index, Some(&text), None, logprobs);
                        Some(chunk.to_string())
                    }
                    Some(Err(error)) => Some(self.failed(&error)),
                    None => Some(self.finish_choice()),
                }
            }
            Stage::Usage => {
                self.stage = Stage::Done;
                let mut chunk = self.shape.chunk(0, None, None, Value::Null);
                chunk["choices"] = json!([]);
                chunk["usage"] = self.totals.json();
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
    let body: Value = match parse_body(request) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if let Err(response) = refuse_unhonoured_fields(&body, EMBEDDING_FIELDS) {
        return response;
    }
    let body: EmbeddingRequest = match serde_json::from_value(body) {
        Ok(body) => body,
        Err(error) => return invalid_body(&error),
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
