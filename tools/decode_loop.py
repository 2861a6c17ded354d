#!/usr/bin/env python3
"""Greedy decoding with a key/value cache, in onnxruntime and in Egret side
by side: the prompt runs over an empty past, then each step feeds the
previous step's presents back as the past and appends the arg-max token.

  python3 tools/decode_loop.py [MODEL_DIR] [--tokens 64] [--threads 1] [--past N] [--rounds 5] [--json F]

MODEL_DIR defaults to tests/data/synthetic/gpt2_kv (Hugging Face's layout:
`input_ids`, `attention_mask`, `past_key_values.N.key/.value` in, and
`position_ids` for LLaMA-style models; `logits`, `present.N.key/.value`
out). `tools/make_exports.py gpt2_small_past_legacy llama_150m_past_legacy`
writes GPT-2 small (124M) and a LLaMA of about 150M at
`target/bench-exports/`. Prints both token sequences (they
must be identical) and the time per token of each.

With `--past N` the loop starts from a cache of N positions (seeded random
keys and values, standard normal, the same for both runtimes) and the
prompt's first token at position N: the long-context case (`--past 960
--tokens 32` stays inside GPT-2's 1,024 positions).

The session imports and optimises the model once with its dims symbolic.
Its CPU plan keeps the batch, sequence and past lengths symbolic (its
kernels read them at run time): the prompt and every step after it run from
one program, compiled when the session is made (the script also runs a
session given the batch, the same program with one symbol fewer). It reports each side's median time per
token and its mean over the loop (a compile at a run would be in Egret's
mean), and Egret's again through an IOBinding. With `--rounds R` it then
times R alternating rounds (onnxruntime, Egret, Egret through an IOBinding)
and reports each side's median of its rounds' medians (`--json` appends
every round's figures as one JSON line). Needs the `egret`
Python package (`pip install ./python`), onnxruntime and onnx.
"""

import argparse
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import egret

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompt_of(model_dir):
    """The stored first data set's prompt and the cache's shape."""
    set0 = os.path.join(model_dir, "test_data_set_0")
    feeds = {}
    for f in sorted(os.listdir(set0)):
        if f.startswith("input_"):
            t = onnx.load_tensor(os.path.join(set0, f))
            feeds[t.name] = numpy_helper.to_array(t)
    return feeds


def with_past(feeds, past, seed=0):
    """`feeds` started from a random cache of `past` positions: the
    prompt's first token at position `past`."""
    rng = np.random.default_rng(seed)
    out = {"input_ids": feeds["input_ids"][:, :1]}
    batch = out["input_ids"].shape[0]
    out["attention_mask"] = np.ones((batch, past + 1), dtype=np.int64)
    for name, value in feeds.items():
        if name.startswith("past_key_values."):
            shape = list(value.shape)
            shape[2] = past
            out[name] = rng.standard_normal(shape).astype(value.dtype)
    if "position_ids" in feeds:
        out["position_ids"] = np.full((batch, 1), past, dtype=np.int64)
    return out


def decode(run, feeds, tokens):
    """Greedy decoding; `run(feeds)` returns the outputs by name."""
    feeds = dict(feeds)
    out_ids, times = [], []
    for _ in range(tokens):
        start = time.perf_counter()
        outs = run(feeds)
        times.append(time.perf_counter() - start)
        token = int(outs["logits"][0, -1].argmax())
        out_ids.append(token)
        past = {k.replace("present.", "past_key_values."): v for k, v in outs.items() if k.startswith("present.")}
        mask = np.ones((1, feeds["attention_mask"].shape[1] + 1), dtype=np.int64)
        positions = "position_ids" in feeds
        feeds = {"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": mask, **past}
        if positions:
            # LLaMA-style models take the new token's position.
            feeds["position_ids"] = np.array([[mask.shape[1] - 1]], dtype=np.int64)
    return out_ids, times


