"""Differentiating the vector a loss pytree was sliced from, not its K scalar slices.

A loss function often computes its per-task losses as one ``(K,)`` vector and returns
``{task: per_task[i] for ...}``. Differentiated as written, the K scalar slices
transpose into K ``pad`` ops summed into one vector, and XLA fuses that chain into every
element of the next reverse-mode op (e.g. the ``(batch, K)`` broadcast of a mean): at
K = 128 a loss-level method's weighted VJP made the step 3-5x slower than ``ew``'s,
whose constant weights fold the chain away.

:func:`from_source` traces the engine's loss function once and, when every task's loss
is a scalar slice of one 1-D array, returns it rewritten so that the stacked losses are
that array itself (gathered into stacking order when the orders differ): the backward
pass then reaches the array in one op. Otherwise the traced function is evaluated
unchanged. Either way the user's function is traced exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex

__all__ = ["from_source", "slice_source"]


def _producers(jaxpr) -> dict:
    """Each top-level variable -> the equation that defines it."""
    return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}


def _scalar_slice(var: Any, producers: dict) -> tuple[Any, int] | None:
    """``(vector, i)`` when ``var`` is ``vector[i]`` of a 1-D ``vector`` (slice + squeeze)."""
    eqn = producers.get(var) if isinstance(var, jex.Var) else None
    if eqn is None or eqn.primitive.name not in ("squeeze", "reshape"):
        return None
    one = eqn.invars[0]
    if var.aval.shape != () or getattr(one.aval, "shape", None) != (1,):
        return None
    cut = producers.get(one) if isinstance(one, jex.Var) else None
    if cut is None or cut.primitive.name != "slice":
        return None
    src = cut.invars[0]
    start, limit = cut.params["start_indices"], cut.params["limit_indices"]
    if (len(src.aval.shape) != 1 or limit[0] != start[0] + 1
            or cut.params["strides"] not in (None, (1,))):
        return None
    return src, int(start[0])


def slice_source(jaxpr, leaves: list) -> tuple[Any, np.ndarray] | None:
    """``(vector, idx)`` with ``leaves[j] = vector[idx[j]]`` for every j, else ``None``.

    Args:
      jaxpr: the traced function's jaxpr.
      leaves: variables of ``jaxpr`` (the per-task losses, in stacking order).
    """
    producers = _producers(jaxpr)
    found = [_scalar_slice(v, producers) for v in leaves]
    if not found or any(f is None for f in found):
        return None
    src = found[0][0]
    if any(f[0] is not src for f in found):
        return None
    return src, np.array([f[1] for f in found], np.int32)


def _gather(vector: jax.Array, idx: np.ndarray) -> jax.Array:
    """``vector[idx]``; the vector itself when ``idx`` is ``0..n-1`` (no op to transpose)."""
    if idx.shape[0] == vector.shape[0] and np.array_equal(idx, np.arange(idx.shape[0])):
        return vector
    return vector[idx]


def from_source(f: Callable, *primals) -> Callable:
    """``f`` traced once at ``primals``, its stacked losses taken from their source vector.

    Args:
      f: ``f(*primals) -> (stacked, (loss_tree, aux))`` with ``stacked`` the ``(K,)``
        stack of the K leaves of ``loss_tree`` (the engine's linearised function).
      primals: the arguments to trace ``f`` at.

    Returns:
      A function with the same signature and outputs as ``f`` (up to float rounding: the
      same values), for ``jax.vjp``/``jax.jvp`` at ``primals``. Leaves of
      ``(loss_tree, aux)`` that are not traced values (strings, constants) are returned
      as they are, as ``jax.vjp``'s ``has_aux`` would.
    """
    box: dict = {}

    def traced(*args):
        vec, rest = f(*args)
        leaves, treedef = jax.tree_util.tree_flatten(rest)
        dyn = [i for i, x in enumerate(leaves) if isinstance(x, jax.core.Tracer)]
        box.update(treedef=treedef, dyn=dyn, k=vec.shape[0],
                   static=[None if i in dyn else x for i, x in enumerate(leaves)])
        return vec, [leaves[i] for i in dyn]

    closed = jax.make_jaxpr(traced)(*primals)
    jaxpr = closed.jaxpr
    outs, k, dyn = list(jaxpr.outvars), box["k"], box["dyn"]
    source = None
    if dyn[:k] == list(range(k)):  # every loss is traced: it may be a slice
        source = slice_source(jaxpr, outs[1:1 + k])
    idx = None
    if source is not None and source[0].aval.dtype == outs[0].aval.dtype:
        outs[0], idx = source
    fn = jex.jaxpr_as_fun(jex.ClosedJaxpr(jaxpr.replace(outvars=outs), closed.consts))

    def rewritten(*args):
        first, *vals = fn(*jax.tree_util.tree_leaves(args))
        leaves = list(box["static"])
        for i, v in zip(dyn, vals, strict=True):
            leaves[i] = v
        vec = first if idx is None else _gather(first, idx)
        return vec, jax.tree_util.tree_unflatten(box["treedef"], leaves)

    return rewritten
