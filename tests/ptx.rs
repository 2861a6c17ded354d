//! The PTX backend without a GPU: every kernel of every model assembles
//! with `ptxas` for sm_80 and sm_90, and the matmul and attention kernels
//! do not spill at sm_80; the interpreter runs the models' PTX (f32, and
//! with tensor-core products) against the reference and stored outputs.
//!
//! `ptxas` comes from the PyPI wheel `nvidia-cuda-nvcc-cu12` (`.ci/run`
//! installs it); `EGRET_PTXAS` names another. Without one the test skips
//! with a note, except under `CI=true`.

mod common;

use egret::check::discover;
use egret::CompileOptions;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

/// The distinct PTX kernels of every zoo, synthetic, export (bound and
/// symbolic) and perf model at `--opt 0` and `--opt 2` (and at `--opt 2` with tensor-core
/// products in tf32 and bf16), by text, with a model that has each.
fn model_kernels() -> BTreeMap<String, (String, String)> {
    let dynamic = common::repo_root().join("tests/data/dynamic_exports");
    let mut dirs = vec![common::zoo_dir(), common::synthetic_dir(), common::exports_dir(), dynamic];
    dirs.extend(common::shared_dir("perf", Some("EGRET_PERF_MODELS")));
    let mut kernels = BTreeMap::new();
    for dir in dirs {
        for case in discover(&dir).unwrap() {
            use egret::backends::gpu::form::Precision;
            let levels = [(0, Precision::F32), (2, Precision::F32), (2, Precision::Tf32), (2, Precision::Bf16)];
            for (opt_level, precision) in levels {
                let opts = common::options_for(&case, CompileOptions { opt_level, precision, ..Default::default() });
                let c = egret::canonical(&case.join("model.onnx"), &opts).unwrap();
                let gpu = egret::gpu_plan(&c.graph, &opts, egret::PTX_LIMITS).unwrap();
                for k in &gpu.kernels {
                    let text = egret::backends::gpu::ptx::print(k);
                    let from = format!("{} --opt {opt_level} --precision {}", case.display(), precision.name());
                    kernels.entry(text).or_insert((k.name.clone(), from));
                }
            }
            // With its dims kept symbolic, a program at its nominal values
            // (the shape ops a bound graph folds run as kernels then).
            let opts = CompileOptions::default();
            let c = egret::canonical(&case.join("model.onnx"), &opts).unwrap();
            if c.graph.is_bound() || !egret::symbols_to_bind(&c.graph, &opts).is_empty() {
                continue;
            }
            let program = egret::symbolic_gpu_plan(&c.graph, &opts, egret::PTX_LIMITS).unwrap();
            let capacity = program.plan().capacity.clone();
            let gpu = program.at(&capacity, &program.layout(&capacity).unwrap()).unwrap();
            for k in &gpu.kernels {
                let from = format!("{} with its dims symbolic", case.display());
                kernels.entry(egret::backends::gpu::ptx::print(k)).or_insert((k.name.clone(), from));
            }
        }
    }
    kernels
}

