"""Exact non-negative QPs and the projection onto the dual cone of a Jacobian's rows.

The core is a block principal pivoting active-set method (Júdice & Pires 1994; the
NNLS variant of Kim & Park 2011) for

    min_{x >= 0}  ½ xᵀ Q x + qᵀ x          (Q symmetric positive semi-definite).

Each iteration solves one masked linear system (a Cholesky factorisation of the
free block), swaps every variable that violates the KKT conditions between the free
and the active set, and falls back to Murty's single-swap rule when the number of
violations stops decreasing, which guarantees finite termination for positive
definite ``Q``. Once the active set is right the solution is exact to rounding, so
the KKT conditions hold to machine precision. The cost is independent of the number of
parameters.

Batches of problems sharing ``Q`` (UPGrad's K projections) solve the free-block systems
by Jacobi-preconditioned conjugate gradients instead, warm-started from the previous
pivot iteration: one iteration is a single ``(B, K) @ (K, K)`` product for the whole
batch, where a factorisation costs ``O(K³)`` per problem. CG runs to about the accuracy
of a Cholesky solve, and the result is accepted only if the full KKT conditions hold
with the true ``y = Qx + q`` (stationarity on the free set included). If a solve misses
its tolerance within ``2K + 20`` iterations (ill-conditioned ``Q``), the direct method
finishes from the free sets reached so far, so the answer is exact either way.

Block pivoting can need many single swaps on degenerate problems (singular ``Q`` with
a tiny ridge, e.g. MGDA's min-norm QP on a 20×10 Jacobian: up to 140 iterations in
float64). It is therefore given a budget of iterations (:func:`bpp_budget`);
problems it leaves unsolved are finished by the Lawson–Hanson active-set method
(Lawson & Hanson 1974, ch. 23) started from the clipped point reached: each of its
iterations adds the most violated variable or steps back to feasibility, the objective
decreases monotonically and every iterate is feasible (``x >= 0``). It runs for at most
``max_iter`` iterations (default :func:`default_max_iter`, ``10K + 50``; about ``K``
are typical). A final refinement step (one more solve with the residual of the free
block) polishes the solution, so float32 results agree to rounding across row orders.

Convergence is reported: :class:`NonnegQPResult` ``.converged`` is False when the KKT
conditions do not hold to ``tol`` after ``max_iter`` iterations; ``x`` is then the last
Lawson–Hanson iterate, feasible and with an objective no larger than at ``x = 0``.

Scale: ``Q`` is divided by its largest diagonal entry before solving (the solution
is rescaled back), and a ridge ``ridge · max(diag Q)`` is added to its diagonal so
singular ``Q`` (duplicated or zero rows, K > rank) stays positive definite.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["NonnegQPResult", "nonneg_qp", "project_dual_cone", "default_ridge",
           "default_tol", "default_max_iter"]

# Patience of the "swap every violator" rule before Murty's single swap (Kim & Park use 3).
_PATIENCE = 3
# CG solves aim at this fraction of the KKT tolerance (about a Cholesky solve's accuracy)
# and are accepted at the second one (leaving room for drift of the recursive residual).
_CG_TARGET = 0.01
_CG_ACCEPT = 0.25
# Batches of at least this many problems use the CG path.
_CG_MIN_BATCH = 2


class NonnegQPResult(NamedTuple):
    """Solution of :func:`nonneg_qp`.

    Attributes:
      x: ``(..., K)`` the minimiser (exactly 0 on the active set).
      free: ``(..., K)`` bool, the variables left free (the complement of the active set).
      iterations: ``(...)`` int32, pivot iterations used.
      converged: ``(...)`` bool, whether the KKT conditions hold to the tolerance.
    """

    x: jax.Array
    free: jax.Array
    iterations: jax.Array
    converged: jax.Array


def default_ridge(dtype) -> float:
    """The relative ridge the solvers add to ``Q``'s diagonal by default.

    ``1e-12`` in float64 and ``1e-6`` in float32 (relative to the largest diagonal
    entry): small enough to leave well-posed problems unchanged at the dtype's
    precision, large enough for the Cholesky factorisation of a singular ``Q``.

    Examples:
      >>> default_ridge(jnp.float32)
      1e-06
    """
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def default_tol(dtype, k: int) -> float:
    """The relative KKT tolerance of the solvers: ``100 sqrt(K) eps`` of the dtype.

    Examples:
      >>> default_tol(jnp.float64, 4) < 1e-13
      True
    """
    return float(100.0 * (k ** 0.5) * jnp.finfo(dtype).eps)


def default_max_iter(k: int) -> int:
    """Default bound ``10K + 50`` on the Lawson–Hanson iterations (about ``K`` are typical).

    Examples:
      >>> default_max_iter(20)
      250
    """
    return 10 * k + 50


def bpp_budget(k: int, batch: int, max_iter: int) -> int:
    """Iterations given to block pivoting before Lawson–Hanson takes over.

    ``K + 10`` for batches (UPGrad's K projections: one Lawson–Hanson iteration costs a
    batched factorisation), 12 for a single problem (Lawson–Hanson needs about as many
    iterations as the solution has positive entries); at most ``max_iter``.
    """
    return min(max_iter, k + 10 if batch >= _CG_MIN_BATCH else 12)


def _tiers(k: int) -> tuple[int, ...]:
    """Sizes of the free-block systems compiled for a K-variable problem (the last is K)."""
    return tuple(sorted({t for t in (8, 32, 64) if t < k} | {k}))


def _chol_unrolled(mat: jax.Array) -> jax.Array:
    """Batched Cholesky factor of small ``(B, m, m)`` matrices, unrolled over columns.

    For ``m <= 8`` this is several times faster on CPU than a loop of LAPACK calls.
    """
    m = mat.shape[-1]
    rows = jnp.arange(m)
    cols = []
    a = mat
    for j in range(m):
        d = jnp.sqrt(a[:, j, j])
        c = jnp.where(rows[None, :] >= j, a[:, :, j] / d[:, None], 0.0)
        cols.append(c)
        a = a - c[:, :, None] * c[:, None, :]
    return jnp.stack(cols, axis=-1)


def _cho_solve(mat: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solves the batched SPD systems ``mat x = rhs`` (``(B, m, m)``, ``(B, m)``)."""
    m = mat.shape[-1]
    if m <= 8:
        chol = _chol_unrolled(mat)
    else:
        chol = jnp.linalg.cholesky(mat)
    return jax.scipy.linalg.cho_solve((chol, True), rhs[..., None])[..., 0]


