"""GPT-2 in Flax Linen: pre-LayerNorm decoder-only transformer with tied embeddings.

Shape letters used in names and einsums:
  B batch, T query length, S key/value length, D model width (n_embd), N heads,
  H head dim, F MLP width (4 D), V (padded) vocabulary, L layers.

Parameter names mirror OpenAI's checkpoints (wte, wpe, h_{i}/ln_1, attn/c_attn, attn/c_proj,
ln_2, mlp/c_fc, mlp/c_proj, ln_f), so conversion is a name-for-name copy; only c_attn and the
attention c_proj are reshaped to expose the head axis ([D, 3D] -> [D, 3, N, H], [D, D] -> [N, H, D]).
Every parameter carries logical axis names; `gpt2_jax.sharding` maps them onto a mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax import attention
from gpt2_jax.config import ModelConfig

# Logical names of parameter axes. Activations use separate `act_*` names so that FSDP-sharded
# weights do not force sharded activations.
VOCAB, EMBED, POS, QKV, HEADS, KV, MLP, NORM, LAYERS = (
    "vocab", "embed", "pos", "qkv", "heads", "kv", "mlp", "norm", "layers"
)
ACT_BATCH, ACT_SEQ, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_MLP, ACT_VOCAB = (
    "act_batch", "act_seq", "act_embed", "act_heads", "act_kv", "act_mlp", "act_vocab"
)

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _param(init, axes):
    """An initializer that also records the parameter's logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


class Linear(nn.Module):
    """`x @ kernel + bias` written as an einsum, so kernels can keep a head axis."""

    spec: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_shape: tuple[int, ...]
    bias_axes: tuple[str | None, ...]
    stddev: float
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        dtype, pdtype = jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        kernel = self.param(
            "kernel", _param(nn.initializers.normal(self.stddev), self.kernel_axes), self.kernel_shape, pdtype
        )
        bias = self.param("bias", _param(nn.initializers.zeros_init(), self.bias_axes), self.bias_shape, pdtype)
        y = jnp.einsum(self.spec, x.astype(dtype), kernel.astype(dtype))
        return y + bias.astype(dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    # GPT-2 uses eps 1e-5 (TF's default was 1e-3; OpenAI set it explicitly).
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        scale_init=_param(nn.initializers.ones_init(), (NORM,)),
        bias_init=_param(nn.initializers.zeros_init(), (NORM,)),
        name=name,
    )


def _residual_stddev(cfg: ModelConfig) -> float:
    # GPT-2 paper: "scale the weights of residual layers at initialization by 1/sqrt(N)", N = the
    # number of residual layers, two per block (attention and MLP).
    return cfg.initializer_range / math.sqrt(2 * cfg.n_layer)


def attention_mask(
    q_pos_BT: jax.Array, kv_pos_S: jax.Array, kv_valid_BS: jax.Array | None
) -> jax.Array:
    """Boolean [B, 1, T, S] mask: causal over slots, padded keys hidden.

    A query always sees its own slot, so a padding query never has an empty row (no NaN).
    """
    causal_BTS = kv_pos_S[None, None, :] <= q_pos_BT[:, :, None]
    if kv_valid_BS is not None:
        causal_BTS = causal_BTS & kv_valid_BS[:, None, :]
    causal_BTS = causal_BTS | (kv_pos_S[None, None, :] == q_pos_BT[:, :, None])
    return causal_BTS[:, None, :, :]


