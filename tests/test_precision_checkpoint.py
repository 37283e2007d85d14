"""Mixed precision, checkpoint resume, and no retracing across training steps."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from tests import _method_params, _tiers
from tests import _mtl_problem as prob

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 2e-3 per operation). Over 20
# steps of a 3-layer model the params drift from the float32 run by well under 2% of
# their scale; 5e-2 relative to the largest parameter leaves room and still catches a
# Gramian or solver computed in bf16 (which diverges at the 10-100% level here).
BF16_TOL = 5e-2


def _train(method, params, steps, *, key_seed=0, start=0, opt_state=None, mstate=None,
           optimizer=None):
    step, opt = prob.make_step(method, optimizer)
    x, y = prob.make_batch()
    opt_state = opt.init(params) if opt_state is None else opt_state
    mstate = prob.method_state(method, params) if mstate is None else mstate
    jstep, key = jax.jit(step), jax.random.key(key_seed)
    losses = None
    for i in range(start, start + steps):
        params, opt_state, mstate, losses = jstep(params, opt_state, mstate, x, y,
                                                  jax.random.fold_in(key, i))
    return params, opt_state, mstate, losses


@pytest.mark.parametrize("name", _tiers.first_fast(["upgrad", "mgda", "gradnorm", "uw"]))
def test_bf16_run_tracks_float32_run(name):
    method = jmtl.methods.get(name)
    p32, _, s32, _ = _train(method, prob.init_params(), 20)
    p16, _, s16, l16 = _train(method, prob.init_params(dtype=jnp.bfloat16), 20)
    for leaf in jax.tree_util.tree_leaves(p16):
        assert leaf.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
    for leaf in jax.tree_util.tree_leaves(s16):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, "method state must stay float32"
            assert bool(jnp.all(jnp.isfinite(leaf)))
    assert all(bool(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(l16))
    for a, b in zip(jax.tree_util.tree_leaves(p16), jax.tree_util.tree_leaves(p32), strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        assert err <= BF16_TOL * scale, (err, scale)


def test_bf16_gramian_is_float32():
    params = prob.init_params(dtype=jnp.bfloat16)
    x, y = prob.make_batch()
    seen = {}

    def spy(inputs, state):
        seen["dtype"] = inputs.gramian.dtype
        return jnp.ones_like(inputs.present, jnp.float32), state

    base = jmtl.mean()
    method = base._replace(name="spy", update=spy, needs=frozenset({jmtl.methods.GRAMIAN}))
    grad_fn = jmtl.value_and_mtl_grad(prob.loss_fn, method, shared=prob.SHARED)
    grad_fn(params, method.init(3), x, y)
    assert seen["dtype"] == jnp.float32


@pytest.mark.parametrize("name", _tiers.first_fast(["gradnorm", "pcgrad", "dwa"]))
def test_checkpoint_resume_is_bit_identical(name, tmp_path):
    method = jmtl.methods.get(name)
    optimizer = optax.adam(1e-2)
    full = _train(method, prob.init_params(), 8, optimizer=optimizer)

    params, opt_state, mstate, _ = _train(method, prob.init_params(), 4, optimizer=optimizer)
    ckpt = os.path.join(tmp_path, "step4")
    items = {"params": params, "opt_state": opt_state, "method_state": mstate}
    jmtl.checkpoint.save(ckpt, items, method=method, tasks=prob.TASKS)
    # Restore into freshly initialised (different) values of the same structure.
    fresh_params = prob.init_params(seed=7)
    like = {"params": fresh_params, "opt_state": optimizer.init(fresh_params),
            "method_state": prob.method_state(method, fresh_params)}
    restored = jmtl.checkpoint.restore(ckpt, like, method=method, tasks=prob.TASKS)
    resumed = _train(method, restored["params"], 4, start=4, optimizer=optimizer,
                     opt_state=restored["opt_state"], mstate=restored["method_state"])
    for a, b in zip(jax.tree_util.tree_leaves(resumed[:3]), jax.tree_util.tree_leaves(full[:3]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_mismatch_errors(tmp_path):
    method = jmtl.gradnorm()
    params = prob.init_params()
    items = {"params": params, "method_state": prob.method_state(method, params)}
    ckpt = os.path.join(tmp_path, "ck")
    jmtl.checkpoint.save(ckpt, items, method=method, tasks=prob.TASKS)
    err = jmtl.checkpoint.CheckpointMismatchError
    with pytest.raises(err, match=r"task sets differ.*missing from checkpoint: \['d'\]"):
        jmtl.checkpoint.restore(ckpt, items, method=method, tasks=("a", "b", "c", "d"))
    with pytest.raises(err, match="method differs: checkpoint has 'gradnorm'"):
        jmtl.checkpoint.restore(ckpt, items, method=jmtl.ew(), tasks=prob.TASKS)
    with pytest.raises(err, match="hyperparameters differ"):
        jmtl.checkpoint.restore(ckpt, items, method=jmtl.gradnorm(alpha=0.5), tasks=prob.TASKS)
    four = {"params": params, "method_state": jmtl.gradnorm().init(4)}
    with pytest.raises(err, match=r"method_state.*shape/dtype \[\[3\]"):
        jmtl.checkpoint.restore(ckpt, four, method=method, tasks=prob.TASKS)
    # Corrupt the array data: a clear error, not garbage.
    for root, _, files in os.walk(ckpt):
        for f in files:
            if "tree_params" in root and not f.startswith("_") and "metadata" not in f:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
    with pytest.raises(err, match="corrupted or unreadable"):
        jmtl.checkpoint.restore(ckpt, items, method=method, tasks=prob.TASKS)


def _snapshot(root) -> dict:
    """``{relative path: bytes}`` of every file under ``root`` (what must survive)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            full = os.path.join(d, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = fh.read()
    return out


def _small_items(value):
    return {"params": {"w": jnp.full((2,), value)}, "method_state": ()}


def test_checkpoint_force_never_deletes_user_files(tmp_path):
    method = jmtl.ew()
    user = tmp_path / "results"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("a week of work")
    (user / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _snapshot(user)
    for force in (False, True):
        with pytest.raises(FileExistsError, match="results"):
            jmtl.checkpoint.save(user, _small_items(1.0), method=method, tasks=("a", "b"),
                                 force=force)
        assert _snapshot(user) == before
    # A directory that looks like an orbax item but is not a jmtl checkpoint.
    other = tmp_path / "other"
    (other / "meta").mkdir(parents=True)
    (other / "meta" / "metadata").write_text('{"format": "someone-else"}')
    before = _snapshot(other)
    with pytest.raises(FileExistsError, match="format 'someone-else'"):
        jmtl.checkpoint.save(other, _small_items(1.0), method=method, tasks=("a", "b"),
                             force=True)
    assert _snapshot(other) == before
    # A file, and a symbolic link to a checkpoint, are refused too.
    afile = tmp_path / "file"
    afile.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a directory"):
        jmtl.checkpoint.save(afile, _small_items(1.0), method=method, tasks=("a", "b"),
                             force=True)
    assert afile.read_text() == "keep me"


def test_checkpoint_force_replaces_only_a_pure_jmtl_checkpoint(tmp_path):
    method, tasks = jmtl.ew(), ("a", "b")
    ckpt = tmp_path / "ck"
    jmtl.checkpoint.save(ckpt, _small_items(1.0), method=method, tasks=tasks)
    with pytest.raises(FileExistsError, match="force=True"):
        jmtl.checkpoint.save(ckpt, _small_items(2.0), method=method, tasks=tasks)
    jmtl.checkpoint.save(ckpt, _small_items(2.0), method=method, tasks=tasks, force=True)
    got = jmtl.checkpoint.restore(ckpt, _small_items(0.0), method=method, tasks=tasks)
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), [2.0, 2.0])
    # The same checkpoint with a file of the user's beside it: refused, both kept.
    (ckpt / "notes.txt").write_text("mine")
    before = _snapshot(ckpt)
    with pytest.raises(FileExistsError, match=r"also holds \['notes.txt'\]"):
        jmtl.checkpoint.save(ckpt, _small_items(3.0), method=method, tasks=tasks, force=True)
    assert _snapshot(ckpt) == before
    got = jmtl.checkpoint.restore(ckpt, _small_items(0.0), method=method, tasks=tasks)
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), [2.0, 2.0])
    # Through a symbolic link: refused, the target kept.
    link = tmp_path / "link"
    link.symlink_to(ckpt, target_is_directory=True)
    with pytest.raises(FileExistsError, match="symbolic link"):
        jmtl.checkpoint.save(link, _small_items(3.0), method=method, tasks=tasks, force=True)
    assert _snapshot(ckpt) == before


