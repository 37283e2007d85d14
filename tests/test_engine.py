"""Tests of ``jmtl.engine.value_and_mtl_grad`` against brute force.

The reference computes each task's gradient with its own ``jax.grad``, stacks the
shared parts into an explicit Jacobian, runs ``jmtl.aggregate`` on it, recovers the
weights of a weighting method by least squares (``J_sharedᵀ w = update`` in float64),
and assembles the task-specific gradients by hand.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmtl
from jmtl.engine import num_shared, shared_mask, value_and_mtl_grad
from jmtl.methods import base
from jmtl.testing import build_example
from tests import _tiers

K = 3
NAMES = ("a", "b", "c")
SHARED = {"trunk": True, "heads": False}
D_IN, H1, H2, BATCH = 4, 6, 5, 8


def make_params(seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3 + K)
    p = {
        "trunk": {"w1": jax.random.normal(ks[0], (D_IN, H1)) / 2, "b1": jnp.full((H1,), 0.1),
                  "w2": jax.random.normal(ks[1], (H1, H2)) / 2, "b2": jnp.full((H2,), -0.1)},
        "heads": {n: {"w": jax.random.normal(ks[3 + i], (H2,)), "b": jnp.asarray(0.1 * i)}
                  for i, n in enumerate(NAMES)},
    }
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), p)


def make_batch(seed, batch=BATCH):
    kx, ky = jax.random.split(jax.random.PRNGKey(100 + seed))
    x = jax.random.normal(kx, (batch, D_IN))
    y = jax.random.normal(ky, (batch, K))
    return x, y


def encode(p, x, y):
    t = p["trunk"]
    h = jnp.tanh(x @ t["w1"] + t["b1"])
    return jnp.tanh(h @ t["w2"] + t["b2"])


def heads_loss(p, z, x, y):
    out = {}
    for i, n in enumerate(NAMES):
        h = p["heads"][n]
        pred = z @ h["w"] + h["b"]
        out[n] = jnp.mean((pred - y[:, i].astype(pred.dtype)) ** 2) + 0.05 * (i + 1)
    return out


def loss_fn(p, x, y):
    return heads_loss(p, encode(p, x.astype(p["trunk"]["w1"].dtype), y), x, y)


D_SHARED = D_IN * H1 + H1 + H1 * H2 + H2
D_FEATURES = BATCH * H2


def build_method(name):
    # Fails (never skips) when a method cannot be built with the shared example table.
    return build_example(name, 3)


# ------------------------------------------------------------------ probe methods
# Methods written for these tests: their state records exactly what the engine gave
# them, so the Gramian, the norms and the flat Jacobian are compared with brute force.


class Probe(NamedTuple):
    gram: jax.Array
    norms: jax.Array
    flat_sq: jax.Array
    losses: jax.Array


def probe(needs, output="weights", task_specific=False, name="probe"):
    needs = frozenset(needs)

    def init(num_tasks, dim=None):
        return Probe(jnp.zeros((num_tasks, num_tasks)), jnp.zeros(num_tasks),
                     jnp.zeros(num_tasks), jnp.zeros(num_tasks))

    def update(inp, state):
        p = inp.present.astype(jnp.float32)
        k = p.shape[0]
        # The method sees the Gramian of pre-scaled rows; J Jᵀ = scale² · gramian.
        gram = (inp.gramian * base.gram_scale(inp) ** 2 if inp.gramian is not None
                else jnp.zeros((k, k)))
        norms = inp.grad_norms if inp.grad_norms is not None else jnp.zeros(k)
        losses = inp.losses if inp.losses is not None else jnp.zeros(k)
        flat_sq = jnp.sum(inp.jacobian ** 2, 1) if inp.jacobian is not None else jnp.zeros(k)
        # Non-trivial weights that depend on everything the method sees.
        w = p * (1.0 + jnp.diag(gram) / (jnp.trace(gram) + 1.0) + 0.3 * norms
                 + 0.1 * losses + 0.2 * jnp.arange(k))
        new = Probe(gram, norms, flat_sq, losses)
        if output == "direction":
            rows = inp.jacobian
            return jnp.sum(w[:, None] * rows * jnp.tanh(rows), 0), new
        return w, new

    return base.Method(name=name, init=init, update=update, needs=needs, output=output,
                       weights_task_specific=task_specific)


# ---------------------------------------------------------------------- reference


def _stack_rows(grads):
    return jax.tree_util.tree_map(lambda *g: jnp.stack(g), *grads)


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).reshape(-1)
                           for x in jax.tree_util.tree_leaves(tree)])


def _flat_rows(jac):
    return np.concatenate([np.asarray(x, np.float64).reshape(K, -1)
                           for x in jax.tree_util.tree_leaves(jac)], axis=1)


def _aggregate_with_heads(method, jac, state, **kw):
    """``jmtl.aggregate`` run eagerly, also returning the heads' own weights (``Output``)."""
    seen = []

    def update(inputs, st):
        out, new = method.update(inputs, st)
        if isinstance(out, base.Output):
            seen.append(np.asarray(out.head_weights, np.float64))
        return out, new

    update_out, new_state = jmtl.aggregate(method._replace(update=update), jac, state, **kw)
    return update_out, new_state, (seen[0] if seen else None)


