"""Attention per platform: the splash kernel (Pallas interpret mode on CPU) against the XLA path,
forward and gradients, alone and inside the sharded model; the choice of implementation per device."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import attention, sharding
from gpt2_jax.config import ConfigError, ModelConfig, replace
from gpt2_jax.model import GPT2, init_params


def _qkv(dtype, B=2, T=256, N=3, H=64, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, T, N, H)), dtype) for _ in range(3))


def _out_and_grads(impl, q, k, v, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: attention.causal_attention(q, k, v, impl), q, k, v)
    return out, vjp(cotangent.astype(out.dtype))


def _close(actual, expected, tol):
    """|actual - expected| <= tol * max|expected|, elementwise (gradients are near zero in places)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_splash_matches_xla_in_float32():
    q, k, v = _qkv(jnp.float32)
    ct = _qkv(jnp.float32, seed=1)[0]
    out, grads = _out_and_grads("splash", q, k, v, ct)
    ref, ref_grads = _out_and_grads("xla", q, k, v, ct)
    _close(out, ref, 1e-5)
    for g, r in zip(grads, ref_grads):
        _close(g, r, 1e-5)


def test_splash_in_bfloat16_is_as_close_to_float32_as_xla():
    q, k, v = _qkv(jnp.float32)
    ct = _qkv(jnp.float32, seed=1)[0]
    exact, exact_grads = _out_and_grads("xla", q, k, v, ct)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out, grads = _out_and_grads("splash", *bf, ct)
    ref, ref_grads = _out_and_grads("xla", *bf, ct)
    assert out.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa: allow 2^-6 of each tensor's scale, and no worse than
    # twice the XLA path's own bfloat16 error.
    for a, r, e in zip((out, *grads), (ref, *ref_grads), (exact, *exact_grads)):
        a, r, e = (np.asarray(x, np.float32) for x in (a, r, e))
        scale = np.abs(e).max()
        assert np.abs(a - e).max() <= 2 ** -6 * scale
        assert np.abs(a - e).max() <= 2 * np.abs(r - e).max() + 1e-3 * scale


CFG = ModelConfig(
    vocab_size=211, n_ctx=128, n_embd=96, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
    scan_layers=True,
)


def _model_loss_and_grads(cfg, params, tokens, mesh=None, strategy="fsdp_tp"):
    def loss(p):
        logits = GPT2(cfg).apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits

    if mesh is None:
        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads
    rules = sharding.logical_rules(strategy, mesh, cfg)
    with sharding.activate(mesh, rules):
        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def test_model_with_splash_matches_xla_on_one_device_and_sharded():
    params = init_params(replace(CFG, attention="xla"), jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 129)), jnp.int32)
    ref_logits, ref_grads = _model_loss_and_grads(replace(CFG, attention="xla"), params, tokens)
    splash = replace(CFG, attention="splash")
    logits, grads = _model_loss_and_grads(splash, params, tokens)
    _close(logits, ref_logits, 1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        _close(g, r, 1e-5)
    # Batch over data x fsdp, the 4 heads over tensor=2: the kernel runs per device in shard_map.
    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.activate(mesh, sharding.logical_rules("fsdp_tp", mesh, splash)):
        jaxpr = str(jax.make_jaxpr(lambda p: GPT2(splash).apply({"params": p}, tokens[:, :-1]))(params))
    assert "shard_map" in jaxpr
    logits, grads = _model_loss_and_grads(splash, params, tokens, mesh)
    _close(logits, ref_logits, 1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        _close(g, r, 1e-5)


def test_dropout_and_decode_keep_working_with_a_kernel_configured():
    from gpt2_jax.model import init_cache

    cfg = replace(CFG, attention="splash", attn_pdrop=0.1)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 128)), jnp.int32)
    rngs = {"dropout": jax.random.key(3)}
    dropped = GPT2(cfg).apply({"params": params}, tokens, deterministic=False, rngs=rngs)
    dropped_xla = GPT2(replace(cfg, attention="xla")).apply({"params": params}, tokens, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(dropped_xla))
    # Prefill 100 tokens into the cache, then decode one: equals the full (splash) forward.
    full = GPT2(cfg).apply({"params": params}, tokens[:, :101])
    cache = init_cache(cfg, 2, 128)
    _, v = GPT2(cfg).apply({"params": params, "cache": cache}, tokens[:, :100], decode=True, mutable=["cache"])
    step, _ = GPT2(cfg).apply({"params": params, **v}, tokens[:, 100:101], decode=True, mutable=["cache"])
    _close(step[:, 0], full[:, 100], 1e-5)


