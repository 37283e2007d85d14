"""Byzantine-robust aggregators, as in torchjd: ``krum`` and ``trimmed_mean``.

Both treat the task gradients as votes of which some may be corrupted: Krum keeps the
gradient(s) closest to their neighbours, the trimmed mean drops the extreme values of
every coordinate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmtl.methods import base

__all__ = ["krum", "trimmed_mean"]


def _check_int(name: str, what: str, value, minimum: int) -> int:
    if value is None:
        raise TypeError(f"method '{name}' needs `{what}` (an integer >= {minimum})")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"method '{name}': `{what}` must be an integer >= {minimum}, "
                         f"got {value!r}")
    return int(value)


def _empty_init(num_tasks: int, dim: int | None = None) -> base.EmptyState:
    del num_tasks, dim
    return base.EmptyState()


def _network_pass(x: jax.Array, block: int, levels: int, mirror: bool) -> jax.Array:
    """``levels`` consecutive compare-exchange levels of a sorting network, in one pass.

    Within every run of ``block`` rows, level ``l`` pairs the rows whose index differs in
    bit ``log2(block) - 1 - l`` (the first level pairs each row with its mirror image
    instead when ``mirror``) and puts the smaller value first. XLA fuses the levels into
    one loop over the array: the network is bound by memory traffic, not comparisons.
    """
    groups = 1 << levels
    rest = x.shape[1:]
    y = x.reshape((x.shape[0] // block, groups, block // groups) + rest)
    parts = [y[:, m] for m in range(groups)]
    for level in range(levels):
        bit = groups >> (level + 1)
        for m in range(groups):
            if m & bit:
                continue
            if level == 0 and mirror:  # row (m, r) meets row (groups-1-m, s-1-r)
                p = groups - 1 - m
                lo, hi = parts[m], jnp.flip(parts[p], axis=1)
                parts[m], parts[p] = jnp.minimum(lo, hi), jnp.flip(jnp.maximum(lo, hi), axis=1)
            else:
                p = m | bit
                parts[m], parts[p] = (jnp.minimum(parts[m], parts[p]),
                                      jnp.maximum(parts[m], parts[p]))
    return jnp.stack(parts, axis=1).reshape(x.shape)


def _sort_columns(x: jax.Array, levels_per_pass: int = 3) -> jax.Array:
    """``x`` sorted along axis 0 by a bitonic sorting network (rows padded with ``+inf``).

    Every level is an element-wise min/max over whole rows, vectorised along the
    columns, and ``levels_per_pass`` levels share one pass over memory: on XLA:CPU this is
    10x faster than ``jnp.sort`` or ``lax.top_k`` along the rows, whose comparisons run
    one element at a time.
    """
    k = x.shape[0]
    n = 1 << max(k - 1, 0).bit_length()
    x = jnp.concatenate([x, jnp.full((n - k,) + x.shape[1:], jnp.inf, x.dtype)])
    size = 2
    while size <= n:
        # Merge sorted runs of size/2: compare each row with its mirror image, then
        # half-clean with strides size/4, ..., 1.
        block, mirror = size, True
        while block >= 2:
            levels = min(levels_per_pass, block.bit_length() - 1)
            x = _network_pass(x, block, levels, mirror)
            block, mirror = block >> levels, False
        size *= 2
    return x[:k]


@base.register("krum", properties=("scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def krum(n_byzantine: int | None = None, n_selected: int = 1,
         requirement: str = "paper") -> base.Method:
    """(Multi-)Krum: average the ``m`` gradients closest to their ``K - f - 2`` neighbours.

    The score of task ``i`` is the sum of the squared distances from ``g_i`` to its
    ``K - f - 2`` nearest other gradients, with
    ``||g_i - g_j||² = G_ii + G_jj - 2 G_ij`` read from the Gramian; the ``m`` tasks of
    lowest score get weight ``1 / m``, the others 0 (ties go to the lower task index). The
    scores are the paper's
    squared distances (torchjd sums the distances themselves; the selection can differ).

    The paper's guarantee needs ``K > 2f + 2`` tasks (``requirement="paper"``, the
    default); ``requirement="torchjd"`` accepts ``K >= f + 3`` as torchjd does (at least
    one neighbour per score, no robustness guarantee).

    Absent tasks are left out: with ``P`` tasks present the scores use ``P - f - 2``
    neighbours (at least 0) and at most ``P`` tasks are selected.

    Args:
      n_byzantine: ``f``, the number of gradients that may be adversarial (required, as
        in torchjd).
      n_selected: ``m``, the number of gradients averaged (1: Krum; more: Multi-Krum).
      requirement: ``"paper"`` (``K > 2f + 2``, default) or ``"torchjd"`` (``K >= f + 3``).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing the Gramian (a gradient aggregator:
      task-specific parameters get their own task's gradient).

    Raises:
      TypeError: ``n_byzantine`` not given.
      ValueError: a bad hyperparameter, or (when the method sees the number of tasks K)
        fewer tasks than ``requirement`` asks, or ``K < m``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.krum(n_byzantine=1)
      >>> jac = jnp.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.0], [1.0, 0.1], [50.0, 9.0]])
      >>> update, _ = jmtl.aggregate(m, jac, m.init(5))
      >>> update.tolist()
      [1.0, 0.0]

    References:
      Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries:
      Byzantine Tolerant Gradient Descent", NeurIPS 2017.
    """
    f = _check_int("krum", "n_byzantine", n_byzantine, 0)
    m_sel = _check_int("krum", "n_selected", n_selected, 1)
    if requirement not in ("paper", "torchjd"):
        raise ValueError(f"method 'krum': unknown requirement {requirement!r}; valid values "
                         "are 'paper' (K > 2f + 2) and 'torchjd' (K >= f + 3)")

    def check_k(k: int) -> None:
        if requirement == "paper" and k <= 2 * f + 2:
            raise ValueError(f"method 'krum': needs more than 2 * n_byzantine + 2 = {2 * f + 2} "
                             f"tasks (requirement='paper'), got K={k} (n_byzantine={f})")
        if requirement == "torchjd" and k < f + 3:
            raise ValueError(f"method 'krum': needs at least n_byzantine + 3 = {f + 3} tasks "
                             f"(requirement='torchjd'), got K={k} (n_byzantine={f})")
        if k < m_sel:
            raise ValueError(f"method 'krum': n_selected={m_sel} exceeds the number of tasks "
                             f"K={k}")

    def init(num_tasks: int, dim: int | None = None) -> base.EmptyState:
        check_k(num_tasks)
        return _empty_init(num_tasks, dim)

    def update(inputs: base.Inputs, state: base.EmptyState
               ) -> tuple[jax.Array, base.EmptyState]:
        dtype = jnp.result_type(jnp.float32, inputs.gramian.dtype)
        g = inputs.gramian.astype(dtype)
        k = g.shape[0]
        check_k(k)
        present = inputs.present
        # The selection is invariant to the Gramian's scale: normalise so nothing overflows.
        diag = jnp.diagonal(g)
        top = jnp.max(jnp.where(present, diag, 0.0))
        g = g / jnp.where(top > 0, top, 1.0)
        diag = jnp.diagonal(g)
        dist = jnp.maximum(diag[:, None] + diag[None, :] - 2.0 * g, 0.0)
        pair = present[:, None] & present[None, :] & ~jnp.eye(k, dtype=bool)
        dist = jnp.where(pair, dist, jnp.inf)
        n_present = jnp.sum(present.astype(jnp.int32))
        n_closest = jnp.maximum(n_present - f - 2, 0)
        nearest = jnp.sort(dist, axis=1)
        use = jnp.arange(k)[None, :] < n_closest
        scores = jnp.sum(jnp.where(use, nearest, 0.0), axis=1)
        scores = jnp.where(present, scores, jnp.inf)
        order = jnp.argsort(scores, stable=True)
        n_take = jnp.minimum(m_sel, n_present)
        rank = jnp.zeros((k,), jnp.int32).at[order].set(jnp.arange(k, dtype=jnp.int32))
        chosen = (rank < n_take) & present
        weights = jnp.where(chosen, 1.0 / jnp.maximum(n_take, 1).astype(dtype), 0.0)
        return weights.astype(dtype), state

    return base.Method(name="krum", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False)


@base.register("trimmed_mean", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def trimmed_mean(trim_number: int | None = None) -> base.Method:
    """Coordinate-wise trimmed mean: drop the ``t`` largest and ``t`` smallest values of
    every coordinate across tasks and average the rest.

    A non-linear aggregator: it reads the Jacobian and returns a direction (not weights).
    ``K >= 2t + 1`` is required, as in torchjd. Absent tasks are left out; with ``P``
    tasks present, ``min(t, (P - 1) // 2)`` values are trimmed from each end so at least
    one remains. No task present gives a zero direction.

    Args:
      trim_number: ``t``, the number of values trimmed from each end (required, as in
        torchjd).

    Returns:
      A :class:`~jmtl.methods.base.Method` needing the Jacobian, with
      ``output="direction"`` (task-specific parameters get their own task's gradient).

    Raises:
      TypeError: ``trim_number`` not given.
      ValueError: a bad ``trim_number``, or (when the method sees K) ``K < 2t + 1``.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.trimmed_mean(trim_number=1)
      >>> jac = jnp.array([[1.0, -5.0], [2.0, 0.0], [100.0, 1.0], [3.0, 2.0]])
      >>> update, _ = jmtl.aggregate(m, jac, m.init(4))
      >>> update.tolist()
      [2.5, 0.5]

    References:
      Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning: Towards
      Optimal Statistical Rates", ICML 2018.
    """
    t = _check_int("trimmed_mean", "trim_number", trim_number, 0)

    def check_k(k: int) -> None:
        if k < 2 * t + 1:
            raise ValueError(f"method 'trimmed_mean': needs at least 2 * trim_number + 1 = "
                             f"{2 * t + 1} tasks, got K={k} (trim_number={t})")

    def init(num_tasks: int, dim: int | None = None) -> base.EmptyState:
        check_k(num_tasks)
        return _empty_init(num_tasks, dim)

    def update(inputs: base.Inputs, state: base.EmptyState
               ) -> tuple[jax.Array, base.EmptyState]:
        jac = inputs.jacobian
        dtype = jnp.result_type(jnp.float32, jac.dtype)
        jac = jac.astype(dtype)
        k = jac.shape[0]
        check_k(k)
        present = inputs.present
        n_present = jnp.sum(present.astype(jnp.int32))
        t_eff = jnp.minimum(t, jnp.maximum(n_present - 1, 0) // 2)
        # Sorting each coordinate's present values (absent ones last, as +inf) makes the
        # kept values those of rank t_eff .. P - t_eff - 1: the same multiset as dropping
        # by position, so ties change nothing. Only the summation order differs.
        x = jnp.where(present[:, None], jac, jnp.inf)
        if t > 0:
            x = _sort_columns(x)
            rank = jnp.arange(k)[:, None]
            keep = (rank >= t_eff) & (rank < n_present - t_eff)
        else:
            keep = present[:, None]
        count = jnp.maximum(n_present - 2 * t_eff, 1).astype(dtype)
        direction = jnp.sum(jnp.where(keep, x, 0.0), axis=0) / count
        return direction, state

    return base.Method(name="trimmed_mean", init=init, update=update,
                       needs=frozenset({base.JACOBIAN}), output="direction",
                       weights_task_specific=False)