def _head_coeffs(method, jac, update, present, head_weights=None):
    """c_i for the task-specific parameters, found independently of the engine."""
    pres = np.asarray(present, np.float64)
    if head_weights is not None:
        return head_weights * pres
    if not (method.weights_task_specific and method.output == "weights"):
        return pres
    # Weights by least squares: J_flatᵀ w = update (rows are linearly independent).
    w, *_ = np.linalg.lstsq(_flat_rows(jac).T, _flat(update), rcond=None)
    return w * pres


def reference_params(method, params, state, x, y, *, key=None, present=None):
    pres = np.ones(K, bool) if present is None else np.asarray(present)
    per_task = [jax.grad(lambda p, n=n: loss_fn(p, x, y)[n])(params) for n in NAMES]
    jac = _stack_rows([g["trunk"] for g in per_task])
    losses = loss_fn(params, x, y)
    update, new_state, hw = _aggregate_with_heads(method, jac, state, losses=losses, key=key,
                                                  present=jnp.asarray(pres))
    c = _head_coeffs(method, jac, update, pres, hw)
    heads = jax.tree_util.tree_map(
        lambda *g: sum(float(ci) * np.asarray(gi, np.float64) for ci, gi in zip(c, g,
                                                                                strict=True)),
        *[g["heads"] for g in per_task])
    return losses, {"trunk": update, "heads": heads}, new_state


def reference_features(method, params, state, x, y, *, key=None, present=None):
    pres = np.ones(K, bool) if present is None else np.asarray(present)
    z, enc_vjp = jax.vjp(lambda p: encode(p, x, y), params)
    jac_z = _stack_rows([jax.grad(lambda zz, n=n: heads_loss(params, zz, x, y)[n])(z)
                         for n in NAMES])
    losses = heads_loss(params, z, x, y)
    upd_z, new_state, hw = _aggregate_with_heads(method, jac_z, state, losses=losses, key=key,
                                                 present=jnp.asarray(pres))
    c = _head_coeffs(method, jac_z, upd_z, pres, hw)
    per_task_p = [jax.grad(lambda p, n=n: heads_loss(p, z, x, y)[n])(params) for n in NAMES]
    head_part = jax.tree_util.tree_map(
        lambda *g: sum(float(ci) * np.asarray(gi, np.float64) for ci, gi in zip(c, g,
                                                                                strict=True)),
        *per_task_p)
    (enc_part,) = enc_vjp(upd_z)
    grads = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) + b, enc_part,
                                   head_part)
    return losses, grads, new_state


def assert_tree_close(actual, expected, rtol=2e-3, what=""):
    la, ta = jax.tree_util.tree_flatten(actual)
    le, te = jax.tree_util.tree_flatten(expected)
    assert ta == te, f"{what}: structures differ {ta} vs {te}"
    for i, (a, e) in enumerate(zip(la, le, strict=True)):
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a64.shape == e64.shape, f"{what}: leaf {i} shape {a64.shape} vs {e64.shape}"
        scale = max(float(np.max(np.abs(e64), initial=0.0)), 1e-6)
        np.testing.assert_allclose(a64, e64, rtol=rtol, atol=rtol * scale,
                                   err_msg=f"{what}: leaf {i}")


# -------------------------------------------------------------- every method, two modes


KEY = jax.random.PRNGKey(7)


