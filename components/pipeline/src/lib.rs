//! pipeline: a zero-shot text classifier composed from two apps, to show composition through
//! `wasi:http` (one app calling another on the same node) and settings through `wasi:config`.
//!
//! `POST /` with `{"text": "...", "labels": ["sports", "cooking"]}` answers
//! `{"label": "cooking", "scores": [{"label": "cooking", "score": 0.61}, ...]}`, scores sorted
//! best first. The component has no model of its own: it asks the embeddings app (by default
//! the `openai` example, `components/openai`) for vectors of the text and of each label over
//! `http://<app>.internal/v1/embeddings`, and picks the label whose vector is closest (cosine
//! similarity) to the text's.
//!
//! Its manifest names the app and model it uses and allows the call:
//!
//! ```toml
//! [config]
//! embeddings_app = "openai"    # the default
//! embeddings_model = "minilm"  # the default
//!
//! [outbound]
//! allowed_hosts = ["openai.internal"]
//! ```
//!
//! Errors: a body that is not that JSON, or no labels, is 400; a failing embeddings call is 502
//! with the reason.

use serde::{Deserialize, Serialize};
use serde_json::json;
use tensorlet_sdk::config;
use tensorlet_sdk::http::{ClientRequest, Request, Response};

/// The embeddings app handles at most 256 texts in one request: the text and 255 labels.
const MAX_LABELS: usize = 255;

#[derive(Deserialize)]
struct ClassifyRequest {
    text: String,
    labels: Vec<String>,
}

#[derive(Serialize)]
struct Score {
    label: String,
    score: f32,
}

/// The part of an OpenAI embeddings answer this app reads.
#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<Embedding>,
}

#[derive(Deserialize)]
struct Embedding {
    index: usize,
    embedding: Vec<f32>,
}

fn handle(request: Request) -> Response {
    match (request.method.as_str(), request.path()) {
        ("POST", "/") => classify(&request),
        _ => Response::error(
            404,
            "not_found",
            "POST / with {\"text\": \"...\", \"labels\": [\"...\", ...]}",
        ),
    }
}

fn classify(request: &Request) -> Response {
    let body: ClassifyRequest = match request.json() {
        Ok(body) => body,
        Err(response) => return response,
    };
    if body.labels.is_empty() {
        return Response::error(400, "no_labels", "give at least one label in `labels`");
    }
    if body.labels.len() > MAX_LABELS {
        let message = format!(
            "give at most {MAX_LABELS} labels, not {}",
            body.labels.len()
        );
        return Response::error(400, "too_many_labels", &message);
    }
    let mut texts = vec![body.text.as_str()];
    texts.extend(body.labels.iter().map(String::as_str));
    let vectors = match embed(&texts) {
        Ok(vectors) => vectors,
        Err(reason) => return Response::error(502, "embeddings_failed", &reason),
    };
    let (text, labels) = vectors.split_first().expect("one vector per text");
    let mut scores: Vec<Score> = body
        .labels
        .into_iter()
        .zip(labels)
        .map(|(label, vector)| Score {
            label,
            score: cosine(text, vector),
        })
        .collect();
    scores.sort_by(|a, b| b.score.total_cmp(&a.score));
    Response::json(200, &json!({ "label": scores[0].label, "scores": scores }))
}

/// One vector per text, in order, from the embeddings app named in the config.
fn embed(texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
    let app = config::get("embeddings_app").unwrap_or_else(|| "openai".into());
    let model = config::get("embeddings_model").unwrap_or_else(|| "minilm".into());
    let url = format!("http://{app}.internal/v1/embeddings");
    let response = ClientRequest::post(&url)
        .with_json(&json!({ "model": model, "input": texts }))
        .send()
        .map_err(|error| error.to_string())?;
    if !response.is_success() {
        // OpenAI's error shape, `{"error": {"message": ...}}`, else the body as it is.
        let reason = response
            .json::<serde_json::Value>()
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| response.text());
        return Err(format!(
            "the embeddings app {app:?} answered {}: {reason}",
            response.status
        ));
    }
    let mut answer: EmbeddingsResponse = response
        .json()
        .map_err(|error| format!("the embeddings app {app:?}: {error}"))?;
    answer.data.sort_by_key(|embedding| embedding.index);
    if answer.data.len() != texts.len() {
        return Err(format!(
            "the embeddings app {app:?} returned {} vectors for {} texts",
            answer.data.len(),
            texts.len()
        ));
    }
    Ok(answer.data.into_iter().map(|e| e.embedding).collect())
}

/// Cosine similarity of two vectors: 1 for the same direction, 0 when unrelated (or empty).
fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let norms = norm(a) * norm(b);
    if norms > 0.0 {
        dot / norms
    } else {
        0.0
    }
}

tensorlet_sdk::http_handler!(handle);
