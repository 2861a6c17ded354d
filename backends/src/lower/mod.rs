//! Lowering: a canonical graph to a kernel plan.
//!
//! Values live either in a buffer of their own or as a *view* of another
//! value's buffer (an offset and per-dim strides). Transpose, slice, split,
//! expand and most reshapes only make views; the kernels that read them take
//! the strides (maps any, matmuls a row and a column stride per operand), and
//! only consumers that need dense memory (row kernels, reference ops, graph
//! outputs) get a copy.
//!
//! Elementwise ops become *pending* expressions; a consumer of the same shape
//! that is their only reader inlines them, so chains of elementwise ops run as
//! one map kernel (`LowerOptions::fuse_elementwise`, the `--opt 1` level).
//!
//! By concern: `layout` (views), `elementwise` (map expressions), `matmul`,
//! `attention`, `conv`, `rows` (row kernels and gathers), and `binding`
//! (which symbolic dims a node's kernels need known).

mod attention;
mod binding;
mod conv;
mod elementwise;
mod layout;
mod matmul;
mod rows;

use attention::*;
use binding::gather_is_known;
pub(crate) use binding::narrow_cast;
pub use binding::{binding_reasons, symbols_to_bind, BindingReason};
use conv::*;
use elementwise::*;
pub(crate) use layout::is_dense;
use layout::*;
use matmul::*;

use crate::memory::plan_memory;
use crate::plan::*;
use egret_ir::op::MatMulTiling;
use egret_ir::{DType, Dim, Graph, IrError, NodeId, Op, Tensor, Type, ValueId};
use std::collections::HashMap;

/// How much lowering fuses, and which matmul implementation it may pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowerOptions {
    /// Fuse chains of elementwise ops into one map kernel (`--opt 1`).
    pub fuse_elementwise: bool,
    /// Let transpose, slice, split and expand be strided views that the
    /// consumer reads (`--opt 1`); without, each is a copy kernel, so
    /// `--opt 0` is one kernel per op.
    pub views: bool,
    /// Force one matmul implementation (where it applies) instead of choosing.
    pub matmul: Option<MatMulImpl>,
    /// Fold an elementwise map that is the only reader of a matmul's product
    /// into that matmul's epilogue (`--opt 2`). Epilogues run in the JIT's
    /// kernel library, so forcing generated matmuls (as ahead-of-time code
    /// does) turns this off.
    pub epilogues: bool,
    /// Make none of the CPU's choices: constant weights stay strided views
    /// (no panels packed for the CPU's GEMM), and no row tables for it. The
    /// GPU backends lower this way and lay out what they read themselves.
    pub neutral: bool,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions { fuse_elementwise: true, views: true, matmul: None, epilogues: true, neutral: false }
    }
}

impl LowerOptions {
    /// The options for a GPU backend at these fusion levels: a neutral plan.
    pub fn gpu(self) -> LowerOptions {
        LowerOptions { matmul: None, neutral: true, ..self }
    }
}

/// Where a value's elements are: `buffer[offset + sum(index_d * strides_d)]`.
#[derive(Clone, Debug, PartialEq)]
struct View {
    buffer: BufferId,
    offset: Dim,
    strides: Vec<Dim>,
}

impl View {
    /// A dense view of `buffer` with `shape`.
    fn dense(buffer: BufferId, shape: &[Dim]) -> View {
        View { buffer, offset: Dim::new(0), strides: contiguous_strides(shape) }
    }

    fn is_known(&self) -> bool {
        self.offset.is_known() && self.strides.iter().all(|d| d.is_known())
    }

    /// The offset of a known view (`Lowering::known_view`).
    fn off(&self) -> isize {
        known(self.offset)
    }

    /// The strides of a known view.
    fn st(&self) -> Vec<isize> {
        self.strides.iter().map(|&d| known(d)).collect()
    }
}

/// A dense operand of `buffer` with `shape`.
fn dense_operand(buffer: BufferId, dtype: DType, shape: &[Dim]) -> Operand {
    Operand { buffer, dtype, offset: Dim::new(0), strides: contiguous_strides(shape) }
}

