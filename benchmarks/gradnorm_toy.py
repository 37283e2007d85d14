"""GradNorm's toy regression (Chen et al., ICML 2018, §5.1): weights against task scales.

T regression tasks share an input ``x ∈ R^250`` and have targets in ``R^100``::

    f_i(x) = σ_i · tanh((B + ε_i) x)

with ``B`` and ``ε_i`` constant 100×250 matrices whose entries are drawn i.i.d. from
``N(0, 10)`` and ``N(0, 3.5)`` (the paper's notation; like public reproductions we read
the second argument as a standard deviation). ``B`` is information shared by all tasks,
``ε_i`` is task-specific, and ``σ_i`` sets the scale of task i's outputs, hence of its
squared loss and of its gradients. The network is the paper's: a 4-layer fully
connected ReLU trunk with 100 units per layer shared by all tasks, and one affine
layer per task. GradNorm's asymmetry is the paper's value for this toy, ``α = 0.12``,
and its gradient norms are taken on the last shared layer (the paper's choice). The
weights are trained by jmtl.gradnorm's default optimizer (iRprop⁻, initial step 0.025);
uncertainty weighting by jmtl.uw's (Adam 1e-2 on the clipped gradient).

Settings: ``T = 2`` with ``σ = (1, 100)`` is the paper's two-task system. The paper
also runs ``T = 10``; as we could not check its exact ``σ_i`` values, ``--tasks 10``
uses ``σ_i`` spaced logarithmically from 1 to 100 (our choice). The input distribution
is not given in the sources we consulted: we draw ``x ~ N(0, 0.01² I)`` so that
``tanh`` works in its non-saturated range.

What to expect: equal weights let the large-scale task dominate the shared trunk;
GradNorm's weights settle roughly inversely to the task scales (the weight of the
σ=100 task drops far below the σ=1 task's), and the task-normalised test loss
``Σ_i MSE_i / σ_i²`` is lower than with equal weights; uncertainty weighting
(``jmtl.uw``, Kendall et al., CVPR 2018) also rescales the tasks, through learned
log-variances.

Run::

    python benchmarks/gradnorm_toy.py [--quick] [--tasks 2|10] [--steps N] [--out DIR]

Writes ``gradnorm_toy.md``, ``gradnorm_toy.json`` and ``gradnorm_toy.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from _common import value_and_mtl_grad  # noqa: E402

import jmtl  # noqa: E402

IN_DIM, OUT_DIM, WIDTH, DEPTH = 250, 100, 100, 4
METHODS = ("ew", "uw", "gradnorm")
ALPHA = 0.12
BATCH = 100
LR = 1e-4
GRADNORM_LR = 0.025  # jmtl.gradnorm's default: initial iRprop⁻ step of the weights


def scales(num_tasks: int) -> np.ndarray:
    """``σ_i``: (1, 100) for two tasks, else log-spaced from 1 to 100."""
    if num_tasks == 2:
        return np.array([1.0, 100.0], np.float32)
    return np.geomspace(1.0, 100.0, num_tasks).astype(np.float32)


def make_data(sigmas: np.ndarray, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Inputs and the T targets ``σ_i tanh((B + ε_i) x)`` for train and test sets."""
    rng = np.random.default_rng(seed)
    b = rng.normal(0.0, 10.0, (OUT_DIM, IN_DIM))
    eps = rng.normal(0.0, 3.5, (len(sigmas), OUT_DIM, IN_DIM))
    x = rng.normal(0.0, 0.01, (n_train + n_test, IN_DIM))
    y = np.stack([s * np.tanh(x @ (b + e).T) for s, e in zip(sigmas, eps)], 1)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return {"x_train": x[:n_train], "y_train": y[:n_train],
            "x_test": x[n_train:], "y_test": y[n_train:]}


def init_params(key: jax.Array, num_tasks: int) -> dict:
    keys = jax.random.split(key, DEPTH + 1)
    dims = (IN_DIM,) + (WIDTH,) * DEPTH
    trunk = {}
    for i in range(DEPTH):
        trunk[f"w{i}"] = jax.random.normal(keys[i], dims[i:i + 2]) * (2 / dims[i]) ** 0.5
        trunk[f"b{i}"] = jnp.zeros((dims[i + 1],))
    heads = {"w": jax.random.normal(keys[-1], (num_tasks, WIDTH, OUT_DIM)) / WIDTH ** 0.5,
             "b": jnp.zeros((num_tasks, OUT_DIM))}
    return {"trunk": trunk, "heads": heads}


