"""Gramian-based QP methods: mgda, upgrad, dualproj, cagrad, nash_mtl."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jmtl
from jmtl.methods import base
from tests import _tiers
from tests._references import project_dual_cone

NAMES = ("mgda", "upgrad", "dualproj", "cagrad", "nash_mtl")


@functools.cache
def _weights_fn(name, **hp):
    m = jmtl.methods.get(name, **hp)

    def f(gram, present, losses, state, scale):
        inputs = base.Inputs(present=present, gramian=gram, scale=scale,
                             losses=losses if base.LOSSES in m.needs else None)
        return m.update(inputs, state)

    return m, jax.jit(f)


def _plain(out):
    """The shared-parameter weights of an update's output (``base.Output`` or weights)."""
    return out.out if isinstance(out, base.Output) else out


def weights(name, jac, present=None, losses=None, state=None, jit=True, **hp):
    m, f = _weights_fn(name, **hp)
    jac = jnp.asarray(jac)
    k = jac.shape[0]
    present = jnp.ones((k,), bool) if present is None else jnp.asarray(present)
    losses = jnp.ones((k,), jac.dtype) if losses is None else jnp.asarray(losses, jac.dtype)
    state = m.init(k) if state is None else state
    gram, scale = jmtl.jacobian.scaled_gramian(jac)
    if jit:
        out, st = f(gram, present, losses, state, scale)
    else:
        out, st = m.update(base.Inputs(present=present, gramian=gram, scale=scale,
                                       losses=losses if base.LOSSES in m.needs else None),
                           state)
    return _plain(out), st


def test_registry_and_metadata():
    for name in NAMES:
        m = jmtl.methods.get(name)
        assert m.name == name and base.GRAMIAN in m.needs
        assert m.output == "weights" and not m.weights_task_specific
        assert getattr(jmtl, name)().name == name
    assert jmtl.methods.get("cagrad", c=0.4).hparams == (("c", 0.4), ("rescale", 1))
    assert base.LOSSES in jmtl.mgda(normalization="loss+").needs
    assert base.LOSSES not in jmtl.mgda().needs
    with pytest.raises(ValueError, match="mgda"):
        jmtl.mgda(normalization="bad")
    with pytest.raises(ValueError, match="cagrad"):
        jmtl.cagrad(rescale=3)


# ---------------------------------------------------------------- references