def _run_two_steps(grad_fn, method, params, state0, mode):
    """Two steps, the second with task 'b' absent.

    In params mode the first step runs without jit and the second with jit; in features
    mode both are jitted (features mode without jit is covered by the probe tests).

    Returns the engine's and the reference's outputs.
    """
    ref_fn = reference_params if mode == "params" else reference_features
    out_e, out_r = [], []
    se, sr = state0, state0
    jitted = jax.jit(grad_fn)
    for step, present in ((0, None), (1, np.array([True, False, True]))):
        x, y = make_batch(step)
        key = jax.random.fold_in(KEY, step)
        kw = {} if present is None else {"present": jnp.asarray(present)}
        fn = grad_fn if (step == 0 and mode == "params") else jitted
        le, ge, se = fn(params, se, x, y, key=key, **kw)
        lr, gr, sr = ref_fn(method, params, sr, x, y, key=key, present=present)
        out_e.append((le, ge, se))
        out_r.append((lr, gr, sr))
    return out_e, out_r


@pytest.mark.parametrize("name, mode", _tiers.method_modes())
def test_every_method_matches_brute_force(name, mode):
    method = build_method(name)
    params = make_params()
    dim = D_SHARED if mode == "params" else D_FEATURES
    state0 = method.init(K, dim=dim)
    if mode == "params":
        grad_fn = value_and_mtl_grad(loss_fn, method, shared=SHARED)
    else:
        grad_fn = value_and_mtl_grad(heads_loss, method, encoder=encode)
    assert jax.tree_util.tree_structure(grad_fn.init(params, *make_batch(0))) == \
        jax.tree_util.tree_structure(state0)
    out_e, out_r = _run_two_steps(grad_fn, method, params, state0, mode)
    for step, (e, r) in enumerate(zip(out_e, out_r, strict=True)):
        for part, a, b in zip(("losses", "grads", "state"), e, r, strict=True):
            assert_tree_close(a, b, what=f"{name}/{mode}/step {step}/{part}")
        for leaf in jax.tree_util.tree_leaves(e[1]):
            assert np.all(np.isfinite(np.asarray(leaf)))
    # The absent task's head gets nothing.
    if mode == "params":
        assert np.all(np.asarray(out_e[1][1]["heads"]["b"]["w"]) == 0.0)


# ------------------------------------------------------------ probes: what methods see


PROBES = {
    "gramian": probe({base.GRAMIAN, base.LOSSES}),
    "gramian_task_specific": probe({base.GRAMIAN}, task_specific=True),
    "norms": probe({base.GRAD_NORMS, base.LOSSES}, task_specific=True),
    "jacobian": probe({base.JACOBIAN}),
    "direction": probe({base.JACOBIAN, base.GRAMIAN}, output="direction"),
    "loss_only_unweighted_heads": probe({base.LOSSES}),
}


def _brute_force_inputs(x, y, params, mode, norm_leaves=None):
    if mode == "params":
        per_task = [jax.grad(lambda p, n=n: loss_fn(p, x, y)[n])(params)["trunk"]
                    for n in NAMES]
        if norm_leaves is not None:
            per_task_n = [{k: g[k] for k in norm_leaves} for g in per_task]
        else:
            per_task_n = per_task
    else:
        z = encode(params, x, y)
        per_task = [jax.grad(lambda zz, n=n: heads_loss(params, zz, x, y)[n])(z)
                    for n in NAMES]
        per_task_n = per_task
    jf = np.stack([_flat(g) for g in per_task])
    jn = np.stack([_flat(g) for g in per_task_n])
    return jf @ jf.T, np.sqrt(np.sum(jn ** 2, 1)), np.sum(jf ** 2, 1)


@pytest.mark.parametrize("mode", ["params", "features"])
@pytest.mark.parametrize("probe_name", sorted(PROBES))
def test_probe_inputs_and_grads(probe_name, mode):
    method = PROBES[probe_name]
    params = make_params(1)
    x, y = make_batch(3)
    state0 = method.init(K)
    if mode == "params":
        grad_fn = value_and_mtl_grad(loss_fn, method, shared=SHARED)
        ref = reference_params
    else:
        grad_fn = value_and_mtl_grad(heads_loss, method, encoder=encode)
        ref = reference_features
    run = jax.jit(grad_fn) if mode == "params" else grad_fn  # features mode: no jit
    losses, grads, state = run(params, state0, x, y)
    gram, norms, flat_sq = _brute_force_inputs(x, y, params, mode)
    needs = method.needs
    if base.GRAMIAN in needs:
        assert state.gram.dtype == jnp.float32
        np.testing.assert_allclose(state.gram, gram, rtol=1e-4, atol=1e-6 * np.trace(gram))
        np.testing.assert_array_equal(state.gram, state.gram.T)
    if base.GRAD_NORMS in needs:
        np.testing.assert_allclose(state.norms, norms, rtol=1e-4)
    if base.JACOBIAN in needs:
        np.testing.assert_allclose(state.flat_sq, flat_sq, rtol=1e-4)
    _, g_ref, s_ref = ref(method, params, state0, x, y)
    assert_tree_close(grads, g_ref, what=f"{probe_name}/{mode}")
    assert_tree_close(state, s_ref, what=f"{probe_name}/{mode}/state")


