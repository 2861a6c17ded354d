//! Matrix products: rows of `a` read in place or gathered through the
//! layout ops before the product, rows of the result placed by the GEMM,
//! products over symbolic rows, and the kernel each gets.

use super::*;

/// A matmul's left operand as rows of `source`: row `i` of the operand is
/// row `rows[i]` of `source` (rows along its last axis, which the layout
/// ops in between keep whole).
#[derive(Clone, Debug)]
pub(super) struct GatheredRows {
    pub(super) source: ValueId,
    pub(super) rows: Vec<usize>,
}

/// `a` as rows of another value permuted or selected by reshapes,
/// transposes, slices and concats that keep the last axis whole (a Swin
/// block's roll and window partition), and the nodes that do it; `None`
/// when the rows are a strided view anyway (one stride per batch of `m`
/// rows), or the chain reads more than one value, or a value in between
/// has a reader outside it.
pub(super) fn gathered_rows(g: &Graph, a: ValueId) -> Option<(GatheredRows, Vec<NodeId>)> {
    let shape = &g.ty(a).known_shape()?;
    let (&width, m) = (shape.last()?, *shape.get(shape.len().checked_sub(2)?)?);
    // Rows of no elements are not rows the layout ops' replay can follow
    // (a reshape of an empty tensor need not keep the row count).
    if width == 0 {
        return None;
    }
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
pub(super) struct PlacedRows {
    pub(super) result: ValueId,
    pub(super) rows: Vec<usize>,
    pub(super) bias: Option<ValueId>,
}

/// Whether `node` moves whole rows along a last axis `width` wide (what
/// `row_ids` can replay).
pub(super) fn moves_rows(g: &Graph, node: &egret_ir::Node, width: usize) -> bool {
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
pub(super) fn placed_rows(g: &Graph, p: ValueId) -> Option<(PlacedRows, Vec<NodeId>)> {
    let width = *g.ty(p).known_shape()?.last()?;
    if width == 0 {
        return None;
    }
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
pub(super) fn strided_batches(rows: &[usize], m: usize) -> bool {
    rows.chunks(m.max(1)).all(|batch| {
        let step = |w: &[usize]| w[1] as isize - w[0] as isize;
        batch.windows(2).all(|w| step(w) == step(&batch[..2]))
    })
}

/// The rows of the chain's source that `v` holds, as an i64 tensor of
/// `v`'s shape with the last axis 1 wide: the layout ops replayed on row
/// indices. The walk ends at the first value no such op produces, or
/// that `stop` picks: that is the source.
pub(super) fn row_ids(
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

impl Lowering<'_> {
    /// A matmul over strided operand views; batch dims broadcast.
    /// `preferred` is the implementation the optimiser chose, if it did; an
    /// implementation forced by the options (ahead-of-time code, `--matmul`)
    /// wins over it, and one that cannot compute this product falls back.
    pub(super) fn matmul(
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
    pub(super) fn symbolic_rows_matmul(
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
                // Dense rows of `k` are `k` apart, whatever `reshape_strides`
                // makes of an empty `a` (a dim of 0 leaves its strides open).
                folded(&va).unwrap_or([k as isize, 1])
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

    /// The buffer a product with placed rows writes: the result of the
    /// layout ops after it, read as it is, or plus the bias row (pending,
    /// so that the reader's map and then the matmul's epilogue take it).
    pub(super) fn placed_result(&mut self, p: &PlacedRows, label: &str) -> BufferId {
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
    pub(super) fn gathered_matmul_kernel(
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
    pub(super) fn generated_ready(&mut self, b: ValueId, label: &str) -> View {
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
    pub(super) fn matmul_kernel(
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
}

#[cfg(test)]
mod tests {
    use super::placed_rows;

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
}
