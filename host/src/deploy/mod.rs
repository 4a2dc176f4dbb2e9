//! Deployments: what serves now, and how it changes while the process keeps running.
//!
//! Layout:
//! - `comparisons`: what shadow runs found per route (matches, mismatches with sample request
//!   ids, skips), shared through the registry like `stats`.
//! - `diff`: what a version may do, and whether a new one may do more than the live one.
//! - `preview`: requests pinned to a version by label, with an admin-issued preview token.
//! - `stats`: per-version requests, failures and latency, shared by every process through the
//!   registry (the admin summary and rollout gates read them).
//! - `version_set`: a route's versions, their weights and the per-request pick (weighted, or
//!   sticky by a key with rendezvous hashing).
//!
//! The [`Deployer`] outlives deployments: it owns the [`Platform`] (engine, instance pool,
//! backends, auth: built once per process) and swaps only the route table and the versions
//! behind it. A reload (SIGHUP, an admin API change, or a change another replica made: the same
//! call) builds the next deployment on the same platform and swaps it in atomically; requests in
//! flight finish on the version they started on, and the response cache keeps its entries.
//!
//! Replicas converge through the registry: a process that changes a deployment publishes a
//! notice on Redis ([`CHANNEL`]); every process reloads when it hears one, and also compares the
//! registry's generations with the ones it serves every [`POLL_WITH_REDIS`] (or
//! [`POLL_WITHOUT_REDIS`] when there is no Redis), which covers a lost notice.

mod comparisons;
mod diff;
mod preview;
mod stats;
mod version_set;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Mutex, Notify};

pub use comparisons::{Comparisons, SAMPLES, Sample, Tally, Verdict};
pub use diff::Surface;
pub use preview::{PREVIEW_HEADER, PREVIEW_TOKEN_HEADER, PREVIEW_TTL, Previews};
pub use stats::{Counts, Figures, Stats};
pub(crate) use version_set::random_point;
pub use version_set::{StickyKey, VERSION_HEADER, Version, VersionMetrics, VersionSet};

use crate::config::{Manifest, ManifestError};
use crate::loader::{self, Live, LoadError, Overrides, Platform, Settings};
use crate::policy::PolicyState;
use crate::registry::Registry;
use crate::server::{AppState, Deployment};

/// Deployment changes are announced here (`<function>:<generation>`).
pub const CHANNEL: &str = "wasmgate:deploy:changed";
/// How often a process compares the registry's generations with its own, with Redis notices.
pub const POLL_WITH_REDIS: Duration = Duration::from_secs(5);
/// The same without Redis: the poll is then what makes replicas converge within a second.
pub const POLL_WITHOUT_REDIS: Duration = Duration::from_millis(250);

/// The generation of every function's live deployment in the registry.
type Generations = BTreeMap<String, i64>;

/// Applies manifests to a running process.
pub struct Deployer {
    path: PathBuf,
    overrides: Overrides,
    listen: Option<std::net::SocketAddr>,
    platform: Platform,
    registry: Registry,
    state: Arc<AppState>,
    /// The live deployment's policy state (and one change at a time).
    policies: Mutex<BTreeMap<String, Arc<PolicyState>>>,
    /// The registry generations the live deployment was built from.
    applied: std::sync::Mutex<Generations>,
    /// Set once the outbox relay runs (from the first deployment with a publishing version).
    relay: std::sync::OnceLock<()>,
    /// The event broker, opened once for the relay and every consumer.
    broker: tokio::sync::OnceCell<Arc<dyn crate::events::Broker>>,
    /// Each subscription's consumer's version, by subscription name (swapped on reload).
    consumers: std::sync::Mutex<BTreeMap<String, crate::events::consumer::Target>>,
}

