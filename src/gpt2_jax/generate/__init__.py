"""Text generation: prefill a key/value cache, then decode every new token inside one jitted call.

A batch of prompts is left-padded to a length bucket (powers of two), with `input_mask` 0 on the
padding and per-row positions so each row's real tokens start at position 0. The cache is a
fixed-size buffer of `bucket + max_new_tokens` slots. Prefill, sampling and the whole decode loop
(`lax.while_loop`) are one jitted function, so a generation compiles once per (batch size, bucket,
max_new_tokens, sampling mode) and never per token. Streaming goes through an ordered
`io_callback` from inside that loop, so it does not split the generation into several calls.
A caller that must be able to stop a generation part-way (a training run's sample, when a pod
agrees to stop) asks for it in chunks: prefill and the first token as one program, then a decode
program called once per chunk of tokens with a host callback between calls; both programs compile
once and the tokens are the same.
The model's prefill and decode steps are pure functions of `gpt2_jax.step`; the paper's generation
tasks (prompts, postprocessing, metrics) are `gpt2_jax.generate.tasks`.

Parameters are placed like training's (`sharding.Placement`: FSDP over every device by default), so
a model that trains on 8 chips also samples on them. The command line is `gpt2_jax.generate.cli`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from gpt2_jax import sharding
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import abstract_params, length_bucket
from gpt2_jax.step import decode_step, prefill
from gpt2_jax.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer


class GenerationError(ValueError):
    """Generation settings or prompts that cannot be used."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How new tokens are chosen.

    greedy: argmax (ignores temperature, top_k, top_p). top_k: keep the k most likely tokens
    (0 = all; the paper's samples used 40). top_p: keep the smallest set of most likely tokens whose
    probability reaches p (nucleus sampling; 1.0 = all). eot_id: stop a row when it emits this token
    (None: only `max_new_tokens` stops). stop_ids: more tokens that stop a row (say, every token
    holding a newline); like eot_id they are not part of the row.
    """

    max_new_tokens: int = 100
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eot_id: int | None = EOT_ID
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise GenerationError(f"temperature must be a finite number > 0 (use greedy for argmax), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.stop_ids, tuple) and all(isinstance(t, int) and t >= 0 for t in self.stop_ids)):
            raise GenerationError(f"stop_ids must be a tuple of token ids, got {self.stop_ids!r}")


@dataclasses.dataclass
class GenerationResult:
    """tokens: int32 [B, max_new_tokens], rows padded with `pad_id` after they stop.
    lengths: new tokens per row before the stop token (or max_new_tokens)."""

    tokens: np.ndarray
    lengths: np.ndarray

    def rows(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


# --------------------------------------------------------------------------------------------
# Sampling


def nucleus_threshold(probs_BV: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Per row, the smallest probability t such that the tokens more likely than t hold < top_p mass.

    Nucleus sampling keeps token i iff the tokens strictly more likely than i hold less than top_p,
    which is exactly p_i >= t. t is found by bisection over the bit patterns of non-negative
    float32 values (ordered like the values), 31 passes over the vocabulary instead of a full sort
    (sorting 50,257 logits costs far more than a decode step on a CPU).
    """
    B = probs_BV.shape[0]

    def mass_above(bits_B):
        t_B1 = jax.lax.bitcast_convert_type(bits_B, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs_BV > t_B1, probs_BV, 0.0), axis=-1)

    def body(_, bounds):
        lo_B, hi_B = bounds  # mass_above(hi) < top_p <= mass_above(lo); lo = -1 stands for "below 0"
        mid_B = lo_B + (hi_B - lo_B) // 2
        below = mass_above(mid_B) < top_p
        return jnp.where(below, lo_B, mid_B), jnp.where(below, mid_B, hi_B)

    one = jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32)
    lo_B, hi_B = jnp.full((B,), -1, jnp.int32), jnp.full((B,), one, jnp.int32)
    _, hi_B = jax.lax.fori_loop(0, 31, body, (lo_B, hi_B))
    return jax.lax.bitcast_convert_type(hi_B, jnp.float32)


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: jax.Array | float | None) -> tuple[jax.Array, jax.Array | None]:
    """Mask logits outside the top-k / nucleus sets with -inf.

    Returns (logits, index): with top_k > 0, `logits` are the k best candidates sorted in
    descending order and `index` maps them back to vocabulary ids; otherwise index is None.
    """
    if top_k:
        vals_BK, idx_BK = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))
        if top_p is not None:
            probs_BK = jax.nn.softmax(vals_BK, axis=-1)
            before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK  # mass of strictly more likely tokens
            # The most likely token is always kept, so the set is never empty.
            keep_BK = (before_BK < top_p) | (jnp.arange(vals_BK.shape[-1]) == 0)[None, :]
            vals_BK = jnp.where(keep_BK, vals_BK, -jnp.inf)
        return vals_BK, idx_BK
    if top_p is not None:
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        keep_BV = probs_BV >= nucleus_threshold(probs_BV, top_p)[:, None]
        return jnp.where(keep_BV, logits_BV, -jnp.inf), None
    return logits_BV, None


