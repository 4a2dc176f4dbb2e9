//! The admin API's shadow traffic (`/admin/v1/functions/{function}/shadow`):
//! - `PUT`: copy a share of the function's requests to a version (`{"version", "percent",
//!   "reason"}`); the version joins the deployment at 0% if it is not in it. Refused while a
//!   rollout runs (it owns the traffic) and for a version held for approval.
//! - `GET`: the shadow and, per route, how its runs compared with the live responses since it
//!   started (every process), with request ids of mismatches.
//! - `DELETE`: stop it.
//!
//! A shadow is part of the deployment (a new generation, in the history), so every replica
//! runs it; it ends when its version leaves the deployment or a rollout starts.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::{Admin, Answer, Failure, actor, apply, function_config, json_body, live_deployment};
use crate::registry::{DeploymentRow, MAX_VERSIONS_PER_DEPLOYMENT, RUNNING, Shadow, Weighted};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowRequest {
    version: String,
    percent: u32,
    reason: Option<String>,
}

async fn no_rollout(admin: &Admin, function: &str) -> Result<(), Failure> {
    let rollouts = admin.deployer.registry().rollouts(function).await?;
    match rollouts.iter().find(|r| r.state == RUNNING) {
        Some(r) => Err(Failure(
            StatusCode::CONFLICT,
            "rollout-running",
            format!(
                "rollout {} of {} owns `{function}`'s traffic; wait for it or abort it first",
                r.id, r.candidate
            ),
        )),
        None => Ok(()),
    }
}

pub(super) async fn start(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Answer {
    function_config(&admin, &function)?;
    let req: ShadowRequest = json_body(&body)?;
    no_rollout(&admin, &function).await?;
    let live = live_deployment(&admin, &function).await?;
    let mut spec = live.spec.clone();
    if spec
        .versions
        .iter()
        .any(|w| w.label == req.version && w.weight == 100)
    {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "{} takes all of `{function}`'s traffic: there is nothing to compare it with",
                req.version
            ),
        ));
    }
    if !spec.versions.iter().any(|w| w.label == req.version) {
        if spec.versions.len() >= MAX_VERSIONS_PER_DEPLOYMENT {
            return Err(Failure(
                StatusCode::CONFLICT,
                "too-many-versions",
                format!(
                    "`{function}` already splits its traffic between {MAX_VERSIONS_PER_DEPLOYMENT} versions; remove one first"
                ),
            ));
        }
        spec.versions.push(Weighted {
            label: req.version.clone(),
            weight: 0,
        });
    }
    spec.shadow = Some(Shadow {
        label: req.version.clone(),
        percent: req.percent,
        since: crate::auth::now_ms(),
    });
    let who = actor(&headers);
    let reason = format!(
        "shadow {}% of requests on {}{}",
        req.percent,
        req.version,
        req.reason.map(|r| format!(" ({r})")).unwrap_or_default()
    );
    change(&admin, &function, &live, &spec, &who, &reason).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(view(&admin, &function).await?),
    )
        .into_response())
}

pub(super) async fn stop(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
    headers: HeaderMap,
) -> Answer {
    function_config(&admin, &function)?;
    let live = live_deployment(&admin, &function).await?;
    let Some(shadow) = &live.spec.shadow else {
        return Err(Failure(
            StatusCode::CONFLICT,
            "no-shadow",
            format!("`{function}` has no shadow"),
        ));
    };
    let summary = view(&admin, &function).await?;
    let mut spec = live.spec.clone();
    spec.shadow = None;
    let who = actor(&headers);
    let reason = format!("shadow on {} stopped", shadow.label);
    change(&admin, &function, &live, &spec, &who, &reason).await?;
    Ok(axum::Json(summary).into_response())
}

async fn change(
    admin: &Admin,
    function: &str,
    live: &DeploymentRow,
    spec: &crate::registry::Spec,
    who: &str,
    reason: &str,
) -> Result<(), Failure> {
    let generation = admin
        .deployer
        .registry()
        .set_deployment(function, Some(live.generation), spec, who, reason)
        .await?;
    apply(admin, function, who).await?;
    admin.deployer.announce(function, generation).await;
    Ok(())
}

pub(super) async fn status(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
) -> Answer {
    function_config(&admin, &function)?;
    Ok(axum::Json(view(&admin, &function).await?).into_response())
}

/// The function's shadow and its comparisons per route, as JSON.
async fn view(admin: &Admin, function: &str) -> Result<serde_json::Value, Failure> {
    let live = live_deployment(admin, function).await?;
    let Some(shadow) = live.spec.shadow else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            "no-shadow",
            format!("`{function}` has no shadow"),
        ));
    };
    let routes: Vec<_> = admin
        .deployer
        .registry()
        .comparisons(function, &shadow.label, shadow.since / 1000)
        .await?
        .into_iter()
        .map(|(route, t)| {
            serde_json::json!({
                "route": route,
                "compared": t.compared(),
                "matched": t.matched,
                "match_percent": t.match_percent(),
                "status_differs": t.status,
                "body_differs": t.body,
                "shadow_failed": t.failed,
                "skipped": t.skipped,
                "mismatches": t.samples,
            })
        })
        .collect();
    Ok(serde_json::json!({
        "function": function,
        "version": shadow.label,
        "percent": shadow.percent,
        "since": shadow.since,
        "generation": live.generation,
        "scope": "every process sharing the registry; comparisons are written once a second",
        "routes": routes,
    }))
}
