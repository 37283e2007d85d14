"""One path grammar: the same `shared` selects the same parameters in every entry point."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import losses as losses_lib
from jmtl.methods import base
from jmtl.train import make_train_step

PARAMS = {"trunk": {"w": jnp.full((3, 4), 0.3), "b": jnp.full((4,), 0.1)},
          "heads": {"a": jnp.linspace(-1.0, 1.0, 4), "b": jnp.linspace(1.0, 2.0, 4)}}
X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)), jnp.float32)
Y = {"a": jnp.arange(6.0) / 6, "b": -jnp.arange(6.0) / 3}
# Shared: trunk/w and trunk/b. Expected mask in tree_leaves order: heads/a, heads/b,
# trunk/b, trunk/w.
EXPECTED = [False, False, True, True]

SPECS = {
    "callable": lambda path, leaf: path.startswith("trunk/"),
    "rule": "trunk",
    "glob": ["trunk/*"],
    "two_rules": ["trunk/w", "trunk/b"],
    "prefix": {"trunk": True, "heads": False},
}
LABEL_RULES = {k: v for k, v in SPECS.items() if k != "prefix"}


def apply_fn(p, x):
    h = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
    return {t: h @ w for t, w in p["heads"].items()}


def loss_fn(p, x, y):
    out = apply_fn(p, x)
    return {t: jnp.mean((out[t] - y[t]) ** 2) for t in out}


def zero_direction() -> base.Method:
    """Shared parameters get exactly 0; task-specific ones their own gradient."""
    return base.Method(name="zero_direction", init=base.stateless_init,
                       update=lambda inputs, state: (jnp.zeros(inputs.jacobian.shape[1]),
                                                     state),
                       needs=frozenset({base.JACOBIAN}), output=base.DIRECTION,
                       weights_task_specific=False)


def _engine_mask(spec):
    fn = jmtl.value_and_mtl_grad(loss_fn, zero_direction(), shared=spec)
    _, grads, _ = fn(PARAMS, (), X, Y)
    return [bool(np.all(np.asarray(g) == 0)) for g in jax.tree_util.tree_leaves(grads)]


@pytest.mark.parametrize("kind", list(SPECS))
def test_every_entry_point_selects_the_same_parameters(kind):
    spec = SPECS[kind]
    assert jax.tree_util.tree_leaves(jmtl.shared_mask(PARAMS, spec)) == EXPECTED
    assert jmtl.num_shared(PARAMS, spec) == 3 * 4 + 4
    assert _engine_mask(spec) == EXPECTED
    step = make_train_step(apply_fn, {"a": losses_lib.masked_mse, "b": losses_lib.masked_mse},
                           zero_direction(), optax.sgd(1.0), params=PARAMS, shared=spec)
    state = step.init(X, Y)
    new, _ = step(state, X, Y)
    moved = [bool(np.all(np.asarray(a) == np.asarray(b))) for a, b in zip(
        jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params),
        strict=True)]
    assert moved == EXPECTED
    if kind in LABEL_RULES:
        rules = spec if isinstance(spec, list) else [spec]
        labels = jmtl.optim.label_tree(PARAMS, [(r, "shared") for r in rules], default="task")
        assert [lab == "shared" for lab in jax.tree_util.tree_leaves(labels)] == EXPECTED


@pytest.mark.parametrize("bad", ["trunk2", ["trunk/*", "nothing/*"]])
def test_a_rule_matching_nothing_is_the_same_error_everywhere(bad):
    for call in (lambda: jmtl.shared_mask(PARAMS, bad),
                 lambda: jmtl.value_and_mtl_grad(loss_fn, jmtl.mean(), shared=bad)(
                     PARAMS, (), X, Y),
                 lambda: make_train_step(apply_fn, {"a": losses_lib.masked_mse,
                                                    "b": losses_lib.masked_mse},
                                         jmtl.mean(), optax.sgd(1.0), params=PARAMS,
                                         shared=bad).init(X, Y)):
        with pytest.raises(ValueError, match=r"`shared` rule\(s\) .* match no parameter"):
            call()


def test_a_callable_must_return_a_bool():
    with pytest.raises(TypeError, match="must return a Python bool"):
        jmtl.shared_mask(PARAMS, lambda path, leaf: "yes")
