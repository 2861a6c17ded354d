//! Indexed reads and writes. Every index is checked: an out-of-range index is
//! an evaluation error naming the index, never an out-of-bounds access.

use super::elementwise::Arith;
use super::nn::split_at_axis;
use super::{arity, OpResult};
use crate::dtype::{DType, Type};
use crate::op::{Op, Reduction};
use crate::tensor::{strides_of, Data, Elem, Tensor};
use crate::{dispatch, dispatch_num};

fn expect_indices(t: &Type, what: &str) -> OpResult<()> {
    super::expect_dtype(t, &[DType::I64, DType::I32], what)
}

/// Resolves a possibly negative index against an axis of length `n`.
pub fn check_index(i: i64, n: usize, what: &str) -> OpResult<usize> {
    let j = if i < 0 { i + n as i64 } else { i };
    if j < 0 || j >= n as i64 {
        return Err(format!("{what} index {i} is out of range for an axis of length {n}"));
    }
    Ok(j as usize)
}

pub fn infer(op: &Op, inputs: &[&Type]) -> OpResult<Vec<Type>> {
    let x = inputs.first().ok_or("expects at least one input")?;
    match op {
        Op::Gather { axis } => {
            arity(inputs, 2, 2)?;
            expect_indices(inputs[1], "indices")?;
            if *axis >= x.rank() {
                return Err(format!("axis {axis} out of range for rank {}", x.rank()));
            }
            let mut s = x.shape[..*axis].to_vec();
            s.extend(&inputs[1].shape);
            s.extend(&x.shape[axis + 1..]);
            Ok(vec![Type::new(x.dtype, s)])
        }
        Op::GatherElements { axis } => {
            arity(inputs, 2, 2)?;
            expect_indices(inputs[1], "indices")?;
            if *axis >= x.rank() || inputs[1].rank() != x.rank() {
                return Err("indices must have the data's rank".into());
            }
            Ok(vec![Type::new(x.dtype, inputs[1].shape.clone())])
        }
        Op::GatherND { batch_dims } => {
            arity(inputs, 2, 2)?;
            let idx = inputs[1];
            expect_indices(idx, "indices")?;
            let last = *idx.shape.last().ok_or("indices must have rank >= 1")?;
            let last = super::sizes(&[last], "the indices' last axis")?[0];
            if *batch_dims + last > x.rank() || *batch_dims >= idx.rank() {
                return Err("indices do not fit the data's rank".into());
            }
            let mut s = idx.shape[..idx.rank() - 1].to_vec();
            s.extend(&x.shape[batch_dims + last..]);
            Ok(vec![Type::new(x.dtype, s)])
        }
        Op::ScatterND { .. } => {
            arity(inputs, 3, 3)?;
            expect_indices(inputs[1], "indices")?;
            super::same_dtype(x, inputs[2], "updates")?;
            Ok(vec![(*x).clone()])
        }
        Op::ScatterElements { axis, .. } => {
            arity(inputs, 3, 3)?;
            expect_indices(inputs[1], "indices")?;
            super::same_dtype(x, inputs[2], "updates")?;
            if *axis >= x.rank() || inputs[1].shape != inputs[2].shape {
                return Err("indices and updates must have one shape".into());
            }
            Ok(vec![(*x).clone()])
        }
        Op::CumSum { axis, .. } | Op::CumProd { axis, .. } => {
            arity(inputs, 1, 1)?;
            if *axis >= x.rank() {
                return Err(format!("axis {axis} out of range for rank {}", x.rank()));
            }
            Ok(vec![(*x).clone()])
        }
        Op::TopK { axis, k, .. } => {
            arity(inputs, 1, 1)?;
            if *axis >= x.rank() || x.shape[*axis].size().is_some_and(|d| *k > d) {
                return Err(format!("k={k} exceeds axis {axis} of {}", crate::dim::shape_text(&x.shape)));
            }
            let mut s = x.shape.clone();
            s[*axis] = super::size_dim(*k)?;
            Ok(vec![Type::new(x.dtype, s.clone()), Type::new(DType::I64, s)])
        }
        Op::OneHot { axis, depth } => {
            arity(inputs, 2, 2)?;
            if *axis > x.rank() || inputs[1].known_shape().map(|s| s.iter().product::<usize>()) != Some(2) {
                return Err("one_hot needs values [off, on] and an axis <= rank".into());
            }
            let mut s = x.shape.clone();
            s.insert(*axis, super::size_dim(*depth)?);
            Ok(vec![Type::new(inputs[1].dtype, s)])
        }
        other => Err(format!("no inference rule for {}", other.name())),
    }
}

