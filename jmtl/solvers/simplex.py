"""Euclidean projection onto the probability simplex.

Everything here runs under ``jax.jit`` with static iteration bounds or a
``lax.while_loop`` with a tolerance, in float32 (or float64 when enabled).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["project_simplex"]


def project_simplex(v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Euclidean projection of ``v`` onto the probability simplex.

    Args:
      v: ``(K,)`` vector.
      mask: optional ``(K,)`` bool; masked-out entries are forced to 0 and the
        projection is onto the simplex of the remaining entries.

    Returns:
      ``argmin_{w >= 0, sum w = 1} ||w - v||`` (sorting algorithm, Duchi et al. 2008),
      exact to rounding at any scale of ``v``; all zeros if no entry is present.

    Examples:
      >>> project_simplex(jnp.array([0.0, 0.0, 2.0])).tolist()
      [0.0, 0.0, 1.0]
      >>> project_simplex(jnp.array([-1.5e9, 2e8, -3e9])).tolist()
      [0.0, 1.0, 0.0]
    """
    k = v.shape[0]
    dtype = jnp.result_type(jnp.float32, v.dtype)
    v = jnp.asarray(v, dtype)
    if mask is None:
        mask = jnp.ones((k,), bool)
    # The projection is unchanged by adding a constant to every entry. Shift so that the
    # largest present entry is 0: the threshold θ then lies in [-1, 0), entries below -1
    # never reach the support, and clipping them at -2 makes every sum below exact to
    # rounding at any scale of v (|v| = 1e9 in float32 used to lose the 1 entirely).
    top = jnp.max(jnp.where(mask, v, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    u = jnp.where(mask, jnp.clip(v - top, -2.0, 0.0), -3.0)
    srt = jnp.sort(u)[::-1]
    css = jnp.cumsum(jnp.where(srt > -3.0, srt, 0.0))
    idx = jnp.arange(1, k + 1, dtype=dtype)
    cond = (srt - (css - 1.0) / idx > 0) & (srt > -3.0)
    rho = jnp.maximum(jnp.sum(cond), 1)
    theta = (css[rho - 1] - 1.0) / rho.astype(dtype)
    return jnp.where(mask, jnp.maximum(u - theta, 0.0), 0.0)
