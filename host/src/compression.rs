//! Response compression: which encoding a request accepts, which responses are worth encoding,
//! and the encoders themselves (async-compression's, the ones tower-http's layer is built on).
//!
//! The tower layer that applies it is `policy::compression`; the response cache encodes an entry
//! once when it is stored (`policy::response_cache`), so a hit costs no compression. What is
//! encoded is decided here, for both:
//! - only types that compress (text, JSON, XML, JavaScript, SVG, wasm...); images, archives,
//!   media and unknown binaries pass untouched, as does `text/event-stream` (its events must
//!   not wait in an encoder's buffer);
//! - never a response that is already encoded, that says `Cache-Control: no-transform`, a 206
//!   (its ranges are of the identity bytes), nor one without a body;
//! - never a body known to be smaller than the route's `min_size`.
//!
//! A streamed body is encoded as it flows, through buffers of a fixed size: a long response
//! never sits whole in memory. A body that fails mid-way fails encoded too (the encoder does not
//! close its stream), so a cut response is never made to look complete by its encoding.

use std::io;

use async_compression::Level;
use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::config::{CompressionConfig, CompressionLevel};

/// A content coding wasmgate produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Br,
    Zstd,
    Gzip,
}

/// The size of the encoded chunks a streamed body leaves in.
const CHUNK: usize = 16 * 1024;

impl Encoding {
    pub const ALL: [Encoding; 3] = [Encoding::Br, Encoding::Zstd, Encoding::Gzip];

    /// Its `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Self::Br => "br",
            Self::Zstd => "zstd",
            Self::Gzip => "gzip",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.token())
    }

    fn matches(self, token: &str) -> bool {
        token.eq_ignore_ascii_case(self.token())
            || (self == Self::Gzip && token.eq_ignore_ascii_case("x-gzip"))
    }

    /// The encoder's setting for a named level. "default" is each format's usual trade-off
    /// (brotli's own default, 11, is far too slow for a live response; 4 is what browsers'
    /// servers commonly use); "best" is meant for cached routes, encoded once.
    fn level(self, level: CompressionLevel) -> Level {
        let q = match (self, level) {
            (_, CompressionLevel::Fastest) => 1,
            (Self::Gzip, CompressionLevel::Default) => 6,
            (Self::Br, CompressionLevel::Default) => 4,
            (Self::Zstd, CompressionLevel::Default) => 3,
            (Self::Gzip, CompressionLevel::Best) => 9,
            (Self::Br, CompressionLevel::Best) => 11,
            (Self::Zstd, CompressionLevel::Best) => 19,
        };
        Level::Precise(q)
    }
}

/// Picks the encoding for a request's `Accept-Encoding` values (RFC 9110 12.5.3): the offered
/// encoding with the highest q-value above 0 (`*` stands for any not named); ties go to the
/// earlier in `offered`, the route's order of preference. `None`: send it as it is.
pub fn negotiate<'a>(
    accept_encoding: impl IntoIterator<Item = &'a HeaderValue>,
    offered: &[Encoding],
) -> Option<Encoding> {
    let mut named = [None::<u16>; 3];
    let mut any = None::<u16>;
    for value in accept_encoding {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or_default().trim();
            let Some(q) = parts.try_fold(1000, |q, p| match p.trim().split_once('=') {
                Some((k, v)) if k.trim().eq_ignore_ascii_case("q") => qvalue(v.trim()),
                _ => Some(q),
            }) else {
                continue;
            };
            if token == "*" {
                any = Some(q);
            } else if let Some(i) = Encoding::ALL.iter().position(|e| e.matches(token)) {
                named[i] = Some(q);
            }
        }
    }
    let mut best: Option<(u16, Encoding)> = None;
    for &e in offered {
        let i = Encoding::ALL
            .iter()
            .position(|x| *x == e)
            .expect("one of ALL");
        let q = named[i].or(any).unwrap_or(0);
        if q > 0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, e));
        }
    }
    best.map(|(_, e)| e)
}

/// A q-value in thousandths ("0.5" -> 500); `None` when it is not one (RFC 9110 12.4.2).
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac = format!("{frac:0<3}").parse::<u16>().ok()?;
    match int {
        "0" => Some(frac),
        "1" if frac == 0 => Some(1000),
        _ => None,
    }
}

