#!/usr/bin/env python3
"""Soak tests of one Python session: does its memory stay flat?

  python3 tools/soak.py [--runs 10000] [--shapes 1000]

1. One session of `tests/data/zoo/gpt2_tiny` runs its stored inputs `--runs`
   times. The resident set after a warm-up (the first 5% of runs) and at
   the end must agree within 1 MiB.
2. One session of `tests/data/synthetic/bert_dynamic` (symbolic batch and
   sequence) first runs its largest shape (batch 4, 64 tokens), then
   `--shapes` runs at random shapes up to it. The resident set must never
   rise more than 1 MiB above what it was after the largest shape ran.

Prints one line per part and exits 1 if either grew. Needs the `egret`
package (`pip install ./python`), numpy and onnx.
"""

import argparse
import glob
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

import egret

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def rss():
    """This process's resident set in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def repeated(runs):
    case = os.path.join(ROOT, "tests", "data", "zoo", "gpt2_tiny")
    sess = egret.InferenceSession(case, threads=1)
    feeds = {}
    for p in sorted(glob.glob(os.path.join(case, "test_data_set_0", "input_*.pb"))):
        t = onnx.load_tensor(p)
        feeds[t.name] = numpy_helper.to_array(t)
    warm = max(1, runs // 20)
    for _ in range(warm):
        sess.run(None, feeds)
    before = rss()
    peak = before
    for i in range(runs - warm):
        sess.run(None, feeds)
        if i % 100 == 0:
            peak = max(peak, rss())
    after = rss()
    grew = after - before
    print(f"repeated: {runs} runs of gpt2_tiny; resident {before / MIB:.1f} MiB after {warm} warm-up runs, "
          f"{after / MIB:.1f} MiB at the end ({grew / MIB:+.2f} MiB), peak {peak / MIB:.1f} MiB")
    return grew <= MIB


def shapes(count, seed=1):
    sess = egret.InferenceSession(os.path.join(ROOT, "tests", "data", "synthetic", "bert_dynamic"), threads=1)
    rng = np.random.default_rng(seed)

    def feeds(batch, sequence):
        return {
            "input_ids": rng.integers(0, 128, size=(batch, sequence), dtype=np.int64),
            "attention_mask": np.ones((batch, sequence), dtype=np.int64),
        }

    for _ in range(3):
        sess.run(None, feeds(4, 64))
    base = rss()
    peak = base
    for _ in range(count):
        sess.run(None, feeds(int(rng.integers(1, 5)), int(rng.integers(1, 65))))
        peak = max(peak, rss())
    print(f"shapes: {count} runs of bert_dynamic at random shapes up to 4 x 64; resident {base / MIB:.1f} MiB "
          f"after the largest shape, at most {peak / MIB:.1f} MiB after ({(peak - base) / MIB:+.2f} MiB)")
    return peak - base <= MIB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--shapes", type=int, default=1000)
    a = ap.parse_args()
    ok = repeated(a.runs)
    ok = shapes(a.shapes) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
