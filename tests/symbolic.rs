//! Models whose dims stay symbolic: one compile of the model for every
//! shape, checked against the stored onnxruntime outputs, against the same
//! model imported with its dims bound, and on inputs that disagree.

mod common;

use egret::check::{check_case_counting, compare, Compiles, Tolerance};
use egret::ir::Tensor;
use egret::{canonical, compile, Backend, CompileOptions};

/// The synthetic exports with symbolic dims: BERT-style (batch, sequence)
/// and GPT-2 with a KV cache (batch, sequence, past_sequence, and the
/// mask's past_sequence + sequence), each with data sets of two shapes.
fn cases() -> Vec<std::path::PathBuf> {
    ["bert_dynamic", "gpt2_kv"].iter().map(|c| common::synthetic_dir().join(c)).collect()
}

#[test]
fn one_compile_serves_data_sets_of_different_shapes() {
    for case in cases() {
        for backend in [Backend::Cpu, Backend::Reference] {
            let opts = CompileOptions { backend, threads: Some(1), ..Default::default() };
            let (reports, compiles) = check_case_counting(&case, &opts, Tolerance::default());
            assert_eq!(reports.len(), 2, "{}", case.display());
            for r in &reports {
                assert!(r.passed(), "{} on {}: {r:?}", r.case, backend.name());
            }
            // The CPU's plan keeps the batch, sequence and past lengths
            // symbolic: one program, compiled with the model, runs both
            // shapes. The reference backend binds per run.
            assert_eq!(compiles, Compiles { models: 1, specializations: 0 }, "{}", case.display());
            if backend == Backend::Cpu {
                let model = compile(&case, &opts).unwrap();
                assert_eq!(model.program.executable.specializations(), None, "compiled up front");
            }
        }
    }
}

/// Inputs borrowed where they lie (`Model::run_refs`: the Python package's
/// numpy arrays, an IO binding's last outputs) give what owned ones give,
/// bit for bit, on the JIT (which reads them in place) and the reference
/// backend (which copies them), a decoder's presents fed straight back as
/// its past included. Borrowed
/// inputs are checked as owned ones are.
#[test]
fn borrowed_inputs_give_what_owned_ones_give() {
    use egret::ir::TensorRef;
    let case = common::synthetic_dir().join("gpt2_kv");
    let opts = |backend| CompileOptions { backend, threads: Some(2), ..Default::default() };
    let reference = compile(&case, &opts(Backend::Reference)).unwrap();
    let bound = compile(
        &case,
        &CompileOptions {
            backend: Backend::Reference,
            dims: [("batch", 1), ("sequence", 1), ("past_sequence", 5)].map(|(n, v)| (n.to_string(), v)).into(),
            ..Default::default()
        },
    )
    .unwrap();
    let first = egret::io::random_inputs(&bound.graph, 11).unwrap();
    for model in [compile(&case, &opts(Backend::Cpu)).unwrap(), reference] {
        let mut inputs = first.clone();
        for step in 0..3 {
            let refs: Vec<(&str, TensorRef)> = inputs.iter().map(|(n, t)| (n.as_str(), t.view())).collect();
            let borrowed = model.run_refs(&refs).unwrap();
            let owned = model.run(inputs.clone()).unwrap();
            assert_eq!(borrowed, owned, "step {step}");
            // The next step: the presents as the past, one more position.
            let mask = inputs.iter().find(|(n, _)| n == "attention_mask").unwrap().1.shape()[1] + 1;
            for (name, t) in &mut inputs {
                if let Some(layer) = name.strip_prefix("past_key_values.") {
                    let present = format!("present.{layer}");
                    *t = borrowed.iter().find(|(n, _)| *n == present).unwrap().1.clone();
                } else if name == "attention_mask" {
                    *t = Tensor::from_vec(vec![1, mask], vec![1i64; mask]);
                }
            }
        }
        // A borrowed input of the wrong type is refused by name.
        let wrong = Tensor::zeros(egret::ir::DType::F64, [1, 1]);
        let refs: Vec<(&str, TensorRef)> =
            first.iter().map(|(n, t)| (n.as_str(), if n == "input_ids" { wrong.view() } else { t.view() })).collect();
        let err = model.run_refs(&refs).unwrap_err().to_string();
        assert!(err.contains("input_ids"), "{err}");
    }
}

/// A slice over a symbolic axis from `s0 - 3` to 0 has no element for s0
/// of 3 or more (ONNX clamps its length at 0); the importer's type says
/// `-s0 + 3`. Concatenated after 64 rows, the CPU gave 63 rows at s0 = 4
/// where the reference gives 64 (a fuzzing finding): a call whose values
/// make any of the plan's sizes negative is now refused, naming the node.
#[test]
fn a_size_negative_at_run_time_is_refused_naming_the_node() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions/symbolic_slice_length_negative_at_run_time.onnx");
    let cpu = compile(&model, &CompileOptions { threads: Some(1), ..Default::default() }).unwrap();
    let reference = compile(&model, &CompileOptions { backend: Backend::Reference, ..Default::default() }).unwrap();
    let inputs = |rows: usize| {
        vec![
            ("x1".to_string(), Tensor::from_vec(vec![rows, 7], vec![1.5f32; rows * 7])),
            ("x3".to_string(), Tensor::from_vec(vec![], vec![0i64])),
        ]
    };
    // (Below 3 the start, `s0 - 3`, is negative: both refuse that call.)
    let (got, want) = (cpu.run(inputs(3)).unwrap(), reference.run(inputs(3)).unwrap());
    assert_eq!(got[0].1.shape(), [64, 0]);
    assert_eq!(got, want);
    for (rows, size) in [(4, "-1"), (9, "-6")] {
        let err = cpu.run(inputs(rows)).unwrap_err().to_string();
        assert!(err.contains("Slice_4") && err.contains("-s0 + 3") && err.contains(size), "{err}");
        assert_eq!(reference.run(inputs(rows)).unwrap()[0].1.shape(), [64, 0]);
    }
}

