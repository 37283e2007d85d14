"""``jmtl._task_vmap.vmap_rows``: the per-task VJP batched over tasks, laid out for GEMMs.

The reference is a loop of K separate VJPs evaluated in float64 (one cotangent at a
time, no batching at all). Every model shape below also goes through ``jax.vmap``-only
primitives (conv, scan, custom_jvp, jit calls) to check that the equation-by-equation
evaluation leaves them as JAX batches them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmtl
from jmtl import _task_vmap
from jmtl.engine import value_and_mtl_grad

K = 4
RNG = np.random.default_rng(0)


def _arr(*shape, dtype=jnp.float32):
    return jnp.asarray(RNG.normal(size=shape) / np.sqrt(shape[0]), dtype)


def _dense(p, x):
    # Weight gradient contracts the cotangent's leading axis: the rewritten pattern.
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return jnp.tanh(h @ p["w2"])


def _seq(p, x):
    # (batch, time, features) activations: the weight gradient contracts two axes.
    return jax.nn.gelu(jnp.einsum("btf,fo->bto", x, p["w1"])).mean(axis=1) @ p["w2"]


@jax.jit
def _jitted_layer(w, x):
    return jnp.sin(x @ w)


def _nested(p, x):
    # A dense layer inside a jitted function (evaluated inline) and a transposed use.
    h = _jitted_layer(p["w1"], x)
    return (p["w2"].T @ h.T).T


def _conv(p, x):
    img = x.reshape(x.shape[0], 4, 4, 1)
    h = jax.lax.conv_general_dilated(img, p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(h).mean(axis=(1, 2)) @ p["w2"]


def _scan(p, x):
    def cell(h, xt):
        h = jnp.tanh(xt @ p["w1"] + h * p["b1"])
        return h, h

    h, _ = jax.lax.scan(cell, jnp.zeros((x.shape[0], 8)), jnp.stack([x, -x, 0.5 * x]))
    return h @ p["w2"]


def _unused(p, x):
    # ``p["unused"]`` does not reach the losses: its rows are zeros (never batched).
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _separate_heads(p, x):
    # K heads applied one by one (a dict of heads in a Flax model): the stacked losses'
    # cotangent is sliced per head, so each head's rows are one task's only.
    z = jax.nn.relu(x @ p["w1"] + p["b1"])
    return jnp.stack([z @ p["w2"][:, i] for i in range(K)], axis=1)


MODELS = {"dense": (_dense, (16,)), "separate_heads": (_separate_heads, (16,)),
          "seq": (_seq, (3, 6)), "nested": (_nested, (16,)), "conv": (_conv, (16,)),
          "scan": (_scan, (16,)), "unused": (_unused, (16,))}


def _setup(name):
    model, xshape = MODELS[name]
    params = {"w1": _arr(6, 8) if name == "seq" else _arr(16, 8), "b1": _arr(8),
              "w2": _arr(8, K), "k": _arr(3, 3, 1, 8), "unused": _arr(3)}
    x = _arr(5, 3, 6) if name == "seq" else _arr(5, *xshape)
    y = _arr(5, K)

    def losses(p, x=x, y=y):
        return jnp.mean((model(p, x) - y) ** 2, axis=0)

    return params, x, y, losses


@pytest.mark.parametrize("name", list(MODELS))
def test_rows_equal_separate_vjps_in_float64(name):
    params, x, y, losses = _setup(name)
    _, vjp = jax.vjp(losses, params)
    rows = jax.jit(lambda: _task_vmap.vmap_rows(vjp, K, jnp.float32))()
    with jax.enable_x64():
        to64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        x64, y64 = to64(x), to64(y)
        _, vjp64 = jax.vjp(lambda p: losses(p, x64, y64), to64(params))
        ref = [vjp64(jnp.eye(K, dtype=jnp.float64)[i])[0] for i in range(K)]
        for key in params:
            want = np.stack([np.asarray(r[key]) for r in ref])
            got = np.asarray(rows[0][key], np.float64)
            assert got.shape == want.shape, (name, key)
            np.testing.assert_allclose(got, want, rtol=2e-5,
                                       atol=2e-6 * max(np.abs(want).max(), 1e-30),
                                       err_msg=f"{name}/{key}")


def _batched_dots(fn, *args) -> int:
    """``dot_general`` equations with batch dimensions anywhere in ``fn``'s jaxpr."""
    count = 0

    def walk(jaxpr):
        nonlocal count
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][1][0]:
                count += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return count


def test_dense_weight_gradients_are_single_gemms_over_the_folded_task_axis():
    """The one-hot heads' product is laid out ``(batch, K, width)``, so each weight
    gradient is one plain GEMM ``(in, batch) x (batch, K·out)``: no GEMM batched over
    tasks (which needs the layer input broadcast along the task axis), no per-task loop.
    The rows equal plain ``jax.vmap``'s."""
    params, _, _, losses = _setup("dense")
    _, vjp = jax.vjp(losses, params)
    eye = jnp.eye(K)
    assert _batched_dots(lambda e: _task_vmap.vmap_rows(vjp, K, jnp.float32), eye) == 0
    got = jax.jit(lambda: _task_vmap.vmap_rows(vjp, K, jnp.float32))()
    want = jax.vmap(vjp)(eye)
    for key in params:
        np.testing.assert_allclose(np.asarray(got[0][key]), np.asarray(want[0][key]),
                                   rtol=1e-6, atol=1e-7, err_msg=key)


