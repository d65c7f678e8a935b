"""Loader throughput: tokens/s delivered by TrainLoader and eval_batches from a token store.

    python benchmarks/data_loader.py --seq-len 256 --batch-size 8
    python benchmarks/data_loader.py --gcs-emulator       # the store on a local GCS emulator

Prepares Tiny Shakespeare (offline from $GPT2_JAX_DATA_DIR) into --cache-dir (default: a temporary
local directory; a gs:// or s3:// URL puts the token store on that bucket), then times --batches
training batches (after a warm-up batch) and one pass of eval_batches over validation.
--gcs-emulator starts tests/object_store_server.py (gcp-storage-emulator in memory) on a free port,
points gcsfs and tensorstore at it and uses a new bucket's cache/ folder.
"""

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from gpt2_jax.data import TrainLoader, eval_batches, prepare

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def gcs_emulator():
    """A local GCS API (tests/object_store_server.py) with an empty bucket; yields its gs:// cache URL."""
    sys.path.insert(0, str(ROOT / "tests"))
    from object_store_server import ObjectStore

    with ObjectStore("gs") as store:
        yield f"{store.bucket()}/cache"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024], help="window lengths (default 256 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    parser.add_argument("--batches", type=int, default=2000, help="training batches to time (default 2000)")
    parser.add_argument("--threads", type=int, default=2, help="Grain read threads (default 2)")
    parser.add_argument("--prefetch", type=int, default=8, help="batches Grain reads ahead (default 8)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cache-dir", help="where the store is prepared: a directory, gs:// or s3:// URL "
                                           "(default: a temporary directory)")
    where.add_argument("--gcs-emulator", action="store_true", help="prepare the store on a local GCS emulator")
    args = parser.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        os.environ.setdefault("GPT2_JAX_BUILD_DIR", tmp)  # TFDS builds for a URL cache dir
        cache = stack.enter_context(gcs_emulator()) if args.gcs_emulator else args.cache_dir or tmp
        store = prepare("tiny_shakespeare", cache_dir=cache, workers=1, progress=False)
        print(f"store {store}")
        for seq_len in args.seq_len:
            loader = TrainLoader(store, seq_len=seq_len, batch_size=args.batch_size, seed=0, num_threads=args.threads,
                                 prefetch=args.prefetch)
            next(loader)
            t = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            dt = time.perf_counter() - t
            loader.close()
            rate = args.batches * args.batch_size * seq_len / dt
            print(f"TrainLoader  seq_len {seq_len:5d} batch {args.batch_size}: {rate:14,.0f} tokens/s "
                  f"({args.batches / dt:,.0f} batches/s)")
            t = time.perf_counter()
            n = sum(int(b["mask"].sum()) for b in eval_batches(store, seq_len=seq_len, batch_size=args.batch_size))
            dt = time.perf_counter() - t
            print(f"eval_batches seq_len {seq_len:5d} batch {args.batch_size}: {n / dt:14,.0f} scored tokens/s")


if __name__ == "__main__":
    main()
