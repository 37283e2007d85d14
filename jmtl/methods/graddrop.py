"""GradDrop (gradient sign dropout)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import jacobian as jac_lib
from jmtl.methods import base

__all__ = ["graddrop"]


@base.register("graddrop", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def graddrop(leak: float | Sequence[float] = 0.0, batch_size: int | None = None
             ) -> base.Method:
    """GradDrop: per coordinate, keep one sign of the task gradients at random.

    From sign statistics ``G_i`` of the task gradients (present tasks only), the sign
    purity of each coordinate is ``P = ½ (1 + Σ_i G_i / Σ_i |G_i|)`` (``½`` where every
    ``G_i`` is zero). One uniform draw ``U`` per coordinate (from the key) keeps the
    tasks with ``G_i > 0`` where ``P > U`` and those with ``G_i < 0`` where ``P < U``:
    mask ``M_i = [P > U][G_i > 0] + [P < U][G_i < 0]``. The update is
    ``Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i`` with the leak ``ℓ_i``. When all tasks agree on a
    coordinate's sign, nothing is dropped there; with ``leak = 1`` the update is the
    plain sum.

    Sign statistics. The paper (Algorithm 1) and LibMTL apply GradDrop at an activation
    layer ``A`` of shape ``(B, F)`` and take ``G_i = Σ_batch sign(A) ∘ ∇_A L_i`` per
    feature, the mask then acting on every example of the batch. With ``batch_size=B``
    jmtl reads each Jacobian row as ``(B, F)`` (the engine's features mode with a single
    representation array whose leading axis is the batch) and uses
    ``G_i = Σ_batch ∇_z L_i``, i.e. the paper's rule with ``sign(A) = 1``: exact when the
    representation ``z`` is non-negative and non-zero (softplus, sigmoid, exp outputs),
    and for a ReLU network when ``z`` is the *pre*-activation with the ReLU applied in the
    heads (then ``∇_z L_i = 1[z > 0] ∘ ∇_A L_i = sign(A) ∘ ∇_A L_i`` and the masked
    gradient back-propagates identically). The method never sees ``A`` itself, so for
    activations with negative values (tanh, leaky ReLU) the paper's ``sign(A)`` cannot be
    applied. With ``batch_size=None`` (the default, and the only choice for a parameter
    Jacobian, which has no batch axis) ``G_i = g_i`` per entry: jmtl's rule, the paper's
    with a batch of one.

    Absent tasks contribute nothing. The sign statistics are computed on rows divided by
    a common power of two, so |J| from 1e-20 to 1e20 gives the same masks in float32.

    Args:
      leak: ``ℓ`` in ``[0, 1]``, a scalar or one value per task (paper / LibMTL
        default 0: pure GradDrop).
      batch_size: ``B``, the leading (batch) axis of each Jacobian row for the paper's
        batch-summed statistic, or ``None`` for per-entry signs. The row length must be a
        multiple of ``B``.

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs the Jacobian and a key; output
      ``"direction"``; a gradient aggregator: task-specific parameters get their own
      task's unweighted gradient, as in LibMTL).

    Raises:
      ValueError: a bad ``leak`` or ``batch_size``, or (when the method sees the Jacobian)
        a row length that is not a multiple of ``batch_size``.

    Examples:
      >>> import jax, jax.numpy as jnp, jmtl
      >>> m = jmtl.graddrop()
      >>> J = jnp.array([[1.0, 2.0], [3.0, 0.5]])  # no sign conflict: nothing dropped
      >>> update, _ = jmtl.aggregate(m, J, m.init(2), key=jax.random.key(0))
      >>> update.tolist()
      [4.0, 2.5]
      >>> m = jmtl.graddrop(batch_size=2)  # rows are (batch 2, 1 feature): sums 3 and 3.5
      >>> update, _ = jmtl.aggregate(m, J, m.init(2), key=jax.random.key(0))
      >>> update.tolist()
      [4.0, 2.5]

    References:
      Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign:
      Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020.
    """
    leak_arr = np.asarray(leak, np.float64)
    if leak_arr.ndim > 1 or not np.all((leak_arr >= 0) & (leak_arr <= 1)):
        raise ValueError(f"method 'graddrop': leak must be a scalar or a (K,) sequence of "
                         f"values in [0, 1], got {leak!r}")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"method 'graddrop': batch_size must be a positive integer or None, "
                         f"got {batch_size!r}")
    b = 1 if batch_size is None else int(batch_size)

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState):
        jac = inputs.jacobian
        k, d = jac.shape
        dtype = jnp.result_type(jnp.float32, jac.dtype)
        if leak_arr.ndim == 1 and leak_arr.shape[0] != k:
            raise ValueError(f"method 'graddrop': {leak_arr.shape[0]} leak values for {k} tasks")
        if d % b:
            raise ValueError(f"method 'graddrop': rows of length {d} are not (batch_size={b}, "
                             "features) arrays")
        ell = jnp.broadcast_to(jnp.asarray(leak_arr, dtype), (k,))
        rows = jnp.where(inputs.present[:, None], jac.astype(dtype), 0).reshape(k, b, d // b)
        # Sign statistics on rows divided by a common power of two: no overflow.
        stat = jnp.sum(rows / jac_lib.common_scale(rows), axis=1)  # (K, F)
        total = jnp.sum(stat, axis=0)
        mass = jnp.sum(jnp.abs(stat), axis=0)
        ratio = jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1), 0)
        purity = 0.5 * (1 + jnp.clip(ratio, -1, 1))
        # U in [tiny, 1): P = 1 keeps every positive part, P = 0 every negative one.
        u = jax.random.uniform(inputs.key, (d // b,), dtype, minval=jnp.finfo(dtype).tiny,
                               maxval=1.0)
        keep = jnp.where(stat > 0, (purity > u)[None, :],
                         jnp.where(stat < 0, (purity < u)[None, :], False))
        factor = ell[:, None] + (1 - ell[:, None]) * keep.astype(dtype)
        return jnp.sum(factor[:, None, :] * rows, axis=0).reshape(d), state

    return base.Method(name="graddrop", init=init, update=update,
                       needs=frozenset({base.JACOBIAN, base.KEY}), output="direction",
                       weights_task_specific=False)
