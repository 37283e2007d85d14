"""Reliability (issue 12): scale-free engine, no state poisoning, checks, wrong states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmtl
from jmtl.methods import base
from jmtl.testing import build_example
from tests import _tiers

K, D = 3, 6
RNG = np.random.default_rng(0)
J0 = RNG.standard_normal((K, D)).astype(np.float32)
L0 = np.array([0.7, 1.3, 0.4], np.float32)
KEY = jax.random.PRNGKey(3)


def _method(name):
    return build_example(name, K)


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a / np.max(np.abs(a)), b / np.max(np.abs(b))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _scale_free_names():
    out = []
    for name in jmtl.methods.names():
        f = jmtl.methods.factory(name)
        m = _method(name)
        if base.SCALE_INVARIANT in f.properties and (m.needs & {base.GRAMIAN, base.JACOBIAN}
                                                     or m.output == base.DIRECTION):
            out.append(name)
    return out


# ------------------------------------------------------------- 1. the engine at any scale


def _model():
    params = {"trunk": jnp.asarray(RNG.standard_normal((4, 5)).astype(np.float32)) / 2,
              "heads": jnp.asarray(RNG.standard_normal((5, K)).astype(np.float32))}
    x = jnp.asarray(RNG.standard_normal((8, 4)).astype(np.float32))
    y = jnp.asarray(RNG.standard_normal((8, K)).astype(np.float32))
    return params, x, y


PARAMS, X, Y = _model()


def _loss_fn(p, x, y, scale):
    out = jnp.tanh(x @ p["trunk"]) @ p["heads"]
    return {f"t{i}": scale * jnp.mean((out[:, i] - y[:, i]) ** 2) for i in range(K)}


def _heads_loss(p, z, x, y, scale):
    out = z @ p["heads"]
    return {f"t{i}": scale * jnp.mean((out[:, i] - y[:, i]) ** 2) for i in range(K)}


def _encode(p, x, y, scale):
    return jnp.tanh(x @ p["trunk"])


SHARED = {"trunk": True, "heads": False}


@pytest.mark.parametrize("mode", ["params", pytest.param("features", marks=pytest.mark.slow),
                                  pytest.param("chunked", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", _tiers.methods(_scale_free_names()))
def test_engine_direction_is_scale_free(name, mode):
    """Same shared direction (cos > 0.999) for losses scaled by 1e-20 .. 1e20, float32."""
    m = _method(name)
    if mode == "params":
        fn = jmtl.value_and_mtl_grad(_loss_fn, m, shared=SHARED)
    else:
        fn = jmtl.value_and_mtl_grad(_heads_loss, m, encoder=_encode,
                                     chunk_size=2 if mode == "chunked" else None)
    step = jax.jit(fn)
    state = fn.init(PARAMS, X, Y, jnp.float32(1.0))
    outs = {}
    for scale in (1.0, 1e-20, 1e20):
        _, grads, _ = step(PARAMS, state, X, Y, jnp.float32(scale), key=KEY)
        outs[scale] = np.asarray(grads["trunk"], np.float64)
        assert np.all(np.isfinite(outs[scale])), (name, mode, scale)
    for scale in (1e-20, 1e20):
        assert _cos(outs[scale], outs[1.0]) > 0.999, (name, mode, scale)


# ------------------------------------------------------------- 2. no state poisoning

POISON = ["db_mtl", "dwa", "excess_mtl", "gradnorm", "imtl", "imtl_l", "uw", "famo",
          "moco", "nash_mtl", "stch", "gradvac"]


@pytest.mark.parametrize("bad", ["loss", "gradient"])
@pytest.mark.parametrize("name", _tiers.first_fast(POISON, keep=3))
def test_non_finite_step_leaves_state_unchanged(name, bad):
    m = _method(name)
    step = jax.jit(lambda j, ls, s: jmtl.aggregate(m, j, s, losses=ls, key=KEY))
    state = m.init(K, dim=D)
    _, s1 = step(J0, L0, state)
    j_bad, l_bad = J0.copy(), L0.copy()
    if bad == "loss":
        l_bad[1] = np.nan
    else:
        j_bad[1, 2] = np.nan
    _, s2 = step(j_bad, l_bad, s1)
    needs_it = base.LOSSES in m.needs if bad == "loss" else bool(
        m.needs & {base.GRAMIAN, base.JACOBIAN, base.GRAD_NORMS}) or m.output == "direction"
    if needs_it:
        for a, b in zip(jax.tree_util.tree_leaves(s1._replace(skipped=0)),
                        jax.tree_util.tree_leaves(s2._replace(skipped=0)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(s2.skipped) == int(s1.skipped) + 1
    u3, s3 = step(J0, L0, s2)
    assert np.all(np.isfinite(np.asarray(u3))), name
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(s3))


# ------------------------------------------------------------- 3. checked, both orders


@pytest.mark.parametrize("order", ["checked_jit", "jit_checked"])
@pytest.mark.parametrize("name", _tiers.first_fast(
    ["mgda", "upgrad", "famo", "uw", "pcgrad", "moco", "dwa", "graddrop", "aligned_mtl",
     "gradnorm"], keep=2))
def test_checked_catches_non_finite_inputs_in_both_orders(name, order):
    m = _method(name)
    bad_j, bad_l = J0.copy(), L0.copy()
    if base.LOSSES in m.needs:
        bad_l[0] = np.nan
    else:
        bad_j[0, 0] = np.nan

    def f(j, ls):
        return jmtl.aggregate(m, j, m.init(K, dim=D), losses=ls, key=KEY)[0]

    g = jmtl.checked(jax.jit(f)) if order == "checked_jit" else jax.jit(jmtl.checked(f))
    np.asarray(g(J0, L0))  # fine inputs pass
    with pytest.raises(Exception, match=rf"{name}.*non-finite"):
        np.asarray(g(bad_j, bad_l))


def test_eager_non_finite_input_names_the_task():
    m = jmtl.mgda()
    bad = J0.copy()
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"mgda.*non-finite.*task 2"):
        jmtl.aggregate(m, bad, m.init(K))


# ------------------------------------------------------------- 5. wrong states


STATEFUL = [n for n in jmtl.methods.names()
            if jax.tree_util.tree_leaves(_method(n).init(K, dim=D))]


def _state_shapes(m, k):
    return [np.shape(x) for x in jax.tree_util.tree_leaves(m.init(k, dim=D))]


@pytest.mark.parametrize("name", STATEFUL)
def test_state_for_another_k_or_method_is_a_clear_error(name):
    m = _method(name)
    if _state_shapes(m, K + 1) != _state_shapes(m, K):  # else any K's state is valid
        with pytest.raises(ValueError, match=rf"'{name}'.*state.*expected"):
            jax.jit(lambda j, ls, s: jmtl.aggregate(m, j, s, losses=ls, key=KEY))(
                J0, L0, m.init(K + 1, dim=D))
    other = jmtl.dwa() if name != "dwa" else jmtl.uw()
    with pytest.raises(ValueError, match=rf"'{name}'.*state.*expected"):
        jmtl.aggregate(m, J0, other.init(K, dim=D), losses=L0, key=KEY)


def test_stateless_method_rejects_a_state():
    m = jmtl.upgrad()
    with pytest.raises(ValueError, match=r"'upgrad'.*state.*expected EmptyState"):
        jmtl.aggregate(m, J0, jmtl.dwa().init(K))
    jmtl.aggregate(m, J0, ())  # any empty state is fine


# ------------------------------------------------------------- 6. silent acceptances


def test_present_dict_must_name_the_losses_tasks():
    m = jmtl.uw()
    losses = {"a": 1.0, "b": 2.0, "c": 0.5}
    with pytest.raises(ValueError, match=r"unknown \['z'\], missing \['c'\]"):
        jmtl.aggregate(m, J0, m.init(K), losses=losses,
                       present={"a": True, "b": True, "z": False})


def test_float_present_is_rejected():
    m = jmtl.mean()
    with pytest.raises(ValueError, match="present.*bools"):
        jmtl.aggregate(m, J0, m.init(K), present=jnp.array([1.0, 0.0, 1.0]))
    fn = jmtl.value_and_mtl_grad(_loss_fn, m, shared=SHARED)
    with pytest.raises(ValueError, match="present.*bools"):
        fn(PARAMS, m.init(K), X, Y, 1.0, present=jnp.array([1.0, 0.0, 1.0]))


def test_integer_loss_names_the_task():
    def loss_fn(p, x, y):
        out = _loss_fn(p, x, y, 1.0)
        out["t1"] = jnp.int32(3)
        return out

    fn = jmtl.value_and_mtl_grad(loss_fn, jmtl.mean(), shared=SHARED)
    with pytest.raises(ValueError, match=r"task 't1' is int32"):
        fn(PARAMS, (), X, Y)


@pytest.mark.parametrize("name", jmtl.methods.names())
def test_no_task_gives_a_zero_update(name):
    m = _method(name)
    jac = {"w": jnp.zeros((0, 4)), "b": jnp.zeros((0,))}
    update, _ = jmtl.aggregate(m, jac, (), losses=jnp.zeros((0,)), key=KEY)
    assert update["w"].shape == (4,) and float(jnp.sum(jnp.abs(update["w"]))) == 0.0


def test_return_weights_reconstruct_the_shared_gradient():
    m = jmtl.mgda()
    fn = jmtl.value_and_mtl_grad(_loss_fn, m, shared=SHARED, return_weights=True)
    _, grads, _, weights = jax.jit(fn)(PARAMS, m.init(K), X, Y, 1.0)
    per_task = [jax.grad(lambda p, i=i: _loss_fn(p, X, Y, 1.0)[f"t{i}"])(PARAMS)["trunk"]
                for i in range(K)]
    expected = sum(float(weights[f"t{i}"]) * np.asarray(g, np.float64)
                   for i, g in enumerate(per_task))
    np.testing.assert_allclose(np.asarray(grads["trunk"]), expected, rtol=1e-5, atol=1e-7)
    assert abs(sum(float(w) for w in weights.values()) - 1.0) < 1e-5  # MGDA: simplex
    fn_d = jmtl.value_and_mtl_grad(_loss_fn, jmtl.graddrop(), shared=SHARED,
                                   return_weights=True)
    assert fn_d(PARAMS, (), X, Y, 1.0, key=KEY)[3] is None
