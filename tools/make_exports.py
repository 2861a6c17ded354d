#!/usr/bin/env python3
"""Exports small Hugging Face models with PyTorch's ONNX exporters, the way
users export them, into `tests/data/exports/<name>/` with onnxruntime's
outputs (all graph optimisations off) as the reference:

  python3 tools/make_exports.py [--out DIR] [NAME...]

Each folder gets `model.onnx`, `test_data_set_0/{input,output}_N.pb` and
`meta.json` (exporter, opset, op counts, torch-versus-onnxruntime error).
Weights are random (seeded); nothing is downloaded. Needs torch,
transformers, onnx, onnxscript (the dynamo exporter) and onnxruntime; CI
needs none of them, since the outputs are committed.

Models (NAME):
- perceiver_wide_heads_dynamo / perceiver_wide_heads_legacy: `PerceiverModel`
  on raw inputs of 256 positions x 512 channels, 16 latents of 64, one
  cross-attention head of dimension 512 (shaped by the inputs:
  `cross_attention_shape_for_attention="kv"`) and a self-attention of 8
  heads of 8: the shape that once gave wrong answers on wgsl (a key tile
  that filled the workgroup memory).
"""

import argparse
import collections
import json
import os
import sys

import numpy as np


def perceiver():
    import torch
    from transformers import PerceiverConfig, PerceiverModel

    config = PerceiverConfig(
        num_latents=16,
        d_latents=64,
        d_model=512,
        cross_attention_shape_for_attention="kv",
        num_blocks=1,
        num_self_attends_per_block=1,
        num_self_attention_heads=8,
        num_cross_attention_heads=1,
        cross_attention_widening_factor=1,
        self_attention_widening_factor=1,
    )
    model = PerceiverModel(config)
    inputs = {"inputs": torch.randn(1, 256, 512)}

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inputs):
            return self.m(inputs=inputs).last_hidden_state

    return Wrapped(model), inputs, ["last_hidden_state"]


MODELS = {
    "perceiver_wide_heads_dynamo": (perceiver, "dynamo", 18),
    "perceiver_wide_heads_legacy": (perceiver, "legacy", 17),
}


def write_tensor(path, name, array):
    from onnx import numpy_helper

    t = numpy_helper.from_array(array, name)
    with open(path, "wb") as f:
        f.write(t.SerializeToString())


def export(name, out_dir):
    import onnx
    import onnxruntime as ort
    import torch

    make, exporter, opset = MODELS[name]
    torch.manual_seed(0)
    np.random.seed(0)
    model, inputs, output_names = make()
    model.eval()
    folder = os.path.join(out_dir, name)
    os.makedirs(os.path.join(folder, "test_data_set_0"), exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    args = tuple(inputs.values())
    with torch.no_grad():
        expected = model(*args)
        if exporter == "dynamo":
            program = torch.onnx.export(
                model, args, dynamo=True, opset_version=opset, input_names=list(inputs), output_names=output_names
            )
            program.save(path)
        else:
            torch.onnx.export(
                model, args, path, dynamo=False, opset_version=opset, input_names=list(inputs), output_names=output_names
            )
    m = onnx.load(path)
    # One file: fold any external data the exporter wrote back in.
    onnx.save(m, path, save_as_external_data=False)
    for f in os.listdir(folder):
        if f.endswith(".data"):
            os.remove(os.path.join(folder, f))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = session.run(None, feeds)
    for i, (k, v) in enumerate(feeds.items()):
        write_tensor(os.path.join(folder, "test_data_set_0", f"input_{i}.pb"), k, v)
    for i, (o, v) in enumerate(zip(session.get_outputs(), got)):
        write_tensor(os.path.join(folder, "test_data_set_0", f"output_{i}.pb"), o.name, v)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    meta = {
        "name": name,
        "exporter": exporter,
        "opset": opset,
        "nodes": len(m.graph.node),
        "ops": dict(collections.Counter(n.op_type for n in m.graph.node)),
        "torch_vs_ort": [float(np.abs(e.numpy() - g).max()) for e, g in zip(expected, got)],
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
    }
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {meta['nodes']} nodes, torch vs onnxruntime {meta['torch_vs_ort']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "exports"))
    parser.add_argument("names", nargs="*", help="models to export (default: all)")
    a = parser.parse_args()
    for name in a.names or MODELS:
        if name not in MODELS:
            sys.exit(f"unknown model {name}; known: {', '.join(MODELS)}")
        export(name, a.out)


if __name__ == "__main__":
    main()
