"""``uw``: uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmtl import _checks, objectives
from jmtl.methods import _schedule, base

__all__ = ["uw", "UWState", "default_optimizer", "check_nonnegative"]


class UWState(NamedTuple):
    """State of :func:`uw`.

    Attributes:
      log_vars: ``(K,)`` float32 log-variances ``s_i = log σ_i²``.
      opt_state: the optax optimizer's state for ``log_vars``.
    """

    log_vars: jax.Array
    opt_state: Any
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def default_optimizer(lr: Any) -> optax.GradientTransformation:
    """``optax.chain(optax.clip(1.0), optax.adam(lr))``: the default for learned loss scales.

    The gradient of ``exp(-s) L + s`` w.r.t. ``s`` is ``1 - exp(-s) L``, bounded by 1 on
    one side and as large as the loss on the other. Clipping it to ``[-1, 1]`` before Adam
    keeps Adam's second moment from remembering an early gradient of the loss's size
    (which slowed convergence from a loss of 1e4 to over 5,000 steps in our runs); after
    the clip every task moves by about ``lr`` per step until it is near its optimum.
    """
    return optax.chain(optax.clip(1.0), optax.adam(lr))


def check_nonnegative(name: str, losses: jax.Array, present: jax.Array, why: str) -> None:
    """Losses of present tasks must be non-negative: ``ValueError`` naming the tasks on
    concrete values, a runtime check under :func:`jmtl.checked` when traced."""
    safe = jnp.where(present, losses, 0.0)
    if _checks.is_concrete(safe):
        arr = np.asarray(safe)
        bad = np.flatnonzero(arr < 0)
        if bad.size:
            tasks = ", ".join(f"task {i}={float(arr[i])!r}" for i in bad)
            raise ValueError(f"{name}: losses must be non-negative ({why}); got {tasks}")
        return
    _checks.runtime_check(jnp.all(safe >= 0), f"{name}: losses must be non-negative")


@base.register("uw", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def uw(lr: float = 1e-2, kind: str = "log_variance", init_log_var: float = 0.0,
       optimizer: optax.GradientTransformation | None = None) -> base.Method:
    """Uncertainty weighting: learn one homoscedastic noise scale per task.

    The objective is :func:`jmtl.objectives.uncertainty` with the given ``kind``; with
    the default ``"log_variance"`` it is ``sum_i exp(-s_i) L_i + s_i`` where
    ``s_i = log σ_i²``. The weight of task ``i`` is the factor multiplying ``L_i``:
    ``exp(-s_i)`` for ``"log_variance"`` and ``"classification"``, ``exp(-s_i) / 2`` for
    ``"regression"`` and ``"revised"``. The optimum is ``σ_i² = L_i`` (``"log_variance"``),
    i.e. ``w_i L_i = 1`` for every task.

    The log-variances and their optimizer's state live in the method state. Each
    ``update`` returns the weights from the current ``s`` and then takes one step of
    ``optimizer`` on the objective's gradient w.r.t. ``s`` (what training ``s`` jointly
    with the model does). The default, :func:`default_optimizer` (Adam at ``lr = 1e-2``
    after clipping the gradient to ``[-1, 1]``), reaches ``w_i L_i`` equal within 10% in
    about 1,000 steps from loss scales 1e-3 to 1e4, monotonically (no task's weight
    collapses on the way). The paper and LibMTL train ``s`` with the model's optimizer
    (Adam; LibMTL's examples use lr 1e-4, which needs ~10⁵ steps to move ``s`` by
    ``log 1e4``): pass ``optimizer=optax.adam(model_lr)`` for that.

    Absent tasks: weight 0; ``s_i`` and its per-task optimizer statistics unchanged.
    Losses must be non-negative (``exp(-s) L + s`` has no minimum otherwise): concrete
    negative losses raise a ``ValueError``; under ``jit`` the check runs under
    :func:`jmtl.checked`, and unchecked a negative loss is treated as 0.

    Args:
      lr: learning rate of the default optimizer (a number, scalar array or schedule;
        ignored when ``optimizer`` is given).
      kind: one of ``"log_variance"`` (default), ``"regression"``, ``"classification"``,
        ``"revised"``; see :func:`jmtl.objectives.uncertainty`.
      init_log_var: initial ``s_i`` (0: ``σ = 1``, all weights equal; LibMTL: -0.5).
      optimizer: an optax optimizer for the log-variances (default above).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses`` (task-specific parameters
      receive ``w_i ∇L_i``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.uw()
      >>> state = m.init(2)
      >>> w, state = m.update(jmtl.methods.Inputs(present=jnp.array([True, True]),
      ...                     losses=jnp.array([3.0, 1.0])), state)
      >>> w.tolist()  # exp(-0)
      [1.0, 1.0]
      >>> [round(x, 4) for x in state.log_vars.tolist()]  # Adam's first step: lr * sign
      [0.01, 0.0]

    References:
      Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
      Scene Geometry and Semantics", CVPR 2018.
    """
    if kind not in objectives.UNCERTAINTY_KINDS:
        raise ValueError(f"method 'uw': unknown kind {kind!r}; valid kinds are "
                         f"{', '.join(repr(x) for x in objectives.UNCERTAINTY_KINDS)}")
    _schedule.check_value("uw", "lr", lr, lambda x: x >= 0, "non-negative")
    opt = _schedule.optimizer_or_default("uw", optimizer, lambda: default_optimizer(lr))
    half = kind in ("regression", "revised")

    def init(num_tasks: int, dim: int | None = None) -> UWState:
        del dim
        s = jnp.full((num_tasks,), init_log_var, jnp.float32)
        return UWState(log_vars=s, opt_state=opt.init(s))

    def update(inputs: base.Inputs, state: UWState) -> tuple[jax.Array, UWState]:
        present = inputs.present
        if not isinstance(state, UWState) or state.log_vars.shape != present.shape:
            got = (f"a state for {state.log_vars.shape[0]} tasks" if isinstance(state, UWState)
                   else type(state).__name__)
            raise ValueError(f"method 'uw': expected a UWState for {present.shape[0]} tasks, "
                             f"got {got}")
        losses = inputs.losses
        check_nonnegative("uw", losses, present, "exp(-s) L + s has no minimum otherwise")
        dtype = jnp.result_type(losses.dtype, state.log_vars.dtype)
        s = state.log_vars.astype(dtype)
        safe = jnp.where(present, jnp.maximum(losses.astype(dtype), 0.0), 0.0)
        grads = jax.grad(lambda s_: objectives.uncertainty(safe, s_, kind=kind))(s)
        factor = jnp.exp(-s) * (0.5 if half else 1.0)
        weights = jnp.where(present, factor, 0.0)
        new_s, new_opt = _schedule.masked_step(opt, s, grads, state.opt_state, present)
        return weights, UWState(log_vars=new_s.astype(state.log_vars.dtype), opt_state=new_opt)

    return base.Method(name="uw", init=init, update=update, needs=frozenset({base.LOSSES}),
                       weights_task_specific=True)
