//! Shadow comparisons in the registry: one row per route, process and flush (see
//! `deploy::comparisons`), summed over processes when read.

use std::collections::BTreeMap;

use super::{Registry, RegistryError, Result};
use crate::capabilities::db::{Value, read_again};
use crate::deploy::Tally;

pub(super) const DDL: &str = "CREATE TABLE wasmgate_shadow_comparisons (
       function TEXT NOT NULL,
       label TEXT NOT NULL,
       route TEXT NOT NULL,
       process TEXT NOT NULL,
       flush BIGINT NOT NULL,
       at BIGINT NOT NULL,
       matched BIGINT NOT NULL,
       status BIGINT NOT NULL,
       body BIGINT NOT NULL,
       failed BIGINT NOT NULL,
       skipped BIGINT NOT NULL,
       samples TEXT NOT NULL,
       PRIMARY KEY (function, label, route, process, flush)
     );
     CREATE INDEX wasmgate_shadow_comparisons_at ON wasmgate_shadow_comparisons (function, label, at)";

impl Registry {
    /// Records what `process` compared on `route` for the shadow on `label` of `function`, in
    /// the second `at`.
    pub async fn add_comparisons(
        &self,
        (function, label, route): (&str, &str, &str),
        (process, flush): (&str, i64),
        at: i64,
        tally: &Tally,
    ) -> Result<()> {
        self.db
            .execute(
                "INSERT INTO wasmgate_shadow_comparisons (function, label, route, process, flush, at, matched, status, body, failed, skipped, samples) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                vec![
                    Value::Text(function.into()),
                    Value::Text(label.into()),
                    Value::Text(route.into()),
                    Value::Text(process.into()),
                    Value::Int64(flush),
                    Value::Int64(at),
                    Value::uint(tally.matched),
                    Value::uint(tally.status),
                    Value::uint(tally.body),
                    Value::uint(tally.failed),
                    Value::uint(tally.skipped),
                    Value::Text(serde_json::to_string(&tally.samples).expect("samples serialize")),
                ],
            )
            .await?;
        Ok(())
    }

    /// Per route, the comparisons of the shadow on `label` of `function` from the second
    /// `since` on, summed over processes, with the newest mismatches.
    pub async fn comparisons(
        &self,
        function: &str,
        label: &str,
        since: i64,
    ) -> Result<BTreeMap<String, Tally>> {
        let rows = read_again(
                &*self.db,
                "SELECT route, matched, status, body, failed, skipped, samples FROM wasmgate_shadow_comparisons WHERE function = $1 AND label = $2 AND at >= $3 ORDER BY at, flush",
                vec![
                    Value::Text(function.into()),
                    Value::Text(label.into()),
                    Value::Int64(since),
                ],
            )
            .await?;
        let mut by_route: BTreeMap<String, Tally> = BTreeMap::new();
        for r in &rows.rows {
            let n = Value::unsigned;
            let row = Tally {
                matched: n(&r[1]),
                status: n(&r[2]),
                body: n(&r[3]),
                failed: n(&r[4]),
                skipped: n(&r[5]),
                samples: serde_json::from_str(&r[6].text())
                    .map_err(|e| RegistryError::Corrupt(e.to_string()))?,
            };
            by_route.entry(r[0].text()).or_default().add(row);
        }
        Ok(by_route)
    }

    /// Deletes rows from before the second `before`.
    pub async fn prune_comparisons(&self, before: i64) -> Result<u64> {
        Ok(self
            .db
            .execute(
                "DELETE FROM wasmgate_shadow_comparisons WHERE at < $1",
                vec![Value::Int64(before)],
            )
            .await?)
    }
}
