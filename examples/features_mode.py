"""Features mode vs params mode: the same method on the same model, timed.

Ten one-vs-rest tasks on scikit-learn's digits ("is it a 0?", ..., "is it a 9?") share
an MLP trunk 64-256-256 (``jmtl.nn.HardSharing``). ``jmtl.value_and_mtl_grad`` trains
it twice from the same initialisation with the same gradient method:

* **params mode** (``shared=...``): the method sees the per-task Jacobian with respect
  to every trunk parameter, i.e. one backward pass through the trunk per task;
* **features mode** (``encoder=...``): the method sees the Jacobian with respect to the
  trunk's output ``z`` (MGDA-UB, torchjd's ``mtl_backward``), which costs one backward
  pass through the heads per task and a single one through the trunk.

Both train steps are jitted and timed after a warm-up; the script prints the mean loss
before and after training and the time per step of each mode.

    python examples/features_mode.py          # about 20 s on a CPU
    python examples/features_mode.py --fast   # a few steps (smoke test)
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from tqdm import tqdm

import jmtl
from jmtl import nn as mtnn

DEFAULT_METHOD = next(m for m in ("upgrad", "mgda", "imtl_g", "aligned_mtl", "pcgrad")
                      if m in jmtl.methods.names())
TASKS = tuple(f"is_{d}" for d in range(10))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--fast", action="store_true", help="run a few steps only")
    args = parser.parse_args()
    steps = 4 if args.fast else args.steps

    x, digits = load_digits(return_X_y=True)
    x = jnp.asarray(x / 16.0, jnp.float32)
    y = {t: jnp.asarray(digits == d, jnp.float32) for d, t in enumerate(TASKS)}

    rngs = nnx.Rngs(0)
    trunk = nnx.Sequential(nnx.Linear(64, 256, rngs=rngs), nnx.relu,
                           nnx.Linear(256, 256, rngs=rngs), nnx.relu)
    model = mtnn.HardSharing(trunk, {t: nnx.Linear(256, 1, rngs=rngs) for t in TASKS})
    graphdef, params0 = nnx.split(model, nnx.Param)

    def head_losses(params, z, x, y):  # features mode: z -> {task: loss}
        preds = nnx.merge(graphdef, params).decode(z)
        return {t: optax.sigmoid_binary_cross_entropy(p[:, 0], y[t]).mean()
                for t, p in preds.items()}

    def encode(params, x, y):
        return nnx.merge(graphdef, params).encode(x)

    def loss_fn(params, x, y):  # params mode: the whole network
        return head_losses(params, encode(params, x, y), x, y)

    method = jmtl.methods.get(args.method)
    tx = optax.adam(1e-3)
    grad_fns = {
        "params": jmtl.value_and_mtl_grad(loss_fn, method,
                                          shared=lambda path, leaf: path.startswith("trunk/")),
        "features": jmtl.value_and_mtl_grad(head_losses, method, encoder=encode),
    }

    rng = np.random.default_rng(0)
    batches = [(x[i], {t: v[i] for t, v in y.items()})
               for i in (rng.choice(len(x), 256, replace=False) for _ in range(steps))]
    mean_loss = jax.jit(lambda p: jnp.mean(jnp.stack(list(loss_fn(p, x, y).values()))))
    print(f"{args.method}, {len(TASKS)} tasks, batch 256; mean loss before: "
          f"{float(mean_loss(params0)):.4f}")
    for mode, grad_fn in grad_fns.items():

        @jax.jit
        def step(params, opt_state, method_state, x, y, grad_fn=grad_fn):
            losses, grads, method_state = grad_fn(params, method_state, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, method_state

        params, opt_state = params0, tx.init(params0)
        method_state = grad_fn.init(params0, *batches[0])
        jax.block_until_ready(step(params, opt_state, method_state, *batches[0]))  # warm-up
        start = time.perf_counter()
        for xb, yb in tqdm(batches, desc=f"{mode} mode"):
            params, opt_state, method_state = step(params, opt_state, method_state, xb, yb)
        jax.block_until_ready(params)
        ms = 1e3 * (time.perf_counter() - start) / steps
        after = float(mean_loss(params))
        print(f"{mode:>8} mode: {ms:6.2f} ms/step, mean loss after: {after:.4f}")
        assert after < float(mean_loss(params0)), f"{mode} mode: the loss did not go down"


if __name__ == "__main__":
    main()
