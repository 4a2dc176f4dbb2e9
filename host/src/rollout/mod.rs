//! Progressive delivery: a rollout moves a function's traffic from its live version (the
//! baseline) to a candidate in steps (`5,25,50,100` percent by default), judging each step from
//! the registry's per-version figures, in the host, over the step's own window.
//!
//! Layout:
//! - this module: the plan, its gates, and the verdict on a step (pure, so every rule is tested
//!   without a clock or a database).
//! - `driver`: the loop every process runs; one of them, holding the rollout's lease, judges
//!   and moves it (see there for the lease and the fencing).
//!
//! A step's verdict, from the figures since the step's traffic was set:
//! - too few requests (below `min_requests`): wait; once the interval is over, hold (neither
//!   promote nor fail: a quiet hour is not a failed canary) until enough arrive;
//! - a failed success gate, as soon as there are enough requests, or a failed latency gate at
//!   the end of the interval: roll back at once, with the gate and the figures in the history;
//! - the interval over, every gate passed: the next step, or, after the last, promotion.
//!
//! Gates: the candidate's success rate (requests it answered without a 5xx; the host's own
//! refusals, such as 429 and 503 sheds, are not counted) at least `min_success_percent`, its
//! p99 at most `max_p99_ms`, and, where the baseline served enough requests in the same window,
//! no more than `max_success_drop` points below the baseline's success rate and a p99 no more
//! than `max_p99_ratio` times the baseline's (or `p99_slack_ms` above it, whichever allows more:
//! latency buckets are 25% apart, and a fast baseline's p99 moves by whole milliseconds).

mod driver;

use serde::{Deserialize, Serialize};

pub use driver::{LEASE, TICK, drive};

use crate::deploy::Figures;
use crate::registry::{Spec, Weighted};

/// Steps when none are given, in percent of traffic.
pub const DEFAULT_STEPS: [u32; 4] = [5, 25, 50, 100];
/// How long each step runs when no interval is given.
pub const DEFAULT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// Shortest interval: figures reach the registry once a second.
pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
pub const MAX_STEPS: usize = 10;

/// How a rollout proceeds, stored with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Percent of traffic on the candidate at each step; increasing, ending at 100.
    pub steps: Vec<u32>,
    pub interval_ms: u64,
    #[serde(default)]
    pub gates: Gates,
    /// The live deployment's sticky key, kept on every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// Requests a step needs before it is judged.
    pub min_requests: u64,
    pub min_success_percent: f64,
    pub max_p99_ms: f64,
    /// How many percentage points below the baseline's success rate the candidate may be.
    pub max_success_drop: f64,
    /// How many times the baseline's p99 the candidate's may be...
    pub max_p99_ratio: f64,
    /// ...or this many ms above it, whichever allows more.
    pub p99_slack_ms: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            min_requests: 100,
            min_success_percent: 99.0,
            max_p99_ms: 1000.0,
            max_success_drop: 1.0,
            max_p99_ratio: 1.5,
            p99_slack_ms: 20.0,
        }
    }
}

impl Plan {
    /// Why this plan cannot run, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(format!("a rollout has 1 to {MAX_STEPS} steps"));
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1])
            || self.steps.iter().any(|s| !(1..=100).contains(s))
        {
            return Err("steps are percentages from 1 to 100, each above the one before".into());
        }
        if self.steps.last() != Some(&100) {
            return Err("the last step is 100 (the candidate takes all traffic)".into());
        }
        let min = u64::try_from(MIN_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if self.interval_ms < min || self.interval_ms > 24 * 3600 * 1000 {
            return Err("the interval is between 1s and 24h".into());
        }
        let g = &self.gates;
        let percent = |v: f64| (0.0..=100.0).contains(&v);
        if !percent(g.min_success_percent) || !percent(g.max_success_drop) {
            return Err("success gates are percentages from 0 to 100".into());
        }
        if !(g.max_p99_ms > 0.0 && g.max_p99_ratio >= 1.0 && g.p99_slack_ms >= 0.0) {
            return Err(
                "latency gates: max_p99_ms above 0, max_p99_ratio at least 1, p99_slack_ms at least 0"
                    .into(),
            );
        }
        if g.min_requests == 0 {
            return Err("min_requests is at least 1".into());
        }
        Ok(())
    }

    /// `step 2 of 4 (25% on v2)`: how the history, the CLI and the API name a step.
    pub fn step_name(&self, step: usize, candidate: &str) -> String {
        format!(
            "step {} of {} ({}% on {candidate})",
            step + 1,
            self.steps.len(),
            self.steps.get(step).copied().unwrap_or(100)
        )
    }

    /// The traffic at `step`: the candidate takes the step's share, the baseline the rest (at
    /// 100% the baseline stays deployed at 0, so a rollback at the last step is instant).
    pub fn spec(&self, step: usize, baseline: &str, candidate: &str) -> Spec {
        let w = self.steps.get(step).copied().unwrap_or(100);
        Spec {
            versions: vec![
                Weighted {
                    label: baseline.into(),
                    weight: 100 - w,
                },
                Weighted {
                    label: candidate.into(),
                    weight: w,
                },
            ],
            sticky: self.sticky.clone(),
            // The candidate takes live traffic now: a shadow on it has served its purpose.
            shadow: None,
        }
    }
}

