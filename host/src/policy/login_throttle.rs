//! Failed-login throttling on login routes, answered by the host before the guest (and its
//! password hash) runs.
//!
//! Two counters per attempt: the account (the body's `account_field`, lowercased and hashed)
//! and the client address. A failure (the guest answers `failure_status`) counts on both; a
//! blocked counter answers 429 with `Retry-After`; a success resets the account. Unknown
//! accounts are treated exactly like known ones, so throttling reveals nothing about which
//! exist. Counters are keyed by function, so a function's v1 and v2 logins share them, and live
//! in Redis when it is configured (one count across replicas), in process otherwise; if Redis
//! cannot be reached, the process counts on its own until it can (logged once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::GuestRequest;
use super::layer::{Next, Policy, forward};
use crate::auth::LoginThrottleConfig;
use crate::auth::throttle::{MemoryThrottle, Rule, ThrottleBackend};
use crate::body_limit::LimitedBody;
use crate::problem::Problem;
use crate::request_id::RequestId;

pub struct LoginThrottle {
    function: Arc<str>,
    shared: Option<Arc<dyn ThrottleBackend>>,
    local: Arc<MemoryThrottle>,
    account: Rule,
    address: Rule,
    field: String,
    failure: StatusCode,
    fallback_logged: AtomicBool,
}

impl LoginThrottle {
    /// `local` is the function's in-process counters (used without Redis, or while it is
    /// down); `shared` the Redis ones.
    pub fn new(
        function: &str,
        cfg: &LoginThrottleConfig,
        local: Arc<MemoryThrottle>,
        shared: Option<Arc<dyn ThrottleBackend>>,
    ) -> Self {
        let account = Rule {
            free: cfg.free_attempts,
            base: cfg.base_delay,
            max: cfg.max_delay,
            window: cfg.window,
        };
        Self {
            function: function.into(),
            shared,
            local,
            address: Rule {
                free: cfg.free_attempts.saturating_mul(cfg.address_factor),
                ..account
            },
            account,
            field: cfg.account_field.clone(),
            failure: StatusCode::from_u16(cfg.failure_status).unwrap_or(StatusCode::UNAUTHORIZED),
            fallback_logged: AtomicBool::new(false),
        }
    }

    /// Notes that Redis failed: this attempt counts in this process instead.
    fn fell_back(&self, e: &crate::auth::throttle::Unreachable) {
        metrics::counter!("wasmgate_login_throttle_fallback_total", "function" => self.function.to_string()).increment(1);
        if !self.fallback_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(function = %self.function, error = %e, "login throttle store unreachable; counting in this process");
        }
    }

    async fn blocked_for(&self, key: &str) -> Duration {
        if let Some(s) = &self.shared {
            match s.blocked_for(key).await {
                Ok(d) => {
                    self.fallback_logged.store(false, Ordering::Relaxed);
                    return d;
                }
                Err(e) => self.fell_back(&e),
            }
        }
        self.local.blocked_for(key).await.unwrap_or_default()
    }

    async fn fail(&self, key: &str, rule: &Rule) {
        if let Some(s) = &self.shared {
            match s.fail(key, rule).await {
                Ok(_) => return,
                Err(e) => self.fell_back(&e),
            }
        }
        let _ = self.local.fail(key, rule).await;
    }

    async fn reset(&self, key: &str) {
        if let Some(s) = &self.shared
            && let Err(e) = s.reset(key).await
        {
            self.fell_back(&e);
        }
        let _ = self.local.reset(key).await;
    }

    /// The counter keys of this attempt: the account (hashed: no emails in Redis) and the
    /// client address.
    fn keys(&self, req: &http::request::Parts, body: &[u8]) -> (String, String) {
        let account = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v.get(&self.field)?
                    .as_str()
                    .map(|s| s.trim().to_lowercase())
            })
            .unwrap_or_default();
        let digest = hex::encode(&Sha256::digest(account.as_bytes())[..16]);
        let address = req
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_default();
        (
            format!("{}:a:{digest}", self.function),
            format!("{}:i:{address}", self.function),
        )
    }
}

impl Policy for LoginThrottle {
    async fn call<S: Next>(self: Arc<Self>, req: GuestRequest, mut next: S) -> Response {
        if req.method() != Method::POST {
            return forward(&mut next, req).await;
        }
        let id = RequestId::of(req.extensions());
        let (head, body) = req.into_parts();
        // Capped at the function's max_body and timeout.
        let body = match body.read_whole().await {
            Ok(body) => body,
            Err(problem) => return problem.into_response_with(&id),
        };
        let (account, address) = self.keys(&head, &body);
        let (a, b) = tokio::join!(self.blocked_for(&account), self.blocked_for(&address));
        let wait = a.max(b);
        if !wait.is_zero() {
            return Problem::LoginThrottled { retry_after: wait }.into_response_with(&id);
        }
        let req = GuestRequest::from_parts(head, LimitedBody::new(Body::from(body), u64::MAX).0);
        let resp = forward(&mut next, req).await;
        if resp.status() == self.failure {
            tokio::join!(
                self.fail(&account, &self.account),
                self.fail(&address, &self.address)
            );
        } else if resp.status().is_success() {
            self.reset(&account).await;
        }
        resp
    }
}
