//! Bearer tokens into principals: wasmgate's own (EdDSA, keys from the key ring) and those of
//! external providers (keys from their JWKS, see `providers`). Only asymmetric algorithms are accepted, and only
//! the one each key is for: `none`, HMAC, and a token whose header names another algorithm
//! than its key's are refused before any signature check.
//!
//! A verified token is cached (keyed by the token itself, so a lookup is a hash and one
//! comparison, and no other token can ever match the entry) until it expires: the request path
//! pays that, not a signature check. Expiry and revocation are checked on every request anyway.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};

use super::AuthError;
use super::config::AuthConfig;
use super::keys::KeyRing;
use super::providers::Provider;
use super::revocation::Revocations;
use crate::response_cache::unix_ms;

/// Verified tokens kept at most: beyond this the least used are verified again.
const MAX_CACHED_TOKENS: u64 = 100_000;
/// Tokens longer than this are refused unread.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub subject: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// The token's `jti` (empty when a provider's token has none).
    pub token_id: String,
    /// The session (refresh-token family) of a token wasmgate issued.
    pub session: Option<String>,
    pub issuer: String,
    /// When the token expires, in milliseconds since the epoch.
    pub expires_at: u64,
    /// The headers that hand it to a guest, built once per token (see `policy::auth`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Request headers that carry the principal to the guest. The server removes client-sent
/// `wasmgate-*` headers, so a guest can trust these.
pub const SUBJECT: HeaderName = HeaderName::from_static("wasmgate-principal-subject");
pub const ROLES: HeaderName = HeaderName::from_static("wasmgate-principal-roles");
pub const SCOPES: HeaderName = HeaderName::from_static("wasmgate-principal-scopes");
pub const TOKEN_ID: HeaderName = HeaderName::from_static("wasmgate-principal-token-id");
pub const SESSION: HeaderName = HeaderName::from_static("wasmgate-principal-session");
pub const ISSUER: HeaderName = HeaderName::from_static("wasmgate-principal-issuer");

