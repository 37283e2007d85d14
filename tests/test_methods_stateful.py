"""Tests of gradnorm, db_mtl, moco and excess_mtl against float64 numpy references."""

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

K, D = 4, 12


def _matrix(k, d, seed):
    return np.random.default_rng(seed).normal(size=(k, d)).astype(np.float32)


def _stream(steps, k=K, d=D, seed=0, absent_at=(2,), absent_task=1):
    """A few steps of (jacobian, losses, present) with one task absent sometimes."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        jac = rng.normal(size=(k, d)) * rng.uniform(0.2, 3.0, size=(k, 1))
        losses = rng.uniform(0.1, 2.0, size=k)
        present = np.ones(k, bool)
        if t in absent_at:
            present[absent_task] = False
        out.append((jac.astype(np.float32), losses.astype(np.float32), present))
    return out


@functools.cache
def _jitted_update(name, hparams):
    m = jmtl.methods.get(name, **dict(hparams))
    return jax.jit(m.update)


def _run(m, inputs, state, jit=True):
    fn = _jitted_update(m.name, m.hparams) if jit else m.update
    out, new_state = fn(inputs, state)
    if isinstance(out, base.Output):  # db_mtl's head weights (checked in test_fidelity_misc)
        out = out.out
    return out, new_state


def _inputs(m, jac, losses, present):
    """What the engine passes: all of J's norms as grad_norms (like jmtl.aggregate)."""
    norms = jnp.asarray(np.linalg.norm(np.asarray(jac, np.float64), axis=1), jnp.float32)
    jac = jnp.asarray(jac)
    return base.Inputs(
        present=jnp.asarray(present),
        losses=jnp.asarray(losses) if base.LOSSES in m.needs else None,
        jacobian=jac if base.JACOBIAN in m.needs else None,
        grad_norms=norms if base.GRAD_NORMS in m.needs else None)


