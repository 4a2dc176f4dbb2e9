//! The native ceiling for the hello scenario: a bare axum server answering what the hello
//! function answers. Usage: `axum-hello 127.0.0.1:PORT`.

use axum::routing::get;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let app = axum::Router::new().route(
        "/hello",
        get(|| async { axum::Json(serde_json::json!({ "message": "hello, world" })) }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("axum-hello listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
