"""Checkpoint benchmark: save/restore seconds and bytes of a full train state, and the train loop's
step time with asynchronous saves on vs off.

    python benchmarks/checkpoint.py                      # small state, tiny loop (CPU defaults)
    python benchmarks/checkpoint.py --size xl --loop-size small --batch 32 --seq-len 1024   # on a GPU

The loop comparison runs once per save interval in --every (default: a save every 10 steps, a
stress test, and every 50).

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax import checkpoint as C
from gpt2_jax import optim, sharding, step, storage
from gpt2_jax.config import SIZES, get_model_config


def _setup(size: str, seq_len: int, batch: int):
    cfg = get_model_config(size, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    schedule = optim.lr_schedule(1e-4, 10, 1000)
    tx = optim.make_optimizer(schedule)
    mesh = sharding.make_mesh((1, -1, 1))
    rules = sharding.logical_rules("fsdp", mesh, cfg)
    state, shardings = step.init_train_state_sharded(cfg, tx, 0, mesh, rules)
    train_step = step.compile_train_step(cfg, tx, schedule, 1, mesh, rules, shardings)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return cfg, state, train_step, sharding.shard_batch({"tokens": tokens}, mesh)


def save_restore(size: str, root: Path, repeats: int) -> dict[str, float]:
    """Seconds to start a save (blocking part), to finish it, and to restore; bytes on disk."""
    cfg, state, train_step, batch = _setup(size, 8, 1)
    state, _ = train_step(state, batch)  # one step, so the AdamW moments are not all zeros (which compress)
    jax.block_until_ready(state)
    abstract = C.abstract_like(state)
    out = {"blocking": [], "save": [], "restore": []}
    for i in range(repeats):
        run = root / f"save-{i}"
        ck = C.Checkpointer(run, C.CheckpointOptions(keep=1, keep_best=0))
        t0 = time.perf_counter()
        assert ck.save(1, state, config={"model": cfg.to_dict()})
        t1 = time.perf_counter()
        assert ck.wait()
        t2 = time.perf_counter()
        ck.close()
        out["blocking"].append(t1 - t0)
        out["save"].append(t2 - t0)
        t0 = time.perf_counter()
        restored = C.Checkpointer(run, read_only=True).restore_latest(abstract)
        jax.block_until_ready(restored.state)
        out["restore"].append(time.perf_counter() - t0)
        nbytes = storage.tree_bytes(run / "checkpoints" / "1")
        del restored
        if i + 1 < repeats:
            shutil.rmtree(run)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return {**{k: float(np.median(v)) for k, v in out.items()}, "bytes": nbytes, "state_bytes": state_bytes}


def loop(size: str, root: Path, rounds: int, every: int, seq_len: int, batch: int) -> dict[str, float]:
    """Mean seconds per train step with a save every `every` steps: async, sync, or none.

    The modes take turns in windows of `every` steps (so a changing machine load hits all three
    alike). A window saves at its first step; the async window ends by waiting for its save, so a
    write that has not finished before the next save would be counted as a stall too.
    """
    _, state, train_step, batch_arrays = _setup(size, seq_len, batch)
    state, m = train_step(state, batch_arrays)  # compile
    float(m["loss"])
    cks = {mode: C.Checkpointer(root / f"loop-{mode}", C.CheckpointOptions(keep=1, keep_best=0, async_save=mode == "async"))
           for mode in ("async", "sync")}
    totals = {"off": 0.0, "async": 0.0, "sync": 0.0}
    step = 0
    bar = tqdm(total=rounds * 3 * every, desc="train loop", file=sys.stderr)
    for _ in range(rounds):
        for mode in totals:
            t0 = time.perf_counter()
            for i in range(every):
                step += 1
                state, m = train_step(state, batch_arrays)
                if i == 0 and mode != "off":
                    cks[mode].save(step, state)
                float(m["loss"])  # the loop reads each step's loss to host
                bar.update()
            if mode == "async":
                cks[mode].wait()
            totals[mode] += time.perf_counter() - t0
    bar.close()
    for ck in cks.values():
        ck.close()
    return {mode: t / (rounds * every) for mode, t in totals.items()}


def _intervals(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("save intervals must be at least 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=SIZES, help="model size for the save/restore timing (default small)")
    parser.add_argument("--repeats", type=int, default=2, help="save/restore repetitions; the median is reported (default 2)")
    parser.add_argument("--loop-size", default="tiny", choices=SIZES, help="model size for the step-time comparison (default tiny)")
    parser.add_argument("--rounds", type=int, default=2, help="windows of --every steps per mode (default 2; 0 skips the loop comparison)")
    parser.add_argument("--every", type=_intervals, default=[10, 50], help="save intervals to compare, comma-separated (default 10,50)")
    parser.add_argument("--seq-len", type=int, default=128, help="loop sequence length (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="loop batch size (default 8)")
    parser.add_argument("--dir", help="where to write checkpoints (default: a temporary directory, deleted afterwards)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 0:
        print("error: --repeats must be at least 1, --rounds at least 0", file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="gpt2_jax_ckpt_bench_"))
    try:
        r = save_restore(args.size, root, args.repeats)
        device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
        print(f"\nFull train state of `{args.size}` (params + AdamW moments + step + RNG) on {device}:\n")
        print("| state (in memory) | on disk | save: blocking part | save: until on disk | restore |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {r['state_bytes'] / 2**20:,.0f} MiB | {r['bytes'] / 2**20:,.0f} MiB | {r['blocking']:.2f} s "
              f"| {r['save']:.2f} s | {r['restore']:.2f} s |", flush=True)
        if not args.rounds:
            return 0
        results = {every: loop(args.loop_size, root, args.rounds, every, args.seq_len, args.batch) for every in args.every}
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nTrain loop, `{args.loop_size}`, batch {args.batch} x {args.seq_len}, {args.rounds} windows of "
          f"N steps per mode:\n")
    print("| a save every | saves | s/step | vs no saves |")
    print("|---:|---|---:|---:|")
    for every, modes in results.items():
        for mode, t in modes.items():
            print(f"| {every} steps | {mode} | {t:.3f} | {100 * (t / modes['off'] - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
