//! Failed logins throttled by the host, per account and per client address, with exponential
//! backoff: guessing is slowed to a crawl while other accounts log in as usual, unknown emails
//! are treated like known ones, a success resets the account, processes sharing Redis count
//! together, and timing still does not tell known from unknown emails.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use reqwest::Client;
use serde_json::json;
use wasmgate_tests::{PASSWORD, Server, fresh_postgres, redis_url, sign_up, users_manifest_with};

fn embedded(throttle: &str) -> (Server, tempfile::TempDir) {
    let (s, dir, _) = wasmgate_tests::start_embedded(&users_manifest_with("", throttle));
    (s, dir)
}

fn from(address: Ipv4Addr) -> Client {
    Client::builder()
        .local_address(IpAddr::V4(address))
        .build()
        .expect("client")
}

async fn login(
    c: &Client,
    s: &Server,
    version: &str,
    email: &str,
    password: &str,
) -> reqwest::Response {
    c.post(s.url(&format!("/{version}/login")))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("login")
}

/// Tests here measure login latency: they run one at a time, so one's Argon2 work does not
/// show up in another's figures.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn a_thousand_guesses_from_ten_addresses_are_throttled_while_others_log_in() {
    let _serial = SERIAL.lock().await;
    let (s, _dir) = embedded("{}");
    sign_up(&s, "victim@example.com").await;
    sign_up(&s, "bystander@example.com").await;
    let local = Client::new();
    let mut normal = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(
            login(&local, &s, "v1", "bystander@example.com", PASSWORD)
                .await
                .status(),
            200
        );
        normal.push(started.elapsed());
    }
    let normal = median(normal);

    let attack: Vec<_> = (0..10u8)
        .map(|i| {
            let c = from(Ipv4Addr::new(127, 0, 0, 2 + i));
            let url = s.url(if i % 2 == 0 { "/v1/login" } else { "/v2/login" });
            tokio::spawn(async move {
                let (mut guessed, mut throttled, mut longest) = (0, 0, 0u64);
                for n in 0..100 {
                    let resp = c
                        .post(&url)
                        .json(&json!({"email": "Victim@Example.com", "password": format!("guess {n}")}))
                        .send()
                        .await
                        .expect("guess");
                    match resp.status().as_u16() {
                        401 => guessed += 1,
                        429 => {
                            throttled += 1;
                            let wait: u64 = resp.headers()["retry-after"]
                                .to_str()
                                .expect("ascii")
                                .parse()
                                .expect("seconds");
                            assert!(wait >= 1);
                            longest = longest.max(wait);
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
                (guessed, throttled, longest)
            })
        })
        .collect();
    // Meanwhile (once the first guesses, free ones included, are done) another account logs
    // in, from another address, as fast as before.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut during = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(
            login(&local, &s, "v2", "bystander@example.com", PASSWORD)
                .await
                .status(),
            200
        );
        during.push(started.elapsed());
    }
    let during = median(during);
    let (mut guessed, mut throttled, mut longest) = (0, 0, 0);
    for t in attack {
        let (g, th, l) = t.await.expect("attacker");
        guessed += g;
        throttled += th;
        longest = longest.max(l);
    }
    eprintln!(
        "1,000 guesses: {guessed} reached the function, {throttled} throttled (longest Retry-After {longest} s); a bystander's login took {during:?} (normally {normal:?})"
    );
    assert_eq!(guessed + throttled, 1000);
    assert!(guessed <= 40, "{guessed} guesses got through");
    assert!(longest <= 15 * 60, "never longer than max_delay");
    assert!(
        during < normal * 3 + Duration::from_millis(150),
        "{during:?} against {normal:?}"
    );
}

