//! Bulkhead: a cap on a function's executions at once, a bounded queue in front of it, and a
//! bounded wait in that queue. Overflow is shed with 503 and `Retry-After`: a bounded wait,
//! never an unbounded queue.
//!
//! The cap adapts by default: `max_concurrency` is its ceiling, and the limit in force follows
//! measured latency (Netflix's Gradient2, as in their concurrency-limits and Envoy's adaptive
//! concurrency filter): while the time a slot is held stays near its long-run average the limit
//! grows, when it climbs the limit falls. A CPU-bound guest on two cores needs a handful of
//! slots, not 64; one waiting on a database grows its own.
//!
//! Under a flood, waiting is cheaper than refusing: a refused client in a closed loop is back at
//! once, and every refusal costs a request's parsing and an answer's writing for nothing. So the
//! queue is bounded by time rather than by a small count: a request is queued while the wait its
//! place in line predicts (place x mean slot time / limit) fits in `max_wait`, and refused at
//! once, before its body is read, when it would not. `max_queue` stays as a hard cap.
//!
//! The state is the function's, shared by all its versions' stacks (tower's
//! `ConcurrencyLimitLayer` would make a new one per stack).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_acc::{Algorithm, Gradient2};

use super::gate::Gate;
use crate::config::BulkheadConfig;
use crate::problem::Problem;
use crate::request_id::RequestId;

/// The adaptive limit never goes below this (or the ceiling, if that is lower): a few slots
/// keep both cores busy while a guest waits on a backend, and a probe's worth of latency noise
/// cannot starve the function.
const MIN_ADAPTIVE_LIMIT: usize = 8;

pub struct Bulkhead {
    control: Arc<Control>,
    waiting: AtomicUsize,
    max_queue: usize,
    max_wait: Duration,
    shed: [metrics::Counter; 3],
}

/// Why a request was not let in.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Shed {
    /// `max_queue` requests are waiting already.
    QueueFull,
    /// Its place in the queue predicts a wait past `max_wait`: refused at once instead.
    WouldWaitTooLong,
    /// It waited `max_wait` without a slot.
    WaitedTooLong,
}

impl Shed {
    fn index(self) -> usize {
        self as usize
    }
}

/// What the slots' holders report back: the limit's algorithm and the mean time a slot is held.
struct Control {
    slots: Arc<Semaphore>,
    adaptive: Option<Mutex<Adaptive>>,
    /// Slot holding time, exponentially weighted (1/16), in nanoseconds; 0 before the first.
    mean_hold_ns: AtomicU64,
    /// The limit in force: permits that exist, taken or not.
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    limit_gauge: metrics::Gauge,
}

struct Adaptive {
    algorithm: Gradient2,
    /// Permits to retire as they come back, because the limit fell below what is out.
    owed: usize,
}

impl Bulkhead {
    pub fn new(function: &str, cfg: &BulkheadConfig) -> Self {
        let ceiling = cfg.max_concurrency as usize;
        let adaptive = cfg.adaptive.then(|| {
            let floor = MIN_ADAPTIVE_LIMIT.min(ceiling);
            Mutex::new(Adaptive {
                algorithm: Gradient2::builder()
                    .initial_limit(ceiling)
                    .min_limit(floor)
                    .max_limit(ceiling)
                    .build(),
                owed: 0,
            })
        });
        let shed = |reason: &'static str| {
            metrics::counter!("wasmgate_bulkhead_shed_total",
                "function" => function.to_string(), "reason" => reason)
        };
        let control = Control {
            slots: Arc::new(Semaphore::new(ceiling)),
            adaptive,
            mean_hold_ns: AtomicU64::new(0),
            limit: AtomicUsize::new(ceiling),
            in_flight: AtomicUsize::new(0),
            limit_gauge: metrics::gauge!("wasmgate_bulkhead_limit", "function" => function.to_string()),
        };
        control.limit_gauge.set(ceiling as f64);
        Self {
            control: Arc::new(control),
            waiting: AtomicUsize::new(0),
            max_queue: cfg.max_queue as usize,
            max_wait: cfg.max_wait,
            shed: [
                shed("queue-full"),
                shed("would-wait-too-long"),
                shed("waited-too-long"),
            ],
        }
    }

    /// A slot, held until the [`Slot`] is dropped.
    pub async fn enter(&self) -> Result<Slot, Shed> {
        let entered = self.queue().await;
        if let Err(why) = entered {
            self.shed[why.index()].increment(1);
        }
        entered.map(|permit| self.control.clone().admit(permit))
    }

    async fn queue(&self) -> Result<OwnedSemaphorePermit, Shed> {
        if let Ok(permit) = self.control.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let place = self.waiting.fetch_add(1, Ordering::AcqRel) + 1;
        let waited = if place > self.max_queue {
            Err(Shed::QueueFull)
        } else if self.control.predicted_wait(place) > self.max_wait {
            Err(Shed::WouldWaitTooLong)
        } else {
            tokio::time::timeout(self.max_wait, self.control.slots.clone().acquire_owned())
                .await
                // The semaphore is never closed; a timeout is the only real outcome here.
                .map_err(|_| Shed::WaitedTooLong)
                .and_then(|permit| permit.map_err(|_| Shed::WaitedTooLong))
        };
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        waited
    }

    /// The limit in force now.
    pub fn limit(&self) -> usize {
        self.control.limit.load(Ordering::Relaxed)
    }
}

