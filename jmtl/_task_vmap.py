"""``vmap`` over the task axis of the per-task VJP, laid out for GEMMs.

The engine's per-task rows are ``vmap(vjp)(I_K)``. :func:`vmap_rows` computes exactly
that, but evaluates the VJP's jaxpr one equation at a time with JAX's batching rules
(``jax.vmap`` of each equation's ``bind``), except where the layout of the task axis or
the one-hot cotangents make a cheaper form possible:

* **Where the task axis lives.** Every value carries its task axis where it lands, as
  ``jax.vmap``'s tracers do, instead of in front. The heads' product of the one-hot
  cotangents is written ``(batch, ..., K, features)``, element-wise equations keep the
  axis where their operands have it (unbatched operands are broadcast along it, which
  XLA fuses), and a ``dot_general`` with one batched operand puts it among that
  operand's free dimensions (:func:`_folded_dot`). A dense layer's input gradient
  ``D_k Wᵀ`` is then one GEMM ``(batch·K, out) × (out, in)`` and its weight gradient
  ``Aᵀ D_k`` one GEMM ``(in, batch) × (batch, K·out)``, both reading ``D`` in place:
  no transposed copy and no broadcast of ``A``. When the task axis sits between a
  weight gradient's contracting dimensions, the product is a GEMM batched over tasks
  with ``A`` broadcast along them (:func:`_batched_dot`).
* **One-hot cotangents stay one-hot.** ``jax.vmap`` cannot know that the cotangents are
  one-hot: with stacked heads ``pred = z @ W`` (``W`` of shape ``(width, K)``) it
  computes the heads' input gradient as a GEMM over a ``(K, batch, K)`` array that is
  zero but for one column per task, ``K² x batch x width`` multiply-adds. Here such a
  value (:class:`_OneHot`: one array and the index each task selects) keeps that form
  through the equations that preserve it (products with unbatched values, broadcasts,
  reductions over other axes, transposes, ...), and a ``dot_general`` that contracts
  the masked axis becomes a product of the selected slices: an outer product
  ``r[:, k] ⊗ W[:, k]`` per task, ``K x batch x width``.
* **A cotangent that feeds two GEMMs is computed once** (XLA:CPU only, see
  :data:`MATERIALIZE_SHARED`).

Same products and sums, so the same numbers to float32 rounding (bit-identical to
``jax.vmap`` on the benchmark MLP; a non-finite residual poisons only the rows it
belongs to, where ``vmap`` gives ``0 x inf = nan`` in every row). Calls (``jit``) are
evaluated inline, so dense layers inside jitted user functions are covered too; every
other primitive, control flow included, goes through ``jax.vmap`` of its ``bind``.
What each step measured on the benchmark MLP is in docs/architecture.md, "The Jacobian
pass".
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

# Element-wise primitives: every non-scalar operand has the output's shape. The task
# axis stays where the operands have it (jax.vmap's rule moves it to the front whenever
# an unbatched operand is not a scalar, which costs a transposed copy per equation).
_ELEMENTWISE = frozenset((
    "add", "add_any", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem", "and",
    "or", "xor", "not", "eq", "ne", "lt", "le", "gt", "ge", "select_n", "clamp",
    "integer_pow", "neg", "sign", "abs", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "sin", "cos", "sqrt", "rsqrt", "cbrt", "square", "floor", "ceil", "round",
    "is_finite", "erf", "erfc", "erf_inv", "convert_element_type", "copy", "copy_p",
    "reduce_precision"))
# What a shared cotangent's producing chain may contain (see _materialize): element-wise
# equations and reshapes; also the heads' dot_general when it reads one-hot cotangents
# (then an outer product per task).
_CHEAP = _ELEMENTWISE | {"broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims"}

# The unbatched operand is broadcast along the task axis (XLA's batched dot needs the
# batch dimension on both sides). When that copy would exceed this many bytes, the
# weight gradient is one GEMM per task in a ``lax.map`` instead: on the benchmark MLP at
# K = 128 (a 16 MiB broadcast) that was as fast and needed 8 MiB less temporary memory
# (64.4 against 72.3 MiB); at K = 8 and 32 the single batched GEMM was 4-11% faster.
# (Measured when every weight gradient took this path; since the task axis is laid out
# next to the features, the benchmark MLP's weight gradients use _folded_dot instead.)
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


def _eval(jaxpr, consts: list, args: list, n: int, top: bool = True) -> list:
    """Evaluates ``jaxpr`` on ``(value, task_axis or None)`` pairs and :class:`_OneHot`.

    ``top``: ``jaxpr`` is the VJP itself, whose outputs are the rows (not read by a GEMM).
    """
    env: dict = {}
    gemm_inputs = _gemm_inputs(jaxpr, outputs=not top)

    def read(v):
        return (v.val, None) if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    shared = _shared_cotangents(jaxpr) if MATERIALIZE_SHARED else set()
    producer: dict = {}
    for idx, eqn in enumerate(jaxpr.eqns):
        ins = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            outs = _eval_eqn(eqn, ins, n, inner=eqn.outvars[0] in gemm_inputs)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
            producer[v] = idx
        if len(eqn.outvars) == 1 and eqn.outvars[0] in shared:
            with eqn.ctx.manager:
                _materialize(jaxpr, eqn.outvars[0], env, producer, n, gemm_inputs)
    return [read(v) for v in jaxpr.outvars]


# On XLA:CPU, a task-batched cotangent that feeds two GEMMs (a layer's weight gradient
# and its input gradient, which XLA reads through a (K·batch, width) bitcast) is computed
# twice: XLA fuses the element-wise chain that produces it (the one-hot heads' outer
# product, the activation's derivative) into each consumer, 2-3 ms and 8 MiB each at
# K = 32 on the benchmark MLP. The outputs of a conditional cannot be fused into their
# consumers, so the chain is evaluated inside a ``lax.cond`` whose two branches are the
# same function (the predicate only has to be unknown to the compiler): it is then
# written once. Other platforms get the plain chain (``lax.platform_dependent``).
MATERIALIZE_SHARED = True
_MAX_CHAIN = 32  # equations re-evaluated in the conditional, at most
# Smaller cotangents (per task) are left to XLA: computing them twice costs little, and
# a conditional hides what XLA can simplify in them (e.g. a task's loss cotangent that is
# one-hot by construction).
_MIN_SHARED_SIZE = 2**14


def _shared_cotangents(jaxpr) -> set:
    """Variables that an element-wise equation produces and that two or more GEMMs or
    sums read, a GEMM among them: the candidates for :func:`_materialize`."""
    uses: dict = {}
    dots: set = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "reduce_sum"):
            for v in set(eqn.invars):
                if not isinstance(v, jcore.Literal):
                    uses[v] = uses.get(v, 0) + 1
                    if eqn.primitive.name == "dot_general":
                        dots.add(v)
    made = {e.outvars[0] for e in jaxpr.eqns
            if len(e.outvars) == 1 and e.primitive.name in _CHEAP}
    return {v for v, c in uses.items() if c >= 2 and v in made and v in dots
            and np.prod(v.aval.shape) >= _MIN_SHARED_SIZE}


def _materialize(jaxpr, var, env, producer, n: int, gemm_inputs: set) -> None:
    """Re-evaluates the cheap chain that produced the task-batched ``var`` inside a
    ``lax.cond`` (see :data:`MATERIALIZE_SHARED`) and makes ``env[var]`` its output."""
    value = env[var]
    if isinstance(value, _OneHot) or value[1] is None:
        return
    chain: set = set()
    todo = [var]
    while todo:
        v = todo.pop()
        i = producer.get(v)
        if i is None or i in chain:
            continue
        if not isinstance(env[v], _OneHot) and env[v][1] is None:
            continue  # unbatched: computed once anyway
        eqn = jaxpr.eqns[i]
        args = [u for u in eqn.invars if not isinstance(u, jcore.Literal)]
        if any(isinstance(env[u], _OneHot) and env[u].axis is None for u in args):
            return  # rows added one task at a time (separate heads): not one fusion
        one_hot_dot = eqn.primitive.name == "dot_general" and any(
            isinstance(env[u], _OneHot) for u in args)
        if eqn.primitive.name in _CHEAP or one_hot_dot:
            chain.add(i)
            todo.extend(args)
        if len(chain) > _MAX_CHAIN:
            return

    order = sorted(chain)
    outside = list(dict.fromkeys(u for i in order for u in jaxpr.eqns[i].invars
                                 if not isinstance(u, jcore.Literal)
                                 and producer.get(u) not in chain))
    # The chain's task-batched inputs become the conditional's operands, written out:
    # worth it only if that is not more than the value itself, once more.
    batched_in = sum(jnp.size(env[u][0]) for u in outside
                     if not isinstance(env[u], _OneHot) and env[u][1] is not None)
    if batched_in > 2 * jnp.size(value[0]):
        return
    # Any value that is not a compile-time constant makes the predicate opaque; each
    # input's first element equals itself unless it is NaN, and both branches are the
    # same anyway.
    anchors = [(env[u].x if isinstance(env[u], _OneHot) else env[u][0]) for u in outside]
    anchors = [jnp.ravel(a)[0] for a in anchors
               if jnp.size(a) and jnp.issubdtype(jnp.result_type(a), jnp.floating)]
    if not anchors:
        return

    def chain_value():
        local: dict = {}

        def read(u):
            if isinstance(u, jcore.Literal):
                return (u.val, None)
            return local[u] if u in local else env[u]

        for i in order:
            eqn = jaxpr.eqns[i]
            outs = _eval_eqn(eqn, [read(u) for u in eqn.invars], n,
                             inner=eqn.outvars[0] in gemm_inputs)
            for u, o in zip(eqn.outvars, outs, strict=True):
                local[u] = o
        x, b = _dense(local[var], n)
        return jnp.moveaxis(x, b, value[1])

    pred = jnp.all(jnp.stack([a == a for a in anchors]))
    once = lambda: lax.cond(pred, chain_value, chain_value)  # noqa: E731
    env[var] = (lax.platform_dependent(cpu=once, default=lambda: value[0]), value[1])


def _gemm_inputs(jaxpr, outputs: bool) -> set:
    """Variables from which some ``dot_general`` is reached (``outputs``: the jaxpr's
    outputs count as reaching one, as for a call whose caller is unknown here)."""
    found = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)} if outputs else set()
    for eqn in reversed(jaxpr.eqns):
        if eqn.primitive.name == "dot_general" or any(o in found for o in eqn.outvars):
            found.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return found


def _eval_eqn(eqn, ins: list, n: int, inner: bool = True) -> list:
    """One equation on batched values. ``inner``: its output reaches a GEMM, so a newly
    laid-out task axis goes next to the features (else in front, as rows are stored)."""
    name = eqn.primitive.name
    if name in _CALLS:
        call = eqn.params["jaxpr"]
        return _eval(call.jaxpr, [(c, None) for c in call.consts], ins, n, top=False)
    if any(isinstance(v, _OneHot) for v in ins):
        out = _one_hot_rule(eqn, ins, n, inner)
        if out is not None:
            return out
        ins = [_dense(v, n) for v in ins]
    vals = [x for x, _ in ins]
    axes = tuple(b for _, b in ins)
    if all(b is None for b in axes):
        return [(o, None) for o in _bind(eqn, vals)]
    if name == "dot_general" and sum(b is not None for b in axes) == 1:
        if _transposing_fold(vals, axes, eqn):
            return [(_batched_dot(vals, axes, eqn, n), 0)]
        return [_folded_dot(vals, axes, eqn)]
    if name in _ELEMENTWISE and _same_shapes(eqn):
        return _elementwise(eqn, vals, axes)
    out_axis = 0
    if name == "reduce_sum":  # the task axis keeps its place among the kept axes
        b = axes[0]
        out_axis = b - sum(_shifted(d, b) < b for d in eqn.params["axes"])
    out = jax.vmap(lambda *a: _bind(eqn, a), in_axes=axes, out_axes=out_axis,
                   axis_size=n)(*vals)
    return [(o, out_axis) for o in out]


def _same_shapes(eqn) -> bool:
    shape = eqn.outvars[0].aval.shape
    return all(v.aval.shape in ((), shape) for v in eqn.invars)


def _shifted(d: int, b: int) -> int:
    """Where unbatched dimension ``d`` is when the task axis is at ``b``."""
    return d + 1 if d >= b else d


def _elementwise(eqn, vals, axes) -> list:
    """An element-wise equation with the task axis where its first batched operand has
    it: other batched operands are moved there, unbatched ones broadcast along it."""
    b = next(a for a in axes if a is not None)
    shape = next(jnp.shape(x) for x, a in zip(vals, axes) if a is not None)
    scalar_out = eqn.outvars[0].aval.shape == ()
    args = []
    for x, a in zip(vals, axes):
        if a is None and jnp.ndim(x) == 0 and not scalar_out:
            args.append(x)  # a scalar operand of an array equation (e.g. a literal)
        elif a is None:
            keep = tuple(_shifted(d, b) for d in range(jnp.ndim(x)))
            args.append(lax.broadcast_in_dim(x, shape, keep))
        else:
            args.append(jnp.moveaxis(x, a, b))
    return [(o, b) for o in _bind(eqn, args)]


def _folded_dot(vals, axes, eqn):
    """``dot_general`` with one task-batched operand whose task axis is a free dimension:
    one GEMM with the task axis folded into that operand's free dimensions, and the
    result's task axis where that lands (as ``jax.vmap`` does, without moving it)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    i = 0 if axes[0] is not None else 1
    b = axes[i]
    own_c, own_b = (lc, lb) if i == 0 else (rc, rb)
    own_c = tuple(_shifted(d, b) for d in own_c)
    own_b = tuple(_shifted(d, b) for d in own_b)
    free = [d for d in range(jnp.ndim(vals[i])) if d not in own_c and d not in own_b]
    out_axis = len(lb) + free.index(b)
    if i == 1:
        out_axis += jnp.ndim(vals[0]) - len(lc) - len(lb)
    kw = dict(precision=eqn.params.get("precision"),
              preferred_element_type=eqn.params.get("preferred_element_type"))
    if i == 0 and not lb and sorted(own_c) == list(range(len(own_c))):
        # The batched operand contracts its leading axes: it is the right-hand side of
        # a row-major GEMM, (unbatched free, contract) x (contract, task x free). Swap
        # the operands rather than have XLA write it transposed, and transpose the
        # (smaller, or next transposed anyway) result.
        out = lax.dot_general(vals[1], vals[0], ((rc, own_c), ((), ())), **kw)
        n_rhs_free = out.ndim - len(free)
        perm = tuple(range(n_rhs_free, out.ndim)) + tuple(range(n_rhs_free))
        return lax.transpose(out, perm), out_axis
    dims = ((own_c, rc), (own_b, rb)) if i == 0 else ((lc, own_c), (lb, own_b))
    return lax.dot_general(vals[0], vals[1], dims, **kw), out_axis


