"""``rlw``: Random Loss Weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl.methods import base

__all__ = ["rlw"]


@base.register("rlw", properties=(
    "scale_invariant", "linear_under_scaling", "jit_consistent", "finite", "absent_tasks"))
def rlw() -> base.Method:
    """Random loss weighting: fresh random weights at every step.

    ``w = softmax(λ̃)`` with ``λ̃ ~ N(0, I_K)`` drawn from the given key (the paper's
    default normal distribution and LibMTL's implementation); the weights are positive
    and sum to 1. Absent tasks get weight 0 and the softmax runs over the present tasks
    (the draw still has K entries, so a task's number is tied to its position).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses`` and ``key``. The losses are
      not used by the weights; they are declared so the method fits the loss-weighting
      call sites.

    Examples:
      >>> import jax, jax.numpy as jnp, jmtl
      >>> m = jmtl.rlw()
      >>> inputs = jmtl.methods.Inputs(present=jnp.array([True, True, False]),
      ...                              losses=jnp.ones(3), key=jax.random.key(0))
      >>> w, _ = m.update(inputs, m.init(3))
      >>> round(float(w.sum()), 5), float(w[2])
      (1.0, 0.0)

    References:
      Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus
      Test for Multi-Task Learning", TMLR 2022.
    """

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState) -> tuple[jax.Array, base.EmptyState]:
        present = inputs.present
        dtype = jnp.result_type(jnp.float32, inputs.losses.dtype)
        draw = jax.random.normal(inputs.key, present.shape, dtype)
        weights = jax.nn.softmax(draw, where=present)
        return jnp.where(present, weights, 0.0), state

    return base.Method(name="rlw", init=init, update=update,
                       needs=frozenset({base.LOSSES, base.KEY}), weights_task_specific=True)
