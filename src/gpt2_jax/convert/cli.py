"""`python -m gpt2_jax.convert inspect|from-hf|to-hf`: GPT-2 weights between Hugging Face
directories and gpt2_jax checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from gpt2_jax import convert, weights
from gpt2_jax.checkpoint import CheckpointError
from gpt2_jax.config import ConfigError
from gpt2_jax.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_jax.convert",
        description="Convert GPT-2 weights between Hugging Face directories and gpt2_jax checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="check an HF GPT-2 directory and print its config and size")
    p.add_argument("hf_dir", help="directory with config.json and model.safetensors (or pytorch_model.bin)")
    p = sub.add_parser("from-hf", help="HF GPT-2 directory -> gpt2_jax params-only checkpoint")
    p.add_argument("hf_dir", help="directory with config.json and model.safetensors (or pytorch_model.bin)")
    p.add_argument("out", help="output checkpoint directory (must not exist)")
    p = sub.add_parser("to-hf", help="gpt2_jax checkpoint -> HF GPT-2 directory (loads with from_pretrained)")
    p.add_argument("checkpoint", help="a gpt2_jax params-only checkpoint, training checkpoint or run directory")
    p.add_argument("out", help="output HF directory")
    for p in sub.choices.values():
        p.add_argument("--allow-nonfinite", action="store_true", help="load weights that hold NaN or inf (refused by default)")
    args = parser.parse_args(argv)
    try:
        if args.command in ("inspect", "from-hf"):  # the checks `weights.load` makes for generate and eval
            cfg, params = convert.load_hf(args.hf_dir)
            weights.check_values(params, args.hf_dir, allow_nonfinite=args.allow_nonfinite)
        if args.command == "inspect":
            n = sum(np.asarray(x).size for x in jax.tree.leaves(params)) - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
            print(json.dumps(cfg.to_dict(), indent=2))
            print(f"{args.hf_dir}: GPT-2 with {n:,} parameters")
        elif args.command == "from-hf":
            out = weights.save_params(args.out, cfg, params)
            print(f"wrote {out}")
        else:
            if weights.kind(args.checkpoint) not in ("params", "step", "run"):
                raise CheckpointError(f"{args.checkpoint} is not a gpt2_jax checkpoint")
            cfg, params = weights.load(args.checkpoint, allow_nonfinite=args.allow_nonfinite)
            out = convert.save_hf(cfg, params, args.out)
            print(f"wrote {out}")
    except (convert.ConversionError, ConfigError, CheckpointError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
