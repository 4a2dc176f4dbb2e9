//! The wasm side of the host: one engine, one linker, components loaded once and instantiated
//! fresh for every request.
//!
//! Layout:
//! - `state`: what a request's `Store` holds (WASI contexts, limits, deadline flags).
//! - `compile_cache`: compiled components on disk, keyed by sha256 + engine compatibility hash.
//! - `invoke`: one request through a fresh instance, with its deadline and failure causes.
//! - `event`: one event through a fresh instance of an event function (the
//!   `wasmgate:platform/event-handler` export).
//! - `shadow`: a run whose side effects go nowhere (shadow traffic), its database rolled back.
//! - `deny_outgoing`: refuses `wasi:http` outgoing requests (capabilities are the only way out).
//! - `warm_pool`: fresh instances made ahead of demand, off the request's critical path.
//! - `epoch`: the ticker that makes deadlines real for guests that never call the host.
//!
//! Engine choices, and why: the pooling allocator makes instantiation a slot reuse instead of an
//! mmap per request; epoch interruption (not fuel) costs almost nothing on the hot path and lets
//! a spinning guest yield to tokio every tick and trap at its deadline.

mod compile_cache;
mod deny_outgoing;
mod epoch;
mod event;
mod invoke;
mod output;
mod shadow;
mod state;
mod warm_pool;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

pub use compile_cache::Source;
pub use event::{Delivery, HandlerError};
pub use invoke::{Ended, Failure, GuestBody};
pub use shadow::Answer;
pub use state::GuestState;

use crate::capabilities::{self, FunctionCaps, Grants};
use compile_cache::CompileCache;

/// How often the epoch advances. A spinning guest yields to tokio this often, so this bounds how
/// long it can keep a neighbour's request waiting for a worker (measured: at 10 ms, hello's p99
/// rose ~12x next to saturated spinners), and how far it overshoots its deadline. The check is a
/// load and compare in guest code; the ticker thread wakes 1,000 times a second.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Settings the engine needs before any function is loaded.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub max_instances: u32,
    /// Instances made ahead of demand, across all functions (0: none).
    pub warm_instances: u32,
    /// What one component may hold (`[server.component_limits]`).
    pub component_limits: crate::config::ComponentLimits,
    /// The largest memory cap of any function: the pool's slots are sized for it.
    pub max_memory: u64,
    pub cache_dir: PathBuf,
}

/// A function's per-request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub memory: u64,
    pub max_body: u64,
    /// 0: a fresh instance per request. N: an instance may serve up to N sequential requests
    /// (faster, but state survives between them); a trap or timeout always discards it.
    pub instance_reuse: u32,
}

/// Freed instance slots are decommitted (madvise) in batches of this many. Decommitting one
/// slot per request made TLB-shootdown IPIs the top of a `perf` profile of the fresh-instance
/// path; batching them measured 4,100-4,500 -> 5,400-6,500 hello requests/s (wrk -c64, 2 cores).
/// The cost is that up to this many freed slots stay committed a little longer.
const DECOMMIT_BATCH: usize = 16;

/// Guest stacks are zeroed and decommitted with their slot when freed, as linear memories are.
/// Without it a pooled stack keeps every page its deepest request touched: 200 concurrent
/// requests left about 14 MiB resident after their version drained (the drain test in
/// `tests/tests/admin.rs`). It costs the fresh-instance path the page faults of a cold stack:
/// hello 9,230 and 9,050 req/s against 9,840 and 10,250 without it (wrk -c64, 10 s, release
/// build, alternated runs on 2 cores), about 8%.
const ZERO_STACKS: bool = true;

/// Idle instances kept per function for reuse; each holds a pooling-allocator slot.
const MAX_IDLE_INSTANCES: usize = 64;

/// The engine, the linker every component is checked against, and the compiled-module cache.
pub struct Runtime {
    engine: Engine,
    /// One linker per grant set: a function's linker holds only what it was granted.
    linkers: Mutex<BTreeMap<Grants, Linker<GuestState>>>,
    cache: CompileCache,
    /// Versions loaded now, by what they were loaded from (function, module, limits, grants): a
    /// reload that keeps a version gets the same one, with its idle instances, instead of
    /// loading it again. Weak: a version no deployment uses any more is still dropped.
    loaded: Mutex<BTreeMap<String, std::sync::Weak<FunctionInner>>>,
    /// What makes instances ahead; none when `warm_instances` is 0.
    warm: Option<warm_pool::Warmer>,
}

