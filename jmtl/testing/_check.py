"""``check_method``: property tests for any balancing method (chex underneath)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmtl._aggregate import aggregate
from jmtl.methods import base

__all__ = ["check_method", "PROPERTIES"]

PROPERTIES = base.PROPERTIES

# Global scales of the Jacobian tried by the scale properties and ``finite`` (float32
# covers them all; narrower dtypes keep those they can represent).
SCALES = (1e-20, 1e-10, 1e-3, 1e3, 1e10, 1e20)
_STEPS = 3  # steps of a sequence (stateful methods see their statistics move)


def _chex():
    try:
        import chex
    except ImportError as err:  # pragma: no cover - chex is a test dependency
        raise ImportError("jmtl.testing.check_method needs chex: pip install chex "
                          "(or jmtl[test])") from err
    return chex


class _Harness:
    """One method, K tasks, d columns: jitted and eager steps through ``jmtl.aggregate``."""

    def __init__(self, method: base.Method, k: int, d: int, dtype: Any, seed: int,
                 rtol: float):
        self.method, self.k, self.d, self.dtype, self.rtol = method, k, d, dtype, rtol
        self.rng = np.random.default_rng(seed)
        self.seed = seed

        out_size = k if method.output == base.WEIGHTS else d

        # The recorder carries the method's raw output (weights or direction, and the
        # heads' own weights) out of ``jmtl.aggregate`` in its state, whose structure
        # stays the same from step to step (the engine checks and guards the state).
        def update(inputs, state):
            inner = state[0]
            res, new_inner = method.update(inputs, inner)
            if isinstance(res, base.Output):
                return res.out, (new_inner, res.out, res.head_weights, jnp.ones((), bool))
            return res, (new_inner, res, jnp.zeros((k,), jnp.float32), jnp.zeros((), bool))

        def init(num_tasks, dim=None):
            inner = method.init(num_tasks, dim=dim)
            return (inner, jnp.zeros((out_size,), jnp.float32),
                    jnp.zeros((num_tasks,), jnp.float32), jnp.zeros((), bool))

        recorder = method._replace(update=update, init=init)

        def step(jac, state, losses, key, present):
            wrapped = (state, jnp.zeros((out_size,), jnp.float32),
                       jnp.zeros((k,), jnp.float32), jnp.zeros((), bool))
            upd, (new_state, out, head, has_head) = aggregate(
                recorder, jac, wrapped, losses=losses, key=key, present=present)
            return upd, new_state, out, (head, has_head)

        self.eager = step
        self.jit = jax.jit(step)

    # ------------------------------------------------------------------ inputs
    def init(self):
        try:
            return self.method.init(self.k, dim=self.d)
        except TypeError:  # a user's ``init(num_tasks)`` without ``dim``
            return self.method.init(self.k)

    def random_jacobian(self) -> np.ndarray:
        return self.rng.standard_normal((self.k, self.d))

    def random_losses(self) -> np.ndarray:
        return self.rng.uniform(0.2, 3.0, self.k)

    def key(self, i: int = 0):
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), i)

    def run(self, jac, state=None, losses=None, key=None, present=None, fn=None):
        """One step; returns float64 numpy update, the new state, weights and heads."""
        state = self.init() if state is None else state
        losses = self.random_losses() if losses is None else losses
        present = np.ones(self.k, bool) if present is None else np.asarray(present)
        fn = self.jit if fn is None else fn
        upd, new_state, out, (head, has_head) = fn(jnp.asarray(jac, self.dtype), state,
                                                   jnp.asarray(losses, jnp.float32),
                                                   self.key() if key is None else key,
                                                   jnp.asarray(present))
        return _f64(upd), new_state, _f64(out), _f64(head) if bool(has_head) else None

    def sequence(self, n: int = _STEPS):
        return [(self.random_jacobian(), self.random_losses()) for _ in range(n)]

    # ------------------------------------------------------------------ failures
    def fail(self, prop: str, case: str, detail: str) -> AssertionError:
        return AssertionError(
            f"{self.method!r} fails property '{prop}' on input '{case}' "
            f"(K={self.k}, d={self.d}, dtype={jnp.dtype(self.dtype).name}, "
            f"seed={self.seed}): {detail}")


def _f64(x) -> np.ndarray:
    return np.asarray(jax.device_get(x)).astype(np.float64)


def _fmt(x) -> str:
    return np.array2string(np.asarray(x, np.float64), precision=4, max_line_width=200)


def _norm(x) -> float:
    x = np.asarray(x, np.float64).ravel()
    m = np.max(np.abs(x)) if x.size else 0.0
    return 0.0 if m == 0 or not np.isfinite(m) else float(m * np.linalg.norm(x / m))


def _rel_err(a, b) -> float:
    """``|a - b| / max(|a|, |b|)`` (0 when both are 0)."""
    scale = max(_norm(a), _norm(b))
    return 0.0 if scale == 0 else _norm(np.asarray(a) - np.asarray(b)) / scale


def _scales(dtype, magnitude: float = 1.0) -> tuple[float, ...]:
    info = jnp.finfo(dtype)
    lo, hi = float(info.tiny) * 1e6, float(info.max) / 1e6 / max(magnitude, 1.0)
    return tuple(s for s in SCALES if lo < s < hi)


def _degenerate_cases(h: _Harness) -> list[tuple[str, np.ndarray]]:
    k, d, rng = h.k, h.d, h.rng
    j = rng.standard_normal((k, d))
    cases = [("random", j)]
    z = j.copy()
    z[0] = 0
    cases.append(("zero row 0", z))
    cases.append(("all rows zero", np.zeros((k, d))))
    if k >= 2:
        dup = j.copy()
        dup[1] = dup[0]
        cases.append(("row 1 duplicates row 0", dup))
        opp = j.copy()
        opp[1] = -opp[0]
        cases.append(("row 1 opposite to row 0", opp))
        rank1 = np.outer(rng.standard_normal(k), rng.standard_normal(d))
        cases.append(("rank 1 (rows along one direction, both signs)", rank1))
    for s in _scales(h.dtype, 10.0):
        cases.append((f"random * {s:g}", j * s))
    scales = _scales(h.dtype, 10.0)
    if k >= 2 and len(scales) >= 2:
        lo, hi = scales[0], scales[-1]
        mixed = j.copy()
        mixed[0] *= lo
        mixed[1] *= hi
        cases.append((f"row 0 * {lo:g}, row 1 * {hi:g}", mixed))
    return cases


# ---------------------------------------------------------------------- properties


def _non_conflicting(h: _Harness) -> None:
    """``<J_i, d> >= 0`` for every task, up to rounding (see ``check_method``)."""
    k, d, rng = h.k, h.d, h.rng
    cases = [(f"random #{i}", rng.standard_normal((k, d))) for i in range(3)]
    if k >= 2:
        j = rng.standard_normal((k, d))
        j[1] = -j[0] + 0.1 * rng.standard_normal(d)
        cases.append(("row 1 nearly opposite to row 0", j))
        rank = max(k - 1, 1)
        cases.append((f"rank {rank}", rng.standard_normal((k, rank))
                      @ rng.standard_normal((rank, d))))
        mixed = rng.standard_normal((k, d)) * np.logspace(0, -4, k)[:, None]
        cases.append(("row norms from 1 to 1e-4", mixed))
    for case, jac in cases:
        upd, *_ = h.run(jac)
        jac_q = _f64(jnp.asarray(jac, h.dtype))
        dots = jac_q @ upd
        row_norms = np.array([_norm(r) for r in jac_q])
        # The component of d along J_i, relative to the size of the problem: when the
        # exact update is 0 (rows that positively span their space), rounding noise must
        # not count as a conflict.
        scale = max(_norm(upd), float(np.max(row_norms)))
        rel = np.where(row_norms > 0, dots / np.maximum(row_norms, 1e-300) / max(scale, 1e-300),
                       0.0)
        bad = np.nonzero(rel < -h.rtol)[0]
        if bad.size:
            i = int(bad[0])
            raise h.fail(NON, case, (
                f"the update conflicts with task {i}: <J_{i}, d> = {dots[i]:.4g}, "
                f"<J_{i}, d> / (|J_{i}| max(|d|, max_k |J_k|)) = {rel[i]:.4g} < -{h.rtol:g}; "
                f"|d| = {_norm(upd):.4g}, |J_k| = {_fmt(row_norms)}, all relative "
                f"components {_fmt(rel)}"))


def _permutation_equivariant(h: _Harness) -> None:
    """Permuting the tasks (rows, losses) permutes the weights and keeps the update."""
    k = h.k
    if k < 2:
        return
    seq = h.sequence()
    perms = (("reversed", np.arange(k)[::-1]), ("rolled by 1", np.roll(np.arange(k), 1)))
    for perm_name, p in perms:
        s0, s1 = h.init(), h.init()
        for t, (jac, losses) in enumerate(seq):
            key = h.key(t)
            u0, s0, w0, c0 = h.run(jac, s0, losses, key)
            u1, s1, w1, c1 = h.run(jac[p], s1, losses[p], key)
            case = f"tasks {perm_name} (order {p.tolist()}), step {t}"
            err = _rel_err(u0, u1)
            if not err <= h.rtol:
                raise h.fail(PERM, case, (
                    f"the update changed by a relative {err:.3g} > {h.rtol:g}: "
                    f"{_fmt(u0)} vs {_fmt(u1)}"))
            if h.method.output == base.WEIGHTS and not _rel_err(w0[p], w1) <= h.rtol:
                raise h.fail(PERM, case, (
                    f"weights are not permuted with the tasks: w[perm] = {_fmt(w0[p])}, "
                    f"w(permuted) = {_fmt(w1)}"))
            if c0 is not None and not _rel_err(c0[p], c1) <= h.rtol:
                raise h.fail(PERM, case, (
                    f"head weights are not permuted with the tasks: {_fmt(c0[p])} vs "
                    f"{_fmt(c1)}"))


def _run_sequence(h: _Harness, seq, row_scale) -> list[np.ndarray]:
    """Updates of a sequence of steps from ``init`` with every Jacobian's rows scaled."""
    state, out = h.init(), []
    for t, (jac, losses) in enumerate(seq):
        upd, state, _, _ = h.run(np.asarray(row_scale)[..., None] * jac, state, losses,
                                 h.key(t))
        out.append(upd)
    return out


