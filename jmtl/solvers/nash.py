"""The Nash bargaining solution of Nash-MTL: ``G α = 1 / α`` with ``α > 0``.

The equation is the stationarity condition of the strictly convex function

    F(α) = ½ αᵀ G α - Σ_i log α_i        (α > 0),

so a damped Newton method (Hessian ``G + diag(1/α²)``, backtracking line search that
keeps ``α > 0``) converges to it quadratically from any positive start. Navon et al.
approximate the same point with a sequence of convex programs solved by cvxpy; here
every step is a ``K × K`` solve in the graph.

Scale: the equation is equivariant under row scaling. With ``n_i = sqrt(G_ii)`` and the
cosine matrix ``C = D⁻¹ G D⁻¹`` (``D = diag(n)``), ``α = D⁻¹ β`` where ``C β = 1/β``. The
solver works on ``C`` (unit diagonal), so a task whose gradient is 1e6 times smaller than
another's is solved as accurately as the others, and the result does not depend on the
overall scale of ``G``. The ridge ``ridge · I`` is added to ``C`` (a ridge relative to
each task's own squared norm): it makes the solution exist when ``G`` is singular
(K > rank), where the exact equation has none, and changes the solution of a
non-singular problem by about ``ridge · cond(C)`` relative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jmtl.solvers.result import SolverResult

__all__ = ["nash_bargaining"]

_STEPS = 2.0 ** -jnp.arange(40.0)  # backtracking candidates 1, 1/2, 1/4, ...


@functools.partial(jax.jit, static_argnames=("max_iter",))
def nash_bargaining(gramian: jax.Array, alpha0: jax.Array | None = None,
                    mask: jax.Array | None = None, *, ridge: float = 1e-6,
                    max_iter: int = 50, tol: float | None = None) -> SolverResult:
    """Solves ``G α = 1/α``, ``α > 0`` by damped Newton steps on ``½αᵀGα - Σ log α``.

    Rows outside ``mask`` and rows with a zero diagonal (a zero gradient, for which the
    equation has no solution) are *inactive*: they are left out of the equation and get
    ``α_i = 0``.

    Args:
      gramian: ``(K, K)`` positive semi-definite matrix, at any scale.
      alpha0: optional ``(K,)`` warm start (e.g. the previous solution; non-positive or
        non-finite entries are replaced by the diagonal start ``1 / sqrt(G_ii)``).
      mask: optional ``(K,)`` bool of the rows taking part.
      ridge: ``ridge · G_ii`` is added to each diagonal entry (see the module docstring);
        may be traced.
      max_iter: maximum number of Newton steps (static).
      tol: stop when every relative residual ``|α_i (Gα)_i - 1|`` is at most ``tol``
        (default ``10 K eps``); may be traced. The iterations also stop when a step no
        longer moves ``α`` (the floating-point floor); a residual below ``sqrt(eps)``
        counts as converged (the floor grows with the conditioning of ``G``).

    Returns:
      A :class:`~jmtl.solvers.SolverResult`: ``x`` the ``(K,)`` solution (positive on
      active rows, 0 elsewhere), ``converged`` whether the tolerance was met within
      ``max_iter`` steps (when False, ``x`` is the last iterate: positive and finite,
      with a lower ``F`` than the start), ``iterations`` the Newton steps used.

    Examples:
      >>> import jax.numpy as jnp
      >>> res = nash_bargaining(jnp.diag(jnp.array([1.0, 4.0])), ridge=0.0)
      >>> [round(x, 4) for x in res.x.tolist()], bool(res.converged)
      ([1.0, 0.5], True)

    References:
      Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.
    """
    dtype = jnp.result_type(jnp.float32, gramian.dtype)
    g = jnp.asarray(gramian, dtype)
    k = g.shape[-1]
    eye = jnp.eye(k, dtype=dtype)
    if mask is None:
        mask = jnp.ones((k,), bool)
    g = 0.5 * (g + g.T)
    diag = jnp.diagonal(g)
    active = mask & (diag > 0) & jnp.isfinite(diag)
    pair = active[:, None] & active[None, :]
    # Cosine form: C = D⁻¹ G D⁻¹ (unit diagonal), computed as (G_ij / n_i) / n_j so that
    # nothing overflows; inactive rows get an identity row (their β_i = 1 is discarded).
    inv_n = jnp.where(active, jax.lax.rsqrt(jnp.where(active, diag, 1.0)), 0.0)
    c = (g * inv_n[:, None]) * inv_n[None, :]
    c = jnp.where(pair, jnp.clip(c, -1.0, 1.0), 0.0)
    c = jnp.where(eye > 0, jnp.where(active, 1.0 + jnp.asarray(ridge, dtype), 1.0), c)
    if tol is None:
        tol = 10 * k * float(jnp.finfo(dtype).eps)
    if alpha0 is None:
        beta0 = jnp.ones((k,), dtype)
    else:
        beta0 = jnp.asarray(alpha0, dtype) / jnp.where(active, inv_n, 1.0)
    beta0 = jnp.where(active & (beta0 > 0) & jnp.isfinite(beta0), beta0, 1.0)
    n_act = jnp.maximum(jnp.sum(active), 1).astype(dtype)

    def on_scale(b):
        # t* = argmin_t F(t b) = sqrt(K / bᵀCb) (every solution has βᵀCβ = K); b is first
        # divided by its largest entry so that bᵀCb cannot overflow.
        b = b / jnp.max(b)
        quad = b @ c @ b
        return jnp.where(quad > 0, b * jnp.sqrt(n_act / jnp.where(quad > 0, quad, 1.0)), b)

    # Start from the warm start or from β = 1 (the solution for orthogonal gradients),
    # whichever has the lower F: a warm start far from the solution (e.g. α = 1 for
    # gradients of very different norms) would cost a Newton step per factor 2.
    warm, cold = on_scale(beta0), on_scale(jnp.ones((k,), dtype))
    steps = _STEPS.astype(dtype)

    def objective(a):
        safe = jnp.where(a > 0, a, 1.0)
        val = 0.5 * a @ c @ a - jnp.sum(jnp.log(safe))
        return jnp.where(jnp.all(a > 0), val, jnp.inf)

    def residual(a):  # the relative residual of each row, β_i (Cβ)_i - 1
        return jnp.max(jnp.abs(a * (c @ a) - 1.0))

    def converged(a):
        return residual(a) <= tol

    def cond(s):
        a, it, moved, done = s
        return (it < max_iter) & moved & ~done

    def body(s):
        a, it, _, _ = s
        grad = c @ a - 1.0 / a
        hess = c + jnp.diag(1.0 / (a * a))
        chol = jnp.linalg.cholesky(hess)
        delta = -jax.scipy.linalg.cho_solve((chol, True), grad)
        delta = jnp.where(jnp.isfinite(delta), delta, 0.0)
        f0 = objective(a)
        slope = grad @ delta
        cand = a[None, :] + steps[:, None] * delta[None, :]
        vals = jax.vmap(objective)(cand)
        # Armijo on F; near the solution F is flat to rounding (its change is quadratic in
        # the error), so a sufficient decrease of the residual is accepted instead.
        armijo = (vals <= f0 + 1e-4 * steps * slope) & (slope < 0)
        res_c = jax.vmap(residual)(jnp.where(cand > 0, cand, 1.0))
        merit = jnp.all(cand > 0, axis=1) & (res_c <= (1.0 - 1e-4 * steps) * residual(a))
        ok = armijo | merit
        first = jnp.argmax(ok)
        accept = jnp.any(ok)
        new = jnp.where(accept, cand[first], a)
        moved = accept & (jnp.max(jnp.abs(new - a) / a) > 8 * float(jnp.finfo(dtype).eps))
        return new, it + 1, moved, converged(new)

    beta0 = jnp.where(objective(warm) <= objective(cold), warm, cold)
    init = (beta0, jnp.int32(0), jnp.bool_(True), converged(beta0))
    beta, it, _, done = jax.lax.while_loop(cond, body, init)
    # The floating-point floor of the residual grows with cond(C): a residual below
    # sqrt(eps) also counts as converged (float32: 3e-4, reached when the iterates stop
    # moving or at max_iter).
    ok = done | (residual(beta) <= float(jnp.finfo(dtype).eps) ** 0.5)
    alpha = jnp.where(active, beta * inv_n, 0.0)
    return SolverResult(x=alpha, converged=ok | ~jnp.any(active), iterations=it)
