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
            let opts = CompileOptions {
                backend: Backend::Ptx,
                input_values: inputs.iter().cloned().collect(),
                ..Default::default()
            };
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

/// The CPU's loop nests convert f32 to and from f16, bf16, uint8 and int8
/// exactly as the reference evaluator does (the `half` crate's rounding to
/// nearest even, Rust's saturating casts): bit for bit over the values
/// where conversions go wrong (ties, subnormals, the largest half and just
/// past it, infinities, NaN, the 8-bit ranges' ends) and a sweep over
/// every binade.
#[test]
fn half_and_narrow_casts_match_the_reference_bit_for_bit() {
    use egret::ir::Tensor;
    use egret::runtime::{CpuExecutable, Executable, ReferenceExecutable};
    let p = |e: i32| 2f32.powi(e);
    let mut x = vec![
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.99,
        65520.0,
        1e10,
        -1e10,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        p(-14),
        p(-24),
        p(-25),
        3.0 * p(-25),
        1.5 * p(-24),
        -2.5 * p(-24),
        p(-14) - p(-24),
        1.0 + p(-11),
        1.0 + 3.0 * p(-11),
        1.0 + p(-8),
        1.0 + p(-8) + p(-16),
        255.5,
        256.0,
        -129.0,
        127.5,
        -128.5,
        300.7,
        -0.4,
        0.5,
        1.5,
        2.5,
    ];
    let mut rng = egret::io::SplitMix::new(7);
    for e in -30..20 {
        for _ in 0..8 {
            let m = 1.0 + rng.next_f64() as f32;
            x.push(if rng.next_u64() % 2 == 0 { m * p(e) } else { -m * p(e) });
        }
    }
    let n = x.len();
    let g = egret::ir::text::parse(&format!(
        "v0: f32[{n}] = input{{name=\"x\"}}
v1: f16[{n}] = cast{{to=f16}} v0
v2: f32[{n}] = cast{{to=f32}} v1
v3: bf16[{n}] = cast{{to=bf16}} v0
v4: f32[{n}] = cast{{to=f32}} v3
v5: u8[{n}] = cast{{to=u8}} v0
v6: i8[{n}] = cast{{to=i8}} v0
v7: f32[{n}] = cast{{to=f32}} v5
v8: f32[{n}] = cast{{to=f32}} v6
output \"f16\" = v1
output \"f16_f32\" = v2
output \"bf16\" = v3
output \"bf16_f32\" = v4
output \"u8\" = v5
output \"i8\" = v6
output \"u8_f32\" = v7
output \"i8_f32\" = v8
"
    ))
    .unwrap();
    let plan = egret::backends::lower(&g, Default::default()).unwrap();
    let chosen = egret::backends::cpu::choose::choose(plan.clone());
    assert!(chosen.kernels.iter().all(|k| k.kind_name() != "reference"), "{}", plan.describe());
    let cpu = CpuExecutable::new(egret::backends::cpu::compile_with(plan, true).unwrap(), 1);
    let reference = ReferenceExecutable::new(g.clone()).unwrap();
    let input = || vec![Tensor::from_vec(vec![n], x.clone())];
    let (want, got) = (reference.run(input()).unwrap(), cpu.run(input()).unwrap());
    for ((w, gt), (name, _)) in want.iter().zip(&got).zip(g.outputs()) {
        assert_eq!(w.dtype(), gt.dtype(), "{name}");
        let (wb, gb) = (w.bytes(), gt.bytes());
        let size = w.dtype().size_bytes();
        for i in 0..n {
            let (a, b) = (&wb[i * size..(i + 1) * size], &gb[i * size..(i + 1) * size]);
            let nan = w.data().get_f64(i).is_nan() && gt.data().get_f64(i).is_nan();
            assert!(a == b || nan, "{name} of {:e} (#{i}): reference {a:?}, cpu {b:?}", x[i]);
        }
    }
}

/// The CPU keeps each format's weights at their width in its packed GEMM:
/// integer codes for 4- and 8-bit weights (the importer's claim, checked
/// when packed; int8 panels for an integer product's weight, which VNNI
/// multiplies as integers), halves for half-precision ones. A change that lost the
/// claim (a fold that copies the weight, say) would still pass every
/// accuracy test and read 2-8x the bytes per product: this catches it.
#[test]
fn quantized_and_half_weights_stay_narrow_on_the_cpu() {
    use egret::backends::cpu::choose::packed_coding;
    use egret::backends::plan::{KernelKind, MatMulImpl, Storage};
    let dims = |pairs: &[(&str, usize)]| pairs.iter().map(|&(n, v)| (n.to_string(), v)).collect();
    for (model, bound, want, count) in [
        ("bert_dynamic_int8", dims(&[]), "int8", 12),
        ("bert_dynamic_uint8_per_channel", dims(&[]), "8-bit codes", 12),
        ("bert_qdq_static", dims(&[("batch", 1), ("sequence", 8)]), "8-bit codes", 12),
        ("vit_qdq_static_per_channel", dims(&[("batch", 1)]), "8-bit codes", 12),
        ("llama_int4_gather", dims(&[]), "4-bit codes", 15),
        ("llama_O2_int4_asym", dims(&[]), "4-bit codes", 15),
        ("vit_fp16", dims(&[]), "f16", 13),
    ] {
        let opts = CompileOptions { dims: bound, ..Default::default() };
        let e = egret::explain::explain(&dir().join(model), &opts, Backend::Cpu).unwrap();
        let plan = e.plan.unwrap_or_else(|| panic!("{model}: no plan"));
        let codings: Vec<&str> = plan
            .kernels
            .iter()
            .filter_map(|k| match &k.kind {
                KernelKind::MatMul(mm) if mm.implementation == MatMulImpl::Packed => {
                    let Storage::Constant(t) = &plan.buffers[mm.b].storage else { return None };
                    packed_coding(t).map(|c| c.name())
                }
                _ => None,
            })
            .collect();
        assert_eq!(codings.iter().filter(|&&c| c == want).count(), count, "{model}: {codings:?}");
    }
}

/// An fp16 model's embedding table is gathered at its width: the CPU's
/// plan holds it as f16 and never as f32 (widened whole, a base model's
/// table is 94 MB where the half one is 47).
#[test]
fn a_half_table_is_gathered_at_its_width() {
    use egret::backends::plan::Storage;
    use egret::ir::DType;
    let case = dir().join("ops/gather_float16_table");
    let e = egret::explain::explain(&case, &CompileOptions::default(), Backend::Cpu).unwrap();
    let plan = e.plan.expect("a plan");
    let tables: Vec<DType> = plan
        .buffers
        .iter()
        .filter_map(|b| match &b.storage {
            Storage::Constant(t) if t.numel() == 50 * 37 => Some(t.dtype()),
            _ => None,
        })
        .collect();
    assert_eq!(tables, [DType::F16], "{}", plan.describe());
}
