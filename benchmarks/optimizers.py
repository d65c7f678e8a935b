"""AdamW against Muon, side by side, on this CPU: one small model on Tiny Shakespeare, each optimizer
at several peak learning rates, every run a normal training run of `gpt2_jax.train` in its own run
directory (metrics.jsonl, final.json, checkpoint), all on the same data in the same order.

    python benchmarks/optimizers.py                      # the table of docs/benchmarks.md (~30 minutes on 2 cores)
    python benchmarks/optimizers.py --steps 4 --eval-every 2 --adamw-lrs 1e-3 --muon-lrs 0.02 --out-dir /tmp/opt  # smoke run

Reports, as Markdown for docs/benchmarks.md: each run's best validation loss; the best run of each
optimizer; the tokens Muon's best run needs to reach AdamW's best validation loss, against the
tokens AdamW needed; the median time per step of the runs and of the two best settings' compiled
steps timed in alternating windows (so that load from other jobs falls on both alike); the
Newton-Schulz FLOPs against the step's; how many times each training token was seen. It ends with
the `python -m gpt2_jax.plot` command that draws the runs' curves in one figure.

Each optimizer runs its own recipe (TrainConfig's defaults for it): AdamW with 20 warmup steps,
cosine decay to 10% and weight decay 0.1; Muon with no warmup, constant then a linear warmdown over
the last 28.43% of the steps, no weight decay, and AdamW at lr 0.0036 for wte, wpe, biases and
LayerNorms. Only the peak learning rate (AdamW's `lr`, Muon's `muon_lr`) is swept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from gpt2_jax import costs, data, sharding, step as step_lib, train
from gpt2_jax.train import loop
from gpt2_jax.train.plan import make_plan

# The model: `tiny` (4 layers, context 256) at half its width, 128 wide with 4 heads of 32: 7,259,008
# parameters, 6,432,896 of them the tied 50,257 x 128 embedding, 786,432 in the blocks' matrices that
# Muon trains. 8 x 128 = 1,024 tokens per step, under a second per step on 2 cores, so that eight runs
# of 160 steps (0.54 epochs of the training split) and the step timing fit in about half an hour even
# when another job shares the cores.
SETTINGS = {
    "size": "tiny", "n_embd": 128, "n_head": 4, "dataset": "tiny_shakespeare", "seq_len": 128, "batch_size": 8,
    "grad_accum": 1, "remat_policy": "none", "dropout": 0.0, "seed": 0, "eval_batches": 0, "log_every": 1,
    "sample_tokens": 16, "sample_prompt": "ROMEO:", "ckpt_every": 0, "ckpt_keep_best": 0,
}
SKIP_STEPS = 5  # the first steps' times (cold caches) are left out of the medians


def run_name(optimizer: str, lr: float) -> str:
    return f"{optimizer}-lr{lr:g}"


def run_settings(optimizer: str, lr: float, steps: int, eval_every: int) -> dict:
    peak = {"lr": lr} if optimizer == "adamw" else {"muon_lr": lr}
    return {**SETTINGS, "optimizer": optimizer, **peak, "steps": steps, "eval_every": eval_every}


def train_run(settings: dict, run_dir: Path) -> None:
    """One training run through the trainer's own loop; a run that already finished is kept."""
    if (run_dir / "final.json").is_file():
        print(f"{run_dir}: finished earlier, kept", flush=True)
        return
    tcfg, mcfg = train.resolve_config({**settings, "run_dir": str(run_dir)})
    start = time.perf_counter()
    final = loop.train(tcfg, mcfg, run_dir, echo=lambda *_: None)
    print(f"{run_dir}: {final['step']} steps, val loss {final['val_loss']:.4f}, {time.perf_counter() - start:.0f} s", flush=True)


