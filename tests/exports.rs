//! Exports of the families Egret targets beyond the zoo's, written by
//! PyTorch's two ONNX exporters from Hugging Face models with random
//! weights (`tests/data/exports/README.md`): each matches onnxruntime's
//! stored outputs, and at `--opt 2` each is as fused as the zoo is.

mod common;

use egret::check::Tolerance;
use egret::Backend;
use std::process::Command;

#[test]
fn every_export_passes_on_both_backends() {
    for backend in [Backend::Reference, Backend::Cpu] {
        let n = common::check_all(&common::exports_dir(), backend, Tolerance::default());
        assert_eq!(n, 17);
    }
}

/// `egret explain --json` of one export.
fn explain(name: &str) -> serde_json::Value {
    let model = common::exports_dir().join(name).join("model.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_egret")).arg("explain").arg(&model).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every softmax a fused attention, every norm one row kernel, and no
/// activation left outside a matmul's epilogue. `softmaxes` and `norms`
/// count the exported graph's (its `meta.json` lists the op counts). No
/// op runs on the reference evaluator, and the listed loop nests are the
/// only ones: BLOOM's ALiBi slopes need integer position arithmetic (a
/// cumulative sum of the mask, a few dozen i64 elements).
#[test]
fn every_attention_norm_and_activation_is_fused() {
    let none: &[&str] = &[];
    for (name, softmaxes, norms, loops) in [
        ("bert_sdpa_dynamo", 2, 5, none),
        ("gpt2_legacy_gemm", 2, 5, none),
        ("llama_gqa_dynamo", 2, 5, none),
        ("llama_mqa_sdpa_dynamo", 2, 5, none),
        ("hf_vit_sdpa_dynamo", 2, 5, none),
        ("t5_dynamo", 6, 12, none),
        ("gpt_neo_dynamo", 2, 5, none),
        ("codegen_legacy", 2, 3, none),
        ("swinv2_timm_dynamo", 4, 11, none),
        ("gemma2_dynamo", 2, 9, none),
        // The latents' layer norm is of a constant: folded at compile time.
        ("perceiver_wide_heads_dynamo", 2, 4, none),
        ("perceiver_wide_heads_legacy", 2, 4, none),
        ("bloom_legacy", 2, 6, &["loop:cumsum", "loop:sub", "loop:mul", "loop:reshape"][..]),
    ] {
        let v = explain(name);
        assert_eq!(v["fusions"]["attention"], softmaxes, "{name}: {}", v["fusions"]);
        let kernels = v["kernels"].as_array().unwrap();
        let norm_rows =
            kernels.iter().filter(|k| k["kind"] == "rows" && k["detail"].as_str().unwrap().contains("Norm")).count();
        assert_eq!(norm_rows, norms, "{name}");
        for k in kernels.iter().filter(|k| k["kind"] == "map") {
            let detail = k["detail"].as_str().unwrap();
            for activation in ["Erf", "Tanh", "Sigmoid", "Sqrt", "Gelu", "Silu"] {
                assert!(!detail.contains(activation), "{name}: {activation} left in a map: {k}");
            }
        }
        for k in kernels {
            let kind = k["kind"].as_str().unwrap();
            assert!(!kind.starts_with("reference"), "{name}: {kind} left to the reference evaluator");
            assert!(!kind.starts_with("loop") || loops.contains(&kind), "{name}: {kind} is a loop nest");
        }
    }
}

/// The legacy exporter writes GPT-2's MLP as a 2-d Gemm between reshapes:
/// the GELU still lands in the product's epilogue.
#[test]
fn gelu_after_a_reshaped_gemm_is_an_epilogue() {
    let v = explain("gpt2_legacy_gemm");
    let gelus = v["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kind"] == "matmul:packed" && k["detail"].as_str().unwrap().contains("GeluTanh("))
        .count();
    assert_eq!(gelus, 2, "{}", v["kernels"]);
}

/// LLaMA's repeat_kv (2 or 1 key/value heads for 4 query heads) is read
/// in place by the attention kernels: no kernel copies the repeated heads.
#[test]
fn grouped_query_heads_are_not_copied() {
    for name in ["llama_gqa_dynamo", "llama_mqa_sdpa_dynamo"] {
        let v = explain(name);
        let kernels = v["kernels"].as_array().unwrap();
        let copies = ["unsafe_view", "expand"];
        assert!(
            kernels.iter().all(|k| copies.iter().all(|c| !k["label"].as_str().unwrap().contains(c))),
            "{name}: {}",
            v["kernels"]
        );
        assert_eq!(kernels.iter().filter(|k| k["kind"] == "attention").count(), 2, "{name}");
    }
}
