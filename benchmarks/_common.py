"""Helpers shared by the benchmark scripts: timing, method construction, output files.

Not a benchmark itself; imported by the scripts in this folder (which put the folder
on ``sys.path`` so that they run as plain ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jmtl
from jmtl.methods import base
from jmtl.testing import example_hparams

# The module that packs a method's inputs (``method_inputs``).
agg_lib = importlib.import_module("jmtl._method_call")
# The engine, from the package root once it is exported there.
value_and_mtl_grad = getattr(jmtl, "value_and_mtl_grad", None) or \
    importlib.import_module("jmtl.engine").value_and_mtl_grad

__all__ = ["device_info", "median_ms", "build_method", "method_kwargs", "markdown_table",
           "write_json", "write_text", "default_out", "select_methods"]

HERE = os.path.dirname(os.path.abspath(__file__))


def default_out(quick: bool = False) -> str:
    """``benchmarks/results`` next to this file; ``results/quick`` for ``--quick`` runs, so
    a smoke run never overwrites the committed full results."""
    return os.path.join(HERE, "results", "quick") if quick else os.path.join(HERE, "results")


def device_info() -> dict:
    """Backend, device kind and versions, recorded with every result."""
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jmtl": jmtl.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def _block(tree: Any) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()


def median_ms(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2,
              min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds, after warm-up, blocking on the result.

    Args:
      fn: a zero-argument callable returning (a pytree of) JAX arrays.
      repeats: number of timed calls (at least this many).
      warmup: untimed calls first (the first one compiles).
      min_time_s: keep timing until this much time has been spent (for fast functions).

    Returns:
      The median of the timed calls, in milliseconds.
    """
    for _ in range(warmup):
        _block(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start) < min_time_s:
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
        if len(times) >= 20 * max(repeats, 1):
            break
    return 1e3 * statistics.median(times)


def paired_median_ms(fn: Callable[[], Any], base: Callable[[], Any], *, repeats: int = 10,
                     warmup: int = 2, min_time_s: float = 0.0) -> tuple[float, float, float]:
    """Times ``fn`` and ``base`` alternately, so drifts in machine load hit both alike.

    Returns:
      ``(median ms of fn, median ms of base, median of the per-pair ratios fn/base)``.
    """
    for _ in range(warmup):
        _block(fn())
        _block(base())
    tf, tb = [], []
    start = time.perf_counter()
    while len(tf) < repeats or (time.perf_counter() - start) < min_time_s:
        t0 = time.perf_counter()
        _block(fn())
        t1 = time.perf_counter()
        _block(base())
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        tb.append(t2 - t1)
        if len(tf) >= 20 * max(repeats, 1):
            break
    ratios = [a / b for a, b in zip(tf, tb, strict=True)]
    return 1e3 * statistics.median(tf), 1e3 * statistics.median(tb), statistics.median(ratios)


def method_kwargs(name: str, k: int) -> dict:
    """Hyperparameters a method cannot be built without: :func:`jmtl.testing.example_hparams`."""
    return example_hparams(name, k)


def build_method(name: str, k: int, dim: int | None = None) -> tuple[base.Method, Any]:
    """The registered method ``name`` with its defaults and its initial state.

    Args:
      name: a name from ``jmtl.methods.names()``.
      k: number of tasks.
      dim: number of shared parameters (per-parameter state of ``moco``,
        ``excess_mtl``, ``db_mtl``); passed to every ``init``.

    Returns:
      ``(method, state)``.
    """
    method = jmtl.methods.get(name, **method_kwargs(name, k))
    return method, method.init(k, dim=dim)


def select_methods(requested: Sequence[str] | None) -> list[str]:
    """Registered methods, filtered by ``requested`` (unknown names are reported)."""
    available = list(jmtl.methods.names())
    if not requested:
        return available
    missing = [m for m in requested if m not in available]
    if missing:
        print(f"[skip] not registered (yet): {', '.join(missing)}")
    return [m for m in requested if m in available]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON (numpy/JAX values converted, NaN → null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")


def write_text(path: str, text: str) -> None:
    """Writes a text file, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def tree_size(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def zeros_like_tree(tree: Any) -> Any:
    """``jnp.zeros_like`` on every leaf."""
    return jax.tree_util.tree_map(jnp.zeros_like, tree)