def _solve_block(q_mat: jax.Array, rhs: jax.Array, free: jax.Array, m: int) -> jax.Array:
    """Solves ``Q_FF x_F = rhs_F`` (x = 0 off F) for a batch whose free sets have <= m entries.

    The free variables of each problem are gathered into an ``m × m`` system padded with
    the identity, so the factorisation costs ``O(m³)`` instead of ``O(K³)``.
    """
    b, k = rhs.shape
    dtype = q_mat.dtype
    if m == k:
        mat = jnp.where(free[:, :, None] & free[:, None, :], q_mat[None], jnp.eye(k, dtype=dtype))
        return jnp.where(free, _cho_solve(mat, jnp.where(free, rhs, 0.0)), 0.0)
    # Compact the free indices to the front (cumsum + scatter; cheaper than a sort).
    pos = jnp.cumsum(free, axis=1) - 1
    pos = jnp.where(free, pos, m)                      # non-free: out of range, dropped
    rows = jnp.arange(b)[:, None]
    order = jnp.zeros((b, m), jnp.int32).at[rows, pos].set(
        jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k)), mode="drop")
    valid = jnp.arange(m)[None, :] < jnp.sum(free, axis=1, keepdims=True)
    sub = q_mat[order[:, :, None], order[:, None, :]]
    sub = jnp.where(valid[:, :, None] & valid[:, None, :], sub, jnp.eye(m, dtype=dtype))
    r = jnp.where(valid, jnp.take_along_axis(rhs, order, axis=1), 0.0)
    y = jnp.where(valid, _cho_solve(sub, r), 0.0)
    return jnp.zeros_like(rhs).at[rows, jnp.where(valid, order, k)].set(y, mode="drop")


def masked_solve(q_mat: jax.Array, rhs: jax.Array, free: jax.Array) -> jax.Array:
    """Batched ``Q_FF x_F = rhs_F``; picks the smallest compiled block size that fits."""
    k = rhs.shape[-1]
    tiers = _tiers(k)
    if len(tiers) == 1:
        return _solve_block(q_mat, rhs, free, k)
    nfree = jnp.max(jnp.sum(free, axis=1))
    index = jnp.sum(nfree > jnp.asarray(tiers[:-1]))
    branches = [lambda r, f, m=m: _solve_block(q_mat, r, f, m) for m in tiers]
    return jax.lax.switch(index, branches, rhs, free)


