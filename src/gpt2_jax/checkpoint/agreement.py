"""How the processes of a multi-process run agree on the outcome of each checkpoint save.

A save is written by every process (each its own shards) and committed by process 0: it exists only
if every process wrote its part. Orbax meets the processes at two barriers in its background thread
(parts written; committed). A process whose write failed never comes to them, and with Orbax's own
barriers the others would wait there for its timeout (20 minutes) while the failed process trains
on into a collective they never join: the pod hangs without a word. Here instead:

- `barrier` is Orbax's barrier function: it meets the processes through the distributed runtime's
  key-value store, polled, and gives up at once (`SaveAbandoned`) when a process posted that its
  part of this save failed;
- `settle` is where every process posts the outcome of its part and reads every other's (bounded),
  so that every process takes the same decision: saved, or not saved because of process I's reason.
- `agree` shares the checks made before a save starts (a full disk on one host), so that every
  process starts the save or none does, and `shared` process 0's choice of the old checkpoints to
  delete (each process lists the disk at another moment, maybe while process 0 deletes).

Every process saves in the same order, so the n-th save has the same keys everywhere.
"""

from __future__ import annotations

import itertools
import time

import jax

SETTLE_TIMEOUT_S = 300  # the longest a process waits for the others' outcomes of a save
POLL_S = 0.05
_instances = itertools.count()  # each Checkpointer's keys are its own (created in the same order everywhere)


class SaveAbandoned(Exception):
    """Raised in Orbax's background thread when another process's part of the save failed."""


class SaveAgreement:
    """The save outcomes of one Checkpointer on a multi-process run (see the module)."""

    def __init__(self, client, timeout_s: float = SETTLE_TIMEOUT_S):
        self._client, self.timeout_s = client, timeout_s
        self._prefix = f"gpt2_jax/ckpt/{next(_instances)}/"
        self._me, self._n = jax.process_index(), jax.process_count()
        self._saves = 0
        self._current = f"{self._prefix}0/"

    def begin(self) -> None:
        """A new save starts (every process calls it before the save's first collective)."""
        self._saves += 1
        self._current = f"{self._prefix}{self._saves}/"

    def _posts(self, what: str) -> dict[int, str]:
        return {int(k.rsplit("/", 1)[-1]): v for k, v in self._client.key_value_dir_get(f"{self._current}{what}/")}

    def _post(self, what: str, value: str) -> None:
        self._client.key_value_set(f"{self._current}{what}/{self._me}", value, allow_overwrite=True)

    def barrier(self, key: str, timeout_ms: int) -> None:
        """Orbax's barrier (its `barrier_sync_fn`): returns once every process came; raises
        SaveAbandoned when one posted a failed part, TimeoutError when the time runs out."""
        self._post(f"barrier/{key}", "1")
        deadline = time.monotonic() + timeout_ms / 1000
        while len(came := self._posts(f"barrier/{key}")) < self._n:
            failed = {i: why for i, why in self._posts("outcome").items() if why}
            if failed:
                raise SaveAbandoned(_name(failed))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{_missing(came, self._n)} did not finish writing within {timeout_ms / 1000:.0f} s")
            time.sleep(POLL_S)

    def post_part(self, why: str | None) -> None:
        """Post this process's outcome without waiting for the others': `why` its part failed (the
        others' barriers give up), or None when it was written (a process that ends with an
        error after its part of a save was written does not fail that save)."""
        self._post("outcome", why or "")

    def settle(self, why: str | None) -> str | None:
        """Post this process's outcome (`why` it failed, None if its part was written or it gave
        up for another's failure) and wait for every process's: the reason the save failed, naming
        the process ("process 1: File too large"), or None when it was saved everywhere."""
        return self._gather("outcome", why, "did not report the outcome of its part")

    def agree(self, problem: str | None) -> str | None:
        """The first problem any process found before the save (None: none did); every process
        gets the same answer (the checks before a save: writable, enough space)."""
        return self._gather("check", problem, "did not check its disk")

    def _gather(self, what: str, failure: str | None, late: str) -> str | None:
        """Post `failure` (None: none) under `what`, wait (bounded) for every process's: the first
        failure, named, or None; `late` says what a process missing at the bound did not do."""
        self._post(what, failure or "")
        deadline = time.monotonic() + self.timeout_s
        while len(posts := self._posts(what)) < self._n:
            if time.monotonic() > deadline:
                return f"{_missing(posts, self._n)} {late} within {self.timeout_s:.0f} s"
            time.sleep(POLL_S)
        failed = {i: w for i, w in posts.items() if w}
        return _name(failed) if failed else None

    def shared(self, what: str, value: str | None) -> str:
        """Process 0's `value` (the others pass None and wait for it, bounded): a decision that
        every process must take alike although each sees the disk at another moment."""
        key = f"{self._current}{what}"
        if self._me == 0:
            self._client.key_value_set(key, value or "", allow_overwrite=True)
            return value or ""
        return self._client.blocking_key_value_get(key, int(self.timeout_s * 1000))


def _name(failed: dict[int, str]) -> str:
    """'process I: reason' of the first failed process (the others named by number)."""
    first = min(failed)
    more = sorted(set(failed) - {first})
    return f"process {first}: {failed[first]}" + (f" (and process(es) {', '.join(map(str, more))})" if more else "")


def _missing(came: dict[int, str], n: int) -> str:
    return "process(es) " + ", ".join(str(i) for i in range(n) if i not in came)
