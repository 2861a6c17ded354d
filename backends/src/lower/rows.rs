//! Row kernels (softmax, norms, reductions) and gathers.

use super::*;

impl Lowering<'_> {
    /// Softmax over the last axis, norms whose statistics nobody reads, and
    /// reductions over trailing axes, on f32.
    pub(super) fn rows(&mut self, op: &Op, inputs: &[ValueId], outputs: &[ValueId], label: &str) -> Option<RowKernel> {
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

    pub(super) fn gather(
        &mut self,
        data: ValueId,
        indices: ValueId,
        out: ValueId,
        axis: usize,
        label: &str,
    ) -> GatherKernel {
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
}
