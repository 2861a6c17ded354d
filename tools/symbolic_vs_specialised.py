#!/usr/bin/env python3
"""A session whose dims stay symbolic against one compiled for the shape,
side by side at the same shapes:

  python3 tools/symbolic_vs_specialised.py [--tokens 64] [--runs 200] [--models DIR]

For each model (BERT-style `bert_dynamic`, GPT-2 with a KV cache
`gpt2_kv` over an empty past, from `tests/data/synthetic`; with `--models
DIR`, every such model in DIR, such as the `_wide` variants
`tools/make_synthetic_models.py DIR bert_dynamic_wide gpt2_kv_wide` writes,
which embed 512 positions) it makes two sessions: one without `dims`
(its CPU program keeps the batch, sequence and past lengths symbolic,
compiled when the session is made) and one with the dims given
(specialised). It reports the time of the first run at the shape (the
symbolic session's compile) and the median run time after it, each
session's best of three alternating rounds. Needs the `egret` package
(`pip install ./python`) and numpy.
"""

import argparse
import os
import time

import numpy as np

import egret

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(ROOT, "tests", "data", "synthetic")


def feeds_for(path, tokens):
    """Inputs of batch 1 and `tokens` tokens (and an empty past)."""
    sess = egret.InferenceSession(path, threads=1)
    feeds = {}
    rng = np.random.default_rng(0)
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 90, size=(1, tokens), dtype=np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, tokens), dtype=np.int64)
        else:  # past_key_values.N.key/.value: [batch, heads, 0, head_dim]
            shape = [1 if d == "batch" else 0 if d == "past_sequence" else d for d in i.shape]
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
    dims = {"batch": 1, "sequence": tokens}
    if any(i.name.startswith("past_key_values") for i in sess.get_inputs()):
        dims["past_sequence"] = 0
    return feeds, dims


def timed(sess, feeds, runs):
    t = time.perf_counter()
    first = sess.run(None, feeds)
    first_ms = (time.perf_counter() - t) * 1e3
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return first, first_ms, float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The synthetic models in the repository embed at most 64 positions.
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--models", default=SYNTHETIC)
    args = ap.parse_args()
    models = sorted(m for m in os.listdir(args.models) if m.startswith(("bert_dynamic", "gpt2_kv")))
    print(f"| model | tokens | symbolic first run ms | specialised first run ms | symbolic median ms | specialised median ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in models:
        path = os.path.join(args.models, model)
        feeds, dims = feeds_for(path, args.tokens)
        best = {"symbolic": (float("inf"), float("inf")), "specialised": (float("inf"), float("inf"))}
        for _ in range(3):
            for kind in best:
                sess = egret.InferenceSession(path, threads=1, dims=None if kind == "symbolic" else dims)
                out, first_ms, median_ms = timed(sess, feeds, args.runs)
                if kind == "symbolic":
                    want = out
                else:
                    for g, w in zip(out, want):
                        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
                f, m = best[kind]
                best[kind] = (min(f, first_ms), min(m, median_ms))
        (sf, sm), (pf, pm) = best["symbolic"], best["specialised"]
        print(f"| {model} | {args.tokens} | {sf:.2f} | {pf:.2f} | {sm:.4f} | {pm:.4f} | {sm / pm:.2f} |")


if __name__ == "__main__":
    main()
