//! The kernel plan: what every backend compiles.
//!
//! Lowering turns a canonical graph into a list of kernels of a small, closed
//! set of kinds, each with its shapes and strides, plus a memory plan: graph
//! inputs and constants keep their own storage, every other value lives in one
//! arena at an offset chosen by liveness, and reshapes are aliases that cost
//! nothing. Nothing here is specific to one backend.

use egret_ir::{DType, Graph, IrError, Op, Tensor, Type, ValueId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub type BufferId = usize;

/// Where a buffer's bytes live.
#[derive(Clone, Debug)]
pub enum Storage {
    /// The i-th graph input, owned by the caller.
    Input(usize),
    Constant(Arc<Tensor>),
    /// A byte offset into the arena.
    Arena {
        offset: usize,
    },
}

#[derive(Clone, Debug)]
pub struct Buffer {
    pub bytes: usize,
    pub storage: Storage,
}

/// A strided view of a buffer, in elements of `dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct Operand {
    pub buffer: BufferId,
    pub dtype: DType,
    pub offset: isize,
    /// One stride per dim of the kernel's iteration space (0 broadcasts).
    pub strides: Vec<isize>,
}

/// Scalar functions of one f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unary {
    Neg,
    Abs,
    Sqrt,
    Recip,
    Relu,
    Floor,
    Ceil,
    Round,
    Exp,
    Log,
    Tanh,
    Erf,
    Sigmoid,
    Sin,
    Cos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compare {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Logic {
    And,
    Or,
    Xor,
}

/// The elementwise expression language shared by every backend: a map
/// kernel's body and (later) prologues and epilogues of other kernels.
/// Values are f32 or bool.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// The kernel's i-th input operand.
    Input(usize),
    F32(f32),
    Unary(Unary, Box<Expr>),
    Binary(Binary, Box<Expr>, Box<Expr>),
    Compare(Compare, Box<Expr>, Box<Expr>),
    Logic(Logic, Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    IsNaN(Box<Expr>),
    /// `cond ? a : b`.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// bool to f32 (0 or 1).
    BoolToF32(Box<Expr>),
    /// f32 to bool (non-zero).
    F32ToBool(Box<Expr>),
}

impl Expr {
    pub fn unary(f: Unary, x: Expr) -> Expr {
        Expr::Unary(f, Box::new(x))
    }
    pub fn binary(f: Binary, a: Expr, b: Expr) -> Expr {
        Expr::Binary(f, Box::new(a), Box::new(b))
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Input(i) => write!(f, "in{i}"),
            Expr::F32(x) => write!(f, "{x:?}"),
            Expr::Unary(u, x) => write!(f, "{u:?}({x})"),
            Expr::Binary(b, x, y) => write!(f, "{b:?}({x}, {y})"),
            Expr::Compare(c, x, y) => write!(f, "{c:?}({x}, {y})"),
            Expr::Logic(l, x, y) => write!(f, "{l:?}({x}, {y})"),
            Expr::Not(x) => write!(f, "Not({x})"),
            Expr::IsNaN(x) => write!(f, "IsNaN({x})"),
            Expr::Select(c, x, y) => write!(f, "Select({c}, {x}, {y})"),
            Expr::BoolToF32(x) => write!(f, "F32({x})"),
            Expr::F32ToBool(x) => write!(f, "Bool({x})"),
        }
    }
}

/// `out[i] = expr(in_0[i], in_1[i], ...)` over an iteration space, every
/// operand strided. Elementwise ops, broadcasts, transposes, slices and the
/// pieces of concat and split are all map kernels.
#[derive(Clone, Debug, PartialEq)]
pub struct MapKernel {
    pub shape: Vec<usize>,
    pub inputs: Vec<Operand>,
    pub output: Operand,
    pub expr: Expr,
}

/// `c[b] = a[b] @ b[b]` for each batch, f32, row-major operands with the
/// given batch offsets (in elements).
#[derive(Clone, Debug, PartialEq)]
pub struct MatMulKernel {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a: BufferId,
    pub b: BufferId,
    pub c: BufferId,
    /// Per batch: element offsets of a, b and c.
    pub batches: Vec<[usize; 3]>,
}

