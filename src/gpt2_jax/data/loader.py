"""Grain input pipelines over a token store: shuffled training windows and sequential eval windows.

Training windows are fixed: window w holds tokens [w*T, w*T + T + 1), so consecutive windows share
one token and every token after the first is a target exactly once per epoch. Every epoch is a
seeded permutation of all the split's windows, and global batch b is the windows at positions
[b*B, (b+1)*B) of the epochs laid end to end, whatever the number of processes; process i of n reads
only its rows [i*B/n, (i+1)*B/n) of it. Grain reads batches ahead in background threads and saves
the position (the next batch index), which is therefore the same on every process and carries over
to another number of processes.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Iterator

import grain
import numpy as np

from gpt2_jax.data.builders import DataError
from gpt2_jax.data.store import SplitTokens


class _Windows:
    """The fixed windows of seq_len + 1 tokens of one split, read one or many at a time."""

    def __init__(self, tokens: SplitTokens, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, w: int) -> np.ndarray:
        start = int(w) * self.seq_len
        return self.tokens.read(start, start + self.seq_len + 1)

    def read_batch(self, ws: np.ndarray) -> np.ndarray:
        """int32 [len(ws), seq_len + 1]: the windows ws."""
        return self.tokens.gather(np.asarray(ws, np.int64) * self.seq_len, self.seq_len + 1)


class _Batches:
    """This process's rows of global batch b of an endless stream of epochs, each a seeded
    permutation of all the windows.

    Stream position p is epoch p // n, slot p % n; the epoch's permutation comes from numpy's
    Generator seeded with (seed, epoch), so any batch can be computed directly, which is what makes
    Grain's saved position (the next batch index) an exact resume point.
    """

    def __init__(self, windows: _Windows, batch_size: int, first: int, rows: int, seed: int):
        self.windows, self.batch_size, self.first, self.rows, self.seed = windows, batch_size, first, rows, seed
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize  # endless

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) >= 4:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            return self._perms[epoch]

    def __getitem__(self, b: int) -> np.ndarray:
        n = len(self.windows)
        start = int(b) * self.batch_size + self.first
        pos = np.arange(start, start + self.rows, dtype=np.int64)
        ws = np.empty_like(pos)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            ws[sel] = self._perm(int(epoch))[pos[sel] % n]
        return self.windows.read_batch(ws)


def _check_shard(shard_index: int, shard_count: int) -> None:
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")


class TrainLoader:
    """Infinite iterator of this process's int32 [batch_size / shard_count, seq_len + 1] rows of
    each global training batch of `batch_size` windows.

    The global batch of a step depends only on (store, split, seq_len, batch_size, seed, step), and
    process `shard_index` of `shard_count` reads its contiguous share of it, so the processes' rows
    in process order are the one-process batch. `get_state()` returns a JSON-serializable dict that
    is the same on every process; `set_state(state)` on a loader built with the same arguments,
    with any number of processes, continues exactly where the saved one stopped.
    """

    def __init__(self, store, split: str = "train", *, seq_len: int, batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, num_threads: int = 2, prefetch: int = 8):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        _check_shard(shard_index, shard_count)
        if batch_size % shard_count:
            raise DataError(f"batch_size={batch_size} does not divide over {shard_count} processes")
        self.tokens = SplitTokens(store, split)
        windows = _Windows(self.tokens, seq_len)
        if not len(windows):
            raise DataError(f"{self.tokens.store}: split {split!r} has {len(self.tokens)} tokens, fewer than "
                            f"one window of {seq_len + 1}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rows = batch_size // shard_count  # this process's share of each global batch
        self.windows_per_epoch = len(windows)  # in the whole split: every epoch visits them all
        # Grain iterates batch indices (its state is the next one) and reads ahead in threads; the
        # shuffle is done here, a batch at a time, because per-element shuffling and batching in
        # Grain cost ~50-300 us per window, more than reading the window.
        ds = grain.MapDataset.source(_Batches(windows, batch_size, shard_index * self.rows, self.rows, seed))
        self._iter = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iter)

    def close(self) -> None:
        """Stop Grain's read-ahead threads (before the store they read from goes away)."""
        self._iter.close()

    def _identity(self) -> dict[str, Any]:
        """The settings the position is valid for; the process count is not one of them."""
        return {"store": self.tokens.fingerprint, "split": self.tokens.split, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed}

    def get_state(self) -> dict[str, Any]:
        """Position of the iterator plus the settings it is only valid for (JSON-serializable)."""
        return {"loader": self._identity(), "grain": self._iter.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `get_state()`'s result; refuses a state saved under other settings."""
        if not isinstance(state, dict) or "grain" not in state or not isinstance(state.get("loader"), dict):
            raise DataError("not a TrainLoader state (needs 'loader' and 'grain')")
        saved = _from_per_process_format(state["loader"])
        if saved != self._identity():
            diff = {k: (v, self._identity().get(k)) for k, v in saved.items() if self._identity().get(k) != v}
            raise DataError(f"loader state was saved with other settings (saved, now): {diff}")
        self._iter.set_state(state["grain"])


def _from_per_process_format(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved loader identity in today's form. The earlier format gave each of shard_count
    processes every shard_count-th window and its own batches; with one process that is today's
    stream exactly, with several it is another order of the data (refused)."""
    if "shard_count" not in saved:
        return saved
    if saved["shard_count"] != 1:
        raise DataError(
            f"loader state was saved by {saved['shard_count']} processes in the earlier per-process format "
            "(each process its own share of the windows), whose data position does not carry over"
        )
    return {k: v for k, v in saved.items() if k not in ("shard_index", "shard_count")}


def eval_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, length, first scored target) of the sequential eval windows over n_tokens tokens.

    Window k starts at k*stride and covers up to seq_len + 1 tokens; it scores only targets no
    earlier window scored, so every target (token 1 .. n-1) is scored exactly once.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise DataError(f"stride={stride} must be in [1, seq_len={seq_len}]")
    out, scored, start = [], 1, 0  # targets [1, scored) are done
    while scored < n_tokens:
        length = min(seq_len + 1, n_tokens - start)
        out.append((start, length, scored - start - 1))
        scored = start + length
        start += stride
    return out


def eval_batches(store, split: str = "validation", *, seq_len: int, batch_size: int, stride: int | None = None,
                 max_batches: int | None = None, shard_index: int = 0,
                 shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Sequential eval batches {"tokens": int32 [b, seq_len+1], "mask": float32 [b, seq_len]}.

    mask is 1 where the target is scored here and 0 for padding and targets an earlier (strided)
    window scored. Window k belongs to process k % shard_count; every process yields the same
    number of batches (padded with all-zero-mask rows) so collective eval steps stay in lockstep.
    """
    _check_shard(shard_index, shard_count)
    tokens = SplitTokens(store, split)
    windows = eval_windows(len(tokens), seq_len, stride)
    per_host = -(-len(windows) // shard_count)
    n_batches = -(-per_host // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    mine = windows[shard_index::shard_count]
    for b in range(n_batches):
        batch_tokens = np.zeros((batch_size, seq_len + 1), np.int32)
        mask = np.zeros((batch_size, seq_len), np.float32)
        rows = mine[b * batch_size:(b + 1) * batch_size]
        full = [r for r, (_, length, _) in enumerate(rows) if length == seq_len + 1]
        if full:
            batch_tokens[full] = tokens.gather([rows[r][0] for r in full], seq_len + 1)
        for r, (start, length, first) in enumerate(rows):
            if length != seq_len + 1:  # the split's last window
                batch_tokens[r, :length] = tokens.read(start, start + length)
            mask[r, first:length - 1] = 1.0
        yield {"tokens": batch_tokens, "mask": mask}
