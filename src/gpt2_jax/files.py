"""Whole-file writes that are never seen half done: a temporary sibling, then one rename.

Every output the project writes as a whole (configs, reports, predictions, plots, token shards,
converted weights, params-only checkpoints) goes through `atomic_path`, so a crash or a full disk
leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file (or create a directory) at; on success
    it is renamed to `path`, on an exception it is removed.

    The temporary name is hidden (a leading dot: no glob for the final names matches it) and keeps
    the suffix (matplotlib and others pick the format from it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite_or_none(x: Any) -> Any:
    """`x` with every non-finite float (NaN, inf) replaced by None, recursively: strict JSON, which
    `json.dumps` otherwise breaks by writing NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text of `obj` (non-finite floats as null)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """`obj` as strict JSON (non-finite floats as null), written atomically."""
    write_text(path, dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
