//! Fusion: the transformer building blocks, recognised in their normalised
//! form and replaced by single ops that have one kernel each.

use super::{add_op, add_output, is_scalar, scalar, union_result, var, Rule, TGraph};
use crate::egraph::TNode;
use egg::{rewrite as rw, Applier, Id, PatternAst, Subst, Symbol};
use egret_ir::op::ReduceKind;
use egret_ir::{Op, Tensor};

const SQRT_1_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const SQRT_2_PI: f64 = 0.797_884_560_802_865_4;

pub fn rules() -> Vec<Rule> {
    vec![
        // GELU, erf form: x * (1 + erf(x / sqrt(2))) * 0.5 = gelu(x).
        rw!("gelu-erf";
            "(mul (mul ?x (add (erf (mul ?x ?c)) ?one)) ?half)" => "(gelu {approximate_tanh=false} ?x)"
            if is_scalar("?c", SQRT_1_2, 1e-5) if is_scalar("?one", 1.0, 0.0) if is_scalar("?half", 0.5, 0.0)),
        // GELU, tanh form: x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) * 0.5 = gelu_tanh(x)
        // (the scalar outermost, where `scalar-outward` brings every spelling).
        rw!("gelu-tanh";
            "(mul (mul ?x (add (tanh (mul (add ?x (mul (pow ?x ?three) ?c)) ?k)) ?one)) ?half)"
                => "(gelu {approximate_tanh=true} ?x)"
            if is_scalar("?half", 0.5, 0.0) if is_scalar("?three", 3.0, 0.0) if is_scalar("?c", 0.044715, 1e-5)
            if is_scalar("?k", SQRT_2_PI, 1e-5) if is_scalar("?one", 1.0, 0.0)),
        // GELU, tanh form with x factored out of the tanh's argument (BLOOM):
        // sqrt(2/pi) x (1 + 0.044715 x^2) = sqrt(2/pi) (x + 0.044715 x^3).
        rw!("gelu-tanh-factored";
            "(mul (mul ?x (add (tanh (mul (mul ?x (add (mul (pow ?x ?two) ?c) ?one2)) ?k)) ?one)) ?half)"
                => "(gelu {approximate_tanh=true} ?x)"
            if is_scalar("?half", 0.5, 0.0) if is_scalar("?two", 2.0, 0.0) if is_scalar("?c", 0.044715, 1e-5)
            if is_scalar("?k", SQRT_2_PI, 1e-5) if is_scalar("?one", 1.0, 0.0) if is_scalar("?one2", 1.0, 0.0)),
        // Layer norm with scale and bias: ((x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)) * g + b,
        // the means over the trailing axes.
        rw!("layer-norm-affine";
            "(add (mul (div (sub ?x (reduce ?r ?x)) (sqrt (add (reduce ?r (pow (sub ?x (reduce ?r ?x)) ?two)) ?eps))) ?g) ?b)"
                => { LayerNorm { affine: true } }
            if is_scalar("?two", 2.0, 0.0)),
        // Attention: softmax(q @ kt * s [+ mask]) @ v over the last axis, with
        // or without a scale and a mask; kt is whatever the exporter fed the
        // scores matmul (a Transpose, a reshape chain, a pre-transposed K).
        rw!("attention"; "(matmul (softmax ?ax (mul (matmul ?q ?kt) ?s)) ?v)" => { Attention::new(true, false, false) }),
        rw!("attention-unscaled"; "(matmul (softmax ?ax (matmul ?q ?kt)) ?v)" => { Attention::new(false, false, false) }),
        rw!("attention-masked";
            "(matmul (softmax ?ax (add (mul (matmul ?q ?kt) ?s) ?m)) ?v)" => { Attention::new(true, true, false) }),
        rw!("attention-masked-unscaled";
            "(matmul (softmax ?ax (add (matmul ?q ?kt) ?m)) ?v)" => { Attention::new(false, true, false) }),
        // Soft-capped scores (Gemma 2): cap * tanh(q @ kt * k) with k = s / cap,
        // as the exporters write `tanh(scores * s / cap) * cap`.
        rw!("attention-softcapped";
            "(matmul (softmax ?ax (mul (tanh (mul (matmul ?q ?kt) ?s)) ?cap)) ?v)" => { Attention::softcapped(false) }),
        rw!("attention-softcapped-masked";
            "(matmul (softmax ?ax (add (mul (tanh (mul (matmul ?q ?kt) ?s)) ?cap) ?m)) ?v)"
                => { Attention::softcapped(true) }),
        // The same with the exporters' guard on the probabilities,
        // where(isnan(p), 0, p), which zeroes fully masked rows.
        rw!("attention-guarded";
            "(matmul (where (is_nan (softmax ?ax (mul (matmul ?q ?kt) ?s))) ?zero (softmax ?ax (mul (matmul ?q ?kt) ?s))) ?v)"
                => { Attention::new(true, false, true) } if is_scalar("?zero", 0.0, 0.0)),
        rw!("attention-guarded-unscaled";
            "(matmul (where (is_nan (softmax ?ax (matmul ?q ?kt))) ?zero (softmax ?ax (matmul ?q ?kt))) ?v)"
                => { Attention::new(false, false, true) } if is_scalar("?zero", 0.0, 0.0)),
        rw!("attention-guarded-masked";
            "(matmul (where (is_nan (softmax ?ax (add (mul (matmul ?q ?kt) ?s) ?m))) ?zero (softmax ?ax (add (mul (matmul ?q ?kt) ?s) ?m))) ?v)"
                => { Attention::new(true, true, true) } if is_scalar("?zero", 0.0, 0.0)),
        rw!("attention-guarded-masked-unscaled";
            "(matmul (where (is_nan (softmax ?ax (add (matmul ?q ?kt) ?m))) ?zero (softmax ?ax (add (matmul ?q ?kt) ?m))) ?v)"
                => { Attention::new(false, true, true) } if is_scalar("?zero", 0.0, 0.0)),
        // SiLU: x * sigmoid(x) = silu(x) (SwiGLU is then silu(gate) * up).
        rw!("silu"; "(mul ?x (sigmoid ?x))" => "(silu ?x)"),
        // Softmax: exp(x - max(x)) / sum(exp(x - max(x))) over one axis, and
        // the unshifted exp(x) / sum(exp(x)) (equal in exact arithmetic; the
        // fused kernel always shifts, which only avoids overflow).
        rw!("softmax"; "(div (exp (sub ?x (reduce ?mx ?x))) (reduce ?s (exp (sub ?x (reduce ?mx ?x)))))" => { Softmax }),
        rw!("softmax-unshifted"; "(div (exp ?x) (reduce ?s (exp ?x)))" => { Softmax }),
        // RMS norm: x * 1/sqrt(mean(x^2) + eps) (times a scale g), the mean
        // over the trailing axes; x / sqrt(...) reaches the same form.
        rw!("rms-norm-scaled";
            "(mul (mul ?x (reciprocal (sqrt (add (reduce ?r (pow ?x ?two)) ?eps)))) ?g)" => { RmsNorm { scaled: true } }
            if is_scalar("?two", 2.0, 0.0)),
        rw!("rms-norm";
            "(mul ?x (reciprocal (sqrt (add (reduce ?r (pow ?x ?two)) ?eps))))" => { RmsNorm { scaled: false } }
            if is_scalar("?two", 2.0, 0.0)),
        rw!("rms-norm-div";
            "(div ?x (sqrt (add (reduce ?r (pow ?x ?two)) ?eps)))" => { RmsNorm { scaled: false } }
            if is_scalar("?two", 2.0, 0.0)),
        // A residual add fused into the norm after it: norm(x + r) with x and
        // r of one type = output 0 of residual_norm(x, r, ...), whose output 1
        // is x + r itself (so the residual stream reads the sum from it).
        rw!("residual-layer-norm-affine"; "(out ?i (layer_norm ?a ?s ?g ?b))"
            => { ResidualNorm { rms: false, params: 2 } }),
        rw!("residual-layer-norm"; "(out ?i (layer_norm ?a ?s ?g))" => { ResidualNorm { rms: false, params: 1 } }),
        rw!("residual-rms-norm"; "(rms_norm ?a ?s ?g)" => { ResidualNorm { rms: true, params: 1 } }),
        // Layer norm without scale and bias: scale 1.
        rw!("layer-norm";
            "(div (sub ?x (reduce ?r ?x)) (sqrt (add (reduce ?r (pow (sub ?x (reduce ?r ?x)) ?two)) ?eps)))"
                => { LayerNorm { affine: false } }
            if is_scalar("?two", 2.0, 0.0)),
    ]
}

