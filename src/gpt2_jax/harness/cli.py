"""`python -m gpt2_jax.harness ARGS`: lm-evaluation-harness's command line (the `lm_eval ARGS` it
documents) with the model `gpt2_jax` registered: `--model gpt2_jax --model_args model=PATH`.

Its failures end in one line, as every entry point's do. Before lm-eval starts: a `model=` that is
not a model (exit 1), none given or no tasks (exit 2). Then: an unknown task (exit 2), another setting
lm-eval refuses, or a model that cannot be loaded (exit 1).
"""

from __future__ import annotations

import importlib.util
import sys

from gpt2_jax.checkpoint import CheckpointError
from gpt2_jax.config import ConfigError
from gpt2_jax.errors import one_line
from gpt2_jax.storage import StorageError

# How lm-eval (0.4) says that --tasks named no task it knows: ValueError("Tasks not found: a, b").
_NOT_FOUND = "Tasks not found: "


def _lm_eval_error(e: ValueError) -> tuple[str, int]:
    """(the line, exit code) for a ValueError out of lm-eval: an unknown task is a usage error."""
    message = " ".join(str(e).split())
    if message.startswith(_NOT_FOUND):
        names = message.removeprefix(_NOT_FOUND)
        return (f"--tasks {names}: no such lm-eval task (`python -m gpt2_jax.harness ls tasks` lists them; "
                "--include_path DIR adds tasks of your own)"), 2
    return f"lm-eval: {one_line(e)}", 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("lm_eval") is None:
        print("error: lm-evaluation-harness is not installed: pip install 'gpt2_jax[harness]'", file=sys.stderr)
        return 1
    from gpt2_jax.harness.adapter import HarnessError, run_lm_eval

    try:
        run_lm_eval(argv)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (CheckpointError, ConfigError, StorageError, OSError) as e:  # the model given as model= cannot be loaded
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # lm-eval refuses its settings (an unknown task, a bad flag value) with ValueError
        line, code = _lm_eval_error(e)
        print(f"error: {line}", file=sys.stderr)
        return code
    return 0
