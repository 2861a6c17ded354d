//! `KernelKind::Loop`: reference ops compiled as plain loop nests over
//! their reference semantics. These are the integer position arithmetic
//! exporters write around attention masks (BLOOM's `cumsum(mask) * mask -
//! 1`), on tensors of a few hundred elements: what matters is that they
//! run natively, so an artifact can hold them and a run never stops for
//! the reference evaluator, not their speed. Integer arithmetic wraps, as
//! the reference evaluator's (and onnxruntime's) does.

use super::loops::{counted, counted_dyn};
use crate::plan::{broadcast_dims, dense_strides, BufferId};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type as ClifType, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::FunctionBuilder;
use egret_ir::{DType, Dim, Op, Type};

/// The Cranelift type of a scalar of `dtype`, for the dtypes these
/// kernels compute in.
fn scalar(dtype: DType) -> Option<ClifType> {
    Some(match dtype {
        DType::I32 => types::I32,
        DType::I64 => types::I64,
        DType::F32 => types::F32,
        DType::F64 => types::F64,
        _ => return None,
    })
}

fn integer(t: &Type) -> bool {
    matches!(t.dtype, DType::I32 | DType::I64)
}

/// Whether a `Reference` kernel of `op` over these operands has a loop nest
/// here (`cpu::choose` makes it a `Loop` kernel then).
pub fn supports(op: &Op, inputs: &[(BufferId, Type)], outputs: &[(BufferId, Type)]) -> bool {
    let [(_, out)] = outputs else { return false };
    let inputs: Vec<&Type> = inputs.iter().map(|(_, t)| t).collect();
    let broadcast = || inputs.iter().all(|t| broadcast_dims(&t.shape, &out.shape).is_some());
    match op {
        // Integer sums, products, and T5's position buckets' minima.
        Op::Add | Op::Sub | Op::Mul | Op::Min | Op::Max => {
            inputs.len() == 2 && inputs.iter().all(|t| integer(t) && t.dtype == out.dtype) && broadcast()
        }
        // A mask or a table read at computed indices (transformers' mask
        // functions, BERT's token types): any element type, checked indices.
        Op::GatherElements { axis } => {
            inputs.len() == 2
                && integer(inputs[1])
                && element(inputs[0].dtype).is_some()
                && inputs[0].dtype == out.dtype
                && inputs[0].rank() == inputs[1].rank()
                && *axis < inputs[0].rank()
                // Off the axis, the indices' extent fits the data's (equal,
                // or known and no larger), so every read stays inside.
                && (0..inputs[0].rank()).all(|d| {
                    let (i, x) = (inputs[1].shape[d], inputs[0].shape[d]);
                    d == *axis || i == x || i.size().zip(x.size()).is_some_and(|(i, x)| i <= x)
                })
        }
        Op::GatherND { batch_dims: 0 } => {
            let r = inputs.get(1).and_then(|t| t.shape.last()).and_then(|d| d.size());
            inputs.len() == 2
                && integer(inputs[1])
                && element(inputs[0].dtype).is_some()
                && inputs[0].dtype == out.dtype
                && r.is_some_and(|r| r >= 1 && r <= inputs[0].rank())
        }
        // T5's position buckets: magnitudes, selections and the casts
        // between integers and floats around a `log`.
        Op::Neg | Op::Abs => inputs.len() == 1 && integer(inputs[0]) && inputs[0].dtype == out.dtype && broadcast(),
        Op::Where => {
            inputs.len() == 3
                && inputs[0].dtype == DType::Bool
                && inputs[1..].iter().all(|t| t.dtype == out.dtype)
                && element(out.dtype).is_some()
                && broadcast()
        }
        // Also the quantized formats' 8-bit integers and the half types at
        // a program's edges, to and from f32.
        Op::Cast { .. } => {
            let from = inputs.first().map(|t| t.dtype);
            let number = |d: DType| matches!(d, DType::I32 | DType::I64 | DType::F32);
            let to_integer = matches!(out.dtype, DType::I32 | DType::I64);
            let to = out.dtype;
            inputs.len() == 1
                && from.is_some_and(|f| {
                    (number(f) && number(to)) || (f == DType::Bool && to_integer) || crate::lower::narrow_cast(f, to)
                })
                && broadcast()
        }
        // Masks from positions (`kv_index <= query_index`).
        op if compare(op).is_some() => {
            inputs.len() == 2
                && inputs.iter().all(|t| integer(t) && t.dtype == inputs[0].dtype)
                && out.dtype == DType::Bool
                && broadcast()
        }
        Op::CumSum { axis, .. } | Op::CumProd { axis, .. } => {
            inputs.len() == 1 && scalar(inputs[0].dtype).is_some() && *axis < inputs[0].rank() && inputs[0] == out
        }
        // A reshape of a dense value is a copy of its bytes.
        Op::Reshape { .. } => inputs.len() == 1 && inputs[0].numel() == out.numel() && inputs[0].dtype == out.dtype,
        // The shape of a symbolic value, and the positions counted from
        // it: what exporters compute position ids with. Their sizes may be
        // symbolic (`Kernel::runtime_dims`).
        Op::Shape { .. } => inputs.len() == 1 && out.dtype == DType::I64 && out.rank() == 1,
        Op::Range { .. } => {
            inputs.len() == 2
                && inputs.iter().all(|t| integer(t) && t.rank() == 0 && t.dtype == out.dtype)
                && out.rank() == 1
        }
        _ => false,
    }
}

