"""jmtl with optax: the GradNorm objective, learnable weights trained by optax (uw, imtl_l,
imtl, gradnorm, famo) and their stability, IMTL-G's least-squares rule and IMTL's heads,
schedules for continuous hyperparameters, ``jmtl.as_gradient_transformation``, and
negative losses given to the ratio- and log-based methods.

References are float64 numpy re-implementations written from the papers (GradNorm,
IMTL's closed form, iRprop⁻, Adam), closed forms, and the stability targets of issue 10.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import jmtl
from jmtl.methods import Inputs, _schedule
from jmtl.methods.base import Output
from tests.test_loss_methods import NpAdam, RefFAMO, ref_dwa

# ----------------------------------------------------------------------------- references


def np_gradnorm_loss_and_grad(w, n, L, L0, alpha):
    """GradNorm loss and its gradient w.r.t. w (Chen et al. 2018, eqs. 1-2), float64."""
    w, n, L, L0 = (np.asarray(x, np.float64) for x in (w, n, L, L0))
    ratio = L / L0
    r = ratio / ratio.mean()
    G = w * n
    T = G.mean() * r ** alpha
    return np.abs(G - T).sum(), np.sign(G - T) * n


class NpIRprop:
    """iRprop⁻ (Igel & Hüsken 2000) in float64 numpy, with a per-task update mask."""

    def __init__(self, k, lr, eta_minus=0.5, eta_plus=1.2, lo=1e-6, hi=1.0):
        self.step_sizes = np.full(k, lr)
        self.prev = np.zeros(k)
        self.em, self.ep, self.lo, self.hi = eta_minus, eta_plus, lo, hi

    def step(self, x, g, valid):
        if not valid.any():
            return x
        prod = np.sign(g) * np.sign(self.prev)
        st = np.where(prod > 0, np.minimum(self.step_sizes * self.ep, self.hi),
                      np.where(prod < 0, np.maximum(self.step_sizes * self.em, self.lo),
                               self.step_sizes))
        g = np.where(prod < 0, 0.0, g)
        self.step_sizes = np.where(valid, st, self.step_sizes)
        self.prev = np.where(valid, g, self.prev)
        return np.where(valid, x - st * np.sign(g), x)


def ref_gradnorm(L_seq, n_seq, p_seq, alpha=1.5, lr=0.025, param="weights", warmup=0,
                 min_weight=1e-6):
    """GradNorm, paper's algorithm (or LibMTL's conventions), iRprop⁻ on the parameters."""
    k = L_seq.shape[1]
    x = np.ones(k) if param == "weights" else np.zeros(k)
    opt = NpIRprop(k, lr)
    l0 = np.zeros(k)
    seen = np.zeros(k, bool)
    acc = [[] for _ in range(k)]
    out = []

    def wof(x):
        if param == "weights":
            return x
        z = np.exp(x - x.max())
        return k * z / z.sum()

    for t, (L, n, p) in enumerate(zip(L_seq, n_seq, p_seq, strict=True)):
        w = wof(x)
        if t < warmup:
            out.append(np.where(p, 1.0, 0.0))
            for i in np.flatnonzero(p):
                acc[i].append(L[i])
            continue
        for i in range(k):
            if not seen[i] and (acc[i] or p[i]):
                l0[i] = np.mean(acc[i]) if acc[i] else L[i]
                seen[i] = True
        out.append(np.where(p, w, 0.0))
        if not p.any():
            continue
        idx = np.flatnonzero(p)
        _, gw = np_gradnorm_loss_and_grad(w[idx], n[idx], L[idx], l0[idx], alpha)
        g = np.zeros(k)
        if param == "weights":
            g[idx] = gw
        else:
            full = np.zeros(k)
            full[idx] = gw
            z = w / k
            g = k * (z * full - z * np.sum(z * full))
        new = opt.step(x, g, p)
        if param == "weights":
            new = np.where(p, np.maximum(new, min_weight), new)
            new = np.where(p, new * x[p].sum() / new[p].sum(), new)
        x = new
    return np.stack(out), wof(x)


def np_imtl_g(jac):
    """IMTL-G, the paper's closed form: α_{2..K} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 - Σ α_{2..K}."""
    jac = np.asarray(jac, np.float64)
    unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    D = jac[:1] - jac[1:]
    U = unit[:1] - unit[1:]
    a = jac[0] @ U.T @ np.linalg.inv(D @ U.T)
    return np.concatenate([[1 - a.sum()], a])


