//! The WGSL backend on real models, its error word, and `compile --emit
//! wgsl`. Runs on any WebGPU adapter (lavapipe in CI); without one the
//! tests skip with a note, except under `CI=true` (see `common::wgsl_adapter`).

mod common;

use egret::check::{check_case_with, discover, Tolerance};
use egret::{Backend, CompileOptions};
use std::path::Path;

/// Every case under `dir` on `wgsl` at `opt_level`; returns how many ran.
fn check_wgsl(dir: &Path, opt_level: u8) -> usize {
    let opts = CompileOptions { backend: Backend::Wgsl, opt_level, ..Default::default() };
    let mut failures = Vec::new();
    let mut n = 0;
    for case in discover(dir).expect("discover cases") {
        for r in check_case_with(&case, &opts, Tolerance::default()) {
            n += 1;
            if !r.passed() {
                let outs: Vec<_> = r.outputs.iter().filter_map(|o| o.failure.clone()).collect();
                failures.push(format!("{} (--opt {opt_level}): {:?} {outs:?}", r.case, r.error));
            }
        }
    }
    assert!(failures.is_empty(), "failed on wgsl:\n{}", failures.join("\n"));
    n
}

#[test]
fn zoo_models_pass_on_wgsl_at_both_levels() {
    if !common::wgsl_adapter() {
        return;
    }
    for opt in [0, 2] {
        assert_eq!(check_wgsl(&common::zoo_dir(), opt), 7);
    }
}

#[test]
fn synthetic_and_exported_models_pass_on_wgsl_at_both_levels() {
    if !common::wgsl_adapter() {
        return;
    }
    for opt in [0, 2] {
        check_wgsl(&common::synthetic_dir(), opt);
        check_wgsl(&common::exports_dir(), opt);
    }
}

/// Lavapipe is a CPU: the perf models run once, at the default level.
#[test]
fn perf_models_pass_on_wgsl() {
    let Some(dir) = common::shared_dir("perf", Some("EGRET_PERF_MODELS")) else {
        return;
    };
    if common::wgsl_adapter() {
        check_wgsl(&dir, 2);
    }
}

/// Every kernel of every model has a GPU kernel (no op runs on the host),
/// and the shaders pass naga's validation. Needs no device.
#[test]
fn model_kernels_all_run_on_the_gpu_and_validate() {
    let mut dirs = vec![common::zoo_dir(), common::synthetic_dir(), common::exports_dir()];
    dirs.extend(common::shared_dir("perf", Some("EGRET_PERF_MODELS")));
    for dir in dirs {
        for case in discover(&dir).unwrap() {
            for opt_level in [0, 2] {
                let opts = common::options_for(&case, CompileOptions { opt_level, ..Default::default() });
                let c = egret::canonical(&case.join("model.onnx"), &opts).unwrap();
                let (gpu, shaders) = egret::wgsl_program(&c.graph, &opts, Default::default())
                    .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
                assert_eq!(shaders.len(), gpu.kernels.len());
                let name = case.file_name().unwrap().to_string_lossy().to_string();
                assert!(gpu.host_steps().is_empty(), "{name} --opt {opt_level}: {:?}", gpu.host_steps());
            }
        }
    }
}