/// The integer comparison of a comparison op.
fn compare(op: &Op) -> Option<IntCC> {
    Some(match op {
        Op::Equal => IntCC::Equal,
        Op::Less => IntCC::SignedLessThan,
        Op::LessOrEqual => IntCC::SignedLessThanOrEqual,
        Op::Greater => IntCC::SignedGreaterThan,
        Op::GreaterOrEqual => IntCC::SignedGreaterThanOrEqual,
        _ => return None,
    })
}

/// Whether a kernel of `op` has a loop nest at symbolic sizes (reading
/// them from its slots); the others are generated for known sizes.
pub fn takes_symbolic_sizes(op: &Op) -> bool {
    matches!(
        op,
        Op::Shape { .. }
            | Op::Range { .. }
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::GatherElements { .. }
            | Op::GatherND { batch_dims: 0 }
            | Op::Min
            | Op::Max
            | Op::Neg
            | Op::Abs
            | Op::Where
            | Op::Cast { .. }
    ) || compare(op).is_some()
}

/// The integer type an element of `dtype` is copied as (its bytes).
fn element(dtype: DType) -> Option<ClifType> {
    Some(match dtype.size_bytes() {
        1 => types::I8,
        2 => types::I16,
        4 => types::I32,
        8 => types::I64,
        _ => return None,
    })
}

/// Status a loop nest returns when an index is out of range (the gather
/// kernels' status).
pub const STATUS_INDEX_OUT_OF_RANGE: i32 = 1;

