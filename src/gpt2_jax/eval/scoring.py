"""Batched, jitted, sharded scoring of token sequences: log-probabilities and greedy hits.

Every evaluation reduces to one question asked of many token rows: for each target token, what is
its log-probability given the tokens before it in the row, and is it the model's argmax? Rows are
sorted by length, padded on the right to a power-of-two bucket (so only about log2(n_ctx) shapes are
ever compiled) and cut into batches whose rows are split over the devices of the placement, which
also holds the parameters the way training does (FSDP over every device by default). Right padding
never changes real positions: attention is causal.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax import sharding
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import GPT2, abstract_params, length_bucket, lm_head
from gpt2_jax.sharding import bounded


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


def _score_batch(
    model: GPT2, K: int, excluded_V: np.ndarray | None, params: Any, tokens_BL: jax.Array, n_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Log-probs [B, K] of the last K targets of each row (row b has n_B[b] targets; entries before
    its first target are junk) and whether each is the model's argmax [B, K] (the argmax over the
    tokens not marked in `excluded_V` when it is given).

    The vocabulary projection dominates small models, so it is applied only at the K scored
    positions: the final hidden states are gathered first, then the tied LM head (`model.lm_head`).
    """
    cfg = model.config
    inputs_BT, targets_BT = tokens_BL[:, :-1], tokens_BL[:, 1:]
    T = inputs_BT.shape[1]
    x_BTD = model.apply({"params": params}, inputs_BT, return_hidden=True)
    idx_BK = jnp.clip(n_B[:, None] - K + jnp.arange(K)[None, :], 0, T - 1)
    x_BKD = jnp.take_along_axis(x_BTD, idx_BK[..., None], axis=1)
    logits_BKV = lm_head(cfg, params["wte"], x_BKD)
    targets_BK = jnp.take_along_axis(targets_BT, idx_BK, axis=1)
    lse_BK = jax.nn.logsumexp(logits_BKV, axis=-1)
    target_logit_BK = jnp.take_along_axis(logits_BKV, targets_BK[..., None], axis=-1)[..., 0]
    if excluded_V is not None:
        logits_BKV = jnp.where(jnp.asarray(excluded_V)[None, None, :], -jnp.inf, logits_BKV)
    return target_logit_BK - lse_BK, jnp.argmax(logits_BKV, axis=-1) == targets_BK