def _scale_invariant(h: _Harness) -> None:
    """The update's direction is the same for ``c J``, ``c`` from 1e-20 to 1e20."""
    seq = h.sequence()
    base_u = _run_sequence(h, seq, 1.0)
    for c in _scales(h.dtype, 10.0):
        for t, (u0, u1) in enumerate(zip(base_u, _run_sequence(h, seq, c), strict=True)):
            case = f"random sequence * {c:g}, step {t}"
            n0, n1 = _norm(u0), _norm(u1)
            if not np.all(np.isfinite(u1)):
                raise h.fail(SCALE, case, f"the update is not finite: {_fmt(u1)}")
            if (n0 == 0) != (n1 == 0):
                raise h.fail(SCALE, case, f"|d(J)| = {n0:.4g} but |d(c J)| = {n1:.4g}")
            if n0 == 0:
                continue
            err = _norm(u0 / n0 - u1 / n1)
            if not err <= h.rtol:
                raise h.fail(SCALE, case, (
                    f"the direction changed by {err:.3g} > {h.rtol:g}: "
                    f"d(J)/|d(J)| = {_fmt(u0 / n0)}, d(cJ)/|d(cJ)| = {_fmt(u1 / n1)}"))


def _linear_under_scaling(h: _Harness) -> None:
    """``A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J)`` for c1, c2 > 0."""
    rng = h.rng
    seq = h.sequence()
    for _ in range(2):
        c1, c2 = rng.uniform(0.1, 10.0, (2, h.k))
        a, b = rng.uniform(0.2, 5.0, 2)
        runs = zip(_run_sequence(h, seq, c1), _run_sequence(h, seq, c2),
                   _run_sequence(h, seq, a * c1 + b * c2), strict=True)
        for t, (u1, u2, u12) in enumerate(runs):
            rhs = a * u1 + b * u2
            err = _rel_err(u12, rhs)
            if not err <= h.rtol:
                raise h.fail(LINEAR, f"random sequence step {t}, c1={_fmt(c1)}, "
                             f"c2={_fmt(c2)}, a={a:.3g}, b={b:.3g}", (
                                 f"A(diag(a c1 + b c2) J) = {_fmt(u12)} but "
                                 f"a A(diag(c1) J) + b A(diag(c2) J) = {_fmt(rhs)} "
                                 f"(relative error {err:.3g} > {h.rtol:g})"))
    base_u = _run_sequence(h, seq, 1.0)
    for c in _scales(h.dtype, 10.0):
        for t, (u0, u1) in enumerate(zip(base_u, _run_sequence(h, seq, c), strict=True)):
            err = _rel_err(u1 / c, u0)
            if not err <= h.rtol:
                raise h.fail(LINEAR, f"random sequence * {c:g}, step {t}", (
                    f"A(c J) / c = {_fmt(u1 / c)} but A(J) = {_fmt(u0)} (relative error "
                    f"{err:.3g} > {h.rtol:g})"))


