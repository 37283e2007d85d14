"""Calling a method: the one place where its inputs are packed, checked and guarded.

Both :func:`jmtl.aggregate` and the engine's driver call a method through :func:`call`,
which

* packs what the method declared in ``needs`` into :class:`~jmtl.methods.base.Inputs`;
* checks the state against ``method.init`` (type, structure, shapes: a ``ValueError``
  naming the method, the expected and the given state, at trace time);
* checks that the present tasks' inputs (losses, Gramian, Jacobian, gradient norms) are
  finite: a ``ValueError`` naming the tasks when the values are concrete, a runtime
  check under :func:`jmtl.checked` when traced;
* guards the state like ``optax.apply_if_finite``: a step whose inputs are not finite
  returns the old state (counting the skipped step in ``state.skipped`` when the state
  has that field), so one bad batch never poisons later steps;
* normalises the output (plain weights, a direction, or :class:`~jmtl.methods.base.Output`
  with the heads' own weights).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl import jacobian as jac_lib
from jmtl import tasks as tasks_lib
from jmtl.methods import base

__all__ = ["Called", "method_inputs", "apply_output", "check_state", "call"]


class Called(NamedTuple):
    """What one call of a method produced.

    Attributes:
      out: ``(K,)`` weights or ``(d,)`` direction.
      head_weights: ``(K,)`` weights of the task-specific parameters' gradients.
      state: the new (guarded) state.
      finite: scalar bool, whether the inputs were finite (else the state is the old one).
    """

    out: jax.Array
    head_weights: jax.Array
    state: Any
    finite: jax.Array


def method_inputs(method: base.Method, *, k: int, present: Any = None, losses: Any = None,
                  key: jax.Array | None = None, gramian: jax.Array | None = None,
                  jacobian: jax.Array | None = None, grad_norms: jax.Array | None = None,
                  scale: jax.Array | None = None) -> base.Inputs:
    """Validates what ``method`` needs and packs it into :class:`~jmtl.methods.base.Inputs`.

    Raises:
      ValueError: a required argument is missing (naming the method and the argument),
        or a per-task argument has the wrong number of tasks.
    """
    needs = method.needs
    if base.LOSSES in needs and losses is None:
        raise ValueError(f"method '{method.name}' needs `losses` (per-task loss values)")
    if base.KEY in needs and key is None:
        raise ValueError(f"method '{method.name}' needs `key` (a PRNG key) for its randomness")
    if present is None:
        mask = jnp.ones((k,), bool)
    else:
        mask = tasks_lib.as_task_vector(present, k, what="present", method=method.name,
                                        dtype=bool)
    loss_vec = None
    if base.LOSSES in needs:
        loss_vec = tasks_lib.as_task_vector(losses, k, what="losses", method=method.name)
    return base.Inputs(
        present=mask,
        losses=loss_vec,
        gramian=gramian if base.GRAMIAN in needs else None,
        jacobian=jacobian if base.JACOBIAN in needs else None,
        grad_norms=grad_norms if base.GRAD_NORMS in needs else None,
        key=key if base.KEY in needs else None,
        scale=scale if base.GRAMIAN in needs else None,
    )


def apply_output(method: base.Method, out: jax.Array, jacobian: Any) -> Any:
    """Turns a method's output (weights or direction) into an update like one row."""
    if method.output == base.WEIGHTS:
        return jac_lib.combine(out, jacobian)
    return jac_lib.unflatten_row(out, jacobian)


def _describe(state: Any) -> str:
    leaves = jax.tree_util.tree_leaves(state)
    shapes = [tuple(np.shape(x)) for x in leaves]
    return f"{type(state).__name__} with leaf shapes {shapes}"


