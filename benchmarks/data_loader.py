"""Loader throughput: tokens/s delivered by TrainLoader and eval_batches from a token store.

    python benchmarks/data_loader.py --seq-len 256 --batch-size 8

Prepares Tiny Shakespeare (offline from $GPT2_JAX_DATA_DIR) into a temporary cache, then times
--batches training batches (after a warm-up batch) and one pass of eval_batches over validation.
"""

import argparse
import os
import platform
import tempfile
import time

from gpt2_jax.data import TrainLoader, eval_batches, prepare


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024], help="window lengths (default 256 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    parser.add_argument("--batches", type=int, default=2000, help="training batches to time (default 2000)")
    parser.add_argument("--threads", type=int, default=2, help="Grain read threads (default 2)")
    args = parser.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        store = prepare("tiny_shakespeare", cache_dir=tmp, workers=1, progress=False)
        for seq_len in args.seq_len:
            loader = TrainLoader(store, seq_len=seq_len, batch_size=args.batch_size, seed=0, num_threads=args.threads)
            next(loader)
            t = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            dt = time.perf_counter() - t
            rate = args.batches * args.batch_size * seq_len / dt
            print(f"TrainLoader  seq_len {seq_len:5d} batch {args.batch_size}: {rate:14,.0f} tokens/s "
                  f"({args.batches / dt:,.0f} batches/s)")
            t = time.perf_counter()
            n = sum(int(b["mask"].sum()) for b in eval_batches(store, seq_len=seq_len, batch_size=args.batch_size))
            dt = time.perf_counter() - t
            print(f"eval_batches seq_len {seq_len:5d} batch {args.batch_size}: {n / dt:14,.0f} scored tokens/s")


if __name__ == "__main__":
    main()
