#!/usr/bin/env python3
"""Makes quantized, half-precision and onnxruntime-optimised ONNX models the
way users make them (onnxruntime's own quantization and transformer
optimisation tools) from the f32 exports in `tests/data/dynamic_exports`,
and hand-written single-op models of the default-domain quantization ops and
onnxruntime's `com.microsoft` contrib ops those tools emit, with
onnxruntime's outputs (all graph optimisations off, CPU) as the reference:

  python3 tools/make_formats.py [--out DIR] [NAME...]

Each model goes to `DIR/<name>/` (default: `tests/data/formats`; the
single-op models to `DIR/ops/<case>/`) with `model.onnx`,
`test_data_set_N/{input,output}_K.pb` (one data set per shape; tensors named
after the graph's inputs and outputs) and `meta.json` (source, tool and
options, opsets, op counts keyed `domain:op`, initializer dtype counts, each
data set's shapes; `vs_ort_all`: per data set, the largest absolute
difference from onnxruntime with every graph optimisation on, whose fused
kernels round differently; for a converted model `vs_f32`: per data set, the largest
absolute difference between this model's onnxruntime outputs and the f32
source's on the same inputs, with the mean and each output's largest; for an
op case `vs_numpy`: the same against a float64 numpy reference). The
converted models reuse the inputs of their source's committed data sets
(cast to the input types the model declares), so they keep its symbolic dims
and several shapes; single-op models get seeded random inputs at odd sizes,
two or three data sets over symbolic dims. NAME is a model, an op case, or
`ops` for every op case (default: the committed models and every op case).
Needs onnx, onnxruntime (with its quantization and transformers tools) and
ml_dtypes; CI needs none of them, since the outputs are committed.

Models (NAME: source, tool). Sources are in tests/data/dynamic_exports:
bert_mean_pool_legacy (BERT), gpt2_past_legacy (GPT-2), llama_gqa_past_legacy
(LLaMA), vit_batch_legacy (ViT); all 64 wide, 4 heads, opset 17.
- bert_dynamic_int8: BERT through `quantize_dynamic(weight_type=QInt8)`
  (DynamicQuantizeLinear, MatMulInteger, Cast, Mul; the embeddings' Gathers
  on uint8 tables through DequantizeLinear).
- bert_dynamic_uint8_per_channel: the same with QUInt8 weights and
  `per_channel=True` (per-column weight zero points and scales).
- bert_qdq_static: BERT through `quantize_static`, QDQ format, MinMax
  calibration on random inputs of the data sets' shapes, QUInt8
  activations, QInt8 weights (QuantizeLinear / DequantizeLinear pairs).
- vit_qdq_static_per_channel: ViT through `quantize_static`, QDQ, QInt8
  activations and weights, `per_channel=True` (the patch Conv too).
- bert_O2: BERT through onnxruntime.transformers' `optimize_model(
  model_type="bert", num_heads=4, hidden_size=64, opt_level=2)`:
  SkipLayerNormalization, BiasGelu (its Attention and EmbedLayerNormalization
  fusions do not match this export).
- llama_int4_gather: LLaMA through `MatMulNBitsQuantizer` (4 bits, block 32,
  symmetric, accuracy_level None) with `op_types_to_quantize=("MatMul",
  "Gather")`: MatMulNBits and an int4 GatherBlockQuantized embedding; the
  source is converted to opset 21 first (see `nbits`).
- llama_O2_int4_asym: LLaMA through `optimize_model(model_type="gpt2",
  opt_level=2)` (RMSNorm to SimplifiedLayerNormalization and
  SkipSimplifiedLayerNormalization, SiLU to QuickGelu(alpha=1)), then
  `MatMulNBitsQuantizer` (4 bits, block 32, with zero points).
- vit_fp16: ViT through `convert_float_to_float16(keep_io_types=False)`:
  float16 image in, float16 hidden states out.
- vit_bf16_weights: by hand (no onnxruntime tool makes bfloat16): every f32
  initializer of two or more dims stored as bfloat16 and `Cast` to float.

Models not committed (made only when named, into target/formats-extra unless
--out says otherwise), left out to keep tests/data/formats near 4 MB:
- bert_dynamic_uint8 / bert_dynamic_int8_per_channel: `quantize_dynamic`
  with QUInt8 weights / QInt8 per channel.
- bert_O2_fp16: bert_O2 through `convert_float_to_float16(keep_io_types=True)`.
- bert_fp16_io: BERT through `convert_float_to_float16(keep_io_types=False)`
  (float16 output; the int64 inputs stay int64).
- bert_bf16_weights: BERT's initializers as bfloat16, as vit_bf16_weights.
- gpt2_dynamic_int8: GPT-2 through `quantize_dynamic` (QInt8).
- gpt2_O2: GPT-2 through `optimize_model(model_type="gpt2", opt_level=2)`:
  SkipLayerNormalization, FastGelu, Gemm.
- gpt2_fp16: GPT-2 through `convert_float_to_float16(keep_io_types=True)`.
- llama_int4 / llama_int4_asym: LLaMA through `MatMulNBitsQuantizer` (4
  bits, block 32, symmetric / with zero points): MatMulNBits only.
- llama_O2: LLaMA through `optimize_model(model_type="gpt2", opt_level=2)`.
- bert_base_dynamic_int8, bert_base_fp16, llama_150m_int4: BERT-base through
  `quantize_dynamic` (QInt8) and `convert_float_to_float16(keep_io_types=True)`,
  and the 150M LLaMA through `MatMulNBitsQuantizer` (4 bits, block 32), from
  `tools/make_exports.py bert_base_mean_pool_legacy llama_150m_past_legacy`
  (in target/bench-exports), for the benchmarks in BENCHMARKS.md.

Op cases (NAME, written to `ops/NAME`; see `_ops` for the list), opset 21
and com.microsoft 1: QuantizeLinear / DequantizeLinear (per tensor uint8 and
int8, per axis, blocked, int4 and uint4), DynamicQuantizeLinear,
MatMulInteger, QLinearMatMul, Cast through float16, bfloat16, the 8-bit
floats, int4, uint4, int2 and uint2 (opset 25), fp8 QDQ and an fp8 weight
into a MatMul, Gather from a float16 table; the
com.microsoft SkipLayerNormalization, SkipSimplifiedLayerNormalization,
BiasGelu, FastGelu, Gelu, QuickGelu, EmbedLayerNormalization, Attention,
MatMulIntegerToFloat, DynamicQuantizeMatMul, MatMulNBits,
GatherBlockQuantized, RotaryEmbedding and GroupQueryAttention (some in
float16 too); SimplifiedLayerNormalization in the default domain, where
onnxruntime registers it.
"""

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")
SOURCES = os.path.join(DATA, "dynamic_exports")
FORMATS = os.path.join(DATA, "formats")
# Where the models not committed go when named.
EXTRA = os.path.join(HERE, "..", "target", "formats-extra")
# Base-size sources (tools/make_exports.py writes them there), relative to SOURCES.
BENCH = os.path.join("..", "..", "..", "target", "bench-exports")

BERT = "bert_mean_pool_legacy"
GPT2 = "gpt2_past_legacy"
LLAMA = "llama_gqa_past_legacy"
VIT = "vit_batch_legacy"
BERT_BASE = os.path.join(BENCH, "bert_base_mean_pool_legacy")
LLAMA_150M = os.path.join(BENCH, "llama_150m_past_legacy")

MS = "com.microsoft"


def write_tensor(path, name, array):
    from onnx import numpy_helper

    t = numpy_helper.from_array(array, name)
    with open(path, "wb") as f:
        f.write(t.SerializeToString())


def read_tensor(path):
    import onnx
    from onnx import numpy_helper

    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return t.name, numpy_helper.to_array(t)


def source_path(source):
    return os.path.join(SOURCES, source, "model.onnx")


def source_sets(source):
    """The inputs of a source's committed data sets, in order: dicts of
    input name to array."""
    folder = os.path.join(SOURCES, source)
    sets = []
    k = 0
    while os.path.isdir(os.path.join(folder, f"test_data_set_{k}")):
        d = os.path.join(folder, f"test_data_set_{k}")
        data = {}
        i = 0
        while os.path.exists(os.path.join(d, f"input_{i}.pb")):
            name, array = read_tensor(os.path.join(d, f"input_{i}.pb"))
            data[name] = array
            i += 1
        sets.append(data)
        k += 1
    return sets


def session(model, optimize=False):
    """onnxruntime's CPU session with every graph optimisation off (or,
    `optimize`, all on: its fused kernels show how far a correct
    implementation may legitimately stray from the reference)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    options.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def feeds(sess, data):
    """`data` cast to the types the session's inputs declare."""
    return {i.name: np.asarray(data[i.name]).astype(NUMPY_TYPES[i.type]) for i in sess.get_inputs()}