_ONE_HOT_UNARY = ("neg", "convert_element_type", "copy", "copy_p", "reduce_precision")


def _one_hot_rule(eqn, ins: list, n: int, inner: bool = True) -> list | None:
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
        return _one_hot_dot(eqn, ins, hot, n, inner) if name == "dot_general" else None
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


def _one_hot_dot(eqn, ins, hot, n: int, inner: bool = True) -> list | None:
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
    out_type = eqn.params.get("preferred_element_type") or jnp.result_type(h.x, other)
    if len(own) == 1:  # an outer product per task, written in place as one product
        # When a GEMM follows, the task axis goes next to the last axis, (batch, ...,
        # task, features): the weight gradients, which contract the leading axes, are
        # then one GEMM each over (batch, task x features) with no transposed copy
        # (_folded_dot). Rows (features mode) are stored with the task axis in front.
        lhs, l_axis, rhs, r_axis = ((h.x, h.axis, other, theirs[0]) if i == 0
                                    else (other, theirs[0], h.x, h.axis))
        free = ([lhs.shape[d] for d in range(lhs.ndim) if d != l_axis]
                + [rhs.shape[d] for d in range(rhs.ndim) if d != r_axis])
        pos = max(len(free) - 1, 0) if inner else 0
        shape = tuple(free[:pos]) + (n,) + tuple(free[pos:])

        def spread(x, axis, offset):
            dims, j = [], offset
            for d in range(x.ndim):
                if d == axis:
                    dims.append(pos)
                else:
                    dims.append(_shifted(j, pos))
                    j += 1
            x = _take(x, axis, h.first, n).astype(out_type)
            return lax.broadcast_in_dim(x, shape, tuple(dims))

        out = spread(lhs, l_axis, 0) * spread(rhs, r_axis, lhs.ndim - 1)
        return [(out, pos)]
    a = _pick(h.x, h.axis, h.first, n)
    b = _pick(other, theirs[k], h.first, n)
    a_rest = tuple(_moved(d, h.axis) for j, d in enumerate(own) if j != k)
    b_rest = tuple(_moved(d, theirs[k]) for j, d in enumerate(theirs) if j != k)
    lhs, rhs = (a, b) if i == 0 else (b, a)
    contract = (a_rest, b_rest) if i == 0 else (b_rest, a_rest)
    out = lax.dot_general(lhs, rhs, (contract, ((0,), (0,))),
                          precision=eqn.params.get("precision"), preferred_element_type=out_type)
    return [(out, 0)]


