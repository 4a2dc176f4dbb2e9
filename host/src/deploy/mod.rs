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
use crate::loader::{self, LoadError, Overrides, Platform, Settings};
use crate::policy::PolicyState;
use crate::server::{AppState, Deployment};

/// Applies manifests to a running process.
pub struct Deployer {
    path: PathBuf,
    overrides: Overrides,
    listen: Option<std::net::SocketAddr>,
    platform: Platform,
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
        let (_, platform, built) = loader::load(path, &overrides, listen).await?;
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

    /// Reads the manifest again and swaps it in whole, on the same engine and backends. A
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
        let built = loader::build(&self.platform, &manifest, base, &policies)
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
