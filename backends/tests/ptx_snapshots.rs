//! The PTX printed for the standard small graphs, one per kernel kind:
//! the same GPU kernels as `wgsl_snapshots.rs`, rendered by the other
//! printer. Review every change to them like code.

mod graphs;

use egret_backends::gpu::{self, ptx};
use egret_backends::{lower, LowerOptions};
use graphs::*;

fn ptx(text: &str) -> String {
    let g = egret_ir::text::parse(text).unwrap();
    let plan = lower(&g, LowerOptions::default().gpu()).unwrap();
    let compiled = gpu::compile(&plan, gpu::Limits::default(), Default::default()).unwrap();
    let mut out = String::new();
    for (i, k) in compiled.kernels.iter().enumerate() {
        out.push_str(&format!("\n// k{i}\n{}", ptx::print(k)));
    }
    out
}

#[test]
fn matmul() {
    insta::assert_snapshot!(ptx(MATMUL));
}

#[test]
fn matmul_with_epilogue() {
    insta::assert_snapshot!(ptx(MATMUL_EPILOGUE));
}

#[test]
fn softmax() {
    insta::assert_snapshot!(ptx(SOFTMAX));
}

#[test]
fn layer_norm() {
    insta::assert_snapshot!(ptx(LAYER_NORM));
}

#[test]
fn gather() {
    insta::assert_snapshot!(ptx(GATHER));
}

#[test]
fn elementwise_chain() {
    insta::assert_snapshot!(ptx(ELEMENTWISE_CHAIN));
}

#[test]
fn attention() {
    insta::assert_snapshot!(ptx(ATTENTION));
}

#[test]
fn attention_with_a_head_split_over_two_lanes() {
    insta::assert_snapshot!(ptx(WIDE_ATTENTION));
}
