//! The registry: modules, versions, the live deployment of each function and the history of
//! every change, in the platform database (SQLite by default, PostgreSQL in production, so every
//! replica sees the same one).
//!
//! Modules are content-addressed: stored once under their sha256, with their bytes, so a replica
//! that starts later can load them (each process compiles from the bytes itself; compiled
//! artifacts never come from shared storage). A version names a module for a function with a
//! label and the settings it runs with. A deployment is the function's versions and their
//! weights, with a generation number: a change names the generation it was based on and is
//! refused when another change came first, so two operators never overwrite each other
//! silently. Every change is appended to the history with who made it and why. The admin API
//! writes it; the deployer (`deploy`) serves what it holds.

mod comparisons;
#[cfg(test)]
mod conformance;
mod figures;
mod rollouts;

pub use rollouts::{ABORTED, PROMOTED, ROLLED_BACK, RUNNING, RolloutChange, RolloutRow};

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::capabilities::db::migrations::{Migration, MigrationError};
use crate::capabilities::db::{DbBackend, DbError, Value, read_again};

/// The migrations namespace of these tables (function names cannot contain `_`).
const OWNER: &str = "_wasmgate_registry";

/// Versions one deployment may split traffic between.
pub const MAX_VERSIONS_PER_DEPLOYMENT: usize = 4;

fn ddl(blob: &str) -> String {
    format!(
        "CREATE TABLE wasmgate_modules (
           sha256 TEXT PRIMARY KEY,
           bytes {blob} NOT NULL,
           size BIGINT NOT NULL,
           created_at BIGINT NOT NULL
         );
         CREATE TABLE wasmgate_versions (
           function TEXT NOT NULL,
           label TEXT NOT NULL,
           sha256 TEXT NOT NULL,
           settings TEXT NOT NULL,
           created_by TEXT NOT NULL,
           created_at BIGINT NOT NULL,
           PRIMARY KEY (function, label)
         );
         CREATE TABLE wasmgate_deployments (
           function TEXT PRIMARY KEY,
           generation BIGINT NOT NULL,
           spec TEXT NOT NULL,
           updated_by TEXT NOT NULL,
           updated_at BIGINT NOT NULL
         );
         CREATE TABLE wasmgate_history (
           function TEXT NOT NULL,
           generation BIGINT NOT NULL,
           spec TEXT NOT NULL,
           reason TEXT NOT NULL,
           actor TEXT NOT NULL,
           at BIGINT NOT NULL,
           PRIMARY KEY (function, generation)
         );"
    )
}

/// How a deployment splits a function's traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// `(label, weight)`, weights summing to 100.
    pub versions: Vec<Weighted>,
    /// `header:<name>`, `cookie:<name>` or `client-ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<String>,
    /// A copy of a share of the other versions' requests runs on this one, its side effects
    /// held back (see `policy::shadow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    /// The version the copies run on: one of the deployment's (usually at 0%).
    pub label: String,
    /// The share of requests copied, 1 to 100.
    pub percent: u32,
    /// When it started (ms since the epoch): its comparisons are counted from then.
    pub since: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    pub label: String,
    pub weight: u32,
}

impl Spec {
    /// Why this split cannot be deployed, if it cannot.
    pub fn check(&self) -> Result<(), RegistryError> {
        let invalid = |why: String| Err(RegistryError::Invalid(why));
        if self.versions.is_empty() || self.versions.len() > MAX_VERSIONS_PER_DEPLOYMENT {
            return invalid(format!(
                "a deployment splits traffic between 1 and {MAX_VERSIONS_PER_DEPLOYMENT} versions"
            ));
        }
        let total: u32 = self.versions.iter().map(|v| v.weight).sum();
        if total != 100 {
            return invalid(format!("weights must sum to 100, not {total}"));
        }
        let mut labels: Vec<&str> = self.versions.iter().map(|v| v.label.as_str()).collect();
        labels.sort_unstable();
        if labels.windows(2).any(|w| w[0] == w[1]) {
            return invalid("a version appears twice".into());
        }
        if let Some(k) = &self.sticky {
            crate::deploy::StickyKey::parse(k).map_err(RegistryError::Invalid)?;
        }
        if let Some(s) = &self.shadow {
            if !(1..=100).contains(&s.percent) {
                return invalid(format!(
                    "a shadow copies 1 to 100 percent of requests, not {}",
                    s.percent
                ));
            }
            if !labels.contains(&s.label.as_str()) {
                return invalid(format!(
                    "the shadow runs on {}, which is not in the deployment",
                    s.label
                ));
            }
        }
        Ok(())
    }
}