# --------------------------------------------------------------------------- options


def _chunk_cases():
    # Gramian without rows (forward-mode columns), norms only, and explicit rows.
    return [
        ("gramian+norms", {base.GRAMIAN, base.GRAD_NORMS, base.LOSSES}, "weights"),
        ("norms", {base.GRAD_NORMS}, "weights"),
        ("direction", {base.JACOBIAN}, "direction"),
    ]


@pytest.mark.parametrize("mode", ["params", "features"])
@pytest.mark.parametrize("case", _tiers.first_fast(_chunk_cases()), ids=lambda c: c[0])
def test_chunking_equals_no_chunking(case, mode):
    chunk_size = 2  # K = 3: two chunks, the last one padded
    _, needs, output = case
    method = probe(needs, output=output)
    params = make_params(2)
    x, y = make_batch(4)
    present = jnp.array([True, True, False])
    outs = []
    for cs in (None, chunk_size):
        if mode == "params":
            fn = value_and_mtl_grad(loss_fn, method, shared=SHARED, chunk_size=cs)
        else:
            fn = value_and_mtl_grad(heads_loss, method, encoder=encode, chunk_size=cs)
        outs.append(jax.jit(fn)(params, method.init(K), x, y, present=present))
    assert_tree_close(outs[1], outs[0], rtol=1e-4, what=f"{case[0]}/{mode}/{chunk_size}")


def test_chunked_bf16_gramian_is_float32_accurate():
    # bf16 model: the chunked Gramian is accumulated pairwise in float32.
    method = probe({base.GRAMIAN})
    params = make_params(3, jnp.bfloat16)
    x, y = make_batch(5)
    outs = [jax.jit(value_and_mtl_grad(loss_fn, method, shared=SHARED, chunk_size=cs))(
        params, method.init(K), x, y) for cs in (None, 2)]
    assert outs[1][2].gram.dtype == jnp.float32
    np.testing.assert_allclose(outs[1][2].gram, outs[0][2].gram, rtol=1e-5,
                               atol=1e-6 * float(jnp.trace(outs[0][2].gram)))


@pytest.mark.parametrize("final_step", ["combine", "vjp"])
@pytest.mark.parametrize("mode", ["params", "features"])
def test_final_step_variants_agree(final_step, mode):
    method = PROBES["gramian_task_specific"]
    params = make_params(4)
    x, y = make_batch(6)
    if mode == "params":
        fn = value_and_mtl_grad(loss_fn, method, shared=SHARED, final_step=final_step)
        ref = reference_params
    else:
        fn = value_and_mtl_grad(heads_loss, method, encoder=encode, final_step=final_step)
        ref = reference_features
    _, grads, _ = jax.jit(fn)(params, method.init(K), x, y)
    _, g_ref, _ = ref(method, params, method.init(K), x, y)
    assert_tree_close(grads, g_ref, what=final_step)


@pytest.mark.parametrize("norm_params", [
    {"trunk": {"w2": True, "b2": True, "w1": False, "b1": False}, "heads": False},
    lambda path, leaf: path in ("trunk/w2", "trunk/b2"),
    ["trunk/w2", "trunk/b2"],
    "trunk/?2",
], ids=["prefix", "callable", "rules", "glob"])
def test_norm_params_subset(norm_params):
    method = PROBES["norms"]
    params = make_params(5)
    x, y = make_batch(7)
    fn = value_and_mtl_grad(loss_fn, method, shared=SHARED, norm_params=norm_params)
    losses, grads, state = jax.jit(fn)(params, method.init(K), x, y)
    _, norms, _ = _brute_force_inputs(x, y, params, "params", norm_leaves=("b2", "w2"))
    np.testing.assert_allclose(state.norms, norms, rtol=1e-4)
    # The probe's weights from the subset norms, by hand.
    w = 1.0 + 0.3 * norms + 0.1 * np.array([losses[n] for n in NAMES]) + 0.2 * np.arange(K)
    per_task = [jax.grad(lambda p, n=n: loss_fn(p, x, y)[n])(params) for n in NAMES]
    expected = jax.tree_util.tree_map(
        lambda *g: sum(wi * np.asarray(gi, np.float64) for wi, gi in zip(w, g, strict=True)),
        *per_task)
    assert_tree_close(grads, expected)


