"""Whole-file writes that are never seen half done: a temporary sibling, then one rename.

Every output the project writes as a whole (configs, reports, predictions, plots, token shards,
converted weights, params-only checkpoints) goes through `atomic_path`, so a crash or a full disk
leaves either the old file or the new one, never a truncated one. On an object store (a gs:// or
s3:// path, `gpt2_jax.storage`) a file is one upload, which the store shows only once complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from gpt2_jax import storage


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file (or create a directory) at; on success
    it is renamed to `path`, on an exception it is removed.

    The temporary name is hidden (a leading dot: no glob for the final names matches it) and keeps
    the suffix (matplotlib and others pick the format from it). For a gs:// or s3:// `path` the
    temporary path is local and is uploaded on success (a directory file by file, its top-level
    files last).
    """
    if storage.is_url(path):
        yield from _uploaded_path(path)
        return
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


def _uploaded_path(url) -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpt2_jax-upload-") as staging:
        tmp = Path(staging) / storage.path(url).name
        yield tmp
        if tmp.is_dir():
            # The folder's own files last (config.json of a params checkpoint, a manifest): a
            # reader that looks for them finds everything else already there.
            for f in sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda f: (f.parent == tmp, str(f))):
                storage.upload(f, storage.join(url, *f.relative_to(tmp).parts))
        else:
            storage.upload(tmp, url)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    if storage.is_url(path):
        storage.write_bytes(path, data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Add `text` at the end of a file. An object store has no append: the object is read and
    rewritten whole (for small files that grow rarely: logs, the config history)."""
    if storage.is_url(path):
        p = storage.path(path)
        old = p.read_bytes() if p.exists() else b""
        storage.write_bytes(path, old + text.encode("utf-8"))
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


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
