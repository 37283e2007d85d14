"""Smoke tests of the benchmark scripts: each runs in its smallest mode and writes its JSON.

They run the scripts as subprocesses (as a user would), with tiny step counts and
few methods, so that the benchmarks never rot. The whole file takes about a minute.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script: str, out, *args: str, timeout: int = 240) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one plain CPU device, as a user would have
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--out", str(out),
                           *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _load(path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_speed_quick(tmp_path):
    _run("speed.py", tmp_path, "--quick", "--methods", "ew", "mean", "imtl_g",
         "--parts", "step", "solver", "memory", "torchjd", "--repeats", "2")
    result = _load(tmp_path / "speed.json")
    assert result["device"]["backend"] == "cpu"
    steps = [r for r in result["records"] if r["part"] == "step"]
    assert {r["mode"] for r in steps} == {"params", "features"}
    for r in steps:
        assert {"method", "K", "mode", "device_kind", "median_ms", "ratio"} <= set(r)
        assert r["median_ms"] > 0
    assert any(r["part"] == "solver" and r["method"] == "gramian" for r in result["records"])
    assert (tmp_path / "speed.md").exists() and (tmp_path / "speed.png").exists()


@pytest.mark.slow
def test_page_faults_one_step_per_process(tmp_path):
    _run("page_faults.py", tmp_path, "--ks", "2", "--task-batching", "gemm", "vmap",
         "--repeats", "2")
    rows = _load(tmp_path / "page_faults.json")["records"]
    assert [(r["K"], r["task_batching"]) for r in rows] == [(2, "gemm"), (2, "vmap")]
    for r in rows:
        assert r["median_ms"] > 0 and r["temp_mib"] > 0 and r["faults_per_call"] >= 0
    assert (tmp_path / "page_faults.md").exists()


@pytest.mark.slow
def test_pareto_toy_quick(tmp_path):
    _run("pareto_toy.py", tmp_path, "--quick", "--steps", "100", "--methods", "ew", "mean",
         "pcgrad")
    result = _load(tmp_path / "pareto_toy.json")
    assert {r["method"] for r in result["records"]} == {"ew", "mean", "pcgrad"}
    for r in result["records"]:
        assert len(r["final_losses"]) == 2 and r["distance_to_front"] >= 0
    assert (tmp_path / "pareto_toy.png").exists()


@pytest.mark.slow
def test_gradnorm_toy_quick(tmp_path):
    _run("gradnorm_toy.py", tmp_path, "--quick", "--steps", "50")
    result = _load(tmp_path / "gradnorm_toy.json")
    by_name = {r["method"]: r for r in result["records"]}
    assert set(by_name) == {"ew", "uw", "gradnorm"}
    assert len(by_name["gradnorm"]["final_weights"]) == 2
    # GradNorm keeps its weights summing to K.
    assert sum(by_name["gradnorm"]["final_weights"]) == pytest.approx(2.0, rel=1e-3)


@pytest.mark.slow
def test_multi_digit_quick(tmp_path):
    _run("multi_digit.py", tmp_path, "--quick", "--steps", "50", "--methods", "ew",
         "imtl_g")
    result = _load(tmp_path / "multi_digit.json")
    assert set(result["single_task"]["accuracy"]) == {"left", "right"}
    rows = {r["method"]: r for r in result["methods"]}
    assert set(rows) == {"ew", "imtl_g"}
    for r in rows.values():
        assert 0.1 < r["accuracy_mean"]["left"] <= 1.0
        assert "delta_mtl_mean" in r and "ms_per_step" in r
    assert result["partial"]["methods"], "the partially labelled run is missing"
    assert (tmp_path / "multi_digit.md").exists()


@pytest.mark.slow
def test_dense_toy_quick(tmp_path):
    _run("dense_toy.py", tmp_path, "--quick", "--steps", "10", "--models", "hard", "padnet")
    result = _load(tmp_path / "dense_toy.json")
    rows = {r["model"]: r for r in result["models"]}
    assert set(rows) == {"hard", "padnet"}
    for r in rows.values():
        assert 0.0 < r["metrics_mean"]["seg"]["pixel_acc"] <= 1.0
        assert r["metrics_mean"]["depth"]["abs_err"] > 0 and "delta_mtl_mean" in r
    assert set(result["single_task"]["metrics"]) == {"depth", "seg"}
    assert (tmp_path / "dense_toy.md").exists() and (tmp_path / "dense_toy.png").exists()


def test_multi_digit_data():
    sys.path.insert(0, BENCH)
    try:
        import data
    finally:
        sys.path.remove(BENCH)
    a = data.make_multi_digit(200, 50, parity=True, seed=3)
    b = data.make_multi_digit(200, 50, parity=True, seed=3)
    assert a.x_train.shape == (200, 96) and a.x_test.shape == (50, 96)
    assert (a.x_train == b.x_train).all()
    assert ((a.y_train["left"] + a.y_train["right"]) % 2 == a.y_train["parity"]).all()
    masks = data.partial_labels(a, 0.3)
    assert all(any(masks[t][i] for t in a.tasks) for i in range(200))
