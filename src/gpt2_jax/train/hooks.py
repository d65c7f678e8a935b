"""The periodic work of a training loop, and the per-step metrics that feed its log.

`Hooks` holds each piece of work with its period (log every 10 steps, evaluate every 100, sample
every 2000, save every 500, check for preemption every step), like levanter's `add_hook(fn,
every=N)` or flax lm1b's periodic actions: the loop asks it once per step, and once at the end,
instead of growing a chain of `if step % n`.

`Meter` reads each step's metrics back one step behind the device (the loop dispatches step t, then
reads step t-1's, so the device never waits on logging), stops the run on a NaN or infinite loss,
measures tokens/s and MFU, and hands the record to its own hooks (the log).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax

from gpt2_jax.train.config import TrainingError


@dataclasses.dataclass(frozen=True)
class Hook:
    name: str
    fn: Callable[[int, Any], None]  # (finished steps, the train state or the step's metrics)
    every: int  # period in steps; 0: never periodically
    at_end: bool  # also after the last step
    when: Callable[[], bool] | None  # also due whenever this says so (a save when a signal came)
    reads_metrics: bool  # needs the step's metrics on the host first (`before`)


class Hooks:
    """Periodic work, run in the order it was added, each when its period divides the finished steps.

    `before` runs once before the first due hook that reads metrics: the loop reads the step's
    metrics there, so a NaN loss stops the run before a checkpoint of it is saved.
    """

    def __init__(self, before: Callable[[], None] = lambda: None):
        self._hooks: list[Hook] = []
        self._before = before

    def add(
        self, name: str, fn: Callable[[int, Any], None], *, every: int, at_end: bool = True,
        when: Callable[[], bool] | None = None, reads_metrics: bool = True,
    ) -> None:
        self._hooks.append(Hook(name, fn, every, at_end, when, reads_metrics))

    def run(self, done: int, arg: Any, *, end: bool = False) -> None:
        """Run the hooks due after `done` steps (with `end`, those that run after the last step)."""
        ready = False
        for h in self._hooks:
            if end:
                due = h.at_end
            else:
                due = bool(h.every and done % h.every == 0) or (h.when is not None and h.when())
            if not due:
                continue
            if h.reads_metrics and not ready:
                self._before()
                ready = True
            h.fn(done, arg)


class Meter:
    """Per-step metrics, one step behind the device: checked, timed, then handed to `hooks` (the
    log, every `log_every` steps and after the last)."""

    def __init__(
        self, hooks: Hooks, bar, *, tokens_per_step: int, flops_per_token: float, peak_flops: float | None,
        last_step: int, start_step: int,
    ):
        self.hooks, self.bar = hooks, bar
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.last_step = last_step
        self._pending: tuple[int, Any] | None = None
        self._mark: tuple[float, int] | None = None  # (time, step) of the last rate measurement
        self.tokens_per_s = float("nan")
        self.step = start_step  # steps whose metrics have been read

    def push(self, step: int, metrics: Any) -> None:
        """Queue step `step`'s metrics (device arrays) and read back the previous step's."""
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Read back the queued step's metrics now (waits for that step)."""
        if self._pending is not None:
            step, metrics = self._pending
            self._pending = None
            self._record(step, metrics)

    def _record(self, step: int, metrics: Any) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]):
            raise TrainingError(f"loss is {m['loss']} at step {step + 1}; stopping (try a lower lr= or a longer warmup_steps=)")
        now = time.perf_counter()
        if self._mark is not None and step > self._mark[1]:
            self.tokens_per_s = (step - self._mark[1]) * self.tokens_per_step / (now - self._mark[0])
        if self._mark is None or step > self._mark[1]:
            self._mark = (now, step)
        m["tokens_seen"] = (step + 1) * self.tokens_per_step
        m["tokens_per_s"] = self.tokens_per_s
        postfix = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tokens_per_s']:,.0f}"}
        if self.peak_flops and math.isfinite(self.tokens_per_s):
            m["mfu"] = self.tokens_per_s / jax.device_count() * self.flops_per_token / self.peak_flops
            postfix["mfu"] = f"{100 * m['mfu']:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)
        self.step = step + 1
        self.hooks.run(step + 1, m, end=step + 1 == self.last_step)
