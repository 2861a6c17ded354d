"""The Python package against the zoo models' stored onnxruntime outputs,
its onnxruntime-style API, and bad inputs. Run from a fresh clone with
`pip install "./python[test]"` and `pytest python/tests` (the `onnx`
package reads the stored tensors)."""

import glob
import json
import os
import tempfile
import threading

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import egret

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZOO = os.path.join(ROOT, "tests", "data", "zoo")


def load_pb(path):
    """A stored TensorProto as (name, array)."""
    t = onnx.load_tensor(path)
    return t.name, numpy_helper.to_array(t)


def cases():
    return sorted(glob.glob(os.path.join(ZOO, "*")))


@pytest.mark.parametrize("case", cases(), ids=os.path.basename)
def test_zoo_models_match_onnxruntime(case):
    sess = egret.InferenceSession(os.path.join(case, "model.onnx"), threads=1)
    data = os.path.join(case, "test_data_set_0")
    feeds = dict(load_pb(p) for p in sorted(glob.glob(os.path.join(data, "input_*.pb"))))
    want = [load_pb(p)[1] for p in sorted(glob.glob(os.path.join(data, "output_*.pb")))]
    assert [i.name for i in sess.get_inputs()] == list(feeds)
    got = sess.run(None, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


FORMATS = os.path.join(ROOT, "tests", "data", "formats")


@pytest.mark.parametrize(
    "name, rtol, atol",
    [("vit_fp16", 1e-2, 4e-3), ("bert_dynamic_int8", 1e-4, 1e-5), ("llama_int4_gather", 1e-4, 1e-5)],
)
def test_quantized_and_half_precision_models_take_and_give_their_types(name, rtol, atol):
    """A float16 model takes and returns numpy float16 arrays; int8 and 4-bit
    models run as onnxruntime runs them (tests/data/formats)."""
    case = os.path.join(FORMATS, name)
    sess = egret.InferenceSession(os.path.join(case, "model.onnx"), threads=1)
    for data in sorted(glob.glob(os.path.join(case, "test_data_set_*"))):
        feeds = dict(load_pb(p) for p in sorted(glob.glob(os.path.join(data, "input_*.pb"))))
        want = [load_pb(p)[1] for p in sorted(glob.glob(os.path.join(data, "output_*.pb")))]
        got = sess.run(None, feeds)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=rtol, atol=atol)


def test_inputs_and_outputs_are_described_in_onnxruntime_spelling():
    sess = egret.InferenceSession(os.path.join(ZOO, "bert_tiny"))
    inputs = sess.get_inputs()
    assert [(i.name, i.type) for i in inputs] == [
        ("input_ids", "tensor(int64)"),
        ("attention_mask", "tensor(int64)"),
        ("token_type_ids", "tensor(int64)"),
    ]
    assert inputs[0].shape == [1, 16]
    outputs = sess.get_outputs()
    assert outputs[0].name == "last_hidden_state" and outputs[0].type == "tensor(float)"


def test_named_outputs_come_back_in_the_order_asked():
    case = os.path.join(ZOO, "bert_tiny")
    sess = egret.InferenceSession(case)
    feeds = dict(load_pb(p) for p in sorted(glob.glob(os.path.join(case, "test_data_set_0", "input_*.pb"))))
    both = sess.run(None, feeds)
    pooled = sess.run(["pooler_output"], feeds)
    assert len(pooled) == 1
    np.testing.assert_array_equal(pooled[0], both[1])


def test_inputs_in_any_layout_give_what_contiguous_ones_give():
    """Contiguous aligned arrays are read where they lie; strided, Fortran-
    ordered, unaligned and read-only ones are taken too (the first three
    copied), every one with the contiguous array's result, and the arrays
    are never written."""
    case = os.path.join(ZOO, "vit_tiny")
    sess = egret.InferenceSession(case, threads=1)
    name = sess.get_inputs()[0].name
    shape = sess.get_inputs()[0].shape
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    kept = x.copy()
    want = sess.run(None, {name: x})
    # Every other element of a wider array: a strided view.
    wide = np.zeros(shape[:-1] + [2 * shape[-1]], dtype=np.float32)
    wide[..., ::2] = x
    # The same values at an address one byte past a float's alignment.
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float32).reshape(shape)
    unaligned[...] = x
    assert unaligned.ctypes.data % 4 != 0 or not unaligned.flags.aligned
    readonly = x.copy()
    readonly.setflags(write=False)
    for variant in [wide[..., ::2], np.asfortranarray(x), unaligned, readonly]:
        got = sess.run(None, {name: variant})
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)
    np.testing.assert_array_equal(x, kept)
    with pytest.raises(egret.EgretError, match=name):
        sess.run(None, {name: x.astype(">f4")})