/// An elementwise result not written anywhere yet: an expression over
/// operands strided over the value's own shape.
struct Pending {
    shape: Vec<Dim>,
    inputs: Vec<Operand>,
    expr: Expr,
    label: String,
}

struct Lowering<'g> {
    g: &'g Graph,
    buffers: Vec<Buffer>,
    views: HashMap<ValueId, View>,
    pending: HashMap<ValueId, Pending>,
    kernels: Vec<Kernel>,
    opts: LowerOptions,
    /// Attention keys and values that are another value with its heads
    /// repeated (`repeated_heads`), and the nodes that repeat them, which
    /// are not lowered: the attention kernel reads the source in place.
    repeated: HashMap<ValueId, RepeatedHeads>,
    /// Left operands of packed products that are rows of another value
    /// permuted by layout ops (`gathered_rows`): the GEMM reads them
    /// through a row table, and the layout ops are not lowered either.
    gathered: HashMap<ValueId, GatheredRows>,
    /// Packed products whose rows the GEMM places where the layout ops
    /// after them would move them (`placed_rows`), by product value.
    placed: HashMap<ValueId, PlacedRows>,
    skipped: std::collections::HashSet<NodeId>,
}

impl Lowering<'_> {
    fn new_buffer(&mut self, ty: &Type, storage: Storage) -> BufferId {
        let bytes = egret_ir::product(&ty.shape).expect("a verified type's size") * Dim::new(ty.dtype.size_bytes());
        self.buffers.push(Buffer { bytes, dtype: ty.dtype, storage });
        self.buffers.len() - 1
    }

    /// An arena buffer (its offset is assigned by the memory plan).
    fn scratch(&mut self, dtype: DType, shape: &[Dim]) -> BufferId {
        self.new_buffer(&Type::new(dtype, shape.to_vec()), Storage::Arena { offset: usize::MAX })
    }

    /// A fresh dense buffer for `v`.
    fn define(&mut self, v: ValueId) -> BufferId {
        let ty = self.g.ty(v).clone();
        let b = self.scratch(ty.dtype, &ty.shape);
        self.views.insert(v, View::dense(b, &ty.shape));
        b
    }

    /// `v`'s view for a kernel that takes only known offsets and strides
    /// (every kind but maps and attention): a view through symbolic ones
    /// (a slice at a decoder's past length) is copied dense first.
    fn known_view(&mut self, v: ValueId, label: &str) -> View {
        let vw = self.view(v);
        if vw.is_known() {
            return vw;
        }
        self.dense(v, label);
        let vw = self.view(v);
        // `dense` keeps a view whose symbolic strides are on dims of one
        // element, or that holds no element: strides that address nothing
        // else, so any known value serves (a slice of one row of a
        // symbolic-width buffer, say).
        let Some(shape) = self.g.ty(v).known_shape() else { return vw };
        let empty = shape.contains(&0);
        let strides = vw.strides.iter().zip(&shape).map(|(&s, &n)| if n <= 1 || empty { Dim::new(0) } else { s });
        View { offset: if empty { Dim::new(0) } else { vw.offset }, strides: strides.collect(), ..vw }
    }

    /// Where `v` is, writing it first if it is still pending.
    fn view(&mut self, v: ValueId) -> View {
        if self.pending.contains_key(&v) {
            self.materialize(v);
        }
        self.views[&v].clone()
    }

    /// `v` read broadcast to `out` (or at its own shape).
    fn read(&mut self, v: ValueId, out: &[Dim]) -> Operand {
        let vw = self.view(v);
        let shape = &self.g.ty(v).shape;
        Operand {
            buffer: vw.buffer,
            dtype: self.g.ty(v).dtype,
            offset: vw.offset,
            strides: broadcast_view(shape, &vw.strides, out),
        }
    }

    /// A dense, offset-free buffer holding `v`, copying a view if needed.
    fn dense(&mut self, v: ValueId, label: &str) -> BufferId {
        let vw = self.view(v);
        let ty = self.g.ty(v).clone();
        if vw.offset == 0 && is_dense(&ty.shape, &vw.strides) {
            return vw.buffer;
        }
        let input = self.read(v, &ty.shape);
        let b = self.define(v);
        let output = dense_operand(b, ty.dtype, &ty.shape);
        self.map(ty.shape.clone(), vec![input], output, Expr::Input(0), label);
        b
    }

    fn push(&mut self, kind: KernelKind, label: &str) {
        self.kernels.push(Kernel { kind, label: label.to_string() });
    }

    fn map(&mut self, shape: Vec<Dim>, inputs: Vec<Operand>, output: Operand, expr: Expr, label: &str) {
        let (shape, mut ops) = collapse_dims(shape, inputs.into_iter().chain([output]).collect());
        let output = ops.pop().expect("the output operand");
        self.push(KernelKind::Map(MapKernel { shape, inputs: ops, output, expr }), label);
    }

    /// Emits the map kernel of a pending value, reading each distinct
    /// operand once.
    fn materialize(&mut self, v: ValueId) {
        let b = self.define(v);
        let shape = &self.pending[&v].shape;
        let output = dense_operand(b, self.g.ty(v).dtype, shape);
        self.materialize_into(v, output);
    }

    /// Emits the map kernel of a pending value writing to `output`.
    fn materialize_into(&mut self, v: ValueId, output: Operand) {
        let p = self.pending.remove(&v).expect("materialize a pending value");
        let mut distinct: Vec<Operand> = Vec::new();
        let remap: Vec<Expr> = p
            .inputs
            .into_iter()
            .map(|o| {
                let at = distinct.iter().position(|d| *d == o).unwrap_or_else(|| {
                    distinct.push(o);
                    distinct.len() - 1
                });
                Expr::Input(at)
            })
            .collect();
        let expr = p.expr.substitute(&remap);
        self.map(p.shape, distinct, output, expr, &p.label);
    }

    /// Lowers an elementwise op to a pending expression, inlining operands
    /// that are pending, read only here, and of the same shape.
    fn elementwise(&mut self, out: ValueId, inputs: &[ValueId], expr: Expr, label: &str) {
        let g = self.g;
        let shape = g.ty(out).shape.clone();
        let mut reads: Vec<Operand> = Vec::new();
        let mut with = Vec::with_capacity(inputs.len());
        for &v in inputs {
            // Scalar f32 constants become immediates in the expression.
            if let Some(c) = g.const_value(v).filter(|t| t.numel() == 1 && t.dtype() == DType::F32) {
                with.push(Expr::F32(c.as_f32().expect("an f32 constant")[0]));
                continue;
            }
            let inline = self.opts.fuse_elementwise
                && g.ty(v).shape == shape
                && g.use_count(v) == 1
                && self.pending.contains_key(&v);
            if inline {
                let p = self.pending.remove(&v).expect("checked above");
                let base = reads.len();
                let shifted: Vec<Expr> = (0..p.inputs.len()).map(|i| Expr::Input(base + i)).collect();
                reads.extend(p.inputs);
                with.push(p.expr.substitute(&shifted));
            } else {
                with.push(Expr::Input(reads.len()));
                let r = self.read(v, &shape);
                reads.push(r);
            }
        }
        let expr = divide_by_constant_as_multiply(expr.substitute(&with));
        self.pending.insert(out, Pending { shape, inputs: reads, expr, label: label.to_string() });
        if !self.opts.fuse_elementwise {
            self.materialize(out);
        }
    }

    fn lower_node(&mut self, n: NodeId) {
        if self.skipped.contains(&n) {
            return;
        }
        let g = self.g;
        let node = g.node(n);
        let label = node.label.as_str();
        let in_types: Vec<&Type> = node.inputs.iter().map(|&v| g.ty(v)).collect();
        match &node.op {
            Op::Input { .. } => {}
            Op::Const(_) => self.constant(node.outputs[0]),
            op => {
                let out = node.outputs[0];
                let out_ty = g.ty(out).clone();
                let pow_exponent = match op {
                    Op::Pow => g.const_value(node.inputs[1]).filter(|t| t.numel() == 1),
                    _ => None,
                };
                if let Some(p) = pow_exponent {
                    let same_shape = g.ty(node.inputs[0]) == &out_ty;
                    if let (true, DType::F32, Some(e)) =
                        (same_shape, out_ty.dtype, pow_by_constant(p.to_f64_vec()[0] as f32))
                    {
                        self.elementwise(out, &node.inputs[..1], e, label);
                        return;
                    }
                }
                if let Some(expr) = elementwise_expr(op, &in_types, &out_ty) {
                    self.elementwise(out, &node.inputs, expr, label);
                    return;
                }
                if self.layout(op, &node.inputs, &node.outputs, label) {
                    return;
                }
                if let Op::Conv { strides, pads, dilations, group } = op {
                    if in_types.iter().all(|t| t.dtype == DType::F32) {
                        self.conv(&node.inputs, out, ConvShape { strides, pads, dilations, group: *group }, label);
                        return;
                    }
                }
                let attention = match op {
                    Op::Attention { scale, nan_to_zero, softcap } => {
                        Some((Scores { scale: *scale, softcap: *softcap, nan_to_zero: *nan_to_zero }, None))
                    }
                    // The e-graph's cost model chose the tiles.
                    Op::AttentionTiled { scale, nan_to_zero, softcap, block, key_block } => Some((
                        Scores { scale: *scale, softcap: *softcap, nan_to_zero: *nan_to_zero },
                        Some((*block, *key_block)),
                    )),
                    _ => None,
                };
                if let (Some((scores, tiles)), true) = (attention, in_types.iter().all(|t| t.dtype == DType::F32)) {
                    self.attention(&node.inputs, out, scores, tiles, label);
                    return;
                }
                if let Op::Gather { axis } = op {
                    if gather_is_known(&in_types[0].shape, *axis) {
                        let k = self.gather(node.inputs[0], node.inputs[1], out, *axis, label);
                        self.push(KernelKind::Gather(k), label);
                        return;
                    }
                }
                if let Some(k) = self.rows(op, &node.inputs, &node.outputs, label) {
                    self.push(KernelKind::Rows(k), label);
                    return;
                }
                let chosen = match op {
                    Op::MatMul => Some(None),
                    // The e-graph's cost model chose the kernel.
                    Op::MatMulTiled { tiling } => Some(Some(match tiling {
                        MatMulTiling::Packed => MatMulImpl::Packed,
                        MatMulTiling::Library => MatMulImpl::Library,
                        MatMulTiling::Generated4x8 => MatMulImpl::Generated,
                    })),
                    _ => None,
                };
                if let (Some(preferred), true) = (chosen, in_types.iter().all(|t| t.dtype == DType::F32)) {
                    if let Some(k) = self.matmul(node.inputs[0], node.inputs[1], out, preferred, label) {
                        self.push(KernelKind::MatMul(k), label);
                        return;
                    }
                }
                // A shape reads its input's type, not its elements (a
                // symbolic one's: canonicalisation folds the others), so its
                // input is not copied dense; the runtime evaluates it from
                // the call's dims.
                let inputs = match op {
                    Op::Shape { .. } => vec![(self.view(node.inputs[0]).buffer, in_types[0].clone())],
                    _ => node.inputs.iter().map(|&v| (self.dense(v, label), g.ty(v).clone())).collect(),
                };
                let outputs = node.outputs.iter().map(|&v| (self.define(v), g.ty(v).clone())).collect();
                self.push(KernelKind::Reference { op: op.clone(), inputs, outputs }, label);
            }
        }
    }

    /// Gives constant `v` its buffer, once: at its node, or earlier where a
    /// fused kernel reads it before the node's turn comes.
    fn constant(&mut self, v: ValueId) {
        if self.views.contains_key(&v) {
            return;
        }
        let t = self.g.const_value(v).expect("a constant").clone();
        let b = self.new_buffer(&t.ty(), Storage::Constant(t.clone()));
        self.views.insert(v, View::dense(b, &dims(t.shape())));
    }
}

