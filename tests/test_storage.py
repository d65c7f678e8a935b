"""Run directories, checkpoints and weights at gs:// and s3:// URLs, against local servers of the real
APIs (gcp-storage-emulator for GCS, moto for S3; see the `gcs` and `s3` fixtures in conftest.py).

Fast here: the path layer, whole-object writes, the create-if-absent lock, and one training run
round trip in this process. tests/test_storage_multihost.py (slow) trains as two processes on a
bucket, kills both, resumes, and evaluates and samples the run from the bucket.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gpt2_jax import checkpoint, files, run_dir as run_dir_lib, storage, weights
from gpt2_jax.run_dir import RunDirInUse, RunLock
from gpt2_jax.config import get_model_config
from gpt2_jax.model import init_params
from gpt2_jax.train.cli import main as train_main
from helpers import run_losses


def test_local_paths_stay_paths_and_unknown_schemes_are_one_line(tmp_path):
    assert storage.path(tmp_path / "x") == tmp_path / "x"
    assert not storage.is_url(tmp_path) and storage.is_url("gs://b/k") and storage.is_url("s3://b/k")
    with pytest.raises(storage.StorageError, match=r"^ftp://h/x: unsupported URL scheme ftp:// \(gpt2_jax reads local paths, gs:// and s3://\)$"):
        storage.path("ftp://h/x")


def test_importing_and_resolving_urls_leave_fsspec_settings_alone():
    script = ("import fsspec; before = repr(fsspec.config.conf)\n"
              "import gpt2_jax.data, gpt2_jax.storage as s; s.path('gs://b/x'); s.fs_path('gs://b/x')\n"
              "print(repr(fsspec.config.conf) == before)")
    env = {**os.environ, "FSSPEC_GCS_TOKEN": "anon"}  # no credentials to look for
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_url_paths_list_afresh(gcs):
    """Another host (or tensorstore) adds objects behind this process's filesystems: the project's
    paths (etils.epath's filesystem, which Orbax uses too) and listings see them."""
    import fsspec

    bucket = gcs.bucket()
    d = storage.path(f"{bucket}/d")
    storage.write_bytes(f"{bucket}/d/a", b"1")
    assert sorted(p.name for p in d.iterdir()) == ["a"] and sorted(storage.file_sizes(d)) == ["a"]
    other = fsspec.filesystem("gcs", token="anon", skip_instance_cache=True)
    other.pipe_file(f"{bucket.removeprefix('gs://')}/d/b", b"2")
    assert sorted(p.name for p in d.iterdir()) == ["a", "b"] and sorted(storage.file_sizes(d)) == ["a", "b"]
    assert (d / "b").exists()


def test_whole_object_writes_append_and_create_if_absent(gcs):
    bucket = gcs.bucket()
    url = f"{bucket}/dir/report.json"
    files.write_json(url, {"a": float("nan"), "b": 1})
    assert json.loads(storage.path(url).read_text()) == {"a": None, "b": 1}  # strict JSON on buckets too
    files.append_text(f"{bucket}/dir/log.txt", "one\n")
    files.append_text(f"{bucket}/dir/log.txt", "two\n")
    assert storage.path(f"{bucket}/dir/log.txt").read_text() == "one\ntwo\n"
    # The store's precondition decides: the second create of the same object is refused.
    assert storage.create_new(f"{bucket}/dir/lock", b"first")
    assert not storage.create_new(f"{bucket}/dir/lock", b"second")
    assert storage.path(f"{bucket}/dir/lock").read_bytes() == b"first"
    # A directory written through atomic_path appears with its top-level files uploaded last.
    with files.atomic_path(f"{bucket}/tree") as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "a.bin").write_bytes(b"\x00" * 10)
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in storage.path(f"{bucket}/tree").iterdir()) == ["config.json", "sub"]
    assert storage.read_ranges([f"{bucket}/tree/sub/a.bin"] * 2, [2, 0], [5, 1]) == [b"\x00" * 3, b"\x00"]


def test_run_lock_on_a_bucket(gcs, monkeypatch):
    run_dir = f"{gcs.bucket()}/run"
    with RunLock(run_dir) as lock:
        holder = json.loads(storage.path(lock.path).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunDirInUse, match=rf"is in use by pid {os.getpid()} on host"):
            RunLock(run_dir).acquire()
    assert not storage.path(f"{run_dir}/.lock").exists()  # released: deleted
    # A lease whose holder died on this host is taken over at once ...
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "then", "heartbeat": time.time(), "lease_s": 90}
    storage.write_bytes(f"{run_dir}/.lock", json.dumps(dead).encode())
    with RunLock(run_dir) as lock:
        assert lock.previous["pid"] == dead["pid"]
    # ... one held from another host only once it has not been renewed for its lease.
    other = {"host": "another-host", "pid": 1, "started": "then", "heartbeat": time.time(), "lease_s": 90}
    storage.write_bytes(f"{run_dir}/.lock", json.dumps(other).encode())
    with pytest.raises(RunDirInUse, match="in use by pid 1 on host another-host"):
        RunLock(run_dir).acquire()
    storage.write_bytes(f"{run_dir}/.lock", json.dumps({**other, "heartbeat": time.time() - 91}).encode())
    with RunLock(run_dir) as lock:
        assert lock.previous["host"] == "another-host"
    # The holder renews its lease.
    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.2)
    with RunLock(run_dir) as lock:
        first = json.loads(storage.path(lock.path).read_text())["heartbeat"]
        time.sleep(1.5)
        assert json.loads(storage.path(lock.path).read_text())["heartbeat"] > first


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


