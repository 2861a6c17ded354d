//! Row kernels: softmax, normalisations and reductions over contiguous rows.
//!
//! Each pass over a row runs four lanes at a time with vector accumulators,
//! then a scalar tail; the lanes are combined once per row. A maximum or a
//! minimum, whose order does not matter, keeps `WAYS` accumulators in
//! flight: with one, each vector waited on the last (Cranelift's `fmax` is
//! a chain of compares and selects, for NaNs and signed zeros), and the
//! whole-tensor reductions of a dynamically quantized model's activations
//! ran at about two cycles an element.

use super::loops::{counted, counted_dyn, while_fits};
use super::runtime_fns::FuncRefs;
use super::vmath::VMath;
use crate::plan::{RowKernel, RowOp};
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;
use egret_ir::Dim;

const LANES: i64 = 4;

/// Vector accumulators of a maximum or minimum.
const WAYS: usize = 4;

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// The address of element `i` (an i64 value) of an f32 row at `base`.
fn at(b: &mut FunctionBuilder, base: Value, i: Value) -> Value {
    let off = b.ins().ishl_imm_u(i, 2);
    b.ins().iadd(base, off)
}

/// A count: known when the kernel is generated, or read at run time.
#[derive(Clone, Copy)]
enum Count {
    Known(i64),
    Read(Value),
}

impl Count {
    fn value(self, b: &mut FunctionBuilder) -> Value {
        match self {
            Count::Known(n) => b.ins().iconst(types::I64, n),
            Count::Read(v) => v,
        }
    }

    /// `self * k`.
    fn times(self, b: &mut FunctionBuilder, k: i64) -> Count {
        match self {
            Count::Known(n) => Count::Known(n * k),
            Count::Read(v) => Count::Read(b.ins().imul_imm_s(v, k)),
        }
    }

    /// `x + self`.
    fn add_to(self, b: &mut FunctionBuilder, x: Value) -> Value {
        match self {
            Count::Known(n) => b.ins().iadd_imm_s(x, n),
            Count::Read(v) => b.ins().iadd(x, v),
        }
    }

    /// `x * self`.
    fn scale(self, b: &mut FunctionBuilder, x: Value) -> Value {
        match self {
            Count::Known(n) => b.ins().imul_imm_s(x, n),
            Count::Read(v) => b.ins().imul(x, v),
        }
    }
}

/// `for i in (start..end).step_by(step)`, with constant bounds where both are known.
fn counted_n(
    b: &mut FunctionBuilder,
    start: Count,
    end: Count,
    step: i64,
    carried: Vec<Value>,
    body: &mut dyn FnMut(&mut FunctionBuilder, Value, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    match (start, end) {
        (Count::Known(s), Count::Known(e)) => counted(b, s, e, step, carried, body),
        _ => {
            let (s, e) = (start.value(b), end.value(b));
            counted_dyn(b, s, e, step, carried, body)
        }
    }
}

struct Row<'a> {
    len: Count,
    /// The end of the whole vectors: `len` rounded down to the lanes.
    vector_end: Count,
    fns: &'a FuncRefs,
}

