//! Layout ops: every one is a gather by computed flat indices, so each is
//! written once for all dtypes.

use super::{arity, broadcast_dims, broadcast_index, ints, sizes, strided_index, OpResult};
use crate::dim::{product, shape_text, Dim};
use crate::dispatch;
use crate::dtype::{DType, Type};
use crate::op::{Op, PadMode};
use crate::tensor::{strides_of, Data, Elem, Tensor};

/// Length of a slice along one axis, given normalised start/end/step.
pub fn slice_len(start: i64, end: i64, step: i64) -> usize {
    // In i128: unclamped bounds (a symbolic axis's) may be near i64's ends.
    let (start, end, step) = (start as i128, end as i128, step as i128);
    let len = if step > 0 && end > start {
        (end - start + step - 1) / step
    } else if step < 0 && start > end {
        (start - end + (-step) - 1) / (-step)
    } else {
        0
    };
    usize::try_from(len).unwrap_or(usize::MAX)
}

/// Length of a slice along one axis as a dim: known when its bounds are;
/// `end - start` (or `start - end` stepping backwards) for unit steps over
/// symbolic bounds, which the importer clamped.
pub fn slice_len_dim(start: Dim, end: Dim, step: i64) -> OpResult<Dim> {
    if let (Some(s), Some(e)) = (start.known(), end.known()) {
        return super::size_dim(slice_len(s, e, step));
    }
    // A difference that comes out a known negative number (`s - 2` after
    // `s - 1`) is an empty slice, not a negative length.
    let len = |d: Dim| if d.known().is_some_and(|n| n < 0) { Dim::new(0) } else { d };
    match step {
        1 => Ok(len(end.checked_sub(start)?)),
        -1 => Ok(len(start.checked_sub(end)?)),
        _ => Err(format!(
            "a slice from {start} to {end} by {step} over a symbolic dim needs a unit step {}",
            crate::dim::BIND_DIMS_HINT
        )),
    }
}

/// Output shape of a transposed-permuted layout: `out[i] = shape[perm[i]]`.
fn permute<D: Copy>(shape: &[D], perm: &[usize]) -> OpResult<Vec<D>> {
    let mut seen = vec![false; shape.len()];
    if perm.len() != shape.len() {
        return Err(format!("perm {perm:?} does not match rank {}", shape.len()));
    }
    for &p in perm {
        if p >= shape.len() || seen[p] {
            return Err(format!("perm {perm:?} is not a permutation"));
        }
        seen[p] = true;
    }
    Ok(perm.iter().map(|&p| shape[p]).collect())
}

fn pad_out_shape(shape: &[usize], pads: &[i64]) -> OpResult<Vec<usize>> {
    let r = shape.len();
    if pads.len() != 2 * r {
        return Err(format!("pads {pads:?} must have 2 x rank ({r}) entries"));
    }
    (0..r)
        .map(|i| {
            let d = shape[i] as i64 + pads[i] + pads[i + r];
            if d < 0 {
                Err(format!("pads {pads:?} crop axis {i} below zero"))
            } else {
                Ok(d as usize)
            }
        })
        .collect()
}

