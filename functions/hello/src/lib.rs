//! The smallest useful function: greets the caller, by name when the route gives one.

use wasmgate_sdk::{Body, Request, Result, StatusCode, json, param};

async fn handle(req: Request<Body>) -> Result {
    let name = param(&req, "name").unwrap_or("world");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "message": format!("hello, {name}") }),
    ))
}

wasmgate_sdk::export_http_function!(handle);
