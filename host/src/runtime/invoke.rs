//! One request through a fresh instance.
//!
//! The guest runs in its own task so it can keep streaming the body after it has handed over the
//! status and headers. Two things bound it: the epoch callback traps it at its deadline even if
//! it never calls the host, and a tokio timeout covers time spent waiting in host calls. Whatever
//! happens, the store (and with it the instance and its pool slot) is dropped when the task ends.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use wasmtime::{PoolConcurrencyLimitError, Store, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::{Function, GuestState};
use crate::body_limit::Exceeded;
use crate::capabilities::RequestCaps;
use crate::request_id::RequestId;

/// Why a request produced no guest response. Details are logged where the failure is detected;
/// callers map the variant to an HTTP problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The guest trapped (panic, unreachable, bad memory access...).
    Trap,
    /// The guest tried to grow its memory past its cap.
    MemoryExceeded,
    /// The deadline passed, in guest code or in a host call.
    Timeout,
    /// The guest returned without setting a response, or set an error code.
    NoResponse,
    /// No instance slot was free.
    Overloaded,
    /// A host-side failure (a bug, not the guest's doing).
    Internal,
}

impl Failure {
    /// Its name in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Trap => "trap",
            Failure::MemoryExceeded => "memory-exceeded",
            Failure::Timeout => "timeout",
            Failure::NoResponse => "no-response",
            Failure::Overloaded => "overloaded",
            Failure::Internal => "internal",
        }
    }
}

pub(super) enum Stage {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

/// How a held run ended: its outcome and the transaction the host held it in, if any.
pub struct Ended {
    pub outcome: Result<(), Failure>,
    pub held: Option<crate::capabilities::db::Released>,
}

/// An instance kept for reuse, with the store it lives in.
pub(super) struct Warm {
    pub(super) store: Store<GuestState>,
    pub(super) exports: Exports,
    /// Requests (or events) it has served.
    pub(super) uses: u32,
}

/// What a kept instance exports: a function is one kind or the other, so its idle instances are
/// all of its kind.
pub(super) enum Exports {
    Http(Proxy),
    Event(super::event::bindings::EventExports),
}

impl Function {
    pub(super) fn new_store(&self, deadline: Instant, caps: RequestCaps) -> Store<GuestState> {
        let f = &self.inner;
        let memory_cap = usize::try_from(f.limits.memory).unwrap_or(usize::MAX);
        let mut store = Store::new(
            f.entry.engine(),
            GuestState::new(memory_cap, deadline, caps, &f.caps),
        );
        store.limiter(|s| s);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if Instant::now() >= state.deadline {
                state.deadline_hit = true;
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Let other requests run on this worker, then check again next tick.
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store
    }

    /// An idle instance, when this function opted in to reuse.
    fn take_warm(&self) -> Option<Warm> {
        if self.inner.limits.instance_reuse == 0 {
            return None;
        }
        self.inner
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    }

    /// An instance's store, readied for a run with `caps` until `deadline`, and what
    /// `exports` takes from it (the export of this function's kind) with its uses so far: an
    /// idle one kept for reuse (when `reuse` and the function opted in), else one made ahead;
    /// or a new store, for the caller to instantiate, when neither is there.
    pub(super) fn warm_or_fresh<E>(
        &self,
        deadline: Instant,
        caps: RequestCaps,
        reuse: bool,
        exports: impl FnOnce(Exports) -> Option<E>,
    ) -> (Store<GuestState>, Option<(E, u32)>) {
        let kept = reuse.then(|| self.take_warm()).flatten();
        if let Some(Warm {
            mut store,
            exports: kept,
            uses,
        }) = kept.or_else(|| self.take_ready())
            && let Some(kept) = exports(kept)
        {
            store.data_mut().reset(deadline, caps);
            return (store, Some((kept, uses)));
        }
        (self.new_store(deadline, caps), None)
    }

    /// Keeps an instance for the next request unless it has served its share or enough are
    /// idle already (each idle instance holds a pool slot).
    pub(super) fn put_warm(&self, warm: Warm) {
        let f = &self.inner;
        if warm.uses >= f.limits.instance_reuse {
            return;
        }
        let mut idle = f
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < super::MAX_IDLE_INSTANCES {
            idle.push(warm);
        }
    }

    /// Runs `req` through an instance of this function (fresh, unless the function opted in to
    /// reuse) and returns its response, whose body the guest may still be writing.
    pub async fn handle<B>(
        &self,
        req: hyper::Request<B>,
        request_id: &RequestId,
    ) -> Result<hyper::Response<GuestBody>, Failure>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let f = &self.inner;
        let deadline = Instant::now() + f.limits.timeout;
        let (store, warm) = self.warm_or_fresh(deadline, f.caps.instance(), true, http_export);
        self.run(store, warm, req, request_id, None).await
    }

