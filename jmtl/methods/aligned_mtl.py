"""``aligned_mtl``: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl.methods import base
from jmtl.solvers import eigen

__all__ = ["aligned_mtl"]

_SCALE_MODES = ("min", "median", "rmse")
_REDUCTIONS = ("sum", "mean")


@base.register("aligned_mtl", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def aligned_mtl(scale_mode: str = "min", reduction: str = "sum") -> base.Method:
    """Aligned-MTL: make the task gradients orthogonal with equal norms, then sum them.

    With the Gramian ``G = J Jᵀ = V Λ Vᵀ`` restricted to its numerical rank ``r``
    (eigenvalues above ``K * eps * λ_max``), the balance matrix is
    ``B = σ V Λ^{-1/2} Vᵀ``. The aligned gradients ``B J`` are orthogonal and all have
    norm ``σ`` (``(B J)(B J)ᵀ = σ² V Vᵀ``); with an SVD ``J = U S Wᵀ`` they are
    ``σ U Wᵀ``. As in the authors' code (and LibMTL) the update is their sum, so the task
    weights are ``w = B 1`` (``reduction="sum"``, the default); ``reduction="mean"``
    averages them over the present tasks, ``w = B 1 / P``, as torchjd's ``AlignedMTL``
    does with its default preference vector (same direction, ``1/P`` the length). The
    scale ``σ`` is the smallest non-zero singular value of ``J`` (``scale_mode="min"``,
    the paper's choice), the median one (``"median"``, the lower
    median as in the authors' code) or the root mean square (``"rmse"``).

    The weights do not depend on the Gramian's overall scale (``B`` is invariant to it):
    the method reads the pre-scaled Gramian ``J Jᵀ / s²`` and divides it by its largest
    diagonal entry before the eigendecomposition, so |J| from 1e-20 to 1e20 gives the
    same weights in float32. Absent tasks are left out
    of the decomposition and get weight 0. A zero Jacobian gives zero weights.

    Args:
      scale_mode: ``"min"`` (default, the paper), ``"median"`` or ``"rmse"``.
      reduction: ``"sum"`` (default: the authors' code and LibMTL) or ``"mean"``
        (torchjd) of the aligned gradients.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing the Gramian (a gradient aggregator:
      task-specific parameters get their own task's gradient).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.aligned_mtl()
      >>> update, _ = jmtl.aggregate(m, jnp.array([[2.0, 0.0], [0.0, 1.0]]), m.init(2))
      >>> [round(x, 4) for x in update.tolist()]  # both rows rescaled to norm 1
      [1.0, 1.0]

    References:
      Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
      Multi-Task Learning", CVPR 2023.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"method 'aligned_mtl': unknown reduction {reduction!r}; valid "
                         f"values are {', '.join(repr(m) for m in _REDUCTIONS)}")
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"method 'aligned_mtl': unknown scale_mode {scale_mode!r}; valid "
                         f"modes are {', '.join(repr(m) for m in _SCALE_MODES)}")

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState
               ) -> tuple[jax.Array, base.EmptyState]:
        present = inputs.present
        dtype = jnp.result_type(jnp.float32, inputs.gramian.dtype)
        g = inputs.gramian.astype(dtype)
        pm = present.astype(dtype)
        g = g * pm[:, None] * pm[None, :]
        # B is invariant to the scale of G: normalise so nothing overflows.
        top = jnp.max(jnp.diagonal(g))
        g = g / jnp.where(top > 0, top, 1.0)
        lam, vecs, mask = eigen.psd_eigh(g)
        rank = jnp.sum(mask)
        if scale_mode == "min":
            sigma2 = jnp.min(jnp.where(mask, lam, jnp.inf))
        elif scale_mode == "median":
            # Non-zero eigenvalues first, ascending; the lower median of the r of them.
            ordered = jnp.sort(jnp.where(mask, lam, jnp.inf))
            sigma2 = ordered[jnp.maximum(rank - 1, 0) // 2]
        else:  # "rmse": the root of the mean non-zero eigenvalue
            sigma2 = jnp.sum(jnp.where(mask, lam, 0.0)) / jnp.maximum(rank, 1)
        sigma2 = jnp.where(rank > 0, sigma2, 0.0)
        # Λ^{-1/2} on the rank-r subspace, 0 elsewhere.
        inv_sqrt = jnp.where(mask, jax.lax.rsqrt(jnp.where(mask, lam, 1.0)), 0.0)
        coef = inv_sqrt * (vecs.T @ pm)
        weights = jnp.sqrt(sigma2) * (vecs @ coef)
        if reduction == "mean":
            weights = weights / jnp.maximum(jnp.sum(pm), 1.0)
        return jnp.where(present, weights, 0.0), state

    return base.Method(name="aligned_mtl", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False)
