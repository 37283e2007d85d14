"""``jmtl.host.keep_freed_memory``: glibc stops page-faulting XLA's temporary block.

Run in a child process: the setting is process-wide and must not leak into the tests.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHILD = r"""
import resource, jax, jax.numpy as jnp, jmtl.host
a = jnp.ones((1280, 4096)); b = jnp.ones((1280, 4096)); v = jnp.ones((4096,))
f = jax.jit(lambda a, b, v: jnp.concatenate([a, b * 2]) @ v)   # a 40 MiB temporary
assert f.lower(a, b, v).compile().memory_analysis().temp_size_in_bytes > 34 * 2**20
def faults(n=10):
    jax.block_until_ready(f(a, b, v))
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        jax.block_until_ready(f(a, b, v))
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / n
before = faults()
ok = jmtl.host.keep_freed_memory()
print(before, ok, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_stops_per_call_page_faults():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    before, ok, after = float(out[0]), out[1] == "True", float(out[2])
    if not ok:
        pytest.skip("this libc has no mallopt (not glibc)")
    # 40 MiB / 4 KiB pages: about 10,000 faults per call before; after, 0 in a plain
    # process and about 1,000 under the test runner's XLA flags.
    assert before > 5000, before
    assert after < before / 4, (before, after)
