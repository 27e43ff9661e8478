//! The deployment files are checked, not just written: `deploy/k8s/`
//! validates offline against the Kubernetes schemas (kubernetes-validate,
//! installed by `scripts/test.sh`), and every setting the manifests pass
//! to `switchyard` is one the binary takes.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_kubernetes_manifests_validate_offline() {
    let tool = std::env::var("SWITCHYARD_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pytools/bin/kubernetes-validate")
        });
    assert!(
        tool.exists(),
        "{} is missing: scripts/test.sh installs it (scripts/ensure-python-tools.sh)",
        tool.display()
    );
    let files = manifests();
    let kinds = ["Deployment", "Service", "PodDisruptionBudget", "Job"];
    for kind in kinds {
        assert!(
            files.iter().any(|f| std::fs::read_to_string(f)
                .unwrap()
                .contains(&format!("kind: {kind}\n"))),
            "deploy/k8s has a {kind}"
        );
    }
    let out = Command::new(&tool)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert_eq!(
        report.matches(" passed for resource ").count(),
        files.len(),
        "{report}"
    );
}

/// The environment variables and arguments the manifests give the
/// container are ones `switchyard serve` / `db migrate` document.
#[test]
fn the_manifests_use_only_settings_the_binary_takes() {
    let help = |args: &[&str]| {
        let out = Command::new(switchyard_tests::bin())
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let serve = help(&["serve", "--help"]);
    let migrate = help(&["db", "migrate", "--help"]);
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        let takes = if text.contains("\"migrate\"") {
            &migrate
        } else {
            &serve
        };
        for line in text.lines() {
            let Some(name) = line.trim().strip_prefix("- name: ") else {
                continue;
            };
            // SWITCHYARD_LOG is the log filter, read before any command.
            let is_setting = (name.starts_with("SWITCHYARD_") && name != "SWITCHYARD_LOG")
                || name == "DATABASE_URL";
            if is_setting {
                assert!(
                    takes.contains(&format!("[env: {name}")),
                    "{} sets {name}, which the command does not read",
                    file.display()
                );
            }
        }
    }
    assert!(serve.contains("--listen"), "{serve}");
}
