//! Row kernels: one workgroup per row; each invocation strides over the
//! row, and the workgroup combines its partial results with a workgroup
//! reduction (`S::Reduce`: a tree in workgroup memory in WGSL, warp
//! shuffles in PTX).

use super::builder::Builder;
use super::form::{Kernel, Reduction, Ty, UnOp, E};
use super::Place;
use crate::plan::known_size;
use crate::plan::{BufferId, RowKernel, RowOp};

/// Invocations per row: enough to cover short rows in a pass or two.
fn threads_for(len: usize) -> u32 {
    match len {
        0..=128 => 64,
        129..=1024 => 128,
        _ => 256,
    }
}

pub fn rows(k: &RowKernel, at: &dyn Fn(BufferId) -> Place) -> (Kernel, Vec<u32>, u64) {
    // GPU plans are bound (`compile` checks): every size is known.
    let mut b = Builder::new(threads_for(known_size(k.len)));
    let threads = E::I32(b.threads() as i32);
    let rows = b.param(known_size(k.rows) as i64);
    let len = b.param(known_size(k.len) as i64);
    let (px, po) = (at(k.x), at(k.out));
    let x_base = b.param(px.word as i64);
    let out_base = b.param(po.word as i64);
    let scale = k.scale.map(|s| (at(s).space, b.param(at(s).word as i64)));
    let bias = k.bias.map(|s| (at(s).space, b.param(at(s).word as i64)));
    let residual = k.residual.map(|(r, sum)| {
        let (pr, ps) = (at(r), at(sum));
        (pr.space, b.param(pr.word as i64), ps.space, b.param(ps.word as i64))
    });
    let scratch = b.shared(b.threads());
    let row = b.group();
    let t = b.thread();
    b.if_(row.clone().lt(rows), |b| {
        let start = b.let_(row.clone() * len.clone());
        // With a residual the row is `x + residual`, written to `sum` and
        // read back from there (each invocation reads what it wrote).
        let (src_space, src) = match &residual {
            Some((rs, rbase, ss, sbase)) => {
                b.for_(t.clone(), len.clone(), threads.clone(), |b, j| {
                    let i = b.let_(start.clone() + j);
                    let v =
                        E::load_f32(px.space, x_base.clone() + i.clone()) + E::load_f32(*rs, rbase.clone() + i.clone());
                    b.store(*ss, sbase.clone() + i, v);
                });
                (*ss, sbase.clone())
            }
            None => (px.space, x_base.clone()),
        };
        let x = |j: &E| E::load_f32(src_space, src.clone() + start.clone() + j.clone());
        let out_at = |j: E| out_base.clone() + start.clone() + j;
        // One pass accumulating `f(x_j)` into a per-invocation partial.
        let partial = |b: &mut Builder, init: f32, step: &dyn Fn(&mut Builder, E, E) -> E| {
            let acc = b.var(E::F32(init));
            b.for_(t.clone(), len.clone(), threads.clone(), |b, j| {
                let xj = b.let_(x(&j));
                let v = step(b, E::Var(acc), xj);
                b.set(acc, v);
            });
            E::Var(acc)
        };
        let len_f = len.clone().cast(Ty::F32);
        match k.op {
            RowOp::Softmax | RowOp::LogSoftmax => {
                let p = partial(b, f32::NEG_INFINITY, &|b, a, x| b.max_nan(a, x, true));
                let max = b.reduce(Reduction::Max, p, scratch);
                let p = partial(b, 0.0, &|_, a, x| a + (x - max.clone()).exp());
                let sum = b.reduce(Reduction::Sum, p, scratch);
                let log = k.op == RowOp::LogSoftmax;
                let shift = if log { b.let_(max.clone() + E::un(UnOp::Log, sum.clone())) } else { max.clone() };
                let inv = b.let_(E::F32(1.0) / sum);
                b.for_(t.clone(), len.clone(), threads.clone(), |b, j| {
                    let d = x(&j) - shift.clone();
                    let v = if log { d } else { d.exp() * inv.clone() };
                    b.store(po.space, out_at(j), v);
                });
            }
            RowOp::LayerNorm { epsilon } | RowOp::RmsNorm { epsilon } => {
                let rms = matches!(k.op, RowOp::RmsNorm { .. });
                let mean = if rms {
                    E::F32(0.0)
                } else {
                    let p = partial(b, 0.0, &|_, a, x| a + x);
                    let s = b.reduce(Reduction::Sum, p, scratch);
                    b.let_(s / len_f.clone())
                };
                let p = partial(b, 0.0, &|_, a, x| {
                    let d = x - mean.clone();
                    E::fma(d.clone(), d, a)
                });
                let var = b.reduce(Reduction::Sum, p, scratch);
                let inv = b.let_(E::F32(1.0) / E::un(UnOp::Sqrt, var / len_f + E::F32(epsilon)));
                b.for_(t.clone(), len.clone(), threads.clone(), |b, j| {
                    let mut v = (x(&j) - mean.clone()) * inv.clone();
                    if let Some((space, base)) = &scale {
                        v = v * E::load_f32(*space, base.clone() + j.clone());
                    }
                    if let Some((space, base)) = &bias {
                        v = v + E::load_f32(*space, base.clone() + j.clone());
                    }
                    b.store(po.space, out_at(j), v);
                });
            }
            RowOp::Sum | RowOp::Mean | RowOp::SumSquare | RowOp::L2 => {
                let square = matches!(k.op, RowOp::SumSquare | RowOp::L2);
                let p = partial(b, 0.0, &|_, a, x| if square { E::fma(x.clone(), x, a) } else { a + x });
                let s = b.reduce(Reduction::Sum, p, scratch);
                let v = match k.op {
                    RowOp::Mean => s / len_f,
                    RowOp::L2 => E::un(UnOp::Sqrt, s),
                    _ => s,
                };
                b.if_(t.clone().eq(E::I32(0)), |b| b.store(po.space, out_base.clone() + row.clone(), v));
            }
            RowOp::Max | RowOp::Min => {
                let max = k.op == RowOp::Max;
                let init = if max { f32::NEG_INFINITY } else { f32::INFINITY };
                let p = partial(b, init, &|b, a, x| b.max_nan(a, x, max));
                let how = if max { Reduction::Max } else { Reduction::Min };
                let v = b.reduce(how, p, scratch);
                b.if_(t.clone().eq(E::I32(0)), |b| b.store(po.space, out_base.clone() + row.clone(), v));
            }
        }
    });
    let name = format!("rows_{}", format!("{:?}", k.op).split([' ', '{']).next().unwrap_or("op").to_lowercase());
    let (kernel, params) = b.finish(name);
    (kernel, params, known_size(k.rows) as u64)
}
