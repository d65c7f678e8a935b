"""The fault matrix of a run directory, through `python -m gpt2_jax.train` (slow).

Each case ends either with a run whose per-step losses and final parameters equal an uninterrupted
run's bit for bit, or with a refusal that changed nothing on disk. Faults are injected by running the
trainer from a small script that first wraps one function so that it SIGKILLs its own process at the
chosen point. tests/test_checkpoint_resume.py holds the other cases of the matrix (SIGTERM, a stuck async save,
a truncated newest checkpoint, a read-only checkpoints folder).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gpt2_jax import checkpoint as C
from gpt2_jax import run_dir
from gpt2_jax import weights as W
from helpers import run_losses

pytestmark = pytest.mark.slow

# 20 steps with a checkpoint and an evaluation every 5, two checkpoints kept (so 5 is pruned when 15
# is saved, 10 when 20 is), dropout on so that the restored RNG matters.
ARGS = [
    "tiny", "n_layer=1", "n_embd=32", "n_head=2", "seq_len=32", "batch_size=4", "steps=20", "dropout=0.1",
    "eval_every=5", "eval_batches=2", "sample_tokens=2", "log_every=1", "ckpt_every=5", "ckpt_keep=2", "mesh=1,1,1",
]
KILL = "import os, signal, sys\ndef die(why):\n    print('FAULT:', why, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
MAIN = "\nfrom gpt2_jax.train.cli import main\nsys.exit(main(sys.argv[1:]))\n"

FAULTS = {
    # The 13th step is dispatched, its metrics not yet read.
    "mid-step": """
from gpt2_jax.train import hooks
push = hooks.Meter.push
def killing_push(self, step, metrics):
    push(self, step, metrics)
    if step == 12:
        die("step 13 in flight")
hooks.Meter.push = killing_push
""",
    # Orbax is writing step 15 in the background.
    "mid-async-save": """
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def killing_finalize(self):
    if self.get_final().name == "15":
        die("the save of step 15 is being written")
    return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
""",
    # The evaluation after step 15 has scored one batch of two.
    "mid-eval": """
from gpt2_jax import sharding
from gpt2_jax.train import loop
evaluate, calls = loop.validation_loss, []
def killing_evaluate(eval_step, params, batches, mesh):
    calls.append(1)
    if len(calls) == 3:
        eval_step(params, sharding.shard_batch(batches[0], mesh))["loss_sum"].block_until_ready()
        die("evaluation after step 15, one batch done")
    return evaluate(eval_step, params, batches, mesh)
loop.validation_loss = killing_evaluate
""",
    # Step 5 is being deleted (after step 15's save): half of its items are gone.
    "mid-prune": """
import shutil
import orbax.checkpoint as ocp
def killing_delete(self, step):
    shutil.rmtree(os.path.join(os.fspath(self.directory), str(step), "opt_state"))
    die(f"deleting checkpoint {step}")
ocp.CheckpointManager.delete = killing_delete
""",
    # Step 15 is complete on disk; step 5 is not pruned yet.
    "between-save-and-prune": """
from gpt2_jax import checkpoint
prune = checkpoint.Checkpointer._prune
def killing_prune(self):
    if 15 in self.steps():
        die("step 15 saved, not pruned")
    prune(self)
checkpoint.Checkpointer._prune = killing_prune
""",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data):
    return {**os.environ, "GPT2_JAX_DATA_DIR": str(shared_data), "GPT2_JAX_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
            "JAX_PLATFORMS": "cpu"}


# Holds the run at step 5 until the file named by GPT2_JAX_TEST_RESUME exists (the run keeps its lock).
PAUSE = """
import os, sys, time
from gpt2_jax.train import hooks
push = hooks.Meter.push
def pausing_push(self, step, metrics):
    push(self, step, metrics)
    if step == 4:
        print("PAUSED", flush=True)
        while not os.path.exists(os.environ["GPT2_JAX_TEST_RESUME"]):
            time.sleep(0.1)
hooks.Meter.push = pausing_push
"""


def _args(extra) -> list[str]:
    """ARGS with `extra` key=value settings replacing those of the same key (a key may be given once)."""
    settings = dict(a.split("=", 1) for a in ARGS[1:])
    settings.update(a.split("=", 1) for a in extra)
    return [ARGS[0]] + [f"{k}={v}" for k, v in settings.items()]


def run(run_dir, env, *, fault: str | None = None, extra=(), preexec=None, wait=True, code=None):
    if code is None:
        code = None if fault is None else KILL + FAULTS[fault] + MAIN
    cmd = [sys.executable, "-m", "gpt2_jax.train"] if code is None else [sys.executable, "-c", code]
    proc = subprocess.Popen(
        cmd + _args(extra) + [f"run_dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, preexec_fn=preexec,
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The uninterrupted run: its losses, final parameters and the checkpoints it keeps."""
    run_dir = tmp_path_factory.mktemp("reference")
    code, out = run(run_dir, env)
    assert code == 0, out
    return run_losses(run_dir), W.load(run_dir)[1], C.complete_steps(run_dir / "checkpoints")


