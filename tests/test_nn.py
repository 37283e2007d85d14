"""Tests for jmtl.nn: Flax NNX multi-task architectures."""

from __future__ import annotations

import itertools

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
# One width everywhere (inputs, hidden layers, channels): parameter initialisers then
# compile for few distinct shapes, which keeps this file fast.
W = 4
OUT = {"a": 1, "b": 2}


def _mlp(rngs):
    return nnx.Sequential(nnx.Linear(W, W, rngs=rngs), nnx.relu)


def _conv(rngs, strides=1):
    return nnx.Sequential(nnx.Conv(W, W, (3, 3), strides=strides, rngs=rngs), nnx.relu)


def _linear_heads(rngs):
    return {t: nnx.Linear(W, OUT[t], rngs=rngs) for t in TASKS}


def _conv_heads(rngs):
    return {t: nnx.Conv(W, OUT[t], (1, 1), rngs=rngs) for t in TASKS}


MLP_SHAPES = {t: (BATCH, OUT[t]) for t in TASKS}
MLP_INPUT = (BATCH, W)


def _hard(rngs):
    return mtnn.HardSharing(_mlp(rngs), _linear_heads(rngs)), MLP_INPUT, MLP_SHAPES


def _soft(rngs):
    model = mtnn.SoftSharing.create(TASKS, _mlp, rngs=rngs, heads=_linear_heads(rngs))
    return model, MLP_INPUT, MLP_SHAPES


def _cross_stitch(rngs):
    columns = {t: [_mlp(rngs), _mlp(rngs)] for t in TASKS}
    return mtnn.CrossStitch(columns, _linear_heads(rngs)), MLP_INPUT, MLP_SHAPES


def _mtan_conv(rngs):
    model = mtnn.MTAN([_conv(rngs), _conv(rngs, strides=2)], _conv_heads(rngs),
                      channels=[W, W], rngs=rngs)
    return model, (2, 6, 6, W), {t: (2, 3, 3, OUT[t]) for t in TASKS}


def _mtan_mlp(rngs):
    model = mtnn.MTAN([_mlp(rngs) for _ in range(3)], _linear_heads(rngs),
                      channels=[W, W, W], hidden_features=2, rngs=rngs)
    return model, MLP_INPUT, MLP_SHAPES


def _mmoe(rngs):
    model = mtnn.MMoE([_mlp(rngs) for _ in range(3)], _linear_heads(rngs),
                      gate_in_features=W, rngs=rngs)
    return model, MLP_INPUT, MLP_SHAPES


def _cgc(rngs):
    model = mtnn.CGC([_mlp(rngs) for _ in range(2)],
                     {"a": [_mlp(rngs)], "b": [_mlp(rngs) for _ in range(2)]},
                     _linear_heads(rngs), in_features=W, rngs=rngs)
    return model, MLP_INPUT, MLP_SHAPES


def _ple(rngs):
    def layer(shared_gate):
        return mtnn.ExtractionLayer([_mlp(rngs)], {"a": [_mlp(rngs)],
                                                   "b": [_mlp(rngs), _mlp(rngs)]},
                                    in_features=W, shared_gate=shared_gate, rngs=rngs)

    model = mtnn.PLE([layer(True), layer(True), layer(False)], _linear_heads(rngs))
    return model, MLP_INPUT, MLP_SHAPES


def _padnet(rngs):
    model = mtnn.PADNet(_conv(rngs), intermediate={t: _conv(rngs) for t in TASKS},
                        initial_heads=_conv_heads(rngs), final_heads=_conv_heads(rngs),
                        features=W, rngs=rngs)
    return model, (2, 4, 4, W), {t: (2, 4, 4, OUT[t]) for t in TASKS}


BUILDERS = {"hard": _hard, "soft": _soft, "cross_stitch": _cross_stitch,
            "mtan_conv": _mtan_conv, "mtan_mlp": _mtan_mlp, "mmoe": _mmoe, "cgc": _cgc,
            "ple": _ple, "padnet": _padnet}


def _build(name, seed=0):
    model, input_shape, shapes = BUILDERS[name](nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), input_shape)
    return model, x, shapes


def _prediction_dicts(out):
    """The {task: prediction} dicts in a model output (PAD-Net gives two)."""
    if isinstance(out, mtnn.PADNetOutput):
        return [out.initial, out.final]
    return [out]


