"""ExcessMTL (robust multi-task learning with excess risks)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl.methods import base
from jmtl.methods.db_mtl import check_dim, require_dim
from jmtl.methods.gradnorm import renormalise_present

__all__ = ["excess_mtl", "ExcessMTLState"]


class ExcessMTLState(NamedTuple):
    """State of :func:`excess_mtl`.

    Attributes:
      weights: ``(K,)`` float32 task weights (sum to K).
      root_sq_sum: ``(K, dim)`` float32 root of the accumulated squared gradients,
        ``√(Σ_t g_t²)`` per parameter (kept as a root so that it does not overflow).
      initial_risk: ``(K,)`` float32 each task's first excess-risk estimate.
      seen: ``(K,)`` bool, whether task ``i`` has been present at least once.
    """

    weights: jax.Array
    root_sq_sum: jax.Array
    initial_risk: jax.Array
    seen: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


@base.register("excess_mtl", properties=(
    "permutation_equivariant", "jit_consistent", "finite", "absent_tasks", "state_pytree"))
def excess_mtl(step_size: float = 1e-2, eps: float = 1e-7) -> base.Method:
    """ExcessMTL: up-weight the tasks with the largest estimated excess risk.

    Each task keeps a diagonal curvature estimate, the AdaGrad-style accumulator
    ``s_i ← s_i + g_i²`` with ``H_i = diag(√(s_i + eps))``. Its excess risk is
    estimated by ``r_i = g_iᵀ H_i⁻¹ g_i`` and compared with the task's first estimate,
    ``ρ_i = r_i / r_i(0)``. The weights take an exponentiated-gradient step,
    ``w_i ← w_i exp(η ρ_i)``, renormalised to sum to K, and the *updated* weights
    weight the losses of this step (as in the authors' code and LibMTL).

    On a task's first step ``ρ_i = 1``; with every task new (the first step) the
    weights stay at 1, as in the reference code. A zero initial estimate gives
    ``ρ_i = 0``. Absent tasks keep their statistics and weight in the state (the
    present tasks' weights are renormalised to their previous total) and get
    weight 0 in the output. The exponent is shifted by its maximum before ``exp``,
    so the step cannot overflow.

    Args:
      step_size: ``η`` of the exponentiated-gradient step (LibMTL's
        ``robust_step_size`` default 1e-2).
      eps: added to the accumulated squares under the square root (reference code's
        ``1e-7``).

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs the Jacobian; output ``"weights"``;
      state :class:`ExcessMTLState`, built by ``init(num_tasks, dim)``;
      ``weights_task_specific=True``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.excess_mtl()
      >>> J = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> _, state = jmtl.aggregate(m, J, m.init(2, 2))
      >>> state.weights.tolist()  # the first step only records r_i(0)
      [1.0, 1.0]
      >>> J2 = jnp.array([[2.0, 0.0], [0.0, 1.0]])  # task 0's risk grew
      >>> _, state = jmtl.aggregate(m, J2, state)
      >>> state.weights[0] > state.weights[1]
      Array(True, dtype=bool)

    References:
      He, Zhou, Zhao, Wang & Tong, "Robust Multi-Task Learning with Excess Risks",
      ICML 2024.
    """
    if step_size < 0 or eps <= 0:
        raise ValueError(f"method 'excess_mtl': need step_size >= 0 and eps > 0, got "
                         f"step_size={step_size}, eps={eps}")

    def init(num_tasks: int, dim: int | None = None) -> ExcessMTLState:
        dim = require_dim("excess_mtl", dim)
        return ExcessMTLState(weights=jnp.ones((num_tasks,), jnp.float32),
                              root_sq_sum=jnp.zeros((num_tasks, dim), jnp.float32),
                              initial_risk=jnp.zeros((num_tasks,), jnp.float32),
                              seen=jnp.zeros((num_tasks,), bool))

    def update(inputs: base.Inputs, state: ExcessMTLState):
        jac = inputs.jacobian
        check_dim("excess_mtl", jac, state.root_sq_sum)
        present = inputs.present
        dtype = jnp.result_type(jnp.float32, jac.dtype)
        grads = jac.astype(dtype)
        old_root = state.root_sq_sum.astype(dtype)
        root = jnp.where(present[:, None], jnp.hypot(old_root, grads), old_root)
        # h = √(Σg² + eps) = hypot(root, √eps); g·(g/h) stays finite when g² overflows.
        h = jnp.hypot(root, jnp.sqrt(jnp.asarray(eps, dtype)))
        risk = jnp.sum(grads * (grads / h), axis=1)
        first = present & ~state.seen
        r0 = jnp.where(first, risk, state.initial_risk.astype(dtype))
        ratio = jnp.where(r0 > 0, risk / jnp.where(r0 > 0, r0, 1), 0)
        ratio = jnp.clip(ratio, 0, jnp.finfo(dtype).max)
        expo = jnp.where(present, step_size * ratio, 0)
        factor = jnp.exp(expo - jnp.max(expo))
        w = state.weights.astype(dtype)
        new_w = renormalise_present(w * factor, w, present)

        out = jnp.where(present, new_w, 0)
        new_state = ExcessMTLState(
            weights=new_w.astype(state.weights.dtype),
            root_sq_sum=root.astype(state.root_sq_sum.dtype),
            initial_risk=r0.astype(state.initial_risk.dtype),
            seen=state.seen | present)
        return out, new_state

    return base.Method(name="excess_mtl", init=init, update=update,
                       needs=frozenset({base.JACOBIAN}), output="weights",
                       weights_task_specific=True)