/// What a row kernel computes on each row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowOp {
    Softmax,
    LogSoftmax,
    /// `(x - mean) / sqrt(var + epsilon) * scale + bias`.
    LayerNorm {
        epsilon: f32,
    },
    /// `x / sqrt(mean(x^2) + epsilon) * scale (+ bias)`.
    RmsNorm {
        epsilon: f32,
    },
    Sum,
    Mean,
    Max,
    Min,
    SumSquare,
    L2,
}

impl RowOp {
    /// Whether the kernel writes one value per row rather than a whole row.
    pub fn reduces(self) -> bool {
        !matches!(self, RowOp::Softmax | RowOp::LogSoftmax | RowOp::LayerNorm { .. } | RowOp::RmsNorm { .. })
    }
}

/// Independent rows of `len` contiguous f32 values: the softmax family,
/// normalisations (with an optional per-column scale and bias) and
/// reductions over trailing axes.
#[derive(Clone, Debug, PartialEq)]
pub struct RowKernel {
    pub rows: usize,
    pub len: usize,
    pub op: RowOp,
    pub x: BufferId,
    pub scale: Option<BufferId>,
    pub bias: Option<BufferId>,
    pub out: BufferId,
}

#[derive(Clone, Debug)]
pub enum KernelKind {
    Map(MapKernel),
    MatMul(MatMulKernel),
    Rows(RowKernel),
    /// An op with no native kernel yet: the runtime evaluates it with the
    /// IR's reference semantics on the buffers' bytes.
    Reference {
        op: Op,
        inputs: Vec<(BufferId, Type)>,
        outputs: Vec<(BufferId, Type)>,
    },
}

#[derive(Clone, Debug)]
pub struct Kernel {
    pub kind: KernelKind,
    /// The graph node it came from.
    pub label: String,
}

impl Kernel {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            KernelKind::Map(_) => "map",
            KernelKind::MatMul(_) => "matmul",
            KernelKind::Rows(_) => "rows",
            KernelKind::Reference { .. } => "reference",
        }
    }

    /// Buffers the kernel reads, then the ones it writes.
    pub fn buffers(&self) -> (Vec<BufferId>, Vec<BufferId>) {
        match &self.kind {
            KernelKind::Map(m) => (m.inputs.iter().map(|o| o.buffer).collect(), vec![m.output.buffer]),
            KernelKind::MatMul(k) => (vec![k.a, k.b], vec![k.c]),
            KernelKind::Rows(r) => ([Some(r.x), r.scale, r.bias].into_iter().flatten().collect(), vec![r.out]),
            KernelKind::Reference { inputs, outputs, .. } => {
                (inputs.iter().map(|i| i.0).collect(), outputs.iter().map(|o| o.0).collect())
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub buffers: Vec<Buffer>,
    pub kernels: Vec<Kernel>,
    pub arena_bytes: usize,
    pub inputs: Vec<(BufferId, Type)>,
    pub outputs: Vec<(BufferId, Type)>,
}

/// Arena offsets are aligned for vector loads.
const ALIGN: usize = 64;

/// How much lowering fuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowerOptions {
    /// Fuse chains of elementwise ops into one map kernel (`--opt 1`).
    pub fuse_elementwise: bool,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions { fuse_elementwise: true }
    }
}

/// An elementwise result not written anywhere yet: an expression over
/// values read with the given strides, at the value's own shape. A consumer
/// of the same shape may inline it; anything else materialises it.
struct Pending {
    shape: Vec<usize>,
    inputs: Vec<(ValueId, Vec<isize>)>,
    expr: Expr,
    label: String,
}

struct Lowering<'g> {
    g: &'g Graph,
    buffers: Vec<Buffer>,
    /// Every materialised value's buffer (reshapes share their input's).
    of: HashMap<ValueId, BufferId>,
    pending: HashMap<ValueId, Pending>,
    kernels: Vec<Kernel>,
    opts: LowerOptions,
}

impl Expr {
    /// Replaces every `Input(i)` by `with[i]`.
    fn substitute(self, with: &[Expr]) -> Expr {
        let s = |e: Box<Expr>| Box::new(e.substitute(with));
        match self {
            Expr::Input(i) => with[i].clone(),
            Expr::F32(x) => Expr::F32(x),
            Expr::Unary(u, x) => Expr::Unary(u, s(x)),
            Expr::Binary(f, x, y) => Expr::Binary(f, s(x), s(y)),
            Expr::Compare(c, x, y) => Expr::Compare(c, s(x), s(y)),
            Expr::Logic(l, x, y) => Expr::Logic(l, s(x), s(y)),
            Expr::Not(x) => Expr::Not(s(x)),
            Expr::IsNaN(x) => Expr::IsNaN(s(x)),
            Expr::Select(c, x, y) => Expr::Select(s(c), s(x), s(y)),
            Expr::BoolToF32(x) => Expr::BoolToF32(s(x)),
            Expr::F32ToBool(x) => Expr::F32ToBool(s(x)),
        }
    }

