"""``pcd``: Priority-Constrained Descent (primary task first, guaranteed secondary progress)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers.active_set import nonneg_qp

__all__ = ["pcd", "PCDState"]

# A secondary constraint violated by more than this fraction of its own right-hand side
# after the (ridge-regularised) solve marks the constraints as jointly infeasible.
_INFEASIBLE = 0.5
# The dual of an infeasible problem is unbounded; the ridge keeps it finite.
_RIDGE = 1e-6
# Iterative-refinement steps after the regularised solve.
_REFINE = 2


class PCDState(NamedTuple):
    """State of :func:`pcd`.

    Attributes:
      ema: ``(K,)`` float32 moving average of the squared gradient norms, in units of
        ``unit²``: the raw average is ``ema_i · unit_i²`` with ``ema_i`` in [1/4, 1) (kept
        this way so that it neither overflows nor underflows for |J| from 1e-20 to 1e20,
        and does not depend on the Gramian's pre-scaling).
      unit: ``(K,)`` float32 powers of two (0 while the average is 0).
      count: ``(K,)`` int32 number of updates each task was present in (bias correction).
    """

    ema: jax.Array
    unit: jax.Array
    count: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def _pow2_at_least(x):
    """The power of two ``2^e >= x`` with ``x = m 2^e``, ``m`` in [0.5, 1) (1 for x <= 0)."""
    ok = x > 0
    _, e = jnp.frexp(jnp.where(ok, x, 1.0))
    return jnp.where(ok, jnp.ldexp(jnp.ones_like(x), e), 1.0)


@base.register("pcd", properties=(base.JIT_CONSISTENT, base.FINITE, base.ABSENT_TASKS,
                                  base.STATE_PYTREE))
def pcd(tau=0.02, beta: float = 0.999, eps: float = 1e-8) -> base.Method:
    """PCD: follow the primary task's gradient, guaranteeing each secondary some progress.

    The first task (index 0 in the stacking order, i.e. the first sorted name; use names
    such as ``"0_main"`` or a tuple of losses) is the primary objective. With normalised
    gradients ``g̃_i = g_i / sqrt(v̂_i + ε)`` (``v̂_i`` the bias-corrected moving average of
    ``‖g_i‖²`` with decay ``β``, over the steps task ``i`` was present), the direction is::

        d̃ = argmin_d ½‖d − g̃₁‖²   s.t.   g̃_jᵀ d >= τ_j ‖g̃_j‖²  for every secondary j,

    rescaled to the norm of ``g₁``. Its dual is the non-negative QP
    ``min_{μ>=0} ½ μᵀ G̃_s μ − bᵀμ`` with ``b_j = τ_j G̃_jj − G̃_j1`` on the normalised
    Gramian (solved exactly by :func:`jmtl.solvers.nonneg_qp`), and ``d̃ = g̃₁ + Σ μ_j g̃_j``.
    The weights are ``w = (1, μ) ⊙ s · ‖g₁‖ / ‖d̃‖``.

    Special cases, as in torchjd's ``PCD``: ``g₁ = 0`` (or the primary task absent) gives a
    zero update; jointly infeasible constraints (e.g. two opposite secondaries; detected as
    a constraint left violated by more than half its right-hand side by the ridge-regularised
    solve) give ``g₁``; a direction that is zero up to rounding gives zero.

    Defaults: ``τ = 0.02``, ``β = 0.999``, ``ε = 1e-8`` (torchjd 0.18's ``PCD``; torchjd
    solves the QP by Goldfarb-Idnani, the paper's code by enumerating working sets: the
    minimiser is the same). ``ε`` is in the units of the raw squared norms, so the method
    is scale-invariant only up to ``ε``.

    Heads: each head gets its own task's unweighted gradient. Absent tasks: weight 0, no
    constraint, moving average and count unchanged.

    Args:
      tau: ``τ`` in [0, 1]: a float, or ``K − 1`` values, one per secondary task (may be
        traced).
      beta: decay ``β`` in [0, 1) of the moving average (may be traced).
      eps: ``ε >= 0`` added to the moving average.

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, weights output, state
      :class:`PCDState`, ``weights_task_specific=False``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.pcd(tau=0.5)
      >>> j = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # the secondary conflicts with g₁
      >>> update, _ = jmtl.aggregate(m, j, m.init(2))
      >>> bool(j[1] @ update > 0), round(float(jnp.linalg.norm(update)), 4)
      (True, 1.0)

    References:
      "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
      Multi-Objective Optimization", TMLR 2026 (torchjd 0.18, ``torchjd.aggregation.PCD``).
    """
    for name, val, lo, hi in (("beta", beta, 0.0, 1.0), ("eps", eps, 0.0, None)):
        if _checks.is_concrete(val):
            v = float(val)
            if not (v >= lo and (hi is None or v < hi)):
                raise ValueError(f"method 'pcd': {name} must be in [{lo}, {hi or 'inf'}), "
                                 f"got {val}")
    if _checks.is_concrete(tau):
        t = jnp.asarray(tau)
        if t.ndim > 1 or not bool(jnp.all((t >= 0) & (t <= 1))):
            raise ValueError(f"method 'pcd': tau must be a float or a vector in [0, 1], got "
                             f"{tau!r}")

    def init(num_tasks: int, dim: int | None = None) -> PCDState:
        del dim
        return PCDState(ema=jnp.zeros((num_tasks,), jnp.float32),
                        unit=jnp.zeros((num_tasks,), jnp.float32),
                        count=jnp.zeros((num_tasks,), jnp.int32))

    def update(inputs: base.Inputs, state: PCDState):
        gram, present = inputs.gramian, inputs.present
        k = gram.shape[0]
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        both = present[:, None] & present[None, :]
        g = jnp.where(both, jnp.asarray(gram, dtype), 0.0)
        s = base.gram_scale(inputs, dtype)
        taus = jnp.broadcast_to(jnp.asarray(tau, dtype), (k - 1,))
        b_ = jnp.asarray(beta, dtype)

        # Moving average of ‖g_i‖² = s² G_ii, kept per task as ema_i · unit_i² with unit_i a
        # power of two close to the task's gradient norm (exact rescalings, no overflow).
        sq = jnp.clip(jnp.diag(g), 0.0)
        ema = state.ema.astype(dtype)
        unit = state.unit.astype(dtype)
        seen = unit > 0
        hist = unit * _pow2_at_least(jnp.sqrt(ema))  # = unit for the canonical form
        cand = jnp.maximum(jnp.where(seen, hist, 0.0), s)
        r_old = jnp.where(seen, unit / cand, 0.0)
        r_new = s / cand
        updated = b_ * ((ema * r_old) * r_old) + (1.0 - b_) * ((sq * r_new) * r_new)
        # Canonical form: ema in [1/4, 1) and unit = 2^e (0 with no history), so the state
        # does not depend on how the Gramian was pre-scaled.
        f = _pow2_at_least(jnp.sqrt(updated))
        updated_unit = jnp.where(updated > 0, cand * f, 0.0)
        updated = (updated / f) / f
        count = state.count + present.astype(jnp.int32)
        new_ema = jnp.where(present, updated, ema)
        new_unit = jnp.where(present, updated_unit, unit)
        debias = 1.0 - b_ ** jnp.maximum(count, 1).astype(dtype)
        v_hat = new_ema / jnp.where(debias > 0, debias, 1.0)
        # sqrt(v̂_raw + ε) = hypot(unit · sqrt(v̂), sqrt(ε)): the raw norms stay in range.
        denom = jnp.hypot(new_unit * jnp.sqrt(v_hat), jnp.sqrt(jnp.asarray(eps, dtype)))
        scales = jnp.where(present & (denom > 0), 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
        # Only the ratios of the scales matter: the largest is set to 1 so that the
        # normalised Gramian keeps the magnitude of the pre-scaled one.
        top = jnp.max(scales)
        scales = jnp.where(top > 0, scales / jnp.where(top > 0, top, 1.0), 0.0)

        # Normalised Gramian (a common factor does not change the weights, so the units of
        # G and of the scales are dropped).
        gn = g * scales[:, None] * scales[None, :]
        if k == 1:
            weights = jnp.where(present[0] & (g[0, 0] > 0), 1.0, 0.0)[None].astype(dtype)
            return weights, PCDState(ema=new_ema.astype(state.ema.dtype),
                                     unit=new_unit.astype(state.unit.dtype), count=count)
        gs = gn[1:, 1:]
        sec = present[1:]
        rhs = jnp.where(sec, taus * jnp.diag(gs) - gn[1:, 0], 0.0)
        mu = nonneg_qp(gs, -rhs, sec, ridge=_RIDGE).x
        mu = jnp.where(sec, jnp.maximum(mu, 0.0), 0.0)
        violation = jnp.where(sec, rhs - gs @ mu, 0.0)
        bound = jnp.max(jnp.where(sec, taus * jnp.diag(gs), 0.0))
        infeasible = (bound > 0) & (jnp.max(violation) > _INFEASIBLE * bound)
        # Two steps of iterative refinement on the free set remove the ridge's bias (each
        # divides it by about 1 + λ_min / ridge); a non-finite result keeps the ridge's μ.
        free = sec & (mu > 0)
        ridge = _RIDGE * jnp.max(jnp.diag(gs))
        mat = jnp.where(free[:, None] & free[None, :], gs, 0.0) + jnp.diag(
            jnp.where(free, ridge, 1.0))
        refined = mu
        for _ in range(_REFINE):
            resid = jnp.where(free, rhs - gs @ refined, 0.0)
            refined = refined + jnp.where(free, jnp.linalg.solve(mat, resid), 0.0)
        refined = jnp.where(free, jnp.maximum(refined, 0.0), 0.0)
        mu = jnp.where(jnp.all(jnp.isfinite(refined)), refined, mu)
        w = jnp.concatenate([jnp.ones((1,), dtype), jnp.where(infeasible, 0.0, mu)])

        # Rescale d̃ = Σ w_i g̃_i to the norm of g₁ unless it vanishes up to rounding.
        d_sq = w @ gn @ w
        magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.clip(jnp.diag(gn), 0.0))) ** 2
        precision = 10.0 * jnp.finfo(jnp.float32).eps
        nonzero = (d_sq > precision * magnitude) & (d_sq > 0)
        primary = present[0] & (g[0, 0] > 0)
        factor = jnp.sqrt(jnp.where(nonzero, g[0, 0] / jnp.where(nonzero, d_sq, 1.0), 0.0))
        weights = jnp.where(primary & nonzero, w * scales * factor, 0.0)
        weights = jnp.where(present, weights, 0.0)
        new_state = PCDState(ema=new_ema.astype(state.ema.dtype),
                             unit=new_unit.astype(state.unit.dtype), count=count)
        return weights, new_state

    return base.Method(name="pcd", init=init, update=update, needs=frozenset({base.GRAMIAN}),
                       output=base.WEIGHTS, weights_task_specific=False)
