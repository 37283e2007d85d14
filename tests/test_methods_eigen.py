"""Tests for the Gramian/eigen-based methods: imtl_l, imtl_g, imtl, aligned_mtl, config,
fairgrad (and the solvers jmtl.solvers.eigen / jmtl.solvers.alpha_fair behind them).

References are independent float64 numpy computations on the explicit Jacobian: the IMTL-G
paper's closed form with D and U, an SVD of J for Aligned-MTL, numpy's pinv of the unit
gradients for ConFIG, and the residual of G w = w^{-1/α} for FairGrad.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jmtl
from jmtl.methods import base
from tests import _tiers

GRAM_METHODS = {
    "imtl_g": {},
    "imtl": {},
    "aligned_mtl": {},
    "config": {"solver": "gramian"},  # the QR solver (default) is in test_fidelity_misc.py
    "fairgrad": {},
}


def _rand(seed, k, d, scale=1.0):
    return scale * np.random.default_rng(seed).normal(size=(k, d))


def _inputs(m, jac, present=None, losses=None):
    jac = jnp.asarray(jac)
    k = jac.shape[0]
    present = jnp.ones((k,), bool) if present is None else jnp.asarray(present, bool)
    gram = jmtl.jacobian.gramian(jac) if base.GRAMIAN in m.needs else None
    if base.LOSSES in m.needs and losses is None:
        losses = jnp.ones((k,), jnp.float32)
    return base.Inputs(present=present, gramian=gram,
                       losses=None if losses is None else jnp.asarray(losses))


@functools.cache
def _method(name, hp_items):
    return jmtl.methods.get(name, **dict(hp_items))


def M(name, **hp):
    """A cached method object (so its jitted update is compiled once per shape)."""
    hp = {**GRAM_METHODS.get(name, {}), **hp}
    return _method(name, tuple(sorted(hp.items())))


@functools.cache
def _jit_update(m):
    return jax.jit(m.update)


def weights(m, jac, present=None, losses=None, state=None, jit=True):
    """(weights, new_state) of method ``m`` on an explicit Jacobian."""
    jac = jnp.asarray(jac)
    state = m.init(jac.shape[0]) if state is None else state
    update = _jit_update(m) if jit else m.update
    out, new_state = update(_inputs(m, jac, present, losses), state)
    if isinstance(out, base.Output):  # IMTL: the heads' own weights are tested elsewhere
        out = out.out
    return out, new_state


def jit_weights(name, jac, present=None, losses=None):
    return weights(M(name), jac, present, losses)[0]


# ----------------------------------------------------------------------------- references


def np_imtl_g(jac):
    """The paper's closed form: α_{2..K} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 - Σ α_{2..K}."""
    jac = np.asarray(jac, np.float64)
    if jac.shape[0] == 1:
        return np.ones(1)
    unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    d_mat = jac[0] - jac[1:]
    u_mat = unit[0] - unit[1:]
    rest = jac[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
    return np.concatenate([[1.0 - rest.sum()], rest])


def np_aligned_update(jac, mode="min"):
    """σ 1ᵀ U_r W_rᵀ from an SVD J = U S Wᵀ (the aligned rows are σ U Wᵀ)."""
    jac = np.asarray(jac, np.float64)
    u, s, wt = np.linalg.svd(jac, full_matrices=False)
    r = int(np.sum(s > s.max() * 1e-8)) if s.size and s.max() > 0 else 0
    if r == 0:
        return np.zeros(jac.shape[1])
    lam = s[:r] ** 2
    sigma = {"min": s[r - 1], "median": np.sqrt(np.sort(lam)[(r - 1) // 2]),
             "rmse": np.sqrt(lam.mean())}[mode]
    return sigma * (u[:, :r].sum(axis=0) @ wt[:r])


def np_config_update(jac):
    """ConFIG on the explicit J: v = pinv(U) 1, update (Σ g_i·v̂) v̂."""
    jac = np.asarray(jac, np.float64)
    norms = np.linalg.norm(jac, axis=1, keepdims=True)
    unit = np.where(norms > 0, jac / np.where(norms > 0, norms, 1.0), 0.0)
    v = np.linalg.pinv(unit) @ np.ones(jac.shape[0])
    vh = v / np.linalg.norm(v)
    return np.sum(jac @ vh) * vh


# ----------------------------------------------------------------------------- imtl_g


@pytest.mark.parametrize("k,d,seed", [(2, 5, 0), (3, 7, 1), (5, 9, 2), (8, 8, 3)])
def test_imtl_g_matches_paper_closed_form_float64(k, d, seed):
    with jax.enable_x64(True):
        jac = _rand(seed, k, d)
        w, _ = weights(M('imtl_g'), jac)
        assert w.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(w), np_imtl_g(jac), rtol=1e-5, atol=1e-8)
        # Characterisation: Σα = 1 and equal projections of g on every unit gradient.
        g = np.asarray(w) @ jac
        proj = (jac @ g) / np.linalg.norm(jac, axis=1)
        assert abs(np.sum(w) - 1.0) < 1e-8
        np.testing.assert_allclose(proj, proj[0], rtol=1e-5)


def test_imtl_g_float32_close_to_reference():
    jac = _rand(4, 4, 30).astype(np.float32)
    w, _ = weights(M('imtl_g'), jac)
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(w), np_imtl_g(jac), rtol=2e-3, atol=1e-4)


def test_imtl_g_duplicated_rows_same_update_as_deduplicated():
    with jax.enable_x64(True):
        jac = _rand(5, 3, 6)
        dup = np.concatenate([jac, jac[:1]])
        w_dup, _ = weights(M('imtl_g'), dup)
        w, _ = weights(M('imtl_g'), jac)
        np.testing.assert_allclose(np.asarray(w_dup) @ dup, np.asarray(w) @ jac, rtol=1e-6)
        assert abs(float(jnp.sum(w_dup)) - 1.0) < 1e-8


def test_imtl_g_zero_row_gets_zero_weight():
    with jax.enable_x64(True):
        jac = _rand(6, 3, 5)
        with_zero = np.insert(jac, 1, 0.0, axis=0)
        w, _ = weights(M('imtl_g'), with_zero)
        assert float(w[1]) == 0.0
        np.testing.assert_allclose(np.delete(np.asarray(w), 1), np_imtl_g(jac), rtol=1e-6)


# ----------------------------------------------------------------------------- imtl_l / imtl


def test_imtl_l_closed_form_steps_float64_reference():
    m = M('imtl_l', optimizer=optax.sgd(0.05))  # the paper's plain gradient step
    state = m.init(3)
    s_ref = np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        losses = rng.uniform(0.1, 4.0, size=3)
        w, state = m.update(base.Inputs(present=jnp.ones(3, bool),
                                        losses=jnp.asarray(losses, jnp.float32)), state)
        np.testing.assert_allclose(np.asarray(w), np.exp(s_ref), rtol=1e-5)
        s_ref = s_ref - 0.05 * (np.exp(s_ref) * losses - 1.0)
        np.testing.assert_allclose(np.asarray(state.log_scales), s_ref, rtol=1e-5, atol=1e-6)


def test_imtl_l_fixed_point_scaled_losses_equal_one():
    m = M('imtl_l', lr=0.5)
    losses = jnp.array([0.2, 1.0, 7.0])
    step = jax.jit(lambda st: m.update(base.Inputs(present=jnp.ones(3, bool),
                                                   losses=losses), st))
    state = m.init(3)
    for _ in range(200):
        w, state = step(state)
    w, _ = step(state)
    np.testing.assert_allclose(np.asarray(w) * np.asarray(losses), 1.0, rtol=1e-4)


@pytest.mark.parametrize("name", ["imtl_l", "imtl"])
def test_loss_scale_methods_absent_task_not_updated(name):
    m = M(name, optimizer=optax.sgd(0.01))
    jac = _rand(1, 3, 4).astype(np.float32)
    state = m.init(3)._replace(log_scales=jnp.array([0.3, -0.2, 0.1], jnp.float32))
    present = jnp.array([True, False, True])
    losses = jnp.array([2.0, jnp.nan, 0.5])  # an absent task's loss may be NaN
    w, new = weights(m, jac, present=present, losses=losses, state=state)
    assert float(w[1]) == 0.0 and np.all(np.isfinite(np.asarray(w)))
    assert float(new.log_scales[1]) == pytest.approx(-0.2)
    assert float(new.log_scales[0]) == pytest.approx(0.3 - 0.01 * (np.exp(0.3) * 2.0 - 1.0))


def test_imtl_is_imtl_g_on_scaled_gradients_float64():
    with jax.enable_x64(True):
        jac = _rand(7, 4, 9)
        s = np.array([0.5, -1.0, 0.0, 2.0])
        m = M('imtl', optimizer=optax.sgd(0.1))
        state = m.init(4)._replace(log_scales=jnp.asarray(s, jnp.float32))
        losses = np.array([1.0, 2.0, 3.0, 0.5])
        w, new = weights(m, jac, losses=jnp.asarray(losses), state=state)
        s32 = np.asarray(jnp.asarray(s, jnp.float32), np.float64)
        alpha = np_imtl_g(np.exp(s32)[:, None] * jac)  # IMTL-G on the scaled gradients
        np.testing.assert_allclose(np.asarray(w), alpha * np.exp(s32), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(new.log_scales),
                                   s32 - 0.1 * (np.exp(s32) * losses - 1.0), rtol=1e-5)


def test_imtl_l_extreme_losses_stay_finite():
    m = M('imtl_l')
    state = m.init(3)
    losses = jnp.array([1e30, 0.0, 1e-30], jnp.float32)
    step = jax.jit(lambda st: m.update(base.Inputs(present=jnp.ones(3, bool),
                                                   losses=losses), st))
    for _ in range(3):
        w, state = step(state)
        assert np.all(np.isfinite(np.asarray(w)))
        assert np.all(np.isfinite(np.asarray(state.log_scales)))
    big = state._replace(log_scales=jnp.array([39.999, 39.999, -39.999], jnp.float32))
    _, big = step(big)
    assert np.all(np.abs(np.asarray(big.log_scales)) <= 40.0)


@pytest.mark.parametrize("name", ["imtl_l", "imtl"])
def test_loss_scale_methods_reject_bad_losses(name):
    m = M(name)
    jac = jnp.eye(2)
    with pytest.raises(ValueError, match=rf"{name}.*non-negative"):
        jmtl.aggregate(m, jac, m.init(2), losses=jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match=rf"{name}.*non-finite"):
        jmtl.aggregate(m, jac, m.init(2), losses=jnp.array([1.0, jnp.inf]))
    with pytest.raises(ValueError, match=rf"'{name}' needs `losses`"):
        jmtl.aggregate(m, jac, m.init(2))


def test_loss_scale_methods_runtime_check_under_jit():
    m = M('imtl_l')
    f = jmtl.checked(jax.jit(lambda x: m.update(base.Inputs(present=jnp.ones(2, bool),
                                                            losses=x), m.init(2))[0]))
    assert np.allclose(np.asarray(f(jnp.array([1.0, 2.0]))), 1.0)
    with pytest.raises(Exception, match="imtl_l"):
        f(jnp.array([1.0, -2.0]))


# ----------------------------------------------------------------------------- aligned_mtl


@pytest.mark.parametrize("mode,k,d,seed", [
    ("min", 2, 6, 0), ("min", 4, 9, 1), ("min", 6, 3, 2), ("min", 5, 5, 3),
    ("median", 4, 9, 1), ("median", 6, 3, 2), ("rmse", 4, 9, 1), ("rmse", 6, 3, 2)])
def test_aligned_mtl_matches_svd_float64(mode, k, d, seed):
    with jax.enable_x64(True):
        jac = _rand(seed, k, d) * np.linspace(0.5, 3.0, k)[:, None]
        w, _ = weights(M('aligned_mtl', scale_mode=mode), jac)
        assert w.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(w) @ jac, np_aligned_update(jac, mode),
                                   rtol=1e-5, atol=1e-8)


