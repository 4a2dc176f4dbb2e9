//! Event functions: components that export `wasmgate:platform/event-handler` instead of
//! `wasi:http/incoming-handler`. One event runs with the same limits and deadline as a request,
//! inside a transaction the host holds (see `RequestDb::hold`), in a fresh instance unless the
//! function opted in to `instance_reuse` as HTTP functions do: then an instance that finished an
//! event cleanly (whatever the handler's verdict) serves the next, its capabilities, deadline and
//! held transaction renewed, its own memory carried over.

use std::time::Instant;

use tokio::sync::oneshot;

use super::invoke::{Exports, Warm};
use super::{Ended, Failure, Function};
use crate::capabilities::RequestCaps;
use crate::request_id::RequestId;

/// Host bindings of what an event function exports.
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasmgate:platform/event-exports",
        exports: { default: async },
        additional_derives: [PartialEq],
    });
}

pub(crate) use bindings::EventExportsPre;
pub use bindings::exports::wasmgate::platform::event_handler::{Delivery, HandlerError};

impl Function {
    /// Whether this version is an event function (else it is an HTTP function).
    pub fn is_event_function(&self) -> bool {
        matches!(self.inner.entry, super::Entry::Event(_))
    }

    /// Runs `event` through an instance with `caps` and hands what the run left of its
    /// database (the held transaction) to `ended`, for the caller to commit or roll back. The
    /// handler's own verdict is the inner result.
    pub async fn handle_event(
        &self,
        event: Delivery,
        id: &RequestId,
        caps: RequestCaps,
        ended: oneshot::Sender<Ended>,
    ) -> Result<Result<(), HandlerError>, Failure> {
        let f = &self.inner;
        let super::Entry::Event(pre) = &f.entry else {
            tracing::error!(function = %f.name, "an HTTP function was handed an event");
            return Err(Failure::Internal);
        };
        f.runs.increment(1);
        let deadline = Instant::now() + f.limits.timeout;
        let (mut store, warm) = self.warm_or_fresh(deadline, caps, true, |e| match e {
            Exports::Event(exports) => Some(exports),
            Exports::Http(_) => None,
        });
        store.set_epoch_deadline(1);
        let pre = pre.clone();
        let timeout = f.limits.timeout;
        let this = self.clone();
        let task_id = id.clone();
        let running = super::invoke::Running::start(&f.running);
        let task = tokio::spawn(async move {
            let _running = running;
            let mut kept = None;
            let uses = warm.as_ref().map_or(0, |(_, n)| *n);
            let run = async {
                let exports = match warm {
                    Some((exports, _)) => exports,
                    None => pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(super::invoke::Stage::Instantiate)?,
                };
                kept.insert(exports)
                    .wasmgate_platform_event_handler()
                    .call_handle(&mut store, &event)
                    .await
                    .map_err(super::invoke::Stage::Call)
            };
            let result = tokio::time::timeout(timeout, run).await;
            let verdict = match &result {
                Ok(Ok(verdict)) => Some(verdict.clone()),
                _ => None,
            };
            let outcome = this.classify(result.map(|r| r.map(|_| ())), store.data(), &task_id);
            let held = store.data_mut().caps.db.release();
            let _ = ended.send(Ended { outcome, held });
            if let (Ok(()), Some(exports)) = (&outcome, kept) {
                // Only an instance that finished cleanly may serve again.
                this.put_warm(Warm {
                    store,
                    exports: Exports::Event(exports),
                    uses: uses + 1,
                });
            }
            match (outcome, verdict) {
                (Ok(()), Some(verdict)) => Ok(verdict),
                (Err(failure), _) => Err(failure),
                (Ok(()), None) => Err(Failure::Internal),
            }
        });
        match task.await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(function = %self.name(), request_id = %id, error = %e, "event task panicked");
                Err(Failure::Internal)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::capabilities::db::Value;
    use crate::capabilities::{Backends, BackendsConfig, Capability, Grants};
    use crate::runtime::{Limits, Runtime, RuntimeOptions};

    fn delivery(key: &str, sequence: u64, payload: &str) -> Delivery {
        Delivery {
            id: crate::capabilities::events::outbox::new_id(),
            topic: "tally".into(),
            key: key.into(),
            sequence,
            payload: payload.as_bytes().to_vec(),
            headers: vec![],
            source: "test".into(),
            published_at: 1,
            attempt: 1,
        }
    }

    /// The `tally` fixture (built by `scripts/build-functions`), loaded with `instance_reuse`,
    /// and the embedded backends it writes to.
    async fn tally(instance_reuse: u32) -> (Function, Backends, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tmp");
        let runtime = Runtime::new(&RuntimeOptions {
            max_instances: 4,
            warm_instances: 2,
            component_limits: Default::default(),
            max_memory: 64 * 1024 * 1024,
            cache_dir: dir.path().join("cache"),
        })
        .expect("runtime");
        let backends = Backends::connect(&BackendsConfig {
            database_url: format!("sqlite://{}", dir.path().join("db.sqlite").display()),
            redis_url: None,
        })
        .await
        .expect("backends");
        let wasm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions/dist/tally.wasm");
        assert!(wasm.exists(), "run scripts/build-functions first");
        let grants: Grants = [Capability::Db].into_iter().collect();
        let limits = Limits {
            timeout: Duration::from_secs(5),
            memory: 32 * 1024 * 1024,
            max_body: 1024,
            instance_reuse,
        };
        let f = runtime
            .load("tally", &wasm, limits, &grants, backends.configure("tally"))
            .expect("load");
        assert!(f.is_event_function());
        (f, backends, dir)
    }

    /// Runs one event held in a transaction; commits only when `commit` and the handler said ok.
    async fn run(
        f: &Function,
        event: Delivery,
        commit: bool,
    ) -> Result<Result<(), HandlerError>, Failure> {
        let mut request = f.inner.caps.instance();
        request.db.hold().await.expect("hold");
        let (ended_tx, ended) = oneshot::channel();
        let verdict = f
            .handle_event(event, &RequestId::new(), request, ended_tx)
            .await;
        let ended = ended.await.expect("ended");
        let tx = ended.held.expect("the held transaction comes back").tx;
        if commit && matches!(verdict, Ok(Ok(()))) {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
        verdict
    }

    async fn total(backends: &Backends) -> Option<i64> {
        let rows = backends
            .db
            .backend()
            .query("SELECT total FROM tally_totals WHERE key = 'k'", vec![])
            .await
            .expect("query");
        rows.rows.first().and_then(|r| r[0].int())
    }

    fn idle(f: &Function) -> usize {
        f.inner.idle.lock().expect("idle").len()
    }

    /// The handler's writes are there when the host commits, gone when it rolls back, and its
    /// verdicts (retry, reject) reach the host.
    #[tokio::test]
    async fn an_event_function_runs_in_the_transaction_the_host_holds() {
        let (f, backends, _dir) = tally(0).await;
        let run = |event, commit| run(&f, event, commit);
        let total = || total(&backends);
        assert_eq!(run(delivery("k", 1, "5"), true).await, Ok(Ok(())));
        assert_eq!(total().await, Some(5));
        // Handled, but the host rolled back: as if it never ran.
        assert_eq!(run(delivery("k", 2, "7"), false).await, Ok(Ok(())));
        assert_eq!(total().await, Some(5));
        assert_eq!(
            run(delivery("k", 2, "fail"), true).await,
            Ok(Err(HandlerError::Retry("asked to fail".into())))
        );
        assert!(matches!(
            run(delivery("k", 2, "poison"), true).await,
            Ok(Err(HandlerError::Reject(_)))
        ));
        assert_eq!(run(delivery("k", 2, "7"), true).await, Ok(Ok(())));
        assert_eq!(total().await, Some(12));
        let applied = backends
            .db
            .backend()
            .query("SELECT count(*) FROM tally_applied", vec![])
            .await
            .expect("query");
        assert_eq!(applied.rows[0][0], Value::Int64(2));
    }

    /// With `instance_reuse = 2` one instance handles two events, each in the transaction held
    /// for it (a rolled-back event leaves nothing behind for the next), whatever the handler's
    /// verdict; then it is dropped and a fresh one takes over.
    #[tokio::test]
    async fn an_opted_in_event_function_reuses_its_instance_with_each_events_transaction() {
        let (f, backends, _dir) = tally(2).await;
        assert_eq!(run(&f, delivery("k", 1, "5"), true).await, Ok(Ok(())));
        assert_eq!(idle(&f), 1, "kept after its first event");
        // The second event on the same instance: handled, rolled back.
        assert_eq!(run(&f, delivery("k", 2, "7"), false).await, Ok(Ok(())));
        assert_eq!(idle(&f), 0, "dropped after its second");
        assert_eq!(total(&backends).await, Some(5));
        assert_eq!(
            run(&f, delivery("k", 2, "fail"), true).await,
            Ok(Err(HandlerError::Retry("asked to fail".into())))
        );
        assert_eq!(idle(&f), 1, "a handler's own error is a clean finish");
        assert_eq!(run(&f, delivery("k", 2, "7"), true).await, Ok(Ok(())));
        assert_eq!(total(&backends).await, Some(12));
    }
}
