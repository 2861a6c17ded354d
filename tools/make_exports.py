#!/usr/bin/env python3
"""Exports small Hugging Face models with PyTorch's ONNX exporters, the way
users export them, with onnxruntime's outputs (all graph optimisations off)
as the reference:

  python3 tools/make_exports.py [--out DIR] [NAME...]

Each model goes to `DIR/<name>/` (default: `tests/data/exports`, or
`tests/data/dynamic_exports` for the ones with symbolic dims) with
`model.onnx`, `test_data_set_N/{input,output}_N.pb` (one data set per
shape) and `meta.json` (exporter, opset, op counts, torch-versus-
onnxruntime error). Weights are random (seeded); nothing is downloaded.
Needs torch, transformers, onnx, onnxscript (the dynamo exporter) and
onnxruntime; CI needs none of them, since the outputs are committed.

Models (NAME; the last three only when named):
- perceiver_wide_heads_dynamo / _legacy: `PerceiverModel` on raw inputs of
  256 positions x 512 channels, 16 latents of 64, one cross-attention head
  of dimension 512 (shaped by the inputs:
  `cross_attention_shape_for_attention="kv"`) and a self-attention of 8
  heads of 8: the shape that once gave wrong answers on wgsl (a key tile
  that filled the workgroup memory).
- gpt2_past_legacy: `GPT2LMHeadModel` (64 wide, 2 layers, 4 heads) with
  `past_key_values` through a `DynamicCache`, exported with `dynamic_axes`
  (batch, sequence, past_sequence, total), opset 17; data sets of a prompt
  with no past, a decode step and a batch of two with a longer past.
- gpt2_past_dynamo: the same, through the dynamo exporter (opset 18,
  `dynamic_shapes`).
- llama_gqa_past_legacy / _dynamo: `LlamaForCausalLM` (64 wide, 2 layers, 4
  query heads over 2 key/value heads) with `position_ids` and
  `past_key_values`, both exporters.
- t5_legacy: `T5Model` (64 wide, 2+2 layers, 4 heads) with symbolic batch,
  sequence and decoder_sequence (`dynamic_axes`); relative position buckets
  computed in the graph at symbolic lengths.
- vit_batch_legacy / _dynamo: `ViTModel` (32x32 images, patches of 8, 64
  wide, 2 layers, 4 heads) with a symbolic batch; data sets of 2, 1 and 5
  images.
- bert_mean_pool_legacy / _dynamo: `BertModel` (64 wide, 2 layers, 4 heads)
  with sentence-transformers' mean pooling over the attention mask,
  exported with `dynamic_axes` (opset 17) or `dynamic_shapes` (opset 18);
  data sets of three shapes, one with padding.
- gpt2_small_past_legacy, llama_150m_past_legacy: the GPT-2 and LLaMA
  exports at base size (GPT-2 small's 124M parameters; a LLaMA of about
  150M: 12 layers of 768, 12 query heads over 4 key/value heads, a 32k
  vocabulary), written to `target/bench-exports/` for
  `tools/decode_loop.py`: an 8-token prompt, then one decode step.
- bert_base_mean_pool_legacy: BERT-base (110M parameters) with the mean
  pooling, to `target/bench-exports/`: data sets of 128 and 32 tokens, the
  format benchmarks' source (`tools/make_formats.py bert_base_*`).
- llama_1b_past_legacy: a LLaMA of TinyLlama-1.1B's shape (1.1B parameters,
  4.4 GB in f32) to `target/bench-exports/`, its weights in one
  external-data file `model.onnx.data`: the compile-memory benchmark. The
  export takes about 15 GB of memory and several minutes.
"""

import argparse
import collections
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")
# Where the base-size models go (relative to tests/data).
BENCH = os.path.join("..", "..", "target", "bench-exports")


class Spec:
    """What to export: the module, the data sets (dicts of input name to
    tensor; the first is traced), the output names, and the symbolic axes
    of each input by name (None: every dim fixed)."""

    def __init__(self, module, data_sets, output_names, dynamic=None, trace=None):
        self.module = module
        self.data_sets = data_sets
        self.output_names = output_names
        self.dynamic = dynamic
        # What the exporter traces (default: the first data set). The legacy
        # exporter bakes in branches an empty past takes: trace with one.
        self.trace = trace or data_sets[0]


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

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inputs):
            return self.m(inputs=inputs).last_hidden_state

    return Spec(Wrapped(model), [{"inputs": torch.randn(1, 256, 512)}], ["last_hidden_state"])


