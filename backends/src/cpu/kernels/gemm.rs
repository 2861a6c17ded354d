//! A GEMM over a weight matrix packed at compile time: `c = a @ b` where
//! `b` is a constant that lowering laid out as panels of `NR` columns
//! (`plan::pack_panels`), so no run ever repacks it (the GEMM library repacks its
//! operands on every call).
//!
//! The micro-kernel keeps an `MR x NR` tile of `c` in registers (twelve
//! AVX-512 vectors): per step of `k` it loads one row of the panel, then
//! broadcasts `MR` elements of `a` and issues `2 * MR` fused multiply-adds.
//! Panels are split across threads for big products; a fused epilogue runs
//! on the thread that computed its columns, a group of panels at a time.

use super::{madd, multiversion};

/// Rows of `c` per micro-tile.
pub const MR: usize = 6;
/// Columns per panel (and per micro-tile): two AVX-512 vectors.
const NR: usize = crate::plan::PACKED_PANEL;

/// Panels per group: after each group the epilogue runs over its columns,
/// so it reads a product the same thread has just written (one
/// interpreted block of columns per group).
const GROUP: usize = super::epilogue::BLOCK / NR;

/// `c[m, n] = a[m, k] @ b` with `b` packed by `plan::pack_panels`; `a` strided, `c`
/// row-major. A non-null `epilogue` (a program from `epilogue::encode`, with
/// the kernel's operand addresses `args`) is applied to `c` in place.
///
/// # Safety
/// The buffers hold the matrices the arguments describe.
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn egret_sgemm_packed(
    m: i64,
    k: i64,
    n: i64,
    a: *const f32,
    a_rs: i64,
    a_cs: i64,
    b: *const f32,
    c: *mut f32,
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let (m, k, n) = (m as usize, k as usize, n as usize);
    let panels = n.div_ceil(NR);
    let threads = super::super::runtime_fns::threads().min(panels);
    let (a_rs, a_cs) = (a_rs as isize, a_cs as isize);
    if threads > 1 && m * n * k >= crate::cpu::MATMUL_PARALLEL_MACS {
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
                        epilogue as *const i64,
                        args as *const *mut u8,
                    )
                });
            }
        });
    } else {
        unsafe { panel_range(m, k, n, a, a_rs, a_cs, b, c, 0, panels, epilogue, args) };
    }
}

multiversion! {
    /// Panels `p0..p1` of the product, and the epilogue over their columns.
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
        epilogue: *const i64,
        args: *const *mut u8,
    ) = panel_range_impl;
}

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
    epilogue: *const i64,
    args: *const *mut u8,
) {
    let mut g0 = p0;
    while g0 < p1 {
        let g1 = p1.min(g0 + GROUP);
        for panel in g0..g1 {
            let cols = NR.min(n - panel * NR);
            let bp = unsafe { b.add(panel * k * NR) };
            let mut i = 0;
            while i < m {
                let (ai, ci) = unsafe { (a.offset(i as isize * a_rs), c.add(i * n + panel * NR)) };
                let rows = MR.min(m - i);
                unsafe {
                    match rows {
                        6 => tile::<6, FMA>(k, ai, a_rs, a_cs, bp, ci, n, cols),
                        5 => tile::<5, FMA>(k, ai, a_rs, a_cs, bp, ci, n, cols),
                        4 => tile::<4, FMA>(k, ai, a_rs, a_cs, bp, ci, n, cols),
                        3 => tile::<3, FMA>(k, ai, a_rs, a_cs, bp, ci, n, cols),
                        2 => tile::<2, FMA>(k, ai, a_rs, a_cs, bp, ci, n, cols),
                        _ => tile::<1, FMA>(k, ai, a_rs, a_cs, bp, ci, n, cols),
                    }
                }
                i += rows;
            }
        }
        if !epilogue.is_null() {
            unsafe { super::epilogue::rows(epilogue, args, c, 0, m, g0 * NR, n.min(g1 * NR)) };
        }
        g0 = g1;
    }
}

/// One `R x NR` tile of `c` (its first `cols` columns are stored).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<const R: usize, const FMA: bool>(
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    let mut acc = [[0f32; NR]; R];
    let mut a_at = a;
    let mut b_at = bp;
    for _ in 0..k {
        let row: [f32; NR] = unsafe { *(b_at as *const [f32; NR]) };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let x = unsafe { *a_at.offset(r as isize * a_rs) };
            for l in 0..NR {
                acc_r[l] = madd::<FMA>(x, row[l], acc_r[l]);
            }
        }
        a_at = unsafe { a_at.offset(a_cs) };
        b_at = unsafe { b_at.add(NR) };
    }
    for (r, acc_r) in acc.iter().enumerate() {
        let dst = unsafe { c.add(r * ldc) };
        if cols == NR {
            unsafe { *(dst as *mut [f32; NR]) = *acc_r };
        } else {
            for (l, &v) in acc_r[..cols].iter().enumerate() {
                unsafe { *dst.add(l) = v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::pack_panels;

    fn pack(b: &[f32], offset: usize, strides: [usize; 2], k: usize, n: usize) -> Vec<f32> {
        pack_panels(b, offset, strides, k, n, NR)
    }

    #[test]
    fn packed_products_match_a_naive_product() {
        for (m, k, n) in [(1, 1, 1), (7, 5, 33), (13, 64, 70), (6, 3, 32)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.25).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.5).collect();
            // b read transposed from storage [n, k], as Gemm with transB does.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (packed, label) in
                [(pack(&b, 0, [n, 1], k, n), "row-major"), (pack(&bt, 0, [1, k], k, n), "transposed")]
            {
                let mut c = vec![f32::NAN; m * n];
                unsafe {
                    egret_sgemm_packed(
                        m as i64,
                        k as i64,
                        n as i64,
                        a.as_ptr(),
                        k as i64,
                        1,
                        packed.as_ptr(),
                        c.as_mut_ptr(),
                        std::ptr::null(),
                        std::ptr::null(),
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                        assert!(
                            (c[i * n + j] - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{label} {m}x{k}x{n} at ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}
