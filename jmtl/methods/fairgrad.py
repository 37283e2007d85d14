"""``fairgrad``: α-fair resource allocation between tasks (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers import alpha_fair

__all__ = ["fairgrad"]


@base.register("fairgrad", properties=(
    "non_conflicting", "permutation_equivariant", "scale_invariant", "jit_consistent",
    "finite", "absent_tasks"))
def fairgrad(alpha: float = 1.0, max_iter: int = 100, tol: float | None = None
             ) -> base.Method:
    """FairGrad: the update that maximises the α-fair utility of the tasks' improvements.

    Each task's "utility" is its first-order loss decrease ``g_iᵀ d``. FairGrad chooses
    ``d = sum_i w_i g_i`` maximising ``sum_i (g_iᵀ d)^{1-α} / (1-α)`` (``log`` for α = 1)
    in a ball, whose optimality condition is ``G w = w^{-1/α}`` with ``w > 0``. The paper
    solves it with ``scipy.optimize.least_squares``; here it is solved in the graph by
    damped Newton iterations on an equivalent strictly convex problem
    (:func:`jmtl.solvers.alpha_fair_weights`), to the floating-point floor.

    α = 0 is linear scalarisation, α = 1 proportional fairness (Nash-MTL's condition
    ``G w = 1 / w``), α = 2 minimum potential delay, α → ∞ max-min fairness. The default
    α = 1 is the default of the authors' code; their experiments tune α per data set.

    Zero gradients and absent tasks get weight 0 (the equation has no solution for a zero
    gradient). When no positive solution exists (e.g. two exactly opposite gradients) a
    relative ridge of ``eps`` keeps the weights finite; they are then very large and the
    update is dominated by rounding. The authors' code clips the norm of the shared
    gradient to 1; use ``optax.clip_by_global_norm(1.0)`` for that. Task-specific
    parameters (heads) receive their own unweighted gradient.

    The Newton iterations stop at a relative residual of ``tol`` or at the floating-point
    floor (typically under 20 iterations); were ``max_iter`` reached, the weights are the
    last iterate (positive, with a lower objective than the start), a documented fallback
    of :func:`jmtl.solvers.alpha_fair_weights`.

    Args:
      alpha: fairness parameter, ``α > 0``; may be traced (e.g. an optax schedule).
      max_iter: most Newton iterations.
      tol: relative residual at which the solver stops (default: 10 eps of the dtype).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing the Gramian (a gradient aggregator:
      task-specific parameters get their own task's gradient).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.fairgrad(alpha=1.0)
      >>> w, _ = m.update(jmtl.methods.Inputs(present=jnp.array([True, True]),
      ...                 gramian=jnp.array([[4.0, 0.0], [0.0, 1.0]])), m.init(2))
      >>> [round(x, 4) for x in w.tolist()]  # 4 w_1 = 1 / w_1 and w_2 = 1 / w_2
      [0.5, 1.0]

    References:
      Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
    """
    if _checks.is_concrete(alpha) and not (np.ndim(alpha) == 0 and np.isfinite(alpha)
                                           and float(alpha) > 0):
        raise ValueError(f"method 'fairgrad': alpha must be a finite positive number, "
                         f"got {alpha!r}")
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise ValueError(f"method 'fairgrad': max_iter must be a positive integer, "
                         f"got {max_iter!r}")
    if tol is not None and _checks.is_concrete(tol) and not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"method 'fairgrad': tol must be a positive number, got {tol!r}")

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState
               ) -> tuple[jax.Array, base.EmptyState]:
        gram = inputs.gramian
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        res = alpha_fair.alpha_fair_weights(gram, alpha, mask=inputs.present,
                                            max_iter=int(max_iter), tol=tol)
        # The Gramian is G / s² (pre-scaled rows); the solution of the raw equation is
        # w = ŵ · s^(-2α/(α+1)). The exponent of that factor is limited so the weights stay
        # in the normal float range (|J| beyond about 1e15 in float32 with α = 1): the
        # direction is then exact and the magnitude saturates.
        a = jnp.asarray(alpha, dtype)
        log2_s = jnp.log2(base.gram_scale(inputs, dtype))
        top = jnp.max(jnp.where(res.x > 0, jnp.log2(jnp.where(res.x > 0, res.x, 1.0)), 0.0))
        lim = 0.8 * jnp.log2(jnp.finfo(dtype).max)
        expo = jnp.clip(-2.0 * a / (a + 1.0) * log2_s, -lim - top, lim - top)
        return res.x * jnp.exp2(expo), state

    return base.Method(name="fairgrad", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False)
