"""Tests of ``jmtl._loss_vector``: losses sliced from one vector are differentiated as it.

The engine rewrites a loss function whose per-task losses are all scalar slices of one
vector (``{task: per_task[i]}``) so that the backward pass starts at that vector. The
reference here is plain ``jax.grad`` of the explicitly weighted sum of the losses, which
never goes through the rewrite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmtl
from jmtl import _loss_vector

# Vector position of each task: the stacking (sorted-name) order is a permutation of it.
ORDER = ("seg", "depth", "normal", "edge")
WEIGHTS = {"depth": 0.5, "edge": 2.0, "normal": -1.0, "seg": 3.0}  # sorted: d, e, n, s
SHARED = {"trunk": True, "heads": False}


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"trunk": jax.random.normal(k1, (3, 5)),
            "heads": jax.random.normal(k2, (5, len(ORDER)))}


def _batch():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (7, 3)), jax.random.normal(ky, (7, len(ORDER)))


def _encode(params, x, y=None):
    del y
    return jnp.tanh(x @ params["trunk"])


def _per_task(params, z, y):
    return jnp.mean((z @ params["heads"] - y) ** 2, axis=0)


def _sliced(params, z, x, y):
    del x
    per_task = _per_task(params, z, y)
    return {n: per_task[i] for i, n in enumerate(ORDER)}


def _mixed(params, z, x, y):
    """One task's loss is not a slice: no rewrite, same results."""
    out = _sliced(params, z, x, y)
    out["edge"] = jnp.sum(z) * 0.01 + out["edge"]
    return out


def _reference_grads(heads_loss, params, x, y):
    def total(p):
        losses = heads_loss(p, _encode(p, x), x, y)
        return sum(WEIGHTS[n] * losses[n] for n in losses)

    return jax.grad(total)(params)


@pytest.mark.parametrize("mode", ["params", "features"])
@pytest.mark.parametrize("heads_loss", [_sliced, _mixed], ids=["sliced", "mixed"])
def test_weighted_grads_match_plain_grad(mode, heads_loss):
    params, (x, y) = _params(), _batch()
    method = jmtl.weighted(WEIGHTS)
    if mode == "params":
        fn = lambda p, x, y: heads_loss(p, _encode(p, x), x, y)  # noqa: E731
        grad_fn = jmtl.value_and_mtl_grad(fn, method, shared=SHARED)
    else:
        grad_fn = jmtl.value_and_mtl_grad(heads_loss, method, encoder=_encode)
    state = grad_fn.init(params, x, y)
    losses, grads, _ = jax.jit(grad_fn)(params, state, x, y)
    want = _reference_grads(heads_loss, params, x, y)
    for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want),
                        strict=True):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    ref_losses = heads_loss(params, _encode(params, x), x, y)
    assert set(losses) == set(ORDER)
    for n in ORDER:
        np.testing.assert_allclose(losses[n], ref_losses[n], rtol=1e-6)


def test_slice_source_finds_the_vector_and_the_order():
    v = jnp.arange(4.0) + 1.0

    def f(v):
        return {n: v[i] for i, n in enumerate(ORDER)}

    closed = jax.make_jaxpr(lambda v: jax.tree_util.tree_leaves(f(v)))(v)
    src, idx = _loss_vector.slice_source(closed.jaxpr, closed.jaxpr.outvars)
    assert src is closed.jaxpr.invars[0]
    # Stacking order depth, edge, normal, seg sits at vector positions 1, 3, 2, 0.
    assert idx.tolist() == [1, 3, 2, 0]


@pytest.mark.parametrize("fn", [
    lambda v, w: [v[0], w[1]],          # two source vectors
    lambda v, w: [v[0], v[1] * 2.0],    # one loss is computed from a slice
    lambda v, w: [v[0], jnp.sum(w)],    # one loss is a reduction
], ids=["two_sources", "scaled", "reduction"])
def test_slice_source_declines(fn):
    closed = jax.make_jaxpr(fn)(jnp.ones(3), jnp.ones(3))
    assert _loss_vector.slice_source(closed.jaxpr, closed.jaxpr.outvars) is None


def test_from_source_keeps_outputs_and_static_aux():
    v0 = jnp.array([3.0, -1.0, 2.0])

    def f(v):
        tree = {"b": v[0] ** 2, "a": (v ** 2)[2], "c": (v ** 2)[1]}
        leaves = jax.tree_util.tree_leaves(tree)
        return jnp.stack(leaves), (tree, {"note": "kept", "const": 1.5, "vec": v * 2})

    g = _loss_vector.from_source(f, v0)
    vec, (tree, aux) = g(v0)
    ref_vec, (ref_tree, ref_aux) = f(v0)
    np.testing.assert_allclose(vec, ref_vec)
    assert aux["note"] == "kept" and aux["const"] == 1.5
    np.testing.assert_allclose(aux["vec"], ref_aux["vec"])
    for n in ref_tree:
        np.testing.assert_allclose(tree[n], ref_tree[n])
    w = jnp.array([0.5, -2.0, 4.0])
    got = jax.vjp(lambda v: g(v)[0], v0)[1](w)[0]
    want = jax.grad(lambda v: jnp.dot(w, f(v)[0]))(v0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