def _total_loss(model, x, targets):
    out = model(x)
    loss = sum(jnp.mean((pred[t] - targets[t]) ** 2)
               for pred in _prediction_dicts(out) for t in TASKS)
    if isinstance(model, mtnn.SoftSharing):
        loss = loss + model.penalty(0.1)
    return loss


# ----------------------------------------------------------------- every model


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_output_shapes_and_jit_matches_eager(name):
    model, x, shapes = _build(name)
    eager = model(x)
    for preds in _prediction_dicts(eager):
        assert list(preds) == sorted(TASKS)
        assert {t: p.shape for t, p in preds.items()} == shapes
        assert all(bool(jnp.all(jnp.isfinite(p))) for p in preds.values())
    jitted = nnx.jit(lambda m, inputs: m(inputs))(model, x)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
                 eager, jitted)
    # The encode/decode split used by jmtl's features mode gives the same predictions.
    split = model.decode(model.encode(x))
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
                 eager, split)


@pytest.mark.parametrize("name", _tiers.first_fast(sorted(BUILDERS), keep=2))
def test_one_sgd_step_lowers_the_total_loss(name):
    model, x, shapes = _build(name)
    keys = jax.random.split(jax.random.key(7), len(TASKS))
    targets = {t: jax.random.normal(k, shapes[t]) for t, k in zip(TASKS, keys, strict=True)}
    optimizer = nnx.Optimizer(model, optax.sgd(0.02), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, targets):
        loss, grads = nnx.value_and_grad(_total_loss)(model, x, targets)
        optimizer.update(model, grads)
        return loss, optax.tree.norm(nnx.state(grads, nnx.Param))

    before, grad_norm = train_step(model, optimizer, x, targets)
    after, _ = train_step(model, optimizer, x, targets)  # loss at the updated parameters
    assert float(grad_norm) > 0.0
    assert float(after) < float(before)


# Models whose decode(z) is task-separable: the parameters that task t's prediction depends
# on, with z held fixed, all sit under a key named t (its head, tower, gate, attention, ...).
SEPARABLE = ("hard", "cross_stitch", "mtan_conv", "mtan_mlp", "mmoe", "cgc", "ple", "soft")


@pytest.mark.parametrize("name", SEPARABLE)
def test_decode_parameters_are_task_specific(name):
    model, x, _ = _build(name)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    z = model.encode(x)

    def task_outputs(p):
        preds = nnx.merge(graphdef, p, rest).decode(z)
        return {task: jnp.sum(preds[task]) for task in TASKS}

    all_grads = jax.jit(jax.jacrev(task_outputs))(params)
    for task in TASKS:
        grads = all_grads[task]
        touched = []
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            if np.any(np.asarray(g) != 0):
                touched.append([getattr(k, "key", getattr(k, "idx", None)) for k in path])
        assert touched, f"task {task} depends on no decode parameter"
        for keys in touched:
            assert task in keys, f"task {task}'s prediction depends on {keys}"


# ---------------------------------------------------------------- soft sharing


def _pairwise_reference(towers):
    """sum_{i<j} ||theta_i - theta_j||^2 in float64, pair by pair."""
    flat = [np.concatenate([np.asarray(leaf, np.float64).ravel()
                            for leaf in jax.tree.leaves(towers[t])]) for t in sorted(towers)]
    return sum(np.sum((u - v) ** 2) for u, v in itertools.combinations(flat, 2))


