//! Matrix products. A workgroup computes a `TILE x TILE` block of `c`; `a`
//! and `b` pass through workgroup memory `K_STEP` columns (rows) at a time,
//! with vector loads where the operands are unit-stride and aligned.
//! `matmul` multiplies with f32 FMA, 16 x 16 invocations each holding a
//! `4 x 4` register tile; `matmul_mma` on tensor cores, four warps each
//! computing a 32 x 32 quarter with m16n8k8 products. Both share the
//! parameters, the staging and the store with its epilogue. Sizes, strides
//! and per-batch offsets are parameters, so every product of a model with
//! the same epilogue (and alignment) shares one kernel.

use super::builder::Builder;
use super::form::{Kernel, Precision, Space, Ty, Var, E};
use super::Place;
use crate::plan::known_size;
use crate::plan::{BufferId, MatMulKernel};

pub const TILE: usize = 64;
pub const K_STEP: usize = 16;
/// Outputs per invocation along each axis of the FMA kernel.
const REG: usize = 4;
const SIDE: usize = TILE / REG;
pub const THREADS: u32 = (SIDE * SIDE) as u32;
/// Invocations of the tensor-core kernel: four warps, each computing a
/// 32 x 32 quarter of the tile as 2 x 4 m16n8k8 products.
pub const MMA_THREADS: u32 = 128;

/// The parameters and layout facts both kernels read.
struct Product {
    pa: Place,
    pb: Place,
    pc: Place,
    m: E,
    n: E,
    kk: E,
    a_strides: [E; 2],
    b_strides: [E; 2],
    tiles_n: E,
    tiles: E,
    batches: E,
    table: u32,
    /// Each epilogue operand: its space, base, row and column strides.
    epilogue: Vec<(Space, E, E, E)>,
    /// Whether rows of `a` (along k) and of `b` (along n) are unit-stride
    /// with every 4-word group aligned: loaded 4 words at a time.
    vector_a: bool,
    vector_b: bool,
}

/// The tile a workgroup computes and its batch's base addresses.
struct Tile {
    row0: E,
    col0: E,
    a: E,
    b: E,
    c: E,
}

impl Product {
    fn new(b: &mut Builder, k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place) -> Product {
        assert!(!k.b_packed && k.a_rows.is_none() && k.c_rows.is_none(), "GPU products come from a neutral plan");
        let (pa, pb, pc) = (at(k.a), at(k.b), at(k.c));
        // GPU plans are bound (`gpu::compile` checks).
        let (tiles_m, tiles_across) = (known_size(k.m).div_ceil(TILE), k.n.div_ceil(TILE));
        let aligned = |base: usize, offset: isize| (base as isize + offset) % 4 == 0;
        let vector_a =
            k.a_strides[1] == 1 && k.a_strides[0] % 4 == 0 && k.batches.iter().all(|o| aligned(pa.word, o[0]));
        let vector_b =
            k.b_strides[1] == 1 && k.b_strides[0] % 4 == 0 && k.batches.iter().all(|o| aligned(pb.word, o[1]));
        let m = b.param(known_size(k.m) as i64);
        let n = b.param(k.n as i64);
        let kk = b.param(k.k as i64);
        let a_strides = k.a_strides.map(|s| b.param(s as i64));
        let b_strides = k.b_strides.map(|s| b.param(s as i64));
        let tiles_n = b.param(tiles_across as i64);
        let tiles = b.param((tiles_m * tiles_across) as i64);
        let batches = b.param(k.batches.len() as i64);
        let epilogue = k
            .epilogue
            .iter()
            .flat_map(|e| &e.inputs)
            .map(|i| {
                let p = at(i.buffer);
                let base = b.param(p.word as i64 + i.offset as i64);
                (p.space, base, b.param(i.strides[0] as i64), b.param(i.strides[1] as i64))
            })
            .collect();
        let table =
            b.param_table(k.batches.iter().flat_map(|o| {
                [pa.word as i64 + o[0] as i64, pb.word as i64 + o[1] as i64, pc.word as i64 + o[2] as i64]
            }));
        Product {
            pa,
            pb,
            pc,
            m,
            n,
            kk,
            a_strides,
            b_strides,
            tiles_n,
            tiles,
            batches,
            table,
            epilogue,
            vector_a,
            vector_b,
        }
    }

