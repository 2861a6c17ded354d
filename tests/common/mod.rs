//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The zoo models shipped with the repository.
pub fn zoo_dir() -> PathBuf {
    repo_root().join("tests/data/zoo")
}

/// Real exports of more of the families Egret targets (see its README).
pub fn exports_dir() -> PathBuf {
    repo_root().join("tests/data/exports")
}

/// Small models of the families the zoo lacks, written by
/// `tools/make_synthetic_models.py` with onnxruntime's outputs.
pub fn synthetic_dir() -> PathBuf {
    repo_root().join("tests/data/synthetic")
}

/// `../shared/<name>` beside the checkout, or `None` with a note when absent.
pub fn shared_dir(name: &str, env_override: Option<&str>) -> Option<PathBuf> {
    if let Some(var) = env_override {
        if let Ok(p) = std::env::var(var) {
            return Some(PathBuf::from(p));
        }
    }
    let p = repo_root().join("../shared").join(name);
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} not found (set {} or put shared/ beside the checkout)",
            p.display(),
            env_override.unwrap_or("it")
        );
        None
    }
}

/// Runs every case under `dir` with `backend`, panicking with a readable list of failures.
pub fn check_all(dir: &std::path::Path, backend: egret::Backend, tol: egret::check::Tolerance) -> usize {
    let cases = egret::check::discover(dir).expect("discover cases");
    assert!(!cases.is_empty(), "no cases under {}", dir.display());
    let mut failures = Vec::new();
    let mut n = 0;
    for case in &cases {
        for r in egret::check::check_case(case, backend, tol) {
            n += 1;
            if !r.passed() {
                failures.push(format!(
                    "{}: {:?} {:?}",
                    r.case,
                    r.error,
                    r.outputs.iter().filter_map(|o| o.failure.clone()).collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {n} cases failed:\n{}", failures.len(), failures.join("\n"));
    n
}

/// Whether the WGSL tests can run: a WebGPU adapter exists (lavapipe in
/// CI). Without one they skip with a note, except under `CI=true`, where
/// a missing adapter is a failure: `.ci/run` installs lavapipe.
pub fn wgsl_adapter() -> bool {
    match egret::runtime::WgpuDevice::shared() {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI runs the WGSL tests on lavapipe, and found no adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipping the WGSL part: {e}");
            false
        }
    }
}
