//! Test fixture: an app that misbehaves on request, so the end-to-end tests can check that the
//! node contains each failure to the one request, and that reports what the node's
//! capabilities (config, outgoing HTTP, clocks) give it.
//!
//! - `/trap`: panics (a wasm trap).
//! - `/trap-after-head`: answers 200, sends one chunk of its body, then panics.
//! - `/loop`: never returns.
//! - `/membomb`: allocates until memory runs out.
//! - `/tensor-bomb`: creates wasi-nn tensors (host memory) in a loop and keeps them.
//! - `/nn-missing`: loads a model that does not exist and reports the wasi-nn error code.
//! - `/infer?model=M&iterations=N`: runs model M N times on one prepared input `x` (zeros
//!   [1,3,48,192], lent to each compute without a copy in the guest).
//! - `POST /nn-load?target=cpu|gpu`: loads the ONNX model in the body through wasi-nn `load`
//!   and runs it once on zeros; reports the output count or the wasi-nn error code.
//! - `/config?key=K`: 200 with the value of config key K as text, or 404 `absent`.
//! - `/config-all`: 200 with every config pair as a JSON object.
//! - `/fetch?url=U`: `GET` of U (percent-encoded) through `tensorlet_sdk::http`; 200 with
//!   `status <code>\n<body>`, or 502 with the error's text.
//! - `/spin?ms=N`: burns CPU for N ms of the monotonic clock, then 200 `spun`.
//! - `/sleep?ms=N`: waits N ms on a monotonic-clock pollable (no CPU), then 200 `slept`.
//! - `/log?text=T`: writes T to stdout, to stderr and through `wasi:logging` (level warn,
//!   context `misbehave`), then 200 `logged`.
//! - `/flaky?key=K&fail=N`: counts its calls with key K (key-value); the first N answer 503,
//!   later ones 200 `ok after C calls`.
//! - `/order?id=I&fail=1`: a two-step workflow under lease `order-I`: step 1 reserves
//!   (`order/I` = `reserved`, `stock/I` = `1`, one atomic batch), step 2 charges (`order/I` =
//!   `charged`). With `fail=1` step 2 fails and the compensation deletes what step 1 wrote
//!   (one batch): 500 `compensated`. 409 `busy` while another instance holds the lease.
//! - `/kv?keys=A,B`: the values of keys A, B (bucket `orders`) as JSON (null when absent).
//! - `/lease?name=N&ttl=MS&hold=MS`: takes lease N for `ttl`, keeps it `hold` ms, 200 `held`;
//!   409 `busy` when another instance holds it.
//! - `/lease-trap?name=N`: takes lease N for a minute and traps.
//! - `/batch?keys=A,B,…`: sets every key (bucket `orders`) to `x` in one batch: 200 or 500
//!   with the error.
//! - `/send?queue=Q&text=T`: sends T to queue Q; 200 with the delivering job's id, or 500
//!   with the error.
//! - `/count`: how many requests this instance has served, this one included (1 unless the
//!   app reuses instances). `/count?leak=1` also leaves a response body it never finishes
//!   in the instance's resources (an instance that holds one must not be reused).
//! - `POST /queues/Q` (a queue message): stores `<body> from <producer>` at key
//!   `received/Q` (bucket `orders`), 200.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tensorlet_sdk::bindings::wasi::clocks::monotonic_clock;
use tensorlet_sdk::config;
use tensorlet_sdk::http::{Request, Response};
use tensorlet_sdk::kv::Bucket;
use tensorlet_sdk::lease;
use tensorlet_sdk::nn::{ExecutionTarget, Graph, GraphEncoding, Tensor, TensorView};

