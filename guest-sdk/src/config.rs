//! Settings through `wasi:config/store`: the app's config values from the `[config]` table of
//! its manifest and the secrets given to it, read-only.
//!
//! A component reads its settings when it needs them, with its own defaults:
//!
//! ```ignore
//! let model = tensorlet_sdk::config::get("model").unwrap_or_else(|| "minilm".into());
//! ```
//!
//! A failure of the store (`upstream` or `io` in wasi:config's terms) reads as "not set": an
//! app falls back to its default rather than failing the request, and the failure is written to
//! stderr, which the node keeps in its log. An app that must tell the two apart calls
//! [`crate::bindings::wasi::config::store`] directly.

use crate::bindings::wasi::config::store;

/// The value of setting `key`, or `None` when it is not set (or the store failed, see the
/// module's doc).
pub fn get(key: &str) -> Option<String> {
    store::get(key).unwrap_or_else(|error| {
        eprintln!(
            "tensorlet-sdk: reading config key {key:?} failed: {}",
            describe(&error)
        );
        None
    })
}

/// Every setting as (key, value) pairs, or none when the store failed (see the module's doc).
pub fn all() -> Vec<(String, String)> {
    store::get_all().unwrap_or_else(|error| {
        eprintln!(
            "tensorlet-sdk: reading the config failed: {}",
            describe(&error)
        );
        Vec::new()
    })
}

fn describe(error: &store::Error) -> String {
    match error {
        store::Error::Upstream(message) => format!("upstream: {message}"),
        store::Error::Io(message) => format!("io: {message}"),
    }
}
