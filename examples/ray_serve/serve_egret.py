"""Serve an Egret model with Ray Serve: several replicas, one session each.

Each replica is a Ray actor that owns ONE `egret.InferenceSession`, made in
the replica's `__init__` (so the model compiles once per replica, before the
replica takes traffic) with `threads=1`: on a machine of N cores, N replicas
of one thread each keep every core busy without the replicas' thread pools
fighting over them. Requests are dicts of numpy arrays, the `feeds` of
`InferenceSession.run`, sent through a Serve `DeploymentHandle`; the answer
is `run`'s list of output arrays. There is no HTTP here (the proxy is turned
off): a handle call is the simplest client and the one with the least
overhead of its own.

As a script it deploys the model, checks a few warm-up answers and then
every answer of each timed burst against the outputs stored beside the model
(its folder's `test_data_set_0`), and prints the throughput:

    python examples/ray_serve/serve_egret.py \\
        --model tests/data/zoo/bert_tiny/model.onnx --replicas 2 --requests 200

As a module it gives the pieces (`EgretDeployment`, `deploy`,
`load_test_data`, `send`, `check`) that python/tests/test_ray_serve.py uses.
Needs `pip install "ray[serve]" onnx` besides the egret package (onnx only
reads the stored test tensors).
"""

import argparse
import glob
import os
import sys
import time

import numpy as np
import ray
from ray import serve

import egret


# num_cpus=1: Ray places one replica per CPU it was told about, so more
# replicas than CPUs would wait for CPUs that never come (`main` refuses
# that up front); `deploy` sets the count and CPUs per replica.
@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
class EgretDeployment:
    """One replica: one compiled Egret session, run on each request."""

    def __init__(self, model_path, threads=1, dims=None):
        # Runs inside the replica's own process. The session is built (the
        # model parsed, optimised and compiled) here, once, and lives as long
        # as the replica does.
        self.session = egret.InferenceSession(model_path, backend="cpu", threads=threads, dims=dims)
        self.pid = os.getpid()

    def __call__(self, feeds, output_names=None):
        # `feeds` arrives as a dict of numpy arrays, unpickled by Ray. Serve
        # runs a plain (non-async) method like this one on a thread pool, so
        # a replica may run a few requests at once; an Egret session allows
        # that (it releases the GIL and is safe to share between threads).
        return self.session.run(output_names, feeds)

    def describe(self):
        """The replica's process id and its session's inputs and outputs,
        as (name, shape, type): handy to see that requests spread out."""
        return {
            "pid": self.pid,
            "inputs": [(i.name, i.shape, i.type) for i in self.session.get_inputs()],
            "outputs": [(o.name, o.shape, o.type) for o in self.session.get_outputs()],
        }


def deploy(model_path, replicas=2, threads=1, max_ongoing_requests=32, name="egret"):
    """Deploy `replicas` replicas of the model on the running Ray instance
    and return a DeploymentHandle to them.

    `serve.run` returns once every replica has finished `__init__`, i.e.
    once each has compiled its session, so the first request does not wait
    for a compile. Each replica asks Ray for `threads` CPUs.

    `max_ongoing_requests` is how many requests Serve hands one replica
    before holding the rest back in the caller's router. Serve's default, 5,
    suits slow models; for one that runs in a millisecond or less, a burst
    then spends most of its time in the router's back-off between retries
    (bursts of 200 bert_tiny requests on two cores, one measurement:
    28-74 requests/s at 5, 250-300 at 64), so let them queue in the
    replica instead.
    """
    # Handles only: no HTTP proxy (no port to bind, one actor fewer).
    serve.start(proxy_location="Disabled")
    app = EgretDeployment.options(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": threads},
    ).bind(os.path.abspath(model_path), threads=threads)
    return serve.run(app, name=name, route_prefix=None)


