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
//! Then a decode step's product (one row times a 4096 x 4096 weight, 64 MiB
//! in f32, larger than the last-level cache) with the weight packed in each
//! coding the CPU keeps (`cpu::choose::pack_weight`): f32, f16, bf16, 8-bit
//! and 4-bit codes with a scale and zero point per block of 32 rows.
//! Throughput is the weight's bytes as f32 per second, so codings compare
//! as speed-ups of the same product.
//!
//! Last, an encoder's product at 128 tokens (128 x 3072 by 3072 x 768, BERT-
//! base's output projection) with a dynamically quantized model's operands:
//! whole-number activations and an int8 weight (VNNI's integer products
//! where the host has them), against the same values as f32.
//!
//! Then the packed GEMM at transformer shapes (`packed_shapes`: M of 64,
//! 128 and 512 token rows by the K x N weights of DeiT-tiny, BERT-base and
//! a 1.1B LLaMA) in GFLOP/s, and at decode rows (`packed_decode_rows`: M of
//! 1, 4 and 16, bound by memory) in bytes of f32 weight streamed per
//! second, beside the two references measured in the same run: the `gemm`
//! crate's single-threaded SGEMM at 1024^3 (`sgemm_peak`) and the read
//! bandwidth of one core summing 256 MiB (`read_bandwidth`).
//! `tools/gemm_vs_peak.py` runs these on both kernel paths with OpenBLAS's
//! SGEMM beside them and prints the shares.
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
        // Not halves (0.3 is no f16 or bf16), so the weight packs as f32.
        g.add_const(matrix(n, 5, 0.3), "w")
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
        let inputs = if b_constant { vec![matrix(n, 7, 0.25)] } else { vec![matrix(n, 7, 0.25), matrix(n, 5, 0.3)] };
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

/// A `[k, n]` weight of 4-bit (or 8-bit) codes in blocks of 32 rows, with
/// the importer's claim, or its values rounded to a half type.
fn decode_weight(k: usize, n: usize, coding: &str) -> Tensor {
    let bits = if coding == "codes8" { 8 } else { 4 };
    let blocks = k / 32;
    let claim = egret::ir::BlockCodes {
        bits,
        block: 32,
        k,
        n,
        codes: (0..k * n).map(|i| ((i * 7 + i / n) % (1 << bits)) as u8).collect(),
        offset: 0,
        scales: (0..blocks * n).map(|i| 0.01 + (i % 17) as f32 * 1e-3).collect(),
        zeros: vec![(1 << (bits - 1)) as f32; blocks * n],
    };
    let values: Vec<f32> = (0..k * n).map(|i| claim.value(i / n, i % n) * 1.0001).collect();
    match coding {
        "f32" => Tensor::from_vec(vec![k, n], values),
        "f16" => Tensor::from_vec(
            vec![k, n],
            values.iter().map(|&x| egret::ir::half::f16::from_f32(x).to_f32()).collect::<Vec<_>>(),
        ),
        "bf16" => Tensor::from_vec(
            vec![k, n],
            values.iter().map(|&x| egret::ir::half::bf16::from_f32(x).to_f32()).collect::<Vec<_>>(),
        ),
        _ => {
            let values: Vec<f32> = (0..k * n).map(|i| claim.value(i / n, i % n)).collect();
            Tensor::from_vec(vec![k, n], values).with_codes(claim)
        }
    }
}

fn decode_step(c: &mut Criterion) {
    let (k, n) = (4096, 4096);
    let mut group = c.benchmark_group("decode_step_1x4096x4096_1_thread");
    group.throughput(Throughput::Bytes((k * n * 4) as u64));
    group.sample_size(20);
    for coding in ["f32", "f16", "bf16", "codes8", "codes4"] {
        let mut g = Graph::new();
        let a = g.add_input("a", Type::new(DType::F32, vec![1, k]));
        let w = g.add_const(decode_weight(k, n, coding), "w");
        let y = g.add(Op::MatMul, &[a, w], "matmul").unwrap();
        g.set_output("y", y);
        let plan = egret::backends::lower(&g, Default::default()).unwrap();
        let exe = CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
        let input = vec![Tensor::from_vec(vec![1, k], (0..k).map(|i| (i % 9) as f32 * 0.1).collect::<Vec<f32>>())];
        group.bench_with_input(BenchmarkId::from_parameter(coding), &coding, |bench, _| {
            bench.iter(|| exe.run(input.clone()).unwrap())
        });
    }
    group.finish();
}

