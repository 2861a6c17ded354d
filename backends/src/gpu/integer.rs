//! GPU kernels for integer ops the plan leaves to the reference evaluator
//! (its expression language is f32 and bool): additions, subtractions and
//! products with broadcasting, cumulative sums, reshapes, slices, shapes and
//! ranges. Exporters
//! write them for position ids (BLOOM's `cumsum(mask) * mask - 1`). With
//! them no host step interrupts the run.
//!
//! Integers are i32 words on the device (see `form`): a result that does
//! not fit stores the step's code in the error word instead of wrapping.

use super::builder::Builder;
use super::form::{CmpOp, Kernel, Space, Ty, E};
use super::map::elementwise;
use super::Place;
use crate::plan::{broadcast_strides, BufferId};
use egret_ir::{DType, Op, Type};

const THREADS: u32 = 256;

fn integer(t: &Type) -> bool {
    matches!(t.dtype, DType::I32 | DType::I64)
}

/// Whether `a op b = r` overflowed i32: for sums and differences a sign
/// test, for products a division back.
fn overflowed(b: &mut Builder, op: &Op, x: &E, y: &E, r: &E) -> E {
    let zero = E::I32(0);
    match op {
        Op::Add => E::bin(super::form::BinOp::Xor, x.clone(), r.clone())
            .and_bits(E::bin(super::form::BinOp::Xor, y.clone(), r.clone()))
            .lt(zero),
        Op::Sub => E::bin(super::form::BinOp::Xor, x.clone(), y.clone())
            .and_bits(E::bin(super::form::BinOp::Xor, x.clone(), r.clone()))
            .lt(zero),
        _ => {
            // x * y overflowed iff x != 0 and r / x != y, or x = -1 and y = MIN.
            let nonzero = b.let_(x.clone().ne(zero.clone()));
            let safe_x = E::select(nonzero.clone(), x.clone(), E::I32(1));
            let back = (r.clone() / safe_x).ne(y.clone());
            let edge = x.clone().eq(E::I32(-1)).and(y.clone().eq(E::I32(i32::MIN)));
            nonzero.and(back.or(edge))
        }
    }
}

impl E {
    fn and_bits(self, o: E) -> E {
        E::bin(super::form::BinOp::And, self, o)
    }
}

