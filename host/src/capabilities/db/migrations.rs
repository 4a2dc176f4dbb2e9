//! Per-function SQL migrations: files `NNNN_name.sql` in the function's `migrations` folder,
//! applied once each, in numeric order, and recorded in `wasmgate_migrations` with a checksum.
//!
//! An applied migration whose file changed is an error (the schema would no longer match the
//! files). Backends apply pending migrations inside one transaction under a lock, so several
//! wasmgate processes starting together apply each exactly once.

use std::path::Path;

use sha2::{Digest, Sha256};

/// The table that records applied migrations, shared by all functions.
pub const TABLE: &str = "wasmgate_migrations";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The file name without `.sql`, e.g. `0001_create_users`.
    pub name: String,
    pub sql: String,
    pub checksum: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot read migrations in `{dir}`: {reason}")]
    Read { dir: String, reason: String },
    #[error(
        "migration file `{file}` must be named NNNN_description.sql (a number first, so the order is clear)"
    )]
    BadName { file: String },
    #[error(
        "migration `{name}` was applied with different content (checksum {applied}, file now {file}); add a new migration instead of editing an applied one"
    )]
    Changed {
        name: String,
        applied: String,
        file: String,
    },
    #[error("migration `{name}` failed: {reason}")]
    Failed { name: String, reason: String },
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

impl Migration {
    pub fn new(name: impl Into<String>, sql: impl Into<String>) -> Self {
        let sql = sql.into();
        Self {
            name: name.into(),
            checksum: hex::encode(Sha256::digest(sql.as_bytes())),
            sql,
        }
    }
}

/// Reads a migrations folder, ordered by the number each file name starts with.
pub fn load_dir(dir: &Path) -> Result<Vec<Migration>, MigrationError> {
    let read_err = |e: std::io::Error| MigrationError::Read {
        dir: dir.display().to_string(),
        reason: e.to_string(),
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("sql") {
            continue;
        }
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default()
            .to_string();
        let name = file.trim_end_matches(".sql").to_string();
        let number: u64 = name
            .split('_')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| MigrationError::BadName { file: file.clone() })?;
        let sql = std::fs::read_to_string(&path).map_err(read_err)?;
        found.push((number, Migration::new(name, sql)));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    Ok(found.into_iter().map(|(_, m)| m).collect())
}

/// Which migrations still need applying, given the (name, checksum) pairs already recorded.
pub fn pending<'a>(
    migrations: &'a [Migration],
    applied: &[(String, String)],
) -> Result<Vec<&'a Migration>, MigrationError> {
    let mut todo = Vec::new();
    for m in migrations {
        match applied.iter().find(|(n, _)| *n == m.name) {
            Some((_, sum)) if *sum != m.checksum => {
                return Err(MigrationError::Changed {
                    name: m.name.clone(),
                    applied: sum.clone(),
                    file: m.checksum.clone(),
                });
            }
            Some(_) => {}
            None => todo.push(m),
        }
    }
    Ok(todo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_in_numeric_order_and_refuses_unnumbered_files() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("10_later.sql"), "SELECT 10").expect("write");
        std::fs::write(dir.path().join("2_first.sql"), "SELECT 2").expect("write");
        std::fs::write(dir.path().join("README.md"), "ignored").expect("write");
        let names: Vec<_> = load_dir(dir.path())
            .expect("loads")
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["2_first", "10_later"]);
        std::fs::write(dir.path().join("oops.sql"), "SELECT 1").expect("write");
        assert!(matches!(
            load_dir(dir.path()),
            Err(MigrationError::BadName { .. })
        ));
    }

    #[test]
    fn an_edited_applied_migration_is_refused() {
        let m = Migration {
            name: "1_a".into(),
            sql: "x".into(),
            checksum: "new".into(),
        };
        let err = pending(std::slice::from_ref(&m), &[("1_a".into(), "old".into())])
            .expect_err("changed");
        assert!(err.to_string().contains("add a new migration"));
        assert!(pending(std::slice::from_ref(&m), &[]).expect("ok").len() == 1);
    }
}
