//! A response held in memory: what the response cache and the idempotency store keep and
//! replay.
//!
//! Capturing reads the body up to a cap. A bigger body is not lost: the response is handed back
//! whole (the part already read, then the rest as it streams), it just is not kept.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// Headers that describe one delivery, not the response: never kept, so a replay carries the
/// current request's id and its own framing.
const NOT_KEPT: &[&str] = &[
    "x-request-id",
    "connection",
    "transfer-encoding",
    "keep-alive",
    "date",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub status: u16,
    /// Name and raw value; values need not be UTF-8.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Shared, so each replay hands out the same bytes instead of a copy (serialized as
    /// `Vec<u8>` was: stored snapshots read back unchanged).
    pub body: Bytes,
}

/// Headers the host adds to a replayed response (cache status, age, request id, version,
/// content length...): room kept for them, so adding them does not grow the map.
const ADDED_ON_THE_WAY_OUT: usize = 6;

/// Why a snapshot could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("stored response is corrupt: {0}")]
pub struct Corrupt(String);

impl Snapshot {
    /// Reads `resp` whole if its body is at most `max` bytes; otherwise gives the response back
    /// intact. A body that fails mid-way is given back too (with the error still to come).
    pub async fn capture(resp: Response, max: usize) -> Result<(Self, Response), Response> {
        let (parts, body) = resp.into_parts();
        let mut stream = body.into_data_stream();
        let mut buf = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) if buf.len() + chunk.len() <= max => buf.extend_from_slice(&chunk),
                other => {
                    // Too big or failed: replay what was read, then the rest as it comes.
                    let head = futures::stream::iter([Ok::<Bytes, axum::Error>(buf.freeze())]);
                    let rest = futures::stream::iter([other]).chain(stream);
                    return Err(Response::from_parts(
                        parts,
                        Body::from_stream(head.chain(rest)),
                    ));
                }
            }
        }
        let snapshot = Self {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter(|(k, _)| !NOT_KEPT.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: buf.freeze(),
        };
        let resp = Response::from_parts(parts, Body::from(snapshot.body.clone()));
        Ok((snapshot, resp))
    }

    /// A fresh response with the kept status, headers and body.
    pub fn to_response(&self) -> Response {
        let mut resp = Response::new(Body::from(self.body.clone()));
        *resp.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        *resp.headers_mut() = self.header_map();
        resp
    }

    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.headers.len() + ADDED_ON_THE_WAY_OUT);
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(v),
            ) {
                map.append(k, v);
            }
        }
        map
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a snapshot serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, Corrupt> {
        postcard::from_bytes(bytes).map_err(|e| Corrupt(e.to_string()))
    }

    /// Bytes this snapshot holds, for cache weighing.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn response(body: Body) -> Response {
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::CREATED;
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("old"));
        resp.headers_mut()
            .append("set-thing", HeaderValue::from_static("a"));
        resp.headers_mut().append(
            "set-thing",
            HeaderValue::from_bytes(b"\xffb").expect("obs-text"),
        );
        resp
    }

    #[tokio::test]
    async fn captures_and_replays_without_delivery_headers() {
        let (snap, passed) = Snapshot::capture(response(Body::from("hello")), 16)
            .await
            .expect("small body");
        assert_eq!(snap.status, 201);
        assert_eq!(snap.body, &b"hello"[..]);
        assert!(snap.headers.iter().all(|(k, _)| k != "x-request-id"));
        let back = Snapshot::decode(&snap.encode()).expect("round trip");
        assert_eq!(back, snap);
        let replay = back.to_response();
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert_eq!(replay.headers().get_all("set-thing").iter().count(), 2);
        let body = passed.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"hello");
    }

    #[tokio::test]
    async fn gives_back_a_body_over_the_cap_intact() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"0123456789")),
            Ok(Bytes::from_static(b"abcdefghij")),
            Ok(Bytes::from_static(b"KLMNO")),
        ];
        let resp = response(Body::from_stream(futures::stream::iter(chunks)));
        let back = Snapshot::capture(resp, 12).await.expect_err("over the cap");
        assert_eq!(back.status(), StatusCode::CREATED);
        let body = back.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"0123456789abcdefghijKLMNO");
    }

    #[test]
    fn refuses_corrupt_bytes() {
        assert!(Snapshot::decode(b"\xff\xff\xff\xff\xff").is_err());
    }

    /// The body became shared bytes; what the idempotency store and Redis hold from before
    /// reads back the same, and is written the same.
    #[test]
    fn snapshots_stored_before_the_body_was_shared_read_back() {
        #[derive(Serialize)]
        struct Before {
            status: u16,
            headers: Vec<(String, Vec<u8>)>,
            body: Vec<u8>,
        }
        let stored = postcard::to_stdvec(&Before {
            status: 201,
            headers: vec![("etag".into(), b"\"1\"".to_vec())],
            body: b"kept".to_vec(),
        })
        .expect("encodes");
        let read = Snapshot::decode(&stored).expect("reads back");
        assert_eq!((read.status, &read.body[..]), (201, &b"kept"[..]));
        assert_eq!(read.encode(), stored);
    }
}
