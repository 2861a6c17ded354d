#!/usr/bin/env python3
"""Run onnxruntime and `egret bench` side by side on the same models, in one
session on one machine, and print latency ratios (egret / onnxruntime).

Usage: python3 tools/bench_vs_onnxruntime.py [MODEL_DIR ...] [--threads 1 2] [--iters 30]
       [--rounds 5] [--isa avx2] [--no-opt0] [--tokens 32]
Needs: pip install onnxruntime numpy onnx; a release build of egret
(cargo build --release). Models default to ../shared/perf/*.

Each runtime's figure is the median of its round medians (the best median
beside it). `--isa` caps Egret's kernel library (EGRET_KERNEL_ISA; onnxruntime
keeps its own). `--tokens N` feeds a text model N tokens (random ids below
1000, a mask of ones) instead of its stored inputs.
"""
import argparse, glob, json, os, platform, statistics, subprocess, sys, tempfile, time

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


def token_inputs(model_dir, tokens, out_dir):
    """A text model's inputs at `tokens` tokens, as feeds and as .pb files."""
    model = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)
    rng = np.random.default_rng(0)
    feeds, paths = {}, []
    for i, inp in enumerate(model.graph.input):
        if inp.name == "attention_mask":
            x = np.ones((1, tokens), np.int64)
        elif inp.name in ("input_ids", "token_type_ids"):
            x = rng.integers(0, 1000 if inp.name == "input_ids" else 1, (1, tokens)).astype(np.int64)
        else:
            sys.exit(f"--tokens: no rule for input {inp.name} of {model_dir}")
        feeds[inp.name] = x
        path = os.path.join(out_dir, f"input_{i}.pb")
        with open(path, "wb") as f:
            f.write(numpy_helper.from_array(x, inp.name).SerializeToString())
        paths.append(path)
    return feeds, paths


def egret_latency(egret, model_dir, input_paths, threads, iters, warmup, opt, isa):
    args = [egret, "bench", os.path.join(model_dir, "model.onnx"), "--json", "--threads", str(threads),
            "--iters", str(iters), "--warmup", str(warmup), "--opt", str(opt)]
    for path in input_paths:
        name = onnx.load_tensor(path).name
        args += ["--input", f"{name}={path}"]
    env = dict(os.environ, EGRET_KERNEL_ISA=isa) if isa else None
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout
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
    p.add_argument("--isa", help="cap Egret's kernel library (EGRET_KERNEL_ISA): avx2 or baseline")
    p.add_argument("--no-opt0", action="store_true", help="leave out Egret's --opt 0 runs")
    p.add_argument("--tokens", type=int, help="feed a text model this many tokens instead of its stored inputs")
    a = p.parse_args()
    if not a.models:
        sys.exit("no models: pass model folders or put shared/perf beside the checkout")
    if not os.path.exists(a.egret):
        sys.exit(f"{a.egret} not found: run `cargo build --release` first")
    isa = a.isa or "the host's best"
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"onnxruntime {ort.__version__}; Egret's kernel path: {isa}; {a.rounds} alternating rounds, "
          f"each cell the median of the rounds' medians (best in brackets)")
    print("| model | threads | onnxruntime ms | egret --opt 0 ms | egret --opt 2 ms | egret / ort | egret compile ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    scratch = tempfile.mkdtemp(prefix="egret-bench-")
    for model_dir in a.models:
        name = os.path.basename(os.path.normpath(model_dir))
        if a.tokens:
            feeds, paths = token_inputs(model_dir, a.tokens, scratch)
            name += f" ({a.tokens} tokens)"
        else:
            feeds = load_inputs(model_dir)
            paths = sorted(glob.glob(os.path.join(model_dir, "test_data_set_0", "input_*.pb")))
        for threads in a.threads:
            # The machines are noisy: alternate the runtimes round by round.
            o, e0, e1 = [], [], []
            for _ in range(a.rounds):
                o.append(ort_latency(os.path.join(model_dir, "model.onnx"), feeds, threads, a.iters, a.warmup))
                if not a.no_opt0:
                    e0.append(egret_latency(a.egret, model_dir, paths, threads, a.iters, a.warmup, 0, a.isa))
                e1.append(egret_latency(a.egret, model_dir, paths, threads, a.iters, a.warmup, 2, a.isa))
            cell = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f})" if xs else "-"
            ms0 = [r["median_ms"] for r in e0]
            ms1 = [r["median_ms"] for r in e1]
            print(f"| {name} | {threads} | {cell(o)} | {cell(ms0)} | {cell(ms1)} | "
                  f"{statistics.median(ms1) / statistics.median(o):.2f}x | {e1[-1]['compile_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
