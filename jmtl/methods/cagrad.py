"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021), from the Gramian.

CAGrad looks for the update ``d`` in the ball ``||d - g0|| <= c ||g0||`` around the
mean gradient ``g0`` that maximises the worst task improvement ``min_i g_iᵀd``. Its
dual is ``min_{w in simplex} g_wᵀg0 + c||g0|| ||g_w||`` and the update is
``d = g0 + (c||g0|| / ||g_w||) g_w``.

Writing ``x = (c||g0|| / ||g_w||) w`` turns the optimality conditions into

    G (b + x) = μ 1 + ν,   x >= 0,   ν >= 0,   νᵀx = 0,   xᵀ G x = c² bᵀ G b,

with ``b = 1/K``: for a fixed ``μ``, ``x(μ)`` is the non-negative QP
``min_{x >= 0} ½ xᵀGx + (Gb - μ1)ᵀx`` (the projection of ``g0`` onto
``{d : J d >= μ1}``), and ``ψ(μ) = x(μ)ᵀ G x(μ)`` is non-decreasing in ``μ``. jmtl
finds the root of ``ψ(μ) = c² ||g0||²`` with a safeguarded Newton iteration: on the
current active set ``ψ`` is an explicit quadratic in ``μ``, whose root is taken
(bisection when it leaves the bracket), and each ``x(μ)`` is solved exactly by the
active-set QP solver warm-started from the previous active set. The update weights
are ``b + x`` (divided by ``1 + c²`` with the default ``rescale=1``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers import active_set
from jmtl.solvers.result import SolverResult

__all__ = ["cagrad", "cagrad_weights"]

_RESCALES = (0, 1, 2)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def cagrad_weights(gramian: jax.Array, c: float = 0.4, mask: jax.Array | None = None, *,
                   ridge: float | None = None, max_iter: int = 100) -> SolverResult:
    """Unscaled CAGrad weights ``b + x`` (the update is ``Jᵀ(b + x)``, before rescaling).

    When the root of ``ψ(μ) = c²||g0||²`` lies at a jump of ``ψ`` (the rows' hull
    contains 0 and the ball contains non-conflicting directions: every feasible ``d`` has
    ``min_i g_iᵀd <= 0``, and the optimum 0 is reached on a whole set), the solution on
    the left of the jump is returned: the projection of ``g0`` onto ``{d : J d >= μ1}``
    with ``μ`` the largest value whose projection lies in the ball, i.e. the optimal
    direction closest to ``g0``. (Taking the right of the jump, where ``x`` is dominated by
    the ridge, gave float32 updates that conflict with a task.)

    Args:
      gramian: ``(K, K)`` Gramian ``J Jᵀ`` (any positive multiple gives the same weights).
      c: radius of the ball around the mean gradient, relative to its norm; may be traced.
      mask: optional ``(K,)`` bool of present tasks (the mean is over them; others get 0).
      ridge: relative ridge added to ``G`` (see :func:`jmtl.solvers.nonneg_qp`).
      max_iter: bound on the outer (root-finding) iterations (static).

    Returns:
      A :class:`~jmtl.solvers.SolverResult` whose ``x`` holds the ``(K,)`` weights
      ``b + x`` with ``b_i = 1/K_present``. When ``converged`` is False (an inner QP or the
      root finding hit its bound), ``x`` is the last point found inside the ball (at worst
      ``b``, the mean gradient).

    Examples:
      >>> import jax.numpy as jnp
      >>> res = cagrad_weights(jnp.eye(2), c=0.0)
      >>> [round(v, 4) for v in res.x.tolist()], bool(res.converged)
      ([0.5, 0.5], True)
    """
    dtype = jnp.result_type(jnp.float32, gramian.dtype)
    k = gramian.shape[-1]
    if mask is None:
        mask = jnp.ones((k,), bool)
    c = jnp.asarray(c, dtype)
    qn, _, mask = active_set.prepare(jnp.asarray(gramian, dtype), mask, ridge)
    r = jnp.asarray(active_set.default_ridge(dtype) if ridge is None else ridge, dtype)
    p = mask.astype(dtype)
    b = p / jnp.maximum(jnp.sum(p), 1.0)
    cvec = jnp.where(mask, qn @ b, 0.0)
    rho2 = (c * c) * (b @ cvec)
    rho = jnp.sqrt(jnp.maximum(rho2, 0.0))
    huge = jnp.asarray(jnp.finfo(dtype).max / 4, dtype)
    anyp = jnp.any(mask)
    mu_lo = jnp.where(anyp, jnp.min(jnp.where(mask, cvec, huge)), 0.0)
    mu_hi = jnp.where(anyp, jnp.min(jnp.where(mask, cvec + rho * jnp.sqrt(jnp.diag(qn)), huge)),
                      0.0)
    mu_hi = mu_hi + 1e-3 * (jnp.abs(mu_hi) + jnp.abs(mu_lo)) + jnp.finfo(dtype).tiny
    tol = active_set.default_tol(dtype, k)
    eps = jnp.finfo(dtype).eps
    qp_iter = active_set.default_max_iter(k)
    ones = jnp.ones((k,), dtype)

    def solve_at(mu, free):
        q = jnp.where(mask, cvec - mu, 0.0)
        res = active_set.solve_prepared(qn, q[None], (free & mask)[None], qp_iter, tol)
        return res.x[0], res.free[0], res.converged[0]

    def closed_form(free):
        rhs = jnp.stack([jnp.where(mask, ones, 0.0), cvec])
        sol = active_set.masked_solve(qn, rhs, jnp.stack([free, free]))
        pf, r0 = sol[0], sol[1]
        f = free.astype(dtype)
        a = f @ pf
        bb = f @ r0
        cc = (f * cvec) @ r0
        disc = jnp.maximum(bb * bb - a * (cc - rho2), 0.0)
        ok = a > 1e-6 * jnp.finfo(dtype).eps
        return jnp.where(ok, (bb + jnp.sqrt(disc)) / jnp.where(ok, a, 1.0), jnp.nan)

    def cond(s):
        *_, it, done, _ = s
        return (~done) & (it < max_iter)

    def body(s):
        mu, lo, hi, free, x_in, x_last, psi_last, it, _, qp_ok = s
        x, free, ok = solve_at(mu, free)
        psi = x @ qn @ x
        # A solution dominated by the ridge (r||x||² > xᵀGx) belongs to a QP that is
        # unbounded without it: {J d >= μ1} is empty, μ is above the answer.
        ridge_part = r * (x @ x)
        below = (psi <= rho2) & (ridge_part <= psi - ridge_part)
        lo = jnp.where(below, jnp.maximum(lo, mu), lo)
        hi = jnp.where(below, hi, jnp.minimum(hi, mu))
        x_in = jnp.where(below, x, x_in)
        mu_n = closed_form(free)
        inside = jnp.isfinite(mu_n) & (mu_n >= lo) & (mu_n <= hi)
        mu_next = jnp.where(inside, mu_n, 0.5 * (lo + hi))
        width = 8 * eps * (jnp.abs(lo) + jnp.abs(hi)) + jnp.finfo(dtype).tiny
        done = ((jnp.abs(psi - rho2) <= tol * rho2) | (jnp.abs(hi - lo) <= width)
                | (jnp.abs(mu_next - mu) <= width))
        return (jnp.where(done, mu, mu_next), lo, hi, free, x_in, x, psi, it + 1, done,
                qp_ok & ok)

    zeros = jnp.zeros((k,), dtype)
    # x(mu_lo) = 0 (d = g0) is inside the ball. The first point tried is μ = 0: there the
    # QP is the projection of g0 onto the dual cone {d : J d >= 0}, bounded even for a
    # singular G; if it lies in the ball, the answer conflicts with no task (μ* >= 0) and
    # the search continues above 0, else below.
    mu0 = jnp.clip(jnp.zeros((), dtype), mu_lo, mu_hi)
    init = (mu0, mu_lo, mu_hi, jnp.zeros((k,), bool), zeros, zeros, jnp.zeros((), dtype),
            jnp.int32(0), jnp.bool_(False), jnp.bool_(True))
    _, _, _, _, x_in, x_last, psi, it, done, qp_ok = jax.lax.while_loop(cond, body, init)
    # On the sphere (|ψ - c²||g0||²| within tol) the last iterate is the answer; otherwise
    # the root sits at a jump of ψ and the last point inside the ball is returned.
    on_sphere = jnp.abs(psi - rho2) <= tol * rho2
    x = jnp.where(on_sphere, x_last, x_in)
    return SolverResult(x=jnp.where(mask, b + x, 0.0), converged=done & qp_ok, iterations=it)


@base.register("cagrad", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def cagrad(c: float = 0.4, rescale: int = 1) -> base.Method:
    """CAGrad: the best worst-case update within ``c ||g0||`` of the mean gradient ``g0``.

    The update is ``d = g0 + (c ||g0|| / ||g_w||) g_w`` with
    ``w = argmin_{w in simplex} g_wᵀ g0 + c ||g0|| ||g_w||``, solved exactly from the
    Gramian (see the module docstring and :func:`cagrad_weights`), then divided by
    ``1 + c²`` (``rescale=1``, the default of the paper's code), ``1 + c``
    (``rescale=2``, the paper code's other option) or not at all (``rescale=0``, as
    torchjd's ``CAGrad`` and LibMTL). ``c = 0`` gives the mean gradient. The paper code's
    ``1e-8`` safeguards are replaced by a ridge relative to the Gramian's scale, and the
    Gramian is the pre-scaled one, so the weights do not depend on the gradients' scale.

    When the tasks' gradients can cancel out (0 in their convex hull) and the ball holds
    non-conflicting directions, every direction in the ball has ``min_i g_iᵀd <= 0`` and
    the optimum 0 is reached on a set; jmtl returns its point closest to ``g0`` (the
    paper's formula divides by ``||g_w|| ≈ 0`` there and returns rounding noise).

    Task-specific parameters (heads) receive their own unweighted gradient (paper code).
    The root finding converges in a few iterations; were its bound reached, the last
    point found inside the ball is used (at worst the mean gradient).

    Args:
      c: radius of the ball around ``g0`` relative to ``||g0||`` (paper: 0.4); may be
        traced (e.g. an optax schedule).
      rescale: 0, 1 or 2 as in the paper's code (default 1).

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, weights output; ``g0``
      is the mean over the present tasks, absent tasks get weight 0).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.cagrad(c=0.4)
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 1.0]]), m.init(2))
      >>> [round(x, 4) for x in update.tolist()]   # symmetric: (1 + c) g0 / (1 + c²)
      [0.6034, 0.6034]

    References:
      Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
      Learning", NeurIPS 2021.
    """
    if _checks.is_concrete(c) and not float(c) >= 0:
        raise ValueError(f"method 'cagrad': c must be >= 0, got {c}")
    if rescale not in _RESCALES:
        raise ValueError(f"method 'cagrad': rescale must be 0, 1 or 2, got {rescale!r}")

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState):
        gram, present = inputs.gramian, inputs.present
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        cc = jnp.asarray(c, dtype)
        factor = (1.0, 1.0 / (1.0 + cc * cc), 1.0 / (1.0 + cc))[rescale]
        w = cagrad_weights(gram, cc, present).x
        return w * factor, state

    return base.Method(name="cagrad", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False)