def check_state(method: base.Method, state: Any, num_tasks: int, dim: int | None) -> None:
    """Raises ``ValueError`` when ``state`` is not a state of ``method`` for ``num_tasks``.

    Compares the type, pytree structure and leaf shapes with ``method.init(num_tasks,
    dim)`` (evaluated abstractly), so a state built for another method or another number
    of tasks is caught at trace time.
    """
    try:
        expected = jax.eval_shape(lambda: method.init(num_tasks, dim=dim))
    except Exception:  # noqa: BLE001 - a method whose init needs dim we do not have
        return
    exp_def = jax.tree_util.tree_structure(expected)
    got_def = jax.tree_util.tree_structure(state)
    # A stateless method takes any empty state (``()``, ``None``, ``EmptyState()``).
    same = exp_def == got_def or (exp_def.num_leaves == 0 and got_def.num_leaves == 0)
    if same:
        same = all(np.shape(a) == np.shape(b) for a, b in zip(
            jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(state),
            strict=True))
    if not same:
        raise ValueError(
            f"method '{method.name}': the state does not belong to this method and "
            f"{num_tasks} tasks: expected {_describe(expected)} (from "
            f"{method.name}.init({num_tasks})), got {_describe(state)}")


def _finite_rows(values: jax.Array, present: jax.Array) -> jax.Array:
    """``(K,)`` bool, whether each present task's entries are finite (absent: True)."""
    k = present.shape[0]
    flat = jnp.reshape(values, (k, -1)) if values.ndim else jnp.reshape(values, (1, 1))
    return jnp.all(jnp.isfinite(flat), axis=1) | ~present


def _check_finite(inputs: base.Inputs, method: str,
                  names: tuple[str, ...] | None) -> jax.Array:
    """Scalar bool: every present task's inputs are finite (raises when concrete and not)."""
    ok = jnp.ones((), bool)
    present = inputs.present
    for what, value in (("losses", inputs.losses), ("Gramian", inputs.gramian),
                        ("Jacobian", inputs.jacobian), ("gradient norms", inputs.grad_norms)):
        if value is None:
            continue
        rows = _finite_rows(value, present)
        if what == "Gramian":
            rows = rows & _finite_rows(value.T, present)
        if _checks.is_concrete(rows) and _checks.is_concrete(present):
            bad = np.flatnonzero(~np.asarray(rows))
            if bad.size:
                shown = [names[i] if names else f"task {i}" for i in bad]
                raise ValueError(f"method '{method}': non-finite {what} for task(s) {shown}")
        else:
            _checks.runtime_check(jnp.all(rows), f"method '{method}': non-finite {what}")
        ok = ok & jnp.all(rows)
    return ok


def _guard(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old`` with its ``skipped`` counter incremented."""
    kept = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b.astype(a.dtype)), new, old)
    return _count_skipped(kept, old, ok)


def _count_skipped(kept: Any, old: Any, ok: jax.Array) -> Any:
    fields = getattr(kept, "_fields", ())
    if "skipped" in fields:
        inc = jnp.where(ok, 0, 1).astype(jnp.result_type(old.skipped))
        return kept._replace(skipped=old.skipped + inc)
    if "inner" in fields:  # a wrapper state (schedules)
        return kept._replace(inner=_count_skipped(kept.inner, old.inner, ok))
    return kept


def call(method: base.Method, inputs: base.Inputs, state: Any, *, dim: int | None = None,
         names: tuple[str, ...] | None = None) -> Called:
    """One guarded call of ``method.update`` (see the module docstring).

    Args:
      method: the method.
      inputs: from :func:`method_inputs`.
      state: the method's state.
      dim: the number of shared entries ``d`` (for the state check of per-parameter
        states).
      names: task names, for error messages.

    Returns:
      A :class:`Called`.
    """
    k = inputs.present.shape[0]
    check_state(method, state, k, dim)
    ok = _check_finite(inputs, method.name, names)
    out, new_state = method.update(inputs, state)
    if isinstance(out, base.Output):
        out, head = out.out, jnp.where(inputs.present, out.head_weights, 0.0)
    elif method.output == base.WEIGHTS and method.weights_task_specific:
        head = out
    else:
        head = inputs.present.astype(jnp.float32)
    return Called(out=out, head_weights=head, state=_guard(ok, new_state, state), finite=ok)
