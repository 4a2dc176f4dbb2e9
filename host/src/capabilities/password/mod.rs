//! `wasmgate:platform/password`: Argon2id hashing in the host.
//!
//! Why in the host: the same hash compiled to wasm took about 120 ms of CPU per login, several
//! times native code, and decided the rate of every mix with sign-ups or logins. Why a bounded
//! pool: a hash is ~20 MiB and tens of milliseconds of one core, so it runs on blocking threads
//! (never a request worker) and at most `threads` at once in the process and
//! `max_concurrency` per function; a call that waits longer than [`BACKEND_TIMEOUT`] for its turn
//! gets `busy`, which the SDK answers 503 with `Retry-After`. The parameters are the host's, so
//! an operator raises them for every function at once and `needs-rehash` moves stored hashes
//! along as their users log in.

#[cfg(test)]
mod conformance;
mod host;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::Deserialize;
use tokio::sync::Semaphore;
use wasmtime::component::{HasData, Linker};

use super::BACKEND_TIMEOUT;
use super::bindings::wasmgate::platform::password as wit;
use crate::runtime::GuestState;

pub use wit::Error as PasswordError;

/// Longest password hashed: Argon2 takes any length, and a megabyte "password" is only load.
pub const MAX_PASSWORD_LEN: usize = 4096;
/// Longest stored hash accepted (a PHC string of Argon2 is about 100 bytes).
pub const MAX_HASH_LEN: usize = 512;
/// What a stored hash may ask for, unless the configured parameters are higher: a hash comes
/// from the function's database, and the host must not spend a gigabyte because a row says so.
const MAX_MEMORY_KIB: u32 = 64 * 1024;
const MAX_ITERATIONS: u32 = 10;
const MAX_PARALLELISM: u32 = 4;

/// `[password]`: Argon2id's cost and how much of the machine hashing may take. The defaults are
/// OWASP's first Argon2id recommendation (19 MiB, 2 passes, 1 lane).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordConfig {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Hashes running at once in the process; 0: one per core.
    pub threads: u32,
    /// Hashes running or waiting to run per function at once; 0: `threads`.
    pub max_concurrency: u32,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
            threads: 0,
            max_concurrency: 0,
        }
    }
}

impl PasswordConfig {
    /// Argon2's parameters, or why they are not valid.
    pub fn params(&self) -> Result<Params, String> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None).map_err(|e| {
            format!(
                "[password]: {e} (memory_kib {}, iterations {}, parallelism {})",
                self.memory_kib, self.iterations, self.parallelism
            )
        })
    }
}

/// The process's hasher: parameters, the thread budget and each function's share of it.
#[derive(Clone)]
pub struct Passwords(Arc<Inner>);

struct Inner {
    params: Params,
    /// Verified against when there is no account: made with the current parameters on first
    /// use, so such a verify costs what a real one costs.
    dummy: OnceLock<String>,
    threads: Arc<Semaphore>,
    per_function: usize,
    functions: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Argon2's working memory, kept between hashes (at most one per thread): a fresh one is
    /// ~20 MiB to zero and fault in each time, about a tenth of a hash's cost.
    memory: Mutex<Vec<Vec<Block>>>,
}

impl Passwords {
    pub fn new(config: &PasswordConfig) -> Result<Self, String> {
        let params = config.params()?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let threads = match config.threads {
            0 => cores,
            n => n as usize,
        };
        let per_function = match config.max_concurrency {
            0 => threads,
            n => n as usize,
        };
        Ok(Self(Arc::new(Inner {
            params,
            dummy: OnceLock::new(),
            threads: Arc::new(Semaphore::new(threads)),
            per_function,
            functions: Mutex::default(),
            memory: Mutex::default(),
        })))
    }

