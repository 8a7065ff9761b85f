//! `switchyard check-config`: good files pass, bad ones fail naming the field.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn check(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/switchyard.yaml"))
        .unwrap()
}

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every config in `config/` and each pattern in `config/examples/` (run from the repository
/// root, where their relative schema paths point).
#[test]
fn every_example_in_config_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for dir in ["config", "config/examples"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let (ok, text) = check(&path);
                assert!(ok, "{}: {text}", path.display());
                checked += 1;
            }
        }
    }
    assert!(checked >= 11, "{checked} configs");
}

#[test]
fn a_typo_in_a_field_name_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = example().replacen("timeout_ms: 10000", "timout_ms: 10000", 1);
    let (ok, text) = check(&write(&dir, &bad));
    assert!(!ok);
    assert!(
        text.contains("models.small") && text.contains("unknown field `timout_ms`"),
        "{text}"
    );
}

#[test]
fn a_missing_provider_fails_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = example().replacen("provider: openai", "provider: opnai", 1);
    let (ok, text) = check(&write(&dir, &bad));
    assert!(!ok);
    assert!(
        text.contains("models.large.provider") || text.contains("models.small.provider"),
        "{text}"
    );
    assert!(text.contains("provider `opnai` is not defined"), "{text}");
}

#[test]
fn an_unreadable_file_fails_with_its_path() {
    let (ok, text) = check(Path::new("/nonexistent/switchyard.yaml"));
    assert!(!ok);
    assert!(
        text.contains("/nonexistent/switchyard.yaml") && text.contains("cannot read"),
        "{text}"
    );
}

/// The prompt lock: `switchyard prompts lock` records each versioned prompt's text; a later
/// change of that text under the same version fails `check-config` naming the prompt.
#[test]
fn a_prompt_text_changed_without_a_new_version_fails() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("prompts.lock");
    let locked = format!(
        "prompt_registry: {{lock: \"{}\"}}\n{}",
        lock.display(),
        example()
    );
    let path = write(&dir, &locked);
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["prompts", "lock", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(&lock)
        .unwrap()
        .contains("triage@v1"));
    let (ok, text) = check(&path);
    assert!(ok, "{text}");
    let changed = locked.replacen("Ticket:", "Customer ticket:", 1);
    assert_ne!(changed, locked);
    let (ok, text) = check(&write(&dir, &changed));
    assert!(!ok, "{text}");
    assert!(
        text.contains("prompts.triage@v1") && text.contains("new version"),
        "{text}"
    );
}
