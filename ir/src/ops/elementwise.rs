//! Elementwise ops: unary maps, broadcasting binary ops, `where`, `cast`.

use super::{broadcast_index, broadcast_shapes, OpResult};
use crate::dtype::{DType, Type};
use crate::op::Op;
use crate::tensor::{Data, Elem, Tensor};
use crate::{dispatch, dispatch_num};

pub fn is_unary(op: &Op) -> bool {
    use Op::*;
    matches!(
        op,
        Abs | Neg
            | Exp
            | Log
            | Sqrt
            | Reciprocal
            | Sin
            | Cos
            | Tan
            | Asin
            | Acos
            | Atan
            | Sinh
            | Cosh
            | Asinh
            | Acosh
            | Atanh
            | Tanh
            | Erf
            | Sigmoid
            | Relu
            | Floor
            | Ceil
            | Round
            | Sign
            | Not
            | IsNaN
            | Softsign
            | Softplus
            | HardSwish
            | Mish
            | Silu
            | BitwiseNot
            | CastNarrow { .. }
            | BitCast { .. }
            | IsInf { .. }
            | Elu { .. }
            | Selu { .. }
            | Celu { .. }
            | LeakyRelu { .. }
            | HardSigmoid { .. }
            | ThresholdedRelu { .. }
            | Gelu { .. }
            | Shrink { .. }
    )
}

pub fn is_binary(op: &Op) -> bool {
    use Op::*;
    matches!(
        op,
        Add | Sub
            | Mul
            | Div
            | Pow
            | Mod { .. }
            | Max
            | Min
            | And
            | Or
            | Xor
            | Equal
            | Less
            | LessOrEqual
            | Greater
            | GreaterOrEqual
            | PRelu
            | BitShift { .. }
            | BitwiseAnd
            | BitwiseOr
            | BitwiseXor
    )
}

/// Unary ops defined on every signed numeric type, not just floats.
fn int_friendly_unary(op: &Op) -> bool {
    matches!(op, Op::Abs | Op::Neg | Op::Sign | Op::Relu | Op::Identity)
}

pub fn infer_unary(op: &Op, x: &Type) -> OpResult<Type> {
    let dtype = match op {
        Op::Cast { to } => *to,
        Op::Identity => x.dtype,
        Op::IsNaN | Op::IsInf { .. } => {
            super::expect_float(x, "input")?;
            DType::Bool
        }
        Op::Not => {
            super::expect_dtype(x, &[DType::Bool], "input")?;
            DType::Bool
        }
        Op::CastNarrow { to, .. } => {
            if to.is_float() {
                super::expect_dtype(x, &[DType::F32], "input")?;
            } else if !(x.dtype.is_int() || x.dtype.is_float() || x.dtype == DType::Bool) {
                return Err(format!("input must be numeric, not {}", x.dtype));
            }
            to.carrier()
        }
        Op::BitCast { to } => {
            if x.dtype.size_bytes() != to.size_bytes() {
                return Err(format!(
                    "bit_cast needs types of one width: {} is {} bits, {to} is {}",
                    x.dtype,
                    8 * x.dtype.size_bytes(),
                    8 * to.size_bytes()
                ));
            }
            *to
        }
        Op::BitwiseNot => {
            if !x.dtype.is_int() {
                return Err(format!("input must be an integer type, not {}", x.dtype));
            }
            x.dtype
        }
        op if int_friendly_unary(op) => {
            if x.dtype == DType::Bool {
                return Err("input must be numeric, not bool".into());
            }
            x.dtype
        }
        _ => {
            super::expect_float(x, "input")?;
            x.dtype
        }
    };
    Ok(Type::new(dtype, x.shape.clone()))
}

fn erf(x: f64) -> f64 {
    libm::erf(x)
}

