"""Optimizer: weight-decay mask by name, learning-rate schedule, decoupled decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import optim
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import abstract_params
from flax import linen as nn

CFG = dict(vocab_size=101, n_ctx=16, n_embd=48, n_layer=2, n_head=3)


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_by_name(scan):
    params = nn.meta.unbox(abstract_params(ModelConfig(**CFG, scan_layers=scan)))
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): (m, x.ndim) for (p, m), x in zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params))}
    block = "['h']" if scan else "['h_1']"
    assert flat["['wte']"][0] and flat["['wpe']"][0]
    assert flat[f"{block}['attn']['c_attn']['kernel']"][0]
    assert flat[f"{block}['mlp']['c_proj']['kernel']"][0]
    assert not flat[f"{block}['attn']['c_attn']['bias']"][0]
    assert not flat[f"{block}['ln_1']['scale']"][0]
    assert not flat["['ln_f']['bias']"][0]
    if scan:  # a LayerNorm scale under scan is 2-D and still must not decay
        assert flat["['h']['ln_2']['scale']"] == (False, 2)
    n_decay = sum(m for m, _ in flat.values())
    assert n_decay == 2 + 4 * (1 if scan else CFG["n_layer"])  # wte, wpe + four kernels per block


def test_decay_mask_refuses_unknown_names():
    with pytest.raises(ValueError, match="no weight-decay rule"):
        optim.decay_mask({"block": {"gamma": jnp.ones(3)}})


def test_lr_schedule():
    s = optim.lr_schedule(1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = np.array([float(s(i)) for i in range(120)])
    np.testing.assert_allclose(lrs[0], 1e-4, rtol=1e-6)  # (0 + 1) / 10 of the peak: no wasted step
    np.testing.assert_allclose(lrs[9], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[10], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[60], 0.55e-3, rtol=1e-5)  # halfway through the cosine
    np.testing.assert_allclose(lrs[110:], 1e-4, rtol=1e-5)  # 10% of the peak, then flat
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[10:111]) < 0)


def test_adamw_decays_only_masked_leaves():
    params = {"wte": jnp.full((4, 3), 2.0), "ln_f": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)}}
    tx = optim.make_optimizer(lambda _: 0.1, weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["wte"], -0.1 * 0.5 * 2.0, rtol=1e-6)  # decoupled: -lr * wd * p
    np.testing.assert_array_equal(updates["ln_f"]["scale"], 0.0)
    np.testing.assert_array_equal(updates["ln_f"]["bias"], 0.0)


def test_clipping_at_global_norm_one():
    # Grads [1e6, 0] then [1, 0]: clipped, both become [1, 0] and Adam's second update is exactly -lr;
    # unclipped, the first gradient dominates the moments and the update differs.
    params = {"wte": jnp.zeros((2,))}

    def second_update(clip):
        tx = optim.make_optimizer(lambda _: 1.0, weight_decay=0.0, grad_clip=clip)
        st = tx.init(params)
        _, st = tx.update({"wte": jnp.array([1e6, 0.0])}, st, params)
        u, _ = tx.update({"wte": jnp.array([1.0, 0.0])}, st, params)
        return float(u["wte"][0])

    np.testing.assert_allclose(second_update(1.0), -1.0, rtol=1e-5)
    assert abs(second_update(0.0) + 1.0) > 0.1


# ----------------------------------------------------------------------------- Muon


def numpy_newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """The records' iteration written out plainly for one matrix, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (2, 5, 5)])
def test_newton_schulz_against_numpy(shape):
    g = np.random.default_rng(0).normal(size=shape)
    got = np.asarray(optim.newton_schulz(jnp.asarray(g, jnp.float32), dtype=jnp.float32))
    want = np.stack([numpy_newton_schulz(m) for m in g.reshape((-1,) + shape[-2:])]).reshape(shape)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Nearly orthogonal: the singular values land in about [0.7, 1.2] whatever G's were.
    sv = np.linalg.svd(got.reshape((-1,) + shape[-2:]), compute_uv=False)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    # In bfloat16 (the records' dtype; 8 mantissa bits through 15 dependent matmuls) the result is
    # as orthogonal, and within 10% of the float32 iteration as a whole (6% here).
    bf16 = np.asarray(optim.newton_schulz(jnp.asarray(g, jnp.float32), dtype=jnp.bfloat16), np.float32)
    sv = np.linalg.svd(bf16.reshape((-1,) + shape[-2:]), compute_uv=False)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    assert np.linalg.norm(bf16 - got) / np.linalg.norm(got) < 0.1


def _muon_config(scan):
    return ModelConfig(vocab_size=101, n_ctx=16, n_embd=20, n_layer=2, n_head=5, scan_layers=scan)