    /// How many ops the expression computes.
    pub fn op_count(&self) -> usize {
        match self {
            Expr::Input(_) | Expr::F32(_) => 0,
            Expr::Unary(_, x) | Expr::Not(x) | Expr::IsNaN(x) | Expr::BoolToF32(x) | Expr::F32ToBool(x) => {
                1 + x.op_count()
            }
            Expr::Binary(_, x, y) | Expr::Compare(_, x, y) | Expr::Logic(_, x, y) => 1 + x.op_count() + y.op_count(),
            Expr::Select(c, x, y) => 1 + c.op_count() + x.op_count() + y.op_count(),
        }
    }
}

fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    egret_ir::strides_of(shape).into_iter().map(|s| s as isize).collect()
}

/// Strides of a tensor of `shape` read broadcast over `out` (numpy rules).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<isize> {
    let st = contiguous_strides(shape);
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 { 0 } else { st[i - off] }).collect()
}

/// Dtypes map kernels compute with.
fn mappable(d: DType) -> bool {
    matches!(d, DType::F32 | DType::Bool)
}

/// `x^p` for a constant exponent with an exact cheaper form: exporters
/// write `Pow(x, 2)` in layer norms and `Pow(x, 3)` in tanh-GELU, and a
/// libm call would keep the whole fused kernel scalar.
fn pow_by_constant(p: f32) -> Option<Expr> {
    use Expr::Input as I;
    let mul = |a, b| Expr::binary(Binary::Mul, a, b);
    Some(match p {
        1.0 => I(0),
        2.0 => mul(I(0), I(0)),
        3.0 => mul(mul(I(0), I(0)), I(0)),
        4.0 => {
            let sq = mul(I(0), I(0));
            mul(sq.clone(), sq)
        }
        0.5 => Expr::unary(Unary::Sqrt, I(0)),
        -1.0 => Expr::unary(Unary::Recip, I(0)),
        _ => return None,
    })
}

/// The expression of an elementwise op over inputs `in0, in1, ...`, if map
/// kernels support it.
fn elementwise_expr(op: &Op, in_types: &[&Type], out: &Type) -> Option<Expr> {
    use Expr::Input as I;
    let all_f32 = in_types.iter().all(|t| t.dtype == DType::F32);
    let all_bool = in_types.iter().all(|t| t.dtype == DType::Bool);
    let b = |x| Box::new(x);
    let un = |f| all_f32.then(|| Expr::unary(f, I(0)));
    let bin = |f| all_f32.then(|| Expr::binary(f, I(0), I(1)));
    let cmp = |c| all_f32.then(|| Expr::Compare(c, b(I(0)), b(I(1))));
    let logic = |l| all_bool.then(|| Expr::Logic(l, b(I(0)), b(I(1))));
    match op {
        Op::Neg => un(Unary::Neg),
        Op::Abs => un(Unary::Abs),
        Op::Sqrt => un(Unary::Sqrt),
        Op::Reciprocal => un(Unary::Recip),
        Op::Relu => un(Unary::Relu),
        Op::Floor => un(Unary::Floor),
        Op::Ceil => un(Unary::Ceil),
        Op::Round => un(Unary::Round),
        Op::Exp => un(Unary::Exp),
        Op::Log => un(Unary::Log),
        Op::Tanh => un(Unary::Tanh),
        Op::Erf => un(Unary::Erf),
        Op::Sigmoid => un(Unary::Sigmoid),
        Op::Sin => un(Unary::Sin),
        Op::Cos => un(Unary::Cos),
        Op::Add => bin(Binary::Add),
        Op::Sub => bin(Binary::Sub),
        Op::Mul => bin(Binary::Mul),
        Op::Div => bin(Binary::Div),
        Op::Max => bin(Binary::Max),
        Op::Min => bin(Binary::Min),
        Op::Pow => bin(Binary::Pow),
        Op::Equal => cmp(Compare::Eq),
        Op::Less => cmp(Compare::Lt),
        Op::LessOrEqual => cmp(Compare::Le),
        Op::Greater => cmp(Compare::Gt),
        Op::GreaterOrEqual => cmp(Compare::Ge),
        Op::And => logic(Logic::And),
        Op::Or => logic(Logic::Or),
        Op::Xor => logic(Logic::Xor),
        Op::Not if all_bool => Some(Expr::Not(b(I(0)))),
        Op::IsNaN if all_f32 => Some(Expr::IsNaN(b(I(0)))),
        Op::Where if in_types[0].dtype == DType::Bool && in_types[1].dtype == DType::F32 => {
            Some(Expr::Select(b(I(0)), b(I(1)), b(I(2))))
        }
        Op::Cast { to } => match (in_types[0].dtype, to) {
            (DType::Bool, DType::F32) => Some(Expr::BoolToF32(b(I(0)))),
            (DType::F32, DType::Bool) => Some(Expr::F32ToBool(b(I(0)))),
            (a, b2) if a == *b2 && mappable(a) => Some(I(0)),
            _ => None,
        },
        _ => None,
    }
    .filter(|_| mappable(out.dtype))
}