#[test]
fn every_model_kernel_assembles_for_sm80_and_sm90_without_spills() {
    let Some(ptxas) = egret::explain::find_ptxas() else {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI installs ptxas (nvidia-cuda-nvcc-cu12)");
        eprintln!("skipping: no ptxas (pip install nvidia-cuda-nvcc-cu12, or set EGRET_PTXAS)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("egret-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernels = model_kernels();
    assert!(kernels.len() > 20, "{} distinct kernels", kernels.len());
    let mut failures = Vec::new();
    for (i, (text, (name, from))) in kernels.iter().enumerate() {
        let path = dir.join(format!("k{i}_{name}.ptx"));
        std::fs::write(&path, text).unwrap();
        for arch in ["sm_80", "sm_90"] {
            let out = Command::new(&ptxas)
                .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
                .arg(&path)
                .output()
                .expect("ptxas runs");
            let log = String::from_utf8_lossy(&out.stderr).to_string();
            if !out.status.success() {
                failures.push(format!("{name} ({from}) for {arch}:\n{log}"));
                continue;
            }
            let number = |before: &str| {
                log.split(before).next().and_then(|s| s.split_whitespace().last()).and_then(|n| n.parse::<u64>().ok())
            };
            let registers = log
                .split("Used ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            let spills = number(" bytes spill stores").unwrap_or(0);
            println!("{arch} {name}: {registers} registers, {spills} bytes spilled ({from})");
            let hot = name.starts_with("matmul") || name.starts_with("attention");
            if arch == "sm_80" && hot && spills > 0 {
                failures.push(format!("{name} ({from}) spills {spills} bytes at sm_80"));
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs every data set of `cases` through its PTX, interpreted, at `--opt
/// 0` and `--opt 2`: how many runs, and the outputs beyond the model
/// tolerance of onnxruntime's.
fn run_interpreted(cases: &[PathBuf]) -> (usize, Vec<String>) {
    use egret::runtime::Executable;
    let tol = egret::check::Tolerance::default();
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in cases {
        for set in egret::check::data_sets(case).unwrap() {
            let inputs = egret::check::numbered(&set, "input").unwrap();
            let expected = egret::check::numbered(&set, "output").unwrap();
            for opt_level in [0, 2] {
                let opts =
                    CompileOptions { opt_level, input_values: inputs.iter().cloned().collect(), ..Default::default() };
                let c = egret::canonical(&case.join("model.onnx"), &opts).unwrap();
                let signature = egret::runtime::Signature::of(&c.graph, c.specialized.clone());
                let ptx = common::interpreted_ptx(&c.graph, &opts);
                let outs = ptx.run(signature.bind(inputs.clone()).unwrap()).unwrap();
                for (got, (name, want)) in outs.iter().zip(&expected) {
                    let r = egret::check::compare(name, got, want, tol);
                    if let Some(f) = r.failure {
                        failures.push(format!("{} --opt {opt_level} {name}: {f}", set.display()));
                    }
                }
                let instructions = ptx.device().executed.load(std::sync::atomic::Ordering::Relaxed);
                println!("{} --opt {opt_level}: {instructions} PTX instructions interpreted", case.display());
                ran += 1;
            }
        }
    }
    (ran, failures)
}

/// Every zoo and synthetic model's stored test data through its PTX,
/// run by the interpreter, at `--opt 0` and `--opt 2`, within the model
/// tolerance of onnxruntime's outputs.
#[test]
fn zoo_and_synthetic_models_run_through_the_interpreted_ptx() {
    let mut cases = discover(&common::zoo_dir()).unwrap();
    cases.extend(discover(&common::synthetic_dir()).unwrap());
    let (ran, failures) = run_interpreted(&cases);
    assert!(ran >= 18, "{ran} runs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A Perceiver export's cross-attention (one head of 512 over 256 inputs)
/// through the interpreted PTX: the head the GPU kernel splits over eight
/// lanes. (The legacy exporter's twin passes on wgsl and the CPU; one is
/// enough here, at 40 s of interpreting.)
#[test]
fn a_perceiver_export_with_wide_heads_runs_through_the_interpreted_ptx() {
    let (ran, failures) = run_interpreted(&[common::exports_dir().join("perceiver_wide_heads_dynamo")]);
    assert_eq!(ran, 2);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// exp, erf, tanh and the activations built on them, in the PTX printer's
/// form (`ex2.approx` after a range reduction, with the interpreter giving
/// the approximate units no more precision than the hardware documents),
/// over 24,000 values from -30 to 30 and around zero, within the model
/// tolerance of the reference.
#[test]
fn transcendental_functions_stay_within_the_model_tolerance() {
    use egret::runtime::{Executable, ReferenceExecutable};
    let n = 24_000;
    let g = egret::ir::text::parse(&format!(
        "v0: f32[{n}] = input{{name=\"x\"}}
v1: f32[{n}] = exp v0
v2: f32[{n}] = erf v0
v3: f32[{n}] = tanh v0
v4: f32[{n}] = sigmoid v0
v5: f32[{n}] = gelu{{approximate_tanh=false}} v0
v6: f32[{n}] = gelu{{approximate_tanh=true}} v0
v7: f32[{n}] = abs v0
v8: f32[{n}] = log v7
output \"exp\" = v1
output \"erf\" = v2
output \"tanh\" = v3
output \"sigmoid\" = v4
output \"gelu\" = v5
output \"gelu_tanh\" = v6
output \"log\" = v8
"
    ))
    .unwrap();
    // Evenly over [-87, 88.7) (exp's whole range: e^88.4 came out infinite
    // when 2^128 was one factor), then densely around zero.
    let xs: Vec<f32> =
        (0..n)
            .map(|i| {
                if i < n / 2 {
                    -87.0 + 175.7 * i as f32 / (n / 2) as f32
                } else {
                    (i as f32 - (3 * n / 4) as f32) * 1e-4
                }
            })
            .collect();
    let mut xs = xs;
    // And the ends: infinities, past the overflow, NaN.
    xs[..5].copy_from_slice(&[f32::NEG_INFINITY, f32::INFINITY, -200.0, 89.0, f32::NAN]);
    let x = egret::ir::Tensor::from_vec(vec![n], xs);
    let want = ReferenceExecutable::new(g.clone()).unwrap().run(vec![x.clone()]).unwrap();
    let ptx = common::interpreted_ptx(&g, &Default::default());
    let got = ptx.run(vec![x]).unwrap();
    let ends = &got[0].as_f32().unwrap()[..5];
    assert_eq!(&ends[..4], &[0.0, f32::INFINITY, 0.0, f32::INFINITY], "exp at the ends");
    assert!(ends[4].is_nan());
    for ((gt, w), (name, _)) in got.iter().zip(&want).zip(g.outputs()) {
        let r = egret::check::compare(name, gt, w, egret::check::Tolerance::default());
        println!("{name}: max abs err {:.2e}, max rel err {:.2e}", r.max_abs, r.max_rel);
        assert!(r.failure.is_none(), "{name}: {:?}", r.failure);
    }
}

/// Products on tensor cores (`--precision tf32|bf16`), through the
/// interpreter's `mma.sync` (fragments laid out as the PTX ISA documents
/// them): odd sizes and tile edges, batches, transposed weights and an
/// epilogue, against the f32 reference within the documented looser
/// tolerances.
#[test]
fn tensor_core_products_match_within_their_precision() {
    use egret::backends::gpu::form::Precision;
    use egret::runtime::{Executable, ReferenceExecutable};
    let data = |n: usize, seed: u64| {
        let mut rng = egret::io::SplitMix::new(seed);
        (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect::<Vec<_>>()
    };
    let w: Vec<String> = data(70 * 37, 7).iter().map(|x| format!("{x}")).collect();
    let g = egret::ir::text::parse(&format!(
        "v0: f32[2,67,70] = input{{name=\"a\"}}
v1: f32[2,70,45] = input{{name=\"b\"}}
v2: f32[2,67,45] = matmul v0, v1
v3: f32[37,70] = const [{}]
v4: f32[70,37] = transpose{{perm=[1, 0]}} v3
v5: f32[2,67,37] = matmul v0, v4
v6: f32[2,67,37] = gelu{{approximate_tanh=false}} v5
output \"batched\" = v2
output \"gelu\" = v6
",
        w.join(", ")
    ))
    .unwrap();
    let inputs = vec![
        egret::ir::Tensor::from_vec(vec![2, 67, 70], data(2 * 67 * 70, 1)),
        egret::ir::Tensor::from_vec(vec![2, 70, 45], data(2 * 70 * 45, 2)),
    ];
    let want = ReferenceExecutable::new(g.clone()).unwrap().run(inputs.clone()).unwrap();
    for (precision, tol) in [(Precision::Tf32, TF32_TOLERANCE), (Precision::Bf16, BF16_TOLERANCE)] {
        let opts = CompileOptions { precision, ..Default::default() };
        let ptx = common::interpreted_ptx(&g, &opts);
        assert!(ptx.plan().unwrap().kernels.iter().any(|k| k.name.starts_with("matmul_mma")), "tensor cores in use");
        let got = ptx.run(inputs.clone()).unwrap();
        for ((gt, w), (name, _)) in got.iter().zip(&want).zip(g.outputs()) {
            let r = egret::check::compare(name, gt, w, tol);
            println!("{} {name}: max abs err {:.2e}, max rel err {:.2e}", precision.name(), r.max_abs, r.max_rel);
            assert!(r.failure.is_none(), "{} {name}: {:?}", precision.name(), r.failure);
            // And the precision is really lower than f32's: not a disguised f32 path.
            assert!(r.max_abs > 1e-6, "{} {name}: exact to {:.1e}", precision.name(), r.max_abs);
        }
    }
}

/// The tolerances the README states for tensor-core products.
const TF32_TOLERANCE: egret::check::Tolerance = egret::check::Tolerance { rtol: 1e-2, atol: 1e-2 };
const BF16_TOLERANCE: egret::check::Tolerance = egret::check::Tolerance { rtol: 5e-2, atol: 5e-2 };

/// Zoo models with their products on tensor cores, through the
/// interpreter, against onnxruntime's f32 outputs within the documented
/// tolerances of each precision.
#[test]
fn zoo_models_on_tensor_cores_stay_within_their_precision() {
    use egret::backends::gpu::form::Precision;
    use egret::runtime::Executable;
    for name in ["bert_tiny", "vit_tiny", "gpt2_tiny"] {
        let case = common::zoo_dir().join(name);
        let set = &egret::check::data_sets(&case).unwrap()[0];
        let inputs = egret::check::numbered(set, "input").unwrap();
        let expected = egret::check::numbered(set, "output").unwrap();
        for (precision, tol) in [(Precision::Tf32, TF32_TOLERANCE), (Precision::Bf16, BF16_TOLERANCE)] {
            let opts =
                CompileOptions { precision, input_values: inputs.iter().cloned().collect(), ..Default::default() };
            let c = egret::canonical(&case.join("model.onnx"), &opts).unwrap();
            let signature = egret::runtime::Signature::of(&c.graph, c.specialized.clone());
            let ptx = common::interpreted_ptx(&c.graph, &opts);
            let outs = ptx.run(signature.bind(inputs.clone()).unwrap()).unwrap();
            for (got, (output, want)) in outs.iter().zip(&expected) {
                let r = egret::check::compare(output, got, want, tol);
                println!("{name} {} {output}: max abs err {:.2e}", precision.name(), r.max_abs);
                assert!(r.failure.is_none(), "{name} {} {output}: {:?}", precision.name(), r.failure);
            }
        }
    }
}

/// A head the GPU attention kernel cannot hold (more than 16 lanes of 128
/// columns) is refused when the program is built, naming the kernel, on
/// both GPU backends (they share the plan): never a wrong answer.
#[test]
fn a_head_wider_than_the_attention_kernel_is_a_compile_error() {
    let g = egret::ir::text::parse(
        "v0: f32[1,3,1100] = input{name=\"q\"}
v1: f32[1,1100,5] = input{name=\"kt\"}
v2: f32[1,5,1100] = input{name=\"v\"}
v3: f32[1,3,1100] = attention{scale=0.03, nan_to_zero=false} v0, v1, v2
output \"y\" = v3
",
    )
    .unwrap();
    for limits in [egret::PTX_LIMITS, egret::backends::gpu::Limits::default()] {
        let e = egret::gpu_plan(&g, &CompileOptions::default(), limits).unwrap_err().to_string();
        assert!(e.contains("kernel `attention`") && e.contains("wider than the GPU attention kernel takes"), "{e}");
    }
}

/// The GPU kernels' shared-memory tiles are read and written without bank
/// conflicts: each kernel family (products in f32 and on tensor cores,
/// rows, attention in its register and split forms) through the
/// interpreter, which counts every warp's shared requests and the
/// wavefronts they take on 32 banks (`egret_ptx_interp::BankStats`).
#[test]
fn shared_memory_tiles_are_free_of_bank_conflicts() {
    use egret::backends::gpu::form::Precision;
    use egret::runtime::Executable;
    let data = |n: usize, seed: u64| {
        let mut rng = egret::io::SplitMix::new(seed);
        (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect::<Vec<_>>()
    };
    let cases: Vec<(&str, String, Precision)> = vec![
        (
            "matmul f32",
            "v0: f32[67,70] = input{name=\"a\"}\nv1: f32[70,45] = input{name=\"b\"}\nv2: f32[67,45] = matmul v0, v1\noutput \"y\" = v2\n".into(),
            Precision::F32,
        ),
        (
            "matmul f32 v4",
            "v0: f32[67,96] = input{name=\"a\"}\nv1: f32[96,80] = input{name=\"b\"}\nv2: f32[67,80] = matmul v0, v1\noutput \"y\" = v2\n".into(),
            Precision::F32,
        ),
        (
            "matmul tf32 v4",
            "v0: f32[67,96] = input{name=\"a\"}\nv1: f32[96,80] = input{name=\"b\"}\nv2: f32[67,80] = matmul v0, v1\noutput \"y\" = v2\n".into(),
            Precision::Tf32,
        ),
        (
            "matmul bf16 v4",
            "v0: f32[67,96] = input{name=\"a\"}\nv1: f32[96,80] = input{name=\"b\"}\nv2: f32[67,80] = matmul v0, v1\noutput \"y\" = v2\n".into(),
            Precision::Bf16,
        ),
        (
            "matmul tf32",
            "v0: f32[67,70] = input{name=\"a\"}\nv1: f32[70,45] = input{name=\"b\"}\nv2: f32[67,45] = matmul v0, v1\noutput \"y\" = v2\n".into(),
            Precision::Tf32,
        ),
        (
            "matmul bf16",
            "v0: f32[67,70] = input{name=\"a\"}\nv1: f32[70,45] = input{name=\"b\"}\nv2: f32[67,45] = matmul v0, v1\noutput \"y\" = v2\n".into(),
            Precision::Bf16,
        ),
        (
            "softmax",
            "v0: f32[33,300] = input{name=\"a\"}\nv1: f32[33,300] = softmax{axis=1} v0\noutput \"y\" = v1\n".into(),
            Precision::F32,
        ),
        (
            "attention d=64",
            "v0: f32[1,2,37,64] = input{name=\"q\"}\nv1: f32[1,2,100,64] = input{name=\"k\"}\nv2: f32[1,2,100,64] = input{name=\"v\"}\nv3: f32[1,2,64,100] = transpose{perm=[0, 1, 3, 2]} v1\nv4: f32[1,2,37,100] = matmul v0, v3\nv5: f32[] = const [0.125]\nv6: f32[1,2,37,100] = mul v4, v5\nv7: f32[1,2,37,100] = softmax{axis=3} v6\nv8: f32[1,2,37,64] = matmul v7, v2\noutput \"y\" = v8\n".into(),
            Precision::F32,
        ),
        (
            "attention d=256",
            "v0: f32[1,1,19,256] = input{name=\"q\"}\nv1: f32[1,1,70,256] = input{name=\"k\"}\nv2: f32[1,1,70,256] = input{name=\"v\"}\nv3: f32[1,1,256,70] = transpose{perm=[0, 1, 3, 2]} v1\nv4: f32[1,1,19,70] = matmul v0, v3\nv5: f32[] = const [0.0625]\nv6: f32[1,1,19,70] = mul v4, v5\nv7: f32[1,1,19,70] = softmax{axis=3} v6\nv8: f32[1,1,19,256] = matmul v7, v2\noutput \"y\" = v8\n".into(),
            Precision::F32,
        ),
    ];
    let mut report = vec![];
    for (name, text, precision) in cases {
        let g = egret::ir::text::parse(&text).unwrap();
        let (g, _) = egret::passes::egraph::optimize(&g, Default::default()).unwrap();
        let opts = CompileOptions { precision, ..Default::default() };
        let gpu = egret::gpu_plan(&g, &opts, egret::PTX_LIMITS).unwrap();
        let kernels: Vec<String> = gpu.kernels.iter().map(|k| k.name.clone()).collect();
        let ptx = egret::runtime::PtxExecutable::new(common::InterpretedDevice::counting_banks(), gpu).unwrap();
        let inputs: Vec<_> = g
            .inputs()
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let shape = g.ty(v).known_shape().unwrap();
                egret::ir::Tensor::from_vec(shape.clone(), data(shape.iter().product(), i as u64))
            })
            .collect();
        ptx.run(inputs).unwrap();
        let stats = ptx.device().banks().unwrap();
        report.push(format!(
            "{name} ({}): {} requests, {} conflicts",
            kernels.join(", "),
            stats.requests,
            stats.conflicts()
        ));
        assert!(stats.requests > 0, "{name}: no shared requests counted");
        // Every tile takes none: the f32 ones by their strides, the
        // tensor-core ones by chunks swizzled for ldmatrix.
        let allowed = 0;
        assert!(stats.conflicts() <= allowed, "{name}: {} bank conflicts, more than {allowed}", stats.conflicts());
    }
    println!("{}", report.join("\n"));
}

/// One kernel's SASS for sm_90 (`ptxas`, then `nvdisasm`): each
/// instruction's opcode with its modifiers (`FFMA`, `LDS.128`), its
/// predicate dropped, and each loop (a branch back) as the range of
/// instructions it spans.
struct Sass {
    ops: Vec<String>,
    loops: Vec<std::ops::Range<usize>>,
    /// `ptxas -v`'s registers a thread.
    registers: u64,
}

impl Sass {
    fn of(ptxas: &std::path::Path, nvdisasm: &std::path::Path, dir: &std::path::Path, name: &str, ptx: &str) -> Sass {
        let (source, cubin) = (dir.join(format!("{name}.ptx")), dir.join(format!("{name}.cubin")));
        std::fs::write(&source, ptx).unwrap();
        let out = Command::new(ptxas).args(["-arch=sm_90", "-v", "-o"]).arg(&cubin).arg(&source).output().unwrap();
        assert!(out.status.success(), "ptxas: {}", String::from_utf8_lossy(&out.stderr));
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        let registers = log.split("Used ").nth(1).and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0);
        let out = Command::new(nvdisasm).arg("-c").arg(&cubin).output().unwrap();
        assert!(out.status.success(), "nvdisasm: {}", String::from_utf8_lossy(&out.stderr));
        let (mut ops, mut labels, mut branches) = (vec![], BTreeMap::new(), vec![]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            if let Some(label) = line.strip_suffix(':').filter(|l| l.starts_with(".L_x_")) {
                labels.insert(label.to_string(), ops.len());
                continue;
            }
            // `/*0780*/ @!P2 BRA `(.L_x_0) ;`
            let Some(ins) = line.strip_prefix("/*").and_then(|l| l.split_once("*/")).map(|(_, i)| i.trim()) else {
                continue;
            };
            let ins = ins.trim_end_matches(';').trim();
            let ins = if ins.starts_with('@') { ins.split_once(' ').map_or("", |(_, i)| i.trim()) } else { ins };
            let op = ins.split_whitespace().next().unwrap_or("").to_string();
            if op.starts_with("BRA") {
                if let Some(target) = ins.split("`(").nth(1).and_then(|t| t.split(')').next()) {
                    branches.push((ops.len(), target.to_string()));
                }
            }
            ops.push(op);
        }
        let loops = branches
            .into_iter()
            .filter_map(|(at, target)| labels.get(&target).filter(|&&to| to <= at).map(|&to| to..at + 1))
            .collect();
        Sass { ops, loops, registers }
    }

    fn count(&self, range: std::ops::Range<usize>, op: &str) -> usize {
        self.ops[range].iter().filter(|o| *o == op || o.starts_with(&format!("{op}."))).count()
    }

    /// The loop with the most `op`s (the innermost of equals): the main loop.
    fn main_loop(&self, op: &str) -> Option<std::ops::Range<usize>> {
        self.loops
            .iter()
            .filter(|l| self.count((*l).clone(), op) > 0)
            .max_by_key(|l| (self.count((*l).clone(), op), std::cmp::Reverse(l.len())))
            .cloned()
    }
}

/// The SASS of the product and attention kernels has the instruction mix
/// their design says (`gpu/matmul.rs`, `gpu/attention.rs`): no local
/// memory anywhere (`LDL`/`STL`: spills or arrays the registers did not
/// hold); the f32 products' main loop mostly `FFMA`, the wide tiles'
/// operands read from workgroup memory 16 bytes at a time (`LDS.128`); the
/// tensor-core products' main loop on `HMMA` (bf16's m16n8k16) with the
/// operands through `ldmatrix` (`LDSM`), tf32's aligned `a` staged by
/// `cp.async` (`LDGSTS`). Needs `ptxas` and `nvdisasm`
/// (PyPI: `nvidia-cuda-nvcc-cu12`, `nvidia-cuda-nvdisasm`; `.ci/run`
/// installs both); without them it skips with a note, except under `CI=true`.
#[test]
fn hot_kernels_sass_has_the_designed_instruction_mix() {
    use egret::backends::gpu::form::Precision;
    let (Some(ptxas), Some(nvdisasm)) = (egret::explain::find_ptxas(), egret::explain::find_nvdisasm()) else {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI installs ptxas and nvdisasm");
        eprintln!("skipping: no ptxas or nvdisasm (pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvdisasm)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("egret-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let product = "v0: f32[512,768] = input{name=\"a\"}\nv1: f32[768,768] = input{name=\"b\"}\nv2: f32[512,768] = matmul v0, v1\noutput \"y\" = v2\n";
    let attention = |d: usize| {
        format!("v0: f32[1,12,128,{d}] = input{{name=\"q\"}}\nv1: f32[1,12,128,{d}] = input{{name=\"k\"}}\nv2: f32[1,12,128,{d}] = input{{name=\"v\"}}\nv3: f32[1,12,{d},128] = transpose{{perm=[0, 1, 3, 2]}} v1\nv4: f32[1,12,128,128] = matmul v0, v3\nv5: f32[] = const [0.125]\nv6: f32[1,12,128,128] = mul v4, v5\nv7: f32[1,12,128,128] = softmax{{axis=3}} v6\nv8: f32[1,12,128,{d}] = matmul v7, v2\noutput \"y\" = v8\n")
    };
    // (the graph, its precision, how many multiprocessors: 1 forces the
    // widest tile, 10,000 the 64 x 64 one)
    let cases = [
        (product.to_string(), Precision::F32, 1),
        (product.to_string(), Precision::F32, 10_000),
        (product.to_string(), Precision::Tf32, 132),
        (product.to_string(), Precision::Bf16, 132),
        (attention(64), Precision::F32, 132),
        (attention(128), Precision::F32, 132),
    ];
    let mut report = vec![];
    let mut failures = vec![];
    for (text, precision, multiprocessors) in cases {
        let g = egret::ir::text::parse(&text).unwrap();
        let (g, _) = egret::passes::egraph::optimize(&g, Default::default()).unwrap();
        let opts = CompileOptions { precision, ..Default::default() };
        let limits = egret::backends::gpu::Limits { multiprocessors, ..egret::PTX_LIMITS };
        let gpu = egret::gpu_plan(&g, &opts, limits).unwrap();
        for k in gpu.kernels.iter().filter(|k| k.name.starts_with("matmul") || k.name.starts_with("attention")) {
            let sass = Sass::of(&ptxas, &nvdisasm, &dir, &k.name, &egret::backends::gpu::ptx::print(k));
            let all = 0..sass.ops.len();
            let local = sass.count(all.clone(), "LDL") + sass.count(all, "STL");
            if local > 0 {
                failures.push(format!("{}: {local} local-memory instructions", k.name));
            }
            let work = if k.name.starts_with("matmul_mma") { "HMMA" } else { "FFMA" };
            let Some(main) = sass.main_loop(work) else {
                failures.push(format!("{}: no loop with {work}", k.name));
                continue;
            };
            let share = sass.count(main.clone(), work) as f64 / main.len() as f64;
            // `EGRET_SASS_MIX=1`: each main loop's opcodes, most frequent first.
            if std::env::var("EGRET_SASS_MIX").is_ok() {
                let mut mix: BTreeMap<&str, usize> = BTreeMap::new();
                for op in &sass.ops[main.clone()] {
                    *mix.entry(op.as_str()).or_default() += 1;
                }
                let mut mix: Vec<_> = mix.into_iter().collect();
                mix.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
                println!("{}: {mix:?}", k.name);
            }
            let wide_loads = sass.count(main.clone(), "LDS.128");
            report.push(format!(
                "{}: {} registers; main loop {} instructions, {:.0}% {work}, {wide_loads} LDS.128, {} LDSM, {} LDGSTS",
                k.name,
                sass.registers,
                main.len(),
                100.0 * share,
                sass.count(main.clone(), "LDSM"),
                sass.count(main.clone(), "LDGSTS"),
            ));
            // What each design promises of its main loop (sm_90, ptxas 12.9):
            // the wide tiles 8 x 8 FFMA to 4 LDS.128 a step of k, the depth
            // unrolled (80% measured); the 64 x 64 tile 4 x 4 to 8 LDS
            // (52%); attention, a query a lane, one FFMA per word of k or v
            // read (21-25%); the tensor-core tiles with their fragments
            // from `ldmatrix` (`LDSM`), bf16 on m16n8k16 (`HMMA.16816`: 16
            // HMMA, 8 LDSM, 4 STS.128 a depth of 32, the rest staging and
            // its edge cases), tf32 on m16n8k8 (32 HMMA, 16 LDSM, its `a`
            // staged by `cp.async` where aligned: `LDGSTS`; 5%).
            let wanted = match k.name.as_str() {
                n if n.starts_with("matmul_128x") => share >= 0.75 && wide_loads > 0,
                n if n.starts_with("matmul_64x64") => share >= 0.45,
                n if n.starts_with("matmul_mma_bf16") => {
                    sass.count(main.clone(), "HMMA.16816") > 0 && sass.count(main.clone(), "LDSM") > 0
                }
                n if n.starts_with("matmul_mma") => {
                    let copies = sass.count(main.clone(), "LDGSTS");
                    share >= 0.02 && sass.count(main.clone(), "LDSM") > 0 && (copies > 0 || !n.contains("_v4"))
                }
                _ => share >= 0.18,
            };
            if !wanted {
                failures.push(format!("{}: {} falls short of its design", k.name, report.last().unwrap()));
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    println!("{}", report.join("\n"));
    assert!(report.len() >= 6, "{report:?}");
    assert!(failures.is_empty(), "{}\n\n{}", failures.join("\n"), report.join("\n"));
}

/// A run's dispatches are recorded once per set of the symbols' values (a
/// CUDA graph on a GPU; the interpreter records them as a list) and
/// replayed from the first run on: new inputs at the same sizes replay the
/// recording, new sizes record again, and every run matches the reference.
#[test]
fn dispatches_are_recorded_once_per_sizes_and_replayed() {
    use egret::runtime::{Executable, PtxExecutable, ReferenceExecutable};
    use std::sync::atomic::Ordering::Relaxed;
    let text = "v0: f32[n,24] = input{name=\"x\"}
v1: f32[24,40] = input{name=\"w\"}
v2: f32[n,40] = matmul v0, v1
v3: f32[n,40] = softmax{axis=1} v2
v4: f32[n,40] = relu v3
output \"y\" = v4
";
    let g = egret::ir::text::parse(text).unwrap();
    let opts = CompileOptions::default();
    let program = egret::symbolic_gpu_plan(&g, &opts, egret::PTX_LIMITS).unwrap();
    let ptx = PtxExecutable::symbolic(common::InterpretedDevice::new(), program).unwrap();
    let inputs = |n: usize, seed: u64| {
        let mut rng = egret::io::SplitMix::new(seed);
        let mut data = |len: usize| (0..len).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect::<Vec<_>>();
        vec![
            egret::ir::Tensor::from_vec(vec![n, 24], data(n * 24)),
            egret::ir::Tensor::from_vec(vec![24, 40], data(960)),
        ]
    };
    // (rows, recordings made by then): new sizes record, old ones do not
    // keep theirs (one set of sizes is current at a time).
    for (i, (n, records)) in [(5, 1), (5, 1), (5, 1), (9, 2), (9, 2), (5, 3)].into_iter().enumerate() {
        let x = inputs(n, i as u64);
        let bound = egret::ir::text::parse(&text.replace("[n,", &format!("[{n},"))).unwrap();
        let want = ReferenceExecutable::new(bound).unwrap().run(x.clone()).unwrap();
        let got = ptx.run(x).unwrap();
        let r = egret::check::compare("y", &got[0], &want[0], egret::check::Tolerance::default());
        assert!(r.failure.is_none(), "run {i} ({n} rows): {:?}", r.failure);
        assert_eq!(ptx.device().records.load(Relaxed), records, "run {i}");
        assert_eq!(ptx.device().replays.load(Relaxed), i as u64 + 1, "run {i}");
    }
}