def op_counts(model):
    return dict(collections.Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in model.graph.node))


def initializer_dtypes(model):
    import onnx

    names = (onnx.TensorProto.DataType.Name(t.data_type).lower() for t in model.graph.initializer)
    return dict(collections.Counter(names))


def max_diff(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return None
    if not a.size:
        return 0.0
    both = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)) or not np.array_equal(a[~both], b[~both], equal_nan=True):
        return float("inf")
    return float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0


def mean_diff(got, expected):
    """The mean absolute difference over every element of every output."""
    total = sum(float(np.abs(np.asarray(g, np.float64) - e).sum()) for g, e in zip(got, expected))
    return total / max(1, sum(np.asarray(g).size for g in got))


def save(folder, name, model, sets, info, source=None, numpy_reference=None):
    """Writes `model`, onnxruntime's outputs on each data set and
    meta.json into `folder`; with a `source` (an f32 model path) also
    `vs_f32`, with `numpy_reference` (data set -> list of arrays) `vs_numpy`."""
    import onnx
    import onnxruntime as ort

    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path)
    sess = session(path)
    reference = session(source) if source else None
    try:
        fused, vs_ort_all = session(path, optimize=True), []
    except Exception as e:  # noqa: BLE001
        fused, vs_ort_all = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    names = [o.name for o in sess.get_outputs()]
    shapes, vs_f32, vs_f32_mean, vs_f32_outputs, vs_numpy = [], [], [], [], []
    for k, data in enumerate(sets):
        fed = feeds(sess, data)
        got = sess.run(None, fed)
        d = os.path.join(folder, f"test_data_set_{k}")
        os.makedirs(d)
        for i, (n, v) in enumerate(fed.items()):
            write_tensor(os.path.join(d, f"input_{i}.pb"), n, v)
        for i, (n, v) in enumerate(zip(names, got)):
            write_tensor(os.path.join(d, f"output_{i}.pb"), n, v)
        shapes.append(
            {
                "inputs": {n: list(v.shape) for n, v in fed.items()},
                "outputs": {n: list(v.shape) for n, v in zip(names, got)},
            }
        )
        if fused:
            vs_ort_all.append(max([max_diff(a, b) for a, b in zip(got, fused.run(None, fed))], default=0.0))
        if reference:
            expected = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds(reference, data))))
            per = {n: max_diff(v, expected[n]) for n, v in zip(names, got) if n in expected}
            vs_f32_outputs.append(per)
            vs_f32.append(max(per.values()))
            vs_f32_mean.append(mean_diff(got, [expected[n] for n in names]))
        if numpy_reference:
            vs_numpy.append([max_diff(g, e) for g, e in zip(got, numpy_reference(data))])
    meta = dict({"name": name}, **info)
    meta["opsets"] = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    meta["nodes"] = len(model.graph.node)
    meta["ops"] = op_counts(model)
    meta["initializers"] = initializer_dtypes(model)
    meta["data_sets"] = shapes
    if reference:
        meta["vs_f32"] = vs_f32
        meta["vs_f32_mean"] = vs_f32_mean
        meta["vs_f32_per_output"] = vs_f32_outputs
    if numpy_reference:
        meta["vs_numpy"] = vs_numpy
    meta["vs_ort_all"] = vs_ort_all
    meta["versions"] = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    diffs = f", vs f32 {vs_f32}" if vs_f32 else f", vs numpy {vs_numpy}" if vs_numpy else ""
    print(f"{name}: {len(model.graph.node)} nodes, {size // 1024} KiB{diffs}")
    return meta


# ---------------------------------------------------------------------------
# Models converted from the f32 exports with onnxruntime's tools.


def load(source):
    import onnx

    return onnx.load(source_path(source))


def through_file(fn):
    """Runs a tool that writes its result to a path; returns the model."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.onnx")
        fn(out)
        return onnx.load(out)


def dynamic(source, **options):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options = dict(options)
    opts = dict(options)
    opts["weight_type"] = getattr(QuantType, options["weight_type"])
    model = through_file(lambda out: quantize_dynamic(source_path(source), out, **opts))
    return model, "onnxruntime.quantization.quantize_dynamic", options


class Reader:
    """A CalibrationDataReader over seeded random inputs of the shapes of
    a source's data sets."""

    def __init__(self, source):
        rng = np.random.default_rng(1)
        self.sets = []
        for data in source_sets(source):
            d = {}
            for n, v in data.items():
                if v.dtype == np.int64 and n == "input_ids":
                    d[n] = rng.integers(0, 1000, v.shape).astype(np.int64)
                elif v.dtype == np.int64:
                    d[n] = np.ones(v.shape, np.int64)
                else:
                    d[n] = rng.standard_normal(v.shape).astype(v.dtype)
            self.sets.append(d)
        self.it = iter(self.sets)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.sets)


def static(source, **options):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class R(Reader, CalibrationDataReader):
        pass

    opts = dict(options)
    opts["quant_format"] = getattr(QuantFormat, options["quant_format"])
    opts["activation_type"] = getattr(QuantType, options["activation_type"])
    opts["weight_type"] = getattr(QuantType, options["weight_type"])
    reader = R(source)
    model = through_file(lambda out: quantize_static(source_path(source), out, reader, **opts))
    options = dict(options, calibration="MinMax over random inputs of each data set's shapes (seed 1)")
    return model, "onnxruntime.quantization.quantize_static", options


def optimized(source, model_type):
    """onnxruntime.transformers' `optimize_model` at opt_level 2 (the
    session's extended optimisations, then the Python fusions), 4 heads of
    16; also the fusion statistics it reports."""
    from onnxruntime.transformers.optimizer import optimize_model

    options = dict(model_type=model_type, num_heads=4, hidden_size=64, opt_level=2)
    opt = optimize_model(source_path(source), **options)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return opt, dict(options, fused=fused)


def O2(source, model_type):
    opt, options = optimized(source, model_type)
    return opt.model, "onnxruntime.transformers.optimizer.optimize_model", options


