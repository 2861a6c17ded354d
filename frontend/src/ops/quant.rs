//! Quantization: `QuantizeLinear`, `DequantizeLinear`, `DynamicQuantizeLinear`,
//! `MatMulInteger`, `QLinearMatMul`.
//!
//! Imported as f32 primitives: an 8-bit integer is exact in f32, and so is a
//! product's sum below 2^24 (a sum past it rounds to the nearest f32, off
//! by at most one part in 2^24). Each quantized value keeps an f32 twin
//! (`NodeCtx::set_exact_f32`), so a chain `DynamicQuantizeLinear` ->
//! `MatMulInteger` -> `Cast` -> `Mul` becomes an f32 product of the
//! quantized activations and the dequantized weights, folded at compile time.
//! The integer outputs stay in the graph for consumers that want them as
//! integers, and are dropped when none does.

use crate::context::{BuildResult, NodeCtx};
use crate::registry::Registry;
use crate::tensor::carrier_from_onnx;
use crate::ImportError;
use egret_ir::op::ReduceKind;
use egret_ir::{DType, Dim, NarrowType, Op, RoundMode, ValueId};

pub fn register(r: &mut Registry) {
    r.insert("DequantizeLinear", dequantize_linear);
    r.insert("QuantizeLinear", quantize_linear);
    // onnxruntime registers this contrib op in the default domain too.
    r.insert("SimplifiedLayerNormalization", crate::ops::contrib::simplified_norm);
    r.insert("DynamicQuantizeLinear", dynamic_quantize_linear);
    r.insert("MatMulInteger", |c| {
        let (a, b) = (c.req(0)?, c.req(1)?);
        let (a_zero, b_zero) = (c.input(2), c.input(3));
        let product = integer_product(c, a, b, a_zero, b_zero)?;
        let y = c.add(Op::Cast { to: DType::I32 }, &[product])?;
        c.set_exact_f32(y, product);
        Ok(vec![y])
    });
    r.insert("QLinearMatMul", |c| {
        let (a, a_scale, a_zero) = (c.req(0)?, c.req(1)?, c.req(2)?);
        let (b, b_scale, b_zero) = (c.req(3)?, c.req(4)?, c.req(5)?);
        let (y_scale, y_zero) = (c.req(6)?, c.req(7)?);
        for (v, name) in [(a_scale, "a_scale"), (b_scale, "b_scale"), (y_scale, "y_scale")] {
            check_scale(c, v, name)?;
        }
        let product = integer_product(c, a, b, Some(a_zero), Some(b_zero))?;
        // The requantisation multiplier as onnxruntime forms it:
        // a_scale * b_scale / y_scale, then one rounding of the product.
        let a_scale = per_row(c, a_scale, a)?;
        let scales = c.add(Op::Mul, &[a_scale, b_scale])?;
        let multiplier = c.add(Op::Div, &[scales, y_scale])?;
        let scaled = c.add(Op::Mul, &[product, multiplier])?;
        let (to, narrow) = (c.ty(y_zero).dtype, c.narrow(y_zero));
        quantize_rounded(c, scaled, Some(y_zero), to, narrow, true)
    });
}

/// What a quantized type holds: whole numbers in a range, or a narrow
/// float's values (carried in f32).
enum Quantized {
    Range(f32, f32),
    Float(NarrowType),
}

/// The values of a quantized type, stored as `dtype` (a narrow type in its
/// carrier: `narrow` says which).
fn quantized(c: &NodeCtx, dtype: DType, narrow: Option<NarrowType>) -> Result<Quantized, ImportError> {
    if let Some(t) = narrow {
        return Ok(match t.int_range() {
            Some((lo, hi)) => Quantized::Range(lo as f32, hi as f32),
            None => Quantized::Float(t),
        });
    }
    let (lo, hi) = match dtype {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::I32 => (i32::MIN as f32, i32::MAX as f32),
        other => {
            return Err(c.err(format!(
                "quantized type {other} is not supported (8-, 16- and 32-bit integers, int4, uint4, int2, uint2 \
                 and the 8- and 4-bit floats)"
            )))
        }
    };
    Ok(Quantized::Range(lo, hi))
}

