//! Neural-network ops: pooling, softmax family, normalisations.

use super::linalg::{pooled_len, window_offsets};
use super::{arity, OpResult};
use crate::dim::{shape_text, Dim};
use crate::dispatch_float;
use crate::dtype::{DType, Type};
use crate::op::Op;
use crate::tensor::{Data, Elem, Tensor};

fn pool_out_shape(
    x: &Type,
    kernel: &[usize],
    strides: &[usize],
    pads: &[usize],
    dil: &[usize],
    ceil: bool,
) -> OpResult<Vec<Dim>> {
    let sp = x.rank().checked_sub(2).ok_or("pooling input needs rank >= 3")?;
    if kernel.len() != sp || strides.len() != sp || dil.len() != sp || pads.len() != 2 * sp {
        return Err(format!("pooling parameters do not match a {sp}-d input"));
    }
    // The batch and channels pass through (the batch may be symbolic); windows need known sizes.
    let xs = super::sizes(&x.shape[2..], "the pooled input's spatial dims")?;
    let mut out = x.shape[..2].to_vec();
    for i in 0..sp {
        let len = pooled_len(xs[i], kernel[i], strides[i], pads[i], pads[i + sp], dil[i], ceil)?;
        // Pads near 2^63 give lengths no dim holds (`Dim::new` asserts it).
        if len > crate::MAX_ELEMENTS {
            return Err(format!("pooled length {len} of spatial dim {i} is too large"));
        }
        out.push(Dim::new(len));
    }
    Ok(out)
}

/// `(outer, axis_len, inner)` around `axis`.
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

