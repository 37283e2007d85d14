"""Speed and memory of jmtl's jitted training steps, solvers and Jacobians.

One command measures, everything under ``jax.jit`` with warm-up calls and the median of
repeated timings (``block_until_ready``):

a. ``step``: every registered method's full training step (``jmtl.value_and_mtl_grad``
   plus an ``optax.sgd`` update) on a shared MLP trunk 64→256→256 (ReLU) with K linear
   regression heads, batch 256, for K = 2, 8, 32 (and K = 128 on a 64→128→128 trunk), in
   params mode (Jacobian w.r.t. the shared parameters) and features mode (Jacobian
   w.r.t. the trunk's output); the ratio is to the ``ew`` step of the same K and mode.
   A plain ``jax.value_and_grad`` of the summed losses is recorded as ``jax_grad_sum``.
   The first call (tracing, compiling and one step) is recorded as ``first_call_s``.
b. ``solver``: each Gramian/Jacobian method's ``update`` alone on a random K×10,000
   Jacobian (K = 8, 32, 128), against the cost of the Gramian itself
   (``jmtl.jacobian.gramian``); the ratio is solver / Gramian.
c. ``memory``: the compiled params-mode step's temporary memory
   (``jit(f).lower(...).compile().memory_analysis()``) with and without the task-chunk
   bound ``chunk_size``; the ratio is chunked / unchunked.
d. ``torchjd``: when ``torch`` and ``torchjd`` import (``pip install jmtl[compare]``),
   the same model and batch with torchjd's ``mtl_backward`` + ``jac_to_grad`` and the
   matching aggregator, in the same process; the ratio is jmtl / torchjd (below 1 means
   jmtl is faster). Skipped with a message when they are absent.
e. ``--jmtl-ref REV``: parts (a, params mode) and (d) again for jmtl at git revision
   ``REV`` (exported with ``git archive``, measured by this script in a child process),
   and a side-by-side table: torchjd, jmtl at ``REV``, jmtl now.

Run::

    python benchmarks/speed.py [--quick] [--out DIR] [--methods ew upgrad ...] [--ks 8 128]

``--quick`` (about a minute on CPU) measures a few methods at small K with few repeats.
Writes ``speed.json`` (one record per measurement: part, method, K, mode, device
kind, median ms, ratio to its baseline), ``speed.md`` and ``speed.png`` (time per step
against K per method, log scale) into ``--out`` (default ``benchmarks/results``). The
backend and device kind are detected and recorded; the script runs unchanged on a GPU.

Targets (issue 15 and the design notes): loss-level methods ≤ 1.05× ``ew``; Gramian
methods in features mode ≤ 1.3× ``ew`` at K = 8; every solver at K = 128 ≤ 1.5× the
Gramian's cost; params-mode ``upgrad`` and ``mgda`` ≥ 2× faster than torchjd at K = 8
and ≥ 1.5× at K = 32, on one core::

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 1 python benchmarks/speed.py --parts step torchjd --ks 8 32 \\
        --methods ew upgrad mgda --modes params --jmtl-ref cea9894 [--malloc keep]

``--malloc keep`` re-runs the script with ``GLIBC_TUNABLES`` set so that glibc keeps
freed memory instead of returning it (XLA:CPU allocates a step's temporaries on every
call; above glibc's 32 MiB mmap ceiling each call would page-fault them in afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
# The jmtl to measure: this checkout, or another tree for --jmtl-ref (see below).
_REPO = os.environ.get("JMTL_BENCH_REPO") or os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
sys.path.insert(1, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from _common import agg_lib, value_and_mtl_grad  # noqa: E402

import jmtl  # noqa: E402
from jmtl.methods import base  # noqa: E402

BATCH = 256
IN_DIM = 64
# glibc: never serve a block from mmap, never trim the heap; freed blocks are reused.
KEEP_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
QUICK_METHODS = ("ew", "uw", "mgda", "upgrad", "cagrad")
SOLVER_DIM = 10_000
LR = 1e-3


def trunk_width(k: int) -> int:
    """Hidden width: 256, or 128 for the K = 128 configuration."""
    return 128 if k >= 128 else 256


def task_names(k: int) -> list[str]:
    return [f"t{i:03d}" for i in range(k)]


def init_params(key: jax.Array, k: int) -> dict:
    """Shared MLP trunk 64→H→H and K linear heads (one ``(H, K)`` matrix)."""
    h = trunk_width(k)
    k1, k2, k3 = jax.random.split(key, 3)
    dense = lambda key, n, m: jax.random.normal(key, (n, m), jnp.float32) * (2.0 / n) ** 0.5
    return {
        "trunk": {"w1": dense(k1, IN_DIM, h), "b1": jnp.zeros((h,)),
                  "w2": dense(k2, h, h), "b2": jnp.zeros((h,))},
        "heads": {"w": dense(k3, h, k) * 0.5, "b": jnp.zeros((k,))},
    }


def encode(params: dict, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """The shared trunk: the representation fed to every head."""
    del y
    t = params["trunk"]
    z = jax.nn.relu(x @ t["w1"] + t["b1"])
    return jax.nn.relu(z @ t["w2"] + t["b2"])


def heads_loss(params: dict, z: jax.Array, x: jax.Array, y: jax.Array) -> dict:
    """Per-task mean squared error of the K linear heads, ``{task: loss}``."""
    del x
    pred = z @ params["heads"]["w"] + params["heads"]["b"]
    per_task = jnp.mean((pred - y) ** 2, axis=0)
    return {n: per_task[i] for i, n in enumerate(task_names(y.shape[1]))}


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> dict:
    return heads_loss(params, encode(params, x), x, y)


SHARED = {"trunk": True, "heads": False}


def data(key: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (BATCH, IN_DIM)), jax.random.normal(ky, (BATCH, k)))


# Extra keyword arguments of every value_and_mtl_grad call (--task-batching).
ENGINE_KWARGS: dict = {}
# --donate: the step donates (params, state) and each call continues from the last.
DONATE: tuple = ()


def make_grad_fn(method: base.Method, mode: str, chunk_size: int | None = None):
    """``jmtl.value_and_mtl_grad`` for this model in ``mode`` ("params" or "features")."""
    if mode == "params":
        return value_and_mtl_grad(loss_fn, method, shared=SHARED, chunk_size=chunk_size,
                                  **ENGINE_KWARGS)
    if mode == "features":
        return value_and_mtl_grad(heads_loss, method, encoder=encode, **ENGINE_KWARGS)
    raise ValueError(mode)


def make_step(method: base.Method, mode: str, chunk_size: int | None = None):
    """A jitted training step (MTL gradients, then an SGD update) and its state's init.

    Returns:
      ``(step, init)``: ``step(params, state, x, y, key) -> (params, state)`` jitted;
      ``init(params, x, y)`` the method's initial state (sized by the engine).
    """
    opt = optax.sgd(LR)
    if method is None:  # plain JAX: gradient of the summed losses
        def step(params, state, x, y, key):
            total = lambda p: sum(jax.tree_util.tree_leaves(loss_fn(p, x, y)))
            _, grads = jax.value_and_grad(total)(params)
            updates, _ = opt.update(grads, opt.init(params), params)
            return optax.apply_updates(params, updates), state
        return jax.jit(step, donate_argnums=DONATE), lambda params, x, y: ()
    grad_fn = make_grad_fn(method, mode, chunk_size)

    def step(params, state, x, y, key):
        _, grads, state = grad_fn(params, state, x, y, key=key)
        updates, _ = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=DONATE), grad_fn.init


def _runner(step, params, state, x, y, key):
    """``run()`` for the timers: one step; with --donate the step's outputs feed the next
    call (a training loop's steady state), else every call sees the same inputs."""
    if not DONATE:
        return lambda: step(params, state, x, y, key)
    carry = [jax.tree_util.tree_map(jnp.copy, params), jax.tree_util.tree_map(jnp.copy, state)]

    def run():
        carry[0], carry[1] = step(carry[0], carry[1], x, y, key)
        return carry[0]

    return run


def shared_dim(params: dict) -> int:
    return _common.tree_size(params["trunk"])


def bench_steps(names, ks, modes, repeats, records, log):
    """Part (a): full training steps against the ``ew`` step."""
    key = jax.random.key(0)
    for k in ks:
        params = init_params(key, k)
        x, y = data(jax.random.key(1), k)
        for mode in modes:
            baseline = None
            for name in ["ew"] + [n for n in names if n != "ew"] + ["jax_grad_sum"]:
                if name == "jax_grad_sum" and mode != "params":
                    continue
                try:
                    method = None if name == "jax_grad_sum" else \
                        jmtl.methods.get(name, **_common.method_kwargs(name, k))
                    step, init = make_step(method, mode)
                    state = init(params, x, y)
                    # The first call: tracing and compiling (plus one step).
                    run = _runner(step, params, state, x, y, key)
                    t0 = time.perf_counter()
                    jax.block_until_ready(run())
                    first_s = time.perf_counter() - t0
                    if name == "ew":
                        baseline = run
                        ms = _common.median_ms(run, repeats=repeats, min_time_s=0.2)
                        ratio = 1.0
                    else:
                        # Interleaved with the ew step: the ratio survives load drift.
                        ms, _, ratio = _common.paired_median_ms(
                            run, baseline, repeats=repeats, min_time_s=0.2)
                except Exception as e:  # noqa: BLE001 - report and go on
                    log(f"[step] {name} K={k} {mode}: FAILED {type(e).__name__}: {e}"[:300])
                    continue
                kind = _kind(method)
                records.append({"part": "step", "method": name, "K": k, "mode": mode,
                                "kind": kind, "median_ms": ms, "baseline": "ew",
                                "ratio": ratio, "first_call_s": first_s,
                                "gflop": step_gflop(step, params, state, x, y, key)
                                if mode == "params" and k in TORCHJD_TARGETS else None})
                log(f"[step] {mode:8s} K={k:3d} {name:14s} {ms:9.3f} ms  {ratio:5.2f}x ew"
                    f"  (first call {first_s:5.2f} s)")


def step_gflop(step, *args) -> float | None:
    """The compiled step's floating-point work (XLA's cost analysis), in GFLOP."""
    try:
        cost = step.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) / 1e9
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None


