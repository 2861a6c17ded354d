//! Products of whole-number activations with int8 weights, as integers.
//!
//! A dynamically quantized model (onnxruntime's `quantize_dynamic`)
//! multiplies activations rounded to 8-bit integers (`a_q - a_zero`, whole
//! numbers in a range of 256) by int8 weights (`w_q - w_zero`, scale 1),
//! then scales the product. Egret imports both as f32 (exact), and the
//! packed GEMM gets the weight as `Coding::Int8` panels. Here, per call,
//! the activations are checked to be whole numbers within a range of 256
//! and shifted into unsigned bytes (`a - lo`). The shift comes back out
//! exactly: `sum (a - lo) w + lo * sum w`, the weight's column sums stored
//! in its panels. Sums are exact in i32 (at most `k * 255 * 128`, under
//! 2^31 for `k` below 65,000), so the product is rounded once, to f32,
//! where the f32 GEMM rounds at every step.
//!
//! Two paths (`Path`), over the same panels, with the same sums:
//! - AVX-512 VNNI's `vpdpbusd` multiplies four unsigned bytes by four
//!   signed ones and adds them to each 32-bit lane.
//! - AVX2 (AMD's Zen 3, Intel before Ice Lake, or `EGRET_KERNEL_ISA=avx2`):
//!   `vpmaddubsw` multiplies bytes and adds each two neighbouring products
//!   into 16 bits, then `vpmaddwd` by ones adds those pairs into 32. Its
//!   16-bit sums saturate where two weights of one sign sum past 128 in
//!   magnitude (255 * 129 > 32,767), the wrong answers onnxruntime's AVX2
//!   kernels are known for: the panels hold every such pair moved toward
//!   zero until it cannot, and each tile adds what was taken off (the
//!   weight's `Remainder`, a few entries) back in i32. Widening to 16 bits
//!   first (`vpmaddwd` alone, which cannot saturate) ran 1.4x slower.
//!
//! Activations that are not whole numbers in such a range (a static
//! model's dequantized ones, say), and hosts without AVX2, take the f32
//! path over decoded panels.

use super::gemm::{Remainder, NR};

/// How the integer products run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// AVX2's `vpmaddwd` over activations and weights widened to 16 bits.
    Avx2,
    /// AVX-512 VNNI's `vpdpbusd` over the bytes themselves.
    Vnni,
}

impl Path {
    /// The best path this host runs (within `EGRET_KERNEL_ISA`'s cap), if
    /// any: without AVX2 the int8 panels are decoded for the f32 tiles.
    pub fn host() -> Option<Path> {
        static HOST: std::sync::OnceLock<Option<Path>> = std::sync::OnceLock::new();
        *HOST.get_or_init(|| Path::all().last().copied())
    }

    /// Every path this host can run, narrowest first (the tests run each).
    pub fn all() -> Vec<Path> {
        let mut paths = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let isa = super::Isa::host();
            if isa >= super::Isa::Avx2 {
                paths.push(Path::Avx2);
            }
            if isa == super::Isa::Avx512
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                paths.push(Path::Vnni);
            }
        }
        paths
    }
}

/// Rows of `a` (`m x k`, strided) as unsigned bytes `a - lo`, each row
/// padded to a multiple of 4 with zeros, into `out`; `lo`, or `None` when
/// some element is not a whole number or the elements span more than 255
/// (or `lo` lies outside -255..=255, which keeps the sums in i32).
///
/// # Safety
/// `a` holds the matrix its strides describe.
pub unsafe fn quantize_rows(
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    out: &mut Vec<u8>,
) -> Option<i32> {
    if k > MAX_K {
        return None;
    }
    unsafe { quantize(m, k, a, a_rs, a_cs, out) }
}

/// The longest rows whose sums stay in i32: `k * 255 * 128` twice over
/// (the product, and `lo` times a column's sum).
const MAX_K: usize = 32768;

crate::multiversion! {
    /// `quantize_rows` for rows of at most `MAX_K`.
    ///
    /// # Safety
    /// As `quantize_rows`.
    unsafe fn quantize(m: usize, k: usize, a: *const f32, a_rs: isize, a_cs: isize, out: &mut Vec<u8>) -> Option<i32> = quantize_impl;
}

