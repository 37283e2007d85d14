"""``stch``: Smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl import tasks as tasks_lib
from jmtl.methods import _schedule, base

__all__ = ["stch", "STCHState"]


class STCHState(NamedTuple):
    """State of :func:`stch`.

    Attributes:
      step: int32 scalar, number of updates so far.
      nadir_sum: ``(K,)`` sum of the losses recorded for the nadir point.
      nadir_count: ``(K,)`` int32, number of losses recorded per task.
    """

    step: jax.Array
    nadir_sum: jax.Array
    nadir_count: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


@base.register("stch", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def stch(mu: float = 1.0, preference: Any = None, warmup_steps: int = 0,
         nadir_steps: int = 1) -> base.Method:
    """Smooth Tchebycheff scalarisation of the log-losses, normalised by a nadir point.

    The smooth Tchebycheff scalarisation of objectives ``f_i`` with preference ``λ`` and
    smoothing ``μ`` is ``g = μ log sum_i exp(λ_i f_i / μ)``, a smooth upper bound of
    ``max_i λ_i f_i`` (the classical Tchebycheff scalarisation, recovered as ``μ → 0``).
    Following the multi-task implementation of the authors (and LibMTL), the objectives
    are the log-losses relative to a reference point, ``f_i = log(L_i / n_i)``, and the
    objective is scaled by ``K``. ``n_i`` is the mean loss of task ``i`` over a
    calibration phase, which plays the role of the ideal/nadir point (it makes every
    ``f_i`` start near 0, whatever the loss scales). The weights are the gradient of
    ``K g`` w.r.t. the losses::

        w_i = K λ_i softmax_i(λ f / μ) / L_i

    The schedule, counted in calls to ``update``:

    1. ``warmup_steps`` calls of plain log-loss training (``w_i = 1 / L_i``, the gradient
       of ``sum_i log L_i``);
    2. ``nadir_steps`` more such calls whose losses are averaged into ``n``;
    3. the smooth Tchebycheff weights above from then on.

    LibMTL's schedule is ``warmup_steps = 4 * steps_per_epoch`` and
    ``nadir_steps = steps_per_epoch`` (4 warm-up epochs, the fifth averaged). The default
    (``0``, ``1``) uses the losses of the first call as ``n``. A task not seen during the
    calibration phase takes the first loss it gets as its ``n_i``.

    Absent tasks: weight 0, not recorded; the softmax runs over the present tasks and
    ``K`` is the number of present tasks.

    Args:
      mu: smoothing parameter ``μ > 0`` (the authors' and LibMTL's default: 1); a number,
        scalar array or optax schedule.
      preference: ``λ``, positive, as a ``(K,)`` sequence or ``{task: value}``; default
        all ones (LibMTL's implementation; the paper's uniform ``λ_i = 1/K`` is the same
        up to rescaling ``μ`` by ``K``).
      warmup_steps: number of initial log-loss calls before calibration.
      nadir_steps: number of calls whose losses are averaged into the nadir point.

    Returns:
      A :class:`~jmtl.methods.base.Method` needing positive ``losses``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.stch()
      >>> present = jnp.array([True, True])
      >>> w, state = m.update(jmtl.methods.Inputs(present, jnp.array([2.0, 4.0])), m.init(2))
      >>> w.tolist()  # calibration call: 1 / L
      [0.5, 0.25]
      >>> w, state = m.update(jmtl.methods.Inputs(present, jnp.array([1.0, 4.0])), state)
      >>> [round(x, 4) for x in w.tolist()]  # w·L = (2/3, 4/3): the lagging task leads
      [0.6667, 0.3333]

    References:
      Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for
      Multi-Objective Optimization", ICML 2024.
    """
    _schedule.check_value("stch", "mu", mu, lambda x: x > 0, "positive")
    for nm, v in (("warmup_steps", warmup_steps), ("nadir_steps", nadir_steps)):
        if int(v) != v or v < 0:
            raise ValueError(f"method 'stch': {nm} must be a non-negative integer, got {v}")
    warmup_steps, nadir_steps = int(warmup_steps), int(nadir_steps)
    if preference is None:
        pref = None
    else:
        pref = np.asarray(tasks_lib.stack(
            preference if isinstance(preference, dict) else jnp.asarray(preference, jnp.float32),
            what="stch: `preference`"), np.float32)
        if not np.all(np.isfinite(pref) & (pref > 0)):
            raise ValueError(f"method 'stch': preference must be positive and finite, got "
                             f"{pref.tolist()}")

    def init(num_tasks: int, dim: int | None = None) -> STCHState:
        del dim
        if pref is not None and pref.shape[0] != num_tasks:
            raise ValueError(f"method 'stch': {pref.shape[0]} preferences for {num_tasks} tasks")
        return STCHState(step=jnp.zeros((), jnp.int32),
                         nadir_sum=jnp.zeros((num_tasks,), jnp.float32),
                         nadir_count=jnp.zeros((num_tasks,), jnp.int32))

    def update(inputs: base.Inputs, state: STCHState) -> tuple[jax.Array, STCHState]:
        present = inputs.present
        k = present.shape[0]
        if not isinstance(state, STCHState) or state.nadir_sum.shape != (k,):
            got = (f"a state for {state.nadir_sum.shape[0]} tasks"
                   if isinstance(state, STCHState) else type(state).__name__)
            raise ValueError(f"method 'stch': expected an STCHState for {k} tasks, got {got}")
        if pref is not None and pref.shape[0] != k:
            raise ValueError(f"method 'stch': {pref.shape[0]} preferences for {k} tasks")
        dtype = jnp.result_type(inputs.losses.dtype, state.nadir_sum.dtype)
        losses = inputs.losses.astype(dtype)
        _checks.check_positive(losses, method="stch", what="losses", where=present)
        tiny = jnp.finfo(dtype).tiny
        safe = jnp.where(present & (losses > tiny), losses, jnp.where(present, tiny, 1.0))
        safe = jnp.where(jnp.isnan(safe), 1.0, safe)
        log_l = jnp.log(safe)

        # Record the nadir losses (calibration phase, or a task's first sight after it).
        step = state.step
        calibrating = (step >= warmup_steps) & (step < warmup_steps + nadir_steps)
        late = (step >= warmup_steps + nadir_steps) & (state.nadir_count == 0)
        record = present & (calibrating | late)
        nadir_sum = state.nadir_sum.astype(dtype) + jnp.where(record, safe, 0.0)
        nadir_count = state.nadir_count + record.astype(jnp.int32)
        log_nadir = jnp.log(jnp.where(nadir_count > 0,
                                      nadir_sum / jnp.maximum(nadir_count, 1).astype(dtype),
                                      1.0))

        lam = jnp.ones((k,), dtype) if pref is None else jnp.asarray(pref, dtype)
        f = jnp.where(present, lam * (log_l - log_nadir) / mu, 0.0)
        k_present = jnp.sum(present).astype(dtype)
        soft = jax.nn.softmax(f, where=present)
        # K λ_i softmax_i / L_i, computed as exp(log(...) - log L_i) to stay finite.
        log_w = jnp.log(jnp.where(present & (soft > 0), soft, 1.0)) + jnp.log(lam) - log_l
        w_stch = jnp.where(soft > 0, k_present * jnp.exp(log_w), 0.0)
        w_log = jnp.exp(-log_l)
        in_stch = step >= warmup_steps + nadir_steps
        weights = jnp.where(present, jnp.where(in_stch, w_stch, w_log), 0.0)
        sd = state.nadir_sum.dtype
        return weights, STCHState(step=step + 1, nadir_sum=nadir_sum.astype(sd),
                                  nadir_count=nadir_count)

    return base.Method(name="stch", init=init, update=update, needs=frozenset({base.LOSSES}),
                       weights_task_specific=True)
