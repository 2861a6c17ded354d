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

/// A matmul's left operand as rows of `source`: row `i` of the operand is
/// row `rows[i]` of `source` (rows along its last axis, which the layout
/// ops in between keep whole).
#[derive(Clone, Debug)]
struct GatheredRows {
    source: ValueId,
    rows: Vec<usize>,
}

/// `a` as rows of another value permuted or selected by reshapes,
/// transposes, slices and concats that keep the last axis whole (a Swin
/// block's roll and window partition), and the nodes that do it; `None`
/// when the rows are a strided view anyway (one stride per batch of `m`
/// rows), or the chain reads more than one value, or a value in between
/// has a reader outside it.
fn gathered_rows(g: &Graph, a: ValueId) -> Option<(GatheredRows, Vec<NodeId>)> {
    let shape = &g.ty(a).known_shape()?;
    let (&width, m) = (shape.last()?, *shape.get(shape.len().checked_sub(2)?)?);
    // The longest chain whose values in between are read only inside it
    // (a roll's concat feeds the two slices of the next roll); failing
    // that, the chain up to the first value read twice.
    let walk = |stop: &dyn Fn(ValueId) -> bool| {
        let (mut nodes, mut source) = (Vec::new(), None);
        let ids = row_ids(g, a, width, stop, &mut nodes, &mut source)?;
        nodes.sort();
        nodes.dedup();
        let inside = nodes.iter().all(|&n| {
            let v = g.node(n).outputs[0];
            v == a || (g.consumers(n).iter().all(|c| nodes.contains(c)) && g.outputs().iter().all(|(_, o)| *o != v))
        });
        inside.then_some((ids, nodes, source))
    };
    let (ids, nodes, source) = walk(&|_| false).or_else(|| walk(&|v| v != a && g.use_count(v) != 1))?;
    let rows: Vec<usize> = ids.to_i64_vec().into_iter().map(|r| r as usize).collect();
    // Batches of `m` rows, each one stride apart, are read as strided
    // batches without any copy.
    if nodes.is_empty() || strided_batches(&rows, m) {
        return None;
    }
    Some((GatheredRows { source: source?, rows }, nodes))
}

/// A packed product whose rows layout ops permute afterwards (a Swin
/// block's window reverse and roll back): the GEMM places row `i` of the
/// product at row `rows[i]` of `result` itself. With `bias`, the product
/// first had a bias row added, which commutes with moving rows.
#[derive(Clone, Debug)]
struct PlacedRows {
    result: ValueId,
    rows: Vec<usize>,
    bias: Option<ValueId>,
}

/// Whether `node` moves whole rows along a last axis `width` wide (what
/// `row_ids` can replay).
fn moves_rows(g: &Graph, node: &egret_ir::Node, width: usize) -> bool {
    let Some(&out) = node.outputs.first() else { return false };
    let rank = g.ty(out).rank();
    let width_of = |v: ValueId| g.ty(v).known_shape().and_then(|s| s.last().copied());
    width_of(out) == Some(width)
        && node.inputs.iter().all(|&x| width_of(x) == Some(width))
        && match &node.op {
            Op::Reshape { .. } => true,
            Op::Transpose { perm } => perm.last() == Some(&(rank - 1)),
            Op::Slice { starts, steps, .. } => starts[rank - 1] == 0 && steps[rank - 1] == 1,
            Op::Concat { axis } => *axis + 1 < rank,
            _ => false,
        }
}

/// The packed product `p` placed by the layout ops that alone read it (or
/// its sum with a constant bias row), and the nodes not to lower: those
/// ops and the bias add. `None` unless they end in one value, hold every
/// row exactly once, and nothing outside reads what is in between.
fn placed_rows(g: &Graph, p: ValueId) -> Option<(PlacedRows, Vec<NodeId>)> {
    let width = *g.ty(p).known_shape()?.last()?;
    let only_reader = |v: ValueId| {
        let readers = g.consumers(g.producer(v));
        (g.use_count(v) == 1 && readers.len() == 1).then(|| readers[0])
    };
    // A constant bias row added to the product moves with its rows.
    let (start, bias, mut skipped) = match only_reader(p).map(|n| (n, g.node(n))) {
        Some((n, node)) if node.op == Op::Add => {
            let other = if node.inputs[0] == p { node.inputs[1] } else { node.inputs[0] };
            // One row, the same for every row of the product: `[.., 1, width]`.
            let shape = &g.ty(other).known_shape()?;
            let row = g.const_value(other).is_some()
                && g.ty(other).dtype == DType::F32
                && shape.last() == Some(&width)
                && shape.iter().rev().skip(1).all(|&d| d == 1);
            if !row || g.ty(node.outputs[0]) != g.ty(p) {
                return None;
            }
            (node.outputs[0], Some(other), vec![n])
        }
        _ => (p, None, vec![]),
    };
    // Forward to the one value the row-moving ops end in.
    let mut ends = Vec::new();
    let mut todo = vec![start];
    let mut seen = std::collections::HashSet::new();
    while let Some(v) = todo.pop() {
        if !seen.insert(v) || g.outputs().iter().any(|(_, o)| *o == v) && v != start {
            continue;
        }
        let readers = g.consumers(g.producer(v));
        if !readers.is_empty() && readers.iter().all(|&r| moves_rows(g, g.node(r), width)) {
            todo.extend(readers.iter().map(|&r| g.node(r).outputs[0]));
        } else if v == start {
            return None;
        } else {
            ends.push(v);
        }
    }
    let [result] = ends[..] else { return None };
    let mut nodes = Vec::new();
    let mut source = None;
    let ids = row_ids(g, result, width, &|_| false, &mut nodes, &mut source)?;
    if source != Some(start) {
        return None;
    }
    nodes.sort();
    nodes.dedup();
    let inside = nodes.iter().all(|&n| {
        let v = g.node(n).outputs[0];
        v == result || (g.consumers(n).iter().all(|c| nodes.contains(c)) && g.outputs().iter().all(|(_, o)| *o != v))
    });
    let start_inside = g.consumers(g.producer(start)).iter().all(|c| nodes.contains(c))
        && g.outputs().iter().all(|(_, o)| *o != start);
    if !inside || !start_inside {
        return None;
    }
    // Every row of the product lands on exactly one row of the result,
    // and not in a way strides describe (a head split is a view).
    let ids = ids.to_i64_vec();
    let shape = &g.ty(result).known_shape()?;
    let m = shape.len().checked_sub(2).map_or(1, |d| shape[d]);
    if strided_batches(&ids.iter().map(|&i| i as usize).collect::<Vec<_>>(), m) {
        return None;
    }
    let mut rows = vec![usize::MAX; ids.len()];
    for (to, &from) in ids.iter().enumerate() {
        let slot = rows.get_mut(usize::try_from(from).ok()?)?;
        if *slot != usize::MAX {
            return None;
        }
        *slot = to;
    }
    if rows.len() * width != g.ty(start).checked_numel()? {
        return None;
    }
    skipped.extend(nodes);
    Some((PlacedRows { result, rows, bias }, skipped))
}

/// Whether `rows` are batches of `m`, each one stride apart: a layout
/// strides describe, which needs no table.
fn strided_batches(rows: &[usize], m: usize) -> bool {
    rows.chunks(m.max(1)).all(|batch| {
        let step = |w: &[usize]| w[1] as isize - w[0] as isize;
        batch.windows(2).all(|w| step(w) == step(&batch[..2]))
    })
}

/// The rows of the chain's source that `v` holds, as an i64 tensor of
/// `v`'s shape with the last axis 1 wide: the layout ops replayed on row
/// indices. The walk ends at the first value no such op produces, or
/// that `stop` picks: that is the source.
fn row_ids(
    g: &Graph,
    v: ValueId,
    width: usize,
    stop: &dyn Fn(ValueId) -> bool,
    nodes: &mut Vec<NodeId>,
    source: &mut Option<ValueId>,
) -> Option<Tensor> {
    let shape = &g.ty(v).known_shape()?;
    let rank = shape.len();
    let producer = g.producer(v);
    let node = g.node(producer);
    if !moves_rows(g, node, width) || stop(v) {
        // The source: every path must end at the same value.
        if source.is_some_and(|s| s != v) || shape.last() != Some(&width) {
            return None;
        }
        *source = Some(v);
        let rows = shape[..rank - 1].iter().product::<usize>();
        let mut ids_shape = shape[..rank - 1].to_vec();
        ids_shape.push(1);
        return Some(Tensor::from_vec(ids_shape, (0..rows as i64).collect::<Vec<i64>>()));
    }
    // A walk, not a search: a value two concats read is visited twice.
    // Exporters' chains are a few ops long; give up on anything longer.
    const LONGEST: usize = 64;
    if nodes.len() >= LONGEST {
        return None;
    }
    nodes.push(producer);
    let inputs =
        node.inputs.iter().map(|&x| row_ids(g, x, width, stop, nodes, source)).collect::<Option<Vec<Tensor>>>()?;
    // The same op over the row indices, whose last axis is 1 wide.
    let op = match &node.op {
        Op::Reshape { shape } => {
            Op::Reshape { shape: shape[..shape.len() - 1].iter().copied().chain([Dim::new(1)]).collect() }
        }
        Op::Slice { starts, ends, steps } => {
            let mut ends = ends.clone();
            ends[rank - 1] = Dim::new(1);
            Op::Slice { starts: starts.clone(), ends, steps: steps.clone() }
        }
        op => op.clone(),
    };
    let refs: Vec<&Tensor> = inputs.iter().collect();
    egret_ir::eval_op(&op, &refs).ok()?.into_iter().next()
}

