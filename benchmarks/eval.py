"""Evaluation throughput: tokens scored per second by `gpt2_jax.eval.Scorer` (random init).

    python benchmarks/eval.py --size small --batch-size 1 --seq-len 1024 --steps 3

Times the jitted scoring step (forward, log-softmax at the targets, argmax) on full windows after
one compile step, on all local devices. Paste the printed line into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from gpt2_jax.config import SIZES, get_model_config
from gpt2_jax.eval import Scorer
from gpt2_jax.model import init_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=SIZES, help="model size preset (default small)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step over all devices")
    parser.add_argument("--seq-len", type=int, default=None, help="scored tokens per row (default the context)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    args = parser.parse_args(argv)

    cfg = get_model_config(args.size, dtype=args.dtype)
    T = args.seq_len or cfg.n_ctx
    params = init_params(cfg, jax.random.key(0))
    scorer = Scorer(cfg, params, batch_size=args.batch_size)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (scorer.batch_size, T + 1)).astype(np.int32)
    t0 = time.perf_counter()
    scorer.score_array(tokens)  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        scorer.score_array(tokens)
    dt = (time.perf_counter() - t0) / args.steps
    n = scorer.batch_size * T
    devices = jax.local_devices()
    print(f"{args.size} {args.dtype} batch={scorer.batch_size} seq={T} on {len(devices)}x {devices[0].device_kind} "
          f"({platform.processor() or platform.machine()}): {n / dt:,.0f} tokens/s "
          f"({dt:.2f} s/step, first step with compile {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
