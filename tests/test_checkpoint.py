"""Training checkpoints: round trip, retention, params loading, damaged/unfinished/read-only runs, `ls`.

The train state here is a stand-in with the same fields as `gpt2_jax.step.TrainState` (step,
params, opt_state, rng): the checkpoint module works on any flax struct dataclass of that shape.
"""

import functools
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax import checkpoint as C
from gpt2_jax import weights as W
from gpt2_jax.config import ModelConfig
from gpt2_jax.convert import load_hf
from gpt2_jax.model import GPT2, stack_layers
from gpt2_jax.train.preemption import PreemptionGuard
from helpers import random_hf_gpt2

CFG = ModelConfig(vocab_size=101, n_ctx=32, n_embd=60, n_layer=2, n_head=3)


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: object
    rng: jax.Array


_TX = optax.adamw(1e-2)


@jax.jit
def _fake_update(state):
    """A cheap deterministic change of every leaf, standing in for a train step."""
    grads = jax.tree.map(lambda p: jnp.sin(p + state.step.astype(p.dtype)), state.params)
    updates, opt_state = _TX.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


@functools.partial(jax.jit, static_argnums=0)
def _init_state(cfg, seed):
    key = jax.random.key(seed)
    params = nn.meta.unbox(GPT2(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    return State(jnp.zeros((), jnp.int32), params, _TX.init(params), jax.random.key_data(jax.random.fold_in(key, 1)))


@functools.lru_cache(maxsize=None)
def make_state(cfg=CFG, seed=0, steps=0):
    if steps == 0:
        return _init_state(cfg, seed)
    return _fake_update(make_state(cfg, seed, steps - 1))


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def save_steps(run_dir, steps, *, options=C.CheckpointOptions(keep=10, keep_best=0), val=None):
    """Save the states after each of `steps` fake updates; returns {step: state}."""
    states = {}
    with C.Checkpointer(run_dir, options) as ck:
        for s in range(1, max(steps) + 1):
            state = make_state(steps=s)
            if s in steps:
                metrics = {"loss": 10.0 - s}
                if val and s in val:
                    metrics["val_loss"] = val[s]
                assert ck.save(s, state, data_state={"step": s}, config={"model": CFG.to_dict()}, metrics=metrics)
                states[s] = state
    return states


def test_round_trip_is_exact_with_all_items(tmp_path):
    states = save_steps(tmp_path, [3, 5])
    ck = C.Checkpointer(tmp_path, read_only=True)
    assert ck.steps() == [3, 5]
    r = ck.restore_latest(C.abstract_like(states[5]))
    assert r.step == 5 and int(r.state.step) == 5
    assert_trees_equal(r.state, states[5])
    assert type(r.state.opt_state[0]).__name__ == "ScaleByAdamState"  # optax's containers come back
    assert r.data_state == {"step": 5}
    assert W.config_from_saved(r.config, tmp_path) == CFG
    assert r.metrics == {"loss": 5.0}
    assert_trees_equal(ck.restore(3, C.abstract_like(states[3])).state, states[3])


def test_data_state_of_another_process_count_carries_over_when_shared():
    """Saved by 2 processes, resumed by this one: one state that both saved (a global position) is
    used; two different states (each process's own share of the data) are refused in one line."""
    shared = {"loader": {"batch_size": 8}, "grain": {"next_index": 4}}
    assert C.Restored(4, None, [shared, dict(shared)], None, None).data_state == shared
    apart = [{**shared, "loader": {"shard_index": i}} for i in range(2)]
    with pytest.raises(C.CheckpointError, match="saved by 2 process.*has 1: their data iterator states differ") as e:
        C.Restored(4, None, apart, None, None).data_state
    assert "\n" not in str(e.value)


def test_keeps_latest_k_and_best_m_by_validation_loss(tmp_path):
    val = {2: 3.0, 4: 1.0, 6: 2.0, 10: 2.5}
    save_steps(tmp_path, [2, 4, 6, 8, 10, 12], options=C.CheckpointOptions(keep=2, keep_best=2), val=val)
    # latest two: 10, 12; best two by val_loss: 4 (1.0), 6 (2.0); 2 and 8 are gone.
    assert C.Checkpointer(tmp_path, read_only=True).steps() == [4, 6, 10, 12]


def test_load_params_from_run_step_and_params_only_dirs(tmp_path):
    states = save_steps(tmp_path / "run", [2, 3])
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "3"):
        cfg, params = W.load(path)
        assert cfg == CFG
        assert_trees_equal(params, states[3].params)
    cfg, params = W.load(tmp_path / "run" / "checkpoints" / "2")
    assert_trees_equal(params, states[2].params)
    W.save_params(tmp_path / "export", CFG, states[2].params)
    assert_trees_equal(W.load(tmp_path / "export")[1], states[2].params)
    with pytest.raises(C.CheckpointError, match="not a gpt2_jax checkpoint"):
        W.load(tmp_path)


def test_load_model_reads_hf_directories(tmp_path):
    random_hf_gpt2(tmp_path / "hf", vocab_size=101, n_positions=32, n_embd=60, n_layer=2, n_head=3)
    cfg, params = W.load(tmp_path / "hf")
    ref_cfg, ref = load_hf(tmp_path / "hf")
    assert cfg == ref_cfg
    assert_trees_equal(params, ref)


def test_params_for_converts_layout_and_refuses_other_shapes(tmp_path):
    params = make_state(seed=3).params
    W.save_params(tmp_path / "p", CFG, params)
    scanned_cfg = ModelConfig(**{**CFG.to_dict(), "scan_layers": True, "pad_vocab_multiple": 8})
    out = W.load(tmp_path / "p", scanned_cfg)[1]
    want = stack_layers(params, CFG.n_layer)
    assert out["wte"].shape == (104, 60)
    np.testing.assert_array_equal(out["wte"][:101], want["wte"])
    np.testing.assert_array_equal(out["wte"][101:], 0)
    np.testing.assert_array_equal(out["h"]["mlp"]["c_fc"]["kernel"], want["h"]["mlp"]["c_fc"]["kernel"])
    with pytest.raises(C.CheckpointError, match="n_layer=2 \\(run has 3\\)"):
        W.load(tmp_path / "p", ModelConfig(**{**CFG.to_dict(), "n_layer": 3}))


def _array_files(step_dir: Path) -> list[Path]:
    return sorted((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def test_truncated_newest_checkpoint_is_reported_and_previous_used(tmp_path, capfd):
    states = save_steps(tmp_path, [2, 4])
    biggest = _array_files(tmp_path / "checkpoints" / "4")[-1]
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    ck = C.Checkpointer(tmp_path)
    r = ck.restore_latest(C.abstract_like(states[4]))
    err = capfd.readouterr().err
    assert "newest checkpoint is damaged" in err and "checkpoints/4" in err
    assert r.step == 2
    assert_trees_equal(r.state, states[2])
    # Set aside, not deleted, and the run can save step 4 again.
    assert (tmp_path / "checkpoints" / "4.damaged").is_dir()
    assert ck.save(4, states[4]) and ck.wait()
    assert ck.steps() == [2, 4]


def test_missing_item_in_newest_checkpoint(tmp_path, capfd):
    import shutil

    states = save_steps(tmp_path, [2, 4])
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "opt_state")
    r = C.Checkpointer(tmp_path).restore_latest(C.abstract_like(states[4]))
    assert r.step == 2 and "damaged" in capfd.readouterr().err


def test_unfinished_save_folder_is_removed(tmp_path, capfd):
    states = save_steps(tmp_path, [2])
    tmp = tmp_path / "checkpoints" / f"4{C.TMP_SUFFIX}"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "junk").write_bytes(b"x" * 100)
    ck = C.Checkpointer(tmp_path)
    assert tmp.exists()  # not before the run is known to continue this one
    assert ck.steps() == [2] and ck.restore_latest(C.abstract_like(states[2])).step == 2
    assert not tmp.exists() and "removed unfinished checkpoint folder" in capfd.readouterr().err


def _make_read_only(path: Path) -> list[Path]:
    """chmod a-w every directory under `path`; as root (which ignores modes) also chattr +i them."""
    dirs = [path] + [p for p in path.rglob("*") if p.is_dir()]
    for d in dirs:
        d.chmod(0o555)
    probe = path / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return []
    probe.unlink()
    subprocess.run(["chattr", "+i", *map(str, dirs)], check=True)
    return dirs


def _make_writable(path: Path, immutable: list[Path]) -> None:
    if immutable:
        subprocess.run(["chattr", "-i", *map(str, immutable)], check=True)
    for d in [path] + [p for p in path.rglob("*") if p.is_dir()]:
        d.chmod(0o755)


def test_read_only_run_dir_reports_failure_and_keeps_checkpoints(tmp_path, capfd):
    states = save_steps(tmp_path, [2])
    immutable = _make_read_only(tmp_path / "checkpoints")
    try:
        ck = C.Checkpointer(tmp_path)
        assert ck.restore_latest(C.abstract_like(states[2])).step == 2
        assert not ck.save(4, make_state(steps=4))
        err = capfd.readouterr().err
        assert "checkpoint for step 4 was NOT saved" in err and "earlier checkpoints are intact: steps [2]" in err
        assert ck.failed_steps == [4] and ck.steps() == [2]
        ck.close()
    finally:
        _make_writable(tmp_path / "checkpoints", immutable)
    r = C.Checkpointer(tmp_path).restore_latest(C.abstract_like(states[2]))
    assert_trees_equal(r.state, states[2])


def test_failed_async_write_is_reported_and_keeps_earlier_checkpoints(tmp_path, capfd):
    """A write that fails in the background (here: files capped at 1 MiB, as on a full disk)."""
    states = save_steps(tmp_path, [1])
    big = states[1].replace(params={**states[1].params, "wte": jax.random.normal(jax.random.key(0), (1000, 600))})
    ck = C.Checkpointer(tmp_path)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
    try:
        started = ck.save(2, big)
        finished = ck.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert started and not finished
    err = capfd.readouterr().err
    assert "checkpoint for step 2 was NOT saved" in err and "File too large" in err
    assert "earlier checkpoints are intact: steps [1]" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert_trees_equal(C.Checkpointer(tmp_path).restore_latest(C.abstract_like(states[1])).state, states[1])


def test_preemption_guard_turns_signals_into_a_stop_request():
    with PreemptionGuard() as guard:
        assert not guard.stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.stop(2) and guard.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_non_finite_state_is_not_saved(tmp_path, capfd):
    save_steps(tmp_path, [2])
    bad = make_state(steps=3)
    bad = bad.replace(params=jax.tree.map(lambda x: x * jnp.nan, bad.params))
    ck = C.Checkpointer(tmp_path)
    assert not ck.save(3, bad)
    assert "contain NaN or Inf" in capfd.readouterr().err and ck.steps() == [2]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt2_jax.checkpoint", *map(str, args)], capture_output=True, text=True)


def test_ls_lists_steps_metrics_size_and_config(tmp_path):
    save_steps(tmp_path, [2, 4], val={4: 1.25})
    (tmp_path / "checkpoints" / f"6{C.TMP_SUFFIX}").mkdir()
    out = _cli("ls", tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "2 checkpoint(s)" in lines[0]
    assert lines[1].split()[:4] == ["step", "saved", "(UTC)", "size"] and "val_loss" in lines[1]
    row4 = next(line for line in lines if line.split()[:1] == ["4"])
    assert "1.25" in row4 and "(latest, best)" in row4
    size, unit = row4.split()[3:5]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "4").rglob("*") if f.is_file())
    assert abs(float(size) * {"KiB": 2**10, "MiB": 2**20}[unit] / on_disk - 1) < 0.05
    assert any("6.orbax-checkpoint-tmp (unfinished save" in line for line in lines)
    assert '"n_embd": 60' in out.stdout


def test_ls_help_and_errors(tmp_path):
    assert "run_dir" in _cli("ls", "--help").stdout
    for bad, msg in ((tmp_path / "nope", "does not exist"), (tmp_path, "not a run directory")):
        out = _cli("ls", bad)
        assert out.returncode == 1 and out.stderr.startswith("error:") and msg in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_describe_and_abstract_round_trip_through_json(tmp_path):
    state = make_state()
    desc = json.loads(json.dumps(C.describe(C._state_items(state))))
    abstract = C.abstract_from_description(desc, None)
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(C._state_items(state))}
    assert set(abstract) == set(leaves)
    for k, x in leaves.items():
        assert abstract[k].shape == x.shape and abstract[k].dtype == x.dtype


def test_checkpoint_files_are_what_the_docs_say(tmp_path):
    save_steps(tmp_path, [1])
    names = sorted(p.name for p in (tmp_path / "checkpoints" / "1").iterdir() if p.is_dir())
    assert names == sorted(C.ITEM_NAMES + ("metrics",))
    assert C.read_json_item(tmp_path / "checkpoints" / "1", "structure")["leaves"]["['params']['wte']"]["shape"] == [101, 60]
