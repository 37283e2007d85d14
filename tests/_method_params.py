"""Methods with valid hyperparameters for tests over every method.

The table itself is :func:`jmtl.testing.example_hparams`, shared with the benchmarks.
"""

from __future__ import annotations

from jmtl.testing import build_example


def build(name: str, num_tasks: int):
    """The registered method ``name`` with valid hyperparameters for ``num_tasks`` tasks."""
    return build_example(name, num_tasks)