def test_soft_sharing_penalty_matches_pairwise_numpy_reference():
    rngs = nnx.Rngs(3)
    model = mtnn.SoftSharing.create(["x", "y", "z", "w"], _mlp, rngs=rngs)
    state = nnx.state(model.towers, nnx.Param)
    expected = 0.3 * _pairwise_reference(state)
    np.testing.assert_allclose(float(mtnn.soft_sharing_penalty(state, 0.3)), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(float(model.penalty(0.3)), expected, rtol=1e-5)
    # The module holding the towers is accepted too.
    np.testing.assert_allclose(float(mtnn.soft_sharing_penalty(model.towers, 0.3)), expected,
                               rtol=1e-5)


def test_soft_sharing_penalty_gradient_matches_closed_form():
    keys = jax.random.split(jax.random.key(0), 3)
    towers = {t: {"w": jax.random.normal(k, (2, 3)), "b": jax.random.normal(k, (3,))}
              for t, k in zip("pqr", keys, strict=True)}
    grads = jax.jit(jax.grad(lambda tw: mtnn.soft_sharing_penalty(tw, 2.0)))(towers)
    # d/d theta_i sum_{i<j} ||theta_i - theta_j||^2 = 2 sum_j (theta_i - theta_j).
    for t in "pqr":
        for leaf in ("w", "b"):
            expected = 2.0 * 2.0 * sum(np.asarray(towers[t][leaf]) - np.asarray(towers[s][leaf])
                                       for s in "pqr")
            np.testing.assert_allclose(grads[t][leaf], expected, rtol=1e-5, atol=1e-6)


def test_soft_sharing_penalty_is_zero_for_identical_towers():
    rngs = nnx.Rngs(0)
    towers = {t: _mlp(rngs) for t in ("a", "b", "c")}
    for t in ("b", "c"):
        nnx.update(towers[t], nnx.state(towers["a"], nnx.Param))
    model = mtnn.SoftSharing(towers)
    assert float(model.penalty(10.0)) == 0.0
    assert float(mtnn.soft_sharing_penalty({"only": {"w": jnp.ones(3)}}, 1.0)) == 0.0


def test_soft_sharing_rejects_towers_of_different_shapes():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="'a'.*'b'"):
        mtnn.SoftSharing({"a": nnx.Linear(W, W, rngs=rngs), "b": nnx.Linear(W, 2, rngs=rngs)})
    with pytest.raises(ValueError, match="shape"):
        mtnn.soft_sharing_penalty({"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(3)}})


# ---------------------------------------------------------------- cross-stitch


def test_cross_stitch_unit_initialisation():
    alpha = np.asarray(mtnn.CrossStitchUnit(2).alpha[...])
    np.testing.assert_allclose(alpha, [[0.9, 0.1], [0.1, 0.9]], rtol=1e-6)
    alpha = np.asarray(mtnn.CrossStitchUnit(3, self_weight=0.8).alpha[...])
    np.testing.assert_allclose(alpha.sum(axis=1), np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(np.diag(alpha), np.full(3, 0.8), rtol=1e-6)


def test_cross_stitch_matches_manual_computation():
    rngs = nnx.Rngs(1)
    columns = {t: [nnx.Linear(W, W, rngs=rngs)] for t in TASKS}
    model = mtnn.CrossStitch(columns)
    model.units[0].alpha[...] = jnp.array([[0.7, 0.3], [0.4, 0.6]])
    x = np.asarray(jax.random.normal(jax.random.key(0), (5, W)), np.float64)
    h = {t: x @ np.asarray(columns[t][0].kernel[...]) + np.asarray(columns[t][0].bias[...])
         for t in TASKS}
    out = model(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out["a"], 0.7 * h["a"] + 0.3 * h["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b"], 0.4 * h["a"] + 0.6 * h["b"], rtol=1e-5, atol=1e-6)


def _column_grads(model, x, task, other):
    def task_output(m):
        return jnp.sum(m(x)[task])

    grads = nnx.grad(task_output)(model)
    return jax.tree.leaves(nnx.state(grads, nnx.Param)["columns"][other])


def test_cross_stitch_identity_alpha_separates_the_columns():
    model, x, _ = _build("cross_stitch")
    # Default alphas mix the columns: task a does depend on column b.
    assert any(np.any(np.asarray(g) != 0) for g in _column_grads(model, x, "a", "b"))
    for unit in model.units:
        unit.alpha[...] = jnp.eye(2)
    for task, other in (("a", "b"), ("b", "a")):
        grads = _column_grads(model, x, task, other)
        assert grads and all(np.all(np.asarray(g) == 0) for g in grads)


def test_cross_stitch_rejects_columns_of_different_depths():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="same number of stages"):
        mtnn.CrossStitch({"a": [nnx.Linear(W, W, rngs=rngs)],
                          "b": [nnx.Linear(W, W, rngs=rngs), nnx.Linear(W, W, rngs=rngs)]})


# ------------------------------------------------------------------------ MTAN


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mtan_conv", "mtan_mlp"])
def test_mtan_masks_are_sigmoids_over_each_stage(name):
    model, x, _ = _build(name)
    z = model.encode(x)
    masks = model.attention_masks(z)
    assert list(masks) == sorted(TASKS)
    for task_masks in masks.values():
        assert len(task_masks) == len(z)
        for mask, feature in zip(task_masks, z, strict=True):
            assert mask.shape == feature.shape
            assert bool(jnp.all((mask > 0) & (mask < 1)))


def test_mtan_checks_channels():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="one channel count per stage"):
        mtnn.MTAN([nnx.Linear(W, W, rngs=rngs)], {"a": nnx.Linear(W, 1, rngs=rngs)},
                  channels=[W, W], rngs=rngs)
    model = mtnn.MTAN([nnx.Linear(W, W, rngs=rngs)], {"a": nnx.Linear(W, 1, rngs=rngs)},
                      channels=[2], rngs=rngs)
    with pytest.raises(ValueError, match="channels"):
        model(jnp.ones((1, W)))


# ------------------------------------------------------------- MMoE, CGC, PLE


def test_mmoe_gate_weights_sum_to_one_and_match_manual_mixture():
    model, x, _ = _build("mmoe")
    weights = model.gate_weights(x)
    experts = np.stack([np.asarray(e(x), np.float64) for e in model.experts])
    flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    for t in TASKS:
        w = np.asarray(weights[t])
        assert w.shape == (BATCH, 3)
        assert np.all(w >= 0)
        np.testing.assert_allclose(w.sum(axis=-1), np.ones(BATCH), rtol=1e-6)
        gate = model.gates[t]
        logits = flat @ np.asarray(gate.kernel[...]) + np.asarray(gate.bias[...])
        softmax = np.exp(logits - logits.max(axis=-1, keepdims=True))
        softmax /= softmax.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(w, softmax, rtol=1e-5, atol=1e-6)
        mixture = np.einsum("be,ebd->bd", softmax, experts)
        tower = model.towers[t]
        expected = mixture @ np.asarray(tower.kernel[...]) + np.asarray(tower.bias[...])
        np.testing.assert_allclose(model(x)[t], expected, rtol=1e-5, atol=1e-5)


def test_cgc_gate_weights_sum_to_one_over_own_and_shared_experts():
    model, x, _ = _build("cgc")
    weights = model.gate_weights(x)
    assert weights["a"].shape == (BATCH, 1 + 2)
    assert weights["b"].shape == (BATCH, 2 + 2)
    for w in weights.values():
        assert bool(jnp.all(w >= 0))
        np.testing.assert_allclose(w.sum(axis=-1), np.ones(BATCH), rtol=1e-6)


def test_cgc_task_sees_only_its_own_and_shared_experts():
    model, x, _ = _build("cgc")

    def output_a(m):
        return jnp.sum(m(x)["a"])

    grads = nnx.state(nnx.grad(output_a)(model), nnx.Param)
    layer = grads["layers"][0]
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(layer["task_experts"]["b"]))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(layer["task_experts"]["a"]))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(layer["shared_experts"]))