/// A scale known at compile time must be positive and finite; onnxruntime
/// divides by it.
fn check_scale(c: &NodeCtx, v: ValueId, name: &str) -> Result<(), ImportError> {
    if c.ty(v).dtype != DType::F32 {
        return Err(c.err(format!("`{name}` is {}; scales are supported in f32", c.ty(v).dtype)));
    }
    if let Some(t) = c.known_value(v) {
        if let Some(bad) = t.to_f64_vec().into_iter().find(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(c.err(format!("`{name}` holds {bad}; a scale must be positive and finite")));
        }
    }
    Ok(())
}

/// A parameter per tensor (a scalar or one element), per `axis` (1-D, as
/// long as `x`'s axis) or per block of `block` along `axis` (the rank of
/// `x`), shaped to broadcast against `x`.
fn broadcast_param(c: &mut NodeCtx, p: ValueId, x: ValueId, axis: usize, block: usize) -> Result<ValueId, ImportError> {
    let (ps, xs) = (c.ty(p).shape.clone(), c.ty(x).shape.clone());
    let per_tensor = ps.iter().all(|d| d.known() == Some(1));
    if per_tensor && block == 0 {
        return if ps.is_empty() { Ok(p) } else { c.add(Op::Reshape { shape: vec![] }, &[p]) };
    }
    if block == 0 {
        if ps.len() != 1 || ps[0] != xs[axis] {
            return Err(c.err(format!(
                "a per-axis parameter must be 1-D as long as axis {axis} of the input ({}), not {}",
                xs[axis],
                egret_ir::shape_text(&ps)
            )));
        }
        let mut shape = vec![Dim::new(1); xs.len()];
        shape[axis] = xs[axis];
        return c.add(Op::Reshape { shape }, &[p]);
    }
    // Blocked: each parameter covers `block` elements along the axis (whose
    // length must be known; the other axes may be symbolic).
    let len = xs[axis]
        .size()
        .ok_or_else(|| c.err(format!("blocked axis {axis} of {} must be known", egret_ir::shape_text(&xs))))?;
    let blocks = len.div_ceil(block);
    let mut want = xs.clone();
    want[axis] = Dim::new(blocks);
    if ps != want {
        return Err(c.err(format!(
            "a parameter for blocks of {block} along axis {axis} of {} must be {}, not {}",
            egret_ir::shape_text(&xs),
            egret_ir::shape_text(&want),
            egret_ir::shape_text(&ps)
        )));
    }
    let mut unit = ps.clone();
    unit.insert(axis + 1, Dim::new(1));
    let u = c.add(Op::Reshape { shape: unit.clone() }, &[p])?;
    let mut wide = unit;
    wide[axis + 1] = Dim::new(block);
    let e = c.add(Op::Expand { shape: wide }, &[u])?;
    let mut merged = ps.clone();
    merged[axis] = Dim::new(blocks * block);
    let m = c.add(Op::Reshape { shape: merged }, &[e])?;
    if blocks * block == len {
        return Ok(m);
    }
    let starts = vec![Dim::new(0); xs.len()];
    c.add(Op::Slice { starts, ends: xs.clone(), steps: vec![1; xs.len()] }, &[m])
}

/// The axis and block size attributes of the (de)quantizers. The axis
/// means something only for a scale per axis or per block (ONNX ignores it
/// for a scalar scale, even out of the input's range).
fn axis_and_block(c: &NodeCtx, x: ValueId, scale: ValueId) -> Result<(usize, usize), ImportError> {
    let block = c.i("block_size", 0)?;
    if block < 0 {
        return Err(c.err(format!("block_size {block} is negative")));
    }
    let per_tensor = c.ty(scale).shape.iter().all(|d| d.known() == Some(1));
    let axis = if per_tensor && block == 0 {
        c.ignore_attr("axis");
        0
    } else {
        c.axis(c.i("axis", 1)?, c.rank(x))?
    };
    Ok((axis, block as usize))
}