def gemm_rate_gflops(repeats: int) -> dict:
    """GFLOP/s of one large float32 GEMM, ``(256, 256) x (256, 8192)`` (the size of the
    params-mode Jacobian's GEMMs at K = 32), in jax and, when importable, in torch."""
    flop = 2 * 256 * 256 * 8192
    a = jax.random.normal(jax.random.key(0), (256, 256))
    b = jax.random.normal(jax.random.key(1), (256, 8192))
    gemm = jax.jit(lambda a, b: a @ b)
    rates = {"jax": flop / _common.median_ms(lambda: gemm(a, b), repeats=repeats,
                                              min_time_s=0.2) / 1e6}
    try:
        import torch
    except ImportError:
        return rates
    ta, tb = torch.randn(256, 256), torch.randn(256, 8192)
    rates["torch"] = flop / _torch_median_ms(lambda: ta @ tb, repeats) / 1e6
    return rates


def _kind(method) -> str:
    """``loss`` (loss-level), ``gramian`` (Gramian/Jacobian/grad-norm methods) or ``-``."""
    if method is None:
        return "-"
    if method.needs & {base.GRAMIAN, base.JACOBIAN, base.GRAD_NORMS} or \
            method.output == "direction":
        return "gramian"
    return "loss"


def bench_solvers(names, ks, repeats, records, log):
    """Part (b): each solver alone on a random K×d Jacobian, against the Gramian."""
    for k in ks:
        jac = jax.random.normal(jax.random.key(k), (k, SOLVER_DIM), jnp.float32)
        jac = jac + 0.5 * jax.random.normal(jax.random.key(k + 1), (1, SOLVER_DIM))
        gram_fn = jax.jit(jmtl.jacobian.gramian)
        gram_ms = _common.median_ms(lambda: gram_fn(jac), repeats=repeats, min_time_s=0.2)
        gram = gram_fn(jac)
        losses = jnp.linspace(0.5, 2.0, k)
        norms = jnp.sqrt(jnp.diag(gram))
        records.append({"part": "solver", "method": "gramian", "K": k, "mode": "-",
                        "kind": "gramian", "median_ms": gram_ms, "baseline": "gramian",
                        "ratio": 1.0})
        log(f"[solver] K={k:3d} gramian        {gram_ms:9.3f} ms")
        for name in names:
            try:
                method, state = _common.build_method(name, k, dim=SOLVER_DIM)
                if _kind(method) != "gramian":
                    continue
                inputs = agg_lib.method_inputs(method, k=k, losses=losses,
                                               key=jax.random.key(0), gramian=gram,
                                               jacobian=jac, grad_norms=norms)
                solve = jax.jit(method.update)
                # Interleaved with the Gramian: the ratio survives load drift.
                ms, _, ratio = _common.paired_median_ms(
                    lambda: solve(inputs, state), lambda: gram_fn(jac), repeats=repeats,
                    min_time_s=0.2)
            except Exception as e:  # noqa: BLE001
                log(f"[solver] {name} K={k}: FAILED {type(e).__name__}: {e}"[:300])
                continue
            records.append({"part": "solver", "method": name, "K": k, "mode": "-",
                            "kind": "gramian", "median_ms": ms, "baseline": "gramian",
                            "ratio": ratio})
            log(f"[solver] K={k:3d} {name:14s} {ms:9.3f} ms  {ratio:6.2f}x gramian")


