"""``cosmos``: COSMOS, linear scalarization with a cosine penalty (Ruchte & Grabocka)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl import _checks, _linalg
from jmtl.methods import base
from jmtl.methods.pbi import preference

__all__ = ["cosmos", "cosmos_weights", "sample_preference"]


def sample_preference(key: jax.Array, num_tasks: int, alpha=1.2) -> jax.Array:
    """The preference COSMOS draws from ``key``: ``r ~ Dirichlet(α, ..., α)``.

    Call it with the same key as the method to feed the same ``r`` to the network (COSMOS
    conditions the network on ``r``).

    Args:
      key: a PRNG key.
      num_tasks: ``K``.
      alpha: Dirichlet concentration, a scalar or ``(K,)``.

    Returns:
      ``(K,)`` float32 preference on the simplex.

    Examples:
      >>> import jax
      >>> r = sample_preference(jax.random.key(0), 3)
      >>> round(float(r.sum()), 5)
      1.0
    """
    conc = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (num_tasks,))
    return jax.random.dirichlet(key, conc).astype(jnp.float32)


def cosmos_weights(losses: jax.Array, pref: jax.Array, present: jax.Array, lamda) -> jax.Array:
    """Gradient of ``rᵀL − λ cos(L, r)`` with respect to the losses (see :func:`cosmos`)."""
    dtype = losses.dtype
    lv = jnp.where(present, losses, 0.0)
    r = jnp.where(present, pref, 0.0)
    l_unit, l_norm = _linalg.unit_vector(lv)
    r_unit, _ = _linalg.unit_vector(r)
    cos = jnp.sum(l_unit * r_unit)
    ok = l_norm > 0
    inv = jnp.where(ok, 1.0 / jnp.where(ok, l_norm, 1.0), 0.0)
    grad_cos = (r_unit - cos * l_unit) * inv
    w = r - jnp.asarray(lamda, dtype) * grad_cos
    return jnp.where(present, w, 0.0)


@base.register("cosmos", properties=(base.PERMUTATION_EQUIVARIANT, base.JIT_CONSISTENT,
                                     base.FINITE, base.ABSENT_TASKS))
def cosmos(pref_vector=None, lamda: float = 2.0, dirichlet_alpha=None) -> base.Method:
    """COSMOS: ``Σ r_i L_i − λ cos(L, r)``, a preference-following linear scalarization.

    The cosine-similarity penalty pulls the loss vector toward the preference ray ``r``, so
    a network conditioned on ``r`` (the paper appends ``r`` to its input) learns the Pareto
    front in one training run. The task weights are the gradient of the objective with
    respect to the losses::

        w = r − λ (r̂ − cos(L, r) L̂) / ‖L‖        (r̂, L̂ unit vectors)

    and may be negative. The penalty is dropped when ``L = 0``.

    The preference is either

    * ``pref_vector`` (default ``None``: uniform), a fixed or per-step value (it may be
      traced: build the method inside the jitted step with the sampled ``r``); or
    * ``dirichlet_alpha=α``: drawn from ``Dirichlet(α)`` with the step's key (the method
      then needs ``key``), as in the paper's training; call
      :func:`sample_preference` with the same key to give the network the same ``r``.

    ``r`` is restricted to the present tasks and renormalised to sum to 1 over them.

    Defaults: ``λ = 2`` and, for sampling, ``α = 1.2`` (the official code's defaults, for
    Multi-MNIST; the paper tunes ``λ`` per dataset, e.g. 0.01 on the fairness data sets).

    Heads receive ``w_i ∇L_i`` (the weights define the objective). Absent tasks: weight 0,
    left out of ``L`` and ``r``.

    Args:
      pref_vector: ``(K,)`` non-negative preference (``None``: uniform; may be traced).
      lamda: penalty ``λ >= 0`` (may be traced).
      dirichlet_alpha: ``None`` (use ``pref_vector``) or the Dirichlet concentration (a
        scalar or ``(K,)``) of a preference drawn per step from the key.

    Returns:
      A stateless :class:`~jmtl.methods.base.Method` needing ``losses`` (and ``key`` with
      ``dirichlet_alpha``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.cosmos(pref_vector=[0.5, 0.5])
      >>> inputs = jmtl.methods.Inputs(jnp.array([True, True]), jnp.array([1.0, 1.0]))
      >>> w, _ = m.update(inputs, m.init(2))
      >>> [round(x, 4) for x in w.tolist()]  # on the ray the penalty's gradient vanishes
      [0.5, 0.5]

    References:
      Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective
      Learning", ICDM 2021.
    """
    if _checks.is_concrete(lamda) and not float(lamda) >= 0:
        raise ValueError(f"method 'cosmos': lamda must be non-negative, got {lamda}")
    if pref_vector is not None and dirichlet_alpha is not None:
        raise ValueError("method 'cosmos': give pref_vector or dirichlet_alpha, not both")
    sampled = dirichlet_alpha is not None
    needs = {base.LOSSES} | ({base.KEY} if sampled else set())

    def update(inputs: base.Inputs, state: base.EmptyState):
        present = inputs.present
        k = present.shape[0]
        losses = jnp.where(present, inputs.losses, 0.0)
        dtype = jnp.result_type(jnp.float32, losses.dtype)
        if sampled:
            pref = jnp.where(present, sample_preference(inputs.key, k, dirichlet_alpha), 0.0)
        else:
            pref = preference(pref_vector, present, dtype, "cosmos")
        pref = pref.astype(dtype)
        total = jnp.sum(pref)
        pref = jnp.where(total > 0, pref / jnp.where(total > 0, total, 1.0), 0.0)
        w = cosmos_weights(losses.astype(dtype), pref, present, lamda)
        return w, state

    return base.Method(name="cosmos", init=base.stateless_init, update=update,
                       needs=frozenset(needs), output=base.WEIGHTS, weights_task_specific=True)
