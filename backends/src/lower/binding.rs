//! Which symbolic dims each node's kernels need known: what makes a
//! graph planned per binding, and why (`explain`).

use super::*;

/// The symbols of `g` that must have values before `lower` (`Graph::bind`):
/// those in the sizes a kernel needs known. Maps and views take any
/// symbolic size; row kernels symbolic rows of a known length; gathers
/// symbolic rows and indices of a known gathered axis; products symbolic
/// rows by a shared weight of known size; the flash attention kernel
/// symbolic query and key counts of known batches and heads. Reference ops
/// take symbolic types (the runtime gives them their values per call), but
/// only shape and integer ops, where evaluating them per call is cheap.
/// Ahead-of-time code and forced generated matmuls compute attention as a
/// composite of products: everything is bound for them.
pub fn symbols_to_bind(g: &Graph, opts: LowerOptions) -> std::collections::BTreeSet<String> {
    binding_reasons(g, opts).into_iter().flat_map(|r| r.symbols).collect()
}

/// A node whose kernels need symbols known: why a graph is planned per
/// binding (`explain` lists them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingReason {
    /// The node's name in the model (its id in the graph, for an unnamed one).
    pub node: String,
    pub op: String,
    /// The symbols its kernels need known, in order.
    pub symbols: Vec<String>,
}

/// Every node whose kernels need some symbol known, with those symbols.
pub fn binding_reasons(g: &Graph, opts: LowerOptions) -> Vec<BindingReason> {
    let mut out = vec![];
    for n in g.node_ids() {
        let mut symbols: Vec<String> = vec![];
        for d in dims_kernels_need(g, n, opts) {
            for s in d.symbols() {
                if !symbols.contains(&s) {
                    symbols.push(s);
                }
            }
        }
        if !symbols.is_empty() {
            let node = g.node(n);
            let label = if node.label.is_empty() { n.to_string() } else { node.label.clone() };
            out.push(BindingReason { node: label, op: node.op.name().to_string(), symbols });
        }
    }
    out
}

/// Whether a cast is between f32 and a storage type of the formats: the
/// 8- and 16-bit integers (and u32) of quantized models, and the half
/// types. The CPU's loop nests take these at symbolic sizes.
pub(crate) fn narrow_cast(from: DType, to: DType) -> bool {
    let narrow = |d: DType| matches!(d, DType::I8 | DType::U8 | DType::I16 | DType::U16 | DType::U32) || d.is_half();
    (narrow(from) && matches!(to, DType::F32 | DType::I32 | DType::I64) && !(from.is_half() && to != DType::F32))
        || (from == DType::F32 && narrow(to))
}

/// Whether a row kernel computes a reduction of this kind (`Lowering::rows`).
pub(super) fn row_reduction(kind: egret_ir::op::ReduceKind) -> bool {
    use egret_ir::op::ReduceKind as K;
    matches!(kind, K::Sum | K::Mean | K::Max | K::Min | K::SumSquare | K::L2)
}

/// Whether a gather's kernel can hold `data`: the rows it copies (its dims
/// after `axis`) are known; the axis and the dims before it may be symbolic.
pub(super) fn gather_is_known(data: &[Dim], axis: usize) -> bool {
    data.get(axis + 1..).is_some_and(|d| d.iter().all(|d| d.is_known()))
}