def _pivot(free: jax.Array, bad: jax.Array, ninf: jax.Array, patience: jax.Array):
    """One block principal pivoting step for a batch of problems (Júdice & Pires).

    Every infeasible index swaps sides while the infeasible count keeps falling or
    patience lasts; otherwise only the last infeasible index swaps (Murty's rule),
    which guarantees termination.

    Returns:
      ``(new_free, new_ninf, new_patience)``.
    """
    idx = jnp.arange(free.shape[-1])
    n = jnp.sum(bad, axis=1, dtype=jnp.int32)
    improved = n < ninf
    full = improved | (patience > 0)
    last = jnp.max(jnp.where(bad, idx, -1), axis=1)
    swap = jnp.where(full[:, None], bad, idx[None, :] == last[:, None])
    new_ninf = jnp.where(improved, n, ninf)
    new_pat = jnp.where(improved, _PATIENCE, jnp.where(full, patience - 1, patience))
    return free ^ swap, new_ninf, new_pat


def _bpp(q_mat: jax.Array, q: jax.Array, free0: jax.Array, max_iter: int,
         tol: float) -> NonnegQPResult:
    """Block principal pivoting on a batch ``q: (B, K)`` of problems sharing ``Q`` (PD)."""
    k = q.shape[-1]
    diag_max = jnp.max(jnp.abs(jnp.diag(q_mat)))
    q_scale = jnp.max(jnp.abs(q), axis=1, keepdims=True)

    def evaluate(free):
        x = masked_solve(q_mat, -q, free)
        y = x @ q_mat + q
        x_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True)
        y_scale = q_scale + diag_max * x_scale
        bad = (free & (x < -tol * x_scale)) | (~free & (y < -tol * y_scale))
        return x, bad

    def cond(s):
        _, _, bad, _, _, it = s
        return jnp.any(bad) & (it < max_iter)

    def body(s):
        free, _, bad, ninf, patience, it = s
        new_free, new_ninf, new_pat = _pivot(free, bad, ninf, patience)
        x, new_bad = evaluate(new_free)
        return new_free, x, new_bad, new_ninf, new_pat, it + 1

    b = q.shape[0]
    x0, bad0 = evaluate(free0)
    init = (free0, x0, bad0, jnp.full((b,), k + 1, jnp.int32),
            jnp.full((b,), _PATIENCE, jnp.int32), jnp.int32(0))
    free, x, bad, _, _, it = jax.lax.while_loop(cond, body, init)
    x = jnp.where(free, jnp.maximum(x, 0.0), 0.0)
    return NonnegQPResult(x=x, free=free, iterations=jnp.full((b,), it),
                          converged=~jnp.any(bad, axis=1))


def _cg_cap(k: int) -> int:
    """CG iterations per solve before handing over to the direct method.

    Exact arithmetic needs at most K; rounding (loss of conjugacy for ill-conditioned
    ``Q``) needs more. At this bound the CG iterations cost about as much as the direct
    method's pivot iterations they replace.
    """
    return 2 * k + 20