TRAIN = ["tiny", "n_layer=1", "n_embd=32", "n_head=2", "seq_len=16", "batch_size=8", "mesh=1,-1,1", "eval_every=4",
         "eval_batches=1", "sample_tokens=2", "log_every=1", "ckpt_every=2", "ckpt_async=false"]


@pytest.mark.slow  # three training runs (about a minute): `make test` stays under 15 minutes
def test_training_run_round_trip_on_a_bucket(gcs, tmp_path, shared_data, monkeypatch, capsys):
    """Everything of a run lives in the bucket; a second start resumes from it; the run loads as a model."""
    monkeypatch.setenv("GPT2_JAX_DATA_DIR", str(shared_data))
    monkeypatch.setenv("GPT2_JAX_CACHE_DIR", str(tmp_path / "cache"))
    run_dir = f"{gcs.bucket()}/runs/tiny"
    assert train_main([*TRAIN, "steps=4", f"run_dir={run_dir}"]) == 0
    assert train_main([*TRAIN, "steps=6", f"run_dir={run_dir}"]) == 0
    assert "resumed from checkpoint step 4" in capsys.readouterr().out
    run = storage.path(run_dir)
    names = sorted(p.name for p in run.iterdir() if p.name != "library.log")  # there when a library logged
    assert names == ["checkpoints", "config.json", "config_history.jsonl", "final.json", "metrics.jsonl",
                     "tensorboard"], names
    assert checkpoint.complete_steps(run / "checkpoints") == [2, 4, 6]  # the latest 3 (ckpt_keep)
    history = run_dir_lib.read_history(run_dir)
    assert [h["start_step"] for h in history] == [0, 4] and history[1]["changed"] == {"train.steps": [4, 6]}
    assert sorted(run_losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    cfg, params = weights.load(run_dir)
    assert cfg.n_layer == 1 and json.loads((run / "final.json").read_text())["step"] == 6
    assert "(latest" in checkpoint.list_run(run_dir)
    # The same steps on a local disk give the same losses: the bucket changes nothing.
    local = tmp_path / "local"
    assert train_main([*TRAIN, "steps=6", f"run_dir={local}"]) == 0
    assert run_losses(local) == run_losses(run_dir)


def test_s3_run_files_lock_and_weights(s3, tmp_path, capsys):
    """S3 through moto's server: whole-object writes, the create-if-absent lock (If-None-Match), HF
    weights read from a bucket. Orbax checkpoints are refused in one line (Orbax 0.12 would write
    their arrays to a local folder named s3:)."""
    from gpt2_jax.convert import save_hf
    from gpt2_jax.train.cli import main as train_main

    bucket = s3.bucket()
    files.write_json(f"{bucket}/run/final.json", {"step": 1})
    files.append_text(f"{bucket}/run/history.jsonl", "a\n")
    files.append_text(f"{bucket}/run/history.jsonl", "b\n")
    assert storage.path(f"{bucket}/run/history.jsonl").read_text() == "a\nb\n"
    with RunLock(f"{bucket}/run"):
        with pytest.raises(RunDirInUse, match=f"in use by pid {os.getpid()}"):
            RunLock(f"{bucket}/run").acquire()
    cfg = get_model_config("tiny", n_layer=1, n_embd=32, n_head=2, n_ctx=16)
    params = init_params(cfg, jax.random.key(0))
    save_hf(cfg, params, f"{bucket}/hf")
    got_cfg, got = weights.load(f"{bucket}/hf")
    assert weights.kind(f"{bucket}/hf") == "huggingface" and got_cfg.n_embd == 32
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(weights.fit(params, cfg, got_cfg))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(checkpoint.CheckpointError, match="cannot write or read checkpoints on s3://"):
        weights.save_params(f"{bucket}/export", cfg, params)
    assert train_main(["tiny", "steps=1", f"run_dir={bucket}/train"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write or read checkpoints on s3://" in err, err
    assert not any(p.name.startswith("s3:") for p in tmp_path.parent.iterdir())
