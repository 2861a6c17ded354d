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

use super::gemm::NR;

/// Whether this host runs the VNNI products (and `EGRET_KERNEL_ISA` does
/// not cap it below AVX-512).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            super::Isa::host() == super::Isa::Avx512
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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
    const L: usize = super::LANES;
    let (mut los, mut his, mut fractions) = ([f32::INFINITY; L], [f32::NEG_INFINITY; L], [0f32; L]);
    for i in 0..m {
        let r = unsafe { std::slice::from_raw_parts(row(i, &mut copy), k) };
        let mut chunks = r.chunks_exact(L);
        for chunk in &mut chunks {
            for l in 0..L {
                let x = chunk[l];
                los[l] = if x < los[l] { x } else { los[l] };
                his[l] = if x > his[l] { x } else { his[l] };
                fractions[l] += (x - x.trunc()).abs();
            }
        }
        for (l, &x) in chunks.remainder().iter().enumerate() {
            los[l] = los[l].min(x);
            his[l] = his[l].max(x);
            fractions[l] += (x - x.trunc()).abs();
        }
    }
    let lo = los.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let hi = his.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let fraction: f32 = fractions.iter().sum();
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
/// column sums, then groups of four rows), and the epilogue over each
/// group of `group` panels' columns.
///
/// # Safety
/// The buffers hold what the arguments describe, and `available()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn panel_range(
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
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512::panel_range(m, k, n, a_q, lo, panels, panel_words, c, p0, p1, group, epilogue, args)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, k, n, a_q, lo, panels, panel_words, c, p0, p1, group, epilogue, args);
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
