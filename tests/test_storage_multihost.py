"""A pod's run on a bucket, as two processes on this machine (gloo) against a local GCS API: the run
directory and the token store at gs:// URLs, both processes SIGKILLed mid-run, the resume's losses
bit-identical to a straight run's, then eval and generate reading the run from the bucket."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from gpt2_jax import checkpoint, run_dir, storage
from helpers import run_losses
from test_train_multiprocess import TRAIN_ARGS, _free_port

ARGS = [*TRAIN_ARGS, "ckpt_async=false"]  # synchronous saves: step 3's is complete before step 4


def _start(run_dir: str, env: dict, *extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "gpt2_jax.train", *ARGS, *extra, f"run_dir={run_dir}",
             "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        )
        for i in range(2)
    ]


def _finish(procs) -> str:
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs[0]


@pytest.fixture(scope="module")
def pod(gcs, tmp_path_factory, shared_data):
    """(environment, dataset= setting, bucket, losses of a straight run): a token store prepared
    on the bucket, and a pod's uninterrupted run of it there."""
    from gpt2_jax.data import prepare

    bucket = gcs.bucket()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", GPT2_JAX_DATA_DIR=str(shared_data),
        GPT2_JAX_CACHE_DIR=str(tmp_path_factory.mktemp("local-cache")), **gcs.env,
    )
    os.environ["GPT2_JAX_DATA_DIR"] = str(shared_data)
    store = str(prepare("tiny_shakespeare", cache_dir=f"{bucket}/cache", workers=1, progress=False))
    assert store.startswith(f"{bucket}/cache/tokens/")
    data = [f"dataset={store}"]
    reference = f"{bucket}/straight"
    _finish(_start(reference, env, *data))
    straight = run_losses(reference)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    return env, data, bucket, straight


@pytest.mark.slow
def test_pod_run_on_a_bucket_killed_and_resumed_exactly(pod):
    env, data, bucket, straight = pod
    run = f"{bucket}/run"
    procs = _start(run, env, *data)

    def kill():
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)

    watchdog = threading.Timer(600, kill)  # a hung run fails this test instead of hanging the suite
    watchdog.start()
    seen = []
    for line in procs[0].stdout:  # process 0 reports; kill both once step 5 is done
        seen.append(line)
        if "step      5 | loss" in line:
            break
    watchdog.cancel()
    kill()
    for p in procs:
        p.wait()
    assert "step      5 | loss" in seen[-1], "".join(seen)[-3000:]
    ckpts = storage.path(run) / "checkpoints"
    assert 3 in checkpoint.complete_steps(ckpts) and 6 not in checkpoint.complete_steps(ckpts)
    assert storage.path(f"{run}/.lock").exists()  # the killed holder's lease is still there

    out = _finish(_start(run, env, *data))
    assert "resumed from checkpoint step 3" in out and "took over the run directory" in out, out[-3000:]
    assert run_losses(run) == straight  # bit for bit, and each step once
    assert not storage.path(f"{run}/.lock").exists()
    history = run_dir.read_history(run)
    assert [h["start_step"] for h in history] == [0, 3]

    # The run is a model wherever --model is accepted: eval and generate read it from the bucket.
    for name in ("run", "straight"):
        cmd = [sys.executable, "-m", "gpt2_jax.eval", "--model", f"{bucket}/{name}", "--task", "wikitext2", "--split", "valid",
               "--limit", "2", "--output", f"{bucket}/{name}-eval.json"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(storage.path(f"{bucket}/{n}-eval.json").read_text()) for n in ("run", "straight")]
    figures = [{t: (r["metrics"], r["nll"], r["counts"]) for t, r in rep["tasks"].items()} for rep in reports]
    assert figures[0] == figures[1] and reports[0]["model"]["path"] == f"{bucket}/run"
    texts = []
    for name in ("run", "straight"):
        cmd = [sys.executable, "-m", "gpt2_jax.generate", "--model", f"{bucket}/{name}", "--prompt", "ROMEO:",
               "--max-new-tokens", "8", "--greedy"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        texts.append(done.stdout)
    assert texts[0] == texts[1] and texts[0].strip()


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_pod_on_a_bucket(pod):
    """SIGTERM to process 1 only, the run directory on gs://: both processes stop after the same
    step, its checkpoint is complete on the bucket, both exit 0, and the resume is exact. (The run
    has 6 steps: the agreed stop, two steps after the last process's post, can be the last one.)"""
    env, data, bucket, straight = pod
    run = f"{bucket}/term"
    procs = _start(run, env, *data)
    timer = threading.Timer(600, lambda: [os.killpg(p.pid, signal.SIGKILL) for p in procs])
    timer.start()
    seen = []
    for line in procs[0].stdout:
        seen.append(line)
        if "step      1 | loss" in line:
            os.kill(procs[1].pid, signal.SIGTERM)
            break
    out = seen + [procs[0].stdout.read()]
    timer.cancel()
    for p in procs:
        assert p.wait(timeout=600) == 0, "".join(out)[-3000:]
    stops = re.findall(r"stopped by SIGTERM after step (\d+); checkpoint saved in (\S+)\. To resume: ", "".join(out))
    assert len(stops) == 1 and stops[0][1] == f"{run}/checkpoints", "".join(out)[-3000:]
    step = int(stops[0][0])
    assert 1 < step <= 6 and checkpoint.complete_steps(storage.path(run) / "checkpoints")[-1] == step
    out = _finish(_start(run, env, *data))
    assert f"resumed from checkpoint step {step}" in out
    assert run_losses(run) == straight
