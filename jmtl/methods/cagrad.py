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

import jax
import jax.numpy as jnp

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers import active_set

__all__ = ["cagrad", "cagrad_weights"]


def _cagrad_weights_impl(gramian: jax.Array, c: float = 0.4, mask: jax.Array | None = None, *,
                   ridge: float | None = None, max_iter: int = 50) -> jax.Array:
    """Implementation of :func:`cagrad_weights` (jitted there)."""
    dtype = jnp.result_type(jnp.float32, gramian.dtype)
    k = gramian.shape[-1]
    if mask is None:
        mask = jnp.ones((k,), bool)
    qn, _, mask = active_set._prepare(jnp.asarray(gramian, dtype), mask, ridge)
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
    tol = active_set._default_tol(dtype, k)
    eps = jnp.finfo(dtype).eps
    qp_iter = 3 * k + 10
    ones = jnp.ones((k,), dtype)

    def solve_at(mu, free):
        q = jnp.where(mask, cvec - mu, 0.0)
        res = active_set._bpp(qn, q[None], (free & mask)[None], qp_iter, tol)
        return res.x[0], res.free[0]

    def closed_form(free):
        rhs = jnp.stack([jnp.where(mask, ones, 0.0), cvec])
        sol = active_set._masked_solve(qn, rhs, jnp.stack([free, free]))
        pf, r0 = sol[0], sol[1]
        f = free.astype(dtype)
        a = f @ pf
        bb = f @ r0
        cc = (f * cvec) @ r0
        disc = jnp.maximum(bb * bb - a * (cc - rho2), 0.0)
        ok = a > 1e-6 * jnp.finfo(dtype).eps
        return jnp.where(ok, (bb + jnp.sqrt(disc)) / jnp.where(ok, a, 1.0), jnp.nan)

    def cond(s):
        *_, it, done = s
        return (~done) & (it < max_iter)

    def body(s):
        mu, lo, hi, free, _, it, _ = s
        x, free = solve_at(mu, free)
        psi = x @ qn @ x
        below = psi < rho2
        lo = jnp.where(below, jnp.maximum(lo, mu), lo)
        hi = jnp.where(below, hi, jnp.minimum(hi, mu))
        mu_n = closed_form(free)
        inside = jnp.isfinite(mu_n) & (mu_n >= lo) & (mu_n <= hi)
        mu_next = jnp.where(inside, mu_n, 0.5 * (lo + hi))
        width = 8 * eps * (jnp.abs(lo) + jnp.abs(hi)) + jnp.finfo(dtype).tiny
        done = (jnp.abs(psi - rho2) <= tol * rho2) | (jnp.abs(mu_next - mu) <= width)
        return jnp.where(done, mu, mu_next), lo, hi, free, x, it + 1, done

    init = (mu_lo, mu_lo, mu_hi, jnp.zeros((k,), bool), jnp.zeros((k,), dtype), jnp.int32(0),
            jnp.bool_(False))
    _, _, _, _, x, _, _ = jax.lax.while_loop(cond, body, init)
    return jnp.where(mask, b + x, 0.0)


_cagrad_weights_jit = jax.jit(_cagrad_weights_impl, static_argnames=('c', 'ridge', 'max_iter'))


def cagrad_weights(gramian: jax.Array, c: float = 0.4, mask: jax.Array | None = None, *,
                   ridge: float | None = None, max_iter: int = 50) -> jax.Array:
    """Unscaled CAGrad weights ``b + x`` (the update is ``Jᵀ(b + x)``, before rescaling).

    Args:
      gramian: ``(K, K)`` Gramian ``J Jᵀ``.
      c: radius of the ball around the mean gradient, relative to its norm.
      mask: optional ``(K,)`` bool of present tasks (the mean is over them; others get 0).
      ridge: relative ridge added to ``G`` (see :func:`jmtl.solvers.nonneg_qp`).
      max_iter: bound on the outer (root-finding) iterations.

    Returns:
      ``(K,)`` weights ``b + x`` with ``b_i = 1/K_present``.

    Examples:
      >>> import jax.numpy as jnp
      >>> w = cagrad_weights(jnp.eye(2), c=0.0)
      >>> [round(v, 4) for v in w.tolist()]
      [0.5, 0.5]
    """
    return _cagrad_weights_jit(gramian, c, mask, ridge=ridge, max_iter=max_iter)


@base.register("cagrad", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def cagrad(c: float = 0.4, rescale: int = 1) -> base.Method:
    """CAGrad: the best worst-case update within ``c ||g0||`` of the mean gradient ``g0``.

    The update is ``d = g0 + (c ||g0|| / ||g_w||) g_w`` with
    ``w = argmin_{w in simplex} g_wᵀ g0 + c ||g0|| ||g_w||``, solved exactly from the
    Gramian (see the module docstring), then divided by ``1 + c²`` (``rescale=1``, the
    default of the paper's code), ``1 + c`` (``rescale=2``) or not at all
    (``rescale=0``). ``c = 0`` gives the mean gradient. The paper code's ``1e-8``
    safeguards are replaced by a ridge relative to the Gramian's scale.

    Args:
      c: radius of the ball around ``g0`` relative to ``||g0||`` (paper: 0.4).
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
    if c < 0:
        raise ValueError(f"method 'cagrad': c must be >= 0, got {c}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"method 'cagrad': rescale must be 0, 1 or 2, got {rescale!r}")
    factor = {0: 1.0, 1: 1.0 / (1.0 + c * c), 2: 1.0 / (1.0 + c)}[rescale]

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState):
        gram, present = inputs.gramian, inputs.present
        _checks.check_finite(gram, method="cagrad", what="Gramian")
        w = cagrad_weights(gram, c, present)
        return w * factor, state

    return base.Method(name="cagrad", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False, hparams=(("c", c), ("rescale", rescale)))
