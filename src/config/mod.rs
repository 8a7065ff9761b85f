//! Configuration: one YAML file plus `SWITCHYARD__A__B=value` environment overrides, parsed once
//! into raw structs and validated into a [`Plan`].
//!
//! Everything downstream holds a `Plan`: references between sections (models -> providers,
//! steps -> models, prompts and earlier steps) are resolved here, so a bad file fails at start-up
//! with every problem listed, each naming its field and the fix.

mod plan;
mod raw;
mod validate;

use std::path::Path;

pub use plan::*;
use serde_norway::{Mapping, Value};

/// Prefix of environment variables that override config fields; `__` separates path segments.
pub const ENV_PREFIX: &str = "SWITCHYARD__";

/// A config that cannot be used, with every problem found (one per line).
#[derive(Debug, thiserror::Error)]
#[error("invalid config {origin}:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub origin: String,
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(origin: &str, problem: String) -> Self {
        Self {
            origin: origin.to_owned(),
            problems: vec![problem],
        }
    }
}

/// `url` with any credentials (`user:password@`) replaced by `***@`, for every message that
/// may show it: logs, errors, `check-config`. Comma-separated server lists are handled too.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let Some((scheme, rest)) = one.split_once("://") else {
                return one.to_owned();
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{path}"),
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The value of the environment variable `var` that `field` names for a secret; the error
/// names the field and the variable, never a value. An empty value counts as unset.
pub fn secret_from_env(field: &str, var: &str) -> Result<String, String> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{field}: environment variable {var} is not set"))
}

/// `text` (an error message) with every occurrence of `url` shown redacted.
pub fn redact_in(text: &str, url: &str) -> String {
    let redacted = redact_url(url);
    if redacted == url {
        return text.to_owned();
    }
    let mut out = text.replace(url, &redacted);
    for one in url.split(',') {
        out = out.replace(one, &redact_url(one));
    }
    out
}

/// Loads a config file, applies the process environment's overrides and validates it.
pub fn load(path: &Path) -> Result<Plan, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one(&origin, format!("cannot read the file: {e}")))?;
    load_str(&text, &origin, std::env::vars())
}

/// Parses and validates config text; `env` supplies the `SWITCHYARD__...` overrides.
pub fn load_str(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Plan, ConfigError> {
    let mut root: Value = serde_norway::from_str(text)
        .map_err(|e| ConfigError::one(origin, format!("not valid YAML: {e}")))?;
    apply_env_overrides(&mut root, env).map_err(|p| ConfigError::one(origin, p))?;
    let raw: raw::RawConfig = serde_path_to_error::deserialize(root).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let problem = if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        };
        ConfigError::one(origin, problem)
    })?;
    validate::validate(raw).map_err(|problems| ConfigError {
        origin: origin.to_owned(),
        problems,
    })
}

/// Writes the prompt lock of the config at `path`: the content hash of every versioned prompt
/// (`name@version`), so a later change of its text without a new version fails at start-up.
/// Returns the lock's path and how many prompts it holds.
pub fn lock_prompts(path: &Path) -> Result<(std::path::PathBuf, usize), ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one(&origin, format!("cannot read the file: {e}")))?;
    let mut root: Value = serde_norway::from_str(&text)
        .map_err(|e| ConfigError::one(&origin, format!("not valid YAML: {e}")))?;
    apply_env_overrides(&mut root, std::env::vars()).map_err(|p| ConfigError::one(&origin, p))?;
    let raw: raw::RawConfig = serde_path_to_error::deserialize(root).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::one(&origin, format!("{path}: {}", e.into_inner()))
    })?;
    let (lock, hashes) = validate::prompt_hashes(&raw).map_err(|problems| ConfigError {
        origin: origin.clone(),
        problems,
    })?;
    let entries = serde_norway::to_string(&hashes)
        .map_err(|e| ConfigError::one(&origin, format!("cannot write the lock: {e}")))?;
    let text = format!(
        "# Written by `switchyard prompts lock`: the SHA-256 of each versioned prompt's text.\n\
         # A prompt whose text no longer matches is refused at start-up; change text in a new version.\n{entries}"
    );
    std::fs::write(&lock, text).map_err(|e| {
        ConfigError::one(&origin, format!("cannot write `{}`: {e}", lock.display()))
    })?;
    Ok((lock, hashes.len()))
}

/// Applies `SWITCHYARD__SOURCE__BROKERS=host:9092`-style variables onto the parsed YAML.
/// Path segments are lower-cased; the value is read as YAML, so numbers and booleans work.
fn apply_env_overrides(
    root: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), String> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, raw_value) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("environment variable {name}: empty path segment"));
        }
        let value = serde_norway::from_str::<Value>(&raw_value)
            .unwrap_or_else(|_| Value::String(raw_value.clone()));
        let mut node = &mut *root;
        for (i, segment) in path.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(map) = node else {
                return Err(format!(
                    "environment variable {name}: `{}` is not a mapping in the config",
                    path[..i].join(".")
                ));
            };
            let key = Value::String(segment.clone());
            if i + 1 == path.len() {
                map.insert(key, value.clone());
                break;
            }
            node = map.entry(key).or_insert(Value::Null);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