    /// Runs `body` in the workgroups that have a tile (the whole workgroup
    /// takes the same branch, so barriers inside stay uniform).
    fn tiles(&self, b: &mut Builder, body: impl FnOnce(&mut Builder, &Tile)) {
        let group = b.group();
        let batch = b.let_(group.clone() / self.tiles.clone());
        b.if_(batch.clone().lt(self.batches.clone()), |b| {
            let tile = b.let_(group % self.tiles.clone());
            let row0 = b.let_(tile.clone() / self.tiles_n.clone() * E::I32(TILE as i32));
            let col0 = b.let_(tile % self.tiles_n.clone() * E::I32(TILE as i32));
            let table = self.table;
            let entry = |i: u32| {
                E::Load(Space::Params, Box::new(batch.clone() * E::I32(3) + E::I32((table + i) as i32))).bits(Ty::I32)
            };
            let (a, bb, c) = (b.let_(entry(0)), b.let_(entry(1)), b.let_(entry(2)));
            body(b, &Tile { row0, col0, a, b: bb, c });
        });
    }

    /// Stages the tile's `TILE x K_STEP` of `a` (k-major in `sa`) and
    /// `K_STEP x TILE` of `b` (row-major in `sb`) from row `k0`, zeros past
    /// the edges, where `layout` puts them; each invocation moves its share,
    /// 4 words at a time where the operand allows.
    fn stage(&self, b: &mut Builder, tile: &Tile, k0: &E, t: &E, [sa, sb]: [super::form::Shared; 2], layout: Layout) {
        let threads = b.threads() as usize;
        let width = |vector: bool| if vector { 4 } else { 1 };
        let [a_rs, a_cs] = self.a_strides.clone();
        let [b_rs, b_cs] = self.b_strides.clone();
        // a: consecutive invocations walk k (a's columns).
        let wa = width(self.vector_a);
        for i in 0..(TILE * K_STEP) / (threads * wa) {
            let e = b.let_((t.clone() + E::I32((i * threads) as i32)) * E::I32(wa as i32));
            let (r, c) = (b.let_(e.clone() / E::I32(K_STEP as i32)), b.let_(e % E::I32(K_STEP as i32)));
            let (gr, gc) = (b.let_(tile.row0.clone() + r.clone()), b.let_(k0.clone() + c.clone()));
            let addr = b.let_(tile.a.clone() + gr.clone() * a_rs.clone() + gc.clone() * a_cs.clone());
            let slot = |j: i32| layout.a(c.clone() + E::I32(j), r.clone());
            let limits = (gr.clone().lt(self.m.clone()), gc.clone(), self.kk.clone());
            self.stage_run(b, self.pa.space, &addr, &a_cs, wa, limits, sa, &slot);
        }
        // b: consecutive invocations walk n (b's columns).
        let wb = width(self.vector_b);
        for i in 0..(TILE * K_STEP) / (threads * wb) {
            let e = b.let_((t.clone() + E::I32((i * threads) as i32)) * E::I32(wb as i32));
            let (r, c) = (b.let_(e.clone() / E::I32(TILE as i32)), b.let_(e % E::I32(TILE as i32)));
            let (gr, gc) = (b.let_(k0.clone() + r.clone()), b.let_(tile.col0.clone() + c.clone()));
            let addr = b.let_(tile.b.clone() + gr.clone() * b_rs.clone() + gc.clone() * b_cs.clone());
            let slot = |j: i32| layout.b_staged(r.clone(), c.clone(), j);
            let limits = (gr.clone().lt(self.kk.clone()), gc.clone(), self.n.clone());
            self.stage_run(b, self.pb.space, &addr, &b_cs, wb, limits, sb, &slot);
        }
    }