/// Whether a response of this type may be encoded: text and structured text only.
fn compressible_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    // Media types are almost always sent in lowercase: only the rare other one is copied.
    let lower;
    let essence = if essence.bytes().any(|b| b.is_ascii_uppercase()) {
        lower = essence.to_ascii_lowercase();
        lower.as_str()
    } else {
        essence
    };
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    match kind {
        "text" => sub != "event-stream",
        "application" => {
            sub.ends_with("+json")
                || sub.ends_with("+xml")
                || matches!(
                    sub,
                    "json"
                        | "xml"
                        | "javascript"
                        | "x-javascript"
                        | "ecmascript"
                        | "x-ndjson"
                        | "graphql"
                        | "wasm"
                        | "x-yaml"
                        | "yaml"
                        | "toml"
                        | "csv"
                )
        }
        "image" => sub == "svg+xml",
        _ => false,
    }
}

/// What a route does about compression.
#[derive(Debug, Clone)]
pub struct Compression {
    /// In order of preference.
    encodings: Vec<Encoding>,
    level: CompressionLevel,
    min_size: u64,
}

/// Whether a response may be encoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its content must stay as it is (type, an encoding already, `no-transform`...).
    Never,
    /// Its body is too small to be worth it (whatever else it is): the same bytes for everyone.
    TooSmall,
    /// Encoded for a client that accepts an encoding; `Vary: Accept-Encoding` either way.
    Encode,
}

impl Compression {
    pub fn new(cfg: &CompressionConfig) -> Self {
        Self {
            encodings: cfg.encodings.clone(),
            level: cfg.level,
            min_size: cfg.min_size,
        }
    }

    /// The encoding a request with these `Accept-Encoding` values gets, if any.
    pub fn negotiate(&self, accept_encoding: &[HeaderValue]) -> Option<Encoding> {
        if accept_encoding.is_empty() {
            return None;
        }
        negotiate(accept_encoding, &self.encodings)
    }

    /// Bodies smaller than this are sent as they are.
    pub fn min_size(&self) -> u64 {
        self.min_size
    }

    pub fn encodings(&self) -> &[Encoding] {
        &self.encodings
    }

    /// Judges a response by its head; `len` is its body's length when known.
    pub fn verdict(&self, status: StatusCode, headers: &HeaderMap, len: Option<u64>) -> Verdict {
        // First, as it reads no header: most answers a cache hit serves are small.
        if len.is_some_and(|n| n < self.min_size) {
            return Verdict::TooSmall;
        }
        if status.is_informational()
            || matches!(
                status,
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
            )
            || headers.contains_key(header::CONTENT_ENCODING)
            || headers.contains_key(header::CONTENT_RANGE)
        {
            return Verdict::Never;
        }
        let no_transform = headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
            })
        });
        let typed = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(compressible_type);
        if no_transform || !typed {
            return Verdict::Never;
        }
        Verdict::Encode
    }

    /// `body` encoded as it streams.
    pub fn encode_stream(&self, body: Body, encoding: Encoding) -> Body {
        let reader = StreamReader::new(body.into_data_stream().map_err(io::Error::other));
        let level = encoding.level(self.level);
        match encoding {
            Encoding::Br => stream(BrotliEncoder::with_quality(reader, level)),
            Encoding::Zstd => stream(ZstdEncoder::with_quality(reader, level)),
            Encoding::Gzip => stream(GzipEncoder::with_quality(reader, level)),
        }
    }

    /// A whole body encoded at once (a cached entry's variants).
    ///
    /// The encoder runs boxed: an encoder's state (brotli's above all) is tens of KiB, and held
    /// inline it would make every future that may call this as large, and copied as such on
    /// every request through the response cache, hit or not (`bench/callgrind` saw a hit go
    /// from 37k to 127k instructions, most of them memcpy).
    pub async fn encode_all(&self, body: &[u8], encoding: Encoding) -> io::Result<Bytes> {
        let level = encoding.level(self.level);
        match encoding {
            Encoding::Br => Box::pin(read_all(BrotliEncoder::with_quality(body, level))).await,
            Encoding::Zstd => Box::pin(read_all(ZstdEncoder::with_quality(body, level))).await,
            Encoding::Gzip => Box::pin(read_all(GzipEncoder::with_quality(body, level))).await,
        }
    }
}