def _cg_solve(q_mat: jax.Array, q: jax.Array, free: jax.Array, x: jax.Array,
              d_inv: jax.Array, y_base: jax.Array, diag_max: jax.Array, tol: float,
              cap: int) -> tuple[jax.Array, jax.Array]:
    """Batched ``Q_FF x_F = -q_F`` (x = 0 off F) by Jacobi-preconditioned conjugate gradients.

    All problems share ``Q``, so one iteration is one ``(B, K) @ (K, K)`` product, against
    a Cholesky factorisation per problem for the direct path. ``x`` is the warm start.
    Iterates until every residual entry is below ``_CG_TARGET · tol`` times the KKT scale
    ``y_base + diag_max · max|x|`` (about the accuracy of a Cholesky solve) or for ``cap``
    iterations; returns ``x`` and, per problem, whether the residual got below
    ``_CG_ACCEPT · tol`` times that scale without breakdown.
    """
    def above(x, r, frac):
        scale = y_base + diag_max * jnp.max(jnp.abs(x), axis=1, keepdims=True)
        return jnp.any(jnp.abs(r) > (frac * tol) * scale, axis=1, keepdims=True)

    def live_of(x, r):
        return above(x, r, _CG_TARGET)

    x = jnp.where(free, x, 0.0)
    r = -jnp.where(free, x @ q_mat + q, 0.0)
    z = r * d_inv
    rz = jnp.sum(r * z, axis=1, keepdims=True)
    live = live_of(x, r)

    def cond(s):
        return jnp.any(s[4]) & (s[6] < cap)

    def body(s):
        x, r, p, rz, live, broke, it = s
        ap = jnp.where(free, p @ q_mat, 0.0)
        pap = jnp.sum(p * ap, axis=1, keepdims=True)
        step = live & (pap > 0)
        alpha = jnp.where(step, rz / jnp.where(step, pap, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        z = r * d_inv
        rz_new = jnp.sum(r * z, axis=1, keepdims=True)
        beta = jnp.where(step, rz_new / jnp.where(step, rz, 1.0), 0.0)
        p = z + beta * p
        return x, r, p, rz_new, step & live_of(x, r), broke | (live & ~step), it + 1

    init = (x, r, z, rz, live, jnp.zeros_like(live), jnp.int32(0))
    x, r, _, _, _, broke, _ = jax.lax.while_loop(cond, body, init)
    return x, ~(above(x, r, _CG_ACCEPT) | broke)[:, 0]


def _bpp_cg(q_mat: jax.Array, q: jax.Array, free0: jax.Array | None, max_iter: int,
            tol: float, cg_iter: int) -> NonnegQPResult:
    """Block principal pivoting as :func:`_bpp`, with the free-block systems solved by CG.

    Every accepted solution is checked against the full KKT conditions, stationarity on
    the free set included, with the true ``y = Qx + q``. ``converged`` is False as soon
    as a CG solve misses its tolerance (ill-conditioned ``Q``) or its true residual does;
    the caller then finishes with the direct method.
    """
    b, k = q.shape
    d = jnp.diag(q_mat)
    d_inv = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 1.0)
    diag_max = jnp.max(jnp.abs(d))
    q_scale = jnp.max(jnp.abs(q), axis=1, keepdims=True)

    def evaluate(free, x_warm):
        x, ok = _cg_solve(q_mat, q, free, x_warm, d_inv, q_scale, diag_max, tol, cg_iter)
        y = x @ q_mat + q
        x_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True)
        y_scale = q_scale + diag_max * x_scale
        bad = (free & (x < -tol * x_scale)) | (~free & (y < -tol * y_scale))
        stationary = jnp.all(~free | (jnp.abs(y) <= tol * y_scale), axis=1)
        return x, bad, jnp.any(~(ok & stationary))

    def cond(s):
        _, _, bad, failed, _, _, it = s
        return jnp.any(bad) & (it < max_iter) & ~failed

    def body(s):
        free, x, bad, _, ninf, patience, it = s
        new_free, new_ninf, new_pat = _pivot(free, bad, ninf, patience)
        x, new_bad, failed = evaluate(new_free, x)
        return new_free, x, new_bad, failed, new_ninf, new_pat, it + 1

    ninf0 = jnp.full((b,), k + 1, jnp.int32)
    it0 = jnp.int32(0)
    if free0 is None:
        # The first pivot from x = 0 frees exactly the variables with q_i < 0 (y = q).
        free0 = q < -tol * q_scale
        ninf0 = jnp.sum(free0, axis=1, dtype=jnp.int32)
        it0 = jnp.int32(1)
    x0, bad0, failed0 = evaluate(free0, jnp.zeros_like(q))
    init = (free0, x0, bad0, failed0, ninf0, jnp.full((b,), _PATIENCE, jnp.int32), it0)
    free, x, bad, failed, _, _, it = jax.lax.while_loop(cond, body, init)
    x = jnp.where(free, jnp.maximum(x, 0.0), 0.0)
    return NonnegQPResult(x=x, free=free, iterations=jnp.full((b,), it),
                          converged=~jnp.any(bad, axis=1) & ~failed)


