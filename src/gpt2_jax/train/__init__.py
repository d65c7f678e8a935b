"""Training: `python -m gpt2_jax.train [EXPERIMENT] [key=value ...]` (the command line is `cli`).

`config` holds TrainConfig and the experiment files, `hooks` the periodic work of the loop and its
per-step metrics, `loop` the loop itself: `train(tcfg, mcfg, run_dir)`.
"""

from gpt2_jax.train.config import (
    MANAGED_MODEL_KEYS, TrainConfig, TrainingError, find_experiment, load_experiment, resolve_config, resolve_dtype,
)
from gpt2_jax.train.loop import load_data, train, validation_loss

__all__ = [
    "MANAGED_MODEL_KEYS", "TrainConfig", "TrainingError", "find_experiment", "load_data", "load_experiment",
    "resolve_config", "resolve_dtype", "train", "validation_loss",
]
