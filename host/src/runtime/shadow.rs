//! A run whose side effects go nowhere: what shadow traffic runs a candidate version with.
//!
//! The guest gets the capabilities it is granted, but none of them reaches what live requests
//! share (see `FunctionCaps::shadow`): its database work runs inside a transaction the host
//! opens before the guest starts and rolls back after the instance is gone, whatever the guest
//! committed (its transactions are savepoints of that one). The response is read to its end
//! and only its status and sha256 are kept.

use bytes::Bytes;
use http::StatusCode;
use http_body::Body;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::{Failure, Function};
use crate::request_id::RequestId;

/// What a shadow run answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub sha256: [u8; 32],
}

impl Function {
    /// Runs `req` with every side effect held back, and rolls its database work back.
    pub async fn shadow<B>(&self, req: hyper::Request<B>, id: &RequestId) -> Result<Answer, Failure>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let mut caps = self.inner.caps.shadow();
        if self.imports().contains(&"db")
            && let Err(e) = caps.db.hold().await
        {
            tracing::warn!(function = %self.name(), request_id = %id, error = ?e, "shadow run skipped: no database transaction");
            return Err(Failure::Internal);
        }
        let (ended_tx, ended) = oneshot::channel();
        let answer = match self.handle_held(req, id, caps, ended_tx).await {
            Ok(resp) => {
                let status = resp.status();
                let mut body = resp.into_body();
                let mut hash = Sha256::new();
                let mut complete = true;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => {
                            if let Some(data) = frame.data_ref() {
                                hash.update(data);
                            }
                        }
                        Err(_) => {
                            complete = false;
                            break;
                        }
                    }
                }
                if complete {
                    Ok(Answer {
                        status,
                        sha256: hash.finalize().into(),
                    })
                } else {
                    Err(Failure::NoResponse)
                }
            }
            Err(failure) => Err(failure),
        };
        // The instance is gone once `ended` answers (or its task was dropped, and the
        // transaction with it, which rolls back too).
        if let Ok(ended) = ended.await
            && let Some(held) = ended.held
            && let Err(e) = held.tx.rollback().await
        {
            tracing::warn!(function = %self.name(), request_id = %id, error = ?e, "shadow transaction rollback failed");
        }
        answer
    }
}
