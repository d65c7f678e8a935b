"""`python -m gpt2_jax.eval`: load a model, run tasks, print a table and write a JSON report."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpt2_jax.config import PRESETS, ConfigError, ModelConfig
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.eval.tasks import DATA_DIR_ENV, PAPER_SOURCE, SPLITS, TASKS, EvalError, Options, parse_tasks

PAPER_NAMES = {"small": "117M", "medium": "345M", "large": "762M", "xl": "1542M"}


def load_model(path: str | os.PathLike) -> tuple[ModelConfig, Any, str]:
    """(config, params, kind) from an HF GPT-2 directory, a params-only checkpoint, a training run
    or a step directory of one (resolved by `checkpoint.load_model`)."""
    from gpt2_jax import checkpoint

    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"--model {path}: not a directory")
    hf_weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    kind = "huggingface" if any((path / w).is_file() for w in hf_weights) else "gpt2_jax"
    try:
        config, params = checkpoint.load_model(path)
    except (checkpoint.CheckpointError, ConfigError, OSError) as e:
        raise EvalError(f"--model {path}: {e}") from e
    return config, params, kind


def params_sha256(params: Any) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (the weights' identity)."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for key, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(key)}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def paper_size(cfg: ModelConfig) -> str | None:
    """The released GPT-2 size whose shape `cfg` has (small/medium/large/xl), else None."""
    for size in PAPER_NAMES:
        p = PRESETS[size]
        if (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx, cfg.vocab_size) == (
            p["n_layer"], p["n_embd"], p["n_head"], 1024, 50257
        ):
            return size
    return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def evaluate(
    config: ModelConfig,
    params: Any,
    tasks: list[str],
    opts: Options,
    *,
    batch_size: int = 8,
    model_info: dict[str, Any] | None = None,
    devices=None,
) -> dict[str, Any]:
    """Run `tasks` and return the full report (model identity, protocol settings, every figure)."""
    size = paper_size(config)
    scorer = Scorer(config, params, batch_size=batch_size, devices=devices)
    report: dict[str, Any] = {
        "model": {
            **(model_info or {}),
            "config": config.to_dict(),
            "params_sha256": params_sha256(params),
            "paper_size": PAPER_NAMES.get(size or ""),
        },
        "protocol": {
            "split": opts.split,
            "n_ctx": config.n_ctx,
            "stride": opts.stride_for(scorer),
            "limit": opts.limit,
            "document_prefix": "<|endoftext|>",
            "data_dir": str(opts.data_dir),
            "webtext_dataset": opts.dataset,
            "batch_size": scorer.batch_size,
            "devices": [str(d) for d in scorer.mesh.devices.flat],
        },
        "paper_source": PAPER_SOURCE,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tasks": {},
    }
    for name in tasks:
        task = TASKS[name]
        before, t0 = scorer.tokens_scored, time.perf_counter()
        result = task.run(scorer, opts)
        seconds = time.perf_counter() - t0
        result.pop("correct", None)
        if "file" in result.get("data", {}):
            path = Path(result["data"]["file"])
            result["data"]["sha256"] = digest = _file_sha256(path)
            known = task.released_sha256.get(f"{path.parent.name}/{path.name}")
            result["data"]["matches_release"] = None if known is None else digest == known
        result["protocol"] = task.protocol
        result["paper"] = {metric: figures[size] for metric, figures in task.paper.items()} if size else {}
        result["seconds"] = seconds
        result["tokens_per_second"] = (scorer.tokens_scored - before) / seconds if seconds else None
        report["tasks"][name] = result
    return report


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if abs(x) >= 10 else f"{x:.4f}"


def render_table(report: dict[str, Any], *, compare_paper: bool = False, markdown: bool = False) -> str:
    """The report's figures as a table: plain aligned columns, or Markdown."""
    paper_col = f"paper ({report['model'].get('paper_size') or 'no matching size'})"
    header = ["task", "metric", "value"] + ([paper_col] if compare_paper else [])
    rows = []
    for task, result in report["tasks"].items():
        for metric, value in result["metrics"].items():
            row = [task, metric, _fmt(value)]
            if compare_paper:
                row.append(_fmt(result["paper"].get(metric)))
            rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    notes = []
    if report["protocol"]["limit"] is not None:
        notes.append(f"limited to the first {report['protocol']['limit']} documents/examples/lines/bytes per task")
    altered = [t for t, r in report["tasks"].items() if r.get("data", {}).get("matches_release") is False]
    if altered:
        notes.append(f"data files that differ from the released ones: {', '.join(altered)}")
    if compare_paper:
        notes.append(f"paper: {PAPER_SOURCE}; acc in %")
    return "\n".join(lines + [f"({n})" for n in notes])


def _finite(x: Any) -> Any:
    """NaN/inf (an empty split's perplexity) -> None, so the report is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _data_layout() -> str:
    lines = ["data files under --data-dir (test split shown):"]
    for task in TASKS.values():
        f = task.data.for_split("test")
        lines.append(f"  {task.name:<12} {f.relpath:<36} from {f.url}")
    lines.append("  (valid split: the same names with valid / valid_2000ex; enwik8/text8 split one file 90/5/5;")
    lines.append("   lm1b: without that file, the TFDS catalog's lm1b, which needs TensorFlow: pip install 'gpt2_jax[tf]')")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
                        help="data split (default test, as in the paper; LAMBADA and lm1b always use test)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding-window stride in tokens for long texts (default half the context)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per batch over all devices (rounded up to a multiple of the device count)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N documents / examples (webtext, lambada, cbt, lm1b), lines "
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
    parser.add_argument("--output", default="eval_results.json", help="JSON report path (default eval_results.json)")
    args = parser.parse_args(argv)
    try:
        tasks = parse_tasks(args.task)
        if args.data_dir is None:
            raise EvalError(f"no data directory: pass --data-dir or set ${DATA_DIR_ENV}")
        if args.stride is not None and args.stride < 1:
            raise EvalError(f"--stride must be positive, got {args.stride}")
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            raise EvalError("--batch-size and --limit must be positive")
        config, params, kind = load_model(args.model)
        if args.stride is not None and args.stride > config.n_ctx:
            raise EvalError(f"--stride {args.stride} exceeds the model's context n_ctx={config.n_ctx}")
        opts = Options(Path(args.data_dir), split=args.split, stride=args.stride, limit=args.limit,
                       dataset=args.dataset, cache_dir=args.cache_dir)
        info = {"path": str(Path(args.model).absolute()), "kind": kind}
        report = evaluate(config, params, tasks, opts, batch_size=args.batch_size, model_info=info)
        _write_json(Path(args.output), report)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(render_table(report, compare_paper=args.compare == "paper", markdown=args.markdown))
    print(f"wrote {args.output}")
    return 0
