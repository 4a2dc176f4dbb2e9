//! Compiled components on disk, so a restart (or a second replica) skips cranelift.
//!
//! An entry's name is the component's sha256 plus a hash of everything that makes compiled code
//! compatible (wasmtime version, target, engine settings), so a changed module or a changed engine
//! can never load stale code: it is simply a different file. Entries are written to a temporary
//! file and renamed into place, so a crash or a concurrent writer never leaves half a file under a
//! real name.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
}

/// Where a component came from, for logs and start-up figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Compiled,
}

impl CompileCache {
    pub fn new(dir: PathBuf, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir,
            engine_key: format!("{:016x}", h.finish()),
        })
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The compiled component for `wasm` (whose digest is `sha256`): from disk when present and
    /// loadable, otherwise compiled now and stored for next time.
    pub fn load(
        &self,
        engine: &Engine,
        sha256: &str,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, Source)> {
        let path = self.entry(sha256);
        if path.exists() {
            match deserialize(engine, &path) {
                Ok(c) => return Ok((c, Source::Cache)),
                // A truncated or foreign file: recompile and overwrite it.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable compiled-cache entry")
                }
            }
        }
        let component = Component::from_binary(engine, wasm)?;
        if let Err(e) = self.store(&path, &component) {
            // The cache only saves time; serving goes on without it.
            tracing::warn!(path = %path.display(), error = %e, "could not write compiled-cache entry");
        }
        Ok((component, Source::Compiled))
    }

    fn store(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&bytes)?;
        tmp.persist(path)?;
        Ok(())
    }
}

#[expect(
    unsafe_code,
    reason = "wasmtime trusts a serialized artifact to be its own output; the cache only holds files this process family wrote, named by content and engine hash, and wasmtime still checks the header and engine compatibility"
)]
fn deserialize(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: see the `expect` reason above: the file was produced by `Component::serialize` for
    // an engine with the same compatibility hash (it is in the file name).
    unsafe { Component::deserialize_file(engine, path) }
}
