//! Response compression, black-box: each encoding round-trips, what must not be encoded is not,
//! a long response streams encoded at constant memory, a cut stays a cut, and a cached entry is
//! encoded once and served per `Accept-Encoding` with a correct length, `ETag` and `Vary`.

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
use futures::TryStreamExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use wasmgate_tests::Server;

const MANIFEST: &str = r#"
[functions.echo]
wasm = "{wasm:echo}"
timeout = "60s"

[[routes]]
path = "/plain"
function = "echo"

[[routes]]
path = "/cached"
methods = ["GET", "HEAD"]
function = "echo"
cache = { ttl = "60s" }

[[routes]]
path = "/off"
function = "echo"
compression = false

[[routes]]
path = "/gzip-only"
function = "echo"
compression = { encodings = ["gzip"], level = "fastest", min_size = "100KiB" }
"#;

struct Got {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn get(url: &str, accept: Option<&str>, extra: &[(&str, &str)]) -> Got {
    request(reqwest::Method::GET, url, accept, extra).await
}

async fn request(
    method: reqwest::Method,
    url: &str,
    accept: Option<&str>,
    extra: &[(&str, &str)],
) -> Got {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(a) = accept {
        req = req.header("accept-encoding", a);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    Got {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.bytes().await.expect("body").to_vec(),
    }
}

fn decoder<'a>(
    encoding: &str,
    bytes: impl AsyncRead + Unpin + Send + 'a,
) -> Box<dyn AsyncRead + Unpin + Send + 'a> {
    let reader = tokio::io::BufReader::new(bytes);
    match encoding {
        "gzip" => Box::new(GzipDecoder::new(reader)),
        "br" => Box::new(BrotliDecoder::new(reader)),
        "zstd" => Box::new(ZstdDecoder::new(reader)),
        other => panic!("unexpected content-encoding {other}"),
    }
}

async fn decode(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    decoder(encoding, bytes)
        .read_to_end(&mut out)
        .await
        .expect("decodes");
    out
}

fn vary_names(headers: &reqwest::header::HeaderMap) -> Vec<String> {
    headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test]