fn stream<R: AsyncRead + Send + 'static>(encoder: R) -> Body {
    Body::from_stream(ReaderStream::with_capacity(encoder, CHUNK))
}

async fn read_all<R: AsyncRead + Unpin>(mut encoder: R) -> io::Result<Bytes> {
    let mut out = Vec::new();
    encoder.read_to_end(&mut out).await?;
    Ok(out.into())
}

/// A request's `Accept-Encoding` values, taken before the request moves on (no allocation when
/// there are none), for [`Compression::negotiate`] once the answer is known.
pub fn accept_encoding(headers: &HeaderMap) -> Vec<HeaderValue> {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .cloned()
        .collect()
}

/// Makes a response's headers describe its body encoded with `encoding`: `Content-Encoding`,
/// the encoded length when it is known (`None`: streamed, so none), no `Accept-Ranges` (ranges
/// would be of the identity bytes) and a weak `ETag`.
pub fn mark_encoded(headers: &mut HeaderMap, encoding: Encoding, len: Option<usize>) {
    headers.insert(header::CONTENT_ENCODING, encoding.header_value());
    match len {
        Some(n) => headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n)),
        None => headers.remove(header::CONTENT_LENGTH),
    };
    headers.remove(header::ACCEPT_RANGES);
    weaken_etag(headers);
}

