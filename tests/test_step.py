"""Train and eval steps: loss against HF, gradient accumulation, dropout keys, masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from gpt2_jax import optim
from gpt2_jax.config import ModelConfig
from gpt2_jax.convert import load_hf
from gpt2_jax.model import GPT2
from gpt2_jax.step import TrainState, eval_step, init_train_state, train_step
from helpers import random_hf_gpt2

CFG = ModelConfig(vocab_size=101, n_ctx=32, n_embd=60, n_layer=2, n_head=3, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def _batch(rows, seq, seed=0, vocab=101):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)}


def _step_fn(cfg, grad_accum, lr=1e-2):
    sched = optim.lr_schedule(lr, 0, 10)
    tx = optim.make_optimizer(sched)
    fn = functools.partial(train_step, model=GPT2(cfg), tx=tx, schedule=sched, grad_accum=grad_accum)
    return tx, jax.jit(fn)


def test_loss_matches_hf(tmp_path):
    hf = random_hf_gpt2(tmp_path, vocab_size=101, n_positions=32, n_embd=60, n_layer=2, n_head=3)
    cfg, params = load_hf(tmp_path)
    batch = _batch(4, 16)
    mask = np.ones((4, 16), np.float32)
    mask[:, :5] = 0.0  # e.g. a prompt that is not scored
    out = jax.jit(functools.partial(eval_step, model=GPT2(cfg)))(params, {**batch, "mask": mask})
    with torch.no_grad():
        logits = hf(torch.as_tensor(batch["tokens"][:, :-1], dtype=torch.long)).logits
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 101), torch.as_tensor(batch["tokens"][:, 1:], dtype=torch.long).reshape(-1), reduction="none"
        ).numpy().reshape(4, 16)
    np.testing.assert_allclose(float(out["weight"]), 4 * 11)
    np.testing.assert_allclose(float(out["loss_sum"]) / 44, (nll * mask).sum() / 44, rtol=1e-4)


def test_grad_accumulation_equals_one_big_batch():
    k, b = 4, 2
    batch = _batch(k * b, 16, seed=1)
    # Rows weigh differently, so a mean of per-micro-batch means would be wrong.
    batch["mask"] = (np.random.default_rng(2).random((k * b, 16)) < np.linspace(0.2, 1.0, k * b)[:, None]).astype(np.float32)
    # An "optimizer" that keeps the gradient as its state and leaves the params alone (Adam's
    # sign-like first step would amplify float noise in gradients that are zero in exact arithmetic).
    keep = optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g)
    )
    model = GPT2(CFG)
    one = jax.jit(functools.partial(train_step, model=model, tx=keep, schedule=lambda _: 1.0, grad_accum=1))
    acc = jax.jit(functools.partial(train_step, model=model, tx=keep, schedule=lambda _: 1.0, grad_accum=k))
    state = init_train_state(CFG, keep, jax.random.key(0))
    s1, m1 = one(state, batch)
    s2, m2 = acc(state, batch)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for g_acc, g_one in zip(jax.tree.leaves(s2.opt_state), jax.tree.leaves(s1.opt_state)):
        np.testing.assert_allclose(g_acc, g_one, rtol=1e-5, atol=1e-5 * float(jnp.abs(g_one).max()))
    assert int(s2.step) == 1 and int(m2["tokens"]) == k * b * 16


def test_metrics_dropout_keys_and_loss_decreases():
    cfg = ModelConfig(**{**CFG.to_dict(), "embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1})
    tx, step = _step_fn(cfg, 2)
    state = init_train_state(cfg, tx, jax.random.key(0))
    batch = _batch(4, 16, seed=3)
    a = float(step(state, batch)[1]["loss"])
    b = float(step(state, batch)[1]["loss"])
    c = float(step(state.replace(step=jnp.asarray(7, jnp.int32)), batch)[1]["loss"])
    assert a == b  # same state, same dropout masks (a resumed run replays exactly)
    assert a != c  # the step number changes the masks
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert set(m) == {"loss", "grad_norm", "lr", "tokens"}
    assert losses[-1] < losses[0] - 0.5
    np.testing.assert_allclose(losses[0], np.log(101), rtol=0.05)  # near-uniform at init
    assert m["loss"].dtype == jnp.float32 and int(state.step) == 5


def test_train_state_fields():
    tx, _ = _step_fn(CFG, 1)
    state = init_train_state(CFG, tx, jax.random.key(0))
    assert isinstance(state, TrainState)
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert state.rng.dtype == jnp.uint32
    assert jax.tree.structure(state.params) == jax.tree.structure(jax.tree.map(lambda x: x, state.params))