impl<'g> Lowering<'g> {
    fn new_buffer(&mut self, ty: &Type, storage: Storage) -> BufferId {
        self.buffers.push(Buffer { bytes: ty.numel() * ty.dtype.size_bytes(), storage });
        self.buffers.len() - 1
    }

    /// A fresh arena buffer for `v` (its offset is assigned later).
    fn define(&mut self, v: ValueId) -> BufferId {
        let b = self.new_buffer(&self.g.ty(v).clone(), Storage::Arena { offset: usize::MAX });
        self.of.insert(v, b);
        b
    }

    /// The buffer holding `v`, writing it first if it is still pending.
    fn buf(&mut self, v: ValueId) -> BufferId {
        if self.pending.contains_key(&v) {
            self.materialize(v);
        }
        self.of[&v]
    }

    fn operand(&mut self, v: ValueId, offset: isize, strides: Vec<isize>) -> Operand {
        Operand { buffer: self.buf(v), dtype: self.g.ty(v).dtype, offset, strides }
    }

    /// Emits the map kernel of a pending value, reading each distinct
    /// (value, strides) input once.
    fn materialize(&mut self, v: ValueId) {
        let p = self.pending.remove(&v).expect("materialize a pending value");
        let mut distinct: Vec<(ValueId, Vec<isize>)> = Vec::new();
        let remap: Vec<Expr> = p
            .inputs
            .into_iter()
            .map(|inp| {
                let at = distinct.iter().position(|d| *d == inp).unwrap_or_else(|| {
                    distinct.push(inp);
                    distinct.len() - 1
                });
                Expr::Input(at)
            })
            .collect();
        let expr = p.expr.substitute(&remap);
        let inputs: Vec<Operand> = distinct.into_iter().map(|(u, st)| self.operand(u, 0, st)).collect();
        self.define(v);
        let output = self.operand(v, 0, contiguous_strides(&p.shape));
        self.map(p.shape, inputs, output, expr, &p.label);
    }

