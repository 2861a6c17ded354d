#!/usr/bin/env python3
"""Run onnxruntime and `egret bench` side by side on the same models, in one
session on one machine, and print latency ratios (egret / onnxruntime).

Usage: python3 tools/bench_vs_onnxruntime.py [MODEL_DIR ...] [--threads 1 2] [--iters 30]
Needs: pip install onnxruntime numpy onnx; a release build of egret
(cargo build --release). Models default to ../shared/perf/*.
"""
import argparse, glob, json, os, platform, statistics, subprocess, sys, time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def load_inputs(model_dir):
    """The stored inputs of test_data_set_0, by graph input name."""
    feeds = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "test_data_set_0", "input_*.pb"))):
        t = onnx.load_tensor(path)
        feeds[t.name] = numpy_helper.to_array(t)
    return feeds


def ort_latency(model_path, feeds, threads, iters, warmup):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def egret_latency(egret, model_dir, threads, iters, warmup, opt):
    args = [egret, "bench", os.path.join(model_dir, "model.onnx"), "--json", "--threads", str(threads),
            "--iters", str(iters), "--warmup", str(warmup), "--opt", str(opt)]
    for path in sorted(glob.glob(os.path.join(model_dir, "test_data_set_0", "input_*.pb"))):
        name = onnx.load_tensor(path).name
        args += ["--input", f"{name}={path}"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=sorted(glob.glob(os.path.join(root, "..", "shared", "perf", "*"))))
    p.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate onnxruntime and egret this many times; report the best median of each")
    p.add_argument("--egret", default=os.path.join(root, "target", "release", "egret"))
    a = p.parse_args()
    if not a.models:
        sys.exit("no models: pass model folders or put shared/perf beside the checkout")
    if not os.path.exists(a.egret):
        sys.exit(f"{a.egret} not found: run `cargo build --release` first")
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"onnxruntime {ort.__version__}")
    print("| model | threads | onnxruntime ms | egret --opt 0 ms | egret --opt 2 ms | egret / ort | egret compile ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model_dir in a.models:
        name = os.path.basename(os.path.normpath(model_dir))
        feeds = load_inputs(model_dir)
        for threads in a.threads:
            # The machines are noisy: alternate the runtimes and keep each one's best median.
            o, e0, e1 = float("inf"), None, None
            for _ in range(a.rounds):
                o = min(o, ort_latency(os.path.join(model_dir, "model.onnx"), feeds, threads, a.iters, a.warmup))
                r0 = egret_latency(a.egret, model_dir, threads, a.iters, a.warmup, 0)
                r1 = egret_latency(a.egret, model_dir, threads, a.iters, a.warmup, 2)
                e0 = r0 if e0 is None or r0["median_ms"] < e0["median_ms"] else e0
                e1 = r1 if e1 is None or r1["median_ms"] < e1["median_ms"] else e1
            print(f"| {name} | {threads} | {o:.2f} | {e0['median_ms']:.2f} | {e1['median_ms']:.2f} | "
                  f"{e1['median_ms'] / o:.2f}x | {e1['compile_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
