"""jmtl: functional multi-task learning for JAX and Flax.

Objectives over a pytree of per-task losses, about forty balancing methods behind one
protocol (``jmtl.methods``), an engine computing per-task Jacobians in one vectorised
pass (``jmtl.value_and_mtl_grad``), in-graph solvers, per-partition optimizers, masked
losses, the ΔMTL metric, checkpoints and (with flax) multi-task architectures
(``jmtl.nn``).
"""

from jmtl import (
    cascade,
    checkpoint,
    engine,
    host,
    jacobian,
    losses,
    methods,
    metrics,
    objectives,
    optim,
    solvers,
    tasks,
    train,
    transform,
)
from jmtl._aggregate import aggregate
from jmtl._checks import checked
from jmtl.engine import num_shared, shared_mask, value_and_mtl_grad

# Every registered method factory, under its registry name (``jmtl.upgrad()``, ...).
from jmtl.methods.aligned_mtl import aligned_mtl
from jmtl.methods.cagrad import cagrad
from jmtl.methods.config import config
from jmtl.methods.cosmos import cosmos
from jmtl.methods.cr_mogm import cr_mogm
from jmtl.methods.db_mtl import db_mtl
from jmtl.methods.dwa import dwa
from jmtl.methods.excess_mtl import excess_mtl
from jmtl.methods.fairgrad import fairgrad
from jmtl.methods.famo import famo
from jmtl.methods.fixed import ew, mean, weighted
from jmtl.methods.fixed import sum_ as sum  # noqa: A004 (the registry name)
from jmtl.methods.graddrop import graddrop
from jmtl.methods.gradnorm import gradnorm
from jmtl.methods.gradvac import gradvac
from jmtl.methods.imtl import imtl, imtl_g, imtl_l
from jmtl.methods.log_losses import gls, si
from jmtl.methods.mgda import mgda
from jmtl.methods.moco import moco
from jmtl.methods.modo import modo
from jmtl.methods.nash_mtl import nash_mtl
from jmtl.methods.pbi import pbi
from jmtl.methods.pcd import pcd
from jmtl.methods.pcgrad import pcgrad
from jmtl.methods.rlw import rlw
from jmtl.methods.robust import krum, trimmed_mean
from jmtl.methods.sdmgrad import sdmgrad
from jmtl.methods.stch import stch
from jmtl.methods.upgrad import dualproj, upgrad
from jmtl.methods.uw import uw
from jmtl.transform import as_gradient_transformation


def __getattr__(name):
    # ``jmtl.nn`` needs flax (an optional extra) and ``jmtl.testing`` chex (a test
    # dependency), so they are imported on first use.
    if name in ("nn", "testing"):
        import importlib

        return importlib.import_module(f"jmtl.{name}")
    raise AttributeError(f"module 'jmtl' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    # modules
    "cascade",
    "checkpoint",
    "engine",
    "host",
    "jacobian",
    "losses",
    "methods",
    "metrics",
    "nn",
    "objectives",
    "optim",
    "solvers",
    "tasks",
    "testing",
    "train",
    "transform",
    # functions
    "aggregate",
    "as_gradient_transformation",
    "checked",
    "num_shared",
    "shared_mask",
    "value_and_mtl_grad",
    # methods
    "aligned_mtl",
    "cagrad",
    "config",
    "cosmos",
    "cr_mogm",
    "db_mtl",
    "dualproj",
    "dwa",
    "ew",
    "excess_mtl",
    "fairgrad",
    "famo",
    "gls",
    "graddrop",
    "gradnorm",
    "gradvac",
    "imtl",
    "imtl_g",
    "imtl_l",
    "krum",
    "mean",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pbi",
    "pcd",
    "pcgrad",
    "rlw",
    "sdmgrad",
    "si",
    "stch",
    "sum",
    "trimmed_mean",
    "upgrad",
    "uw",
    "weighted",
]