/// A gather reading an index input: a bad index is an error naming the
/// node, and the next run with good indices succeeds (the error word is
/// cleared per run).
#[test]
fn gather_index_errors_name_the_node_and_clear() {
    if !common::wgsl_adapter() {
        return;
    }
    let g = egret::ir::text::parse(
        "v0: i64[3] = input{name=\"ids\"}
v1: f32[5,4] = const [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0]
v2: f32[3,4] = gather{axis=0} v1, v0
output \"y\" = v2
",
    )
    .unwrap();
    let (gpu, _) = egret::compile_wgsl(&g, &Default::default()).unwrap();
    use egret::runtime::Executable;
    let ids = |v: Vec<i64>| vec![egret::ir::Tensor::from_vec(vec![3], v)];
    let err = gpu.run(ids(vec![0, 7, 1])).unwrap_err().to_string();
    assert!(err.contains("out of range for an axis of length 5"), "{err}");
    let y = gpu.run(ids(vec![4, -1, 1])).unwrap();
    let want: Vec<f32> = [16.0, 17.0, 18.0, 19.0, 16.0, 17.0, 18.0, 19.0, 4.0, 5.0, 6.0, 7.0].to_vec();
    assert_eq!(y[0].as_f32().unwrap(), &want[..]);
    // An input that does not fit the i32 words GPU kernels carry integers in.
    let err = gpu.run(ids(vec![0, 1 << 40, 1])).unwrap_err().to_string();
    assert!(err.contains("outside the i32 range"), "{err}");
}