def _scan(method, inputs_fn, steps, k):
    """Weights over `steps` jitted updates with lax.scan (inputs_fn(t) -> Inputs)."""

    @jax.jit
    def run(state):
        def body(st, t):
            w, st = method.update(inputs_fn(t), st)
            if isinstance(w, Output):
                w = w.out
            return st, w

        return jax.lax.scan(body, state, jnp.arange(steps))

    state, ws = run(method.init(k))
    return np.asarray(ws, np.float64), state


# ----------------------------------------------------------------------------- objective


def test_gradnorm_objective_value_and_gradient_against_hand_formula():
    rng = np.random.default_rng(0)
    names = ["depth", "normal", "seg"]
    w = rng.uniform(0.2, 2.0, 3)
    n = rng.uniform(0.1, 10.0, 3)
    L = rng.uniform(0.1, 3.0, 3)
    L0 = rng.uniform(0.5, 3.0, 3)
    tree = lambda v: {t: jnp.float32(x) for t, x in zip(names, v, strict=True)}  # noqa: E731
    for alpha in (0.0, 0.12, 1.5):
        val, grads = jax.value_and_grad(jmtl.objectives.gradnorm, argnums=(0, 1, 2, 3))(
            tree(w), tree(n), tree(L), tree(L0), alpha)
        want_val, want_grad = np_gradnorm_loss_and_grad(w, n, L, L0, alpha)
        np.testing.assert_allclose(float(val), want_val, rtol=1e-5)
        np.testing.assert_allclose([grads[0][t] for t in names], want_grad, rtol=1e-6)
        # only the weights are trained by the GradNorm loss
        for g in grads[1:]:
            assert all(float(g[t]) == 0.0 for t in names)


def test_gradnorm_objective_arrays_jit_and_target_is_constant():
    w, n = jnp.array([1.0, 1.0]), jnp.array([1.0, 3.0])
    L = jnp.array([2.0, 1.0])
    f = jax.jit(jax.grad(jmtl.objectives.gradnorm))
    # r = (2, 1) / 1.5; T = 2 * r^1.5; sign(w n - T) n
    T = 2.0 * (np.array([2.0, 1.0]) / 1.5) ** 1.5
    np.testing.assert_allclose(f(w, n, L, jnp.ones(2)), np.sign([1.0, 3.0] - T) * [1.0, 3.0])


def test_gradnorm_objective_errors_name_tasks():
    ok = {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"gradnorm.*\bc\b"):
        jmtl.objectives.gradnorm(ok, {"a": 1.0, "c": 1.0}, ok, ok)
    with pytest.raises(ValueError, match=r"gradnorm: losses must be positive.*b=-1"):
        jmtl.objectives.gradnorm(ok, ok, {"a": 1.0, "b": -1.0}, ok)
    with pytest.raises(ValueError, match=r"initial_losses must be positive.*a=0"):
        jmtl.objectives.gradnorm(ok, ok, ok, {"a": 0.0, "b": 1.0})
    # α = 0 does not use the ratios: any loss is accepted
    assert float(jmtl.objectives.gradnorm(ok, ok, {"a": 1.0, "b": -1.0}, ok, alpha=0.0)) == 0
    with pytest.raises(checkify.JaxRuntimeError, match="gradnorm"):
        jmtl.checked(jax.jit(lambda L: jmtl.objectives.gradnorm(ok, ok, L, ok)))(
            {"a": jnp.float32(1.0), "b": jnp.float32(-1.0)})


# ----------------------------------------------------------------------------- UW and IMTL-L


@pytest.mark.parametrize("name,kind", [("uw", "log_variance"), ("uw", "regression"),
                                       ("imtl_l", None)])
