//! The matmul kernel at 64, 256, 512 and 1024, single-threaded. Criterion
//! reports throughput in elements per second with one "element" per
//! floating-point operation, so `Gelem/s` reads as GFLOP/s.
//!
//! Both implementations are measured: the GEMM library the compiler calls
//! for large products, and the register-tiled kernel it generates.
//!
//! `cargo bench --bench matmul`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use egret::ir::{text, Tensor};
use egret::runtime::{CpuExecutable, Executable};

fn matmul(c: &mut Criterion) {
    use egret::backends::plan::MatMulImpl;
    for (name, implementation) in [("library", MatMulImpl::Library), ("generated", MatMulImpl::Generated)] {
        bench_impl(c, name, implementation);
    }
}

fn bench_impl(c: &mut Criterion, name: &str, implementation: egret::backends::plan::MatMulImpl) {
    let mut group = c.benchmark_group(format!("matmul_f32_1_thread_{name}"));
    for n in [64usize, 256, 512, 1024] {
        let g = text::parse(&format!(
            "v0: f32[{n},{n}] = input{{name=\"a\"}}\nv1: f32[{n},{n}] = input{{name=\"b\"}}\nv2: f32[{n},{n}] = matmul v0, v1\noutput \"c\" = v2\n"
        ))
        .unwrap();
        let opts = egret::backends::LowerOptions { matmul: Some(implementation), ..Default::default() };
        let plan = egret::backends::lower(&g, opts).unwrap();
        egret::backends::cpu::set_threads(1);
        let exe = CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
        let a = Tensor::from_vec(vec![n, n], (0..n * n).map(|i| (i % 7) as f32 * 0.25).collect::<Vec<f32>>());
        let b = Tensor::from_vec(vec![n, n], (0..n * n).map(|i| (i % 5) as f32 * 0.5).collect::<Vec<f32>>());
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        group.sample_size(if n >= 512 { 20 } else { 50 });
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| exe.run(vec![a.clone(), b.clone()]).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
