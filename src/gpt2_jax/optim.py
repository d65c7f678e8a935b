"""Optimizers: AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask by
name; and Muon (Newton-Schulz-orthogonalized momentum) for the blocks' weight matrices with AdamW
for the rest."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

# Peak learning rates. The GPT-2 paper did not publish its own; these are the GPT-3 paper's
# (Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1) for the models of about
# the same size: GPT-3 Small 125M 6.0e-4, Medium 350M 3.0e-4, Large 760M 2.5e-4, XL 1.3B 2.0e-4.
# `tiny` is this project's CPU demo size; 1e-3 trains it quickly on Tiny Shakespeare.
PEAK_LR = {"tiny": 1e-3, "small": 6e-4, "medium": 3e-4, "large": 2.5e-4, "xl": 2e-4}

# Leaf names of the model's parameters (see model.py) and whether weight decay applies. Weight
# matrices and the embedding tables decay; biases and LayerNorm scales/offsets do not. Matching by
# name, not by ndim: under scanned layers a LayerNorm scale is 2-D [layers, D].
DECAY_BY_NAME = {"kernel": True, "wte": True, "wpe": True, "bias": False, "scale": False}


def _leaf_name(path) -> str:
    key = path[-1]
    return str(getattr(key, "key", getattr(key, "name", key)))


def decay_mask(params: Any) -> Any:
    """A tree of bools like `params`: True where weight decay applies.

    Raises ValueError for a parameter name not in `DECAY_BY_NAME`, so a renamed module can never
    silently change which weights decay.
    """

    def f(path, _):
        name = _leaf_name(path)
        if name not in DECAY_BY_NAME:
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} has no weight-decay rule; "
                f"known leaf names: {', '.join(DECAY_BY_NAME)}"
            )
        return DECAY_BY_NAME[name]

    return jax.tree_util.tree_map_with_path(f, params)


def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup to `peak_lr`, then cosine decay to `min_lr_ratio * peak_lr` at `total_steps`.

    Step s < warmup uses peak * (s + 1) / warmup, so the very first update is not wasted at lr 0.
    """
    min_lr = min_lr_ratio * peak_lr

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * (step + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def make_optimizer(
    schedule: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW (decoupled weight decay on `decay_mask` leaves).

    b2 = 0.95 and clipping at 1.0 follow GPT-3's training setup (Brown et al. 2020, appendix B).
    """
    chain = []
    if grad_clip > 0:
        chain.append(optax.clip_by_global_norm(grad_clip))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*chain)


def warmdown_schedule(peak_lr: float, warmup_steps: int, total_steps: int, warmdown_frac: float) -> optax.Schedule:
    """Linear warmup to `peak_lr`, constant, then a linear decay to 0 over the last `warmdown_frac`
    of `total_steps` (the modded-nanogpt records' "trapezoidal" schedule).

    Step s < warmup uses peak * (s + 1) / warmup, as `lr_schedule`; in the warmdown step s uses
    peak * (total - s) / warmdown, so the last step (total - 1) still moves the weights.
    """
    warmdown = max(round(warmdown_frac * total_steps), 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * (step + 1.0) / max(warmup_steps, 1)
        down = peak_lr * jnp.clip((total_steps - step) / warmdown, 0.0, 1.0)
        return jnp.where(step < warmup_steps, warm, down)

    return schedule


# ----------------------------------------------------------------------------- Muon
#
# Defaults from KellerJordan/modded-nanogpt's records of GPT-2 small with the embedding and the LM
# head tied, as here (records/102924_Optimizers/README.md compares optimizers on the 10/18/24
# record's code): Muon at lr 0.02, momentum 0.95, Nesterov, on every matrix of the blocks; Adam on
# the shared embedding/head at lr 0.0036, betas (0.9, 0.95) (the 10/18/24 record's
# `learning_rate`); zero weight decay everywhere ("found to be empirically optimal"); no warmup,
# constant, then a linear warmdown over the last 1,450 of 5,100 steps ("warmup-stable-decay /
# trapezoidal"). The iteration: 5 Newton-Schulz steps of the quintic with coefficients (3.4445,
# -4.7750, 2.0315), run in bfloat16 on X / (||X||_F + 1e-7), on X^T when X has more rows than
# columns, the result scaled by max(1, fan_out / fan_in) ** 0.5 (modded-nanogpt's train_gpt.py
# and KellerJordan/Muon).
# TrainConfig's muon_* settings, schedule=warmdown and warmdown_frac hold the rest as defaults, and
# warmup_steps=auto and weight_decay=auto mean 0 and 0 under muon (train.config.OPTIMIZER_DEFAULTS).
MUON_MOMENTUM = 0.95
MUON_ADAM_LR = 0.0036
NS_STEPS = 5
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


class HiddenMatrix(NamedTuple):
    """How a block kernel's layout (model.py) is read as matrices [fan_in, fan_out]: its first
    `fan_in` axes are the fan-in, then (`split`) one axis that separates whole matrices (c_attn's
    query, key and value), then `fan_out` axes; any axes before them are a batch (scanned layers)."""

    fan_in: int
    split: bool
    fan_out: int


# The matrices Muon orthogonalizes, by (sub-module, module) of their `kernel`. Under scan_layers each
# kernel has a leading layers axis, and is a batch of L matrices (3L for c_attn).
HIDDEN_MATRICES = {
    ("attn", "c_attn"): HiddenMatrix(1, True, 2),  # [D, 3, N, H]: q, k and v, each [D, N*H]
    ("attn", "c_proj"): HiddenMatrix(2, False, 1),  # [N, H, D] -> [N*H, D]
    ("mlp", "c_fc"): HiddenMatrix(1, False, 1),  # [D, F]
    ("mlp", "c_proj"): HiddenMatrix(1, False, 1),  # [F, D]
}


def _hidden_matrix(path) -> HiddenMatrix | None:
    """The layout of a parameter Muon trains, or None for one AdamW trains (wte, wpe, biases, LayerNorms).

    Raises ValueError for a kernel of an unknown module, so that a renamed module can never
    silently move from one optimizer to the other.
    """
    if _leaf_name(path) != "kernel":
        return None
    module = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path[-3:-1])
    if module not in HIDDEN_MATRICES:
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} is a kernel of no known hidden matrix; "
            f"known: {', '.join('/'.join(m) for m in HIDDEN_MATRICES)}"
        )
    return HIDDEN_MATRICES[module]


def muon_labels(params: Any) -> Any:
    """A tree of labels like `params`: "muon" for the blocks' weight matrices, "adamw" for the rest."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "adamw" if _hidden_matrix(path) is None else "muon", params)


def as_matrices(x: jax.Array, layout: HiddenMatrix) -> jax.Array:
    """A kernel -> a batch of matrices [..., fan_in, fan_out] (batch axes: layers, then q/k/v)."""
    lead = x.ndim - layout.fan_in - int(layout.split) - layout.fan_out
    if layout.split:  # [..., D, 3, N, H] -> [..., 3, D, N, H]
        x = jnp.moveaxis(x, lead + layout.fan_in, lead)
        lead += 1
    shape = x.shape[lead:]
    fan_in = math.prod(shape[: layout.fan_in])
    return x.reshape(x.shape[:lead] + (fan_in, math.prod(shape) // fan_in))


def from_matrices(m: jax.Array, layout: HiddenMatrix, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of `as_matrices` for a kernel of `shape`."""
    if not layout.split:
        return m.reshape(shape)
    lead = len(shape) - layout.fan_in - 1 - layout.fan_out
    split_at = lead + layout.fan_in
    moved = shape[:lead] + (shape[split_at],) + shape[lead:split_at] + shape[split_at + 1:]
    return jnp.moveaxis(m.reshape(moved), lead, split_at)


def newton_schulz(g: jax.Array, steps: int = NS_STEPS, dtype: Any = jnp.bfloat16) -> jax.Array:
    """An approximate U V^T of each matrix G = U S V^T of a batch [..., m, n], in `dtype`.

    The quintic X <- aX + (bA + cA^2)X with A = X X^T, from X = G / ||G||_F (so every singular value
    is at most 1), run on the wider orientation (A is min(m, n) square). Its coefficients push the
    singular values into about [0.7, 1.2] rather than onto 1 in 5 steps, which trains as well
    (modded-nanogpt). The norm is taken in float32, the iteration runs in `dtype`.
    """
    tall = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if tall else g
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
    x = (x.astype(jnp.float32) / (norm + NS_EPS)).astype(dtype)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        xx = jnp.einsum("...mn,...kn->...mk", x, x)
        poly = b * xx + c * jnp.einsum("...mk,...kj->...mj", xx, xx)
        x = a * x + jnp.einsum("...mk,...kn->...mn", poly, x)
    return jnp.swapaxes(x, -1, -2) if tall else x


def orthogonalize(steps: int = NS_STEPS, dtype: Any = jnp.bfloat16) -> optax.GradientTransformation:
    """Replace each hidden matrix's update by its Newton-Schulz orthogonalization, scaled by
    max(1, fan_out / fan_in) ** 0.5; c_attn's q, k and v separately, scanned layers as a batch.

    Stateless; updates keep their parameters' shapes and dtypes (and so their shardings).
    """

    def update(updates, state, params=None):
        del params

        def one(path, u):
            layout = _hidden_matrix(path)
            m = as_matrices(u, layout)
            # Each matrix is gathered whole onto every device for its iteration, and the result is
            # sliced back to the parameter's shards (the update takes the parameter's sharding). Split
            # over fsdp or tensor, each of the 3 matmuls of each of the 5 steps would need its own
            # all-gather or reduction of an m x n or m x m array (15 collectives per matrix instead
            # of one gather of the normalized, compute-dtype matrix), and the row-split X X^T needs
            # all of X anyway. The price is that every device repeats all the iterations: for `small`
            # 1.63 TFLOP per step (costs.newton_schulz_flops), 0.36% of a 524,288-token step's
            # FLOPs, 2.9% of each device's share on 8 devices (docs/benchmarks.md); spreading the
            # matrices over the devices (an all-to-all each way, as modded-nanogpt's distributed
            # Muon) is the step beyond that when many devices share a model.
            # Both ends are pinned: with the input alone, XLA propagates the parameter's sharding
            # back from the result into the iteration and runs it split after all (measured: 12x
            # the all-gather bytes of this layout for `small` under fsdp).
            whole = (None,) * m.ndim
            o = nn.with_logical_constraint(newton_schulz(nn.with_logical_constraint(m, whole), steps, dtype), whole)
            scale = max(1.0, m.shape[-1] / m.shape[-2]) ** 0.5
            return from_matrices(o.astype(jnp.float32) * scale, layout, u.shape).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_muon_optimizer(
    muon_schedule: optax.Schedule,
    adam_schedule: optax.Schedule,
    *,
    momentum: float = MUON_MOMENTUM,
    nesterov: bool = True,
    ns_steps: int = NS_STEPS,
    ns_dtype: Any = jnp.bfloat16,
    muon_weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """Clip the global gradient norm, then Muon for the blocks' weight matrices (`muon_labels`) and
    AdamW, with its weight-decay mask by name, for the rest.

    Muon: momentum (optax.trace: m <- g + momentum * m; Nesterov uses g + momentum * m), kept in
    each parameter's own shape and sharding, orthogonalized (`orthogonalize`), decoupled weight decay
    `muon_weight_decay`, times `muon_schedule`.
    """
    muon = [optax.trace(decay=momentum, nesterov=nesterov), orthogonalize(ns_steps, ns_dtype)]
    if muon_weight_decay > 0:
        muon.append(optax.add_decayed_weights(muon_weight_decay))
    muon.append(optax.scale_by_learning_rate(muon_schedule))
    adamw = optax.adamw(adam_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    chain.append(optax.partition({"muon": optax.chain(*muon), "adamw": adamw}, muon_labels))
    return optax.chain(*chain)