def test_learned_scales_balance_losses_from_1e_minus3_to_1e4(name, kind):
    """Stability target of issue 10: w_i L_i equal within 10%, no task ever dropped."""
    L = jnp.array([1e-3, 1e-1, 1.0, 1e2, 1e4], jnp.float32)
    k = L.shape[0]
    m = jmtl.uw(kind=kind) if name == "uw" else jmtl.imtl_l()
    ws, _ = _scan(m, lambda t: Inputs(present=jnp.ones(k, bool), losses=L), 2000, k)
    wl = ws * np.asarray(L, np.float64)
    final = wl[-1]
    assert final.max() / final.min() < 1.1, final
    eq = final.mean()
    # never dropped: no w_i L_i falls below 90% of min(start, equilibrium)
    floor = 0.9 * np.minimum(wl[0], eq)
    assert np.all(wl.min(axis=0) >= floor), (wl.min(axis=0), floor)
    # settled: no oscillation over the last 500 steps
    assert np.all(np.ptp(wl[-500:], axis=0) <= 0.01 * eq)


def test_uw_against_float64_adam_reference_with_absent_task():
    rng = np.random.default_rng(3)
    L = rng.uniform(0.1, 5.0, (12, 3)) * np.array([1.0, 100.0, 0.01])
    p = np.ones(L.shape, bool)
    p[4, 1] = p[5, 1] = False
    m = jmtl.uw(lr=0.05)
    state = m.init(3)
    s = np.zeros(3)
    adam = NpAdam(3, 0.05, clip=1.0)
    for t in range(len(L)):
        w, state = m.update(Inputs(jnp.asarray(p[t]), jnp.asarray(L[t], jnp.float32)), state)
        np.testing.assert_allclose(w, np.where(p[t], np.exp(-s), 0.0), rtol=1e-5)
        s = adam.step(s, 1 - np.exp(-s) * L[t], p[t])
        np.testing.assert_allclose(state.log_vars, s, rtol=1e-5, atol=1e-6)


def test_uw_custom_optimizer_is_used():
    m = jmtl.uw(optimizer=optax.sgd(0.1))
    _, state = m.update(Inputs(jnp.array([True, True]), jnp.array([3.0, 1.0])), m.init(2))
    np.testing.assert_allclose(state.log_vars, [0.2, 0.0], rtol=1e-6)  # s - 0.1 (1 - L)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        jmtl.uw(optimizer="adam")


# ----------------------------------------------------------------------------- GradNorm


@pytest.mark.parametrize("param,norms", [
    ("weights", [1.0, 10.0]), ("weights", [1.0, 1e3]), ("weights", [1.0, 30.0, 1e3]),
    ("weights", [1e-20, 1e-17]), ("weights", [1e20, 1e23]),
    ("softmax", [1.0, 1e3]), ("softmax", [1.0, 30.0, 1e3]), ("softmax", [1e-20, 1e-17]),
])
def test_gradnorm_settles_at_inverse_norms_without_oscillation(param, norms):
    """Stability target of issue 10: w ∝ 1/n within 5%, no oscillation, ratios to 1e3."""
    n = jnp.asarray(norms, jnp.float32)
    k = n.shape[0]
    m = jmtl.gradnorm(parameterization=param)
    ws, _ = _scan(m, lambda t: Inputs(present=jnp.ones(k, bool), losses=jnp.ones(k),
                                      grad_norms=n), 3000, k)
    target = 1 / np.asarray(norms, np.float64)
    target = k * target / target.sum()
    assert np.all(np.abs(ws[-1] / target - 1) < 0.05), (ws[-1], target)
    swing = np.ptp(ws[-500:], axis=0) / target
    assert np.all(swing < 0.01), swing
    np.testing.assert_allclose(ws[-1].sum(), k, rtol=1e-4)


