"""End to end through `python -m gpt2_jax.train`: exact resume after SIGTERM, and the
fault cases (killed during an async save, a truncated newest checkpoint, a read-only checkpoint
folder). Every case ends with a run that reaches step 40 with the losses and final params of an
uninterrupted run, bit for bit. A SIGKILL between steps is tests/test_faults.py's mid-step case."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt2_jax import checkpoint as C
from gpt2_jax import weights as W
from helpers import run_losses as losses
from test_checkpoint import _array_files, _make_read_only, _make_writable

pytestmark = pytest.mark.slow

# A tiny model on Tiny Shakespeare with dropout on, so the restored RNG matters too.
ARGS = [
    "tiny", "n_layer=2", "n_embd=64", "n_head=4", "seq_len=32", "batch_size=4", "steps=40", "dropout=0.1",
    "eval_every=0", "eval_batches=1", "sample_tokens=1", "log_every=1", "ckpt_every=10", "mesh=1,1,1",
]
MUON = ["optimizer=muon"]
STEP_LINE = re.compile(r"^step\s+(\d+) \| loss")

# Blocks Orbax's final rename of step 30, so that a SIGKILL lands in the middle of that async save.
BLOCK_SAVE_30 = """
import sys, time
from orbax.checkpoint._src.path import atomicity
original = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
    if self.get_final().name == "30":
        print("FAULT: save of step 30 is stuck before its rename", flush=True)
        time.sleep(3600)
    return await original(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from gpt2_jax.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data):
    return {
        **os.environ,
        "GPT2_JAX_DATA_DIR": str(shared_data),
        "GPT2_JAX_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "JAX_PLATFORMS": "cpu",
    }


def run(run_dir, env, *, kill_when=None, sig=signal.SIGKILL, code=None, extra=()):
    """Run the trainer (ARGS and `extra`); with `kill_when(line)`, send `sig` at the first output line it accepts.

    Returns (exit code, output)."""
    cmd = [sys.executable, "-m", "gpt2_jax.train"] if code is None else [sys.executable, "-c", code]
    proc = subprocess.Popen(
        cmd + ARGS + [*extra, f"run_dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if kill_when is not None and kill_when(line):
            proc.send_signal(sig)
            kill_when = None
    return proc.wait(timeout=600), "".join(out)


def after(run_dir, ckpt_step, min_step):
    """Accept the first progress line at step >= min_step once checkpoint `ckpt_step` is complete."""

    def check(line):
        m = STEP_LINE.match(line.split("\r")[-1])
        return bool(m) and int(m.group(1)) >= min_step and (run_dir / "checkpoints" / str(ckpt_step)).is_dir()

    return check


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """Run A: 40 steps straight."""
    run_dir = tmp_path_factory.mktemp("A")
    code, out = run(run_dir, env)
    assert code == 0, out
    return losses(run_dir), W.load(run_dir)[1]


@pytest.fixture(scope="module")
def muon_reference(tmp_path_factory, env):
    """Run A with optimizer=muon."""
    run_dir = tmp_path_factory.mktemp("A-muon")
    code, out = run(run_dir, env, extra=MUON)
    assert code == 0, out
    return losses(run_dir), W.load(run_dir)[1]


def assert_same_as_reference(run_dir, reference, first_step):
    ref_losses, ref_params = reference
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 41))
    assert {s: got[s] for s in range(first_step, 41)} == {s: ref_losses[s] for s in range(first_step, 41)}
    assert C.Checkpointer(run_dir, read_only=True).latest_step() == 40
    params = W.load(run_dir)[1]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def test_exact_resume_after_sigterm(tmp_path, env, reference):
    code, out = run(tmp_path, env, kill_when=after(tmp_path, 20, 25), sig=signal.SIGTERM)
    assert code == 0, out
    m = re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved in (\S+)\. To resume: python -m gpt2_jax.train (.*)", out)
    assert m, out
    stopped = int(m.group(1))
    assert 25 <= stopped < 30 and stopped in C.complete_steps(tmp_path / "checkpoints")
    assert f"run_dir={tmp_path}" in m.group(3)
    code, out = run(tmp_path, env)
    assert code == 0, out
    assert f"resumed from checkpoint step {stopped}" in out
    assert_same_as_reference(tmp_path, reference, stopped + 1)