/// Lowers a canonical, verified graph to a plan.
pub fn lower(g: &Graph, opts: LowerOptions) -> Result<Plan, IrError> {
    egret_ir::verify(g)?;
    // Only maps, views and attention take symbolic sizes; the symbols any
    // other kernel would see get values first (`Graph::bind`).
    let unbound = symbols_to_bind(g, opts);
    if !unbound.is_empty() {
        let names: Vec<&str> = unbound.iter().map(String::as_str).collect();
        return Err(IrError::new(
            "graph",
            "lower",
            format!(
                "dims {} are symbolic where kernels need their values {}",
                names.join(", "),
                egret_ir::BIND_DIMS_HINT
            ),
        ));
    }
    let mut l = Lowering {
        g,
        buffers: vec![],
        views: HashMap::new(),
        pending: HashMap::new(),
        kernels: vec![],
        opts,
        repeated: HashMap::new(),
        gathered: HashMap::new(),
        placed: HashMap::new(),
        skipped: Default::default(),
    };
    l.plan_reads_in_place();
    let mut inputs = Vec::new();
    for (i, &v) in g.inputs().iter().enumerate() {
        let ty = g.ty(v).clone();
        let b = l.new_buffer(&ty, Storage::Input(i));
        l.views.insert(v, View::dense(b, &ty.shape));
        inputs.push((b, ty));
    }
    for n in g.topo_order()? {
        l.lower_node(n);
    }
    // Outputs are dense buffers of their own: copy views, and give an output
    // that is an input or constant (or shares a buffer with another output,
    // or is a leading part of a larger buffer, as a slice is) a copy. The
    // runtime may hand an output's buffer to its kernels as the returned
    // tensor's memory, which holds exactly the output's bytes.
    let mut outputs: Vec<(BufferId, Type)> = Vec::new();
    for (name, v) in g.outputs() {
        let mut b = l.dense(*v, name);
        let ty = g.ty(*v);
        let bytes = egret_ir::product(&ty.shape).expect("a verified type's size") * Dim::new(ty.dtype.size_bytes());
        let shared = !matches!(l.buffers[b].storage, Storage::Arena { .. })
            || outputs.iter().any(|(o, _)| *o == b)
            || l.buffers[b].bytes != bytes;
        if shared {
            let ty = g.ty(*v).clone();
            let input = dense_operand(b, ty.dtype, &ty.shape);
            b = l.scratch(ty.dtype, &ty.shape);
            let output = dense_operand(b, ty.dtype, &ty.shape);
            if mappable(ty.dtype) {
                l.map(ty.shape.clone(), vec![input], output, Expr::Input(0), name);
            } else {
                // Non-f32 outputs that alias storage are read from that storage as is.
                b = input.buffer;
            }
        }
        outputs.push((b, g.ty(*v).clone()));
    }
    // Pending values still here are read by nothing: dead code, never emitted.
    let mut kernels = l.kernels;
    if opts.epilogues && opts.matmul != Some(MatMulImpl::Generated) {
        let outs: Vec<BufferId> = outputs.iter().map(|(b, _)| *b).collect();
        crate::epilogue::fuse_epilogues(&mut kernels, &outs);
    }
    let symbols = g.symbols();
    // Until a caller says otherwise (declared bounds) or a call needs more,
    // the arena is laid out for each symbol at its nominal value.
    let capacity = symbols.iter().map(|s| (s.clone(), egret_ir::NOMINAL_SYMBOL_VALUE)).collect();
    let mut sizes: Vec<(Dim, String)> = Vec::new();
    for n in g.node_ids() {
        let node = g.node(n);
        for &v in &node.outputs {
            for &d in &g.ty(v).shape {
                if !d.is_known() && d.as_symbol().is_none() && !sizes.iter().any(|(s, _)| *s == d) {
                    sizes.push((d, node.label.clone()));
                }
            }
        }
    }
    let mut plan = Plan {
        buffers: l.buffers,
        kernels,
        arena_bytes: 0,
        inputs,
        outputs,
        symbols,
        capacity,
        bounded: vec![],
        sizes,
    };
    plan_memory(&mut plan);
    Ok(plan)
}