def test_gradnorm_adam_would_oscillate():
    """Why iRprop⁻ is the default: Adam at the same rate circles the equilibrium."""
    n = jnp.array([1.0, 100.0])
    m = jmtl.gradnorm(optimizer=optax.adam(0.025))
    ws, _ = _scan(m, lambda t: Inputs(present=jnp.ones(2, bool), losses=jnp.ones(2),
                                      grad_norms=n), 3000, 2)
    target = 2 * np.array([100.0, 1.0]) / 101.0
    assert (np.ptp(ws[-500:], axis=0) / target).max() > 0.1


@pytest.mark.parametrize("param,warmup,alpha", [("weights", 0, 1.5), ("softmax", 0, 0.5),
                                                ("weights", 3, 1.5), ("softmax", 3, 1.5)])
def test_gradnorm_against_float64_reference(param, warmup, alpha):
    rng = np.random.default_rng(7)
    steps, k = 14, 3
    L = rng.uniform(0.2, 3.0, (steps, k))
    n = rng.uniform(0.1, 5.0, (steps, k)) * np.array([1.0, 10.0, 0.3])
    p = np.ones((steps, k), bool)
    p[1, 2] = p[5, 0] = p[6, 0] = False
    p[0, 1] = False  # task 1's L(0) is set later
    m = jmtl.gradnorm(alpha=alpha, parameterization=param, warmup_steps=warmup)
    state = m.init(k)
    ws = []
    for t in range(steps):
        w, state = m.update(Inputs(jnp.asarray(p[t]), jnp.asarray(L[t], jnp.float32),
                                   grad_norms=jnp.asarray(n[t], jnp.float32)), state)
        ws.append(np.asarray(w))
    want, w_final = ref_gradnorm(L, n, p, alpha=alpha, param=param, warmup=warmup)
    np.testing.assert_allclose(np.stack(ws), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights, w_final, rtol=2e-5, atol=1e-6)
    if warmup:
        np.testing.assert_allclose(np.stack(ws)[:warmup], p[:warmup].astype(float))


def test_gradnorm_first_loss_is_l0_and_absent_tasks_keep_state():
    m = jmtl.gradnorm()
    state = m.init(3)
    present = jnp.array([True, True, False])
    L = jnp.array([1.0, 2.0, jnp.nan])  # an absent task's loss may be NaN
    for _ in range(3):
        w, state = m.update(Inputs(present, L, grad_norms=jnp.array([1.0, 4.0, jnp.nan])),
                            state)
    assert float(w[2]) == 0.0 and np.all(np.isfinite(np.asarray(state.weights)))
    np.testing.assert_allclose(state.initial_losses, [1.0, 2.0, 0.0])
    assert float(state.weights[2]) == 1.0 and float(state.params[2]) == 1.0
    assert not bool(state.seen[2])


def test_gradnorm_negative_losses():
    m = jmtl.gradnorm()
    inp = Inputs(jnp.array([True, True]), jnp.array([1.0, -2.0]), grad_norms=jnp.ones(2))
    with pytest.raises(ValueError, match=r"gradnorm: losses must be positive.*task 1"):
        m.update(inp, m.init(2))
    w, _ = jmtl.gradnorm(alpha=0.0).update(inp, m.init(2))  # α = 0: no ratios, accepted
    np.testing.assert_allclose(w, [1.0, 1.0])
    with pytest.raises(checkify.JaxRuntimeError, match="gradnorm"):
        jmtl.checked(jax.jit(lambda i: m.update(i, m.init(2))))(inp)
    with pytest.raises(ValueError, match="parameterization"):
        jmtl.gradnorm(parameterization="log")


# ----------------------------------------------------------------------------- FAMO


