"""Dense-prediction toy: hard sharing, PAD-Net and MTI-Net on segmentation and depth.

Images of random rectangles, generated here (``make_rectangles``): every 12×12 RGB
image holds one to three axis-aligned squares on a noisy background. A square's
colour names its class (three classes and the background: the segmentation task,
per-pixel labels 0..3); its depth (the depth task, per pixel, background 1.0) is
set by its size, ``depth = 1 - 0.15 · half_size`` (perspective: nearer squares look
larger), so depth needs the extent of a square, a non-local cue, while its colour
gives the class locally. Squares are painted far to near (nearer ones occlude),
brightness is random and independent of depth, and Gaussian noise (σ = 0.15) is
added to every pixel.

Models (``jmtl.nn``, Flax NNX), all on one backbone of three 3×3-conv stages at 1,
1/2 and 1/4 resolution (8 channels each):

* ``hard``: ``HardSharing``; the trunk fuses the three scales (upsampled and
  concatenated, then a 1×1 convolution); one conv head per task;
* ``padnet``: ``PADNet`` on the same fused trunk (per-task intermediate conv
  blocks, initial predictions, multi-modal distillation, final heads);
* ``mtinet``: ``MTINet`` on the backbone's three scales (its default blocks and
  heads).

The initial predictions of PAD-Net and MTI-Net are supervised too (upsampled to the
labels' size, weight 1, as the papers do). Single-task baselines are ``hard`` with one
head, one network per task. Every network trains with the summed task losses (cross
entropy, L1 depth), Adam 3e-3, batch 16, the same steps and seeds. Test metrics:
segmentation mIoU and pixel accuracy (higher is better), depth absolute error and
RMSE (lower is better); ΔMTL (``jmtl.metrics.delta_mtl``) is the mean relative change
of the four against the single-task networks (positive = better).

Run::

    python benchmarks/dense_toy.py --quick     # a smoke run (seconds)
    python benchmarks/dense_toy.py             # 3 seeds, a few minutes on one CPU core

Writes ``dense_toy.md``, ``dense_toy.json`` and ``dense_toy.png`` into ``--out``
(default ``benchmarks/results``; ``benchmarks/results/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from jmtl import metrics as metrics_lib  # noqa: E402
from jmtl import nn as mtnn  # noqa: E402

SIZE = 12
NUM_CLASSES = 3  # square classes; label 0 is the background
WIDTH = 8
BATCH = 16
LR = 3e-3
NOISE = 0.15
PALETTE = np.array([[1.0, 0.15, 0.15], [0.15, 1.0, 0.15], [0.15, 0.15, 1.0]], np.float32)
MODELS = ("hard", "padnet", "mtinet")
TASKS = ("depth", "seg")
HIGHER_IS_BETTER = {"seg": {"miou": True, "pixel_acc": True},
                    "depth": {"abs_err": False, "rmse": False}}


# ------------------------------------------------------------------------------- data


def make_rectangles(n: int, *, seed: int = 0, size: int = SIZE) -> dict[str, np.ndarray]:
    """``n`` images of random squares with their segmentation and depth maps.

    Returns:
      ``{"x": (n, size, size, 3) float32, "seg": (n, size, size) int32 in 0..3,
      "depth": (n, size, size, 1) float32}``.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, 3), np.float32)
    seg = np.zeros((n, size, size), np.int32)
    depth = np.ones((n, size, size, 1), np.float32)
    for i in range(n):
        count = rng.integers(1, 4)
        halves = rng.integers(1, 5, count)              # half sizes 1..4: squares 3..9 px
        order = np.argsort(halves)                      # small (far) first, large (near) last
        for j in order:
            h = int(halves[j])
            cy, cx = rng.integers(0, size, 2)
            y0, y1 = max(cy - h, 0), min(cy + h + 1, size)
            x0, x1 = max(cx - h, 0), min(cx + h + 1, size)
            cls = rng.integers(NUM_CLASSES)
            x[i, y0:y1, x0:x1] = PALETTE[cls] * rng.uniform(0.5, 1.0)
            seg[i, y0:y1, x0:x1] = cls + 1
            depth[i, y0:y1, x0:x1] = 1.0 - 0.15 * h
    x += rng.normal(0.0, NOISE, x.shape).astype(np.float32)
    return {"x": x, "seg": seg, "depth": depth}


# ----------------------------------------------------------------------------- models


def _conv(cin: int, cout: int, rngs: nnx.Rngs, *, kernel: int = 3, strides: int = 1):
    return nnx.Conv(cin, cout, (kernel, kernel), strides=strides, rngs=rngs)


