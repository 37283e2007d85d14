"""Uncertainty weighting on Kendall et al.'s toy problem: recover each task's noise scale.

Two regression tasks share the input ``x``::

    y1 = 2 x + 8 + 10 ε1,    y2 = 3 x + 3 + 1 ε2,    ε ~ N(0, 1),  N = 20,000.

A shared linear feature layer and two linear heads are trained jointly with one learnable
log-variance ``s_i = log σ_i²`` per task, minimising
``jmtl.objectives.uncertainty(losses, s, kind="log_variance") = sum_i exp(-s_i) L_i + s_i``
with full-batch Adam under ``jax.jit``. At the optimum ``σ_i² = L_i``, the residual
variance, so the learned ``σ = exp(s / 2)`` should approach the true noise scales 10 and 1.

The same result is reached with the balancing method ``jmtl.uw()`` in jmtl's engine
(``--method``): the log-variances then live in the method's state and are trained by its
own optax optimizer (Adam 1e-2 on the clipped gradient), while the model's Adam sees the
weighted losses ``exp(-s_i) L_i``.

Run::

    python examples/uncertainty_toy.py [--steps 500] [--method] [--fast]
        [--out examples/out/uncertainty_toy.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import jmtl
except ImportError:  # running from a source checkout without installing jmtl
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jmtl
import jmtl.objectives

TRUE_SIGMA = {"y1": 10.0, "y2": 1.0}


def make_data(key: jax.Array, n: int = 20_000) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The toy data set: ``x`` and ``{"y1": ..., "y2": ...}``."""
    kx, k1, k2 = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, 1))
    y1 = 2.0 * x[:, 0] + 8.0 + 10.0 * jax.random.normal(k1, (n,))
    y2 = 3.0 * x[:, 0] + 3.0 + 1.0 * jax.random.normal(k2, (n,))
    return x, {"y1": y1, "y2": y2}


def init_params(key: jax.Array, hidden: int = 8) -> dict:
    """Shared linear feature ``h = x W + b`` and one linear head per task."""
    kw, k1, k2 = jax.random.split(key, 3)
    return {
        "shared": {"w": jax.random.normal(kw, (1, hidden)) / np.sqrt(1.0),
                   "b": jnp.zeros((hidden,))},
        "heads": {t: {"w": jax.random.normal(kh, (hidden,)) / np.sqrt(hidden),
                      "b": jnp.zeros(())}
                  for t, kh in (("y1", k1), ("y2", k2))},
        "log_vars": {"y1": jnp.zeros(()), "y2": jnp.zeros(())},
    }


def task_losses(params: dict, x: jax.Array, ys: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Mean squared error of each task."""
    h = x @ params["shared"]["w"] + params["shared"]["b"]
    return {t: jnp.mean((h @ head["w"] + head["b"] - ys[t]) ** 2)
            for t, head in params["heads"].items()}


def objective(params: dict, x: jax.Array, ys: dict[str, jax.Array]):
    losses = task_losses(params, x, ys)
    return jmtl.objectives.uncertainty(losses, params["log_vars"], kind="log_variance"), losses


def train(steps: int = 500, lr: float = 0.2, seed: int = 0, progress: bool = False):
    """Trains the toy model; returns ``(params, sigma_history)`` with ``(steps, 2)`` σ."""
    kd, kp = jax.random.split(jax.random.key(seed))
    x, ys = make_data(kd)
    params = init_params(kp)
    opt = optax.adam(lr)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state):
        (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params, x, ys)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        sigma = jnp.stack([jnp.exp(params["log_vars"][t] / 2) for t in ("y1", "y2")])
        return params, opt_state, sigma, losses

    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="uncertainty toy", unit="step")
    history = []
    for _ in it:
        params, opt_state, sigma, _losses = step(params, opt_state)
        history.append(sigma)
        if progress and len(history) % 50 == 0:
            it.set_postfix(sigma1=f"{float(sigma[0]):.3f}", sigma2=f"{float(sigma[1]):.3f}")
    return params, np.asarray(jnp.stack(history))


def train_method(steps: int = 1000, lr: float = 0.2, seed: int = 0, progress: bool = False):
    """Trains the toy with ``jmtl.uw()`` in the engine; returns ``(params, state, σ history)``."""
    kd, kp = jax.random.split(jax.random.key(seed))
    x, ys = make_data(kd)
    params = init_params(kp)
    del params["log_vars"]  # the method keeps its own
    method = jmtl.uw()
    grad_fn = jmtl.value_and_mtl_grad(task_losses, method, shared="shared")
    state = grad_fn.init(params, x, ys)
    opt = optax.adam(lr)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, state, opt_state):
        _, grads, state = grad_fn(params, state, x, ys)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, jnp.exp(
            state.log_vars / 2)

    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="uncertainty toy (jmtl.uw)", unit="step")
    history = []
    for _ in it:
        params, state, opt_state, sigma = step(params, state, opt_state)
        history.append(sigma)
    return params, state, np.asarray(jnp.stack(history))


def plot(history: np.ndarray, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(history) + 1)
    for i, (t, true) in enumerate(TRUE_SIGMA.items()):
        line, = ax.plot(steps, history[:, i], label=f"learned σ ({t})")
        ax.axhline(true, ls="--", color=line.get_color(), alpha=0.6,
                   label=f"true σ ({t}) = {true:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("σ = exp(s / 2)")
    ax.set_yscale("log")
    ax.set_title("Uncertainty weighting recovers the task noise scales")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="full-batch Adam steps")
    parser.add_argument("--fast", action="store_true", help="few steps (smoke test)")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", action="store_true",
                        help="train with the method jmtl.uw() in the engine (1,000 steps)")
    parser.add_argument("--out", default=os.path.join("examples", "out", "uncertainty_toy.png"))
    args = parser.parse_args(argv)
    if args.method:
        steps = 30 if args.fast else max(args.steps, 1000)
        *_, history = train_method(steps=steps, lr=args.lr, seed=args.seed, progress=True)
    else:
        steps = 30 if args.fast else args.steps
        _, history = train(steps=steps, lr=args.lr, seed=args.seed, progress=True)
    sigma = {t: float(history[-1, i]) for i, t in enumerate(TRUE_SIGMA)}
    for t, true in TRUE_SIGMA.items():
        print(f"{t}: learned σ = {sigma[t]:.4f} (true {true:g}, "
              f"error {100 * abs(sigma[t] - true) / true:.2f}%)")
    plot(history, args.out)
    print(f"plot saved to {args.out}")
    return sigma


if __name__ == "__main__":
    main(sys.argv[1:])
