//! The manifest (`wasmgate.toml`): typed, strict, and validated as a whole.
//!
//! Parsing is strict (`deny_unknown_fields`) so a misspelt key is an error that names it. After
//! parsing, [`Manifest::validate`] collects *every* problem it can find (not only the first), so an
//! operator fixes a broken manifest in one pass. Problems that need the `.wasm` files (missing,
//! invalid, wrong world) are found by the loader and reported the same way.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why a function gets this long by default: long enough for a handler that makes a few
/// database round trips under load, short enough that a stuck guest frees its slot quickly.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// A handler's linear memory cap. 64 MiB holds a Rust handler with room to spare, and caps what a
/// runaway guest can take from the host (times `max_instances` at worst).
pub const DEFAULT_MEMORY: u64 = 64 * 1024 * 1024;
/// Request bodies above this are refused with 413 before the guest sees them. 1 MiB is plenty for
/// JSON APIs; functions that accept uploads raise it.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
/// Where `wasmgate up` listens when neither the manifest nor `--listen` says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Live instances across all functions. Each slot reserves address space (not memory) in the
/// pooling allocator; 1,000 is wasmtime's own default and far above what 2 cores keep busy.
pub const DEFAULT_MAX_INSTANCES: u32 = 1000;
/// Open connections per listener; past it, a 503 and close (`connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// A request head must arrive whole this soon after the server starts waiting for it (also the
/// keep-alive idle timeout: hyper runs one timer for both).
pub const DEFAULT_REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Compiled components are cached here, relative to the manifest, so a restart skips cranelift.
pub const DEFAULT_CACHE_DIR: &str = ".wasmgate/cache";

/// Methods a route may name. Extension methods are refused so a typo ("GTE") is an error, not a
/// route nobody can call.
pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Paths the host answers itself; a route may not claim them.
pub const RESERVED_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics", crate::auth::JWKS_PATH];

/// The whole manifest, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub backends: crate::capabilities::BackendsConfig,
    /// Tokens the host issues and verifies (used when a route has `auth` or a function is
    /// granted the `auth` capability).
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    /// Argon2id's parameters and thread budget for the `password` capability.
    #[serde(default)]
    pub password: crate::capabilities::password::PasswordConfig,
    /// Functions by name: a TOML table makes duplicate names a parse error.
    #[serde(default)]
    pub functions: BTreeMap<String, FunctionConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Event functions fed from topics.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// `[[subscriptions]]`: the events of `topic` delivered to event function `function`, each
/// handled once.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    pub topic: String,
    pub function: String,
    /// Names the subscription (its consumer group and inbox); default `<function>.<topic>`.
    /// Renaming it starts a new subscription from the topic's first retained event.
    pub name: Option<String>,
    /// `key` (default): one key's events one after another in sequence order, other keys in
    /// parallel. `none`: in any order, all in parallel.
    #[serde(default)]
    pub ordering: Ordering,
    /// Tries before an event goes to the dead-letter queue.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The first retry's delay; each next one doubles, with jitter, up to [`MAX_BACKOFF`].
    #[serde(default = "default_backoff", deserialize_with = "human_duration")]
    pub backoff: Duration,
    /// How long an event may stay with a consumer that neither acknowledges nor renews it
    /// before another consumer takes it (a process that died).
    #[serde(
        default = "default_redeliver_after",
        deserialize_with = "human_duration"
    )]
    pub redeliver_after: Duration,
    /// Events handled at once (of different keys, with `ordering = "key"`). Each holds a
    /// database connection while it runs: keep it well under the pool (16 on PostgreSQL).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ordering {
    #[default]
    Key,
    None,
}

/// The longest pause between two tries of an event.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

fn default_max_attempts() -> u32 {
    5
}
fn default_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_redeliver_after() -> Duration {
    Duration::from_secs(30)
}
fn default_concurrency() -> u32 {
    8
}