fn int8_prefill(c: &mut Criterion) {
    let (m, k, n) = (128, 3072, 768);
    let mut group = c.benchmark_group("int8_128x3072x768_1_thread");
    group.throughput(Throughput::Elements(2 * (m * k * n) as u64));
    group.sample_size(20);
    let codes = |p: usize, j: usize| ((p * 7 + j * 3 + p / 5) % 256) as u8;
    for coding in ["f32", "int8"] {
        let values: Vec<f32> = (0..k * n).map(|i| codes(i / n, i % n) as f32 - 128.0).collect();
        let weight = match coding {
            // The same values, 0.5 apart from any half's, so they pack as f32.
            "f32" => Tensor::from_vec(vec![k, n], values.iter().map(|x| x + 1e-3).collect::<Vec<f32>>()),
            _ => Tensor::from_vec(vec![k, n], values).with_codes(egret::ir::BlockCodes {
                bits: 8,
                block: k,
                k,
                n,
                codes: (0..k * n).map(|i| codes(i / n, i % n)).collect(),
                offset: 0,
                scales: vec![1.0; n],
                zeros: vec![128.0; n],
            }),
        };
        let mut g = Graph::new();
        let a = g.add_input("a", Type::new(DType::F32, vec![m, k]));
        let w = g.add_const(weight, "w");
        let y = g.add(Op::MatMul, &[a, w], "matmul").unwrap();
        g.set_output("y", y);
        let plan = egret::backends::lower(&g, Default::default()).unwrap();
        let exe = CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
        let input =
            vec![Tensor::from_vec(vec![m, k], (0..m * k).map(|i| (i % 256) as f32 - 100.0).collect::<Vec<f32>>())];
        group.bench_with_input(BenchmarkId::from_parameter(coding), &coding, |bench, _| {
            bench.iter(|| exe.run(input.clone()).unwrap())
        });
    }
    group.finish();
}

/// A CPU program of `y = a @ w` for a constant `[k, n]` weight (values no
/// half holds exactly, so it packs as f32) and its input `[m, k]`.
fn packed_product(m: usize, k: usize, n: usize) -> (CpuExecutable, Vec<Tensor>) {
    let mut g = Graph::new();
    let a = g.add_input("a", Type::new(DType::F32, vec![m, k]));
    let w = (0..k * n).map(|i| ((i * 7 + i / n) % 23) as f32 * 0.013 - 0.1).collect::<Vec<f32>>();
    let w = g.add_const(Tensor::from_vec(vec![k, n], w), "w");
    let y = g.add(Op::MatMul, &[a, w], "matmul").unwrap();
    g.set_output("y", y);
    let plan = egret::backends::lower(&g, Default::default()).unwrap();
    let exe = CpuExecutable::new(egret::backends::cpu::compile(plan).unwrap(), 1);
    let input = vec![Tensor::from_vec(vec![m, k], (0..m * k).map(|i| (i % 9) as f32 * 0.1).collect::<Vec<f32>>())];
    (exe, input)
}

/// K x N of the products transformers run: DeiT-tiny's (192 wide),
/// BERT-base's (768, 3072 in the feed-forward) and a 1.1B LLaMA's (2048,
/// 5632).
const WEIGHTS: [(usize, usize); 7] =
    [(192, 768), (768, 192), (768, 768), (768, 3072), (3072, 768), (2048, 2048), (2048, 5632)];

fn packed_shapes(c: &mut Criterion) {
    let mut group = c.benchmark_group("packed_shapes_1_thread");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    for m in [64usize, 128, 512] {
        for (k, n) in WEIGHTS {
            let (exe, input) = packed_product(m, k, n);
            group.throughput(Throughput::Elements(2 * (m * k * n) as u64));
            group.bench_function(format!("{m}x{k}x{n}"), |bench| bench.iter(|| exe.run(input.clone()).unwrap()));
        }
    }
    group.finish();
}

fn packed_decode_rows(c: &mut Criterion) {
    let mut group = c.benchmark_group("packed_decode_rows_1_thread");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    for m in [1usize, 4, 16] {
        for (k, n) in [(768, 3072), (2048, 5632)] {
            let (exe, input) = packed_product(m, k, n);
            group.throughput(Throughput::Bytes((k * n * 4) as u64));
            group.bench_function(format!("{m}x{k}x{n}"), |bench| bench.iter(|| exe.run(input.clone()).unwrap()));
        }
    }
    group.finish();
}

/// The references: the `gemm` crate's SGEMM on one thread at 1024^3 (its
/// widest kernels, whatever `EGRET_KERNEL_ISA` says), and one core's read
/// bandwidth (a sum over 256 MiB, far past the caches).
fn references(c: &mut Criterion) {
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.25).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.3).collect();
    let mut out = vec![0f32; n * n];
    let mut group = c.benchmark_group("sgemm_peak_1_thread");
    group.sample_size(10);
    group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
    group.bench_function("gemm_crate_1024", |bench| {
        bench.iter(|| unsafe {
            gemm::gemm(
                n,
                n,
                n,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        })
    });
    group.finish();
    let big: Vec<f32> = (0..64 << 20).map(|i| (i % 3) as f32).collect();
    let mut group = c.benchmark_group("read_bandwidth_1_thread");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((big.len() * 4) as u64));
    group.bench_function("sum_256mib", |bench| {
        bench.iter(|| {
            // Eight partial sums, so the adds vectorise and the loads bound it.
            let mut sums = [0f32; 8];
            for chunk in big.chunks_exact(8) {
                for l in 0..8 {
                    sums[l] += chunk[l];
                }
            }
            criterion::black_box(sums)
        })
    });
    group.finish();
}

criterion_group!(benches, matmul, decode_step, int8_prefill, packed_shapes, packed_decode_rows, references);
criterion_main!(benches);
