//! wasmgate: a WebAssembly serverless functions platform.
//!
//! Teams deploy HTTP handlers as wasm components; the host routes requests to them, runs each
//! request in a fresh, limited instance, and owns everything that must be fast or trustworthy.
//!
//! Layout:
//! - [`admin`]: the admin API (versions, traffic, rollback, history) on its own listener.
//! - [`auth`]: tokens issued and verified in the host, revocations, roles, login throttling.
//! - [`config`]: the manifest (`wasmgate.toml`), strict parsing and validation.
//! - [`loader`]: manifest -> the platform (engine, backends: once per process) and a deployment
//!   (functions, routes), or every problem at once.
//! - [`deploy`]: the deployer that outlives deployments (reload), version sets and the pick.
//! - [`events`]: between a publisher's outbox and a subscriber: brokers (embedded queue, Redis
//!   Streams) and the relay.
//! - [`heap`]: freed heap handed back to the OS once a version drains.
//! - [`registry`]: modules, versions, deployments and their history in the platform database.
//! - [`rollout`]: progressive delivery: step plans, gates judged from per-version figures, the
//!   driver that holds a rollout's lease.
//! - [`router`]: the route table (path + method -> version set).
//! - [`capabilities`]: db, cache, lock and response-cache: WIT bindings, backends, grants.
//! - [`runtime`]: wasmtime engine, compiled cache, per-request instances and their limits.
//! - [`notices`]: Redis pub/sub between processes (revocations, deployment changes).
//! - [`policy`]: per-function and per-route tower layers: rate limit, idempotency, response
//!   cache, compression, bulkhead, invoke.
//! - [`cors`]: CORS per route: preflights answered by the host, allow headers per origin.
//! - [`compression`]: response encodings negotiated from `Accept-Encoding`, and the encoders.
//! - [`response_cache`]: the response cache's tiers (moka, Redis), tags, purges, single flight.
//! - [`idempotency`]: the durable `Idempotency-Key` store in the platform's database.
//! - [`snapshot`]: a response held in memory, as both of those keep and replay it.
//! - [`server`]: the request path (route, version pick, policies, body limit, metrics).
//! - [`connections`]: the listeners' connections: cap, request-head deadline, HTTP/1.1 and
//!   h2c, graceful drain.
//! - [`body_limit`]: request bodies capped while streaming.
//! - [`problem`]: RFC 9457 error responses.
//! - [`request_id`]: the id that ties a response to its log lines.
//!
//! The binary (`main.rs`) parses flags, sets up logging, binds the socket and calls
//! [`server::run`]; nothing in the library reads the environment or argv.

pub mod admin;
pub mod auth;
pub mod body_limit;
pub mod capabilities;
pub mod compression;
pub mod config;
pub mod connections;
pub mod cors;
pub mod deploy;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod heap;
pub mod idempotency;
pub mod loader;
pub mod notices;
pub mod policy;
pub mod problem;
pub mod registry;
pub mod request_id;
pub mod response_cache;
pub mod rollout;
pub mod router;
pub mod runtime;
pub mod server;
pub mod snapshot;
pub mod tls;
