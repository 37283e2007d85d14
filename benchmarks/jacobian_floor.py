"""How far the params-mode Jacobian is from the GEMM floor on this machine.

On ``speed.py``'s model (MLP trunk 64→256→256, ReLU, K linear heads, batch 256) this
measures, in one process, interleaved, each jitted:

* ``engine``: the per-task Jacobian w.r.t. the trunk as the engine computes it
  (:func:`jmtl._task_vmap.vmap_rows`: the VJP over one-hot cotangents with each weight
  gradient one GEMM over all tasks and one-hot rows kept one-hot);
* ``vmap``: the same with plain ``jax.vmap`` of the VJP (the engine before issue 15,
  ``task_batching="vmap"``);
* ``folded``: the same Jacobian written by hand as task-folded GEMMs (the K cotangents
  stacked so that each weight gradient is one ``(n_in, B) × (B, K·n_out)`` GEMM and each
  input gradient one ``(K·B, n_out) × (n_out, n_in)`` GEMM);
* ``floor``: the FLOPs of those GEMMs divided by the rate of one large GEMM measured in
  the same run, i.e. the time the Jacobian would take if it were nothing but GEMMs.

It checks that ``engine`` and ``folded`` agree (maximum absolute difference) and writes
``jacobian_floor.md``. Run on one core to compare with single-threaded peers::

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 1 python benchmarks/jacobian_floor.py
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import speed  # noqa: E402

from jmtl import _task_vmap  # noqa: E402


def _trunk_vjp(params, x, y):
    names = speed.task_names(y.shape[1])

    def losses(trunk):
        tree = speed.loss_fn(dict(params, trunk=trunk), x, y)
        return jnp.stack([tree[n] for n in names])

    return jax.vjp(losses, params["trunk"])[1]


def engine_jacobian(params, x, y):
    """The engine's way (:func:`jmtl._task_vmap.vmap_rows`)."""
    vjp = _trunk_vjp(params, x, y)
    return _task_vmap.vmap_rows(lambda e: vjp(e)[0], y.shape[1], jnp.float32)


def vmap_jacobian(params, x, y):
    """Plain ``jax.vmap`` of the trunk VJP over the K one-hot cotangents."""
    vjp = _trunk_vjp(params, x, y)
    return jax.vmap(lambda e: vjp(e)[0])(jnp.eye(y.shape[1]))


def folded_jacobian(params, x, y):
    """The same Jacobian as explicit task-folded GEMMs (this model only)."""
    t, w = params["trunk"], params["heads"]["w"]
    b, k = x.shape[0], y.shape[1]
    a1 = x @ t["w1"] + t["b1"]
    h1 = jax.nn.relu(a1)
    a2 = h1 @ t["w2"] + t["b2"]
    pred = jax.nn.relu(a2) @ w + params["heads"]["b"]
    r = 2.0 * (pred - y) / b                                   # (B, K): dL_k / dpred_k
    c2 = (r[:, :, None] * w.T[None]) * (a2 > 0)[:, None, :]    # (B, K, H) per task
    c1 = (c2.reshape(b * k, -1) @ t["w2"].T).reshape(b, k, -1) * (a1 > 0)[:, None, :]

    def weight_grad(inp, c):                                    # (n_in, B) × (B, K·n_out)
        g = inp.T @ c.reshape(b, -1)
        return jnp.transpose(g.reshape(inp.shape[1], k, -1), (1, 0, 2))

    return {"b1": jnp.sum(c1, 0), "b2": jnp.sum(c2, 0),
            "w1": weight_grad(x, c1), "w2": weight_grad(h1, c2)}


def gemm_flops(k: int) -> float:
    h = speed.trunk_width(k)
    b, d = speed.BATCH, speed.IN_DIM
    weight = 2 * b * k * (d * h + h * h)          # the two weight gradients
    inputs = 2 * b * k * h * h  # input gradient of w2 (the heads' part is an outer product)
    return float(weight + inputs)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=int, nargs="*", default=[8, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=_common.default_out())
    args = p.parse_args(argv)
    a = jax.random.normal(jax.random.key(0), (256, 256))
    bm = jax.random.normal(jax.random.key(1), (256, 8192))
    gemm = jax.jit(lambda a, b: a @ b)
    gemm_ms = _common.median_ms(lambda: gemm(a, bm), repeats=args.repeats, min_time_s=0.2)
    rate = 2 * 256 * 256 * 8192 / (gemm_ms * 1e-3)
    rows = []
    for k in args.ks:
        params = speed.init_params(jax.random.key(0), k)
        x, y = speed.data(jax.random.key(1), k)
        eng, vm, fold = (jax.jit(engine_jacobian), jax.jit(vmap_jacobian),
                         jax.jit(folded_jacobian))
        ref = jax.tree_util.tree_leaves(fold(params, x, y))
        diff = max(float(jnp.max(jnp.abs(u - v))) for f in (eng, vm) for u, v in zip(
            jax.tree_util.tree_leaves(f(params, x, y)), ref, strict=True))
        eng_ms, fold_ms, ratio = _common.paired_median_ms(
            lambda: eng(params, x, y), lambda: fold(params, x, y), repeats=args.repeats,
            min_time_s=0.2)
        vm_ms = _common.median_ms(lambda: vm(params, x, y), repeats=args.repeats,
                                  min_time_s=0.2)
        floor_ms = gemm_flops(k) / rate * 1e3
        rows.append({"K": k, "engine_ms": eng_ms, "vmap_ms": vm_ms, "folded_ms": fold_ms,
                     "engine/folded": ratio, "floor_ms": floor_ms,
                     "engine/floor": eng_ms / floor_ms, "max_abs_diff": diff})
        print(f"K={k:3d} engine {eng_ms:7.2f} ms  vmap {vm_ms:7.2f} ms  folded "
              f"{fold_ms:7.2f} ms  floor {floor_ms:7.2f} ms  engine/floor "
              f"{eng_ms / floor_ms:4.2f}  max|diff| {diff:.1e}")
    info = _common.device_info()
    table = _common.markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    text = (f"# Params-mode Jacobian against the GEMM floor\n\n{info['backend']} "
            f"({info['device_kind']}), jax {info['jax']}, {info['cpu_count']} CPUs.\n\n"
            f"One large GEMM: {gemm_ms:.2f} ms = {rate / 1e9:.1f} GFLOP/s.\n\n{table}\n")
    _common.write_text(os.path.join(args.out, "jacobian_floor.md"), text)
    return rows


if __name__ == "__main__":
    main()