def test_norm_params_must_be_shared():
    method = PROBES["norms"]
    fn = value_and_mtl_grad(loss_fn, method, shared=SHARED,
                            norm_params={"trunk": False, "heads": True})
    with pytest.raises(ValueError, match="norm_params selects task-specific"):
        fn(make_params(), method.init(K), *make_batch(0))


def test_shared_callable_and_default_all_shared():
    method = PROBES["gramian"]
    params = make_params(6)
    x, y = make_batch(8)
    by_prefix = jax.jit(value_and_mtl_grad(loss_fn, method, shared=SHARED))(
        params, method.init(K), x, y)
    by_callable = jax.jit(value_and_mtl_grad(
        loss_fn, method, shared=lambda path, leaf: path.startswith("trunk/")))(
        params, method.init(K), x, y)
    assert_tree_close(by_callable, by_prefix, rtol=1e-6)
    # Everything shared: the heads' rows enter the Gramian; heads get sum_i w_i ∇L_i.
    _, grads, state = jax.jit(value_and_mtl_grad(loss_fn, method))(params, method.init(K), x, y)
    per_task = [jax.grad(lambda p, n=n: loss_fn(p, x, y)[n])(params) for n in NAMES]
    jf = np.stack([_flat(g) for g in per_task])
    np.testing.assert_allclose(state.gram, jf @ jf.T, rtol=1e-4, atol=1e-6 * np.trace(jf @ jf.T))


def test_present_forms_and_errors():
    method = jmtl.ew()
    params = make_params()
    x, y = make_batch(0)
    fn = jax.jit(value_and_mtl_grad(loss_fn, method, shared=SHARED))
    as_dict = fn(params, method.init(K), x, y, present={"a": True, "b": False, "c": True})
    as_array = fn(params, method.init(K), x, y, present=jnp.array([True, False, True]))
    assert_tree_close(as_dict, as_array, rtol=0)
    raw = value_and_mtl_grad(loss_fn, method, shared=SHARED)
    as_names = raw(params, method.init(K), x, y, present=["a", "c"])
    assert_tree_close(as_names, as_array, rtol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        raw(params, method.init(K), x, y, present={"a": True, "b": True})
    with pytest.raises(ValueError, match="unknown tasks"):
        raw(params, method.init(K), x, y, present=["a", "zzz"])


def test_absent_task_with_nan_loss_value_does_not_poison_gramian_methods():
    # A loss that is NaN for an absent task but has a finite derivative (the masked-loss
    # pattern ``where(count > 0, total / max(count, 1), nan)``).
    method = PROBES["gramian"]
    params = make_params()
    x, y = make_batch(0)

    def nan_loss(p, x, y):
        out = loss_fn(p, x, y)
        out["b"] = jnp.where(False, out["b"], jnp.nan)
        return out

    _, _, state = jax.jit(value_and_mtl_grad(nan_loss, method, shared=SHARED))(
        params, method.init(K), x, y, present=jnp.array([True, False, True]))
    assert np.all(np.isfinite(np.asarray(state.gram)))
    assert np.all(np.asarray(state.gram)[1] == 0)
    assert np.all(np.isfinite(np.asarray(state.losses)))


def test_non_scalar_loss_names_task():
    def bad(p, x, y):
        out = loss_fn(p, x, y)
        out["b"] = jnp.ones(3)
        return out

    for fn in (value_and_mtl_grad(bad, jmtl.ew(), shared=SHARED),
               value_and_mtl_grad(bad, PROBES["gramian"], shared=SHARED)):
        with pytest.raises(ValueError, match=r"task 'b' has shape \(3,\)"):
            fn(make_params(), PROBES["gramian"].init(K), *make_batch(0))


def test_missing_key_and_bad_arguments():
    pcg = probe({base.KEY})
    fn = value_and_mtl_grad(loss_fn, pcg, shared=SHARED)
    with pytest.raises(ValueError, match="needs `key`"):
        fn(make_params(), pcg.init(K), *make_batch(0))
    with pytest.raises(ValueError, match="chunk_size"):
        value_and_mtl_grad(loss_fn, pcg, chunk_size=0)
    with pytest.raises(ValueError, match="features mode"):
        value_and_mtl_grad(heads_loss, pcg, encoder=encode, shared=SHARED)
    with pytest.raises(ValueError, match="prefix"):
        value_and_mtl_grad(loss_fn, jmtl.ew(), shared={"nope": True})(
            make_params(), (), *make_batch(0))
    with pytest.raises(ValueError, match="has_aux"):
        value_and_mtl_grad(loss_fn, jmtl.ew(), shared=SHARED, has_aux=True)(
            make_params(), (), *make_batch(0))


def test_has_aux_returns_aux():
    def with_aux(p, x, y):
        return loss_fn(p, x, y), {"n": x.shape[0]}

    method = PROBES["gramian"]
    (losses, aux), grads, _ = jax.jit(value_and_mtl_grad(with_aux, method, shared=SHARED,
                                                         has_aux=True))(
        make_params(), method.init(K), *make_batch(0))
    assert int(aux["n"]) == BATCH and sorted(losses) == list(NAMES)

    def heads_aux(p, z, x, y):
        return heads_loss(p, z, x, y), z.shape

    (losses, aux), _, _ = value_and_mtl_grad(heads_aux, jmtl.ew(), encoder=encode,
                                             has_aux=True)(make_params(), (), *make_batch(0))
    assert tuple(aux) == (BATCH, H2)


def test_num_shared_and_init():
    params = make_params()
    assert num_shared(params, SHARED) == D_SHARED
    assert shared_mask(params, SHARED)["heads"]["a"]["w"] is False

    class S(NamedTuple):
        dim: int

    m = base.Method(name="dimcheck", init=lambda k, dim=None: S(dim * 10 + k), update=None,
                    needs=frozenset())
    x, y = make_batch(0)
    assert value_and_mtl_grad(loss_fn, m, shared=SHARED).init(params, x, y).dim == \
        D_SHARED * 10 + K
    assert value_and_mtl_grad(heads_loss, m, encoder=encode).init(params, x, y).dim == \
        D_FEATURES * 10 + K


@pytest.mark.parametrize("mode", ["params", "features"])
def test_bf16_params(mode):
    method = PROBES["gramian_task_specific"]
    params = make_params(7, jnp.bfloat16)
    x, y = make_batch(9)
    if mode == "params":
        fn = value_and_mtl_grad(loss_fn, method, shared=SHARED)
    else:
        fn = value_and_mtl_grad(heads_loss, method,
                                encoder=lambda p, x, y: encode(p, x.astype(jnp.bfloat16), y))
    losses, grads, state = jax.jit(fn)(params, method.init(K), x, y)
    assert state.gram.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(state.gram)))
    for g, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params),
                    strict=True):
        assert g.dtype == jnp.bfloat16 == p.dtype
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    # Close to the float32 computation at bf16 precision.
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    if mode == "params":
        fn32 = value_and_mtl_grad(loss_fn, method, shared=SHARED)
    else:
        fn32 = value_and_mtl_grad(heads_loss, method, encoder=encode)
    _, g32, s32 = jax.jit(fn32)(p32, method.init(K), x, y)
    np.testing.assert_allclose(state.gram, s32.gram, rtol=0.1, atol=0.02 * float(
        jnp.trace(s32.gram)))
    assert_tree_close(jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), grads), g32,
                      rtol=0.1)


