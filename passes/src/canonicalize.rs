//! Canonicalisation: constant folding, no-op removal, dead code removal.
//!
//! After it, no op reads only constants (up to a size limit), the shape
//! arithmetic exporters write (Shape -> Gather -> Unsqueeze -> Concat ->
//! Reshape) is gone, and Identity, same-type Cast, same-shape Reshape and
//! identity Transpose are bypassed. A `GatherND` with constant indices
//! becomes a `Gather`. Later stages can then pattern-match on the
//! computation itself.

use egret_ir::{Graph, IrError, NodeId, Op, Tensor, ValueId};

/// Folding a node whose output is larger than this would bloat the model
/// (think of an `Expand` of a scalar to a large mask); such nodes stay.
const FOLD_LIMIT: usize = 1 << 22;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CanonStats {
    pub folded: usize,
    pub bypassed: usize,
    pub dead: usize,
    /// `GatherND`s with constant indices rewritten as `Gather`s.
    pub gathers: usize,
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
        } else if gather_nd_as_gather(&mut g, n)? {
            stats.gathers += 1;
        }
    }
    stats.dead = remove_dead(&mut g)?;
    let g = g.compacted()?;
    egret_ir::verify(&g)?;
    Ok((g, stats))
}

/// If node `n` computes exactly one of its inputs (its first, or `x` of
/// `1 * x`), that input.
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
        // x * 1 = x exactly for every float x (NaN, infinities and -0 too),
        // when the one broadcasts nothing: the legacy exporter's baddbmm
        // writes `bias * beta` with beta = 1.
        Op::Mul if node.inputs.len() == 2 => {
            let one = |v: ValueId| {
                g.const_value(v).is_some_and(|t| t.dtype().is_float() && t.numel() == 1 && t.to_f64_vec()[0] == 1.0)
            };
            let out = g.ty(node.outputs[0]);
            let (a, b) = (node.inputs[0], node.inputs[1]);
            return if one(b) && g.ty(a) == out {
                Some(a)
            } else if one(a) && g.ty(b) == out {
                Some(b)
            } else {
                None
            };
        }
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
    if node.outputs.iter().any(|&v| g.ty(v).checked_numel().is_none_or(|n| n > FOLD_LIMIT)) {
        return Ok(false);
    }
    // A known result can still depend on a symbol (a slice of a constant
    // table at a decoder's past length): it is computed when the symbol has
    // a value, not here.
    if node.op.dims().iter().any(|d| !d.is_known()) {
        return Ok(false);
    }
    let values = match &node.op {
        Op::Shape { start, end } => {
            // A symbolic dim folds once the graph is bound.
            let Some(s) = egret_ir::known_shape(&g.ty(node.inputs[0]).shape[*start..*end]) else { return Ok(false) };
            vec![egret_ir::Tensor::from_vec(vec![end - start], s.iter().map(|&d| d as i64).collect())]
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

/// A `GatherND` with constant indices and no batch dims (the dynamo
/// exporter builds attention masks with one) as a `Gather` over the data
/// with its indexed leading axes flattened into one: each index tuple
/// becomes one flat index, checked here. Lowering has a native gather and
/// no native GatherND.
fn gather_nd_as_gather(g: &mut Graph, n: NodeId) -> Result<bool, IrError> {
    let node = g.node(n).clone();
    let Op::GatherND { batch_dims: 0 } = node.op else { return Ok(false) };
    let (data, indices) = (node.inputs[0], node.inputs[1]);
    let Some(idx) = g.const_value(indices).cloned() else { return Ok(false) };
    let Some(shape) = g.ty(data).known_shape() else { return Ok(false) };
    let tuples_shape = &idx.shape()[..idx.rank().saturating_sub(1)];
    let q = idx.shape().last().copied().unwrap_or(0);
    if q == 0 || q > shape.len() {
        return Ok(false);
    }
    let strides = egret_ir::strides_of(&shape[..q]);
    let mut flat = Vec::with_capacity(idx.numel() / q);
    for tuple in idx.to_i64_vec().chunks(q) {
        let mut at = 0;
        for (j, &i) in tuple.iter().enumerate() {
            let len = shape[j] as i64;
            let k = if i < 0 { i + len } else { i };
            if !(0..len).contains(&k) {
                let message = format!("index {i} is out of range for axis {j} of length {len}");
                return Err(IrError::new(&node.label, node.op.name(), message));
            }
            at += k as usize * strides[j];
        }
        flat.push(at as i64);
    }
    let mut flat_shape = vec![shape[..q].iter().product::<usize>()];
    flat_shape.extend(&shape[q..]);
    let flattened = g.add(Op::Reshape { shape: egret_ir::dims_of(&flat_shape) }, &[data], &node.label)?;
    let positions = g.add_const(Tensor::from_vec(tuples_shape.to_vec(), flat), &node.label);
    let gathered = g.add(Op::Gather { axis: 0 }, &[flattened, positions], &node.label)?;
    g.replace_all_uses(node.outputs[0], gathered);
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
    fn a_product_with_a_scalar_one_is_bypassed_unless_the_one_broadcasts() {
        let src = "\
v0: f32[2,3] = input{name=\"x\"}
v1: f32[] = const [1.0]
v2: f32[2,3] = mul v1, v0
v3: f32[1,1,1] = const [1.0]
v4: f32[1,2,3] = mul v2, v3
v5: f32[] = const [2.0]
v6: f32[2,3] = mul v0, v5
output \"y\" = v4
output \"z\" = v6
";
        let out = canon(src);
        // The first one goes; the second adds a dim and the two stays.
        assert_eq!(out.matches("= mul").count(), 2, "{out}");
        assert!(out.contains("mul v0, "), "{out}");
    }

    #[test]
    fn gather_nd_with_constant_indices_becomes_a_gather_of_the_same_values() {
        // Tuples of two indices into [3, 4, 2] (one negative), in a [2, 2] grid.
        let src = "\
v0: f32[3,4,2] = input{name=\"x\"}
v1: i64[2,2,2] = const [0, 1, 2, -1, 1, 0, 2, 3]
v2: f32[2,2,2] = gather_nd{batch_dims=0} v0, v1
output \"y\" = v2
";
        let g = text::parse(src).unwrap();
        let (c, stats) = canonicalize(&g).unwrap();
        assert_eq!(stats.gathers, 1);
        let printed = text::print(&c);
        assert!(!printed.contains("gather_nd") && printed.contains("gather{axis=0}"), "{printed}");
        let x = Tensor::from_vec(vec![3, 4, 2], (0..24).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<f32>>());
        assert_eq!(run(&c, &x), run(&g, &x));
    }

    /// The graph's one output for its one input, op by op.
    fn run(g: &Graph, x: &Tensor) -> Tensor {
        let mut values: std::collections::HashMap<ValueId, Tensor> = Default::default();
        for n in g.topo_order().unwrap() {
            let node = g.node(n);
            let outs = match &node.op {
                Op::Input { .. } => vec![x.clone()],
                Op::Const(t) => vec![(**t).clone()],
                op => {
                    let ins: Vec<&Tensor> = node.inputs.iter().map(|v| &values[v]).collect();
                    egret_ir::eval_op(op, &ins).unwrap()
                }
            };
            values.extend(node.outputs.iter().copied().zip(outs));
        }
        values.remove(&g.outputs()[0].1).unwrap()
    }

    #[test]
    fn gather_nd_with_an_out_of_range_constant_index_names_the_node() {
        let src = "\
v0: f32[3,4] = input{name=\"x\"}
v1: i64[1,2] = const [1, 4]
v2: f32[1] = gather_nd{batch_dims=0} v0, v1  # mask_gather
output \"y\" = v2
";
        let err = canonicalize(&text::parse(src).unwrap()).unwrap_err().to_string();
        assert!(err.contains("mask_gather") && err.contains("index 4 is out of range"), "{err}");
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
