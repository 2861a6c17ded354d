//! The kernel plan: what every backend compiles.
//!
//! Lowering turns a canonical graph into a list of kernels of a small, closed
//! set of kinds, each with its shapes and strides, plus a memory plan: graph
//! inputs and constants keep their own storage, every other value lives in one
//! arena at an offset chosen by liveness, and reshapes are aliases that cost
//! nothing. Nothing here is specific to one backend.
//!
//! A plan may keep some of a model's symbols (`Plan::symbols`): then a
//! map's extents, strides and offsets, a product's or row kernel's rows, a
//! gather's counts, attention's query and key counts, offsets and batch
//! axis, and the buffers' byte counts are `Dim` expressions of them that
//! the runtime evaluates on each call, and the arena is laid out for the
//! values a call has (`memory::layout_at`; laid out again, larger, when a
//! call goes past it). Everything else is known: `lower::symbols_to_bind`
//! says which symbols a graph must have values for first.

use egret_ir::{Bindings, DType, Dim, DimValues, Op, Tensor, Type};
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
    /// Bytes on the CPU (`dtype`'s size per element).
    pub bytes: Dim,
    pub dtype: DType,
    pub storage: Storage,
}

/// A strided view of a buffer, in elements of `dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct Operand {
    pub buffer: BufferId,
    pub dtype: DType,
    pub offset: Dim,
    /// One stride per dim of the kernel's iteration space (0 broadcasts).
    pub strides: Vec<Dim>,
}

impl Operand {
    /// Whether no offset or stride depends on a symbol.
    pub fn is_known(&self) -> bool {
        self.offset.is_known() && self.strides.iter().all(|d| d.is_known())
    }

    /// The offset in a bound plan (the GPU backends and artifacts see only
    /// those: `Plan::is_bound`).
    pub fn known_offset(&self) -> isize {
        known(self.offset)
    }

    /// The strides in a bound plan.
    pub fn known_strides(&self) -> Vec<isize> {
        self.strides.iter().map(|&d| known(d)).collect()
    }
}

/// The value of a size in a bound plan: the backends that compile only
/// bound plans check `Plan::is_bound` first, so a symbol here is a bug.
pub fn known(d: Dim) -> isize {
    d.known().and_then(|v| isize::try_from(v).ok()).unwrap_or_else(|| panic!("{d} is symbolic in a bound plan"))
}

/// `known` for a size (not negative).
pub fn known_size(d: Dim) -> usize {
    d.size().unwrap_or_else(|| panic!("{d} is symbolic in a bound plan"))
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
    /// `0.5 x (1 + erf(x / sqrt 2))`. The activations are one function each
    /// (not expanded into the others) because they read `x` more than once:
    /// expanded, an epilogue would evaluate the expression that gives `x`
    /// (the product plus a bias) once per read, in passes of its own.
    Gelu,
    /// GELU's tanh approximation, `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
    GeluTanh,
    /// `x sigmoid(x)`.
    Silu,
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
    /// A signed integer operand (i32 or i64) to f32.
    IntToF32(Box<Expr>),
    /// A signed integer operand to bool (non-zero).
    IntToBool(Box<Expr>),
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
            Expr::IntToF32(x) => write!(f, "F32({x})"),
            Expr::IntToBool(x) => write!(f, "Bool({x})"),
        }
    }
}

/// `out[i] = expr(in_0[i], in_1[i], ...)` over an iteration space, every
/// operand strided. Elementwise ops, broadcasts, transposes, slices and the
/// pieces of concat and split are all map kernels.
#[derive(Clone, Debug, PartialEq)]
pub struct MapKernel {
    pub shape: Vec<Dim>,
    pub inputs: Vec<Operand>,
    pub output: Operand,
    pub expr: Expr,
}

impl MapKernel {
    /// The iteration space of a bound plan's map.
    pub fn sizes(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| known_size(d)).collect()
    }
}

/// An elementwise tail fused into a matmul: each element of the product
/// becomes `expr` of it (`in0`) and of `inputs` (`in1`, ...), read at the
/// same row and column. A bias add, an activation and a residual add all
/// fit; the product is never written out in between.
#[derive(Clone, Debug, PartialEq)]
pub struct Epilogue {
    pub expr: Expr,
    pub inputs: Vec<EpilogueInput>,
}

/// An epilogue operand: element `(i, j)` of the `m x n` product reads
/// `buffer[offset + i * strides[0] + j * strides[1]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct EpilogueInput {
    pub buffer: BufferId,
    pub offset: isize,
    pub strides: [isize; 2],
}

/// The deepest expression an epilogue evaluates (its evaluation stack).
pub const EPILOGUE_MAX_DEPTH: usize = 8;
/// The most operands an epilogue reads besides the product.
pub const EPILOGUE_MAX_INPUTS: usize = 8;

