//! Shape/dtype inference and reference semantics, one file per op family.
//!
//! `infer` and `eval` are the two faces of every op and live side by side in
//! each family's file. `eval` is Egret's oracle: constant folding uses it, the
//! reference backend runs it, and every rewrite rule and generated kernel is
//! tested against it. It favours clarity over speed, but avoids waste so that
//! real models run in seconds.

pub mod elementwise;
pub mod index;
pub mod layout;
pub mod linalg;
pub mod nn;
pub mod reduce;
pub mod resize;

use crate::dim::{shape_text, Dim, DimOverflow};
use crate::dtype::{DType, Type};
use crate::op::Op;
use crate::tensor::Tensor;

/// Result of one op-level check: a message that the caller wraps with the node's name.
pub type OpResult<T> = Result<T, String>;

/// Output types of `op` applied to inputs of types `inputs`.
pub fn infer(op: &Op, inputs: &[&Type]) -> OpResult<Vec<Type>> {
    if elementwise::is_unary(op) || matches!(op, Op::Cast { .. } | Op::Identity) {
        arity(inputs, 1, 1)?;
        return Ok(vec![elementwise::infer_unary(op, inputs[0])?]);
    }
    if elementwise::is_binary(op) {
        arity(inputs, 2, 2)?;
        return Ok(vec![elementwise::infer_binary(op, inputs[0], inputs[1])?]);
    }
    match op {
        Op::Const(t) => {
            arity(inputs, 0, 0)?;
            Ok(vec![t.ty()])
        }
        Op::Input { .. } => Err("input nodes have no inferred type".into()),
        Op::Where => {
            arity(inputs, 3, 3)?;
            elementwise::infer_where(inputs)
        }
        Op::MatMul
        | Op::MatMulTiled { .. }
        | Op::Einsum { .. }
        | Op::Conv { .. }
        | Op::Attention { .. }
        | Op::AttentionTiled { .. } => linalg::infer(op, inputs),
        Op::MaxPool { .. }
        | Op::AveragePool { .. }
        | Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::Hardmax { .. }
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::ResidualNorm { .. }
        | Op::BatchNorm { .. }
        | Op::InstanceNorm { .. } => nn::infer(op, inputs),
        Op::Reduce { .. } | Op::ArgReduce { .. } => reduce::infer(op, inputs),
        Op::Resize { .. } => resize::infer(op, inputs),
        Op::Gather { .. }
        | Op::GatherElements { .. }
        | Op::GatherND { .. }
        | Op::ScatterND { .. }
        | Op::ScatterElements { .. }
        | Op::CumSum { .. }
        | Op::CumProd { .. }
        | Op::TopK { .. }
        | Op::OneHot { .. } => index::infer(op, inputs),
        _ => layout::infer(op, inputs),
    }
}

/// Evaluates `op` on concrete tensors with the reference semantics.
pub fn eval(op: &Op, inputs: &[&Tensor]) -> OpResult<Vec<Tensor>> {
    if elementwise::is_unary(op) || matches!(op, Op::Cast { .. } | Op::Identity) {
        return Ok(vec![elementwise::eval_unary(op, inputs[0])?]);
    }
    if elementwise::is_binary(op) {
        return Ok(vec![elementwise::eval_binary(op, inputs[0], inputs[1])?]);
    }
    match op {
        Op::Const(t) => Ok(vec![(**t).clone()]),
        Op::Input { name } => Err(format!("input `{name}` has no value to evaluate")),
        Op::Where => Ok(vec![elementwise::eval_where(inputs[0], inputs[1], inputs[2])?]),
        Op::MatMul
        | Op::MatMulTiled { .. }
        | Op::Einsum { .. }
        | Op::Conv { .. }
        | Op::Attention { .. }
        | Op::AttentionTiled { .. } => linalg::eval(op, inputs),
        Op::MaxPool { .. }
        | Op::AveragePool { .. }
        | Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::Hardmax { .. }
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::ResidualNorm { .. }
        | Op::BatchNorm { .. }
        | Op::InstanceNorm { .. } => nn::eval(op, inputs),
        Op::Reduce { .. } | Op::ArgReduce { .. } => reduce::eval(op, inputs),
        Op::Resize { .. } => resize::eval(op, inputs),
        Op::Gather { .. }
        | Op::GatherElements { .. }
        | Op::GatherND { .. }
        | Op::ScatterND { .. }
        | Op::ScatterElements { .. }
        | Op::CumSum { .. }
        | Op::CumProd { .. }
        | Op::TopK { .. }
        | Op::OneHot { .. } => index::eval(op, inputs),
        _ => layout::eval(op, inputs),
    }
}

/// Checks the number of inputs.
pub fn arity<T>(inputs: &[T], min: usize, max: usize) -> OpResult<()> {
    if inputs.len() < min || inputs.len() > max {
        if min == max {
            return Err(format!("expects {min} input(s), got {}", inputs.len()));
        }
        return Err(format!("expects {min} to {max} inputs, got {}", inputs.len()));
    }
    Ok(())
}

pub fn expect_dtype(t: &Type, allowed: &[DType], what: &str) -> OpResult<()> {
    if allowed.contains(&t.dtype) {
        Ok(())
    } else {
        let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
        Err(format!("{what} must be {}, not {}", names.join(" or "), t.dtype))
    }
}