pub fn infer(op: &Op, inputs: &[&Type]) -> OpResult<Vec<Type>> {
    let x = inputs.first().ok_or("expects at least one input")?;
    match op {
        Op::MaxPool { kernel, strides, pads, dilations, ceil_mode } => {
            arity(inputs, 1, 1)?;
            if x.dtype == DType::Bool {
                return Err("max_pool is not defined on bool".into());
            }
            let s = pool_out_shape(x, kernel, strides, pads, dilations, *ceil_mode)?;
            Ok(vec![Type::new(x.dtype, s.clone()), Type::new(DType::I64, s)])
        }
        Op::AveragePool { kernel, strides, pads, dilations, ceil_mode, .. } => {
            arity(inputs, 1, 1)?;
            super::expect_float(x, "input")?;
            Ok(vec![Type::new(x.dtype, pool_out_shape(x, kernel, strides, pads, dilations, *ceil_mode)?)])
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::Hardmax { axis } => {
            arity(inputs, 1, 1)?;
            super::expect_float(x, "input")?;
            if *axis >= x.rank() {
                return Err(format!("axis {axis} out of range for rank {}", x.rank()));
            }
            Ok(vec![(*x).clone()])
        }
        Op::ResidualNorm { axis, epsilon, rms } => {
            arity(inputs, 3, 4)?;
            if inputs[1] != *x {
                return Err(format!("residual {} must have the input's type {x}", inputs[1]));
            }
            let mut norm_inputs = vec![*x];
            norm_inputs.extend(&inputs[2..]);
            let norm = if *rms {
                Op::RmsNorm { axis: *axis, epsilon: *epsilon }
            } else {
                Op::LayerNorm { axis: *axis, epsilon: *epsilon }
            };
            let y = infer(&norm, &norm_inputs)?.swap_remove(0);
            Ok(vec![y, (*x).clone()])
        }
        Op::LayerNorm { axis, .. } | Op::RmsNorm { axis, .. } => {
            arity(inputs, 2, 3)?;
            super::expect_float(x, "input")?;
            if *axis >= x.rank() {
                return Err(format!("axis {axis} out of range for rank {}", x.rank()));
            }
            let norm = &x.shape[*axis..];
            for t in &inputs[1..] {
                super::same_dtype(x, t, "scale/bias")?;
                if super::broadcast_dims(&t.shape, norm)? != norm {
                    return Err(format!(
                        "scale/bias {} does not broadcast to the normalised dims {}",
                        shape_text(&t.shape),
                        shape_text(norm)
                    ));
                }
            }
            if matches!(op, Op::RmsNorm { .. }) {
                return Ok(vec![(*x).clone()]);
            }
            let mut stat = x.shape[..*axis].to_vec();
            stat.extend(std::iter::repeat_n(Dim::new(1), x.rank() - axis));
            Ok(vec![(*x).clone(), Type::new(x.dtype, stat.clone()), Type::new(x.dtype, stat)])
        }
        Op::BatchNorm { .. } => {
            arity(inputs, 5, 5)?;
            super::expect_float(x, "input")?;
            let c = *x.shape.get(1).ok_or("batch_norm input needs rank >= 2")?;
            for t in &inputs[1..] {
                if t.shape != [c] {
                    return Err(format!("batch_norm parameters must have shape [{c}], found {}", shape_text(&t.shape)));
                }
            }
            Ok(vec![(*x).clone()])
        }
        Op::InstanceNorm { .. } => {
            arity(inputs, 3, 3)?;
            super::expect_float(x, "input")?;
            let c = *x.shape.get(1).ok_or("instance_norm input needs rank >= 2")?;
            for t in &inputs[1..] {
                if t.shape != [c] {
                    return Err(format!(
                        "instance_norm scale/bias must have shape [{c}], found {}",
                        shape_text(&t.shape)
                    ));
                }
            }
            Ok(vec![(*x).clone()])
        }
        other => Err(format!("no inference rule for {}", other.name())),
    }
}

pub fn eval(op: &Op, inputs: &[&Tensor]) -> OpResult<Vec<Tensor>> {
    let x = inputs[0];
    let types: Vec<Type> = inputs.iter().map(|t| t.ty()).collect();
    let out_types = infer(op, &types.iter().collect::<Vec<_>>())?;
    match op {
        Op::MaxPool { kernel, strides, pads, dilations, .. } => {
            max_pool(x, &out_types[0].sizes(), kernel, strides, pads, dilations)
        }
        Op::AveragePool { kernel, strides, pads, dilations, count_include_pad, .. } => {
            average_pool(x, &out_types[0].sizes(), kernel, strides, pads, dilations, *count_include_pad)
                .map(|t| vec![t])
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::Hardmax { axis } => {
            let (outer, len, inner) = split_at_axis(x.shape(), *axis);
            let data = dispatch_float!(x.data(), op.name(), v: T => {
                let mut out = v.clone();
                let mut row = vec![0f64; len];
                for o in 0..outer {
                    for i in 0..inner {
                        let at = |j: usize| (o * len + j) * inner + i;
                        for j in 0..len { row[j] = v[at(j)].to_f64(); }
                        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        match op {
                            Op::Hardmax { .. } => {
                                let first = row.iter().position(|&r| r == max).unwrap_or(0);
                                for j in 0..len { out[at(j)] = T::from_f64((j == first) as u8 as f64); }
                            }
                            _ => {
                                let sum: f64 = row.iter().map(|r| (r - max).exp()).sum();
                                for j in 0..len {
                                    out[at(j)] = T::from_f64(if matches!(op, Op::LogSoftmax { .. }) {
                                        row[j] - max - sum.ln()
                                    } else {
                                        (row[j] - max).exp() / sum
                                    });
                                }
                            }
                        }
                    }
                }
                T::wrap(out.into_vec())
            });
            Ok(vec![Tensor::new(x.shape().to_vec(), data)])
        }
        Op::ResidualNorm { axis, epsilon, rms } => {
            // The definition: the sum, then the norm of it.
            let sum = super::elementwise::eval_binary(&Op::Add, x, inputs[1])?;
            let norm = if *rms {
                Op::RmsNorm { axis: *axis, epsilon: *epsilon }
            } else {
                Op::LayerNorm { axis: *axis, epsilon: *epsilon }
            };
            let mut norm_inputs = vec![&sum];
            norm_inputs.extend(&inputs[2..]);
            let y = eval(&norm, &norm_inputs)?.swap_remove(0);
            Ok(vec![y, sum])
        }
        Op::LayerNorm { axis, epsilon } | Op::RmsNorm { axis, epsilon } => {
            let rms = matches!(op, Op::RmsNorm { .. });
            let norm_shape = &x.shape()[*axis..];
            let inner: usize = norm_shape.iter().product();
            let outer: usize = x.shape()[..*axis].iter().product();
            let expand = |t: &Tensor| t.to_f64_vec_broadcast(norm_shape);
            let scale = expand(inputs[1]);
            let bias = inputs.get(2).map(|b| expand(b));
            let v = x.to_f64_vec();
            let mut y = vec![0f64; v.len()];
            let mut means = vec![0f64; outer];
            let mut inv_stds = vec![0f64; outer];
            for o in 0..outer {
                let row = &v[o * inner..(o + 1) * inner];
                let mean = if rms { 0.0 } else { row.iter().sum::<f64>() / inner as f64 };
                let var = row.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / inner as f64;
                // Rounded to the tensor's type: a variance past f32's range is
                // inf, as in the decomposed form and every f32 kernel.
                let var = if x.dtype() == DType::F32 { var as f32 as f64 } else { var };
                let inv = 1.0 / (var + *epsilon as f64).sqrt();
                means[o] = mean;
                inv_stds[o] = inv;
                for j in 0..inner {
                    // No bias is no addition: a normalized zero times a
                    // negative scale stays -0 (+0 added would flip it).
                    let scaled = (row[j] - mean) * inv * scale[j];
                    y[o * inner + j] = bias.as_ref().map_or(scaled, |b| scaled + b[j]);
                }
            }
            let dt = x.dtype();
            let mut outs = vec![Tensor::new(x.shape().to_vec(), Data::from_f64s(dt, &y))];
            if !rms {
                outs.push(Tensor::new(out_types[1].sizes(), Data::from_f64s(dt, &means)));
                outs.push(Tensor::new(out_types[2].sizes(), Data::from_f64s(dt, &inv_stds)));
            }
            Ok(outs)
        }
        Op::BatchNorm { epsilon } | Op::InstanceNorm { epsilon } => {
            let (n, c) = (x.shape()[0], x.shape()[1]);
            let plane: usize = x.shape()[2..].iter().product();
            let v = x.to_f64_vec();
            let p: Vec<Vec<f64>> = inputs[1..].iter().map(|t| t.to_f64_vec()).collect();
            let mut y = vec![0f64; v.len()];
            for b in 0..n {
                for ch in 0..c {
                    let base = (b * c + ch) * plane;
                    let xs = &v[base..base + plane];
                    let (mean, var) = if matches!(op, Op::BatchNorm { .. }) {
                        (p[2][ch], p[3][ch])
                    } else {
                        let m = xs.iter().sum::<f64>() / plane as f64;
                        (m, xs.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / plane as f64)
                    };
                    let inv = 1.0 / (var + *epsilon as f64).sqrt();
                    for j in 0..plane {
                        y[base + j] = (xs[j] - mean) * inv * p[0][ch] + p[1][ch];
                    }
                }
            }
            Ok(vec![Tensor::new(x.shape().to_vec(), Data::from_f64s(x.dtype(), &y))])
        }
        other => Err(format!("no evaluation rule for {}", other.name())),
    }
}

fn max_pool(
    x: &Tensor,
    out_shape: &[usize],
    kernel: &[usize],
    strides: &[usize],
    pads: &[usize],
    dil: &[usize],
) -> OpResult<Vec<Tensor>> {
    let in_sp = &x.shape()[2..];
    let out_sp = &out_shape[2..];
    let offs = window_offsets(in_sp, out_sp, kernel, strides, pads, dil);
    let (planes, n_in, n_out, n_k) = (
        out_shape[0] * out_shape[1],
        in_sp.iter().product::<usize>(),
        out_sp.iter().product::<usize>(),
        kernel.iter().product::<usize>(),
    );
    let mut idx_out = Vec::with_capacity(planes * n_out);
    let data = crate::dispatch_num!(x.data(), "max_pool", v: T => {
        let mut out = Vec::with_capacity(planes * n_out);
        for pl in 0..planes {
            for p in 0..n_out {
                let mut best: Option<(T, usize)> = None;
                for o in offs[p * n_k..(p + 1) * n_k].iter().flatten() {
                    let val = v[pl * n_in + o];
                    if best.is_none_or(|(b, _)| val > b) {
                        best = Some((val, pl * n_in + o));
                    }
                }
                let (val, at) = best.unwrap_or((T::default(), 0));
                out.push(val);
                idx_out.push(at as i64);
            }
        }
        T::wrap(out)
    });
    Ok(vec![Tensor::new(out_shape.to_vec(), data), Tensor::new(out_shape.to_vec(), Data::I64(idx_out.into()))])
}

#[allow(clippy::too_many_arguments)]
fn average_pool(
    x: &Tensor,
    out_shape: &[usize],
    kernel: &[usize],
    strides: &[usize],
    pads: &[usize],
    dil: &[usize],
    count_include_pad: bool,
) -> OpResult<Tensor> {
    let in_sp = &x.shape()[2..];
    let out_sp = &out_shape[2..];
    let sp = in_sp.len();
    let offs = window_offsets(in_sp, out_sp, kernel, strides, pads, dil);
    // With count_include_pad, the divisor counts explicit padding but not the
    // extra positions ceil mode adds past the padded input.
    let divisors: Vec<f64> = if count_include_pad {
        let padded: Vec<usize> = (0..sp).map(|a| in_sp[a] + pads[a] + pads[a + sp]).collect();
        let unpadded = vec![0usize; 2 * sp];
        let offs_padded = window_offsets(&padded, out_sp, kernel, strides, &unpadded, dil);
        let n_k: usize = kernel.iter().product();
        (0..offs_padded.len() / n_k.max(1))
            .map(|p| offs_padded[p * n_k..(p + 1) * n_k].iter().flatten().count() as f64)
            .collect()
    } else {
        vec![]
    };
    let (planes, n_in, n_out, n_k) = (
        out_shape[0] * out_shape[1],
        in_sp.iter().product::<usize>(),
        out_sp.iter().product::<usize>(),
        kernel.iter().product::<usize>(),
    );
    let v = x.to_f64_vec();
    let mut out = Vec::with_capacity(planes * n_out);
    for pl in 0..planes {
        for p in 0..n_out {
            let mut sum = 0.0;
            let mut cnt = 0usize;
            for o in offs[p * n_k..(p + 1) * n_k].iter().flatten() {
                sum += v[pl * n_in + o];
                cnt += 1;
            }
            let d = if count_include_pad { divisors[p] } else { cnt as f64 };
            out.push(if d > 0.0 { sum / d } else { 0.0 });
        }
    }
    Ok(Tensor::new(out_shape.to_vec(), Data::from_f64s(x.dtype(), &out)))
}

impl Tensor {
    /// Values as f64, broadcast to `shape`.
    pub fn to_f64_vec_broadcast(&self, shape: &[usize]) -> Vec<f64> {
        let v = self.to_f64_vec();
        if self.shape() == shape {
            return v;
        }
        super::broadcast_index(self.shape(), shape).into_iter().map(|i| v[i]).collect()
    }
}