def test_aligned_mtl_rows_become_orthogonal_with_norm_sigma_min_float64():
    # Characterisation: with B the balance matrix, B J has orthogonal rows of norm σ_min,
    # so the update's projection on each aligned row equals σ_min².
    with jax.enable_x64(True):
        jac = _rand(11, 4, 7) * np.array([1.0, 10.0, 0.1, 3.0])[:, None]
        w, _ = weights(M('aligned_mtl'), jac)
        s = np.linalg.svd(jac, compute_uv=False)
        u, _, wt = np.linalg.svd(jac, full_matrices=False)
        aligned = s[-1] * u @ wt
        update = np.asarray(w) @ jac
        np.testing.assert_allclose(aligned @ update, s[-1] ** 2, rtol=1e-5)


def test_aligned_mtl_rejects_bad_scale_mode():
    with pytest.raises(ValueError, match="aligned_mtl.*scale_mode"):
        jmtl.aligned_mtl(scale_mode="max")


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("k,d,seed", [(1, 4, 0), (2, 5, 1), (4, 9, 2), (6, 3, 3), (5, 5, 4)])
def test_config_matches_numpy_pinv_float64(k, d, seed):
    with jax.enable_x64(True):
        jac = _rand(seed, k, d) * np.linspace(0.2, 5.0, k)[:, None]
        w, _ = weights(M('config'), jac)
        assert w.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(w) @ jac, np_config_update(jac),
                                   rtol=1e-5, atol=1e-8)


