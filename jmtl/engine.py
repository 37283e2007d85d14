"""``jmtl.value_and_mtl_grad``: per-task gradients, the Gramian and the method's update.

The engine does the calculus of one multi-task training step, in the style of
:func:`jax.value_and_grad`:

* **one forward pass** (:func:`jax.vjp`);
* the per-task Jacobian of the *shared* quantities by ``vmap`` over the VJP with
  one-hot cotangents (never K separate backward passes; each dense layer's weight
  gradient one GEMM over all tasks, :mod:`jmtl._task_vmap`), optionally in chunks of tasks
  (``chunk_size``);
* only what the method declares in ``method.needs``: a method that needs only the
  losses (or nothing, or a key) costs one ordinary backward pass with its weights as
  cotangent and no Jacobian at all;
* the Gramian ``J Jᵀ`` of rows pre-scaled by a power of two, accumulated over leaves
  in float32 (:func:`jmtl.jacobian.scaled_gramian`: finite for |J| from 1e-20 to
  1e20), gradient norms of a chosen parameter subset, the method's update (one guarded
  call, :mod:`jmtl._method_call`), and the final gradient.

Two modes:

* **params mode** (``value_and_mtl_grad(loss_fn, method, shared=...)``): the Jacobian
  is taken with respect to the shared parameters.
* **features mode** (``value_and_mtl_grad(heads_loss_fn, method, encoder=encode)``):
  the Jacobian is taken with respect to a shared representation
  ``z = encode(params, *args)`` through the heads only, then one backward pass through
  the encoder carries the method's combination ``sum_i w_i dL_i/dz`` (MGDA-UB's
  representation-level Jacobian; torchjd's ``mtl_backward`` differentiates with
  respect to the shared parameters instead, like params mode). It costs about one
  extra pass through the heads per task instead of one through the whole network.

Final step. In params mode, when the full Jacobian of the shared parameters is in
memory (no ``chunk_size``), the shared gradient is the weighted contraction
:func:`jmtl.jacobian.combine` of its rows; otherwise (chunked Gramian-only methods,
``GRAD_NORMS``-only and loss-only methods) it is one more VJP with the weights as
cotangent, so the K x P Jacobian is never materialised. In features mode the default
is one more VJP through the heads (cheap), whose ``z``-cotangent also feeds the
encoder. ``final_step`` overrides this. On the benchmark MLP of docs/architecture.md (trunk
64-256-256, K linear heads, batch 256, one CPU thread) the contraction was as fast as
or slightly faster than the extra VJP in params mode at K=8 and K=32, and the VJP
faster in features mode.

Layout (see ``docs/architecture.md``): this module validates the arguments and
dispatches; :mod:`jmtl._paths` holds the parameter-path grammar, :mod:`jmtl._linearise`
builds the linearised step of each mode, :mod:`jmtl._jacobian_pass` the plan and the
chunking strategies, :mod:`jmtl._replicas` the ``axis_name`` plumbing and
:mod:`jmtl._driver` the one driver.

Cost note: the one-hot cotangents stay one-hot through the loss and the heads
(:mod:`jmtl._task_vmap`), so a task's row never pays for the other tasks' heads:
stacked heads (one ``(width, K)`` matrix) cost one outer product per task, separate
heads one head's backward pass per task (not K x K, as a plain ``vmap`` would).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from jmtl import _driver, _jacobian_pass, _linearise, _paths
from jmtl import tasks as tasks_lib
from jmtl._jacobian_pass import AUTO_FEATURES_CHUNK
from jmtl.methods import base

__all__ = ["value_and_mtl_grad", "num_shared", "shared_mask", "GradFn", "AUTO_FEATURES_CHUNK"]


def shared_mask(params: Any, shared: Any = True) -> Any:
    """The boolean pytree (like ``params``) of the parameters that ``shared`` marks shared.

    Args:
      params: the parameter pytree (a dict, ``FrozenDict``, ``nnx.State``, ...).
      shared: as in :func:`value_and_mtl_grad`: a bool, a boolean prefix of ``params``
        (``{"trunk": True, "heads": False}``, plain nested dicts match any Mapping by
        key names), path rules (``"trunk"``, ``["trunk/*", "*/bias"]``) or a callable
        ``(path: str, leaf) -> bool``.

    Returns:
      A pytree with the structure of ``params`` and Python bool leaves.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"heads": {"a": jnp.ones(2)}, "trunk": jnp.ones((2, 2))}
      >>> shared_mask(params, {"trunk": True, "heads": False})
      {'heads': {'a': False}, 'trunk': True}
      >>> shared_mask(params, "trunk")
      {'heads': {'a': False}, 'trunk': True}
    """
    mask = _paths.selection(shared, params, what="shared", caller="shared_mask")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), mask)


def num_shared(params: Any, shared: Any = True) -> int:
    """The number of shared parameter entries ``d`` (for ``method.init(K, dim=d)``).

    Methods with per-parameter state (``moco``, ``excess_mtl``, ``db_mtl``) need it.
    In features mode the dimension is instead the number of entries of the shared
    representation ``z`` for the whole batch; ``grad_fn.init(params, *args)`` (see
    :func:`value_and_mtl_grad`) computes either one for you.

    Args:
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      shared: as in :func:`value_and_mtl_grad`.

    Returns:
      A Python int.

    Examples:
      >>> import jax.numpy as jnp
      >>> num_shared({"heads": jnp.ones(3), "trunk": jnp.ones((4, 5))}, {"trunk": True,
      ...                                                               "heads": False})
      20
    """
    mask = _paths.selection(shared, params, what="shared", caller="num_shared")
    sizes = [int(np.prod(np.shape(x), dtype=np.int64)) for x in jax.tree_util.tree_leaves(params)]
    return int(sum(n for n, m in zip(sizes, mask, strict=True) if m))


class GradFn:
    """What :func:`value_and_mtl_grad` returns: call it like a function (or ``jax.jit`` it).

    Attributes:
      init: ``init(params, *args) -> state``: ``method.init(K, dim=d)`` with K and ``d``
        found by :func:`jax.eval_shape`.
      method: the method.
      has_aux: whether the loss function returns ``(losses, aux)``.
      return_weights: whether a fourth output, the weights, is returned.
    """

    __slots__ = ("_step", "init", "method", "has_aux", "return_weights", "__weakref__")

    def __init__(self, step: Callable[..., Any], init: Callable[..., Any],
                 method: base.Method, has_aux: bool = False, return_weights: bool = False):
        self._step, self.init, self.method = step, init, method
        self.has_aux, self.return_weights = has_aux, return_weights

    def __call__(self, params, state, *args, key=None, present=None):
        res = self._step(params, state, args, key=key, present=present)
        losses = (res.losses, res.aux) if self.has_aux else res.losses
        if self.return_weights:
            return losses, res.grads, res.state, res.weights
        return losses, res.grads, res.state

    def __repr__(self) -> str:
        return f"GradFn(method={self.method!r}, has_aux={self.has_aux})"


class _Result(NamedTuple):
    losses: Any
    grads: Any
    state: Any
    weights: Any
    aux: Any


def _check_args(method, final_step, chunk_size, encoder, shared, norm_params,
                task_batching) -> None:
    if not isinstance(method, base.Method):
        raise TypeError(f"value_and_mtl_grad: `method` must be a jmtl Method (e.g. "
                        f"jmtl.upgrad()), got {type(method).__name__}")
    if final_step not in _jacobian_pass.FINAL_STEPS:
        raise ValueError(f"value_and_mtl_grad({method.name}): final_step must be one of "
                         f"{_jacobian_pass.FINAL_STEPS}, got {final_step!r}")
    if task_batching not in _jacobian_pass.TASK_BATCHINGS:
        raise ValueError(f"value_and_mtl_grad({method.name}): task_batching must be one of "
                         f"{_jacobian_pass.TASK_BATCHINGS}, got {task_batching!r}")
    if chunk_size != _jacobian_pass.AUTO and chunk_size is not None and (
            not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"value_and_mtl_grad({method.name}): chunk_size must be a positive "
                         f"int, None or 'auto', got {chunk_size!r}")
    if encoder is not None:
        if shared is not True:
            raise ValueError(f"value_and_mtl_grad({method.name}): `shared` is not used in "
                             "features mode (the encoder's parameters are the shared ones)")
        if norm_params is not None:
            raise ValueError(f"value_and_mtl_grad({method.name}): `norm_params` is not used "
                             "in features mode (gradient norms are those of dL_i/dz)")


def _norm_mask(method, params, mask, norm_params):
    """One bool per shared leaf: the rows whose norms the method reads (or ``None``)."""
    if base.GRAD_NORMS not in method.needs:
        return None
    if norm_params is None:
        return [True] * sum(mask)
    nm = _paths.selection(norm_params, params, what="norm_params")
    paths = [p for p, _ in _paths.leaf_items(params)]
    bad = [paths[i] for i, (n, s) in enumerate(zip(nm, mask, strict=True)) if n and not s]
    if bad:
        raise ValueError(f"value_and_mtl_grad({method.name}): norm_params selects "
                         f"task-specific parameters {bad}; they must be shared")
    out = [n for n, s in zip(nm, mask, strict=True) if s]
    if not any(out):
        raise ValueError(f"value_and_mtl_grad({method.name}): norm_params selects no parameter")
    return out


def _low_precision(leaves) -> bool:
    return any(not np.issubdtype(x.dtype, np.floating) or np.finfo(x.dtype).bits < 32
               for x in leaves)


def _run(loss_fn, encoder, method, params, state, args, *, key, present, shared, has_aux,
         axis_name, chunk_size, norm_params, final_step, task_batching):
    name = method.name
    if encoder is None:
        mask = _paths.selection(shared, params, what="shared")
        lin = _linearise.params_mode(loss_fn, params, args, shared=mask, has_aux=has_aux,
                                     axis_name=axis_name, name=name)
        norm_mask = _norm_mask(method, params, mask, norm_params)
    else:
        lin = _linearise.features_mode(loss_fn, encoder, params, args, has_aux=has_aux,
                                       axis_name=axis_name, name=name)
        norm_mask = [True] * len(lin.x) if base.GRAD_NORMS in method.needs else None
    plan = _jacobian_pass.make_plan(method, features=encoder is not None,
                                    final_step=final_step, chunk_size=chunk_size,
                                    low_precision_x=_low_precision(lin.x),
                                    replicated=axis_name is not None,
                                    batching=task_batching)
    res = _driver.step(lin, method, state, plan, key=key, present=present, norm_mask=norm_mask)
    return _Result(res.losses, res.grads, res.state, res.weights, lin.aux)


def value_and_mtl_grad(loss_fn: Callable[..., Any], method: base.Method, *,
                       shared: Any = True, encoder: Callable[..., Any] | None = None,
                       has_aux: bool = False, axis_name: Any = None,
                       chunk_size: int | str | None = "auto", norm_params: Any = None,
                       final_step: str = "auto", return_weights: bool = False,
                       task_batching: str = "gemm") -> GradFn:
    """Builds ``grad_fn(params, state, *args, key=None, present=None)`` for one MTL step.

    ``grad_fn`` returns ``(losses, grads, new_state)`` (``((losses, aux), grads,
    new_state)`` with ``has_aux=True``), like :func:`jax.value_and_grad` plus the
    method's state. ``grads`` has the structure and dtypes of ``params``:

    * **shared** parameters receive the method's update (``sum_i w_i ∇L_i`` for a
      weighting method, the method's direction for a non-linear aggregator);
    * **task-specific** parameters receive ``sum_i c_i ∇L_i`` with ``c_i = w_i`` when
      ``method.weights_task_specific`` (loss-weighting methods, whose weights define the
      objective) and ``c_i = 1`` (0 for absent tasks) otherwise (gradient aggregators:
      each head gets its own task's unweighted gradient).

    ``losses`` is the loss pytree returned by ``loss_fn`` (averaged over ``axis_name``).

    **Params mode** (``encoder=None``): ``loss_fn(params, *args) -> {task: scalar}``;
    ``shared`` says which parameters are shared.

    **Features mode** (``encoder`` given): ``encoder(params, *args) -> z`` computes the
    shared representation (any pytree, e.g. ``(batch, features)``) and
    ``loss_fn(params, z, *args) -> {task: scalar}`` applies the heads. The method sees
    the Jacobian of the losses with respect to ``z`` (flattened over batch and features;
    ``d`` is the number of entries of ``z``) and the encoder gets one backward pass with
    cotangent ``sum_i w_i ∂L_i/∂z`` (or the method's direction). Parameters read by the
    encoder are the shared ones; parameters read by the heads are task-specific. A
    parameter read by both gets the sum of the two contributions: the encoder's
    backward pass with the method's cotangent plus its head part ``sum_i c_i ∂L_i/∂θ``
    (with ``z`` held fixed). ``shared`` and ``norm_params`` must not be given in
    features mode; gradient norms are those of ``∂L_i/∂z``.

    Only what ``method.needs`` declares is computed. A method that needs only the
    losses, a key or nothing (``ew``, ``uw``, ``dwa``, ``rlw``, ...) costs one ordinary
    backward pass with the weights as cotangent. Otherwise the per-task Jacobian of the
    shared quantities is one ``vmap`` over the VJP with one-hot cotangents after one
    forward pass, and the Gramian is accumulated in float32.

    Absent tasks (``present``) get weight 0; their Jacobian rows are zeroed with
    ``jnp.where`` (a NaN row of an absent task does not leak into the Gramian). In the
    backward passes their cotangent is 0, so their loss must still be finite (a masked
    loss that returns 0 on an empty batch, not 0/0).

    Parallelism (``axis_name`` under ``jax.pmap`` / ``jax.shard_map``): every replica
    runs ``loss_fn`` on its shard, which must return the shard's *mean* loss, shards of
    equal size. In params mode the per-task Jacobians are averaged with ``lax.pmean``
    before the method sees them (and the losses too), so every replica computes the
    same weights and state and the grads equal the single-device grads on the whole
    batch. In features mode each replica's ``∂L_i/∂z`` concerns its own examples: the
    whole-batch Jacobian is the concatenation of the replicas' ones divided by the
    number of replicas ``R`` (the whole-batch loss is the mean of the replica losses),
    so the Gramian is ``psum(G_r) / R²``, a method needing the explicit Jacobian sees
    the ``all_gather`` of the flattened rows (replica-major) divided by ``R``, and each
    replica back-propagates its own block of the combination through its encoder;
    encoder and head grads are then ``pmean``-ed. For loss-only methods the losses are
    averaged before the method and the final gradient afterwards. ``key`` and
    ``present`` must be the same on every replica (``present`` is OR-ed across them);
    ``aux`` is returned per replica, unreduced.

    Mixed precision: parameters may be bf16/f16. The Gramian, the method's inputs and
    its state are float32; grads are returned in each parameter's dtype.

    Args:
      loss_fn: params mode: ``loss_fn(params, *args) -> {task: scalar}``; features mode:
        ``loss_fn(params, z, *args) -> {task: scalar}``. With ``has_aux``, returns
        ``({task: scalar}, aux)``. Tasks are stacked in pytree flattening order.
      method: a :class:`~jmtl.methods.base.Method`, e.g. ``jmtl.mgda()``.
      shared: params mode, which parameters are shared. One of

        * a boolean prefix of ``params``: ``{"trunk": True, "heads": False}``. Plain
          nested dicts (and lists) also match other Mapping containers (an
          ``nnx.State`` from ``nnx.split(model, nnx.Param)``, a ``FrozenDict``) by key
          names; every parameter must be covered and every entry must name one;
        * path rules like :func:`jmtl.optim.label_tree`'s, a string or a list of
          strings selecting the shared parameters by their ``"/"``-joined path (see
          :func:`jmtl.optim.param_paths`): a plain string is a prefix on whole path
          components (``"trunk"`` matches ``"trunk/kernel"``, not ``"trunk2/kernel"``),
          one with ``*``, ``?`` or ``[`` an :mod:`fnmatch` glob on the whole path
          (``"trunk/*"``, ``"*/bias"``); a rule that matches no parameter is an error;
        * a callable ``(path, leaf) -> bool`` with ``path`` the ``"/"``-joined string
          ``"trunk/layers/0/kernel"`` (the grammar of :mod:`jmtl._paths`, the same in
          :func:`jmtl.optim.label_tree` and :func:`jmtl.train.make_train_step`);
        * ``True`` (the default: every parameter is shared, which is correct but
          computes the heads' Jacobian rows too).
      encoder: features mode: ``encoder(params, *args) -> z``.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      axis_name: the ``pmap`` / ``shard_map`` axis to reduce over, or ``None``.
      chunk_size: compute the Jacobian ``chunk_size`` tasks at a time (``lax.map`` over
        chunks), bounding the memory of the vmapped backward pass. With a method that
        needs only the Gramian (and/or gradient norms) the full Jacobian is never
        materialised: the Gramian's columns ``J J_cᵀ`` come from a forward-mode
        derivative along each chunk's rows (float32 models), or from recomputing the
        chunks pairwise (bf16/f16 models, so the Gramian stays float32-accurate); the
        final gradient is then a VJP with the weights as cotangent. ``"auto"`` (the
        default): no chunking in params mode; in features mode, chunks of
        :data:`AUTO_FEATURES_CHUNK` tasks when the method needs only the Gramian and/or
        norms, the representation is float32/float64 and there is no ``axis_name``
        (measured faster on XLA:CPU:
        at K=128 the forward-mode Gramian avoided a slow fusion of the materialised
        ``(K, batch, features)`` rows, about 6x; equal at K <= 8).
      norm_params: params mode: the shared parameters whose per-task gradient norms the
        method sees as ``GRAD_NORMS`` (GradNorm's last shared layer); any form that
        ``shared`` takes. Default: all shared parameters.
      final_step: ``"auto"``, ``"combine"`` (contract the Jacobian rows with the weights)
        or ``"vjp"`` (one more backward pass with the weights as cotangent). ``"auto"``
        contracts in params mode when the rows are in memory and uses a VJP otherwise
        (always a VJP through the heads in features mode). All give the same numbers.
      return_weights: ``grad_fn`` also returns ``{task: w_i}``, the weights such that
        the shared gradient is ``sum_i w_i ∇L_i`` (``None`` for a method whose output is
        a direction).
      task_batching: how the VJP is batched over the K one-hot cotangents. ``"gemm"``
        (the default, :mod:`jmtl._task_vmap`): ``jax.vmap``'s batching rules, with the
        task axis laid out so that a dense layer's weight and input gradients are one
        GEMM each over all tasks, one-hot cotangents kept one-hot, and (XLA:CPU) a
        cotangent read by two GEMMs written once (on the benchmark MLP at K = 32, a
        params-mode step took 40-45 ms against 64-74 ms with ``"vmap"``, with 26 MiB of
        temporary memory against 34); ``"vmap"``: plain ``jax.vmap``. Both give the
        same numbers.

    Returns:
      A :class:`GradFn`, called as ``grad_fn(params, state, *args, key=None,
      present=None)``; with ``return_weights=True`` it returns a fourth element, the
      weights. ``key`` is the PRNG key
      of randomised methods; ``present`` a ``(K,)`` bool mask, ``{task: bool}`` or a
      list of task names labelled in the batch (default: all). ``grad_fn.init(params,
      *args)`` returns ``method.init(K, dim=d)`` with K and ``d`` (number of shared
      parameters, or of entries of ``z`` for these whole-batch ``args`` in features
      mode) found by :func:`jax.eval_shape`.

    Raises:
      ValueError: a task's loss is not a scalar (naming the task), ``present`` names
        other tasks than the losses, a missing ``key`` for a randomised method, bad
        ``shared`` / ``norm_params``.

    Examples:
      Params mode, a trunk and two heads:

      >>> import jax, jax.numpy as jnp, jmtl
      >>> from jmtl.engine import value_and_mtl_grad
      >>> params = {"trunk": jnp.ones((3, 4)) / 4,
      ...           "heads": {"a": jnp.ones((4,)), "b": -jnp.ones((4,))}}
      >>> def loss_fn(p, x):
      ...     h = jnp.tanh(x @ p["trunk"])
      ...     return {t: jnp.mean((h @ w - 1.0) ** 2) for t, w in p["heads"].items()}
      >>> m = jmtl.mean()
      >>> grad_fn = jax.jit(value_and_mtl_grad(loss_fn, m,
      ...                                      shared={"trunk": True, "heads": False}))
      >>> losses, grads, state = grad_fn(params, m.init(2), jnp.ones((5, 3)))
      >>> sorted(losses), grads["trunk"].shape
      (['a', 'b'], (3, 4))

      Features mode with a Flax NNX model (functional params via ``nnx.split``):

      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.trunk = nnx.Linear(3, 8, rngs=rngs)
      ...         self.heads = nnx.Dict(a=nnx.Linear(8, 1, rngs=rngs),
      ...                               b=nnx.Linear(8, 1, rngs=rngs))
      >>> graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
      >>> def encode(p, x, y):
      ...     return nnx.relu(nnx.merge(graphdef, p).trunk(x))
      >>> def heads_loss(p, z, x, y):
      ...     heads = nnx.merge(graphdef, p).heads
      ...     return {t: jnp.mean((heads[t](z)[:, 0] - y[t]) ** 2) for t in ("a", "b")}
      >>> m = jmtl.mean()
      >>> grad_fn = jax.jit(value_and_mtl_grad(heads_loss, m, encoder=encode))
      >>> x, y = jnp.ones((4, 3)), {"a": jnp.zeros(4), "b": jnp.ones(4)}
      >>> losses, grads, state = grad_fn(params, m.init(2), x, y)
      >>> grads["trunk"]["kernel"][...].shape
      (3, 8)

    References:
      Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
      2018 (MGDA-UB: the Jacobian w.r.t. the shared representation).
      Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (torchjd's
      ``mtl_backward`` and Gramian-based aggregation).
    """
    _check_args(method, final_step, chunk_size, encoder, shared, norm_params, task_batching)
    if chunk_size == _jacobian_pass.AUTO and encoder is None:
        chunk_size = None
    run = functools.partial(_run, loss_fn, encoder, method, shared=shared, has_aux=has_aux,
                            axis_name=axis_name, chunk_size=chunk_size,
                            norm_params=norm_params, final_step=final_step,
                            task_batching=task_batching)

    def step(params, state, args, *, key=None, present=None):
        return run(params, state, args, key=key, present=present)

    def init(params, *args):
        if encoder is None:
            out = jax.eval_shape(lambda p, a: loss_fn(p, *a), params, args)
            dim = num_shared(params, shared)
        else:
            z = jax.eval_shape(lambda p, a: encoder(p, *a), params, args)
            out = jax.eval_shape(lambda p, zz, a: loss_fn(p, zz, *a), params, z, args)
            dim = _linearise.leaf_count_dim(z)
        losses, _ = _linearise.split_output(out, has_aux, method.name)
        return method.init(tasks_lib.num_tasks(losses), dim=dim)

    return GradFn(step=step, init=init, method=method, has_aux=has_aux,
                  return_weights=return_weights)