fn handle(request: Request) -> Response {
    match request.path() {
        "/trap" => panic!("misbehave: deliberate trap"),
        "/trap-after-head" => Response::stream(
            200,
            std::iter::once(b"partial".to_vec())
                .chain(std::iter::from_fn(|| panic!("misbehave: trap after the head"))),
        ),
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
            let zeros = vec![0.0; 3 * 48 * 192];
            let input = TensorView::f32(&[1, 3, 48, 192], &zeros);
            for _ in 0..iterations {
                if let Err(error) = context.compute_views(&[("x", input)]) {
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
        "/config" => {
            let Some(key) = request.query("key").map(percent_decode) else {
                return Response::error(400, "bad_request", "give ?key=K");
            };
            match config::get(&key) {
                Some(value) => Response::text(200, value),
                None => Response::text(404, "absent"),
            }
        }
        "/config-all" => {
            let pairs: serde_json::Map<String, serde_json::Value> = config::all()
                .into_iter()
                .map(|(key, value)| (key, value.into()))
                .collect();
            Response::json(200, &pairs)
        }
        "/fetch" => {
            let Some(url) = request.query("url").map(percent_decode) else {
                return Response::error(400, "bad_request", "give ?url=U (percent-encoded)");
            };
            match tensorlet_sdk::http::get(&url) {
                Ok(response) => Response::text(
                    200,
                    format!("status {}\n{}", response.status, response.text()),
                ),
                Err(error) => Response::text(502, error.to_string()),
            }
        }
        "/spin" => {
            let until = monotonic_clock::now().saturating_add(nanos(&request));
            let mut counter = 0u64;
            while monotonic_clock::now() < until {
                // Mostly guest code: the clock is read once every 10 000 steps.
                for _ in 0..10_000 {
                    counter = std::hint::black_box(counter.wrapping_add(1));
                }
            }
            Response::text(200, "spun")
        }
        "/sleep" => {
            // `times=K` sleeps K times (a request that mostly waits, in many short waits).
            let times: u32 = request
                .query("times")
                .and_then(|t| t.parse().ok())
                .unwrap_or(1);
            for _ in 0..times {
                monotonic_clock::subscribe_duration(nanos(&request)).block();
            }
            Response::text(200, "slept")
        }
        "/log" => {
            let text = percent_decode(request.query("text").unwrap_or_default());
            println!("{text}");
            eprintln!("{text}");
            tensorlet_sdk::log::log(tensorlet_sdk::log::Level::Warn, "misbehave", &text);
            Response::text(200, "logged")
        }
        "/flaky" => {
            let key = request.query("key").unwrap_or("flaky");
            let fail: i64 = request
                .query("fail")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let calls = tensorlet_sdk::kv::Bucket::open("flaky").and_then(|b| b.increment(key, 1));
            match calls {
                Ok(calls) if calls <= fail => {
                    Response::text(503, format!("failing (call {calls})"))
                }
                Ok(calls) => Response::text(200, format!("ok after {calls} calls")),
                Err(error) => Response::text(500, error.to_string()),
            }
        }
        "/order" => order(&request),
        "/count" => {
            static SERVED: AtomicU64 = AtomicU64::new(0);
            if request.query("leak") == Some("1") {
                use tensorlet_sdk::bindings::wasi::http::types::{Fields, OutgoingResponse};
                let response = OutgoingResponse::new(Fields::new());
                std::mem::forget(response.body());
                std::mem::forget(response);
            }
            Response::text(200, (SERVED.fetch_add(1, Ordering::Relaxed) + 1).to_string())
        }
        "/send" => {
            let queue = request.query("queue").unwrap_or_default();
            let text = percent_decode(request.query("text").unwrap_or_default());
            match tensorlet_sdk::queue::send(queue, text.as_bytes()) {
                Ok(id) => Response::text(200, id),
                Err(error) => Response::text(500, error),
            }
        }
        path if path.starts_with("/queues/") => {
            let queue = &path["/queues/".len()..];
            let producer = request.header("tensorlet-producer").unwrap_or_default();
            let text = format!("{} from {producer}", String::from_utf8_lossy(&request.body));
            match Bucket::open("orders").and_then(|b| b.set(&format!("received/{queue}"), text.as_bytes())) {
                Ok(()) => Response::text(200, "received"),
                Err(error) => Response::text(500, error.to_string()),
            }
        }
        "/kv" => {
            let keys: Vec<&str> = request
                .query("keys")
                .unwrap_or_default()
                .split(',')
                .collect();
            let values = Bucket::open("orders").and_then(|b| b.get_many(&keys));
            match values {
                Ok(values) => {
                    let map: serde_json::Map<String, serde_json::Value> = keys
                        .iter()
                        .zip(values)
                        .map(|(key, value)| {
                            let value = value.map_or(serde_json::Value::Null, |v| {
                                String::from_utf8_lossy(&v).into_owned().into()
                            });
                            (key.to_string(), value)
                        })
                        .collect();
                    Response::json(200, &serde_json::Value::Object(map))
                }
                Err(error) => Response::text(500, error.to_string()),
            }
        }
        "/lease" => {
            let name = request.query("name").unwrap_or("lease");
            let ttl = millis(&request, "ttl", 10_000);
            match lease::acquire(name, ttl) {
                Ok(Some(held)) => {
                    monotonic_clock::subscribe_duration(
                        millis(&request, "hold", 0).as_nanos() as u64
                    )
                    .block();
                    drop(held);
                    Response::text(200, "held")
                }
                Ok(None) => Response::text(409, "busy"),
                Err(error) => Response::text(400, error),
            }
        }
        "/lease-trap" => {
            let name = request.query("name").unwrap_or("lease");
            let _held = lease::acquire(name, Duration::from_secs(60));
            panic!("misbehave: trapping while holding lease {name}")
        }
        "/batch" => {
            let keys: Vec<&str> = request
                .query("keys")
                .unwrap_or_default()
                .split(',')
                .collect();
            let pairs: Vec<(&str, &[u8])> = keys.iter().map(|k| (*k, &b"x"[..])).collect();
            match Bucket::open("orders").and_then(|b| b.set_many(&pairs)) {
                Ok(()) => Response::text(200, "set"),
                Err(error) => Response::text(500, error.to_string()),
            }
        }
        _ => Response::error(
            404,
            "not_found",
            "routes: /trap /loop /membomb /tensor-bomb /nn-missing /infer /nn-load /config \
             /config-all /fetch /spin /sleep /log /flaky /order /kv /lease /lease-trap /batch /send /queues/Q",
        ),
    }
}

/// The two-step workflow of `/order`, with its compensation.
fn order(request: &Request) -> Response {
    let id = request.query("id").unwrap_or("0");
    let Ok(Some(_lease)) = lease::acquire(&format!("order-{id}"), Duration::from_secs(10)) else {
        return Response::text(409, "busy");
    };
    let bucket = match Bucket::open("orders") {
        Ok(bucket) => bucket,
        Err(error) => return Response::text(500, error.to_string()),
    };
    let (order_key, stock_key) = (format!("order/{id}"), format!("stock/{id}"));
    // Step 1: reserve, atomically.
    if let Err(error) = bucket.set_many(&[(&order_key, b"reserved"), (&stock_key, b"1")]) {
        return Response::text(500, error.to_string());
    }
    // Step 2: charge. When it fails, undo step 1 (compensation), atomically.
    if request.query("fail") == Some("1") {
        return match bucket.delete_many(&[&order_key, &stock_key]) {
            Ok(()) => Response::text(500, "compensated"),
            Err(error) => Response::text(500, format!("compensation failed: {error}")),
        };
    }
    match bucket.set(&order_key, b"charged") {
        Ok(()) => Response::text(200, "charged"),
        Err(error) => Response::text(500, error.to_string()),
    }
}

/// `?NAME=N` milliseconds, `default` when absent or not a number.
fn millis(request: &Request, name: &str, default: u64) -> Duration {
    Duration::from_millis(
        request
            .query(name)
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(default),
    )
}

/// `?ms=N` in nanoseconds, 0 when absent or not a number.
fn nanos(request: &Request) -> u64 {
    request
        .query("ms")
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0)
        .saturating_mul(1_000_000)
}

/// A query value decoded as `application/x-www-form-urlencoded`: `%XX` escapes and `+` for a
/// space. A malformed escape is kept as it is.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|&b| (b as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                decoded.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => decoded.push(b' '),
            (byte, _, _) => decoded.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

tensorlet_sdk::http_handler!(handle);