class Backbone(nnx.Module):
    """Three conv stages at 1, 1/2 and 1/4 resolution; returns the three maps."""

    def __init__(self, rngs: nnx.Rngs, width: int | None = None):
        width = width or WIDTH
        self.stem = nnx.Sequential(_conv(3, width, rngs), nnx.relu, _conv(width, width, rngs),
                                   nnx.relu)
        self.down1 = nnx.Sequential(_conv(width, width, rngs, strides=2), nnx.relu,
                                    _conv(width, width, rngs), nnx.relu)
        self.down2 = nnx.Sequential(_conv(width, width, rngs, strides=2), nnx.relu,
                                    _conv(width, width, rngs), nnx.relu)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        f0 = self.stem(x)
        f1 = self.down1(f0)
        return [f0, f1, self.down2(f1)]


class FusedTrunk(nnx.Module):
    """The backbone's scales upsampled to full resolution, concatenated, mixed by a 1×1 conv."""

    def __init__(self, rngs: nnx.Rngs, width: int | None = None):
        width = width or WIDTH
        self.backbone = Backbone(rngs, width)
        self.fuse = _conv(3 * width, width, rngs, kernel=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        maps = self.backbone(x)
        h, w = maps[0].shape[1:3]
        return nnx.relu(self.fuse(jnp.concatenate([mtnn.resize_to(m, h, w) for m in maps], -1)))


OUTPUTS = {"depth": 1, "seg": NUM_CLASSES + 1}


def _head(rngs: nnx.Rngs, out: int) -> nnx.Module:
    return nnx.Sequential(_conv(WIDTH, WIDTH, rngs), nnx.relu, _conv(WIDTH, out, rngs, kernel=1))


def build(name: str, tasks: tuple[str, ...], seed: int) -> nnx.Module:
    """``hard`` (also the single-task baseline with one task), ``padnet`` or ``mtinet``."""
    rngs = nnx.Rngs(seed)
    if name == "hard":
        return mtnn.HardSharing(FusedTrunk(rngs), {t: _head(rngs, OUTPUTS[t]) for t in tasks})
    if name == "padnet":
        block = lambda: nnx.Sequential(_conv(WIDTH, WIDTH, rngs), nnx.relu)  # noqa: E731
        return mtnn.PADNet(FusedTrunk(rngs), intermediate={t: block() for t in tasks},
                           initial_heads={t: _conv(WIDTH, OUTPUTS[t], rngs, kernel=1)
                                          for t in tasks},
                           final_heads={t: _head(rngs, OUTPUTS[t]) for t in tasks},
                           features=WIDTH, rngs=rngs)
    if name == "mtinet":
        return mtnn.MTINet(Backbone(rngs), channels=[WIDTH] * 3,
                           outputs={t: OUTPUTS[t] for t in tasks}, rngs=rngs)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


# ----------------------------------------------------------------------------- training


def _task_loss(task: str, pred: jax.Array, batch: dict) -> jax.Array:
    pred = mtnn.resize_to(pred, *batch[task].shape[1:3])
    if task == "seg":
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(pred, batch["seg"]))
    return jnp.mean(jnp.abs(pred - batch["depth"]))


def final_predictions(out: Any) -> dict[str, jax.Array]:
    """The predictions to evaluate: the final ones of PAD-Net / MTI-Net, else the output."""
    return out.final if isinstance(out, (mtnn.PADNetOutput, mtnn.MTINetOutput)) else out


def losses(model: nnx.Module, batch: dict, tasks: tuple[str, ...]) -> dict[str, jax.Array]:
    """``{task: loss}``: the final prediction's loss plus, for PAD-Net and MTI-Net, the
    losses of the initial (deep-supervision) predictions, each with weight 1."""
    out = model(batch["x"])
    total = {t: _task_loss(t, final_predictions(out)[t], batch) for t in tasks}
    if isinstance(out, mtnn.PADNetOutput):
        initial = [out.initial]
    elif isinstance(out, mtnn.MTINetOutput):
        initial = list(out.initial)
    else:
        initial = []
    for preds in initial:
        for t in tasks:
            total[t] = total[t] + _task_loss(t, preds[t], batch)
    return total


_RUNNERS: dict = {}


