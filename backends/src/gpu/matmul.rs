//! The tiled matmul: a workgroup computes a `TILE x TILE` block of `c`
//! with 16 x 16 invocations, each holding a `4 x 4` register tile; `a` and
//! `b` pass through workgroup memory `K_STEP` columns (rows) at a time.
//! Sizes, strides and per-batch offsets are parameters, so every product of
//! a model with the same epilogue shares one kernel.

use super::builder::Builder;
use super::form::{Kernel, Space, Ty, E};
use super::Place;
use crate::plan::{BufferId, MatMulKernel};

pub const TILE: usize = 64;
pub const K_STEP: usize = 16;
/// Outputs per invocation along each axis.
const REG: usize = 4;
const SIDE: usize = TILE / REG;
pub const THREADS: u32 = (SIDE * SIDE) as u32;

pub fn matmul(k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place) -> (Kernel, Vec<u32>, u64) {
    assert!(!k.b_packed && k.a_rows.is_none() && k.c_rows.is_none(), "GPU products come from a neutral plan");
    let mut b = Builder::new(THREADS);
    let (pa, pb, pc) = (at(k.a), at(k.b), at(k.c));
    let (tiles_m, tiles_n) = (k.m.div_ceil(TILE), k.n.div_ceil(TILE));
    let m = b.param(k.m as i64);
    let n = b.param(k.n as i64);
    let kk = b.param(k.k as i64);
    let [a_rs, a_cs] = k.a_strides.map(|s| b.param(s as i64));
    let [b_rs, b_cs] = k.b_strides.map(|s| b.param(s as i64));
    let tiles_n_p = b.param(tiles_n as i64);
    let tiles = b.param((tiles_m * tiles_n) as i64);
    let batches = b.param(k.batches.len() as i64);
    let epilogue: Vec<(Space, E, E, E)> = k
        .epilogue
        .iter()
        .flat_map(|e| &e.inputs)
        .map(|i| {
            let p = at(i.buffer);
            (
                p.space,
                b.param(p.word as i64 + i.offset as i64),
                b.param(i.strides[0] as i64),
                b.param(i.strides[1] as i64),
            )
        })
        .collect();
    let table = b.param_table(
        k.batches
            .iter()
            .flat_map(|o| [pa.word as i64 + o[0] as i64, pb.word as i64 + o[1] as i64, pc.word as i64 + o[2] as i64]),
    );

    let sa = b.shared((K_STEP * TILE) as u32);
    let sb = b.shared((K_STEP * TILE) as u32);
    let group = b.group();
    let t = b.thread();
    let batch = b.let_(group.clone() / tiles.clone());
    // The whole workgroup takes the same branch: barriers stay uniform.
    b.if_(batch.clone().lt(batches), |b| {
        let tile = b.let_(group % tiles);
        let row0 = b.let_(tile.clone() / tiles_n_p.clone() * E::I32(TILE as i32));
        let col0 = b.let_(tile % tiles_n_p * E::I32(TILE as i32));
        let entry = |i: u32| {
            E::Load(Space::Params, Box::new(batch.clone() * E::I32(3) + E::I32((table + i) as i32))).bits(Ty::I32)
        };
        let (ao, bo, co) = (b.let_(entry(0)), b.let_(entry(1)), b.let_(entry(2)));
        let ty = b.let_(t.clone() / E::I32(SIDE as i32));
        let tx = b.let_(t.clone() % E::I32(SIDE as i32));
        let acc: Vec<_> = (0..REG * REG).map(|_| b.var(E::F32(0.0))).collect();
        b.for_(E::I32(0), kk.clone(), E::I32(K_STEP as i32), |b, k0| {
            // Stage TILE x K_STEP of `a` (stored k-major) and K_STEP x TILE of
            // `b`; each invocation loads (TILE * K_STEP) / THREADS of each.
            for i in 0..(TILE * K_STEP) / THREADS as usize {
                let e = b.let_(t.clone() + E::I32((i as u32 * THREADS) as i32));
                // a: consecutive invocations walk k (a's columns).
                let (r, c) = (b.let_(e.clone() / E::I32(K_STEP as i32)), b.let_(e.clone() % E::I32(K_STEP as i32)));
                let (gr, gc) = (b.let_(row0.clone() + r.clone()), b.let_(k0.clone() + c.clone()));
                let inside = gr.clone().lt(m.clone()).and(gc.clone().lt(kk.clone()));
                let slot = c * E::I32(TILE as i32) + r;
                let addr = ao.clone() + gr * a_rs.clone() + gc * a_cs.clone();
                b.if_else(
                    inside,
                    |b| b.store_shared(sa, slot.clone(), E::load_f32(pa.space, addr)),
                    |b| b.store_shared(sa, slot.clone(), E::F32(0.0)),
                );
                // b: consecutive invocations walk n (b's columns).
                let (r, c) = (b.let_(e.clone() / E::I32(TILE as i32)), b.let_(e % E::I32(TILE as i32)));
                let (gr, gc) = (b.let_(k0.clone() + r.clone()), b.let_(col0.clone() + c.clone()));
                let inside = gr.clone().lt(kk.clone()).and(gc.clone().lt(n.clone()));
                let slot = r * E::I32(TILE as i32) + c;
                let addr = bo.clone() + gr * b_rs.clone() + gc * b_cs.clone();
                b.if_else(
                    inside,
                    |b| b.store_shared(sb, slot.clone(), E::load_f32(pb.space, addr)),
                    |b| b.store_shared(sb, slot.clone(), E::F32(0.0)),
                );
            }
            b.barrier();
            b.for_(E::I32(0), E::I32(K_STEP as i32), E::I32(1), |b, p| {
                let av: Vec<E> = (0..REG)
                    .map(|i| {
                        let idx = p.clone() * E::I32(TILE as i32) + ty.clone() * E::I32(REG as i32) + E::I32(i as i32);
                        b.let_(E::LoadShared(sa, Box::new(idx)))
                    })
                    .collect();
                let bv: Vec<E> = (0..REG)
                    .map(|j| {
                        let idx = p.clone() * E::I32(TILE as i32) + tx.clone() * E::I32(REG as i32) + E::I32(j as i32);
                        b.let_(E::LoadShared(sb, Box::new(idx)))
                    })
                    .collect();
                for i in 0..REG {
                    for j in 0..REG {
                        let a = acc[i * REG + j];
                        b.set(a, E::fma(av[i].clone(), bv[j].clone(), E::Var(a)));
                    }
                }
            });
            b.barrier();
        });
        for i in 0..REG {
            let r = b.let_(row0.clone() + ty.clone() * E::I32(REG as i32) + E::I32(i as i32));
            for j in 0..REG {
                let c = b.let_(col0.clone() + tx.clone() * E::I32(REG as i32) + E::I32(j as i32));
                let inside = r.clone().lt(m.clone()).and(c.clone().lt(n.clone()));
                let value = E::Var(acc[i * REG + j]);
                b.if_(inside, |b| {
                    let value = match &k.epilogue {
                        None => value,
                        Some(e) => {
                            let reads: Vec<E> = epilogue
                                .iter()
                                .map(|(space, off, s0, s1)| {
                                    let addr = off.clone() + r.clone() * s0.clone() + c.clone() * s1.clone();
                                    b.let_(E::load_f32(*space, addr))
                                })
                                .collect();
                            b.expr(&e.expr, &|i| if i == 0 { value.clone() } else { reads[i - 1].clone() })
                        }
                    };
                    b.store(pc.space, co.clone() + r.clone() * n.clone() + c.clone(), value);
                });
            }
        }
    });
    let name = if k.epilogue.is_some() { "matmul_64x64_epilogue" } else { "matmul_64x64" };
    let (kernel, params) = b.finish(name);
    (kernel, params, (k.batches.len() * tiles_m * tiles_n) as u64)
}

