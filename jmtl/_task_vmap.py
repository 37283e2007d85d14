"""``vmap`` over the task axis of the per-task VJP, with GEMM-friendly weight gradients.

The engine's per-task rows are ``vmap(vjp)(I_K)``. :func:`vmap_rows` computes exactly
that, but evaluates the VJP's jaxpr one equation at a time, batching each equation with
``jax.vmap`` (JAX's own batching rules) except one pattern: a ``dot_general`` with one
task-batched operand whose contracting dimensions are not its trailing ones. That is
the weight gradient of a dense layer, ``dW_k = Aᵀ D_k`` (``D_k`` the ``(batch, out)``
cotangent of task k, contracted over its leading ``batch`` axis). ``jax.vmap`` folds
the task axis into the free dimensions of one GEMM, ``(K·out, batch) × (batch, in)``,
which makes XLA:CPU write a transposed copy of every ``D_k`` (often fused with, and so
recomputing, the activation's derivative) and transpose the ``(K, out, in)`` result
back. Here the unbatched operand is broadcast along the task axis and the product is a
batched GEMM ``(K, batch, in)ᵀ × (K, batch, out)`` that reads every operand in its
natural layout and writes the ``(K, in, out)`` rows directly.

The cotangents are one-hot, and ``jax.vmap`` cannot know it: with stacked heads
``pred = z @ W`` (``W`` of shape ``(width, K)``) it computes the heads' input gradient as
a GEMM over a ``(K, batch, K)`` array that is zero but for one column per task, ``K² x
batch x width`` multiply-adds. Here a value whose task rows are one array masked to one
index per task (:class:`_OneHot`) stays in that form through the equations that keep it
(products with unbatched values, broadcasts, reductions over other axes, transposes,
...), and a ``dot_general`` that contracts the masked axis becomes a product of the
selected slices: an outer product ``r[:, k] ⊗ W[:, k]`` per task, ``K x batch x width``.

Same products and sums, so the same numbers (bit-identical in our measurements on
XLA:CPU; a non-finite residual poisons only the rows it belongs to, where ``vmap`` gives
``0 x inf = nan`` in every row). On the benchmark MLP (``benchmarks/speed.py``, one
core) the params-mode UPGrad step went from 9.4 to 8.0-9.3 ms at K = 8, from 62.5-64.4 to
53.6-54.3 ms at K = 32 and from 114-120 to 99-109 ms at K = 128 (docs/architecture.md,
"The Jacobian pass").

Calls (``jit``) are evaluated inline, so dense layers inside jitted user functions are
covered too. Every other primitive, control flow included, goes through ``jax.vmap`` of
its ``bind``, i.e. JAX's batching rule, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

__all__ = ["vmap_rows"]

_CALLS = ("jit", "pjit", "closed_call", "core_call")

# The unbatched operand is broadcast along the task axis (XLA's batched dot needs the
# batch dimension on both sides). When that copy would exceed this many bytes, the
# weight gradient is one GEMM per task in a ``lax.map`` instead: on the benchmark MLP at
# K = 128 (a 16 MiB broadcast) that was as fast and needed 8 MiB less temporary memory
# (64.4 against 72.3 MiB); at K = 8 and 32 the single batched GEMM was 4-11% faster.
BROADCAST_BYTES = 8 * 2**20


class _OneHot(NamedTuple):
    """A task-batched value whose row ``t`` is ``x`` masked to index ``first + t`` of its
    axis ``axis`` (``x * (iota == first + t)``), kept unbatched until an equation needs
    it dense. The one-hot cotangents start this way. ``axis=None`` is a virtual axis of
    size 1: row ``t`` is ``x`` for ``t == -first`` and zero otherwise (one task's loss
    sliced out of the stacked losses, and everything computed from it)."""

    x: jax.Array
    axis: int | None
    first: Any  # a Python int, or a traced int32 scalar in chunked passes


def vmap_rows(fn: Callable[[jax.Array], Any], num_tasks: int, dtype: Any, *,
              rows: int | None = None, first: Any = 0) -> Any:
    """``jax.vmap(fn)`` over the one-hot cotangents ``e_first, ..., e_{first+rows-1}``.

    Rows past ``num_tasks`` (padding of the last chunk) are zero.

    Args:
      fn: ``(num_tasks,) cotangent -> pytree``, linear (a VJP); traced once.
      num_tasks: K, the length of a cotangent.
      dtype: the cotangents' dtype.
      rows: how many one-hot cotangents (default ``num_tasks``).
      first: index of the first one (an int, or a traced int32 scalar).

    Returns:
      ``fn``'s output pytree with a leading axis of size ``rows``.
    """
    n = num_tasks if rows is None else rows
    probe = jnp.zeros((num_tasks,), dtype)
    closed = jax.make_jaxpr(fn)(probe)
    start = _OneHot(jnp.ones((num_tasks,), dtype), 0, first)
    outs = _eval(closed.jaxpr, [(c, None) for c in closed.consts], [start], n)
    leaves = []
    for v in outs:
        x, b = _dense(v, n)
        leaves.append(jnp.broadcast_to(x, (n,) + jnp.shape(x)) if b is None
                      else jnp.moveaxis(x, b, 0))
    tree = jax.tree_util.tree_structure(jax.eval_shape(fn, probe))
    return jax.tree_util.tree_unflatten(tree, leaves)


def _dense(v, n: int):
    """``(value, task_axis or None)`` of a value, materialising a :class:`_OneHot`."""
    if not isinstance(v, _OneHot):
        return v
    x, axis = v.x, v.axis
    if axis is None:
        return _add_row(jnp.zeros((n,) + x.shape, x.dtype), v, n), 0
    hit = jnp.arange(x.shape[axis])[None, :] == (v.first + jnp.arange(n))[:, None]
    hit = jnp.reshape(hit, (n,) + (1,) * axis + (x.shape[axis],) + (1,) * (x.ndim - axis - 1))
    return jnp.where(hit, x[None], jnp.zeros((), x.dtype)), 0


def _add_row(dense: jax.Array, v: _OneHot, n: int) -> jax.Array:
    """``dense`` (task axis first) plus the single non-zero row of ``v`` (``axis=None``)."""
    row = -v.first
    if isinstance(row, int):
        return dense.at[row].add(v.x) if 0 <= row < n else dense
    ok = (row >= 0) & (row < n)
    return dense.at[jnp.clip(row, 0, n - 1)].add(jnp.where(ok, v.x, jnp.zeros((), v.x.dtype)))


def _bind(eqn, vals: Sequence[Any]) -> list:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # jax < 0.7 returns (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval(jaxpr, consts: list, args: list, n: int) -> list:
    """Evaluates ``jaxpr`` on ``(value, task_axis or None)`` pairs and :class:`_OneHot`."""
    env: dict = {}

    def read(v):
        return (v.val, None) if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            outs = _eval_eqn(eqn, ins, n)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, ins: list, n: int) -> list:
    name = eqn.primitive.name
    if name in _CALLS:
        inner = eqn.params["jaxpr"]
        return _eval(inner.jaxpr, [(c, None) for c in inner.consts], ins, n)
    if any(isinstance(v, _OneHot) for v in ins):
        out = _one_hot_rule(eqn, ins, n)
        if out is not None:
            return out
        ins = [_dense(v, n) for v in ins]
    vals = [x for x, _ in ins]
    axes = tuple(b for _, b in ins)
    if all(b is None for b in axes):
        return [(o, None) for o in _bind(eqn, vals)]
    if name == "dot_general" and _transposing_fold(vals, axes, eqn):
        return [(_batched_dot(vals, axes, eqn, n), 0)]
    out = jax.vmap(lambda *a: _bind(eqn, a), in_axes=axes, axis_size=n)(*vals)
    return [(o, 0) for o in out]


_ONE_HOT_UNARY = ("neg", "convert_element_type", "copy", "copy_p", "reduce_precision")


def _one_hot_rule(eqn, ins: list, n: int) -> list | None:
    """The equation on :class:`_OneHot` inputs kept one-hot, or ``None`` (densify).

    Only equations that map zeros to zeros and keep the mask on one axis: unary sign
    and dtype changes, products with an unbatched operand, sums of two one-hot values
    on the same axis, division by a literal, broadcasts, transposes, reshapes and
    reductions that keep the axis, and ``dot_general`` (which ends the one-hot form
    when it contracts the axis: row ``t`` is then a product of slices ``first + t``).
    """
    name = eqn.primitive.name
    hot = [i for i, v in enumerate(ins) if isinstance(v, _OneHot)]
    h = ins[hot[0]]

    def keep(x, axis):
        return [_OneHot(x, axis, h.first)]

    if name in _ONE_HOT_UNARY and len(ins) == 1:
        return keep(_bind(eqn, [h.x])[0], h.axis)
    if name == "mul" and len(ins) == 2:
        other = ins[1 - hot[0]]
        if len(hot) == 1 and other[1] is None:
            vals = [h.x, other[0]] if hot[0] == 0 else [other[0], h.x]
            return keep(_bind(eqn, vals)[0], h.axis)
        return None
    if name == "div" and hot == [0] and isinstance(eqn.invars[1], jcore.Literal):
        return keep(_bind(eqn, [h.x, ins[1][0]])[0], h.axis)
    if name in ("add", "add_any") and len(ins) == 2:
        a, b = ins
        if len(hot) == 2 and a.axis == b.axis and a.first is b.first:
            return keep(_bind(eqn, [a.x, b.x])[0], a.axis)
        # One task's contribution added into the rows (separate heads): a row update.
        if len(hot) == 2 and a.axis is None and b.axis is None:
            return [(_add_row(_dense(a, n)[0], b, n), 0)]
        if len(hot) == 1 and h.axis is None and ins[1 - hot[0]][1] is not None:
            x, b = ins[1 - hot[0]]
            return [(_add_row(jnp.moveaxis(x, b, 0), h, n), 0)]
        return None
    if name == "sub" and len(hot) == 2:
        a, b = ins
        if a.axis == b.axis and a.first is b.first:
            return keep(_bind(eqn, [a.x, b.x])[0], a.axis)
        return None
    if len(ins) != 1:
        return _one_hot_dot(eqn, ins, hot, n) if name == "dot_general" else None
    if h.axis is None and name in ("broadcast_in_dim", "transpose", "reduce_sum", "squeeze",
                                   "reshape", "slice", "expand_dims"):
        return keep(_bind(eqn, [h.x])[0], None)
    if name == "slice" and eqn.params.get("strides") in (None, (1,) * h.x.ndim):
        start = eqn.params["start_indices"][h.axis]
        return [_OneHot(_bind(eqn, [h.x])[0], h.axis, h.first - start)]
    if name == "broadcast_in_dim":
        return keep(_bind(eqn, [h.x])[0], eqn.params["broadcast_dimensions"][h.axis])
    if name == "transpose":
        return keep(_bind(eqn, [h.x])[0], list(eqn.params["permutation"]).index(h.axis))
    if name in ("reduce_sum", "squeeze"):
        gone = eqn.params["axes" if name == "reduce_sum" else "dimensions"]
        if name == "squeeze" and h.axis in gone:  # a size-1 masked axis: now virtual
            return keep(_bind(eqn, [h.x])[0], None)
        if h.axis in gone:
            return None
        return keep(_bind(eqn, [h.x])[0], h.axis - sum(a < h.axis for a in gone))
    if name == "reshape" and eqn.params.get("dimensions") is None:
        old, new = h.x.shape, tuple(eqn.params["new_sizes"])
        before = int(np.prod(old[:h.axis]))
        for j, size in enumerate(new):
            if size == old[h.axis] and int(np.prod(new[:j])) == before:
                return keep(_bind(eqn, [h.x])[0], j)
        if old[h.axis] == 1:
            return keep(_bind(eqn, [h.x])[0], None)
    return None


def _one_hot_dot(eqn, ins, hot, n: int) -> list | None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if len(hot) != 1 or lb or rb or ins[1 - hot[0]][1] is not None:
        return None
    i = hot[0]
    h, other = ins[i], ins[1 - i][0]
    own, theirs = (lc, rc) if i == 0 else (rc, lc)
    if h.axis is None or h.axis not in own:  # the mask carries over to the output
        vals = [h.x, other] if i == 0 else [other, h.x]
        out = _bind(eqn, vals)[0]
        if h.axis is None:
            return [_OneHot(out, None, h.first)]
        free = [d for d in range(h.x.ndim) if d not in own]
        pos = free.index(h.axis)
        if i == 1:
            pos += ins[0][0].ndim - len(lc)
        return [_OneHot(out, pos, h.first)]
    # Contracting the masked axis: row t uses index first + t of both operands.
    k = list(own).index(h.axis)
    a = _pick(h.x, h.axis, h.first, n)
    b = _pick(other, theirs[k], h.first, n)
    a_rest = tuple(_moved(d, h.axis) for j, d in enumerate(own) if j != k)
    b_rest = tuple(_moved(d, theirs[k]) for j, d in enumerate(theirs) if j != k)
    lhs, rhs = (a, b) if i == 0 else (b, a)
    contract = (a_rest, b_rest) if i == 0 else (b_rest, a_rest)
    out = lax.dot_general(lhs, rhs, (contract, ((0,), (0,))),
                          precision=eqn.params.get("precision"),
                          preferred_element_type=eqn.params.get("preferred_element_type"))
    return [(out, 0)]


def _moved(d: int, axis: int) -> int:
    """Where dimension ``d`` goes when ``axis`` moves to the front."""
    return d + 1 if d < axis else d


def _pick(x: jax.Array, axis: int, first: Any, n: int) -> jax.Array:
    """``x``'s slices ``first .. first + n - 1`` along ``axis``, stacked in front (zero
    past the end)."""
    size = x.shape[axis]
    if isinstance(first, int) and 0 <= first and first + n <= size:
        x = lax.slice_in_dim(x, first, first + n, axis=axis)
        return jnp.moveaxis(x, axis, 0)
    idx = first + jnp.arange(n)
    return jnp.moveaxis(jnp.take(x, idx, axis=axis, mode="fill", fill_value=0), axis, 0)


def _transposing_fold(vals, axes, eqn) -> bool:
    """Whether ``vmap`` would fold the task axis into a GEMM through a transposed copy.

    One operand is task-batched, there are no batch dimensions, and that operand's
    contracting dimensions are not its trailing (row-major minor) ones.
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or sum(b is not None for b in axes) != 1:
        return False
    i = 0 if axes[0] is not None else 1
    contract = sorted(lc if i == 0 else rc)
    rank = jnp.ndim(vals[i]) - 1
    return contract != list(range(rank - len(contract), rank))


def _batched_dot(vals, axes, eqn, n: int) -> jax.Array:
    """The ``dot_general`` for every task, ``(n, *free_lhs, *free_rhs)``, reading the
    batched operand in place: one GEMM batched over tasks, or one GEMM per task."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    i = 0 if axes[0] is not None else 1
    batched = jnp.moveaxis(vals[i], axes[i], 0)
    other = vals[1 - i]
    if n * jnp.size(other) * jnp.dtype(other.dtype).itemsize > BROADCAST_BYTES:
        one = (lambda t: _bind(eqn, [t, other])[0]) if i == 0 else (
            lambda t: _bind(eqn, [other, t])[0])
        return lax.map(one, batched)
    wide = jnp.broadcast_to(other, (n,) + jnp.shape(other))
    lhs, rhs = (batched, wide) if i == 0 else (wide, batched)
    dims = ((tuple(c + 1 for c in lc), tuple(c + 1 for c in rc)), ((0,), (0,)))
    return lax.dot_general(lhs, rhs, dims, precision=eqn.params.get("precision"),
                           preferred_element_type=eqn.params.get("preferred_element_type"))
