"""MGDA: the min-norm convex combination of the task gradients (Désidéri; Sener & Koltun)."""

from __future__ import annotations

import jax.numpy as jnp

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers.min_norm import min_norm_weights

__all__ = ["mgda"]

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@base.register("mgda", properties=(
    "non_conflicting", "permutation_equivariant", "scale_invariant", "jit_consistent",
    "finite", "absent_tasks"))
def mgda(normalization: str = "none") -> base.Method:
    """MGDA: weights of the min-norm point of the convex hull of the task gradients.

    ``w = argmin_{w in simplex} ||Σ_i w_i g_i / n_i||²`` is solved exactly from the
    Gramian (:func:`jmtl.solvers.min_norm_weights`). As in Sener & Koltun's code the
    gradients may first be divided by ``n_i``:

    * ``"none"``: ``n_i = 1`` (Désidéri's MGDA; default);
    * ``"l2"``: ``n_i = ||g_i||``;
    * ``"loss"``: ``n_i = L_i`` (needs the losses);
    * ``"loss+"``: ``n_i = L_i ||g_i||`` (needs the losses).

    and, as in their code, the weights found on the normalised gradients are applied to
    the raw gradients (``scale[t] = sol[t]`` on the raw losses). With ``"none"`` the
    update is the min-norm element itself: it conflicts with no task, and it is 0 when
    the tasks' gradients can cancel out (a Pareto-stationary point).

    The min-norm QP is solved by active-set methods that converge in about ``K``
    iterations; their bound (``10K + 50``) is not reached in practice. Were it reached,
    the weights are those of the solver's last feasible iterate, a convex combination
    (documented fallback of :func:`jmtl.solvers.min_norm_weights`). The Gramian is the
    pre-scaled one, so the weights do not depend on the gradients' scale (|J| from 1e-20
    to 1e20 in float32). Precision: when 0 is in the hull of the gradients (the exact
    update is 0), the float32 update has norm up to about ``2e-3 · max_i ||g_i||`` (the
    relative ridge ``1e-6`` that keeps the factorisations positive definite; ``1e-13``
    in float64); otherwise float32 and float64 agree to about ``1e-7`` relative.
    Task-specific parameters (heads) receive their own unweighted gradient, as in the
    paper's code, LibMTL and torchjd.

    The default is ``"none"``: it is the method the paper analyses (Désidéri's MGDA,
    with its non-conflict guarantee), needs nothing but the Gramian, and is the default
    of torchjd and LibMTL; the normalisations are heuristics of the paper's code.

    Args:
      normalization: one of ``"none"``, ``"l2"``, ``"loss"``, ``"loss+"``.

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, plus ``LOSSES`` for the
      loss normalisations; weights sum to 1 over the present tasks).

    Raises:
      ValueError: unknown normalisation (at construction), non-positive losses with a
        loss normalisation (at update, naming the tasks when the losses are concrete).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.mgda()
      >>> update, _ = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 2.0]]), m.init(2))
      >>> [round(x, 4) for x in update.tolist()]
      [0.8, 0.4]

    References:
      Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
      optimization", Comptes Rendus Mathématique 350, 2012.
      Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"method 'mgda': unknown normalization {normalization!r}; valid ones "
                         f"are {list(_NORMALIZATIONS)}")
    uses_loss = normalization in ("loss", "loss+")
    needs = frozenset({base.GRAMIAN, base.LOSSES} if uses_loss else {base.GRAMIAN})

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState):
        gram, present = inputs.gramian, inputs.present
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        g = jnp.asarray(gram, dtype)
        norms = jnp.ones(g.shape[:1], dtype)
        if normalization in ("l2", "loss+"):
            norms = norms * jnp.sqrt(jnp.clip(jnp.diag(g), 0.0))
        if uses_loss:
            losses = jnp.asarray(inputs.losses, dtype)
            _checks.check_positive(losses, method="mgda", where=present,
                                   what=f"losses (normalization={normalization!r})")
            norms = norms * losses
        ok = (norms > 0) & jnp.isfinite(norms)
        # A zero (or non-positive) normaliser leaves that gradient unscaled.
        inv = jnp.where(ok, 1.0 / jnp.where(ok, norms, 1.0), 1.0)
        gn = g * inv[:, None] * inv[None, :]
        res = min_norm_weights(gn, present)
        return jnp.where(present, res.x, 0.0), state

    return base.Method(name="mgda", init=init, update=update, needs=needs, output="weights",
                       weights_task_specific=False)