def test_config_equal_cosines_float64():
    with jax.enable_x64(True):
        jac = _rand(3, 4, 10) * np.array([1.0, 100.0, 0.01, 2.0])[:, None]
        w, _ = weights(M('config'), jac)
        update = np.asarray(w) @ jac
        cos = jac @ update / (np.linalg.norm(jac, axis=1) * np.linalg.norm(update))
        np.testing.assert_allclose(cos, cos[0], rtol=1e-5)
        assert cos[0] > 0


def test_config_zero_row_is_ignored():
    with jax.enable_x64(True):
        jac = _rand(8, 3, 6)
        with_zero = np.insert(jac, 2, 0.0, axis=0)
        w, _ = weights(M('config'), with_zero)
        assert float(w[2]) == 0.0
        np.testing.assert_allclose(np.asarray(w) @ with_zero, np_config_update(with_zero),
                                   rtol=1e-6)


# ----------------------------------------------------------------------------- fairgrad


@pytest.mark.parametrize("alpha,k,d,seed", _tiers.first_fast(
    [(0.5, 4, 10, 1), (1.0, 16, 40, 3), (2.0, 8, 8, 2), (5.0, 16, 40, 3)], keep=2, unpack=True))
def test_fairgrad_solves_its_equation_float64(alpha, k, d, seed):
    with jax.enable_x64(True):
        jac = _rand(seed, k, d) * np.geomspace(0.1, 10.0, k)[:, None]
        w, _ = weights(M('fairgrad', alpha=alpha), jac)
        w = np.asarray(w)
        assert w.dtype == np.float64 and np.all(w > 0)
        gram = jac @ jac.T
        rhs = w ** (-1.0 / alpha)
        np.testing.assert_allclose(gram @ w, rhs, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 3.0])
