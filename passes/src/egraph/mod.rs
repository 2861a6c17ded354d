//! The e-graph optimiser.
//!
//! A canonical graph becomes an egg `EGraph` over `TNode`s: each IR op is an
//! e-node named after the op, whose first child (for ops with attributes)
//! is a leaf holding the attributes as text (`{axis=2,epsilon=1e-5}`) and
//! whose other children are its inputs. Graph inputs and constants are leaves
//! too (`input:NAME`, `const:N`). Keeping attributes as leaves lets rules bind
//! them (`(reduce ?r ?x)`) and check them with side conditions.
//!
//! `TensorAnalysis` gives every e-class its types and, for small tensors, its
//! constant value, computed with the IR's own `infer` and `eval`: rules ask
//! "is this scalar 0.5?" or "is this a mean over the trailing axes?" of it.
//!
//! Saturation runs rule sets in stages (algebra that normalises exporter
//! variants, then fusion), bounded by node, iteration and time limits.
//! Extraction is DAG-aware (`extract.rs`): a sub-expression shared by two
//! users is paid for once.

mod extract;
pub mod rules;

use egg::{Analysis, DidMerge, EGraph, FromOp, Id, Language, Symbol};
use egret_ir::{Graph, IrError, Op, Tensor, Type, ValueId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An e-node: an op (or leaf) name and its children.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TNode {
    pub op: Symbol,
    pub children: Vec<Id>,
}

impl Language for TNode {
    type Discriminant = (Symbol, usize);
    fn discriminant(&self) -> Self::Discriminant {
        (self.op, self.children.len())
    }
    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }
    fn children(&self) -> &[Id] {
        &self.children
    }
    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for TNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op.as_str())
    }
}

impl FromOp for TNode {
    type Error = std::convert::Infallible;
    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, Self::Error> {
        Ok(TNode { op: op.into(), children })
    }
}

impl TNode {
    pub fn leaf(op: &str) -> TNode {
        TNode { op: op.into(), children: vec![] }
    }
    fn is_attrs(&self) -> bool {
        self.op.as_str().starts_with('{')
    }
}

/// What the analysis knows about an e-class.
#[derive(Debug, Clone, Default)]
pub struct Info {
    /// The types of the values the class computes (one for most ops; empty
    /// for attribute leaves and for nodes inference rejects).
    pub types: Vec<Type>,
    /// The value, when it is a constant small enough to carry.
    pub value: Option<Arc<Tensor>>,
    /// For attribute leaves: the attribute text.
    pub attrs: Option<String>,
    /// The name of a graph node the class came from, for the rebuilt graph.
    pub label: Option<String>,
    /// Whether the class is computed from constants alone (whatever its size).
    pub constant: bool,
}

impl Info {
    pub fn ty(&self) -> Option<&Type> {
        self.types.first()
    }

    /// The value as an f64 if the class is a one-element constant.
    pub fn scalar(&self) -> Option<f64> {
        self.value.as_ref().filter(|t| t.numel() == 1).map(|t| t.to_f64_vec()[0])
    }
}

/// Constants no larger than this are folded and carried in the analysis.
const FOLD_LIMIT: usize = 64;

#[derive(Default)]
pub struct TensorAnalysis {
    pub inputs: HashMap<String, Type>,
    pub constants: Vec<Arc<Tensor>>,
    /// The leaf index of each constant rules introduced, by its type and bytes.
    introduced: HashMap<(Type, Vec<u8>), usize>,
}

impl TensorAnalysis {
    /// The leaf of a new constant (the graph's own constants, shared with
    /// the graph: a model's weights are never copied into the e-graph).
    pub fn constant_leaf(&mut self, t: Arc<Tensor>) -> TNode {
        self.constants.push(t);
        TNode::leaf(&format!("const:{}", self.constants.len() - 1))
    }

    /// The leaf of a constant a rule introduces, the same leaf for the same
    /// value: a rule that fires again on every iteration then adds no new
    /// e-node, and the search can saturate.
    pub fn introduced_leaf(&mut self, t: Tensor) -> TNode {
        let key = (t.ty(), t.to_bytes());
        let index = match self.introduced.get(&key) {
            Some(&i) => i,
            None => {
                self.constants.push(Arc::new(t));
                self.introduced.insert(key, self.constants.len() - 1);
                self.constants.len() - 1
            }
        };
        TNode::leaf(&format!("const:{index}"))
    }

    /// `introduced_leaf` of an f32 scalar.
    pub fn scalar_leaf(&mut self, x: f32) -> TNode {
        self.introduced_leaf(Tensor::from_vec(vec![], vec![x]))
    }
}