/// Why a component could not be loaded; each message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read `{path}`: {source}; build the function first or fix its `wasm` path")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "`{path}` is a core wasm module, not a component; build it for the `wasm32-wasip2` target (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule { path: PathBuf },
    #[error("`{path}` is not a valid wasm component: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "`{path}` does not fit the instance pool: {reason}; raise `{setting}` under `[server.component_limits]` (a restart applies it)"
    )]
    TooBig {
        path: PathBuf,
        reason: String,
        setting: &'static str,
    },
    #[error(
        "`{path}` imports something wasmgate does not provide: {reason}; functions may import wasi:cli, wasi:io, wasi:clocks, wasi:random, wasi:filesystem, wasi:sockets and wasi:http 0.2.x, and the capabilities they are granted"
    )]
    Import { path: PathBuf, reason: String },
    #[error("`{path}` is refused: {reason}")]
    NotGranted { path: PathBuf, reason: String },
    #[error(
        "`{path}` does not export the `wasi:http/incoming-handler` interface of the `http-function` world, nor the `wasmgate:platform/event-handler` of the `event-function` world: {reason}; write the handler with wasmgate-sdk's `export_http_function!` (or any wasi:http 0.2 proxy toolchain) or `export_event_function!`"
    )]
    WrongWorld { path: PathBuf, reason: String },
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start the wasm engine: {0}")]
pub struct EngineError(String);

/// The `[server.component_limits]` setting a pool refusal is about, if it is one (wasmtime
/// says which limit in its message; the pool's other limits follow from the function's).
fn over_a_component_limit(reason: &str) -> Option<&'static str> {
    if !reason.contains("in the pooling allocator") {
        return None;
    }
    [
        ("core module instances", "core_instances"),
        ("linear memories", "memories"),
        ("tables", "tables"),
    ]
    .into_iter()
    .find(|(what, _)| reason.contains(what))
    .map(|(_, setting)| setting)
}

impl Runtime {
    pub fn new(opts: &RuntimeOptions) -> Result<Self, EngineError> {
        let per = opts.component_limits;
        let mut pool = PoolingAllocationConfig::new();
        // Totals: every slot could hold the largest component. Core instances and tables cost
        // little until used; memories stay one per slot (each reserves address space for the
        // largest memory cap), so components with several memories fit fewer at once.
        pool.total_component_instances(opts.max_instances)
            .total_core_instances(opts.max_instances.saturating_mul(per.core_instances))
            .max_core_instances_per_component(per.core_instances)
            .max_memories_per_component(per.memories)
            .max_tables_per_component(per.tables)
            .total_memories(opts.max_instances.max(per.memories))
            .total_tables(opts.max_instances.saturating_mul(per.tables))
            .total_stacks(opts.max_instances)
            .max_memory_size(usize::try_from(opts.max_memory).unwrap_or(usize::MAX))
            .decommit_batch_size(DECOMMIT_BATCH);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .async_stack_zeroing(ZERO_STACKS)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| EngineError(e.to_string()))?;

