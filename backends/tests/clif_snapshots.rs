//! The Cranelift IR generated for small graphs, one per kernel kind.
//! Snapshots live in `tests/snapshots/`; review every change to them like
//! code (`cargo insta review`, or `INSTA_UPDATE=always` then `git diff`).

mod graphs;

use egret_backends::cpu::compile;
use egret_backends::{lower, LowerOptions};
use graphs::*;

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

/// The JIT hands norms and softmax to the kernel library: a stub.
#[test]
fn layer_norm_in_the_kernel_library() {
    insta::assert_snapshot!(clif(LAYER_NORM));
}

#[test]
fn softmax() {
    insta::assert_snapshot!(clif_generated(SOFTMAX));
}

#[test]
fn layer_norm() {
    insta::assert_snapshot!(clif_generated(LAYER_NORM));
}

#[test]
fn gather() {
    insta::assert_snapshot!(clif(GATHER));
}

#[test]
fn elementwise_chain() {
    // A bias add (read twice, so written once), then GELU in its erf form
    // and a residual add fused into one map kernel with immediate constants.
    insta::assert_snapshot!(clif(ELEMENTWISE_CHAIN));
}

/// A linear layer with bias, GELU and a residual: one matmul kernel whose
/// epilogue (the kernel library's interpreter) runs the elementwise tail.
#[test]
fn matmul_with_epilogue() {
    let opts = LowerOptions { matmul: Some(egret_backends::plan::MatMulImpl::Library), ..LowerOptions::default() };
    insta::assert_snapshot!(clif_with(MATMUL_EPILOGUE, opts));
}

/// Attention: a stub that calls the kernel library's flash-style kernel
/// with the kernel's parameters and batch table as data objects.
#[test]
fn attention() {
    insta::assert_snapshot!(clif(ATTENTION));
}

/// Symbolic sizes loaded from the argument slots after the operands.
#[test]
fn symbolic_row_lengths() {
    insta::assert_snapshot!(clif(SYMBOLIC_ROWS));
}

#[test]
fn symbolic_sizes() {
    insta::assert_snapshot!(clif(SYMBOLIC));
}
