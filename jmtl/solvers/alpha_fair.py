"""The α-fair weight equation ``G w = w^{-1/α}``, ``w > 0`` (FairGrad; α = 1 is Nash-MTL's).

The equation is the optimality condition of the strictly convex problem

    minimise  φ(w) = ½ wᵀ G w - sum_i F(w_i),   F'(w) = w^{-1/α}

(``F(w) = log w`` for α = 1, ``w^{1-1/α} / (1 - 1/α)`` otherwise), which is solved here
by damped Newton steps (a fraction-to-the-boundary rule keeps ``w > 0``, and an Armijo
backtracking over a fixed set of step sizes, evaluated at once, guarantees descent)
inside a ``lax.while_loop`` that stops at a relative tolerance, when no step decreases
``φ`` any more (the floating-point floor), or after ``max_iter`` iterations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jmtl.solvers.result import SolverResult

__all__ = ["alpha_fair_weights"]

_N_STEPS = 24  # candidate step sizes 1, 1/2, ..., 2^-23 of the admissible step


@functools.partial(jax.jit, static_argnames=("max_iter",))
def alpha_fair_weights(gramian: jax.Array, alpha: float, mask: jax.Array | None = None,
                       max_iter: int = 100, tol: float | None = None) -> SolverResult:
    """Solves ``G w = w^{-1/α}`` with ``w > 0`` on the active rows.

    Rows outside ``mask`` and rows with a zero diagonal (zero gradients, for which the
    equation has no solution) are *inactive*: they get ``w_i = 0`` and are left out of
    the equation. ``G`` is normalised by its largest active diagonal entry ``t`` and the
    solution rescaled by ``t^{-α/(α+1)}`` (the equation's scaling law), so the result does
    not depend on the overall scale. A ridge of ``eps`` (relative) keeps the weights
    finite when no solution exists (e.g. two opposite gradients), and makes the
    problem strictly convex when ``G`` is singular.

    Args:
      gramian: ``(K, K)`` symmetric PSD Gramian.
      alpha: fairness parameter, ``α > 0``; may be traced.
      mask: optional ``(K,)`` bool, the rows to use.
      max_iter: most Newton iterations (static).
      tol: stop when ``max_i |(G w)_i - w_i^{-1/α}| / w_i^{-1/α} <= tol`` (default: 10 eps
        of the dtype); may be traced. When no step decreases the objective any more (the
        floating-point floor), a residual below ``sqrt(eps)`` is accepted.

    Returns:
      A :class:`~jmtl.solvers.SolverResult`: ``x`` the ``(K,)`` weights, positive on
      active rows and 0 elsewhere, in the Gramian's dtype (float32 or float64);
      ``converged`` False when the tolerance was not met within ``max_iter`` iterations
      (``x`` is then the last iterate: positive, with a lower objective than the start).

    Examples:
      >>> res = alpha_fair_weights(jnp.array([[4.0, 0.0], [0.0, 1.0]]), alpha=1.0)
      >>> [round(x, 4) for x in res.x.tolist()]  # 4 w_1 = 1 / w_1, w_2 = 1 / w_2
      [0.5, 1.0]
    """
    dtype = jnp.result_type(jnp.float32, gramian.dtype)
    if mask is None:
        mask = jnp.ones((gramian.shape[0],), bool)
    alpha = jnp.asarray(alpha, dtype)
    g = gramian.astype(dtype)
    g = 0.5 * (g + g.T)
    eps = jnp.finfo(dtype).eps
    if tol is None:
        tol = 10 * float(eps)
    diag = jnp.diagonal(g)
    active = (diag > jnp.finfo(dtype).tiny) & mask
    act = active.astype(dtype)
    top = jnp.max(jnp.where(active, diag, 0.0))
    t = jnp.where(top > 0, top, 1.0)
    # Normalised matrix; inactive rows/columns replaced by the identity (their equation
    # becomes w_i = 1, decoupled from the rest, and is discarded at the end).
    a_mat = g / t * act[:, None] * act[None, :]
    a_mat = a_mat + jnp.diag(jnp.where(active, eps, 1.0))
    inv_alpha = 1.0 / alpha
    power = 1.0 - inv_alpha
    safe_power = jnp.where(power == 0, 1.0, power)

    def psi(w):  # the right-hand side w^{-1/α} (1 on inactive rows)
        return jnp.where(active, w ** (-inv_alpha), 1.0)

    def big_f(w):  # F with F' = psi: (w^p - 1) / p, log w at p = 0 (α = 1)
        logw = jnp.log(w)
        val = jnp.where(power == 0, logw, jnp.expm1(power * logw) / safe_power)
        return jnp.where(active, val, w)

    def phi(w):  # φ of a (K,) vector or of each row of a (J, K) batch
        return 0.5 * jnp.sum(w * (w @ a_mat), axis=-1) - jnp.sum(big_f(w), axis=-1)

    def rel_residuals(w):  # (..., K) relative residuals of the equation
        return (w @ a_mat - psi(w)) / psi(w)

    # Start from the solution that ignores the off-diagonal terms.
    w0 = jnp.diagonal(a_mat) ** (-alpha / (alpha + 1.0))
    steps = 0.5 ** jnp.arange(_N_STEPS, dtype=dtype)

    def cond(carry):
        it, _, res, progress = carry
        return (it < max_iter) & (jnp.max(jnp.abs(res)) > tol) & progress

    def body(carry):
        it, w, res, _ = carry
        grad = a_mat @ w - psi(w)
        hdiag = jnp.where(active, inv_alpha * w ** (-inv_alpha - 1.0), 0.0)
        hess = a_mat + jnp.diag(hdiag)
        delta = -jnp.linalg.solve(hess, grad)
        # Fraction to the boundary: keep w > 0.
        ratio = jnp.where(delta < 0, w / jnp.where(delta < 0, -delta, 1.0), jnp.inf)
        eta_max = jnp.minimum(1.0, 0.95 * jnp.min(ratio))
        etas = eta_max * steps
        cands = w[None, :] + etas[:, None] * delta[None, :]
        phis = phi(cands)
        cand_res = rel_residuals(cands)
        slope = grad @ delta
        # Descent on φ (Armijo); near the solution φ is flat to rounding, and a sufficient
        # decrease of the residual (the Newton steps' own merit) is accepted instead.
        armijo = (phis <= phi(w) + 1e-4 * etas * slope) & (slope < 0)
        res_norm = jnp.sqrt(jnp.sum(res * res))
        cand_norm = jnp.sqrt(jnp.sum(cand_res * cand_res, axis=1))
        merit = cand_norm <= (1.0 - 1e-4 * etas) * res_norm
        ok = (armijo | merit) & jnp.isfinite(phis) & jnp.all(jnp.isfinite(cand_res), axis=1)
        found = jnp.any(ok)
        first = jnp.argmax(ok)
        w_new = jnp.where(found, cands[first], w)
        moved = jnp.max(jnp.abs(w_new - w) / w) > 4 * eps
        return it + 1, w_new, jnp.where(found, cand_res[first], res), found & moved

    init = (jnp.int32(0), w0, rel_residuals(w0), jnp.bool_(True))
    it, w, res, _ = jax.lax.while_loop(cond, body, init)
    worst = jnp.max(jnp.where(active, jnp.abs(res), 0.0))
    converged = (worst <= tol) | ((worst <= jnp.sqrt(eps)) & (it < max_iter))
    scale = t ** (-alpha / (alpha + 1.0))
    return SolverResult(x=jnp.where(active, w * scale, 0.0), converged=converged,
                        iterations=it)
