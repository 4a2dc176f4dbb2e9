//! What a version may do, and whether a new one may do more than the live one: a version that
//! imports a capability the live one does not, is granted more, or loosens a limit waits at 0%
//! until an operator approves the difference; one that only narrows needs no approval.
//!
//! The rate limit, the bulkhead and migrations belong to the function (the manifest), not to a
//! version, so a version cannot change them and they are not part of the difference.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::runtime::Limits;

/// The capabilities a version imports and is granted, and its limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Surface {
    pub imports: BTreeSet<String>,
    pub grants: BTreeSet<String>,
    pub timeout_ms: u64,
    pub memory: u64,
    pub max_body: u64,
    pub instance_reuse: u32,
}

impl Surface {
    pub fn new(imports: &[&str], grants: &crate::capabilities::Grants, limits: &Limits) -> Self {
        Self {
            imports: imports.iter().map(|s| (*s).to_string()).collect(),
            grants: grants.iter().map(|c| c.name().to_string()).collect(),
            timeout_ms: u64::try_from(limits.timeout.as_millis()).unwrap_or(u64::MAX),
            memory: limits.memory,
            max_body: limits.max_body,
            instance_reuse: limits.instance_reuse,
        }
    }

    /// How `self` (a new version) widens `live`, one line each; empty if it only narrows or
    /// keeps. Read by people (`wasmgate deploy` prints it) and scripts (`--json`).
    pub fn widens(&self, live: &Surface) -> Vec<String> {
        let mut more: Vec<String> = Vec::new();
        for i in self.imports.difference(&live.imports) {
            more.push(format!("imports the `{i}` capability"));
        }
        for g in self.grants.difference(&live.grants) {
            more.push(format!("is granted `{g}`"));
        }
        let mut looser = |what: &str, was: u64, now: u64, unit: &str| {
            if now > was {
                more.push(format!("{what} {was}{unit} -> {now}{unit}"));
            }
        };
        looser("timeout", live.timeout_ms, self.timeout_ms, " ms");
        looser("memory", live.memory, self.memory, " bytes");
        looser("max_body", live.max_body, self.max_body, " bytes");
        looser(
            "instance_reuse",
            u64::from(live.instance_reuse),
            u64::from(self.instance_reuse),
            " requests",
        );
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn surface(imports: &[&str], timeout_ms: u64) -> Surface {
        Surface {
            imports: imports.iter().map(|s| (*s).to_string()).collect(),
            grants: imports.iter().map(|s| (*s).to_string()).collect(),
            timeout_ms,
            memory: 1 << 20,
            max_body: 1 << 20,
            instance_reuse: 0,
        }
    }

    #[test]
    fn only_what_widens_is_listed() {
        let live = surface(&["cache"], 5000);
        assert!(surface(&[], 1000).widens(&live).is_empty(), "narrowing");
        assert!(
            surface(&["cache"], 5000).widens(&live).is_empty(),
            "the same"
        );
        assert_eq!(
            surface(&["cache", "db"], 6000).widens(&live),
            [
                "imports the `db` capability",
                "is granted `db`",
                "timeout 5000 ms -> 6000 ms"
            ]
        );
        let reuse = Surface {
            instance_reuse: 100,
            ..live.clone()
        };
        assert_eq!(
            reuse.widens(&live),
            ["instance_reuse 0 requests -> 100 requests"]
        );
    }
}
