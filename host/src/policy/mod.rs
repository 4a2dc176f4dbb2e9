//! Per-function policies, each a tower layer in the request path, applied before the guest is
//! instantiated. A layer that rejects answers at once with its own problem and never reaches
//! the guest.
//!
//! Layout:
//! - `auth`: who may call the route (bearer token verified in the host, roles, scopes, owner).
//! - `login_throttle`: failed logins per account and per client address, with backoff.
//! - `rate_limit`: GCRA requests per second and burst, per function or per client key; local
//!   (governor) or shared through Redis.
//! - `bulkhead`: concurrent executions under a limit that adapts to latency, plus a queue bounded
//!   by the wait it predicts.
//! - `idempotency`: `Idempotency-Key` on POST/PATCH routes that opt in (store in `crate::idempotency`).
//! - `response_cache`: GET/HEAD responses of routes that opt in (storage in `crate::response_cache`).
//! - `compression`: responses encoded for clients that accept it (`crate::compression`).
//! - `shadow`: a copy of a share of requests runs on a candidate version after the live
//!   response has gone, its side effects held back, and the answers are compared.
//! - `gate`: what rate limit and bulkhead share: admit on the request's head, or answer the
//!   policy's problem at once.
//! - `layer`: the tower layer/service every policy is wrapped in, written once.
//! - `invoke`: the innermost service: one request through the function.
//!
//! Order, outermost first: auth, rate limit, login throttle, compression, idempotency, response
//! cache, bulkhead, shadow, invoke. A refused token costs microseconds and touches nothing else; a
//! cache hit or a replay costs no bulkhead slot; a rate-limited request never touches the stores;
//! a cache hit is served already encoded, and what the cache keeps is the guest's own bytes.
//!
//! The deadline is not a layer here: the guest runs in its own task (it may stream its body
//! after answering), so the deadline lives with the store, in `runtime::invoke`, where it can
//! both trap a spinning guest (epoch) and bound host calls (tokio timeout).
//!
//! State that must outlive a reload (the bulkhead's semaphore, the rate limiter's budget) is kept
//! in [`PolicyState`], shared by all stacks built for the same function and the same settings.

pub mod auth;
pub mod bulkhead;
pub mod compression;
mod gate;
pub mod idempotency;
mod invoke;
mod layer;
pub mod login_throttle;
pub mod rate_limit;
pub mod response_cache;
pub mod shadow;

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::Response;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::body_limit::LimitedBody;
use crate::config::{BulkheadConfig, RateLimitConfig};
use crate::runtime::Function;

pub use auth::AuthPolicy;
pub use bulkhead::Bulkhead;
pub use compression::CompressionPolicy;
pub use idempotency::IdempotencyPolicy;
use layer::PolicyLayer;
pub use login_throttle::LoginThrottle;
pub use rate_limit::RateLimiter;
pub use response_cache::CachePolicy;
pub use shadow::ShadowPolicy;

/// The policies a route adds to its function's.
#[derive(Default, Clone)]
pub struct RoutePolicies {
    pub auth: Option<Arc<AuthPolicy>>,
    pub login_throttle: Option<Arc<LoginThrottle>>,
    pub idempotency: Option<Arc<IdempotencyPolicy>>,
    pub cache: Option<Arc<CachePolicy>>,
    pub compression: Option<Arc<CompressionPolicy>>,
    /// Set on the live versions' stacks while the function has a shadow.
    pub shadow: Option<Arc<ShadowPolicy>>,
}

/// A request on its way to a function: body already capped, request id in the extensions.
pub type GuestRequest = http::Request<LimitedBody>;

/// One function version's whole stack.
pub type FunctionService = BoxCloneSyncService<GuestRequest, Response, Infallible>;

/// The stateful parts of a function's policies.
pub struct PolicyState {
    pub rate_limit: Option<(RateLimitConfig, Arc<RateLimiter>)>,
    pub bulkhead: (BulkheadConfig, Arc<Bulkhead>),
    /// Failed-login counters of the function's login routes, in this process.
    pub login_failures: Arc<crate::auth::throttle::MemoryThrottle>,
}

impl PolicyState {
    /// Keeps `previous`'s state where the settings did not change, so a reload neither resets a
    /// budget nor lets a second set of requests past a full bulkhead.
    pub fn new(
        function: &str,
        rate_limit: Option<&RateLimitConfig>,
        bulkhead: &BulkheadConfig,
        redis: Option<&redis::aio::ConnectionManager>,
        previous: Option<&PolicyState>,
    ) -> Self {
        let rate_limit = rate_limit.map(|cfg| {
            match previous
                .and_then(|p| p.rate_limit.as_ref())
                .filter(|(c, _)| c == cfg)
            {
                Some((_, limiter)) => (cfg.clone(), limiter.clone()),
                None => (
                    cfg.clone(),
                    Arc::new(RateLimiter::new(function, cfg, redis.cloned())),
                ),
            }
        });
        let bulkhead = match previous.map(|p| &p.bulkhead).filter(|(c, _)| c == bulkhead) {
            Some((_, b)) => (bulkhead.clone(), b.clone()),
            None => (
                bulkhead.clone(),
                Arc::new(Bulkhead::new(function, bulkhead)),
            ),
        };
        Self {
            rate_limit,
            bulkhead,
            login_failures: previous.map_or_else(Default::default, |p| p.login_failures.clone()),
        }
    }

    /// Builds the stack for one version of the function on one route. Order, outermost first:
    /// auth, rate limit, login throttle, compression, idempotency, response cache, bulkhead,
    /// shadow, invoke.
    pub fn stack(&self, function: Function, route: &RoutePolicies) -> FunctionService {
        let service = ServiceBuilder::new()
            .option_layer(route.auth.clone().map(PolicyLayer::new))
            .option_layer(
                self.rate_limit
                    .as_ref()
                    .map(|(_, l)| PolicyLayer::new(l.clone())),
            )
            .option_layer(route.login_throttle.clone().map(PolicyLayer::new))
            .option_layer(route.compression.clone().map(PolicyLayer::new))
            .option_layer(route.idempotency.clone().map(PolicyLayer::new))
            .option_layer(route.cache.clone().map(PolicyLayer::new))
            .layer(PolicyLayer::new(self.bulkhead.1.clone()))
            .option_layer(route.shadow.clone().map(PolicyLayer::new))
            .service(invoke::Invoke::new(function));
        BoxCloneSyncService::new(service)
    }
}
