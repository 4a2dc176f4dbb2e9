//! External OAuth 2.0 / OIDC providers: their JWKS, from a file or a URL, and which algorithm
//! each key may verify.
//!
//! A URL is fetched at start, every `jwks_refresh` after, and again when a token names a key id
//! the set does not hold (a provider that rotated), at most once per [`REFETCH_AT_MOST`] so
//! made-up key ids cannot flood the provider. A provider that cannot be reached at start does not
//! stop wasmgate: its tokens are refused (unknown key) until its JWKS loads, and the failure is
//! logged. A file is read at start (and on reload).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::AuthError;
use super::config::ProviderConfig;
use crate::response_cache::unix_ms;

/// A token with an unknown key id fetches the JWKS again at most this often.
pub const REFETCH_AT_MOST: Duration = Duration::from_secs(2);
/// How long a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS accepted.
const MAX_JWKS: usize = 1024 * 1024;

pub struct ProviderKey {
    pub decoding: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<ProviderKey>>,
    /// A JWKS of one key without a `kid` verifies tokens without one.
    only: Option<Arc<ProviderKey>>,
}

enum Source {
    File(PathBuf),
    Url(reqwest::Client, String),
}

pub struct Provider {
    pub cfg: ProviderConfig,
    source: Source,
    keys: ArcSwap<KeySet>,
    /// When the JWKS was last fetched (ms), for [`REFETCH_AT_MOST`].
    fetched: tokio::sync::Mutex<u64>,
}

/// The algorithms a JWK may verify: the one it names, else the usual ones for its key type.
/// Symmetric (`oct`) keys are refused: a shared secret does not belong in a public JWKS.
fn algorithms(jwk: &Jwk) -> Result<Vec<Algorithm>, String> {
    let named = jwk
        .common
        .key_algorithm
        .map(|a| Algorithm::try_from(a).map_err(|e| format!("unsupported alg: {e}")))
        .transpose()?;
    let usual = match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (`oct`) keys are not accepted".into());
        }
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("unsupported elliptic curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
        _ => return Err("unsupported key type".into()),
    };
    match named {
        Some(a) if usual.contains(&a) => Ok(vec![a]),
        Some(a) => Err(format!("alg {a:?} does not fit the key type")),
        None => Ok(usual),
    }
}

fn parse(text: &str) -> Result<KeySet, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = KeySet::default();
    for (i, jwk) in set.keys.iter().enumerate() {
        let algorithms = algorithms(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
        let decoding = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
        let key = Arc::new(ProviderKey {
            decoding,
            algorithms,
        });
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), key);
            }
            None if set.keys.len() == 1 => keys.only = Some(key),
            None => {
                return Err(format!(
                    "keys[{i}] has no `kid`; a JWKS of several keys needs one on each"
                ));
            }
        }
    }
    Ok(keys)
}

impl Provider {
    pub async fn open(cfg: &ProviderConfig, base: &Path) -> Result<Arc<Self>, AuthError> {
        let fail = |reason: String| AuthError::Provider {
            issuer: cfg.issuer.clone(),
            reason,
        };
        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(file), None) => Source::File(base.join(file)),
            (None, Some(url)) => Source::Url(
                reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .build()
                    .map_err(|e| fail(format!("cannot build an HTTP client: {e}")))?,
                url.clone(),
            ),
            _ => return Err(fail("give exactly one of jwks_file and jwks_url".into())),
        };
        let provider = Arc::new(Self {
            cfg: cfg.clone(),
            source,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetched: tokio::sync::Mutex::new(unix_ms()),
        });
        match (provider.load().await, &provider.source) {
            (Ok(()), _) => {}
            (Err(e), Source::File(_)) => return Err(fail(e)),
            (Err(e), Source::Url(..)) => tracing::error!(
                issuer = %cfg.issuer, error = %e,
                "cannot load the provider's JWKS; its tokens are refused until it loads"
            ),
        }
        if let Source::Url(..) = provider.source {
            tokio::spawn(refresh(Arc::downgrade(&provider), cfg.jwks_refresh));
        }
        Ok(provider)
    }

    /// Reads or fetches the JWKS and swaps it in.
    async fn load(&self) -> Result<(), String> {
        let text = match &self.source {
            Source::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?,
            Source::Url(client, url) => {
                let resp = client
                    .get(url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| format!("cannot fetch `{url}`: {e}"))?;
                let body = resp
                    .bytes()
                    .await
                    .map_err(|e| format!("cannot read `{url}`: {e}"))?;
                if body.len() > MAX_JWKS {
                    return Err(format!("`{url}` answered more than {MAX_JWKS} bytes"));
                }
                String::from_utf8(body.to_vec()).map_err(|_| format!("`{url}` is not text"))?
            }
        };
        self.keys.store(Arc::new(parse(&text)?));
        Ok(())
    }

    /// The key a token names, fetching the JWKS again (at most once per [`REFETCH_AT_MOST`])
    /// when it is not there.
    pub async fn key(&self, kid: Option<&str>) -> Option<Arc<ProviderKey>> {
        let find = |set: &KeySet| match kid {
            Some(k) => set.by_kid.get(k).cloned(),
            None => set.only.clone(),
        };
        if let Some(k) = find(&self.keys.load()) {
            return Some(k);
        }
        if let Source::Url(..) = self.source {
            let mut fetched = self.fetched.lock().await;
            let now = unix_ms();
            if now >= *fetched + u64::try_from(REFETCH_AT_MOST.as_millis()).unwrap_or(0) {
                *fetched = now;
                if let Err(e) = self.load().await {
                    tracing::warn!(issuer = %self.cfg.issuer, error = %e, "cannot refetch the provider's JWKS");
                }
            }
        }
        find(&self.keys.load())
    }
}

/// Fetches a provider's JWKS every `every` until the provider is dropped (a reload).
async fn refresh(provider: Weak<Provider>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(p) = provider.upgrade() else { return };
        *p.fetched.lock().await = unix_ms();
        if let Err(e) = p.load().await {
            tracing::warn!(issuer = %p.cfg.issuer, error = %e, "cannot refresh the provider's JWKS; keeping the keys it had");
        }
    }
}