def _random_tree(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


@pytest.mark.parametrize("scan", [False, True])
def test_muon_labels_take_the_blocks_matrices_only(scan):
    params = nn.meta.unbox(abstract_params(_muon_config(scan)))
    labels = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(optim.muon_labels(params))}
    muon = sorted(k for k, v in labels.items() if v == "muon")
    blocks = ["['h']"] if scan else [f"['h_{i}']" for i in range(2)]
    kernels = ["['attn']['c_attn']['kernel']", "['attn']['c_proj']['kernel']", "['mlp']['c_fc']['kernel']", "['mlp']['c_proj']['kernel']"]
    assert muon == sorted(b + k for b in blocks for k in kernels)
    assert labels["['wte']"] == labels["['wpe']"] == labels["['ln_f']['scale']"] == "adamw"
    with pytest.raises(ValueError, match="no known hidden matrix"):
        optim.muon_labels({"h_0": {"attn": {"c_q": {"kernel": jnp.ones((3, 3))}}}})


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_muon_update_against_a_plain_reference(scan):
    """Two steps of the whole optimizer against numpy: clipping, Nesterov momentum, c_attn's q, k, v
    orthogonalized one by one (and every layer of a scanned kernel), the max(1, out/in)^0.5 scale;
    AdamW with the decay-by-name mask for the rest, as the adamw optimizer alone would do it."""
    import optax

    cfg = _muon_config(scan)
    params = _random_tree(nn.meta.unbox(abstract_params(cfg)), 0)
    grads = [_random_tree(params, 1), _random_tree(params, 2)]
    tx = optim.make_muon_optimizer(lambda s: 0.02 * (s + 1), lambda s: 0.003, momentum=0.9, ns_dtype=jnp.float32,
                                   weight_decay=0.1, grad_clip=1.0)
    adamw = optim.make_optimizer(lambda s: 0.003, weight_decay=0.1, grad_clip=1.0)
    state, a_state = tx.init(params), adamw.init(params)
    momentum = jax.tree.map(np.zeros_like, params)
    D, N, H, F = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_inner
    for t, g in enumerate(grads):
        updates, state = jax.jit(tx.update)(g, state, params)
        a_updates, a_state = jax.jit(adamw.update)(g, a_state, params)
        clip = min(1.0, 1.0 / float(optax_global_norm(g)))
        labels = optim.muon_labels(params)
        for (path, u), label, au, gl, mom in zip(
            jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(labels), jax.tree.leaves(a_updates),
            jax.tree.leaves(g), jax.tree.leaves(momentum),
        ):
            name = jax.tree_util.keystr(path)
            if label == "adamw":
                np.testing.assert_array_equal(np.asarray(u), np.asarray(au), err_msg=name)
                continue
            gl = np.asarray(gl, np.float64) * clip
            mom *= 0.9
            mom += gl
            nesterov = gl + 0.9 * mom
            layers = nesterov if scan else nesterov[None]
            want = np.zeros_like(layers)
            for i, w in enumerate(layers):
                if "c_attn" in name:  # [D, 3, N, H]: q, k, v each [D, N*H]
                    for j in range(3):
                        want[i][:, j] = numpy_newton_schulz(w[:, j].reshape(D, N * H)).reshape(D, N, H)
                elif "attn']['c_proj" in name:  # [N, H, D]
                    want[i] = numpy_newton_schulz(w.reshape(N * H, D)).reshape(N, H, D)
                elif "c_fc" in name:  # [D, F]: fan-out 4x the fan-in, scaled by 2
                    want[i] = numpy_newton_schulz(w) * (F / D) ** 0.5
                else:
                    want[i] = numpy_newton_schulz(w)
            want = -0.02 * (t + 1) * (want if scan else want[0])
            np.testing.assert_allclose(np.asarray(u), want, atol=2e-5, err_msg=name)
        params = jax.jit(optax.apply_updates)(params, updates)


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_adamw_run_is_unchanged():
    """optimizer=adamw builds exactly the optimizer and schedule it did before Muon existed: this
    copy of the old code path and `train.plan.make_optimizer` give bit-identical updates."""
    import optax

    from gpt2_jax import train
    from gpt2_jax.train.plan import make_optimizer

    tcfg, mcfg = train.resolve_config(
        {"size": "tiny", "vocab_size": 101, "n_ctx": 16, "n_layer": 1, "n_embd": 32, "n_head": 2, "steps": 30, "warmup_steps": 3}
    )
    schedule, tx = make_optimizer(tcfg, mcfg)
    old_schedule = optim.lr_schedule(optim.PEAK_LR["tiny"], 3, 30, 0.1)
    old = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(old_schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=optim.decay_mask),
    )
    params = _random_tree(nn.meta.unbox(abstract_params(mcfg)), 0)
    state, old_state = tx.init(params), old.init(params)
    for seed in range(3):  # gradient norms about 0.1, 10 and 1000: clipped and not
        g = _random_tree(params, seed + 1)
        g = jax.tree.map(lambda x: x * np.float32(10.0 ** (2 * seed - 2)), g)
        u, state = jax.jit(tx.update)(g, state, params)
        v, old_state = jax.jit(old.update)(g, old_state, params)
        jax.tree.map(np.testing.assert_array_equal, u, v)
        params = jax.jit(optax.apply_updates)(params, u)
    assert [float(schedule(s)) for s in range(31)] == [float(old_schedule(s)) for s in range(31)]


def test_warmdown_schedule():
    s = optim.warmdown_schedule(0.02, warmup_steps=0, total_steps=5100, warmdown_frac=1450 / 5100)
    np.testing.assert_allclose([float(s(x)) for x in (0, 3649, 3650, 4375, 5099, 5100)],
                               [0.02, 0.02, 0.02, 0.01, 0.02 / 1450, 0.0], rtol=1e-5)
    w = optim.warmdown_schedule(1.0, warmup_steps=4, total_steps=20, warmdown_frac=0.5)
    np.testing.assert_allclose([float(w(x)) for x in (0, 3, 4, 10, 15)], [0.25, 1.0, 1.0, 1.0, 0.5], rtol=1e-6)
