"""The run directory's own bookkeeping: incompatible is not damaged, one writer, the config history,
clean metrics, one-line warnings. (The end-to-end fault matrix is tests/test_faults.py, slow.)"""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import traceback

import pytest

from gpt2_jax import checkpoint as C
from gpt2_jax import run_dir as R
from gpt2_jax.errors import one_line
from gpt2_jax import files, metrics
from gpt2_jax.config import ModelConfig
from test_checkpoint import CFG, make_state, save_steps


def _snapshot(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())


def test_incompatible_checkpoint_is_refused_and_nothing_changes(tmp_path):
    save_steps(tmp_path, [2, 4])
    tmp = tmp_path / "checkpoints" / f"6{C.TMP_SUFFIX}"  # an unfinished save, to be kept too
    tmp.mkdir()
    before = _snapshot(tmp_path)
    other = make_state(ModelConfig(**{**CFG.to_dict(), "n_embd": 30}))
    ck = C.Checkpointer(tmp_path)
    with pytest.raises(C.IncompatibleCheckpoint, match=r"checkpoint step 4 .* 84 arrays of the state differ \(e\.g\. .*float32\[3, 3, 20\] \(now float32\[3, 3, 10\]\)"):
        ck.restore_latest(C.abstract_like(other))
    with pytest.raises(C.IncompatibleCheckpoint, match="another kind of run: n_embd=60 \\(now 30\\)\\. "):
        ck.restore_latest(C.abstract_like(make_state()), check=lambda saved: ["n_embd=60 (now 30)"])
    ck.close()
    assert _snapshot(tmp_path) == before and ck.steps() == [2, 4]


def test_resume_with_another_optimizer_is_refused_in_one_line(tmp_path):
    """A checkpoint of a Muon run, resumed with optimizer=adamw: one line naming the setting, from the
    saved config before any array is read (the restore target here even fits), nothing changed."""
    from gpt2_jax.config import ConfigError
    from gpt2_jax.train import config as train_config, loop

    with C.Checkpointer(tmp_path, C.CheckpointOptions(keep=10, keep_best=0)) as ck:
        config = {"model": CFG.to_dict(), "train": {"optimizer": "muon", "seed": 0}}
        assert ck.save(2, make_state(steps=2), data_state={"step": 2}, config=config, metrics={"loss": 1.0})
    before = _snapshot(tmp_path)
    tcfg = train_config.TrainConfig(optimizer="adamw")
    assert loop.resume_differences(config, tcfg, CFG) == ["optimizer='muon' (now 'adamw')"]
    assert loop.resume_differences(config, train_config.TrainConfig(optimizer="muon"), CFG) == []
    ck = C.Checkpointer(tmp_path)
    with pytest.raises(ConfigError) as e:
        loop.resume(tcfg, CFG, ck, C.abstract_like(make_state()), None, print)
    ck.close()
    assert "optimizer='muon' (now 'adamw')" in str(e.value) and "\n" not in str(e.value)
    assert _snapshot(tmp_path) == before


def test_structure_differences_name_missing_extra_and_reshaped_leaves():
    items = {"params": {"a": make_state().params["wte"], "b": make_state().params["wpe"]}}
    desc = C.describe({"params": {"a": items["params"]["a"], "c": items["params"]["b"][:3]}})
    diffs = C.structure_differences(desc, items)
    assert diffs == ["['params']['c'] only in the checkpoint", "['params']['b'] only in this run"]
    assert C.structure_differences(None, items) == []  # a checkpoint from before the structure item


def test_run_lock_refuses_a_second_holder_and_takes_over_a_dead_one(tmp_path):
    with R.RunLock(tmp_path) as lock:
        assert lock.previous is None
        with pytest.raises(R.RunDirInUse, match=f"in use by pid {os.getpid()} on host"):
            R.RunLock(tmp_path).acquire()
    # Another process takes the lock and is killed without releasing it.
    code = "import sys, time; from gpt2_jax import run_dir as R; R.RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(R.RunDirInUse, match=f"in use by pid {holder.pid}"):
        R.RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with R.RunLock(tmp_path) as lock:
        assert lock.previous["pid"] == holder.pid  # detected, and taken over
    assert (tmp_path / R.LOCK_FILE).read_text() == ""  # a clean release leaves no holder


def test_history_records_each_start_and_what_changed(tmp_path):
    a = {"model": {"n_layer": 2}, "train": {"lr": 1e-3, "steps": 10}}
    b = {"model": {"n_layer": 2}, "train": {"lr": 2e-3, "steps": 20}}
    assert R.record_start(tmp_path, a, 0) == {}
    assert R.record_start(tmp_path, b, 8) == {"train.lr": [1e-3, 2e-3], "train.steps": [10, 20]}
    history = R.read_history(tmp_path)
    assert [h["start_step"] for h in history] == [0, 8] and history[1]["pid"] == os.getpid()
    assert json.loads((tmp_path / R.CONFIG_FILE).read_text()) == b
    save_steps(tmp_path, [2])
    listing = C.list_run(tmp_path)
    assert "starts (config_history.jsonl):" in listing and "train.lr: 0.001 -> 0.002" in listing and "first start" in listing


def test_metrics_are_strict_json_and_a_resume_drops_later_records(tmp_path):
    assert files.dumps({"a": math.nan, "b": [1.0, math.inf], "c": "x"}) == '{"a": null, "b": [1.0, null], "c": "x"}'
    path = tmp_path / metrics.METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": math.nan if s == 1 else 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    w = metrics.MetricsWriter(tmp_path, True, resumed_from=4)  # a run that restored step 4
    w.write(5, {"loss": 0.5, "tokens_per_s": math.nan})
    w.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]  # json.loads would accept NaN: check the text
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[0]["loss"] is None and records[4]["tokens_per_s"] is None


def test_a_warning_is_one_line_and_its_detail_goes_to_the_log(tmp_path, capfd):
    ck = C.Checkpointer(tmp_path)
    try:
        raise ValueError("OUT_OF_RANGE: " + "x" * 2000 + "\nsecond line: File too large [os_error_code='27']")
    except ValueError as e:
        error = e
    ck.warn(f"warning: something failed ({one_line(error)})", "".join(traceback.format_exception(error)))
    ck.close()
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and len(one_line(error)) <= 200 and "File too large" in err
    assert f"(details: {tmp_path / R.WARNINGS_LOG})" in err
    assert "second line" in (tmp_path / R.WARNINGS_LOG).read_text() and "Traceback" in (tmp_path / R.WARNINGS_LOG).read_text()


def test_holding_a_run_directory_puts_back_what_it_changed_and_a_failed_start_leaves_nothing(tmp_path):
    handlers, hook = logging.getLogger().handlers[:], sys.unraisablehook
    with R.hold(tmp_path / "run") as run:
        assert logging.getLogger().handlers != handlers  # the libraries' logs go to library.log meanwhile
        run.record_start({"train": {"lr": 1.0}}, 0)
    assert logging.getLogger().handlers == handlers and sys.unraisablehook is hook
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [R.LOCK_FILE, R.CONFIG_FILE, R.HISTORY_FILE]  # no empty log
    with pytest.raises(RuntimeError, match="refused"):
        with R.hold(tmp_path / "new"):
            logging.getLogger("orbax").error("a library's report")
            assert (tmp_path / "new" / R.LIBRARY_LOG).is_file()
            raise RuntimeError("refused")  # before the start was recorded
    assert not (tmp_path / "new").exists()
    assert logging.getLogger().handlers == handlers and sys.unraisablehook is hook

