"""``cr_mogm``: CR-MOGM, a moving average of a base method's weights (Zhou et al.)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl.methods import base
from jmtl.methods.mgda import mgda

__all__ = ["cr_mogm", "CRMOGMState"]


class CRMOGMState(NamedTuple):
    """State of :func:`cr_mogm`.

    Attributes:
      lam: ``(K,)`` float32 averaged weights ``λ``.
      seen: ``(K,)`` bool, whether each task has been present at least once.
      base: the base method's state.
    """

    lam: jax.Array
    seen: jax.Array
    base: Any
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


@base.register("cr_mogm", properties=(base.PERMUTATION_EQUIVARIANT, base.SCALE_INVARIANT,
                                      base.JIT_CONSISTENT, base.FINITE, base.ABSENT_TASKS,
                                      base.STATE_PYTREE))
def cr_mogm(method: base.Method | None = None, alpha: float = 0.9) -> base.Method:
    """CR-MOGM: exponentially averaged weights of a stochastic gradient-manipulation method.

    The base method computes weights ``λ̂_k`` from the current (stochastic) gradients; the
    update uses ``λ_k = α λ_{k−1} + (1 − α) λ̂_k`` with ``λ_0 = λ̂_1`` (so the first update
    is the base method's, whatever ``α``). Averaging decorrelates the weights from the
    current mini-batch's noise, which restores convergence of stochastic MGDA-like methods
    (the paper's correlation-reduced MOGM). The paper's Corollary 1 lets ``α_k`` grow toward
    1 as the learning rate decays; ``alpha`` may be a traced value (e.g. an optax schedule,
    ``1 − lr_k / lr_0``).

    Defaults: the base is MGDA, the paper's main instance; ``α = 0.9`` (torchjd's
    ``CRMOGMWeighting``, same convention: ``α`` weighs the previous average).

    Heads receive what the base method gives them (its ``weights_task_specific``, or the
    head weights of a ``base.Output`` it returns). Absent tasks: weight 0, their average
    and the base method's handling of them unchanged; a task seen for the first time
    starts its average at ``λ̂``. The promised properties are those of the default MGDA
    base; another base keeps only the properties it has itself.

    Args:
      method: a weighting :class:`~jmtl.methods.base.Method` (output ``"weights"``);
        ``None`` means ``jmtl.mgda()``.
      alpha: ``α`` in [0, 1], the weight of the previous average (may be traced).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing what the base needs (state
      :class:`CRMOGMState`).

    Raises:
      ValueError: the base is not a weighting method, or ``alpha`` is outside [0, 1].

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.cr_mogm(alpha=0.5)
      >>> state = m.init(2)
      >>> _, state = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
      >>> [round(x, 4) for x in state.lam.tolist()]  # λ₁ = MGDA's weights
      [0.8, 0.2]
      >>> _, state = jmtl.aggregate(m, jnp.array([[2.0, 0.0], [0.0, 1.0]]), state)
      >>> [round(x, 4) for x in state.lam.tolist()]  # ½ (0.8, 0.2) + ½ (0.2, 0.8)
      [0.5, 0.5]

    References:
      Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the Convergence of Stochastic
      Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022.
    """
    inner = mgda() if method is None else method
    if not isinstance(inner, base.Method) or inner.output != base.WEIGHTS:
        raise ValueError(f"method 'cr_mogm': the base must be a weighting method (output "
                         f"'weights'), got {inner!r}")
    if _checks.is_concrete(alpha) and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"method 'cr_mogm': alpha must be in [0, 1], got {alpha}")

    def init(num_tasks: int, dim: int | None = None) -> CRMOGMState:
        return CRMOGMState(lam=jnp.zeros((num_tasks,), jnp.float32),
                           seen=jnp.zeros((num_tasks,), bool),
                           base=inner.init(num_tasks, dim=dim))

    def update(inputs: base.Inputs, state: CRMOGMState):
        present = inputs.present
        out, base_state = inner.update(inputs, state.base)
        heads = None
        if isinstance(out, base.Output):
            out, heads = out.out, out.head_weights
        dtype = jnp.result_type(jnp.float32, out.dtype)
        hat = out.astype(dtype)
        prev = state.lam.astype(dtype)
        a = jnp.asarray(alpha, dtype)
        lam = jnp.where(state.seen, a * prev + (1.0 - a) * hat, hat)
        new_lam = jnp.where(present, lam, prev)
        weights = jnp.where(present, new_lam, 0.0)
        new_state = CRMOGMState(lam=new_lam.astype(state.lam.dtype),
                                seen=state.seen | present, base=base_state)
        if heads is not None:
            return base.Output(weights, heads), new_state
        return weights, new_state

    return base.Method(name="cr_mogm", init=init, update=update, needs=inner.needs,
                       output=base.WEIGHTS, weights_task_specific=inner.weights_task_specific)
