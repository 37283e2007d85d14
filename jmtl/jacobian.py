"""Shared machinery on Jacobian pytrees: flattening, the Gramian, weighted combination.

A Jacobian pytree has leaves whose leading axis indexes the K tasks; a ``(K, d)``
array is one. Everything that needs the Gramian ``J Jᵀ`` or a combination
``sum_i w_i J_i`` goes through this module, so it is written once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "compute_dtype", "num_rows", "flatten_rows", "unflatten_row", "gramian", "combine",
    "row_norms", "normalized_gramian", "max_abs", "power_of_two_above", "common_scale",
    "scaled_gramian",
]


def num_rows(jacobian: Any) -> int:
    """The number of tasks K (the common leading axis of every leaf).

    Raises:
      ValueError: if the leaves disagree on K or a leaf has no leading axis.
    """
    leaves_with_path = jax.tree_util.tree_flatten_with_path(jacobian)[0]
    if not leaves_with_path:
        raise ValueError("jacobian: empty pytree")
    ks = set()
    for path, leaf in leaves_with_path:
        if np.ndim(leaf) == 0:
            raise ValueError(
                f"jacobian: leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a "
                "leading task axis"
            )
        ks.add(np.shape(leaf)[0])
    if len(ks) != 1:
        raise ValueError(f"jacobian: leaves disagree on the number of tasks: {sorted(ks)}")
    return ks.pop()


def compute_dtype(*dtypes) -> jnp.dtype:
    """float32, or float64 when an input is float64 (low precision is promoted)."""
    return jnp.result_type(jnp.float32, *dtypes)


def flatten_rows(jacobian: Any, dtype=None) -> jax.Array:
    """Concatenates the leaves of a Jacobian pytree into a ``(K, d)`` array.

    The dtype is ``dtype`` if given, else float32 (float64 if a leaf is float64).

    Examples:
      >>> flatten_rows({"a": jnp.ones((2, 3)), "b": jnp.zeros((2,))}).shape
      (2, 4)
    """
    k = num_rows(jacobian)
    leaves = jax.tree_util.tree_leaves(jacobian)
    if dtype is None:
        dtype = compute_dtype(*[x.dtype for x in leaves])
    return jnp.concatenate([jnp.reshape(x, (k, -1)).astype(dtype) for x in leaves], axis=1)


def unflatten_row(vector: jax.Array, jacobian: Any) -> Any:
    """Splits a ``(d,)`` vector into a pytree shaped like one row of ``jacobian``.

    Leaves take the dtype of the corresponding Jacobian leaf.

    Examples:
      >>> unflatten_row(jnp.arange(4.0), {"a": jnp.ones((2, 3)), "b": jnp.zeros((2,))})["b"]
      Array(3., dtype=float32)
    """
    leaves, treedef = jax.tree_util.tree_flatten(jacobian)
    out, start = [], 0
    for leaf in leaves:
        shape = np.shape(leaf)[1:]
        size = int(np.prod(shape, dtype=np.int64))
        out.append(jnp.reshape(vector[start:start + size], shape).astype(leaf.dtype))
        start += size
    if start != vector.shape[0]:
        raise ValueError(f"unflatten_row: vector has {vector.shape[0]} entries, rows have {start}")
    return jax.tree_util.tree_unflatten(treedef, out)


def gramian(jacobian: Any) -> jax.Array:
    """The ``(K, K)`` Gramian ``J Jᵀ``, accumulated over leaves in float32.

    (float64 when a leaf is float64; bf16/f16 leaves are promoted.)

    Examples:
      >>> gramian(jnp.array([[1.0, 0.0], [1.0, 1.0]])).tolist()
      [[1.0, 1.0], [1.0, 2.0]]
    """
    k = num_rows(jacobian)
    leaves = jax.tree_util.tree_leaves(jacobian)
    dtype = compute_dtype(*[x.dtype for x in leaves])
    total = jnp.zeros((k, k), dtype)
    for leaf in leaves:
        rows = jnp.reshape(leaf, (k, -1))
        total = total + jnp.einsum(
            "kd,ld->kl", rows, rows, preferred_element_type=dtype,
            precision=jax.lax.Precision.HIGHEST,
        ).astype(dtype)
    # Exact symmetry keeps eigen-solvers and QPs well behaved.
    return 0.5 * (total + total.T)


def max_abs(jacobian: Any) -> jax.Array:
    """The largest ``|J_ij|`` over every leaf, in the compute dtype (0 if empty)."""
    leaves = jax.tree_util.tree_leaves(jacobian)
    dtype = compute_dtype(*[x.dtype for x in leaves])
    m = jnp.zeros((), dtype)
    for leaf in leaves:
        if np.size(leaf):
            m = jnp.maximum(m, jnp.max(jnp.abs(leaf)).astype(dtype))
    return m


def power_of_two_above(m: jax.Array) -> jax.Array:
    """The power of two ``2^e`` with ``m <= 2^e < 2m`` (1 for 0 or non-finite ``m``)."""
    ok = jnp.isfinite(m) & (m > 0)
    one = jnp.ones((), m.dtype)
    _, exponent = jnp.frexp(jnp.where(ok, m, one))
    return jnp.where(ok, jnp.ldexp(one, exponent), one)


def common_scale(jacobian: Any) -> jax.Array:
    """A power of two ``s >= max |J_ij|`` (1 for a zero or non-finite Jacobian).

    Dividing by ``s`` is exact, and the Gramian of ``J / s`` neither overflows nor
    underflows in float32 for entries from 1e-30 to 1e30.

    Examples:
      >>> float(common_scale(jnp.array([[3.0, -5.0]])))
      8.0
    """
    return power_of_two_above(max_abs(jacobian))


def scaled_gramian(jacobian: Any, scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(J Jᵀ / s², s)`` with ``s`` = :func:`common_scale` (or the given ``scale``).

    The rows are divided by ``s`` before they are multiplied, so the result is finite
    whenever ``J`` is, at any scale. This is the Gramian methods see
    (:attr:`jmtl.methods.base.Inputs.gramian`).

    Examples:
      >>> g, s = scaled_gramian(jnp.array([[1e20, 0.0], [0.0, 2e20]]))
      >>> [[round(float(x) * float(s) ** 2 / 1e40, 3) for x in row] for row in g]
      [[1.0, 0.0], [0.0, 4.0]]
    """
    if scale is None:
        scale = common_scale(jacobian)
    scaled = jax.tree_util.tree_map(lambda x: x / jnp.asarray(scale).astype(x.dtype), jacobian)
    return gramian(scaled), scale


