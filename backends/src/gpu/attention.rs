//! Flash-style attention: a workgroup takes a block of query rows of one
//! batch. Each row is `split` invocations (lanes): a lane holds every
//! `split`-th column of the query row and of the output accumulator in
//! registers (every loop over them unrolled, at most `REGISTER_COLUMNS`
//! values a lane), so wide heads take more lanes rather than per-thread
//! arrays. Keys and values pass through workgroup memory `key_tile` keys at a time;
//! the lanes' partial scores meet in workgroup memory, and each lane folds
//! the tile into a running maximum, sum and its columns of the output (an
//! online softmax), so the score matrix never leaves the workgroup.

use super::builder::Builder;
use super::form::{Kernel, Space, Ty, Var, E};
use super::{Limits, Place};
use crate::plan::{known, known_size, AttentionKernel, BufferId};

/// Invocations per workgroup.
pub const THREADS: usize = 64;

/// Query and accumulator values one lane keeps in registers (d = dv = 64
/// in one lane takes 255 registers at sm_80, no spills). Per-thread arrays
/// indexed at run time would hold more, but GPUs keep them in local memory
/// and lavapipe computed wrong answers from them (d = dv = 128 over 256
/// keys), so wider heads split their columns over more lanes instead.
const REGISTER_COLUMNS: usize = 128;

/// The most lanes one query row takes (four rows a workgroup).
const MAX_SPLIT: usize = 16;

/// How a head of `d` key and `dv` value columns is laid out on a workgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Lanes per query row (a power of two).
    pub split: usize,
    /// Query rows per workgroup (`THREADS / split`).
    pub rows: usize,
    /// Keys staged in workgroup memory at a time.
    pub key_tile: usize,
    /// Columns of a staged key and value row, zero-padded to whole lanes.
    pub d_padded: usize,
    pub dv_padded: usize,
}

impl Shape {
    /// The layout for `d` and `dv` in `workgroup_bytes` of workgroup
    /// memory, or why there is none.
    pub fn new(d: usize, dv: usize, workgroup_bytes: usize) -> Result<Shape, String> {
        let per_lane = |split: usize| d.div_ceil(split) + dv.div_ceil(split);
        let split = (0..=MAX_SPLIT.trailing_zeros())
            .map(|p| 1 << p)
            .find(|&s| per_lane(s) <= REGISTER_COLUMNS)
            .ok_or_else(|| {
                format!(
                    "a head of {d} key and {dv} value columns is wider than the GPU attention kernel takes \
                     ({} columns in all)",
                    MAX_SPLIT * REGISTER_COLUMNS
                )
            })?;
        let (d_padded, dv_padded) = (d.div_ceil(split) * split, dv.div_ceil(split) * split);
        // Per key: its key and value rows, each invocation's score, and
        // each invocation's partial score when lanes share a row.
        let per_key = d_padded + dv_padded + THREADS + if split > 1 { THREADS } else { 0 };
        let key_tile = (workgroup_bytes / 4 / per_key).min(16);
        if key_tile == 0 {
            return Err(format!(
                "a head of {d} key and {dv} value columns needs {} bytes of workgroup memory for one key; \
                 the device has {workgroup_bytes}",
                per_key * 4
            ));
        }
        Ok(Shape { split, rows: THREADS / split, key_tile, d_padded, dv_padded })
    }
}

