import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import random_hf_gpt2

from gpt2_jax import config, convert, generate, model, step as step_lib, weights
from gpt2_jax.generate import cli as generate_cli
from gpt2_jax.generate import GenerationError, Generator, SamplingConfig
from gpt2_jax.model import GPT2
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer

HF_SHAPE = dict(vocab_size=101, n_positions=64, n_embd=80, n_layer=2, n_head=5)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random HF GPT-2 (LayerNorms randomized) and its converted (config, params)."""
    d = tmp_path_factory.mktemp("hf")
    hf = random_hf_gpt2(d, seed=3, **HF_SHAPE)
    cfg, params = convert.load_hf(d)
    return hf, cfg, params, d


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A small random model with GPT-2's real vocabulary, saved as a params-only checkpoint."""
    cfg = config.get_model_config("tiny", n_ctx=64, n_embd=48, n_head=3, n_layer=2)
    params = model.init_params(cfg, jax.random.key(0))
    path = weights.save_params(tmp_path_factory.mktemp("ckpt") / "model", cfg, params)
    return cfg, params, path


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.active, self.count = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if self.active and name == self.EVENT:
            self.count += 1

    def __enter__(self):
        self.active, self.count = True, 0
        return self

    def __exit__(self, *exc):
        self.active = False


@pytest.fixture(scope="module")
def compiles():
    return CompileCounter()


# --------------------------------------------------------------------------------------------
# KV cache and HF parity


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_prefill_then_decode_matches_full_forward(hf_pair, scan):
    _, cfg, params, _ = hf_pair
    if scan:
        cfg, params = config.replace(cfg, scan_layers=True), model.stack_layers(params, cfg.n_layer)
    rng = np.random.RandomState(0)
    prompt_lens, n_new = [5, 12, 1], 7
    seqs = [rng.randint(0, cfg.vocab_size, L + n_new).astype(np.int32) for L in prompt_lens]
    bucket = 16
    tokens, lengths = generate.left_pad([s[:L] for s, L in zip(seqs, prompt_lens)], bucket, pad_id=42)

    prefill = jax.jit(functools.partial(step_lib.prefill, cfg, cache_len=bucket + n_new, all_logits=True))
    step = jax.jit(functools.partial(step_lib.decode_step, cfg))
    cont = np.stack([s[L:] for s, L in zip(seqs, prompt_lens)])
    logits_P, cache, _, _ = prefill(params, tokens, lengths)
    outs = []
    # one token at a time, then two at once (a chunk) to cover T > 1 against the cache
    for t in range(n_new - 2):
        lg, cache = step(params, cache, cont[:, t:t + 1], (lengths + t)[:, None])
        outs.append(lg)
    lg, cache = step(params, cache, cont[:, n_new - 2:], lengths[:, None] + np.arange(n_new - 2, n_new)[None, :])
    outs.append(lg)
    logits_new = np.concatenate(outs, 1)
    # the reference: each row alone (right-padded into one batch; causal, so padding after a row's
    # end cannot change its logits)
    width = max(prompt_lens) + n_new
    right = np.stack([np.pad(s, (0, width - len(s)), constant_values=42) for s in seqs])
    full_all = np.asarray(jax.jit(lambda p, x: GPT2(cfg).apply({"params": p}, x))(params, right))
    for b, (s, L) in enumerate(zip(seqs, prompt_lens)):
        full = full_all[b, : len(s)]
        got = np.concatenate([np.asarray(logits_P[b, bucket - L:]), np.asarray(logits_new[b])])
        assert got.shape == full.shape
        np.testing.assert_allclose(got, full, atol=1e-4, rtol=0)


def test_greedy_matches_hf_generate(hf_pair):
    hf, cfg, params, _ = hf_pair
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, cfg.vocab_size, L).tolist() for L in (1, 4, 9, 17)]
    n_new = 24
    gen = Generator(cfg, params)
    ours = gen.generate_tokens(prompts, SamplingConfig(max_new_tokens=n_new, greedy=True, eot_id=None))
    assert (ours.lengths == n_new).all()
    for p, row in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
            )
        np.testing.assert_array_equal(row, out[0, len(p):].numpy())


