//! The graph: a petgraph DAG of op nodes over typed values.
//!
//! Nodes own their input list (ordered, as an op sees it) and output list; the
//! petgraph edges mirror the producer -> consumer relation so that topological
//! order, cycle detection and use lists come from petgraph. Every value has a
//! producer node: graph inputs are `input` nodes and weights are `const` nodes,
//! which keeps "where does this value come from" a single question.

use crate::dim::Dim;
use crate::dtype::Type;
use crate::op::Op;
use crate::tensor::Tensor;
use crate::IrError;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::fmt;
use std::sync::Arc;

/// A value (an SSA tensor), printed `v7` as in the text format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A node, printed `n3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub NodeIndex<u32>);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0.index())
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Where the node came from (the ONNX node name), for error messages.
    pub label: String,
}

#[derive(Clone, Debug)]
pub struct ValueData {
    pub ty: Type,
    pub producer: NodeId,
    /// The output slot of the producer.
    pub slot: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    nodes: StableDiGraph<Node, usize, u32>,
    values: Vec<ValueData>,
    inputs: Vec<ValueId>,
    outputs: Vec<(String, ValueId)>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds a graph input called `name`.
    pub fn add_input(&mut self, name: &str, ty: Type) -> ValueId {
        let node = self.insert(Op::Input { name: name.to_string() }, vec![], vec![ty], name.to_string());
        let v = self.node(node).outputs[0];
        self.inputs.push(v);
        v
    }

    pub fn add_const(&mut self, t: Tensor, label: &str) -> ValueId {
        self.add_const_shared(Arc::new(t), label)
    }

    /// `add_const` of a tensor others hold too (an importer's table of known
    /// values), without a copy.
    pub fn add_const_shared(&mut self, t: Arc<Tensor>, label: &str) -> ValueId {
        let ty = t.ty();
        let node = self.insert(Op::Const(t), vec![], vec![ty], label.to_string());
        self.node(node).outputs[0]
    }

    /// Adds a node, inferring its output types. `label` names it in errors.
    pub fn add_node(&mut self, op: Op, inputs: &[ValueId], label: &str) -> Result<Vec<ValueId>, IrError> {
        if matches!(op, Op::Input { .. }) {
            return Err(IrError::new(label, op.name(), "use Graph::add_input for graph inputs"));
        }
        for &v in inputs {
            if v.0 as usize >= self.values.len() {
                return Err(IrError::new(label, op.name(), format!("input {v} does not exist")));
            }
        }
        let in_types: Vec<&Type> = inputs.iter().map(|&v| &self.values[v.0 as usize].ty).collect();
        let out_types = crate::ops::infer(&op, &in_types).map_err(|msg| IrError::new(label, op.name(), msg))?;
        // A known shape past `MAX_ELEMENTS` (an `Expand` to `[2^40, 3]`) is
        // refused where it is made, before anything allocates it.
        if let Some(ty) = out_types.iter().find(|t| t.is_known() && t.checked_numel().is_none()) {
            return Err(IrError::new(label, op.name(), format!("output shape {ty} is too large")));
        }
        let node = self.insert(op, inputs.to_vec(), out_types, label.to_string());
        Ok(self.node(node).outputs.clone())
    }

    /// Like `add_node` for single-output ops.
    pub fn add(&mut self, op: Op, inputs: &[ValueId], label: &str) -> Result<ValueId, IrError> {
        Ok(self.add_node(op, inputs, label)?[0])
    }

    fn insert(&mut self, op: Op, inputs: Vec<ValueId>, out_types: Vec<Type>, label: String) -> NodeId {
        let idx = self.nodes.add_node(Node { op, inputs: inputs.clone(), outputs: vec![], label });
        let id = NodeId(idx);
        let mut outs = Vec::with_capacity(out_types.len());
        for (slot, ty) in out_types.into_iter().enumerate() {
            let v = ValueId(self.values.len() as u32);
            self.values.push(ValueData { ty, producer: id, slot });
            outs.push(v);
        }
        self.nodes[idx].outputs = outs;
        for (slot, v) in inputs.iter().enumerate() {
            let p = self.values[v.0 as usize].producer;
            self.nodes.add_edge(p.0, idx, slot);
        }
        id
    }