def test_ple_gate_weights_per_level():
    model, x, _ = _build("ple")
    levels = model.gate_weights(x)
    assert len(levels) == 3
    for level, (task_weights, shared) in enumerate(levels):
        assert (shared is None) == (level == 2)
        candidates = [task_weights["a"], task_weights["b"]] + ([] if shared is None else [shared])
        for w in candidates:
            np.testing.assert_allclose(w.sum(axis=-1), np.ones(BATCH), rtol=1e-6)
        if shared is not None:
            assert shared.shape == (BATCH, 1 + 1 + 2)


def test_ple_requires_shared_gates_below_the_top_only():
    rngs = nnx.Rngs(0)

    def layer(shared_gate):
        return mtnn.ExtractionLayer([nnx.Linear(W, W, rngs=rngs)],
                                    {"a": [nnx.Linear(W, W, rngs=rngs)]},
                                    in_features=W, shared_gate=shared_gate, rngs=rngs)

    towers = {"a": nnx.Linear(W, 1, rngs=rngs)}
    with pytest.raises(ValueError, match="shared_gate=True"):
        mtnn.PLE([layer(False), layer(False)], towers)
    with pytest.raises(ValueError, match="shared_gate=False"):
        mtnn.PLE([layer(True)], towers)
    with pytest.raises(ValueError, match="missing"):
        mtnn.PLE([layer(False)], {"b": nnx.Linear(W, 1, rngs=rngs)})


def test_gate_rejects_input_of_the_wrong_size():
    model, _, _ = _build("mmoe")
    with pytest.raises(ValueError, match="gate"):
        model.gate_weights(jnp.ones((2, W + 1)))


# --------------------------------------------------------------------- PAD-Net


