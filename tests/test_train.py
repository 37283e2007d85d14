"""Tests for jmtl.train.make_train_step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jmtl
from jmtl import losses, optim
from jmtl.engine import value_and_mtl_grad
from jmtl.train import TrainState, make_train_step

N_DEV = 4


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"trunk": jax.random.normal(k[0], (4, 8)) * 0.5,
            "heads": {"cls": jax.random.normal(k[1], (8, 3)) * 0.5,
                      "reg": jax.random.normal(k[2], (8,)) * 0.5}}


def apply_fn(p, x):
    h = jnp.tanh(x @ p["trunk"])
    return {"cls": h @ p["heads"]["cls"], "reg": h @ p["heads"]["reg"]}


def encode(p, x):
    return jnp.tanh(x @ p["trunk"])


def heads(p, z):
    return {"cls": z @ p["heads"]["cls"], "reg": z @ p["heads"]["reg"]}


def _batch(n=16, seed=1):
    x = jax.random.normal(jax.random.key(seed), (n, 4))
    y = {"cls": (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0), "reg": x[:, 2] - x[:, 3]}
    return x, y


TASK_LOSSES = {"cls": losses.masked_cross_entropy, "reg": losses.masked_mse}


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _tree_close(a, b, rtol=1e-5, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _gradient_method():
    for name in ("upgrad", "mgda", "pcgrad", "mean"):
        if name in jmtl.methods.names():
            return jmtl.methods.get(name)


# ----------------------------------------------------------------------------- apply fn


def test_a_few_steps_lower_the_loss():
    x, y = _batch(64)
    step = make_train_step(apply_fn, TASK_LOSSES, jmtl.methods.get("mean"), optax.adam(3e-2),
                           params=_params(), shared="trunk")
    state = step.init(x, y)
    jstep = jax.jit(step)
    first = None
    for _ in range(30):
        state, metrics = jstep(state, x, y)
        first = metrics["losses"] if first is None else first
    assert int(state.step) == 30
    for t in ("cls", "reg"):
        assert float(metrics["losses"][t]) < 0.8 * float(first[t]), t


@pytest.mark.parametrize("method_name,use_jit", [("dwa", False), ("pcgrad", True)])
def test_step_equals_hand_composed_step(method_name, use_jit):
    method = jmtl.methods.get(method_name)
    x, y = _batch()
    masks = {"reg": jnp.arange(16) % 3 != 0}
    tx = optax.adam(1e-2)
    step = make_train_step(apply_fn, TASK_LOSSES, method, tx, params=_params(),
                           shared="trunk")
    state = step.init(x, y, masks)

    # Hand-composed: the user's own loss function, value_and_mtl_grad and optax.
    def loss_fn(p, x, y, m):
        out = apply_fn(p, x)
        return {"cls": losses.masked_cross_entropy(out["cls"], y["cls"]),
                "reg": losses.masked_mse(out["reg"], y["reg"], m)}

    grad_fn = value_and_mtl_grad(loss_fn, method, shared={"trunk": True, "heads": False})

    def hand_step(params, opt_state, mstate, key):
        ls, grads, mstate = grad_fn(params, mstate, x, y, masks["reg"], key=key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mstate, ls

    params, opt_state, mstate = _params(), tx.init(_params()), method.init(2)
    run, hand = (jax.jit(step), jax.jit(hand_step)) if use_jit else (step, hand_step)
    for i in range(3):
        key = jax.random.key(i)
        state, metrics = run(state, x, y, masks, key=key)
        params, opt_state, mstate, ls = hand(params, opt_state, mstate, key)
        # Op by op the two are the same float operations: bit-identical. Under jit the
        # step's extra metrics may change XLA's fusions by an ulp.
        same = _tree_equal if not use_jit else (
            lambda a, b: _tree_close(a, b, rtol=1e-6, atol=1e-7))
        same(state.params, params)
        same(state.opt_state, opt_state)
        same(state.method_state, mstate)
        same(metrics["losses"], ls)


def test_traced_once_over_several_steps():
    traces = []

    def counting_apply(p, x):
        traces.append(1)
        return apply_fn(p, x)

    x, y = _batch()
    step = make_train_step(counting_apply, TASK_LOSSES, _gradient_method(), optax.sgd(0.1),
                           params=_params(), shared="trunk")
    state = step.init(x, y)
    jstep = jax.jit(step)
    state, _ = jstep(state, x, y, key=jax.random.key(0))
    n = len(traces)
    for i in range(4):
        x2, y2 = _batch(seed=10 + i)
        state, _ = jstep(state, x2, y2, key=jax.random.key(i))
    assert len(traces) == n
    assert jstep._cache_size() == 1


def test_partially_labelled_batch_and_absent_task():
    x, y = _batch()
    masks = {"reg": jnp.zeros(16, bool), "cls": jnp.arange(16) < 4}
    y = dict(y, reg=jnp.full(16, jnp.nan))  # unlabelled targets may be anything
    step = make_train_step(apply_fn, TASK_LOSSES, jmtl.methods.get("mean"), optax.sgd(0.1),
                           params=_params(), shared="trunk")
    state = step.init(x, y, masks)
    new, metrics = jax.jit(step)(state, x, y, masks)
    assert {t: bool(v) for t, v in metrics["present"].items()} == {"cls": True, "reg": False}
    assert float(metrics["losses"]["reg"]) == 0.0
    for leaf in jax.tree.leaves(new.params):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # The absent task's head gets no gradient: SGD leaves it bit-identical.
    _tree_equal(new.params["heads"]["reg"], state.params["heads"]["reg"])
    # The trunk moves by the cls gradient on the 4 labelled examples only (mean: w = 1).
    g = jax.grad(lambda p: losses.masked_cross_entropy(apply_fn(p, x[:4])["cls"], y["cls"][:4]))(
        state.params)
    np.testing.assert_allclose(np.asarray(new.params["trunk"]),
                               np.asarray(state.params["trunk"] - 0.1 * g["trunk"]),
                               rtol=1e-5, atol=1e-6)


def test_features_mode_equals_hand_composed():
    method = _gradient_method()
    x, y = _batch()
    tx = optax.sgd(0.1)
    step = make_train_step(apply_fn, TASK_LOSSES, method, tx, params=_params(),
                           encoder=encode, heads=heads)
    state = step.init(x, y)
    state1, _ = step(state, x, y, key=jax.random.key(0))

    def heads_loss(p, z, x, y):
        out = heads(p, z)
        return {"cls": losses.masked_cross_entropy(out["cls"], y["cls"]),
                "reg": losses.masked_mse(out["reg"], y["reg"])}

    grad_fn = value_and_mtl_grad(heads_loss, method, encoder=lambda p, x, y: encode(p, x))
    _, grads, _ = grad_fn(_params(), method.init(2), x, y, key=jax.random.key(0))
    expected = optax.apply_updates(_params(), tx.update(grads, tx.init(_params()))[0])
    _tree_equal(state1.params, expected)
    with pytest.raises(ValueError, match="both `encoder` and `heads`"):
        make_train_step(apply_fn, TASK_LOSSES, method, tx, params=_params(), encoder=encode)


@pytest.mark.slow
def test_shard_map_with_axis_name_equals_single_device():
    method = _gradient_method()
    x, y = _batch(4 * N_DEV)
    tx = optax.sgd(0.1)
    kw = dict(params=_params(), shared="trunk")
    single = make_train_step(apply_fn, TASK_LOSSES, method, tx, **kw)
    sharded = make_train_step(apply_fn, TASK_LOSSES, method, tx, axis_name="d", **kw)
    state = single.init(x, y)
    key = jax.random.key(0)
    want, want_m = jax.jit(single)(state, x, y, key=key)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:N_DEV]), ("d",))
    f = jax.jit(jax.shard_map(lambda s, x, y, k: sharded(s, x, y, key=k), mesh=mesh,
                              in_specs=(P(), P("d"), P("d"), P()), out_specs=P(),
                              check_vma=False))
    got, got_m = f(state, x, y, key)
    _tree_close(got.params, want.params)
    _tree_close(got_m["losses"], want_m["losses"])


def test_task_mismatch_errors():
    x, y = _batch()
    step = make_train_step(apply_fn, {"cls": TASK_LOSSES["cls"]}, jmtl.methods.get("mean"),
                           optax.sgd(0.1), params=_params())
    with pytest.raises(ValueError, match=r"missing \[\] and has extra \['reg'\]"):
        step.init(x, y)
    mse = lambda p, t: jnp.mean((p - t) ** 2)
    step = make_train_step(apply_fn, {"cls": TASK_LOSSES["cls"], "reg": mse},
                           jmtl.methods.get("mean"), optax.sgd(0.1), params=_params())
    with pytest.raises(ValueError, match="task 'reg' has a label mask"):
        step.init(x, y, {"reg": jnp.ones(16, bool)})
    with pytest.raises(ValueError, match="needs `params=`"):
        make_train_step(apply_fn, TASK_LOSSES, jmtl.methods.get("mean"), optax.sgd(0.1))


# ----------------------------------------------------------------------------- NNX


class Net(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.heads = nnx.Dict({"cls": nnx.Linear(8, 3, rngs=rngs),
                               "reg": nnx.Linear(8, 1, rngs=rngs)})

    def encode(self, x):
        return nnx.tanh(self.bn(self.trunk(x)))

    def predict(self, z):
        return {"cls": self.heads["cls"](z), "reg": self.heads["reg"](z)[:, 0]}

    def __call__(self, x):
        return self.predict(self.encode(x))


def test_nnx_step_equals_hand_composed_and_updates_batch_stats():
    method = _gradient_method()
    x, y = _batch(32)
    model = Net(nnx.Rngs(0))
    labels = optim.label_tree(model, {"trunk": "trunk", "bn": "trunk", "heads": "heads"})
    tx = optim.partitioned_lr(optax.sgd, {"trunk": 0.05, "heads": 0.2}, labels)
    step = make_train_step(model, TASK_LOSSES, method, tx, shared=["trunk", "bn"])
    state = step.init(x, y)
    assert isinstance(state, TrainState)
    state1, metrics = jax.jit(step)(state, x, y, key=jax.random.key(0))

    # Hand-composed with the functional NNX API.
    graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def loss_fn(p, x, y):
        m = nnx.merge(graphdef, p, rest)
        out = m(x)
        return ({"cls": losses.masked_cross_entropy(out["cls"], y["cls"]),
                 "reg": losses.masked_mse(out["reg"], y["reg"])},
                nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param))))

    shared = lambda path, leaf: path.startswith(("trunk/", "bn/"))
    grad_fn = value_and_mtl_grad(loss_fn, method, shared=shared, has_aux=True)

    @jax.jit
    def hand(params):
        (ls, new_rest), grads, _ = grad_fn(params, method.init(2), x, y, key=jax.random.key(0))
        upd, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, upd), new_rest, ls

    params1, rest1, ls = hand(params)
    _tree_close(state1.params, params1, rtol=1e-6, atol=1e-7)
    _tree_close(state1.model_state["bn"], rest1["bn"], rtol=1e-6, atol=1e-7)
    _tree_close(metrics["losses"], ls, rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(state1.model_state["bn"]["mean"]), 0.0)
    # step.model gives a live module holding the new parameters.
    trained = step.model(state1)
    np.testing.assert_array_equal(np.asarray(trained.heads["cls"].kernel[...]),
                                  np.asarray(state1.params["heads"]["cls"]["kernel"]))


def test_nnx_features_mode_lowers_the_loss():
    x, y = _batch(64)
    model = Net(nnx.Rngs(1))
    step = make_train_step(model, TASK_LOSSES, _gradient_method(), optax.adam(3e-2),
                           encoder=lambda m, x: m.encode(x), heads=lambda m, z: m.predict(z))
    state = step.init(x, y, key=jax.random.key(5))
    jstep = jax.jit(step)
    first = None
    for _ in range(25):
        state, metrics = jstep(state, x, y)
        first = metrics["loss"] if first is None else first
    assert float(metrics["loss"]) < 0.7 * float(first)


def test_metrics_hold_the_weights_that_build_the_shared_gradient():
    x, y = _batch()
    m = jmtl.mgda()
    step = make_train_step(apply_fn, TASK_LOSSES, m, optax.sgd(1.0), params=_params(),
                           shared=lambda path, leaf: path.startswith("trunk"))
    state = step.init(x, y)
    new, metrics = jax.jit(step)(state, x, y)
    w = metrics["weights"]
    assert sorted(w) == ["cls", "reg"]
    per_task = {t: jax.grad(lambda p, t=t: TASK_LOSSES[t](apply_fn(p, x)[t], y[t]))(
        state.params)["trunk"] for t in w}
    expected = sum(float(w[t]) * np.asarray(per_task[t], np.float64) for t in w)
    # SGD with rate 1: the trunk moved by minus the shared gradient.
    np.testing.assert_allclose(np.asarray(state.params["trunk"] - new.params["trunk"]),
                               expected, rtol=1e-4, atol=1e-6)
