"""Hyperparameter schedules and learnable parameters trained by optax, for method factories.

Two pieces of machinery shared by the method factories:

* **Schedules.** Every continuous hyperparameter (a factory argument whose default is a
  ``float``) accepts a number, a scalar jax/numpy array or an optax schedule (a callable
  of the method's step count). :func:`jmtl.methods.base.register` calls
  :func:`check_hparams` on every factory call and, when some argument is a schedule,
  builds the method through :func:`scheduled`: the returned method's state is
  :class:`ScheduledState` ``(inner, count)`` and its ``update`` evaluates the schedules at
  ``count`` and calls the factory with the (traced) values inside the trace. Factories
  must therefore be trace-safe: no Python ``if`` on a continuous hyperparameter (checks of
  concrete values only, see :func:`check_value`).
* **Learnable parameters.** :func:`optimizer_or_default` validates an optax optimizer and
  :func:`masked_step` takes one step of it on per-task parameters, leaving the parameters
  and the per-task optimizer statistics of absent tasks unchanged.

Examples:
  >>> import jax, jax.numpy as jnp, optax, jmtl
  >>> m = jmtl.gradnorm(alpha=optax.linear_schedule(0.0, 1.5, 100))
  >>> state = m.init(2)  # ScheduledState(inner=GradNormState(...), count=0)
  >>> step = jax.jit(m.update)  # traced once: α is evaluated at state.count in the graph
  >>> inputs = jmtl.methods.Inputs(jnp.array([True, True]), jnp.ones(2),
  ...                              grad_norms=jnp.array([1.0, 2.0]))
  >>> for _ in range(3):
  ...     w, state = step(inputs, state)
  >>> int(state.count)
  3
  >>> jmtl.gradnorm(alpha="1.5")
  Traceback (most recent call last):
  ...
  TypeError: method 'gradnorm': hyperparameter `alpha` must be a number, ... got str '1.5'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["ScheduledState", "is_schedule", "check_hparams", "scheduled", "check_value",
           "optimizer_or_default", "masked_step", "irprop", "IRpropState"]


class ScheduledState(NamedTuple):
    """State of a method built with a scheduled hyperparameter.

    Attributes:
      inner: the state of the method built with the hyperparameters' current values.
      count: int32 number of updates so far (the argument of the schedules).
    """

    inner: Any
    count: jax.Array


def _continuous(param: inspect.Parameter) -> bool:
    """A continuous hyperparameter: its default is a float (not a bool)."""
    return type(param.default) is float


def is_schedule(value: Any) -> bool:
    """Whether ``value`` is a schedule (a callable of the step count, e.g. an optax schedule)."""
    return callable(value) and not isinstance(value, (type, optax.GradientTransformation))


def _real_number(value: Any) -> bool:
    """A real number or a real numeric array (per-task hyperparameters are pytrees of them)."""
    if isinstance(value, (bool, np.bool_, str, bytes, complex)) or value is None:
        return False
    if isinstance(value, (int, float, np.number)):
        return not isinstance(value, np.complexfloating)
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def check_hparams(name: str, signature: inspect.Signature,
                  bound: inspect.BoundArguments) -> dict[str, Callable]:
    """Checks the continuous hyperparameters' types; returns the scheduled ones.

    Raises:
      TypeError: a continuous hyperparameter is not a number, a numeric array or a
        schedule (naming the method and the hyperparameter).
    """
    schedules = {}
    for key, value in bound.arguments.items():
        param = signature.parameters.get(key)
        if param is None or not _continuous(param):
            continue
        if is_schedule(value):
            schedules[key] = value
            continue
        leaves = jax.tree_util.tree_leaves(value)
        ok = bool(leaves) and all(_real_number(leaf) for leaf in leaves)
        if not ok:
            raise TypeError(
                f"method '{name}': hyperparameter `{key}` must be a number, a numeric jax "
                f"array or an optax schedule (a callable of the step count), got "
                f"{type(value).__name__} {value!r}")
    return schedules


def scheduled(name: str, fn: Callable, signature: inspect.Signature,
              bound: inspect.BoundArguments, schedules: dict[str, Callable]):
    """The method ``fn(**bound)`` whose ``schedules`` are evaluated at its step count.

    The factory is called once at build time with the schedules' values at step 0 (this
    validates them and gives ``init``, ``needs`` and ``output``) and once per traced
    ``update`` with the values at the state's count.
    """
    from jmtl.methods import base  # noqa: PLC0415 (base imports this module lazily)

    def build_at(count) -> base.Method:
        args = dict(bound.arguments)
        for key, sched in schedules.items():
            args[key] = jnp.asarray(sched(count))
        b = signature.bind_partial()
        b.arguments.update(args)
        return fn(*b.args, **b.kwargs)

    first = build_at(jnp.zeros((), jnp.int32))
    if not isinstance(first, base.Method):
        return first

    def init(num_tasks: int, dim: int | None = None) -> ScheduledState:
        return ScheduledState(inner=first.init(num_tasks, dim),
                              count=jnp.zeros((), jnp.int32))

    def update(inputs, state: ScheduledState):
        if not isinstance(state, ScheduledState):
            raise ValueError(
                f"method '{name}' has scheduled hyperparameter(s) {sorted(schedules)}: its state "
                f"is a ScheduledState from its own init, got {type(state).__name__}")
        method = build_at(state.count)
        out, inner = method.update(inputs, state.inner)
        return out, ScheduledState(inner=inner, count=state.count + 1)

    return base.Method(name=first.name, init=init, update=update, needs=first.needs,
                       output=first.output, weights_task_specific=first.weights_task_specific)


def check_value(name: str, key: str, value: Any, ok: Callable[[Any], Any], what: str) -> None:
    """Raises ``ValueError`` when a concrete ``value`` fails ``ok``; traced values pass."""
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value, dtype=float)
    if not np.all(ok(arr)):
        raise ValueError(f"method '{name}': {key} must be {what}, got {value!r}")


def optimizer_or_default(name: str, optimizer: Any, default: Callable[[], Any]
                         ) -> optax.GradientTransformation:
    """``optimizer`` if it is an optax transformation, ``default()`` if ``None``."""
    if optimizer is None:
        return default()
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")
            and callable(optimizer.init) and callable(optimizer.update)):
        raise TypeError(f"method '{name}': `optimizer` must be an optax GradientTransformation "
                        f"(e.g. optax.adam(1e-2)), got {type(optimizer).__name__}")
    return optimizer


def masked_step(optimizer: optax.GradientTransformation, params: jax.Array, grads: jax.Array,
                opt_state: Any, present: jax.Array) -> tuple[jax.Array, Any]:
    """One optimizer step on ``(K,)`` parameters; absent tasks keep params and statistics.

    Per-task leaves of the optimizer state (shape ``(K,)``: Adam's moments, ...) keep their
    old values for absent tasks; other leaves (step counters) advance when at least one
    task is present. A step without any present task changes nothing.
    """
    grads = jnp.where(present, grads, 0.0).astype(params.dtype)
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = jnp.where(present, optax.apply_updates(params, updates), params)
    shape = present.shape

    anyp = jnp.any(present)

    def keep(new, old):
        if hasattr(new, "shape") and new.shape == shape and new.ndim == 1:
            return jnp.where(present, new, old).astype(old.dtype)
        return jnp.where(anyp, new, old).astype(old.dtype)

    new_opt = jax.tree_util.tree_map(keep, new_opt, opt_state)
    return new_params.astype(params.dtype), new_opt


class IRpropState(NamedTuple):
    """State of :func:`irprop`: per-entry step sizes and the previous (masked) gradient."""

    step_sizes: Any
    prev_grads: Any


def irprop(learning_rate: Any, eta_minus: float = 0.5, eta_plus: float = 1.2,
           min_step: float = 1e-6, max_step: float = 1.0) -> optax.GradientTransformation:
    """iRprop⁻ (Igel & Hüsken, 2000): sign-based steps that adapt per entry.

    Each entry moves by ``-step * sign(g)``; its step grows by ``eta_plus`` while the
    gradient keeps its sign and shrinks by ``eta_minus`` when it flips (and that entry then
    skips one move). Suited to objectives whose gradient magnitude carries no information,
    such as GradNorm's L1 loss. (optax's ``rprop`` applies each step one call late.)

    Args:
      learning_rate: the initial step size (a number or scalar array).
      eta_minus: step factor on a sign flip.
      eta_plus: step factor while the sign holds.
      min_step: smallest step size.
      max_step: largest step size.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning:
      The RPROP Algorithm", ICNN 1993. Igel & Hüsken, "Improving the Rprop Learning
      Algorithm", NC 2000.
    """

    def init_fn(params):
        return IRpropState(
            step_sizes=jax.tree_util.tree_map(
                lambda p: jnp.full(jnp.shape(p), learning_rate, jnp.result_type(p)), params),
            prev_grads=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params

        def one(g, prev, step):
            prod = jnp.sign(g) * jnp.sign(prev)  # not g * prev: that underflows at 1e-20
            step = jnp.where(prod > 0, jnp.minimum(step * eta_plus, max_step),
                             jnp.where(prod < 0, jnp.maximum(step * eta_minus, min_step), step))
            g = jnp.where(prod < 0, 0.0, g)
            return -step * jnp.sign(g), g, step

        out = jax.tree_util.tree_map(one, updates, state.prev_grads, state.step_sizes)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        triples = treedef.flatten_up_to(out)
        new_updates = treedef.unflatten([t[0] for t in triples])
        prev = treedef.unflatten([t[1] for t in triples])
        steps = treedef.unflatten([t[2] for t in triples])
        del leaves
        return new_updates, IRpropState(step_sizes=steps, prev_grads=prev)

    return optax.GradientTransformation(init_fn, update_fn)