def bench_memory(names, ks, chunk, records, log):
    """Part (c): compiled temporary memory of the params-mode step, with/without chunks."""
    candidates = [n for n in ("upgrad", "mgda", "imtl_g", "dualproj", "cagrad") if n in names]
    if not candidates:
        candidates = [n for n in jmtl.methods.names() if n in ("upgrad", "mgda")]
    if not candidates:
        log("[memory] skipped: no Gramian method registered")
        return
    name = candidates[0]
    for k in ks:
        params = init_params(jax.random.key(0), k)
        x, y = data(jax.random.key(1), k)
        method = jmtl.methods.get(name)
        jac_mb = k * shared_dim(params) * 4 / 2**20
        base_bytes = None
        for cs in (None, chunk):
            try:
                step, init = make_step(method, "params", chunk_size=cs)
                state = init(params, x, y)
                mem = step.lower(params, state, x, y, jax.random.key(0)).compile() \
                    .memory_analysis()
                temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
            except Exception as e:  # noqa: BLE001
                log(f"[memory] {name} K={k} chunk={cs}: FAILED {type(e).__name__}: {e}"[:300])
                continue
            if temp is None:
                log("[memory] memory_analysis() unavailable on this backend")
                return
            base_bytes = base_bytes or temp
            records.append({"part": "memory", "method": name, "K": k, "mode": "params",
                            "chunk_size": cs, "temp_mb": temp / 2**20,
                            "jacobian_mb": jac_mb, "median_ms": None,
                            "baseline": "chunk_size=None", "ratio": temp / base_bytes})
            log(f"[memory] {name} K={k:3d} chunk_size={cs!s:5s} temp {temp / 2**20:8.2f} MiB "
                f"(full Jacobian {jac_mb:.2f} MiB)")