/// Keys or values of grouped-query attention as exporters write
/// `repeat_kv`: `x[.., G, s, d]` unsqueezed to `[.., G, 1, s, d]`,
/// expanded to `[.., G, R, s, d]` and reshaped to `[.., G * R, s, d]`
/// (for the keys, then transposed to `[.., G * R, d, s]`). Head `h` of the
/// result is head `h / R` of `source`.
#[derive(Clone, Copy, Debug)]
struct RepeatedHeads {
    source: ValueId,
    repeat: usize,
    /// The last two axes are swapped after the repeat.
    transposed: bool,
}

/// `v` as a repeat of another value's heads, and the nodes that repeat
/// them, if every intermediate value is read only by the next node.
fn repeated_heads(g: &Graph, v: ValueId) -> Option<(RepeatedHeads, Vec<NodeId>)> {
    let rank = g.ty(v).rank();
    if rank < 3 {
        return None;
    }
    let mut nodes = Vec::new();
    let mut at = v;
    let mut transposed = false;
    let producer = g.producer(at);
    if let Op::Transpose { perm } = &g.node(producer).op {
        let swap_last: Vec<usize> = (0..rank - 2).chain([rank - 1, rank - 2]).collect();
        if *perm != swap_last {
            return None;
        }
        transposed = true;
        nodes.push(producer);
        at = g.node(producer).inputs[0];
    }
    // at = reshape(e): [P.., G * R, s, d]
    let (merge, e) = (g.producer(at), g.node(g.producer(at)).inputs.first().copied()?);
    let (expand, u) = (g.producer(e), g.node(g.producer(e)).inputs.first().copied()?);
    let (unsqueeze, x) = (g.producer(u), g.node(g.producer(u)).inputs.first().copied()?);
    let is_reshape = |n: NodeId| matches!(g.node(n).op, Op::Reshape { .. });
    if !(is_reshape(merge) && matches!(g.node(expand).op, Op::Expand { .. }) && is_reshape(unsqueeze)) {
        return None;
    }
    if [at, e, u].iter().any(|&w| g.use_count(w) != 1) {
        return None;
    }
    let known = |w: ValueId| g.ty(w).known_shape();
    let (z, es, us, xs) = (&known(at)?, &known(e)?, &known(u)?, &known(x)?);
    let lead = rank - 3;
    let (groups, repeat) = (*es.get(lead)?, *es.get(lead + 1)?);
    let mut want_u = es.clone();
    want_u[lead + 1] = 1;
    let mut want_x = es.clone();
    want_x.remove(lead + 1);
    let fits = es.len() == rank + 1
        && es[..lead] == z[..lead]
        && groups * repeat == z[lead]
        && es[lead + 2..] == z[lead + 1..]
        && *us == want_u
        && *xs == want_x;
    if !fits {
        return None;
    }
    nodes.extend([merge, expand, unsqueeze]);
    Some((RepeatedHeads { source: x, repeat, transposed }, nodes))
}

