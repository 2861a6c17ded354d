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
    let compiled = gpu::compile(&plan, gpu::Limits::default()).unwrap();
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