def test_distillation_matches_numpy_reference():
    tasks = ("a", "b", "c")
    distill = mtnn.MultiModalDistillation(tasks, W, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), len(tasks))
    feats = {t: jax.random.normal(k, (4, W)) for t, k in zip(tasks, keys, strict=True)}
    out = distill(feats)

    def linear(layer, v):
        return np.asarray(v, np.float64) @ np.asarray(layer.kernel[...]) + np.asarray(
            layer.bias[...])

    for t in tasks:
        gate = 1.0 / (1.0 + np.exp(-linear(distill.gates[t], feats[t])))
        expected = np.asarray(feats[t], np.float64) + sum(
            gate * linear(distill.messages[t][s], feats[s]) for s in tasks if s != t)
        np.testing.assert_allclose(out[t], expected, rtol=1e-5, atol=1e-5)


def test_padnet_initial_predictions_do_not_see_other_tasks():
    model, x, _ = _build("padnet")

    def initial_a(m):
        return jnp.sum(m(x).initial["a"])

    def final_a(m):
        return jnp.sum(m(x).final["a"])

    initial_grads = nnx.state(nnx.grad(initial_a)(model), nnx.Param)
    final_grads = nnx.state(nnx.grad(final_a)(model), nnx.Param)
    assert all(np.all(np.asarray(g) == 0)
               for g in jax.tree.leaves(initial_grads["intermediate"]["b"]))
    # After distillation, task a receives messages from task b's intermediate features.
    assert any(np.any(np.asarray(g) != 0)
               for g in jax.tree.leaves(final_grads["intermediate"]["b"]))


def test_mismatched_head_tasks_are_named():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"missing \['b'\], extra \['c'\]"):
        mtnn.PADNet(nnx.Linear(W, W, rngs=rngs),
                    {"a": nnx.Linear(W, W, rngs=rngs), "b": nnx.Linear(W, W, rngs=rngs)},
                    {"a": nnx.Linear(W, 1, rngs=rngs), "c": nnx.Linear(W, 1, rngs=rngs)},
                    {"a": nnx.Linear(W, 1, rngs=rngs), "b": nnx.Linear(W, 1, rngs=rngs)},
                    features=2, rngs=rngs)
    with pytest.raises(ValueError, match="empty"):
        mtnn.HardSharing(nnx.Linear(W, W, rngs=rngs), {})


def test_mixing_keeps_the_activation_dtype():
    stacked = jnp.ones((2, 3, W), jnp.bfloat16)
    assert mtnn.CrossStitchUnit(2)(stacked).dtype == jnp.bfloat16
    rngs = nnx.Rngs(0)
    experts = [nnx.Linear(W, W, dtype=jnp.bfloat16, rngs=rngs) for _ in range(2)]
    model = mtnn.MMoE(experts, {"a": nnx.Linear(W, 1, dtype=jnp.bfloat16, rngs=rngs)},
                      gate_in_features=W, rngs=rngs)
    out = model(jnp.ones((3, W), jnp.bfloat16))
    assert out["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(model.gate_weights(jnp.ones((3, W)))["a"].sum(-1), np.ones(3),
                               rtol=1e-6)


def _features_mode_grads(name):
    """Grads of jmtl's features mode (ew) and of the summed loss, for one model."""
    model, x, shapes = _build(name)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    targets = {t: jnp.full(shapes[t], 0.5) for t in TASKS}

    def encoder(p, inputs):
        z = nnx.merge(graphdef, p, rest).encode(inputs)
        # MMoE with data as input: only the expert outputs are the representation.
        return z.expert_outputs if isinstance(z, mtnn.MixtureFeatures) else z

    def heads_loss(p, z, inputs):
        m = nnx.merge(graphdef, p, rest)
        if isinstance(m, mtnn.MMoE):
            z = mtnn.MixtureFeatures(z, inputs)
        preds = m.decode(z)
        return {t: jnp.mean((preds[t] - targets[t]) ** 2) for t in TASKS}

    method = jmtl.ew()
    grad_fn = jax.jit(jmtl.value_and_mtl_grad(heads_loss, method, encoder=encoder))
    _, grads, _ = grad_fn(params, method.init(len(TASKS)), x)
    reference = jax.grad(lambda p: sum(heads_loss(p, encoder(p, x), x).values()))(params)
    return grads, reference


@pytest.mark.parametrize("name", ["mmoe", "mtan_mlp"])
def test_encode_decode_work_with_jmtl_features_mode(name):
    grads, reference = _features_mode_grads(name)
    # Equal weights: the aggregated update is the gradient of the summed loss.
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
                 grads, reference)
