"""``uw``: uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl import objectives
from jmtl.methods import base

__all__ = ["uw", "UWState"]


class UWState(NamedTuple):
    """State of :func:`uw`.

    Attributes:
      log_vars: ``(K,)`` float32 log-variances ``s_i = log σ_i²``.
    """

    log_vars: jax.Array


@base.register("uw", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def uw(lr: float = 1e-2, kind: str = "log_variance", init_log_var: float = 0.0
       ) -> base.Method:
    """Uncertainty weighting: learn one homoscedastic noise scale per task.

    The objective is :func:`jmtl.objectives.uncertainty` with the given ``kind``; with
    the default ``"log_variance"`` it is ``sum_i exp(-s_i) L_i + s_i`` where
    ``s_i = log σ_i²``. The weight of task ``i`` is the factor multiplying ``L_i``:
    ``exp(-s_i)`` for ``"log_variance"`` and ``"classification"``, ``exp(-s_i) / 2`` for
    ``"regression"`` and ``"revised"``.

    The log-variances live in the method state. Each ``update`` returns the weights from
    the current ``s`` and then takes one plain SGD step on ``s`` with the objective's
    closed-form gradient (for ``"log_variance"``: ``1 - exp(-s_i) L_i``), which is what
    training ``s`` jointly with the model by SGD at learning rate ``lr`` does. The
    fixed point is ``σ_i² = L_i`` (``"log_variance"``), i.e. ``w_i = 1 / L_i`` at
    equilibrium. To train ``s`` with another optimiser (Adam, as in most code), use
    :func:`jmtl.objectives.uncertainty` directly in the loss function instead.

    Plain SGD on ``s`` is only stable while ``lr * exp(-s) * L`` stays below about 1:
    normalise losses of very large scale or lower ``lr``.

    Absent tasks: weight 0 and ``s_i`` unchanged.

    Args:
      lr: SGD learning rate of the log-variances (the paper trains them jointly with
        the network and gives no separate value).
      kind: one of ``"log_variance"`` (default), ``"regression"``, ``"classification"``,
        ``"revised"``; see :func:`jmtl.objectives.uncertainty`.
      init_log_var: initial ``s_i`` (0: ``σ = 1``, all weights equal).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.uw(lr=0.1)
      >>> state = m.init(2)
      >>> w, state = m.update(jmtl.methods.Inputs(present=jnp.array([True, True]),
      ...                     losses=jnp.array([3.0, 1.0])), state)
      >>> w.tolist()  # exp(-0)
      [1.0, 1.0]
      >>> [round(x, 4) for x in state.log_vars.tolist()]  # s - 0.1 * (1 - L)
      [0.2, 0.0]

    References:
      Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
      Scene Geometry and Semantics", CVPR 2018.
    """
    if kind not in objectives.UNCERTAINTY_KINDS:
        raise ValueError(f"method 'uw': unknown kind {kind!r}; valid kinds are "
                         f"{', '.join(repr(x) for x in objectives.UNCERTAINTY_KINDS)}")
    if not lr >= 0:
        raise ValueError(f"method 'uw': lr must be non-negative, got {lr}")
    half = kind in ("regression", "revised")

    def init(num_tasks: int, dim: int | None = None) -> UWState:
        del dim
        return UWState(log_vars=jnp.full((num_tasks,), init_log_var, jnp.float32))

    def update(inputs: base.Inputs, state: UWState) -> tuple[jax.Array, UWState]:
        present = inputs.present
        losses = inputs.losses
        dtype = jnp.result_type(losses.dtype, state.log_vars.dtype)
        s = state.log_vars.astype(dtype)
        safe = jnp.where(present, losses.astype(dtype), 0.0)
        terms_grad = jax.grad(lambda s_: objectives.uncertainty(safe, s_, kind=kind))(s)
        factor = jnp.exp(-s) * (0.5 if half else 1.0)
        weights = jnp.where(present, factor, 0.0)
        new_s = jnp.where(present, s - lr * terms_grad, s)
        return weights, UWState(log_vars=new_s.astype(state.log_vars.dtype))

    return base.Method(name="uw", init=init, update=update, needs=frozenset({base.LOSSES}),
                       weights_task_specific=True,
                       hparams=(("lr", lr), ("kind", kind), ("init_log_var", init_log_var)))
