"""Fidelity of the QP / solver family against float64 numpy references (issues 9, 12).

References are independent numpy re-implementations in float64: a Newton solve of Nash-MTL's
``G α = 1/α`` (paper code's fixed point), a Lawson-Hanson NNLS-style active set and KKT
conditions for MGDA's min-norm point, exhaustive active-set enumeration for UPGrad's
projections, and the simplex projection by bisection on its threshold.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmtl
from jmtl import solvers
from jmtl.methods import base
from jmtl.methods.cagrad import cagrad_weights
from tests import _tiers
from tests._references import project_dual_cone


def _orth(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _matrix(rng, m, n, rank):
    return _orth(rng, m)[:, :rank] @ np.diag(np.abs(rng.standard_normal(rank))) @ _orth(
        rng, n)[:rank]


def _strictly_weak(rng, m, n, rank):
    """v >= 0 with vᵀA = 0, and a non-negative left singular vector v' ⟂ v (torchjd's idea)."""
    idx = rng.permutation(m)
    v, vp = np.zeros(m), np.zeros(m)
    v[idx[: m // 2]] = np.abs(rng.standard_normal(m // 2))
    vp[idx[m // 2:]] = np.abs(rng.standard_normal(m - m // 2))
    v, vp = v / np.linalg.norm(v), vp / np.linalg.norm(vp)
    rest = np.linalg.qr(np.concatenate([np.stack([v, vp], 1), rng.standard_normal((m, m - 2))],
                                       1))[0][:, 2:]
    u = np.concatenate([vp[:, None], rest], 1)
    return u[:, :rank] @ np.diag(np.abs(rng.standard_normal(rank))) @ _orth(rng, n)[:rank]


def _update(m, jac, state=None):
    """(shared weights, head weights, state) of one update on the pre-scaled Gramian."""
    jac = jnp.asarray(jac)
    k = jac.shape[0]
    gram, scale = jmtl.jacobian.scaled_gramian(jac)
    out, st = m.update(base.Inputs(present=jnp.ones((k,), bool), gramian=gram, scale=scale),
                       m.init(k) if state is None else state)
    if isinstance(out, base.Output):
        return np.asarray(out.out, np.float64), np.asarray(out.head_weights, np.float64), st
    return np.asarray(out, np.float64), None, st


# ----------------------------------------------------------------------------- Nash-MTL

def _nash_ref(g):
    """float64 Newton on ½αᵀGα − Σ log α (the paper code's fixed point Gα = 1/α)."""
    a = 1.0 / np.sqrt(np.diag(g))
    f = lambda x: 0.5 * x @ g @ x - np.sum(np.log(x)) if np.all(x > 0) else np.inf  # noqa
    for _ in range(200):
        grad = g @ a - 1 / a
        d = -np.linalg.solve(g + np.diag(1 / a ** 2), grad)
        t = 1.0
        while f(a + t * d) > f(a) + 1e-4 * t * grad @ d and t > 1e-14:
            t /= 2
        a = a + t * d
    return a


@pytest.mark.parametrize("scale", [1e-20, 0.05, 1.0, 1e20])
@pytest.mark.parametrize("seed", _tiers.first_fast(range(5)))
def test_nash_raw_gramian_rows_of_scales_1e3_1_1em3(scale, seed):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((3, 8)) * np.array([1e3, 1.0, 1e-3])[:, None]
    js = (jac * scale).astype(np.float32)
    j64 = js.astype(np.float64) / scale                          # the float32 input, unscaled
    ref = _nash_ref(j64 @ j64.T) / scale                          # α of the raw Gramian
    w, heads, st = _update(jmtl.nash_mtl(max_norm=0.0), js)
    assert np.max(np.abs(w / ref - 1)) < 1e-4                    # measured < 1e-5
    np.testing.assert_allclose(heads, w)                          # heads get α_i ∇L_i
    np.testing.assert_allclose(np.linalg.norm(w @ (j64 * scale)), np.sqrt(3), rtol=1e-4)  # √K
    assert int(st.failures) == 0
    w1, _, _ = _update(jmtl.nash_mtl(max_norm=1.0), js)          # clipped to 1
    np.testing.assert_allclose(np.linalg.norm(w1 @ (j64 * scale)), 1.0, rtol=1e-4)


def test_nash_heads_option_and_failure_fallback():
    rng = np.random.default_rng(1)
    jac = rng.standard_normal((4, 6)).astype(np.float32)
    w, heads, _ = _update(jmtl.nash_mtl(heads="own"), jac)
    assert heads is None and not jmtl.nash_mtl(heads="own").weights_task_specific
    # One Newton step from a far start cannot converge: the previous α is kept and counted.
    m = jmtl.nash_mtl(optim_niter=1, max_norm=0.0)
    st0 = m.init(4)._replace(alpha=jnp.full((4,), 1e-6, jnp.float32))
    jac = jac * np.array([1e3, 1.0, 1e-3, 1.0], np.float32)[:, None]
    w, heads, st = _update(m, jac, st0)
    assert int(st.failures) == 1
    np.testing.assert_allclose(w, 1e-6)
    res = solvers.nash_bargaining(jnp.asarray(jac @ jac.T), max_iter=1)
    assert not bool(res.converged) and int(res.iterations) == 1


# ----------------------------------------------------------------------------- MGDA

def _min_norm_ref(g):
    """float64 Lawson–Hanson on min_{v>=0} ½vᵀGv − 1ᵀv (pseudo-inverse solves), w = v/Σv."""
    k = len(g)
    free = np.zeros(k, bool)
    v = np.zeros(k)
    for _ in range(10 * k):
        y = g @ v - 1
        if free.all() or np.min(np.where(free, np.inf, y)) >= -1e-12:
            break
        free[np.argmin(np.where(free, np.inf, y))] = True
        while True:
            z = np.zeros(k)
            f = np.flatnonzero(free)
            z[f] = np.linalg.lstsq(g[np.ix_(f, f)] + 1e-13 * np.eye(len(f)), np.ones(len(f)),
                                   rcond=None)[0]
            if np.all(z[f] > 0):
                v = z
                break
            neg = f[z[f] <= 0]
            t = np.min(v[neg] / (v[neg] - z[neg]))
            v = v + t * (z - v)
            free &= v > 1e-15
            v[~free] = 0
    return v / v.sum()


# Seeds of 20×10 rank-10 Jacobians on which block pivoting alone hit its 3K+10 cap.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 5, 24])
def test_mgda_converges_on_hard_20x10(seed):
    rng = np.random.default_rng(0)
    for _ in range(seed + 1):
        jac = _matrix(rng, 20, 10, 10).astype(np.float32).astype(np.float64)
    m = jmtl.mgda()
    for p in range(8):
        jp = jac[np.random.default_rng(p).permutation(20)]
        ref = _min_norm_ref(jp @ jp.T) @ jp
        for dtype, rtol in ((np.float64, 1e-8), (np.float32, 1e-3)):
            with jax.enable_x64(dtype == np.float64):
                res = solvers.min_norm_weights(jnp.asarray(jp @ jp.T, dtype))
                assert bool(res.converged)
                w, _, _ = _update(m, jp.astype(dtype))
            np.testing.assert_allclose(np.linalg.norm(w @ jp), np.linalg.norm(ref), rtol=rtol)
            if dtype == np.float64:
                gw = jp @ jp.T @ w                                  # KKT on the simplex
                assert np.all(gw >= w @ gw - 1e-9 * np.trace(jp @ jp.T))


@pytest.mark.slow
def test_nonneg_qp_cap_reports_and_stays_feasible():
    rng = np.random.default_rng(0)
    for _ in range(3):
        jac = _matrix(rng, 20, 10, 10)
    g = jnp.asarray(jac @ jac.T, jnp.float32)
    res = solvers.nonneg_qp(g, -jnp.ones(20), max_iter=1)
    assert not bool(res.converged) and np.all(np.asarray(res.x) >= 0)
    mn = solvers.min_norm_weights(g, max_iter=1)
    assert not bool(mn.converged)
    np.testing.assert_allclose(float(jnp.sum(mn.x)), 1.0, rtol=1e-5)   # fallback: on simplex
    pd = solvers.project_dual_cone(g, jnp.eye(20), max_iter=1)
    assert not bool(jnp.all(pd.converged)) and np.all(np.asarray(pd.x) >= np.eye(20) - 1e-7)
    cw = cagrad_weights(g, 0.4, max_iter=1)
    assert not bool(cw.converged) and np.all(np.asarray(cw.x) >= 1 / 20 - 1e-7)


# ----------------------------------------------------------------------------- UPGrad

def _upgrad_ref(jac, reg):
    """UPGrad with jmtl's ridge, in float64: the projections are computed on the augmented
    unit rows [g_i/||g_i||, sqrt(reg) e_i], whose Gramian is the cosine Gramian + reg·I,
    and mapped back to J through their weights."""
    k = jac.shape[0]
    n = np.linalg.norm(jac, axis=1)
    aug = np.concatenate([jac / n[:, None], np.sqrt(reg) * np.eye(k)], 1)
    w = np.zeros(k)
    for i in range(k):
        x = project_dual_cone(aug, np.eye(k)[i] * n[i] / k)
        w += np.linalg.lstsq(aug.T, x, rcond=None)[0]
    return (w / n) @ jac


@pytest.mark.parametrize("seed", range(4))
def test_upgrad_float32_matches_float64_and_is_permutation_equivariant(seed):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((5, 4))
    if seed >= 2:
        jac[seed] *= 1e-8                                        # a row 1e8 times smaller
    m = jmtl.upgrad()
    ref = _upgrad_ref(jac, 1e-4)
    upds = []
    for p in range(6):
        perm = np.random.default_rng(p).permutation(5)
        w, _, _ = _update(m, jac[perm].astype(np.float32))
        upd = w @ jac[perm]
        upds.append(upd)
        jd = jac @ upd                                            # non-conflict, per row
        assert np.all(jd >= -1e-6 * np.linalg.norm(jac, axis=1) * np.linalg.norm(upd))
    upds = np.array(upds)
    scale = np.abs(ref).max()
    assert np.abs(upds - ref).max() <= 5e-7 * scale               # float32 vs float64
    assert np.abs(upds - upds[0]).max() <= 5e-7 * scale           # row orders


# ----------------------------------------------------------------------------- CAGrad

@pytest.mark.parametrize("seed", range(4))
def test_cagrad_c2_strictly_weak_float32_does_not_conflict(seed):
    rng = np.random.default_rng(seed)
    jac = _strictly_weak(rng, 20, 10, 10)
    for dtype in (np.float32, np.float64):
        with jax.enable_x64(dtype == np.float64):
            m = jmtl.cagrad(c=2.0)
            w, _, _ = _update(m, jac.astype(dtype))
        d = w @ jac
        # Strictly weak: the non-conflicting cone has an empty interior, so float32 rounding
        # shows up as a small conflict. Relative to max ‖J_i‖·‖d‖, over 12 seeds it measured
        # 3e-6 .. 1.1e-3 with XLA:CPU's default compiler options and up to 5.7e-3 with the
        # test suite's fast-compile options (tests/conftest.py): the rounding differs.
        tol = (1e-2 if dtype == np.float32 else 1e-8) * np.linalg.norm(jac, axis=1).max()
        assert np.min(jac @ d) >= -tol * np.linalg.norm(d)
        g0 = jac.mean(0)
        assert np.linalg.norm(d * 5 - g0) <= 2.0 * np.linalg.norm(g0) * (1 + 1e-4)   # in ball


def test_cagrad_traced_c_and_rescale():
    jac = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)

    def f(c):
        gram, s = jmtl.jacobian.scaled_gramian(jac)
        return jmtl.cagrad(c=c).update(base.Inputs(present=jnp.ones(3, bool), gramian=gram,
                                                   scale=s), base.EmptyState())[0]

    np.testing.assert_allclose(jax.jit(f)(0.4), f(0.4), rtol=1e-5)
    w0, _, _ = _update(jmtl.cagrad(c=0.4, rescale=0), np.asarray(jac))
    w1, _, _ = _update(jmtl.cagrad(c=0.4, rescale=1), np.asarray(jac))
    np.testing.assert_allclose(w1, w0 / 1.16, rtol=1e-5)


