"""The settings of a training run: `TrainConfig`, the experiment files, and how overrides resolve.

EXPERIMENT names a file in experiments/ (tiny, small, medium, large, xl) or is a path to one; its
`CONFIG = {...}` literal is read with `ast.literal_eval` (never executed). `key=value` overrides
any TrainConfig field, or a ModelConfig field (n_layer=6), type-checked.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.resources
import math
import os
from pathlib import Path
from typing import Any

import jax

from gpt2_jax.config import (
    DTYPES, OPTIMIZERS, PROBABILITY, SCHEDULES, SIZES, STRATEGIES, ConfigError, ModelConfig, Range, check_fields, get_model_config, managed_fields,
    replace, setting,
)

# The source checkout when gpt2_jax runs from one (src/ or an editable install); installed from a
# wheel, it is a folder above site-packages that holds no experiments/.
REPO_ROOT = Path(__file__).resolve().parents[3]

# The value of warmup_steps= and weight_decay= (and `auto` on the command line) that asks for the
# optimizer's default (`optimizer_defaults`).
AUTO = -1
# What warmup_steps and weight_decay (AdamW's part, by name) are when not set, by optimizer:
#   adamw: 20 warmup steps (the tiny CPU demo's; the GPT-2/GPT-3 experiments set 715), weight decay
#          0.1 (GPT-3, Brown et al. 2020, appendix B), as before Muon existed.
#   muon:  no warmup ("Switched from AdamW to new optimizer, and removed learning rate warmup":
#          KellerJordan/modded-nanogpt's README of its 10/2024 Muon records, 6,200 steps to 3.28) and no
#          weight decay (the records' `weight_decay : float = 0`, found "empirically optimal" in
#          records/102924_Optimizers).
OPTIMIZER_DEFAULTS = {"adamw": {"warmup_steps": 20, "weight_decay": 0.1}, "muon": {"warmup_steps": 0, "weight_decay": 0.0}}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model's shape (that is `size` + ModelConfig)."""

    size: str = "tiny"  # model preset
    # resume_keeps: the data order, which a resume may not change (the data iterator's position)
    dataset: str = setting("tiny_shakespeare", None, resume_keeps=True)
    seq_len: int = setting(0, None, resume_keeps=True)  # tokens per sequence; 0 = the model's n_ctx
    batch_size: int = setting(16, None, resume_keeps=True)  # sequences per step, all devices and micro-batches
    # micro-batches per step (batch_size / grad_accum run at once); 0 or auto = chosen from memory
    grad_accum: int = setting(0, None, auto=0)
    steps: int = 300
    # adamw, or muon: Newton-Schulz-orthogonalized momentum (the muon_* settings) for the blocks'
    # weight matrices and AdamW (lr, b1, b2, eps, weight_decay by name) for wte, wpe, biases and
    # LayerNorms (gpt2_jax.optim). A resume keeps it: the optimizer state would not fit.
    optimizer: str = setting("adamw", None, resume_keeps=True)
    # peak learning rate of AdamW; 0 = the default: the size's (optim.PEAK_LR), under muon
    # optim.MUON_ADAM_LR (0.0036, modded-nanogpt's Adam rate for the tied embedding/head)
    lr: float = 0.0
    # cosine (warmup, cosine decay to min_lr_ratio) or warmdown (warmup, constant, linear decay to 0
    # over the last warmdown_frac of the steps); auto = cosine for adamw, warmdown for muon
    schedule: str = "auto"
    # warmup_steps and weight_decay (AdamW's, by name: train.config.OPTIMIZER_DEFAULTS): -1 or auto =
    # the optimizer's default, 20 and 0.1 under adamw, 0 and 0 under muon
    warmup_steps: int = setting(AUTO, None, auto=AUTO)
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmdown_frac: float = 0.2843  # modded-nanogpt's records: 1,450 of 5,100 steps
    weight_decay: float = setting(float(AUTO), None, auto=float(AUTO))
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # Muon (optimizer=muon), defaults from modded-nanogpt's records with a tied embedding/head
    # (records/102924_Optimizers: lr 0.02, momentum 0.95, Nesterov, no weight decay; 5 Newton-Schulz
    # steps): peak learning rate of the hidden matrices (on the same schedule as lr), momentum,
    # Nesterov momentum, Newton-Schulz steps, decoupled weight decay of the hidden matrices.
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_weight_decay: float = 0.0
    dropout: float = 0.0  # embedding, attention and residual dropout (nanoGPT pretrains with 0)
    compute_dtype: str = "auto"  # auto = bfloat16 on GPU/TPU, float32 on CPU; params stay float32
    device_memory_gib: float = 0.0  # memory of one device for grad_accum/remat_policy=auto; 0 = what the device reports
    mesh: str = "1,-1,1"  # data,fsdp,tensor device counts; -1 = the rest
    strategy: str = "fsdp"  # dp | fsdp | fsdp_tp
    eval_every: int = 100  # steps between validation losses (and at the end); 0 = only at the end
    eval_batches: int = 0  # validation batches per evaluation; 0 = the whole split
    # Stop once a validation loss is at most this (checked at each evaluation): the step is saved and
    # the tokens and training time it took are printed and recorded in final.json; 0 = never.
    target_val_loss: float = 0.0
    # HellaSwag accuracies (gpt2_jax.eval's hellaswag task, on $GPT2_JAX_DATA_DIR/hellaswag/hellaswag_val.jsonl)
    # every hellaswag_every steps and at the end; 0 = never. hellaswag_limit: the first N items; 0 = all.
    hellaswag_every: int = 0
    hellaswag_limit: int = 0
    sample_every: int = 0  # steps between text samples; 0 = only at the end
    sample_tokens: int = 64
    sample_prompt: str = ""  # empty = start from <|endoftext|>
    top_k: int = 40  # 1 = greedy
    log_every: int = 10  # steps between lines in metrics.jsonl / TensorBoard / the console
    seed: int = setting(0, None, resume_keeps=True)
    run_dir: str = ""  # default runs/EXPERIMENT-YYYYmmdd-HHMMSS
    # Checkpoints in RUN_DIR/checkpoints (gpt2_jax.checkpoint), saved asynchronously every
    # ckpt_every steps, at the end and on SIGTERM/SIGINT; the latest ckpt_keep and the best
    # ckpt_keep_best by validation loss are kept. resume: continue from the newest readable one.
    resume: bool = True
    ckpt_every: int = 500  # 0 = only at the end (and when stopped by a signal)
    ckpt_keep: int = 3
    ckpt_keep_best: int = 1
    ckpt_async: bool = True
    # The hang watchdog (gpt2_jax.train.watchdog): when no step finishes within this many seconds
    # (periodic work and the first step not counted), every process writes its threads' stacks to
    # RUN_DIR/stacks-process-I.log and exits with status 3. 0 = auto: 50 median steps, at least 300 s.
    hang_timeout_s: float = 0.0
    # On several processes, a process that sends no heartbeat for this long is gone (JAX's
    # distributed runtime's heartbeat timeout; its default, 100 s): the others end, and the command
    # line of each prints which process is gone, the newest checkpoint and how to resume.
    heartbeat_timeout_s: int = 100
    # Fine-tuning (gpt2_jax.finetune). init_from: start from this checkpoint, run or HF GPT-2
    # directory (its shape replaces the size preset's); finetune_data: a jsonl of prompt/completion
    # pairs used instead of `dataset`, the loss counting completion tokens only; the templates
    # render each record's fields into the prompt and the completion.
    init_from: str = ""
    finetune_data: str = setting("", None, resume_keeps=True)
    prompt_template: str = "{prompt}"
    completion_template: str = "{completion}"

    def __post_init__(self):
        check_fields(self, TRAIN_RANGES)
        if self.size not in SIZES:
            raise ConfigError(f"unknown size {self.size!r}; valid sizes: {', '.join(SIZES)}")
        if self.compute_dtype not in ("auto",) + DTYPES:
            raise ConfigError(f"unknown compute_dtype {self.compute_dtype!r}; valid: auto, {', '.join(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in ("auto",) + SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; valid: auto, {', '.join(SCHEDULES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.target_val_loss and not self.eval_every:
            raise ConfigError(f"target_val_loss={self.target_val_loss:g} needs eval_every= > 0: a run that validates only at its end cannot stop early")
        if self.grad_accum and self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")


_COUNT = Range(1, 1 << 40)
_PERIOD = Range(0, 1 << 40)
TRAIN_RANGES = {
    "seq_len": Range(0, 1 << 20), "batch_size": Range(1, 1 << 24), "grad_accum": Range(0, 1 << 24), "steps": _COUNT,
    "device_memory_gib": Range(0.0, 1 << 20),
    "lr": Range(0.0, math.inf), "warmup_steps": _PERIOD, "min_lr_ratio": Range(0.0, 1.0), "weight_decay": Range(0.0, 10.0),
    "warmdown_frac": Range(0.0, 1.0), "muon_lr": Range(0.0, math.inf), "muon_momentum": PROBABILITY,
    "muon_ns_steps": Range(1, 100), "muon_weight_decay": Range(0.0, 10.0),
    "b1": PROBABILITY, "b2": PROBABILITY, "eps": Range(0.0, 1.0, low_open=True), "grad_clip": Range(0.0, 1e9),
    "dropout": PROBABILITY, "eval_every": _PERIOD, "eval_batches": _PERIOD, "target_val_loss": Range(0.0, math.inf), "sample_every": _PERIOD,
    "hellaswag_every": _PERIOD, "hellaswag_limit": _PERIOD,
    "sample_tokens": Range(1, 1 << 20), "top_k": Range(1, 1 << 24), "log_every": _COUNT,
    "seed": Range(0, 2**32 - 1),  # jax.random keys take 32-bit seeds: a larger one would wrap silently
    "hang_timeout_s": Range(0.0, 1e9), "heartbeat_timeout_s": Range(2, 1 << 20), "ckpt_every": _PERIOD, "ckpt_keep": Range(1, 1 << 20), "ckpt_keep_best": Range(0, 1 << 20),
}


# ModelConfig fields that TrainConfig sets, so that one value cannot come from two places.
MANAGED_MODEL_KEYS = managed_fields(ModelConfig)


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. the loss became NaN)."""


def _experiment_dirs() -> list:
    """Where experiment names are looked up, the first match winning: ./experiments of the current
    directory, the files the package ships (`gpt2_jax.experiments`: the checkout's experiments/ in a
    wheel), then the checkout's experiments/ (a source tree or an editable install)."""
    dirs = [Path.cwd() / "experiments"]
    try:
        dirs.append(importlib.resources.files("gpt2_jax.experiments"))
    except ModuleNotFoundError:
        pass  # not installed from a wheel
    return dirs + [REPO_ROOT / "experiments"]