/// Row-major strides of `shape` (dims may be symbolic).
fn contiguous_strides(shape: &[Dim]) -> Vec<Dim> {
    let mut strides = vec![Dim::new(1); shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Whether `strides` walk `shape` densely in row-major order (dims of size 1
/// may have any stride).
pub(crate) fn is_dense(shape: &[Dim], strides: &[Dim]) -> bool {
    let want = contiguous_strides(shape);
    shape.iter().zip(strides.iter().zip(&want)).all(|(&d, (s, w))| d == 1 || s == w)
}

/// The strides a tensor of `shape` (viewed with `strides`) is read with when
/// broadcast to `out` (numpy rules: leading and size-1 dims repeat; a
/// symbolic dim is never taken for 1, and a run where it is 1 reads its one
/// index at any stride).
fn broadcast_view(shape: &[Dim], strides: &[Dim], out: &[Dim]) -> Vec<Dim> {
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 { Dim::new(0) } else { strides[i - off] }).collect()
}

/// Which side of a reshape's dim groups grows next: the one whose product
/// is smaller (known sizes), or the one that divides the other (symbolic
/// ones: `past` grows to `16*past`); `None` when neither does.
fn smaller(po: Dim, pn: Dim) -> Option<bool> {
    match (po.known(), pn.known()) {
        (Some(a), Some(b)) => Some(a < b),
        _ if pn.div_exact(po).is_some() => Some(true),
        _ if po.div_exact(pn).is_some() => Some(false),
        _ => None,
    }
}

/// Strides that view data laid out as (`old_shape`, `old_strides`) with
/// `new_shape` without moving it, if any exist (numpy's no-copy reshape).
fn reshape_strides(old_shape: &[Dim], old_strides: &[Dim], new_shape: &[Dim]) -> Option<Vec<Dim>> {
    if old_shape.iter().any(|&d| d == 0) {
        return None;
    }
    let old: Vec<(Dim, Dim)> =
        old_shape.iter().zip(old_strides).filter(|(&d, _)| d != 1).map(|(&d, &s)| (d, s)).collect();
    let new_nz: Vec<usize> = (0..new_shape.len()).filter(|&i| new_shape[i] != 1).collect();
    let mut res = vec![Dim::new(0); new_shape.len()];
    let (mut i, mut j) = (0, 0);
    while i < old.len() && j < new_nz.len() {
        let (i0, j0) = (i, j);
        let (mut po, mut pn) = (old[i].0, new_shape[new_nz[j]]);
        while po != pn {
            if smaller(po, pn)? {
                i += 1;
                po = po * old.get(i)?.0;
            } else {
                j += 1;
                pn = pn * new_shape[*new_nz.get(j)?];
            }
        }
        // The old dims of the group must be one dense run.
        for k in i0..i {
            if old[k].1 != old[k + 1].1 * old[k + 1].0 {
                return None;
            }
        }
        let mut st = old[i].1;
        for k in (j0..=j).rev() {
            res[new_nz[k]] = st;
            st = st * new_shape[new_nz[k]];
        }
        i += 1;
        j += 1;
    }
    (i == old.len() && j == new_nz.len()).then_some(res)
}

/// `reshape_strides` for known sizes.
fn reshape_known(old_shape: &[usize], old_strides: &[isize], new_shape: &[usize]) -> Option<Vec<isize>> {
    let dims = |v: &[usize]| egret_ir::dims_of(v);
    let strides: Vec<Dim> = old_strides.iter().map(|&s| Dim::from(s)).collect();
    let res = reshape_strides(&dims(old_shape), &strides, &dims(new_shape))?;
    Some(res.into_iter().map(known).collect())
}

/// Row-major strides of known sizes.
fn row_major(shape: &[usize]) -> Vec<isize> {
    egret_ir::strides_of(shape).into_iter().map(|s| s as isize).collect()
}

/// An operand of known offset and strides.
fn known_operand(buffer: BufferId, offset: isize, strides: &[isize]) -> Operand {
    Operand { buffer, dtype: DType::F32, offset: Dim::from(offset), strides: idims(strides) }
}

/// Known sizes as dims.
fn dims(sizes: &[usize]) -> Vec<Dim> {
    egret_ir::dims_of(sizes)
}

/// Known strides or offsets as dims.
fn idims(values: &[isize]) -> Vec<Dim> {
    values.iter().map(|&v| Dim::from(v)).collect()
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
        Op::Gelu { approximate_tanh: false } => un(Unary::Gelu),
        Op::Gelu { approximate_tanh: true } => un(Unary::GeluTanh),
        Op::Silu => un(Unary::Silu),
        Op::Not if all_bool => Some(Expr::Not(b(I(0)))),
        Op::IsNaN if all_f32 => Some(Expr::IsNaN(b(I(0)))),
        Op::Where if in_types[0].dtype == DType::Bool && in_types[1].dtype == DType::F32 => {
            Some(Expr::Select(b(I(0)), b(I(1)), b(I(2))))
        }
        Op::Cast { to } => match (in_types[0].dtype, to) {
            (DType::Bool, DType::F32) => Some(Expr::BoolToF32(b(I(0)))),
            (DType::F32, DType::Bool) => Some(Expr::F32ToBool(b(I(0)))),
            (DType::I64 | DType::I32, DType::F32) => Some(Expr::IntToF32(b(I(0)))),
            (DType::I64 | DType::I32, DType::Bool) => Some(Expr::IntToBool(b(I(0)))),
            (a, b2) if a == *b2 && mappable(a) => Some(I(0)),
            _ => None,
        },
        _ => None,
    }
    .filter(|_| mappable(out.dtype))
}

/// `x / c` for a constant `c` becomes `x * (1 / c)`: a multiply instead of
/// a divide, at most one ulp away (exactly equal when `c` is a power of two).
fn divide_by_constant_as_multiply(e: Expr) -> Expr {
    match e {
        Expr::Binary(Binary::Div, x, c) => match *c {
            Expr::F32(v) if (1.0 / v).is_normal() => Expr::binary(Binary::Mul, *x, Expr::F32(1.0 / v)),
            c => Expr::Binary(Binary::Div, x, Box::new(c)),
        },
        other => other,
    }
}

/// Merges adjacent dims that every operand walks contiguously, and drops
/// dims of size 1, so most kernels run one long inner loop.
fn collapse_dims(shape: Vec<Dim>, mut ops: Vec<Operand>) -> (Vec<Dim>, Vec<Operand>) {
    let keep: Vec<usize> = (0..shape.len()).filter(|&i| shape[i] != 1).collect();
    let mut out_shape: Vec<Dim> = Vec::new();
    let mut out_strides: Vec<Vec<Dim>> = vec![Vec::new(); ops.len()];
    for &d in &keep {
        let mergeable = !out_shape.is_empty()
            && ops.iter().enumerate().all(|(k, o)| *out_strides[k].last().unwrap() == o.strides[d] * shape[d]);
        if mergeable {
            let last = out_shape.last_mut().unwrap();
            *last = *last * shape[d];
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

impl<'g> Lowering<'g> {
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
        self.view(v)
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

    /// Carries a pending elementwise expression through a reshape of it
    /// (a reshape keeps the elements' order), so that the chain goes on
    /// growing on the other side: an exporter's `Gemm -> Reshape -> GELU`
    /// then becomes one map, and a matmul epilogue. Only when `x` is read
    /// only here and every operand the expression reads has a view in the
    /// new shape.
    fn reshape_pending(&mut self, x: ValueId, out: ValueId, shape: &[Dim]) -> bool {
        if !self.opts.fuse_elementwise || self.g.use_count(x) != 1 {
            return false;
        }
        let Some(p) = self.pending.get(&x) else { return false };
        let Some(inputs) = p
            .inputs
            .iter()
            .map(|o| reshape_strides(&p.shape, &o.strides, shape).map(|strides| Operand { strides, ..o.clone() }))
            .collect::<Option<Vec<Operand>>>()
        else {
            return false;
        };
        let mut p = self.pending.remove(&x).expect("checked above");
        p.shape = shape.to_vec();
        p.inputs = inputs;
        self.pending.insert(out, p);
        true
    }

    /// Layout ops: views where possible (reshape, transpose, slice, split,
    /// expand), map kernels for concat.
    fn layout(&mut self, op: &Op, inputs: &[ValueId], outputs: &[ValueId], label: &str) -> bool {
        let g = self.g;
        let x = inputs[0];
        let xt = g.ty(x).clone();
        // Integers move through views too on the CPU, whose copies load and
        // store any element (a slice of a position table at a symbolic
        // offset is then a view, not a reference op per call); the GPU's
        // maps compute in 32-bit words, so its plans keep them dense.
        let movable = mappable(xt.dtype) || (!self.opts.neutral && matches!(xt.dtype, DType::I64 | DType::I32));
        if !movable {
            return false;
        }
        let alias = |this: &mut Self, v: ValueId, offset: Dim, strides: Vec<Dim>| {
            let buffer = this.view(x).buffer;
            this.views.insert(v, View { buffer, offset, strides });
        };
        match op {
            Op::Reshape { shape } => {
                if self.reshape_pending(x, outputs[0], shape) {
                    return true;
                }
                let vw = self.view(x);
                match reshape_strides(&xt.shape, &vw.strides, shape) {
                    Some(st) => alias(self, outputs[0], vw.offset, st),
                    None => {
                        let b = self.dense(x, label);
                        self.views.insert(outputs[0], View::dense(b, shape));
                    }
                }
            }
            Op::Identity => {
                let vw = self.view(x);
                alias(self, outputs[0], vw.offset, vw.strides);
            }
            Op::Transpose { perm } => {
                let vw = self.view(x);
                alias(self, outputs[0], vw.offset, perm.iter().map(|&p| vw.strides[p]).collect());
                self.copy_unless_views(outputs, label);
            }
            Op::Slice { starts, steps, .. } => {
                let vw = self.view(x);
                let offset = vw.offset + starts.iter().zip(&vw.strides).map(|(&s, &st)| s * st).sum::<Dim>();
                alias(
                    self,
                    outputs[0],
                    offset,
                    steps.iter().zip(&vw.strides).map(|(&s, &st)| st * s as isize).collect(),
                );
            }
            Op::Expand { shape } => {
                let vw = self.view(x);
                alias(self, outputs[0], vw.offset, broadcast_view(&xt.shape, &vw.strides, shape));
                self.copy_unless_views(outputs, label);
            }
            Op::Split { axis, .. } => {
                let vw = self.view(x);
                let mut at = Dim::new(0);
                for &out in outputs {
                    alias(self, out, vw.offset + at * vw.strides[*axis], vw.strides.clone());
                    at += g.ty(out).shape[*axis];
                }
                self.copy_unless_views(outputs, label);
            }
            Op::Concat { axis } => {
                let out = outputs[0];
                let os = contiguous_strides(&g.ty(out).shape);
                let b = self.define(out);
                let mut at = Dim::new(0);
                for &v in inputs {
                    let shape = g.ty(v).shape.clone();
                    let output = Operand { buffer: b, dtype: xt.dtype, offset: at * os[*axis], strides: os.clone() };
                    at += shape[*axis];
                    // A pending elementwise part read only here is computed
                    // straight into its slice (rotary embeddings' `-x2`).
                    if self.opts.fuse_elementwise && g.use_count(v) == 1 && self.pending.contains_key(&v) {
                        self.materialize_into(v, output);
                        continue;
                    }
                    let input = self.read(v, &shape);
                    self.map(shape, vec![input], output, Expr::Input(0), label);
                }
            }
            _ => return false,
        }
        true
    }

    /// Without views (`--opt 0`), a layout op's outputs become copies.
    fn copy_unless_views(&mut self, outputs: &[ValueId], label: &str) {
        if !self.opts.views {
            for &v in outputs {
                self.dense(v, label);
            }
        }
    }

    /// Convolution as im2col and a matmul: zero-pad if needed (a fill and a
    /// copy into the interior), gather the patches with one strided map
    /// (`cols[n, c, k.., o..]`), multiply by the weights viewed as
    /// `[M, C * prod(k)]` (with groups, one product per batch and group, of
    /// `M / group` weight rows and that group's `C / group` channels of
    /// patches), and add the bias with a broadcast map.
    fn conv(&mut self, inputs: &[ValueId], out: ValueId, shape: ConvShape, label: &str) {
        if !self.g.ty(inputs[0]).shape[0].is_known() {
            return self.conv_symbolic_batch(inputs, out, shape, label);
        }
        let ConvShape { strides, pads, dilations, group } = shape;
        let g = self.g;
        let (x, w) = (inputs[0], inputs[1]);
        let xs = g.ty(x).sizes();
        let ws = g.ty(w).sizes();
        let os = g.ty(out).sizes();
        let sp = xs.len() - 2;
        let (n, c, m) = (xs[0], xs[1], ws[0]);
        let kernel = &ws[2..];
        let out_sp = &os[2..];
        // The (padded) input: a buffer, an offset and strides.
        let (src, src_off, sst) = if pads.iter().all(|&p| p == 0) {
            let vw = self.known_view(x, label);
            (vw.buffer, vw.off(), vw.st())
        } else {
            let mut padded = xs.clone();
            for i in 0..sp {
                padded[2 + i] += pads[i] + pads[sp + i];
            }
            let pb = self.scratch(DType::F32, &dims(&padded));
            let pst = row_major(&padded);
            let fill = known_operand(pb, 0, &pst);
            self.map(dims(&padded), vec![], fill, Expr::F32(0.0), label);
            let interior: isize = (0..sp).map(|i| pads[i] as isize * pst[2 + i]).sum();
            let input = self.read(x, &dims(&xs));
            let dst = known_operand(pb, interior, &pst);
            self.map(dims(&xs), vec![input], dst, Expr::Input(0), label);
            (pb, 0, pst)
        };
        // cols[n, c, k_1..k_d, o_1..o_d] = src[n, c, o_i * stride_i + k_i * dilation_i].
        let mut iter: Vec<usize> = vec![n, c];
        iter.extend(kernel);
        iter.extend(out_sp);
        let mut read: Vec<isize> = vec![sst[0], sst[1]];
        read.extend((0..sp).map(|i| sst[2 + i] * dilations[i] as isize));
        read.extend((0..sp).map(|i| sst[2 + i] * strides[i] as isize));
        let cols = self.scratch(DType::F32, &dims(&iter));
        let patch = known_operand(src, src_off, &read);
        let cols_op = known_operand(cols, 0, &row_major(&iter));
        self.map(dims(&iter), vec![patch], cols_op, Expr::Input(0), label);
        // One product per batch and group: group `gi`'s output channels
        // from its weights and its input channels' rows of `cols` (the
        // weight is [m, c / group, kernel..], so its rows are k long).
        let (mg, cg) = (m / group, c / group);
        let k: usize = cg * kernel.iter().product::<usize>();
        let p: usize = out_sp.iter().product();
        let wb = self.dense(w, label);
        let bias = inputs.get(2).copied();
        let product = if bias.is_some() { self.scratch(DType::F32, &dims(&os)) } else { self.define(out) };
        let batches = (0..n)
            .flat_map(|b| {
                (0..group).map(move |gi| {
                    [(gi * mg * k) as isize, ((b * group + gi) * k * p) as isize, ((b * m + gi * mg) * p) as isize]
                })
            })
            .collect();
        let mm = MatMulKernel {
            m: Dim::new(mg),
            k,
            n: p,
            a: wb,
            b: cols,
            c: product,
            a_strides: [k as isize, 1],
            b_strides: [p as isize, 1],
            batches,
            implementation: MatMulImpl::Unchosen,
            hint: self.opts.matmul,
            b_packed: false,
            epilogue: None,
            a_rows: None,
            c_rows: None,
        };
        self.push(KernelKind::MatMul(mm), label);
        if let Some(bias) = bias {
            let prod_op = known_operand(product, 0, &row_major(&os));
            let bvw = self.known_view(bias, label);
            let mut bias_strides = vec![0isize; os.len()];
            bias_strides[1] = bvw.st()[0];
            let bias_op = known_operand(bvw.buffer, bvw.off(), &bias_strides);
            let b = self.define(out);
            let dst = known_operand(b, 0, &row_major(&os));
            let add = Expr::binary(Binary::Add, Expr::Input(0), Expr::Input(1));
            self.map(dims(&os), vec![prod_op, bias_op], dst, add, label);
        }
    }

    /// A convolution over a symbolic batch (a ViT's patch embedding served
    /// at any batch), one group: every output position of every image is a
    /// row of one product with the weight, `[batch * positions, c * kernel]`
    /// by the weight's transpose, whose rows may be symbolic; a map then
    /// writes the channels first, adding the bias. (`conv` lists one
    /// product per image, so it needs the batch known.)
    fn conv_symbolic_batch(&mut self, inputs: &[ValueId], out: ValueId, shape: ConvShape, label: &str) {
        let ConvShape { strides, pads, dilations, group } = shape;
        debug_assert_eq!(group, 1, "`dims_kernels_need` binds the batch of grouped convolutions");
        let g = self.g;
        let (x, w) = (inputs[0], inputs[1]);
        let n = g.ty(x).shape[0];
        let known_after = |v: ValueId| -> Vec<usize> {
            egret_ir::known_shape(&g.ty(v).shape[1..]).expect("`dims_kernels_need` keeps only the batch symbolic")
        };
        let (xs, os) = (known_after(x), known_after(out));
        let ws = g.ty(w).sizes();
        let sp = xs.len() - 1;
        let (c, m) = (xs[0], ws[0]);
        let kernel = &ws[2..];
        let out_sp = &os[1..];
        let with_batch = |rest: &[usize]| -> Vec<Dim> { std::iter::once(n).chain(dims(rest)).collect() };
        // Row-major strides of `[batch, rest..]` (all known: the batch is outermost).
        let strides_of = |rest: &[usize]| -> Vec<isize> {
            let inner = row_major(rest);
            std::iter::once(rest.iter().product::<usize>() as isize).chain(inner).collect()
        };
        let xb = self.dense(x, label);
        let (src, sst) = if pads.iter().all(|&p| p == 0) {
            (xb, strides_of(&xs))
        } else {
            let mut padded = xs.clone();
            for i in 0..sp {
                padded[1 + i] += pads[i] + pads[sp + i];
            }
            let pb = self.scratch(DType::F32, &with_batch(&padded));
            let pst = strides_of(&padded);
            self.map(with_batch(&padded), vec![], known_operand(pb, 0, &pst), Expr::F32(0.0), label);
            let interior: isize = (0..sp).map(|i| pads[i] as isize * pst[2 + i]).sum();
            let input = known_operand(xb, 0, &strides_of(&xs));
            self.map(with_batch(&xs), vec![input], known_operand(pb, interior, &pst), Expr::Input(0), label);
            (pb, pst)
        };
        // cols[b, o_1..o_d, c, k_1..k_d] = src[b, c, o_i * stride_i + k_i * dilation_i],
        // walked in the order [b, c, k.., o..].
        let kprod: usize = kernel.iter().product();
        let ck = c * kprod;
        let p: usize = out_sp.iter().product();
        let mut iter: Vec<usize> = vec![c];
        iter.extend(kernel);
        iter.extend(out_sp);
        let mut read: Vec<isize> = vec![sst[0], sst[1]];
        read.extend((0..sp).map(|i| sst[2 + i] * dilations[i] as isize));
        read.extend((0..sp).map(|i| sst[2 + i] * strides[i] as isize));
        let mut write: Vec<isize> = vec![(p * ck) as isize, kprod as isize];
        write.extend(row_major(kernel));
        write.extend(row_major(out_sp).iter().map(|s| s * ck as isize));
        let cols = self.scratch(DType::F32, &[n * Dim::new(p), Dim::new(ck)]);
        self.map(
            with_batch(&iter),
            vec![known_operand(src, 0, &read)],
            known_operand(cols, 0, &write),
            Expr::Input(0),
            label,
        );
        // [batch * p, ck] by the weight's transpose ([m, ck] read as [ck, m]).
        let wb = self.dense(w, label);
        let product = self.scratch(DType::F32, &[n * Dim::new(p), Dim::new(m)]);
        let mm = MatMulKernel {
            m: n * Dim::new(p),
            k: ck,
            n: m,
            a: cols,
            b: wb,
            c: product,
            a_strides: [ck as isize, 1],
            b_strides: [1, ck as isize],
            batches: vec![[0, 0, 0]],
            implementation: MatMulImpl::Unchosen,
            hint: self.opts.matmul,
            b_packed: false,
            epilogue: None,
            a_rows: None,
            c_rows: None,
        };
        self.push(KernelKind::MatMul(mm), label);
        // out[b, j, o..] = product[b * p + o, j] (+ bias[j]).
        let mut prod_strides: Vec<isize> = vec![(p * m) as isize, 1];
        prod_strides.extend(row_major(out_sp).iter().map(|s| s * m as isize));
        let mut operands = vec![known_operand(product, 0, &prod_strides)];
        let mut expr = Expr::Input(0);
        if let Some(&bias) = inputs.get(2) {
            let bvw = self.known_view(bias, label);
            let mut bias_strides = vec![0isize; os.len() + 1];
            bias_strides[1] = bvw.st()[0];
            operands.push(known_operand(bvw.buffer, bvw.off(), &bias_strides));
            expr = Expr::binary(Binary::Add, Expr::Input(0), Expr::Input(1));
        }
        let o = self.define(out);
        self.map(with_batch(&os), operands, known_operand(o, 0, &strides_of(&os)), expr, label);
    }

    /// Softmax over the last axis, norms whose statistics nobody reads, and
    /// reductions over trailing axes, on f32.
    fn rows(&mut self, op: &Op, inputs: &[ValueId], outputs: &[ValueId], label: &str) -> Option<RowKernel> {
        let g = self.g;
        let x = inputs[0];
        // The rows may be symbolic; their length is known (`symbols_to_bind`).
        let shape = &g.ty(x).shape;
        if g.ty(x).dtype != DType::F32 || shape.is_empty() {
            return None;
        }
        let rank = shape.len();
        let reduce_axes = match op {
            Op::Reduce { axes, .. } => Some(axes.clone()),
            _ => None,
        };
        let is_residual = matches!(op, Op::ResidualNorm { .. });
        let first_param = if is_residual { 2 } else { 1 };
        let params_fit = |from: usize| {
            inputs[first_param..].iter().all(|&p| {
                g.ty(p).dtype == DType::F32 && egret_ir::product(&shape[from..]).ok() == g.ty(p).numel_dim().ok()
            })
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
            Op::ResidualNorm { axis, epsilon, rms } if params_fit(*axis) => {
                let op =
                    if *rms { RowOp::RmsNorm { epsilon: *epsilon } } else { RowOp::LayerNorm { epsilon: *epsilon } };
                (op, *axis)
            }
            Op::Reduce { kind, axes, .. } if !axes.is_empty() => {
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
                (r, rank - axes.len())
            }
            _ => return None,
        };
        let rows: Dim = shape[..axis].iter().copied().product();
        // The length may be symbolic too (a sum over a sequence, a softmax
        // over keys): the generated kernel reads it then.
        let len = egret_ir::product(&shape[axis..]).ok()?;
        if len.known() == Some(0) {
            return None;
        }
        // A reduction over axes that are not the trailing ones reads a copy
        // with those axes moved last (the kept axes keep their order, so the
        // result's layout is unchanged).
        if let Some(axes) = reduce_axes {
            let trailing = axes.iter().enumerate().all(|(i, &a)| a == rank - axes.len() + i);
            if !trailing {
                let mut perm: Vec<usize> = (0..rank).filter(|a| !axes.contains(a)).collect();
                perm.extend(&axes);
                // Symbolic sizes move too (mean pooling's sum over the sequence).
                let vw = self.view(x);
                let moved: Vec<Dim> = perm.iter().map(|&p| shape[p]).collect();
                let input = Operand {
                    buffer: vw.buffer,
                    dtype: DType::F32,
                    offset: vw.offset,
                    strides: perm.iter().map(|&p| vw.strides[p]).collect(),
                };
                let copy = self.scratch(DType::F32, &moved);
                let output = dense_operand(copy, DType::F32, &moved);
                self.map(moved.clone(), vec![input], output, Expr::Input(0), label);
                let rows = egret_ir::product(&moved[..rank - axes.len()]).ok()?;
                let len = egret_ir::product(&moved[rank - axes.len()..]).ok()?;
                let out = self.define(outputs[0]);
                return Some(RowKernel { rows, len, op, x: copy, scale: None, bias: None, out, residual: None });
            }
        }
        let xb = self.dense(x, label);
        // residual_norm: x, residual, scale[, bias] -> y, sum.
        let (residual, params) = match is_residual {
            true => (Some(self.dense(inputs[1], label)), &inputs[2..]),
            false => (None, &inputs[1..]),
        };
        let scale = params.first().map(|&v| self.dense(v, label));
        let bias = params.get(1).map(|&v| self.dense(v, label));
        let out = self.define(outputs[0]);
        let residual = match residual {
            Some(r) => Some((r, self.define(outputs[1]))),
            None => {
                for &extra in &outputs[1..] {
                    // Unused statistics outputs still get (never written) storage.
                    self.define(extra);
                }
                None
            }
        };
        Some(RowKernel { rows, len, op, x: xb, scale, bias, out, residual })
    }

    fn gather(&mut self, data: ValueId, indices: ValueId, out: ValueId, axis: usize, label: &str) -> GatherKernel {
        let g = self.g;
        let ty = g.ty(data).clone();
        let d = self.dense(data, label);
        let i = self.dense(indices, label);
        let o = self.define(out);
        // The rows are known (`symbols_to_bind`); the rest may be symbolic.
        GatherKernel {
            outer: ty.shape[..axis].iter().copied().product(),
            axis_len: ty.shape[axis],
            inner: ty.shape[axis + 1..].iter().map(|&d| known_size(d)).product(),
            n_indices: g.ty(indices).numel_dim().expect("a verified type's size"),
            elem_bytes: ty.dtype.size_bytes(),
            wide_indices: g.ty(indices).dtype == DType::I64,
            data: d,
            indices: i,
            out: o,
        }
    }

    /// A matmul over strided operand views; batch dims broadcast.
    /// `preferred` is the implementation the optimiser chose, if it did; an
    /// implementation forced by the options (ahead-of-time code, `--matmul`)
    /// wins over it, and one that cannot compute this product falls back.
    fn matmul(
        &mut self,
        a: ValueId,
        b: ValueId,
        c: ValueId,
        preferred: Option<MatMulImpl>,
        label: &str,
    ) -> Option<MatMulKernel> {
        let g = self.g;
        // 1-d operands are rare in transformer graphs; the reference path keeps them.
        if g.ty(a).rank() < 2 || g.ty(b).rank() < 2 {
            return None;
        }
        if !(g.ty(a).is_known() && g.ty(c).is_known()) {
            return Some(self.symbolic_rows_matmul(a, b, c, preferred, label));
        }
        let (sa, sb, sc) = (g.ty(a).sizes(), g.ty(b).sizes(), g.ty(c).sizes());
        let gathered = self.gathered.get(&a).cloned();
        let placed = self.placed.get(&c).cloned();
        let mut va = self.known_view(gathered.as_ref().map_or(a, |r| r.source), label);
        // Placed rows need one tall product: its rows must fold.
        let rows = sa[..sa.len() - 1].iter().product::<usize>();
        if placed.is_some() && gathered.is_none() && reshape_known(&sa, &va.st(), &[rows, sa[sa.len() - 1]]).is_none() {
            self.dense(a, label);
            va = self.view(a);
        }
        let vb = self.generated_ready(b, label);
        let cb = match &placed {
            Some(p) => self.placed_result(p, label),
            None => self.define(c),
        };
        let mut mm = match &gathered {
            Some(rows) => self.gathered_matmul_kernel(rows, &va, &vb, sb[1], cb),
            None => self.matmul_kernel(&va, &sa, &vb, &sb, &sc, cb),
        };
        if let Some(p) = &placed {
            debug_assert_eq!(mm.batches.len(), 1, "placed rows fold into one product");
            mm.c_rows = Some(p.rows.iter().map(|&r| (r * mm.n) as i64).collect());
        }
        // The implementation and the weight's layout are the backend's
        // choices (`cpu::choose` for the CPU); the kernel carries what was
        // forced or what the optimiser picked.
        mm.hint = self.opts.matmul.or(preferred);
        Some(mm)
    }

    /// A product whose rows are symbolic (a sequence's tokens) by a shared
    /// `b` of known size (a weight: `symbols_to_bind` checks): one tall
    /// product `[rows, k] @ [k, n]`, its rows read at run time, with `a`
    /// copied dense first if its view does not fold into rows of known
    /// strides.
    fn symbolic_rows_matmul(
        &mut self,
        a: ValueId,
        b: ValueId,
        c: ValueId,
        preferred: Option<MatMulImpl>,
        label: &str,
    ) -> MatMulKernel {
        let g = self.g;
        let (sa, sb) = (g.ty(a).shape.clone(), g.ty(b).sizes());
        let (k, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
        let rows: Dim = sa[..sa.len() - 1].iter().copied().product();
        let folded = |vw: &View| {
            let st = reshape_strides(&sa, &vw.strides, &[rows, Dim::new(k)])?;
            (vw.offset.is_known() && st.iter().all(|d| d.is_known())).then(|| [known(st[0]), known(st[1])])
        };
        let mut va = self.view(a);
        let a_strides = match folded(&va) {
            Some(st) => st,
            None => {
                self.dense(a, label);
                va = self.view(a);
                folded(&va).expect("a dense value folds into rows")
            }
        };
        let vb = self.generated_ready(b, label);
        let b_st = vb.st();
        let cb = self.define(c);
        MatMulKernel {
            m: rows,
            k,
            n,
            a: va.buffer,
            b: vb.buffer,
            c: cb,
            a_strides,
            b_strides: [b_st[sb.len() - 2], b_st[sb.len() - 1]],
            batches: vec![[va.off(), vb.off(), 0]],
            implementation: MatMulImpl::Unchosen,
            hint: self.opts.matmul.or(preferred),
            b_packed: false,
            epilogue: None,
            a_rows: None,
            c_rows: None,
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

    /// The buffer a product with placed rows writes: the result of the
    /// layout ops after it, read as it is, or plus the bias row (pending,
    /// so that the reader's map and then the matmul's epilogue take it).
    fn placed_result(&mut self, p: &PlacedRows, label: &str) -> BufferId {
        let shape = self.g.ty(p.result).shape.clone();
        let b = self.scratch(DType::F32, &shape);
        let dense = dense_operand(b, DType::F32, &shape);
        match p.bias {
            Some(bias) => {
                self.constant(bias);
                let bias = self.read(bias, &shape);
                let expr = Expr::binary(Binary::Add, Expr::Input(0), Expr::Input(1));
                self.pending
                    .insert(p.result, Pending { shape, inputs: vec![dense, bias], expr, label: label.to_string() });
            }
            None => {
                self.views.insert(p.result, View::dense(b, &shape));
            }
        }
        b
    }

    /// One tall product over rows of `va` (the source's view) taken in the
    /// order `rows` gives, by a table of row offsets: `[rows, k] @ [k, n]`.
    fn gathered_matmul_kernel(
        &self,
        rows: &GatheredRows,
        va: &View,
        vb: &View,
        n: usize,
        cb: BufferId,
    ) -> MatMulKernel {
        let shape = &self.g.ty(rows.source).sizes();
        let (lead, k) = (&shape[..shape.len() - 1], shape[shape.len() - 1]);
        let (va_offset, va_strides, vb_strides) = (va.off(), va.st(), vb.st());
        let offset = |r: usize| {
            let (mut at, mut rest) = (va_offset, r);
            for d in (0..lead.len()).rev() {
                at += (rest % lead[d]) as isize * va_strides[d];
                rest /= lead[d];
            }
            at as i64
        };
        MatMulKernel {
            m: Dim::new(rows.rows.len()),
            k,
            n,
            a: va.buffer,
            b: vb.buffer,
            c: cb,
            a_strides: [0, va_strides[lead.len()]],
            b_strides: [vb_strides[0], vb_strides[1]],
            batches: vec![[0, vb.off(), 0]],
            // Row tables are read by the packed GEMM only.
            implementation: MatMulImpl::Packed,
            hint: Some(MatMulImpl::Packed),
            b_packed: false,
            epilogue: None,
            a_rows: Some(rows.rows.iter().map(|&r| offset(r)).collect()),
            c_rows: None,
        }
    }

    /// The view of a matmul's `b`, made dense when generated matmuls are
    /// forced (ahead-of-time code): they load rows of `b` as vectors.
    fn generated_ready(&mut self, b: ValueId, label: &str) -> View {
        let vb = self.known_view(b, label);
        let rank = self.g.ty(b).rank();
        if self.opts.matmul == Some(MatMulImpl::Generated) && vb.strides[rank - 1] != 1 {
            self.dense(b, label);
            return self.view(b);
        }
        vb
    }

    /// `c = a @ b` for views of shapes `sa`, `sb` (rank >= 2) into the dense
    /// buffer `cb` of shape `sc`.
    fn matmul_kernel(
        &self,
        va: &View,
        sa: &[usize],
        vb: &View,
        sb: &[usize],
        sc: &[usize],
        cb: BufferId,
    ) -> MatMulKernel {
        let (m, k, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
        let batch = &sc[..sc.len() - 2];
        let (va_offset, va_strides) = (va.off(), va.st());
        let (vb_offset, vb_strides) = (vb.off(), vb.st());
        let nb: usize = batch.iter().product();
        // A `b` shared by every batch (a weight) and an `a` whose batch dims
        // fold into its rows make one tall product: [nb * m, k] @ [k, n].
        let b_shared = sb[..sb.len() - 2].iter().all(|&d| d == 1);
        let a_unbroadcast = sa[..sa.len() - 2].iter().product::<usize>() == nb;
        if nb > 1 && b_shared && a_unbroadcast {
            if let Some(rows) = reshape_known(sa, &va_strides, &[nb * m, k]) {
                let folded = MatMulKernel {
                    m: Dim::new(nb * m),
                    k,
                    n,
                    a: va.buffer,
                    b: vb.buffer,
                    c: cb,
                    a_strides: [rows[0], rows[1]],
                    b_strides: [vb_strides[sb.len() - 2], vb_strides[sb.len() - 1]],
                    batches: vec![[va_offset, vb_offset, 0]],
                    implementation: MatMulImpl::Unchosen,
                    hint: self.opts.matmul,
                    b_packed: false,
                    epilogue: None,
                    a_rows: None,
                    c_rows: None,
                };
                return folded;
            }
        }
        let a_b: Vec<isize> = broadcast_view(&dims(&sa[..sa.len() - 2]), &va.strides[..sa.len() - 2], &dims(batch))
            .into_iter()
            .map(known)
            .collect();
        let b_b: Vec<isize> = broadcast_view(&dims(&sb[..sb.len() - 2]), &vb.strides[..sb.len() - 2], &dims(batch))
            .into_iter()
            .map(known)
            .collect();
        let bs = egret_ir::strides_of(batch);
        let batches = (0..nb)
            .map(|i| {
                let (mut oa, mut ob) = (va_offset, vb_offset);
                for d in 0..batch.len() {
                    let idx = ((i / bs[d]) % batch[d]) as isize;
                    oa += idx * a_b[d];
                    ob += idx * b_b[d];
                }
                [oa, ob, (i * m * n) as isize]
            })
            .collect();
        let mm = MatMulKernel {
            m: Dim::new(m),
            k,
            n,
            a: va.buffer,
            b: vb.buffer,
            c: cb,
            a_strides: [va_strides[sa.len() - 2], va_strides[sa.len() - 1]],
            b_strides: [vb_strides[sb.len() - 2], vb_strides[sb.len() - 1]],
            batches,
            implementation: MatMulImpl::Unchosen,
            hint: self.opts.matmul,
            b_packed: false,
            epilogue: None,
            a_rows: None,
            c_rows: None,
        };
        mm
    }

    /// Decides, before any node is lowered, which layout chains are not
    /// lowered at all because the kernel after or before them reads or
    /// writes through them: grouped-query keys and values for attention,
    /// gathered and placed rows for packed products.
    fn plan_reads_in_place(&mut self) {
        let (g, opts) = (self.g, self.opts);
        // Grouped-query keys and values the attention kernel reads in place:
        // only where it is the flash kernel (the JIT) and views are on.
        if opts.views && opts.matmul != Some(MatMulImpl::Generated) {
            for n in g.node_ids() {
                let node = g.node(n);
                let is_attention = matches!(node.op, Op::Attention { .. } | Op::AttentionTiled { .. });
                if !is_attention || node.inputs.iter().any(|&v| g.ty(v).dtype != DType::F32) {
                    continue;
                }
                for &v in &node.inputs[1..3] {
                    if g.use_count(v) != 1 {
                        continue;
                    }
                    if let Some((r, nodes)) = repeated_heads(g, v) {
                        self.repeated.insert(v, r);
                        self.skipped.extend(nodes);
                    }
                }
            }
        }
        // Permuted rows the packed GEMM gathers or places itself: where the
        // optimiser chose it for a constant 2-d f32 weight, and nothing forces
        // another.
        if opts.views && !opts.neutral && matches!(opts.matmul, None | Some(MatMulImpl::Packed)) {
            for n in g.node_ids() {
                let node = g.node(n);
                let Op::MatMulTiled { tiling: MatMulTiling::Packed } = node.op else { continue };
                let (a, b) = (node.inputs[0], node.inputs[1]);
                let weight = g.const_value(b).is_some_and(|w| w.rank() == 2 && w.dtype() == DType::F32);
                if !weight || g.ty(a).dtype != DType::F32 {
                    continue;
                }
                // Chains another rewrite here already took are left to it.
                if g.use_count(a) == 1 {
                    if let Some((rows, nodes)) =
                        gathered_rows(g, a).filter(|(_, n)| n.iter().all(|x| !self.skipped.contains(x)))
                    {
                        self.gathered.insert(a, rows);
                        self.skipped.extend(nodes);
                    }
                }
                let p = node.outputs[0];
                if let Some((rows, nodes)) =
                    placed_rows(g, p).filter(|(_, n)| n.iter().all(|x| !self.skipped.contains(x)))
                {
                    self.placed.insert(p, rows);
                    self.skipped.extend(nodes);
                }
            }
        }
    }

    /// The view attention reads a key or value operand through, and how
    /// many heads share each of its heads (1 unless `repeated_heads`): the
    /// view then has the source's head strides.
    fn attention_operand(&mut self, v: ValueId) -> (View, usize) {
        let Some(r) = self.repeated.get(&v).copied() else { return (self.view(v), 1) };
        let mut view = self.view(r.source);
        if r.transposed {
            let rank = view.strides.len();
            view.strides.swap(rank - 2, rank - 1);
        }
        (view, r.repeat)
    }

    /// Attention: one flash-style kernel where the GEMM library links (the
    /// JIT); elsewhere (ahead-of-time code) the composite below.
    fn attention(
        &mut self,
        inputs: &[ValueId],
        out: ValueId,
        attrs: Scores,
        tiles: Option<(usize, usize)>,
        label: &str,
    ) {
        if self.opts.matmul == Some(MatMulImpl::Generated) {
            return self.attention_composite(inputs, out, attrs, label);
        }
        let Scores { scale, softcap, nan_to_zero } = attrs;
        let g = self.g;
        let (q, kt, v) = (inputs[0], inputs[1], inputs[2]);
        // The batches and head sizes are known (`symbols_to_bind`); the
        // queries' and keys' counts may be symbolic.
        let (sq_shape, skt, sv) = (g.ty(q).shape.clone(), g.ty(kt).shape.clone(), g.ty(v).shape.clone());
        let so = g.ty(out).shape.clone();
        let (sq, d, sk, dv) = (
            sq_shape[sq_shape.len() - 2],
            known_size(sq_shape[sq_shape.len() - 1]),
            skt[skt.len() - 1],
            known_size(so[so.len() - 1]),
        );
        // A symbolic leading batch axis (a model's batch) over known heads
        // is strides, not a list (`OuterBatch`); the other axes are listed.
        let batch_dims: Vec<Dim> = so[..so.len() - 2].to_vec();
        let lead = usize::from(batch_dims.len() >= 2 && !batch_dims[0].is_known());
        let batch: Vec<usize> = batch_dims[lead..].iter().map(|&d| known_size(d)).collect();
        let mut scores = batch_dims.clone();
        scores.extend([sq, sk]);
        let vq = self.view(q);
        let (vkt, kt_repeat) = self.attention_operand(kt);
        let (vv, v_repeat) = self.attention_operand(v);
        let vm = inputs.get(3).map(|&m| self.read(m, &scores));
        let vo = self.attention_output(out);
        let nb = batch_dims.len();
        let bq = broadcast_view(&sq_shape[..sq_shape.len() - 2], &vq.strides[..sq_shape.len() - 2], &batch_dims);
        let bkt = broadcast_view(&skt[..skt.len() - 2], &vkt.strides[..skt.len() - 2], &batch_dims);
        let bv = broadcast_view(&sv[..sv.len() - 2], &vv.strides[..sv.len() - 2], &batch_dims);
        let bs = egret_ir::strides_of(&batch);
        let batches = (0..batch.iter().product::<usize>())
            .map(|i| {
                let mask_offset = vm.as_ref().map_or(Dim::new(0), |m| m.offset);
                let mut offs = [vq.offset, vkt.offset, vv.offset, mask_offset, vo.offset];
                for (j, dim) in (lead..nb).enumerate() {
                    let idx = ((i / bs[j]) % batch[j]) as isize;
                    // Heads are the last batch axis; repeated ones share.
                    let head = |repeat: usize| if dim + 1 == nb { idx / repeat as isize } else { idx };
                    offs[0] += bq[dim] * idx;
                    offs[1] += bkt[dim] * head(kt_repeat);
                    offs[2] += bv[dim] * head(v_repeat);
                    if let Some(m) = &vm {
                        offs[3] += m.strides[dim] * idx;
                    }
                    offs[4] += vo.strides[dim] * idx;
                }
                offs
            })
            .collect::<Vec<_>>();
        let outer = (lead == 1).then(|| OuterBatch {
            count: batch_dims[0],
            strides: [bq[0], bkt[0], bv[0], vm.as_ref().map_or(Dim::new(0), |m| m.strides[0]), vo.strides[0]],
        });
        let last2 = |st: &[Dim]| [st[st.len() - 2], st[st.len() - 1]];
        // The optimiser's tiles, or at most 64 x 512 scores (128 KiB, in
        // L2), the keys split into equal blocks so the last is not a sliver
        // (the kernel takes at most all the keys when a symbolic count
        // turns out smaller).
        let block = match sq.size() {
            Some(sq) => tiles.map_or(64, |t| t.0).clamp(1, sq.max(1)),
            None => tiles.map_or(64, |t| t.0).max(1),
        };
        let key_block = match sk.size() {
            Some(sk) => tiles.map_or(sk.div_ceil(sk.div_ceil(512).max(1)), |t| t.1).clamp(1, sk.max(1)),
            None => tiles.map_or(512, |t| t.1).max(1),
        };
        let key_spans = match (sq.size(), sk.size(), &vm) {
            (Some(sq), Some(sk), Some(m))
                if outer.is_none() && m.is_known() && batches.iter().flatten().all(|d| d.is_known()) =>
            {
                self.mask_key_spans(m, &batches, sq, sk, block)
            }
            _ => None,
        };
        let kernel = AttentionKernel {
            sq,
            sk,
            d,
            dv,
            scale,
            softcap,
            nan_to_zero,
            block,
            key_block,
            q: vq.buffer,
            kt: vkt.buffer,
            v: vv.buffer,
            mask: vm.as_ref().map(|m| m.buffer),
            out: vo.buffer,
            q_strides: last2(&vq.strides),
            kt_strides: last2(&vkt.strides),
            v_strides: last2(&vv.strides),
            mask_strides: vm.as_ref().map_or([Dim::new(0); 2], |m| last2(&m.strides)),
            out_row_stride: vo.strides[vo.strides.len() - 2],
            batches,
            outer,
            key_spans,
        };
        self.push(KernelKind::Attention(kernel), label);
    }

    /// Where attention writes its output. Exporters move the heads next to
    /// the features before merging them (`transpose` `[.., heads, sq, dv]`
    /// to `[.., sq, heads, dv]`, then `reshape`): where that transpose is
    /// the output's only reader, the kernel writes the transposed layout
    /// directly (rows `heads * dv` apart), the transpose reads it as a
    /// dense view and the merge is a view too, instead of a copy of every
    /// head. Otherwise a fresh dense buffer.
    fn attention_output(&mut self, out: ValueId) -> View {
        let g = self.g;
        let ty = g.ty(out).clone();
        let rank = ty.shape.len();
        let readers = g.consumers(g.producer(out));
        if let ([reader], true, 1) = (readers.as_slice(), self.opts.views, g.use_count(out)) {
            let node = g.node(*reader);
            if let Op::Transpose { perm } = &node.op {
                if perm.len() == rank && perm[rank - 1] == rank - 1 {
                    let transposed_shape = g.ty(node.outputs[0]).shape.clone();
                    let transposed = contiguous_strides(&transposed_shape);
                    let buffer = self.scratch(ty.dtype, &transposed_shape);
                    // Axis `perm[j]` of the output is axis `j` of the transpose.
                    let mut strides = vec![Dim::new(0); rank];
                    for (j, &axis) in perm.iter().enumerate() {
                        strides[axis] = transposed[j];
                    }
                    let view = View { buffer, offset: Dim::new(0), strides };
                    self.views.insert(out, view.clone());
                    return view;
                }
            }
        }
        self.define(out);
        self.views[&out].clone()
    }

    /// Each task's key span (`AttentionKernel::key_spans`) when the mask is
    /// a constant whose masked-out keys can be skipped; `None` when it is
    /// not a constant, nothing can be skipped, or nothing would be.
    fn mask_key_spans(
        &self,
        mask: &Operand,
        batches: &[[Dim; 5]],
        sq: usize,
        sk: usize,
        block: usize,
    ) -> Option<Vec<[usize; 2]>> {
        let Storage::Constant(t) = &self.buffers[mask.buffer].storage else { return None };
        let values = t.as_f32()?;
        let strides = mask.known_strides();
        let rank = strides.len();
        let (rs, cs) = (strides[rank - 2], strides[rank - 1]);
        let mut by_offset: HashMap<isize, Vec<(usize, usize)>> = HashMap::new();
        let mut tasks = Vec::with_capacity(batches.len() * sq.div_ceil(block));
        for offs in batches {
            let at = known(offs[3]);
            let rows = match by_offset.entry(at) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let read = |r: usize, k: usize| values[(at + r as isize * rs + k as isize * cs) as usize];
                    e.insert(egret_ir::ops::linalg::live_key_spans(read, sq, sk)?)
                }
            };
            for row0 in (0..sq).step_by(block) {
                let (first, end) = egret_ir::ops::linalg::block_key_span(&rows[row0..sq.min(row0 + block)]);
                tasks.push([first, end]);
            }
        }
        tasks.iter().any(|&[first, end]| first > 0 || end < sk).then_some(tasks)
    }

    /// Attention as kernels: the scores into a scratch buffer, scaled (and
    /// masked) in place, a softmax over its rows in place, and the product
    /// with v.
    fn attention_composite(&mut self, inputs: &[ValueId], out: ValueId, attrs: Scores, label: &str) {
        let Scores { scale, softcap, nan_to_zero } = attrs;
        let g = self.g;
        let (q, kt, v) = (inputs[0], inputs[1], inputs[2]);
        let (sq, skt, sv) = (g.ty(q).sizes(), g.ty(kt).sizes(), g.ty(v).sizes());
        let mut scores =
            egret_ir::ops::broadcast_shapes(&sq[..sq.len() - 2], &skt[..skt.len() - 2]).expect("checked by inference");
        scores.extend([sq[sq.len() - 2], skt[skt.len() - 1]]);
        let s = self.scratch(DType::F32, &dims(&scores));
        let vq = self.known_view(q, label);
        let vkt = self.generated_ready(kt, label);
        let mm = self.matmul_kernel(&vq, &sq, &vkt, &skt, &scores, s);
        self.push(KernelKind::MatMul(mm), label);
        let dense = dense_operand(s, DType::F32, &dims(&scores));
        let scaled = match softcap {
            // cap * tanh(x * scale / cap)
            Some(cap) => Expr::binary(
                Binary::Mul,
                Expr::unary(Unary::Tanh, Expr::binary(Binary::Mul, Expr::Input(0), Expr::F32(scale / cap))),
                Expr::F32(cap),
            ),
            None => Expr::binary(Binary::Mul, Expr::Input(0), Expr::F32(scale)),
        };
        match inputs.get(3) {
            Some(&mask) => {
                let m = self.read(mask, &dims(&scores));
                let expr = Expr::binary(Binary::Add, scaled, Expr::Input(1));
                self.map(dims(&scores), vec![dense.clone(), m], dense.clone(), expr, label);
            }
            None if scale != 1.0 || softcap.is_some() => {
                self.map(dims(&scores), vec![dense.clone()], dense.clone(), scaled, label)
            }
            None => {}
        }
        let rows = Dim::new(scores[..scores.len() - 1].iter().product());
        let len = Dim::new(scores[scores.len() - 1]);
        self.push(
            KernelKind::Rows(RowKernel {
                rows,
                len,
                op: RowOp::Softmax,
                x: s,
                scale: None,
                bias: None,
                out: s,
                residual: None,
            }),
            label,
        );
        if nan_to_zero {
            let isnan = Expr::IsNaN(Box::new(Expr::Input(0)));
            let expr = Expr::Select(Box::new(isnan), Box::new(Expr::F32(0.0)), Box::new(Expr::Input(0)));
            self.map(dims(&scores), vec![dense.clone()], dense.clone(), expr, label);
        }
        let vview = self.generated_ready(v, label);
        let o = self.define(out);
        let so = g.ty(out).sizes();
        let probs = View::dense(s, &dims(&scores));
        let mm = self.matmul_kernel(&probs, &scores, &vview, &sv, &so, o);
        self.push(KernelKind::MatMul(mm), label);
    }
}

/// A convolution's attributes.
#[derive(Clone, Copy)]
struct ConvShape<'a> {
    strides: &'a [usize],
    pads: &'a [usize],
    dilations: &'a [usize],
    group: usize,
}

/// How an attention op turns its scores into probabilities (the op's
/// attributes).
#[derive(Clone, Copy)]
struct Scores {
    scale: f32,
    softcap: Option<f32>,
    nan_to_zero: bool,
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
    let mut plan =
        Plan { buffers: l.buffers, kernels, arena_bytes: 0, inputs, outputs, symbols, capacity, bounded: vec![] };
    plan_memory(&mut plan);
    Ok(plan)
}

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
fn row_reduction(kind: egret_ir::op::ReduceKind) -> bool {
    use egret_ir::op::ReduceKind as K;
    matches!(kind, K::Sum | K::Mean | K::Max | K::Min | K::SumSquare | K::L2)
}

/// Whether a gather's kernel can hold `data`: the rows it copies (its dims
/// after `axis`) are known; the axis and the dims before it may be symbolic.
fn gather_is_known(data: &[Dim], axis: usize) -> bool {
    data.get(axis + 1..).is_some_and(|d| d.iter().all(|d| d.is_known()))
}

/// The dims node `n`'s kernels need known (see `symbols_to_bind`).
fn dims_kernels_need(g: &Graph, n: NodeId, opts: LowerOptions) -> Vec<Dim> {
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

#[cfg(test)]
mod tests {
    use super::{placed_rows, reshape_known, reshape_strides};
    use egret_ir::Dim;

    /// Rows 4 wide, swapped in pairs within each group of four, after a
    /// `[2, 4, 4]` product plus `bias` (a constant of `bias_shape`); and
    /// the product's value.
    fn swapped_rows_after(bias_shape: &str) -> (egret_ir::Graph, egret_ir::ValueId) {
        let g = egret_ir::text::parse(&format!(
            "v0: f32[2,4,3] = input{{name=\"x\"}}
v1: f32[3,4] = const [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
v2: f32[2,4,4] = matmul_tiled{{tiling=packed}} v0, v1
v3: f32{bias_shape} = const [0.5, 1.5, 2.5, 3.5]
v4: f32[2,4,4] = add v2, v3
v5: f32[2,2,2,4] = reshape{{shape=[2, 2, 2, 4]}} v4
v6: f32[2,2,2,4] = transpose{{perm=[0, 2, 1, 3]}} v5
v7: f32[8,4] = reshape{{shape=[8, 4]}} v6
v8: f32[8,4] = exp v7
output \"y\" = v8
"
        ))
        .unwrap();
        let product = g.node_ids().find(|&n| g.node(n).op.name() == "matmul_tiled").map(|n| g.node(n).outputs[0]);
        let product = product.expect("the product");
        (g, product)
    }

    #[test]
    fn rows_are_placed_with_a_row_bias_and_not_with_a_column() {
        let (g, p) = swapped_rows_after("[4]");
        let (placed, skipped) = placed_rows(&g, p).expect("a row bias moves with the rows");
        assert_eq!(placed.rows, [0, 2, 1, 3, 4, 6, 5, 7]);
        assert!(placed.bias.is_some());
        assert_eq!(skipped.len(), 4, "the add and three layout ops");
        // The same four values as a column differ from row to row.
        let (g, p) = swapped_rows_after("[4,1]");
        assert!(placed_rows(&g, p).is_none());
    }

    #[test]
    fn reshape_views_split_and_merge_dense_runs() {
        // [2, 3, 4] dense -> [6, 4] and [2, 12]
        assert_eq!(reshape_known(&[2, 3, 4], &[12, 4, 1], &[6, 4]), Some(vec![4, 1]));
        assert_eq!(reshape_known(&[2, 3, 4], &[12, 4, 1], &[2, 3, 2, 2]), Some(vec![12, 4, 2, 1]));
        // A transposed view [4, 3] of a [3, 4] buffer cannot merge its dims.
        assert_eq!(reshape_known(&[4, 3], &[1, 4], &[12]), None);
        // ... but it can gain or lose unit dims.
        assert_eq!(reshape_known(&[4, 3], &[1, 4], &[4, 1, 3]), Some(vec![1, 0, 4]));
        // Head split of a [197, 192] row into [197, 3, 64].
        assert_eq!(reshape_known(&[197, 192], &[192, 1], &[197, 3, 64]), Some(vec![192, 64, 1]));
    }

    #[test]
    fn reshape_views_group_symbolic_dims_by_division() {
        let past = Dim::symbol("past");
        let d = |v: usize| Dim::new(v);
        // [2, past, 16] dense -> [2, 16*past]: the group past x 16 merges.
        let strides = super::contiguous_strides(&[d(2), past, d(16)]);
        assert_eq!(strides, vec![past * d(16), d(16), d(1)]);
        assert_eq!(
            reshape_strides(&[d(2), past, d(16)], &strides, &[d(2), past * d(16)]),
            Some(vec![past * d(16), d(1)])
        );
        // ... and splits back.
        let merged = [d(2), past * d(16)];
        let dense = super::contiguous_strides(&merged);
        assert_eq!(reshape_strides(&merged, &dense, &[d(2), past, d(16)]), Some(strides.clone()));
        // Two symbols with no division between them do not group.
        let seq = Dim::symbol("seq");
        assert_eq!(reshape_strides(&[past, seq], &[seq, d(1)], &[seq, past]), None);
    }
}
