//! A GEMM over a weight matrix packed at compile time: `c = a @ b` where
//! `b` is a constant that lowering laid out as panels of `NR` columns
//! (`pack_panels`), so no run ever repacks it (the GEMM library repacks its
//! operands on every call).
//!
//! The micro-kernel keeps an `MR x cols` tile of `c` in registers: with
//! AVX-512 two neighbouring panels wide (24 of the 32 vector registers),
//! with AVX2 half a panel (12 of 16), else one panel. Per step of `k` it
//! loads a row of the tile's columns of `b`, then broadcasts `MR` elements
//! of `a` and issues a fused multiply-add per accumulator. The AVX-512
//! tile loads each element of `a` once per 64 columns rather than per 32;
//! AVX2's half-panel tile ran 1.7x faster than a whole panel, whose 24
//! accumulators spilled. The kernel prefetches the next panels, a share
//! per row tile, and the rows of `c` the next tile stores: without that,
//! the first tile over each panel of a weight too big for the cache
//! (gpt2_small4's 8192-wide output projection) waited on memory.
//!
//! Panels are split across threads for big products; a fused epilogue runs
//! on the thread that computed its columns, a group of panels at a time.

use super::{madd, multiversion};

/// Rows of `c` per micro-tile.
pub const MR: usize = 6;
/// Columns per panel: two AVX-512 vectors.
pub const NR: usize = 32;

/// Panels per group: after each group the epilogue runs over its columns,
/// so it reads a product the same thread has just written (one
/// interpreted block of columns per group).
const GROUP: usize = super::epilogue::BLOCK / NR;

/// `c[m, n] = a[m, k] @ b` with `b` packed by `pack_panels`; `a` strided, `c`
/// row-major. A non-null `a_rows` gives each row of `a` as an element
/// offset from `a` instead (`a_rs` is then unused): the rows of a layout an
/// exporter permuted (a Swin window partition) are gathered here, once per
/// call, rather than copied by kernels of their own. A non-null `c_rows`
/// likewise gives where each row of the product goes in `c` (a window
/// reverse and roll back); every row of `c` must receive one. A non-null
/// `epilogue` (a program in the `epilogue` layout, with the kernel's
/// operand addresses `args`) is applied to `c` in place, after the rows
/// are placed.
///
/// # Safety
/// The buffers hold the matrices the arguments describe.
#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub unsafe extern "C" fn egret_sgemm_packed(
    m: i64,
    k: i64,
    n: i64,
    a: *const f32,
    a_rs: i64,
    a_cs: i64,
    b: *const f32,
    c: *mut f32,
    a_rows: *const i64,
    c_rows: *const i64,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let tile = TileShape::host();
    unsafe { sgemm_packed(m, k, n, a, a_rs, a_cs, a_rows, b, c, c_rows, tile, epilogue, args) }
}

/// `b` (`[k, n]`, element `(p, j)` at `offset + p * strides[0] + j *
/// strides[1]`) as panels of `width` columns (`NR` for this GEMM): for each
/// panel its `k` rows of `width` values, the last panel padded with zeros.
pub fn pack_panels(b: &[f32], offset: usize, strides: [usize; 2], k: usize, n: usize, width: usize) -> Vec<f32> {
    let panels = n.div_ceil(width);
    let mut out = vec![0f32; panels * k * width];
    for panel in 0..panels {
        for p in 0..k {
            for l in 0..width.min(n - panel * width) {
                out[(panel * k + p) * width + l] = b[offset + p * strides[0] + (panel * width + l) * strides[1]];
            }
        }
    }
    out
}

/// Half a panel's columns: the width of AVX2's tile.
const HALF: usize = NR / 2;

/// How many columns a tile spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileShape {
    /// Two neighbouring panels: 24 AVX-512 accumulators.
    TwoPanels,
    /// One panel: 12 AVX-512 accumulators, or what a baseline build has.
    OnePanel,
    /// Half a panel at a time: 12 AVX2 accumulators (a whole panel's 24
    /// would not fit AVX2's sixteen registers).
    HalfPanel,
}

impl TileShape {
    fn host() -> TileShape {
        match super::Isa::host() {
            super::Isa::Avx512 => TileShape::TwoPanels,
            super::Isa::Avx2 => TileShape::HalfPanel,
            super::Isa::Baseline => TileShape::OnePanel,
        }
    }