def test_famo_default_optimizer_is_the_official_adam_with_decay():
    L = np.random.default_rng(5).uniform(0.1, 5.0, (10, 3))
    p = np.ones(L.shape, bool)
    p[4, 1] = p[5, 1] = False
    m = jmtl.famo(gamma=0.01, w_lr=0.1)
    ref = RefFAMO(3, gamma=0.01, lr=0.1)
    state = m.init(3)
    for t in range(len(L)):
        w, state = m.update(Inputs(jnp.asarray(p[t]), jnp.asarray(L[t], jnp.float32)), state)
        np.testing.assert_allclose(w, ref.step(L[t], p[t]), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(state.logits, ref.xi, rtol=1e-4, atol=1e-7)


def test_famo_negative_losses_and_bounds():
    m = jmtl.famo()
    with pytest.raises(ValueError, match=r"famo: losses must be at least.*min_losses"):
        m.update(Inputs(jnp.array([True, True]), jnp.array([1.0, -0.5])), m.init(2))
    # with a lower bound, negative losses are valid: w ∝ 1 / (L - b)
    m = jmtl.famo(min_losses=-1.0)
    w, _ = m.update(Inputs(jnp.array([True, True]), jnp.array([0.0, -0.5])), m.init(2))
    np.testing.assert_allclose(w, [1 / 3, 2 / 3], rtol=1e-5)
    with pytest.raises(checkify.JaxRuntimeError, match="famo"):
        jmtl.checked(jax.jit(lambda v: jmtl.famo().update(Inputs(jnp.array([True, True]), v),
                                                  jmtl.famo().init(2))))(jnp.array([1.0, -1.0]))


@pytest.mark.parametrize("name", ["uw", "dwa", "imtl_l"])
def test_negative_losses_rejected(name):
    m = jmtl.methods.get(name)
    inp = Inputs(jnp.array([True, True]), jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match=rf"{name}: losses must be non-negative.*task 1"):
        m.update(inp, m.init(2))
    with pytest.raises(checkify.JaxRuntimeError, match=name):
        jmtl.checked(jax.jit(lambda i: m.update(i, m.init(2))))(inp)
    # an absent task's negative (or NaN) loss is ignored
    w, _ = m.update(Inputs(jnp.array([True, False]), jnp.array([1.0, -1.0])), m.init(2))
    assert float(w[1]) == 0.0


# ----------------------------------------------------------------------------- IMTL


def _rank1_both_ways(seed, k=4, d=6, dtype=np.float32):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=d)
    a = rng.uniform(0.5, 3.0, k) * np.where(np.arange(k) % 2 == 0, 1.0, -1.0)
    return (a[:, None] * v[None, :]).astype(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imtl_g_rank_deficient_both_ways_is_zero_for_every_row_order(seed):
    jac = _rank1_both_ways(seed)
    m = jmtl.imtl_g()
    agg = jax.jit(lambda j: jmtl.aggregate(m, j, m.init(j.shape[0]))[0])
    for perm in itertools.permutations(range(jac.shape[0])):
        upd = agg(jnp.asarray(jac[list(perm)]))
        assert np.all(np.asarray(upd) == 0.0), (perm, upd)
    two = np.array([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]], np.float32)
    for rows in (two, two[::-1]):
        np.testing.assert_array_equal(jmtl.aggregate(m, jnp.asarray(rows), m.init(2))[0], 0.0)


def test_imtl_g_duplicated_rows_follow_least_squares_and_are_equivariant():
    rng = np.random.default_rng(4)
    g = rng.normal(size=(3, 7))
    jac = np.concatenate([g, g[:1]])  # task 3 duplicates task 0: C singular, consistent
    want = np_imtl_g(g) @ g  # the update of the distinct tasks
    m = jmtl.imtl_g()
    agg = jax.jit(lambda j: jmtl.aggregate(m, j, m.init(4))[0])
    for perm in itertools.permutations(range(4)):
        upd = agg(jnp.asarray(jac[list(perm)], jnp.float32))
        np.testing.assert_allclose(upd, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e10, 1e20])
def test_imtl_g_scale_free_float32(scale):
    rng = np.random.default_rng(8)
    jac = rng.normal(size=(4, 9))
    alpha = np_imtl_g(jac)
    m = jmtl.imtl_g()
    for mul in (scale, scale * np.array([[1.0], [1e-3], [1.0], [1e2]])):
        j = jac * mul
        w, _ = m.update(Inputs(jnp.ones(4, bool), gramian=jnp.asarray(
            (j / np.abs(j).max()) @ (j / np.abs(j).max()).T, jnp.float32)), m.init(4))
        np.testing.assert_allclose(w, np_imtl_g(j), rtol=2e-4, atol=1e-6)
        upd, _ = jmtl.aggregate(m, jnp.asarray(j, jnp.float32), m.init(4))
        want = alpha @ jac * 1.0
        got = np.asarray(upd, np.float64)
        cos = got @ (np_imtl_g(j) @ j) / (np.linalg.norm(got) * np.linalg.norm(np_imtl_g(j) @ j))
        assert cos > 0.9999 and np.all(np.isfinite(got))
        del want


