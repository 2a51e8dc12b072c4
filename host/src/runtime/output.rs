//! Where a guest's stdout and stderr go: the node's log, one line per event, tagged with the
//! app and the stream. Control characters are escaped (a guest cannot write terminal escape
//! sequences into the operator's log or forge log lines), and each instance may log at most
//! [`MAX_BYTES_PER_INSTANCE`]; the rest is dropped and counted, so a chatty or hostile guest
//! costs neither memory nor the log's disk.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Output one instance may log, stdout and stderr together.
pub const MAX_BYTES_PER_INSTANCE: usize = 64 << 10;

/// The longest line logged as one event; longer ones are split.
const MAX_LINE_BYTES: usize = 4096;

/// One instance's stdout or stderr.
#[derive(Clone)]
pub struct GuestOutput {
    app: Arc<str>,
    stream: &'static str,
    /// Bytes this instance may still log, shared by its two streams.
    left: Arc<AtomicUsize>,
}

impl GuestOutput {
    /// The stdout and stderr of one instance of `app`.
    pub fn pair(app: &str) -> (Self, Self) {
        let (app, left): (Arc<str>, _) = (
            app.into(),
            Arc::new(AtomicUsize::new(MAX_BYTES_PER_INSTANCE)),
        );
        let stream = |stream| Self {
            app: app.clone(),
            stream,
            left: left.clone(),
        };
        (stream("stdout"), stream("stderr"))
    }
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
        let granted = self
            .output
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left.saturating_sub(bytes.len()))
            })
            .unwrap_or(0)
            .min(bytes.len());
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
        tracing::info!(target: "tensorlet::guest", app = %self.output.app, stream = self.output.stream, "{text}");
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
        if self.dropped > 0 {
            tracing::warn!(target: "tensorlet::guest", app = %self.output.app, stream = self.output.stream, dropped_bytes = self.dropped, "guest output past the instance's {MAX_BYTES_PER_INSTANCE}-byte log budget was dropped");
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

    #[test]
    fn an_instance_logs_at_most_its_budget() {
        let (stdout, stderr) = GuestOutput::pair("app");
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
