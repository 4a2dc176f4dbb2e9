//! What a guest writes to stdout and stderr: kept in memory up to a bound per request, logged
//! with the request id when the request ends, then emptied.
//!
//! Not wasmtime-wasi's `MemoryOutputPipe`, for two reasons. It cannot be emptied, so an
//! instance that serves many requests needed a new WASI context per request (about 4k
//! instructions of a reused hello's 127k, `bench/callgrind`) just to get an empty one. And past
//! its capacity a write traps, so a chatty guest failed its request; here the excess is
//! counted and dropped, and the log says how much.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// One stream's capture, shared by the guest's handles to it and the host.
#[derive(Clone)]
pub struct Captured {
    inner: Arc<Mutex<Buffer>>,
}

struct Buffer {
    kept: BytesMut,
    capacity: usize,
    /// Bytes written past `capacity` since the last `take`.
    dropped: u64,
}

/// What a guest wrote during one request.
#[derive(Debug, Default, PartialEq)]
pub struct Written {
    pub text: Bytes,
    /// How many bytes after `text` were not kept.
    pub dropped: u64,
}

impl Written {
    /// The text for a log line, without trailing whitespace, with what was dropped said.
    pub fn for_log(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.text);
        let text = text.trim_end();
        match (text.is_empty(), self.dropped) {
            (true, 0) => None,
            (_, 0) => Some(text.to_string()),
            (_, n) => Some(format!("{text} [{n} more bytes not kept]")),
        }
    }
}

impl Captured {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Buffer {
                kept: BytesMut::new(),
                capacity,
                dropped: 0,
            })),
        }
    }

    /// What was written since the last call, leaving the capture empty.
    pub fn take(&self) -> Written {
        let mut b = self.lock();
        Written {
            text: b.kept.split().freeze(),
            dropped: std::mem::take(&mut b.dropped),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn keep(&self, bytes: &[u8]) {
        let mut b = self.lock();
        let room = b.capacity.saturating_sub(b.kept.len());
        let (kept, dropped) = bytes.split_at(bytes.len().min(room));
        b.kept.extend_from_slice(kept);
        b.dropped += dropped.len() as u64;
    }
}

/// The most a guest may hand over in one write (it asks with `check-write` first).
const PERMIT: usize = 64 * 1024;

#[async_trait::async_trait]
impl OutputStream for Captured {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(PERMIT)
    }
}

#[async_trait::async_trait]
impl Pollable for Captured {
    async fn ready(&mut self) {}
}

impl AsyncWrite for Captured {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.keep(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Captured {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Captured {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_its_capacity_counts_the_rest_and_empties_on_take() {
        let c = Captured::new(8);
        let mut guest = c.clone();
        guest.write(Bytes::from_static(b"hello ")).expect("write");
        guest
            .write(Bytes::from_static(b"world\n"))
            .expect("over capacity is not an error");
        let w = c.take();
        assert_eq!(&w.text[..], b"hello wo");
        assert_eq!(w.dropped, 4);
        assert_eq!(
            w.for_log().as_deref(),
            Some("hello wo [4 more bytes not kept]")
        );
        // Emptied: the next request starts from nothing, with the whole capacity.
        assert_eq!(c.take(), Written::default());
        assert_eq!(c.take().for_log(), None);
        guest.write(Bytes::from_static(b"again\n")).expect("write");
        assert_eq!(c.take().for_log().as_deref(), Some("again"));
    }
}
