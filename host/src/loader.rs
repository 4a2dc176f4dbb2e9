//! From a manifest file to everything the server needs, or every reason it cannot start.
//!
//! Two steps, because they live for different times: [`Platform::open`] builds what lives as
//! long as the process (the engine and its instance pool, the backends, auth), and [`build`]
//! what one deployment needs (functions loaded, migrations applied, routes and their policy
//! stacks). A reload runs only the second. All functions are loaded and all routes built before
//! anything serves; problems from the manifest, the `.wasm` files, migrations and the route
//! table are gathered into one [`ManifestError`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;

use crate::capabilities::db::migrations;
use crate::capabilities::{Backends, BackendsConfig};
use crate::config::{Manifest, ManifestError};
use crate::deploy::{Version, VersionSet};
use crate::policy::{
    AuthPolicy, CachePolicy, CompressionPolicy, IdempotencyPolicy, LoginThrottle, PolicyState,
    RoutePolicies, ShadowPolicy,
};
use crate::router::RouteTable;
use crate::runtime::{Function, Limits, Runtime, RuntimeOptions, Source};
use crate::server::Route;

/// What lives as long as the process: the engine (and its instance pool), the backends (and
/// with them the response cache's memory tier), auth. Built once from the manifest it started
/// with; the settings it was built from cannot change without a restart.
pub struct Platform {
    pub runtime: Runtime,
    pub backends: Backends,
    /// Per-version figures, kept across deployments and written to the registry.
    pub stats: crate::deploy::Stats,
    /// Shadow runs' slots (over every function).
    pub shadows: crate::policy::shadow::Shadows,
    /// The manifest sections this was built from, to tell a reload what it cannot change.
    pub settings: Settings,
}

/// What a [`Platform`] was built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: std::net::SocketAddr,
    pub connections: crate::connections::Limits,
    pub max_instances: u32,
    pub warm_instances: u32,
    pub component_limits: crate::config::ComponentLimits,
    pub cache_dir: PathBuf,
    /// The largest memory cap the pool's slots hold.
    pub max_memory: u64,
    pub database_url: String,
    pub redis_url: Option<String>,
    /// `[server] tls`, its paths made absolute.
    pub tls: Option<crate::tls::TlsConfig>,
    /// `[auth]`, as written (its Debug form: the section holds no secrets).
    pub auth: String,
}

/// The label of a function's version that comes from the manifest's `wasm` (registry labels
/// cannot be this: they name uploads).
pub const MANIFEST_LABEL: &str = "manifest";

/// A function's live deployment from the registry, with the bytes of each version it names.
pub struct Live {
    pub spec: crate::registry::Spec,
    /// `(label, module bytes, its settings)` for every version in `spec`.
    pub modules: Vec<(String, Vec<u8>, crate::registry::VersionSettings)>,
}

