"""Kendall et al.'s toy problem: uncertainty weighting recovers the tasks' noise scales.

y1 = 2x + 8 + 10 ε1, y2 = 3x + 3 + ε2, N = 20,000. Training a shared linear feature and
two heads jointly with learnable log-variances (jmtl.objectives.uncertainty, kind
"log_variance") must give σ within 5% of 10 and 1, and σ² must match the residual
variance of an ordinary least-squares fit (numpy, float64), the closed-form optimum.
"""

import importlib.util
import os

import numpy as np
import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "uncertainty_toy.py")


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("uncertainty_toy", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learned_sigmas_match_true_noise(toy):
    import jax

    params, history = toy.train(steps=400, seed=0)
    sigma = history[-1]
    assert sigma[0] == pytest.approx(10.0, rel=0.05)
    assert sigma[1] == pytest.approx(1.0, rel=0.05)
    # closed-form optimum: σ_i² = residual variance of the best linear fit
    kd, _ = jax.random.split(jax.random.key(0))
    x, ys = toy.make_data(kd)
    X = np.c_[np.asarray(x, np.float64), np.ones(len(x))]
    for i, t in enumerate(("y1", "y2")):
        y = np.asarray(ys[t], np.float64)
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        resid_var = np.mean((X @ coef - y) ** 2)
        assert sigma[i] ** 2 == pytest.approx(resid_var, rel=0.04)
    # the weights exp(-s) that multiply the losses are 1/σ²: the noisy task is down-weighted
    w = {t: float(np.exp(-params["log_vars"][t])) for t in ("y1", "y2")}
    assert w["y1"] < w["y2"] / 50


def test_uw_method_in_the_engine_reaches_the_same_sigmas(toy):
    """jmtl.uw() with its default optimizer (state-held Adam) finds σ = (10, 1) too."""
    _, state, history = toy.train_method(steps=1000, seed=0)
    sigma = history[-1]
    assert sigma[0] == pytest.approx(10.0, rel=0.05)
    assert sigma[1] == pytest.approx(1.0, rel=0.05)
    # monotone approach: σ_1 never overshoots its target by more than 5%
    assert history[:, 0].max() <= 10.5 and np.all(np.isfinite(history))


def test_example_runs_fast(toy, tmp_path, capsys):
    out = tmp_path / "sub" / "toy.png"
    sigma = toy.main(["--fast", "--out", str(out)])
    assert out.exists() and out.stat().st_size > 0
    assert set(sigma) == {"y1", "y2"} and all(np.isfinite(v) for v in sigma.values())
    assert "learned σ" in capsys.readouterr().out