pub type TGraph = EGraph<TNode, TensorAnalysis>;

/// The IR op an e-node stands for, with the attribute text of its first
/// child (if that child is an attribute leaf) and the indices of its inputs.
pub fn op_of(egraph: &TGraph, n: &TNode) -> Option<(Op, usize)> {
    let name = n.op.as_str();
    if name.starts_with('{') || name.starts_with("input:") || name.starts_with("const:") || name == "out" {
        return None;
    }
    let (attrs, first_input) = match n.children.first().and_then(|&c| egraph[c].data.attrs.clone()) {
        Some(a) => (a, 1),
        None => (String::new(), 0),
    };
    egret_ir::text::op_from_parts(name, &attrs).ok().map(|op| (op, first_input))
}

impl Analysis<TNode> for TensorAnalysis {
    type Data = Info;

    fn make(egraph: &mut TGraph, n: &TNode, _id: Id) -> Info {
        let name = n.op.as_str();
        if n.is_attrs() {
            return Info { attrs: Some(name.to_string()), ..Info::default() };
        }
        if let Some(input) = name.strip_prefix("input:") {
            return Info { types: egraph.analysis.inputs.get(input).cloned().into_iter().collect(), ..Info::default() };
        }
        if let Some(k) = name.strip_prefix("const:") {
            let t = k.parse::<usize>().ok().and_then(|k| egraph.analysis.constants.get(k).cloned());
            return match t {
                Some(t) => Info { types: vec![t.ty()], value: Some(t), constant: true, ..Info::default() },
                None => Info::default(),
            };
        }
        if name == "out" {
            // (out {index=K} node): output K of a multi-output op.
            let index = n
                .children
                .first()
                .and_then(|&c| egraph[c].data.attrs.clone())
                .and_then(|a| a.trim_start_matches("{index=").trim_end_matches('}').parse::<usize>().ok());
            let types = match (index, n.children.get(1)) {
                (Some(k), Some(&c)) => egraph[c].data.types.get(k).cloned().into_iter().collect(),
                _ => vec![],
            };
            return Info { types, ..Info::default() };
        }
        let Some((op, first)) = op_of(egraph, n) else { return Info::default() };
        let inputs = &n.children[first..];
        let types: Option<Vec<Type>> = inputs.iter().map(|&c| egraph[c].data.ty().cloned()).collect();
        let Some(types) = types else { return Info::default() };
        let refs: Vec<&Type> = types.iter().collect();
        let Ok(out) = egret_ir::ops::infer(&op, &refs) else { return Info::default() };
        // Fold small constants so rules can read values computed from them.
        let value = if out.len() == 1 && out[0].checked_numel().is_some_and(|n| n <= FOLD_LIMIT) {
            let values: Option<Vec<Arc<Tensor>>> = inputs.iter().map(|&c| egraph[c].data.value.clone()).collect();
            values.and_then(|vs| {
                let refs: Vec<&Tensor> = vs.iter().map(|t| &**t).collect();
                egret_ir::eval_op(&op, &refs).ok().map(|mut r| Arc::new(r.remove(0)))
            })
        } else {
            None
        };
        let constant = inputs.iter().all(|&c| egraph[c].data.constant);
        Info { types: out, value, constant, ..Info::default() }
    }

    fn merge(&mut self, a: &mut Info, b: Info) -> DidMerge {
        let mut changed_a = false;
        if a.types.is_empty() && !b.types.is_empty() {
            a.types = b.types;
            changed_a = true;
        }
        if a.value.is_none() && b.value.is_some() {
            a.value = b.value;
            changed_a = true;
        }
        if a.label.is_none() && b.label.is_some() {
            a.label = b.label;
        }
        if !a.constant && b.constant {
            a.constant = true;
            changed_a = true;
        }
        DidMerge(changed_a, true)
    }
}

