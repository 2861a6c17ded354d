//! Layout ops as views (an offset and per-dim strides of another value's
//! buffer), reshapes of strided views, and the copies consumers that need
//! dense memory get.

use super::*;

/// Row-major strides of `shape` (dims may be symbolic).
pub(super) fn contiguous_strides(shape: &[Dim]) -> Vec<Dim> {
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
pub(super) fn broadcast_view(shape: &[Dim], strides: &[Dim], out: &[Dim]) -> Vec<Dim> {
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 { Dim::new(0) } else { strides[i - off] }).collect()
}

/// Which side of a reshape's dim groups grows next: the one whose product
/// is smaller (known sizes), or the one that divides the other (symbolic
/// ones: `past` grows to `16*past`); `None` when neither does.
pub(super) fn smaller(po: Dim, pn: Dim) -> Option<bool> {
    match (po.known(), pn.known()) {
        (Some(a), Some(b)) => Some(a < b),
        _ if pn.div_exact(po).is_some() => Some(true),
        _ if po.div_exact(pn).is_some() => Some(false),
        _ => None,
    }
}

/// Strides that view data laid out as (`old_shape`, `old_strides`) with
/// `new_shape` without moving it, if any exist (numpy's no-copy reshape).
pub(super) fn reshape_strides(old_shape: &[Dim], old_strides: &[Dim], new_shape: &[Dim]) -> Option<Vec<Dim>> {
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
pub(super) fn reshape_known(old_shape: &[usize], old_strides: &[isize], new_shape: &[usize]) -> Option<Vec<isize>> {
    let dims = |v: &[usize]| egret_ir::dims_of(v);
    let strides: Vec<Dim> = old_strides.iter().map(|&s| Dim::from(s)).collect();
    let res = reshape_strides(&dims(old_shape), &strides, &dims(new_shape))?;
    Some(res.into_iter().map(known).collect())
}

/// Row-major strides of known sizes.
pub(super) fn row_major(shape: &[usize]) -> Vec<isize> {
    egret_ir::strides_of(shape).into_iter().map(|s| s as isize).collect()
}

/// An operand of known offset and strides.
pub(super) fn known_operand(buffer: BufferId, offset: isize, strides: &[isize]) -> Operand {
    Operand { buffer, dtype: DType::F32, offset: Dim::from(offset), strides: idims(strides) }
}

/// Known sizes as dims.
pub(super) fn dims(sizes: &[usize]) -> Vec<Dim> {
    egret_ir::dims_of(sizes)
}

/// Known strides or offsets as dims.
pub(super) fn idims(values: &[isize]) -> Vec<Dim> {
    values.iter().map(|&v| Dim::from(v)).collect()
}

/// Merges adjacent dims that every operand walks contiguously, and drops
/// dims of size 1, so most kernels run one long inner loop.
pub(super) fn collapse_dims(shape: Vec<Dim>, mut ops: Vec<Operand>) -> (Vec<Dim>, Vec<Operand>) {
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

impl Lowering<'_> {
    /// Carries a pending elementwise expression through a reshape of it
    /// (a reshape keeps the elements' order), so that the chain goes on
    /// growing on the other side: an exporter's `Gemm -> Reshape -> GELU`
    /// then becomes one map, and a matmul epilogue. Only when `x` is read
    /// only here and every operand the expression reads has a view in the
    /// new shape.
    pub(super) fn reshape_pending(&mut self, x: ValueId, out: ValueId, shape: &[Dim]) -> bool {
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
    pub(super) fn layout(&mut self, op: &Op, inputs: &[ValueId], outputs: &[ValueId], label: &str) -> bool {
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
    pub(super) fn copy_unless_views(&mut self, outputs: &[ValueId], label: &str) {
        if !self.opts.views {
            for &v in outputs {
                self.dense(v, label);
            }
        }
    }

    /// Decides, before any node is lowered, which layout chains are not
    /// lowered at all because the kernel after or before them reads or
    /// writes through them: grouped-query keys and values for attention,
    /// gathered and placed rows for packed products.
    pub(super) fn plan_reads_in_place(&mut self) {
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
}

#[cfg(test)]
mod tests {
    use super::{reshape_known, reshape_strides};
    use egret_ir::Dim;

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
