//! Every rewrite rule keeps meaning: for each rule, a graph where it
//! applies is optimised, the rule must fire, and the optimised graph must
//! compute what the original does on random data (reference semantics).

use egret_ir::{text, DType, Graph, Op, Tensor, ValueId};
use egret_passes::egraph::{optimize, rules, Limits};
use std::collections::HashMap;

/// Evaluates a graph with the IR's reference semantics.
fn eval(g: &Graph, inputs: &[Tensor]) -> Vec<Tensor> {
    let mut values: HashMap<ValueId, Tensor> = HashMap::new();
    for (&v, t) in g.inputs().iter().zip(inputs) {
        values.insert(v, t.clone());
    }
    for n in g.topo_order().unwrap() {
        let node = g.node(n);
        if matches!(node.op, Op::Input { .. }) {
            continue;
        }
        let args: Vec<&Tensor> = node.inputs.iter().map(|v| &values[v]).collect();
        let outs = egret_ir::eval_op(&node.op, &args).unwrap();
        for (v, t) in node.outputs.iter().zip(outs) {
            values.insert(*v, t);
        }
    }
    g.outputs().iter().map(|(_, v)| values[v].clone()).collect()
}

fn random_inputs(g: &Graph, seed: u64) -> Vec<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    g.inputs()
        .iter()
        .map(|&v| {
            let ty = g.ty(v);
            let data = (0..ty.numel())
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 11) as f64 / (1u64 << 53) as f64 * 6.0 - 3.0) as f32
                })
                .collect::<Vec<f32>>();
            match ty.dtype {
                DType::F32 => Tensor::from_vec(ty.sizes(), data),
                DType::Bool => Tensor::from_vec(ty.sizes(), data.iter().map(|&x| x > 0.0).collect::<Vec<_>>()),
                d => panic!("no random data for {d}"),
            }
        })
        .collect()
}

/// `start` must make `rule` fire, and the result must agree with `start`.
fn check(rule: &str, start: &str) {
    let g = text::parse(start).unwrap_or_else(|e| panic!("{rule}: {e}"));
    let (out, report) = optimize(&g, Limits::default()).unwrap();
    assert!(report.rules.iter().any(|(r, n)| r == rule && *n > 0), "{rule} did not fire: {:?}", report.rules);
    // A fusion rule's op must be extracted; so must the op an algebra rule
    // enables in its case (else the test would compare the start with itself).
    let fused = match rule {
        "square" => Some("rms_norm"),
        "power-times-base" => Some("gelu"),
        "times-reciprocal" => Some("layer_norm"),
        "scores-biases-combine"
        | "scores-biases-combine-unscaled"
        | "scale-through-scores-bias"
        | "reshape-split-through-matmul"
        | "reshape-split-through-scores-add"
        | "reshape-merge-through-probabilities-matmul"
        | "per-head-scale-into-queries"
        | "per-head-scale-into-queries-unmasked" => Some("attention"),
        _ if ["attention", "gelu", "layer-norm", "rms-norm", "residual"].iter().any(|p| rule.starts_with(p)) => {
            Some(match rule.split('-').next().unwrap() {
                "layer" => "layer_norm",
                "rms" => "rms_norm",
                "residual" => "residual_norm",
                other => other,
            })
        }
        _ => None,
    };
    if let Some(fused) = fused {
        assert!(text::print(&out).contains(&format!("= {fused}")), "{rule}: not extracted\n{}", text::print(&out));
    }
    for seed in 1..4 {
        let x = random_inputs(&g, seed);
        for ((a, b), (name, _)) in eval(&g, &x).iter().zip(eval(&out, &x)).zip(g.outputs()) {
            let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
            for (p, q) in a.iter().zip(&b) {
                // A fully masked softmax row is NaN on both sides.
                assert!(
                    (p - q).abs() <= 1e-5 + 1e-4 * q.abs() || (p.is_nan() && q.is_nan()),
                    "{rule}: output {name} differs: {p} vs {q}\n{}",
                    text::print(&out)
                );
            }
        }
    }
}