class Attention(nn.Module):
    """Multi-head causal self-attention with an optional key/value cache for decoding."""

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD, input_mask_BT):
        cfg = self.config
        D, N, H = cfg.n_embd, cfg.n_head, cfg.head_dim
        qkv_BT3NH = Linear(
            "BTD,DKNH->BTKNH", (D, 3, N, H), (EMBED, QKV, HEADS, KV), (3, N, H), (QKV, HEADS, KV),
            cfg.initializer_range, cfg, name="c_attn",
        )(x_BTD)
        q_BTNH, k_BTNH, v_BTNH = (qkv_BT3NH[:, :, i] for i in range(3))
        q_BTNH = _constrain(q_BTNH, (ACT_BATCH, ACT_SEQ, ACT_HEADS, ACT_KV))
        B, T = x_BTD.shape[:2]

        if self.decode:
            # Write this chunk's keys/values at slots [index, index + T) of a fixed-size buffer.
            initialized = self.has_variable("cache", "cached_key")
            ck = self.variable("cache", "cached_key", jnp.zeros, k_BTNH.shape, k_BTNH.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, v_BTNH.shape, v_BTNH.dtype)
            cm = self.variable("cache", "cached_mask", jnp.zeros, (B, k_BTNH.shape[1]), jnp.bool_)
            ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if initialized:
                i = ci.value
                ck.value = jax.lax.dynamic_update_slice(ck.value, k_BTNH.astype(ck.value.dtype), (0, i, 0, 0))
                cv.value = jax.lax.dynamic_update_slice(cv.value, v_BTNH.astype(cv.value.dtype), (0, i, 0, 0))
                new_mask = jnp.ones((B, T), jnp.bool_) if input_mask_BT is None else input_mask_BT.astype(bool)
                cm.value = jax.lax.dynamic_update_slice(cm.value, new_mask, (0, i))
                ci.value = i + T
                S = ck.value.shape[1]
                q_pos_BT = jnp.broadcast_to(i + jnp.arange(T), (B, T))
                mask = attention_mask(q_pos_BT, jnp.arange(S), cm.value)
                k_BSNH, v_BSNH = ck.value, cv.value
            else:
                k_BSNH, v_BSNH, mask = k_BTNH, v_BTNH, None
        else:
            k_BSNH, v_BSNH = k_BTNH, v_BTNH
            mask = None
            if input_mask_BT is not None:
                pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
                mask = attention_mask(pos_BT, jnp.arange(T), input_mask_BT.astype(bool))

        use_dropout = cfg.attn_pdrop > 0.0 and not self.deterministic
        impl = attention.select(cfg, T, decode=self.decode, dropout=use_dropout)
        if use_dropout:
            # No attention kernel has dropout on the probabilities; spell it out.
            logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH).astype(jnp.float32) / math.sqrt(H)
            if mask is None:
                mask = jnp.tril(jnp.ones((T, k_BSNH.shape[1]), jnp.bool_))[None, None]
            logits_BNTS = jnp.where(mask, logits_BNTS, jnp.finfo(jnp.float32).min)
            probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
            probs_BNTS = nn.Dropout(cfg.attn_pdrop)(probs_BNTS, deterministic=False)
            out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)
        elif mask is not None:  # padded keys or a cache: only the XLA path takes a mask
            out_BTNH = attention.xla_attention(q_BTNH, k_BSNH, v_BSNH, mask)
        else:
            act_axes = (ACT_BATCH, ACT_SEQ, ACT_HEADS, ACT_KV)
            k_BSNH, v_BSNH = _constrain(k_BSNH, act_axes), _constrain(v_BSNH, act_axes)
            out_BTNH = attention.causal_attention(q_BTNH, k_BSNH, v_BSNH, impl, logical_axes=act_axes)
        out_BTNH = _constrain(out_BTNH, (ACT_BATCH, ACT_SEQ, ACT_HEADS, ACT_KV))
        return Linear(
            "BTNH,NHD->BTD", (N, H, D), (HEADS, KV, EMBED), (D,), (EMBED,),
            _residual_stddev(cfg), cfg, name="c_proj",
        )(out_BTNH)