def _runner(name: str, tasks: tuple[str, ...], chunk: int):
    """A jitted ``chunk``-step trainer for one architecture, compiled once for all seeds."""
    cache_key = (name, tasks, chunk)
    if cache_key not in _RUNNERS:
        graphdef, _, rest = nnx.split(build(name, tasks, 0), nnx.Param, ...)
        opt = optax.adam(LR)

        def loss_fn(p, batch):
            return sum(losses(nnx.merge(graphdef, p, rest), batch, tasks).values())

        @jax.jit
        def run(carry, key, arrays):
            def one(carry, key):
                p, opt_state = carry
                idx = jax.random.randint(key, (BATCH,), 0, arrays["x"].shape[0])
                loss, grads = jax.value_and_grad(loss_fn)(p, {k: v[idx]
                                                              for k, v in arrays.items()})
                updates, opt_state = opt.update(grads, opt_state, p)
                return (optax.apply_updates(p, updates), opt_state), loss

            return jax.lax.scan(one, carry, jax.random.split(key, chunk))

        _RUNNERS[cache_key] = (run, opt)
    return _RUNNERS[cache_key]


def train(name: str, tasks: tuple[str, ...], data: dict, *, seed: int, steps: int,
          chunk: int, bar=None) -> tuple[nnx.Module, float]:
    """Trains one network with the summed losses; returns it and the ms per step."""
    run, opt = _runner(name, tasks, chunk)
    graphdef, params, rest = nnx.split(build(name, tasks, seed), nnx.Param, ...)
    arrays = {k: jnp.asarray(v) for k, v in data.items()}
    carry = (params, opt.init(params))
    key = jax.random.key(1000 + seed)
    timed, seconds = 0, 0.0
    for c in range(steps // chunk):
        t0 = time.perf_counter()
        carry, loss = run(carry, jax.random.fold_in(key, c), arrays)
        loss.block_until_ready()
        if c > 0:  # the first chunk may compile
            timed, seconds = timed + chunk, seconds + time.perf_counter() - t0
        if bar is not None:
            bar.set_postfix_str(f"{name}{'/' + tasks[0] if len(tasks) == 1 else ''} seed "
                                f"{seed} loss {float(loss[-1]):.3f}")
            bar.update(chunk)
    return nnx.merge(graphdef, carry[0], rest), (1e3 * seconds / timed if timed else float("nan"))


def evaluate(model: nnx.Module, data: dict, tasks: tuple[str, ...]) -> dict:
    """Test metrics ``{"seg": {"miou", "pixel_acc"}, "depth": {"abs_err", "rmse"}}``."""
    preds = final_predictions(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(data["x"])))
    out = {}
    if "seg" in tasks:
        label = np.asarray(jnp.argmax(preds["seg"], -1))
        truth = data["seg"]
        ious = []
        for c in range(NUM_CLASSES + 1):
            union = np.sum((label == c) | (truth == c))
            if union:
                ious.append(np.sum((label == c) & (truth == c)) / union)
        out["seg"] = {"miou": float(np.mean(ious)), "pixel_acc": float(np.mean(label == truth))}
    if "depth" in tasks:
        err = np.asarray(preds["depth"], np.float64) - data["depth"]
        out["depth"] = {"abs_err": float(np.mean(np.abs(err))),
                        "rmse": float(np.sqrt(np.mean(err ** 2)))}
    return out


def param_count(model: nnx.Module) -> int:
    return _common.tree_size(nnx.state(model, nnx.Param))


# ----------------------------------------------------------------------------- report


def summarize(runs: list[dict], single: dict) -> list[dict]:
    rows = []
    for name in MODELS:
        rs = [r for r in runs if r["model"] == name]
        if not rs:
            continue
        deltas = [float(metrics_lib.delta_mtl(r["metrics"], single, HIGHER_IS_BETTER))
                  for r in rs]
        mean_metrics = {t: {m: float(np.mean([r["metrics"][t][m] for r in rs]))
                            for m in HIGHER_IS_BETTER[t]} for t in TASKS}
        rows.append({"model": name, "metrics_mean": mean_metrics,
                     "delta_mtl_mean": float(np.mean(deltas)),
                     "delta_mtl_std": float(np.std(deltas)), "delta_mtl_per_seed": deltas,
                     "params": rs[0]["params"],
                     "ms_per_step": float(np.nanmedian([r["ms_per_step"] for r in rs]))})
    return rows


