"""PCGrad (projecting conflicting gradients), computed in the K×K Gramian.

Every projected gradient stays in the span of the task gradients, so PCGrad is
tracked with coefficient vectors: ``g_i' = c_iᵀ J`` with ``c_i = e_i`` at the start,
and every inner product it needs is ``g_i'·g_j = (G c_i)_j``. The cost is
``O(K³)`` on the Gramian, independent of the number of parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl import jacobian as jac_lib
from jmtl.methods import base

__all__ = ["pcgrad", "random_orders"]


def random_orders(key: jax.Array, num_tasks: int) -> jax.Array:
    """The random visiting orders PCGrad and GradVac draw from ``key``.

    Row ``i`` is a uniformly random permutation of ``0..K-1``: the order in which
    task ``i``'s gradient meets the other tasks (entry ``i`` itself is skipped).

    Args:
      key: a PRNG key (the one given to the method's update).
      num_tasks: K.

    Returns:
      A ``(K, K)`` int32 array whose rows are permutations.

    Examples:
      >>> import jax
      >>> orders = random_orders(jax.random.key(0), 3)
      >>> sorted(orders[0].tolist())
      [0, 1, 2]
    """
    u = jax.random.uniform(key, (num_tasks, num_tasks))
    return jnp.argsort(u, axis=1).astype(jnp.int32)


def _compute_dtype(gram: jax.Array):
    return jnp.result_type(jnp.float32, gram.dtype)


@jax.jit
def _pcgrad_coefficients(gram: jax.Array, present: jax.Array, orders: jax.Array) -> jax.Array:
    """``(K, K)`` matrix whose row ``i`` holds ``c_i``: ``g_i^{PC} = c_iᵀ J``."""
    k = gram.shape[0]
    dtype = _compute_dtype(gram)
    g = jac_lib.normalized_gramian(gram.astype(dtype), present)
    gdiag = jnp.diagonal(g)
    usable = present & (gdiag > jnp.finfo(dtype).eps ** 2)
    rows = jnp.arange(k)

    def step(t, carry):
        coef, proj = carry  # proj[i] = G c_i
        j = orders[:, t]
        inner = proj[rows, j]
        conflict = (j != rows) & usable[j] & (inner < 0)
        gjj = jnp.where(conflict, gdiag[j], 1)
        amount = jnp.where(conflict, inner / gjj, 0)
        coef = coef.at[rows, j].add(-amount)
        proj = proj - amount[:, None] * g[j]
        return coef, proj

    coef0 = jnp.eye(k, dtype=dtype)
    coef, _ = jax.lax.fori_loop(0, k, step, (coef0, g))
    return jnp.where(present[:, None], coef, 0)


@base.register("pcgrad", properties=(
    "scale_invariant", "linear_under_scaling", "jit_consistent", "finite", "absent_tasks"))
def pcgrad() -> base.Method:
    """PCGrad: project each task gradient off the gradients it conflicts with.

    For every task ``i`` (in parallel), ``g_i' = g_i`` is visited against the other
    tasks ``j`` in a random order (one permutation per task, drawn from the key);
    whenever ``g_i'·g_j < 0`` it is projected onto the normal plane of ``g_j``:
    ``g_i' ← g_i' − (g_i'·g_j / |g_j|²) g_j``. The update is ``sum_i g_i'`` (the
    paper's Algorithm 1; LibMTL also sums). Everything runs on the Gramian and the
    method returns the weights ``w`` with ``sum_i g_i' = sum_j w_j g_j``.

    Absent tasks are neither projected nor projected onto, and get weight 0. Rows
    whose squared norm is below ``eps²`` times the Gramian's trace count as zero.
    The method reads the pre-scaled Gramian ``J Jᵀ / s²`` and divides it by its trace,
    so |J| from 1e-20 to 1e20 in float32 gives the same weights (no fallback).
    Heads (task-specific parameters) get their own unweighted gradient, as in the
    official code, LibMTL and torchjd.
    The random orders for a key are :func:`random_orders` ``(key, K)``.

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs the Gramian and a key; output
      ``"weights"``; gradient aggregator, ``weights_task_specific=False``).

    Examples:
      >>> import jax, jax.numpy as jnp, jmtl
      >>> m = jmtl.pcgrad()
      >>> J = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
      >>> update, _ = jmtl.aggregate(m, J, m.init(2), key=jax.random.key(0))
      >>> [round(x, 4) for x in update.tolist()]
      [0.5, 1.5]

    References:
      Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
      Learning", NeurIPS 2020.
    """

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState):
        gram = inputs.gramian
        k = gram.shape[0]
        orders = random_orders(inputs.key, k)
        coef = _pcgrad_coefficients(gram, inputs.present, orders)
        return jnp.sum(coef, axis=0), state

    return base.Method(name="pcgrad", init=init, update=update,
                       needs=frozenset({base.GRAMIAN, base.KEY}), output="weights",
                       weights_task_specific=False)