/// The traffic once a rollout is over: all of it on one version.
pub fn only(label: &str, sticky: Option<String>) -> Spec {
    Spec {
        versions: vec![Weighted {
            label: label.into(),
            weight: 100,
        }],
        sticky,
        shadow: None,
    }
}

/// Requests a version needs before its p99 is judged: the p99 of fewer is about their maximum,
/// one slow moment (a reload, a noisy neighbour) rather than the version's latency. With the
/// default `min_requests` (100) every judged step has them.
pub const LATENCY_SAMPLE: u64 = 100;

/// The first whole second of a step that began at `started_ms`: figures are per second, and a
/// window that took in the second the step began would credit the baseline with requests from
/// before it (when it had all the traffic and no reload was going on), to the candidate's
/// disadvantage.
pub fn window_start(started_ms: i64) -> i64 {
    (started_ms + 999) / 1000
}

/// What to do with a step now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough requests yet, interval not over: look again later.
    Wait,
    /// The interval is over without enough requests: neither promote nor fail.
    Hold(String),
    /// Every gate passed over the interval.
    Pass(String),
    /// A gate failed: roll back.
    Fail(String),
}

/// `requests, success, p99` of a version, for the history and the CLI.
pub fn describe(label: &str, f: &Figures) -> String {
    format!(
        "{label}: {} requests, {} ok, p99 {}",
        f.requests,
        f.success_percent()
            .map_or("-".into(), |s| format!("{s:.2}%")),
        f.quantile_ms(0.99)
            .map_or("-".into(), |p| format!("{p:.1} ms")),
    )
}

/// Judges a step from the candidate's and the baseline's figures over the step's window.
pub fn judge(
    gates: &Gates,
    (label, candidate): (&str, &Figures),
    (base_label, baseline): (&str, Option<&Figures>),
    interval_over: bool,
) -> Verdict {
    if candidate.requests < gates.min_requests {
        return if interval_over {
            Verdict::Hold(format!(
                "holding: {label} has served fewer than {} requests since this step began",
                gates.min_requests
            ))
        } else {
            Verdict::Wait
        };
    }
    let success = candidate.success_percent().unwrap_or(100.0);
    let p99 = candidate.quantile_ms(0.99).unwrap_or(0.0);
    let figures = describe(label, candidate);
    if success < gates.min_success_percent {
        return Verdict::Fail(format!(
            "success gate: {figures}; below {}%",
            gates.min_success_percent
        ));
    }
    let baseline = baseline.filter(|b| b.requests >= gates.min_requests);
    if let Some(b) = baseline {
        let b_success = b.success_percent().unwrap_or(100.0);
        if success < b_success - gates.max_success_drop {
            return Verdict::Fail(format!(
                "success against the baseline: {figures}; {}; more than {} points below",
                describe(base_label, b),
                gates.max_success_drop
            ));
        }
    }
    // Errors fail a step as soon as they show; latency is judged once, over the whole interval:
    // a p99 of a small sample is close to its maximum, and looking at it every tick would fail
    // healthy canaries on one slow moment.
    if !interval_over {
        return Verdict::Wait;
    }
    if candidate.requests < LATENCY_SAMPLE {
        return Verdict::Pass(format!(
            "{figures} (too few requests to judge latency: fewer than {LATENCY_SAMPLE})"
        ));
    }
    if p99 > gates.max_p99_ms {
        return Verdict::Fail(format!(
            "latency gate: {figures}; p99 above {} ms",
            gates.max_p99_ms
        ));
    }
    if let Some(b) = baseline.filter(|b| b.requests >= LATENCY_SAMPLE) {
        let b_p99 = b.quantile_ms(0.99).unwrap_or(0.0);
        let allowed = (b_p99 * gates.max_p99_ratio).max(b_p99 + gates.p99_slack_ms);
        if p99 > allowed && slower_than_baseline(candidate, b, allowed) {
            return Verdict::Fail(format!(
                "latency against the baseline: {figures}; {}; p99 above {allowed:.1} ms, with {} of {} requests slower",
                describe(base_label, b),
                candidate.slower_than(allowed),
                candidate.requests,
            ));
        }
    }
    Verdict::Pass(match baseline {
        Some(b) => format!("{figures}; {}", describe(base_label, b)),
        None => figures,
    })
}

