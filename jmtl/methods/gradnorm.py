"""GradNorm (gradient normalisation for adaptive loss balancing)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl import _checks
from jmtl.methods import base

__all__ = ["gradnorm", "GradNormState", "renormalise_present"]


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`.

    Attributes:
      weights: ``(K,)`` float32 task weights ``w_i`` for the next step (sum to K).
      initial_losses: ``(K,)`` float32 ``L_i(0)``, the first loss seen for each task.
      seen: ``(K,)`` bool, whether task ``i`` has been present at least once.
      step: int32 number of updates so far.
    """

    weights: jax.Array
    initial_losses: jax.Array
    seen: jax.Array
    step: jax.Array


def renormalise_present(new: jax.Array, old: jax.Array, present: jax.Array) -> jax.Array:
    """Rescales the present tasks' weights so that their total is unchanged.

    Absent tasks keep their old weights; the present ones take ``new`` rescaled to
    ``sum_present(old)``. Weights that summed to K still do, and with every task
    present this is plain renormalisation to K.

    Examples:
      >>> renormalise_present(jnp.array([1.0, 3.0, 9.0]), jnp.array([1.0, 1.0, 1.0]),
      ...                     jnp.array([True, True, False])).tolist()
      [0.5, 1.5, 1.0]
    """
    mass = jnp.sum(jnp.where(present, old, 0))
    total = jnp.sum(jnp.where(present, new, 0))
    scaled = new * (mass / jnp.where(total > 0, total, 1))
    return jnp.where(present, jnp.where(total > 0, scaled, old), old)


@base.register("gradnorm", properties=(
    "permutation_equivariant", "jit_consistent", "finite", "absent_tasks", "state_pytree"))
def gradnorm(alpha: float = 1.5, lr: float = 0.025, min_weight: float = 1e-6) -> base.Method:
    """GradNorm: learn loss weights that equalise the tasks' training rates.

    With the current weights ``w``, each present task's weighted gradient norm on
    the chosen shared layer is ``G_i = w_i n_i`` (``n_i``: the norm of its unweighted
    gradient, ``grad_norms``). With ``Ḡ`` their mean, the loss ratios
    ``L̃_i = L_i / L_i(0)`` and the inverse training rates ``r_i = L̃_i / mean(L̃)``,
    the target ``T_i = Ḡ r_i^α`` is a constant (its gradient is stopped) and the
    GradNorm loss ``Σ_i |G_i − T_i|`` has the gradient
    ``∂/∂w_i = sign(w_i n_i − T_i) n_i``. The weights take one gradient step,
    ``w ← max(w − lr · ∂, min_weight)``, and the present tasks' weights are
    renormalised so that the weights still sum to K.

    The returned weights are the *current* (pre-update) weights, which the model step
    uses, as in the paper; the updated weights are stored for the next step. On the
    first step they are all 1. ``L_i(0)`` is the first loss seen *for that task*:
    a task absent from a batch does not set it, does not enter the means, keeps its
    weight in the state, and gets weight 0 in the output. Losses must be positive
    (they enter ratios); a task whose ``L_i(0)`` is not positive gets ``L̃_i = 1``.

    Args:
      alpha: the asymmetry ``α`` (paper default 1.5).
      lr: step size of the plain gradient step on the weights. The paper trains the
        weights with the network's optimizer and does not fix a separate rate.
      min_weight: the floor of the weights after a step (they must stay positive).

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs losses and gradient norms; output
      ``"weights"``; state :class:`GradNormState`; ``weights_task_specific=True``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.gradnorm()
      >>> J = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> update, state = jmtl.aggregate(m, J, m.init(2), losses=jnp.array([1.0, 1.0]))
      >>> update.tolist()  # the first step uses w = 1
      [1.0, 4.0]
      >>> [round(w, 3) for w in state.weights.tolist()]  # task 1's larger norm: lower weight
      [1.065, 0.935]

    References:
      Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
      Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.
    """
    if lr <= 0 or min_weight <= 0:
        raise ValueError(f"method 'gradnorm': lr and min_weight must be positive, got lr={lr}, "
                         f"min_weight={min_weight}")

    def init(num_tasks: int, dim: int | None = None) -> GradNormState:
        del dim
        return GradNormState(weights=jnp.ones((num_tasks,), jnp.float32),
                             initial_losses=jnp.zeros((num_tasks,), jnp.float32),
                             seen=jnp.zeros((num_tasks,), bool),
                             step=jnp.zeros((), jnp.int32))

    def update(inputs: base.Inputs, state: GradNormState):
        present = inputs.present
        k = present.shape[0]
        if state.weights.shape != (k,):
            raise ValueError(f"method 'gradnorm': state is for {state.weights.shape[0]} tasks, "
                             f"got {k}")
        _checks.check_finite(jnp.where(present, inputs.losses, 0), method="gradnorm")
        dtype = jnp.result_type(jnp.float32, inputs.losses.dtype, inputs.grad_norms.dtype)
        losses = inputs.losses.astype(dtype)
        norms = jnp.abs(inputs.grad_norms.astype(dtype))
        w = state.weights.astype(dtype)
        first = present & ~state.seen
        l0 = jnp.where(first, losses, state.initial_losses.astype(dtype))
        count = jnp.maximum(jnp.sum(present), 1).astype(dtype)

        ratio = jnp.where(l0 > 0, losses / jnp.where(l0 > 0, l0, 1), 1)
        ratio = jnp.where(present, jnp.clip(ratio, 0), 0)
        mean_ratio = jnp.sum(ratio) / count
        r = jnp.where(mean_ratio > 0, ratio / jnp.where(mean_ratio > 0, mean_ratio, 1), 1)
        g = jnp.where(present, w * norms, 0)
        g_mean = jnp.sum(g) / count
        target = jax.lax.stop_gradient(g_mean * r ** alpha)
        grad = jnp.where(present, jnp.sign(g - target) * norms, 0)
        stepped = jnp.maximum(w - lr * grad, min_weight)
        new_w = renormalise_present(stepped, w, present)

        out = jnp.where(present, w, 0)
        sdt = state.weights.dtype
        new_state = GradNormState(weights=new_w.astype(sdt),
                                  initial_losses=l0.astype(state.initial_losses.dtype),
                                  seen=state.seen | present,
                                  step=state.step + 1)
        return out, new_state

    return base.Method(name="gradnorm", init=init, update=update,
                       needs=frozenset({base.LOSSES, base.GRAD_NORMS}), output="weights",
                       weights_task_specific=True,
                       hparams=(("alpha", alpha), ("lr", lr), ("min_weight", min_weight)))