def summarize(run_dir: Path) -> dict:
    """The validation curve, its best point, and the median seconds per step of a finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())["train"]
    tokens_per_step = config["batch_size"] * config["seq_len"]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    best_step, best = min(val, key=lambda p: p[1])
    # tokens_per_s of the record at step s is measured over step s alone (the loop reads each step's
    # metrics one behind); a record after an evaluation also holds it: the median leaves those out.
    skip = min(SKIP_STEPS, records[-1]["step"] // 2)
    step_s = [tokens_per_step / r["tokens_per_s"] for r in records if r.get("tokens_per_s") and r["step"] > skip]
    return {"val": val, "best": best, "best_step": best_step, "tokens_per_step": tokens_per_step,
            "median_step_s": statistics.median(step_s), "final_val": val[-1][1]}


def tokens_to_reach(val: list[tuple[int, float]], target: float, tokens_per_step: int) -> tuple[float | None, int | None]:
    """(tokens by linear interpolation between the evaluations around the first one at or below
    `target`, the tokens at that evaluation); (None, None) if the curve never gets there."""
    prev = (0, float("inf"))
    for s, v in val:
        if v <= target:
            if prev[1] == float("inf"):
                return float(s * tokens_per_step), s * tokens_per_step
            frac = (prev[1] - target) / (prev[1] - v)
            return (prev[0] + frac * (s - prev[0])) * tokens_per_step, s * tokens_per_step
        prev = (s, v)
    return None, None


def timed_steps(settings: list[dict], rounds: int, window: int) -> list[float]:
    """Median seconds per step of each setting's compiled train step (the trainer's plan), the
    settings taking turns in windows of `window` steps, `rounds` times, on one fixed batch."""
    states = []
    for s in settings:
        tcfg, mcfg = train.resolve_config(s)
        mcfg, seq_len, _ = loop.model_config(tcfg, mcfg)
        plan = make_plan(tcfg, mcfg, seq_len)
        state, _ = step_lib.init_train_state_sharded(plan.mcfg, plan.tx, tcfg.seed, plan.place.mesh, plan.place.rules)
        tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, (tcfg.batch_size, seq_len + 1)).astype(np.int32)
        batch = sharding.shard_batch({"tokens": tokens}, plan.place.mesh)
        for _ in range(2):  # warm up
            state, _ = plan.train_step(state, batch)
        jax.block_until_ready(state)
        states.append([plan.train_step, state, batch])
    times: list[list[float]] = [[] for _ in settings]
    for _ in range(rounds):
        for i, entry in enumerate(states):
            fn, state, batch = entry
            start = time.perf_counter()
            for _ in range(window):
                state, metrics = fn(state, batch)
            jax.block_until_ready(metrics)
            times[i].append((time.perf_counter() - start) / window)
            entry[1] = state
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/optimizers", help="where the run directories go")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--eval-every", type=int, default=16)
    # Steps of ~3x around each recipe's rate (tiny's 1e-3; modded-nanogpt's 0.02), wide enough that
    # each optimizer's best is inside its grid.
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--timing-rounds", type=int, default=3, help="windows per optimizer for the step timing")
    parser.add_argument("--timing-window", type=int, default=8, help="steps per window")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    # AdamW and Muon take turns, so that a benchmark cut short still has runs of both.
    grid = [(o, lr) for pair in itertools.zip_longest(args.adamw_lrs, args.muon_lrs)
            for o, lr in zip(("adamw", "muon"), pair) if lr is not None]
    started = time.perf_counter()
    for optimizer, lr in grid:
        train_run(run_settings(optimizer, lr, args.steps, args.eval_every), out / run_name(optimizer, lr))
    runs = {(o, lr): summarize(out / run_name(o, lr)) for o, lr in grid}
    best = {o: min(((lr, s) for (oo, lr), s in runs.items() if oo == o), key=lambda p: p[1]["best"]) for o in ("adamw", "muon")}
    (a_lr, a), (m_lr, m) = best["adamw"], best["muon"]
    step_times = timed_steps([run_settings("adamw", a_lr, args.steps, args.eval_every),
                              run_settings("muon", m_lr, args.steps, args.eval_every)], args.timing_rounds, args.timing_window)

    tcfg, mcfg = train.resolve_config(run_settings("muon", m_lr, args.steps, args.eval_every))
    tokens_per_step = a["tokens_per_step"]
    train_tokens = len(data.SplitTokens(data.prepare(tcfg.dataset, progress=False), "train"))
    step_flops = costs.flops_per_token(mcfg, tcfg.seq_len) * tokens_per_step
    ns = costs.newton_schulz_flops(mcfg, tcfg.muon_ns_steps)
    small = train.resolve_config({"size": "small"})[1]
    ns_small = costs.newton_schulz_flops(small) / (costs.flops_per_token(small, 1024) * 524_288)
    a_tokens = a["best_step"] * tokens_per_step
    m_interp, m_eval = tokens_to_reach(m["val"], a["best"], tokens_per_step)

    print(f"\n{mcfg.n_layer} layers x {mcfg.n_embd}, {mcfg.n_head} heads ({mcfg.n_params:,} parameters), "
          f"{tcfg.batch_size} x {tcfg.seq_len} = {tokens_per_step:,} tokens per step, {args.steps} steps = "
          f"{args.steps * tokens_per_step:,} tokens = {args.steps * tokens_per_step / train_tokens:.2f} epochs of the "
          f"{train_tokens:,}-token training split; validation every {args.eval_every} steps on the whole validation split; "
          f"{jax.devices()[0].device_kind}, {time.perf_counter() - started:.0f} s in all\n")
    print("| optimizer | peak lr | best val loss | at step (tokens) | last val loss | median s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for (o, lr), s in sorted(runs.items()):
        bold = "**" if (o, lr) in (("adamw", a_lr), ("muon", m_lr)) else ""
        name = "AdamW (lr)" if o == "adamw" else "Muon (muon_lr)"
        print(f"| {name} | {lr:g} | {bold}{s['best']:.4f}{bold} | {s['best_step']} ({s['best_step'] * tokens_per_step:,}) | "
              f"{s['final_val']:.4f} | {s['median_step_s']:.3f} |")
    print()
    if m_interp is None:
        reach = f"Muon (muon_lr {m_lr:g}) never reaches AdamW's best {a['best']:.4f} (its best: {m['best']:.4f})"
    else:
        reach = (f"Muon (muon_lr {m_lr:g}) reaches AdamW's best {a['best']:.4f} (lr {a_lr:g}, at {a_tokens:,} tokens) at "
                 f"{m_interp:,.0f} tokens, interpolated between evaluations ({m_eval:,} at the first evaluation at or "
                 f"below it): **{m_interp / a_tokens:.2f}x** AdamW's tokens ({m_eval / a_tokens:.2f}x by evaluations)")
    print(f"- {reach}; best validation loss AdamW {a['best']:.4f}, Muon {m['best']:.4f}.")
    print(f"- Time per step, the best two settings' compiled steps in alternating windows ({args.timing_rounds} x "
          f"{args.timing_window} steps each): AdamW {step_times[0]:.3f} s, Muon {step_times[1]:.3f} s, "
          f"**{step_times[1] / step_times[0]:.3f}x**; in the runs (median): {a['median_step_s']:.3f} s and "
          f"{m['median_step_s']:.3f} s, {m['median_step_s'] / a['median_step_s']:.3f}x.")
    print(f"- Newton-Schulz: {ns / 1e9:.2f} GFLOP per step here (costs.newton_schulz_flops), {100 * ns / step_flops:.2f}% of "
          f"the step's {step_flops / 1e9:.1f} GFLOP (6N + attention); for `small` at 524,288 tokens per step, "
          f"{100 * ns_small:.2f}%.")
    print(f"- Each training token was seen {args.steps * tokens_per_step / train_tokens:.2f} times "
          f"({args.steps * tokens_per_step:,} tokens over {train_tokens:,}); AdamW's best came after "
          f"{a_tokens / train_tokens:.2f} epochs, Muon's after {m['best_step'] * tokens_per_step / train_tokens:.2f}.")
    dirs = " ".join(str(out / run_name(o, lr)) for o, lr in sorted(grid))
    labels = " ".join(f'"{"AdamW lr" if o == "adamw" else "Muon muon_lr"} {lr:g}"' for o, lr in sorted(grid))
    print(f"\npython -m gpt2_jax.plot {dirs} --labels {labels} --out docs/optimizers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