def _close(a, b, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


def _project_simplex_np(v, mask):
    """Euclidean projection onto the simplex of the masked entries (float64, sorting)."""
    out = np.zeros_like(v)
    x = v[mask]
    if x.size == 0:
        return out
    u = np.sort(x)[::-1]
    css = np.cumsum(u)
    idx = np.arange(1, x.size + 1)
    rho = np.nonzero(u - (css - 1) / idx > 0)[0][-1]
    theta = (css[rho] - 1) / (rho + 1)
    out[mask] = np.maximum(x - theta, 0)
    return out


# ---------------------------------------------------------------- references

class GradNormRef:
    def __init__(self, k, alpha=1.5, lr=0.025, min_weight=1e-6):
        self.w = np.ones(k)
        self.l0 = np.zeros(k)
        self.seen = np.zeros(k, bool)
        self.alpha, self.lr, self.min_weight = alpha, lr, min_weight

    def step(self, losses, norms, present):
        p = present
        self.l0[p & ~self.seen] = losses[p & ~self.seen]
        self.seen |= p
        out = np.where(p, self.w, 0.0)
        ratio = losses[p] / self.l0[p]
        r = ratio / ratio.mean()
        gn = self.w[p] * norms[p]
        target = gn.mean() * r ** self.alpha
        grad = np.sign(gn - target) * norms[p]
        new = np.maximum(self.w[p] - self.lr * grad, self.min_weight)
        self.w[p] = new * self.w[p].sum() / new.sum()
        return out


class DBMTLRef:
    def __init__(self, k, d, beta=0.9, beta_sigma=0.0):
        self.buf = np.zeros((k, d))
        self.count = np.zeros(k)
        self.beta, self.sigma = beta, beta_sigma

    def step(self, jac, losses, present):
        for i in np.nonzero(present)[0]:
            self.count[i] += 1
            b = self.beta / self.count[i] ** self.sigma
            g = jac[i] / (losses[i] + 1e-8)
            self.buf[i] = (1 - b) * g + b * self.buf[i]
        norms = np.linalg.norm(self.buf, axis=1)
        top = max(norms[i] for i in np.nonzero(present)[0])
        return sum(top / norms[i] * self.buf[i] for i in np.nonzero(present)[0]
                   if norms[i] > 0)


class MoCoRef:
    def __init__(self, k, d, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0,
                 normalize=False):
        self.y = np.zeros((k, d))
        self.lam = np.full(k, 1.0 / k)
        self.count = np.zeros(k)
        self.step_ = 0
        self.hp = (beta, beta_sigma, gamma, gamma_sigma, rho)
        self.normalize = normalize

    def step(self, jac, losses, present):
        beta, beta_sigma, gamma, gamma_sigma, rho = self.hp
        k = jac.shape[0]
        self.step_ += 1
        for i in np.nonzero(present)[0]:
            g = jac[i]
            if self.normalize:
                g = g / np.linalg.norm(g) * losses[i]
            self.count[i] += 1
            self.y[i] = self.y[i] - beta / self.count[i] ** beta_sigma * (self.y[i] - g)
        mass = self.lam[present].sum()
        lam = np.where(present, self.lam / mass, 0.0)
        yp = np.where(present[:, None], self.y, 0.0)
        grad = (yp @ yp.T + rho * np.eye(k)) @ lam
        moved = _project_simplex_np(lam - gamma / self.step_ ** gamma_sigma * grad, present)
        self.lam = np.where(present, moved * mass, self.lam)
        return moved @ yp


class ExcessRef:
    def __init__(self, k, d, step_size=1e-2):
        self.w = np.ones(k)
        self.sq = np.zeros((k, d))
        self.r0 = np.zeros(k)
        self.seen = np.zeros(k, bool)
        self.eta = step_size

    def step(self, jac, present):
        p = present
        self.sq[p] += jac[p] ** 2
        risk = np.sum(jac ** 2 / np.sqrt(self.sq + 1e-7), axis=1)
        self.r0[p & ~self.seen] = risk[p & ~self.seen]
        self.seen |= p
        ratio = risk[p] / self.r0[p]
        new = self.w[p] * np.exp(self.eta * ratio)
        self.w[p] = new / new.sum() * self.w[p].sum()
        return np.where(p, self.w, 0.0)


# ---------------------------------------------------------------- protocol / errors

@pytest.mark.parametrize("name,task_specific,output", [
    ("gradnorm", True, "weights"), ("db_mtl", False, "direction"),
    ("moco", False, "direction"), ("excess_mtl", True, "weights")])
def test_registered(name, task_specific, output):
    m = jmtl.methods.get(name)
    assert m.name == name
    assert m.weights_task_specific is task_specific
    assert m.output == output
    assert base.KEY not in m.needs


@pytest.mark.parametrize("name", ["db_mtl", "moco", "excess_mtl"])
def test_per_parameter_state_needs_dim(name):
    m = jmtl.methods.get(name)
    with pytest.raises(ValueError, match=f"{name}.*dim"):
        m.init(3)
    state = m.init(3, 5)
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        jmtl.aggregate(m, jnp.ones((3, 4)), state, losses=jnp.ones(3))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="gradnorm"):
        jmtl.gradnorm(lr=0.0)
    with pytest.raises(ValueError, match="db_mtl"):
        jmtl.db_mtl(beta=2.0)
    with pytest.raises(ValueError, match="moco"):
        jmtl.moco(gamma=-1.0)
    with pytest.raises(ValueError, match="excess_mtl"):
        jmtl.excess_mtl(step_size=-1.0)
    with pytest.raises(ValueError, match="gradnorm.*losses"):
        m = jmtl.gradnorm()
        jmtl.aggregate(m, jnp.ones((2, 2)), m.init(2))


def test_db_mtl_rejects_non_positive_losses():
    m = jmtl.db_mtl()
    with pytest.raises(ValueError, match="db_mtl.*positive"):
        jmtl.aggregate(m, jnp.ones((2, 3)), m.init(2, 3), losses=jnp.array([1.0, -1.0]))


# ---------------------------------------------------------------- gradnorm