def _jit_consistent(h: _Harness) -> None:
    """The same numbers with and without ``jax.jit`` (and under ``shard_map``)."""
    chex = _chex()
    variants: list[tuple[str, Callable]] = [("without jit", h.eager)]
    devices = jax.devices()
    if len(devices) > 1:
        from jax.sharding import PartitionSpec as P

        mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
        sharded = jax.jit(jax.shard_map(h.eager, mesh=mesh, in_specs=P(), out_specs=P(),
                                        check_vma=False))
        variants.append((f"shard_map over {len(devices)} devices", sharded))
    seq = h.sequence()
    for name, fn in variants:
        s_jit, s_other = h.init(), h.init()
        for t, (jac, losses) in enumerate(seq):
            key = h.key(t)
            u0, s_jit, w0, _ = h.run(jac, s_jit, losses, key)
            u1, s_other, w1, _ = h.run(jac, s_other, losses, key, fn=fn)
            case = f"random sequence, step {t}, jit vs {name}"
            err = _rel_err(u0, u1)
            if not err <= h.rtol:
                raise h.fail(JIT, case, (
                    f"the update differs by a relative {err:.3g} > {h.rtol:g}: jit "
                    f"{_fmt(u0)}, {name} {_fmt(u1)}"))
            try:
                chex.assert_trees_all_close(s_jit, s_other, rtol=h.rtol, atol=h.rtol * 1e-3)
            except AssertionError as err_:
                raise h.fail(JIT, case, f"the new states differ: {err_}") from None