def sample_logits(
    logits_BV: jax.Array,
    key: jax.Array,
    *,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    temperature: jax.Array | float = 1.0,
    top_p: jax.Array | float = 1.0,
) -> jax.Array:
    """One token id per row: argmax, or a draw after temperature, top-k and top-p (in that order)."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled_BV = logits_BV.astype(jnp.float32) / temperature
    vals, idx = filter_logits(scaled_BV, top_k, top_p if use_top_p else None)
    choice_B = jax.random.categorical(key, vals, axis=-1)
    if idx is None:
        return choice_B.astype(jnp.int32)
    return jnp.take_along_axis(idx, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# The decode loop


class TokenStream:
    """Where a Generator's decode loop sends each token as it is produced: to the `on_tokens` of the
    call in progress. The compiled program calls this object, which stays the same from call to call
    (a new callable per call would compile a new program); the call sets and clears its sink."""

    def __init__(self):
        self.sink: Callable[[int, np.ndarray, np.ndarray], None] | None = None

    def __call__(self, t, tokens_B, active_B):
        if self.sink is not None:
            self.sink(int(t), np.asarray(tokens_B), np.asarray(active_B))

    @contextlib.contextmanager
    def sending_to(self, sink: Callable[[int, np.ndarray, np.ndarray], None] | None):
        """Tokens go to `sink` while the block runs (None: the block does not stream)."""
        if sink is None:
            yield
            return
        if self.sink is not None:
            raise GenerationError("this Generator is already streaming a generation")
        self.sink = sink
        try:
            yield
        finally:
            self.sink = None


class Carry(NamedTuple):
    """The decode loop's state between steps: `t` is the next token's index, `tok_B` the last tokens."""

    t: jax.Array
    tok_B: jax.Array
    out_BN: jax.Array
    lengths_B: jax.Array
    done_B: jax.Array
    state: Any


def decoder(
    step_fn: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]],
    positions_B: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    eot_id: int | None,
    stream: Callable[[Any, jax.Array, jax.Array], None] | None = None,
    stop_ids: tuple[int, ...] = (),
) -> tuple[Callable[[Any, jax.Array], Carry], Callable[[Carry, Any], Carry]]:
    """The two parts of `decode_loop` (call under jit): `start(state, logits_BV)` samples and emits
    the first token; `run(carry, t_end)` decodes until token `t_end` (or until every row stopped).

    The loop may be run in one piece, `run(start(...), max_new_tokens)`, or in several calls, each
    its own program with `t_end` traced (so one compilation serves them all): the tokens are the
    same, as token t's key is `fold_in(key, t)` whichever call draws it.
    """
    pad = eot_id if eot_id is not None else 0
    stops = tuple(stop_ids) + ((eot_id,) if eot_id is not None else ())
    sample = functools.partial(
        sample_logits, greedy=greedy, top_k=top_k, use_top_p=use_top_p, temperature=temperature, top_p=top_p
    )

    def emit(t, tok_B, done_B, out_BN, lengths_B):
        active_B = ~done_B
        out_BN = out_BN.at[:, t].set(jnp.where(active_B, tok_B, pad))
        stop_B = active_B & jnp.isin(tok_B, jnp.array(stops, jnp.int32)) if stops else jnp.zeros_like(done_B)
        lengths_B = lengths_B + (active_B & ~stop_B).astype(jnp.int32)
        if stream:  # None (or False): no streaming
            io_callback(stream, None, t, tok_B, active_B & ~stop_B, ordered=True)
        return out_BN, lengths_B, done_B | stop_B

    def start(state, logits_BV) -> Carry:
        B = logits_BV.shape[0]
        out_BN = jnp.full((B, max_new_tokens), pad, jnp.int32)
        tok_B = sample(logits_BV, jax.random.fold_in(key, 0))
        out_BN, lengths_B, done_B = emit(0, tok_B, jnp.zeros((B,), bool), out_BN, jnp.zeros((B,), jnp.int32))
        return Carry(jnp.array(1, jnp.int32), tok_B, out_BN, lengths_B, done_B, state)

    def body(carry: Carry) -> Carry:
        t, tok_B, out_BN, lengths_B, done_B, state = carry
        logits_BV, state = step_fn(state, tok_B[:, None], (positions_B + t - 1)[:, None])
        tok_B = sample(logits_BV, jax.random.fold_in(key, t))
        out_BN, lengths_B, done_B = emit(t, tok_B, done_B, out_BN, lengths_B)
        return Carry(t + 1, tok_B, out_BN, lengths_B, done_B, state)

    def run(carry: Carry, t_end) -> Carry:
        return jax.lax.while_loop(lambda c: (c.t < t_end) & ~jnp.all(c.done_B), body, carry)

    return start, run


def decode_loop(
    step_fn: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]],
    state: Any,
    logits_BV: jax.Array,
    positions_B: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    **sampling: Any,
) -> tuple[jax.Array, jax.Array]:
    """Sample up to `max_new_tokens` tokens per row with a `lax.while_loop` (call under jit).

    step_fn(state, tokens_B1, positions_B1) -> (next logits [B, V], state) is the model with its
    cache (or a fake in tests); `logits_BV` are the logits after the prompt; `positions_B` the
    position of the first new token; `sampling` the rest of `decoder`'s settings. A row that emits
    `eot_id` (or one of `stop_ids`) stops; its later slots hold eot_id. `stream(t, tokens_B,
    active_B)`, when given, is called on the host with each step's tokens, in order. Returns
    (tokens [B, max_new_tokens], lengths [B]).
    """
    start, run = decoder(step_fn, positions_B, key, max_new_tokens=max_new_tokens, **sampling)
    carry = run(start(state, logits_BV), max_new_tokens)
    return carry.out_BN, carry.lengths_B


def left_pad(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to [B, bucket]; returns (tokens, lengths)."""
    tokens = np.full((len(prompts), bucket), pad_id, np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    for row, p in zip(tokens, prompts):
        if len(p):
            row[bucket - len(p):] = p
    return tokens, lengths


# The settings that shape a generation's programs: static arguments of each. The logical rules are
# one (they shape the traced program; Flax reads them from a context variable that jit's cache
# would not see).
_STATIC = ("cfg", "rules", "max_new_tokens", "greedy", "top_k", "use_top_p", "eot_id", "stream", "stop_ids")


def _model_decoder(params, lengths_B, seed, temperature, top_p, *, cfg, max_new_tokens, **sampling):
    """`decoder` on the model and its cache (call under jit, inside the logical rules), its start
    preceded by the prefill: (begin(tokens_BP) -> carry, run(carry, t_end) -> carry)."""

    def step(cache, tok_B1, pos_B1):
        logits, cache = decode_step(cfg, params, cache, tok_B1, pos_B1)
        return logits[:, -1], cache

    start, run = decoder(step, lengths_B, jax.random.key(seed), max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, **sampling)

    def begin(tokens_BP) -> Carry:
        logits_BV, cache, _, _ = prefill(cfg, params, tokens_BP, lengths_B, tokens_BP.shape[1] + max_new_tokens)
        return start(cache, logits_BV)

    return begin, run


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_jit(params, tokens_BP, lengths_B, seed, temperature, top_p, *, rules, max_new_tokens, **kw):
    """The whole generation, prefill and every new token, as one program: (tokens, lengths)."""
    with nn.logical_axis_rules(rules):
        begin, run = _model_decoder(params, lengths_B, seed, temperature, top_p, max_new_tokens=max_new_tokens, **kw)
        carry = run(begin(tokens_BP), max_new_tokens)
        return carry.out_BN, carry.lengths_B


@functools.partial(jax.jit, static_argnames=_STATIC)
def _start_jit(params, tokens_BP, lengths_B, seed, temperature, top_p, *, rules, **kw) -> Carry:
    """A generation in chunks, its first program: prefill and the first token."""
    with nn.logical_axis_rules(rules):
        begin, _ = _model_decoder(params, lengths_B, seed, temperature, top_p, **kw)
        return begin(tokens_BP)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames="carry")
