"""The engine's one driver: a linearised step, a method, a plan, and the replica context.

``step`` is mode-agnostic: the two modes differ only in how :mod:`jmtl._linearise`
built the :class:`~jmtl._linearise.Linearised` step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmtl import _jacobian_pass, _method_call
from jmtl import jacobian as jac_lib
from jmtl import tasks as tasks_lib
from jmtl._linearise import CONCAT, Linearised
from jmtl.methods import base

__all__ = ["StepResult", "presence", "step"]


class StepResult(NamedTuple):
    """One step's outputs: losses pytree (replica-averaged), grads, state, weights."""

    losses: Any
    grads: Any
    state: Any
    weights: Any


def presence(lin: Linearised, present: Any, name: str) -> jax.Array:
    """``(K,)`` bool mask of the tasks present (OR-ed over the replicas)."""
    for leaf in jax.tree_util.tree_leaves(present):
        if not isinstance(leaf, str) and jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"value_and_mtl_grad({name}): `present` must be bools (or label "
                             f"counts), got {jnp.result_type(leaf)}")
    try:
        pres = tasks_lib.presence_mask(lin.loss_tree, present)
    except ValueError as err:
        raise ValueError(f"value_and_mtl_grad({name}): `present` does not match the losses' "
                         f"tasks {list(tasks_lib.task_names(lin.loss_tree))}: {err}") from err
    return lin.replicas.any(pres)


def _flat_rows(lin: Linearised, stats: _jacobian_pass.Stats) -> jax.Array:
    if stats.flat is None:
        flat = jac_lib.flatten_rows(stats.jac)
    else:
        flat = stats.flat.astype(jac_lib.compute_dtype(stats.flat.dtype))
    if lin.mode == CONCAT and lin.replicas.active:
        # The whole-batch rows: the replicas' blocks side by side, divided by R.
        flat = lin.replicas.gather_columns(flat) / lin.replicas.count()
    return flat


def _shared_part(lin: Linearised, method: base.Method, plan: _jacobian_pass.Plan,
                 stats: _jacobian_pass.Stats, called: _method_call.Called):
    """``(x_grad, head_grads)`` from the method's output and the plan's final step."""
    out, head_w = called.out, called.head_weights
    if method.output == base.DIRECTION:
        d = out
        if lin.mode == CONCAT and lin.replicas.active:
            # This replica's block of the whole-batch direction, rescaled by R (the
            # encoder grads are averaged over the replicas in ``finish``).
            d = lin.replicas.local_block(out) * lin.replicas.count()
        return jac_lib.unflatten_row(d, stats.jac), lin.heads(head_w)
    if plan.combine:
        if stats.flat is None:
            return jac_lib.combine(out, stats.jac), lin.heads(head_w)
        return (jac_lib.unflatten_row(jac_lib.combine(out, stats.flat), stats.jac),
                lin.heads(head_w))
    x_grad, head_grads = lin.backward(out)
    if head_w is not out:
        head_grads = lin.heads(head_w)
    return x_grad, head_grads


def step(lin: Linearised, method: base.Method, state: Any, plan: _jacobian_pass.Plan, *,
         key: jax.Array | None, present: Any, norm_mask: list | None) -> StepResult:
    """One multi-task step (see :func:`jmtl.value_and_mtl_grad`)."""
    name = method.name
    k = lin.losses.shape[0]
    pres = presence(lin, present, name)
    losses_avg = lin.replicas.mean(lin.losses)
    cdt = jac_lib.compute_dtype(lin.losses.dtype)
    loss_vec = jnp.where(pres, losses_avg.astype(cdt), jnp.zeros((), cdt))
    stats = (_jacobian_pass.run(lin, plan, pres, norm_mask) if plan.jacobian
             else _jacobian_pass.Stats())
    flat = _flat_rows(lin, stats) if plan.flat else None
    inputs = _method_call.method_inputs(
        method, k=k, present=pres, losses=loss_vec, key=key, gramian=stats.gram,
        jacobian=flat, grad_norms=stats.norms, scale=stats.scale)
    names = tuple(str(n) for n in tasks_lib.task_names(lin.loss_tree))
    dim = None if lin.replicas.active else lin.dim
    called = _method_call.call(method, inputs, state, dim=dim, names=names)
    grads = lin.finish(*_shared_part(lin, method, plan, stats, called))
    losses_out = (lin.loss_tree if not lin.replicas.active
                  else tasks_lib.unstack(losses_avg, lin.loss_tree))
    weights = (tasks_lib.unstack(called.out, lin.loss_tree)
               if method.output == base.WEIGHTS else None)
    return StepResult(losses=losses_out, grads=grads, state=called.state, weights=weights)