impl Row<'_> {
    fn vector_end(&self) -> Count {
        self.vector_end
    }

    /// The row length as an f32 (a mean's divisor).
    fn len_f32(&self, b: &mut FunctionBuilder) -> Value {
        match self.len {
            Count::Known(n) => b.ins().f32const(n as f32),
            Count::Read(v) => b.ins().fcvt_from_sint(types::F32, v),
        }
    }

    /// Folds `f` over the row: vector lanes first, then the scalar tail,
    /// then the lanes are combined with `f`. `load` turns an element address
    /// into the value to fold (vector or scalar).
    fn fold(
        &self,
        b: &mut FunctionBuilder,
        init: f32,
        load: &dyn Fn(&mut FunctionBuilder, Value, bool) -> Value,
        f: &dyn Fn(&mut FunctionBuilder, Value, Value) -> Value,
    ) -> Value {
        let vinit = VMath::new(true).c(b, init);
        self.fold_from(b, Count::Known(0), vinit, init, load, f)
    }

    /// A fold from element `start` (a whole number of vectors in) with the
    /// vector accumulator `acc`: the remaining whole vectors, the scalar
    /// tail from `init`, then the lanes.
    fn fold_from(
        &self,
        b: &mut FunctionBuilder,
        start: Count,
        acc: Value,
        init: f32,
        load: &dyn Fn(&mut FunctionBuilder, Value, bool) -> Value,
        f: &dyn Fn(&mut FunctionBuilder, Value, Value) -> Value,
    ) -> Value {
        let v = counted_n(b, start, self.vector_end(), LANES, vec![acc], &mut |b, i, acc| {
            let x = load(b, i, true);
            vec![f(b, acc[0], x)]
        })[0];
        let sinit = b.ins().f32const(init);
        let s = counted_n(b, self.vector_end(), self.len, 1, vec![sinit], &mut |b, i, acc| {
            let x = load(b, i, false);
            vec![f(b, acc[0], x)]
        })[0];
        let mut acc = s;
        for lane in 0..4 {
            let l = b.ins().extractlane(v, lane);
            acc = f(b, acc, l);
        }
        acc
    }

    /// `fold` for an `f` whose order does not matter (a maximum, a
    /// minimum: the same value in any order, NaNs and signed zeros
    /// included): `WAYS` vectors at a time into as many accumulators,
    /// combined before the last whole vectors and the tail.
    fn fold_any_order(
        &self,
        b: &mut FunctionBuilder,
        init: f32,
        load: &dyn Fn(&mut FunctionBuilder, Value, bool) -> Value,
        f: &dyn Fn(&mut FunctionBuilder, Value, Value) -> Value,
    ) -> Value {
        let vinit = VMath::new(true).c(b, init);
        let (zero, end) = (b.ins().iconst(types::I64, 0), self.vector_end().value(b));
        let step = LANES * WAYS as i64;
        let (i, accs) = while_fits(b, zero, end, step, vec![vinit; WAYS], &mut |b, i, acc| {
            (0..WAYS)
                .map(|w| {
                    let at = b.ins().iadd_imm_s(i, LANES * w as i64);
                    let x = load(b, at, true);
                    f(b, acc[w], x)
                })
                .collect()
        });
        let acc = accs[1..].iter().fold(accs[0], |acc, &x| f(b, acc, x));
        self.fold_from(b, Count::Read(i), acc, init, load, f)
    }

    /// Writes `value(i)` to every element: vector lanes, then the tail.
    fn each(&self, b: &mut FunctionBuilder, out: Value, value: &dyn Fn(&mut FunctionBuilder, Value, bool) -> Value) {
        counted_n(b, Count::Known(0), self.vector_end(), LANES, vec![], &mut |b, i, _| {
            let v = value(b, i, true);
            let p = at(b, out, i);
            b.ins().store(flags(), v, p, 0);
            vec![]
        });
        counted_n(b, self.vector_end(), self.len, 1, vec![], &mut |b, i, _| {
            let v = value(b, i, false);
            let p = at(b, out, i);
            b.ins().store(flags(), v, p, 0);
            vec![]
        });
    }
}

fn load(b: &mut FunctionBuilder, base: Value, i: Value, vector: bool) -> Value {
    let p = at(b, base, i);
    let ty: Type = if vector { types::F32X4 } else { types::F32 };
    b.ins().load(ty, flags(), p, 0)
}

fn splat_if(b: &mut FunctionBuilder, x: Value, vector: bool) -> Value {
    if vector {
        b.ins().splat(types::F32X4, x)
    } else {
        x
    }
}