def test_gradnorm_two_task_closed_form():
    # w = 1, L(0) = L, so r = 1 and the target is the mean norm (n1 + n2) / 2.
    # The paper's plain gradient step on the weights (the default is iRprop⁻).
    m = jmtl.gradnorm(optimizer=optax.sgd(0.1))
    inputs = base.Inputs(present=jnp.ones(2, bool), losses=jnp.array([2.0, 0.5]),
                         grad_norms=jnp.array([1.0, 3.0]))
    out, state = m.update(inputs, m.init(2))
    _close(out, [1.0, 1.0])
    stepped = np.array([1 + 0.1 * 1.0, 1 - 0.1 * 3.0])
    _close(state.weights, 2 * stepped / stepped.sum())
    _close(state.initial_losses, [2.0, 0.5])
    assert int(state.step) == 1 and bool(state.seen.all())


@pytest.mark.parametrize("alpha", [1.5, 0.0, 3.0])
def test_gradnorm_against_numpy_over_steps(alpha):
    m = jmtl.gradnorm(alpha=alpha, optimizer=optax.sgd(0.05))
    state = m.init(K)
    ref = GradNormRef(K, alpha=alpha, lr=0.05)
    stream = _stream(7, absent_at=(0, 1, 4))  # task 1 absent at the start: L_1(0) set later
    for t, (jac, losses, present) in enumerate(stream):
        norms = np.linalg.norm(jac.astype(np.float64), axis=1)
        out, state = _run(m, _inputs(m, jac, losses, present), state)
        expected = ref.step(losses.astype(np.float64), norms, present)
        _close(out, expected)
        _close(state.weights, ref.w)
        _close(state.initial_losses, ref.l0)
        _close(np.sum(state.weights), K, rtol=1e-5)
        assert float(out[1]) == (0.0 if not present[1] else float(out[1]))
        if t == 1:
            assert float(state.initial_losses[1]) == 0.0 and not bool(state.seen[1])
    assert int(state.step) == 7


def test_gradnorm_absent_task_untouched():
    m = jmtl.gradnorm()
    state = m.init(3)._replace(weights=jnp.array([0.5, 2.0, 0.5]),
                               initial_losses=jnp.array([1.0, 3.0, 1.0]),
                               seen=jnp.ones(3, bool))
    inputs = base.Inputs(present=jnp.array([True, False, True]),
                         losses=jnp.array([0.5, 100.0, 1.0]), grad_norms=jnp.array([1.0, 50, 2]))
    out, new = m.update(inputs, state)
    assert float(out[1]) == 0.0
    assert float(new.weights[1]) == 2.0 and float(new.initial_losses[1]) == 3.0
    _close(new.weights[0] + new.weights[2], 1.0, rtol=1e-6)


def test_gradnorm_via_aggregate_uses_jacobian_norms():
    m = jmtl.gradnorm(optimizer=optax.sgd(0.025))
    jac, losses, _ = _stream(1)[0]
    update, state = jmtl.aggregate(m, jnp.asarray(jac), m.init(K), losses=jnp.asarray(losses))
    _close(update, jac.sum(0), rtol=1e-5)  # first step: w = 1
    ref = GradNormRef(K)
    ref.step(losses.astype(np.float64), np.linalg.norm(jac.astype(np.float64), axis=1),
             np.ones(K, bool))
    _close(state.weights, ref.w)


# ---------------------------------------------------------------- db_mtl

@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_db_mtl_against_numpy_over_steps(beta, beta_sigma):
    m = jmtl.db_mtl(beta=beta, beta_sigma=beta_sigma)
    state = m.init(K, D)
    ref = DBMTLRef(K, D, beta, beta_sigma)
    for jac, losses, present in _stream(6, seed=1):
        old_buf = np.asarray(state.buffer).copy()
        out, state = _run(m, _inputs(m, jac, losses, present), state)
        expected = ref.step(jac.astype(np.float64), losses.astype(np.float64), present)
        _close(out, expected, rtol=2e-4, atol=2e-5)
        _close(state.buffer, ref.buf, rtol=1e-4, atol=1e-6)
        for i in np.nonzero(~present)[0]:
            np.testing.assert_array_equal(state.buffer[i], old_buf[i])
    np.testing.assert_array_equal(state.count, ref.count)


