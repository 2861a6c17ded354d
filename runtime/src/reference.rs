//! The reference backend: the IR's `eval`, node by node.

use crate::{Executable, RunError};
use egret_ir::{Graph, IrError, NodeId, Op, Tensor, ValueId};
use std::sync::Arc;

pub struct ReferenceExecutable {
    graph: Graph,
    order: Vec<NodeId>,
    /// For each step of `order`, the values no later step reads: freed after it.
    frees: Vec<Vec<ValueId>>,
    /// For a graph with symbolic dims, its inputs' names and types: each
    /// run binds the dims from its inputs' shapes and evaluates the bound graph.
    symbolic: Option<Vec<(String, egret_ir::Type)>>,
}

impl ReferenceExecutable {
    pub fn new(graph: Graph) -> Result<ReferenceExecutable, IrError> {
        egret_ir::verify(&graph)?;
        let order = graph.topo_order()?;
        let mut last_use = vec![usize::MAX; graph.value_count()];
        for (step, &n) in order.iter().enumerate() {
            for v in &graph.node(n).inputs {
                last_use[v.0 as usize] = step;
            }
        }
        for (_, v) in graph.outputs() {
            last_use[v.0 as usize] = usize::MAX;
        }
        let mut frees = vec![vec![]; order.len()];
        for (v, &step) in last_use.iter().enumerate() {
            if step != usize::MAX {
                frees[step].push(ValueId(v as u32));
            }
        }
        let symbolic = (!graph.is_bound()).then(|| crate::Signature::of(&graph, vec![]).inputs);
        Ok(ReferenceExecutable { graph, order, frees, symbolic })
    }

    /// The graph with its symbols given the values these inputs have.
    fn bound_for(
        &self,
        declared: &[(String, egret_ir::Type)],
        inputs: &[Tensor],
    ) -> Result<ReferenceExecutable, RunError> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
        let values = crate::solve_dims(declared, &shapes)?;
        let eval_err = |e: IrError| RunError::Eval { node: e.node, op: e.op, message: e.message };
        let bound = self.graph.bind(&|s| values.get(s).copied()).map_err(eval_err)?;
        ReferenceExecutable::new(bound).map_err(eval_err)
    }
}

impl Executable for ReferenceExecutable {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        if let Some(declared) = &self.symbolic {
            return self.bound_for(declared, &inputs)?.run(inputs);
        }
        let g = &self.graph;
        let mut values: Vec<Option<Arc<Tensor>>> = vec![None; g.value_count()];
        for (&v, t) in g.inputs().iter().zip(inputs) {
            values[v.0 as usize] = Some(Arc::new(t));
        }
        for (step, &n) in self.order.iter().enumerate() {
            let node = g.node(n);
            match &node.op {
                Op::Input { .. } => {}
                Op::Const(t) => values[node.outputs[0].0 as usize] = Some(t.clone()),
                op => {
                    let args: Vec<&Tensor> = node
                        .inputs
                        .iter()
                        .map(|v| values[v.0 as usize].as_deref().expect("topological order"))
                        .collect();
                    let outs = egret_ir::eval_op(op, &args).map_err(|message| RunError::Eval {
                        node: node.label.clone(),
                        op: op.name().to_string(),
                        message,
                    })?;
                    for (v, t) in node.outputs.iter().zip(outs) {
                        values[v.0 as usize] = Some(Arc::new(t));
                    }
                }
            }
            for v in &self.frees[step] {
                values[v.0 as usize] = None;
            }
        }
        let outs: Vec<Arc<Tensor>> =
            g.outputs().iter().map(|(_, v)| values[v.0 as usize].clone().expect("outputs are computed")).collect();
        // Dropping the table first lets unshared outputs move out without a copy.
        drop(values);
        Ok(outs.into_iter().map(Arc::unwrap_or_clone).collect())
    }
}