def test_features_mode_parameter_used_by_encoder_and_heads():
    # A scale parameter read by both the encoder and the heads gets both contributions.
    method = PROBES["gramian"]
    params = make_params(8)
    params["both"] = jnp.asarray(1.3)

    def enc(p, x, y):
        return encode(p, x, y) * p["both"]

    def heads(p, z, x, y):
        return {n: v * p["both"] for n, v in heads_loss(p, z, x, y).items()}

    x, y = make_batch(10)
    _, grads, _ = jax.jit(value_and_mtl_grad(heads, method, encoder=enc))(
        params, method.init(K), x, y)

    def enc_loss(p, x, y):
        return heads(p, enc(p, x, y), x, y)

    z = enc(params, x, y)
    jz = _stack_rows([jax.grad(lambda zz, n=n: heads(params, zz, x, y)[n])(z) for n in NAMES])
    upd_z, _ = jmtl.aggregate(method, jz, method.init(K), losses=heads(params, z, x, y))
    enc_part = jax.vjp(lambda p: enc(p, x, y), params)[1](upd_z)[0]["both"]
    head_part = jax.grad(lambda p: sum(heads(p, z, x, y).values()))(params)["both"]
    np.testing.assert_allclose(grads["both"], enc_part + head_part, rtol=1e-4)
    del enc_loss


# ------------------------------------------------------- `shared` forms (NNX, rules)


