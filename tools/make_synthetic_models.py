#!/usr/bin/env python3
"""Writes small transformer models of the families the zoo lacks, in the
form PyTorch's dynamo exporter (opset 18) gives them, with onnxruntime's
outputs as the reference: `tests/data/synthetic/<name>/model.onnx` and
`test_data_set_0/{input,output}_N.pb`, the layout of the zoo.

  python3 tools/make_synthetic_models.py [OUT_DIR]

Needs only `onnx`, `numpy` and `onnxruntime`. The weights are random
(seeded), so the files are reproducible; the graphs spell the operations
out the way the exporter does (no fused ONNX ops), so Egret must recognise
them:

- llama_tiny: a LLaMA-style decoder. RMS norms written as
  Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul with the weight on the left,
  rotary position embeddings (rotate_half by Slice/Neg/Concat, cos and sin
  computed in the graph), grouped-query attention (2 K/V heads repeated to
  4 by Unsqueeze/Expand/Reshape), a causal mask from Trilu and Where, the
  scaled-dot-product decomposition that scales q and k^T by d^-1/4 each,
  and a SwiGLU MLP (x sigmoid(x) * up).
"""

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class Builder:
    """A graph under construction: nodes, initialisers, fresh names."""

    def __init__(self, rng):
        self.rng = rng
        self.nodes = []
        self.inits = []
        self.count = 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint="c", dtype=np.float32):
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def weight(self, shape, hint, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        return self.const(self.rng.standard_normal(shape) * scale, hint)

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name("node_" + op_type), **attrs))
        return out

    def ints(self, values, hint="shape"):
        return self.const(values, hint, np.int64)


def rms_norm(b, x, hidden, eps):
    # HF LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).
    sq = b.op("Pow", [x, b.const(2.0)])
    mean = b.op("ReduceMean", [sq, b.ints([-1], "axes")], keepdims=1)
    r = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [mean, b.const(eps)])])])
    weight = b.const(1.0 + 0.1 * b.rng.standard_normal(hidden), "norm_weight")
    return b.op("Mul", [weight, b.op("Mul", [x, r])])


def rotate_half(b, x, half):
    x1 = b.op("Slice", [x, b.ints([0]), b.ints([half]), b.ints([-1])])
    x2 = b.op("Slice", [x, b.ints([half]), b.ints([2**62]), b.ints([-1])])
    return b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)


