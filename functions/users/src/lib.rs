//! User management: the workload wasmgate exists for.
//!
//! One function serves `/v1/...` (frozen contract, see tests/tests/users_v1.rs) and `/v2/...`
//! (the evolving one: display name, updated_at, versions with ETag/If-Match). Storage goes
//! through the `db` capability (SQL portable across SQLite and PostgreSQL); tokens are issued
//! and verified by the host (`auth`), which also decides who may call each route.
//!
//! Layout: `store` (the users table and the events each write publishes), `auth` (passwords,
//! access checks, sessions), `v1` (the v1 routes and their exact shapes), `v2`, `activity` (the
//! read model the `activity` event function projects from those events).

mod activity;
mod auth;
mod store;
mod v1;
mod v2;

use wasmgate_sdk::{Body, Problem, Request, Result, StatusCode};

async fn handle(req: Request<Body>) -> Result {
    let route = wasmgate_sdk::route(&req).to_string();
    match route.as_str() {
        r if r.starts_with("/v1/") => v1::handle(req, r).await,
        r if r.starts_with("/v2/") => v2::handle(req, r).await,
        _ => Err(Problem::not_found()),
    }
}

/// A 400 naming what is wrong with the input.
pub(crate) fn invalid(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "validation", "Invalid request").with_detail(detail)
}

wasmgate_sdk::export_http_function!(handle);
