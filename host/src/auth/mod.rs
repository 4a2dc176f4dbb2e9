//! Identity, verified once in the host: tokens it issues and verifies, the revocation list,
//! and the roles operators grant.
//!
//! Layout:
//! - `config`: the `[auth]` section and the per-route `auth` and `login_throttle` settings.
//! - `store`: the auth tables in the platform database (keys, sessions, refresh tokens, roles).
//! - `keys`: Ed25519 signing keys with ids, rotation, the JWKS.
//! - `tokens`: issuing access tokens (JWT, EdDSA) and opaque, single-use refresh tokens.
//! - `providers`: external OAuth 2.0 / OIDC issuers and their JWKS (a file or a URL).
//! - `verify`: checking a bearer token (own or an external provider's) into a [`Principal`],
//!   with a cache of verified tokens so the hot path costs a hash and a lookup.
//! - `revocation`: revoked sessions, broadcast over Redis and polled from the database.
//! - `throttle`: failed-login counters with exponential backoff, in-process or on Redis.
//!
//! Guests never see a signing key: the `auth` capability asks the host to issue, refresh or
//! revoke, and the `auth` route policy hands the guest a verified principal.

pub mod config;
#[cfg(test)]
mod conformance;
pub mod keys;
pub mod providers;
pub mod revocation;
pub mod store;
pub mod throttle;
mod tokens;
pub(crate) mod verify;

use std::sync::Arc;

pub use config::{AuthConfig, LoginThrottleConfig, RouteAuthConfig};
pub use tokens::Tokens;
pub use verify::{Principal, Rejection};

use crate::capabilities::db::{DbBackend, DbError};

/// Where the host serves its public keys.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the auth tables cannot be prepared: {0}")]
    Migrate(#[from] crate::capabilities::db::migrations::MigrationError),
    #[error("the signing keys cannot be read: {0:?}")]
    Keys(DbError),
    #[error("provider `{issuer}`: {reason}")]
    Provider { issuer: String, reason: String },
}

/// Why the host would not issue or refresh tokens.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    #[error("the auth store is unavailable")]
    Unavailable,
    #[error("the auth store did not answer in time")]
    Timeout,
    #[error("{0}")]
    Invalid(String),
    /// The refresh token is unknown, expired, already used, or its session was revoked.
    #[error("refresh token refused")]
    Refused,
}

impl From<DbError> for TokenError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Timeout => TokenError::Timeout,
            other => {
                tracing::warn!(error = ?other, "auth store call failed");
                TokenError::Unavailable
            }
        }
    }
}

/// The process-wide auth service. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AuthConfig,
    store: store::Store,
    keys: keys::KeyRing,
    revoked: Arc<revocation::Revocations>,
    verifier: verify::Verifier,
    redis: Option<redis::aio::ConnectionManager>,
}

impl Auth {
    /// Prepares the tables, loads (or creates) the signing keys and the recent revocations,
    /// reads the providers' JWKS files (paths relative to `base`), and starts the background
    /// tasks that keep keys and revocations current.
    pub async fn open(
        cfg: &AuthConfig,
        base: &std::path::Path,
        db: Arc<dyn DbBackend>,
        redis: Option<(redis::Client, redis::aio::ConnectionManager)>,
    ) -> Result<Self, AuthError> {
        let store = store::Store::open(db).await?;
        // A retired key keeps verifying as long as a token signed with it can live: a replica
        // may sign with it until its next key reload, and that token then lives access_ttl.
        let key_grace = cfg.access_ttl + cfg.leeway + 2 * keys::REFRESH_EVERY;
        let grace = cfg.access_ttl + cfg.leeway;
        let keys = keys::KeyRing::open(store.clone(), key_grace)
            .await
            .map_err(AuthError::Keys)?;
        let revoked = Arc::new(revocation::Revocations::new(grace));
        let since = crate::response_cache::unix_ms()
            .saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        revoked.load(&store, since).await.map_err(AuthError::Keys)?;
        revocation::start(
            store.clone(),
            &revoked,
            redis.as_ref().map(|(client, _)| client.clone()),
        );
        let verifier = verify::Verifier::new(cfg, base).await?;
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            store,
            keys,
            revoked,
            verifier,
            redis: redis.map(|(_, conn)| conn),
        });
        tokio::spawn(maintain(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    pub fn config(&self) -> &AuthConfig {
        &self.inner.cfg
    }

    pub fn store(&self) -> &store::Store {
        &self.inner.store
    }

    /// The public keys of the tokens this host issues (RFC 7517).
    pub fn jwks(&self) -> serde_json::Value {
        self.inner.keys.current().jwks()
    }

    /// Verifies a bearer token: signature, algorithm, issuer, audience, expiry, revocation.
    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, Rejection> {
        let i = &self.inner;
        i.verifier.verify(token, &i.keys, &i.revoked).await
    }

    /// A new session for `subject`: an access token and a refresh token. The subject's roles
    /// are `roles` plus those granted with `wasmgate roles grant`.
    pub async fn issue(&self, subject: &str, roles: &[String]) -> Result<Tokens, TokenError> {
        tokens::issue(self, subject, roles).await
    }

    /// Rotates a refresh token: the presented one is used up and a new pair comes back. A
    /// token presented twice revokes its whole session.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens, TokenError> {
        tokens::refresh(self, refresh_token).await
    }

    /// Ends a session: its refresh tokens stop working at once, and its access tokens on every
    /// replica within a second (usually milliseconds, over Redis).
    pub async fn revoke_session(&self, session: &str) -> Result<(), TokenError> {
        let i = &self.inner;
        let now = now_ms();
        i.store.revoke(session, now).await?;
        i.revoked.add(session);
        if let Some(conn) = &i.redis {
            revocation::publish(conn, session).await;
        }
        Ok(())
    }
}

/// Reloads keys and sweeps expired rows until the service is dropped.
async fn maintain(inner: std::sync::Weak<Inner>) {
    let mut round: u64 = 0;
    loop {
        tokio::time::sleep(keys::REFRESH_EVERY).await;
        let Some(i) = inner.upgrade() else { return };
        if let Err(e) = i.keys.reload().await {
            tracing::warn!(error = ?e, "cannot reload signing keys; using the ones loaded");
        }
        round += 1;
        // About every ten minutes: expired sessions, refresh tokens and long-retired keys.
        if round.is_multiple_of(60) {
            let now = now_ms();
            let grace = i64::try_from(
                (i.cfg.access_ttl + i.cfg.leeway + 2 * keys::REFRESH_EVERY).as_millis() * 2,
            )
            .unwrap_or(i64::MAX);
            let _ = i.store.sweep(now).await;
            let _ = i
                .store
                .drop_keys_retired_before(now.saturating_sub(grace))
                .await;
        }
    }
}

pub fn now_ms() -> i64 {
    i64::try_from(crate::response_cache::unix_ms()).unwrap_or(i64::MAX)
}
