import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hf_logits, random_hf_gpt2

from gpt2_jax import config, convert, model
from gpt2_jax.model import GPT2

SHAPES = {
    # odd sizes: 5 heads of 16, 3 layers, prime vocabulary, so a swapped axis fails loudly
    "odd": dict(vocab_size=101, n_positions=37, n_embd=80, n_layer=3, n_head=5),
    "gpt2-like": dict(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4),
}


def _apply(cfg, **kw):
    """A jitted forward pass (eager op-by-op dispatch is slow on CPU)."""
    return jax.jit(lambda variables, *args: GPT2(cfg).apply(variables, *args, **kw))


def _tokens(cfg, B=3, T=None, seed=0):
    T = T or cfg.n_ctx
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (B, T)).astype(np.int32)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_hf(tmp_path, shape):
    hf = random_hf_gpt2(tmp_path, **SHAPES[shape])
    cfg, params = convert.load_hf(tmp_path)
    x = _tokens(cfg)
    ours = np.asarray(_apply(cfg)({"params": params}, x))
    ref = hf_logits(hf, x)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))  # greedy next tokens


def test_save_hf_round_trip(tmp_path):
    from transformers import GPT2LMHeadModel

    cfg = config.get_model_config("tiny", vocab_size=101, n_ctx=32, n_embd=80, n_head=5, n_layer=2)
    params = model.init_params(cfg, jax.random.key(1))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    convert.save_hf(cfg, params, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = _tokens(cfg)
    ours = np.asarray(_apply(cfg)({"params": params}, x))
    assert np.abs(ours - hf_logits(hf, x)).max() <= 1e-4
    cfg2, params2 = convert.load_hf(tmp_path / "hf")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_padded_vocab_gives_same_logits(tmp_path):
    random_hf_gpt2(tmp_path, **SHAPES["odd"])
    cfg, params = convert.load_hf(tmp_path)
    x = _tokens(cfg)
    ref = _apply(cfg)({"params": params}, x)
    pcfg = config.replace(cfg, pad_vocab_multiple=128)
    pparams = dict(params, wte=np.concatenate([params["wte"], np.ones((128 - 101, cfg.n_embd), np.float32)]))
    out = _apply(pcfg)({"params": pparams}, x)
    assert out.shape == (3, cfg.n_ctx, 101)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _loss(cfg):
    def f(params, x):
        logits = GPT2(cfg).apply({"params": params}, x[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, x[:, 1:, None], -1).mean()

    return f


def test_causality_position_embedding_gradients():
    cfg = config.get_model_config("tiny", vocab_size=101, n_ctx=16, n_embd=48, n_head=3, n_layer=2)
    params = model.init_params(cfg, jax.random.key(0))
    x = jnp.asarray(_tokens(cfg, B=2, T=16))
    for t in (0, 5, 14):
        def loss_at_t(p):
            logits = GPT2(cfg).apply({"params": p}, x)
            return jax.nn.log_softmax(logits)[:, t].sum()

        g = jax.jit(jax.grad(loss_at_t))(params)["wpe"]
        assert np.all(np.asarray(g[t + 1:]) == 0.0), f"position {t} depends on the future"
        assert np.abs(np.asarray(g[: t + 1])).sum() > 0


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "dots"), (True, "dots_no_batch")])
def test_scan_and_remat_identical(scan, remat):
    cfg = config.get_model_config("tiny", vocab_size=101, n_ctx=24, n_embd=80, n_head=5, n_layer=3)
    params = model.init_params(cfg, jax.random.key(0))
    x = jnp.asarray(_tokens(cfg, B=2, T=24))
    cfg2 = config.replace(cfg, scan_layers=scan, remat_policy=remat)
    params2 = model.stack_layers(params, cfg.n_layer) if scan else params
    np.testing.assert_allclose(
        _apply(cfg2)({"params": params2}, x), _apply(cfg)({"params": params}, x), rtol=1e-5, atol=1e-5
    )
    g1 = jax.jit(jax.grad(_loss(cfg)))(params, x)
    g2 = jax.jit(jax.grad(_loss(cfg2)))(params2, x)
    if scan:
        g2 = model.unstack_layers(g2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g2, g1)


def test_scanned_init_has_layer_axis_names():
    cfg = config.get_model_config("tiny", scan_layers=True)
    axes = model.logical_axes(cfg)
    assert tuple(axes["h"]["attn"]["c_attn"]["kernel"]) == ("layers", "embed", "qkv", "heads", "kv")
    assert tuple(axes["wte"]) == ("vocab", "embed")


