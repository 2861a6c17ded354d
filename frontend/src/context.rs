//! The import driver and the context a builder sees for one node.

use crate::registry;
use crate::symbolic::{self, Known, SymInts};
use crate::tensor::{carrier_from_onnx, dtype_from_onnx, tensor_from_proto, tensor_from_proto_in};
use crate::{ImportError, ImportOptions, Imported, MAX_OPSET, MIN_OPSET};
use egret_ir::{Dim, Graph, NarrowType, Op, Tensor, Type, ValueId};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::{AttributeProto, ModelProto, NodeProto};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// Known values larger than this are not evaluated during import: they are
/// never shape parameters, and the canonicaliser folds them later anyway.
const KNOWN_VALUE_LIMIT: usize = 1 << 16;

pub struct Importer<'a> {
    pub graph: Graph,
    names: HashMap<String, ValueId>,
    known: HashMap<ValueId, Arc<Tensor>>,
    /// Known integer values with symbolic elements (shapes of symbolic dims).
    known_dims: HashMap<ValueId, Arc<SymInts>>,
    pub opset: i64,
    base: Option<&'a Path>,
    specialized: Vec<(String, Tensor)>,
    /// The symbolic dims of the inputs and the sizes they were bound to.
    symbols: Vec<(String, usize)>,
    /// Integer values whose exact value the graph also holds in f32: the
    /// quantized ops compute their integers in f32 (exactly, below 2^24), and
    /// a consumer that wants floats reads this instead of a cast back.
    exact_f32: HashMap<ValueId, ValueId>,
    /// Values of a narrow type, held in its carrier (`egret_ir::narrow`):
    /// the quantizers read their range from it, `CastLike` its target.
    narrow: HashMap<ValueId, NarrowType>,
}

/// Half-precision values are computed in f32: a half constant is widened
/// where it enters the graph (lazily, `Tensor::widened`: a backend that
/// keeps the half elements never computes the f32 ones), and so is a half
/// input (by a cast), while a half output is narrowed back
/// (`Importer::run`).
fn widen(t: Tensor) -> Tensor {
    Tensor::widened(t)
}

/// An initializer decoded: its name, its value (half types widened, narrow
/// ones in their carrier) and the narrow type the file stores it in.
pub struct Weight {
    pub name: String,
    pub value: Arc<Tensor>,
    pub narrow: Option<NarrowType>,
}

/// Decodes every initializer of `model`, releasing each one's bytes in the
/// model as soon as it is decoded, so the model and its weights are never
/// both whole in memory.
/// Initializers whose `raw_data` the parse left in the model file are read
/// from `in_file` (the file, and each one's range in it); with `map`, those
/// and external data are mapped where they can be (`data_from_file`).
pub fn decode_initializers(
    model: &mut ModelProto,
    base: Option<&Path>,
    in_file: Option<(&std::fs::File, &[Option<std::ops::Range<u64>>])>,
    map: bool,
) -> Result<Vec<Weight>, ImportError> {
    let Some(g) = model.graph.as_mut() else { return Ok(vec![]) };
    let mut out = Vec::with_capacity(g.initializer.len());
    for (i, init) in g.initializer.iter_mut().enumerate() {
        let raw = in_file.and_then(|(file, ranges)| Some((file, ranges.get(i)?.clone()?)));
        let value = Arc::new(widen(tensor_from_proto_in(init, base, raw, map)?));
        out.push(Weight { name: init.name.clone(), value, narrow: crate::tensor::narrow_of(init) });
        // Only the name is read again.
        init.raw_data = Vec::new();
        init.float_data = Vec::new();
        init.int32_data = Vec::new();
        init.int64_data = Vec::new();
        init.double_data = Vec::new();
        init.uint64_data = Vec::new();
    }
    Ok(out)
}

impl<'a> Importer<'a> {
    pub fn run(
        model: &ModelProto,
        weights: &[Weight],
        base: Option<&'a Path>,
        opts: &ImportOptions,
        specialize: &HashSet<String>,
    ) -> Result<Imported, ImportError> {
        let g = model.graph.as_ref().ok_or(ImportError::NoGraph)?;
        let mut opset = None;
        for o in &model.opset_import {
            if o.domain.is_empty() || o.domain == "ai.onnx" {
                opset = Some(o.version);
            }
        }
        // ONNX says a model without an import of the default domain uses opset 1;
        // in practice such files predate everything we support.
        let opset = opset.unwrap_or(MIN_OPSET);
        if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
            return Err(ImportError::Opset { version: opset, min: MIN_OPSET, max: MAX_OPSET });
        }
        let mut imp = Importer {
            graph: Graph::new(),
            names: HashMap::new(),
            known: HashMap::new(),
            known_dims: HashMap::new(),
            opset,
            base,
            specialized: vec![],
            symbols: vec![],
            exact_f32: HashMap::new(),
            narrow: HashMap::new(),
        };