# Issue 15's targets: params-mode upgrad and mgda speed-up over torchjd's step, by K.
TORCHJD_TARGETS = {8: 2.0, 32: 1.5}


# jmtl name -> torchjd aggregator factory (K -> aggregator); None: plain backward of sum.
def _torchjd_aggregators():
    from torchjd import aggregation as A

    return {
        "ew": None, "sum": lambda k: A.Sum(), "mean": lambda k: A.Mean(),
        "upgrad": lambda k: A.UPGrad(), "mgda": lambda k: A.MGDA(),
        "dualproj": lambda k: A.DualProj(), "cagrad": lambda k: A.CAGrad(c=0.4),
        "nash_mtl": lambda k: A.NashMTL(n_tasks=k), "pcgrad": lambda k: A.PCGrad(),
        "imtl_g": lambda k: A.IMTLG(), "aligned_mtl": lambda k: A.AlignedMTL(),
        "config": lambda k: A.ConFIG(), "graddrop": lambda k: A.GradDrop(),
        "gradvac": lambda k: A.GradVac(),
    }


def bench_torchjd(names, ks, repeats, records, log, threads=None):
    """Part (d): the same step in torchjd; jmtl's time over torchjd's.

    On CPU torch gets ``threads`` intra-op threads (default 1): on a small shared
    machine oversubscribed OpenMP threads make torch many times slower, and the
    project's reference figures for torchjd were taken on one core.
    """
    try:
        from importlib.metadata import version

        import torch
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError as e:
        log(f"[torchjd] skipped: torch/torchjd not importable ({e}); "
            "install the `compare` extra to run this part")
        return
    if jax.default_backend() != "cpu":
        log("[torchjd] note: torch runs on CPU here while jmtl runs on "
            f"{jax.default_backend()}; compare on the same device only")
    torch.set_num_threads(threads or 1)
    log(f"[torchjd] torch {torch.__version__}, torchjd {version('torchjd')}, "
        f"{torch.get_num_threads()} intra-op thread(s)")
    rates = gemm_rate_gflops(repeats)
    records.append({"part": "gemm", "jax_gflops": rates["jax"],
                    "torch_gflops": rates["torch"]})
    log(f"[torchjd] one (256, 256) x (256, 8192) GEMM: jax {rates['jax']:.1f} GFLOP/s, "
        f"torch {rates['torch']:.1f} GFLOP/s")
    aggs = _torchjd_aggregators()
    for k in ks:
        h = trunk_width(k)
        torch.manual_seed(0)
        trunk = torch.nn.Sequential(torch.nn.Linear(IN_DIM, h), torch.nn.ReLU(),
                                    torch.nn.Linear(h, h), torch.nn.ReLU())
        head = torch.nn.Linear(h, k)
        shared = list(trunk.parameters())
        opt = torch.optim.SGD(list(trunk.parameters()) + list(head.parameters()), lr=LR)
        x = torch.randn(BATCH, IN_DIM)
        y = torch.randn(BATCH, k)
        for name in names:
            if name not in aggs:
                continue
            try:
                aggregator = aggs[name](k) if aggs[name] is not None else None

                def step():
                    opt.zero_grad()
                    z = trunk(x)
                    losses = ((head(z) - y) ** 2).mean(dim=0)
                    if aggregator is None:
                        losses.sum().backward()
                    else:
                        mtl_backward(list(losses), features=z, retain_graph=True)
                        jac_to_grad(shared, aggregator)
                    opt.step()

                ms = _torch_median_ms(step, repeats)
            except Exception as e:  # noqa: BLE001
                log(f"[torchjd] {name} K={k}: FAILED {type(e).__name__}: {e}"[:300])
                continue
            for mode in ("params", "features"):
                mine = [r for r in records if r["part"] == "step" and r["method"] == name
                        and r["K"] == k and r["mode"] == mode]
                if mine:
                    ratio = mine[0]["median_ms"] / ms
                    records.append({"part": "torchjd", "method": name, "K": k, "mode": mode,
                                    "kind": mine[0]["kind"], "median_ms": mine[0]["median_ms"],
                                    "torchjd_ms": ms, "baseline": "torchjd",
                                    "ratio": ratio})
                    log(f"[torchjd] {mode:8s} K={k:3d} {name:12s} jmtl {mine[0]['median_ms']:8.3f}"
                        f" ms, torchjd {ms:8.3f} ms: {1 / ratio:5.2f}x faster")