pub fn infer(op: &Op, inputs: &[&Type]) -> OpResult<Vec<Type>> {
    let x = inputs.first().ok_or("expects at least one input")?;
    let same = |shape: Vec<Dim>| Ok(vec![Type::new(x.dtype, shape)]);
    match op {
        Op::Reshape { shape } => {
            arity(inputs, 1, 1)?;
            if product(shape)? != x.numel_dim()? {
                return Err(format!("cannot reshape {} to {}", shape_text(&x.shape), shape_text(shape)));
            }
            same(shape.clone())
        }
        Op::Transpose { perm } => {
            arity(inputs, 1, 1)?;
            same(permute(&x.shape, perm)?)
        }
        Op::Slice { starts, ends, steps } => {
            arity(inputs, 1, 1)?;
            let r = x.rank();
            if starts.len() != r || ends.len() != r || steps.len() != r {
                return Err(format!("slice parameters must have one entry per axis (rank {r})"));
            }
            if steps.contains(&0) {
                return Err("slice step cannot be 0".into());
            }
            // Normalised bounds lie in the axis (`end` may be -1 stepping
            // backwards), and so do the first and last elements taken (a
            // backward slice from 0 of an empty axis would take one).
            for i in 0..r {
                if let (Some(s), Some(e), Some(d)) = (starts[i].known(), ends[i].known(), x.shape[i].known()) {
                    let len = slice_len(s, e, steps[i]) as i128;
                    let last = s as i128 + (len - 1) * steps[i] as i128;
                    let taken = len == 0 || (0..d as i128).contains(&(s as i128)) && (0..d as i128).contains(&last);
                    if s < 0 || s > d || e < -1 || e > d || !taken {
                        return Err(format!("slice {s}..{e} by {} of axis {i} is outside its {d} elements", steps[i]));
                    }
                }
            }
            same((0..r).map(|i| slice_len_dim(starts[i], ends[i], steps[i])).collect::<OpResult<_>>()?)
        }
        Op::Concat { axis } => {
            if inputs.is_empty() {
                return Err("concat needs at least one input".into());
            }
            if *axis >= x.rank() {
                return Err(format!("axis {axis} out of range for rank {}", x.rank()));
            }
            let mut shape = x.shape.clone();
            shape[*axis] = Dim::new(0);
            for t in inputs {
                super::same_dtype(x, t, "concat")?;
                if t.rank() != x.rank() || (0..x.rank()).any(|i| i != *axis && t.shape[i] != x.shape[i]) {
                    return Err(format!(
                        "concat inputs {} and {} differ off axis {axis}",
                        shape_text(&x.shape),
                        shape_text(&t.shape)
                    ));
                }
                shape[*axis] = shape[*axis].checked_add(t.shape[*axis])?;
            }
            same(shape)
        }
        Op::Split { axis, sizes } => {
            arity(inputs, 1, 1)?;
            let total = sizes.iter().try_fold(Dim::new(0), |a, &s| a.checked_add(s))?;
            if *axis >= x.rank() || total != x.shape[*axis] {
                return Err(format!("split sizes {sizes:?} do not add up to axis {axis} of {}", shape_text(&x.shape)));
            }
            Ok(sizes
                .iter()
                .map(|&s| {
                    let mut shape = x.shape.clone();
                    shape[*axis] = s;
                    Type::new(x.dtype, shape)
                })
                .collect())
        }
        Op::Expand { shape } => {
            arity(inputs, 1, 1)?;
            let b = broadcast_dims(&x.shape, shape)?;
            if &b != shape {
                return Err(format!("{} does not expand to {}", shape_text(&x.shape), shape_text(shape)));
            }
            same(b)
        }
        Op::Tile { repeats } => {
            arity(inputs, 1, 1)?;
            if repeats.len() != x.rank() {
                return Err(format!("repeats {repeats:?} must have one entry per axis"));
            }
            same(
                x.shape
                    .iter()
                    .zip(repeats)
                    .map(|(d, &r)| Ok(d.checked_mul(super::size_dim(r)?)?))
                    .collect::<OpResult<_>>()?,
            )
        }
        Op::Pad { pads, mode } => {
            arity(inputs, 1, 2)?;
            let shape = sizes(&x.shape, "the padded tensor")?;
            if let Some(v) = inputs.get(1) {
                super::same_dtype(x, v, "pad value")?;
                if v.known_shape().map(|s| s.iter().product::<usize>()) != Some(1) {
                    return Err("pad value must be a scalar".into());
                }
            }
            let out = pad_out_shape(&shape, pads)?;
            if *mode != PadMode::Constant && shape.iter().zip(&out).any(|(&i, &o)| i == 0 && o > 0) {
                return Err(format!("{} padding of an empty axis", mode.word()));
            }
            same(out.into_iter().map(Dim::new).collect())
        }
        Op::DepthToSpace { blocksize: b, .. } => {
            arity(inputs, 1, 1)?;
            let s = sizes(&x.shape, "the input")?;
            if s.len() != 4 || *b == 0 || s[1] % (b * b) != 0 {
                return Err(format!("needs a 4-d input with channels divisible by {}", b * b));
            }
            same([s[0], s[1] / (b * b), s[2] * b, s[3] * b].map(Dim::new).to_vec())
        }
        Op::SpaceToDepth { blocksize: b } => {
            arity(inputs, 1, 1)?;
            let s = sizes(&x.shape, "the input")?;
            if s.len() != 4 || *b == 0 || s[2] % b != 0 || s[3] % b != 0 {
                return Err(format!("needs a 4-d input with spatial dims divisible by {b}"));
            }
            same([s[0], s[1] * b * b, s[2] / b, s[3] / b].map(Dim::new).to_vec())
        }
        Op::Shape { start, end } => {
            arity(inputs, 1, 1)?;
            Ok(vec![Type::new(DType::I64, vec![end.saturating_sub(*start)])])
        }
        Op::Range { len } => {
            arity(inputs, 2, 2)?;
            super::same_dtype(x, inputs[1], "range delta")?;
            if x.rank() != 0 || inputs[1].rank() != 0 {
                return Err("range start and delta must be scalars".into());
            }
            if len.is_nonneg() == Some(false) {
                return Err(format!("range length {len} is negative"));
            }
            same(vec![*len])
        }
        Op::Trilu { .. } => {
            arity(inputs, 1, 1)?;
            if x.rank() < 2 {
                return Err("trilu needs rank >= 2".into());
            }
            same(x.shape.clone())
        }
        other => Err(format!("no inference rule for {}", other.name())),
    }
}

