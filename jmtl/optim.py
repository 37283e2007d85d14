"""Per-partition optimizers: label trees for ``optax.partition``, per-label rates, budgets.

Multi-task models usually want different optimizer settings for different parts: a
shared trunk with Adam at ``1e-3``, one head at ``1e-2``, another at ``3e-3``, a head
that stops training after 1,000 steps. optax does the work (``optax.partition``,
``optax.transforms.conditionally_mask``); this module builds its inputs from
parameter *paths*:

* :func:`label_tree` maps every parameter of a Linen params dict, an NNX
  ``nnx.State`` (``nnx.state(model, nnx.Param)``) or an NNX module to a label by
  user rules and returns the label tree itself (a pytree, not a callable), so it can
  be checked once, printed, and reused.
* :func:`partitioned` builds the partitioned optimizer from ``{label: transform}``;
  :func:`partitioned_lr` from one optimizer family and per-label learning rates (or
  schedules).
* :func:`freeze_after` gives a transform a step budget: after ``N`` updates its
  updates are exactly zero and its state stops changing.

A parameter's path is its keys joined by ``"/"``, e.g. ``"heads/depth/kernel"`` (NNX
variables contribute no ``value`` component). :func:`param_paths` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jmtl import _paths

__all__ = [
    "param_paths",
    "label_tree",
    "freeze_after",
    "partitioned",
    "partitioned_lr",
]

Rule = _paths.Rule


# ----------------------------------------------------------------------------- paths

def _as_tree(params: Any, wrt: Any) -> Any:
    """An NNX module becomes ``nnx.state(module, wrt)``; anything else is returned as is."""
    try:
        from flax import nnx
    except ImportError:
        return params
    if isinstance(params, nnx.Module):
        return nnx.state(params, nnx.Param if wrt is None else wrt)
    return params


def _flatten(tree: Any) -> tuple[list[tuple[str, Any]], Callable[[list[Any]], Any]]:
    """``[(path, leaf)]`` with NNX variables as leaves, and a function rebuilding the tree.

    The rebuilt tree has the variables replaced by plain leaves, i.e. the structure of
    ``nnx.as_pure(state)``: a prefix of the variable-state that ``nnx.Optimizer`` gives
    ``tx.init`` and equal to the pure state it gives ``tx.update``.
    """
    var_type = _paths.nnx_variable_type()
    is_leaf = None if var_type is None else (lambda x: isinstance(x, var_type))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    items = []
    for path, leaf in with_path:
        if var_type is not None and isinstance(leaf, var_type):
            leaf = _paths.variable_value(leaf)
        items.append((_paths.path_of(path), leaf))
    return items, lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)


def param_paths(params: Any, *, wrt: Any = None) -> tuple[str, ...]:
    """The ``"/"``-joined path of every parameter, in pytree order.

    Args:
      params: a Linen params dict (``variables["params"]``), an NNX ``nnx.State`` or an
        NNX module (whose ``wrt`` state is taken), or any pytree of arrays.
      wrt: for an NNX module, the variable filter (default ``nnx.Param``).

    Returns:
      A tuple of path strings, the names that :func:`label_tree` rules match against.

    Examples:
      >>> import jax.numpy as jnp
      >>> param_paths({"trunk": {"w": jnp.ones(2)}, "heads": [jnp.ones(1), jnp.ones(1)]})
      ('heads/0', 'heads/1', 'trunk/w')
    """
    return tuple(p for p, _ in _flatten(_as_tree(params, wrt))[0])


# ----------------------------------------------------------------------------- labels

def _rule_pairs(rules: Mapping[Any, Hashable] | Sequence[tuple[Any, Hashable]]):
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"label_tree: rules must be (pattern, label) pairs, got {pair!r}")
    return pairs


def label_tree(params: Any, rules: Mapping[Any, Hashable] | Sequence[tuple[Any, Hashable]], *,
               default: Hashable | None = None, wrt: Any = None) -> Any:
    """A precomputed label pytree for ``optax.partition`` from rules on parameter paths.

    Each parameter gets the label of the first rule that matches its path (see
    :func:`param_paths`). A rule is

    * a string without glob characters: a path prefix on whole components
      (``"heads/seg"`` matches ``"heads/seg/kernel"`` but not ``"heads/segment/kernel"``);
    * a string with ``*``, ``?`` or ``[``: an :mod:`fnmatch` glob on the whole path
      (``*`` also matches ``"/"``), e.g. ``"*/bias"``;
    * a callable ``(path, leaf) -> bool``.

    Args:
      params: a Linen params dict (``variables["params"]``), an NNX ``nnx.State``
        (``nnx.state(model, nnx.Param)``), an NNX module, or any pytree of arrays.
      rules: ``{pattern: label}`` or a sequence of ``(pattern, label)`` pairs, tried in
        order.
      default: the label of parameters no rule matches; if ``None`` (the default), an
        unmatched parameter is an error.
      wrt: for an NNX module, the variable filter (default ``nnx.Param``).

    Returns:
      A pytree with the structure of ``params`` (for NNX: of ``nnx.as_pure(state)``,
      which ``optax.partition`` accepts for both the variable state and the pure state
      that ``nnx.Optimizer`` passes) whose leaves are labels.

    Raises:
      ValueError: a parameter matches no rule and there is no ``default`` (the message
        names the parameter paths).

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"trunk": {"w": jnp.ones(2)}, "heads": {"a": jnp.ones(1), "b": jnp.ones(1)}}
      >>> label_tree(params, {"trunk": "trunk", "heads/a": "a", "heads/*": "other"})
      {'heads': {'a': 'a', 'b': 'other'}, 'trunk': {'w': 'trunk'}}
    """
    pairs = _rule_pairs(rules)
    items, rebuild = _flatten(_as_tree(params, wrt))
    labels, unmatched = [], []
    for path, leaf in items:
        label = next((lab for rule, lab in pairs
                      if _paths.matches(rule, path, leaf, caller="label_tree")), default)
        if label is None:
            unmatched.append(path)
        labels.append(label)
    if unmatched:
        shown = ", ".join(repr(p) for p in unmatched[:10])
        more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
        raise ValueError(
            f"label_tree: parameter(s) {shown}{more} match no rule and no `default` label was "
            f"given; rules are {[r for r, _ in pairs]!r}"
        )
    return rebuild(labels)


def _labels_with_paths(labels: Any) -> list[tuple[str, Hashable]]:
    return _flatten(labels)[0]


# ----------------------------------------------------------------------------- budgets

def freeze_after(transform: optax.GradientTransformation,
                 num_steps: int) -> optax.GradientTransformationExtraArgs:
    """Gives ``transform`` a step budget: after ``num_steps`` updates it outputs zeros.

    The first ``num_steps`` calls to ``update`` run ``transform``; every later call
    returns exactly zero updates and leaves ``transform``'s state unchanged (so
    ``optax.apply_updates`` leaves the parameters bit-identical). Built on
    ``optax.transforms.conditionally_mask``; jittable, the state is a pytree.

    Args:
      transform: any optax transformation.
      num_steps: the number of updates to apply (``0`` freezes at once).

    Returns:
      An optax transformation.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = freeze_after(optax.sgd(1.0), 1)
      >>> g = jnp.ones(2)
      >>> state = tx.init(g)
      >>> u1, state = tx.update(g, state)
      >>> u2, state = tx.update(g, state)
      >>> u1.tolist(), u2.tolist()
      ([-1.0, -1.0], [0.0, 0.0])
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 0:
        raise ValueError(f"freeze_after: num_steps must be an integer >= 0, got {num_steps!r}")
    budget = min(num_steps, jnp.iinfo(jnp.int32).max)
    return optax.transforms.conditionally_mask(transform, lambda step: step < budget)


