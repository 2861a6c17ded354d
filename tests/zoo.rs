//! Real exported models against onnxruntime's stored outputs.

mod common;

use egret::check::Tolerance;
use egret::Backend;

#[test]
fn every_zoo_model_passes_on_the_reference_backend() {
    let n = common::check_all(&common::zoo_dir(), Backend::Reference, Tolerance::default());
    assert_eq!(n, 7, "the zoo has seven models");
}

#[test]
fn perf_models_pass_on_the_reference_backend() {
    let Some(dir) = common::shared_dir("perf", Some("EGRET_PERF_MODELS")) else {
        return;
    };
    common::check_all(&dir, Backend::Reference, Tolerance::default());
}

/// The canonical graph of every zoo model prints, parses back, and prints
/// the same: the text format is a faithful view of real graphs.
#[test]
fn ir_text_round_trips_on_every_zoo_model() {
    for case in egret::check::discover(&common::zoo_dir()).unwrap() {
        let m = egret::compile(&case.join("model.onnx"), &Default::default()).unwrap();
        let text = egret::ir::text::print(&m.graph);
        let parsed = egret::ir::text::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        assert_eq!(egret::ir::text::print(&parsed), text, "{}", case.display());
    }
}

/// Canonicalisation folds the exporters' shape arithmetic away completely.
#[test]
fn shape_subgraphs_fold_away() {
    for case in egret::check::discover(&common::zoo_dir()).unwrap() {
        let m = egret::compile(&case.join("model.onnx"), &Default::default()).unwrap();
        let text = egret::ir::text::print_with(&m.graph, egret::ir::text::Constants::ElideOver(0));
        for op in ["= shape{", "= identity", "= constant_of_shape"] {
            assert!(!text.contains(op), "{}: `{op}` survived canonicalisation", case.display());
        }
    }
}

#[test]
fn every_zoo_model_passes_on_the_cpu_backend() {
    let n = common::check_all(&common::zoo_dir(), Backend::Cpu, Tolerance::default());
    assert_eq!(n, 7);
}

#[test]
fn perf_models_pass_on_the_cpu_backend() {
    let Some(dir) = common::shared_dir("perf", Some("EGRET_PERF_MODELS")) else {
        return;
    };
    common::check_all(&dir, Backend::Cpu, Tolerance::default());
}

/// The zoo again with every matmul that can take it on the generated
/// register-tiled kernel instead of the GEMM library.
#[test]
fn every_zoo_model_passes_with_generated_matmuls() {
    use egret::backends::plan::MatMulImpl;
    let opts = egret::CompileOptions { matmul: Some(MatMulImpl::Generated), ..Default::default() };
    for case in egret::check::discover(&common::zoo_dir()).unwrap() {
        for r in egret::check::check_case_with(&case, &opts, Tolerance::default()) {
            assert!(r.passed(), "{}: {:?} {:?}", r.case, r.error, r.outputs);
        }
    }
}

/// Every optimisation level computes the same model: the zoo at --opt 0 and
/// --opt 1 (the tests above run the default, --opt 2).
#[test]
fn every_zoo_model_passes_at_every_opt_level() {
    for opt_level in [0, 1] {
        let opts = egret::CompileOptions { opt_level, ..Default::default() };
        for case in egret::check::discover(&common::zoo_dir()).unwrap() {
            for r in egret::check::check_case_with(&case, &opts, Tolerance::default()) {
                assert!(r.passed(), "--opt {opt_level}: {}: {:?} {:?}", r.case, r.error, r.outputs);
            }
        }
    }
}
