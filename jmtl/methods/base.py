"""The one protocol every balancing method follows, and the method registry.

A method is a :class:`Method`: a ``NamedTuple`` of pure functions plus static
metadata, built by a factory such as ``jmtl.upgrad()``:

* ``init(num_tasks, dim=None) -> state``: a ``NamedTuple`` of arrays. ``dim`` (the
  number of shared parameters) is needed only by the few methods that keep
  per-parameter state (``moco``, ``excess_mtl``).
* ``update(inputs, state) -> (out, new_state)``: ``inputs`` is an :class:`Inputs`
  holding what the method declared in ``needs``; ``out`` is a ``(K,)`` float32 weight
  vector when ``output == "weights"`` (the update is ``sum_i w_i J_i``) or a ``(d,)``
  float32 direction when ``output == "direction"`` (non-linear aggregators).

  ``update`` may also return ``(Output(out, head_weights), new_state)`` when the
  task-specific parameters must receive ``sum_i c_i ∇L_i`` with weights ``c`` of the
  method's own (Nash-MTL's ``α``, IMTL's loss scales, DB-MTL's ``1/(L_i + ε)``).

``needs`` is a frozenset of :data:`LOSSES`, :data:`GRAMIAN`, :data:`JACOBIAN`,
:data:`GRAD_NORMS` and :data:`KEY`. The engine computes nothing a method does not
declare. ``inputs.present`` (a ``(K,)`` bool mask of tasks labelled in the batch) is
always given. Methods that keep per-parameter state (``moco``, ``excess_mtl``,
``db_mtl``) need ``dim`` in ``init``.

``inputs.gramian`` is the Gramian of the *pre-scaled* rows: ``J Jᵀ / s²`` with
``s = inputs.scale`` a power of two close to the largest row norm (so the division is
exact and a float32 Gramian neither overflows nor underflows for |J| from 1e-20 to
1e20). Methods whose weights are invariant to the scale of ``J`` ignore ``s``; the
others (Nash-MTL, FairGrad, ...) use it. ``scale=None`` means 1.

Each registered method declares the properties it promises (:data:`PROPERTIES`),
which :mod:`jmtl.testing` checks.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

__all__ = [
    "LOSSES",
    "GRAMIAN",
    "JACOBIAN",
    "GRAD_NORMS",
    "KEY",
    "NEEDS",
    "OUTPUTS",
    "PROPERTIES",
    "Output",
    "gram_scale",
    "Inputs",
    "Method",
    "EmptyState",
    "stateless_init",
    "register",
    "names",
    "get",
    "factory",
]

LOSSES = "losses"
GRAMIAN = "gramian"
JACOBIAN = "jacobian"
GRAD_NORMS = "grad_norms"
KEY = "key"
NEEDS = frozenset({LOSSES, GRAMIAN, JACOBIAN, GRAD_NORMS, KEY})

WEIGHTS = "weights"
DIRECTION = "direction"
OUTPUTS = (WEIGHTS, DIRECTION)

# Properties a method may promise (checked by ``jmtl.testing.check_method``).
NON_CONFLICTING = "non_conflicting"
PERMUTATION_EQUIVARIANT = "permutation_equivariant"
SCALE_INVARIANT = "scale_invariant"
LINEAR_UNDER_SCALING = "linear_under_scaling"
JIT_CONSISTENT = "jit_consistent"
FINITE = "finite"
ABSENT_TASKS = "absent_tasks"
STATE_PYTREE = "state_pytree"
PROPERTIES = (NON_CONFLICTING, PERMUTATION_EQUIVARIANT, SCALE_INVARIANT,
              LINEAR_UNDER_SCALING, JIT_CONSISTENT, FINITE, ABSENT_TASKS, STATE_PYTREE)


class Inputs(NamedTuple):
    """What a method's ``update`` sees. Fields it did not declare are ``None``.

    Attributes:
      present: ``(K,)`` bool, tasks with labels in this batch (always given).
      losses: ``(K,)`` float32 per-task losses.
      gramian: ``(K, K)`` float32 Gramian ``J Jᵀ / scale²`` of the shared-parameter
        Jacobian (pre-scaled rows, see the module docstring).
      jacobian: ``(K, d)`` float32 flattened Jacobian of the shared parameters.
      grad_norms: ``(K,)`` float32 norms of each task's gradient on a chosen parameter
        subset (GradNorm's last shared layer; all shared parameters by default).
      key: a PRNG key.
      scale: scalar ``s`` (a power of two) with ``J Jᵀ = s² · gramian``; ``None`` means 1.
        Read it with :func:`gram_scale`.
    """

    present: jax.Array
    losses: jax.Array | None = None
    gramian: jax.Array | None = None
    jacobian: jax.Array | None = None
    grad_norms: jax.Array | None = None
    key: jax.Array | None = None
    scale: jax.Array | None = None


def gram_scale(inputs: Inputs, dtype=None) -> jax.Array:
    """``inputs.scale`` as an array (1 when absent): ``J Jᵀ = scale² · inputs.gramian``."""
    import jax.numpy as jnp

    if dtype is None:
        dtype = jnp.float32 if inputs.gramian is None else jnp.result_type(
            jnp.float32, inputs.gramian.dtype)
    if inputs.scale is None:
        return jnp.ones((), dtype)
    return jnp.asarray(inputs.scale, dtype)


class Output(NamedTuple):
    """What ``update`` returns when the task-specific parameters get weights of their own.

    Attributes:
      out: ``(K,)`` weights or ``(d,)`` direction, as for a plain return.
      head_weights: ``(K,)`` weights ``c``: task-specific parameters receive
        ``sum_i c_i ∇L_i`` (0 for absent tasks).
    """

    out: jax.Array
    head_weights: jax.Array


class EmptyState(NamedTuple):
    """State of a stateless method."""


def stateless_init(num_tasks: int, dim: int | None = None) -> EmptyState:
    """``init`` of every method without state."""
    del num_tasks, dim
    return EmptyState()


class Method(NamedTuple):
    """A balancing method (see the module docstring for the protocol).

    Attributes:
      name: registry name, e.g. ``"upgrad"``.
      init: ``init(num_tasks, dim=None) -> state``.
      update: ``update(inputs, state) -> (weights_or_direction, new_state)``.
      needs: the inputs the method reads, a frozenset of names from :data:`NEEDS`.
      output: ``"weights"`` or ``"direction"``.
      weights_task_specific: whether task-specific parameters receive ``w_i ∇L_i``
        (``True``, loss-weighting methods whose weights define the objective) or their
        own task's unweighted gradient ``∇L_i`` (``False``, gradient aggregators).
      hparams: the hyperparameters as a tuple of ``(name, value)`` pairs (recorded by
        :func:`register` from the factory's bound signature).
      properties: the properties the method promises, names from :data:`PROPERTIES`
        (declared by :func:`register`).

    Raises:
      ValueError: ``needs`` holds a name not in :data:`NEEDS`, ``output`` is not one of
        :data:`OUTPUTS` or ``properties`` a name not in :data:`PROPERTIES`.
    """

    name: str
    init: Callable[..., Any]
    update: Callable[[Inputs, Any], tuple[jax.Array, Any]]
    needs: frozenset
    output: str = WEIGHTS
    weights_task_specific: bool = True
    hparams: tuple = ()
    properties: frozenset = frozenset()

    def __repr__(self) -> str:  # short: the functions are not informative
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams)
        return f"jmtl.{self.name}({hp})"


def _validated(method: Method) -> Method:
    unknown = sorted(set(method.needs) - NEEDS)
    if unknown:
        raise ValueError(f"method '{method.name}': unknown need(s) {unknown}; valid needs are "
                         f"{sorted(NEEDS)}")
    if method.output not in OUTPUTS:
        raise ValueError(f"method '{method.name}': output must be one of {OUTPUTS}, got "
                         f"{method.output!r}")
    bad = sorted(set(method.properties) - set(PROPERTIES))
    if bad:
        raise ValueError(f"method '{method.name}': unknown propert(ies) {bad}; valid ones are "
                         f"{list(PROPERTIES)}")
    return method


def _guarded_init(name: str, init: Callable[..., Any]) -> Callable[..., Any]:
    """``init`` raising a clear TypeError when given parameters instead of a task count.

    A Method is a NamedTuple with ``init``/``update``, so ``optax.chain`` accepts it as a
    transformation; its first call, ``init(params)``, fails here naming the adapter.
    """
    if getattr(init, "_jmtl_guarded", False):
        return init

    @functools.wraps(init)
    def guarded(num_tasks, *args, **kwargs):
        try:
            operator.index(num_tasks)
        except TypeError:
            raise TypeError(
                f"method '{name}': init(num_tasks) takes the number of tasks, got "
                f"{type(num_tasks).__name__}. A jmtl Method is not an optax "
                f"GradientTransformation: inside optax.chain use "
                f"jmtl.as_gradient_transformation(method, num_tasks=K).") from None
        return init(num_tasks, *args, **kwargs)

    guarded._jmtl_guarded = True
    return guarded


def _method_new(cls, name, init, update, needs, output=WEIGHTS, weights_task_specific=True,
                hparams=(), properties=frozenset()):
    init = _guarded_init(name, init)
    self = tuple.__new__(cls, (name, init, update, frozenset(needs), output,
                               weights_task_specific, tuple(hparams), frozenset(properties)))
    return _validated(self)


Method.__new__ = _method_new  # NamedTuple's own __new__ cannot be overridden in the body

_REGISTRY: dict[str, Callable[..., Method]] = {}
_PROPERTIES: dict[str, frozenset] = {}


def register(name: str, *, properties: tuple[str, ...] | frozenset = ()
             ) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator registering a method factory under ``name``.

    The factory's bound arguments (defaults applied) become the method's ``hparams``, and
    ``properties`` its declared properties. Continuous hyperparameters (arguments whose
    default is a float) accept a number, a numeric array or an optax schedule; see
    :mod:`jmtl.methods._schedule` (schedules are evaluated at the method's step count).

    Args:
      name: the registry name.
      properties: the properties every method built by the factory promises, names from
        :data:`PROPERTIES`.

    Examples:
      >>> @register("my_method_doctest", properties=("finite",))
      ... def my_method(alpha: float = 1.0):
      ...     return Method(name="my_method_doctest", init=stateless_init,
      ...                   update=lambda inputs, state: (inputs.present * 1.0, state),
      ...                   needs=frozenset())
      >>> my_method().hparams, sorted(my_method().properties)
      ((('alpha', 1.0),), ['finite'])
    """
    bad = sorted(set(properties) - set(PROPERTIES))
    if bad:
        raise ValueError(f"register('{name}'): unknown propert(ies) {bad}; valid ones are "
                         f"{list(PROPERTIES)}")

    def deco(fn: Callable[..., Method]) -> Callable[..., Method]:
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' is already registered")
        signature = inspect.signature(fn)
        cache: dict[tuple, Method] = {}

        def make(bound: inspect.BoundArguments) -> Method:
            from jmtl.methods import _schedule  # noqa: PLC0415 (it imports this module)

            schedules = _schedule.check_hparams(name, signature, bound)
            if schedules:  # continuous hyperparameters given as schedules of the step count
                method = _schedule.scheduled(name, fn, signature, bound, schedules)
            else:
                method = fn(*bound.args, **bound.kwargs)
            if isinstance(method, Method):
                method = method._replace(hparams=tuple(bound.arguments.items()),
                                         properties=frozenset(properties))
            return method

        @functools.wraps(fn)
        def build(*args: Any, **kwargs: Any) -> Method:
            # Equal hyperparameters give the very same Method object, so
            # ``jmtl.methods.get(name, **hp) is jmtl.<name>(**hp)`` and jit caches keyed
            # on the method hit. Unhashable hyperparameters (arrays) skip the cache.
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            key = tuple(sorted(bound.arguments.items()))
            try:
                hash(key)
            except TypeError:
                return make(bound)
            if key not in cache:
                cache[key] = make(bound)
            return cache[key]

        build.method_name = name
        build.properties = frozenset(properties)
        _REGISTRY[name] = build
        _PROPERTIES[name] = frozenset(properties)
        return build

    return deco


def names() -> tuple[str, ...]:
    """Every registered method name, sorted.

    Examples:
      >>> import jmtl
      >>> "upgrad" in jmtl.methods.names()
      True
    """
    return tuple(sorted(n for n in _REGISTRY if not n.endswith("_doctest")))


def factory(name: str) -> Callable[..., Method]:
    """The factory registered under ``name`` (``ValueError`` listing valid names if none)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'; valid methods are: {', '.join(names())}")
    return _REGISTRY[name]


def get(name: str, **hparams: Any) -> Method:
    """Builds the registered method ``name`` with the given hyperparameters.

    Args:
      name: a name from :func:`names`.
      **hparams: the factory's keyword arguments.

    Returns:
      The same :class:`Method` that the factory ``jmtl.<name>(**hparams)`` returns.

    Raises:
      ValueError: unknown method name (the message lists the valid ones).
      TypeError: unknown hyperparameter (the message names it and the valid ones).

    Examples:
      >>> import jmtl
      >>> jmtl.methods.get("cagrad", c=0.4).name
      'cagrad'
    """
    fn = factory(name)
    params = inspect.signature(fn).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not has_var_kw:
        unknown = sorted(set(hparams) - set(params))
        if unknown:
            raise TypeError(
                f"method '{name}' has no hyperparameter(s) {unknown}; "
                f"valid ones are {sorted(params)}"
            )
    return fn(**hparams)