def _device(platform, kind, capability=None, version=""):
    return SimpleNamespace(
        platform=platform, device_kind=kind, compute_capability=capability,
        client=SimpleNamespace(platform_version=version),
    )


H100 = _device("gpu", "NVIDIA H100 80GB HBM3", "9.0", "cuda 12080")
A100 = _device("gpu", "NVIDIA A100-SXM4-40GB", "8.0", "cuda 12080")
V100 = _device("gpu", "Tesla V100-SXM2-16GB", "7.0", "cuda 12080")
MI300 = _device("gpu", "AMD Instinct MI300X", None, "rocm 6.3")
TPU = _device("tpu", "TPU v5 lite")
CPU = _device("cpu", "cpu")


@pytest.mark.parametrize(
    "device,dtype,seq_len,expected",
    [
        (H100, "bfloat16", 1024, "cudnn"),
        (A100, "float16", 1024, "cudnn"),
        (H100, "float32", 1024, "xla"),  # cuDNN flash attention is half precision only
        (V100, "bfloat16", 1024, "xla"),  # pre-Ampere
        (MI300, "bfloat16", 1024, "xla"),  # not NVIDIA
        (TPU, "bfloat16", 1024, "splash"),
        (TPU, "float32", 256, "splash"),
        (TPU, "bfloat16", 100, "xla"),  # not a multiple of 128
        (CPU, "float32", 1024, "xla"),
    ],
)
def test_auto_picks_the_platform_kernel(device, dtype, seq_len, expected):
    choice = attention.resolve(replace(CFG, dtype=dtype), device, seq_len=seq_len)
    assert choice.impl == expected
    assert ("auto" in choice.reason) and (expected != "xla" or choice.reason.startswith("auto: "))


def test_explicit_kernels_are_checked_and_xla_always_runs():
    assert attention.resolve(replace(CFG, attention="xla"), CPU).impl == "xla"
    assert attention.resolve(replace(CFG, attention="cudnn", dtype="bfloat16"), H100).impl == "cudnn"
    assert attention.resolve(replace(CFG, attention="splash"), TPU, seq_len=1024).impl == "splash"
    with pytest.raises(ConfigError, match="attention=cudnn: .*NVIDIA GPU, this is cpu"):
        attention.resolve(replace(CFG, attention="cudnn"), CPU)
    with pytest.raises(ConfigError, match="attention=cudnn: .*bfloat16 or float16, not float32"):
        attention.resolve(replace(CFG, attention="cudnn", dtype="float32"), H100)
    with pytest.raises(ConfigError, match="attention=splash: .*needs a TPU"):
        attention.resolve(replace(CFG, attention="splash"), H100)
    with pytest.raises(ConfigError, match="head dim that is a multiple of 8"):
        attention.resolve(replace(CFG, attention="cudnn", dtype="bfloat16", n_embd=100, n_head=4), H100)
    with pytest.raises(ConfigError, match="unknown attention 'flash'"):
        replace(CFG, attention="flash")


def test_select_per_call():
    splash = replace(CFG, attention="splash")
    assert attention.select(splash, 128, decode=False, dropout=False) == "splash"
    assert attention.select(splash, 100, decode=False, dropout=False) == "xla"  # shape the kernel cannot take
    assert attention.select(splash, 128, decode=True, dropout=False) == "xla"
    assert attention.select(splash, 128, decode=False, dropout=True) == "xla"
    assert attention.select(CFG, 128, decode=False, dropout=False) == "xla"  # auto on this CPU