/// `egret compile --emit wgsl` writes one shader per distinct kernel and a
/// manifest; the shaders are what naga validated.
#[test]
fn compile_emits_wgsl_and_a_manifest() {
    let out = std::env::temp_dir().join(format!("egret-wgsl-{}", std::process::id()));
    let model = common::zoo_dir().join("gpt2_tiny/model.onnx");
    let written = egret::aot::write_wgsl(&model, &out, &Default::default()).unwrap();
    let shaders: Vec<_> = written.iter().filter(|p| p.extension().is_some_and(|e| e == "wgsl")).collect();
    assert!(shaders.len() >= 4, "{written:?}");
    for s in &shaders {
        egret::backends::gpu::wgsl::validate(&std::fs::read_to_string(s).unwrap()).unwrap();
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let steps = manifest["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["kind"] == "attention"), "{manifest}");
    assert!(steps.iter().all(|s| s["workgroups"].as_array().is_some_and(|g| g.len() == 3)));
    assert!(manifest["arena_words"].as_u64().unwrap() > 0);
    std::fs::remove_dir_all(&out).unwrap();
}

/// Constants larger than one binding (GPT-2's 154 MB token embedding is,
/// at 128 MiB a binding) span several weight chunks: here with bindings of
/// 256 KiB, a gather table and a matmul weight of about 320 KiB each.
#[test]
fn constants_larger_than_a_binding_span_chunks() {
    if !common::wgsl_adapter() {
        return;
    }
    use egret::runtime::{Executable, ReferenceExecutable};
    let table: Vec<String> = (0..10_000 * 8).map(|i| format!("{:.2}", (i % 97) as f32 * 0.01 - 0.4)).collect();
    let w: Vec<String> = (0..40 * 2048).map(|i| format!("{:.2}", (i % 89) as f32 * 0.01 - 0.45)).collect();
    let text = format!(
        "v0: i64[100] = input{{name=\"ids\"}}
v1: f32[10000,8] = const [{}]
v2: f32[100,8] = gather{{axis=0}} v1, v0
v3: f32[6,40] = input{{name=\"x\"}}
v4: f32[40,2048] = const [{}]
v5: f32[6,2048] = matmul v3, v4
output \"rows\" = v2
output \"product\" = v5
",
        table.join(", "),
        w.join(", ")
    );
    let g = egret::ir::text::parse(&text).unwrap();
    // Three workgroups a grid dimension at most: the gather (4 workgroups,
    // as 3 x 2) and the matmul (32, as 3 x 11) need 2-D grids and skip
    // the workgroups past their count.
    let limits =
        egret::backends::gpu::Limits { max_binding_bytes: 256 << 10, max_groups_per_dim: 3, ..Default::default() };
    let (gpu, shaders) = egret::wgsl_program(&g, &Default::default(), limits).unwrap();
    let device = egret::runtime::WgpuDevice::shared().unwrap();
    let exe = egret::runtime::WgpuExecutable::new(device, gpu.clone(), &shaders).unwrap();
    assert!(gpu.weights.len() >= 4, "{} chunks", gpu.weights.len());
    assert!(shaders.iter().any(|s| s.contains("let chunk = i /")), "a spanning reader");
    assert!(gpu.steps.iter().any(|s| matches!(s, egret::backends::gpu::Step::Dispatch { grid, .. } if grid[1] > 1)));
    let ids =
        egret::ir::Tensor::from_vec(vec![100], (0..100).map(|i| (i * 3701 % 10_000) as i64 - 1).collect::<Vec<_>>());
    let x = egret::ir::Tensor::from_vec(vec![6, 40], (0..240).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect::<Vec<_>>());
    // The interpreted PTX takes the same plan.
    let ptx = egret::runtime::PtxExecutable::new(common::InterpretedDevice::new(), gpu.clone()).unwrap();
    let want = ReferenceExecutable::new(g.clone()).unwrap().run(vec![ids.clone(), x.clone()]).unwrap();
    for got in [exe.run(vec![ids.clone(), x.clone()]).unwrap(), ptx.run(vec![ids.clone(), x.clone()]).unwrap()] {
        for ((gt, w), name) in got.iter().zip(&want).zip(["rows", "product"]) {
            let r = egret::check::compare(name, gt, w, Tolerance::default());
            assert!(r.failure.is_none(), "{name}: {:?}", r.failure);
        }
    }
}

/// The integer ops the plan leaves to the reference evaluator (BLOOM's
/// position ids: a cumulative sum, products and differences with
/// broadcasting, a reshape) run as GPU kernels, on WGSL and on the
/// interpreted PTX; a result outside i32 is an error, never a wrapped value.
#[test]
fn integer_position_arithmetic_runs_on_the_gpu() {
    use egret::runtime::{Executable, ReferenceExecutable};
    let g = egret::ir::text::parse(
        "v0: i64[2,5] = input{name=\"mask\"}
v1: i64[2,5] = cumsum{axis=1, exclusive=false, reverse=false} v0
v2: i64[2,5] = mul v1, v0
v3: i64[] = const [1]
v4: i64[2,5] = sub v2, v3
v5: i64[2,1,5] = reshape{shape=[2, 1, 5]} v4
v6: i64[2,5] = cumsum{axis=0, exclusive=true, reverse=true} v0
output \"positions\" = v5
output \"reversed\" = v6
",
    )
    .unwrap();
    let opts = CompileOptions::default();
    assert!(egret::gpu_plan(&g, &opts, Default::default()).unwrap().host_steps().is_empty());
    let mask = |v: Vec<i64>| vec![egret::ir::Tensor::from_vec(vec![2, 5], v)];
    let input = mask(vec![1, 1, 0, 1, 1, 0, 1, 1, 1, 0]);
    let want = ReferenceExecutable::new(g.clone()).unwrap().run(input.clone()).unwrap();
    let mut runs: Vec<Box<dyn Executable>> = vec![Box::new(common::interpreted_ptx(&g, &opts))];
    if common::wgsl_adapter() {
        runs.push(Box::new(egret::compile_wgsl(&g, &opts).unwrap().0));
    }
    for exe in &runs {
        assert_eq!(exe.run(input.clone()).unwrap(), want);
        // 2^30 + 2^30 is past i32.
        let err = exe.run(mask(vec![1 << 30, 1 << 30, 0, 0, 0, 0, 0, 0, 0, 0])).unwrap_err().to_string();
        assert!(err.contains("integer overflow") && err.contains("cumsum"), "{err}");
    }
}

/// Kernels with empty outputs are not dispatched, and error codes still
/// name the right step after them.
#[test]
fn empty_kernels_are_skipped_and_errors_still_name_their_step() {
    use egret::runtime::Executable;
    let g = egret::ir::text::parse(
        "v0: f32[0,4] = input{name=\"empty\"}
v1: f32[4,3] = const [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]
v2: f32[0,3] = matmul v0, v1
v3: i64[2] = input{name=\"ids\"}
v4: f32[2,3] = gather{axis=0} v1, v3
output \"nothing\" = v2
output \"rows\" = v4
",
    )
    .unwrap();
    let gpu = egret::gpu_plan(&g, &Default::default(), Default::default()).unwrap();
    let ids = |v: Vec<i64>| {
        vec![egret::ir::Tensor::from_vec(vec![0, 4], Vec::<f32>::new()), egret::ir::Tensor::from_vec(vec![2], v)]
    };
    assert!(gpu.steps.len() < 3, "{:?}", gpu.steps);
    let mut runs: Vec<Box<dyn Executable>> = vec![Box::new(common::interpreted_ptx(&g, &Default::default()))];
    if common::wgsl_adapter() {
        runs.push(Box::new(egret::compile_wgsl(&g, &Default::default()).unwrap().0));
    }
    for exe in &runs {
        let out = exe.run(ids(vec![3, 0])).unwrap();
        assert_eq!(out[0].shape(), &[0, 3]);
        assert_eq!(out[1].as_f32().unwrap(), &[10.0, 11.0, 12.0, 1.0, 2.0, 3.0]);
        let err = exe.run(ids(vec![4, 0])).unwrap_err().to_string();
        assert!(err.contains("out of range for an axis of length 4"), "{err}");
    }
}

/// A shader naga refuses is reported with naga's message, not a panic.
#[test]
fn invalid_wgsl_is_reported_by_naga() {
    let err = egret::backends::gpu::wgsl::validate("fn main() { let x: f32 = 1u; }").unwrap_err();
    assert!(err.contains("error"), "{err}");
}

/// One GPU executable serves every shape of a model with symbolic dims:
/// BERT's batch and sequence, and a GPT-2 decode loop whose past grows at
/// every step. On WGSL and on the interpreted PTX, each run matches the
/// reference backend (or the stored outputs), and after the first shape
/// (the decoder's first step) no run compiles a kernel: only parameters
/// and grids change with the values, the batch count among them.
#[test]
fn one_gpu_program_serves_every_value_of_the_symbolic_dims() {
    use egret::runtime::{Executable, PtxExecutable, ReferenceExecutable, WgpuExecutable};
    if !common::wgsl_adapter() {
        return;
    }
    for model in ["bert_dynamic", "gpt2_kv"] {
        let case = common::synthetic_dir().join(model);
        let opts = CompileOptions { backend: Backend::Wgsl, ..Default::default() };
        let (reports, compiles) = egret::check::check_case_counting(&case, &opts, Tolerance::default());
        assert!(reports.iter().all(|r| r.passed()), "{reports:?}");
        assert_eq!(compiles, egret::check::Compiles { models: 1, specializations: 0 }, "{model}");

        let c = egret::canonical(&case, &opts).unwrap();
        let device = egret::runtime::WgpuDevice::shared().unwrap();
        let program = egret::symbolic_gpu_plan(&c.graph, &opts, device.limits).unwrap();
        let wgsl = WgpuExecutable::symbolic(device, program).unwrap();
        let ptx = PtxExecutable::symbolic(
            common::InterpretedDevice::new(),
            egret::symbolic_gpu_plan(&c.graph, &opts, egret::PTX_LIMITS).unwrap(),
        )
        .unwrap();
        let reference = ReferenceExecutable::new(c.graph.clone()).unwrap();
        let names: Vec<String> = c.graph.inputs().iter().map(|&v| c.graph.input_name(v).to_string()).collect();
        // Batch 2; for the decoder, pasts of 0 to 5 with one token each
        // after a prompt of 3; for BERT, sequences of 1 to 6, then batches
        // of 1 and 3.
        let mut kernels_after = Vec::new();
        for step in 0..8usize {
            if model == "gpt2_kv" && step >= 6 {
                break;
            }
            let batch = match step {
                6 => 1,
                7 => 3,
                _ => 2,
            };
            let inputs: Vec<egret::ir::Tensor> = names
                .iter()
                .map(|n| {
                    let (tokens, past) = match model {
                        "gpt2_kv" if step == 0 => (3, 0),
                        "gpt2_kv" => (1, step + 2),
                        _ => (step.min(5) + 1, 0),
                    };
                    let shape: Vec<usize> = match n.as_str() {
                        "input_ids" => vec![batch, tokens],
                        "attention_mask" if model == "gpt2_kv" => vec![batch, past + tokens],
                        "attention_mask" => vec![batch, tokens],
                        _ => vec![batch, 2, past, 16],
                    };
                    let len: usize = shape.iter().product();
                    match n.as_str() {
                        "input_ids" => egret::ir::Tensor::from_vec(
                            shape,
                            (0..len as i64).map(|i| (i * 7 + step as i64) % 90).collect::<Vec<_>>(),
                        ),
                        "attention_mask" => egret::ir::Tensor::from_vec(shape, vec![1i64; len]),
                        _ => egret::ir::Tensor::from_vec(
                            shape,
                            (0..len).map(|i| ((i * 13 + step) % 17) as f32 * 0.05 - 0.4).collect::<Vec<_>>(),
                        ),
                    }
                })
                .collect();
            let want = reference.run(inputs.clone()).unwrap();
            for (backend, got) in
                [("wgsl", wgsl.run(inputs.clone()).unwrap()), ("ptx", ptx.run(inputs.clone()).unwrap())]
            {
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    let r = egret::check::compare(&format!("output {j}"), g, w, Tolerance::default());
                    assert!(r.failure.is_none(), "{model} step {step} on {backend}: {:?}", r.failure);
                }
            }
            kernels_after.push((wgsl.pipelines_compiled(), ptx.modules_loaded()));
        }
        // A past longer than the decoder's 128 positions: refused before
        // any kernel runs, naming the node, on both executors.
        if model == "gpt2_kv" {
            let past = 200;
            let inputs: Vec<egret::ir::Tensor> = names
                .iter()
                .map(|n| match n.as_str() {
                    "input_ids" => egret::ir::Tensor::from_vec(vec![1, 1], vec![1i64]),
                    "attention_mask" => egret::ir::Tensor::from_vec(vec![1, past + 1], vec![1i64; past + 1]),
                    _ => egret::ir::Tensor::from_vec(vec![1, 2, past, 16], vec![0.5f32; 2 * past * 16]),
                })
                .collect();
            for (backend, got) in [("wgsl", wgsl.run(inputs.clone())), ("ptx", ptx.run(inputs))] {
                let e = got.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(e.contains("would read or write outside"), "{backend}: {e}");
            }
        }
        // The shape arithmetic runs on the device too: no host step.
        let steps = ptx.plan().unwrap().steps;
        assert!(!steps.iter().any(|s| matches!(s, egret::backends::gpu::Step::Host { .. })), "{model}");
        // The decoder's steps after the prompt (the past grows, one token
        // each) compile nothing new after the first of them; nor do BERT's
        // sequences and batches after the first.
        let first = if model == "gpt2_kv" { 1 } else { 0 };
        assert!(kernels_after[first..].iter().all(|k| *k == kernels_after[first]), "{model}: {kernels_after:?}");
    }
}

/// The wide product tiles (128 x 128 and 128 x 64, 8 x 8 outputs an
/// invocation, double-buffered) against the reference on WGSL and the
/// interpreted PTX, where the tile choice is forced by a device of one
/// multiprocessor: sizes off the tiles and the depth, a depth below one
/// step, batches, operands read 4 words at a time and one at a time
/// (strides not a multiple of 4, a transposed operand), an epilogue; the
/// PTX with its shared-memory bank conflicts counted (none).
#[test]
fn wide_product_tiles_match_the_reference() {
    use egret::runtime::{Executable, ReferenceExecutable};
    let cases = [
        "v0: f32[200,72] = input{name=\"a\"}\nv1: f32[72,150] = input{name=\"b\"}\nv2: f32[200,150] = matmul v0, v1\noutput \"y\" = v2\n",
        "v0: f32[130,70] = input{name=\"a\"}\nv1: f32[70,260] = input{name=\"b\"}\nv2: f32[130,260] = matmul v0, v1\noutput \"y\" = v2\n",
        "v0: f32[2,3,129,64] = input{name=\"a\"}\nv1: f32[2,3,64,136] = input{name=\"b\"}\nv2: f32[2,3,129,136] = matmul v0, v1\noutput \"y\" = v2\n",
        "v0: f32[140,5] = input{name=\"a\"}\nv1: f32[5,68] = input{name=\"b\"}\nv2: f32[140,68] = matmul v0, v1\noutput \"y\" = v2\n",
        "v0: f32[131,40] = input{name=\"a\"}\nv1: f32[72,40] = input{name=\"b\"}\nv2: f32[40,72] = transpose{perm=[1, 0]} v1\nv3: f32[131,72] = matmul v0, v2\nv4: f32[72] = input{name=\"bias\"}\nv5: f32[131,72] = add v3, v4\nv6: f32[131,72] = relu v5\noutput \"y\" = v6\n",
    ];
    let wgsl = common::wgsl_adapter();
    let mut tiles_seen = std::collections::BTreeSet::new();
    for text in cases {
        let g = egret::ir::text::parse(text).unwrap();
        let (g, _) = egret::passes::egraph::optimize(&g, Default::default()).unwrap();
        let inputs: Vec<_> = g
            .inputs()
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let shape = g.ty(v).known_shape().unwrap().clone();
                let mut rng = egret::io::SplitMix::new(7 + i as u64);
                let n = shape.iter().product();
                egret::ir::Tensor::from_vec(
                    shape,
                    (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect::<Vec<_>>(),
                )
            })
            .collect();
        let want = ReferenceExecutable::new(g.clone()).unwrap().run(inputs.clone()).unwrap();
        // 16,352 bytes of workgroup memory take 128 x 64; 48 KiB 128 x 128.
        for bytes in [16_352, 48 << 10] {
            let limits =
                egret::backends::gpu::Limits { multiprocessors: 1, max_workgroup_bytes: bytes, ..Default::default() };
            let gpu = egret::gpu_plan(&g, &Default::default(), limits).unwrap();
            let names: Vec<String> = gpu.kernels.iter().map(|k| k.name.clone()).collect();
            let wide = names.iter().find(|n| n.starts_with("matmul_128x")).unwrap_or_else(|| panic!("{names:?}"));
            tiles_seen.insert(wide.split('_').nth(1).unwrap().to_string());
            let ptx = egret::runtime::PtxExecutable::new(common::InterpretedDevice::counting_banks(), gpu).unwrap();
            let mut runs = vec![("ptx", ptx.run(inputs.clone()).unwrap())];
            let banks = ptx.device().banks().unwrap();
            assert_eq!(banks.conflicts(), 0, "{names:?}: {banks:?}\n{text}");
            if wgsl && bytes <= egret::runtime::WgpuDevice::shared().unwrap().limits.max_workgroup_bytes {
                let (gpu, shaders) = egret::wgsl_program(&g, &Default::default(), limits).unwrap();
                let device = egret::runtime::WgpuDevice::shared().unwrap();
                let exe = egret::runtime::WgpuExecutable::new(device, gpu, &shaders).unwrap();
                runs.push(("wgsl", exe.run(inputs.clone()).unwrap()));
            }
            for (backend, got) in runs {
                let r = egret::check::compare("y", &got[0], &want[0], egret::check::Tolerance::default());
                assert!(r.failure.is_none(), "{backend} {names:?}: {:?}\n{text}", r.failure);
            }
        }
    }
    assert_eq!(tiles_seen.into_iter().collect::<Vec<_>>(), ["128x128", "128x64"]);
}