def _nnx_model():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(D_IN, H2, rngs=rngs)
            self.heads = nnx.Dict(**{n: nnx.Linear(H2, 1, rngs=rngs) for n in NAMES})

    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)

    def nnx_loss(p, x, y):
        m = nnx.merge(graphdef, p)
        z = jnp.tanh(m.trunk(x))
        return {n: jnp.mean((m.heads[n](z)[:, 0] - y[:, i]) ** 2) for i, n in enumerate(NAMES)}

    return params, nnx_loss


@pytest.mark.parametrize("shared", _tiers.first_fast([
    {"trunk": True, "heads": False},
    "trunk",
    ["trunk/*"],
    ["trunk/kernel", "trunk/bias"],
    {"trunk": {"kernel": True, "bias": True}, "heads": False},
], keep=2), ids=["dict-prefix", "rule", "glob", "rule-list", "nested-dict"])
def test_shared_forms_on_nnx_state_match_callable(shared):
    params, nnx_loss = _nnx_model()
    method = PROBES["gramian"]
    x, y = make_batch(3)
    by_callable = jax.jit(value_and_mtl_grad(
        nnx_loss, method, shared=lambda path, leaf: path.startswith("trunk/")))(
        params, method.init(K), x, y)
    fn = value_and_mtl_grad(nnx_loss, method, shared=shared)
    out = jax.jit(fn)(params, method.init(K), x, y)
    assert_tree_close(out, by_callable, rtol=1e-6)
    n_trunk = D_IN * H2 + H2
    assert num_shared(params, shared) == n_trunk
    assert fn.init(params, x, y) is not None
    mask = shared_mask(params, shared)
    assert sorted(p for p, m in zip(jmtl.optim.param_paths(params),
                                    jax.tree_util.tree_leaves(mask), strict=True) if m) == \
        ["trunk/bias", "trunk/kernel"]


def test_shared_plain_dict_prefix_on_frozendict():
    frozen = pytest.importorskip("flax.core").FrozenDict
    method = PROBES["gramian"]
    params = make_params(2)
    x, y = make_batch(4)
    ref = jax.jit(value_and_mtl_grad(loss_fn, method, shared=SHARED))(
        params, method.init(K), x, y)
    out = jax.jit(value_and_mtl_grad(loss_fn, method, shared=SHARED))(
        frozen(params), method.init(K), x, y)
    assert_tree_close(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref), rtol=1e-6)
    assert num_shared(frozen(params), SHARED) == D_SHARED


def test_shared_rules_on_dict_params():
    method = PROBES["gramian"]
    params = make_params(1)
    x, y = make_batch(2)
    ref = jax.jit(value_and_mtl_grad(loss_fn, method, shared=SHARED))(
        params, method.init(K), x, y)
    for rules in ("trunk", ["trunk/w?", "trunk/b*"], ("trunk/w1", "trunk/b1", "trunk/w2",
                                                        "trunk/b2")):
        out = jax.jit(value_and_mtl_grad(loss_fn, method, shared=rules))(
            params, method.init(K), x, y)
        assert_tree_close(out, ref, rtol=1e-6, what=str(rules))
    # A prefix is on whole components: "trunk/w" is neither "trunk/w1" nor "trunk/w2".
    assert num_shared(params, ["trunk/w1", "trunk/w2"]) == D_IN * H1 + H1 * H2


def test_shared_errors_name_the_rule_or_path():
    params, nnx_loss = _nnx_model()
    x, y = make_batch(0)
    with pytest.raises(ValueError, match="'trnk'"):
        value_and_mtl_grad(nnx_loss, jmtl.ew(), shared=["trunk/*", "trnk"])(params, (), x, y)
    with pytest.raises(ValueError, match="'trunk/w'"):
        num_shared(make_params(), "trunk/w")
    with pytest.raises(ValueError, match="match no parameter"):
        shared_mask(make_params(), "*/nothing")
    # A dict prefix missing a key names the uncovered parameter ...
    with pytest.raises(ValueError, match="prefix.*'heads/a/bias'"):
        num_shared(params, {"trunk": True})
    # ... and an entry naming no parameter is an error too.
    with pytest.raises(ValueError, match="'nope'"):
        num_shared(params, {"trunk": True, "heads": False, "nope": True})
    with pytest.raises(ValueError, match="norm_params.*'trunk/nope'"):
        value_and_mtl_grad(nnx_loss, PROBES["norms"], shared="trunk",
                           norm_params="trunk/nope")(params, PROBES["norms"].init(K), x, y)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["upgrad", "pcgrad", "gradnorm"])