fn dequantize_linear(c: &mut NodeCtx) -> BuildResult {
    let (x, scale) = (c.req(0)?, c.req(1)?);
    let zero = c.input(2);
    check_scale(c, scale, "x_scale")?;
    let (axis, block) = axis_and_block(c, x, scale)?;
    // The output has the scale's type; opset 23 may name it.
    if !matches!(c.i("output_dtype", 0)?, 0 | 1) {
        return Err(c.err("output_dtype other than float is not supported"));
    }
    let dt = c.ty(x).dtype;
    quantized(c, dt, c.narrow(x))?;
    if let Some(z) = zero {
        if (c.ty(z).dtype, c.narrow(z)) != (dt, c.narrow(x)) {
            let name = |v| c.narrow(v).map_or(c.ty(v).dtype.name(), |t| t.word());
            return Err(c.err(format!("x_zero_point is {} but x is {}", name(z), name(x))));
        }
    }
    if let Some(w) = coded_weight(c, x, zero, Some(scale), axis, block) {
        return Ok(vec![c.constant(w)]);
    }
    let xf = c.as_f32(x)?;
    let centred = match zero {
        Some(z) => {
            let zf = c.as_f32(z)?;
            let zf = broadcast_param(c, zf, x, axis, block)?;
            c.add(Op::Sub, &[xf, zf])?
        }
        None => xf,
    };
    let scale = broadcast_param(c, scale, x, axis, block)?;
    c.add_node(Op::Mul, &[centred, scale])
}

fn quantize_linear(c: &mut NodeCtx) -> BuildResult {
    let (x, scale) = (c.req(0)?, c.req(1)?);
    let zero = c.input(2);
    check_scale(c, scale, "y_scale")?;
    if c.ty(x).dtype != DType::F32 {
        return Err(c.err(format!("x is {}; QuantizeLinear is supported for f32", c.ty(x).dtype)));
    }
    let (axis, block) = axis_and_block(c, x, scale)?;
    // Only narrow float targets saturate (the others clamp).
    let saturate = c.flag("saturate", true)?;
    c.ignore_attr("precision");
    // The output type: the zero point's, else `output_dtype`'s, else uint8.
    let named = match c.i("output_dtype", 0)? as i32 {
        0 => None,
        t => Some(carrier_from_onnx(t).map_err(|m| c.err(m))?),
    };
    let (to, narrow) = match (zero, named) {
        (Some(z), None) => (c.ty(z).dtype, c.narrow(z)),
        (Some(z), Some(t)) => {
            if t != (c.ty(z).dtype, c.narrow(z)) {
                return Err(c.err(format!("output_dtype disagrees with y_zero_point's {}", c.ty(z).dtype)));
            }
            t
        }
        (None, Some(t)) => t,
        (None, None) => (DType::U8, None),
    };
    let scale = broadcast_param(c, scale, x, axis, block)?;
    let divided = c.add(Op::Div, &[x, scale])?;
    let zero = match zero {
        Some(z) => {
            let zf = c.as_f32(z)?;
            Some(broadcast_param(c, zf, x, axis, block)?)
        }
        None => None,
    };
    quantize_rounded(c, divided, zero, to, narrow, saturate)
}

/// `saturate(round(x) + zero)` in the range of `to`, rounding halves to
/// even as ONNX does: the integer output and its f32 twin. To a narrow
/// float, `x + zero` cast to it (`saturate` as `Cast` takes it).
fn quantize_rounded(
    c: &mut NodeCtx,
    x: ValueId,
    zero: Option<ValueId>,
    to: DType,
    narrow: Option<NarrowType>,
    saturate: bool,
) -> BuildResult {
    let (lo, hi) = match quantized(c, to, narrow)? {
        Quantized::Range(lo, hi) => (lo, hi),
        Quantized::Float(t) => {
            let y = match zero {
                Some(z) => c.add(Op::Add, &[x, z])?,
                None => x,
            };
            let q = c.add(Op::CastNarrow { to: t, saturate, round_mode: RoundMode::Nearest }, &[y])?;
            c.mark_narrow(q, t);
            return Ok(vec![q]);
        }
    };
    let mut y = c.add(Op::Round, &[x])?;
    if let Some(z) = zero {
        let z = c.as_f32(z)?;
        y = c.add(Op::Add, &[y, z])?;
    }
    let (lo, hi) = (c.f32_const(lo), c.f32_const(hi));
    let y = c.add(Op::Max, &[y, lo])?;
    let y = c.add(Op::Min, &[y, hi])?;
    let q = c.add(Op::Cast { to }, &[y])?;
    c.set_exact_f32(q, y);
    if let Some(t) = narrow {
        c.mark_narrow(q, t);
    }
    Ok(vec![q])
}

