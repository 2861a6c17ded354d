#!/usr/bin/env python3
"""The packed GEMM's share of the machine's practical SGEMM peak, on both
kernel paths, measured in one run:

  python3 tools/gemm_vs_peak.py [--isa avx512 avx2]

For each kernel path (`EGRET_KERNEL_ISA`), runs `cargo bench --bench matmul`'s
`packed_shapes` (M of 64, 128, 512 by transformer weights), `packed_decode_rows`
(M of 1, 4, 16), `sgemm_peak` (the `gemm` crate at 1024^3) and `read_bandwidth`
(one core summing 256 MiB), and times numpy's OpenBLAS SGEMM at 1024^3 on one
thread with the kernels of that path (`OPENBLAS_CORETYPE`: SkylakeX for
AVX-512, Haswell for AVX2). The peak is the better of the two SGEMMs (under
the AVX2 cap only OpenBLAS's: the `gemm` crate picks its widest kernels
whatever Egret is capped to). Prints markdown tables: GFLOP/s and the share
of the peak for M >= 64; bytes of f32 weight streamed per second and the
share of the read bandwidth for the decode rows.
"""
import argparse, json, os, subprocess, sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
CRITERION = os.path.join(ROOT, "target", "criterion")
CORETYPE = {"avx512": "SkylakeX", "avx2": "Haswell"}

NUMPY = r"""
import numpy as np, time
n = 1024
a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)
for _ in range(3): a @ b
ts = []
for _ in range(15):
    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
ts.sort(); print(2 * n ** 3 / ts[len(ts) // 2] / 1e9)
"""


def openblas(isa):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OPENBLAS_CORETYPE=CORETYPE[isa])
    return float(subprocess.run([sys.executable, "-c", NUMPY], env=env, capture_output=True, text=True, check=True).stdout)


def median_ns(group, name):
    with open(os.path.join(CRITERION, group, name, "new", "estimates.json")) as f:
        return json.load(f)["median"]["point_estimate"]


def bench(isa):
    env = dict(os.environ)
    if isa == "avx2":
        env["EGRET_KERNEL_ISA"] = "avx2"
    else:
        env.pop("EGRET_KERNEL_ISA", None)
    subprocess.run(
        ["cargo", "bench", "--bench", "matmul", "--", "packed_shapes|packed_decode_rows|sgemm_peak|read_bandwidth"],
        cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
    )
    shapes = {}
    for entry in sorted(os.listdir(os.path.join(CRITERION, "packed_shapes_1_thread"))):
        if "x" in entry:
            m, k, n = map(int, entry.split("x"))
            shapes[(m, k, n)] = 2 * m * k * n / median_ns("packed_shapes_1_thread", entry)
    rows = {}
    for entry in sorted(os.listdir(os.path.join(CRITERION, "packed_decode_rows_1_thread"))):
        if "x" in entry:
            m, k, n = map(int, entry.split("x"))
            rows[(m, k, n)] = k * n * 4 / median_ns("packed_decode_rows_1_thread", entry)
    gemm_crate = 2 * 1024 ** 3 / median_ns("sgemm_peak_1_thread", "gemm_crate_1024")
    bandwidth = 256 * 2 ** 20 / median_ns("read_bandwidth_1_thread", "sum_256mib")
    return shapes, rows, gemm_crate, bandwidth


def table(results, isas, column, reference, head, unit, share):
    """One markdown table: per shape, each ISA's figure (`results[isa][column]`)
    and its share of `results[isa][reference]`."""
    print()
    print(f"| {head} | " + " | ".join(f"{i} {unit} | {i} {share}" for i in isas) + " |")
    print("| --- | " + " | ".join("--- | ---" for _ in isas) + " |")
    for key in sorted(results[isas[0]][column]):
        cells = [f"{results[i][column][key]:.1f} | {results[i][column][key] / results[i][reference]:.0%}" for i in isas]
        print(f"| {'x'.join(map(str, key))} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa", nargs="+", default=["avx512", "avx2"], choices=["avx512", "avx2"])
    a = p.parse_args()
    results = {}
    for isa in a.isa:
        blas = openblas(isa)
        shapes, rows, gemm_crate, bandwidth = bench(isa)
        peak = max(blas, gemm_crate) if isa == "avx512" else blas
        results[isa] = (shapes, rows, peak, bandwidth)
        print(f"{isa}: OpenBLAS ({CORETYPE[isa]}) {blas:.1f} GFLOP/s, gemm crate {gemm_crate:.1f} GFLOP/s "
              f"(peak {peak:.1f}); read bandwidth {bandwidth:.1f} GB/s", flush=True)
    isas = list(results)
    table(results, isas, 0, 2, "M x K x N", "GFLOP/s", "share of peak")
    table(results, isas, 1, 3, "M x K x N (decode rows)", "GB/s", "share of read bandwidth")


if __name__ == "__main__":
    main()