#[inline(always)]
unsafe fn quantize_impl<const FMA: bool>(
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    out: &mut Vec<u8>,
) -> Option<i32> {
    // Rows gathered contiguously first where `a` is strided along k.
    let mut copy = Vec::new();
    let row = |i: usize, copy: &mut Vec<f32>| -> *const f32 {
        let start = unsafe { a.offset(i as isize * a_rs) };
        if a_cs == 1 {
            return start;
        }
        copy.clear();
        copy.extend((0..k).map(|p| unsafe { *start.offset(p as isize * a_cs) }));
        copy.as_ptr()
    };
    // Per lane (LLVM keeps a float reduction in order, one element at a
    // time, unless the lanes are written out): the least and greatest
    // elements, and sums of absolute fractions, which any fraction makes
    // positive and a NaN or an infinity makes NaN.
    // The lanes are indexed by constants only (the tail has scalars of its
    // own), so they stay in registers: indexed by the tail's position, they
    // were kept on the stack and each step waited on the last one's store.
    const L: usize = super::LANES;
    let (mut los, mut his, mut fractions) = ([f32::INFINITY; L], [f32::NEG_INFINITY; L], [0f32; L]);
    let (mut lo, mut hi, mut fraction) = (f32::INFINITY, f32::NEG_INFINITY, 0f32);
    for i in 0..m {
        let r = unsafe { std::slice::from_raw_parts(row(i, &mut copy), k) };
        let mut chunks = r.chunks_exact(L);
        for chunk in &mut chunks {
            let x: &[f32; L] = chunk.try_into().expect("chunks of L");
            los = std::array::from_fn(|l| if x[l] < los[l] { x[l] } else { los[l] });
            his = std::array::from_fn(|l| if x[l] > his[l] { x[l] } else { his[l] });
            fractions = std::array::from_fn(|l| fractions[l] + (x[l] - x[l].trunc()).abs());
        }
        for &x in chunks.remainder() {
            lo = lo.min(x);
            hi = hi.max(x);
            fraction += (x - x.trunc()).abs();
        }
    }
    let lo = los.iter().fold(lo, |a, &b| a.min(b));
    let hi = his.iter().fold(hi, |a, &b| a.max(b));
    let fraction: f32 = fraction + fractions.iter().sum::<f32>();
    // (A NaN or an infinity made `fraction` NaN, so `hi - lo` is a number.)
    if fraction != 0.0 || hi - lo > 255.0 || !(-255.0..=255.0).contains(&lo) {
        return None;
    }
    let lda = k.div_ceil(4) * 4;
    out.clear();
    out.resize(m * lda, 0);
    for i in 0..m {
        let r = unsafe { std::slice::from_raw_parts(row(i, &mut copy), k) };
        for (o, &x) in out[i * lda..i * lda + k].iter_mut().zip(r) {
            // A whole number in 0..=255 (checked above), so the
            // conversion without saturation (which vectorises) is exact.
            *o = unsafe { (x - lo).to_int_unchecked::<i32>() } as u8;
        }
    }
    Some(lo as i32)
}

/// Panels `p0..p1` of `c = a @ b` from activations `a_q` (`quantize_rows`,
/// shifted by `lo`) and int8 panels (`panels`, each `panel_words` words:
/// column sums, then groups of four rows) with their `remainder`, and the
/// epilogue over each group of `group` panels' columns.
///
/// # Safety
/// The buffers hold what the arguments describe, and `path` is one of
/// `Path::all()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn panel_range(
    path: Path,
    m: usize,
    k: usize,
    n: usize,
    a_q: *const u8,
    lo: i32,
    panels: *const u32,
    panel_words: usize,
    remainder: Remainder,
    c: *mut f32,
    p0: usize,
    p1: usize,
    group: usize,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let b = Panels { at: panels, words: panel_words, remainder };
    #[cfg(target_arch = "x86_64")]
    match path {
        Path::Vnni => unsafe { avx512::panel_range(m, k, n, a_q, lo, b, c, p0, p1, group, epilogue, args) },
        Path::Avx2 => unsafe { avx2::panel_range(m, k, n, a_q, lo, b, c, p0, p1, group, epilogue, args) },
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (path, m, k, n, a_q, lo, b, c, p0, p1, group, epilogue, args);
}

/// An int8 weight as the tiles read it.
#[derive(Clone, Copy)]
struct Panels {
    at: *const u32,
    /// Words per panel.
    words: usize,
    remainder: Remainder,
}