def test_init_statistics():
    """OpenAI's released model.py: wte std 0.02, wpe 0.01, other weights 0.02, biases 0, LayerNorm
    1/0; the paper: residual projections scaled by 1/sqrt(2 * n_layer). With 65,536+ draws per
    tensor the sample std is within 1% of its target, so 0.01 and 0.02 cannot be confused."""
    cfg = config.get_model_config("tiny", vocab_size=1000, n_layer=3)
    p = model.init_params(cfg, jax.random.key(0))
    std = lambda a: float(jnp.std(a))
    assert abs(std(p["wte"]) - 0.02) < 2e-4 and abs(float(jnp.mean(p["wte"]))) < 2e-4
    assert abs(std(p["wpe"]) - 0.01) < 1e-4 and abs(float(jnp.mean(p["wpe"]))) < 1e-4
    expect = 0.02 / np.sqrt(2 * cfg.n_layer)
    for i in range(cfg.n_layer):
        h = p[f"h_{i}"]
        assert abs(std(h["attn"]["c_attn"]["kernel"]) - 0.02) < 2e-4
        assert abs(std(h["mlp"]["c_fc"]["kernel"]) - 0.02) < 2e-4
        assert abs(std(h["mlp"]["c_proj"]["kernel"]) - expect) < expect / 100
        assert abs(std(h["attn"]["c_proj"]["kernel"]) - expect) < expect / 100
        for a, b in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            assert float(jnp.abs(h[a][b]["bias"]).max()) == 0.0
        for ln in ("ln_1", "ln_2"):
            assert np.all(np.asarray(h[ln]["scale"]) == 1.0) and np.all(np.asarray(h[ln]["bias"]) == 0.0)
    assert np.all(np.asarray(p["ln_f"]["scale"]) == 1.0) and np.all(np.asarray(p["ln_f"]["bias"]) == 0.0)


def test_input_mask_ignores_padding():
    cfg = config.get_model_config("tiny", vocab_size=101, n_ctx=16, n_embd=48, n_head=3, n_layer=2)
    params = model.init_params(cfg, jax.random.key(0))
    x = _tokens(cfg, B=1, T=10)
    ref = _apply(cfg)({"params": params}, x)
    # left-pad by 3 with garbage, per-row positions keep the real tokens at 0..9
    xp = np.concatenate([np.full((1, 3), 7, np.int32), x], 1)
    pos = np.concatenate([np.zeros((1, 3), np.int32), np.arange(10, dtype=np.int32)[None]], 1)
    mask = np.concatenate([np.zeros((1, 3)), np.ones((1, 10))], 1).astype(bool)
    out = _apply(cfg)({"params": params}, xp, pos, mask)
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_dropout_only_when_not_deterministic():
    cfg = config.get_model_config("tiny", vocab_size=101, n_ctx=16, n_embd=48, n_head=3, n_layer=2)
    params = model.init_params(cfg, jax.random.key(0))
    x = _tokens(cfg, B=2, T=16)
    drop = jax.jit(lambda p, k: GPT2(cfg).apply({"params": p}, x, deterministic=False, rngs={"dropout": k}))
    a, b = drop(params, jax.random.key(1)), drop(params, jax.random.key(2))
    c = _apply(cfg)({"params": params}, x)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    # attention dropout off -> the fused attention path; still stochastic through resid/embd dropout
    cfg0 = dataclasses.replace(cfg, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    d = jax.jit(lambda p, k: GPT2(cfg0).apply({"params": p}, x, deterministic=False, rngs={"dropout": k}))(
        params, jax.random.key(1))
    np.testing.assert_allclose(d, c, atol=1e-5)


def test_bfloat16_compute_float32_logits():
    cfg = config.get_model_config("tiny", vocab_size=101, n_ctx=16, n_embd=48, n_head=3, n_layer=2)
    params = model.init_params(cfg, jax.random.key(0))
    x = _tokens(cfg, B=2, T=16)
    out = _apply(config.replace(cfg, dtype="bfloat16"))({"params": params}, x)
    ref = _apply(cfg)({"params": params}, x)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.1


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decode_matches_full_forward(scan):
    cfg = config.get_model_config("tiny", vocab_size=101, n_ctx=16, n_embd=48, n_head=3, n_layer=2, scan_layers=scan)
    params = model.init_params(cfg, jax.random.key(0))
    x = _tokens(cfg, B=2, T=12)
    full = _apply(cfg)({"params": params}, x)
    cache = model.init_cache(cfg, 2, 16)
    step = _apply(cfg, decode=True, mutable=["cache"])
    logits, v = step({"params": params, "cache": cache}, x[:, :5])
    outs = [logits]
    for t in range(5, 12):
        logits, v = step({"params": params, **v}, x[:, t:t + 1])
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-4)