impl Deployer {
    /// Loads the manifest at `path` and builds the platform and the first deployment.
    pub async fn start(
        path: &Path,
        overrides: Overrides,
        listen: Option<std::net::SocketAddr>,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Result<Arc<Self>, LoadError> {
        let manifest = Manifest::read(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fail = |problems| ManifestError {
            path: path.to_path_buf(),
            problems,
        };
        let (platform, problems) = Platform::open(&manifest, base, &overrides, listen).await?;
        if !problems.is_empty() {
            return Err(fail(problems).into());
        }
        let registry = Registry::open(platform.backends.db.backend().clone())
            .await
            .map_err(|e| fail(vec![format!("registry: {e}")]))?;
        let (live, generations) = live(&registry, &manifest)
            .await
            .map_err(|e| fail(vec![e]))?;
        let built = loader::build(&platform, &manifest, base, &BTreeMap::new(), &live)
            .await
            .map_err(fail)?;
        let functions = built.functions.len();
        let state = AppState::new(
            Deployment {
                routes: built.routes,
                functions,
            },
            platform.backends.clone(),
            Some(Arc::new(Previews::new(registry.clone()))),
            metrics,
        );
        let redis = platform.backends.redis_client.clone();
        let deployer = Arc::new(Self {
            path: path.to_path_buf(),
            overrides,
            listen,
            platform,
            registry,
            state,
            policies: Mutex::new(built.policies),
            applied: std::sync::Mutex::new(generations),
            relay: std::sync::OnceLock::new(),
            broker: tokio::sync::OnceCell::new(),
            consumers: std::sync::Mutex::default(),
        });
        if built.publishes {
            deployer.start_relay().await;
        }
        deployer.consume(&manifest, &built.functions).await;
        tokio::spawn(watch(Arc::downgrade(&deployer), redis));
        tokio::spawn(crate::rollout::drive(Arc::downgrade(&deployer)));
        tokio::spawn(
            deployer
                .platform
                .stats
                .clone()
                .run(deployer.registry.clone(), Arc::downgrade(&deployer)),
        );
        Ok(deployer)
    }

    /// Starts a consumer for each subscription that has none yet, and points every consumer at
    /// its function's current version. A subscription removed from the manifest keeps its
    /// consumer until the process restarts (its events wait in the broker meanwhile).
    async fn consume(&self, manifest: &Manifest, functions: &BTreeMap<String, loader::Loaded>) {
        if manifest.subscriptions.is_empty() {
            return;
        }
        let Some(broker) = self.broker().await else {
            tracing::error!("subscriptions wait for the event broker");
            return;
        };
        for s in &manifest.subscriptions {
            let Some(version) = functions
                .get(&s.function)
                .and_then(loader::Loaded::heaviest)
            else {
                continue;
            };
            let mut consumers = self
                .consumers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match consumers.get(&s.name()) {
                Some(target) => target.store(Arc::new(version.clone())),
                None => {
                    let target: crate::events::consumer::Target =
                        Arc::new(arc_swap::ArcSwap::from_pointee(version.clone()));
                    consumers.insert(s.name(), target.clone());
                    let consumer = crate::events::consumer::Consumer::new(
                        s.clone(),
                        target,
                        self.platform.backends.configure(&s.function),
                        self.platform.backends.db.backend().clone(),
                        broker.clone(),
                    );
                    tokio::spawn(consumer.run(Arc::downgrade(&self.state)));
                }
            }
        }
    }

    /// Starts moving the outbox to the broker, once per process. A broker that cannot be
    /// opened is logged; the events wait in the outbox and the next reload tries again.
    async fn start_relay(&self) {
        if self.relay.get().is_some() {
            return;
        }
        let Some(broker) = self.broker().await else {
            tracing::error!("events wait in the outbox for the event broker");
            return;
        };
        if self.relay.set(()).is_ok() {
            tracing::info!(broker = broker.kind(), "relaying events from the outbox");
            let relay = crate::events::relay::Relay::new(
                self.platform.backends.db.backend().clone(),
                broker,
            );
            tokio::spawn(relay.run(Arc::downgrade(&self.state)));
        }
    }

    /// The event broker, opened on first use (the queue's tables are created then); `None`
    /// (logged) while it cannot be opened, so the next reload tries again.
    async fn broker(&self) -> Option<Arc<dyn crate::events::Broker>> {
        match self
            .broker
            .get_or_try_init(|| crate::events::broker(&self.platform.backends))
            .await
        {
            Ok(b) => Some(b.clone()),
            Err(e) => {
                tracing::error!(error = %e, "the event broker cannot be opened");
                None
            }
        }
    }

    /// Tells the other processes that `function`'s deployment changed (they also find out by
    /// polling; this makes it milliseconds).
    pub async fn announce(&self, function: &str, generation: i64) {
        let Some(conn) = &self.platform.backends.redis else {
            return;
        };
        if !crate::notices::publish(conn, CHANNEL, &format!("{function}:{generation}")).await {
            tracing::warn!(
                function,
                generation,
                "deployment change not announced; other processes find it by polling"
            );
        }
    }

    /// Whether the registry holds other generations than the ones served now.
    async fn behind(&self) -> Result<bool, crate::registry::RegistryError> {
        let now: Generations = self
            .registry
            .deployments(None)
            .await?
            .into_iter()
            .map(|d| (d.function, d.generation))
            .collect();
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(now != *applied)
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    pub fn settings(&self) -> &Settings {
        &self.platform.settings
    }

    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The manifest as it is on disk now (the admin API checks names and settings against it).
    pub fn manifest(&self) -> Result<Manifest, ManifestError> {
        Manifest::read(&self.path)
    }

    /// Reads the manifest and the registry's live deployments again and swaps the result in
    /// whole, on the same engine and backends: SIGHUP and every admin change come here. A
    /// manifest with problems (or one that changes what only a restart can) is refused, naming
    /// them, and the current deployment keeps serving. Returns the number of functions.
    pub async fn reload(&self) -> Result<usize, LoadError> {
        let mut policies = self.policies.lock().await;
        let manifest = Manifest::read(&self.path)?;
        let base = self.path.parent().unwrap_or(Path::new("."));
        let fail = |problems| ManifestError {
            path: self.path.clone(),
            problems,
        };
        let mut problems = manifest.validate();
        problems.extend(self.platform.settings.refuse(&loader::Settings::of(
            &manifest,
            base,
            &self.overrides,
            self.listen,
        )));
        if !problems.is_empty() {
            return Err(fail(problems).into());
        }
        let (live, generations) = live(&self.registry, &manifest)
            .await
            .map_err(|e| fail(vec![e]))?;
        let built = loader::build(&self.platform, &manifest, base, &policies, &live)
            .await
            .map_err(fail)?;
        let functions = built.functions.len();
        self.state.swap(Deployment {
            routes: built.routes,
            functions,
        });
        self.consume(&manifest, &built.functions).await;
        if built.publishes {
            self.start_relay().await;
        }
        *policies = built.policies;
        *self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = generations;
        Ok(functions)
    }
}

/// The registry's live deployments of the manifest's functions, with their modules' bytes. The
/// manifest decides which functions and routes exist; the registry, which versions serve them.
async fn live(
    registry: &Registry,
    manifest: &Manifest,
) -> Result<(BTreeMap<String, Live>, Generations), String> {
    let mut live = BTreeMap::new();
    let deployments = registry
        .deployments(None)
        .await
        .map_err(|e| format!("registry: {e}"))?;
    let generations = deployments
        .iter()
        .map(|d| (d.function.clone(), d.generation))
        .collect();
    for d in deployments {
        if !manifest.functions.contains_key(&d.function) {
            tracing::warn!(function = %d.function, "the registry deploys a function the manifest does not define; ignored");
            continue;
        }
        let versions = registry
            .versions(&d.function)
            .await
            .map_err(|e| format!("registry: {e}"))?;
        let mut modules = Vec::new();
        for w in &d.spec.versions {
            let version = versions
                .iter()
                .find(|v| v.label == w.label)
                .ok_or_else(|| format!("registry: {} has no version {}", d.function, w.label))?;
            let sha256 = version.sha256.clone();
            let settings = crate::registry::VersionSettings::parse(&version.settings)?;
            let bytes = registry
                .module(&sha256)
                .await
                .map_err(|e| format!("registry: {e}"))?
                .ok_or_else(|| format!("registry: module {sha256} is missing"))?;
            modules.push((w.label.clone(), bytes, settings));
        }
        live.insert(
            d.function.clone(),
            Live {
                spec: d.spec,
                modules,
            },
        );
    }
    Ok((live, generations))
}

/// Keeps this process on the registry's deployments until the deployer is dropped: reloads when
/// a notice arrives or a poll finds other generations.
async fn watch(deployer: Weak<Deployer>, redis: Option<redis::Client>) {
    let notice = Arc::new(Notify::new());
    let every = if redis.is_some() {
        POLL_WITH_REDIS
    } else {
        POLL_WITHOUT_REDIS
    };
    if let Some(client) = redis {
        let notice = notice.clone();
        tokio::spawn(crate::notices::listen(
            client,
            CHANNEL,
            deployer.clone(),
            move |_: &Deployer, _| notice.notify_one(),
        ));
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = notice.notified() => {}
        }
        let Some(d) = deployer.upgrade() else { return };
        match d.behind().await {
            Ok(true) => match d.reload().await {
                Ok(_) => tracing::info!("applied a deployment change from the registry"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot apply the registry's deployment; still serving the previous one")
                }
            },
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read the registry; will retry"),
        }
    }
}
