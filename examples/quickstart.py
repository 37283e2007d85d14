"""Quickstart: one Flax NNX network, three tasks on scikit-learn's digits, a gradient method.

A shared MLP trunk (``jmtl.nn.HardSharing``) feeds three heads: the digit (10 classes),
its parity and whether it is at least 5. ``jmtl.value_and_mtl_grad`` computes the
per-task gradients of the trunk in one vmapped backward pass, a gradient method (UPGrad
when it is available) combines them, and ``nnx.Optimizer`` applies the result. Prints
the test accuracy of each task before and after training.

    python examples/quickstart.py           # about 10 s on a CPU
    python examples/quickstart.py --fast    # a few steps (smoke test)
"""

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jmtl
from jmtl import nn as mtnn

# UPGrad if this jmtl has it, else another Gramian-based gradient method.
DEFAULT_METHOD = next(m for m in ("upgrad", "mgda", "imtl_g", "aligned_mtl", "pcgrad")
                      if m in jmtl.methods.names())


def targets(digits):
    return {"digit": digits, "parity": digits % 2, "big": (digits >= 5).astype(np.int32)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--fast", action="store_true", help="run a few steps only")
    args = parser.parse_args()
    steps = 5 if args.fast else args.steps

    x, digits = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, d_tr, d_te = train_test_split(x, digits, test_size=0.25, random_state=0)
    y_tr, y_te = targets(d_tr), targets(d_te)

    rngs = nnx.Rngs(0)
    trunk = nnx.Sequential(nnx.Linear(64, 128, rngs=rngs), nnx.relu,
                           nnx.Linear(128, 64, rngs=rngs), nnx.relu)
    heads = {"digit": nnx.Linear(64, 10, rngs=rngs), "parity": nnx.Linear(64, 2, rngs=rngs),
             "big": nnx.Linear(64, 2, rngs=rngs)}
    model = mtnn.HardSharing(trunk, heads)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, _ = nnx.split(model, nnx.Param)

    def loss_fn(params, x, y):
        preds = nnx.merge(graphdef, params)(x)
        return {t: optax.softmax_cross_entropy_with_integer_labels(p, y[t]).mean()
                for t, p in preds.items()}

    method = jmtl.methods.get(args.method)
    grad_fn = jmtl.value_and_mtl_grad(
        loss_fn, method, shared=lambda path, leaf: path.startswith("trunk/"))

    @nnx.jit
    def train_step(model, optimizer, method_state, x, y):
        params = nnx.state(model, nnx.Param)
        losses, grads, method_state = grad_fn(params, method_state, x, y)
        optimizer.update(model, grads)
        return losses, method_state

    def accuracies():
        preds = model(jnp.asarray(x_te))
        return {t: float(jnp.mean(jnp.argmax(p, -1) == y_te[t])) for t, p in preds.items()}

    before = accuracies()
    rng = np.random.default_rng(0)
    method_state = grad_fn.init(nnx.state(model, nnx.Param), x_tr[:128],
                                {t: v[:128] for t, v in y_tr.items()})
    bar = tqdm(range(steps), desc=args.method)
    for i in bar:
        idx = rng.choice(len(x_tr), 128, replace=False)
        losses, method_state = train_step(model, optimizer, method_state, x_tr[idx],
                                          {t: v[idx] for t, v in y_tr.items()})
        if i % 20 == 0 or i == steps - 1:
            bar.set_postfix({t: f"{float(v):.3f}" for t, v in losses.items()})

    after = accuracies()
    for t in before:
        print(f"test accuracy {t:>6}: {before[t]:.3f} -> {after[t]:.3f}")


if __name__ == "__main__":
    main()