def fp16(source, keep_io_types, model_type=None):
    """`OnnxModel.convert_float_to_float16` (symbolic shape inference, then
    onnxruntime.transformers.float16.convert_float_to_float16), on the
    source or, with a `model_type`, on its opt_level 2 optimisation."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    if model_type:
        opt, options = optimized(source, model_type)
        tool = "onnxruntime.transformers.optimizer.optimize_model, then OnnxModel.convert_float_to_float16"
    else:
        opt, options = OnnxModel(load(source)), {}
        tool = "onnxruntime.transformers.onnx_model.OnnxModel.convert_float_to_float16"
    opt.convert_float_to_float16(keep_io_types=keep_io_types)
    return opt.model, tool, dict(options, keep_io_types=keep_io_types)


def nbits(source, opset=None, model_type=None, **options):
    """MatMulNBitsQuantizer on the source (with a `model_type`, on its
    opt_level 2 optimisation), first brought to `opset` by onnx's version
    converter where asked: quantizing a Gather stores an int4 table, for
    which the quantizer sets the opset to 21 without converting the nodes
    (the exports' opset 17 `ReduceMean(axes=...)` then fails to load)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    tool = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"
    if model_type:
        opt, o2 = optimized(source, model_type)
        model = opt.model
        tool = "onnxruntime.transformers.optimizer.optimize_model, then " + tool
        options = dict(options, optimize_model=o2)
    else:
        model = load(source)
    if opset:
        model = onnx.version_converter.convert_version(model, opset)
        tool = f"onnx.version_converter.convert_version(opset {opset}), then " + tool
    q = MatMulNBitsQuantizer(model, **{k: v for k, v in options.items() if k != "optimize_model"})
    q.process()
    return q.model.model, tool, options


def bf16_weights(source):
    """Every f32 initializer of two or more dims stored as bfloat16, read
    through a `Cast(to=FLOAT)`."""
    import ml_dtypes
    import onnx
    from onnx import helper, numpy_helper

    model = load(source)
    g = model.graph
    casts = []
    for t in g.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2:
            continue
        a = numpy_helper.to_array(t).astype(ml_dtypes.bfloat16)
        name = t.name
        t.CopyFrom(numpy_helper.from_array(a, name + "_bf16"))
        casts.append(helper.make_node("Cast", [name + "_bf16"], [name], name=name + "_cast", to=onnx.TensorProto.FLOAT))
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    options = {
        "initializers": "f32 initializers of >= 2 dims stored as bfloat16, then Cast(to=FLOAT)",
        "count": len(casts),
    }
    return model, "onnx.helper (by hand)", options


INT4 = dict(bits=4, block_size=32, accuracy_level=None)

# name: (source, what makes it: a function returning (model, tool, options),
# committed: whether a plain run makes it into tests/data/formats; the others,
# left out to keep that folder near 4 MB, go to target/formats-extra when named).
MODELS = {
    "bert_dynamic_int8": (BERT, lambda: dynamic(BERT, weight_type="QInt8"), True),
    "bert_dynamic_uint8": (BERT, lambda: dynamic(BERT, weight_type="QUInt8"), False),
    "bert_dynamic_int8_per_channel": (BERT, lambda: dynamic(BERT, weight_type="QInt8", per_channel=True), False),
    "bert_dynamic_uint8_per_channel": (BERT, lambda: dynamic(BERT, weight_type="QUInt8", per_channel=True), True),
    "bert_qdq_static": (
        BERT,
        lambda: static(BERT, quant_format="QDQ", activation_type="QUInt8", weight_type="QInt8"),
        True,
    ),
    "vit_qdq_static_per_channel": (
        VIT,
        lambda: static(VIT, quant_format="QDQ", activation_type="QInt8", weight_type="QInt8", per_channel=True),
        True,
    ),
    "bert_O2": (BERT, lambda: O2(BERT, "bert"), True),
    "bert_O2_fp16": (BERT, lambda: fp16(BERT, True, model_type="bert"), False),
    "bert_fp16_io": (BERT, lambda: fp16(BERT, False), False),
    "bert_bf16_weights": (BERT, lambda: bf16_weights(BERT), False),
    "gpt2_dynamic_int8": (GPT2, lambda: dynamic(GPT2, weight_type="QInt8"), False),
    "gpt2_O2": (GPT2, lambda: O2(GPT2, "gpt2"), False),
    "gpt2_fp16": (GPT2, lambda: fp16(GPT2, True), False),
    "llama_int4": (LLAMA, lambda: nbits(LLAMA, is_symmetric=True, **INT4), False),
    "llama_int4_asym": (LLAMA, lambda: nbits(LLAMA, is_symmetric=False, **INT4), False),
    "llama_int4_gather": (
        LLAMA,
        lambda: nbits(
            LLAMA,
            opset=21,
            is_symmetric=True,
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            **INT4,
        ),
        True,
    ),
    "llama_O2": (LLAMA, lambda: O2(LLAMA, "gpt2"), False),
    "llama_O2_int4_asym": (LLAMA, lambda: nbits(LLAMA, model_type="gpt2", is_symmetric=False, **INT4), True),
    "vit_fp16": (VIT, lambda: fp16(VIT, False), True),
    "vit_bf16_weights": (VIT, lambda: bf16_weights(VIT), True),
    # Base sizes, for benchmarks: from tools/make_exports.py's base-size
    # exports in target/bench-exports.
    "bert_base_dynamic_int8": (BERT_BASE, lambda: dynamic(BERT_BASE, weight_type="QInt8"), False),
    "bert_base_fp16": (BERT_BASE, lambda: fp16(BERT_BASE, True), False),
    "llama_150m_int4": (LLAMA_150M, lambda: nbits(LLAMA_150M, is_symmetric=True, **INT4), False),
}


def make_model(name, out_root):
    source, make, _ = MODELS[name]
    model, tool, options = make()
    folder = os.path.join(out_root, name)
    meta = {"source": f"dynamic_exports/{source}", "tool": tool, "options": options}
    save(folder, name, model, source_sets(source), meta, source=source_path(source))


# ---------------------------------------------------------------------------
# Single-op models.


def rng_for(name):
    """A generator seeded from the case's name (stable across runs)."""
    return np.random.default_rng(sum(map(ord, name)))


def vi(name, dtype, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, dtype, shape)


def graph_model(nodes, inputs, outputs, initializers, opset=21):
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 10
    return m


def init(name, array):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


class Op:
    """A single-op case: its model, its data sets, what it exercises and
    optionally a numpy reference (data set -> list of expected outputs),
    whose largest difference from onnxruntime goes to meta.json as
    `vs_numpy`."""

    def __init__(self, model, sets, note, numpy_reference=None):
        self.model = model
        self.sets = sets
        self.note = note
        self.numpy_reference = numpy_reference


def T():
    from onnx import TensorProto

    return TensorProto


# --- default domain -------------------------------------------------------

# The quantization cases' x is [n, 37] (n symbolic: 5, then 11).
COLS = 37


def qrange(qtype):
    import ml_dtypes

    t = T()
    return {
        t.UINT8: (np.uint8, 0, 255),
        t.INT8: (np.int8, -128, 127),
        t.UINT4: (ml_dtypes.uint4, 0, 15),
        t.INT4: (ml_dtypes.int4, -8, 7),
    }[qtype]


def spread(a, block, axis, size):
    """A blocked scale or zero point repeated to the size of the data."""
    return np.take(np.repeat(a, block, axis=axis), np.arange(size), axis=axis)


def scale_and_zero_point(rng, qtype, axis, block, rows):
    """Per tensor (scalars), per axis 1 ([37]) or blocked along axis 1
    ([rows, blocks]) scales and zero points."""
    np_q, lo, hi = qrange(qtype)
    if block:
        shape = (rows, -(-COLS // block))
    elif axis is not None:
        shape = (COLS,)
    else:
        shape = ()
    scale = rng.uniform(0.01, 0.05, shape).astype(np.float32)
    zp = rng.integers(lo // 4, hi // 4 + 1, shape).astype(np_q)
    return scale, zp


def quantize_dequantize(op, qtype, axis=None, block=None):
    """QuantizeLinear from / DequantizeLinear to float: per tensor, per axis
    or blocked. Blocked, the scale and zero point have a row per row of x,
    so they are inputs too (sharing x's symbolic dim)."""

    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        np_q, lo, hi = qrange(qtype)
        quantize = op == "QuantizeLinear"
        xtype = t.FLOAT if quantize else qtype
        attrs = {"axis": 1} if axis is not None or block else {}
        if block:
            attrs["block_size"] = block
        inputs = [vi("x", xtype, ["n", COLS])]
        inits = []
        sets = []
        fixed = scale_and_zero_point(rng, qtype, axis, None, 0) if not block else None
        if block:
            nb = -(-COLS // block)
            inputs += [vi("scale", t.FLOAT, ["n", nb]), vi("zero_point", qtype, ["n", nb])]
        else:
            inits = [init("scale", fixed[0]), init("zero_point", fixed[1])]
        for n in (5, 11):
            x = f32(rng, n, COLS, scale=3.0) if quantize else rng.integers(lo, hi + 1, (n, COLS)).astype(np_q)
            d = {"x": x}
            if block:
                d["scale"], d["zero_point"] = scale_and_zero_point(rng, qtype, axis, block, n)
            sets.append(d)
        node = helper.make_node(op, ["x", "scale", "zero_point"], ["y"], **attrs)
        m = graph_model([node], inputs, [vi("y", qtype if quantize else t.FLOAT, ["n", COLS])], inits)

        def ref(data):
            scale, zp = (data["scale"], data["zero_point"]) if block else fixed
            if block:
                scale, zp = spread(scale, block, 1, COLS), spread(zp, block, 1, COLS)
            scale, zp = scale.astype(np.float64), zp.astype(np.float64)
            if quantize:
                return [np.clip(np.rint(data["x"] / scale) + zp, lo, hi)]
            return [(data["x"].astype(np.float64) - zp) * scale]

        kind = t.DataType.Name(qtype).lower()
        if block:
            how = f"blocked along axis 1, block {block} (37 = 2 x 16 + 5)"
        else:
            how = "per axis 1" if axis is not None else "per tensor"
        what = f"{op} {'to' if quantize else 'from'} {kind}, {how}"
        what += "; values past the range saturate" if quantize else ""
        return Op(m, sets, what, ref)

    return case


def qdq_4bit(qtype, block=None):
    """QuantizeLinear to int4 / uint4 then DequantizeLinear back
    (onnxruntime's Python API takes no 4-bit tensors in or out)."""

    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        np_q, lo, hi = qrange(qtype)
        attrs = {}
        if block:
            # Blocked along the fixed axis 0 (37 = 2 x 16 + 5); the scale is
            # [3, 13] and x has no symbolic dim.
            nb = -(-COLS // block)
            attrs = {"axis": 0, "block_size": block}
            scale = rng.uniform(0.1, 0.4, (nb, 13)).astype(np.float32)
            zp = rng.integers(-2, 3, (nb, 13)) + (8 if qtype == t.UINT4 else 0)
            shape = [COLS, 13]
            sets = [{"x": f32(rng, COLS, 13, scale=1.5)} for _ in range(2)]
        else:
            scale = np.float32(0.3)
            zp = np.array(1 if qtype == t.INT4 else 9)
            shape = ["n", COLS]
            sets = [{"x": f32(rng, n, COLS, scale=1.5)} for n in (5, 11)]
        inits = [init("scale", scale), init("zero_point", np.asarray(zp).astype(np_q))]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"], **attrs),
        ]
        m = graph_model(nodes, [vi("x", t.FLOAT, shape)], [vi("y", t.FLOAT, shape)], inits)
        s64 = spread(scale, block, 0, COLS) if block else scale
        z64 = spread(zp, block, 0, COLS) if block else zp
        s64, z64 = np.asarray(s64, np.float64), np.asarray(z64, np.float64)

        def ref(data):
            q = np.clip(np.rint(data["x"] / s64) + z64, lo, hi)
            return [(q - z64) * s64]

        kind = t.DataType.Name(qtype).lower()
        how = f"blocked along axis 0, block {block}" if block else "per tensor"
        note = f"QuantizeLinear to {kind} then DequantizeLinear ({how}): rounding and saturation to 4 bits"
        return Op(m, sets, note, ref)

    return case


def dq_int4_weight_matmul(name):
    """The QDQ weight-only pattern: DequantizeLinear of a blocked int4
    initializer (K = 37, block 16, along K) feeding a MatMul."""
    import ml_dtypes
    from onnx import helper

    t = T()
    rng = rng_for(name)
    K, N, block = COLS, 23, 16
    nb = -(-K // block)
    q = rng.integers(-8, 8, (K, N))
    scale = rng.uniform(0.02, 0.1, (nb, N)).astype(np.float32)
    inits = [init("w_q", q.astype(ml_dtypes.int4)), init("w_scale", scale)]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    m = graph_model(nodes, [vi("x", t.FLOAT, ["n", K])], [vi("y", t.FLOAT, ["n", N])], inits)
    sets = [{"x": f32(rng, n, K)} for n in (5, 11)]
    w = q * spread(scale.astype(np.float64), block, 0, K)

    def ref(data):
        return [data["x"].astype(np.float64) @ w]

    note = "DequantizeLinear of an int4 initializer [37, 23] blocked along K (block 16, no zero point) into a MatMul"
    return Op(m, sets, note, ref)


def dynamic_quantize_linear(name):
    from onnx import helper

    t = T()
    rng = rng_for(name)
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "y_scale", "y_zero_point"])
    outs = [vi("y", t.UINT8, ["n", COLS]), vi("y_scale", t.FLOAT, []), vi("y_zero_point", t.UINT8, [])]
    m = graph_model([node], [vi("x", t.FLOAT, ["n", COLS])], outs, [])
    sets = [{"x": f32(rng, 5, COLS, scale=2.0) + 0.7}, {"x": np.abs(f32(rng, 11, COLS))}]

    def ref(data):
        x = data["x"]
        lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
        scale = np.float32((hi - lo) / 255)
        zp = np.clip(np.rint(-lo / scale), 0, 255)
        return [np.clip(np.rint(x / scale) + zp, 0, 255), scale, zp]

    note = (
        "DynamicQuantizeLinear: the range widened to include 0, the zero point rounded half to even; "
        "the second data set is all positive (zero point 0)"
    )
    return Op(m, sets, note, ref)


def matmul_integer(btype, zero_points, per_column=False):
    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        np_b, blo, bhi = qrange(btype)
        b = rng.integers(blo, bhi + 1, (COLS, 23)).astype(np_b)
        azp, bzp = 119, (2 if btype == t.INT8 else 131)
        if per_column:
            bzp = rng.integers(bzp - 3, bzp + 4, 23)
        inits = [init("b", b)]
        ins = ["a", "b"]
        if zero_points:
            inits += [init("a_zero_point", np.array(azp, np.uint8)), init("b_zero_point", np.array(bzp).astype(np_b))]
            ins += ["a_zero_point", "b_zero_point"]
        else:
            azp = bzp = 0
        node = helper.make_node("MatMulInteger", ins, ["y"])
        m = graph_model([node], [vi("a", t.UINT8, ["n", COLS])], [vi("y", t.INT32, ["n", 23])], inits)
        sets = [{"a": rng.integers(0, 256, (n, COLS)).astype(np.uint8)} for n in (5, 11)]

        def ref(data):
            return [(data["a"].astype(np.int64) - azp) @ (b.astype(np.int64) - bzp)]

        kind = t.DataType.Name(btype).lower()
        if per_column:
            zps = "per-column weight zero points [23] (as per-channel dynamic quantization makes)"
        else:
            zps = "scalar zero points" if zero_points else "no zero points"
        return Op(m, sets, f"MatMulInteger uint8 x {kind} -> int32, {zps}", ref)

    return case


def qlinear_matmul(btype):
    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        np_b, blo, bhi = qrange(btype)
        b = rng.integers(blo, bhi + 1, (COLS, 23)).astype(np_b)
        a_s, a_z, b_s, b_z, y_s, y_z = 0.02, 121, 0.013, (2 if btype == t.INT8 else 130), 0.9, 125
        inits = [
            init("a_scale", np.float32(a_s)),
            init("a_zero_point", np.array(a_z, np.uint8)),
            init("b", b),
            init("b_scale", np.float32(b_s)),
            init("b_zero_point", np.array(b_z, np_b)),
            init("y_scale", np.float32(y_s)),
            init("y_zero_point", np.array(y_z, np.uint8)),
        ]
        ins = ["a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale", "y_zero_point"]
        node = helper.make_node("QLinearMatMul", ins, ["y"])
        m = graph_model([node], [vi("a", t.UINT8, ["n", COLS])], [vi("y", t.UINT8, ["n", 23])], inits)
        sets = [{"a": rng.integers(0, 256, (n, COLS)).astype(np.uint8)} for n in (5, 11)]

        def ref(data):
            acc = (data["a"].astype(np.int64) - a_z) @ (b.astype(np.int64) - b_z)
            multiplier = np.float32(np.float32(a_s) * np.float32(b_s) / np.float32(y_s))
            return [np.clip(np.rint(acc.astype(np.float32) * multiplier) + y_z, 0, 255)]

        kind = t.DataType.Name(btype).lower()
        note = (
            f"QLinearMatMul uint8 x {kind} -> uint8, per tensor scales and zero points: "
            "the int32 product requantised (rounded half to even, saturated)"
        )
        return Op(m, sets, note, ref)

    return case


def gather_half_table(name):
    """An fp16 model's embedding lookup: Gather from a float16 initializer
    table, a float16 bias added, the result cast to float (as
    `convert_float_to_float16(keep_io_types=True)` writes it), and the
    gathered rows themselves as a float16 output."""
    from onnx import helper

    t = T()
    rng = rng_for(name)
    table = (rng.standard_normal((50, COLS)) * 2.0).astype(np.float16)
    table[0, :4] = [65504.0, -65504.0, 6e-8, -0.0]
    bias = (rng.standard_normal(COLS) * 0.5).astype(np.float16)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        helper.make_node("Add", ["rows", "bias"], ["sum"]),
        helper.make_node("Cast", ["sum"], ["y"], to=t.FLOAT),
    ]
    outs = [vi("rows", t.FLOAT16, ["n", 3, COLS]), vi("y", t.FLOAT, ["n", 3, COLS])]
    m = graph_model(nodes, [vi("ids", t.INT64, ["n", 3])], outs, [init("table", table), init("bias", bias)])
    sets = [{"ids": rng.integers(-50, 50, size=(n, 3)).astype(np.int64)} for n in (1, 4)]
    for s in sets:
        s["ids"][0, 0] = 0

    def ref(data):
        rows = table[np.where(data["ids"] < 0, data["ids"] + 50, data["ids"])]
        return [rows, (rows + bias).astype(np.float32)]

    return Op(m, sets, "Gather from a float16 table (negative indices too), a float16 add, a cast to float", ref)


def cast_roundtrip(mid):
    def case(name):
        import ml_dtypes
        from onnx import helper

        t = T()
        rng = rng_for(name)
        nodes = [helper.make_node("Cast", ["x"], ["h"], to=mid), helper.make_node("Cast", ["h"], ["y"], to=t.FLOAT)]
        outs = [vi("y", t.FLOAT, ["n", COLS])]
        if mid == t.FLOAT16:
            # onnxruntime's Python API returns float16 but not bfloat16.
            outs = [vi("h", mid, ["n", COLS])] + outs
        m = graph_model(nodes, [vi("x", t.FLOAT, ["n", COLS])], outs, [])
        sets = []
        for n in (5, 11):
            x = f32(rng, n, COLS, scale=3.0)
            # Overflow, subnormals, ties to even at float16's and bfloat16's last bits, infinities.
            x[0, :8] = [70000.0, -1e6, 1e-6, -3e-8, 65520.0, 1 + 2.0**-11, 1 + 3 * 2.0**-11, np.inf]
            x[1, :4] = [1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.0e38, -np.inf]
            sets.append({"x": x})
        np_mid = np.float16 if mid == t.FLOAT16 else ml_dtypes.bfloat16

        def ref(data):
            with np.errstate(over="ignore"):
                h = data["x"].astype(np_mid)
            return ([h] if mid == t.FLOAT16 else []) + [h.astype(np.float32)]

        kind = t.DataType.Name(mid).lower()
        return Op(m, sets, f"Cast float -> {kind} -> float: rounding to nearest even, overflow to inf, subnormals", ref)

    return case


def float8_kinds():
    """The 8-bit floats: (short name, ONNX code, ml_dtypes type)."""
    import ml_dtypes

    t = T()
    return [
        ("e4m3fn", t.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
        ("e4m3fnuz", t.FLOAT8E4M3FNUZ, ml_dtypes.float8_e4m3fnuz),
        ("e5m2", t.FLOAT8E5M2, ml_dtypes.float8_e5m2),
        ("e5m2fnuz", t.FLOAT8E5M2FNUZ, ml_dtypes.float8_e5m2fnuz),
    ]


def float8_edges(x):
    """Values where casts to the 8-bit floats go wrong, in x's first rows:
    ties at e4m3's and e5m2's last bit, just past them, the largest values
    and past them (448, 240, 57344), infinities, NaN, subnormals, zeros.
    Nothing in [61440, 65536), which e5m2 rounds past its largest value:
    there onnxruntime 1.32 gives NaN without saturation where ONNX's
    reference (and Egret) give infinity; 61439 and 65536 lie either side."""
    p = lambda e: 2.0**e  # noqa: E731
    edges = [1 + p(-4), 1 + 3 * p(-4), 1 + p(-3), 1 + 3 * p(-3), 1 + p(-4) + p(-10), 448.0, 464.0, 470.0,
             240.0, 248.0, 250.0, 57344.0, 61439.0, 65536.0, 70000.0, 1e9, -1e9, np.inf, -np.inf, np.nan, p(-9),
             3 * p(-10), p(-16), 1.5 * p(-17), 1e-12, 0.0, -0.0, -p(-7), -5 * p(-11), 15.5, -0.34]
    flat = x.reshape(-1)
    flat[: len(edges)] = edges
    return x


def cast_float8(name):
    """Cast float -> each 8-bit float, saturating and not -> float."""
    import onnx.numpy_helper
    from onnx import helper

    t = T()
    rng = rng_for(name)
    nodes, outs, order = [], [], []
    for short, code, np_type in float8_kinds():
        for saturate in (1, 0):
            y = f"{short}{'' if saturate else '_no_saturate'}"
            nodes += [
                helper.make_node("Cast", ["x"], [y + "_8"], to=code, saturate=saturate),
                helper.make_node("Cast", [y + "_8"], [y], to=t.FLOAT),
            ]
            outs.append(vi(y, t.FLOAT, ["n", COLS]))
            order.append((np_type, saturate))
    m = graph_model(nodes, [vi("x", t.FLOAT, ["n", COLS])], outs, [])
    sets = [{"x": float8_edges(f32(rng, n, COLS, scale=3.0))} for n in (5, 11)]

    def ref(data):
        x = data["x"]
        with np.errstate(over="ignore", invalid="ignore"):
            return [
                (onnx.numpy_helper.saturate_cast(x, np_type) if saturate else x.astype(np_type)).astype(np.float32)
                for np_type, saturate in order
            ]

    note = "Cast float -> float8 (e4m3fn, e4m3fnuz, e5m2, e5m2fnuz; saturate 1 and 0) -> float: ties, overflow, subnormals"
    return Op(m, sets, note, ref)


def cast_narrow_int(name):
    """Cast float -> int4, uint4, int2, uint2 -> float: whole numbers in and
    past each range, which wrap (onnxruntime rounds a fraction where ONNX's
    reference truncates, so the data has none)."""
    from onnx import helper

    t = T()
    rng = rng_for(name)
    kinds = [("int4", t.INT4, -8, 4), ("uint4", t.UINT4, 0, 4), ("int2", t.INT2, -2, 2), ("uint2", t.UINT2, 0, 2)]
    nodes, outs = [], []
    for short, code, _, _ in kinds:
        nodes += [
            helper.make_node("Cast", ["x"], [short + "_n"], to=code),
            helper.make_node("Cast", [short + "_n"], [short], to=t.FLOAT),
        ]
        outs.append(vi(short, t.FLOAT, ["n", COLS]))
    m = graph_model(nodes, [vi("x", t.FLOAT, ["n", COLS])], outs, [], opset=25)
    sets = [{"x": rng.integers(-40, 41, (n, COLS)).astype(np.float32)} for n in (5, 11)]

    def ref(data):
        x = np.trunc(data["x"]).astype(np.int64)
        return [(((x - lo) % (1 << bits)) + lo).astype(np.float32) for _, _, lo, bits in kinds]

    return Op(m, sets, "Cast float -> int4, uint4, int2, uint2 -> float: whole numbers in and past each range (wrapped)", ref)


def dq_float8_weight_matmul(name):
    """An fp8 weight-only product: DequantizeLinear of a float8e4m3fn
    initializer [37, 23] with a scale per column, into a MatMul."""
    import ml_dtypes
    from onnx import helper

    t = T()
    rng = rng_for(name)
    K, N = COLS, 23
    w8 = (rng.standard_normal((K, N)) * 40).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.002, 0.01, N).astype(np.float32)
    w_init = helper.make_tensor("w_q", t.FLOAT8E4M3FN, [K, N], w8.view(np.uint8).tobytes(), raw=True)
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    m = graph_model(nodes, [vi("x", t.FLOAT, ["n", K])], [vi("y", t.FLOAT, ["n", N])], [w_init, init("w_scale", scale)])
    sets = [{"x": f32(rng, n, K)} for n in (5, 11)]
    w = w8.astype(np.float64) * scale.astype(np.float64)

    def ref(data):
        return [data["x"].astype(np.float64) @ w]

    return Op(m, sets, "DequantizeLinear of a float8e4m3fn initializer [37, 23], a scale per column, into a MatMul", ref)


def qdq_float8(short, saturate):
    """QuantizeLinear to an 8-bit float per axis (its zero point 0) and
    DequantizeLinear back, as static fp8 QDQ models do."""

    def case(name):
        import onnx.numpy_helper
        from onnx import helper

        t = T()
        rng = rng_for(name)
        code, np_type = next((c, n) for s, c, n in float8_kinds() if s == short)
        scale = rng.uniform(0.005, 0.05, COLS).astype(np.float32)
        zero = helper.make_tensor("zero", code, [COLS], bytes(COLS), raw=True)
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], axis=1, saturate=saturate),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], axis=1),
        ]
        m = graph_model(nodes, [vi("x", t.FLOAT, ["n", COLS])], [vi("y", t.FLOAT, ["n", COLS])], [init("scale", scale), zero])
        sets = [{"x": float8_edges(f32(rng, n, COLS, scale=3.0))} for n in (5, 11)]

        def ref(data):
            x = data["x"] / scale
            with np.errstate(over="ignore", invalid="ignore"):
                q = onnx.numpy_helper.saturate_cast(x, np_type) if saturate else x.astype(np_type)
            return [q.astype(np.float32) * scale]

        what = "saturating" if saturate else "not saturating"
        return Op(m, sets, f"QuantizeLinear to float8{short} per axis ({what}) and DequantizeLinear back", ref)

    return case