/// What a version changes of its function's manifest settings (everything else is the
/// manifest's). Sizes and durations in the manifest's units ("64MiB", "5s").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_reuse: Option<u32>,
}

impl VersionSettings {
    /// As stored in `VersionRow.settings`; an unreadable one is the manifest's settings.
    pub fn parse(json: &str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("version settings: {e}"))
    }
}

/// A version as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    pub function: String,
    pub label: String,
    pub sha256: String,
    /// The settings it runs with (capabilities and limits), as JSON.
    pub settings: String,
    pub created_by: String,
    pub created_at: i64,
    /// What it may do (`deploy::Surface`, as JSON).
    pub surface: String,
    /// How it widens what the live version could do when it was uploaded; while this is not
    /// empty and nobody approved it, it may not take traffic.
    pub widens: Vec<String>,
    /// Who approved `widens` (empty: nobody yet).
    pub approved_by: String,
}

impl VersionRow {
    /// Whether it may not take traffic until someone approves what it widens.
    pub fn held(&self) -> bool {
        !self.widens.is_empty() && self.approved_by.is_empty()
    }
}

/// A function's live deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentRow {
    pub function: String,
    pub generation: i64,
    pub spec: Spec,
    pub updated_by: String,
    pub updated_at: i64,
}

/// One change, as the history keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub generation: i64,
    pub spec: Spec,
    pub reason: String,
    pub actor: String,
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    /// The change was based on generation `expected`; the deployment is at `actual` now.
    #[error("the change was based on {}, but the deployment is at {}; read it again and retry", generation(.expected), generation(.actual))]
    Stale {
        expected: Option<i64>,
        actual: Option<i64>,
    },
    /// A change that depended on something else (a rollout's state, a lease) no longer holding.
    #[error("{0}")]
    Refused(String),
    #[error("the registry is unavailable: {0:?}")]
    Db(DbError),
    #[error("a stored deployment is corrupt: {0}")]
    Corrupt(String),
}

impl From<DbError> for RegistryError {
    fn from(e: DbError) -> Self {
        Self::Db(e)
    }
}

fn generation(g: &Option<i64>) -> String {
    g.map_or("no deployment".into(), |g| format!("generation {g}"))
}

type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// A statement a change depends on: it must change a row, or the change is refused.
pub(crate) struct Guard {
    pub sql: String,
    pub params: Vec<Value>,
    pub refusal: String,
}

#[derive(Clone)]
pub struct Registry {
    db: Arc<dyn DbBackend>,
}

fn spec_of(v: &Value) -> Result<Spec> {
    serde_json::from_str(&v.text()).map_err(|e| RegistryError::Corrupt(e.to_string()))
}

fn now_ms() -> i64 {
    crate::auth::now_ms()
}

