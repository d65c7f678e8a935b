"""Model configuration: one frozen dataclass and the GPT-2 size presets."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# The true GPT-2 vocabulary: 50,000 merges + 256 byte tokens + <|endoftext|>.
GPT2_VOCAB_SIZE = 50257

# "full" saves nothing and recomputes each block; "dots" keeps matmul outputs; "dots_no_batch"
# keeps only matmuls without batch dimensions (the weight-stationary ones); "auto" is chosen by the
# trainer from the compiled step's memory (lightest first: none, dots, dots_no_batch, full).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "auto")
REMAT_BY_WEIGHT = ("none", "dots", "dots_no_batch", "full")
DTYPES = ("float32", "bfloat16", "float16")
# Attention implementation (gpt2_jax.attention): auto = the platform's flash kernel where dtype and
# shapes allow (cuDNN on NVIDIA GPUs, Pallas splash on TPUs), XLA elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# Sharding strategies (their rules are `gpt2_jax.sharding.logical_rules`): data parallel, FSDP, and
# FSDP with tensor parallelism.
STRATEGIES = ("dp", "fsdp", "fsdp_tp")
# Optimizers and learning-rate schedule shapes (gpt2_jax.optim; TrainConfig's optimizer= and schedule=).
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "warmdown")


class ConfigError(ValueError):
    """A configuration value or override that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: [low, high], either end open when so marked."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        return (self.low < x if self.low_open else self.low <= x) and (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        show = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"  # noqa: E731
        return f"{'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}{')' if self.high_open else ']'}"


PROBABILITY = Range(0.0, 1.0, high_open=True)
# Bounds far beyond any GPT-2 yet small enough that a typo (n_layer=1000000000) is refused at once,
# before anything is built; what fits a device is the memory preflight's to say.
MODEL_RANGES = {
    "vocab_size": Range(1, 1 << 24), "n_ctx": Range(1, 1 << 20), "n_embd": Range(1, 1 << 16),
    "n_layer": Range(1, 4096), "n_head": Range(1, 1 << 12), "pad_vocab_multiple": Range(1, 1 << 16),
    "layer_norm_epsilon": Range(0.0, 1.0, low_open=True), "initializer_range": Range(0.0, 10.0, low_open=True),
    "embd_pdrop": PROBABILITY, "attn_pdrop": PROBABILITY, "resid_pdrop": PROBABILITY,
}


def check_fields(cfg, ranges: dict[str, Range]) -> None:
    """Check every field of a frozen config dataclass against the type of its default and its range.

    Integers must be integers (a float with an integral value, as JSON writers produce, becomes the
    integer), floats finite numbers, booleans booleans, strings strings; one line names the field,
    its value and what is expected.
    """
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), type(f.default)
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
            continue
        if kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{f.name} must be a string, got {value!r}")
            continue
        if kind not in (int, float):
            continue
        valid = ranges.get(f.name)
        where = f" in {valid}" if valid else ""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{f.name} must be {'an integer' if kind is int else 'a number'}{where}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number{where}, got {value!r}")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{f.name} must be an integer{where}, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        object.__setattr__(cfg, f.name, value)
        if valid is not None and value not in valid and value != f.metadata.get("auto"):  # auto may lie outside
            raise ConfigError(f"{f.name} must be {'an integer' if kind is int else 'a number'}{where}, got {value!r}")


# What each field is, for the code that loads weights (gpt2_jax.weights), resumes runs
# (gpt2_jax.train.loop) and plans steps (gpt2_jax.train.plan): a field's `role` in its metadata.
#   shape    the weights' shape: taken from the weights, which must match it; a resume keeps it
#   stored   how the weights are stored: taken from the weights; a resume keeps it
#   arch     the architecture's constants: taken from the weights; a resume may change them
#   layout   how the run lays the parameters out: the run's own setting; a resume keeps it
#   compute  how the run computes: the run's own setting; a resume may change it
# `managed_by` names the TrainConfig field that sets a ModelConfig field (one value, one place);
# `auto` is the value that asks the trainer to choose (from the compiled step's memory).
KEPT_ON_RESUME = ("shape", "stored", "layout")


def setting(default: Any, role: str | None, *, managed_by: str | None = None, auto: Any = None, resume_keeps: bool = False):
    """A config field with its facts in the metadata (its role: see above; TrainConfig fields have no role and
    say `resume_keeps` themselves)."""
    meta = {"role": role, "managed_by": managed_by, "auto": auto,
            "resume_keeps": resume_keeps or role in KEPT_ON_RESUME}
    return dataclasses.field(default=default, metadata=meta)


def fields_where(cls, **facts) -> tuple[str, ...]:
    """Names of `cls`'s fields whose metadata has each given fact (`role` may be a tuple of roles)."""
    def match(f, key, want):
        have = f.metadata.get(key)
        return have in want if isinstance(want, tuple) else have == want
    return tuple(f.name for f in dataclasses.fields(cls) if all(match(f, k, v) for k, v in facts.items()))


