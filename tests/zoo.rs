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

/// The synthetic models (a LLaMA-style decoder: RMS norms, rotary
/// embeddings, grouped-query attention, a causal mask, SwiGLU; a T5-style
/// encoder-decoder: relative position bias, unscaled and cross attention,
/// gated GELU) on both backends and at every optimisation level.
#[test]
fn synthetic_models_pass_everywhere() {
    let dir = common::synthetic_dir();
    // bert_dynamic and gpt2_kv have two data sets of different shapes each.
    assert_eq!(common::check_all(&dir, Backend::Reference, Tolerance::default()), 6);
    for opt_level in [0, 1, 2] {
        let opts = egret::CompileOptions { opt_level, ..Default::default() };
        for case in egret::check::discover(&dir).unwrap() {
            for r in egret::check::check_case_with(&case, &opts, Tolerance::default()) {
                assert!(r.passed(), "--opt {opt_level}: {}: {:?} {:?}", r.case, r.error, r.outputs);
            }
        }
    }
}

/// What the e-graph must reach on every model: each softmax of the
/// exported graph inside a fused attention, and no norm or GELU left as
/// primitives (their means, square roots, powers and erfs all fold; a tanh
/// may stay, as BERT's pooler has one).
#[test]
fn every_attention_norm_and_gelu_fuses() {
    let mut dirs = vec![common::zoo_dir(), common::synthetic_dir()];
    dirs.extend(common::shared_dir("perf", Some("EGRET_PERF_MODELS")));
    for dir in dirs {
        for case in egret::check::discover(&dir).unwrap() {
            let model = case.join("model.onnx");
            let text = |opt_level| {
                let opts = common::options_for(&case, egret::CompileOptions { opt_level, ..Default::default() });
                let c = egret::canonical(&model, &opts).unwrap();
                (egret::ir::text::print_with(&c.graph, egret::ir::text::Constants::ElideOver(0)), c.graph)
            };
            let (unfused, _) = text(0);
            let (fused, graph) = text(2);
            let softmaxes = unfused.matches("= softmax{").count();
            let counts = egret::passes::egraph::count_fused(&graph);
            let attentions = counts.iter().find(|(k, _)| k.as_str() == "attention").map_or(0, |(_, n)| *n);
            assert!(softmaxes > 0, "{}: no attention softmax to fuse", case.display());
            assert_eq!(attentions, softmaxes, "{}: attentions fused vs softmaxes exported", case.display());
            // A norm's mean keeps its dims; a pooling mean (the Perceiver's
            // head) does not and may stay.
            for leftover in ["= softmax{", "keepdims=true} ", "= sqrt ", "= pow ", "= erf "] {
                let line = fused.lines().find(|l| l.contains(leftover));
                assert!(line.is_none(), "{}: left at --opt 2: {}", case.display(), line.unwrap_or_default());
            }
        }
    }
}
