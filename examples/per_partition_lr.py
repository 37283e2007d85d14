"""Per-partition learning rates and a step budget with ``jmtl.optim``.

A Flax NNX model on scikit-learn's digits: a shared trunk and two heads, the digit
(10 classes) and its parity. ``jmtl.optim.label_tree`` labels every parameter by its
path, and ``jmtl.optim.partitioned_lr`` builds one ``optax.partition`` of Adam
optimizers with its own learning rate per label: trunk 1e-3, digit head 1e-2, parity
head 3e-3. ``budgets={"parity": N}`` freezes the parity head after N updates (its
updates become exactly zero), while the trunk and the digit head keep training. The
script prints how much each part moved before and after the freeze.

    python examples/per_partition_lr.py          # about 10 s on a CPU
    python examples/per_partition_lr.py --fast   # a few steps (smoke test)
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
from jmtl import optim


class Net(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Sequential(nnx.Linear(64, 64, rngs=rngs), nnx.relu)
        self.heads = nnx.Dict(digit=nnx.Linear(64, 10, rngs=rngs),
                              parity=nnx.Linear(64, 2, rngs=rngs))

    def __call__(self, x):
        z = self.trunk(x)
        return {t: head(z) for t, head in self.heads.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--freeze-after", type=int, default=100)
    parser.add_argument("--fast", action="store_true", help="run a few steps only")
    args = parser.parse_args()
    steps, freeze = (6, 3) if args.fast else (args.steps, args.freeze_after)

    x, digits = load_digits(return_X_y=True)
    x = jnp.asarray(x / 16.0, jnp.float32)
    y = {"digit": jnp.asarray(digits), "parity": jnp.asarray(digits % 2)}

    model = Net(nnx.Rngs(0))
    labels = optim.label_tree(model, {"trunk": "trunk", "heads/digit": "digit",
                                      "heads/parity": "parity"})
    tx = optim.partitioned_lr(optax.adam, {"trunk": 1e-3, "digit": 1e-2, "parity": 3e-3},
                              labels, budgets={"parity": freeze})
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, _ = nnx.split(model, nnx.Param)

    def loss_fn(params, x, y):
        preds = nnx.merge(graphdef, params)(x)
        return {t: optax.softmax_cross_entropy_with_integer_labels(p, y[t]).mean()
                for t, p in preds.items()}

    method = jmtl.mean()
    grad_fn = jmtl.value_and_mtl_grad(loss_fn, method,
                                      shared=lambda path, leaf: path.startswith("trunk/"))

    @nnx.jit
    def train_step(model, optimizer, x, y):
        losses, grads, _ = grad_fn(nnx.state(model, nnx.Param), method.init(2), x, y)
        optimizer.update(model, grads)
        return losses

    def snapshot():
        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # plain arrays: a copy
        return {"trunk": state["trunk"], "heads/digit": state["heads"]["digit"],
                "heads/parity": state["heads"]["parity"]}

    def moved(a, b):
        return {k: float(optax.global_norm(jax.tree.map(lambda u, v: u - v, a[k], b[k])))
                for k in a}

    rng = np.random.default_rng(0)
    first = snapshot()
    bar = tqdm(range(steps), desc="per-partition Adam")
    for i in bar:
        if i == freeze:
            at_freeze = snapshot()
        idx = rng.choice(len(x), 128, replace=False)
        losses = train_step(model, optimizer, x[idx], {t: v[idx] for t, v in y.items()})
        bar.set_postfix({t: f"{float(v):.3f}" for t, v in losses.items()})
    last = snapshot()

    before, after = moved(at_freeze, first), moved(last, at_freeze)
    print(f"parameter change (L2 norm) in steps [0, {freeze}) and [{freeze}, {steps}):")
    for part in first:
        print(f"  {part:<13} {before[part]:8.4f} {after[part]:8.4f}")
    assert after["heads/parity"] == 0.0, "the frozen head moved"
    print(f"the parity head is frozen after {freeze} steps: it no longer changes; last losses "
          + ", ".join(f"{t} {float(v):.3f}" for t, v in losses.items()))


if __name__ == "__main__":
    main()
