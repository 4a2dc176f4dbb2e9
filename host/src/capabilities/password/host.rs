//! The guest-facing `password` calls. Each waits at most `BACKEND_TIMEOUT` for a thread; the
//! hash itself is bounded by the guest's own deadline.

use super::{PasswordError, RequestPasswords, wit};

type Answer<T> = wasmtime::Result<Result<T, PasswordError>>;

impl wit::Host for RequestPasswords {
    async fn hash(&mut self, password: String) -> Answer<String> {
        Ok(self.0.hash(password).await)
    }

    async fn verify(&mut self, password: String, hash: Option<String>) -> Answer<bool> {
        Ok(self.0.verify(password, hash).await)
    }

    async fn needs_rehash(&mut self, hash: String) -> Answer<bool> {
        Ok(self.0.needs_rehash(&hash))
    }
}
