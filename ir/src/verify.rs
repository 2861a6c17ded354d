//! The verifier: checks the invariants every pass and backend relies on.

use crate::graph::Graph;
use crate::op::Op;
use crate::IrError;

/// Checks that the graph is acyclic, every input of a node is produced by a
/// live node, every node's recorded types are what inference says, and every
/// graph output is live.
pub fn verify(g: &Graph) -> Result<(), IrError> {
    let order = g.topo_order()?;
    let live: std::collections::HashSet<_> = order.iter().copied().collect();
    for &n in &order {
        let node = g.node(n);
        let err = |msg: String| IrError::new(&node.label, node.op.name(), msg);
        for &v in &node.inputs {
            if v.0 as usize >= g.value_count() || !live.contains(&g.producer(v)) {
                return Err(err(format!("reads {v}, which no live node produces")));
            }
        }
        if matches!(node.op, Op::Input { .. }) {
            continue;
        }
        let in_types: Vec<_> = node.inputs.iter().map(|&v| g.ty(v)).collect();
        let inferred = crate::ops::infer(&node.op, &in_types).map_err(err)?;
        let recorded: Vec<_> = node.outputs.iter().map(|&v| g.ty(v).clone()).collect();
        if inferred != recorded {
            let show = |ts: &[crate::Type]| ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
            return Err(err(format!(
                "records output types ({}) but inference gives ({})",
                show(&recorded),
                show(&inferred)
            )));
        }
    }
    for (name, v) in g.outputs() {
        if v.0 as usize >= g.value_count() || !live.contains(&g.producer(*v)) {
            return Err(IrError::new(
                name,
                "output",
                format!("graph output `{name}` is {v}, which no live node produces"),
            ));
        }
    }
    Ok(())
}
