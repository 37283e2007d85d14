"""The two test tiers: what ``python -m pytest -m "not slow"`` runs of the per-method tests.

The full command (the README's and CI's) runs every test. The fast tier keeps every
method covered through ``test_properties.py`` (each method on its declared properties,
except those that compile it several more times), and runs the tests that build a
whole training step per method (the engine against brute force, tracing, scale-freedom)
on :data:`REPRESENTATIVE` methods only: one per kind of input and output a method can
declare, because it is the engine's handling of that kind that those tests check.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

import jmtl

__all__ = ["REPRESENTATIVE", "first_fast", "methods"]

# One method per kind the engine treats differently: no inputs (ew), losses with state
# (uw), a key (rlw), gradient norms with state (gradnorm), a Gramian (upgrad), a Gramian
# with the scale and state (nash_mtl), a Gramian with a key (pcgrad), the Jacobian with
# losses and state (imtl reads the Gramian and losses), a direction output from the
# Jacobian (config), a stateful direction (moco).
REPRESENTATIVE = frozenset({"ew", "uw", "rlw", "gradnorm", "upgrad", "nash_mtl", "pcgrad",
                            "imtl", "config", "moco"})


def methods(names: Iterable[str] | None = None) -> list:
    """``pytest.param`` per method name; those outside :data:`REPRESENTATIVE` are slow."""
    names = jmtl.methods.names() if names is None else names
    return [pytest.param(n, id=n, marks=() if n in REPRESENTATIVE else pytest.mark.slow)
            for n in names]


def first_fast(values: Iterable, *, keep: int = 1, unpack: bool = False) -> list:
    """Parametrisation values: the first ``keep`` run in both tiers, the rest are slow.

    For tests whose cases differ in data (seeds, scales, methods of one kind) rather than
    in the code path: the fast tier keeps one example of the path.

    Args:
      values: the values as they would be given to ``pytest.mark.parametrize``.
      keep: how many leading values stay in the fast tier.
      unpack: the values are tuples for several argument names.
    """
    out = []
    for i, v in enumerate(values):
        marks = () if i < keep else pytest.mark.slow
        out.append(pytest.param(*v, marks=marks) if unpack else pytest.param(v, marks=marks))
    return out