def test_sigkill_during_async_save(tmp_path, env, reference):
    code, out = run(tmp_path, env, code=BLOCK_SAVE_30, kill_when=lambda line: "FAULT:" in line)
    assert code == -signal.SIGKILL, out
    assert (tmp_path / "checkpoints" / f"30{C.TMP_SUFFIX}").is_dir()
    assert C.complete_steps(tmp_path / "checkpoints") == [10, 20]
    code, out = run(tmp_path, env)
    assert code == 0, out
    assert "removed unfinished checkpoint folder" in out and "resumed from checkpoint step 20" in out
    assert not any(C.TMP_SUFFIX in p.name for p in (tmp_path / "checkpoints").iterdir())
    assert_same_as_reference(tmp_path, reference, 21)


def test_truncated_newest_checkpoint(tmp_path, env, reference):
    code, out = run(tmp_path, env, kill_when=after(tmp_path, 30, 32))
    assert code == -signal.SIGKILL, out
    biggest = _array_files(tmp_path / "checkpoints" / "30")[-1]
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    code, out = run(tmp_path, env)
    assert code == 0, out
    assert "newest checkpoint is damaged" in out and "resumed from checkpoint step 20" in out
    assert (tmp_path / "checkpoints" / f"30{C.DAMAGED_SUFFIX}").is_dir()
    assert_same_as_reference(tmp_path, reference, 21)


def test_read_only_checkpoint_folder(tmp_path, env, reference):
    code, out = run(tmp_path, env, kill_when=after(tmp_path, 20, 25))
    assert code == -signal.SIGKILL, out
    immutable = _make_read_only(tmp_path / "checkpoints")
    try:
        code, out = run(tmp_path, env)
    finally:
        _make_writable(tmp_path / "checkpoints", immutable)
    assert code == 1, out
    assert "resumed from checkpoint step 20" in out
    assert "checkpoint for step 30 was NOT saved" in out and "earlier checkpoints are intact: steps [10, 20]" in out
    assert "error: the checkpoint of step 40 was not saved" in out and "newest saved checkpoint is step 20" in out
    assert C.complete_steps(tmp_path / "checkpoints") == [10, 20]
    code, out = run(tmp_path, env)
    assert code == 0, out
    assert "resumed from checkpoint step 20" in out
    assert_same_as_reference(tmp_path, reference, 21)


def test_muon_exact_resume_after_sigkill_refusal_and_export(tmp_path, env, muon_reference):
    """optimizer=muon: SIGKILL, resume bit for bit (the momentum restored in its parameter's
    shape); a resume with another optimizer is refused in one line; the weights export to HF."""
    from gpt2_jax import convert

    code, out = run(tmp_path, env, kill_when=after(tmp_path, 20, 25), extra=MUON)
    assert code == -signal.SIGKILL, out
    code, out = run(tmp_path, env, extra=MUON)
    assert code == 0, out
    assert "resumed from checkpoint step 20" in out
    assert_same_as_reference(tmp_path, muon_reference, 21)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["optimizer"] == "muon"

    code, out = run(tmp_path, env)  # optimizer=adamw (the default)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "optimizer='muon' (now 'adamw')" in errors[0], out
    assert C.Checkpointer(tmp_path, read_only=True).latest_step() == 40

    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.convert", "to-hf", str(tmp_path), str(tmp_path / "hf")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    cfg, params = W.load(tmp_path)
    hf_cfg, hf_params = convert.load_hf(tmp_path / "hf")
    assert (hf_cfg.n_layer, hf_cfg.n_embd, hf_cfg.n_head) == (cfg.n_layer, cfg.n_embd, cfg.n_head)
    jax.tree.map(np.testing.assert_array_equal, hf_params, params)