def predict(params: dict, x: jax.Array) -> jax.Array:
    """``(batch, T, 100)`` outputs of the T affine heads."""
    h = x
    for i in range(DEPTH):
        h = jax.nn.relu(h @ params["trunk"][f"w{i}"] + params["trunk"][f"b{i}"])
    return jnp.einsum("bh,tho->bto", h, params["heads"]["w"]) + params["heads"]["b"]


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> dict:
    """Per-task mean squared error, ``{"task_00": ..., ...}``."""
    mse = jnp.mean((predict(params, x) - y) ** 2, axis=(0, 2))
    return {f"task_{i:02d}": mse[i] for i in range(y.shape[1])}


def last_shared_layer(path, leaf) -> bool:
    """GradNorm's norms: the weights of the last shared layer."""
    del leaf
    return path == f"trunk/w{DEPTH - 1}"


def method_weights(name: str, state) -> jax.Array:
    """The task weights a method's state implies (for the plot)."""
    if name == "gradnorm":
        return state.weights
    if name == "uw":
        return jnp.exp(-state.log_vars)
    return None


def run(name: str, data: dict, sigmas: np.ndarray, *, steps: int, chunk: int, seed: int,
        bar, gradnorm_lr: float = GRADNORM_LR) -> dict:
    """Trains one method; returns weight and test-loss traces."""
    k = len(sigmas)
    method = jmtl.methods.get(name, alpha=ALPHA, lr=gradnorm_lr) if name == "gradnorm" \
        else jmtl.methods.get(name)
    kwargs = {"norm_params": last_shared_layer} if name == "gradnorm" else {}
    grad_fn = value_and_mtl_grad(task_losses, method, shared={"trunk": True, "heads": False},
                                 **kwargs)
    opt = optax.adam(LR)
    x_all, y_all = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    inv_var = jnp.asarray(1.0 / sigmas ** 2)

    @jax.jit
    def train_chunk(carry, key):
        def one(carry, key):
            params, state, opt_state = carry
            idx = jax.random.randint(key, (BATCH,), 0, x_all.shape[0])
            _, grads, state = grad_fn(params, state, x_all[idx], y_all[idx], key=key)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            w = method_weights(name, state)
            return (params, state, opt_state), (w if w is not None else jnp.ones((k,)))

        carry, ws = jax.lax.scan(one, carry, jax.random.split(key, chunk))
        test = jnp.stack(jax.tree_util.tree_leaves(task_losses(carry[0], x_test, y_test)))
        return carry, ws, test * inv_var

    key = jax.random.key(seed)
    params = init_params(key, k)
    carry = (params, grad_fn.init(params, x_all[:BATCH], y_all[:BATCH]), opt.init(params))
    weights, tests = [], []
    for c in range(steps // chunk):
        carry, ws, test = train_chunk(carry, jax.random.fold_in(key, c))
        weights.append(np.asarray(ws))
        tests.append(np.asarray(test))
        bar.set_postfix_str(f"{name}: normalised test loss {float(test.sum()):.4f}")
        bar.update(chunk)
    return {"weights": np.concatenate(weights), "test_normalised": np.stack(tests)}


def plot(results: dict, sigmas: np.ndarray, chunk: int, path: str) -> None:
    plt.rcParams.update({"font.size": 11})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(sigmas)))
    for ax, name in zip(axes[:2], ("gradnorm", "uw")):
        if name not in results:
            ax.set_visible(False)
            continue
        w = results[name]["weights"]
        steps = np.arange(1, len(w) + 1)
        for i, s in enumerate(sigmas):
            ax.plot(steps, w[:, i], color=colors[i], lw=1.5, label=f"task σ={s:.3g}")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("task weight $w_i$ (log scale)")
        ax.set_title(f"GradNorm weights (α={ALPHA:g})" if name == "gradnorm"
                     else "UW weights $e^{-s_i}$")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=9, ncol=2 if len(sigmas) > 4 else 1)
    for name, r in results.items():
        t = r["test_normalised"].sum(1)
        axes[2].plot(chunk * np.arange(1, len(t) + 1), t, lw=1.5, label=name)
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel(r"$\sum_i$ test MSE$_i$ / $\sigma_i^2$")
    axes[2].set_title("task-normalised test loss (lower is better)")
    axes[2].grid(True, which="major", alpha=0.3)
    axes[2].legend()
    fig.suptitle(f"GradNorm toy (Chen et al. 2018, §5.1), T={len(sigmas)} tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few steps, for a smoke test")
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results (benchmarks/results/quick with --quick)")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--gradnorm-lr", type=float, default=GRADNORM_LR,
                   help="initial step of GradNorm's weight optimizer (jmtl.gradnorm's lr)")
    args = p.parse_args(argv)
    args.out = args.out or _common.default_out(args.quick)
    steps = args.steps or (100 if args.quick else 4000)
    chunk = min(50, steps)
    steps = max(steps // chunk, 1) * chunk
    sigmas = scales(args.tasks)
    data = make_data(sigmas, 2000 if args.quick else 10_000, 1000 if args.quick else 2000,
                     seed=args.seed)
    names = _common.select_methods(args.methods)
    t0 = time.perf_counter()
    results = {}
    with tqdm(total=steps * len(names), unit="step", desc="gradnorm_toy") as bar:
        for name in names:
            results[name] = run(name, data, sigmas, steps=steps, chunk=chunk, seed=args.seed,
                                bar=bar, gradnorm_lr=args.gradnorm_lr)
    rows, records = [], []
    for name, r in results.items():
        final = r["test_normalised"][-1]
        w = r["weights"][-1]
        last = r["weights"][-max(len(r["weights"]) // 10, 1):]
        tail = last.mean(0)
        swing = float(np.max(np.ptp(last, axis=0) / np.maximum(tail, 1e-30)))
        rows.append([name, float(final.sum())] + [float(v) for v in final]
                    + [" ".join(f"{v:.3g}" for v in tail), f"{swing:.3g}"])
        records.append({"method": name, "test_normalised_total": float(final.sum()),
                        "test_normalised_per_task": final, "final_weights": w,
                        "mean_weights_last_10pct": tail, "weight_swing_last_10pct": swing})
    table = _common.markdown_table(
        ["method", "Σ test MSE/σ²"] + [f"task σ={s:.3g}" for s in sigmas]
        + ["weights (mean of last 10% of steps)",
           "weight swing, last 10% (max (max−min)/mean)"], rows)
    md = (f"# GradNorm toy (Chen et al., ICML 2018, §5.1)\n\nT={len(sigmas)}, σ={sigmas.tolist()}, "
          f"α={ALPHA} (iRprop⁻ weight step {args.gradnorm_lr}), Adam {LR}, batch {BATCH}, "
          f"{steps} steps, seed {args.seed}. "
          f"Test losses are task-normalised (MSE_i / σ_i²). Command: "
          f"`python benchmarks/gradnorm_toy.py{' --quick' if args.quick else ''}"
          f"{'' if args.tasks == 2 else f' --tasks {args.tasks}'}` "
          f"({time.perf_counter() - t0:.0f} s).\n\n" + table)
    suffix = "" if args.tasks == 2 else f"_t{args.tasks}"
    os.makedirs(args.out, exist_ok=True)
    _common.write_text(os.path.join(args.out, f"gradnorm_toy{suffix}.md"), md)
    _common.write_json(os.path.join(args.out, f"gradnorm_toy{suffix}.json"), {
        "benchmark": "gradnorm_toy", "device": _common.device_info(),
        "config": {"tasks": args.tasks, "sigmas": sigmas, "alpha": ALPHA, "steps": steps,
                   "lr": LR, "batch": BATCH, "quick": args.quick},
        "records": records,
        "traces": {n: {"weights_every_10": r["weights"][::10],
                       "test_normalised_per_chunk": r["test_normalised"]}
                   for n, r in results.items()}})
    plot(results, sigmas, chunk, os.path.join(args.out, f"gradnorm_toy{suffix}.png"))
    print("\n" + md)
    return {"records": records}


if __name__ == "__main__":
    main()
