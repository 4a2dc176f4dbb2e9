//! The rollout driver every process runs: one process drives each running rollout at a time.
//!
//! Who drives is decided by a lease on the lock capability's backend (`_wasmgate:rollout:<id>`,
//! Redis where configured, so every replica competes for the same one; in-process otherwise,
//! which is one process). The lease is renewed every [`TICK`]; a driver that cannot renew it
//! stops driving, and once it lapses ([`LEASE`]) another process takes it. Taking it over bumps
//! the rollout's fence in the registry, and every change a driver makes requires its own fence
//! and the step it judged, in the same transaction as the deployment change: a driver whose
//! lease lapsed (paused, partitioned) cannot change anything, and no step runs twice or is
//! skipped, whichever process judges it.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Plan, Verdict, judge, only};
use crate::deploy::Deployer;
use crate::registry::{
    ABORTED, PROMOTED, ROLLED_BACK, RUNNING, RegistryError, RolloutChange, RolloutRow,
};

/// How often a driver looks at its rollouts (and renews their leases).
pub const TICK: Duration = Duration::from_millis(250);
/// How long a lease lasts without renewal: how soon another process takes over a dead driver.
pub const LEASE: Duration = Duration::from_secs(3);

/// A rollout this process drives: the lock token of its lease and its fence in the registry.
struct Held {
    token: u64,
    fence: i64,
}

fn lease_name(id: &str) -> String {
    format!("_wasmgate:rollout:{id}")
}

/// Drives the rollouts this process holds the lease of, until the deployer is dropped.
pub async fn drive(deployer: Weak<Deployer>) {
    let actor = format!("rollout driver (pid {})", std::process::id());
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(d) = deployer.upgrade() else { return };
        let running = match d.registry().running_rollouts().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read rollouts; will retry");
                continue;
            }
        };
        let locks = d.platform().backends.lock.backend().clone();
        // Leases of rollouts that ended (here or elsewhere) are given back.
        let ended: Vec<String> = held
            .keys()
            .filter(|id| !running.iter().any(|r| &r.id == *id))
            .cloned()
            .collect();
        for id in ended {
            if let Some(h) = held.remove(&id) {
                let _ = locks.release(&lease_name(&id), h.token).await;
            }
        }
        for row in running {
            let name = lease_name(&row.id);
            if let Some(h) = held.get(&row.id) {
                if h.fence != row.fence || locks.renew(&name, h.token, LEASE).await.is_err() {
                    tracing::warn!(rollout = %row.id, function = %row.function, "lost the rollout's lease; another process drives it");
                    held.remove(&row.id);
                    continue;
                }
            } else {
                let Ok(Some(token)) = locks.try_acquire(&name, LEASE).await else {
                    continue;
                };
                match d.registry().claim_rollout(&row.id, row.fence).await {
                    Ok(Some(fence)) => {
                        tracing::info!(rollout = %row.id, function = %row.function, fence, "driving the rollout");
                        held.insert(row.id.clone(), Held { token, fence });
                    }
                    _ => {
                        let _ = locks.release(&name, token).await;
                        continue;
                    }
                }
            }
            let fence = held.get(&row.id).map_or(0, |h| h.fence);
            if let Err(e) = step(&d, &row, fence, &actor).await {
                tracing::warn!(rollout = %row.id, function = %row.function, error = %e, "rollout step not applied");
            }
        }
    }
}

/// Judges `row`'s current step and applies the verdict.
async fn step(
    d: &Arc<Deployer>,
    row: &RolloutRow,
    fence: i64,
    actor: &str,
) -> Result<(), RegistryError> {
    let registry = d.registry();
    let live = registry.deployment(&row.function).await?;
    if live.as_ref().map(|l| l.generation) != Some(row.generation) {
        // Someone set the traffic by hand: the rollout no longer owns it.
        let why = format!(
            "stopped: the deployment was changed outside the rollout (generation {})",
            live.map_or(0, |l| l.generation)
        );
        registry.end_rollout(&row.function, ABORTED, &why).await?;
        tracing::warn!(rollout = %row.id, function = %row.function, "{why}");
        return Ok(());
    }
    let plan: Plan = serde_json::from_str(&row.plan)
        .map_err(|e| RegistryError::Corrupt(format!("rollout plan: {e}")))?;
    let now = crate::auth::now_ms();
    let figures = registry
        .figures(&row.function, super::window_start(row.step_started_at))
        .await?;
    let candidate = figures.get(&row.candidate).cloned().unwrap_or_default();
    let interval_over = now - row.step_started_at >= i64::try_from(plan.interval_ms).unwrap_or(0);
    let verdict = judge(
        &plan.gates,
        (&row.candidate, &candidate),
        (&row.baseline, figures.get(&row.baseline)),
        interval_over,
    );
    let index = usize::try_from(row.step).unwrap_or(0);
    let here = plan.step_name(index, &row.candidate);
    let change = match verdict {
        Verdict::Wait => return Ok(()),
        Verdict::Hold(why) if why == row.last => return Ok(()),
        Verdict::Hold(why) => RolloutChange {
            state: RUNNING,
            step: row.step,
            step_started_at: row.step_started_at,
            last: why,
            deployment: None,
        },
        Verdict::Fail(why) => RolloutChange {
            state: ROLLED_BACK,
            step: row.step,
            step_started_at: row.step_started_at,
            last: format!("rolled back at {here}: {why}"),
            deployment: Some((
                only(&row.baseline, plan.sticky.clone()),
                format!(
                    "rollout {} of {} rolled back at {here}: {why}",
                    row.id, row.candidate
                ),
            )),
        },
        Verdict::Pass(figures) if index + 1 >= plan.steps.len() => RolloutChange {
            state: PROMOTED,
            step: row.step,
            step_started_at: row.step_started_at,
            last: format!("promoted after {here} passed: {figures}"),
            deployment: Some((
                only(&row.candidate, plan.sticky.clone()),
                format!(
                    "rollout {} promoted {} after {here} passed: {figures}",
                    row.id, row.candidate
                ),
            )),
        },
        Verdict::Pass(figures) => {
            let next = index + 1;
            RolloutChange {
                state: RUNNING,
                step: row.step + 1,
                step_started_at: now,
                last: format!("{here} passed: {figures}"),
                deployment: Some((
                    plan.spec(next, &row.baseline, &row.candidate),
                    format!(
                        "rollout {}: {} after {here} passed: {figures}",
                        row.id,
                        plan.step_name(next, &row.candidate)
                    ),
                )),
            }
        }
    };
    let changes_traffic = change.deployment.is_some();
    match registry.advance_rollout(row, fence, &change, actor).await {
        Ok(generation) if changes_traffic => {
            tracing::info!(rollout = %row.id, function = %row.function, state = change.state, "{}", change.last);
            if let Err(e) = d.reload().await {
                tracing::error!(error = %e, function = %row.function, "the rollout's change is in the registry but could not be served here");
            }
            d.announce(&row.function, generation).await;
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(RegistryError::Stale { .. }) => {
            registry
                .end_rollout(
                    &row.function,
                    ABORTED,
                    "stopped: the deployment was changed outside the rollout",
                )
                .await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}