def _finite(h: _Harness) -> None:
    """Finite update, weights and state on degenerate inputs (several steps)."""
    chex = _chex()
    for case, jac in _degenerate_cases(h):
        state = h.init()
        for t in range(_STEPS):
            upd, state, out, head = h.run(jac, state, key=h.key(t))
            for what, val in (("update", upd), ("weights" if h.method.output == base.WEIGHTS
                                                 else "direction", out), ("head weights", head)):
                if val is not None and not np.all(np.isfinite(val)):
                    raise h.fail(FINITE, f"{case}, step {t}", f"the {what} is not finite: "
                                 f"{_fmt(val)}")
            try:
                chex.assert_tree_all_finite(jax.tree_util.tree_map(
                    lambda x: x if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
                    else jnp.zeros(()), state))
            except AssertionError as err:
                raise h.fail(FINITE, f"{case}, step {t}", f"the state is not finite: {err}"
                             ) from None


def _absent_tasks(h: _Harness) -> None:
    """An absent task gets weight 0 and its per-task statistics do not move.

    Its Jacobian row is NaN (``jmtl.aggregate`` masks it) and its loss 0 (what
    ``jmtl.losses`` returns for a task without labels).
    """
    k = h.k
    if k < 2:
        return
    seq = h.sequence(_STEPS + 1)
    for j in sorted({0, k - 1}):
        state = h.init()
        for t, (jac, losses) in enumerate(seq[:-1]):
            _, state, _, _ = h.run(jac, state, losses, h.key(t))
        jac, losses = seq[-1]
        jac, losses = jac.copy(), losses.copy()
        jac[j] = np.nan
        losses[j] = 0.0
        present = np.arange(k) != j
        case = f"task {j} absent (NaN row, loss 0) after {_STEPS} steps"
        upd, new_state, out, head = h.run(jac, state, losses, h.key(_STEPS), present)
        if not np.all(np.isfinite(upd)):
            raise h.fail(ABSENT, case, f"the update is not finite: {_fmt(upd)}")
        if h.method.output == base.WEIGHTS and out[j] != 0:
            raise h.fail(ABSENT, case, f"the absent task's weight is {out[j]:.4g}, not 0 "
                         f"(weights {_fmt(out)})")
        if head is not None and head[j] != 0:
            raise h.fail(ABSENT, case, f"the absent task's head weight is {head[j]:.4g}, "
                         f"not 0 (head weights {_fmt(head)})")
        old_leaves = jax.tree_util.tree_leaves_with_path(state)
        new_leaves = jax.tree_util.tree_leaves(new_state)
        for (path, old), new in zip(old_leaves, new_leaves, strict=True):
            old, new = np.asarray(old), np.asarray(new)
            for axis, size in enumerate(old.shape):
                if size != k:
                    continue
                a, b = np.take(old, j, axis=axis), np.take(new, j, axis=axis)
                if not np.array_equal(a, b, equal_nan=True):
                    raise h.fail(ABSENT, case, (
                        f"state{jax.tree_util.keystr(path)} moved for the absent task "
                        f"(index {j} on axis {axis}): {_fmt(a)} -> {_fmt(b)}"))


