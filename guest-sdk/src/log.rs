//! Log lines with a level through `wasi:logging`. On tensorlet each line lands in the app's
//! log (`tensorlet logs <app>`) with the request id and the revision; stdout and stderr do
//! too (as `info` and `error`), so this is for when a level or a context matters.

use crate::bindings::wasi::logging::logging;

pub use logging::Level;

/// Logs `message` at `level` under `context` (a category such as a module path; may be
/// empty).
pub fn log(level: Level, context: &str, message: &str) {
    logging::log(level, context, message);
}

pub fn debug(message: &str) {
    log(Level::Debug, "", message);
}

pub fn info(message: &str) {
    log(Level::Info, "", message);
}

pub fn warn(message: &str) {
    log(Level::Warn, "", message);
}

pub fn error(message: &str) {
    log(Level::Error, "", message);
}