def test_fairgrad_orthogonal_closed_form(alpha):
    # G = diag(n²): n_i² w_i = w_i^{-1/α}  =>  w_i = n_i^{-2α/(α+1)}.
    norms = np.array([0.5, 1.0, 4.0])
    jac = np.diag(norms).astype(np.float32)
    w, _ = weights(M('fairgrad', alpha=alpha), jac)
    np.testing.assert_allclose(np.asarray(w), norms ** (-2 * alpha / (alpha + 1)), rtol=1e-5)


def test_fairgrad_scaling_law_and_float32_residual():
    jac = _rand(5, 6, 50).astype(np.float32)
    w1, _ = weights(M('fairgrad', alpha=2.0), jac)
    w2, _ = weights(M('fairgrad', alpha=2.0), jac * 1e3)
    np.testing.assert_allclose(np.asarray(w2), np.asarray(w1) * 1e3 ** (-4.0 / 3.0),
                               rtol=1e-4)
    gram = jac.astype(np.float64) @ jac.T.astype(np.float64)
    w = np.asarray(w1, np.float64)
    np.testing.assert_allclose(gram @ w, w ** -0.5, rtol=1e-4)


def test_fairgrad_no_solution_stays_finite():
    jac = np.array([[1.0, 2.0], [-1.0, -2.0], [0.0, 1.0]], np.float32)
    w, _ = weights(M('fairgrad'), jac)
    assert np.all(np.isfinite(np.asarray(w))) and np.all(np.asarray(w) > 0)
    assert np.all(np.isfinite(np.asarray(w) @ jac))


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"alpha": float("inf")}, "alpha"),
    ({"max_iter": 0}, "max_iter"), ({"tol": -1.0}, "tol")])
