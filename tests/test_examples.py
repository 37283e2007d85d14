"""Smoke tests: every script in examples/ runs with ``--fast`` and exits with status 0.

The scripts are found by glob, so new examples are covered without editing this file.
Each runs in its own process (``sys.executable``, cwd = the repository root); scripts
that save files (plots) must accept ``--out``, which points into a temporary folder.
One test per script, so ``pytest -n auto`` spreads them over the cores.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 300


def test_examples_found():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.py", "uncertainty_toy.py"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_fast(script, tmp_path):
    source = script.read_text()
    assert "--fast" in source, f"{script.name} must accept --fast"
    cmd = [sys.executable, str(script), "--fast"]
    if "--out" in source:
        cmd += ["--out", str(tmp_path / f"{script.stem}.png")]
    else:
        assert "savefig" not in source, f"{script.name} saves a file but has no --out option"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{script.name} --fast exited with status {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
    )