def bench_reference(rev: str, names, ks, repeats, records, log, argv_extra=()) -> None:
    """Part (e): the same step and torchjd parts with jmtl at git revision ``rev``.

    The revision is exported with ``git archive`` and measured by this script in a child
    process (``JMTL_BENCH_REPO``), so the harness, model and torchjd step are the same;
    each jmtl is compared with the torchjd step timed in its own process.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        os.makedirs(tree)
        subprocess.run(f"git -C '{os.path.dirname(_HERE)}' archive {rev} | tar -x -C '{tree}'",
                       shell=True, check=True)
        out = os.path.join(tmp, "out")
        cmd = [sys.executable, os.path.abspath(__file__), "--parts", "step", "torchjd",
               "--methods", *names, "--ks", *map(str, ks), "--repeats", str(repeats),
               "--out", out, "--modes", "params", *argv_extra]
        log(f"[reference] jmtl at {rev}: {' '.join(cmd[1:])}")
        subprocess.run(cmd, env=dict(os.environ, JMTL_BENCH_REPO=tree), check=True)
        with open(os.path.join(out, "speed.json")) as f:
            theirs = json.load(f)["records"]
    for r in theirs:
        if r["part"] == "torchjd" and r["mode"] == "params":
            records.append(dict(r, part="reference", ref=rev))


def side_by_side(records) -> list[list]:
    """Rows ``method, K, torchjd ms, jmtl <ref> ms (speed-up), jmtl ms (speed-up)``."""
    rows = []
    for ref in [r for r in records if r["part"] == "reference"]:
        now = [r for r in records if r["part"] == "torchjd" and r["mode"] == "params"
               and r["method"] == ref["method"] and r["K"] == ref["K"]]
        if now:
            n = now[0]
            rows.append([ref["method"], ref["K"], f"{n['torchjd_ms']:.1f}",
                         f"{ref['median_ms']:.1f} ({1 / ref['ratio']:.2f}×)",
                         f"{n['median_ms']:.1f} ({1 / n['ratio']:.2f}×)"])
    return rows


def _torch_median_ms(fn, repeats: int) -> float:
    import statistics

    for _ in range(2):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < 0.2:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 20 * repeats:
            break
    return 1e3 * statistics.median(times)


def plot(records, path: str, info: dict) -> None:
    """Time per step against K, one line per method, one panel per mode (log scales)."""
    steps = [r for r in records if r["part"] == "step"]
    modes = sorted({r["mode"] for r in steps})
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5), squeeze=False)
    names = sorted({r["method"] for r in steps})
    cmap = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))
    for ax, mode in zip(axes[0], modes):
        for c, name in enumerate(names):
            pts = sorted((r["K"], r["median_ms"]) for r in steps
                         if r["method"] == name and r["mode"] == mode)
            if not pts:
                continue
            style = dict(lw=3, color="k") if name == "ew" else dict(lw=1, color=cmap[c])
            ax.plot(*zip(*pts), marker="o", ms=3, label=name, **style)
        tj = sorted({(r["K"], r["torchjd_ms"]) for r in records
                     if r["part"] == "torchjd" and r["method"] == "upgrad"})
        if tj:
            ax.plot(*zip(*tj), "k--", marker="s", label="torchjd UPGrad")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tasks K (K=128: 128-wide trunk)")
        ax.set_ylabel("ms per training step")
        ax.set_title(f"{mode} mode")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, -1].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"jmtl step time, batch {BATCH}, {info['backend']} ({info['device_kind']})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(records, info, args) -> str:
    out = [f"# jmtl speed benchmark\n\nDevice: {info['backend']} ({info['device_kind']}), "
           f"jax {info['jax']}, {info['cpu_count']} CPUs. Median of repeated jitted calls "
           f"(ms). Command: `python benchmarks/speed.py{' --quick' if args.quick else ''}`.\n"]
    steps = [r for r in records if r["part"] == "step"]
    if steps:
        ks = sorted({r["K"] for r in steps})
        for mode in sorted({r["mode"] for r in steps}):
            out.append(f"\n## Training step, {mode} mode (ms, and ratio to `ew`)\n")
            names = sorted({r["method"] for r in steps if r["mode"] == mode},
                           key=lambda n: (n != "ew", n))
            rows = []
            for n in names:
                row = [n, next((r["kind"] for r in steps if r["method"] == n), "")]
                for k in ks:
                    r = [r for r in steps if r["method"] == n and r["mode"] == mode
                         and r["K"] == k]
                    row.append(f"{r[0]['median_ms']:.2f} ({r[0]['ratio']:.2f}×)" if r else "-")
                rows.append(row)
            out.append(_common.markdown_table(["method", "kind"] + [f"K={k}" for k in ks],
                                              rows))
    solv = [r for r in records if r["part"] == "solver"]
    if solv:
        ks = sorted({r["K"] for r in solv})
        out.append(f"\n## Solver alone on a random K×{SOLVER_DIM} Jacobian (ms, and ratio "
                   "to the Gramian)\n")
        names = sorted({r["method"] for r in solv}, key=lambda n: (n != "gramian", n))
        rows = []
        for n in names:
            row = [n]
            for k in ks:
                r = [r for r in solv if r["method"] == n and r["K"] == k]
                row.append(f"{r[0]['median_ms']:.3f} ({r[0]['ratio']:.2f}×)" if r else "-")
            rows.append(row)
        out.append(_common.markdown_table(["method"] + [f"K={k}" for k in ks], rows))
    mem = [r for r in records if r["part"] == "memory"]
    if mem:
        out.append("\n## Params-mode step: compiled temporary memory\n")
        out.append(_common.markdown_table(
            ["method", "K", "chunk_size", "temp MiB", "one K×d Jacobian MiB", "ratio"],
            [[r["method"], r["K"], str(r["chunk_size"]), r["temp_mb"], r["jacobian_mb"],
              r["ratio"]] for r in mem]))
    rows = side_by_side(records)
    if rows:
        ref = next(r["ref"] for r in records if r["part"] == "reference")
        out.append(f"\n## Params mode against torchjd: jmtl at {ref} and now\n")
        out.append("Speed-up = torchjd's step time / jmtl's, each pair timed in one process."
                   "\n")
        out.append(_common.markdown_table(
            ["method", "K", "torchjd ms (this run)", f"jmtl {ref} ms", "jmtl ms"], rows))
    tj = [r for r in records if r["part"] == "torchjd"]
    if tj:
        out.append("\n## Against torchjd (same model, batch and aggregator)\n")
        out.append(_common.markdown_table(
            ["method", "K", "jmtl mode", "jmtl ms", "torchjd ms", "speed-up"],
            [[r["method"], r["K"], r["mode"], r["median_ms"], r["torchjd_ms"],
              f"{1 / r['ratio']:.2f}×"] for r in tj]))
        for g in [r for r in records if r["part"] == "gemm"][-1:]:
            out.append(f"\nOne `(256, 256) x (256, 8192)` float32 GEMM in the same run: jax "
                       f"{g['jax_gflops']:.1f} GFLOP/s, torch {g['torch_gflops']:.1f} GFLOP/s.")
    out.append("\n" + targets(records))
    return "\n".join(out)


def targets(records) -> str:
    """Checks the design targets and says which are met."""
    lines = ["## Targets\n"]
    steps = [r for r in records if r["part"] == "step"]
    loss = [r for r in steps if r["kind"] == "loss" and r["method"] != "ew"]
    if loss:
        worst = max(loss, key=lambda r: r["ratio"])
        lines.append(f"- loss-level methods ≤ 1.05× ew: worst {worst['method']} K={worst['K']} "
                     f"{worst['mode']} {worst['ratio']:.2f}× "
                     f"({'met' if worst['ratio'] <= 1.05 else 'NOT met'}; "
                     f"{sum(r['ratio'] <= 1.05 for r in loss)}/{len(loss)} within)")
    gram8 = [r for r in steps if r["kind"] == "gramian" and r["mode"] == "features"
             and r["K"] == 8]
    if gram8:
        bad = [r["method"] for r in gram8 if r["ratio"] > 1.3]
        lines.append(f"- Gramian methods, features mode, K=8, ≤ 1.3× ew: "
                     f"{len(gram8) - len(bad)}/{len(gram8)} met"
                     + (f" (over: {', '.join(sorted(bad))})" if bad else ""))
    solv = [r for r in records if r["part"] == "solver" and r["K"] == max(
        [q["K"] for q in records if q["part"] == "solver"] or [0]) and r["method"] != "gramian"]
    if solv:
        bad = [f"{r['method']} ({r['ratio']:.2f}×)" for r in solv if r["ratio"] > 1.5]
        lines.append(f"- solvers at K={solv[0]['K']} ≤ 1.5× the Gramian's cost: "
                     f"{len(solv) - len(bad)}/{len(solv)} met"
                     + (f" (over: {', '.join(sorted(bad))})" if bad else ""))
    tj = [r for r in records if r["part"] == "torchjd" and r["mode"] == "params"
          and r["method"] in ("upgrad", "mgda") and r["K"] in TORCHJD_TARGETS]
    if tj:
        ok = [r for r in tj if 1 / r["ratio"] >= TORCHJD_TARGETS[r["K"]]]
        lines.append("- params-mode upgrad/mgda faster than torchjd by ≥ "
                     + ", ".join(f"{v}× at K={k}" for k, v in TORCHJD_TARGETS.items())
                     + f": {len(ok)}/{len(tj)} met; speed-ups "
                     + ", ".join(f"{r['method']}@{r['K']} {1 / r['ratio']:.2f}×" for r in tj))
        lines.extend(_floor_lines([r for r in tj if r not in ok], records))
    return "\n".join(lines) + "\n"


def _floor_lines(missed, records) -> list[str]:
    """For each missed torchjd target: the time it needs against the step's FLOPs at the
    GEMM rate measured in the same run (no step can beat that on this machine)."""
    gemm = [r for r in records if r["part"] == "gemm"]
    if not gemm:
        return []
    rate = gemm[-1]["jax_gflops"]
    out = []
    for r in missed:
        step = [q for q in records if q["part"] == "step" and q["method"] == r["method"]
                and q["K"] == r["K"] and q["mode"] == "params" and q.get("gflop")]
        if not step:
            continue
        need = r["torchjd_ms"] / TORCHJD_TARGETS[r["K"]]
        floor = step[0]["gflop"] / rate * 1e3
        verdict = ("below this machine's floor" if floor > need
                   else f"{floor / need:.0%} of it is the floor")
        out.append(f"  - {r['method']}@{r['K']}: needs ≤ {need:.1f} ms; its "
                   f"{step[0]['gflop']:.2f} GFLOP at this run's GEMM rate "
                   f"({rate:.0f} GFLOP/s; torch {gemm[-1]['torch_gflops']:.0f}) take "
                   f"{floor:.1f} ms ({verdict})")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few methods, small K, few repeats")
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results (benchmarks/results/quick with --quick)")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--parts", nargs="*", default=["step", "solver", "memory", "torchjd"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--ks", type=int, nargs="*", default=None,
                   help="numbers of tasks of the step benchmark (default 2 8 32 128)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads for the torchjd comparison on CPU")
    p.add_argument("--modes", nargs="*", default=["params", "features"],
                   help="engine modes of the step part")
    p.add_argument("--task-batching", default=None, choices=["gemm", "vmap"],
                   help="value_and_mtl_grad(task_batching=...) (default: the engine's)")
    p.add_argument("--donate", action="store_true",
                   help="step parts: jit with donate_argnums=(params, state) and feed each "
                        "step's outputs to the next, as a training loop does")
    p.add_argument("--jmtl-ref", default=None, metavar="REV",
                   help="also measure jmtl at this git revision (params-mode step and "
                        "torchjd parts, in a child process) for a side-by-side table")
    p.add_argument("--malloc", choices=["default", "keep"], default="default",
                   help="'keep': re-run under GLIBC_TUNABLES that keep freed memory in "
                        "the heap (see README, 'CPU: page faults'); applies to torch too")
    args = p.parse_args(argv)
    if args.malloc == "keep" and os.environ.get("GLIBC_TUNABLES") != KEEP_MALLOC:
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv],
                  dict(os.environ, GLIBC_TUNABLES=KEEP_MALLOC))
    if args.task_batching:
        ENGINE_KWARGS["task_batching"] = args.task_batching
    global DONATE
    DONATE = (0, 1) if args.donate else ()
    args.out = args.out or _common.default_out(args.quick)
    quick = args.quick
    names = _common.select_methods(args.methods or (QUICK_METHODS if quick else None))
    repeats = args.repeats or (3 if quick else 10)
    step_ks = tuple(args.ks) if args.ks else ((2, 8) if quick else (2, 8, 32, 128))
    solver_ks = (8, 32) if quick else (8, 32, 128)
    mem_ks = (32,) if quick else (32, 128)
    info = _common.device_info()
    print(f"device: {info['backend']} ({info['device_kind']}), methods: {', '.join(names)}")
    records: list[dict] = []
    log = lambda s: print(s, flush=True)
    t0 = time.perf_counter()
    if "step" in args.parts:
        bench_steps(names, step_ks, tuple(args.modes), repeats, records, log)
    if "solver" in args.parts:
        bench_solvers(names, solver_ks, repeats, records, log)
    if "memory" in args.parts:
        bench_memory(names, mem_ks, 4, records, log)
    if "torchjd" in args.parts:
        bench_torchjd(names, (8,) if quick else step_ks, repeats, records, log,
                      args.torch_threads)
    if args.jmtl_ref:
        extra = ["--torch-threads", str(args.torch_threads)] + (
            ["--donate"] if args.donate else [])
        bench_reference(args.jmtl_ref, [n for n in names if n != "ew"],
                        (8,) if quick else step_ks, repeats, records, log, extra)
    for r in records:
        r.setdefault("device_kind", info["device_kind"])
        r.setdefault("backend", info["backend"])
    os.makedirs(args.out, exist_ok=True)
    _common.write_json(os.path.join(args.out, "speed.json"), {
        "benchmark": "speed", "device": info, "quick": quick,
        "config": {"batch": BATCH, "in_dim": IN_DIM, "solver_dim": SOLVER_DIM,
                   "repeats": repeats, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                   "donate": bool(DONATE),
                   "xla_flags": os.environ.get("XLA_FLAGS"), **ENGINE_KWARGS},
        "records": records,
        "seconds": time.perf_counter() - t0})
    md = markdown(records, info, args)
    _common.write_text(os.path.join(args.out, "speed.md"), md)
    plot(records, os.path.join(args.out, "speed.png"), info)
    print("\n" + targets(records))
    return {"records": records}


if __name__ == "__main__":
    main()
