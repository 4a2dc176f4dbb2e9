//! Signing keys: Ed25519 (JWT `EdDSA`), with ids, kept in the platform database so every
//! replica signs and verifies with the same set, and rotated without a restart.
//!
//! The newest unretired key signs. `wasmgate keys rotate` adds a key and retires the others;
//! a retired key still verifies until every token it signed has expired (access TTL plus
//! leeway, plus two reload periods for replicas that signed with it before they reloaded), and
//! is served in the JWKS until then. Replicas pick up keys every
//! [`REFRESH_EVERY`], and at once when a token names a key id they do not know (at most once per
//! [`UNKNOWN_KID_REFRESH`]), so a token signed by a replica that rotated first never fails
//! on another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{DecodingKey, EncodingKey};
use tokio::sync::Mutex;

use super::store::{Store, StoredKey};
use crate::capabilities::db::DbError;
use crate::response_cache::unix_ms;

/// How often a replica reloads the key set.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// A token with an unknown key id reloads the set at most this often.
pub const UNKNOWN_KID_REFRESH: Duration = Duration::from_secs(1);

/// One key, ready to use.
pub struct Key {
    pub kid: String,
    pub decoding: DecodingKey,
    pub public_x: String,
}

/// The keys as of the last reload.
pub struct KeySet {
    /// The key new tokens are signed with.
    pub signing: Option<(String, EncodingKey)>,
    pub verifying: HashMap<String, Arc<Key>>,
}

impl KeySet {
    /// The public keys as a JWKS document (RFC 7517).
    pub fn jwks(&self) -> serde_json::Value {
        let mut keys: Vec<_> = self.verifying.values().collect();
        keys.sort_by(|a, b| a.kid.cmp(&b.kid));
        serde_json::json!({
            "keys": keys.iter().map(|k| serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "kid": k.kid, "x": k.public_x,
            })).collect::<Vec<_>>()
        })
    }
}

pub struct KeyRing {
    store: Store,
    /// How long after retirement a key still verifies.
    grace: Duration,
    current: ArcSwap<KeySet>,
    /// When the set was last reloaded because of an unknown key id (ms).
    last_forced: Mutex<u64>,
}

/// A new Ed25519 key with a random id.
pub fn generate() -> StoredKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("the OS random source is available");
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let pkcs8 = key
        .to_pkcs8_der()
        .expect("an Ed25519 key encodes as PKCS#8");
    let mut kid = [0u8; 9];
    getrandom::fill(&mut kid).expect("the OS random source is available");
    StoredKey {
        kid: URL_SAFE_NO_PAD.encode(kid),
        private_pkcs8: STANDARD.encode(pkcs8.as_bytes()),
        public_x: URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
        created_at: i64::try_from(unix_ms()).unwrap_or(i64::MAX),
        retired_at: None,
    }
}

fn build(stored: &[StoredKey], grace: Duration) -> KeySet {
    let now = i64::try_from(unix_ms()).unwrap_or(i64::MAX);
    let grace = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let mut verifying = HashMap::new();
    let mut signing = None;
    for k in stored {
        if k.retired_at.is_some_and(|r| r.saturating_add(grace) < now) {
            continue;
        }
        let Ok(decoding) = DecodingKey::from_ed_components(&k.public_x) else {
            tracing::error!(kid = %k.kid, "unreadable public key in wasmgate_signing_keys; skipped");
            continue;
        };
        if k.retired_at.is_none()
            && let Ok(der) = STANDARD.decode(&k.private_pkcs8)
        {
            // Rows come oldest first: the last unretired key wins.
            signing = Some((k.kid.clone(), EncodingKey::from_ed_der(&der)));
        }
        verifying.insert(
            k.kid.clone(),
            Arc::new(Key {
                kid: k.kid.clone(),
                decoding,
                public_x: k.public_x.clone(),
            }),
        );
    }
    KeySet { signing, verifying }
}

impl KeyRing {
    /// Loads the keys, creating the first one when there is none.
    pub async fn open(store: Store, grace: Duration) -> Result<Self, DbError> {
        let mut stored = store.keys().await?;
        if !stored.iter().any(|k| k.retired_at.is_none()) {
            let key = generate();
            store.add_key(&key).await?;
            tracing::info!(kid = %key.kid, "created a signing key");
            stored = store.keys().await?;
        }
        Ok(Self {
            current: ArcSwap::from_pointee(build(&stored, grace)),
            store,
            grace,
            last_forced: Mutex::new(0),
        })
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    pub async fn reload(&self) -> Result<(), DbError> {
        let stored = self.store.keys().await?;
        self.current.store(Arc::new(build(&stored, self.grace)));
        Ok(())
    }

    /// The key `kid`, reloading once if it is unknown (a replica may have rotated first).
    pub async fn find(&self, kid: &str) -> Option<Arc<Key>> {
        if let Some(k) = self.current.load().verifying.get(kid) {
            return Some(k.clone());
        }
        {
            let mut last = self.last_forced.lock().await;
            let now = unix_ms();
            let every = u64::try_from(UNKNOWN_KID_REFRESH.as_millis()).unwrap_or(u64::MAX);
            if now >= *last + every {
                *last = now;
                if let Err(e) = self.reload().await {
                    tracing::warn!(error = ?e, "cannot reload signing keys");
                }
            }
        }
        self.current.load().verifying.get(kid).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_keys_verify_for_the_grace_then_drop() {
        let now = i64::try_from(unix_ms()).expect("now");
        let mut old = generate();
        old.created_at = now - 10_000;
        old.retired_at = Some(now - 1_000);
        let mut ancient = generate();
        ancient.retired_at = Some(now - 100_000);
        let new = generate();
        let set = build(
            &[ancient.clone(), old.clone(), new.clone()],
            Duration::from_secs(60),
        );
        assert_eq!(
            set.signing.as_ref().map(|s| s.0.as_str()),
            Some(new.kid.as_str())
        );
        assert!(
            set.verifying.contains_key(&old.kid),
            "retired within the grace"
        );
        assert!(
            !set.verifying.contains_key(&ancient.kid),
            "retired past the grace"
        );
        assert_eq!(set.jwks()["keys"].as_array().map(Vec::len), Some(2));
    }
}
