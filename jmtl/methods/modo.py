"""``modo``: MoDo, multi-objective gradient descent with double sampling (Chen et al.).

MoDo keeps simplex weights ``λ`` and moves them by one projected step per iteration,
``λ ← Π_Δ(λ − γ (J₁ J₂ᵀ λ + ρ λ))``, where ``J₁`` and ``J₂`` are the task Jacobians of two
*independent* mini-batches: ``J₁ J₂ᵀ λ`` is then an unbiased estimate of the gradient of
``½‖Jᵀλ‖²`` (with one batch, ``J Jᵀ`` carries the gradient noise's covariance as a bias).

**How the independent samples reach the method.** A method sees one Jacobian per step, so
the samples are stacked as tasks: ``loss_fn`` returns one loss pytree per mini-batch, as a
tuple ``(losses_batch_1, losses_batch_2[, losses_batch_3])`` with the same task names in
each (tuples keep their order, so the method sees ``num_samples · K`` rows, sample-major).
``num_samples`` says how many there are:

* ``1`` (default, the single-batch fallback): ``J₁ = J₂ = J``, the update is ``Jᵀλ``. It
  runs in any training loop but is the biased variant the paper improves on.
* ``2`` (the paper's algorithm, eq. 2.9): ``λ`` moves with ``J₁ J₂ᵀ``, the update is
  ``½ (J₁ + J₂)ᵀ λ`` (the official code's default).
* ``3`` (LibMTL and the official code's ``three_grads``): ``λ`` moves with ``J₁ J₂ᵀ``, the
  update is ``J₃ᵀ λ`` from the third batch.

With the engine, two mini-batches per step::

    def loss_fn(params, batch_1, batch_2):
        return (task_losses(params, batch_1), task_losses(params, batch_2))

    grad_fn = jmtl.value_and_mtl_grad(loss_fn, jmtl.modo(num_samples=2), shared=...)
    losses, grads, state = grad_fn(params, state, batch_1, batch_2)

(the heads' gradients come through ``base.Output``, which the engine must honour).

The helpers here (:func:`num_tasks_per_sample`, :func:`cross_gramian`,
:func:`direction_weights`) are shared with :mod:`jmtl.methods.sdmgrad`, which uses the same
convention.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import _checks
from jmtl.methods import base
from jmtl.solvers.simplex import project_simplex

__all__ = ["modo", "MoDoState", "num_tasks_per_sample", "cross_gramian", "sample_presence",
           "direction_weights", "simplex_start", "check_num_samples"]


def check_num_samples(name: str, num_samples) -> int:
    """Validates ``num_samples`` (a static 1, 2 or 3)."""
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or \
            num_samples not in (1, 2, 3):
        raise ValueError(f"method '{name}': num_samples must be 1, 2 or 3, got {num_samples!r}")
    return int(num_samples)


def num_tasks_per_sample(name: str, total: int, num_samples: int) -> int:
    """``K`` from the ``num_samples · K`` stacked rows (``ValueError`` if not divisible)."""
    if total % num_samples:
        raise ValueError(
            f"method '{name}': {total} tasks cannot be split into num_samples={num_samples} "
            "mini-batches; loss_fn must return one loss pytree per mini-batch, e.g. a tuple "
            "(losses_batch_1, losses_batch_2), each with the same K tasks")
    return total // num_samples


def sample_presence(present: jax.Array, num_samples: int) -> jax.Array:
    """``(K,)`` tasks present in every mini-batch."""
    k = present.shape[0] // num_samples
    return jnp.all(jnp.reshape(present, (num_samples, k)), axis=0)


def cross_gramian(gram: jax.Array, num_samples: int) -> jax.Array:
    """``J₁ J₂ᵀ`` (the block of the stacked Gramian), or ``J Jᵀ`` with one sample."""
    k = gram.shape[0] // num_samples
    if num_samples == 1:
        return gram
    return gram[:k, k:2 * k]


def direction_weights(weights: jax.Array, num_samples: int) -> jax.Array:
    """Stacked ``(num_samples · K,)`` weights of the update from the ``(K,)`` weights.

    One sample: ``w``; two: ``(w/2, w/2)`` (the mean of both batches); three: ``(0, 0, w)``
    (the third batch only).
    """
    if num_samples == 1:
        return weights
    if num_samples == 2:
        return jnp.concatenate([0.5 * weights, 0.5 * weights])
    zeros = jnp.zeros_like(weights)
    return jnp.concatenate([zeros, zeros, weights])


def simplex_start(lam: jax.Array, present: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The stored weights of the present tasks renormalised to the simplex, and their mass."""
    dtype = lam.dtype
    mass = jnp.sum(jnp.where(present, lam, 0.0))
    n_present = jnp.maximum(jnp.sum(present), 1).astype(dtype)
    ok = mass > 0
    start = jnp.where(ok, lam / jnp.where(ok, mass, 1.0), 1.0 / n_present)
    return jnp.where(present, start, 0.0), mass


class MoDoState(NamedTuple):
    """State of :func:`modo`.

    Attributes:
      lam: ``(K,)`` float32 weights ``λ`` on the simplex (``K`` tasks per mini-batch).
    """

    lam: jax.Array
    skipped: jax.Array = np.zeros((), np.int32)  # steps skipped on non-finite inputs


