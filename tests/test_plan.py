"""grad_accum=auto and remat_policy=auto: the step is compiled abstractly and the smallest
grad_accum, then the lightest remat, whose compiled step fits the device is taken; `--dry-run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from gpt2_jax import memory, sharding
from gpt2_jax.train import load_experiment, find_experiment, resolve_config
from gpt2_jax.train.cli import main as train_main
from gpt2_jax.train.plan import candidate_accums, smallest_fitting

ROOT = Path(__file__).resolve().parents[1]


def test_candidates_keep_the_batch_and_split_over_the_data_axes():
    mesh = sharding.make_mesh((2, 4, 1))
    assert candidate_accums(64, mesh) == [1, 2, 4, 8]  # micro-batches of 64..8 rows, all multiples of 8
    assert candidate_accums(12, mesh) == []  # 12 rows never split over 8 devices
    assert candidate_accums(24, sharding.make_mesh((1, 1, 1), jax.devices()[:1])) == [1, 2, 3, 4, 6, 8, 12, 24]


def test_bisection_finds_the_smallest_fitting_with_few_probes():
    ks = list(range(1, 513))
    for answer in (1, 7, 300, 512):
        probes = []
        fits = lambda k: probes.append(k) or k >= answer  # noqa: E731
        assert smallest_fitting(ks, fits, start=40) == answer
        assert len(set(probes)) <= 11  # log2(512) + 2
    assert smallest_fitting(ks, lambda k: False) is None


# Planning `make train SIZE=medium` abstractly, as `--dry-run` does, for 1 and 8 simulated devices
# and devices of 16 and 80 GiB (XLA:CPU compiles the step; compute in bfloat16 as on GPU/TPU).
PLAN = """
import json, sys
from gpt2_jax import memory, train
from gpt2_jax.config import REMAT_BY_WEIGHT
from gpt2_jax.train.plan import candidate_accums, make_plan
tcfg, mcfg = train.resolve_config({**train.load_experiment(train.find_experiment("medium")),
                                   "device_memory_gib": sys.argv[1], "compute_dtype": "bfloat16"})
tcfg, mcfg = tcfg, train.resolve_dtype(tcfg, mcfg)
plan = make_plan(tcfg, mcfg, tcfg.seq_len)
ks = candidate_accums(tcfg.batch_size, plan.place.mesh)
smaller = [k for k in ks if k < plan.tcfg.grad_accum]
tried = {(k, r): b for k, r, b in plan.tried}
below = None
if smaller:  # the next smaller grad_accum, with the remat that needs least memory
    k = smaller[-1]
    if (k, "full") not in tried:
        from gpt2_jax import step as step_lib
        from gpt2_jax.config import replace
        from gpt2_jax.train.plan import batch_shapes
        fn = step_lib.compile_train_step(replace(plan.mcfg, remat_policy="full"), plan.tx, plan.schedule, k,
                                         plan.place.mesh, plan.place.rules, plan.shardings)
        tried[(k, "full")] = memory.compiled_bytes(fn.lower(plan.abstract, batch_shapes(plan.tcfg, plan.seq_len, plan.place)).compile())
    below = tried[(k, "full")]
print("PLAN " + json.dumps({"grad_accum": plan.tcfg.grad_accum, "remat": plan.mcfg.remat_policy, "bytes": plan.bytes,
                            "limit": plan.limit, "devices": plan.place.mesh.size,
                            "data_parallel": plan.place.mesh.shape["data"] * plan.place.mesh.shape["fsdp"],
                            "batch": plan.tcfg.batch_size, "below": below, "lighter": [tried.get((plan.tcfg.grad_accum, r))
                            for r in REMAT_BY_WEIGHT[:REMAT_BY_WEIGHT.index(plan.mcfg.remat_policy)]]}))
"""


# About three minutes a case (medium compiled several times): in `make test-slow`, so that `make test`
# stays under 15 minutes on two cores. Two cases cover both device counts and both memory sizes (the
# two others of the grid took six more minutes of the slow suite).
@pytest.mark.slow
@pytest.mark.parametrize("devices, gib", [(1, 16), (8, 80)])
def test_make_train_medium_fits_the_device_it_is_started_on(devices, gib, shared_data):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "GPT2_JAX_DATA_DIR": str(shared_data)}
    proc = subprocess.run([sys.executable, "-c", PLAN, str(gib)], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PLAN "))[5:])
    budget = (1 - memory.MARGIN) * gib * memory.GiB
    assert plan["devices"] == devices and plan["limit"] == gib * memory.GiB
    assert plan["bytes"] <= budget  # the chosen step fits ...
    assert plan["below"] is None or plan["below"] > budget  # ... and the next smaller grad_accum does not, even with full remat
    assert all(b is not None and b > budget for b in plan["lighter"])  # nor a lighter remat at the chosen grad_accum
    micro = plan["batch"] // plan["grad_accum"]
    assert plan["batch"] == 512 and micro % plan["data_parallel"] == 0  # the global batch kept, the micro-batch split evenly


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, shared_data):
    run_dir = tmp_path / "run"
    assert train_main(["tiny", "--dry-run", "seq_len=32", "n_layer=1", "n_embd=32", "n_head=2", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    config = json.loads(out[out.index("resolved config:\n") + len("resolved config:\n"): out.index("\nmesh: ")])
    assert config["train"]["grad_accum"] == 1 and config["model"]["remat_policy"] == "none"
    for needle in ("mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}", "micro-batch: grad_accum=1", "memory per device: state and batch",
                   "temporaries", "FLOPs per step: compiled", "analytic 6N + 12LTD"):
        assert needle in out, needle
    assert not run_dir.exists()


def test_explicit_settings_are_kept(tmp_path, capsys, shared_data):
    args = ["tiny", "--dry-run", "seq_len=32", "batch_size=16", "grad_accum=2", "remat_policy=dots", f"run_dir={tmp_path / 'r'}"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "micro-batch: grad_accum=2 (micro-batch 8 = 1 per device), remat_policy=dots (as set)" in out
    assert "after 1 compile(s)" in out
    tcfg, mcfg = resolve_config({**load_experiment(find_experiment("tiny")), "grad_accum": "auto"})
    assert tcfg.grad_accum == 0 and mcfg.remat_policy == "auto"  # what every experiment asks for


def test_nothing_fits_is_one_line_before_anything_is_allocated(tmp_path, shared_data):
    """xl on one 16 GiB chip."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "GPT2_JAX_DATA_DIR": str(shared_data)}
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.train", "xl", "device_memory_gib=16", f"run_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "GiB per device" in errors[0] and "a device has 16.00 GiB (device_memory_gib)" in errors[0]
    assert not (tmp_path / "r").exists()
