//! The capabilities a function can be granted: its only way to the outside world.
//!
//! Layout: one folder per capability, each the same shape:
//! - `mod.rs`: the capability type and its three phases: `link` (once: adds its bindings to a
//!   linker), `configure` (once per function: namespacing and the function's share), `instance`
//!   (per request: cheap clones of handles into the store).
//! - `host.rs`: the generated `Host` trait impls (argument checks, timeouts, error mapping).
//! - `backend.rs`: a small trait and its embedded and PostgreSQL/Redis backends.
//! - `conformance.rs` (tests): one suite, run against every backend.
//!
//! They are composed by hand in [`Backends`] (process-wide) and [`RequestCaps`] (per request).

pub mod auth;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod db;
pub mod events;
pub mod lock;
pub mod password;
pub mod response_cache;
pub mod wasi_config;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use crate::runtime::GuestState;

pub use config::BackendsConfig;

/// Host bindings generated from `wit/`: the `capabilities` world.
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasmgate:platform/capabilities",
        imports: { default: async | trappable },
        require_store_data_send: true,
        additional_derives: [PartialEq],
        with: {
            "wasmgate:platform/db.transaction": super::db::Transaction,
            "wasmgate:platform/lock.lease": super::lock::Lease,
        },
    });
}

/// Every host call to a backend is bounded by this, so a stopped server costs a guest at most
/// this long before it sees `unavailable`/`timeout`, never a hang.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a backend answers its ping within [`BACKEND_TIMEOUT`].
pub(crate) async fn answers<E>(ping: impl Future<Output = Result<(), E>>) -> bool {
    matches!(
        tokio::time::timeout(BACKEND_TIMEOUT, ping).await,
        Ok(Ok(()))
    )
}

/// The WIT package prefix of capability imports.
const PACKAGE: &str = "wasmgate:platform/";

/// A capability named in a function's `capabilities = [...]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    Db,
    Cache,
    Lock,
    ResponseCache,
    Auth,
    Events,
    Password,
    /// `wasi:config/store`, with the function's `config` values.
    Config,
}

impl Capability {
    pub const ALL: [Capability; 8] = [
        Capability::Db,
        Capability::Cache,
        Capability::Lock,
        Capability::ResponseCache,
        Capability::Auth,
        Capability::Events,
        Capability::Password,
        Capability::Config,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Capability::Db => "db",
            Capability::Cache => "cache",
            Capability::Lock => "lock",
            Capability::ResponseCache => "response-cache",
            Capability::Auth => "auth",
            Capability::Events => "events",
            Capability::Password => "password",
            Capability::Config => "config",
        }
    }

    /// The interface a component imports for it, without its version.
    pub fn interface(self) -> String {
        match self {
            Capability::Config => wasi_config::INTERFACE.to_string(),
            platform => format!("{PACKAGE}{}", platform.name()),
        }
    }

    /// The capability an import (`package/interface@version`) asks for, if it is one.
    fn of_import(name: &str) -> Option<Self> {
        let iface = name.split('@').next().unwrap_or(name);
        Self::ALL.into_iter().find(|c| c.interface() == iface)
    }
}

/// The set a function is granted.
pub type Grants = BTreeSet<Capability>;

/// Adds the granted capabilities' bindings to `linker`. A linker per grant set means an
/// ungranted import cannot even be resolved.
pub fn link(linker: &mut Linker<GuestState>, grants: &Grants) -> wasmtime::Result<()> {
    for cap in grants {
        match cap {
            Capability::Db => db::link(linker)?,
            Capability::Cache => cache::link(linker)?,
            Capability::Lock => lock::link(linker)?,
            Capability::ResponseCache => response_cache::link(linker)?,
            Capability::Auth => auth::link(linker)?,
            Capability::Events => events::link(linker)?,
            Capability::Password => password::link(linker)?,
            Capability::Config => wasi_config::link(linker)?,
        }
    }
    Ok(())
}

/// Refuses a component that imports a capability its manifest entry does not grant, naming the
/// import and the fix.
/// The wasmgate capabilities `component` imports, by name.
pub fn imported(engine: &Engine, component: &Component) -> Vec<&'static str> {
    let ty = component.component_type();
    ty.imports(engine)
        .filter_map(|(name, _)| Capability::of_import(name).map(Capability::name))
        .collect()
}

pub fn check_grants(engine: &Engine, component: &Component, grants: &Grants) -> Result<(), String> {
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        match Capability::of_import(name) {
            Some(cap) if grants.contains(&cap) => {}
            Some(cap) => {
                return Err(format!(
                    "it imports `{name}` but is not granted `{0}`; add \"{0}\" to its `capabilities`",
                    cap.name()
                ));
            }
            None if name.starts_with(PACKAGE) => {
                return Err(format!(
                    "it imports `{name}`, which wasmgate does not provide; the capabilities are db, cache, lock, response-cache, auth, events, password and config (wasi:config/store)"
                ));
            }
            None => {}
        }
    }
    Ok(())
}

/// The process-wide backends, built once from configuration.
#[derive(Clone)]
pub struct Backends {
    pub db: db::Db,
    pub cache: cache::Cache,
    pub lock: lock::Lock,
    /// The host's response cache; functions reach it only to purge.
    pub response_cache: crate::response_cache::ResponseCache,
    /// For host features that share state across processes (shared rate limits).
    pub redis: Option<redis::aio::ConnectionManager>,
    /// A client for subscriptions (each needs a connection of its own).
    pub redis_client: Option<redis::Client>,
    /// Tokens and roles; opened by the loader when a route or a function uses them.
    pub auth: Option<crate::auth::Auth>,
    /// Password hashing; the loader sets the manifest's `[password]` parameters.
    pub passwords: password::Passwords,
}

