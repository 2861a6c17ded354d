//! Flash-style attention: a workgroup takes `ROWS` query rows of one batch,
//! one row per invocation, its query row and output accumulator in
//! registers where they fit (`REGISTER_ROWS`). Keys and values pass through workgroup memory
//! `key_tile` keys at a time; each invocation scores its row against them
//! and folds them into a running maximum, sum and output row (an online
//! softmax), so the score matrix never leaves the invocation.

use super::builder::Builder;
use super::form::{Kernel, Local, Space, Ty, Var, E};
use super::Place;
use crate::plan::{known, known_size, AttentionKernel, BufferId};

pub const ROWS: usize = 64;

/// A query row and an output accumulator of up to this many values in all
/// live in registers (every loop over them unrolled: d = dv = 64 takes 255
/// registers at sm_80, no spills); longer ones in per-thread arrays, which
/// GPUs keep in local memory (d = dv = 128 in registers would spill).
const REGISTER_ROWS: usize = 128;

/// A per-invocation row of f32: registers (indexed by constants) or a
/// per-thread array (indexed at run time).
enum Row {
    Registers(Vec<Var>),
    Array(Local),
}

impl Row {
    fn new(b: &mut Builder, len: usize, registers: bool) -> Row {
        if registers {
            Row::Registers((0..len).map(|_| b.var(E::F32(0.0))).collect())
        } else {
            Row::Array(b.local(len as u32))
        }
    }

    /// `body(c)` for every column `c`: unrolled, with `c` a constant, for
    /// registers; a loop for an array.
    fn each(&self, b: &mut Builder, len: usize, mut body: impl FnMut(&mut Builder, E)) {
        match self {
            Row::Registers(_) => (0..len).for_each(|c| body(b, E::I32(c as i32))),
            Row::Array(_) => b.for_(E::I32(0), E::I32(len as i32), E::I32(1), |b, c| body(b, c)),
        }
    }

    fn get(&self, c: &E) -> E {
        match (self, c) {
            (Row::Registers(v), E::I32(i)) => E::Var(v[*i as usize]),
            (Row::Array(a), _) => E::LoadLocal(*a, Box::new(c.clone())),
            _ => unreachable!("register rows are indexed by constants"),
        }
    }

    fn set(&self, b: &mut Builder, c: &E, value: E) {
        match (self, c) {
            (Row::Registers(v), E::I32(i)) => b.set(v[*i as usize], value),
            (Row::Array(a), _) => b.store_local(*a, c.clone(), value),
            _ => unreachable!("register rows are indexed by constants"),
        }
    }
}

/// Keys per tile: as many as fit 16 KiB of workgroup memory (keys and
/// values), at most 16.
fn key_tile(d: usize, dv: usize) -> usize {
    (4096 / (d + dv).max(1)).clamp(1, 16)
}