def test_imtl_full_against_reference_and_heads():
    rng = np.random.default_rng(9)
    jac = rng.normal(size=(3, 5))
    s = np.array([0.5, -1.0, 0.2], np.float32).astype(np.float64)
    losses = np.array([1.0, 2.0, 0.5])
    m = jmtl.imtl(lr=0.1)
    state = m.init(3)._replace(log_scales=jnp.asarray(s, jnp.float32))
    inp = Inputs(jnp.ones(3, bool), jnp.asarray(losses, jnp.float32),
                 gramian=jnp.asarray(jac @ jac.T, jnp.float32))
    out, new = m.update(inp, state)
    assert isinstance(out, Output)
    alpha = np_imtl_g(np.exp(s)[:, None] * jac)  # IMTL-G on the scaled gradients
    np.testing.assert_allclose(out.out, alpha * np.exp(s), rtol=1e-4)
    np.testing.assert_allclose(out.head_weights, np.exp(s), rtol=1e-6)  # heads: e^s ∇L
    want_s = NpAdam(3, 0.1, clip=1.0).step(s, np.exp(s) * losses - 1, np.ones(3, bool))
    np.testing.assert_allclose(new.log_scales, want_s, rtol=1e-5)
    plain, _ = jmtl.imtl(lr=0.1, heads="unweighted").update(inp, state)
    assert not isinstance(plain, Output)
    np.testing.assert_allclose(plain, out.out, rtol=1e-6)
    # absent task: head weight 0, scale untouched
    out, new = m.update(inp._replace(present=jnp.array([True, False, True])), state)
    assert float(out.head_weights[1]) == 0.0 and float(out.out[1]) == 0.0
    assert float(new.log_scales[1]) == pytest.approx(s[1])


# ----------------------------------------------------------------------------- schedules


class _TraceCounter:
    def __init__(self):
        self.n = 0


def test_schedule_gradnorm_alpha_no_retrace_and_matches_reference():
    sched = optax.linear_schedule(0.0, 1.5, 6)
    m = jmtl.gradnorm(alpha=sched)
    assert m is jmtl.gradnorm(alpha=sched)  # cached: jit caches keyed on it hit
    rng = np.random.default_rng(1)
    L = rng.uniform(0.2, 3.0, (8, 2))
    n = rng.uniform(0.5, 3.0, (8, 2))
    counter = _TraceCounter()

    @jax.jit
    def step(state, losses, norms):
        counter.n += 1
        return m.update(Inputs(jnp.ones(2, bool), losses, grad_norms=norms), state)

    state = m.init(2)
    ws = []
    for t in range(8):
        w, state = step(state, jnp.asarray(L[t], jnp.float32), jnp.asarray(n[t], jnp.float32))
        ws.append(np.asarray(w))
    assert counter.n == 1
    assert int(state.count) == 8
    # reference: the paper's algorithm with α_t = sched(t)
    k = 2
    x, opt, want = np.ones(k), NpIRprop(k, 0.025), []
    for t in range(8):
        want.append(x.copy())
        _, g = np_gradnorm_loss_and_grad(x, n[t], L[t], L[0], float(sched(t)))
        x = opt.step(x, g, np.ones(k, bool))
        x = np.maximum(x, 1e-6)
        x = x * k / x.sum()
    np.testing.assert_allclose(np.stack(ws), np.stack(want), rtol=1e-5)