def prepare(q_mat: jax.Array, mask: jax.Array | None, ridge) -> tuple[jax.Array, jax.Array,
                                                                     jax.Array]:
    """Normalises ``Q`` by its largest diagonal entry, masks absent variables, adds the ridge.

    Args:
      q_mat: ``(K, K)`` symmetric PSD matrix.
      mask: ``(K,)`` bool of the variables taking part, or ``None`` (all).
      ridge: relative ridge (``None``: :func:`default_ridge`); may be traced.

    Returns:
      ``(qn, scale, mask)``: ``qn = Q / scale + ridge · I`` with identity rows and columns
      for masked-out variables, and ``scale = max(diag Q)`` (1 for a zero matrix).
    """
    k = q_mat.shape[-1]
    dtype = q_mat.dtype
    eye = jnp.eye(k, dtype=dtype)
    if mask is None:
        mask = jnp.ones((k,), bool)
    pair = mask[:, None] & mask[None, :]
    q_mat = jnp.where(pair, q_mat, 0.0)
    q_mat = 0.5 * (q_mat + q_mat.T)
    scale = jnp.max(jnp.abs(jnp.diag(q_mat)))
    scale = jnp.where(jnp.isfinite(scale) & (scale > jnp.finfo(dtype).tiny), scale, 1.0)
    qn = q_mat / scale
    if ridge is None:
        ridge = default_ridge(dtype)
    qn = qn + jnp.asarray(ridge, dtype) * eye
    # Absent variables: an identity row/column, so they decouple and solve to 0.
    qn = jnp.where(pair | (eye > 0), qn, 0.0)
    qn = jnp.where(mask[:, None] | mask[None, :], qn, eye)
    return qn, scale, mask


def _kkt(q_mat, q, x, free, tol):
    """``(y, violated)``: the gradient ``y = Qx + q`` and the active variables with ``y < 0``."""
    diag_max = jnp.max(jnp.abs(jnp.diag(q_mat)))
    q_scale = jnp.max(jnp.abs(q), axis=1, keepdims=True)
    x_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    y = x @ q_mat + q
    return y, ~free & (y < -tol * (q_scale + diag_max * x_scale)), q_scale + diag_max * x_scale


def _lawson_hanson(q_mat: jax.Array, q: jax.Array, x0: jax.Array, max_iter: int,
                   tol) -> NonnegQPResult:
    """Lawson–Hanson active-set iterations on a batch of problems sharing ``Q`` (PD).

    Starts from the feasible ``x0 >= 0`` with the free set its support. Each iteration
    solves the free block; if the solution is positive it is accepted and the most
    violated active variable is freed (or the problem is solved), otherwise the iterate
    moves towards it until the first free variable reaches 0, which becomes active.
    Iterates stay feasible and the objective never increases.
    """
    b, k = q.shape
    idx = jnp.arange(k)[None, :]

    def cond(s):
        _, _, done, it = s
        return jnp.any(~done) & (it < max_iter)

    def body(s):
        x, free, done, it = s
        z = jnp.where(free, masked_solve(q_mat, -q, free), 0.0)
        feasible = jnp.all(~free | (z > 0), axis=1, keepdims=True)
        # Infeasible: step from x towards z until the first free variable reaches 0.
        block = free & (z <= 0)
        ratio = jnp.where(block, x / jnp.where(block, x - z, 1.0), jnp.inf)
        first = jnp.argmin(ratio, axis=1)[:, None]
        step = jnp.clip(jnp.min(ratio, axis=1, keepdims=True), 0.0, 1.0)
        xb = jnp.where(free, x + step * (z - x), 0.0)
        drop = free & ((xb <= 0) | (idx == first))
        # Feasible: accept z and free the most violated active variable.
        _, viol, y_scale = _kkt(q_mat, q, z, free, tol)
        y = z @ q_mat + q
        worst = jnp.argmin(jnp.where(viol, y / y_scale, jnp.inf), axis=1)[:, None]
        any_viol = jnp.any(viol, axis=1, keepdims=True)
        new_x = jnp.where(feasible, z, jnp.where(drop, 0.0, xb))
        new_free = jnp.where(feasible, free | (any_viol & (idx == worst)), free & ~drop)
        keep = done[:, None]
        return (jnp.where(keep, x, new_x), jnp.where(keep, free, new_free),
                done | (feasible & ~any_viol)[:, 0], it + 1)

    x0 = jnp.maximum(x0, 0.0)
    init = (x0, x0 > 0, jnp.zeros((b,), bool), jnp.int32(0))
    x, free, done, it = jax.lax.while_loop(cond, body, init)
    return NonnegQPResult(x=x, free=free, iterations=jnp.full((b,), it), converged=done)