@pytest.mark.parametrize("force", [False, True])
def test_checkpoint_into_an_empty_directory(tmp_path, force):
    method, tasks = jmtl.ew(), ("a", "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    jmtl.checkpoint.save(empty, _small_items(4.0), method=method, tasks=tasks, force=force)
    got = jmtl.checkpoint.restore(empty, _small_items(0.0), method=method, tasks=tasks)
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), [4.0, 4.0])


@pytest.mark.parametrize("name", _tiers.methods())
def test_step_traces_once(name):
    """No retracing across steps: the method state keeps its dtypes and shapes."""
    method = _method_params.build(name, len(prob.TASKS))
    step, opt = prob.make_step(method)
    traces = []

    def counted(*args):
        traces.append(1)
        return step(*args)

    jstep = jax.jit(counted)
    params = prob.init_params()
    x, y = prob.make_batch()
    opt_state, mstate = opt.init(params), prob.method_state(method, params)
    for i in range(3):
        params, opt_state, mstate, _ = jstep(params, opt_state, mstate, x, y,
                                             jax.random.key(i))
    assert len(traces) == 1
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("name", jmtl.methods.names())
def test_method_state_can_be_donated(name):
    """Every state leaf is its own buffer, so ``jax.jit(..., donate_argnums=...)`` works."""
    method = _method_params.build(name, len(prob.TASKS))
    state = method.init(len(prob.TASKS), dim=5)
    leaves = jax.tree_util.tree_leaves(state)
    assert len({id(leaf) for leaf in leaves}) == len(leaves)
    jax.block_until_ready(jax.jit(lambda s: s, donate_argnums=0)(state))
