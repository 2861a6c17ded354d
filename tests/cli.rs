//! The `egret` command line, end to end.

mod common;

use std::process::Command;

fn egret(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_egret")).args(args).current_dir(common::repo_root()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_reports_every_output_and_ends_with_the_tally() {
    let (ok, out, err) = egret(&["check", "tests/data/zoo"]);
    assert!(ok, "{out}{err}");
    assert_eq!(out.lines().last(), Some("7 passed, 0 failed"));
    assert!(out.contains("PASS last_hidden_state: max abs err"), "{out}");
}

/// Progress bars draw only on a terminal: piped, stderr stays empty (the
/// bench's 8,000 runs take about 1.5 s, past the bars' one-second delay).
#[test]
fn progress_stays_off_a_pipe() {
    let (ok, out, err) = egret(&["check", "tests/data/zoo"]);
    assert!(ok, "{out}{err}");
    assert_eq!(err, "", "stderr of a piped check");
    let (ok, out, err) = egret(&["bench", "tests/data/zoo/bert_tiny", "--iters", "8000", "--warmup", "1"]);
    assert!(ok, "{out}{err}");
    // Its notes on random inputs, nothing else.
    assert!(err.lines().all(|l| l.starts_with("note: input")), "stderr of a piped bench: {err}");
}