def test_db_mtl_balances_to_largest_norm():
    m = jmtl.db_mtl(beta=0.0)
    jac = np.array([[3.0, 0.0], [0.0, 0.1]], np.float32)
    out, _ = _run(m, _inputs(m, jac, np.array([1.0, 1.0]), np.ones(2, bool)), m.init(2, 2))
    _close(out, [3.0, 3.0])
    # loss scale cancels in log-balancing: scaling task 0's loss by 100 scales its gradient
    # by 100 too, and nothing changes
    out2, _ = _run(m, _inputs(m, jac * np.array([[100.0], [1.0]], np.float32),
                              np.array([100.0, 1.0]), np.ones(2, bool)), m.init(2, 2))
    _close(out2, out, rtol=1e-5)


# ---------------------------------------------------------------- moco

@pytest.mark.parametrize("hp", [{}, {"rho": 0.1, "gamma": 0.5, "beta_sigma": 0.0},
                                {"normalize_grads": True}])
def test_moco_against_numpy_over_steps(hp):
    m = jmtl.moco(**hp)
    state = m.init(K, D)
    ref = MoCoRef(K, D, **{("normalize" if k == "normalize_grads" else k): v
                           for k, v in hp.items()})
    for jac, losses, present in _stream(6, seed=2):
        old = (np.asarray(state.y).copy(), np.asarray(state.lam).copy())
        out, state = _run(m, _inputs(m, jac, losses, present), state)
        expected = ref.step(jac.astype(np.float64), losses.astype(np.float64), present)
        _close(out, expected, rtol=2e-4, atol=2e-5)
        _close(state.y, ref.y, rtol=1e-4, atol=1e-6)
        _close(state.lam, ref.lam, rtol=1e-4, atol=1e-6)
        _close(np.sum(state.lam), 1.0, rtol=1e-5)
        for i in np.nonzero(~present)[0]:
            np.testing.assert_array_equal(state.y[i], old[0][i])
            assert float(state.lam[i]) == float(old[1][i])
    assert int(state.step) == 6


def test_moco_needs_losses_only_when_normalizing():
    assert base.LOSSES not in jmtl.moco().needs
    assert base.LOSSES in jmtl.moco(normalize_grads=True).needs


# ---------------------------------------------------------------- excess_mtl

