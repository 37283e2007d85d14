"""DB-MTL (dual balancing: log-loss scales, gradient magnitudes to the largest)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl._linalg import scaled_row_norms
from jmtl.methods import base

__all__ = ["db_mtl", "DBMTLState", "scaled_row_norms", "require_dim"]  # scaled_row_norms
# lives in jmtl._linalg; re-exported here for the methods that import it from this module.


class DBMTLState(NamedTuple):
    """State of :func:`db_mtl`.

    Attributes:
      buffer: ``(K, dim)`` float32 EMA of each task's gradient of ``log L_i``.
      count: ``(K,)`` int32 number of updates in which each task was present.
    """

    buffer: jax.Array
    count: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def require_dim(method: str, dim: int | None) -> int:
    """Checks ``dim`` for methods with per-parameter state (a clear error if missing)."""
    if dim is None:
        raise ValueError(
            f"method '{method}' keeps per-parameter state: call init(num_tasks, dim) with dim = "
            "the number of shared parameters (the Jacobian's row length)")
    dim = int(dim)
    if dim < 1:
        raise ValueError(f"method '{method}': dim must be positive, got {dim}")
    return dim


def check_dim(method: str, jac: jax.Array, rows: jax.Array) -> None:
    """Raises if the Jacobian's shape does not match a ``(K, dim)`` state array."""
    if jac.shape != rows.shape:
        raise ValueError(f"method '{method}': the Jacobian has shape {tuple(jac.shape)} but the "
                         f"state was initialised for {tuple(rows.shape)} (num_tasks, dim)")


def ema_schedule(beta: float, sigma: float, count: jax.Array, dtype) -> jax.Array:
    """``β / t^σ`` for the per-task step counts ``t`` (≥ 1)."""
    t = jnp.maximum(count, 1).astype(dtype)
    return beta / t ** sigma


@base.register("db_mtl", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks",
    "state_pytree"))
def db_mtl(beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8,
           log_heads: bool = True) -> base.Method:
    """DB-MTL: balance loss scales with ``log L`` and gradient magnitudes to the largest.

    Loss-scale balancing: each task contributes the gradient of ``log(L_i + eps)``,
    ``g_i / (L_i + eps)`` (LibMTL's ``eps``). Its EMA per task, with the rate
    ``β_t = β / t^{β_σ}`` at the task's ``t``-th update,
    ``ĝ_i ← g_i/(L_i+eps) + β_t (ĝ_i − g_i/(L_i+eps))`` (from ``ĝ_i = 0``), is kept
    per parameter in the state. Gradient-magnitude balancing: every ``ĝ_i`` is scaled
    to the largest norm, and the update is ``max_j |ĝ_j| · Σ_i ĝ_i / |ĝ_i|``.

    Absent tasks' EMAs and counts are not updated and they contribute nothing. Rows
    with ``ĝ_i = 0`` contribute nothing. Norms are computed with per-row scaling, so
    gradients of size 1e-30 or 1e30 work in float32. Losses must be positive
    (a runtime check under :func:`jmtl.checked`).

    Task-specific parameters (heads) receive ``∇ log(L_i + eps) = ∇L_i / (L_i + eps)``
    by default, as in the official code and LibMTL (which back-propagate
    ``log(L_i + eps)`` through the whole model): ``update`` returns
    ``base.Output(direction, head_weights)`` with ``head_weights = 1 / (L_i + eps)``
    (0 for absent tasks). With ``log_heads=False`` each head gets its own unweighted
    gradient ``∇L_i``.

    Args:
      beta: EMA rate ``β`` (LibMTL default 0.9).
      beta_sigma: decay exponent ``β_σ`` of the rate (LibMTL default 0: constant).
      eps: added to the losses inside the logarithm (LibMTL's ``1e-8``).
      log_heads: heads receive ``∇ log(L_i + eps)`` (default, official code / LibMTL) or,
        if ``False``, ``∇L_i``.

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs losses and the Jacobian; output
      ``"direction"``; state :class:`DBMTLState`, built by ``init(num_tasks, dim)``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> from jmtl.methods import base
      >>> m = jmtl.db_mtl()
      >>> inputs = base.Inputs(present=jnp.array([True, True]), losses=jnp.array([1.0, 2.0]),
      ...                      jacobian=jnp.array([[1.0, 0.0], [0.0, 4.0]]))
      >>> (direction, heads), state = m.update(inputs, m.init(2, 2))
      >>> [round(x, 4) for x in direction.tolist()]  # both rows scaled to the larger norm
      [0.2, 0.2]
      >>> heads.tolist()  # heads get ∇L_i / (L_i + eps)
      [1.0, 0.5]

    References:
      Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029,
      2023.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"method 'db_mtl': beta must be in [0, 1], got {beta}")

    def init(num_tasks: int, dim: int | None = None) -> DBMTLState:
        dim = require_dim("db_mtl", dim)
        return DBMTLState(buffer=jnp.zeros((num_tasks, dim), jnp.float32),
                          count=jnp.zeros((num_tasks,), jnp.int32))

    def update(inputs: base.Inputs, state: DBMTLState):
        jac = inputs.jacobian
        check_dim("db_mtl", jac, state.buffer)
        present = inputs.present
        _checks.check_positive(inputs.losses, method="db_mtl", where=present)
        dtype = jnp.result_type(jnp.float32, jac.dtype, inputs.losses.dtype)
        losses = inputs.losses.astype(dtype)
        log_grads = jac.astype(dtype) / (losses + eps)[:, None]
        count = state.count + present.astype(jnp.int32)
        rate = ema_schedule(beta, beta_sigma, count, dtype)[:, None]
        old = state.buffer.astype(dtype)
        buffer = jnp.where(present[:, None], log_grads + rate * (old - log_grads), old)

        norms = jnp.where(present, scaled_row_norms(buffer), 0)
        top = jnp.max(norms)
        units = buffer / jnp.where(norms > 0, norms, 1)[:, None]
        units = jnp.where((present & (norms > 0))[:, None], units, 0)
        direction = top * jnp.sum(units, axis=0)
        new_state = DBMTLState(buffer=buffer.astype(state.buffer.dtype), count=count)
        if log_heads:
            heads = jnp.where(present, 1 / (losses + eps), 0)
            return base.Output(direction, heads), new_state
        return direction, new_state

    return base.Method(name="db_mtl", init=init, update=update,
                       needs=frozenset({base.LOSSES, base.JACOBIAN}), output="direction",
                       weights_task_specific=False)
