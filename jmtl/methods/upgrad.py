"""UPGrad and DualProj: projections onto the dual cone of the task gradients.

Both aggregators see only the Gramian ``G = J Jᵀ``. The dual cone of the rows of
``J`` is ``{x : J x >= 0}``, the directions that conflict with no task. Projecting
``Jᵀu`` onto it amounts to ``w = argmin_{v >= u} vᵀ G v`` (a non-negative QP in
``λ = v - u``), solved exactly in the graph by :func:`jmtl.solvers.project_dual_cone`.

The dual cone does not change when a row is scaled by a positive factor, so the
projections are solved on the cosine Gramian ``C = D⁻¹ G D⁻¹`` (``D`` the row norms; the
weights are mapped back by ``D⁻¹``), and the ridge ``reg_eps · I`` is added to ``C``: a
ridge relative to each task's own squared norm. torchjd adds ``reg_eps · I`` to
``G / trace(G)`` instead, a ridge relative to the *total* squared norm, which lets the
update conflict with a task whose gradient is much smaller than the others' (a row 1e8
times smaller gets no protection at all). For rows of equal norms the two differ only by
a factor K in ``reg_eps``; both make the QP strictly convex for singular ``G``, and the
result does not depend on the scale of the gradients (the Gramian is the pre-scaled one).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers.active_set import default_ridge, project_dual_cone
from jmtl.solvers.eigen import cosine_gramian

__all__ = ["upgrad", "dualproj"]


def _pref(pref_vector, present: jax.Array, dtype, name: str) -> jax.Array:
    p = present.astype(dtype)
    if pref_vector is None:
        return p / jnp.maximum(jnp.sum(p), 1.0)
    pv = jnp.asarray(pref_vector, dtype)
    if pv.shape != present.shape:
        raise ValueError(f"method '{name}': pref_vector has {pv.shape[0]} entries for "
                         f"{present.shape[0]} tasks")
    return pv * p


def _check_args(name, pref_vector, norm_eps, reg_eps):
    for hp, val in (("norm_eps", norm_eps), ("reg_eps", reg_eps)):
        if _checks.is_concrete(val) and not float(val) >= 0:   # traced values pass
            raise ValueError(f"method '{name}': {hp} must be >= 0, got {val}")
    if pref_vector is None:
        return None
    pv = np.asarray(pref_vector, np.float64).reshape(-1)
    if not np.all(np.isfinite(pv)) or np.any(pv < 0):
        raise ValueError(f"method '{name}': pref_vector must be finite and non-negative, got "
                         f"{pv.tolist()}")
    return tuple(pv.tolist())


def _method(name, pref_vector, norm_eps, reg_eps, weights_fn) -> base.Method:
    pref = _check_args(name, pref_vector, norm_eps, reg_eps)

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState):
        gram, present = inputs.gramian, inputs.present
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        g = jnp.asarray(gram, dtype)
        cos, inv_n, active = cosine_gramian(g, present)
        # torchjd's norm_eps: G counts as zero when its (raw) trace is below norm_eps.
        s = base.gram_scale(inputs, dtype)
        trace = jnp.sum(jnp.where(present, jnp.diagonal(g), 0.0)) * s * s
        active = active & (trace >= jnp.asarray(norm_eps, dtype))
        norms = jnp.where(active, 1.0 / jnp.where(active, inv_n, 1.0), 0.0)
        u = _pref(pref, present, dtype, name) * norms            # the cosine rows' weights
        # The ridge, relative to the unit diagonal of C; a tiny one where reg_eps is 0.
        reg = jnp.asarray(reg_eps, dtype)
        ridge = jnp.where(reg > 0, reg, default_ridge(dtype))
        w = weights_fn(cos, u, active, ridge) * inv_n
        return jnp.where(active, w, 0.0).astype(dtype), state

    return base.Method(name=name, init=init, update=update, needs=frozenset({base.GRAMIAN}),
                       output="weights", weights_task_specific=False)


@base.register("upgrad", properties=(
    "non_conflicting", "permutation_equivariant", "scale_invariant", "linear_under_scaling",
    "jit_consistent", "finite", "absent_tasks"))
def upgrad(pref_vector: Sequence[float] | None = None, norm_eps: float = 0.0,
           reg_eps: float = 1e-4) -> base.Method:
    """UPGrad: project each task gradient onto the dual cone, then average.

    Each row ``g_i`` is projected onto ``{x : J x >= 0}`` (the directions that decrease
    no task's loss to first order); the update is ``Σ_i p_i π(g_i)`` with the preference
    vector ``p`` (default: the mean, ``p_i = 1/K``). The update conflicts with no task
    (``g_jᵀ d >= 0`` for all ``j``), lies in the span of the rows, and is linear under
    positive row scaling: ``d(diag(c) J) = Σ_i c_i p_i π(g_i)``. With one task the update
    is that task's gradient.

    All ``K`` projections are non-negative QPs sharing ``G``, solved exactly and in a
    batch by :func:`jmtl.solvers.project_dual_cone` (block principal pivoting, with the
    batch's linear systems solved by conjugate gradients on the shared ``G``).

    Args:
      pref_vector: optional ``(K,)`` non-negative preference weights combining the
        projected rows (torchjd's ``pref_vector``); ``None`` means ``1/K_present``.
      norm_eps: ``G`` is treated as zero when its trace is below this (torchjd uses
        ``1e-4``, an absolute threshold that makes small gradients fall back to the mean;
        jmtl's default ``0.0`` keeps the method scale-invariant).
      reg_eps: ridge ``reg_eps · G_ii`` added to each diagonal entry (``reg_eps · I`` on
        the cosine Gramian; default ``1e-4`` as torchjd's, which adds it to
        ``G / trace(G)``, see the module docstring), keeping the QP strictly convex;
        ``0`` leaves a ridge of machine size. May be traced (an optax schedule).

    The QP solvers converge in a few iterations (block pivoting finished by
    Lawson–Hanson, then one refinement step), so float32 weights agree with float64 to
    about 1e-7 relative and across row orders; were the iteration bound reached, the
    projection of that row would be its last iterate (documented fallback of
    :func:`jmtl.solvers.project_dual_cone`). Task-specific parameters (heads) receive
    their own unweighted gradient (torchjd). Zero rows are left out of the cone.

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, weights output; absent
      tasks get weight 0 and are left out of the cone).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.upgrad(reg_eps=0.0)
      >>> j = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
      >>> update, _ = jmtl.aggregate(m, j, m.init(2))
      >>> (j @ update >= -1e-6).all().item()
      True

    References:
      Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232,
      2024 (torchjd).
    """

    def weights_fn(g, u, present, ridge):
        w = project_dual_cone(g, jnp.diag(u), present, ridge=ridge).x
        return jnp.sum(w, axis=0)

    return _method("upgrad", pref_vector, norm_eps, reg_eps, weights_fn)


@base.register("dualproj", properties=(
    "non_conflicting", "permutation_equivariant", "scale_invariant", "jit_consistent",
    "finite", "absent_tasks"))
def dualproj(pref_vector: Sequence[float] | None = None, norm_eps: float = 0.0,
             reg_eps: float = 1e-4) -> base.Method:
    """DualProj: project the mean gradient onto the dual cone of the task gradients.

    The update is the projection of ``Σ_i p_i g_i`` (default: the mean gradient) onto
    ``{x : J x >= 0}``, as in GEM's projection of the current gradient against the
    memories' gradients. It conflicts with no task; with one task it is that task's
    gradient.

    Args:
      pref_vector: optional ``(K,)`` non-negative weights of the vector to project;
        ``None`` means the mean, ``1/K_present``.
      norm_eps: threshold on the trace below which ``G`` is treated as zero (see
        :func:`upgrad`; torchjd's ``1e-4``, jmtl's default ``0.0``).
      reg_eps: ridge relative to each task's squared norm (see :func:`upgrad`).

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, weights output).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.dualproj(reg_eps=0.0)
      >>> j = jnp.array([[1.0, 0.0], [-2.0, 1.0]])
      >>> update, _ = jmtl.aggregate(m, j, m.init(2))
      >>> [round(x, 4) + 0.0 for x in update.tolist()]
      [0.0, 0.5]

    References:
      Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232,
      2024 (torchjd). Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
      Learning", NeurIPS 2017.
    """

    def weights_fn(g, u, present, ridge):
        return project_dual_cone(g, u, present, ridge=ridge).x

    return _method("dualproj", pref_vector, norm_eps, reg_eps, weights_fn)