impl SubscriptionConfig {
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}.{}", self.function, self.topic))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_instances: u32,
    /// Fresh instances kept instantiated ahead of requests, across all functions. 0 (the
    /// default): none; see `runtime::warm_pool` for when they pay.
    pub warm_instances: u32,
    pub cache_dir: PathBuf,
    /// Open connections on each listener.
    pub max_connections: u32,
    #[serde(deserialize_with = "human_duration")]
    pub request_head_timeout: Duration,
    /// HTTPS on both listeners (public and admin); plain HTTP without it.
    pub tls: Option<crate::tls::TlsConfig>,
    /// What one component may hold, for the instance pool.
    pub component_limits: ComponentLimits,
}

/// What one component instance may hold. The pool reserves room by these, so they bound
/// components rather than describe one; a component over a limit is refused at load (and at
/// deploy) with the setting to raise. The defaults admit what the common toolchains build:
/// cargo's `wasm32-wasip2` (a handful of core instances), componentize-py (14 core instances)
/// and componentize-js.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComponentLimits {
    /// Core module instances, the component's own and its adapters' and shims'.
    pub core_instances: u32,
    /// Linear memories across those instances.
    pub memories: u32,
    /// Tables across those instances.
    pub tables: u32,
}

impl Default for ComponentLimits {
    fn default() -> Self {
        Self {
            core_instances: 32,
            memories: 4,
            tables: 16,
        }
    }
}

impl ServerConfig {
    /// The connection limits both listeners (public, admin) get.
    pub fn connections(&self) -> crate::connections::Limits {
        crate::connections::Limits {
            max_connections: self.max_connections,
            request_head_timeout: self.request_head_timeout,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid socket address"),
            max_instances: DEFAULT_MAX_INSTANCES,
            warm_instances: 0,
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_head_timeout: DEFAULT_REQUEST_HEAD_TIMEOUT,
            tls: None,
            component_limits: ComponentLimits::default(),
        }
    }
}

/// One function: a component and the limits every request to it runs under.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Path to the component, relative to the manifest.
    pub wasm: PathBuf,
    #[serde(default = "default_timeout", deserialize_with = "human_duration")]
    pub timeout: Duration,
    #[serde(default = "default_memory", deserialize_with = "human_size")]
    pub memory: u64,
    #[serde(default = "default_max_body", deserialize_with = "human_size")]
    pub max_body: u64,
    /// What the function may import; anything else is refused at load.
    #[serde(default)]
    pub capabilities: crate::capabilities::Grants,
    /// A folder of `NNNN_name.sql` files applied at start (needs the `db` capability).
    pub migrations: Option<PathBuf>,
    /// Sequential requests one instance may serve (0, the default: a fresh instance each).
    #[serde(default)]
    pub instance_reuse: u32,
    /// Environment variables the guest sees (`wasi:cli/environment`); never the host's own.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Values the guest reads through `wasi:config/store` (granted as `config`); a value may
    /// come from a file or the host's environment, read at load.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, crate::capabilities::wasi_config::ConfigValue>,
    /// Requests per second and burst; none by default.
    pub rate_limit: Option<RateLimitConfig>,
    /// Concurrency cap and bounded queue; always on, so no function can take every instance.
    #[serde(default)]
    pub bulkhead: BulkheadConfig,
}

/// GCRA rate limit for one function (governor locally, a Lua script on Redis when shared).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second.
    pub rps: u32,
    /// Requests allowed at once after a quiet period; defaults to `rps`.
    pub burst: Option<u32>,
    /// Budget per client instead of per function: `"header:<name>"` or `"client-ip"`.
    pub key: Option<String>,
    /// Share the budget with every wasmgate process on the same Redis (needs a Redis URL).
    #[serde(default)]
    pub shared: bool,
    /// When the shared budget's Redis is unreachable: refuse with 503 instead of falling back
    /// to a local budget.
    #[serde(default)]
    pub fail_closed: bool,
}