def _polish(q_mat: jax.Array, q: jax.Array, res: NonnegQPResult) -> NonnegQPResult:
    """One step of iterative refinement of the free-block solution (converged problems)."""
    r = jnp.where(res.free, -(res.x @ q_mat + q), 0.0)
    dx = masked_solve(q_mat, r, res.free)
    x = jnp.where(res.converged[:, None] & res.free, jnp.maximum(res.x + dx, 0.0), res.x)
    return res._replace(x=x)


def solve_prepared(qn: jax.Array, q: jax.Array, free0: jax.Array | None, max_iter: int,
                   tol) -> NonnegQPResult:
    """Solves a batch ``q: (B, K)`` of problems on a :func:`prepare`-d matrix ``qn``.

    Block principal pivoting (by CG for batches of at least two, finished by the direct
    method) for :func:`bpp_budget` iterations, warm-started from ``free0`` when given;
    problems it leaves unsolved go to Lawson–Hanson from the clipped point reached, for
    ``max_iter`` iterations; the result is polished by one refinement step.
    """
    b, k = q.shape
    budget = bpp_budget(k, b, max_iter)
    if b < _CG_MIN_BATCH:
        f0 = jnp.zeros(q.shape, bool) if free0 is None else free0
        res = _bpp(qn, q, f0, budget, tol)
    else:
        res = _bpp_cg(qn, q, free0, budget, tol, _cg_cap(k))

        def direct(res):
            out = _bpp(qn, q, res.free, budget, tol)
            return out._replace(iterations=out.iterations + res.iterations)

        res = jax.lax.cond(jnp.all(res.converged), lambda r: r, direct, res)

    def finish(res):
        x0 = jnp.where(res.converged[:, None], res.x, jnp.maximum(res.x, 0.0))
        out = _lawson_hanson(qn, q, x0, max_iter, tol)
        out = jax.tree_util.tree_map(
            lambda a, c: jnp.where(jnp.reshape(res.converged, (b,) + (1,) * (a.ndim - 1)),
                                   c, a), out, res)
        return out._replace(iterations=out.iterations + res.iterations)

    res = jax.lax.cond(jnp.all(res.converged), lambda r: r, finish, res)
    return _polish(qn, q, res)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def nonneg_qp(q_mat: jax.Array, q: jax.Array, mask: jax.Array | None = None, *,
              ridge: float | None = None, free0: jax.Array | None = None,
              max_iter: int | None = None, tol: float | None = None) -> NonnegQPResult:
    """Solves ``min_{x >= 0} ½ xᵀ Q x + qᵀ x`` exactly (active-set methods).

    Args:
      q_mat: ``(K, K)`` symmetric positive semi-definite matrix.
      q: ``(K,)`` linear term, or ``(B, K)`` for B problems sharing ``Q`` (solved in a
        batch).
      mask: optional ``(K,)`` bool; variables with ``False`` are fixed to 0 and removed
        from the problem.
      ridge: relative ridge: ``ridge · max(diag Q)`` is added to the diagonal (default
        :func:`default_ridge`; may be traced). Pass 0.0 only for a positive definite ``Q``.
      free0: optional ``(K,)`` / ``(B, K)`` bool initial free set (warm start);
        default: all variables at 0.
      max_iter: bound on the Lawson–Hanson iterations that finish what block pivoting
        (at most ``K + 10`` iterations) leaves unsolved (static; default
        :func:`default_max_iter`, ``10K + 50``).
      tol: relative KKT tolerance used to accept the active set (default
        :func:`default_tol`, ``100 sqrt(K) eps``).

    Returns:
      A :class:`NonnegQPResult`; ``x`` has the shape of ``q`` and the dtype of
      ``Q`` / ``q`` (float32, or float64 when an input is float64). ``converged`` is
      False where the KKT conditions do not hold after ``max_iter`` iterations; ``x`` is
      then feasible and its objective is at most that of ``x = 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> res = nonneg_qp(jnp.eye(2), jnp.array([-1.0, 2.0]), ridge=0.0)
      >>> res.x.tolist(), bool(res.converged)
      ([1.0, 0.0], True)

    References:
      Júdice & Pires, "A block principal pivoting algorithm for large-scale strictly
      monotone linear complementarity problems", Computers & OR 21(5), 1994.
      Kim & Park, "Fast nonnegative matrix factorization: an active-set-like method and
      comparisons", SIAM J. Sci. Comput. 33(6), 2011.
      Lawson & Hanson, "Solving Least Squares Problems", Prentice-Hall, 1974, ch. 23.
    """
    dtype = jnp.result_type(jnp.float32, q_mat.dtype, q.dtype)
    q_mat = jnp.asarray(q_mat, dtype)
    q = jnp.asarray(q, dtype)
    k = q_mat.shape[-1]
    if q_mat.shape != (k, k) or q.shape[-1] != k or q.ndim not in (1, 2):
        raise ValueError(f"nonneg_qp: Q has shape {q_mat.shape} and q {q.shape}; expected "
                         "(K, K) and (K,) or (B, K)")
    qn, scale, mask = prepare(q_mat, mask, ridge)
    qv = jnp.where(mask, q / scale, 0.0)
    if max_iter is None:
        max_iter = default_max_iter(k)
    if tol is None:
        tol = default_tol(dtype, k)
    if free0 is not None:
        free0 = jnp.broadcast_to(free0, q.shape) & mask
    qb = qv if q.ndim == 2 else qv[None]
    f0 = None if free0 is None else (free0 if q.ndim == 2 else free0[None])
    res = solve_prepared(qn, qb, f0, max_iter, tol)
    if q.ndim == 1:
        res = jax.tree_util.tree_map(lambda a: a[0], res)
    return res


