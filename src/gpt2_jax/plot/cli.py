"""`python -m gpt2_jax.plot RUN_DIR`: a run's loss, learning rate, HellaSwag and throughput curves as a PNG."""

from __future__ import annotations

import argparse
import sys

from gpt2_jax.plot import PlotError, plot_run, read_metrics
from gpt2_jax.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_jax.plot",
        description="Plot training/validation loss, learning rate, HellaSwag accuracy (when scored) and throughput of a run to PNG.",
    )
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl (written by gpt2_jax.train)")
    parser.add_argument("--out", help="output PNG path (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        records, skipped = read_metrics(args.run_dir)
        out = plot_run(args.run_dir, args.out)
    except (PlotError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    note = f" ({skipped} unreadable lines skipped)" if skipped else ""
    print(f"wrote {out} from {len(records)} steps{note}")
    return 0

