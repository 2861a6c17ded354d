//! Fused attention: operands read in place (grouped-query heads through
//! their repeat), masks and the key spans a constant mask lets each query
//! block skip, and the composite of products where no attention kernel
//! serves.

use super::*;

/// Keys or values of grouped-query attention as exporters write
/// `repeat_kv`: `x[.., G, s, d]` unsqueezed to `[.., G, 1, s, d]`,
/// expanded to `[.., G, R, s, d]` and reshaped to `[.., G * R, s, d]`
/// (for the keys, then transposed to `[.., G * R, d, s]`). Head `h` of the
/// result is head `h / R` of `source`.
#[derive(Clone, Copy, Debug)]
pub(super) struct RepeatedHeads {
    pub(super) source: ValueId,
    pub(super) repeat: usize,
    /// The last two axes are swapped after the repeat.
    pub(super) transposed: bool,
}

/// `v` as a repeat of another value's heads, and the nodes that repeat
/// them, if every intermediate value is read only by the next node.
pub(super) fn repeated_heads(g: &Graph, v: ValueId) -> Option<(RepeatedHeads, Vec<NodeId>)> {
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

/// How an attention op turns its scores into probabilities (the op's
/// attributes).
#[derive(Clone, Copy)]
pub(super) struct Scores {
    pub(super) scale: f32,
    pub(super) softcap: Option<f32>,
    pub(super) nan_to_zero: bool,
}

impl Lowering<'_> {
    /// The view attention reads a key or value operand through, and how
    /// many heads share each of its heads (1 unless `repeated_heads`): the
    /// view then has the source's head strides.
    pub(super) fn attention_operand(&mut self, v: ValueId) -> (View, usize) {
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
    pub(super) fn attention(
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
    pub(super) fn attention_output(&mut self, out: ValueId) -> View {
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
    pub(super) fn mask_key_spans(
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
    pub(super) fn attention_composite(&mut self, inputs: &[ValueId], out: ValueId, attrs: Scores, label: &str) {
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
