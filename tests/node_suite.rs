//! The official ONNX node tests, run from a checked-in list (conformance by
//! manifest): a listed case that fails fails this test.

mod common;

use egret::check::{check_case, Tolerance};
use egret::Backend;
use std::collections::BTreeSet;

fn list(file: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(common::repo_root().join("tests/node-suite").join(file)).unwrap();
    text.lines().map(|l| l.split('#').next().unwrap().trim()).filter(|l| !l.is_empty()).map(String::from).collect()
}

#[test]
fn the_lists_are_consistent() {
    let passing = list("passing.txt");
    let excluded = list("excluded.txt");
    assert!(passing.len() >= 600, "the pass list holds {} cases", passing.len());
    let both: Vec<_> = passing.intersection(&excluded).collect();
    assert!(both.is_empty(), "listed as passing and excluded: {both:?}");
}

#[test]
fn every_listed_case_passes_on_the_reference_backend() {
    run_listed("passing.txt", Backend::Reference);
}

#[test]
fn every_listed_case_passes_on_the_cpu_backend() {
    run_listed("passing-cpu.txt", Backend::Cpu);
}

fn run_listed(file: &str, backend: Backend) {
    let Some(suite) = common::shared_dir("onnx-node-tests", Some("EGRET_ONNX_NODE_TESTS")) else {
        return;
    };
    // The suite's own comparison.
    let tol = Tolerance { rtol: 1e-3, atol: 1e-7 };
    let mut failures = Vec::new();
    let passing = list(file);
    for case in &passing {
        let dir = suite.join(case);
        if !dir.is_dir() {
            failures.push(format!("{case}: missing from {}", suite.display()));
            continue;
        }
        for r in check_case(&dir, backend, tol) {
            if !r.passed() {
                failures.push(format!(
                    "{case}: {:?} {:?}",
                    r.error,
                    r.outputs.iter().filter_map(|o| o.failure.clone()).collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} listed cases failed:\n{}",
        failures.len(),
        passing.len(),
        failures.join("\n")
    );
}