/// Emits the loop nest of a kernel `supports` accepted; `args` holds its
/// inputs' and outputs' addresses, in that order, then the values of
/// `sizes` (the kernel's `runtime_dims`).
#[allow(clippy::too_many_arguments)]
pub fn emit(
    b: &mut FunctionBuilder,
    ptr: ClifType,
    args: Value,
    op: &Op,
    inputs: &[(BufferId, Type)],
    outputs: &[(BufferId, Type)],
    sizes: &[Dim],
    config: TargetFrontendConfig,
) {
    let flags = MemFlagsData::new().with_notrap();
    let operands = inputs.len() + outputs.len();
    // A size: a constant, or the value in its slot after the operands.
    let size = |b: &mut FunctionBuilder, d: Dim| match d.known() {
        Some(v) => b.ins().iconst(types::I64, v),
        None => {
            let at = sizes.iter().position(|&s| s == d).expect("a symbolic size is one of the kernel's runtime dims");
            b.ins().load(types::I64, flags, args, (8 * (operands + at)) as i32)
        }
    };
    let inputs: Vec<&Type> = inputs.iter().map(|(_, t)| t).collect();
    let out_ty = &outputs[0].1;
    let bytes = out_ty.dtype.size_bytes() as i64;
    let address = |b: &mut FunctionBuilder, n: usize| b.ins().load(ptr, flags, args, (8 * n) as i32);
    match op {
        Op::Add
        | Op::Sub
        | Op::Mul
        | Op::Equal
        | Op::Less
        | Op::LessOrEqual
        | Op::Greater
        | Op::GreaterOrEqual
        | Op::Min
        | Op::Max
        | Op::Neg
        | Op::Abs
        | Op::Where
        | Op::Cast { .. } => {
            // One element of each operand (a bool is a byte) and the
            // result; byte strides per dim, symbolic ones read from slots.
            let n = inputs.len();
            let operands: Vec<&Type> = inputs.iter().copied().chain([out_ty]).collect();
            let mut strides = vec![Vec::with_capacity(n + 1); out_ty.rank()];
            for t in &operands {
                let s = broadcast_dims(&t.shape, &out_ty.shape).expect("`supports` checked the shapes");
                for (d, &e) in s.iter().enumerate() {
                    let v = size(b, e);
                    strides[d].push(b.ins().imul_imm_s(v, t.dtype.size_bytes() as i64));
                }
            }
            let at: Vec<Value> = (0..=n).map(|i| address(b, i)).collect();
            let extents: Vec<Value> = out_ty.shape.iter().map(|&d| size(b, d)).collect();
            let load = |b: &mut FunctionBuilder, t: &Type, p: Value| {
                let ty = if t.dtype == DType::F32 { types::F32 } else { element(t.dtype).expect("`supports` checked") };
                b.ins().load(ty, flags, p, 0)
            };
            let cc = compare(op);
            nest(b, &extents, &strides, at, &mut |b, p| {
                let x = load(b, operands[0], p[0]);
                let r = match op {
                    Op::Add | Op::Sub | Op::Mul | Op::Min | Op::Max => {
                        let y = load(b, operands[1], p[1]);
                        match op {
                            Op::Add => b.ins().iadd(x, y),
                            Op::Sub => b.ins().isub(x, y),
                            Op::Mul => b.ins().imul(x, y),
                            Op::Min => b.ins().smin(x, y),
                            _ => b.ins().smax(x, y),
                        }
                    }
                    // A bool is a byte, 0 or 1.
                    _ if cc.is_some() => {
                        let y = load(b, operands[1], p[1]);
                        b.ins().icmp(cc.expect("a comparison"), x, y)
                    }
                    Op::Neg => b.ins().ineg(x),
                    Op::Abs => b.ins().iabs(x),
                    Op::Where => {
                        let (y, z) = (load(b, operands[1], p[1]), load(b, operands[2], p[2]));
                        b.ins().select(x, y, z)
                    }
                    _ => cast(b, x, operands[0].dtype, out_ty.dtype),
                };
                b.ins().store(flags, r, p[n], 0);
            });
        }
        Op::CumSum { axis, exclusive, reverse } | Op::CumProd { axis, exclusive, reverse } => {
            let product = matches!(op, Op::CumProd { .. });
            let ty = scalar(out_ty.dtype).expect("`supports` checked the dtype");
            let (x, out) = (address(b, 0), address(b, 1));
            let shape = &out_ty.sizes();
            let (outer, len, inner) = (
                shape[..*axis].iter().product::<usize>() as i64,
                shape[*axis] as i64,
                shape[axis + 1..].iter().product::<usize>() as i64,
            );
            let float = ty.is_float();
            // Each line along the axis, summed (multiplied) in order.
            counted(b, 0, outer * inner, 1, vec![], &mut |b, line, _| {
                let o = b.ins().udiv_imm_u(line, inner);
                let i = b.ins().urem_imm_u(line, inner);
                let start = b.ins().imul_imm_s(o, len * inner);
                let start = b.ins().iadd(start, i);
                let first = if product { 1.0 } else { 0.0 };
                let initial = if float {
                    if ty == types::F32 {
                        b.ins().f32const(first as f32)
                    } else {
                        b.ins().f64const(first)
                    }
                } else {
                    b.ins().iconst(ty, first as i64)
                };
                counted(b, 0, len, 1, vec![initial], &mut |b, step, acc| {
                    let j = if *reverse {
                        let last = b.ins().iconst(types::I64, len - 1);
                        b.ins().isub(last, step)
                    } else {
                        step
                    };
                    let at = b.ins().imul_imm_s(j, inner);
                    let at = b.ins().iadd(start, at);
                    let at = b.ins().imul_imm_s(at, bytes);
                    let (src, dst) = (b.ins().iadd(x, at), b.ins().iadd(out, at));
                    let v = b.ins().load(ty, flags, src, 0);
                    let sum = match (product, float) {
                        (false, true) => b.ins().fadd(acc[0], v),
                        (false, false) => b.ins().iadd(acc[0], v),
                        (true, true) => b.ins().fmul(acc[0], v),
                        (true, false) => b.ins().imul(acc[0], v),
                    };
                    b.ins().store(flags, if *exclusive { acc[0] } else { sum }, dst, 0);
                    vec![sum]
                });
                vec![]
            });
        }
        Op::GatherElements { axis } => {
            // out[p] = data[p with p[axis] replaced by indices[p]].
            let (data, indices, out) = (address(b, 0), address(b, 1), address(b, 2));
            let (elem, eb) = (element(out_ty.dtype).expect("`supports` checked"), out_ty.dtype.size_bytes() as i64);
            let (index_ty, ib) = (inputs[1].dtype, inputs[1].dtype.size_bytes() as i64);
            let (ds, os) = (dense_strides(&inputs[0].shape), dense_strides(&out_ty.shape));
            let mut strides = Vec::with_capacity(out_ty.rank());
            for d in 0..out_ty.rank() {
                let s = if d == *axis { Dim::new(0) } else { ds[d] };
                let (dv, ov) = (size(b, s), size(b, os[d]));
                strides.push(vec![b.ins().imul_imm_s(dv, eb), b.ins().imul_imm_s(ov, ib), b.ins().imul_imm_s(ov, eb)]);
            }
            let extents: Vec<Value> = out_ty.shape.iter().map(|&d| size(b, d)).collect();
            let (len, step) = (size(b, inputs[0].shape[*axis]), size(b, ds[*axis]));
            let bad = b.create_block();
            nest(b, &extents, &strides, vec![data, indices, out], &mut |b, p| {
                let (src, dst) = (p[0], p[2]);
                let i = load_index(b, index_ty, p[1], flags);
                let i = checked(b, i, len, bad);
                let by = b.ins().imul(i, step);
                let by = b.ins().imul_imm_s(by, eb);
                let src = b.ins().iadd(src, by);
                let v = b.ins().load(elem, flags, src, 0);
                b.ins().store(flags, v, dst, 0);
            });
            fail_in(b, bad);
        }
        Op::GatherND { .. } => {
            // out[t, :] = data[indices[t, 0], .., indices[t, r - 1], :].
            let (data, indices, out) = (address(b, 0), address(b, 1), address(b, 2));
            let eb = out_ty.dtype.size_bytes() as i64;
            let (index_ty, ib) = (inputs[1].dtype, inputs[1].dtype.size_bytes() as i64);
            let ishape = &inputs[1].shape;
            let r = ishape[ishape.len() - 1].size().expect("`supports` checked");
            let tuples = ishape[..ishape.len() - 1].iter().fold(Dim::new(1), |a, &d| a * d);
            let dshape = &inputs[0].shape;
            let inner = dshape[r..].iter().fold(Dim::new(1), |a, &d| a * d);
            let ds = dense_strides(dshape);
            let (count, inner_v) = (size(b, tuples), size(b, inner));
            let row_bytes = b.ins().imul_imm_s(inner_v, eb);
            let lens: Vec<(Value, Value)> = (0..r).map(|i| (size(b, dshape[i]), size(b, ds[i]))).collect();
            let bad = b.create_block();
            let zero = b.ins().iconst(types::I64, 0);
            counted_dyn(b, zero, count, 1, vec![], &mut |b, t, _| {
                let tuple = b.ins().imul_imm_s(t, r as i64 * ib);
                let tuple = b.ins().iadd(indices, tuple);
                let mut offset = b.ins().iconst(types::I64, 0);
                for (k, &(len, stride)) in lens.iter().enumerate() {
                    let at = b.ins().iadd_imm_s(tuple, k as i64 * ib);
                    let i = load_index(b, index_ty, at, flags);
                    let i = checked(b, i, len, bad);
                    let by = b.ins().imul(i, stride);
                    offset = b.ins().iadd(offset, by);
                }
                let src = b.ins().imul_imm_s(offset, eb);
                let src = b.ins().iadd(data, src);
                let dst = b.ins().imul(t, row_bytes);
                let dst = b.ins().iadd(out, dst);
                b.call_memcpy(config, dst, src, row_bytes);
                vec![]
            });
            fail_in(b, bad);
        }
        Op::Reshape { .. } => {
            let (x, out) = (address(b, 0), address(b, inputs.len()));
            let size = b.ins().iconst(ptr, (out_ty.numel() * out_ty.dtype.size_bytes()) as i64);
            b.call_memcpy(config, out, x, size);
        }
        Op::Shape { start, end } => {
            let out = address(b, 1);
            for (j, &d) in inputs[0].shape[*start..*end].iter().enumerate() {
                let v = size(b, d);
                b.ins().store(flags, v, out, (8 * j) as i32);
            }
        }
        Op::Range { .. } => {
            let ty = scalar(out_ty.dtype).expect("`supports` checked the dtype");
            let (start, delta, out) = (address(b, 0), address(b, 1), address(b, 2));
            let first = b.ins().load(ty, flags, start, 0);
            let delta = b.ins().load(ty, flags, delta, 0);
            let (zero, len) = (b.ins().iconst(types::I64, 0), size(b, out_ty.shape[0]));
            counted_dyn(b, zero, len, 1, vec![first], &mut |b, i, value| {
                let at = b.ins().imul_imm_s(i, bytes);
                let at = b.ins().iadd(out, at);
                b.ins().store(flags, value[0], at, 0);
                vec![b.ins().iadd(value[0], delta)]
            });
        }
        other => unreachable!("`supports` refused `{}`", other.name()),
    }
}