def llama_tiny(rng):
    vocab, hidden, heads, kv_heads, head_dim, inter, layers, seq = 256, 64, 4, 2, 16, 176, 2, 16
    eps = 1e-6
    b = Builder(rng)
    ids = "input_ids"
    x = b.op("Gather", [b.weight([vocab, hidden], "embed", 1.0), ids], axis=0)

    # Rotary tables from the positions, as HF's LlamaRotaryEmbedding: the
    # outer product of inverse frequencies and positions, duplicated.
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    positions = b.const(np.arange(seq, dtype=np.float32).reshape(1, 1, seq), "positions")
    freqs = b.op("MatMul", [b.const(inv_freq.reshape(1, head_dim // 2, 1), "inv_freq"), positions])
    freqs = b.op("Transpose", [freqs], perm=[0, 2, 1])
    emb = b.op("Concat", [freqs, freqs], axis=-1)
    cos = b.op("Unsqueeze", [b.op("Cos", [emb]), b.ints([1], "axes")])
    sin = b.op("Unsqueeze", [b.op("Sin", [emb]), b.ints([1], "axes")])

    # Causal mask: Trilu of ones, then 0 where allowed and -inf elsewhere.
    ones = b.const(np.ones((seq, seq), dtype=bool), "ones", bool)
    allowed = b.op("Trilu", [ones], upper=0)
    mask = b.op("Where", [allowed, b.const(0.0), b.const(-np.inf)])

    quarter_scale = b.const(float(head_dim) ** -0.25, "scale")
    for _ in range(layers):
        h = rms_norm(b, x, hidden, eps)
        q = b.op("MatMul", [h, b.weight([hidden, heads * head_dim], "wq")])
        k = b.op("MatMul", [h, b.weight([hidden, kv_heads * head_dim], "wk")])
        v = b.op("MatMul", [h, b.weight([hidden, kv_heads * head_dim], "wv")])
        q = b.op("Transpose", [b.op("Reshape", [q, b.ints([1, seq, heads, head_dim])])], perm=[0, 2, 1, 3])
        k = b.op("Transpose", [b.op("Reshape", [k, b.ints([1, seq, kv_heads, head_dim])])], perm=[0, 2, 1, 3])
        v = b.op("Transpose", [b.op("Reshape", [v, b.ints([1, seq, kv_heads, head_dim])])], perm=[0, 2, 1, 3])
        q = b.op("Add", [b.op("Mul", [q, cos]), b.op("Mul", [rotate_half(b, q, head_dim // 2), sin])])
        k = b.op("Add", [b.op("Mul", [k, cos]), b.op("Mul", [rotate_half(b, k, head_dim // 2), sin])])
        # repeat_kv: [1, kv, s, d] -> [1, kv, rep, s, d] -> [1, heads, s, d].
        rep = heads // kv_heads
        expanded = [1, kv_heads, rep, seq, head_dim]
        k = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [k, b.ints([2], "axes")]), b.ints(expanded)]),
                             b.ints([1, heads, seq, head_dim])])
        v = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [v, b.ints([2], "axes")]), b.ints(expanded)]),
                             b.ints([1, heads, seq, head_dim])])
        # torch's scaled_dot_product_attention decomposition.
        qs = b.op("Mul", [q, quarter_scale])
        kt = b.op("Mul", [b.op("Transpose", [k], perm=[0, 1, 3, 2]), quarter_scale])
        scores = b.op("Add", [b.op("MatMul", [qs, kt]), mask])
        attn = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
        attn = b.op("Reshape", [b.op("Transpose", [attn], perm=[0, 2, 1, 3]), b.ints([1, seq, hidden])])
        x = b.op("Add", [x, b.op("MatMul", [attn, b.weight([hidden, hidden], "wo")])])

        h = rms_norm(b, x, hidden, eps)
        gate = b.op("MatMul", [h, b.weight([hidden, inter], "w_gate")])
        up = b.op("MatMul", [h, b.weight([hidden, inter], "w_up")])
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        x = b.op("Add", [x, b.op("MatMul", [act, b.weight([inter, hidden], "w_down")])])

    h = rms_norm(b, x, hidden, eps)
    logits = b.op("MatMul", [h, b.weight([hidden, vocab], "lm_head")], hint="logits")
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="node_output"))
    graph = helper.make_graph(
        b.nodes,
        "llama_tiny",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, seq, vocab])],
        b.inits,
    )
    inputs = {ids: rng.integers(0, vocab, size=(1, seq), dtype=np.int64)}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what opset 18 exports carry; onnxruntime reads up to 13
    return model, inputs


def write(out_dir, name, model, inputs):
    onnx.checker.check_model(model, full_check=True)
    case = os.path.join(out_dir, name)
    data = os.path.join(case, "test_data_set_0")
    os.makedirs(data, exist_ok=True)
    onnx.save(model, os.path.join(case, "model.onnx"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, inputs)
    for i, (k, v) in enumerate(inputs.items()):
        onnx.save_tensor(numpy_helper.from_array(v, k), os.path.join(data, f"input_{i}.pb"))
    for i, (o, v) in enumerate(zip(session.get_outputs(), outputs)):
        onnx.save_tensor(numpy_helper.from_array(v, o.name), os.path.join(data, f"output_{i}.pb"))
    print(f"{case}: {len(model.graph.node)} nodes, outputs {[v.shape for v in outputs]}")


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "data", "synthetic")
    rng = np.random.default_rng(0)
    write(out_dir, "llama_tiny", *llama_tiny(rng))


if __name__ == "__main__":
    main()
