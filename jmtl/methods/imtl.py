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
  the ``K×K`` Gramian, is scale-free and treats every task alike (permutation-equivariant,
  unlike the closed form, which singles out task 1).

  Rank-deficient gradients (duplicated tasks, ``K`` above the rank) follow the
  least-squares solution ``x = C⁺ 1``: if ``1`` lies in the range of ``C`` (relative
  residual at most ``sqrt(eps)`` of the dtype, measured in ``C``'s eigenbasis) the
  equal-projection direction ``Uᵀ x`` exists and is used; otherwise no non-zero
  combination has equal projections (e.g. parallel gradients pointing both ways) and the
  exact answer, the zero update, is returned. Eigenvalues below ``K eps`` times the
  largest count as zero, so rounding noise is never normalised into an answer.
* ``imtl`` (the paper's full method) scales the losses by ``exp(s_i)`` as IMTL-L does and
  applies IMTL-G to the gradients of the scaled losses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmtl.methods import _schedule, base
from jmtl.methods import uw as uw_lib
from jmtl.solvers import eigen

__all__ = ["imtl_l", "imtl_g", "imtl", "IMTLState", "imtl_g_weights", "HEADS"]

# exp(±40) is finite in float32 with a wide margin (e^40 ≈ 2.4e17).
_MAX_LOG_SCALE = 40.0

#: What :func:`imtl`'s task-specific parameters receive.
HEADS = ("scaled", "unweighted")


class IMTLState(NamedTuple):
    """State of :func:`imtl_l` and :func:`imtl`.

    Attributes:
      log_scales: ``(K,)`` float32 learnable loss scales ``s_i`` (task weight ``exp(s_i)``).
      opt_state: the optax optimizer's state for ``log_scales``.
    """

    log_scales: jax.Array
    opt_state: Any
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def _check_losses(name: str, losses: jax.Array, present: jax.Array) -> None:
    """Losses of present tasks must be finite and non-negative (else e^s L - s is unbounded)."""
    uw_lib.check_nonnegative(name, losses, present,
                             "the objective exp(s) L - s has no minimum otherwise")


def _scales(name: str, lr: Any, optimizer: Any):
    """``(init, step)`` of the learnable loss scales trained by ``optimizer``."""
    _schedule.check_value(name, "lr", lr, lambda x: x >= 0, "non-negative")
    opt = _schedule.optimizer_or_default(name, optimizer, lambda: uw_lib.default_optimizer(lr))

    def init(num_tasks: int, dim: int | None = None) -> IMTLState:
        del dim
        s = jnp.zeros((num_tasks,), jnp.float32)
        return IMTLState(log_scales=s, opt_state=opt.init(s))

    def step(state: IMTLState, losses: jax.Array, present: jax.Array) -> IMTLState:
        """One optimizer step on ``sum_i exp(s_i) L_i - s_i`` (present tasks only)."""
        if not isinstance(state, IMTLState) or state.log_scales.shape != present.shape:
            got = (f"a state for {state.log_scales.shape[0]} tasks"
                   if isinstance(state, IMTLState) else type(state).__name__)
            raise ValueError(f"method '{name}': expected an IMTLState for {present.shape[0]} "
                             f"tasks, got {got}")
        s = state.log_scales
        safe = jnp.where(present, jnp.maximum(losses.astype(s.dtype), 0.0), 0.0)
        grads = jnp.exp(s) * safe - 1.0
        new_s, new_opt = _schedule.masked_step(opt, s, grads, state.opt_state, present)
        new_s = jnp.clip(new_s, -_MAX_LOG_SCALE, _MAX_LOG_SCALE)
        return IMTLState(log_scales=new_s, opt_state=new_opt)

    return init, step


def _equal_projection_direction(gramian: jax.Array, present: jax.Array) -> jax.Array:
    """Unnormalised IMTL-G weights ``v ∝ N C⁺ 1``, zero when no equal-projection exists.

    ``sum_i v_i g_i`` has equal projections on every active unit gradient. ``v`` is
    defined up to a positive factor and rescaled so that its entries stay of order 1.
    """
    dtype = jnp.result_type(jnp.float32, gramian.dtype)
    cos, inv, active = eigen.cosine_gramian(gramian.astype(dtype), present)
    lam, vecs, mask = eigen.psd_eigh(cos)
    rhs = active.astype(dtype)
    coef = jnp.where(mask, vecs.T @ rhs, 0.0)
    x = vecs @ (coef / jnp.where(mask, lam, 1.0))
    # Residual of C x = 1: the part of 1 outside the kept eigenspace (computed as a vector,
    # not as ||1||² - ||coef||², which loses half the digits).
    resid = jnp.linalg.norm(rhs - vecs @ coef)
    consistent = resid <= jnp.sqrt(jnp.finfo(dtype).eps) * jnp.sqrt(jnp.sum(rhs))
    # inv / max(inv) lies in (0, 1]: the common factor drops out of every normalisation.
    rel = inv / jnp.maximum(jnp.max(inv), jnp.finfo(dtype).tiny)
    return jnp.where(active & consistent, rel * x, 0.0)


def _normalise(v: jax.Array, factors: jax.Array) -> jax.Array:
    """``v / sum_i(v_i factors_i)``, or zeros when that sum vanishes (relative to its terms)."""
    terms = v * factors
    den = jnp.sum(terms)
    scale = jnp.sum(jnp.abs(terms))
    eps = jnp.finfo(v.dtype).eps
    ok = (jnp.abs(den) > v.shape[0] * eps * scale) & jnp.isfinite(den)
    return jnp.where(ok, v / jnp.where(ok, den, 1.0), 0.0)


def imtl_g_weights(gramian: jax.Array, present: jax.Array | None = None) -> jax.Array:
    """IMTL-G's weights ``α`` (``sum_i α_i = 1``) from a Gramian of any scale.

    Args:
      gramian: ``(K, K)`` Gramian ``J Jᵀ`` (any positive scale factor).
      present: optional ``(K,)`` bool mask; other tasks get 0.

    Returns:
      ``(K,)`` weights; all 0 when no combination has equal projections (see the module
      docstring) or every gradient is zero.

    Examples:
      >>> import jax.numpy as jnp
      >>> imtl_g_weights(jnp.array([[1.0, -1.0], [-1.0, 1.0]])).tolist()  # g and -g
      [0.0, 0.0]
    """
    if present is None:
        present = jnp.ones(gramian.shape[:1], bool)
    v = _equal_projection_direction(gramian, present)
    return _normalise(v, jnp.ones_like(v))


@base.register("imtl_l", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def imtl_l(lr: float = 1e-2, optimizer: optax.GradientTransformation | None = None
           ) -> base.Method:
    """IMTL-L: learnable loss scales that keep every scaled loss at 1.

    Each task has a scale ``s_i`` (state, initially 0) and contributes
    ``exp(s_i) L_i - s_i`` to the objective; its weight is ``exp(s_i)``. ``update``
    returns the weights from the current ``s`` and then takes one step of ``optimizer``
    on the gradient ``exp(s_i) L_i - 1`` (what training ``s`` jointly with the network
    does). At the fixed point ``exp(s_i) = 1 / L_i``. ``s`` is kept within ``[-40, 40]``
    so that the weights stay finite.

    IMTL-L is uncertainty weighting (``jmtl.uw``) with ``s_i = -log σ_i²``, and uses the
    same default optimizer (:func:`jmtl.methods.uw.default_optimizer`: Adam at
    ``lr = 1e-2`` after clipping the gradient to ``[-1, 1]``), which balances loss
    scales from 1e-3 to 1e4 within about 1,000 steps. The paper and LibMTL train ``s``
    with the network's optimizer and give no separate rate.

    Absent tasks: weight 0; ``s_i`` and its per-task optimizer statistics unchanged.
    Losses of present tasks must be finite and non-negative (checked at once on
    concrete values, under :func:`jmtl.checked` when traced; unchecked, a negative loss
    is treated as 0).

    Args:
      lr: learning rate of the default optimizer (number, scalar array or schedule).
      optimizer: an optax optimizer for the scales (default above).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses`` (weights define the
      objective: task-specific parameters get ``exp(s_i) ∇L_i``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.imtl_l()
      >>> state = m.init(2)
      >>> inputs = jmtl.methods.Inputs(present=jnp.array([True, True]),
      ...                              losses=jnp.array([3.0, 1.0]))
      >>> w, state = m.update(inputs, state)
      >>> w.tolist()  # exp(0)
      [1.0, 1.0]
      >>> [round(x, 4) for x in state.log_scales.tolist()]  # Adam's first step: -lr * sign
      [-0.01, 0.0]

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
      Learning", ICLR 2021.
    """
    init, step = _scales("imtl_l", lr, optimizer)

    def update(inputs: base.Inputs, state: IMTLState) -> tuple[jax.Array, IMTLState]:
        present = inputs.present
        losses = inputs.losses
        _check_losses("imtl_l", losses, present)
        new = step(state, losses, present)
        weights = jnp.where(present, jnp.exp(state.log_scales), 0.0)
        return weights, new

    return base.Method(name="imtl_l", init=init, update=update,
                       needs=frozenset({base.LOSSES}), output="weights",
                       weights_task_specific=True)


@base.register("imtl_g", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def imtl_g() -> base.Method:
    """IMTL-G: the combination of the task gradients with equal projections on all of them.

    Finds ``α`` with ``sum_i α_i = 1`` such that ``g = sum_i α_i g_i`` satisfies
    ``g · u_i = g · u_j`` for all tasks, where ``u_i = g_i / ||g_i||``. Equivalently
    ``α ∝ N C⁺ 1``: ``N = diag(1 / ||g_i||)``, ``C`` the cosine matrix of the gradients
    and ``C⁺`` its pseudo-inverse, so only the ``K×K`` Gramian is used and the result does
    not depend on the gradients' overall scale (|J| from 1e-20 to 1e20 in float32). With
    independent gradients this is exactly the paper's closed form; with dependent ones it
    is the least-squares solution, or 0 when no equal-projection combination exists (see
    the module docstring). Zero gradients and absent tasks get weight 0; if the
    equal-projection direction has zero total weight every weight is 0.

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

    def update(inputs: base.Inputs, state: base.EmptyState
               ) -> tuple[jax.Array, base.EmptyState]:
        return imtl_g_weights(inputs.gramian, inputs.present), state

    return base.Method(name="imtl_g", init=base.stateless_init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False)


@base.register("imtl", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks",
    "state_pytree"))
def imtl(lr: float = 1e-2, optimizer: optax.GradientTransformation | None = None,
         heads: str = "scaled") -> base.Method:
    """IMTL: IMTL-L's loss scales followed by IMTL-G on the scaled gradients (the paper's
    full method, "IMTL" in its tables).

    The losses are scaled as in :func:`imtl_l` (``exp(s_i) L_i - s_i``), so the shared
    gradients are ``exp(s_i) g_i``; IMTL-G's ``α`` (``sum_i α_i = 1``) is computed on those
    and the shared update is ``sum_i α_i exp(s_i) g_i``, i.e. the returned weights are
    ``α_i exp(s_i)``. The direction is IMTL-G's (the scales do not change the unit
    gradients); the scales set its length. ``s`` is then updated as in :func:`imtl_l`
    (same default optimizer).

    Task-specific parameters: with ``heads="scaled"`` (default) they receive
    ``exp(s_i) ∇L_i``, the gradient of the scaled loss, as in the reference
    implementation (LibMTL back-propagates each scaled loss through the whole network
    and replaces only the shared gradients); ``heads="unweighted"`` gives them their own
    task's unweighted gradient ``∇L_i``.

    Absent tasks: weight 0 (shared and heads); ``s_i`` and its optimizer statistics
    unchanged.

    Args:
      lr: learning rate of the default optimizer of the loss scales.
      optimizer: an optax optimizer for the scales (see :func:`imtl_l`).
      heads: ``"scaled"`` (default) or ``"unweighted"``, above.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses`` and the Gramian; ``update``
      returns :class:`~jmtl.methods.base.Output` ``(weights, exp(s))`` with
      ``heads="scaled"``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.imtl()
      >>> inputs = jmtl.methods.Inputs(present=jnp.array([True, True]),
      ...                              losses=jnp.array([1.0, 2.0]),
      ...                              gramian=jnp.array([[1.0, 0.0], [0.0, 9.0]]))
      >>> (w, heads), state = m.update(inputs, m.init(2))
      >>> [round(x, 4) for x in w.tolist()]  # scales are 1 at the first step: IMTL-G's α
      [0.75, 0.25]
      >>> heads.tolist(), [round(x, 4) for x in state.log_scales.tolist()]
      ([1.0, 1.0], [0.0, -0.01])

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
      Learning", ICLR 2021.
    """
    if heads not in HEADS:
        raise ValueError(f"method 'imtl': heads must be one of {HEADS}, got {heads!r}")
    init, step = _scales("imtl", lr, optimizer)

    def update(inputs: base.Inputs, state: IMTLState):
        present = inputs.present
        losses = inputs.losses
        _check_losses("imtl", losses, present)
        new = step(state, losses, present)
        v = _equal_projection_direction(inputs.gramian, present)
        s = state.log_scales.astype(v.dtype)
        # α'_i = v_i e^{-s_i} / sum_j v_j e^{-s_j} on the scaled gradients e^{s_i} g_i,
        # so the weight on g_i is α'_i e^{s_i} = v_i / sum_j v_j e^{-s_j}.
        weights = _normalise(v, jnp.exp(-s))
        if heads == "scaled":
            return base.Output(weights, jnp.where(present, jnp.exp(s), 0.0)), new
        return weights, new

    return base.Method(name="imtl", init=init, update=update,
                       needs=frozenset({base.LOSSES, base.GRAMIAN}), output="weights",
                       weights_task_specific=False)