/// At most 64 of one function's instances run at once by default: with the default 1,000-slot
/// pool, a flooded function leaves room for every other one.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 64;
/// Requests that may wait for a slot; beyond this they are shed at once with 503. Large, since
/// waiting costs a parked task while a refusal costs a whole request for nothing: the queue is
/// bounded by the wait it predicts (`max_wait`), this is only the hard cap (the default
/// `max_connections`).
pub const DEFAULT_MAX_QUEUE: u32 = 10_000;
/// How long a queued request waits for a slot before 503: short, because a client retrying
/// elsewhere beats one waiting here.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "BulkheadSettings")]
pub struct BulkheadConfig {
    pub max_concurrency: u32,
    pub max_queue: u32,
    pub max_wait: Duration,
    /// The limit in force follows measured latency, with `max_concurrency` as its ceiling;
    /// `false` keeps it at `max_concurrency`. By default it adapts unless `max_concurrency` is
    /// written down: a number an operator chose is taken as meant.
    pub adaptive: bool,
}

/// `bulkhead = { ... }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkheadSettings {
    max_concurrency: Option<u32>,
    max_queue: Option<u32>,
    #[serde(default, deserialize_with = "human_duration_opt")]
    max_wait: Option<Duration>,
    adaptive: Option<bool>,
}

impl From<BulkheadSettings> for BulkheadConfig {
    fn from(s: BulkheadSettings) -> Self {
        Self {
            max_concurrency: s.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY),
            max_queue: s.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
            max_wait: s.max_wait.unwrap_or(DEFAULT_MAX_WAIT),
            adaptive: s.adaptive.unwrap_or(s.max_concurrency.is_none()),
        }
    }
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            max_queue: DEFAULT_MAX_QUEUE,
            max_wait: DEFAULT_MAX_WAIT,
            adaptive: true,
        }
    }
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY
}
fn default_max_body() -> u64 {
    DEFAULT_MAX_BODY
}

/// One route: a path (with `{param}` segments, or ending in `/*` for a prefix), the methods it
/// answers (all when empty), and the function that serves it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub path: String,
    #[serde(default)]
    pub methods: Vec<String>,
    pub function: String,
    /// Cache this route's GET (and HEAD) responses in the host.
    pub cache: Option<RouteCacheConfig>,
    /// Honour `Idempotency-Key` on this route's POST and PATCH requests.
    pub idempotency: Option<IdempotencyConfig>,
    /// Who may call this route: verified in the host before anything else runs.
    pub auth: Option<crate::auth::RouteAuthConfig>,
    /// Failed-login throttling (for login routes).
    pub login_throttle: Option<crate::auth::LoginThrottleConfig>,
    /// Calls from browser pages on other origins: preflights answered by the host.
    pub cors: Option<CorsConfig>,
    /// Response compression from `Accept-Encoding`: on unless `compression = false`.
    #[serde(default)]
    pub compression: CompressionSetting,
}

/// How long a browser may keep a preflight's answer by default (Chromium caps it at 2 hours).
pub const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// A route's CORS policy (the Fetch standard's CORS protocol).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed to call: exact (`"https://app.example.com"`), every subdomain of one
    /// (`"https://*.example.com"`), or `"*"` (any, without credentials).
    pub origins: Vec<String>,
    /// Methods a page may use; by default the route's own.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Request headers a page may send beyond the CORS-safelisted ones (`["*"]`: any).
    #[serde(default = "default_cors_headers")]
    pub headers: Vec<String>,
    /// Response headers a page may read beyond the safelisted ones.
    #[serde(default = "default_cors_expose")]
    pub expose: Vec<String>,
    /// Whether a page may send cookies or HTTP authentication and read the answer.
    #[serde(default)]
    pub credentials: bool,
    /// How long a browser keeps a preflight's answer.
    #[serde(default = "default_cors_max_age", deserialize_with = "human_duration")]
    pub max_age: Duration,
}

fn default_cors_headers() -> Vec<String> {
    [
        "authorization",
        "content-type",
        "idempotency-key",
        "if-none-match",
        "if-match",
    ]
    .map(String::from)
    .to_vec()
}

