//! Per-version figures in the registry: one row per version, process and flush (see
//! `deploy::stats`), summed over processes when read.

use std::collections::BTreeMap;

use super::{Registry, Result};
use crate::capabilities::db::{Value, read_again};
use crate::deploy::Figures;

pub(super) const DDL: &str = "CREATE TABLE wasmgate_version_figures (
       function TEXT NOT NULL,
       label TEXT NOT NULL,
       process TEXT NOT NULL,
       flush BIGINT NOT NULL,
       at BIGINT NOT NULL,
       requests BIGINT NOT NULL,
       failed BIGINT NOT NULL,
       refused BIGINT NOT NULL,
       latency TEXT NOT NULL,
       PRIMARY KEY (function, label, process, flush)
     );
     CREATE INDEX wasmgate_version_figures_at ON wasmgate_version_figures (function, at)";

impl Registry {
    /// Records what `process` saw of a version in the second `at` (s since the epoch). `flush`
    /// numbers the process's writes, so two in one second are two rows.
    pub async fn add_figures(
        &self,
        (function, label): (&str, &str),
        (process, flush): (&str, i64),
        at: i64,
        figures: &Figures,
    ) -> Result<()> {
        let last = figures
            .latency
            .iter()
            .rposition(|&n| n > 0)
            .map_or(0, |i| i + 1);
        let latency = serde_json::to_string(&figures.latency[..last]).expect("numbers serialize");
        self.db
            .execute(
                "INSERT INTO wasmgate_version_figures (function, label, process, flush, at, requests, failed, refused, latency) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                vec![
                    Value::Text(function.into()),
                    Value::Text(label.into()),
                    Value::Text(process.into()),
                    Value::Int64(flush),
                    Value::Int64(at),
                    Value::uint(figures.requests),
                    Value::uint(figures.failed),
                    Value::uint(figures.refused),
                    Value::Text(latency),
                ],
            )
            .await?;
        Ok(())
    }

    /// Every version's figures for `function` from the second `since` on, summed over
    /// processes.
    pub async fn figures(&self, function: &str, since: i64) -> Result<BTreeMap<String, Figures>> {
        let rows = read_again(
                &*self.db,
                "SELECT label, requests, failed, refused, latency FROM wasmgate_version_figures WHERE function = $1 AND at >= $2",
                vec![Value::Text(function.into()), Value::Int64(since)],
            )
            .await?;
        let mut by_label: BTreeMap<String, Figures> = BTreeMap::new();
        for r in &rows.rows {
            let n = Value::unsigned;
            let row = Figures {
                requests: n(&r[1]),
                failed: n(&r[2]),
                refused: n(&r[3]),
                latency: serde_json::from_str(&r[4].text())
                    .map_err(|e| super::RegistryError::Corrupt(e.to_string()))?,
            };
            by_label.entry(r[0].text()).or_default().add(&row);
        }
        Ok(by_label)
    }

    /// Deletes rows from before the second `before`.
    pub async fn prune_figures(&self, before: i64) -> Result<u64> {
        Ok(self
            .db
            .execute(
                "DELETE FROM wasmgate_version_figures WHERE at < $1",
                vec![Value::Int64(before)],
            )
            .await?)
    }
}
