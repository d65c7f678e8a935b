"""A hang watchdog for the training loop: when no step finishes within a bound, every process writes
the Python stack traces of all its threads to a log and exits non-zero with one line naming it
(MaxText's stack traces on a hang are the model; `faulthandler` writes them).

The bound (`hang_timeout_s`; 0 = auto: `AUTO_STEPS` times the median step time, never under
`AUTO_MIN_S`) counts the time between step boundaries only: the clock starts after the first step
(its compilation is not counted) and stops during periodic work (`paused`: evaluation, HellaSwag,
samples, saves). On several processes a hang on one leaves the others waiting in a collective, so
they fire too; the first to fire posts it in the distributed runtime's key-value store, the others
then write their stacks at once, and each waits (at most `ACK_S`) for the others' before it exits,
so that no process's exit breaks a peer's collective before that peer has written its log.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import jax

from gpt2_jax import sharding, storage

AUTO_STEPS = 50  # auto bound: this many median steps...
AUTO_MIN_S = 300.0  # ...and never less than this
ACK_S = 10.0  # how long a firing process waits for its peers' stack logs before it exits
EXIT_CODE = 3  # the exit status of a process the watchdog ended


def stacks_log(run_dir) -> Path:
    """Where this process writes its stacks: RUN_DIR/stacks-process-I.log, or in the local temporary
    directory when the run directory is on an object store."""
    name = f"stacks-process-{jax.process_index()}.log"
    if storage.is_url(run_dir):
        return Path(tempfile.gettempdir()) / f"gpt2_jax-{str(run_dir).rstrip('/').rsplit('/', 1)[-1]}-{name}"
    return Path(run_dir) / name


class Watchdog:
    """Started and stopped by the loop (`with Watchdog(...)`); `beat` at every step boundary."""

    def __init__(self, run_dir, timeout_s: float = 0.0):
        self.timeout_s = timeout_s
        self.log = stacks_log(run_dir)
        self._client = sharding.distributed_client()
        self._key = "gpt2_jax/hang/"
        self._last: float | None = None  # the last beat; None: not armed (before the first step, or paused)
        self._steps: deque[float] = deque(maxlen=100)  # recent step times
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpt2_jax-watchdog", daemon=True)

    def bound(self) -> float:
        if self.timeout_s:
            return self.timeout_s
        with self._lock:  # beat() appends from the main thread
            steps = list(self._steps)
        median = statistics.median(steps) if steps else 0.0
        return max(AUTO_MIN_S, AUTO_STEPS * median)

    def beat(self) -> None:
        """A step finished (the loop is at a step boundary)."""
        now = time.monotonic()
        with self._lock:
            if self._last is not None:
                self._steps.append(now - self._last)
            self._last = now

    @contextlib.contextmanager
    def paused(self):
        """Periodic work: not counted; the clock restarts when it ends."""
        with self._lock:
            armed, self._last = self._last is not None, None
        try:
            yield
        finally:
            with self._lock:
                self._last = time.monotonic() if armed else None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_exc):
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.bound() / 20)):
            with self._lock:
                idle = None if self._last is None else time.monotonic() - self._last
            if idle is not None and idle > self.bound():
                self._fire(f"no training step finished in {idle:.0f} s (hang_timeout_s={self.timeout_s:g}, bound {self.bound():.0f} s)")
            peers = self._peer_fired() if self._client is not None else ""
            if peers:
                self._fire(f"stopped because process(es) {peers} found no training step finishing")

    def _peer_fired(self) -> str:
        try:
            return ", ".join(k.rsplit("/", 1)[-1] for k, _ in self._client.key_value_dir_get(self._key))
        except Exception:  # the coordination service is gone: this process's own clock decides
            return ""

    def _fire(self, why: str) -> None:
        """Write every thread's stack, say so in one line, wait briefly for the peers', exit."""
        try:
            with open(self.log, "w") as f:
                f.write(f"process {jax.process_index()}: {why}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            where = f"the stack traces of every thread are in {self.log}"
        except OSError as e:
            where = f"the stack traces could not be written to {self.log} ({e.strerror or e})"
        # On a line of its own, also after a progress bar's unfinished line.
        print(f"\nerror: process {jax.process_index()}: {why}; {where}", file=sys.stderr, flush=True)
        if self._client is not None:
            self._wait_for_peers()
        os._exit(EXIT_CODE)  # the main thread is stuck: nothing else can end the process

    def _wait_for_peers(self) -> None:
        me, n = jax.process_index(), jax.process_count()
        with contextlib.suppress(Exception):
            self._client.key_value_set(f"{self._key}{me}", "1")
        deadline = time.monotonic() + ACK_S
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if len(self._client.key_value_dir_get(self._key)) == n:
                    break
            time.sleep(0.2)
        if me == 0:  # process 0 serves the key-value store: the last to leave
            time.sleep(1.0)