impl Epilogue {
    /// Whether `expr` is float arithmetic shallow enough for an epilogue.
    pub fn supports(expr: &Expr) -> bool {
        fn depth(e: &Expr) -> Option<usize> {
            match e {
                Expr::Input(_) | Expr::F32(_) => Some(1),
                Expr::Unary(_, x) => depth(x),
                // The left operand's value waits on the stack while the right is evaluated.
                Expr::Binary(_, x, y) => Some(depth(x)?.max(depth(y)? + 1)),
                _ => None,
            }
        }
        depth(expr).is_some_and(|d| d <= EPILOGUE_MAX_DEPTH)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatMulImpl {
    /// A tuned GEMM library called from the generated code.
    Library,
    /// Register-tiled f32x4 code generated by the backend itself.
    Generated,
    /// The kernel library's GEMM over a constant `b` that the CPU's choice
    /// step packed into panels (`cpu::choose::pack_panels`), so no run
    /// repacks it.
    Packed,
    /// None chosen: a neutral plan (`LowerOptions::neutral`), whose backend
    /// tiles the product itself (the GPU backends).
    Unchosen,
}

/// `c[batch] = a[batch] @ b[batch]` in f32. Each operand is a strided view:
/// per batch an element offset, and a row and a column stride (so
/// transposed operands cost nothing). `c` is written row-major. The rows
/// `m` may be symbolic (a sequence's tokens) in a single-batch product of
/// known strides and offsets; every other size is known.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMulKernel {
    pub m: Dim,
    pub k: usize,
    pub n: usize,
    pub a: BufferId,
    pub b: BufferId,
    pub c: BufferId,
    /// Row and column strides of `a` ([m, k]) and `b` ([k, n]), in elements.
    pub a_strides: [isize; 2],
    pub b_strides: [isize; 2],
    /// Per batch: element offsets of a, b and c.
    pub batches: Vec<[isize; 3]>,
    /// `Unchosen` in a plan from lowering; set by the backend's own step
    /// (`cpu::choose`).
    pub implementation: MatMulImpl,
    /// What was forced (ahead-of-time code, `--matmul`) or what the
    /// optimiser's cost model picked (`matmul_tiled`), if anything: a hint
    /// for the CPU's choice.
    pub hint: Option<MatMulImpl>,
    /// `b` is a constant laid out at compile time by the CPU's choice step
    /// (`b_strides` then describe nothing): for the generated kernel
    /// `[n / 8][k][8]` panels, then the last `n % 8` columns row-major; for
    /// `Packed`, always set, the kernel library's packed weight
    /// (`cpu::choose::pack_weight`).
    pub b_packed: bool,
    /// Applied to the product in place (single-batch products only).
    pub epilogue: Option<Epilogue>,
    /// Each row of `a` as an element offset into its buffer, for a layout
    /// no strides describe (rows an exporter permuted: a Swin window
    /// partition after a roll). Single-batch `Packed` products only;
    /// `a_strides[0]` is then unused.
    pub a_rows: Option<Vec<i64>>,
    /// Where each row of the product goes, as an element offset into `c`,
    /// when the rows an exporter permutes after the product (a Swin window
    /// reverse and roll back) are placed by the GEMM itself. Single-batch
    /// `Packed` products only; every row of `c` receives one.
    pub c_rows: Option<Vec<i64>>,
}

impl MatMulKernel {
    /// Whether the generated kernel can compute this product: it loads `b`
    /// rows as vectors, so `b` must be unit-stride along its columns.
    pub fn can_generate(&self) -> bool {
        self.b_packed || self.b_strides[1] == 1
    }
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
    /// May be symbolic.
    pub rows: Dim,
    /// May be symbolic (a sum over a sequence): the generated kernel reads
    /// it from its size slot then; the kernel library's rows take it known.
    pub len: Dim,
    pub op: RowOp,
    pub x: BufferId,
    pub scale: Option<BufferId>,
    pub bias: Option<BufferId>,
    pub out: BufferId,
    /// A residual added to `x` first (a norm only): the row kernel then
    /// normalises `x + residual` and also writes that sum to `sum`.
    pub residual: Option<(BufferId, BufferId)>,
}

/// `out[o, j, :] = data[o, indices[j], :]` over `[outer, axis_len, inner]`
/// data, any element type. Every index is checked: a negative one counts
/// from the end, one out of range makes the kernel fail with status 1.
#[derive(Clone, Debug, PartialEq)]
pub struct GatherKernel {
    /// May be symbolic, as may `n_indices`.
    pub outer: Dim,
    /// May be symbolic (a mask flattened over `batch * total`): the kernel
    /// reads it from its size slot then.
    pub axis_len: Dim,
    pub inner: usize,
    pub n_indices: Dim,
    pub elem_bytes: usize,
    /// Whether indices are i64 (else i32).
    pub wide_indices: bool,
    pub data: BufferId,
    pub indices: BufferId,
    pub out: BufferId,
}

/// Attention in one kernel, flash-style: per batch and block of `block`
/// query rows, the keys are visited `key_block` at a time; each block's
/// scores go to a scratch tile, are scaled, masked and exponentiated against
/// a running row maximum (an online softmax), and are multiplied by that
/// block of `v` into the output. The full score matrix is never written to
/// memory. Operands are strided views; the mask broadcasts. The queries'
/// and keys' counts, the strides and the offsets may be symbolic (a
/// sequence, a decoder's past length); the heads and head sizes are known.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionKernel {
    pub sq: Dim,
    pub sk: Dim,
    pub d: usize,
    pub dv: usize,
    pub scale: f32,
    /// Scaled scores s become `cap * tanh(s / cap)` before the mask.
    pub softcap: Option<f32>,
    pub nan_to_zero: bool,
    /// Query rows per tile.
    pub block: usize,
    /// Keys per tile.
    pub key_block: usize,
    pub q: BufferId,
    pub kt: BufferId,
    pub v: BufferId,
    pub mask: Option<BufferId>,
    pub out: BufferId,
    /// Row and column strides (elements) of q, kt, v and the mask.
    pub q_strides: [Dim; 2],
    pub kt_strides: [Dim; 2],
    pub v_strides: [Dim; 2],
    pub mask_strides: [Dim; 2],
    /// Elements between consecutive rows of the output (`dv` when dense;
    /// more when the heads write into a `[.., sq, heads, dv]` layout).
    pub out_row_stride: Dim,
    /// Per batch: element offsets of q, kt, v, the mask and the output.
    pub batches: Vec<[Dim; 5]>,
    /// A symbolic outermost batch axis (a model's batch): `batches` then
    /// lists the batches of one of its entries (the heads), and entry `b`
    /// adds `b` times `strides` to each offset. `None`: `batches` lists
    /// them all.
    pub outer: Option<OuterBatch>,
    /// With a mask known at compile time, the keys each task (batch-major,
    /// then query block) visits, `first..end`: its rows' live spans
    /// (`egret_ir::ops::linalg::live_key_spans`). `None`: every key.
    pub key_spans: Option<Vec<[usize; 2]>>,
}

