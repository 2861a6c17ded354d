//! Exports with symbolic dims as users make them: Hugging Face models
//! through `torch.onnx.export` with `dynamic_axes` or `dynamic_shapes`,
//! with data sets of several shapes and onnxruntime's outputs
//! (`tools/make_exports.py`, `tests/data/dynamic_exports/README.md`). Each
//! passes at every shape; those the plan holds at symbolic sizes run every
//! shape from one program.

mod common;

use egret::check::{check_case_counting, discover, Tolerance};
use egret::{Backend, CompileOptions};
use std::path::PathBuf;
use std::process::Command;

fn dir() -> PathBuf {
    common::repo_root().join("tests/data/dynamic_exports")
}

/// Every data set of every export on `backend`: (data sets run, programs
/// compiled for values of symbolic dims) per export.
fn check_all(backend: Backend) -> Vec<(String, usize, usize)> {
    let opts = CompileOptions { backend, ..Default::default() };
    let mut failures = vec![];
    let mut out = vec![];
    for case in discover(&dir()).unwrap() {
        let (reports, compiles) = check_case_counting(&case, &opts, Tolerance::default());
        for r in &reports {
            if !r.passed() {
                let outs: Vec<_> = r.outputs.iter().filter_map(|o| o.failure.clone()).collect();
                failures.push(format!("{} ({}): {:?} {outs:?}", r.case, backend.name(), r.error));
            }
        }
        assert_eq!(compiles.models, 1, "{}: one model for every data set", case.display());
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        out.push((name, reports.len(), compiles.specializations));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    out
}

/// The exports whose every kernel takes symbolic sizes: one program for
/// every shape (no per-binding plan), on every backend.
const ONE_PROGRAM: &[&str] = &[
    "gpt2_past_legacy",
    "gpt2_past_dynamo",
    "llama_gqa_past_legacy",
    "llama_gqa_past_dynamo",
    "vit_batch_legacy",
    "vit_batch_dynamo",
    "t5_legacy",
    "bert_mean_pool_legacy",
    "bert_mean_pool_dynamo",
];

#[test]
fn every_export_passes_at_every_shape_on_the_cpu_and_reference() {
    for backend in [Backend::Reference, Backend::Cpu] {
        let runs = check_all(backend);
        assert_eq!(runs.len(), ONE_PROGRAM.len(), "{runs:?}");
        for (name, sets, programs) in runs {
            assert!(sets >= 3, "{name}: {sets} data sets");
            if ONE_PROGRAM.contains(&name.as_str()) {
                assert_eq!(programs, 0, "{name} compiled a program per shape on {}", backend.name());
            }
        }
    }
}

#[test]
fn every_export_passes_at_every_shape_on_wgsl() {
    if !common::wgsl_adapter() {
        return;
    }
    for (name, _, programs) in check_all(Backend::Wgsl) {
        if ONE_PROGRAM.contains(&name.as_str()) {
            assert_eq!(programs, 0, "{name} compiled a program per shape on wgsl");
        }
    }
}

/// `egret explain --json --opt OPT` of one export.
fn explain_at(name: &str, opt: &str) -> serde_json::Value {
    let model = dir().join(name).join("model.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["explain", model.to_str().unwrap(), "--json", "--opt", opt])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `explain` says which nodes make an export planned per binding, and
/// none for those that run from one program.
#[test]
fn explain_names_the_nodes_that_need_a_binding() {
    for name in ONE_PROGRAM {
        let v = explain_at(name, "2");
        assert_eq!(v["per_binding"], serde_json::json!([]), "{name}");
        assert!(v["kernels"].is_array(), "{name}: no plan");
    }
    // Unfused (`--opt 0`), attention is a product of two activations, whose
    // kernels take the batch and sizes known so far: explain names them.
    let v = explain_at("gpt2_past_legacy", "0");
    let reasons = v["per_binding"].as_array().unwrap();
    assert!(!reasons.is_empty() && v["kernels"].is_null(), "{v}");
    for r in reasons {
        assert_eq!(r["op"], "matmul", "{r}");
        assert!(r["node"].as_str().unwrap().contains("/attn/MatMul"), "{r}");
        assert!(r["symbols"].as_array().unwrap().contains(&serde_json::json!("past_sequence")), "{r}");
    }
}

/// Every data set of every export through one symbolic PTX program per
/// model, interpreted: the same kernels at every shape, matching
/// onnxruntime's outputs.
#[test]
fn one_ptx_program_per_export_serves_every_data_set() {
    use egret::runtime::{Executable, PtxExecutable};
    for name in ONE_PROGRAM {
        let case = dir().join(name);
        let opts = CompileOptions { backend: Backend::Ptx, ..Default::default() };
        let c = egret::canonical(&case, &opts).unwrap();
        let program = egret::symbolic_gpu_plan(&c.graph, &opts, egret::PTX_LIMITS).unwrap();
        let ptx = PtxExecutable::symbolic(common::InterpretedDevice::new(), program).unwrap();
        let names: Vec<String> = c.graph.inputs().iter().map(|&v| c.graph.input_name(v).to_string()).collect();
        for set in egret::check::data_sets(&case).unwrap() {
            let stored = egret::check::numbered(&set, "input").unwrap();
            let inputs = names
                .iter()
                .map(|n| stored.iter().find(|(s, _)| s == n).unwrap_or_else(|| panic!("{name}: no `{n}`")).1.clone())
                .collect();
            let got = ptx.run(inputs).unwrap_or_else(|e| panic!("{}: {e}", set.display()));
            let expected = egret::check::numbered(&set, "output").unwrap();
            for (g, (o, w)) in got.iter().zip(&expected) {
                let r = egret::check::compare(o, g, w, Tolerance::default());
                assert!(r.failure.is_none(), "{} {o}: {:?}", set.display(), r.failure);
            }
        }
    }
}