/// The scalar function of a float unary op, computed in f64.
fn unary_f64(op: &Op, x: f64) -> f64 {
    match *op {
        Op::Abs => x.abs(),
        Op::Neg => -x,
        Op::Exp => x.exp(),
        Op::Log => x.ln(),
        Op::Sqrt => x.sqrt(),
        Op::Reciprocal => 1.0 / x,
        Op::Sin => x.sin(),
        Op::Cos => x.cos(),
        Op::Tan => x.tan(),
        Op::Asin => x.asin(),
        Op::Acos => x.acos(),
        Op::Atan => x.atan(),
        Op::Sinh => x.sinh(),
        Op::Cosh => x.cosh(),
        Op::Asinh => x.asinh(),
        Op::Acosh => x.acosh(),
        Op::Atanh => x.atanh(),
        Op::Tanh => x.tanh(),
        Op::Erf => erf(x),
        Op::Sigmoid => {
            // Written so that neither branch overflows.
            if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                let e = x.exp();
                e / (1.0 + e)
            }
        }
        // max(0, NaN) is NaN, as numpy's clip (ONNX's reference) and every
        // backend's kernels give (`f64::max` would return the 0).
        Op::Relu => {
            if x.is_nan() {
                x
            } else {
                x.max(0.0)
            }
        }
        Op::Floor => x.floor(),
        Op::Ceil => x.ceil(),
        // ONNX rounds half to even.
        Op::Round => x.round_ties_even(),
        Op::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        }
        Op::Softsign => x / (1.0 + x.abs()),
        Op::Softplus => softplus(x),
        Op::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
        Op::Mish => x * softplus(x).tanh(),
        Op::Silu => x * unary_f64(&Op::Sigmoid, x),
        Op::Elu { alpha } => {
            if x < 0.0 {
                alpha as f64 * (x.exp() - 1.0)
            } else {
                x
            }
        }
        Op::Selu { alpha, gamma } => {
            let (a, g) = (alpha as f64, gamma as f64);
            if x <= 0.0 {
                g * (a * x.exp() - a)
            } else {
                g * x
            }
        }
        Op::Celu { alpha } => {
            let a = alpha as f64;
            x.max(0.0) + (a * ((x / a).exp() - 1.0)).min(0.0)
        }
        Op::LeakyRelu { alpha } => {
            if x < 0.0 {
                alpha as f64 * x
            } else {
                x
            }
        }
        Op::HardSigmoid { alpha, beta } => (alpha as f64 * x + beta as f64).clamp(0.0, 1.0),
        Op::ThresholdedRelu { alpha } => {
            if x > alpha as f64 {
                x
            } else {
                0.0
            }
        }
        Op::Gelu { approximate_tanh: false } => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        Op::Gelu { approximate_tanh: true } => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Op::Shrink { bias, lambd } => {
            let (b, l) = (bias as f64, lambd as f64);
            if x < -l {
                x + b
            } else if x > l {
                x - b
            } else {
                0.0
            }
        }
        _ => f64::NAN,
    }
}