impl Principal {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Why a token was refused; the description goes to `WWW-Authenticate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    Algorithm,
    UnknownIssuer,
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Claims,
    Revoked,
}

impl Rejection {
    pub fn description(self) -> &'static str {
        match self {
            Rejection::Malformed => "the token is not a well-formed JWT",
            Rejection::Algorithm => "the token's algorithm is not accepted",
            Rejection::UnknownIssuer => "the token's issuer is not trusted",
            Rejection::UnknownKey => "the token names an unknown key",
            Rejection::Signature => "the token's signature is invalid",
            Rejection::Expired => "the token has expired",
            Rejection::NotYetValid => "the token is not valid yet",
            Rejection::Claims => "the token's issuer, audience or subject is not accepted",
            Rejection::Revoked => "the token has been revoked",
        }
    }
}

pub struct Verifier {
    issuer: String,
    audience: String,
    leeway: Duration,
    providers: Vec<Arc<Provider>>,
    verified: moka::sync::Cache<String, Arc<Principal>>,
}

struct UntilExpiry(Duration);

impl moka::Expiry<String, Arc<Principal>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Principal>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let left = value.expires_at.saturating_sub(unix_ms());
        Some(Duration::from_millis(left) + self.0)
    }
}

/// The `iss` of a token, read without trusting it: it only picks which keys to check against.
pub(crate) fn peek_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

fn rejection(e: &jsonwebtoken::errors::Error) -> Rejection {
    match e.kind() {
        ErrorKind::ExpiredSignature => Rejection::Expired,
        ErrorKind::ImmatureSignature => Rejection::NotYetValid,
        ErrorKind::InvalidSignature => Rejection::Signature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => Rejection::Algorithm,
        ErrorKind::InvalidIssuer
        | ErrorKind::InvalidAudience
        | ErrorKind::InvalidSubject
        | ErrorKind::MissingRequiredClaim(_) => Rejection::Claims,
        _ => Rejection::Malformed,
    }
}

fn strings(v: Option<&serde_json::Value>) -> Vec<String> {
    match v {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(serde_json::Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

impl Verifier {
    pub async fn new(cfg: &AuthConfig, base: &Path) -> Result<Self, AuthError> {
        let mut providers = Vec::new();
        for p in &cfg.providers {
            providers.push(Provider::open(p, base).await?);
        }
        Ok(Self {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway,
            providers,
            verified: moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .expire_after(UntilExpiry(cfg.leeway))
                .build(),
        })
    }

    fn validation(&self, algorithms: Vec<Algorithm>, issuer: &str, audience: &str) -> Validation {
        let mut v = Validation::new(algorithms[0]);
        v.algorithms = algorithms;
        v.set_issuer(&[issuer]);
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        v.validate_nbf = true;
        v.leeway = self.leeway.as_secs();
        v
    }

    pub async fn verify(
        &self,
        token: &str,
        keys: &KeyRing,
        revoked: &Revocations,
    ) -> Result<Arc<Principal>, Rejection> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(Rejection::Malformed);
        }
        let principal = match self.verified.get(token) {
            Some(p) => p,
            None => {
                let p = Arc::new(self.check(token, keys).await?);
                self.verified.insert(token.to_string(), p.clone());
                p
            }
        };
        // `exp` to the millisecond, on a hit and a miss alike (the library's check is in whole
        // seconds, which would let a token live up to a second past its `exp`).
        let leeway = u64::try_from(self.leeway.as_millis()).unwrap_or(u64::MAX);
        if principal.expires_at.saturating_add(leeway) <= unix_ms() {
            return Err(Rejection::Expired);
        }
        if principal
            .session
            .as_deref()
            .is_some_and(|s| revoked.is_revoked(s))
        {
            return Err(Rejection::Revoked);
        }
        Ok(principal)
    }

    /// The full check, for a token not seen yet.
    async fn check(&self, token: &str, keys: &KeyRing) -> Result<Principal, Rejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName => Rejection::Algorithm,
            _ => Rejection::Malformed,
        })?;
        let issuer = peek_issuer(token).ok_or(Rejection::Malformed)?;
        let claims: serde_json::Value;
        let mut roles_claim = "roles";
        if issuer == self.issuer {
            if header.alg != Algorithm::EdDSA {
                return Err(Rejection::Algorithm);
            }
            let kid = header.kid.as_deref().ok_or(Rejection::UnknownKey)?;
            let key = keys.find(kid).await.ok_or(Rejection::UnknownKey)?;
            let v = self.validation(vec![Algorithm::EdDSA], &self.issuer, &self.audience);
            claims = jsonwebtoken::decode::<serde_json::Value>(token, &key.decoding, &v)
                .map_err(|e| rejection(&e))?
                .claims;
        } else {
            let p = self
                .providers
                .iter()
                .find(|p| p.cfg.issuer == issuer)
                .ok_or(Rejection::UnknownIssuer)?;
            let key = p
                .key(header.kid.as_deref())
                .await
                .ok_or(Rejection::UnknownKey)?;
            if !key.algorithms.contains(&header.alg) {
                return Err(Rejection::Algorithm);
            }
            let v = self.validation(key.algorithms.clone(), &p.cfg.issuer, &p.cfg.audience);
            claims = jsonwebtoken::decode::<serde_json::Value>(token, &key.decoding, &v)
                .map_err(|e| rejection(&e))?
                .claims;
            roles_claim = &p.cfg.roles_claim;
        }
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let subject = text("sub")
            .filter(|s| !s.is_empty())
            .ok_or(Rejection::Claims)?;
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .ok_or(Rejection::Claims)?;
        let session = if issuer == self.issuer {
            Some(text("sid").ok_or(Rejection::Claims)?)
        } else {
            None
        };
        let mut p = Principal {
            subject,
            roles: strings(claims.get(roles_claim)),
            scopes: strings(claims.get("scope").or_else(|| claims.get("scp"))),
            token_id: text("jti").unwrap_or_default(),
            session,
            issuer,
            expires_at: exp.saturating_mul(1000),
            headers: Vec::new(),
        };
        p.headers = guest_headers(&p)?;
        Ok(p)
    }
}

/// The principal as request headers; a claim that cannot travel as a header value (a control
/// character) refuses the token.
fn guest_headers(p: &Principal) -> Result<Vec<(HeaderName, HeaderValue)>, Rejection> {
    let value = |s: &str| HeaderValue::from_bytes(s.as_bytes()).map_err(|_| Rejection::Claims);
    let mut headers = vec![
        (SUBJECT, value(&p.subject)?),
        (ROLES, value(&p.roles.join(","))?),
        (SCOPES, value(&p.scopes.join(" "))?),
        (TOKEN_ID, value(&p.token_id)?),
        (ISSUER, value(&p.issuer)?),
    ];
    if let Some(s) = &p.session {
        headers.push((SESSION, value(s)?));
    }
    Ok(headers)
}