/// The trailing-axes start of a `reduce` attribute leaf that is a mean with
/// kept dims over the last axes of a rank-`rank` tensor.
fn trailing_mean_axis(attrs: &str, rank: usize) -> Option<usize> {
    let Ok(Op::Reduce { kind: ReduceKind::Mean, axes, keepdims: true }) =
        egret_ir::text::op_from_parts("reduce", attrs)
    else {
        return None;
    };
    let first = *axes.first()?;
    let trailing = axes.iter().enumerate().all(|(i, &a)| a == first + i) && axes.last() == Some(&(rank - 1));
    trailing.then_some(first)
}

/// What the layer- and RMS-norm matches share: the normalised tensor, the
/// trailing axis its mean reduces from, epsilon, and the normalised dims.
struct NormMatch {
    x: Id,
    xt: egret_ir::Type,
    axis: usize,
    epsilon: f32,
    norm: Vec<usize>,
}

impl NormMatch {
    /// Reads `?x`, the mean's `?r` attributes and the `?eps` constant; `None`
    /// when the mean is not over the trailing axes with kept dims.
    fn from_subst(egraph: &TGraph, subst: &Subst) -> Option<NormMatch> {
        let x = subst[var("?x")];
        let xt = egraph[x].data.ty().cloned()?;
        let attrs = egraph[subst[var("?r")]].data.attrs.clone()?;
        let axis = trailing_mean_axis(&attrs, xt.rank())?;
        let epsilon = scalar(egraph, subst, "?eps")? as f32;
        // The normalised dims are the model's width: known.
        let norm = egret_ir::known_shape(&xt.shape[axis..])?;
        Some(NormMatch { x, xt, axis, epsilon, norm })
    }

