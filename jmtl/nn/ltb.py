"""Learning to Branch: a searched tree of blocks with Gumbel-softmax branch choices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jmtl.nn import _common

__all__ = ["BranchLogits", "BranchTemperature", "BranchTree", "LTB", "gumbel_softmax"]


class BranchLogits(nnx.Param):
    """The branching logits of :class:`LTB` (a ``Param``, so trained by default).

    A separate type lets them get their own optimizer or learning rate, e.g.
    ``nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.All(nnx.Param, nnx.Not(BranchLogits)))``
    for the weights and another on ``BranchLogits`` (the paper updates the two in turn).
    """


class BranchTemperature(nnx.Variable):
    """The Gumbel-softmax temperature of :class:`LTB` (state, not trained; change it with
    :meth:`LTB.set_temperature` without retracing)."""


class BranchTree(NamedTuple):
    """A fixed branching structure.

    Attributes:
      parents: one tuple per layer after the first: ``parents[l - 1][i]`` is the index,
        in layer ``l - 1``, of block ``i`` of layer ``l``'s parent.
      heads: ``{task: index}`` of each task head's parent in the last layer.
    """

    parents: tuple[tuple[int, ...], ...]
    heads: dict[str, int]


def gumbel_softmax(key: jax.Array, logits: jax.Array, temperature: float | jax.Array, *,
                   hard: bool) -> jax.Array:
    """One Gumbel-softmax sample per row of ``logits`` (float32).

    ``softmax((logits + g) / temperature)`` with ``g`` standard Gumbel noise; with
    ``hard=True`` the forward value is the one-hot of its argmax and the gradient that
    of the soft sample (straight-through).

    Args:
      key: a PRNG key.
      logits: ``(..., n)`` unnormalised log-probabilities.
      temperature: ``> 0``.
      hard: whether to return one-hot samples (straight-through gradient).

    Returns:
      An array like ``logits``; each row sums to 1.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jmtl import nn as mtnn
      >>> s = mtnn.gumbel_softmax(jax.random.key(0), jnp.zeros((2, 3)), 1.0, hard=True)
      >>> s.sum(axis=-1).tolist(), sorted(set(s.ravel().tolist()))
      ([1.0, 1.0], [0.0, 1.0])

    References:
      Jang, Gu & Poole, "Categorical Reparameterization with Gumbel-Softmax", ICLR 2017;
      Maddison, Mnih & Teh, "The Concrete Distribution", ICLR 2017.
    """
    logits = jnp.asarray(logits, jnp.float32)
    noise = jax.random.gumbel(key, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits + noise) / temperature, axis=-1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return one_hot + (soft - jax.lax.stop_gradient(soft))  # exactly one-hot forward


def _mix_rows(weights: jax.Array, stacked: jax.Array) -> jax.Array:
    """``out[i] = sum_j weights[i, j] * stacked[j]`` over a stacked ``(n, B, ...)`` array."""
    return jnp.einsum("ij,j...->i...", weights.astype(stacked.dtype), stacked)


class LTB(nnx.Module):
    """Learning to Branch: a layered tree of blocks whose branches are learned.

    The design space has ``L`` layers of candidate blocks. Every block of the first
    layer reads the input ``x``; block ``i`` of layer ``l > 0`` reads one parent
    among the ``N_{l-1}`` blocks of layer ``l - 1``, and each task head reads one
    block of the last layer. During the search each such choice is a categorical
    distribution with learned logits (:class:`BranchLogits`), relaxed by a
    Gumbel-softmax sample (one sample per forward pass, shared by the batch): the
    child reads ``sum_j d_j y_j``, ``y_j`` the parents' outputs. Blocks of a layer
    must give outputs of one shape. After the search, :meth:`tree` takes every
    child's most likely parent and :meth:`fix` builds the resulting tree network:
    blocks that no task reaches are dropped, the rest are computed once on their
    parent's output, so tasks that choose the same ancestors share them.

    In evaluation mode (``model.eval()``) a search model uses the most likely
    parents (the tree :meth:`fix` would build) instead of samples.

    Defaults follow LibMTL's implementation: straight-through hard samples
    (``hard=True``) and logits initialised uniform (zeros). The temperature is
    state (:class:`BranchTemperature`) that the training loop anneals with
    :meth:`set_temperature`; LibMTL uses ``tau = E / 20 / sqrt(e + 1)`` at epoch ``e``
    of ``E``. The paper alternates weight and logit updates; give
    :class:`BranchLogits` its own optimizer to do so.

    :meth:`encode` gives the stacked outputs of the last layer's blocks (in a
    search model every block can reach every task); :meth:`decode` the heads'
    branch choices and the heads, which are task-specific. Gumbel noise comes from
    the ``rngs`` stream given at construction (stream ``"gumbel"``, else
    ``"default"``; it advances under ``nnx.jit``), or from an explicit ``key``,
    which functional code (``nnx.split``/``merge``, jmtl's engine) should pass
    so that every step draws fresh branches.

    Args:
      layers: candidate blocks per layer, first layer first (any NNX modules).
      heads: ``{task: module}``, each reading one block of the last layer.
      rngs: random streams: the logits' initialisation needs none, the Gumbel noise
        draws from ``rngs["gumbel"]``.
      temperature: the initial Gumbel-softmax temperature.
      hard: one-hot samples with a straight-through gradient (``True``) or soft samples.
      tree: a :class:`BranchTree`: build the fixed network it describes from
        ``layers`` (unreached blocks are dropped) instead of a search model.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jmtl import nn as mtnn
      >>> rngs = nnx.Rngs(0)
      >>> block = lambda: nnx.Sequential(nnx.Linear(4, 4, rngs=rngs), nnx.relu)
      >>> model = mtnn.LTB([[block(), block()], [block(), block()]],
      ...                  {"a": nnx.Linear(4, 1, rngs=rngs), "b": nnx.Linear(4, 2, rngs=rngs)},
      ...                  rngs=rngs)
      >>> {t: y.shape for t, y in model(jnp.ones((3, 4))).items()}
      {'a': (3, 1), 'b': (3, 2)}
      >>> fixed = model.fix()
      >>> len(fixed.tree().parents), sorted(fixed.tree().heads)
      (1, ['a', 'b'])

    References:
      Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020.
    """

    def __init__(self, layers: Sequence[Sequence[nnx.Module]], heads: Mapping[str, nnx.Module],
                 *, rngs: nnx.Rngs | None = None, temperature: float = 1.0, hard: bool = True,
                 tree: BranchTree | None = None):
        self.task_names = _common.task_order(heads, what="LTB: `heads`")
        if isinstance(layers, nnx.Module) or not isinstance(layers, Sequence) or not layers:
            raise ValueError("LTB: `layers` must be a non-empty sequence of sequences of blocks")
        layers = [list(layer) for layer in layers]
        for depth, layer in enumerate(layers):
            if not layer:
                raise ValueError(f"LTB: layer {depth} has no block")
        self.hard = hard
        self.deterministic = False
        self.heads = _common.module_dict(self.task_names, heads)
        if tree is None:
            self.fixed = False
            self.layers = nnx.List([nnx.List(layer) for layer in layers])
            self.logits = nnx.List([
                BranchLogits(jnp.zeros((len(layers[depth]), len(layers[depth - 1]))))
                for depth in range(1, len(layers))])
            self.head_logits = BranchLogits(jnp.zeros((len(self.task_names), len(layers[-1]))))
            self.temperature = BranchTemperature(jnp.asarray(temperature, jnp.float32))
            if rngs is None:
                raise ValueError("LTB: a search model needs `rngs` for its Gumbel noise")
            self.rngs = rngs["gumbel"].fork()
            self._parents = None
            self._head_parents = None
        else:
            self.fixed = True
            kept, parents, head_parents = _prune(layers, tree, self.task_names)
            self.layers = nnx.List([nnx.List([layers[depth][i] for i in kept[depth]])
                                    for depth in range(len(layers))])
            self._parents = parents
            self._head_parents = head_parents
            self.logits = None
            self.head_logits = None
            self.temperature = None
            self.rngs = None

    # -- the branching choices ------------------------------------------------------------

    def set_temperature(self, temperature: float | jax.Array) -> None:
        """Sets the Gumbel-softmax temperature (a state update: no retracing under jit)."""
        if self.fixed:
            raise ValueError("LTB: a fixed tree has no temperature")
        self.temperature[...] = jnp.asarray(temperature, jnp.float32)

    def branch_probabilities(self) -> tuple[list[jax.Array], jax.Array]:
        """``([softmax of each layer's logits (N_l, N_{l-1})], heads (K, N_L))``."""
        if self.fixed:
            raise ValueError("LTB: a fixed tree has no branch probabilities")
        return ([jax.nn.softmax(lg[...], axis=-1) for lg in self.logits],
                jax.nn.softmax(self.head_logits[...], axis=-1))

    def tree(self) -> BranchTree:
        """The most likely parent of every block and head (for a fixed model, its tree).

        Needs concrete logits (call it outside ``jit``).
        """
        if self.fixed:
            return BranchTree(self._parents, dict(zip(self.task_names, self._head_parents,
                                                        strict=True)))
        parents = tuple(tuple(int(i) for i in jnp.argmax(lg[...], axis=-1))
                        for lg in self.logits)
        heads = jnp.argmax(self.head_logits[...], axis=-1)
        return BranchTree(parents, {t: int(heads[k]) for k, t in enumerate(self.task_names)})

    def fix(self) -> LTB:
        """The tree network of :meth:`tree`, with this model's trained blocks and heads.

        Returns an independent copy (training it leaves this model unchanged). To
        retrain the found tree from scratch, build ``LTB(fresh_layers, fresh_heads,
        tree=model.tree())`` instead.
        """
        layers = [list(layer) for layer in self.layers]
        return nnx.clone(LTB(layers, {t: self.heads[t] for t in self.task_names},
                             tree=self.tree(), hard=self.hard))

    def _choices(self, logits: jax.Array, key: jax.Array | None) -> jax.Array:
        if self.deterministic:
            return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
        return gumbel_softmax(key, logits, self.temperature[...], hard=self.hard)

    def _keys(self, key: jax.Array | None, count: int) -> list[jax.Array | None]:
        if self.fixed or self.deterministic or count == 0:
            return [None] * count
        if key is None:
            key = self.rngs()
        return list(jax.random.split(key, count))

    # -- forward ----------------------------------------------------------------------------

    def encode(self, x: Any, *, key: jax.Array | None = None) -> jax.Array:
        """The stacked outputs ``(N_L, B, ...)`` of the last layer's (kept) blocks."""
        outputs = [block(x) for block in self.layers[0]]
        keys = self._keys(key, len(self.layers) - 1)
        for depth in range(1, len(self.layers)):
            if self.fixed:
                parents = self._parents[depth - 1]
                outputs = [block(outputs[p])
                           for block, p in zip(self.layers[depth], parents, strict=True)]
            else:
                stacked = _stack(outputs, what=f"LTB layer {depth - 1}")
                choices = self._choices(self.logits[depth - 1][...], keys[depth - 1])
                inputs = _mix_rows(choices, stacked)
                outputs = [block(inputs[i]) for i, block in enumerate(self.layers[depth])]
        return _stack(outputs, what=f"LTB layer {len(self.layers) - 1}")

    def decode(self, z: jax.Array, *, key: jax.Array | None = None) -> dict[str, Any]:
        """Each head on its chosen (or sampled) block of the last layer."""
        if self.fixed:
            return {t: self.heads[t](z[p])
                    for t, p in zip(self.task_names, self._head_parents, strict=True)}
        (head_key,) = self._keys(key, 1)
        inputs = _mix_rows(self._choices(self.head_logits[...], head_key), z)
        return {t: self.heads[t](inputs[k]) for k, t in enumerate(self.task_names)}

    def __call__(self, x: Any, *, key: jax.Array | None = None) -> dict[str, Any]:
        """``decode(encode(x))``: one prediction per task, keys in sorted order."""
        if key is not None:
            key_encode, key_decode = jax.random.split(key)
        else:
            key_encode = key_decode = None
        return self.decode(self.encode(x, key=key_encode), key=key_decode)


def _stack(outputs: list[jax.Array], *, what: str) -> jax.Array:
    shapes = [jnp.shape(o) for o in outputs]
    if len(set(shapes)) != 1:
        raise ValueError(f"{what}: blocks of one layer must give outputs of one shape, "
                         f"got {shapes}")
    return jnp.stack(outputs)


def _prune(layers: list[list[nnx.Module]], tree: BranchTree, task_names: Sequence[str]
           ) -> tuple[list[list[int]], tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Blocks each task reaches, and the tree's parent indices renumbered among them.

    Returns ``(kept, parents, heads)``: ``kept[l]`` the sorted original indices of the
    blocks kept in layer ``l``; ``parents[l - 1][i]`` the position, among the kept
    blocks of layer ``l - 1``, of kept block ``i`` of layer ``l``'s parent; ``heads``
    the position of each head's parent (tasks in sorted order).
    """
    if not isinstance(tree, BranchTree):
        raise TypeError(f"LTB: `tree` must be a BranchTree, got {type(tree).__name__}")
    if len(tree.parents) != len(layers) - 1:
        raise ValueError(f"LTB: the tree has {len(tree.parents)} branching layers, the "
                         f"blocks {len(layers) - 1}")
    for depth, row in enumerate(tree.parents, start=1):
        fits = all(0 <= p < len(layers[depth - 1]) for p in row)
        if len(row) != len(layers[depth]) or not fits:
            raise ValueError(f"LTB: the tree's parents of layer {depth} ({row}) do not fit "
                             f"{len(layers[depth])} blocks with {len(layers[depth - 1])} "
                             "parents")
    _common.check_same_task_names(task_names, tree.heads, what="LTB: `tree.heads`",
                                  reference="`heads`")
    if any(not 0 <= tree.heads[t] < len(layers[-1]) for t in task_names):
        raise ValueError(f"LTB: the tree's head parents {tree.heads} do not fit the last "
                         f"layer's {len(layers[-1])} blocks")
    reached = [set() for _ in layers]
    reached[-1] = {tree.heads[t] for t in task_names}
    for depth in range(len(layers) - 1, 0, -1):
        reached[depth - 1] = {tree.parents[depth - 1][i] for i in reached[depth]}
    kept = [sorted(r) for r in reached]
    position = [{orig: pos for pos, orig in enumerate(k)} for k in kept]
    parents = tuple(tuple(position[d - 1][tree.parents[d - 1][i]] for i in kept[d])
                    for d in range(1, len(layers)))
    heads = tuple(position[-1][tree.heads[t]] for t in task_names)
    return kept, parents, heads
