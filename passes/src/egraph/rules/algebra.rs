//! Algebra: identities that bring the many ways exporters write one
//! computation to a common form, so that one fusion rule matches them all.
//! Each rule states the identity it relies on; elementwise ops broadcast,
//! and every identity here holds under broadcasting.

use super::{add_op, is_constant, is_float_scalar, union_result, var, Rule, TGraph};
use crate::egraph::TNode;
use egg::rewrite as rw;
use egg::{Applier, Id, PatternAst, Subst, Symbol};
use egret_ir::{Dim, Op};

pub fn rules() -> Vec<Rule> {
    vec![
        // a * b = b * a
        rw!("mul-commute"; "(mul ?a ?b)" => "(mul ?b ?a)"),
        // a + b = b + a
        rw!("add-commute"; "(add ?a ?b)" => "(add ?b ?a)"),
        // a / c = a * (1 / c) for a float constant c (1 / c folds to a
        // constant; the two differ by at most one rounding). Integer
        // division has no such identity.
        rw!("div-by-constant"; "(div ?a ?c)" => "(mul ?a (reciprocal ?c))" if is_float_scalar("?c")),
        // (a * c) * b = (a * b) * c for a float scalar constant c: constants
        // move outward, so `0.5 * x * y` and `x * y * 0.5` meet.
        rw!("scalar-outward"; "(mul (mul ?a ?c) ?b)" => "(mul (mul ?a ?b) ?c)" if is_float_scalar("?c")),
        // (a * c) @ b = (a @ b) * c for a scalar c: scales applied to q or k
        // before the scores matmul move after it.
        rw!("matmul-scalar-left"; "(matmul (mul ?a ?c) ?b)" => "(mul (matmul ?a ?b) ?c)" if is_float_scalar("?c")),
        // a @ (b * c) = (a @ b) * c for a scalar c.
        rw!("matmul-scalar-right"; "(matmul ?a (mul ?b ?c))" => "(mul (matmul ?a ?b) ?c)" if is_float_scalar("?c")),
        // transpose(a * c) = transpose(a) * c for a scalar c.
        rw!("transpose-scalar"; "(transpose ?p (mul ?a ?c))" => "(mul (transpose ?p ?a) ?c)" if is_float_scalar("?c")),
        // reshape(a * c) = reshape(a) * c for a scalar c.
        rw!("reshape-scalar"; "(reshape ?s (mul ?a ?c))" => "(mul (reshape ?s ?a) ?c)" if is_float_scalar("?c")),
        // 1 / y = reciprocal(y): `Div(1, Sqrt(v))` and `Reciprocal(Sqrt(v))` meet.
        rw!("one-over"; "(div ?one ?y)" => "(reciprocal ?y)" if super::is_scalar("?one", 1.0, 0.0)),
        // (x + a) + b = x + (a + b) for constants a and b: two additive masks
        // (a bias, then a window mask) become one.
        rw!("add-constants"; "(add (add ?x ?a) ?b)" => "(add ?x (add ?a ?b))" if is_constant("?a") if is_constant("?b")),
        // (s + a) + b = s + (a + b) for attention scores s (a scores matmul,
        // scaled or not): a position bias and a mask, or a causal and a
        // padding mask, added one after the other become one additive mask,
        // which the masked attention rules take. (The two sums differ by
        // one rounding; masks at -1e30 or below stay there.) Only under a
        // softmax: anywhere else a residual stream's chain of adds, each
        // after a matmul, would reassociate without end.
        rw!("scores-biases-combine";
            "(softmax ?ax (add (add (mul (matmul ?q ?kt) ?s) ?a) ?b))"
                => "(softmax ?ax (add (mul (matmul ?q ?kt) ?s) (add ?a ?b)))"),
        rw!("scores-biases-combine-unscaled";
            "(softmax ?ax (add (add (matmul ?q ?kt) ?a) ?b))" => "(softmax ?ax (add (matmul ?q ?kt) (add ?a ?b)))"),
        // (s + m) * c = s * c + m * c for scores s and a float scalar c: a
        // mask added before the scores are scaled (CodeGen) is scaled with
        // them. (One rounding apart; a mask at -1e30 or below, times a
        // scale near 1 / sqrt(d), stays far below any score.) Under a
        // softmax only, like the rule above.
        rw!("scale-through-scores-bias";
            "(softmax ?ax (mul (add (matmul ?q ?kt) ?m) ?c))"
                => "(softmax ?ax (add (mul (matmul ?q ?kt) ?c) (mul ?m ?c)))"
            if is_float_scalar("?c")),
        // (q @ kt) * s = (q * s) @ kt for a scale s that is constant over each
        // score matrix (its last two dims are 1: one scale per head, as
        // Swin V2's cosine attention learns), when q * s keeps q's shape.
        // The attention rules take a scalar scale only; a per-head one
        // moves onto the queries.
        rw!("per-head-scale-into-queries";
            "(softmax ?ax (add (mul (matmul ?q ?kt) ?s) ?m))" => "(softmax ?ax (add (matmul (mul ?q ?s) ?kt) ?m))"
            if is_per_matrix_scale("?s", "?q")),
        rw!("per-head-scale-into-queries-unmasked";
            "(softmax ?ax (mul (matmul ?q ?kt) ?s))" => "(softmax ?ax (matmul (mul ?q ?s) ?kt))"
            if is_per_matrix_scale("?s", "?q")),
        // reshape(a @ b) = reshape(a) @ reshape(b) when the reshape splits the
        // product's leading batch dim in two ([P, m, n] -> [p, q, m, n],
        // P = pq) and leaves the matrices alone: each operand's batch dim
        // splits the same way (a broadcast operand stays as it is). Scores
        // an exporter computed with a batch of B * H matrices (BLOOM's
        // baddbmm) meet the [B, H] attention that reads them.
        rw!("reshape-split-through-matmul"; "(reshape ?s (matmul ?a ?b))" => { SplitBatch { matmul: true } }),
        // reshape(x + y) = reshape(x) + reshape(y) under the same split, for
        // scores y: a bias added to them in the B * H batch (ALiBi) is
        // added in the split one. Only on scores, so that adds elsewhere
        // (a residual stream) are not split for nothing.
        rw!("reshape-split-through-scores-add"; "(reshape ?s (add ?a ?b))" => { SplitBatch { matmul: false } } if is_scores("?b")),
        // merge(p) @ v = merge(p @ split(v)) when `merge` joins the two
        // leading dims of softmax probabilities p ([b, h, m, n] -> [bh, m, n])
        // and `split` is its inverse on v's batch dim: probabilities a
        // softmax computed as [B, H] and an exporter multiplied with v as a
        // batch of B * H (the legacy exporter's BLOOM) meet v as [B, H].
        // Only after a softmax, where the attention rules look.
        rw!("reshape-merge-through-probabilities-matmul";
            "(matmul (reshape ?s (softmax ?ax ?x)) ?v)" => { MergeBatch }),
        // reshape_S(reshape_T(x) + m) = x + reshape_S(expand_T(m)) when the
        // outer reshape restores x's shape: a mask added in another view of
        // x (Swin's windows) is added in x's own.
        rw!("add-through-reshape"; "(reshape ?s (add (reshape ?t ?x) ?m))" => { AddThroughReshape }),
        // where(m, s, c) = s + where(m, 0, c) for a scalar c <= -1e30 (or
        // -inf) and finite s of magnitude below 1e22: s + c rounds to c.
        // A boolean attention mask becomes an additive one, which the masked
        // attention rules take.
        rw!("where-to-additive-mask"; "(where ?m ?s ?c)" => { WhereToAdditiveMask { scores_first: true } }),
        // where(m, c, s) = s + where(m, c, 0), the same with the mask inverted.
        rw!("where-to-additive-mask-inverted"; "(where ?m ?c ?s)" => { WhereToAdditiveMask { scores_first: false } }),
        // (x * c1) * c2 = x * (c1 * c2) for scalars: the product folds to one constant.
        rw!("scalars-combine"; "(mul (mul ?x ?c1) ?c2)" => "(mul ?x (mul ?c1 ?c2))" if is_float_scalar("?c1") if is_float_scalar("?c2")),
        // x * x = x^2 (floats): a variance or an RMS written with a product
        // instead of Pow.
        rw!("square"; "(mul ?x ?x)" => { PowerOfBase { step: false } }),
        // x * x^n = x^(n+1) for a scalar n >= 0 (floats): x * (x * x) is x^3,
        // the cube in the TorchScript exporter's tanh-GELU. (Not for n < 0:
        // at x = 0, 0 * 0^-1 is NaN but 0^0 is 1.)
        rw!("power-times-base"; "(mul ?x (pow ?x ?n))" => { PowerOfBase { step: true } }),
        // a * (1 / b) = a / b: a norm multiplied by the reciprocal of its
        // deviation meets the one divided by it.
        rw!("times-reciprocal"; "(mul ?a (reciprocal ?b))" => "(div ?a ?b)"),
    ]
}

