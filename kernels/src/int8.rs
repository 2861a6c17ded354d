//! Products of whole-number activations with int8 weights on AVX-512 VNNI.
//!
//! A dynamically quantized model (onnxruntime's `quantize_dynamic`)
//! multiplies activations rounded to 8-bit integers (`a_q - a_zero`, whole
//! numbers in a range of 256) by int8 weights (`w_q - w_zero`, scale 1),
//! then scales the product. Egret imports both as f32 (exact), and the
//! packed GEMM gets the weight as `Coding::Int8` panels. Here, per call,
//! the activations are checked to be whole numbers within a range of 256
//! and shifted into unsigned bytes (`a - lo`); `vpdpbusd` then multiplies
//! four unsigned bytes by four signed ones and adds them to each 32-bit
//! lane: four multiply-adds per lane where an f32 FMA does one. The shift
//! comes back out exactly: `sum (a - lo) w + lo * sum w`, the weight's
//! column sums stored in its panels. Sums are exact in i32 (at most
//! `k * 255 * 128`, under 2^31 for `k` below 65,000), so the product is
//! rounded once, to f32, where the f32 GEMM rounds at every step.
//!
//! Activations that are not whole numbers in such a range (a static
//! model's dequantized ones, say) take the f32 path over decoded panels.
//!
//! Hosts without VNNI (AVX2 only, as AMD's Zen 3, or `EGRET_KERNEL_ISA=avx2`)
//! take `vpmaddwd` over the same panels widened to 16 bits in registers
//! (`Path::Avx2`): `vpmaddubsw`, AVX2's byte product, adds its pairs into
//! saturating 16-bit sums, which 255 * 127 * 2 overflows (a known source
//! of wrong answers elsewhere), where a pair of 16-bit products summed into
//! 32 bits cannot. Both paths give the same exact sums.

use super::gemm::NR;

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

/// Rows of `a` (`m x k`, strided) as whole numbers `a - lo` in 0..=255,
/// each row padded to a multiple of 4 with zeros, into `out` as the path's
/// tiles read them (bytes for VNNI, 16-bit integers for AVX2); `lo`, or
/// `None` when some element is not a whole number or the elements span
/// more than 255 (or `lo` lies outside -255..=255, which keeps the sums in
/// i32).
///
/// # Safety
/// `a` holds the matrix its strides describe.
pub unsafe fn quantize_rows(
    path: Path,
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    out: &mut Vec<u32>,
) -> Option<i32> {
    if k > MAX_K {
        return None;
    }
    match path {
        Path::Vnni => unsafe { quantize_bytes(m, k, a, a_rs, a_cs, out) },
        Path::Avx2 => unsafe { quantize_wide(m, k, a, a_rs, a_cs, out) },
    }
}

/// The longest rows whose sums stay in i32: `k * 255 * 128` twice over
/// (the product, and `lo` times a column's sum).
const MAX_K: usize = 32768;

crate::multiversion! {
    /// `quantize_rows` into bytes, for rows of at most `MAX_K`.
    ///
    /// # Safety
    /// As `quantize_rows`.
    unsafe fn quantize_bytes(m: usize, k: usize, a: *const f32, a_rs: isize, a_cs: isize, out: &mut Vec<u32>) -> Option<i32> = quantize_bytes_impl;
}

crate::multiversion! {
    /// `quantize_rows` into 16-bit integers, for rows of at most `MAX_K`.
    ///
    /// # Safety
    /// As `quantize_rows`.
    unsafe fn quantize_wide(m: usize, k: usize, a: *const f32, a_rs: isize, a_cs: isize, out: &mut Vec<u32>) -> Option<i32> = quantize_wide_impl;
}

#[inline(always)]
unsafe fn quantize_bytes_impl<const FMA: bool>(
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    out: &mut Vec<u32>,
) -> Option<i32> {
    unsafe { quantize_impl::<u8>(m, k, a, a_rs, a_cs, out) }
}