fn softplus(x: f64) -> f64 {
    if x > 30.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

pub fn eval_unary(op: &Op, x: &Tensor) -> OpResult<Tensor> {
    let shape = x.shape().to_vec();
    let data = match op {
        Op::Identity => x.data().clone(),
        Op::Cast { to } => x.data().cast(*to),
        Op::IsNaN => {
            dispatch!(x.data(), v: T => Data::Bool(v.iter().map(|a| a.to_f64().is_nan()).collect()))
        }
        Op::IsInf { detect_negative, detect_positive } => dispatch!(x.data(), v: T => Data::Bool(
            v.iter()
                .map(|a| {
                    let f = a.to_f64();
                    (f == f64::INFINITY && *detect_positive) || (f == f64::NEG_INFINITY && *detect_negative)
                })
                .collect()
        )),
        Op::Not => match x.data() {
            Data::Bool(v) => Data::Bool(v.iter().map(|a| !a).collect()),
            _ => return Err("not needs a bool tensor".into()),
        },
        Op::BitwiseNot => bitwise_not(x.data())?,
        Op::CastNarrow { to, saturate, round_mode } => match x.data() {
            Data::F32(v) if to.is_float() => {
                Data::F32(v.iter().map(|&a| to.cast_f32(a, *saturate, *round_mode)).collect())
            }
            d if !to.is_float() => {
                let float = d.dtype().is_float();
                let wrapped: Vec<i64> = dispatch!(d, v: T => v.iter().map(|a| {
                    if float { to.wrap_float(a.to_f64()) } else { to.wrap(a.to_i64()) }
                }).collect());
                Data::from_i64s(to.carrier(), &wrapped)
            }
            other => return Err(format!("cast_narrow to {} needs f32, not {}", to.word(), other.dtype())),
        },
        Op::BitCast { to } => {
            let ty = Type::new(*to, crate::dim::dims_of(&shape));
            return Tensor::from_bytes(&ty, &x.to_bytes());
        }
        op if int_friendly_unary(op) && !x.dtype().is_float() => int_unary(op, x.data())?,
        _ => match x.data() {
            Data::F32(v) => Data::F32(v.iter().map(|&a| unary_f64(op, a as f64) as f32).collect()),
            Data::F64(v) => Data::F64(v.iter().map(|&a| unary_f64(op, a)).collect()),
            other => return Err(format!("{} needs a float tensor, not {}", op.name(), other.dtype())),
        },
    };
    Ok(Tensor::new(shape, data))
}

fn int_unary(op: &Op, d: &Data) -> OpResult<Data> {
    Ok(dispatch_num!(d, op.name(), v: T => {
        let zero = T::default();
        let f = |a: T| -> T {
            match op {
                Op::Abs => if a < zero { T::from_i64(-(a.to_i64())) } else { a },
                Op::Neg => T::from_i64(a.to_i64().wrapping_neg()),
                Op::Sign => T::from_i64((a > zero) as i64 - (a < zero) as i64),
                Op::Relu => if a < zero { zero } else { a },
                _ => a,
            }
        };
        T::wrap(v.iter().map(|&a| f(a)).collect())
    }))
}

fn bitwise_not(d: &Data) -> OpResult<Data> {
    Ok(match d {
        Data::I8(v) => Data::I8(v.iter().map(|a| !a).collect()),
        Data::I16(v) => Data::I16(v.iter().map(|a| !a).collect()),
        Data::I32(v) => Data::I32(v.iter().map(|a| !a).collect()),
        Data::I64(v) => Data::I64(v.iter().map(|a| !a).collect()),
        Data::U8(v) => Data::U8(v.iter().map(|a| !a).collect()),
        Data::U16(v) => Data::U16(v.iter().map(|a| !a).collect()),
        Data::U32(v) => Data::U32(v.iter().map(|a| !a).collect()),
        Data::U64(v) => Data::U64(v.iter().map(|a| !a).collect()),
        other => return Err(format!("bitwise_not needs an integer tensor, not {}", other.dtype())),
    })
}

fn is_comparison(op: &Op) -> bool {
    matches!(op, Op::Equal | Op::Less | Op::LessOrEqual | Op::Greater | Op::GreaterOrEqual)
}

fn is_logical(op: &Op) -> bool {
    matches!(op, Op::And | Op::Or | Op::Xor)
}

fn is_bitwise(op: &Op) -> bool {
    matches!(op, Op::BitShift { .. } | Op::BitwiseAnd | Op::BitwiseOr | Op::BitwiseXor)
}

pub fn infer_binary(op: &Op, a: &Type, b: &Type) -> OpResult<Type> {
    let shape = super::broadcast_dims(&a.shape, &b.shape)?;
    // Pow is the one binary op whose exponent may have its own dtype.
    if !matches!(op, Op::Pow) {
        super::same_dtype(a, b, op.name())?;
    }
    let dtype = if is_comparison(op) {
        DType::Bool
    } else if is_logical(op) {
        super::expect_dtype(a, &[DType::Bool], "input")?;
        DType::Bool
    } else if is_bitwise(op) {
        if !a.dtype.is_int() {
            return Err(format!("inputs must be integers, not {}", a.dtype));
        }
        a.dtype
    } else {
        if a.dtype == DType::Bool || b.dtype == DType::Bool {
            return Err("arithmetic on bool tensors is not defined".into());
        }
        a.dtype
    };
    Ok(Type::new(dtype, shape))
}

/// Arithmetic with ONNX semantics per element type: integers wrap, integer
/// division by zero is an error rather than a crash.
pub trait Arith: Elem {
    fn add(a: Self, b: Self) -> Self;
    fn sub(a: Self, b: Self) -> Self;
    fn mul(a: Self, b: Self) -> Self;
    fn div(a: Self, b: Self) -> Option<Self>;
    /// Remainder with the sign of the divisor (Python), or of the dividend (C fmod).
    fn rem(a: Self, b: Self, fmod: bool) -> Option<Self>;
    fn pow(a: Self, b: Self) -> Self;
    fn max(a: Self, b: Self) -> Self;
    fn min(a: Self, b: Self) -> Self;
}

macro_rules! arith_int {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(a: Self, b: Self) -> Self { a.wrapping_add(b) }
            fn sub(a: Self, b: Self) -> Self { a.wrapping_sub(b) }
            fn mul(a: Self, b: Self) -> Self { a.wrapping_mul(b) }
            fn div(a: Self, b: Self) -> Option<Self> { a.checked_div(b) }
            fn rem(a: Self, b: Self, fmod: bool) -> Option<Self> {
                let r = a.checked_rem(b)?;
                #[allow(unused_comparisons)]
                let signs_differ = (r < 0) != (b < 0);
                if !fmod && r != 0 && signs_differ { Some(r.wrapping_add(b)) } else { Some(r) }
            }
            fn pow(a: Self, b: Self) -> Self { (a as f64).powf(b as f64) as $t }
            fn max(a: Self, b: Self) -> Self { if a >= b { a } else { b } }
            fn min(a: Self, b: Self) -> Self { if a <= b { a } else { b } }
        }
    )*};
}
arith_int!(i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! arith_float {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(a: Self, b: Self) -> Self { a + b }
            fn sub(a: Self, b: Self) -> Self { a - b }
            fn mul(a: Self, b: Self) -> Self { a * b }
            fn div(a: Self, b: Self) -> Option<Self> { Some(a / b) }
            fn rem(a: Self, b: Self, fmod: bool) -> Option<Self> {
                let r = a % b;
                if !fmod && r != 0.0 && ((r < 0.0) != (b < 0.0)) { Some(r + b) } else { Some(r) }
            }
            fn pow(a: Self, b: Self) -> Self { a.powf(b) }
            // NaN propagates, as in ONNX Max/Min.
            fn max(a: Self, b: Self) -> Self { if a.is_nan() || b.is_nan() { <$t>::NAN } else if a >= b { a } else { b } }
            fn min(a: Self, b: Self) -> Self { if a.is_nan() || b.is_nan() { <$t>::NAN } else if a <= b { a } else { b } }
        }
    )*};
}
arith_float!(f32, f64);