    /// Runs `req` in a fresh instance (made ahead or now) with `caps`, never kept for reuse,
    /// and hands what the run left of its database to `ended` when the instance is done: a
    /// host-held transaction (see `RequestDb::hold`) for the caller to commit or roll back.
    pub async fn handle_held<B>(
        &self,
        req: hyper::Request<B>,
        request_id: &RequestId,
        caps: crate::capabilities::RequestCaps,
        ended: oneshot::Sender<Ended>,
    ) -> Result<hyper::Response<GuestBody>, Failure>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let deadline = Instant::now() + self.inner.limits.timeout;
        let (store, warm) = self.warm_or_fresh(deadline, caps, false, http_export);
        self.run(store, warm, req, request_id, Some(ended)).await
    }

    async fn run<B>(
        &self,
        mut store: Store<GuestState>,
        warm: Option<(Proxy, u32)>,
        req: hyper::Request<B>,
        request_id: &RequestId,
        ended: Option<oneshot::Sender<Ended>>,
    ) -> Result<hyper::Response<GuestBody>, Failure>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let f = &self.inner;
        f.runs.increment(1);
        store.set_epoch_deadline(1);

        let (tx, rx) = oneshot::channel();
        let (req, out) = {
            let mut http = store.data_mut().http();
            let scheme = if req
                .extensions()
                .get::<crate::connections::OverTls>()
                .is_some()
            {
                Scheme::Https
            } else {
                Scheme::Http
            };
            let req = http.new_incoming_request(scheme, req);
            let out = http.new_response_outparam(tx);
            match (req, out) {
                (Ok(req), Ok(out)) => (req, out),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(function = %f.name, %request_id, error = %e, "cannot hand the request to the guest");
                    return Err(Failure::Internal);
                }
            }
        };

        let super::Entry::Http(pre) = &f.entry else {
            tracing::error!(function = %f.name, %request_id, "an event function was handed an HTTP request");
            return Err(Failure::Internal);
        };
        let pre = pre.clone();
        let timeout = f.limits.timeout;
        let this = self.clone();
        let id = request_id.clone();
        let running = Running::start(&f.running);
        let (settled, outcome) = oneshot::channel();
        let task = tokio::spawn(async move {
            // Counted until the task ends and its store (the instance and its slot) is dropped.
            let _running = running;
            let mut proxy = None;
            let uses = warm.as_ref().map_or(0, |(_, n)| *n);
            let run = async {
                let p = match warm {
                    Some((p, _)) => p,
                    None => pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(Stage::Instantiate)?,
                };
                let p = proxy.insert(p);
                p.wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
                    .map_err(Stage::Call)
            };
            let result = tokio::time::timeout(timeout, run).await;
            let outcome = this.classify(result, store.data(), &id);
            // Before the store (and with it an unfinished response body) is dropped.
            let _ = settled.send(outcome);
            if let Some(ended) = ended {
                let held = store.data_mut().caps.db.release();
                let _ = ended.send(Ended { outcome, held });
            } else if let (Ok(()), Some(proxy)) = (&outcome, proxy) {
                // Only an instance that finished cleanly may serve again.
                this.put_warm(Warm {
                    store,
                    exports: Exports::Http(proxy),
                    uses: uses + 1,
                });
            }
            outcome
        });

        match rx.await {
            Ok(Ok(resp)) => Ok(resp.map(|body| GuestBody {
                body,
                outcome,
                request_body: None,
                function: self.clone(),
                request_id: request_id.clone(),
                cut: false,
            })),
            Ok(Err(code)) => {
                log_error_code(self, request_id, &code);
                Err(Failure::NoResponse)
            }
            // The guest dropped the out-param: the task has ended (or is ending) and says why.
            Err(_) => match task.await {
                Ok(Err(failure)) => Err(failure),
                Ok(Ok(())) => {
                    tracing::warn!(function = %f.name, %request_id, "guest returned without setting a response");
                    Err(Failure::NoResponse)
                }
                Err(e) => {
                    tracing::error!(function = %f.name, %request_id, error = %e, "guest task panicked");
                    Err(Failure::Internal)
                }
            },
        }
    }

    /// Names the cause of a failed run and logs it once, with the details that stay out of the
    /// response.
    pub(super) fn classify(
        &self,
        result: Result<Result<(), Stage>, tokio::time::error::Elapsed>,
        state: &GuestState,
        request_id: &RequestId,
    ) -> Result<(), Failure> {
        let name = &self.inner.name;
        let guest_stdout = state.stdout.take().for_log();
        if let Some(guest_stdout) = &guest_stdout {
            tracing::info!(function = %name, %request_id, guest_stdout, "guest wrote to stdout");
        }
        let guest_stderr = state.stderr.take().for_log().unwrap_or_default();
        let (failure, error) = match result {
            Ok(Ok(())) => {
                if !guest_stderr.is_empty() {
                    tracing::info!(function = %name, %request_id, ?guest_stderr, "guest wrote to stderr");
                }
                return Ok(());
            }
            Err(_) => (Failure::Timeout, None),
            Ok(Err(Stage::Instantiate(e)))
                if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() =>
            {
                (Failure::Overloaded, Some(e))
            }
            Ok(Err(Stage::Instantiate(e) | Stage::Call(e))) => {
                let failure = if state.deadline_hit {
                    Failure::Timeout
                } else if state.memory_exceeded {
                    Failure::MemoryExceeded
                } else {
                    Failure::Trap
                };
                (failure, Some(e))
            }
        };
        match (&failure, error) {
            (Failure::Timeout, _) => {
                tracing::warn!(function = %name, %request_id, timeout = ?self.inner.limits.timeout, ?guest_stderr, "function timed out")
            }
            (Failure::Overloaded, e) => {
                tracing::warn!(function = %name, %request_id, error = ?e, "no instance slot free")
            }
            (_, Some(e)) => {
                tracing::warn!(function = %name, %request_id, cause = ?failure, ?guest_stderr, error = ?e, "function failed")
            }
            (_, None) => {}
        }
        Err(failure)
    }
}

