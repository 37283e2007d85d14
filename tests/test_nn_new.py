"""Tests for jmtl.nn's DSelectK, LTB and MTINet (and a dense-prediction toy)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jmtl
from jmtl import nn as mtnn
from tests import _tiers

TASKS = ("a", "b")
BATCH = 4
W = 4
OUT = {"a": 1, "b": 2}


def _mlp(rngs):
    return nnx.Sequential(nnx.Linear(W, W, rngs=rngs), nnx.relu)


def _linear_heads(rngs):
    return {t: nnx.Linear(W, OUT[t], rngs=rngs) for t in TASKS}


MLP_SHAPES = {t: (BATCH, OUT[t]) for t in TASKS}


def _dselect_static(rngs):
    return mtnn.DSelectK([_mlp(rngs) for _ in range(5)], _linear_heads(rngs), num_nonzeros=2,
                         rngs=rngs), (BATCH, W), MLP_SHAPES


def _dselect_example(rngs):
    return mtnn.DSelectK([_mlp(rngs) for _ in range(4)], _linear_heads(rngs), num_nonzeros=2,
                         gate_in_features=W, rngs=rngs), (BATCH, W), MLP_SHAPES


def _ltb_search(rngs):
    model = mtnn.LTB([[_mlp(rngs), _mlp(rngs)], [_mlp(rngs) for _ in range(3)]],
                     _linear_heads(rngs), rngs=rngs)
    model.eval()  # the most likely tree: deterministic, for comparisons with jit
    return model, (BATCH, W), MLP_SHAPES


def _ltb_fixed(rngs):
    model = mtnn.LTB([[_mlp(rngs), _mlp(rngs)], [_mlp(rngs) for _ in range(3)]],
                     _linear_heads(rngs), rngs=rngs,
                     tree=mtnn.BranchTree(parents=((1, 0, 0),), heads={"a": 0, "b": 2}))
    return model, (BATCH, W), MLP_SHAPES


class _Backbone(nnx.Module):
    """Two scales: full and half resolution."""

    def __init__(self, rngs):
        self.fine = nnx.Conv(3, W, (3, 3), rngs=rngs)
        self.coarse = nnx.Conv(W, 2 * W, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x):
        fine = nnx.relu(self.fine(x))
        return [fine, nnx.relu(self.coarse(fine))]


def _mtinet(rngs):
    model = mtnn.MTINet(_Backbone(rngs), channels=[W, 2 * W], outputs=OUT, rngs=rngs)
    return model, (2, 4, 4, 3), {t: (2, 4, 4, OUT[t]) for t in TASKS}


BUILDERS = {"dselect_static": _dselect_static, "dselect_example": _dselect_example,
            "ltb_search": _ltb_search, "ltb_fixed": _ltb_fixed, "mtinet": _mtinet}
# MTI-Net compiles for several seconds (many small convolutions): its cases are "slow".
ALL_MODELS = [pytest.param(n, marks=pytest.mark.slow) if n == "mtinet" else n
              for n in sorted(BUILDERS)]


def _build(name, seed=0):
    model, input_shape, shapes = BUILDERS[name](nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), input_shape)
    return model, x, shapes


def _prediction_dicts(out):
    if isinstance(out, mtnn.MTINetOutput):
        return [*out.initial, out.final]
    return [out]


def _total_loss(model, x, targets):
    total = 0.0
    for preds in _prediction_dicts(model(x)):
        for t in TASKS:
            p = preds[t]
            target = targets[t]
            if p.shape != target.shape:  # MTI-Net's coarse initial predictions
                p = mtnn.resize_to(p, *target.shape[1:3])
            total = total + jnp.mean((p - target) ** 2)
    if isinstance(model, mtnn.DSelectK):
        total = total + model.penalty(x, entropy_weight=1e-3)
    return total


# ----------------------------------------------------------------- every model


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shapes_and_jit_matches_eager(name):
    model, x, shapes = _build(name)
    # MTI-Net has hundreds of small ops: op-by-op execution would dominate this file's
    # time, so its "eager" side is the jitted encode/decode split.
    eager = (nnx.jit(lambda m, inputs: m.decode(m.encode(inputs)))(model, x)
             if name == "mtinet" else model(x))
    final = _prediction_dicts(eager)[-1]
    assert list(final) == sorted(TASKS)
    assert {t: p.shape for t, p in final.items()} == shapes
    for preds in _prediction_dicts(eager):
        assert all(bool(jnp.all(jnp.isfinite(p))) for p in preds.values())
    jitted = nnx.jit(lambda m, inputs: m(inputs))(model, x)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
                 eager, jitted)
    if name != "mtinet":
        split = model.decode(model.encode(x))
        jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
                     eager, split)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_one_sgd_step_lowers_the_total_loss(name):
    model, x, _ = _build(name)
    shapes = {t: p.shape for t, p in _prediction_dicts(model(x))[-1].items()}
    keys = jax.random.split(jax.random.key(7), len(TASKS))
    targets = {t: jax.random.normal(k, shapes[t]) for t, k in zip(TASKS, keys, strict=True)}
    optimizer = nnx.Optimizer(model, optax.sgd(0.02), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, targets):
        loss, grads = nnx.value_and_grad(_total_loss)(model, x, targets)
        optimizer.update(model, grads)
        return loss, optax.tree.norm(nnx.state(grads, nnx.Param))

    before, grad_norm = train_step(model, optimizer, x, targets)
    after, _ = train_step(model, optimizer, x, targets)
    assert float(grad_norm) > 0.0
    assert float(after) < float(before)


@pytest.mark.parametrize("name", _tiers.first_fast(["dselect_static", "ltb_fixed"]))
def test_encode_decode_work_with_jmtl_features_mode(name):
    model, x, _ = _build(name)
    shapes = {t: p.shape for t, p in _prediction_dicts(model(x))[-1].items()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    targets = {t: jnp.full(shapes[t], 0.5) for t in TASKS}

    def encoder(p, inputs):
        z = nnx.merge(graphdef, p, rest).encode(inputs)
        return z.expert_outputs if isinstance(z, mtnn.MixtureFeatures) else z

    def heads_loss(p, z, inputs):
        m = nnx.merge(graphdef, p, rest)
        if isinstance(m, mtnn.DSelectK):
            z = mtnn.MixtureFeatures(z, inputs)
        preds = _prediction_dicts(m.decode(z))[-1]
        return {t: jnp.mean((preds[t] - targets[t]) ** 2) for t in TASKS}

    method = jmtl.ew()
    grad_fn = jax.jit(jmtl.value_and_mtl_grad(heads_loss, method, encoder=encoder))
    _, grads, _ = grad_fn(params, method.init(len(TASKS)), x)
    # Equal weights: the aggregated update is the gradient of the summed loss.
    reference = jax.grad(lambda p: sum(heads_loss(p, encoder(p, x), x).values()))(params)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
                 grads, reference)


# ----------------------------------------------------------------- DSelect-k


def _np_smooth_step(t, gamma):
    t = np.asarray(t, np.float64)
    out = np.empty_like(t)
    for i, v in np.ndenumerate(t):
        if v <= -gamma / 2:
            out[i] = 0.0
        elif v >= gamma / 2:
            out[i] = 1.0
        else:
            out[i] = -2 * v ** 3 / gamma ** 3 + 3 * v / (2 * gamma) + 0.5
    return out


def _np_gate(z, w, num_experts, gamma):
    """The paper's gate in float64: sum_i softmax(w)_i prod_j S(z_ij)^b_j (1-S(z_ij))^(1-b_j)."""
    z = np.asarray(z, np.float64)
    k, m = z.shape
    s = _np_smooth_step(z, gamma)
    selectors = np.zeros((k, num_experts))
    for i in range(k):
        for e in range(num_experts):
            bits = [int(c) for c in format(e, f"0{m}b")] if m else []
            selectors[i, e] = np.prod([s[i, j] if b else 1 - s[i, j]
                                       for j, b in enumerate(bits)])
    alpha = np.exp(w - np.max(w))
    alpha /= alpha.sum()
    return alpha @ selectors, selectors


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_smooth_step_matches_closed_form_and_is_c1(gamma):
    t = np.linspace(-gamma, gamma, 41).astype(np.float32)
    np.testing.assert_allclose(mtnn.smooth_step(jnp.asarray(t), gamma), _np_smooth_step(t, gamma),
                               atol=1e-6)
    # C1 at the ends of the cubic piece: derivative 0 on both sides, value exactly 0 / 1.
    grad = jax.vmap(jax.grad(lambda v: mtnn.smooth_step(v, gamma)))
    ends = jnp.asarray([-gamma / 2, gamma / 2], jnp.float32)
    np.testing.assert_allclose(grad(ends * (1 - 1e-4)), [0.0, 0.0], atol=1e-3)
    assert mtnn.smooth_step(ends, gamma).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("num_experts", [1, 4, 5, 8])