def _state_pytree(h: _Harness) -> None:
    """The state keeps its structure, shapes and dtypes through ``lax.scan`` steps."""
    chex = _chex()
    state0 = h.init()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state0):
        if not isinstance(leaf, jax.Array | np.ndarray):
            raise h.fail(STATE, "init", f"state{jax.tree_util.keystr(path)} is "
                         f"{type(leaf).__name__}, not an array")
    seq = h.sequence()
    jacs = jnp.asarray(np.stack([s[0] for s in seq]), h.dtype)
    losses = jnp.asarray(np.stack([s[1] for s in seq]), jnp.float32)
    keys = jnp.stack([h.key(t) for t in range(len(seq))])
    present = jnp.ones(h.k, bool)

    def body(state, xs):
        jac, loss, key = xs
        upd, new_state, _, _ = h.eager(jac, state, loss, key, present)
        return new_state, upd

    try:
        final, upds = jax.jit(lambda s: jax.lax.scan(body, s, (jacs, losses, keys)))(state0)
    except TypeError as err:
        raise h.fail(STATE, f"lax.scan over {len(seq)} steps",
                     f"the state changes structure or dtype: {err}") from None
    try:
        chex.assert_trees_all_equal_structs(state0, final)
        chex.assert_trees_all_equal_shapes_and_dtypes(state0, final)
    except AssertionError as err:
        raise h.fail(STATE, f"lax.scan over {len(seq)} steps", str(err)) from None
    state = state0
    for t, (jac, loss) in enumerate(seq):
        upd, state, _, _ = h.run(jac, state, loss, h.key(t))
        err = _rel_err(upd, _f64(upds[t]))
        if not err <= h.rtol:
            raise h.fail(STATE, f"lax.scan vs a Python loop, step {t}", (
                f"the updates differ by a relative {err:.3g} > {h.rtol:g}: loop "
                f"{_fmt(upd)}, scan {_fmt(upds[t])}"))


NON, PERM, SCALE, LINEAR = (base.NON_CONFLICTING, base.PERMUTATION_EQUIVARIANT,
                            base.SCALE_INVARIANT, base.LINEAR_UNDER_SCALING)
JIT, FINITE, ABSENT, STATE = (base.JIT_CONSISTENT, base.FINITE, base.ABSENT_TASKS,
                              base.STATE_PYTREE)
_CHECKS: dict[str, Callable[[_Harness], None]] = {
    NON: _non_conflicting,
    PERM: _permutation_equivariant,
    SCALE: _scale_invariant,
    LINEAR: _linear_under_scaling,
    JIT: _jit_consistent,
    FINITE: _finite,
    ABSENT: _absent_tasks,
    STATE: _state_pytree,
}
assert set(_CHECKS) == set(PROPERTIES)

_HARNESSES: dict[tuple, tuple[base.Method, _Harness]] = {}