# ----------------------------------------------------------------------------- MoCo / simplex

def _simplex_ref(v):
    v = v - v.max()
    lo, hi = v.min() - 1, v.max()
    for _ in range(200):
        t = 0.5 * (lo + hi)
        lo, hi = (t, hi) if np.maximum(v - t, 0).sum() > 1 else (lo, t)
    return np.maximum(v - 0.5 * (lo + hi), 0)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6, 1e9, 1e30])
def test_project_simplex_exact_at_any_scale(scale):
    rng = np.random.default_rng(int(np.log10(scale)) + 10)
    v = rng.standard_normal(6) * scale
    v[2] = v.max() + 0.3                    # two entries within 1 of the top
    ref = _simplex_ref(v.astype(np.float32).astype(np.float64))   # ties at 1e30: [.5, .5]
    out = np.asarray(solvers.project_simplex(jnp.asarray(v, jnp.float32)))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_array_equal(
        solvers.project_simplex(jnp.array([-1.5e9, 2e8, -3e9])), [0.0, 1.0, 0.0])


def test_moco_softmax_update_matches_libmtl_formula():
    jac = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    m = jmtl.moco(lambda_update="softmax")
    upd, st = jmtl.aggregate(m, jnp.asarray(jac), m.init(2, 2))
    y = 0.5 * jac                                     # β_1 = 0.5 from y = 0
    lam = np.full(2, 0.5) - 0.1 * (y @ y.T) @ np.full(2, 0.5)
    lam = np.exp(lam) / np.exp(lam).sum()
    np.testing.assert_allclose(st.lam, lam, rtol=1e-6)
    np.testing.assert_allclose(upd, lam @ y, rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e6, 1e9])
