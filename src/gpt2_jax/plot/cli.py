"""`python -m gpt2_jax.plot RUN_DIR [RUN_DIR ...]`: a run's loss, learning rate, HellaSwag and throughput curves
as a PNG; several runs overlaid in one figure."""

from __future__ import annotations

import argparse
import sys

from gpt2_jax.plot import PlotError, plot_run, plot_runs, read_metrics
from gpt2_jax.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_jax.plot",
        description="Plot training/validation loss, learning rate, HellaSwag accuracy (when scored) and throughput of a run "
                    "to PNG; given several runs, overlay them in one figure, one colour and label per run.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run directory holding metrics.jsonl (written by gpt2_jax.train)")
    parser.add_argument("--out", help="output PNG path (default: RUN_DIR/curves.png; for several runs, curves.png beside the first)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="one legend label per run (default: the run directories' names)")
    args = parser.parse_args(argv)
    try:
        counts = [read_metrics(run) for run in args.run_dirs]
        if len(args.run_dirs) == 1 and args.labels is None:
            out = plot_run(args.run_dirs[0], args.out)
        else:
            out = plot_runs(args.run_dirs, args.out, args.labels)
    except (PlotError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = sum(n for _, n in counts)
    note = f" ({skipped} unreadable lines skipped)" if skipped else ""
    steps = sum(len(records) for records, _ in counts)
    runs = f"{len(counts)} runs, " if len(counts) > 1 else ""
    print(f"wrote {out} from {runs}{steps} steps{note}")
    return 0
