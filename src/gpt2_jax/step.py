"""Pure train, eval, prefill and decode steps, the train state, and its sharded initialization.

`train_step(state, batch, *, model, tx, schedule, grad_accum)` and `eval_step(params, batch, *,
model)` are top-level pure functions; bind the keyword arguments with `functools.partial` and jit
them (see `compile_train_step`). Batches are dicts {"tokens": int32 [B, T+1]} with an optional
"mask" (float32 [B, T], the weight of each target token: fine-tuning puts 0 on prompt tokens).
`prefill` and `decode_step` run the model on its key/value cache (`gpt2_jax.generate.Generator`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from gpt2_jax import sharding
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import GPT2, abstract_params, init_cache, lm_head


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (the optimizer itself is bound, not stored)."""

    step: jax.Array  # int32 scalar: optimizer steps taken so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 raw key data (jax.random.key_data); dropout keys derive from it


def init_train_state(config: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array, params: Any = None) -> TrainState:
    """A fresh TrainState, with new random params or the given ones (fine-tuning). `rng` is a typed
    key (jax.random.key); jit this with out_shardings to shard."""
    init_rng, dropout_rng = jax.random.split(rng)
    if params is None:
        tokens = jnp.zeros((1, min(8, config.n_ctx)), jnp.int32)
        params = nn.meta.unbox(GPT2(config).init(init_rng, tokens)["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(dropout_rng),
    )


def has_dropout(config: ModelConfig) -> bool:
    return max(config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) > 0.0


def loss_terms(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None, *, model: GPT2) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token cross-entropies, sum of weights), both float32.

    Dropout is on when `rng` (a typed key) is given.
    """
    tokens_BT1 = batch["tokens"]
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    rngs = None if rng is None else {"dropout": rng}
    logits_BTV = model.apply({"params": params}, inputs_BT, deterministic=rng is None, rngs=rngs)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    mask_BT = batch.get("mask")
    if mask_BT is None:
        mask_BT = jnp.ones(losses_BT.shape, jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.sum(losses_BT * mask_BT), jnp.sum(mask_BT)


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    # Micro-batch i takes rows i, k+i, 2k+i, ...: the reshape keeps each device's rows on that
    # device when the batch is sharded over its leading axis.
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: GPT2,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over `batch`, accumulated over `grad_accum` micro-batches.

    The loss is the mean over all weighted target tokens of the whole batch, so k micro-batches of
    b rows give the same update as one batch of k*b rows.
    """
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout = has_dropout(model.config)
    grad_fn = jax.value_and_grad(functools.partial(loss_terms, model=model), has_aux=True)

    def micro_grads(micro_batch, i):
        rng = jax.random.fold_in(step_rng, i) if dropout else None
        (loss_sum, weight), grads = grad_fn(state.params, micro_batch, rng)
        return loss_sum, weight, grads

    if grad_accum == 1:
        loss_sum, weight, grads = micro_grads(batch, 0)
    else:
        micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), batch)

        def body(carry, xs):
            i, micro_batch = xs
            loss_sum, weight, grads = micro_grads(micro_batch, i)
            acc_loss, acc_weight, acc_grads = carry
            return (acc_loss + loss_sum, acc_weight + weight, jax.tree.map(jnp.add, acc_grads, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (loss_sum, weight, grads), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))

    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": optax.global_norm(grads),  # before clipping
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "tokens": jnp.asarray(batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1), jnp.int32),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: GPT2) -> dict[str, jax.Array]:
    """Summed loss and weight of a validation batch (the "mask" marks scored targets); no dropout."""
    loss_sum, weight = loss_terms(params, batch, None, model=model)
    return {"loss_sum": loss_sum, "weight": weight}


def padding_inputs(lengths_B: jax.Array, bucket: int) -> tuple[jax.Array, jax.Array]:
    """Per-row positions (real tokens start at 0) and the input mask of a left-padded batch."""
    offset_B = bucket - lengths_B
    slot_T = jnp.arange(bucket)
    mask_BT = slot_T[None, :] >= offset_B[:, None]
    positions_BT = jnp.maximum(slot_T[None, :] - offset_B[:, None], 0)
    return positions_BT.astype(jnp.int32), mask_BT


