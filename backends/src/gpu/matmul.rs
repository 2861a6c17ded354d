//! Matrix products. A workgroup computes a tile of `c`; `a` and `b` pass
//! through workgroup memory a depth of k at a time, with vector loads
//! where the operands are unit-stride and aligned. In f32: `matmul_wide`
//! (128 x 128 or 128 x 64 tiles, 8 x 8 outputs an invocation, 16-byte
//! reads of workgroup memory, double-buffered) where the product makes a
//! full wave of such tiles, else `matmul_64` (64 x 64, 16 x 16 invocations
//! each holding a `4 x 4` register tile). On tensor cores, 64 x 64 tiles
//! of four warps each computing a 32 x 32 quarter: `matmul_bf16` with
//! m16n8k16 products on operands staged as bf16 pairs and read by
//! `ldmatrix`, `matmul_mma` (tf32) with m16n8k8 ones on f32 staging. All
//! share the parameters, the staging's edge handling and the store with
//! its epilogue. Sizes, strides and per-batch offsets are parameters, so
//! every product of a model with the same epilogue (and alignment) shares
//! one kernel.

use super::builder::Builder;
use super::form::{Kernel, Precision, Shared, Space, Ty, Var, E};
use super::Limits;
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
/// 32 x 32 quarter of the tile as 2 x 4 products.
pub const MMA_THREADS: u32 = 128;