def test_moco_lambda_stays_on_simplex_at_large_scale(scale):
    # |J| ≈ 1e6 used to give λ = 0 and a zero update (the simplex projection lost the 1).
    jac = np.array([[1.0, 0.2], [-0.3, 1.0], [0.5, 0.5]], np.float32) * scale
    m = jmtl.moco()
    upd, st = jmtl.aggregate(m, jnp.asarray(jac), m.init(3, 2))
    lam = np.asarray(st.lam, np.float64)
    y = 0.5 * jac.astype(np.float64)
    ref = _simplex_ref(np.full(3, 1 / 3) - 0.1 * (y @ y.T) @ np.full(3, 1 / 3))
    np.testing.assert_allclose(lam, ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(upd), ref @ y, rtol=1e-5, atol=1e-6 * scale)
    assert abs(lam.sum() - 1) < 1e-6 and np.linalg.norm(upd) > 0


# ----------------------------------------------------------------------------- scale (12.1)

@pytest.mark.parametrize("name,hp", _tiers.first_fast(
    [("mgda", {}), ("upgrad", {}), ("dualproj", {}), ("cagrad", {}),
     ("nash_mtl", {"heads": "own"}), ("fairgrad", {})], unpack=True))
@pytest.mark.parametrize("jit", [False, True])
def test_direction_is_scale_free(name, hp, jit):
    jac = np.array([[1.0, 0.2, -0.3], [-0.4, 1.0, 0.1], [0.3, -0.5, 0.8]])
    m = jmtl.methods.get(name, **hp)
    agg = (jax.jit(lambda j: jmtl.aggregate(m, j, m.init(3))[0]) if jit else
           (lambda j: jmtl.aggregate(m, j, m.init(3))[0]))
    ref = np.asarray(agg(jnp.asarray(jac, jnp.float32)), np.float64)
    for scale in (1e-20, 1e-10, 1e10, 1e20):
        out = np.asarray(agg(jnp.asarray(jac * scale, jnp.float32)), np.float64)
        assert np.all(np.isfinite(out))
        cos = out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref))
        assert cos > 0.999, (scale, cos)