def assert_same_as_reference(run_dir, reference):
    ref_losses, ref_params, ref_steps = reference
    got = run_losses(run_dir)
    assert got == ref_losses  # every step once, each loss bit for bit
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))
    params = W.load(run_dir)[1]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
    assert C.complete_steps(run_dir / "checkpoints") == ref_steps
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit() and not p.name.endswith(C.DAMAGED_SUFFIX)]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_sigkill_then_resume(tmp_path, env, reference, fault):
    code, out = run(tmp_path, env, fault=fault)
    assert code == -signal.SIGKILL and "FAULT:" in out, out
    code, out = run(tmp_path, env)
    assert code == 0, out
    assert "Traceback" not in out
    assert_same_as_reference(tmp_path, reference)
    starts = run_dir.read_history(tmp_path)
    assert len(starts) == 2 and starts[1]["start_step"] in (5, 10, 15) and starts[1]["changed"] == {}


def _snapshot(path):
    """Every file with its size and modification time; the lock file's holder record aside."""
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*") if p.is_file() and p.name != run_dir.LOCK_FILE
    )


def test_shape_mismatched_resume_is_refused_and_changes_nothing(tmp_path, env, reference):
    code, out = run(tmp_path, env, fault="mid-step")
    assert code == -signal.SIGKILL, out
    before = _snapshot(tmp_path)
    code, out = run(tmp_path, env, extra=["n_embd=64", "batch_size=8"])
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, out
    assert "n_embd=32 (now 64)" in errors[0] and "batch_size=4 (now 8)" in errors[0] and "another run_dir=" in errors[0]
    assert _snapshot(tmp_path) == before
    code, out = run(tmp_path, env)
    assert code == 0, out
    assert_same_as_reference(tmp_path, reference)


def test_full_disk_reports_one_line_per_failed_save_then_recovers(tmp_path, env, reference):
    def small_files():  # every file this process writes is capped at 2 MiB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.RLIM_INFINITY))

    code, out = run(tmp_path, env, preexec=small_files)
    assert code == 1, out
    failed = [line for line in out.splitlines() if "was NOT saved" in line]
    assert len(failed) == 4 and all("File too large" in line and len(line) < 500 for line in failed), out
    assert "Traceback" not in out and "ERROR:absl" not in out
    assert "warnings.log" in failed[0] and (tmp_path / "warnings.log").is_file()
    assert C.complete_steps(tmp_path / "checkpoints") == []
    code, out = run(tmp_path, env)  # with room again: from the start, and the old records are dropped
    assert code == 0, out
    assert_same_as_reference(tmp_path, reference)


def test_two_concurrent_starts(tmp_path, env, reference):
    resume = tmp_path.parent / f"{tmp_path.name}-resume"
    first = run(tmp_path, {**env, "GPT2_JAX_TEST_RESUME": str(resume)}, code=PAUSE + MAIN, wait=False)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if "PAUSED" in line:  # after a progress bar's carriage return, on the same line
            break
    start = time.perf_counter()
    code, out = run(tmp_path, env, extra=["seed=1"])
    resume.touch()
    assert code == 2 and time.perf_counter() - start < 60, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"is in use by pid {first.pid}" in error[0], out
    rest, _ = first.communicate(timeout=600)
    assert first.returncode == 0, "".join(lines) + rest
    assert [s["pid"] for s in run_dir.read_history(tmp_path)] == [first.pid]  # the refused start wrote nothing
    assert_same_as_reference(tmp_path, reference)


def test_what_a_resume_may_change(tmp_path, env):
    """Mesh, strategy, learning rate and steps may change on resume (the state is resharded, the
    schedule follows the new settings); batch size and sequence length may not (they fix the data
    iterator's position): those are refused before anything on disk changes."""
    env8 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    code, out = run(tmp_path, env8, fault="mid-step", extra=["mesh=1,8,1", "strategy=fsdp", "batch_size=8"])
    assert code == -signal.SIGKILL, out
    before = _snapshot(tmp_path)
    for change, named in ((["batch_size=16"], "batch_size=8 (now 16)"), (["seq_len=16"], "seq_len=32 (now 16)")):
        code, out = run(tmp_path, env8, extra=["mesh=1,8,1", "strategy=fsdp", "batch_size=8", *change])
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and named in errors[0], out
        assert _snapshot(tmp_path) == before
    code, out = run(tmp_path, env8, extra=["mesh=2,2,2", "strategy=fsdp_tp", "batch_size=8", "lr=2e-3", "steps=24"])
    assert code == 0, out
    assert re.search(r"resumed from checkpoint step (5|10) ", out), out  # 10 unless its save was still in flight
    changed = run_dir.read_history(tmp_path)[-1]["changed"]
    assert {"train.mesh", "train.strategy", "train.lr", "train.steps"} <= set(changed) and changed["train.steps"] == [20, 24]
    assert sorted(run_losses(tmp_path)) == list(range(1, 25))
    assert C.complete_steps(tmp_path / "checkpoints")[-1] == 24