def test_fairgrad_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=f"fairgrad.*{match}"):
        jmtl.fairgrad(**kwargs)


def test_imtl_rejects_bad_lr():
    for name in ("imtl_l", "imtl"):
        with pytest.raises(ValueError, match=f"{name}.*lr"):
            jmtl.methods.get(name, lr=-1.0)


# ----------------------------------------------------------------------------- all methods


@pytest.mark.parametrize("name", sorted(GRAM_METHODS))
def test_metadata(name):
    m = M(name)
    assert m.name == name and name in jmtl.methods.names()
    assert getattr(jmtl, name) is jmtl.methods.factory(name)
    assert base.GRAMIAN in m.needs and base.JACOBIAN not in m.needs
    assert m.output == "weights" and m.weights_task_specific is False
    assert M('imtl_l').needs == frozenset({base.LOSSES})
    assert M('imtl_l').weights_task_specific is True


@pytest.mark.parametrize("name", _tiers.first_fast(sorted(GRAM_METHODS)))
def test_jit_equals_no_jit(name):
    jac = _rand(2, 5, 12).astype(np.float32)
    w, _ = weights(M(name), jac, jit=False)
    np.testing.assert_allclose(np.asarray(jit_weights(name, jac)), np.asarray(w),
                               rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", _tiers.first_fast(sorted(GRAM_METHODS)))
def test_aggregate_and_jacobian_pytree(name):
    m = M(name)
    jac = _rand(3, 3, 7).astype(np.float32)
    tree = {"a": jnp.asarray(jac[:, :3]), "b": jnp.asarray(jac[:, 3:]).reshape(3, 2, 2)}
    kw = {"losses": {"x": 1.0, "y": 2.0, "z": 0.5}} if base.LOSSES in m.needs else {}
    upd, _ = jax.jit(lambda t: jmtl.aggregate(m, t, m.init(3), **kw))(tree)
    w, _ = weights(m, jac, losses=jnp.array([1.0, 2.0, 0.5]))
    flat = np.concatenate([np.asarray(upd["a"]), np.asarray(upd["b"]).ravel()])
    np.testing.assert_allclose(flat, np.asarray(w) @ jac, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(GRAM_METHODS))
def test_zero_jacobian_gives_zero_update(name):
    jac = np.zeros((4, 6), np.float32)
    w = np.asarray(jit_weights(name, jac))
    assert np.all(np.isfinite(w))
    assert np.all(w @ jac == 0.0)


@pytest.mark.parametrize("name", sorted(GRAM_METHODS))
def test_single_task_follows_its_gradient(name):
    g = np.array([[3.0, -4.0, 1.0]], np.float32)
    w = np.asarray(jit_weights(name, g))
    assert w.shape == (1,) and np.isfinite(w[0]) and w[0] > 0
    if name != "fairgrad":
        assert w[0] == pytest.approx(1.0, rel=1e-5)
    else:  # n² w = w^{-1}: w = 1/n
        assert w[0] == pytest.approx(1.0 / np.sqrt(26.0), rel=1e-5)


@pytest.mark.parametrize("name", sorted(GRAM_METHODS))
def test_degenerate_inputs_are_finite(name):
    rng = np.random.default_rng(0)
    base_rows = rng.normal(size=(3, 5)).astype(np.float32)
    # K in {3, 4, 5} only, shapes shared with the other tests (one compilation each).
    cases = {
        "duplicated": np.concatenate([base_rows[:2], base_rows[:2]]),
        "k_above_rank": rng.normal(size=(5, 3)).astype(np.float32),
        "zero_row": np.concatenate([base_rows, np.zeros((1, 5), np.float32)]),
        "collinear": np.stack([base_rows[0], 2 * base_rows[0], -base_rows[0]]),
        "tiny_f32": base_rows * np.float32(1e-30),  # Gramian underflows to 0
        "small_f32": base_rows * np.float32(1e-15),
        "large_f32": base_rows * np.float32(1e15),
    }
    for label, jac in cases.items():
        w = np.asarray(jit_weights(name, jac))
        assert np.all(np.isfinite(w)), (label, w)
        assert np.all(np.isfinite(w @ jac.astype(np.float64))), label


@pytest.mark.parametrize("name", sorted(GRAM_METHODS))
def test_extreme_scales_float64(name):
    with jax.enable_x64(True):
        jac = _rand(9, 3, 6)
        ref, _ = weights(M(name), jac)
        for scale in (1e-30, 1e30):
            w, _ = weights(M(name), jac * scale)
            assert np.all(np.isfinite(np.asarray(w)))
            if name == "fairgrad":  # w scales as scale^{-2α/(α+1)} = 1/scale for α = 1
                np.testing.assert_allclose(np.asarray(w) * scale, np.asarray(ref), rtol=1e-6)
            else:  # scale-free weights
                np.testing.assert_allclose(np.asarray(w), np.asarray(ref), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(GRAM_METHODS))
def test_absent_task_same_as_dropping_it(name):
    with jax.enable_x64(True):
        jac = _rand(13, 4, 9)
        present = np.array([True, False, True, True])
        w, _ = weights(M(name), jac, present=present)
        w_drop, _ = weights(M(name), jac[present])
        assert float(w[1]) == 0.0
        np.testing.assert_allclose(np.asarray(w)[present], np.asarray(w_drop), rtol=1e-6,
                                   atol=1e-10)
        w_none, _ = weights(M(name), jac, present=np.zeros(4, bool))
        assert np.all(np.asarray(w_none) == 0.0)


@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([3, 4, 5]), d=st.sampled_from([3, 8]),
       name=st.sampled_from(sorted(GRAM_METHODS)))
def test_permutation_equivariance(seed, k, d, name):
    rng = np.random.default_rng(seed)
    jac = (rng.normal(size=(k, d)) * rng.uniform(0.1, 10.0, size=(k, 1))).astype(np.float32)
    perm = rng.permutation(k)
    w = np.asarray(jit_weights(name, jac))
    w_perm = np.asarray(jit_weights(name, jac[perm]))
    assert np.all(np.isfinite(w))
    upd = w @ jac.astype(np.float64)
    scale = np.abs(w).max() * np.abs(jac).max() * k + 1e-30
    # Weights when well-determined (K <= d); the update always.
    np.testing.assert_allclose(w_perm @ jac[perm].astype(np.float64), upd, rtol=1e-3,
                               atol=2e-3 * scale)
    if k <= d:
        np.testing.assert_allclose(w_perm, w[perm], rtol=1e-3, atol=2e-3 * np.abs(w).max())