fn default_cors_expose() -> Vec<String> {
    [
        "etag",
        "location",
        "retry-after",
        "x-request-id",
        "wasmgate-version",
    ]
    .map(String::from)
    .to_vec()
}

fn default_cors_max_age() -> Duration {
    DEFAULT_CORS_MAX_AGE
}

/// Bodies smaller than this are sent as they are: encoding them saves too little to pay for
/// itself (and can make them larger).
pub const DEFAULT_COMPRESSION_MIN_SIZE: u64 = 1024;

/// `compression = false`, or `compression = { level = "best", ... }`.
#[derive(Debug, Clone, PartialEq)]
pub enum CompressionSetting {
    Off,
    On(CompressionConfig),
}

impl Default for CompressionSetting {
    fn default() -> Self {
        Self::On(CompressionConfig::default())
    }
}

impl CompressionSetting {
    pub fn config(&self) -> Option<&CompressionConfig> {
        match self {
            Self::Off => None,
            Self::On(c) => Some(c),
        }
    }
}

impl<'de> Deserialize<'de> for CompressionSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CompressionSetting;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`false`, `true` or a table such as { level = \"best\" }")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Self::Value, E> {
                Ok(if on {
                    CompressionSetting::default()
                } else {
                    CompressionSetting::Off
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                CompressionConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(CompressionSetting::On)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default)]
    pub level: CompressionLevel,
    /// Bodies known to be smaller are not encoded.
    #[serde(
        default = "default_compression_min_size",
        deserialize_with = "human_size"
    )]
    pub min_size: u64,
    /// The encodings offered, in order of preference when a client accepts several equally.
    #[serde(default = "default_encodings")]
    pub encodings: Vec<crate::compression::Encoding>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            level: CompressionLevel::default(),
            min_size: DEFAULT_COMPRESSION_MIN_SIZE,
            encodings: default_encodings(),
        }
    }
}

/// Named, because each format counts its levels differently (`compression` maps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionLevel {
    Fastest,
    #[default]
    Default,
    Best,
}

fn default_compression_min_size() -> u64 {
    DEFAULT_COMPRESSION_MIN_SIZE
}

fn default_encodings() -> Vec<crate::compression::Encoding> {
    crate::compression::Encoding::ALL.to_vec()
}

/// 404s are cached this long at most: long enough to absorb a burst of lookups of a missing
/// id, short enough that a create is soon visible even without a purge.
pub const DEFAULT_NOT_FOUND_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    /// How long a response is served from the cache; the guest's `max-age` may shorten it.
    #[serde(deserialize_with = "human_duration")]
    pub ttl: Duration,
    /// Request headers whose values select different entries (e.g. `["accept-language"]`).
    #[serde(default)]
    pub vary: Vec<String>,
    /// How long a 404 is cached (at most `ttl`); "0s" caches none.
    #[serde(default = "default_not_found_ttl", deserialize_with = "human_duration")]
    pub not_found_ttl: Duration,
}

/// A stored response is replayed for this long by default (the IETF draft's suggestion).
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a key and its response are kept.
    #[serde(
        default = "default_idempotency_ttl",
        deserialize_with = "human_duration"
    )]
    pub ttl: Duration,
    /// Refuse POST and PATCH without a key (400) instead of running them unprotected.
    #[serde(default)]
    pub required: bool,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_IDEMPOTENCY_TTL,
            required: false,
        }
    }
}

fn default_not_found_ttl() -> Duration {
    DEFAULT_NOT_FOUND_TTL
}
fn default_idempotency_ttl() -> Duration {
    DEFAULT_IDEMPOTENCY_TTL
}

impl RouteConfig {
    /// How problems name this route: its index and what it matches.
    pub fn label(&self, index: usize) -> String {
        let methods = if self.methods.is_empty() {
            "*".to_string()
        } else {
            self.methods.join(",")
        };
        format!("routes[{index}] ({methods} {})", self.path)
    }
}