def decode_bound(sess, feeds, tokens):
    """Greedy decoding through an IOBinding: each step's presents stay on
    Egret's side (OrtValues) and are bound as the next step's past."""
    io = sess.io_binding()
    names = [o.name for o in sess.get_outputs()]
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    for name in names:
        io.bind_output(name)
    mask = feeds["attention_mask"].shape[1]
    out_ids, times = [], []
    for _ in range(tokens):
        start = time.perf_counter()
        sess.run_with_iobinding(io)
        outs = dict(zip(names, io.get_outputs()))
        token = int(outs["logits"].numpy()[0, -1].argmax())
        mask += 1
        io.bind_cpu_input("input_ids", np.array([[token]], dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, mask), dtype=np.int64))
        if "position_ids" in feeds:
            io.bind_cpu_input("position_ids", np.array([[mask - 1]], dtype=np.int64))
        for k, v in outs.items():
            if k.startswith("present."):
                io.bind_ortvalue_input(k.replace("present.", "past_key_values."), v)
        times.append(time.perf_counter() - start)
        out_ids.append(token)
    return out_ids, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.path.join(ROOT, "tests", "data", "synthetic", "gpt2_kv"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--past", type=int, default=0, help="start from a random cache of this many positions")
    ap.add_argument("--rounds", type=int, default=1,
                    help="after the checks, this many alternating timed rounds (onnxruntime, Egret, Egret through "
                         "an IOBinding), each side's figure the median of its rounds' medians")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()
    path = os.path.join(args.model, "model.onnx")
    feeds = prompt_of(args.model)
    if args.past:
        feeds = with_past(feeds, args.past)

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ort_ids, ort_times = decode(lambda f: dict(zip(names, session.run(None, f))), feeds, args.tokens)

    # One session, as with onnxruntime, made without dims: it compiles a
    # program for the prompt's sequence length and one for the steps'.
    sess = egret.InferenceSession(args.model, threads=args.threads)
    out_names = [o.name for o in sess.get_outputs()]
    egret_decode = lambda: decode(lambda f: dict(zip(out_names, sess.run(None, f))), feeds, args.tokens)
    egret_ids, first_pass = egret_decode()
    compiles = sess.compiled_shapes()
    again_ids, second_pass = egret_decode()
    assert again_ids == egret_ids
    assert sess.compiled_shapes() == compiles, "a second pass over the same loop compiled again"
    bound_ids, bound_pass = decode_bound(sess, feeds, args.tokens)
    assert bound_ids == egret_ids
    # Given its batch, the session compiles its one program when it is made.
    batch = feeds["input_ids"].shape[0]
    ready = egret.InferenceSession(args.model, threads=args.threads, dims={"batch": batch})
    ready_ids, ready_pass = decode(lambda f: dict(zip(out_names, ready.run(None, f))), feeds, args.tokens)
    assert ready_ids == egret_ids
    ms = lambda ts: 1e3 * float(np.median(ts))
    mean = lambda ts: 1e3 * sum(ts) / len(ts)
    print(f"onnxruntime tokens: {ort_ids}")
    print(f"egret tokens:       {egret_ids}")
    print(f"identical: {ort_ids == egret_ids}")
    print(f"onnxruntime: {ms(ort_times):.3f} ms per token (median of {args.tokens}, {args.threads} thread), "
          f"{mean(ort_times):.3f} mean")
    print(f"egret:       {ms(first_pass):.3f} ms per token (median), {mean(first_pass):.3f} mean, "
          f"{compiles} program(s) for the prompt and every step; {ms(second_pass):.3f} median on a second "
          f"pass, {ms(bound_pass):.3f} through an IOBinding (the presents kept on Egret's side)")
    print(f"egret, made with dims={{'batch': {batch}}}: {ms(ready_pass):.3f} ms per token (median), "
          f"{mean(ready_pass):.3f} mean")
    if ort_ids != egret_ids:
        raise SystemExit("the token sequences differ")
    if args.rounds > 1:
        rounds = {"onnxruntime": [], "egret": [], "egret_iobinding": []}
        for _ in range(args.rounds):
            ids, ts = decode(lambda f: dict(zip(names, session.run(None, f))), feeds, args.tokens)
            assert ids == ort_ids
            rounds["onnxruntime"].append(ms(ts))
            ids, ts = egret_decode()
            assert ids == egret_ids
            rounds["egret"].append(ms(ts))
            ids, ts = decode_bound(sess, feeds, args.tokens)
            assert ids == egret_ids
            rounds["egret_iobinding"].append(ms(ts))
        medians = {k: float(np.median(v)) for k, v in rounds.items()}
        print(f"{args.rounds} alternating rounds, ms per token (each round's median of {args.tokens} steps):")
        for k, v in rounds.items():
            print(f"  {k:16} median {medians[k]:7.3f}   rounds " + ", ".join(f"{x:.2f}" for x in v))
        print(f"  egret / onnxruntime: {medians['egret'] / medians['onnxruntime']:.3f} "
              f"(IOBinding {medians['egret_iobinding'] / medians['onnxruntime']:.3f})")
        if args.json:
            import json
            with open(args.json, "a") as out:
                out.write(json.dumps({
                    "model": os.path.basename(os.path.normpath(args.model)), "threads": args.threads,
                    "past": args.past, "tokens": args.tokens, "identical": ort_ids == egret_ids,
                    "rounds": rounds, "medians": medians,
                }) + "\n")


if __name__ == "__main__":
    main()
