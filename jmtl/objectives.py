"""Pure, differentiable scalarisations of a pytree of per-task losses.

Every function takes the per-task losses as a pytree with one scalar leaf per task
(normally ``{task_name: loss}``) or a ``(K,)`` array, and returns a scalar that can be
differentiated with :func:`jax.grad` and compiled with :func:`jax.jit`. Tasks are stacked
in the pytree flattening order (sorted dict keys), as everywhere in jmtl.

Input checks: mismatched task sets raise a ``ValueError`` naming the missing and extra
tasks at trace time. The log-based objectives (:func:`geometric_mean`, :func:`log_sum`)
need positive losses: with concrete values a non-positive loss raises a ``ValueError``
naming the task at once; under ``jax.jit`` or ``jax.grad`` the check is a runtime check
(checkify) that is traced and raises when the caller wraps its function with
:func:`jmtl.checked`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl import tasks as tasks_lib

__all__ = ["weighted_sum", "uncertainty", "geometric_mean", "log_sum", "gradnorm",
           "UNCERTAINTY_KINDS"]

#: The kinds accepted by :func:`uncertainty`.
UNCERTAINTY_KINDS = ("regression", "classification", "log_variance", "revised")


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _names(tree: Any) -> tuple[str, ...]:
    if _is_array(tree):
        return tuple(f"task {i}" for i in range(np.shape(tree)[0]))
    return tasks_lib.task_names(tree)


def _stack(tree: Any, what: str) -> jax.Array:
    vec = tasks_lib.stack(tree, what=what)
    if not jnp.issubdtype(vec.dtype, jnp.floating):
        vec = vec.astype(jnp.float32)
    return vec


def _stack_pair(a: Any, b: Any, *, fn: str, what_a: str, what_b: str
                ) -> tuple[jax.Array, jax.Array]:
    """Stacks two per-task values after checking that they describe the same tasks."""
    if not _is_array(a) and not _is_array(b):
        tasks_lib.check_same_tasks(a, b, what_a=f"`{what_a}`", what_b=f"`{what_b}`", method=fn)
    va = _stack(a, f"{fn}: `{what_a}`")
    vb = _stack(b, f"{fn}: `{what_b}`")
    if va.shape != vb.shape:
        raise ValueError(
            f"{fn}: `{what_a}` has {va.shape[0]} tasks {list(_names(a))} but `{what_b}` has "
            f"{vb.shape[0]} {list(_names(b))}"
        )
    dtype = jnp.result_type(va.dtype, vb.dtype)
    return va.astype(dtype), vb.astype(dtype)


def weighted_sum(losses: Any, weights: Any) -> jax.Array:
    """The weighted sum ``sum_i w_i L_i`` of the task losses.

    Args:
      losses: ``{task: scalar}`` (any pytree of scalars) or a ``(K,)`` array.
      weights: the task weights, with the same tasks as ``losses`` (a pytree with the same
        structure, or a ``(K,)`` array in stacking order).

    Returns:
      A scalar, differentiable in both arguments.

    Raises:
      ValueError: if the task sets differ (the message names the missing and extra
        tasks) or the numbers of tasks differ.

    Examples:
      >>> import jmtl
      >>> float(jmtl.objectives.weighted_sum({"a": 2.0, "b": 3.0}, {"a": 1.0, "b": 0.5}))
      3.5

    References:
      Caruana, "Multitask Learning", Machine Learning 28, 1997.
    """
    lv, wv = _stack_pair(losses, weights, fn="weighted_sum", what_a="losses", what_b="weights")
    return jnp.sum(wv * lv)


def _kinds_vector(kind: Any, losses: Any, k: int) -> tuple[str, ...]:
    """Per-task kind strings, validated."""
    if isinstance(kind, str):
        kinds = (kind,) * k
        names: tuple[str, ...] = ()
    else:
        if _is_array(losses):
            leaves = jax.tree_util.tree_leaves(kind)
            if len(leaves) != k:
                raise ValueError(f"uncertainty: {len(leaves)} kinds given for {k} tasks")
        else:
            tasks_lib.check_same_tasks(losses, kind, what_a="`losses`", what_b="`kind`",
                                       method="uncertainty")
        leaves = jax.tree_util.tree_leaves(kind)
        names = tasks_lib.task_names(kind)
        kinds = tuple(leaves)
    for i, kd in enumerate(kinds):
        if kd not in UNCERTAINTY_KINDS:
            where = f" for task '{names[i]}'" if names else ""
            raise ValueError(
                f"uncertainty: unknown kind {kd!r}{where}; valid kinds are "
                f"{', '.join(repr(x) for x in UNCERTAINTY_KINDS)}"
            )
    return kinds


def _uncertainty_terms(lv: jax.Array, s: jax.Array, kinds: tuple[str, ...]) -> jax.Array:
    """Per-task terms of :func:`uncertainty` (``lv`` losses, ``s = log σ²``)."""
    # Static per-task coefficients: term = a exp(-s) L + c s, or + softplus(s) ("revised").
    a = np.array([1.0 if kd in ("classification", "log_variance") else 0.5 for kd in kinds])
    c = np.array([1.0 if kd == "log_variance" else 0.5 for kd in kinds])
    revised = np.array([kd == "revised" for kd in kinds])
    dtype = lv.dtype
    data = jnp.asarray(a, dtype) * jnp.exp(-s) * lv
    reg = jnp.asarray(c, dtype) * s
    if revised.any():  # static: no softplus (and its gradient's exp) unless needed
        reg = jnp.where(revised, jax.nn.softplus(s), reg)
    return data + reg


def uncertainty(losses: Any, log_vars: Any, kind: Any = "log_variance") -> jax.Array:
    """Homoscedastic-uncertainty weighting of the task losses (Kendall et al., 2018).

    Every kind is parameterised by the log-variance ``s_i = log σ_i²`` of task ``i``
    (``σ_i = exp(s_i / 2)``), which is unconstrained and numerically safe to learn:

    * ``"regression"``: ``L / (2σ²) + log σ = exp(-s) L / 2 + s / 2``;
    * ``"classification"``: ``L / σ² + log σ = exp(-s) L + s / 2``;
    * ``"log_variance"``: ``L / σ² + log σ² = exp(-s) L + s``;
    * ``"revised"``: ``L / (2σ²) + log(1 + σ²) = exp(-s) L / 2 + softplus(s)``.

    ``"regression"`` and ``"classification"`` are the Gaussian and Boltzmann likelihood
    derivations of Kendall et al.; ``"log_variance"`` (the default) is the form most
    implementations use, twice the regression term (same minimiser ``σ² = L``);
    ``"revised"`` is Liebel & Körner's positive regulariser, which keeps the objective
    bounded below as ``σ → 0``.

    Args:
      losses: ``{task: scalar}`` (any pytree of scalars) or a ``(K,)`` array.
      log_vars: ``s_i = log σ_i²`` per task, same tasks as ``losses``; usually learnable
        parameters initialised at 0.
      kind: one of :data:`UNCERTAINTY_KINDS`, or a pytree of such strings with the tasks
        of ``losses`` (e.g. ``{"depth": "regression", "seg": "classification"}``).

    Returns:
      The scalar ``sum_i term_i``, differentiable in ``losses`` and ``log_vars``.

    Raises:
      ValueError: unknown kind (naming it and the valid ones) or mismatched task sets
        (naming the missing and extra tasks).

    Examples:
      >>> import jax, jax.numpy as jnp, jmtl
      >>> losses = {"a": jnp.float32(2.0), "b": jnp.float32(1.0)}
      >>> s = {"a": jnp.float32(0.0), "b": jnp.float32(0.0)}
      >>> float(jmtl.objectives.uncertainty(losses, s))
      3.0
      >>> g = jax.grad(jmtl.objectives.uncertainty, argnums=1)(losses, s)
      >>> float(g["a"]), float(g["b"])  # d/ds [exp(-s) L + s] = 1 - exp(-s) L
      (-1.0, 0.0)

    References:
      Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
      Scene Geometry and Semantics", CVPR 2018.
      Liebel & Körner, "Auxiliary Tasks in Multi-task Learning", arXiv:1805.06334, 2018.
    """
    lv, s = _stack_pair(losses, log_vars, fn="uncertainty", what_a="losses",
                        what_b="log_vars")
    kinds = _kinds_vector(kind, losses, lv.shape[0])
    return jnp.sum(_uncertainty_terms(lv, s, kinds))


def _positive_vector(losses: Any, fn: str) -> jax.Array:
    lv = _stack(losses, f"{fn}: `losses`")
    _checks.check_positive(lv, method=fn, what="losses", names=_names(losses))
    return lv


def geometric_mean(losses: Any) -> jax.Array:
    """The geometric mean ``(prod_i L_i)^(1/K)`` of the task losses (GLS).

    Computed as ``exp(mean_i log L_i)``, so it neither overflows nor underflows for
    losses of very different scales. Its gradient w.r.t. ``L_i`` is
    ``G / (K L_i)``: the objective is invariant to rescaling any one loss.

    Args:
      losses: ``{task: scalar}`` (any pytree of scalars) or a ``(K,)`` array of positive
        losses.

    Returns:
      A scalar.

    Raises:
      ValueError: a loss is zero or negative (concrete values; the message names the
        task). Under ``jit`` the check runs when wrapped with :func:`jmtl.checked`.

    Examples:
      >>> import jmtl
      >>> float(jmtl.objectives.geometric_mean({"a": 2.0, "b": 8.0}))
      4.0

    References:
      Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature
      Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops
      2019.
    """
    lv = _positive_vector(losses, "geometric_mean")
    return jnp.exp(jnp.mean(jnp.log(lv)))


def log_sum(losses: Any) -> jax.Array:
    """The scale-invariant objective ``sum_i log L_i``.

    Its gradient w.r.t. ``L_i`` is ``1 / L_i``: multiplying a loss by a constant does not
    change the gradient of the model.

    Args:
      losses: ``{task: scalar}`` (any pytree of scalars) or a ``(K,)`` array of positive
        losses.

    Returns:
      A scalar.

    Raises:
      ValueError: a loss is zero or negative (concrete values; the message names the
        task). Under ``jit`` the check runs when wrapped with :func:`jmtl.checked`.

    Examples:
      >>> import math, jmtl
      >>> math.isclose(float(jmtl.objectives.log_sum({"a": 2.0, "b": 0.5})), 0.0, abs_tol=1e-7)
      True

    References:
      Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (the SI
      baseline); LibMTL's ``SI`` weighting (Lin & Zhang, JMLR 2023).
    """
    lv = _positive_vector(losses, "log_sum")
    return jnp.sum(jnp.log(lv))


def check_ratio_losses(values: jax.Array, *, method: str, what: str = "losses",
                       names: Any = None, where: jax.Array | None = None) -> None:
    """Losses that enter ratios ``L / L(0)`` must be positive: ``ValueError`` naming the
    tasks on concrete values, a runtime check under :func:`jmtl.checked` when traced."""
    if _checks.is_concrete(values) and (where is None or _checks.is_concrete(where)):
        arr = np.asarray(values, dtype=float)
        mask = np.ones(arr.shape, bool) if where is None else np.asarray(where, bool)
        bad = np.flatnonzero(~(arr > 0) & mask)
        if bad.size:
            nm = names if names is not None else [f"task {i}" for i in range(arr.shape[0])]
            tasks = ", ".join(f"{nm[i]}={float(arr[i])!r}" for i in bad)
            raise ValueError(f"{method}: {what} must be positive (they enter the loss ratios "
                             f"L_i / L_i(0)); got {tasks}")
        return
    ok = values > 0 if where is None else (values > 0) | ~where
    _checks.runtime_check(jnp.all(ok), f"{method}: {what} must be positive (loss ratios)")


def gradnorm_loss(weights: jax.Array, grad_norms: jax.Array, losses: jax.Array,
                  initial_losses: jax.Array, alpha: Any = 1.5,
                  mask: jax.Array | None = None) -> jax.Array:
    """:func:`gradnorm` on stacked ``(K,)`` vectors, restricted to ``mask`` (internal).

    Tasks outside ``mask`` are left out of the means and of the sum. A ratio whose
    ``L_i(0)`` is not positive is taken as 1 and negative ratios as 0 (traced inputs;
    concrete ones are checked by :func:`gradnorm`).
    """
    dtype = jnp.result_type(jnp.float32, weights.dtype, grad_norms.dtype, losses.dtype)
    if mask is None:
        mask = jnp.ones(weights.shape, bool)
    w = weights.astype(dtype)
    # Only the weights are trained by this loss: the norms and losses are constants.
    n = jax.lax.stop_gradient(jnp.abs(grad_norms.astype(dtype)))
    lv = jax.lax.stop_gradient(losses.astype(dtype))
    l0 = jax.lax.stop_gradient(initial_losses.astype(dtype))
    count = jnp.maximum(jnp.sum(mask), 1).astype(dtype)
    ratio = jnp.where(l0 > 0, lv / jnp.where(l0 > 0, l0, 1), 1)
    ratio = jnp.where(mask, jnp.clip(jnp.nan_to_num(ratio, nan=1.0), 0), 0)
    mean_ratio = jnp.sum(ratio) / count
    r = jnp.where(mean_ratio > 0, ratio / jnp.where(mean_ratio > 0, mean_ratio, 1), 1)
    g = jnp.where(mask, w * n, 0)
    g_mean = jnp.sum(g) / count
    target = jax.lax.stop_gradient(g_mean * r ** jnp.asarray(alpha, dtype))
    return jnp.sum(jnp.where(mask, jnp.abs(g - target), 0))


def gradnorm(weights: Any, grad_norms: Any, losses: Any, initial_losses: Any,
             alpha: Any = 1.5) -> jax.Array:
    """The GradNorm loss of the task weights (Chen et al., 2018).

    ``sum_i |w_i n_i - T_i|`` with the target ``T_i = stop_gradient(mean_j(w_j n_j) r_i^α)``
    and the relative inverse training rates ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``.
    ``n_i`` is the norm of task ``i``'s *unweighted* gradient on the chosen shared layer
    (so ``w_i n_i`` is the norm of the weighted gradient). Only ``w`` gets a gradient:
    ``∂/∂w_i = sign(w_i n_i - T_i) n_i``. Train the weights with their own optax optimizer
    on this loss and renormalise them to sum to ``K`` after each step, as in the paper.

    Args:
      weights: ``{task: w_i}`` (any pytree of scalars) or a ``(K,)`` array.
      grad_norms: ``{task: n_i}``, same tasks; treated as constants (``|n_i|`` is used).
      losses: ``{task: L_i}`` at this step, same tasks; constants.
      initial_losses: ``{task: L_i(0)}``, same tasks; constants (the first loss of each
        task, or a mean over a first epoch).
      alpha: the asymmetry ``α`` (paper: 1.5); a number or a scalar array.

    Returns:
      The scalar GradNorm loss.

    Raises:
      ValueError: the task sets differ (the message names the missing and extra tasks),
        or, with concrete values and ``α != 0``, a loss or an initial loss is not positive
        (the ratios ``L_i / L_i(0)`` need positive losses). Under ``jit`` that check runs
        under :func:`jmtl.checked`; unchecked, a non-positive ``L_i(0)`` gives ratio 1 and
        a negative ratio counts as 0.

    Examples:
      >>> import jax, jmtl
      >>> w, n = {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 3.0}
      >>> L = {"a": 1.0, "b": 1.0}
      >>> float(jmtl.objectives.gradnorm(w, n, L, L))  # targets 2: |1 - 2| + |3 - 2|
      2.0
      >>> g = jax.grad(jmtl.objectives.gradnorm)(w, n, L, L)
      >>> float(g["a"]), float(g["b"])  # sign(w n - T) n
      (-1.0, 3.0)

    References:
      Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
      Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.
    """
    fn = "gradnorm"
    args = {"weights": weights, "grad_norms": grad_norms, "losses": losses,
            "initial_losses": initial_losses}
    trees = [(k, v) for k, v in args.items() if not _is_array(v)]
    for k, v in trees[1:]:
        tasks_lib.check_same_tasks(trees[0][1], v, what_a=f"`{trees[0][0]}`", what_b=f"`{k}`",
                                   method=fn)
    vecs = {k: _stack(v, f"{fn}: `{k}`") for k, v in args.items()}
    shapes = {k: v.shape for k, v in vecs.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{fn}: the arguments have different numbers of tasks: "
                         + ", ".join(f"`{k}` {list(_names(args[k]))}" for k in shapes))
    if not (_checks.is_concrete(alpha) and float(np.asarray(alpha)) == 0.0):
        names = _names(weights if not _is_array(weights) else losses)
        for k in ("losses", "initial_losses"):
            check_ratio_losses(vecs[k], method=fn, what=k, names=names)
    return gradnorm_loss(vecs["weights"], vecs["grad_norms"], vecs["losses"],
                         vecs["initial_losses"], alpha)