/// Every problem found in a manifest, each naming the file, the entry and the fix.
#[derive(Debug, thiserror::Error)]
pub struct ManifestError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "manifest `{}` has {n} problem{}:",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl Manifest {
    /// Reads and parses a manifest. Syntax errors stop here; [`Manifest::validate`] finds the
    /// rest, so the loader can report them together with the problems of the `.wasm` files.
    pub fn read(path: &Path) -> Result<Self, ManifestError> {
        let fail = |problem: String| ManifestError {
            path: path.to_path_buf(),
            problems: vec![problem],
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(format!(
                "cannot read it: {e}; pass the right file with --manifest"
            ))
        })?;
        Self::parse(&text).map_err(fail)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| format!("invalid TOML: {}", e.to_string().trim_end()))
    }

    /// Problems that need no `.wasm` file: names, limits, unknown functions, route syntax.
    /// Duplicate and overlapping routes are found when the route table is built.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let limits = self.server.component_limits;
        for (name, value) in [
            ("core_instances", limits.core_instances),
            ("memories", limits.memories),
            ("tables", limits.tables),
        ] {
            if value == 0 {
                problems.push(format!(
                    "[server.component_limits] {name} is 0: no component would fit; leave it out for the default"
                ));
            }
        }
        if self.server.max_instances == 0 {
            problems.push("[server] max_instances is 0; set it to at least 1".to_string());
        }
        if self.server.max_connections == 0 {
            problems.push("[server] max_connections is 0; set it to at least 1".to_string());
        }
        if self.server.request_head_timeout.is_zero() {
            problems.push(
                "[server] request_head_timeout is 0; give clients time to send a request head (default \"10s\")"
                    .to_string(),
            );
        }
        if self.server.warm_instances > self.server.max_instances / 2 {
            problems.push(format!(
                "[server] warm_instances ({}) is over half of max_instances ({}): instances made ahead would take the slots requests need; lower it (0 turns them off)",
                self.server.warm_instances, self.server.max_instances
            ));
        }
        if let Err(e) = self.password.params() {
            problems.push(e);
        }
        for (name, f) in &self.functions {
            if !valid_name(name) {
                problems.push(format!(
                    "[functions.{name}]: the name may only hold lowercase letters, digits and `-`; rename it"
                ));
            }
            if f.timeout.is_zero() {
                problems.push(format!(
                    "[functions.{name}] timeout is 0; set a duration such as \"5s\""
                ));
            }
            // Settings that only a grant makes usable.
            for (set, what, needs) in [
                (
                    f.migrations.is_some(),
                    "migrations",
                    crate::capabilities::Capability::Db,
                ),
                (
                    !f.config.is_empty(),
                    "config values",
                    crate::capabilities::Capability::Config,
                ),
            ] {
                if set && !f.capabilities.contains(&needs) {
                    problems.push(format!(
                        "[functions.{name}] has {what} but is not granted `{0}`; add \"{0}\" to its capabilities",
                        needs.name()
                    ));
                }
            }
            for (key, value) in &f.env {
                if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                    problems.push(format!(
                        "[functions.{name}] env: `{}` cannot be an environment variable (a name is not empty and holds no `=`; neither holds a NUL byte)",
                        key.escape_debug()
                    ));
                }
            }
            if f.bulkhead.max_concurrency == 0 {
                problems.push(format!(
                    "[functions.{name}] bulkhead.max_concurrency is 0; set at least 1"
                ));
            }
            if let Some(rl) = &f.rate_limit {
                if rl.rps == 0 || rl.burst == Some(0) {
                    problems.push(format!(
                        "[functions.{name}] rate_limit needs rps and burst above 0"
                    ));
                }
                if let Some(key) = &rl.key
                    && key != "client-ip"
                    && key
                        .strip_prefix("header:")
                        .is_none_or(|h| http::HeaderName::from_bytes(h.as_bytes()).is_err())
                {
                    problems.push(format!(
                        "[functions.{name}] rate_limit.key `{key}` is not understood; use \"client-ip\" or \"header:<name>\""
                    ));
                }
            }
            if f.memory < 64 * 1024 {
                problems.push(format!(
                    "[functions.{name}] memory is below one wasm page (64KiB); set at least \"1MiB\""
                ));
            }
        }
        problems.extend(crate::auth::config::validate(&self.auth));
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.subscriptions.iter().enumerate() {
            let label = format!("subscriptions[{i}] ({} -> {})", s.topic, s.function);
            if !self.functions.contains_key(&s.function) {
                problems.push(format!(
                    "{label}: unknown function `{}`; define [functions.{}]",
                    s.function, s.function
                ));
            }
            if s.topic.is_empty()
                || !s
                    .topic
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            {
                problems.push(format!(
                    "{label}: topic `{}` may only hold a-z 0-9 . _ -",
                    s.topic
                ));
            }
            if s.max_attempts == 0 || s.concurrency == 0 {
                problems.push(format!(
                    "{label}: max_attempts and concurrency must be at least 1"
                ));
            }
            if s.redeliver_after < Duration::from_millis(100) {
                problems.push(format!(
                    "{label}: redeliver_after below 100ms would hand events still being handled to another consumer"
                ));
            }
            if let Some(f) = self.functions.get(&s.function)
                && s.redeliver_after <= f.timeout
            {
                problems.push(format!(
                    "{label}: redeliver_after ({:?}) must be longer than {}'s timeout ({:?}), or events still being handled are handed to another consumer",
                    s.redeliver_after, s.function, f.timeout
                ));
            }
            if !names.insert(s.name()) {
                problems.push(format!(
                    "{label}: another subscription is named `{}`; give one a `name`",
                    s.name()
                ));
            }
        }
        if self.routes.is_empty() && self.subscriptions.is_empty() {
            problems.push(
                "no [[routes]] and no [[subscriptions]]: add one so wasmgate has something to serve"
                    .to_string(),
            );
        }
        for (i, r) in self.routes.iter().enumerate() {
            let label = r.label(i);
            if !self.functions.contains_key(&r.function) {
                let known: Vec<_> = self.functions.keys().map(String::as_str).collect();
                problems.push(format!(
                    "{label}: unknown function `{}`; define [functions.{}] or use one of [{}]",
                    r.function,
                    r.function,
                    known.join(", ")
                ));
            }
            if !r.path.starts_with('/') {
                problems.push(format!(
                    "{label}: path must start with `/`; write `/{}`",
                    r.path
                ));
            }
            if RESERVED_PATHS.contains(&r.path.as_str()) {
                problems.push(format!(
                    "{label}: `{}` is reserved for the host; choose another path",
                    r.path
                ));
            }
            for m in &r.methods {
                if !METHODS.contains(&m.to_ascii_uppercase().as_str()) {
                    problems.push(format!(
                        "{label}: `{m}` is not a method wasmgate routes; use one of {}",
                        METHODS.join(", ")
                    ));
                }
            }
            let has = |wanted: &[&str]| {
                r.methods.is_empty()
                    || r.methods
                        .iter()
                        .any(|m| wanted.contains(&m.to_ascii_uppercase().as_str()))
            };
            if let Some(c) = &r.cache {
                if !has(&["GET", "HEAD"]) {
                    problems.push(format!(
                        "{label}: `cache` applies to GET and HEAD, which this route does not answer; remove it or add \"GET\""
                    ));
                }
                if c.ttl.is_zero() {
                    problems.push(format!(
                        "{label}: cache.ttl is 0; set a duration such as \"30s\" or remove `cache`"
                    ));
                }
                for h in &c.vary {
                    if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        problems.push(format!("{label}: cache.vary `{h}` is not a header name"));
                    }
                }
            }
            if let Some(a) = &r.auth {
                if let Some(owner) = &a.owner
                    && !r.path.contains(&format!("{{{owner}}}"))
                {
                    problems.push(format!(
                        "{label}: auth.owner `{owner}` is not a parameter of the path; use one of its `{{name}}` segments"
                    ));
                }
                if a.roles.iter().chain(&a.scopes).any(|r| r.trim().is_empty()) {
                    problems.push(format!("{label}: auth roles and scopes may not be empty"));
                }
                if !a.required && (a.owner.is_some() || !a.roles.is_empty() || !a.scopes.is_empty())
                {
                    problems.push(format!(
                        "{label}: auth with required = false cannot demand roles, scopes or an owner; remove them or the `required = false`"
                    ));
                }
            }
            if let Some(t) = &r.login_throttle {
                if !has(&["POST"]) {
                    problems.push(format!(
                        "{label}: `login_throttle` applies to POST, which this route does not answer"
                    ));
                }
                if t.base_delay.is_zero() || t.max_delay < t.base_delay || t.window.is_zero() {
                    problems.push(format!(
                        "{label}: login_throttle needs base_delay above 0, max_delay at least base_delay and a window above 0"
                    ));
                }
                if t.address_factor == 0 || t.account_field.is_empty() {
                    problems.push(format!(
                        "{label}: login_throttle needs an account_field and an address_factor of at least 1"
                    ));
                }
            }
            if let Some(c) = &r.cors
                && let Err(found) = crate::cors::Cors::new(&r.function, c, &r.methods)
            {
                problems.extend(found.into_iter().map(|p| format!("{label}: {p}")));
            }
            if let Some(c) = r.compression.config() {
                let mut seen = Vec::new();
                for e in &c.encodings {
                    if seen.contains(e) {
                        problems.push(format!(
                            "{label}: compression.encodings names `{}` twice",
                            e.token()
                        ));
                    }
                    seen.push(*e);
                }
                if c.encodings.is_empty() {
                    problems.push(format!(
                        "{label}: compression.encodings is empty; write `compression = false` to turn it off"
                    ));
                }
            }
            if let Some(i) = &r.idempotency {
                if !has(&["POST", "PATCH"]) {
                    problems.push(format!(
                        "{label}: `idempotency` applies to POST and PATCH, which this route does not answer; remove it or add \"POST\""
                    ));
                }
                if i.ttl.is_zero() {
                    problems.push(format!(
                        "{label}: idempotency.ttl is 0; set a duration such as \"24h\" or remove it"
                    ));
                }
            }
        }
        problems
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Parses "250ms", "5s", "1m" (humantime) into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. \"250ms\" or \"5s\""))
}

