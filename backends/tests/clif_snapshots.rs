//! The Cranelift IR generated for small graphs, one per kernel kind.
//! Snapshots live in `tests/snapshots/`; review every change to them like
//! code (`cargo insta review`, or `INSTA_UPDATE=always` then `git diff`).

use egret_backends::cpu::compile;
use egret_backends::{lower, LowerOptions};

/// The plan's kernel list, then the CLIF of every native kernel.
fn clif(text: &str) -> String {
    clif_with(text, LowerOptions::default())
}

fn clif_with(text: &str, opts: LowerOptions) -> String {
    let g = egret_ir::text::parse(text).unwrap();
    render(&compile(lower(&g, opts).unwrap()).unwrap())
}

/// Generated code, as ahead-of-time objects have it: no kernel library.
fn clif_generated(text: &str) -> String {
    let g = egret_ir::text::parse(text).unwrap();
    let opts = LowerOptions { matmul: Some(egret_backends::plan::MatMulImpl::Generated), ..LowerOptions::default() };
    render(&egret_backends::cpu::compile_with(lower(&g, opts).unwrap(), false).unwrap())
}

fn render(compiled: &egret_backends::cpu::CompiledPlan) -> String {
    let mut out = compiled.plan.describe();
    for (i, c) in compiled.clif.iter().enumerate() {
        if !c.is_empty() {
            out.push_str(&format!("\n; k{i}\n{c}"));
        }
    }
    out
}

const MATMUL: &str = "v0: f32[2,8,16] = input{name=\"a\"}
v1: f32[16,16] = input{name=\"b\"}
v2: f32[2,8,16] = matmul v0, v1
output \"c\" = v2
";

/// Small enough that the compiler picks the generated register-tiled kernel.
#[test]
fn matmul() {
    insta::assert_snapshot!(clif(MATMUL));
}

/// The same product through the GEMM library.
#[test]
fn matmul_library() {
    let opts = LowerOptions { matmul: Some(egret_backends::plan::MatMulImpl::Library), ..LowerOptions::default() };
    insta::assert_snapshot!(clif_with(MATMUL, opts));
}

const LAYER_NORM: &str = "v0: f32[4,6] = input{name=\"x\"}
v1: f32[6] = input{name=\"g\"}
v2: f32[6] = input{name=\"b\"}
v3: f32[4,6], v4: f32[4,1], v5: f32[4,1] = layer_norm{axis=1, epsilon=1e-5} v0, v1, v2
output \"y\" = v3
";

/// The JIT hands norms and softmax to the kernel library: a stub.
#[test]
fn layer_norm_in_the_kernel_library() {
    insta::assert_snapshot!(clif(LAYER_NORM));
}

#[test]
fn softmax() {
    insta::assert_snapshot!(clif_generated(
        "v0: f32[3,10] = input{name=\"x\"}
v1: f32[3,10] = softmax{axis=1} v0
output \"y\" = v1
"
    ));
}

#[test]
fn layer_norm() {
    insta::assert_snapshot!(clif_generated(LAYER_NORM));
}

#[test]
fn gather() {
    insta::assert_snapshot!(clif(
        "v0: f32[10,8] = input{name=\"table\"}
v1: i64[5] = input{name=\"ids\"}
v2: f32[5,8] = gather{axis=0} v0, v1
output \"y\" = v2
"
    ));
}

#[test]
fn elementwise_chain() {
    // A bias add (read twice, so written once), then GELU in its erf form
    // and a residual add fused into one map kernel with immediate constants.
    insta::assert_snapshot!(clif(
        "v0: f32[4,16] = input{name=\"x\"}
v1: f32[16] = input{name=\"bias\"}
v2: f32[4,16] = input{name=\"residual\"}
v3: f32[4,16] = add v0, v1
v4: f32[] = const [1.4142135]
v5: f32[4,16] = div v3, v4
v6: f32[4,16] = erf v5
v7: f32[] = const [1.0]
v8: f32[4,16] = add v6, v7
v9: f32[4,16] = mul v3, v8
v10: f32[] = const [0.5]
v11: f32[4,16] = mul v9, v10
v12: f32[4,16] = add v11, v2
output \"y\" = v12
"
    ));
}

/// A linear layer with bias, GELU and a residual: one matmul kernel whose
/// epilogue (the kernel library's interpreter) runs the elementwise tail.
#[test]
fn matmul_with_epilogue() {
    let opts = LowerOptions { matmul: Some(egret_backends::plan::MatMulImpl::Library), ..LowerOptions::default() };
    insta::assert_snapshot!(clif_with(
        "v0: f32[8,16] = input{name=\"x\"}
v1: f32[16,16] = input{name=\"w\"}
v2: f32[16] = input{name=\"bias\"}
v3: f32[8,16] = matmul v0, v1
v4: f32[8,16] = add v3, v2
v5: f32[8,16] = gelu{approximate_tanh=false} v4
v6: f32[8,16] = add v5, v0
output \"y\" = v6
",
        opts
    ));
}

/// Attention: a stub that calls the kernel library's flash-style kernel
/// with the kernel's parameters and batch table as data objects.
#[test]
fn attention() {
    insta::assert_snapshot!(clif(
        "v0: f32[2,10,8] = input{name=\"q\"}
v1: f32[2,8,12] = input{name=\"kt\"}
v2: f32[2,12,8] = input{name=\"v\"}
v3: f32[2,10,8] = attention{scale=0.35355338, nan_to_zero=false} v0, v1, v2
output \"y\" = v3
"
    ));
}