/// The applier of `square` (x^2) and `power-times-base` (x^(n+1)).
struct PowerOfBase {
    /// Whether the match is `x * x^n` (else `x * x`).
    step: bool,
}

impl Applier<TNode, crate::egraph::TensorAnalysis> for PowerOfBase {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let x = subst[var("?x")];
        if !egraph[x].data.ty().is_some_and(|t| t.dtype == egret_ir::DType::F32) {
            return vec![];
        }
        let exponent = if self.step {
            match super::scalar(egraph, subst, "?n") {
                Some(n) if n >= 0.0 => n + 1.0,
                _ => return vec![],
            }
        } else {
            2.0
        };
        let n = egraph.analysis.scalar_leaf(exponent as f32);
        let n = egraph.add(n);
        let power = add_op(egraph, &Op::Pow, vec![x, n]);
        union_result(egraph, eclass, power)
    }
}

/// The applier of `add-through-reshape`.
struct AddThroughReshape;

impl Applier<TNode, crate::egraph::TensorAnalysis> for AddThroughReshape {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (x, m) = (subst[var("?x")], subst[var("?m")]);
        let (Some(xt), Some(outer)) = (egraph[x].data.ty().cloned(), egraph[eclass].data.ty().cloned()) else {
            return vec![];
        };
        let Some(view) = egraph[subst[var("?t")]].data.attrs.clone() else { return vec![] };
        let Ok(Op::Reshape { shape: t_shape }) = egret_ir::text::op_from_parts("reshape", &view) else { return vec![] };
        let Some(mt) = egraph[m].data.ty().cloned() else { return vec![] };
        // Only where the outer reshape undoes the inner one and m fits the inner view.
        let fits = egret_ir::ops::broadcast_dims(&mt.shape, &t_shape).is_ok_and(|s| s == t_shape);
        if outer != xt || !fits || mt.dtype != xt.dtype {
            return vec![];
        }
        let expand = Op::Expand { shape: t_shape };
        let reshape = Op::Reshape { shape: xt.shape.clone() };
        let expanded = add_op(egraph, &expand, vec![m]);
        let mask = add_op(egraph, &reshape, vec![expanded]);
        let sum = add_op(egraph, &Op::Add, vec![x, mask]);
        union_result(egraph, eclass, sum)
    }
}

