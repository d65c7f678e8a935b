"""Checkpoints with Orbax: params-only checkpoints for eval, generation and conversion.

A params-only checkpoint is a directory holding `config.json` (the `ModelConfig`) and `params/`
(an Orbax PyTree checkpoint). It is written into a temporary sibling and renamed into place, so a
crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gpt2_jax.config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or of the wrong kind."""


def save_params(path: str | os.PathLike, config: ModelConfig, params: Any) -> Path:
    """Write a params-only checkpoint to `path` (which must not exist yet)."""
    path = Path(path).absolute()
    if path.exists():
        raise CheckpointError(f"{path} already exists; choose a new directory")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / CONFIG_FILE).write_text(config.to_json())
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, jax.tree.map(np.asarray, params))
        ckptr.wait_until_finished()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_params(path: str | os.PathLike) -> tuple[ModelConfig, Any]:
    """Load `(config, params)` from a params-only checkpoint directory."""
    path = Path(path).absolute()
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not a gpt2_jax checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    try:
        config = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: not a valid model config ({e})") from e
    try:
        params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR)
    except Exception as e:  # Orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot be restored ({type(e).__name__}: {e})") from e
    return config, params
