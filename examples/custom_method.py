"""Recipe: write your own balancing method, register it, and test it with jmtl.testing.

A method is a ``jmtl.methods.Method``: ``init(num_tasks, dim=None)`` returns its state
(a NamedTuple of arrays; stateless methods use ``base.stateless_init``) and
``update(inputs, state)`` maps what it declared in ``needs`` (here the Gramian) to
``(K,)`` task weights and the new state. ``@jmtl.methods.register(name,
properties=...)`` makes it available as ``jmtl.methods.get(name)`` and declares what it
promises; ``jmtl.testing.check_method`` then checks those promises on generated
Jacobians (degenerate ones and |J| from 1e-20 to 1e20 included).

The method here, ``unit_sum``, adds the tasks' unit gradients: ``w_i = 1 / |J_i|``
(0 for a zero or absent row). Its direction ignores a global scale, but its length does
not grow with it, so it does not promise ``linear_under_scaling``; it may point against
a task, so it does not promise ``non_conflicting``.

Two broken methods show what the failures look like: one that follows task 0 only
(fails ``non_conflicting`` and ``permutation_equivariant``) and one that draws its
weights with Python's ``random`` (fails ``jit_consistent``: under ``jit`` the draw is
frozen into the compiled graph).

    python examples/custom_method.py          # a few seconds
    python examples/custom_method.py --fast   # the same (smoke test)
"""

import argparse
import json
import random

import jax.numpy as jnp

import jmtl
from jmtl.methods import base

PROMISED = ("permutation_equivariant", "scale_invariant", "jit_consistent", "finite",
            "absent_tasks")


@jmtl.methods.register("unit_sum", properties=PROMISED)
def unit_sum() -> base.Method:
    """Sum of the tasks' unit gradients: ``w_i = 1 / |J_i|``, 0 for zero or absent rows."""

    def update(inputs: base.Inputs, state):
        # inputs.gramian is J Jᵀ / s² (pre-scaled so float32 neither overflows nor
        # underflows); the row norms are sqrt(diag) * s.
        sq = jnp.diag(inputs.gramian)
        ok = inputs.present & (sq > 0)
        norms = jnp.sqrt(jnp.where(ok, sq, 1.0)) * base.gram_scale(inputs)
        return jnp.where(ok, 1.0 / norms, 0.0), state

    return base.Method(name="unit_sum", init=base.stateless_init, update=update,
                       needs=frozenset({base.GRAMIAN}), output=base.WEIGHTS,
                       weights_task_specific=False)


def follow_first() -> base.Method:
    """Broken on purpose: all the weight on task 0."""
    return base.Method(
        name="follow_first", init=base.stateless_init, needs=frozenset(),
        update=lambda inputs, state: (
            jnp.zeros(inputs.present.shape).at[0].set(1.0) * inputs.present, state))


def python_random() -> base.Method:
    """Broken on purpose: Python-side randomness (frozen by jit)."""

    def update(inputs, state):
        w = jnp.asarray([random.uniform(0.5, 1.5) for _ in range(inputs.present.shape[0])])
        return w * inputs.present, state

    return base.Method(name="python_random", init=base.stateless_init, update=update,
                       needs=frozenset())


def failures(method, properties) -> dict:
    """``{property: first line of the AssertionError}`` for the properties that fail."""
    out = {}
    for prop in properties:
        try:
            jmtl.testing.check_method(method, properties=prop)
        except AssertionError as err:
            out[prop] = str(err).splitlines()[0]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="same run (smoke test)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    args = parser.parse_args(argv)

    method = jmtl.methods.get("unit_sum")
    passed = jmtl.testing.check_method(method)  # the declared properties
    print(f"{method!r} has {', '.join(passed)}")
    report = {"unit_sum": list(passed)}
    for broken, props in ((follow_first(), ("non_conflicting", "permutation_equivariant",
                                            "finite")),
                          (python_random(), ("jit_consistent", "finite"))):
        failed = failures(broken, props)
        for message in failed.values():
            print(f"expected failure: {message[:160]}...")
        report[broken.name] = sorted(failed)
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