def test_features_mode_auto_chunk_equals_unchunked(name):
    """The default features-mode chunking (K > AUTO_FEATURES_CHUNK) changes no number."""
    from jmtl import engine

    k, width, batch = engine.AUTO_FEATURES_CHUNK + 4, 6, 10
    rng = np.random.default_rng(3)
    params = {"trunk": jnp.asarray(rng.normal(size=(5, width)), jnp.float32),
              "heads": jnp.asarray(rng.normal(size=(width, k)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(batch, k)), jnp.float32)

    def encode(p, x, y):
        return jnp.tanh(x @ p["trunk"])

    def heads(p, z, x, y):
        per_task = jnp.mean((z @ p["heads"] - y) ** 2, axis=0)
        return {f"t{i:02d}": per_task[i] for i in range(k)}

    method = jmtl.methods.get(name)
    outs = []
    for chunk in ("auto", None):
        fn = value_and_mtl_grad(heads, method, encoder=encode, chunk_size=chunk)
        state = fn.init(params, x, y)
        outs.append(jax.jit(fn)(params, state, x, y, key=jax.random.key(0)))
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1]),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


# ------------------------------------------- the Jacobian pass on three model shapes


class _Rows(NamedTuple):
    jac: jax.Array


def _rows_probe():
    """A method that keeps the flat Jacobian it is given and weights task i by i + 1."""
    def init(num_tasks, dim=None):
        return _Rows(jnp.zeros((num_tasks, dim or 1)))

    def update(inp, state):
        k = inp.present.shape[0]
        return jnp.arange(1.0, k + 1.0) * inp.present, _Rows(inp.jacobian)

    return base.Method(name="rows_probe", init=init, update=update,
                       needs=frozenset({base.JACOBIAN}), output="weights")


def _conv_model():
    """A 3×3 convolution and mean pooling shared by three linear heads."""
    rng = np.random.default_rng(0)
    params = {"trunk": {"k": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) / 3, jnp.float32),
                        "b": jnp.asarray(rng.normal(size=(4,)) / 3, jnp.float32)},
              "heads": {n: jnp.asarray(rng.normal(size=(4,)), jnp.float32) for n in NAMES}}
    x = jnp.asarray(rng.normal(size=(5, 6, 6, 2)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(5, K)), jnp.float32)

    def loss(p, x, y):
        h = jax.lax.conv_general_dilated(x, p["trunk"]["k"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        z = jnp.mean(jax.nn.relu(h + p["trunk"]["b"]), axis=(1, 2))
        return {n: jnp.mean((z @ p["heads"][n] - y[:, i]) ** 2) for i, n in enumerate(NAMES)}

    return params, (x, y), loss


def _shared_in_heads_model():
    """The shared matrix also feeds every head directly (a skip path from the input)."""
    params = make_params(2)
    x, y = make_batch(5)

    def loss(p, x, y):
        z = encode(p, x, y)
        skip = jnp.tanh(x @ p["trunk"]["w1"])  # the shared w1 again, after the trunk
        return {n: jnp.mean((z @ p["heads"][n]["w"] + (i + 1) * skip[:, i] - y[:, i]) ** 2)
                for i, n in enumerate(NAMES)}

    return params, (x, y), loss


def _mlp_model():
    return make_params(3), make_batch(4), loss_fn


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("model", [_mlp_model, _conv_model, _shared_in_heads_model],
                         ids=["mlp", "conv", "shared_in_heads"])
def test_jacobian_pass_equals_per_task_grads(model, chunk_size):
    """Params mode: the rows the method sees are the per-task ``jax.grad`` of each loss
    w.r.t. the shared parameters, and the update is Σ w_i ∇L_i (heads: w_i ∇_head L_i)."""
    params, batch, loss = model()
    method = _rows_probe()
    fn = value_and_mtl_grad(loss, method, shared=SHARED, chunk_size=chunk_size)
    _, grads, state = jax.jit(fn)(params, fn.init(params, *batch), *batch)
    per_task = [jax.grad(lambda p, n=n: loss(p, *batch)[n])(params) for n in NAMES]
    rows = np.stack([_flat(g["trunk"]) for g in per_task])
    np.testing.assert_allclose(np.asarray(state.jac, np.float64), rows, rtol=1e-5,
                               atol=1e-6 * np.abs(rows).max())
    expected = jax.tree_util.tree_map(
        lambda *g: sum((i + 1.0) * np.asarray(gi, np.float64) for i, gi in enumerate(g)),
        *per_task)
    assert_tree_close(grads, expected, rtol=1e-5, what=model.__name__)
