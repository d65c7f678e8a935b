"""Batched, jitted, sharded scoring of token sequences: log-probabilities and greedy hits.

Every evaluation reduces to one question asked of many token rows: for each target token, what is
its log-probability given the tokens before it in the row, and is it the model's argmax? Rows are
sorted by length, padded on the right to a power-of-two bucket (so only about log2(n_ctx) shapes are
ever compiled) and cut into batches that are sharded over a 1-D `data` mesh of all local devices.
Right padding never changes real positions: attention is causal.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from gpt2_jax.config import ModelConfig
from gpt2_jax.model import GPT2

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Window:
    """Inputs `tokens[start:end]` predict `tokens[start+1:end+1]`; the first `skip` targets were
    scored by an earlier window (or are context) and are not counted."""

    start: int
    end: int
    skip: int


def sliding_windows(n_tokens: int, n_ctx: int, stride: int, first_target: int = 1) -> list[Window]:
    """Windows of at most `n_ctx` inputs that score each target in [first_target, n_tokens) once.

    Targets are cut into chunks: the first up to `n_ctx` long, the rest `stride` long. A chunk
    [p, q) is scored by the window whose inputs are the `n_ctx` tokens before q, so each target
    after the first chunk sees at least `n_ctx - stride` tokens of context, and targets at the end
    of a long prefix (LAMBADA's last word, a CBT query) see the longest context that fits.
    """
    if not 0 < stride <= n_ctx:
        raise ValueError(f"stride must be in [1, n_ctx={n_ctx}], got {stride}")
    if first_target < 1:
        raise ValueError("the first token has no context and cannot be a target")
    out, p, size = [], first_target, n_ctx
    while p < n_tokens:
        q = min(n_tokens, p + size)
        end = q - 1
        start = max(0, end - n_ctx)
        out.append(Window(start, end, p - 1 - start))
        p, size = q, stride
    return out


def _bucket(n: int, n_ctx: int) -> int:
    return min(n_ctx, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


def _score_batch(model: GPT2, params: Any, tokens_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Target log-probs [B, L-1] and whether each target is the argmax [B, L-1]."""
    inputs_BT, targets_BT = tokens_BL[:, :-1], tokens_BL[:, 1:]
    logits_BTV = model.apply({"params": params}, inputs_BT)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_logit_BT - lse_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


class Scorer:
    """Scores token rows with one model on all local devices (or `devices`).

    `batch_size` rows are scored per call; it is rounded up to a multiple of the device count.
    """

    def __init__(self, config: ModelConfig, params: Any, *, batch_size: int = 8, devices: Sequence[Any] | None = None):
        devices = list(devices) if devices is not None else jax.local_devices()
        self.config = config
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = -(-max(1, batch_size) // len(devices)) * len(devices)
        replicated = NamedSharding(self.mesh, P())
        self._rows = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(params, replicated)
        self._fn = jax.jit(
            functools.partial(_score_batch, GPT2(config)),
            in_shardings=(replicated, self._rows),
            out_shardings=(self._rows, self._rows),
        )
        self.tokens_scored = 0

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    def score_array(self, tokens_BL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-probs and argmax hits [B, L-1] of a ready batch (B = batch_size, L <= n_ctx + 1)."""
        logp, hit = self._fn(self.params, jax.device_put(np.asarray(tokens_BL, np.int32), self._rows))
        self.tokens_scored += tokens_BL.shape[0] * (tokens_BL.shape[1] - 1)
        return np.asarray(logp, np.float64), np.asarray(hit)

    def score(self, rows: Sequence[np.ndarray], desc: str = "scoring") -> list[tuple[np.ndarray, np.ndarray]]:
        """For each row of 2..n_ctx+1 tokens: (log-probs [len-1] float64, argmax hits [len-1] bool)."""
        for r in rows:
            if not 2 <= len(r) <= self.n_ctx + 1:
                raise ValueError(f"row of {len(r)} tokens; rows need 2..n_ctx+1={self.n_ctx + 1} tokens")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[Any] = [None] * len(rows)
        B = self.batch_size
        for b0 in tqdm(range(0, len(order), B), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
            idx = order[b0 : b0 + B]
            T = _bucket(len(rows[idx[0]]) - 1, self.n_ctx)
            batch = np.zeros((B, T + 1), np.int32)
            for j, i in enumerate(idx):
                batch[j, : len(rows[i])] = rows[i]
            logp, hit = self._fn(self.params, jax.device_put(batch, self._rows))
            logp, hit = np.asarray(logp, np.float64), np.asarray(hit)
            for j, i in enumerate(idx):
                n = len(rows[i]) - 1
                out[i] = (logp[j, :n], hit[j, :n])
                self.tokens_scored += n
        return out

    def score_sequences(
        self, seqs: Sequence[np.ndarray], first_targets: Sequence[int] | None = None, *, stride: int, desc: str = "scoring"
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence, log-probs and hits of targets [first_target, len) (default 1), windowed.

        Sequences longer than n_ctx + 1 are split by `sliding_windows`; all windows of all
        sequences are batched together.
        """
        rows, owners = [], []
        for s, seq in enumerate(seqs):
            first = 1 if first_targets is None else first_targets[s]
            for w in sliding_windows(len(seq), self.n_ctx, stride, first):
                rows.append(np.asarray(seq[w.start : w.end + 1], np.int32))
                owners.append((s, w.skip))
        scored = self.score(rows, desc)
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in seqs]
        for (s, skip), (logp, hit) in zip(owners, scored):
            parts[s].append((logp[skip:], hit[skip:]))
        return [
            (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps])) if ps
            else (np.zeros(0), np.zeros(0, bool))
            for ps in parts
        ]
