//! Event functions: components that export `wasmgate:platform/event-handler` instead of
//! `wasi:http/incoming-handler`. One event runs in a fresh instance, with the same limits and
//! deadline as a request, inside a transaction the host holds (see `RequestDb::hold`).

use std::time::Instant;

use tokio::sync::oneshot;

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

    /// Runs `event` through a fresh instance with `caps` and hands what the run left of its
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
        let mut store = self.new_store(deadline, caps);
        store.set_epoch_deadline(1);
        let pre = pre.clone();
        let timeout = f.limits.timeout;
        let this = self.clone();
        let task_id = id.clone();
        let running = super::invoke::Running::start(&f.running);
        let task = tokio::spawn(async move {
            let _running = running;
            let run = async {
                let exports = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(super::invoke::Stage::Instantiate)?;
                exports
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

    /// The `tally` fixture (built by `scripts/build-functions`) handles events in a transaction
    /// the host holds: its writes are there when the host commits, gone when it rolls back,
    /// and its verdicts (retry, reject) reach the host.
    #[tokio::test]
    async fn an_event_function_runs_in_the_transaction_the_host_holds() {
        let dir = tempfile::tempdir().expect("tmp");
        let runtime = Runtime::new(&RuntimeOptions {
            max_instances: 4,
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
            instance_reuse: 0,
        };
        let caps = backends.configure("tally");
        let f = runtime
            .load("tally", &wasm, limits, &grants, caps.clone())
            .expect("load");
        assert!(f.is_event_function());

        // Runs one event held in a transaction; commits only when `commit` and the handler said ok.
        let run = |event: Delivery, commit: bool| {
            let (f, caps) = (f.clone(), caps.clone());
            async move {
                let mut request = caps.instance();
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
        };
        let total = || async {
            let rows = backends
                .db
                .backend()
                .query("SELECT total FROM tally_totals WHERE key = 'k'", vec![])
                .await
                .expect("query");
            rows.rows.first().and_then(|r| r[0].int())
        };

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
}