def test_bad_inputs_raise_egret_errors_naming_them():
    case = os.path.join(ZOO, "vit_tiny")
    sess = egret.InferenceSession(case)
    name = sess.get_inputs()[0].name
    shape = sess.get_inputs()[0].shape
    x = np.zeros(shape, dtype=np.float32)
    with pytest.raises(egret.EgretError, match="no input `nope`"):
        sess.run(None, {name: x, "nope": x})
    with pytest.raises(egret.EgretError, match=name):
        sess.run(None, {name: x.astype(np.float64)})
    with pytest.raises(egret.EgretError, match=name):
        sess.run(None, {name: np.zeros([1, 2], dtype=np.float32)})
    with pytest.raises(egret.EgretError, match="missing input"):
        sess.run(None, {})
    with pytest.raises(egret.EgretError, match="numpy array"):
        sess.run(None, {name: [[1.0]]})
    with pytest.raises(egret.EgretError, match="no output `nope`"):
        sess.run(["nope"], {name: x})


def test_bad_models_and_options_raise_egret_errors():
    with tempfile.TemporaryDirectory() as d:
        bad = os.path.join(d, "model.onnx")
        with open(bad, "wb") as f:
            f.write(b"not a model")
        with pytest.raises(egret.EgretError, match="model.onnx"):
            egret.InferenceSession(bad)
    with pytest.raises(egret.EgretError, match="unknown backend"):
        egret.InferenceSession(os.path.join(ZOO, "vit_tiny"), backend="tpu")


def test_runs_from_many_threads_at_once():
    case = os.path.join(ZOO, "gpt2_tiny")
    sess = egret.InferenceSession(case, threads=1)
    feeds = dict(load_pb(p) for p in sorted(glob.glob(os.path.join(case, "test_data_set_0", "input_*.pb"))))
    want = sess.run(None, feeds)
    results = []

    def work():
        for _ in range(5):
            results.append(sess.run(None, feeds))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    for r in results:
        np.testing.assert_array_equal(r[0], want[0])


def test_explain_is_explain_json():
    info = egret.InferenceSession(os.path.join(ZOO, "bert_tiny")).explain()
    assert info["backend"] == "cpu"
    assert info["fusions"]["attention"] == 2
    assert json.dumps(info)


def test_compile_writes_a_library_and_gpu_kernels():
    with tempfile.TemporaryDirectory() as d:
        paths = egret.compile(os.path.join(ZOO, "gpt2_tiny"), d, emit="ptx")
        assert any(p.endswith(".ptx") for p in paths)
        assert any(p.endswith("manifest.json") for p in paths)


def test_a_compiled_library_runs_through_ctypes_as_the_session_does():
    """The path a Ray Serve replica would take: `egret.compile` a shared
    library, load it with ctypes, check its ABI version, run it on a
    context of its own, and get the session's outputs."""
    import ctypes
    import shutil

    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler to link the library")
    model = os.path.join(ZOO, "bert_tiny")
    sets = sorted(glob.glob(os.path.join(model, "test_data_set_0", "input_*.pb")))
    feeds = dict(load_pb(p) for p in sets)
    want = egret.InferenceSession(model, threads=1).run(None, feeds)
    with tempfile.TemporaryDirectory() as d:
        paths = egret.compile(model, d, target_cpu="x86-64-v2")
        header = open(os.path.join(d, "bert_tiny.h")).read()
        assert "#define BERT_TINY_ABI_VERSION 3" in header
        lib = ctypes.CDLL(next(p for p in paths if p.endswith(".so")))
        assert lib.bert_tiny_abi_version() == 3
        lib.bert_tiny_input_name.restype = ctypes.c_char_p
        lib.bert_tiny_output_bytes.restype = ctypes.c_size_t
        model_p, ctx = ctypes.c_void_p(), ctypes.c_void_p()
        assert lib.bert_tiny_create(ctypes.byref(model_p)) == 0
        assert lib.bert_tiny_context_create(model_p, 2, ctypes.byref(ctx)) == 0
        names = [lib.bert_tiny_input_name(i).decode() for i in range(lib.bert_tiny_num_inputs())]
        arrays = [np.ascontiguousarray(feeds[n]) for n in names]
        inputs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        outs = [np.empty_like(w) for w in want]
        assert [lib.bert_tiny_output_bytes(j) for j in range(len(outs))] == [o.nbytes for o in outs]
        outputs = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
        assert lib.bert_tiny_context_run(ctx, inputs, outputs) == 0
        lib.bert_tiny_context_destroy(ctx)
        lib.bert_tiny_destroy(model_p)
        for got, w in zip(outs, want):
            np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


