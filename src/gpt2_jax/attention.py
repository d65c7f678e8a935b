"""Causal self-attention per platform: cuDNN flash attention on NVIDIA GPUs, the Pallas splash
kernel on TPUs, XLA everywhere else.

`ModelConfig.attention` is `auto`, `xla`, `cudnn` or `splash`. `resolve` turns it into the
implementation a run will use (once, at start-up, where the device is known); `select` makes the
per-call choice while tracing, when the sequence length is known; `causal_attention` runs it.

Why kernels: the XLA path materializes the float32 [B, N, T, T] scores and keeps them for the
backward pass (256 MiB per layer for `medium` at T=1024 with 4 sequences per device). The flash
kernels keep O(T) per row and skip the blocks above the causal diagonal.

The kernels are called per device inside `jax.shard_map`, on each device's rows and heads (the
partitioning the logical rules give the activations), so they need no partitioning rules of their
own and work on any mesh. Decoding with a key/value cache and attention dropout stay on XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.config import ATTENTION_IMPLS, ConfigError, ModelConfig
from gpt2_jax.sharding import mesh_spec

# The kernels' limits. cuDNN flash attention (JAX's `implementation="cudnn"`): half-precision
# inputs, a head dim that is a multiple of 8 and at most 128 (256 from Hopper on), compute
# capability 8.0 (Ampere) or newer. Splash attention (jax.experimental.pallas.ops.tpu): query and
# key blocks that are multiples of 128 lanes, so the sequence length must be one.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MIN_CAPABILITY = (8, 0)
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides T is used


@dataclasses.dataclass(frozen=True)
class Choice:
    """The implementation a run uses and why (printed once when training starts)."""

    impl: str
    reason: str

    def __str__(self) -> str:
        return f"{self.impl} ({self.reason})"


def _capability(device) -> tuple[int, int] | None:
    text = getattr(device, "compute_capability", None)
    if not text:
        return None
    try:
        major, minor = (int(x) for x in str(text).split(".")[:2])
    except ValueError:
        return None
    return major, minor


def _is_nvidia(device) -> bool:
    if device.platform not in ("gpu", "cuda"):
        return False
    client = getattr(device, "client", None)  # an abstract device (a mesh's) has none
    return "rocm" not in str(getattr(client, "platform_version", "")).lower()


def _cudnn_problem(config: ModelConfig, device) -> str | None:
    """Why cuDNN flash attention cannot run `config` on `device`, or None when it can."""
    if not _is_nvidia(device):
        return f"cuDNN flash attention needs an NVIDIA GPU, this is {device.platform} ({device.device_kind})"
    cap = _capability(device)
    if cap is not None and cap < CUDNN_MIN_CAPABILITY:
        return f"cuDNN flash attention needs compute capability 8.0 or newer, {device.device_kind} has {cap[0]}.{cap[1]}"
    if config.dtype not in CUDNN_DTYPES:
        return f"cuDNN flash attention computes in bfloat16 or float16, not {config.dtype} (set compute_dtype=bfloat16)"
    h_max = 256 if cap is not None and cap >= (9, 0) else 128
    if config.head_dim % 8 or config.head_dim > h_max:
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most {h_max}, not {config.head_dim}"
    return None


def _splash_problem(config: ModelConfig, device, seq_len: int | None) -> str | None:
    """Why the splash kernel cannot run `config` on `device` compiled for TPU, or None when it can."""
    if device.platform != "tpu":
        return f"the splash kernel needs a TPU, this is {device.platform} ({device.device_kind})"
    if seq_len is not None and seq_len % SPLASH_BLOCKS[-1]:
        return f"the splash kernel needs a sequence length that is a multiple of {SPLASH_BLOCKS[-1]}, not {seq_len}"
    return None


def target_device():
    """The device the program being built is for: the current mesh's (an abstract mesh may name a
    TPU this machine does not have: `gpt2_jax.hlo.target`), else the first device."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device if device is not None else jax.devices()[0]


