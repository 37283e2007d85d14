"""The one parameter-path grammar of jmtl (engine, :mod:`jmtl.optim`, :mod:`jmtl.train`).

A parameter's *path* is its keys joined by ``"/"``, e.g. ``"trunk/layers/0/kernel"``;
Flax NNX variables contribute no ``value`` component, so ``nnx.split(model, nnx.Param)``
gives the same paths as a Linen params dict.

A *selection* (``shared``, ``norm_params``) says, for each parameter, yes or no. It is

* a bool (every parameter);
* a *rule* or a non-empty list of rules: a string without glob characters is a path
  prefix on whole components (``"heads/seg"`` matches ``"heads/seg/kernel"``, not
  ``"heads/segment/kernel"``); a string with ``*``, ``?`` or ``[`` is an :mod:`fnmatch`
  glob on the whole path; a callable ``(path: str, leaf) -> bool``. A rule that matches
  no parameter is an error;
* a boolean prefix pytree of the parameters, ``{"trunk": True, "heads": False}``: first
  as a JAX pytree prefix, else as nested dicts/lists matched by key names (so a plain
  dict works for an ``nnx.State`` or a ``FrozenDict``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["Rule", "nnx_variable_type", "variable_value", "leaf_items", "path_of",
           "matches", "is_rules", "selection"]

Rule = str | Callable[[str, Any], bool]

_GLOB_CHARS = frozenset("*?[")


def nnx_variable_type():
    """``flax.nnx.Variable``, or ``None`` when flax is not installed."""
    try:
        from flax import nnx
    except ImportError:  # flax is optional
        return None
    return nnx.Variable


def variable_value(var: Any) -> Any:
    """The value held by an NNX variable."""
    return var.get_value() if hasattr(var, "get_value") else var.value


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_of(key_path) -> str:
    """A JAX key path as a ``"/"``-joined string."""
    return "/".join(_key_str(k) for k in key_path)


def leaf_items(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` for every array leaf of ``tree``, in pytree order.

    An NNX variable is one leaf (its value when ``unwrap_variables``) whatever its
    internal pytree structure, and adds no ``value`` component to the path.

    Examples:
      >>> import jax.numpy as jnp
      >>> [p for p, _ in leaf_items({"trunk": {"w": jnp.ones(2)}, "heads": [jnp.ones(1)]})]
      ['heads/0', 'trunk/w']
    """
    var_type = nnx_variable_type()
    is_var = None if var_type is None else (lambda x: isinstance(x, var_type))
    out = []
    for key_path, item in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]:
        if is_var is not None and is_var(item):
            for sub, leaf in jax.tree_util.tree_flatten_with_path(item)[0]:
                if sub and getattr(sub[0], "name", None) == "value":
                    sub = sub[1:]
                out.append((path_of(tuple(key_path) + tuple(sub)), leaf))
        else:
            out.append((path_of(key_path), item))
    return out


def matches(rule: Rule, path: str, leaf: Any, *, caller: str = "jmtl") -> bool:
    """Whether one rule selects the parameter at ``path``.

    Raises:
      TypeError: the rule is neither a string nor a callable, or a callable returned
        something other than a bool.
    """
    if callable(rule):
        flag = rule(path, leaf)
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{caller}: the rule {rule!r} returned {flag!r} for parameter "
                            f"{path!r}; it must return a Python bool")
        return bool(flag)
    if not isinstance(rule, str):
        raise TypeError(f"{caller}: a rule must be a string or a callable (path: str, leaf) "
                        f"-> bool, got {rule!r}")
    if _GLOB_CHARS & set(rule):
        return fnmatch.fnmatchcase(path, rule)
    prefix = rule.strip("/")
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def is_rules(spec: Any) -> bool:
    """A rule (string or callable) or a non-empty list/tuple of them."""
    if isinstance(spec, str) or (callable(spec) and not isinstance(spec, bool)):
        return True
    return (isinstance(spec, (list, tuple)) and len(spec) > 0
            and all(isinstance(s, str) or callable(s) for s in spec))


def _rules_selection(spec: Any, items: list[tuple[str, Any]], *, what: str,
                     caller: str) -> list[bool]:
    rules = [spec] if isinstance(spec, str) or callable(spec) else list(spec)
    hits = [[matches(r, path, leaf, caller=caller) for r in rules] for path, leaf in items]
    unused = [r for j, r in enumerate(rules) if not any(h[j] for h in hits)]
    if unused:
        shown = [p for p, _ in items][:20]
        raise ValueError(
            f"{caller}: `{what}` rule(s) {unused!r} match no parameter; the parameter paths "
            f"are {shown!r}{' ...' if len(items) > 20 else ''}")
    return [any(h) for h in hits]


