//! Products the packed GEMM does not take (no constant weight to pack, or
//! too big for generated code), through the `gemm` crate.

/// `c[m, n] = a[m, k] @ b[k, n]`; `a` and `b` with the given row and column
/// strides (in elements), `c` row-major. Runs on the threads of the pool
/// it is called in (`crate::threads`).
///
/// # Safety
/// The three buffers hold these matrices.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn egret_sgemm(
    m: i64,
    k: i64,
    n: i64,
    a: *const f32,
    a_rs: i64,
    a_cs: i64,
    b: *const f32,
    b_rs: i64,
    b_cs: i64,
    c: *mut f32,
) {
    let (m, k, n) = (m as usize, k as usize, n as usize);
    let threads = crate::threads();
    // Splitting small products across threads costs more than it saves.
    let parallelism = if threads > 1 && m * n * k >= crate::MATMUL_PARALLEL_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            false,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
