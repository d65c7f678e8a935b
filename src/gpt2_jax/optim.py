"""Optimizer: AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask by name."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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
