"""Egret behind Ray Serve: examples/ray_serve/serve_egret.py's deployment,
two replicas of one session each on a local two-CPU Ray instance, 200
requests at once through a handle, every answer checked against the stored
onnxruntime outputs. Skipped where Ray Serve is not installed
(`pip install "ray[serve]"`)."""

import importlib.util
import os
import sys

import pytest

pytest.importorskip("ray", reason='Ray is not installed: pip install "ray[serve]" runs this test')
pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "ray[serve]" runs this test')

import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402
from ray import serve  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# bert_tiny, a small BERT encoder from the zoo: a run takes well under a
# millisecond, so the test's time goes to starting Ray and Serve.
MODEL = os.path.join(ROOT, "tests", "data", "zoo", "bert_tiny", "model.onnx")
EXAMPLE = os.path.join(ROOT, "examples", "ray_serve", "serve_egret.py")


def load_example():
    spec = importlib.util.spec_from_file_location("serve_egret", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    # The replicas' processes cannot import the example by name (it is no
    # package on their path): send its classes and functions by value.
    ray.cloudpickle.register_pickle_by_value(module)
    return module


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_200_requests_matching_stored_outputs(local_ray):
    example = load_example()
    feeds, want = example.load_test_data(MODEL)
    handle = example.deploy(MODEL, replicas=2, threads=1, name="egret_test")
    states = serve.status().applications["egret_test"].deployments["EgretDeployment"].replica_states
    assert states == {"RUNNING": 2}, states
    described = handle.describe.remote().result()
    assert [name for name, _, _ in described["inputs"]] == list(feeds)

    answers = example.send(handle, feeds, 200)
    assert len(answers) == 200
    for got in answers:
        example.check(got, want, rtol=1e-4, atol=1e-4)

    # A named output, as InferenceSession.run takes it.
    pooled = handle.remote(feeds, ["pooler_output"]).result()
    assert len(pooled) == 1 and pooled[0].shape == want[1].shape