#[tokio::test]
async fn unknown_emails_are_throttled_alike_and_a_success_resets_the_account() {
    let _serial = SERIAL.lock().await;
    let throttle = "{ free_attempts = 2, base_delay = \"1s\", max_delay = \"2s\" }";
    let (s, _dir) = embedded(throttle);
    sign_up(&s, "kim@example.com").await;
    for (i, email) in ["kim@example.com", "nobody@example.com"].iter().enumerate() {
        // Each account from its own address, so only the account counter decides.
        let c = from(Ipv4Addr::new(127, 0, 1, 1 + i as u8));
        assert_eq!(login(&c, &s, "v1", email, "wrong").await.status(), 401);
        assert_eq!(login(&c, &s, "v2", email, "wrong").await.status(), 401);
        assert_eq!(
            login(&c, &s, "v1", email, "wrong").await.status(),
            401,
            "the third failure starts the backoff"
        );
        let blocked = login(&c, &s, "v1", email, PASSWORD).await;
        assert_eq!(blocked.status(), 429, "{email}");
        assert_eq!(blocked.headers()["retry-after"], "1");
        wasmgate_tests::expect_problem(blocked, 429, "login-throttled").await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let c = from(Ipv4Addr::new(127, 0, 1, 1));
    assert_eq!(
        login(&c, &s, "v1", "kim@example.com", PASSWORD)
            .await
            .status(),
        200,
        "after the wait"
    );
    // The success reset the account: two failures are free again.
    assert_eq!(
        login(&c, &s, "v1", "kim@example.com", "wrong")
            .await
            .status(),
        401
    );
    assert_eq!(
        login(&c, &s, "v1", "kim@example.com", "wrong")
            .await
            .status(),
        401
    );
    assert_eq!(
        login(&c, &s, "v1", "kim@example.com", PASSWORD)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn processes_sharing_redis_count_failures_together() {
    let _serial = SERIAL.lock().await;
    let db = fresh_postgres();
    let args = ["--database-url", db.as_str(), "--redis-url", &redis_url()];
    let manifest = users_manifest_with("", "{ free_attempts = 2, base_delay = \"5s\" }");
    let (a, b) = (
        Server::start_with_args(&manifest, &args),
        Server::start_with_args(&manifest, &args),
    );
    let email = format!("lee{}@example.com", wasmgate_tests::unique_suffix());
    sign_up(&a, &email).await;
    let c = Client::builder()
        .local_address(wasmgate_tests::loopback())
        .build()
        .expect("client");
    assert_eq!(login(&c, &a, "v1", &email, "wrong").await.status(), 401);
    assert_eq!(login(&c, &b, "v1", &email, "wrong").await.status(), 401);
    assert_eq!(login(&c, &a, "v2", &email, "wrong").await.status(), 401);
    assert_eq!(
        login(&c, &b, "v1", &email, PASSWORD).await.status(),
        429,
        "b counts a's failures"
    );
}

#[tokio::test]
async fn timing_does_not_tell_known_from_unknown_emails() {
    let _serial = SERIAL.lock().await;
    // Counting, not blocking: every attempt reaches the function.
    let (s, _dir) = embedded("{ free_attempts = 100000 }");
    sign_up(&s, "known@example.com").await;
    let c = Client::new();
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..400 {
        let (email, into) = if i % 2 == 0 {
            ("known@example.com", &mut known)
        } else {
            ("unknown@example.com", &mut unknown)
        };
        let started = Instant::now();
        let resp = login(&c, &s, "v1", email, "wrong password").await;
        into.push(started.elapsed());
        assert_eq!(resp.status(), 401);
    }
    // Each known attempt is paired with the unknown one right after it, so the machine's drift
    // (another process, the CPU's clock) weighs on both sides of a pair alike.
    let mut gaps: Vec<f64> = known
        .iter()
        .zip(&unknown)
        .map(|(k, u)| k.as_secs_f64() - u.as_secs_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    let gap = Duration::from_secs_f64(gaps[gaps.len() / 2].abs());
    let (k, u) = (median(known), median(unknown));
    eprintln!("medians over 200 samples each: known {k:?}, unknown {u:?}, paired gap {gap:?}");
    // A leak is the hash skipped for unknown emails: a gap of the whole ~100 ms hash.
    let allowed = Duration::from_millis(2).max(k.max(u) / 25);
    assert!(
        gap < allowed,
        "known {k:?} vs unknown {u:?}: paired gap {gap:?}, allowed {allowed:?}"
    );
}