/// `x` of `from` as `to` (integers, f32 and the half types, which load as
/// their 16 bits; a bool is a byte of 0 or 1): integers widen by their
/// sign and narrow by wrapping, floats convert to integers saturating at
/// the target's range (NaN to 0), halves round to nearest even, as the
/// reference evaluator's casts do.
fn cast(b: &mut FunctionBuilder, x: Value, from: DType, to: DType) -> Value {
    let ty = |d: DType| if d == DType::F32 { types::F32 } else { element(d).expect("`supports` checked") };
    let (f, t) = (ty(from), ty(to));
    match (from, to) {
        (DType::F16, DType::F32) => f16_to_f32(b, x),
        (DType::BF16, DType::F32) => {
            let wide = b.ins().uextend(types::I32, x);
            let bits = b.ins().ishl_imm_u(wide, 16);
            b.ins().bitcast(types::F32, MemFlagsData::new(), bits)
        }
        (DType::F32, DType::F16) => f32_to_f16(b, x),
        (DType::F32, DType::BF16) => f32_to_bf16(b, x),
        _ if f == t && from != DType::Bool => x,
        (DType::F32, DType::I32 | DType::I64) => b.ins().fcvt_to_sint_sat(t, x),
        // Saturate in i32 at the narrow type's range, then narrow.
        (DType::F32, _) => {
            let (lo, hi) = match to {
                DType::I8 => (i8::MIN as i64, i8::MAX as i64),
                DType::U8 => (0, u8::MAX as i64),
                DType::I16 => (i16::MIN as i64, i16::MAX as i64),
                DType::U16 => (0, u16::MAX as i64),
                _ => (0, u32::MAX as i64),
            };
            let wide = b.ins().fcvt_to_sint_sat(types::I64, x);
            let (lo, hi) = (b.ins().iconst(types::I64, lo), b.ins().iconst(types::I64, hi));
            let clamped = b.ins().smax(wide, lo);
            let clamped = b.ins().smin(clamped, hi);
            b.ins().ireduce(t, clamped)
        }
        (_, DType::F32) if !from.is_signed() && from != DType::Bool => {
            let wide = if f == types::I64 { x } else { b.ins().uextend(types::I64, x) };
            b.ins().fcvt_from_uint(types::F32, wide)
        }
        (_, DType::F32) => b.ins().fcvt_from_sint(t, x),
        (DType::Bool, _) => b.ins().uextend(t, x),
        _ if f.bits() < t.bits() && from.is_signed() => b.ins().sextend(t, x),
        _ if f.bits() < t.bits() => b.ins().uextend(t, x),
        _ => b.ins().ireduce(t, x),
    }
}

