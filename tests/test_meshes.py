"""Every mesh and strategy compiles without XLA's involuntary full rematerialization (train, eval
and sample programs), and the whole command-line run (train, evaluate, sample, checkpoint, resume)
finishes on each with the losses of one device."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt2_jax import generate, hlo, optim, sharding, step
from gpt2_jax.config import ModelConfig
from helpers import run_losses

REMAT = hlo.INVOLUNTARY_REMAT
MESHES = [((8, 1, 1), "dp"), ((1, 8, 1), "fsdp"), ((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp"), ((1, 4, 2), "fsdp_tp")]

# Padded vocabulary (211 -> 256 rows) that tensor=2 divides, so the embedding table is sharded over
# vocab and embed at once; and an odd shape where tensor is dropped for heads and vocab.
CONFIGS = {
    "vocab-sharded": ModelConfig(
        vocab_size=211, pad_vocab_multiple=128, n_ctx=32, n_embd=64, n_layer=2, n_head=4,
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, scan_layers=True,
    ),
    "odd": ModelConfig(
        vocab_size=101, n_ctx=32, n_embd=80, n_layer=2, n_head=5, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
    ),
}


def test_the_log_capture_sees_an_involuntary_rematerialization():
    """The check below cannot pass by not seeing the warning: the old embedding lookup (a gather from
    a table sharded over embed, its rows then constrained onto the batch axes) still triggers it."""
    mesh = sharding.make_mesh((2, 2, 2))
    table = jax.ShapeDtypeStruct((256, 64), jnp.float32, sharding=NamedSharding(mesh, P("tensor", "fsdp")))
    ids = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    def lookup(t, i):
        x = jnp.take(t, i, axis=0)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(("data", "fsdp"))))

    _, log = hlo.compile_logged(lambda: jax.jit(lookup).lower(table, ids))
    assert REMAT in log


def sample_program(cfg, place, params):
    """Training's sample: one prompt row, KV-cached decode on the training placement, lowered."""
    rows = place.row_sharding(1)
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rows)
    with jax.set_mesh(place.mesh):
        return generate._generate_jit.lower(
            params, tokens, lengths, np.uint32(0), np.float32(1.0), np.float32(1.0), cfg=cfg, rules=place.rules_for_rows(1),
            max_new_tokens=4, greedy=False, top_k=40, use_top_p=False, eot_id=None, stream=False,
        )


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("shape,strategy", MESHES, ids=[f"{'x'.join(map(str, s))}-{st}" for s, st in MESHES])
def test_no_involuntary_rematerialization(shape, strategy, config_name):
    cfg = CONFIGS[config_name]
    mesh = sharding.make_mesh(shape)
    rules = sharding.logical_rules(strategy, mesh, cfg)
    sched = optim.lr_schedule(1e-3, 2, 10)
    tx = optim.make_optimizer(sched)
    abstract, sh = step.state_shardings(cfg, tx, mesh, rules)
    batch = {"tokens": jax.ShapeDtypeStruct((16, cfg.n_ctx + 1), jnp.int32, sharding=sharding.batch_sharding(mesh))}
    programs = {
        "train": lambda: step.compile_train_step(cfg, tx, sched, 2, mesh, rules, sh).lower(abstract, batch),
        "eval": lambda: step.compile_eval_step(cfg, mesh, rules, sh.params).lower(abstract.params, batch),
        "sample": lambda: sample_program(cfg, sharding.Placement(mesh, strategy, rules), abstract.params),
    }
    for name, lower in programs.items():
        _, log = hlo.compile_logged(lower)
        assert REMAT not in log, f"{name} program: " + next(line for line in log.splitlines() if REMAT in line)


MUON_MESHES = [((1, 8, 1), "fsdp"), ((1, 4, 2), "fsdp_tp"), ((2, 2, 2), "fsdp_tp")]


