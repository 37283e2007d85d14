"""Property tests for balancing methods, built-in or your own (chex underneath).

``check_method(method, properties=...)`` runs a method through :func:`jmtl.aggregate`
on generated Jacobians and raises an ``AssertionError`` naming the property, the input
and the numbers when a property fails. Every registered method declares the properties
it promises (``method.properties``, see :data:`jmtl.methods.base.PROPERTIES`), which is
what ``check_method`` checks by default.

:mod:`jmtl.testing.strategies` holds hypothesis strategies for Jacobians, loss pytrees
and presence masks. ``check_method`` needs ``chex`` and the strategies ``hypothesis``
(both test dependencies: ``pip install jmtl[test]``); importing ``jmtl`` needs neither.

:func:`example_hparams` gives valid hyperparameters for the few methods without
defaults (``weighted``, ``krum``, ``trimmed_mean``); the tests and benchmarks use it.

Examples:
  A custom method that follows task 0 only is not permutation-equivariant:

  >>> import jax.numpy as jnp, jmtl
  >>> from jmtl.methods import base
  >>> first = base.Method(name="first_task", init=base.stateless_init,
  ...                     update=lambda inp, s: (jnp.eye(inp.present.shape[0])[0], s),
  ...                     needs=frozenset())
  >>> jmtl.testing.check_method(first, properties=("finite", "jit_consistent"))
  ('jit_consistent', 'finite')
  >>> jmtl.testing.check_method(first, properties="permutation_equivariant")
  ... # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  AssertionError: jmtl.first_task() fails property 'permutation_equivariant' ...
"""

from jmtl.testing._check import PROPERTIES, SCALES, check_method
from jmtl.testing._hparams import build_example, example_hparams

__all__ = ["PROPERTIES", "SCALES", "build_example", "check_method", "example_hparams",
           "strategies"]


def __getattr__(name):
    # ``strategies`` needs hypothesis (a test dependency): imported on first use.
    if name == "strategies":
        import importlib

        return importlib.import_module("jmtl.testing.strategies")
    raise AttributeError(f"module 'jmtl.testing' has no attribute {name!r}")
