"""Sharding: 1 device vs 8 fake CPU devices on several meshes, rules, guards, bad meshes."""


import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gpt2_jax import optim, sharding, step
from gpt2_jax.config import ModelConfig, get_model_config
from gpt2_jax.model import GPT2, abstract_params

# Odd sizes: 5 heads do not divide over tensor=2 (that axis is dropped for them), 101 vocab rows
# neither; n_embd=80 and the MLP width 320 do. Scanned layers (the large-model layout; it also
# compiles faster).
CFG = ModelConfig(
    vocab_size=101, n_ctx=32, n_embd=80, n_layer=2, n_head=5, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
    scan_layers=True,
)


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (8, 17)).astype(np.int32)
    mask = (rng.random((8, 16)) < 0.8).astype(np.float32)
    return {"tokens": tokens, "mask": mask}


def _loss_and_grads(mesh, strategy, params, batch):
    rules = sharding.logical_rules(strategy, mesh, CFG)
    boxed = abstract_params(CFG)
    p_sh = sharding.param_shardings(boxed, mesh, rules)
    params = jax.device_put(params, p_sh)

    def loss(p, b):
        loss_sum, weight = step.loss_terms(p, b, None, model=GPT2(CFG))
        return loss_sum / weight

    f = sharding.sharded_jit(
        jax.value_and_grad(loss), mesh, rules, in_shardings=(p_sh, sharding.batch_sharding(mesh)), out_shardings=(None, p_sh)
    )
    value, grads = f(params, sharding.shard_batch(batch, mesh))
    return float(value), jax.tree.map(np.asarray, grads), p_sh


@pytest.fixture(scope="module")
def reference():
    init = jax.jit(lambda: step.init_train_state(CFG, optim.make_optimizer(lambda _: 0.0), jax.random.key(1)).params)
    params = jax.tree.map(np.asarray, init())
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    value, grads, _ = _loss_and_grads(mesh, "dp", params, _batch())
    return params, value, grads


