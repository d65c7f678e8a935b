"""Training curves from a run's metrics.jsonl, as a PNG (`python -m gpt2_jax.plot RUN_DIR [RUN_DIR ...]`).

Panels: training and validation loss, learning rate, HellaSwag accuracy when the run scored it
(`hellaswag_every=`), and throughput (tokens/s, plus MFU when the run measured it). Several runs
are overlaid in one figure, one colour and one label per run (`plot_runs`). Lines of
metrics.jsonl that are not JSON objects with a `step` are skipped and counted, so a run killed
mid-write still plots.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from gpt2_jax import files, jsonl, published, storage
from gpt2_jax.run_dir import METRICS_FILE
# The training loop's HellaSwag records (gpt2_jax.eval's three rules, in %), with their legend labels.
HELLASWAG_SERIES = (("hellaswag_acc_per_token", "per token"), ("hellaswag_acc_per_byte", "per byte"),
                    ("hellaswag_acc_sum", "sum"))


class PlotError(ValueError):
    """A run directory without usable metrics."""


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """Records of RUN_DIR/metrics.jsonl in step order (the last record wins for a repeated step
    and key, as after a resume), and the number of unreadable lines skipped."""
    path = storage.path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path} not found: pass a run directory written by `python -m gpt2_jax.train`")
    records, skipped = jsonl.read_tolerant(path)
    by_step: dict[int, dict[str, Any]] = {}
    for rec in records:
        try:
            step = int(rec["step"])
        except (KeyError, TypeError, ValueError):
            skipped += 1
            continue
        by_step.setdefault(step, {}).update(rec)
    if not by_step:
        raise PlotError(f"{path} holds no metrics yet")
    return [by_step[s] for s in sorted(by_step)], skipped


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def _hellaswag_panel(ax, hellaswag) -> None:
    for label, (steps, values) in hellaswag:
        ax.plot(steps, values, marker="o", label=label)
    reference = published.HELLASWAG["acc_per_token"]["small"]
    ax.axhline(reference, linestyle="--", color="gray", label=f"GPT-2 124M, per token ({reference}%)")
    ax.axhline(25.0, linestyle=":", color="silver", label="chance (25%)")
    ax.set(title="HellaSwag accuracy (%)", xlabel="step")
    ax.legend()


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's curves to `out` (default RUN_DIR/curves.png), written atomically."""
    # matplotlib is imported only to draw: it adds about half a second to every import of this module.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, _ = read_metrics(run_dir)
    out = storage.path(out) if out is not None else storage.path(run_dir) / "curves.png"
    hellaswag = [(label, _series(records, key)) for key, label in HELLASWAG_SERIES]
    hellaswag = [(label, series) for label, series in hellaswag if series[0]]
    n_panels = 4 if hellaswag else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4), constrained_layout=True)
    ax = axes[0]
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, marker="o" if key == "val_loss" else None, label=label)
    ax.set(title="loss (nats/token)", xlabel="step")
    ax.legend()
    steps, values = _series(records, "lr")
    axes[1].plot(steps, values)
    axes[1].set(title="learning rate", xlabel="step")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if hellaswag:
        _hellaswag_panel(axes[2], hellaswag)
    ax = axes[-1]
    steps, values = _series(records, "tokens_per_s")
    ax.plot(steps, values, label="tokens/s")
    ax.set(title="throughput", xlabel="step", ylabel="tokens/s")
    steps, mfu = _series(records, "mfu")
    if steps:
        twin = ax.twinx()
        twin.plot(steps, [100 * m for m in mfu], color="tab:red", label="MFU")
        twin.set_ylabel("MFU (%)")
    fig.suptitle(storage.path(run_dir).name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out


def run_labels(run_dirs: list, labels: list[str] | None = None) -> list[str]:
    """One label per run: `labels` as given (as many as runs), else each run directory's name (its
    path as given where two names are the same)."""
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise PlotError(f"{len(labels)} label(s) for {len(run_dirs)} run(s): give one label per run directory")
        return list(labels)
    names = [storage.path(r).name for r in run_dirs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, run_dirs)]


def draw_runs(run_dirs: list, labels: list[str] | None = None):
    """A matplotlib Figure overlaying the runs: validation loss (markers) over training loss (thin),
    learning rate, HellaSwag per-token accuracy when any run scored it, and tokens/s; one colour
    per run, labelled by `run_labels`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = run_labels(run_dirs, labels)
    runs = [(name, read_metrics(r)[0]) for name, r in zip(names, run_dirs)]
    hellaswag = any(_series(records, "hellaswag_acc_per_token")[0] for _, records in runs)
    n_panels = 4 if hellaswag else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4), constrained_layout=True)
    for i, (name, records) in enumerate(runs):
        color = f"C{i % 10}"
        steps, values = _series(records, "loss")
        axes[0].plot(steps, values, color=color, alpha=0.35, linewidth=0.8)
        steps, values = _series(records, "val_loss")
        axes[0].plot(steps, values, color=color, marker="o", markersize=3, label=name)
        axes[1].plot(*_series(records, "lr"), color=color, label=name)
        if hellaswag:
            axes[2].plot(*_series(records, "hellaswag_acc_per_token"), color=color, marker="o", label=name)
        axes[-1].plot(*_series(records, "tokens_per_s"), color=color, label=name)
    axes[0].set(title="validation loss (markers), training loss (thin)", xlabel="step", ylabel="nats/token")
    lowest = [min(_series(records, "val_loss")[1], default=math.inf) for _, records in runs]
    if math.isfinite(min(lowest)):  # the first steps' losses (~ln 50,257) would flatten where the runs differ
        axes[0].set_ylim(min(lowest) - 0.1, max(lowest) + 1.5)
    axes[1].set(title="learning rate (AdamW's; of Muon runs, their AdamW part)", xlabel="step")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if hellaswag:
        axes[2].set(title="HellaSwag accuracy, per token (%)", xlabel="step")
    axes[-1].set(title="throughput", xlabel="step", ylabel="tokens/s")
    for ax in axes:
        ax.legend(fontsize="small")
    fig.suptitle(f"{len(runs)} runs")
    return fig


def plot_runs(run_dirs: list, out: str | os.PathLike | None = None, labels: list[str] | None = None) -> Path:
    """Draw several runs in one figure (`draw_runs`) to `out` (default: curves.png beside the first
    run directory), written atomically."""
    import matplotlib.pyplot as plt

    fig = draw_runs(run_dirs, labels)
    out = storage.path(out) if out is not None else storage.path(run_dirs[0]).parent / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
