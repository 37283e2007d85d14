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

Same products and sums, so the same numbers (bit-identical in our measurements on
XLA:CPU); on the benchmark MLP (``benchmarks/speed.py``, one core) the params-mode
UPGrad step went from 10.0-10.6 to 8.5-8.7 ms at K = 8 and from 50-56 to 42-45 ms at
K = 32 (docs/architecture.md, "The Jacobian pass").

Calls (``jit``) are evaluated inline, so dense layers inside jitted user functions are
covered too. Every other primitive, control flow included, goes through ``jax.vmap`` of
its ``bind``, i.e. JAX's batching rule, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

__all__ = ["vmap_rows"]

_CALLS = ("jit", "pjit", "closed_call", "core_call")

# The unbatched operand is broadcast along the task axis (XLA's batched dot needs the
# batch dimension on both sides). When that copy would exceed this many bytes, the
# weight gradient is one GEMM per task in a ``lax.map`` instead: on the benchmark MLP at
# K = 128 (a 16 MiB broadcast) that was as fast and needed 12 MiB less temporary memory
# (60.4 against 72.3 MiB); at K = 8 and 32 the single batched GEMM was 4-11% faster.
BROADCAST_BYTES = 8 * 2**20


def vmap_rows(fn: Callable[[jax.Array], Any], cotangents: jax.Array) -> Any:
    """``jax.vmap(fn)(cotangents)`` for a linear ``fn`` such as a VJP.

    Args:
      fn: ``(K,) cotangent -> pytree`` (traced once, on ``cotangents[0]``).
      cotangents: ``(n, K)``: one cotangent per row.

    Returns:
      ``fn``'s output pytree with a leading axis of size ``n``.
    """
    n = cotangents.shape[0]
    closed = jax.make_jaxpr(fn)(cotangents[0])
    outs = _eval(closed.jaxpr, [(c, None) for c in closed.consts], [(cotangents, 0)], n)
    leaves = [jnp.broadcast_to(x, (n,) + jnp.shape(x)) if b is None else jnp.moveaxis(x, b, 0)
              for x, b in outs]
    tree = jax.tree_util.tree_structure(jax.eval_shape(fn, cotangents[0]))
    return jax.tree_util.tree_unflatten(tree, leaves)


def _bind(eqn, vals: Sequence[Any]) -> list:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # jax < 0.7 returns (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval(jaxpr, consts: list, args: list, n: int) -> list:
    """Evaluates ``jaxpr`` on ``(value, task_axis or None)`` pairs."""
    env: dict = {}

    def read(v):
        return (v.val, None) if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        vals = [x for x, _ in ins]
        axes = tuple(b for _, b in ins)
        with eqn.ctx.manager:
            if all(b is None for b in axes):
                outs = [(o, None) for o in _bind(eqn, vals)]
            elif eqn.primitive.name in _CALLS:
                inner = eqn.params["jaxpr"]
                outs = _eval(inner.jaxpr, [(c, None) for c in inner.consts], ins, n)
            elif eqn.primitive.name == "dot_general" and _transposing_fold(vals, axes, eqn):
                outs = [(_batched_dot(vals, axes, eqn, n), 0)]
            else:
                out = jax.vmap(lambda *a, eqn=eqn: _bind(eqn, a), in_axes=axes,
                               axis_size=n)(*vals)
                outs = [(o, 0) for o in out]
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


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
