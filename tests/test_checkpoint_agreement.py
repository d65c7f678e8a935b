"""How the processes of a pod agree on a save's outcome (`gpt2_jax.checkpoint.agreement`), with two
agreements as the two processes, threads as their background savers, and a dictionary standing in
for the distributed runtime's key-value store. The real thing on two processes, with a file-size
limit on one, is tests/test_pod_faults.py (slow)."""

from __future__ import annotations

import threading
import time

import pytest

from gpt2_jax.checkpoint import agreement as A
from helpers import KeyValueStore


def _pod(timeout_s: float = 5.0) -> list[A.SaveAgreement]:
    store, pod = KeyValueStore(), []
    prefix = None
    for i in range(2):
        a = A.SaveAgreement(store, timeout_s)
        a._me, a._n = i, 2
        prefix = prefix or a._prefix  # both processes' first Checkpointer: the same keys
        a._prefix = prefix
        pod.append(a)
    for a in pod:
        a.begin()
    return pod


def _both(fn0, fn1):
    """fn0 and fn1 run at once (as two processes); their results, or the exceptions they raised."""
    out = [None, None]

    def run(i, fn):
        try:
            out[i] = fn()
        except Exception as e:  # returned for the test to look at
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate((fn0, fn1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_a_save_written_everywhere_is_saved_everywhere():
    p0, p1 = _pod()
    assert _both(lambda: p0.barrier("written", 5000), lambda: p1.barrier("written", 5000)) == [None, None]
    assert _both(lambda: p0.settle(None), lambda: p1.settle(None)) == [None, None]


def test_a_part_that_failed_on_one_process_fails_the_save_on_both_and_names_it():
    """Process 1's write failed: process 0's background barrier gives up at once (instead of
    waiting out Orbax's 20 minutes), and both settle on the same reason, naming process 1."""
    p0, p1 = _pod()

    def process_0():  # its background thread at the barrier, then its main thread's settle
        start = time.monotonic()
        with pytest.raises(A.SaveAbandoned, match="process 1: "):
            p0.barrier("written", 60_000)
        return time.monotonic() - start, p0.settle(None)  # its own part was abandoned, not failed

    (waited, settled0), settled1 = _both(process_0, lambda: p1.settle("[Errno 27] File too large"))
    assert waited < 5
    assert settled0 == settled1 == "process 1: [Errno 27] File too large"


def test_the_checks_before_a_save_are_shared():
    p0, p1 = _pod()
    assert _both(lambda: p0.agree(None), lambda: p1.agree("not enough disk space")) == ["process 1: not enough disk space"] * 2


def test_a_process_that_never_answers_is_named_within_the_bound():
    p0, _ = _pod(timeout_s=0.3)
    assert p0.settle(None) == "process(es) 1 did not report the outcome of its part within 0 s"
    with pytest.raises(TimeoutError, match="process\\(es\\) 1 did not finish writing"):
        p0.barrier("written", 300)


def test_each_save_has_its_own_keys():
    p0, p1 = _pod()
    assert _both(lambda: p0.settle("disk full"), lambda: p1.settle(None)) == ["process 0: disk full"] * 2
    p0.begin(), p1.begin()  # the next save: the earlier failure is not this one's
    assert _both(lambda: p0.settle(None), lambda: p1.settle(None)) == [None, None]


def test_the_old_checkpoints_to_delete_are_process_0s_choice():
    """Process 1 may list the folder while process 0 deletes: both delete what process 0 chose."""
    p0, p1 = _pod()
    assert _both(lambda: p0.shared("prune", "[4]"), lambda: p1.shared("prune", None)) == ["[4]", "[4]"]
