"""``value_and_mtl_grad`` under ``jax.pmap`` and ``jax.shard_map`` equals one device.

The batch is split over the 4 fake CPU devices of ``tests/conftest.py``; each replica's
loss is its shard's mean, so the whole-batch loss is the mean of the replicas' losses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jmtl
from jmtl.engine import value_and_mtl_grad
from jmtl.methods import base
from tests import _tiers

K, NAMES, BATCH, NDEV = 3, ("a", "b", "c"), 8, 4


def make_params():
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    return {"trunk": {"w": jax.random.normal(ks[0], (4, 6)) / 2, "b": jnp.full((6,), 0.1)},
            "heads": {n: jax.random.normal(ks[2 + i], (6,)) for i, n in enumerate(NAMES)}}


def make_batch():
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    return jax.random.normal(kx, (BATCH, 4)), jax.random.normal(ky, (BATCH, K))


def encode(p, x, y):
    return jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])


def heads_loss(p, z, x, y):
    return {n: jnp.mean((z @ p["heads"][n] - y[:, i]) ** 2) + 0.1 for i, n in enumerate(NAMES)}


def loss_fn(p, x, y):
    return heads_loss(p, encode(p, x, y), x, y)


class Seen(NamedTuple):
    gram: jax.Array
    flat_sq: jax.Array


def probe_direction():
    """A non-linear aggregator whose state records the Gramian and the rows' norms."""
    def init(num_tasks, dim=None):
        return Seen(jnp.zeros((num_tasks, num_tasks)), jnp.zeros(num_tasks))

    def update(inp, state):
        rows = inp.jacobian
        w = inp.present * (1.0 + jnp.diag(inp.gramian) / (jnp.trace(inp.gramian) + 1.0))
        return jnp.sum(w[:, None] * rows * jnp.tanh(10.0 * rows), 0), Seen(
            inp.gramian, jnp.sum(rows ** 2, 1))

    return base.Method(name="probe_direction", init=init, update=update,
                       needs=frozenset({base.GRAMIAN, base.JACOBIAN}), output="direction",
                       weights_task_specific=False)


def gramian_method_name():
    names = jmtl.methods.names()
    for n in ("upgrad", "mgda", "imtl_g"):
        if n in names:
            return n
    return "mean"


METHODS = ["ew", gramian_method_name(), "probe_direction"]


def build(name):
    return probe_direction() if name == "probe_direction" else jmtl.methods.get(name)


def grad_fn_for(method, mode, axis_name=None):
    if mode == "params":
        return value_and_mtl_grad(loss_fn, method, shared={"trunk": True, "heads": False},
                                  axis_name=axis_name)
    return value_and_mtl_grad(heads_loss, method, encoder=encode, axis_name=axis_name)


def assert_tree_close(actual, expected, rtol=1e-4):
    la, ta = jax.tree_util.tree_flatten(actual)
    le, te = jax.tree_util.tree_flatten(expected)
    assert ta == te
    for i, (a, e) in enumerate(zip(la, le, strict=True)):
        e64 = np.asarray(e, np.float64)
        scale = max(float(np.max(np.abs(e64), initial=0.0)), 1e-6)
        np.testing.assert_allclose(np.asarray(a, np.float64), e64, rtol=rtol,
                                   atol=rtol * scale, err_msg=f"leaf {i}")


@pytest.mark.parametrize("mode", ["params", "features"])
@pytest.mark.parametrize("name", _tiers.first_fast(METHODS))
def test_pmap_equals_single_device(name, mode):
    method = build(name)
    params, (x, y) = make_params(), make_batch()
    state0 = method.init(K, dim=24 + 6 if mode == "params" else BATCH * 6)
    key = jax.random.PRNGKey(3)
    single = jax.jit(grad_fn_for(method, mode))(params, state0, x, y, key=key)
    par_fn = grad_fn_for(method, mode, axis_name="dev")
    out = jax.pmap(lambda p, s, xs, ys: par_fn(p, s, xs, ys, key=key), axis_name="dev",
                   in_axes=(None, None, 0, 0))(
        params, state0, x.reshape(NDEV, -1, 4), y.reshape(NDEV, -1, K))
    for r in range(NDEV):
        assert_tree_close(jax.tree_util.tree_map(lambda a, r=r: a[r], out), single)


@pytest.mark.parametrize("mode", ["params", "features"])
@pytest.mark.parametrize("name", _tiers.first_fast(METHODS))
def test_shard_map_equals_single_device(name, mode):
    method = build(name)
    params, (x, y) = make_params(), make_batch()
    state0 = method.init(K, dim=24 + 6 if mode == "params" else BATCH * 6)
    key = jax.random.PRNGKey(4)
    present = jnp.array([True, False, True])
    single = jax.jit(grad_fn_for(method, mode))(params, state0, x, y, key=key,
                                                present=present)
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("dev",))
    par_fn = grad_fn_for(method, mode, axis_name="dev")
    sharded = jax.jit(jax.shard_map(
        lambda p, s, xs, ys: par_fn(p, s, xs, ys, key=key, present=present), mesh=mesh,
        in_specs=(P(), P(), P("dev"), P("dev")), out_specs=P()))
    out = sharded(params, state0, x, y)
    assert_tree_close(out, single)
