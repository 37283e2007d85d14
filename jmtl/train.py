"""A ready, jittable multi-task train step.

:func:`make_train_step` composes the layers of jmtl for users who want one
function: the model's forward pass, per-task (masked) losses, the presence mask of
partially labelled batches, :func:`jmtl.value_and_mtl_grad` with a balancing method
(params or features mode, optionally reduced over a ``pmap`` / ``shard_map`` axis),
and an optax update. Everything lives in a :class:`TrainState` pytree, so the step is
a pure function ``(state, batch) -> (state, metrics)`` that one ``jax.jit`` compiles
once, and the state can be donated, sharded and checkpointed.

Anything more specific is a few lines with :func:`jmtl.value_and_mtl_grad` and optax
directly: the step is exactly that composition (a test checks it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jmtl import engine as engine_lib
from jmtl import losses as losses_lib
from jmtl import tasks as tasks_lib
from jmtl.methods import base

__all__ = ["TrainState", "make_train_step"]


class TrainState(NamedTuple):
    """Everything a train step reads and writes (a pytree of arrays).

    Attributes:
      params: the trainable parameters (a Linen-style dict, or for an NNX model the pure
        ``nnx.State`` of its ``nnx.Param`` variables).
      opt_state: the optax state.
      method_state: the balancing method's state.
      step: int32 number of steps taken.
      model_state: an NNX model's other variables (batch statistics, RNG counters) as a
        pure ``nnx.State``; ``None`` for an apply function.
      key: optional base PRNG key; step ``t`` uses ``jax.random.fold_in(key, t)`` when no
        key is passed to the step.
    """

    params: Any
    opt_state: Any
    method_state: Any
    step: jax.Array
    model_state: Any = None
    key: jax.Array | None = None


def _accepts_mask(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def make_train_step(model: Any, task_losses: Mapping[str, Callable], method: base.Method,
                    tx: optax.GradientTransformation, *, params: Any = None,
                    shared: Any = True, encoder: Callable | None = None,
                    heads: Callable | None = None, axis_name: Any = None,
                    **engine_kwargs: Any) -> Callable[..., tuple[TrainState, dict]]:
    """Builds ``step(state, inputs, targets, masks=None, *, key=None, present=None)``.

    The model maps ``inputs`` to ``{task: prediction}``; ``task_losses[task]`` maps
    ``(prediction, target)`` (or ``(prediction, target, mask)`` when the task has a
    label mask, e.g. :func:`jmtl.losses.masked_cross_entropy`) to a scalar. The step
    computes the per-task losses, the gradient of :func:`jmtl.value_and_mtl_grad` with
    ``method``, applies ``tx`` and returns the new state and metrics.

    Args:
      model: a Flax NNX module (called as ``model(inputs)``), or an apply function
        ``apply_fn(params, inputs) -> {task: prediction}`` (e.g. a Linen module's
        ``lambda p, x: net.apply({"params": p}, x)``) together with ``params=``.
      task_losses: ``{task: loss_fn}``; the tasks must be those the model predicts.
      method: a balancing method, e.g. ``jmtl.upgrad()``.
      tx: an optax transformation (e.g. from :func:`jmtl.optim.partitioned_lr`); for an
        NNX model it sees the pure ``nnx.State`` of the parameters.
      params: the initial parameters of an apply function (not used with NNX).
      shared: params mode: which parameters are shared between tasks: ``True`` (all, the
        default), a path rule or list of path rules as in :func:`jmtl.optim.label_tree`
        (``"trunk"``, ``"encoder/*"``, ``lambda path, leaf: ...``), or a boolean prefix
        pytree of a params dict.
      encoder: features mode: ``encoder(model_or_params, inputs) -> z``, the shared
        representation; with ``heads(model_or_params, z) -> {task: prediction}``. The
        method then sees the Jacobian w.r.t. ``z`` (see :func:`jmtl.value_and_mtl_grad`).
      heads: features mode: see ``encoder``. With an NNX model, changes the encoder
        makes to non-parameter variables (batch statistics) are not kept in features
        mode; those the heads make are.
      axis_name: the ``pmap`` / ``shard_map`` axis over which the engine averages (each
        replica computes shard-mean losses on equally sized shards).
      **engine_kwargs: further arguments of :func:`jmtl.value_and_mtl_grad`
        (``chunk_size``, ``norm_params``, ``final_step``).

    Returns:
      ``step``, a pure function (wrap it with ``jax.jit``) returning
      ``(new_state, metrics)``; ``metrics`` holds ``"losses"`` (``{task: loss}``),
      ``"loss"`` (their sum), ``"grad_norm"`` (global norm of the gradient given to
      ``tx``), ``"present"`` (``{task: bool}``) and, for a weighting method, ``"weights"``
      (``{task: w}``, the shared gradient is ``sum_i w_i ∇L_i``). It has attributes:

      * ``step.init(inputs, targets, masks=None, *, key=None) -> TrainState`` (example
        batch, used for shapes only);
      * ``step.model(state)``: the NNX module with the state's variables (NNX only);
      * ``step.grad_fn``: the underlying :func:`jmtl.value_and_mtl_grad` function, whose
        loss function is ``(params, inputs, targets, masks)`` (NNX: returns
        ``(losses, model_state)`` as aux, and the model state is closed over).

      ``masks`` is ``{task: label mask}`` for the partially labelled tasks (other tasks
      count as fully labelled); unless ``present`` is given, a task whose mask is empty
      in the batch is absent for the method. ``key`` feeds randomised methods.

    Raises:
      ValueError: the model's tasks differ from ``task_losses`` (naming them), ``params``
        is missing for an apply function, or a bad features-mode combination.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jmtl
      >>> from jmtl.train import make_train_step
      >>> def apply_fn(p, x):
      ...     h = jnp.tanh(x @ p["trunk"])
      ...     return {"a": h @ p["a"], "b": h @ p["b"]}
      >>> params = {"trunk": jnp.full((3, 4), 0.1), "a": jnp.ones(4), "b": -jnp.ones(4)}
      >>> mse = lambda pred, y: jnp.mean((pred - y) ** 2)
      >>> step = make_train_step(apply_fn, {"a": mse, "b": mse}, jmtl.mean(),
      ...                        optax.sgd(0.1), params=params, shared="trunk")
      >>> x, y = jnp.ones((8, 3)), {"a": jnp.zeros(8), "b": jnp.ones(8)}
      >>> state = step.init(x, y)
      >>> state, metrics = jax.jit(step)(state, x, y)
      >>> sorted(metrics["losses"]), int(state.step)
      (['a', 'b'], 1)

    References:
      Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
    """
    if not isinstance(method, base.Method):
        raise TypeError(f"make_train_step: `method` must be a jmtl Method (e.g. jmtl.mean()), "
                        f"got {type(method).__name__}")
    if (encoder is None) != (heads is None):
        raise ValueError("make_train_step: features mode needs both `encoder` and `heads`")
    features = encoder is not None
    if features and shared is not True:
        raise ValueError("make_train_step: `shared` is not used in features mode (the "
                         "encoder's parameters are the shared ones)")
    task_losses = dict(task_losses)
    with_mask = {t: _accepts_mask(f) for t, f in task_losses.items()}

    nnx = None
    try:
        from flax import nnx
    except ImportError:
        pass
    is_nnx = nnx is not None and isinstance(model, nnx.Module)

    if is_nnx:
        if params is not None:
            raise ValueError("make_train_step: `params` is not used with an NNX model (its "
                             "nnx.Param variables are the parameters)")
        graphdef, p0, rest0 = nnx.split(model, nnx.Param, ...)
        p0, rest0 = nnx.as_pure(p0), nnx.as_pure(rest0)

        def live(p, rest):
            return nnx.merge(graphdef, p, rest)

        def other_state(m):
            return nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param)))
    else:
        if not callable(model):
            raise TypeError("make_train_step: `model` must be an NNX module or an apply "
                            f"function, got {type(model).__name__}")
        if params is None:
            raise ValueError("make_train_step: an apply function needs `params=`")
        p0, rest0 = params, None

    def task_loss_values(preds, targets, masks):
        tasks_lib.check_same_tasks(task_losses, preds, what_a="task_losses",
                                   what_b="model predictions")
        tasks_lib.check_same_tasks(task_losses, targets, what_a="task_losses",
                                   what_b="targets")
        masks = {} if masks is None else masks
        unknown = sorted(set(masks) - set(task_losses))
        if unknown:
            raise ValueError(f"make_train_step: masks name unknown task(s) {unknown}; tasks "
                             f"are {sorted(task_losses)}")
        out = {}
        for t, fn in task_losses.items():
            if t in masks:
                if not with_mask[t]:
                    raise ValueError(f"make_train_step: task '{t}' has a label mask but its "
                                     "loss takes no mask argument (use e.g. jmtl.losses."
                                     "masked_mse)")
                out[t] = fn(preds[t], targets[t], masks[t])
            else:
                out[t] = fn(preds[t], targets[t])
        return out

    # The engine's loss function(s): args are (inputs, targets, masks).
    if is_nnx:
        def make_fns(rest):
            if not features:
                def loss_fn(p, inputs, targets, masks):
                    m = live(p, rest)
                    return task_loss_values(m(inputs), targets, masks), other_state(m)
                return dict(loss_fn=loss_fn)

            def enc(p, inputs, targets, masks):
                return encoder(live(p, rest), inputs)

            def heads_loss(p, z, inputs, targets, masks):
                m = live(p, rest)
                return task_loss_values(heads(m, z), targets, masks), other_state(m)
            return dict(loss_fn=heads_loss, encoder=enc)
        has_aux = True
    else:
        def make_fns(rest):
            del rest
            if not features:
                def loss_fn(p, inputs, targets, masks):
                    return task_loss_values(model(p, inputs), targets, masks)
                return dict(loss_fn=loss_fn)

            def enc(p, inputs, targets, masks):
                return encoder(p, inputs)

            def heads_loss(p, z, inputs, targets, masks):
                return task_loss_values(heads(p, z), targets, masks)
            return dict(loss_fn=heads_loss, encoder=enc)
        has_aux = False

    engine_shared = True if features else shared

    def build_grad_fn(rest):
        fns = make_fns(rest)
        kw = dict(engine_kwargs)
        if features:
            kw["encoder"] = fns["encoder"]
        else:
            kw["shared"] = engine_shared
        return engine_lib.value_and_mtl_grad(fns["loss_fn"], method, has_aux=has_aux,
                                             axis_name=axis_name, return_weights=True, **kw)

    def presence_of(masks):
        pres = {t: jnp.array(True) for t in task_losses}
        if masks:
            pres.update(losses_lib.presence(dict(masks)))
        return pres

    def init(inputs, targets, masks=None, *, key=None) -> TrainState:
        grad_fn = build_grad_fn(rest0)
        method_state = grad_fn.init(p0, inputs, targets, masks)
        state = TrainState(params=p0, opt_state=tx.init(p0), method_state=method_state,
                           step=jnp.zeros((), jnp.int32), model_state=rest0, key=key)
        # Fresh, distinct buffers: the state can be donated (``jax.jit(step,
        # donate_argnums=0)``) even where an init shares one array between two leaves,
        # and donating it does not invalidate the caller's params.
        return jax.tree.map(lambda a: jnp.array(a, copy=True), state)

    def step(state: TrainState, inputs, targets, masks=None, *, key=None,
             present=None) -> tuple[TrainState, dict]:
        grad_fn = build_grad_fn(state.model_state)
        if key is None and state.key is not None:
            key = jax.random.fold_in(state.key, state.step)
        if present is None:
            present = presence_of(masks)
        out, grads, method_state, weights = grad_fn(
            state.params, state.method_state, inputs, targets, masks, key=key, present=present)
        task_losses_out, model_state = out if has_aux else (out, state.model_state)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_state = TrainState(params=new_params, opt_state=opt_state,
                               method_state=method_state, step=state.step + 1,
                               model_state=model_state, key=state.key)
        pres_vec = tasks_lib.presence_mask(task_losses_out, present)
        metrics = {
            "losses": task_losses_out,
            "loss": jnp.sum(tasks_lib.stack(task_losses_out)),
            "grad_norm": optax.tree.norm(grads),
            "present": tasks_lib.unstack(pres_vec, task_losses_out),
        }
        if weights is not None:
            metrics["weights"] = weights
        return new_state, metrics

    def as_model(state: TrainState):
        if not is_nnx:
            raise ValueError("make_train_step: step.model(state) is for NNX models; an apply "
                             "function's parameters are state.params")
        return nnx.merge(graphdef, state.params, state.model_state)

    step.init = init
    step.model = as_model
    step.grad_fn = build_grad_fn(rest0)
    return step