/// Invocations of the tensor-core matmul: four warps, each computing a
/// 32 x 32 quarter of the 64 x 64 tile as 2 x 4 m16n8k8 products.
pub const MMA_THREADS: u32 = 128;

/// The same product on tensor cores (`--precision tf32|bf16`): `a` and `b`
/// staged through workgroup memory as in `matmul`, each warp multiplying
/// fragments of them with `S::Mma`, f32 accumulation, the epilogue before
/// the store.
pub fn matmul_mma(
    k: &MatMulKernel,
    at: &dyn Fn(BufferId) -> Place,
    precision: super::form::Precision,
) -> (Kernel, Vec<u32>, u64) {
    use super::form::Precision;
    assert!(precision != Precision::F32, "f32 products use `matmul`");
    let mut b = Builder::new(MMA_THREADS);
    let (pa, pb, pc) = (at(k.a), at(k.b), at(k.c));
    let (tiles_m, tiles_n) = (k.m.div_ceil(TILE), k.n.div_ceil(TILE));
    let m = b.param(k.m as i64);
    let n = b.param(k.n as i64);
    let kk = b.param(k.k as i64);
    let [a_rs, a_cs] = k.a_strides.map(|s| b.param(s as i64));
    let [b_rs, b_cs] = k.b_strides.map(|s| b.param(s as i64));
    let tiles_n_p = b.param(tiles_n as i64);
    let tiles = b.param((tiles_m * tiles_n) as i64);
    let batches = b.param(k.batches.len() as i64);
    let epilogue: Vec<(Space, E, E, E)> = k
        .epilogue
        .iter()
        .flat_map(|e| &e.inputs)
        .map(|i| {
            let p = at(i.buffer);
            (
                p.space,
                b.param(p.word as i64 + i.offset as i64),
                b.param(i.strides[0] as i64),
                b.param(i.strides[1] as i64),
            )
        })
        .collect();
    let table = b.param_table(
        k.batches
            .iter()
            .flat_map(|o| [pa.word as i64 + o[0] as i64, pb.word as i64 + o[1] as i64, pc.word as i64 + o[2] as i64]),
    );
    let sa = b.shared((K_STEP * TILE) as u32);
    let sb = b.shared((K_STEP * TILE) as u32);
    let group = b.group();
    let t = b.thread();
    let batch = b.let_(group.clone() / tiles.clone());
    b.if_(batch.clone().lt(batches), |b| {
        let tile = b.let_(group % tiles);
        let row0 = b.let_(tile.clone() / tiles_n_p.clone() * E::I32(TILE as i32));
        let col0 = b.let_(tile % tiles_n_p * E::I32(TILE as i32));
        let entry = |i: u32| {
            E::Load(Space::Params, Box::new(batch.clone() * E::I32(3) + E::I32((table + i) as i32))).bits(Ty::I32)
        };
        let (ao, bo, co) = (b.let_(entry(0)), b.let_(entry(1)), b.let_(entry(2)));
        // The warp's quarter of the tile, and the lane's place in the warp.
        let warp = b.let_(t.clone() / E::I32(32));
        let lane = b.let_(t.clone() % E::I32(32));
        let wrow = b.let_(warp.clone() / E::I32(2) * E::I32(32));
        let wcol = b.let_(warp % E::I32(2) * E::I32(32));
        let lane_group = b.let_(lane.clone() / E::I32(4));
        let member = b.let_(lane % E::I32(4));
        // Fragment coordinates are affine in the lane's group and member:
        // (row, col) = at(i, 0, 0) + group * (at(i, 1, 0) - at(i, 0, 0)) + ...
        let coord = |b: &mut Builder, f: &dyn Fn(u32, u32) -> (u32, u32)| {
            let (r0, c0) = f(0, 0);
            let (rg, cg) = f(1, 0);
            let (rt, ct) = f(0, 1);
            let row = b.let_(
                E::I32(r0 as i32)
                    + lane_group.clone() * E::I32(rg as i32 - r0 as i32)
                    + member.clone() * E::I32(rt as i32 - r0 as i32),
            );
            let col = b.let_(
                E::I32(c0 as i32)
                    + lane_group.clone() * E::I32(cg as i32 - c0 as i32)
                    + member.clone() * E::I32(ct as i32 - c0 as i32),
            );
            (row, col)
        };
        let a_at: Vec<(E, E)> = (0..4).map(|i| coord(b, &|g, m| precision.a_at(i, g, m))).collect();
        let b_at: Vec<(E, E)> = (0..2).map(|i| coord(b, &|g, m| precision.b_at(i, g, m))).collect();
        let c_at: Vec<(E, E)> = (0..4).map(|i| coord(b, &|g, m| Precision::c_at(i, g, m))).collect();
        // 2 x 4 products of m16n8 per warp, four accumulators each.
        let acc: Vec<[super::form::Var; 4]> = (0..8).map(|_| [0; 4].map(|_| b.var(E::F32(0.0)))).collect();
        b.for_(E::I32(0), kk.clone(), E::I32(K_STEP as i32), |b, k0| {
            // Staged as in `matmul`: a k-major, b row-major.
            for i in 0..(TILE * K_STEP) / MMA_THREADS as usize {
                let e = b.let_(t.clone() + E::I32((i as u32 * MMA_THREADS) as i32));
                let (r, c) = (b.let_(e.clone() / E::I32(K_STEP as i32)), b.let_(e.clone() % E::I32(K_STEP as i32)));
                let (gr, gc) = (b.let_(row0.clone() + r.clone()), b.let_(k0.clone() + c.clone()));
                let inside = gr.clone().lt(m.clone()).and(gc.clone().lt(kk.clone()));
                let slot = c * E::I32(TILE as i32) + r;
                let addr = ao.clone() + gr * a_rs.clone() + gc * a_cs.clone();
                b.if_else(
                    inside,
                    |b| b.store_shared(sa, slot.clone(), E::load_f32(pa.space, addr)),
                    |b| b.store_shared(sa, slot.clone(), E::F32(0.0)),
                );
                let (r, c) = (b.let_(e.clone() / E::I32(TILE as i32)), b.let_(e % E::I32(TILE as i32)));
                let (gr, gc) = (b.let_(k0.clone() + r.clone()), b.let_(col0.clone() + c.clone()));
                let inside = gr.clone().lt(kk.clone()).and(gc.clone().lt(n.clone()));
                let slot = r * E::I32(TILE as i32) + c;
                let addr = bo.clone() + gr * b_rs.clone() + gc * b_cs.clone();
                b.if_else(
                    inside,
                    |b| b.store_shared(sb, slot.clone(), E::load_f32(pb.space, addr)),
                    |b| b.store_shared(sb, slot.clone(), E::F32(0.0)),
                );
            }
            b.barrier();
            for ks in [0, 8] {
                let a_frag = |b: &mut Builder, mt: i32| -> [E; 4] {
                    [0, 1, 2, 3].map(|i| {
                        let (r, c) = &a_at[i];
                        let idx =
                            (c.clone() + E::I32(ks)) * E::I32(TILE as i32) + wrow.clone() + E::I32(16 * mt) + r.clone();
                        b.let_(E::LoadShared(sa, Box::new(idx)))
                    })
                };
                let b_frag = |b: &mut Builder, nt: i32| -> [E; 2] {
                    [0, 1].map(|i| {
                        let (r, c) = &b_at[i];
                        let idx =
                            (r.clone() + E::I32(ks)) * E::I32(TILE as i32) + wcol.clone() + E::I32(8 * nt) + c.clone();
                        b.let_(E::LoadShared(sb, Box::new(idx)))
                    })
                };
                let a_frags = [a_frag(b, 0), a_frag(b, 1)];
                for nt in 0..4 {
                    let bf = b_frag(b, nt);
                    for (mt, af) in a_frags.iter().enumerate() {
                        b.mma(precision, af.clone(), bf.clone(), acc[mt * 4 + nt as usize]);
                    }
                }
            }
            b.barrier();
        });
        for mt in 0..2 {
            for nt in 0..4 {
                for (i, (r, c)) in c_at.iter().enumerate() {
                    let row = b.let_(row0.clone() + wrow.clone() + E::I32(16 * mt) + r.clone());
                    let col = b.let_(col0.clone() + wcol.clone() + E::I32(8 * nt) + c.clone());
                    let inside = row.clone().lt(m.clone()).and(col.clone().lt(n.clone()));
                    let value = E::Var(acc[mt as usize * 4 + nt as usize][i]);
                    b.if_(inside, |b| {
                        let value = match &k.epilogue {
                            None => value,
                            Some(e) => {
                                let reads: Vec<E> = epilogue
                                    .iter()
                                    .map(|(space, off, s0, s1)| {
                                        let addr = off.clone() + row.clone() * s0.clone() + col.clone() * s1.clone();
                                        b.let_(E::load_f32(*space, addr))
                                    })
                                    .collect();
                                b.expr(&e.expr, &|i| if i == 0 { value.clone() } else { reads[i - 1].clone() })
                            }
                        };
                        b.store(pc.space, co.clone() + row.clone() * n.clone() + col.clone(), value);
                    });
                }
            }
        }
    });
    let name = format!("matmul_mma_{}{}", precision.name(), if k.epilogue.is_some() { "_epilogue" } else { "" });
    let (kernel, params) = b.finish(name);
    (kernel, params, (k.batches.len() * tiles_m * tiles_n) as u64)
}