/// Whether the candidate has significantly more requests slower than `threshold` than the
/// baseline's share would give it: more than three standard deviations above a binomial with
/// the baseline's share (at least the 1% a p99 leaves above it). Comparing two p99s of a few
/// hundred requests compares two of their slowest requests: a healthy canary's first requests
/// on cold code, or one pause, would fail it. A slower version has many slow requests.
fn slower_than_baseline(candidate: &Figures, baseline: &Figures, threshold: f64) -> bool {
    let n = candidate.requests as f64;
    let share =
        (baseline.slower_than(threshold) as f64 / baseline.requests.max(1) as f64).max(0.01);
    let expected = n * share;
    let slow = candidate.slower_than(threshold) as f64;
    slow > expected + 3.0 * (expected * (1.0 - share)).sqrt()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use super::*;
    use crate::deploy::Counts;

    /// Figures of `n` requests, `failed` of them 500s, each taking `ms`.
    fn figures(n: u64, failed: u64, ms: u64) -> Figures {
        let c = Counts::default();
        for i in 0..n {
            let status = if i < failed {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            c.record(status, None, Duration::from_millis(ms));
        }
        let mut f = Figures::default();
        f.add(&c.take());
        f
    }

    fn j(c: &Figures, b: Option<&Figures>, over: bool) -> Verdict {
        judge(&Gates::default(), ("v2", c), ("v1", b), over)
    }

    #[test]
    fn too_few_requests_wait_then_hold_never_fail_or_pass() {
        let few = figures(99, 99, 5);
        assert_eq!(j(&few, None, false), Verdict::Wait);
        assert!(matches!(j(&few, None, true), Verdict::Hold(_)));
    }

    #[test]
    fn a_failed_gate_fails_at_once_a_passing_step_waits_for_its_interval() {
        let bad = figures(200, 10, 5);
        let Verdict::Fail(why) = j(&bad, None, false) else {
            panic!("5% errors pass");
        };
        assert!(
            why.starts_with("success gate: v2: 200 requests, 95.00% ok"),
            "{why}"
        );
        let good = figures(200, 0, 5);
        assert_eq!(j(&good, None, false), Verdict::Wait);
        assert!(matches!(j(&good, None, true), Verdict::Pass(_)));
        // Latency is judged over the whole interval, not on the way.
        let slow = figures(200, 0, 2000);
        assert_eq!(j(&slow, None, false), Verdict::Wait);
        assert!(matches!(j(&slow, None, true), Verdict::Fail(w) if w.starts_with("latency gate")));
    }

    #[test]
    fn the_baseline_sets_the_bar_when_it_served_enough() {
        let base = figures(1000, 0, 5);
        // 99.5% passes the absolute gate but is 0.5 points below: within the 1 point margin.
        assert!(matches!(
            j(&figures(200, 1, 5), Some(&base), true),
            Verdict::Pass(_)
        ));
        let strict = Gates {
            max_success_drop: 0.1,
            ..Gates::default()
        };
        assert!(matches!(
            judge(&strict, ("v2", &figures(200, 1, 5)), ("v1", Some(&base)), true),
            Verdict::Fail(w) if w.starts_with("success against the baseline")
        ));
        // 5 ms against 5 ms with a bucket of noise passes; 100 ms against 5 ms does not.
        assert!(matches!(
            j(&figures(200, 0, 7), Some(&base), true),
            Verdict::Pass(_)
        ));
        assert!(matches!(
            j(&figures(200, 0, 100), Some(&base), true),
            Verdict::Fail(w) if w.starts_with("latency against the baseline")
        ));
        // A couple of slow requests (cold code, one pause) move a small sample's p99, not the
        // verdict.
        let mut cold = figures(198, 0, 5);
        cold.add(&figures(2, 0, 100));
        assert!(matches!(j(&cold, Some(&base), true), Verdict::Pass(_)));
        let mut slow = figures(180, 0, 5);
        slow.add(&figures(20, 0, 100));
        assert!(matches!(j(&slow, Some(&base), true), Verdict::Fail(_)));
        // A baseline with too few requests is not a bar.
        assert!(matches!(
            j(&figures(200, 0, 100), Some(&figures(5, 0, 5)), true),
            Verdict::Pass(_)
        ));
    }

    #[test]
    fn plans_are_checked() {
        let plan = |steps: &[u32], interval_ms| Plan {
            steps: steps.to_vec(),
            interval_ms,
            gates: Gates::default(),
            sticky: None,
        };
        assert_eq!(plan(&[5, 25, 50, 100], 30_000).check(), Ok(()));
        assert!(plan(&[], 30_000).check().is_err());
        assert!(plan(&[50, 25, 100], 30_000).check().is_err());
        assert!(plan(&[5, 50], 30_000).check().is_err());
        assert!(plan(&[0, 100], 30_000).check().is_err());
        assert!(plan(&[100], 10).check().is_err());
        let spec = plan(&[5, 100], 1000).spec(0, "v1", "v2");
        assert_eq!(
            spec.versions.iter().map(|w| w.weight).collect::<Vec<_>>(),
            [95, 5]
        );
        assert_eq!(
            plan(&[5, 100], 1000).spec(1, "v1", "v2").versions[0].weight,
            0
        );
    }
}
