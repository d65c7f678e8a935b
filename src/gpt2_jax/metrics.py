"""A training run's metrics on disk: `metrics.jsonl` and TensorBoard event files (process 0 only).

What is measured (loss, tokens/s, MFU against `costs.PEAK_FLOPS`) is decided by the training loop;
this module only writes it, as strict JSON (a value that is not finite is written as null and not
sent to TensorBoard). A resumed run first drops the records after the step it restored, from the
file and from TensorBoard's view, so each step appears once everywhere.

On an object store (a gs:// or s3:// run directory), which has no append, `metrics.jsonl` is
rewritten whole: at most every `FLUSH_S` seconds, at every checkpoint save (`flush`) and at the end,
so a killed run loses only records after its last checkpoint, which its resume drops anyway.
TensorBoard's event files are written to a local folder and uploaded at the same moments (each
upload replaces the object with the longer file). One rewrite of a 20,000-step run's file logged
every 10 steps is about 400 KB.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

from gpt2_jax import files, jsonl, storage
from gpt2_jax.run_dir import METRICS_FILE, TENSORBOARD_DIR


def truncate_records(path, last_step: int) -> int:
    """Rewrite a metrics file keeping the records of steps <= `last_step` (and records without a
    step), each as strict JSON; a line cut short by a kill goes. Returns how many records were dropped."""
    path = storage.path(path)
    if not path.is_file():
        return 0
    records, _ = jsonl.read_tolerant(path)
    kept = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > last_step)]
    files.write_text(path, "".join(files.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in the run directory (process 0 only).

    `resumed_from`: the step the run starts from (0 for a fresh start); records after it, left by
    an earlier life of the run, are dropped first.
    """

    FLUSH_S = 10.0  # on an object store: the longest a record waits before metrics.jsonl is rewritten

    def __init__(self, run_dir, enabled: bool, resumed_from: int | None = None):
        self.enabled = enabled
        if enabled:
            run_dir = storage.path(run_dir)
            self.path = run_dir / METRICS_FILE
            self.remote = storage.is_url(run_dir)
            if resumed_from is not None:
                truncate_records(self.path, resumed_from)
            # purge_step: TensorBoard discards the events this run's earlier life wrote after that step.
            purge = None if resumed_from is None else resumed_from + 1
            if self.remote:
                self.lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True) if self.path.is_file() else []
                self.tb_url = run_dir / TENSORBOARD_DIR
                self.tb_local = Path(tempfile.mkdtemp(prefix="gpt2_jax-tensorboard-"))
                self.tb = SummaryWriter(str(self.tb_local), purge_step=purge)
                self.flushed_at = time.monotonic()
            else:
                self.jsonl = open(self.path, "a", encoding="utf-8")
                self.tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = files.dumps({"step": step, **record}) + "\n"
        for k, v in record.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if self.remote:
            self.lines.append(line)
            if time.monotonic() - self.flushed_at >= self.FLUSH_S:
                self.flush()
        else:
            self.jsonl.write(line)
            self.jsonl.flush()

    def flush(self) -> None:
        """On an object store: rewrite metrics.jsonl and upload TensorBoard's files now."""
        if not (self.enabled and self.remote):
            return
        self.tb.flush()
        self._upload()

    def _upload(self) -> None:
        files.write_text(self.path, "".join(self.lines))
        for f in sorted(self.tb_local.iterdir()):
            storage.upload(f, self.tb_url / f.name)
        self.flushed_at = time.monotonic()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            if self.remote:
                self._upload()
                shutil.rmtree(self.tb_local, ignore_errors=True)
            else:
                self.jsonl.close()
