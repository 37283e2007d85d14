"""Input checks shared by objectives, methods and the engine.

Two kinds: *static* checks raise at once when values are concrete (not traced);
*runtime* checks are traced only while a function wrapped by :func:`checked` is being
traced, so ordinary jitted steps pay nothing for them (a
:func:`jax.experimental.checkify.debug_check` left in every step cost about 0.1 ms per
check on XLA:CPU, more than a loss-weighting method's whole update).
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

__all__ = ["is_concrete", "runtime_check", "check_finite", "check_positive", "checked"]

# True while `checked` traces its function: runtime checks are emitted only then.
_TRACE_CHECKS = contextvars.ContextVar("jmtl_trace_checks", default=False)


def is_concrete(x) -> bool:
    """True when ``x`` holds values now (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def runtime_check(pred: jax.Array, message: str) -> None:
    """Records a runtime check of ``pred`` when traced under :func:`checked`, else nothing."""
    if _TRACE_CHECKS.get():
        checkify.debug_check(pred, message)


def _names(k: int, names: Sequence[str] | None) -> Sequence[str]:
    return names if names is not None else [f"task {i}" for i in range(k)]


def check_finite(values: jax.Array, *, method: str, what: str = "losses",
                 names: Sequence[str] | None = None) -> None:
    """Raises (concrete) or records a runtime check (traced) that ``values`` are finite."""
    if is_concrete(values):
        arr = np.asarray(values)
        bad = ~np.isfinite(arr)
        if bad.any():
            nm = _names(arr.shape[0], names)
            tasks = [nm[i] for i in np.flatnonzero(bad.reshape(arr.shape[0], -1).any(axis=1))]
            raise ValueError(f"{method}: non-finite {what} for task(s) {tasks}")
        return
    runtime_check(jnp.all(jnp.isfinite(values)), f"{method}: non-finite {what}")


def check_positive(values: jax.Array, *, method: str, what: str = "losses",
                   names: Sequence[str] | None = None, where: jax.Array | None = None) -> None:
    """Raises (concrete) or records a runtime check (traced) that ``values > 0``.

    ``where`` (bool, same shape) restricts the check, e.g. to tasks present in the batch.
    """
    if is_concrete(values) and (where is None or is_concrete(where)):
        arr = np.asarray(values)
        mask = np.ones(arr.shape, bool) if where is None else np.asarray(where, bool)
        bad = (~(arr > 0)) & mask
        if bad.any():
            nm = _names(arr.shape[0], names)
            tasks = [f"{nm[i]}={float(arr[i])!r}" for i in np.flatnonzero(bad)]
            raise ValueError(
                f"{method}: {what} must be positive (the method takes their logarithm); "
                f"got {', '.join(tasks)}"
            )
        return
    ok = values > 0 if where is None else (values > 0) | ~where
    runtime_check(jnp.all(ok), f"{method}: {what} must be positive (log-based method)")


def _throw(err) -> None:
    err.throw()


def checked(fn):
    """Wraps ``fn`` so jmtl's runtime input checks raise.

    Returns a function with ``fn``'s signature that raises
    ``checkify.JaxRuntimeError`` naming the method when a runtime check fails (NaN or
    non-positive losses given to a log-based method, a non-finite Gramian, ...). It
    works with ``jax.jit`` inside (``checked(jit(f))``: the error is raised when the
    call returns) or outside (``jit(checked(f))``: raised from a host callback when the
    step runs, as a ``JaxRuntimeError`` carrying the same message). The checks are traced
    only inside ``checked``: a jitted function that was already traced outside it is reused from
    JAX's cache without them, so wrap a fresh function.

    Examples:
      >>> import jax, jax.numpy as jnp, jmtl
      >>> f = jmtl.checked(jax.jit(lambda l: jmtl.objectives.log_sum(l)))
      >>> float(f({"a": jnp.float32(1.0)}))
      0.0
    """
    inner = checkify.checkify(fn, errors=checkify.user_checks)

    def wrapper(*args, **kwargs):
        token = _TRACE_CHECKS.set(True)
        try:
            err, out = inner(*args, **kwargs)
        finally:
            _TRACE_CHECKS.reset(token)
        if any(not is_concrete(x) for x in jax.tree_util.tree_leaves(err)):
            # Inside an outer ``jit``: the error is only known when the step runs, so it
            # is raised from a host callback (a ``JaxRuntimeError`` carrying the message).
            jax.debug.callback(_throw, err)
        else:
            err.throw()
        return out

    return wrapper
