#!/usr/bin/env python3
"""BERT-base and GPT-2 small written in plain torch (random weights; no
transformers, no download), exported to ONNX with torch.onnx, checked
against torch's own outputs with `egret check`, and timed side by side:
PyTorch eager (f32 with TF32 off, and bf16), torch.compile where it works,
and Egret (`egret bench --json`) on the same shapes. For the GPU machine,
which may have torch without transformers (`tools/gpu_check.sh` runs it);
rehearsed anywhere with `--device cpu --small`.

  python3 tools/torch_models.py --egret BIN --out DIR [--device cuda|cpu]
      [--backend ptx|cpu|wgsl] [--small] [--models bert_base,gpt2_small,gpt2_small_step]

Models (batch 1): `bert_base` (12 layers, 768 wide, 12 heads, 128 tokens,
erf GELU, post-norm, an all-ones mask), `gpt2_small` (12 layers, 768 wide,
128 tokens of prompt, causal, tanh GELU, pre-norm, tied LM head) and
`gpt2_small_step` (one token after a past of 127, the past stacked as one
input [layers, 2, 1, heads, 127, 64], the present returned the same way).
`--small` shrinks every model to 2 layers of 64 wide (for a rehearsal).
Writes DIR/<model>/{model.onnx, test_data_set_0/} and DIR/torch_models.json
(every timing in ms, the checks' results, and what was skipped and why).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time


def config(name, small):
    if small:
        return dict(layers=2, width=64, heads=4, ffn=256, vocab=1000, positions=256, tokens=16, past=15)
    return dict(layers=12, width=768, heads=12, ffn=3072, vocab=50257 if "gpt2" in name else 30522,
                positions=1024 if "gpt2" in name else 512, tokens=128, past=127)


def build(name, c):
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, causal):
            super().__init__()
            self.qkv = nn.Linear(c["width"], 3 * c["width"])
            self.out = nn.Linear(c["width"], c["width"])
            self.causal = causal

        def forward(self, x, mask=None, past=None):
            b, s, w = x.shape
            h = c["heads"]
            q, k, v = self.qkv(x).split(w, dim=-1)
            q, k, v = (t.view(b, s, h, w // h).transpose(1, 2) for t in (q, k, v))
            present = None
            if past is not None:
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
                present = torch.stack([k, v])
            scores = q @ k.transpose(-1, -2) / math.sqrt(w // h)
            if self.causal and past is None:
                keep = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~keep, float("-inf"))
            if mask is not None:
                scores = scores + mask
            y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, w)
            return self.out(y), present

    class Block(nn.Module):
        def __init__(self, gpt):
            super().__init__()
            self.gpt = gpt
            self.attn = Attention(causal=gpt)
            self.ln1, self.ln2 = nn.LayerNorm(c["width"]), nn.LayerNorm(c["width"])
            self.up, self.down = nn.Linear(c["width"], c["ffn"]), nn.Linear(c["ffn"], c["width"])
            self.act = nn.GELU(approximate="tanh" if gpt else "none")

        def forward(self, x, mask=None, past=None):
            if self.gpt:  # pre-norm
                a, present = self.attn(self.ln1(x), past=past)
                x = x + a
                return x + self.down(self.act(self.up(self.ln2(x)))), present
            a, _ = self.attn(x, mask=mask)  # post-norm
            x = self.ln1(x + a)
            return self.ln2(x + self.down(self.act(self.up(x)))), None

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.words = nn.Embedding(c["vocab"], c["width"])
            self.positions = nn.Embedding(c["positions"], c["width"])
            self.types = nn.Embedding(2, c["width"])
            self.ln = nn.LayerNorm(c["width"])
            self.blocks = nn.ModuleList(Block(False) for _ in range(c["layers"]))

        def forward(self, ids, attention_mask):
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.ln(self.words(ids) + self.positions(pos) + self.types(torch.zeros_like(ids)))
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
            for blk in self.blocks:
                x, _ = blk(x, mask=mask)
            return x

    class Gpt2(nn.Module):
        def __init__(self):
            super().__init__()
            self.words = nn.Embedding(c["vocab"], c["width"])
            self.positions = nn.Embedding(c["positions"], c["width"])
            self.blocks = nn.ModuleList(Block(True) for _ in range(c["layers"]))
            self.ln = nn.LayerNorm(c["width"])

        def forward(self, ids, past=None):
            start = 0 if past is None else past.shape[4]
            pos = torch.arange(start, start + ids.shape[1], device=ids.device)
            x = self.words(ids) + self.positions(pos)
            presents = []
            for i, blk in enumerate(self.blocks):
                x, present = blk(x, past=None if past is None else past[i])
                presents.append(present)
            logits = self.ln(x) @ self.words.weight.t()
            return logits if past is None else (logits, torch.stack(presents))

    torch.manual_seed(sum(map(ord, name)))
    model = (Bert() if name == "bert_base" else Gpt2()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # random weights at a scale that keeps the activations tame
    ids = torch.randint(0, c["vocab"], (1, 1 if name.endswith("_step") else c["tokens"]))
    if name == "bert_base":
        args, inputs, outputs = (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], ["last_hidden_state"]
    elif name == "gpt2_small":
        args, inputs, outputs = (ids,), ["input_ids"], ["logits"]
    else:
        hd = c["width"] // c["heads"]
        past = torch.randn(c["layers"], 2, 1, c["heads"], c["past"], hd) * 0.5
        args, inputs, outputs = (ids, past), ["input_ids", "past"], ["logits", "present"]
    return model, args, inputs, outputs


def export(name, c, out):
    """Writes DIR/name/model.onnx and torch's outputs as test_data_set_0."""
    import numpy as np
    import torch

    model, args, inputs, outputs = build(name, c)
    folder = os.path.join(out, name)
    os.makedirs(os.path.join(folder, "test_data_set_0"), exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    with torch.no_grad():
        torch.onnx.export(model, args, path, input_names=inputs, output_names=outputs, opset_version=17,
                          dynamo=False)
        want = model(*args)
    want = want if isinstance(want, tuple) else (want,)
    save = write_pb_tensor
    for i, (n, a) in enumerate(zip(inputs, args)):
        save(os.path.join(folder, "test_data_set_0", f"input_{i}.pb"), n, a.numpy())
    for i, (n, t) in enumerate(zip(outputs, want)):
        save(os.path.join(folder, "test_data_set_0", f"output_{i}.pb"), n, t.numpy().astype(np.float32))
    return model, args, folder


def write_pb_tensor(path, name, array):
    """A TensorProto with raw data, written without the onnx package (the
    GPU machine may lack it): the fields' numbers and wire types by hand."""
    import numpy as np

    codes = {np.dtype(np.float32): 1, np.dtype(np.int64): 7}
    array = np.ascontiguousarray(array)

    def varint(n):
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(number, wire, payload):
        return varint(number << 3 | wire) + payload

    body = b"".join(field(1, 0, varint(d)) for d in array.shape)  # dims
    body += field(2, 0, varint(codes[array.dtype]))  # data_type
    body += field(8, 2, varint(len(name.encode())) + name.encode())  # name
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    body += field(9, 2, varint(len(raw)) + raw)  # raw_data
    with open(path, "wb") as f:
        f.write(body)


def torch_ms(fn, device, iters):
    import torch

    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1000 / iters


def time_torch(model, args, device, iters):
    """Eager f32 (TF32 off), eager bf16, and torch.compile f32 where it works."""
    import torch

    out, why = {}, {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.to(device)
    args = tuple(a.to(device) for a in args)
    with torch.no_grad():
        out["eager_f32"] = torch_ms(lambda: model(*args), device, iters)
        half = [a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]
        out["eager_bf16"] = torch_ms(lambda: model.to(torch.bfloat16)(*half), device, iters)
        model.float()
        try:
            compiled = torch.compile(model)
            out["compile_f32"] = torch_ms(lambda: compiled(*args), device, iters)
        except Exception as e:  # noqa: BLE001 - no Triton, no compiler: say why
            why["compile_f32"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return out, why


def run(cmd, timeout):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--egret", default="target/release/egret")
    p.add_argument("--out", default="torch-models")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default=None, help="egret's backend (default: ptx on cuda, cpu on cpu)")
    p.add_argument("--models", default="bert_base,gpt2_small,gpt2_small_step")
    p.add_argument("--small", action="store_true", help="2 layers of 64 wide, to rehearse")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    backend = a.backend or ("ptx" if a.device == "cuda" else "cpu")
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device for torch: use --device cpu to rehearse")
    report = {"device": a.device, "backend": backend, "torch": torch.__version__, "small": a.small, "models": {}}
    if a.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    for name in a.models.split(","):
        c = config(name, a.small)
        r = report["models"].setdefault(name, {"config": c})
        try:
            model, args, folder = export(name, c, a.out)
        except Exception as e:  # noqa: BLE001
            r["export_error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name}: export failed: {r['export_error']}")
            continue
        # Egret against torch's outputs (f32 at a looser tolerance for 12
        # layers of random weights; bf16 looser still).
        checks = [("f32", ["--rtol", "1e-3", "--atol", "1e-3"])]
        if backend == "ptx":
            checks.append(("bf16", ["--precision", "bf16", "--rtol", "5e-2", "--atol", "5e-2"]))
        for precision, flags in checks:
            code, out, err = run([a.egret, "check", folder, "--backend", backend, "-q", *flags], 600)
            r[f"check_{precision}"] = "passed" if code == 0 else (err or out).strip().splitlines()[-1][:300]
            extra = [] if precision == "f32" else ["--precision", precision]
            code, out, err = run([a.egret, "bench", folder, "--backend", backend, "--iters", str(a.iters), "--json",
                                  *extra], 900)
            if code == 0:
                r[f"egret_{precision}"] = json.loads(out)["median_ms"]
            else:
                r[f"egret_{precision}_error"] = (err or out).strip().splitlines()[-1][:300]
        times, why = time_torch(model, args, a.device, a.iters)
        r.update({f"torch_{k}": v for k, v in times.items()})
        r.update({f"torch_{k}_skipped": v for k, v in why.items()})
        print(name, json.dumps({k: v for k, v in r.items() if k != "config"}))
    with open(os.path.join(a.out, "torch_models.json"), "w") as f:
        json.dump(report, f, indent=1)
    # One markdown table: Egret against PyTorch eager at each precision.
    lines = ["| model | PyTorch eager f32 | Egret f32 | ratio | PyTorch eager bf16 | Egret bf16 | ratio | torch.compile f32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    ratio = lambda e, t: f"{e / t:.2f}x" if isinstance(e, (int, float)) and t else "-"  # noqa: E731
    for name, r in report["models"].items():
        lines.append(f"| {name} | {fmt(r.get('torch_eager_f32'))} | {fmt(r.get('egret_f32'))} | "
                     f"{ratio(r.get('egret_f32'), r.get('torch_eager_f32'))} | {fmt(r.get('torch_eager_bf16'))} | "
                     f"{fmt(r.get('egret_bf16'))} | {ratio(r.get('egret_bf16'), r.get('torch_eager_bf16'))} | "
                     f"{fmt(r.get('torch_compile_f32'))} |")
    print("\n".join(lines))
    with open(os.path.join(a.out, "torch_models.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
