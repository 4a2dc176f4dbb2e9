//! Deployments: what serves now, and how it changes while the process keeps running.
//!
//! Layout:
//! - `version_set`: a route's versions, their weights and the per-request pick (weighted, or
//!   sticky by a key with rendezvous hashing).
//!
//! The [`Deployer`] outlives deployments: it owns the [`Platform`] (engine, instance pool,
//! backends, auth: built once per process) and swaps only the route table and the versions
//! behind it. A reload (SIGHUP today, the admin API later: the same call) builds the next
//! deployment on the same platform and swaps it in atomically; requests in flight finish on the
//! version they started on, and the response cache keeps its entries.

mod version_set;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Mutex;

pub use version_set::{StickyKey, VERSION_HEADER, Version, VersionMetrics, VersionSet};

use crate::config::{Manifest, ManifestError};
use crate::loader::{self, Live, LoadError, Overrides, Platform, Settings};
use crate::policy::PolicyState;
use crate::registry::Registry;
use crate::server::{AppState, Deployment};

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
        let live = live(&registry, &manifest)
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
            metrics,
        );
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            overrides,
            listen,
            platform,
            registry,
            state,
            policies: Mutex::new(built.policies),
        }))
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
        let live = live(&self.registry, &manifest)
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
        *policies = built.policies;
        Ok(functions)
    }
}

/// The registry's live deployments of the manifest's functions, with their modules' bytes. The
/// manifest decides which functions and routes exist; the registry, which versions serve them.
async fn live(registry: &Registry, manifest: &Manifest) -> Result<BTreeMap<String, Live>, String> {
    let mut live = BTreeMap::new();
    let deployments = registry
        .deployments(None)
        .await
        .map_err(|e| format!("registry: {e}"))?;
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
            let sha256 = versions
                .iter()
                .find(|v| v.label == w.label)
                .map(|v| v.sha256.clone())
                .ok_or_else(|| format!("registry: {} has no version {}", d.function, w.label))?;
            let bytes = registry
                .module(&sha256)
                .await
                .map_err(|e| format!("registry: {e}"))?
                .ok_or_else(|| format!("registry: module {sha256} is missing"))?;
            modules.push((w.label.clone(), bytes));
        }
        live.insert(
            d.function.clone(),
            Live {
                spec: d.spec,
                modules,
            },
        );
    }
    Ok(live)
}
