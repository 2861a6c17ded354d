//! Reductions over axes, and arg-max/arg-min.

use super::{arity, OpResult};
use crate::dtype::{DType, Type};
use crate::op::{Op, ReduceKind};
use crate::tensor::{strides_of, Data, Tensor};

fn reduced_shape<D: super::Extent>(shape: &[D], axes: &[usize], keepdims: bool) -> Vec<D> {
    let mut out = Vec::new();
    for (i, &d) in shape.iter().enumerate() {
        if axes.contains(&i) {
            if keepdims {
                out.push(D::ONE);
            }
        } else {
            out.push(d);
        }
    }
    out
}

pub fn infer(op: &Op, inputs: &[&Type]) -> OpResult<Vec<Type>> {
    arity(inputs, 1, 1)?;
    let x = inputs[0];
    match op {
        Op::Reduce { kind, axes, keepdims } => {
            if let Some(a) = axes.iter().find(|&&a| a >= x.rank()) {
                return Err(format!("axis {a} out of range for rank {}", x.rank()));
            }
            // On bools, max is "any" and min is "all"; nothing else is defined.
            if x.dtype == DType::Bool && !matches!(kind, ReduceKind::Max | ReduceKind::Min) {
                return Err(format!("reduce {} is not defined on bool", kind.word()));
            }
            Ok(vec![Type::new(x.dtype, reduced_shape(&x.shape, axes, *keepdims))])
        }
        Op::ArgReduce { axis, keepdims, .. } => {
            if *axis >= x.rank() {
                return Err(format!("axis {axis} out of range for rank {}", x.rank()));
            }
            if x.shape[*axis] == 0 {
                return Err("arg reduction over an empty axis".into());
            }
            Ok(vec![Type::new(DType::I64, reduced_shape(&x.shape, &[*axis], *keepdims))])
        }
        other => Err(format!("no inference rule for {}", other.name())),
    }
}

/// For every input element, the flat index of the output element it reduces into.
fn reduce_index(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    let kept: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let ks = strides_of(&kept);
    let strides: Vec<usize> = (0..shape.len()).map(|i| if axes.contains(&i) { 0 } else { ks[i] }).collect();
    super::strided_index(shape, &strides, 0)
}

pub fn eval(op: &Op, inputs: &[&Tensor]) -> OpResult<Vec<Tensor>> {
    let x = inputs[0];
    match op {
        Op::Reduce { kind, axes, keepdims } => {
            let out_shape = reduced_shape(x.shape(), axes, *keepdims);
            let n_out: usize = out_shape.iter().product();
            let v = x.to_f64_vec();
            let is_bool = x.dtype() == DType::Bool;
            let init = match kind {
                // The identities of max and min; for bools, false and true.
                ReduceKind::Max if is_bool => 0.0,
                ReduceKind::Min if is_bool => 1.0,
                ReduceKind::Max => f64::NEG_INFINITY,
                ReduceKind::Min => f64::INFINITY,
                ReduceKind::Prod => 1.0,
                _ => 0.0,
            };
            let mut acc = vec![init; n_out];
            // LogSumExp is shifted by the max for stability.
            let mut shift = vec![0f64; n_out];
            let idx = reduce_index(x.shape(), axes);
            if *kind == ReduceKind::LogSumExp {
                shift = vec![f64::NEG_INFINITY; n_out];
                for (&o, &a) in idx.iter().zip(&v) {
                    shift[o] = shift[o].max(a);
                }
                for s in shift.iter_mut() {
                    if !s.is_finite() {
                        *s = 0.0;
                    }
                }
            }
            for (&o, &a) in idx.iter().zip(&v) {
                let c = &mut acc[o];
                *c = match kind {
                    ReduceKind::Sum | ReduceKind::Mean | ReduceKind::LogSum => *c + a,
                    // NaN wins, and stays (as numpy's and ONNX's reference
                    // reductions): it was lost at the next number.
                    ReduceKind::Max | ReduceKind::Min if c.is_nan() || a.is_nan() => f64::NAN,
                    ReduceKind::Max => c.max(a),
                    ReduceKind::Min => c.min(a),
                    ReduceKind::Prod => *c * a,
                    ReduceKind::L1 => *c + a.abs(),
                    ReduceKind::L2 | ReduceKind::SumSquare => *c + a * a,
                    ReduceKind::LogSumExp => *c + (a - shift[o]).exp(),
                };
            }
            let count = if n_out == 0 { 1 } else { v.len() / n_out.max(1) };
            for (o, c) in acc.iter_mut().enumerate() {
                *c = match kind {
                    ReduceKind::Mean => *c / count as f64,
                    ReduceKind::L2 => c.sqrt(),
                    ReduceKind::LogSum => c.ln(),
                    ReduceKind::LogSumExp => c.ln() + shift[o],
                    _ => *c,
                };
            }
            Ok(vec![Tensor::new(out_shape, Data::from_f64s(x.dtype(), &acc))])
        }
        Op::ArgReduce { select_max, axis, keepdims, select_last } => {
            let (outer, len, inner) = super::nn::split_at_axis(x.shape(), *axis);
            let v = x.to_f64_vec();
            let mut out = Vec::with_capacity(outer * inner);
            for o in 0..outer {
                for i in 0..inner {
                    let mut best = 0usize;
                    for j in 1..len {
                        let (a, b) = (v[(o * len + j) * inner + i], v[(o * len + best) * inner + i]);
                        let better = if *select_max { a > b } else { a < b };
                        if better || (*select_last && a == b) {
                            best = j;
                        }
                    }
                    out.push(best as i64);
                }
            }
            Ok(vec![Tensor::new(reduced_shape(x.shape(), &[*axis], *keepdims), Data::I64(out.into()))])
        }
        other => Err(format!("no evaluation rule for {}", other.name())),
    }
}
