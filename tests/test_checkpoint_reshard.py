"""Restore anywhere: a train state saved on one mesh restores onto another mesh or device count,
and every model size's abstract train state comes back from saved metadata without allocating."""

import functools
import json

import jax
import numpy as np
import pytest

from gpt2_jax import checkpoint as C
from gpt2_jax import weights as W
from gpt2_jax import optim, sharding, step
from gpt2_jax.config import ModelConfig, get_model_config
from gpt2_jax.model import count_params

# Odd sizes on purpose: 3 heads do not divide over tensor=2, 101 vocab rows over nothing.
CFG = ModelConfig(vocab_size=101, n_ctx=32, n_embd=60, n_layer=2, n_head=3)
SEQ, BATCH = 16, 8


@functools.lru_cache(maxsize=None)
def _tx():
    schedule = optim.lr_schedule(1e-2, 2, 10)
    return optim.make_optimizer(schedule), schedule


def _mesh(shape, n):
    return sharding.make_mesh(shape, devices=jax.devices()[:n])


def _setup(mesh, strategy="fsdp_tp"):
    tx, schedule = _tx()
    rules = sharding.logical_rules(strategy, mesh, CFG)
    target, shardings = step.state_shardings(CFG, tx, mesh, rules)
    train_step = step.compile_train_step(CFG, tx, schedule, 1, mesh, rules, shardings)
    return rules, shardings, target, train_step


def _batch(seed, mesh):
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    return sharding.shard_batch({"tokens": tokens}, mesh)


def _host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.slow
def test_restore_onto_other_meshes_and_back(tmp_path):
    mesh8 = _mesh((2, 2, 2), 8)
    rules8, sh8, target8, step8 = _setup(mesh8)
    state, _ = step.init_train_state_sharded(CFG, _tx()[0], 0, mesh8, rules8)
    for i in range(2):
        state, _ = step8(state, _batch(i, mesh8))
    assert not state.params["h_0"]["mlp"]["c_fc"]["kernel"].sharding.is_fully_replicated
    with C.Checkpointer(tmp_path / "a") as ck:
        assert ck.save(2, state, data_state={"step": 2})
    saved = _host(state)
    _, m = step8(state, _batch(2, mesh8))  # the next step without a round trip
    ref_loss = float(m["loss"])

    for shape, n in (((1, 4, 1), 4), ((1, 1, 1), 1)):
        mesh = _mesh(shape, n)
        _, shardings, target, train_step = _setup(mesh)
        r = C.Checkpointer(tmp_path / "a", read_only=True).restore_latest(target)
        assert r.step == 2 and r.data_state == {"step": 2}
        for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(shardings)):
            assert got.sharding == want and got.sharding.mesh.devices.size == n
        jax.tree.map(np.testing.assert_array_equal, _host(r.state), saved)
        _, m = train_step(r.state, _batch(2, mesh))
        assert abs(float(m["loss"]) - ref_loss) <= 1e-6, (shape, float(m["loss"]), ref_loss)

    # ... and back: saved from 1 device, restored on the 8-device mesh.
    mesh1 = _mesh((1, 1, 1), 1)
    _, _, target1, _ = _setup(mesh1)
    one = C.Checkpointer(tmp_path / "a", read_only=True).restore_latest(target1).state
    with C.Checkpointer(tmp_path / "b") as ck:
        assert ck.save(2, one)
    r = C.Checkpointer(tmp_path / "b", read_only=True).restore_latest(target8)
    for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(sh8)):
        assert got.sharding == want
    jax.tree.map(np.testing.assert_array_equal, _host(r.state), saved)
    _, m = step8(r.state, _batch(2, mesh8))
    assert abs(float(m["loss"]) - ref_loss) <= 1e-6


def _save_and_restore_full_state(tmp_path, cfg):
    mesh = _mesh((1, 8, 1), 8)
    tx = optim.make_optimizer(optim.lr_schedule(1e-3, 1, 10))
    rules = sharding.logical_rules("fsdp", mesh, cfg)
    state, shardings = step.init_train_state_sharded(cfg, tx, 0, mesh, rules)
    with C.Checkpointer(tmp_path) as ck:
        assert ck.save(1, state, config={"model": cfg.to_dict()})
    abstract = C.abstract_like(state)
    saved = _host(state)
    del state
    r = C.Checkpointer(tmp_path, read_only=True).restore_latest(abstract)
    for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(shardings)):
        assert got.sharding == want
    jax.tree.map(np.testing.assert_array_equal, _host(r.state), saved)
    assert W.load(tmp_path)[0] == cfg


def test_full_state_tiny(tmp_path):
    _save_and_restore_full_state(tmp_path, get_model_config("tiny"))


@pytest.mark.slow
def test_full_state_small(tmp_path):
    _save_and_restore_full_state(tmp_path, get_model_config("small"))


@pytest.mark.parametrize(
    "size", ["medium", pytest.param("large", marks=pytest.mark.slow), pytest.param("xl", marks=pytest.mark.slow)]
)
def test_abstract_structure_of_big_sizes_from_saved_metadata(tmp_path, size):
    """The `structure` item every checkpoint carries, written for the real train state of `size` on
    a (2,2,2) mesh, gives back shapes, dtypes and shardings on other meshes without allocating."""
    import orbax.checkpoint as ocp

    cfg = get_model_config(size)
    tx = optim.make_optimizer(optim.lr_schedule(1e-3, 1, 10))
    live_before = {id(x) for x in jax.live_arrays()}  # earlier tests' arrays may be freed meanwhile

    def target_on(mesh):
        rules = sharding.logical_rules("fsdp_tp", mesh, cfg)
        return C._state_items(step.state_shardings(cfg, tx, mesh, rules)[0])

    mesh8 = _mesh((2, 2, 2), 8)
    saved_on = target_on(mesh8)
    ckptr = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    ckptr.save(tmp_path / "structure", args=ocp.args.JsonSave(C.describe(saved_on)))
    desc = C.read_json_item(tmp_path, "structure")
    assert json.loads(json.dumps(desc)) == desc
    n_params = sum(int(np.prod(v["shape"])) for k, v in desc["leaves"].items() if k.startswith("['params']"))
    assert n_params == count_params(cfg)

    for mesh in (mesh8, _mesh((1, 4, 1), 4), _mesh((1, 1, 1), 1)):
        got = C.abstract_from_description(desc, mesh)
        target = saved_on if mesh is mesh8 else target_on(mesh)
        want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
        assert set(got) == set(want)
        for k, w in want.items():
            g = got[k]
            assert (g.shape, g.dtype) == (w.shape, w.dtype), k
            assert g.sharding.is_equivalent_to(w.sharding, len(w.shape)), (k, g.sharding, w.sharding)
    assert not [x.shape for x in jax.live_arrays() if id(x) not in live_before]  # nothing was allocated
