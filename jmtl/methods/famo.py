"""``famo``: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023).

FAMO keeps task logits ``ξ`` with ``z = softmax(ξ)``. The model step uses the gradient of
``sum_i z_i log(L_i - b_i + ε) / c`` with ``c = sum_j z_j / (L_j - b_j + ε)``, i.e. task
weights ``w_i = z_i / (c (L_i - b_i + ε))`` (positive, summing to 1). After the step, the
logits move so as to favour the tasks whose log-loss fell least: with
``δ_i = log(L_i^before) - log(L_i^after)`` (``L - b + ε`` inside the logarithms), the
logits' gradient is ``J_zᵀ δ`` (the softmax's vector-Jacobian product), and ``ξ`` takes one
Adam step (learning rate ``w_lr``) on that gradient plus the L2 term ``γ ξ``
(PyTorch-style coupled weight decay), as in the paper's practical algorithm, the official
code and LibMTL.

Two ways to give FAMO the loss after the step:

* **Next-step losses (default, no extra forward pass).** ``update`` at step ``t`` first
  updates the logits with ``δ = log L(t-1) - log L(t)`` from the losses it stored at step
  ``t-1`` and the losses it receives now, then computes this step's weights. The "after"
  loss is measured on the next batch.
* **Exact (the paper's variant).** After the optimiser step, evaluate the losses on the
  same batch and call :func:`observe` with them. It updates the logits at once and marks
  the stored losses as consumed, so the next ``update`` does not update again.

Absent tasks: weight 0, logits, Adam moments and stored loss unchanged. A logit update
uses the tasks present both before and after (softmax restricted to them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmtl import tasks as tasks_lib
from jmtl.methods import base

__all__ = ["famo", "FAMOState", "observe"]


class FAMOState(NamedTuple):
    """State of :func:`famo`.

    Attributes:
      logits: ``(K,)`` task logits ``ξ``.
      adam_mu: ``(K,)`` Adam first moment of the logits.
      adam_nu: ``(K,)`` Adam second moment of the logits.
      adam_count: ``(K,)`` int32, Adam steps taken per logit.
      prev_log_loss: ``(K,)`` ``log(L - b + ε)`` stored at the last ``update``.
      pending: ``(K,)`` bool, whether ``prev_log_loss`` still awaits its logit update.
    """

    logits: jax.Array
    adam_mu: jax.Array
    adam_nu: jax.Array
    adam_count: jax.Array
    prev_log_loss: jax.Array
    pending: jax.Array


_B1, _B2, _ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults, as in the paper's code


def _log_shifted(losses: jax.Array, present: jax.Array, min_losses, eps) -> jax.Array:
    dtype = losses.dtype
    d = losses - jnp.asarray(min_losses, dtype) + jnp.asarray(eps, dtype)
    tiny = jnp.finfo(dtype).tiny
    d = jnp.where(present & (d > tiny), d, jnp.where(present, tiny, 1.0))
    return jnp.log(jnp.where(jnp.isnan(d), 1.0, d))


def _logit_step(state: FAMOState, log_loss: jax.Array, valid: jax.Array, *, w_lr: float,
                gamma: float) -> FAMOState:
    """One Adam step of the logits from ``δ = prev_log_loss - log_loss`` on ``valid`` tasks."""
    dtype = state.logits.dtype
    xi = state.logits
    delta = jnp.where(valid, state.prev_log_loss - log_loss.astype(dtype), 0.0)
    # Vector-Jacobian product of the softmax restricted to the valid tasks.
    z = jax.nn.softmax(jnp.where(valid, xi, 0.0), where=valid)
    z = jnp.where(valid, z, 0.0)
    g = z * (delta - jnp.sum(z * delta)) + gamma * xi
    count = state.adam_count + valid.astype(jnp.int32)
    mu = _B1 * state.adam_mu + (1 - _B1) * g
    nu = _B2 * state.adam_nu + (1 - _B2) * g * g
    t = jnp.maximum(count, 1).astype(dtype)
    mu_hat = mu / (1 - _B1 ** t)
    nu_hat = nu / (1 - _B2 ** t)
    new_xi = xi - w_lr * mu_hat / (jnp.sqrt(nu_hat) + _ADAM_EPS)
    return FAMOState(
        logits=jnp.where(valid, new_xi, xi),
        adam_mu=jnp.where(valid, mu, state.adam_mu),
        adam_nu=jnp.where(valid, nu, state.adam_nu),
        adam_count=count,
        prev_log_loss=state.prev_log_loss,
        pending=state.pending & ~valid,
    )


@base.register("famo", properties=(
    "permutation_equivariant", "scale_invariant", "linear_under_scaling", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def famo(gamma: float = 1e-3, w_lr: float = 0.025, min_losses: Any = 0.0,
         eps: float = 1e-8) -> base.Method:
    """FAMO: balanced loss decrease from the loss values alone, O(1) per step.

    Weights ``w_i = z_i / (c (L_i - b_i + ε))`` with ``z = softmax(ξ)`` and
    ``c = sum_j z_j / (L_j - b_j + ε)``: the gradient of ``sum_i z_i log(L_i - b_i + ε) / c``.
    The logits ``ξ`` are updated from the decrease of the log-losses (see the module
    docstring for how the "after" losses are given: next-step losses by default, or
    :func:`observe` for the paper's exact variant).

    Args:
      gamma: weight decay of the logits (paper: 1e-3).
      w_lr: Adam learning rate of the logits (paper: 0.025).
      min_losses: lower bounds ``b_i`` of the losses (scalar or ``(K,)``; 0 for
        non-negative losses).
      eps: the ``ε`` added inside the logarithms (official code: 1e-8).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing ``losses``.

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
    if not w_lr >= 0 or not gamma >= 0:
        raise ValueError(f"method 'famo': w_lr and gamma must be non-negative, got "
                         f"w_lr={w_lr}, gamma={gamma}")
    if not eps >= 0:
        raise ValueError(f"method 'famo': eps must be non-negative, got {eps}")
    hp_min = min_losses if isinstance(min_losses, (int, float)) else tuple(
        float(x) for x in jnp.ravel(tasks_lib.stack(min_losses, what="famo: `min_losses`")))
    b = jnp.asarray(hp_min, jnp.float32)

    def init(num_tasks: int, dim: int | None = None) -> FAMOState:
        del dim
        if b.ndim == 1 and b.shape[0] != num_tasks:
            raise ValueError(f"method 'famo': {b.shape[0]} min_losses for {num_tasks} tasks")
        zf = lambda: jnp.zeros((num_tasks,), jnp.float32)  # noqa: E731 (distinct buffers)
        return FAMOState(logits=zf(), adam_mu=zf(), adam_nu=zf(),
                         adam_count=jnp.zeros((num_tasks,), jnp.int32), prev_log_loss=zf(),
                         pending=jnp.zeros((num_tasks,), bool))

    def update(inputs: base.Inputs, state: FAMOState) -> tuple[jax.Array, FAMOState]:
        present = inputs.present
        dtype = state.logits.dtype
        log_d = _log_shifted(inputs.losses.astype(dtype), present, b, eps)
        # Logit update of the previous step, with this step's losses as "after".
        state = _logit_step(state, log_d, state.pending & present, w_lr=w_lr, gamma=gamma)
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
                       weights_task_specific=True,
                       hparams=(("gamma", gamma), ("w_lr", w_lr), ("min_losses", hp_min),
                                ("eps", eps)))


def observe(method: base.Method, state: FAMOState, losses_after: Any,
            present: Any = None) -> FAMOState:
    """FAMO's exact logit update from the losses measured after the model step.

    Call it after the optimiser step with the losses of the *same* batch evaluated at the
    new parameters. It updates the logits from ``δ = log L(before) - log L(after)`` (the
    "before" losses are those the last ``update`` stored) and clears the pending flag, so
    the next ``update`` does not update the logits a second time. Jittable.

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
      ValueError: ``method`` is not a FAMO method, or the number of tasks differs.

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
    hp = dict(method.hparams)
    k = state.logits.shape[0]
    losses = tasks_lib.as_task_vector(losses_after, k, what="losses_after", method="famo")
    mask = (jnp.ones((k,), bool) if present is None else
            tasks_lib.as_task_vector(present, k, what="present", method="famo", dtype=bool))
    b = jnp.asarray(hp["min_losses"], jnp.float32)
    log_d = _log_shifted(losses.astype(state.logits.dtype), mask, b, hp["eps"])
    new = _logit_step(state, log_d, state.pending & mask, w_lr=hp["w_lr"], gamma=hp["gamma"])
    return new._replace(pending=jnp.zeros_like(state.pending))