def load_test_data(model_path, data_set=0):
    """(feeds, outputs) stored beside the model: `test_data_set_N/input_*.pb`
    as a dict of name to array, `output_*.pb` as a list of arrays."""
    import onnx
    from onnx import numpy_helper

    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    data = os.path.join(folder, f"test_data_set_{data_set}")

    def load(path):
        t = onnx.load_tensor(path)
        return t.name, numpy_helper.to_array(t)

    feeds = dict(load(p) for p in sorted(glob.glob(os.path.join(data, "input_*.pb"))))
    outputs = [load(p)[1] for p in sorted(glob.glob(os.path.join(data, "output_*.pb")))]
    if not feeds or not outputs:
        raise FileNotFoundError(f"no stored inputs and outputs in {data}")
    return feeds, outputs


def send(handle, feeds, count):
    """Send `count` requests at once and wait for them all; return their
    answers in order. The calls do not block: each `handle.remote` returns a
    DeploymentResponse at once, and Serve's router spreads them over the
    replicas (holding back those beyond each replica's `max_ongoing_requests`
    until a replica frees up); `.result()` waits for one."""
    responses = [handle.remote(feeds) for _ in range(count)]
    return [r.result() for r in responses]


def check(got, want, rtol=1e-4, atol=1e-4):
    """Raise AssertionError unless one answer matches the stored outputs:
    same count, dtypes and shapes, values within atol + rtol * |want|."""
    assert len(got) == len(want), f"{len(got)} outputs, {len(want)} stored"
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (
            f"output {k}: {g.dtype}{list(g.shape)}, stored {w.dtype}{list(w.shape)}"
        )
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"output {k}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model.onnx (or its folder); its test_data_set_0 is the check")
    p.add_argument("--replicas", type=int, default=2, help="replicas, one session each (default 2)")
    p.add_argument("--requests", type=int, default=200, help="requests in the timed burst (default 200)")
    p.add_argument("--threads", type=int, default=1, help="threads per session, and CPUs per replica (default 1)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs Ray may use (default: all the machine's; must be at least replicas * threads)")
    p.add_argument("--max-ongoing-requests", type=int, default=32,
                   help="requests Serve hands one replica at a time (default 32; Serve's own is 5)")
    p.add_argument("--rounds", type=int, default=1, help="timed bursts; the best is reported (default 1)")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args(argv)

    feeds, want = load_test_data(args.model)
    cpus = args.num_cpus or os.cpu_count()
    if args.replicas * args.threads > cpus:
        sys.exit(f"{args.replicas} replicas of {args.threads} thread(s) need {args.replicas * args.threads} CPUs; "
                 f"Ray has {cpus} (--num-cpus)")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        handle = deploy(args.model, replicas=args.replicas, threads=args.threads,
                        max_ongoing_requests=args.max_ongoing_requests)
        ready = time.perf_counter() - t0
        # Warm-up, and a first check: a few requests per replica, so each
        # replica has run the model once before the clock starts.
        for got in send(handle, feeds, 4 * args.replicas):
            check(got, want, args.rtol, args.atol)
        pids = {handle.describe.remote().result()["pid"] for _ in range(8 * args.replicas)}
        best = None
        for _ in range(args.rounds):
            t = time.perf_counter()
            answers = send(handle, feeds, args.requests)
            elapsed = time.perf_counter() - t
            for got in answers:
                check(got, want, args.rtol, args.atol)
            best = elapsed if best is None else min(best, elapsed)
        folder = args.model if os.path.isdir(args.model) else os.path.dirname(args.model)
        model = os.path.basename(os.path.abspath(folder))
        print(f"model {model}: {args.replicas} replica(s) x {args.threads} thread(s) on {cpus} CPU(s), "
              f"ready in {ready:.1f} s ({len(pids)} replica process(es) answered)")
        print(f"{args.requests} requests in {best:.3f} s: {args.requests / best:.1f} requests/s, "
              f"{1e3 * best / args.requests:.2f} ms each; all {args.requests * args.rounds} answers within "
              f"rtol={args.rtol:g} atol={args.atol:g} of test_data_set_0")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
