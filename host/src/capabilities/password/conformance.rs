//! The `password` capability's suite. One backend (native Argon2id), tested through the same
//! calls a guest makes.

use super::*;
use argon2::password_hash::PasswordHasher;

/// Cheap parameters: the suite tests behaviour, not cost.
fn cheap() -> PasswordConfig {
    PasswordConfig {
        memory_kib: 1024,
        iterations: 1,
        ..PasswordConfig::default()
    }
}

fn passwords(config: &PasswordConfig) -> FunctionPasswords {
    Passwords::new(config)
        .expect("valid parameters")
        .configure("users")
}

#[tokio::test]
async fn a_hash_verifies_its_password_and_no_other() {
    let p = passwords(&cheap());
    let hash = p.hash("correct horse".into()).await.expect("hash");
    assert!(hash.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{hash}");
    assert_eq!(
        p.verify("correct horse".into(), Some(hash.clone())).await,
        Ok(true)
    );
    assert_eq!(
        p.verify("correct horse!".into(), Some(hash.clone())).await,
        Ok(false)
    );
    assert_eq!(p.verify(String::new(), Some(hash.clone())).await, Ok(false));
    // Salted: the same password hashes differently each time, and both verify.
    let again = p.hash("correct horse".into()).await.expect("hash");
    assert_ne!(hash, again);
    assert_eq!(
        p.verify("correct horse".into(), Some(again)).await,
        Ok(true)
    );
}

#[tokio::test]
async fn the_default_parameters_are_owasps() {
    let p = passwords(&PasswordConfig::default());
    let hash = p.hash("pw".into()).await.expect("hash");
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    assert_eq!(p.needs_rehash(&hash), Ok(false));
}

#[tokio::test]
async fn without_an_account_verify_runs_a_hash_and_answers_false() {
    let p = passwords(&cheap());
    assert!(p.passwords.0.dummy.get().is_none());
    assert_eq!(p.verify("anything".into(), None).await, Ok(false));
    let dummy = p
        .passwords
        .0
        .dummy
        .get()
        .expect("made on first use")
        .clone();
    assert!(
        dummy.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"),
        "{dummy}"
    );
    // Not even the password the dummy was made from passes.
    assert_eq!(
        p.verify("wasmgate: no such account".into(), None).await,
        Ok(false)
    );
}

#[tokio::test]
async fn a_malformed_or_costly_hash_is_an_error_not_a_panic() {
    let p = passwords(&cheap());
    let real = p.hash("pw".into()).await.expect("hash");
    let bad = [
        "",
        "plain text",
        "$argon2id$v=19$m=1024,t=1,p=1$",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
        "$pbkdf2-sha256$29000$N2bMWYvRmjNGaO09R4jR.g$lt0xbQCCyDnHoNQGD5oVDi7fJLz9JbNzeE4IzgF0Esk",
        // Parameters a database row should not be able to make the host spend.
        "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$m8rcN9LEI3UXJ7P4MZKvRnFHznpmwP+nuCS4EIB5RB4",
        "$argon2id$v=19$m=1024,t=1000,p=1$c2FsdHNhbHRzYWx0c2FsdA$m8rcN9LEI3UXJ7P4MZKvRnFHznpmwP+nuCS4EIB5RB4",
    ];
    for hash in bad
        .iter()
        .map(|h| h.to_string())
        .chain([real.replace("argon2id", "argon2x"), "$".repeat(600)])
    {
        assert!(
            matches!(
                p.verify("pw".into(), Some(hash.clone())).await,
                Err(PasswordError::Malformed(_))
            ),
            "verify accepted {hash}"
        );
        assert!(
            matches!(p.needs_rehash(&hash), Err(PasswordError::Malformed(_))),
            "needs_rehash accepted {hash}"
        );
    }
}

#[tokio::test]
async fn a_password_over_the_limit_is_invalid() {
    let p = passwords(&cheap());
    let long = "x".repeat(MAX_PASSWORD_LEN + 1);
    assert!(matches!(
        p.hash(long.clone()).await,
        Err(PasswordError::Invalid(_))
    ));
    assert!(matches!(
        p.verify(long, None).await,
        Err(PasswordError::Invalid(_))
    ));
    assert!(p.hash("x".repeat(MAX_PASSWORD_LEN)).await.is_ok());
}

#[tokio::test]
async fn a_hash_made_with_other_parameters_needs_a_rehash_and_still_verifies() {
    let old = passwords(&cheap());
    let hash = old.hash("pw".into()).await.expect("hash");
    assert_eq!(old.needs_rehash(&hash), Ok(false));
    let raised = passwords(&PasswordConfig {
        memory_kib: 2048,
        ..cheap()
    });
    assert_eq!(raised.needs_rehash(&hash), Ok(true));
    assert_eq!(raised.verify("pw".into(), Some(hash)).await, Ok(true));
    // Another Argon2 variant with the same parameters: verifies, and moves to Argon2id.
    let argon2i = Argon2::new(
        Algorithm::Argon2i,
        Version::V0x13,
        cheap().params().expect("params"),
    )
    .hash_password(b"pw", &SaltString::encode_b64(&[7; 16]).expect("salt"))
    .expect("hash")
    .to_string();
    assert_eq!(old.needs_rehash(&argon2i), Ok(true));
    assert_eq!(old.verify("pw".into(), Some(argon2i)).await, Ok(true));
}

#[test]
fn invalid_parameters_are_refused_with_the_reason() {
    let err = Passwords::new(&PasswordConfig {
        memory_kib: 1,
        ..PasswordConfig::default()
    })
    .err()
    .expect("refused");
    assert!(
        err.contains("[password]") && err.contains("memory_kib 1"),
        "{err}"
    );
}

/// A function whose every turn is taken waits at most `BACKEND_TIMEOUT`, then hears `busy`;
/// its versions share the turns, and another function's are its own.
#[tokio::test(start_paused = true)]
async fn a_function_at_its_limit_waits_then_hears_busy() {
    let all = Passwords::new(&PasswordConfig {
        max_concurrency: 1,
        threads: 2,
        ..cheap()
    })
    .expect("valid");
    let v1 = all.configure("users");
    let _taken = v1.limit.clone().acquire_owned().await.expect("turn");
    let v2 = all.configure("users");
    let started = tokio::time::Instant::now();
    assert_eq!(v2.hash("pw".into()).await, Err(PasswordError::Busy));
    assert!(started.elapsed() >= BACKEND_TIMEOUT);
    tokio::time::resume();
    assert!(all.configure("admin").hash("pw".into()).await.is_ok());
}
