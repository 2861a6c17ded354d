//! Tiling: every f32 matrix product gets the ways it can be computed as
//! alternatives in its class (`matmul_tiled` with a `MatMulTiling`), every
//! attention its tile sizes (`attention_tiled` with `block` query rows by
//! `key_block` keys), and extraction's cost model (`extract::matmul_cost`,
//! `extract::attention_cost`) picks one. Each rule relies on one identity:
//! the tiled op computes the same value as the plain one for every tiling
//! (the tiling changes the kernel, not the value).
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
        // matmul(a, b) = matmul_tiled{packed}(a, b), where b is a 2-d
        // constant (a weight) that can be packed at compile time.
        rw!("tile-packed"; "(matmul ?a ?b)" => { Tile(MatMulTiling::Packed) }),
        // matmul(a, b) = matmul_tiled{library}(a, b).
        rw!("tile-library"; "(matmul ?a ?b)" => { Tile(MatMulTiling::Library) }),
        // matmul(a, b) = matmul_tiled{generated_4x8}(a, b).
        rw!("tile-generated"; "(matmul ?a ?b)" => { Tile(MatMulTiling::Generated4x8) }),
        // attention(q, kt, v[, mask]) = attention_tiled{block, key_block}(...)
        // for each candidate tile.
        rw!("tile-attention"; "(attention ?a ?q ?kt ?v)" => { TileAttention }),
        rw!("tile-attention-masked"; "(attention ?a ?q ?kt ?v ?m)" => { TileAttention }),
    ]
}

/// Query rows per tile at most; the queries split into equal blocks under
/// each, so that the tiles the runtime spreads over threads are the same
/// size (197 queries as two blocks of 99 and 98, not 128 and 69).
pub const ATTENTION_BLOCKS: [usize; 3] = [32, 64, 128];
/// Keys per tile at most; the keys split into equal blocks under each.
pub const ATTENTION_KEY_BLOCKS: [usize; 3] = [128, 256, 512];

/// `n` split into equal blocks of at most `most`.
pub fn balanced(n: usize, most: usize) -> usize {
    n.div_ceil(n.div_ceil(most).max(1)).max(1)
}

/// Adds the tiled alternatives of an attention.
struct TileAttention;

impl Applier<TNode, crate::egraph::TensorAnalysis> for TileAttention {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let Some(attrs) = egraph[subst[var("?a")]].data.attrs.clone() else { return vec![] };
        let Ok(Op::Attention { scale, nan_to_zero, softcap }) = egret_ir::text::op_from_parts("attention", &attrs)
        else {
            return vec![];
        };
        let (q, kt) = (subst[var("?q")], subst[var("?kt")]);
        let (Some(qt), Some(ktt)) = (egraph[q].data.ty(), egraph[kt].data.ty()) else { return vec![] };
        // A symbolic length is ranked at its nominal value; the tiles fit any.
        let (Some(sq), Some(sk)) =
            (qt.shape.iter().rev().nth(1).map(|d| d.estimate()), ktt.shape.last().map(|d| d.estimate()))
        else {
            return vec![];
        };
        let mut children = vec![q, kt, subst[var("?v")]];
        if let Some(m) = subst.get(var("?m")) {
            children.push(*m);
        }
        let mut tiles: Vec<(usize, usize)> = Vec::new();
        for b in ATTENTION_BLOCKS {
            for k in ATTENTION_KEY_BLOCKS {
                let tile = (balanced(sq, b), balanced(sk, k));
                if !tiles.contains(&tile) {
                    tiles.push(tile);
                }
            }
        }
        let mut changed = vec![];
        for (block, key_block) in tiles {
            let op = Op::AttentionTiled { scale, nan_to_zero, softcap, block, key_block };
            let tiled = add_op(egraph, &op, children.clone());
            changed.extend(union_result(egraph, eclass, tiled));
        }
        changed
    }
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
        if self.0 == MatMulTiling::Packed && !(bt.rank() == 2 && egraph[b].data.constant) {
            return vec![];
        }
        let tiled = add_op(egraph, &Op::MatMulTiled { tiling: self.0 }, vec![a, b]);
        union_result(egraph, eclass, tiled)
    }
}