/// Flat source index of every output element of a transpose.
pub fn transpose_index(shape: &[usize], perm: &[usize]) -> Vec<usize> {
    let strides = strides_of(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let out_strides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    strided_index(&out_shape, &out_strides, 0)
}

pub fn eval(op: &Op, inputs: &[&Tensor]) -> OpResult<Vec<Tensor>> {
    let x = inputs[0];
    let shape = x.shape();
    let one = |s: Vec<usize>, d: Data| Ok(vec![Tensor::new(s, d)]);
    match op {
        Op::Reshape { shape: to } => {
            let to = sizes(to, "the reshape")?;
            // A type the verifier passed holds this; a caller replaying the
            // op on other values (lowering's row indices) may not.
            if to.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) != Some(x.numel()) {
                return Err(format!("reshape of {:?} ({} elements) to {to:?}", shape, x.numel()));
            }
            one(to, x.data().clone())
        }
        Op::Transpose { perm } => {
            let out = permute(shape, perm)?;
            one(out, x.data().gather(&transpose_index(shape, perm)))
        }
        Op::Slice { starts, ends, steps } => {
            let (starts, ends) = (ints(starts)?, ints(ends)?);
            // Bounds the importer left symbolic were not checked against
            // their axis: the first and last element taken must lie in it.
            for i in 0..shape.len() {
                let len = slice_len(starts[i], ends[i], steps[i]) as i128;
                let (first, d) = (starts[i] as i128, shape[i] as i128);
                let last = first + (len - 1) * steps[i] as i128;
                if len > 0 && !(0..d).contains(&first) || len > 0 && !(0..d).contains(&last) {
                    return Err(format!(
                        "slice {}..{} by {} of axis {i} is outside its {d} elements",
                        starts[i], ends[i], steps[i]
                    ));
                }
            }
            let strides = strides_of(shape);
            let out: Vec<usize> = (0..shape.len()).map(|i| slice_len(starts[i], ends[i], steps[i])).collect();
            if out.contains(&0) {
                return one(out, x.data().gather(&[]));
            }
            // Negative steps walk backwards: express them with wrapping strides
            // from the start element, which is in range whenever the slice is non-empty.
            let base: usize = (0..shape.len()).map(|i| starts[i] as usize * strides[i]).sum();
            let idx: Vec<usize> = {
                let signed: Vec<i64> = (0..shape.len()).map(|i| steps[i] * strides[i] as i64).collect();
                let pos: Vec<usize> = signed.iter().map(|&s| s as usize).collect();
                strided_index(&out, &pos, base)
            };
            one(out, x.data().gather(&idx))
        }
        Op::Concat { axis } => {
            let mut out_shape = shape.to_vec();
            out_shape[*axis] = inputs.iter().map(|t| t.shape()[*axis]).sum();
            let outer: usize = shape[..*axis].iter().product();
            let data = dispatch!(x.data(), _v: T => {
                let parts: Vec<(&[T], usize)> = inputs
                    .iter()
                    .map(|t| Ok((T::unwrap(t.data()).ok_or("concat inputs differ in dtype")?, t.shape()[*axis..].iter().product())))
                    .collect::<OpResult<_>>()?;
                let mut out = Vec::with_capacity(out_shape.iter().product());
                for o in 0..outer {
                    for (p, chunk) in &parts {
                        out.extend_from_slice(&p[o * chunk..(o + 1) * chunk]);
                    }
                }
                T::wrap(out)
            });
            one(out_shape, data)
        }
        Op::Split { axis, sizes } => {
            let mut outs = Vec::new();
            let mut start = 0usize;
            for s in super::sizes(sizes, "the split")? {
                let mut starts = vec![Dim::new(0); shape.len()];
                let mut ends: Vec<Dim> = shape.iter().map(|&d| Dim::new(d)).collect();
                starts[*axis] = Dim::new(start);
                ends[*axis] = Dim::new(start + s);
                start += s;
                let steps = vec![1; shape.len()];
                outs.extend(eval(&Op::Slice { starts, ends, steps }, &[x])?);
            }
            Ok(outs)
        }
        Op::Expand { shape: to } => {
            let to = sizes(to, "the expansion")?;
            let idx = broadcast_index(shape, &to);
            one(to, x.data().gather(&idx))
        }
        Op::Tile { repeats } => {
            let out: Vec<usize> = shape.iter().zip(repeats).map(|(d, r)| d * r).collect();
            let idx = map_index(&out, shape, |o, i| Some(o % shape[i]));
            one(out, x.data().gather(&idx.into_iter().map(|i| i.unwrap()).collect::<Vec<_>>()))
        }
        Op::Pad { pads, mode } => pad(x, inputs.get(1).copied(), pads, *mode).map(|t| vec![t]),
        Op::DepthToSpace { blocksize: b, column_row_depth } => {
            let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
            let c2 = c / (b * b);
            // DCR: [n, b, b, c2, h, w]; CRD: [n, c2, b, b, h, w]; then to [n, c2, h, b, w, b].
            let (tmp, perm) = if *column_row_depth {
                (vec![n, c2, *b, *b, h, w], vec![0, 1, 4, 2, 5, 3])
            } else {
                (vec![n, *b, *b, c2, h, w], vec![0, 3, 4, 1, 5, 2])
            };
            one(vec![n, c2, h * b, w * b], x.data().gather(&transpose_index(&tmp, &perm)))
        }
        Op::SpaceToDepth { blocksize: b } => {
            let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
            let tmp = vec![n, c, h / b, *b, w / b, *b];
            let perm = vec![0, 3, 5, 1, 2, 4];
            one(vec![n, c * b * b, h / b, w / b], x.data().gather(&transpose_index(&tmp, &perm)))
        }
        Op::Shape { start, end } => {
            let dims: Vec<i64> = shape[*start..*end].iter().map(|&d| d as i64).collect();
            one(vec![dims.len()], Data::I64(dims.into()))
        }
        Op::Range { len } => {
            let n = sizes(&[*len], "the range")?[0];
            let data = dispatch!(x.data(), v: T => {
                let (start, delta) = (v[0], T::unwrap(inputs[1].data()).ok_or("range inputs differ in dtype")?[0]);
                // Integers step exactly; floats as ONNX's definition, start + i * delta.
                T::wrap((0..n).map(|i| if T::DTYPE.is_float() {
                    T::from_f64(start.to_f64() + i as f64 * delta.to_f64())
                } else {
                    T::from_i64(start.to_i64().wrapping_add((i as i64).wrapping_mul(delta.to_i64())))
                }).collect())
            });
            one(vec![n], data)
        }
        Op::Trilu { upper, k } => {
            let r = shape.len();
            let (rows, cols) = (shape[r - 2], shape[r - 1]);
            let data = dispatch!(x.data(), v: T => {
                let mut out = v.clone();
                for (i, e) in out.iter_mut().enumerate() {
                    let col = (i % cols) as i64;
                    let row = ((i / cols) % rows) as i64;
                    let keep = if *upper { col - row >= *k } else { col - row <= *k };
                    if !keep {
                        *e = T::default();
                    }
                }
                T::wrap(out.into_vec())
            });
            one(shape.to_vec(), data)
        }
        other => Err(format!("no evaluation rule for {}", other.name())),
    }
}

