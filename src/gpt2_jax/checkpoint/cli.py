"""`python -m gpt2_jax.checkpoint ls RUN_DIR`: a run's checkpoints, their metrics, and its config."""

from __future__ import annotations

import argparse
import sys

from gpt2_jax.checkpoint import CheckpointError, list_run
from gpt2_jax.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_jax.checkpoint", description="Inspect the checkpoints of a training run."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list a run's checkpoints: step, time, size, metrics, and its config")
    p.add_argument("run_dir", help="training run directory (holding checkpoints/) or its checkpoints/ folder; a gs:// or s3:// URL too")
    args = parser.parse_args(argv)
    try:
        print(list_run(args.run_dir))
    except (CheckpointError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