#[test]
fn check_fails_with_a_non_zero_status_when_an_output_differs() {
    let dir = std::env::temp_dir().join(format!("egret-cli-check-{}", std::process::id()));
    let case = dir.join("vit");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(case.join("test_data_set_0")).unwrap();
    let src = common::zoo_dir().join("vit_tiny");
    std::fs::copy(src.join("model.onnx"), case.join("model.onnx")).unwrap();
    std::fs::copy(src.join("test_data_set_0/input_0.pb"), case.join("test_data_set_0/input_0.pb")).unwrap();
    // Scale the stored reference so that it no longer matches.
    let (name, t) = egret::io::read_pb(&src.join("test_data_set_0/output_0.pb")).unwrap();
    let scaled: Vec<f32> = t.as_f32().unwrap().iter().map(|x| x * 1.5 + 0.1).collect();
    let bad = egret::ir::Tensor::from_vec(t.shape().to_vec(), scaled);
    egret::io::write_pb(&case.join("test_data_set_0/output_0.pb"), &name, &bad).unwrap();
    let (ok, out, _) = egret(&["check", dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("FAIL logits"), "{out}");
    assert_eq!(out.lines().last(), Some("0 passed, 1 failed"));
}

#[test]
fn run_saves_outputs_that_match_check() {
    let dir = std::env::temp_dir().join(format!("egret-cli-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let input = "tests/data/zoo/deit_tiny_distilled/test_data_set_0/input_0.pb";
    let (ok, out, err) = egret(&[
        "run",
        "tests/data/zoo/deit_tiny_distilled/model.onnx",
        "--input",
        &format!("pixel_values={input}"),
        "--save-outputs",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("logits: f32[1,10]"), "{out}");
    let saved = egret::io::read_npy(&dir.join("logits.npy")).unwrap();
    let (_, want) =
        egret::io::read_pb(&common::zoo_dir().join("deit_tiny_distilled/test_data_set_0/output_0.pb")).unwrap();
    let r = egret::check::compare("logits", &saved, &want, Default::default());
    assert!(r.failure.is_none(), "{r:?}");
}

#[test]
fn run_makes_random_inputs_within_index_ranges() {
    // BERT's input_ids index a 1000-row embedding; random ids must stay in range.
    let (ok, out, err) = egret(&["run", "tests/data/zoo/bert_tiny/model.onnx", "--seed", "7"]);
    assert!(ok, "{err}");
    assert!(err.contains("input `input_ids` i64[1,16] is random"), "{err}");
    assert!(out.contains("pooler_output: f32[1,64]"), "{out}");
}

#[test]
fn a_model_folder_stands_for_its_model_file() {
    let (ok, out, err) = egret(&["run", "tests/data/zoo/bert_tiny", "--seed", "7"]);
    assert!(ok, "{err}");
    assert!(out.contains("pooler_output: f32[1,64]"), "{out}");
}

#[test]
fn ir_prints_the_canonical_graph() {
    let (ok, out, err) = egret(&["ir", "tests/data/zoo/gpt2_tiny/model.onnx"]);
    assert!(ok, "{err}");
    assert!(out.contains("= input{name=\"input_ids\"}"), "{out}");
    // At the default --opt 2 every norm there follows a residual add.
    assert!(out.contains("= residual_norm{axis=2"), "{out}");
    assert!(out.contains("values>"), "large constants are elided: {out}");
}

#[test]
fn explain_reports_fusions_kernels_and_stage_times_as_json() {
    let (ok, out, err) = egret(&["explain", "tests/data/zoo/gpt2_tiny/model.onnx", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["fusions"]["attention"], 2, "{v}");
    assert_eq!(v["fusions"]["gelu"], 2, "{v}");
    assert_eq!(v["fusions"]["residual_norm"], 5, "{v}");
    assert_eq!(v["tilings"]["matmul packed"], 9, "{v}");
    assert_eq!(v["tilings"]["attention 16x16"], 2, "{v}");
    assert!(v["kernels"].as_array().is_some_and(|k| !k.is_empty()));
    assert!(v["stage_ms"]["egraph_saturate"].as_f64().is_some(), "{v}");
    assert!(v["arena_bytes"].as_u64().is_some_and(|a| a > 0));
}

#[test]
fn explain_at_opt_0_runs_no_e_graph() {
    let (ok, out, err) = egret(&["explain", "tests/data/zoo/bert_tiny/model.onnx", "--opt", "0", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["fusions"].get("attention").is_none(), "{v}");
    assert!(v["stage_ms"].get("egraph_saturate").is_none(), "{v}");
}

/// `explain --backend ptx` gives each dispatch's occupancy and roofline
/// estimate on an H100, and their sum (the registers where `ptxas` is).
#[test]
fn explain_estimates_each_ptx_kernel_on_an_h100() {
    let (ok, out, err) = egret(&["explain", "tests/data/zoo/bert_tiny", "--backend", "ptx"]);
    if !ok && err.contains("no ptx backend") {
        return;
    }
    assert!(ok, "{err}");
    assert!(out.contains("blocks/SM (") && out.contains(" waves, ") && out.contains(" bound "), "{out}");
    assert!(out.contains("estimate on an H100 SXM: "), "{out}");
}

#[test]
fn graph_draws_dot_with_fused_ops_highlighted() {
    let (ok, out, err) = egret(&["graph", "tests/data/zoo/vit_tiny/model.onnx", "--format", "dot"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("digraph egret {"), "{out}");
    assert!(out.contains("attention_tiled{scale=") && out.contains("fillcolor=lightblue"), "{out}");
}

#[test]
fn bench_compare_reports_both_levels() {
    let (ok, out, err) =
        egret(&["bench", "tests/data/zoo/vit_tiny/model.onnx", "--compare", "--iters", "3", "--warmup", "1", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert!(
        v["opt0_median_ms"].as_f64().is_some()
            && v["fast_median_ms"].as_f64().is_some()
            && v["speedup"].as_f64().is_some(),
        "{v}"
    );
}

/// The kernel library's AVX2 and baseline builds (the host runs the widest
/// by default) give the same answers on every zoo model, and on the
/// dynamically quantized BERT, whose integer products each path runs its
/// own way (AVX-512 VNNI, AVX2's `vpmaddubsw`, f32 over decoded panels).
#[test]
fn check_passes_with_the_narrower_kernel_builds() {
    for isa in ["avx2", "baseline"] {
        for (models, want) in
            [("tests/data/zoo", "7 passed, 0 failed"), ("tests/data/formats/bert_dynamic_int8", "3 passed, 0 failed")]
        {
            let out = Command::new(env!("CARGO_BIN_EXE_egret"))
                .args(["check", models])
                .env("EGRET_KERNEL_ISA", isa)
                .current_dir(common::repo_root())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{isa} {models}: {text}{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(text.lines().last(), Some(want), "{isa} {models}");
        }
    }
}

/// `EGRET_KERNEL_ISA` naming no kernel path, or one this CPU lacks, is an
/// error naming the variable, never ignored (nor a SIGILL).
#[test]
fn an_unusable_kernel_path_is_refused() {
    let run = |isa: &str| {
        Command::new(env!("CARGO_BIN_EXE_egret"))
            .args(["run", "tests/data/zoo/bert_tiny"])
            .env("EGRET_KERNEL_ISA", isa)
            .current_dir(common::repo_root())
            .output()
            .unwrap()
    };
    let out = run("avx1024");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("EGRET_KERNEL_ISA=avx1024 names no kernel path"), "{err}");
    // A path wider than this CPU's, where there is one.
    let best = egret::backends::cpu::kernels::Isa::host();
    if best != egret::backends::cpu::kernels::Isa::Avx512 {
        let out = run("avx512");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("but this CPU's best path is"), "{err}");
    }
}

/// Without a CUDA driver, `--backend ptx` is a clean error naming what is
/// missing, with exit status 1 (where there is a driver, it runs).
#[test]
fn the_ptx_backend_without_a_driver_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["run", "tests/data/zoo/bert_tiny", "--backend", "ptx"])
        .current_dir(common::repo_root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!("a CUDA driver is present: the ptx backend ran");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no CUDA driver found") && !err.contains("panicked"), "{err}");
}

/// `egret compile --emit ptx` writes one module per distinct kernel and
/// the manifest, with no GPU or CUDA install.
#[test]
fn compile_emits_ptx_modules_and_a_manifest() {
    let dir = std::env::temp_dir().join(format!("egret-cli-ptx-{}", std::process::id()));
    let (ok, out, err) = egret(&["compile", "tests/data/zoo/gpt2_tiny", "--emit", "ptx", "-o", dir.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let modules: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
        .collect();
    assert!(modules.len() >= 4, "{modules:?}");
    for m in &modules {
        let text = std::fs::read_to_string(m).unwrap();
        assert!(text.contains(".target sm_80") && text.contains(".visible .entry"), "{}", m.display());
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let steps = manifest["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["kind"] == "attention" && s["shared_bytes"].as_u64().unwrap() > 0), "{manifest}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without a WebGPU adapter (no Vulkan driver found), `--backend wgsl` says
/// what to install, with exit status 1.
#[test]
fn the_wgsl_backend_without_an_adapter_says_what_to_install() {
    let out = Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(["run", "tests/data/zoo/bert_tiny", "--backend", "wgsl"])
        .current_dir(common::repo_root())
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("mesa-vulkan-drivers") && !err.contains("panicked"), "{err}");
}

/// `check` compiles a model once for all its data sets: bert_dynamic's two
/// shapes share the symbolic compile and are lowered once each; two data
/// sets of a model without symbolic dims share one program.
#[test]
fn check_says_how_many_compiles_its_data_sets_took() {
    let (ok, out, err) = egret(&["check", "tests/data/synthetic/bert_dynamic"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("bert_dynamic: 2 data sets, 1 compile\n"), "{out}");
    assert_eq!(out.lines().last(), Some("2 passed, 0 failed"));

    let dir = std::env::temp_dir().join(format!("egret-cli-compiles-{}", std::process::id()));
    let case = dir.join("bert");
    let _ = std::fs::remove_dir_all(&dir);
    let src = common::zoo_dir().join("bert_tiny");
    std::fs::create_dir_all(&case).unwrap();
    std::fs::copy(src.join("model.onnx"), case.join("model.onnx")).unwrap();
    for set in ["test_data_set_0", "test_data_set_1"] {
        std::fs::create_dir_all(case.join(set)).unwrap();
        for f in std::fs::read_dir(src.join("test_data_set_0")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), case.join(set).join(f.file_name())).unwrap();
        }
    }
    let (ok, out, err) = egret(&["check", case.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("bert: 2 data sets, 1 compile\n"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `explain` names the model's symbolic dims and the sizes compilation
/// fixed them at; the C header of a library says the same.
#[test]
fn explain_and_the_c_header_name_the_symbolic_dims() {
    let model = "tests/data/synthetic/bert_dynamic";
    let (ok, out, err) = egret(&["explain", model, "--json", "--dim", "batch=2", "--dim", "sequence=12"]);
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["symbols"], serde_json::json!({"batch": 2, "sequence": 12}));
    let (ok, out, _) = egret(&["explain", "tests/data/zoo/bert_tiny", "--json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["symbols"], serde_json::json!({}));
    let dir = std::env::temp_dir().join(format!("egret-cli-symbols-{}", std::process::id()));
    let (ok, out, err) =
        egret(&["compile", model, "-o", dir.to_str().unwrap(), "--dim", "batch=1", "--dim", "sequence=7"]);
    // The header is written before the link, which needs a C compiler.
    assert!(ok || err.contains("C compiler"), "{out}{err}");
    let header = std::fs::read_to_string(dir.join("bert_dynamic.h")).unwrap();
    assert!(header.contains("fixed for this library by --dim: batch = 1, sequence = 7"), "{header}");
    assert!(!header.contains("Symbolic dims:"), "{header}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A symbolic dim nothing binds is a clear error naming the input, the dim
/// and the flag that binds it.
#[test]
fn an_unbound_symbolic_dim_says_how_to_bind_it() {
    let (ok, out, err) = egret(&["run", "tests/data/synthetic/bert_dynamic"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("input `input_ids` has the symbolic shape i64[batch,sequence]: give its dims values with --dim"),
        "{err}"
    );
    let (ok, out, err) =
        egret(&["run", "tests/data/synthetic/bert_dynamic", "--dim", "batch=1", "--dim", "sequence=9"]);
    assert!(ok, "{out}{err}");
    // An artifact keeps them symbolic, and its header says so.
    let dir = std::env::temp_dir().join(format!("egret-cli-unbound-{}", std::process::id()));
    let (ok, out, err) = egret(&["compile", "tests/data/synthetic/bert_dynamic", "-o", dir.to_str().unwrap()]);
    assert!(ok || err.contains("C compiler"), "{out}{err}");
    let header = std::fs::read_to_string(dir.join("bert_dynamic.h")).unwrap();
    assert!(header.contains("Symbolic dims: batch (any size), sequence (any size)"), "{header}");
    assert!(header.contains("\"input_ids\" i64[batch, sequence]"), "{header}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A library keeps a dim symbolic only where every kernel can: a product
/// of two activations over a symbolic batch is compiled for known sizes,
/// and `egret compile` says which dim to give a value; so it does for a
/// dim no input's shape gives.
#[test]
fn a_library_names_the_dims_it_cannot_keep_symbolic() {
    use common::onnx::{model, node, value_info_dims};
    use onnx_protobuf::tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    use onnx_protobuf::GraphProto;
    use protobuf::Message;
    let dir = std::env::temp_dir().join(format!("egret-cli-keep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = GraphProto::new();
    g.input.push(value_info_dims("x", 1, &[DimParam("n".into()), DimValue(4), DimValue(8)]));
    g.input.push(value_info_dims("y", 1, &[DimParam("n".into()), DimValue(8), DimValue(4)]));
    g.output.push(value_info_dims("z", 1, &[DimParam("n".into()), DimValue(4), DimValue(4)]));
    g.node.push(node("MatMul", &["x", "y"], &["z"]));
    let path = dir.join("bmm.onnx");
    std::fs::write(&path, model(g).write_to_bytes().unwrap()).unwrap();
    let (ok, _, err) = egret(&["compile", path.to_str().unwrap(), "-o", dir.join("out").to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("dims n reach kernels that are only compiled for known sizes") && err.contains("--dim n=N"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every kernel of every zoo model names the node it came from (in
/// `explain`, in profiles and in a refusal's message), the ones a rule
/// built too: a residual sum fused into its layer norm had no label, so its
/// errors named "node ``".
#[test]
fn every_kernel_names_its_node() {
    for model in ["bert_tiny", "gpt2_tiny", "swin_micro", "transformer_encdec", "perceiver", "vit_tiny"] {
        let (ok, out, err) = egret(&["explain", &format!("tests/data/zoo/{model}")]);
        assert!(ok, "{model}: {err}");
        let kernels: Vec<&str> =
            out.lines().filter(|l| l.trim_start().starts_with('k') && l.contains(" flop ")).collect();
        assert!(!kernels.is_empty(), "{model}: no kernels in {out}");
        let unnamed: Vec<&&str> = kernels.iter().filter(|l| l.trim_end().ends_with('#')).collect();
        assert!(unnamed.is_empty(), "{model}: kernels without a node's name:\n{unnamed:#?}");
    }
}
