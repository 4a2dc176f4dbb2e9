//! Fresh instances made ahead of demand, so a request that needs one finds it instantiated.
//!
//! Instantiating is most of the fresh-instance path (bench/callgrind: about 107k of 228k
//! instructions per hello request); done here, it leaves the request's critical path. What
//! stays the same: an instance made ahead serves one request (or, for a function that opted in
//! to reuse, starts its share like any fresh one), and it gets the request's deadline, memory
//! cap and capabilities when it is taken, not when it was made.
//!
//! Each ready instance holds a slot of the instance pool, so they are bounded twice: per
//! function by its recent demand, and across all functions by `[server] warm_instances`. A
//! version's ready instances go with it when it is dropped (a rollout's old version drains).
//!
//! Instances are made on one thread of their own that the kernel runs only when a core is idle
//! (`SCHED_IDLE`). Made on a tokio worker instead, a refill ran right after the request that
//! asked for it (tokio runs a task spawned from a worker next on that worker), ahead of that
//! request's response: hello got slower, sequentially (p50 193 vs 177 us) and at 64 connections
//! (8,137 vs 8,488 req/s).
//!
//! Off by default (`warm_instances = 0`), because on a 2-core machine it pays only when
//! wasmgate has a core to itself (`bench/run --only warm`, `warm_instances = 8` against 0, same
//! run): pinned to one core with wrk on the other, one connection 1.14x req/s (p50 185 -> 166
//! us) and 64 connections 1.02x; unpinned, where the instance is made on the other core than the
//! request that uses it, one connection 0.81x (p50 119 -> 164 us) and 64 connections 0.94x.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Function;
use super::invoke::{Exports, Warm};

/// Demand is counted over windows this long.
const WINDOW: Duration = Duration::from_millis(100);

/// Ready instances cover this much of the function's arrivals: enough to bridge the time a
/// refill takes to make the next one (an instantiation is tens of microseconds) with margin.
const HORIZON: Duration = Duration::from_millis(2);

/// Ready instances one function keeps at most, whatever its rate.
const MAX_PER_FUNCTION: usize = 8;

/// What makes instances ahead: the thread, and the permits (one per ready instance, across all
/// functions).
#[derive(Clone)]
pub struct Warmer {
    permits: Arc<Semaphore>,
    /// Functions whose pool is short, for the thread to refill. The thread ends when every
    /// function (and the runtime) holding a sender is gone.
    queue: mpsc::Sender<Function>,
}

impl Warmer {
    pub fn start(total: u32) -> std::io::Result<Self> {
        let (queue, asked) = mpsc::channel::<Function>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        std::thread::Builder::new()
            .name("wasmgate-warm".into())
            .spawn(move || {
                idle_priority();
                while let Ok(f) = asked.recv() {
                    rt.block_on(f.refill());
                }
            })?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            queue,
        })
    }
}

/// Lets the calling thread run only when a core would otherwise be idle.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "sched_setscheduler on the calling thread (pid 0) with a parameter that lives across the call; it changes only this thread's scheduling class"
)]
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: see the `expect` reason above.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "instances made ahead run at normal priority");
    }
}

/// Elsewhere the thread keeps its normal priority.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn idle_priority() {}

/// One ready instance and the budget permit it holds until taken.
struct Ready {
    warm: Warm,
    _permit: OwnedSemaphorePermit,
}

/// A function's ready instances and what sizes them.
pub(super) struct WarmPool {
    state: Mutex<State>,
    /// One refill task at a time per function.
    refilling: AtomicBool,
    warmer: Warmer,
    /// `wasmgate_instances_ready`: instances made ahead and not yet taken.
    gauge: metrics::Gauge,
    /// Requests (and events) that found an instance ready.
    hits: metrics::Counter,
}

#[derive(Default)]
struct State {
    ready: Vec<Ready>,
    /// Fresh instances asked for in the current window, since `since`, and in the last one.
    since: Option<Instant>,
    now: u32,
    last: u32,
}

impl State {
    /// Counts one fresh instance asked for.
    fn ask(&mut self) {
        let now = Instant::now();
        match self.since {
            Some(since) if now - since < WINDOW => {}
            since => {
                // A window with no arrivals in between counts as a quiet one.
                let quiet = since.is_none_or(|s| now - s >= 2 * WINDOW);
                self.last = if quiet { 0 } else { self.now };
                self.now = 0;
                self.since = Some(now);
            }
        }
        self.now += 1;
    }