@pytest.mark.slow  # about 2 minutes on 2 cores
def test_muon_on_every_mesh_matches_one_device():
    """optimizer=muon under fsdp and fsdp_tp: the train step compiles without involuntary
    rematerialization, and 3 steps give the losses and parameters of one device (the scanned
    config: its c_attn is a batch of 6 matrices, its vocabulary sharded)."""
    cfg = CONFIGS["vocab-sharded"]
    sched = optim.lr_schedule(1e-3, 1, 10)
    tx = optim.make_muon_optimizer(optim.lr_schedule(0.02, 1, 10), sched, ns_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, cfg.vocab_size, (16, cfg.n_ctx + 1), dtype=np.int32)} for _ in range(3)]
    results = {}
    for shape, strategy in [((1, 1, 1), "dp")] + MUON_MESHES:
        mesh = sharding.make_mesh(shape, jax.devices()[: int(np.prod(shape))])
        rules = sharding.logical_rules(strategy, mesh, cfg)
        state, sh = step.init_train_state_sharded(cfg, tx, 0, mesh, rules)
        train = step.compile_train_step(cfg, tx, sched, 2, mesh, rules, sh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        batch = {"tokens": jax.ShapeDtypeStruct((16, cfg.n_ctx + 1), jnp.int32, sharding=sharding.batch_sharding(mesh))}
        _, log = hlo.compile_logged(lambda: train.lower(abstract, batch))
        assert REMAT not in log, next(line for line in log.splitlines() if REMAT in line)
        losses = []
        for b in batches:
            state, m = train(state, sharding.shard_batch(b, mesh))
            losses.append(float(m["loss"]))
        results[shape] = losses, jax.device_get(state.params)
    for shape, _ in MUON_MESHES:
        np.testing.assert_allclose(results[shape][0], results[(1, 1, 1)][0], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results[shape][1], results[(1, 1, 1)][1])


# ----------------------------------------------------------------------------- the whole CLI run

ROOT = Path(__file__).resolve().parents[1]
# A small model over Tiny Shakespeare: 6 steps, then a checkpoint and an evaluation of the whole
# validation split (about 130 batches: the case that once aborted with a rendezvous timeout), 6 more
# steps, an evaluation, a sample and the final checkpoint.
RUN_ARGS = [
    "tiny", "steps=12", "seq_len=32", "batch_size=8", "n_layer=2", "n_embd=64", "n_head=4", "pad_vocab_multiple=128",
    "eval_every=6", "ckpt_every=6", "ckpt_async=false", "log_every=1", "sample_tokens=8", "lr=1e-3",
]


def _run(run_dir: Path, devices: int, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "gpt2_jax.train", *RUN_ARGS, f"run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert REMAT not in proc.stderr, next(line for line in proc.stderr.splitlines() if REMAT in line)
    return proc


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, shared_data):
    run_dir = tmp_path_factory.mktemp("one-device") / "run"
    _run(run_dir, 1, ["mesh=1,1,1", "strategy=dp"])
    return run_losses(run_dir)


# The whole run on three of the meshes, one per strategy, the data axis used by each (about a minute
# a case). The pure 1x8x1 fsdp run is tests/test_faults.py's `test_what_a_resume_may_change`, which
# then resumes it on 2x2x2 fsdp_tp; every mesh's step is compared with one device in test_sharding.py.
RUN_MESHES = [((8, 1, 1), "dp"), ((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")]


@pytest.mark.slow
@pytest.mark.parametrize("shape,strategy", RUN_MESHES, ids=[f"{'x'.join(map(str, s))}-{st}" for s, st in RUN_MESHES])
def test_cli_run_and_resume_on_every_mesh(tmp_path, one_device, shape, strategy):
    run_dir = tmp_path / "run"
    mesh = [f"mesh={','.join(map(str, shape))}", f"strategy={strategy}"]
    proc = _run(run_dir, 8, mesh)
    assert "val loss" in proc.stdout and "sample:" in proc.stdout
    losses = run_losses(run_dir)
    assert sorted(losses) == list(range(1, 13))
    np.testing.assert_allclose([losses[s] for s in range(1, 13)], [one_device[s] for s in range(1, 13)], rtol=1e-5)
    # Resume: drop the final checkpoint and run the same command; it continues from step 6.
    shutil.rmtree(run_dir / "checkpoints" / "12")
    (run_dir / "final.json").unlink()
    proc = _run(run_dir, 8, mesh)
    assert "resumed from checkpoint step 6" in proc.stdout + proc.stderr
    resumed = run_losses(run_dir)
    np.testing.assert_allclose([resumed[s] for s in range(7, 13)], [one_device[s] for s in range(7, 13)], rtol=1e-5)
    assert (run_dir / "checkpoints" / "12").is_dir()