def test_dselect_static_gate_matches_numpy_reference(num_experts):
    gate = mtnn.DSelectKGate(num_experts, 3, gamma=1.0, rngs=nnx.Rngs(0))
    m = gate.num_binary
    assert m == (math.ceil(math.log2(num_experts)) if num_experts > 1 else 0)
    rng = np.random.default_rng(num_experts)
    gate.z_logits[...] = jnp.asarray(rng.uniform(-0.7, 0.7, (3, m)), jnp.float32)
    gate.w_logits[...] = jnp.asarray(rng.normal(size=3), jnp.float32)
    expected, selectors = _np_gate(gate.z_logits[...], np.asarray(gate.w_logits[...]),
                                   num_experts, 1.0)
    np.testing.assert_allclose(gate(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gate.selector_outputs(), selectors, rtol=1e-5, atol=1e-7)
    if num_experts & (num_experts - 1) == 0:  # a power of two: a convex combination
        assert float(gate().sum()) == pytest.approx(1.0, abs=1e-6)
    else:
        assert float(gate().sum()) <= 1.0 + 1e-6
    # The penalty: entropy (official form, eps 1e-6) plus 1/sum over reachable experts.
    entropy = -np.sum(selectors * np.log(selectors + 1e-6))
    extra = 0.0 if num_experts & (num_experts - 1) == 0 else np.sum(1 / selectors.sum(-1))
    assert float(gate.penalty(entropy_weight=0.5)) == pytest.approx(0.5 * entropy + extra,
                                                                    rel=1e-5, abs=1e-6)


def test_dselect_per_example_gate_matches_numpy_reference():
    gate = mtnn.DSelectKGate(6, 2, in_features=3, gamma=2.0, rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32) * 20
    kernel_z, bias_z = np.asarray(gate.z_net.kernel[...]), np.asarray(gate.z_net.bias[...])
    kernel_w, bias_w = np.asarray(gate.w_net.kernel[...]), np.asarray(gate.w_net.bias[...])
    # Official initialisation ranges.
    assert np.abs(kernel_z).max() <= 2.0 / 100 and np.abs(kernel_w).max() <= 0.05
    z = (x @ kernel_z + bias_z).reshape(5, 2, 3)
    w = x @ kernel_w + bias_w
    expected = np.stack([_np_gate(z[b], w[b], 6, 2.0)[0] for b in range(5)])
    np.testing.assert_allclose(gate(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_experts,k", [(8, 2), (8, 3), (5, 2), (16, 4)])
def test_dselect_saturated_gates_select_at_most_k_experts(num_experts, k):
    gate = mtnn.DSelectKGate(num_experts, k, gamma=1.0, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(k + num_experts)
    for _ in range(20):
        # |z| >= gamma/2: every smooth step is exactly 0 or 1.
        magnitude = rng.uniform(0.5, 3.0, (k, gate.num_binary))
        z = magnitude * rng.choice([-1.0, 1.0], (k, gate.num_binary))
        w = rng.normal(size=k)
        gate.z_logits[...] = jnp.asarray(z, jnp.float32)
        gate.w_logits[...] = jnp.asarray(w, jnp.float32)
        weights = np.asarray(gate())
        # Reference: selector i picks the expert whose binary code is the signs of z_i.
        chosen = [int("".join("1" if v > 0 else "0" for v in row), 2) for row in z]
        alpha = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
        expected = np.zeros(num_experts)
        for i, e in enumerate(chosen):
            if e < num_experts:  # a code past n names no expert (n not a power of two)
                expected[e] += alpha[i]
        np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
        assert np.count_nonzero(weights) <= k
        assert np.all(np.isfinite(np.asarray(gate.penalty(entropy_weight=1.0))))


def test_dselect_training_saturates_the_gates_to_at_most_k_experts():
    """With the entropy penalty, plain training drives every selector to a binary state."""
    rngs = nnx.Rngs(0)
    n, k = 8, 2
    experts = [nnx.Linear(W, W, rngs=rngs) for _ in range(n)]
    model = mtnn.DSelectK(experts, _linear_heads(rngs), num_nonzeros=k, rngs=rngs)
    x = jax.random.normal(jax.random.key(0), (16, W))
    targets = {t: jax.random.normal(jax.random.key(i + 1), (16, OUT[t]))
               for i, t in enumerate(TASKS)}
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    def loss_fn(m):
        preds = m(x)
        fit = sum(jnp.mean((preds[t] - targets[t]) ** 2) for t in TASKS)
        return fit + m.penalty(entropy_weight=0.1)

    @nnx.jit
    def steps(model, optimizer):
        def body(_, carry):
            model, optimizer = carry
            grads = nnx.grad(loss_fn)(model)
            optimizer.update(model, grads)
            return model, optimizer
        nnx.fori_loop(0, 300, body, (model, optimizer))

    steps(model, optimizer)
    for t in TASKS:
        z = np.asarray(model.gates[t].z_logits[...])
        assert np.all(np.abs(z) >= 0.5), f"task {t}: selectors not saturated: {z}"
        weights = np.asarray(model.gate_weights()[t])
        assert 1 <= np.count_nonzero(weights) <= k
        assert weights.sum() == pytest.approx(1.0, abs=1e-6)


def test_dselect_rejects_wrong_gate_inputs():
    static = mtnn.DSelectKGate(4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="static gate"):
        static(jnp.ones((2, 3)))
    per_example = mtnn.DSelectKGate(4, 2, in_features=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs its input"):
        per_example()
    with pytest.raises(ValueError, match="5 features"):
        per_example(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="num_nonzeros"):
        mtnn.DSelectKGate(4, 0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------- LTB


def test_gumbel_softmax_samples_follow_the_softmax():
    """Gumbel-max: the argmax of a sample is distributed as softmax(logits)."""
    logits = jnp.asarray([1.0, 0.0, -1.0, 0.5])
    keys = jax.random.split(jax.random.key(0), 20000)
    samples = jax.vmap(lambda k: mtnn.gumbel_softmax(k, logits, 0.5, hard=True))(keys)
    assert set(np.unique(np.asarray(samples)).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(samples.sum(-1)), np.ones(20000))
    p = np.exp(np.asarray(logits, np.float64))
    np.testing.assert_allclose(np.asarray(samples.mean(0)), p / p.sum(), atol=0.015)


def test_gumbel_softmax_hard_has_the_soft_gradient():
    """Straight-through: the hard sample's gradient is the soft sample's, in closed form."""
    logits = jnp.asarray([0.3, -0.2, 0.1])
    key, tau = jax.random.key(3), 0.7
    g = np.asarray(jax.random.gumbel(key, (3,), jnp.float32), np.float64)
    y = np.exp((np.asarray(logits, np.float64) + g) / tau)
    y /= y.sum()
    c = np.array([1.0, 2.0, -1.0])
    # d/dlogits of c . softmax((logits + g)/tau) = (diag(y) - y y^T) c / tau
    expected = (np.diag(y) - np.outer(y, y)) @ c / tau
    got = jax.grad(lambda lg: jnp.dot(jnp.asarray(c, jnp.float32),
                                      mtnn.gumbel_softmax(key, lg, tau, hard=True)))(logits)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _ltb_with_tree(parents, heads, rngs=None):
    rngs = rngs or nnx.Rngs(0)
    model = mtnn.LTB([[_mlp(rngs) for _ in range(2)], [_mlp(rngs) for _ in range(3)],
                      [_mlp(rngs) for _ in range(2)]], _linear_heads(rngs), rngs=rngs)
    big = 5.0
    for logits, row in zip(model.logits, parents, strict=True):
        logits[...] = big * jax.nn.one_hot(jnp.asarray(row), logits.shape[1])
    model.head_logits[...] = big * jax.nn.one_hot(jnp.asarray([heads[t] for t in TASKS]),
                                                   model.head_logits.shape[1])
    return model


def test_ltb_fixed_tree_has_the_structure_of_the_chosen_branches():
    parents = ((1, 1, 0), (2, 0))
    heads = {"a": 0, "b": 1}
    model = _ltb_with_tree(parents, heads)
    assert model.tree() == mtnn.BranchTree(parents, heads)
    x = jax.random.normal(jax.random.key(1), (BATCH, W))
    # Reference: compose the chosen chain of blocks of each task by hand.
    blocks = [list(layer) for layer in model.layers]

    def path(task):
        last = heads[task]
        middle = parents[1][last]
        first = parents[0][middle]
        return first, middle, last

    expected = {}
    for t in TASKS:
        i0, i1, i2 = path(t)
        expected[t] = model.heads[t](blocks[2][i2](blocks[1][i1](blocks[0][i0](x))))
    assert path("a") == (0, 2, 0) and path("b") == (1, 0, 1)
    fixed = model.fix()
    # Only the blocks on a task's path remain, each once: a -> 0,2,0 and b -> 1,0,1.
    assert [len(layer) for layer in fixed.layers] == [2, 2, 2]
    assert fixed.logits is None and fixed.head_logits is None
    got = fixed(x)
    for t in TASKS:
        np.testing.assert_allclose(got[t], expected[t], rtol=1e-6, atol=1e-7)
    # The search model in evaluation mode uses the same most likely tree.
    model.eval()
    for t in TASKS:
        np.testing.assert_allclose(model(x)[t], expected[t], rtol=1e-6, atol=1e-7)


def test_ltb_tasks_choosing_the_same_branch_share_its_blocks():
    model = _ltb_with_tree(((0, 0, 1), (1, 1)), {"a": 0, "b": 1})  # both heads end at 0 <- 0
    fixed = model.fix()
    assert [len(layer) for layer in fixed.layers] == [1, 1, 2]
    tree = fixed.tree()
    assert tree.parents == ((0,), (0, 0)) and tree.heads == {"a": 0, "b": 1}
    # A shared block feeds both tasks: the fixed model's parameters there get gradient
    # from each task's loss.
    graphdef, params, rest = nnx.split(fixed, nnx.Param, ...)
    x = jnp.ones((BATCH, W))

    def task_sum(p, t):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x)[t])

    for t in TASKS:
        g = jax.grad(task_sum)(params, t)
        assert float(jnp.abs(g["layers"][0][0]["layers"][0]["kernel"][...]).sum()) > 0


def test_ltb_fix_returns_an_independent_copy_and_a_fresh_tree_build():
    model = _ltb_with_tree(((0, 1, 0), (0, 1)), {"a": 0, "b": 1})
    fixed = model.fix()
    before = np.asarray(model.layers[0][0].layers[0].kernel[...]).copy()
    fixed.layers[0][0].layers[0].kernel[...] = jnp.zeros_like(before)
    np.testing.assert_array_equal(np.asarray(model.layers[0][0].layers[0].kernel[...]), before)
    # Retraining from scratch: fresh blocks with the found tree.
    rngs = nnx.Rngs(5)
    fresh = mtnn.LTB([[_mlp(rngs) for _ in range(2)], [_mlp(rngs) for _ in range(3)],
                      [_mlp(rngs) for _ in range(2)]], _linear_heads(rngs), tree=model.tree())
    assert fresh.tree() == fixed.tree()
    with pytest.raises(ValueError, match="parents of layer 1"):
        mtnn.LTB([[_mlp(rngs)], [_mlp(rngs)]], _linear_heads(rngs),
                 tree=mtnn.BranchTree(((3,),), {"a": 0, "b": 0}))
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        mtnn.LTB([[_mlp(rngs)]], _linear_heads(rngs), tree=mtnn.BranchTree((), {"a": 0}))


def test_ltb_search_samples_branches_and_learns_their_logits():
    model = mtnn.LTB([[_mlp(nnx.Rngs(i)) for i in range(3)]], _linear_heads(nnx.Rngs(9)),
                     rngs=nnx.Rngs(0), temperature=1.0)
    x = jax.random.normal(jax.random.key(0), (BATCH, W))
    z = model.encode(x)
    # With one layer the heads' choice is the only branching: a sampled head input is one
    # of the blocks' outputs (hard samples).
    seen = set()
    for i in range(30):
        out = model.decode(z, key=jax.random.key(i))["a"]
        matches = [j for j in range(3)
                   if np.allclose(out, model.heads["a"](z[j]), rtol=1e-6, atol=1e-7)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2}  # uniform logits: every branch is sampled
    # The logits get a gradient through the straight-through samples.
    graphdef, logits, rest = nnx.split(model, mtnn.BranchLogits, ...)

    def loss(lg):
        preds = nnx.merge(graphdef, lg, rest)(x, key=jax.random.key(0))
        return sum(jnp.sum(preds[t] ** 2) for t in TASKS)

    grads = jax.grad(loss)(logits)
    assert float(jnp.abs(grads["head_logits"][...]).sum()) > 0


def test_ltb_search_works_in_jmtl_features_mode_with_explicit_keys():
    rngs = nnx.Rngs(0)
    model = mtnn.LTB([[_mlp(rngs), _mlp(rngs)], [_mlp(rngs) for _ in range(3)]],
                     _linear_heads(rngs), rngs=rngs, hard=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (BATCH, W))
    key_encode, key_decode = jax.random.split(jax.random.key(3))

    def encoder(p, inputs):
        return nnx.merge(graphdef, p, rest).encode(inputs, key=key_encode)

    def heads_loss(p, z, inputs):
        preds = nnx.merge(graphdef, p, rest).decode(z, key=key_decode)
        return {t: jnp.mean((preds[t] - 0.5) ** 2) for t in TASKS}

    method = jmtl.ew()
    grad_fn = jax.jit(jmtl.value_and_mtl_grad(heads_loss, method, encoder=encoder))
    _, grads, _ = grad_fn(params, method.init(len(TASKS)), x)
    reference = jax.grad(lambda p: sum(heads_loss(p, encoder(p, x), x).values()))(params)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
                 grads, reference)
    # Both kinds of branching logits are trained.
    assert float(jnp.abs(grads["head_logits"][...]).sum()) > 0
    assert float(jnp.abs(grads["logits"][0][...]).sum()) > 0


def test_ltb_temperature_is_state_and_does_not_retrace():
    model, x, _ = _build("ltb_search")
    model.train()
    traces = []

    @nnx.jit
    def forward(m, inputs):
        traces.append(1)
        return m(inputs)

    forward(model, x)
    model.set_temperature(0.1)
    forward(model, x)
    assert len(traces) == 1
    assert float(model.temperature[...]) == pytest.approx(0.1)
    # The Gumbel stream advances: two training-mode calls draw different branches' noise.
    assert int(model.rngs.count[...]) >= 2


# ----------------------------------------------------------------- MTI-Net


def _np_conv3x3_same(x, kernel):
    """NHWC 'SAME' 3x3 convolution without bias in float64."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy:dy + h, dx:dx + w, :] @ kernel[dy, dx]
    return out


def test_spatial_attention_distillation_matches_numpy_reference():
    distill = mtnn.SpatialAttentionDistillation(["a", "b", "c"], 3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    feats = {t: rng.normal(size=(2, 4, 5, 3)).astype(np.float32) for t in "abc"}
    out = distill({t: jnp.asarray(v) for t, v in feats.items()})
    for t in "abc":
        expected = np.asarray(feats[t], np.float64)
        for s in "abc":
            if s == t:
                continue
            message = _np_conv3x3_same(feats[s], distill.messages[t][s].kernel[...])
            logits = _np_conv3x3_same(feats[s], distill.attention[t][s].kernel[...])
            gate = 1 / (1 + np.exp(-logits))
            expected = expected + message * gate  # gated by the sending task's features
        np.testing.assert_allclose(out[t], expected, rtol=1e-4, atol=1e-5)


def test_feature_propagation_matches_numpy_reference():
    """FPM with 1x1 blocks (linear maps), against the paper's description in float64."""
    tasks, c = ("a", "b", "c"), 4
    fpm = mtnn.FeaturePropagation(tasks, c, rngs=nnx.Rngs(0), se_reduction=2,
                                  make_block=lambda i, o, r: nnx.Conv(i, o, (1, 1), rngs=r))
    rng = np.random.default_rng(1)
    feats = {t: rng.normal(size=(2, 3, 3, c)).astype(np.float32) for t in tasks}
    out = fpm({t: jnp.asarray(v) for t, v in feats.items()})

    def lin(layer, v):
        kernel = np.asarray(layer.kernel[...], np.float64).reshape(-1, layer.kernel.shape[-1])
        return v @ kernel + np.asarray(layer.bias[...], np.float64)

    concat = np.concatenate([np.asarray(feats[t], np.float64) for t in tasks], -1)
    hidden = concat
    for layer in fpm.attention_net.layers:
        hidden = lin(layer, hidden)
    logits = hidden.reshape(2, 3, 3, len(tasks), c)
    mask = np.exp(logits - logits.max(axis=3, keepdims=True))
    mask /= mask.sum(axis=3, keepdims=True)  # softmax over the tasks, per pixel and channel
    attended = (mask * concat.reshape(2, 3, 3, len(tasks), c)).reshape(concat.shape)
    shared = lin(fpm.reduce, attended)
    pooled = shared.mean(axis=(1, 2))
    for t in tasks:
        squeeze = np.maximum(pooled @ np.asarray(fpm.squeeze[t].kernel[...], np.float64)
                             + np.asarray(fpm.squeeze[t].bias[...], np.float64), 0)
        excite = 1 / (1 + np.exp(-(squeeze @ np.asarray(fpm.excite[t].kernel[...], np.float64)
                                   + np.asarray(fpm.excite[t].bias[...], np.float64))))
        expected = shared * excite[:, None, None, :] + feats[t]
        np.testing.assert_allclose(out[t], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mtinet_scale_dependencies_follow_the_coarse_to_fine_design():
    """Initial predictions at scale s see backbone scales >= s only; final ones all."""
    model, x, _ = _build("mtinet")
    features = model.encode(x)

    def sums(feats):
        out = model.decode(feats)
        return tuple(sum(jnp.sum(p) for p in preds.values())
                     for preds in (*out.initial, out.final))

    jacobian = jax.jit(jax.jacrev(sums))(features)  # [output][scale], one compilation

    def sensitivity(which, scale):
        row = jacobian[2 if which == "final" else which]
        return float(jnp.abs(row[scale]).sum())

    assert sensitivity(1, 0) == 0.0  # the coarse initial predictions ignore the fine scale
    assert sensitivity(1, 1) > 0.0
    assert sensitivity(0, 0) > 0.0 and sensitivity(0, 1) > 0.0  # propagated from coarse
    assert sensitivity("final", 0) > 0.0 and sensitivity("final", 1) > 0.0
    out = model(x)
    assert out.initial[0]["b"].shape == (2, 4, 4, 2) and out.initial[1]["b"].shape == (2, 2, 2, 2)


@pytest.mark.slow
def test_mtinet_checks_the_backbone_scales():
    rngs = nnx.Rngs(0)
    model = mtnn.MTINet(_Backbone(rngs), channels=[W, W], outputs=OUT, rngs=rngs)
    with pytest.raises(ValueError, match=r"channels \(4, 8\)"):  # raised while tracing
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32))
    with pytest.raises(ValueError, match="missing"):
        mtnn.MTINet(_Backbone(rngs), channels=[W, 2 * W], outputs=OUT, rngs=rngs,
                    heads={"a": nnx.Conv(3 * W, 1, (1, 1), rngs=rngs)})


# ----------------------------------------------------------------- dense-prediction toy


def _dense_toy():
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "benchmarks")
    sys.path.insert(0, bench)
    try:
        import dense_toy
    finally:
        sys.path.remove(bench)
    return dense_toy


_TRAIN_SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import dense_toy as toy
model, _ = toy.train(sys.argv[1], toy.TASKS, toy.make_rectangles(512, seed=0), seed=0,
                     steps=150, chunk=50)
metrics = toy.evaluate(model, toy.make_rectangles(128, seed=1), toy.TASKS)
print(json.dumps(metrics))
"""


def _train_with_default_compiler(name: str) -> dict:
    """The dense toy's 150 training steps in a fresh process, with XLA's default compiler
    options: the suite's fast-compile options (tests/conftest.py) make long runs slower."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, name], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dense_toy_data_is_consistent():
    toy = _dense_toy()
    a = toy.make_rectangles(64, seed=3)
    b = toy.make_rectangles(64, seed=3)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert a["x"].shape == (64, toy.SIZE, toy.SIZE, 3)
    assert set(np.unique(a["seg"]).tolist()) <= set(range(toy.NUM_CLASSES + 1))
    # Background pixels have depth 1; a square's depth is 1 - 0.15 * half size (< 1).
    depth = a["depth"][..., 0]
    np.testing.assert_array_equal(depth[a["seg"] == 0], 1.0)
    assert np.all(depth[a["seg"] > 0] < 1.0)
    levels = np.unique(depth)
    assert np.all(np.min(np.abs(levels[:, None] - np.array([1.0, 0.85, 0.7, 0.55, 0.4])),
                         axis=1) < 1e-6), levels


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hard", "padnet", "mtinet"])
def test_dense_toy_brief_training_beats_constant_predictors(name):
    toy = _dense_toy()
    train_data = toy.make_rectangles(512, seed=0)
    test_data = toy.make_rectangles(128, seed=1)
    metrics = _train_with_default_compiler(name)
    # Constant predictors fitted on the training set: the most frequent class, the median
    # depth (the best constant for the absolute error).
    labels, counts = np.unique(train_data["seg"], return_counts=True)
    majority = labels[np.argmax(counts)]
    constant_acc = float(np.mean(test_data["seg"] == majority))
    constant_err = float(np.mean(np.abs(test_data["depth"] - np.median(train_data["depth"]))))
    assert metrics["seg"]["pixel_acc"] > constant_acc + 0.05, (metrics, constant_acc)
    assert metrics["depth"]["abs_err"] < 0.9 * constant_err, (metrics, constant_err)
    # ΔMTL against the constant predictors as "baselines" is positive.
    multi = {"seg": {"pixel_acc": metrics["seg"]["pixel_acc"]},
             "depth": {"abs_err": metrics["depth"]["abs_err"]}}
    base = {"seg": {"pixel_acc": constant_acc}, "depth": {"abs_err": constant_err}}
    assert jmtl.metrics.delta_mtl(multi, base, {"seg": True, "depth": False}) > 0
