//! Per-version figures for the admin API, read from this process's own metrics: requests by
//! outcome and the latency histogram of each version of a function.

use std::collections::BTreeMap;

/// Outcomes that are the function's failure (500/504), as opposed to a request the host
/// refused on purpose (rate limit, auth, bulkhead...).
const FAILURES: &[&str] = &[
    "function-failed",
    "function-timeout",
    "function-memory-exceeded",
    "function-no-response",
    "internal",
];

#[derive(Debug, Default, PartialEq, serde::Serialize)]
pub struct VersionSummary {
    pub version: String,
    pub requests: u64,
    pub failed: u64,
    pub refused: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    #[serde(skip)]
    buckets: Vec<(f64, u64)>,
}

/// `name{a="x",b="y"} value` -> (name, labels, value).
fn sample(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let (name, labels) = head.split_once('{')?;
    let labels = labels
        .strip_suffix('}')?
        .split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k, v.trim_end_matches('"')))
        })
        .collect();
    Some((name, labels, value.parse().ok()?))
}

/// The smallest bucket bound holding a `q` share of the samples, in ms.
fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.iter().map(|(_, n)| *n).max()?;
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    buckets.iter().find(|(_, n)| *n >= want).map(|(le, _)| {
        if le.is_finite() {
            le * 1000.0
        } else {
            f64::INFINITY
        }
    })
}

/// Every version of `function` this process has served, from the Prometheus `text`.
pub fn of(text: &str, function: &str) -> Vec<VersionSummary> {
    let mut by_version: BTreeMap<String, VersionSummary> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        if labels.get("function") != Some(&function) {
            continue;
        }
        let Some(version) = labels.get("version") else {
            continue;
        };
        let entry = by_version
            .entry(version.to_string())
            .or_insert_with(|| VersionSummary {
                version: version.to_string(),
                ..Default::default()
            });
        match name {
            "wasmgate_requests_total" => {
                let n = value as u64;
                entry.requests += n;
                match labels.get("outcome") {
                    Some(&"ok") | None => {}
                    Some(o) if FAILURES.contains(o) => entry.failed += n,
                    Some(_) => entry.refused += n,
                }
            }
            "wasmgate_request_duration_seconds_bucket" => {
                let le = match labels.get("le") {
                    Some(&"+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                entry.buckets.push((le, value as u64));
            }
            _ => {}
        }
    }
    by_version
        .into_values()
        .map(|mut v| {
            v.buckets
                .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
            v.p50_ms = quantile(&v.buckets, 0.5);
            v.p99_ms = quantile(&v.buckets, 0.99);
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counts_and_quantiles_per_version() {
        let text = r#"
# TYPE wasmgate_requests_total counter
wasmgate_requests_total{function="pages",version="aaa",outcome="ok"} 98
wasmgate_requests_total{function="pages",version="aaa",outcome="function-failed"} 2
wasmgate_requests_total{function="pages",version="bbb",outcome="rate-limited"} 5
wasmgate_requests_total{function="other",version="ccc",outcome="ok"} 7
wasmgate_request_duration_seconds_bucket{function="pages",version="aaa",le="0.001"} 50
wasmgate_request_duration_seconds_bucket{function="pages",version="aaa",le="0.01"} 99
wasmgate_request_duration_seconds_bucket{function="pages",version="aaa",le="+Inf"} 100
"#;
        let s = of(text, "pages");
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].requests, s[0].failed, s[0].refused), (100, 2, 0));
        assert_eq!((s[0].p50_ms, s[0].p99_ms), (Some(1.0), Some(10.0)));
        assert_eq!(
            (s[1].version.as_str(), s[1].refused, s[1].p99_ms),
            ("bbb", 5, None)
        );
    }
}