/// Side condition: `v` holds attention scores, a batched matmul (at least
/// one batch dim) or one times a scalar.
fn is_scores(v: &'static str) -> impl Fn(&mut TGraph, Id, &Subst) -> bool {
    move |g, _, s| {
        let batched_matmul = |c: Id| {
            g[c].data.ty().is_some_and(|t| t.rank() >= 3)
                && g[c].nodes.iter().any(|n| matches!(n.op.as_str(), "matmul" | "matmul_tiled"))
        };
        let class = s[var(v)];
        batched_matmul(class)
            || g[class].nodes.iter().any(|n| n.op.as_str() == "mul" && n.children.iter().any(|&c| batched_matmul(c)))
    }
}

/// Side condition: `s` is a float tensor of more than one element whose
/// last two dims are 1 (one value per score matrix), and `q * s` has q's
/// shape.
fn is_per_matrix_scale(s: &'static str, q: &'static str) -> impl Fn(&mut TGraph, Id, &Subst) -> bool {
    move |g, _, subst| {
        let (Some(st), Some(qt)) = (g[subst[var(s)]].data.ty(), g[subst[var(q)]].data.ty()) else { return false };
        let r = st.rank();
        st.dtype.is_float()
            && st.dtype == qt.dtype
            && st.checked_numel().is_some_and(|n| n > 1)
            && r >= 2
            && st.shape[r - 2..] == [1, 1]
            && egret_ir::ops::broadcast_dims(&qt.shape, &st.shape).is_ok_and(|b| b == qt.shape)
    }
}

/// `[P, rest..] -> [p, q, rest..]` with `P = p q`: the reshape splits the
/// leading dim of a rank-3-or-more value and nothing else.
fn splits_leading(from: &[Dim], to: &[Dim]) -> Option<(Dim, Dim)> {
    (from.len() >= 3 && to.len() == from.len() + 1 && to[2..] == from[1..] && to[0].checked_mul(to[1]).ok()? == from[0])
        .then(|| (to[0], to[1]))
}

/// The applier of `reshape-split-through-matmul` and
/// `reshape-split-through-scores-add`: the binary op under the reshape,
/// over its operands split the same way.
struct SplitBatch {
    /// The op under the reshape: a matmul, else an add.
    matmul: bool,
}

