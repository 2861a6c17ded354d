//! Tiling: every f32 matrix product gets the ways it can be computed as
//! alternatives in its class (`matmul_tiled` with a `MatMulTiling`), and
//! extraction's cost model (`extract::matmul_cost`) picks one. Each rule
//! relies on one identity: `matmul_tiled{tiling=t}(a, b) = matmul(a, b)`
//! for every `t` (the tiling changes the kernel, not the value).
//!
//! These run as the last stage, after fusion: a product that became part of
//! an attention block is no longer anybody's input, and tiling it would only
//! grow the graph.

use super::{add_op, union_result, var, Rule, TGraph};
use crate::egraph::TNode;
use egg::rewrite as rw;
use egg::{Applier, Id, PatternAst, Subst, Symbol};
use egret_ir::op::MatMulTiling;
use egret_ir::{DType, Op};

pub fn rules() -> Vec<Rule> {
    vec![
        // matmul(a, b) = matmul_tiled{packed_6x32}(a, b), where b is a 2-d
        // constant (a weight) that can be packed at compile time.
        rw!("tile-packed"; "(matmul ?a ?b)" => { Tile(MatMulTiling::Packed6x32) }),
        // matmul(a, b) = matmul_tiled{library}(a, b).
        rw!("tile-library"; "(matmul ?a ?b)" => { Tile(MatMulTiling::Library) }),
        // matmul(a, b) = matmul_tiled{generated_4x8}(a, b).
        rw!("tile-generated"; "(matmul ?a ?b)" => { Tile(MatMulTiling::Generated4x8) }),
    ]
}

/// Adds the tiled alternative to the product's class where it applies.
struct Tile(MatMulTiling);

impl Applier<TNode, crate::egraph::TensorAnalysis> for Tile {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (a, b) = (subst[var("?a")], subst[var("?b")]);
        let (Some(at), Some(bt)) = (egraph[a].data.ty(), egraph[b].data.ty()) else { return vec![] };
        // The kernels are f32 only; other products keep the plain op.
        if at.dtype != DType::F32 || bt.dtype != DType::F32 {
            return vec![];
        }
        if self.0 == MatMulTiling::Packed6x32 && !(bt.rank() == 2 && egraph[b].data.constant) {
            return vec![];
        }
        let tiled = add_op(egraph, &Op::MatMulTiled { tiling: self.0 }, vec![a, b]);
        union_result(egraph, eclass, tiled)
    }
}
