"""A training run's metrics on disk: `metrics.jsonl` and TensorBoard event files (process 0 only).

What is measured (loss, tokens/s, MFU against `costs.PEAK_FLOPS`) is decided by the training loop;
this module only writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in the run directory (process 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
