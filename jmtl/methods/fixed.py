"""Fixed weightings: ``ew`` (equal weights), ``weighted``, ``mean`` and ``sum``.

Absent tasks (``present == False``) get weight 0 in every method of jmtl.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jmtl import tasks as tasks_lib
from jmtl.methods import base

__all__ = ["ew", "weighted", "mean", "sum_"]


def _constant(name: str, weight_fn, *, weights_task_specific: bool) -> base.Method:
    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState):
        present = inputs.present
        return weight_fn(present).astype(jnp.float32), state

    return base.Method(name=name, init=init, update=update, needs=frozenset(),
                       weights_task_specific=weights_task_specific)


@base.register("ew", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks"))
def ew() -> base.Method:
    """Equal weighting: minimise the plain sum of the task losses (``w_i = 1``).

    The baseline every MTL paper compares against (LibMTL's ``EW``).

    Returns:
      A :class:`~jmtl.methods.base.Method` with weights 1 for present tasks, 0 otherwise.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.ew()
      >>> jmtl.aggregate(m, jnp.eye(2), m.init(2))[0].tolist()
      [1.0, 1.0]

    References:
      Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023.
    """
    return _constant("ew", lambda p: p.astype(jnp.float32), weights_task_specific=True)


@base.register("weighted", properties=(
    "scale_invariant", "linear_under_scaling", "jit_consistent", "finite", "absent_tasks"))
def weighted(weights: Sequence[float] | Any = None) -> base.Method:
    """Fixed, user-given task weights: minimise ``sum_i w_i L_i``.

    Args:
      weights: a ``(K,)`` sequence or ``{task: weight}`` (stacked in sorted-key order).
        Required.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.weighted({"a": 1.0, "b": 0.5})
      >>> jmtl.aggregate(m, jnp.eye(2), m.init(2))[0].tolist()
      [1.0, 0.5]

    References:
      Caruana, "Multitask Learning", Machine Learning 28, 1997.
    """
    if weights is None:
        raise TypeError("method 'weighted' needs `weights` (a sequence or {task: weight})")
    w = np.asarray(tasks_lib.stack(weights if isinstance(weights, dict) else
                                   jnp.asarray(weights, jnp.float32), what="weighted: `weights`"),
                   np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"method 'weighted': weights must be finite, got {w.tolist()}")

    def weight_fn(present):
        if present.shape[0] != w.shape[0]:
            raise ValueError(
                f"method 'weighted': {w.shape[0]} weights given for {present.shape[0]} tasks")
        return jnp.where(present, jnp.asarray(w), 0.0)

    return _constant("weighted", weight_fn, weights_task_specific=True)


@base.register("mean", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks"))
def mean() -> base.Method:
    """The mean of the task gradients (torchjd's ``Mean``): ``w_i = 1 / K_present``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.mean()
      >>> jmtl.aggregate(m, jnp.eye(2), m.init(2))[0].tolist()
      [0.5, 0.5]

    References:
      Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (torchjd).
    """
    def weight_fn(present):
        p = present.astype(jnp.float32)
        return p / jnp.maximum(jnp.sum(p), 1.0)

    return _constant("mean", weight_fn, weights_task_specific=False)


@base.register("sum", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks"))
def sum_() -> base.Method:
    """The sum of the task gradients (torchjd's ``Sum``): ``w_i = 1``.

    Unlike ``ew``, task-specific parameters receive their own unweighted gradient (the
    same numbers, since ``w_i = 1``); ``sum`` is listed with the gradient aggregators.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.methods.get("sum")
      >>> jmtl.aggregate(m, jnp.eye(2), m.init(2))[0].tolist()
      [1.0, 1.0]

    References:
      Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (torchjd).
    """
    return _constant("sum", lambda p: p.astype(jnp.float32), weights_task_specific=False)