class Scorer:
    """Scores token rows with one model placed like training's (default: FSDP over every device,
    or over `devices`).

    `batch_size` rows are scored per call; it is rounded up to a multiple of the data-parallel size.
    """

    def __init__(
        self, config: ModelConfig, params: Any, *, batch_size: int = 8, devices: Sequence[Any] | None = None,
        placement: sharding.Placement | None = None,
    ):
        self.config = config
        if placement is None:
            placement = sharding.placement(config, devices=list(devices) if devices is not None else jax.local_devices())
        self.placement = placement
        n = sharding.data_parallel_size(self.placement.mesh)
        self.batch_size = -(-max(1, batch_size) // n) * n
        self._rows = sharding.batch_sharding(self.placement.mesh)
        # On a mesh over several processes (a multi-host training run's) every process passes the same
        # rows and reads every result.
        self._results = sharding.result_sharding(self.placement.mesh)
        self.params = self.placement.place(abstract_params(config), params)
        self._fns: dict[int, Any] = {}
        self.tokens_scored = 0
        # Called before each batch is dispatched: a training run's agreed stop may raise there, at
        # the same batch on every process.
        self.between: Callable[[], None] | None = None

    def use_params(self, params: Any) -> None:
        """Score with `params` from now on (a training run's current weights), placed like the first
        ones; the compiled functions are kept."""
        self.params = self.placement.place(abstract_params(self.config), params)

    @property
    def mesh(self):
        return self.placement.mesh

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    def _dispatch(
        self, tokens_BL: np.ndarray, n_B: np.ndarray, K: int, exclude: frozenset[int] = frozenset()
    ) -> tuple[jax.Array, jax.Array]:
        if (K, exclude) not in self._fns:  # one jitted function per K; each compiles once per row length
            excluded_V = None
            if exclude:
                excluded_V = np.zeros(self.config.vocab_size, bool)
                excluded_V[sorted(exclude)] = True
            self._fns[K, exclude] = self.placement.jit(
                functools.partial(_score_batch, GPT2(self.config), K, excluded_V),
                in_shardings=(self.placement.param_shardings(abstract_params(self.config)), self._rows, self._rows),
                out_shardings=(self._results, self._results),
            )
        put = lambda a: jax.device_put(np.asarray(a, np.int32), self._rows)
        return self._fns[K, exclude](self.params, put(tokens_BL), put(n_B))

    def _run(self, tokens_BL: np.ndarray, n_B: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
        logp, hit = jax.device_get(self._dispatch(tokens_BL, n_B, K))
        return np.asarray(logp, np.float64), np.asarray(hit)

    def score_array(self, tokens_BL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-probs and argmax hits [B, L-1] of every target of a ready batch (B = batch_size)."""
        B, L = tokens_BL.shape
        self.tokens_scored += B * (L - 1)
        return self._run(tokens_BL, np.full(B, L - 1), L - 1)

    def score(
        self, rows: Sequence[np.ndarray], n_scored: Sequence[int] | None = None, desc: str = "scoring",
        *, exclude: frozenset[int] = frozenset(),
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each row of 2..n_ctx+1 tokens, (log-probs float64, argmax hits) of its last
        `n_scored[i]` targets (default all len-1 of them). A hit is a target that is the argmax
        over the vocabulary less the token ids in `exclude` (log-probs are over all of it)."""
        n_scored = [len(r) - 1 for r in rows] if n_scored is None else list(n_scored)
        for r, k in zip(rows, n_scored):
            if not 2 <= len(r) <= self.n_ctx + 1 or not 1 <= k <= len(r) - 1:
                raise ValueError(f"row of {len(r)} tokens scoring {k}; rows need 2..n_ctx+1={self.n_ctx + 1} tokens")
        # Group rows of similar length and scored count: few distinct (T, K) shapes get compiled.
        order = sorted(range(len(rows)), key=lambda i: (-length_bucket(len(rows[i]) - 1, self.n_ctx), -n_scored[i]))
        out: list[Any] = [None] * len(rows)
        B = self.batch_size
        groups = [order[b0 : b0 + B] for b0 in range(0, len(order), B)]

        def dispatch(idx):
            if self.between is not None:
                self.between()
            T = max(length_bucket(len(rows[i]) - 1, self.n_ctx) for i in idx)
            K = min(T, max(length_bucket(n_scored[i], self.n_ctx) for i in idx))
            batch, n_B = np.zeros((B, T + 1), np.int32), np.ones(B, np.int32)
            for j, i in enumerate(idx):
                batch[j, : len(rows[i])] = rows[i]
                n_B[j] = len(rows[i]) - 1
            return self._dispatch(batch, n_B, K, frozenset(exclude))

        # The next batch runs while this one is read back; never more than two in flight.
        results = bounded(dispatch, groups)
        for idx, (logp, hit) in tqdm(zip(groups, results), total=len(groups), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
            logp, K = np.asarray(logp, np.float64), logp.shape[1]
            for j, i in enumerate(idx):
                k = n_scored[i]
                out[i] = (logp[j, K - k :], hit[j, K - k :])
                self.tokens_scored += k
        return out

    def score_sequences(
        self, seqs: Sequence[np.ndarray], first_targets: Sequence[int] | None = None, *, stride: int,
        desc: str = "scoring", exclude: frozenset[int] = frozenset(),
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence, log-probs and hits of targets [first_target, len) (default 1), windowed
        (hits as `score`'s, with `exclude`).

        Sequences longer than n_ctx + 1 are split by `sliding_windows`; all windows of all
        sequences are batched together.
        """
        rows, owners = [], []
        for s, seq in enumerate(seqs):
            first = 1 if first_targets is None else first_targets[s]
            for w in sliding_windows(len(seq), self.n_ctx, stride, first):
                rows.append(np.asarray(seq[w.start : w.end + 1], np.int32))
                owners.append((s, w.skip))
        scored = self.score(rows, [len(r) - 1 - skip for r, (_, skip) in zip(rows, owners)], desc, exclude=exclude)
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in seqs]
        for (s, _), pair in zip(owners, scored):
            parts[s].append(pair)
        return [
            (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps])) if ps
            else (np.zeros(0), np.zeros(0, bool))
            for ps in parts
        ]