def resolve(config: ModelConfig, device=None, seq_len: int | None = None) -> Choice:
    """The implementation `config.attention` means on `device` (default: `target_device()`).

    `auto` takes the platform's kernel when the dtype and shapes allow it and XLA otherwise; an
    explicit kernel that cannot run here is a ConfigError, with the reason.
    """
    device = device if device is not None else target_device()
    requested = config.attention
    if requested == "xla":
        return Choice("xla", "requested")
    problems = {"cudnn": _cudnn_problem(config, device), "splash": _splash_problem(config, device, seq_len)}
    if requested in problems:
        if problems[requested]:
            raise ConfigError(f"attention={requested}: {problems[requested]}; use attention=auto or attention=xla")
        return Choice(requested, f"requested, on {device.device_kind}")
    for impl in ("cudnn", "splash"):
        if problems[impl] is None:
            return Choice(impl, f"auto on {device.device_kind}, {config.dtype}")
    native = "cudnn" if _is_nvidia(device) else "splash" if device.platform == "tpu" else None
    reason = problems[native] if native else f"no flash kernel for {device.platform}"
    return Choice("xla", f"auto: {reason}")


def select(config: ModelConfig, seq_len: int, *, decode: bool, dropout: bool) -> str:
    """The implementation of one attention call, chosen while tracing.

    Decoding and attention dropout always use XLA; `auto` is resolved against `target_device()`;
    a kernel that the call's shapes do not fit (splash with T not a multiple of 128, e.g. a short
    evaluation window) falls back to XLA for that call only.
    """
    if decode or dropout or config.attention == "xla":
        return "xla"
    impl = config.attention
    if impl == "auto":
        impl = resolve(config, seq_len=seq_len).impl
    if impl == "splash" and seq_len % SPLASH_BLOCKS[-1]:
        return "xla"
    return impl


# ----------------------------------------------------------------------------- kernels


def xla_attention(q_BTNH, k_BSNH, v_BSNH, mask_B1TS=None):
    """Reference path: scores materialized by XLA; causal when `mask_B1TS` is None."""
    H = q_BTNH.shape[-1]
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, mask=mask_B1TS, is_causal=mask_B1TS is None, scale=1.0 / math.sqrt(H),
        implementation="xla",
    )


def _cudnn_local(q_BTNH, k_BTNH, v_BTNH):
    H = q_BTNH.shape[-1]
    return jax.nn.dot_product_attention(
        q_BTNH, k_BTNH, v_BTNH, is_causal=True, scale=1.0 / math.sqrt(H), implementation="cudnn"
    )


def _splash_kernel(n_heads: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = next(b for b in SPLASH_BLOCKS if seq_len % b == 0)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(n_heads)])
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _splash_local(q_BTNH, k_BTNH, v_BTNH, *, interpret: bool):
    B, T, N, H = q_BTNH.shape
    kernel = _splash_kernel(N, T, interpret)
    # The kernel takes one example as [heads, T, head dim] and has no scale argument.
    q_BNTH = (q_BTNH * jnp.asarray(1.0 / math.sqrt(H), q_BTNH.dtype)).transpose(0, 2, 1, 3)
    k_BNTH, v_BNTH = k_BTNH.transpose(0, 2, 1, 3), v_BTNH.transpose(0, 2, 1, 3)
    return jax.vmap(kernel)(q_BNTH, k_BNTH, v_BNTH).transpose(0, 2, 1, 3)


def _local_spec(shape, logical):
    """The mesh PartitionSpec of an activation under the current mesh and logical rules (None: no mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    return mesh_spec(jax.sharding.PartitionSpec(*logical), shape, mesh, nn.get_logical_axis_rules())


def causal_attention(q_BTNH, k_BTNH, v_BTNH, impl: str, *, logical_axes=None):
    """Causal softmax(q k^T / sqrt(H)) v with implementation `impl` (xla, cudnn or splash).

    Under a mesh, a kernel runs per device on the rows and heads that `logical_axes` (the
    activations' logical names, [batch, seq, heads, kv]) give it. Splash is lowered as the Mosaic
    kernel when the program is for a TPU (`target_device()`: this machine's, or an abstract mesh's
    when exporting for a TPU from elsewhere) and in Pallas interpret mode otherwise (slow; used to
    test it on CPU).
    """
    if impl == "xla":
        return xla_attention(q_BTNH, k_BTNH, v_BTNH)
    if impl == "cudnn":
        local = _cudnn_local
    elif impl == "splash":
        local = functools.partial(_splash_local, interpret=target_device().platform != "tpu")
    else:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {', '.join(ATTENTION_IMPLS[1:])}")
    spec = None if logical_axes is None else _local_spec(q_BTNH.shape, logical_axes)
    if spec is None:
        return local(q_BTNH, k_BTNH, v_BTNH)
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q_BTNH, k_BTNH, v_BTNH)

