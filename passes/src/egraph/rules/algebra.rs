//! Algebra: identities that bring the many ways exporters write one
//! computation to a common form, so that one fusion rule matches them all.
//! Each rule states the identity it relies on; elementwise ops broadcast,
//! and every identity here holds under broadcasting.

use super::{add_op, is_constant, is_float_scalar, union_result, var, Rule, TGraph};
use crate::egraph::TNode;
use egg::rewrite as rw;
use egg::{Applier, Id, PatternAst, Subst, Symbol};
use egret_ir::Op;

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
                => "(softmax ?ax (add (mul (matmul ?q ?kt) ?s) (add ?a ?b)))"
            if is_float_scalar("?s")),
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
        let fits = egret_ir::ops::broadcast_shapes(&mt.shape, &t_shape).is_ok_and(|s| s == t_shape);
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
