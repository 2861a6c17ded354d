//! Quantized, half-precision and onnxruntime-optimised models, as
//! onnxruntime's own tools write them (`tools/make_formats.py`,
//! `tests/data/formats/README.md`): every data set of every model and op
//! case on the reference, the CPU, wgsl and interpreted PTX, against
//! onnxruntime's outputs on the same file.

mod common;

use egret::check::{check_case_counting, discover, Tolerance};
use egret::{Backend, CompileOptions};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    common::repo_root().join("tests/data/formats")
}

/// What each case is checked at. Every integer format matches onnxruntime
/// at the f32 tolerance: Egret computes the same integers exactly (in f32)
/// and dequantizes as onnxruntime does, accuracy level 4's int8
/// activations included. Half-precision models are computed in f32, where
/// onnxruntime rounds every op's result to f16: their tolerance is f16's
/// (one part in 2^11 per op, over a few ops; a ViT's 14 layers reach
/// 2e-3 where values are near 1).
fn tolerance(case: &Path) -> Tolerance {
    let name = case.file_name().unwrap().to_string_lossy();
    match name.as_ref() {
        "vit_fp16" => Tolerance { rtol: 1e-2, atol: 4e-3 },
        n if n.ends_with("_fp16") => Tolerance { rtol: 1e-2, atol: 1e-4 },
        _ => Tolerance::default(),
    }
}

/// Cases Egret refuses, with the reason its error gives.
const REFUSED: &[(&str, &str)] = &[];

fn cases() -> Vec<PathBuf> {
    let mut cases = discover(&dir()).unwrap();
    cases.retain(|c| !REFUSED.iter().any(|(n, _)| c.ends_with(n)));
    assert!(cases.len() >= 60, "{} cases", cases.len());
    cases
}

/// Every data set of every case on `backend`: the failures.
fn failures_on(backend: Backend) -> Vec<String> {
    let mut failures = vec![];
    for case in cases() {
        let opts = CompileOptions { backend, ..Default::default() };
        let (reports, _) = check_case_counting(&case, &opts, tolerance(&case));
        for r in reports.iter().filter(|r| !r.passed()) {
            let outs: Vec<_> = r.outputs.iter().filter_map(|o| o.failure.clone()).collect();
            failures.push(format!("{} ({}): {:?} {outs:?}", r.case, backend.name(), r.error));
        }
    }
    failures
}

#[test]
fn every_format_passes_on_the_reference_and_the_cpu() {
    for backend in [Backend::Reference, Backend::Cpu] {
        let failures = failures_on(backend);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn every_format_passes_on_wgsl() {
    if !common::wgsl_adapter() {
        return;
    }
    let failures = failures_on(Backend::Wgsl);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every data set through the PTX backend's kernels, run by the
/// interpreter (one program per data set, its dims bound).
#[test]
fn every_format_passes_on_interpreted_ptx() {
    use egret::runtime::Executable;
    let mut failures = vec![];
    for case in cases() {
        for set in egret::check::data_sets(&case).unwrap() {
            let inputs = egret::check::numbered(&set, "input").unwrap();
            let expected = egret::check::numbered(&set, "output").unwrap();
            let opts =
                CompileOptions { backend: Backend::Ptx, input_values: inputs.iter().cloned().collect(), ..Default::default() };
            let c = egret::canonical(&case.join("model.onnx"), &opts).unwrap();
            let signature = egret::runtime::Signature::of(&c.graph, c.specialized.clone());
            let ptx = common::interpreted_ptx(&c.graph, &opts);
            let outs = match ptx.run(signature.bind(inputs.clone()).unwrap()) {
                Ok(o) => o,
                Err(e) => {
                    failures.push(format!("{}: {e}", set.display()));
                    continue;
                }
            };
            for (got, (name, want)) in outs.iter().zip(&expected) {
                if let Some(f) = egret::check::compare(name, got, want, tolerance(&case)).failure {
                    failures.push(format!("{} {name}: {f}", set.display()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