/// Adds `accept-encoding` to the response's `Vary` unless it is there already.
pub fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    let present = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|n| {
                let n = n.trim();
                n == "*" || n.eq_ignore_ascii_case("accept-encoding")
            })
        })
    });
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// A strong `ETag` made weak (`W/`): an encoded variant is not byte-for-byte the identity
/// response the tag was made for, but means the same (RFC 9110 8.8.1).
pub fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(header::ETAG)
        && etag.as_bytes().starts_with(b"\"")
    {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(etag.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&weak) {
            headers.insert(header::ETAG, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
    use http_body_util::BodyExt;

    fn accept(v: &'static str) -> HeaderValue {
        HeaderValue::from_static(v)
    }

    #[test]
    fn negotiates_by_q_value_then_preference() {
        let all = &Encoding::ALL;
        for (sent, want) in [
            ("gzip", Some(Encoding::Gzip)),
            ("gzip, br", Some(Encoding::Br)),
            ("gzip, deflate, br, zstd", Some(Encoding::Br)),
            ("br;q=0.5, gzip", Some(Encoding::Gzip)),
            ("br;q=0, gzip;q=0.1", Some(Encoding::Gzip)),
            ("x-gzip", Some(Encoding::Gzip)),
            ("GZIP;Q=1.0", Some(Encoding::Gzip)),
            ("*", Some(Encoding::Br)),
            ("*;q=0.2, br;q=0.1", Some(Encoding::Zstd)),
            ("br;q=0, *", Some(Encoding::Zstd)),
            ("identity", None),
            ("deflate", None),
            ("gzip;q=0", None),
            ("*;q=0", None),
            ("gzip;q=2", None),
            ("gzip;q=0.1234", None),
            ("gzip;q=abc", None),
            ("", None),
            (",,;", None),
        ] {
            assert_eq!(negotiate(&[accept(sent)], all), want, "{sent}");
        }
        assert_eq!(
            negotiate(&[accept("gzip, br")], &[Encoding::Gzip, Encoding::Br]),
            Some(Encoding::Gzip),
            "the route's order breaks ties"
        );
        assert_eq!(negotiate(&[accept("br")], &[Encoding::Gzip]), None);
        assert_eq!(negotiate(&[], all), None);
        assert_eq!(
            negotiate(&[accept("br;q=0.1"), accept("gzip")], all),
            Some(Encoding::Gzip),
            "values of several header lines count together"
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn judges_types_sizes_and_no_transform() {
        let c = Compression::new(&CompressionConfig::default());
        let ok = StatusCode::OK;
        let json = headers(&[("content-type", "application/json")]);
        assert_eq!(c.verdict(ok, &json, None), Verdict::Encode);
        assert_eq!(c.verdict(ok, &json, Some(100_000)), Verdict::Encode);
        assert_eq!(c.verdict(ok, &json, Some(10)), Verdict::TooSmall);
        for t in [
            "text/html; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
            "image/svg+xml",
            "application/wasm",
        ] {
            let h = headers(&[("content-type", t)]);
            assert_eq!(c.verdict(ok, &h, None), Verdict::Encode, "{t}");
        }
        for t in [
            "image/png",
            "image/jpeg",
            "application/zip",
            "application/octet-stream",
            "video/mp4",
            "text/event-stream",
            "nonsense",
        ] {
            let h = headers(&[("content-type", t)]);
            assert_eq!(c.verdict(ok, &h, None), Verdict::Never, "{t}");
        }
        assert_eq!(c.verdict(ok, &HeaderMap::new(), None), Verdict::Never);
        for extra in [
            ("cache-control", "public, No-Transform"),
            ("content-encoding", "gzip"),
            ("content-range", "bytes 0-1/2"),
        ] {
            let h = headers(&[("content-type", "application/json"), extra]);
            assert_eq!(c.verdict(ok, &h, None), Verdict::Never, "{extra:?}");
        }
        for status in [
            StatusCode::NO_CONTENT,
            StatusCode::NOT_MODIFIED,
            StatusCode::PARTIAL_CONTENT,
        ] {
            assert_eq!(c.verdict(status, &json, None), Verdict::Never);
        }
    }

    async fn decode(encoding: Encoding, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match encoding {
            Encoding::Br => BrotliDecoder::new(bytes).read_to_end(&mut out).await,
            Encoding::Zstd => ZstdDecoder::new(bytes).read_to_end(&mut out).await,
            Encoding::Gzip => GzipDecoder::new(bytes).read_to_end(&mut out).await,
        }
        .expect("decodes");
        out
    }

    #[tokio::test]
    async fn every_encoding_round_trips_whole_and_streamed() {
        let text: Vec<u8> = (0..5000)
            .flat_map(|i| format!("{{\"id\":{i},\"name\":\"user {i}\"}},").into_bytes())
            .collect();
        for level in [
            CompressionLevel::Fastest,
            CompressionLevel::Default,
            CompressionLevel::Best,
        ] {
            let c = Compression::new(&CompressionConfig {
                level,
                ..CompressionConfig::default()
            });
            for e in Encoding::ALL {
                let whole = c.encode_all(&text, e).await.expect("encodes");
                assert!(whole.len() < text.len() / 4, "{e:?} {level:?}");
                assert_eq!(decode(e, &whole).await, text, "{e:?} {level:?}");
                let chunks: Vec<Result<Bytes, io::Error>> = text
                    .chunks(1000)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                let body = c.encode_stream(Body::from_stream(futures::stream::iter(chunks)), e);
                let streamed = body.collect().await.expect("streams").to_bytes();
                assert_eq!(decode(e, &streamed).await, text, "{e:?} {level:?}");
            }
        }
    }

    /// A body that fails mid-way must fail encoded too: the client must not get a complete,
    /// valid stream of the part that came.
    #[tokio::test]
    async fn a_failed_body_fails_encoded() {
        let c = Compression::new(&CompressionConfig::default());
        for e in Encoding::ALL {
            let chunks: Vec<Result<Bytes, io::Error>> = vec![
                Ok(Bytes::from(vec![b'x'; 100_000])),
                Err(io::Error::other("the guest trapped")),
            ];
            let body = c.encode_stream(Body::from_stream(futures::stream::iter(chunks)), e);
            assert!(body.collect().await.is_err(), "{e:?}");
        }
    }

    #[test]
    fn etags_turn_weak_and_vary_is_added_once() {
        let mut h = headers(&[("etag", "\"abc\""), ("vary", "Origin")]);
        weaken_etag(&mut h);
        assert_eq!(h["etag"], "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h["etag"], "W/\"abc\"");
        vary_on_accept_encoding(&mut h);
        vary_on_accept_encoding(&mut h);
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["Origin", "accept-encoding"]);
        let mut star = headers(&[("vary", "*")]);
        vary_on_accept_encoding(&mut star);
        assert_eq!(star.get_all("vary").iter().count(), 1);
    }
}
