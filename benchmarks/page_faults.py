"""One params-mode step per process: its time, its temporary memory and its page faults.

XLA:CPU allocates a step's temporary memory on every call, and glibc serves blocks over
its 32 MiB mmap ceiling with a fresh ``mmap`` each time, so such a step page-faults all
of its temporaries on every call (docs/architecture.md, "The Jacobian pass"). Several
steps in one process hide this (the heap one step frees can serve the next), so each
configuration here runs alone in a child process, as a training script would: build the
step of ``speed.py``'s model, warm it up, then time it and count the minor page faults
per call (``resource.getrusage``). Writes ``page_faults.md`` and ``page_faults.json``.
Run on one core to compare with single-threaded peers::

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 1 python benchmarks/page_faults.py --ks 8 32 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import jax  # noqa: E402
import speed  # noqa: E402

import jmtl  # noqa: E402


def measure(k: int, name: str, batching: str, repeats: int) -> dict:
    """In this process: one step, its median time, temporary memory and faults per call."""
    speed.ENGINE_KWARGS["task_batching"] = batching
    params = speed.init_params(jax.random.key(0), k)
    x, y = speed.data(jax.random.key(1), k)
    key = jax.random.key(0)
    step, init = speed.make_step(jmtl.methods.get(name, **_common.method_kwargs(name, k)),
                                 "params")
    state = init(params, x, y)
    temp = step.lower(params, state, x, y, key).compile().memory_analysis()
    for _ in range(3):
        jax.block_until_ready(step(params, state, x, y, key))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    calls = 0

    def run():
        nonlocal calls
        calls += 1
        return step(params, state, x, y, key)

    ms = _common.median_ms(run, repeats=repeats, warmup=0, min_time_s=0.3)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"K": k, "method": name, "task_batching": batching, "median_ms": ms,
            "temp_mib": getattr(temp, "temp_size_in_bytes", 0) / 2**20,
            "faults_per_call": faults / max(calls, 1)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=int, nargs="*", default=[8, 32, 128])
    p.add_argument("--methods", nargs="*", default=["upgrad"])
    p.add_argument("--task-batching", nargs="*", default=["gemm", "vmap"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=_common.default_out())
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        k, name, batching = args.child
        print(json.dumps(measure(int(k), name, batching, args.repeats)))
        return []
    rows = []
    for k in args.ks:
        for name in args.methods:
            for batching in args.task_batching:
                cmd = [sys.executable, os.path.abspath(__file__), "--repeats",
                       str(args.repeats), "--child", str(k), name, batching]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"K={k:3d} {name:8s} {batching:5s} {row['median_ms']:8.2f} ms  "
                      f"temp {row['temp_mib']:6.1f} MiB  "
                      f"{row['faults_per_call']:8.0f} minor faults per call")
    info = _common.device_info()
    table = _common.markdown_table(
        ["K", "method", "task_batching", "ms", "temp MiB", "faults per call"],
        [[r["K"], r["method"], r["task_batching"], r["median_ms"], r["temp_mib"],
          round(r["faults_per_call"])] for r in rows])
    text = (f"# One params-mode step per process\n\n{info['backend']} ({info['device_kind']}),"
            f" jax {info['jax']}, {info['cpu_count']} CPUs, GLIBC_TUNABLES="
            f"{os.environ.get('GLIBC_TUNABLES')!r}.\n\n{table}\n")
    _common.write_text(os.path.join(args.out, "page_faults.md"), text)
    _common.write_json(os.path.join(args.out, "page_faults.json"),
                       {"device": info, "records": rows})
    return rows


if __name__ == "__main__":
    main()