def managed_fields(cls) -> dict[str, str]:
    """{field: the TrainConfig field that sets it}."""
    return {f.name: f.metadata["managed_by"] for f in dataclasses.fields(cls) if f.metadata.get("managed_by")}


def auto_fields(cfg) -> tuple[str, ...]:
    """The fields of a config whose value asks the trainer to choose."""
    return tuple(f.name for f in dataclasses.fields(cfg) if f.metadata.get("auto") is not None
                 and getattr(cfg, f.name) == f.metadata["auto"])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a GPT-2 model. Field names follow OpenAI's hparams.json."""

    vocab_size: int = setting(GPT2_VOCAB_SIZE, "shape")
    n_ctx: int = setting(1024, "shape")
    n_embd: int = setting(768, "shape")
    n_layer: int = setting(12, "shape")
    n_head: int = setting(12, "shape")
    layer_norm_epsilon: float = setting(1e-5, "arch")
    # Dropout 0.1 everywhere, as in the released checkpoints' config.
    embd_pdrop: float = setting(0.1, "compute", managed_by="dropout")
    attn_pdrop: float = setting(0.1, "compute", managed_by="dropout")
    resid_pdrop: float = setting(0.1, "compute", managed_by="dropout")
    initializer_range: float = setting(0.02, "arch")
    # Pad the embedding table to a multiple of this (128 -> 50,304) so the output matmul tiles
    # well; logits are always sliced back to `vocab_size`.
    pad_vocab_multiple: int = setting(1, "stored")
    dtype: str = setting("float32", "compute", managed_by="compute_dtype")  # compute dtype
    param_dtype: str = setting("float32", "stored")
    scan_layers: bool = setting(False, "layout")
    remat_policy: str = setting("none", "compute", auto="auto")
    attention: str = setting("auto", "compute")

    def __post_init__(self):
        check_fields(self, MODEL_RANGES)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name, valid in (("remat_policy", REMAT_POLICIES), ("attention", ATTENTION_IMPLS), ("dtype", DTYPES), ("param_dtype", DTYPES)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_inner(self) -> int:
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def n_params(self) -> int:
        """Parameters, the padded vocabulary rows included, counted from the shapes alone: per
        layer 12 D^2 + 13 D (c_attn, c_proj, c_fc, c_proj with biases, two LayerNorms), plus wte,
        wpe and ln_f (`model.count_params` counts the built tree and agrees)."""
        D = self.n_embd
        return self.padded_vocab_size * D + self.n_ctx * D + self.n_layer * (12 * D * D + 13 * D) + 2 * D

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return replace(cls(), **d)


# Parameter counts (tied LM head, unpadded vocab) are those of HF's GPT2LMHeadModel.
PRESETS: dict[str, dict[str, Any]] = {
    # ~16.3M parameters (12.9M of them the embedding table); the CPU demo size.
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, n_ctx=256),
    "small": dict(n_layer=12, n_embd=768, n_head=12),  # 124,439,808
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),  # 354,823,168
    "large": dict(n_layer=36, n_embd=1280, n_head=20),  # 774,030,080
    "xl": dict(n_layer=48, n_embd=1600, n_head=25),  # 1,557,611,200
}
SIZES = tuple(PRESETS)


def get_model_config(size: str, **overrides) -> ModelConfig:
    """The preset `size` (tiny, small, medium, large, xl) with optional field overrides."""
    if size not in PRESETS:
        raise ConfigError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    return replace(ModelConfig(**PRESETS[size]), **overrides)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert `value` (a string from the command line, or a JSON value) to the type of `default`."""
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
    elif kind is int and isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
                raise ConfigError(f"{name} must be an integer, got {value}") from None
    elif kind is int and isinstance(value, float) and not isinstance(value, bool):
        return value  # checked (integral or not) by the dataclass
    elif kind is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is str and isinstance(value, str):
        return value
    elif default is None:
        return value
    raise ConfigError(f"{name} expects {kind.__name__}, got {value!r}")


def replace(cfg, **overrides):
    """`dataclasses.replace` that type-checks values and refuses unknown keys with the valid list."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown {type(cfg).__name__} key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}"
        )
    typed = {k: _coerce(k, v, getattr(cfg, k)) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **typed)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Parse `key=value` (or `--key=value`) strings into a dict; values stay strings."""
    out = {}
    for a in args:
        key, sep, value = a.lstrip("-").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {a!r} is not of the form key=value")
        key = key.replace("-", "_")
        if key in out:
            raise ConfigError(f"{key} is given twice ({key}={out[key]} and {key}={value}); give it once")
        out[key] = value
    return out