def _moved(d: int, axis: int) -> int:
    """Where dimension ``d`` goes when ``axis`` moves to the front."""
    return d + 1 if d < axis else d


def _take(x: jax.Array, axis: int, first: Any, n: int) -> jax.Array:
    """``x``'s slices ``first .. first + n - 1`` along ``axis`` (zero past the end)."""
    size = x.shape[axis]
    if isinstance(first, int) and 0 <= first and first + n <= size:
        return lax.slice_in_dim(x, first, first + n, axis=axis)
    return jnp.take(x, first + jnp.arange(n), axis=axis, mode="fill", fill_value=0)


def _pick(x: jax.Array, axis: int, first: Any, n: int) -> jax.Array:
    """:func:`_take`, stacked in front."""
    return jnp.moveaxis(_take(x, axis, first, n), axis, 0)


def _transposing_fold(vals, axes, eqn) -> bool:
    """Whether folding the task axis into a GEMM would need a transposed copy.

    One operand is task-batched, there are no batch dimensions, and that operand's
    contracting dimensions (counted with the task axis where it is) are neither its
    leading nor its trailing ones, so its free dimensions and the task axis are not
    one contiguous block.
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return False
    i = 0 if axes[0] is not None else 1
    contract = sorted(_shifted(d, axes[i]) for d in (lc if i == 0 else rc))
    rank = jnp.ndim(vals[i])
    return contract not in (list(range(len(contract))),
                            list(range(rank - len(contract), rank)))


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
