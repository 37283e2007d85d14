"""Log-based loss weightings: ``gls`` (geometric mean) and ``si`` (sum of log-losses).

Both are the gradients of a scale-invariant objective w.r.t. the task losses, so they
need positive losses. With concrete losses (eager ``jmtl.aggregate``) a zero or negative
loss of a present task raises a ``ValueError`` naming the task; under ``jit`` the check
is a runtime check raised by :func:`jmtl.checked`, and the losses are clamped to the
smallest positive normal number so that the output stays finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl import _checks
from jmtl.methods import base

__all__ = ["gls", "si"]


def _log_losses(name: str, inputs: base.Inputs) -> tuple[jax.Array, jax.Array]:
    """``(log L, present)`` with absent tasks' losses replaced by 1 and a positivity check."""
    present = inputs.present
    losses = inputs.losses
    dtype = jnp.result_type(jnp.float32, losses.dtype)
    losses = losses.astype(dtype)
    _checks.check_positive(losses, method=name, what="losses", where=present)
    tiny = jnp.finfo(dtype).tiny
    safe = jnp.where(present & (losses > tiny), losses, jnp.where(present, tiny, 1.0))
    safe = jnp.where(jnp.isnan(safe), 1.0, safe)
    return jnp.log(safe), present


def _stateless(name: str, weight_fn) -> base.Method:
    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState) -> tuple[jax.Array, base.EmptyState]:
        log_l, present = _log_losses(name, inputs)
        return weight_fn(log_l, present), state

    return base.Method(name=name, init=init, update=update, needs=frozenset({base.LOSSES}),
                       weights_task_specific=True)


@base.register("gls", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks"))
def gls() -> base.Method:
    """Geometric loss strategy: minimise the geometric mean of the task losses.

    The weights are the gradient of ``G = (prod_i L_i)^(1/K)`` w.r.t. the losses,
    ``w_i = G / (K L_i)``, computed in log space (finite for losses of any scale). The
    geometric mean runs over the present tasks (``K = K_present``); absent tasks get
    weight 0. See :func:`jmtl.objectives.geometric_mean` for the objective itself.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing positive ``losses``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.gls()
      >>> w, _ = m.update(jmtl.methods.Inputs(jnp.array([True, True]),
      ...                                     jnp.array([2.0, 8.0])), m.init(2))
      >>> w.tolist()  # G = 4: (4 / (2 * 2), 4 / (2 * 8))
      [1.0, 0.25]

    References:
      Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature
      Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops
      2019.
    """

    def weight_fn(log_l, present):
        dtype = log_l.dtype
        k = jnp.maximum(jnp.sum(present), 1).astype(dtype)
        log_g = jnp.sum(jnp.where(present, log_l, 0.0)) / k
        w = jnp.exp(log_g - log_l) / k
        return jnp.where(present, w, 0.0)

    return _stateless("gls", weight_fn)


@base.register("si", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks"))
def si() -> base.Method:
    """Scale-invariant weighting: minimise ``sum_i log L_i``, i.e. ``w_i = 1 / L_i``.

    Multiplying a task's loss by a constant leaves the model's gradient unchanged.
    Absent tasks get weight 0. See :func:`jmtl.objectives.log_sum` for the objective.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing positive ``losses``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.si()
      >>> w, _ = m.update(jmtl.methods.Inputs(jnp.array([True, True]),
      ...                                     jnp.array([2.0, 0.5])), m.init(2))
      >>> w.tolist()
      [0.5, 2.0]

    References:
      Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (the SI
      baseline); LibMTL (Lin & Zhang, JMLR 2023).
    """

    def weight_fn(log_l, present):
        return jnp.where(present, jnp.exp(-log_l), 0.0)

    return _stateless("si", weight_fn)