# --------------------------------------------------------------------------------------------
# Sampling rules, with a fake logits function in the real decode loop

V = 23
# A fixed distribution, rotated by the previous token so every step has a different allowed set.
BASE_PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05] + [0.05 / (V - 5)] * (V - 5))


def _fake_loop(sampling: SamplingConfig, seed: int, B: int = 64):
    base = jnp.log(jnp.asarray(BASE_PROBS, jnp.float32))

    def step_fn(state, tok_B1, pos_B1):
        return jax.vmap(lambda t: jnp.roll(base, t))(tok_B1[:, 0]), state

    @jax.jit
    def run(key):
        first = jnp.broadcast_to(base, (B, V))
        return generate.decode_loop(
            step_fn, jnp.zeros(()), first, jnp.zeros((B,), jnp.int32), key,
            max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy, top_k=sampling.top_k,
            use_top_p=sampling.top_p < 1, temperature=sampling.temperature, top_p=sampling.top_p,
            eot_id=sampling.eot_id,
        )

    tokens, lengths = run(jax.random.key(seed))
    return np.asarray(tokens), np.asarray(lengths)


def _offsets(tokens):
    """Each token's rank in its step's distribution (the roll offset from the previous token)."""
    prev = np.concatenate([np.zeros((tokens.shape[0], 1), np.int64), tokens[:, :-1]], 1)
    return (tokens - prev) % V


@pytest.mark.parametrize(
    "kw, allowed",
    [
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_p=0.7), {0, 1, 2}),  # 0.4, 0.25 (0.65 before), 0.15 (0.65 < 0.7); 0.1 starts at 0.8
        (dict(top_p=0.3), {0}),  # the most likely token is always kept
        (dict(top_k=4, top_p=0.6, temperature=0.7), {0, 1}),
        (dict(top_k=1, temperature=5.0), {0}),
        (dict(greedy=True, top_k=5), {0}),
    ],
)
def test_only_allowed_tokens_are_sampled(kw, allowed):
    tokens, lengths = _fake_loop(SamplingConfig(max_new_tokens=40, eot_id=None, **kw), seed=0)
    assert (lengths == 40).all()
    seen = set(np.unique(_offsets(tokens)).tolist())
    assert seen == allowed  # nothing outside the set, and (2560 draws) every member of it


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_set_equals_the_sorted_definition(top_p):
    logits = 3.0 * jax.random.normal(jax.random.key(0), (6, 1009))
    kept = np.isfinite(np.asarray(jax.jit(lambda x: generate.filter_logits(x, 0, top_p)[0])(logits)))
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    for row, keep in zip(probs, kept):
        order = np.argsort(-row)
        before = np.cumsum(row[order]) - row[order]  # mass of the more likely tokens
        np.testing.assert_array_equal(np.sort(np.nonzero(keep)[0]), np.sort(order[before < top_p]))


def test_top_k_frequencies_follow_renormalized_probabilities():
    tokens, _ = _fake_loop(SamplingConfig(max_new_tokens=50, top_k=3, eot_id=None), seed=1, B=128)
    freq = np.bincount(_offsets(tokens).ravel(), minlength=V)[:3] / tokens.size
    expect = BASE_PROBS[:3] / BASE_PROBS[:3].sum()
    np.testing.assert_allclose(freq, expect, atol=0.03)


def test_unfiltered_sampling_reaches_the_tail():
    tokens, _ = _fake_loop(SamplingConfig(max_new_tokens=50, eot_id=None), seed=2, B=128)
    assert len(set(np.unique(_offsets(tokens)).tolist()) - {0, 1, 2, 3, 4}) >= 5


