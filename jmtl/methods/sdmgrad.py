"""``sdmgrad``: stochastic direction-oriented multi-objective gradient (Xiao et al.)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl.methods import base
from jmtl.methods.modo import (
    check_num_samples,
    cross_gramian,
    direction_weights,
    num_tasks_per_sample,
    sample_presence,
    simplex_start,
)
from jmtl.solvers.simplex import project_simplex

__all__ = ["sdmgrad", "SDMGradState"]


class SDMGradState(NamedTuple):
    """State of :func:`sdmgrad`.

    Attributes:
      w: ``(K,)`` float32 simplex weights ``w`` (warm start of the next inner solve).
    """

    w: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


@base.register("sdmgrad", properties=(base.PERMUTATION_EQUIVARIANT, base.SCALE_INVARIANT,
                                      base.JIT_CONSISTENT, base.FINITE, base.ABSENT_TASKS,
                                      base.STATE_PYTREE))
def sdmgrad(lamda: float = 0.3, niter: int = 20, lr: float = 10.0, momentum: float = 0.5,
            pref_vector=None, num_samples: int = 1) -> base.Method:
    """SDMGrad: MGDA weights pulled toward a preferred direction, by a few SGD steps.

    With ``A = J_ξ J_ξ'ᵀ / m²`` (two independent mini-batches ξ, ξ'; ``m`` the mean of the
    square roots of ``A``'s non-negative diagonal, which makes the step scale-free), the
    weights take ``niter`` projected heavy-ball steps on ``½ (w + λ w̃)ᵀ A (w + λ w̃)``::

        v ← μ v + A (w + λ w̃),   w ← Π_Δ(w − lr · v)

    from the previous call's ``w`` (``v`` restarts at 0 each call, as the official code's
    fresh ``torch.optim.SGD``), and the update is ``J_ζᵀ (w + λ w̃) / (1 + λ)`` on a third
    batch ζ. ``w̃`` is the preference (the mean gradient by default). The inner loop is the
    paper's fixed-iteration stochastic solver, not a solve to a tolerance.

    Mini-batches: as :func:`jmtl.modo` (module :mod:`jmtl.methods.modo`): ``loss_fn``
    returns a tuple of ``num_samples`` loss pytrees. ``1`` (default): one batch serves as
    ξ, ξ' and ζ (the single-batch fallback, which is also what the official NYUv2 code ends
    up computing); ``2``: ``A`` from the two batches, the update from their mean; ``3``
    (the paper, LibMTL, torchjd): ``A`` from batches 1 and 2, the update from batch 3
    (LibMTL passes ζ first; jmtl keeps the same order as MoDo).

    Defaults follow the official code and torchjd: ``λ = 0.3`` (the paper's experiments;
    the official class default is 0.6), ``niter = 20``, inner ``lr = 10``, ``momentum =
    0.5`` (LibMTL uses ``lr = 5``). The official code and LibMTL add ``1e-8`` or ``1e-4``
    inside the normalisation; jmtl divides exactly (scale-invariant weights) and leaves
    ``A`` unscaled when it is zero. The official code multiplies the update by ``K`` and
    clips it to norm 1; jmtl returns weights summing to 1 (LibMTL).

    Heads: with one batch, each head gets its own task's unweighted gradient; with several,
    the mean over the batches (LibMTL sums them), through ``base.Output``.

    Absent tasks (absent from any batch): weight 0, ``w_i`` unchanged; the inner solve runs
    on the present tasks' ``w`` renormalised to the simplex and the preference restricted to
    them (and renormalised).

    Args:
      lamda: ``λ``, the pull toward the preferred direction (may be traced).
      niter: inner iterations (static).
      lr: inner step size (may be traced).
      momentum: inner heavy-ball momentum (may be traced).
      pref_vector: optional ``(K,)`` non-negative preference ``w̃``; ``None``: uniform.
      num_samples: 1, 2 or 3 mini-batches stacked as tasks (static).

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, weights output, state
      :class:`SDMGradState`, ``weights_task_specific=False``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.sdmgrad()
      >>> update, state = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 1.0]]), m.init(2))
      >>> update.tolist()  # symmetric tasks: w stays uniform
      [0.5, 0.5]

    References:
      Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
      Stochastic Algorithms", NeurIPS 2023.
    """
    n = check_num_samples("sdmgrad", num_samples)
    if int(niter) != niter or niter < 1:
        raise ValueError(f"method 'sdmgrad': niter must be a positive integer, got {niter!r}")
    niter = int(niter)
    for name, val in (("lamda", lamda), ("lr", lr), ("momentum", momentum)):
        if _checks.is_concrete(val) and not float(val) >= 0:
            raise ValueError(f"method 'sdmgrad': {name} must be non-negative, got {val}")

    def init(num_tasks: int, dim: int | None = None) -> SDMGradState:
        del dim
        k = num_tasks_per_sample("sdmgrad", num_tasks, n)
        return SDMGradState(w=jnp.full((k,), 1.0 / k, jnp.float32))

    def update(inputs: base.Inputs, state: SDMGradState):
        gram, present_all = inputs.gramian, inputs.present
        k = num_tasks_per_sample("sdmgrad", gram.shape[0], n)
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        present = sample_presence(present_all, n)
        both = present[:, None] & present[None, :]
        a = jnp.where(both, cross_gramian(jnp.asarray(gram, dtype), n), 0.0)
        # Scale-free: divide by the squared mean root of the diagonal (present tasks).
        roots = jnp.sqrt(jnp.clip(jnp.diag(a), 0.0))
        n_present = jnp.maximum(jnp.sum(present), 1).astype(dtype)
        m = jnp.sum(jnp.where(present, roots, 0.0)) / n_present
        ok = m > 0
        a = jnp.where(ok, (a / jnp.where(ok, m, 1.0)) / jnp.where(ok, m, 1.0), a)
        if pref_vector is None:
            pref = present.astype(dtype)
        else:
            pref = jnp.asarray(pref_vector, dtype)
            if pref.shape != (k,):
                raise ValueError(f"method 'sdmgrad': pref_vector has shape {pref.shape} for "
                                 f"{k} tasks")
            pref = jnp.where(present, pref, 0.0)
        total = jnp.sum(pref)
        pref = jnp.where(total > 0, pref / jnp.where(total > 0, total, 1.0), 0.0)
        lam_ = jnp.asarray(lamda, dtype)
        lr_ = jnp.asarray(lr, dtype)
        mom = jnp.asarray(momentum, dtype)
        target = lam_ * (a @ pref)

        w0, mass = simplex_start(state.w.astype(dtype), present)

        def body(_, carry):
            w, v = carry
            v = mom * v + (a @ w + target)
            w = jnp.where(present, project_simplex(w - lr_ * v, mask=present), 0.0)
            return w, v

        w, _ = jax.lax.fori_loop(0, niter, body, (w0, jnp.zeros_like(w0)))
        out = (w + lam_ * pref) / (1.0 + lam_)
        keep = jnp.where(jnp.all(present) | ~(mass > 0), 1.0, mass)  # absent: keep their share
        new_w = jnp.where(present, w * keep, state.w.astype(dtype))
        new_state = SDMGradState(w=new_w.astype(state.w.dtype))
        weights = jnp.where(present_all, direction_weights(jnp.where(present, out, 0.0), n), 0.0)
        if n == 1:
            return weights, new_state
        heads = jnp.where(present_all, 1.0 / n, 0.0).astype(dtype)
        return base.Output(weights, heads), new_state

    return base.Method(name="sdmgrad", init=init, update=update,
                       needs=frozenset({base.GRAMIAN}), output=base.WEIGHTS,
                       weights_task_specific=False)
