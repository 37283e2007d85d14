"""Same numbers on 1 device and on 4: sharded jit (data parallel and FSDP), shard_map, pmap.

Each test trains the problem of ``_mtl_problem`` for 10 steps on one device with the
whole batch (the reference), then again with the batch (and in one test the
parameters) spread over 4 fake CPU devices, and compares params and method state.

Tolerance: the sharded runs sum the batch in a different order (per-device partial
sums, then an all-reduce), so results agree to float32 rounding, not bit for bit;
the solvers then see Gramians that differ in the last bits. ``rtol=2e-4, atol=2e-5``
over 10 steps covers that with a wide margin and still fails on any real error (a
wrong reduction changes the weights at the percent level).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmtl
from tests import _mtl_problem as prob
from tests import _tiers

STEPS = 10
RTOL, ATOL = 2e-4, 2e-5
METHODS = ["upgrad", "mgda", "nash_mtl", "gradnorm", "dwa", "pcgrad"]


def _method(name):
    return jmtl.methods.get(name)


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                            jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _run(step, params, mstate, x, y, opt, steps=STEPS):
    opt_state = opt.init(params)
    key = jax.random.key(0)
    for i in range(steps):
        params, opt_state, mstate, _ = step(params, opt_state, mstate, x, y,
                                            jax.random.fold_in(key, i))
    return params, mstate


@functools.cache
def _reference(name):
    method = _method(name)
    step, opt = prob.make_step(method)
    params = prob.init_params()
    x, y = prob.make_batch()
    return _run(jax.jit(step), params, prob.method_state(method, params), x, y, opt)


def _mesh():
    return jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("name", _tiers.first_fast(METHODS))
def test_jit_named_sharding_data_parallel(name):
    method = _method(name)
    step, opt = prob.make_step(method)
    mesh = _mesh()
    params = prob.init_params()
    x, y = prob.make_batch()
    batch = NamedSharding(mesh, P("data"))
    x, y = jax.device_put((x, y), batch)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    got = _run(jax.jit(step), params, prob.method_state(method, params), x, y, opt)
    assert got[0]["trunk"]["w1"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 2)
    _assert_trees_close(got, _reference(name))


@pytest.mark.parametrize("name", _tiers.first_fast(["upgrad", "gradnorm", "dwa"]))
def test_jit_fsdp_sharded_params(name):
    """Parameters sharded over the mesh (FSDP style) as well as the batch."""
    method = _method(name)
    step, opt = prob.make_step(method)
    mesh = _mesh()
    params = prob.init_params()
    x, y = prob.make_batch()
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))

    def spec(leaf):
        return P("data") if leaf.ndim >= 1 and leaf.shape[0] % 4 == 0 else P()

    shardings = jax.tree_util.tree_map(lambda a: NamedSharding(mesh, spec(a)), params)
    params = jax.device_put(params, shardings)
    got = _run(jax.jit(step, out_shardings=(shardings, None, None, None)), params,
               prob.method_state(method, params), x, y, opt)
    assert not got[0]["trunk"]["w1"].sharding.is_fully_replicated
    _assert_trees_close(got, _reference(name))


@pytest.mark.parametrize("name", _tiers.first_fast(["upgrad", "nash_mtl", "gradnorm", "dwa"]))
def test_shard_map_axis_name(name):
    """The one line a user adds: ``axis_name="data"`` in value_and_mtl_grad."""
    method = _method(name)
    step, opt = prob.make_step(method, axis_name="data")
    mesh = _mesh()
    sharded_step = jax.jit(jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(), P(), P("data"), P("data"), P()),
        out_specs=(P(), P(), P(), P()), check_vma=False))
    params = prob.init_params()
    x, y = prob.make_batch()
    got = _run(sharded_step, params, prob.method_state(method, params), x, y, opt)
    _assert_trees_close(got, _reference(name))


@pytest.mark.parametrize("name", _tiers.first_fast(["upgrad", "gradnorm"]))
def test_pmap_axis_name(name):
    method = _method(name)
    step, opt = prob.make_step(method, axis_name="data")
    pstep = jax.pmap(step, axis_name="data", in_axes=(None, None, None, 0, 0, None),
                     out_axes=None)
    params = prob.init_params()
    x, y = prob.make_batch()
    shard = lambda a: a.reshape(4, a.shape[0] // 4, *a.shape[1:])  # noqa: E731
    x, y = shard(x), jax.tree_util.tree_map(shard, y)
    got = _run(pstep, params, prob.method_state(method, params), x, y, opt)
    _assert_trees_close(got, _reference(name))


def test_sharded_gramian_method_state_is_float32_and_replicated():
    method = _method("gradnorm")
    step, opt = prob.make_step(method)
    mesh = _mesh()
    params = jax.device_put(prob.init_params(), NamedSharding(mesh, P()))
    x, y = jax.device_put(prob.make_batch(), NamedSharding(mesh, P("data")))
    _, mstate = _run(jax.jit(step), params, prob.method_state(method, params), x, y, opt, 2)
    assert mstate.weights.dtype == jnp.float32
    np.testing.assert_allclose(float(jnp.sum(mstate.weights)), len(prob.TASKS), rtol=1e-5)