impl Control {
    fn admit(self: Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Slot {
            permit: Some(permit),
            control: self,
            admitted: Instant::now(),
            failed: false,
        }
    }

    /// How long the `place`-th request in line can expect to wait: the requests ahead of it
    /// leave at `limit` per mean holding time. Zero until a slot has been given back.
    fn predicted_wait(&self, place: usize) -> Duration {
        let mean = self.mean_hold_ns.load(Ordering::Relaxed);
        let limit = self.limit.load(Ordering::Relaxed).max(1) as u64;
        Duration::from_nanos(mean.saturating_mul(place as u64) / limit)
    }

    fn release(&self, permit: OwnedSemaphorePermit, held: Duration, failed: bool) {
        let in_flight = self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let held_ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        let mean = self.mean_hold_ns.load(Ordering::Relaxed);
        let next = if mean == 0 {
            held_ns
        } else {
            mean - mean / 16 + held_ns / 16
        };
        self.mean_hold_ns.store(next, Ordering::Relaxed);

        let Some(adaptive) = &self.adaptive else {
            return drop(permit);
        };
        let mut a = adaptive.lock().unwrap_or_else(PoisonError::into_inner);
        a.algorithm.update(held, in_flight, failed, false);
        let target = a.algorithm.max_concurrency();
        let limit = self.limit.load(Ordering::Relaxed);
        if target > limit {
            // Owed permits are still out: cancel the debt before minting new ones.
            let cancelled = a.owed.min(target - limit);
            a.owed -= cancelled;
            self.slots.add_permits(target - limit - cancelled);
        } else if target < limit {
            a.owed += limit - target;
        }
        if target != limit {
            self.limit.store(target, Ordering::Relaxed);
            self.limit_gauge.set(target as f64);
        }
        if a.owed > 0 {
            a.owed -= 1;
            permit.forget();
        }
    }
}

/// An admitted request's slot: given back (and its holding time reported) when dropped.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    control: Arc<Control>,
    admitted: Instant,
    failed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.control
                .release(permit, self.admitted.elapsed(), self.failed);
        }
    }
}

impl Gate for Bulkhead {
    type Pass = Slot;

    async fn admit(&self, head: &http::request::Parts) -> Result<Slot, Problem> {
        self.enter().await.map_err(|shed| {
            tracing::debug!(request_id = ?head.extensions.get::<RequestId>(), ?shed, "bulkhead shed a request");
            Problem::BulkheadFull
        })
    }

    /// The slot stays taken while the guest streams its body.
    fn hold(mut slot: Slot, resp: Response) -> Response {
        slot.failed = resp.status().is_server_error();
        resp.map(|body| Body::new(Guarded { body, _slot: slot }))
    }
}

/// A body that holds a bulkhead slot until it is finished or dropped.
struct Guarded {
    body: Body,
    _slot: Slot,
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

