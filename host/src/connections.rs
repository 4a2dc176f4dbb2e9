//! The listeners' connections: accepted, capped, given deadlines, served (HTTP/1.1, and HTTP/2
//! for clients that speak it in clear text), and drained on shutdown.
//!
//! `axum::serve` gave none of these limits: a client that sent half a request head and then
//! nothing kept its connection (and a file descriptor) forever, so a few thousand of them could
//! exhaust the process. Here:
//! - a request head must arrive whole within `request_head_timeout` of the server waiting for
//!   one: from accept for a new connection, from the end of the last response for a keep-alive
//!   one (hyper runs one timer for both, so it is also the keep-alive idle timeout);
//! - at most `max_connections` are open; the next ones get a 503 `too-many-connections` with
//!   `Retry-After` and are closed (at most `MAX_REFUSING` being answered at once; past that
//!   they are closed without an answer), and the server accepts again as soon as one closes;
//! - HTTP/2 connections get a cap on concurrent streams and on header size, and pings that close
//!   a connection whose peer went away (an idle HTTP/2 connection is otherwise kept: the cap on
//!   connections bounds them).
//!
//! A slow request body needs no timer of its own here: the guest waiting for it is inside its
//! function's `timeout`.
//!
//! With TLS (`[server] tls`), the handshake must also finish within `request_head_timeout`;
//! past the connection cap a TLS connection is closed at once (a 503 would need a handshake
//! first, which is the work the cap is there to avoid).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::either::Either;
use tower::ServiceExt;

/// How long a refused connection may take to send its request head and read its 503.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// Marks a request that arrived over TLS, so a guest is told its scheme is `https`.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Refused connections being answered at once; past this, a connection over the cap is closed
/// without an answer, so a flood of new connections cannot hold more than this many
/// descriptors beyond `max_connections`.
const MAX_REFUSING: usize = 256;

/// HTTP/2 pings: sent after this long without frames; the connection closes when one is not
/// answered within as long again.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Concurrent streams on one HTTP/2 connection: each may hold an instance, so one connection
/// gets no more than a bulkhead's default concurrency.
const H2_MAX_STREAMS: u32 = 64;

/// Request headers on an HTTP/2 connection, in bytes (HTTP/1.1 has hyper's own caps: 100
/// headers in a buffer of at most about 400 KiB).
const H2_MAX_HEADER_BYTES: u32 = 64 * 1024;

/// Limits on a listener's connections (`[server]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_connections: u32,
    pub request_head_timeout: Duration,
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `shutdown` resolves, then
/// stops accepting and lets open connections finish the requests they have started.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<crate::tls::Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let graceful = GracefulShutdown::new();
    let builder = builder(&limits);
    let open = metrics::gauge!("wasmgate_connections_open");
    let refused = metrics::counter!("wasmgate_connections_refused_total");
    tokio::pin!(shutdown);
    loop {
        let (mut tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or the peer left before accept: not fatal, and
                    // retrying at once would spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        no_delay(&mut tcp);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.increment(1);
            if tls.is_none()
                && let Ok(answering) = refusing.clone().try_acquire_owned()
            {
                tokio::spawn(async move {
                    refuse(tcp, limits.max_connections).await;
                    drop(answering);
                });
            }
            continue;
        };
        let router = router.clone();
        let secure = tls.is_some();
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            if secure {
                req.extensions_mut().insert(OverTls);
            }
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let (builder, watcher, open) = (builder.clone(), graceful.watcher(), open.clone());
        let tls = tls.as_ref().map(|t| t.acceptor().clone());
        open.increment(1.0);
        tokio::spawn(async move {
            let served = async {
                let io = match tls {
                    None => Either::Left(tcp),
                    Some(acceptor) => Either::Right(
                        tokio::time::timeout(limits.request_head_timeout, acceptor.accept(tcp))
                            .await
                            .map_err(|_| "TLS handshake timed out")??,
                    ),
                };
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                watcher.watch(conn.into_owned()).await
            };
            if let Err(e) = served.await {
                // Timeouts, resets, failed handshakes and malformed requests end here; they are
                // the client's.
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            open.decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Sends what is written at once: a response leaves in more than one write (head, then body
/// chunks), and with Nagle's algorithm the last small write waits for the client's delayed
/// acknowledgement, about 40 ms, on one request in hundreds.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set on an accepted connection");
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_BYTES)
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(H2_KEEP_ALIVE);
    builder
}

/// Answers a connection past the cap with a 503 and closes it: after the client's request head
/// (an answer before it confuses HTTP clients), then the write side shut and what else the
/// client sent read and dropped, so closing does not reset the connection before the client has
/// read the answer. All within `REFUSAL_TIME`.
async fn refuse(mut tcp: TcpStream, max: u32) {
    let id = crate::request_id::RequestId::new();
    let body = serde_json::json!({
        "type": "urn:wasmgate:problem:too-many-connections",
        "title": "Too many connections",
        "status": 503,
        "detail": format!("the server holds its maximum of {max} open connections; retry shortly"),
        "request_id": id.as_str(),
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\nx-request-id: {id}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match tcp.read(&mut buf).await? {
                0 => break,
                n => head.extend_from_slice(&buf[..n]),
            }
        }
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        while tcp.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