    /// Moves `width` consecutive elements of one operand row into
    /// workgroup memory: `limits` is (the row is inside, the first
    /// element's index along the row, the row's length). A whole group
    /// inside is one vector load; otherwise each element is checked.
    #[allow(clippy::too_many_arguments)]
    fn stage_run(
        &self,
        b: &mut Builder,
        space: Space,
        addr: &E,
        stride: &E,
        width: usize,
        (row_inside, first, len): (E, E, E),
        shared: super::form::Shared,
        slot: &dyn Fn(i32) -> E,
    ) {
        let one = |b: &mut Builder, j: i32| {
            let inside = row_inside.clone().and((first.clone() + E::I32(j)).lt(len.clone()));
            let at = addr.clone() + E::I32(j) * stride.clone();
            b.if_else(
                inside,
                |b| b.store_shared(shared, slot(j), E::load_f32(space, at)),
                |b| b.store_shared(shared, slot(j), E::F32(0.0)),
            );
        };
        if width == 1 {
            return one(b, 0);
        }
        let whole = row_inside.clone().and((first.clone() + E::I32(width as i32 - 1)).lt(len.clone()));
        b.if_else(
            whole,
            |b| {
                let words = b.load4(space, addr.clone());
                for (j, w) in words.into_iter().enumerate() {
                    b.store_shared(shared, slot(j as i32), w.bits(Ty::F32));
                }
            },
            |b| (0..width as i32).for_each(|j| one(b, j)),
        );
    }

    /// Stores `value` at (`row`, `col`) of the product, through the
    /// epilogue, if inside.
    fn store(&self, b: &mut Builder, k: &MatMulKernel, tile: &Tile, row: E, col: E, value: E) {
        let inside = row.clone().lt(self.m.clone()).and(col.clone().lt(self.n.clone()));
        b.if_(inside, |b| {
            let value = match &k.epilogue {
                None => value,
                Some(e) => {
                    let reads: Vec<E> = self
                        .epilogue
                        .iter()
                        .map(|(space, off, s0, s1)| {
                            let addr = off.clone() + row.clone() * s0.clone() + col.clone() * s1.clone();
                            b.let_(E::load_f32(*space, addr))
                        })
                        .collect();
                    b.expr(&e.expr, &|i| if i == 0 { value.clone() } else { reads[i - 1].clone() })
                }
            };
            b.store(self.pc.space, tile.c.clone() + row * self.n.clone() + col, value);
        });
    }

    fn name(&self, base: &str, k: &MatMulKernel) -> String {
        format!(
            "{base}{}{}",
            if self.vector_a || self.vector_b { "_v4" } else { "" },
            if k.epilogue.is_some() { "_epilogue" } else { "" }
        )
    }
}

/// Where the staged tiles lie in workgroup memory: `a` k-major, `b`
/// row-major (k by n), in rows of `row` words, with a word skipped after
/// each 32 columns of `b` if `skip`. Bank conflicts on 32 banks of 4 bytes
/// are counted by the PTX interpreter
/// (`shared_memory_tiles_are_free_of_bank_conflicts`).
#[derive(Clone, Copy, Debug)]
struct Layout {
    row: usize,
    skip: bool,
}

impl Layout {
    /// The FMA kernel's, free of conflicts: rows of `TILE + 2` words, so
    /// that the invocations staging `a` (consecutive ones walk k, each a
    /// k-major row) and the two rows of `b` a warp stages fall in distinct
    /// banks, and a word skipped after 32 columns of `b`, so that the four
    /// words an invocation stores from one vector load (4 apart across the
    /// warp) do too.
    const FMA: Layout = Layout { row: TILE + 2, skip: true };
    /// The tensor-core kernel's: rows of `TILE + 4` words, which spread the
    /// m16n8k8 fragments' reads (lanes `4g + t` read row `t`, column `g`)
    /// over more banks than `TILE` does; the staging's stores and the tf32
    /// fragments still conflict (ldmatrix from a swizzled tile is the fix).
    const MMA: Layout = Layout { row: TILE + 4, skip: false };

