"""Preemption, checked by the training loop every step: SIGTERM or SIGINT asks the run to stop
after the current step and save a checkpoint (as MaxText checks it in its loop)."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

import jax

from gpt2_jax.errors import warn


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (checked with `stop`).

    On a multi-host run the decision comes from `reached_preemption(step)` (the checkpoint
    manager's preemption sync point on JAX's coordination service), so that every host stops and
    saves at the same step. A second SIGINT aborts at once. The handlers it installs are put back
    when the block ends.
    """

    def __init__(self, reached_preemption: Callable[[int], bool] | None = None):
        self._reached = reached_preemption
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name
        warn(f"{self.signal_name} received: finishing the current step, then saving a checkpoint "
             "(send SIGINT again to abort without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def stop(self, step: int) -> bool:
        if jax.process_count() > 1 and self._reached is not None:
            return self._reached(step)
        return self.signal_name is not None

    def __exit__(self, *_exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