/// The parameters and layout facts every product kernel reads.
#[derive(Clone)]
struct Product {
    /// The rows and columns of `c` one workgroup computes.
    rows: usize,
    cols: usize,
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
    fn new(b: &mut Builder, k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place, [rows, cols]: [usize; 2]) -> Product {
        assert!(!k.b_packed && k.a_rows.is_none() && k.c_rows.is_none(), "GPU products come from a neutral plan");
        let (pa, pb, pc) = (at(k.a), at(k.b), at(k.c));
        // GPU plans are bound (`gpu::compile` checks).
        let (tiles_m, tiles_across) = (known_size(k.m).div_ceil(rows), k.n.div_ceil(cols));
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
            rows,
            cols,
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

    /// The same product with the sizes and strides read from the
    /// parameters once, into registers, where `b` is (a loop that reads
    /// them each step would load them each step: `ptxas` does not move a
    /// load across a barrier).
    fn hoisted(&self, b: &mut Builder) -> Product {
        let mut p = self.clone();
        for e in [&mut p.m, &mut p.n, &mut p.kk] {
            *e = b.let_(e.clone());
        }
        for e in p.a_strides.iter_mut().chain(p.b_strides.iter_mut()) {
            *e = b.let_(e.clone());
        }
        p
    }

    /// Runs `body` in the workgroups that have a tile (the whole workgroup
    /// takes the same branch, so barriers inside stay uniform).
    fn tiles(&self, b: &mut Builder, body: impl FnOnce(&mut Builder, &Tile)) {
        let group = b.group();
        let batch = b.let_(group.clone() / self.tiles.clone());
        b.if_(batch.clone().lt(self.batches.clone()), |b| {
            let tile = b.let_(group % self.tiles.clone());
            let row0 = b.let_(tile.clone() / self.tiles_n.clone() * E::I32(self.rows as i32));
            let col0 = b.let_(tile % self.tiles_n.clone() * E::I32(self.cols as i32));
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
    /// workgroup memory at `slot(j)`: `limits` is (the row is inside, the
    /// first element's index along the row, the row's length); loaded as
    /// `fetch_run` loads them.
    #[allow(clippy::too_many_arguments)]
    fn stage_run(
        &self,
        b: &mut Builder,
        space: Space,
        addr: &E,
        stride: &E,
        width: usize,
        limits: (E, E, E),
        shared: super::form::Shared,
        slot: &dyn Fn(i32) -> E,
    ) {
        let vars: Vec<Var> = (0..width).map(|_| b.var(E::F32(0.0))).collect();
        self.fetch_run(b, space, addr, stride, limits, &vars);
        for (j, v) in vars.iter().enumerate() {
            b.store_shared(shared, slot(j as i32), E::Var(*v));
        }
    }

    /// The runs of `a` and `b` this invocation moves each depth, `a`'s
    /// first, with what does not change from depth to depth computed
    /// once: where each starts in device memory at depth 0, whether its row
    /// of `a` (columns of `b`) lie inside, and where it goes in workgroup
    /// memory. Runs are 4 words wide where the operand allows (consecutive
    /// invocations walk a row of the staged operand), else one.
    fn wide_runs(&self, b: &mut Builder, tile: &Tile, t: &E, layout: WideLayout, threads: usize) -> Vec<WideRun> {
        let mut runs = vec![];
        for of_a in [true, false] {
            let width = if (of_a && self.vector_a) || (!of_a && self.vector_b) { 4 } else { 1 };
            let words = if of_a { layout.rows * WIDE_K } else { WIDE_K * layout.cols };
            // Runs across a row of the staged operand: k for `a`, n for `b`.
            let across = (if of_a { WIDE_K } else { layout.cols }) / width;
            for i in 0..words / threads / width {
                let e = b.let_(t.clone() + E::I32((i * threads) as i32));
                let outer = b.let_(e.clone() / E::I32(across as i32));
                let inner = b.let_(e % E::I32(across as i32) * E::I32(width as i32));
                let vars = (0..width).map(|_| b.var(E::F32(0.0))).collect();
                let run = if of_a {
                    // Row `outer` of the tile, k from `inner`.
                    let row = b.let_(tile.row0.clone() + outer.clone());
                    let [rs, cs] = self.a_strides.clone();
                    WideRun {
                        of_a,
                        vars,
                        start: b.let_(tile.a.clone() + row.clone() * rs + inner.clone() * cs),
                        along: inner.clone(),
                        inside: b.let_(row.lt(self.m.clone())),
                        shared: b.let_(inner * E::I32(layout.a_row() as i32) + outer),
                    }
                } else {
                    // Row k `outer`, columns from `inner` of the tile.
                    let col = b.let_(tile.col0.clone() + inner.clone());
                    let [rs, cs] = self.b_strides.clone();
                    WideRun {
                        of_a,
                        vars,
                        start: b.let_(tile.b.clone() + outer.clone() * rs + col.clone() * cs),
                        along: outer.clone(),
                        inside: col,
                        shared: b.let_(outer * E::I32(layout.cols as i32) + inner),
                    }
                };
                runs.push(run);
            }
        }
        runs
    }

    /// Loads the runs at depth `k0` into their registers (zeros past the
    /// edges), under `when` if given.
    fn fetch_wide(&self, b: &mut Builder, runs: &[WideRun], k0: &E, when: Option<&E>) {
        let load = |b: &mut Builder| {
            for run in runs {
                if run.of_a {
                    let [_, cs] = self.a_strides.clone();
                    let addr = b.let_(run.start.clone() + k0.clone() * cs.clone());
                    let first = b.let_(k0.clone() + run.along.clone());
                    let limits = (run.inside.clone(), first, self.kk.clone());
                    self.fetch_run(b, self.pa.space, &addr, &cs, limits, &run.vars);
                } else {
                    let [rs, cs] = self.b_strides.clone();
                    let addr = b.let_(run.start.clone() + k0.clone() * rs);
                    let row_inside = (k0.clone() + run.along.clone()).lt(self.kk.clone());
                    let limits = (row_inside, run.inside.clone(), self.n.clone());
                    self.fetch_run(b, self.pb.space, &addr, &cs, limits, &run.vars);
                }
            }
        };
        match when {
            Some(cond) => b.if_(cond.clone(), load),
            None => load(b),
        }
    }

    /// Sets `vars` to as many consecutive elements of an operand row
    /// (`limits` as `stage_run`'s), zeros past its edges: a whole group
    /// inside is one vector load, otherwise each element is checked.
    fn fetch_run(&self, b: &mut Builder, space: Space, addr: &E, stride: &E, limits: (E, E, E), vars: &[Var]) {
        let (row_inside, first, len) = limits;
        let width = vars.len();
        let one = |b: &mut Builder, j: usize| {
            let inside = row_inside.clone().and((first.clone() + E::I32(j as i32)).lt(len.clone()));
            let at = addr.clone() + E::I32(j as i32) * stride.clone();
            b.if_else(inside, |b| b.set(vars[j], E::load_f32(space, at)), |b| b.set(vars[j], E::F32(0.0)));
        };
        if width == 1 {
            return one(b, 0);
        }
        let whole = row_inside.clone().and((first.clone() + E::I32(width as i32 - 1)).lt(len.clone()));
        b.if_else(
            whole,
            |b| {
                let words = b.load4(space, addr.clone());
                for (v, w) in vars.iter().zip(words) {
                    b.set(*v, w.bits(Ty::F32));
                }
            },
            |b| (0..width).for_each(|j| one(b, j)),
        );
    }

    /// Sets `vars` (4 or 8) to consecutive elements of an operand row
    /// from `addr` (`limits` as `stage_run`'s), zeros past its edges:
    /// 4-word loads where the operand allows.
    fn fetch_along(
        &self,
        b: &mut Builder,
        space: Space,
        addr: &E,
        stride: &E,
        vector: bool,
        limits: (E, E, E),
        vars: &[Var],
    ) {
        let (inside, first, len) = limits;
        let width = if vector { 4 } else { 1 };
        for (j, part) in vars.chunks(width).enumerate() {
            let at = b.let_(addr.clone() + E::I32((j * width) as i32) * stride.clone());
            let from = first.clone() + E::I32((j * width) as i32);
            self.fetch_run(b, space, &at, stride, (inside.clone(), from, len.clone()), part);
        }
    }

    /// Stores the runs' registers into the buffers at word offsets
    /// `write` (`a`'s, `b`'s): `a` transposed a word at a time, `b` as it
    /// lies, 4 words at a time where it was loaded so.
    fn put_wide(&self, b: &mut Builder, runs: &[WideRun], layout: WideLayout, [sa, sb]: [Shared; 2], write: [E; 2]) {
        for run in runs {
            if run.of_a {
                for (j, v) in run.vars.iter().enumerate() {
                    let at = write[0].clone() + run.shared.clone() + E::I32((j * layout.a_row()) as i32);
                    b.store_shared(sa, at, E::Var(*v));
                }
            } else if run.vars.len() == 4 {
                let at = write[1].clone() + run.shared.clone();
                b.store_shared4(sb, at, [0, 1, 2, 3].map(|j| E::Var(run.vars[j])));
            } else {
                b.store_shared(sb, write[1].clone() + run.shared.clone(), E::Var(run.vars[0]));
            }
        }
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

/// The workgroups of a product in tiles of `rows x cols`.
fn groups(k: &MatMulKernel, [rows, cols]: [usize; 2]) -> u64 {
    (k.batches.len() * known_size(k.m).div_ceil(rows) * k.n.div_ceil(cols)) as u64
}

/// The f32 product of `k` in the largest tile that still gives the device
/// a full wave (`Limits::multiprocessors` workgroups) and fits its
/// workgroup memory: `WIDE` tiles (`matmul_wide`), else 64 x 64.
pub fn matmul(k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place, limits: &Limits) -> (Kernel, Vec<u32>, u64) {
    match wide_tile(k, limits) {
        Some(tile) => matmul_wide(k, at, tile),
        None => matmul_64(k, at),
    }
}

/// The block tiles of `matmul_wide`, largest first.
pub const WIDE: [[usize; 2]; 2] = [[128, 128], [128, 64]];
/// Outputs per invocation along each axis of the wide tiles, and the
/// depth of `a` and `b` staged at a time.
const WIDE_REG: usize = 8;
const WIDE_K: usize = 8;

/// The tile `matmul` gives `k` from `WIDE`, if any.
pub fn wide_tile(k: &MatMulKernel, limits: &Limits) -> Option<[usize; 2]> {
    WIDE.into_iter().find(|&tile| {
        groups(k, tile) >= limits.multiprocessors as u64 && WideLayout::new(tile).bytes() <= limits.max_workgroup_bytes
    })
}

/// Where `matmul_wide` stages its operands: two buffers each (one read
/// while the next is stored), `a` k-major in rows of `rows + 4` words, `b`
/// row-major in rows of `cols` words. Reads are 4 words an invocation, a
/// quarter warp's to one row of `a` (one address) and 32 consecutive words
/// of `b`; stores of `a` (transposed, one word at a time) meet 32 banks as
/// 16 rows by 2 groups of k 16 banks apart (4 (rows + 4) = 16 mod 32), `b`'s
/// are 4 words an invocation, consecutive: none conflicts
/// (`shared_memory_tiles_are_free_of_bank_conflicts`).
#[derive(Clone, Copy, Debug)]
struct WideLayout {
    rows: usize,
    cols: usize,
}

impl WideLayout {
    fn new([rows, cols]: [usize; 2]) -> WideLayout {
        WideLayout { rows, cols }
    }
    fn a_row(self) -> usize {
        self.rows + 4
    }
    fn a_words(self) -> usize {
        WIDE_K * self.a_row()
    }
    fn b_words(self) -> usize {
        WIDE_K * self.cols
    }
    fn bytes(self) -> usize {
        2 * 4 * (self.a_words() + self.b_words())
    }
}

/// One run of an operand an invocation of `matmul_wide` moves each
/// depth (`Product::wide_runs`).
struct WideRun {
    of_a: bool,
    /// Its registers: 4, or 1.
    vars: Vec<Var>,
    /// Its first element's word at depth 0.
    start: E,
    /// Its offset along the depth from the depth's start: k for `a`, the
    /// row for `b`.
    along: E,
    /// For `a`, whether its row is inside; for `b`, its first column.
    inside: E,
    /// Its first word in a buffer of workgroup memory.
    shared: E,
}

/// The product on `rows x cols` tiles (`WIDE`), each invocation computing
/// 8 x 8 outputs: rows `4 ty + i` and `rows / 2 + 4 ty + i`, columns
/// `4 tx + j` and `cols / 2 + 4 tx + j`, so that its operands are four
/// 16-byte reads of workgroup memory a step of k. `a` and `b` pass through
/// workgroup memory `WIDE_K` deep, double-buffered: the next depth's loads
/// from device memory are issued into registers before the current one's
/// arithmetic, and stored into the other buffer after it, one barrier a
/// step. The k-steps within a depth are unrolled.
fn matmul_wide(k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place, tile: [usize; 2]) -> (Kernel, Vec<u32>, u64) {
    let [rows, cols] = tile;
    let (across, down) = (cols / WIDE_REG, rows / WIDE_REG);
    let threads = across * down;
    let mut b = Builder::new(threads as u32);
    let p = Product::new(&mut b, k, at, tile);
    let layout = WideLayout::new(tile);
    let (sa, sb) = (b.shared(2 * layout.a_words() as u32), b.shared(2 * layout.b_words() as u32));
    let t = b.thread();
    p.tiles(&mut b, |b, tile| {
        let p = p.hoisted(b);
        let ty = b.let_(t.clone() / E::I32(across as i32));
        let tx = b.let_(t.clone() % E::I32(across as i32));
        let acc: Vec<Var> = (0..WIDE_REG * WIDE_REG).map(|_| b.var(E::F32(0.0))).collect();
        let runs = p.wide_runs(b, tile, &t, layout, threads);
        p.fetch_wide(b, &runs, &E::I32(0), None);
        p.put_wide(b, &runs, layout, [sa, sb], [E::I32(0), E::I32(0)]);
        b.barrier();
        // The word offsets of the buffer read and of the one written.
        let read_a = b.var(E::I32(0));
        let read_b = b.var(E::I32(0));
        let step = WIDE_K as i32;
        b.for_(E::I32(0), p.kk.clone(), E::I32(step), |b, k0| {
            let next = b.let_(k0.clone() + E::I32(step));
            let more = b.let_(next.clone().lt(p.kk.clone()));
            p.fetch_wide(b, &runs, &next, Some(&more));
            for kk in 0..WIDE_K as i32 {
                let a_at = |half: usize| {
                    E::Var(read_a)
                        + E::I32(kk * layout.a_row() as i32 + (half * rows / 2) as i32)
                        + ty.clone() * E::I32(4)
                };
                let b_at = |half: usize| {
                    E::Var(read_b) + E::I32(kk * cols as i32 + (half * cols / 2) as i32) + tx.clone() * E::I32(4)
                };
                let av: Vec<E> = (0..2).flat_map(|h| b.load_shared4(sa, a_at(h))).collect();
                let bv: Vec<E> = (0..2).flat_map(|h| b.load_shared4(sb, b_at(h))).collect();
                for (i, a) in av.iter().enumerate() {
                    for (j, bw) in bv.iter().enumerate() {
                        let c = acc[i * WIDE_REG + j];
                        b.set(c, E::fma(a.clone(), bw.clone(), E::Var(c)));
                    }
                }
            }
            b.if_(more, |b| {
                let write = [
                    E::I32(layout.a_words() as i32) - E::Var(read_a),
                    E::I32(layout.b_words() as i32) - E::Var(read_b),
                ];
                p.put_wide(b, &runs, layout, [sa, sb], write);
            });
            b.barrier();
            b.set(read_a, E::I32(layout.a_words() as i32) - E::Var(read_a));
            b.set(read_b, E::I32(layout.b_words() as i32) - E::Var(read_b));
        });
        for i in 0..WIDE_REG {
            let r = (i / 4) * rows / 2 + i % 4;
            let r = b.let_(tile.row0.clone() + ty.clone() * E::I32(4) + E::I32(r as i32));
            for j in 0..WIDE_REG {
                let c = (j / 4) * cols / 2 + j % 4;
                let c = b.let_(tile.col0.clone() + tx.clone() * E::I32(4) + E::I32(c as i32));
                p.store(b, k, tile, r.clone(), c, E::Var(acc[i * WIDE_REG + j]));
            }
        }
    });
    let name = p.name(&format!("matmul_{rows}x{cols}"), k);
    let (kernel, params) = b.finish(name);
    (kernel, params, groups(k, tile))
}

fn matmul_64(k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place) -> (Kernel, Vec<u32>, u64) {
    let mut b = Builder::new(THREADS);
    let p = Product::new(&mut b, k, at, [TILE, TILE]);
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
    (kernel, params, groups(k, [TILE, TILE]))
}

/// The same product on tensor cores (`--precision tf32|bf16`): `matmul_tc`.
pub fn matmul_mma(k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place, precision: Precision) -> (Kernel, Vec<u32>, u64) {
    assert!(precision != Precision::F32, "f32 products use `matmul`");
    matmul_tc(k, at, precision)
}

/// The depth of `a` and `b` `matmul_tc` stages at a time: two m16n8k16
/// steps in bf16, four m16n8k8 ones in tf32.
const TC_K: usize = 32;

/// Where `matmul_tc` keeps its staged operands: rows of 16-byte chunks
/// (8 bf16 as pairs, or 4 f32), each chunk's place in its row swizzled by
/// the row (`c ^ (r % 8)` in rows of 32 words, `c ^ (r / 2 % 4)` in rows of
/// 16), so that the eight rows an `ldmatrix` phase reads, and the chunks a
/// quarter warp stores, fall in distinct banks. `a` is row-major (rows of
/// the tile, along k); `b` row-major along n (rows of k) in bf16, which
/// `ldmatrix` transposes, and along k (rows of n) in tf32, whose 32-bit
/// values it cannot.
#[derive(Clone, Copy)]
struct TcLayout {
    bf16: bool,
}

impl TcLayout {
    /// Values in a chunk.
    fn per_chunk(self) -> usize {
        if self.bf16 {
            8
        } else {
            4
        }
    }
    /// Words in a row of `a` (of `b`: 32 either way).
    fn a_row(self) -> usize {
        TC_K * 4 / self.per_chunk()
    }
    fn a_words(self) -> usize {
        TILE * self.a_row()
    }
    fn b_words(self) -> usize {
        if self.bf16 {
            TC_K * 32
        } else {
            TILE * 32
        }
    }

    fn swizzled(row: E, chunk: E, row_words: usize) -> E {
        use super::form::BinOp::{And, Shr, Xor};
        let swizzle = if row_words == 32 {
            E::bin(And, row.clone(), E::I32(7))
        } else {
            E::bin(And, E::bin(Shr, row.clone(), E::I32(1)), E::I32(3))
        };
        row * E::I32(row_words as i32) + E::bin(Xor, chunk, swizzle) * E::I32(4)
    }

    /// The word of chunk `chunk` of row `row` of `a`.
    fn a(self, row: E, chunk: E) -> E {
        Self::swizzled(row, chunk, self.a_row())
    }

    /// The word of chunk `chunk` of row `row` of `b`.
    fn b(self, row: E, chunk: E) -> E {
        Self::swizzled(row, chunk, 32)
    }
}

/// The product on tensor cores (`--precision bf16|tf32`): 64 x 64 tiles,
/// four warps each computing a 32 x 32 quarter as 2 x 4 products of
/// m16n8k16 (bf16) or m16n8k8 (tf32). `a` and `b` are staged `TC_K` deep in
/// chunks of 16 bytes (bf16: 8 values rounded to pairs, from two 16-byte
/// loads; tf32: 4 values, `b`'s gathered down a column), double-buffered
/// like `matmul_wide`'s (the next depth's device loads issued before the
/// current one's products; tf32's `a`, where its rows are 16-byte
/// aligned, copied by `cp.async` with no registers between); the fragments
/// come out of workgroup memory by `ldmatrix` (bf16 `b` transposed by it).
/// Copying bf16 weights the same way needs them at their width on the
/// device, which they are not yet.
fn matmul_tc(k: &MatMulKernel, at: &dyn Fn(BufferId) -> Place, precision: Precision) -> (Kernel, Vec<u32>, u64) {
    let layout = TcLayout { bf16: precision == Precision::Bf16 };
    let per = layout.per_chunk();
    let mut b = Builder::new(MMA_THREADS);
    let p = Product::new(&mut b, k, at, [TILE, TILE]);
    let (sa, sb) = (b.shared(2 * layout.a_words() as u32), b.shared(2 * layout.b_words() as u32));
    let t = b.thread();
    p.tiles(&mut b, |b, tile| {
        let p = p.hoisted(b);
        let warp = b.let_(t.clone() / E::I32(32));
        let lane = b.let_(t.clone() % E::I32(32));
        let wrow = b.let_(warp.clone() / E::I32(2) * E::I32(32));
        let wcol = b.let_(warp % E::I32(2) * E::I32(32));
        let c_at: Vec<(E, E)> = (0..4)
            .map(|i| {
                let (g, m) = (lane.clone() / E::I32(4), lane.clone() % E::I32(4));
                let (r, c) = Precision::c_at(i, 0, 0);
                let (rg, cg) = Precision::c_at(i, 1, 0);
                let (rt, ct) = Precision::c_at(i, 0, 1);
                let row = E::I32(r as i32)
                    + g.clone() * E::I32(rg as i32 - r as i32)
                    + m.clone() * E::I32(rt as i32 - r as i32);
                let col = E::I32(c as i32) + g * E::I32(cg as i32 - c as i32) + m * E::I32(ct as i32 - c as i32);
                (b.let_(row), b.let_(col))
            })
            .collect();
        // Each invocation's chunks: of `a` (row, chunk along k), of `b`
        // (bf16: row of k, chunk along n; tf32: column n, chunk along k).
        let threads = MMA_THREADS as usize;
        let units = |b: &mut Builder, count: usize, outer_first: bool, across: usize| -> Vec<(E, E)> {
            (0..count / threads)
                .map(|i| {
                    let e = t.clone() + E::I32((i * threads) as i32);
                    let (q, r) = (e.clone() / E::I32(across as i32), e % E::I32(across as i32));
                    let (q, r) = (b.let_(q), b.let_(r));
                    if outer_first {
                        (q, r)
                    } else {
                        (r, q)
                    }
                })
                .collect()
        };
        let a_units = units(b, TILE * TC_K / per, true, TC_K / per);
        let b_units = if layout.bf16 {
            units(b, TC_K * TILE / per, true, TILE / per)
        } else {
            units(b, TC_K * TILE / per, false, TILE)
        };
        let vars = |b: &mut Builder, n: usize| -> Vec<Vec<Var>> {
            (0..n).map(|_| (0..per).map(|_| b.var(E::F32(0.0))).collect()).collect()
        };
        let (a_vars, b_vars) = (vars(b, a_units.len()), vars(b, b_units.len()));
        // tf32 stages `a` as it lies: 16-byte copies straight into the
        // buffer being filled (`cp.async`), where its rows allow them.
        let copy_a = !layout.bf16 && p.vector_a;
        let fetch = |b: &mut Builder, k0: &E, write_a: &E| {
            for ((row, chunk), vars) in a_units.iter().zip(&a_vars) {
                let gr = tile.row0.clone() + row.clone();
                let first = b.let_(k0.clone() + chunk.clone() * E::I32(per as i32));
                let [rs, cs] = p.a_strides.clone();
                let addr = b.let_(tile.a.clone() + gr.clone() * rs + first.clone() * cs.clone());
                let inside = b.let_(gr.lt(p.m.clone()));
                if copy_a {
                    // The words inside (zeros after), from a row inside.
                    let left = (p.kk.clone() - first.clone()).max(E::I32(0)).min(E::I32(per as i32));
                    let words = E::select(inside.clone(), left, E::I32(0));
                    let from = E::select(inside, addr, tile.a.clone());
                    let to = write_a.clone() + layout.a(row.clone(), chunk.clone());
                    b.copy_async(sa, to, p.pa.space, from, words);
                } else {
                    p.fetch_along(b, p.pa.space, &addr, &cs, p.vector_a, (inside, first, p.kk.clone()), vars);
                }
            }
            for ((row, chunk), vars) in b_units.iter().zip(&b_vars) {
                let [rs, cs] = p.b_strides.clone();
                if layout.bf16 {
                    // Row k, 8 columns n from the chunk's.
                    let gr = k0.clone() + row.clone();
                    let first = b.let_(tile.col0.clone() + chunk.clone() * E::I32(per as i32));
                    let addr = b.let_(tile.b.clone() + gr.clone() * rs + first.clone() * cs.clone());
                    let inside = b.let_(gr.lt(p.kk.clone()));
                    p.fetch_along(b, p.pb.space, &addr, &cs, p.vector_b, (inside, first, p.n.clone()), vars);
                } else {
                    // Column n, 4 rows k from the chunk's: one word each.
                    let gc = tile.col0.clone() + row.clone();
                    let first = b.let_(k0.clone() + chunk.clone() * E::I32(per as i32));
                    let addr = b.let_(tile.b.clone() + first.clone() * rs.clone() + gc.clone() * cs);
                    let inside = b.let_(gc.lt(p.n.clone()));
                    p.fetch_along(b, p.pb.space, &addr, &rs, false, (inside, first, p.kk.clone()), vars);
                }
            }
        };
        let put = |b: &mut Builder, write: [E; 2]| {
            let sides = [(&a_units, &a_vars, sa, &write[0], true), (&b_units, &b_vars, sb, &write[1], false)];
            for (units, vars, shared, to, of_a) in sides {
                if of_a && copy_a {
                    // Copied as it was fetched; here it lands.
                    b.copy_wait();
                    continue;
                }
                for ((row, chunk), vars) in units.iter().zip(vars) {
                    let words: [E; 4] = if layout.bf16 {
                        [0, 1, 2, 3].map(|j| b.pack_bf16(E::Var(vars[2 * j]), E::Var(vars[2 * j + 1])))
                    } else {
                        [0, 1, 2, 3].map(|j| E::Var(vars[j]))
                    };
                    let at =
                        if of_a { layout.a(row.clone(), chunk.clone()) } else { layout.b(row.clone(), chunk.clone()) };
                    if layout.bf16 {
                        let bits = words.map(|w| w.bits(Ty::F32));
                        b.store_shared4(shared, to.clone() + at, bits);
                    } else {
                        b.store_shared4(shared, to.clone() + at, words);
                    }
                }
            }
        };
        let acc: Vec<[Var; 4]> = (0..8).map(|_| [0; 4].map(|_| b.var(E::F32(0.0)))).collect();
        fetch(b, &E::I32(0), &E::I32(0));
        put(b, [E::I32(0), E::I32(0)]);
        b.barrier();
        let read_a = b.var(E::I32(0));
        let read_b = b.var(E::I32(0));
        // The lane's row in its `ldmatrix` matrices: lane 8i + j gives row j
        // of matrix i.
        let (matrix, row_in) = (b.let_(lane.clone() / E::I32(8)), b.let_(lane.clone() % E::I32(8)));
        let step = TC_K as i32;
        let depth = if layout.bf16 { 16 } else { 8 };
        b.for_(E::I32(0), p.kk.clone(), E::I32(step), |b, k0| {
            let next = b.let_(k0.clone() + E::I32(step));
            let more = b.let_(next.clone().lt(p.kk.clone()));
            let write_a = b.let_(E::I32(layout.a_words() as i32) - E::Var(read_a));
            b.if_(more.clone(), |b| fetch(b, &next, &write_a));
            for ks in 0..(TC_K / depth) as i32 {
                // A: matrices (rows 0-7, k lo), (rows 8-15, k lo), (rows
                // 0-7, k hi), (rows 8-15, k hi): the four registers of A.
                let a_frags = [0, 1].map(|mt| {
                    let row = wrow.clone() + E::I32(16 * mt) + matrix.clone() % E::I32(2) * E::I32(8) + row_in.clone();
                    let chunk = E::I32(2 * ks) + matrix.clone() / E::I32(2);
                    b.load_matrix(sa, E::Var(read_a) + layout.a(row, chunk), false)
                });
                for np in 0..2usize {
                    // B of two n8 tiles: (k lo, n), (k hi, n), (k lo, n +
                    // 8), (k hi, n + 8): b0, b1 of each.
                    let bf = if layout.bf16 {
                        let row = E::I32(16 * ks) + matrix.clone() % E::I32(2) * E::I32(8) + row_in.clone();
                        let chunk = (wcol.clone() + E::I32(16 * np as i32)) / E::I32(8) + matrix.clone() / E::I32(2);
                        b.load_matrix(sb, E::Var(read_b) + layout.b(row, chunk), true)
                    } else {
                        let row = wcol.clone()
                            + E::I32(16 * np as i32)
                            + matrix.clone() / E::I32(2) * E::I32(8)
                            + row_in.clone();
                        let chunk = E::I32(2 * ks) + matrix.clone() % E::I32(2);
                        b.load_matrix(sb, E::Var(read_b) + layout.b(row, chunk), false)
                    };
                    for (half, pair) in [[0, 1], [2, 3]].into_iter().enumerate() {
                        let nt = 2 * np + half;
                        for (mt, af) in a_frags.iter().enumerate() {
                            let bfrag = [bf[pair[0]].clone(), bf[pair[1]].clone()];
                            if layout.bf16 {
                                b.mma_bf16(af.clone(), bfrag, acc[mt * 4 + nt]);
                            } else {
                                let f = |x: &E| x.clone().bits(Ty::F32);
                                b.mma(Precision::Tf32, af.each_ref().map(f), bfrag.each_ref().map(f), acc[mt * 4 + nt]);
                            }
                        }
                    }
                }
            }
            b.if_(more, |b| {
                put(
                    b,
                    [
                        E::I32(layout.a_words() as i32) - E::Var(read_a),
                        E::I32(layout.b_words() as i32) - E::Var(read_b),
                    ],
                )
            });
            b.barrier();
            b.set(read_a, E::I32(layout.a_words() as i32) - E::Var(read_a));
            b.set(read_b, E::I32(layout.b_words() as i32) - E::Var(read_b));
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
    let name = p.name(&format!("matmul_mma_{}_ldsm", precision.name()), k);
    let (kernel, params) = b.finish(name);
    (kernel, params, groups(k, [TILE, TILE]))
}