@functools.partial(jax.jit, static_argnames=("max_iter",))
def project_dual_cone(gramian: jax.Array, u: jax.Array, mask: jax.Array | None = None, *,
                      ridge: float | None = None, max_iter: int | None = None,
                      tol: float | None = None) -> NonnegQPResult:
    """Weights of the projection of ``Jᵀu`` onto the dual cone ``{x : J x >= 0}``.

    With ``G = J Jᵀ``, the projection of ``Jᵀu`` onto the cone of directions that
    conflict with no row of ``J`` is ``Jᵀ w`` where ``w = u + λ`` and ``λ >= 0``
    minimises ``½ λᵀGλ + λᵀGu`` (the dual of the projection). Equivalently ``w``
    minimises ``wᵀ G w`` subject to ``w >= u`` (torchjd's formulation). Only ``G`` is
    needed, so the cost does not depend on the number of parameters.

    Args:
      gramian: ``(K, K)`` Gramian ``J Jᵀ``.
      u: ``(K,)`` weights of the vector to project, or ``(B, K)`` for B vectors
        (e.g. the identity for UPGrad's per-row projections).
      mask: optional ``(K,)`` bool of rows taking part; other rows are ignored and get
        weight 0.
      ridge: relative ridge added to ``G`` (see :func:`nonneg_qp`).
      max_iter: iteration bound (see :func:`nonneg_qp`).
      tol: KKT tolerance (see :func:`nonneg_qp`).

    Returns:
      A :class:`NonnegQPResult` whose ``x`` is ``w`` with the shape of ``u``:
      ``J (Jᵀ w) >= 0``, ``w >= u``, and ``(w - u)_i > 0`` only where ``(G w)_i = 0``.
      Where ``converged`` is False, ``w >= u`` still holds but the cone constraint may not.

    Examples:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # two conflicting gradients
      >>> res = project_dual_cone(g @ g.T, jnp.array([1.0, 0.0]))
      >>> [round(x, 4) for x in (res.x @ g).tolist()]   # g_1 projected: orthogonal to g_2
      [0.5, 0.5]

    References:
      Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
      Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS
      2017.
    """
    dtype = jnp.result_type(jnp.float32, gramian.dtype, u.dtype)
    gramian = jnp.asarray(gramian, dtype)
    k = gramian.shape[-1]
    if mask is None:
        mask = jnp.ones((k,), bool)
    u = jnp.where(mask, jnp.asarray(u, dtype), 0.0)
    g = jnp.where(mask[:, None] & mask[None, :], gramian, 0.0)
    res = nonneg_qp(g, u @ g, mask, ridge=ridge, max_iter=max_iter, tol=tol)
    return res._replace(x=jnp.where(mask, u + res.x, 0.0))
