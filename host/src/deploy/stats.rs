//! Per-version request figures that every process shares through the registry: requests, the
//! version's failures, the host's refusals and a latency histogram, per second.
//!
//! The request path only adds to atomic counters of its version ([`Counts`]); a task moves what
//! accumulated into the registry once a second ([`FLUSH_EVERY`]), one row per version, process and
//! second. Summing rows over processes and a window gives fleet-wide figures: what the admin
//! summary shows and what a rollout's gates judge. Metrics (Prometheus) stay per process and are
//! for dashboards; these are what the host decides with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::Comparisons;
use crate::registry::Registry;

/// How often a process writes what its versions served.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Rows older than this are deleted (by whichever process flushes).
pub const KEEP: Duration = Duration::from_secs(24 * 3600);

/// Outcomes that are the version's failure (a 5xx of its own making), as opposed to a request
/// the host refused on purpose (rate limit, bulkhead, auth...), which says nothing of it.
const FAILURES: &[&str] = &[
    "function-failed",
    "function-timeout",
    "function-memory-exceeded",
    "function-no-response",
    "internal",
];

/// Upper bounds of the latency buckets, in microseconds: 250 us growing by a quarter, up to
/// about 9 s (then one open bucket). A quantile read from them is within 25% of the truth.
fn bounds() -> &'static [u64] {
    static BOUNDS: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| {
        (0..48)
            .map(|i| (250.0 * 1.25_f64.powi(i)).round() as u64)
            .collect()
    })
}

const BUCKETS: usize = 49;

/// One version's figures in this process since the last flush.
pub struct Counts {
    requests: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counts {
    /// Counts one response: `outcome` is the host's own answer, if it made one.
    pub fn record(&self, status: StatusCode, outcome: Option<&str>, elapsed: Duration) {
        let failed = match outcome {
            None => status.is_server_error(),
            Some(o) if FAILURES.contains(&o) => true,
            Some(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = bounds().partition_point(|&b| b < us);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// What accumulated, leaving zeros.
    pub(crate) fn take(&self) -> Figures {
        Figures {
            requests: self.requests.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
            refused: self.refused.swap(0, Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .map(|b| b.swap(0, Ordering::Relaxed))
                .collect(),
        }
    }

    /// Puts back figures that could not be written.
    fn restore(&self, f: &Figures) {
        self.requests.fetch_add(f.requests, Ordering::Relaxed);
        self.failed.fetch_add(f.failed, Ordering::Relaxed);
        self.refused.fetch_add(f.refused, Ordering::Relaxed);
        for (b, n) in self.latency.iter().zip(&f.latency) {
            b.fetch_add(*n, Ordering::Relaxed);
        }
    }
}

/// Figures of a version over some window, summed over processes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Requests the version answered (or failed): the host's refusals are not among them.
    pub requests: u64,
    /// Of those, 5xx: the version's own, a trap, a timeout, a memory overrun.
    pub failed: u64,
    /// Requests the host refused before or instead of the version (429, 503 sheds, 401...).
    pub refused: u64,
    /// Counts per latency bucket (see [`bounds`]).
    pub latency: Vec<u64>,
}

impl Figures {
    pub fn is_empty(&self) -> bool {
        self.requests == 0 && self.refused == 0
    }

    pub fn add(&mut self, other: &Figures) {
        self.requests += other.requests;
        self.failed += other.failed;
        self.refused += other.refused;
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
    }

    /// The share of requests that did not fail, in percent (`None` without requests).
    pub fn success_percent(&self) -> Option<f64> {
        (self.requests > 0)
            .then(|| 100.0 * (self.requests - self.failed) as f64 / self.requests as f64)
    }

    /// Requests that certainly took longer than `ms` (those in buckets whose lower bound is at
    /// least `ms`).
    pub fn slower_than(&self, ms: f64) -> u64 {
        let us = ms * 1000.0;
        self.latency
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                let lower = i.checked_sub(1).map_or(0, |j| bounds()[j]);
                lower as f64 >= us
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// The latency under which a `q` share of requests finished, in ms (a bucket's upper bound;
    /// infinite for the open bucket).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(
                    bounds()
                        .get(i)
                        .map_or(f64::INFINITY, |&us| us as f64 / 1000.0),
                );
            }
        }
        None
    }
}

/// Counters by (function, label).
type ByVersion = HashMap<(String, String), Arc<Counts>>;
/// Shadow comparisons by (function, shadow label, route).
type ByRoute = HashMap<(String, String, String), Arc<Comparisons>>;

/// This process's counters, per function and label, and the id its rows carry.
#[derive(Clone)]
pub struct Stats {
    process: Arc<str>,
    flushes: Arc<std::sync::atomic::AtomicI64>,
    counts: Arc<Mutex<ByVersion>>,
    comparisons: Arc<Mutex<ByRoute>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            process: uuid::Uuid::new_v4().to_string().into(),
            flushes: Arc::default(),
            counts: Arc::default(),
            comparisons: Arc::default(),
        }
    }
}