pub fn expect_float(t: &Type, what: &str) -> OpResult<()> {
    expect_dtype(t, &[DType::F32, DType::F64], what)
}

pub fn same_dtype(a: &Type, b: &Type, what: &str) -> OpResult<()> {
    if a.dtype != b.dtype {
        return Err(format!("{what}: dtypes differ ({} vs {})", a.dtype, b.dtype));
    }
    Ok(())
}

impl From<DimOverflow> for String {
    fn from(e: DimOverflow) -> String {
        e.to_string()
    }
}

/// The known sizes of `dims`, for an op whose semantics need them (a
/// convolution's spatial dims, a reshape being evaluated).
pub fn sizes(dims: &[Dim], what: &str) -> OpResult<Vec<usize>> {
    crate::dim::known_shape(dims).ok_or_else(|| {
        format!(
            "{what} has symbolic dims {}, which this op needs known {}",
            shape_text(dims),
            crate::dim::BIND_DIMS_HINT
        )
    })
}

/// Known integers (a slice's bounds being evaluated).
pub fn ints(dims: &[Dim]) -> OpResult<Vec<i64>> {
    dims.iter().map(|d| d.known().ok_or_else(|| format!("{d} is symbolic where a value is needed"))).collect()
}

/// Numpy broadcasting of two shapes whose dims may be symbolic: a dim
/// broadcasts against 1 or an equal dim. Two different symbolic dims could
/// be equal, or one of them 1, only at run time; that is not assumed.
pub fn broadcast_dims(a: &[Dim], b: &[Dim]) -> OpResult<Vec<Dim>> {
    let r = a.len().max(b.len());
    let one = Dim::new(1);
    let mut out = vec![one; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { one };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { one };
        out[i] = if da == db || db == one {
            da
        } else if da == one {
            db
        } else if da.is_known() && db.is_known() {
            return Err(format!("shapes {} and {} do not broadcast", shape_text(a), shape_text(b)));
        } else {
            return Err(format!(
                "shapes {} and {} broadcast only if {da} and {db} are equal, which is not known before run time {}",
                shape_text(a),
                shape_text(b),
                crate::dim::BIND_DIMS_HINT
            ));
        };
    }
    Ok(out)
}

/// A dim as shape inference (`Dim`, from types) and evaluation (`usize`,
/// from tensors) see it, so that rules both need are written once.
pub trait Extent: Copy + PartialEq + std::fmt::Debug {
    const ONE: Self;
    fn broadcast(a: &[Self], b: &[Self]) -> OpResult<Vec<Self>>;
}

impl Extent for usize {
    const ONE: usize = 1;
    fn broadcast(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
        broadcast_shapes(a, b)
    }
}

impl Extent for Dim {
    const ONE: Dim = Dim::new(1);
    fn broadcast(a: &[Dim], b: &[Dim]) -> OpResult<Vec<Dim>> {
        broadcast_dims(a, b)
    }
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(format!("shapes {a:?} and {b:?} do not broadcast"));
        };
    }
    Ok(out)
}

/// For each element of a tensor of `out_shape`, the flat index of the element
/// of a tensor of `in_shape` that broadcasting reads. `in_shape` must
/// broadcast to `out_shape`.
pub fn broadcast_index(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let r = out_shape.len();
    let off = r - in_shape.len();
    let in_strides = crate::tensor::strides_of(in_shape);
    let mut strides = vec![0usize; r];
    for i in 0..in_shape.len() {
        if in_shape[i] != 1 {
            strides[off + i] = in_strides[i];
        }
    }
    strided_index(out_shape, &strides, 0)
}

/// Flat indices visited by walking `shape` in row-major order with the given
/// element strides from `base`. The workhorse of the layout ops.
pub fn strided_index(shape: &[usize], strides: &[usize], base: usize) -> Vec<usize> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let r = shape.len();
    if r == 0 {
        out.push(base);
        return out;
    }
    let inner = shape[r - 1];
    let inner_stride = strides[r - 1];
    let mut counter = vec![0usize; r];
    let mut offset = base;
    loop {
        // Wrapping arithmetic lets callers pass negative strides as their
        // two's-complement `usize` (slices with negative steps).
        for j in 0..inner {
            out.push(offset.wrapping_add(j.wrapping_mul(inner_stride)));
        }
        // Advance the odometer over the outer dims.
        let mut d = r - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            counter[d] += 1;
            offset = offset.wrapping_add(strides[d]);
            if counter[d] < shape[d] {
                break;
            }
            offset = offset.wrapping_sub(strides[d].wrapping_mul(shape[d]));
            counter[d] = 0;
        }
    }
}

/// Normalises a possibly negative axis against `rank`.
/// A computed size as a dim, refused past `MAX_ELEMENTS` (attributes from
/// the text format or huge pads reach numbers no dim holds).
pub fn size_dim(v: usize) -> OpResult<Dim> {
    if v > crate::MAX_ELEMENTS {
        return Err(format!("size {v} is too large"));
    }
    Ok(Dim::new(v))
}

pub fn norm_axis(axis: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r.max(1) {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(if axis < 0 { (axis + r) as usize } else { axis as usize })
}
