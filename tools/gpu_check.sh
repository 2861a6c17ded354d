#!/usr/bin/env bash
# The one script to run on a GPU machine (the device tool lends one to some
# tasks, for 15 minutes in all): every check and benchmark of the GPU
# backends, in one go, with a budget per step. Output goes to $OUT (or
# ./gpu-check) as logs and one BENCHMARKS-ready summary.
#
# Usage: bash tools/gpu_check.sh            (from the repository root)
# Needs: a CUDA driver (ptx), a Vulkan driver (wgsl), python3 with torch,
# numpy and onnx (the side-by-side numbers). Written before any GPU run:
# the first session on a GPU should read its log with care.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
cargo build --release 2>&1 | tail -3
egret=target/release/egret
step() { echo "== $*"; timeout 240 "$@"; echo "   (exit $?)"; }
{
    # The differential tests with their PTX on the device, not the interpreter.
    step env EGRET_PTX_DEVICE=cuda cargo test --release --test differential
    for dir in tests/data/zoo tests/data/synthetic tests/data/exports ../shared/perf; do
        [ -d "$dir" ] || continue
        step $egret check "$dir" --backend ptx -q
        step $egret check "$dir" --backend ptx -q --opt 0
        step $egret check "$dir" --backend ptx -q --precision tf32 --rtol 1e-2 --atol 1e-2
        step $egret check "$dir" --backend wgsl -q
    done
    for m in ../shared/perf/deit_tiny ../shared/perf/gpt2_small4; do
        [ -d "$m" ] || continue
        for p in f32 tf32 bf16; do
            step $egret bench "$m" --backend ptx --precision "$p" --iters 50 --json
        done
        step $egret bench "$m" --backend wgsl --iters 50 --json
    done
    step python3 tools/bench_vs_pytorch.py --egret "$egret" --out "$out"
} 2>&1 | tee "$out/log.txt"