    fn words(self) -> u32 {
        (K_STEP * self.row) as u32
    }

    /// The word of `a`'s element (`k`, `m`).
    fn a(self, k: E, m: E) -> E {
        k * E::I32(self.row as i32) + m
    }

    /// The word of `b`'s element (`k`, `n + j`) as staging stores it: `n`
    /// a multiple of 4 and `j` below 4, in the same 32 columns.
    fn b_staged(self, k: E, n: E, j: i32) -> E {
        let at = k * E::I32(self.row as i32) + n.clone() + E::I32(j);
        if self.skip {
            // `n` is not negative: a shift, not a signed division.
            at + E::Bin(super::form::BinOp::Shr, Box::new(n), Box::new(E::I32(5)))
        } else {
            at
        }
    }

    /// The word of `b`'s element (`k`, `lane + j`) as the kernels read it:
    /// with skipped words, `lane` below 16 and `j` a multiple of 16, so the
    /// skip is `j`'s alone (no division in the k-loop).
    fn b_read(self, k: E, lane: E, j: i32) -> E {
        let skip = if self.skip { j / 32 } else { 0 };
        k * E::I32(self.row as i32) + lane + E::I32(j + skip)
    }
}

fn groups(k: &MatMulKernel) -> u64 {
    (k.batches.len() * known_size(k.m).div_ceil(TILE) * k.n.div_ceil(TILE)) as u64
}

