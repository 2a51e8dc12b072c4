//! Where a guest's stdout, stderr and `wasi:logging` lines go: its app's log
//! (`tensorlet logs <app>`), one line per event, tagged with the revision, the request id, a
//! level and the source. Control characters are escaped (a guest cannot write terminal escape
//! sequences into the operator's terminal or forge log lines), and each instance may log at
//! most [`MAX_BYTES_PER_INSTANCE`]; the rest is dropped and counted, so a chatty or hostile
//! guest costs neither memory nor the log's disk.

use crate::telemetry::logs::{AppLogs, Level, LogLine, Source};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Output one instance may log, stdout, stderr and wasi:logging together.
pub const MAX_BYTES_PER_INSTANCE: usize = 64 << 10;

/// The longest line logged as one event; longer ones are split.
const MAX_LINE_BYTES: usize = 4096;

/// Where one instance's lines go: its app's log, tagged with its revision and request.
#[derive(Clone)]
pub struct InstanceLog {
    logs: AppLogs,
    app: Arc<str>,
    revision: u64,
    /// The request the instance serves now (a reused instance serves several in turn).
    request_id: Arc<RwLock<Arc<str>>>,
    /// Bytes this instance may still log, shared by all its outputs.
    left: Arc<AtomicUsize>,
    /// Whether the instance was told that its wasi:logging lines are being dropped.
    warned: Arc<std::sync::atomic::AtomicBool>,
}

impl InstanceLog {
    pub fn new(logs: AppLogs, app: &str, revision: u32, request_id: &str) -> Self {
        Self {
            logs,
            app: app.into(),
            revision: revision.into(),
            request_id: Arc::new(RwLock::new(request_id.into())),
            left: Arc::new(AtomicUsize::new(MAX_BYTES_PER_INSTANCE)),
            warned: Arc::default(),
        }
    }

    /// A reused instance starts serving `request_id`: its lines are tagged with it, and it
    /// gets a whole log budget again.
    pub fn begin_request(&self, request_id: &str) {
        *self
            .request_id
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = request_id.into();
        self.left.store(MAX_BYTES_PER_INSTANCE, Ordering::Relaxed);
        self.warned.store(false, Ordering::Relaxed);
    }

    /// Takes up to `wanted` bytes of the instance's budget; how many it got.
    fn take_budget(&self, wanted: usize) -> usize {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left.saturating_sub(wanted))
            })
            .unwrap_or(0)
            .min(wanted)
    }

    fn append(&self, level: Level, source: Source, message: String) {
        tracing::debug!(target: "tensorlet::guest", app = %self.app, ?source, "{message}");
        let request_id = self
            .request_id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.logs.append(LogLine::new(
            &*self.app,
            self.revision,
            &*request_id,
            level,
            source,
            message,
        ));
    }

    /// A `wasi:logging` line: `context` (if any) before the message, cut to the budget.
    pub fn log(&self, level: Level, context: &str, message: &str) {
        let text = if context.is_empty() {
            message.to_string()
        } else {
            format!("{context}: {message}")
        };
        let granted = self.take_budget(text.len());
        if granted < text.len() && !self.warned.swap(true, Ordering::Relaxed) {
            self.append(
                Level::Warn,
                Source::Logging,
                format!("wasi:logging output past the instance's {MAX_BYTES_PER_INSTANCE}-byte log budget is dropped"),
            );
        }
        if granted == 0 {
            return;
        }
        let mut cut = granted.min(MAX_LINE_BYTES);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.append(level, Source::Logging, escape(&text.as_bytes()[..cut]));
    }

    /// The instance's stdout (lines at level info) and stderr (level error).
    pub fn streams(&self) -> (GuestOutput, GuestOutput) {
        let stream = |source, level| GuestOutput {
            log: self.clone(),
            source,
            level,
        };
        (
            stream(Source::Stdout, Level::Info),
            stream(Source::Stderr, Level::Error),
        )
    }
}

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasi:logging/imports",
    });
}

use bindings::wasi::logging::logging;

impl logging::Host for InstanceLog {
    fn log(&mut self, level: logging::Level, context: String, message: String) {
        let level = match level {
            logging::Level::Trace => Level::Trace,
            logging::Level::Debug => Level::Debug,
            logging::Level::Info => Level::Info,
            logging::Level::Warn => Level::Warn,
            logging::Level::Error => Level::Error,
            logging::Level::Critical => Level::Critical,
        };
        InstanceLog::log(self, level, &context, &message);
    }
}

