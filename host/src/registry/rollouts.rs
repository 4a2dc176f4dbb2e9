//! Rollouts in the registry: a plan that moves a function's traffic to a candidate version step
//! by step (see `rollout`), stored so a restart or another replica continues it.
//!
//! Every change a driver makes is fenced: the row carries a counter that a driver bumps when it
//! takes the rollout over, and each of its changes (in the same transaction as the deployment
//! it sets) requires the counter to still be its own and the step to be the one it judged. A
//! driver whose lease lapsed, or that judged a step another already moved past, changes nothing.

use super::{Guard, Registry, RegistryError, Result, Spec, now_ms};
use crate::capabilities::db::{Value, read_again};

pub(super) const DDL: &str = "CREATE TABLE wasmgate_rollouts (
       id TEXT PRIMARY KEY,
       function TEXT NOT NULL,
       candidate TEXT NOT NULL,
       baseline TEXT NOT NULL,
       plan TEXT NOT NULL,
       state TEXT NOT NULL,
       step BIGINT NOT NULL,
       step_started_at BIGINT NOT NULL,
       fence BIGINT NOT NULL,
       generation BIGINT NOT NULL,
       last TEXT NOT NULL,
       created_by TEXT NOT NULL,
       created_at BIGINT NOT NULL,
       updated_at BIGINT NOT NULL
     );
     CREATE UNIQUE INDEX wasmgate_rollouts_running ON wasmgate_rollouts (function) WHERE state = 'running';
     CREATE INDEX wasmgate_rollouts_function ON wasmgate_rollouts (function, created_at)";

/// The rollout is moving traffic; the others are final.
pub const RUNNING: &str = "running";
pub const PROMOTED: &str = "promoted";
pub const ROLLED_BACK: &str = "rolled-back";
pub const ABORTED: &str = "aborted";

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    pub id: String,
    pub function: String,
    pub candidate: String,
    pub baseline: String,
    /// The plan (steps, interval, gates) as JSON; `rollout::Plan` reads it.
    pub plan: String,
    pub state: String,
    /// Index of the current step in the plan's steps.
    pub step: i64,
    /// When the current step's traffic was set (ms): its gates judge figures from then on.
    pub step_started_at: i64,
    /// Bumped by each driver that takes the rollout over; its changes require it unchanged.
    pub fence: i64,
    /// The deployment generation the rollout last set; a different live one means an operator
    /// changed the traffic by hand.
    pub generation: i64,
    /// The last judgement, for people: why it holds, what passed, why it failed.
    pub last: String,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a driver changes of a rollout after judging its step.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutChange {
    pub state: &'static str,
    pub step: i64,
    pub step_started_at: i64,
    pub last: String,
    /// The traffic it sets, with the history's reason (none: the deployment stays).
    pub deployment: Option<(Spec, String)>,
}

const COLUMNS: &str = "id, function, candidate, baseline, plan, state, step, step_started_at, fence, generation, last, created_by, created_at, updated_at";

fn row_of(r: &[Value]) -> RolloutRow {
    let int = |v: &Value| v.int().unwrap_or(0);
    RolloutRow {
        id: r[0].text(),
        function: r[1].text(),
        candidate: r[2].text(),
        baseline: r[3].text(),
        plan: r[4].text(),
        state: r[5].text(),
        step: int(&r[6]),
        step_started_at: int(&r[7]),
        fence: int(&r[8]),
        generation: int(&r[9]),
        last: r[10].text(),
        created_by: r[11].text(),
        created_at: int(&r[12]),
        updated_at: int(&r[13]),
    }
}

impl Registry {
    /// Records `row` as `function`'s running rollout and sets its first step's traffic (`spec`)
    /// in one transaction, if the live deployment is still at `expected` and no other rollout of
    /// the function runs. `row.generation` is ignored: the new generation is stored.
    pub async fn start_rollout(
        &self,
        row: &RolloutRow,
        expected: i64,
        spec: &Spec,
        reason: &str,
    ) -> Result<i64> {
        let insert = Guard {
            sql: format!(
                "INSERT INTO wasmgate_rollouts ({COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 WHERE NOT EXISTS (SELECT 1 FROM wasmgate_rollouts WHERE function = $2 AND state = '{RUNNING}')"
            ),
            params: vec![
                Value::Text(row.id.clone()),
                Value::Text(row.function.clone()),
                Value::Text(row.candidate.clone()),
                Value::Text(row.baseline.clone()),
                Value::Text(row.plan.clone()),
                Value::Text(RUNNING.into()),
                Value::Int64(0),
                Value::Int64(row.step_started_at),
                Value::Int64(0),
                Value::Int64(expected + 1),
                Value::Text(row.last.clone()),
                Value::Text(row.created_by.clone()),
                Value::Int64(row.created_at),
                Value::Int64(row.created_at),
            ],
            refusal: format!(
                "a rollout of {} is already running; abort it first",
                row.function
            ),
        };
        self.change(
            &row.function,
            Some(expected),
            spec,
            &row.created_by,
            reason,
            vec![insert],
        )
        .await
    }

