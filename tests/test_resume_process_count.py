"""Resume on another number of processes: the trainer (CLI) as 1, 2 or 4 processes x 2 CPU devices
(gloo), stopped after its step STOP checkpoint and resumed on another process count with the same
global batch: 2 -> 1, 2 -> 4 and 1 -> 2 processes.

The global batch of a step does not depend on the process count, so a resumed run draws the very
batches of an uninterrupted one (its data position in the last checkpoint is the reference's), and
its losses differ only by the order in which another device count sums (dropout is 0): measured,
at most LOSS_TOL_MEASURED between 2, 4 and 8 devices; the test allows LOSS_TOL. A resume that
cannot keep the global batch is one error line and leaves the run directory as it was.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import checkpoint as C
from helpers import run_losses, pod_env
from test_train_multiprocess import _free_port

pytestmark = pytest.mark.slow

STEPS, STOP = 8, 4
# warmup_steps (20) outlasts the run, so the learning rate does not depend on steps=: a run of
# steps=STOP is an uninterrupted run stopped at its step STOP checkpoint.
ARGS = [
    "tiny", "n_layer=1", "n_embd=48", "n_head=3", "seq_len=16", "batch_size=8", "grad_accum=1", "dropout=0",
    "eval_every=0", "eval_batches=1", "sample_tokens=1", "log_every=1", f"ckpt_every={STOP}",
]
LOSS_TOL_MEASURED = 9.54e-7  # the largest difference seen (the printed lines): one float32 ulp at 10.8
LOSS_TOL = 1e-5  # about ten ulps of the losses (near 10.8), summed in another order over 2, 4 or 8 devices
LIMIT_S = 240


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data):
    return pod_env(shared_data, tmp_path_factory.mktemp("cache"))


def train(run_dir: Path, env: dict, processes: int, *extra: str) -> tuple[list[int], list[str]]:
    """The trainer as `processes` processes on `run_dir`: (each one's exit status, each one's output)."""
    cmd = [sys.executable, "-m", "gpt2_jax.train", *_args(extra), f"run_dir={run_dir}"]
    if processes > 1:
        cmd += ["--coordinator", f"localhost:{_free_port()}", "--num-processes", str(processes)]
    procs = [
        subprocess.Popen(cmd + (["--process-id", str(i)] if processes > 1 else []), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(processes)
    ]
    try:
        outs = [p.communicate(timeout=LIMIT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


def _args(extra) -> list[str]:
    """ARGS with `extra` key=value settings replacing those of the same key."""
    settings = dict(a.split("=", 1) for a in ARGS[1:])
    settings.update(a.split("=", 1) for a in extra)
    return [ARGS[0]] + [f"{k}={v}" for k, v in settings.items()]


def trained(run_dir: Path, env: dict, processes: int, *extra: str) -> str:
    """Process 0's output of a run that must succeed."""
    codes, outs = train(run_dir, env, processes, *extra)
    assert codes == [0] * processes, "\n".join(out[-3000:] for out in outs)
    assert "Traceback" not in "".join(outs)
    return outs[0]


def data_states(run_dir: Path, step: int) -> list[dict]:
    return C.read_json_item(run_dir / "checkpoints" / str(step), "data")["processes"]


def max_difference(losses: dict[int, float], reference: dict[int, float], steps) -> float:
    return max(abs(losses[s] - reference[s]) for s in steps)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> Path:
    """An uninterrupted run of STEPS steps on 2 processes, with checkpoints at STOP and STEPS."""
    run_dir = tmp_path_factory.mktemp("reference")
    trained(run_dir, env, 2, f"steps={STEPS}")
    assert sorted(run_losses(run_dir)) == list(range(1, STEPS + 1))
    assert C.complete_steps(run_dir / "checkpoints") == [STOP, STEPS]
    return run_dir


def stopped_on_two(reference: Path, run_dir: Path) -> Path:
    """The reference as if it had died after its step STOP checkpoint (its later losses logged)."""
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))
    return run_dir


def resumed(run_dir: Path, env: dict, reference: Path, processes: int, what: str) -> None:
    """Resume `run_dir` on `processes` processes to STEPS: it draws the reference's batches (its
    data position at the end is the reference's), and its losses are the reference's within
    LOSS_TOL (the difference printed); the losses logged before the resume stay as they were."""
    before = run_losses(run_dir)
    out = trained(run_dir, env, processes, f"steps={STEPS}")
    assert f"resumed from checkpoint step {STOP}" in out
    losses = run_losses(run_dir)  # the resume dropped the records after its step first: 5.. are its own
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert {s: losses[s] for s in range(1, STOP + 1)} == {s: before[s] for s in range(1, STOP + 1)}
    assert all(d == data_states(reference, STEPS)[0] for d in data_states(run_dir, STEPS))
    diff = max_difference(losses, run_losses(reference), range(STOP + 1, STEPS + 1))
    print(f"\n{what}: steps {STOP + 1}..{STEPS}: max |loss - reference| = {diff:.3g}")
    assert diff <= LOSS_TOL


def test_two_processes_resume_on_one(tmp_path, env, reference):
    run_dir = stopped_on_two(reference, tmp_path / "run")
    resumed(run_dir, env, reference, 1, "2 processes (4 devices) -> 1 process (2 devices)")


def test_two_processes_resume_on_four(tmp_path, env, reference):
    run_dir = stopped_on_two(reference, tmp_path / "run")
    resumed(run_dir, env, reference, 4, "2 processes (4 devices) -> 4 processes (8 devices)")


def test_one_process_resumes_on_two(tmp_path, env, reference):
    run_dir = tmp_path / "run"
    trained(run_dir, env, 1, f"steps={STOP}")
    diff = max_difference(run_losses(run_dir), run_losses(reference), range(1, STOP + 1))
    print(f"\n1 process (2 devices) against the reference (4 devices): steps 1..{STOP}: max |loss - reference| = {diff:.3g}")
    assert diff <= LOSS_TOL
    assert data_states(run_dir, STOP) == data_states(reference, STOP)[:1]
    resumed(run_dir, env, reference, 2, "1 process (2 devices) -> 2 processes (4 devices)")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root`: each file's size, time and content hash."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_resume_on_a_process_count_that_cannot_hold_the_batch_is_refused(tmp_path, env, reference):
    """3 processes x 2 devices cannot split batch_size=8: one error line on each process, before
    anything is read, and the run directory is left as it was. (A changed batch_size is refused as
    any other change of the data order: tests/test_faults.py, test_what_a_resume_may_change.)"""
    run_dir = stopped_on_two(reference, tmp_path / "run")
    before = snapshot(run_dir)
    codes, outs = train(run_dir, env, 3, f"steps={STEPS}")
    for code, out in zip(codes, outs):
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "batch_size=8" in errors[0] and "does not divide" in errors[0], out[-3000:]
        assert "Traceback" not in out
    print(f"\nrefused: {errors[0]}")
    assert snapshot(run_dir) == before