SYNTHETIC = os.path.join(ROOT, "tests", "data", "synthetic")


def stored_sets(model):
    """Each data set's (feeds, outputs), from its .pb files."""
    sets = []
    for d in sorted(glob.glob(os.path.join(model, "test_data_set_*"))):
        feeds = dict(load_pb(p) for p in sorted(glob.glob(os.path.join(d, "input_*.pb"))))
        outs = [load_pb(p)[1] for p in sorted(glob.glob(os.path.join(d, "output_*.pb")))]
        sets.append((feeds, outs))
    return sets


def test_a_session_with_unbound_symbolic_dims_serves_every_shape():
    """As onnxruntime's: made without `dims`, it reports the dims by name
    and runs inputs of any shape. The model is compiled once with its dims
    symbolic; the CPU's one program, compiled when the session is made,
    keeps the batch and sequence symbolic and runs both data sets' shapes."""
    model = os.path.join(SYNTHETIC, "bert_dynamic")
    sess = egret.InferenceSession(model, threads=1)
    assert [i.shape for i in sess.get_inputs()] == [["batch", "sequence"], ["batch", "sequence"]]
    assert sess.get_outputs()[0].shape == ["batch", "sequence", 32]
    assert sess.compiled_shapes() == 1
    sets = stored_sets(model)
    assert len({feeds["input_ids"].shape for feeds, _ in sets}) == 2
    for _ in range(2):
        for feeds, want in sets:
            got = sess.run(None, feeds)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert sess.compiled_shapes() == 1
    # A bound session keeps its one program, and a shape it was not
    # compiled for is still an error naming the input.
    bound = egret.InferenceSession(model, dims={"batch": 1, "sequence": 7})
    assert bound.get_inputs()[0].shape == [1, 7] and bound.compiled_shapes() == 1
    with pytest.raises(egret.EgretError, match="input_ids"):
        bound.run(None, sets[1][0])


def test_a_library_keeps_the_symbolic_dims_and_serves_every_shape_through_ctypes():
    """`egret.compile` without `dims` keeps bert_dynamic's batch and
    sequence symbolic: one library, given each data set's input dims on
    one context, runs both shapes and matches onnxruntime's outputs; dims
    that disagree are refused with a shape error and a message."""
    import ctypes
    import shutil

    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler to link the library")
    model = os.path.join(SYNTHETIC, "bert_dynamic")
    with tempfile.TemporaryDirectory() as d:
        paths = egret.compile(model, d)
        header = open(os.path.join(d, "bert_dynamic.h")).read()
        assert "Symbolic dims: batch (any size), sequence (any size)" in header
        lib = ctypes.CDLL(next(p for p in paths if p.endswith(".so")))
        lib.bert_dynamic_input_name.restype = ctypes.c_char_p
        lib.bert_dynamic_dim_name.restype = ctypes.c_char_p
        lib.bert_dynamic_context_error.restype = ctypes.c_char_p
        lib.bert_dynamic_context_output_bytes.restype = ctypes.c_size_t
        lib.bert_dynamic_context_output_dims.restype = ctypes.POINTER(ctypes.c_int64)
        assert [lib.bert_dynamic_dim_name(i).decode() for i in range(lib.bert_dynamic_num_dims())] == ["batch", "sequence"]
        model_p, ctx = ctypes.c_void_p(), ctypes.c_void_p()
        assert lib.bert_dynamic_create(ctypes.byref(model_p)) == 0
        assert lib.bert_dynamic_context_create(model_p, 1, ctypes.byref(ctx)) == 0
        names = [lib.bert_dynamic_input_name(i).decode() for i in range(lib.bert_dynamic_num_inputs())]
        for feeds, want in stored_sets(model):
            arrays = [np.ascontiguousarray(feeds[n]) for n in names]
            shapes = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
            dims = (ctypes.POINTER(ctypes.c_int64) * len(arrays))(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes])
            assert lib.bert_dynamic_context_set_input_dims(ctx, dims) == 0, lib.bert_dynamic_context_error(ctx)
            outs = []
            for j, w in enumerate(want):
                got_dims = lib.bert_dynamic_context_output_dims(ctx, j)
                assert [got_dims[k] for k in range(w.ndim)] == list(w.shape)
                outs.append(np.empty(w.shape, dtype=np.float32))
                assert lib.bert_dynamic_context_output_bytes(ctx, j) == outs[-1].nbytes
            inputs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
            outputs = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
            assert lib.bert_dynamic_context_run(ctx, inputs, outputs) == 0
            for got, w in zip(outs, want):
                np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)
        # The mask one token longer than the ids: refused, and why.
        bad = [(ctypes.c_int64 * 2)(1, 4), (ctypes.c_int64 * 2)(1, 5)]
        dims = (ctypes.POINTER(ctypes.c_int64) * 2)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in bad])
        assert lib.bert_dynamic_context_set_input_dims(ctx, dims) == 5
        assert b"`sequence` = 5" in lib.bert_dynamic_context_error(ctx)
        lib.bert_dynamic_context_destroy(ctx)
        lib.bert_dynamic_destroy(model_p)


