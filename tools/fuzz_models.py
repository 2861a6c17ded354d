#!/usr/bin/env python3
"""Mutation fuzzing of real models against onnxruntime.

Each mutant is a model in the ONNX test layout with one change: an attribute
set to an odd value, an initializer's values, dims, dtype or bytes altered, a
node input rewired, dropped or swapped, a node removed or its op type
changed, a declared shape or opset changed, an intermediate made an output.
onnxruntime, with its graph optimisations off (its fusions do not all check
the constants they absorb, so an optimised session can be the one that is
wrong), decides what the mutant means:

- it runs: egret check must pass at --opt 2, at --opt 0 and on the reference
  backend, or fail with an error naming what it does not support;
- it refuses the model: egret run must fail with an error, or run.

Never allowed: a panic, a crash, a hang, or different outputs (WRONG). The
mutants worth a look (anything but a plain pass or a shared refusal) are
kept under --out and printed as JSON lines; the rest are deleted.

    python3 tools/fuzz_models.py tests/data/zoo/bert_tiny --count 200 --seed 1 --out /tmp/fuzz/bert

Needs onnx, onnxruntime and numpy, and a release build (cargo build --release).
"""

import argparse
import copy
import glob
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

INTS = [-100, -5, -3, -2, -1, 0, 1, 2, 3, 4, 7, 64, 1 << 20, 1 << 31, -(1 << 40)]
FLOATS = [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), 2.0]
OP_TYPES = ["Add", "Mul", "Sub", "Div", "MatMul", "Relu", "Softmax", "Transpose", "Reshape", "Concat",
            "Gather", "Where", "Pow", "Sqrt", "ReduceMean", "Erf", "Tanh", "Sigmoid", "Cast", "Unsqueeze",
            "Squeeze", "Slice", "Expand", "LayerNormalization", "Gemm", "Max", "Min", "Neg", "Exp", "Log",
            "Shape", "ConstantOfShape", "Range", "Equal", "Split"]
KINDS = ["attr", "attr", "attr", "init_dims", "init_dtype", "init_trunc", "init_values", "init_reshape",
         "rewire", "rewire", "drop_input", "swap_inputs", "remove_node", "optype", "dup_output",
         "input_shape", "output_intermediate", "output_decl", "value_info", "opset", "const_attr",
         # Plausible changes, which keep most models valid and so test the
         # answers rather than the errors: an axis moved by one or two, a
         # permutation shuffled, a constant (a scale, a mask, an epsilon)
         # multiplied by a factor near one.
         "attr_nearby", "attr_nearby", "constant_scaled", "constant_scaled"]


def value_names(g):
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    for n in g.node:
        names += list(n.output)
    return [x for x in names if x]


def set_element(t, rng):
    """Sets one element of tensor proto `t` to an odd value; False if `t` is empty."""
    arr = numpy_helper.to_array(t).copy()
    if arr.size == 0:
        return False
    flat = arr.reshape(-1)
    i = rng.randrange(flat.size)
    if arr.dtype.kind == "f":
        flat[i] = rng.choice(FLOATS)
    elif arr.dtype.kind in "iu":
        flat[i] = rng.choice([-2, -1, 0, 1, 2, 3, 100, 1 << 20])
    t.CopyFrom(numpy_helper.from_array(flat.reshape(arr.shape), t.name))
    return True


def numeric_attribute(nodes, rng):
    """A random (node, attribute) whose attribute is a float, int, floats or ints."""
    cands = [(n, a) for n in nodes for a in n.attribute if a.type in (1, 2, 6, 7)]
    return rng.choice(cands) if cands else (None, None)