#[inline(always)]
unsafe fn quantize_wide_impl<const FMA: bool>(
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    out: &mut Vec<u32>,
) -> Option<i32> {
    unsafe { quantize_impl::<i16>(m, k, a, a_rs, a_cs, out) }
}

/// An element type the tiles read activations in.
trait Code: Copy {
    fn of(byte: u8) -> Self;
}

impl Code for u8 {
    #[inline(always)]
    fn of(byte: u8) -> u8 {
        byte
    }
}

impl Code for i16 {
    #[inline(always)]
    fn of(byte: u8) -> i16 {
        byte as i16
    }
}

#[inline(always)]
unsafe fn quantize_impl<T: Code>(
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    out: &mut Vec<u32>,
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
    // Words, so the elements are aligned for either type.
    let bytes = m * lda * std::mem::size_of::<T>();
    out.clear();
    out.resize(bytes.div_ceil(4), 0);
    let codes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut T, m * lda) };
    for i in 0..m {
        let r = unsafe { std::slice::from_raw_parts(row(i, &mut copy), k) };
        for (o, &x) in codes[i * lda..i * lda + k].iter_mut().zip(r) {
            // A whole number in 0..=255 (checked above), so the
            // conversion without saturation (which vectorises) is exact.
            *o = T::of(unsafe { (x - lo).to_int_unchecked::<i32>() } as u8);
        }
    }
    Some(lo as i32)
}

