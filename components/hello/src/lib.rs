//! hello: the smallest tensorlet app, a plain `wasi:http` handler.
//!
//! `GET /apps/hello/?name=edge` answers `Hello, edge!`.

use tensorlet_sdk::http::{Request, Response};

fn handle(request: Request) -> Response {
    let name = request
        .query("name")
        .filter(|n| !n.is_empty())
        .unwrap_or("world");
    Response::text(200, format!("Hello, {name}!\n"))
}

tensorlet_sdk::http_handler!(handle);