def test_rows_stop_at_eot_and_pad():
    # eot (token 7) is the most likely next token only after token 7 - 1 = 6 ... rotate so that greedy
    # walks 0 -> 1 -> 2 ...: base favours offset 1; the walk reaches 7 at step 7 - start.
    base = jnp.full((V,), -5.0).at[1].set(0.0)
    B = 3

    def step_fn(state, tok_B1, pos_B1):
        return jax.vmap(lambda t: jnp.roll(base, t))(tok_B1[:, 0]), state

    starts = jnp.array([0, 3, 6])
    first = jax.vmap(lambda s: jnp.roll(base, s))(starts)  # first tokens 1, 4, 7
    tokens, lengths = jax.jit(lambda k: generate.decode_loop(
        step_fn, jnp.zeros(()), first, jnp.zeros((B,), jnp.int32), k, max_new_tokens=10, greedy=True, top_k=0,
        use_top_p=False, temperature=1.0, top_p=1.0, eot_id=7))(jax.random.key(0))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    np.testing.assert_array_equal(lengths, [6, 3, 0])
    np.testing.assert_array_equal(tokens[0], [1, 2, 3, 4, 5, 6, 7, 7, 7, 7])
    np.testing.assert_array_equal(tokens[1], [4, 5, 6, 7, 7, 7, 7, 7, 7, 7])
    np.testing.assert_array_equal(tokens[2], [7] * 10)


def test_rows_stop_at_any_stop_id():
    """stop_ids end a row like eot: greedy walks +1 per step; 4 and 9 stop rows, eot 7 too."""
    base = jnp.full((V,), -5.0).at[1].set(0.0)

    def step_fn(state, tok_B1, pos_B1):
        return jax.vmap(lambda t: jnp.roll(base, t))(tok_B1[:, 0]), state

    first = jax.vmap(lambda s: jnp.roll(base, s))(jnp.array([0, 4, 8, 12]))  # first tokens 1, 5, 9, 13
    tokens, lengths = jax.jit(lambda k: generate.decode_loop(
        step_fn, jnp.zeros(()), first, jnp.zeros((4,), jnp.int32), k, max_new_tokens=6, greedy=True, top_k=0,
        use_top_p=False, temperature=1.0, top_p=1.0, eot_id=7, stop_ids=(4, 9)))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(lengths), [3, 2, 0, 6])
    np.testing.assert_array_equal(np.asarray(tokens)[:3], [[1, 2, 3, 4, 7, 7], [5, 6, 7, 7, 7, 7], [9] + [7] * 5])
    with pytest.raises(generate.GenerationError, match="stop_ids must be a tuple"):
        SamplingConfig(stop_ids=[198])


def test_one_compilation_per_generation_and_seeds(hf_pair, compiles):
    _, cfg, params, _ = hf_pair
    cfg = config.replace(cfg, layer_norm_epsilon=1.01e-5)  # a config no other test compiled
    gen = Generator(cfg, params)
    s = SamplingConfig(max_new_tokens=12, top_k=5, top_p=0.9, eot_id=None)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    with compiles:
        a = gen.generate_tokens(prompts, s, seed=0).tokens
    assert compiles.count == 1
    # same seed -> same tokens, another seed -> other tokens
    with compiles:
        np.testing.assert_array_equal(gen.generate_tokens(prompts, s, seed=0).tokens, a)
        assert (gen.generate_tokens(prompts, s, seed=1).tokens != a).any()
    assert compiles.count == 0
    # another prompt length in the same bucket, another seed, temperature and top_p: nothing new
    with compiles:
        gen.generate_tokens([[9] * 11, [3]], SamplingConfig(max_new_tokens=12, top_k=5, top_p=0.5, temperature=0.8,
                                                      eot_id=None), seed=3)
        gen.generate_tokens([[9] * 16, [4] * 9], s, seed=4)
    assert compiles.count == 0
    # streaming: one compilation as well, and one callback per token
    seen = []
    with compiles:
        res = gen.generate_tokens([[1, 2]], s, seed=0, on_tokens=lambda t, tok, act: seen.append((t, int(tok[0]))))
    assert compiles.count == 1
    assert [t for t, _ in seen] == list(range(12))
    assert [tok for _, tok in seen] == res.tokens[0].tolist()


