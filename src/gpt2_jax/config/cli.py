"""`python -m gpt2_jax.config SIZE [key=value ...]`: a resolved model config and its size."""

from __future__ import annotations

import argparse
import sys

from gpt2_jax.config import SIZES, ConfigError, get_model_config, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_jax.config", description="Print the resolved model config of a size preset."
    )
    parser.add_argument("size", help=f"one of: {', '.join(SIZES)}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="ModelConfig fields to override")
    args = parser.parse_args(argv)
    try:
        cfg = get_model_config(args.size, **parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(cfg.to_json())
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd  # counted from the shapes: instant at any size
    print(f"{args.size}: {cfg.n_params - padding:,} parameters")
    return 0