/// Applies `f` elementwise with broadcasting. Equal shapes take a fast path.
pub fn zip_broadcast<A: Copy, B: Copy, R>(
    a: &[A],
    a_shape: &[usize],
    b: &[B],
    b_shape: &[usize],
    out_shape: &[usize],
    mut f: impl FnMut(A, B) -> R,
) -> Vec<R> {
    if a_shape == b_shape {
        return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    }
    let n: usize = out_shape.iter().product();
    if a.len() == n && b.len() == 1 {
        return a.iter().map(|&x| f(x, b[0])).collect();
    }
    if b.len() == n && a.len() == 1 {
        return b.iter().map(|&y| f(a[0], y)).collect();
    }
    let ia = broadcast_index(a_shape, out_shape);
    let ib = broadcast_index(b_shape, out_shape);
    ia.iter().zip(&ib).map(|(&i, &j)| f(a[i], b[j])).collect()
}

fn arith<T: Arith>(op: &Op, a: &[T], sa: &[usize], b: &[T], sb: &[usize], so: &[usize]) -> OpResult<Vec<T>> {
    let mut failed = false;
    let out = match op {
        Op::Add => zip_broadcast(a, sa, b, sb, so, T::add),
        Op::Sub => zip_broadcast(a, sa, b, sb, so, T::sub),
        Op::Mul => zip_broadcast(a, sa, b, sb, so, T::mul),
        Op::Pow => zip_broadcast(a, sa, b, sb, so, T::pow),
        Op::Max => zip_broadcast(a, sa, b, sb, so, T::max),
        Op::Min => zip_broadcast(a, sa, b, sb, so, T::min),
        Op::PRelu => zip_broadcast(a, sa, b, sb, so, |x, s| if x < T::default() { T::mul(x, s) } else { x }),
        Op::Div => zip_broadcast(a, sa, b, sb, so, |x, y| {
            T::div(x, y).unwrap_or_else(|| {
                failed = true;
                T::default()
            })
        }),
        Op::Mod { fmod } => zip_broadcast(a, sa, b, sb, so, |x, y| {
            T::rem(x, y, *fmod).unwrap_or_else(|| {
                failed = true;
                T::default()
            })
        }),
        _ => return Err(format!("{} is not an arithmetic op", op.name())),
    };
    if failed {
        return Err(format!("integer division by zero in {}", op.name()));
    }
    Ok(out)
}

fn compare<T: Elem>(op: &Op, a: &[T], sa: &[usize], b: &[T], sb: &[usize], so: &[usize]) -> Vec<bool> {
    match op {
        Op::Equal => zip_broadcast(a, sa, b, sb, so, |x, y| x == y),
        Op::Less => zip_broadcast(a, sa, b, sb, so, |x, y| x < y),
        Op::LessOrEqual => zip_broadcast(a, sa, b, sb, so, |x, y| x <= y),
        Op::Greater => zip_broadcast(a, sa, b, sb, so, |x, y| x > y),
        _ => zip_broadcast(a, sa, b, sb, so, |x, y| x >= y),
    }
}