/// One start graph per rule.
const CASES: &[(&str, &str)] = &[
    (
        "mul-commute",
        "v0: f32[4,5] = input{name=\"a\"}\nv1: f32[5] = input{name=\"b\"}\nv2: f32[4,5] = mul v0, v1\noutput \"y\" = v2\n",
    ),
    (
        "add-commute",
        "v0: f32[4,5] = input{name=\"a\"}\nv1: f32[1,5] = input{name=\"b\"}\nv2: f32[4,5] = add v0, v1\noutput \"y\" = v2\n",
    ),
    (
        "div-by-constant",
        "v0: f32[4,5] = input{name=\"a\"}\nv1: f32[] = const [1.4142135]\nv2: f32[4,5] = div v0, v1\noutput \"y\" = v2\n",
    ),
    (
        "scalar-outward",
        "v0: f32[4,5] = input{name=\"a\"}\nv1: f32[5] = input{name=\"b\"}\nv2: f32[] = const [0.5]\nv3: f32[4,5] = mul v0, v2\nv4: f32[4,5] = mul v3, v1\noutput \"y\" = v4\n",
    ),
    (
        // BERT's spelling: x * (erf(x / sqrt 2) + 1) * 0.5.
        "gelu-erf",
        "v0: f32[3,8] = input{name=\"x\"}
v1: f32[] = const [1.4142135]
v2: f32[3,8] = div v0, v1
v3: f32[3,8] = erf v2
v4: f32[] = const [1.0]
v5: f32[3,8] = add v3, v4
v6: f32[3,8] = mul v0, v5
v7: f32[] = const [0.5]
v8: f32[3,8] = mul v6, v7
output \"y\" = v8
",
    ),
    (
        // GPT-2's spelling: x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).
        "gelu-tanh",
        "v0: f32[3,8] = input{name=\"x\"}
v1: f32[] = const [0.5]
v2: f32[3,8] = mul v0, v1
v3: f32[] = const [3.0]
v4: f32[3,8] = pow v0, v3
v5: f32[] = const [0.044715]
v6: f32[3,8] = mul v4, v5
v7: f32[3,8] = add v0, v6
v8: f32[] = const [0.7978846]
v9: f32[3,8] = mul v7, v8
v10: f32[3,8] = tanh v9
v11: f32[] = const [1.0]
v12: f32[3,8] = add v10, v11
v13: f32[3,8] = mul v2, v12
output \"y\" = v13
",
    ),
    (
        "layer-norm-affine",
        "v0: f32[2,3,8] = input{name=\"x\"}
v1: f32[8] = input{name=\"g\"}
v2: f32[8] = input{name=\"b\"}
v3: f32[2,3,1] = reduce{kind=mean, axes=[2], keepdims=true} v0
v4: f32[2,3,8] = sub v0, v3
v5: f32[] = const [2.0]
v6: f32[2,3,8] = pow v4, v5
v7: f32[2,3,1] = reduce{kind=mean, axes=[2], keepdims=true} v6
v8: f32[] = const [1e-5]
v9: f32[2,3,1] = add v7, v8
v10: f32[2,3,1] = sqrt v9
v11: f32[2,3,8] = div v4, v10
v12: f32[2,3,8] = mul v11, v1
v13: f32[2,3,8] = add v12, v2
output \"y\" = v13
",
    ),
    (
        // Without scale and bias, normalising over the last two axes.
        "layer-norm",
        "v0: f32[2,3,4] = input{name=\"x\"}
v1: f32[2,1,1] = reduce{kind=mean, axes=[1, 2], keepdims=true} v0
v2: f32[2,3,4] = sub v0, v1
v3: f32[] = const [2.0]
v4: f32[2,3,4] = pow v2, v3
v5: f32[2,1,1] = reduce{kind=mean, axes=[1, 2], keepdims=true} v4
v6: f32[] = const [1e-6]
v7: f32[2,1,1] = add v5, v6
v8: f32[2,1,1] = sqrt v7
v9: f32[2,3,4] = div v2, v8
output \"y\" = v9
",
    ),
    (
        "matmul-scalar-left",
        "v0: f32[3,4] = input{name=\"a\"}\nv1: f32[4,5] = input{name=\"b\"}\nv2: f32[] = const [0.25]\nv3: f32[3,4] = mul v0, v2\nv4: f32[3,5] = matmul v3, v1\noutput \"y\" = v4\n",
    ),
    (
        "matmul-scalar-right",
        "v0: f32[3,4] = input{name=\"a\"}\nv1: f32[4,5] = input{name=\"b\"}\nv2: f32[] = const [0.25]\nv3: f32[4,5] = mul v1, v2\nv4: f32[3,5] = matmul v0, v3\noutput \"y\" = v4\n",
    ),
    (
        "transpose-scalar",
        "v0: f32[3,4] = input{name=\"a\"}\nv1: f32[] = const [0.25]\nv2: f32[3,4] = mul v0, v1\nv3: f32[4,3] = transpose{perm=[1, 0]} v2\noutput \"y\" = v3\n",
    ),
    (
        "reshape-scalar",
        "v0: f32[3,4] = input{name=\"a\"}\nv1: f32[] = const [0.25]\nv2: f32[3,4] = mul v0, v1\nv3: f32[12] = reshape{shape=[12]} v2\noutput \"y\" = v3\n",
    ),
    (
        "scalars-combine",
        "v0: f32[3,4] = input{name=\"a\"}\nv1: f32[] = const [0.5]\nv2: f32[] = const [3.0]\nv3: f32[3,4] = mul v0, v1\nv4: f32[3,4] = mul v3, v2\noutput \"y\" = v4\n",
    ),
    (
        // An RMS norm with the square as a product: it fuses only through `square`.
        "square",
        "v0: f32[3,8] = input{name=\"x\"}
v1: f32[3,8] = mul v0, v0
v2: f32[3,1] = reduce{kind=mean, axes=[1], keepdims=true} v1
v3: f32[] = const [1e-6]
v4: f32[3,1] = add v2, v3
v5: f32[3,1] = sqrt v4
v6: f32[3,8] = div v0, v5
output \"y\" = v6
",
    ),
    (
        // A tanh-GELU with the cube as x * x^2: it fuses only through `power-times-base`.
        "power-times-base",
        "v0: f32[3,8] = input{name=\"x\"}
v1: f32[] = const [2.0]
v2: f32[3,8] = pow v0, v1
v3: f32[3,8] = mul v0, v2
v4: f32[] = const [0.044715]
v5: f32[3,8] = mul v3, v4
v6: f32[3,8] = add v0, v5
v7: f32[] = const [0.7978846]
v8: f32[3,8] = mul v6, v7
v9: f32[3,8] = tanh v8
v10: f32[] = const [1.0]
v11: f32[3,8] = add v9, v10
v12: f32[3,8] = mul v0, v11
v13: f32[] = const [0.5]
v14: f32[3,8] = mul v12, v13
output \"y\" = v14
",
    ),
    (
        // A layer norm times the reciprocal of its deviation: it fuses only through `times-reciprocal`.
        "times-reciprocal",
        "v0: f32[3,8] = input{name=\"x\"}
v1: f32[3,1] = reduce{kind=mean, axes=[1], keepdims=true} v0
v2: f32[3,8] = sub v0, v1
v3: f32[] = const [2.0]
v4: f32[3,8] = pow v2, v3
v5: f32[3,1] = reduce{kind=mean, axes=[1], keepdims=true} v4
v6: f32[] = const [1e-5]
v7: f32[3,1] = add v5, v6
v8: f32[3,1] = sqrt v7
v9: f32[3,1] = reciprocal v8
v10: f32[3,8] = mul v2, v9
output \"y\" = v10
",
    ),
    (
        // ViT's spelling: q and k^T each scaled by d^-1/4, K transposed by a Transpose.
        "attention",
        "v0: f32[2,5,8] = input{name=\"q\"}
v1: f32[2,6,8] = input{name=\"k\"}
v2: f32[2,6,8] = input{name=\"v\"}
v3: f32[] = const [0.59460356]
v4: f32[2,5,8] = mul v0, v3
v5: f32[2,8,6] = transpose{perm=[0, 2, 1]} v1
v6: f32[2,8,6] = mul v5, v3
v7: f32[2,5,6] = matmul v4, v6
v8: f32[2,5,6] = softmax{axis=2} v7
v9: f32[2,5,8] = matmul v8, v2
output \"y\" = v9
",
    ),
    (
        "attention-unscaled",
        "v0: f32[2,5,8] = input{name=\"q\"}
v1: f32[2,8,6] = input{name=\"kt\"}
v2: f32[2,6,4] = input{name=\"v\"}
v3: f32[2,5,6] = matmul v0, v1
v4: f32[2,5,6] = softmax{axis=2} v3
v5: f32[2,5,4] = matmul v4, v2
output \"y\" = v5
",
    ),
    (
        // BERT's spelling: scores / sqrt(d) plus an additive mask.
        "attention-masked",
        "v0: f32[1,2,5,8] = input{name=\"q\"}
v1: f32[1,2,8,5] = input{name=\"kt\"}
v2: f32[1,2,5,8] = input{name=\"v\"}
v3: f32[1,1,1,5] = input{name=\"mask\"}
v4: f32[1,2,5,5] = matmul v0, v1
v5: f32[] = const [2.828427]
v6: f32[1,2,5,5] = div v4, v5
v7: f32[1,2,5,5] = add v6, v3
v8: f32[1,2,5,5] = softmax{axis=3} v7
v9: f32[1,2,5,8] = matmul v8, v2
output \"y\" = v9
",
    ),
    (
        "attention-masked-unscaled",
        "v0: f32[2,5,8] = input{name=\"q\"}
v1: f32[2,8,5] = input{name=\"kt\"}
v2: f32[2,5,8] = input{name=\"v\"}
v3: f32[5,5] = input{name=\"mask\"}
v4: f32[2,5,5] = matmul v0, v1
v5: f32[2,5,5] = add v4, v3
v6: f32[2,5,5] = softmax{axis=2} v5
v7: f32[2,5,8] = matmul v6, v2
output \"y\" = v7
",
    ),
    (
        // GPT-2's spelling: scaled q and k, an additive causal mask, and the
        // NaN guard on the probabilities.
        "attention-guarded-masked",
        "v0: f32[1,2,4,8] = input{name=\"q\"}
v1: f32[1,2,8,4] = input{name=\"kt\"}
v2: f32[1,2,4,8] = input{name=\"v\"}
v3: f32[4,4] = const [0.0, -inf, -inf, -inf, 0.0, 0.0, -inf, -inf, 0.0, 0.0, 0.0, -inf, 0.0, 0.0, 0.0, 0.0]
v4: f32[] = const [0.59460356]
v5: f32[1,2,4,8] = mul v0, v4
v6: f32[1,2,8,4] = mul v1, v4
v7: f32[1,2,4,4] = matmul v5, v6
v8: f32[1,2,4,4] = add v7, v3
v9: f32[1,2,4,4] = softmax{axis=3} v8
v10: bool[1,2,4,4] = is_nan v9
v11: f32[] = const [0.0]
v12: f32[1,2,4,4] = where v10, v11, v9
v13: f32[1,2,4,8] = matmul v12, v2
output \"y\" = v13
",
    ),
    (
        "attention-guarded",
        "v0: f32[2,5,8] = input{name=\"q\"}
v1: f32[2,8,5] = input{name=\"kt\"}
v2: f32[2,5,8] = input{name=\"v\"}
v3: f32[] = const [0.35355338]
v4: f32[2,5,5] = matmul v0, v1
v5: f32[2,5,5] = mul v4, v3
v6: f32[2,5,5] = softmax{axis=2} v5
v7: bool[2,5,5] = is_nan v6
v8: f32[] = const [0.0]
v9: f32[2,5,5] = where v7, v8, v6
v10: f32[2,5,8] = matmul v9, v2
output \"y\" = v10
",
    ),
    (
        "attention-guarded-unscaled",
        "v0: f32[2,5,8] = input{name=\"q\"}
v1: f32[2,8,5] = input{name=\"kt\"}
v2: f32[2,5,8] = input{name=\"v\"}
v4: f32[2,5,5] = matmul v0, v1
v6: f32[2,5,5] = softmax{axis=2} v4
v7: bool[2,5,5] = is_nan v6
v8: f32[] = const [0.0]
v9: f32[2,5,5] = where v7, v8, v6
v10: f32[2,5,8] = matmul v9, v2
output \"y\" = v10
",
    ),
    (
        // A fully masked row: the guard turns its NaNs into zeros.
        "attention-guarded-masked-unscaled",
        "v0: f32[2,3,8] = input{name=\"q\"}
v1: f32[2,8,3] = input{name=\"kt\"}
v2: f32[2,3,8] = input{name=\"v\"}
v3: f32[3,3] = const [0.0, 0.0, 0.0, -inf, -inf, -inf, 0.0, -inf, 0.0]
v4: f32[2,3,3] = matmul v0, v1
v5: f32[2,3,3] = add v4, v3
v6: f32[2,3,3] = softmax{axis=2} v5
v7: bool[2,3,3] = is_nan v6
v8: f32[] = const [0.0]
v9: f32[2,3,3] = where v7, v8, v6
v10: f32[2,3,8] = matmul v9, v2
output \"y\" = v10
",
    ),
    (
        "one-over",
        "v0: f32[3,4] = input{name=\"a\"}\nv1: f32[] = const [1.0]\nv2: f32[3,4] = div v1, v0\noutput \"y\" = v2\n",
    ),
    (
        // LLaMA's spelling: x * rsqrt(mean(x^2) + eps) * weight, rsqrt as 1 / sqrt.
        "rms-norm-scaled",
        "v0: f32[2,3,8] = input{name=\"x\"}
v1: f32[8] = input{name=\"w\"}
v2: f32[] = const [2.0]
v3: f32[2,3,8] = pow v0, v2
v4: f32[2,3,1] = reduce{kind=mean, axes=[2], keepdims=true} v3
v5: f32[] = const [1e-6]
v6: f32[2,3,1] = add v4, v5
v7: f32[2,3,1] = sqrt v6
v8: f32[] = const [1.0]
v9: f32[2,3,1] = div v8, v7
v10: f32[2,3,8] = mul v0, v9
v11: f32[2,3,8] = mul v10, v1
output \"y\" = v11
",
    ),
    (
        "rms-norm",
        "v0: f32[2,3,8] = input{name=\"x\"}
v2: f32[] = const [2.0]
v3: f32[2,3,8] = pow v0, v2
v4: f32[2,3,1] = reduce{kind=mean, axes=[2], keepdims=true} v3
v5: f32[] = const [1e-6]
v6: f32[2,3,1] = add v4, v5
v7: f32[2,3,1] = sqrt v6
v9: f32[2,3,1] = reciprocal v7
v10: f32[2,3,8] = mul v0, v9
output \"y\" = v10
",
    ),
    (
        "rms-norm-div",
        "v0: f32[2,3,8] = input{name=\"x\"}
v2: f32[] = const [2.0]
v3: f32[2,3,8] = pow v0, v2
v4: f32[2,3,1] = reduce{kind=mean, axes=[2], keepdims=true} v3
v5: f32[] = const [1e-5]
v6: f32[2,3,1] = add v4, v5
v7: f32[2,3,1] = sqrt v6
v10: f32[2,3,8] = div v0, v7
output \"y\" = v10
",
    ),
    (
        // SwiGLU: silu(gate) * up.
        "silu",
        "v0: f32[3,8] = input{name=\"gate\"}\nv1: f32[3,8] = input{name=\"up\"}\nv2: f32[3,8] = sigmoid v0\nv3: f32[3,8] = mul v0, v2\nv4: f32[3,8] = mul v3, v1\noutput \"y\" = v4\n",
    ),
    (
        "softmax",
        "v0: f32[3,7] = input{name=\"x\"}
v1: f32[3,1] = reduce{kind=max, axes=[1], keepdims=true} v0
v2: f32[3,7] = sub v0, v1
v3: f32[3,7] = exp v2
v4: f32[3,1] = reduce{kind=sum, axes=[1], keepdims=true} v3
v5: f32[3,7] = div v3, v4
output \"y\" = v5
",
    ),
    (
        // Over a middle axis, without the max shift.
        "softmax-unshifted",
        "v0: f32[2,5,3] = input{name=\"x\"}
v1: f32[2,5,3] = exp v0
v2: f32[2,1,3] = reduce{kind=sum, axes=[1], keepdims=true} v1
v3: f32[2,5,3] = div v1, v2
output \"y\" = v3
",
    ),
    (
        "add-constants",
        "v0: f32[2,3,4] = input{name=\"x\"}
v1: f32[3,4] = const [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
v2: f32[2,1,1] = const [-1.0, 1.0]
v3: f32[2,3,4] = add v0, v1
v4: f32[2,3,4] = add v3, v2
output \"y\" = v4
",
    ),
    (
        // Swin's shifted windows: the mask is added with the windows split out.
        "add-through-reshape",
        "v0: f32[4,2,3,3] = input{name=\"scores\"}
v1: f32[2,2,2,3,3] = reshape{shape=[2, 2, 2, 3, 3]} v0
v2: f32[1,2,1,3,3] = input{name=\"mask\"}
v3: f32[2,2,2,3,3] = add v1, v2
v4: f32[4,2,3,3] = reshape{shape=[4, 2, 3, 3]} v3
output \"y\" = v4
",
    ),
    (
        // Attention with a boolean mask that keeps the scores where true
        // (finfo.min elsewhere): it fuses, so the rewritten mask is what runs.
        "where-to-additive-mask",
        "v0: f32[2,4,8] = input{name=\"q\"}
v1: f32[2,8,5] = input{name=\"kt\"}
v2: f32[2,5,8] = input{name=\"v\"}
v3: bool[2,1,5] = input{name=\"keep\"}
v4: f32[2,4,5] = matmul v0, v1
v5: f32[] = const [-3.4028235e38]
v6: f32[2,4,5] = where v3, v4, v5
v7: f32[2,4,5] = softmax{axis=2} v6
v8: f32[2,4,8] = matmul v7, v2
output \"y\" = v8
",
    ),
    (
        // The same with the mask inverted (true = masked out) and -inf.
        "where-to-additive-mask-inverted",
        "v0: f32[2,4,8] = input{name=\"q\"}
v1: f32[2,8,5] = input{name=\"kt\"}
v2: f32[2,5,8] = input{name=\"v\"}
v3: bool[4,5] = input{name=\"masked\"}
v4: f32[2,4,5] = matmul v0, v1
v5: f32[] = const [-inf]
v6: f32[2,4,5] = where v3, v5, v4
v7: f32[2,4,5] = softmax{axis=2} v6
v8: f32[2,4,8] = matmul v7, v2
output \"y\" = v8
",
    ),
    (
        // GPT-Neo: unscaled scores, a causal mask as where, then a padding mask added.
        "scores-biases-combine-unscaled",
        "v0: f32[2,4,8] = input{name=\"q\"}
v1: f32[2,8,5] = input{name=\"kt\"}
v2: f32[2,5,8] = input{name=\"v\"}
v3: bool[4,5] = input{name=\"keep\"}
v4: f32[2,1,5] = input{name=\"padding\"}
v5: f32[2,4,5] = matmul v0, v1
v6: f32[] = const [-3.4028235e38]
v7: f32[2,4,5] = where v3, v5, v6
v8: f32[2,4,5] = add v7, v4
v9: f32[2,4,5] = softmax{axis=2} v8
v10: f32[2,4,8] = matmul v9, v2
output \"y\" = v10
",
    ),
    (
        // MPNet: a relative position bias added to the scaled scores, then a mask.
        "scores-biases-combine",
        "v0: f32[2,4,8] = input{name=\"q\"}
v1: f32[2,8,5] = input{name=\"kt\"}
v2: f32[2,5,8] = input{name=\"v\"}
v3: f32[4,5] = input{name=\"position_bias\"}
v4: f32[2,1,5] = input{name=\"mask\"}
v5: f32[2,4,5] = matmul v0, v1
v6: f32[] = const [0.35355338]
v7: f32[2,4,5] = mul v5, v6
v8: f32[2,4,5] = add v3, v7
v9: f32[2,4,5] = add v8, v4
v10: f32[2,4,5] = softmax{axis=2} v9
v11: f32[2,4,8] = matmul v10, v2
output \"y\" = v11
",
    ),
    (
        // CodeGen: the mask is added before the scores are divided by sqrt(d).
        "scale-through-scores-bias",
        "v0: f32[2,4,8] = input{name=\"q\"}
v1: f32[2,8,5] = input{name=\"kt\"}
v2: f32[2,5,8] = input{name=\"v\"}
v3: f32[2,1,5] = input{name=\"mask\"}
v4: f32[2,4,5] = matmul v0, v1
v5: f32[2,4,5] = add v3, v4
v6: f32[] = const [2.828427]
v7: f32[2,4,5] = div v5, v6
v8: f32[2,4,5] = softmax{axis=2} v7
v9: f32[2,4,8] = matmul v8, v2
output \"y\" = v9
",
    ),
    (
        // Scores computed in a batch of B * H matrices, split into [B, H]
        // for the mask and the softmax; the probabilities meet v as [B, H].
        "reshape-split-through-matmul",
        "v0: f32[6,5,8] = input{name=\"q\"}
v1: f32[6,8,6] = input{name=\"kt\"}
v2: f32[2,3,6,8] = input{name=\"v\"}
v3: f32[2,1,5,6] = input{name=\"mask\"}
v4: f32[6,5,6] = matmul v0, v1
v5: f32[] = const [0.35355338]
v6: f32[6,5,6] = mul v4, v5
v7: f32[2,3,5,6] = reshape{shape=[2, 3, 5, 6]} v6
v8: f32[2,3,5,6] = add v7, v3
v9: f32[2,3,5,6] = softmax{axis=3} v8
v10: f32[2,3,5,8] = matmul v9, v2
output \"y\" = v10
",
    ),
    (
        // BLOOM: ALiBi's per-head bias added in the B * H batch (baddbmm),
        // then the split, a padding mask, the softmax.
        "reshape-split-through-scores-add",
        "v0: f32[6,5,8] = input{name=\"q\"}
v1: f32[6,8,6] = input{name=\"kt\"}
v2: f32[2,3,6,8] = input{name=\"v\"}
v3: f32[6,1,6] = input{name=\"alibi\"}
v4: f32[2,1,5,6] = input{name=\"mask\"}
v5: f32[6,5,6] = matmul v0, v1
v6: f32[] = const [0.35355338]
v7: f32[6,5,6] = mul v6, v5
v8: f32[6,5,6] = add v3, v7
v9: f32[2,3,5,6] = reshape{shape=[2, 3, 5, 6]} v8
v10: f32[2,3,5,6] = add v9, v4
v11: f32[2,3,5,6] = softmax{axis=3} v10
v12: f32[2,3,5,8] = matmul v11, v2
output \"y\" = v12
",
    ),
    (
        // The legacy exporter's BLOOM: the probabilities merged back into a
        // batch of B * H before they meet v.
        "reshape-merge-through-probabilities-matmul",
        "v0: f32[2,3,5,8] = input{name=\"q\"}
v1: f32[2,3,8,6] = input{name=\"kt\"}
v2: f32[6,6,8] = input{name=\"v\"}
v3: f32[2,3,5,6] = matmul v0, v1
v4: f32[2,3,5,6] = softmax{axis=3} v3
v5: f32[6,5,6] = reshape{shape=[6, 5, 6]} v4
v6: f32[6,5,8] = matmul v5, v2
output \"y\" = v6
",
    ),
    (
        // BLOOM's spelling: x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x))).
        "gelu-tanh-factored",
        "v0: f32[3,8] = input{name=\"x\"}
v1: f32[] = const [0.5]
v2: f32[] = const [0.7978846]
v3: f32[] = const [0.044715]
v4: f32[] = const [1.0]
v5: f32[3,8] = mul v0, v1
v6: f32[3,8] = mul v0, v2
v7: f32[3,8] = mul v0, v3
v8: f32[3,8] = mul v7, v0
v9: f32[3,8] = add v8, v4
v10: f32[3,8] = mul v6, v9
v11: f32[3,8] = tanh v10
v12: f32[3,8] = add v11, v4
v13: f32[3,8] = mul v5, v12
output \"y\" = v13
",
    ),
    (
        // Swin V2's cosine attention: one learned scale per head, a
        // position bias, then a shifted-window mask.
        "per-head-scale-into-queries",
        "v0: f32[2,2,4,8] = input{name=\"q\"}
v1: f32[2,2,8,4] = input{name=\"kt\"}
v2: f32[2,2,4,8] = input{name=\"v\"}
v3: f32[1,2,4,4] = input{name=\"bias\"}
v4: f32[2,1,4,4] = input{name=\"mask\"}
v5: f32[2,1,1] = const [3.0, 7.5]
v6: f32[2,2,4,4] = matmul v0, v1
v7: f32[2,2,4,4] = mul v5, v6
v8: f32[2,2,4,4] = add v7, v3
v9: f32[2,2,4,4] = add v8, v4
v10: f32[2,2,4,4] = softmax{axis=3} v9
v11: f32[2,2,4,8] = matmul v10, v2
output \"y\" = v11
",
    ),
    (
        "per-head-scale-into-queries-unmasked",
        "v0: f32[2,2,4,8] = input{name=\"q\"}
v1: f32[2,2,8,4] = input{name=\"kt\"}
v2: f32[2,2,4,8] = input{name=\"v\"}
v3: f32[2,1,1] = input{name=\"scale\"}
v4: f32[2,2,4,4] = matmul v0, v1
v5: f32[2,2,4,4] = mul v4, v3
v6: f32[2,2,4,4] = softmax{axis=3} v5
v7: f32[2,2,4,8] = matmul v6, v2
output \"y\" = v7
",
    ),
    (
        // Gemma 2: tanh(scores * scale / cap) * cap, then the mask.
        "attention-softcapped-masked",
        "v0: f32[2,2,4,8] = input{name=\"q\"}
v1: f32[2,2,8,5] = input{name=\"kt\"}
v2: f32[2,2,5,8] = input{name=\"v\"}
v3: f32[2,1,4,5] = input{name=\"mask\"}
v4: f32[2,2,4,5] = matmul v0, v1
v5: f32[] = const [0.35355338]
v6: f32[2,2,4,5] = mul v4, v5
v7: f32[] = const [1.5]
v8: f32[2,2,4,5] = div v6, v7
v9: f32[2,2,4,5] = tanh v8
v10: f32[2,2,4,5] = mul v9, v7
v11: f32[2,2,4,5] = add v10, v3
v12: f32[2,2,4,5] = softmax{axis=3} v11
v13: f32[2,2,4,8] = matmul v12, v2
output \"y\" = v13
",
    ),
    (
        "attention-softcapped",
        "v0: f32[2,2,4,8] = input{name=\"q\"}
v1: f32[2,2,8,5] = input{name=\"kt\"}
v2: f32[2,2,5,8] = input{name=\"v\"}
v3: f32[] = const [0.25]
v4: f32[] = const [2.0]
v5: f32[2,2,4,5] = matmul v0, v1
v6: f32[2,2,4,5] = mul v5, v3
v7: f32[2,2,4,5] = tanh v6
v8: f32[2,2,4,5] = mul v4, v7
v9: f32[2,2,4,5] = softmax{axis=3} v8
v10: f32[2,2,4,8] = matmul v9, v2
output \"y\" = v10
",
    ),
    (
        // A product with a constant weight.
        "tile-packed",
        "v0: f32[3,4] = input{name=\"x\"}
v1: f32[4,2] = const [0.5, -1.0, 2.0, 0.25, -0.5, 1.5, 1.0, -2.0]
v2: f32[3,2] = matmul v0, v1
output \"y\" = v2
",
    ),
    (
        // A residual stream: the sum feeds the norm and is an output itself
        // (the next block's residual); a decomposed affine layer norm.
        "residual-layer-norm-affine",
        "v0: f32[2,3,8] = input{name=\"x\"}
v1: f32[2,3,8] = input{name=\"residual\"}
v2: f32[8] = input{name=\"g\"}
v3: f32[8] = input{name=\"b\"}
v20: f32[2,3,8] = add v0, v1
v4: f32[2,3,1] = reduce{kind=mean, axes=[2], keepdims=true} v20
v5: f32[2,3,8] = sub v20, v4
v6: f32[] = const [2.0]
v7: f32[2,3,8] = pow v5, v6
v8: f32[2,3,1] = reduce{kind=mean, axes=[2], keepdims=true} v7
v9: f32[] = const [1e-5]
v10: f32[2,3,1] = add v8, v9
v11: f32[2,3,1] = sqrt v10
v12: f32[2,3,8] = div v5, v11
v13: f32[2,3,8] = mul v12, v2
v14: f32[2,3,8] = add v13, v3
output \"y\" = v14
output \"stream\" = v20
",
    ),
    (
        // ONNX LayerNormalization with a scale and no bias.
        "residual-layer-norm",
        "v0: f32[4,6] = input{name=\"x\"}
v1: f32[4,6] = input{name=\"residual\"}
v2: f32[6] = input{name=\"g\"}
v3: f32[4,6] = add v0, v1
v4: f32[4,6], v5: f32[4,1], v6: f32[4,1] = layer_norm{axis=1, epsilon=1e-5} v3, v2
output \"y\" = v4
output \"stream\" = v3
",
    ),
    (
        "residual-rms-norm",
        "v0: f32[4,6] = input{name=\"x\"}
v1: f32[4,6] = input{name=\"residual\"}
v2: f32[6] = input{name=\"w\"}
v3: f32[4,6] = add v0, v1
v4: f32[4,6] = rms_norm{axis=1, epsilon=1e-6} v3, v2
output \"y\" = v4
output \"stream\" = v3
",
    ),
    (
        "tile-attention",
        "v0: f32[2,70,8] = input{name=\"q\"}
v1: f32[2,8,30] = input{name=\"kt\"}
v2: f32[2,30,8] = input{name=\"v\"}
v3: f32[2,70,8] = attention{scale=0.35355338, nan_to_zero=false} v0, v1, v2
output \"y\" = v3
",
    ),
    (
        "tile-attention-masked",
        "v0: f32[2,70,8] = input{name=\"q\"}
v1: f32[2,8,30] = input{name=\"kt\"}
v2: f32[2,30,8] = input{name=\"v\"}
v3: f32[70,30] = input{name=\"mask\"}
v4: f32[2,70,8] = attention{scale=0.35355338, nan_to_zero=true} v0, v1, v2, v3
output \"y\" = v4
",
    ),
    ("tile-library", LARGE_PRODUCT),
    ("tile-generated", SMALL_PRODUCT),
];

/// Big enough that the library's per-call cost is worth paying.
const LARGE_PRODUCT: &str = "v0: f32[2,64,96] = input{name=\"a\"}
v1: f32[2,96,80] = input{name=\"b\"}
v2: f32[2,64,80] = matmul v0, v1
output \"y\" = v2
";

/// Small enough that it is not.
const SMALL_PRODUCT: &str = "v0: f32[4,8] = input{name=\"a\"}
v1: f32[8,4] = input{name=\"b\"}
v2: f32[4,4] = matmul v0, v1
output \"y\" = v2
";

/// The cost model takes the biggest attention tiles that fit (fewer tiles,
/// less repacking; calibrated on deit_tiny), and splits long query and key
/// ranges into equal blocks (197 queries as 99 + 98, so that threads get
/// tiles of one size).
#[test]
fn the_cost_model_picks_attention_tiles() {
    for (sq, sk, want) in [
        (70, 30, "block=70, key_block=30"),
        (256, 1000, "block=128, key_block=500"),
        (197, 197, "block=99, key_block=197"),
    ] {
        let start = format!(
            "v0: f32[2,{sq},8] = input{{name=\"q\"}}
v1: f32[2,8,{sk}] = input{{name=\"kt\"}}
v2: f32[2,{sk},8] = input{{name=\"v\"}}
v3: f32[2,{sq},8] = attention{{scale=0.35355338, nan_to_zero=false}} v0, v1, v2
output \"y\" = v3
"
        );
        let (out, _) = optimize(&text::parse(&start).unwrap(), Limits::default()).unwrap();
        let printed = text::print(&out);
        assert!(printed.contains(want), "want {want}:\n{printed}");
    }
}

/// With a constant causal mask the cost model counts only the scores each
/// query block's live keys give (the lowest f32 above the diagonal, as
/// exporters write it): smaller query blocks skip more of them, and win.
/// The same mask with one fully masked row cannot skip anything.
#[test]
fn the_cost_model_counts_the_keys_a_constant_mask_leaves() {
    let s = 128;
    for (dead_row, want) in [(None, "block=32, key_block=128"), (Some(5), "block=128, key_block=128")] {
        let mask: Vec<String> = (0..s * s)
            .map(|i| {
                let (row, key) = (i / s, i % s);
                if key > row || Some(row) == dead_row {
                    "-3.4028235e38".into()
                } else {
                    "0.0".into()
                }
            })
            .collect();
        let start = format!(
            "v0: f32[2,{s},8] = input{{name=\"q\"}}
v1: f32[2,8,{s}] = input{{name=\"kt\"}}
v2: f32[2,{s},8] = input{{name=\"v\"}}
v3: f32[{s},{s}] = const [{}]
v4: f32[2,{s},8] = attention{{scale=0.35355338, nan_to_zero=true}} v0, v1, v2, v3
output \"y\" = v4
",
            mask.join(", ")
        );
        let (out, _) = optimize(&text::parse(&start).unwrap(), Limits::default()).unwrap();
        let printed = text::print_with(&out, text::Constants::ElideOver(16));
        assert!(printed.contains(want), "want {want}:\n{printed}");
    }
}

/// The cost model picks the packed tile for a constant weight, the library
/// for a large product of two activations, generated code for a small one.
#[test]
fn the_cost_model_picks_a_tiling_per_product() {
    let packed = CASES.iter().find(|(r, _)| *r == "tile-packed").unwrap().1;
    for (start, want) in [(packed, "packed"), (LARGE_PRODUCT, "tiling=library"), (SMALL_PRODUCT, "generated_4x8")] {
        let (out, _) = optimize(&text::parse(start).unwrap(), Limits::default()).unwrap();
        let printed = text::print(&out);
        assert!(printed.contains(want), "want {want}:\n{printed}");
    }
}

#[test]
fn every_rule_keeps_meaning() {
    for (rule, start) in CASES {
        check(rule, start);
    }
}

#[test]
fn every_rule_has_a_case() {
    let names: Vec<String> = rules::all().iter().map(|r| r.name.to_string()).collect();
    for n in &names {
        assert!(CASES.iter().any(|(r, _)| r == n), "rule `{n}` has no test case in CASES");
    }
}

/// Boolean (`Where`) masks reach the masked attention rules, in either
/// polarity, so what the tests above evaluate is the rewritten mask.
#[test]
fn where_masked_attention_fuses() {
    for rule in ["where-to-additive-mask", "where-to-additive-mask-inverted"] {
        let start = CASES.iter().find(|(r, _)| *r == rule).unwrap().1;
        let (out, _) = optimize(&text::parse(start).unwrap(), Limits::default()).unwrap();
        let printed = text::print(&out);
        assert!(printed.contains("= attention") && !printed.contains("softmax"), "{rule}:\n{printed}");
    }
}

/// The attention variants transformer families write, each fused into one
/// attention op that computes what the start graph does: grouped-query
/// heads (LLaMA's repeat_kv: K and V expanded from 2 heads to 4), a causal
/// mask made with Trilu and Where, a T5-style relative position bias added
/// to unscaled scores, and cross-attention (3 queries against 7 keys).
#[test]
fn attention_variants_fuse() {
    let cases = [
        (
            "grouped-query heads",
            "v0: f32[1,4,5,8] = input{name=\"q\"}
v1: f32[1,2,5,8] = input{name=\"k\"}
v2: f32[1,2,5,8] = input{name=\"v\"}
v3: f32[1,2,1,5,8] = reshape{shape=[1, 2, 1, 5, 8]} v1
v4: f32[1,2,2,5,8] = expand{shape=[1, 2, 2, 5, 8]} v3
v5: f32[1,4,5,8] = reshape{shape=[1, 4, 5, 8]} v4
v6: f32[1,2,1,5,8] = reshape{shape=[1, 2, 1, 5, 8]} v2
v7: f32[1,2,2,5,8] = expand{shape=[1, 2, 2, 5, 8]} v6
v8: f32[1,4,5,8] = reshape{shape=[1, 4, 5, 8]} v7
v9: f32[1,4,8,5] = transpose{perm=[0, 1, 3, 2]} v5
v10: f32[1,4,5,5] = matmul v0, v9
v11: f32[] = const [0.35355338]
v12: f32[1,4,5,5] = mul v10, v11
v13: f32[1,4,5,5] = softmax{axis=3} v12
v14: f32[1,4,5,8] = matmul v13, v8
output \"y\" = v14
",
        ),
        (
            "causal mask from trilu",
            "v0: f32[2,6,8] = input{name=\"q\"}
v1: f32[2,8,6] = input{name=\"kt\"}
v2: f32[2,6,8] = input{name=\"v\"}
v3: f32[6,6] = const [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
v4: f32[6,6] = trilu{upper=false, k=0} v3
v5: f32[] = const [0.0]
v6: bool[6,6] = equal v4, v5
v7: f32[2,6,6] = matmul v0, v1
v8: f32[] = const [-inf]
v9: f32[2,6,6] = where v6, v8, v7
v10: f32[2,6,6] = softmax{axis=2} v9
v11: f32[2,6,8] = matmul v10, v2
output \"y\" = v11
",
        ),
        (
            "relative position bias",
            "v0: f32[1,3,5,8] = input{name=\"q\"}
v1: f32[1,3,8,5] = input{name=\"kt\"}
v2: f32[1,3,5,8] = input{name=\"v\"}
v3: f32[1,3,5,5] = input{name=\"position_bias\"}
v4: f32[1,3,5,5] = matmul v0, v1
v5: f32[1,3,5,5] = add v4, v3
v6: f32[1,3,5,5] = softmax{axis=3} v5
v7: f32[1,3,5,8] = matmul v6, v2
output \"y\" = v7
",
        ),
        (
            "cross-attention",
            "v0: f32[2,3,8] = input{name=\"q\"}
v1: f32[2,8,7] = input{name=\"kt\"}
v2: f32[2,7,4] = input{name=\"v\"}
v3: f32[2,3,7] = matmul v0, v1
v4: f32[] = const [2.828427]
v5: f32[2,3,7] = div v3, v4
v6: f32[2,3,7] = softmax{axis=2} v5
v7: f32[2,3,4] = matmul v6, v2
output \"y\" = v7
",
        ),
    ];
    for (what, start) in cases {
        let g = text::parse(start).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (out, _) = optimize(&g, Limits::default()).unwrap();
        let printed = text::print(&out);
        assert!(printed.contains("= attention") && !printed.contains("softmax"), "{what}:\n{printed}");
        assert_same_values(what, &g, &out);
    }
}

/// `out` computes what `g` does on three sets of random inputs.
fn assert_same_values(what: &str, g: &Graph, out: &Graph) {
    for seed in 1..4 {
        let x = random_inputs(g, seed);
        for (a, b) in eval(g, &x).iter().zip(eval(out, &x)) {
            for (p, q) in a.to_f64_vec().iter().zip(b.to_f64_vec()) {
                assert!((p - q).abs() <= 1e-5 + 1e-4 * q.abs(), "{what}: {p} vs {q}\n{}", text::print(out));
            }
        }
    }
}

/// A residual add and the norm after it become one op computing both the
/// norm and the sum (the stream reads the sum from it: no add is left),
/// and an affine norm fuses once, not again through the unscaled norm
/// inside it.
#[test]
fn residual_adds_fuse_into_the_norm_once() {
    for rule in ["residual-layer-norm-affine", "residual-layer-norm", "residual-rms-norm"] {
        let start = CASES.iter().find(|(r, _)| *r == rule).unwrap().1;
        let (out, _) = optimize(&text::parse(start).unwrap(), Limits::default()).unwrap();
        let printed = text::print(&out);
        assert_eq!(printed.matches("= residual_norm").count(), 1, "{rule}:\n{printed}");
        assert!(!printed.contains("= add"), "{rule}:\n{printed}");
    }
}

/// An e-graph with more classes than `Limits::dag_classes` (a runaway
/// saturation) is extracted with tree costs: still fused, still the same
/// values. Under the limit, extraction is DAG-aware.
#[test]
fn extraction_falls_back_to_tree_costs_above_its_class_limit() {
    for rule in ["residual-layer-norm-affine", "attention-masked", "scores-biases-combine"] {
        let g = text::parse(CASES.iter().find(|(r, _)| *r == rule).unwrap().1).unwrap();
        let (_, report) = optimize(&g, Limits::default()).unwrap();
        assert!(report.dag_extraction, "{rule}");
        let (out, report) = optimize(&g, Limits { dag_classes: 0, ..Limits::default() }).unwrap();
        assert!(!report.dag_extraction, "{rule}");
        assert!(!report.fusions.is_empty(), "{rule}:\n{}", text::print(&out));
        assert_same_values(rule, &g, &out);
    }
}

/// Reshapes around attention that do not split (or merge) the leading
/// batch dim alone are not moved through the products: the rules leave
/// the graphs unfused, and their values as they were.
#[test]
fn reshapes_that_regroup_more_than_the_batch_are_left_alone() {
    for (what, start) in [
        (
            "probabilities regrouped as [2, 10, 6]",
            "v0: f32[2,2,5,8] = input{name=\"q\"}
v1: f32[2,2,8,6] = input{name=\"kt\"}
v2: f32[2,6,8] = input{name=\"v\"}
v3: f32[2,2,5,6] = matmul v0, v1
v4: f32[2,2,5,6] = softmax{axis=3} v3
v5: f32[2,10,6] = reshape{shape=[2, 10, 6]} v4
v6: f32[2,10,8] = matmul v5, v2
output \"y\" = v6
",
        ),
        (
            "scores regrouped as [2, 3, 10, 3]",
            "v0: f32[6,5,8] = input{name=\"q\"}
v1: f32[6,8,6] = input{name=\"kt\"}
v2: f32[2,3,3,8] = input{name=\"v\"}
v3: f32[6,5,6] = matmul v0, v1
v4: f32[2,3,10,3] = reshape{shape=[2, 3, 10, 3]} v3
v5: f32[2,3,10,3] = softmax{axis=3} v4
v6: f32[2,3,10,8] = matmul v5, v2
output \"y\" = v6
",
        ),
    ] {
        let g = text::parse(start).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (out, report) = optimize(&g, Limits::default()).unwrap();
        assert!(!text::print(&out).contains("= attention"), "{what}:\n{}", text::print(&out));
        assert!(
            !report.rules.iter().any(|(r, _)| r.starts_with("reshape-split") || r.starts_with("reshape-merge")),
            "{what}: {:?}",
            report.rules
        );
        assert_same_values(what, &g, &out);
    }
}

/// A layer norm whose mean is not over the trailing axes is not a layer
/// norm: the rule must leave it alone.
#[test]
fn a_mean_over_a_leading_axis_is_not_a_layer_norm() {
    let start = "v0: f32[4,3] = input{name=\"x\"}
v1: f32[1,3] = reduce{kind=mean, axes=[0], keepdims=true} v0
v2: f32[4,3] = sub v0, v1
v3: f32[] = const [2.0]
v4: f32[4,3] = pow v2, v3
v5: f32[1,3] = reduce{kind=mean, axes=[0], keepdims=true} v4
v6: f32[] = const [1e-5]
v7: f32[1,3] = add v5, v6
v8: f32[1,3] = sqrt v7
v9: f32[4,3] = div v2, v8
output \"y\" = v9
";
    let g = text::parse(start).unwrap();
    let (out, _) = optimize(&g, Limits::default()).unwrap();
    assert!(!text::print(&out).contains("layer_norm"), "{}", text::print(&out));
}

/// Other exporters' spellings of GELU and the norms reach the same fused
/// ops: the algebra rules, not one matcher per spelling, bring them to the
/// fusion rules' form.
#[test]
fn exporter_spellings_fuse() {
    let x = "v0: f32[3,8] = input{name=\"x\"}\n";
    let cases = [
        (
            // torch.onnx (TorchScript) for F.gelu(approximate="tanh"):
            // 0.5 * (x * (1 + tanh(b * (x + k * (x * (x * x)))))).
            "gelu tanh, legacy exporter",
            "gelu",
            "v1: f32[3,8] = mul v0, v0
v2: f32[3,8] = mul v0, v1
v3: f32[] = const [0.044715]
v4: f32[3,8] = mul v3, v2
v5: f32[3,8] = add v0, v4
v6: f32[] = const [0.7978846]
v7: f32[3,8] = mul v6, v5
v8: f32[3,8] = tanh v7
v9: f32[] = const [1.0]
v10: f32[3,8] = add v9, v8
v11: f32[3,8] = mul v0, v10
v12: f32[] = const [0.5]
v13: f32[3,8] = mul v12, v11
output \"y\" = v13
",
        ),
        (
            // onnxscript's aten::gelu (tanh): 0.5 * (x * (tanh(...) + 1)), Pow for the cube.
            "gelu tanh, dynamo exporter",
            "gelu",
            "v1: f32[] = const [3.0]
v2: f32[3,8] = pow v0, v1
v3: f32[] = const [0.044715]
v4: f32[3,8] = mul v3, v2
v5: f32[3,8] = add v0, v4
v6: f32[] = const [0.7978846]
v7: f32[3,8] = mul v6, v5
v8: f32[3,8] = tanh v7
v9: f32[] = const [1.0]
v10: f32[3,8] = add v8, v9
v11: f32[3,8] = mul v0, v10
v12: f32[] = const [0.5]
v13: f32[3,8] = mul v12, v11
output \"y\" = v13
",
        ),
        (
            // 0.5 * x * (1 + erf(x * 1/sqrt(2))).
            "gelu erf, scale first",
            "gelu",
            "v1: f32[] = const [0.5]
v2: f32[3,8] = mul v1, v0
v3: f32[] = const [0.70710677]
v4: f32[3,8] = mul v0, v3
v5: f32[3,8] = erf v4
v6: f32[] = const [1.0]
v7: f32[3,8] = add v6, v5
v8: f32[3,8] = mul v2, v7
output \"y\" = v8
",
        ),
        (
            // x * rsqrt(mean(x * x) + eps), the square as a product.
            "rms norm, square as a product",
            "rms_norm",
            "v1: f32[3,8] = mul v0, v0
v2: f32[3,1] = reduce{kind=mean, axes=[1], keepdims=true} v1
v3: f32[] = const [1e-6]
v4: f32[3,1] = add v2, v3
v5: f32[3,1] = sqrt v4
v6: f32[] = const [1.0]
v7: f32[3,1] = div v6, v5
v8: f32[3,8] = mul v0, v7
output \"y\" = v8
",
        ),
        (
            // (x - mean) * rsqrt(var + eps): multiplied by the reciprocal.
            "layer norm, times the reciprocal",
            "layer_norm",
            "v1: f32[3,1] = reduce{kind=mean, axes=[1], keepdims=true} v0
v2: f32[3,8] = sub v0, v1
v3: f32[3,8] = mul v2, v2
v4: f32[3,1] = reduce{kind=mean, axes=[1], keepdims=true} v3
v5: f32[] = const [1e-5]
v6: f32[3,1] = add v4, v5
v7: f32[3,1] = sqrt v6
v8: f32[3,1] = reciprocal v7
v9: f32[3,8] = mul v2, v8
output \"y\" = v9
",
        ),
    ];
    let mut failures = Vec::new();
    for (what, fused, body) in cases {
        let start = format!("{x}{body}");
        let g = text::parse(&start).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (out, _) = optimize(&g, Limits::default()).unwrap();
        let printed = text::print(&out);
        if !printed.contains(&format!("= {fused}")) {
            failures.push(format!("{what}: not fused\n{printed}"));
            continue;
        }
        assert_same_values(what, &g, &out);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
