"""GradNorm in your own Flax NNX loop, with the pure objective ``jmtl.objectives.gradnorm``.

Two regression tasks of very different scales (targets ``σ_i tanh(A_i x)`` with
``σ = (1, 100)``, as in GradNorm's toy) share an MLP trunk. The loop does by hand what
``jmtl.gradnorm()`` does inside the engine:

1. per-task losses ``L_i`` and the norms ``n_i`` of each task's gradient on the last
   shared layer (one ``jax.vmap``-free ``jax.jacrev`` of the loss vector);
2. the model step on ``sum_i w_i L_i`` with its optax optimizer;
3. the weights' step on ``jmtl.objectives.gradnorm(w, n, L, L(0), alpha)`` with their own
   optax optimizer, then renormalisation so that they sum to ``K`` (the paper's rule).

At equilibrium the weighted gradient norms ``w_i n_i`` are equal up to the training-rate
term, so the σ=100 task's weight falls far below the σ=1 task's. The script prints the
weights and ``w_i n_i`` and, with ``--out``, plots the weights over training.

Run::

    python examples/gradnorm_objective.py [--steps 1500] [--fast] [--out gradnorm.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

try:
    import jmtl
except ImportError:  # running from a source checkout without installing jmtl
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jmtl

TASKS = ("small", "large")
SIGMA = {"small": 1.0, "large": 100.0}


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 64):
        self.l1 = nnx.Linear(16, width, rngs=rngs)
        self.l2 = nnx.Linear(width, width, rngs=rngs)  # GradNorm's layer: the last shared one
        self.heads = nnx.Dict({t: nnx.Linear(width, 8, rngs=rngs) for t in TASKS})

    def __call__(self, x):
        z = jax.nn.relu(self.l2(jax.nn.relu(self.l1(x))))
        return {t: head(z) for t, head in self.heads.items()}


def make_data(seed: int = 0, n: int = 2048):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    ys = {t: (SIGMA[t] * np.tanh(x @ rng.normal(0.0, 0.5, (16, 8)))).astype(np.float32)
          for t in TASKS}
    return jnp.asarray(x), {t: jnp.asarray(y) for t, y in ys.items()}


def losses_fn(model: Net, x, ys) -> dict:
    out = model(x)
    return {t: jnp.mean((out[t] - ys[t]) ** 2) for t in TASKS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--alpha", type=float, default=0.12, help="GradNorm's α (toy: 0.12)")
    parser.add_argument("--fast", action="store_true", help="a few steps (smoke test)")
    parser.add_argument("--out", default=None, help="save a plot of the weights here")
    args = parser.parse_args(argv)
    steps = 20 if args.fast else args.steps

    x, ys = make_data()
    model = Net(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    k = len(TASKS)
    # The weights have their own optimizer; iRprop⁻ suits GradNorm's sign-valued gradient.
    w_opt = jmtl.transform.irprop(0.025)
    weights = {t: jnp.float32(1.0) for t in TASKS}
    w_state = w_opt.init(weights)

    def losses_of(p):
        return losses_fn(nnx.merge(graphdef, p), x, ys)

    @jax.jit
    def step(params, opt_state, weights, w_state, l0):
        losses = losses_of(params)
        # n_i: norm of each task's unweighted gradient on the last shared layer.
        jac = jax.jacrev(lambda p: losses_of(p))(params)
        norms = {t: jnp.sqrt(jnp.sum(jac[t]["l2"]["kernel"][...] ** 2)) for t in TASKS}
        # Model step on sum_i w_i L_i (the weights are constants here).
        grads = jax.grad(lambda p: jmtl.objectives.weighted_sum(losses_of(p), weights))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Weights step on the GradNorm loss, then renormalise to sum to K.
        l0 = jax.tree_util.tree_map(lambda a, b: jnp.where(a > 0, a, b), l0, losses)
        w_grads = jax.grad(jmtl.objectives.gradnorm)(weights, norms, losses, l0, args.alpha)
        w_updates, w_state = w_opt.update(w_grads, w_state, weights)
        new_w = jax.tree_util.tree_map(lambda w: jnp.maximum(w, 1e-6),
                                       optax.apply_updates(weights, w_updates))
        total = sum(jax.tree_util.tree_leaves(new_w))
        new_w = jax.tree_util.tree_map(lambda w: k * w / total, new_w)
        return params, opt_state, new_w, w_state, l0, losses, norms

    l0 = {t: jnp.float32(0.0) for t in TASKS}  # set from the first losses
    history = []
    for _ in range(steps):
        params, opt_state, weights, w_state, l0, losses, norms = step(
            params, opt_state, weights, w_state, l0)
        history.append([float(weights[t]) for t in TASKS])
    history = np.asarray(history)
    gn = {t: float(weights[t] * norms[t]) for t in TASKS}
    print("weights:", {t: round(float(weights[t]), 4) for t in TASKS})
    print("weighted gradient norms w_i n_i:", {t: round(v, 4) for t, v in gn.items()})
    print("losses / σ²:", {t: round(float(losses[t]) / SIGMA[t] ** 2, 4) for t in TASKS})
    assert np.all(np.isfinite(history)) and abs(history[-1].sum() - k) < 1e-3
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for i, t in enumerate(TASKS):
            ax.plot(history[:, i], label=f"{t} (σ={SIGMA[t]:g})")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("task weight w_i (log scale)")
        ax.set_title("GradNorm weights from jmtl.objectives.gradnorm")
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        fig.savefig(args.out, dpi=100)
        print("saved", args.out)
    return history


if __name__ == "__main__":
    main()
