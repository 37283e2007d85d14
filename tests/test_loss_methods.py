"""Loss-based weighting methods (uw, dwa, rlw, gls, si, famo, stch), the fixed methods,
the method registry and the jmtl.tasks helpers.

Every method is checked against an independent float64 numpy reimplementation written
from the papers' formulas, over several steps for the stateful ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import jmtl
from jmtl import tasks
from jmtl.methods import Inputs
from jmtl.methods import famo as famo_mod

LOSS_METHODS = ("uw", "dwa", "rlw", "gls", "si", "famo", "stch")
DETERMINISTIC = ("uw", "dwa", "gls", "si", "famo", "stch")


_JITTED = {}


def _jitted(method):
    """One compiled update per method configuration (keeps hypothesis tests fast)."""
    key = (method.name, method.hparams)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(method.update)
    return _JITTED[key]


def _run(method, losses_seq, present_seq=None, key=None, jit=False):
    """Weights and states of `method` over a sequence of loss vectors."""
    k = len(losses_seq[0])
    state = method.init(k)
    update = _jitted(method) if jit else method.update
    ws, states = [], []
    for t, losses in enumerate(losses_seq):
        present = np.ones(k, bool) if present_seq is None else np.asarray(present_seq[t])
        kt = None if key is None else jax.random.fold_in(key, t)
        w, state = update(Inputs(present=jnp.asarray(present),
                                 losses=jnp.asarray(losses, jnp.float32), key=kt), state)
        ws.append(np.asarray(w))
        states.append(state)
    return np.stack(ws), states


def _losses(seed, steps=6, k=3, lo=0.1, hi=5.0):
    rng = np.random.default_rng(seed)
    return rng.uniform(lo, hi, (steps, k))


def _softmax(x, mask=None):
    x = np.asarray(x, np.float64)
    mask = np.ones(x.shape, bool) if mask is None else mask
    if not mask.any():
        return np.zeros(x.shape)
    e = np.exp(np.where(mask, x - x[mask].max(), -np.inf))
    return e / e.sum()


# ----------------------------------------------------------------------------- references


class NpAdam:
    """float64 numpy Adam (PyTorch/optax constants) on ``(K,)`` parameters, written from
    Kingma & Ba (2015): per-task moments frozen for masked-out tasks, one shared step
    counter that advances when some task is updated; optional coupled L2 decay and
    element-wise gradient clipping (``optax.clip``)."""

    def __init__(self, k, lr, decay=0.0, clip=None):
        self.m, self.v, self.t = np.zeros(k), np.zeros(k), 0
        self.lr, self.decay, self.clip = lr, decay, clip

    def step(self, x, g, valid):
        if not valid.any():
            return x
        self.t += 1
        g = g + self.decay * x
        if self.clip is not None:
            g = np.clip(g, -self.clip, self.clip)
        m = 0.9 * self.m + 0.1 * g
        v = 0.999 * self.v + 0.001 * g * g
        self.m, self.v = np.where(valid, m, self.m), np.where(valid, v, self.v)
        mh = self.m / (1 - 0.9 ** self.t)
        vh = self.v / (1 - 0.999 ** self.t)
        return np.where(valid, x - self.lr * mh / (np.sqrt(vh) + 1e-8), x)


def ref_uw(losses_seq, present_seq, lr, kind):
    """UW with its default optimizer: Adam(lr) on the gradient clipped to [-1, 1]."""
    k = losses_seq.shape[1]
    s = np.zeros(k)
    adam = NpAdam(k, lr, clip=1.0)
    out = []
    for L, p in zip(losses_seq, present_seq, strict=True):
        a = 1.0 if kind in ("log_variance", "classification") else 0.5
        out.append(np.where(p, a * np.exp(-s), 0.0))
        e = np.exp(-s) * L
        g = {"log_variance": 1 - e, "regression": 0.5 - 0.5 * e, "classification": 0.5 - e,
             "revised": 1 / (1 + np.exp(-s)) - 0.5 * e}[kind]
        s = adam.step(s, g, p)
    return np.stack(out), s


def ref_dwa(losses_seq, present_seq, T, period):
    k = losses_seq.shape[1]
    hist = [[] for _ in range(k)]
    acc = [[] for _ in range(k)]
    out = []
    for t, (L, p) in enumerate(zip(losses_seq, present_seq, strict=True)):
        r = np.array([hist[i][-1] / hist[i][-2] if len(hist[i]) >= 2 else 1.0
                      for i in range(k)])
        w = p.sum() * _softmax(r / T, p)
        out.append(np.where(p, w, 0.0))
        for i in range(k):
            if p[i]:
                acc[i].append(L[i])
        if (t + 1) % period == 0:
            for i in range(k):
                if acc[i]:
                    hist[i].append(np.mean(acc[i]))
                acc[i] = []
    return np.stack(out)


def ref_gls(L, p):
    logg = np.log(L[p]).mean()
    return np.where(p, np.exp(logg) / (p.sum() * np.where(p, L, 1.0)), 0.0)


def ref_si(L, p):
    return np.where(p, 1.0 / np.where(p, L, 1.0), 0.0)


class RefFAMO:
    """numpy FAMO: logits, torch-style Adam with coupled weight decay (official code)."""

    def __init__(self, k, gamma=1e-3, lr=0.025, eps=1e-8):
        self.xi = np.zeros(k)
        self.adam = NpAdam(k, lr, decay=gamma)
        self.prev = None
        self.prev_p = np.zeros(k, bool)
        self.eps = eps

    def _adam(self, delta, valid):
        z = _softmax(self.xi, valid) if valid.any() else np.zeros_like(self.xi)
        g = z * (delta - np.sum(z * delta))
        self.xi = self.adam.step(self.xi, g, valid)

    def step(self, L, p):
        if self.prev is not None:
            valid = self.prev_p & p
            self._adam(np.where(valid, np.log(self.prev + self.eps) - np.log(L + self.eps), 0),
                       valid)
        z = _softmax(self.xi, p)
        D = L + self.eps
        c = np.sum(np.where(p, z / D, 0.0))
        w = np.where(p, z / D / c, 0.0)
        self.prev = np.where(p, L, self.prev if self.prev is not None else 1.0)
        self.prev_p = p.copy()
        return w

    def observe(self, L_after):
        valid = self.prev_p.copy()
        self._adam(np.where(valid, np.log(self.prev + self.eps) - np.log(L_after + self.eps),
                            0), valid)
        self.prev_p[:] = False


def ref_stch(losses_seq, present_seq, mu, pref, warmup, nadir_steps):
    k = losses_seq.shape[1]
    lam = np.ones(k) if pref is None else np.asarray(pref, np.float64)
    rec = [[] for _ in range(k)]
    out = []
    for t, (L, p) in enumerate(zip(losses_seq, present_seq, strict=True)):
        for i in range(k):
            if p[i] and (warmup <= t < warmup + nadir_steps or
                         (t >= warmup + nadir_steps and not rec[i])):
                rec[i].append(L[i])
        if t < warmup + nadir_steps:
            out.append(np.where(p, 1.0 / L, 0.0))
            continue
        nadir = np.array([np.mean(r) if r else 1.0 for r in rec])
        f = lam * np.log(L / nadir) / mu
        sm = _softmax(f, p)
        out.append(np.where(p, p.sum() * lam * sm / L, 0.0))
    return np.stack(out)


# ----------------------------------------------------------------------------- reference tests


@pytest.mark.parametrize("kind", ["log_variance", "regression", "classification", "revised"])
def test_uw_reference(kind):
    L = _losses(0, steps=8)
    p = np.ones(L.shape, bool)
    p[3, 1] = False
    ws, states = _run(jmtl.uw(lr=0.1, kind=kind), L, p)
    want, s_final = ref_uw(L, p, 0.1, kind)
    np.testing.assert_allclose(ws, want, rtol=1e-5)
    np.testing.assert_allclose(states[-1].log_vars, s_final, rtol=1e-5, atol=1e-6)


def test_uw_fixed_point_is_inverse_loss():
    m = jmtl.uw()
    L = np.tile([[0.5, 4.0]], (600, 1))
    ws, _ = _run(m, L, jit=True)
    np.testing.assert_allclose(ws[-1], 1 / L[0], rtol=1e-3)


@pytest.mark.parametrize("period", [1, 3])
def test_dwa_reference(period):
    L = _losses(1, steps=12)
    p = np.ones(L.shape, bool)
    p[5, 0] = p[6, 2] = False
    ws, _ = _run(jmtl.dwa(T=2.0, period=period), L, p)
    np.testing.assert_allclose(ws, ref_dwa(L, p, 2.0, period), rtol=1e-5)
    # the first two periods have weight 1
    np.testing.assert_allclose(ws[: 2 * period][p[: 2 * period]], 1.0)


def test_rlw_reference():
    key = jax.random.key(3)
    L = _losses(2, steps=4, k=4)
    p = np.ones(L.shape, bool)
    p[2, 1] = False
    ws, _ = _run(jmtl.rlw(), L, p, key=key)
    for t in range(len(L)):
        draw = np.asarray(jax.random.normal(jax.random.fold_in(key, t), (4,)), np.float64)
        np.testing.assert_allclose(ws[t], np.where(p[t], _softmax(draw, p[t]), 0.0),
                                   rtol=1e-5)
    assert np.allclose(ws.sum(1), 1.0, atol=1e-6)
    # different keys give different weights
    assert not np.allclose(ws[0], ws[1])


def test_rlw_weights_distribution():
    # mean of softmax(N(0, I)) is uniform by symmetry
    m = jmtl.rlw()
    keys = jax.random.split(jax.random.key(0), 2000)
    f = jax.vmap(lambda kk: m.update(Inputs(jnp.ones(3, bool), jnp.ones(3), key=kk),
                                     m.init(3))[0])
    w = np.asarray(f(keys))
    np.testing.assert_allclose(w.mean(0), 1 / 3, atol=0.02)


@pytest.mark.parametrize("name,ref", [("gls", ref_gls), ("si", ref_si)])
def test_log_methods_reference(name, ref):
    L = _losses(4, steps=5, k=4, lo=1e-3, hi=1e3)
    p = np.ones(L.shape, bool)
    p[1, 2] = p[3, 0] = False
    ws, _ = _run(jmtl.methods.get(name), L, p)
    for t in range(len(L)):
        np.testing.assert_allclose(ws[t], ref(L[t], p[t]), rtol=1e-5)


def test_gls_weights_are_gradient_of_geometric_mean():
    L = jnp.array([0.3, 2.0, 11.0])
    w, _ = jmtl.gls().update(Inputs(jnp.ones(3, bool), L), jmtl.gls().init(3))
    np.testing.assert_allclose(w, jax.grad(jmtl.objectives.geometric_mean)(L), rtol=1e-5)
    w, _ = jmtl.si().update(Inputs(jnp.ones(3, bool), L), jmtl.si().init(3))
    np.testing.assert_allclose(w, jax.grad(jmtl.objectives.log_sum)(L), rtol=1e-6)


def test_famo_reference_next_step_mode():
    L = _losses(5, steps=10, k=3)
    p = np.ones(L.shape, bool)
    p[4, 1] = False
    ws, states = _run(jmtl.famo(), L, p)
    ref = RefFAMO(3)
    want = np.stack([ref.step(L[t], p[t]) for t in range(len(L))])
    np.testing.assert_allclose(ws, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(states[-1].logits, ref.xi, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ws.sum(1), 1.0, rtol=1e-5)


def test_famo_reference_observe_mode():
    m = jmtl.famo(gamma=1e-2, w_lr=0.1)
    L = _losses(6, steps=6, k=3)
    after = L * 0.9 + np.array([0.0, 0.2, -0.05])
    ref = RefFAMO(3, gamma=1e-2, lr=0.1)
    state = m.init(3)
    observe = jax.jit(famo_mod.observe, static_argnums=0)
    for t in range(len(L)):
        w, state = m.update(Inputs(jnp.ones(3, bool), jnp.asarray(L[t], jnp.float32)), state)
        np.testing.assert_allclose(w, ref.step(L[t], np.ones(3, bool)), rtol=1e-4)
        state = observe(m, state, jnp.asarray(after[t], jnp.float32))
        ref.observe(after[t])
        np.testing.assert_allclose(state.logits, ref.xi, rtol=1e-4, atol=1e-7)
        assert not np.any(state.pending)


def test_famo_favours_stalled_task():
    # task 0 improves every step, task 1 does not: the logit of task 1 must grow
    m = jmtl.famo()
    L = np.stack([np.array([1.0 * 0.9**t, 1.0]) for t in range(30)])
    _, states = _run(m, L, jit=True)
    assert states[-1].logits[1] > states[-1].logits[0]


def test_famo_observe_errors():
    with pytest.raises(ValueError, match="jmtl.famo"):
        famo_mod.observe(jmtl.ew(), jmtl.famo().init(2), jnp.ones(2))
    m = jmtl.famo()
    with pytest.raises(ValueError, match="famo: `losses_after` has 3 tasks"):
        famo_mod.observe(m, m.init(2), jnp.ones(3))


@pytest.mark.parametrize("warmup,nadir_steps,pref", [(0, 1, None), (2, 3, None),
                                                     (1, 2, (1.0, 2.0, 0.5)), (0, 0, None)])
def test_stch_reference(warmup, nadir_steps, pref):
    L = _losses(7, steps=10, k=3)
    p = np.ones(L.shape, bool)
    p[1, 2] = p[7, 0] = False
    ws, _ = _run(jmtl.stch(mu=0.5, preference=pref, warmup_steps=warmup,
                           nadir_steps=nadir_steps), L, p)
    np.testing.assert_allclose(ws, ref_stch(L, p, 0.5, pref, warmup, nadir_steps), rtol=1e-4)


def test_stch_small_mu_approaches_tchebycheff():
    # as mu -> 0 all the weight goes to the task with the largest normalised log-loss
    m = jmtl.stch(mu=1e-3)
    L = np.array([[1.0, 1.0, 1.0], [0.5, 0.9, 0.2]])
    ws, _ = _run(m, L)
    wl = ws[-1] * L[-1]  # weights on the log-losses
    np.testing.assert_allclose(wl, [0.0, 3.0, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------- common checks


def _method(name):
    if name == "uw":
        return jmtl.uw(lr=0.1)
    return jmtl.methods.get(name)


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_metadata(name):
    m = _method(name)
    assert m.name == name
    assert jmtl.methods.base.LOSSES in m.needs
    assert (jmtl.methods.base.KEY in m.needs) == (name == "rlw")
    assert m.weights_task_specific and m.output == "weights"
    assert name in jmtl.methods.names()
    assert getattr(jmtl, name) is jmtl.methods.factory(name)


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_jit_equals_eager(name):
    L = _losses(8, steps=7, k=3)
    p = np.ones(L.shape, bool)
    p[2, 1] = False
    key = jax.random.key(1)
    w1, s1 = _run(_method(name), L, p, key=key)
    w2, s2 = _run(_method(name), L, p, key=key, jit=True)
    np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-7)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           s1[-1], s2[-1])


@pytest.mark.parametrize("name", LOSS_METHODS)
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_degenerate_finite(name, scale):
    key = jax.random.key(0)
    L = _losses(9, steps=5, k=3) * scale
    ws, states = _run(_method(name), L, key=key, jit=True)
    assert np.all(np.isfinite(ws)) and np.all(ws >= 0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(states))
    # one task
    ws, _ = _run(_method(name), L[:, :1], key=key)
    assert np.all(np.isfinite(ws))
    # duplicated tasks get equal weights (deterministic methods)
    if name != "rlw":
        Ld = np.repeat(L[:, :1], 3, axis=1)
        ws, _ = _run(_method(name), Ld)
        np.testing.assert_allclose(ws, ws[:, :1].repeat(3, 1), rtol=1e-6)


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_mixed_scales_finite(name):
    L = np.array([[1e-30, 1.0, 1e30]] * 4) * np.array([[1.0], [0.5], [2.0], [1.0]])
    ws, _ = _run(_method(name), L, key=jax.random.key(0))
    assert np.all(np.isfinite(ws))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permutation_equivariance(name):
    L = _losses(10, steps=6, k=4)
    p = np.ones(L.shape, bool)
    p[2, 3] = False
    perm = np.array([2, 0, 3, 1])
    ws, _ = _run(_method(name), L, p)
    wp, _ = _run(_method(name), L[:, perm], p[:, perm])
    np.testing.assert_allclose(wp, ws[:, perm], rtol=1e-5, atol=1e-7)


def test_permutation_of_task_names_through_aggregate():
    # renaming tasks so that their sorted order changes permutes the weights
    m = jmtl.gls()
    jac = {"a": jnp.eye(3)}
    l1 = {"x": 1.0, "y": 2.0, "z": 4.0}
    l2 = {"c": 1.0, "b": 2.0, "a": 4.0}  # same values, reversed stacking order
    u1, _ = jmtl.aggregate(m, jnp.eye(3), m.init(3), losses=l1)
    u2, _ = jmtl.aggregate(m, jac["a"], m.init(3), losses=l2)
    np.testing.assert_allclose(np.asarray(u2), np.asarray(u1)[::-1], rtol=1e-6)


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_absent_task(name):
    L = _losses(11, steps=6, k=3)
    p = np.ones(L.shape, bool)
    p[3:, 1] = False  # task 1 absent from step 3 on
    L = L.copy()
    L[3:, 1] = np.nan  # what a masked mean over no labels gives
    ws, states = _run(_method(name), L, p, key=jax.random.key(0))
    assert np.all(np.isfinite(ws))
    np.testing.assert_array_equal(ws[3:, 1], 0.0)
    # statistics of the absent task are frozen from step 3 on
    for st_a, st_b in zip(states[2:-1], states[3:], strict=True):
        for a, b in zip(jax.tree_util.tree_leaves(st_a), jax.tree_util.tree_leaves(st_b),
                        strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim == 1 and a.shape[0] == 3 and a.dtype != bool:
                assert a[1] == b[1]
        assert all(np.all(np.isfinite(np.asarray(x)))
                   for x in jax.tree_util.tree_leaves(st_b))
    # every task absent: all weights 0, finite
    ws, _ = _run(_method(name), L[:2], np.zeros((2, 3), bool), key=jax.random.key(0))
    np.testing.assert_array_equal(ws, 0.0)


@pytest.mark.parametrize("name", ["gls", "si", "stch"])
def test_nonpositive_losses_rejected(name):
    m = jmtl.methods.get(name)
    with pytest.raises(ValueError, match=rf"{name}: losses must be positive.*task 1"):
        jmtl.aggregate(m, jnp.eye(2), m.init(2), losses=jnp.array([1.0, -1.0]))
    # an absent task's loss is not checked
    jmtl.aggregate(m, jnp.eye(2), m.init(2), losses=jnp.array([1.0, -1.0]),
                   present=jnp.array([True, False]))

    @jax.jit
    def step(losses):
        return jmtl.aggregate(m, jnp.eye(2), m.init(2), losses=losses)[0]

    with pytest.raises(checkify.JaxRuntimeError, match=name):
        jmtl.checked(step)(jnp.array([1.0, 0.0]))
    assert np.all(np.isfinite(step(jnp.array([1.0, 0.0]))))  # clamped, finite


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_aggregate_requires_losses_and_key(name):
    m = _method(name)
    with pytest.raises(ValueError, match=rf"'{name}' needs `losses`"):
        jmtl.aggregate(m, jnp.eye(2), m.init(2), key=jax.random.key(0))
    if name == "rlw":
        with pytest.raises(ValueError, match=r"'rlw' needs `key`"):
            jmtl.aggregate(m, jnp.eye(2), m.init(2), losses=jnp.ones(2))
    with pytest.raises(ValueError, match=rf"{name}: `losses` has 3 tasks"):
        jmtl.aggregate(m, jnp.eye(2), m.init(2), losses=jnp.ones(3), key=jax.random.key(0))


def test_aggregate_update_is_weighted_rows():
    m = jmtl.si()
    jac = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([1.0, -1.0])}
    upd, _ = jmtl.aggregate(m, jac, m.init(2), losses={"a": 2.0, "b": 4.0})
    np.testing.assert_allclose(upd["w"], [0.5 * 1 + 0.25 * 3, 0.5 * 2 + 0.25 * 4])
    np.testing.assert_allclose(upd["b"], 0.5 - 0.25)


@pytest.mark.parametrize("bad", [dict(T=0.0), dict(period=0), dict(period=1.5)])
def test_dwa_bad_hparams(bad):
    with pytest.raises(ValueError, match="dwa"):
        jmtl.dwa(**bad)


def test_bad_hparams_other_methods():
    with pytest.raises(ValueError, match=r"'uw'.*'poisson'"):
        jmtl.uw(kind="poisson")
    with pytest.raises(ValueError, match="stch.*mu"):
        jmtl.stch(mu=0.0)
    with pytest.raises(ValueError, match="stch.*preference"):
        jmtl.stch(preference=[1.0, -1.0])
    with pytest.raises(ValueError, match="stch.: 2 preferences for 3 tasks"):
        jmtl.stch(preference=[1.0, 1.0]).init(3)
    with pytest.raises(ValueError, match="famo"):
        jmtl.famo(w_lr=-1.0)


@settings(max_examples=12)
@given(k=st.integers(1, 4), steps=st.integers(1, 5), seed=st.integers(0, 2**16),
       period=st.integers(1, 2))
def test_hypothesis_dwa_gls_si(k, steps, seed, period):
    rng = np.random.default_rng(seed)
    L = np.exp(rng.uniform(-8, 8, (steps, k)))
    p = rng.uniform(size=(steps, k)) > 0.2
    ws, _ = _run(jmtl.dwa(period=period), L, p, jit=True)
    np.testing.assert_allclose(ws, ref_dwa(L, p, 2.0, period), rtol=1e-4, atol=1e-6)
    for t in range(steps):
        wg, _ = _jitted(jmtl.gls())(Inputs(jnp.asarray(p[t]), jnp.asarray(L[t], jnp.float32)),
                                  jmtl.methods.EmptyState())
        if p[t].any():
            np.testing.assert_allclose(wg, ref_gls(L[t], p[t]), rtol=1e-4)
        else:
            np.testing.assert_array_equal(wg, 0.0)


@settings(max_examples=12)
@given(k=st.integers(1, 4), steps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_hypothesis_famo_stch_uw(k, steps, seed):
    rng = np.random.default_rng(seed)
    L = np.exp(rng.uniform(-4, 4, (steps, k)))
    p = np.ones((steps, k), bool)
    ws, _ = _run(jmtl.famo(), L, p, jit=True)
    ref = RefFAMO(k)
    np.testing.assert_allclose(ws, np.stack([ref.step(L[t], p[t]) for t in range(steps)]),
                               rtol=1e-4, atol=1e-7)
    ws, _ = _run(jmtl.stch(), L, p, jit=True)
    np.testing.assert_allclose(ws, ref_stch(L, p, 1.0, None, 0, 1), rtol=1e-4)
    ws, _ = _run(jmtl.uw(lr=0.01), L, p, jit=True)
    np.testing.assert_allclose(ws, ref_uw(L, p, 0.01, "log_variance")[0], rtol=1e-4)


# ----------------------------------------------------------------------------- fixed methods


def test_fixed_methods_weights_and_absent():
    jac = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    present = jnp.array([True, False, True])
    for name, want, want_abs in [("ew", [1, 1, 1], [1, 0, 1]),
                                 ("mean", [1 / 3] * 3, [0.5, 0, 0.5]),
                                 ("sum", [1, 1, 1], [1, 0, 1])]:
        m = jmtl.methods.get(name)
        w, _ = m.update(Inputs(jnp.ones(3, bool)), m.init(3))
        np.testing.assert_allclose(w, want, rtol=1e-6)
        w, _ = jax.jit(m.update)(Inputs(present), m.init(3))
        np.testing.assert_allclose(w, want_abs, rtol=1e-6)
        upd, _ = jmtl.aggregate(m, jac, m.init(3))
        np.testing.assert_allclose(upd, np.asarray(want) @ np.asarray(jac), rtol=1e-6)
    assert jmtl.ew().weights_task_specific and not jmtl.mean().weights_task_specific
    assert not jmtl.methods.get("sum").weights_task_specific
    w, _ = jmtl.mean().update(Inputs(jnp.zeros(3, bool)), jmtl.mean().init(3))
    np.testing.assert_array_equal(w, 0.0)


def test_weighted_method():
    m = jmtl.weighted({"b": 0.5, "a": 2.0})
    w, _ = m.update(Inputs(jnp.array([True, True])), m.init(2))
    np.testing.assert_allclose(w, [2.0, 0.5])
    w, _ = m.update(Inputs(jnp.array([True, False])), m.init(2))
    np.testing.assert_allclose(w, [2.0, 0.0])
    assert dict(m.hparams)["weights"] == {"b": 0.5, "a": 2.0}  # as given
    with pytest.raises(TypeError, match="needs `weights`"):
        jmtl.weighted()
    with pytest.raises(ValueError, match="finite"):
        jmtl.weighted([1.0, float("nan")])
    with pytest.raises(ValueError, match="2 weights given for 3 tasks"):
        jmtl.weighted([1.0, 1.0]).update(Inputs(jnp.ones(3, bool)), None)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_get():
    names = jmtl.methods.names()
    assert names == tuple(sorted(names))
    for n in ("ew", "weighted", "mean", "sum", *LOSS_METHODS):
        assert n in names
    m = jmtl.methods.get("dwa", T=3.0)
    assert m.name == "dwa" and dict(m.hparams)["T"] == 3.0
    assert repr(m) == "jmtl.dwa(T=3.0, period=1)"
    assert m.hparams == jmtl.dwa(T=3.0).hparams
    with pytest.raises(ValueError, match=r"unknown method 'dwaa'.*valid methods are.*dwa"):
        jmtl.methods.get("dwaa")
    with pytest.raises(TypeError, match=r"'dwa' has no hyperparameter\(s\) \['temp'\]"):
        jmtl.methods.get("dwa", temp=1.0)
    with pytest.raises(ValueError, match="already registered"):
        jmtl.methods.register("dwa")(lambda: None)


# ----------------------------------------------------------------------------- tasks helpers


def test_tasks_stack_unstack_names():
    tree = {"seg": 1.0, "depth": 2.0, "normal": 3.0}
    assert tasks.task_names(tree) == ("depth", "normal", "seg")
    assert tasks.num_tasks(tree) == 3
    v = tasks.stack(tree)
    np.testing.assert_array_equal(v, [2.0, 3.0, 1.0])
    back = tasks.unstack(v * 2, tree)
    assert {k: float(x) for k, x in back.items()} == {"seg": 2.0, "depth": 4.0, "normal": 6.0}
    assert tasks.task_names([1.0, 2.0]) == ("0", "1")
    nested = {"a": {"x": 1.0}, "b": 2.0}
    assert tasks.task_names(nested) == ("['a']['x']", "b")


def test_tasks_errors():
    with pytest.raises(ValueError, match="task 'seg' has shape \\(4,\\)"):
        tasks.stack({"seg": jnp.ones(4), "depth": 1.0})
    with pytest.raises(ValueError, match="no tasks"):
        tasks.stack({})
    with pytest.raises(ValueError, match="expected a \\(K,\\) array"):
        tasks.stack(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="unstack: 2 values for 3 tasks"):
        tasks.unstack(jnp.ones(2), {"a": 0, "b": 0, "c": 0})
    with pytest.raises(ValueError, match=r"m: task sets differ.*missing \['c'\].*extra \['d'\]"):
        tasks.check_same_tasks({"a": 0, "c": 0}, {"a": 0, "d": 0}, method="m")
    with pytest.raises(ValueError, match="task structures differ"):
        tasks.check_same_tasks((0, 0), [0, 0])
    with pytest.raises(ValueError, match="m: `losses` has 3 tasks but the Jacobian has 2"):
        tasks.as_task_vector(jnp.ones(3), 2, what="losses", method="m")


def test_presence_mask():
    tree = {"a": 0.0, "b": 0.0, "c": 0.0}
    np.testing.assert_array_equal(tasks.presence_mask(tree), [True, True, True])
    np.testing.assert_array_equal(tasks.presence_mask(tree, ["c", "a"]), [True, False, True])
    np.testing.assert_array_equal(tasks.presence_mask(tree, {"a": 0, "b": 5, "c": 1}),
                                  [False, True, True])
    np.testing.assert_array_equal(tasks.presence_mask(tree, jnp.array([1, 0, 1])),
                                  [True, False, True])
    with pytest.raises(ValueError, match=r"unknown tasks \['d'\]"):
        tasks.presence_mask(tree, ["d"])
    with pytest.raises(ValueError, match="mask shape"):
        tasks.presence_mask(tree, jnp.array([True, False]))
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        tasks.presence_mask(tree, {"a": 1, "b": 1})


def test_aggregate_named_present():
    m = jmtl.si()
    upd, _ = jmtl.aggregate(m, jnp.eye(2), m.init(2), losses={"a": 2.0, "b": 4.0},
                            present={"a": True, "b": False})
    np.testing.assert_allclose(upd, [0.5, 0.0])