# ----------------------------------------------------------------------------- partition

def partitioned(transforms: Mapping[Hashable, optax.GradientTransformation], labels: Any, *,
                budgets: Mapping[Hashable, int] | None = None) -> optax.GradientTransformation:
    """``optax.partition`` over a label tree, checked, with optional per-label budgets.

    Args:
      transforms: ``{label: transform}``; use ``optax.set_to_zero()`` for a frozen part.
      labels: a label tree from :func:`label_tree` (any pytree of labels shaped like the
        parameters, or a prefix of them).
      budgets: optional ``{label: num_steps}``: that partition stops updating after
        ``num_steps`` updates (see :func:`freeze_after`).

    Returns:
      An optax transformation whose state is a pytree.

    Raises:
      ValueError: a label in ``labels`` has no transform (the message names the
        parameter paths that carry it), or ``budgets`` names an unknown label.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"trunk": jnp.ones(2), "head": jnp.ones(1)}
      >>> labels = label_tree(params, {"trunk": "trunk", "head": "head"})
      >>> tx = partitioned({"trunk": optax.sgd(0.1), "head": optax.sgd(1.0)}, labels)
      >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
      >>> updates["trunk"].tolist(), updates["head"].tolist()
      ([-0.10000000149011612, -0.10000000149011612], [-1.0])
    """
    transforms = dict(transforms)
    missing: dict[Hashable, list[str]] = {}
    for path, label in _labels_with_paths(labels):
        if label not in transforms:
            missing.setdefault(label, []).append(path)
    if missing:
        parts = [f"label {lab!r} (parameter(s) {', '.join(repr(p) for p in paths[:10])}"
                 + (f" and {len(paths) - 10} more)" if len(paths) > 10 else ")")
                 for lab, paths in missing.items()]
        raise ValueError(f"partitioned: no transform for {'; '.join(parts)}; transforms are "
                         f"given for labels {sorted(map(repr, transforms))}")
    if budgets:
        unknown = [lab for lab in budgets if lab not in transforms]
        if unknown:
            raise ValueError(f"partitioned: budgets name unknown label(s) {unknown!r}; labels "
                             f"are {sorted(map(repr, transforms))}")
        for lab, n in budgets.items():
            transforms[lab] = freeze_after(transforms[lab], n)
    return optax.partition(transforms, labels)