/// One strided walk over a buffer: from element `at`, `dims[d].0` steps of
/// `dims[d].1` elements along each dim, `elem` bytes an element.
#[derive(Clone, Debug, PartialEq)]
pub struct Walk {
    pub buffer: BufferId,
    pub elem: i64,
    pub at: Dim,
    pub dims: Vec<(Dim, Dim)>,
}

impl Walk {
    /// The bytes `[first, end)` the walk reaches at `values`, or `None` if
    /// it takes no step (a dim of no elements).
    pub fn span_at(&self, values: &DimValues) -> Result<Option<(BufferId, i64, i64)>, String> {
        let at = values.get(self.at)?;
        let (mut lo, mut hi) = (at, at);
        for &(n, step) in &self.dims {
            let (n, step) = (values.get(n)?, values.get(step)?);
            if n <= 0 {
                return Ok(None);
            }
            let reach = (n - 1).saturating_mul(step);
            if reach < 0 {
                lo = lo.saturating_add(reach);
            } else {
                hi = hi.saturating_add(reach);
            }
        }
        Ok(Some((self.buffer, lo.saturating_mul(self.elem), hi.saturating_add(1).saturating_mul(self.elem))))
    }
}

/// A symbolic batch axis outside an attention kernel's listed batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OuterBatch {
    pub count: Dim,
    /// Element strides of q, kt, v, the mask and the output along it.
    pub strides: [Dim; 5],
}

impl AttentionKernel {
    /// Query blocks per batch of a kernel whose queries are known.
    pub fn blocks_per_batch(&self) -> usize {
        known_size(self.sq).div_ceil(self.block)
    }

    /// Whether no size, stride or offset depends on a symbol.
    pub fn is_known(&self) -> bool {
        self.dims().iter().all(|d| d.is_known())
    }

    /// Every size, stride and offset that may be symbolic.
    pub fn dims(&self) -> Vec<Dim> {
        let mut dims = vec![self.sq, self.sk, self.out_row_stride];
        for st in [self.q_strides, self.kt_strides, self.v_strides, self.mask_strides] {
            dims.extend(st);
        }
        dims.extend(self.batches.iter().flatten());
        if let Some(o) = &self.outer {
            dims.push(o.count);
            dims.extend(o.strides);
        }
        dims
    }

    /// How many batches, at the symbols' nominal values.
    pub fn estimated_batches(&self) -> usize {
        self.batches.len() * self.outer.map_or(1, |o| o.count.estimate())
    }

    /// The kernel with every symbol given its value.
    pub fn at(&self, values: &DimValues) -> Result<AttentionKernel, String> {
        let v = |d: Dim| values.get(d).and_then(|x| Dim::int(x).ok_or_else(|| format!("{d} is out of range")));
        let pair = |p: [Dim; 2]| -> Result<[Dim; 2], String> { Ok([v(p[0])?, v(p[1])?]) };
        // Every batch listed: the outer axis's entries one after another.
        let (count, strides) = match &self.outer {
            Some(o) => (values.size(o.count), o.strides),
            None => (1, [Dim::new(0); 5]),
        };
        let mut batches = Vec::with_capacity(self.batches.len() * count);
        for entry in 0..count as isize {
            for b in &self.batches {
                let at = |i: usize| v(b[i] + strides[i] * entry);
                batches.push([at(0)?, at(1)?, at(2)?, at(3)?, at(4)?]);
            }
        }
        let sq = v(self.sq)?;
        Ok(AttentionKernel {
            // Tiles were chosen for nominal sizes: no more query rows per
            // tile than the call has, as a bound plan clamps them.
            block: self.block.min(sq.size().unwrap_or(1).max(1)),
            sq,
            sk: v(self.sk)?,
            q_strides: pair(self.q_strides)?,
            kt_strides: pair(self.kt_strides)?,
            v_strides: pair(self.v_strides)?,
            mask_strides: pair(self.mask_strides)?,
            out_row_stride: v(self.out_row_stride)?,
            batches,
            outer: None,
            ..self.clone()
        })
    }

    /// The key count at the symbols' nominal values, for reports.
    fn estimated_sk(&self) -> usize {
        self.sk.estimate()
    }