def _mlp_rows_temp_bytes(rows_fn) -> int:
    k, b, d, h = 8, 128, 32, 128
    r = np.random.default_rng(1)
    p = {"w1": jnp.asarray(r.normal(size=(d, h)) / 6, jnp.float32), "b1": jnp.zeros(h),
         "w2": jnp.asarray(r.normal(size=(h, h)) / 11, jnp.float32), "b2": jnp.zeros(h)}
    heads = jnp.asarray(r.normal(size=(h, k)), jnp.float32)
    x = jnp.asarray(r.normal(size=(b, d)), jnp.float32)
    y = jnp.asarray(r.normal(size=(b, k)), jnp.float32)

    def losses(t):
        z = jax.nn.relu(jax.nn.relu(x @ t["w1"] + t["b1"]) @ t["w2"] + t["b2"])
        return jnp.mean((z @ heads - y) ** 2, axis=0)

    def rows(t):
        return rows_fn(jax.vjp(losses, t)[1], k)

    return jax.jit(rows).lower(p).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU fusion workaround")
def test_shared_cotangent_is_computed_once_on_cpu(monkeypatch):
    """The masked cotangent that feeds both a layer's weight gradient and its input
    gradient is computed inside one conditional, so XLA:CPU writes it once instead of
    once per consumer: the compiled rows need less temporary memory than without the
    conditional, and than plain ``jax.vmap``."""
    rows = lambda vjp, k: _task_vmap.vmap_rows(lambda e: vjp(e)[0], k, jnp.float32)  # noqa: E731
    once = _mlp_rows_temp_bytes(rows)
    plain = _mlp_rows_temp_bytes(lambda vjp, k: jax.vmap(lambda e: vjp(e)[0])(jnp.eye(k)))
    monkeypatch.setattr(_task_vmap, "MATERIALIZE_SHARED", False)
    twice = _mlp_rows_temp_bytes(
        lambda vjp, k: _task_vmap.vmap_rows(lambda e: vjp(e)[0], k, jnp.float32))
    assert once < twice and once < plain, (once, twice, plain)


@pytest.mark.parametrize("first", [0, 1, 3])
@pytest.mark.parametrize("traced", [False, True])
def test_a_chunk_of_rows_with_padding_past_k(first, traced):
    """Rows ``first .. first + 3``; those past K are zero (the chunked passes' padding)."""
    params, x, y, losses = _setup("dense")
    _, vjp = jax.vjp(losses, params)
    if traced:
        rows = jax.jit(lambda f: _task_vmap.vmap_rows(vjp, K, jnp.float32, rows=3, first=f))(
            jnp.int32(first))
    else:
        rows = jax.jit(lambda: _task_vmap.vmap_rows(vjp, K, jnp.float32, rows=3,
                                                    first=first))()
    full = jax.vmap(vjp)(jnp.eye(K))[0]
    for key in params:
        want = np.zeros((3,) + full[key].shape[1:], np.float32)
        take = min(3, K - first)
        want[:take] = np.asarray(full[key][first:first + take])
        np.testing.assert_allclose(np.asarray(rows[0][key]), want, rtol=1e-6, atol=1e-7,
                                   err_msg=key)


def test_one_hot_rows_skip_the_k_squared_heads_product():
    """The one-hot cotangent never becomes a dense (K, batch, K) array: the heads' input
    gradient is an outer product per task, not a GEMM over a mostly-zero K axis."""
    params, _, _, losses = _setup("dense")
    _, vjp = jax.vjp(losses, params)
    text = str(jax.make_jaxpr(lambda: _task_vmap.vmap_rows(vjp, K, jnp.float32))())
    assert f"f32[{K},5,{K}]" not in text
    assert f"f32[{K},5,{K}]" in str(jax.make_jaxpr(jax.vmap(vjp))(jnp.eye(K)))


def test_engine_rows_match_brute_force_with_either_batching():
    """The engine's update with ``task_batching`` "gemm" and "vmap" against per-task grads."""
    params, _, _, losses = _setup("dense")
    names = [f"t{i}" for i in range(K)]

    def loss_fn(p):
        v = losses(p)
        return {n: v[i] for i, n in enumerate(names)}

    per_task = [jax.grad(lambda p, n=n: loss_fn(p)[n])(params) for n in names]
    method = jmtl.methods.get("upgrad")
    for batching in ("gemm", "vmap"):
        fn = value_and_mtl_grad(loss_fn, method, task_batching=batching, return_weights=True)
        _, grads, _, weights = jax.jit(fn)(params, fn.init(params))
        w = [float(weights[n]) for n in names]
        want = jax.tree_util.tree_map(
            lambda *g, w=w: sum(wi * np.asarray(gi, np.float64)
                                for wi, gi in zip(w, g, strict=True)), *per_task)
        for key in params:
            np.testing.assert_allclose(np.asarray(grads[key]), want[key], rtol=1e-4,
                                       atol=1e-6, err_msg=f"{batching}/{key}")


def test_unknown_task_batching_is_a_clear_error():
    with pytest.raises(ValueError, match=r"upgrad.*task_batching"):
        value_and_mtl_grad(lambda p: {"a": p}, jmtl.methods.get("upgrad"),
                           task_batching="loop")
