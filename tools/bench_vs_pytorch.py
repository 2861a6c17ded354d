#!/usr/bin/env python3
"""Side-by-side microbenchmarks on one GPU: PyTorch against Egret's PTX
backend, for the goals of the PTX issue (matmul at 4096^3 in f32 and bf16,
attention at head dim 64 against scaled_dot_product_attention). Each shape
is written as a small ONNX model (with the `onnx` package), timed with
`egret bench --backend ptx --json`, and timed in PyTorch with CUDA events.

Usage: python3 tools/bench_vs_pytorch.py [--egret target/release/egret] [--out DIR]
(the binary built with the ptx backend: `cargo build --release --features cuda`, or
`--all-features`, as `tools/gpu_bundle.sh` builds it)
Prints one markdown table of milliseconds and TFLOP/s. Untested on a GPU at
the time of writing (no GPU was lent to the session that wrote it).
"""
import argparse, json, os, subprocess, tempfile

import numpy as np
import onnx
from torch_models import torch_ms  # tools/, beside this script
from onnx import TensorProto, helper, numpy_helper


def matmul_model(path, n):
    w = numpy_helper.from_array(np.random.rand(n, n).astype(np.float32) - 0.5, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def attention_model(path, b, h, s, d):
    scale = numpy_helper.from_array(np.array(1.0 / np.sqrt(d), dtype=np.float32), "scale")
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    io = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [b, h, s, d])
    graph = helper.make_graph(nodes, "attention", [io("q"), io("k"), io("v")], [io("o")], [scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def egret_ms(egret, model, precision="f32"):
    r = subprocess.run([egret, "bench", model, "--backend", "ptx", "--precision", precision, "--iters", "20", "--json"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()[-1] if r.stderr else "failed"
    return json.loads(r.stdout)["median_ms"], ""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--egret", default="target/release/egret")
    p.add_argument("--out", default=".")
    a = p.parse_args()
    import torch
    import torch.nn.functional as F

    rows = []
    tmp = tempfile.mkdtemp()
    n = 4096
    mm = os.path.join(tmp, "matmul.onnx")
    matmul_model(mm, n)
    x, w = torch.rand(n, n, device="cuda"), torch.rand(n, n, device="cuda")
    flops = 2 * n**3
    for precision, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        xs, ws = x.to(dtype), w.to(dtype)
        t_ms = torch_ms(lambda: xs @ ws, "cuda", 50)
        e_ms, err = egret_ms(a.egret, mm, precision)
        rows.append((f"matmul {n}^3 {precision}", t_ms, e_ms, flops, err))
    b, h, s, d = 8, 12, 1024, 64
    at = os.path.join(tmp, "attention.onnx")
    attention_model(at, b, h, s, d)
    q, k, v = (torch.rand(b, h, s, d, device="cuda") for _ in range(3))
    t_ms = torch_ms(lambda: F.scaled_dot_product_attention(q, k, v), "cuda", 50)
    e_ms, err = egret_ms(a.egret, at)
    rows.append((f"attention {b}x{h}x{s} d{d} f32", t_ms, e_ms, 4 * b * h * s * s * d, err))
    # Egret's wall time includes copying inputs in and outputs back per run.
    lines = ["| case | PyTorch ms | Egret ms | Egret TFLOP/s | Egret / PyTorch |", "| --- | --- | --- | --- | --- |"]
    for name, t, e, f, err in rows:
        if e is None:
            lines.append(f"| {name} | {t:.3f} | failed: {err} | | |")
        else:
            lines.append(f"| {name} | {t:.3f} | {e:.3f} | {f / e / 1e9:.1f} | {e / t:.2f}x |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "pytorch.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
