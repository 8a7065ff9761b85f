//! The prompt registry: versioned prompts as files, labels that name a version, and the lock
//! that refuses a prompt whose text changed without a new version.
//!
//! `prompt_registry.dir` holds `<name>/<version>.yaml` (a prompt: `system`, `user`), known as
//! `<name>@<version>`, and optionally `<name>/labels.yaml` (`production: v2`), which makes
//! `<name>@production` another name for `<name>@v2`. The lock (`prompt_registry.lock`, default
//! `<dir>/prompts.lock`) maps every versioned prompt (`name@version`, from files or inline
//! under `prompts`) to the SHA-256 of its text; a prompt whose text no longer matches is a
//! config error naming it, so a change ships as a new version. `switchyard prompts lock`
//! writes the lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Problems;
use crate::config::plan::PromptPlan;
use crate::config::raw::{RawPrompt, RawPromptRegistry};

/// The registry's prompts, labels and lock, as read from disk.
#[derive(Debug, Default)]
pub struct Registry {
    /// `name@version` -> the prompt and the file it came from.
    pub files: BTreeMap<String, (RawPrompt, PathBuf)>,
    /// `name@label` -> `name@version`.
    pub labels: BTreeMap<String, String>,
    pub lock_path: Option<PathBuf>,
    /// `name@version` -> `sha256:<hex>`, when the lock file exists.
    pub lock: Option<BTreeMap<String, String>>,
}

/// The hash the lock records for a prompt's text.
pub fn content_hash(prompt: &RawPrompt) -> String {
    // Length-prefixed, so no split between system and user text hashes like another.
    let parts = [prompt.system.as_deref().unwrap_or_default(), &prompt.user];
    format!("sha256:{}", crate::digest::of_parts(&parts, 32))
}

/// Reads the registry's directory and (with `read_lock`) its lock; problems name the file. A
/// lock named in config must exist; the default one may not yet (a warning says so).
pub fn read(p: &mut Problems, raw: &RawPromptRegistry, read_lock: bool) -> Registry {
    let mut registry = Registry::default();
    if let Some(dir) = &raw.dir {
        read_dir(p, Path::new(dir), &mut registry);
    }
    let lock_path = raw
        .lock
        .as_ref()
        .map(PathBuf::from)
        .or_else(|| raw.dir.as_ref().map(|d| Path::new(d).join("prompts.lock")));
    if let Some(path) = lock_path.as_ref().filter(|_| read_lock) {
        match std::fs::read_to_string(path) {
            Ok(text) => match serde_norway::from_str::<BTreeMap<String, String>>(&text) {
                Ok(lock) => registry.lock = Some(lock),
                Err(e) => p.add(
                    "prompt_registry.lock",
                    format!("`{}` is not a map of name@version to hash: {e}", path.display()),
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && raw.lock.is_some() => p.add(
                "prompt_registry.lock",
                format!(
                    "`{}` does not exist; write it with `switchyard prompts lock --config <file>` and ship it with the config",
                    path.display()
                ),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => p.warn(
                "prompt_registry.lock",
                format!(
                    "`{}` does not exist: prompt texts are not checked against their versions; run `switchyard prompts lock --config <file>`",
                    path.display()
                ),
            ),
            Err(e) => p.add(
                "prompt_registry.lock",
                format!("cannot read `{}`: {e}", path.display()),
            ),
        }
    }
    registry.lock_path = lock_path;
    registry
}

fn read_dir(p: &mut Problems, dir: &Path, registry: &mut Registry) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            p.add(
                "prompt_registry.dir",
                format!("cannot read `{}`: {e}", dir.display()),
            );
            return;
        }
    };
    let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    names.sort();
    for prompt_dir in names.into_iter().filter(|path| path.is_dir()) {
        let Some(name) = prompt_dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&prompt_dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(e) => {
                p.add(
                    "prompt_registry.dir",
                    format!("cannot read `{}`: {e}", prompt_dir.display()),
                );
                continue;
            }
        };
        files.sort();
        for file in files {
            let Some(stem) = file
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml")
                .then(|| file.file_stem().and_then(|s| s.to_str()))
                .flatten()
            else {
                continue;
            };
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    p.add(
                        "prompt_registry.dir",
                        format!("cannot read `{}`: {e}", file.display()),
                    );
                    continue;
                }
            };
            if stem == "labels" {
                match serde_norway::from_str::<BTreeMap<String, String>>(&text) {
                    Ok(labels) => {
                        for (label, version) in labels {
                            registry
                                .labels
                                .insert(format!("{name}@{label}"), format!("{name}@{version}"));
                        }
                    }
                    Err(e) => p.add(
                        "prompt_registry.dir",
                        format!("`{}` is not a map of label to version: {e}", file.display()),
                    ),
                }
                continue;
            }
            match serde_norway::from_str::<RawPrompt>(&text) {
                Ok(prompt) => {
                    registry
                        .files
                        .insert(format!("{name}@{stem}"), (prompt, file.clone()));
                }
                Err(e) => p.add(
                    "prompt_registry.dir",
                    format!(
                        "`{}` is not a prompt (`system`, `user`): {e}",
                        file.display()
                    ),
                ),
            }
        }
    }
}

/// Adds the registry's prompts to the inline ones (a name defined twice is a problem).
pub fn merge(p: &mut Problems, registry: &Registry, prompts: &mut BTreeMap<String, RawPrompt>) {
    for (key, (prompt, file)) in &registry.files {
        if prompts.contains_key(key) {
            p.add(
                format!("prompts.{key}"),
                format!("also defined by `{}`; keep one", file.display()),
            );
        } else {
            prompts.insert(key.clone(), prompt.clone());
        }
    }
}

/// Checks every versioned prompt (`name@version`) against the lock: a changed text is a
/// problem naming the prompt and where it came from; one the lock does not know, a warning.
pub fn check_lock(p: &mut Problems, registry: &Registry, prompts: &BTreeMap<String, RawPrompt>) {
    let Some(lock) = &registry.lock else {
        return;
    };
    let lock_file = registry
        .lock_path
        .as_ref()
        .map_or_else(String::new, |l| l.display().to_string());
    for (key, prompt) in prompts.iter().filter(|(k, _)| k.contains('@')) {
        let origin = registry.files.get(key).map_or_else(
            || "config".to_owned(),
            |(_, f)| format!("`{}`", f.display()),
        );
        match lock.get(key) {
            Some(locked) if *locked == content_hash(prompt) => {}
            Some(_) => p.add(
                format!("prompts.{key}"),
                format!(
                    "the text ({origin}) changed since `{lock_file}` locked it: publish the change as a new version (a new name@version), or re-lock deliberately with `switchyard prompts lock`"
                ),
            ),
            None => p.warn(
                format!("prompts.{key}"),
                format!("not in `{lock_file}`: its text is not checked; run `switchyard prompts lock`"),
            ),
        }
    }
}

/// Makes every label another name for the version it names.
pub fn add_labels(
    p: &mut Problems,
    registry: &Registry,
    prompts: &mut BTreeMap<String, Arc<PromptPlan>>,
) {
    for (alias, target) in &registry.labels {
        if prompts.contains_key(alias) {
            p.add(
                format!("prompts.{alias}"),
                format!("`{alias}` is both a version and a label; rename the label"),
            );
            continue;
        }
        match prompts.get(target).cloned() {
            Some(prompt) => {
                prompts.insert(alias.clone(), prompt);
            }
            None => p.add(
                format!("prompts.{alias}"),
                format!("the label names `{target}`, which is not a prompt version"),
            ),
        }
    }
}
