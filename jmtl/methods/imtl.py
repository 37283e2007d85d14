"""Impartial multi-task learning (Liu et al., ICLR 2021): ``imtl_l``, ``imtl_g`` and ``imtl``.

* ``imtl_l`` (IMTL-L, loss balance) learns one scale ``s_i`` per task by minimising
  ``exp(s_i) L_i - s_i``; the task weights are ``exp(s_i)`` and the fixed point is
  ``exp(s_i) L_i = 1``: every scaled loss is kept at 1.
* ``imtl_g`` (IMTL-G, gradient balance) picks the combination ``g = sum_i α_i g_i`` with
  ``sum_i α_i = 1`` whose projections on the unit task gradients ``u_i = g_i / ||g_i||``
  are all equal. The paper's closed form
  ``α_{2..K} = g_1 Uᵀ (D Uᵀ)⁻¹`` (rows of ``D``: ``g_1 - g_t``; of ``U``: ``u_1 - u_t``) is
  the solution of ``G α = c n`` (``n_i = ||g_i||``), i.e. ``α ∝ N C⁻¹ 1`` with
  ``N = diag(1 / n_i)`` and ``C`` the cosine matrix of the gradients. That form needs only
  the ``K×K`` Gramian and is scale-free; a pseudo-inverse replaces ``C⁻¹`` when the
  gradients are linearly dependent (duplicated tasks, ``K`` above the rank).
* ``imtl`` (the paper's full method) scales the losses by ``exp(s_i)`` as IMTL-L does and
  applies IMTL-G to the gradients of the scaled losses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers import eigen

__all__ = ["imtl_l", "imtl_g", "imtl", "IMTLState"]

# exp(±40) is finite in float32 with a wide margin (e^40 ≈ 2.4e17).
_MAX_LOG_SCALE = 40.0


class IMTLState(NamedTuple):
    """State of :func:`imtl_l` and :func:`imtl`.

    Attributes:
      log_scales: ``(K,)`` float32 learnable loss scales ``s_i`` (task weight ``exp(s_i)``).
    """

    log_scales: jax.Array


def _check_lr(name: str, lr: float) -> None:
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr >= 0):
        raise ValueError(f"method '{name}': lr must be a finite non-negative number, got {lr!r}")


def _check_losses(name: str, losses: jax.Array, present: jax.Array) -> None:
    """Losses of present tasks must be finite and non-negative (else e^s L - s is unbounded)."""
    safe = jnp.where(present, losses, 0.0)
    _checks.check_finite(safe, method=name)
    if _checks.is_concrete(safe):
        arr = np.asarray(safe)
        bad = np.flatnonzero(arr < 0)
        if bad.size:
            tasks = ", ".join(f"task {i}={arr[i]!r}" for i in bad)
            raise ValueError(f"{name}: losses must be non-negative (the objective exp(s) L - s "
                             f"has no minimum otherwise); got {tasks}")
        return
    _checks.runtime_check(jnp.all(safe >= 0), f"{name}: losses must be non-negative")


def _init(num_tasks: int, dim: int | None = None) -> IMTLState:
    del dim
    return IMTLState(log_scales=jnp.zeros((num_tasks,), jnp.float32))


def _scale_step(lr: float, s: jax.Array, losses: jax.Array, present: jax.Array) -> jax.Array:
    """One gradient step on ``sum_i exp(s_i) L_i - s_i`` (present tasks only)."""
    grad = jnp.exp(s) * jnp.where(present, losses, 0.0) - 1.0
    new_s = jnp.clip(s - lr * grad, -_MAX_LOG_SCALE, _MAX_LOG_SCALE)
    return jnp.where(present, new_s, s)


def _equal_projection_direction(gramian: jax.Array, present: jax.Array
                                ) -> tuple[jax.Array, jax.Array]:
    """Unnormalised IMTL-G weights ``v ∝ N pinv(C) 1`` and the active-row mask.

    ``sum_i v_i g_i`` has equal projections on every active unit gradient (in the
    least-squares sense when ``1`` is not in the range of ``C``). ``v`` is defined up to a
    positive factor; it is rescaled so that its entries stay of order 1.
    """
    dtype = jnp.result_type(jnp.float32, gramian.dtype)
    g = gramian.astype(dtype)
    cos, inv, active = eigen.cosine_gramian(g, present)
    rhs = active.astype(dtype)
    beta = eigen.psd_pinv_solve(cos, rhs)
    # inv / max(inv) lies in (0, 1]: the common factor drops out of every normalisation.
    rel = inv / jnp.maximum(jnp.max(inv), jnp.finfo(dtype).tiny)
    v = jnp.where(active, rel * beta, 0.0)
    return v, active


def _normalise(v: jax.Array, factors: jax.Array) -> jax.Array:
    """``v / sum_i(v_i factors_i)``, or zeros when that sum vanishes (relative to its terms)."""
    terms = v * factors
    den = jnp.sum(terms)
    scale = jnp.sum(jnp.abs(terms))
    eps = jnp.finfo(v.dtype).eps
    ok = (jnp.abs(den) > eps * scale) & jnp.isfinite(den)
    return jnp.where(ok, v / jnp.where(ok, den, 1.0), 0.0)


@base.register("imtl_l", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def imtl_l(lr: float = 1e-2) -> base.Method:
    """IMTL-L: learnable loss scales that keep every scaled loss at 1.

    Each task has a scale ``s_i`` (state, initially 0) and contributes
    ``exp(s_i) L_i - s_i`` to the objective; its weight is ``exp(s_i)``. ``update``
    returns the weights from the current ``s`` and then takes one plain gradient step on
    ``s`` with the closed-form gradient ``exp(s_i) L_i - 1``, which is what training ``s``
    jointly with the network by SGD does. At the fixed point ``exp(s_i) = 1 / L_i``.
    ``s`` is kept within ``[-40, 40]`` so that the weights stay finite.

    IMTL-L is uncertainty weighting (``jmtl.uw``) with ``s_i = -log σ_i²``; the same
    stability rule holds: plain gradient descent on ``s`` is stable while
    ``lr * exp(s_i) * L_i`` stays below about 1 (normalise very large losses or lower
    ``lr``).

    Absent tasks: weight 0 and ``s_i`` unchanged. Losses of present tasks must be finite
    and non-negative (checked at once on concrete values, under :func:`jmtl.checked`
    when traced).

    Args:
      lr: learning rate of the loss scales. The paper learns them jointly with the
        network and gives no separate value; the default 1e-2 is the one ``jmtl.uw``
        uses for the same kind of parameter.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses`` (weights define the
      objective: task-specific parameters get ``exp(s_i) ∇L_i``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.imtl_l(lr=0.1)
      >>> state = m.init(2)
      >>> inputs = jmtl.methods.Inputs(present=jnp.array([True, True]),
      ...                              losses=jnp.array([3.0, 1.0]))
      >>> w, state = m.update(inputs, state)
      >>> w.tolist()  # exp(0)
      [1.0, 1.0]
      >>> [round(x, 4) for x in state.log_scales.tolist()]  # 0 - 0.1 * (e^0 L - 1)
      [-0.2, 0.0]

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
      Learning", ICLR 2021.
    """
    _check_lr("imtl_l", lr)

    def update(inputs: base.Inputs, state: IMTLState) -> tuple[jax.Array, IMTLState]:
        present = inputs.present
        losses = inputs.losses
        _check_losses("imtl_l", losses, present)
        dtype = jnp.result_type(losses.dtype, state.log_scales.dtype)
        s = state.log_scales.astype(dtype)
        weights = jnp.where(present, jnp.exp(s), 0.0)
        new_s = _scale_step(lr, s, losses.astype(dtype), present)
        return weights, IMTLState(log_scales=new_s.astype(state.log_scales.dtype))

    return base.Method(name="imtl_l", init=_init, update=update,
                       needs=frozenset({base.LOSSES}), output="weights",
                       weights_task_specific=True, hparams=(("lr", lr),))


@base.register("imtl_g", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def imtl_g() -> base.Method:
    """IMTL-G: the combination of the task gradients with equal projections on all of them.

    Finds ``α`` with ``sum_i α_i = 1`` such that ``g = sum_i α_i g_i`` satisfies
    ``g · u_i = g · u_j`` for all tasks, where ``u_i = g_i / ||g_i||``. Equivalently
    ``α ∝ N C⁺ 1``: ``N = diag(1 / ||g_i||)``, ``C`` the cosine matrix of the gradients
    and ``C⁺`` its pseudo-inverse, so only the ``K×K`` Gramian is used and the result does
    not depend on the gradients' overall scale. With independent gradients this is exactly
    the paper's closed form; with dependent ones (duplicated tasks, ``K`` above the rank)
    the pseudo-inverse gives the minimum-norm solution. Zero gradients and absent tasks
    get weight 0; if the equal-projection direction has zero total weight (e.g. all
    gradients zero) every weight is 0.

    IMTL-G's weights can be negative and large: the method does not guarantee a
    non-conflicting update.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing the Gramian (a gradient aggregator:
      task-specific parameters get their own task's gradient).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.imtl_g()
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 3.0]]), m.init(2))
      >>> [round(x, 4) for x in update.tolist()]  # equal projections 0.75 on e1 and e2
      [0.75, 0.75]

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
      Learning", ICLR 2021.
    """

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState
               ) -> tuple[jax.Array, base.EmptyState]:
        v, _ = _equal_projection_direction(inputs.gramian, inputs.present)
        return _normalise(v, jnp.ones_like(v)), state

    return base.Method(name="imtl_g", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False, hparams=())


@base.register("imtl", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks",
    "state_pytree"))
def imtl(lr: float = 1e-2) -> base.Method:
    """IMTL: IMTL-L's loss scales followed by IMTL-G on the scaled gradients (the paper's
    full method, "IMTL" in its tables).

    The losses are scaled as in :func:`imtl_l` (``exp(s_i) L_i - s_i``), so the shared
    gradients are ``exp(s_i) g_i``; IMTL-G's ``α`` (``sum_i α_i = 1``) is computed on those
    and the update is ``sum_i α_i exp(s_i) g_i``, i.e. the returned weights are
    ``α_i exp(s_i)``. The direction is IMTL-G's (the scales do not change the unit
    gradients); the scales set its length. ``s`` is then updated as in :func:`imtl_l`.

    Task-specific parameters receive their own task's unweighted gradient (this is a
    gradient aggregator in jmtl; the reference implementation gives them
    ``exp(s_i) ∇L_i``).

    Absent tasks: weight 0 and ``s_i`` unchanged.

    Args:
      lr: learning rate of the loss scales (see :func:`imtl_l`).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses`` and the Gramian.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.imtl()
      >>> update, state = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 3.0]]), m.init(2),
      ...                                losses=jnp.array([1.0, 2.0]))
      >>> [round(x, 4) for x in update.tolist()]  # scales are 1 at the first step
      [0.75, 0.75]
      >>> [round(x, 4) for x in state.log_scales.tolist()]
      [0.0, -0.01]

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
      Learning", ICLR 2021.
    """
    _check_lr("imtl", lr)

    def update(inputs: base.Inputs, state: IMTLState) -> tuple[jax.Array, IMTLState]:
        present = inputs.present
        losses = inputs.losses
        _check_losses("imtl", losses, present)
        v, _ = _equal_projection_direction(inputs.gramian, present)
        dtype = v.dtype
        s = state.log_scales.astype(dtype)
        # α'_i = v_i e^{-s_i} / sum_j v_j e^{-s_j} on the scaled gradients e^{s_i} g_i,
        # so the weight on g_i is α'_i e^{s_i} = v_i / sum_j v_j e^{-s_j}.
        weights = _normalise(v, jnp.exp(-s))
        new_s = _scale_step(lr, s, losses.astype(dtype), present)
        return weights, IMTLState(log_scales=new_s.astype(state.log_scales.dtype))

    return base.Method(name="imtl", init=_init, update=update,
                       needs=frozenset({base.LOSSES, base.GRAMIAN}), output="weights",
                       weights_task_specific=False, hparams=(("lr", lr),))