    /// The function's rollouts, newest first.
    pub async fn rollouts(&self, function: &str) -> Result<Vec<RolloutRow>> {
        let rows = read_again(
                &*self.db,
                &format!("SELECT {COLUMNS} FROM wasmgate_rollouts WHERE function = $1 ORDER BY created_at DESC, id"),
                vec![Value::Text(function.into())],
            )
            .await?;
        Ok(rows.rows.iter().map(|r| row_of(r)).collect())
    }

    /// Every running rollout (what drivers look for).
    pub async fn running_rollouts(&self) -> Result<Vec<RolloutRow>> {
        let rows = read_again(
            &*self.db,
            &format!("SELECT {COLUMNS} FROM wasmgate_rollouts WHERE state = $1 ORDER BY function"),
            vec![Value::Text(RUNNING.into())],
        )
        .await?;
        Ok(rows.rows.iter().map(|r| row_of(r)).collect())
    }

    /// Takes a running rollout over from whoever drove it (having seen fence `seen`): returns
    /// the new fence the taker's changes must carry, or `None` if someone else took it first or
    /// it ended.
    pub async fn claim_rollout(&self, id: &str, seen: i64) -> Result<Option<i64>> {
        let changed = self
            .db
            .execute(
                "UPDATE wasmgate_rollouts SET fence = $1 WHERE id = $2 AND fence = $3 AND state = $4",
                vec![
                    Value::Int64(seen + 1),
                    Value::Text(id.into()),
                    Value::Int64(seen),
                    Value::Text(RUNNING.into()),
                ],
            )
            .await?;
        Ok((changed == 1).then_some(seen + 1))
    }

    /// Applies a driver's judgement of `row`'s current step, fenced by `fence`: refused
    /// ([`RegistryError::Refused`]) if another driver took over, the step moved, or the rollout
    /// ended; [`RegistryError::Stale`] if the deployment was changed by hand since the rollout
    /// set it. Returns the deployment's generation afterwards.
    pub async fn advance_rollout(
        &self,
        row: &RolloutRow,
        fence: i64,
        change: &RolloutChange,
        actor: &str,
    ) -> Result<i64> {
        let generation = row.generation + i64::from(change.deployment.is_some());
        let update = Guard {
            sql: "UPDATE wasmgate_rollouts SET state = $1, step = $2, step_started_at = $3, last = $4, generation = $5, updated_at = $6 WHERE id = $7 AND fence = $8 AND step = $9 AND state = $10".into(),
            params: vec![
                Value::Text(change.state.into()),
                Value::Int64(change.step),
                Value::Int64(change.step_started_at),
                Value::Text(change.last.clone()),
                Value::Int64(generation),
                Value::Int64(now_ms()),
                Value::Text(row.id.clone()),
                Value::Int64(fence),
                Value::Int64(row.step),
                Value::Text(RUNNING.into()),
            ],
            refusal: format!(
                "rollout {} is no longer at step {} under this driver",
                row.id, row.step
            ),
        };
        match &change.deployment {
            Some((spec, reason)) => {
                self.change(
                    &row.function,
                    Some(row.generation),
                    spec,
                    actor,
                    reason,
                    vec![update],
                )
                .await
            }
            None => {
                if self.db.execute(&update.sql, update.params).await? == 0 {
                    return Err(RegistryError::Refused(update.refusal));
                }
                Ok(generation)
            }
        }
    }

    /// Ends `function`'s running rollout as `state` without a driver (an operator's abort, or a
    /// deployment changed by hand), bumping the fence so no driver changes it afterwards. Returns
    /// the rollout as it was, or `None` if none was running.
    pub async fn end_rollout(
        &self,
        function: &str,
        state: &'static str,
        last: &str,
    ) -> Result<Option<RolloutRow>> {
        let Some(row) = self
            .rollouts(function)
            .await?
            .into_iter()
            .find(|r| r.state == RUNNING)
        else {
            return Ok(None);
        };
        let changed = self
            .db
            .execute(
                "UPDATE wasmgate_rollouts SET state = $1, last = $2, fence = fence + 1, updated_at = $3 WHERE id = $4 AND state = $5",
                vec![
                    Value::Text(state.into()),
                    Value::Text(last.into()),
                    Value::Int64(now_ms()),
                    Value::Text(row.id.clone()),
                    Value::Text(RUNNING.into()),
                ],
            )
            .await?;
        Ok((changed == 1).then_some(row))
    }
}
