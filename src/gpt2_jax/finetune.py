"""Fine-tuning data: prompt/completion pairs -> batches whose loss counts only completion tokens.

The GPT-2 paper frames tasks as modelling p(output | input); fine-tuning on pairs maximizes that
conditional likelihood by giving prompt targets weight 0 in the batch "mask" that
`gpt2_jax.step.loss_terms` already applies. Each example is `prompt + completion + <|endoftext|>`
(the end token teaches the model where to stop), the prompt and completion tokenized separately,
exactly as `gpt2_jax.generate` sees them at sampling time.

Pairs come from a jsonl file, one JSON object per line: {"prompt": ..., "completion": ...} by
default, or any fields rendered through two templates, e.g. prompt_template="{article}\\nTL;DR:"
and completion_template=" {summary}" (a `\\n` typed in a template is a newline).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpt2_jax import jsonl
from gpt2_jax.config import ConfigError
from gpt2_jax.tokenizer import EOT_ID


def _template_fields(template: str, name: str) -> list[str]:
    """The plain field names of a str.format template (attribute/index access refused)."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{name} {template!r} is not a valid template ({e})") from None
    for _, field, spec, conv in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conv:
            raise ConfigError(f"{name} {template!r}: use plain {{field}} names, not {{{field}}}")
        fields.append(field)
    return fields


def read_pairs(
    path: str | Path, prompt_template: str = "{prompt}", completion_template: str = "{completion}"
) -> list[tuple[str, str]]:
    """(prompt, completion) strings from a jsonl file, rendered through the two templates.

    `\\n` and `\\t` written in a template (as typed on a command line) become newline and tab.
    """
    prompt_template, completion_template = (
        t.replace("\\n", "\n").replace("\\t", "\t") for t in (prompt_template, completion_template)
    )
    fields = _template_fields(prompt_template, "prompt_template") + _template_fields(
        completion_template, "completion_template"
    )
    path = Path(path)
    pairs = []
    for where, rec in jsonl.read_objects(path, ConfigError, "fine-tuning data"):
        for f in fields:
            if not isinstance(rec.get(f), str):
                raise ConfigError(f"{where}: field {f!r} is missing or not a string")
        prompt, completion = prompt_template.format(**rec), completion_template.format(**rec)
        if not prompt or not completion.strip():
            raise ConfigError(f"{where}: empty prompt or completion")
        pairs.append((prompt, completion))
    if not pairs:
        raise ConfigError(f"fine-tuning data {path} holds no examples")
    return pairs


def encode_pairs(pairs: Sequence[tuple[str, str]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (prompt, completion + <|endoftext|>), the prompt cut from the left to fit.

    An example needs at least one prompt token and its whole completion within seq_len + 1 tokens.
    """
    from gpt2_jax.tokenizer import encode_batch

    prompts = encode_batch([p for p, _ in pairs])
    completions = encode_batch([c for _, c in pairs])
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        c = c + [EOT_ID]
        if len(c) + 1 > seq_len + 1:
            raise ConfigError(
                f"example {i + 1}: completion of {len(c) - 1} tokens does not fit seq_len={seq_len} (raise seq_len)"
            )
        out.append((p[-(seq_len + 1 - len(c)):], c))
    return out


def pack_example(prompt: Sequence[int], completion: Sequence[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens int32 [seq_len + 1] (padded with <|endoftext|>) and mask float32 [seq_len].

    mask[j] weighs the prediction of tokens[j + 1]: 1 exactly for completion tokens.
    """
    seq = list(prompt) + list(completion)
    tokens = np.full(seq_len + 1, EOT_ID, np.int32)
    tokens[: len(seq)] = seq
    mask = np.zeros(seq_len, np.float32)
    mask[len(prompt) - 1 : len(seq) - 1] = 1.0
    return tokens, mask


def longest(examples: Sequence[tuple[list[int], list[int]]]) -> int:
    """Tokens in the longest example (the smallest seq_len + 1 that holds every one uncut)."""
    return max(len(p) + len(c) for p, c in examples)


class PairLoader:
    """Endless batches {"tokens" [rows, seq_len+1], "mask" [rows, seq_len]} of shuffled examples.

    Each epoch is a fresh permutation drawn from (seed, epoch), so the batch of step s depends only
    on (seed, s) and resuming needs only the step. This process takes rows
    [shard_index * rows, ... + rows) of each global batch.
    """

    def __init__(self, examples, seq_len: int, global_batch: int, seed: int, shard_index: int = 0, shard_count: int = 1):
        self.packed = [pack_example(p, c, seq_len) for p, c in examples]
        self.global_batch, self.seed = global_batch, seed
        self.rows = global_batch // shard_count
        self.first = shard_index * self.rows
        self.step = 0

    def _index(self, k: int) -> int:
        n = len(self.packed)
        return int(np.random.default_rng([self.seed, k // n]).permutation(n)[k % n])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.step * self.global_batch + self.first
        rows = [self.packed[self._index(k)] for k in range(start, start + self.rows)]
        self.step += 1
        return {"tokens": np.stack([t for t, _ in rows]), "mask": np.stack([m for _, m in rows])}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def eval_batches(examples, seq_len: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every example once, in order, in batches of `batch_size` (the last padded with weight-0 rows)."""
    packed = [pack_example(p, c, seq_len) for p, c in examples]
    out = []
    for i in range(0, len(packed), batch_size):
        chunk = packed[i : i + batch_size]
        tokens = np.full((batch_size, seq_len + 1), EOT_ID, np.int32)
        mask = np.zeros((batch_size, seq_len), np.float32)
        for r, (t, m) in enumerate(chunk):
            tokens[r], mask[r] = t, m
        out.append({"tokens": tokens, "mask": mask})
    return out


def split_validation(examples: list, min_examples: int = 20, fraction: float = 0.05) -> tuple[list, list]:
    """(train, validation): the last 5% held out when there are at least 20 examples, else none."""
    if len(examples) < min_examples:
        return examples, []
    n_val = max(1, int(len(examples) * fraction))
    return examples[:-n_val], examples[-n_val:]


# --------------------------------------------------------------------------------------------
# The fine-tuning data of gpt2_jax.train (finetune_data=); init_from= weights come from gpt2_jax.weights


def read_examples(tcfg, mcfg) -> tuple[list, int]:
    """(the encoded examples of `finetune_data=`, the sequence length that training uses for them).

    seq_len 0 means: just long enough for the longest example (at most the context). Reads the
    file only, so the training plan can compile its step for that length before anything else.
    """
    pairs = read_pairs(tcfg.finetune_data, tcfg.prompt_template, tcfg.completion_template)
    examples = encode_pairs(pairs, tcfg.seq_len or mcfg.n_ctx)
    return examples, tcfg.seq_len or min(mcfg.n_ctx, longest(examples) - 1)


def load_data(tcfg, examples, seq_len: int, eval_batch_size: int):
    """(train batches, this process's validation batches) of `read_examples`'s examples.

    The last 5% of the examples are held out for validation when there are at least 20; otherwise
    the validation loss is measured on the training examples.
    """
    import jax

    train_ex, val_ex = split_validation(examples)
    n, i = jax.process_count(), jax.process_index()
    train = PairLoader(train_ex, seq_len, tcfg.batch_size, tcfg.seed, shard_index=i, shard_count=n)
    rows = eval_batch_size // n
    val = [{k: v[i * rows:(i + 1) * rows] for k, v in b.items()} for b in eval_batches(val_ex or train_ex, seq_len, eval_batch_size)]
    if tcfg.eval_batches:
        val = val[: tcfg.eval_batches]
    return train, val