    /// Lowers an elementwise op to a pending expression, inlining operands
    /// that are pending, read once, and of the same shape.
    fn elementwise(&mut self, out: ValueId, inputs: &[ValueId], expr: Expr, label: &str) {
        let g = self.g;
        let shape = g.ty(out).shape.clone();
        let mut reads: Vec<(ValueId, Vec<isize>)> = Vec::new();
        let mut with = Vec::with_capacity(inputs.len());
        for &v in inputs {
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
                reads.push((v, broadcast_strides(&g.ty(v).shape, &shape)));
            }
        }
        self.pending
            .insert(out, Pending { shape, inputs: reads, expr: expr.substitute(&with), label: label.to_string() });
        if !self.opts.fuse_elementwise {
            self.materialize(out);
        }
    }

    fn push(&mut self, kind: KernelKind, label: &str) {
        self.kernels.push(Kernel { kind, label: label.to_string() });
    }

    fn map(&mut self, shape: Vec<usize>, inputs: Vec<Operand>, output: Operand, expr: Expr, label: &str) {
        let (shape, mut ops) = collapse_dims(shape, inputs.into_iter().chain([output]).collect());
        let output = ops.pop().expect("the output operand");
        self.push(KernelKind::Map(MapKernel { shape, inputs: ops, output, expr }), label);
    }

    fn lower_node(&mut self, n: egret_ir::NodeId) {
        let g = self.g;
        let node = g.node(n);
        let label = node.label.as_str();
        let in_types: Vec<&Type> = node.inputs.iter().map(|&v| g.ty(v)).collect();
        match &node.op {
            Op::Input { .. } => {}
            Op::Const(t) => {
                let b = self.new_buffer(&t.ty(), Storage::Constant(t.clone()));
                self.of.insert(node.outputs[0], b);
            }
            // Same bytes, new shape: an alias.
            Op::Reshape { .. } | Op::Identity => {
                let src = self.buf(node.inputs[0]);
                self.of.insert(node.outputs[0], src);
            }
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
                if self.lower_layout(op, &node.inputs, &node.outputs, label) {
                    return;
                }
                if let Op::Conv { strides, pads, dilations, group: 1 } = op {
                    if in_types.iter().all(|t| t.dtype == DType::F32) {
                        self.conv(&node.inputs, out, strides, pads, dilations, label);
                        return;
                    }
                }
                if let Some(k) = self.rows(op, &node.inputs, &node.outputs) {
                    self.push(KernelKind::Rows(k), label);
                    return;
                }
                if let (Op::MatMul, true) = (op, in_types.iter().all(|t| t.dtype == DType::F32)) {
                    if let Some(k) = self.matmul(node.inputs[0], node.inputs[1], out) {
                        self.push(KernelKind::MatMul(k), label);
                        return;
                    }
                }
                let inputs = node.inputs.iter().map(|&v| (self.buf(v), g.ty(v).clone())).collect();
                let outputs = node.outputs.iter().map(|&v| (self.define(v), g.ty(v).clone())).collect();
                self.push(KernelKind::Reference { op: op.clone(), inputs, outputs }, label);
            }
        }
    }

    /// Transpose, slice, expand, concat and split as map kernels.
    fn lower_layout(&mut self, op: &Op, inputs: &[ValueId], outputs: &[ValueId], label: &str) -> bool {
        let g = self.g;
        let x = inputs[0];
        let xt = g.ty(x).clone();
        if !mappable(xt.dtype) {
            return false;
        }
        let xs = contiguous_strides(&xt.shape);
        match op {
            Op::Transpose { perm } => {
                let out = outputs[0];
                let out_shape = g.ty(out).shape.clone();
                let input = self.operand(x, 0, perm.iter().map(|&p| xs[p]).collect());
                self.define(out);
                let output = self.operand(out, 0, contiguous_strides(&out_shape));
                self.map(out_shape, vec![input], output, Expr::Input(0), label);
            }
            Op::Slice { starts, steps, .. } => {
                let out = outputs[0];
                let out_shape = g.ty(out).shape.clone();
                let offset: isize = starts.iter().zip(&xs).map(|(&s, &st)| s as isize * st).sum();
                let strides = steps.iter().zip(&xs).map(|(&s, &st)| s as isize * st).collect();
                let input = self.operand(x, offset, strides);
                self.define(out);
                let output = self.operand(out, 0, contiguous_strides(&out_shape));
                self.map(out_shape, vec![input], output, Expr::Input(0), label);
            }
            Op::Expand { shape } => {
                let out = outputs[0];
                let input = self.operand(x, 0, broadcast_strides(&xt.shape, shape));
                self.define(out);
                let output = self.operand(out, 0, contiguous_strides(shape));
                self.map(shape.clone(), vec![input], output, Expr::Input(0), label);
            }
            Op::Concat { axis } => {
                let out = outputs[0];
                let out_shape = g.ty(out).shape.clone();
                let os = contiguous_strides(&out_shape);
                self.define(out);
                let mut at = 0isize;
                for &v in inputs {
                    let shape = g.ty(v).shape.clone();
                    let input = self.operand(v, 0, contiguous_strides(&shape));
                    let output = self.operand(out, at * os[*axis], os.clone());
                    at += shape[*axis] as isize;
                    self.map(shape, vec![input], output, Expr::Input(0), label);
                }
            }
            Op::Split { axis, .. } => {
                let mut at = 0isize;
                for &out in outputs {
                    let shape = g.ty(out).shape.clone();
                    let input = self.operand(x, at * xs[*axis], xs.clone());
                    at += shape[*axis] as isize;
                    self.define(out);
                    let output = self.operand(out, 0, contiguous_strides(&shape));
                    self.map(shape, vec![input], output, Expr::Input(0), label);
                }
            }
            _ => return false,
        }
        true
    }

    /// An arena buffer that holds no graph value (a kernel's scratch).
    fn scratch(&mut self, dtype: DType, shape: &[usize]) -> BufferId {
        self.new_buffer(&Type::new(dtype, shape.to_vec()), Storage::Arena { offset: usize::MAX })
    }

    /// Convolution as im2col and a matmul: zero-pad if needed (a fill and a
    /// copy into the interior), gather the patches with one strided map
    /// (`cols[n, c, k.., o..]`), multiply by the weights viewed as
    /// `[M, C * prod(k)]`, and add the bias with a broadcast map.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        inputs: &[ValueId],
        out: ValueId,
        strides: &[usize],
        pads: &[usize],
        dilations: &[usize],
        label: &str,
    ) {
        let g = self.g;
        let (x, w) = (inputs[0], inputs[1]);
        let xs = g.ty(x).shape.clone();
        let ws = g.ty(w).shape.clone();
        let os = g.ty(out).shape.clone();
        let sp = xs.len() - 2;
        let (n, c, m) = (xs[0], xs[1], ws[0]);
        let kernel = &ws[2..];
        let out_sp = &os[2..];
        // The (padded) input as a buffer with its shape.
        let (src, src_shape) = if pads.iter().all(|&p| p == 0) {
            (self.buf(x), xs.clone())
        } else {
            let mut padded = xs.clone();
            for i in 0..sp {
                padded[2 + i] += pads[i] + pads[sp + i];
            }
            let pb = self.scratch(DType::F32, &padded);
            let pst = contiguous_strides(&padded);
            let fill = Operand { buffer: pb, dtype: DType::F32, offset: 0, strides: pst.clone() };
            self.map(padded.clone(), vec![], fill, Expr::F32(0.0), label);
            let interior: isize = (0..sp).map(|i| pads[i] as isize * pst[2 + i]).sum();
            let input = self.operand(x, 0, contiguous_strides(&xs));
            let dst = Operand { buffer: pb, dtype: DType::F32, offset: interior, strides: pst };
            self.map(xs.clone(), vec![input], dst, Expr::Input(0), label);
            (pb, padded)
        };
        let sst = contiguous_strides(&src_shape);
        // cols[n, c, k_1..k_d, o_1..o_d] = src[n, c, o_i * stride_i + k_i * dilation_i].
        let mut iter: Vec<usize> = vec![n, c];
        iter.extend(kernel);
        iter.extend(out_sp);
        let mut read: Vec<isize> = vec![sst[0], sst[1]];
        read.extend((0..sp).map(|i| sst[2 + i] * dilations[i] as isize));
        read.extend((0..sp).map(|i| sst[2 + i] * strides[i] as isize));
        let cols = self.scratch(DType::F32, &iter);
        let patch = Operand { buffer: src, dtype: DType::F32, offset: 0, strides: read };
        let cols_op = Operand { buffer: cols, dtype: DType::F32, offset: 0, strides: contiguous_strides(&iter) };
        self.map(iter, vec![patch], cols_op, Expr::Input(0), label);
        let k: usize = c * kernel.iter().product::<usize>();
        let p: usize = out_sp.iter().product();
        let wb = self.buf(w);
        let bias = inputs.get(2).copied();
        let product = if bias.is_some() { self.scratch(DType::F32, &os) } else { self.define(out) };
        let batches = (0..n).map(|b| [0, b * k * p, b * m * p]).collect();
        self.push(KernelKind::MatMul(MatMulKernel { m, k, n: p, a: wb, b: cols, c: product, batches }), label);
        if let Some(bias) = bias {
            let prod_op = Operand { buffer: product, dtype: DType::F32, offset: 0, strides: contiguous_strides(&os) };
            let mut bias_strides = vec![0isize; os.len()];
            bias_strides[1] = 1;
            let bias_op = self.operand(bias, 0, bias_strides);
            self.define(out);
            let dst = self.operand(out, 0, contiguous_strides(&os));
            self.map(os, vec![prod_op, bias_op], dst, Expr::binary(Binary::Add, Expr::Input(0), Expr::Input(1)), label);
        }
    }

    /// Softmax over the last axis, norms whose statistics nobody reads, and
    /// reductions over trailing axes, on f32.
    fn rows(&mut self, op: &Op, inputs: &[ValueId], outputs: &[ValueId]) -> Option<RowKernel> {
        let g = self.g;
        let x = inputs[0];
        let shape = &g.ty(x).shape;
        if g.ty(x).dtype != DType::F32 || shape.is_empty() {
            return None;
        }
        let rank = shape.len();
        // The trailing `len` elements of each row must be contiguous.
        let split = |axis: usize| (shape[..axis].iter().product::<usize>(), shape[axis..].iter().product::<usize>());
        let params_fit = |from: usize| {
            inputs[1..]
                .iter()
                .all(|&p| g.ty(p).dtype == DType::F32 && g.ty(p).numel() == shape[from..].iter().product::<usize>())
        };
        let (op, axis) = match op {
            Op::Softmax { axis } if *axis == rank - 1 => (RowOp::Softmax, *axis),
            Op::LogSoftmax { axis } if *axis == rank - 1 => (RowOp::LogSoftmax, *axis),
            Op::LayerNorm { axis, epsilon }
                if outputs[1..].iter().all(|&v| g.use_count(v) == 0) && params_fit(*axis) =>
            {
                (RowOp::LayerNorm { epsilon: *epsilon }, *axis)
            }
            Op::RmsNorm { axis, epsilon } if params_fit(*axis) => (RowOp::RmsNorm { epsilon: *epsilon }, *axis),
            Op::Reduce { kind, axes, .. }
                if !axes.is_empty() && axes.iter().enumerate().all(|(i, &a)| a == rank - axes.len() + i) =>
            {
                use egret_ir::op::ReduceKind as K;
                let r = match kind {
                    K::Sum => RowOp::Sum,
                    K::Mean => RowOp::Mean,
                    K::Max => RowOp::Max,
                    K::Min => RowOp::Min,
                    K::SumSquare => RowOp::SumSquare,
                    K::L2 => RowOp::L2,
                    _ => return None,
                };
                (r, axes[0])
            }
            _ => return None,
        };
        let (rows, len) = split(axis);
        if len == 0 {
            return None;
        }
        let xb = self.buf(x);
        let scale = inputs.get(1).map(|&v| self.buf(v));
        let bias = inputs.get(2).map(|&v| self.buf(v));
        let out = self.define(outputs[0]);
        for &extra in &outputs[1..] {
            // Unused statistics outputs still get (never written) storage.
            self.define(extra);
        }
        Some(RowKernel { rows, len, op, x: xb, scale, bias, out })
    }

    fn matmul(&mut self, a: ValueId, b: ValueId, c: ValueId) -> Option<MatMulKernel> {
        let g = self.g;
        let (sa, sb, sc) = (g.ty(a).shape.clone(), g.ty(b).shape.clone(), g.ty(c).shape.clone());
        // 1-d operands are rare in transformer graphs; the reference path keeps them.
        if sa.len() < 2 || sb.len() < 2 {
            return None;
        }
        let (m, k, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
        let batch = &sc[..sc.len() - 2];
        let a_off = broadcast_strides(&sa[..sa.len() - 2], batch);
        let b_off = broadcast_strides(&sb[..sb.len() - 2], batch);
        let nb: usize = batch.iter().product();
        let mut batches = Vec::with_capacity(nb);
        let bs = egret_ir::strides_of(batch);
        for i in 0..nb {
            let (mut oa, mut ob) = (0usize, 0usize);
            for d in 0..batch.len() {
                let idx = (i / bs[d]) % batch[d];
                oa += idx * a_off[d] as usize;
                ob += idx * b_off[d] as usize;
            }
            batches.push([oa * m * k, ob * k * n, i * m * n]);
        }
        let (ab, bb) = (self.buf(a), self.buf(b));
        let cb = self.define(c);
        Some(MatMulKernel { m, k, n, a: ab, b: bb, c: cb, batches })
    }
}

