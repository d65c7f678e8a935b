"""What `make train SIZE=...` chooses for grad_accum and remat_policy on a given device.

    python benchmarks/fit.py [--sizes small medium large xl]

For each size's experiment (batch 512 x 1,024 tokens, grad_accum and remat_policy auto) and each
setting below, the train step is planned and compiled abstractly as `python -m gpt2_jax.train SIZE
--dry-run device_memory_gib=G` does, on that many simulated CPU devices, with bfloat16 compute as on
GPU/TPU. Nothing is allocated. XLA:CPU's buffer assignment stands in for the accelerator compilers',
and attention is XLA's (cuDNN's and splash's flash kernels need less), so the figures are estimates
on the safe side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (("1 GPU, 80 GB", 1, 80), ("8 GPUs, 80 GB", 8, 80), ("8 chips, 16 GB", 8, 16))

PLAN = """
import json, sys
from gpt2_jax import memory, sharding, train
from gpt2_jax.train.plan import make_plan
tcfg, mcfg = train.resolve_config({**train.load_experiment(train.find_experiment(sys.argv[1])),
                                   "device_memory_gib": sys.argv[2], "compute_dtype": "bfloat16"})
mcfg = train.resolve_dtype(tcfg, mcfg)
try:
    plan = make_plan(tcfg, mcfg, tcfg.seq_len)
except memory.PreflightError as e:
    print("PLAN " + json.dumps({"error": str(e)}))
    raise SystemExit(0)
micro = plan.tcfg.batch_size // plan.tcfg.grad_accum
print("PLAN " + json.dumps({"grad_accum": plan.tcfg.grad_accum, "micro": micro,
                            "per_device": micro // sharding.data_parallel_size(plan.place.mesh),
                            "remat": plan.mcfg.remat_policy, "gib": plan.bytes / memory.GiB, "compiles": len(plan.tried)}))
"""


def plan(size: str, devices: int, gib: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", PLAN, size, str(gib)], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PLAN "))[5:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--sizes", nargs="+", default=["small", "medium", "large", "xl"], help="sizes (default small to xl)")
    args = parser.parse_args(argv)
    print("| size | where | grad_accum | micro-batch (per device) | remat_policy | GiB per device | compiles |")
    print("|---|---|---:|---:|---|---:|---:|")
    for size in args.sizes:
        for name, devices, gib in SETTINGS:
            r = plan(size, devices, gib)
            if "error" in r:
                print(f"| {size} | {name} | does not fit: {r['error'][:160]} |||||", flush=True)
                continue
            print(f"| {size} | {name} | {r['grad_accum']} | {r['micro']} ({r['per_device']}) | {r['remat']} | {r['gib']:.1f} | {r['compiles']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
