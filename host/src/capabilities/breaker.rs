//! A circuit breaker per backend capability (db, cache, lock): when the backend is down, calls
//! fail at once with `unavailable` instead of each waiting out its timeout.
//!
//! Without it, with PostgreSQL or Redis stopped every guest call waited up to `BACKEND_TIMEOUT`
//! (2 s) before `unavailable`: requests piled up in the bulkheads during an outage and reached
//! the backend all at once when it came back. Here, after `THRESHOLD` consecutive calls that
//! found the backend down (unreachable or timed out), the breaker opens: calls fail at once for
//! `COOL_DOWN`; then one call goes through as a probe (half-open), and its answer closes the
//! breaker or opens it for another cool-down. Answers that come from a working backend (a
//! constraint violation, a bad query, a lock that is busy) count as healthy.
//!
//! Hand-written because it is this small and the state must be visible to `/readyz` and
//! `/metrics`; the crates for it wrap a whole call policy (retries, backoff) we do not want for
//! a guest's writes, which the host never retries.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Consecutive failed calls that open the breaker.
const THRESHOLD: u32 = 5;

/// How long an open breaker refuses before it lets a probe through. Short, so service returns
/// well within a second of the backend coming back.
const COOL_DOWN: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everything else is refused until it answers.
    HalfOpen,
}

pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cool_down: Duration,
    /// 1 while open or half-open.
    open: metrics::Gauge,
    /// Calls refused without reaching the backend.
    refused: metrics::Counter,
}

/// What a call was let through as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admitted {
    Normal,
    Probe,
}

impl Breaker {
    pub fn new(capability: &'static str) -> Self {
        Self::with(capability, THRESHOLD, COOL_DOWN)
    }

    fn with(capability: &'static str, threshold: u32, cool_down: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold,
            cool_down,
            open: metrics::gauge!("wasmgate_breaker_open", "capability" => capability),
            refused: metrics::counter!("wasmgate_breaker_refused_total", "capability" => capability),
        }
    }

    /// `closed`, `open` or `half-open`, for `/readyz`.
    pub fn state(&self) -> &'static str {
        match *self.lock() {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen => "half-open",
        }
    }

    /// Runs `call` unless the breaker is open (then `refused()` at once). `down` tells whether
    /// an error means the backend is down (rather than a healthy backend saying no).
    pub async fn call<T, E>(
        &self,
        call: impl Future<Output = Result<T, E>>,
        down: impl Fn(&E) -> bool,
        refused: impl FnOnce() -> E,
    ) -> Result<T, E> {
        let Some(admitted) = self.admit() else {
            self.refused.increment(1);
            return Err(refused());
        };
        // A probe that is dropped before it answers (its request went away) must not leave the
        // breaker half-open for good: the next call probes instead.
        let mut pending = Pending {
            breaker: self,
            admitted,
            done: false,
        };
        let result = call.await;
        pending.done = true;
        self.record(admitted, !matches!(&result, Err(e) if down(e)));
        result
    }

    /// [`Breaker::call`] on `call` bounded by [`super::BACKEND_TIMEOUT`]: past it, the call
    /// fails with `timed_out()`.
    pub async fn call_within<T, E>(
        &self,
        call: impl Future<Output = Result<T, E>>,
        timed_out: impl FnOnce() -> E,
        down: impl Fn(&E) -> bool,
        refused: impl FnOnce() -> E,
    ) -> Result<T, E> {
        let bounded = async {
            tokio::time::timeout(super::BACKEND_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| Err(timed_out()))
        };
        self.call(bounded, down, refused).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(&self) -> Option<Admitted> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Some(Admitted::Normal),
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                Some(Admitted::Probe)
            }
            State::Open { .. } | State::HalfOpen => None,
        }
    }

    fn record(&self, admitted: Admitted, healthy: bool) {
        let mut state = self.lock();
        let next = match (*state, admitted, healthy) {
            (State::HalfOpen, Admitted::Probe, true) => State::Closed { failures: 0 },
            (State::HalfOpen, Admitted::Probe, false) => self.opened(),
            (State::Closed { .. }, _, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, _, false) if failures + 1 >= self.threshold => {
                self.opened()
            }
            (State::Closed { failures }, _, false) => State::Closed {
                failures: failures + 1,
            },
            // A call let through before the breaker opened says nothing about now.
            (current, _, _) => current,
        };
        self.set(&mut state, next);
    }

    fn opened(&self) -> State {
        State::Open {
            until: Instant::now() + self.cool_down,
        }
    }

    fn set(&self, state: &mut State, next: State) {
        let was_closed = matches!(*state, State::Closed { .. });
        let is_closed = matches!(next, State::Closed { .. });
        if was_closed != is_closed {
            self.open.set(if is_closed { 0.0 } else { 1.0 });
            if is_closed {
                tracing::info!("backend answers again: breaker closed");
            } else {
                tracing::warn!(cool_down = ?self.cool_down, "backend down: breaker open, calls fail at once");
            }
        }
        *state = next;
    }
}

struct Pending<'a> {
    breaker: &'a Breaker,
    admitted: Admitted,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done && self.admitted == Admitted::Probe {
            let mut state = self.breaker.lock();
            if *state == State::HalfOpen {
                *state = State::Open {
                    until: Instant::now(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn outcome(b: &Breaker, healthy: bool) -> Result<(), &'static str> {
        b.call(
            async move { if healthy { Ok(()) } else { Err("down") } },
            |e| *e == "down",
            || "refused",
        )
        .await
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_closes_on_a_good_probe() {
        let b = Breaker::with("test", 3, Duration::from_millis(50));
        // A success in between resets the count.
        for healthy in [false, false, true, false, false] {
            let _ = outcome(&b, healthy).await;
        }
        assert_eq!(b.state(), "closed");
        assert_eq!(outcome(&b, false).await, Err("down"));
        assert_eq!(b.state(), "open");
        // Refused without running the call.
        assert_eq!(outcome(&b, true).await, Err("refused"));
        tokio::time::sleep(Duration::from_millis(60)).await;
        // The probe fails: open for another cool-down.
        assert_eq!(outcome(&b, false).await, Err("down"));
        assert_eq!(outcome(&b, true).await, Err("refused"));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(outcome(&b, true).await, Ok(()));
        assert_eq!(b.state(), "closed");
    }

    #[tokio::test]
    async fn a_healthy_backends_errors_do_not_count() {
        let b = Breaker::with("test", 2, Duration::from_secs(60));
        for _ in 0..10 {
            let r = b
                .call(
                    async { Err::<(), _>("constraint") },
                    |e| *e == "down",
                    || "refused",
                )
                .await;
            assert_eq!(r, Err("constraint"));
        }
        assert_eq!(b.state(), "closed");
    }

    #[tokio::test]
    async fn a_probe_dropped_before_it_answers_lets_the_next_call_probe() {
        let b = Breaker::with("test", 1, Duration::from_millis(10));
        let _ = outcome(&b, false).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let probe = b.call(
            std::future::pending::<Result<(), &str>>(),
            |_| true,
            || "refused",
        );
        // Polled once (admitted as the probe), then dropped.
        assert!(
            tokio::time::timeout(Duration::from_millis(5), probe)
                .await
                .is_err()
        );
        assert_eq!(outcome(&b, true).await, Ok(()));
        assert_eq!(b.state(), "closed");
    }
}
