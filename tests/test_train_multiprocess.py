"""Multi-process training: 2 processes x 2 CPU devices (gloo collectives) == 1 process x 4 devices,
and the trainer run as 2 processes resumes exactly from a checkpoint.

Run as a script, this file is the worker: `python tests/test_train_multiprocess.py PROCESS_ID
NUM_PROCESSES PORT` trains 3 steps of a small model on a (data=2, fsdp=2) mesh and process 0
prints the per-step losses as JSON.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import run_losses

GLOBAL_BATCH, SEQ, STEPS = 8, 16, 3


def worker(process_id: int, num_processes: int, port: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 4 // num_processes)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from gpt2_jax import optim, sharding, step
    from gpt2_jax.config import ModelConfig

    if num_processes > 1:
        assert sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == 4 // num_processes
    cfg = ModelConfig(vocab_size=101, n_ctx=32, n_embd=48, n_layer=2, n_head=3, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    mesh = sharding.make_mesh((2, 2, 1))
    rules = sharding.logical_rules("fsdp", mesh, cfg)
    sched = optim.lr_schedule(1e-2, 1, STEPS)
    tx = optim.make_optimizer(sched)
    state, shardings = step.init_train_state_sharded(cfg, tx, 0, mesh, rules)
    train_step = step.compile_train_step(cfg, tx, sched, 2, mesh, rules, shardings)
    rows = GLOBAL_BATCH // num_processes
    losses = []
    tokens = np.random.default_rng(0).integers(0, 101, (GLOBAL_BATCH, SEQ + 1)).astype(np.int32)
    for _ in range(STEPS):
        local = tokens[process_id * rows : (process_id + 1) * rows]  # each process feeds only its rows
        state, metrics = train_step(state, sharding.shard_batch({"tokens": local}, mesh))
        losses.append(float(metrics["loss"]))
    if process_id == 0:
        print(json.dumps(losses), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(num_processes: int) -> list[float]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), str(num_processes), str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(num_processes)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_match_one_process():
    single = _launch(1)
    multi = _launch(2)
    assert len(single) == STEPS and single[-1] < single[0]
    np.testing.assert_allclose(multi, single, rtol=1e-5)


# The trainer itself, as 2 processes x 2 CPU devices: a tiny model on Tiny Shakespeare with dropout,
# checkpoints at steps 3 and 6. Each process reads its own rows of every global batch.
TRAIN_ARGS = [
    "tiny", "n_layer=1", "n_embd=48", "n_head=3", "seq_len=16", "batch_size=8", "steps=6", "dropout=0.1",
    "eval_every=0", "eval_batches=1", "sample_tokens=1", "log_every=1", "ckpt_every=3", "mesh=2,2,1",
]


def _train_two_processes(run_dir: Path, env: dict, *extra: str) -> str:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gpt2_jax.train", *TRAIN_ARGS, *extra, f"run_dir={run_dir}",
             "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs[0]


@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path, shared_data):
    """Every process's data iterator position is saved and restored: a run that resumes from its step
    3 checkpoint repeats steps 4..6 of the straight run bit for bit."""
    import jax

    from gpt2_jax import checkpoint, weights

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", GPT2_JAX_DATA_DIR=str(shared_data),
        GPT2_JAX_CACHE_DIR=str(tmp_path / "cache"),
    )
    run_dir = tmp_path / "run"
    _train_two_processes(run_dir, env)
    straight = run_losses(run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and checkpoint.complete_steps(ckpts) == [3, 6]
    data = checkpoint.read_json_item(ckpts / "3", "data")["processes"]
    assert len(data) == 2 and data[0] == data[1]  # the global data position, the same on every process
    want = weights.load(ckpts / "6")[1]
    (ckpts / "6").rename(tmp_path / "6")  # as if the run had died after its step 3 checkpoint

    out = _train_two_processes(run_dir, env)
    assert "resumed from checkpoint step 3" in out
    again = run_losses(run_dir)  # the resumed run's records of steps 4..6 come last and win
    assert {s: again[s] for s in (4, 5, 6)} == {s: straight[s] for s in (4, 5, 6)}
    got = weights.load(ckpts / "6")[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_two_processes_score_hellaswag(tmp_path, shared_data):
    """hellaswag_every= on a mesh over two processes: each passes the same items and reads every
    result; the figures are those of the eval task on the run's final weights in one process."""
    import jax

    from gpt2_jax import weights
    from gpt2_jax.eval import Scorer, tasks
    from helpers import write_hellaswag

    data = tmp_path / "data"
    write_hellaswag(data)
    (data / "tiny_shakespeare").symlink_to(shared_data / "tiny_shakespeare")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", GPT2_JAX_DATA_DIR=str(data), GPT2_JAX_CACHE_DIR=str(tmp_path / "cache"),
    )
    run_dir = tmp_path / "run"
    out = _train_two_processes(run_dir, env, "hellaswag_every=3")
    assert "hellaswag (4 items)" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "hellaswag_acc_sum" in r}
    assert sorted(scored) == [3, 6]
    cfg, params = weights.load(run_dir / "checkpoints" / "6")
    items = tasks.read_hellaswag(data / "hellaswag" / "hellaswag_val.jsonl")
    want = tasks.score_hellaswag(Scorer(cfg, params, devices=jax.devices()[:1]), items)["metrics"]
    assert {k: scored[6][f"hellaswag_{k}"] for k in want} == want


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