# ----------------------------------------------------------------------------- traced hparams

@pytest.mark.parametrize("name,hp", _tiers.first_fast(
    [("nash_mtl", {"max_norm": 0.5, "reg_eps": 1e-6}), ("cagrad", {"c": 0.7}),
     ("upgrad", {"reg_eps": 1e-3}), ("dualproj", {"reg_eps": 1e-3}),
     ("fairgrad", {"alpha": 2.0}), ("moco", {"gamma": 0.2, "rho": 0.1})], unpack=True))
def test_float_hyperparameters_can_be_traced(name, hp):
    # Factories called with traced values (optax schedules) give the concrete result.
    jac = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)

    def run(values):
        m = jmtl.methods.get(name, **values, **({"heads": "own"} if name == "nash_mtl" else {}))
        return jmtl.aggregate(m, jac, m.init(3, 4))[0]

    np.testing.assert_allclose(jax.jit(run)(hp), run(hp), rtol=2e-5, atol=1e-7)


def test_fairgrad_raw_scale_and_cap():
    # The weights solve G w = w^{-1/α} on the raw Gramian, whatever the pre-scaling.
    rng = np.random.default_rng(3)
    jac = (rng.standard_normal((3, 5)) * 300.0).astype(np.float32)
    w, _, _ = _update(jmtl.fairgrad(alpha=2.0), jac)
    g = jac.astype(np.float64) @ jac.T.astype(np.float64)
    np.testing.assert_allclose(g @ w, w ** -0.5, rtol=1e-4)
    res = solvers.alpha_fair_weights(jnp.asarray(g, jnp.float32), 2.0, max_iter=1)
    assert not bool(res.converged) and np.all(np.asarray(res.x) > 0)


