"""Optimizer: weight-decay mask by name, learning-rate schedule, decoupled decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import optim
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import abstract_params
from flax import linen as nn

CFG = dict(vocab_size=101, n_ctx=16, n_embd=48, n_layer=2, n_head=3)


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_by_name(scan):
    params = nn.meta.unbox(abstract_params(ModelConfig(**CFG, scan_layers=scan)))
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): (m, x.ndim) for (p, m), x in zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params))}
    block = "['h']" if scan else "['h_1']"
    assert flat["['wte']"][0] and flat["['wpe']"][0]
    assert flat[f"{block}['attn']['c_attn']['kernel']"][0]
    assert flat[f"{block}['mlp']['c_proj']['kernel']"][0]
    assert not flat[f"{block}['attn']['c_attn']['bias']"][0]
    assert not flat[f"{block}['ln_1']['scale']"][0]
    assert not flat["['ln_f']['bias']"][0]
    if scan:  # a LayerNorm scale under scan is 2-D and still must not decay
        assert flat["['h']['ln_2']['scale']"] == (False, 2)
    n_decay = sum(m for m, _ in flat.values())
    assert n_decay == 2 + 4 * (1 if scan else CFG["n_layer"])  # wte, wpe + four kernels per block


def test_decay_mask_refuses_unknown_names():
    with pytest.raises(ValueError, match="no weight-decay rule"):
        optim.decay_mask({"block": {"gamma": jnp.ones(3)}})


def test_lr_schedule():
    s = optim.lr_schedule(1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = np.array([float(s(i)) for i in range(120)])
    np.testing.assert_allclose(lrs[0], 1e-4, rtol=1e-6)  # (0 + 1) / 10 of the peak: no wasted step
    np.testing.assert_allclose(lrs[9], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[10], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[60], 0.55e-3, rtol=1e-5)  # halfway through the cosine
    np.testing.assert_allclose(lrs[110:], 1e-4, rtol=1e-5)  # 10% of the peak, then flat
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[10:111]) < 0)


def test_adamw_decays_only_masked_leaves():
    params = {"wte": jnp.full((4, 3), 2.0), "ln_f": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)}}
    tx = optim.make_optimizer(lambda _: 0.1, weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["wte"], -0.1 * 0.5 * 2.0, rtol=1e-6)  # decoupled: -lr * wd * p
    np.testing.assert_array_equal(updates["ln_f"]["scale"], 0.0)
    np.testing.assert_array_equal(updates["ln_f"]["bias"], 0.0)


def test_clipping_at_global_norm_one():
    # Grads [1e6, 0] then [1, 0]: clipped, both become [1, 0] and Adam's second update is exactly -lr;
    # unclipped, the first gradient dominates the moments and the update differs.
    params = {"wte": jnp.zeros((2,))}

    def second_update(clip):
        tx = optim.make_optimizer(lambda _: 1.0, weight_decay=0.0, grad_clip=clip)
        st = tx.init(params)
        _, st = tx.update({"wte": jnp.array([1e6, 0.0])}, st, params)
        u, _ = tx.update({"wte": jnp.array([1.0, 0.0])}, st, params)
        return float(u["wte"][0])

    np.testing.assert_allclose(second_update(1.0), -1.0, rtol=1e-5)
    assert abs(second_update(0.0) + 1.0) > 0.1
