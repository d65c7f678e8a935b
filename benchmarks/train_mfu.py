"""Train-step throughput and MFU per attention implementation, on whatever devices JAX sees.

    python benchmarks/train_mfu.py                      # small and medium at T=1024, bf16
    python benchmarks/train_mfu.py --sizes small --attention xla cudnn --seqs-per-device 8 16

Synthetic tokens (no data set needed), the size's model shape with scanned layers and the vocabulary
padded to 50,304, bfloat16 compute with float32 parameters and AdamW state, FSDP over every device.
Each configuration compiles, runs `--warmup` steps, then times `--steps` steps; tokens/s counts all
devices, MFU = tokens/s per device x (6N + 12·L·T·D) / the device's peak bf16 FLOP/s
(`gpt2_jax.costs`). Needs only jax, flax and optax: on a machine without the data packages run it
as `PYTHONPATH=src python benchmarks/train_mfu.py`.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from gpt2_jax import attention, costs, optim, sharding, step
from gpt2_jax.config import ConfigError, get_model_config


def default_attention() -> list[str]:
    platform = jax.default_backend()
    return ["xla", "cudnn"] if platform == "gpu" else ["xla", "splash"] if platform == "tpu" else ["xla"]


def measure(size: str, impl: str, seq_len: int, seqs_per_device: int, steps: int, warmup: int, remat: str) -> dict:
    cfg = get_model_config(
        size, n_ctx=max(seq_len, get_model_config(size).n_ctx), dtype="bfloat16", scan_layers=True,
        pad_vocab_multiple=128, remat_policy=remat, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, attention=impl,
    )
    choice = attention.resolve(cfg, jax.devices()[0], seq_len)
    mesh = sharding.make_mesh((1, -1, 1))
    rules = sharding.logical_rules("fsdp", mesh, cfg)
    sched = optim.lr_schedule(1e-4, 10, 1000)
    tx = optim.make_optimizer(sched)
    state, shardings = step.init_train_state_sharded(cfg, tx, 0, mesh, rules)
    train_step = step.compile_train_step(cfg, tx, sched, 1, mesh, rules, shardings)
    rows = seqs_per_device * jax.device_count()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, seq_len + 1), dtype=np.int32)
    batch = sharding.shard_batch({"tokens": tokens}, mesh)
    t = time.perf_counter()
    state, metrics = train_step(state, batch)
    float(metrics["loss"])
    compile_s = time.perf_counter() - t
    for _ in range(warmup):
        state, metrics = train_step(state, batch)
    float(metrics["loss"])
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch)
    loss = float(metrics["loss"])
    seconds = (time.perf_counter() - t) / steps
    tokens_per_s = rows * seq_len / seconds
    peak = costs.peak_flops(jax.devices()[0])
    mfu = tokens_per_s / jax.device_count() * costs.flops_per_token(cfg, seq_len) / peak if peak else None
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "size": size, "attention": choice.impl, "seqs": seqs_per_device, "remat": remat, "ms": 1e3 * seconds,
        "tokens_per_s": tokens_per_s, "mfu": mfu, "loss": loss, "compile_s": compile_s,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], help="model sizes (default small medium)")
    parser.add_argument("--attention", nargs="+", default=None, help="implementations (default: xla and the platform's kernel)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--seqs-per-device", type=int, nargs="+", default=[8], help="sequences per device per step (default 8)")
    parser.add_argument("--remat", default="none", help="remat_policy (default none)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile (default 3)")
    args = parser.parse_args(argv)
    impls = args.attention or default_attention()
    dev = jax.devices()[0]
    print(f"{jax.device_count()} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}, T={args.seq_len}, bfloat16, fsdp")
    print("| size | attention | seqs/device | remat | ms/step | tokens/s | tokens/s/device | MFU | peak GiB (process) | loss | compile s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        for seqs in args.seqs_per_device:
            for impl in impls:
                try:
                    r = measure(size, impl, args.seq_len, seqs, args.steps, args.warmup, args.remat)
                except (ConfigError, RuntimeError, ValueError) as e:  # e.g. out of memory, kernel unavailable
                    print(f"| {size} | {impl} | {seqs} | {args.remat} | failed: {' '.join(str(e).split())[:200]} |", flush=True)
                    continue
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                print(
                    f"| {size} | {r['attention']} | {seqs} | {r['remat']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['tokens_per_s'] / jax.device_count():,.0f} | {mfu} | {r['peak_gib']:.1f} | {r['loss']:.3f} | {r['compile_s']:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
