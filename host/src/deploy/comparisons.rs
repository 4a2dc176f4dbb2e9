//! What shadow runs found, per route: how many answered as the live version did, how many did
//! not (and a few request ids of those, to look up in the logs), how many were skipped. Counted
//! in this process and written to the registry with the version figures (see `stats`), so the
//! admin API sums every process.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Mismatches kept per route and flush, and per route when read.
pub const SAMPLES: usize = 10;

/// How a shadow run compared with the live response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Same status, same body (sha256).
    Matched,
    /// Another status.
    Status,
    /// The same status, another body.
    Body,
    /// The shadow run failed (trap, timeout, memory cap, no response).
    Failed,
}

/// A mismatch, to look up by its request id (the live request's and the shadow run's log lines
/// carry the same one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub request_id: String,
    pub verdict: Verdict,
    pub live_status: u16,
    pub shadow_status: u16,
}

/// One route's comparisons in this process since the last flush.
#[derive(Default)]
pub struct Comparisons {
    matched: AtomicU64,
    status: AtomicU64,
    body: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    samples: Mutex<Vec<Sample>>,
}

impl Comparisons {
    pub fn record(&self, sample: Sample) {
        let counter = match sample.verdict {
            Verdict::Matched => &self.matched,
            Verdict::Status => &self.status,
            Verdict::Body => &self.body,
            Verdict::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if sample.verdict != Verdict::Matched {
            let mut samples = self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if samples.len() < SAMPLES {
                samples.push(sample);
            }
        }
    }

    /// A request that was chosen but not compared (the live response did not complete, or
    /// too many shadow runs were running).
    pub fn skip(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn take(&self) -> Tally {
        Tally {
            matched: self.matched.swap(0, Ordering::Relaxed),
            status: self.status.swap(0, Ordering::Relaxed),
            body: self.body.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
            skipped: self.skipped.swap(0, Ordering::Relaxed),
            samples: std::mem::take(
                &mut *self
                    .samples
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
        }
    }

    pub(crate) fn restore(&self, t: Tally) {
        self.matched.fetch_add(t.matched, Ordering::Relaxed);
        self.status.fetch_add(t.status, Ordering::Relaxed);
        self.body.fetch_add(t.body, Ordering::Relaxed);
        self.failed.fetch_add(t.failed, Ordering::Relaxed);
        self.skipped.fetch_add(t.skipped, Ordering::Relaxed);
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = SAMPLES.saturating_sub(samples.len());
        samples.extend(t.samples.into_iter().take(room));
    }
}

/// A route's comparisons over some time, summed over processes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub matched: u64,
    /// Another status than the live response's.
    pub status: u64,
    /// The same status, another body.
    pub body: u64,
    /// The shadow run failed.
    pub failed: u64,
    pub skipped: u64,
    /// Mismatches, newest last.
    pub samples: Vec<Sample>,
}

impl Tally {
    pub fn is_empty(&self) -> bool {
        self.compared() == 0 && self.skipped == 0
    }

    /// Runs compared with their live response.
    pub fn compared(&self) -> u64 {
        self.matched + self.status + self.body + self.failed
    }

    /// The share of compared runs that matched, in percent (`None` before any).
    pub fn match_percent(&self) -> Option<f64> {
        let n = self.compared();
        (n > 0).then(|| 100.0 * self.matched as f64 / n as f64)
    }

    /// Adds `other` (later) to this; keeps the newest [`SAMPLES`] mismatches.
    pub fn add(&mut self, other: Tally) {
        self.matched += other.matched;
        self.status += other.status;
        self.body += other.body;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.samples.extend(other.samples);
        let extra = self.samples.len().saturating_sub(SAMPLES);
        self.samples.drain(..extra);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(verdict: Verdict, n: u16) -> Sample {
        Sample {
            request_id: format!("r{n}"),
            verdict,
            live_status: 200,
            shadow_status: 200 + n,
        }
    }

    #[test]
    fn counts_by_verdict_and_keeps_a_few_mismatches() {
        let c = Comparisons::default();
        for n in 0..30 {
            c.record(sample(Verdict::Matched, n));
            c.record(sample(Verdict::Body, n));
        }
        c.record(sample(Verdict::Failed, 99));
        c.skip();
        let t = c.take();
        assert_eq!((t.matched, t.body, t.failed, t.skipped), (30, 30, 1, 1));
        assert_eq!(t.compared(), 61);
        assert_eq!(t.samples.len(), SAMPLES);
        assert!(t.samples.iter().all(|s| s.verdict != Verdict::Matched));
        assert!(c.take().is_empty(), "take leaves zeros");

        let mut sum = Tally::default();
        sum.add(t.clone());
        sum.add(t);
        assert_eq!(sum.matched, 60);
        assert_eq!(sum.samples.len(), SAMPLES, "only the newest are kept");
        assert!((sum.match_percent().expect("runs") - 60.0 / 122.0 * 100.0).abs() < 1e-9);
    }
}
