//! From a manifest file to everything the server needs, or every reason it cannot start.
//!
//! All functions are loaded, their migrations applied and all routes built before anything
//! serves; problems from the manifest, the `.wasm` files, migrations and the route table are
//! gathered into one [`ManifestError`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;

use crate::capabilities::db::migrations;
use crate::capabilities::{Backends, BackendsConfig};
use crate::config::{Manifest, ManifestError};
use crate::policy::{
    AuthPolicy, CachePolicy, IdempotencyPolicy, LoginThrottle, PolicyState, RoutePolicies,
};
use crate::router::{RouteTable, Version, VersionSet};
use crate::runtime::{Function, Limits, Runtime, RuntimeOptions, Source};

/// A loaded manifest: the runtime that owns the engine, the backends, and the routes.
pub struct Loaded {
    pub manifest: Manifest,
    pub runtime: Runtime,
    pub backends: Backends,
    pub routes: RouteTable<VersionSet>,
    pub functions: BTreeMap<String, Function>,
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

/// Loads `path`. `previous` is the policy state of the deployment being replaced, if any.
pub async fn load(
    path: &Path,
    overrides: &Overrides,
    previous: &BTreeMap<String, Arc<PolicyState>>,
) -> Result<Loaded, LoadError> {
    let manifest = Manifest::read(path)?;
    let mut problems = manifest.validate();
    let base = path.parent().unwrap_or(Path::new("."));
    let cache_dir = overrides
        .cache_dir
        .clone()
        .unwrap_or_else(|| base.join(&manifest.server.cache_dir));
    let runtime = Runtime::new(&RuntimeOptions {
        // Zero is reported as a problem above; the engine still needs a pool to check the rest.
        max_instances: manifest.server.max_instances.max(1),
        max_memory: manifest
            .functions
            .values()
            .map(|f| f.memory)
            .max()
            .unwrap_or(crate::config::DEFAULT_MEMORY),
        cache_dir,
    })?;
    let backends_cfg = backends_config(&manifest, base, overrides);
    let mut backends = Backends::connect(&backends_cfg).await?;
    // The auth tables, keys and revocation list exist only when something uses them.
    let uses_auth = manifest.routes.iter().any(|r| r.auth.is_some())
        || manifest.functions.values().any(|f| {
            f.capabilities
                .contains(&crate::capabilities::Capability::Auth)
        });
    if uses_auth {
        let redis = backends.redis_client.clone().zip(backends.redis.clone());
        match crate::auth::Auth::open(&manifest.auth, base, backends.db.backend().clone(), redis)
            .await
        {
            Ok(auth) => backends.auth = Some(auth),
            Err(e) => problems.push(format!("[auth]: {e}")),
        }
    }
    let shared_throttle: Option<Arc<dyn crate::auth::throttle::ThrottleBackend>> =
        backends.redis.clone().map(|conn| {
            Arc::new(crate::auth::throttle::RedisThrottle::new(conn))
                as Arc<dyn crate::auth::throttle::ThrottleBackend>
        });

    let mut functions = BTreeMap::new();
    let mut policies = BTreeMap::new();
    for (name, f) in &manifest.functions {
        if f.rate_limit.as_ref().is_some_and(|r| r.shared) && backends_cfg.redis_url.is_none() {
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
        let caps = backends.configure(name);
        match runtime.load(name, &base.join(&f.wasm), limits, &f.capabilities, caps) {
            Ok(loaded) => {
                tracing::info!(
                    function = %name,
                    sha256 = %loaded.sha256(),
                    from = if loaded.source() == Source::Cache { "cache" } else { "compiled" },
                    load_ms = format_args!("{:.1}", as_ms(loaded.load_time())),
                    "loaded function"
                );
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
        let (Some(function), Some(policy)) =
            (functions.get(&r.function), policies.get(&r.function))
        else {
            continue;
        };
        let route_policies = RoutePolicies {
            auth: r
                .auth
                .as_ref()
                .zip(backends.auth.clone())
                .map(|(rule, auth)| Arc::new(AuthPolicy::new(auth, rule))),
            login_throttle: r.login_throttle.as_ref().map(|cfg| {
                Arc::new(LoginThrottle::new(
                    &r.function,
                    cfg,
                    policy.login_failures.clone(),
                    shared_throttle.clone(),
                ))
            }),
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
                    cfg,
                ))
            }),
        };
        let methods: Vec<Method> = r
            .methods
            .iter()
            .filter_map(|m| Method::from_str(&m.to_ascii_uppercase()).ok())
            .collect();
        if let Err(p) = routes.add(
            &r.path,
            &methods,
            VersionSet::single(Version::new(
                function.clone(),
                policy.stack(function.clone(), &route_policies),
            )),
            &r.label(i),
        ) {
            problems.push(p);
        }
    }

    if !problems.is_empty() {
        return Err(ManifestError {
            path: path.to_path_buf(),
            problems,
        }
        .into());
    }
    Ok(Loaded {
        manifest,
        runtime,
        backends,
        routes,
        functions,
        policies,
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
