//! Every scenario under examples/desired-states is planned and its plan compared with the
//! snapshot under tests/snapshots (text form). Invalid scenarios snapshot their error.

use aos_cm::reconcilers::plan_all;
use aos_cm::render::plan_text;
use aos_cm::scenario;
use std::path::{Path, PathBuf};

fn scenarios() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/desired-states");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The one helper every scenario goes through: load, plan, render.
fn check(dir: &Path) -> String {
    match scenario::load(dir) {
        Ok(sc) => plan_text(&plan_all(&sc.snapshot, sc.now)),
        Err(e) => {
            // Paths in errors are relative to the scenario folder, for stable snapshots.
            let text = e.to_string();
            let prefix = format!("{}/", dir.display());
            format!("error: {}", text.replace(&prefix, ""))
        }
    }
}

#[test]
fn every_scenario_matches_its_snapshot() {
    let dirs = scenarios();
    assert!(
        dirs.len() >= 10,
        "expected at least 10 scenarios, found {}",
        dirs.len()
    );
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let out = check(&dir);
        let invalid = name.starts_with("invalid-");
        assert_eq!(
            out.starts_with("error: "),
            invalid,
            "{name}: invalid scenarios (and only they) must fail to load:\n{out}"
        );
        insta::assert_snapshot!(name, out);
    }
}

#[test]
fn planning_is_deterministic() {
    for dir in scenarios() {
        let first = check(&dir);
        let second = check(&dir);
        assert_eq!(first, second, "{} planned differently twice", dir.display());
        if let Ok(sc) = scenario::load(&dir) {
            let a = serde_json::to_vec(&aos_cm::render::plan_json(&plan_all(&sc.snapshot, sc.now)))
                .unwrap();
            let sc2 = scenario::load(&dir).unwrap();
            let b = serde_json::to_vec(&aos_cm::render::plan_json(&plan_all(
                &sc2.snapshot,
                sc2.now,
            )))
            .unwrap();
            assert_eq!(a, b, "{}: JSON plan differs between runs", dir.display());
        }
    }
}

#[test]
fn plan_cli_exit_codes() {
    let bin = env!("CARGO_BIN_EXE_aos-cm");
    for dir in scenarios() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let out = std::process::Command::new(bin)
            .arg("plan")
            .arg(&dir)
            .output()
            .unwrap();
        let want = if name.starts_with("invalid-") { 2 } else { 0 };
        assert_eq!(
            out.status.code(),
            Some(want),
            "{name}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn plan_reports_missing_files_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_aos-cm");
    let out = std::process::Command::new(bin)
        .arg("plan")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("desired.json: missing"), "{err}");
}

#[test]
fn plan_against_a_store_matches_the_scenario_plan() {
    let dir = tempfile::tempdir().unwrap();
    let scenario_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/desired-states/fresh-install");
    let sc = scenario::load(&scenario_dir).unwrap();
    {
        let store = aos_cm::store::Store::open(&dir.path().join("cm.redb")).unwrap();
        store.write(|tx| tx.set_snapshot(&sc.snapshot)).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_aos-cm");
    let out = std::process::Command::new(bin)
        .args(["plan", "--store"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), check(&scenario_dir));

    let missing = std::process::Command::new(bin)
        .args(["plan", "--store", "/nonexistent-aos-cm-store"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no store there"));
}
