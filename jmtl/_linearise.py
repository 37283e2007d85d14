"""One forward pass, linearised: what the engine's driver needs from a loss function.

Two small builders, one per mode, return a :class:`Linearised` step. The driver never
looks at the mode: it asks for per-task rows of the *shared quantities* ``x`` (the
shared parameters in params mode, the representation ``z`` in features mode), for a
backward pass with given task weights, and for the final gradient pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _loss_vector
from jmtl import _replicas as replicas_lib
from jmtl import tasks as tasks_lib

__all__ = ["Linearised", "MEAN", "CONCAT", "split_output", "stack_losses", "params_mode",
           "features_mode", "leaf_count_dim"]

# How the replicas' Jacobians make the whole-batch one: params mode averages them (each
# replica's rows are gradients of its shard-mean losses); features mode concatenates
# them (each replica's rows concern its own examples), divided by the number of replicas.
MEAN = "mean"
CONCAT = "concat"


class Linearised(NamedTuple):
    """A loss function linearised at the current parameters.

    Attributes:
      losses: ``(K,)`` this replica's stacked losses.
      loss_tree: the loss pytree as returned by the loss function.
      aux: the auxiliary output (``None`` without ``has_aux``).
      x: leaves of the shared quantities (shared parameters, or ``z``).
      rows: ``(K,)`` cotangent -> list like ``x``: the x-part of the VJP (vmapped with
        one-hot cotangents it gives the per-task rows).
      tangent: list like ``x`` -> ``(K,)`` JVP of the losses (the chunked Gramian).
      backward: ``(K,)`` weights -> ``(x_grad, head_grads)``, one VJP with the weights as
        cotangent, both parts ready for :attr:`finish`.
      heads: ``(K,)`` weights -> ``head_grads``: the task-specific parameters' part alone.
      finish: ``(x_grad, head_grads) -> grads`` pytree like the params.
      mode: :data:`MEAN` or :data:`CONCAT`.
      replicas: the :class:`~jmtl._replicas.Replicas` context.
      dim: the number of entries of ``x`` (``d`` of the method's Jacobian).
    """

    losses: jax.Array
    loss_tree: Any
    aux: Any
    x: list
    rows: Callable
    tangent: Callable
    backward: Callable
    heads: Callable
    finish: Callable
    mode: str
    replicas: replicas_lib.Replicas
    dim: int


def split_output(out: Any, has_aux: bool, name: str) -> tuple[Any, Any]:
    """``(losses, aux)`` from a loss function's output."""
    if not has_aux:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(
            f"value_and_mtl_grad({name}): with has_aux=True the loss function must return "
            f"a pair ({{task: loss}}, aux), got {type(out).__name__}")
    return out[0], out[1]


def stack_losses(tree: Any, name: str) -> jax.Array:
    """The ``(K,)`` losses; every task's loss must be a floating-point scalar."""
    what = f"value_and_mtl_grad({name}): loss function output"
    if not jax.tree_util.tree_leaves(tree):
        raise ValueError(f"{what} has no task (an empty loss pytree)")
    names = tasks_lib.task_names(tree)
    for task, leaf in zip(names, jax.tree_util.tree_leaves(tree), strict=True):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(f"{what}: the loss of task {task!r} is {jnp.result_type(leaf)}; "
                             "losses must be floating point (an integer loss has no gradient)")
    return tasks_lib.stack(tree, what=what)


def _cast_like(tree: list, like: list) -> list:
    return [jnp.asarray(g).astype(p.dtype) for g, p in zip(tree, like, strict=True)]


def _safe_vjp(vjp_fn, out_like):
    return lambda ct: vjp_fn(replicas_lib.match_vma(ct, out_like))


def _size(leaves) -> int:
    return int(sum(int(np.prod(np.shape(x), dtype=np.int64)) for x in leaves))


def params_mode(loss_fn: Callable, params: Any, args: tuple, *, shared: list[bool],
                has_aux: bool, axis_name: Any, name: str) -> Linearised:
    """Linearises ``loss_fn(params, *args)`` with the shared parameters as ``x``.

    Args:
      shared: one bool per leaf of ``params`` (from :func:`jmtl._paths.selection`).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    idx_x = [i for i, m in enumerate(shared) if m]
    idx_t = [i for i, m in enumerate(shared) if not m]
    x0 = [leaves[i] for i in idx_x]
    t0 = [leaves[i] for i in idx_t]
    if not x0:
        raise ValueError(f"value_and_mtl_grad({name}): `shared` marks no parameter as shared")

    def merge(x, t):
        out = [None] * len(leaves)
        for i, v in zip(idx_x, x, strict=True):
            out[i] = v
        for i, v in zip(idx_t, t, strict=True):
            out[i] = v
        return jax.tree_util.tree_unflatten(treedef, out)

    def f(x, t):
        ltree, aux = split_output(loss_fn(merge(x, t), *args), has_aux, name)
        return stack_losses(ltree, name), (ltree, aux)

    f = _loss_vector.from_source(f, x0, t0)  # differentiate the losses' source vector
    vec, vjp_fn, (ltree, aux) = jax.vjp(f, x0, t0, has_aux=True)
    vjp_fn = _safe_vjp(vjp_fn, vec)
    reps = replicas_lib.replicas_of(vec, axis_name)
    ct_dtype = vec.dtype

    def backward(w):
        return reps.mean(vjp_fn(w.astype(ct_dtype)))

    def heads(c):
        return reps.mean(vjp_fn(c.astype(ct_dtype))[1]) if t0 else []

    def finish(gx, gt):
        return merge(_cast_like(gx, x0), _cast_like(gt, t0))

    def tangent(dx):
        return jax.jvp(lambda x: f(x, t0)[0], (x0,), (replicas_lib.match_vma(dx, x0),))[1]

    return Linearised(losses=vec, loss_tree=ltree, aux=aux, x=x0,
                      rows=lambda e: vjp_fn(e)[0], tangent=tangent, backward=backward,
                      heads=heads, finish=finish, mode=MEAN, replicas=reps, dim=_size(x0))


def features_mode(loss_fn: Callable, encoder: Callable, params: Any, args: tuple, *,
                  has_aux: bool, axis_name: Any, name: str) -> Linearised:
    """Linearises ``loss_fn(params, encoder(params, *args), *args)`` with ``z`` as ``x``."""
    p_leaves = jax.tree_util.tree_leaves(params)
    z, enc_vjp = jax.vjp(lambda p: encoder(p, *args), params)
    enc_vjp = _safe_vjp(enc_vjp, z)
    z_leaves, z_def = jax.tree_util.tree_flatten(z)
    if not z_leaves:
        raise ValueError(f"value_and_mtl_grad({name}): the encoder returned an empty pytree")

    def g(zl, p):
        ltree, aux = split_output(loss_fn(p, jax.tree_util.tree_unflatten(z_def, zl), *args),
                                  has_aux, name)
        return stack_losses(ltree, name), (ltree, aux)

    g = _loss_vector.from_source(g, z_leaves, params)
    vec, head_vjp, (ltree, aux) = jax.vjp(g, z_leaves, params, has_aux=True)
    head_vjp = _safe_vjp(head_vjp, vec)
    reps = replicas_lib.replicas_of(vec, axis_name)
    ct_dtype = vec.dtype

    def backward(w):
        return head_vjp(w.astype(ct_dtype))

    def heads(c):
        return head_vjp(c.astype(ct_dtype))[1]

    def finish(ct_z, g_head):
        ct_z = [jnp.asarray(c).astype(zl.dtype) for c, zl in zip(ct_z, z_leaves, strict=True)]
        (g_enc,) = enc_vjp(jax.tree_util.tree_unflatten(z_def, ct_z))
        grads = jax.tree_util.tree_map(
            lambda a, b: jnp.asarray(a).astype(jnp.result_type(a, b)) + b, g_enc, g_head)
        grads = reps.mean(grads)
        return jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params),
            _cast_like(jax.tree_util.tree_leaves(grads), p_leaves))

    def tangent(dz):
        return jax.jvp(lambda zl: g(zl, params)[0], (z_leaves,),
                       (replicas_lib.match_vma(dz, z_leaves),))[1]

    return Linearised(losses=vec, loss_tree=ltree, aux=aux, x=z_leaves,
                      rows=lambda e: head_vjp(e)[0], tangent=tangent, backward=backward,
                      heads=heads, finish=finish, mode=CONCAT, replicas=reps,
                      dim=_size(z_leaves))


def leaf_count_dim(tree: Any) -> int:
    """The number of entries of a pytree (shapes only)."""
    return _size(jax.tree_util.tree_leaves(tree))

