"""One way to load a model: any source of GPT-2 weights -> (ModelConfig, params), placed on a mesh.

A source (`--model`, `init_from=`, `to-hf`) is any of:
  random:SIZE        fresh random weights of a size preset (for trying things out);
  an HF directory    `config.json` with "n_embd" and model.safetensors / pytorch_model.bin;
  a params-only checkpoint   `config.json` (a ModelConfig) and `params/` (Orbax), see `save_params`;
  a run directory    its newest readable training checkpoint (falling back past damaged ones);
  a step directory   `RUN_DIR/checkpoints/<step>` (or the `checkpoints/` folder itself).
Each path may be a gs:// or s3:// URL (`gpt2_jax.storage`): Orbax reads checkpoints there itself,
and an HF directory is copied to a local temporary folder first.

`load(source, config)` fits the weights to `config` when given (scanned or per-layer layout,
vocabulary padding, parameter dtype; the shape must match), and `placement` puts them on a mesh.
HF's file formats live in `convert`, Orbax's in `checkpoint`; this module decides what a path is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import checkpoint, convert, files, storage
from gpt2_jax.checkpoint import CHECKPOINTS_DIR, CONFIG_FILE, PARAMS_DIR, CheckpointError
from gpt2_jax.errors import one_line, warn
from gpt2_jax.config import ConfigError, ModelConfig, fields_where, get_model_config
from gpt2_jax.model import abstract_params, init_params, stack_layers, unstack_layers
from gpt2_jax.sharding import Placement

RANDOM_PREFIX = "random:"
# The fields a model's weights do not determine: how it computes and lays itself out in memory. A
# run that starts from saved weights (init_from=) takes them from its own settings.
RUN_FIELDS = fields_where(ModelConfig, role=("layout", "compute"))
_SHAPE_FIELDS = fields_where(ModelConfig, role="shape")


def _is_hf_dir(path: Path) -> bool:
    """An HF GPT-2 directory: a `config.json` with "n_embd", and no params/ or checkpoints/ beside it."""
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file() or (path / PARAMS_DIR).exists() or (path / CHECKPOINTS_DIR).is_dir():
        return False
    try:
        return "n_embd" in json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def kind(source: str | os.PathLike) -> str:
    """What `source` is: random, huggingface, params, step or run (CheckpointError if none)."""
    if str(source).startswith(RANDOM_PREFIX):
        return "random"
    path = storage.path(source)
    if _is_hf_dir(path):
        return "huggingface"
    if (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        return "params"
    if path.is_dir() and path.name.isdigit() and (path / PARAMS_DIR).is_dir():
        return "step"
    if checkpoint.checkpoints_dir_of(path) is not None:
        return "run"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (a checkpoint, run directory, HF directory or random:SIZE)")
    raise CheckpointError(
        f"{path} is not a gpt2_jax checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/, "
        f"a run directory with {CHECKPOINTS_DIR}/, or a step directory of one)"
    )


def config_from_saved(d: Any, where: Path) -> ModelConfig:
    """The ModelConfig inside a saved config: a ModelConfig dict, or a run config with a "model" part.

    The attention implementation a run recorded is its own device's (cudnn, splash): where the
    model is loaded, that platform chooses again.
    """
    if isinstance(d, dict) and isinstance(d.get("model"), dict):
        d = d["model"]
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: not a valid model config (expected a JSON object)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    d = {**{k: v for k, v in d.items() if k in fields}, "attention": "auto"}
    try:
        return ModelConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: not a valid model config ({e})") from e


def _params_only_config(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: not a valid model config ({e})") from e
    return config_from_saved(raw, path / CONFIG_FILE)


def _step_config(step_dir: Path) -> ModelConfig:
    return config_from_saved(checkpoint.read_json_item(step_dir, "config"), step_dir / "config")


def _run_steps(path: Path) -> tuple[Path, list[int]]:
    ckpt_dir = checkpoint.checkpoints_dir_of(path)
    steps = checkpoint.complete_steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"{path} is a run directory without any complete checkpoint")
    return ckpt_dir, steps


def _random_size(source: str) -> str:
    return str(source).removeprefix(RANDOM_PREFIX)


def load_config(source: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of `source`, reading no weights (a run: its newest checkpoint's)."""
    k = kind(source)
    path = storage.path(source)
    if k == "random":
        return get_model_config(_random_size(source))
    if k == "huggingface":
        try:
            return convert.config_from_hf(json.loads((path / CONFIG_FILE).read_text()))
        except (convert.ConversionError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / CONFIG_FILE}: not a GPT-2 config ({one_line(e)})") from e
    if k == "params":
        return _params_only_config(path)
    if k == "step":
        return _step_config(path)
    ckpt_dir, steps = _run_steps(path)
    return _step_config(ckpt_dir / str(steps[-1]))


def run_config(source: str | os.PathLike, run: ModelConfig) -> ModelConfig:
    """The config of a run that starts from `source`'s weights: the source's shape, the run's numerics."""
    return dataclasses.replace(load_config(source), **{k: getattr(run, k) for k in RUN_FIELDS})