def test_mgda_two_tasks_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(4):
        g1, g2 = rng.standard_normal((2, 5))
        gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
        with jax.enable_x64(True):
            w, _ = weights("mgda", np.stack([g1, g2]))
        np.testing.assert_allclose(w, [gamma, 1 - gamma], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("norm", ["l2", "loss", "loss+"])
def test_mgda_normalizations_closed_form(norm):
    rng = np.random.default_rng(1)
    g = rng.standard_normal((2, 4))
    losses = np.array([0.7, 2.5])
    n = {"l2": np.linalg.norm(g, axis=1), "loss": losses,
         "loss+": losses * np.linalg.norm(g, axis=1)}[norm]
    h1, h2 = g / n[:, None]
    gamma = np.clip((h2 - h1) @ h2 / np.sum((h1 - h2) ** 2), 0, 1)
    with jax.enable_x64(True):
        w, _ = weights("mgda", g, losses=losses, normalization=norm)
    np.testing.assert_allclose(w, [gamma, 1 - gamma], rtol=1e-8)


def test_mgda_rejects_nonpositive_losses():
    m = jmtl.mgda(normalization="loss")
    with pytest.raises(ValueError, match="mgda"):
        jmtl.aggregate(m, jnp.eye(2), m.init(2), losses=jnp.array([1.0, -1.0]))


@pytest.mark.slow
@pytest.mark.parametrize("k,d", [(3, 5), (4, 4), (5, 2)])
def test_upgrad_and_dualproj_against_brute_force(k, d):
    rng = np.random.default_rng(k + 10 * d)
    jac = rng.standard_normal((k, d))
    with jax.enable_x64(True):
        wu, _ = weights("upgrad", jac, reg_eps=0.0)
        wd, _ = weights("dualproj", jac, reg_eps=0.0)
    ref_u = np.mean([project_dual_cone(jac, np.eye(k)[i]) for i in range(k)], axis=0)
    ref_d = project_dual_cone(jac, np.full(k, 1.0 / k))
    scale = np.linalg.norm(jac)
    np.testing.assert_allclose(np.asarray(wu) @ jac, ref_u, atol=1e-7 * scale)
    np.testing.assert_allclose(np.asarray(wd) @ jac, ref_d, atol=1e-7 * scale)


def test_upgrad_kkt_with_per_row_regularisation():
    rng = np.random.default_rng(2)
    jac = rng.standard_normal((6, 3))
    with jax.enable_x64(True):
        w, _ = weights("upgrad", jac)          # reg_eps = 1e-4 on the cosine Gramian
    # each projection solves min_{v >= e_i/K} vᵀ G_reg v with G_reg = G + 1e-4 diag(G)
    g = jac @ jac.T
    g_reg = g + 1e-4 * np.diag(np.diag(g))
    assert np.all(np.asarray(w) >= 1.0 / 6 - 1e-12)
    assert np.all(g_reg @ np.asarray(w) >= -1e-10 * np.trace(g))


def test_cagrad_kkt_float64():
    rng = np.random.default_rng(3)
    for k, d, c in [(3, 6, 0.4), (5, 3, 0.4), (5, 10, 0.4)]:
        jac = rng.standard_normal((k, d)) + 0.3
        with jax.enable_x64(True):
            w, _ = weights("cagrad", jac, c=c, rescale=0)
        w = np.asarray(w)
        g0 = jac.mean(0)
        d_vec = w @ jac
        r = c * np.linalg.norm(g0)
        x = w - 1.0 / k                              # = λ w_dual >= 0
        assert np.all(x >= -1e-12)
        np.testing.assert_allclose(np.linalg.norm(d_vec - g0), r, rtol=1e-8)  # on the sphere
        lam = np.linalg.norm(x @ jac) and r / np.linalg.norm(x @ jac) * x.sum()
        wd = x / x.sum()
        gw = wd @ jac
        np.testing.assert_allclose(d_vec, g0 + r * gw / np.linalg.norm(gw), atol=1e-9)
        imp = jac @ d_vec                             # dual KKT: g_iᵀd >= min, = on support
        mu = imp[wd > 1e-9].mean()
        assert np.all(imp >= mu - 1e-8 * np.abs(imp).max())
        np.testing.assert_allclose(imp[wd > 1e-9], mu, rtol=1e-8)
        assert lam > 0


@pytest.mark.slow
def test_cagrad_special_cases():
    jac = np.array([[1.0, 0.0], [0.0, 1.0]])
    w, _ = weights("cagrad", jac, c=0.0)
    np.testing.assert_allclose(w, [0.5, 0.5], rtol=1e-6)      # c = 0: mean gradient
    w, _ = weights("cagrad", jac[:1], c=0.4)                   # one task: (1 + c) / (1 + c²)
    np.testing.assert_allclose(w, [1.4 / 1.16], rtol=1e-5)
    w2, _ = weights("cagrad", jac[:1], c=0.4, rescale=2)
    np.testing.assert_allclose(w2, [1.0], rtol=1e-5)


def test_nash_fixed_point_and_clipping():
    rng = np.random.default_rng(4)
    jac = rng.standard_normal((4, 7))
    g = jac @ jac.T
    with jax.enable_x64(True):
        a, st1 = weights("nash_mtl", jac, max_norm=0.0, reg_eps=0.0)
    a = np.asarray(a)
    np.testing.assert_allclose(g @ a, 1.0 / a, rtol=1e-7)      # the raw Gramian
    assert int(st1.step) == 1 and st1.alpha.dtype == jnp.float32
    w, _ = weights("nash_mtl", jac * 100.0)                   # max_norm = 1
    np.testing.assert_allclose(np.linalg.norm(np.asarray(w) @ (jac * 100.0)), 1.0, rtol=1e-4)


def test_nash_update_weights_every():
    rng = np.random.default_rng(5)
    j1, j2 = rng.standard_normal((2, 3, 5)).astype(np.float32)
    m = jmtl.nash_mtl(update_weights_every=2, max_norm=0.0, heads="own")
    s = m.init(3)
    w1, s = jmtl.aggregate(m, j1, s)
    _, s2 = jmtl.aggregate(m, j2, s)
    np.testing.assert_allclose(s2.alpha, s.alpha)             # step 1: weights reused
    assert int(s2.step) == 2
    _, s3 = jmtl.aggregate(m, j2, s2)
    assert not np.allclose(s3.alpha, s2.alpha)                 # step 2: recomputed


# ---------------------------------------------------------------- properties

@st.composite
def jacobians(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    d = draw(st.sampled_from([2, 6]))
    rank = draw(st.integers(1, min(k, d)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((k, rank)) @ rng.standard_normal((rank, d))
    if k > 1 and draw(st.booleans()):
        jac[-1] = jac[0]
    if k > 1 and draw(st.booleans()):
        jac[0] = 0.0
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]))
    return (jac * scale).astype(np.float32)


@pytest.mark.slow
@given(jac=jacobians(), name=st.sampled_from(["mgda", "upgrad", "dualproj", "nash_mtl"]))
def test_non_conflicting(jac, name):
    w, _ = weights(name, jac)
    w = np.asarray(w, np.float64)
    assert np.all(np.isfinite(w))
    upd = w @ jac.astype(np.float64)
    norms = np.linalg.norm(jac, axis=1)
    tol = 2e-3 * norms * max(np.linalg.norm(upd), norms.max())
    assert np.all(jac.astype(np.float64) @ upd >= -tol - 1e-30)


@given(jac=jacobians(), name=st.sampled_from(NAMES), seed=st.integers(0, 100))
def test_permutation_equivariance(jac, name, seed):
    perm = np.random.default_rng(seed).permutation(jac.shape[0])
    w, _ = weights(name, jac)
    wp, _ = weights(name, jac[perm])
    # The update is unique even where the weights are not (e.g. collinear rows).
    upd, updp = np.asarray(w) @ jac, np.asarray(wp) @ jac[perm]
    scale = np.abs(np.asarray(w)).max() * np.abs(jac).max() + 1e-30
    np.testing.assert_allclose(updp, upd, atol=2e-3 * scale)


def test_upgrad_linear_under_positive_scaling():
    rng = np.random.default_rng(6)
    jac = rng.standard_normal((5, 3))                      # K > d: real conflicts
    c1, c2 = rng.uniform(0.2, 3.0, (2, 5))
    with jax.enable_x64(True):
        def upd(c):
            scaled = c[:, None] * jac
            w, _ = weights("upgrad", scaled, reg_eps=0.0)
            return np.asarray(w) @ scaled
        lhs = upd(2.0 * c1 + 0.5 * c2)
        rhs = 2.0 * upd(c1) + 0.5 * upd(c2)
    np.testing.assert_allclose(lhs, rhs, atol=1e-8 * np.abs(rhs).max())


@pytest.mark.parametrize("name,hp", [("mgda", {}), ("mgda", {"normalization": "loss+"}),
                                     ("upgrad", {}), ("dualproj", {})])
def test_single_task_returns_gradient(name, hp):
    g = np.array([[3.0, -4.0, 1.0]], np.float32)
    w, _ = weights(name, g, losses=np.array([2.0]), **hp)
    np.testing.assert_allclose(np.asarray(w) @ g, g[0], rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_zero_jacobian_gives_zero_update(name):
    jac = np.zeros((3, 4), np.float32)
    w, _ = weights(name, jac)
    assert np.all(np.isfinite(np.asarray(w)))
    np.testing.assert_array_equal(np.asarray(w) @ jac, 0.0)


@pytest.mark.parametrize("name", _tiers.first_fast(NAMES))
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales_float64(name, scale):
    rng = np.random.default_rng(7)
    jac = rng.standard_normal((3, 2))
    with jax.enable_x64(True):
        w, _ = weights(name, jac * scale)
        w1, _ = weights(name, jac)
    assert np.all(np.isfinite(np.asarray(w)))
    if name != "nash_mtl":                                   # nash clips the norm
        np.testing.assert_allclose(np.asarray(w), np.asarray(w1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_absent_tasks(name):
    rng = np.random.default_rng(8)
    jac = rng.standard_normal((5, 6)).astype(np.float32)
    present = np.array([True, False, True, True, False])
    w, state = weights(name, jac, present=present)
    assert float(w[1]) == 0.0
    w_sub, _ = weights(name, jac[present])
    np.testing.assert_allclose(np.asarray(w)[present], w_sub, rtol=1e-4, atol=1e-6)
    if name == "nash_mtl":
        assert float(state.alpha[1]) == 1.0                  # absent: state not updated
        assert int(state.failures) == 0
    w0, _ = weights(name, jac, present=np.zeros(5, bool))
    np.testing.assert_array_equal(np.asarray(w0), 0.0)


@pytest.mark.parametrize("name", _tiers.first_fast(NAMES))
def test_jit_equals_no_jit(name):
    rng = np.random.default_rng(9)
    jac = rng.standard_normal((5, 3)).astype(np.float32)
    w1, _ = weights(name, jac, jit=True)
    w2, _ = weights(name, jac, jit=False)
    np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_aggregate_end_to_end_pytree():
    jac = {"a": jnp.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]]), "b": jnp.ones((3, 1))}
    for name in NAMES:
        # (aggregate does not read base.Output yet: nash_mtl with its own-gradient heads)
        m = jmtl.methods.get(name, **({"heads": "own"} if name == "nash_mtl" else {}))
        upd, _ = jax.jit(lambda j, m=m: jmtl.aggregate(m, j, m.init(3),
                                                       losses=jnp.array([1.0, 2.0, 3.0])))(jac)
        assert upd["a"].shape == (2,) and upd["b"].shape == (1,)
