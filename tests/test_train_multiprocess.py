"""Multi-process training: 2 processes x 2 CPU devices (gloo collectives) == 1 process x 4 devices.

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


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