/// The e-graph of a graph, and the e-class of each graph output.
pub fn to_egraph(g: &Graph) -> Result<(TGraph, Vec<(String, Id)>), IrError> {
    let mut analysis = TensorAnalysis::default();
    for &v in g.inputs() {
        analysis.inputs.insert(g.input_name(v).to_string(), g.ty(v).clone());
    }
    let mut eg = TGraph::new(analysis);
    let mut class: HashMap<ValueId, Id> = HashMap::new();
    for n in g.topo_order()? {
        let node = g.node(n);
        let id = match &node.op {
            Op::Input { name } => eg.add(TNode::leaf(&format!("input:{name}"))),
            Op::Const(t) => {
                let leaf = eg.analysis.constant_leaf(t.clone());
                eg.add(leaf)
            }
            op => rules::add_op(&mut eg, op, node.inputs.iter().map(|v| class[v]).collect()),
        };
        if eg[id].data.label.is_none() && !node.label.is_empty() {
            eg[id].data.label = Some(node.label.clone());
        }
        if node.outputs.len() == 1 {
            class.insert(node.outputs[0], id);
        } else {
            for (k, &v) in node.outputs.iter().enumerate() {
                let out = rules::add_output(&mut eg, id, k);
                // Each output carries the node's label too: a rule may
                // rebuild an output from a new node (a residual norm).
                if eg[out].data.label.is_none() && !node.label.is_empty() {
                    eg[out].data.label = Some(node.label.clone());
                }
                class.insert(v, out);
            }
        }
    }
    let roots = g.outputs().iter().map(|(name, v)| (name.clone(), class[v])).collect();
    Ok((eg, roots))
}

/// Limits on the search.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
    /// The most classes extraction prices DAG-aware (a bit per class per
    /// class); above it, tree costs.
    pub dag_classes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nodes: 200_000,
            iterations: 12,
            time: Duration::from_millis(400),
            dag_classes: extract::MAX_DAG_CLASSES,
        }
    }
}

/// What the optimiser did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Rule name to the number of times it fired.
    pub rules: Vec<(String, usize)>,
    /// Fused op kind to how many the extracted graph holds.
    pub fusions: Vec<(String, usize)>,
    pub saturate_ms: f64,
    pub extract_ms: f64,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    /// Whether extraction priced shared sub-expressions once (false: the
    /// e-graph had more than `Limits::dag_classes` classes, and tree
    /// costs were used).
    pub dag_extraction: bool,
}

/// Optimises a canonical graph with the e-graph; returns the extracted
/// graph (verified) and a report.
pub fn optimize(g: &Graph, limits: Limits) -> Result<(Graph, Report), IrError> {
    let (eg, roots) = to_egraph(g)?;
    let t = Instant::now();
    let mut report = Report::default();
    let mut fired: HashMap<String, usize> = HashMap::new();
    let mut egraph = eg;
    for stage in rules::stages() {
        let runner = egg::Runner::default()
            .with_egraph(egraph)
            .with_node_limit(limits.nodes)
            .with_iter_limit(limits.iterations)
            .with_time_limit(limits.time)
            .run(stage);
        for it in &runner.iterations {
            for (rule, n) in &it.applied {
                *fired.entry(rule.to_string()).or_default() += n;
            }
        }
        egraph = runner.egraph;
    }
    egraph.rebuild();
    report.saturate_ms = t.elapsed().as_secs_f64() * 1e3;
    report.egraph_nodes = egraph.total_number_of_nodes();
    report.egraph_classes = egraph.number_of_classes();
    let t = Instant::now();
    let root_ids: Vec<Id> = roots.iter().map(|(_, id)| *id).collect();
    let (choice, dag) = extract::extract(&egraph, &root_ids, limits.dag_classes);
    report.dag_extraction = dag;
    let out = extract::rebuild(&egraph, &choice, g, &roots)?;
    report.extract_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut rules: Vec<(String, usize)> = fired.into_iter().filter(|(_, n)| *n > 0).collect();
    rules.sort();
    report.rules = rules;
    report.fusions = count_fused(&out);
    Ok((out, report))
}

/// The tilings the cost model chose for the graph's products and
/// attentions, with counts.
pub fn count_tilings(g: &Graph) -> Vec<(String, usize)> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for n in g.node_ids() {
        match &g.node(n).op {
            Op::MatMulTiled { tiling } => *counts.entry(format!("matmul {}", tiling.word())).or_default() += 1,
            Op::AttentionTiled { block, key_block, .. } => {
                *counts.entry(format!("attention {block}x{key_block}")).or_default() += 1
            }
            _ => {}
        }
    }
    counts.into_iter().collect()
}

/// Fused op kinds in a graph, with counts.
pub fn count_fused(g: &Graph) -> Vec<(String, usize)> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for n in g.node_ids() {
        // A tiled attention is an attention with its tile sizes chosen.
        let name = match g.node(n).op.name() {
            "attention_tiled" => "attention",
            other => other,
        };
        if matches!(name, "attention" | "layer_norm" | "rms_norm" | "residual_norm" | "gelu" | "silu" | "softmax") {
            *counts.entry(name.to_string()).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}