    /// A scale or bias operand fits when it has x's dtype and lies along the
    /// normalised dims only.
    fn fits_param(&self, egraph: &TGraph, id: Id) -> bool {
        egraph[id].data.ty().is_some_and(|t| {
            t.dtype == self.xt.dtype
                && egret_ir::ops::broadcast_dims(&t.shape, &egret_ir::dims_of(&self.norm)).is_ok_and(|s| s == self.norm)
        })
    }

    /// A constant scale of ones over the normalised dims, for the unscaled forms.
    fn ones(&self, egraph: &mut TGraph) -> Id {
        let n: usize = self.norm.iter().product();
        let ones = Tensor::from_vec(self.norm.clone(), vec![1f32; n]).cast(self.xt.dtype);
        let leaf = egraph.analysis.introduced_leaf(ones);
        egraph.add(leaf)
    }
}

/// Builds `layer_norm{axis, epsilon}(x, g[, b])` from a match, taking the
/// axis from the reduction and epsilon from the added constant.
struct LayerNorm {
    affine: bool,
}

impl Applier<TNode, crate::egraph::TensorAnalysis> for LayerNorm {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let Some(m) = NormMatch::from_subst(egraph, subst) else { return vec![] };
        let mut children = vec![m.x];
        if self.affine {
            let (g, b) = (subst[var("?g")], subst[var("?b")]);
            if !m.fits_param(egraph, g) || !m.fits_param(egraph, b) {
                return vec![];
            }
            children.extend([g, b]);
        } else {
            children.push(m.ones(egraph));
        }
        // layer_norm has three outputs in the IR (y, mean, inverse standard
        // deviation); the matched class is output 0.
        let ln = add_op(egraph, &Op::LayerNorm { axis: m.axis, epsilon: m.epsilon }, children);
        let y = add_output(egraph, ln, 0);
        union_result(egraph, eclass, y)
    }
}