async fn each_encoding_round_trips_and_q_values_choose() {
    let s = Server::start(MANIFEST);
    let url = s.url("/plain?generate=300000");
    let identity = get(&url, None, &[]).await;
    assert_eq!(identity.status, 200);
    assert_eq!(identity.body.len(), 300_000);
    assert_eq!(identity.header("content-encoding"), None);
    assert!(
        vary_names(&identity.headers).contains(&"accept-encoding".to_string()),
        "the identity answer varies too, or a shared cache would serve it to everyone"
    );
    for encoding in ["gzip", "br", "zstd"] {
        let got = get(&url, Some(encoding), &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-encoding"), Some(encoding));
        assert!(vary_names(&got.headers).contains(&"accept-encoding".to_string()));
        assert!(
            got.body.len() < identity.body.len() / 10,
            "{encoding}: {} bytes",
            got.body.len()
        );
        assert_eq!(
            decode(encoding, &got.body).await,
            identity.body,
            "{encoding}"
        );
    }
    for (accept, chosen) in [
        ("gzip;q=0.5, br;q=0.9", Some("br")),
        ("gzip, br;q=0", Some("gzip")),
        ("gzip, deflate, br, zstd", Some("br")),
        ("*;q=0.1, br;q=0, zstd;q=0", Some("gzip")),
        ("identity", None),
        ("deflate", None),
        ("gzip;q=0", None),
    ] {
        let got = get(&url, Some(accept), &[]).await;
        assert_eq!(got.header("content-encoding"), chosen, "{accept}");
    }
    let route_order = get(
        &s.url("/gzip-only?generate=300000"),
        Some("br, zstd, gzip"),
        &[],
    )
    .await;
    assert_eq!(route_order.header("content-encoding"), Some("gzip"));
    let compressed = s
        .metric("wasmgate_responses_compressed_total", r#"encoding="br""#)
        .await;
    assert!(compressed >= 3.0, "counted per encoding: {compressed}");
}

#[tokio::test]
async fn small_bodies_images_no_transform_and_opted_out_routes_pass_untouched() {
    let s = Server::start(MANIFEST);
    let identity = |g: &Got| g.header("content-encoding").is_none();
    let small = get(&s.url("/plain?generate=500"), Some("gzip"), &[]).await;
    assert!(identity(&small));
    assert_eq!(small.body.len(), 500);
    let below_route_minimum = get(&s.url("/gzip-only?generate=50000"), Some("gzip"), &[]).await;
    assert!(identity(&below_route_minimum));
    let image = get(
        &s.url("/plain?generate=200000&type=image%2Fpng"),
        Some("gzip, br"),
        &[],
    )
    .await;
    assert!(identity(&image));
    assert_eq!(image.body.len(), 200_000);
    assert!(!vary_names(&image.headers).contains(&"accept-encoding".to_string()));
    let no_transform = get(
        &s.url("/plain?generate=200000&cache-control=no-transform"),
        Some("gzip"),
        &[],
    )
    .await;
    assert!(identity(&no_transform));
    assert_eq!(no_transform.body.len(), 200_000);
    let off = get(&s.url("/off?generate=200000"), Some("gzip"), &[]).await;
    assert!(identity(&off));
    assert!(vary_names(&off.headers).is_empty());
    let head = request(
        reqwest::Method::HEAD,
        &s.url("/plain?generate=200000"),
        Some("gzip"),
        &[],
    )
    .await;
    assert_eq!(head.status, 200);
    assert!(identity(&head), "a HEAD has no body to encode");
}

/// 50 MiB streamed by the guest leaves encoded as it is made: the server's memory stays flat.
#[tokio::test]
async fn a_long_response_is_encoded_as_it_streams() {
    let s = Server::start(MANIFEST);
    const SIZE: u64 = 50 * 1024 * 1024;
    // Warm up: the first request compiles and instantiates.
    get(&s.url("/plain?generate=100000"), Some("gzip"), &[]).await;
    let before = s.rss_kib();
    for encoding in ["gzip", "zstd"] {
        let resp = reqwest::Client::new()
            .get(s.url(&format!("/plain?generate={SIZE}")))
            .header("accept-encoding", encoding)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-encoding"], encoding);
        assert!(resp.headers().get("content-length").is_none());
        let stream = resp.bytes_stream().map_err(std::io::Error::other);
        let mut decoded = decoder(encoding, tokio_util::io::StreamReader::new(stream));
        let (mut total, mut peak) = (0u64, before);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = decoded.read(&mut buf).await.expect("decodes");
            if n == 0 {
                break;
            }
            total += n as u64;
            if total % (4 << 20) < n as u64 {
                peak = peak.max(s.rss_kib());
            }
        }
        assert_eq!(total, SIZE, "{encoding}");
        let grew = peak.saturating_sub(before);
        eprintln!("{encoding}: server RSS {before} KiB before, peak {peak} KiB");
        assert!(
            grew < 24 * 1024,
            "{encoding}: the server grew by {grew} KiB while streaming 50 MiB"
        );
    }
}

/// A guest that fails after its head was sent: encoded or not, the client sees a failed body,
/// never a short one that looks complete.
#[tokio::test]
async fn a_cut_response_stays_cut_when_encoded() {
    let s = Server::start(MANIFEST);
    for encoding in ["gzip", "br", "zstd"] {
        let sent = reqwest::Client::new()
            .get(s.url("/plain?cut=trap"))
            .header("accept-encoding", encoding)
            .send()
            .await;
        // The encoder holds the 64 KiB that came before the trap (they shrink to a few bytes),
        // so the connection may close before even the head has left: a failure either way.
        if let Ok(resp) = sent {
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-encoding"], encoding);
            assert!(resp.bytes().await.is_err(), "{encoding}: the cut must show");
        }
    }
    let cut = s
        .metric("wasmgate_responses_cut_total", r#"cause="trap""#)
        .await;
    assert_eq!(cut, 3.0, "each cut counted");
}

#[tokio::test]
async fn a_cached_entry_is_encoded_once_and_served_per_accept_encoding() {
    let s = Server::start(MANIFEST);
    let url = s.url("/cached?generate=40000&etag=v1");
    let compressed = || s.metric("wasmgate_responses_compressed_total", "");

    let first = get(&url, Some("gzip, br"), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("cache-status"),
        Some("wasmgate; fwd=miss; stored")
    );
    assert_eq!(first.header("content-encoding"), Some("br"));
    assert_eq!(first.header("etag"), Some("W/\"v1\""));
    assert_eq!(
        first.header("content-length"),
        Some(first.body.len().to_string().as_str())
    );
    let identity = get(&url, None, &[]).await;
    assert_eq!(identity.header("cache-status"), Some("wasmgate; hit"));
    assert_eq!(identity.header("content-encoding"), None);
    assert_eq!(identity.header("etag"), Some("\"v1\""));
    assert_eq!(identity.body.len(), 40_000);
    assert!(vary_names(&identity.headers).contains(&"accept-encoding".to_string()));
    assert_eq!(decode("br", &first.body).await, identity.body);

    let before = compressed().await;
    for encoding in ["gzip", "br", "zstd"] {
        let hit = get(&url, Some(encoding), &[]).await;
        assert_eq!(
            hit.header("cache-status"),
            Some("wasmgate; hit"),
            "{encoding}"
        );
        assert_eq!(hit.header("content-encoding"), Some(encoding));
        assert_eq!(hit.header("etag"), Some("W/\"v1\""));
        assert_eq!(
            hit.header("content-length"),
            Some(hit.body.len().to_string().as_str())
        );
        assert!(vary_names(&hit.headers).contains(&"accept-encoding".to_string()));
        assert_eq!(
            decode(encoding, &hit.body).await,
            identity.body,
            "{encoding}"
        );
    }
    assert_eq!(
        compressed().await,
        before,
        "a hit hands out a kept variant: nothing is compressed per request"
    );

    // Revalidation matches the weak tag of any variant; HEAD says what a GET would get.
    let not_modified = get(&url, Some("br"), &[("if-none-match", "W/\"v1\"")]).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("etag"), Some("W/\"v1\""));
    let head = request(reqwest::Method::HEAD, &url, Some("zstd"), &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-encoding"), Some("zstd"));
    let zstd = get(&url, Some("zstd"), &[]).await;
    assert_eq!(
        head.header("content-length"),
        Some(zstd.body.len().to_string().as_str())
    );
    assert!(head.body.is_empty());
}