# --- com.microsoft --------------------------------------------------------

H = 30  # hidden size of the normalisation and attention cases: 3 heads of 10


def bsh_sets(rng, extra=None, dtype=np.float32):
    """Two data sets of `input` [batch, sequence, H] (2 x 7, 1 x 13) and
    what `extra` adds, float tensors in `dtype`."""
    sets = []
    for b, s in ((2, 7), (1, 13)):
        d = {"input": f32(rng, b, s, H)}
        if extra:
            d.update(extra(rng, b, s))
        sets.append({k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in d.items()})
    return sets


def layer_norm(rng, x, gamma, beta, eps, simplified):
    x = x.astype(np.float64)
    if simplified:
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    else:
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    y = y * gamma
    return y + beta if beta is not None else y


def skip_layer_norm(beta, bias, simplified=False, half=False):
    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        ft, np_f = (t.FLOAT16, np.float16) if half else (t.FLOAT, np.float32)
        gamma = rng.uniform(0.5, 1.5, H).astype(np_f)
        b = f32(rng, H, scale=0.1).astype(np_f)
        bias_ = f32(rng, H, scale=0.1).astype(np_f)
        inits = [init("gamma", gamma)]
        ins = ["input", "skip", "gamma"]
        if not simplified:
            ins.append("beta" if beta else "")
            if beta:
                inits.append(init("beta", b))
        if bias:
            ins.append("bias")
            inits.append(init("bias", bias_))
        op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
        node = helper.make_node(op, ins, ["output", "", "", "input_skip_bias_sum"], domain=MS, epsilon=1e-5)
        shape = ["batch", "sequence", H]
        m = graph_model(
            [node],
            [vi("input", ft, shape), vi("skip", ft, shape)],
            [vi("output", ft, shape), vi("input_skip_bias_sum", ft, shape)],
            inits,
        )
        sets = bsh_sets(rng, lambda r, bb, s: {"skip": f32(r, bb, s, H)}, np_f)

        def ref(data):
            s = data["input"].astype(np.float64) + data["skip"] + (bias_.astype(np.float64) if bias else 0)
            return [layer_norm(None, s, gamma, b if beta and not simplified else None, 1e-5, simplified), s]

        what = "RMS" if simplified else ("with beta" if beta else "without beta")
        what += f", {'with' if bias else 'without'} bias" + (", float16" if half else "")
        return Op(m, sets, f"{op} ({what}) and its 4th output input_skip_bias_sum", ref)

    return case


