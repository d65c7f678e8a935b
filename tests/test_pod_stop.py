"""Where the processes of a pod stop after a signal (`train.preemption.PodStop`): two to four
stand-in processes sharing a stand-in key-value store, advanced one poll at a time in every order
the pipelined loop allows. The real thing on two processes is tests/test_pod_faults.py (slow)."""

from __future__ import annotations

import random

import pytest

from gpt2_jax.train import preemption as P
from gpt2_jax.train.config import TrainingError
from helpers import KeyValueStore


class Process:
    def __init__(self, store, me: int, n: int):
        self.stop = P.PodStop(store, "test/stop/0/")
        self.stop._me, self.stop._n = me, n
        self.stop._meet = lambda: None  # the bounded barrier: the simulation checks where each one stopped
        self.signal: str | None = None
        self.stopped_at: int | None = None

    def poll(self) -> None:
        if self.stop.poll(self.signal):
            self.stopped_at = self.stop.polls


def _run(n: int, signals: dict[int, list[int]], seed: int, polls: int = 60) -> list[Process]:
    """Advance the processes in a random order that the pipelined loop allows: a process reaches
    poll p only once every other one has done poll p - 2 (it read back work that was
    dispatched after poll p - 2, whose collectives need every process: every other process has
    passed poll p - 2). signals[i] = the polls of process i where a signal arrives."""
    store, rng = KeyValueStore(), random.Random(seed)
    procs = [Process(store, i, n) for i in range(n)]
    while any(p.stopped_at is None and p.stop.polls < polls for p in procs):
        ready = [p for p in procs if p.stopped_at is None and p.stop.polls < polls
                 and all(q.stop.polls >= p.stop.polls - 1 for q in procs if q is not p)]
        p = rng.choice(ready)
        if p.stop.polls + 1 in signals.get(procs.index(p), ()):
            p.signal = "SIGTERM"
        p.poll()
    return procs


@pytest.mark.parametrize("seed", range(40))
def test_every_process_stops_at_the_same_poll_two_after_the_first_signal(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 3, 4])
    signalled = rng.sample(range(n), rng.randint(1, n))
    signals = {i: [rng.randint(5, 20)] for i in signalled}
    procs = _run(n, signals, seed)
    stops = {p.stopped_at for p in procs}
    first = min(min(at) for at in signals.values())
    assert len(stops) == 1 and None not in stops
    assert first + 1 <= stops.pop() <= first + P.LAG + 1  # the poll of the first noticed signal, plus LAG
    assert all(p.stop.reason == "SIGTERM" for p in procs)


def test_the_first_writer_sets_the_stop_and_a_second_one_reads_it():
    store = KeyValueStore()
    a, b = Process(store, 0, 2), Process(store, 1, 2)
    for p in (a, b):
        p.signal = "SIGINT" if p is a else "SIGTERM"
    a.poll()  # a writes its poll (1) + LAG
    b.poll()  # b's write comes second: it takes a's target and reason
    assert a.stop.target == b.stop.target == 1 + P.LAG and b.stop.reason == "SIGINT"
    assert list(store.data.values()) == [f"{1 + P.LAG},SIGINT,0"]


def test_a_process_that_passed_the_stop_before_it_learned_of_it_says_so():
    store = KeyValueStore()
    a, b = Process(store, 0, 2), Process(store, 1, 2)
    for _ in range(4):
        b.poll()  # further ahead than the pipelined loop allows
    a.signal = "SIGTERM"
    a.poll()
    with pytest.raises(TrainingError, match=r"process 1 passed the agreed stop \(poll 3\)"):
        b.poll()


def test_nothing_is_written_while_no_signal_comes():
    store = KeyValueStore()
    procs = [Process(store, i, 2) for i in range(2)]
    for _ in range(10):
        for p in procs:
            p.poll()
    assert store.data == {} and all(p.stopped_at is None for p in procs)
