"""``jmtl.aggregate``: one balancing step on an explicit Jacobian."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _method_call
from jmtl import jacobian as jac_lib
from jmtl import tasks as tasks_lib
from jmtl.methods import base

__all__ = ["aggregate", "present_vector"]


def present_vector(present: Any, k: int, *, method: str, like: Any = None) -> jax.Array:
    """``(K,)`` bool mask from ``present`` (``None``: all tasks).

    Raises:
      ValueError: ``present`` is floating point (give bools or label counts), has the
        wrong number of tasks, or names tasks other than those of ``like`` (a per-task
        pytree such as the losses).
    """
    if present is None:
        return jnp.ones((k,), bool)
    if isinstance(present, Mapping) and isinstance(like, Mapping):
        given, expected = set(map(str, present)), set(map(str, like))
        if given != expected:
            raise ValueError(
                f"method '{method}': `present` names tasks {sorted(given)} but the losses' "
                f"tasks are {sorted(expected)}: unknown {sorted(given - expected)}, missing "
                f"{sorted(expected - given)}")
    for leaf in jax.tree_util.tree_leaves(present):
        if not isinstance(leaf, str) and jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"method '{method}': `present` must be bools (or label counts), "
                             f"got {jnp.result_type(leaf)}")
    return tasks_lib.as_task_vector(present, k, what="present", method=method, dtype=bool)


def aggregate(method: base.Method, jacobian: Any, state: Any, *, losses: Any = None,
              key: jax.Array | None = None, present: Any = None) -> tuple[Any, Any]:
    """One aggregation step of ``method`` on an explicit Jacobian.

    The Gramian is formed from rows pre-scaled by a power of two
    (:func:`jmtl.jacobian.scaled_gramian`), so it is finite for |J| from 1e-20 to 1e20 in
    float32. A step whose present tasks' inputs are not finite raises a ``ValueError``
    naming the tasks when the values are concrete; under ``jit`` it returns the old
    state (see :mod:`jmtl._method_call`). With no task (K = 0) the update is zero.

    Args:
      method: a :class:`~jmtl.methods.base.Method`, e.g. ``jmtl.upgrad()``.
      jacobian: a pytree whose leaves have a leading task axis of size K (a ``(K, d)``
        array is one). Row ``i`` is the gradient of task ``i``'s loss.
      state: the method's state, from ``method.init(K)``.
      losses: ``(K,)`` array or ``{task: scalar}``; required by loss-based methods.
      key: a PRNG key; required by randomised methods (``rlw``, ``pcgrad``, ...).
      present: ``(K,)`` bool mask or ``{task: bool}`` of tasks labelled in the batch
        (default: all).

    Returns:
      ``(update, new_state)``: ``update`` has the structure of one row of ``jacobian``;
      for a weighting method it is ``sum_i w_i J_i``.

    Raises:
      ValueError: a state of another method or number of tasks, ``present`` naming other
        tasks than ``losses``, a missing input the method needs.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.ew()
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 3.0]]), m.init(2))
      >>> update.tolist()
      [1.0, 3.0]
    """
    if not isinstance(method, base.Method):
        raise TypeError(f"aggregate: `method` must be a jmtl Method (e.g. jmtl.upgrad()), got "
                        f"{type(method).__name__}")
    k = jac_lib.num_rows(jacobian)
    needs = method.needs
    if k == 0:
        # No task: nothing to balance, the same answer for every method.
        return jax.tree_util.tree_map(lambda x: jnp.zeros(np.shape(x)[1:], x.dtype),
                                      jacobian), state
    mask = present_vector(present, k, method=method.name, like=losses)
    if present is not None:
        # An absent task's row (possibly NaN: its loss had no labels) must not leak into
        # the Gramian or the combination, even with weight 0 (0 * NaN = NaN).
        jacobian = jax.tree_util.tree_map(
            lambda leaf: jnp.where(jnp.reshape(mask, (k,) + (1,) * (leaf.ndim - 1)), leaf, 0),
            jacobian)
    flat = None
    if base.JACOBIAN in needs or method.output == base.DIRECTION:
        flat = jac_lib.flatten_rows(jacobian)
    gram = scale = norms = None
    if base.GRAMIAN in needs or base.GRAD_NORMS in needs:
        gram, scale = jac_lib.scaled_gramian(jacobian)
    if base.GRAD_NORMS in needs:
        norms = jnp.sqrt(jnp.clip(jnp.diag(gram), 0.0)) * scale
    inputs = _method_call.method_inputs(method, k=k, present=mask, losses=losses, key=key,
                                        gramian=gram, jacobian=flat, grad_norms=norms,
                                        scale=scale)
    dim = sum(int(np.prod(np.shape(x)[1:], dtype=np.int64))
              for x in jax.tree_util.tree_leaves(jacobian))
    names = tuple(tasks_lib.task_names(losses)) if isinstance(losses, Mapping) else None
    called = _method_call.call(method, inputs, state, dim=dim, names=names)
    return _method_call.apply_output(method, called.out, jacobian), called.state
