//! Convolutions as im2col gathers and products, and over a symbolic batch
//! as rows of one product.

use super::*;

/// A convolution's attributes.
#[derive(Clone, Copy)]
pub(super) struct ConvShape<'a> {
    pub(super) strides: &'a [usize],
    pub(super) pads: &'a [usize],
    pub(super) dilations: &'a [usize],
    pub(super) group: usize,
}

impl Lowering<'_> {
    /// Convolution as im2col and a matmul: zero-pad if needed (a fill and a
    /// copy into the interior), gather the patches with one strided map
    /// (`cols[n, c, k.., o..]`), multiply by the weights viewed as
    /// `[M, C * prod(k)]` (with groups, one product per batch and group, of
    /// `M / group` weight rows and that group's `C / group` channels of
    /// patches), and add the bias with a broadcast map.
    pub(super) fn conv(&mut self, inputs: &[ValueId], out: ValueId, shape: ConvShape, label: &str) {
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
    pub(super) fn conv_symbolic_batch(&mut self, inputs: &[ValueId], out: ValueId, shape: ConvShape, label: &str) {
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
}
