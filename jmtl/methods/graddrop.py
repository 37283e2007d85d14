"""GradDrop (gradient sign dropout)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmtl.methods import base

__all__ = ["graddrop"]


@base.register("graddrop", properties=(
    "permutation_equivariant", "scale_invariant", "jit_consistent", "finite", "absent_tasks"))
def graddrop(leak: float | Sequence[float] = 0.0) -> base.Method:
    """GradDrop: per coordinate, keep one sign of the task gradients at random.

    With the task gradients ``g_i`` (rows of the Jacobian, present tasks only), the
    sign purity of each coordinate is ``P = ½ (1 + Σ_i g_i / Σ_i |g_i|)`` (``½`` where
    every gradient is zero). One uniform draw ``U`` per coordinate (from the key)
    keeps the positive components where ``P > U`` and the negative ones where
    ``P < U``: mask ``M_i = [P > U][g_i > 0] + [P < U][g_i < 0]``. The update is
    ``Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i`` with the leak ``ℓ_i``. When all tasks agree on
    a coordinate's sign, nothing is dropped there; with ``leak = 1`` the update is
    the plain sum.

    The paper applies GradDrop to the gradient at an activation layer (signs taken
    from the gradient times the input, summed over the batch); here it acts on the
    rows of whatever Jacobian it is given (parameters, or a shared representation in
    the engine's features mode). Absent tasks contribute nothing.

    Args:
      leak: ``ℓ`` in ``[0, 1]``, a scalar or one value per task (paper / LibMTL
        default 0: pure GradDrop).

    Returns:
      A :class:`~jmtl.methods.base.Method` (needs the Jacobian and a key; output
      ``"direction"``; ``weights_task_specific=False``).

    Examples:
      >>> import jax, jax.numpy as jnp, jmtl
      >>> m = jmtl.graddrop()
      >>> J = jnp.array([[1.0, 2.0], [3.0, 0.5]])  # no sign conflict: nothing dropped
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
    hp_leak = float(leak_arr) if leak_arr.ndim == 0 else tuple(leak_arr.tolist())

    init = base.stateless_init

    def update(inputs: base.Inputs, state: base.EmptyState):
        jac = inputs.jacobian
        k, d = jac.shape
        dtype = jnp.result_type(jnp.float32, jac.dtype)
        if leak_arr.ndim == 1 and leak_arr.shape[0] != k:
            raise ValueError(f"method 'graddrop': {leak_arr.shape[0]} leak values for {k} tasks")
        ell = jnp.broadcast_to(jnp.asarray(leak_arr, dtype), (k,))
        rows = jnp.where(inputs.present[:, None], jac.astype(dtype), 0)
        total = jnp.sum(rows, axis=0)
        mass = jnp.sum(jnp.abs(rows), axis=0)
        ratio = jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1), 0)
        purity = 0.5 * (1 + jnp.clip(ratio, -1, 1))
        # U in [tiny, 1): P = 1 keeps every positive part, P = 0 every negative one.
        u = jax.random.uniform(inputs.key, (d,), dtype, minval=jnp.finfo(dtype).tiny,
                               maxval=1.0)
        keep = jnp.where(rows > 0, (purity > u)[None, :],
                         jnp.where(rows < 0, (purity < u)[None, :], False))
        factor = ell[:, None] + (1 - ell[:, None]) * keep.astype(dtype)
        return jnp.sum(factor * rows, axis=0), state

    return base.Method(name="graddrop", init=init, update=update,
                       needs=frozenset({base.JACOBIAN, base.KEY}), output="direction",
                       weights_task_specific=False, hparams=(("leak", hp_leak),))
