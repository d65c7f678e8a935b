"""JSON-lines files from users (evaluation sets, fine-tuning pairs, prompt tasks): one JSON object
per line, blank lines skipped, and every problem reported as one line naming the file and line.
`read_document` reads a file that is one JSON document (CoQA's format) with the same checks.

The project's own logs (a run's metrics.jsonl and config_history.jsonl) are read with
`read_tolerant` instead: a line cut short by a kill is skipped, not an error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from gpt2_jax import storage

MAX_BYTES = 1 << 30  # larger files are refused rather than read into memory


def read_tolerant(path) -> tuple[list[dict[str, Any]], int]:
    """(the JSON objects of a JSON-lines log, in file order; the number of non-blank lines that are
    not objects). A missing file has none. `path` may be a gs:// or s3:// URL."""
    path = storage.path(path)
    if not path.is_file():
        return [], 0
    records, skipped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _checked(path: str | Path, error: type[Exception], what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    if path.stat().st_size > MAX_BYTES:
        raise error(f"{what} {path} is larger than {MAX_BYTES:,} bytes")
    return path


def read_document(path: str | Path, error: type[Exception], what: str = "input file") -> Any:
    """The JSON value a file holds; a missing, oversized, non-UTF-8 or invalid file raises `error`
    with a one-line message."""
    path = _checked(path, error, what)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_objects(path: str | Path, error: type[Exception], what: str = "input file") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `("PATH:LINE", record)` for each non-blank line of `path`.

    A missing, oversized or non-UTF-8 file, a line that is not JSON and a line that is not an object
    raise `error` with a one-line message (`what` names the file's role: "fine-tuning data", ...).
    """
    path = _checked(path, error, what)
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise error(f"{path}:{lineno}: expected a JSON object")
                yield f"{path}:{lineno}", record
        except UnicodeDecodeError:
            raise error(f"{what} {path} is not UTF-8 text") from None
