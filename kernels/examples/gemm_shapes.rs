//! The packed GEMM at transformer shapes, one thread, straight through the
//! kernel library (no compiler in the loop, so it builds in a minute):
//! GFLOP/s per shape, the median of repeated calls, on the path
//! `EGRET_KERNEL_ISA` leaves. With `--int8`, each shape also through an
//! int8 weight and whole-number activations (the integer products of a
//! dynamically quantized model), in G multiply-adds x 2 per second and as
//! a speed-up over the same shape in f32. A quick look while working on
//! the kernel; the numbers BENCHMARKS.md records come from `cargo bench
//! --bench matmul` (`tools/gemm_vs_peak.py`). With `--cold`, each call
//! reads another copy of the weight, the copies together past the
//! last-level cache, as a model's products stream their weights from
//! memory. With `--threads N`, the calls run in a pool of N threads, as a
//! model's run does (`pool::Pool`), the product split as the model splits it.
//!
//!   cargo run --release -p egret-kernels --example gemm_shapes [--int8] [--cold] [--threads N] [MxKxN ...]

use std::time::Instant;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let int8 = args.iter().any(|a| a == "--int8");
    let cold = args.iter().any(|a| a == "--cold");
    args.retain(|a| a != "--int8" && a != "--cold");
    let threads = match args.iter().position(|a| a == "--threads") {
        Some(i) => {
            let n = args.get(i + 1).and_then(|n| n.parse().ok()).expect("--threads N");
            args.drain(i..i + 2);
            n
        }
        None => 1,
    };
    let pool = egret_kernels::pool::Pool::new(threads);
    pool.install(|| run(args, int8, cold));
}

fn run(args: Vec<String>, int8: bool, cold: bool) {
    let shapes: Vec<(usize, usize, usize)> = match args {
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
    println!(
        "path {:?}, integer path {:?}, {} threads",
        egret_kernels::Isa::host(),
        egret_kernels::int8::Path::host(),
        egret_kernels::threads()
    );
    for (m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.1).collect();
        let f32s = median(m, k, &a, &copies(egret_kernels::gemm::pack_panels(&b, 0, [n, 1], k, n), cold), n);
        let flops = 2.0 * (m * k * n) as f64;
        print!("{m}x{k}x{n}: {:.1} GFLOP/s ({:.3} ms)", flops / f32s / 1e9, f32s * 1e3);
        if int8 {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 + i / 5) % 256) as f32).collect();
            // Bell-shaped, as a trained weight's codes are (a sum of three
            // patterns, -79..=79): uniformly random bytes would pair past
            // what AVX2's products take (`gemm::pack_int8_panels`).
            let w = |p: usize, j: usize| {
                ((p * 31 + j * 17) % 61 + (p * 7 + j * 29) % 53 + (p * 13 + j * 5) % 47) as i8 - 79
            };
            let ints = median(m, k, &a, &copies(egret_kernels::gemm::pack_int8_panels(w, k, n), cold), n);
            print!("; int8 {:.1} G/s ({:.3} ms, {:.2}x f32)", flops / ints / 1e9, ints * 1e3, f32s / ints);
        }
        println!();
    }
}

/// The packed weight, or with `cold` enough copies of it to fill 256 MiB
/// (past any last-level cache), which the calls take in turn.
fn copies(packed: Vec<u32>, cold: bool) -> Vec<Vec<u32>> {
    let n = if cold { (256 << 20) / (4 * packed.len()) + 1 } else { 1 };
    vec![packed; n]
}

/// Seconds per call of `c = a @ packed`, the median of repeated calls.
fn median(m: usize, k: usize, a: &[f32], copies: &[Vec<u32>], n: usize) -> f64 {
    let mut c = vec![0f32; m * n];
    let none = std::ptr::null();
    let mut next = 0;
    let mut call = || unsafe {
        let packed = &copies[next % copies.len()];
        next += 1;
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
    call();
    let reps = ((2e9 / (2.0 * (m * k * n) as f64)) as usize).clamp(5, 200);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            call();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}
