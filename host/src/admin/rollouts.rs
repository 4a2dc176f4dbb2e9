//! The admin API's rollouts (`/admin/v1/functions/{function}/rollout`):
//! - `POST`: start one (`{"version", "steps", "interval", "gates", "reason"}`; the live
//!   deployment must put one version at 100%: that is the baseline). 201 with its state.
//! - `GET`: the running rollout, or the last one, with the figures of the current step.
//! - `DELETE`: abort the running one; the traffic goes back to the baseline.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::{Admin, Answer, Failure, actor, apply, function_config, json_body, live_deployment};
use crate::registry::{ABORTED, RUNNING, RolloutRow};
use crate::rollout::{DEFAULT_INTERVAL, DEFAULT_STEPS, Gates, Plan, describe, only};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    version: String,
    steps: Option<Vec<u32>>,
    /// "30s", "2m".
    interval: Option<String>,
    #[serde(default)]
    gates: Gates,
    reason: Option<String>,
}

fn invalid(detail: String) -> Failure {
    Failure(StatusCode::BAD_REQUEST, "invalid", detail)
}

impl StartRequest {
    /// Its `interval`, read (the default when it has none).
    fn interval(&self) -> Result<std::time::Duration, Failure> {
        match &self.interval {
            Some(i) => crate::config::parse_duration(i).map_err(invalid),
            None => Ok(DEFAULT_INTERVAL),
        }
    }

    /// The plan it asks for, at `interval` (from [`Self::interval`]) with the deployment's
    /// `sticky` key, checked.
    fn plan(&self, interval: std::time::Duration, sticky: Option<String>) -> Result<Plan, Failure> {
        let plan = Plan {
            steps: self.steps.clone().unwrap_or(DEFAULT_STEPS.to_vec()),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            gates: self.gates.clone(),
            sticky,
        };
        plan.check().map_err(invalid)?;
        Ok(plan)
    }
}

pub(super) async fn start(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Answer {
    function_config(&admin, &function)?;
    let req: StartRequest = json_body(&body)?;
    let interval = req.interval()?;
    let registry = admin.deployer.registry();
    let live = live_deployment(&admin, &function).await?;
    let full: Vec<&str> = live
        .spec
        .versions
        .iter()
        .filter(|w| w.weight == 100)
        .map(|w| w.label.as_str())
        .collect();
    let [baseline] = full.as_slice() else {
        return Err(Failure(
            StatusCode::CONFLICT,
            "split-traffic",
            format!(
                "`{function}` splits its traffic; put one version at 100% (the baseline) before a rollout"
            ),
        ));
    };
    let baseline = baseline.to_string();
    if req.version == baseline {
        return Err(invalid(format!(
            "{} already takes all of `{function}`'s traffic",
            req.version
        )));
    }
    if !registry
        .versions(&function)
        .await?
        .iter()
        .any(|v| v.label == req.version)
    {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("version {} of {function} not found", req.version),
        ));
    }
    let plan = req.plan(interval, live.spec.sticky.clone())?;
    let who = actor(&headers);
    let now = crate::auth::now_ms();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let first = plan.step_name(0, &req.version);
    let row = RolloutRow {
        id: id.clone(),
        function: function.clone(),
        candidate: req.version.clone(),
        baseline: baseline.clone(),
        plan: serde_json::to_string(&plan).expect("a plan serializes"),
        state: RUNNING.into(),
        step: 0,
        step_started_at: now,
        fence: 0,
        generation: 0,
        last: format!("started at {first}"),
        created_by: who.clone(),
        created_at: now,
        updated_at: now,
    };
    let reason = format!(
        "rollout {id} of {} from {baseline}: {first}{}",
        req.version,
        req.reason.map(|r| format!(" ({r})")).unwrap_or_default()
    );
    let generation = registry
        .start_rollout(
            &row,
            live.generation,
            &plan.spec(0, &baseline, &req.version),
            &reason,
        )
        .await?;
    if let Err(e) = apply(&admin, &function, &who).await {
        let _ = registry
            .end_rollout(&function, ABORTED, "the first step could not be served")
            .await;
        return Err(e);
    }
    admin.deployer.announce(&function, generation).await;
    let view = view(&admin, &function).await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// The running rollout of `function`, or its last one, as JSON.