def _init_simplex(name, num_samples):
    def init(num_tasks: int, dim: int | None = None):
        del dim
        k = num_tasks_per_sample(name, num_tasks, num_samples)
        return jnp.full((k,), 1.0 / k, jnp.float32)
    return init


@base.register("modo", properties=(base.PERMUTATION_EQUIVARIANT, base.JIT_CONSISTENT,
                                   base.FINITE, base.ABSENT_TASKS, base.STATE_PYTREE))
def modo(gamma: float = 0.1, rho: float = 0.1, num_samples: int = 1) -> base.Method:
    """MoDo: one projected step of the MGDA weights per iteration, from two samples.

    ``λ ← Π_Δ(λ − γ (J₁ J₂ᵀ λ + ρ λ))`` from the uniform ``λ``, then the update is the
    ``λ``-weighted gradient of the batch(es) chosen by ``num_samples`` (see the module
    docstring for how the mini-batches are passed: ``num_samples=1`` is the single-batch
    fallback). The step uses the *raw* Jacobians (``J₁ J₂ᵀ = s² ·`` the pre-scaled block),
    so ``γ`` depends on the gradients' scale as in the paper; at extreme scales the step
    saturates and the projection still returns a point of the simplex.

    Defaults: ``γ = 0.1`` and ``ρ = 0.1`` are torchjd's (``MoDoWeighting``); the official
    toy code uses ``γ = 0.1, ρ = 0`` and LibMTL ``γ = 1e-3, ρ = 0.1`` (the paper tunes
    ``γ`` per dataset).

    Heads (task-specific parameters): with one sample, each head gets its own task's
    unweighted gradient; with ``num_samples`` mini-batches, the mean of its task's
    gradients over them (LibMTL's ``1/3`` of the sum), through ``base.Output``.

    Absent tasks (absent from any of the mini-batches): weight 0, ``λ_i`` unchanged; the
    step is taken on the present tasks' ``λ`` renormalised to the simplex and stored scaled
    back to their previous total (as :func:`jmtl.moco`).

    Args:
      gamma: step size ``γ`` of ``λ`` (may be a traced value).
      rho: ``ℓ₂`` regularisation ``ρ`` of the ``λ`` subproblem (may be traced).
      num_samples: 1, 2 or 3 independent mini-batches stacked as tasks (static).

    Returns:
      A :class:`~jmtl.methods.base.Method` (``needs={GRAMIAN}``, weights output, state
      :class:`MoDoState`, ``weights_task_specific=False``).

    Examples:
      >>> import jax.numpy as jnp, jmtl
      >>> m = jmtl.modo(gamma=0.5, rho=0.0)
      >>> update, state = jmtl.aggregate(m, jnp.array([[1.0, 0.0], [0.0, 2.0]]), m.init(2))
      >>> [round(x, 4) for x in state.lam.tolist()]  # Π(½ − ½ (1/2, 2))
      [0.875, 0.125]

    References:
      Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning:
      Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023; JMLR 25, 2024.
    """
    n = check_num_samples("modo", num_samples)
    if _checks.is_concrete(gamma) and _checks.is_concrete(rho):
        if not float(gamma) >= 0 or not float(rho) >= 0:
            raise ValueError(f"method 'modo': gamma and rho must be non-negative, got "
                             f"gamma={gamma}, rho={rho}")
    init_lam = _init_simplex("modo", n)

    def init(num_tasks: int, dim: int | None = None) -> MoDoState:
        return MoDoState(lam=init_lam(num_tasks, dim))

    def update(inputs: base.Inputs, state: MoDoState):
        gram, present_all = inputs.gramian, inputs.present
        num_tasks_per_sample("modo", gram.shape[0], n)
        dtype = jnp.result_type(jnp.float32, gram.dtype)
        present = sample_presence(present_all, n)
        cross = cross_gramian(jnp.asarray(gram, dtype), n)
        cross = jnp.where(present[:, None] & present[None, :], cross, 0.0)
        s = base.gram_scale(inputs, dtype)
        lam = state.lam.astype(dtype)
        start, mass = simplex_start(lam, present)
        # γ s² (J₁J₂ᵀ/s²) λ, multiplied in an order that saturates rather than overflows.
        grad = ((cross @ start) * s) * s + jnp.asarray(rho, dtype) * start
        moved = project_simplex(start - jnp.asarray(gamma, dtype) * grad, mask=present)
        moved = jnp.where(present, moved, 0.0)
        keep = jnp.where(jnp.all(present) | ~(mass > 0), 1.0, mass)  # absent: keep their share
        new_lam = jnp.where(present, moved * keep, lam)
        new_state = MoDoState(lam=new_lam.astype(state.lam.dtype))
        w = jnp.where(present_all, direction_weights(moved, n), 0.0)
        if n == 1:
            return w, new_state
        heads = jnp.where(present_all, 1.0 / n, 0.0).astype(dtype)
        return base.Output(w, heads), new_state

    return base.Method(name="modo", init=init, update=update, needs=frozenset({base.GRAMIAN}),
                       output=base.WEIGHTS, weights_task_specific=False)