def combine(weights: jax.Array, jacobian: Any) -> Any:
    """``sum_i w_i J_i`` as a pytree like one row (each leaf in its own dtype).

    Examples:
      >>> combine(jnp.array([1.0, 2.0]), jnp.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
      [1.0, 2.0]
    """
    def one(leaf):
        dtype = compute_dtype(leaf.dtype, weights.dtype)
        acc = jnp.tensordot(weights.astype(dtype), leaf.astype(dtype), axes=1,
                            precision=jax.lax.Precision.HIGHEST)
        return acc.astype(leaf.dtype)

    return jax.tree_util.tree_map(one, jacobian)


def row_norms(jacobian: Any) -> jax.Array:
    """``(K,)`` Euclidean norm of each task's row, in float32."""
    return jnp.sqrt(jnp.clip(jnp.diag(gramian(jacobian)), 0.0))


def normalized_gramian(gramian: jax.Array, present: jax.Array, *, norm_eps: float = 0.0,
                       reg_eps: float = 0.0) -> jax.Array:
    """``G / trace(G)`` over the present tasks, plus an optional ridge.

    The scale-free Gramian that UPGrad, DualProj, PCGrad and GradVac solve on (torchjd's
    ``regularize(normalize(G, norm_eps), reg_eps)``), restricted to present tasks.

    ``G`` is divided by its trace (zero if the trace is below ``norm_eps``) and
    ``reg_eps · I`` is added. The division goes through the largest diagonal entry
    first so that Gramians near the float range limits do not overflow.

    Args:
      gramian: ``(K, K)`` Gramian.
      present: ``(K,)`` bool; rows and columns of absent tasks are zeroed.
      norm_eps: absolute threshold on the trace below which ``G`` is treated as zero.
      reg_eps: ridge added to the diagonal of the normalised Gramian.

    Returns:
      ``(K, K)`` normalised, regularised Gramian in the compute dtype.

    Examples:
      >>> normalized_gramian(jnp.eye(2) * 5.0, jnp.array([True, True])).tolist()
      [[0.5, 0.0], [0.0, 0.5]]
    """
    dtype = jnp.result_type(jnp.float32, gramian.dtype)
    g = jnp.asarray(gramian, dtype)
    g = jnp.where(present[:, None] & present[None, :], 0.5 * (g + g.T), 0.0)
    diag_max = jnp.max(jnp.diag(g))
    ok = jnp.isfinite(diag_max) & (diag_max > jnp.finfo(dtype).tiny)
    gd = g / jnp.where(ok, diag_max, 1.0)
    trace_d = jnp.trace(gd)
    trace = trace_d * jnp.where(ok, diag_max, 0.0)
    keep = ok & (trace >= norm_eps) & (trace_d > 0)
    gn = jnp.where(keep, gd / jnp.where(keep, trace_d, 1.0), 0.0)
    return gn + reg_eps * jnp.eye(g.shape[0], dtype=dtype)
