"""Running tasks on a model and reporting them: `evaluate` (the full report, strict JSON when
written by `write_report`), `render_table`, and the model's identity (`params_sha256`, `paper_size`)."""

from __future__ import annotations

import datetime
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpt2_jax import files
from gpt2_jax.config import PRESETS, ModelConfig
from gpt2_jax.eval.common import Options
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.eval.tasks import TASKS
from gpt2_jax.published import PAPER_SOURCE

PAPER_NAMES = {"small": "117M", "medium": "345M", "large": "762M", "xl": "1542M"}


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
            "windows": "non-overlapping" if opts.stride_for(scorer) == config.n_ctx else "overlapping",
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
        if task.footnote:
            result["footnote"] = task.footnote
        result["paper"] = {metric: figures[size] for metric, figures in task.paper.items() if size in figures}
        result["seconds"] = seconds
        result["tokens_per_second"] = (scorer.tokens_scored - before) / seconds if seconds else None
        report["tasks"][name] = result
    return report


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if abs(x) >= 10 else f"{x:.4f}"


# Metrics computed from sliding-window log-likelihoods: their table rows show the stride.
_WINDOWED = ("ppl", "bits")


def render_table(report: dict[str, Any], *, compare_paper: bool = False, markdown: bool = False) -> str:
    """The report's figures as a table: plain aligned columns, or Markdown. Perplexity and
    bits rows show the window stride they were scored with."""
    paper_col = f"paper ({report['model'].get('paper_size') or 'no matching size'})"
    header = ["task", "metric", "value", "stride"] + ([paper_col] if compare_paper else [])
    rows = []
    for task, result in report["tasks"].items():
        for metric, value in result["metrics"].items():
            stride = result.get("stride") if metric.startswith(_WINDOWED) else None
            row = [task, metric, _fmt(value), "-" if stride is None else str(stride)]
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
        notes += [r["footnote"] for r in report["tasks"].values() if r.get("footnote")]
    notes = [f"({n})" for n in notes]
    if markdown and notes:  # a Markdown table ends at a blank line; each note is a paragraph after it
        return "\n".join(lines) + "\n\n" + "\n\n".join(notes)
    return "\n".join(lines + notes)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """`report` as strict JSON (NaN/inf as null), replacing `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, report, sort_keys=False)
