import subprocess
import sys

import pytest

from gpt2_jax import config, model
from gpt2_jax.config import ConfigError, ModelConfig, get_model_config

# Parameter counts of HF's GPT2LMHeadModel for OpenAI's four released sizes.
HF_PARAM_COUNTS = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}


@pytest.mark.parametrize("size", sorted(HF_PARAM_COUNTS))
def test_param_counts_match_hf_without_allocating(size):
    cfg = get_model_config(size)
    assert model.count_params(cfg) == HF_PARAM_COUNTS[size]
    # Padding the vocabulary adds rows but the reported count stays the model's.
    assert model.count_params(config.replace(cfg, pad_vocab_multiple=128)) == HF_PARAM_COUNTS[size]


def test_presets_shapes():
    for size, (L, D, N) in {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20),
                            "xl": (48, 1600, 25)}.items():
        c = get_model_config(size)
        assert (c.n_layer, c.n_embd, c.n_head, c.n_ctx, c.vocab_size) == (L, D, N, 1024, 50257)
        assert (c.embd_pdrop, c.attn_pdrop, c.resid_pdrop, c.layer_norm_epsilon) == (0.1, 0.1, 0.1, 1e-5)
    tiny = get_model_config("tiny")
    assert 10e6 <= model.count_params(tiny) <= 20e6 and tiny.n_ctx < 1024


def test_padded_vocab():
    assert get_model_config("small", pad_vocab_multiple=128).padded_vocab_size == 50304
    assert get_model_config("small").padded_vocab_size == 50257


def test_frozen_and_json_round_trip():
    c = get_model_config("tiny", vocab_size=97)
    with pytest.raises(Exception):
        c.n_layer = 3
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_unknown_size_lists_valid_sizes():
    with pytest.raises(ConfigError, match="valid sizes: tiny, small, medium, large, xl"):
        get_model_config("huge")


def test_overrides_are_type_checked():
    assert get_model_config("tiny", **config.parse_overrides(["n_layer=3", "--scan_layers=true"])).n_layer == 3
    with pytest.raises(ConfigError, match="valid keys: vocab_size"):
        get_model_config("tiny", n_layers=3)
    with pytest.raises(ConfigError, match="n_layer expects int"):
        get_model_config("tiny", n_layer="three")
    with pytest.raises(ConfigError, match="n_embd=250 is not divisible by n_head=4"):
        get_model_config("tiny", n_embd=250)
    with pytest.raises(ConfigError, match="remat_policy"):
        get_model_config("tiny", remat_policy="sometimes")


def test_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gpt2_jax.config", "small"], capture_output=True, text=True)
    assert ok.returncode == 0 and "124,439,808" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gpt2_jax.config", "huge"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "valid sizes: tiny, small, medium, large, xl" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "gpt2_jax.config", "tiny", "n_head=x"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "n_head expects int" in bad.stderr
