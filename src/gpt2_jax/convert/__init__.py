"""Hugging Face GPT-2 weights in and out: `load_hf` / `save_hf` (the command line is `cli`).

HF's GPT-2 stores OpenAI's Conv1D weights as [in, out], the same layout as our kernels, so the
only changes are reshapes exposing the head axis of the attention weights. Reading safetensors
needs neither torch nor TensorFlow; `pytorch_model.bin` is read with `weights_only=True` when
torch is importable (never unpickled arbitrarily). Loading any model, HF or not, goes through
`gpt2_jax.weights`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gpt2_jax import files, storage
from gpt2_jax.config import ConfigError, ModelConfig
from gpt2_jax.model import unstack_layers


class ConversionError(ValueError):
    """A directory that is not a usable GPT-2 checkpoint."""


_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a .safetensors file into numpy arrays with the `safetensors` library (which checks the
    header and every tensor's extent against the file)."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError for a damaged header or a file cut short
        raise ConversionError(f"{path}: not a complete safetensors file (truncated download?): {' '.join(str(e).split())}") from e


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path} needs torch to read; install torch or convert it to model.safetensors") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or malicious files
        raise ConversionError(f"{path}: cannot be read safely as a state dict ({type(e).__name__})") from e
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def _read_state(path: Path) -> dict[str, np.ndarray]:
    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for name in files:
            if "/" in name or name.startswith("."):
                raise ConversionError(f"{index}: refusing shard file name {name!r}")
            state.update(read_safetensors(path / name))
        return state
    if (path / "pytorch_model.bin").exists():
        return _read_torch_bin(path / "pytorch_model.bin")
    raise ConversionError(f"{path} is not a GPT-2 checkpoint: no model.safetensors or pytorch_model.bin")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A `ModelConfig` from an HF GPT-2 `config.json` dict: every field type- and range-checked (by
    ModelConfig), variants we do not implement refused."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConversionError(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    try:
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"],
            n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_embd=hf["n_embd"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            embd_pdrop=hf.get("embd_pdrop", 0.1),
            attn_pdrop=hf.get("attn_pdrop", 0.1),
            resid_pdrop=hf.get("resid_pdrop", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise ConversionError(f"config.json has no {e.args[0]!r}") from None
    except ConfigError as e:
        raise ConversionError(f"config.json does not describe a valid GPT-2: {e}") from None
    if hf.get("n_inner") not in (None, 4 * cfg.n_embd):
        raise ConversionError(f"n_inner={hf['n_inner']} is not 4 * n_embd; only GPT-2's MLP width is supported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"activation_function {hf['activation_function']!r} is not GPT-2's tanh GELU")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ConversionError("attention scaling differs from GPT-2's 1/sqrt(head_dim)")
    return cfg


def _expect(state: dict[str, np.ndarray], key: str, shape: tuple[int, ...], where: Path) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"{where}: weight {key} is missing")
    x = state[key]
    if tuple(x.shape) != shape:
        raise ConversionError(f"{where}: weight {key} has shape {tuple(x.shape)}, config.json implies {shape}")
    if x.dtype.name not in ("float32", "float16", "bfloat16"):
        raise ConversionError(f"{where}: tensor {key} is stored as {x.dtype}; weights must be float32, float16 or bfloat16")
    return np.asarray(x, dtype=np.float32)


def load_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """Load an HF GPT-2 directory (config.json + weights) as a `ModelConfig` and float32 params.

    Accepts the key layouts of all released sizes, with or without the `transformer.` prefix.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory")
    if not (path / "config.json").exists():
        raise ConversionError(f"{path} is not a GPT-2 checkpoint: no config.json")
    try:
        hf = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path / 'config.json'} is not valid JSON") from e
    if not isinstance(hf, dict) or not all(k in hf for k in ("n_embd", "n_layer", "n_head", "vocab_size")):
        raise ConversionError(f"{path / 'config.json'} is not a GPT-2 config (needs n_embd, n_layer, n_head, vocab_size)")
    cfg = config_from_hf(hf)
    state = _read_state(path)
    state = {k.removeprefix("transformer."): v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    D, N, H, F = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_inner

    def get(key, shape):
        return _expect(state, key, shape, path)

    wte = get("wte.weight", (cfg.vocab_size, D))
    if cfg.padded_vocab_size != cfg.vocab_size:
        wte = np.concatenate([wte, np.zeros((cfg.padded_vocab_size - cfg.vocab_size, D), np.float32)])
    params: dict[str, Any] = {
        "wte": wte,
        "wpe": get("wpe.weight", (cfg.n_ctx, D)),
        "ln_f": {"scale": get("ln_f.weight", (D,)), "bias": get("ln_f.bias", (D,))},
    }
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        params[f"h_{i}"] = {
            "ln_1": {"scale": get(p + "ln_1.weight", (D,)), "bias": get(p + "ln_1.bias", (D,))},
            "ln_2": {"scale": get(p + "ln_2.weight", (D,)), "bias": get(p + "ln_2.bias", (D,))},
            "attn": {
                "c_attn": {
                    "kernel": get(p + "attn.c_attn.weight", (D, 3 * D)).reshape(D, 3, N, H),
                    "bias": get(p + "attn.c_attn.bias", (3 * D,)).reshape(3, N, H),
                },
                "c_proj": {
                    "kernel": get(p + "attn.c_proj.weight", (D, D)).reshape(N, H, D),
                    "bias": get(p + "attn.c_proj.bias", (D,)),
                },
            },
            "mlp": {
                "c_fc": {"kernel": get(p + "mlp.c_fc.weight", (D, F)), "bias": get(p + "mlp.c_fc.bias", (F,))},
                "c_proj": {"kernel": get(p + "mlp.c_proj.weight", (F, D)), "bias": get(p + "mlp.c_proj.bias", (D,))},
            },
        }
    extra = sorted(k for k in state if k.startswith("h.") and int(k.split(".")[1]) >= cfg.n_layer)
    if extra:
        raise ConversionError(f"{path}: weights for more layers than n_layer={cfg.n_layer} (e.g. {extra[0]})")
    return cfg, params


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` that `transformers.GPT2LMHeadModel.from_pretrained` expects for `cfg`."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_ctx,
        "n_ctx": cfg.n_ctx,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "embd_pdrop": cfg.embd_pdrop,
        "attn_pdrop": cfg.attn_pdrop,
        "resid_pdrop": cfg.resid_pdrop,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
    }


def save_hf(config: ModelConfig, params: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write params as an HF GPT-2 directory (config.json + model.safetensors), each file atomically."""
    if "h" in params:
        params = unstack_layers(params)
    D = config.n_embd
    arr = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))  # noqa: E731
    state = {
        "transformer.wte.weight": arr(params["wte"])[: config.vocab_size],
        "transformer.wpe.weight": arr(params["wpe"]),
        "transformer.ln_f.weight": arr(params["ln_f"]["scale"]),
        "transformer.ln_f.bias": arr(params["ln_f"]["bias"]),
    }
    for i in range(config.n_layer):
        h, p = params[f"h_{i}"], f"transformer.h.{i}."
        state.update({
            p + "ln_1.weight": arr(h["ln_1"]["scale"]), p + "ln_1.bias": arr(h["ln_1"]["bias"]),
            p + "ln_2.weight": arr(h["ln_2"]["scale"]), p + "ln_2.bias": arr(h["ln_2"]["bias"]),
            p + "attn.c_attn.weight": arr(h["attn"]["c_attn"]["kernel"]).reshape(D, 3 * D),
            p + "attn.c_attn.bias": arr(h["attn"]["c_attn"]["bias"]).reshape(3 * D),
            p + "attn.c_proj.weight": arr(h["attn"]["c_proj"]["kernel"]).reshape(D, D),
            p + "attn.c_proj.bias": arr(h["attn"]["c_proj"]["bias"]),
            p + "mlp.c_fc.weight": arr(h["mlp"]["c_fc"]["kernel"]),
            p + "mlp.c_fc.bias": arr(h["mlp"]["c_fc"]["bias"]),
            p + "mlp.c_proj.weight": arr(h["mlp"]["c_proj"]["kernel"]),
            p + "mlp.c_proj.bias": arr(h["mlp"]["c_proj"]["bias"]),
        })
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    files.write_text(out / "config.json", json.dumps(hf_config_dict(config), indent=2))
    return out
