//! Canonicalisation: constant folding, no-op removal, dead code removal.
//!
//! After it, no op reads only constants (up to a size limit), the shape
//! arithmetic exporters write (Shape -> Gather -> Unsqueeze -> Concat ->
//! Reshape) is gone, and Identity, same-type Cast, same-shape Reshape and
//! identity Transpose are bypassed. Later stages can then pattern-match on
//! the computation itself.

use egret_ir::{Graph, IrError, NodeId, Op, ValueId};

/// Folding a node whose output is larger than this would bloat the model
/// (think of an `Expand` of a scalar to a large mask); such nodes stay.
const FOLD_LIMIT: usize = 1 << 22;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CanonStats {
    pub folded: usize,
    pub bypassed: usize,
    pub dead: usize,
}

/// Canonicalises `g`, returning a verified, compacted graph.
pub fn canonicalize(g: &Graph) -> Result<(Graph, CanonStats), IrError> {
    let mut g = g.clone();
    let mut stats = CanonStats::default();
    for n in g.topo_order()? {
        if let Some(src) = no_op_source(&g, n) {
            let out = g.node(n).outputs[0];
            g.replace_all_uses(out, src);
            stats.bypassed += 1;
            continue;
        }
        if fold(&mut g, n)? {
            stats.folded += 1;
        }
    }
    stats.dead = remove_dead(&mut g)?;
    let g = g.compacted()?;
    egret_ir::verify(&g)?;
    Ok((g, stats))
}

/// If node `n` computes exactly its first input, that input.
fn no_op_source(g: &Graph, n: NodeId) -> Option<ValueId> {
    let node = g.node(n);
    let x = *node.inputs.first()?;
    let same_type = node.outputs.len() == 1 && g.ty(x) == g.ty(node.outputs[0]);
    let no_op = match &node.op {
        Op::Identity => true,
        Op::Cast { .. } | Op::Reshape { .. } | Op::Expand { .. } => same_type,
        Op::Transpose { perm } => perm.iter().enumerate().all(|(i, &p)| i == p),
        Op::Slice { .. } | Op::Tile { .. } => same_type && slice_or_tile_is_identity(&node.op),
        Op::Pad { pads, .. } => pads.iter().all(|&p| p == 0),
        Op::Concat { .. } => node.inputs.len() == 1,
        _ => false,
    };
    no_op.then_some(x)
}

fn slice_or_tile_is_identity(op: &Op) -> bool {
    match op {
        Op::Slice { starts, steps, .. } => starts.iter().all(|&s| s == 0) && steps.iter().all(|&s| s == 1),
        Op::Tile { repeats } => repeats.iter().all(|&r| r == 1),
        _ => false,
    }
}

/// Replaces node `n` by constants if all its inputs are constants (or it is
/// a `shape`, which only needs the static type).
fn fold(g: &mut Graph, n: NodeId) -> Result<bool, IrError> {
    let node = g.node(n).clone();
    if matches!(node.op, Op::Const(_) | Op::Input { .. }) {
        return Ok(false);
    }
    if node.outputs.iter().any(|&v| g.ty(v).numel() > FOLD_LIMIT) {
        return Ok(false);
    }
    let values = match &node.op {
        Op::Shape { start, end } => {
            let s = &g.ty(node.inputs[0]).shape;
            vec![egret_ir::Tensor::from_vec(vec![end - start], s[*start..*end].iter().map(|&d| d as i64).collect())]
        }
        op => {
            let Some(inputs) = node.inputs.iter().map(|&v| g.const_value(v).cloned()).collect::<Option<Vec<_>>>()
            else {
                return Ok(false);
            };
            let refs: Vec<&egret_ir::Tensor> = inputs.iter().map(|t| &**t).collect();
            egret_ir::eval_op(op, &refs).map_err(|m| IrError::new(&node.label, op.name(), m))?
        }
    };
    for (&out, t) in node.outputs.iter().zip(values) {
        let c = g.add_const(t, &node.label);
        g.replace_all_uses(out, c);
    }
    Ok(true)
}

/// Removes nodes none of whose outputs is used; returns how many.
fn remove_dead(g: &mut Graph) -> Result<usize, IrError> {
    let mut removed = 0;
    let order = g.topo_order()?;
    for &n in order.iter().rev() {
        let node = g.node(n);
        if matches!(node.op, Op::Input { .. }) {
            continue;
        }
        if node.outputs.iter().all(|&v| g.use_count(v) == 0) {
            g.remove_node(n);
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use egret_ir::text;

    fn canon(src: &str) -> String {
        let g = text::parse(src).unwrap();
        text::print(&canonicalize(&g).unwrap().0)
    }

    #[test]
    fn shape_arithmetic_folds_into_a_static_reshape_input() {
        // The exporter pattern: Shape -> Gather -> Unsqueeze -> Concat feeding a consumer.
        let src = "\
v0: f32[2,3,4] = input{name=\"x\"}
v1: i64[3] = shape{start=0, end=3} v0
v2: i64[] = const [0]
v3: i64[] = gather{axis=0} v1, v2
v4: i64[1] = reshape{shape=[1]} v3
v5: i64[1] = const [12]
v6: i64[2] = concat{axis=0} v4, v5
v7: f32[2,12] = reshape{shape=[2, 12]} v0
v8: i64[2] = cast{to=i64} v6
output \"y\" = v7
output \"s\" = v8
";
        let out = canon(src);
        assert!(!out.contains("= shape{"), "{out}");
        assert!(!out.contains("gather"), "{out}");
        assert!(out.contains("const [2, 12]"), "{out}");
    }

    #[test]
    fn identity_and_noop_cast_are_bypassed_and_dead_code_goes() {
        let src = "\
v0: f32[4] = input{name=\"x\"}
v1: f32[4] = identity v0
v2: f32[4] = cast{to=f32} v1
v3: f32[4] = exp v2
v4: f32[4] = neg v0
output \"y\" = v3
";
        let g = text::parse(src).unwrap();
        let (c, stats) = canonicalize(&g).unwrap();
        assert_eq!(stats.bypassed, 2);
        assert!(stats.dead >= 3);
        assert_eq!(text::print(&c), "v0: f32[4] = input{name=\"x\"}\nv1: f32[4] = exp v0\noutput \"y\" = v1\n");
    }

    #[test]
    fn folding_keeps_values() {
        let src = "\
v0: f32[2] = input{name=\"x\"}
v1: f32[2] = const [1.0, 4.0]
v2: f32[2] = sqrt v1
v3: f32[2] = add v0, v2
output \"y\" = v3
";
        let out = canon(src);
        assert!(out.contains("const [1.0, 2.0]"), "{out}");
    }
}
