//! Advances the engine's epoch on a plain thread, so deadlines hold even when every tokio worker
//! is busy running guest code.
//!
//! The thread holds only a weak reference: it ticks for as long as anything (a runtime, or a
//! function still serving requests after a reload) keeps the engine alive, then exits.

use std::time::Duration;

use wasmtime::Engine;

pub fn start(engine: &Engine, tick: Duration) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasmgate-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(tick);
            }
        })
        .expect("spawning the epoch thread only fails when the OS is out of threads");
}