async fn view(admin: &Admin, function: &str) -> Result<serde_json::Value, Failure> {
    let registry = admin.deployer.registry();
    let rollouts = registry.rollouts(function).await?;
    let row = rollouts
        .iter()
        .find(|r| r.state == RUNNING)
        .or(rollouts.first())
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("`{function}` has had no rollout"),
            )
        })?;
    let plan: Plan = serde_json::from_str(&row.plan).map_err(|e| {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("rollout plan: {e}"),
        )
    })?;
    let figures = registry
        .figures(function, crate::rollout::window_start(row.step_started_at))
        .await?;
    let step_figures = |label: &str| {
        let f = figures.get(label).cloned().unwrap_or_default();
        serde_json::json!({
            "label": label,
            "requests": f.requests,
            "failed": f.failed,
            "refused": f.refused,
            "success_percent": f.success_percent(),
            "p99_ms": f.quantile_ms(0.99),
            "summary": describe(label, &f),
        })
    };
    let index = usize::try_from(row.step).unwrap_or(0);
    Ok(serde_json::json!({
        "id": row.id,
        "function": row.function,
        "candidate": row.candidate,
        "baseline": row.baseline,
        "state": row.state,
        "step": index + 1,
        "steps": plan.steps,
        "weight": plan.steps.get(index),
        "interval_ms": plan.interval_ms,
        "gates": plan.gates,
        "step_started_at": row.step_started_at,
        "last": row.last,
        "this_step": [step_figures(&row.candidate), step_figures(&row.baseline)],
        "created_by": row.created_by,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }))
}

pub(super) async fn status(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
) -> Answer {
    function_config(&admin, &function)?;
    Ok(axum::Json(view(&admin, &function).await?).into_response())
}

pub(super) async fn abort(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
    headers: HeaderMap,
) -> Answer {
    function_config(&admin, &function)?;
    let who = actor(&headers);
    let registry = admin.deployer.registry();
    let Some(row) = registry
        .end_rollout(&function, ABORTED, &format!("aborted by {who}"))
        .await?
    else {
        return Err(Failure(
            StatusCode::CONFLICT,
            "no-rollout",
            format!("no rollout of `{function}` is running"),
        ));
    };
    let plan: Option<Plan> = serde_json::from_str(&row.plan).ok();
    let live = registry.deployment(&function).await?.map(|d| d.generation);
    let generation = registry
        .set_deployment(
            &function,
            live,
            &only(&row.baseline, plan.and_then(|p| p.sticky)),
            &who,
            &format!(
                "rollout {} of {} aborted: back to {}",
                row.id, row.candidate, row.baseline
            ),
        )
        .await?;
    apply(&admin, &function, &who).await?;
    admin.deployer.announce(&function, generation).await;
    Ok(axum::Json(view(&admin, &function).await?).into_response())
}

/// A change an operator made by hand ends the function's running rollout (it no longer owns the
/// traffic).
pub(super) async fn superseded(admin: &Admin, function: &str, generation: i64) {
    let why = format!("stopped: the traffic was set by hand (generation {generation})");
    if let Err(e) = admin
        .deployer
        .registry()
        .end_rollout(function, ABORTED, &why)
        .await
    {
        tracing::warn!(error = %e, function, "a running rollout could not be stopped; its driver stops it");
    }
}

/// A rollout's JSON body, read and checked as [`start`] does before it looks at the registry.
pub(super) fn fuzz_start(body: &[u8]) {
    if let Ok(req) = json_body::<StartRequest>(body)
        && let Ok(interval) = req.interval()
    {
        let _ = req.plan(interval, None);
    }
}
