"""Gradient Vaccine (GradVac), computed in the K×K Gramian.

Like PCGrad, every modified gradient stays in the span of the task gradients:
``g_i' = c_iᵀ J``, ``g_i'·g_j = (G c_i)_j`` and ``|g_i'|² = c_iᵀ G c_i``, so the cost is
``O(K³)`` whatever the number of parameters.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import jacobian as jac_lib
from jmtl.methods import base
from jmtl.methods.pcgrad import random_orders

__all__ = ["gradvac", "GradVacState"]


class GradVacState(NamedTuple):
    """State of :func:`gradvac`.

    Attributes:
      target: ``(K, K)`` float32; ``target[i, j]`` is the EMA ``φ̂_ij`` of the cosine
        similarity between task ``i``'s (modified) gradient and task ``j``'s gradient.
    """

    target: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


@functools.partial(jax.jit, static_argnames=("beta", "eps"))
def _gradvac_step(gram, present, orders, target, beta, eps):
    """One GradVac aggregation: ``(coefficients (K, K), new target)``."""
    k = gram.shape[0]
    dtype = jnp.result_type(jnp.float32, gram.dtype)
    g = jac_lib.normalized_gramian(gram.astype(dtype), present)
    gdiag = jnp.diagonal(g)
    usable = present & (gdiag > jnp.finfo(dtype).eps ** 2)
    norms = jnp.sqrt(jnp.clip(gdiag, 0))
    rows = jnp.arange(k)
    target = target.astype(dtype)

    def step(t, carry):
        coef, proj, sq, tgt = carry  # proj[i] = G c_i, sq[i] = |g_i'|²
        j = orders[:, t]
        inner = proj[rows, j]
        ni = jnp.sqrt(jnp.clip(sq, 0))
        nj = norms[j]
        den = ni * nj
        phi = jnp.clip(jnp.where(den > 0, inner / jnp.where(den > 0, den, 1), 0), -1, 1)
        valid = (j != rows) & present & usable[j]
        goal = tgt[rows, j]
        modify = valid & (phi < goal)
        s_phi = jnp.sqrt(jnp.clip(1 - phi ** 2, 0))
        s_goal = jnp.sqrt(jnp.clip(1 - goal ** 2, 0))
        amount = ni * (goal * s_phi - phi * s_goal) / (nj * s_goal + eps)
        amount = jnp.where(modify, amount, 0)
        coef = coef.at[rows, j].add(amount)
        sq = sq + 2 * amount * inner + amount ** 2 * gdiag[j]
        proj = proj + amount[:, None] * g[j]
        new_goal = jnp.where(valid, (1 - beta) * goal + beta * phi, goal)
        tgt = tgt.at[rows, j].set(new_goal)
        return coef, proj, sq, tgt

    coef0 = jnp.eye(k, dtype=dtype)
    coef, _, _, target = jax.lax.fori_loop(0, k, step, (coef0, g, gdiag, target))
    return jnp.where(present[:, None], coef, 0), target


@base.register("gradvac", properties=(
    "scale_invariant", "linear_under_scaling", "jit_consistent", "finite", "absent_tasks",
    "state_pytree"))
def gradvac(beta: float = 0.5, eps: float = 1e-8) -> base.Method:
    """Gradient Vaccine: pull each pair of task gradients towards its usual similarity.

    For every task ``i`` (in parallel), ``g_i' = g_i`` meets the other tasks ``j`` in
    a random order (one permutation per task from the key, as in
    ``jmtl.methods.pcgrad.random_orders``). With ``φ_ij = cos(g_i', g_j)`` and the
    target ``φ̂_ij`` kept in the state, if ``φ_ij < φ̂_ij`` then ``g_i' ← g_i' + a g_j``
    with

    ``a = |g_i'| (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (|g_j| √(1−φ̂_ij²) + eps)``

    which sets the cosine to ``φ̂_ij``; then (whether or not ``g_i'`` moved)
    ``φ̂_ij ← (1−β) φ̂_ij + β φ_ij`` (the paper's Algorithm 2 and Eq. 3). The update is
    ``sum_i g_i'``; targets start at 0, so the first step is PCGrad. Run on the
    Gramian, the method returns weights ``w`` with ``sum_i g_i' = sum_j w_j g_j``.

    Targets are per task pair over the whole shared parameter vector (LibMTL's
    ``group_type=0``). LibMTL updates ``φ̂_ij`` only when ``g_i'`` was modified; this
    implementation follows the paper and updates it at every visit. Only pairs of
    present tasks are compared and only their targets move; absent tasks get weight 0.
    ``eps`` is relative: the (pre-scaled) Gramian is divided by its trace first, so
    |J| from 1e-20 to 1e20 in float32 gives the same weights. Heads (task-specific
    parameters) get their own unweighted gradient, as in LibMTL.

    Args:
      beta: EMA rate ``β`` of the similarity targets (paper / LibMTL default 0.5;
        the paper's experiments use ``1e-2``).
      eps: added to the denominator of the adjustment (LibMTL's ``1e-8``).

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs the Gramian and a key; output
      ``"weights"``; state :class:`GradVacState`; ``weights_task_specific=False``).

    Examples:
      >>> import jax, jax.numpy as jnp, jmtl
      >>> m = jmtl.gradvac()
      >>> J = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
      >>> update, state = jmtl.aggregate(m, J, m.init(2), key=jax.random.key(0))
      >>> [round(x, 3) for x in update.tolist()]  # first step = PCGrad
      [0.5, 1.5]
      >>> state.target.shape
      (2, 2)

    References:
      Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving
      Multi-task Optimization in Massively Multilingual Models", ICLR 2021.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"method 'gradvac': beta must be in [0, 1], got {beta}")

    def init(num_tasks: int, dim: int | None = None) -> GradVacState:
        del dim
        return GradVacState(target=jnp.zeros((num_tasks, num_tasks), jnp.float32))

    def update(inputs: base.Inputs, state: GradVacState):
        gram = inputs.gramian
        k = gram.shape[0]
        if state.target.shape != (k, k):
            raise ValueError(f"method 'gradvac': state is for {state.target.shape[0]} tasks, "
                             f"the Gramian has {k}")
        orders = random_orders(inputs.key, k)
        coef, target = _gradvac_step(gram, inputs.present, orders, state.target,
                                     beta=beta, eps=eps)
        return jnp.sum(coef, axis=0), GradVacState(target=target.astype(state.target.dtype))

    return base.Method(name="gradvac", init=init, update=update,
                       needs=frozenset({base.GRAMIAN, base.KEY}), output="weights",
                       weights_task_specific=False)
