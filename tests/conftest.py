"""Test configuration: four fake CPU devices, float64 available on demand, hypothesis profiles.

Hypothesis profiles (``--hypothesis-profile NAME``):

* ``ci`` (the default): 25 examples per test, derandomised, so every run (CI, the README
  command) draws the same inputs.
* ``dev``: 200 examples per test with random seeds, for a developer hunting
  counter-examples, e.g. ``python -m pytest --hypothesis-profile dev
  tests/test_methods_qp.py tests/test_properties.py``. A failure prints the
  ``@reproduce_failure`` blob that replays it.
"""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None, derandomize=False,
                          print_blob=True)
settings.load_profile("ci")


def pytest_configure(config):
    # ``--hypothesis-profile NAME`` (hypothesis's pytest plugin) wins over the default.
    settings.load_profile(config.getoption("hypothesis_profile", None) or "ci")

# A script run by test_multihost.py in its own processes; importing it (for doctests)
# would set JAX options in this process.
collect_ignore = ["_multihost_worker.py"]
