"""``config``: conflict-free gradient combination (ConFIG; Liu et al., ICLR 2025)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl.methods import base
from jmtl.solvers import eigen

__all__ = ["config"]


@base.register("config", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks"))
def config() -> base.Method:
    """ConFIG: the direction with equal cosine to every task gradient, rescaled.

    With unit gradients ``u_i = g_i / ||g_i||`` stacked as the rows of ``U``, ConFIG takes
    ``v = pinv(U) 1`` (the minimum-norm ``v`` with ``u_i · v = 1`` for every task, in the
    least-squares sense when no such ``v`` exists), its unit vector ``v̂ = v / ||v||``,
    and the update ``(sum_i g_i · v̂) v̂``.

    Only the ``K×K`` Gramian is needed: ``pinv(U) 1 = Uᵀ pinv(U Uᵀ) 1`` and ``U Uᵀ`` is
    the cosine matrix ``C``, so ``v = Jᵀ a`` with ``a = N pinv(C) 1``
    (``N = diag(1 / ||g_i||)``) and the weights on the rows are
    ``w = a (1ᵀ G a) / (aᵀ G a)``. The result does not depend on the Gramian's overall
    scale, which is normalised first.

    Zero gradients (``u_i = 0``, as in the reference implementation) and absent tasks get
    weight 0 and are left out of the length ``sum_i g_i · v̂``. A zero Jacobian gives zero
    weights.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing the Gramian (a gradient aggregator:
      task-specific parameters get their own task's gradient).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.config()
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 3.0]]), m.init(2))
      >>> [round(x, 4) for x in update.tolist()]  # v̂ = (1, 1)/√2, length 4/√2
      [2.0, 2.0]

    References:
      Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
      Neural Networks", ICLR 2025.
    """

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState
               ) -> tuple[jax.Array, base.EmptyState]:
        dtype = jnp.result_type(jnp.float32, inputs.gramian.dtype)
        g = inputs.gramian.astype(dtype)
        present = inputs.present
        pm = present.astype(dtype)
        # The weights are invariant to the scale of G: normalise so nothing overflows.
        top = jnp.max(jnp.diagonal(g) * pm)
        g = g / jnp.where(top > 0, top, 1.0)
        cos, inv, active = eigen.cosine_gramian(g, present)
        act = active.astype(dtype)
        beta = eigen.psd_pinv_solve(cos, act)
        # inv / max(inv) in (0, 1]: a common factor, which w does not depend on.
        rel = inv / jnp.maximum(jnp.max(inv), jnp.finfo(dtype).tiny)
        a = jnp.where(active, rel * beta, 0.0)
        ga = g @ a
        sq_norm = a @ ga  # ||v||² (up to the common factor)
        length = act @ ga  # sum_i g_i · v (same factor)
        tiny = jnp.finfo(dtype).tiny
        ok = sq_norm > tiny
        weights = jnp.where(ok, a * (length / jnp.where(ok, sq_norm, 1.0)), 0.0)
        return weights, state

    return base.Method(name="config", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False, hparams=())