/// Builds `residual_norm{axis, epsilon, rms}(x, r, g[, b])` from a norm of
/// a class that holds `add(x, r)` with x and r of the sum's own type (a
/// broadcast add is not a residual).
struct ResidualNorm {
    rms: bool,
    /// Scale, or scale and bias.
    params: usize,
}

impl Applier<TNode, crate::egraph::TensorAnalysis> for ResidualNorm {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        // Layer norm's y is its output 0; the other two are statistics.
        if !self.rms && egraph[subst[var("?i")]].data.attrs.as_deref() != Some("{index=0}") {
            return vec![];
        }
        let Some(attrs) = egraph[subst[var("?a")]].data.attrs.clone() else { return vec![] };
        let name = if self.rms { "rms_norm" } else { "layer_norm" };
        let (Ok(Op::LayerNorm { axis, epsilon }) | Ok(Op::RmsNorm { axis, epsilon })) =
            egret_ir::text::op_from_parts(name, &attrs)
        else {
            return vec![];
        };
        let s = subst[var("?s")];
        let Some(st) = egraph[s].data.ty().cloned() else { return vec![] };
        // One operand order for every match (the class holds both orders of
        // a commuted add): every norm of this sum then builds the same node,
        // and the sum's class and y's class can share it.
        let residual = egraph[s].nodes.iter().find_map(|n| {
            let same = |c: Id| egraph[c].data.ty() == Some(&st);
            if n.op.as_str() != "add" || n.children.len() != 2 || !same(n.children[0]) || !same(n.children[1]) {
                return None;
            }
            let (a, b) = (egraph.find(n.children[0]), egraph.find(n.children[1]));
            Some((a.min(b), a.max(b)))
        });
        let Some((x, r)) = residual else { return vec![] };
        // An affine norm holds an unscaled one (scale 1) inside it; fusing
        // both would leave the sum's class and y's class on two different
        // fused nodes, computing the sum twice. Only the outermost fuses,
        // so a norm that really has no scale keeps its separate add.
        if self.params == 1 && is_all_ones(egraph, subst[var("?g")]) {
            return vec![];
        }
        let mut children = vec![x, r, subst[var("?g")]];
        if self.params == 2 {
            children.push(subst[var("?b")]);
        }
        let fused = add_op(egraph, &Op::ResidualNorm { axis, epsilon, rms: self.rms }, children);
        let (y, sum) = (add_output(egraph, fused, 0), add_output(egraph, fused, 1));
        let mut changed = union_result(egraph, eclass, y);
        if egraph.union(s, sum) {
            changed.push(s);
        }
        changed
    }
}

/// Whether the class holds a constant whose elements are all 1.
fn is_all_ones(egraph: &TGraph, id: Id) -> bool {
    egraph[id].nodes.iter().any(|n| {
        n.op.as_str()
            .strip_prefix("const:")
            .and_then(|k| k.parse::<usize>().ok())
            .and_then(|k| egraph.analysis.constants.get(k))
            .is_some_and(|t| t.to_f64_vec().iter().all(|&v| v == 1.0))
    })
}

/// Builds `attention{scale, nan_to_zero}(q, kt, v[, mask])` from a match:
/// the softmax must run over the scores' last axis, the scale must be a
/// float scalar, and the mask must broadcast to the scores.
struct Attention {
    scaled: bool,
    masked: bool,
    guarded: bool,
    /// The scores are `tanh(q @ kt * ?s) * ?cap`: the op's scale is
    /// `?s * ?cap` and its soft cap `?cap`.
    softcapped: bool,
}

impl Attention {
    fn new(scaled: bool, masked: bool, guarded: bool) -> Attention {
        Attention { scaled, masked, guarded, softcapped: false }
    }

    fn softcapped(masked: bool) -> Attention {
        Attention { scaled: true, masked, guarded: false, softcapped: true }
    }
}

