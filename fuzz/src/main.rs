//! One libFuzzer binary for every target in `wasmgate::fuzzing::TARGETS`; which one runs is
//! named by `WASMGATE_FUZZ_TARGET` (libFuzzer owns the command line).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static TARGET: LazyLock<fn(&[u8])> = LazyLock::new(|| {
    let name = std::env::var("WASMGATE_FUZZ_TARGET").unwrap_or_default();
    wasmgate::fuzzing::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| {
            let known: Vec<_> = wasmgate::fuzzing::TARGETS.iter().map(|(n, _)| *n).collect();
            panic!("WASMGATE_FUZZ_TARGET={name:?}: not one of {known:?}")
        })
});

fuzz_target!(|data: &[u8]| (*TARGET)(data));
