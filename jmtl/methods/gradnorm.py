"""GradNorm (gradient normalisation for adaptive loss balancing)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmtl import _checks, objectives
from jmtl.methods import _schedule, base

__all__ = ["gradnorm", "GradNormState", "renormalise_present", "PARAMETERIZATIONS"]

#: The weight parameterisations of :func:`gradnorm`.
PARAMETERIZATIONS = ("weights", "softmax")


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`.

    Attributes:
      weights: ``(K,)`` float32 task weights ``w_i`` for the next step (sum to K).
      params: ``(K,)`` float32 parameters trained by the optimizer: the logits ``ξ``
        (``"softmax"``), or a copy of ``weights`` (``"weights"``: the weights field is the
        parameter).
      opt_state: the optax optimizer's state for ``params``.
      initial_losses: ``(K,)`` float32 ``L_i(0)``.
      seen: ``(K,)`` bool, whether ``L_i(0)`` is set for task ``i``.
      loss_sum: ``(K,)`` float32 sum of the losses seen during the warm-up.
      loss_count: ``(K,)`` int32 number of losses seen during the warm-up.
      step: int32 number of updates so far.
    """

    weights: jax.Array
    params: jax.Array
    opt_state: Any
    initial_losses: jax.Array
    seen: jax.Array
    loss_sum: jax.Array
    loss_count: jax.Array
    step: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


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
def gradnorm(alpha: float = 1.5, lr: float = 0.025, min_weight: float = 1e-6,
             optimizer: optax.GradientTransformation | None = None,
             parameterization: str = "weights", warmup_steps: int = 0) -> base.Method:
    """GradNorm: learn loss weights that equalise the tasks' training rates.

    With the current weights ``w``, each present task's weighted gradient norm on the
    chosen shared layer is ``G_i = w_i n_i`` (``n_i``: the norm of its unweighted
    gradient, ``grad_norms``). With ``Ḡ`` their mean, the loss ratios
    ``L̃_i = L_i / L_i(0)`` and the inverse training rates ``r_i = L̃_i / mean(L̃)``,
    the target ``T_i = Ḡ r_i^α`` is a constant and the GradNorm loss is
    ``Σ_i |G_i − T_i|`` (:func:`jmtl.objectives.gradnorm`). Its gradient w.r.t. the
    weights' parameters takes one step of ``optimizer`` (state kept in the method's
    state); then the weights are renormalised to sum to K.

    The returned weights are the *current* (pre-update) weights, which the model step
    uses, as in the paper; the updated weights are stored for the next step.

    Conventions (the paper's by default; LibMTL's as options):

    * ``parameterization="weights"`` (paper): the parameters are the weights themselves,
      floored at ``min_weight`` and renormalised so the present tasks' weights keep their
      total (K when all are present). ``"softmax"`` (LibMTL): ``w = K softmax(ξ)`` over
      all tasks, the logits ``ξ`` being the parameters (``min_weight`` unused).
    * ``warmup_steps=0`` (paper): ``L_i(0)`` is the first loss seen for task ``i``.
      ``warmup_steps=N`` (LibMTL with ``N`` = steps per epoch): the first ``N`` steps use
      weights 1 and do not train them, and ``L_i(0)`` is the mean of task ``i``'s losses
      over them.
    * ``optimizer=None``: iRprop⁻ with initial step ``lr``
      (:func:`jmtl.transform.irprop`). The GradNorm loss is piecewise linear, so
      its gradient has a constant magnitude ``n_i`` and only its sign carries
      information: plain SGD or Adam at a fixed rate circle the equilibrium in a limit
      cycle whose size is set by the rate (with Adam(0.025) and gradient norms 1 and 100
      the weights swung by 96% of their value after 3,000 steps), while Rprop, a
      sign-based method that halves its step at every sign change, settles at
      ``w ∝ 1/n`` for any gradient scale. Neither the paper nor LibMTL gives a separate
      rate (both train the weights with the model's optimizer): pass
      ``optimizer=optax.adam(model_lr)`` for LibMTL's choice.

    Absent tasks: weight 0 in the output; they do not enter the means, do not set
    ``L_i(0)``, and keep their parameter and per-task optimizer statistics.

    Losses: with ``α != 0`` they enter ratios and must be positive. Concrete non-positive
    losses of present tasks raise a ``ValueError``; under ``jit`` the check runs under
    :func:`jmtl.checked`, and unchecked a non-positive ``L_i(0)`` gives ``L̃_i = 1`` and
    a negative ratio counts as 0.

    Args:
      alpha: the asymmetry ``α`` (paper default 1.5); a number, scalar array or schedule.
      lr: initial step of the default iRprop⁻ optimizer (ignored when ``optimizer`` is
        given); a number, scalar array or schedule.
      min_weight: floor of the weights after a step (``"weights"`` parameterisation).
      optimizer: an optax optimizer for the weights' parameters (default iRprop⁻, above).
      parameterization: ``"weights"`` (paper) or ``"softmax"`` (LibMTL).
      warmup_steps: steps with equal weights whose mean losses give ``L_i(0)`` (0:
        paper; steps per epoch: LibMTL).

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs losses and gradient norms; output
      ``"weights"``; state :class:`GradNormState`; task-specific parameters receive
      ``w_i ∇L_i``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.gradnorm()
      >>> J = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> update, state = jmtl.aggregate(m, J, m.init(2), losses=jnp.array([1.0, 1.0]))
      >>> update.tolist()  # the first step uses w = 1
      [1.0, 4.0]
      >>> for _ in range(3):
      ...     update, state = jmtl.aggregate(m, J, state, losses=jnp.array([1.0, 1.0]))
      >>> [round(w, 3) for w in state.weights.tolist()]  # steps 0.025, 0.03, 0.036, 0.0432
      [1.134, 0.866]

    References:
      Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
      Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.
      Igel & Hüsken, "Improving the Rprop Learning Algorithm", NC 2000 (iRprop⁻).
      Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023.
    """
    _schedule.check_value("gradnorm", "lr", lr, lambda x: x > 0, "positive")
    _schedule.check_value("gradnorm", "min_weight", min_weight, lambda x: x > 0, "positive")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"method 'gradnorm': parameterization must be one of "
                         f"{PARAMETERIZATIONS}, got {parameterization!r}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"method 'gradnorm': warmup_steps must be a non-negative integer, "
                         f"got {warmup_steps!r}")
    warmup_steps = int(warmup_steps)
    opt = _schedule.optimizer_or_default("gradnorm", optimizer, lambda: _schedule.irprop(lr))
    softmax = parameterization == "softmax"
    ratio_based = not (_checks.is_concrete(alpha) and float(jnp.asarray(alpha)) == 0.0)

    def weights_of(params: jax.Array) -> jax.Array:
        if softmax:
            return params.shape[0] * jax.nn.softmax(params)
        return params

    def init(num_tasks: int, dim: int | None = None) -> GradNormState:
        del dim
        params = jnp.full((num_tasks,), 0.0 if softmax else 1.0, jnp.float32)
        zf = lambda: jnp.zeros((num_tasks,), jnp.float32)  # noqa: E731 (distinct buffers)
        return GradNormState(weights=jnp.ones((num_tasks,), jnp.float32), params=params,
                             opt_state=opt.init(params), initial_losses=zf(),
                             seen=jnp.zeros((num_tasks,), bool), loss_sum=zf(),
                             loss_count=jnp.zeros((num_tasks,), jnp.int32),
                             step=jnp.zeros((), jnp.int32))

    def update(inputs: base.Inputs, state: GradNormState):
        present = inputs.present
        k = present.shape[0]
        if not isinstance(state, GradNormState) or state.weights.shape != (k,):
            got = (f"a state for {state.weights.shape[0]} tasks"
                   if isinstance(state, GradNormState) else type(state).__name__)
            raise ValueError(f"method 'gradnorm': expected a GradNormState for {k} tasks, "
                             f"got {got}")
        if ratio_based:
            objectives.check_ratio_losses(inputs.losses, method="gradnorm", where=present)
        dtype = jnp.result_type(jnp.float32, inputs.losses.dtype, inputs.grad_norms.dtype)
        losses = jnp.where(present, inputs.losses.astype(dtype), 0)
        norms = jnp.where(present, jnp.abs(inputs.grad_norms.astype(dtype)), 0)
        in_warmup = state.step < warmup_steps
        # L_i(0): the warm-up mean, else the first loss seen for the task.
        loss_sum = state.loss_sum + jnp.where(present & in_warmup, losses, 0)
        loss_count = state.loss_count + (present & in_warmup).astype(jnp.int32)
        warm_mean = loss_sum / jnp.maximum(loss_count, 1).astype(dtype)
        set_now = ~state.seen & (~in_warmup) & ((loss_count > 0) | present)
        l0 = jnp.where(set_now, jnp.where(loss_count > 0, warm_mean, losses),
                       state.initial_losses.astype(dtype))
        seen = state.seen | set_now

        w = state.weights.astype(dtype)
        params = state.params.astype(dtype) if softmax else w  # "weights": w is the parameter
        active = present & ~in_warmup
        grads = jax.grad(lambda p: objectives.gradnorm_loss(
            weights_of(p), norms, losses, l0, alpha, mask=active))(params)
        new_params, new_opt = _schedule.masked_step(opt, params, grads, state.opt_state, active)
        if softmax:
            new_w = weights_of(new_params)
        else:
            new_params = jnp.where(active, jnp.maximum(new_params, min_weight), new_params)
            new_params = renormalise_present(new_params, params, active)
            new_w = new_params

        out = jnp.where(present, jnp.where(in_warmup, 1.0, w), 0)
        sdt = state.weights.dtype
        new_state = GradNormState(weights=new_w.astype(sdt), params=new_params.astype(sdt),
                                  opt_state=new_opt,
                                  initial_losses=l0.astype(state.initial_losses.dtype),
                                  seen=seen, loss_sum=loss_sum.astype(sdt),
                                  loss_count=loss_count, step=state.step + 1)
        return out, new_state

    return base.Method(name="gradnorm", init=init, update=update,
                       needs=frozenset({base.LOSSES, base.GRAD_NORMS}), output="weights",
                       weights_task_specific=True)
