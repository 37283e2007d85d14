"""Scale-free numerics on flat ``(K, d)`` Jacobians, shared by the methods that read the
Jacobian itself (ConFIG, DB-MTL, MoCo, ...).

Everything works in float32 for rows of any magnitude the dtype can hold (|J| from 1e-30
to 1e30): a row is divided by its largest entry (a power of two, so the division is exact)
before anything is squared.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["row_peaks", "peak_scaled_rows", "scaled_row_norms", "unit_rows", "unit_vector",
           "gram", "min_norm_lstsq", "min_norm_lstsq_gram", "min_norm_lstsq_refined"]

_HI = jax.lax.Precision.HIGHEST


def row_peaks(x: jax.Array) -> jax.Array:
    """``(K,)`` powers of two ``p_i >= max_j |x_ij|`` (1 for a zero or non-finite row).

    Examples:
      >>> row_peaks(jnp.array([[3.0, -5.0], [0.0, 0.0]])).tolist()
      [8.0, 1.0]
    """
    m = jnp.max(jnp.abs(x), axis=1)
    ok = jnp.isfinite(m) & (m > 0)
    one = jnp.ones_like(m)
    _, e = jnp.frexp(jnp.where(ok, m, one))
    return jnp.where(ok, jnp.ldexp(one, e), one)


def peak_scaled_rows(x: jax.Array, keep: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """``(x / p, p)`` with ``p`` the :func:`row_peaks` (exact: ``p`` are powers of two), so
    every row has its largest magnitude in ``[0.5, 1]`` and can be squared in any dtype.

    Rows where the ``(K,)`` bool ``keep`` is False come out zero (with ``p = 1``) in the
    same pass over ``x``, whatever they held."""
    p = row_peaks(x)
    y = x / p[:, None]
    if keep is None:
        return y, p
    return jnp.where(keep[:, None], y, jnp.zeros((), y.dtype)), jnp.where(keep, p, 1)


def gram(x: jax.Array) -> jax.Array:
    """``x xᵀ`` at full precision (no TF32/bf16 passes on accelerators), exactly symmetric."""
    g = jnp.matmul(x, x.T, precision=_HI)
    return 0.5 * (g + g.T)


def scaled_row_norms(x: jax.Array) -> jax.Array:
    """Euclidean norm of each row of ``x`` without overflow or underflow.

    Each row is divided by a power of two close to its largest magnitude before squaring,
    so rows of size 1e-30 or 1e30 get their norms in float32.

    Examples:
      >>> [f"{x:.3g}" for x in scaled_row_norms(jnp.array([[3e30, 4e30], [0.0, 0.0]])).tolist()]
      ['5e+30', '0']
    """
    p = row_peaks(x)
    return p * jnp.sqrt(jnp.sum(jnp.square(x / p[:, None]), axis=1))


def unit_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(units, norms)``: each row divided by its norm (zero rows stay zero), and the norms.

    Examples:
      >>> u, n = unit_rows(jnp.array([[3e30, 4e30], [0.0, 0.0]]))
      >>> [[round(v, 6) for v in r] for r in u.tolist()], [f"{v:.3g}" for v in n.tolist()]
      ([[0.6, 0.8], [0.0, 0.0]], ['5e+30', '0'])
    """
    y, p = peak_scaled_rows(x)
    n = jnp.sqrt(jnp.sum(jnp.square(y), axis=1))
    ok = n > 0
    units = jnp.where(ok[:, None], y / jnp.where(ok, n, 1)[:, None], 0)
    return units, p * n


