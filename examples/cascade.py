"""Estimate-as-feature: task A's prediction feeds task B's head, without gradient leaking back.

On scikit-learn's digits, task A classifies the digit and task B says whether it is at
least 5. B's head reads the shared features *and* A's predicted class probabilities,
passed through ``jmtl.cascade.with_estimate`` (a ``lax.stop_gradient``): A is trained by
A's loss only. The model is trained with a gradient method through
``jmtl.value_and_mtl_grad``; at the end the script prints the gradient of B's loss
with respect to A's head (exactly zero) and, for comparison, the same gradient with
``allow_gradient=True`` (non-zero), plus the test accuracies before and after.

    python examples/cascade.py          # about 10 s on a CPU
    python examples/cascade.py --fast   # a few steps (smoke test)
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jmtl
from jmtl import cascade

DEFAULT_METHOD = next(m for m in ("upgrad", "mgda", "imtl_g", "aligned_mtl", "pcgrad")
                      if m in jmtl.methods.names())


class Cascade(nnx.Module):
    def __init__(self, rngs, allow_gradient=False):
        self.allow_gradient = allow_gradient
        self.trunk = nnx.Sequential(nnx.Linear(64, 64, rngs=rngs), nnx.relu)
        self.heads = nnx.Dict(digit=nnx.Linear(64, 10, rngs=rngs),       # task A
                              big=nnx.Linear(64 + 10, 2, rngs=rngs))     # task B

    def __call__(self, x):
        z = self.trunk(x)
        digit = self.heads["digit"](z)
        # B sees z and A's class probabilities; no gradient flows back into A's head.
        zb = cascade.with_estimate(z, digit, transform=jax.nn.softmax,
                                   allow_gradient=self.allow_gradient)
        return {"digit": digit, "big": self.heads["big"](zb)}


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
    y_tr = {"digit": d_tr, "big": (d_tr >= 5).astype(np.int32)}
    y_te = {"digit": d_te, "big": (d_te >= 5).astype(np.int32)}

    model = Cascade(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, _ = nnx.split(model, nnx.Param)

    def loss_fn(params, x, y, graphdef=graphdef):
        preds = nnx.merge(graphdef, params)(x)
        return {t: optax.softmax_cross_entropy_with_integer_labels(p, y[t]).mean()
                for t, p in preds.items()}

    method = jmtl.methods.get(args.method)
    grad_fn = jmtl.value_and_mtl_grad(loss_fn, method,
                                      shared=lambda path, leaf: path.startswith("trunk/"))

    @nnx.jit
    def train_step(model, optimizer, method_state, x, y):
        losses, grads, method_state = grad_fn(nnx.state(model, nnx.Param), method_state, x, y)
        optimizer.update(model, grads)
        return losses, method_state

    def accuracies():
        preds = model(jnp.asarray(x_te))
        return {t: float(jnp.mean(jnp.argmax(p, -1) == y_te[t])) for t, p in preds.items()}

    before = accuracies()
    rng = np.random.default_rng(0)
    method_state = grad_fn.init(nnx.state(model, nnx.Param), x_tr, y_tr)
    bar = tqdm(range(steps), desc=f"cascade ({args.method})")
    for i in bar:
        idx = rng.choice(len(x_tr), 128, replace=False)
        losses, method_state = train_step(model, optimizer, method_state, x_tr[idx],
                                          {t: v[idx] for t, v in y_tr.items()})
        if i % 20 == 0 or i == steps - 1:
            bar.set_postfix({t: f"{float(v):.3f}" for t, v in losses.items()})
    after = accuracies()
    for t in before:
        print(f"test accuracy {t:>5}: {before[t]:.3f} -> {after[t]:.3f}")

    # d L_B / d (A's head): zero through the stop-gradient, non-zero without it.
    params = nnx.state(model, nnx.Param)
    for allow in (False, True):
        gdef = nnx.graphdef(Cascade(nnx.Rngs(0), allow_gradient=allow))
        g = jax.grad(lambda p, gdef=gdef: loss_fn(p, x_tr, y_tr, gdef)["big"])(params)
        norm = float(optax.global_norm(g["heads"]["digit"]))
        print(f"|d L_big / d heads.digit| with allow_gradient={allow}: {norm:.3g}")


if __name__ == "__main__":
    main()