def _nnqp_ref(q_mat, q):
    """min_{x>=0} ½xᵀQx + qᵀx for PD Q by enumerating the free sets (float64)."""
    k = len(q)
    best, best_val = np.zeros(k), 0.0
    for r in range(1, k + 1):
        for free in itertools.combinations(range(k), r):
            f = list(free)
            x = np.zeros(k)
            x[f] = np.linalg.solve(q_mat[np.ix_(f, f)], -q[f])
            val = 0.5 * x @ q_mat @ x + q @ x
            if np.all(x >= 0) and val < best_val:
                best, best_val = x, val
    return best


def _cagrad_ref(jac, c):
    """CAGrad's update d = g0 + c||g0|| g_w/||g_w|| (paper, rescale=0) in float64: the dual's
    optimality conditions G(b + x) = μ1 + ν, xᵀGx = c²||g0||², solved by bisection on μ
    with an exact (enumerated) non-negative QP for x(μ)."""
    k = jac.shape[0]
    g = jac @ jac.T
    b = np.full(k, 1.0 / k)
    rho2 = c * c * b @ g @ b
    lo, hi = np.min(g @ b), np.min(g @ b + np.sqrt(rho2 * np.diag(g))) + 1e-9
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        x = _nnqp_ref(g, g @ b - mu)
        lo, hi = (mu, hi) if x @ g @ x < rho2 else (lo, mu)
    return (b + _nnqp_ref(g, g @ b - 0.5 * (lo + hi))) @ jac


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_cagrad_matches_float64_reference(seed, scale):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((4, 6)) + 0.3 * (seed % 2)
    ref = _cagrad_ref(jac, 0.4)
    for dtype, tol in ((np.float32, 2e-5), (np.float64, 1e-9)):
        if dtype == np.float64 and scale != 1.0:
            continue
        with jax.enable_x64(dtype == np.float64):
            w, _, _ = _update(jmtl.cagrad(c=0.4, rescale=0), (jac * scale).astype(dtype))
        np.testing.assert_allclose(w @ jac, ref, atol=tol * np.abs(ref).max())   # scale-free w


