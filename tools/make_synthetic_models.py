#!/usr/bin/env python3
"""Writes small transformer models of the families the zoo lacks, in the
form PyTorch's dynamo exporter (opset 18) gives them, with onnxruntime's
outputs as the reference: `tests/data/synthetic/<name>/model.onnx` and
`test_data_set_0/{input,output}_N.pb`, the layout of the zoo.

  python3 tools/make_synthetic_models.py [OUT_DIR [NAME...]]

(`bert_dynamic_wide` and `gpt2_kv_wide`, wider variants for benchmarks at
128 tokens, are written only when named.)

Needs only `onnx`, `numpy` and `onnxruntime`. The weights are random
(seeded), so the files are reproducible; the graphs spell the operations
out the way the exporter does (no fused ONNX ops), so Egret must recognise
them:

- llama_tiny: a LLaMA-style decoder. RMS norms written as
  Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul with the weight on the left,
  rotary position embeddings (rotate_half by Slice/Neg/Concat, cos and sin
  computed in the graph from an Einsum outer product), grouped-query attention (2 K/V heads repeated to
  4 by Unsqueeze/Expand/Reshape), a causal mask from Trilu and Where, the
  scaled-dot-product decomposition that scales q and k^T by d^-1/4 each,
  and a SwiGLU MLP (x sigmoid(x) * up).
- t5_tiny: a T5-style encoder-decoder (v1.1 flavour). RMS norms without a
  mean, unscaled attention with a relative position bias gathered from a
  learned table and added to the scores (with a causal mask in the
  decoder's self-attention), cross-attention with different query and key
  lengths, a gated GELU (tanh form, Pow for the cube) feed-forward, and the
  tied head's d_model^-0.5 scaling.
- bert_dynamic: a BERT-style encoder exported with dynamic axes, as
  `torch.onnx.export(dynamic_axes=...)` writes it: `input_ids` and
  `attention_mask` of shape [batch, sequence] (symbolic dims), positions
  sliced to the sequence length read with Shape/Gather, every head split
  and merge a Reshape to a shape built by Shape/Gather/Unsqueeze/Concat,
  the padding mask as (1 - mask) * -10000, LayerNormalization, an erf
  GELU. Two data sets of different shapes (batch 1 x 7 tokens; batch 2 x
  12 with padding), so one model is checked at two bindings of its dims.

- gpt2_kv: a GPT-2-style decoder with a key/value cache in Hugging Face's
  layout, as the legacy exporter writes it with `use_cache=True`:
  `past_key_values.N.key` / `.value` inputs [batch, heads, past_sequence,
  head_dim], `present.N.key` / `.value` outputs that concatenate the new
  keys and values onto them, positions as a Range from the past length, the
  causal mask sliced out of a constant lower-triangular table at
  [past, past + sequence), GPT-2's tanh GELU, an untied head. Two data sets: a
  prompt of 5 tokens with an empty past (length 0), then one decode step
  whose past is the first step's presents (from onnxruntime), as a decode
  loop feeds them (`tools/decode_loop.py` runs that loop).

  python3 tools/make_synthetic_models.py [OUT_DIR [NAME...]] writes only
  the named models (each has its own seed, so the others stay as they are).
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

    # Rotary tables from the positions, as the first HF LLaMA wrote them:
    # einsum("i,j->ij", positions, inv_freq), duplicated.
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    positions = b.const(np.arange(seq, dtype=np.float32), "positions")
    freqs = b.op("Einsum", [positions, b.const(inv_freq, "inv_freq")], equation="i,j->ij")
    emb = b.op("Concat", [freqs, freqs], axis=-1)
    cos = b.op("Unsqueeze", [b.op("Cos", [emb]), b.ints([0, 1], "axes")])
    sin = b.op("Unsqueeze", [b.op("Sin", [emb]), b.ints([0, 1], "axes")])

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


def t5_attention(b, x, kv, heads, head_dim, q_len, k_len, bias):
    """T5Attention: no 1/sqrt(d) scaling; `bias` ([1, heads, q, k]) is
    added to the scores."""
    hidden = heads * head_dim

    def project(src, length, hint):
        y = b.op("MatMul", [src, b.weight([hidden, hidden], hint)])
        return b.op("Transpose", [b.op("Reshape", [y, b.ints([1, length, heads, head_dim])])], perm=[0, 2, 1, 3])

    q, k, v = project(x, q_len, "q"), project(kv, k_len, "k"), project(kv, k_len, "v")
    scores = b.op("Add", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), bias])
    attn = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    attn = b.op("Reshape", [b.op("Transpose", [attn], perm=[0, 2, 1, 3]), b.ints([1, q_len, hidden])])
    return b.op("MatMul", [attn, b.weight([hidden, hidden], "o")])


def relative_bias(b, heads, q_len, k_len, bidirectional):
    """A learned [buckets, heads] table gathered by T5's bucket of each
    (query, key) distance, as [1, heads, q, k]."""
    buckets, max_distance = 32, 128
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    n = buckets // 2 if bidirectional else buckets
    ret = (rel > 0).astype(np.int64) * n if bidirectional else np.zeros_like(rel)
    rel = np.abs(rel) if bidirectional else -np.minimum(rel, 0)
    exact = n // 2
    large = exact + (np.log(np.maximum(rel, 1) / exact) / np.log(max_distance / exact) * (n - exact)).astype(np.int64)
    ret = ret + np.where(rel < exact, rel, np.minimum(large, n - 1))
    table = b.weight([buckets, heads], "relative_attention_bias", 1.0)
    bias = b.op("Gather", [table, b.const(ret, "buckets", np.int64)], axis=0)
    return b.op("Unsqueeze", [b.op("Transpose", [bias], perm=[2, 0, 1]), b.ints([0], "axes")])


def t5_norm(b, x, hidden):
    # T5LayerNorm: weight * (x * rsqrt(mean(x^2) + eps)), no mean subtracted.
    var = b.op("ReduceMean", [b.op("Pow", [x, b.const(2.0)]), b.ints([-1], "axes")], keepdims=1)
    y = b.op("Mul", [x, b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(1e-6)])])])])
    return b.op("Mul", [b.const(1.0 + 0.1 * b.rng.standard_normal(hidden), "norm_weight"), y])


def gated_gelu(b, x, hidden, ff):
    # T5 v1.1's DenseGatedActDense with gelu_new: gelu_tanh(x wi_0) * (x wi_1).
    g = b.op("MatMul", [x, b.weight([hidden, ff], "wi_0")])
    inner = b.op("Mul", [b.op("Add", [g, b.op("Mul", [b.op("Pow", [g, b.const(3.0)]), b.const(0.044715)])]),
                         b.const(np.sqrt(2.0 / np.pi))])
    gelu = b.op("Mul", [b.op("Mul", [b.const(0.5), g]), b.op("Add", [b.const(1.0), b.op("Tanh", [inner])])])
    up = b.op("MatMul", [x, b.weight([hidden, ff], "wi_1")])
    return b.op("MatMul", [b.op("Mul", [gelu, up]), b.weight([ff, hidden], "wo")])


def t5_tiny(rng):
    vocab, hidden, heads, head_dim, ff, src_len, tgt_len = 128, 64, 4, 16, 96, 12, 8
    b = Builder(rng)
    embed = b.weight([vocab, hidden], "shared", 1.0)

    x = b.op("Gather", [embed, "input_ids"], axis=0)
    enc_bias = relative_bias(b, heads, src_len, src_len, True)
    for _ in range(2):
        h = t5_norm(b, x, hidden)
        x = b.op("Add", [x, t5_attention(b, h, h, heads, head_dim, src_len, src_len, enc_bias)])
        x = b.op("Add", [x, gated_gelu(b, t5_norm(b, x, hidden), hidden, ff)])
    memory = t5_norm(b, x, hidden)

    y = b.op("Gather", [embed, "decoder_input_ids"], axis=0)
    # Decoder self-attention: the causal mask (finfo.min above the
    # diagonal) added to the unidirectional position bias.
    causal = np.triu(np.full((tgt_len, tgt_len), np.finfo(np.float32).min, dtype=np.float32), 1)
    dec_bias = b.op("Add", [relative_bias(b, heads, tgt_len, tgt_len, False), b.const(causal, "causal")])
    cross_bias = b.const(np.zeros((1, heads, tgt_len, src_len), dtype=np.float32), "cross_bias")
    for _ in range(2):
        h = t5_norm(b, y, hidden)
        y = b.op("Add", [y, t5_attention(b, h, h, heads, head_dim, tgt_len, tgt_len, dec_bias)])
        y = b.op("Add", [y, t5_attention(b, t5_norm(b, y, hidden), memory, heads, head_dim, tgt_len, src_len,
                                         cross_bias)])
        y = b.op("Add", [y, gated_gelu(b, t5_norm(b, y, hidden), hidden, ff)])
    y = b.op("Mul", [t5_norm(b, y, hidden), b.const(hidden ** -0.5)])
    logits = b.op("MatMul", [y, b.op("Transpose", [embed], perm=[1, 0])])
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="node_output"))
    graph = helper.make_graph(
        b.nodes,
        "t5_tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, src_len]),
            helper.make_tensor_value_info("decoder_input_ids", TensorProto.INT64, [1, tgt_len]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, tgt_len, vocab])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    inputs = {
        "input_ids": rng.integers(0, vocab, size=(1, src_len), dtype=np.int64),
        "decoder_input_ids": rng.integers(0, vocab, size=(1, tgt_len), dtype=np.int64),
    }
    return model, inputs


def bert_dynamic(rng, hidden=32, heads=2, inter=64, layers=2, max_pos=64):
    vocab, head_dim = 128, hidden // heads
    b = Builder(rng)
    ids, mask = "input_ids", "attention_mask"

    def dim(x, axis):
        # The exporter's spelling of x.shape[axis]: a 1-element i64 tensor.
        return b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [x]), b.ints(axis, "axis")], axis=0), b.ints([0], "axes")])

    batch, seq = dim(ids, 0), dim(ids, 1)
    positions = b.op("Slice", [b.ints(np.arange(max_pos)[None, :], "position_ids"), b.ints([0]), seq, b.ints([1])])
    x = b.op("Add", [b.op("Gather", [b.weight([vocab, hidden], "word_embeddings", 1.0), ids], axis=0),
                     b.op("Gather", [b.weight([max_pos, hidden], "position_embeddings", 1.0), positions], axis=0)])

    def layer_norm(x):
        scale = b.const(1.0 + 0.1 * rng.standard_normal(hidden), "ln_weight")
        bias = b.const(0.1 * rng.standard_normal(hidden), "ln_bias")
        return b.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-12)

    x = layer_norm(x)
    # [batch, sequence] -> [batch, 1, 1, sequence] additive bias.
    extended = b.op("Unsqueeze", [b.op("Cast", [mask], to=TensorProto.FLOAT), b.ints([1, 2], "axes")])
    bias = b.op("Mul", [b.op("Sub", [b.const(1.0), extended]), b.const(-10000.0)])
    split = b.op("Concat", [batch, seq, b.ints([heads, head_dim])], axis=0)
    merged = b.op("Concat", [batch, seq, b.ints([hidden])], axis=0)
    for _ in range(layers):
        def project(hint):
            p = b.op("Add", [b.op("MatMul", [x, b.weight([hidden, hidden], hint)]), b.const(0.1 * rng.standard_normal(hidden), hint + "_bias")])
            return b.op("Transpose", [b.op("Reshape", [p, split])], perm=[0, 2, 1, 3])

        q, k, v = project("query"), project("key"), project("value")
        scores = b.op("Div", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), b.const(np.sqrt(head_dim))])
        probs = b.op("Softmax", [b.op("Add", [scores, bias])], axis=-1)
        context = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merged])
        out = b.op("Add", [b.op("MatMul", [context, b.weight([hidden, hidden], "attn_out")]), b.const(0.1 * rng.standard_normal(hidden), "attn_out_bias")])
        x = layer_norm(b.op("Add", [out, x]))
        h = b.op("Add", [b.op("MatMul", [x, b.weight([hidden, inter], "intermediate")]), b.const(0.1 * rng.standard_normal(inter), "intermediate_bias")])
        gelu = b.op("Mul", [b.op("Mul", [h, b.op("Add", [b.op("Erf", [b.op("Div", [h, b.const(np.sqrt(2.0))])]), b.const(1.0)])]), b.const(0.5)])
        out = b.op("Add", [b.op("MatMul", [gelu, b.weight([inter, hidden], "output")]), b.const(0.1 * rng.standard_normal(hidden), "output_bias")])
        x = layer_norm(b.op("Add", [out, x]))
    b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="node_output"))
    graph = helper.make_graph(
        b.nodes,
        "bert_dynamic",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        b.inits,
    )
    padded = np.ones((2, 12), dtype=np.int64)
    padded[1, 9:] = 0
    sets = [
        {ids: rng.integers(0, vocab, size=(1, 7), dtype=np.int64), mask: np.ones((1, 7), dtype=np.int64)},
        {ids: rng.integers(0, vocab, size=(2, 12), dtype=np.int64), mask: padded},
    ]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model, sets


def gpt2_kv(rng, hidden=32, heads=2, layers=2, max_pos=128):
    vocab, head_dim = 96, hidden // heads
    b = Builder(rng)
    ids, mask = "input_ids", "attention_mask"
    finfo_min = float(np.finfo(np.float32).min)

    def scalar_dim(x, axis):
        return b.op("Gather", [b.op("Shape", [x]), b.ints(axis, "axis")], axis=0)

    def unsqueeze0(x):
        return b.op("Unsqueeze", [x, b.ints([0], "axes")])

    past_names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(layers)]
    past_len = scalar_dim(past_names[0][0], 2)
    seq = scalar_dim(ids, 1)
    total = b.op("Add", [past_len, seq])
    positions = unsqueeze0(b.op("Range", [past_len, total, b.ints(1, "delta")]))
    wte = b.weight([vocab, hidden], "wte", 1.0)
    x = b.op("Add", [b.op("Gather", [wte, ids], axis=0),
                     b.op("Gather", [b.weight([max_pos, hidden], "wpe", 0.1), positions], axis=0)])

    def layer_norm(x):
        scale = b.const(1.0 + 0.1 * rng.standard_normal(hidden), "ln_weight")
        bias = b.const(0.1 * rng.standard_normal(hidden), "ln_bias")
        return b.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)

    # GPT-2's `bias` buffer: a lower-triangular table, sliced per call.
    table = b.const(np.tril(np.ones((max_pos, max_pos), dtype=bool))[None, None], "causal_table", bool)
    rows = b.op("Slice", [table, unsqueeze0(b.op("Sub", [total, seq])), unsqueeze0(total), b.ints([2], "axes")])
    causal = b.op("Slice", [rows, b.ints([0]), unsqueeze0(total), b.ints([3], "axes")])
    extended = b.op("Unsqueeze", [b.op("Cast", [mask], to=TensorProto.FLOAT), b.ints([1, 2], "axes")])
    padding = b.op("Mul", [b.op("Sub", [b.const(1.0), extended]), b.const(finfo_min)])
    batch = unsqueeze0(scalar_dim(ids, 0))
    split = b.op("Concat", [batch, unsqueeze0(seq), b.ints([heads, head_dim])], axis=0)
    merged = b.op("Concat", [batch, unsqueeze0(seq), b.ints([hidden])], axis=0)
    presents = []
    for layer in range(layers):
        h = layer_norm(x)
        qkv = b.op("Add", [b.op("MatMul", [h, b.weight([hidden, 3 * hidden], "c_attn")]), b.const(0.1 * rng.standard_normal(3 * hidden), "c_attn_bias")])
        parts = [b.op("Slice", [qkv, b.ints([i * hidden]), b.ints([(i + 1) * hidden]), b.ints([2], "axes")]) for i in range(3)]
        q, k, v = [b.op("Transpose", [b.op("Reshape", [p, split])], perm=[0, 2, 1, 3]) for p in parts]
        past_key, past_value = past_names[layer]
        key = b.op("Concat", [past_key, k], axis=2, hint="present_key")
        value = b.op("Concat", [past_value, v], axis=2, hint="present_value")
        presents += [(f"present.{layer}.key", key), (f"present.{layer}.value", value)]
        scores = b.op("Div", [b.op("MatMul", [q, b.op("Transpose", [key], perm=[0, 1, 3, 2])]), b.const(np.sqrt(head_dim))])
        scores = b.op("Add", [b.op("Where", [causal, scores, b.const(finfo_min)]), padding])
        context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), value])
        context = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]), merged])
        x = b.op("Add", [x, b.op("Add", [b.op("MatMul", [context, b.weight([hidden, hidden], "c_proj")]), b.const(0.1 * rng.standard_normal(hidden), "c_proj_bias")])])
        h = layer_norm(x)
        up = b.op("Add", [b.op("MatMul", [h, b.weight([hidden, 4 * hidden], "c_fc")]), b.const(0.1 * rng.standard_normal(4 * hidden), "c_fc_bias")])
        cube = b.op("Mul", [b.op("Pow", [up, b.const(3.0)]), b.const(0.044715)])
        inner = b.op("Mul", [b.op("Add", [up, cube]), b.const(np.sqrt(2.0 / np.pi))])
        gelu = b.op("Mul", [b.op("Mul", [up, b.const(0.5)]), b.op("Add", [b.const(1.0), b.op("Tanh", [inner])])])
        x = b.op("Add", [x, b.op("Add", [b.op("MatMul", [gelu, b.weight([4 * hidden, hidden], "mlp_proj")]), b.const(0.1 * rng.standard_normal(hidden), "mlp_proj_bias")])])
    # A head of its own: with random weights, a tied head makes greedy
    # decoding repeat the last token forever, which would test little.
    logits = b.op("MatMul", [layer_norm(x), b.weight([hidden, vocab], "lm_head")])
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="node_logits"))
    for name, value in presents:
        b.nodes.append(helper.make_node("Identity", [value], [name], name="node_" + name))
    cache = ["batch", heads, "past_sequence", head_dim]
    present = ["batch", heads, "past_sequence + sequence", head_dim]
    graph = helper.make_graph(
        b.nodes,
        "gpt2_kv",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "past_sequence + sequence"])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, cache) for pair in past_names for n in pair],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, present) for n, _ in presents],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    # The prompt, with an empty past; then one step fed the prompt's presents.
    prompt = rng.integers(0, vocab, size=(1, 5), dtype=np.int64)
    first = {ids: prompt, mask: np.ones((1, 5), dtype=np.int64)}
    for key, value in past_names:
        first[key] = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
        first[value] = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, first)))
    step = {ids: outs["logits"][:, -1:].argmax(-1).astype(np.int64), mask: np.ones((1, 6), dtype=np.int64)}
    for layer, (key, value) in enumerate(past_names):
        step[key] = outs[f"present.{layer}.key"]
        step[value] = outs[f"present.{layer}.value"]
    return model, [first, step]


def write(out_dir, name, model, inputs):
    """`inputs`: one dict of input arrays, or a list of them (one data set each)."""
    onnx.checker.check_model(model, full_check=True)
    case = os.path.join(out_dir, name)
    os.makedirs(case, exist_ok=True)
    onnx.save(model, os.path.join(case, "model.onnx"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n, feeds in enumerate(inputs if isinstance(inputs, list) else [inputs]):
        data = os.path.join(case, f"test_data_set_{n}")
        os.makedirs(data, exist_ok=True)
        outputs = session.run(None, feeds)
        for i, (k, v) in enumerate(feeds.items()):
            onnx.save_tensor(numpy_helper.from_array(v, k), os.path.join(data, f"input_{i}.pb"))
        for i, (o, v) in enumerate(zip(session.get_outputs(), outputs)):
            onnx.save_tensor(numpy_helper.from_array(v, o.name), os.path.join(data, f"output_{i}.pb"))
        print(f"{data}: {len(model.graph.node)} nodes, outputs {[v.shape for v in outputs]}")


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "data", "synthetic")
    names = sys.argv[2:] or ["llama_tiny", "t5_tiny", "bert_dynamic", "gpt2_kv"]
    # llama_tiny and t5_tiny share one stream, as when they were first written.
    rng = np.random.default_rng(0)
    llama, t5 = llama_tiny(rng), t5_tiny(rng)
    # The `_wide` variants are for benchmarks, not the repository: eight
    # times the width (head size 64) and 512 positions, so that a run at
    # 128 tokens measures the kernels rather than the calls.
    wide = dict(hidden=256, heads=4, layers=4, max_pos=512)
    made = {"llama_tiny": lambda: llama, "t5_tiny": lambda: t5, "bert_dynamic": lambda: bert_dynamic(np.random.default_rng(1)),
            "gpt2_kv": lambda: gpt2_kv(np.random.default_rng(2)),
            "bert_dynamic_wide": lambda: bert_dynamic(np.random.default_rng(1), inter=1024, **wide),
            "gpt2_kv_wide": lambda: gpt2_kv(np.random.default_rng(2), **wide)}
    for name in names:
        write(out_dir, name, *made[name]())


if __name__ == "__main__":
    main()