def mutate(m, rng):
    """Applies one mutation in place; returns its description, or None."""
    g = m.graph
    nodes = list(g.node)
    kind = rng.choice(KINDS)
    if kind == "attr":
        n, a = numeric_attribute(nodes, rng)
        if a is None:
            return None
        if a.type == 2:
            a.i = rng.choice(INTS)
        elif a.type == 1:
            a.f = rng.choice(FLOATS)
        elif a.type == 7:
            ints = list(a.ints)
            op = rng.choice(["set", "drop", "dup", "swap"])
            if op == "set" and ints:
                ints[rng.randrange(len(ints))] = rng.choice(INTS)
            elif op == "drop" and ints:
                ints.pop(rng.randrange(len(ints)))
            elif op == "dup":
                ints.append(rng.choice(ints) if ints else 0)
            elif op == "swap" and len(ints) > 1:
                i, j = rng.sample(range(len(ints)), 2)
                ints[i], ints[j] = ints[j], ints[i]
            del a.ints[:]
            a.ints.extend(ints)
        else:
            fl = list(a.floats)
            if fl:
                fl[rng.randrange(len(fl))] = rng.choice(FLOATS)
            del a.floats[:]
            a.floats.extend(fl)
        return f"attr {n.op_type} {n.name} {a.name}"
    if kind.startswith("init_"):
        cands = [t for t in g.initializer if kind != "init_reshape" or len(t.dims) >= 2]
        if not cands:
            return None
        t = rng.choice(cands)
        if kind == "init_dims":
            d = list(t.dims)
            op = rng.choice(["drop", "add", "double", "zero"])
            if op == "drop" and d:
                d.pop(rng.randrange(len(d)))
            elif op == "add":
                d.insert(rng.randrange(len(d) + 1), 1)
            elif op == "double" and d:
                d[rng.randrange(len(d))] *= 2
            elif op == "zero" and d:
                d[rng.randrange(len(d))] = 0
            del t.dims[:]
            t.dims.extend(d)
        elif kind == "init_dtype":
            t.data_type = rng.choice([TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.DOUBLE,
                                      TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.UINT8, 0, 99])
        elif kind == "init_trunc":
            if not t.raw_data:
                return None
            t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)]
        elif kind == "init_reshape":
            d = list(t.dims)
            d = d[::-1] if rng.random() < 0.5 else [int(np.prod(d))]
            del t.dims[:]
            t.dims.extend(d)
        elif not set_element(t, rng):
            return None
        return f"{kind} {t.name}"
    if kind == "rewire":
        n = rng.choice(nodes)
        if not n.input:
            return None
        i = rng.randrange(len(n.input))
        r = rng.random()
        n.input[i] = "does_not_exist" if r < 0.1 else "" if r < 0.2 else rng.choice(value_names(g))
        return f"rewire {n.op_type} {n.name} input {i} -> {n.input[i]}"
    if kind == "drop_input":
        n = rng.choice(nodes)
        if not n.input:
            return None
        del n.input[-1]
        return f"drop_input {n.op_type} {n.name}"
    if kind == "swap_inputs":
        cands = [n for n in nodes if len([i for i in n.input if i]) >= 2]
        if not cands:
            return None
        n = rng.choice(cands)
        ins = list(n.input)
        ins[0], ins[1] = ins[1], ins[0]
        del n.input[:]
        n.input.extend(ins)
        return f"swap_inputs {n.op_type} {n.name}"
    if kind == "remove_node":
        n = rng.choice(nodes)
        g.node.remove(n)
        return f"remove_node {n.op_type} {n.name}"
    if kind == "optype":
        n = rng.choice(nodes)
        old, n.op_type = n.op_type, rng.choice(OP_TYPES)
        return f"optype {n.name} {old}->{n.op_type}"
    if kind == "dup_output":
        n = rng.choice(nodes)
        if not n.output:
            return None
        n.output[0] = rng.choice(value_names(g))
        return f"dup_output {n.op_type} {n.name} -> {n.output[0]}"
    if kind == "input_shape":
        if not g.input:
            return None
        vi = rng.choice(list(g.input))
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            return None
        d = rng.choice(list(dims))
        op = rng.choice(["val", "param", "clear"])
        if op == "val":
            d.dim_value = rng.choice([0, 1, 2, 3, 5, 1 << 40])
        elif op == "param":
            d.dim_param = rng.choice(["batch", "seq", "n"])
        else:
            d.Clear()
        return f"input_shape {vi.name} {op}"
    if kind == "output_intermediate":
        o = rng.choice([o for n in nodes for o in n.output if o])
        g.output.append(helper.make_empty_tensor_value_info(o))
        return f"output_intermediate {o}"
    if kind == "output_decl":
        o = rng.choice(list(g.output))
        tt = o.type.tensor_type
        if rng.random() < 0.5:
            tt.elem_type = rng.choice([7, 9, 10, 11])
        elif tt.shape.dim:
            rng.choice(list(tt.shape.dim)).dim_value = rng.choice([1, 2, 5, 1000])
        return f"output_decl {o.name}"
    if kind == "value_info":
        o = rng.choice([o for n in nodes for o in n.output if o])
        shape = [rng.choice([1, 2, 3, 7]) for _ in range(rng.randrange(4))]
        g.value_info.append(helper.make_tensor_value_info(o, rng.choice([1, 7, 9]), shape))
        return f"value_info {o}"
    if kind == "opset":
        v = rng.choice([1, 6, 7, 9, 11, 12, 13, 17, 18, 21, 23, 99])
        m.opset_import[0].version = v
        return f"opset {v}"
    if kind == "const_attr":
        cands = [n for n in nodes if n.op_type == "Constant" and n.attribute and n.attribute[0].type == 4]
        if not cands:
            return None
        n = rng.choice(cands)
        if not set_element(n.attribute[0].t, rng):
            return None
        return f"const_attr {n.name}"
    if kind == "attr_nearby":
        n, a = numeric_attribute(nodes, rng)
        if a is None:
            return None
        if a.type == 2:
            a.i += rng.choice([-2, -1, 1, 2])
        elif a.type == 1:
            a.f *= rng.uniform(0.5, 2.0)
        elif a.type == 7:
            ints = list(a.ints)
            if len(ints) > 1 and rng.random() < 0.7:
                rng.shuffle(ints)
            elif ints:
                ints[rng.randrange(len(ints))] += rng.choice([-1, 1])
            del a.ints[:]
            a.ints.extend(ints)
        else:
            fl = [f * rng.uniform(0.5, 2.0) for f in a.floats]
            del a.floats[:]
            a.floats.extend(fl)
        return f"attr_nearby {n.op_type} {n.name} {a.name}"
    if kind == "constant_scaled":
        tensors = [(t.name, t) for t in g.initializer]
        tensors += [(n.name, n.attribute[0].t) for n in nodes
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].type == 4]
        tensors = [(name, t) for name, t in tensors if t.data_type == TensorProto.FLOAT]
        if not tensors:
            return None
        name, t = rng.choice(tensors)
        arr = numpy_helper.to_array(t).copy()
        if arr.size == 0:
            return None
        if rng.random() < 0.5:
            arr = arr * np.float32(rng.uniform(0.5, 2.0))
        else:
            flat = arr.reshape(-1)
            flat[rng.randrange(flat.size)] *= np.float32(rng.uniform(-2.0, 2.0))
        t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), t.name))
        return f"constant_scaled {name}"
    raise AssertionError(kind)


