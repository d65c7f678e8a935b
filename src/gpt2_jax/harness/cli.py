"""`python -m gpt2_jax.harness ARGS`: lm-evaluation-harness's command line (the `lm_eval ARGS` it
documents) with the model `gpt2_jax` registered: `--model gpt2_jax --model_args model=PATH`."""

from __future__ import annotations

import importlib.util
import sys

from gpt2_jax.checkpoint import CheckpointError
from gpt2_jax.config import ConfigError
from gpt2_jax.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("lm_eval") is None:
        print("error: lm-evaluation-harness is not installed: pip install 'gpt2_jax[harness]'", file=sys.stderr)
        return 1
    from gpt2_jax.harness.adapter import run_lm_eval

    try:
        run_lm_eval(argv)
    except (CheckpointError, ConfigError, StorageError, OSError) as e:  # the model given as model= cannot be loaded
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