def _read(source: str | os.PathLike, seed: int) -> tuple[ModelConfig, Any]:
    """(config, params) as the source holds them (its layout, float32 or its saved dtype)."""
    k = kind(source)
    path = storage.path(source)
    if k == "random":
        cfg = get_model_config(_random_size(source))
        return cfg, init_params(cfg, jax.random.key(seed))
    if k == "huggingface":
        try:
            if storage.is_url(path):
                with storage.local_copy(path) as local:
                    return convert.load_hf(local)
            return convert.load_hf(path)
        except convert.ConversionError as e:
            raise CheckpointError(str(e)) from e
    if k == "params":
        return _params_only_config(path), checkpoint.restore_params_dir(path / PARAMS_DIR)
    if k == "step":
        return _step_config(path), checkpoint.restore_params_dir(path / PARAMS_DIR)
    ckpt_dir, _ = _run_steps(path)
    found = checkpoint.newest_readable(ckpt_dir, lambda step: _read(ckpt_dir / str(step), seed))
    if found is None:
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir} (see the warnings above)")
    return found


WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


@jax.jit
def _nonfinite(params: Any) -> Any:
    return jax.tree.map(lambda x: jnp.sum(~jnp.isfinite(x)), params)


def check_values(params: Any, where: str, *, allow_nonfinite: bool = False) -> None:
    """Refuse weights of another dtype than float32/float16/bfloat16, and weights holding NaN or
    inf unless `allow_nonfinite` (the count per tensor is named either way)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, x in leaves:
        if np.dtype(x.dtype).name not in WEIGHT_DTYPES:
            raise CheckpointError(f"{where}: tensor {_name(path)} is stored as {np.dtype(x.dtype).name}; weights must be {', '.join(WEIGHT_DTYPES)}")
    counts = [(path, int(n)) for path, n in jax.tree_util.tree_leaves_with_path(jax.device_get(_nonfinite(params)))]
    bad = [f"{_name(path)} ({n:,})" for path, n in counts if n]
    if bad and not allow_nonfinite:
        raise CheckpointError(
            f"{where}: {len(bad)} tensor(s) hold NaN or inf values: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "refusing them (allow_nonfinite / --allow-nonfinite loads them anyway)"
        )
    if bad:
        warn(f"warning: {where}: {len(bad)} tensor(s) hold NaN or inf values: {', '.join(bad[:5])}")


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def fit(params: Any, source: ModelConfig, config: ModelConfig, where: str = "weights") -> Any:
    """`params` of a model shaped like `source`, in the layout, vocabulary padding and parameter dtype
    of `config`. The architecture (layers, width, heads, context, vocabulary) must be the same."""
    diff = [f"{k}={getattr(source, k)} (run has {getattr(config, k)})" for k in _SHAPE_FIELDS if getattr(source, k) != getattr(config, k)]
    if diff:
        raise CheckpointError(f"{where} does not fit this model: {', '.join(diff)}")
    if "h" in params and not config.scan_layers:
        params = unstack_layers(params)
    elif "h" not in params and config.scan_layers:
        params = stack_layers(params, config.n_layer)
    if source.padded_vocab_size != config.padded_vocab_size:
        wte = np.asarray(params["wte"])[: config.vocab_size]
        pad = np.zeros((config.padded_vocab_size - config.vocab_size, config.n_embd), wte.dtype)
        params = {**params, "wte": np.concatenate([wte, pad])}
    target = nn.meta.unbox(abstract_params(config))

    def conform(t, x):
        x = x if x.dtype == t.dtype else x.astype(t.dtype)
        return x if x.shape == t.shape else x.reshape(t.shape)

    try:
        return jax.tree.map(conform, target, params)
    except ValueError as e:
        raise CheckpointError(f"{where}: parameter tree does not match the model ({one_line(e)})") from e


def load(
    source: str | os.PathLike,
    config: ModelConfig | None = None,
    *,
    placement: Placement | None = None,
    seed: int = 0,
    allow_nonfinite: bool = False,
) -> tuple[ModelConfig, Any]:
    """`(config, params)` from any source (see the module docstring).

    Every tensor must be float32, float16 or bfloat16 and hold finite values (`check_values`).
    With `config`, the params are fitted to it (`fit`) and `config` is returned; with `placement`
    they are put on its mesh (FSDP-sharded by its rules), otherwise they stay where they were read
    (host memory, or this process's first device). `seed` is used by random:SIZE only.
    """
    source_cfg, params = _read(source, seed)
    check_values(params, str(source), allow_nonfinite=allow_nonfinite)
    cfg = source_cfg if config is None else config
    params = fit(params, source_cfg, cfg, str(source))
    if placement is not None:
        params = placement.place(abstract_params(cfg), params)
    return cfg, params


def save_params(path: str | os.PathLike, config: ModelConfig, params: Any) -> Path:
    """Write a params-only checkpoint to `path` (which must not exist yet), as a whole or not at all
    (on an object store: config.json, which makes it a checkpoint, is written last)."""
    path = storage.path(path)
    if path.exists():
        raise CheckpointError(f"{path} already exists; choose a new directory")
    if storage.is_url(path):  # Orbax writes there itself; the config, which makes it a checkpoint, comes last
        checkpoint.save_params_dir(path / PARAMS_DIR, params)
        files.write_text(path / CONFIG_FILE, config.to_json())
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(config.to_json())
        checkpoint.save_params_dir(tmp / PARAMS_DIR, params)
    return path
