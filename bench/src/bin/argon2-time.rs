//! The native Argon2id ceiling for the logins row: prints the seconds one hash takes on one
//! core, with the host's default `[password]` parameters (19 MiB, 2 passes, 1 lane), as the
//! median of `N` hashes (first argument, default 20) after two to warm up.

use std::time::Instant;

use argon2::{Algorithm, Argon2, Params, Version};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let params = Params::new(19 * 1024, 2, 1, None).expect("params");
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut out = [0u8; 32];
    let mut times: Vec<f64> = (0..n + 2)
        .map(|i| {
            let started = Instant::now();
            argon2
                .hash_password_into(
                    b"bench-password",
                    format!("salt-{i:08}").as_bytes(),
                    &mut out,
                )
                .expect("hash");
            started.elapsed().as_secs_f64()
        })
        .skip(2)
        .collect();
    times.sort_by(f64::total_cmp);
    println!("{:.6}", times[times.len() / 2]);
}