class FeedForward(nn.Module):
    """Position-wise MLP: c_fc (D -> 4D), tanh GELU, c_proj (4D -> D)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        D, F = cfg.n_embd, cfg.n_inner
        h_BTF = Linear("BTD,DF->BTF", (D, F), (EMBED, MLP), (F,), (MLP,), cfg.initializer_range, cfg, name="c_fc")(x_BTD)
        # GPT-2 uses the tanh approximation of GELU (HF's "gelu_new").
        h_BTF = jax.nn.gelu(h_BTF, approximate=True)
        h_BTF = _constrain(h_BTF, (ACT_BATCH, ACT_SEQ, ACT_MLP))
        return Linear("BTF,FD->BTD", (F, D), (MLP, EMBED), (D,), (EMBED,), _residual_stddev(cfg), cfg, name="c_proj")(h_BTF)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False
    scanned: bool = False  # under nn.scan the block returns (carry, None)

    @nn.compact
    def __call__(self, x_BTD, input_mask_BT):
        cfg = self.config
        drop = functools.partial(nn.Dropout(cfg.resid_pdrop), deterministic=self.deterministic)
        h_BTD = Attention(cfg, self.deterministic, self.decode, name="attn")(_layer_norm(cfg, "ln_1")(x_BTD), input_mask_BT)
        x_BTD = x_BTD + drop(h_BTD)
        h_BTD = FeedForward(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x_BTD))
        x_BTD = _constrain(x_BTD + drop(h_BTD), (ACT_BATCH, ACT_SEQ, ACT_EMBED))
        return (x_BTD, None) if self.scanned else x_BTD


class GPT2(nn.Module):
    """GPT-2 language model. `apply({"params": p}, tokens_BT)` returns float32 logits [B, T, vocab]."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        input_mask_BT: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Args:
          tokens_BT: int token ids.
          positions_BT: position ids (default 0..T-1; per-row positions for left-padded batches).
          input_mask_BT: 1 for real tokens, 0 for padding; padded keys are never attended to.
          deterministic: disables dropout.
          decode: read and extend the key/value cache in the "cache" collection (see `init_cache`).
          return_hidden: return the final-LayerNorm activations [B, T, D] instead of logits.
        """
        cfg = self.config
        pdtype = jnp.dtype(cfg.param_dtype)
        B, T = tokens_BT.shape
        wte_VD = self.param(
            "wte", _param(nn.initializers.normal(cfg.initializer_range), (VOCAB, EMBED)),
            (cfg.padded_vocab_size, cfg.n_embd), pdtype,
        )
        # OpenAI's released model.py draws wte with std 0.02 and wpe with 0.01 (the paper gives
        # neither); Hugging Face's GPT2Model uses initializer_range for both.
        wpe_PD = self.param(
            "wpe", _param(nn.initializers.normal(cfg.initializer_range / 2), (POS, EMBED)), (cfg.n_ctx, cfg.n_embd),
            pdtype,
        )
        if positions_BT is None:
            cache = self.variables.get("cache", {}) if decode else {}
            start = _cache_index(cache) if cache else 0
            positions_BT = jnp.broadcast_to(start + jnp.arange(T), (B, T))
        wte_VD, wpe_PD = _lookup_tables(cfg, wte_VD, wpe_PD)
        x_BTD = jnp.take(wte_VD, tokens_BT, axis=0) + jnp.take(wpe_PD, positions_BT, axis=0)
        x_BTD = _constrain(x_BTD, (ACT_BATCH, ACT_SEQ, ACT_EMBED))
        x_BTD = nn.Dropout(cfg.embd_pdrop)(x_BTD, deterministic=deterministic)

        x_BTD = _blocks(cfg, x_BTD, input_mask_BT, deterministic=deterministic, decode=decode)
        x_BTD = _layer_norm(cfg, "ln_f")(x_BTD)
        if return_hidden:
            return x_BTD
        return lm_head(cfg, wte_VD, x_BTD)


def _lookup_tables(cfg: ModelConfig, wte_VD: jax.Array, wpe_PD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The embedding tables in the compute dtype and the layout the lookup (and the LM head) reads."""
    # The lookup reads the table in the layout the LM head needs (rows over `tensor`, the embed
    # axis gathered), in the compute dtype, so one gathered bfloat16 copy serves both. Gathering
    # straight from the FSDP layout (embed over `fsdp`) gives rows split by embed that XLA
    # cannot move onto the batch axes: on 2x2x2 it replicated the tensor every step
    # ("involuntary full rematerialization"). A one-hot matmul avoids the gather but pays the
    # head's FLOPs again. `python benchmarks/embedding_lookup.py` (small, 8 x 1024 tokens, mesh
    # 1,8,1, per device): this layout 238 GFLOP and 129 MiB of all-gathers; the plain gather 258
    # MiB (a second, float32 copy of the table); one-hot 397 GFLOP and 49 MiB more temporaries.
    # Cast each shard first (the parameter layout kept through the cast), then gather: the
    # all-gather moves compute-dtype bytes, not float32.
    dtype = jnp.dtype(cfg.dtype)
    wte_VD = _constrain(_constrain(wte_VD.astype(dtype), (VOCAB, EMBED)), (ACT_VOCAB, None))
    wpe_PD = _constrain(_constrain(wpe_PD.astype(dtype), (POS, EMBED)), (None, None))
    return wte_VD, wpe_PD


