"""Preemption, checked by the training loop every step: SIGTERM or SIGINT asks the run to stop
after the current step and save a checkpoint (as MaxText checks it in its loop).

On one process the signal is the decision. On several, a signal reaches one host, some or all, and
every process must stop after the same step (the save and the steps are collectives): `PodStop`
agrees on that step through the key-value store of JAX's distributed runtime, without a device
sync and without a wait that has no bound:

1. Every process polls at the same points of its control flow (each step boundary, each batch of
   a validation or a scoring, each chunk of a sample), numbered alike everywhere, and reads the
   store's stop target there (one small read; no write while nothing happens).
2. The first signalled process to write the target sets it: its current poll plus LAG. The store
   refuses a second writer, who reads the first one's target instead. Nobody waits for the others'
   answers, so the stop comes LAG polls after the first signal is noticed, whoever received it.
   LAG covers how far a peer may already be ahead. Each poll follows the read-back of work that
   was dispatched after the poll two before it (the loop reads step t-1's metrics after
   dispatching step t; validations and scorings keep two batches in flight), and that work's
   collectives need every process; so while the writer is at poll a, no peer is past poll a+1,
   and a peer that already read the store at a+1 reads it again at a+2, after the write. A
   smaller LAG would need a sync of every process before every step, which the pipelined loop
   exists to avoid.
3. At the agreed poll every process meets at a barrier bounded by `STOP_TIMEOUT_S`, then saves.
   A bound that runs out raises TrainingError naming the processes that did not come.
"""

from __future__ import annotations

import itertools
import signal
import threading
from typing import Any

import jax

from gpt2_jax import sharding
from gpt2_jax.errors import warn
from gpt2_jax.train.config import TrainingError

LAG = 2  # polls between the first signalled process's poll and the agreed stop (see the module's docstring)
STOP_TIMEOUT_S = 120  # the longest any process waits at the agreed stop for the others
_runs = itertools.count()  # each guard's keys are its own (every process creates guards in the same order)


class Interrupted(Exception):
    """Raised inside periodic work (a validation) when the processes agreed to stop there."""


class PodStop:
    """The agreement on where to stop, among the processes of a multi-process run (see the module)."""

    def __init__(self, client, prefix: str, timeout_s: float = STOP_TIMEOUT_S):
        self._client, self._prefix, self.timeout_s = client, prefix, timeout_s
        self._me, self._n = jax.process_index(), jax.process_count()
        self.polls = 0
        self.target: int | None = None
        self.reason: str | None = None  # the signal that set the target (on the process that set it)

    def poll(self, signal_name: str | None) -> bool:
        """Whether the processes agreed to stop at this poll (every process calls it at the same points)."""
        self.polls += 1
        if self.target is None:
            self._read_target()
            if self.target is None and signal_name is not None:
                self._set_target(signal_name)
        if self.target is None or self.polls < self.target:
            return False
        if self.polls > self.target:
            raise TrainingError(f"process {self._me} passed the agreed stop (poll {self.target}) before it learned of it")
        self._meet()
        return True

    def _read_target(self) -> None:
        for _, value in self._client.key_value_dir_get(f"{self._prefix}target/"):
            count, name, _ = value.split(",")
            self.target, self.reason = int(count), name

    def _set_target(self, signal_name: str) -> None:
        try:  # the store keeps the first write of a key; a later writer gets an error
            self._client.key_value_set(f"{self._prefix}target/t", f"{self.polls + LAG},{signal_name},{self._me}")
        except Exception:  # another process set it between this poll's read and this write
            self._read_target()
            if self.target is None:
                raise
        else:
            self.target, self.reason = self.polls + LAG, signal_name

    def _meet(self) -> None:
        """The bounded barrier at the agreed stop; the processes that did not come are named."""
        self._client.key_value_set(f"{self._prefix}stopped/{self._me}", "1")
        try:
            self._client.wait_at_barrier(f"{self._prefix}stop", int(self.timeout_s * 1000))
        except Exception:  # the runtime's error: DEADLINE_EXCEEDED, or the service is gone
            came = {int(k.rsplit("/", 1)[-1]) for k, _ in self._client.key_value_dir_get(f"{self._prefix}stopped/")}
            missing = sorted(set(range(self._n)) - came)
            raise TrainingError(
                f"process(es) {', '.join(map(str, missing)) or '?'} did not reach the agreed stop within {self.timeout_s:.0f} s"
            ) from None


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (checked with `stop`).

    On a multi-host run the decision is `PodStop`'s, so that every host stops and saves at the same
    step whichever hosts were signalled, and `cut` ends a validation early at the same batch on every
    host. A second SIGINT aborts at once. The handlers it installs are put back when the block ends.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}
        client = sharding.distributed_client()
        self.pod = PodStop(client, f"gpt2_jax/stop/{next(_runs)}/") if client is not None else None

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

    @property
    def reason(self) -> str | None:
        """The signal the run stops for (on a pod, the first signalled process's)."""
        return self.pod.reason if self.pod is not None and self.pod.reason else self.signal_name

    def stop(self, _done: int) -> bool:
        """At a step boundary (after `_done` steps): whether to stop now (every process alike)."""
        if self.pod is not None:
            return self.pod.poll(self.signal_name)
        return self.signal_name is not None

    def cut(self) -> None:
        """Inside periodic work on a pod (before each collective batch): raise Interrupted where the
        processes agreed to stop. On one process periodic work runs to its end, as before."""
        if self.pod is not None and self.pod.poll(self.signal_name):
            raise Interrupted

    def __exit__(self, *_exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
