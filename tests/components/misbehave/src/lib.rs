//! Test fixture: an app that misbehaves on request, so the end-to-end tests can check that the
//! node contains each failure to the one request.
//!
//! - `/trap`: panics (a wasm trap).
//! - `/loop`: never returns.
//! - `/membomb`: allocates until memory runs out.
//! - `/tensor-bomb`: creates wasi-nn tensors (host memory) in a loop and keeps them.
//! - `/nn-missing`: loads a model that does not exist and reports the wasi-nn error code.
//! - `/infer?model=M&iterations=N`: runs model M (input `x`, zeros [1,3,48,192]) N times.
//! - `POST /nn-load?target=cpu|gpu`: loads the ONNX model in the body through wasi-nn `load`
//!   and runs it once on zeros; reports the output count or the wasi-nn error code.

use tensorlet_sdk::http::{Request, Response};
use tensorlet_sdk::nn::{ExecutionTarget, Graph, GraphEncoding, Tensor};

fn handle(request: Request) -> Response {
    match request.path() {
        "/trap" => panic!("misbehave: deliberate trap"),
        "/loop" => {
            let mut counter = 0u64;
            loop {
                counter = std::hint::black_box(counter.wrapping_add(1));
            }
        }
        "/membomb" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "/tensor-bomb" => {
            // Host-side tensors of 1 MiB each, kept until the host says no.
            use tensorlet_sdk::bindings::wasi::nn::tensor;
            let data = vec![0u8; 1 << 20];
            let mut hoard = Vec::new();
            loop {
                hoard.push(tensor::Tensor::new(
                    &[1 << 18],
                    tensor::TensorType::Fp32,
                    &data,
                ));
            }
        }
        "/nn-missing" => match Graph::by_name("no-such-model") {
            Ok(_) => Response::error(500, "unexpected", "a missing model loaded"),
            Err(error) => Response::json(
                200,
                &serde_json::json!({ "code": format!("{:?}", error.code), "message": error.message }),
            ),
        },
        "/infer" => {
            let model = request.query("model").unwrap_or("text-orientation");
            let iterations: u32 = request
                .query("iterations")
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            let graph = match Graph::by_name(model) {
                Ok(graph) => graph,
                Err(error) => return Response::error(500, "model_error", &error.to_string()),
            };
            let context = match graph.context() {
                Ok(context) => context,
                Err(error) => return Response::error(500, "model_error", &error.to_string()),
            };
            for _ in 0..iterations {
                let input = Tensor::from_f32(&[1, 3, 48, 192], &vec![0.0; 3 * 48 * 192]);
                if let Err(error) = context.compute(vec![("x".to_string(), input)]) {
                    return Response::error(500, "inference_failed", &error.to_string());
                }
            }
            Response::json(200, &serde_json::json!({ "iterations": iterations }))
        }
        "/nn-load" => {
            let target = match request.query("target") {
                Some("gpu") => ExecutionTarget::Gpu,
                _ => ExecutionTarget::Cpu,
            };
            let input = Tensor::from_f32(&[1, 3, 48, 192], &vec![0.0; 3 * 48 * 192]);
            let outcome = Graph::from_bytes(&request.body, GraphEncoding::Onnx, target)
                .and_then(|graph| graph.compute(vec![("x".into(), input)]));
            match outcome {
                Ok(outputs) => {
                    Response::json(200, &serde_json::json!({ "outputs": outputs.len() }))
                }
                Err(error) => Response::json(
                    200,
                    &serde_json::json!({ "code": format!("{:?}", error.code), "message": error.message }),
                ),
            }
        }
        _ => Response::error(
            404,
            "not_found",
            "routes: /trap /loop /membomb /tensor-bomb /nn-missing /infer /nn-load",
        ),
    }
}

tensorlet_sdk::http_handler!(handle);
