"""Two processes (``jax.distributed`` on 127.0.0.1, gloo CPU collectives), each with half of
the batch, end with the same params as one process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import jmtl
from tests import _mtl_problem as prob

STEPS = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(name):
    method = jmtl.methods.get(name)
    step, opt = prob.make_step(method)
    params = prob.init_params()
    x, y = prob.make_batch()
    mstate, opt_state = prob.method_state(method, params), opt.init(params)
    jstep, key = jax.jit(step), jax.random.key(0)
    for i in range(STEPS):
        params, opt_state, mstate, _ = jstep(params, opt_state, mstate, x, y,
                                             jax.random.fold_in(key, i))
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["upgrad"])
def test_two_processes_match_one(name, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests._multihost_worker", str(i), str(port), name,
         str(STEPS), str(outs[i])], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            logs.append(out)
    finally:
        for p in procs:  # never leave a process behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    ref = _reference(name)
    results = [dict(np.load(o)) for o in outs]
    for path, want in ref.items():
        # The two processes hold the same replicated params, bit for bit.
        np.testing.assert_array_equal(results[0][path], results[1][path], err_msg=path)
        # Against one process: float32 rounding of a different summation order.
        np.testing.assert_allclose(results[0][path], want, rtol=2e-4, atol=2e-5, err_msg=path)
