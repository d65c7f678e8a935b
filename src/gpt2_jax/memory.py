"""The memory preflight: what a run needs per device, against what a device has.

Before anything is allocated or written, `train`, `eval` and `generate` estimate their peak per
device from the shapes alone (no model is built, so a nonsense size is refused at once) and refuse,
in one line giving both figures and the setting to lower, what cannot fit. The train step's
compiled program is then fitted to the device by `gpt2_jax.train.plan` (`compiled_bytes`).

The estimates (bytes per device):
  parameters        n_params x param bytes / the devices that shard them (FSDP x tensor)
  optimizer state   AdamW's two moments in the parameter dtype, sharded alike
  gradients         float32, sharded alike; twice with gradient accumulation (the running sum)
  activations       what the backward keeps per layer and sequence without recomputation,
                    s·h·(10 + 24/t + 5·a·s/(h·t)) bytes in 16-bit (Korthikanti et al. 2022, eq. 2,
                    tensor parallelism t; doubled for float32), or only each layer's input with
                    full remat, plus one layer recomputed; and the float32 logits and their gradient
  KV cache          (generation) keys and values of every layer for every row and slot
The figures are estimates: XLA's buffer assignment decides the real peak, which the compiled
check reads. A device's memory is `memory_stats()["bytes_limit"]` where the backend reports it (GPU,
TPU), else the host's available memory divided among this process's devices (CPU).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from gpt2_jax.config import ConfigError, ModelConfig

GiB = 1 << 30
# Refuse when the estimate leaves less than this share of a device free: the estimate is not exact.
MARGIN = 0.10


class PreflightError(ConfigError):
    """A run that cannot fit the devices it would run on."""


def _bytes(dtype: str) -> int:
    return np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(device=None, override_gib: float = 0.0) -> tuple[int, str]:
    """(bytes one device may use, where that figure comes from); `override_gib` (the
    `device_memory_gib=` setting) wins when set."""
    if override_gib:
        return int(override_gib * GiB), "device_memory_gib"
    device = device if device is not None else jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind}"
    n = len(jax.local_devices())
    host = _host_available()
    return host // n, f"available host memory {host / GiB:.1f} GiB / {n} device(s)"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per device, by what holds them."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def __str__(self) -> str:
        detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.total / GiB:.2f} GiB per device ({detail})"


def _activations_per_sequence(cfg: ModelConfig, seq_len: int, tensor: int, training: bool, logit_positions: int | None = None) -> float:
    s, h, a, t = seq_len, cfg.n_embd, cfg.n_head, max(1, tensor)
    scale = _bytes(cfg.dtype) / 2  # the formula counts 16-bit activations
    per_layer = s * h * (10 + 24 / t + 5 * a * s / (h * t)) * scale
    if not training:  # a forward pass keeps one layer's working set at a time
        layers = per_layer
    elif cfg.remat_policy == "full":
        layers = cfg.n_layer * s * h * _bytes(cfg.dtype) + per_layer
    else:
        layers = cfg.n_layer * per_layer
    logits = (s if logit_positions is None else logit_positions) * cfg.padded_vocab_size * 4 / t * (2 if training else 1)
    return layers + logits


def train_estimate(cfg: ModelConfig, *, rows_per_device: int, seq_len: int, param_shards: int, tensor: int, grad_accum: int) -> Estimate:
    """Per device: a training step with `rows_per_device` sequences of `seq_len` tokens per micro-batch."""
    p = cfg.n_params / max(1, param_shards)
    param_bytes = _bytes(cfg.param_dtype)
    return Estimate({
        "parameters": p * param_bytes,
        "optimizer state": 2 * p * param_bytes,
        "gradients": p * 4 * (2 if grad_accum > 1 else 1),
        "activations": rows_per_device * _activations_per_sequence(cfg, seq_len, tensor, training=True),
    })


def eval_estimate(cfg: ModelConfig, *, rows_per_device: int, seq_len: int, param_shards: int) -> Estimate:
    """Per device: scoring `rows_per_device` rows of up to `seq_len` tokens."""
    p = cfg.n_params / max(1, param_shards)
    return Estimate({
        "parameters": p * _bytes(cfg.param_dtype),
        "activations": rows_per_device * _activations_per_sequence(cfg, seq_len, 1, training=False),
    })


def generate_estimate(cfg: ModelConfig, *, rows_per_device: int, prompt_len: int, total_len: int, param_shards: int) -> Estimate:
    """Per device: generating for `rows_per_device` rows, prompts of `prompt_len` tokens padded,
    a cache of `total_len` slots."""
    p = cfg.n_params / max(1, param_shards)
    return Estimate({
        "parameters": p * _bytes(cfg.param_dtype),
        "KV cache": rows_per_device * 2 * cfg.n_layer * total_len * cfg.n_embd * _bytes(cfg.dtype),
        "activations": rows_per_device * _activations_per_sequence(cfg, prompt_len, 1, training=False, logit_positions=1),
    })


def check(estimate: Estimate, what: str, lower: str, device=None, override_gib: float = 0.0) -> None:
    """Refuse (PreflightError, one line) an estimate that leaves less than MARGIN of a device free."""
    limit, source = device_memory(device, override_gib)
    if estimate.total > (1 - MARGIN) * limit:
        raise PreflightError(
            f"{what} needs about {estimate} but a device has {limit / GiB:.2f} GiB ({source}); {lower}"
        )


def compiled_bytes(compiled) -> int:
    """Peak bytes per device of a compiled program: arguments and outputs (outputs that reuse a
    donated argument counted once) and temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
