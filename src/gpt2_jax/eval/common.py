"""What every evaluation task shares: its record (`EvalTask`: data file, code, protocol, published
figures), the run's settings (`Options`), the error type, and the readers of plain data files.

The tasks themselves are in `perplexity` (WebText, WikiText, PTB, enwik8/text8, lm1b) and `accuracy`
(LAMBADA, CBT, HellaSwag); `tasks` holds the registry of their records.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from gpt2_jax import jsonl
from gpt2_jax.data import DATA_DIR_ENV
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.tokenizer import get_tokenizer

SPLITS = ("valid", "test")
LN2 = math.log(2.0)
# Data files are read whole; refuse anything far beyond the largest real one (enwik8, 100 MB).
MAX_FILE_BYTES = 1 << 30


class EvalError(RuntimeError):
    """Bad input to an evaluation: missing or malformed data, unknown task, unusable model."""


@dataclasses.dataclass(frozen=True)
class DataFile:
    """Where a data set's file lives under the data directory and where to download it. `{split}` in
    the three strings stands for the split's name in the release (`split_names`, else the split)."""

    relpath: str
    url: str
    unpack: str  # how to get `relpath` from the download
    split_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def for_split(self, split: str) -> DataFile:
        name = self.split_names.get(split, split)
        return DataFile(self.relpath.format(split=name), self.url.format(split=name), self.unpack.format(split=name))

    def resolve(self, data_dir: Path, task: str) -> Path:
        path = data_dir / self.relpath
        if not path.is_file():
            raise EvalError(
                f"{task}: data file {path} not found; download {self.url} and {self.unpack} "
                f"as {path} (data directory: --data-dir or ${DATA_DIR_ENV})"
            )
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise EvalError(f"{task}: {path} is {size:,} bytes, more than any real {task} file")
        return path


def read_text(path: Path, task: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{task}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_jsonl_texts(path: Path, task: str, limit: int | None) -> list[str]:
    """The "text" field of each line of a JSON-lines file (OpenAI's webtext and LAMBADA format)."""
    texts = []
    try:
        for where, record in jsonl.read_objects(path, EvalError, "data file"):
            if limit is not None and len(texts) >= limit:
                break
            if not isinstance(record.get("text"), str):
                raise EvalError(f'{where}: line has no "text" string')
            texts.append(record["text"])
    except EvalError as e:
        raise EvalError(f"{task}: {e}") from None
    if not texts:
        raise EvalError(f"{task}: {path} holds no documents")
    return texts


def encode(text: str) -> list[int]:
    return get_tokenizer().encode_ordinary(text)


def ppl(nll: float, n: int) -> float:
    return math.exp(nll / n) if n else float("nan")


@dataclasses.dataclass
class Options:
    """Settings shared by all tasks."""

    data_dir: Path
    split: str = "test"
    stride: int | str | None = None  # tokens; "n_ctx": non-overlapping windows; None or "half": n_ctx // 2
    limit: int | None = None  # first N documents / examples / lines / characters (quick runs)
    dataset: str | None = None  # webtext: a prepared data set's validation split instead of the jsonl
    cache_dir: Path | None = None  # where `gpt2_jax.data.prepare` keeps token stores

    def stride_for(self, scorer: Scorer) -> int:
        if self.stride == "n_ctx":
            return scorer.n_ctx
        if self.stride is None or self.stride == "half":
            return max(1, scorer.n_ctx // 2)
        return self.stride


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """One evaluation task and every fact about it."""

    name: str
    data: DataFile  # the file it reads, `{split}` standing for the split
    runner: Callable[[EvalTask, Scorer, Options], dict[str, Any]]  # the protocol's code
    protocol: str  # the protocol in words, copied into every report
    # metric -> released size -> the paper's Table 3 figure (for a task the paper lacks, the published
    # figure of OpenAI's weights that the footnote names; only the sizes it gives): gpt2_jax.published
    paper: dict[str, dict[str, float]]
    # SHA-256 of the released files we have checked (the copies in ../shared/data, see its README),
    # by relpath; a report marks whether its data file is one of them (None: no hash on record).
    released_sha256: dict[str, str] = dataclasses.field(default_factory=dict)
    footnote: str = ""  # printed under a table that compares with the paper (published reproductions)

    def resolve(self, opts: Options) -> Path:
        """The task's data file for `opts.split` under `opts.data_dir` (EvalError where it is missing)."""
        return self.data.for_split(opts.split).resolve(opts.data_dir, self.name)

    def run(self, scorer: Scorer, opts: Options) -> dict[str, Any]:
        """Metrics, counts and data source of the task on `scorer`'s model."""
        return self.runner(self, scorer, opts)
