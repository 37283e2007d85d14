"""Nash-MTL: task weights from the Nash bargaining solution ``G α = 1/α``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers.nash import nash_bargaining

__all__ = ["nash_mtl", "NashMTLState"]


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`.

    Attributes:
      alpha: ``(K,)`` float32, the last bargaining solution (warm start, and the weights
        reused between updates when ``update_weights_every > 1``); starts at ones.
      step: int32 number of updates so far.
    """

    alpha: jax.Array
    step: jax.Array


@base.register("nash_mtl", properties=(
    "non_conflicting", "permutation_equivariant", "scale_invariant", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def nash_mtl(optim_niter: int = 20, max_norm: float = 1.0, update_weights_every: int = 1,
             reg_eps: float = 1e-6) -> base.Method:
    """Nash-MTL: the update that is the Nash bargaining solution between the tasks.

    With ``Ĝ = G / ||G||_F`` (the paper code's normalisation), the weights ``α > 0`` solve
    ``Ĝ α = 1/α``: every task's directional derivative ``g_iᵀ d = ||G||_F / α_i`` is
    positive, and ``Σ_i log(g_iᵀ d)`` is maximal among directions of the same norm. The
    paper approximates the solution with a sequence of convex programs (cvxpy/ECOS,
    ``optim_niter`` rounds, warm-started from the previous ``α``); jmtl reaches the same
    fixed point with at most ``optim_niter`` damped Newton steps on the convex function
    ``½αᵀĜα - Σ log α_i`` (:func:`jmtl.solvers.nash_bargaining`), warm-started likewise.

    As in the paper's code, ``α`` is recomputed every ``update_weights_every`` steps
    (the previous ``α`` is reused in between) and the update ``d = Σ_i α_i g_i`` is
    clipped to norm ``max_norm`` (``||d||² = αᵀGα``; ``max_norm <= 0`` disables it).

    Args:
      optim_niter: maximum Newton steps per solve (the paper's 20 convex rounds).
      max_norm: norm to which the update is clipped (paper: 1.0); ``<= 0`` disables.
      update_weights_every: recompute ``α`` every this many steps (paper: 1).
      reg_eps: ridge, relative to the largest diagonal entry of ``Ĝ``, that makes the
        solution exist when ``G`` is singular (zero rows, K > rank); not in the paper.

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, weights output, state
      :class:`NashMTLState`; absent tasks get weight 0 and keep their previous ``α``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.nash_mtl(max_norm=0.0)
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 2.0]]), m.init(2))
      >>> [round(x, 3) for x in update.tolist()]   # α = (17^¼, 17^¼ / 2)
      [2.031, 2.031]

    References:
      Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.
    """
    if optim_niter < 1 or update_weights_every < 1:
        raise ValueError("method 'nash_mtl': optim_niter and update_weights_every must be "
                         f">= 1, got {optim_niter} and {update_weights_every}")
    if reg_eps < 0:
        raise ValueError(f"method 'nash_mtl': reg_eps must be >= 0, got {reg_eps}")

    def init(num_tasks: int, dim: int | None = None) -> NashMTLState:
        del dim
        return NashMTLState(alpha=jnp.ones((num_tasks,), jnp.float32), step=jnp.int32(0))

    def update(inputs: base.Inputs, state: NashMTLState):
        gram, present = inputs.gramian, inputs.present
        _checks.check_finite(gram, method="nash_mtl", what="Gramian")
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        g = jnp.where(present[:, None] & present[None, :], jnp.asarray(gram, dtype), 0.0)
        g = 0.5 * (g + g.T)
        scale = jnp.max(jnp.abs(g))
        ok = jnp.isfinite(scale) & (scale > jnp.finfo(dtype).tiny)
        gs = g / jnp.where(ok, scale, 1.0)
        fro = jnp.sqrt(jnp.sum(gs * gs))
        gn = gs / jnp.where(fro > 0, fro, 1.0)
        prev = state.alpha.astype(dtype)

        def solve(_):
            return nash_bargaining(gn, prev, present, ridge=reg_eps, max_iter=optim_niter)

        alpha = jax.lax.cond(state.step % update_weights_every == 0, solve, lambda _: prev, None)
        alpha = jnp.where(present, alpha, prev)
        w = jnp.where(present, alpha, 0.0)
        if max_norm > 0:
            # ||d||² = wᵀ G w, evaluated on the scaled Gramian to avoid overflow.
            norm = jnp.sqrt(jnp.clip(w @ gs @ w, 0.0)) * jnp.sqrt(jnp.where(ok, scale, 0.0))
            w = jnp.where(norm > max_norm, w * (max_norm / jnp.where(norm > 0, norm, 1.0)), w)
        new_state = NashMTLState(alpha=alpha.astype(jnp.float32), step=state.step + 1)
        return w, new_state

    return base.Method(name="nash_mtl", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output="weights",
                       weights_task_specific=False,
                       hparams=(("optim_niter", optim_niter), ("max_norm", max_norm),
                                ("update_weights_every", update_weights_every),
                                ("reg_eps", reg_eps)))
