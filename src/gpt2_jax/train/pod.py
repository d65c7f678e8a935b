"""An error on one process of a multi-process run ends every process, each saying which one failed.

The processes of a run meet in collectives at every step. When one of them raises (an unreadable
data window, an out-of-memory, an exception in a hook), the others would wait in the next
collective for an answer that never comes. So:

- the process that fails posts its exit status and one-line reason in the key-value store of JAX's
  distributed runtime (`Watch.fail`), waits (bounded by ACK_TIMEOUT_S) until every other process
  has read it, then ends;
- every process runs a `Watch` thread that polls those posts; when another process failed, it
  prints `error: process I failed: <reason>` and ends its process at once with the same status,
  wherever its main thread is waiting. (A thread runs while the main thread waits in a collective:
  the runtime releases Python's lock there.)

A process that disappears without a word (SIGKILL, a machine gone) is the distributed runtime's to
detect (`heartbeat_timeout_s`), and `gpt2_jax.train.supervisor`'s to report.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

from gpt2_jax import sharding
from gpt2_jax.train import supervisor

PREFIX = "gpt2_jax/failed/"
SEEN = "gpt2_jax/failed-seen/"
POLL_S = 0.5
ACK_TIMEOUT_S = 15.0  # the longest a failed process waits for the others to read its reason


def _end(code: int) -> None:
    """End this process now (its main thread may be inside a collective that never returns)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream: nothing more to say
            pass
    os._exit(code)


class Watch:
    """The failure posts of a multi-process run: `fail` posts this process's, the thread acts on
    another's. Inert on one process."""

    def __init__(self):
        self.client = None
        self._me = self._n = 0
        self._code: int | None = None  # this process's exit status, once it failed
        self._stop = threading.Event()

    def start(self) -> None:
        """Start watching (once the processes joined JAX's distributed runtime)."""
        self.client = sharding.distributed_client()
        if self.client is not None:
            self._me, self._n = jax.process_index(), jax.process_count()
            threading.Thread(target=self._watch, name="gpt2_jax-pod-watch", daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                posts = self.client.key_value_dir_get(PREFIX)
            except Exception:  # the runtime is going away (the coordinator is gone): its report
                return
            others = {int(k.rsplit("/", 1)[-1]): v for k, v in posts if int(k.rsplit("/", 1)[-1]) != self._me}
            if others and self._code is None:
                who = min(others)
                code, _, reason = others[who].partition("\t")
                self._code = int(code)
                print(f"\nerror: process {who} failed: {reason}", file=sys.stderr)
                supervisor.tell_failed(self._code)
                try:
                    self.client.key_value_set(f"{SEEN}{self._me}", "1", allow_overwrite=True)
                    if self._me == 0:  # the runtime's service ends with process 0: the others first
                        self._wait_until_told()
                finally:
                    _end(self._code)

    def _wait_until_told(self) -> None:
        """Until every process read the failure posts or posted its own (at most ACK_TIMEOUT_S)."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline:
            told = {k.rsplit("/", 1)[-1] for key in (SEEN, PREFIX) for k, _ in self.client.key_value_dir_get(key)}
            if len(told | {str(self._me)}) >= self._n:
                return
            time.sleep(0.1)

    def fail(self, code: int, reason: str) -> None:
        """This process ends with `code` for `reason` (one line): tell the others, and wait until
        they read it (bounded). Does nothing on one process."""
        if self.client is None:
            return
        self._code = code
        supervisor.tell_failed(code)
        try:
            self.client.key_value_set(f"{PREFIX}{self._me}", f"{code}\t{reason}", allow_overwrite=True)
            self._wait_until_told()
        except Exception:  # the runtime is gone already: nobody is left to tell
            return

    @property
    def failing(self) -> bool:
        """Whether this process failed on a multi-process run (`fail`)."""
        return self._code is not None

    def end(self) -> None:
        """After `fail`: end the process with its status without waiting for the others at JAX's
        shutdown barrier (they are ending, or gone)."""
        _end(self._code if self._code is not None else 1)