fn combine<T: Arith>(r: Reduction, old: T, new: T) -> T {
    match r {
        Reduction::None => new,
        Reduction::Add => T::add(old, new),
        Reduction::Mul => T::mul(old, new),
        Reduction::Max => T::max(old, new),
        Reduction::Min => T::min(old, new),
    }
}

pub fn eval(op: &Op, inputs: &[&Tensor]) -> OpResult<Vec<Tensor>> {
    let x = inputs[0];
    let shape = x.shape();
    match op {
        Op::Gather { axis } => {
            let idx = inputs[1];
            let (outer, len, inner) = split_at_axis(shape, *axis);
            let ids: Vec<usize> =
                idx.to_i64_vec().into_iter().map(|i| check_index(i, len, "gather")).collect::<OpResult<_>>()?;
            let mut flat = Vec::with_capacity(outer * ids.len() * inner);
            for o in 0..outer {
                for &i in &ids {
                    let base = (o * len + i) * inner;
                    flat.extend(base..base + inner);
                }
            }
            let mut s = shape[..*axis].to_vec();
            s.extend(idx.shape());
            s.extend(&shape[axis + 1..]);
            Ok(vec![Tensor::new(s, x.data().gather(&flat))])
        }
        Op::GatherElements { axis } => {
            let idx = inputs[1];
            let ishape = idx.shape();
            let xs = strides_of(shape);
            let is = strides_of(ishape);
            let ids = idx.to_i64_vec();
            let mut flat = Vec::with_capacity(ids.len());
            for (n, &i) in ids.iter().enumerate() {
                let mut off = 0;
                for a in 0..ishape.len() {
                    let c = (n / is[a]) % ishape[a];
                    let c = if a == *axis { check_index(i, shape[a], "gather_elements")? } else { c };
                    if c >= shape[a] {
                        return Err(format!("gather_elements: indices shape {ishape:?} exceeds data {shape:?}"));
                    }
                    off += c * xs[a];
                }
                flat.push(off);
            }
            Ok(vec![Tensor::new(ishape.to_vec(), x.data().gather(&flat))])
        }
        Op::GatherND { batch_dims } => {
            let idx = inputs[1];
            let ishape = idx.shape();
            let last = ishape[ishape.len() - 1];
            let b = *batch_dims;
            let xs = strides_of(shape);
            let slice: usize = shape[b + last..].iter().product();
            let batch_n: usize = shape[..b].iter().product();
            let per_batch: usize = ishape[b..ishape.len() - 1].iter().product();
            let ids = idx.to_i64_vec();
            let mut flat = Vec::new();
            for bi in 0..batch_n {
                for t in 0..per_batch {
                    let tuple = &ids[(bi * per_batch + t) * last..][..last];
                    let mut off = bi * shape[b..].iter().product::<usize>();
                    for (j, &i) in tuple.iter().enumerate() {
                        off += check_index(i, shape[b + j], "gather_nd")? * xs[b + j];
                    }
                    flat.extend(off..off + slice);
                }
            }
            let mut s = ishape[..ishape.len() - 1].to_vec();
            s.extend(&shape[b + last..]);
            Ok(vec![Tensor::new(s, x.data().gather(&flat))])
        }
        Op::ScatterND { reduction } => {
            let (idx, upd) = (inputs[1], inputs[2]);
            let ishape = idx.shape();
            let last = *ishape.last().ok_or("indices must have rank >= 1")?;
            let xs = strides_of(shape);
            let slice: usize = shape.get(last..).map_or(1, |s| s.iter().product());
            let ids = idx.to_i64_vec();
            let n = ids.len() / last.max(1);
            if upd.numel() != n * slice {
                return Err(format!("updates {:?} do not match indices {ishape:?}", upd.shape()));
            }
            let mut offs = Vec::with_capacity(n);
            for t in 0..n {
                let mut off = 0;
                for (j, &i) in ids[t * last..(t + 1) * last].iter().enumerate() {
                    off += check_index(i, shape[j], "scatter_nd")? * xs[j];
                }
                offs.push(off);
            }
            let data = dispatch_num!(x.data(), "scatter_nd", v: T => {
                let u = T::unwrap(upd.data()).ok_or("updates dtype differs")?;
                let mut out = v.clone();
                for (t, &off) in offs.iter().enumerate() {
                    for j in 0..slice {
                        out[off + j] = combine(*reduction, out[off + j], u[t * slice + j]);
                    }
                }
                T::wrap(out.into_vec())
            });
            Ok(vec![Tensor::new(shape.to_vec(), data)])
        }
        Op::ScatterElements { axis, reduction } => {
            let (idx, upd) = (inputs[1], inputs[2]);
            let ishape = idx.shape();
            let xs = strides_of(shape);
            let is = strides_of(ishape);
            let ids = idx.to_i64_vec();
            let mut offs = Vec::with_capacity(ids.len());
            for (n, &i) in ids.iter().enumerate() {
                let mut off = 0;
                for a in 0..ishape.len() {
                    let c = (n / is[a]) % ishape[a];
                    let c = if a == *axis { check_index(i, shape[a], "scatter_elements")? } else { c };
                    if c >= shape[a] {
                        return Err(format!("scatter_elements: indices shape {ishape:?} exceeds data {shape:?}"));
                    }
                    off += c * xs[a];
                }
                offs.push(off);
            }
            let data = dispatch_num!(x.data(), "scatter_elements", v: T => {
                let u = T::unwrap(upd.data()).ok_or("updates dtype differs")?;
                let mut out = v.clone();
                for (t, &off) in offs.iter().enumerate() {
                    out[off] = combine(*reduction, out[off], u[t]);
                }
                T::wrap(out.into_vec())
            });
            Ok(vec![Tensor::new(shape.to_vec(), data)])
        }
        Op::CumSum { axis, exclusive, reverse } | Op::CumProd { axis, exclusive, reverse } => {
            let product = matches!(op, Op::CumProd { .. });
            let (outer, len, inner) = split_at_axis(shape, *axis);
            let data = dispatch_num!(x.data(), op.name(), v: T => {
                let mut out = vec![T::default(); v.len()];
                // The running sum starts at 0, the running product at 1.
                let start = if product { T::from_i64(1) } else { T::default() };
                let step_by = |acc: T, x: T| if product { T::mul(acc, x) } else { T::add(acc, x) };
                for o in 0..outer {
                    for i in 0..inner {
                        let mut acc = start;
                        for step in 0..len {
                            let j = if *reverse { len - 1 - step } else { step };
                            let at = (o * len + j) * inner + i;
                            if *exclusive {
                                out[at] = acc;
                                acc = step_by(acc, v[at]);
                            } else {
                                acc = step_by(acc, v[at]);
                                out[at] = acc;
                            }
                        }
                    }
                }
                T::wrap(out)
            });
            Ok(vec![Tensor::new(shape.to_vec(), data)])
        }
        Op::TopK { axis, k, largest, sorted: _ } => {
            // Results are always sorted: ONNX leaves the order unspecified when
            // `sorted` is 0, so sorted output is a valid answer.
            let (outer, len, inner) = split_at_axis(shape, *axis);
            let v = x.to_f64_vec();
            let mut flat = Vec::with_capacity(outer * k * inner);
            let mut ids = vec![0i64; outer * k * inner];
            for o in 0..outer {
                for i in 0..inner {
                    let mut order: Vec<usize> = (0..len).collect();
                    let key = |j: usize| v[(o * len + j) * inner + i];
                    // Stable sort: equal values keep the lower index first.
                    order.sort_by(|&p, &q| {
                        let c = key(p).partial_cmp(&key(q)).unwrap_or(std::cmp::Ordering::Equal);
                        if *largest {
                            c.reverse()
                        } else {
                            c
                        }
                    });
                    for (r, &j) in order[..*k].iter().enumerate() {
                        ids[(o * k + r) * inner + i] = j as i64;
                    }
                }
            }
            for o in 0..outer {
                for r in 0..*k {
                    for i in 0..inner {
                        flat.push((o * len + ids[(o * k + r) * inner + i] as usize) * inner + i);
                    }
                }
            }
            let mut s = shape.to_vec();
            s[*axis] = *k;
            Ok(vec![Tensor::new(s.clone(), x.data().gather(&flat)), Tensor::new(s, Data::I64(ids.into()))])
        }
        Op::OneHot { axis, depth } => {
            let vals = inputs[1];
            let ids = x.to_i64_vec();
            let (outer, inner) = (shape[..*axis].iter().product::<usize>(), shape[*axis..].iter().product::<usize>());
            let mut pick = Vec::with_capacity(ids.len() * depth);
            for o in 0..outer {
                for d in 0..*depth {
                    for i in 0..inner {
                        let raw = ids[o * inner + i];
                        let hot = if raw < 0 { raw + *depth as i64 } else { raw };
                        pick.push(usize::from(hot == d as i64));
                    }
                }
            }
            let mut s = shape.to_vec();
            s.insert(*axis, *depth);
            let data = dispatch!(vals.data(), v: T => T::wrap(pick.iter().map(|&p| v[p]).collect()));
            Ok(vec![Tensor::new(s, data)])
        }
        other => Err(format!("no evaluation rule for {}", other.name())),
    }
}
