"""Tokenization throughput of `prepare` (1 and 2 worker processes) vs a plain encode_ordinary loop.

    python benchmarks/data_tokenize.py --mb 16

Builds a text_files corpus of about --mb MB of documents from Tiny Shakespeare in a temporary
directory, builds its TFDS data set once, then times the tokenization stage of `prepare` (reading
the ArrayRecord files, encoding, writing uint16 shards) against a single-process loop that only
calls `encode_ordinary` on the same documents.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from gpt2_jax import tokenizer
from gpt2_jax.data import prepare
from gpt2_jax.data.sources import build


def _encode_timed(docs):
    enc = tokenizer.get_tokenizer()
    t = time.perf_counter()
    for d in docs:
        enc.encode_ordinary(d)
    return time.perf_counter() - t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=16, help="corpus size in MB of text (default 16)")
    parser.add_argument("--doc-kb", type=int, default=20, help="document size in KB (default 20)")
    parser.add_argument("--docs-per-shard", type=int, default=40, help="documents per token shard (default 40)")
    parser.add_argument("--source", default=os.environ.get("GPT2_JAX_DATA_DIR", "../shared/data"),
                        help="data directory holding tiny_shakespeare/input.txt (default $GPT2_JAX_DATA_DIR)")
    args = parser.parse_args(argv)

    text = (Path(args.source) / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    size = args.doc_kb * 1000
    docs, total, k = [], 0, 0
    while total < args.mb * 1e6:
        start = (k * 7919) % (len(text) - size)  # distinct slices, so caching cannot help
        docs.append(text[start:start + size])
        total += len(docs[-1].encode())
        k += 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        options = dict(files=str(tmp / "corpus.jsonl"), validation_fraction=0.0)
        build("text_files", cache_dir=tmp / "cache", manual_root=None, **options)
        enc = tokenizer.get_tokenizer()
        t = time.perf_counter()
        n_plain = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
        plain = time.perf_counter() - t
        print(f"corpus: {len(docs)} documents, {total / 1e6:.1f} MB, {n_plain:,} tokens; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"{'plain encode_ordinary loop':<30} {total / 1e6 / plain:7.2f} MB/s  ({plain:.1f} s)")
        # Control: the same loop split over 2 processes (encoding time only, no start-up): the
        # parallel speed-up this machine offers at the moment, whatever prepare does.
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
            both = max(pool.map(_encode_timed, [docs[0::2], docs[1::2]]))
        print(f"{'plain loop, 2 processes':<30} {total / 1e6 / both:7.2f} MB/s  ({both:.1f} s, encoding only)")
        for workers in (1, 2):
            shutil.rmtree(tmp / "cache" / "tokens", ignore_errors=True)
            t = time.perf_counter()
            store = prepare("text_files", cache_dir=tmp / "cache", workers=workers, docs_per_shard=args.docs_per_shard,
                            progress=False, **options)
            dt = time.perf_counter() - t
            tokens = json.loads((store / "manifest.json").read_text())["splits"]["train"]["tokens"]
            assert tokens == n_plain, (tokens, n_plain)
            print(f"{f'prepare, {workers} worker(s)':<30} {total / 1e6 / dt:7.2f} MB/s  ({dt:.1f} s)")


if __name__ == "__main__":
    main()
