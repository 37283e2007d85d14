"""What the reliability machinery costs per step: the finiteness guard and `jmtl.checked`.

For a few methods, times the same jitted params-mode step (trunk 64-256-256 ReLU, K
linear heads, batch 256) three ways, interleaved in one run:

* ``guarded``: the default (inputs checked for finiteness, the state kept on a bad step);
* ``unguarded``: the same step with the guard replaced by the identity (for this
  measurement only, by patching ``jmtl._method_call`` before tracing);
* ``checked``: ``jmtl.checked(jax.jit(step))``, the runtime checks traced in.

Reports each as a ratio to ``unguarded``.

    python benchmarks/guard_cost.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import jmtl  # noqa: E402
from jmtl import _method_call  # noqa: E402

METHODS = ("ew", "uw", "famo", "mgda", "upgrad", "nash_mtl")


def _problem(k: int, width: int = 256, batch: int = 256):
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"trunk": {"w1": jax.random.normal(keys[0], (64, width)) / 8,
                        "w2": jax.random.normal(keys[1], (width, width)) / 16},
              "heads": jax.random.normal(keys[2], (width, k)) / 16}
    x = jax.random.normal(keys[3], (batch, 64))
    y = jax.random.normal(keys[3], (batch, k))

    def loss_fn(p, x, y):
        h = jax.nn.relu(jax.nn.relu(x @ p["trunk"]["w1"]) @ p["trunk"]["w2"])
        out = h @ p["heads"]
        return {f"t{i:03d}": jnp.mean((out[:, i] - y[:, i]) ** 2) for i in range(k)}

    return params, x, y, loss_fn


@contextlib.contextmanager
def _no_guard():
    guard, check = _method_call._guard, _method_call._check_finite
    _method_call._guard = lambda ok, new, old: new
    _method_call._check_finite = lambda inputs, method, names: jnp.ones((), bool)
    try:
        yield
    finally:
        _method_call._guard, _method_call._check_finite = guard, check


def _steps(name: str, k: int):
    params, x, y, loss_fn = _problem(k)
    method = jmtl.testing.build_example(name, k)
    grad_fn = jmtl.value_and_mtl_grad(loss_fn, method, shared={"trunk": True,
                                                               "heads": False})
    state = grad_fn.init(params, x, y)
    key = jax.random.key(1)

    def step(p, s):
        return grad_fn(p, s, x, y, key=key)

    guarded = jax.jit(step)
    guarded(params, state)
    with _no_guard():
        unguarded = jax.jit(lambda p, s: step(p, s))
        unguarded(params, state)  # traced (and compiled) without the guard
    checked = jmtl.checked(jax.jit(lambda p, s: step(p, s)))
    checked(params, state)
    return {"guarded": lambda: guarded(params, state),
            "unguarded": lambda: unguarded(params, state),
            "checked": lambda: checked(params, state)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or _common.default_out(args.quick)
    k = 8
    names = METHODS[:2] if args.quick else METHODS
    rounds = 1 if args.quick else 5
    records = []
    for name in names:
        fns = _steps(name, k)
        times = {v: [] for v in fns}
        for _ in range(rounds):  # interleaved: the machine's load hits every variant
            for variant, fn in fns.items():
                times[variant].append(_common.median_ms(fn, repeats=5 if args.quick else 20))
        med = {v: float(np.median(t)) for v, t in times.items()}
        rec = {"method": name, "K": k, **{f"{v}_ms": med[v] for v in med},
               "guard_ratio": med["guarded"] / med["unguarded"],
               "checked_ratio": med["checked"] / med["unguarded"]}
        records.append(rec)
        print(f"{name:10s} guarded {med['guarded']:.3f} ms  unguarded {med['unguarded']:.3f} ms"
              f"  checked {med['checked']:.3f} ms  guard x{rec['guard_ratio']:.3f}"
              f"  checked x{rec['checked_ratio']:.3f}", flush=True)
    rows = [[r["method"], f"{r['unguarded_ms']:.3f}", f"{r['guarded_ms']:.3f}",
             f"{r['guard_ratio']:.3f}×", f"{r['checked_ms']:.3f}", f"{r['checked_ratio']:.3f}×"]
            for r in records]
    table = _common.markdown_table(
        ["method", "unguarded ms", "guarded ms", "guard / unguarded", "checked ms",
         "checked / unguarded"], rows)
    info = _common.device_info()
    text = (f"# Cost of the finiteness guard and `jmtl.checked`\n\nParams-mode step, trunk "
            f"64-256-256, K={k}, batch 256, median of interleaved rounds, {info['backend']}. "
            f"Command: `python benchmarks/guard_cost.py`.\n\n{table}\n")
    os.makedirs(out, exist_ok=True)
    _common.write_text(os.path.join(out, "guard_cost.md"), text)
    _common.write_json(os.path.join(out, "guard_cost.json"), {"device": info,
                                                             "records": records})
    print(text)


if __name__ == "__main__":
    main()