/// The dims node `n`'s kernels need known (see `symbols_to_bind`).
pub(super) fn dims_kernels_need(g: &Graph, n: NodeId, opts: LowerOptions) -> Vec<Dim> {
    let node = g.node(n);
    let ty = |v: ValueId| g.ty(v);
    let shape = |v: ValueId| ty(v).shape.clone();
    let all = || -> Vec<Dim> {
        let mut dims: Vec<Dim> = node.inputs.iter().chain(&node.outputs).flat_map(|&v| shape(v)).collect();
        dims.extend(node.op.dims());
        dims
    };
    let in_types: Vec<&Type> = node.inputs.iter().map(|&v| ty(v)).collect();
    let out_ty = node.outputs.first().map(|&v| ty(v));
    let f32_inputs = in_types.iter().all(|t| t.dtype == DType::F32);
    match &node.op {
        Op::Input { .. } | Op::Const(_) | Op::Shape { .. } => vec![],
        Op::Reshape { .. }
        | Op::Identity
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Expand { .. }
        | Op::Split { .. }
        | Op::Concat { .. } => vec![],
        op if out_ty.is_some_and(|o| elementwise_expr(op, &in_types, o).is_some()) => vec![],
        // Integer and shape arithmetic: the reference evaluator, per call.
        op if node.outputs.iter().all(|&v| matches!(ty(v).dtype, DType::I64 | DType::I32))
            && !matches!(op, Op::MatMul | Op::MatMulTiled { .. } | Op::Gather { .. }) =>
        {
            vec![]
        }
        // Masks computed from positions (`kv_index <= query_index`, `range
        // >= 0`): integer comparisons, loop nests reading their sizes on the
        // CPU (`cpu::loop_nest`) like the integer arithmetic they read.
        op if node.outputs.iter().all(|&v| ty(v).dtype == DType::Bool)
            && in_types.iter().all(|t| matches!(t.dtype, DType::I64 | DType::I32))
            && !matches!(op, Op::Gather { .. }) =>
        {
            vec![]
        }
        // The quantized formats' 8-bit integers and half values at a
        // program's edges, to and from f32: loop nests on the CPU.
        Op::Cast { to } if narrow_cast(in_types[0].dtype, *to) => vec![],
        // Gathers at computed indices (the dynamo exporter's padding mask,
        // BERT's token types): loop nests reading their sizes on the CPU
        // (`cpu::loop_nest`), per call elsewhere.
        Op::GatherND { batch_dims: 0 } | Op::GatherElements { .. } => vec![],
        // Rows and their length may both be symbolic (`RowKernel::len`).
        Op::Softmax { axis } | Op::LogSoftmax { axis } if f32_inputs && *axis + 1 == shape(node.inputs[0]).len() => {
            vec![]
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::LayerNorm { axis, .. } | Op::RmsNorm { axis, .. }
            if f32_inputs =>
        {
            let x = shape(node.inputs[0]);
            let mut need: Vec<Dim> = x.get(*axis..).map_or_else(all, <[Dim]>::to_vec);
            need.extend(node.inputs[1..].iter().flat_map(|&p| shape(p)));
            need
        }
        Op::ResidualNorm { axis, .. } if f32_inputs => {
            let x = shape(node.inputs[0]);
            let mut need: Vec<Dim> = x.get(*axis..).map_or_else(all, <[Dim]>::to_vec);
            need.extend(node.inputs[2..].iter().flat_map(|&p| shape(p)));
            need
        }
        // Reductions the row kernels hold, over any axes (the others moved
        // first), at symbolic sizes too.
        Op::Reduce { kind, axes, .. } if f32_inputs && !axes.is_empty() && row_reduction(*kind) => vec![],
        Op::Reduce { .. } => all(),
        // One group over a symbolic batch: rows of one product (`conv_symbolic_batch`).
        Op::Conv { group: 1, .. } if f32_inputs => {
            let mut need = shape(node.inputs[0])[1..].to_vec();
            need.extend(node.inputs[1..].iter().flat_map(|&v| shape(v)));
            need.extend(shape(node.outputs[0]).into_iter().skip(1));
            need
        }
        // The rows a gather copies; the gathered axis (a mask flattened
        // over `batch * total`) and the rows before it may be symbolic.
        Op::Gather { axis } => {
            let data = shape(node.inputs[0]);
            data.get(axis + 1..).map_or_else(all, <[Dim]>::to_vec)
        }
        Op::MatMul | Op::MatMulTiled { .. } if f32_inputs => {
            let (a, b) = (shape(node.inputs[0]), shape(node.inputs[1]));
            let shared = b.len() >= 2 && b[..b.len() - 2].iter().all(|&d| d == 1);
            match (shared, a.last()) {
                // Rows of `a` may be symbolic; its row length and `b` not.
                (true, Some(&k)) if a.len() >= 2 => {
                    let mut need = b.clone();
                    need.push(k);
                    need
                }
                _ => all(),
            }
        }
        Op::Attention { .. } | Op::AttentionTiled { .. }
            if opts.matmul != Some(MatMulImpl::Generated) && f32_inputs =>
        {
            // The heads and head sizes; the batch (a leading axis before
            // the heads), the queries' and keys' counts may be symbolic.
            let (q, o) = (shape(node.inputs[0]), shape(node.outputs[0]));
            let listed = |s: &[Dim]| {
                let axes = s.len().saturating_sub(2);
                s[usize::from(axes >= 2)..axes].to_vec()
            };
            let mut need = listed(&q);
            need.extend(q.last());
            need.extend(listed(&o));
            need.extend(o.last());
            need
        }
        _ => all(),
    }
}
