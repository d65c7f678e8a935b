"""Helpers shared by tests: random HF GPT-2 models as the independent reference, and what a
training run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def run_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl, the last record of each step winning (a resumed run
    appends the steps it repeats)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def random_hf_gpt2(out_dir: Path | None = None, *, seed: int = 0, **config):
    """A randomly initialized `transformers.GPT2LMHeadModel` (eval mode), LayerNorms randomized too.

    Zero biases and unit scales would hide a swapped or missing LayerNorm, so they are drawn at random.
    Saved to `out_dir` (safetensors) when given.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    defaults = dict(vocab_size=101, n_positions=64, n_embd=80, n_layer=2, n_head=5)
    cfg = GPT2Config(**{**defaults, **config})
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