def find_experiment(name: str) -> Path:
    """An experiment name (tiny, small, ...) or a path -> the experiment file."""
    if name.endswith(".py") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"experiment file {name} does not exist")
        return path
    dirs = [d for d in _experiment_dirs() if d.is_dir()]
    for root in dirs:
        path = root / f"{name}.py"
        if path.is_file():
            return path
    known = sorted({p.name[:-3] for d in dirs for p in d.iterdir() if p.name.endswith(".py") and not p.name.startswith("_")})
    raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(known)} (or a path to an experiment file)")


def load_experiment(path: Path) -> dict[str, Any]:
    """The `CONFIG = {...}` dict literal of an experiment file, read without executing it."""
    try:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}: not valid Python ({e.msg}, line {e.lineno})") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CONFIG" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise ConfigError(f"{path}: CONFIG must be a literal dict of plain values") from None
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: CONFIG must be a dict")
            return value
    raise ConfigError(f"{path}: no `CONFIG = {{...}}` assignment")


def resolve_config(settings: dict[str, Any]) -> tuple[TrainConfig, ModelConfig]:
    """Split `settings` into TrainConfig and ModelConfig fields, type-checked; unknown keys refused.

    The model's compute dtype ("auto" still unresolved) and dropout come from the TrainConfig.
    """
    settings = {**settings}
    for f in dataclasses.fields(TrainConfig):  # grad_accum: chosen from memory (train.plan); the rest: by optimizer
        if f.metadata.get("auto") is not None and str(settings.get(f.name, "")).lower() == "auto":
            settings[f.name] = f.metadata["auto"]
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_kw, model_kw = {}, {}
    for key, value in settings.items():
        if key in MANAGED_MODEL_KEYS:
            raise ConfigError(f"set {MANAGED_MODEL_KEYS[key]}= instead of {key}=")
        if key in train_keys:
            train_kw[key] = value
        elif key in model_keys:
            model_kw[key] = value
        else:
            valid = sorted(train_keys) + sorted(model_keys - set(MANAGED_MODEL_KEYS))
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(valid)}")
    tcfg = replace(TrainConfig(), **train_kw)
    mcfg = get_model_config(tcfg.size, **model_kw)
    mcfg = replace(mcfg, embd_pdrop=tcfg.dropout, attn_pdrop=tcfg.dropout, resid_pdrop=tcfg.dropout)
    if tcfg.seq_len > mcfg.n_ctx:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds the model context n_ctx={mcfg.n_ctx}")
    return tcfg, mcfg


def optimizer_defaults(tcfg: TrainConfig) -> TrainConfig:
    """`tcfg` with warmup_steps and weight_decay left at auto set to its optimizer's defaults
    (`OPTIMIZER_DEFAULTS`); values that were set are kept."""
    auto = {k: v for k, v in OPTIMIZER_DEFAULTS[tcfg.optimizer].items() if getattr(tcfg, k) == AUTO}
    return replace(tcfg, **auto) if auto else tcfg


def resolve_dtype(tcfg: TrainConfig, mcfg: ModelConfig) -> ModelConfig:
    """Fill in compute_dtype=auto: bfloat16 on GPU/TPU, float32 on CPU (XLA:CPU bf16 matmuls are slow)."""
    dtype = tcfg.compute_dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return replace(mcfg, dtype=dtype)