/// The attention kernel for `k`, or a clear error when its heads do not fit
/// the kernel (`limits`' workgroup memory, the lanes a row may take).
pub fn attention(
    k: &AttentionKernel,
    at: &dyn Fn(BufferId) -> Place,
    limits: &Limits,
) -> Result<(Kernel, Vec<u32>, u64), String> {
    let shape = Shape::new(k.d, k.dv, limits.max_workgroup_bytes)?;
    let Shape { split, rows, key_tile: kt_len, d_padded: dp, dv_padded: dvp } = shape;
    let mut b = Builder::new(THREADS as u32);
    let (d, dv) = (k.d, k.dv);
    let (pq, pk, pv, po) = (at(k.q), at(k.kt), at(k.v), at(k.out));
    let pm = k.mask.map(at);
    let sq_len = known_size(k.sq);
    let blocks = sq_len.div_ceil(rows);
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
                let rows = block * rows..((block + 1) * rows).min(sq_len);
                let per = k.blocks_per_batch();
                let plan_blocks = rows.start / k.block..rows.end.div_ceil(k.block);
                plan_blocks.map(|pb| spans[batch * per + pb]).fold((sk, 0), |(f, e), [a, z]| (f.min(a), e.max(z)))
            }
        };
        let first = first.min(end);
        [first as i64, end as i64]
    }));
    b.set_param(spans_at, spans as i64);

    let sk_tile = b.shared((kt_len * dp) as u32);
    let sv_tile = b.shared((kt_len * dvp) as u32);
    // Each invocation's partial score of each staged key, when lanes share a row.
    let partials = (split > 1).then(|| b.shared((THREADS * kt_len) as u32));
    // Each invocation's score of each staged key, key-major (consecutive
    // invocations, consecutive banks). In workgroup memory: a per-thread
    // array indexed at run time would live in local memory.
    let scores = b.shared((THREADS * kt_len) as u32);
    let group = b.group();
    let t = b.thread();
    // With one lane a row, columns are constants and rows are invocations.
    let lane = if split == 1 { E::I32(0) } else { b.let_(t.clone() % E::I32(split as i32)) };
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
        let row_in_group = if split == 1 { t.clone() } else { t.clone() / E::I32(split as i32) };
        let row = b.let_(group.clone() % blocks_p.clone() * E::I32(rows as i32) + row_in_group);
        // Invocations past the last row compute on the last one and store nothing.
        let qrow = b.let_(row.clone().min(sq.clone() - E::I32(1)));
        // Lane `l` holds columns l, l + split, l + 2 split, ...: `column(i)`.
        let column = |i: usize| {
            if split == 1 {
                E::I32(i as i32)
            } else {
                lane.clone() + E::I32((i * split) as i32)
            }
        };
        let q: Vec<Var> = (0..dp / split)
            .map(|i| {
                let row_at = qo.clone() + qrow.clone() * q_rs.clone();
                if dp == d {
                    return b.var(E::load_f32(pq.space, row_at + column(i) * q_cs.clone()));
                }
                // Padding columns are zero (read in bounds, then dropped).
                let c = b.let_(column(i));
                let addr = row_at + c.clone().min(E::I32(d as i32 - 1)) * q_cs.clone();
                b.var(E::select(c.lt(E::I32(d as i32)), E::load_f32(pq.space, addr), E::F32(0.0)))
            })
            .collect();
        let acc: Vec<Var> = (0..dvp / split).map(|_| b.var(E::F32(0.0))).collect();
        let max = b.var(E::F32(f32::NEG_INFINITY));
        let sum = b.var(E::F32(0.0));
        b.for_(first.clone(), end.clone(), E::I32(kt_len as i32), |b, k0| {
            let n = b.let_((end.clone() - k0.clone()).min(E::I32(kt_len as i32)));
            // Stage the tile's keys (kt is [d, sk]) and values ([sk, dv]),
            // zero past the keys and in the padding columns.
            let key_at = |j: E, c: E| ko.clone() + c * k_rs.clone() + (k0.clone() + j) * k_cs.clone();
            let value_at = |j: E, c: E| vo.clone() + (k0.clone() + j) * v_rs.clone() + c * v_cs.clone();
            let stages: [(_, _, _, _, &dyn Fn(E, E) -> E); 2] =
                [(sk_tile, pk.space, d, dp, &key_at), (sv_tile, pv.space, dv, dvp, &value_at)];
            for (tile, space, width, padded, addr) in stages {
                b.for_(t.clone(), E::I32((kt_len * padded) as i32), E::I32(THREADS as i32), |b, e| {
                    let (j, c) = (b.let_(e.clone() / E::I32(padded as i32)), b.let_(e.clone() % E::I32(padded as i32)));
                    let inside = j.clone().lt(n.clone());
                    let inside = if padded > width { inside.and(c.clone().lt(E::I32(width as i32))) } else { inside };
                    b.if_else(
                        inside,
                        |b| b.store_shared(tile, e.clone(), E::load_f32(space, addr(j.clone(), c.clone()))),
                        |b| b.store_shared(tile, e.clone(), E::F32(0.0)),
                    );
                });
            }
            b.barrier();
            // This lane's share of each key's score.
            let dot_of = |b: &mut Builder, j: &E| {
                let dot = b.var(E::F32(0.0));
                for (i, qi) in q.iter().enumerate() {
                    let kv = E::LoadShared(sk_tile, Box::new(j.clone() * E::I32(dp as i32) + column(i)));
                    b.set(dot, E::fma(E::Var(*qi), kv, E::Var(dot)));
                }
                E::Var(dot)
            };
            if let Some(partials) = partials {
                b.for_(E::I32(0), n.clone(), E::I32(1), |b, j| {
                    let dot = dot_of(b, &j);
                    // Key-major: a warp's stores fall in consecutive banks.
                    b.store_shared(partials, j * E::I32(THREADS as i32) + t.clone(), dot);
                });
                b.barrier();
            }
            let block_max = b.var(E::F32(f32::NEG_INFINITY));
            b.for_(E::I32(0), n.clone(), E::I32(1), |b, j| {
                let dot = match partials {
                    None => dot_of(b, &j),
                    Some(partials) => {
                        // Every lane of the row adds the lanes' shares in
                        // the same order, so all hold the same score.
                        let total = b.var(E::F32(0.0));
                        let first_lane = t.clone() - lane.clone();
                        for l in 0..split {
                            let at = j.clone() * E::I32(THREADS as i32) + first_lane.clone() + E::I32(l as i32);
                            b.set(total, E::Var(total) + E::LoadShared(partials, Box::new(at)));
                        }
                        E::Var(total)
                    }
                };
                let mut s = b.let_(dot * scale.clone());
                if let Some(cap) = k.softcap {
                    let th = b.tanh(s / E::F32(cap));
                    s = b.let_(th * E::F32(cap));
                }
                if let Some(pm) = pm {
                    let addr = mo.clone() + qrow.clone() * m_rs.clone() + (k0.clone() + j.clone()) * m_cs.clone();
                    s = b.let_(s + E::load_f32(pm.space, addr));
                }
                b.store_shared(scores, j * E::I32(THREADS as i32) + t.clone(), s.clone());
                b.set(block_max, E::Var(block_max).max(s));
            });
            let new_max = b.let_(E::Var(max).max(E::Var(block_max)));
            // Nothing but masked-out keys so far: no weight yet.
            b.if_(new_max.clone().ne(E::F32(f32::NEG_INFINITY)), |b| {
                let correction = b.let_((E::Var(max) - new_max.clone()).exp());
                b.set(sum, E::Var(sum) * correction.clone());
                for a in &acc {
                    b.set(*a, E::Var(*a) * correction.clone());
                }
                b.for_(E::I32(0), n.clone(), E::I32(1), |b, j| {
                    let score = E::LoadShared(scores, Box::new(j.clone() * E::I32(THREADS as i32) + t.clone()));
                    let p = b.let_((score - new_max.clone()).exp());
                    b.set(sum, E::Var(sum) + p.clone());
                    for (i, a) in acc.iter().enumerate() {
                        let v = E::LoadShared(sv_tile, Box::new(j.clone() * E::I32(dvp as i32) + column(i)));
                        b.set(*a, E::fma(p.clone(), v, E::Var(*a)));
                    }
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
                    b.for_(lane.clone(), E::I32(dv as i32), E::I32(split as i32), |b, c| {
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
                    for (i, a) in acc.iter().enumerate() {
                        let c = column(i);
                        let store = |b: &mut Builder| b.store(po.space, out(&c), E::Var(*a) * inv.clone());
                        if (i + 1) * split <= dv {
                            store(b);
                        } else {
                            b.if_(c.clone().lt(E::I32(dv as i32)), store);
                        }
                    }
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
    Ok((kernel, params, (k.batches.len() * blocks) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_heads_take_more_lanes_and_every_shape_fits_its_memory() {
        let bytes = Limits::default().max_workgroup_bytes;
        for (d, dv, split) in [
            (8, 8, 1),
            (64, 64, 1),
            (64, 32, 1),
            (80, 80, 2),
            (128, 128, 2),
            (256, 256, 4),
            (512, 512, 8),
            (1000, 1000, 16),
        ] {
            let s = Shape::new(d, dv, bytes).unwrap();
            assert_eq!(s.split, split, "d {d} dv {dv}");
            assert_eq!(s.rows * s.split, THREADS);
            assert!(s.d_padded / s.split + s.dv_padded / s.split <= REGISTER_COLUMNS);
            let partials = if s.split > 1 { THREADS } else { 0 };
            assert!(s.key_tile >= 1 && s.key_tile * (s.d_padded + s.dv_padded + THREADS + partials) * 4 <= bytes);
        }
    }

    #[test]
    fn heads_beyond_the_kernel_are_refused_with_the_reason() {
        let e = Shape::new(1100, 1100, 16_352).unwrap_err();
        assert!(e.contains("1100 key and 1100 value columns is wider"), "{e}");
        let e = Shape::new(128, 128, 1024).unwrap_err();
        assert!(e.contains("needs 1536 bytes of workgroup memory for one key"), "{e}");
        assert!(e.ends_with("the device has 1024"), "{e}");
    }
}