@pytest.mark.parametrize(
    "shape,strategy", [((8, 1, 1), "dp"), ((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tp"), ((1, 4, 2), "fsdp_tp")]
)
def test_mesh_matches_one_device(reference, shape, strategy):
    params, ref_value, ref_grads = reference
    mesh = sharding.make_mesh(shape)
    value, grads, p_sh = _loss_and_grads(mesh, strategy, params, _batch())
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    # Relative to each gradient's scale (float sums in another order differ near zero).
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    c_fc = p_sh["h"]["mlp"]["c_fc"]["kernel"].spec  # [layers, embed, mlp]
    c_attn = p_sh["h"]["attn"]["c_attn"]["kernel"].spec
    if strategy == "dp":
        assert c_fc == P(None, None, None)
    elif strategy == "fsdp":
        assert c_fc == P(None, "fsdp", None)
    else:
        assert c_fc == P(None, "fsdp", "tensor")
        assert c_attn == P(None, "fsdp", None, None, None)  # 5 heads: tensor=2 dropped
        assert p_sh["wte"].spec == P(None, "fsdp")  # 101 vocab rows: tensor dropped


@pytest.mark.slow
def test_sharded_train_step_with_accumulation_matches_one_device():
    sched = optim.lr_schedule(1e-2, 1, 10)
    tx = optim.make_optimizer(sched)
    batch = _batch()
    losses = {}
    for shape in [(1, 1, 1), (2, 2, 2)]:
        mesh = sharding.make_mesh(shape, jax.devices()[: int(np.prod(shape))])
        rules = sharding.logical_rules("fsdp_tp", mesh, CFG)
        state, sh = step.init_train_state_sharded(CFG, tx, 0, mesh, rules)
        assert state.params["h"]["mlp"]["c_fc"]["kernel"].sharding == sh.params["h"]["mlp"]["c_fc"]["kernel"]
        train = step.compile_train_step(CFG, tx, sched, 2, mesh, rules, sh)
        out = []
        for _ in range(2):
            state, m = train(state, sharding.shard_batch(batch, mesh))
            out.append(float(m["loss"]))
        losses[shape] = out
    np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], rtol=1e-5)


def test_rules_drop_axes_that_do_not_divide():
    mesh = sharding.make_mesh((1, 4, 2))
    rules = dict(sharding.logical_rules("fsdp_tp", mesh, CFG))
    assert rules["act_heads"] is None and rules["act_vocab"] is None and rules["act_mlp"] == "tensor"
    assert rules["act_batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"
    assert sharding.mesh_spec(P("embed", "mlp"), (6, 320), mesh, rules) == P(None, "tensor")
    assert dict(sharding.logical_rules("dp"))["embed"] is None
    with pytest.raises(sharding.ShardingError, match="unknown sharding strategy"):
        sharding.logical_rules("zero3")


def test_mesh_shapes():
    assert sharding.resolve_mesh_shape("-1,1,1", 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape("2,-1,2", 8) == (2, 2, 2)
    assert sharding.make_mesh("1,-1,2").shape == {"data": 1, "fsdp": 4, "tensor": 2}
    for bad in ["3,1,1", "2,2", "a,b,c", "-1,-1,1", "3,-1,1"]:
        with pytest.raises(sharding.ShardingError):
            sharding.resolve_mesh_shape(bad, 8)


def test_batch_checks():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.check_batch(16, 2, mesh) == 16
    with pytest.raises(sharding.ShardingError, match="multiple of 4"):
        sharding.check_batch(12, 2, mesh)
    with pytest.raises(sharding.ShardingError, match="not divisible"):
        sharding.check_batch(16, 3, mesh)


def test_fsdp_guard():
    boxed = abstract_params(CFG)
    shapes = nn.meta.unbox(boxed)
    ok = sharding.param_shardings(boxed, sharding.make_mesh((1, 8, 1)), sharding.logical_rules("fsdp"))
    sharding.check_params_sharded(ok, "fsdp", min_elements=1000, shapes=shapes)
    bad = sharding.param_shardings(boxed, sharding.make_mesh((8, 1, 1)), sharding.logical_rules("fsdp"))
    with pytest.raises(sharding.ShardingError, match="replicated"):
        sharding.check_params_sharded(bad, "fsdp", min_elements=1000, shapes=shapes)


@pytest.mark.parametrize("size", ["small", "medium", "large", "xl"])
def test_presets_build_sharded_state_abstractly(size):
    cfg = get_model_config(size, scan_layers=True, pad_vocab_multiple=128)
    mesh = sharding.make_mesh((1, 8, 1))
    rules = sharding.logical_rules("fsdp", mesh, cfg)
    tx = optim.make_optimizer(optim.lr_schedule(1e-4, 10, 100))
    abstract, sh = step.state_shardings(cfg, tx, mesh, rules)
    sharding.check_params_sharded(sh.params, "fsdp", shapes=abstract.params)
    total = sum(x.size for x in jax.tree.leaves(abstract.params))
    per_device = sum(
        np.prod(s.shard_shape(x.shape)) for s, x in zip(jax.tree.leaves(sh.params), jax.tree.leaves(abstract.params))
    )
    assert per_device < total / 8 * 1.01  # all but LayerNorms and a few biases split 8 ways
    mu = sh.opt_state[1][0].mu  # AdamW's first moment follows its parameter
    assert mu["h"]["mlp"]["c_fc"]["kernel"] == sh.params["h"]["mlp"]["c_fc"]["kernel"]


def test_dimensions_the_tensor_axis_does_not_divide_are_named():
    mesh = sharding.make_mesh((1, 4, 2))
    assert sharding.tensor_undivided(CFG, mesh) == {"act_heads": "5 heads", "act_vocab": "101 vocabulary rows"}
    xl = get_model_config("xl", pad_vocab_multiple=128)
    assert sharding.tensor_undivided(xl, mesh) == {"act_heads": "25 heads"}
    assert sharding.tensor_undivided(xl, sharding.make_mesh((1, 8, 1))) == {}
