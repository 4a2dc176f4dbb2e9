//! What a route points at: the versions of one function and how traffic splits between them.
//!
//! Without a sticky key each request draws a random point in [0, 100) against the cumulative
//! weights. With one, the split is weighted rendezvous hashing: every version scores the key
//! (`weight / -ln(hash(key, version))`) and the highest score wins. A version whose weight rises
//! only ever wins more keys, so ramping a canary moves keys onto it and never back.

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use http::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::policy::FunctionService;
use crate::runtime::Function;

/// One deployed version: the function, its policy stack and its metric handles, built once at
/// load so the request path neither formats labels nor looks metrics up.
#[derive(Clone)]
pub struct Version {
    pub function: Function,
    pub service: FunctionService,
    pub metrics: VersionMetrics,
    /// What it served, for the registry's per-version figures (kept across reloads).
    pub counts: std::sync::Arc<super::Counts>,
    /// The `wasmgate-version` response header's value.
    pub header: HeaderValue,
}

#[derive(Clone)]
pub struct VersionMetrics {
    /// `function` and `version` label values (the version is the sha256's first 12 digits).
    pub function: std::sync::Arc<str>,
    pub version: std::sync::Arc<str>,
    pub ok: metrics::Counter,
    pub duration: metrics::Histogram,
}

/// The response header that names the version that served a request.
pub const VERSION_HEADER: HeaderName = HeaderName::from_static("wasmgate-version");

impl Version {
    pub fn new(
        function: Function,
        service: FunctionService,
        counts: std::sync::Arc<super::Counts>,
    ) -> Self {
        let name: std::sync::Arc<str> = function.name().into();
        let version: std::sync::Arc<str> = function.sha256()[..12].into();
        let header = HeaderValue::from_str(&version).expect("hex digits are a header value");
        let metrics = VersionMetrics {
            ok: metrics::counter!("wasmgate_requests_total", "function" => name.clone(), "version" => version.clone(), "outcome" => "ok"),
            duration: metrics::histogram!("wasmgate_request_duration_seconds", "function" => name.clone(), "version" => version.clone()),
            function: name,
            version,
        };
        Self {
            function,
            service,
            metrics,
            counts,
            header,
        }
    }
}

impl std::fmt::Debug for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.function.fmt(f)
    }
}

/// Where a sticky split reads its key from.
#[derive(Debug, Clone, PartialEq)]
pub enum StickyKey {
    Header(HeaderName),
    Cookie(String),
    ClientIp,
}

impl StickyKey {
    /// `header:<name>`, `cookie:<name>` or `client-ip`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "client-ip" {
            return Ok(Self::ClientIp);
        }
        if let Some(h) = s.strip_prefix("header:") {
            return HeaderName::from_bytes(h.as_bytes())
                .map(Self::Header)
                .map_err(|_| format!("`{h}` is not a header name"));
        }
        if let Some(c) = s.strip_prefix("cookie:").filter(|c| !c.is_empty()) {
            return Ok(Self::Cookie(c.to_string()));
        }
        Err(format!(
            "sticky key `{s}` is not understood; use \"header:<name>\", \"cookie:<name>\" or \"client-ip\""
        ))
    }

    fn of<'a>(
        &self,
        headers: &'a http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Option<std::borrow::Cow<'a, [u8]>> {
        match self {
            Self::Header(h) => headers.get(h).map(|v| v.as_bytes().into()),
            Self::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then(|| v.as_bytes().to_vec().into())
                }),
            Self::ClientIp => extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string().into_bytes().into()),
        }
    }
}

/// The versions of one function behind a route, with their weights (summing to 100).
#[derive(Debug, Clone)]
pub struct VersionSet<V = Version> {
    versions: Vec<(u32, V, String)>,
    sticky: Option<StickyKey>,
    /// The registry labels of `versions`, in order (empty for a manifest's single version).
    labels: Vec<String>,
}

impl<V> VersionSet<V> {
    pub fn single(version: V) -> Self {
        Self {
            versions: vec![(100, version, String::new())],
            sticky: None,
            labels: Vec::new(),
        }
    }

    /// `(weight, version, id)`: the id names the version in the sticky hash (its sha256), so
    /// a key keeps its version across reloads and processes.
    pub fn weighted(
        versions: Vec<(u32, V, String)>,
        sticky: Option<StickyKey>,
    ) -> Result<Self, String> {
        let total: u32 = versions.iter().map(|(w, _, _)| *w).sum();
        if versions.is_empty() || total != 100 {
            return Err(format!("weights must sum to 100, not {total}"));
        }
        Ok(Self {
            versions,
            sticky,
            labels: Vec::new(),
        })
    }