def conv_transpose_decoder():
    """A VAE/U-Net-style upsampling decoder in plain torch: transposed
    convolutions with stride 2 (with and without output_padding), one
    grouped and dilated, a 1-d one, ReLU and SiLU between."""
    import torch
    from torch import nn

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.up1 = nn.ConvTranspose2d(8, 12, 4, stride=2, padding=1)
            self.up2 = nn.ConvTranspose2d(12, 6, 3, stride=2, padding=1, output_padding=1, groups=3, dilation=2)
            self.up3 = nn.ConvTranspose2d(6, 3, 3, stride=1, padding=0, bias=False)
            self.line = nn.ConvTranspose1d(3, 2, 5, stride=3, padding=2)

        def forward(self, z):
            y = torch.relu(self.up1(z))
            y = nn.functional.silu(self.up2(y))
            y = self.up3(y)
            return y, self.line(y.mean(dim=3))

    return Spec(Decoder(), [{"z": torch.randn(1, 8, 5, 7)}, {"z": torch.randn(1, 8, 5, 7)}], ["image", "line"])


def cache_names(prefix, layers):
    """Hugging Face's names of a cache's tensors: `PREFIX.L.key/value`."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def cached_call(model, config, past, **inputs):
    """A causal LM over `past` (each layer's key, then value, as plain
    tensors, the way decode loops feed an exported model) through a
    `DynamicCache`: its logits, then each layer's present key and value."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i in range(len(past) // 2):
        cache.update(past[2 * i], past[2 * i + 1], i)
    out = model(**inputs, past_key_values=cache, use_cache=True)
    present = []
    for layer in out.past_key_values.layers:
        present += [layer.keys, layer.values]
    return (out.logits, *present)


def gpt2_past(base=False):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 small (124M parameters) at base size, else a tiny one.
    layers, heads, width, vocab = (12, 12, 768, 50257) if base else (2, 4, 64, 1000)
    config = GPT2Config(n_embd=width, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=1024)
    model = GPT2LMHeadModel(config)

    class WithCache(torch.nn.Module):
        """GPT-2 taking and returning its cache as plain tensors, the way
        decode loops feed `past_key_values` to an exported model."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, *past):
            return cached_call(self.m, config, past, input_ids=input_ids, attention_mask=attention_mask)

    past_names = cache_names("past_key_values", layers)

    def data(batch, tokens, past):
        d = {
            "input_ids": torch.randint(0, vocab, (batch, tokens)),
            "attention_mask": torch.ones(batch, past + tokens, dtype=torch.long),
        }
        if batch > 1:
            d["attention_mask"][1, :2] = 0  # left padding
        for n in past_names:
            d[n] = torch.randn(batch, heads, past, width // heads)
        return d

    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"}}
    dynamic.update({n: {0: "batch", 2: "past_sequence"} for n in past_names})
    outputs = ["logits"] + cache_names("present", layers)
    # A base-size model's first data set is the decode tool's prompt: 8 tokens, no past.
    sets = [data(1, 8, 0), data(1, 1, 8)] if base else [data(1, 3, 5), data(1, 7, 0), data(1, 1, 9), data(2, 4, 11)]
    return Spec(WithCache(model), sets, outputs, dynamic, trace=data(1, 3, 5))


# LLaMA shapes: layers, query heads, key/value heads, width, ffn, vocabulary.
LLAMA_SIZES = {
    "tiny": (2, 4, 2, 64, 128, 1000),
    # About 150M parameters: 12 layers of 768, 12 query heads over 4.
    "150m": (12, 12, 4, 768, 2048, 32000),
    # TinyLlama-1.1B's shape: 22 layers of 2048, 32 query heads over 4
    # key/value heads, 5632 wide feed-forward; 4.4 GB in f32.
    "1b": (22, 32, 4, 2048, 5632, 32000),
}


def llama_past(base=False, size=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = size or ("150m" if base else "tiny")
    layers, heads, kv_heads, width, ffn, vocab = LLAMA_SIZES[size]
    base = size != "tiny"
    config = LlamaConfig(
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config)

    class WithCache(torch.nn.Module):
        """LLaMA taking and returning its cache as plain tensors."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return cached_call(self.m, config, past, **inputs)

    past_names = cache_names("past_key_values", layers)

    def data(batch, tokens, past):
        d = {
            "input_ids": torch.randint(0, vocab, (batch, tokens)),
            "attention_mask": torch.ones(batch, past + tokens, dtype=torch.long),
            "position_ids": torch.arange(past, past + tokens).unsqueeze(0).expand(batch, tokens).contiguous(),
        }
        for n in past_names:
            d[n] = torch.randn(batch, kv_heads, past, width // heads)
        return d

    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
    }
    dynamic.update({n: {0: "batch", 2: "past_sequence"} for n in past_names})
    outputs = ["logits"] + cache_names("present", layers)
    sets = [data(1, 8, 0), data(1, 1, 8)] if base else [data(1, 3, 5), data(1, 7, 1), data(1, 1, 9), data(2, 4, 11)]
    return Spec(WithCache(model), sets, outputs, dynamic, trace=data(1, 3, 5))