/// A guest's response body that ends cleanly only if its run did and its request body was
/// whole. Once the head is sent, a trap, a timeout or a request body past `max_body` can no
/// longer change the status; so the body ends with an error instead, and the client sees a
/// failed response (HTTP/1.1: the connection closes before the body's end; HTTP/2: the stream
/// is reset), never a complete-looking short one. Without this, a trap mid-body and a guest
/// whose copy of its request body failed at the limit both ended the response cleanly.
pub struct GuestBody {
    body: HyperOutgoingBody,
    /// The run's outcome, sent before its store is dropped: a body that ends because the store
    /// went (trap, timeout) finds the failure here.
    outcome: oneshot::Receiver<Result<(), Failure>>,
    request_body: Option<Exceeded>,
    function: Function,
    request_id: RequestId,
    /// Cut already: nothing more goes out.
    cut: bool,
}

impl GuestBody {
    /// Also cut the response if the request body goes over its limit.
    pub fn watching(mut self, request_body: Exceeded) -> Self {
        self.request_body = Some(request_body);
        self
    }

    /// Why the response must not end cleanly, if it must not. `failed`: the guest's body itself
    /// ended with an error (it aborted it), which is then only named.
    fn cut(&mut self, at_end: bool, failed: bool) -> Option<&'static str> {
        if self.request_body.as_ref().is_some_and(Exceeded::get) {
            return Some("body-too-large");
        }
        if failed {
            return Some("aborted");
        }
        if !at_end {
            return None;
        }
        match self.outcome.try_recv() {
            // Still running: the guest finished its body and has not returned yet.
            Ok(Ok(())) | Err(oneshot::error::TryRecvError::Empty) => None,
            Ok(Err(failure)) => Some(failure.name()),
            Err(oneshot::error::TryRecvError::Closed) => Some(Failure::Internal.name()),
        }
    }
}

impl Body for GuestBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.cut {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        let at_end = !matches!(&frame, Some(Ok(f)) if f.is_data());
        let failed = matches!(&frame, Some(Err(_)));
        match this.cut(at_end, failed) {
            None => Poll::Ready(frame),
            Some(cause) => {
                let f = &this.function.inner;
                tracing::warn!(function = %f.name, request_id = %this.request_id, cause, "response cut after its head was sent");
                metrics::counter!("wasmgate_responses_cut_total",
                    "function" => f.name.clone(), "cause" => cause)
                .increment(1);
                this.cut = true;
                Poll::Ready(Some(Err(match frame {
                    Some(Err(e)) => e,
                    _ => wasmtime_wasi_http::Error::HttpResponseIncomplete,
                })))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // The end is where the checks run: never let hyper skip the last poll.
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn http_export(e: Exports) -> Option<Proxy> {
    match e {
        Exports::Http(proxy) => Some(proxy),
        Exports::Event(_) => None,
    }
}

/// One running instance in `wasmgate_instances_running`, until dropped.
pub(super) struct Running(metrics::Gauge);

impl Running {
    pub(super) fn start(gauge: &metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn log_error_code(f: &Function, request_id: &RequestId, code: &ErrorCode) {
    tracing::warn!(function = %f.inner.name, %request_id, error = ?code, "guest answered with an error instead of a response");
}