/// `DynamicQuantizeLinear`: uint8 with a scale and zero point from the
/// input's range (widened to take in zero), as onnxruntime computes them.
fn dynamic_quantize_linear(c: &mut NodeCtx) -> BuildResult {
    let x = c.req(0)?;
    dynamic_quantize_of(c, x)
}

/// `DynamicQuantizeLinear` of `x`: the uint8 values, the scale and the zero
/// point (the integers with their f32 twins).
pub(crate) fn dynamic_quantize_of(c: &mut NodeCtx, x: ValueId) -> BuildResult {
    if c.ty(x).dtype != DType::F32 {
        return Err(c.err(format!("x is {}; DynamicQuantizeLinear is supported for f32", c.ty(x).dtype)));
    }
    let axes: Vec<usize> = (0..c.rank(x)).collect();
    let all = |kind| Op::Reduce { kind, axes: axes.clone(), keepdims: false };
    let zero = c.f32_const(0.0);
    let min = c.add(all(ReduceKind::Min), &[x])?;
    let min = c.add(Op::Min, &[min, zero])?;
    let max = c.add(all(ReduceKind::Max), &[x])?;
    let max = c.add(Op::Max, &[max, zero])?;
    let span = c.add(Op::Sub, &[max, min])?;
    let levels = c.f32_const(255.0);
    let scale = c.add(Op::Div, &[span, levels])?;
    // An all-zero input has no range: onnxruntime takes a scale of 1.
    let flat = c.add(Op::Equal, &[max, min])?;
    let one = c.f32_const(1.0);
    let scale = c.add(Op::Where, &[flat, one, scale])?;
    // zero point = round(clamp(0 - min / scale, 0, 255)).
    let shift = c.add(Op::Div, &[min, scale])?;
    let shift = c.add(Op::Sub, &[zero, shift])?;
    let shift = c.add(Op::Max, &[shift, zero])?;
    let shift = c.add(Op::Min, &[shift, levels])?;
    let zero_point = c.add(Op::Round, &[shift])?;
    let divided = c.add(Op::Div, &[x, scale])?;
    let y = quantize_rounded(c, divided, Some(zero_point), DType::U8, None, true)?[0];
    let zp = c.add(Op::Cast { to: DType::U8 }, &[zero_point])?;
    c.set_exact_f32(zp, zero_point);
    Ok(vec![y, scale, zp])
}

/// A zero point of `a` given per row (1-D, one per row of the last two
/// axes) as a column that broadcasts over the row; a scalar stays.
fn per_row(c: &mut NodeCtx, p: ValueId, a: ValueId) -> Result<ValueId, ImportError> {
    let ps = c.ty(p).shape.clone();
    if ps.iter().all(|d| d.known() == Some(1)) {
        return Ok(p);
    }
    let shape = c.ty(a).shape.clone();
    if ps.len() == 1 && shape.len() >= 2 && ps[0] == shape[shape.len() - 2] {
        return c.add(Op::Reshape { shape: vec![ps[0], Dim::new(1)] }, &[p]);
    }
    Err(c.err(format!("a parameter of A must be a scalar or one per row, not {}", egret_ir::shape_text(&ps))))
}

