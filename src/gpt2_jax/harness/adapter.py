"""The model `gpt2_jax` for lm-evaluation-harness: importing this module registers it.

`loglikelihood` and `loglikelihood_rolling` run on the evaluation `Scorer` (batched by length,
parameters FSDP-sharded and rows split over this process's devices), `generate_until` on the
KV-cached `Generator`; `--model_args model=` takes any source `weights.load` takes. The only
module that imports lm_eval (`pip install 'gpt2_jax[harness]'`).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval lists its own models only in an empty registry: first)
import numpy as np
from lm_eval.__main__ import HarnessCLI, setup_logging
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from gpt2_jax import weights
from gpt2_jax.checkpoint import CheckpointError
from gpt2_jax.config import ConfigError
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.generate import Generator, SamplingConfig
from gpt2_jax.storage import StorageError
from gpt2_jax.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer

MODEL_NAME = "gpt2_jax"


class HarnessError(Exception):
    """A command line that cannot run: no tasks (exit_code 2), or a `model=` that is not a model (1)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@register_model(MODEL_NAME)
class GPT2JaxLM(TemplateLM):
    """A gpt2_jax model as an lm-evaluation-harness LM.

    Args (`--model_args`): model (any source `weights.load` takes), batch_size (rows per scoring
    call and prompts per generation call; `--batch_size` works too), max_gen_toks (default 256, as
    lm-eval's HF backend), allow_nonfinite.
    """

    def __init__(self, model: str, batch_size: int | str = 8, max_gen_toks: int | str = 256,
                 allow_nonfinite: bool | str = False, **_ignored: Any):
        super().__init__()
        if str(batch_size).startswith("auto"):
            batch_size = 8
        config, params = weights.load(model, allow_nonfinite=str(allow_nonfinite).lower() in ("true", "1"))
        self.scorer = Scorer(config, params, batch_size=int(batch_size))
        self.generator = Generator(config, self.scorer.params, self.scorer.placement)
        self._max_gen_toks = int(max_gen_toks)
        self.model_path = str(model)

    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    @property
    def max_length(self) -> int:
        return self.scorer.n_ctx

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        # GPT-2 adds no special tokens; "<|endoftext|>" written in a text is that token, as in HF's tokenizer.
        return get_tokenizer().encode(string, allowed_special={EOT_TOKEN})

    def tok_decode(self, tokens: list[int]) -> str:
        return get_tokenizer().decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per request: the row
        is context + continuation, cut from the left to the last n_ctx + 1 tokens as lm-eval's HF
        backend does (a continuation longer than n_ctx is scored over several windows)."""
        seqs = [np.array(ctx + cont, np.int32) for _, ctx, cont in requests]
        firsts = [len(ctx) for _, ctx, _ in requests]
        scored = self.scorer.score_sequences(seqs, firsts, stride=self.max_length, desc="loglikelihood")
        out = []
        for (key, _, _), (logp, hit) in zip(requests, scored):
            answer = (float(logp.sum()), bool(hit.all()))
            self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole text, `<|endoftext|>` before its first token, over
        non-overlapping windows of n_ctx predictions that each see as much context as fits (the
        windows of lm-eval's `get_rolling_token_windows` with context 1)."""
        seqs = [np.array([self.eot_token_id, *self.tok_encode(text)], np.int32) for (text,) in (r.args for r in requests)]
        scored = self.scorer.score_sequences(seqs, stride=self.max_length, desc="loglikelihood_rolling")
        out = []
        for request, (logp, _) in zip(requests, scored):
            total = float(logp.sum())
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, decoded greedily unless `do_sample` is set, cut before the
        first `until` string (and at `<|endoftext|>`), as lm-eval's HF backend returns them. The
        context keeps its last n_ctx - max_gen_toks tokens."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, leave=False)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            until.append(self.tok_decode([self.eot_token_id]))
            n_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            sampling = self._sampling(kwargs, n_new)
            # Longest prompts first, so each batch holds prompts of one length bucket or two.
            order = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for b0 in range(0, len(order), self.batch_size):
                batch = order[b0 : b0 + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in batch]
                # A full batch every call: one compilation per prompt bucket, not per batch size.
                prompts += [prompts[-1]] * (self.batch_size - len(prompts))
                result = self.generator.generate_tokens(prompts, sampling, seed=int(kwargs.get("seed", 0)), truncate="left")
                for i, row in zip(batch, result.rows()):
                    text = self.tok_decode(row)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    @staticmethod
    def _sampling(kwargs: dict[str, Any], n_new: int) -> SamplingConfig:
        """lm-eval's generation kwargs as a SamplingConfig: greedy unless do_sample (or a temperature
        above 0 without do_sample=False) asks for sampling."""
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        do_sample = kwargs.get("do_sample")
        sample = bool(do_sample) if do_sample is not None else temperature > 0
        if not sample:
            return SamplingConfig(max_new_tokens=n_new, greedy=True)
        return SamplingConfig(max_new_tokens=n_new, temperature=temperature or 1.0, top_k=int(kwargs.get("top_k", 0) or 0),
                              top_p=float(kwargs.get("top_p", 1.0) or 1.0))

    def get_model_info(self) -> dict[str, Any]:
        return {"model": self.model_path, "config": self.scorer.config.to_dict()}


def run_lm_eval(argv: list[str]) -> None:
    """lm-eval's own command line (`lm_eval ARGS`), in this process where `gpt2_jax` is registered
    (lm_eval.__main__.cli_evaluate, with `check_run` between parsing and running)."""
    saved, sys.argv = sys.argv, ["lm_eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        if getattr(args, "command", None) == "run":
            check_run(args)
        parser.execute(args)
    finally:
        sys.argv = saved


def check_run(args) -> None:
    """Refuse, before lm-eval indexes its tasks (seconds) and loads the model, a `--model gpt2_jax`
    whose `model=` is missing or not a model, then a run without tasks (HarnessError, one line)."""
    if args.model == MODEL_NAME:
        source = (args.model_args or {}).get("model")
        if source is None:
            raise HarnessError(f"--model {MODEL_NAME} needs --model_args model=PATH "
                               "(a checkpoint, run directory, HF directory or random:SIZE)", exit_code=2)
        try:
            weights.load_config(str(source))
        except (CheckpointError, ConfigError, StorageError, OSError) as e:
            raise HarnessError(f"--model_args model={source}: {e}") from e
    if not args.tasks and not args.config:
        raise HarnessError("no tasks: pass --tasks NAME[,NAME...] (lm-eval's task names, e.g. hellaswag,arc_easy; "
                           "`python -m gpt2_jax.harness ls tasks` lists them)", exit_code=2)