def prefill(cfg: ModelConfig, params, tokens_BP: jax.Array, lengths_B: jax.Array, cache_len: int, *, all_logits: bool = False):
    """Run a left-padded prompt batch through the model into a fresh cache of `cache_len` slots.

    Returns (logits, cache, positions_BP, mask_BP): logits of the last prompt token [B, V], or of
    every slot [B, P, V] with `all_logits`.
    """
    B, P = tokens_BP.shape
    positions_BP, mask_BP = padding_inputs(lengths_B, P)
    cache = init_cache(cfg, B, cache_len)
    x_BPD, variables = GPT2(cfg).apply(
        {"params": params, "cache": cache}, tokens_BP, positions_BP, mask_BP,
        decode=True, return_hidden=True, mutable=["cache"],
    )
    logits = lm_head(cfg, params["wte"], x_BPD if all_logits else x_BPD[:, -1:])
    return (logits if all_logits else logits[:, 0]), variables["cache"], positions_BP, mask_BP


def decode_step(cfg: ModelConfig, params, cache, tokens_BT: jax.Array, positions_BT: jax.Array):
    """Feed new tokens at the cache's next slots; returns (logits [B, T, V], cache)."""
    logits, variables = GPT2(cfg).apply(
        {"params": params, "cache": cache}, tokens_BT, positions_BT, jnp.ones(tokens_BT.shape, bool),
        decode=True, mutable=["cache"],
    )
    return logits, variables["cache"]


def state_shardings(config: ModelConfig, tx: optax.GradientTransformation, mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract TrainState, TrainState of NamedShardings) for `config` on `mesh`; allocates nothing.

    The abstract state's ShapeDtypeStructs carry their shardings, so it serves directly as the
    target of a restore or of `lower`.
    """
    abstract = jax.eval_shape(lambda: init_train_state(config, tx, jax.random.key(0)))
    p_sh = sharding.param_shardings(abstract_params(config), mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = sharding.opt_state_shardings(tx, abstract.opt_state, p_sh, mesh)
    shardings = TrainState(step=replicated, params=p_sh, opt_state=opt_sh, rng=replicated)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def init_train_state_sharded(config: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh, rules, params: Any = None):
    """A TrainState created directly in its sharded layout (the full model never sits on one device),
    with new random params or the given ones (host or device arrays in the layout of `config`).

    Returns (state, shardings).
    """
    _, shardings = state_shardings(config, tx, mesh, rules)
    if params is None:
        init = sharding.sharded_jit(
            lambda: init_train_state(config, tx, jax.random.key(seed)), mesh, rules, out_shardings=shardings
        )
        return init(), shardings
    # Given params go straight onto their shardings; only the optimizer state is created around them.
    init = sharding.sharded_jit(
        lambda p: init_train_state(config, tx, jax.random.key(seed), p), mesh, rules,
        in_shardings=(shardings.params,), out_shardings=shardings,
    )
    return init(jax.device_put(params, shardings.params)), shardings


def compile_train_step(
    config: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int,
    mesh,
    rules,
    shardings: TrainState,
):
    """`train_step` bound to the model and optimizer, jitted with shardings and the state donated."""
    fn = functools.partial(train_step, model=GPT2(config), tx=tx, schedule=schedule, grad_accum=grad_accum)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return sharding.sharded_jit(
        fn,
        mesh,
        rules,
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def compile_eval_step(config: ModelConfig, mesh, rules, params_shardings: Any):
    """`eval_step` bound to the model, jitted with shardings."""
    fn = functools.partial(eval_step, model=GPT2(config))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return sharding.sharded_jit(
        fn, mesh, rules, in_shardings=(params_shardings, sharding.batch_sharding(mesh)), out_shardings=replicated
    )