    /// One function's share: all its versions draw on the same `max_concurrency`.
    pub fn configure(&self, function: &str) -> FunctionPasswords {
        let limit = self
            .0
            .functions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(function.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.0.per_function)))
            .clone();
        FunctionPasswords {
            passwords: self.clone(),
            limit,
        }
    }

    /// Argon2 of `password` with these settings, in working memory kept from earlier hashes.
    fn compute<'s>(
        &self,
        algorithm: Algorithm,
        version: Version,
        params: &Params,
        password: &[u8],
        salt: Salt<'s>,
    ) -> Result<PasswordHash<'s>, PasswordError> {
        let invalid = |e: &dyn std::fmt::Display| PasswordError::Invalid(e.to_string());
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(|e| invalid(&e))?;
        let argon2 = Argon2::new(algorithm, version, params.clone());
        let mut memory = self
            .0
            .memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        if memory.len() < params.block_count() {
            memory.resize(params.block_count(), Block::default());
        }
        let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let output = Output::init_with(len, |out| {
            argon2
                .hash_password_into_with_memory(
                    password,
                    salt_bytes,
                    out,
                    &mut memory[..params.block_count()],
                )
                .map_err(Into::into)
        });
        // Only buffers of the current parameters are kept: an old hash's larger one goes.
        if memory.len() == self.0.params.block_count() {
            self.0
                .memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(memory);
        }
        Ok(PasswordHash {
            algorithm: algorithm.ident(),
            version: Some(version.into()),
            params: ParamsString::try_from(params).map_err(|e| invalid(&e))?,
            salt: Some(salt),
            hash: Some(output.map_err(|e| invalid(&e))?),
        })
    }

    fn hash_now(&self, password: &[u8]) -> Result<String, PasswordError> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| {
            tracing::error!(error = %e, "no randomness for a password salt");
            PasswordError::Busy
        })?;
        let salt =
            SaltString::encode_b64(&salt).map_err(|e| PasswordError::Invalid(e.to_string()))?;
        self.compute(
            Algorithm::Argon2id,
            Version::V0x13,
            &self.0.params,
            password,
            salt.as_salt(),
        )
        .map(|h| h.to_string())
    }

    fn verify_now(&self, password: &[u8], hash: Option<&str>) -> Result<bool, PasswordError> {
        let stored = match hash {
            Some(h) => h,
            None => match self.0.dummy.get() {
                Some(d) => d,
                None => {
                    let made = self.hash_now(b"wasmgate: no such account")?;
                    self.0.dummy.get_or_init(|| made)
                }
            },
        };
        let Parsed {
            hash: parsed,
            algorithm,
            params,
        } = self.parse(stored)?;
        let version = parsed
            .version
            .map_or(Ok(Version::V0x13), Version::try_from)
            .map_err(|e| PasswordError::Malformed(e.to_string()))?;
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Err(PasswordError::Malformed("no salt or no hash".into()));
        };
        let computed = self.compute(algorithm, version, &params, password, salt)?;
        // `Output`'s equality takes the same time wherever the two differ.
        Ok(computed.hash == Some(expected) && hash.is_some())
    }

    /// A stored hash, checked before any work: Argon2, parameters within the host's limits.
    fn parse<'h>(&self, hash: &'h str) -> Result<Parsed<'h>, PasswordError> {
        if hash.len() > MAX_HASH_LEN {
            return Err(PasswordError::Malformed(format!(
                "a hash of {} bytes, over {MAX_HASH_LEN}",
                hash.len()
            )));
        }
        let parsed = PasswordHash::new(hash)
            .map_err(|e| PasswordError::Malformed(format!("not a PHC string: {e}")))?;
        let algorithm = Algorithm::new(parsed.algorithm.as_str()).map_err(|_| {
            PasswordError::Malformed(format!("`{}` is not Argon2", parsed.algorithm))
        })?;
        let p = Params::try_from(&parsed)
            .map_err(|e| PasswordError::Malformed(format!("its parameters: {e}")))?;
        let mine = &self.0.params;
        if p.m_cost() > MAX_MEMORY_KIB.max(mine.m_cost())
            || p.t_cost() > MAX_ITERATIONS.max(mine.t_cost())
            || p.p_cost() > MAX_PARALLELISM.max(mine.p_cost())
        {
            return Err(PasswordError::Malformed(format!(
                "it asks for m={},t={},p={}, over the host's limits",
                p.m_cost(),
                p.t_cost(),
                p.p_cost()
            )));
        }
        Ok(Parsed {
            hash: parsed,
            algorithm,
            params: p,
        })
    }

    /// Whether `hash` was made otherwise than the current parameters would make it. Cheap: no
    /// hashing, so it does not take a thread.
    pub fn needs_rehash(&self, hash: &str) -> Result<bool, PasswordError> {
        let Parsed {
            hash: parsed,
            algorithm,
            params: p,
        } = self.parse(hash)?;
        let mine = &self.0.params;
        Ok(algorithm != Algorithm::Argon2id
            || parsed.version != Some(Version::V0x13.into())
            || p.m_cost() != mine.m_cost()
            || p.t_cost() != mine.t_cost()
            || p.p_cost() != mine.p_cost()
            || parsed.hash.map(|h| h.len())
                != Some(mine.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)))
    }
}

/// A stored hash taken apart, its settings checked.
struct Parsed<'h> {
    hash: PasswordHash<'h>,
    algorithm: Algorithm,
    params: Params,
}

/// A function's share of the process's hashing.
#[derive(Clone)]
pub struct FunctionPasswords {
    passwords: Passwords,
    limit: Arc<Semaphore>,
}

impl FunctionPasswords {
    pub fn instance(&self) -> RequestPasswords {
        RequestPasswords(self.clone())
    }

    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        check_length(&password)?;
        self.run(move |p| p.hash_now(password.as_bytes())).await
    }

    pub async fn verify(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, PasswordError> {
        check_length(&password)?;
        if let Some(h) = &hash {
            // Refused before it waits for a thread.
            self.passwords.parse(h)?;
        }
        self.run(move |p| p.verify_now(password.as_bytes(), hash.as_deref()))
            .await
    }

    pub fn needs_rehash(&self, hash: &str) -> Result<bool, PasswordError> {
        self.passwords.needs_rehash(hash)
    }

    /// Runs `work` on a blocking thread once this function and the process each have a turn
    /// free, waiting at most [`BACKEND_TIMEOUT`]. The turns go with the work, so a caller that
    /// gives up (its deadline passed) does not free a thread that is still hashing.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Passwords) -> Result<T, PasswordError> + Send + 'static,
    ) -> Result<T, PasswordError> {
        let turns = tokio::time::timeout(BACKEND_TIMEOUT, async {
            let mine = self.limit.clone().acquire_owned().await;
            let process = self.passwords.0.threads.clone().acquire_owned().await;
            (mine, process)
        })
        .await;
        let Ok((Ok(mine), Ok(process))) = turns else {
            return Err(PasswordError::Busy);
        };
        let passwords = self.passwords.clone();
        tokio::task::spawn_blocking(move || {
            let _turns = (mine, process);
            work(&passwords)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "a password hash panicked");
            Err(PasswordError::Busy)
        })
    }
}

fn check_length(password: &str) -> Result<(), PasswordError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(PasswordError::Invalid(format!(
            "a password of {} bytes, over {MAX_PASSWORD_LEN}",
            password.len()
        )));
    }
    Ok(())
}

/// A request's handle.
pub struct RequestPasswords(FunctionPasswords);

struct PasswordCap;

impl HasData for PasswordCap {
    type Data<'a> = &'a mut RequestPasswords;
}

pub fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<GuestState, PasswordCap>(linker, |s| &mut s.caps.password)
}