/// IEEE half bits (an i16) to the f32 of the same value: exponent and
/// mantissa moved into place and rebiased; subnormals renormalised by a
/// float subtraction; infinities and NaNs keep an all-ones exponent.
fn f16_to_f32(b: &mut FunctionBuilder, h: Value) -> Value {
    let bits = b.ins().uextend(types::I32, h);
    let magnitude = b.ins().band_imm_u(bits, 0x7fff);
    let shifted = b.ins().ishl_imm_u(magnitude, 13);
    let exponent = b.ins().band_imm_u(shifted, 0x0f80_0000);
    let rebiased = b.ins().iadd_imm_s(shifted, (127 - 15) << 23);
    // Infinity or NaN: the exponent all ones.
    let special = b.ins().iadd_imm_s(rebiased, (128 - 16) << 23);
    let is_special = b.ins().icmp_imm_u(IntCC::Equal, exponent, 0x0f80_0000);
    // Zero or subnormal: one more exponent step, minus the implicit one.
    let bumped = b.ins().iadd_imm_s(rebiased, 1 << 23);
    let bumped = b.ins().bitcast(types::F32, MemFlagsData::new(), bumped);
    let magic = b.ins().f32const(f32::from_bits(113 << 23));
    let renormalised = b.ins().fsub(bumped, magic);
    let renormalised = b.ins().bitcast(types::I32, MemFlagsData::new(), renormalised);
    let is_small = b.ins().icmp_imm_u(IntCC::Equal, exponent, 0);
    let value = b.ins().select(is_special, special, rebiased);
    let value = b.ins().select(is_small, renormalised, value);
    let sign = b.ins().band_imm_u(bits, 0x8000);
    let sign = b.ins().ishl_imm_u(sign, 16);
    let value = b.ins().bor(value, sign);
    b.ins().bitcast(types::F32, MemFlagsData::new(), value)
}