    fn columns(self) -> usize {
        match self {
            TileShape::TwoPanels => 2 * NR,
            TileShape::OnePanel => NR,
            TileShape::HalfPanel => HALF,
        }
    }
}

/// The register tile the packed GEMM uses on this host: rows by columns.
pub fn register_tile() -> (usize, usize) {
    (MR, TileShape::host().columns())
}

/// `egret_sgemm_packed` with the tile shape chosen.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_packed(
    m: i64,
    k: i64,
    n: i64,
    a: *const f32,
    a_rs: i64,
    a_cs: i64,
    a_rows: *const i64,
    b: *const f32,
    c: *mut f32,
    c_rows: *const i64,
    shape: TileShape,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let (m, k, n) = (m as usize, k as usize, n as usize);
    // Rows placed by a table are computed into this thread's scratch and
    // copied out after; the epilogue then runs on `c` as placed.
    let scattered = !c_rows.is_null();
    let mut product = if scattered { SCATTERED_C.take() } else { Vec::new() };
    let epilogue_after = if scattered { epilogue } else { std::ptr::null() };
    let (placed, c, epilogue) = if scattered {
        product.clear();
        product.resize(m * n, 0.0);
        (c, product.as_mut_ptr(), std::ptr::null())
    } else {
        (c, c, epilogue)
    };
    // Rows given by a table are gathered into this thread's scratch first,
    // once for all the threads, and read densely from there.
    let gathered = !a_rows.is_null();
    let mut scratch = if gathered { GATHERED_A.take() } else { Vec::new() };
    let (a, a_rs, a_cs) = if gathered {
        scratch.clear();
        scratch.reserve(m * k);
        for i in 0..m {
            let row = unsafe { a.offset(*a_rows.add(i) as isize) };
            scratch.extend((0..k).map(|p| unsafe { *row.offset(p as isize * a_cs as isize) }));
        }
        (scratch.as_ptr(), k as i64, 1)
    } else {
        (a, a_rs, a_cs)
    };
    let panels = n.div_ceil(NR);
    let threads = super::threads().min(panels);
    let (a_rs, a_cs) = (a_rs as isize, a_cs as isize);
    if threads > 1 && super::matmul_splits(m, k, n) {
        let (a, b, c, epilogue, args) = (a as usize, b as usize, c as usize, epilogue as usize, args as usize);
        rayon::scope(|s| {
            for t in 0..threads {
                s.spawn(move |_| unsafe {
                    panel_range(
                        m,
                        k,
                        n,
                        a as *const f32,
                        a_rs,
                        a_cs,
                        b as *const f32,
                        c as *mut f32,
                        panels * t / threads,
                        panels * (t + 1) / threads,
                        shape,
                        epilogue as *const i64,
                        args as *const *mut u8,
                    )
                });
            }
        });
    } else {
        unsafe { panel_range(m, k, n, a, a_rs, a_cs, b, c, 0, panels, shape, epilogue, args) };
    }
    if gathered {
        GATHERED_A.set(scratch);
    }
    if scattered {
        for (i, row) in product.chunks_exact(n.max(1)).enumerate().take(m) {
            let to = unsafe { placed.offset(*c_rows.add(i) as isize) };
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), to, n) };
        }
        SCATTERED_C.set(product);
        if !epilogue_after.is_null() {
            unsafe { super::epilogue::egret_epilogue(epilogue_after, args, placed) };
        }
    }
}

multiversion! {
    /// Panels `p0..p1` of the product in tiles of `shape`, and the
    /// epilogue over their columns.
    unsafe fn panel_range(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        a_rs: isize,
        a_cs: isize,
        b: *const f32,
        c: *mut f32,
        p0: usize,
        p1: usize,
        shape: TileShape,
        epilogue: *const i64,
        args: *const *mut u8,
    ) = panel_range_impl;
}

