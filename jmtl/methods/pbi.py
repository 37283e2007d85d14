"""``pbi``: penalty-based boundary intersection scalarization (MOEA/D, Zhang & Li 2007)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl import _checks, _linalg
from jmtl.methods import base

__all__ = ["pbi", "pbi_weights", "preference"]


def preference(pref_vector, present: jax.Array, dtype, name: str) -> jax.Array:
    """The preference restricted to the present tasks (uniform when ``None``)."""
    k = present.shape[0]
    if pref_vector is None:
        return present.astype(dtype)
    pref = jnp.asarray(pref_vector, dtype)
    if pref.shape != (k,):
        raise ValueError(f"method '{name}': pref_vector has shape {pref.shape} for {k} tasks")
    return jnp.where(present, pref, 0.0)


def pbi_weights(losses: jax.Array, pref: jax.Array, present: jax.Array, theta,
                ideal) -> jax.Array:
    """Gradient of ``d₁ + θ d₂`` with respect to the losses (see :func:`pbi`)."""
    dtype = losses.dtype
    f = jnp.where(present, losses - jnp.asarray(ideal, dtype), 0.0)
    u, _ = _linalg.unit_vector(jnp.where(present, pref, 0.0))
    proj = jnp.sum(f * u)
    resid = jnp.where(present, f - proj * u, 0.0)
    resid = resid - jnp.sum(resid * u) * u  # a second pass removes the rounding along u
    r_unit, r_norm = _linalg.unit_vector(resid)
    _, f_norm = _linalg.unit_vector(f)
    # On the ray up to rounding: d₂ = 0, not differentiable; its term is dropped.
    off_ray = r_norm > 16 * jnp.finfo(dtype).eps * f_norm
    r_unit = jnp.where(off_ray, r_unit, 0.0)
    sign = jnp.where(proj < 0, -1.0, 1.0).astype(dtype)
    w = sign * u + jnp.asarray(theta, dtype) * r_unit
    return jnp.where(present, w, 0.0)


@base.register("pbi", properties=(base.PERMUTATION_EQUIVARIANT, base.JIT_CONSISTENT,
                                  base.FINITE, base.ABSENT_TASKS))
def pbi(pref_vector=None, theta: float = 5.0, ideal=0.0) -> base.Method:
    """PBI: distance along a preference ray plus θ times the distance to it.

    With ``f = L − z*`` (``z*`` the ideal point) and ``u = p / ‖p‖`` the unit preference,
    MOEA/D's PBI scalarization is ``g(L) = d₁ + θ d₂`` with ``d₁ = |fᵀu|`` (progress along
    the ray) and ``d₂ = ‖f − d₁ u‖`` (distance to the ray). Minimising it by gradient
    descent on the network means weighting the task gradients by ``∂g/∂L``::

        w = sign(fᵀu) u + θ (f − (fᵀu) u) / ‖f − (fᵀu) u‖

    (the second term is 0 on the ray, where ``d₂`` is not differentiable). The weights can
    be negative: a task ahead of the ray is pushed back toward it.

    Defaults: ``θ = 5`` (Zhang & Li's value in MOEA/D), uniform preference, ideal point 0
    (non-negative losses).

    Heads receive ``w_i ∇L_i`` (the weights define the objective). Absent tasks: weight 0,
    left out of ``f`` and of the preference (which is renormalised over the present ones).

    Args:
      pref_vector: ``(K,)`` non-negative preference ``p`` (``None``: uniform; may be traced,
        e.g. sampled per step).
      theta: penalty ``θ >= 0`` (may be traced).
      ideal: ideal point ``z*``, a scalar or ``(K,)`` (may be traced).

    Returns:
      A stateless :class:`~jmtl.methods.base.Method` needing ``losses``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.pbi(theta=5.0)
      >>> inputs = jmtl.methods.Inputs(jnp.array([True, True]), jnp.array([1.0, 1.0]))
      >>> w, _ = m.update(inputs, m.init(2))
      >>> [round(x, 4) for x in w.tolist()]  # on the ray: only d₁ pulls
      [0.7071, 0.7071]

    References:
      Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on
      Decomposition", IEEE Transactions on Evolutionary Computation 11(6), 2007.
    """
    if _checks.is_concrete(theta) and not float(theta) >= 0:
        raise ValueError(f"method 'pbi': theta must be non-negative, got {theta}")

    def update(inputs: base.Inputs, state: base.EmptyState):
        present = inputs.present
        losses = jnp.where(present, inputs.losses, 0.0)
        dtype = jnp.result_type(jnp.float32, losses.dtype)
        pref = preference(pref_vector, present, dtype, "pbi")
        w = pbi_weights(losses.astype(dtype), pref, present, theta, ideal)
        return w, state

    return base.Method(name="pbi", init=base.stateless_init, update=update,
                       needs=frozenset({base.LOSSES}), output=base.WEIGHTS,
                       weights_task_specific=True)