def test_schedule_famo_w_lr_matches_reference_with_per_step_rate():
    sched = optax.exponential_decay(0.1, 3, 0.5)
    m = jmtl.famo(w_lr=sched)
    L = np.random.default_rng(2).uniform(0.1, 3.0, (7, 3))
    ref = RefFAMO(3, lr=0.1)
    step = jax.jit(m.update)
    state = m.init(3)
    for t in range(7):
        ref.adam.lr = float(sched(t))
        w, state = step(Inputs(jnp.ones(3, bool), jnp.asarray(L[t], jnp.float32)), state)
        np.testing.assert_allclose(w, ref.step(L[t], np.ones(3, bool)), rtol=1e-4, atol=1e-7)


def test_schedule_dwa_stch_uw_and_jnp_scalars():
    L = np.random.default_rng(3).uniform(0.2, 3.0, (6, 3))
    p = np.ones(L.shape, bool)
    for m in (jmtl.dwa(T=optax.constant_schedule(2.0)), jmtl.dwa(T=jnp.float32(2.0))):
        state, ws = m.init(3), []
        for t in range(6):
            w, state = jax.jit(m.update)(Inputs(jnp.ones(3, bool),
                                                jnp.asarray(L[t], jnp.float32)), state)
            ws.append(np.asarray(w))
        np.testing.assert_allclose(np.stack(ws), ref_dwa(L, p, 2.0, 1), rtol=1e-5)
    for m, ref in ((jmtl.stch(mu=optax.constant_schedule(0.5)), jmtl.stch(mu=0.5)),
                   (jmtl.uw(lr=optax.constant_schedule(0.05)), jmtl.uw(lr=0.05)),
                   (jmtl.uw(lr=jnp.float32(0.05)), jmtl.uw(lr=0.05))):
        s1, s2 = m.init(3), ref.init(3)
        for t in range(4):
            inp = Inputs(jnp.ones(3, bool), jnp.asarray(L[t], jnp.float32))
            w1, s1 = jax.jit(m.update)(inp, s1)
            w2, s2 = ref.update(inp, s2)
            np.testing.assert_allclose(w1, w2, rtol=1e-6)


@pytest.mark.parametrize("bad", ["0.4", None, True, 1j, object(), [None]])
def test_non_numeric_hyperparameters_rejected_at_build(bad):
    with pytest.raises(TypeError, match=r"method 'gradnorm': hyperparameter `alpha`"):
        jmtl.gradnorm(alpha=bad)
    with pytest.raises(TypeError, match=r"method 'cagrad': hyperparameter `c`"):
        jmtl.cagrad(c=bad)


def test_scheduled_state_checked():
    m = jmtl.uw(lr=optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="ScheduledState"):
        m.update(Inputs(jnp.ones(2, bool), jnp.ones(2)), jmtl.uw().init(2))


def test_cagrad_c_schedule_mean_then_cagrad():
    sched = optax.linear_schedule(0.0, 0.4, 10)
    m = jmtl.cagrad(c=sched)
    rng = np.random.default_rng(11)
    jac = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    step = jax.jit(lambda st: jmtl.aggregate(m, jac, st))
    ref = jmtl.cagrad(c=0.4)
    mean_rows = np.asarray(jac).mean(0)
    state = m.init(3)
    for t in range(12):
        upd, state = step(state)
        if t == 0:
            np.testing.assert_allclose(upd, mean_rows, rtol=1e-5, atol=1e-6)
        if t >= 10:
            want, _ = jmtl.aggregate(ref, jac, ref.init(3))
            np.testing.assert_allclose(upd, want, rtol=1e-5, atol=1e-6)
    # the reference really differs from the mean
    assert np.abs(np.asarray(jmtl.aggregate(ref, jac, ref.init(3))[0]) - mean_rows).max() > 1e-2


# ----------------------------------------------------------------------------- optax adapter


def _jac_tree(seed, k=3):
    rng = np.random.default_rng(seed)
    return {"dense": {"kernel": jnp.asarray(rng.normal(size=(k, 4, 2)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(k, 2)), jnp.float32)}}