/// Every symbol at 3: no dim is 1, which would let a bound graph fold
/// broadcasts the symbolic one cannot assume.
fn threes(g: &egret::ir::Graph) -> egret::ir::Bindings {
    g.symbols().into_iter().map(|s| (s, 3)).collect()
}

#[test]
fn the_egraph_fuses_symbolic_shapes_as_it_fuses_bound_ones() {
    for case in cases() {
        let symbolic = canonical(&case, &CompileOptions::default()).unwrap();
        assert!(!symbolic.graph.is_bound(), "{}", case.display());
        let dims = threes(&symbolic.graph);
        let bound =
            canonical(&case, &CompileOptions { dims: dims.into_iter().collect(), ..Default::default() }).unwrap();
        assert!(bound.graph.is_bound());
        let fused = |g| egret::passes::egraph::count_fused(g);
        let symbolic_fusions = fused(&symbolic.graph);
        assert!(symbolic_fusions.iter().any(|(op, _)| op == "attention"), "{symbolic_fusions:?}");
        assert_eq!(symbolic_fusions, fused(&bound.graph), "{}", case.display());
    }
}

/// The symbolic graph given values computes what the model imported with
/// those values computes, on random inputs, through the reference backend
/// and the CPU's program for that binding.
#[test]
fn a_bound_symbolic_graph_computes_what_the_bound_import_does() {
    for case in cases() {
        let symbolic = compile(&case, &CompileOptions { threads: Some(1), ..Default::default() }).unwrap();
        let reference = compile(&case, &CompileOptions { backend: Backend::Reference, ..Default::default() }).unwrap();
        for values in [
            [("batch", 2), ("sequence", 5), ("past_sequence", 4)],
            [("batch", 1), ("sequence", 3), ("past_sequence", 0)],
        ] {
            let dims =
                values.iter().map(|&(n, v)| (n.to_string(), v)).filter(|(n, _)| symbolic.graph.symbols().contains(n));
            let opts = CompileOptions { backend: Backend::Reference, dims: dims.collect(), ..Default::default() };
            let bound = compile(&case, &opts).unwrap();
            let inputs = egret::io::random_inputs(&bound.graph, 7).unwrap();
            let want = bound.run(inputs.clone()).unwrap();
            for (backend, model) in [("cpu", &symbolic), ("reference", &reference)] {
                let got = model.run(inputs.clone()).unwrap();
                for ((name, g), (_, w)) in got.iter().zip(&want) {
                    let r = compare(name, g, w, Tolerance::default());
                    assert!(r.failure.is_none(), "{} {values:?} on {backend}: {r:?}", case.display());
                }
            }
        }
    }
}

#[test]
fn inputs_that_disagree_on_a_symbol_are_a_clear_error() {
    let case = common::synthetic_dir().join("bert_dynamic");
    let model = compile(&case, &CompileOptions { threads: Some(1), ..Default::default() }).unwrap();
    let ids = Tensor::from_vec(vec![2, 5], vec![1i64; 10]);
    let mask = Tensor::from_vec(vec![2, 6], vec![1i64; 12]);
    let err = model.run(vec![("input_ids".into(), ids.clone()), ("attention_mask".into(), mask)]).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("attention_mask") && text.contains("axis 1"), "{text}");
    // A rank the model does not declare is a type error naming the input.
    let flat = Tensor::from_vec(vec![10], vec![1i64; 10]);
    let err = model.run(vec![("input_ids".into(), flat), ("attention_mask".into(), ids)]).unwrap_err();
    assert!(err.to_string().contains("input `input_ids` should be i64[batch,sequence]"), "{err}");
}

