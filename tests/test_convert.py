import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import random_hf_gpt2

from gpt2_jax import checkpoint, config, convert, model, weights


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt2_jax.convert", *map(str, args)], capture_output=True, text=True)


def _one_line_error(proc):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_layouts_without_prefix_and_ignored_buffers(tmp_path):
    from safetensors.numpy import load_file, save_file

    random_hf_gpt2(tmp_path / "a")
    state = load_file(tmp_path / "a" / "model.safetensors")
    # OpenAI's uploaded checkpoints: no "transformer." prefix, plus the causal-mask buffers.
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith("lm_head")}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    (tmp_path / "b").mkdir()
    save_file(bare, tmp_path / "b" / "model.safetensors")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    (c1, p1), (c2, p2) = convert.load_hf(tmp_path / "a"), convert.load_hf(tmp_path / "b")
    assert c1 == c2
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_pytorch_bin_is_read_with_weights_only(tmp_path):
    import torch

    hf = random_hf_gpt2(tmp_path / "a")
    (tmp_path / "b").mkdir()
    torch.save(hf.state_dict(), tmp_path / "b" / "pytorch_model.bin")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    jax.tree.map(np.testing.assert_array_equal, convert.load_hf(tmp_path / "a")[1], convert.load_hf(tmp_path / "b")[1])


def test_malicious_pickle_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    random_hf_gpt2(tmp_path / "a")
    (tmp_path / "b").mkdir()
    with open(tmp_path / "b" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(convert.ConversionError, match="cannot be read safely"):
        convert.load_hf(tmp_path / "b")


def test_truncated_safetensors(tmp_path):
    random_hf_gpt2(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(convert.ConversionError, match="truncated"):
        convert.load_hf(tmp_path)


def test_cli_from_hf_to_hf_round_trip(tmp_path):
    random_hf_gpt2(tmp_path / "hf")
    assert _cli("inspect", tmp_path / "hf").returncode == 0
    proc = _cli("from-hf", tmp_path / "hf", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    cfg, params = weights.load(tmp_path / "ckpt")
    assert _cli("to-hf", tmp_path / "ckpt", tmp_path / "hf2").returncode == 0
    jax.tree.map(np.testing.assert_array_equal, convert.load_hf(tmp_path / "hf2")[1], convert.load_hf(tmp_path / "hf")[1])
    assert cfg == convert.load_hf(tmp_path / "hf")[0]


def test_cli_errors_are_one_line(tmp_path):
    assert "is not a GPT-2 checkpoint: no config.json" in _one_line_error(_cli("inspect", tmp_path))
    assert "is not a directory" in _one_line_error(_cli("inspect", tmp_path / "missing"))
    random_hf_gpt2(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["n_embd"] = 96  # weights stay 80 wide
    cfg["n_head"] = 6
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    err = _one_line_error(_cli("inspect", tmp_path / "hf"))
    assert "has shape" in err and "config.json implies" in err
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert "no model.safetensors or pytorch_model.bin" in _one_line_error(_cli("inspect", tmp_path / "hf"))
    assert "not a gpt2_jax checkpoint" in _one_line_error(_cli("to-hf", tmp_path, tmp_path / "o"))


def test_save_params_refuses_existing(tmp_path):
    cfg = config.get_model_config("tiny", vocab_size=11, n_layer=1, n_embd=16, n_head=2, n_ctx=8)
    params = model.init_params(cfg, jax.random.key(0))
    weights.save_params(tmp_path / "c", cfg, params)
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        weights.save_params(tmp_path / "c", cfg, params)