        let cache = CompileCache::new(opts.cache_dir.clone(), &engine).map_err(|e| {
            EngineError(format!(
                "cannot create the compiled cache `{}`: {e}",
                opts.cache_dir.display()
            ))
        })?;
        epoch::start(&engine, EPOCH_TICK);
        Ok(Self {
            engine,
            linkers: Mutex::default(),
            cache,
            loaded: Mutex::default(),
            warm: match opts.warm_instances {
                0 => None,
                n => Some(warm_pool::Warmer::start(n).map_err(|e| {
                    EngineError(format!(
                        "cannot start the thread that makes instances ahead: {e}"
                    ))
                })?),
            },
        })
    }

    /// The linker for functions granted `grants`: WASI, wasi:http and those capabilities.
    fn linker(&self, grants: &Grants) -> wasmtime::Result<Linker<GuestState>> {
        let mut linkers = self
            .linkers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(l) = linkers.get(grants) {
            return Ok(l.clone());
        }
        let mut linker = Linker::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        capabilities::link(&mut linker, grants)?;
        linkers.insert(grants.clone(), linker.clone());
        Ok(linker)
    }

    /// Reads, compiles (or loads from the cache), checks grants, links and pre-instantiates a
    /// component.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        limits: Limits,
        grants: &Grants,
        caps: FunctionCaps,
    ) -> Result<Function, LoadError> {
        let wasm = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_bytes(name, path, &wasm, limits, grants, caps)
    }

    /// As [`Runtime::load`], from bytes already in memory (a module from the registry);
    /// `origin` names them in errors. Compiles on the calling thread: callers on the request
    /// path run it on a blocking thread.
    pub fn load_bytes(
        &self,
        name: &str,
        origin: &Path,
        wasm: &[u8],
        limits: Limits,
        grants: &Grants,
        caps: FunctionCaps,
    ) -> Result<Function, LoadError> {
        let path = origin;
        let started = Instant::now();
        // `\0asm` then version 1, layer 0: a core module. Components use layer 1.
        if wasm.get(0..8) == Some(b"\0asm\x01\x00\x00\x00") {
            return Err(LoadError::CoreModule {
                path: path.to_path_buf(),
            });
        }
        let sha256 = hex::encode(Sha256::digest(wasm));
        let key = format!(
            "{name} {sha256} {limits:?} {grants:?} {:?} {}",
            caps.env(),
            caps.config().fingerprint()
        );
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loaded.retain(|_, f| f.strong_count() > 0);
        if let Some(inner) = loaded.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(Function { inner });
        }
        drop(loaded);
        let (component, source) = self.cache.load(&self.engine, &sha256, wasm).map_err(|e| {
            let reason = format!("{e:#}");
            match over_a_component_limit(&reason) {
                Some(setting) => LoadError::TooBig {
                    path: path.to_path_buf(),
                    reason,
                    setting,
                },
                None => LoadError::Invalid {
                    path: path.to_path_buf(),
                    reason,
                },
            }
        })?;
        capabilities::check_grants(&self.engine, &component, grants).map_err(|reason| {
            LoadError::NotGranted {
                path: path.to_path_buf(),
                reason,
            }
        })?;
        let import_err = |e: wasmtime::Error| LoadError::Import {
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        };
        let imports = capabilities::imported(&self.engine, &component);
        let instance_pre = self
            .linker(grants)
            .and_then(|l| l.instantiate_pre(&component))
            .map_err(import_err)?;
        let entry = match ProxyPre::new(instance_pre.clone()) {
            Ok(pre) => Entry::Http(pre),
            Err(http) => match event::EventExportsPre::new(instance_pre) {
                Ok(pre) => Entry::Event(pre),
                Err(_) => {
                    return Err(LoadError::WrongWorld {
                        path: path.to_path_buf(),
                        reason: format!("{http:#}"),
                    });
                }
            },
        };
        let runs = metrics::counter!("wasmgate_guest_runs_total",
            "function" => name.to_string(), "version" => sha256[..12].to_string());
        let running = metrics::gauge!("wasmgate_instances_running",
            "function" => name.to_string(), "version" => sha256[..12].to_string());
        let warm_pool = self
            .warm
            .clone()
            .map(|warmer| warm_pool::WarmPool::new(warmer, name, &sha256[..12]));
        let inner = Arc::new(FunctionInner {
            warm_pool,
            running,
            runs,
            name: name.to_string(),
            sha256,
            entry,
            limits,
            caps,
            source,
            load_time: started.elapsed(),
            imports,
            idle: Mutex::default(),
        });
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, Arc::downgrade(&inner));
        Ok(Function { inner })
    }
}

/// What a component exports, pre-instantiated: a `wasi:http` handler or an event handler.
enum Entry {
    Http(ProxyPre<GuestState>),
    Event(event::EventExportsPre<GuestState>),
}

impl Entry {
    fn engine(&self) -> &Engine {
        match self {
            Entry::Http(pre) => pre.engine(),
            Entry::Event(pre) => pre.engine(),
        }
    }
}

/// A loaded, pre-instantiated function version. Cheap to clone.
#[derive(Clone)]
pub struct Function {
    inner: Arc<FunctionInner>,
}

struct FunctionInner {
    /// Requests that reached an instance (fresh or reused): what a policy that answers first
    /// saves, and what `/metrics` shows of it.
    runs: metrics::Counter,
    /// Instances of this version running a request now (each holds a pool slot): a version
    /// that no longer gets traffic drains to 0.
    running: metrics::Gauge,
    name: String,
    sha256: String,
    entry: Entry,
    limits: Limits,
    caps: FunctionCaps,
    source: Source,
    load_time: Duration,
    /// The wasmgate capabilities it imports (what a deploy compares with the live version).
    imports: Vec<&'static str>,
    idle: Mutex<Vec<invoke::Warm>>,
    /// Fresh instances made ahead of demand.
    warm_pool: Option<warm_pool::WarmPool>,
}

impl Drop for FunctionInner {
    /// The version is gone (its last request finished, its idle instances with it): hand the
    /// heap it used back to the OS, which the allocator would otherwise keep for reuse.
    fn drop(&mut self) {
        self.idle
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        crate::heap::release_soon();
    }
}

impl Function {
    pub fn imports(&self) -> &[&'static str] {
        &self.inner.imports
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }
    pub fn sha256(&self) -> &str {
        &self.inner.sha256
    }
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }
    pub fn source(&self) -> Source {
        self.inner.source
    }
    pub fn load_time(&self) -> Duration {
        self.inner.load_time
    }
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.inner.name)
            .field("sha256", &self.inner.sha256)
            .finish_non_exhaustive()
    }
}
