"""Training: `python -m gpt2_jax.train [EXPERIMENT] [key=value ...]` (the command line is `cli`).

`config` holds TrainConfig and the experiment files, `hooks` the periodic work of the loop and its
per-step metrics, `loop` the loop itself: `train(tcfg, mcfg, run_dir)`. The names below are
imported when first used, so that the command line's supervising parent process
(`supervisor`) starts without JAX.
"""

import importlib

_NAMES = {
    "MANAGED_MODEL_KEYS": "config", "TrainConfig": "config", "TrainingError": "config", "find_experiment": "config",
    "load_experiment": "config", "optimizer_defaults": "config", "resolve_config": "config", "resolve_dtype": "config",
    "load_data": "loop", "train": "loop", "validation_loss": "loop",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"gpt2_jax.train.{_NAMES[name]}"), name)
