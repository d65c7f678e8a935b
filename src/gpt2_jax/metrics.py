"""A training run's metrics on disk: `metrics.jsonl` and TensorBoard event files (process 0 only).

What is measured (loss, tokens/s, MFU against `costs.PEAK_FLOPS`) is decided by the training loop;
this module only writes it, as strict JSON (a value that is not finite is written as null and not
sent to TensorBoard). A resumed run first drops the records after the step it restored, from the
file and from TensorBoard's view, so each step appears once everywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

from gpt2_jax import files

METRICS_FILE = "metrics.jsonl"


def truncate_records(path: Path, last_step: int) -> int:
    """Rewrite a metrics file keeping the records of steps <= `last_step` (and lines that are not
    records), each as strict JSON. Returns how many records were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: not a record
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > last_step:
            dropped += 1
            continue
        kept.append(files.dumps(record))
    files.write_text(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in the run directory (process 0 only).

    `resumed_from`: the step the run starts from (0 for a fresh start); records after it, left by
    an earlier life of the run, are dropped first.
    """

    def __init__(self, run_dir: Path, enabled: bool, resumed_from: int | None = None):
        self.enabled = enabled
        if enabled:
            if resumed_from is not None:
                truncate_records(run_dir / METRICS_FILE, resumed_from)
            self.jsonl = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
            # purge_step: TensorBoard discards the events this run's earlier life wrote after that step.
            purge = None if resumed_from is None else resumed_from + 1
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(files.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