/// Parses "64MiB", "512KiB", "1048576" into a byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    bytesize::ByteSize::from_str(s)
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{s}` is not a size ({e}); write e.g. \"64MiB\""))
}

pub(crate) fn human_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn human_duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    human_duration(d).map(Some)
}

fn human_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Manifest {
        Manifest::parse(text).expect("test manifest parses")
    }

    #[test]
    fn a_bulkhead_adapts_unless_its_limit_is_written_down() {
        let m = parse(
            r#"
            [functions.a]
            wasm = "a.wasm"
            [functions.b]
            wasm = "b.wasm"
            bulkhead = { max_concurrency = 16 }
            [functions.c]
            wasm = "c.wasm"
            bulkhead = { max_concurrency = 16, adaptive = true, max_wait = "250ms" }
            "#,
        );
        let b = |name: &str| m.functions[name].bulkhead.clone();
        assert_eq!(b("a"), BulkheadConfig::default());
        assert!(b("a").adaptive);
        assert_eq!((b("a").max_concurrency, b("a").max_queue), (64, 10_000));
        assert!(!b("b").adaptive);
        assert_eq!(b("b").max_concurrency, 16);
        assert!(b("c").adaptive);
        assert_eq!(b("c").max_wait, Duration::from_millis(250));
        assert!(
            Manifest::parse("[functions.d]\nwasm = \"d.wasm\"\nbulkhead = { limit = 3 }").is_err()
        );
    }

    #[test]
    fn parses_human_units_and_defaults() {
        let m = parse(
            r#"
            [functions.hello]
            wasm = "hello.wasm"
            timeout = "250ms"
            memory = "8MiB"
            [functions.big]
            wasm = "big.wasm"
            max_body = 2048
            [[routes]]
            path = "/hello"
            function = "hello"
            "#,
        );
        let hello = &m.functions["hello"];
        assert_eq!(hello.timeout, Duration::from_millis(250));
        assert_eq!(hello.memory, 8 * 1024 * 1024);
        assert_eq!(hello.max_body, DEFAULT_MAX_BODY);
        assert_eq!(m.functions["big"].max_body, 2048);
        assert_eq!(m.functions["big"].timeout, DEFAULT_TIMEOUT);
        assert!(m.validate().is_empty());
    }

    #[test]
    fn rejects_misspelt_key_naming_it() {
        let err = Manifest::parse(
            r#"
            [functions.hello]
            wasm = "hello.wasm"
            timeuot = "1s"
            "#,
        )
        .expect_err("misspelt key");
        assert!(err.contains("timeuot"), "{err}");
    }

    #[test]
    fn rejects_bad_units_with_the_fix() {
        let err = Manifest::parse(
            r#"
            [functions.hello]
            wasm = "hello.wasm"
            timeout = "soon"
            "#,
        )
        .expect_err("bad duration");
        assert!(err.contains("soon") && err.contains("5s"), "{err}");
    }

    #[test]
    fn route_policies_parse_and_are_checked() {
        let m = parse(
            r#"
            [functions.users]
            wasm = "users.wasm"
            [[routes]]
            path = "/users/{id}"
            methods = ["GET", "PATCH"]
            function = "users"
            cache = { ttl = "30s", vary = ["accept"] }
            idempotency = {}
            [[routes]]
            path = "/users"
            methods = ["POST"]
            function = "users"
            cache = { ttl = "0s", vary = ["bad header"] }
            [[routes]]
            path = "/ping"
            methods = ["GET"]
            function = "users"
            idempotency = { ttl = "1h" }
            "#,
        );
        let c = m.routes[0].cache.as_ref().expect("cache");
        assert_eq!(c.ttl, Duration::from_secs(30));
        assert_eq!(c.not_found_ttl, DEFAULT_NOT_FOUND_TTL);
        assert_eq!(c.vary, vec!["accept"]);
        assert_eq!(
            m.routes[0].idempotency.as_ref().expect("idempotency").ttl,
            DEFAULT_IDEMPOTENCY_TTL
        );
        let all = m.validate().join("\n");
        assert!(
            all.contains("routes[1] (POST /users): `cache` applies to GET"),
            "{all}"
        );
        assert!(all.contains("cache.ttl is 0"), "{all}");
        assert!(all.contains("`bad header` is not a header name"), "{all}");
        assert!(
            all.contains("routes[2] (GET /ping): `idempotency` applies to POST"),
            "{all}"
        );
        assert_eq!(m.validate().len(), 4, "{all}");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let m = parse(
            r#"
            [functions.Bad_Name]
            wasm = "x.wasm"
            timeout = "0s"
            [[routes]]
            path = "nope"
            methods = ["FETCH!"]
            function = "ghost"
            [[routes]]
            path = "/healthz"
            function = "Bad_Name"
            "#,
        );
        let problems = m.validate();
        let all = problems.join("\n");
        assert_eq!(problems.len(), 6, "{all}");
        assert!(all.contains("unknown function `ghost`"), "{all}");
        assert!(all.contains("must start with `/`"), "{all}");
        assert!(all.contains("`FETCH!` is not a method"), "{all}");
        assert!(all.contains("reserved"), "{all}");
        assert!(all.contains("timeout is 0"), "{all}");
        assert!(all.contains("[functions.Bad_Name]: the name"), "{all}");
    }
}
