#!/usr/bin/env python3
"""Time from start to the first result, Egret against onnxruntime, side by
side: each measurement a fresh process that loads the model, compiles it
(or creates onnxruntime's session, default optimisations) and runs it once
on the model's `test_data_set_0` inputs. No cache on either side; the
model's file is in the page cache for both (a warm-up load first). Reports
the medians over alternating rounds, and each process's peak resident set.

  python3 tools/first_result.py MODEL_DIR... [--rounds 5] [--threads 1]

Needs onnxruntime, onnx and the `egret` Python package (pip install ./python).
"""
import argparse, glob, json, os, statistics, subprocess, sys

CHILD = r"""
import glob, json, os, resource, sys, time
t0 = time.perf_counter()
import numpy as np, onnx
from onnx import numpy_helper
which, folder, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
feeds = {}
for p in sorted(glob.glob(os.path.join(folder, "test_data_set_0", "input_*.pb"))):
    t = onnx.load_tensor(p)
    feeds[t.name] = numpy_helper.to_array(t)
path = os.path.join(folder, "model.onnx")
if which == "onnxruntime":
    import onnxruntime as ort
    imported = time.perf_counter()
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
else:
    import egret
    imported = time.perf_counter()
    s = egret.InferenceSession(path, threads=threads)
made = time.perf_counter()
s.run(None, feeds)
done = time.perf_counter()
print(json.dumps({"session_s": made - imported, "first_result_s": done - imported,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(which, folder, threads):
    out = subprocess.run([sys.executable, "-c", CHILD, which, folder, str(threads)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{which} on {folder} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    print(f"{'model':32} {'onnxruntime s':>14} {'egret s':>9} {'ratio':>6} {'ort MiB':>8} {'egret MiB':>9}")
    for folder in a.models:
        name = os.path.basename(os.path.normpath(folder))
        measure("onnxruntime", folder, a.threads)  # the file into the page cache
        runs = {"onnxruntime": [], "egret": []}
        for _ in range(a.rounds):
            for which in runs:
                runs[which].append(measure(which, folder, a.threads))
        med = {w: statistics.median(r["first_result_s"] for r in rs) for w, rs in runs.items()}
        peak = {w: max(r["peak_mib"] for r in rs) for w, rs in runs.items()}
        print(f"{name:32} {med['onnxruntime']:14.2f} {med['egret']:9.2f} {med['egret'] / med['onnxruntime']:6.2f} "
              f"{peak['onnxruntime']:8.0f} {peak['egret']:9.0f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