    pub fn set_output(&mut self, name: &str, v: ValueId) {
        self.outputs.push((name.to_string(), v));
    }

    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[(String, ValueId)] {
        &self.outputs
    }

    /// The name a graph input was declared with.
    pub fn input_name(&self, v: ValueId) -> &str {
        match &self.node(self.producer(v)).op {
            Op::Input { name } => name,
            _ => "",
        }
    }

    pub fn node(&self, n: NodeId) -> &Node {
        &self.nodes[n.0]
    }

    pub fn node_mut(&mut self, n: NodeId) -> &mut Node {
        &mut self.nodes[n.0]
    }

    pub fn ty(&self, v: ValueId) -> &Type {
        &self.values[v.0 as usize].ty
    }

    pub fn producer(&self, v: ValueId) -> NodeId {
        self.values[v.0 as usize].producer
    }

    pub fn value(&self, v: ValueId) -> &ValueData {
        &self.values[v.0 as usize]
    }

    /// The constant a value holds, if its producer is a `const` node.
    pub fn const_value(&self, v: ValueId) -> Option<&Arc<Tensor>> {
        match &self.node(self.producer(v)).op {
            Op::Const(t) => Some(t),
            _ => None,
        }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.node_count()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.node_indices().map(NodeId)
    }

    /// Nodes in topological order, ties broken by creation order, so the
    /// order is deterministic and a compacted graph lists its nodes in id
    /// order. Fails on a cycle, naming a node on it.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, IrError> {
        use std::cmp::Reverse;
        let mut indeg: std::collections::HashMap<NodeIndex<u32>, usize> = self
            .nodes
            .node_indices()
            .map(|n| (n, self.nodes.neighbors_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: std::collections::BinaryHeap<Reverse<NodeIndex<u32>>> =
            indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| Reverse(n)).collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(NodeId(n));
            // One decrement per edge: a consumer reading a value twice has two edges.
            for m in self.nodes.neighbors_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&m).expect("every node has an in-degree");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(m));
                }
            }
        }
        if order.len() < indeg.len() {
            let placed: std::collections::HashSet<_> = order.iter().map(|n| n.0).collect();
            let stuck = self.nodes.node_indices().find(|n| !placed.contains(n)).expect("a node is left");
            let n = &self.nodes[stuck];
            return Err(IrError::new(&n.label, n.op.name(), "the graph has a cycle through this node"));
        }
        Ok(order)
    }

    /// Nodes that read any output of `n`.
    pub fn consumers(&self, n: NodeId) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = self.nodes.neighbors_directed(n.0, Direction::Outgoing).map(NodeId).collect();
        out.sort();
        out.dedup();
        out
    }

    /// How many times `v` is read, by nodes and graph outputs.
    pub fn use_count(&self, v: ValueId) -> usize {
        let p = self.producer(v);
        let by_nodes = self
            .nodes
            .edges_directed(p.0, Direction::Outgoing)
            .filter(|e| self.nodes[e.target()].inputs[*e.weight()] == v)
            .count();
        by_nodes + self.outputs.iter().filter(|(_, o)| *o == v).count()
    }

    /// Makes every reader of `old` read `new` instead (graph outputs included).
    pub fn replace_all_uses(&mut self, old: ValueId, new: ValueId) {
        if old == new {
            return;
        }
        let p_old = self.producer(old);
        let p_new = self.producer(new);
        let edges: Vec<_> = self
            .nodes
            .edges_directed(p_old.0, Direction::Outgoing)
            .filter(|e| self.nodes[e.target()].inputs[*e.weight()] == old)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (e, target, slot) in edges {
            self.nodes.remove_edge(e);
            self.nodes[target].inputs[slot] = new;
            self.nodes.add_edge(p_new.0, target, slot);
        }
        for (_, o) in self.outputs.iter_mut() {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Removes a node; its outputs must be unused. Its value ids stay
    /// allocated (and dangling) until `compacted`.
    pub fn remove_node(&mut self, n: NodeId) {
        let is_input = matches!(self.nodes[n.0].op, Op::Input { .. });
        if is_input {
            // Graph inputs are part of the signature; they are never removed.
            return;
        }
        self.nodes.remove_node(n.0);
    }

    /// A copy with dense value ids in topological order (inputs first), as
    /// the text format prints them. Passes call this when they finish.
    pub fn compacted(&self) -> Result<Graph, IrError> {
        let mut g = Graph::new();
        let mut map = std::collections::HashMap::new();
        for &v in &self.inputs {
            let nv = g.add_input(self.input_name(v), self.ty(v).clone());
            map.insert(v, nv);
        }
        for n in self.topo_order()? {
            let node = self.node(n);
            if matches!(node.op, Op::Input { .. }) {
                continue;
            }
            let inputs: Vec<ValueId> = node.inputs.iter().map(|v| map[v]).collect();
            let types: Vec<Type> = node.outputs.iter().map(|&v| self.ty(v).clone()).collect();
            let id = g.insert(node.op.clone(), inputs, types, node.label.clone());
            for (old, new) in node.outputs.iter().zip(g.node(id).outputs.clone()) {
                map.insert(*old, new);
            }
        }
        for (name, v) in &self.outputs {
            g.set_output(name, map[v]);
        }
        Ok(g)
    }

    /// Builds a node with already known output types (the text parser, which
    /// then checks them against inference via the verifier).
    pub(crate) fn insert_typed(
        &mut self,
        op: Op,
        inputs: Vec<ValueId>,
        types: Vec<Type>,
        label: String,
    ) -> Vec<ValueId> {
        let is_input = matches!(op, Op::Input { .. });
        let id = self.insert(op, inputs, types, label);
        let outs = self.node(id).outputs.clone();
        if is_input {
            self.inputs.push(outs[0]);
        }
        outs
    }

    pub fn value_count(&self) -> usize {
        self.values.len()
    }

    /// The symbols the graph's types and attributes depend on, sorted.
    pub fn symbols(&self) -> Vec<String> {
        let mut out: Vec<String> = self.values.iter().flat_map(|v| crate::dim::shape_symbols(&v.ty.shape)).collect();
        for n in self.node_ids() {
            out.extend(self.node(n).op.dims().into_iter().flat_map(|d| d.symbols()));
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether every type and attribute is known (no symbolic dim).
    pub fn is_bound(&self) -> bool {
        self.symbols().is_empty()
    }

    /// A copy with the symbols `value` gives replaced by their values, every
    /// node's types inferred again. The importer's assumptions about the
    /// symbols (that a slice's bounds lie in its axis, that a reshape keeps
    /// the element count) are checked there by the same rules as for any
    /// known shape, so a value that breaks them is an error naming the node.
    pub fn bind(&self, value: &dyn Fn(&str) -> Option<usize>) -> Result<Graph, IrError> {
        let value = |s: &str| value(s).and_then(|v| i64::try_from(v).ok());
        let sub = |d: Dim, label: &str, op: &str| {
            d.substitute(&value).map_err(|e| IrError::new(label, op, format!("{d}: {e}")))
        };
        let mut g = Graph::new();
        let mut map = std::collections::HashMap::new();
        for &v in &self.inputs {
            let name = self.input_name(v);
            let shape = self.ty(v).shape.iter().map(|&d| sub(d, name, "input")).collect::<Result<Vec<_>, _>>()?;
            let ty = Type { dtype: self.ty(v).dtype, shape };
            if ty.is_known() && ty.checked_numel().is_none() {
                return Err(IrError::new(name, "input", format!("shape {ty} is too large")));
            }
            map.insert(v, g.add_input(name, ty));
        }
        for n in self.topo_order()? {
            let node = self.node(n);
            if matches!(node.op, Op::Input { .. }) {
                continue;
            }
            let op = node.op.map_dims(|d| sub(d, &node.label, node.op.name()))?;
            let inputs: Vec<ValueId> = node.inputs.iter().map(|v| map[v]).collect();
            let outs = g.add_node(op, &inputs, &node.label)?;
            for (old, new) in node.outputs.iter().zip(outs) {
                let ty = g.ty(new);
                if ty.is_known() && ty.checked_numel().is_none() {
                    return Err(IrError::new(&node.label, node.op.name(), format!("output shape {ty} is too large")));
                }
                map.insert(*old, new);
            }
        }
        for (name, v) in &self.outputs {
            g.set_output(name, map[v]);
        }
        Ok(g)
    }
}