impl Applier<TNode, crate::egraph::TensorAnalysis> for Attention {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (q, kt, v) = (subst[var("?q")], subst[var("?kt")], subst[var("?v")]);
        let (Some(qt), Some(ktt)) = (egraph[q].data.ty().cloned(), egraph[kt].data.ty().cloned()) else {
            return vec![];
        };
        if !qt.dtype.is_float() || qt.rank() < 2 || ktt.rank() < 2 {
            return vec![];
        }
        let Some(axis_attrs) = egraph[subst[var("?ax")]].data.attrs.clone() else { return vec![] };
        let Ok(Op::Softmax { axis }) = egret_ir::text::op_from_parts("softmax", &axis_attrs) else { return vec![] };
        let scores_rank = qt.rank().max(ktt.rank());
        if axis != scores_rank - 1 {
            return vec![];
        }
        let float_scalar = |v: &str| match scalar(egraph, subst, v) {
            Some(x) if egraph[subst[var(v)]].data.ty().is_some_and(|t| t.dtype.is_float()) => Some(x),
            _ => None,
        };
        let scale = if self.scaled {
            match float_scalar("?s") {
                Some(s) => s,
                None => return vec![],
            }
        } else {
            1.0
        };
        let softcap = if self.softcapped {
            match float_scalar("?cap") {
                Some(c) if c > 0.0 && c.is_finite() => Some(c),
                _ => return vec![],
            }
        } else {
            None
        };
        // tanh(x * s) * cap = cap * tanh((x * s * cap) / cap).
        let scale = (scale * softcap.unwrap_or(1.0)) as f32;
        let softcap = softcap.map(|c| c as f32);
        let mut children = vec![q, kt, v];
        if self.masked {
            children.push(subst[var("?m")]);
        }
        // Inference decides whether shapes fit; a node it rejects is not added.
        let types: Option<Vec<egret_ir::Type>> = children.iter().map(|&c| egraph[c].data.ty().cloned()).collect();
        let op = Op::Attention { scale, nan_to_zero: self.guarded, softcap };
        let fits = types.is_some_and(|ts| egret_ir::ops::infer(&op, &ts.iter().collect::<Vec<_>>()).is_ok());
        if !fits {
            return vec![];
        }
        let node = add_op(egraph, &op, children);
        union_result(egraph, eclass, node)
    }
}

/// Builds `rms_norm{axis, epsilon}(x, g)` (g = 1 without a scale) from a
/// match, the axis from the reduction and epsilon from the constant.
struct RmsNorm {
    scaled: bool,
}

impl Applier<TNode, crate::egraph::TensorAnalysis> for RmsNorm {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let Some(m) = NormMatch::from_subst(egraph, subst) else { return vec![] };
        let g = if self.scaled {
            let g = subst[var("?g")];
            if !m.fits_param(egraph, g) {
                return vec![];
            }
            g
        } else {
            m.ones(egraph)
        };
        let node = add_op(egraph, &Op::RmsNorm { axis: m.axis, epsilon: m.epsilon }, vec![m.x, g]);
        union_result(egraph, eclass, node)
    }
}

/// Builds `softmax{axis}(x)` from a match whose sum (and max, if bound)
/// reduce exactly one axis with kept dims.
struct Softmax;

impl Applier<TNode, crate::egraph::TensorAnalysis> for Softmax {
    fn apply_one(
        &self,
        egraph: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let x = subst[var("?x")];
        if !egraph[x].data.ty().is_some_and(|t| t.dtype.is_float()) {
            return vec![];
        }
        let one_axis = |egraph: &TGraph, v: &str, want: ReduceKind| -> Option<usize> {
            let attrs = egraph[subst[var(v)]].data.attrs.clone()?;
            match egret_ir::text::op_from_parts("reduce", &attrs) {
                Ok(Op::Reduce { kind, axes, keepdims: true }) if kind == want && axes.len() == 1 => Some(axes[0]),
                _ => None,
            }
        };
        let Some(axis) = one_axis(egraph, "?s", ReduceKind::Sum) else { return vec![] };
        let has_max = subst.get(var("?mx")).is_some();
        if has_max && one_axis(egraph, "?mx", ReduceKind::Max) != Some(axis) {
            return vec![];
        }
        let node = add_op(egraph, &Op::Softmax { axis }, vec![x]);
        union_result(egraph, eclass, node)
    }
}
