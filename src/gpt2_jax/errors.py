"""Errors as users see them: one line on the console, the whole story in a log.

Every command ends a failure with one line (`error: ...`) and every recoverable problem with one
(`warning: ...`); a library's exception inside such a line is shortened by `one_line`, and its
traceback, when worth keeping, goes to a log file through `details`.
"""

from __future__ import annotations

import sys
import traceback


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: message` on one line; a long message loses its middle, not its ends (storage errors
    put the path first and the OS error last)."""
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    if len(text) <= limit:
        return text
    head = limit * 2 // 5
    return f"{text[:head]} ... {text[-(limit - head - 5):]}"


def details(e: BaseException) -> str:
    """Everything about an error, for a log file: the chain of causes with their tracebacks."""
    return "".join(traceback.format_exception(e))


def warn(message: str) -> None:
    """Print a line to stderr now (the caller writes its `warning: ` or `error: ` prefix)."""
    print(message, file=sys.stderr, flush=True)
