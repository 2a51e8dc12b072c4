//! classify: an image model through wasi-nn, loaded by name and shared by every instance.
//!
//! The model is PP-OCR's text-orientation classifier (input `x`: f32 [N, 3, 48, 192], output:
//! the probabilities of "0°" and "180°"), registered on the node as `text-orientation`.
//! The component does what an app around a model does: it turns the client's pixels into the
//! model's input (normalisation to [-1, 1], HWC → CHW) and the model's output into an answer.
//!
//! `POST /apps/classify/` with `{"pixels": [r, g, b, r, g, b, …]}` (48 × 192 RGB bytes, row by
//! row) answers `{"label": "0", "class": 0, "scores": [0.98, 0.02]}`.
//! `?model=NAME` picks another registered model of the same shape.

use serde::Deserialize;
use tensorlet_sdk::http::{Request, Response};
use tensorlet_sdk::nn::{ErrorCode, Graph, TensorView};

/// Input height and width of the model.
pub const HEIGHT: usize = 48;
pub const WIDTH: usize = 192;
const LABELS: [&str; 2] = ["0", "180"];

#[derive(Deserialize)]
struct ClassifyRequest {
    pixels: Vec<u8>,
}

/// RGB bytes, row-major HWC, to the model's normalised CHW floats.
fn to_input(pixels: &[u8]) -> Vec<f32> {
    let mut input = vec![0f32; 3 * HEIGHT * WIDTH];
    for (i, rgb) in pixels.chunks_exact(3).enumerate() {
        for (channel, value) in rgb.iter().enumerate() {
            input[channel * HEIGHT * WIDTH + i] = (f32::from(*value) / 255.0 - 0.5) / 0.5;
        }
    }
    input
}

fn handle(request: Request) -> Response {
    if request.method != "POST" {
        return Response::error(
            405,
            "method_not_allowed",
            "POST {\"pixels\": [...]} with 48x192 RGB bytes",
        );
    }
    let body: ClassifyRequest = match request.json() {
        Ok(body) => body,
        Err(response) => return response,
    };
    if body.pixels.len() != HEIGHT * WIDTH * 3 {
        let message = format!(
            "pixels must hold {HEIGHT}x{WIDTH} RGB bytes ({}), not {}",
            HEIGHT * WIDTH * 3,
            body.pixels.len()
        );
        return Response::error(400, "bad_image", &message);
    }
    let model = request.query("model").unwrap_or("text-orientation");
    let graph = match Graph::by_name(model) {
        Ok(graph) => graph,
        Err(error) if error.code == ErrorCode::NotFound => {
            return Response::error(404, "model_not_found", &error.message)
        }
        Err(error) => return Response::error(500, "model_error", &error.to_string()),
    };
    let input = to_input(&body.pixels);
    let shape = [1, 3, HEIGHT as u32, WIDTH as u32];
    let outputs = match graph.compute_views(&[("x", TensorView::f32(&shape, &input))]) {
        Ok(outputs) => outputs,
        Err(error) => return Response::error(500, "inference_failed", &error.to_string()),
    };
    let Some(scores) = outputs.first().and_then(|(_, tensor)| tensor.to_f32()) else {
        return Response::error(500, "inference_failed", "the model returned no f32 output");
    };
    let class = scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(index, _)| index);
    Response::json(
        200,
        &serde_json::json!({ "label": LABELS.get(class).copied().unwrap_or("?"), "class": class, "scores": scores }),
    )
}

tensorlet_sdk::http_handler!(handle);