def _decode_jit(params, carry, lengths_B, seed, temperature, top_p, t_end, *, rules, **kw) -> Carry:
    """A generation in chunks, its next chunk: the tokens up to `t_end` (traced: one compilation for
    every chunk). The carry, cache included, is donated: each chunk updates it in place."""
    with nn.logical_axis_rules(rules):
        _, run = _model_decoder(params, lengths_B, seed, temperature, top_p, **kw)
        return run(carry, t_end)


def prompt_bucket(length: int, n_ctx: int, max_new_tokens: int) -> int:
    """The padded prompt length: the length bucket of `length`, capped so the cache fits."""
    return length_bucket(length, n_ctx - max_new_tokens)


def fit_prompts(
    prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, truncate: str = "error"
) -> list[list[int]]:
    """Check prompts against the vocabulary and context; left-truncate or refuse long ones."""
    if truncate not in ("error", "left"):
        raise GenerationError(f"truncate must be 'error' or 'left', got {truncate!r}")
    if max_new_tokens >= cfg.n_ctx:
        raise GenerationError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of {cfg.n_ctx} tokens"
        )
    if not prompts:
        raise GenerationError("no prompts given")
    room = cfg.n_ctx - max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary of {cfg.vocab_size}")
        if len(p) > room:
            if truncate == "error":
                raise GenerationError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} at most {room} fit in "
                    f"the context of {cfg.n_ctx} (truncate from the left to keep the last {room})"
                )
            p = p[-room:]
        out.append(p)
    return out


