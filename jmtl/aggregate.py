"""``jmtl.aggregate``: one balancing step on an explicit Jacobian."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jmtl import jacobian as jac_lib
from jmtl import tasks as tasks_lib
from jmtl.methods import base

__all__ = ["aggregate", "method_inputs", "apply_output"]


def method_inputs(method: base.Method, *, k: int, present: Any = None, losses: Any = None,
                  key: jax.Array | None = None, gramian: jax.Array | None = None,
                  jacobian: jax.Array | None = None,
                  grad_norms: jax.Array | None = None,
                  scale: jax.Array | None = None) -> base.Inputs:
    """Validates what ``method`` needs and packs it into :class:`~jmtl.methods.base.Inputs`.

    Raises:
      ValueError: a required argument is missing (naming the method and the argument),
        or a per-task argument has the wrong number of tasks.
    """
    needs = method.needs
    if base.LOSSES in needs and losses is None:
        raise ValueError(f"method '{method.name}' needs `losses` (per-task loss values)")
    if base.KEY in needs and key is None:
        raise ValueError(f"method '{method.name}' needs `key` (a PRNG key) for its randomness")
    if present is None:
        mask = jnp.ones((k,), bool)
    else:
        mask = tasks_lib.as_task_vector(present, k, what="present", method=method.name,
                                        dtype=bool)
    loss_vec = None
    if base.LOSSES in needs:
        loss_vec = tasks_lib.as_task_vector(losses, k, what="losses", method=method.name)
    return base.Inputs(
        present=mask,
        losses=loss_vec,
        gramian=gramian if base.GRAMIAN in needs else None,
        jacobian=jacobian if base.JACOBIAN in needs else None,
        grad_norms=grad_norms if base.GRAD_NORMS in needs else None,
        key=key if base.KEY in needs else None,
        scale=scale if base.GRAMIAN in needs else None,
    )


def apply_output(method: base.Method, out: jax.Array, jacobian: Any) -> Any:
    """Turns a method's output (weights or direction) into an update like one row."""
    if method.output == "weights":
        return jac_lib.combine(out, jacobian)
    if method.output == "direction":
        return jac_lib.unflatten_row(out, jacobian)
    raise ValueError(f"method '{method.name}': unknown output kind {method.output!r}")


def aggregate(method: base.Method, jacobian: Any, state: Any, *, losses: Any = None,
              key: jax.Array | None = None, present: Any = None) -> tuple[Any, Any]:
    """One aggregation step of ``method`` on an explicit Jacobian.

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

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.ew()
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 3.0]]), m.init(2))
      >>> update.tolist()
      [1.0, 3.0]
    """
    k = jac_lib.num_rows(jacobian)
    needs = method.needs
    if present is not None:
        # An absent task's row (possibly NaN: its loss had no labels) must not leak into
        # the Gramian or the combination, even with weight 0 (0 * NaN = NaN).
        mask = tasks_lib.as_task_vector(present, k, what="present", method=method.name,
                                        dtype=bool)
        jacobian = jax.tree_util.tree_map(
            lambda leaf: jnp.where(jnp.reshape(mask, (k,) + (1,) * (leaf.ndim - 1)), leaf, 0),
            jacobian)
    flat = None
    if base.JACOBIAN in needs or method.output == "direction":
        flat = jac_lib.flatten_rows(jacobian)
    gram = scale = None
    if base.GRAMIAN in needs or base.GRAD_NORMS in needs:
        gram, scale = jac_lib.scaled_gramian(jacobian)
    norms = None
    if base.GRAD_NORMS in needs:
        norms = jnp.sqrt(jnp.clip(jnp.diag(gram), 0.0)) * scale
    inputs = method_inputs(method, k=k, present=present, losses=losses, key=key, gramian=gram,
                           jacobian=flat, grad_norms=norms, scale=scale)
    out, new_state = method.update(inputs, state)
    return apply_output(method, out, jacobian), new_state