/// Panels `p0..p1` of `c = a @ b` from activations `a_q` (`quantize_rows`
/// for `path`, shifted by `lo`) and int8 panels (`panels`, each
/// `panel_words` words: column sums, then groups of four rows), and the
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
    a_q: *const u32,
    lo: i32,
    panels: *const u32,
    panel_words: usize,
    c: *mut f32,
    p0: usize,
    p1: usize,
    group: usize,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    #[cfg(target_arch = "x86_64")]
    match path {
        Path::Vnni => unsafe {
            avx512::panel_range(m, k, n, a_q as *const u8, lo, panels, panel_words, c, p0, p1, group, epilogue, args)
        },
        Path::Avx2 => unsafe {
            avx2::panel_range(m, k, n, a_q as *const i16, lo, panels, panel_words, c, p0, p1, group, epilogue, args)
        },
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (path, m, k, n, a_q, lo, panels, panel_words, c, p0, p1, group, epilogue, args);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::NR;
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
        panels: *const u32,
        panel_words: usize,
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
                let b = unsafe { panels.add(panel * panel_words) };
                let mut i = 0;
                while i < m {
                    let rows = MR.min(m - i);
                    let a = unsafe { a_q.add(i * lda) };
                    let mut out = [[0i32; 2 * NR]; MR];
                    unsafe {
                        match (rows, width) {
                            (6, 2) => tile::<6, 2>(groups, a, lda, b, panel_words, &mut out),
                            (5, 2) => tile::<5, 2>(groups, a, lda, b, panel_words, &mut out),
                            (4, 2) => tile::<4, 2>(groups, a, lda, b, panel_words, &mut out),
                            (3, 2) => tile::<3, 2>(groups, a, lda, b, panel_words, &mut out),
                            (2, 2) => tile::<2, 2>(groups, a, lda, b, panel_words, &mut out),
                            (_, 2) => tile::<1, 2>(groups, a, lda, b, panel_words, &mut out),
                            (6, _) => tile::<6, 1>(groups, a, lda, b, panel_words, &mut out),
                            (5, _) => tile::<5, 1>(groups, a, lda, b, panel_words, &mut out),
                            (4, _) => tile::<4, 1>(groups, a, lda, b, panel_words, &mut out),
                            (3, _) => tile::<3, 1>(groups, a, lda, b, panel_words, &mut out),
                            (2, _) => tile::<2, 1>(groups, a, lda, b, panel_words, &mut out),
                            _ => tile::<1, 1>(groups, a, lda, b, panel_words, &mut out),
                        }
                    }
                    // Undo the shift with the column sums (exact in i32:
                    // `quantize_rows` bounds `k` and `lo`), round once to f32.
                    for w in 0..width {
                        let sums = unsafe { &*(b.add(w * panel_words) as *const [i32; NR]) };
                        let col0 = (panel + w) * NR;
                        let cols = NR.min(n.saturating_sub(col0));
                        for (r, row) in out.iter().enumerate().take(rows) {
                            let mut values = [0f32; NR];
                            for l in 0..NR {
                                values[l] = (row[w * NR + l] + lo * sums[l]) as f32;
                            }
                            let dst = unsafe { std::slice::from_raw_parts_mut(c.add((i + r) * n + col0), cols) };
                            dst.copy_from_slice(&values[..cols]);
                        }
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
    use super::NR;
    use std::arch::x86_64::*;

    /// Rows per tile: 6 rows of 8 columns, each row two vectors of four
    /// columns' pairs of sums, are 12 of the 16 registers; the two widened
    /// weight vectors, a broadcast row and a product the other four.
    const MR: usize = 6;

    /// Columns per tile: a quarter of a panel.
    const COLS: usize = 8;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn panel_range(
        m: usize,
        k: usize,
        n: usize,
        a_q: *const i16,
        lo: i32,
        panels: *const u32,
        panel_words: usize,
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
                let b = unsafe { panels.add(panel * panel_words) };
                for quarter in 0..NR / COLS {
                    let col0 = panel * NR + quarter * COLS;
                    if col0 >= n {
                        break;
                    }
                    let cols = COLS.min(n - col0);
                    let sums = unsafe { &*(b.add(quarter * COLS) as *const [i32; COLS]) };
                    let mut i = 0;
                    while i < m {
                        let rows = MR.min(m - i);
                        let a = unsafe { a_q.add(i * lda) };
                        let mut out = [[0i32; COLS]; MR];
                        unsafe {
                            match rows {
                                6 => tile::<6>(groups, a, lda, b, quarter, &mut out),
                                5 => tile::<5>(groups, a, lda, b, quarter, &mut out),
                                4 => tile::<4>(groups, a, lda, b, quarter, &mut out),
                                3 => tile::<3>(groups, a, lda, b, quarter, &mut out),
                                2 => tile::<2>(groups, a, lda, b, quarter, &mut out),
                                _ => tile::<1>(groups, a, lda, b, quarter, &mut out),
                            }
                        }
                        // Undo the shift with the column sums (exact in i32:
                        // `quantize_rows` bounds `k` and `lo`), round once to f32.
                        for (r, row) in out.iter().enumerate().take(rows) {
                            let mut values = [0f32; COLS];
                            for l in 0..COLS {
                                values[l] = (row[l] + lo * sums[l]) as f32;
                            }
                            let dst = unsafe { std::slice::from_raw_parts_mut(c.add((i + r) * n + col0), cols) };
                            dst.copy_from_slice(&values[..cols]);
                        }
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

    /// `R` rows by a quarter of a panel (8 columns) of the product, in
    /// 32-bit sums. Per group of four rows of `b`, its quarter's 32 bytes
    /// (each column's four rows) widen to two vectors of 16-bit integers;
    /// each row of `a` broadcasts its four 16-bit values, and `vpmaddwd`
    /// adds the products of each column's two pairs into two 32-bit lanes,
    /// which are summed once at the end.
    #[inline]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2")]
    unsafe fn tile<const R: usize>(
        groups: usize,
        a: *const i16,
        lda: usize,
        b: *const u32,
        quarter: usize,
        out: &mut [[i32; COLS]; MR],
    ) {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        // Past the column sums: groups of NR columns by 4 rows (NR words).
        let b = unsafe { (b.add(NR) as *const u8).add(quarter * COLS * 4) };
        for g in 0..groups {
            let at = unsafe { b.add(g * NR * 4) };
            let w0 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(at as *const __m128i) });
            let w1 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(at.add(16) as *const __m128i) });
            for r in 0..R {
                let x = unsafe { std::ptr::read_unaligned(a.add(r * lda + g * 4) as *const i64) };
                let x = _mm256_set1_epi64x(x);
                acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, w0));
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, w1));
            }
        }
        for r in 0..R {
            // Lanes hold each column's two pair sums: [c0 c0 c1 c1 c2 c2 c3
            // c3] and [c4 c4 ...]. Adding neighbours gives [c0 c1 c4 c5 | c2
            // c3 c6 c7]; the 64-bit swap puts the columns in order.
            let sums = _mm256_hadd_epi32(acc[r][0], acc[r][1]);
            let sums = _mm256_permute4x64_epi64::<0b11_01_10_00>(sums);
            unsafe { _mm256_storeu_si256(out[r].as_mut_ptr() as *mut __m256i, sums) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::{pack_int8_panels, HEADER_WORDS};

    /// `c = a @ w` on `path`, straight through `quantize_rows` and
    /// `panel_range` (every panel, no epilogue), or `None` where the
    /// activations are refused.
    fn product(path: Path, m: usize, k: usize, n: usize, a: &[f32], w: &[u32]) -> Option<Vec<f32>> {
        let mut q = Vec::new();
        let lo = unsafe { quantize_rows(path, m, k, a.as_ptr(), k as isize, 1, &mut q) }?;
        let words = NR + k.div_ceil(4) * NR;
        let panels = n.div_ceil(NR);
        // Guard elements after `c` catch a tile storing past the last column.
        let mut c = vec![f32::NAN; m * n + 64];
        let none = std::ptr::null();
        unsafe {
            let at = w.as_ptr().add(HEADER_WORDS);
            panel_range(path, m, k, n, q.as_ptr(), lo, at, words, c.as_mut_ptr(), 0, panels, 2, none, none as _)
        };
        assert!(c[m * n..].iter().all(|v| v.is_nan()), "{path:?} {m}x{k}x{n} stored past the end of c");
        c.truncate(m * n);
        Some(c)
    }

    #[test]
    fn every_path_sums_exactly() {
        // The extremes of both operands side by side: 255 by -128 and 127
        // in every pair (what `vpmaddubsw`'s 16-bit sums would saturate
        // on), and patterns across partial groups, quarters and panels.
        let paths = Path::all();
        if paths.is_empty() {
            eprintln!("skipping: this host runs no integer path (no AVX2)");
            return;
        }
        for (m, k, n) in [(1, 4, 1), (6, 8, 8), (7, 130, 96), (13, 33, 70), (5, 768, 40), (12, 3, 33), (20, 64, 9)] {
            let weights: [(&str, Box<dyn Fn(usize, usize) -> i8>); 3] = [
                ("-128", Box::new(|_, _| -128)),
                ("127", Box::new(|_, _| 127)),
                ("mixed", Box::new(|p, j| ((p * 31 + j * 17 + p / 3) % 256) as u8 as i8)),
            ];
            for (wname, w) in &weights {
                let packed = pack_int8_panels(w, k, n);
                for (aname, a) in [
                    ("255 and 0", (0..m * k).map(|i| if (i / 3) % 2 == 0 { 255.0 } else { 0.0 }).collect::<Vec<f32>>()),
                    ("0..=255", (0..m * k).map(|i| ((i * 37 + i / 5) % 256) as f32).collect()),
                    ("-255..=0", (0..m * k).map(|i| -(((i * 13) % 256) as f32)).collect()),
                    ("-128..=127", (0..m * k).map(|i| ((i * 37) % 256) as f32 - 128.0).collect()),
                ] {
                    let want: Vec<f32> = (0..m * n)
                        .map(|e| (0..k).map(|p| a[(e / n) * k + p] as i64 * w(p, e % n) as i64).sum::<i64>() as f32)
                        .collect();
                    for &path in &paths {
                        let got = product(path, m, k, n, &a, &packed).expect("whole numbers within 255");
                        assert_eq!(got, want, "{path:?} {m}x{k}x{n}, weights {wname}, activations {aname}");
                    }
                }
            }
        }
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