// Keep this body lean: with a row gather (and its scratch `Vec`) inside
// it, LLVM stored the tile's accumulators to the stack after every
// multiply-add, and the products ran 3x slower. `sgemm_packed` gathers.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn panel_range_impl<const FMA: bool>(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    c: *mut f32,
    p0: usize,
    p1: usize,
    shape: TileShape,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let mut g0 = p0;
    while g0 < p1 {
        let g1 = p1.min(g0 + GROUP);
        let mut panel = g0;
        while panel < g1 {
            let width = if shape == TileShape::TwoPanels && panel + 1 < g1 { 2 } else { 1 };
            let cols = (width * NR).min(n - panel * NR);
            let bp = unsafe { b.add(panel * k * NR) };
            // The panels the next tiles read, fetched a share per row tile.
            let next = panel + width;
            let next_len = if next < p1 { (p1 - next).min(width) * k * NR } else { 0 };
            let next_bp = unsafe { b.add(next * k * NR) };
            let row_tiles = m.div_ceil(MR);
            let mut i = 0;
            while i < m {
                let t = i / MR;
                prefetch(
                    unsafe { next_bp.add(next_len * t / row_tiles) },
                    next_len * (t + 1) / row_tiles - next_len * t / row_tiles,
                );
                let (ai, ci) = unsafe { (a.offset(i as isize * a_rs), c.add(i * n + panel * NR)) };
                let rows = MR.min(m - i);
                // The rows of `c` the next tile stores: a store that misses
                // the cache stalls the tile after it.
                if i + rows < m {
                    for r in i + rows..m.min(i + rows + MR) {
                        prefetch(unsafe { c.add(r * n + panel * NR) }, cols);
                    }
                }
                let tile = Tile { k, a: ai, a_rs, a_cs, b: bp, c: ci, ldc: n, cols };
                unsafe {
                    match (shape, width) {
                        (TileShape::TwoPanels, 2) => tile.rows::<2, NR, FMA>(rows),
                        (TileShape::HalfPanel, _) => {
                            tile.rows::<1, HALF, FMA>(rows);
                            if cols > HALF {
                                let rest = Tile { b: bp.add(HALF), c: ci.add(HALF), cols: cols - HALF, ..tile };
                                rest.rows::<1, HALF, FMA>(rows);
                            }
                        }
                        _ => tile.rows::<1, NR, FMA>(rows),
                    }
                }
                i += rows;
            }
            panel += width;
        }
        if !epilogue.is_null() {
            unsafe { super::epilogue::rows(epilogue, args, c, 0, m, g0 * NR, n.min(g1 * NR)) };
        }
        g0 = g1;
    }
}

