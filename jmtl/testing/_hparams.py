"""Example hyperparameters for the methods that cannot be built without some."""

from __future__ import annotations

from typing import Any

from jmtl.methods import base


def example_hparams(name: str, num_tasks: int = 3) -> dict[str, Any]:
    """Valid example hyperparameters for method ``name`` with ``num_tasks`` tasks.

    Most methods have the papers' defaults for every hyperparameter and get ``{}``.
    The few without defaults get: ``weighted``: weights ``1, 1.5, 2, ...`` rescaled to
    sum to 1 (not uniform, so that ``weighted`` differs from ``mean``); ``krum``: the
    largest number of Byzantine tasks it tolerates, ``max((K - 3) // 2, 0)``;
    ``trimmed_mean``: ``max(1, (K - 1) // 4)`` trimmed on each side when ``K >= 3``
    (``0`` below). This one table is shared by the tests and the benchmarks.

    Args:
      name: a registered method name (``jmtl.methods.names()``).
      num_tasks: the number of tasks K the method will see.

    Returns:
      A dict of keyword arguments for ``jmtl.methods.get(name, **hparams)``.

    Raises:
      ValueError: ``name`` is not registered.

    Examples:
      >>> from jmtl.testing import example_hparams
      >>> example_hparams("krum", 7), example_hparams("upgrad")
      ({'n_byzantine': 2}, {})
      >>> [round(w, 3) for w in example_hparams("weighted", 3)["weights"]]
      [0.222, 0.333, 0.444]
    """
    base.factory(name)  # ValueError listing the valid names
    k = int(num_tasks)
    if name == "weighted":
        raw = [1.0 + 0.5 * i for i in range(k)]
        return {"weights": [w / sum(raw) for w in raw]}
    if name == "krum":
        return {"n_byzantine": max((k - 3) // 2, 0)}
    if name == "trimmed_mean":
        return {"trim_number": max(1, (k - 1) // 4) if k >= 3 else 0}
    return {}


def build_example(name: str, num_tasks: int = 3) -> base.Method:
    """The registered method ``name`` built with :func:`example_hparams`.

    Examples:
      >>> from jmtl.testing import build_example
      >>> build_example("trimmed_mean", 5)
      jmtl.trimmed_mean(trim_number=1)
    """
    return base.get(name, **example_hparams(name, num_tasks))
