"""`python -m gpt2_jax.generate`: sample text from a model, or run the paper's zero-shot task
prompts (`gpt2_jax.generate.tasks`) over a jsonl file and score them."""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path

import jax

from gpt2_jax import convert, memory, weights
from gpt2_jax.checkpoint import CheckpointError
from gpt2_jax.storage import StorageError
from gpt2_jax.config import ConfigError
from gpt2_jax.generate import EOT_ID, GenerationError, Generator, SamplingConfig, encode_prompt, prompt_bucket, tasks
from gpt2_jax.tokenizer import get_tokenizer


class _TextStream:
    """Writes the decoded text of one row as tokens arrive (UTF-8 split across tokens handled)."""

    def __init__(self, out, row: int = 0):
        self.enc, self.out, self.row = get_tokenizer(), out, row
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, t, tokens_B, active_B):
        if active_B[self.row]:
            self.out.write(self.decoder.decode(self.enc.decode_single_token_bytes(int(tokens_B[self.row]))))
            self.out.flush()

    def close(self):
        self.out.write(self.decoder.decode(b"", final=True))
        self.out.flush()


def _sampling_from_args(args, **defaults) -> SamplingConfig:
    kw = dict(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p,
    )
    kw.update({k: v for k, v in defaults.items() if getattr(args, k, None) is None})
    kw = {k: v for k, v in kw.items() if v is not None}
    return SamplingConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gpt2_jax.generate",
        description="Sample text from a GPT-2 model, or run the paper's zero-shot task prompts over a jsonl file.",
    )
    p.add_argument("--model", required=True,
                   help="gpt2_jax checkpoint, training run directory, HF GPT-2 directory, or random:SIZE "
                        "(random weights of a size preset, for testing)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue (<|endoftext|> in it is the special token)")
    src.add_argument("--prompt-file", help="file whose UTF-8 text is the prompt")
    src.add_argument("--unconditional", action="store_true", help="sample from <|endoftext|> alone")
    src.add_argument("--task", choices=sorted(tasks.TASKS), help="zero-shot task format from the GPT-2 paper, run over --input")
    p.add_argument("--input", help="with --task: a jsonl file of task records (see gpt2_jax.generate.tasks for the fields), "
                                   "or for coqa a CoQA JSON file (coqa-dev-v1.0.json)")
    p.add_argument("--output", help="with --task: write one jsonl record per input with the prediction")
    p.add_argument("--shots", type=int, default=None,
                   help="with --task translate/qa: use the first N records as in-context examples and score the rest")
    p.add_argument("--limit", type=int, default=None, help="with --task: score at most this many records")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the prompt, generated as one batch")
    p.add_argument("--batch-size", type=int, default=8, help="with --task: records generated per batch")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate per sample (default 100; with --task, the task's: "
                        "summarize 100, translate 64, qa and coqa 32)")
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=None,
                   help="always take the most likely token (--no-greedy samples; default: sample, except for the "
                        "translate, qa and coqa tasks)")
    p.add_argument("--temperature", type=float, default=None, help="divide logits by this before sampling (default 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens; 0 = all (default 40, as the paper's samples; "
                        "--task summarize: 2, as the paper's summaries)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same text")
    p.add_argument("--allow-nonfinite", action="store_true", help="load weights that hold NaN or inf (refused by default)")
    p.add_argument("--truncate", choices=("error", "left"), default="error",
                   help="a prompt longer than the context minus --max-new-tokens: refuse it, or keep its last tokens")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    expected = (GenerationError, ConfigError, convert.ConversionError, CheckpointError,
                tasks.TaskError, StorageError, OSError)
    try:
        if args.task is None and args.prompt is None and args.prompt_file is None and not args.unconditional:
            raise GenerationError("give --prompt, --prompt-file, --unconditional or --task")
        if args.task is None and (args.input or args.output):
            raise GenerationError("--input/--output go with --task")
        if args.num_samples < 1 or args.batch_size < 1:
            raise GenerationError("--num-samples and --batch-size must be positive")
        if not 0 <= args.seed < 2**32:  # a 32-bit seed: a larger one would wrap around silently
            raise GenerationError(f"--seed must be in [0, {2**32 - 1}], got {args.seed}")
        if args.task is not None:
            sampling = _sampling_from_args(args, **tasks.TASKS[args.task].sampling)
        else:
            sampling = _sampling_from_args(args, max_new_tokens=100, top_k=40)
        if args.task is not None and not args.input:
            raise GenerationError("--task needs --input FILE.jsonl")
        if args.task is not None:
            records = tasks.read_records(args.input, args.task)  # check the file before loading a model
        elif args.unconditional:
            prompt_tokens = [EOT_ID]
        else:
            text = args.prompt if args.prompt is not None else _read_prompt_file(args.prompt_file)
            prompt_tokens = encode_prompt(text)
        cfg = weights.load_config(args.model)
        rows = min(args.batch_size, len(records)) if args.task is not None else args.num_samples
        prompt_len = cfg.n_ctx - sampling.max_new_tokens if args.task is not None else len(prompt_tokens)
        preflight(cfg, rows, prompt_len, sampling.max_new_tokens)
        cfg, params = weights.load(args.model, seed=args.seed, allow_nonfinite=args.allow_nonfinite)
        gen = Generator(cfg, params)
        if args.task is not None:
            report = tasks.run_task(
                gen, args.task, records, sampling, shots=args.shots, limit=args.limit, batch_size=args.batch_size,
                seed=args.seed, truncate=args.truncate, output=args.output,
            )
            print(json.dumps(report, indent=2))
            return 0
        _sample_cli(gen, prompt_tokens, sampling, args)
    except expected as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def preflight(cfg, rows: int, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, before any weight is read, a generation that cannot fit the local devices (the rows
    split over them when they divide evenly, the parameters FSDP-sharded over them)."""
    if max_new_tokens >= cfg.n_ctx:
        return  # refused with its reason when the prompts are fitted
    n = len(jax.local_devices())
    bucket = prompt_bucket(max(1, prompt_len), cfg.n_ctx, max_new_tokens)
    estimate = memory.generate_estimate(
        cfg, rows_per_device=rows // n if rows % n == 0 else rows, prompt_len=bucket,
        total_len=bucket + max_new_tokens, param_shards=n,
    )
    memory.check(estimate, f"generating {rows} row(s) of {bucket} + {max_new_tokens} tokens",
                 "lower --num-samples (--batch-size with --task) or --max-new-tokens")


def _read_prompt_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise GenerationError(f"prompt file {path} does not exist")
    if p.stat().st_size > 1 << 24:
        raise GenerationError(f"prompt file {path} is larger than 16 MiB")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(f"prompt file {path} is not UTF-8 text") from e


def _sample_cli(gen: Generator, prompt_tokens: list[int], sampling: SamplingConfig, args) -> None:
    prompts = [prompt_tokens] * args.num_samples
    if args.num_samples == 1:
        stream = _TextStream(sys.stdout)
        gen.generate_tokens(prompts, sampling, seed=args.seed, truncate=args.truncate, on_tokens=stream)
        stream.close()
        sys.stdout.write("\n")
        return
    result = gen.generate_tokens(prompts, sampling, seed=args.seed, truncate=args.truncate)
    enc = get_tokenizer()
    for i, row in enumerate(result.rows()):
        print(f"{'=' * 30} SAMPLE {i + 1} {'=' * 30}")
        print(enc.decode(row))
