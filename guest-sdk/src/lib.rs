//! tensorlet-sdk: what a component author needs to write a tensorlet app.
//!
//! An app is a standard `wasi:http` component. This crate holds the bindings of the
//! `tensorlet:platform/inference-app` world (see `wit/`) and small helpers over them:
//! [`http`] (a handler taking a whole [`http::Request`] and returning a [`http::Response`], and
//! a blocking client, [`http::ClientRequest`], to call other apps and services), [`nn`] (models
//! by name, tensors, compute), [`llm`] (text generation and embeddings), [`kv`] (buckets,
//! counters, compare-and-swap) and [`config`] (the app's settings and secrets).
//!
//! ```ignore
//! use tensorlet_sdk::http::{Request, Response};
//!
//! fn handle(request: Request) -> Response {
//!     Response::text(200, format!("hello from {}\n", request.path()))
//! }
//!
//! tensorlet_sdk::http_handler!(handle);
//! ```
//! Build with `cargo build --target wasm32-wasip2 --release` or `cargo component build --release`.

pub mod config;
pub mod http;
pub mod kv;
pub mod lease;
pub mod llm;
pub mod log;
pub mod nn;
pub mod queue;

/// The raw bindings of the `tensorlet:platform/inference-app` world, for what the helpers do
/// not cover.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "tensorlet:platform/inference-app",
        pub_export_macro: true,
        export_macro_name: "export_inference_app",
        default_bindings_module: "tensorlet_sdk::bindings",
        generate_all,
    });
}