        for w in weights {
            let v = imp.graph.add_const_shared(w.value.clone(), &w.name);
            if let Some(t) = w.narrow {
                imp.narrow.insert(v, t);
            }
            imp.known.insert(v, w.value.clone());
            imp.names.insert(w.name.clone(), v);
        }
        if !g.sparse_initializer.is_empty() {
            return Err(ImportError::tensor("<sparse initializer>", "sparse initializers are not supported"));
        }
        imp.bind_inputs(g, opts, specialize)?;

        for n in topo_sort(g, &imp.names)? {
            imp.build_node(&g.node[n])?;
        }

        // The declared types of intermediate values are hints; one that
        // contradicts what the graph computes means a broken model (or a
        // wrong shape rule in Egret): either way, stop and name it.
        for info in &g.value_info {
            if let Some(&v) = imp.names.get(&info.name) {
                check_declared(&info.name, info, imp.graph.ty(v))?;
            }
        }
        for out in &g.output {
            let mut v =
                *imp.names.get(&out.name).ok_or_else(|| ImportError::UndefinedOutput { name: out.name.clone() })?;
            check_declared(&out.name, out, imp.graph.ty(v))?;
            // A half output, computed in f32, is narrowed to its declared type.
            if let Some(half) = declared_dtype(out).filter(|d| d.is_half()) {
                if imp.graph.ty(v).dtype == egret_ir::DType::F32 {
                    v = imp.graph.add_node(Op::Cast { to: half }, &[v], &out.name).map_err(|e| ImportError::Node {
                        node: e.node,
                        op: "Cast".into(),
                        opset,
                        message: e.message,
                    })?[0];
                }
            }
            imp.graph.set_output(&out.name, v);
        }
        if g.output.is_empty() {
            return Err(ImportError::UndefinedOutput { name: "<none: the graph declares no outputs>".into() });
        }
        egret_ir::verify(&imp.graph).map_err(|e| ImportError::Node {
            node: e.node,
            op: e.op,
            opset,
            message: e.message,
        })?;
        Ok(Imported {
            graph: imp.graph,
            specialized: imp.specialized,
            symbols: imp.symbols,
            opset,
            producer: model.producer_name.clone(),
        })
    }

    fn bind_inputs(
        &mut self,
        g: &onnx_protobuf::GraphProto,
        opts: &ImportOptions,
        specialize: &HashSet<String>,
    ) -> Result<(), ImportError> {
        use onnx_protobuf::tensor_shape_proto::dimension::Value as Dim;
        let mut dims = opts.dims.clone();
        let mut pending = Vec::new();
        for input in &g.input {
            if self.names.contains_key(&input.name) {
                // Older exporters list initializers among the inputs.
                continue;
            }
            let err = |m: String| ImportError::Input { input: input.name.clone(), message: m };
            let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) =
                input.type_.as_ref().and_then(|t| t.value.as_ref())
            else {
                return Err(err("only tensor inputs are supported (not sequences, maps or optionals)".into()));
            };
            let (dtype, narrow) = carrier_from_onnx(tt.elem_type).map_err(err)?;
            let given: Option<Vec<usize>> = opts
                .input_shapes
                .get(&input.name)
                .cloned()
                .or_else(|| opts.input_values.get(&input.name).map(|t| t.shape().to_vec()));
            // A given shape binds the input's symbols unless they are to stay
            // symbolic; its rank is checked either way.
            let (given, given_rank) = match given {
                Some(g) if opts.keep_symbolic && !specialize.contains(&input.name) => (None, Some(g.len())),
                g => {
                    let r = g.as_ref().map(|g| g.len());
                    (g, r)
                }
            };
            let shape: Vec<egret_ir::Dim> = match tt.shape.as_ref() {
                None => egret_ir::dims_of(
                    &given
                        .clone()
                        .ok_or_else(|| err("the model gives no shape; pass the input or its shape".into()))?,
                ),
                Some(sp) => {
                    if let Some(rank) = given_rank {
                        if rank != sp.dim.len() {
                            return Err(err(format!("has rank {rank} but the model declares rank {}", sp.dim.len())));
                        }
                    }
                    let mut shape = Vec::new();
                    for (i, d) in sp.dim.iter().enumerate() {
                        let from_given = given.as_ref().map(|gs| gs[i]);
                        let v = match &d.value {
                            Some(Dim::DimValue(v)) if *v >= 0 => {
                                if let Some(gv) = from_given {
                                    if gv != *v as usize {
                                        return Err(err(format!(
                                            "has shape {:?} but the model declares dim {i} = {v}",
                                            given.as_ref().unwrap()
                                        )));
                                    }
                                }
                                *v as usize
                            }
                            Some(Dim::DimParam(p)) => match (dims.get(p), from_given) {
                                (Some(&bound), Some(gv)) if bound != gv => {
                                    return Err(err(format!("dim `{p}` is {gv} here but {bound} elsewhere")));
                                }
                                (Some(&bound), _) => bound,
                                (None, Some(gv)) => {
                                    dims.insert(p.clone(), gv);
                                    gv
                                }
                                // Nothing gives it a value: it stays symbolic.
                                (None, None) => {
                                    shape.push(egret_ir::Dim::from_dim_param(p));
                                    continue;
                                }
                            },
                            // A dim with neither a value nor a name: a symbol of its own.
                            _ => match from_given {
                                Some(v) => v,
                                None => {
                                    shape.push(egret_ir::Dim::symbol(&format!("{}[{i}]", input.name)));
                                    continue;
                                }
                            },
                        };
                        if let Some(Dim::DimParam(p)) = &d.value {
                            if !self.symbols.iter().any(|(n, _)| n == p) {
                                self.symbols.push((p.clone(), v));
                            }
                        }
                        // A size past any tensor Egret takes is refused before it becomes a dim.
                        if v > egret_ir::MAX_ELEMENTS {
                            return Err(err(format!("dim {i} = {v} is too large")));
                        }
                        shape.push(egret_ir::Dim::new(v));
                    }
                    shape
                }
            };
            pending.push((input, Type::new(dtype, shape), narrow));
        }
        // An expression over dims that other inputs bound (`past_sequence +
        // sequence` beside `past_sequence` and `sequence`) takes their values.
        let value = |s: &str| dims.get(s).and_then(|&v| i64::try_from(v).ok());
        for (input, ty, narrow) in pending {
            let err = |m: String| ImportError::Input { input: input.name.clone(), message: m };
            let shape = ty
                .shape
                .iter()
                .map(|d| d.substitute(&value).map_err(|e| err(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let ty = Type::new(ty.dtype, shape);
            if ty.is_known() && ty.checked_numel().is_none() {
                return Err(err(format!("shape {ty} is too large")));
            }
            let mut v = self.graph.add_input(&input.name, ty.clone());
            if specialize.contains(&input.name) {
                let t = opts.input_values[&input.name].clone();
                if t.ty() != ty {
                    return Err(err(format!("the value offered has type {} but the input is {ty}", t.ty())));
                }
                self.known.insert(v, Arc::new(t.clone()));
                self.specialized.push((input.name.clone(), t));
            }
            if ty.dtype.is_half() {
                v = self
                    .graph
                    .add_node(Op::Cast { to: egret_ir::DType::F32 }, &[v], &input.name)
                    .map_err(|e| ImportError::Input { input: input.name.clone(), message: e.message })?[0];
            }
            // A narrow input arrives in its carrier: cast onto the type's
            // values (saturating), so that what the graph computes with is
            // the type's whatever the caller passed.
            if let Some(to) = narrow {
                let op = Op::CastNarrow { to, saturate: true, round_mode: egret_ir::RoundMode::Nearest };
                v = self
                    .graph
                    .add_node(op, &[v], &input.name)
                    .map_err(|e| ImportError::Input { input: input.name.clone(), message: e.message })?[0];
                self.narrow.insert(v, to);
            }
            self.names.insert(input.name.clone(), v);
        }
        Ok(())
    }

    fn build_node(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let label =
            if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() };
        let domain = if node.domain == "ai.onnx" { "" } else { node.domain.as_str() };
        let builder = registry::get(domain, &node.op_type);
        let Some(builder) = builder else {
            return Err(ImportError::UnsupportedOp {
                op: node.op_type.clone(),
                domain: node.domain.clone(),
                opset: self.opset,
                node: label,
            });
        };
        let first = if domain.is_empty() { registry::first_opset(&node.op_type) } else { 1 };
        if self.opset < first {
            return Err(ImportError::Node {
                node: label,
                op: node.op_type.clone(),
                opset: self.opset,
                message: format!("the op is defined from opset {first} on; the model imports opset {}", self.opset),
            });
        }
        let mut ctx = NodeCtx {
            imp: self,
            node,
            label: label.clone(),
            used: RefCell::new(HashSet::new()),
            read_inputs: RefCell::new(HashSet::new()),
        };
        let outs = builder(&mut ctx)?;
        for a in &node.attribute {
            if !ctx.used.borrow().contains(&a.name) {
                return Err(ctx.err(format!("attribute `{}` is not supported", a.name)));
            }
        }
        // An input the builder never looked at would be dropped silently,
        // and the node computed as if it were absent (a `Tanh` given two
        // inputs, an op's optional input Egret does not implement).
        for (i, name) in node.input.iter().enumerate() {
            if !name.is_empty() && !ctx.read_inputs.borrow().contains(&i) {
                return Err(ctx.err(format!("input {i} (`{name}`) is not supported")));
            }
        }
        for (name, v) in node.output.iter().zip(outs) {
            if !name.is_empty() {
                self.names.insert(name.clone(), v);
            }
        }
        for name in &node.output {
            if !name.is_empty() && !self.names.contains_key(name) {
                return Err(ImportError::Node {
                    node: label.clone(),
                    op: node.op_type.clone(),
                    opset: self.opset,
                    message: format!("output `{name}` is not supported"),
                });
            }
        }
        Ok(())
    }

    /// Records the value of `v` if its producer is cheap to evaluate now.
    fn propagate_known(&mut self, outs: &[ValueId]) {
        let Some(&first) = outs.first() else { return };
        let node = self.graph.node(self.graph.producer(first)).clone();
        let value = match &node.op {
            Op::Shape { start, end } => {
                let s = &self.graph.ty(node.inputs[0]).shape[*start..*end];
                match egret_ir::known_shape(s) {
                    Some(s) => vec![Known::Tensor(Arc::new(Tensor::from_vec(
                        vec![s.len()],
                        s.iter().map(|&d| d as i64).collect(),
                    )))],
                    None => vec![Known::Dims(Arc::new(SymInts { shape: vec![s.len()], values: s.to_vec() }))],
                }
            }
            op => {
                let small =
                    outs.iter().all(|&v| self.graph.ty(v).checked_numel().is_some_and(|n| n <= KNOWN_VALUE_LIMIT));
                if !small {
                    return;
                }
                let inputs: Option<Vec<Known>> = node
                    .inputs
                    .iter()
                    .map(|v| match (self.known.get(v), self.known_dims.get(v)) {
                        (Some(t), _) => Some(Known::Tensor(t.clone())),
                        (None, Some(d)) => Some(Known::Dims(d.clone())),
                        (None, None) => None,
                    })
                    .collect();
                let Some(inputs) = inputs else { return };
                if inputs.iter().all(|k| matches!(k, Known::Tensor(_))) {
                    let tensors: Vec<&Tensor> = inputs
                        .iter()
                        .map(|k| match k {
                            Known::Tensor(t) => &**t,
                            Known::Dims(_) => unreachable!("all inputs are tensors"),
                        })
                        .collect();
                    match egret_ir::eval_op(op, &tensors) {
                        Ok(ts) => ts.into_iter().map(|t| Known::Tensor(Arc::new(t))).collect(),
                        Err(_) => return,
                    }
                } else {
                    let dtypes: Vec<_> = outs.iter().map(|&v| self.graph.ty(v).dtype).collect();
                    match symbolic::eval(op, &inputs, &dtypes) {
                        Some(ks) => ks,
                        None => return,
                    }
                }
            }
        };
        for (v, k) in outs.iter().zip(value) {
            match k {
                Known::Tensor(t) => {
                    self.known.insert(*v, t);
                }
                Known::Dims(d) => {
                    self.known_dims.insert(*v, d);
                }
            }
        }
    }
}

