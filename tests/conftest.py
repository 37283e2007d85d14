"""Test configuration: four fake CPU devices, float64 available on demand, hypothesis profiles.

Hypothesis profiles (``--hypothesis-profile NAME``):

* ``ci`` (the default): 25 examples per test, derandomised, so every run (CI, the README
  command) draws the same inputs.
* ``dev``: 200 examples per test with random seeds, for a developer hunting
  counter-examples, e.g. ``python -m pytest --hypothesis-profile dev
  tests/test_methods_qp.py tests/test_properties.py``. A failure prints the
  ``@reproduce_failure`` blob that replays it.
"""

import importlib.metadata
import os
import shutil
import tempfile


def _cache_dir(pid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"jmtl-test-jax-cache-{pid}")


# Must happen before JAX initialises its backends. The tests compile thousands of small
# programs and time goes to XLA's compiler, not to running them. Two compiler options
# make that 2-3x faster without changing floating-point semantics: LLVM's optimisation
# level 0, and XLA:CPU's older elemental emitters instead of its fusion emitters (only
# set for the jaxlib minor version known to have the flag: XLA aborts on an unknown
# one). A compilation cache private to this run lets tests that build the same program
# (the same method on the same shapes) share one compilation across the xdist workers
# and the example scripts' subprocesses. The xdist workers are children of the
# controller, whose pid names the cache; the controller removes it at the end.
_FAST_COMPILE = ["--xla_backend_optimization_level=0"]
if importlib.metadata.version("jaxlib").startswith("0.10."):
    _FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in ("--xla_force_host_platform_device_count=4", *_FAST_COMPILE):
    if _flag.split("=")[0] not in _flags:
        _flags = f"{_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _flags
_is_worker = "PYTEST_XDIST_WORKER" in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      _cache_dir(os.getppid() if _is_worker else os.getpid()))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None, derandomize=False,
                          print_blob=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    del config
    from tests import _tiers

    _tiers.mark_full_only(items)


def pytest_sessionfinish(session, exitstatus):
    del exitstatus
    if not hasattr(session.config, "workerinput"):  # the controller, or a run without xdist
        shutil.rmtree(_cache_dir(os.getpid()), ignore_errors=True)


def pytest_configure(config):
    # ``--hypothesis-profile NAME`` (hypothesis's pytest plugin) wins over the default.
    settings.load_profile(config.getoption("hypothesis_profile", None) or "ci")

# A script run by test_multihost.py in its own processes; importing it (for doctests)
# would set JAX options in this process.
collect_ignore = ["_multihost_worker.py"]