def vit_batch():
    import torch
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
    )
    model = ViTModel(config, add_pooling_layer=False)

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).last_hidden_state

    sets = [{"pixel_values": torch.randn(b, 3, 32, 32)} for b in (2, 1, 5)]
    return Spec(Hidden(model), sets, ["last_hidden_state"], {"pixel_values": {0: "batch"}})


def t5():
    import torch
    from transformers import T5Config, T5Model

    config = T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=1000
    )
    model = T5Model(config)

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, decoder_input_ids):
            return self.m(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
            ).last_hidden_state

    def data(batch, tokens, decoded):
        d = {
            "input_ids": torch.randint(0, vocab, (batch, tokens)),
            "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
            "decoder_input_ids": torch.randint(0, 1000, (batch, decoded)),
        }
        if batch > 1:
            d["attention_mask"][1, tokens - 2 :] = 0
        return d

    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
    }
    return Spec(Hidden(model), [data(2, 12, 5), data(1, 4, 1), data(3, 9, 7)], ["last_hidden_state"], dynamic)


def bert_mean_pool(base=False):
    import torch
    from transformers import BertConfig, BertModel

    # BERT-base (110M parameters: 12 layers of 768, 12 heads) at base size.
    width, layers, heads, ffn, vocab = (768, 12, 12, 3072, 30522) if base else (64, 2, 4, 128, 1000)
    config = BertConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn, vocab_size=vocab
    )
    model = BertModel(config)

    class MeanPool(torch.nn.Module):
        """sentence-transformers' mean pooling over the attention mask."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).float()
            return (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def data(batch, tokens):
        d = {
            "input_ids": torch.randint(0, 1000, (batch, tokens)),
            "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        }
        if batch > 1:
            d["attention_mask"][1, tokens - 3 :] = 0  # right padding
        return d

    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    # At base size, the benchmark's shapes: 128 tokens, then 32.
    sets = [data(1, 128), data(1, 32)] if base else [data(2, 12), data(1, 5), data(3, 17)]
    return Spec(MeanPool(model), sets, ["sentence_embedding"], dynamic)


# name: (spec, exporter, opset, folder under tests/data)
MODELS = {
    "perceiver_wide_heads_dynamo": (perceiver, "dynamo", 18, "exports"),
    "perceiver_wide_heads_legacy": (perceiver, "legacy", 17, "exports"),
    "conv_transpose_decoder_legacy": (conv_transpose_decoder, "legacy", 17, "exports"),
    "conv_transpose_decoder_dynamo": (conv_transpose_decoder, "dynamo", 18, "exports"),
    "gpt2_past_legacy": (gpt2_past, "legacy", 17, "dynamic_exports"),
    "gpt2_past_dynamo": (gpt2_past, "dynamo", 18, "dynamic_exports"),
    "llama_gqa_past_legacy": (llama_past, "legacy", 17, "dynamic_exports"),
    "llama_gqa_past_dynamo": (llama_past, "dynamo", 18, "dynamic_exports"),
    "t5_legacy": (t5, "legacy", 17, "dynamic_exports"),
    "vit_batch_legacy": (vit_batch, "legacy", 17, "dynamic_exports"),
    "vit_batch_dynamo": (vit_batch, "dynamo", 18, "dynamic_exports"),
    "bert_mean_pool_legacy": (bert_mean_pool, "legacy", 17, "dynamic_exports"),
    "bert_mean_pool_dynamo": (bert_mean_pool, "dynamo", 18, "dynamic_exports"),
    # Base sizes for benchmarks (hundreds of MB: written under target/, never committed).
    "gpt2_small_past_legacy": (lambda: gpt2_past(base=True), "legacy", 17, BENCH),
    "llama_150m_past_legacy": (lambda: llama_past(base=True), "legacy", 17, BENCH),
    "bert_base_mean_pool_legacy": (lambda: bert_mean_pool(base=True), "legacy", 17, BENCH),
    # Past protobuf's 2 GB: its weights in `model.onnx.data` beside it.
    "llama_1b_past_legacy": (lambda: llama_past(size="1b"), "legacy", 17, BENCH),
}

# Models whose weights go in one external-data file beside `model.onnx`.
EXTERNAL = {"llama_1b_past_legacy"}


def write_tensor(path, name, array):
    from onnx import numpy_helper

    t = numpy_helper.from_array(array, name)
    with open(path, "wb") as f:
        f.write(t.SerializeToString())


def dynamo_shapes(spec, names):
    """`dynamic_shapes` for the dynamo exporter from the named axes, keyed
    by `forward`'s parameters (a `*past` parameter takes a list, one entry
    per tensor it collects, as a tuple)."""
    import inspect

    from torch.export import Dim

    dims = {}

    def shape(name):
        axes = spec.dynamic.get(name, {})
        return {a: dims.setdefault(n, Dim(n, min=1, max=1024)) for a, n in axes.items()} or None

    shapes = {}
    rest = list(names)
    for p in inspect.signature(spec.module.forward).parameters.values():
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            shapes[p.name] = tuple(shape(n) for n in rest)
            rest = []
        else:
            shapes[p.name] = shape(rest.pop(0))
    return shapes


def export(name, out_root):
    import onnx
    import onnxruntime as ort
    import torch

    make, exporter, opset, sub = MODELS[name]
    torch.manual_seed(0)
    np.random.seed(0)
    spec = make()
    model = spec.module.eval()
    folder = os.path.join(out_root or os.path.join(DATA, sub), name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    traced = spec.trace
    names = list(traced)
    args = tuple(traced.values())
    with torch.no_grad():
        if exporter == "dynamo":
            kwargs = {}
            if spec.dynamic:
                kwargs["dynamic_shapes"] = dynamo_shapes(spec, names)
            program = torch.onnx.export(
                model, args, dynamo=True, opset_version=opset, input_names=names, output_names=spec.output_names, **kwargs
            )
            program.save(path)
        else:
            kwargs = {"dynamic_axes": spec.dynamic} if spec.dynamic else {}
            torch.onnx.export(
                model,
                args,
                path,
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=spec.output_names,
                **kwargs,
            )
    exported = set(os.listdir(folder))
    m = onnx.load(path)
    if name in EXTERNAL:
        # Every weight in one file (the exporter writes one per tensor).
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
        written = {"model.onnx", "model.onnx.data"}
        for f in exported - written:
            if os.path.isfile(os.path.join(folder, f)) and not f.startswith("test_data_set") and f != "meta.json":
                os.remove(os.path.join(folder, f))
        del m
        m = onnx.load(path, load_external_data=False)
    else:
        # One file: fold any external data the exporter wrote back in.
        onnx.save(m, path, save_as_external_data=False)
        for f in os.listdir(folder):
            if f.endswith(".data"):
                os.remove(os.path.join(folder, f))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    graph_inputs = [i.name for i in session.get_inputs()]
    errors = []
    for k, data in enumerate(spec.data_sets):
        feeds = {n: data[n].numpy() for n in graph_inputs}
        got = session.run(None, feeds)
        with torch.no_grad():
            expected = model(*data.values())
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        errors.append(max(float(np.abs(e.numpy() - g).max()) if g.size else 0.0 for e, g in zip(expected, got)))
        sets = os.path.join(folder, f"test_data_set_{k}")
        os.makedirs(sets, exist_ok=True)
        for i, n in enumerate(graph_inputs):
            write_tensor(os.path.join(sets, f"input_{i}.pb"), n, feeds[n])
        for i, (o, v) in enumerate(zip(session.get_outputs(), got)):
            write_tensor(os.path.join(sets, f"output_{i}.pb"), o.name, v)
    meta = {
        "name": name,
        "exporter": exporter,
        "opset": opset,
        "nodes": len(m.graph.node),
        "ops": dict(collections.Counter(n.op_type for n in m.graph.node)),
        "torch_vs_ort": errors,
        "inputs": [{n: list(data[n].shape) for n in graph_inputs} for data in spec.data_sets],
        "symbolic": spec.dynamic,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
    }
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {meta['nodes']} nodes, torch vs onnxruntime {errors}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder to write the models into (default: their folder in tests/data)")
    parser.add_argument("names", nargs="*", help="models to export (default: all)")
    a = parser.parse_args()
    for name in a.names or [n for n, m in MODELS.items() if m[3] != BENCH]:
        if name not in MODELS:
            sys.exit(f"unknown model {name}; known: {', '.join(MODELS)}")
        export(name, a.out)


if __name__ == "__main__":
    main()
