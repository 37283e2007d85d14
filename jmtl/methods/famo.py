"""``famo``: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023).

FAMO keeps task logits ``ξ`` with ``z = softmax(ξ)``. The model step uses the gradient of
``sum_i z_i log(L_i - b_i + ε) / c`` with ``c = sum_j z_j / (L_j - b_j + ε)``, i.e. task
weights ``w_i = z_i / (c (L_i - b_i + ε))`` (positive, summing to 1). After the step, the
logits move so as to favour the tasks whose log-loss fell least: with
``δ_i = log(L_i^before) - log(L_i^after)`` (``L - b + ε`` inside the logarithms), the
logits' gradient is ``J_zᵀ δ`` (the softmax's vector-Jacobian product), and ``ξ`` takes one
step of an optax optimizer held in the state; the default,
``optax.chain(optax.add_decayed_weights(γ), optax.adam(w_lr))``, is the official code's and
LibMTL's ``torch.optim.Adam([ξ], lr=w_lr, weight_decay=γ)`` (coupled L2 decay, PyTorch's
Adam constants).

Two ways to give FAMO the loss after the step:

* **Next-step losses (default, no extra forward pass).** ``update`` at step ``t`` first
  updates the logits with ``δ = log L(t-1) - log L(t)`` from the losses it stored at step
  ``t-1`` and the losses it receives now, then computes this step's weights. The "after"
  loss is measured on the next batch.
* **Exact (the paper's variant).** After the optimiser step, evaluate the losses on the
  same batch and call :func:`observe` with them. It updates the logits at once and marks
  the stored losses as consumed, so the next ``update`` does not update again.

Absent tasks: weight 0, logits, per-task optimizer statistics (Adam's moments) and stored
loss unchanged (the optimizer's step counter is shared and advances). A logit update uses
the tasks present both before and after (softmax restricted to them).

Losses must be at least their lower bounds ``b`` (``min_losses``, 0 by default): FAMO takes
``log(L - b + ε)``. Concrete losses below ``b`` raise a ``ValueError``; under ``jit`` the
check runs under :func:`jmtl.checked`, and unchecked ``L - b + ε`` is clamped to the
smallest positive float (the task then looks solved).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmtl import _checks
from jmtl import tasks as tasks_lib
from jmtl.methods import _schedule, base

__all__ = ["famo", "FAMOState", "observe", "default_optimizer"]


class FAMOState(NamedTuple):
    """State of :func:`famo`.

    Attributes:
      logits: ``(K,)`` task logits ``ξ``.
      opt_state: the optax optimizer's state for the logits.
      prev_log_loss: ``(K,)`` ``log(L - b + ε)`` stored at the last ``update``.
      pending: ``(K,)`` bool, whether ``prev_log_loss`` still awaits its logit update.
    """

    logits: jax.Array
    opt_state: Any
    prev_log_loss: jax.Array
    pending: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def default_optimizer(gamma: Any, w_lr: Any) -> optax.GradientTransformation:
    """FAMO's logit optimizer: Adam (PyTorch's constants) with coupled weight decay ``γ``."""
    return optax.chain(optax.add_decayed_weights(gamma),
                       optax.adam(w_lr, b1=0.9, b2=0.999, eps=1e-8))


def _check_losses(losses: jax.Array, present: jax.Array, b: jax.Array) -> None:
    """Losses of present tasks must be at least their lower bounds ``b``."""
    if _checks.is_concrete(losses) and _checks.is_concrete(present) and _checks.is_concrete(b):
        arr = np.asarray(losses, float)
        bb = np.broadcast_to(np.asarray(b, float), arr.shape)
        bad = np.flatnonzero((arr < bb) & np.asarray(present, bool))
        if bad.size:
            tasks = ", ".join(f"task {i}={float(arr[i])!r} (bound {float(bb[i])!r})"
                              for i in bad)
            raise ValueError(f"famo: losses must be at least their lower bounds `min_losses` "
                             f"(FAMO takes log(L - b + eps)); got {tasks}. For losses that can "
                             f"be negative pass min_losses=<a lower bound>.")
        return
    _checks.runtime_check(jnp.all((losses >= b) | ~present),
                          "famo: losses must be at least min_losses")


def _log_shifted(losses: jax.Array, present: jax.Array, min_losses, eps) -> jax.Array:
    dtype = losses.dtype
    d = losses - jnp.asarray(min_losses, dtype) + jnp.asarray(eps, dtype)
    tiny = jnp.finfo(dtype).tiny
    d = jnp.where(present & (d > tiny), d, jnp.where(present, tiny, 1.0))
    return jnp.log(jnp.where(jnp.isnan(d), 1.0, d))


def _logit_step(opt: optax.GradientTransformation, state: FAMOState, log_loss: jax.Array,
                valid: jax.Array) -> FAMOState:
    """One optimizer step of the logits from ``δ = prev_log_loss - log_loss`` on ``valid``."""
    dtype = state.logits.dtype
    xi = state.logits
    delta = jnp.where(valid, state.prev_log_loss - log_loss.astype(dtype), 0.0)
    # Vector-Jacobian product of the softmax restricted to the valid tasks.
    z = jax.nn.softmax(jnp.where(valid, xi, 0.0), where=valid)
    z = jnp.where(valid, z, 0.0)
    g = z * (delta - jnp.sum(z * delta))
    new_xi, new_opt = _schedule.masked_step(opt, xi, g, state.opt_state, valid)
    return FAMOState(logits=new_xi, opt_state=new_opt, prev_log_loss=state.prev_log_loss,
                     pending=state.pending & ~valid)


@base.register("famo", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def famo(gamma: float = 1e-3, w_lr: float = 0.025, min_losses: Any = 0.0,
         eps: float = 1e-8, optimizer: optax.GradientTransformation | None = None
         ) -> base.Method:
    """FAMO: balanced loss decrease from the loss values alone, O(1) per step.

    Weights ``w_i = z_i / (c (L_i - b_i + ε))`` with ``z = softmax(ξ)`` and
    ``c = sum_j z_j / (L_j - b_j + ε)``: the gradient of ``sum_i z_i log(L_i - b_i + ε) / c``.
    The logits ``ξ`` are updated from the decrease of the log-losses (see the module
    docstring for how the "after" losses are given: next-step losses by default, or
    :func:`observe` for the paper's exact variant).

    Args:
      gamma: weight decay of the logits (paper: 1e-3); number, scalar array or schedule.
      w_lr: Adam learning rate of the logits (paper: 0.025); number, scalar array or
        schedule.
      min_losses: lower bounds ``b_i`` of the losses (scalar, ``(K,)`` or
        ``{task: value}``; 0 for non-negative losses).
      eps: the ``ε`` added inside the logarithms (official code: 1e-8).
      optimizer: an optax optimizer for the logits; default
        :func:`default_optimizer` ``(gamma, w_lr)``, the official code's (``gamma`` and
        ``w_lr`` are then ignored).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses`` (task-specific parameters
      receive ``w_i ∇L_i``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.famo()
      >>> present = jnp.array([True, True])
      >>> w, state = m.update(jmtl.methods.Inputs(present, jnp.array([1.0, 3.0])), m.init(2))
      >>> [round(x, 4) for x in w.tolist()]  # z uniform: w ∝ 1 / L
      [0.75, 0.25]
      >>> state = jmtl.methods.famo.observe(m, state, jnp.array([0.5, 3.0]))
      >>> bool(state.logits[1] > state.logits[0])  # task 1 did not improve: favoured
      True

    References:
      Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.
    """
    for key, value in (("w_lr", w_lr), ("gamma", gamma), ("eps", eps)):
        _schedule.check_value("famo", key, value, lambda x: x >= 0, "non-negative")
    opt = _schedule.optimizer_or_default("famo", optimizer,
                                         lambda: default_optimizer(gamma, w_lr))
    if isinstance(min_losses, dict) or isinstance(min_losses, (list, tuple)):
        b = jnp.asarray(tasks_lib.stack(min_losses, what="famo: `min_losses`")
                        if isinstance(min_losses, dict) else min_losses, jnp.float32)
    else:
        b = jnp.asarray(min_losses, jnp.float32)
    if b.ndim > 1:
        raise ValueError(f"method 'famo': min_losses must be a scalar or one value per task, "
                         f"got shape {b.shape}")

    def init(num_tasks: int, dim: int | None = None) -> FAMOState:
        del dim
        if b.ndim == 1 and b.shape[0] != num_tasks:
            raise ValueError(f"method 'famo': {b.shape[0]} min_losses for {num_tasks} tasks")
        zf = lambda: jnp.zeros((num_tasks,), jnp.float32)  # noqa: E731 (distinct buffers)
        logits = zf()
        return FAMOState(logits=logits, opt_state=opt.init(logits), prev_log_loss=zf(),
                         pending=jnp.zeros((num_tasks,), bool))

    def update(inputs: base.Inputs, state: FAMOState) -> tuple[jax.Array, FAMOState]:
        present = inputs.present
        if not isinstance(state, FAMOState) or state.logits.shape != present.shape:
            got = (f"a state for {state.logits.shape[0]} tasks" if isinstance(state, FAMOState)
                   else type(state).__name__)
            raise ValueError(f"method 'famo': expected a FAMOState for {present.shape[0]} "
                             f"tasks, got {got}")
        dtype = state.logits.dtype
        _check_losses(inputs.losses, present, b)
        log_d = _log_shifted(inputs.losses.astype(dtype), present, b, eps)
        # Logit update of the previous step, with this step's losses as "after".
        state = _logit_step(opt, state, log_d, state.pending & present)
        z = jax.nn.softmax(jnp.where(present, state.logits, 0.0), where=present)
        # w_i ∝ z_i / D_i, normalised in log space (finite for any loss scale).
        log_zd = jnp.where(present, jnp.log(jnp.where(present, z, 1.0)) - log_d, 0.0)
        weights = jax.nn.softmax(log_zd, where=present)
        weights = jnp.where(present, weights, 0.0)
        new_state = state._replace(
            prev_log_loss=jnp.where(present, log_d, state.prev_log_loss),
            pending=present,
        )
        return weights, new_state

    return base.Method(name="famo", init=init, update=update, needs=frozenset({base.LOSSES}),
                       weights_task_specific=True)


def observe(method: base.Method, state: FAMOState, losses_after: Any,
            present: Any = None) -> FAMOState:
    """FAMO's exact logit update from the losses measured after the model step.

    Call it after the optimiser step with the losses of the *same* batch evaluated at the
    new parameters. It updates the logits from ``δ = log L(before) - log L(after)`` (the
    "before" losses are those the last ``update`` stored) and clears the pending flag, so
    the next ``update`` does not update the logits a second time. Jittable. Methods whose
    hyperparameters are schedules are not supported (their state is a
    ``ScheduledState``).

    Args:
      method: the method from :func:`famo` whose state this is (its hyperparameters are
        used).
      state: the state returned by the last ``update``.
      losses_after: ``(K,)`` array or ``{task: scalar}`` of the losses after the step.
      present: optional ``(K,)`` bool mask or ``{task: bool}`` of tasks present in that
        batch; others keep their logits.

    Returns:
      The new state.

    Raises:
      ValueError: ``method`` is not a FAMO method, the state is not a ``FAMOState`` or
        the number of tasks differs.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.famo()
      >>> _, s = m.update(jmtl.methods.Inputs(jnp.array([True, True]),
      ...                                     jnp.array([1.0, 1.0])), m.init(2))
      >>> s = jmtl.methods.famo.observe(m, s, {"a": 0.5, "b": 1.0})
      >>> s.pending.tolist()
      [False, False]

    References:
      Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
      (Algorithm 2).
    """
    if not isinstance(method, base.Method) or method.name != "famo":
        raise ValueError(f"famo.observe: expected a method built by jmtl.famo(), got {method!r}")
    if not isinstance(state, FAMOState):
        raise ValueError(f"famo.observe: expected a FAMOState (a famo method without "
                         f"scheduled hyperparameters), got {type(state).__name__}")
    hp = dict(method.hparams)
    opt = _schedule.optimizer_or_default(
        "famo", hp.get("optimizer"), lambda: default_optimizer(hp["gamma"], hp["w_lr"]))
    k = state.logits.shape[0]
    losses = tasks_lib.as_task_vector(losses_after, k, what="losses_after", method="famo")
    mask = (jnp.ones((k,), bool) if present is None else
            tasks_lib.as_task_vector(present, k, what="present", method="famo", dtype=bool))
    mins = hp["min_losses"]
    b = jnp.asarray(tasks_lib.stack(mins, what="famo: `min_losses`")
                    if isinstance(mins, dict) else mins, jnp.float32)
    _check_losses(losses, mask, b)
    log_d = _log_shifted(losses.astype(state.logits.dtype), mask, b, hp["eps"])
    new = _logit_step(opt, state, log_d, state.pending & mask)
    return new._replace(pending=jnp.zeros_like(state.pending))
