"""In-graph solvers: exact non-negative QP, dual-cone projection, min-norm point, Nash."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jmtl import solvers
from tests import _tiers


def brute_nnqp(q_mat, q):
    """Exact solution of min_{x>=0} ½xᵀQx + qᵀx for PD Q by enumerating active sets."""
    k = len(q)
    for r in range(k + 1):
        for free in itertools.combinations(range(k), r):
            f = list(free)
            x = np.zeros(k)
            if f:
                x[f] = np.linalg.solve(q_mat[np.ix_(f, f)], -q[f])
            y = q_mat @ x + q
            if np.all(x >= -1e-12) and np.all(y >= -1e-10 * (1 + np.abs(q).max())):
                return x
    raise AssertionError("no active set found")


def kkt_nnqp(q_mat, q, x, tol):
    y = q_mat @ x + q
    scale = np.abs(q).max() + np.abs(q_mat).max() * np.abs(x).max() + 1e-300
    assert np.all(x >= 0)
    assert np.all(y >= -tol * scale), y.min() / scale
    assert abs(x @ y) <= tol * scale * (np.abs(x).sum() + 1e-300)


def random_pd(rng, k, rank=None):
    rank = k if rank is None else rank
    a = rng.standard_normal((k, rank))
    return a @ a.T + (1e-3 * np.eye(k) if rank < k else 0)


@pytest.mark.parametrize("seed", _tiers.first_fast(range(6), keep=2))
def test_nonneg_qp_matches_enumeration_float64(seed):
    rng = np.random.default_rng(seed)
    k = 2 + seed % 5
    q_mat = random_pd(rng, k)
    q = rng.standard_normal(k)
    with jax.enable_x64(True):
        res = solvers.nonneg_qp(jnp.asarray(q_mat), jnp.asarray(q), ridge=0.0)
        x = np.asarray(res.x)
        assert res.x.dtype == jnp.float64 and bool(res.converged)
    ref = brute_nnqp(q_mat, q)
    np.testing.assert_allclose(x, ref, rtol=1e-8, atol=1e-10)
    kkt_nnqp(q_mat, q, x, 1e-10)


@pytest.mark.slow
def test_nonneg_qp_batched_equals_single_and_jit():
    rng = np.random.default_rng(1)
    k = 12
    q_mat = jnp.asarray(random_pd(rng, k), jnp.float32)
    qs = jnp.asarray(rng.standard_normal((5, k)), jnp.float32)
    batched = solvers.nonneg_qp(q_mat, qs).x
    jitted = jax.jit(lambda a, b: solvers.nonneg_qp(a, b).x)(q_mat, qs)
    for i in range(5):
        single = solvers.nonneg_qp(q_mat, qs[i]).x
        np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched, jitted, rtol=1e-5, atol=1e-6)


def test_nonneg_qp_large_k_uses_block_tiers():
    # K = 40 exercises the gathered small-block path and the full path.
    rng = np.random.default_rng(2)
    k = 40
    q_mat = random_pd(rng, k)
    q = rng.standard_normal((3, k))
    q[0] = np.abs(q[0])          # solution 0: empty free set
    q[1, :3] = -5.0               # few free variables
    with jax.enable_x64(True):
        x = np.asarray(solvers.nonneg_qp(jnp.asarray(q_mat), jnp.asarray(q), ridge=0.0).x)
    for i in range(3):
        kkt_nnqp(q_mat, q[i], x[i], 1e-9)
    np.testing.assert_array_equal(x[0], 0.0)


def test_nonneg_qp_mask_and_errors():
    q_mat = jnp.eye(3)
    x = solvers.nonneg_qp(q_mat, jnp.array([-1.0, -2.0, -3.0]), jnp.array([True, False, True]),
                          ridge=0.0).x
    np.testing.assert_allclose(x, [1.0, 0.0, 3.0], rtol=1e-6)
    with pytest.raises(ValueError, match="nonneg_qp"):
        solvers.nonneg_qp(jnp.eye(3), jnp.ones(2))


@pytest.mark.parametrize("k,d", [(3, 5), (6, 3), (5, 1)])
def test_project_dual_cone_kkt_float64(k, d):
    rng = np.random.default_rng(k * 10 + d)
    jac = rng.standard_normal((k, d))
    g = jac @ jac.T
    u = np.abs(rng.standard_normal(k))
    with jax.enable_x64(True):
        w = np.asarray(solvers.project_dual_cone(jnp.asarray(g), jnp.asarray(u)).x)
    scale = np.trace(g) * np.abs(w).max()
    gw = g @ w
    assert np.all(w >= u - 1e-12)                     # dual feasibility (λ >= 0)
    assert np.all(gw >= -1e-8 * scale)                # primal feasibility: J(Jᵀw) >= 0
    assert abs((w - u) @ gw) <= 1e-8 * scale * np.abs(w - u).sum() + 1e-300  # slackness
    # The projection is the closest point of the cone: compare with brute force (in x-space).
    if k <= d:
        lam = brute_nnqp(g, g @ u)
        np.testing.assert_allclose(jac.T @ w, jac.T @ (u + lam), rtol=1e-7, atol=1e-9)


def test_min_norm_two_tasks_closed_form():
    rng = np.random.default_rng(3)
    for _ in range(5):
        g1, g2 = rng.standard_normal((2, 4))
        gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0.0, 1.0)
        jac = np.stack([g1, g2])
        with jax.enable_x64(True):
            w = np.asarray(solvers.min_norm_weights(jnp.asarray(jac @ jac.T)).x)
        np.testing.assert_allclose(w, [gamma, 1 - gamma], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k,d", [(4, 6), (7, 3), (3, 1)])
def test_min_norm_kkt_float64(k, d):
    rng = np.random.default_rng(k + 100 * d)
    jac = rng.standard_normal((k, d)) + 0.5
    g = jac @ jac.T
    with jax.enable_x64(True):
        w = np.asarray(solvers.min_norm_weights(jnp.asarray(g)).x)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
    gw = g @ w
    mu = w @ gw
    scale = np.trace(g) / k
    assert np.all(gw >= mu - 1e-7 * scale)                       # stationarity on the simplex
    np.testing.assert_allclose(gw[w > 1e-9], mu, atol=1e-7 * scale)


def test_nash_bargaining_fixed_point_float64():
    rng = np.random.default_rng(4)
    jac = rng.standard_normal((5, 9))
    g = jac @ jac.T
    g = g / np.linalg.norm(g)
    with jax.enable_x64(True):
        a = np.asarray(solvers.nash_bargaining(jnp.asarray(g), ridge=0.0, max_iter=50).x)
    assert np.all(a > 0)
    np.testing.assert_allclose(g @ a, 1.0 / a, rtol=1e-9)


def test_nash_bargaining_warm_start_and_mask():
    g = jnp.diag(jnp.array([1.0, 4.0, 9.0]))
    res = solvers.nash_bargaining(g, jnp.array([5.0, 0.1, 1.0]),
                                  jnp.array([True, True, False]), ridge=0.0)
    np.testing.assert_allclose(res.x, [1.0, 0.5, 0.0], rtol=1e-5)   # masked out: 0
    assert bool(res.converged)


@given(k=st.sampled_from([1, 5]), scale=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e6, 1e30]),
       dup=st.booleans(), zero_row=st.booleans(), seed=st.integers(0, 2**16))
def test_solvers_finite_on_degenerate_input(k, scale, dup, zero_row, seed):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((k, 2))
    if dup and k > 1:
        jac[1] = jac[0]
    if zero_row:
        jac[0] = 0.0
    g = jnp.asarray(jac @ jac.T * scale, jnp.float32)     # the Gramian scale itself
    w = _mn(g)
    assert np.all(np.isfinite(w)) and abs(float(np.sum(w)) - 1) < 1e-4
    p = _proj(g)
    assert np.all(np.isfinite(p))
    a = _nash(g)
    active = np.diag(np.asarray(g)) > 0
    assert np.all(np.isfinite(a)) and np.all(a[active] > 0) and np.all(a[~active] == 0)


_mn = jax.jit(lambda g: solvers.min_norm_weights(g).x)
_proj = jax.jit(lambda g: solvers.project_dual_cone(g, jnp.eye(g.shape[0])).x)
_nash = jax.jit(lambda g: solvers.nash_bargaining(g).x)


def test_project_simplex_still_works():
    np.testing.assert_allclose(solvers.project_simplex(jnp.array([0.2, 0.2, 0.2])),
                               [1 / 3] * 3, rtol=1e-6)


def _spread_jacobian(rng, k, d=400, decades=3.0):
    """Rows with singular values spread over `decades` decades (hard for CG)."""
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0].T
    return (rng.standard_normal((k, k)) * np.logspace(0, -decades, k)) @ basis


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gauss", "spread"])
def test_nonneg_qp_batched_cg_path_kkt_float64(kind):
    # Batches go through the CG path (with the direct method as fallback); both must give
    # the exact solution: compare with the direct block principal pivoting and check KKT.
    from jmtl.solvers import active_set
    rng = np.random.default_rng(7)
    k = 48
    jac = rng.standard_normal((k, 300)) if kind == "gauss" else _spread_jacobian(rng, k)
    g = jac @ jac.T
    g = g / np.trace(g) + 1e-4 * np.eye(k)
    q = np.eye(k) @ g / k
    with jax.enable_x64(True):
        res = solvers.nonneg_qp(jnp.asarray(g), jnp.asarray(q), ridge=0.0)
        assert bool(jnp.all(res.converged))
        x = np.asarray(res.x)
        qn, scale, _ = active_set.prepare(jnp.asarray(g), None, 0.0)
        tol = active_set.default_tol(jnp.float64, k)
        ref = active_set._bpp(qn, jnp.asarray(q) / scale, jnp.zeros((k, k), bool), 3 * k + 10,
                              tol)
    np.testing.assert_allclose(x, np.asarray(ref.x), rtol=1e-7, atol=1e-9 * np.abs(x).max())
    for i in range(k):
        kkt_nnqp(g, q[i], x[i], 1e-9)


@pytest.mark.slow
def test_nonneg_qp_cg_fallback_to_direct(monkeypatch):
    # A CG budget too small to converge is reported as not converged, and the public
    # solver then finishes with the direct method from the free sets reached.
    from jmtl.solvers import active_set
    rng = np.random.default_rng(3)
    k = 24
    jac = _spread_jacobian(rng, k)
    g = jac @ jac.T / np.trace(jac @ jac.T) + 1e-4 * np.eye(k)
    q = rng.standard_normal((k, k))
    with jax.enable_x64(True):
        qn, scale, _ = active_set.prepare(jnp.asarray(g), None, 0.0)
        tol = active_set.default_tol(jnp.float64, k)
        short = active_set._bpp_cg(qn, jnp.asarray(q) / scale, None, 3 * k + 10, tol, 2)
        assert not bool(jnp.all(short.converged))
        res = solvers.nonneg_qp(jnp.asarray(g), jnp.asarray(q), ridge=0.0)
        assert bool(jnp.all(res.converged))
        x = np.asarray(res.x)
        single = np.asarray(solvers.nonneg_qp(jnp.asarray(g), jnp.asarray(q[0]), ridge=0.0).x)
        # Force the hand-over: with a 2-iteration CG budget the direct method finishes.
        monkeypatch.setattr(active_set, "_cg_cap", lambda k: 2)
        forced = jax.jit(lambda a, b: active_set.solve_prepared(a, b, None, 3 * k + 10, tol))(
            qn, jnp.asarray(q) / scale)
        assert bool(jnp.all(forced.converged))
    np.testing.assert_allclose(np.asarray(forced.x), x, rtol=1e-7,
                               atol=1e-9 * np.abs(x).max())
    for i in range(k):
        kkt_nnqp(g, q[i], x[i], 1e-8)
    np.testing.assert_allclose(single, x[0], rtol=1e-6, atol=1e-9 * np.abs(x[0]).max())
