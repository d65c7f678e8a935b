"""Helpers shared by tests: random HF GPT-2 models as the independent reference, what a training
run wrote, hand-made HellaSwag items, and a stand-in for the distributed runtime's key-value store."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np


def run_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl, the last record of each step winning (a resumed run
    appends the steps it repeats)."""
    out = {}
    from gpt2_jax import storage

    for line in (storage.path(run_dir) / "metrics.jsonl").read_text().splitlines():
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


# Hand-made items in hellaswag_val.jsonl's schema: endings of different token and byte lengths
# (one with non-ASCII text, one that is empty), and a context of ~170 tokens, longer than the test
# models' contexts (so cut from the left).
HELLASWAG_ITEMS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "x"},
    {"ctx": "[header] How to make a café au lait [title] Brew the coffee. [step] Use a strong roast.",
     "endings": ["Pour it into a cup and add the steamed milk — naïvely, or with care.", "Walk.",
                 "Then the dog barks at the mailman for quite a while, every single day of the week.", ""],
     "label": "0"},
    {"ctx": " ".join(["The crowd cheers as the runners line up at the start of the race."] * 12),
     "endings": ["The gun fires and they sprint away.", "A cat sleeps.", "They sit down to eat soup together quietly.",
                 "Nothing"], "label": 1},
    {"ctx": "Two women are seen standing on a stage holding violins. They",
     "endings": ["begin playing.", "play the violins while the audience watches and claps along happily.",
                 "put the violins down and leave the stage.", "eat"], "label": 2},
]


def write_hellaswag(data_dir: Path, items=HELLASWAG_ITEMS) -> Path:
    """`DATA_DIR/hellaswag/hellaswag_val.jsonl` holding `items`, as the eval task and training read it."""
    path = Path(data_dir) / "hellaswag" / "hellaswag_val.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def pod_env(data_dir, cache_dir) -> dict[str, str]:
    """The environment of a trainer process of a pod on this machine: 2 CPU devices per process,
    gloo collectives, the shared data and a cache of its own."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        GPT2_JAX_DATA_DIR=str(data_dir), GPT2_JAX_CACHE_DIR=str(cache_dir),
    )
    return env


class KeyValueStore:
    """A stand-in for JAX's distributed client: the key-value store calls that the pod's agreements
    make (the real store also refuses a second write of a key unless told to overwrite)."""

    def __init__(self):
        self.data: dict[str, str] = {}
        self.lock = threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            if not allow_overwrite and key in self.data:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]

    def blocking_key_value_get(self, key, timeout_ms):
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            with self.lock:
                if key in self.data:
                    return self.data[key]
            time.sleep(0.01)
        raise TimeoutError(key)
