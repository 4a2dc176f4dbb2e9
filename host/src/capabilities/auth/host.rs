//! The guest-facing `auth` calls: each bounded by [`BACKEND_TIMEOUT`], errors mapped to the
//! WIT variants (never a backend's message).

use super::{AuthCapError, RequestAuth, wit};
use crate::auth::{Auth, TokenError, Tokens};
use crate::capabilities::BACKEND_TIMEOUT;

type Answer<T> = wasmtime::Result<Result<T, AuthCapError>>;

fn to_wit(t: Tokens) -> wit::Tokens {
    wit::Tokens {
        access_token: t.access_token,
        access_expires_at: t.access_expires_at,
        refresh_token: t.refresh_token,
        refresh_expires_at: t.refresh_expires_at,
        session: t.session,
    }
}

impl RequestAuth {
    async fn call<T>(
        &self,
        f: impl AsyncFnOnce(&Auth) -> Result<T, TokenError>,
    ) -> Result<T, AuthCapError> {
        let Some(auth) = &self.0.auth else {
            return Err(AuthCapError::Unavailable);
        };
        match tokio::time::timeout(BACKEND_TIMEOUT, f(auth)).await {
            Err(_) => Err(AuthCapError::Timeout),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(match e {
                TokenError::Unavailable => AuthCapError::Unavailable,
                TokenError::Timeout => AuthCapError::Timeout,
                TokenError::Invalid(why) => AuthCapError::Invalid(why),
                TokenError::Refused => AuthCapError::Refused,
            }),
        }
    }
}

impl wit::Host for RequestAuth {
    async fn issue(&mut self, subject: String, roles: Vec<String>) -> Answer<wit::Tokens> {
        Ok(self
            .call(async |a| a.issue(&subject, &roles).await)
            .await
            .map(to_wit))
    }

    async fn refresh(&mut self, refresh_token: String) -> Answer<wit::Tokens> {
        Ok(self
            .call(async |a| a.refresh(&refresh_token).await)
            .await
            .map(to_wit))
    }

    async fn revoke(&mut self, session: String) -> Answer<()> {
        Ok(self.call(async |a| a.revoke_session(&session).await).await)
    }
}
