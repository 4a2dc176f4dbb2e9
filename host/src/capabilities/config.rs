//! The `[backends]` section: where capabilities keep their data.

use serde::Deserialize;

/// Where the embedded database lives, relative to the manifest, when no URL is given.
pub const DEFAULT_SQLITE_PATH: &str = ".wasmgate/data.db";

/// Backend URLs. Without `redis_url`, cache and lock are in-process.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendsConfig {
    /// `sqlite://path` (the embedded default) or `postgres://...`.
    #[serde(default)]
    pub database_url: String,
    /// `redis://host:port`: cache and lock on Redis, shared by every wasmgate process.
    pub redis_url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL `{url}`: {reason}; use sqlite://path or postgres://user@host/db")]
    DatabaseUrl { url: String, reason: String },
    #[error("cannot open the database `{url}`: {reason}")]
    Database { url: String, reason: String },
    #[error("invalid Redis URL `{url}`: {reason}; use redis://host:port")]
    RedisUrl { url: String, reason: String },
}

/// Hides the password in a URL before it is logged or shown.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                if userinfo.contains(':') {
                    format!("{scheme}://{user}:***@{host}")
                } else {
                    format!("{scheme}://{user}@{host}")
                }
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