/// An f32 to IEEE half bits (an i16), rounding to nearest even: too large
/// becomes infinity, NaN a quiet NaN, and values below half's normal range
/// round to its subnormals by a float addition.
fn f32_to_f16(b: &mut FunctionBuilder, x: Value) -> Value {
    let bits = b.ins().bitcast(types::I32, MemFlagsData::new(), x);
    let sign = b.ins().band_imm_u(bits, 0x8000_0000u32 as i64);
    let f = b.ins().bxor(bits, sign);
    // Past half's range: infinity, or a quiet NaN.
    let is_nan = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThan, f, 255 << 23);
    let qnan = b.ins().iconst(types::I32, 0x7e00);
    let inf = b.ins().iconst(types::I32, 0x7c00);
    let overflow = b.ins().select(is_nan, qnan, inf);
    let is_over = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, f, (127 + 16) << 23);
    // Below 2^-14: the float sum with a magic number rounds to a subnormal.
    const DENORM_MAGIC: i64 = ((127 - 15) + (23 - 10) + 1) << 23;
    let fv = b.ins().bitcast(types::F32, MemFlagsData::new(), f);
    let magic = b.ins().f32const(f32::from_bits(DENORM_MAGIC as u32));
    let sum = b.ins().fadd(fv, magic);
    let sum = b.ins().bitcast(types::I32, MemFlagsData::new(), sum);
    let small = b.ins().iadd_imm_s(sum, -DENORM_MAGIC);
    let is_small = b.ins().icmp_imm_u(IntCC::UnsignedLessThan, f, 113 << 23);
    // Normal: rebias, round the 13 dropped bits to nearest even, shift.
    let odd = b.ins().ushr_imm_u(f, 13);
    let odd = b.ins().band_imm_u(odd, 1);
    let rounded = b.ins().iadd_imm_s(f, ((15 - 127) << 23) + 0xfff);
    let rounded = b.ins().iadd(rounded, odd);
    let normal = b.ins().ushr_imm_u(rounded, 13);
    let value = b.ins().select(is_small, small, normal);
    let value = b.ins().select(is_over, overflow, value);
    let sign = b.ins().ushr_imm_u(sign, 16);
    let value = b.ins().bor(value, sign);
    b.ins().ireduce(types::I16, value)
}

