"""``dwa``: Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl.methods import _schedule, base
from jmtl.methods import uw as uw_lib

__all__ = ["dwa", "DWAState"]


class DWAState(NamedTuple):
    """State of :func:`dwa`.

    Attributes:
      step: int32 scalar, number of updates so far.
      last: ``(K,)`` mean loss of each task over its last completed period.
      before_last: ``(K,)`` mean loss over the period before that.
      num_periods: ``(K,)`` int32, completed periods recorded per task (saturates at 2).
      acc_sum: ``(K,)`` sum of the losses seen in the current period.
      acc_count: ``(K,)`` int32, number of losses seen in the current period.
    """

    step: jax.Array
    last: jax.Array
    before_last: jax.Array
    num_periods: jax.Array
    acc_sum: jax.Array
    acc_count: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


@base.register("dwa", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def dwa(T: float = 2.0, period: int = 1) -> base.Method:  # noqa: N803 (the paper's name)
    """Dynamic Weight Average: weight tasks by the rate at which their losses fall.

    ``w_i(t) = K · softmax_i(r(t-1) / T)`` with ``r_i(t-1) = L_i(t-1) / L_i(t-2)``, where
    ``L_i(t)`` is the mean loss of task ``i`` over period ``t``. A task whose loss falls
    slowly gets a larger weight. While a task has fewer than two completed periods its
    ratio is taken as 1, so every weight is 1 during the first two periods (as in the
    paper).

    A *period* is ``period`` calls to ``update``. The paper and LibMTL use one epoch
    (``period = steps_per_epoch``); the default ``period=1`` uses the losses of the
    previous two steps. The losses passed at a call are recorded after the weights are
    computed, so the weights of a period depend only on earlier periods.

    Absent tasks get weight 0 and their losses are not recorded; the softmax runs over
    the present tasks and is scaled by their number ``K_present`` (the paper's ``K``
    when every task is present).

    Losses must be non-negative (the ratios of negative losses have no meaning as rates
    of decrease): concrete negative losses raise a ``ValueError``; under ``jit`` the check
    runs under :func:`jmtl.checked`, and unchecked they are recorded as 0 (a ratio with a
    zero denominator counts as 1).

    Args:
      T: softmax temperature (paper: 2); a number, scalar array or optax schedule.
      period: number of ``update`` calls averaged into one loss-history entry.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.dwa()
      >>> state = m.init(2)
      >>> present = jnp.array([True, True])
      >>> for losses in ([1.0, 1.0], [0.5, 1.0]):
      ...     w, state = m.update(jmtl.methods.Inputs(present, jnp.array(losses)), state)
      >>> w.tolist()  # first two steps: equal weights
      [1.0, 1.0]
      >>> w, state = m.update(jmtl.methods.Inputs(present, jnp.array([0.4, 1.0])), state)
      >>> [round(x, 4) for x in w.tolist()]  # r = (0.5, 1): the slow task gets more
      [0.8756, 1.1244]

    References:
      Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
    """
    _schedule.check_value("dwa", "temperature T", T, lambda x: x > 0, "positive")
    if int(period) != period or period < 1:
        raise ValueError(f"method 'dwa': period must be a positive integer, got {period}")
    period = int(period)

    def init(num_tasks: int, dim: int | None = None) -> DWAState:
        del dim
        # Distinct buffers per field, so the state can be donated to a jitted step.
        zf = lambda: jnp.zeros((num_tasks,), jnp.float32)  # noqa: E731
        zi = lambda: jnp.zeros((num_tasks,), jnp.int32)  # noqa: E731
        return DWAState(step=jnp.zeros((), jnp.int32), last=zf(), before_last=zf(),
                        num_periods=zi(), acc_sum=zf(), acc_count=zi())

    def update(inputs: base.Inputs, state: DWAState) -> tuple[jax.Array, DWAState]:
        present = inputs.present
        if not isinstance(state, DWAState) or state.last.shape != present.shape:
            got = (f"a state for {state.last.shape[0]} tasks" if isinstance(state, DWAState)
                   else type(state).__name__)
            raise ValueError(f"method 'dwa': expected a DWAState for {present.shape[0]} tasks, "
                             f"got {got}")
        uw_lib.check_nonnegative("dwa", inputs.losses, present,
                                 "DWA's weights come from the ratios of successive losses")
        dtype = jnp.result_type(inputs.losses.dtype, state.last.dtype)
        losses = jnp.where(present, jnp.maximum(inputs.losses.astype(dtype), 0.0), 0.0)
        last = state.last.astype(dtype)
        before = state.before_last.astype(dtype)

        # Weights from the two previous periods.
        has_ratio = (state.num_periods >= 2) & (before > 0)
        ratio = jnp.where(has_ratio, last / jnp.where(has_ratio, before, 1.0), 1.0)
        big = jnp.finfo(dtype).max / 4
        ratio = jnp.where(jnp.isnan(ratio), 1.0, jnp.clip(ratio, -big, big))
        logits = jnp.where(present, ratio / T, 0.0)
        k_present = jnp.sum(present).astype(dtype)
        weights = k_present * jax.nn.softmax(logits, where=present)
        weights = jnp.where(present, weights, 0.0)

        # Record this call's losses; close the period every `period` calls.
        acc_sum = state.acc_sum.astype(dtype) + losses
        acc_count = state.acc_count + present.astype(jnp.int32)
        step = state.step + 1
        close = (step % period) == 0
        push = close & (acc_count > 0)
        mean = acc_sum / jnp.maximum(acc_count, 1).astype(dtype)
        new_last = jnp.where(push, mean, last)
        new_before = jnp.where(push, last, before)
        num_periods = jnp.where(push, jnp.minimum(state.num_periods + 1, 2), state.num_periods)
        acc_sum = jnp.where(close, 0.0, acc_sum)
        acc_count = jnp.where(close, 0, acc_count)
        sd = state.last.dtype
        new_state = DWAState(step=step, last=new_last.astype(sd), before_last=new_before.astype(sd),
                             num_periods=num_periods, acc_sum=acc_sum.astype(sd),
                             acc_count=acc_count)
        return weights, new_state

    return base.Method(name="dwa", init=init, update=update, needs=frozenset({base.LOSSES}),
                       weights_task_specific=True)
