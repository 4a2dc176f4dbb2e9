//! Bindings to the platform's capability interfaces, generated from the repository's `wit/`.
//!
//! Only the interfaces a function calls end up imported by its component, so a function that
//! never touches `db` does not need the `db` grant.

wit_bindgen::generate!({
    path: "../wit",
    world: "wasmgate:platform/capabilities",
    generate_all,
});

pub use wasmgate::platform::{auth, cache, db, events, lock, password, response_cache};