    /// Score elements (query row x key pairs) the kernel computes per run
    /// (at the symbols' nominal values, if any).
    pub fn scores_computed(&self) -> usize {
        match &self.key_spans {
            None => self.estimated_batches() * self.sq.estimate() * self.estimated_sk(),
            Some(spans) => spans
                .iter()
                .enumerate()
                .map(|(task, &[first, end])| {
                    // Key spans come from a constant mask: the queries are known.
                    let row0 = (task % self.blocks_per_batch()) * self.block;
                    self.block.min(known_size(self.sq) - row0) * (end - first)
                })
                .sum(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum KernelKind {
    Attention(AttentionKernel),
    Map(MapKernel),
    MatMul(MatMulKernel),
    Rows(RowKernel),
    Gather(GatherKernel),
    /// An op with no native kernel yet: the runtime evaluates it with the
    /// IR's reference semantics on the buffers' bytes.
    Reference {
        op: Op,
        inputs: Vec<(BufferId, Type)>,
        outputs: Vec<(BufferId, Type)>,
    },
    /// A reference op the CPU backend compiles as a plain loop nest over
    /// its reference semantics (`cpu::choose` turns such `Reference`
    /// kernels into this; lowering never makes one): integer sums,
    /// differences and products with broadcasting, cumulative sums, and
    /// reshapes, the position-id arithmetic exporters write. The GPU
    /// backends compile the same ops from `Reference` (`gpu::integer`).
    Loop {
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
            KernelKind::Attention(_) => "attention",
            KernelKind::MatMul(_) => "matmul",
            KernelKind::Rows(_) => "rows",
            KernelKind::Gather(_) => "gather",
            KernelKind::Reference { .. } => "reference",
            KernelKind::Loop { .. } => "loop",
        }
    }

    /// The kind with its variant: `matmul:library`, `reference:softmax`, ...
    pub fn detailed_kind(&self) -> String {
        match &self.kind {
            KernelKind::MatMul(mm) => {
                let variant = match mm.implementation {
                    MatMulImpl::Library => "library",
                    MatMulImpl::Generated => "generated",
                    MatMulImpl::Packed => "packed",
                    MatMulImpl::Unchosen => return "matmul".into(),
                };
                format!("matmul:{variant}")
            }
            KernelKind::Reference { op, .. } => format!("reference:{}", op.name()),
            KernelKind::Loop { op, .. } => format!("loop:{}", op.name()),
            _ => self.kind_name().to_string(),
        }
    }

    /// Floating-point operations per run (multiply-adds count two).
    pub fn flops(&self) -> u64 {
        match &self.kind {
            KernelKind::Map(m) => {
                m.shape.iter().map(|d| d.estimate() as u64).product::<u64>() * m.expr.op_count() as u64
            }
            KernelKind::MatMul(mm) => 2 * (mm.m.estimate() * mm.k * mm.n * mm.batches.len()) as u64,
            KernelKind::Attention(a) => (a.scores_computed() * (2 * a.d + 2 * a.dv + 5)) as u64,
            KernelKind::Rows(r) => (r.rows.estimate() * r.len.estimate()) as u64 * if r.op.reduces() { 1 } else { 5 },
            KernelKind::Gather(_) | KernelKind::Reference { .. } | KernelKind::Loop { .. } => 0,
        }
    }

    /// The symbolic sizes a kernel's generated code reads when it runs, in
    /// the order of the argument slots after its operands' addresses: a
    /// map's extents, offsets and strides that depend on a symbol. (An
    /// attention kernel reads its symbolic parameters through a block the
    /// runtime fills instead; every other kind is planned bound.)
    pub fn runtime_dims(&self) -> Vec<Dim> {
        let all: Vec<Dim> = match &self.kind {
            KernelKind::Map(m) => {
                let operands = m.inputs.iter().chain([&m.output]);
                let offsets_and_strides = operands.flat_map(|o| std::iter::once(&o.offset).chain(&o.strides));
                m.shape.iter().chain(offsets_and_strides).copied().collect()
            }
            KernelKind::MatMul(mm) => vec![mm.m],
            // The rows are the kernel's extent; their length a slot.
            KernelKind::Rows(r) => vec![r.len],
            KernelKind::Gather(g) => vec![g.outer, g.n_indices, g.axis_len],
            KernelKind::Loop { op: Op::Shape { start, end }, inputs, .. } => inputs[0].1.shape[*start..*end].to_vec(),
            KernelKind::Loop { op: Op::Range { .. }, outputs, .. } => outputs[0].1.shape.clone(),
            // Gathers: every operand's extents and row-major strides, the
            // tuples' count and the copied rows' length.
            KernelKind::Loop { op: Op::GatherElements { .. } | Op::GatherND { .. }, inputs, outputs } => {
                let mut dims = vec![];
                for (_, t) in inputs.iter().chain(outputs) {
                    dims.extend(&t.shape);
                    dims.extend(dense_strides(&t.shape));
                }
                let (data, indices) = (&inputs[0].1.shape, &inputs[1].1.shape);
                if let Some(r) = indices.last().and_then(|d| d.size()) {
                    dims.push(indices[..indices.len() - 1].iter().fold(Dim::new(1), |a, &d| a * d));
                    dims.push(data.get(r..).unwrap_or_default().iter().fold(Dim::new(1), |a, &d| a * d));
                }
                dims
            }
            // Elementwise integer ops: the output's extents and each operand's strides.
            KernelKind::Loop { inputs, outputs, .. } if !outputs[0].1.is_known() => {
                let out = &outputs[0].1.shape;
                let mut dims = out.clone();
                for (_, t) in inputs.iter().chain(outputs) {
                    dims.extend(broadcast_dims(&t.shape, out).unwrap_or_default());
                }
                dims
            }
            _ => vec![],
        };
        let mut dims: Vec<Dim> = Vec::new();
        for d in all {
            if !d.is_known() && !dims.contains(&d) {
                dims.push(d);
            }
        }
        dims
    }

    /// The strided walks the kernel makes over its operands, as
    /// expressions of the plan's symbols: `Plan::spans_at` evaluates those
    /// a call must check for the JIT's runtimes, and the C artifact prints
    /// them as its checks (`Plan::walks_to_check`).
    pub fn walks(&self) -> Vec<Walk> {
        let int = |x: i64| Dim::saturating(x);
        let walk = |buffer: BufferId, elem: usize, at: Dim, dims: &[(Dim, Dim)]| Walk {
            buffer,
            elem: elem as i64,
            at,
            dims: dims.to_vec(),
        };
        let mut walks = Vec::new();
        match &self.kind {
            KernelKind::Map(m) => {
                for o in m.inputs.iter().chain([&m.output]) {
                    let dims: Vec<(Dim, Dim)> = m.shape.iter().copied().zip(o.strides.iter().copied()).collect();
                    walks.push(walk(o.buffer, o.dtype.size_bytes(), o.offset, &dims));
                }
            }
            KernelKind::MatMul(mm) => {
                let (m, k, n) = (mm.m, Dim::new(mm.k), Dim::new(mm.n));
                let [a_rs, a_cs] = mm.a_strides.map(|s| int(s as i64));
                let [b_rs, b_cs] = mm.b_strides.map(|s| int(s as i64));
                for offs in &mm.batches {
                    let [oa, ob, oc] = offs.map(|o| int(o as i64));
                    walks.push(walk(mm.a, 4, oa, &[(m, a_rs), (k, a_cs)]));
                    if !mm.b_packed {
                        walks.push(walk(mm.b, 4, ob, &[(k, b_rs), (n, b_cs)]));
                    }
                    walks.push(walk(mm.c, 4, oc, &[(m, n), (n, Dim::new(1))]));
                }
                for e in mm.epilogue.iter().flat_map(|e| &e.inputs) {
                    let [rs, cs] = e.strides.map(|s| int(s as i64));
                    walks.push(walk(e.buffer, 4, int(e.offset as i64), &[(m, rs), (n, cs)]));
                }
            }
            KernelKind::Rows(r) => {
                let len = r.len;
                let out_len = if r.op.reduces() { Dim::new(1) } else { len };
                let whole = |b: BufferId, row: Dim| walk(b, 4, Dim::new(0), &[(r.rows * row, Dim::new(1))]);
                walks.push(whole(r.x, len));
                walks.push(whole(r.out, out_len));
                if let Some((res, sum)) = r.residual {
                    walks.push(whole(res, len));
                    walks.push(whole(sum, len));
                }
            }
            KernelKind::Gather(g) => {
                let index_bytes = if g.wide_indices { 8 } else { 4 };
                let row = g.inner * g.elem_bytes;
                let one = Dim::new(1);
                walks.push(walk(g.indices, index_bytes, Dim::new(0), &[(g.n_indices, one)]));
                walks.push(walk(g.out, row, Dim::new(0), &[(g.outer * g.n_indices, one)]));
                walks.push(walk(g.data, row, Dim::new(0), &[(g.outer * g.axis_len, one)]));
            }
            KernelKind::Attention(a) => {
                let (d, dv) = (Dim::new(a.d), Dim::new(a.dv));
                for offs in &a.batches {
                    // The outer batch axis, if any, is one more dim of every walk.
                    let along = |i: usize, rest: &[(Dim, Dim)]| -> Vec<(Dim, Dim)> {
                        a.outer.iter().map(|o| (o.count, o.strides[i])).chain(rest.iter().copied()).collect()
                    };
                    walks.push(walk(a.q, 4, offs[0], &along(0, &[(a.sq, a.q_strides[0]), (d, a.q_strides[1])])));
                    walks.push(walk(a.kt, 4, offs[1], &along(1, &[(d, a.kt_strides[0]), (a.sk, a.kt_strides[1])])));
                    walks.push(walk(a.v, 4, offs[2], &along(2, &[(a.sk, a.v_strides[0]), (dv, a.v_strides[1])])));
                    if let Some(m) = a.mask {
                        let dims = along(3, &[(a.sq, a.mask_strides[0]), (a.sk, a.mask_strides[1])]);
                        walks.push(walk(m, 4, offs[3], &dims));
                    }
                    walks.push(walk(a.out, 4, offs[4], &along(4, &[(a.sq, a.out_row_stride), (dv, Dim::new(1))])));
                }
            }
            // Ops the reference evaluator (or the integer loops, or a GPU's
            // integer kernels) run read and write their operands whole, at
            // their types; a slice reads the elements its output's type
            // says, from its start, which ONNX's clamping would have kept
            // inside the input (the evaluator clamps; a kernel does not).
            KernelKind::Reference { op, inputs, outputs } | KernelKind::Loop { op, inputs, outputs } => {
                if let (Op::Slice { starts, steps, .. }, [(b, t)], [(_, out)]) = (op, &inputs[..], &outputs[..]) {
                    let strides = dense_strides(&t.shape);
                    let at = starts.iter().zip(&strides).fold(Dim::new(0), |a, (&s, &st)| a + s * st);
                    let steps = steps.iter().zip(&strides).map(|(&s, &st)| int(s) * st);
                    let dims: Vec<(Dim, Dim)> = out.shape.iter().copied().zip(steps).collect();
                    walks.push(walk(*b, t.dtype.size_bytes(), at, &dims));
                }
                for (b, t) in inputs.iter().chain(outputs) {
                    let n = t.shape.iter().fold(Dim::new(1), |a, &d| a * d);
                    walks.push(walk(*b, t.dtype.size_bytes(), Dim::new(0), &[(n, Dim::new(1))]));
                }
            }
        }
        walks
    }

    /// Whether every size of the kernel is known.
    pub fn is_known(&self) -> bool {
        match &self.kind {
            KernelKind::Map(_) | KernelKind::MatMul(_) | KernelKind::Gather(_) => self.runtime_dims().is_empty(),
            KernelKind::Attention(a) => a.is_known(),
            KernelKind::Rows(r) => r.rows.is_known() && r.len.is_known(),
            KernelKind::Reference { inputs, outputs, .. } => inputs.iter().chain(outputs).all(|(_, t)| t.is_known()),
            KernelKind::Loop { .. } => self.runtime_dims().is_empty(),
        }
    }

    /// One line of detail: shapes, expression or tiling.
    pub fn detail(&self) -> String {
        match &self.kind {
            KernelKind::Map(m) => format!("{:?} {}", m.shape, m.expr),
            KernelKind::MatMul(mm) => {
                let tiling = match mm.implementation {
                    MatMulImpl::Library => "library GEMM".to_string(),
                    // The register tile is the CPU's (`cpu::describe_packed_tile`).
                    MatMulImpl::Packed => "packed GEMM".to_string(),
                    MatMulImpl::Generated => {
                        format!("generated, 4x8 register tile{}", if mm.b_packed { ", b packed" } else { "" })
                    }
                    MatMulImpl::Unchosen => "tiled by the backend".to_string(),
                };
                let epilogue = mm.epilogue.as_ref().map_or(String::new(), |e| format!(", epilogue {}", e.expr));
                let gathered = if mm.a_rows.is_some() { ", rows of a gathered" } else { "" };
                let placed = if mm.c_rows.is_some() { ", rows of c placed" } else { "" };
                format!(
                    "{}x{}x{} x{} batches ({tiling}{gathered}{placed}){epilogue}",
                    mm.m,
                    mm.k,
                    mm.n,
                    mm.batches.len()
                )
            }
            KernelKind::Rows(r) => format!(
                "{:?} {} rows of {}{}",
                r.op,
                r.rows,
                r.len,
                if r.residual.is_some() { ", residual added first" } else { "" }
            ),
            KernelKind::Gather(k) => format!("{} indices into [{}, {}, {}]", k.n_indices, k.outer, k.axis_len, k.inner),
            KernelKind::Attention(a) => format!(
                "{} x [{}q x {}k, d {}, dv {}], tiles of {} queries x {} keys{}{}{}{}{}",
                match &a.outer {
                    Some(o) => format!("{} x {}", o.count, a.batches.len()),
                    None => a.batches.len().to_string(),
                },
                a.sq,
                a.sk,
                a.d,
                a.dv,
                a.block,
                a.key_block,
                a.softcap.map_or(String::new(), |c| format!(", scores soft-capped at {c}")),
                if a.mask.is_some() { ", masked" } else { "" },
                match a.key_spans {
                    Some(_) => format!(
                        " ({:.0}% of the scores skipped)",
                        100.0
                            * (1.0
                                - a.scores_computed() as f64
                                    / (a.estimated_batches() * a.sq.estimate() * a.estimated_sk()).max(1) as f64)
                    ),
                    None => String::new(),
                },
                if a.nan_to_zero { ", NaN guard" } else { "" },
                if a.out_row_stride != a.dv { ", heads written interleaved" } else { "" }
            ),
            // With the element types (a cast's are what it does).
            KernelKind::Reference { op, inputs, outputs } | KernelKind::Loop { op, inputs, outputs } => {
                let types =
                    |ts: &[(BufferId, Type)]| ts.iter().map(|(_, t)| t.to_string()).collect::<Vec<_>>().join(", ");
                format!("{} {} -> {}", op.name(), types(inputs), types(outputs))
            }
        }
    }

    /// Buffers the kernel reads, then the ones it writes.
    pub fn buffers(&self) -> (Vec<BufferId>, Vec<BufferId>) {
        match &self.kind {
            KernelKind::Map(m) => (m.inputs.iter().map(|o| o.buffer).collect(), vec![m.output.buffer]),
            KernelKind::MatMul(k) => {
                let epilogue = k.epilogue.iter().flat_map(|e| e.inputs.iter().map(|i| i.buffer));
                ([k.a, k.b].into_iter().chain(epilogue).collect(), vec![k.c])
            }
            KernelKind::Rows(r) => (
                [Some(r.x), r.residual.map(|(res, _)| res), r.scale, r.bias].into_iter().flatten().collect(),
                [Some(r.out), r.residual.map(|(_, sum)| sum)].into_iter().flatten().collect(),
            ),
            KernelKind::Gather(k) => (vec![k.data, k.indices], vec![k.out]),
            KernelKind::Attention(a) => {
                ([Some(a.q), Some(a.kt), Some(a.v), a.mask].into_iter().flatten().collect(), vec![a.out])
            }
            KernelKind::Reference { inputs, outputs, .. } | KernelKind::Loop { inputs, outputs, .. } => {
                (inputs.iter().map(|i| i.0).collect(), outputs.iter().map(|o| o.0).collect())
            }
        }
    }
}

/// Row-major element strides of `shape`, symbolic where it is.
pub fn dense_strides(shape: &[Dim]) -> Vec<Dim> {
    let mut strides = vec![Dim::new(1); shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Element strides of `shape` broadcast to `out`, where either may be
/// symbolic: 0 along a dim of size 1 (or one `shape` lacks), else its
/// row-major stride. `None` where a dim neither is 1 nor equals `out`'s
/// (a symbolic dim broadcast against another symbol).
pub fn broadcast_dims(shape: &[Dim], out: &[Dim]) -> Option<Vec<Dim>> {
    let lead = out.len().checked_sub(shape.len())?;
    let mut strides = vec![Dim::new(0); out.len()];
    let mut step = Dim::new(1);
    for d in (0..shape.len()).rev() {
        let (s, o) = (shape[d], out[lead + d]);
        if s.known() == Some(1) {
            continue;
        }
        if s != o {
            return None;
        }
        strides[lead + d] = step;
        step = step.checked_mul(s).ok()?;
    }
    Some(strides)
}

/// Row-major strides of `shape` broadcast to `out` (0 along broadcast dims).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<isize> {
    let dense = egret_ir::strides_of(shape);
    let lead = out.len() - shape.len();
    (0..out.len()).map(|d| if d < lead || shape[d - lead] == 1 { 0 } else { dense[d - lead] as isize }).collect()
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub buffers: Vec<Buffer>,
    pub kernels: Vec<Kernel>,
    /// The arena's size at `capacity`.
    pub arena_bytes: usize,
    pub inputs: Vec<(BufferId, Type)>,
    pub outputs: Vec<(BufferId, Type)>,
    /// The symbols the plan keeps, whose values each call gives (from its
    /// inputs' shapes); empty for a bound plan.
    pub symbols: Vec<String>,
    /// The symbols' values the arena offsets are planned for
    /// (`memory::plan_memory`): each at `NOMINAL_SYMBOL_VALUE` from
    /// lowering, which `explain` shows, or a declared bound's highest value.
    pub capacity: Bindings,
    /// The symbols whose capacity is a declared bound. The CPU runtime lays
    /// the arena out for those and, for the others, for the first call's
    /// values (every symbol at 128 at once could be far more memory than
    /// any call needs: a batch of 128), growing it as calls need.
    pub bounded: Vec<String>,
    /// The graph's symbolic sizes that are more than one symbol (`s0 - 1`),
    /// each with the node whose output has it: a call whose values make one
    /// negative is refused (`Plan::check_sizes`). Such a size is where the
    /// importer's arithmetic assumed the ONNX op's clamping at zero would
    /// not happen (a slice of `s0 - 3 .. 0`); an empty value need not have
    /// a kernel that would notice.
    pub sizes: Vec<(Dim, String)>,
}

impl Expr {
    /// Replaces every `Input(i)` by `with[i]`.
    pub fn substitute(self, with: &[Expr]) -> Expr {
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
            Expr::IntToF32(x) => Expr::IntToF32(s(x)),
            Expr::IntToBool(x) => Expr::IntToBool(s(x)),
        }
    }

    /// How many ops the expression computes.
    pub fn op_count(&self) -> usize {
        match self {
            Expr::Input(_) | Expr::F32(_) => 0,
            Expr::Unary(_, x)
            | Expr::Not(x)
            | Expr::IsNaN(x)
            | Expr::BoolToF32(x)
            | Expr::F32ToBool(x)
            | Expr::IntToF32(x)
            | Expr::IntToBool(x) => 1 + x.op_count(),
            Expr::Binary(_, x, y) | Expr::Compare(_, x, y) | Expr::Logic(_, x, y) => 1 + x.op_count() + y.op_count(),
            Expr::Select(c, x, y) => 1 + c.op_count() + x.op_count() + y.op_count(),
        }
    }
}

impl Plan {
    /// An error naming the node and the size when `values` make one of the
    /// graph's symbolic sizes negative (`Plan::sizes`).
    pub fn check_sizes(&self, values: &egret_ir::DimValues) -> Result<(), String> {
        for (d, label) in &self.sizes {
            if let Ok(v) = values.get(*d) {
                if v < 0 {
                    return Err(format!(
                        "{label}: a size of its output, {d}, is {v} at these inputs' dims: \
                         the model's shapes do not hold for them"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The walks of `k` a call checks at its values (`spans_at`): every
    /// walk of a kernel with symbolic sizes, and a known kernel's walks
    /// over buffers of symbolic size. A known view of a symbolic value is
    /// inside it only when the value is large enough (a slice `0..2` of an
    /// axis `s0`, which ONNX would clamp at `s0 = 1`, is planned as two
    /// elements); a known kernel over known buffers was checked when it
    /// was planned.
    pub fn walks_to_check(&self, k: &Kernel) -> Vec<Walk> {
        let known = k.is_known();
        k.walks().into_iter().filter(|w| !known || !self.buffers[w.buffer].bytes.is_known()).collect()
    }

    /// The bytes each of `k`'s checked walks (`walks_to_check`) spans at
    /// `values` of the plan's symbols, as `(buffer, first, end)`: what the
    /// runtime checks against the buffers before the kernel runs. A
    /// symbolic view is inside its buffer only for the values the model
    /// allows (a causal table read at a decoder's past length holds so
    /// many positions), and a call past them must be an error, not a read
    /// outside the table.
    pub fn spans_at(&self, k: &Kernel, values: &DimValues) -> Result<Vec<(BufferId, i64, i64)>, String> {
        let mut spans = Vec::new();
        for w in self.walks_to_check(k) {
            spans.extend(w.span_at(values)?);
        }
        Ok(spans)
    }

    /// Whether no size in the plan depends on a symbol: what the GPU
    /// backends and ahead-of-time code compile.
    pub fn is_bound(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The plan with every symbol given its value in `values`: a bound
    /// plan with the same buffers and kernels, its memory left as it was
    /// (the caller lays the arena out for the values it serves). What the
    /// GPU backends build each set of values' dispatches from: their
    /// kernels take every size as a parameter, so the same shaders serve
    /// all of them.
    pub fn at(&self, values: &Bindings) -> Result<Plan, String> {
        let dims = DimValues::new(values);
        let v = |d: Dim| -> Result<Dim, String> {
            let x = dims.get(d)?;
            Dim::int(x).ok_or_else(|| format!("{d} is {x}, out of range"))
        };
        let operand = |o: &mut Operand| -> Result<(), String> {
            o.offset = v(o.offset)?;
            for s in &mut o.strides {
                *s = v(*s)?;
            }
            Ok(())
        };
        let types = |ts: &mut [(BufferId, Type)]| -> Result<(), String> {
            for (_, t) in ts {
                *t = t.at(values)?;
            }
            Ok(())
        };
        let mut plan = self.clone();
        for b in &mut plan.buffers {
            b.bytes = v(b.bytes)?;
        }
        for k in &mut plan.kernels {
            match &mut k.kind {
                KernelKind::Map(m) => {
                    for d in &mut m.shape {
                        *d = v(*d)?;
                    }
                    for o in m.inputs.iter_mut().chain([&mut m.output]) {
                        operand(o)?;
                    }
                }
                KernelKind::MatMul(mm) => mm.m = v(mm.m)?,
                KernelKind::Rows(r) => {
                    r.rows = v(r.rows)?;
                    r.len = v(r.len)?;
                }
                KernelKind::Gather(g) => {
                    g.outer = v(g.outer)?;
                    g.n_indices = v(g.n_indices)?;
                    g.axis_len = v(g.axis_len)?;
                }
                KernelKind::Attention(a) => *a = a.at(&dims)?,
                KernelKind::Reference { op, inputs, outputs } | KernelKind::Loop { op, inputs, outputs } => {
                    *op = op.map_dims(v)?;
                    types(inputs)?;
                    types(outputs)?;
                }
            }
        }
        types(&mut plan.inputs)?;
        types(&mut plan.outputs)?;
        plan.symbols.clear();
        plan.capacity.clear();
        plan.bounded.clear();
        Ok(plan)
    }

    /// Per buffer, whether some kernel or graph output reads or writes it
    /// (a constant replaced by a repacked copy is not).
    pub fn used_buffers(&self) -> Vec<bool> {
        let mut used = vec![false; self.buffers.len()];
        for k in &self.kernels {
            let (reads, writes) = k.buffers();
            for b in reads.into_iter().chain(writes) {
                used[b] = true;
            }
        }
        for (b, _) in self.outputs.iter().chain(&self.inputs) {
            used[*b] = true;
        }
        used
    }

    /// Whether graph output `i` can be written straight into the caller's
    /// output memory, sparing a copy out of the arena (4 MiB per run for
    /// gpt2_small4's logits): an f32 arena buffer that a kernel writes (so
    /// every byte of it is written in the run) and that no earlier output
    /// names. The JIT's executor and the artifacts' driver both use this.
    pub fn direct_output(&self, i: usize) -> bool {
        let (b, ty) = &self.outputs[i];
        ty.dtype == DType::F32
            && matches!(self.buffers[*b].storage, Storage::Arena { .. })
            && self.kernels.iter().any(|k| k.buffers().1.contains(b))
            && !self.outputs[..i].iter().any(|(other, _)| other == b)
    }

    /// One line per kernel, for `egret explain` and snapshots.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (i, k) in self.kernels.iter().enumerate() {
            let detail = k.detail();
            s.push_str(&format!("k{i} {} {detail}  # {}\n", k.kind_name(), k.label));
        }
        match self.symbols.is_empty() {
            true => s.push_str(&format!("arena {} bytes\n", self.arena_bytes)),
            false => {
                let at: Vec<String> = self.capacity.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push_str(&format!("arena {} bytes at {}\n", self.arena_bytes, at.join(", ")));
            }
        }
        s
    }
}