def partitioned_lr(optimizer: Callable[..., optax.GradientTransformation],
                   learning_rates: Mapping[Hashable, float | optax.Schedule], labels: Any, *,
                   budgets: Mapping[Hashable, int] | None = None,
                   **kwargs: Any) -> optax.GradientTransformation:
    """One optimizer family with a learning rate (or schedule) per label.

    Args:
      optimizer: an optax optimizer factory taking ``learning_rate``, e.g. ``optax.adam``.
      learning_rates: ``{label: learning_rate}``; a value may be an optax schedule
        (``step -> rate``), which then counts that partition's own updates.
      labels: a label tree from :func:`label_tree`.
      budgets: optional ``{label: num_steps}`` step budgets (see :func:`freeze_after`).
      **kwargs: further arguments of ``optimizer`` shared by every partition
        (e.g. ``b1=0.9``).

    Returns:
      ``partitioned({label: optimizer(learning_rate=lr, **kwargs)}, labels, budgets=...)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"trunk": jnp.ones(2), "head": jnp.ones(1)}
      >>> labels = label_tree(params, {"trunk": "trunk", "head": "head"})
      >>> tx = partitioned_lr(optax.sgd, {"trunk": 0.5, "head": 2.0}, labels)
      >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
      >>> updates["trunk"].tolist(), updates["head"].tolist()
      ([-0.5, -0.5], [-2.0])
    """
    transforms = {lab: optimizer(learning_rate=lr, **kwargs)
                  for lab, lr in learning_rates.items()}
    return partitioned(transforms, labels, budgets=budgets)