    /// How many should be ready: the arrivals of `HORIZON` at the busier of this window's and
    /// the last one's rate, at least one, at most `MAX_PER_FUNCTION`.
    fn wanted(&self) -> usize {
        let per_window = u128::from(self.now.max(self.last));
        let covered = per_window * HORIZON.as_micros() / WINDOW.as_micros();
        (covered as usize + 1).min(MAX_PER_FUNCTION)
    }

    fn short(&self) -> bool {
        self.ready.len() < self.wanted()
    }
}

impl WarmPool {
    pub(super) fn new(warmer: Warmer, function: &str, version: &str) -> Self {
        Self {
            state: Mutex::default(),
            refilling: AtomicBool::new(false),
            warmer,
            gauge: metrics::gauge!("wasmgate_instances_ready",
                "function" => function.to_string(), "version" => version.to_string()),
            hits: metrics::counter!("wasmgate_instances_ready_used_total",
                "function" => function.to_string(), "version" => version.to_string()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        let n = self.state().ready.len();
        self.gauge.decrement(n as f64);
    }
}

impl Function {
    /// A ready instance of this function, if one is; either way, asks for the pool to be
    /// refilled to this function's demand.
    pub(super) fn take_ready(&self) -> Option<Warm> {
        let pool = self.inner.warm_pool.as_ref()?;
        let (taken, short) = {
            let mut state = pool.state();
            state.ask();
            (state.ready.pop(), state.short())
        };
        if taken.is_some() {
            pool.gauge.decrement(1.0);
            pool.hits.increment(1);
        }
        if short
            && !pool.refilling.swap(true, Ordering::AcqRel)
            && pool.warmer.queue.send(self.clone()).is_err()
        {
            pool.refilling.store(false, Ordering::Release);
        }
        taken.map(|r| r.warm)
    }

    /// Makes instances until the pool holds its target, the budget is spent, or an
    /// instantiation fails (the pool is full, or the guest's start traps: a request will meet
    /// and report the same).
    async fn refill(self) {
        let Some(pool) = self.inner.warm_pool.as_ref() else {
            return;
        };
        while pool.state().short() {
            let Ok(permit) = pool.warmer.permits.clone().try_acquire_owned() else {
                break;
            };
            let f = &self.inner;
            // Placeholders: the request that takes the instance brings its own (`reset`).
            let mut store = self.new_store(Instant::now() + f.limits.timeout, f.caps.instance());
            store.set_epoch_deadline(1);
            let made = match &f.entry {
                super::Entry::Http(pre) => {
                    pre.instantiate_async(&mut store).await.map(Exports::Http)
                }
                super::Entry::Event(pre) => {
                    pre.instantiate_async(&mut store).await.map(Exports::Event)
                }
            };
            match made {
                Ok(exports) => {
                    pool.state().ready.push(Ready {
                        warm: Warm {
                            store,
                            exports,
                            uses: 0,
                        },
                        _permit: permit,
                    });
                    pool.gauge.increment(1.0);
                }
                Err(e) => {
                    tracing::debug!(function = %f.name, error = %e, "cannot make an instance ahead; requests instantiate their own");
                    break;
                }
            }
        }
        pool.refilling.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_sizes_the_pool_from_the_recent_rate() {
        let mut state = State::default();
        state.ask();
        assert_eq!(state.wanted(), 1, "one request: one ready");
        // 200 in a window (2,000/s): 2 ms of arrivals is 4, plus one.
        (1..200).for_each(|_| state.ask());
        assert_eq!(state.wanted(), 5);
        // The next window starts quiet but remembers the last one's rate.
        state.since = Some(Instant::now() - WINDOW - Duration::from_millis(10));
        state.ask();
        assert_eq!((state.now, state.last), (1, 200));
        assert_eq!(state.wanted(), 5);
        // A burst is capped.
        (0..10_000).for_each(|_| state.ask());
        assert_eq!(state.wanted(), MAX_PER_FUNCTION);
        // After two windows without a request, the rate is forgotten.
        state.since = Some(Instant::now() - 2 * WINDOW - Duration::from_millis(10));
        state.ask();
        assert_eq!((state.now, state.last), (1, 0));
        assert_eq!(state.wanted(), 1);
    }
}