/// A version's limits and grants: its function's from the manifest, with what the version
/// changes. Refused when a value is not understood or memory is above `max_memory` (the pool's
/// slot size, fixed at start).
pub fn effective(
    cfg: &crate::config::FunctionConfig,
    v: &crate::registry::VersionSettings,
    max_memory: u64,
) -> Result<(Limits, crate::capabilities::Grants), String> {
    use crate::config::{parse_duration, parse_size};
    let limits = Limits {
        timeout: v
            .timeout
            .as_deref()
            .map(parse_duration)
            .transpose()?
            .unwrap_or(cfg.timeout),
        memory: v
            .memory
            .as_deref()
            .map(parse_size)
            .transpose()?
            .unwrap_or(cfg.memory),
        max_body: v
            .max_body
            .as_deref()
            .map(parse_size)
            .transpose()?
            .unwrap_or(cfg.max_body),
        instance_reuse: v.instance_reuse.unwrap_or(cfg.instance_reuse),
    };
    if limits.timeout.is_zero() || limits.memory < 64 * 1024 {
        return Err("timeout must be above 0 and memory at least one wasm page (64KiB)".into());
    }
    if limits.memory > max_memory {
        return Err(format!(
            "memory {} bytes is above what the instance pool was sized for at start ({max_memory} bytes); raise a function's memory in the manifest and restart",
            limits.memory
        ));
    }
    let grants = match &v.capabilities {
        None => cfg.capabilities.clone(),
        Some(names) => names
            .iter()
            .map(|n| {
                serde_json::from_value(serde_json::Value::String(n.clone())).map_err(|_| {
                    format!(
                        "`{n}` is not a capability; use db, cache, lock, response-cache or auth"
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok((limits, grants))
}

impl Loaded {
    /// The version taking the most traffic (an event function's events run on it).
    pub fn heaviest(&self) -> Option<&Function> {
        self.versions
            .iter()
            .max_by_key(|(w, _, _)| *w)
            .map(|(_, f, _)| f)
    }
}

/// A function's versions in one deployment: `(weight, function, label)`, and the sticky key.
pub struct Loaded {
    pub versions: Vec<(u32, Function, String)>,
    pub sticky: Option<crate::deploy::StickyKey>,
    /// The registry's shadow: `(percent, label)` of one of `versions`.
    pub shadow: Option<(u32, String)>,
}

/// One deployment: the functions and the routes to them.
pub struct Built {
    pub routes: RouteTable<Route>,
    pub functions: BTreeMap<String, Loaded>,
    /// Whether a loaded version publishes events (the outbox tables exist then).
    pub publishes: bool,
    /// Per-function policy state, handed to the next reload so budgets and slots carry over.
    pub policies: BTreeMap<String, Arc<PolicyState>>,
}

/// What the command line may override.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub cache_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Engine(#[from] crate::runtime::EngineError),
    #[error(transparent)]
    Backend(#[from] crate::capabilities::config::ConnectError),
}

/// The backends section after overrides, with a relative SQLite path made absolute.
fn backends_config(manifest: &Manifest, base: &Path, o: &Overrides) -> BackendsConfig {
    let mut b = manifest.backends.clone();
    if let Some(url) = &o.database_url {
        b.database_url = url.clone();
    }
    if o.redis_url.is_some() {
        b.redis_url = o.redis_url.clone();
    }
    if b.database_url.is_empty() {
        b.database_url = format!(
            "sqlite://{}",
            crate::capabilities::config::DEFAULT_SQLITE_PATH
        );
    }
    if let Some(path) = b.database_url.strip_prefix("sqlite://")
        && !path.starts_with('/')
        && !path.starts_with(':')
    {
        b.database_url = format!("sqlite://{}", base.join(path).display());
    }
    b
}

fn max_memory(manifest: &Manifest) -> u64 {
    manifest
        .functions
        .values()
        .map(|f| f.memory)
        .max()
        .unwrap_or(crate::config::DEFAULT_MEMORY)
}

impl Settings {
    pub fn of(
        manifest: &Manifest,
        base: &Path,
        overrides: &Overrides,
        listen: Option<std::net::SocketAddr>,
    ) -> Self {
        let backends = backends_config(manifest, base, overrides);
        Self {
            listen: listen.unwrap_or(manifest.server.listen),
            connections: manifest.server.connections(),
            max_instances: manifest.server.max_instances,
            warm_instances: manifest.server.warm_instances,
            component_limits: manifest.server.component_limits,
            cache_dir: overrides
                .cache_dir
                .clone()
                .unwrap_or_else(|| base.join(&manifest.server.cache_dir)),
            max_memory: max_memory(manifest),
            database_url: backends.database_url,
            redis_url: backends.redis_url,
            tls: manifest.server.tls.as_ref().map(|t| crate::tls::TlsConfig {
                cert: base.join(&t.cert),
                key: base.join(&t.key),
            }),
            auth: format!("{:?}", manifest.auth),
        }
    }

    /// Why `next` cannot be applied to a platform built from `self`, if it cannot.
    pub fn refuse(&self, next: &Settings) -> Vec<String> {
        let restart = "is read at start; restart wasmgate to change it";
        let mut problems = Vec::new();
        if next.listen != self.listen {
            problems.push(format!("[server] listen {restart}"));
        }
        if next.tls != self.tls {
            problems.push(format!(
                "[server] tls (which files; their contents are reloaded on their own) {restart}"
            ));
        }
        if next.connections != self.connections {
            problems.push(format!(
                "[server] max_connections and request_head_timeout: this {restart}"
            ));
        }
        if next.max_instances != self.max_instances
            || next.warm_instances != self.warm_instances
            || next.component_limits != self.component_limits
            || next.cache_dir != self.cache_dir
        {
            problems.push(format!(
                "[server] max_instances, warm_instances, component_limits and cache_dir: this {restart}"
            ));
        }
        if next.max_memory > self.max_memory {
            problems.push(format!(
                "a function's memory ({} bytes) is above what the instance pool was sized for at start ({} bytes); restart wasmgate to raise it",
                next.max_memory, self.max_memory
            ));
        }
        if next.database_url != self.database_url || next.redis_url != self.redis_url {
            problems.push(format!("[backends] {restart}"));
        }
        if next.auth != self.auth {
            problems.push(format!("[auth] {restart}"));
        }
        problems
    }
}

/// Loads `path` whole: the platform, then the first deployment on it (for `wasmgate up` and
/// `wasmgate check`).
pub async fn load(
    path: &Path,
    overrides: &Overrides,
    listen: Option<std::net::SocketAddr>,
) -> Result<(Manifest, Platform, Built), LoadError> {
    let manifest = Manifest::read(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let (platform, mut problems) = Platform::open(&manifest, base, overrides, listen).await?;
    match build(
        &platform,
        &manifest,
        base,
        &BTreeMap::new(),
        &BTreeMap::new(),
    )
    .await
    {
        Ok(built) if problems.is_empty() => Ok((manifest, platform, built)),
        Ok(_) => Err(ManifestError {
            path: path.to_path_buf(),
            problems,
        }
        .into()),
        Err(more) => {
            problems.extend(more);
            Err(ManifestError {
                path: path.to_path_buf(),
                problems,
            }
            .into())
        }
    }
}

impl Platform {
    /// The engine, the backends and auth for `manifest`; also the problems found on the way
    /// (the manifest's own, auth's), so they are reported with the rest.
    pub async fn open(
        manifest: &Manifest,
        base: &Path,
        overrides: &Overrides,
        listen: Option<std::net::SocketAddr>,
    ) -> Result<(Self, Vec<String>), LoadError> {
        let mut problems = manifest.validate();
        let settings = Settings::of(manifest, base, overrides, listen);
        let runtime = Runtime::new(&RuntimeOptions {
            // Zero is reported as a problem above; the engine still needs a pool to check the rest.
            max_instances: settings.max_instances.max(1),
            warm_instances: settings.warm_instances,
            component_limits: settings.component_limits,
            max_memory: settings.max_memory,
            cache_dir: settings.cache_dir.clone(),
        })?;
        let backends_cfg = backends_config(manifest, base, overrides);
        let mut backends = Backends::connect(&backends_cfg).await?;
        // Invalid parameters are reported by `Manifest::validate`; the defaults stand in meanwhile.
        if let Ok(passwords) = crate::capabilities::password::Passwords::new(&manifest.password) {
            backends.passwords = passwords;
        }
        // The auth tables, keys and revocation list exist only when something uses them.
        let uses_auth = manifest.routes.iter().any(|r| r.auth.is_some())
            || manifest.functions.values().any(|f| {
                f.capabilities
                    .contains(&crate::capabilities::Capability::Auth)
            });
        if uses_auth {
            let redis = backends.redis_client.clone().zip(backends.redis.clone());
            match crate::auth::Auth::open(
                &manifest.auth,
                base,
                backends.db.backend().clone(),
                redis,
            )
            .await
            {
                Ok(auth) => backends.auth = Some(auth),
                Err(e) => problems.push(format!("[auth]: {e}")),
            }
        }
        Ok((
            Self {
                runtime,
                backends,
                stats: crate::deploy::Stats::default(),
                shadows: crate::policy::shadow::shadows(),
                settings,
            },
            problems,
        ))
    }
}

/// Builds a deployment of `manifest` on `platform`: loads (or takes from the compiled cache)
/// every function, applies migrations, builds the routes and their policy stacks. A function
/// with a `live` deployment in the registry serves the versions it names (with the manifest's
/// settings for that function) instead of the manifest's `wasm`. `previous` is the policy state
/// of the deployment being replaced, so budgets and slots carry over. Returns every problem
/// found, or the deployment.
pub async fn build(
    platform: &Platform,
    manifest: &Manifest,
    base: &Path,
    previous: &BTreeMap<String, Arc<PolicyState>>,
    live: &BTreeMap<String, Live>,
) -> Result<Built, Vec<String>> {
    let (runtime, backends) = (&platform.runtime, &platform.backends);
    let mut problems = Vec::new();
    let shared_throttle: Option<Arc<dyn crate::auth::throttle::ThrottleBackend>> =
        backends.redis.clone().map(|conn| {
            Arc::new(crate::auth::throttle::RedisThrottle::new(conn))
                as Arc<dyn crate::auth::throttle::ThrottleBackend>
        });

    let mut functions = BTreeMap::new();
    let mut policies = BTreeMap::new();
    for (name, f) in &manifest.functions {
        if f.rate_limit.as_ref().is_some_and(|r| r.shared) && backends.redis.is_none() {
            problems.push(format!(
                "[functions.{name}] rate_limit.shared needs Redis; set [backends] redis_url or pass --redis-url"
            ));
        }
        policies.insert(
            name.clone(),
            Arc::new(PolicyState::new(
                name,
                f.rate_limit.as_ref(),
                &f.bulkhead,
                backends.redis.as_ref(),
                previous.get(name).map(Arc::as_ref),
            )),
        );
        let limits = Limits {
            timeout: f.timeout,
            memory: f.memory,
            max_body: f.max_body,
            instance_reuse: f.instance_reuse,
        };
        let loaded =
            crate::capabilities::wasi_config::FunctionConfigValues::resolve(&f.config, base)
                .and_then(|config| {
                    let caps = backends
                        .configure(name)
                        .with_env(&f.env)
                        .with_config(config);
                    match live.get(name) {
                        None => runtime
                            .load(name, &base.join(&f.wasm), limits, &f.capabilities, caps)
                            .map(|loaded| Loaded {
                                versions: vec![(100, loaded, "manifest".to_string())],
                                sticky: None,
                                shadow: None,
                            })
                            .map_err(|e| e.to_string()),
                        Some(l) => {
                            load_live(runtime, name, l, f, platform.settings.max_memory, &caps)
                        }
                    }
                });
        match loaded {
            Ok(loaded) => {
                for (weight, v, label) in &loaded.versions {
                    tracing::info!(
                        function = %name,
                        version = %label,
                        weight,
                        sha256 = %v.sha256(),
                        from = if v.source() == Source::Cache { "cache" } else { "compiled" },
                        load_ms = format_args!("{:.1}", as_ms(v.load_time())),
                        "loaded function"
                    );
                }
                functions.insert(name.clone(), loaded);
            }
            Err(e) => problems.push(format!("[functions.{name}]: {e}")),
        }
        if let Some(dir) = &f.migrations {
            let applied = match migrations::load_dir(&base.join(dir)) {
                Ok(m) => backends.db.backend().migrate(name, &m).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(done) if !done.is_empty() => {
                    tracing::info!(function = %name, applied = ?done, "applied migrations");
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("[functions.{name}] migrations: {e}")),
            }
        }
    }

    for (i, s) in manifest.subscriptions.iter().enumerate() {
        if let Some(loaded) = functions.get(&s.function)
            && let Some((_, _, label)) = loaded
                .versions
                .iter()
                .find(|(_, f, _)| !f.is_event_function())
        {
            problems.push(format!(
                "subscriptions[{i}] ({} -> {}): `{}` ({}) is an HTTP function; a subscription needs an event function (one that exports `wasmgate:platform/event-handler`)",
                s.topic,
                s.function,
                s.function,
                if label.is_empty() { MANIFEST_LABEL } else { label }
            ));
        }
    }
    if !manifest.subscriptions.is_empty()
        && let Err(e) = crate::events::inbox::open(backends.db.backend().as_ref()).await
    {
        problems.push(format!("events inbox: {e}"));
    }

    // The outbox tables are created only when a loaded version publishes events.
    let publishes = functions
        .values()
        .flat_map(|l| &l.versions)
        .any(|(_, f, _)| f.imports().contains(&"events"));
    if publishes
        && let Err(e) =
            crate::capabilities::events::outbox::open(backends.db.backend().as_ref()).await
    {
        problems.push(format!("events outbox: {e}"));
    }

    // The idempotency table is created only when a route uses it.
    let idempotency_store = if manifest.routes.iter().any(|r| r.idempotency.is_some()) {
        match crate::idempotency::Store::open(backends.db.backend().clone()).await {
            Ok(store) => Some(store),
            Err(e) => {
                problems.push(format!("idempotency store: {e}"));
                None
            }
        }
    } else {
        None
    };

    let mut routes = RouteTable::default();
    for (i, r) in manifest.routes.iter().enumerate() {
        // Unknown functions were reported by validation; a function that failed to load was
        // reported above. Either way this route cannot be built.
        let (Some(loaded), Some(policy)) = (functions.get(&r.function), policies.get(&r.function))
        else {
            continue;
        };
        if let Some((_, _, label)) = loaded
            .versions
            .iter()
            .find(|(_, f, _)| f.is_event_function())
        {
            problems.push(format!(
                "{}: `{}` ({}) is an event function (it exports `wasmgate:platform/event-handler`); a route needs an HTTP function",
                r.label(i),
                r.function,
                if label.is_empty() { MANIFEST_LABEL } else { label }
            ));
            continue;
        }
        // Who may call, and login throttling, belong to the route; the cache and idempotency
        // policies to each version (its entries, its timeout).
        let auth = r
            .auth
            .as_ref()
            .zip(backends.auth.clone())
            .map(|(rule, auth)| Arc::new(AuthPolicy::new(auth, rule)));
        let login_throttle = r.login_throttle.as_ref().map(|cfg| {
            Arc::new(LoginThrottle::new(
                &r.function,
                cfg,
                policy.login_failures.clone(),
                shared_throttle.clone(),
            ))
        });
        let compression = r
            .compression
            .config()
            .map(|cfg| Arc::new(crate::compression::Compression::new(cfg)));
        let compression_policy = compression
            .clone()
            .map(|c| Arc::new(CompressionPolicy::new(&r.function, c)));
        let shadow = loaded.shadow.as_ref().and_then(|(percent, label)| {
            let (_, candidate, _) = loaded.versions.iter().find(|(_, _, l)| l == label)?;
            Some((*percent, candidate, label))
        });
        let version = |function: &Function, label: &str| {
            let route_policies = RoutePolicies {
                shadow: shadow
                    .filter(|(_, _, shadow_label)| *shadow_label != label)
                    .map(|(percent, candidate, shadow_label)| {
                        Arc::new(ShadowPolicy::new(
                            candidate.clone(),
                            percent,
                            platform
                                .stats
                                .comparisons(&r.function, shadow_label, &r.path),
                            platform.shadows.clone(),
                        ))
                    }),
                auth: auth.clone(),
                login_throttle: login_throttle.clone(),
                idempotency: r.idempotency.as_ref().zip(idempotency_store.clone()).map(
                    |(cfg, store)| {
                        Arc::new(IdempotencyPolicy::new(
                            store,
                            &r.path,
                            cfg,
                            function.limits().timeout,
                        ))
                    },
                ),
                cache: r.cache.as_ref().map(|cfg| {
                    Arc::new(CachePolicy::new(
                        backends.response_cache.clone(),
                        &r.function,
                        &function.sha256()[..12],
                        cfg,
                        compression.clone(),
                    ))
                }),
                compression: compression_policy.clone(),
            };
            let label = if label.is_empty() {
                MANIFEST_LABEL
            } else {
                label
            };
            Version::new(
                function.clone(),
                policy.stack(function.clone(), &route_policies),
                platform.stats.counts(&r.function, label),
            )
        };
        let labels = loaded.versions.iter().map(|(_, _, l)| l.clone()).collect();
        let set = match loaded.versions.as_slice() {
            [(_, only, label)] => Ok(VersionSet::single(version(only, label))),
            many => VersionSet::weighted(
                many.iter()
                    .map(|(w, f, label)| (*w, version(f, label), f.sha256().to_string()))
                    .collect(),
                loaded.sticky.clone(),
            ),
        }
        .map(|set| set.with_labels(labels));
        let methods: Vec<Method> = r
            .methods
            .iter()
            .filter_map(|m| Method::from_str(&m.to_ascii_uppercase()).ok())
            .collect();
        // Refused by validation when it does not build; nothing to report twice.
        let cors = r
            .cors
            .as_ref()
            .and_then(|cfg| crate::cors::Cors::new(&r.function, cfg, &r.methods).ok())
            .map(Arc::new);
        match set {
            Ok(versions) => {
                let route = Route::new(&r.path, versions, cors);
                if let Err(p) = routes.add(&r.path, &methods, route, &r.label(i)) {
                    problems.push(p);
                }
            }
            Err(e) => problems.push(format!("{}: {e}", r.label(i))),
        }
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Built {
        routes,
        functions,
        publishes,
        policies,
    })
}

/// Loads every version a live registry deployment names, with the function's settings from the
/// manifest (capabilities and limits).
fn load_live(
    runtime: &Runtime,
    name: &str,
    live: &Live,
    cfg: &crate::config::FunctionConfig,
    max_memory: u64,
    caps: &crate::capabilities::FunctionCaps,
) -> Result<Loaded, String> {
    let sticky = live
        .spec
        .sticky
        .as_deref()
        .map(crate::deploy::StickyKey::parse)
        .transpose()?;
    let mut versions = Vec::new();
    for w in &live.spec.versions {
        let (bytes, settings) = live
            .modules
            .iter()
            .find(|(label, _, _)| *label == w.label)
            .map(|(_, b, s)| (b, s))
            .ok_or_else(|| format!("the registry has no module for version {}", w.label))?;
        let (limits, grants) = effective(cfg, settings, max_memory)
            .map_err(|e| format!("version {}: {e}", w.label))?;
        let origin = PathBuf::from(format!("{name}@{}", w.label));
        let f = runtime
            .load_bytes(name, &origin, bytes, limits, &grants, caps.clone())
            .map_err(|e| e.to_string())?;
        versions.push((w.weight, f, w.label.clone()));
    }
    let shadow = live
        .spec
        .shadow
        .as_ref()
        .map(|s| (s.percent, s.label.clone()));
    Ok(Loaded {
        versions,
        sticky,
        shadow,
    })
}

fn as_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The auth tables of the manifest's platform database, for the operator commands (`wasmgate
/// roles`, `wasmgate keys`); nothing else of the manifest is loaded.
pub async fn auth_store(
    path: &Path,
    overrides: &Overrides,
) -> Result<crate::auth::store::Store, LoadError> {
    let manifest = Manifest::read(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let cfg = backends_config(&manifest, base, overrides);
    let db = crate::capabilities::db::Db::connect(&cfg.database_url).await?;
    crate::auth::store::Store::open(db.backend().clone())
        .await
        .map_err(|e| {
            ManifestError {
                path: path.to_path_buf(),
                problems: vec![format!("[auth]: {e}")],
            }
            .into()
        })
}
