//! Rewrite rules, one file per topic. See `README.md` beside this file.

pub mod algebra;
pub mod fusion;
pub mod tiling;

use super::{TGraph, TNode, TensorAnalysis};
use egg::{Id, Rewrite, Subst, Var};
use egret_ir::Op;

pub type Rule = Rewrite<TNode, TensorAnalysis>;

/// Rule sets run in order: algebra first, so that exporter variants meet in
/// one form, then fusion with algebra still on, then tiling of the products
/// that are left. Built once a process: parsing every rule's patterns anew
/// for each compile took a sixth of the fuzzer's time per model under
/// AddressSanitizer (`fuzz/`; in a release build, well under a
/// millisecond).
pub fn stages() -> &'static [Vec<Rule>] {
    static STAGES: std::sync::OnceLock<Vec<Vec<Rule>>> = std::sync::OnceLock::new();
    STAGES.get_or_init(|| {
        let mut fuse = algebra::rules();
        fuse.extend(fusion::rules());
        vec![algebra::rules(), fuse, tiling::rules()]
    })
}

/// Every rule, for tests and documentation.
pub fn all() -> Vec<Rule> {
    let mut r = algebra::rules();
    r.extend(fusion::rules());
    r.extend(tiling::rules());
    r
}

pub(crate) fn var(name: &str) -> Var {
    name.parse().expect("a pattern variable")
}

/// Adds `op(children)` to the e-graph in the one form every op node has: the attribute leaf first, left out for ops without attributes.
pub(crate) fn add_op(egraph: &mut TGraph, op: &Op, mut children: Vec<Id>) -> Id {
    let attrs = egret_ir::text::attrs_text(op);
    if !attrs.is_empty() {
        children.insert(0, egraph.add(TNode::leaf(&attrs)));
    }
    egraph.add(TNode { op: op.name().into(), children })
}

/// `(out {index=k} node)`: output `k` of a multi-output op.
pub(crate) fn add_output(egraph: &mut TGraph, node: Id, k: usize) -> Id {
    let index = egraph.add(TNode::leaf(&format!("{{index={k}}}")));
    egraph.add(TNode { op: "out".into(), children: vec![index, node] })
}

/// An applier's result: the matched class when `node` was new to it.
pub(crate) fn union_result(egraph: &mut TGraph, eclass: Id, node: Id) -> Vec<Id> {
    if egraph.union(eclass, node) {
        vec![eclass]
    } else {
        vec![]
    }
}

/// The scalar constant a pattern variable is bound to, if any.
pub(crate) fn scalar(egraph: &TGraph, subst: &Subst, v: &str) -> Option<f64> {
    egraph[subst[var(v)]].data.scalar()
}

/// Side condition: `v` is a scalar constant within `tol` of `want`.
pub(crate) fn is_scalar(v: &'static str, want: f64, tol: f64) -> impl Fn(&mut TGraph, Id, &Subst) -> bool {
    move |g, _, s| scalar(g, s, v).is_some_and(|x| (x - want).abs() <= tol * want.abs().max(1.0))
}

/// Side condition: `v` is a floating-point scalar constant.
pub(crate) fn is_float_scalar(v: &'static str) -> impl Fn(&mut TGraph, Id, &Subst) -> bool {
    move |g, _, s| scalar(g, s, v).is_some() && g[s[var(v)]].data.ty().is_some_and(|t| t.dtype.is_float())
}

/// Side condition: `v` is computed from constants alone.
pub(crate) fn is_constant(v: &'static str) -> impl Fn(&mut TGraph, Id, &Subst) -> bool {
    move |g, _, s| g[s[var(v)]].data.constant
}
