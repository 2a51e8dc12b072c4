//! kv-counter: state in the node's database through wasi:keyvalue.
//!
//! - `POST /apps/kv-counter/count?by=N` adds N (default 1) to a counter and returns it;
//!   `GET /apps/kv-counter/count` reads it. Every acknowledged increment survives a crash.
//! - `PUT /apps/kv-counter/items/KEY` stores the body, `GET` reads it back, `DELETE` removes it,
//!   `GET /apps/kv-counter/items` lists the keys.
//! - `POST /apps/kv-counter/items/KEY/append` appends the body atomically (compare-and-swap),
//!   so concurrent appends all land.

use tensorlet_sdk::http::{Request, Response};
use tensorlet_sdk::kv::{Bucket, KvError};

fn handle(request: Request) -> Response {
    match route(&request) {
        Ok(response) => response,
        Err(error) => Response::error(500, "kv_error", &error.to_string()),
    }
}

fn route(request: &Request) -> Result<Response, KvError> {
    let bucket = Bucket::open("default")?;
    let segments: Vec<&str> = request.path().trim_matches('/').split('/').collect();
    Ok(match (request.method.as_str(), segments.as_slice()) {
        ("GET", ["count"]) => {
            let count = bucket
                .get("count")?
                .and_then(|v| String::from_utf8(v).ok())
                .unwrap_or_else(|| "0".into());
            Response::json(
                200,
                &serde_json::json!({ "count": count.parse::<i64>().unwrap_or(0) }),
            )
        }
        ("POST", ["count"]) => {
            let Some(by) = request
                .query("by")
                .map_or(Some(1), |by| by.parse::<i64>().ok())
            else {
                return Ok(Response::error(400, "bad_delta", "`by` must be an integer"));
            };
            Response::json(
                200,
                &serde_json::json!({ "count": bucket.increment("count", by)? }),
            )
        }
        ("GET", ["items"]) => {
            let keys: Vec<String> = bucket
                .keys()?
                .iter()
                .filter_map(|k| k.strip_prefix("item:"))
                .map(str::to_string)
                .collect();
            Response::json(200, &serde_json::json!({ "keys": keys }))
        }
        ("GET", ["items", key]) => match bucket.get(&item(key))? {
            Some(value) => Response::new(200, value),
            None => Response::error(404, "no_such_key", &format!("no item {key:?}")),
        },
        ("PUT", ["items", key]) => {
            bucket.set(&item(key), &request.body)?;
            Response::new(204, Vec::new())
        }
        ("DELETE", ["items", key]) => {
            bucket.delete(&item(key))?;
            Response::new(204, Vec::new())
        }
        ("POST", ["items", key, "append"]) => {
            let value = bucket.update(&item(key), |current| {
                let mut next = current.unwrap_or_default().to_vec();
                next.extend_from_slice(&request.body);
                next
            })?;
            Response::new(200, value)
        }
        _ => Response::error(
            404,
            "not_found",
            "routes: /count, /items, /items/KEY, /items/KEY/append",
        ),
    })
}

/// Items live beside the counter under their own prefix.
fn item(key: &str) -> String {
    format!("item:{key}")
}

tensorlet_sdk::http_handler!(handle);