/// An f32 to bfloat16 bits (an i16): the upper half rounded to nearest
/// even; a NaN keeps its upper bits with the quiet bit set.
fn f32_to_bf16(b: &mut FunctionBuilder, x: Value) -> Value {
    let bits = b.ins().bitcast(types::I32, MemFlagsData::new(), x);
    let odd = b.ins().ushr_imm_u(bits, 16);
    let odd = b.ins().band_imm_u(odd, 1);
    let rounded = b.ins().iadd_imm_s(bits, 0x7fff);
    let rounded = b.ins().iadd(rounded, odd);
    let rounded = b.ins().ushr_imm_u(rounded, 16);
    let quiet = b.ins().ushr_imm_u(bits, 16);
    let quiet = b.ins().bor_imm_u(quiet, 0x40);
    let is_nan = b.ins().fcmp(cranelift_codegen::ir::condcodes::FloatCC::Unordered, x, x);
    let value = b.ins().select(is_nan, quiet, rounded);
    b.ins().ireduce(types::I16, value)
}

/// Loops over every index of `shape` (i64 values), outermost first,
/// calling `body` with the operands' addresses there: `strides[d]` holds
/// each operand's byte stride along dim `d`, `at` their first addresses.
fn nest(
    b: &mut FunctionBuilder,
    shape: &[Value],
    strides: &[Vec<Value>],
    at: Vec<Value>,
    body: &mut dyn FnMut(&mut FunctionBuilder, &[Value]),
) {
    let Some((&len, rest)) = shape.split_first() else {
        body(b, &at);
        return;
    };
    let step = strides[0].clone();
    let zero = b.ins().iconst(types::I64, 0);
    counted_dyn(b, zero, len, 1, vec![], &mut |b, i, _| {
        let moved: Vec<Value> = at
            .iter()
            .zip(&step)
            .map(|(&a, &s)| {
                let by = b.ins().imul(i, s);
                b.ins().iadd(a, by)
            })
            .collect();
        nest(b, rest, &strides[1..], moved, body);
        vec![]
    });
}

/// An index loaded as an i64 from `at` (an i32 one sign-extended).
fn load_index(b: &mut FunctionBuilder, dtype: DType, at: Value, flags: MemFlagsData) -> Value {
    if dtype == DType::I64 {
        b.ins().load(types::I64, flags, at, 0)
    } else {
        let v = b.ins().load(types::I32, flags, at, 0);
        b.ins().sextend(types::I64, v)
    }
}

/// `i` counted from the end when negative, checked against `len`: out of
/// range goes to `bad` before anything is read.
fn checked(b: &mut FunctionBuilder, i: Value, len: Value, bad: cranelift_codegen::ir::Block) -> Value {
    let wrapped = b.ins().iadd(i, len);
    let negative = b.ins().icmp_imm_s(IntCC::SignedLessThan, i, 0);
    let i = b.ins().select(negative, wrapped, i);
    let low = b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, i, 0);
    let high = b.ins().icmp(IntCC::SignedLessThan, i, len);
    let ok = b.ins().band(low, high);
    let good = b.create_block();
    b.ins().brif(ok, good, &[], bad, &[]);
    b.switch_to_block(good);
    i
}

/// Fills `bad` with the out-of-range return; the code after it goes on
/// in a block of its own.
fn fail_in(b: &mut FunctionBuilder, bad: cranelift_codegen::ir::Block) {
    let after = b.create_block();
    b.ins().jump(after, &[]);
    b.switch_to_block(bad);
    let status = b.ins().iconst(types::I32, STATUS_INDEX_OUT_OF_RANGE as i64);
    b.ins().return_(&[status]);
    b.switch_to_block(after);
}
