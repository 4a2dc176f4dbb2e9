//! From a manifest file to everything the server needs, or every reason it cannot start.
//!
//! All functions are loaded and all routes built before anything serves; problems from the
//! manifest, the `.wasm` files and the route table are gathered into one [`ManifestError`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use axum::http::Method;
use std::collections::BTreeMap;

use crate::config::{Manifest, ManifestError};
use crate::router::{RouteTable, VersionSet};
use crate::runtime::{Function, Limits, Runtime, RuntimeOptions, Source};

/// A loaded manifest: the runtime that owns the engine, and the routes that point into it.
pub struct Loaded {
    pub manifest: Manifest,
    pub runtime: Runtime,
    pub routes: RouteTable<VersionSet>,
    pub functions: BTreeMap<String, Function>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Engine(#[from] crate::runtime::EngineError),
}

/// Loads `path`. `cache_dir`, when given, overrides the manifest's.
pub fn load(path: &Path, cache_dir: Option<PathBuf>) -> Result<Loaded, LoadError> {
    let manifest = Manifest::read(path)?;
    let mut problems = manifest.validate();
    let base = path.parent().unwrap_or(Path::new("."));
    let cache_dir = cache_dir.unwrap_or_else(|| base.join(&manifest.server.cache_dir));
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

    let mut functions = BTreeMap::new();
    for (name, f) in &manifest.functions {
        let limits = Limits {
            timeout: f.timeout,
            memory: f.memory,
            max_body: f.max_body,
        };
        match runtime.load(name, &base.join(&f.wasm), limits) {
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
    }

    let mut routes = RouteTable::default();
    for (i, r) in manifest.routes.iter().enumerate() {
        // Unknown functions were reported by validation; a function that failed to load was
        // reported above. Either way this route cannot be built.
        let Some(function) = functions.get(&r.function) else {
            continue;
        };
        let methods: Vec<Method> = r
            .methods
            .iter()
            .filter_map(|m| Method::from_str(&m.to_ascii_uppercase()).ok())
            .collect();
        if let Err(p) = routes.add(
            &r.path,
            &methods,
            VersionSet::single(function.clone()),
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
        routes,
        functions,
    })
}

fn as_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