/// For every element of `out_shape`, maps each output coordinate through
/// `f(coord, axis)` to an input coordinate (or `None` for "outside") and
/// returns the flat input index.
pub fn map_index(
    out_shape: &[usize],
    in_shape: &[usize],
    f: impl Fn(usize, usize) -> Option<usize>,
) -> Vec<Option<usize>> {
    let r = out_shape.len();
    let n: usize = out_shape.iter().product();
    let in_strides = strides_of(in_shape);
    // Per-axis lookup tables keep the inner loop to additions.
    let tables: Vec<Vec<Option<usize>>> =
        (0..r).map(|a| (0..out_shape[a]).map(|o| f(o, a).map(|i| i * in_strides[a])).collect()).collect();
    let mut out = Vec::with_capacity(n);
    let mut coord = vec![0usize; r];
    for _ in 0..n {
        let mut acc = Some(0usize);
        for a in 0..r {
            acc = match (acc, tables[a][coord[a]]) {
                (Some(s), Some(t)) => Some(s + t),
                _ => None,
            };
        }
        out.push(acc);
        for a in (0..r).rev() {
            coord[a] += 1;
            if coord[a] < out_shape[a] {
                break;
            }
            coord[a] = 0;
        }
    }
    out
}

fn pad(x: &Tensor, value: Option<&Tensor>, pads: &[i64], mode: PadMode) -> OpResult<Tensor> {
    let shape = x.shape();
    let out = pad_out_shape(shape, pads)?;
    let idx = map_index(&out, shape, |o, a| {
        let n = shape[a] as i64;
        let i = o as i64 - pads[a];
        if (0..n).contains(&i) {
            return Some(i as usize);
        }
        match mode {
            PadMode::Constant => None,
            PadMode::Edge => Some(i.clamp(0, n - 1) as usize),
            PadMode::Wrap => Some(i.rem_euclid(n) as usize),
            PadMode::Reflect => {
                if n == 1 {
                    return Some(0);
                }
                let period = 2 * (n - 1);
                let m = i.rem_euclid(period);
                Some(if m < n { m } else { period - m } as usize)
            }
        }
    });
    let data = dispatch!(x.data(), v: T => {
        let fill = match value {
            Some(t) => T::unwrap(t.data()).and_then(|s| s.first().copied()).unwrap_or_default(),
            None => T::default(),
        };
        T::wrap(idx.iter().map(|i| i.map_or(fill, |i| v[i])).collect())
    });
    Ok(Tensor::new(out, data))
}