def test_a_key_value_cache_decodes_through_one_session():
    """gpt2_kv: the prompt over an empty past, then a step fed its presents,
    from one program: the sequence and past lengths stay symbolic in it."""
    model = os.path.join(SYNTHETIC, "gpt2_kv")
    sess = egret.InferenceSession(model, threads=1)
    names = [o.name for o in sess.get_outputs()]
    assert names[1:3] == ["present.0.key", "present.0.value"]
    assert sess.get_inputs()[2].shape == ["batch", 2, "past_sequence", 16]
    for feeds, want in stored_sets(model):
        for g, w in zip(sess.run(None, feeds), want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert sess.compiled_shapes() == 1


def test_an_io_binding_feeds_the_presents_back_without_numpy():
    """onnxruntime's IOBinding: the presents stay on Egret's side as
    OrtValues and are bound as the next step's past; the logits match a
    loop that passes numpy arrays."""
    model = os.path.join(SYNTHETIC, "gpt2_kv")
    sess = egret.InferenceSession(model, threads=1)
    feeds, _ = stored_sets(model)[0]
    layers = [n for n in feeds if n.startswith("past_key_values.")]
    presents = [o.name for o in sess.get_outputs()][1:]

    def plain(steps):
        f, out = dict(feeds), []
        for _ in range(steps):
            got = sess.run(None, f)
            out.append(got[0])
            nxt = np.array([[int(got[0][0, -1].argmax())]], dtype=np.int64)
            f = {"input_ids": nxt, "attention_mask": np.ones((1, f["attention_mask"].shape[1] + 1), dtype=np.int64)}
            f.update(zip(layers, got[1:]))
        return out

    io = sess.io_binding()
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    for name in ["logits"] + presents:
        io.bind_output(name)
    bound, mask = [], feeds["attention_mask"].shape[1]
    for _ in range(4):
        sess.run_with_iobinding(io)
        outs = io.get_outputs()
        assert isinstance(outs[1], egret.OrtValue) and outs[1].data_type() == "tensor(float)"
        logits = outs[0].numpy()
        bound.append(logits)
        mask += 1
        io.bind_cpu_input("input_ids", np.array([[int(logits[0, -1].argmax())]], dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, mask), dtype=np.int64))
        for past, present in zip(layers, outs[1:]):
            io.bind_ortvalue_input(past, present)
    for g, w in zip(bound, plain(4)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # The last run's presents cover the mask it was given.
    assert outs[1].shape()[2] == mask - 1
    np.testing.assert_array_equal(io.copy_outputs_to_cpu()[0], bound[-1])

    v = egret.OrtValue.ortvalue_from_numpy(np.zeros((2, 3), dtype=np.float32))
    assert v.shape() == [2, 3] and v.numpy().dtype == np.float32
    with pytest.raises(egret.EgretError, match="host memory"):
        egret.OrtValue.ortvalue_from_numpy(np.zeros(2, dtype=np.float32), "cuda", 0)
    bad = sess.io_binding()
    bad.bind_output("no_such_output")
    with pytest.raises(egret.EgretError, match="no output `no_such_output`"):
        sess.run_with_iobinding(bad)


def test_eight_threads_with_their_own_shapes_get_what_one_thread_gets():
    # One session with symbolic dims shared by eight threads, each running
    # its own inputs (batch and sequence lengths of its own) many times:
    # every result bit for bit the single-threaded one. EGRET_CONCURRENCY_RUNS
    # sets the runs per thread (20 here; the recorded run used 200).
    runs = int(os.environ.get("EGRET_CONCURRENCY_RUNS", "20"))
    sess = egret.InferenceSession(os.path.join(SYNTHETIC, "bert_dynamic"), threads=1)
    rng = np.random.default_rng(7)
    feeds = []
    for t in range(8):
        batch, sequence = 1 + t % 3, 2 + 3 * t
        feeds.append({
            "input_ids": rng.integers(0, 64, size=(batch, sequence), dtype=np.int64),
            "attention_mask": np.ones((batch, sequence), dtype=np.int64),
        })
    want = [sess.run(None, f) for f in feeds]
    failures = []

    def work(t):
        for run in range(runs):
            got = sess.run(None, feeds[t])
            if not all(np.array_equal(g, w) for g, w in zip(got, want[t])):
                failures.append((t, run))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures[:5]
