//! The `[auth]` section (tokens the host issues, external providers it trusts) and the per-route
//! `auth` and `login_throttle` settings.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::human_duration;

/// Access tokens are short-lived: a stolen one is useful for minutes, and a role taken away
/// reaches the next refresh soon. OAuth 2.0 deployments commonly use 5 to 60 minutes.
pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
/// A session lasts this long without a refresh: a month keeps a user signed in on a device they
/// use, and each refresh rotates the token.
pub const DEFAULT_REFRESH_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Clock difference tolerated between replicas and providers when checking `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The role that passes every owner rule.
pub const DEFAULT_ADMIN_ROLE: &str = "admin";
/// `iss` and `aud` of the tokens wasmgate issues.
pub const DEFAULT_ISSUER: &str = "wasmgate";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    #[serde(deserialize_with = "human_duration")]
    pub access_ttl: Duration,
    #[serde(deserialize_with = "human_duration")]
    pub refresh_ttl: Duration,
    #[serde(deserialize_with = "human_duration")]
    pub leeway: Duration,
    pub admin_role: String,
    /// External OAuth 2.0 / OIDC providers whose tokens verify too.
    pub providers: Vec<ProviderConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: DEFAULT_ISSUER.into(),
            audience: DEFAULT_ISSUER.into(),
            access_ttl: DEFAULT_ACCESS_TTL,
            refresh_ttl: DEFAULT_REFRESH_TTL,
            leeway: DEFAULT_LEEWAY,
            admin_role: DEFAULT_ADMIN_ROLE.into(),
            providers: Vec::new(),
        }
    }
}

/// How often a provider's JWKS URL is fetched again: providers publish a new key well before
/// they sign with it, and an unknown key id triggers a fetch anyway.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(10 * 60);

/// An external issuer: its tokens verify against its JWKS (a file relative to the manifest, or
/// a URL).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Must equal the tokens' `iss`.
    pub issuer: String,
    /// A JWKS document (`{"keys": [...]}`), read at start and on reload.
    pub jwks_file: Option<PathBuf>,
    /// Or where the provider publishes it (`https://.../.well-known/jwks.json`).
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh", deserialize_with = "human_duration")]
    pub jwks_refresh: Duration,
    /// Must appear in the tokens' `aud`: a token minted for another API is refused.
    pub audience: String,
    /// The claim holding the principal's roles (an array of strings).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
}

fn default_jwks_refresh() -> Duration {
    DEFAULT_JWKS_REFRESH
}

fn default_roles_claim() -> String {
    "roles".into()
}

/// A route's access rule. Any `auth` table makes a token required unless `required = false`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthConfig {
    /// Without a token: 401 when true; passed on with no principal when false. A token that is
    /// sent is verified either way.
    #[serde(default = "yes")]
    pub required: bool,
    /// The principal needs at least one of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The principal needs every one of these OAuth scopes (the `scope` claim).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// A route parameter that must equal the token's subject, unless the principal has the
    /// admin role (e.g. `"id"` on `/users/{id}`).
    pub owner: Option<String>,
}

fn yes() -> bool {
    true
}

/// A failed login costs nothing up to this many failures in a row (typos happen).
pub const DEFAULT_FREE_ATTEMPTS: u32 = 5;
/// The first wait after the free attempts; each further failure doubles it.
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_secs(1);
/// The longest wait: guessing stays slow, and a user whose account is under attack is kept out
/// at most this long at a time (never locked out for good).
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(15 * 60);
/// Failures older than this are forgotten.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);
/// A client address gets this many times the account's free attempts: one address (a NAT, an
/// office) may hold many users, and the address count is what stops spraying many accounts.
pub const DEFAULT_ADDRESS_FACTOR: u32 = 4;

/// Failed-login throttling on a login route (answered by the host before the guest runs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginThrottleConfig {
    /// The JSON body field that names the account (compared case-insensitively).
    pub account_field: String,
    pub free_attempts: u32,
    #[serde(deserialize_with = "human_duration")]
    pub base_delay: Duration,
    #[serde(deserialize_with = "human_duration")]
    pub max_delay: Duration,
    #[serde(deserialize_with = "human_duration")]
    pub window: Duration,
    pub address_factor: u32,
    /// The status the guest answers a failed login with.
    pub failure_status: u16,
}

impl Default for LoginThrottleConfig {
    fn default() -> Self {
        Self {
            account_field: "email".into(),
            free_attempts: DEFAULT_FREE_ATTEMPTS,
            base_delay: DEFAULT_BASE_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            window: DEFAULT_WINDOW,
            address_factor: DEFAULT_ADDRESS_FACTOR,
            failure_status: 401,
        }
    }
}

/// Problems in the `[auth]` section.
pub fn validate(cfg: &AuthConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if cfg.access_ttl.is_zero() || cfg.refresh_ttl.is_zero() {
        problems.push("[auth] access_ttl and refresh_ttl must be above 0".to_string());
    }
    if cfg.refresh_ttl < cfg.access_ttl {
        problems.push("[auth] refresh_ttl is shorter than access_ttl; a refresh token must outlive the access token it renews".to_string());
    }
    if cfg.issuer.is_empty() || cfg.audience.is_empty() || cfg.admin_role.is_empty() {
        problems.push("[auth] issuer, audience and admin_role may not be empty".to_string());
    }
    for (i, p) in cfg.providers.iter().enumerate() {
        if p.issuer == cfg.issuer {
            problems.push(format!(
                "[auth] providers[{i}] has wasmgate's own issuer `{}`; give it the provider's `iss`",
                p.issuer
            ));
        }
        if p.audience.is_empty() {
            problems.push(format!("[auth] providers[{i}] needs an audience"));
        }
        match (&p.jwks_file, &p.jwks_url) {
            (Some(_), None) => {}
            (None, Some(url)) if url.starts_with("https://") || url.starts_with("http://") => {}
            (None, Some(url)) => problems.push(format!(
                "[auth] providers[{i}] jwks_url `{url}` is not an http(s) URL"
            )),
            _ => problems.push(format!(
                "[auth] providers[{i}] needs exactly one of jwks_file and jwks_url"
            )),
        }
        if p.jwks_refresh.is_zero() {
            problems.push(format!(
                "[auth] providers[{i}] jwks_refresh is 0; set e.g. \"10m\""
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c: AuthConfig = toml::from_str("").expect("empty section");
        assert_eq!(c.access_ttl, Duration::from_secs(900));
        assert_eq!(c.refresh_ttl, Duration::from_secs(30 * 86400));
        assert!(validate(&c).is_empty());
        let bad: AuthConfig =
            toml::from_str("access_ttl = \"1h\"\nrefresh_ttl = \"1m\"").expect("parses");
        assert_eq!(validate(&bad).len(), 1);
        let providers: AuthConfig = toml::from_str(
            r#"
            [[providers]]
            issuer = "https://a.example"
            audience = "api"
            [[providers]]
            issuer = "https://b.example"
            audience = "api"
            jwks_url = "ftp://b.example/jwks"
            "#,
        )
        .expect("parses");
        let problems = validate(&providers).join("\n");
        assert!(
            problems.contains("providers[0] needs exactly one of jwks_file and jwks_url"),
            "{problems}"
        );
        assert!(
            problems.contains("providers[1] jwks_url `ftp://b.example/jwks` is not an http(s) URL"),
            "{problems}"
        );
        assert!(crate::config::parse_duration("15m").is_ok());
    }
}