def unit_vector(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(v / ‖v‖, ‖v‖)`` of a vector without overflow (``(0, 0)`` for ``v = 0``)."""
    units, norms = unit_rows(jnp.reshape(v, (1, -1)))
    return jnp.reshape(units, v.shape), norms[0]


def min_norm_lstsq(a: jax.Array, b: jax.Array, rtol: float | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Minimum-norm least-squares solution of ``a x = b`` for a wide ``(K, d)`` matrix.

    Computed from a QR decomposition of ``aᵀ`` and an SVD of its ``K×K`` factor, so the
    error grows with the condition number of ``a``, not with its square (as it would
    through the normal equations ``a aᵀ``). Singular values ``<= rtol · s_max``
    (default ``max(K, d)·eps``, the LAPACK ``gelsy``/``torch.linalg.lstsq`` convention)
    count as zero.

    Args:
      a: ``(K, d)`` matrix (K <= d is the useful case; any shape works).
      b: ``(K,)`` right-hand side.
      rtol: relative singular-value cut-off.

    Returns:
      ``(x, fitted, coeffs)``: ``x`` the ``(d,)`` solution, ``fitted = a x`` the ``(K,)``
      projection of ``b`` on the range of ``a``, and ``coeffs`` the ``(K,)`` coordinates of
      that projection in an orthonormal basis of the range (0 outside the rank), so
      ``||fitted|| = ||coeffs||``.

    Examples:
      >>> x, fitted, _ = min_norm_lstsq(jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]),
      ...                               jnp.array([1.0, 1.0]))
      >>> x.tolist(), fitted.tolist()
      ([0.0, 0.0, 0.0], [0.0, 0.0])
    """
    k, d = a.shape
    dtype = jnp.result_type(jnp.float32, a.dtype)
    a = a.astype(dtype)
    q, r = jnp.linalg.qr(a.T, mode="reduced")  # aᵀ = Q R: (d, m), (m, K), m = min(K, d)
    # R = U S Vᵀ, so a = V S (Q U)ᵀ and pinv(a) b = Q U S⁺ Vᵀ b.
    u, s, vt = jnp.linalg.svd(r, full_matrices=False)
    if rtol is None:
        rtol = max(k, d) * float(jnp.finfo(dtype).eps)
    keep = s > rtol * jnp.max(s, initial=0.0)
    coeffs = jnp.where(keep, vt @ b.astype(dtype), 0)
    y = u @ jnp.where(keep, coeffs / jnp.where(keep, s, 1), 0)
    x = q @ y
    fitted = vt.T @ coeffs
    return x, fitted, coeffs


def _orthonormalise(basis: jax.Array, rtol: float) -> jax.Array:
    """One pass of SVQB: ``basis @ V Λ^{-1/2}`` from the eigendecomposition of its Gram
    matrix (columns for eigenvalues ``<= rtol · λ_max`` are zero)."""
    lam, vecs = jnp.linalg.eigh(gram(basis.T))
    keep = lam > rtol * jnp.max(lam, initial=0.0)
    scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1)), 0)
    return jnp.matmul(basis, vecs * scale[None, :], precision=_HI)