def table(rows: list[dict], single: dict, single_params: int, single_ms: float) -> str:
    def metric_cells(m):
        return [f"{100 * m['seg']['miou']:.2f}", f"{100 * m['seg']['pixel_acc']:.2f}",
                f"{m['depth']['abs_err']:.4f}", f"{m['depth']['rmse']:.4f}"]

    body = [["single-task (2 nets)"] + metric_cells(single) + ["0", single_params, single_ms]]
    body += [[r["model"]] + metric_cells(r["metrics_mean"])
             + [f"{r['delta_mtl_mean']:+.2f} ± {r['delta_mtl_std']:.2f}", r["params"],
                r["ms_per_step"]] for r in rows]
    return _common.markdown_table(
        ["model", "seg mIoU % ↑", "seg pixel acc % ↑", "depth abs err ↓", "depth RMSE ↓",
         "ΔMTL % ↑", "params", "ms/step"], body)


def plot(rows: list[dict], path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ys = np.arange(len(rows))
    ax.barh(ys, [r["delta_mtl_mean"] for r in rows], xerr=[r["delta_mtl_std"] for r in rows],
            color=["tab:green" if r["delta_mtl_mean"] > 0 else "tab:red" for r in rows])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(ys, [r["model"] for r in rows])
    ax.set_xlabel("ΔMTL % vs single-task (higher is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, few steps, small data")
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results (benchmarks/results/quick with --quick)")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="*", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    args.out = args.out or _common.default_out(args.quick)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (40 if args.quick else 600)
    chunk = min(50, steps)
    steps = max(steps // chunk, 1) * chunk
    n_train, n_test = (256, 128) if args.quick else (3000, 500)
    train_data = make_rectangles(n_train, seed=12345)
    test_data = make_rectangles(n_test, seed=54321)
    info = _common.device_info()
    t_start = time.perf_counter()
    total = steps * len(seeds) * (len(TASKS) + len(args.models))
    runs, single_runs = [], []
    with tqdm(total=total, unit="step", desc="dense_toy", dynamic_ncols=True) as bar:
        for seed in seeds:
            for t in TASKS:
                model, ms = train("hard", (t,), train_data, seed=seed, steps=steps, chunk=chunk,
                                  bar=bar)
                single_runs.append({"task": t, "seed": seed, "ms_per_step": ms,
                                    "params": param_count(model),
                                    "metrics": evaluate(model, test_data, (t,))[t]})
            for name in args.models:
                model, ms = train(name, TASKS, train_data, seed=seed, steps=steps, chunk=chunk,
                                  bar=bar)
                runs.append({"model": name, "seed": seed, "ms_per_step": ms,
                             "params": param_count(model),
                             "metrics": evaluate(model, test_data, TASKS)})
    single = {t: {m: float(np.mean([r["metrics"][m] for r in single_runs if r["task"] == t]))
                  for m in HIGHER_IS_BETTER[t]} for t in TASKS}
    single_params = sum(r["params"] for r in single_runs if r["seed"] == seeds[0])
    single_ms = float(sum(np.nanmedian([r["ms_per_step"] for r in single_runs if r["task"] == t])
                          for t in TASKS))
    rows = summarize(runs, single)
    seconds = time.perf_counter() - t_start
    command = "python benchmarks/dense_toy.py" + (" --quick" if args.quick else "")
    md = (f"# Dense-prediction toy (random squares: segmentation and depth)\n\n"
          f"{n_train} training / {n_test} test images {SIZE}×{SIZE}, Adam {LR}, batch {BATCH}, "
          f"{steps} steps, seeds {seeds}, {info['backend']} ({info['device_kind']}). Test "
          f"metrics are means over seeds; ΔMTL (mean ± std over seeds) against the mean of the "
          f"single-task networks (positive = better); ms/step of the single-task row is the "
          f"sum of its two networks. Command: `{command}` ({seconds:.0f} s).\n\n"
          + table(rows, single, single_params, single_ms))
    os.makedirs(args.out, exist_ok=True)
    _common.write_text(os.path.join(args.out, "dense_toy.md"), md)
    _common.write_json(os.path.join(args.out, "dense_toy.json"), {
        "benchmark": "dense_toy", "device": info,
        "config": {"steps": steps, "seeds": seeds, "batch": BATCH, "lr": LR, "size": SIZE,
                   "width": WIDTH, "n_train": n_train, "n_test": n_test, "quick": args.quick,
                   "models": args.models},
        "single_task": {"metrics": single, "params": single_params, "ms_per_step": single_ms,
                        "runs": single_runs},
        "models": rows, "runs": runs, "seconds": seconds})
    plot(rows, os.path.join(args.out, "dense_toy.png"),
         f"dense toy, {steps} steps × {len(seeds)} seed(s), {info['backend']}")
    print("\n" + md)
    return {"models": rows, "single": single}


if __name__ == "__main__":
    main()