@pytest.mark.parametrize("name", ["upgrad", "mgda", "mean", "gradnorm"])
def test_chain_with_sgd_equals_minus_lr_times_aggregate(name):
    m = jmtl.methods.get(name)
    jac = _jac_tree(0)
    params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), jac)
    losses = {"a": 1.0, "b": 2.0, "c": 0.5}
    tx = optax.chain(jmtl.as_gradient_transformation(m, num_tasks=3), optax.sgd(0.1))
    state = tx.init(params)
    upd = jax.jit(tx.update)
    want_state = m.init(3)
    for _ in range(3):
        updates, state = upd(jac, state, params, losses=losses)
        want, want_state = jmtl.aggregate(m, jac, want_state, losses=losses)
        jax.tree_util.tree_map(
            lambda u, w: np.testing.assert_allclose(u, -0.1 * np.asarray(w), rtol=1e-5,
                                                    atol=1e-7), updates, want)


def test_chain_extra_args_key_and_present():
    m = jmtl.pcgrad()
    jac = _jac_tree(1)
    params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), jac)
    tx = optax.chain(jmtl.as_gradient_transformation(m, num_tasks=3), optax.adam(1e-3))
    state = tx.init(params)
    key = jax.random.key(0)
    present = jnp.array([True, False, True])
    updates, state = tx.update(jac, state, params, key=key, present=present)
    inner, _ = optax.adam(1e-3).update(
        jmtl.aggregate(m, jac, m.init(3), key=key, present=present)[0],
        optax.adam(1e-3).init(params), params)
    jax.tree_util.tree_map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-5),
                           updates, inner)
    with pytest.raises(ValueError, match="needs `key`"):
        tx.update(jac, state, params)


def test_bare_method_in_chain_fails_at_init_naming_the_adapter():
    tx = optax.chain(jmtl.upgrad(), optax.adam(1e-3))
    with pytest.raises(TypeError, match="as_gradient_transformation"):
        tx.init({"w": jnp.zeros(3)})
    with pytest.raises(TypeError, match="as_gradient_transformation"):
        jmtl.gradnorm().init(jnp.zeros(3))
    assert jmtl.upgrad().init(3) == jmtl.methods.EmptyState()


def test_adapter_errors():
    with pytest.raises(TypeError, match="jmtl Method"):
        jmtl.as_gradient_transformation(optax.adam(1e-3), num_tasks=2)
    with pytest.raises(TypeError, match="num_tasks"):
        jmtl.as_gradient_transformation(jmtl.upgrad(), num_tasks=2.0)
    tx = jmtl.as_gradient_transformation(jmtl.upgrad(), num_tasks=3)
    with pytest.raises(ValueError, match="leading task axis of size 3"):
        tx.update({"w": jnp.ones((2, 4))}, tx.init({"w": jnp.zeros(4)}))


def test_masked_step_leaves_absent_statistics():
    opt = optax.adam(0.1)
    x = jnp.zeros(3)
    st = opt.init(x)
    nx, nst = _schedule.masked_step(opt, x, jnp.array([1.0, 5.0, -1.0]), st,
                                    jnp.array([True, False, True]))
    assert float(nx[1]) == 0.0 and float(nst[0].mu[1]) == 0.0 and float(nst[0].nu[1]) == 0.0
    nx2, nst2 = _schedule.masked_step(opt, nx, jnp.ones(3), nst, jnp.zeros(3, bool))
    np.testing.assert_array_equal(nx2, nx)
    assert int(nst2[0].count) == int(nst[0].count) == 1


@pytest.mark.parametrize("name", ["uw", "gradnorm", "famo", "dwa", "imtl_l", "stch"])
def test_wrong_state_named(name):
    m = jmtl.methods.get(name)
    inp = Inputs(jnp.ones(2, bool), jnp.ones(2), grad_norms=jnp.ones(2))
    with pytest.raises(ValueError, match=rf"method '{name}': expected an? \w+State for 2 "
                                         rf"tasks, got a state for 3 tasks"):
        m.update(inp, m.init(3))
    with pytest.raises(ValueError, match=rf"method '{name}': expected .* got EmptyState"):
        m.update(inp, jmtl.methods.EmptyState())