def min_norm_lstsq_gram(a: jax.Array, b: jax.Array, rtol: float | None = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`min_norm_lstsq` through matrix products only (fast where QR is slow).

    An orthonormal basis ``Q`` of the row space of ``a`` is built from Gram matrices in
    two passes (SVQB, the eigenvalue form of Cholesky-QR2), then ``pinv(a Q) b`` is solved
    with ``a Q`` formed from ``a`` itself (not from ``a aᵀ``) and ``x = Q y``. The error is
    of order ``eps·cond(a)`` like a Householder QR as long as ``eps·cond(a)² < 1``
    (``cond(a) < 3e3`` in float32); directions with singular values below ``√(K·eps)``
    times the largest are dropped by the first pass. The cost is five ``K×K×d`` products.

    Args:
      a: ``(K, d)`` matrix.
      b: ``(K,)`` right-hand side.
      rtol: relative singular-value cut-off of the final ``K×K`` solve (default
        ``8·K·eps``).

    Returns:
      ``(x, fitted, coeffs)`` as :func:`min_norm_lstsq`.

    Examples:
      >>> x, fitted, _ = min_norm_lstsq_gram(jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]),
      ...                                    jnp.array([1.0, 1.0]))
      >>> x.tolist(), fitted.tolist()
      ([0.0, 0.0, 0.0], [0.0, 0.0])
    """
    k, d = a.shape
    dtype = jnp.result_type(jnp.float32, a.dtype)
    a = a.astype(dtype)
    eps = float(jnp.finfo(dtype).eps)
    if rtol is None:
        rtol = 8 * k * eps
    hi = jax.lax.Precision.HIGHEST
    q = _orthonormalise(a.T, k * eps)  # (d, K): rank-r orthonormal columns, others 0
    q = _orthonormalise(q, 0.5)  # second pass: eigenvalues are 1 or 0
    aq = jnp.matmul(a, q, precision=hi)  # (K, K), from a itself
    u, s, vt = jnp.linalg.svd(aq, full_matrices=False)
    keep = s > rtol * jnp.max(s, initial=0.0)
    coeffs = jnp.where(keep, u.T @ b.astype(dtype), 0)
    y = vt.T @ jnp.where(keep, coeffs / jnp.where(keep, s, 1), 0)
    x = jnp.matmul(q, y, precision=hi)
    fitted = u @ coeffs
    return x, fitted, coeffs


class _Refinement(NamedTuple):
    """Loop state of :func:`min_norm_lstsq_refined`."""

    x: jax.Array  # (d,) current solution
    r: jax.Array  # (K,) its residual b - a x
    dy: jax.Array  # (K,) next correction, in row coordinates (x += aᵀ dy)
    delta: jax.Array  # ||aᵀ dy||
    it: jax.Array  # corrections applied
    done: jax.Array


def min_norm_lstsq_refined(a: jax.Array, b: jax.Array, *, row_scale: jax.Array | None = None,
                           gram_a: jax.Array | None = None, rtol: float | None = None,
                           tol: float = 4.0, max_iter: int = 8
                           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`min_norm_lstsq` by corrected semi-normal equations: one Gramian, then passes
    over the rows.

    ``x = aᵀ y`` with ``C y = b`` solved through the eigendecomposition of the ``K×K`` matrix
    ``C = a aᵀ`` (the semi-normal equations: error ``eps·cond(a)²``), then refined
    (Björck's corrected semi-normal equations): ``r = b - a x`` from ``a`` itself, ``x +=
    aᵀ C⁺ r``. Each correction costs two matrix-vector passes over ``a`` and shrinks the
    error by about ``eps·cond(a)²``, down to the rounding level ``eps·cond(a)`` of a
    Householder QR. The loop stops when the correction's size ``||aᵀ C⁺ r||`` (from ``C``,
    no pass) is at most ``tol·eps·cond(a)·||x||`` (converged), stops shrinking by half
    (the rounding floor, or no contraction when ``eps·cond(a)² ≳ 1``), or after
    ``max_iter`` corrections; the last two count as converged only within the tolerance.
    Eigenvalues of ``C`` ``<= rtol·λ_max`` count as zero (singular values below
    ``√rtol``): the pseudo-inverse; then ``x`` converges to ``pinv(a) b`` and ``r`` to the
    part of ``b`` outside the range.

    Args:
      a: ``(K, d)`` matrix; best pre-scaled by :func:`peak_scaled_rows`.
      b: ``(K,)`` right-hand side.
      row_scale: ``(K,)`` solve for ``diag(row_scale) a`` without forming it (default 1).
      gram_a: ``a aᵀ`` when already computed (:func:`gram`).
      rtol: relative eigenvalue cut-off of ``C`` (default ``K·eps``).
      tol: convergence tolerance in units of ``eps·cond(a)`` (the rounding floor measured
        0.1-2 units for K up to 512).
      max_iter: cap on the passes ``x += aᵀ C⁺ r`` (the first one is the semi-normal
        solution).

    Returns:
      ``(x, fitted, coeffs, converged, iterations)``: ``x, fitted, coeffs`` as
      :func:`min_norm_lstsq` (``fitted = a x`` from the last residual, ``coeffs`` the
      coordinates of the projection of ``b`` in ``C``'s kept eigenvectors), ``converged``
      bool, ``iterations`` int32 (passes applied).

    Examples:
      >>> x, fitted, _, ok, _ = min_norm_lstsq_refined(jnp.array([[1.0, 1.0], [0.0, 2.0]]),
      ...                                              jnp.array([1.0, 1.0]))
      >>> [round(v, 6) for v in x.tolist()], bool(ok)
      ([0.5, 0.5], True)
    """
    k = a.shape[0]
    dtype = jnp.result_type(jnp.float32, a.dtype)
    a = a.astype(dtype)
    b = b.astype(dtype)
    eps = float(jnp.finfo(dtype).eps)
    w = jnp.ones((k,), dtype) if row_scale is None else row_scale.astype(dtype)
    g = gram(a) if gram_a is None else gram_a.astype(dtype)
    c = w[:, None] * g * w[None, :]
    lam, vecs = jnp.linalg.eigh(0.5 * (c + c.T))
    keep = lam > (k * eps if rtol is None else rtol) * jnp.max(lam, initial=0.0)
    inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
    smallest = jnp.min(jnp.where(keep, lam, jnp.inf))
    cond = jnp.where(jnp.any(keep), jnp.sqrt(jnp.max(lam, initial=0.0) / smallest), 1)
    floor = tol * eps * cond

    def correction(r):
        dy = vecs @ (inv * (vecs.T @ r))
        # ||aᵀ dy||² = dyᵀ C dy: the correction's size without a pass over a.
        return dy, jnp.sqrt(jnp.maximum(dy @ (c @ dy), 0))

    def body(s: _Refinement) -> _Refinement:
        x = s.x + jnp.matmul(w * s.dy, a, precision=_HI)
        r = b - w * jnp.matmul(a, x, precision=_HI)
        dy, delta = correction(r)
        it = s.it + 1
        stop = (delta <= floor * jnp.linalg.norm(x)) | (delta > 0.5 * s.delta) | (it >= max_iter)
        return _Refinement(x, r, dy, delta, it, stop)

    dy, delta = correction(b)  # from x = 0: the semi-normal solution
    init = _Refinement(jnp.zeros(a.shape[1:], dtype), b, dy, delta, jnp.int32(0), delta == 0)
    s = jax.lax.while_loop(lambda s: ~s.done, body, init)
    converged = s.delta <= floor * jnp.linalg.norm(s.x)
    coeffs = jnp.where(keep, vecs.T @ b, 0)
    return s.x, b - s.r, coeffs, converged, s.it
