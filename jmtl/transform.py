"""``jmtl.as_gradient_transformation``: a balancing method as an optax transformation.

A :class:`~jmtl.methods.base.Method` is *not* an optax ``GradientTransformation``: its
``init`` takes the number of tasks and its ``update`` the method's inputs. This adapter
turns one into an ``optax.GradientTransformationExtraArgs`` that maps a per-task Jacobian
pytree to the aggregated update, so it composes with ``optax.chain`` like any other
transformation. (Putting a bare Method in ``optax.chain`` fails at ``init`` with a
``TypeError`` pointing here.)

It also exports :func:`irprop`, the sign-based optimizer ``jmtl.gradnorm`` trains its
weights with, for loops that train GradNorm weights on :func:`jmtl.objectives.gradnorm`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from jmtl._aggregate import aggregate
from jmtl.methods import base
from jmtl.methods._schedule import irprop

__all__ = ["as_gradient_transformation", "irprop"]


def as_gradient_transformation(method: base.Method, num_tasks: int
                               ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``method`` as an optax transformation of per-task Jacobians.

    ``init(params)`` returns ``method.init(num_tasks, dim)`` (``dim``: the number of
    entries of ``params``, for the methods with per-parameter state). ``update(jacobian,
    state, params=None, *, losses=None, key=None, present=None)`` takes a pytree like
    ``params`` whose every leaf has a leading task axis of size ``num_tasks`` (row ``i``:
    the gradient of task ``i``'s loss) and returns ``jmtl.aggregate(method, jacobian,
    state, ...)``: the aggregated update, shaped like ``params``, and the new state.
    ``losses``, ``key`` and ``present`` are optax extra arguments, passed to every
    transformation of an ``optax.chain`` that accepts them.

    Args:
      method: a balancing method, e.g. ``jmtl.upgrad()``.
      num_tasks: the number of tasks K.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its output is the *ascent* direction
      (like a gradient): follow it with an optimizer, e.g. ``optax.sgd``.

    Raises:
      TypeError: ``method`` is not a Method, or ``num_tasks`` not an integer.
      ValueError: at ``update``, a Jacobian leaf without the leading task axis, or what
        :func:`jmtl.aggregate` raises (missing losses or key, wrong state).

    Examples:
      >>> import jax.numpy as jnp, optax, jmtl
      >>> tx = optax.chain(jmtl.as_gradient_transformation(jmtl.mean(), num_tasks=2),
      ...                  optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> jac = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
      >>> updates, state = tx.update(jac, state, params)
      >>> [round(x, 4) for x in updates["w"].tolist()]  # -0.1 * mean of the rows
      [-0.05, -0.15]
    """
    if not isinstance(method, base.Method):
        raise TypeError(f"as_gradient_transformation: expected a jmtl Method (e.g. "
                        f"jmtl.upgrad()), got {type(method).__name__}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)):
        raise TypeError(f"as_gradient_transformation: num_tasks must be an int, got "
                        f"{num_tasks!r}")
    k = int(num_tasks)

    def init_fn(params: Any) -> Any:
        dim = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
        return method.init(k, dim)

    def update_fn(updates: Any, state: Any, params: Any = None, *, losses: Any = None,
                  key: jax.Array | None = None, present: Any = None,
                  **extra_args: Any) -> tuple[Any, Any]:
        del params, extra_args
        for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != k:
                raise ValueError(
                    f"as_gradient_transformation({method.name}): every leaf of the Jacobian "
                    f"needs a leading task axis of size {k}; leaf "
                    f"{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}")
        return aggregate(method, updates, state, losses=losses, key=key, present=present)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
