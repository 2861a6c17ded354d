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

/// The CPU list less the cases `excluded-wgsl.txt` gives a reason for.
#[test]
fn every_listed_case_passes_on_the_wgsl_backend() {
    if !common::wgsl_adapter() {
        return;
    }
    run_listed("passing-wgsl.txt", Backend::Wgsl);
}

/// The CPU list less the cases `excluded-ptx.txt` gives a reason for, on
/// the PTX backend's kernels run by the PTX interpreter (no GPU needed).
#[test]
fn every_listed_case_passes_on_interpreted_ptx() {
    let Some(suite) = common::shared_dir("onnx-node-tests", Some("EGRET_ONNX_NODE_TESTS")) else {
        return;
    };
    let tol = Tolerance { rtol: 1e-3, atol: 1e-7 };
    let passing = list("passing-ptx.txt");
    let failures: Vec<String> = passing
        .iter()
        .filter_map(|case| interpreted_ptx(&suite.join(case), tol).err().map(|e| format!("{case}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} listed cases failed:\n{}",
        failures.len(),
        passing.len(),
        failures.join("\n")
    );
}

/// Every data set of a node-suite case through the PTX backend, its
/// kernels run by the interpreter: the first failure.
fn interpreted_ptx(case: &std::path::Path, tol: Tolerance) -> Result<(), String> {
    use egret::runtime::Executable;
    let e = |e: egret::Error| e.to_string();
    for set in egret::check::data_sets(case).map_err(e)? {
        let inputs = egret::check::numbered(&set, "input").map_err(e)?;
        let expected = egret::check::numbered(&set, "output").map_err(e)?;
        let opts = egret::CompileOptions {
            backend: Backend::Ptx,
            input_values: inputs.iter().cloned().collect(),
            ..Default::default()
        };
        let c = egret::canonical(&case.join("model.onnx"), &opts).map_err(e)?;
        let signature = egret::runtime::Signature::of(&c.graph, c.specialized.clone());
        let gpu = egret::gpu_plan(&c.graph, &opts, egret::PTX_LIMITS).map_err(|e| e.to_string())?;
        let ptx =
            egret::runtime::PtxExecutable::new(common::InterpretedDevice::new(), gpu).map_err(|e| e.to_string())?;
        let outs = ptx.run(signature.bind(inputs).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        if outs.len() != expected.len() {
            return Err(format!("{} outputs, {} expected", outs.len(), expected.len()));
        }
        for (got, (name, want)) in outs.iter().zip(&expected) {
            if let Some(f) = egret::check::compare(name, got, want, tol).failure {
                return Err(format!("{}: {name}: {f}", set.display()));
            }
        }
    }
    Ok(())
}

#[test]
fn the_ptx_list_is_the_cpu_list_less_its_exclusions() {
    cpu_list_less_exclusions("ptx");
}

#[test]
fn the_wgsl_list_is_the_cpu_list_less_its_exclusions() {
    cpu_list_less_exclusions("wgsl");
}

/// `passing-<backend>.txt` is `passing-cpu.txt` less the cases
/// `excluded-<backend>.txt` gives a reason for.
fn cpu_list_less_exclusions(backend: &str) {
    let cpu = list("passing-cpu.txt");
    let listed = list(&format!("passing-{backend}.txt"));
    let excluded = list(&format!("excluded-{backend}.txt"));
    let extra: Vec<_> = listed.difference(&cpu).collect();
    assert!(extra.is_empty(), "on the {backend} list but not the cpu list: {extra:?}");
    let missing: Vec<_> = cpu.difference(&listed).filter(|c| !excluded.contains(*c)).collect();
    assert!(
        missing.is_empty(),
        "on the cpu list, neither on the {backend} list nor excluded with a reason: {missing:?}"
    );
    let both: Vec<_> = listed.intersection(&excluded).collect();
    assert!(both.is_empty(), "listed as passing on {backend} and excluded: {both:?}");
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

/// ONNX's `Attention` op (opset 23), from node-suite cases checked into the
/// repository (grouped-query heads, 3D inputs, a KV cache, boolean and
/// additive masks, causal, soft cap, fully masked rows, the QK output), so
/// the import is tested without `../shared`: each passes on both backends
/// at `--opt 0` and `--opt 2` and becomes one fused attention.
#[test]
fn the_attention_op_imports_and_fuses() {
    let dir = common::repo_root().join("tests/data/onnx-attention");
    let cases = egret::check::discover(&dir).unwrap();
    assert_eq!(cases.len(), 8);
    let tol = Tolerance { rtol: 1e-3, atol: 1e-6 };
    for case in &cases {
        passes_everywhere(case, tol);
        let c = egret::canonical(&case.join("model.onnx"), &Default::default()).unwrap();
        let fused = egret::passes::egraph::count_fused(&c.graph);
        // The soft-capped case too: the importer writes the cap as a tanh
        // between the scores and the softmax, which the fused op takes.
        assert!(fused.iter().any(|(k, n)| k == "attention" && *n == 1), "{}: {fused:?}", case.display());
    }
}

/// ONNX's narrow types, carried in f32 and 8-bit integers
/// (`egret_ir::narrow`), and `BitCast` (opset 26), from node-suite cases
/// checked into the repository: casts to and from every 8- and 4-bit float
/// (saturating and not, `float8e8m0`'s rounding), int4, int2 and uint2
/// inputs and outputs, quantizing to and from them, so the types are
/// tested without `../shared`. Each passes on the reference and the cpu at
/// `--opt 0` and `--opt 2`, and on wgsl.
#[test]
fn narrow_types_and_bit_casts_import() {
    let dir = common::repo_root().join("tests/data/onnx-narrow");
    let cases = egret::check::discover(&dir).unwrap();
    assert_eq!(cases.len(), 21);
    let tol = Tolerance { rtol: 1e-3, atol: 1e-7 };
    for case in &cases {
        passes_everywhere(case, tol);
        if common::wgsl_adapter() {
            for r in check_case(case, Backend::Wgsl, tol) {
                assert!(r.passed(), "wgsl: {}: {:?} {:?}", r.case, r.error, r.outputs);
            }
        }
    }
}

/// The case passes on the reference backend and on the cpu backend at
/// `--opt 0` and `--opt 2`.
fn passes_everywhere(case: &std::path::Path, tol: Tolerance) {
    for r in check_case(case, Backend::Reference, tol) {
        assert!(r.passed(), "reference: {}: {:?} {:?}", r.case, r.error, r.outputs);
    }
    for opt_level in [0, 2] {
        let opts = egret::CompileOptions { opt_level, ..Default::default() };
        for r in egret::check::check_case_with(case, &opts, tol) {
            assert!(r.passed(), "--opt {opt_level}: {}: {:?} {:?}", r.case, r.error, r.outputs);
        }
    }
}

/// What the import does not cover is refused with the attribute named.
#[test]
fn unsupported_attention_outputs_are_refused_by_name() {
    let case =
        common::repo_root().join("tests/data/onnx-attention-unsupported/test_attention_4d_with_qk_matmul_softmax");
    let err = egret::compile(&case.join("model.onnx"), &Default::default()).err().expect("refused");
    let text = format!("{err}");
    assert!(text.contains("Attention") && text.contains("qk_matmul_output_mode 3"), "{text}");
}

/// ONNX's `RotaryEmbedding` (opset 23), `Swish` (24) and `SwiGLU` (28), from
/// node-suite cases checked into the repository (4D and 3D inputs, with and
/// without position ids, interleaved pairs, a partial rotary dimension;
/// `alpha` 1 and not): each passes on both backends at `--opt 0` and
/// `--opt 2`, and the swishes with `alpha` 1 are recognised as SiLU.
#[test]
fn rotary_embedding_and_swish_ops_import() {
    let dir = common::repo_root().join("tests/data/onnx-rotary-swish");
    let cases = egret::check::discover(&dir).unwrap();
    assert_eq!(cases.len(), 11);
    let tol = Tolerance { rtol: 1e-3, atol: 1e-6 };
    for case in &cases {
        passes_everywhere(case, tol);
        if case.ends_with("test_swish") || case.ends_with("test_swiglu") {
            let c = egret::canonical(&case.join("model.onnx"), &Default::default()).unwrap();
            let fused = egret::passes::egraph::count_fused(&c.graph);
            assert!(fused.iter().any(|(k, n)| k == "silu" && *n == 1), "{}: {fused:?}", case.display());
        }
    }
}

/// A rotary dimension that is odd or larger than the head is refused by name.
#[test]
fn bad_rotary_dimensions_are_refused() {
    use protobuf::Message;
    let case = common::repo_root().join("tests/data/onnx-rotary-swish/test_rotary_embedding_with_rotary_dim");
    let bytes = std::fs::read(case.join("model.onnx")).unwrap();
    for dim in [3, 10] {
        let mut model = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).unwrap();
        let node = &mut model.graph.as_mut().unwrap().node[0];
        let attr = node.attribute.iter_mut().find(|a| a.name == "rotary_embedding_dim").unwrap();
        attr.i = dim;
        let dir = std::env::temp_dir().join(format!("egret-rotary-dim-{dim}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.onnx");
        std::fs::write(&path, model.write_to_bytes().unwrap()).unwrap();
        let err = egret::compile(&path, &Default::default()).err().expect("refused");
        let text = format!("{err}");
        assert!(text.contains("RotaryEmbedding") && text.contains(&format!("rotary_embedding_dim {dim}")), "{text}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