pub fn attention(k: &AttentionKernel, at: &dyn Fn(BufferId) -> Place) -> (Kernel, Vec<u32>, u64) {
    let mut b = Builder::new(ROWS as u32);
    let (d, dv, kt_len) = (k.d, k.dv, key_tile(k.d, k.dv));
    let (pq, pk, pv, po) = (at(k.q), at(k.kt), at(k.v), at(k.out));
    let pm = k.mask.map(at);
    let sq_len = known_size(k.sq);
    let blocks = sq_len.div_ceil(ROWS);
    let sq = b.param(sq_len as i64);
    let blocks_p = b.param(blocks as i64);
    let batches = b.param(k.batches.len() as i64);
    // GPU plans are bound (`compile` checks): every size is known.
    let sk = known_size(k.sk);
    let [q_rs, q_cs] = k.q_strides.map(|s| b.param(known(s) as i64));
    let [k_rs, k_cs] = k.kt_strides.map(|s| b.param(known(s) as i64));
    let [v_rs, v_cs] = k.v_strides.map(|s| b.param(known(s) as i64));
    let [m_rs, m_cs] = k.mask_strides.map(|s| b.param(known(s) as i64));
    let out_rs = b.param(known(k.out_row_stride) as i64);
    let scale = b.param(k.scale.to_bits() as i32 as i64).bits(Ty::F32);
    let words = |p: Option<Place>| p.map_or(0, |p| p.word as i64);
    // The spans table follows the batch table, whose length is the batch
    // count: its start is a parameter, so one shader serves every count.
    let (spans_at, spans_start) = b.param_later();
    let table = b.param_table(k.batches.iter().flat_map(|o| {
        [
            pq.word as i64 + known(o[0]) as i64,
            pk.word as i64 + known(o[1]) as i64,
            pv.word as i64 + known(o[2]) as i64,
            words(pm) + known(o[3]) as i64,
            po.word as i64 + known(o[4]) as i64,
        ]
    }));
    // Keys each task visits: with a constant mask, the hull of the spans of
    // the plan's query blocks that overlap this one (keys outside have
    // weight exactly zero); else all of them.
    let spans = b.param_table((0..k.batches.len() * blocks).flat_map(|task| {
        let (batch, block) = (task / blocks, task % blocks);
        let (first, end) = match &k.key_spans {
            None => (0, sk),
            Some(spans) => {
                let rows = block * ROWS..((block + 1) * ROWS).min(sq_len);
                let per = k.blocks_per_batch();
                let plan_blocks = rows.start / k.block..rows.end.div_ceil(k.block);
                plan_blocks.map(|pb| spans[batch * per + pb]).fold((sk, 0), |(f, e), [a, z]| (f.min(a), e.max(z)))
            }
        };
        let first = first.min(end);
        [first as i64, end as i64]
    }));
    b.set_param(spans_at, spans as i64);

    let sk_tile = b.shared((kt_len * d) as u32);
    let sv_tile = b.shared((kt_len * dv) as u32);
    let scores = b.local(kt_len as u32);
    let group = b.group();
    let t = b.thread();
    let batch = b.let_(group.clone() / blocks_p.clone());
    b.if_(batch.clone().lt(batches), |b| {
        let entry = |i: i32| {
            E::Load(Space::Params, Box::new(batch.clone() * E::I32(5) + E::I32(table as i32 + i))).bits(Ty::I32)
        };
        let (qo, ko, vo, mo, oo) =
            (b.let_(entry(0)), b.let_(entry(1)), b.let_(entry(2)), b.let_(entry(3)), b.let_(entry(4)));
        let span = |i: i32| {
            let at = group.clone() * E::I32(2) + spans_start.clone();
            let at = if i == 0 { at } else { at + E::I32(i) };
            E::Load(Space::Params, Box::new(at)).bits(Ty::I32)
        };
        let (first, end) = (b.let_(span(0)), b.let_(span(1)));
        let row = b.let_(group.clone() % blocks_p.clone() * E::I32(ROWS as i32) + t.clone());
        // Invocations past the last row compute on the last one and store nothing.
        let qrow = b.let_(row.clone().min(sq.clone() - E::I32(1)));
        let registers = d + dv <= REGISTER_ROWS;
        let q = Row::new(b, d, registers);
        q.each(b, d, |b, c| {
            let v = E::load_f32(pq.space, qo.clone() + qrow.clone() * q_rs.clone() + c.clone() * q_cs.clone());
            q.set(b, &c, v);
        });
        let acc = Row::new(b, dv, registers);
        acc.each(b, dv, |b, c| acc.set(b, &c, E::F32(0.0)));
        let max = b.var(E::F32(f32::NEG_INFINITY));
        let sum = b.var(E::F32(0.0));
        b.for_(first.clone(), end.clone(), E::I32(kt_len as i32), |b, k0| {
            let n = b.let_((end.clone() - k0.clone()).min(E::I32(kt_len as i32)));
            // Stage the tile's keys (kt is [d, sk]) and values ([sk, dv]).
            b.for_(t.clone(), E::I32((kt_len * d) as i32), E::I32(ROWS as i32), |b, e| {
                let (j, c) = (b.let_(e.clone() / E::I32(d as i32)), b.let_(e.clone() % E::I32(d as i32)));
                let addr = ko.clone() + c * k_rs.clone() + (k0.clone() + j.clone()) * k_cs.clone();
                b.if_else(
                    j.lt(n.clone()),
                    |b| b.store_shared(sk_tile, e.clone(), E::load_f32(pk.space, addr)),
                    |b| b.store_shared(sk_tile, e.clone(), E::F32(0.0)),
                );
            });
            b.for_(t.clone(), E::I32((kt_len * dv) as i32), E::I32(ROWS as i32), |b, e| {
                let (j, c) = (b.let_(e.clone() / E::I32(dv as i32)), b.let_(e.clone() % E::I32(dv as i32)));
                let addr = vo.clone() + (k0.clone() + j.clone()) * v_rs.clone() + c * v_cs.clone();
                b.if_else(
                    j.lt(n.clone()),
                    |b| b.store_shared(sv_tile, e.clone(), E::load_f32(pv.space, addr)),
                    |b| b.store_shared(sv_tile, e.clone(), E::F32(0.0)),
                );
            });
            b.barrier();
            let block_max = b.var(E::F32(f32::NEG_INFINITY));
            b.for_(E::I32(0), n.clone(), E::I32(1), |b, j| {
                let dot = b.var(E::F32(0.0));
                q.each(b, d, |b, c| {
                    let kv = E::LoadShared(sk_tile, Box::new(j.clone() * E::I32(d as i32) + c.clone()));
                    b.set(dot, E::fma(q.get(&c), kv, E::Var(dot)));
                });
                let mut s = b.let_(E::Var(dot) * scale.clone());
                if let Some(cap) = k.softcap {
                    let th = b.tanh(s / E::F32(cap));
                    s = b.let_(th * E::F32(cap));
                }
                if let Some(pm) = pm {
                    let addr = mo.clone() + qrow.clone() * m_rs.clone() + (k0.clone() + j.clone()) * m_cs.clone();
                    s = b.let_(s + E::load_f32(pm.space, addr));
                }
                b.store_local(scores, j, s.clone());
                b.set(block_max, E::Var(block_max).max(s));
            });
            let new_max = b.let_(E::Var(max).max(E::Var(block_max)));
            // Nothing but masked-out keys so far: no weight yet.
            b.if_(new_max.clone().ne(E::F32(f32::NEG_INFINITY)), |b| {
                let correction = b.let_((E::Var(max) - new_max.clone()).exp());
                b.set(sum, E::Var(sum) * correction.clone());
                acc.each(b, dv, |b, c| acc.set(b, &c, acc.get(&c) * correction.clone()));
                b.for_(E::I32(0), n.clone(), E::I32(1), |b, j| {
                    let p = b.let_((E::LoadLocal(scores, Box::new(j.clone())) - new_max.clone()).exp());
                    b.set(sum, E::Var(sum) + p.clone());
                    acc.each(b, dv, |b, c| {
                        let v = E::LoadShared(sv_tile, Box::new(j.clone() * E::I32(dv as i32) + c.clone()));
                        acc.set(b, &c, E::fma(p.clone(), v, acc.get(&c)));
                    });
                });
                b.set(max, new_max);
            });
            b.barrier();
        });
        b.if_(row.clone().lt(sq.clone()), |b| {
            let out = |c: &E| oo.clone() + row.clone() * out_rs.clone() + c.clone();
            let total = E::Var(sum);
            let nan = b.is_nan(total.clone());
            let bad = total.clone().eq(E::F32(0.0)).or(nan);
            b.if_else(
                bad,
                |b| {
                    // A row of NaN probabilities (every key masked out, or a
                    // NaN or infinite score): NaN, or under the exporters'
                    // guard zero probabilities times `v`, which is NaN in the
                    // columns holding a value that is not finite.
                    b.for_(E::I32(0), E::I32(dv as i32), E::I32(1), |b, c| {
                        if k.nan_to_zero {
                            // Tested on the bits: 0 * inf is folded to 0 on some drivers.
                            let bad = b.var(E::Bool(false));
                            b.for_(first.clone(), end.clone(), E::I32(1), |b, j| {
                                let v = E::load_f32(pv.space, vo.clone() + j * v_rs.clone() + c.clone() * v_cs.clone());
                                let non_finite = b.is_non_finite(v);
                                b.set(bad, E::Var(bad).or(non_finite));
                            });
                            b.store(po.space, out(&c), E::select(E::Var(bad), E::F32(f32::NAN), E::F32(0.0)));
                        } else {
                            b.store(po.space, out(&c), E::F32(f32::NAN));
                        }
                    });
                },
                |b| {
                    let inv = b.let_(E::F32(1.0) / total.clone());
                    acc.each(b, dv, |b, c| {
                        let v = acc.get(&c) * inv.clone();
                        b.store(po.space, out(&c), v);
                    });
                },
            );
        });
    });
    let name = format!(
        "attention_d{d}_dv{dv}{}{}{}",
        if k.mask.is_some() { "_masked" } else { "" },
        if k.softcap.is_some() { "_capped" } else { "" },
        if k.nan_to_zero { "_guarded" } else { "" }
    );
    let (kernel, params) = b.finish(name);
    (kernel, params, (k.batches.len() * blocks) as u64)
}