pub fn matmul(k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place) -> (Kernel, Vec<u32>, u64) {
    let mut b = Builder::new(THREADS);
    let p = Product::new(&mut b, k, at);
    let layout = Layout::FMA;
    let shared = [b.shared(layout.words()), b.shared(layout.words())];
    let t = b.thread();
    p.tiles(&mut b, |b, tile| {
        // An invocation's outputs are rows `ty + SIDE i` and columns
        // `tx + SIDE j`: a warp's reads of `b` are 16 consecutive words.
        let ty = b.let_(t.clone() / E::I32(SIDE as i32));
        let tx = b.let_(t.clone() % E::I32(SIDE as i32));
        let acc: Vec<Var> = (0..REG * REG).map(|_| b.var(E::F32(0.0))).collect();
        b.for_(E::I32(0), p.kk.clone(), E::I32(K_STEP as i32), |b, k0| {
            p.stage(b, tile, &k0, &t, shared, layout);
            b.barrier();
            b.for_(E::I32(0), E::I32(K_STEP as i32), E::I32(1), |b, kk| {
                let along = |lane: &E, i: usize| lane.clone() + E::I32((SIDE * i) as i32);
                let av: Vec<E> = (0..REG)
                    .map(|i| b.let_(E::LoadShared(shared[0], Box::new(layout.a(kk.clone(), along(&ty, i))))))
                    .collect();
                let bv: Vec<E> = (0..REG)
                    .map(|j| {
                        b.let_(E::LoadShared(
                            shared[1],
                            Box::new(layout.b_read(kk.clone(), tx.clone(), (SIDE * j) as i32)),
                        ))
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
            let r = b.let_(tile.row0.clone() + ty.clone() + E::I32((SIDE * i) as i32));
            for j in 0..REG {
                let c = b.let_(tile.col0.clone() + tx.clone() + E::I32((SIDE * j) as i32));
                p.store(b, k, tile, r.clone(), c, E::Var(acc[i * REG + j]));
            }
        }
    });
    let name = p.name("matmul_64x64", k);
    let (kernel, params) = b.finish(name);
    (kernel, params, groups(k))
}

/// The same product on tensor cores (`--precision tf32|bf16`): each warp
/// multiplies fragments of the staged tiles with `S::Mma`, accumulating
/// in f32.
pub fn matmul_mma(k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place, precision: Precision) -> (Kernel, Vec<u32>, u64) {
    assert!(precision != Precision::F32, "f32 products use `matmul`");
    let mut b = Builder::new(MMA_THREADS);
    let p = Product::new(&mut b, k, at);
    let layout = Layout::MMA;
    let shared = [b.shared(layout.words()), b.shared(layout.words())];
    let t = b.thread();
    p.tiles(&mut b, |b, tile| {
        // The warp's quarter of the tile, and the lane's place in the warp.
        let warp = b.let_(t.clone() / E::I32(32));
        let lane = b.let_(t.clone() % E::I32(32));
        let wrow = b.let_(warp.clone() / E::I32(2) * E::I32(32));
        let wcol = b.let_(warp % E::I32(2) * E::I32(32));
        let lane_group = b.let_(lane.clone() / E::I32(4));
        let member = b.let_(lane % E::I32(4));
        // Fragment coordinates are affine in the lane's group and member.
        let coord = |b: &mut Builder, f: &dyn Fn(u32, u32) -> (u32, u32)| {
            let ((r0, c0), (rg, cg), (rt, ct)) = (f(0, 0), f(1, 0), f(0, 1));
            let affine = |base: u32, g: u32, m: u32| {
                E::I32(base as i32)
                    + lane_group.clone() * E::I32(g as i32 - base as i32)
                    + member.clone() * E::I32(m as i32 - base as i32)
            };
            (b.let_(affine(r0, rg, rt)), b.let_(affine(c0, cg, ct)))
        };
        let a_at: Vec<(E, E)> = (0..4).map(|i| coord(b, &|g, m| precision.a_at(i, g, m))).collect();
        let b_at: Vec<(E, E)> = (0..2).map(|i| coord(b, &|g, m| precision.b_at(i, g, m))).collect();
        let c_at: Vec<(E, E)> = (0..4).map(|i| coord(b, &|g, m| Precision::c_at(i, g, m))).collect();
        // 2 x 4 products of m16n8 per warp, four accumulators each.
        let acc: Vec<[Var; 4]> = (0..8).map(|_| [0; 4].map(|_| b.var(E::F32(0.0)))).collect();
        b.for_(E::I32(0), p.kk.clone(), E::I32(K_STEP as i32), |b, k0| {
            p.stage(b, tile, &k0, &t, shared, layout);
            b.barrier();
            for ks in [0, 8] {
                let a_frags = [0, 1].map(|mt| {
                    [0, 1, 2, 3].map(|i| {
                        let (r, c) = &a_at[i];
                        let idx = layout.a(c.clone() + E::I32(ks), wrow.clone() + E::I32(16 * mt) + r.clone());
                        b.let_(E::LoadShared(shared[0], Box::new(idx)))
                    })
                });
                for nt in 0..4 {
                    let b_frag = [0, 1].map(|i| {
                        let (r, c) = &b_at[i];
                        let idx = layout.b_read(r.clone() + E::I32(ks), wcol.clone() + c.clone(), 8 * nt);
                        b.let_(E::LoadShared(shared[1], Box::new(idx)))
                    });
                    for (mt, a_frag) in a_frags.iter().enumerate() {
                        b.mma(precision, a_frag.clone(), b_frag.clone(), acc[mt * 4 + nt as usize]);
                    }
                }
            }
            b.barrier();
        });
        for mt in 0..2 {
            for nt in 0..4 {
                for (i, (r, c)) in c_at.iter().enumerate() {
                    let row = b.let_(tile.row0.clone() + wrow.clone() + E::I32(16 * mt) + r.clone());
                    let col = b.let_(tile.col0.clone() + wcol.clone() + E::I32(8 * nt) + c.clone());
                    p.store(b, k, tile, row, col, E::Var(acc[mt as usize * 4 + nt as usize][i]));
                }
            }
        }
    });
    let name = p.name(&format!("matmul_mma_{}", precision.name()), k);
    let (kernel, params) = b.finish(name);
    (kernel, params, groups(k))
}