    /// Names the versions (in order) so a preview request can pick one by its label.
    pub fn with_labels(mut self, labels: Vec<String>) -> Self {
        self.labels = labels;
        self
    }

    /// The version labelled `label`, whatever its weight (a preview: 0% included).
    pub fn labelled(&self, label: &str) -> Option<&V> {
        let i = self.labels.iter().position(|l| l == label)?;
        self.versions.get(i).map(|(_, v, _)| v)
    }

    /// The version a request with these headers and extensions runs on.
    pub fn pick(&self, headers: &http::HeaderMap, extensions: &http::Extensions) -> &V {
        if let [(_, only, _)] = self.versions.as_slice() {
            return only;
        }
        match self.sticky.as_ref().and_then(|k| k.of(headers, extensions)) {
            Some(key) => self.by_key(&key),
            None => self.at(random_point()),
        }
    }

    /// The version at `point` in [0, 100) of the cumulative weights.
    fn at(&self, point: f64) -> &V {
        let mut edge = 0.0;
        for (w, v, _) in &self.versions {
            edge += f64::from(*w);
            if point < edge {
                return v;
            }
        }
        &self.versions[self.versions.len() - 1].1
    }

    /// Weighted rendezvous hashing: the highest `weight / -ln(u)` wins, `u` from the key and the
    /// version's id.
    fn by_key(&self, key: &[u8]) -> &V {
        let mut best = (f64::MIN, &self.versions[0].1);
        for (w, v, id) in &self.versions {
            if *w == 0 {
                continue;
            }
            let digest = Sha256::new()
                .chain_update(id.as_bytes())
                .chain_update([0])
                .chain_update(key)
                .finalize();
            let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
            // (0, 1]: never 0, so the logarithm is finite.
            let u = (n >> 11) as f64 / (1u64 << 53) as f64 + f64::EPSILON;
            let score = f64::from(*w) / -u.min(1.0 - f64::EPSILON).ln();
            if score > best.0 {
                best = (score, v);
            }
        }
        best.1
    }
}

/// A uniform point in [0, 100): a weighted pick, a sampled share.
pub(crate) fn random_point() -> f64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source is available");
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> http::HeaderMap {
        headers
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                )
            })
            .collect()
    }

    impl VersionSet<&'static str> {
        fn choose(&self, headers: &http::HeaderMap) -> &'static str {
            self.pick(headers, &http::Extensions::new())
        }
    }

    fn split(weights: &[(u32, &'static str)], sticky: Option<&str>) -> VersionSet<&'static str> {
        VersionSet::weighted(
            weights
                .iter()
                .map(|(w, v)| (*w, *v, format!("sha-{v}")))
                .collect(),
            sticky.map(|s| StickyKey::parse(s).expect("sticky key")),
        )
        .expect("weights")
    }

    #[test]
    fn a_90_10_split_lands_within_a_point() {
        let set = split(&[(90, "v1"), (10, "v2")], None);
        let h = head(&[]);
        let v2 = (0..20_000).filter(|_| set.choose(&h) == "v2").count();
        assert!((1_800..=2_200).contains(&v2), "{v2} of 20,000 on v2");
    }

    #[test]
    fn sticky_keys_only_move_onto_a_rising_version() {
        let keys: Vec<String> = (0..5_000).map(|i| format!("user-{i}")).collect();
        let mut on_new = vec![false; keys.len()];
        for pct in [1, 5, 25, 50, 100] {
            let set = split(
                &[(100 - pct, "old"), (pct, "new")],
                Some("header:x-user-id"),
            );
            let mut count = 0;
            for (i, k) in keys.iter().enumerate() {
                let now_new = set.choose(&head(&[("x-user-id", k)])) == "new";
                assert!(!on_new[i] || now_new, "{k} moved back at {pct}%");
                on_new[i] = now_new;
                count += usize::from(now_new);
            }
            let share = count as f64 / keys.len() as f64 * 100.0;
            assert!(
                (share - f64::from(pct)).abs() < 3.0,
                "{share:.1}% on new at {pct}%"
            );
        }
    }

    #[test]
    fn sticky_keys_come_from_headers_cookies_or_fall_back_to_random() {
        let set = split(&[(50, "a"), (50, "b")], Some("cookie:uid"));
        let with = head(&[("cookie", "theme=dark; uid=42")]);
        let first = set.choose(&with);
        assert!(
            (0..50).all(|_| set.choose(&with) == first),
            "one key, one version"
        );
        assert!(StickyKey::parse("header:bad header").is_err());
        assert!(StickyKey::parse("cookie:").is_err());
        assert!(VersionSet::weighted(vec![(60, "a", String::new())], None).is_err());
    }
}