impl Stats {
    /// The counters of `label` of `function` (the same ones across reloads, so nothing is lost
    /// when a deployment changes while requests are counted). A manifest's version has the
    /// label `manifest`.
    pub fn counts(&self, function: &str, label: &str) -> Arc<Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((function.to_string(), label.to_string()))
            .or_default()
            .clone()
    }

    /// The comparisons of the shadow on `label` of `function` for `route` (kept across
    /// reloads, like [`Self::counts`]).
    pub fn comparisons(&self, function: &str, label: &str, route: &str) -> Arc<Comparisons> {
        self.comparisons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((function.to_string(), label.to_string(), route.to_string()))
            .or_default()
            .clone()
    }

    /// Writes what accumulated to the registry, as the current second's rows.
    pub async fn flush(&self, registry: &Registry) {
        let counts: Vec<_> = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        let at = crate::auth::now_ms() / 1000;
        let flush = self.flushes.fetch_add(1, Ordering::Relaxed);
        for ((function, label), c) in counts {
            let figures = c.take();
            if figures.is_empty() {
                continue;
            }
            if let Err(e) = registry
                .add_figures((&function, &label), (&self.process, flush), at, &figures)
                .await
            {
                tracing::debug!(error = %e, function, label, "version figures not written; kept for the next flush");
                c.restore(&figures);
            }
        }
        let comparisons: Vec<_> = self
            .comparisons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        for ((function, label, route), c) in comparisons {
            let tally = c.take();
            if tally.is_empty() {
                continue;
            }
            if let Err(e) = registry
                .add_comparisons(
                    (&function, &label, &route),
                    (&self.process, flush),
                    at,
                    &tally,
                )
                .await
            {
                tracing::debug!(error = %e, function, label, route, "shadow comparisons not written; kept for the next flush");
                c.restore(tally);
            }
        }
    }

    /// Flushes every [`FLUSH_EVERY`] and prunes old rows once a minute, until `owner` is dropped.
    pub async fn run<T: Send + Sync + 'static>(self, registry: Registry, owner: Weak<T>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            if owner.strong_count() == 0 {
                return;
            }
            self.flush(&registry).await;
            n += 1;
            if n.is_multiple_of(60) {
                let before = crate::auth::now_ms() / 1000
                    - i64::try_from(KEEP.as_secs()).unwrap_or(i64::MAX);
                if let Err(e) = registry.prune_figures(before).await {
                    tracing::debug!(error = %e, "old version figures not pruned");
                }
                if let Err(e) = registry.prune_comparisons(before).await {
                    tracing::debug!(error = %e, "old shadow comparisons not pruned");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_refusals_and_quantiles() {
        let c = Counts::default();
        for _ in 0..97 {
            c.record(StatusCode::OK, None, Duration::from_millis(1));
        }
        c.record(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            Duration::from_millis(1),
        );
        c.record(
            StatusCode::GATEWAY_TIMEOUT,
            Some("function-timeout"),
            Duration::from_millis(100),
        );
        c.record(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("function-failed"),
            Duration::from_millis(2),
        );
        c.record(
            StatusCode::TOO_MANY_REQUESTS,
            Some("rate-limited"),
            Duration::from_millis(1),
        );
        c.record(
            StatusCode::SERVICE_UNAVAILABLE,
            Some("bulkhead-full"),
            Duration::from_millis(1),
        );
        let f = c.take();
        assert_eq!((f.requests, f.failed, f.refused), (100, 3, 2));
        assert_eq!(f.success_percent(), Some(97.0));
        let p50 = f.quantile_ms(0.5).expect("samples");
        assert!((1.0..1.25).contains(&p50), "{p50}");
        let p100 = f.quantile_ms(1.0).expect("samples");
        assert!((100.0..125.0).contains(&p100), "{p100}");
        assert!(c.take().is_empty(), "take leaves zeros");
    }

    #[test]
    fn figures_add_up_across_processes() {
        let (a, b) = (Counts::default(), Counts::default());
        a.record(StatusCode::OK, None, Duration::from_millis(1));
        b.record(StatusCode::BAD_GATEWAY, None, Duration::from_secs(60));
        let mut sum = a.take();
        sum.add(&b.take());
        assert_eq!((sum.requests, sum.failed), (2, 1));
        assert_eq!(sum.quantile_ms(0.99), Some(f64::INFINITY));
    }
}
