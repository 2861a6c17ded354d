//! The WGSL generated for the standard small graphs, one per kernel kind,
//! with the GPU plan's steps (grids and parameters) above the shaders.
//! Snapshots live in `tests/snapshots/`; review every change to them like
//! code (`cargo insta review`, or `INSTA_UPDATE=always` then `git diff`).
//! Every shader here also passes naga's validation.

mod graphs;

use egret_backends::gpu::{self, Step};
use egret_backends::{lower, LowerOptions};
use graphs::*;

fn wgsl(text: &str) -> String {
    let g = egret_ir::text::parse(text).unwrap();
    let plan = lower(&g, LowerOptions::default().gpu()).unwrap();
    let compiled = gpu::compile(&plan, gpu::Limits::default(), Default::default()).unwrap();
    let mut out = String::new();
    for (i, s) in compiled.steps.iter().enumerate() {
        match s {
            Step::Dispatch { kernel, params, grid, label, .. } => {
                out.push_str(&format!("s{i} k{kernel} grid {grid:?} params {params:?}  # {label}\n"))
            }
            Step::Host { op, label, .. } => out.push_str(&format!("s{i} host {}  # {label}\n", op.name())),
        }
    }
    out.push_str(&format!("arena {} words\n", compiled.arena_words));
    for (i, k) in compiled.kernels.iter().enumerate() {
        let text = gpu::wgsl::print(k);
        gpu::wgsl::validate(&text).unwrap_or_else(|e| panic!("k{i} fails validation:\n{e}\n{text}"));
        out.push_str(&format!("\n// k{i}\n{text}"));
    }
    out
}

#[test]
fn matmul() {
    insta::assert_snapshot!(wgsl(MATMUL));
}

#[test]
fn matmul_with_epilogue() {
    insta::assert_snapshot!(wgsl(MATMUL_EPILOGUE));
}

#[test]
fn softmax() {
    insta::assert_snapshot!(wgsl(SOFTMAX));
}

#[test]
fn layer_norm() {
    insta::assert_snapshot!(wgsl(LAYER_NORM));
}

#[test]
fn gather() {
    insta::assert_snapshot!(wgsl(GATHER));
}

#[test]
fn elementwise_chain() {
    insta::assert_snapshot!(wgsl(ELEMENTWISE_CHAIN));
}

#[test]
fn attention() {
    insta::assert_snapshot!(wgsl(ATTENTION));
}

#[test]
fn attention_with_a_head_split_over_two_lanes() {
    insta::assert_snapshot!(wgsl(WIDE_ATTENTION));
}

/// A weight read through a transpose (Gemm's `transB`) is laid out
/// row-major at compile time for the GPU's matmul: its tile loads then
/// walk consecutive words (the strides are parameters 5 and 6).
#[test]
fn transposed_weights_are_laid_out_row_major() {
    let g = egret_ir::text::parse(
        "v0: f32[3,4] = input{name=\"x\"}
v1: f32[2,4] = const [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
v2: f32[4,2] = transpose{perm=[1, 0]} v1
v3: f32[3,2] = matmul v0, v2
output \"y\" = v3
",
    )
    .unwrap();
    let plan = lower(&g, LowerOptions::default().gpu()).unwrap();
    let compiled = gpu::compile(&plan, gpu::Limits::default(), Default::default()).unwrap();
    let Step::Dispatch { params, .. } = &compiled.steps[0] else { panic!("a dispatch") };
    assert_eq!(&params[5..7], &[2, 1], "b row-major: row stride n, column stride 1");
    let bits: Vec<f32> = compiled.weights[0][..8].iter().map(|&w| f32::from_bits(w)).collect();
    assert_eq!(bits, [1.0, 5.0, 2.0, 6.0, 3.0, 7.0, 4.0, 8.0]);
}