/// One backend's state for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub name: &'static str,
    pub kind: &'static str,
    pub ready: bool,
    /// The capability's circuit breaker (`closed`, `open`, `half-open`), where it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<&'static str>,
}

impl Backends {
    pub async fn connect(config: &BackendsConfig) -> Result<Self, config::ConnectError> {
        // One multiplexed connection serves the cache, the locks, shared rate limits and the
        // response cache's shared tier; its purge subscription needs a connection of its own.
        let redis = config
            .redis_url
            .as_deref()
            .map(cache::redis_manager)
            .transpose()?;
        let redis_client = config
            .redis_url
            .as_deref()
            .map(cache::redis_client)
            .transpose()?;
        let response_cache = match (&redis, config.redis_url.as_deref()) {
            (Some(conn), Some(url)) => crate::response_cache::ResponseCache::with_redis(
                cache::redis_client(url)?,
                conn.clone(),
            ),
            _ => crate::response_cache::ResponseCache::in_memory(),
        };
        Ok(Self {
            db: db::Db::connect(&config.database_url).await?,
            cache: cache::Cache::new(redis.clone()),
            lock: lock::Lock::new(redis.clone()),
            response_cache,
            redis,
            redis_client,
            auth: None,
            passwords: password::Passwords::new(&password::PasswordConfig::default())
                .expect("the default password parameters are valid"),
        })
    }

    /// Per function: its namespace and share of each backend.
    pub fn configure(&self, function: &str) -> FunctionCaps {
        FunctionCaps {
            db: self.db.configure(function),
            cache: self.cache.configure(function),
            lock: self.lock.configure(function),
            response_cache: response_cache::FunctionResponseCache::new(
                self.response_cache.clone(),
                function,
            ),
            auth: auth::FunctionAuth::new(self.auth.clone()),
            events: events::FunctionEvents::new(function),
            password: self.passwords.configure(function),
            env: Arc::new([]),
            config: Default::default(),
        }
    }

    pub async fn readiness(&self) -> Vec<Readiness> {
        let (db, cache, lock, response_cache) = tokio::join!(
            self.db.ready(),
            self.cache.ready(),
            self.lock.ready(),
            self.response_cache.ping()
        );
        vec![
            Readiness {
                name: "db",
                kind: self.db.kind(),
                ready: db,
                breaker: Some(self.db.breaker()),
            },
            Readiness {
                name: "cache",
                kind: self.cache.kind(),
                ready: cache,
                breaker: Some(self.cache.breaker()),
            },
            Readiness {
                name: "lock",
                kind: self.lock.kind(),
                ready: lock,
                breaker: Some(self.lock.breaker()),
            },
            Readiness {
                name: "response-cache",
                kind: self.response_cache.kind(),
                ready: response_cache,
                breaker: None,
            },
        ]
    }
}

/// A function's capabilities, configured once when it is loaded.
#[derive(Clone)]
pub struct FunctionCaps {
    db: db::FunctionDb,
    cache: cache::FunctionCache,
    lock: lock::FunctionLock,
    response_cache: response_cache::FunctionResponseCache,
    auth: auth::FunctionAuth,
    events: events::FunctionEvents,
    password: password::FunctionPasswords,
    /// The environment variables its instances see (the manifest's `env`).
    env: Arc<[(String, String)]>,
    /// Its `wasi:config/store` values (the manifest's `config`).
    config: wasi_config::FunctionConfigValues,
}

impl FunctionCaps {
    /// With these environment variables for its instances.
    pub fn with_env<'a>(mut self, env: impl IntoIterator<Item = (&'a String, &'a String)>) -> Self {
        self.env = env
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self
    }

    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// With these `wasi:config/store` values for its instances.
    pub fn with_config(mut self, config: wasi_config::FunctionConfigValues) -> Self {
        self.config = config;
        self
    }

    pub fn config(&self) -> &wasi_config::FunctionConfigValues {
        &self.config
    }

    /// Per request: cheap, infallible.
    pub fn instance(&self) -> RequestCaps {
        RequestCaps {
            db: self.db.instance(),
            cache: self.cache.instance(),
            lock: self.lock.instance(),
            response_cache: self.response_cache.instance(),
            auth: self.auth.instance(),
            events: self.events.instance(),
            password: self.password.instance(),
        }
    }

    /// Per shadow run: nothing it does may reach what live requests share. The database is the
    /// same (the runtime holds the run in a transaction it rolls back); the cache and locks are
    /// the run's own and empty; response-cache purges are dropped; tokens cannot be issued,
    /// refreshed or revoked (`unavailable`); events are checked and answered, never written;
    /// passwords hash as usual (nothing shared changes), on the function's own turns.
    pub fn shadow(&self) -> RequestCaps {
        RequestCaps {
            db: self.db.instance(),
            cache: self.cache.private(),
            lock: self.lock.private(),
            response_cache: self.response_cache.discarding(),
            auth: auth::FunctionAuth::new(None).instance(),
            events: self.events.discarding(),
            password: self.password.instance(),
        }
    }
}

/// What one request's store holds for its capabilities.
pub struct RequestCaps {
    pub db: db::RequestDb,
    pub cache: cache::RequestCache,
    pub lock: lock::RequestLock,
    pub response_cache: response_cache::RequestResponseCache,
    pub auth: auth::RequestAuth,
    pub events: events::RequestEvents,
    pub password: password::RequestPasswords,
}