/// The element type a value's declaration gives, if any.
fn declared_dtype(info: &onnx_protobuf::ValueInfoProto) -> Option<egret_ir::DType> {
    match info.type_.as_ref().and_then(|t| t.value.as_ref()) {
        Some(onnx_protobuf::type_proto::Value::TensorType(tt)) => dtype_from_onnx(tt.elem_type).ok(),
        _ => None,
    }
}

/// Checks a value's declared dtype and static dims against what Egret computes.
fn check_declared(name: &str, info: &onnx_protobuf::ValueInfoProto, ty: &Type) -> Result<(), ImportError> {
    use onnx_protobuf::tensor_shape_proto::dimension::Value as Dim;
    let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) = info.type_.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Ok(());
    };
    let err = |m: String| ImportError::Tensor { tensor: name.to_string(), message: m };
    // Halves are computed in f32, narrow types in their carrier.
    if tt.elem_type != 0 {
        let declared = carrier_from_onnx(tt.elem_type).map_err(err)?.0;
        if declared != ty.dtype && !(declared.is_half() && ty.dtype == egret_ir::DType::F32) {
            return Err(err(format!("the model declares {declared} but the graph computes {}", ty.dtype)));
        }
    }
    if let Some(sp) = tt.shape.as_ref() {
        if !sp.dim.is_empty() || ty.rank() == 0 {
            if sp.dim.len() != ty.rank() {
                return Err(err(format!("the model declares rank {} but the graph computes {ty}", sp.dim.len())));
            }
            for (i, d) in sp.dim.iter().enumerate() {
                if let Some(Dim::DimValue(v)) = d.value {
                    // A symbolic dim where the file declares a number is checked once bound.
                    if v >= 0 && ty.shape[i].size().is_some_and(|d| d != v as usize) {
                        return Err(err(format!("the model declares dim {i} = {v} but the graph computes {ty}")));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Orders nodes so every node follows the producers of its inputs. ONNX
/// requires files to be sorted already; sorting here turns a violation into a
/// cycle error or a clear "undefined" error instead of a confusing one.
fn topo_sort(g: &onnx_protobuf::GraphProto, defined: &HashMap<String, ValueId>) -> Result<Vec<usize>, ImportError> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if defined.contains_key(o) || producer.insert(o, i).is_some() {
                return Err(ImportError::Node {
                    node: n.name.clone(),
                    op: n.op_type.clone(),
                    opset: 0,
                    message: format!("output `{o}` is defined more than once"),
                });
            }
        }
    }
    let mut dag = petgraph_lite::Dag::new(g.node.len());
    for (i, n) in g.node.iter().enumerate() {
        for name in n.input.iter().filter(|s| !s.is_empty()) {
            if let Some(&p) = producer.get(name.as_str()) {
                dag.edge(p, i);
            } else if !defined.contains_key(name) {
                let node = if n.name.is_empty() { n.op_type.clone() } else { n.name.clone() };
                return Err(ImportError::Undefined { node, name: name.clone() });
            }
        }
    }
    dag.order().map_err(|i| ImportError::Cycle {
        node: if g.node[i].name.is_empty() { g.node[i].op_type.clone() } else { g.node[i].name.clone() },
    })
}

/// Kahn's algorithm over node indices, keeping the file's order among ready
/// nodes so the IR reads like the model.
mod petgraph_lite {
    pub struct Dag {
        succ: Vec<Vec<usize>>,
        indeg: Vec<usize>,
    }
    impl Dag {
        pub fn new(n: usize) -> Dag {
            Dag { succ: vec![vec![]; n], indeg: vec![0; n] }
        }
        pub fn edge(&mut self, a: usize, b: usize) {
            self.succ[a].push(b);
            self.indeg[b] += 1;
        }
        /// A topological order, or a node on a cycle.
        pub fn order(mut self) -> Result<Vec<usize>, usize> {
            let n = self.indeg.len();
            let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| self.indeg[i] == 0).collect();
            let mut out = Vec::with_capacity(n);
            while let Some(i) = ready.pop_first() {
                out.push(i);
                for &j in &self.succ[i].clone() {
                    self.indeg[j] -= 1;
                    if self.indeg[j] == 0 {
                        ready.insert(j);
                    }
                }
            }
            if out.len() < n {
                return Err((0..n).find(|&i| self.indeg[i] > 0).unwrap_or(0));
            }
            Ok(out)
        }
    }
}

/// What a builder sees: the node's inputs, attributes, and a way to add IR.
pub struct NodeCtx<'i, 'a> {
    imp: &'i mut Importer<'a>,
    pub node: &'i NodeProto,
    pub label: String,
    /// The attributes the builder read.
    used: RefCell<HashSet<String>>,
    /// The input positions the builder read.
    read_inputs: RefCell<HashSet<usize>>,
}

pub type BuildResult = Result<Vec<ValueId>, ImportError>;

impl NodeCtx<'_, '_> {
    pub fn opset(&self) -> i64 {
        self.imp.opset
    }

    pub fn err(&self, message: impl Into<String>) -> ImportError {
        ImportError::Node {
            node: self.label.clone(),
            op: self.node.op_type.clone(),
            opset: self.imp.opset,
            message: message.into(),
        }
    }

    /// Input `i`, or `None` if absent or given as the empty name.
    pub fn input(&self, i: usize) -> Option<ValueId> {
        self.read_inputs.borrow_mut().insert(i);
        self.node.input.get(i).filter(|s| !s.is_empty()).map(|s| self.imp.names[s])
    }

    /// Marks input `i` as read without using it (for optional inputs whose
    /// every value means the same thing at inference).
    pub fn ignore_input(&self, i: usize) {
        self.read_inputs.borrow_mut().insert(i);
    }

    pub fn req(&self, i: usize) -> Result<ValueId, ImportError> {
        self.input(i).ok_or_else(|| self.err(format!("input {i} is required")))
    }

    pub fn num_inputs(&self) -> usize {
        self.node.input.len()
    }

    pub fn num_outputs(&self) -> usize {
        self.node.output.iter().filter(|o| !o.is_empty()).count()
    }

    /// Whether the node names output `i` (an optional output left empty, or
    /// past the end, is not wanted).
    pub fn wants_output(&self, i: usize) -> bool {
        self.node.output.get(i).is_some_and(|o| !o.is_empty())
    }

    pub fn ty(&self, v: ValueId) -> &Type {
        self.imp.graph.ty(v)
    }

    pub fn rank(&self, v: ValueId) -> usize {
        self.ty(v).rank()
    }

    /// The compile-time value of input `i`, if known.
    pub fn known(&self, i: usize) -> Option<Arc<Tensor>> {
        self.input(i).and_then(|v| self.imp.known.get(&v).cloned())
    }

    /// The compile-time value of `v`, if known.
    pub fn known_value(&self, v: ValueId) -> Option<Arc<Tensor>> {
        self.imp.known.get(&v).cloned()
    }

    /// The compile-time value of input `i`, which this op requires.
    pub fn need_known(&self, i: usize, what: &str) -> Result<Arc<Tensor>, ImportError> {
        let v = self.req(i)?;
        if let Some(t) = self.imp.known.get(&v) {
            return Ok(t.clone());
        }
        if let Some(d) = self.imp.known_dims.get(&v) {
            let values: Vec<String> = d.values.iter().map(|d| d.to_string()).collect();
            return Err(self.err(format!(
                "{what} (input {i}) is [{}], which depends on symbolic dims; this op needs it as numbers \
                 (give the dims values with --dim)",
                values.join(", ")
            )));
        }
        let inputs = self.graph_inputs_behind(v);
        if !inputs.is_empty() {
            return Err(ImportError::NeedsInputValue {
                node: self.label.clone(),
                op: self.node.op_type.clone(),
                inputs,
            });
        }
        Err(self
            .err(format!("{what} (input {i}) must be known at compile time; data-dependent shapes are not supported")))
    }

    /// Names of the graph inputs `v` depends on.
    fn graph_inputs_behind(&self, v: ValueId) -> Vec<String> {
        let g = &self.imp.graph;
        let mut stack = vec![v];
        let mut seen = HashSet::new();
        let mut names = Vec::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            let node = g.node(g.producer(v));
            if let Op::Input { name } = &node.op {
                names.push(name.clone());
            }
            stack.extend(node.inputs.iter().copied());
        }
        names.sort();
        names
    }

    pub fn need_ints(&self, i: usize, what: &str) -> Result<Vec<i64>, ImportError> {
        Ok(self.need_known(i, what)?.to_i64_vec())
    }

    /// The compile-time value of integer input `i` as dims, which may be
    /// symbolic (a reshape target computed from the input's shape).
    pub fn need_dims(&self, i: usize, what: &str) -> Result<Vec<Dim>, ImportError> {
        let v = self.req(i)?;
        if let Some(d) = self.imp.known_dims.get(&v) {
            return Ok(d.values.clone());
        }
        Ok(self.need_ints(i, what)?.into_iter().map(Dim::saturating).collect())
    }

    /// Records that `v` holds `values` (a value a builder computed from dims).
    pub fn set_known_dims(&mut self, v: ValueId, shape: Vec<usize>, values: Vec<Dim>) {
        self.imp.known_dims.insert(v, Arc::new(SymInts { shape, values }));
    }

    /// The known shape of `v`, for an op whose import needs every size.
    pub fn sizes(&self, v: ValueId) -> Result<Vec<usize>, ImportError> {
        let ty = self.ty(v);
        ty.known_shape().ok_or_else(|| {
            self.err(format!(
                "the input's shape {ty} is symbolic; this op needs it known (give the dims values with --dim)"
            ))
        })
    }

    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        let a = self.node.attribute.iter().find(|a| a.name == name)?;
        self.used.borrow_mut().insert(name.to_string());
        Some(a)
    }

    fn typed(&self, name: &str, want: AttributeType) -> Result<Option<&AttributeProto>, ImportError> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if !a.ref_attr_name.is_empty() => {
                Err(self.err(format!("attribute `{name}` refers to a function attribute")))
            }
            Some(a) => {
                let ty = a
                    .type_
                    .enum_value()
                    .map_err(|code| self.err(format!("attribute `{name}` has unknown type {code}")))?;
                // Some writers leave the type undefined; trust the field then.
                if ty != want && ty != AttributeType::UNDEFINED {
                    return Err(self.err(format!("attribute `{name}` should be {want:?}, found {ty:?}")));
                }
                Ok(Some(a))
            }
        }
    }

    /// Marks an attribute as read without interpreting it (for attributes
    /// whose every value means the same thing at inference).
    pub fn ignore_attr(&self, name: &str) {
        let _ = self.attr(name);
    }

    pub fn has_attr(&self, name: &str) -> bool {
        self.node.attribute.iter().any(|a| a.name == name)
    }

    pub fn i(&self, name: &str, default: i64) -> Result<i64, ImportError> {
        Ok(self.typed(name, AttributeType::INT)?.map_or(default, |a| a.i))
    }

    /// A boolean attribute, stored as an int that must be 0 or 1.
    pub fn flag(&self, name: &str, default: bool) -> Result<bool, ImportError> {
        match self.i(name, default as i64)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.err(format!("attribute `{name}` must be 0 or 1, not {v}"))),
        }
    }

    pub fn f(&self, name: &str, default: f32) -> Result<f32, ImportError> {
        Ok(self.typed(name, AttributeType::FLOAT)?.map_or(default, |a| a.f))
    }

    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, ImportError> {
        Ok(self.typed(name, AttributeType::INTS)?.map(|a| a.ints.clone()))
    }

    pub fn floats(&self, name: &str) -> Result<Option<Vec<f32>>, ImportError> {
        Ok(self.typed(name, AttributeType::FLOATS)?.map(|a| a.floats.clone()))
    }

    pub fn s(&self, name: &str, default: &str) -> Result<String, ImportError> {
        match self.typed(name, AttributeType::STRING)? {
            None => Ok(default.to_string()),
            Some(a) => String::from_utf8(a.s.clone()).map_err(|_| self.err(format!("attribute `{name}` is not UTF-8"))),
        }
    }

    pub fn tensor_attr(&self, name: &str) -> Result<Option<Tensor>, ImportError> {
        match self.typed(name, AttributeType::TENSOR)? {
            None => Ok(None),
            Some(a) => match a.t.as_ref() {
                Some(t) => Ok(Some(widen(tensor_from_proto(t, self.imp.base)?))),
                None => Err(self.err(format!("attribute `{name}` holds no tensor"))),
            },
        }
    }

    /// Adds an IR node and records the known values it produces.
    pub fn add_node(&mut self, op: Op, inputs: &[ValueId]) -> BuildResult {
        let opset = self.imp.opset;
        let outs = self.imp.graph.add_node(op, inputs, &self.label).map_err(|e| ImportError::Node {
            node: e.node,
            op: self.node.op_type.clone(),
            opset,
            message: e.message,
        })?;
        self.imp.propagate_known(&outs);
        Ok(outs)
    }

    pub fn add(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, ImportError> {
        Ok(self.add_node(op, inputs)?[0])
    }

    /// `v` as f32: itself, the f32 twin a quantized op recorded for it
    /// (`set_exact_f32`), or a cast.
    pub fn as_f32(&mut self, v: ValueId) -> Result<ValueId, ImportError> {
        if self.ty(v).dtype == egret_ir::DType::F32 {
            return Ok(v);
        }
        if let Some(&f) = self.imp.exact_f32.get(&v) {
            return Ok(f);
        }
        self.add(Op::Cast { to: egret_ir::DType::F32 }, &[v])
    }

    /// Records that the f32 value `exact` holds exactly the integers of `v`.
    pub fn set_exact_f32(&mut self, v: ValueId, exact: ValueId) {
        self.imp.exact_f32.insert(v, exact);
    }

    /// An f32 scalar constant.
    pub fn f32_const(&mut self, x: f32) -> ValueId {
        self.constant(Tensor::scalar(x))
    }

    /// Graph attribute `name` (a control-flow op's body), if given.
    pub fn graph_attr(&self, name: &str) -> Result<Option<onnx_protobuf::GraphProto>, ImportError> {
        Ok(self.typed(name, AttributeType::GRAPH)?.and_then(|a| a.g.as_ref().cloned()))
    }

    /// The nodes of `g`, a body whose condition is known at compile time,
    /// built in this graph: it reads the outer graph's values by name, as
    /// ONNX's scoping says, and its outputs are this node's. Its own
    /// initializers become constants. A body whose outputs disagree with
    /// the node in number is refused.
    pub fn inline_body(&mut self, g: &onnx_protobuf::GraphProto, what: &str) -> BuildResult {
        if g.output.len() != self.node.output.len() {
            return Err(self.err(format!(
                "{what} has {} outputs; the node has {}",
                g.output.len(),
                self.node.output.len()
            )));
        }
        // A name the outer graph has would shadow it for the rest of the
        // outer graph once inlined; ONNX forbids it, so refuse it.
        let defined = g.initializer.iter().map(|t| &t.name).chain(g.node.iter().flat_map(|n| &n.output));
        if let Some(name) = defined.filter(|n| !n.is_empty()).find(|n| self.imp.names.contains_key(*n)) {
            return Err(self.err(format!("{what} defines `{name}` again, a name the graph already has")));
        }
        for init in &g.initializer {
            let t = tensor_from_proto(init, self.imp.base)?;
            let v = self.constant(t);
            self.imp.names.insert(init.name.clone(), v);
        }
        for n in &g.node {
            self.imp.build_node(n)?;
        }
        g.output
            .iter()
            .map(|o| {
                self.imp
                    .names
                    .get(&o.name)
                    .copied()
                    .ok_or_else(|| self.err(format!("{what} never computes its output `{}`", o.name)))
            })
            .collect()
    }

    /// The narrow type tensor attribute `name` is stored in, if any.
    pub fn attr_narrow(&self, name: &str) -> Option<NarrowType> {
        self.attr(name).and_then(|a| a.t.as_ref()).and_then(crate::tensor::narrow_of)
    }

    /// Marks `v` as holding values of a narrow type (in its carrier).
    pub fn mark_narrow(&mut self, v: ValueId, t: NarrowType) {
        self.imp.narrow.insert(v, t);
    }

    /// The narrow type `v` holds, if any.
    pub fn narrow(&self, v: ValueId) -> Option<NarrowType> {
        self.imp.narrow.get(&v).copied()
    }

    /// Whether `v` holds int4 or uint4 values (in an 8-bit type).
    pub fn is_four_bit(&self, v: ValueId) -> bool {
        matches!(self.narrow(v), Some(NarrowType::I4 | NarrowType::U4))
    }

    pub fn constant(&mut self, t: Tensor) -> ValueId {
        self.constant_at_width(widen(t))
    }

    /// A constant kept at its element type, a half one included, for an op
    /// that reads it at its width (`Gather` of a half table) and widens
    /// what it reads by a cast of its own.
    pub fn constant_at_width(&mut self, t: Tensor) -> ValueId {
        let t = Arc::new(t);
        let v = self.imp.graph.add_const_shared(t.clone(), &self.label);
        self.imp.known.insert(v, t);
        v
    }

    /// Normalises a possibly negative axis against `rank`.
    pub fn axis(&self, axis: i64, rank: usize) -> Result<usize, ImportError> {
        egret_ir::ops::norm_axis(axis, rank).map_err(|m| self.err(m))
    }

    pub fn axes(&self, axes: &[i64], rank: usize) -> Result<Vec<usize>, ImportError> {
        let mut out: Vec<usize> = axes.iter().map(|&a| self.axis(a, rank)).collect::<Result<_, _>>()?;
        let n = out.len();
        out.sort();
        out.dedup();
        if out.len() != n {
            return Err(self.err(format!("axes {axes:?} repeat an axis")));
        }
        Ok(out)
    }
}
