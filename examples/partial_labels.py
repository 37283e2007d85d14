"""Partially labelled batches: masked per-task losses and the ``present`` mask.

On scikit-learn's digits, three tasks share an MLP trunk: the digit (labelled for 20%
of the images, ``-1`` elsewhere), its parity (always labelled) and the ink density
(regression, labelled for half of the images, ``NaN`` elsewhere). Each task's loss is
a ``jmtl.losses`` masked loss (mean over its labelled examples, ``0`` with a zero
gradient when the batch has none), and ``jmtl.losses.presence(masks)`` tells
``jmtl.value_and_mtl_grad`` which tasks the batch labels, so the balancing method
leaves the others out. The script trains on random batches, then takes one step on a
batch with no digit label at all and checks that the losses, gradients and method
state stay finite.

    python examples/partial_labels.py          # about 10 s on a CPU
    python examples/partial_labels.py --fast   # a few steps (smoke test)
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from tqdm import tqdm

import jmtl
from jmtl import losses as mtl_losses
from jmtl import nn as mtnn

DEFAULT_METHOD = next(m for m in ("upgrad", "mgda", "imtl_g", "aligned_mtl", "pcgrad")
                      if m in jmtl.methods.names())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--fast", action="store_true", help="run a few steps only")
    args = parser.parse_args()
    steps = 5 if args.fast else args.steps

    x, digits = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    masks = {"digit": rng.random(len(x)) < 0.2, "parity": np.ones(len(x), bool),
             "ink": rng.random(len(x)) < 0.5}
    ink = x.mean(axis=1)
    y = {"digit": np.where(masks["digit"], digits, -1),             # -1: unlabelled
         "parity": digits % 2,
         "ink": np.where(masks["ink"], (ink - ink.mean()) / ink.std(), np.nan)}

    rngs = nnx.Rngs(0)
    model = mtnn.HardSharing(
        nnx.Sequential(nnx.Linear(64, 64, rngs=rngs), nnx.relu),
        {"digit": nnx.Linear(64, 10, rngs=rngs), "parity": nnx.Linear(64, 2, rngs=rngs),
         "ink": nnx.Linear(64, 1, rngs=rngs)})
    optimizer = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)
    graphdef, _ = nnx.split(model, nnx.Param)

    def loss_fn(params, x, y, m):
        p = nnx.merge(graphdef, params)(x)
        return {"digit": mtl_losses.masked_cross_entropy(p["digit"], y["digit"], m["digit"]),
                "parity": mtl_losses.masked_cross_entropy(p["parity"], y["parity"], m["parity"]),
                "ink": mtl_losses.masked_mse(p["ink"][:, 0], y["ink"], m["ink"])}

    method = jmtl.methods.get(args.method)
    grad_fn = jmtl.value_and_mtl_grad(loss_fn, method,
                                      shared=lambda path, leaf: path.startswith("trunk/"))

    @nnx.jit
    def train_step(model, optimizer, method_state, x, y, m):
        losses, grads, method_state = grad_fn(nnx.state(model, nnx.Param), method_state,
                                              x, y, m, present=mtl_losses.presence(m))
        optimizer.update(model, grads)
        return losses, grads, method_state

    def batch(idx):
        return x[idx], {t: v[idx] for t, v in y.items()}, {t: v[idx] for t, v in masks.items()}

    everything = batch(np.arange(len(x)))
    method_state = grad_fn.init(nnx.state(model, nnx.Param), *everything)
    before = loss_fn(nnx.state(model, nnx.Param), *everything)
    bar = tqdm(range(steps), desc=f"partial labels ({args.method})")
    for i in bar:
        losses, _, method_state = train_step(model, optimizer, method_state,
                                             *batch(rng.choice(len(x), 64, replace=False)))
        if i % 20 == 0 or i == steps - 1:
            bar.set_postfix({t: f"{float(v):.3f}" for t, v in losses.items()})
    after = loss_fn(nnx.state(model, nnx.Param), *everything)
    for t in before:
        print(f"masked loss {t:>6}: {float(before[t]):.3f} -> {float(after[t]):.3f}")

    # A batch in which no image is labelled with its digit.
    no_digit = np.flatnonzero(~masks["digit"])[:64]
    losses, grads, method_state = train_step(model, optimizer, method_state, *batch(no_digit))
    leaves = jax.tree.leaves((losses, grads, method_state))
    finite = all(bool(jnp.all(jnp.isfinite(v))) for v in leaves
                 if jnp.issubdtype(jnp.asarray(v).dtype, jnp.inexact))
    print("batch without digit labels: losses", {t: round(float(v), 3) for t, v in
                                                 losses.items()}, "| all finite:", finite,
          "| |grad of the digit head|:", float(optax.global_norm(grads["heads"]["digit"])))
    assert finite, "NaN or inf in a batch without digit labels"


if __name__ == "__main__":
    main()
