"""`python -m gpt2_jax.data prepare --dataset NAME`: build a data set and tokenize it into a token store."""

from __future__ import annotations

import argparse
import sys

from gpt2_jax.data.sources import BUILD_DIR_ENV, CACHE_DIR_ENV, DATA_DIR_ENV, OFFLINE_ENV, SOURCES, DataError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build a data set with TFDS and tokenize it into a token store",
                       description="Build a data set (TFDS, ArrayRecord) and tokenize every split into packed "
                                   "uint16 shards with a manifest. Re-running skips finished work.",
                       epilog=f"Environment: {DATA_DIR_ENV} (manual directory), {CACHE_DIR_ENV} (cache), "
                              f"{BUILD_DIR_ENV} (TFDS builds when the cache is a URL), "
                              f"{OFFLINE_ENV}=1 (never download: report missing files at once).")
    p.add_argument("--dataset", required=True,
                   help=f"{', '.join(s.name for s in SOURCES)}, or tfds:NAME[/CONFIG] for a TFDS catalog data set (needs the tf extra)")
    p.add_argument("--manual-dir", help=f"directory with one folder of raw files per data set (default ${DATA_DIR_ENV})")
    p.add_argument("--cache-dir", help=f"where TFDS builds and token stores go (default ${CACHE_DIR_ENV} or "
                                       "~/.cache/gpt2_jax); a gs:// or s3:// URL puts the token store on the bucket "
                                       f"and the TFDS build in ${BUILD_DIR_ENV} (default ~/.cache/gpt2_jax)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="tokenizer processes (default: number of CPUs; 1 for under 32 MiB of text)")
    p.add_argument("--docs-per-shard", type=_positive, default=None,
                   help="documents per token shard (default: about 64 MiB of text per shard)")
    p.add_argument("--files", help="text_files: glob of .txt (one document each) and .jsonl (one per line) files")
    p.add_argument("--validation-files", help="text_files: glob of the validation files (default: hold out by hash)")
    p.add_argument("--field", help="text_files: the JSON field holding the text of a .jsonl line (default text)")
    p.add_argument("--validation-fraction", type=float,
                   help="text_files/openwebtext/fineweb/fineweb_edu: fraction of documents (subsets for openwebtext) held out "
                        "by hash of their name (fineweb, fineweb_edu: of their id; default 0.001)")
    p.add_argument("--feature", help="tfds:NAME: the text feature to tokenize (default text)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    options = {k: getattr(args, k) for k in ("files", "validation_files", "field", "validation_fraction", "feature")
               if getattr(args, k) is not None}
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)  # TFDS logs routine steps as warnings
        from gpt2_jax.data.store import prepare, report

        store = prepare(args.dataset, cache_dir=args.cache_dir, manual_dir=args.manual_dir, workers=args.workers,
                        docs_per_shard=args.docs_per_shard, progress=not args.quiet, **options)
        for line in report(store):
            print(line)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