/// A GPU kernel for a reference op, where one is written here. `code` is
/// what an overflow stores in the error word.
pub fn kernel(
    op: &Op,
    inputs: &[(BufferId, Type)],
    outputs: &[(BufferId, Type)],
    at: &dyn Fn(BufferId) -> Place,
    code: u32,
) -> Option<(Kernel, Vec<u32>, u64)> {
    let [(out, out_ty)] = outputs else { return None };
    let mut b = Builder::new(THREADS);
    let po = at(*out);
    // Each input's and the output's first word and element strides, the
    // inputs broadcast to the output.
    let broadcast_operands = || -> Vec<(i64, Vec<isize>)> {
        inputs
            .iter()
            .map(|(buf, t)| (at(*buf).word as i64, broadcast_strides(&t.sizes(), &out_ty.sizes())))
            .chain(std::iter::once((po.word as i64, broadcast_strides(&out_ty.sizes(), &out_ty.sizes()))))
            .collect()
    };
    match op {
        Op::Add | Op::Sub | Op::Mul if inputs.len() == 2 && inputs.iter().all(|(_, t)| integer(t)) => {
            let operands = broadcast_operands();
            let code = b.param(code as i64);
            let spaces: Vec<Space> = inputs.iter().map(|(buf, _)| at(*buf).space).collect();
            let groups = elementwise(&mut b, &out_ty.sizes(), &operands, |b, address| {
                let x = b.let_(E::load(spaces[0], address[0].clone()).bits(Ty::I32));
                let y = b.let_(E::load(spaces[1], address[1].clone()).bits(Ty::I32));
                let r = b.let_(match op {
                    Op::Add => x.clone() + y.clone(),
                    Op::Sub => x.clone() - y.clone(),
                    _ => x.clone() * y.clone(),
                });
                let bad = overflowed(b, op, &x, &y, &r);
                b.if_(bad, |b| b.fail(code.clone()));
                b.store(po.space, address[2].clone(), r);
            });
            let (k, p) = b.finish(format!("integer_{}", op.name()));
            Some((k, p, groups))
        }
        // Masks from positions (`kv_index <= query_index`): a bool word each.
        Op::Equal | Op::Less | Op::LessOrEqual | Op::Greater | Op::GreaterOrEqual
            if inputs.len() == 2 && inputs.iter().all(|(_, t)| integer(t)) && out_ty.dtype == DType::Bool =>
        {
            let cmp = match op {
                Op::Equal => CmpOp::Eq,
                Op::Less => CmpOp::Lt,
                Op::LessOrEqual => CmpOp::Le,
                Op::Greater => CmpOp::Gt,
                _ => CmpOp::Ge,
            };
            let operands = broadcast_operands();
            let spaces: Vec<Space> = inputs.iter().map(|(buf, _)| at(*buf).space).collect();
            let groups = elementwise(&mut b, &out_ty.sizes(), &operands, |b, address| {
                let x = E::load(spaces[0], address[0].clone()).bits(Ty::I32);
                let y = E::load(spaces[1], address[1].clone()).bits(Ty::I32);
                b.store(po.space, address[2].clone(), E::cmp(cmp, x, y));
            });
            let (k, p) = b.finish(format!("integer_{}", op.name()));
            Some((k, p, groups))
        }
        // Reshapes of dense values move no word.
        Op::Reshape { .. } if inputs.len() == 1 => {
            let (buf, t) = &inputs[0];
            let flat = [t.numel()];
            let src = at(*buf);
            let operands = vec![(src.word as i64, vec![1]), (po.word as i64, vec![1])];
            let groups = elementwise(&mut b, &flat, &operands, |b, address| {
                b.store(po.space, address[1].clone(), E::load(src.space, address[0].clone()));
            });
            let (k, p) = b.finish("copy");
            Some((k, p, groups))
        }
        Op::CumSum { axis, exclusive, reverse } | Op::CumProd { axis, exclusive, reverse } if integer(&inputs[0].1) => {
            // One invocation per line along the axis, summing (multiplying)
            // in order.
            let product = matches!(op, Op::CumProd { .. });
            let (buf, t) = &inputs[0];
            let src = at(*buf);
            let (outer, len, inner) = (
                t.sizes()[..*axis].iter().product::<usize>(),
                t.sizes()[*axis],
                t.sizes()[axis + 1..].iter().product::<usize>(),
            );
            let lines = b.param((outer * inner) as i64);
            let len_p = b.param(len as i64);
            let inner_p = b.param(inner as i64);
            let (x0, o0) = (b.param(src.word as i64), b.param(po.word as i64));
            let code = b.param(code as i64);
            let gid = b.global_index();
            b.if_(gid.clone().lt(lines), |b| {
                let o = b.let_(gid.clone() / inner_p.clone());
                let i = b.let_(gid.clone() % inner_p.clone());
                let start = b.let_(o * len_p.clone() * inner_p.clone() + i);
                let acc = b.var(E::I32(i32::from(product)));
                b.for_(E::I32(0), len_p.clone(), E::I32(1), |b, step| {
                    let j = if *reverse { len_p.clone() - E::I32(1) - step } else { step };
                    let at_ = b.let_(start.clone() + j * inner_p.clone());
                    let v = b.let_(E::load(src.space, x0.clone() + at_.clone()).bits(Ty::I32));
                    let (sum, step_op) = match product {
                        true => (b.let_(E::Var(acc) * v.clone()), Op::Mul),
                        false => (b.let_(E::Var(acc) + v.clone()), Op::Add),
                    };
                    let bad = overflowed(b, &step_op, &E::Var(acc), &v, &sum);
                    b.if_(bad, |b| b.fail(code.clone()));
                    let value = if *exclusive { E::Var(acc) } else { sum.clone() };
                    b.store(po.space, o0.clone() + at_, value);
                    b.set(acc, sum);
                });
            });
            let (k, p) = b.finish(if product { "integer_cumprod" } else { "integer_cumsum" });
            Some((k, p, ((outer * inner) as u64).div_ceil(THREADS as u64)))
        }
        // A slice a neutral lowering leaves as an op (of an integer table,
        // by a symbolic length): a strided copy, any one-word element.
        Op::Slice { starts, steps, .. } if inputs.len() == 1 && starts.iter().all(|d| d.is_known()) => {
            let (buf, t) = &inputs[0];
            let src = at(*buf);
            let strides = egret_ir::strides_of(&t.sizes());
            let base = src.word as i64
                + starts.iter().zip(&strides).map(|(s, &st)| s.known().unwrap_or(0) * st as i64).sum::<i64>();
            let walk: Vec<isize> = steps.iter().zip(&strides).map(|(&step, &st)| step as isize * st as isize).collect();
            let dense = broadcast_strides(&out_ty.sizes(), &out_ty.sizes());
            let operands = vec![(base, walk), (po.word as i64, dense)];
            let groups = elementwise(&mut b, &out_ty.sizes(), &operands, |b, address| {
                b.store(po.space, address[1].clone(), E::load(src.space, address[0].clone()));
            });
            let (k, p) = b.finish("slice");
            Some((k, p, groups))
        }
        // The shape of a value whose dims were symbolic, and the positions
        // counted from it: what exporters compute position ids with. The
        // dims are this program's parameters.
        Op::Shape { start, end } if inputs.len() == 1 => {
            let dims: Vec<i64> = inputs[0].1.sizes()[*start..*end].iter().map(|&d| d as i64).collect();
            let n = b.param(dims.len() as i64);
            let o0 = b.param(po.word as i64);
            let table = b.param_table(dims.iter().copied());
            let gid = b.global_index();
            b.if_(gid.clone().lt(n), |b| {
                let v = E::Load(Space::Params, Box::new(gid.clone() + E::I32(table as i32)));
                b.store(po.space, o0.clone() + gid.clone(), v);
            });
            let (k, p) = b.finish("shape");
            Some((k, p, (dims.len() as u64).div_ceil(THREADS as u64)))
        }
        Op::Range { .. } if inputs.len() == 2 && inputs.iter().all(|(_, t)| integer(t) && t.rank() == 0) => {
            let (first, delta) = (at(inputs[0].0), at(inputs[1].0));
            let len = out_ty.numel();
            let n = b.param(len as i64);
            let (f0, d0, o0) = (b.param(first.word as i64), b.param(delta.word as i64), b.param(po.word as i64));
            let code = b.param(code as i64);
            let gid = b.global_index();
            b.if_(gid.clone().lt(n), |b| {
                let x = b.let_(E::load(first.space, f0).bits(Ty::I32));
                let d = b.let_(E::load(delta.space, d0).bits(Ty::I32));
                let step = b.let_(gid.clone() * d.clone());
                let bad = overflowed(b, &Op::Mul, &gid, &d, &step);
                b.if_(bad, |b| b.fail(code.clone()));
                let v = b.let_(x.clone() + step.clone());
                let bad = overflowed(b, &Op::Add, &x, &step, &v);
                b.if_(bad, |b| b.fail(code.clone()));
                b.store(po.space, o0 + gid.clone(), v);
            });
            let (k, p) = b.finish("integer_range");
            Some((k, p, (len as u64).div_ceil(THREADS as u64)))
        }
        _ => None,
    }
}