impl Applier<TNode, crate::egraph::TensorAnalysis> for SplitBatch {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let op = if self.matmul { Op::MatMul } else { Op::Add };
        let (a, b) = (subst[var("?a")], subst[var("?b")]);
        let Some(to) = egraph[eclass].data.ty().map(|t| t.shape.clone()) else { return vec![] };
        let (Some(at), Some(bt)) = (egraph[a].data.ty().cloned(), egraph[b].data.ty().cloned()) else { return vec![] };
        // The shape under the reshape.
        let Ok(from) = egret_ir::ops::infer(&op, &[&at, &bt]).map(|t| t[0].shape.clone()) else { return vec![] };
        let Some((p, q)) = splits_leading(&from, &to) else { return vec![] };
        let rank = from.len();
        // Each operand split like the result: a full batch dim splits, a
        // dim of 1 or a lower rank broadcasts as before. A matmul's
        // operands keep their own matrix dims.
        let split = |egraph: &mut TGraph, x: Id| -> Option<Id> {
            let xt = egraph[x].data.ty()?.shape.clone();
            if xt.len() < rank || (xt.len() == rank && xt[0] == 1) {
                return Some(x);
            }
            if xt.len() != rank || xt[0] != from[0] {
                return None;
            }
            let shape: Vec<Dim> = [p, q].into_iter().chain(xt[1..].iter().copied()).collect();
            Some(add_op(egraph, &Op::Reshape { shape }, vec![x]))
        };
        let (Some(a2), Some(b2)) = (split(egraph, a), split(egraph, b)) else { return vec![] };
        let node = add_op(egraph, &op, vec![a2, b2]);
        // Inference decides whether the split operands fit.
        if egraph[node].data.ty().map(|t| &t.shape) != Some(&to) {
            return vec![];
        }
        union_result(egraph, eclass, node)
    }
}

/// The applier of `reshape-merge-through-probabilities-matmul`.
struct MergeBatch;

impl Applier<TNode, crate::egraph::TensorAnalysis> for MergeBatch {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (x, v) = (subst[var("?x")], subst[var("?v")]);
        let (Some(xt), Some(vt), Some(out)) =
            (egraph[x].data.ty().cloned(), egraph[v].data.ty().cloned(), egraph[eclass].data.ty().cloned())
        else {
            return vec![];
        };
        let Some(softmax_attrs) = egraph[subst[var("?ax")]].data.attrs.clone() else { return vec![] };
        let Ok(softmax) = egret_ir::text::op_from_parts("softmax", &softmax_attrs) else { return vec![] };
        let Some(view) = egraph[subst[var("?s")]].data.attrs.clone() else { return vec![] };
        let Ok(Op::Reshape { shape: merged }) = egret_ir::text::op_from_parts("reshape", &view) else {
            return vec![];
        };
        // The reshape must merge the probabilities' two leading dims and
        // nothing else.
        if splits_leading(&merged, &xt.shape).is_none() {
            return vec![];
        }
        let (p, q) = (xt.shape[0], xt.shape[1]);
        let rank = merged.len();
        // v split like the probabilities; a broadcast v stays as it is.
        let v2 = if vt.rank() < rank || (vt.rank() == rank && vt.shape[0] == 1) {
            v
        } else if vt.rank() == rank && vt.shape[0] == merged[0] {
            let shape: Vec<Dim> = [p, q].into_iter().chain(vt.shape[1..].iter().copied()).collect();
            add_op(egraph, &Op::Reshape { shape }, vec![v])
        } else {
            return vec![];
        };
        let probabilities = add_op(egraph, &softmax, vec![x]);
        let product = add_op(egraph, &Op::MatMul, vec![probabilities, v2]);
        // Inference decides whether v fits; then the product merges back.
        let Some(pt) = egraph[product].data.ty().cloned() else { return vec![] };
        if splits_leading(&out.shape, &pt.shape).is_none() {
            return vec![];
        }
        let node = add_op(egraph, &Op::Reshape { shape: out.shape.clone() }, vec![product]);
        union_result(egraph, eclass, node)
    }
}

/// The applier of `where-to-additive-mask` (and its inverted form).
struct WhereToAdditiveMask {
    /// Whether the scores are the `then` branch (kept where the mask is true).
    scores_first: bool,
}

/// Fills at or below this are "minus infinity" for a mask: adding any score
/// of magnitude below 1e22 to them rounds back to them in f32.
const MASK_FILL_AT_MOST: f64 = -1e30;

impl Applier<TNode, crate::egraph::TensorAnalysis> for WhereToAdditiveMask {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (m, s, c) = (subst[var("?m")], subst[var("?s")], subst[var("?c")]);
        let fill_ok = egraph[c].data.scalar().is_some_and(|x| x <= MASK_FILL_AT_MOST);
        let (Some(st), Some(ct)) = (egraph[s].data.ty().cloned(), egraph[c].data.ty().cloned()) else { return vec![] };
        // Constant scores would only rewrite the mask into itself.
        if !fill_ok || st.dtype != egret_ir::DType::F32 || ct.dtype != st.dtype || egraph[s].data.constant {
            return vec![];
        }
        let zero = egraph.analysis.scalar_leaf(0.0);
        let zero = egraph.add(zero);
        let branches = if self.scores_first { vec![m, zero, c] } else { vec![m, c, zero] };
        let mask = add_op(egraph, &Op::Where, branches);
        let sum = add_op(egraph, &Op::Add, vec![s, mask]);
        union_result(egraph, eclass, sum)
    }
}
