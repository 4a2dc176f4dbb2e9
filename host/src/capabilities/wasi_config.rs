//! The `config` capability: `wasi:config/store` (the standard interface Spin, wasmCloud and
//! `wasmtime serve` offer for configuration), with values per function from the manifest.
//!
//! A value is written in the manifest, or taken at load from a file or one of the host's
//! environment variables, for secrets that should not sit in the manifest. Values are resolved
//! once per load (a reload reads them again) and never logged: the manifest's own form names
//! only where a secret comes from. The host side is wasmtime-wasi-config's; this module only
//! resolves the values and links it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use wasmtime::component::Linker;
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

use crate::runtime::GuestState;

/// The interface a component imports for it.
pub const INTERFACE: &str = "wasi:config/store";

/// One value as the manifest gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum ConfigValue {
    Plain(String),
    /// The host's environment variable of this name, read at load.
    FromEnv {
        env: String,
    },
    /// The file's contents (without a trailing newline), relative to the manifest, read at load.
    FromFile {
        file: PathBuf,
    },
}

/// A function's values, resolved; shared by its instances.
#[derive(Clone, Default)]
pub struct FunctionConfigValues {
    vars: Arc<WasiConfigVariables>,
    /// A digest of the values, so a function whose values changed is loaded anew on reload
    /// (the values themselves never leave this struct).
    fingerprint: String,
}

impl FunctionConfigValues {
    /// Resolves `values` (files relative to `base`). The error names the key and the source,
    /// never a value.
    pub fn resolve(values: &BTreeMap<String, ConfigValue>, base: &Path) -> Result<Self, String> {
        use sha2::{Digest, Sha256};
        let resolved = resolve_each(values, base)?;
        let mut digest = Sha256::new();
        for (k, v) in &resolved {
            for part in [k, v] {
                digest.update((part.len() as u64).to_le_bytes());
                digest.update(part.as_bytes());
            }
        }
        Ok(Self {
            fingerprint: hex::encode(digest.finalize()),
            vars: Arc::new(resolved.into_iter().collect()),
        })
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn view(&self) -> WasiConfig<'_> {
        WasiConfig::new(&self.vars)
    }
}

fn resolve_each(
    values: &BTreeMap<String, ConfigValue>,
    base: &Path,
) -> Result<BTreeMap<String, String>, String> {
    let mut resolved = BTreeMap::new();
    for (key, value) in values {
        let value = match value {
            ConfigValue::Plain(v) => v.clone(),
            ConfigValue::FromEnv { env } => std::env::var(env).map_err(|e| {
                format!(
                    "config `{key}`: the host's environment variable `{env}` {}",
                    match e {
                        std::env::VarError::NotPresent => "is not set",
                        std::env::VarError::NotUnicode(_) => "is not UTF-8",
                    }
                )
            })?,
            ConfigValue::FromFile { file } => {
                let path = base.join(file);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    format!("config `{key}`: cannot read `{}`: {e}", path.display())
                })?;
                text.strip_suffix('\n').unwrap_or(&text).to_string()
            }
        };
        resolved.insert(key.clone(), value);
    }
    Ok(resolved)
}

pub fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    wasmtime_wasi_config::add_to_linker(linker, |s: &mut GuestState| s.config.view())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_from_the_manifest_a_file_or_the_hosts_environment() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("secret"), "s3cret\n").expect("write");
        let values: BTreeMap<String, ConfigValue> = toml::from_str(
            r#"
            plain = "hello"
            from-file = { file = "secret" }
            from-env = { env = "PATH" }
            "#,
        )
        .expect("toml");
        let path = std::env::var("PATH").expect("the test runs with a PATH");
        let resolved = resolve_each(&values, dir.path()).expect("resolved");
        assert_eq!(
            resolved.into_iter().collect::<Vec<_>>(),
            [
                ("from-env".to_string(), path),
                ("from-file".to_string(), "s3cret".to_string()),
                ("plain".to_string(), "hello".to_string()),
            ]
        );
        // Another value, another fingerprint: the function is loaded anew.
        let a = FunctionConfigValues::resolve(&values, dir.path()).expect("a");
        std::fs::write(dir.path().join("secret"), "rotated\n").expect("write");
        let b = FunctionConfigValues::resolve(&values, dir.path()).expect("b");
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert!(!a.fingerprint().contains("s3cret"));
    }

    #[test]
    fn a_missing_source_names_the_key_and_where_not_a_value() {
        let values: BTreeMap<String, ConfigValue> = toml::from_str(
            r#"
            token = { env = "WASMGATE_CONFIG_TEST_SURELY_UNSET" }
            "#,
        )
        .expect("toml");
        let err = FunctionConfigValues::resolve(&values, Path::new("/"))
            .err()
            .expect("refused");
        assert_eq!(
            err,
            "config `token`: the host's environment variable `WASMGATE_CONFIG_TEST_SURELY_UNSET` is not set"
        );
        let values: BTreeMap<String, ConfigValue> =
            toml::from_str(r#"key = { file = "no/such/file" }"#).expect("toml");
        let err = FunctionConfigValues::resolve(&values, Path::new("/"))
            .err()
            .expect("refused");
        assert!(
            err.starts_with("config `key`: cannot read `/no/such/file`"),
            "{err}"
        );
    }
}
