//! The packed GEMM at transformer shapes, one thread, straight through the
//! kernel library (no compiler in the loop, so it builds in a minute):
//! GFLOP/s per shape, the median of repeated calls, on the path
//! `EGRET_KERNEL_ISA` leaves. A quick look while working on the kernel;
//! the numbers BENCHMARKS.md records come from `cargo bench --bench
//! matmul` (`tools/gemm_vs_peak.py`).
//!
//!   cargo run --release -p egret-kernels --example gemm_shapes [MxKxN ...]

use std::time::Instant;

fn main() {
    let shapes: Vec<(usize, usize, usize)> = match std::env::args().skip(1).collect::<Vec<_>>() {
        args if !args.is_empty() => args
            .iter()
            .map(|s| {
                let d: Vec<usize> = s.split('x').map(|x| x.parse().expect("MxKxN")).collect();
                (d[0], d[1], d[2])
            })
            .collect(),
        _ => vec![
            (64, 768, 768),
            (64, 768, 3072),
            (64, 3072, 768),
            (64, 2048, 5632),
            (128, 2048, 2048),
            (128, 3072, 768),
            (512, 768, 768),
            (512, 2048, 5632),
        ],
    };
    println!("path {:?}", egret_kernels::Isa::host());
    for (m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.1).collect();
        let packed = egret_kernels::gemm::pack_panels(&b, 0, [n, 1], k, n);
        let mut c = vec![0f32; m * n];
        let none = std::ptr::null();
        let call = |c: &mut [f32]| unsafe {
            egret_kernels::gemm::egret_sgemm_packed(
                m as i64,
                k as i64,
                n as i64,
                a.as_ptr(),
                k as i64,
                1,
                packed.as_ptr(),
                c.as_mut_ptr(),
                none,
                none,
                none,
                std::ptr::null(),
            )
        };
        call(&mut c);
        let flops = 2.0 * (m * k * n) as f64;
        let reps = ((2e9 / flops) as usize).clamp(5, 200);
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                call(&mut c);
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[reps / 2];
        println!("{m}x{k}x{n}: {:.1} GFLOP/s ({:.3} ms, {reps} calls)", flops / median / 1e9, median * 1e3);
    }
}