def simplified_layer_norm(domain):
    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        gamma = rng.uniform(0.5, 1.5, H).astype(np.float32)
        node = helper.make_node(
            "SimplifiedLayerNormalization", ["input", "scale"], ["output"], domain=domain, axis=-1, epsilon=1e-6
        )
        shape = ["batch", "sequence", H]
        m = graph_model([node], [vi("input", t.FLOAT, shape)], [vi("output", t.FLOAT, shape)], [init("scale", gamma)])

        def ref(data):
            return [layer_norm(None, data["input"], gamma, None, 1e-6, True)]

        note = (
            f"SimplifiedLayerNormalization (RMSNorm) in the {domain or 'default'} domain, "
            "where onnxruntime registers it (opset 1)"
        )
        return Op(m, bsh_sets(rng), note, ref)

    return case


def erf_gelu(x):
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def tanh_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def activation(op, bias, attrs=None, half=False):
    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        ft, np_f = (t.FLOAT16, np.float16) if half else (t.FLOAT, np.float32)
        b = f32(rng, H, scale=0.5).astype(np_f)
        ins = ["input"] + (["bias"] if bias else [])
        node = helper.make_node(op, ins, ["output"], domain=MS, **(attrs or {}))
        shape = ["batch", "sequence", H]
        m = graph_model([node], [vi("input", ft, shape)], [vi("output", ft, shape)], [init("bias", b)] if bias else [])
        sets = bsh_sets(rng)
        for d in sets:
            d["input"] = (d["input"] * 2.5).astype(np_f)

        def ref(data):
            x = data["input"].astype(np.float64) + (b.astype(np.float64) if bias else 0)
            if op == "QuickGelu":
                a = (attrs or {}).get("alpha", 1.702)
                return [x / (1 + np.exp(-a * x))]
            return [tanh_gelu(x) if op == "FastGelu" else erf_gelu(x)]

        note = f"{op} {'with' if bias else 'without'} bias"
        note += (f" {attrs}" if attrs else "") + (", float16" if half else "")
        return Op(m, sets, note, ref)

    return case