def _walkable(spec: Any) -> bool:
    """Whether ``spec`` is made of bools, Mappings, lists/tuples (and NNX variables)."""
    var_type = nnx_variable_type()
    if isinstance(spec, (bool, np.bool_)):
        return True
    if var_type is not None and isinstance(spec, var_type):
        return _walkable(variable_value(spec))
    if isinstance(spec, Mapping):
        return all(_walkable(v) for v in spec.values())
    if isinstance(spec, (list, tuple)):
        return all(_walkable(v) for v in spec)
    return False


def _name_selection(spec: Any, paths: list[str], *, what: str, caller: str) -> list[bool]:
    """Looks up each parameter's path components, by name, in a nested-dict prefix."""
    var_type = nnx_variable_type()
    used: set[tuple[str, ...]] = set()
    out = []
    for path in paths:
        comps = path.split("/") if path else []
        node, depth = spec, 0
        while True:
            if var_type is not None and isinstance(node, var_type):
                node = variable_value(node)
                continue
            if isinstance(node, (bool, np.bool_)):
                used.add(tuple(comps[:depth]))
                out.append(bool(node))
                break
            where = "/".join(comps[:depth]) or "the top level"
            if depth == len(comps):
                raise ValueError(
                    f"{caller}: `{what}` (a boolean prefix of the params) goes deeper than "
                    f"parameter {path!r}: it has {node!r} there, not a bool")
            name = comps[depth]
            by_name = ({str(k): v for k, v in node.items()} if isinstance(node, Mapping)
                       else {str(i): v for i, v in enumerate(node)})
            if name not in by_name:
                raise ValueError(
                    f"{caller}: `{what}` (a boolean prefix of the params, e.g. "
                    f"{{'trunk': True, 'heads': False}}) has no entry for parameter {path!r}: "
                    f"at {where} it has keys {list(by_name)!r}, not {name!r}")
            node = by_name[name]
            depth += 1

    def unused(node, prefix):
        if var_type is not None and isinstance(node, var_type):
            return []
        if isinstance(node, (bool, np.bool_)):
            return [] if prefix in used else ["/".join(prefix)]
        items = node.items() if isinstance(node, Mapping) else enumerate(node)
        return [u for k, v in items for u in unused(v, prefix + (str(k),))]

    extra = unused(spec, ())
    if extra:
        raise ValueError(f"{caller}: `{what}` (a boolean prefix of the params) has entries "
                         f"{extra!r} that match no parameter")
    return out


def selection(spec: Any, params: Any, *, what: str = "shared",
              caller: str = "value_and_mtl_grad") -> list[bool]:
    """One Python bool per leaf of ``params`` (in ``jax.tree_util.tree_leaves`` order).

    Args:
      spec: a bool, a rule or list of rules, or a boolean prefix pytree (module
        docstring).
      params: the parameter pytree (arrays, ``ShapeDtypeStruct``s, an ``nnx.State``...).
      what: the argument's name, for error messages (``"shared"``, ``"norm_params"``).
      caller: the public entry point, for error messages.

    Raises:
      ValueError: a rule matches nothing, or a prefix tree does not fit the params (the
        message names the parameter paths).
      TypeError: a rule or a prefix leaf is of the wrong type.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"heads": {"a": jnp.ones(2)}, "trunk": jnp.ones((2, 2))}
      >>> selection("trunk", params), selection(lambda p, x: p.startswith("heads"), params)
      ([False, True], [True, False])
    """
    if isinstance(spec, (bool, np.bool_)):
        return [bool(spec)] * len(jax.tree_util.tree_leaves(params))
    items = leaf_items(params)
    if is_rules(spec):
        return _rules_selection(spec, items, what=what, caller=caller)

    def expand(flag, sub):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{caller}: `{what}` leaves must be Python bools, got {flag!r}")
        return jax.tree_util.tree_map(lambda _: bool(flag), sub)

    try:
        full = jax.tree_util.tree_map(expand, spec, params)
    except ValueError as err:
        if _walkable(spec):
            return _name_selection(spec, [p for p, _ in items], what=what, caller=caller)
        raise ValueError(
            f"{caller}: `{what}` must be a bool, a prefix of the params pytree (e.g. "
            f"{{'trunk': True, 'heads': False}}), path rules (e.g. 'trunk' or ['trunk/*']) or "
            f"a callable (path: str, leaf) -> bool: {err}") from err
    return [bool(f) for f in jax.tree_util.tree_leaves(full)]