/// Gives components `wasi:logging`, writing to the instance's log that `view` finds.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    view: fn(&mut T) -> &mut InstanceLog,
) -> wasmtime::Result<()> {
    logging::add_to_linker::<T, wasmtime::component::HasSelf<InstanceLog>>(linker, view)
}

/// One instance's stdout or stderr.
#[derive(Clone)]
pub struct GuestOutput {
    log: InstanceLog,
    source: Source,
    level: Level,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            output: self.clone(),
            line: Vec::new(),
            dropped: 0,
        })
    }
}

/// Collects a stream's bytes into lines and logs each one.
struct LineWriter {
    output: GuestOutput,
    line: Vec<u8>,
    /// Bytes dropped past the instance's budget, reported once the writer goes.
    dropped: usize,
}

impl LineWriter {
    fn take(&mut self, bytes: &[u8]) {
        let granted = self.output.log.take_budget(bytes.len());
        self.dropped += bytes.len() - granted;
        for &byte in &bytes[..granted] {
            if byte == b'\n' {
                self.emit();
            } else {
                self.line.push(byte);
                if self.line.len() >= MAX_LINE_BYTES {
                    self.emit();
                }
            }
        }
    }

    fn emit(&mut self) {
        let text = escape(&self.line);
        self.line.clear();
        self.output
            .log
            .append(self.output.level, self.output.source, text);
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
        if self.dropped > 0 {
            self.output.log.append(
                Level::Warn,
                self.output.source,
                format!(
                    "{} bytes of output past the instance's {MAX_BYTES_PER_INSTANCE}-byte log budget were dropped",
                    self.dropped
                ),
            );
        }
    }
}

/// The line as text with every control character (escape sequences, carriage returns, tabs)
/// and invalid UTF-8 escaped.
fn escape(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Never blocks the guest: what is past the budget is dropped.
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape(b"plain text"), "plain text");
        assert_eq!(escape(b"\x1b[31mred\r"), "\\u{1b}[31mred\\r");
        assert_eq!(escape(b"bad \xff utf-8"), "bad \u{fffd} utf-8");
    }

    #[tokio::test]
    async fn lines_reach_the_app_log_with_their_request_level_and_source() {
        let temp = crate::testing::TempStore::default();
        let logs = AppLogs::open(&temp.store, 100).unwrap();
        let log = InstanceLog::new(logs.clone(), "app", 3, "req-1");
        let (stdout, _) = log.streams();
        let mut out = LineWriter {
            output: stdout,
            line: Vec::new(),
            dropped: 0,
        };
        out.take(b"hello\x1b[2J\nunfinished");
        drop(out);
        log.log(Level::Warn, "db", "slow");
        logs.flush_pending().await.unwrap();
        let lines = logs.read("app", None, 10).unwrap();
        let seen: Vec<_> = lines
            .iter()
            .map(|l| {
                (
                    l.message.as_str(),
                    l.level,
                    l.source,
                    l.revision,
                    l.request_id.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("hello\\u{1b}[2J", Level::Info, Source::Stdout, 3, "req-1"),
                ("unfinished", Level::Info, Source::Stdout, 3, "req-1"),
                ("db: slow", Level::Warn, Source::Logging, 3, "req-1"),
            ]
        );
    }

    #[test]
    fn an_instance_logs_at_most_its_budget() {
        let temp = crate::testing::TempStore::default();
        let logs = AppLogs::open(&temp.store, 100).unwrap();
        let (stdout, stderr) = InstanceLog::new(logs, "app", 1, "req").streams();
        let mut out = LineWriter {
            output: stdout,
            line: Vec::new(),
            dropped: 0,
        };
        out.take(&vec![b'x'; MAX_BYTES_PER_INSTANCE - 10]);
        let mut err = LineWriter {
            output: stderr,
            line: Vec::new(),
            dropped: 0,
        };
        err.take(&[b'y'; 30]);
        assert_eq!(err.dropped, 20);
        assert_eq!(err.line.len(), 10);
        out.take(b"more");
        assert_eq!(out.dropped, 4);
    }
}