def embed_layer_norm(name):
    from onnx import helper

    t = T()
    rng = rng_for(name)
    vocab, positions = 101, 29
    word, pos, seg = f32(rng, vocab, H), f32(rng, positions, H), f32(rng, 2, H)
    gamma = rng.uniform(0.5, 1.5, H).astype(np.float32)
    beta = f32(rng, H, scale=0.1)
    weights = {
        "word_embedding": word,
        "position_embedding": pos,
        "segment_embedding": seg,
        "gamma": gamma,
        "beta": beta,
    }
    inits = [init(n, a) for n, a in weights.items()]
    ins = ["input_ids", "segment_ids", *weights, "mask"]
    node = helper.make_node("EmbedLayerNormalization", ins, ["output", "mask_index"], domain=MS, epsilon=1e-12)
    bs = ["batch", "sequence"]
    m = graph_model(
        [node],
        [vi("input_ids", t.INT32, bs), vi("segment_ids", t.INT32, bs), vi("mask", t.INT32, bs)],
        [vi("output", t.FLOAT, bs + [H]), vi("mask_index", t.INT32, ["batch"])],
        inits,
    )
    sets = []
    for b, s in ((2, 7), (3, 13)):
        mask = np.ones((b, s), np.int32)
        mask[1, s - 3 :] = 0
        seg_ids = (np.arange(s)[None, :] >= s // 2).astype(np.int32).repeat(b, 0)
        ids = rng.integers(0, vocab, (b, s)).astype(np.int32)
        sets.append({"input_ids": ids, "segment_ids": seg_ids, "mask": mask})

    def ref(data):
        ids, sg = data["input_ids"], data["segment_ids"]
        e = word[ids].astype(np.float64) + pos[np.arange(ids.shape[1])][None] + seg[sg]
        return [layer_norm(None, e, gamma, beta, 1e-12, False), data["mask"].sum(1).astype(np.int32)]

    note = (
        "EmbedLayerNormalization: word + position + segment embeddings, LayerNorm, "
        "and the mask index (each row's count of ones in the mask)"
    )
    return Op(m, sets, note, ref)


def attention(unidirectional, mask):
    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        heads = 3
        w = f32(rng, H, 3 * H, scale=0.3)
        b = f32(rng, 3 * H, scale=0.1)
        ins = ["input", "weights", "bias"] + (["mask_index"] if mask else [])
        attrs = {"num_heads": heads}
        if unidirectional:
            attrs["unidirectional"] = 1
        node = helper.make_node("Attention", ins, ["output"], domain=MS, **attrs)
        shape = ["batch", "sequence", H]
        inputs = [vi("input", t.FLOAT, shape)] + ([vi("mask_index", t.INT32, ["batch", "sequence"])] if mask else [])
        m = graph_model([node], inputs, [vi("output", t.FLOAT, shape)], [init("weights", w), init("bias", b)])

        def extra(r, bb, s):
            if not mask:
                return {}
            mk = np.ones((bb, s), np.int32)
            if bb > 1:
                mk[1, s - 2 :] = 0
            return {"mask_index": mk}

        sets = bsh_sets(rng, extra)

        def ref(data):
            x = data["input"].astype(np.float64)
            bb, s, _ = x.shape
            qkv = x @ w + b
            q, k, v = [
                qkv[..., i * H : (i + 1) * H].reshape(bb, s, heads, H // heads).transpose(0, 2, 1, 3) for i in range(3)
            ]
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(H // heads)
            if mask:
                scores = scores + (1 - data["mask_index"][:, None, None, :]) * -10000.0
            if unidirectional:
                scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            return [(p @ v).transpose(0, 2, 1, 3).reshape(bb, s, H)]

        what = "a raw [batch, sequence] int32 mask" if mask else "no mask"
        what += ", unidirectional (causal)" if unidirectional else ""
        note = f"Attention (com.microsoft): packed QKV weight [30, 90] and bias, 3 heads of 10, {what}"
        return Op(m, sets, note, ref)

    return case


def matmul_integer_to_float(name):
    from onnx import helper

    t = T()
    rng = rng_for(name)
    bq = rng.integers(-128, 128, (37, 23)).astype(np.int8)
    bias = f32(rng, 23)
    inits = [
        init("b", bq),
        init("a_scale", np.float32(0.021)),
        init("b_scale", rng.uniform(0.005, 0.02, 23).astype(np.float32)),
        init("a_zero_point", np.array(117, np.uint8)),
        init("b_zero_point", rng.integers(-3, 4, 23).astype(np.int8)),
        init("bias", bias),
    ]
    ins = ["a", "b", "a_scale", "b_scale", "a_zero_point", "b_zero_point", "bias"]
    node = helper.make_node("MatMulIntegerToFloat", ins, ["y"], domain=MS)
    m = graph_model([node], [vi("a", t.UINT8, ["n", 37])], [vi("y", t.FLOAT, ["n", 23])], inits)
    sets = [{"a": rng.integers(0, 256, (n, 37)).astype(np.uint8)} for n in (5, 11)]
    bs = np.array(inits[2].float_data or np.frombuffer(inits[2].raw_data, np.float32))
    bz = np.frombuffer(inits[4].raw_data, np.int8).astype(np.float64)

    def ref(data):
        a = data["a"].astype(np.float64) - 117
        return [(a @ (bq - bz)) * 0.021 * bs + bias]

    note = "MatMulIntegerToFloat: uint8 activations x int8 weights, per-column weight scales and zero points, bias"
    return Op(m, sets, note, ref)


def dynamic_quantize_matmul(name):
    from onnx import helper

    t = T()
    rng = rng_for(name)
    bq = rng.integers(-128, 128, (37, 23)).astype(np.int8)
    scale = rng.uniform(0.005, 0.02, 23).astype(np.float32)
    bias = f32(rng, 23)
    inits = [init("b", bq), init("b_scale", scale), init("b_zero_point", np.zeros(23, np.int8)), init("bias", bias)]
    node = helper.make_node("DynamicQuantizeMatMul", ["a", "b", "b_scale", "b_zero_point", "bias"], ["y"], domain=MS)
    m = graph_model([node], [vi("a", t.FLOAT, ["n", 37])], [vi("y", t.FLOAT, ["n", 23])], inits)
    sets = [{"a": f32(rng, n, 37)} for n in (5, 11)]

    def ref(data):
        # Without the activation's quantisation: the difference is its rounding.
        return [data["a"].astype(np.float64) @ (bq * scale.astype(np.float64)) + bias]

    note = (
        "DynamicQuantizeMatMul: the activation quantised to uint8 at run time (as DynamicQuantizeLinear), "
        "per-column int8 weights, bias; vs_numpy is against the unquantised activation"
    )
    return Op(m, sets, note, ref)


def pack_nibbles(q):
    """Pairs of 4-bit values along the last axis into bytes, the first in
    the low nibble (pads an odd count with 0)."""
    q = np.asarray(q, np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], -1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits(block, zero_points, accuracy_level, K=37, N=23, half=False):
    """MatMulNBits with B [N, blocks, block / 2] (two 4-bit values a byte,
    the first in the low nibble), scales [N x blocks] and zero points
    [N x ceil(blocks / 2)] packed the same way (absent: 8)."""

    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        ft, np_f = (t.FLOAT16, np.float16) if half else (t.FLOAT, np.float32)
        nb = -(-K // block)
        q = rng.integers(0, 16, (N, nb * block)).astype(np.uint8)
        scale = rng.uniform(0.02, 0.1, (N, nb)).astype(np_f)
        zp = rng.integers(5, 12, (N, nb)).astype(np.uint8) if zero_points else np.full((N, nb), 8, np.uint8)
        bpacked = pack_nibbles(q).reshape(N, nb, block // 2)
        inits = [init("B", bpacked), init("scales", scale.reshape(-1))]
        ins = ["A", "B", "scales"]
        if zero_points:
            inits.append(init("zero_points", pack_nibbles(zp).reshape(-1)))
            ins.append("zero_points")
        attrs = dict(K=K, N=N, bits=4, block_size=block, accuracy_level=accuracy_level)
        node = helper.make_node("MatMulNBits", ins, ["Y"], domain=MS, **attrs)
        m = graph_model([node], [vi("A", ft, ["batch", "sequence", K])], [vi("Y", ft, ["batch", "sequence", N])], inits)
        sets = [{"A": f32(rng, b, s, K).astype(np_f)} for b, s in ((1, 5), (3, 7))]
        w = ((q.astype(np.float64) - np.repeat(zp, block, 1)) * np.repeat(scale.astype(np.float64), block, 1))[:, :K].T

        def ref(data):
            return [data["A"].astype(np.float64) @ w]

        return Op(
            m,
            sets,
            f"MatMulNBits: 4 bits, block {block}, K = {K} ({'not ' if K % block else ''}a multiple of the block), "
            f"N = {N}, "
            f"{'with packed zero points' if zero_points else 'no zero points (8)'}, accuracy_level {accuracy_level}"
            + (", float16" if half else "")
            + (" (activations quantised to int8 per block: vs_numpy shows that rounding)" if accuracy_level else ""),
            ref,
        )

    return case


def gather_block_quantized(kind, zero_points, D=96):
    """GatherBlockQuantized of a [53, D] table quantized along its last axis
    in blocks of 32: `kind` int4 or uint4 (4-bit tensors, as onnxruntime's
    quantizer stores them) or uint8 (two values a byte, the first in the
    low nibble, `bits=4`)."""

    def case(name):
        import ml_dtypes
        from onnx import helper

        t = T()
        rng = rng_for(name)
        V, block = 53, 32
        nb = -(-D // block)
        if kind == "int4":
            q = rng.integers(-8, 8, (V, D))
            zp = rng.integers(-2, 3, (V, nb)) if zero_points else np.zeros((V, nb), int)
            data = q.astype(ml_dtypes.int4)
        else:
            q = rng.integers(0, 16, (V, D))
            zp = rng.integers(6, 11, (V, nb)) if zero_points else np.full((V, nb), 8)
            data = q.astype(ml_dtypes.uint4) if kind == "uint4" else pack_nibbles(q)
        scale = rng.uniform(0.02, 0.1, (V, nb)).astype(np.float32)
        inits = [init("data", data), init("scales", scale)]
        ins = ["data", "indices", "scales"]
        if zero_points:
            if kind == "uint8":
                zp_data = pack_nibbles(zp)
            else:
                zp_data = zp.astype(ml_dtypes.int4 if kind == "int4" else ml_dtypes.uint4)
            inits.append(init("zero_points", zp_data))
            ins.append("zero_points")
        attrs = dict(gather_axis=0, quantize_axis=1, block_size=block, bits=4)
        node = helper.make_node("GatherBlockQuantized", ins, ["output"], domain=MS, **attrs)
        bs = ["batch", "sequence"]
        m = graph_model([node], [vi("indices", t.INT64, bs)], [vi("output", t.FLOAT, bs + [D])], inits)
        sets = [{"indices": rng.integers(0, V, (b, s)).astype(np.int64)} for b, s in ((2, 7), (1, 13))]
        table = (q - spread(zp, block, 1, D)) * spread(scale.astype(np.float64), block, 1, D)

        def ref(data):
            return [table[data["indices"]]]

        packed = " packed two a byte (bits=4)" if kind == "uint8" else ""
        zps = "with zero points" if zero_points else f"no zero points ({'0' if kind == 'int4' else '8'})"
        return Op(
            m,
            sets,
            f"GatherBlockQuantized: a [53, {D}] {kind}{packed} table, blocks of 32 along the last axis"
            f"{' (the last one partial)' if D % block else ''}, {zps}, int64 indices [batch, sequence]",
            ref,
        )

    return case


def rope_cache(rng, positions, half, base=10000.0):
    inv = 1.0 / base ** (np.arange(half) / half)
    angles = np.arange(positions)[:, None] * inv[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x, cos, sin, interleaved):
    """x [..., head] rotated with cos/sin [..., head/2]."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def rotary_embedding(interleaved):
    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        heads, head = 3, 18
        hidden = heads * head
        cos, sin = rope_cache(rng, 41, head // 2)
        node = helper.make_node(
            "RotaryEmbedding",
            ["input", "position_ids", "cos_cache", "sin_cache"],
            ["output"],
            domain=MS,
            interleaved=interleaved,
            num_heads=heads,
        )
        shape = ["batch", "sequence", hidden]
        m = graph_model(
            [node],
            [vi("input", t.FLOAT, shape), vi("position_ids", t.INT64, ["batch", "sequence"])],
            [vi("output", t.FLOAT, shape)],
            [init("cos_cache", cos), init("sin_cache", sin)],
        )
        sets = []
        for b, s, start in ((2, 7, 3), (1, 13, 0)):
            positions = (start + np.arange(s) + 5 * np.arange(b)[:, None]).astype(np.int64)
            sets.append({"input": f32(rng, b, s, hidden), "position_ids": positions})

        def ref(data):
            x = data["input"].astype(np.float64)
            bb, s, _ = x.shape
            x = x.reshape(bb, s, heads, head)
            p = data["position_ids"]
            c, sn = cos[p][:, :, None], sin[p][:, :, None]
            return [rotate(x, c, sn, interleaved).reshape(bb, s, hidden)]

        note = (
            "RotaryEmbedding (com.microsoft), [batch, sequence, 3 x 18] input, "
            f"int64 position_ids [batch, sequence], interleaved={interleaved}"
        )
        return Op(m, sets, note, ref)

    return case


def group_query_attention(rotary):
    def case(name):
        from onnx import helper

        t = T()
        rng = rng_for(name)
        heads, kv_heads, head = 4, 2, 16  # onnxruntime's CPU kernel needs head_size % 8 == 0
        ins = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"]
        inits = []
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
        cos = sin = None
        if rotary:
            cos, sin = rope_cache(rng, 64, head // 2)
            ins += ["cos_cache", "sin_cache"]
            inits += [init("cos_cache", cos), init("sin_cache", sin)]
            attrs.update(do_rotary=1, rotary_interleaved=0)
        outs = ["output", "present_key", "present_value"]
        node = helper.make_node("GroupQueryAttention", ins, outs, domain=MS, **attrs)
        bs = ["batch", "sequence"]
        past = ["batch", kv_heads, "past_sequence", head]
        present = ["batch", kv_heads, "total_sequence", head]
        inputs = [
            vi("query", t.FLOAT, bs + [heads * head]),
            vi("key", t.FLOAT, bs + [kv_heads * head]),
            vi("value", t.FLOAT, bs + [kv_heads * head]),
            vi("past_key", t.FLOAT, past),
            vi("past_value", t.FLOAT, past),
            vi("seqlens_k", t.INT32, ["batch"]),
            vi("total_sequence_length", t.INT32, []),
        ]
        outputs = [
            vi("output", t.FLOAT, bs + [heads * head]),
            vi("present_key", t.FLOAT, present),
            vi("present_value", t.FLOAT, present),
        ]
        m = graph_model([node], inputs, outputs, inits)
        sets = []
        # The CPU kernel takes several new tokens after a past only at batch 1.
        for b, s, p in ((2, 5, 0), (2, 1, 7), (1, 3, 6)):
            sets.append(
                {
                    "query": f32(rng, b, s, heads * head),
                    "key": f32(rng, b, s, kv_heads * head),
                    "value": f32(rng, b, s, kv_heads * head),
                    "past_key": f32(rng, b, kv_heads, p, head),
                    "past_value": f32(rng, b, kv_heads, p, head),
                    "seqlens_k": np.full(b, p + s - 1, np.int32),
                    "total_sequence_length": np.array(p + s, np.int32),
                }
            )

        def ref(data):
            q = data["query"].astype(np.float64)
            bb, s, _ = q.shape
            p = data["past_key"].shape[2]
            q = q.reshape(bb, s, heads, head).transpose(0, 2, 1, 3)
            k = data["key"].astype(np.float64).reshape(bb, s, kv_heads, head).transpose(0, 2, 1, 3)
            v = data["value"].astype(np.float64).reshape(bb, s, kv_heads, head).transpose(0, 2, 1, 3)
            if rotary:
                pos = p + np.arange(s)
                c, sn = cos[pos][None, None], sin[pos][None, None]
                q, k = rotate(q, c, sn, False), rotate(k, c, sn, False)
            kk = np.concatenate([data["past_key"], k], 2)
            vv = np.concatenate([data["past_value"], v], 2)
            rep = heads // kv_heads
            ke, ve = np.repeat(kk, rep, 1), np.repeat(vv, rep, 1)
            scores = q @ ke.transpose(0, 1, 3, 2) / np.sqrt(head)
            causal = (np.arange(p + s)[None, :] <= (p + np.arange(s))[:, None])
            scores = np.where(causal, scores, -np.inf)
            a = np.exp(scores - scores.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            return [(a @ ve).transpose(0, 2, 1, 3).reshape(bb, s, heads * head), kk, vv]

        what = "do_rotary=1 with cos/sin caches [64, 8] (half-split)" if rotary else "no rotary"
        return Op(
            m,
            sets,
            "GroupQueryAttention: 4 query heads over 2 key/value heads of 16 (the CPU kernel rejects head "
            "sizes not a multiple of 8), past_key/past_value [batch, 2, past, 16] (not shared with present), "
            f"seqlens_k = total - 1, {what}; data sets: a prompt of 5 (batch 2), a decode step after 7 "
            "(batch 2), 3 tokens after 6 (batch 1: the CPU kernel rejects several new tokens after a past "
            "at batch > 1)",
            ref,
        )

    return case


def _ops():
    t = T()
    return {
        "quantize_linear_uint8": quantize_dequantize("QuantizeLinear", t.UINT8),
        "quantize_linear_int8": quantize_dequantize("QuantizeLinear", t.INT8),
        "quantize_linear_per_axis": quantize_dequantize("QuantizeLinear", t.INT8, axis=1),
        "quantize_linear_blocked": quantize_dequantize("QuantizeLinear", t.INT8, block=16),
        "dequantize_linear_uint8": quantize_dequantize("DequantizeLinear", t.UINT8),
        "dequantize_linear_int8": quantize_dequantize("DequantizeLinear", t.INT8),
        "dequantize_linear_per_axis": quantize_dequantize("DequantizeLinear", t.UINT8, axis=1),
        "dequantize_linear_blocked": quantize_dequantize("DequantizeLinear", t.INT8, block=16),
        "qdq_int4": qdq_4bit(t.INT4),
        "qdq_uint4": qdq_4bit(t.UINT4),
        "qdq_int4_blocked": qdq_4bit(t.INT4, block=16),
        "dequantize_linear_int4_weight_matmul": dq_int4_weight_matmul,
        "dynamic_quantize_linear": dynamic_quantize_linear,
        "matmul_integer_u8s8_zero_points": matmul_integer(t.INT8, True),
        "matmul_integer_u8s8": matmul_integer(t.INT8, False),
        "matmul_integer_u8u8_zero_points": matmul_integer(t.UINT8, True),
        "matmul_integer_u8u8_per_column": matmul_integer(t.UINT8, True, per_column=True),
        "qlinear_matmul_u8u8": qlinear_matmul(t.UINT8),
        "qlinear_matmul_u8s8": qlinear_matmul(t.INT8),
        "cast_float16": cast_roundtrip(t.FLOAT16),
        "gather_float16_table": gather_half_table,
        "cast_bfloat16": cast_roundtrip(t.BFLOAT16),
        "cast_float8": cast_float8,
        "cast_int4_int2": cast_narrow_int,
        "dequantize_linear_float8_weight_matmul": dq_float8_weight_matmul,
        "qdq_float8e4m3fn": qdq_float8("e4m3fn", 1),
        "qdq_float8e5m2_no_saturate": qdq_float8("e5m2", 0),
        "skip_layer_norm": skip_layer_norm(beta=True, bias=True),
        "skip_layer_norm_no_beta": skip_layer_norm(beta=False, bias=True),
        "skip_layer_norm_no_bias": skip_layer_norm(beta=True, bias=False),
        "skip_layer_norm_fp16": skip_layer_norm(beta=True, bias=True, half=True),
        "skip_simplified_layer_norm": skip_layer_norm(beta=False, bias=True, simplified=True),
        "skip_simplified_layer_norm_fp16": skip_layer_norm(beta=False, bias=True, simplified=True, half=True),
        "simplified_layer_norm": simplified_layer_norm(""),
        "bias_gelu": activation("BiasGelu", True),
        "bias_gelu_fp16": activation("BiasGelu", True, half=True),
        "fast_gelu": activation("FastGelu", False),
        "fast_gelu_bias": activation("FastGelu", True),
        "gelu": activation("Gelu", False),
        "quick_gelu": activation("QuickGelu", False, {"alpha": 1.702}),
        "quick_gelu_silu": activation("QuickGelu", False, {"alpha": 1.0}),
        "embed_layer_norm": embed_layer_norm,
        "attention_mask": attention(False, True),
        "attention_unidirectional": attention(True, False),
        "attention_unidirectional_mask": attention(True, True),
        "matmul_integer_to_float": matmul_integer_to_float,
        "dynamic_quantize_matmul": dynamic_quantize_matmul,
        "matmul_nbits_b16_zp_acc0": matmul_nbits(16, True, 0),
        "matmul_nbits_b16_acc4": matmul_nbits(16, False, 4),
        "matmul_nbits_b32_zp_acc4": matmul_nbits(32, True, 4),
        "matmul_nbits_b32_acc0": matmul_nbits(32, False, 0),
        "matmul_nbits_b32_zp_fp16": matmul_nbits(32, True, 0, half=True),
        "matmul_nbits_b128_zp_acc0": matmul_nbits(128, True, 0, K=150),
        "matmul_nbits_b128_acc4": matmul_nbits(128, False, 4, K=150),
        "gather_block_quantized_int4": gather_block_quantized("int4", False),
        "gather_block_quantized_uint4_zp": gather_block_quantized("uint4", True, D=70),
        "gather_block_quantized_uint8": gather_block_quantized("uint8", False),
        "rotary_embedding": rotary_embedding(0),
        "rotary_embedding_interleaved": rotary_embedding(1),
        "group_query_attention": group_query_attention(False),
        "group_query_attention_rotary": group_query_attention(True),
    }


OPS = _ops


def make_op(name, out_root):
    case = OPS()[name](name)
    meta = {"source": None, "tool": "onnx.helper (by hand)", "note": case.note}
    save(os.path.join(out_root, "ops", name), name, case.model, case.sets, meta, numpy_reference=case.numpy_reference)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", help="where to write (default: tests/data/formats; target/formats-extra for the models not committed)"
    )
    parser.add_argument("--keep-going", action="store_true", help="report a model that fails and go on")
    parser.add_argument(
        "names", nargs="*", help="models, op cases or `ops` (every op case); default: the committed models and all ops"
    )
    a = parser.parse_args()
    ops = list(OPS())
    names = a.names or [n for n, m in MODELS.items() if m[2]] + ["ops"]
    failed = []
    for name in names:
        for n in ops if name == "ops" else [name]:
            if n not in MODELS and n not in ops:
                sys.exit(f"unknown name {n}; known: {', '.join(list(MODELS) + ops)}")
            try:
                if n in MODELS:
                    make_model(n, a.out or (FORMATS if MODELS[n][2] else EXTRA))
                else:
                    make_op(n, a.out or FORMATS)
            except Exception as e:  # noqa: BLE001
                if not a.keep_going:
                    raise
                failed.append(n)
                print(f"{n}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if failed:
        sys.exit("failed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
