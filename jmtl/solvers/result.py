"""The result every iterative solver of :mod:`jmtl.solvers` returns besides its answer."""

from __future__ import annotations

from typing import NamedTuple

import jax

__all__ = ["SolverResult"]


class SolverResult(NamedTuple):
    """An iterative solver's answer with its convergence status.

    Attributes:
      x: the solution (or the solver's documented fallback when not converged).
      converged: bool, whether the solver's tolerance was met within its iteration bound.
      iterations: int32, the iterations used.
    """

    x: jax.Array
    converged: jax.Array
    iterations: jax.Array