def test_each_generator_streams_to_its_own_call(hf_pair):
    """The streaming sink belongs to the Generator and the call: two Generators' streams never mix, a
    call without on_tokens sends nothing to an earlier call's, and no sink outlives its call."""
    _, cfg, params, _ = hf_pair
    s = SamplingConfig(max_new_tokens=3, greedy=True, eot_id=None)
    a, b = Generator(cfg, params), Generator(cfg, params)
    seen_a, seen_b = [], []
    res_a = a.generate_tokens([[1, 2]], s, on_tokens=lambda t, tok, act: seen_a.append(int(tok[0])))
    res_b = b.generate_tokens([[3, 4, 5]], s, on_tokens=lambda t, tok, act: seen_b.append(int(tok[0])))
    a.generate_tokens([[6]], s)
    assert seen_a == res_a.tokens[0].tolist() and seen_b == res_b.tokens[0].tolist()
    assert a._stream.sink is None and b._stream.sink is None
    assert not hasattr(generate, "_STREAM_SINK")
    with a._stream.sending_to(print), pytest.raises(GenerationError, match="already streaming"):
        a.generate_tokens([[1]], s, on_tokens=print)


# --------------------------------------------------------------------------------------------
# Generation in chunks (cut short between them)


@pytest.mark.parametrize(
    "kw, starts",
    [
        (dict(greedy=True), range(16)),
        (dict(greedy=True), range(7)),  # every row stops by token 7: the later chunks do nothing
        (dict(top_k=4, temperature=0.7), range(16)),
    ],
    ids=["greedy", "greedy-all-stop", "top_k"],
)
def test_chunks_give_the_single_loop_tokens(kw, starts):
    """Decoded 1, 3, 12 or 25 tokens per call (`run_in_chunks`), the decode loop draws the single
    loop's tokens and lengths bit for bit, rows that stop early (on eot or a stop id) included."""
    n, B = 12, len(starts)
    base = jnp.log(jnp.roll(jnp.asarray(BASE_PROBS, jnp.float32), 1))  # greedy walks +1 a step

    def step_fn(state, tok_B1, pos_B1):
        return jax.vmap(lambda t: jnp.roll(base, t))(tok_B1[:, 0]), state

    first = jax.vmap(lambda s: jnp.roll(base, s))(jnp.asarray(starts))  # first tokens start + 1 (greedy)
    s = SamplingConfig(max_new_tokens=n, eot_id=7, stop_ids=(4,), **kw)
    sampling = dict(max_new_tokens=n, greedy=s.greedy, top_k=s.top_k, use_top_p=s.top_p < 1, temperature=s.temperature,
                    top_p=s.top_p, eot_id=s.eot_id, stop_ids=s.stop_ids)
    zeros_B, key = jnp.zeros((B,), jnp.int32), jax.random.key(3)
    tokens, lengths = jax.jit(lambda k: generate.decode_loop(step_fn, jnp.zeros(()), first, zeros_B, k, **sampling))(key)
    assert (lengths < n).any() and ((lengths == n).any() or len(starts) == 7), lengths

    begin = jax.jit(lambda k: generate.decoder(step_fn, zeros_B, k, **sampling)[0](jnp.zeros(()), first))
    run = jax.jit(lambda c, k, t_end: generate.decoder(step_fn, zeros_B, k, **sampling)[1](c, t_end), donate_argnums=0)
    for chunk in (1, 3, n, 25):
        calls = []
        carry = generate.run_in_chunks(lambda: begin(key), lambda c, t_end: run(c, key, t_end), n, chunk, lambda: calls.append(1))
        np.testing.assert_array_equal(carry.out_BN, tokens)
        np.testing.assert_array_equal(carry.lengths_B, lengths)
        assert len(calls) == -(-(n - 1) // chunk)  # before each chunk, however early the rows stopped


@pytest.fixture(scope="module")
def tiny_generator():
    cfg = config.get_model_config("tiny", n_ctx=32, n_embd=24, n_head=3, n_layer=1, vocab_size=61)
    return Generator(cfg, model.init_params(cfg, jax.random.key(1)))


def test_a_generator_in_chunks(tiny_generator, compiles):
    """In chunks, a generation compiles two programs (prefill and the first token; a chunk) whatever
    the chunk size, has the single program's tokens and streams each in order. An exception from
    `between` (its 2nd call) ends the generation and reaches the caller; the Generator stays usable."""
    gen, s = tiny_generator, SamplingConfig(max_new_tokens=8, top_k=5, temperature=0.8, eot_id=None)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    single = gen.generate_tokens(prompts, s, seed=2)
    for chunk, expect_compiles in ((3, 2), (1, 0), (8, 0)):
        seen = []
        with compiles:
            res = gen.generate_tokens(prompts, s, seed=2, chunk=chunk, on_tokens=lambda t, tok, act: seen.append((t, tok.tolist())))
        assert compiles.count == expect_compiles, chunk
        np.testing.assert_array_equal(res.tokens, single.tokens)
        np.testing.assert_array_equal(res.lengths, single.lengths)
        assert seen == [(t, single.tokens[:, t].tolist()) for t in range(8)]

    class Stop(Exception):
        pass

    calls, seen = [], []

    def between():
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        gen.generate_tokens(prompts, s, seed=2, chunk=3, between=between, on_tokens=lambda t, *_: seen.append(t))
    assert len(calls) == 2 and seen == [0, 1, 2, 3] and gen._stream.sink is None  # the first token, then one chunk
    with compiles:
        res = gen.generate_tokens(prompts, s, seed=2, chunk=3, between=lambda: None, on_tokens=lambda *_: None)
        np.testing.assert_array_equal(res.tokens, single.tokens)
        np.testing.assert_array_equal(gen.generate_tokens(prompts, s, seed=2).tokens, single.tokens)
    assert compiles.count == 0
    with pytest.raises(GenerationError, match="chunk must be a positive"):
        gen.generate_tokens(prompts, s, chunk=0)


# --------------------------------------------------------------------------------------------
# Bad input and the command line


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_sampling_settings(kw, msg):
    with pytest.raises(GenerationError, match=msg):
        SamplingConfig(**kw)


def test_bad_prompts(hf_pair):
    _, cfg, _, _ = hf_pair
    with pytest.raises(GenerationError, match="empty"):
        generate.encode_prompt("")
    with pytest.raises(GenerationError, match="only special tokens"):
        generate.encode_prompt("<|endoftext|><|endoftext|>")
    with pytest.raises(GenerationError, match="empty"):
        generate.fit_prompts([[1], []], cfg, 4)
    with pytest.raises(GenerationError, match="no room"):
        generate.fit_prompts([[1]], cfg, cfg.n_ctx)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate.fit_prompts([[1, 500]], cfg, 4)
    with pytest.raises(GenerationError, match="at most 54 fit"):
        generate.fit_prompts([list(range(60))], cfg, 10)
    assert generate.fit_prompts([list(range(60))], cfg, 10, truncate="left") == [list(range(6, 60))]
    assert generate.prompt_bucket(3, 64, 10) == 16
    assert generate.prompt_bucket(17, 64, 10) == 32
    assert generate.prompt_bucket(40, 64, 10) == 54


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--prompt", ""], "empty"),
        (["--prompt", "<|endoftext|>"], "only special tokens"),
        (["--prompt", "hi", "--top-p", "0"], "top_p"),
        (["--prompt", "hi", "--temperature", "-2"], "temperature"),
        (["--prompt", "hi", "--max-new-tokens", "64"], "no room"),
        (["--prompt", "hi " * 70, "--max-new-tokens", "8"], "at most 56 fit"),
        (["--task", "qa"], "--input"),
    ],
)
def test_cli_one_line_errors(text_model, capsys, argv, msg):
    _, _, path = text_model
    rc = generate_cli.main(["--model", str(path), *argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error: ") and "\n" not in err and msg in err, err


def test_cli_missing_model(capsys):
    assert generate_cli.main(["--model", "/nonexistent/model", "--prompt", "hi"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_cli_streams_the_same_text_as_the_library(text_model, capsys):
    cfg, params, path = text_model
    prompt = "The meaning of life is"
    rc = generate_cli.main(["--model", str(path), "--prompt", prompt, "--max-new-tokens", "20", "--seed", "7"])
    assert rc == 0
    out = capsys.readouterr().out
    # the library with the CLI's settings (a callback too: the same program, compiled for this Generator)
    s = SamplingConfig(max_new_tokens=20, top_k=40)
    enc = get_tokenizer()
    res = Generator(cfg, params).generate_tokens([enc.encode(prompt)], s, seed=7, on_tokens=lambda *a: None)
    expect = enc.decode(res.rows()[0])
    assert out == expect + "\n" and len(expect) > 0


def test_generate_text_stops_at_eot(text_model):
    cfg, params, _ = text_model
    # make <|endoftext|> the most likely token: a constant final-LN bias b and wte[eot] = 1 give it
    # logit sum(normalized + b) = 3 * n_embd, far above the others' (small random embeddings)
    params = jax.tree.map(np.array, params)
    params["ln_f"]["bias"][:] = 3.0
    params["wte"][EOT_ID] = 1.0
    gen = Generator(cfg, params)
    out = gen.generate_tokens([get_tokenizer().encode("Hello")], SamplingConfig(max_new_tokens=8, greedy=True))
    assert out.lengths[0] < 8 and out.tokens[0, out.lengths[0]] == EOT_ID
    assert (out.tokens[0, out.lengths[0]:] == EOT_ID).all()


def test_task_cli_qa_writes_predictions(text_model, tmp_path, capsys):
    _, _, path = text_model
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(5)]
    src = tmp_path / "qa.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "pred.jsonl"
    rc = generate_cli.main(["--model", str(path), "--task", "qa", "--input", str(src), "--output", str(out),
                        "--shots", "2", "--max-new-tokens", "6", "--batch-size", "2"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 3 and report["shots"] == 2 and "exact_match" in report["metrics"]
    assert report["sampling"]["greedy"] is True
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["question"] for p in preds] == [r["question"] for r in rows[2:]]
    assert all("prediction" in p for p in preds)


def test_task_cli_coqa_stops_at_the_end_of_the_line(text_model, tmp_path, capsys):
    _, _, path = text_model
    dialog = {"id": "d1", "story": "Tom has a dog.",
              "questions": [{"input_text": "Who has a dog?", "turn_id": 1}, {"input_text": "What?", "turn_id": 2}],
              "answers": [{"input_text": "Tom", "turn_id": 1}, {"input_text": "a dog", "turn_id": 2}]}
    src = tmp_path / "coqa.json"
    src.write_text(json.dumps({"data": [dialog]}))
    out = tmp_path / "pred.jsonl"
    rc = generate_cli.main(["--model", str(path), "--task", "coqa", "--input", str(src), "--output", str(out),
                            "--max-new-tokens", "6", "--batch-size", "2"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 2 and set(report["metrics"]) == {"f1", "exact_match"}
    assert report["sampling"]["greedy"] is True and report["sampling"]["stop"] == "end of line"
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["id"], p["turn_id"]) for p in preds] == [("d1", 1), ("d1", 2)]
    # A row stops at its first newline token: nothing after it is generated.
    assert all("\n" not in p["generation"] and p["prediction"] == p["generation"].strip() for p in preds)


@pytest.mark.slow
def test_run_task_summarize_and_translate_report_their_metrics(text_model, tmp_path):
    from gpt2_jax.generate import tasks

    cfg, params, _ = text_model
    gen = Generator(cfg, params)
    summ = [{"article": "The cat sat on the mat. It was warm.", "summary": "A cat sat."}] * 2
    # greedy, 6 tokens, 2 rows: the program the qa CLI test compiled is reused
    greedy = SamplingConfig(max_new_tokens=6, greedy=True)
    report = tasks.run_task(gen, "summarize", summ, greedy, output=tmp_path / "s.jsonl")
    assert set(report["metrics"]) == {"rouge1", "rouge2", "rougeLsum", "r_avg"} and report["records"] == 2
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2
    trans = [{"source": f"word {i}", "target": f"mot {i}"} for i in range(3)]
    report = tasks.run_task(gen, "translate", trans, greedy, shots=1)  # prompts stay in the 16 bucket
    assert set(report["metrics"]) == {"bleu"} and report["records"] == 2
    with pytest.raises(tasks.TaskError, match="no records to score"):
        tasks.run_task(gen, "translate", trans, greedy, shots=3)
