"""DSelect-k: a mixture of experts whose per-task gates select at most ``k`` experts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmtl.nn import _common
from jmtl.nn.experts import MixtureFeatures, _stack_experts

__all__ = ["smooth_step", "DSelectKGate", "DSelectK"]

# Added inside the logarithm of the entropy penalty (the official implementation's value).
_ENTROPY_EPS = 1e-6


def smooth_step(t: jax.Array, gamma: float = 1.0) -> jax.Array:
    """The cubic smooth-step function of DSelect-k (Hazimeh et al. 2020, 2021).

    ``0`` for ``t <= -gamma/2``, ``1`` for ``t >= gamma/2`` and
    ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` in between: continuously
    differentiable, with exact zeros and ones (and zero gradient) outside the
    interval, so a gate can reach an exactly binary state.

    Args:
      t: any array.
      gamma: the width of the interval where the function is not constant (> 0).

    Returns:
      An array like ``t`` with values in ``[0, 1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jmtl import nn as mtnn
      >>> mtnn.smooth_step(jnp.array([-1.0, 0.0, 0.25, 1.0])).tolist()
      [0.0, 0.5, 0.84375, 1.0]

    References:
      Hazimeh, Ponomareva, Mol, Tan & Mazumder, "The Tree Ensemble Layer:
      Differentiability meets Conditional Computation", ICML 2020.
    """
    half = gamma / 2.0
    poly = (-2.0 / gamma ** 3) * t ** 3 + (3.0 / (2.0 * gamma)) * t + 0.5
    return jnp.where(t <= -half, jnp.zeros_like(t), jnp.where(t >= half, jnp.ones_like(t), poly))


def _binary_codes(num_experts: int, num_binary: int) -> np.ndarray:
    """``(n, m)`` booleans, row ``e`` the ``m``-bit binary code of ``e``, most significant first."""
    shifts = np.arange(num_binary - 1, -1, -1)
    return ((np.arange(num_experts)[:, None] >> shifts[None, :]) & 1).astype(bool)


class DSelectKGate(nnx.Module):
    """One DSelect-k gate: a sparse convex combination over ``n`` experts.

    The gate holds ``k`` single-expert selectors. Selector ``i`` has
    ``m = ceil(log2 n)`` logits ``z_i``; through the smooth step ``S`` it gives
    every expert ``e`` (with binary code ``b(e)``) the weight
    ``r_i(e) = prod_j S(z_ij)^{b_j(e)} (1 - S(z_ij))^{1 - b_j(e)}``. The gate's
    expert weights are ``sum_i softmax(w)_i r_i``. Once every ``|z_ij| >= gamma/2``
    each ``r_i`` is one-hot, so at most ``k`` experts get a non-zero weight (fewer
    when selectors agree); an entropy penalty on the ``r_i`` (:meth:`penalty`)
    drives the selectors there during training.

    With ``in_features=None`` the gate is static (task-only conditioning: ``z``
    and ``w`` are parameters); otherwise ``z`` and ``w`` are linear functions of
    the flattened gate input (per-example conditioning). Initialisation follows
    the official implementation: ``z`` (kernel and bias) uniform in
    ``±gamma/100``, ``w`` uniform in ``±0.05``.

    When ``n`` is not a power of two some codes name no expert; their weight is
    lost, so the expert weights sum to at most 1. :meth:`penalty` then adds the
    official implementation's term ``1 / sum_e r_i(e)`` per selector, which keeps
    every selector on a real expert.

    Args:
      num_experts: ``n >= 1``.
      num_nonzeros: ``k >= 1``, the most experts the gate selects.
      in_features: features per example of the gate input, or ``None`` for a
        static gate.
      gamma: the smooth step's width (official default 1.0).
      rngs: random streams for initialisation.

    Examples:
      >>> from flax import nnx
      >>> from jmtl import nn as mtnn
      >>> gate = mtnn.DSelectKGate(4, 2, rngs=nnx.Rngs(0))
      >>> w = gate()
      >>> w.shape, round(float(w.sum()), 5)   # n = 4 is a power of two: weights sum to 1
      ((4,), 1.0)

    References:
      Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi,
      "DSelect-k: Differentiable Selection in the Mixture of Experts with
      Applications to Multi-Task Learning", NeurIPS 2021.
    """

    def __init__(self, num_experts: int, num_nonzeros: int, *, in_features: int | None = None,
                 gamma: float = 1.0, rngs: nnx.Rngs):
        if num_experts < 1 or num_nonzeros < 1:
            raise ValueError(f"DSelectKGate: needs num_experts >= 1 and num_nonzeros >= 1, got "
                             f"{num_experts} and {num_nonzeros}")
        if not gamma > 0:
            raise ValueError(f"DSelectKGate: gamma must be positive, got {gamma}")
        self.num_experts = num_experts
        self.num_nonzeros = num_nonzeros
        self.num_binary = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
        self.power_of_two = num_experts == 2 ** self.num_binary
        self.gamma = float(gamma)
        self.in_features = in_features
        z_init = nnx.initializers.uniform(gamma / 50.0)  # U[0, gamma/50), shifted below
        w_init = nnx.initializers.uniform(0.1)
        k, m = num_nonzeros, self.num_binary
        if in_features is None:
            self.z_logits = nnx.Param(z_init(rngs.params(), (k, m)) - gamma / 100.0)
            self.w_logits = nnx.Param(w_init(rngs.params(), (k,)) - 0.05)
            self.z_net = self.w_net = None
        else:
            def shifted(init, shift):
                return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) - shift
            self.z_net = nnx.Linear(in_features, k * m, rngs=rngs,
                                    kernel_init=shifted(z_init, gamma / 100.0),
                                    bias_init=shifted(z_init, gamma / 100.0))
            self.w_net = nnx.Linear(in_features, k, rngs=rngs,
                                    kernel_init=shifted(w_init, 0.05),
                                    bias_init=shifted(w_init, 0.05))
            self.z_logits = self.w_logits = None

    def _logits(self, x: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(z, w)``: ``(k, m)`` and ``(k,)``, or ``(B, k, m)`` and ``(B, k)``, float32."""
        if self.in_features is None:
            if x is not None:
                raise ValueError("DSelectKGate: a static gate (in_features=None) takes no input")
            return (self.z_logits[...].astype(jnp.float32),
                    self.w_logits[...].astype(jnp.float32))
        if x is None:
            raise ValueError("DSelectKGate: a per-example gate needs its input `x`")
        flat = _common.flatten_batch(x, self.in_features, what="DSelectKGate")
        z = self.z_net(flat).astype(jnp.float32)
        w = self.w_net(flat).astype(jnp.float32)
        return z.reshape(z.shape[0], self.num_nonzeros, self.num_binary), w

    def selector_outputs(self, x: jax.Array | None = None) -> jax.Array:
        """The single-expert selectors ``r_i``: ``(k, n)``, or ``(B, k, n)`` per example."""
        z, _ = self._logits(x)
        return self._selectors(z)

    def _selectors(self, z: jax.Array) -> jax.Array:
        s = smooth_step(z, self.gamma)[..., None, :]  # (..., k, 1, m)
        codes = _binary_codes(self.num_experts, self.num_binary)  # a trace-time constant
        return jnp.prod(jnp.where(codes, s, 1.0 - s), axis=-1)  # (..., k, n)

    def __call__(self, x: jax.Array | None = None) -> jax.Array:
        """Expert weights, float32: ``(n,)`` for a static gate, ``(B, n)`` per example."""
        z, w = self._logits(x)
        return jnp.einsum("...k,...kn->...n", jax.nn.softmax(w, axis=-1), self._selectors(z))

    def penalty(self, x: jax.Array | None = None, *, entropy_weight: float | jax.Array = 0.0
                ) -> jax.Array:
        """The gate's regulariser: ``entropy_weight`` times the selectors' entropy, plus
        ``sum_i 1 / sum_e r_i(e)`` when ``n`` is not a power of two.

        The entropy is ``-sum_i sum_e r_i(e) log(r_i(e) + 1e-6)`` (the official
        implementation's form). A selector stuck on codes that name no expert
        (``sum_e r_i(e) = 0``) contributes ``1e6`` rather than the official ``inf``,
        so the penalty stays finite. Per-example gates average both terms over the batch
        (the official code sums them; the mean keeps ``entropy_weight`` independent
        of the batch size).

        Args:
          x: the gate input (``None`` for a static gate).
          entropy_weight: the entropy term's weight (may be traced).

        Returns:
          A float32 scalar, differentiable with respect to the gate's parameters.
        """
        r = self.selector_outputs(x)
        entropy = -jnp.sum(r * jnp.log(r + _ENTROPY_EPS), axis=(-2, -1))
        total = entropy_weight * entropy
        if not self.power_of_two:
            reachable = jnp.maximum(jnp.sum(r, axis=-1), _ENTROPY_EPS)
            total = total + jnp.sum(1.0 / reachable, axis=-1)
        return jnp.mean(total)


class DSelectK(nnx.Module):
    """Multi-gate mixture of experts with DSelect-k gates: at most ``k`` experts per task.

    Like :class:`MMoE`, shared experts ``f_e`` are mixed per task and fed to the
    task's tower, but task ``t``'s mixture weights come from a
    :class:`DSelectKGate`, which is differentiable and, once its smooth steps
    saturate, selects at most ``num_nonzeros`` experts. Add :meth:`penalty` to the
    training loss to push the gates to that state (the paper tunes the entropy
    weight; the official default is no entropy term).

    :meth:`encode` gives :class:`MixtureFeatures` (the stacked expert outputs and
    the gate input); :meth:`decode` applies the gates and towers (all task-specific),
    as for :class:`MMoE`: in jmtl's features mode take the Jacobian with respect
    to ``expert_outputs`` when ``x`` is data.

    Args:
      experts: the shared experts (``n >= 1`` modules with outputs of one shape).
      towers: ``{task: module}`` mapping a mixture to the task's prediction.
      num_nonzeros: ``k``, the most experts each task selects.
      gate_in_features: features per example of the gate input (``x``
        flattened) for per-example gates, or ``None`` (the default) for static
        task-only gates, the paper's multi-task setting.
      gamma: the smooth step's width (official default 1.0).
      rngs: random streams for the gates.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jmtl import nn as mtnn
      >>> rngs = nnx.Rngs(0)
      >>> experts = [nnx.Sequential(nnx.Linear(4, 6, rngs=rngs), nnx.relu) for _ in range(4)]
      >>> model = mtnn.DSelectK(experts, {"ctr": nnx.Linear(6, 1, rngs=rngs),
      ...                                 "cvr": nnx.Linear(6, 1, rngs=rngs)},
      ...                       num_nonzeros=2, rngs=rngs)
      >>> {t: y.shape for t, y in model(jnp.ones((3, 4))).items()}
      {'ctr': (3, 1), 'cvr': (3, 1)}
      >>> model.gate_weights()["ctr"].shape
      (4,)

    References:
      Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi,
      "DSelect-k: Differentiable Selection in the Mixture of Experts with
      Applications to Multi-Task Learning", NeurIPS 2021.
    """

    def __init__(self, experts: Sequence[nnx.Module], towers: Mapping[str, nnx.Module], *,
                 num_nonzeros: int, gate_in_features: int | None = None, gamma: float = 1.0,
                 rngs: nnx.Rngs):
        self.task_names = _common.task_order(towers, what="DSelectK: `towers`")
        self.experts = _common.module_list(experts, what="DSelectK: `experts`")
        self.towers = _common.module_dict(self.task_names, towers)
        self.gates = nnx.Dict({
            name: DSelectKGate(len(self.experts), num_nonzeros, in_features=gate_in_features,
                               gamma=gamma, rngs=rngs)
            for name in self.task_names})
        self.per_example = gate_in_features is not None

    def encode(self, x: jax.Array) -> MixtureFeatures:
        """Stacked shared expert outputs ``(n, B, ...)``, and ``x`` as the gate input."""
        return MixtureFeatures(_stack_experts(self.experts, x, what="DSelectK"), x)

    def gate_weights(self, x: jax.Array | None = None) -> dict[str, jax.Array]:
        """``{task: weights}``, float32: ``(n,)`` for static gates, ``(B, n)`` per example."""
        arg = x if self.per_example else None
        return {name: self.gates[name](arg) for name in self.task_names}

    def decode(self, features: MixtureFeatures) -> dict[str, Any]:
        """Gates the expert outputs per task, then applies the towers."""
        stacked = features.expert_outputs
        weights = self.gate_weights(features.gate_input)
        out = {}
        for name in self.task_names:
            w = weights[name]
            if w.ndim == 1:
                w = jnp.broadcast_to(w, (stacked.shape[1], w.shape[0]))
            out[name] = self.towers[name](_common.mix(w, stacked))
        return out

    def __call__(self, x: jax.Array) -> dict[str, Any]:
        """``decode(encode(x))``: one prediction per task, keys in sorted order."""
        return self.decode(self.encode(x))

    def penalty(self, x: jax.Array | None = None, *, entropy_weight: float | jax.Array = 0.0
                ) -> jax.Array:
        """Sum over tasks of :meth:`DSelectKGate.penalty` (``x`` only for per-example gates)."""
        arg = x if self.per_example else None
        return sum(self.gates[name].penalty(arg, entropy_weight=entropy_weight)
                   for name in self.task_names)