def check_method(method: base.Method, *, num_tasks: int = 3,
                 properties: Iterable[str] | str | None = None, dtype: Any = jnp.float32,
                 key: jax.Array | None = None, dim: int | None = None,
                 rtol: float | None = None) -> tuple[str, ...]:
    """Checks that a balancing method has the given properties.

    Each property runs the method through :func:`jmtl.aggregate` (jitted, one compilation
    per method and shape) on generated ``(K, d)`` Jacobians, positive losses and a fixed
    PRNG key, starting from ``method.init(K, dim=d)``:

    * ``non_conflicting``: the update ``d`` never points against a task:
      ``<J_i, d> >= -rtol |J_i| max(|d|, max_k |J_k|)`` for every task, on random,
      rank-deficient, nearly opposite and mixed-norm (1 to 1e-4) rows.
    * ``permutation_equivariant``: permuting the tasks (rows and losses together, over a
      sequence of steps) keeps the update and permutes the weights and head weights.
    * ``scale_invariant``: ``d(c J)`` has the direction of ``d(J)`` for ``c`` from 1e-20
      to 1e20 (those of ``SCALES`` that ``dtype`` represents), at every step of a
      sequence started from ``init`` with the same scaling at every step.
    * ``linear_under_scaling``: ``A(diag(a c1 + b c2) J) = a A(diag(c1) J) +
      b A(diag(c2) J)`` for positive ``c1, c2, a, b`` (torchjd's definition), and
      ``A(c J) = c A(J)`` for ``c`` from 1e-20 to 1e20, at every step of a sequence
      (stateful methods see the scaled Jacobians at every step).
    * ``jit_consistent``: the same updates and states with and without ``jax.jit`` (the
      ``with_jit``/``without_jit`` variants of ``chex.variants``) and, when there are
      several devices, under ``jax.shard_map`` over all of them (replicated inputs).
    * ``finite``: finite update, weights and state over several steps on a zero row,
      all-zero rows, duplicate and opposite rows, a rank-1 Jacobian, ``|J|`` from 1e-20
      to 1e20 and rows 1e-20 and 1e20 in one Jacobian.
    * ``absent_tasks``: after a few steps, a task marked absent (its row NaN, its loss 0)
      gets weight 0 (and head weight 0), the update is finite, and every state entry
      indexed by that task (any axis of size K) is unchanged.
    * ``state_pytree``: the state is a pytree of arrays whose structure, shapes and dtypes
      survive ``lax.scan``; the scanned updates equal those of a Python loop.

    Randomised methods are checked with a fixed key: a property holds if it holds for
    every key.

    Args:
      method: any :class:`~jmtl.methods.base.Method`, built-in or your own.
      num_tasks: the number of tasks K.
      properties: property names from :data:`PROPERTIES` (one name or several);
        ``None`` checks the properties the method declares (``method.properties``).
      dtype: dtype of the generated Jacobians (losses stay float32).
      key: a PRNG key seeding the generated inputs and the method's key
        (default ``PRNGKey(0)``).
      dim: the number of columns d (default ``K + 5``, so no other axis has size K).
      rtol: relative tolerance of every comparison (default 1e-3 for float32, 1e-2 for
        16-bit dtypes, 1e-6 for float64).

    Returns:
      The names of the properties checked, in the order of :data:`PROPERTIES`.

    Raises:
      AssertionError: a property fails; the message names the method, the property, the
        input and the numbers that failed.
      ValueError: an unknown property name.

    Examples:
      >>> import jmtl
      >>> from jmtl.testing import check_method
      >>> check_method(jmtl.mgda(), properties=("non_conflicting", "finite"))
      ('non_conflicting', 'finite')
      >>> check_method(jmtl.mean(), properties="non_conflicting")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      AssertionError: jmtl.mean() fails property 'non_conflicting' on input 'row 1 nearly ...
    """
    if properties is None:
        properties = method.properties
    elif isinstance(properties, str):
        properties = (properties,)
    props = set(properties)
    unknown = sorted(props - set(PROPERTIES))
    if unknown:
        raise ValueError(f"unknown propert(ies) {unknown}; valid ones are {list(PROPERTIES)}")
    k = int(num_tasks)
    d = k + 5 if dim is None else int(dim)
    if rtol is None:
        bits = jnp.finfo(dtype).bits
        rtol = 1e-6 if bits == 64 else 1e-3 if bits == 32 else 1e-2
    key = jax.random.PRNGKey(0) if key is None else key
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    cache_key = (id(method), k, d, jnp.dtype(dtype).name, float(rtol))
    cached = _HARNESSES.get(cache_key)
    if cached is None or cached[0] is not method:
        cached = (method, _Harness(method, k, d, dtype, seed, rtol))
        if len(_HARNESSES) > 256:
            _HARNESSES.clear()
        _HARNESSES[cache_key] = cached
    harness = cached[1]
    checked = tuple(p for p in PROPERTIES if p in props)
    for prop in checked:
        # A fresh generator per property: the inputs do not depend on which others ran.
        harness.seed = seed
        harness.rng = np.random.default_rng([seed, PROPERTIES.index(prop)])
        _CHECKS[prop](harness)
    return checked

