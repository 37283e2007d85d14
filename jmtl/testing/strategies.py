"""Hypothesis strategies for property tests of multi-task code.

Requires ``hypothesis`` (a test dependency: ``pip install jmtl[test]``); ``import jmtl``
and ``import jmtl.testing`` do not import it.

* :func:`jacobians`: ``(K, d)`` numpy Jacobians, optionally degenerate (zero, duplicate
  and opposite rows, low rank) and scaled over many orders of magnitude.
* :func:`jacobian_pytrees`: ``{name: (K, ...)}`` Jacobian pytrees, as ``jmtl.aggregate``
  accepts.
* :func:`loss_pytrees`: ``{task: float32 scalar}`` positive losses.
* :func:`present_masks`: ``(K,)`` bool masks with at least one task present.

Examples:
  >>> from hypothesis import given, settings
  >>> import numpy as np
  >>> from jmtl.testing import strategies
  >>> @settings(max_examples=5, derandomize=True, deadline=None)
  ... @given(strategies.jacobians(num_tasks=3, dim=4))
  ... def test_shape(jac):
  ...     assert jac.shape == (3, 4) and jac.dtype == np.float32
  ...     assert np.all(np.isfinite(jac))
  >>> test_shape()
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - hypothesis is a test dependency
    raise ImportError("jmtl.testing.strategies needs hypothesis: pip install hypothesis "
                      "(or jmtl[test])") from err

__all__ = ["jacobians", "jacobian_pytrees", "loss_pytrees", "present_masks", "task_names"]

DEGENERACIES = ("none", "zero_row", "all_zero", "duplicate", "opposite", "low_rank")


def _size(value, lo: int, hi: int):
    if value is None:
        return st.integers(lo, hi)
    if isinstance(value, int):
        return st.just(value)
    return value


@st.composite
def jacobians(draw, num_tasks: int | st.SearchStrategy | None = None,
              dim: int | st.SearchStrategy | None = None, *, dtype=np.float32,
              min_exponent: int = -20, max_exponent: int = 20,
              degeneracies: Sequence[str] = DEGENERACIES) -> np.ndarray:
    """``(K, d)`` Jacobians: Gaussian rows, then one degeneracy, then a global scale.

    Args:
      num_tasks: K (an int, a strategy, or ``None`` for 1 to 6).
      dim: d (an int, a strategy, or ``None`` for 1 to 16).
      dtype: numpy dtype of the result.
      min_exponent, max_exponent: the global scale is ``10**e`` for an integer ``e`` in
        this range (float32 represents the default range, 1e-20 to 1e20, with margin);
        each row also gets its own factor ``10**f``, ``|f| <= 2``.
      degeneracies: which of :data:`DEGENERACIES` may be drawn (``"none"`` keeps the
        random rows): a zero row, all rows zero, row 1 a copy of row 0, row 1 the
        opposite of row 0, rank ``< min(K, d)``.

    Returns:
      A strategy of numpy arrays of shape ``(K, d)`` and ``dtype``, finite.

    Examples:
      >>> from jmtl.testing.strategies import jacobians
      >>> jacobians(num_tasks=2, dim=3, degeneracies=("all_zero",)).example().tolist()
      [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    k = draw(_size(num_tasks, 1, 6))
    d = draw(_size(dim, 1, 16))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((k, d)) * 10.0 ** rng.integers(-2, 3, (k, 1))
    kind = draw(st.sampled_from(tuple(degeneracies)))
    if kind == "zero_row":
        jac[draw(st.integers(0, k - 1))] = 0.0
    elif kind == "all_zero":
        jac[:] = 0.0
    elif kind == "duplicate" and k >= 2:
        jac[1] = jac[0]
    elif kind == "opposite" and k >= 2:
        jac[1] = -jac[0]
    elif kind == "low_rank" and min(k, d) >= 2:
        rank = draw(st.integers(1, min(k, d) - 1))
        jac = rng.standard_normal((k, rank)) @ rng.standard_normal((rank, d))
    exponent = draw(st.integers(min_exponent, max_exponent))
    return (jac * 10.0 ** exponent).astype(dtype)


@st.composite
def jacobian_pytrees(draw, num_tasks: int | st.SearchStrategy | None = None, *,
                     dtype=np.float32, max_leaves: int = 3, **jacobian_kwargs) -> dict:
    """Jacobian pytrees ``{"p0": (K, ...), "p1": ...}``: every leaf has leading axis K.

    The leaves are the columns of one :func:`jacobians` draw, reshaped (so degeneracies
    and scales apply to the whole pytree).

    Examples:
      >>> from jmtl.testing.strategies import jacobian_pytrees
      >>> tree = jacobian_pytrees(num_tasks=3).example()
      >>> all(leaf.shape[0] == 3 for leaf in tree.values())
      True
    """
    k = draw(_size(num_tasks, 1, 6))
    shapes = draw(st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
                           min_size=1, max_size=max_leaves))
    sizes = [int(np.prod(s)) for s in shapes]
    flat = draw(jacobians(k, sum(sizes), dtype=dtype, **jacobian_kwargs))
    tree, start = {}, 0
    for i, (shape, size) in enumerate(zip(shapes, sizes, strict=True)):
        tree[f"p{i}"] = flat[:, start:start + size].reshape((k, *shape))
        start += size
    return tree


def task_names(min_size: int = 1, max_size: int = 6) -> st.SearchStrategy:
    """Sorted lists of distinct task names (``"t0"``, ``"depth"``, ...)."""
    name = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
    return st.lists(name, min_size=min_size, max_size=max_size, unique=True).map(sorted)


@st.composite
def loss_pytrees(draw, tasks: Sequence[str] | st.SearchStrategy | None = None, *,
                 min_value: float = 1e-3, max_value: float = 1e3) -> dict:
    """``{task: np.float32 scalar}`` positive losses (log-uniform in the range).

    Args:
      tasks: task names, a strategy of them, or ``None`` for :func:`task_names`.
      min_value, max_value: the range of every loss (both positive).

    Examples:
      >>> from jmtl.testing.strategies import loss_pytrees
      >>> losses = loss_pytrees(["depth", "seg"]).example()
      >>> sorted(losses), all(1e-3 <= float(v) <= 1e3 for v in losses.values())
      (['depth', 'seg'], True)
    """
    names = draw(task_names()) if tasks is None else (
        draw(tasks) if isinstance(tasks, st.SearchStrategy) else list(tasks))
    lo, hi = np.log10(min_value), np.log10(max_value)
    out = {}
    for name in names:
        e = draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))
        out[name] = np.float32(np.clip(10.0 ** e, min_value, max_value))
    return out


def present_masks(num_tasks: int) -> st.SearchStrategy:
    """``(K,)`` bool numpy masks with at least one task present.

    Examples:
      >>> from jmtl.testing.strategies import present_masks
      >>> bool(present_masks(4).example().any())
      True
    """
    return st.lists(st.booleans(), min_size=num_tasks, max_size=num_tasks).filter(any).map(
        lambda m: np.array(m, bool))
