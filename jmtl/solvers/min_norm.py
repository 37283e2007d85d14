"""The min-norm point of the convex hull of a Jacobian's rows, from the Gramian alone.

``min_{w in simplex} wᵀ G w`` is solved exactly through the equivalent non-negative QP

    v* = argmin_{v >= 0} ½ vᵀ G v - 1ᵀ v,        w* = v* / 1ᵀ v*

(the KKT conditions of the two problems coincide with ``v = w / (w*ᵀ G w*)``), solved
by :func:`jmtl.solvers.nonneg_qp`'s active-set methods. The ridge that keeps ``G``
positive definite makes the QP bounded when the hull contains 0; ``w*`` is then a
convex combination with (numerically) zero norm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jmtl.solvers.active_set import nonneg_qp
from jmtl.solvers.result import SolverResult

__all__ = ["min_norm_weights"]


@functools.partial(jax.jit, static_argnames=("max_iter",))
def min_norm_weights(gramian: jax.Array, mask: jax.Array | None = None, *,
                     ridge: float | None = None, max_iter: int | None = None) -> SolverResult:
    """Convex weights of the min-norm point of the hull of the rows of ``J`` (``G = J Jᵀ``).

    Args:
      gramian: ``(K, K)`` Gramian ``J Jᵀ`` (positive semi-definite; any positive multiple
        gives the same weights).
      mask: optional ``(K,)`` bool; rows with ``False`` are left out and get weight 0.
      ridge: relative ridge added to ``G`` (see :func:`jmtl.solvers.nonneg_qp`).
      max_iter: iteration bound (static; see :func:`jmtl.solvers.nonneg_qp`).

    Returns:
      A :class:`~jmtl.solvers.SolverResult` whose ``x`` holds the ``(K,)`` weights
      ``w >= 0`` summing to 1 over the rows in ``mask`` that minimise ``||Jᵀ w||²``. A
      zero Gramian gives uniform weights. When ``converged`` is False (the QP solver hit
      ``max_iter``), ``x`` is its last feasible iterate normalised to the simplex (a convex
      combination, not necessarily the min-norm one).

    Examples:
      >>> import jax.numpy as jnp
      >>> j = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> res = min_norm_weights(j @ j.T)
      >>> [round(x, 4) for x in res.x.tolist()], bool(res.converged)
      ([0.8, 0.2], True)

    References:
      Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
      optimization", Comptes Rendus Mathématique 350, 2012.
      Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
    """
    dtype = jnp.result_type(jnp.float32, gramian.dtype)
    k = gramian.shape[-1]
    if mask is None:
        mask = jnp.ones((k,), bool)
    res = nonneg_qp(gramian.astype(dtype), -jnp.ones((k,), dtype), mask, ridge=ridge,
                    max_iter=max_iter)
    v = res.x
    total = jnp.sum(v)
    uniform = mask.astype(dtype) / jnp.maximum(jnp.sum(mask), 1).astype(dtype)
    ok = total > 0
    w = jnp.where(ok, v / jnp.where(ok, total, 1.0), uniform)
    return SolverResult(x=w, converged=res.converged, iterations=res.iterations)