def run(cmd, timeout):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        return "timeout", ""


def verdict(rc, out, oracle_ran):
    crashed = rc == "timeout" or rc < 0 or rc == 101 or rc > 128 or "panicked" in out
    if crashed:
        return "PANIC"
    if rc == 0:
        return "pass" if oracle_ran else "ran"
    # `check` exits 1 both for errors (an `error:` line) and for mismatches.
    if oracle_ran and "    error:" not in out:
        return "WRONG"
    return "error"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a folder with model.onnx and test_data_set_0/")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="where the interesting mutants are kept")
    ap.add_argument("--egret", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "egret"))
    ap.add_argument("--timeout", type=int, default=120, help="seconds per egret command")
    args = ap.parse_args()

    base = onnx.load(os.path.join(args.model, "model.onnx"))
    inputs = [onnx.load_tensor(f) for f in sorted(glob.glob(os.path.join(args.model, "test_data_set_0", "input_*.pb")))]
    os.makedirs(args.out, exist_ok=True)
    tally = Counter()
    for seed in range(args.seed, args.seed + args.count):
        rng = random.Random(seed)
        m = copy.deepcopy(base)
        desc = mutate(m, rng)
        if desc is None:
            continue
        d = os.path.join(args.out, f"m{seed}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(os.path.join(d, "test_data_set_0"))
        raw = m.SerializeToString()
        with open(os.path.join(d, "model.onnx"), "wb") as f:
            f.write(raw)
        oracle_ran = False
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 4
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(raw, so, providers=["CPUExecutionProvider"])
            feed = {vi.name: numpy_helper.to_array(t) for vi, t in zip(sess.get_inputs(), inputs)}
            outs = sess.run(None, feed)
            for i, (vi, t) in enumerate(zip(sess.get_inputs(), inputs)):
                t = numpy_helper.from_array(numpy_helper.to_array(t), vi.name)
                onnx.save_tensor(t, os.path.join(d, "test_data_set_0", f"input_{i}.pb"))
            for i, (o, v) in enumerate(zip(sess.get_outputs(), outs)):
                t = numpy_helper.from_array(np.asarray(v), o.name)
                onnx.save_tensor(t, os.path.join(d, "test_data_set_0", f"output_{i}.pb"))
            oracle_ran = True
        except Exception:
            pass
        if oracle_ran:
            commands = [["check", d, "-q"], ["check", d, "-q", "--opt", "0"], ["check", d, "-q", "--backend", "reference"]]
        else:
            commands = [["run", d], ["run", d, "--opt", "0"]]
        results = []
        for c in commands:
            rc, out = run([args.egret] + c, args.timeout)
            lines = out.strip().splitlines()
            results.append((verdict(rc, out, oracle_ran), lines[-3:]))
        kinds = tuple(v for v, _ in results)
        tally[("onnxruntime ran" if oracle_ran else "onnxruntime refused", kinds)] += 1
        # A mutant onnxruntime runs and Egret refuses is kept too: the error
        # may be a missing feature or a check stricter than the standard.
        boring = kinds == ("pass",) * 3 or kinds == ("error",) * 2
        if boring:
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(json.dumps({"seed": seed, "mutant": d, "mutation": desc, "onnxruntime_ran": oracle_ran,
                              "egret": [{"verdict": v, "tail": t} for v, t in results]}), flush=True)
    for (oracle, kinds), n in sorted(tally.items()):
        print(f"{n:5d}  {oracle}: egret {', '.join(kinds)}", file=sys.stderr)
    bad = sum(n for (_, kinds), n in tally.items() if "PANIC" in kinds or "WRONG" in kinds)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