/// A model whose import needs a symbolic dim's value (a `Pad` over an
/// axis of symbolic length, which Egret pads only for known sizes) is
/// served by compiling the file for each binding: still one model for
/// every shape, and the same answers.
#[test]
fn a_model_that_cannot_stay_symbolic_compiles_per_binding() {
    use common::onnx::{model, node, value_info_dims};
    use onnx_protobuf::tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    use onnx_protobuf::{GraphProto, TensorProto};
    use protobuf::Message;
    let mut g = GraphProto::new();
    g.input.push(value_info_dims("x", 1, &[DimParam("n".into()), DimValue(3)]));
    g.output.push(value_info_dims("y", 1, &[DimParam("m".into()), DimValue(5)]));
    let mut pads = TensorProto::new();
    pads.name = "pads".into();
    pads.data_type = 7;
    pads.dims = vec![4];
    pads.int64_data = vec![0, 1, 1, 1];
    g.initializer.push(pads);
    g.node.push(node("Pad", &["x", "pads"], &["y"]));
    let m = model(g);
    let dir = std::env::temp_dir().join(format!("egret-symbolic-pad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.onnx");
    std::fs::write(&path, m.write_to_bytes().unwrap()).unwrap();

    let model = compile(&path, &CompileOptions { threads: Some(1), ..Default::default() }).unwrap();
    assert!(model.program.signature.is_symbolic());
    for rows in [2usize, 4] {
        let x = Tensor::from_vec(vec![rows, 3], (0..rows * 3).map(|i| i as f32).collect::<Vec<_>>());
        let y = &model.run(vec![("x".into(), x)]).unwrap()[0].1;
        assert_eq!(y.shape(), &[rows + 1, 5]);
        let v = y.as_f32().unwrap();
        // Each row framed by a zero on both sides, then a row of zeros after.
        assert_eq!(&v[..5], &[0.0, 0.0, 1.0, 2.0, 0.0]);
        assert!(v[rows * 5..].iter().all(|&e| e == 0.0));
    }
    assert_eq!(model.program.executable.specializations(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Decode steps of one token over pasts of different lengths, the empty
/// past and the longest its causal table allows (127) included: the CPU
/// plan keeps the past length symbolic (only maps, views and attention's
/// keys see it), so one compile runs every step, and each agrees with the
/// reference backend on random data.
#[test]
fn decode_steps_run_from_one_compile() {
    let case = common::synthetic_dir().join("gpt2_kv");
    let cpu = compile(&case, &CompileOptions { threads: Some(1), ..Default::default() }).unwrap();
    let reference = compile(&case, &CompileOptions { backend: Backend::Reference, ..Default::default() }).unwrap();
    for past in [3usize, 0, 4, 9, 127, 3] {
        let opts = CompileOptions {
            backend: Backend::Reference,
            dims: [("batch", 1), ("sequence", 1), ("past_sequence", past)].map(|(n, v)| (n.to_string(), v)).into(),
            ..Default::default()
        };
        let bound = compile(&case, &opts).unwrap();
        let inputs = egret::io::random_inputs(&bound.graph, past as u64).unwrap();
        let want = reference.run(inputs.clone()).unwrap();
        for ((name, g), (_, w)) in cpu.run(inputs).unwrap().iter().zip(&want) {
            assert_eq!(g.shape(), w.shape(), "past {past}: {name}");
            let r = compare(name, g, w, Tolerance::default());
            assert!(r.failure.is_none(), "past {past}: {r:?}");
        }
    }
    // Compiled when the model was: no call compiled anything.
    assert_eq!(cpu.program.executable.specializations(), None);

    // Its causal table holds 128 positions: a longer past is an error
    // naming the node that would read past it, not a read outside it.
    let opts = CompileOptions {
        backend: Backend::Reference,
        dims: [("batch", 1), ("sequence", 1), ("past_sequence", 127)].map(|(n, v)| (n.to_string(), v)).into(),
        ..Default::default()
    };
    let mut inputs = egret::io::random_inputs(&compile(&case, &opts).unwrap().graph, 1).unwrap();
    for (name, t) in &mut inputs {
        if name.starts_with("past_key_values") {
            *t = Tensor::zeros(t.dtype(), [1, 2, 128, 16]);
        } else if name == "attention_mask" {
            *t = Tensor::from_vec(vec![1, 129], vec![1i64; 129]);
        }
    }
    // Every symbolic kernel's reach is checked before any runs.
    let err = cpu.run(inputs).unwrap_err().to_string();
    assert!(err.contains("past_sequence=128") && err.contains("outside"), "{err}");

    // The plan itself keeps the one symbol, in maps and attention only.
    let graph = canonical(&case, &CompileOptions::default()).unwrap().graph;
    let lower_opts = egret::lower_options(&CompileOptions::default());
    let step = graph.bind(&|s| (s != "past_sequence").then_some(1)).unwrap();
    let step = egret::passes::canonicalize(&step).unwrap().0;
    assert!(egret::backends::symbols_to_bind(&step, lower_opts).is_empty());
    let plan = egret::backends::lower(&step, lower_opts).unwrap();
    assert_eq!(plan.symbols, ["past_sequence"]);
    for k in plan.kernels.iter().filter(|k| !k.is_known()) {
        assert!(matches!(k.kind_name(), "map" | "attention" | "reference"), "{} depends on the past", k.kind_name());
    }
    assert!(plan.kernels.iter().filter(|k| !k.is_known()).count() >= 10);
    // ... and of the symbolic graph, nothing must be bound: the batch is
    // an attention axis of strides, the sequence rows of products, norms
    // and gathers.
    assert!(egret::backends::symbols_to_bind(&graph, lower_opts).is_empty());
    let all = egret::backends::lower(&graph, lower_opts).unwrap();
    assert_eq!(all.symbols, ["batch", "past_sequence", "sequence"]);

    // The cache itself: a second plan with the same kernels generates none.
    let graph = canonical(&case, &CompileOptions::default()).unwrap().graph;
    let bind = |past: usize| {
        let g = graph.bind(&|s| Some(if s == "past_sequence" { past } else { 1 })).unwrap();
        let g = egret::passes::canonicalize(&g).unwrap().0;
        egret::backends::lower(&g, egret::lower_options(&CompileOptions::default())).unwrap()
    };
    let cache = egret::backends::cpu::KernelCache::default();
    let first = egret::backends::cpu::compile_cached(bind(3), true, Some(&cache)).unwrap();
    let second = egret::backends::cpu::compile_cached(bind(4), true, Some(&cache)).unwrap();
    let same = first
        .entries
        .iter()
        .zip(&second.entries)
        .filter(|(a, b)| a.is_some() && a.map(|f| f as usize) == b.map(|f| f as usize))
        .count();
    let native = first.entries.iter().filter(|e| e.is_some()).count();
    assert!(same * 2 > native, "only {same} of {native} kernels were reused");
    assert!(same < native, "every kernel was reused, though some depend on the past length");
}

/// A row of a table read at a symbolic position: the plan keeps the
/// position, the copy's offset is computed per call, and a position past
/// the table is an error naming the node, never a read outside it.
#[test]
fn a_symbolic_view_is_checked_against_its_buffer_on_every_call() {
    let text = "v0: f32[n] = input{name=\"x\"}
v1: f32[8,4] = input{name=\"table\"}
v2: f32[1,4] = slice{starts=[\"n\", 0], ends=[\"n + 1\", 4], steps=[1, 1]} v1  # row_n
output \"y\" = v2
";
    let graph = egret::ir::text::parse(text).unwrap();
    let plan = egret::backends::lower(&graph, egret::lower_options(&CompileOptions::default())).unwrap();
    assert_eq!(plan.symbols, ["n"]);
    let compiled = egret::backends::cpu::compile(plan).unwrap();
    let exe = egret::runtime::CpuExecutable::new(compiled, 1);
    use egret::runtime::Executable;
    let table = Tensor::from_vec(vec![8, 4], (0..32).map(|i| i as f32).collect::<Vec<_>>());
    for n in [0usize, 3, 7] {
        let y = exe.run(vec![Tensor::zeros(egret::ir::DType::F32, [n]), table.clone()]).unwrap();
        let want: Vec<f32> = (4 * n..4 * n + 4).map(|i| i as f32).collect();
        assert_eq!(y[0].as_f32().unwrap(), want.as_slice(), "row {n}");
    }
    let err = exe.run(vec![Tensor::zeros(egret::ir::DType::F32, [8]), table]).unwrap_err().to_string();
    assert!(err.contains("`y`") && err.contains("n=8") && err.contains("outside input 1"), "{err}");
}

/// A slice `0..2` of an axis `n` is two elements only when `n` is 2 or
/// more: ONNX clamps it to `n` below that, and the plan copies a known two
/// (a fuzzing finding: at `n = 1` the CPU's code read past the input; of
/// integers, a reference kernel the GPUs run as an integer kernel, the
/// interpreted PTX did too). Every backend now checks a known kernel's
/// walks over a symbolic value at each call's values, and a reference
/// slice's walk is what it addresses: the call is refused, naming the node.
#[test]
fn a_known_slice_of_a_shorter_symbolic_axis_is_refused_naming_the_node() {
    // Floats (a view the CPU copies in generated code) and integers (the
    // GPU's host steps and the CPU's integer loops).
    let floats = "v0: f32[n] = input{name=\"x\"}
v1: f32[2] = slice{starts=[0], ends=[2], steps=[1]} v0  # head
v2: f32[2] = exp v1  # exp_of_head
output \"y\" = v2
";
    let ints = "v0: i64[n] = input{name=\"x\"}
v1: i64[2] = slice{starts=[0], ends=[2], steps=[1]} v0  # head
v2: f32[2] = cast{to=f32} v1  # head_as_float
output \"y\" = v2
";
    use egret::runtime::Executable;
    for (text, want) in [(floats, [0.0f32.exp(), 0.25f32.exp()]), (ints, [0.0, 1.0])] {
        let graph = egret::ir::text::parse(text).unwrap();
        let x = |n: usize| match text == ints {
            true => vec![Tensor::from_vec(vec![n], (0..n as i64).collect::<Vec<_>>())],
            false => vec![Tensor::from_vec(vec![n], (0..n).map(|i| i as f32 / 4.0).collect::<Vec<_>>())],
        };
        let mut runs: Vec<(String, Box<dyn Executable>)> = vec![];
        for opt_level in [0, 2] {
            let opts = CompileOptions { opt_level, threads: Some(1), ..Default::default() };
            let plan = egret::backends::lower(&graph, egret::lower_options(&opts)).unwrap();
            let cpu = egret::runtime::CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
            runs.push((format!("cpu --opt {opt_level}"), Box::new(cpu)));
            let program = egret::symbolic_gpu_plan(&graph, &opts, egret::PTX_LIMITS).unwrap();
            let ptx = egret::runtime::PtxExecutable::symbolic(common::InterpretedDevice::new(), program).unwrap();
            runs.push((format!("ptx --opt {opt_level}"), Box::new(ptx)));
            if common::wgsl_adapter() {
                let device = egret::runtime::WgpuDevice::shared().unwrap();
                let program = egret::symbolic_gpu_plan(&graph, &opts, device.limits).unwrap();
                let exe = egret::runtime::WgpuExecutable::symbolic(device, program).unwrap();
                runs.push((format!("wgsl --opt {opt_level}"), Box::new(exe)));
            }
        }
        for (backend, exe) in &runs {
            for n in [2usize, 5] {
                let y = exe.run(x(n)).unwrap_or_else(|e| panic!("{backend} at n={n}: {e}"));
                let got = y[0].as_f32().unwrap();
                assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-6), "{backend} at n={n}: {got:?}");
            }
            for n in [1usize, 0] {
                let err = exe.run(x(n)).expect_err(&format!("{backend} ran n={n}")).to_string();
                assert!(err.contains("head"), "{backend} at n={n}: {err}");
            }
        }
    }
    // The fuzzer's model (`compile_run` run 8) through the facade.
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/slice_past_a_symbolic_axis.onnx");
    for opt_level in [0, 2] {
        let cpu = compile(&model, &CompileOptions { opt_level, threads: Some(1), ..Default::default() }).unwrap();
        let inputs = |n: usize| {
            vec![
                ("x1".to_string(), Tensor::from_vec(vec![n], vec![1.5f32; n])),
                ("x2".to_string(), Tensor::from_vec(vec![1], vec![0.5f32])),
            ]
        };
        cpu.run(inputs(2)).unwrap();
        let err = cpu.run(inputs(1)).unwrap_err().to_string();
        assert!(err.contains("outside input 0"), "--opt {opt_level}: {err}");
    }
}

/// `--dim past_sequence=LO..HI`: calls inside the bounds run from the one
/// compile; one outside is an
/// error naming the dim and its bounds; bounds on a dim the model does not
/// keep symbolic are a usage error.
#[test]
fn declared_bounds_refuse_values_outside_them() {
    let case = common::synthetic_dir().join("gpt2_kv");
    let bounds: egret::DimBounds = [("past_sequence".to_string(), (0, 8))].into();
    let cpu =
        compile(&case, &CompileOptions { threads: Some(1), dim_bounds: bounds.clone(), ..Default::default() }).unwrap();
    let step = |past: usize| {
        let dims = [("batch", 1), ("sequence", 1), ("past_sequence", past)].map(|(n, v)| (n.to_string(), v)).into();
        let opts = CompileOptions { backend: Backend::Reference, dims, ..Default::default() };
        egret::io::random_inputs(&compile(&case, &opts).unwrap().graph, past as u64).unwrap()
    };
    for past in [0, 8] {
        cpu.run(step(past)).unwrap();
    }
    let err = cpu.run(step(9)).unwrap_err().to_string();
    assert!(err.contains("past_sequence") && err.contains("9") && err.contains("0..8"), "{err}");

    let wrong: egret::DimBounds = [("tokens".to_string(), (1, 4))].into();
    let err = compile(&case, &CompileOptions { dim_bounds: wrong, ..Default::default() }).err().unwrap().to_string();
    assert!(err.contains("no symbolic dim `tokens`") && err.contains("past_sequence"), "{err}");
}

/// An intermediate value whose size is symbolic lives in the arena, laid
/// out for the first call's values: a larger call lays it out again (at
/// least doubling), and later smaller calls run in it, all from one compile.
#[test]
fn the_arena_grows_for_a_call_past_its_capacity() {
    let text = "v0: f32[n] = input{name=\"x\"}
v1: f32[n] = exp v0
v2: f32[n] = add v1, v1
output \"y\" = v2
";
    let graph = egret::ir::text::parse(text).unwrap();
    let plan = egret::backends::lower(&graph, egret::lower_options(&CompileOptions::default())).unwrap();
    assert_eq!(plan.capacity.get("n"), Some(&egret::ir::NOMINAL_SYMBOL_VALUE));
    let first = plan.arena_bytes;
    let exe = egret::runtime::CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
    use egret::runtime::Executable;
    for n in [3usize, 1000, 5, 129, 0] {
        let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
        let y = exe.run(vec![Tensor::from_vec(vec![n], x.clone())]).unwrap();
        let want: Vec<f32> = x.iter().map(|v| 2.0 * v.exp()).collect();
        let got = y[0].as_f32().unwrap();
        assert_eq!(got.len(), n);
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs()), "n = {n}");
    }
    assert!(exe.arena_bytes().unwrap() >= 1000 * 4 && exe.arena_bytes().unwrap() > first);
}

/// Given its batch, a decoder's CPU plan keeps the sequence and past
/// lengths symbolic and is compiled when the model is: the prompt and the
/// steps after it run with no compile, and agree with the stored outputs.
#[test]
fn a_decoder_given_its_batch_compiles_once_up_front() {
    let case = common::synthetic_dir().join("gpt2_kv");
    let dims = [("batch".to_string(), 1)].into();
    let model = compile(&case, &CompileOptions { threads: Some(1), dims, ..Default::default() }).unwrap();
    assert_eq!(model.program.executable.specializations(), None, "compiled up front, not per call");
    let (reports, compiles) = egret::check::check_case_counting(
        &case,
        &CompileOptions { threads: Some(1), dims: [("batch".to_string(), 1)].into(), ..Default::default() },
        Tolerance::default(),
    );
    assert!(reports.iter().all(|r| r.passed()), "{reports:?}");
    assert_eq!(compiles, Compiles { models: 1, specializations: 0 });
}

/// `memory::layout_rule`, which the C artifact lays its arena out by at
/// run time: at any values, no two buffers live at the same time overlap,
/// and at the capacity the arena is no larger than the planner's.
#[test]
fn the_arena_rule_never_overlaps_live_buffers() {
    use egret::backends::plan::Storage;
    for case in cases() {
        let c = canonical(&case, &CompileOptions::default()).unwrap();
        let plan = egret::backends::lower(&c.graph, egret::lower_options(&CompileOptions::default())).unwrap();
        // Liveness worked out again here, as the oracle.
        let n = plan.kernels.len();
        let (mut first, mut last) = (vec![usize::MAX; plan.buffers.len()], vec![0; plan.buffers.len()]);
        for (step, k) in plan.kernels.iter().enumerate() {
            let (reads, writes) = k.buffers();
            for b in writes {
                first[b] = first[b].min(step);
                last[b] = last[b].max(step);
            }
            for b in reads {
                last[b] = last[b].max(step);
            }
        }
        for (b, _) in &plan.outputs {
            last[*b] = n;
        }
        let rule = egret::backends::memory::layout_rule(&plan);
        let arena = plan.buffers.iter().filter(|b| matches!(b.storage, Storage::Arena { .. })).count();
        assert_eq!(rule.len(), arena);
        let mut values: Vec<egret::ir::Bindings> = vec![plan.capacity.clone()];
        for (b, p, s) in [(1, 0, 1), (3, 7, 2), (1, 130, 1), (2, 0, 300), (64, 1, 9)] {
            values.push([("batch", b), ("past_sequence", p), ("sequence", s)].map(|(k, v)| (k.to_string(), v)).into());
        }
        for at in &values {
            let size = |b: usize| {
                let bytes = egret::backends::memory::bytes_at(&plan, b, at).max(1);
                bytes.div_ceil(64) * 64
            };
            let mut offset = std::collections::HashMap::new();
            let mut top = 0;
            for (b, below) in &rule {
                let o = below.iter().map(|a| offset[a] + size(*a)).max().unwrap_or(0);
                offset.insert(*b, o);
                top = top.max(o + size(*b));
            }
            for (a, _) in &rule {
                for (b, _) in &rule {
                    let live = first[*a] <= last[*b] && first[*b] <= last[*a] && first[*a] != usize::MAX;
                    if a < b && live {
                        let (oa, ob) = (offset[a], offset[b]);
                        assert!(
                            oa + size(*a) <= ob || ob + size(*b) <= oa,
                            "{}: buffers {a} and {b} overlap at {at:?}",
                            case.display()
                        );
                    }
                }
            }
            if *at == plan.capacity {
                assert!(top <= plan.arena_bytes, "{}: {top} > {}", case.display(), plan.arena_bytes);
            }
        }
    }
}

/// The run-time words of `cpu::call`, which the JIT evaluates and the C
/// artifact prints, are the blocks the kernel library's own encoders make
/// for the kernel at those values: attention's parameters and batch table,
/// a symbolic product's epilogue program.
#[test]
fn the_call_words_are_the_kernel_librarys_blocks() {
    use egret::backends::cpu::{call, library};
    use egret::backends::plan::KernelKind;
    let (mut attention, mut epilogues) = (0, 0);
    for case in cases() {
        let c = canonical(&case, &CompileOptions::default()).unwrap();
        let plan = egret::backends::lower(&c.graph, egret::lower_options(&CompileOptions::default())).unwrap();
        let plan = egret::backends::cpu::choose::choose(plan);
        for (b, p, s) in [(1, 0, 1), (2, 5, 3), (3, 1, 17)] {
            let at: egret::ir::Bindings =
                [("batch", b), ("past_sequence", p), ("sequence", s)].map(|(k, v)| (k.to_string(), v)).into();
            let values = egret::ir::DimValues::new(&at);
            for k in &plan.kernels {
                let blocks = call::blocks(k);
                let bytes: Vec<Vec<u8>> = blocks.iter().map(|b| b.bytes_at(&values).unwrap()).collect();
                match &k.kind {
                    KernelKind::Attention(a) if !a.is_known() => {
                        let bound = a.at(&values).unwrap();
                        assert_eq!(
                            bytes,
                            vec![library::attention_params(&bound).to_bytes(), library::attention_table(&bound)]
                        );
                        attention += 1;
                    }
                    KernelKind::MatMul(mm) if !mm.m.is_known() && mm.epilogue.is_some() => {
                        let e = mm.epilogue.as_ref().unwrap();
                        let m = values.get(mm.m).unwrap() as usize;
                        assert_eq!(bytes, vec![library::encode_epilogue(e, m, mm.n, 2 + e.inputs.len(), 2)]);
                        epilogues += 1;
                    }
                    _ => assert!(k.is_known() || bytes.is_empty() || matches!(k.kind, KernelKind::Attention(_))),
                }
            }
        }
    }
    assert!(attention > 0 && epilogues > 0, "{attention} attention kernels, {epilogues} epilogues");
}

/// `text` lowered with its symbols kept and compiled for the CPU, every
/// kernel native (none left to the reference evaluator), with the
/// reference executable to check it against.
fn native_cpu_program(
    text: &str,
) -> (egret::ir::Graph, egret::runtime::CpuExecutable, egret::runtime::ReferenceExecutable) {
    let graph = egret::ir::text::parse(text).unwrap();
    let plan = egret::backends::lower(&graph, egret::lower_options(&CompileOptions::default())).unwrap();
    let plan = egret::backends::cpu::choose::choose(plan);
    let kinds: Vec<String> = plan.kernels.iter().map(|k| k.detailed_kind()).collect();
    assert!(kinds.iter().all(|k| !k.starts_with("reference")), "{kinds:?}");
    let exe = egret::runtime::CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
    let reference = egret::runtime::ReferenceExecutable::new(graph.clone()).unwrap();
    (graph, exe, reference)
}

/// `exe` and `reference` give equal outputs (these graphs compute exactly).
fn agree(
    graph: &egret::ir::Graph,
    exe: &egret::runtime::CpuExecutable,
    reference: &egret::runtime::ReferenceExecutable,
    inputs: Vec<Tensor>,
    what: &str,
) {
    use egret::runtime::Executable;
    let want = reference.run(inputs.clone()).unwrap();
    let got = exe.run(inputs).unwrap();
    for ((g, w), (name, _)) in got.iter().zip(&want).zip(graph.outputs()) {
        assert_eq!(g, w, "{name} at {what}");
    }
}

/// Convolutions over a symbolic batch (patch embeddings, padded, strided
/// and dilated, 1-d and 2-d, with and without a bias) are one CPU program
/// for every batch, agreeing with the reference at each.
#[test]
fn convolutions_over_a_symbolic_batch_are_one_program() {
    use egret::runtime::{Executable, ReferenceExecutable};
    let text = "v0: f32[batch,3,8,8] = input{name=\"x\"}
v1: f32[5,3,4,4] = input{name=\"w\"}
v2: f32[5] = input{name=\"b\"}
v3: f32[batch,5,2,2] = conv{strides=[4, 4], pads=[0, 0, 0, 0], dilations=[1, 1], group=1} v0, v1, v2
v4: f32[4,3,3,3] = input{name=\"w2\"}
v5: f32[batch,4,4,4] = conv{strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1], group=1} v0, v4
v6: f32[batch,4,5,6] = conv{strides=[1, 1], pads=[1, 0, 0, 0], dilations=[2, 1], group=1} v0, v4
v7: f32[batch,3,9] = input{name=\"s\"}
v8: f32[4,3,2] = input{name=\"w3\"}
v9: f32[4] = input{name=\"b3\"}
v10: f32[batch,4,7] = conv{strides=[1], pads=[0, 1], dilations=[3], group=1} v7, v8, v9
output \"patch\" = v3
output \"padded\" = v5
output \"dilated\" = v6
output \"one_d\" = v10
";
    let graph = egret::ir::text::parse(text).unwrap();
    let plan = egret::backends::lower(&graph, egret::lower_options(&CompileOptions::default())).unwrap();
    assert_eq!(plan.symbols, ["batch"]);
    let exe = egret::runtime::CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
    let reference = ReferenceExecutable::new(graph.clone()).unwrap();
    let mut rng = egret::io::SplitMix::new(7);
    for batch in [1usize, 2, 3] {
        let inputs: Vec<Tensor> = graph
            .inputs()
            .iter()
            .map(|&v| {
                let mut shape = graph.ty(v).shape.clone();
                if !shape[0].is_known() {
                    shape[0] = egret::ir::Dim::new(batch);
                }
                let shape: Vec<usize> = shape.iter().map(|d| d.size().unwrap()).collect();
                let n = shape.iter().product();
                Tensor::from_vec(shape, (0..n).map(|_| (rng.next_f64() * 4.0 - 2.0) as f32).collect::<Vec<_>>())
            })
            .collect();
        let want = reference.run(inputs.clone()).unwrap();
        let got = exe.run(inputs).unwrap();
        for ((g, w), (name, _)) in got.iter().zip(&want).zip(graph.outputs()) {
            let r = egret::check::compare(name, g, w, egret::check::Tolerance { rtol: 1e-4, atol: 1e-5 });
            assert!(r.failure.is_none(), "{name} at batch {batch}: {:?}", r.failure);
        }
    }
}

/// Mask arithmetic as transformers' mask functions write it, at symbolic
/// sizes: integer sums and products broadcast over positions, comparisons
/// of key and query positions, and a mask gathered from its flattened copy
/// at computed indices (a gather whose axis is `batch * total`). The CPU
/// runs them as loop nests and a gather kernel reading their sizes: one
/// program, the reference's answers at every shape, and a bad index an
/// error naming the axis length at this call.
#[test]
fn mask_arithmetic_at_symbolic_sizes_is_native() {
    use egret::runtime::Executable;
    let text = "v0: i64[total] = input{name=\"kv\"}
v1: i64[sequence,1] = input{name=\"q\"}
v2: bool[sequence,total] = less_or_equal v0, v1
v3: bool[sequence,total] = greater v1, v0
v4: i64[batch,1] = input{name=\"rows\"}
v5: i64[] = const [3]
v6: i64[batch,1] = mul v4, v5
v7: i64[batch,total] = add v6, v0
v8: i32[total] = input{name=\"narrow\"}
v9: bool[total] = equal v8, v8
v10: bool[batch*total,1] = input{name=\"mask\"}
v11: bool[batch,total,1] = gather{axis=0} v10, v7
output \"causal\" = v2
output \"strict\" = v3
output \"index\" = v7
output \"same\" = v9
output \"gathered\" = v11
";
    let (graph, exe, reference) = native_cpu_program(text);
    for (batch, sequence, total) in [(1usize, 1usize, 1usize), (2, 3, 5), (3, 1, 9), (1, 7, 7)] {
        let ints = |n: usize, f: &dyn Fn(usize) -> i64| (0..n).map(f).collect::<Vec<i64>>();
        let inputs = vec![
            Tensor::from_vec(vec![total], ints(total, &|i| i as i64)),
            Tensor::from_vec(vec![sequence, 1], ints(sequence, &|i| (total - sequence + i) as i64)),
            // Rows of 3 only where the gather stays inside `batch * total`.
            Tensor::from_vec(vec![batch, 1], ints(batch, &|b| (b * total / 3) as i64)),
            Tensor::from_vec(vec![total], (0..total).map(|i| i as i32 - 2).collect::<Vec<i32>>()),
            Tensor::from_vec(vec![batch * total, 1], (0..batch * total).map(|i| i % 3 != 0).collect::<Vec<bool>>()),
        ];
        agree(&graph, &exe, &reference, inputs, &format!("batch {batch}, sequence {sequence}, total {total}"));
    }
    // An index past `batch * total` (rows of 3 over a total of 2).
    let err = exe
        .run(vec![
            Tensor::from_vec(vec![2], vec![0i64, 1]),
            Tensor::from_vec(vec![1, 1], vec![1i64]),
            Tensor::from_vec(vec![1, 1], vec![1i64]),
            Tensor::from_vec(vec![2], vec![0i32, 1]),
            Tensor::from_vec(vec![2, 1], vec![true, false]),
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range for an axis of length batch*total = 2"), "{err}");
}

/// Gathers at computed indices at symbolic sizes, as the exporters write
/// a mask's (`GatherND` of `[batch, kv]` index pairs) and BERT's token
/// types (`GatherElements` of a constant table): CPU loop nests reading
/// their sizes, the reference's answers at every shape, negative indices
/// counted from the end, and an index out of range an error naming the op.
#[test]
fn gathers_at_computed_indices_at_symbolic_sizes_are_native() {
    use egret::runtime::Executable;
    let text = "v0: bool[batch,total] = input{name=\"mask\"}
v1: i64[batch,1,total,2] = input{name=\"pairs\"}
v2: bool[batch,1,total] = gather_nd{batch_dims=0} v0, v1
v3: f32[batch,total,3] = input{name=\"rows\"}
v4: i32[batch,2] = input{name=\"which\"}
v5: f32[batch,3] = gather_nd{batch_dims=0} v3, v4
v6: i64[4,total] = input{name=\"table\"}
v7: i64[2,total] = input{name=\"at\"}
v8: i64[2,total] = gather_elements{axis=0} v6, v7
output \"nd\" = v2
output \"nd_rows\" = v5
output \"elements\" = v8
";
    let (graph, exe, reference) = native_cpu_program(text);
    let inputs = |batch: usize, total: usize, bad: bool| {
        let pairs: Vec<i64> = (0..batch * total)
            .flat_map(|i| {
                [(i / total) as i64, if i % 2 == 0 { (i % total) as i64 } else { (i % total) as i64 - total as i64 }]
            })
            .collect();
        // (image, position) pairs, every other image counted from the end.
        let which: Vec<i32> = (0..batch)
            .flat_map(|b| [if b % 2 == 1 { b as i32 - batch as i32 } else { b as i32 }, ((b * 2) % total) as i32])
            .collect();
        let mut at: Vec<i64> = (0..2 * total).map(|i| (i % 4) as i64 - 2).collect();
        if bad {
            at[total] = 4;
        }
        vec![
            Tensor::from_vec(vec![batch, total], (0..batch * total).map(|i| i % 3 != 1).collect::<Vec<bool>>()),
            Tensor::from_vec(vec![batch, 1, total, 2], pairs),
            Tensor::from_vec(vec![batch, total, 3], (0..batch * total * 3).map(|i| i as f32 * 0.5).collect::<Vec<_>>()),
            Tensor::from_vec(vec![batch, 2], which),
            Tensor::from_vec(vec![4, total], (0..4 * total).map(|i| i as i64 * 10).collect::<Vec<_>>()),
            Tensor::from_vec(vec![2, total], at),
        ]
    };
    for (batch, total) in [(1usize, 1usize), (2, 5), (3, 2), (1, 9)] {
        agree(&graph, &exe, &reference, inputs(batch, total, false), &format!("batch {batch}, total {total}"));
    }
    let err = exe.run(inputs(2, 3, true)).unwrap_err().to_string();
    assert!(err.contains("gather_elements index out of range"), "{err}");
}

/// T5's relative position buckets at symbolic sizes: integer minima and
/// maxima, magnitudes, negations and selections, and the casts around a
/// `log` (an integer to f32, an f32 back, saturating: `log(0)` is -inf,
/// which casts to the lowest integer; NaN to 0), as CPU loop nests that
/// agree with the reference at every shape.
#[test]
fn position_bucket_arithmetic_at_symbolic_sizes_is_native() {
    let text = "v0: i64[q,1] = input{name=\"queries\"}
v1: i64[k] = input{name=\"keys\"}
v2: i64[q,k] = sub v1, v0
v3: i64[q,k] = abs v2
v4: i64[q,k] = neg v2
v5: i64[] = const [3]
v6: i64[q,k] = min v3, v5
v7: i64[q,k] = max v4, v5
v8: bool[q,k] = less v2, v5
v9: i64[q,k] = where v8, v6, v7
v10: f32[q,k] = cast{to=f32} v3
v11: f32[q,k] = log v10
v12: i64[q,k] = cast{to=i64} v11
v13: i32[q,k] = cast{to=i32} v9
v14: i64[q,k] = cast{to=i64} v8
output \"bucket\" = v9
output \"log_cast\" = v12
output \"narrow\" = v13
output \"from_bool\" = v14
";
    let (graph, exe, reference) = native_cpu_program(text);
    for (q, k) in [(1usize, 1usize), (3, 5), (6, 2), (4, 9)] {
        let inputs = vec![
            Tensor::from_vec(vec![q, 1], (0..q).map(|i| i as i64 * 2 - 3).collect::<Vec<_>>()),
            Tensor::from_vec(vec![k], (0..k).map(|j| j as i64 - 4).collect::<Vec<_>>()),
        ];
        agree(&graph, &exe, &reference, inputs, &format!("q {q}, k {k}"));
    }
}