thread_local! {
    /// Rows of `a` gathered through a row table (`egret_sgemm_packed`).
    static GATHERED_A: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The product of a call whose rows a table places (`egret_sgemm_packed`).
    static SCATTERED_C: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Asks for `len` floats from `at` to be brought into the cache.
#[inline(always)]
fn prefetch(at: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 16;
        let mut off = 0;
        while off < len {
            // A prefetch never faults; every range asked for lies inside `b` or `c` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off) as *const i8) };
            off += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, len);
}

/// Runs `$body` with `$r` bound to each row index below `$R` (at most
/// `MR`), unrolled by the macro rather than left to LLVM: the accumulators
/// stay in registers only if every index into them is a constant, and
/// whether LLVM unrolls a loop over the rows depends on its inlining
/// budget. With fat LTO it did not, kept the AVX-512 accumulators on the
/// stack, and the products ran 3x slower.
macro_rules! for_each_row {
    ($R:ident, $r:ident, $body:block) => {
        for_each_row!(@ $R, $r, $body, 0 1 2 3 4 5)
    };
    (@ $R:ident, $r:ident, $body:block, $($i:literal)*) => {
        $(
            if $i < $R {
                let $r: usize = $i;
                $body
            }
        )*
    };
}
const _: () = assert!(MR == 6, "for_each_row! unrolls MR rows");

/// One tile of `c`: rows of `a` from `a` (strided), panels of `b` from `b`
/// (each `k * NR` elements), `cols` columns of `c` stored from `c`.
#[derive(Clone, Copy)]
struct Tile {
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
}

impl Tile {
    /// The tile for `rows` (at most `MR`) rows.
    #[inline(always)]
    unsafe fn rows<const W: usize, const C: usize, const FMA: bool>(&self, rows: usize) {
        unsafe {
            match rows {
                6 => self.run::<6, W, C, FMA>(),
                5 => self.run::<5, W, C, FMA>(),
                4 => self.run::<4, W, C, FMA>(),
                3 => self.run::<3, W, C, FMA>(),
                2 => self.run::<2, W, C, FMA>(),
                _ => self.run::<1, W, C, FMA>(),
            }
        }
    }

    /// The `R x W*C` product, kept in registers until it is stored: `C`
    /// columns of each of `W` panels (`C` is `NR`, or half of it for a
    /// register file too small for a whole panel's row).
    #[inline(always)]
    unsafe fn run<const R: usize, const W: usize, const C: usize, const FMA: bool>(&self) {
        let mut acc = [[[0f32; C]; W]; R];
        let mut a_at = self.a;
        let mut b_at = self.b;
        let panel_len = self.k * NR;
        for _ in 0..self.k {
            let mut row = [[0f32; C]; W];
            for (w, row_w) in row.iter_mut().enumerate() {
                *row_w = unsafe { *(b_at.add(w * panel_len) as *const [f32; C]) };
            }
            for_each_row!(R, r, {
                let x = unsafe { *a_at.offset(r as isize * self.a_rs) };
                for (acc_rw, row_w) in acc[r].iter_mut().zip(&row) {
                    for l in 0..C {
                        acc_rw[l] = madd::<FMA>(x, row_w[l], acc_rw[l]);
                    }
                }
            });
            a_at = unsafe { a_at.offset(self.a_cs) };
            b_at = unsafe { b_at.add(NR) };
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (w, acc_rw) in acc_r.iter().enumerate() {
                let dst = unsafe { self.c.add(r * self.ldc + w * NR) };
                let cols = self.cols.saturating_sub(w * NR).min(C);
                if cols == C {
                    unsafe { *(dst as *mut [f32; C]) = *acc_rw };
                } else {
                    for (l, &v) in acc_rw[..cols].iter().enumerate() {
                        unsafe { *dst.add(l) = v };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(b: &[f32], offset: usize, strides: [usize; 2], k: usize, n: usize) -> Vec<f32> {
        pack_panels(b, offset, strides, k, n, NR)
    }

    #[test]
    fn packed_products_match_a_naive_product() {
        // One, two and three panels, whole and partial, and row counts past
        // a whole tile.
        for (m, k, n) in [(1, 1, 1), (7, 5, 33), (13, 64, 70), (6, 3, 32), (9, 17, 96), (20, 8, 64)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.25).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.5).collect();
            // b read transposed from storage [n, k], as Gemm with transB does.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            // `a` again with its rows stored in reverse, read through a row table.
            let reversed: Vec<f32> = (0..m).rev().flat_map(|i| a[i * k..(i + 1) * k].to_vec()).collect();
            let table: Vec<i64> = (0..m).map(|i| ((m - 1 - i) * k) as i64).collect();
            for ((packed, layout), shape, gathered, placed) in
                [(pack(&b, 0, [n, 1], k, n), "row-major"), (pack(&bt, 0, [1, k], k, n), "transposed")]
                    .into_iter()
                    .flat_map(|p| {
                        [TileShape::TwoPanels, TileShape::OnePanel, TileShape::HalfPanel].map(|s| (p.clone(), s))
                    })
                    .flat_map(|(p, s)| [(p.clone(), s, false), (p, s, true)])
                    .flat_map(|(p, s, g)| [(p.clone(), s, g, false), (p, s, g, true)])
            {
                let label = format!("{layout}, {shape:?}, rows of a gathered: {gathered}, of c placed: {placed}");
                // With `placed`, row `i` of the product goes to row `m - 1 - i`.
                let c_table: Vec<i64> = (0..m).map(|i| ((m - 1 - i) * n) as i64).collect();
                let c_rows = if placed { c_table.as_ptr() } else { std::ptr::null() };
                let (a_base, a_rows) =
                    if gathered { (reversed.as_ptr(), table.as_ptr()) } else { (a.as_ptr(), std::ptr::null()) };
                // Guard elements after `c` catch a tile that stores past a
                // partial panel's columns.
                const GUARD: usize = 64;
                let mut c = vec![f32::NAN; m * n + GUARD];
                unsafe {
                    sgemm_packed(
                        m as i64,
                        k as i64,
                        n as i64,
                        a_base,
                        k as i64,
                        1,
                        a_rows,
                        packed.as_ptr(),
                        c.as_mut_ptr(),
                        c_rows,
                        shape,
                        std::ptr::null(),
                        std::ptr::null(),
                    )
                };
                for i in 0..m {
                    let at = if placed { m - 1 - i } else { i };
                    for j in 0..n {
                        let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                        assert!(
                            (c[at * n + j] - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{label} {m}x{k}x{n} at ({i}, {j})"
                        );
                    }
                }
                assert!(c[m * n..].iter().all(|v| v.is_nan()), "{label} {m}x{k}x{n} stored past the end of c");
            }
        }
    }
}