/// Emits rows `begin..end` of the kernel. `sizes` are its runtime dims,
/// whose values follow the operands in `args`.
pub fn emit(
    b: &mut FunctionBuilder,
    ptr: Type,
    args: Value,
    range: (Value, Value),
    k: &RowKernel,
    fns: &FuncRefs,
    sizes: &[Dim],
) {
    let mut slot = 0;
    let mut next_arg = |b: &mut FunctionBuilder| {
        let v = b.ins().load(ptr, flags(), args, slot * 8);
        slot += 1;
        v
    };
    // Operands: x, [residual,] [scale,] [bias,] out, [sum].
    let x = next_arg(b);
    let residual = k.residual.map(|_| next_arg(b));
    let scale = k.scale.map(|_| next_arg(b));
    let bias = k.bias.map(|_| next_arg(b));
    let out = next_arg(b);
    let sum = k.residual.map(|_| next_arg(b));
    let operands = slot as usize;
    let (len, vector_end) = match k.len.known() {
        Some(n) => (Count::Known(n), Count::Known(n / LANES * LANES)),
        None => {
            // The length's slot follows the operands.
            let at = sizes.iter().position(|&d| d == k.len).expect("a symbolic length is a runtime dim");
            let n = b.ins().load(types::I64, flags(), args, (8 * (operands + at)) as i32);
            let end = b.ins().band_imm_s(n, !(LANES - 1));
            (Count::Read(n), Count::Read(end))
        }
    };
    let row_bytes = len.times(b, 4);
    let out_step = if k.op.reduces() { Count::Known(4) } else { row_bytes };
    let row = Row { len, vector_end, fns };
    let x_off = row_bytes.scale(b, range.0);
    let out_off = out_step.scale(b, range.0);
    // Row pointers carried by the loop: x, out, then residual and sum.
    let mut start = vec![b.ins().iadd(x, x_off), b.ins().iadd(out, out_off)];
    if let (Some(r), Some(s)) = (residual, sum) {
        start.push(b.ins().iadd(r, x_off));
        start.push(b.ins().iadd(s, x_off));
    }
    counted_dyn(b, range.0, range.1, 1, start, &mut |b, _, p| {
        let x = if p.len() == 4 {
            // x + residual into the sum row, which is then normalised.
            row.each(b, p[3], &|b, i, v| {
                let xi = load(b, p[0], i, v);
                let ri = load(b, p[2], i, v);
                b.ins().fadd(xi, ri)
            });
            p[3]
        } else {
            p[0]
        };
        emit_row(b, &row, k.op, x, p[1], scale, bias);
        let mut next: Vec<Value> = vec![row_bytes.add_to(b, p[0]), out_step.add_to(b, p[1])];
        for &q in &p[2..] {
            next.push(row_bytes.add_to(b, q));
        }
        next
    });
}

