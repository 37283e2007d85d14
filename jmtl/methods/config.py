"""``config``: conflict-free gradient combination (ConFIG; Liu et al., ICLR 2025)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _linalg
from jmtl.methods import base
from jmtl.solvers import eigen

__all__ = ["config", "ConFIGState"]

_SOLVERS = ("csne", "gram_qr", "qr", "gramian")


class ConFIGState(NamedTuple):
    """State of :func:`config`.

    Attributes:
      failures: int32 number of updates whose iterative solve (``solver="csne"``) stopped
        short of its tolerance (the update then uses its last iterate); the direct solvers
        never fail.
    """

    failures: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def _init(num_tasks: int, dim: int | None = None) -> ConFIGState:
    del num_tasks, dim
    return ConFIGState(failures=jnp.int32(0))


def _zero_tol(k: int, dtype) -> float:
    # Relative size below which the projection of the target cosines on the range of the
    # unit rows counts as zero (and the singular-value cut-off of the QR solvers): well above
    # the float32 rounding noise measured on exactly rank-deficient inputs (3e-7 at
    # d = 1e6), far below any genuine answer.
    return 8.0 * k * float(jnp.finfo(dtype).eps)


@base.register("config", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def config(solver: str = "csne") -> base.Method:
    """ConFIG: the direction with equal cosine to every task gradient, rescaled.

    With unit gradients ``u_i = g_i / ||g_i||`` stacked as the rows of ``U``, ConFIG takes
    ``v = pinv(U) 1`` (the minimum-norm ``v`` with ``u_i · v = 1`` for every task, in the
    least-squares sense when no such ``v`` exists), its unit vector ``v̂ = v / ||v||``,
    and the update ``(sum_i g_i · v̂) v̂`` (the official code's ``ConFIG_update`` with
    equal weights and the projection length; torchjd's ``ConFIG`` is the same).

    Numerics. The unit rows are formed from the Jacobian with a per-row power-of-two
    pre-scaling (no overflow or underflow for |J| from 1e-30 to 1e30 in float32). Solving
    on the cosine matrix ``C = U Uᵀ`` alone squares the condition number of ``U`` (float32
    then loses 1e-4 on moderately conditioned inputs), so:

    * ``solver="csne"`` (default) solves the semi-normal equations ``x = Uᵀ C⁺ 1`` through
      the eigendecomposition of ``C`` (one Gramian, of the power-of-two pre-scaled rows;
      ``U`` is never formed), then refines them (Björck's corrected semi-normal
      equations: ``r = 1 - U x`` from ``U`` itself, ``x += Uᵀ C⁺ r``, two matrix-vector
      passes per correction) until the correction is below ``4·eps·cond(U)`` of ``x``
      (:func:`jmtl._linalg.min_norm_lstsq_refined`; at most 8 passes). Each correction
      shrinks the error by about ``eps·cond(U)²``, so the accuracy is that of
      ``"gram_qr"`` (within 1e-5 of a float64 reference) for the same ``cond(U)`` range
      and the same cut-off, at about 1.5× the cost of the Gramian at K=128 (``"gram_qr"``:
      6×). An update whose refinement stops short of the tolerance (no contraction, or
      the cap) uses its last iterate and increments ``state.failures``.
    * ``solver="gram_qr"`` builds an orthonormal basis ``Q`` of the span of the
      unit rows from Gram matrices in two passes (SVQB, the eigenvalue form of
      Cholesky-QR2), solves ``pinv(U Q) 1`` with ``U Q`` formed from ``U`` itself and
      takes ``v = Q y``: the error is of order ``eps·cond(U)`` like a Householder QR (within
      1e-5 of a float64 reference where the plain Gramian solve loses 1e-4) as long as
      ``eps·cond(U)² < 1`` (``cond(U) < 3e3`` in float32; directions with singular
      values below ``√(K·eps)`` of the largest are dropped). The cost is five
      ``K×K×d`` matrix products.
    * ``solver="qr"`` computes ``pinv(U) 1`` from a QR decomposition of ``Uᵀ`` and an SVD of
      the ``K×K`` factor: ``eps·cond(U)`` accuracy for any conditioning (singular values
      down to ``8·K·eps`` of the largest), but XLA:CPU's QR of a tall matrix is 100× slower
      than the Gramian (96 ms against 0.7 ms at K=8, d=1e5).
    * ``solver="gramian"`` needs only ``J Jᵀ`` (no ``K×d`` Jacobian kept: least memory) and
      solves on ``C`` (accuracy ``eps·cond(U)²``). It returns task weights; the two
      others return the update direction.

    Degenerate inputs. Directions of ``U`` with a singular value below a relative cut-off
    (``8·K·eps`` for ``"qr"``; ``√(K·eps)``, i.e. eigenvalues of ``C`` below ``K·eps``,
    for ``"csne"``, ``"gram_qr"`` and ``"gramian"``) count as zero: the least-squares,
    pseudo-inverse solution. When the target ``1`` has no
    component on the range of ``U`` (relative size below the same tolerance, e.g. rows
    ``g`` and ``-g``), the exact answer is ``v = 0`` and the update is zero, whatever the
    row order (rounding noise is never normalised into a full-size direction). Zero
    gradients (``u_i = 0``, as in the reference implementation) and absent tasks are left
    out; a zero Jacobian gives a zero update.

    Args:
      solver: ``"csne"`` (default: Jacobian, direction), ``"gram_qr"`` (Jacobian,
        direction; no iteration, 4× slower), ``"qr"`` (Jacobian, direction;
        ``eps·cond(U)`` accuracy for any conditioning, slow on CPU) or ``"gramian"``
        (Gramian only, weights; float32 accuracy ``eps·cond(U)²``).

    Returns:
      A :class:`~jmtl.methods.base.Method` (a gradient aggregator: task-specific
      parameters get their own task's unweighted gradient, as in the official code) with
      state :class:`ConFIGState`.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.config()
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 3.0]]), m.init(2))
      >>> [round(x, 4) for x in update.tolist()]  # v̂ = (1, 1)/√2, length 4/√2
      [2.0, 2.0]
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 2.0], [-2.0, -4.0]]), m.init(2))
      >>> update.tolist()  # opposite rows: no direction has equal positive cosines
      [0.0, 0.0]

    References:
      Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
      Neural Networks", ICLR 2025 (code: github.com/tum-pbs/ConFIG).
      Björck, "Numerical Methods for Least Squares Problems", SIAM 1996, §2.5 and §6.6
      (semi-normal equations corrected by one step of iterative refinement).
    """
    if solver not in _SOLVERS:
        raise ValueError(f"method 'config': unknown solver {solver!r}; valid solvers are "
                         f"{', '.join(repr(s) for s in _SOLVERS)}")

    lstsq = _linalg.min_norm_lstsq if solver == "qr" else _linalg.min_norm_lstsq_gram

    def solve_csne(jac, present, target):
        # The unit rows are never formed: U = diag(1/n) Y with Y the peak-scaled rows,
        # whose Gramian gives the norms n on its diagonal. Absent rows are zeroed in the
        # same pass (one read of the K×d Jacobian fewer than masking it first).
        y, peaks = _linalg.peak_scaled_rows(jac, keep=present)
        g = _linalg.gram(y)
        n = jnp.sqrt(jnp.diagonal(g))
        inv_n = jnp.where(n > 0, 1 / jnp.where(n > 0, n, 1), 0)
        v, fitted, coeffs, converged, _ = _linalg.min_norm_lstsq_refined(
            y, target, row_scale=inv_n, gram_a=g)
        return v, fitted, coeffs, peaks * n, converged

    def solve_direct(jac, present, target):
        rows = jnp.where(present[:, None], jac, 0)
        units, norms = _linalg.unit_rows(rows)
        v, fitted, coeffs = lstsq(units, target, rtol=_zero_tol(rows.shape[0], rows.dtype))
        return v, fitted, coeffs, norms, jnp.bool_(True)

    solve = solve_csne if solver == "csne" else solve_direct

    def update_rows(inputs: base.Inputs, state: ConFIGState) -> tuple[jax.Array, ConFIGState]:
        jac = inputs.jacobian
        dtype = jnp.result_type(jnp.float32, jac.dtype)
        k = jac.shape[0]
        present = inputs.present
        target = present.astype(dtype)
        tol = _zero_tol(k, dtype)
        v, fitted, coeffs, norms, converged = solve(jac.astype(dtype), present, target)
        # ||v|| from v itself: exact whatever the solver's basis.
        v_norm = _linalg.scaled_row_norms(v[None, :])[0]
        size = jnp.sqrt(jnp.sum(jnp.square(coeffs)))
        ok = (size > tol * jnp.sqrt(jnp.sum(target))) & (v_norm > 0)
        # u_i · v̂ = fitted_i / ||v||, so sum_i g_i · v̂ = sum_i ||g_i|| fitted_i / ||v||.
        safe = jnp.where(ok, v_norm, 1)
        length = jnp.sum(norms * fitted) / safe
        direction = jnp.where(ok, (length / safe) * v, 0)
        # A solve that did not converge counts only when its direction is used.
        failed = (ok & ~converged).astype(jnp.int32)
        return direction, state._replace(failures=state.failures + failed)

    def update_gramian(inputs: base.Inputs, state: ConFIGState
                       ) -> tuple[jax.Array, ConFIGState]:
        dtype = jnp.result_type(jnp.float32, inputs.gramian.dtype)
        g = inputs.gramian.astype(dtype)
        k = g.shape[0]
        present = inputs.present
        pm = present.astype(dtype)
        # The weights are invariant to the scale of G: normalise so nothing overflows.
        top = jnp.max(jnp.diagonal(g) * pm)
        g = g / jnp.where(top > 0, top, 1.0)
        cos, inv, active = eigen.cosine_gramian(g, present)
        act = active.astype(dtype)
        beta = eigen.psd_pinv_solve(cos, act)
        fitted = cos @ beta  # projection of the target on the range of C
        size = jnp.sqrt(jnp.sum(jnp.square(fitted)))
        # inv / max(inv) in (0, 1]: a common factor, which w does not depend on.
        rel = inv / jnp.maximum(jnp.max(inv), jnp.finfo(dtype).tiny)
        a = jnp.where(active, rel * beta, 0.0)
        ga = g @ a
        sq_norm = a @ ga  # ||v||² (up to the common factor)
        length = act @ ga  # sum_i g_i · v (same factor)
        ok = (size > _zero_tol(k, dtype) * jnp.sqrt(jnp.sum(act))) & (sq_norm > 0)
        weights = jnp.where(ok, a * (length / jnp.where(ok, sq_norm, 1.0)), 0.0)
        return weights, state

    if solver != "gramian":
        return base.Method(name="config", init=_init, update=update_rows,
                           needs=frozenset({base.JACOBIAN}), output=base.DIRECTION,
                           weights_task_specific=False)
    return base.Method(name="config", init=_init, update=update_gramian,
                       needs=frozenset({base.GRAMIAN}), output=base.WEIGHTS,
                       weights_task_specific=False)
