"""`python -m gpt2_jax.eval`: load a model, run tasks, print a table and write a JSON report (the
work itself is `report.evaluate`, `report.render_table` and `report.write_report`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import jax

from gpt2_jax import memory, storage, weights
from gpt2_jax.checkpoint import CheckpointError
from gpt2_jax.config import ConfigError, ModelConfig
from gpt2_jax.eval.report import evaluate, render_table, write_report
from gpt2_jax.eval.tasks import DATA_DIR_ENV, SPLITS, TASKS, EvalError, Options, parse_tasks


def load_model(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[ModelConfig, Any, str]:
    """(config, params, kind) of `--model` through the one loader (`weights.load`); kind is
    "huggingface" for an HF directory and "gpt2_jax" for the project's own checkpoints."""
    try:
        path = storage.path(path)
    except storage.StorageError as e:
        raise EvalError(f"--model {e}") from None
    if not path.is_dir():
        raise EvalError(f"--model {path}: not a directory")
    try:
        kind = "huggingface" if weights.kind(path) == "huggingface" else "gpt2_jax"
        config, params = weights.load(path, allow_nonfinite=allow_nonfinite)
    except (CheckpointError, ConfigError, OSError) as e:
        raise EvalError(f"--model {path}: {e}") from e
    return config, params, kind


def preflight(path: str | os.PathLike, batch_size: int) -> None:
    """Refuse, before any weight is read, a batch that cannot fit the local devices (the Scorer
    places the parameters FSDP over them and scores windows of up to n_ctx tokens)."""
    try:
        path = storage.path(path)
    except storage.StorageError:
        return  # load_model says why
    if not path.is_dir():
        return  # load_model says why
    try:
        cfg = weights.load_config(path)
    except (CheckpointError, ConfigError, OSError) as e:
        raise EvalError(f"--model {path}: {e}") from e
    n = len(jax.local_devices())
    estimate = memory.eval_estimate(cfg, rows_per_device=-(-batch_size // n), seq_len=cfg.n_ctx, param_shards=n)
    try:
        memory.check(estimate, f"scoring batches of {batch_size} rows of {cfg.n_ctx} tokens", "lower --batch-size")
    except memory.PreflightError as e:
        raise EvalError(str(e)) from None


def parse_stride(text: str | None) -> int | str | None:
    """--stride: a positive number of tokens, 'half' or 'n_ctx' (None: not given)."""
    if text is None or text in ("half", "n_ctx"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise EvalError(f"--stride must be a positive number of tokens, 'half' or 'n_ctx', got {text!r}")
    return int(text)


def _data_layout() -> str:
    lines = ["data files under --data-dir (test split shown):"]
    for task in TASKS.values():
        f = task.data.for_split("test")
        lines.append(f"  {task.name:<12} {f.relpath:<36} from {f.url}")
    lines.append("  (valid split: the same names with valid / valid_2000ex; enwik8/text8 split one file 90/5/5;")
    lines.append("   lm1b: without that file, the copy in the archive a TFDS catalog build of lm1b downloaded, if any)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_jax.eval",
        description="Evaluate a GPT-2 on the GPT-2 paper's zero-shot language-modeling tasks.",
        epilog=_data_layout(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="a gpt2_jax params-only checkpoint, a training run or checkpoint directory, "
                             "or a Hugging Face GPT-2 directory (config.json + weights, converted on the fly)")
    parser.add_argument("--task", required=True,
                        help=f"comma-separated tasks: {', '.join(TASKS)}, or all")
    parser.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV),
                        help=f"directory with one folder per data set (default ${DATA_DIR_ENV})")
    parser.add_argument("--split", default="test", choices=SPLITS,
                        help="data split (default test, as in the paper; LAMBADA and lm1b always use test, "
                             "HellaSwag its validation set)")
    parser.add_argument("--stride", default=None,
                        help="sliding-window stride for long texts: tokens, 'half' (the default: each window "
                             "after the first re-reads half the context) or 'n_ctx' (non-overlapping windows)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per batch over all devices (rounded up to a multiple of the device count)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N documents / examples (webtext, lambada, cbt, lm1b, hellaswag), lines "
                             "(wikitext, ptb) or bytes of the split (enwik8, text8), for quick runs")
    parser.add_argument("--dataset", default=None,
                        help="webtext task: score the validation split of this prepared data set "
                             "(a gpt2_jax.data name such as openwebtext or tiny_shakespeare) instead of "
                             "OpenAI's webtext.SPLIT.jsonl; --limit then counts batches")
    parser.add_argument("--cache-dir", default=None,
                        help="where prepared data sets are kept (default $GPT2_JAX_CACHE_DIR or ~/.cache/gpt2_jax)")
    parser.add_argument("--compare", choices=["paper"], default=None,
                        help="'paper': add the GPT-2 paper's Table 3 figure for the model's size")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--output", default="eval_results.json", help="JSON report path, a gs:// or s3:// URL too (default eval_results.json)")
    parser.add_argument("--allow-nonfinite", action="store_true", help="load weights that hold NaN or inf (refused by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tasks = parse_tasks(args.task)
        stride = parse_stride(args.stride)
        if args.data_dir is None:
            raise EvalError(f"no data directory: pass --data-dir or set ${DATA_DIR_ENV}")
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            raise EvalError("--batch-size and --limit must be positive")
        preflight(args.model, args.batch_size)
        config, params, kind = load_model(args.model, allow_nonfinite=args.allow_nonfinite)
        if isinstance(stride, int) and stride > config.n_ctx:
            raise EvalError(f"--stride {stride} exceeds the model's context n_ctx={config.n_ctx}")
        opts = Options(Path(args.data_dir), split=args.split, stride=stride, limit=args.limit,
                       dataset=args.dataset, cache_dir=args.cache_dir)
        info = {"path": str(storage.path(args.model)), "kind": kind}
        report = evaluate(config, params, tasks, opts, batch_size=args.batch_size, model_info=info)
        write_report(storage.path(args.output), report)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(render_table(report, compare_paper=args.compare == "paper", markdown=args.markdown))
    print(f"wrote {args.output}")
    return 0
