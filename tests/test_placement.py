"""One placement policy: evaluation and generation hold parameters the way training does (FSDP over
the local devices by default), so no device needs a whole copy, and the figures equal one device's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import sharding
from gpt2_jax.config import ModelConfig, get_model_config
from gpt2_jax.eval import Scorer
from gpt2_jax.generate import Generator, SamplingConfig
from gpt2_jax.model import abstract_params, init_params


def _per_device_bytes(params) -> dict:
    out: dict = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@pytest.fixture(scope="module")
def xl_params():
    """xl-shaped parameters (bfloat16 to halve the host memory of 8 simulated devices), created
    directly in the default placement's shards: the whole model is never on one device."""
    cfg = get_model_config("xl", param_dtype="bfloat16")
    place = sharding.placement(cfg, devices=jax.local_devices())
    shapes = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, abstract_params(cfg), is_leaf=lambda x: hasattr(x, "value"))
    zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=place.param_shardings(abstract_params(cfg)))
    return cfg, zeros()


def _assert_spread(params, total_bytes):
    per_device = _per_device_bytes(params)
    assert len(per_device) == 8
    # Every device holds about an eighth; the largest share is far from a whole copy.
    assert max(per_device.values()) < total_bytes / 8 * 1.02
    for leaf in jax.tree.leaves(params):
        if leaf.size >= 1 << 20:
            assert not leaf.sharding.is_fully_replicated


def test_eval_and_generate_spread_xl_over_8_devices(xl_params):
    cfg, params = xl_params
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert total > 3e9  # 1.56 billion bfloat16 parameters
    scorer = Scorer(cfg, params, batch_size=8)
    _assert_spread(scorer.params, total)
    assert dict(scorer.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    gen = Generator(cfg, params)
    _assert_spread(gen.params, total)
    assert gen.placement.mesh.size == 8


CFG = ModelConfig(
    vocab_size=211, n_ctx=64, n_embd=64, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
)


@pytest.fixture(scope="module")
def small_model():
    return CFG, jax.tree.map(np.asarray, init_params(CFG, jax.random.key(7)))


def test_scores_on_8_devices_equal_one_device(small_model):
    cfg, params = small_model
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (5, 17, 33, 64, 65, 9, 40, 2, 30, 12)]
    one = Scorer(cfg, params, batch_size=4, placement=sharding.placement(cfg, (1, 1, 1), devices=jax.devices()[:1]))
    eight = Scorer(cfg, params, batch_size=4)
    assert eight.mesh.size == 8 and not eight.params["h_0"]["mlp"]["c_fc"]["kernel"].sharding.is_fully_replicated
    for (lp1, hit1), (lp8, hit8) in zip(one.score(rows), eight.score(rows)):
        np.testing.assert_allclose(lp8, lp1, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(hit8, hit1)


def test_generation_on_8_devices_equals_one_device(small_model):
    cfg, params = small_model
    prompts = [[1, 2, 3], [5, 8, 13, 21, 34], [7] * 11, [100, 3], [4], [9, 9], [50, 60, 70], [200]]
    one = Generator(cfg, params, sharding.placement(cfg, (1, 1, 1), devices=jax.devices()[:1]))
    eight = Generator(cfg, params)
    assert eight.placement.mesh.size == 8
    greedy = SamplingConfig(max_new_tokens=12, greedy=True, eot_id=None)
    np.testing.assert_array_equal(eight.generate_tokens(prompts, greedy).tokens, one.generate_tokens(prompts, greedy).tokens)
    # A single row (training's samples): the batch is not split, the parameters still are.
    sampled = SamplingConfig(max_new_tokens=12, top_k=5, eot_id=None)
    np.testing.assert_array_equal(
        eight.generate_tokens(prompts[:1], sampled, seed=3).tokens, one.generate_tokens(prompts[:1], sampled, seed=3).tokens
    )
    assert math.prod(eight.params["wte"].sharding.shard_shape(eight.params["wte"].shape)) < eight.params["wte"].size
