//! The matmul kernel at 64, 256, 512 and 1024, single-threaded. Criterion
//! reports throughput in elements per second with one "element" per
//! floating-point operation, so `Gelem/s` reads as GFLOP/s.
//!
//! Four variants: the GEMM library the compiler calls for large products;
//! the register-tiled kernel it generates, reading `b` as a row-major input;
//! the generated kernel with `b` a constant weight matrix, which lowering
//! packs into panels at compile time; and the kernel library's GEMM over
//! such a packed weight (what the JIT uses for every constant weight).
//!
//! `cargo bench --bench matmul`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use egret::backends::plan::MatMulImpl;
use egret::ir::{DType, Graph, Op, Tensor, Type};
use egret::runtime::{CpuExecutable, Executable};

fn matrix(n: usize, modulus: usize, scale: f32) -> Tensor {
    Tensor::from_vec(vec![n, n], (0..n * n).map(|i| (i % modulus) as f32 * scale).collect::<Vec<f32>>())
}

/// `c = a @ b` with `a` an input and `b` an input or a constant.
fn graph(n: usize, b_constant: bool) -> Graph {
    let mut g = Graph::new();
    let a = g.add_input("a", Type::new(DType::F32, vec![n, n]));
    let b = if b_constant {
        g.add_const(matrix(n, 5, 0.5), "w")
    } else {
        g.add_input("b", Type::new(DType::F32, vec![n, n]))
    };
    let c = g.add(Op::MatMul, &[a, b], "matmul").unwrap();
    g.set_output("c", c);
    g
}

fn bench_variant(c: &mut Criterion, name: &str, implementation: MatMulImpl, b_constant: bool) {
    let mut group = c.benchmark_group(format!("matmul_f32_1_thread_{name}"));
    for n in [64usize, 256, 512, 1024] {
        let opts = egret::backends::LowerOptions { matmul: Some(implementation), ..Default::default() };
        let plan = egret::backends::lower(&graph(n, b_constant), opts).unwrap();
        let exe = CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
        let inputs = if b_constant { vec![matrix(n, 7, 0.25)] } else { vec![matrix(n, 7, 0.25), matrix(n, 5, 0.5)] };
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        group.sample_size(if n >= 512 { 20 } else { 50 });
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| exe.run(inputs.clone()).unwrap())
        });
    }
    group.finish();
}

fn matmul(c: &mut Criterion) {
    bench_variant(c, "library", MatMulImpl::Library, false);
    bench_variant(c, "generated", MatMulImpl::Generated, false);
    bench_variant(c, "generated_packed_weights", MatMulImpl::Generated, true);
    bench_variant(c, "kernel_library_packed_weights", MatMulImpl::Packed, true);
}

criterion_group!(benches, matmul);
criterion_main!(benches);