    fn bulkhead(max_concurrency: u32, max_queue: u32, wait_ms: u64, adaptive: bool) -> Bulkhead {
        Bulkhead::new(
            "test",
            &BulkheadConfig {
                max_concurrency,
                max_queue,
                max_wait: Duration::from_millis(wait_ms),
                adaptive,
            },
        )
    }

    /// A free slot, as if taken `held_ms` ago.
    fn held_for(b: &Bulkhead, held_ms: u64) -> Slot {
        let permit = b
            .control
            .slots
            .clone()
            .try_acquire_owned()
            .expect("a free slot");
        let mut slot = b.control.clone().admit(permit);
        slot.admitted -= Duration::from_millis(held_ms);
        slot
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_beyond_the_queue_at_once() {
        let b = Arc::new(bulkhead(1, 1, 100, false));
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
        let b = bulkhead(1, 4, 100, false);
        let _held = b.enter().await.expect("slot");
        let started = tokio::time::Instant::now();
        assert_eq!(b.enter().await.map(drop), Err(Shed::WaitedTooLong));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(b.waiting.load(Ordering::Relaxed), 0);
    }

    /// With slots held 10 ms each on average and 2 of them, the 40th in line would wait about
    /// 200 ms: past a 100 ms `max_wait`, so it is refused without waiting; the 10th is queued.
    #[tokio::test]
    async fn a_request_that_would_wait_past_max_wait_is_refused_at_once() {
        let b = bulkhead(2, 1000, 100, false);
        for _ in 0..4 {
            let slot = b.enter().await.expect("slot");
            std::thread::sleep(Duration::from_millis(10));
            drop(slot);
        }
        let mean = Duration::from_nanos(b.control.mean_hold_ns.load(Ordering::Relaxed));
        assert!(mean >= Duration::from_millis(10), "{mean:?}");
        assert!(b.control.predicted_wait(10) < Duration::from_millis(100));
        assert!(b.control.predicted_wait(40) > Duration::from_millis(100));

        let _held = [
            b.enter().await.expect("slot"),
            b.enter().await.expect("slot"),
        ];
        b.waiting.store(39, Ordering::Relaxed);
        let started = Instant::now();
        assert_eq!(b.enter().await.map(drop), Err(Shed::WouldWaitTooLong));
        assert!(started.elapsed() < Duration::from_millis(50));
        assert_eq!(b.waiting.load(Ordering::Relaxed), 39);
    }

    /// Holding times that climb while the function is busy bring the limit down from its
    /// ceiling (never under the floor), retiring permits as they come back; steady ones let
    /// it grow back. What is out never exceeds the limit once the debt is paid.
    #[tokio::test]
    async fn the_limit_follows_latency_between_its_floor_and_ceiling() {
        let b = bulkhead(64, 0, 100, true);
        assert_eq!(b.limit(), 64);
        // Every free slot taken at once, then all given back having been held `held_ms`.
        let report = |held_ms: u64, n: usize| {
            for _ in 0..n {
                let slots: Vec<_> = (0..b.control.slots.available_permits())
                    .map(|_| held_for(&b, held_ms))
                    .collect();
                drop(slots);
            }
        };
        report(1, 2);
        report(20, 3);
        assert_eq!(
            b.limit(),
            MIN_ADAPTIVE_LIMIT,
            "slow slots bring the limit to its floor"
        );
        assert_eq!(
            b.control.slots.available_permits(),
            MIN_ADAPTIVE_LIMIT,
            "the excess was retired"
        );
        report(20, 200);
        let recovered = b.limit();
        assert!(
            recovered > MIN_ADAPTIVE_LIMIT,
            "a steady latency lets it grow: {recovered}"
        );
        assert!(recovered <= 64);
        assert_eq!(b.control.slots.available_permits(), recovered);
    }

    #[test]
    fn a_fixed_bulkhead_keeps_its_limit() {
        let b = bulkhead(4, 0, 100, false);
        for held_ms in [1, 50, 500] {
            drop(held_for(&b, held_ms));
        }
        assert_eq!(b.limit(), 4);
        assert_eq!(b.control.slots.available_permits(), 4);
    }
}