/// `(a - a_zero) @ (b - b_zero)` in f32, the integers exact (see the module
/// docs). `a_zero` is per tensor or per row of `a`, `b_zero` per tensor or
/// per column of `b`.
pub(crate) fn integer_product(
    c: &mut NodeCtx,
    a: ValueId,
    b: ValueId,
    a_zero: Option<ValueId>,
    b_zero: Option<ValueId>,
) -> Result<ValueId, ImportError> {
    for (v, name) in [(a, "A"), (b, "B")] {
        let dt = c.ty(v).dtype;
        if !matches!(dt, DType::U8 | DType::I8) {
            return Err(c.err(format!("{name} is {dt}; integer products take int8 or uint8")));
        }
    }
    let mut af = c.as_f32(a)?;
    if let Some(z) = a_zero {
        if c.ty(z).dtype != c.ty(a).dtype {
            return Err(c.err(format!("a_zero_point is {} but A is {}", c.ty(z).dtype, c.ty(a).dtype)));
        }
        let z = c.as_f32(z)?;
        let z = per_row(c, z, a)?;
        af = c.add(Op::Sub, &[af, z])?;
    }
    if let Some(w) = coded_weight(c, b, b_zero, None, 1, 0) {
        let w = c.constant(w);
        return c.add(Op::MatMul, &[af, w]);
    }
    let mut bf = c.as_f32(b)?;
    if let Some(z) = b_zero {
        if c.ty(z).dtype != c.ty(b).dtype {
            return Err(c.err(format!("b_zero_point is {} but B is {}", c.ty(z).dtype, c.ty(b).dtype)));
        }
        let zs = c.ty(z).shape.clone();
        let n = c.ty(b).shape.last().copied();
        let ok = zs.iter().all(|d| d.known() == Some(1)) || (zs.len() == 1 && Some(zs[0]) == n);
        if !ok {
            return Err(c.err(format!(
                "b_zero_point must be a scalar or one per column of B, not {}",
                egret_ir::shape_text(&zs)
            )));
        }
        let z = c.as_f32(z)?;
        bf = c.add(Op::Sub, &[bf, z])?;
    }
    c.add(Op::MatMul, &[af, bf])
}

/// A constant 8- or 4-bit matrix `x` (`[k, n]`) dequantized, as the codes
/// it came from (`Tensor::from_codes`: the f32 values are computed only if
/// read), so the CPU keeps it as codes: `(x - zero) * scale` with the zero point and scale per tensor, per
/// column (`axis` 1) or per block of rows (`axis` 0, `block` rows), and
/// `scale` 1 where there is none (`MatMulInteger`'s weight). `None` for any
/// other weight, which is then imported op by op.
fn coded_weight(
    c: &NodeCtx,
    x: ValueId,
    zero: Option<ValueId>,
    scale: Option<ValueId>,
    axis: usize,
    block: usize,
) -> Option<egret_ir::Tensor> {
    let t = c.known_value(x)?;
    let &[k, n] = t.shape() else { return None };
    let (four_bit, signed) = (c.is_four_bit(x), t.dtype() == DType::I8);
    if !matches!(t.dtype(), DType::I8 | DType::U8) || k == 0 || n == 0 {
        return None;
    }
    // Signed codes are stored shifted up, zero points alike: the difference
    // is the same whole number.
    let offset = match (signed, four_bit) {
        (true, true) => 8.0,
        (true, false) => 128.0,
        (false, _) => 0.0,
    };
    let rows = match (block, axis) {
        (0, _) => k,
        (b, 0) => b,
        _ => return None,
    };
    let blocks = k.div_ceil(rows);
    // A parameter as `[blocks, n]`: per tensor, per column or per block.
    let table = |p: Option<ValueId>, default: f64| -> Option<Vec<f32>> {
        let Some(p) = p else { return Some(vec![default as f32; blocks * n]) };
        let v = c.known_value(p)?.to_f64_vec();
        let at = |b: usize, j: usize| match (v.len(), block) {
            (1, _) => v[0],
            (len, 0) if axis == 1 && len == n => v[j],
            (len, _) if block > 0 && len == blocks * n => v[b * n + j],
            _ => f64::NAN,
        };
        let out: Vec<f32> = (0..blocks * n).map(|i| at(i / n, i % n) as f32).collect();
        out.iter().all(|x| x.is_finite()).then_some(out)
    };
    let scales = table(scale, 1.0)?;
    let zeros: Vec<f32> = table(zero, 0.0)?.into_iter().map(|z| z + offset as f32).collect();
    // Signed bytes are their own codes read unsigned, 128 added: shared with
    // the weight (read in place where it was mapped), not copied.
    let (codes, code_offset) = match t.data() {
        egret_ir::Data::I8(v) if !four_bit => (v.clone().reinterpret::<u8>()?, 128),
        egret_ir::Data::I8(v) => (v.iter().map(|&x| (x as i16 + offset as i16) as u8).collect(), 0),
        egret_ir::Data::U8(v) => (v.clone(), 0),
        _ => return None,
    };
    let bits = if four_bit { 4 } else { 8 };
    egret_ir::Tensor::from_codes(egret_ir::BlockCodes {
        bits,
        block: rows,
        k,
        n,
        codes,
        offset: code_offset,
        scales,
        zeros,
    })
}