def _measure():
    """Largest differences against the float64 references (printed; see the module docstring)."""
    worst_abs = 0.0
    # Nash-MTL: rows 1e3/1/1e-3 at scales 1e-20..1e20, vs float64 Newton reference
    worst = 0
    for sc in [1e-20, 0.05, 1.0, 1e20]:
        for seed in range(5):
            r = np.random.default_rng(seed)
            jac = r.standard_normal((3, 8)) * np.array([1e3, 1.0, 1e-3])[:, None]
            js = (jac * sc).astype(np.float32)
            j64 = js.astype(np.float64) / sc
            ref = _nash_ref(j64 @ j64.T) / sc
            w, _, _ = _update(jmtl.nash_mtl(max_norm=0.0), js)
            worst = max(worst, np.max(np.abs(w / ref - 1)))
    print("nash_mtl max rel diff of alpha vs float64 Newton:", worst)
    # MGDA: 20x10 rank-10, 8 row orders x 30 matrices, norm of min-norm point vs float64 LH
    worst, worst64 = 0, 0
    r = np.random.default_rng(0)
    for _ in range(30):
        jac = _matrix(r, 20, 10, 10).astype(np.float32).astype(np.float64)
        for p in range(8):
            jp = jac[np.random.default_rng(p).permutation(20)]
            ref = np.linalg.norm(_min_norm_ref(jp @ jp.T) @ jp)
            w, _, _ = _update(jmtl.mgda(), jp.astype(np.float32))
            d = np.linalg.norm(w @ jp)
            rn = np.linalg.norm(jp, axis=1).max()
            if ref > 1e-2 * rn:
                worst = max(worst, abs(d - ref) / ref)
            worst_abs = max(worst_abs, abs(d - ref) / rn)
            if ref <= 1e-6 * rn:
                worst64 = max(worst64, d / rn)
    print("mgda float32 max rel diff of ||d|| vs float64 Lawson-Hanson (optimum > 0):", worst)
    print("mgda float32 max ||d||/max||g_i|| where the optimum is 0 (0 in the hull):", worst64)
    print("mgda float32 max | ||d|| - ||d_ref|| | / max||g_i|| over all cases:", worst_abs)
    # UPGrad vs float64 enumeration reference (jmtl ridge), 5x4, incl. tiny rows
    worst = 0
    for seed in range(8):
        r = np.random.default_rng(seed)
        jac = r.standard_normal((5, 4))
        if seed % 2:
            jac[seed % 5] *= 1e-8
        ref = _upgrad_ref(jac, 1e-4)
        w, _, _ = _update(jmtl.upgrad(), jac.astype(np.float32))
        worst = max(worst, np.abs(w @ jac - ref).max() / np.abs(ref).max())
    print("upgrad float32 max diff vs float64 enumeration / max|ref|:", worst)
    # CAGrad float32 vs float64 jmtl solve, and float64 KKT residual
    worst = 0
    for seed in range(8):
        r = np.random.default_rng(seed)
        jac = r.standard_normal((5, 8)) + 0.3
        w32, _, _ = _update(jmtl.cagrad(), jac.astype(np.float32))
        with jax.enable_x64(True):
            w64, _, _ = _update(jmtl.cagrad(), jac)
        worst = max(worst, np.abs((w32 - w64) @ jac).max() / np.abs(w64 @ jac).max())
    print("cagrad float32 vs float64 max diff / max|d|:", worst)


def _measure_more():
    """CAGrad against the float64 bisection reference, FairGrad against its raw equation."""
    worst = 0
    for seed in range(8):
        r = np.random.default_rng(seed)
        jac = r.standard_normal((4, 6)) + 0.3 * (seed % 2)
        ref = _cagrad_ref(jac, 0.4)
        for sc in (1e-20, 1.0, 1e20):
            w, _, _ = _update(jmtl.cagrad(c=0.4, rescale=0), (jac * sc).astype(np.float32))
            worst = max(worst, np.abs(w @ jac - ref).max() / np.abs(ref).max())
    print("cagrad float32 (scales 1e-20..1e20) vs float64 reference, max diff / max|d|:", worst)
    worst = 0
    for seed in range(8):
        r = np.random.default_rng(seed)
        jac = (r.standard_normal((3, 5)) * 300.0).astype(np.float32)
        for alpha in (0.5, 1.0, 2.0):
            w, _, _ = _update(jmtl.fairgrad(alpha=alpha), jac)
            g = jac.astype(np.float64) @ jac.T.astype(np.float64)
            worst = max(worst, np.max(np.abs(g @ w / w ** (-1 / alpha) - 1)))
    print("fairgrad float32 max relative residual of G w = w^(-1/a) (raw G):", worst)


if __name__ == "__main__":   # PYTHONPATH=$PWD python tests/test_fidelity_qp.py
    _measure()
    _measure_more()