fn emit_row(
    b: &mut FunctionBuilder,
    row: &Row,
    op: RowOp,
    x: Value,
    out: Value,
    scale: Option<Value>,
    bias: Option<Value>,
) {
    let fadd = |b: &mut FunctionBuilder, a, c| b.ins().fadd(a, c);
    let ld = move |b: &mut FunctionBuilder, i, v| load(b, x, i, v);
    match op {
        RowOp::Softmax | RowOp::LogSoftmax => {
            let max = row.fold(b, f32::NEG_INFINITY, &ld, &|b, a, c| b.ins().fmax(a, c));
            // exp(x - max) is written out and summed in one pass.
            let vmax = b.ins().splat(types::F32X4, max);
            let sum = {
                let sum_v = VMath::new(true).c(b, 0.0);
                let v = counted_n(b, Count::Known(0), row.vector_end(), LANES, vec![sum_v], &mut |b, i, acc| {
                    let xi = load(b, x, i, true);
                    let d = b.ins().fsub(xi, vmax);
                    let e = VMath::new(true).exp(b, d);
                    let p = at(b, out, i);
                    b.ins().store(flags(), e, p, 0);
                    vec![b.ins().fadd(acc[0], e)]
                })[0];
                let zero = b.ins().f32const(0.0);
                let mut s = counted_n(b, row.vector_end(), row.len, 1, vec![zero], &mut |b, i, acc| {
                    let xi = load(b, x, i, false);
                    let d = b.ins().fsub(xi, max);
                    let e = VMath::new(false).exp(b, d);
                    let p = at(b, out, i);
                    b.ins().store(flags(), e, p, 0);
                    vec![b.ins().fadd(acc[0], e)]
                })[0];
                for lane in 0..4 {
                    let l = b.ins().extractlane(v, lane);
                    s = b.ins().fadd(s, l);
                }
                s
            };
            if op == RowOp::Softmax {
                let one = b.ins().f32const(1.0);
                let inv = b.ins().fdiv(one, sum);
                row.each(b, out, &|b, i, v| {
                    let e = load(b, out, i, v);
                    let s = splat_if(b, inv, v);
                    b.ins().fmul(e, s)
                });
            } else {
                let call = b.ins().call(row.fns.log, &[sum]);
                let log_sum = b.inst_results(call)[0];
                let shift = b.ins().fadd(max, log_sum);
                row.each(b, out, &|b, i, v| {
                    let xi = load(b, x, i, v);
                    let s = splat_if(b, shift, v);
                    b.ins().fsub(xi, s)
                });
            }
        }
        RowOp::LayerNorm { epsilon } | RowOp::RmsNorm { epsilon } => {
            let rms = matches!(op, RowOp::RmsNorm { .. });
            let n = row.len_f32(b);
            let mean = if rms {
                b.ins().f32const(0.0)
            } else {
                let sum = row.fold(b, 0.0, &ld, &fadd);
                b.ins().fdiv(sum, n)
            };
            let sq = row.fold(
                b,
                0.0,
                &|b, i, v| {
                    let xi = load(b, x, i, v);
                    let m = splat_if(b, mean, v);
                    let d = b.ins().fsub(xi, m);
                    b.ins().fmul(d, d)
                },
                &fadd,
            );
            let var = b.ins().fdiv(sq, n);
            let eps = b.ins().f32const(epsilon);
            let var = b.ins().fadd(var, eps);
            let sd = b.ins().sqrt(var);
            let one = b.ins().f32const(1.0);
            let inv = b.ins().fdiv(one, sd);
            row.each(b, out, &|b, i, v| {
                let xi = load(b, x, i, v);
                let m = splat_if(b, mean, v);
                let s = splat_if(b, inv, v);
                let d = b.ins().fsub(xi, m);
                let mut y = b.ins().fmul(d, s);
                if let Some(scale) = scale {
                    let g = load(b, scale, i, v);
                    y = b.ins().fmul(y, g);
                }
                if let Some(bias) = bias {
                    let c = load(b, bias, i, v);
                    y = b.ins().fadd(y, c);
                }
                y
            });
        }
        RowOp::Sum | RowOp::Mean | RowOp::Max | RowOp::Min | RowOp::SumSquare | RowOp::L2 => {
            let v = match op {
                RowOp::Max => row.fold_any_order(b, f32::NEG_INFINITY, &ld, &|b, a, c| b.ins().fmax(a, c)),
                RowOp::Min => row.fold_any_order(b, f32::INFINITY, &ld, &|b, a, c| b.ins().fmin(a, c)),
                RowOp::SumSquare | RowOp::L2 => row.fold(
                    b,
                    0.0,
                    &|b, i, v| {
                        let xi = load(b, x, i, v);
                        b.ins().fmul(xi, xi)
                    },
                    &fadd,
                ),
                _ => row.fold(b, 0.0, &ld, &fadd),
            };
            let v = match op {
                RowOp::Mean => {
                    let n = row.len_f32(b);
                    b.ins().fdiv(v, n)
                }
                RowOp::L2 => b.ins().sqrt(v),
                _ => v,
            };
            b.ins().store(flags(), v, out, 0);
        }
    }
}