def _blocks(
    cfg: ModelConfig, x_BTD: jax.Array, input_mask_BT: jax.Array | None, *, deterministic: bool, decode: bool
) -> jax.Array:
    """The n_layer blocks, under `nn.scan` (one `h` with a leading layer axis) or unrolled (h_0 ...).

    Called inside `GPT2.__call__`, so the blocks it creates are GPT2's submodules.
    """
    block = Block
    if cfg.remat_policy not in ("none", "auto"):  # auto is resolved by the trainer; inference saves nothing anyway
        block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=cfg.n_layer,
            metadata_params={nn.PARTITION_NAME: LAYERS},
        )
        x_BTD, _ = stack(cfg, deterministic, decode, scanned=True, name="h")(x_BTD, input_mask_BT)
        return x_BTD
    for i in range(cfg.n_layer):
        x_BTD = block(cfg, deterministic, decode, name=f"h_{i}")(x_BTD, input_mask_BT)
    return x_BTD


def lm_head(cfg: ModelConfig, wte_VD: jax.Array, x_BTD: jax.Array) -> jax.Array:
    """The LM head tied to `wte`: final-LayerNorm activations -> float32 logits [..., vocab_size].

    Logits accumulate in float32 whatever the compute dtype; padded vocabulary rows are sliced off.
    Callers that stop at `return_hidden=True` (scoring a few positions, decoding) finish with this.
    """
    logits_BTV = jnp.einsum(
        "BTD,VD->BTV", x_BTD, wte_VD.astype(jnp.dtype(cfg.dtype)), preferred_element_type=jnp.float32
    )
    logits_BTV = _constrain(logits_BTV, (ACT_BATCH, ACT_SEQ, ACT_VOCAB))
    return logits_BTV[..., : cfg.vocab_size]


# Shortest padded length: sequences are padded to a power of two (at least this) so that a
# handful of shapes are ever compiled, for evaluation windows and generation prompts alike.
MIN_BUCKET = 16


def length_bucket(n: int, cap: int) -> int:
    """The padded length for `n` tokens: the next power of two, at least MIN_BUCKET, at most `cap`."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


def _cache_index(cache) -> jax.Array:
    """The shared write index of a cache tree (every layer holds the same value)."""
    if "h" in cache:  # scanned layers: one index per layer on a leading axis
        return cache["h"]["attn"]["cache_index"][0]
    return cache["h_0"]["attn"]["cache_index"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialized parameters as plain arrays (logical-axis boxes removed)."""
    tokens = jnp.zeros((1, min(8, config.n_ctx)), jnp.int32)
    return nn.meta.unbox(jax.jit(GPT2(config).init)(rng, tokens)["params"])


def abstract_params(config: ModelConfig) -> dict[str, Any]:
    """Parameter shapes and dtypes (`jax.ShapeDtypeStruct`s, logical boxes kept), allocating nothing."""
    tokens = jax.ShapeDtypeStruct((1, min(8, config.n_ctx)), jnp.int32)
    return jax.eval_shape(GPT2(config).init, jax.random.key(0), tokens)["params"]


def logical_axes(config: ModelConfig) -> dict[str, Any]:
    """A tree of logical `PartitionSpec`s matching the params tree."""
    return nn.get_partition_spec(abstract_params(config))


def count_params(config: ModelConfig, *, exclude_padding: bool = True) -> int:
    """Number of parameters (tied LM head counted once), computed without allocating."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(config)))
    n = sum(math.prod(x.shape) for x in leaves)
    if exclude_padding:
        n -= (config.padded_vocab_size - config.vocab_size) * config.n_embd
    return n


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> dict[str, Any]:
    """An empty key/value cache for `apply(..., decode=True, mutable=["cache"])`, `max_len` slots."""
    if max_len > config.n_ctx:
        raise ValueError(f"cache length {max_len} exceeds the context n_ctx={config.n_ctx}")
    tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
    shapes = jax.eval_shape(
        functools.partial(GPT2(config).init, decode=True), jax.random.key(0), tokens
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes))


def stack_layers(params: dict[str, Any], n_layer: int) -> dict[str, Any]:
    """Per-layer params (h_0 ... h_{L-1}) -> the scanned layout (one `h` with a leading L axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"h_{i}"] for i in range(n_layer)])
    return out


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """The scanned layout (`h` with a leading L axis) -> per-layer params h_0 ... h_{L-1}."""
    out = {k: v for k, v in params.items() if k != "h"}
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    for i in range(n_layer):
        out[f"h_{i}"] = jax.tree.map(lambda x: x[i], params["h"])
    return out
