"""A train state saved by 2 processes x 2 CPU devices (gloo) restores in 1 process on 4 devices.

Run as a script, this file is the worker: `python tests/test_checkpoint_multiprocess.py PROCESS_ID
NUM_PROCESSES PORT RUN_DIR` builds the sharded state of a small model on a (data=2, fsdp=2) mesh and
saves it (asynchronously, through gpt2_jax.checkpoint) as step 3 of RUN_DIR, each process with its
own data iterator state, then restores it.
"""

import os
import socket
import subprocess
import sys

import pytest


def _state(mesh):
    from gpt2_jax import optim, sharding, step
    from gpt2_jax.config import ModelConfig

    cfg = ModelConfig(vocab_size=101, n_ctx=32, n_embd=48, n_layer=2, n_head=3)
    tx = optim.make_optimizer(optim.lr_schedule(1e-2, 1, 3))
    rules = sharding.logical_rules("fsdp", mesh, cfg)
    return step.init_train_state_sharded(cfg, tx, 0, mesh, rules)


def worker(process_id: int, num_processes: int, port: int, run_dir: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 4 // num_processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from gpt2_jax import checkpoint, sharding

    assert sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
    state, _ = _state(sharding.make_mesh((2, 2, 1)))
    with checkpoint.Checkpointer(run_dir) as ck:
        assert ck.save(3, state.replace(step=state.step + 3), data_state={"step": 3, "process": process_id})
    print("saved", flush=True)
    # Every process gets back its own data iterator state.
    r = checkpoint.Checkpointer(run_dir, read_only=True).restore_latest(checkpoint.abstract_like(state))
    assert r.data_state == {"step": 3, "process": process_id}, r.data_states
    print("restored", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_saved_by_two_processes_restores_in_one(tmp_path):
    import jax
    import numpy as np

    from gpt2_jax import checkpoint, sharding

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), "2", str(port), str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "saved" in out and "restored" in out, err[-3000:]
    mesh = sharding.make_mesh((1, 4, 1), devices=jax.devices()[:4])
    want, _ = _state(mesh)
    r = checkpoint.Checkpointer(tmp_path, read_only=True).restore_latest(checkpoint.abstract_like(want))
    assert r.step == 3 and int(r.state.step) == 3
    assert r.data_states == [{"step": 3, "process": 0}, {"step": 3, "process": 1}]
    with pytest.raises(checkpoint.CheckpointError, match="saved by 2 process"):
        r.data_state  # one process cannot continue two processes' data streams
    for a, b in zip(jax.tree.leaves(r.state.params), jax.tree.leaves(want.params)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
