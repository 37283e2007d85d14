"""MoCo (multi-objective gradient correction with tracking variables)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl import jacobian as jac_lib
from jmtl.methods import base
from jmtl.methods.db_mtl import check_dim, ema_schedule, require_dim, scaled_row_norms
from jmtl.solvers.simplex import project_simplex

__all__ = ["moco", "MoCoState"]


class MoCoState(NamedTuple):
    """State of :func:`moco`.

    Attributes:
      y: ``(K, dim)`` float32 tracking variables (EMA of each task's gradient).
      lam: ``(K,)`` float32 weights ``λ`` on the simplex.
      count: ``(K,)`` int32 number of updates in which each task was present.
      step: int32 number of updates so far.
    """

    y: jax.Array
    lam: jax.Array
    count: jax.Array
    step: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def _gram_times(y: jax.Array, lam: jax.Array) -> jax.Array:
    """``(Y Yᵀ) λ`` for ``λ`` on the simplex, as ``Y (Yᵀ λ)``, clipped to the finite range.

    Two passes over ``Y`` instead of the ``K×K×d`` Gramian. ``Y`` is divided by a power
    of two ``c >= max |Y|`` (exact) so the inner products cannot overflow; only the
    final ``c²`` factor can, and it saturates at ``max / 4K`` (as clipping every Gramian
    entry did: ``|(Y Yᵀ) λ| <= max_ij |(Y Yᵀ)_ij|`` on the simplex).
    """
    k = y.shape[0]
    c = jac_lib.power_of_two_above(jac_lib.max_abs(y))
    hi = jax.lax.Precision.HIGHEST
    inner = jnp.matmul(y, jnp.matmul(lam / c, y, precision=hi) / c, precision=hi)
    # inner = (Y/c)(Y/c)ᵀ λ: entries at most d.
    big = jnp.finfo(y.dtype).max / (4 * k)
    return jnp.clip(c * (c * inner), -big, big)


@base.register("moco", properties=(
    "permutation_equivariant", "jit_consistent", "finite", "absent_tasks", "state_pytree"))
def moco(beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0,
         normalize_grads: bool = False, lambda_update: str = "projection") -> base.Method:
    """MoCo: MGDA-like weights on tracked gradients, updated by one projected step.

    The tracking variables follow each task's gradient,
    ``y_i ← y_i − β_t (y_i − g_i)`` with ``β_t = β / t^{β_σ}`` at the task's
    ``t``-th update (from ``y_i = 0``). The weights take one projected gradient step
    on ``½ λᵀ(YYᵀ + ρI)λ``: ``λ ← Π_Δ(λ − γ_k (YYᵀ + ρI) λ)``, ``γ_k = γ / k^{γ_σ}``,
    using the new ``Y``; the update is ``Yᵀλ`` (the paper's Algorithm 1, from the
    uniform ``λ``).

    LibMTL replaces the simplex projection by a softmax,
    ``λ ← softmax(λ − γ_k (YYᵀ + ρI) λ)`` (``lambda_update="softmax"``), and rescales
    every gradient to norm ``L_i`` before tracking (from the authors' code); the default
    ``lambda_update="projection"`` follows the paper, and ``normalize_grads=True`` turns
    the rescaling on (it then needs the losses). The projection is exact at any gradient
    scale. Task-specific parameters (heads) receive their own unweighted gradient.

    Absent tasks: their ``y_i``, counts and ``λ_i`` are not updated and they do not
    enter the update. The step is taken on the present tasks' ``λ`` renormalised to
    the simplex, and the result is stored scaled back to their previous total.
    Entries of ``YYᵀ`` are clipped to the finite range, so huge gradients give a
    finite (if saturated) step.

    Args:
      beta: tracking rate ``β`` (LibMTL default 0.5).
      beta_sigma: decay exponent ``β_σ`` of the tracking rate (LibMTL default 0.5).
      gamma: step size ``γ`` of ``λ`` (LibMTL default 0.1).
      gamma_sigma: decay exponent ``γ_σ`` of the step size (LibMTL default 0.5).
      rho: the ``ℓ₂`` regularisation ``ρ`` of ``λ`` (LibMTL default 0).
      normalize_grads: rescale each gradient to norm ``L_i`` first (LibMTL; default off).
      lambda_update: ``"projection"`` (the paper: Euclidean projection onto the simplex)
        or ``"softmax"`` (LibMTL).

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs the Jacobian, and the losses with
      ``normalize_grads``; output ``"direction"``; state :class:`MoCoState`, built by
      ``init(num_tasks, dim)``; ``weights_task_specific=False``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.moco()
      >>> J = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> update, state = jmtl.aggregate(m, J, m.init(2, 2))
      >>> update.tolist()  # Y = J / 2, λ stays uniform
      [0.25, 0.25]

    References:
      Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
      Multi-objective Learning: A Provably Convergent Approach", ICLR 2023.
    """
    for name, val in (("beta", beta), ("gamma", gamma), ("rho", rho)):
        if _checks.is_concrete(val) and not float(val) >= 0:   # traced values pass
            raise ValueError(f"method 'moco': {name} must be non-negative, got {val}")
    if lambda_update not in ("projection", "softmax"):
        raise ValueError(f"method 'moco': lambda_update must be 'projection' or 'softmax', "
                         f"got {lambda_update!r}")
    needs = {base.JACOBIAN} | ({base.LOSSES} if normalize_grads else set())

    def init(num_tasks: int, dim: int | None = None) -> MoCoState:
        dim = require_dim("moco", dim)
        return MoCoState(y=jnp.zeros((num_tasks, dim), jnp.float32),
                         lam=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
                         count=jnp.zeros((num_tasks,), jnp.int32),
                         step=jnp.zeros((), jnp.int32))

    def update(inputs: base.Inputs, state: MoCoState):
        jac = inputs.jacobian
        check_dim("moco", jac, state.y)
        present = inputs.present
        dtype = jnp.result_type(jnp.float32, jac.dtype)
        grads = jac.astype(dtype)
        if normalize_grads:
            norms = scaled_row_norms(grads)
            scale = inputs.losses.astype(dtype) / jnp.where(norms > 0, norms, 1)
            grads = grads * scale[:, None]
        count = state.count + present.astype(jnp.int32)
        step = state.step + 1
        rate = ema_schedule(beta, beta_sigma, count, dtype)[:, None]
        old_y = state.y.astype(dtype)
        y = jnp.where(present[:, None], old_y - rate * (old_y - grads), old_y)

        lam = state.lam.astype(dtype)
        mass = jnp.sum(jnp.where(present, lam, 0))
        n_present = jnp.maximum(jnp.sum(present), 1).astype(dtype)
        start = jnp.where(mass > 0, lam / jnp.where(mass > 0, mass, 1), 1 / n_present)
        start = jnp.where(present, start, 0)
        y_p = jnp.where(present[:, None], y, 0)
        gamma_k = gamma / jnp.maximum(step, 1).astype(dtype) ** gamma_sigma
        step_to = start - gamma_k * (_gram_times(y_p, start) + rho * start)
        if lambda_update == "softmax":
            logits = jnp.where(present, step_to, -jnp.inf)
            moved = jnp.where(present, jax.nn.softmax(logits), 0.0)
            moved = jnp.where(jnp.any(present), moved, 0.0)
        else:
            moved = project_simplex(step_to, mask=present)
        direction = moved @ y_p
        new_lam = jnp.where(present, moved * mass, lam)
        new_state = MoCoState(y=y.astype(state.y.dtype), lam=new_lam.astype(state.lam.dtype),
                              count=count, step=step)
        return direction, new_state

    return base.Method(name="moco", init=init, update=update, needs=frozenset(needs),
                       output="direction", weights_task_specific=False)
