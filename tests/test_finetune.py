"""Fine-tuning on prompt/completion pairs: the completion-only loss, learned through the real train step."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax import config, finetune, model, step
from gpt2_jax.generate import Generator, SamplingConfig
from gpt2_jax.model import GPT2
from gpt2_jax.tokenizer import EOT_ID

PAIRS = [
    ("Q: What is the capital of France?\nA:", " Paris"),
    ("Q: What is the capital of Italy?\nA:", " Rome"),
    ("Q: What colour is the sky?\nA:", " blue, mostly"),
    ("Translate: cat =", " chat"),
    ("Translate: dog =", " chien"),
    ("2 + 2 =", " 4"),
]
SEQ_LEN = 16


class _LogitsAsParams:
    """Stands in for the model in `step.loss_terms`: the "params" are the logits themselves, so
    the gradient that loss_terms produces is d(loss)/d(logits) of the real loss code."""

    config = None

    def apply(self, variables, inputs_BT, **kwargs):
        return variables["params"]


def test_prompt_targets_get_no_gradient():
    examples = finetune.encode_pairs(PAIRS[:3], SEQ_LEN)
    batch = finetune.eval_batches(examples, SEQ_LEN, batch_size=3)[0]
    logits = jax.random.normal(jax.random.key(0), (3, SEQ_LEN, 50257))
    loss_fn = lambda lg: step.loss_terms(lg, batch, None, model=_LogitsAsParams())[0]  # noqa: E731
    grads = np.asarray(jax.jit(jax.grad(loss_fn))(logits))
    per_position = np.abs(grads).sum(-1)  # [B, T]
    mask = batch["mask"]
    assert (per_position[mask == 0] == 0).all()  # prompt and padding targets: exactly no gradient
    assert (per_position[mask == 1] > 1e-3).all()  # every completion target (and <|endoftext|>) learns
    for row, (p, c) in zip(mask, examples):
        assert row.sum() == len(c)


@pytest.fixture(scope="module")
def finetuned():
    cfg = config.get_model_config("tiny", n_ctx=64, n_embd=48, n_head=3, n_layer=2, embd_pdrop=0.0,
                                  attn_pdrop=0.0, resid_pdrop=0.0)
    examples = finetune.encode_pairs(PAIRS, SEQ_LEN)
    loader = finetune.PairLoader(examples, SEQ_LEN, global_batch=6, seed=0)
    tx = optax.adam(5e-3)
    state = step.TrainState(
        step=jnp.zeros((), jnp.int32), params=model.init_params(cfg, jax.random.key(0)),
        opt_state=None, rng=jax.random.key_data(jax.random.key(1)),
    )
    state = state.replace(opt_state=tx.init(state.params))
    train_step = jax.jit(functools.partial(step.train_step, model=GPT2(cfg), tx=tx, schedule=optax.constant_schedule(5e-3)))
    losses = []
    for _ in range(100):
        state, metrics = train_step(state, jax.tree.map(jnp.asarray, next(loader)))
        losses.append(float(metrics["loss"]))
    return cfg, state.params, examples, losses


@pytest.mark.slow
def test_completion_only_loss_falls(finetuned):
    _, _, _, losses = finetuned
    assert np.isfinite(losses).all()
    assert losses[0] > 5.0 and np.mean(losses[-5:]) < 0.05 * losses[0]


@pytest.mark.slow
def test_finetuned_greedy_completions_match_training(finetuned):
    cfg, params, examples, _ = finetuned
    gen = Generator(cfg, params)
    longest = max(len(c) for _, c in examples)
    result = gen.generate_tokens([p for p, _ in examples], SamplingConfig(max_new_tokens=longest + 2, greedy=True))
    for (_, c), row, n in zip(examples, result.tokens, result.lengths):
        assert row[:n].tolist() + [EOT_ID] == c  # the completion, then it stops
    assert gen.generate([p for p, _ in PAIRS[:2]], SamplingConfig(max_new_tokens=8, greedy=True)) == [" Paris", " Rome"]


@pytest.mark.slow
def test_finetune_through_the_train_entry_point(tmp_path, capsys, monkeypatch):
    """`python -m gpt2_jax.train ... init_from= finetune_data=`: sharded over 8 devices, from a
    checkpoint; the same command with more steps resumes without reading init_from's weights and
    without creating a fresh state first."""
    from gpt2_jax import step, weights
    from gpt2_jax.train import cli as train_cli

    cfg = config.get_model_config("tiny", n_ctx=64, n_embd=48, n_head=3, n_layer=2)
    ckpt = weights.save_params(tmp_path / "base", cfg, model.init_params(cfg, jax.random.key(0)))
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"q": p, "a": c}) for p, c in PAIRS) + "\n")
    run_dir = tmp_path / "run"
    args = [
        "tiny", f"init_from={ckpt}", f"finetune_data={data}", "prompt_template={q}", "completion_template={a}",
        "seq_len=0", "batch_size=8", "lr=5e-3", "warmup_steps=2", "weight_decay=0", "eval_every=20",
        "log_every=1", "sample_tokens=4", f"run_dir={run_dir}",
    ]
    rc = train_cli.main([*args, "steps=40"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["n_embd"] == 48 and saved["model"]["n_ctx"] == 64  # the checkpoint's shape
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < 0.3 * losses[0] and val[-1] < 0.3 * losses[0]

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must not read or create a state besides its checkpoint")

    with monkeypatch.context() as m:
        m.setattr(weights, "load", refuse)
        m.setattr(step, "init_train_state_sharded", refuse)
        assert train_cli.main([*args, "steps=42"]) == 0, capsys.readouterr().err
    assert "resumed from checkpoint step 40" in capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-3:] == [40, 41, 42]
    bad = train_cli.main(["tiny", f"init_from={tmp_path / 'missing'}", f"finetune_data={data}", f"run_dir={tmp_path / 'r2'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert bad != 0 and err[-1].startswith("error: ") and "init_from" in err[-1]
