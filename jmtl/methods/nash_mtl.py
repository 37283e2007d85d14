"""Nash-MTL: task weights from the Nash bargaining solution ``G α = 1/α``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers.nash import nash_bargaining

__all__ = ["nash_mtl", "NashMTLState"]

_HEADS = ("weighted", "own")


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`.

    Attributes:
      alpha: ``(K,)`` float32, the last bargaining solution ``α`` of ``G α = 1/α`` on the
        raw Gramian (warm start, and the weights reused between updates when
        ``update_weights_every > 1``); starts at ones.
      step: int32 number of updates so far.
      failures: int32 number of solves that did not converge (the previous ``α`` was
        kept, as the official code does when its solver fails).
    """

    alpha: jax.Array
    step: jax.Array
    failures: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def _check_concrete(name: str, ok, message: str) -> None:
    """Raises ``ValueError`` when ``ok`` is a concrete False (traced values pass)."""
    if _checks.is_concrete(ok) and not bool(ok):
        raise ValueError(f"method '{name}': {message}")


@base.register("nash_mtl", properties=(
    "non_conflicting", "permutation_equivariant", "scale_invariant", "jit_consistent",
    "finite", "absent_tasks", "state_pytree"))
def nash_mtl(optim_niter: int = 20, max_norm: float = 1.0, update_weights_every: int = 1,
             reg_eps: float = 1e-6, heads: str = "weighted") -> base.Method:
    """Nash-MTL: the update that is the Nash bargaining solution between the tasks.

    The weights ``α > 0`` solve ``G α = 1/α`` on the raw Gramian ``G = J Jᵀ`` (as in the
    paper's code, LibMTL and torchjd, which normalise ``G`` for the solver but keep the
    factor in the constraint): every task's directional derivative is
    ``g_iᵀ d = 1/α_i > 0`` and ``||d||² = αᵀGα = K``, whatever the gradients' scale. The
    paper approximates the solution with a sequence of convex programs (cvxpy/ECOS,
    ``optim_niter`` rounds, warm-started from the previous ``α``); jmtl reaches the same
    fixed point with at most ``optim_niter`` damped Newton steps on the convex function
    ``½αᵀGα - Σ log α_i`` (:func:`jmtl.solvers.nash_bargaining`), warm-started likewise,
    solved on the cosine matrix so that tasks of very different gradient scales are
    solved equally accurately.

    As in the paper's code, ``α`` is recomputed every ``update_weights_every`` steps
    (the previous ``α`` is reused in between), the shared update ``d = Σ_i α_i g_i`` is
    clipped to norm ``max_norm`` (``max_norm <= 0`` disables it), and the task-specific
    parameters (heads) receive ``α_i ∇L_i`` (the code back-propagates ``Σ_i α_i L_i``),
    unclipped. ``heads="own"`` gives each head its own unweighted gradient instead.

    Convergence: if a solve does not meet its tolerance within ``optim_niter`` Newton
    steps, the previous ``α`` is kept (as the paper's code does when cvxpy fails) and
    ``state.failures`` is incremented.

    Args:
      optim_niter: maximum Newton steps per solve (the paper's 20 convex rounds; a cold
        start from ones typically needs fewer than 10).
      max_norm: norm to which the shared update is clipped (paper: 1.0); ``<= 0``
        disables. May be traced (e.g. an optax schedule).
      update_weights_every: recompute ``α`` every this many steps (paper: 1).
      reg_eps: ridge relative to each task's squared gradient norm (``G + reg_eps ·
        diag(G)``) that makes the solution exist when ``G`` is singular (K > rank); not in
        the paper. May be traced.
      heads: ``"weighted"`` (default, the paper's code: heads get ``α_i ∇L_i``) or
        ``"own"`` (heads get ``∇L_i``).

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, weights output, state
      :class:`NashMTLState`). Absent tasks and tasks with a zero shared gradient get
      weight 0 in the shared update; absent tasks keep their previous ``α`` in the state
      and their heads get 0.

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.nash_mtl(max_norm=0.0)
      >>> j = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> (w, heads), _ = m.update(jmtl.methods.Inputs(present=jnp.array([True, True]),
      ...                          gramian=j @ j.T), m.init(2))
      >>> [round(x, 3) for x in w.tolist()]   # α_i = 1 / ||g_i||: ||d||² = αᵀGα = K
      [1.0, 0.5]

    References:
      Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.
    """
    if optim_niter < 1 or update_weights_every < 1:
        raise ValueError("method 'nash_mtl': optim_niter and update_weights_every must be "
                         f">= 1, got {optim_niter} and {update_weights_every}")
    _check_concrete("nash_mtl", jnp.asarray(reg_eps) >= 0, f"reg_eps must be >= 0, got "
                    f"{reg_eps}")
    if heads not in _HEADS:
        raise ValueError(f"method 'nash_mtl': heads must be one of {list(_HEADS)}, got "
                         f"{heads!r}")

    def init(num_tasks: int, dim: int | None = None) -> NashMTLState:
        del dim
        return NashMTLState(alpha=jnp.ones((num_tasks,), jnp.float32), step=jnp.int32(0),
                            failures=jnp.int32(0))

    def update(inputs: base.Inputs, state: NashMTLState):
        gram, present = inputs.gramian, inputs.present
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        g = jnp.where(present[:, None] & present[None, :], jnp.asarray(gram, dtype), 0.0)
        s = base.gram_scale(inputs, dtype)            # G_raw = s² g, so α = β / s
        prev = state.alpha.astype(dtype)

        def solve(_):
            res = nash_bargaining(g, prev * s, present, ridge=reg_eps, max_iter=optim_niter)
            return res.x / s, res.converged

        def reuse(_):
            return prev, jnp.bool_(True)

        alpha, ok = jax.lax.cond(state.step % update_weights_every == 0, solve, reuse, None)
        active = present & (jnp.diagonal(g) > 0)
        alpha = jnp.where(ok & active, alpha, prev)
        w = jnp.where(active, alpha, 0.0)
        # ||d||² = wᵀ G_raw w = (s w)ᵀ g (s w): evaluated on the pre-scaled Gramian.
        sw = s * w
        norm = jnp.sqrt(jnp.clip(sw @ g @ sw, 0.0))
        max_n = jnp.asarray(max_norm, dtype)
        clip = (max_n > 0) & (norm > max_n)
        w = jnp.where(clip, w * (max_n / jnp.where(clip, norm, 1.0)), w)
        new_state = NashMTLState(alpha=jnp.where(present, alpha, prev).astype(jnp.float32),
                                 step=state.step + 1,
                                 failures=state.failures + (~ok).astype(jnp.int32))
        if heads == "own":
            return w, new_state
        return base.Output(w, jnp.where(present, alpha, 0.0)), new_state

    return base.Method(name="nash_mtl", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output=base.WEIGHTS,
                       weights_task_specific=False)