CHUNK = 32  # new tokens per program call when a generation is decoded in chunks


class Generator:
    """A model ready to sample: params placed once (like training's; by default FSDP over this
    process's devices), compiled functions reused."""

    def __init__(self, config: ModelConfig, params, placement: sharding.Placement | None = None):
        self.config = config
        self.placement = placement if placement is not None else sharding.placement(config, devices=jax.local_devices())
        self.params = self.placement.place(abstract_params(config), params)
        self._stream = TokenStream()  # compiled into this Generator's streaming programs

    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig = SamplingConfig(),
        *,
        seed: int = 0,
        truncate: str = "error",
        on_tokens: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
        between: Callable[[], None] | None = None,
        chunk: int | None = None,
    ) -> GenerationResult:
        """Continue a batch of token-id prompts.

        on_tokens(step, tokens_B, active_B) is called from inside the decode loop as each token is
        produced (active_B is False for rows that have stopped); one streaming call at a time.

        With `between` or `chunk`, the new tokens are decoded `chunk` at a time (default CHUNK), one
        call of a compiled program each, and `between()` is called on the host before each call,
        once the previous one has finished; it may raise to abandon the generation (a training
        run's agreed stop: the calls are the same on every process). The tokens are those of the
        single program that runs otherwise.
        """
        cfg, n = self.config, sampling.max_new_tokens
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise GenerationError(f"chunk must be a positive number of tokens, got {chunk!r}")
        prompts = fit_prompts(prompts, cfg, n, truncate)
        bucket = prompt_bucket(max(len(p) for p in prompts), cfg.n_ctx, n)
        tokens, lengths = left_pad(prompts, bucket)
        rows = self.placement.row_sharding(len(prompts))
        eot = sampling.eot_id if sampling.eot_id is not None and sampling.eot_id < cfg.vocab_size else None
        args = (self.params, jax.device_put(tokens, rows), jax.device_put(lengths, rows), np.uint32(seed % 2**32),
                np.float32(sampling.temperature), np.float32(sampling.top_p))
        kw = dict(cfg=cfg, rules=self.placement.rules_for_rows(len(prompts)), max_new_tokens=n, greedy=sampling.greedy,
                  top_k=sampling.top_k if not sampling.greedy else 0,
                  use_top_p=sampling.top_p < 1.0 and not sampling.greedy, eot_id=eot,
                  stream=self._stream if on_tokens is not None else None,
                  stop_ids=tuple(sorted({t for t in sampling.stop_ids if t < cfg.vocab_size})))
        with self._stream.sending_to(on_tokens), jax.set_mesh(self.placement.mesh):
            if between is None and chunk is None:
                out, lens = _generate_jit(*args, **kw)
            else:
                params, _, lengths_B, *drawn = args  # drawn: seed, temperature, top_p
                decode = lambda carry, t_end: _decode_jit(params, carry, lengths_B, *drawn, t_end, **kw)
                carry = run_in_chunks(lambda: _start_jit(*args, **kw), decode, n, chunk or CHUNK, between)
                out, lens = carry.out_BN, carry.lengths_B
            out, lens = np.asarray(out), np.asarray(lens)  # waits, so every callback has run
        return GenerationResult(out, lens)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig(), *, seed: int = 0,
                 truncate: str = "error") -> list[str]:
        """Continue text prompts; returns the new text of each (without the stop token)."""
        enc = get_tokenizer()
        result = self.generate_tokens([encode_prompt(p) for p in prompts], sampling, seed=seed, truncate=truncate)
        return [enc.decode(row) for row in result.rows()]


