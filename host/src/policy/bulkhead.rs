//! Bulkhead: at most `max_concurrency` executions of a function at once, at most `max_queue`
//! more waiting, none waiting longer than `max_wait`. Overflow is shed at once with 503: a
//! bounded wait, never an unbounded queue.
//!
//! The semaphore is the function's, shared by all its versions' stacks (tower's
//! `ConcurrencyLimitLayer` would make a new one per stack).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::gate::Gate;
use crate::config::BulkheadConfig;
use crate::problem::Problem;
use crate::request_id::RequestId;

pub struct Bulkhead {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    max_wait: Duration,
}

/// Why a request was not let in.
#[derive(Debug, PartialEq, Eq)]
pub enum Shed {
    QueueFull,
    WaitedTooLong,
}

impl Bulkhead {
    pub fn new(cfg: &BulkheadConfig) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(cfg.max_concurrency as usize)),
            waiting: AtomicUsize::new(0),
            max_queue: cfg.max_queue as usize,
            max_wait: cfg.max_wait,
        }
    }

    /// A slot, held until the permit is dropped.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, Shed> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Shed::QueueFull);
        }
        let waited = tokio::time::timeout(self.max_wait, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a timeout is the only real outcome here.
            _ => Err(Shed::WaitedTooLong),
        }
    }
}

impl Gate for Bulkhead {
    type Pass = OwnedSemaphorePermit;

    async fn admit(&self, head: &http::request::Parts) -> Result<OwnedSemaphorePermit, Problem> {
        self.enter().await.map_err(|shed| {
            tracing::debug!(request_id = ?head.extensions.get::<RequestId>(), ?shed, "bulkhead shed a request");
            Problem::BulkheadFull
        })
    }

    /// The slot stays taken while the guest streams its body.
    fn hold(permit: OwnedSemaphorePermit, resp: Response) -> Response {
        resp.map(|body| {
            Body::new(Guarded {
                body,
                _permit: permit,
            })
        })
    }
}

/// A body that holds a bulkhead slot until it is finished or dropped.
struct Guarded {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulkhead(max_concurrency: u32, max_queue: u32, wait_ms: u64) -> Bulkhead {
        Bulkhead::new(&BulkheadConfig {
            max_concurrency,
            max_queue,
            max_wait: Duration::from_millis(wait_ms),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_beyond_the_queue_at_once() {
        let b = Arc::new(bulkhead(1, 1, 100));
        let held = b.enter().await.expect("first takes the slot");
        let queued = {
            let b = b.clone();
            tokio::spawn(async move { b.enter().await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(b.enter().await.map(drop), Err(Shed::QueueFull));
        drop(held);
        assert_eq!(
            queued.await.expect("task"),
            Ok(()),
            "the queued one got the freed slot"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_gives_up_after_max_wait() {
        let b = bulkhead(1, 4, 100);
        let _held = b.enter().await.expect("slot");
        let started = tokio::time::Instant::now();
        assert_eq!(b.enter().await.map(drop), Err(Shed::WaitedTooLong));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(b.waiting.load(Ordering::Relaxed), 0);
    }
}