impl Registry {
    /// Creates the tables if needed (once, under the migrations lock).
    pub async fn open(db: Arc<dyn DbBackend>) -> Result<Self, MigrationError> {
        let blob = db.blob_type();
        db.migrate(
            OWNER,
            &[
                Migration::new("0001_registry", ddl(blob)),
                Migration::new(
                    "0002_preview_tokens",
                    "CREATE TABLE wasmgate_preview_tokens (
                       hash TEXT PRIMARY KEY,
                       function TEXT NOT NULL,
                       expires_at BIGINT NOT NULL
                     )",
                ),
                Migration::new("0003_version_figures", figures::DDL),
                Migration::new("0004_rollouts", rollouts::DDL),
                Migration::new(
                    "0005_version_surface",
                    "ALTER TABLE wasmgate_versions ADD COLUMN surface TEXT NOT NULL DEFAULT '{}';
                     ALTER TABLE wasmgate_versions ADD COLUMN widens TEXT NOT NULL DEFAULT '[]';
                     ALTER TABLE wasmgate_versions ADD COLUMN approved_by TEXT NOT NULL DEFAULT ''",
                ),
                Migration::new("0006_shadow_comparisons", comparisons::DDL),
            ],
        )
        .await?;
        Ok(Self { db })
    }

    /// Stores a module's bytes under their sha256 (once; storing them again is a no-op) and
    /// returns the sha256.
    pub async fn put_module(&self, bytes: &[u8]) -> Result<String> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        self.db
            .execute(
                "INSERT INTO wasmgate_modules (sha256, bytes, size, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (sha256) DO NOTHING",
                vec![
                    Value::Text(sha256.clone()),
                    Value::Bytes(bytes.to_vec()),
                    Value::Int64(i64::try_from(bytes.len()).unwrap_or(i64::MAX)),
                    Value::Int64(now_ms()),
                ],
            )
            .await?;
        Ok(sha256)
    }

    pub async fn module(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let rows = read_again(
            &*self.db,
            "SELECT bytes FROM wasmgate_modules WHERE sha256 = $1",
            vec![Value::Text(sha256.into())],
        )
        .await?;
        Ok(rows
            .rows
            .into_iter()
            .next()
            .and_then(|r| match r.into_iter().next() {
                Some(Value::Bytes(b)) => Some(b),
                _ => None,
            }))
    }

    /// Names a stored module as `label` of `function`. Labels are never reused: a version is
    /// what it was when it was created.
    pub async fn create_version(&self, v: &VersionRow) -> Result<()> {
        if v.label.is_empty() || v.label.len() > 64 || v.label.contains(['=', ' ', ',']) {
            return Err(RegistryError::Invalid(
                "a label is 1 to 64 characters without spaces, commas or `=`".into(),
            ));
        }
        if v.label == crate::loader::MANIFEST_LABEL {
            return Err(RegistryError::Invalid(format!(
                "`{}` names the manifest's version of a function; choose another label",
                v.label
            )));
        }
        if self.module(&v.sha256).await?.is_none() {
            return Err(RegistryError::NotFound(format!("module {}", v.sha256)));
        }
        let inserted = self
            .db
            .execute(
                "INSERT INTO wasmgate_versions (function, label, sha256, settings, created_by, created_at, surface, widens, approved_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (function, label) DO NOTHING",
                vec![
                    Value::Text(v.function.clone()),
                    Value::Text(v.label.clone()),
                    Value::Text(v.sha256.clone()),
                    Value::Text(v.settings.clone()),
                    Value::Text(v.created_by.clone()),
                    Value::Int64(v.created_at),
                    Value::Text(v.surface.clone()),
                    Value::Text(serde_json::to_string(&v.widens).expect("strings serialize")),
                    Value::Text(v.approved_by.clone()),
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(RegistryError::Exists(format!(
                "version {} of {}",
                v.label, v.function
            )));
        }
        Ok(())
    }

    pub async fn versions(&self, function: &str) -> Result<Vec<VersionRow>> {
        let rows = read_again(&*self.db, "SELECT function, label, sha256, settings, created_by, created_at, surface, widens, approved_by FROM wasmgate_versions WHERE function = $1 ORDER BY created_at, label",
                vec![Value::Text(function.into())],
            )
            .await?;
        Ok(rows
            .rows
            .iter()
            .map(|r| VersionRow {
                function: r[0].text(),
                label: r[1].text(),
                sha256: r[2].text(),
                settings: r[3].text(),
                created_by: r[4].text(),
                created_at: r[5].int().unwrap_or(0),
                surface: r[6].text(),
                widens: serde_json::from_str(&r[7].text()).unwrap_or_default(),
                approved_by: r[8].text(),
            })
            .collect())
    }

    /// Records that `actor` approved what version `label` of `function` widens.
    pub async fn approve_version(
        &self,
        function: &str,
        label: &str,
        actor: &str,
    ) -> Result<VersionRow> {
        let changed = self
            .db
            .execute(
                "UPDATE wasmgate_versions SET approved_by = $1 WHERE function = $2 AND label = $3 AND approved_by = '' AND widens <> '[]'",
                vec![
                    Value::Text(actor.into()),
                    Value::Text(function.into()),
                    Value::Text(label.into()),
                ],
            )
            .await?;
        let row = self
            .versions(function)
            .await?
            .into_iter()
            .find(|v| v.label == label)
            .ok_or_else(|| RegistryError::NotFound(format!("version {label} of {function}")))?;
        if changed == 0 && row.widens.is_empty() {
            return Err(RegistryError::Invalid(format!(
                "{label} does not widen what {function} may do; it needs no approval"
            )));
        }
        Ok(row)
    }

    pub async fn deployment(&self, function: &str) -> Result<Option<DeploymentRow>> {
        Ok(self.deployments(Some(function)).await?.into_iter().next())
    }

    /// Every function's live deployment (what a starting or polling replica serves).
    pub async fn deployments(&self, function: Option<&str>) -> Result<Vec<DeploymentRow>> {
        let select =
            "SELECT function, generation, spec, updated_by, updated_at FROM wasmgate_deployments";
        let rows = match function {
            Some(f) => {
                read_again(
                    &*self.db,
                    &format!("{select} WHERE function = $1"),
                    vec![Value::Text(f.into())],
                )
                .await?
            }
            None => read_again(&*self.db, &format!("{select} ORDER BY function"), vec![]).await?,
        };
        rows.rows
            .iter()
            .map(|r| {
                Ok(DeploymentRow {
                    function: r[0].text(),
                    generation: r[1].int().unwrap_or(0),
                    spec: spec_of(&r[2])?,
                    updated_by: r[3].text(),
                    updated_at: r[4].int().unwrap_or(0),
                })
            })
            .collect()
    }

    /// Deploys `spec` for `function` if the live deployment is still at `expected` (`None`:
    /// there is none yet), records it in the history, and returns the new generation. The
    /// versions it names must exist.
    pub async fn set_deployment(
        &self,
        function: &str,
        expected: Option<i64>,
        spec: &Spec,
        actor: &str,
        reason: &str,
    ) -> Result<i64> {
        self.change(function, expected, spec, actor, reason, Vec::new())
            .await
    }

    /// [`Self::set_deployment`], in one transaction with `guards`: statements that must each
    /// change a row, or nothing is changed and the guard's refusal is the error.
    pub(crate) async fn change(
        &self,
        function: &str,
        expected: Option<i64>,
        spec: &Spec,
        actor: &str,
        reason: &str,
        guards: Vec<Guard>,
    ) -> Result<i64> {
        spec.check()?;
        let known = self.versions(function).await?;
        if let Some(missing) = spec
            .versions
            .iter()
            .find(|w| !known.iter().any(|v| v.label == w.label))
        {
            return Err(RegistryError::NotFound(format!(
                "version {} of {function}",
                missing.label
            )));
        }
        if let Some(held) = spec
            .versions
            .iter()
            .filter(|w| w.weight > 0)
            .map(|w| &w.label)
            .chain(spec.shadow.as_ref().map(|s| &s.label))
            .find_map(|label| known.iter().find(|v| &v.label == label && v.held()))
        {
            return Err(RegistryError::Refused(format!(
                "{} of {function} may do more than the live version ({}); it stays at 0% until an operator approves it (`wasmgate approve {function} {}`)",
                held.label,
                held.widens.join("; "),
                held.label
            )));
        }
        let json = serde_json::to_string(spec).expect("a spec serializes");
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        for g in guards {
            if tx.execute(&g.sql, g.params).await? == 0 {
                return Err(RegistryError::Refused(g.refusal));
            }
        }
        let (changed, generation) = match expected {
            None => (
                tx.execute(
                    "INSERT INTO wasmgate_deployments (function, generation, spec, updated_by, updated_at) VALUES ($1, 1, $2, $3, $4) ON CONFLICT (function) DO NOTHING",
                    vec![
                        Value::Text(function.into()),
                        Value::Text(json.clone()),
                        Value::Text(actor.into()),
                        Value::Int64(now),
                    ],
                )
                .await?,
                1,
            ),
            Some(g) => (
                tx.execute(
                    "UPDATE wasmgate_deployments SET generation = $1, spec = $2, updated_by = $3, updated_at = $4 WHERE function = $5 AND generation = $6",
                    vec![
                        Value::Int64(g + 1),
                        Value::Text(json.clone()),
                        Value::Text(actor.into()),
                        Value::Int64(now),
                        Value::Text(function.into()),
                        Value::Int64(g),
                    ],
                )
                .await?,
                g + 1,
            ),
        };
        if changed == 0 {
            drop(tx);
            let actual = self.deployment(function).await?.map(|d| d.generation);
            return Err(RegistryError::Stale { expected, actual });
        }
        tx.execute(
            "INSERT INTO wasmgate_history (function, generation, spec, reason, actor, at) VALUES ($1, $2, $3, $4, $5, $6)",
            vec![
                Value::Text(function.into()),
                Value::Int64(generation),
                Value::Text(json),
                Value::Text(reason.into()),
                Value::Text(actor.into()),
                Value::Int64(now),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(generation)
    }

    /// The function's changes, newest first.
    pub async fn history(&self, function: &str) -> Result<Vec<HistoryRow>> {
        let rows = read_again(&*self.db, "SELECT generation, spec, reason, actor, at FROM wasmgate_history WHERE function = $1 ORDER BY generation DESC",
                vec![Value::Text(function.into())],
            )
            .await?;
        rows.rows
            .iter()
            .map(|r| {
                Ok(HistoryRow {
                    generation: r[0].int().unwrap_or(0),
                    spec: spec_of(&r[1])?,
                    reason: r[2].text(),
                    actor: r[3].text(),
                    at: r[4].int().unwrap_or(0),
                })
            })
            .collect()
    }

    /// A new preview token for `function`, valid until `expires_at` (ms): requests carrying it
    /// may pick any deployed version of the function. Only its hash is stored.
    pub async fn create_preview_token(&self, function: &str, expires_at: i64) -> Result<String> {
        let mut raw = [0u8; 24];
        getrandom::fill(&mut raw).expect("the OS random source is available");
        let token = hex::encode(raw);
        self.db
            .execute(
                "INSERT INTO wasmgate_preview_tokens (hash, function, expires_at) VALUES ($1, $2, $3)",
                vec![
                    Value::Text(hex::encode(Sha256::digest(token.as_bytes()))),
                    Value::Text(function.into()),
                    Value::Int64(expires_at),
                ],
            )
            .await?;
        Ok(token)
    }

    /// The function a preview token is for, and until when, if it is one.
    pub async fn preview_token(&self, token: &str) -> Result<Option<(String, i64)>> {
        let rows = read_again(
            &*self.db,
            "SELECT function, expires_at FROM wasmgate_preview_tokens WHERE hash = $1",
            vec![Value::Text(hex::encode(Sha256::digest(token.as_bytes())))],
        )
        .await?;
        Ok(rows
            .rows
            .first()
            .map(|r| (r[0].text(), r[1].int().unwrap_or(0))))
    }

    /// Restores the deployment before the live one, as a new change (the history keeps both).
    pub async fn rollback(&self, function: &str, actor: &str, reason: &str) -> Result<i64> {
        let history = self.history(function).await?;
        let (Some(live), Some(previous)) = (history.first(), history.get(1)) else {
            return Err(RegistryError::NotFound(format!(
                "a deployment of {function} before the live one"
            )));
        };
        // The one before the live deployment's own spec: a rollback of a rollback goes further
        // back only if asked again.
        self.set_deployment(
            function,
            Some(live.generation),
            &previous.spec,
            actor,
            &format!("rollback to generation {}: {reason}", previous.generation),
        )
        .await
    }
}