def run_in_chunks(
    begin: Callable[[], Carry], run: Callable[[Carry, np.ndarray], Carry], max_new_tokens: int, chunk: int,
    between: Callable[[], None] | None = None,
) -> Carry:
    """The decode loop in calls of `chunk` tokens: `begin()`'s carry (the first token) advanced by
    `run(carry, t_end)` until `max_new_tokens`, `between()` before each call once the previous one
    has finished. The number of calls depends on the settings only (never on the rows that stopped),
    so every process of a pod calls `between` alike."""
    carry = begin()
    for t_end in range(1 + chunk, max_new_tokens + chunk, chunk):
        if between is not None:
            jax.block_until_ready(carry)  # `between` runs between chunks, not while they are queued
            between()
        carry = run(carry, np.int32(min(t_end, max_new_tokens)))
    return carry


def encode_prompt(text: str) -> list[int]:
    """Tokenize a prompt (`<|endoftext|>` written in it becomes the special token)."""
    if not text:
        raise GenerationError("the prompt is empty (use --unconditional to sample from <|endoftext|>)")
    tokens = get_tokenizer().encode(text, allowed_special={EOT_TOKEN})
    if all(t == EOT_ID for t in tokens):
        raise GenerationError(
            "the prompt holds only special tokens (use --unconditional to sample from <|endoftext|>)"
        )
    return tokens