/// Rows `i..i + rows` of a tile's 32-bit sums (`out`, each row `L` columns
/// from column `col0` of panel `panel`): the remainder's entries in those
/// columns added back, the shift undone with the column sums, rounded once
/// to f32 into `c`. Exact in i32: `quantize_rows` bounds `k` and `lo`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn finish<const L: usize>(
    out: &mut [[i32; L]],
    rows: usize,
    a: *const u8,
    lda: usize,
    lo: i32,
    b: Panels,
    panel: usize,
    col0: usize,
    c: *mut f32,
    i: usize,
    n: usize,
) {
    for (p, l, v) in b.remainder.of(panel) {
        if (col0..col0 + L).contains(&l) {
            for (r, row) in out.iter_mut().enumerate().take(rows) {
                row[l - col0] += unsafe { *a.add(r * lda + p) } as i32 * v;
            }
        }
    }
    let sums = unsafe { &*(b.at.add(panel * b.words + col0) as *const [i32; L]) };
    let cols = L.min(n.saturating_sub(panel * NR + col0));
    for (r, row) in out.iter().enumerate().take(rows) {
        let mut values = [0f32; L];
        for l in 0..L {
            values[l] = (row[l] + lo * sums[l]) as f32;
        }
        let dst = unsafe { std::slice::from_raw_parts_mut(c.add((i + r) * n + panel * NR + col0), cols) };
        dst.copy_from_slice(&values[..cols]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{finish, Panels, NR};
    use std::arch::x86_64::*;

    /// Rows per tile: 6 rows of two panels (4 vectors each) are 24 of the
    /// 32 registers, as in the f32 GEMM.
    const MR: usize = 6;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn panel_range(
        m: usize,
        k: usize,
        n: usize,
        a_q: *const u8,
        lo: i32,
        b: Panels,
        c: *mut f32,
        p0: usize,
        p1: usize,
        group: usize,
        epilogue: *const i64,
        args: *const *mut u8,
    ) {
        let groups = k.div_ceil(4);
        let lda = groups * 4;
        let mut g0 = p0;
        while g0 < p1 {
            let g1 = p1.min(g0 + group);
            let mut panel = g0;
            while panel < g1 {
                let width = if panel + 1 < g1 { 2 } else { 1 };
                let at = unsafe { b.at.add(panel * b.words) };
                let mut i = 0;
                while i < m {
                    let rows = MR.min(m - i);
                    let a = unsafe { a_q.add(i * lda) };
                    let mut out = [[0i32; 2 * NR]; MR];
                    unsafe {
                        match (rows, width) {
                            (6, 2) => tile::<6, 2>(groups, a, lda, at, b.words, &mut out),
                            (5, 2) => tile::<5, 2>(groups, a, lda, at, b.words, &mut out),
                            (4, 2) => tile::<4, 2>(groups, a, lda, at, b.words, &mut out),
                            (3, 2) => tile::<3, 2>(groups, a, lda, at, b.words, &mut out),
                            (2, 2) => tile::<2, 2>(groups, a, lda, at, b.words, &mut out),
                            (_, 2) => tile::<1, 2>(groups, a, lda, at, b.words, &mut out),
                            (6, _) => tile::<6, 1>(groups, a, lda, at, b.words, &mut out),
                            (5, _) => tile::<5, 1>(groups, a, lda, at, b.words, &mut out),
                            (4, _) => tile::<4, 1>(groups, a, lda, at, b.words, &mut out),
                            (3, _) => tile::<3, 1>(groups, a, lda, at, b.words, &mut out),
                            (2, _) => tile::<2, 1>(groups, a, lda, at, b.words, &mut out),
                            _ => tile::<1, 1>(groups, a, lda, at, b.words, &mut out),
                        }
                    }
                    for w in 0..width {
                        // This panel's columns of the tile's sums.
                        let mut sums: [[i32; NR]; MR] =
                            std::array::from_fn(|r| std::array::from_fn(|l| out[r][w * NR + l]));
                        unsafe { finish::<NR>(&mut sums, rows, a, lda, lo, b, panel + w, 0, c, i, n) };
                    }
                    i += rows;
                }
                panel += width;
            }
            if !epilogue.is_null() {
                unsafe { crate::epilogue::rows(epilogue, args, c, 0, m, g0 * NR, n.min(g1 * NR)) };
            }
            g0 = g1;
        }
    }

    /// `R` rows by `W` panels of the product, in 32-bit sums: per group of
    /// four rows of `b`, its `W * NR` columns (two vectors a panel) and,
    /// per row of `a`, its four bytes broadcast to every lane.
    #[inline]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize, const W: usize>(
        groups: usize,
        a: *const u8,
        lda: usize,
        b: *const u32,
        panel_words: usize,
        out: &mut [[i32; 2 * NR]; MR],
    ) {
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        // Past the column sums: groups of NR columns by 4 rows (NR words).
        let b = unsafe { b.add(NR) as *const u8 };
        for g in 0..groups {
            let mut w = [_mm512_setzero_si512(); 4];
            for (j, wj) in w.iter_mut().enumerate().take(2 * W) {
                let at = (j / 2) * panel_words * 4 + g * NR * 4 + (j % 2) * 64;
                *wj = unsafe { _mm512_loadu_si512(b.add(at) as *const __m512i) };
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = unsafe { std::ptr::read_unaligned(a.add(r * lda + g * 4) as *const i32) };
                let x = _mm512_set1_epi32(x);
                for j in 0..2 * W {
                    acc_r[j] = _mm512_dpbusd_epi32(acc_r[j], x, w[j]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for j in 0..2 * W {
                unsafe { _mm512_storeu_si512(out[r].as_mut_ptr().add(j * 16) as *mut __m512i, acc_r[j]) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{finish, Panels, NR};
    use std::arch::x86_64::*;

    /// Rows per tile: 5 rows of half a panel (two vectors each) are 10 of
    /// the 16 registers; the two weight vectors, a broadcast row, the ones
    /// and a product the rest. Six rows spilled an accumulator.
    const MR: usize = 5;

    /// Columns per tile: half a panel, two vectors of eight.
    const COLS: usize = NR / 2;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn panel_range(
        m: usize,
        k: usize,
        n: usize,
        a_q: *const u8,
        lo: i32,
        b: Panels,
        c: *mut f32,
        p0: usize,
        p1: usize,
        group: usize,
        epilogue: *const i64,
        args: *const *mut u8,
    ) {
        let groups = k.div_ceil(4);
        let lda = groups * 4;
        let mut g0 = p0;
        while g0 < p1 {
            let g1 = p1.min(g0 + group);
            for panel in g0..g1 {
                let at = unsafe { b.at.add(panel * b.words) };
                for half in 0..2 {
                    if panel * NR + half * COLS >= n {
                        break;
                    }
                    let mut i = 0;
                    while i < m {
                        let rows = MR.min(m - i);
                        let a = unsafe { a_q.add(i * lda) };
                        let mut out = [[0i32; COLS]; MR];
                        unsafe {
                            match rows {
                                5 => tile::<5>(groups, a, lda, at, half, &mut out),
                                4 => tile::<4>(groups, a, lda, at, half, &mut out),
                                3 => tile::<3>(groups, a, lda, at, half, &mut out),
                                2 => tile::<2>(groups, a, lda, at, half, &mut out),
                                _ => tile::<1>(groups, a, lda, at, half, &mut out),
                            }
                        }
                        unsafe { finish::<COLS>(&mut out, rows, a, lda, lo, b, panel, half * COLS, c, i, n) };
                        i += rows;
                    }
                }
            }
            if !epilogue.is_null() {
                unsafe { crate::epilogue::rows(epilogue, args, c, 0, m, g0 * NR, n.min(g1 * NR)) };
            }
            g0 = g1;
        }
    }

    /// `R` rows by half a panel (16 columns) of the product, in 32-bit
    /// sums. Per group of four rows of `b`, its half's 64 bytes (each
    /// column's four rows) in two vectors; each row of `a` broadcasts its
    /// four bytes, `vpmaddubsw` adds each column's two pairs of products
    /// into 16 bits (which the panels' pairs cannot saturate), and
    /// `vpmaddwd` by ones adds the pairs into the column's 32-bit lane.
    #[inline]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2")]
    unsafe fn tile<const R: usize>(
        groups: usize,
        a: *const u8,
        lda: usize,
        b: *const u32,
        half: usize,
        out: &mut [[i32; COLS]; MR],
    ) {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        let ones = _mm256_set1_epi16(1);
        // Past the column sums: groups of NR columns by 4 rows (NR words).
        let b = unsafe { (b.add(NR) as *const u8).add(half * COLS * 4) };
        for g in 0..groups {
            let at = unsafe { b.add(g * NR * 4) };
            let w0 = unsafe { _mm256_loadu_si256(at as *const __m256i) };
            let w1 = unsafe { _mm256_loadu_si256(at.add(32) as *const __m256i) };
            for r in 0..R {
                let x = unsafe { std::ptr::read_unaligned(a.add(r * lda + g * 4) as *const i32) };
                let x = _mm256_set1_epi32(x);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(x, w0), ones);
                acc[r][0] = _mm256_add_epi32(acc[r][0], p0);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(x, w1), ones);
                acc[r][1] = _mm256_add_epi32(acc[r][1], p1);
            }
        }
        for r in 0..R {
            unsafe { _mm256_storeu_si256(out[r].as_mut_ptr() as *mut __m256i, acc[r][0]) };
            unsafe { _mm256_storeu_si256(out[r].as_mut_ptr().add(8) as *mut __m256i, acc[r][1]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::{layout_of, pack_int8_panels, HEADER_WORDS};

    /// `c = a @ w` on `path`, straight through `quantize_rows` and
    /// `panel_range` (every panel, no epilogue), or `None` where the
    /// activations are refused.
    fn product(path: Path, m: usize, k: usize, n: usize, a: &[f32], w: &[u32]) -> Option<Vec<f32>> {
        let mut q = Vec::new();
        let lo = unsafe { quantize_rows(m, k, a.as_ptr(), k as isize, 1, &mut q) }?;
        let words = NR + k.div_ceil(4) * NR;
        let panels = n.div_ceil(NR);
        // Guard elements after `c` catch a tile storing past the last column.
        let mut c = vec![f32::NAN; m * n + 64];
        let none = std::ptr::null();
        unsafe {
            let (at, (rest, _)) = (w.as_ptr().add(HEADER_WORDS), layout_of(w.as_ptr()));
            panel_range(path, m, k, n, q.as_ptr(), lo, at, words, rest, c.as_mut_ptr(), 0, panels, 2, none, none as _)
        };
        assert!(c[m * n..].iter().all(|v| v.is_nan()), "{path:?} {m}x{k}x{n} stored past the end of c");
        c.truncate(m * n);
        Some(c)
    }

    #[test]
    fn every_path_sums_exactly() {
        // The extremes of both operands side by side: 255 by -128 and 127
        // (what `vpmaddubsw`'s 16-bit sums would saturate on), in every
        // pair (left as they are: AVX2 decodes them, the VNNI path runs
        // them), uniformly random bytes (the same), and small weights with
        // an extreme here and there (made safe, with a remainder, for both
        // paths); patterns across partial groups, halves and panels.
        let paths = Path::all();
        if paths.is_empty() {
            eprintln!("skipping: this host runs no integer path (no AVX2)");
            return;
        }
        let mut with_remainder = 0;
        for (m, k, n) in [(1, 4, 1), (6, 8, 8), (7, 130, 96), (13, 33, 70), (5, 768, 40), (12, 3, 33), (20, 64, 9)] {
            type Weight = Box<dyn Fn(usize, usize) -> i8>;
            let weights: [(&str, Weight); 4] = [
                ("-128", Box::new(|_, _| -128)),
                ("127", Box::new(|_, _| 127)),
                ("uniform", Box::new(|p, j| ((p * 31 + j * 17 + p / 3) % 256) as u8 as i8)),
                (
                    "sparse extremes",
                    Box::new(|p, j| match (p * 7 + j * 13) % 331 {
                        0 => 127,
                        1 => -128,
                        _ => ((p * 31 + j * 17) % 41) as i8 - 20,
                    }),
                ),
            ];
            for (wname, w) in &weights {
                let packed = pack_int8_panels(w, k, n);
                let (remainder, safe) = unsafe { layout_of(packed.as_ptr()) };
                if safe && (0..n.div_ceil(NR)).any(|panel| remainder.of(panel).next().is_some()) {
                    with_remainder += 1;
                }
                for (aname, a) in [
                    ("255 and 0", (0..m * k).map(|i| if (i / 3) % 2 == 0 { 255.0 } else { 0.0 }).collect::<Vec<f32>>()),
                    ("0..=255", (0..m * k).map(|i| ((i * 37 + i / 5) % 256) as f32).collect()),
                    ("-255..=0", (0..m * k).map(|i| -(((i * 13) % 256) as f32)).collect()),
                    ("-128..=127", (0..m * k).map(|i| ((i * 37) % 256) as f32 - 128.0).collect()),
                ] {
                    let want: Vec<f32> = (0..m * n)
                        .map(|e| (0..k).map(|p| a[(e / n) * k + p] as i64 * w(p, e % n) as i64).sum::<i64>() as f32)
                        .collect();
                    for &path in paths.iter().filter(|&&path| safe || path == Path::Vnni) {
                        let got = product(path, m, k, n, &a, &packed).expect("whole numbers within 255");
                        assert_eq!(got, want, "{path:?} {m}x{k}x{n}, weights {wname}, activations {aname}");
                    }
                }
            }
        }
        assert!(with_remainder >= 2, "only {with_remainder} weights made safe with a remainder");
    }

    #[test]
    fn activations_past_the_range_are_refused() {
        let packed = pack_int8_panels(|_, _| 1, 8, 4);
        for &path in &Path::all() {
            for a in [[0.0, 256.0], [0.5, 1.0], [f32::NAN, 1.0], [-300.0, -290.0]] {
                let a: Vec<f32> = a.iter().copied().cycle().take(16).collect();
                assert!(product(path, 2, 8, 4, &a, &packed).is_none(), "{path:?} took {a:?}");
            }
        }
    }
}