/// Merges adjacent dims that every operand walks contiguously, and drops
/// dims of size 1, so most kernels run one long inner loop.
fn collapse_dims(shape: Vec<usize>, mut ops: Vec<Operand>) -> (Vec<usize>, Vec<Operand>) {
    let keep: Vec<usize> = (0..shape.len()).filter(|&i| shape[i] != 1).collect();
    let mut out_shape: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<isize>> = vec![Vec::new(); ops.len()];
    for &d in &keep {
        let mergeable = !out_shape.is_empty()
            && ops.iter().enumerate().all(|(k, o)| *out_strides[k].last().unwrap() == o.strides[d] * shape[d] as isize);
        if mergeable {
            *out_shape.last_mut().unwrap() *= shape[d];
            for (k, o) in ops.iter().enumerate() {
                *out_strides[k].last_mut().unwrap() = o.strides[d];
            }
        } else {
            out_shape.push(shape[d]);
            for (k, o) in ops.iter().enumerate() {
                out_strides[k].push(o.strides[d]);
            }
        }
    }
    for (o, s) in ops.iter_mut().zip(out_strides) {
        o.strides = s;
    }
    (out_shape, ops)
}

/// Lowers a canonical, verified graph to a plan.
pub fn lower(g: &Graph, opts: LowerOptions) -> Result<Plan, IrError> {
    egret_ir::verify(g)?;
    let mut l = Lowering { g, buffers: vec![], of: HashMap::new(), pending: HashMap::new(), kernels: vec![], opts };
    let mut inputs = Vec::new();
    for (i, &v) in g.inputs().iter().enumerate() {
        let ty = g.ty(v).clone();
        let b = l.new_buffer(&ty, Storage::Input(i));
        l.of.insert(v, b);
        inputs.push((b, ty));
    }
    for n in g.topo_order()? {
        l.lower_node(n);
    }
    let outputs: Vec<(BufferId, Type)> = g.outputs().iter().map(|(_, v)| (l.buf(*v), g.ty(*v).clone())).collect();
    debug_assert!(l.pending.is_empty(), "every pending value is read by something");
    let mut plan = Plan { buffers: l.buffers, kernels: l.kernels, arena_bytes: 0, inputs, outputs };
    plan_memory(&mut plan);
    Ok(plan)
}