/// Bitwise ops and shifts. A shift by the width or more (a negative
/// amount, read unsigned, is one) shifts every bit out: 0, or for a right
/// shift of a negative signed value, -1 (the sign fills it, as opset 28's
/// arithmetic right shift of signed types does).
fn bitwise(op: &Op, a: &Data, sa: &[usize], b: &Data, sb: &[usize], so: &[usize]) -> OpResult<Data> {
    macro_rules! go {
        ($x:expr, $y:expr, $V:ident, $bits:expr, $signed:expr) => {{
            let f = |x, y| match op {
                Op::BitwiseAnd => x & y,
                Op::BitwiseOr => x | y,
                Op::BitwiseXor => x ^ y,
                Op::BitShift { left: true } => {
                    if (y as u64) < $bits {
                        x << y
                    } else {
                        0
                    }
                }
                _ => {
                    if (y as u64) < $bits {
                        x >> y
                    } else if $signed {
                        // All sign: -1 or 0.
                        x >> ($bits - 1)
                    } else {
                        0
                    }
                }
            };
            Data::$V(zip_broadcast($x, sa, $y, sb, so, f).into())
        }};
    }
    Ok(match (a, b) {
        (Data::U8(x), Data::U8(y)) => go!(x, y, U8, 8, false),
        (Data::U16(x), Data::U16(y)) => go!(x, y, U16, 16, false),
        (Data::U32(x), Data::U32(y)) => go!(x, y, U32, 32, false),
        (Data::U64(x), Data::U64(y)) => go!(x, y, U64, 64, false),
        (Data::I8(x), Data::I8(y)) => go!(x, y, I8, 8, true),
        (Data::I16(x), Data::I16(y)) => go!(x, y, I16, 16, true),
        (Data::I32(x), Data::I32(y)) => go!(x, y, I32, 32, true),
        (Data::I64(x), Data::I64(y)) => go!(x, y, I64, 64, true),
        _ => return Err(format!("{} needs two tensors of one integer type", op.name())),
    })
}

pub fn eval_binary(op: &Op, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    let out_shape = broadcast_shapes(a.shape(), b.shape())?;
    let (sa, sb, so) = (a.shape(), b.shape(), &out_shape[..]);
    // Pow's exponent may have another dtype: bring it to the base's.
    let b_cast;
    let b = if a.dtype() != b.dtype() && matches!(op, Op::Pow) {
        b_cast = b.cast(a.dtype());
        &b_cast
    } else {
        b
    };
    if a.dtype() != b.dtype() {
        return Err(format!("{}: dtypes differ ({} vs {})", op.name(), a.dtype(), b.dtype()));
    }
    let data = if is_comparison(op) {
        dispatch!(a.data(), x: T => Data::Bool(compare(op, x, sa, T::unwrap(b.data()).unwrap(), sb, so).into()))
    } else if is_logical(op) {
        match (a.data(), b.data()) {
            (Data::Bool(x), Data::Bool(y)) => Data::Bool(
                match op {
                    Op::And => zip_broadcast(x, sa, y, sb, so, |p, q| p && q),
                    Op::Or => zip_broadcast(x, sa, y, sb, so, |p, q| p || q),
                    _ => zip_broadcast(x, sa, y, sb, so, |p, q| p ^ q),
                }
                .into(),
            ),
            _ => return Err(format!("{} needs bool tensors", op.name())),
        }
    } else if is_bitwise(op) {
        bitwise(op, a.data(), sa, b.data(), sb, so)?
    } else {
        dispatch_num!(a.data(), op.name(), x: T => T::wrap(arith(op, x, sa, T::unwrap(b.data()).unwrap(), sb, so)?))
    };
    Ok(Tensor::new(out_shape, data))
}

pub fn infer_where(inputs: &[&Type]) -> OpResult<Vec<Type>> {
    super::expect_dtype(inputs[0], &[DType::Bool], "condition")?;
    super::same_dtype(inputs[1], inputs[2], "where")?;
    let s = super::broadcast_dims(&inputs[0].shape, &inputs[1].shape)?;
    let s = super::broadcast_dims(&s, &inputs[2].shape)?;
    Ok(vec![Type::new(inputs[1].dtype, s)])
}

pub fn eval_where(c: &Tensor, x: &Tensor, y: &Tensor) -> OpResult<Tensor> {
    let s = broadcast_shapes(c.shape(), x.shape())?;
    let s = broadcast_shapes(&s, y.shape())?;
    let cond = match c.data() {
        Data::Bool(v) => v,
        _ => return Err("condition must be bool".into()),
    };
    let ic = broadcast_index(c.shape(), &s);
    let ix = broadcast_index(x.shape(), &s);
    let iy = broadcast_index(y.shape(), &s);
    let data = dispatch!(x.data(), xv: T => {
        let yv = T::unwrap(y.data()).ok_or("where: x and y dtypes differ")?;
        T::wrap((0..ic.len()).map(|i| if cond[ic[i]] { xv[ix[i]] } else { yv[iy[i]] }).collect())
    });
    Ok(Tensor::new(s, data))
}