@pytest.mark.parametrize("step_size", [1e-2, 0.5])
def test_excess_mtl_against_numpy_over_steps(step_size):
    m = jmtl.excess_mtl(step_size=step_size)
    state = m.init(K, D)
    ref = ExcessRef(K, D, step_size)
    for jac, losses, present in _stream(6, seed=3, absent_at=(0, 3)):
        old_root = np.asarray(state.root_sq_sum).copy()
        out, state = _run(m, _inputs(m, jac, losses, present), state)
        expected = ref.step(jac.astype(np.float64), present)
        _close(out, expected)
        _close(state.weights, ref.w)
        _close(state.initial_risk, ref.r0, rtol=1e-4, atol=1e-6)
        _close(np.sum(state.weights), K, rtol=1e-5)
        for i in np.nonzero(~present)[0]:
            np.testing.assert_array_equal(state.root_sq_sum[i], old_root[i])
        _close(state.root_sq_sum, np.sqrt(ref.sq), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- shared properties

ALL = [("gradnorm", {}), ("db_mtl", {}), ("moco", {}), ("excess_mtl", {}),
       ("moco", {"normalize_grads": True})]


def _init(m, k, d):
    return m.init(k, d)


@pytest.mark.parametrize("name,hp", ALL)
def test_jit_equals_nojit(name, hp):
    m = jmtl.methods.get(name, **hp)
    state_j = state_n = _init(m, K, D)
    for jac, losses, present in _stream(2, seed=4, absent_at=(1,)):
        inputs = _inputs(m, jac, losses, present)
        out_j, state_j = _run(m, inputs, state_j, jit=True)
        out_n, state_n = _run(m, inputs, state_n, jit=False)
        _close(out_j, np.asarray(out_n), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state_j), jax.tree_util.tree_leaves(state_n),
                    strict=True):
        _close(a, np.asarray(b, np.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,hp", ALL)
@pytest.mark.parametrize("case", ["zeros", "one_task", "duplicates", "tiny", "huge",
                                  "all_absent"])
def test_degenerate_input_finite(name, hp, case):
    m = jmtl.methods.get(name, **hp)
    base_j = _matrix(3, 5, 8)
    jac = {"zeros": np.zeros((3, 5), np.float32), "one_task": base_j[:1],
           "duplicates": np.stack([base_j[0]] * 3), "tiny": 1e-30 * base_j,
           "huge": 1e30 * base_j, "all_absent": base_j}[case]
    k = jac.shape[0]
    present = np.zeros(k, bool) if case == "all_absent" else np.ones(k, bool)
    state = _init(m, k, 5)
    for _ in range(3):
        out, state = _run(m, _inputs(m, jac, np.ones(k, np.float32), present), state)
        assert np.all(np.isfinite(np.asarray(out))), (name, case)
        for leaf in jax.tree_util.tree_leaves(state):
            assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (name, case)
    if case == "all_absent":
        np.testing.assert_array_equal(out, np.zeros_like(out))
        for a, b in zip(jax.tree_util.tree_leaves(state),
                        jax.tree_util.tree_leaves(_init(m, k, 5)), strict=True):
            if np.ndim(a) and np.asarray(a).dtype != np.int32:
                np.testing.assert_array_equal(a, b)
    if case == "one_task" and m.output == "weights":
        _close(out, [1.0])


@pytest.mark.parametrize("name,hp,kind", [
    ("db_mtl", {}, "linear"), ("moco", {"normalize_grads": True}, "invariant"),
    ("excess_mtl", {}, "invariant")])
def test_global_gradient_scale(name, hp, kind):
    # db_mtl's direction is linear in a global gradient scale; moco with normalised
    # gradients and excess_mtl's weights do not depend on it (down to 1e-30, up to 1e30).
    # gradnorm (lr·n step) and plain moco (γ·YYᵀ step) are not scale-free by design.
    m = jmtl.methods.get(name, **hp)
    ones = np.ones(3, np.float32)
    s_ref, s_scaled = {}, {}
    for scale in (1.0, 1e-30, 1e30):
        state = _init(m, 3, 5)
        for t in range(3):
            jac = _matrix(3, 5, 9 + t) * np.float32(scale)
            out, state = _run(m, _inputs(m, jac, ones, np.ones(3, bool)), state)
            out = np.asarray(out, np.float64) / (scale if kind == "linear" else 1.0)
            (s_ref if scale == 1.0 else s_scaled)[(scale, t)] = out
    for (scale, t), out in s_scaled.items():
        if name == "excess_mtl" and scale == 1e-30:
            continue  # the curvature's eps (1e-7) dominates squares of size 1e-60
        _close(out, s_ref[(1.0, t)], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@given(st.permutations(list(range(K))))
def test_permutation_equivariance(perm):
    perm = np.asarray(perm)
    stream = _stream(3, seed=5, absent_at=(1,))
    for name, hp in ALL:
        m = jmtl.methods.get(name, **hp)
        s, sp = _init(m, K, D), _init(m, K, D)
        for jac, losses, present in stream:
            out, s = _run(m, _inputs(m, jac, losses, present), s)
            outp, sp = _run(m, _inputs(m, jac[perm], losses[perm], present[perm]), sp)
            if m.output == "weights":
                _close(outp, np.asarray(out)[perm], rtol=1e-5, atol=1e-6)
            else:
                _close(outp, np.asarray(out), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,hp", ALL)
def test_nan_in_absent_task_does_not_leak(name, hp):
    m = jmtl.methods.get(name, **hp)
    jac, losses, _ = _stream(1, seed=6)[0]
    present = np.array([True, False, True, True])
    bad_j, bad_l = jac.copy(), losses.copy()
    bad_j[1], bad_l[1] = np.nan, np.nan
    out, state = _run(m, _inputs(m, bad_j, bad_l, present), _init(m, K, D))
    ref, ref_state = _run(m, _inputs(m, jac, losses, present), _init(m, K, D))
    _close(out, np.asarray(ref), rtol=1e-6, atol=0)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
