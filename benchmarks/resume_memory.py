"""Peak host memory of resuming a training run: the state restored straight onto its shardings
(what `gpt2_jax.train` does) against a fresh state initialized first and the checkpoint restored
beside it (what a loop that always initializes does).

    python benchmarks/resume_memory.py              # small, on this machine's devices
    python benchmarks/resume_memory.py --size medium

Each measurement runs in its own process (peak RSS only grows). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gpt2_jax.config import SIZES

MODES = {"restore onto shardings": "abstract", "initialize, then restore": "init"}


def _setup(size: str):
    from gpt2_jax import optim, sharding
    from gpt2_jax.config import get_model_config

    cfg = get_model_config(size)
    tx = optim.make_optimizer(optim.lr_schedule(1e-4, 10, 1000))
    mesh = sharding.make_mesh((1, -1, 1))
    return cfg, tx, mesh, sharding.logical_rules("fsdp", mesh, cfg)


def worker(mode: str, size: str, run: str) -> None:
    from gpt2_jax import checkpoint, step

    cfg, tx, mesh, rules = _setup(size)
    if mode == "save":
        state, _ = step.init_train_state_sharded(cfg, tx, 0, mesh, rules)
        with checkpoint.Checkpointer(run) as ck:
            assert ck.save(1, state)
        return
    if mode == "init":
        state, _ = step.init_train_state_sharded(cfg, tx, 0, mesh, rules)
        target = checkpoint.abstract_like(state)
    else:
        target, _ = step.state_shardings(cfg, tx, mesh, rules)
    restored = checkpoint.Checkpointer(run, read_only=True).restore_latest(target)
    assert restored is not None and int(restored.state.step) == 0
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def _run(mode: str, size: str, run: Path) -> int:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, "--size", size, str(run)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"{mode} failed")
    return int(out.stdout.split()[-1]) if mode != "save" else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=SIZES, help="model size (default small)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per mode; the largest is reported (default 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("run", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.size, args.run)
        return 0
    root = Path(tempfile.mkdtemp(prefix="gpt2_jax_resume_mem_"))
    try:
        _run("save", args.size, root)
        peaks = {name: max(_run(mode, args.size, root) for _ in range(args.repeats)) for name, mode in MODES.items()}
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nResuming `{args.size}` (params + AdamW moments), peak RSS of the process, max of {args.repeats}:\n")
    print("| resume | peak RSS |")
    print("|---|---:|")
    for name, peak in peaks.items():
        print(f"| {name} | {peak / 2**30:.2f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