/// Assigns arena offsets by liveness: a buffer is live from the kernel that
/// first writes it to the last kernel that reads it (graph outputs to the
/// end). First fit over the free intervals, every offset aligned.
fn plan_memory(plan: &mut Plan) {
    let n = plan.kernels.len();
    let mut first = vec![usize::MAX; plan.buffers.len()];
    let mut last = vec![0usize; plan.buffers.len()];
    for (step, k) in plan.kernels.iter().enumerate() {
        let (reads, writes) = k.buffers();
        for b in writes {
            first[b] = first[b].min(step);
            last[b] = last[b].max(step);
        }
        for b in reads {
            last[b] = last[b].max(step);
        }
    }
    for (b, _) in &plan.outputs {
        last[*b] = n;
    }
    // Live intervals in the arena: (offset, size, last step).
    let mut live: Vec<(usize, usize, usize)> = Vec::new();
    let mut top = 0usize;
    for step in 0..n {
        live.retain(|&(_, _, l)| l >= step);
        let mut defs: Vec<BufferId> = (0..plan.buffers.len())
            .filter(|&b| first[b] == step && matches!(plan.buffers[b].storage, Storage::Arena { .. }))
            .collect();
        defs.sort();
        for b in defs {
            let size = plan.buffers[b].bytes.div_ceil(ALIGN) * ALIGN;
            live.sort();
            // The lowest gap between live intervals that fits.
            let mut at = 0usize;
            for &(o, s, _) in &live {
                if o >= at + size {
                    break;
                }
                at = at.max((o + s).div_ceil(ALIGN) * ALIGN);
            }
            live.push((at, size.max(ALIGN), last[b]));
            top = top.max(at + size);
            plan.buffers[b].storage = Storage::Arena { offset: at };
        }
    }
    plan.arena_bytes = top;
}

impl Plan {
    /// One line per kernel, for `egret explain` and snapshots.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (i, k) in self.kernels.iter().enumerate() {
            let detail = match &k.kind {
                KernelKind::Map(m) => format!("{:?} {}", m.shape, m.expr),
                KernelKind::MatMul(mm) => {
                    format!("{}x{}x{} x{} batches", mm.m, mm.k, mm.n, mm.batches.len())
                }
                KernelKind::Rows(r) => format!("{:?} {} rows of {}", r.op, r.rows, r.len),
                KernelKind::Reference { op, .. } => op.name().to_string(),
            };
            s.push_str(&format!("k{i} {} {detail}  # {}\n", k.kind_name(), k.label));
        }
        s.push_str(&format!("arena {} bytes\n", self.arena_bytes));
        s
    }
}
