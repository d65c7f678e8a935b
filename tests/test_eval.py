"""Evaluation: windows, detokenizers, word counts, parity with HF transformers, every task, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from gpt2_jax import convert, weights
from gpt2_jax.eval import (
    Options, Scorer, count_words, moses_detokenize, ptb_detokenize, sliding_windows, wikitext_detokenize,
)
from gpt2_jax.eval import cli, tasks
from gpt2_jax.eval.report import _fmt, paper_size, params_sha256, render_table
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer
from helpers import HELLASWAG_ITEMS, hf_logits, random_hf_gpt2, write_hellaswag

N_CTX = 128


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-2 with the real vocabulary, saved as an HF directory."""
    d = tmp_path_factory.mktemp("hf_tiny")
    random_hf_gpt2(d, vocab_size=50257, n_positions=N_CTX, n_embd=80, n_layer=2, n_head=5, seed=3)
    return d


@pytest.fixture(scope="module")
def scorer(hf_dir):
    cfg, params = convert.load_hf(hf_dir)
    return Scorer(cfg, params, batch_size=8)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


# --- sliding windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens,n_ctx,stride,first", [(1, 8, 4, 1), (9, 8, 4, 1), (10, 8, 4, 1), (57, 8, 3, 1),
                                                         (57, 8, 8, 1), (57, 8, 1, 1), (40, 8, 4, 35), (40, 8, 4, 20)])
def test_windows_score_every_target_once_with_context(n_tokens, n_ctx, stride, first):
    seen = []
    for w in sliding_windows(n_tokens, n_ctx, stride, first):
        assert 0 <= w.start < w.end < n_tokens and w.end - w.start <= n_ctx
        targets = list(range(w.start + 1, w.end + 1))[w.skip:]
        assert targets, "a window that scores nothing"
        # After the first window every scored target sees at least n_ctx - stride tokens.
        if seen:
            assert targets[0] - w.start >= min(n_ctx - stride + 1, targets[0])
        seen += targets
    assert seen == list(range(first, n_tokens))


def test_windows_give_a_late_target_the_whole_context():
    (w,) = sliding_windows(300, 128, 64, first_target=297)
    assert (w.start, w.end, w.skip) == (171, 299, 125)


# --- detokenizers and word counts on real lines ----------------------------------------------------


def test_wikitext_detokenizer_on_real_lines(shared_data):
    lines = _lines(shared_data / "wikitext2" / "wiki.valid.tokens")
    assert lines[1] == " = Homarus gammarus = "
    assert wikitext_detokenize(lines[1]) == "= Homarus gammarus ="
    assert wikitext_detokenize(lines[5]) == "== Description =="
    assert wikitext_detokenize(lines[12]) == (
        "The spines on the claws of H. americanus are red or red-tipped, while those of H. gammarus are "
        "white or white-tipped."
    )
    line17 = wikitext_detokenize(lines[17])
    assert "length of 80 – 85 millimetres (3.1 – 3.3 in), whereas males" in line17
    assert 'are said to be "<unk>" and can be found' in line17
    assert "20,000 survives" in wikitext_detokenize(lines[18])
    assert wikitext_detokenize(" \n") == "\n"


def test_ptb_detokenizer_on_real_lines(shared_data):
    lines = _lines(shared_data / "ptb" / "ptb.valid.txt")
    assert ptb_detokenize(lines[1]) == (
        "<unk> <unk> watching abc's monday night football can now vote during <unk> for the greatest "
        "play in N years from among four or five <unk> <unk>"
    )
    assert ptb_detokenize(lines[49]) == "that'll save us time and get people involved"
    assert ptb_detokenize(lines[7]).startswith("we've been spending")


def test_moses_detokenizer_cbt_style():
    text = "`` Oh , I 'm so sorry , '' said the King ( quietly ) ; and she did n't ."
    assert moses_detokenize(text) == '"Oh, I\'m so sorry," said the King (quietly); and she didn\'t.'


def test_detokenizers_only_remove_inserted_spaces(shared_data):
    """Invertible in the sense that matters for the word count: no word is lost or merged except
    across the spaces the tokenizer inserted (checked: same non-space characters, modulo escapes)."""
    for name, detok in [("wikitext2/wiki.valid.tokens", wikitext_detokenize), ("ptb/ptb.valid.txt", ptb_detokenize)]:
        original = (shared_data / name).read_text(encoding="utf-8")
        squeeze = lambda s: "".join(s.replace("@-@", "-").replace("@,@", ",").replace("@.@", ".").split())
        assert squeeze(detok(original)) == squeeze(original)
        assert detok(original).count("\n") == original.count("\n")


def test_word_counts_match_the_original_splits(shared_data):
    # Published sizes: PTB validation 73,760 words (Mikolov's data, with <eos>), WikiText-2
    # validation 217,646 tokens (Merity et al. 2016, Table 1).
    for name, published in [("ptb/ptb.valid.txt", 73_760), ("wikitext2/wiki.valid.tokens", 217_646)]:
        text = (shared_data / name).read_text(encoding="utf-8")
        n_lines = text.count("\n") + (not text.endswith("\n"))  # PTB's last line has no newline
        independent = len(text.split()) + n_lines  # one <eos> per line
        assert count_words(text) == independent == published


# --- parity with Hugging Face transformers ------------------------------------------------------


def _hf_windowed_nll(model, ids: list[int], n_ctx: int, stride: int) -> tuple[float, int]:
    """Total NLL of ids[1:] with HF: window k scores targets up to 1 + n_ctx + k*stride."""
    total, count, prev_end, k = 0.0, 0, 1, 0
    while prev_end < len(ids):
        end = min(len(ids), 1 + n_ctx + k * stride)
        lo = max(0, end - 1 - n_ctx)
        window = torch.tensor([ids[lo:end]])
        labels = window.clone()
        labels[0, : prev_end - lo] = -100  # context, or scored by an earlier window
        with torch.no_grad():
            logp_TV = model(window[:, :-1]).logits.log_softmax(-1)
        logp = logp_TV[0].gather(-1, window[0, 1:, None])[:, 0].double()
        keep = labels[0, 1:] != -100
        total -= float(logp[keep].sum())
        count += int(keep.sum())
        prev_end, k = end, k + 1
    return total, count


def test_wikitext2_token_perplexity_matches_hf(hf_dir, scorer, shared_data):
    original = "".join((shared_data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(True)[:45])
    ours = tasks.score_corpus(scorer, original, wikitext_detokenize, stride=N_CTX // 2, desc="wikitext2")
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ids = [EOT_ID, *get_tokenizer().encode_ordinary(wikitext_detokenize(original))]
    assert len(ids) > 6 * N_CTX  # several windows
    nll, n = _hf_windowed_nll(hf, ids, N_CTX, N_CTX // 2)
    assert ours["counts"]["tokens"] == n == len(ids) - 1
    np.testing.assert_allclose(ours["metrics"]["ppl_token"], math.exp(nll / n), rtol=1e-4)
    np.testing.assert_allclose(ours["metrics"]["ppl_word"], math.exp(nll / count_words(original)), rtol=1e-4)


def test_stride_n_ctx_is_the_non_overlapping_protocol(hf_dir, shared_data, tmp_path, capsys):
    """`--stride n_ctx`: each window starts where the last one ended; the figure equals HF's over
    non-overlapping windows, and the table and JSON say which stride it was."""
    out = tmp_path / "r.json"
    rc = cli.main(["--model", str(hf_dir), "--task", "wikitext2", "--data-dir", str(shared_data), "--split", "valid",
                   "--limit", "45", "--stride", "n_ctx", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["protocol"]["stride"] == N_CTX and report["protocol"]["windows"] == "non-overlapping"
    result = report["tasks"]["wikitext2"]
    assert result["stride"] == N_CTX
    assert [line.split()[-1] for line in printed.splitlines() if line.startswith("wikitext2")] == [str(N_CTX)] * 2
    from transformers import GPT2LMHeadModel

    original = "".join((shared_data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(True)[:45])
    ids = [EOT_ID, *get_tokenizer().encode_ordinary(wikitext_detokenize(original))]
    nll, n = _hf_windowed_nll(GPT2LMHeadModel.from_pretrained(hf_dir).eval(), ids, N_CTX, N_CTX)
    np.testing.assert_allclose(result["metrics"]["ppl_token"], math.exp(nll / n), rtol=1e-4)


@pytest.mark.parametrize("stride, msg", [("0", "--stride must be a positive number of tokens, 'half' or 'n_ctx', got '0'"),
                                         ("full", "got 'full'"), ("129", "--stride 129 exceeds the model's context n_ctx=128")])
def test_bad_stride_is_one_line(hf_dir, shared_data, capsys, stride, msg):
    rc = cli.main(["--model", str(hf_dir), "--task", "wikitext2", "--data-dir", str(shared_data), "--stride", stride])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: ") and msg in err


def _biased_hf_dir(hf_dir: Path, out: Path, tokens: list[int], alpha: float) -> Path:
    """The tiny model with its final LayerNorm bias pushed toward `tokens`: the argmax is one of
    them at most positions, which one depends on the context, so LAMBADA accuracy is not 0."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        wte = hf.transformer.wte.weight
        hf.transformer.ln_f.bias.add_(alpha * sum(wte[t] / wte[t].norm() for t in tokens))
    hf.save_pretrained(out)
    return out


@pytest.mark.slow
def test_lambada_first_200_matches_hf(hf_dir, shared_data, tmp_path):
    texts = [json.loads(l)["text"] for l in _lines(shared_data / "lambada" / "lambada_test.jsonl")[:200]]
    enc = get_tokenizer()
    words = [tasks.lambada_split(t)[1] for t in texts]
    frequent = sorted(set(words), key=lambda w: (-words.count(w), w))[:3]  # " Gabriel", " Shane", ...
    biased = _biased_hf_dir(hf_dir, tmp_path / "biased", [enc.encode_ordinary(w)[0] for w in frequent], 10.0)
    cfg, params = convert.load_hf(biased)
    ours = tasks.score_lambada(Scorer(cfg, params, batch_size=8), texts)

    # HF: greedy decoding reproduces the word iff each of its tokens is the argmax given the
    # context and the word's earlier tokens (teacher forcing); context truncated on the left to fit.
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(biased).eval()
    hf_correct, hf_last, margins = [], [], []
    for text in texts:
        context, word = tasks.lambada_split(text)
        target = enc.encode_ordinary(word)
        seq = ([EOT_ID, *enc.encode_ordinary(context)] + target)[-(N_CTX + 1):]
        with torch.no_grad():
            hidden = hf.transformer(torch.tensor([seq[:-1]])).last_hidden_state[0, -len(target):]
            logits = hf.lm_head(hidden)  # only the word's positions: the vocabulary matmul dominates
        rival = logits.clone()
        rival[torch.arange(len(target)), target] = -float("inf")
        margins.append(float((logits[torch.arange(len(target)), target] - rival.max(-1).values).abs().min()))
        hf_correct.append(logits.argmax(-1).tolist() == target)
        hf_last.append(int(logits[-1].argmax()) == target[-1])
    assert min(margins) > 1e-3  # target vs best other token never near a tie: the comparison is exact, not luck
    assert 0 < sum(hf_correct) < len(texts)
    assert ours["correct"]["whole_word"] == hf_correct and ours["correct"]["last_token"] == hf_last
    assert ours["metrics"]["acc_whole_word"] == 100.0 * sum(hf_correct) / len(texts)
    assert ours["metrics"]["acc_last_token"] == 100.0 * sum(hf_last) / len(texts)


def test_lambada_accuracy_needs_every_token_of_the_word(scorer):
    text = "The cat sat on the mat and looked at the antidisestablishmentarianism"
    res = tasks.score_lambada(scorer, [text])
    _, word = tasks.lambada_split(text)
    assert res["counts"]["target_tokens"] == len(get_tokenizer().encode_ordinary(word)) > 1
    assert res["metrics"]["acc_whole_word"] <= res["metrics"]["acc_last_token"]


class _BigramScorer:
    """A stand-in for `Scorer` whose greedy choice after a token is the first of `ranked[token]` not
    excluded (EOT after any other token); a hit has probability 1/2, a miss 1/100."""

    n_ctx = 64

    def __init__(self, ranked: dict[str, list[str]]):
        enc = get_tokenizer()
        one = lambda w: enc.encode_ordinary(w)[0]
        self.ranked = {one(k): [one(v) for v in vs] for k, vs in ranked.items()}
        self.excludes = []

    def score_sequences(self, seqs, first_targets, *, stride, desc="", exclude=frozenset()):
        self.excludes.append(exclude)
        out = []
        for seq, first in zip(seqs, first_targets):
            pred = [next((t for t in self.ranked.get(int(prev), [EOT_ID]) if t not in exclude), EOT_ID)
                    for prev in seq[first - 1 : -1]]
            hit = np.array(pred) == seq[first:]
            out.append((np.where(hit, math.log(0.5), math.log(0.01)), hit))
        return out


def test_lambada_variants_disagree_on_hand_made_passages():
    enc = get_tokenizer()
    assert enc.encode_ordinary(" Thornbury") == [enc.encode_ordinary(" Thorn")[0], enc.encode_ordinary("bury")[0]]
    ranked = {" to": [" Tom"], " of": [" Thorn"], " Thorn": ["bury"], " kissed": [" the", " Tom"], " at": [" it"],
              " waved": [" Anna", " Tom"]}
    passages = [
        "They drove down to Thornbury",  # the last token right after a wrong first token: last_token only
        "He was the mayor of Thornbury",  # every token right: all three
        "Then she kissed Tom",  # a stop word beat the word: right only with the filter
        "She looked at it",  # the word is a stop word: never right with the filter
        "Then she waved Tom",  # another content word beat it: wrong in all three
    ]
    assert {"the", "it"} <= tasks.LAMBADA_STOP_WORDS and "Tom" not in tasks.LAMBADA_STOP_WORDS
    res = tasks.score_lambada(_BigramScorer(ranked), passages)
    assert res["correct"] == {
        "last_token": [True, True, False, True, False],
        "whole_word": [False, True, False, True, False],
        "whole_word_stopword_filter": [False, True, True, False, False],
    }
    m = res["metrics"]
    assert (m["acc_last_token"], m["acc_whole_word"], m["acc_whole_word_stopword_filter"]) == (60.0, 40.0, 40.0)
    # Perplexities: the last token's NLL, and the whole word's (two tokens for Thornbury).
    np.testing.assert_allclose(m["ppl_last_token"], math.exp(-(3 * math.log(0.5) + 2 * math.log(0.01)) / 5))
    word_nll = -(math.log(0.01) + math.log(0.5)) - 2 * math.log(0.5) - math.log(0.01) - math.log(0.5) - math.log(0.01)
    np.testing.assert_allclose(m["ppl_whole_word"], math.exp(word_nll / 5))
    # A second look with the stop words excluded only where the first token was missed and the
    # rest hit: "to Thornbury", "kissed Tom", "waved Tom".
    assert res["counts"]["rescored_with_filter"] == 3
    assert res["counts"]["stop_word_tokens"] == len(tasks.lambada_stop_ids()) > 150


def test_stop_word_ids_are_space_prefixed_single_tokens():
    enc = get_tokenizer()
    ids = tasks.lambada_stop_ids()
    for word in (" the", " The", " it", " It", " and", " of", " I"):
        (t,) = enc.encode_ordinary(word)
        assert t in ids, word
    for word in (" Tom", " door", "the", " Thorn", " house"):
        assert enc.encode_ordinary(word)[0] not in ids, word


def test_excluded_tokens_leave_the_argmax_to_the_rest(hf_dir, scorer):
    """Hits with `exclude`: the target is the argmax of HF's logits once the excluded ids are set
    to -inf; log-probabilities stay those of the whole vocabulary."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 50257, size=n).astype(np.int32) for n in (20, 33, 9)]
    # Exclude each row's top choice at every other position, and make the target there the
    # runner-up (chosen left to right: a target is the next position's input): hits there only if
    # the exclusion works.
    exclude = set()
    for r in rows:
        for t in range(0, len(r) - 1, 2):
            top2 = np.argsort(hf_logits(hf, r[None, : t + 1])[0, t])[::-1][:2]
            exclude.add(int(top2[0]))
            r[t + 1] = top2[1]
    logits = [hf_logits(hf, r[None, :-1])[0] for r in rows]
    plain = scorer.score(rows)
    masked = scorer.score(rows, exclude=frozenset(exclude))
    for r, lg, (lp0, hit0), (lp1, hit1) in zip(rows, logits, plain, masked):
        np.testing.assert_array_equal(lp0, lp1)
        np.testing.assert_array_equal(hit0, lg.argmax(-1) == r[1:])
        lg = lg.copy()
        lg[:, sorted(exclude)] = -np.inf
        np.testing.assert_array_equal(hit1, lg.argmax(-1) == r[1:])
    assert not any(hit[::2].any() for _, hit in plain)
    # Every runner-up that is not excluded itself (as another position's top) becomes a hit.
    kept = sum(int(t) not in exclude for r in rows for t in r[1::2])
    assert sum(int(hit[::2].sum()) for _, hit in masked) == kept > 0


# --- HellaSwag -------------------------------------------------------------------------------------

def hf_hellaswag(hf, items):
    """Independent HellaSwag log-likelihoods with HF transformers: per item and ending, the summed
    log-softmax of the ending's tokens after the context, the row's last N_CTX + 1 tokens kept."""
    enc = get_tokenizer()
    out = []
    for item in items:
        ctx = enc.encode_ordinary(item["ctx"])
        sums, counts = [], []
        for ending in item["endings"]:
            end = enc.encode_ordinary(" " + ending)
            row = np.array(ctx + end)[-(N_CTX + 1):]
            logp = torch.log_softmax(torch.as_tensor(hf_logits(hf, row[None, :-1])[0], dtype=torch.float64), -1).numpy()
            sums.append(sum(logp[len(row) - 1 - len(end) + j, t] for j, t in enumerate(end)))
            counts.append(len(end))
        out.append((np.array(sums), np.array(counts)))
    return out


def test_hellaswag_equals_an_independent_hf_computation(hf_dir, scorer, tmp_path):
    from transformers import GPT2LMHeadModel

    path = write_hellaswag(tmp_path)
    items = tasks.read_hellaswag(path)
    assert [i.label for i in items] == [3, 0, 1, 2] and len(get_tokenizer().encode_ordinary(items[2].ctx)) > N_CTX
    ours = tasks.hellaswag_loglikelihoods(scorer, items)
    theirs = hf_hellaswag(GPT2LMHeadModel.from_pretrained(hf_dir).eval(), HELLASWAG_ITEMS)
    for (lp, n), (hf_lp, hf_n) in zip(ours, theirs):
        np.testing.assert_array_equal(n, hf_n)
        np.testing.assert_allclose(lp, hf_lp, rtol=1e-6, atol=0)
    # Each accuracy is its rule applied to HF's log-likelihoods.
    rules = {"acc_sum": lambda lp, n, e: lp, "acc_per_token": lambda lp, n, e: lp / n,
             "acc_per_byte": lambda lp, n, e: lp / np.array([max(1, len(x.encode())) for x in e])}
    result = tasks.TASKS["hellaswag"].run(scorer, Options(tmp_path, split="test"))
    for rule, fn in rules.items():
        hits = [int(np.argmax(fn(lp, n, x["endings"]))) == int(x["label"]) for (lp, n), x in zip(theirs, HELLASWAG_ITEMS)]
        assert result["metrics"][rule] == 100.0 * sum(hits) / len(hits), rule
    assert result["counts"] == {"items": 4, "endings": 16} and result["data"]["split"] == "validation"
    # The rules disagree on these items, or the test could not tell them apart.
    picks = {rule: [int(np.argmax(fn(lp, n, x["endings"]))) for (lp, n), x in zip(theirs, HELLASWAG_ITEMS)]
             for rule, fn in rules.items()}
    assert len({tuple(p) for p in picks.values()}) == 3, picks


def test_hellaswag_reference_stands_beside_the_per_token_variant(hf_dir, tmp_path, monkeypatch):
    """For the small size the table shows the published figures of OpenAI's 124M weights beside
    acc_sum and acc_per_token (0.2859, 0.2955), with their source under the table."""
    from gpt2_jax.eval import report as report_mod

    write_hellaswag(tmp_path)
    monkeypatch.setattr(report_mod, "paper_size", lambda cfg: "small")  # the tiny model stands in for small
    rep = report_mod.evaluate(*convert.load_hf(hf_dir), ["hellaswag"], Options(tmp_path))
    assert rep["tasks"]["hellaswag"]["paper"] == {"acc_sum": 28.59, "acc_per_token": 29.55}
    table = render_table(rep, compare_paper=True, markdown=True)
    value = rep["tasks"]["hellaswag"]["metrics"]["acc_per_token"]
    assert f"| hellaswag | acc_per_token | {_fmt(value)} | - | 29.55 |" in table
    assert "| hellaswag | acc_per_byte |" in table and "29.55% for the 124M model" in table
    monkeypatch.setattr(report_mod, "paper_size", lambda cfg: "medium")  # no published figure for 345M
    assert report_mod.evaluate(*convert.load_hf(hf_dir), ["hellaswag"], Options(tmp_path, limit=1))["tasks"]["hellaswag"]["paper"] == {}


@pytest.mark.parametrize("record, msg", [
    ({"ctx": "A man.", "endings": ["a", "b"], "label": 2}, '"label" must be the index of the right ending (0-1), got 2'),
    ({"ctx": "A man.", "endings": ["a", "b"], "label": ""}, "got '' (the test set's labels are not public"),
    ({"ctx": "A man.", "endings": "a b", "label": 0}, 'an item needs "ctx" (a string) and "endings" (a list of strings)'),
])
def test_hellaswag_bad_items_are_one_line(hf_dir, tmp_path, capsys, record, msg):
    path = write_hellaswag(tmp_path, [HELLASWAG_ITEMS[0], record])
    rc = cli.main(["--model", str(hf_dir), "--task", "hellaswag", "--data-dir", str(tmp_path), "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"error: hellaswag: {path}:2: " in err and msg in err


def test_hellaswag_items_for_training(tmp_path, monkeypatch):
    """`hellaswag_items(limit, data_root)`: the items `--task hellaswag` reads, or a one-line EvalError."""
    from gpt2_jax.eval import EvalError, hellaswag_items

    path = write_hellaswag(tmp_path)
    every = tasks.read_hellaswag(path)
    assert hellaswag_items(2, tmp_path) == every[:2] and len(every) == len(HELLASWAG_ITEMS) > 2
    monkeypatch.setenv("GPT2_JAX_DATA_DIR", str(tmp_path))
    assert hellaswag_items(None, None) == every
    with pytest.raises(EvalError) as e:
        hellaswag_items(None, tmp_path / "elsewhere")
    assert str(e.value).startswith(f"hellaswag: data file {tmp_path / 'elsewhere'}/hellaswag/hellaswag_val.jsonl not found")
    assert "\n" not in str(e.value)
    monkeypatch.delenv("GPT2_JAX_DATA_DIR")
    with pytest.raises(EvalError, match=r"hellaswag: no data directory .* set \$GPT2_JAX_DATA_DIR"):
        hellaswag_items(None, None)


def test_published_figures_are_the_reports():
    """The figures the report compares with have one home, gpt2_jax.published."""
    from gpt2_jax import published

    assert tasks.TASKS["hellaswag"].paper is published.HELLASWAG and tasks.TASKS["ptb"].paper is published.PTB
    assert tasks.PAPER_SOURCE == published.PAPER_SOURCE  # tests/test_plot.py: the plot imports them without jax

def test_sharded_scoring_equals_one_device(hf_dir):
    cfg, params = convert.load_hf(hf_dir)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50257, size=n).astype(np.int32) for n in (129, 100, 128, 80, 2, 16, 9, 12, 5)]
    one = Scorer(cfg, params, batch_size=4, devices=jax.devices()[:1]).score(rows)
    scorer8 = Scorer(cfg, params, batch_size=8)
    eight = scorer8.score(rows)
    assert len(jax.devices()) == 8
    for (a, ha), (b, hb) in zip(one, eight):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ha, hb)
    # Scoring only the last k targets (logits at those positions only) gives the same numbers.
    ks = [1, 99, 3, 79, 1, 15, 8, 2, 4]
    tails = scorer8.score(rows, ks)
    for (a, ha), (b, hb), k in zip(one, tails, ks):
        assert len(b) == k
        np.testing.assert_allclose(a[-k:], b, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ha[-k:], hb)


# --- every task end to end -----------------------------------------------------------------------


def _write_cbt(path: Path, answers: list[str], kind: str) -> None:
    story = [f"{i} `` Sentence number {i} , '' said the old Rabbit to {['Tom', 'Anna'][i % 2]} ." for i in range(1, 21)]
    blocks = []
    for a in answers:
        cands = ["Tom", "Anna", "Rabbit", "garden", "house", "tree", "King", "Queen", "river", "hill"]
        blocks.append("\n".join(story + [f"21 Then XXXXX went home with the {kind} .\t{a}\t\t{'|'.join(cands)}"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_data):
    """Shared corpora plus small test-made files in the original formats of the other data sets."""
    d = tmp_path_factory.mktemp("data")
    for name in ("lambada", "wikitext2", "ptb", "tiny_shakespeare"):
        (d / name).symlink_to(shared_data / name)
    wt103 = d / "wikitext103"
    wt103.mkdir()
    wt2 = _lines(shared_data / "wikitext2" / "wiki.valid.tokens")
    (wt103 / "wiki.valid.tokens").write_text("\n".join(wt2[:3] + wt2[100:112]) + "\n")  # same format
    (d / "webtext").mkdir()
    docs = [{"id": i, "ended": True, "length": 10, "text": t} for i, t in enumerate(
        ["Hello world. This is a WebText document.", "Ünïcödé text – with “quotes” and 東京.", "x" * 700])]
    (d / "webtext" / "webtext.valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    _write_cbt(d / "cbt" / "cbtest_CN_valid_2000ex.txt", ["garden", "tree", "house"], "basket")
    _write_cbt(d / "cbt" / "cbtest_NE_valid_2000ex.txt", ["Tom", "Anna"], "Queen")
    xml = ("<page><title>Ñandú</title><text>The rhea – ñandú in Spanish – is a bird. 東京 [[Link]]</text></page>\n" * 300).encode()
    (d / "enwik8").mkdir()
    with zipfile.ZipFile(d / "enwik8" / "enwik8.zip", "w") as z:
        z.writestr("enwik8", xml)
    (d / "lm1b").mkdir()  # the benchmark's tokenized, shuffled held-out sentences
    (d / "lm1b" / "news.en.heldout-00000-of-00050").write_text(
        "The company said it expects the deal to close in the third quarter .\n"
        "\" We are very pleased , \" he said .\nShares fell 3 % to $ 12.50 in early trading .\n")
    write_hellaswag(d)
    (d / "text8").mkdir()
    (d / "text8" / "text8").write_text(" anarchism originated as a term of abuse first used against early working class radicals" * 60)
    return d


def test_every_task_end_to_end(hf_dir, data_dir, tmp_path, capsys):
    ckpt = weights.save_params(tmp_path / "ckpt", *convert.load_hf(hf_dir))  # the gpt2_jax checkpoint path
    out = tmp_path / "report.json"
    rc = cli.main(["--model", str(ckpt), "--task", "webtext,wikitext2,wikitext103,ptb,lambada,cbt-cn,cbt-ne,enwik8,text8,lm1b,hellaswag",
                   "--data-dir", str(data_dir), "--split", "valid", "--limit", "12", "--compare", "paper",
                   "--markdown", "--output", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    assert report["model"]["kind"] == "gpt2_jax" and report["model"]["config"]["n_ctx"] == N_CTX
    assert report["model"]["params_sha256"] == params_sha256(convert.load_hf(hf_dir)[1])
    t = report["tasks"]
    expected = {"webtext": "ppl_byte", "wikitext2": "ppl_word", "wikitext103": "ppl_word", "ptb": "ppl_word",
                "lambada": "acc_last_token", "cbt-cn": "acc", "cbt-ne": "acc", "enwik8": "bits_per_byte", "text8": "bits_per_char",
                "lm1b": "ppl_word", "hellaswag": "acc_per_token"}
    for task, metric in expected.items():
        assert math.isfinite(t[task]["metrics"][metric]), task
        assert t[task]["protocol"] and len(t[task]["data"]["sha256"]) == 64
        assert f"| {task} | {metric} |" in printed
        assert set(tasks.TASKS[task].paper) <= set(t[task]["metrics"]), task  # paper figures name its metrics
    assert t["webtext"]["counts"] == {"documents": 3, "tokens": t["webtext"]["counts"]["tokens"],
                                      "bytes": sum(len(x.encode()) for x in ["Hello world. This is a WebText document.",
                                                                          "Ünïcödé text – with “quotes” and 東京.", "x" * 700])}
    assert t["cbt-cn"]["counts"] == {"questions": 3, "candidates": 30}
    assert t["lm1b"]["counts"]["sentences"] == 3 and t["lm1b"]["counts"]["words"] == 14 + 10 + 11 + 3  # words plus one </S> each
    assert t["lambada"]["data"]["matches_release"] is True and t["wikitext2"]["data"]["matches_release"] is True
    assert t["wikitext103"]["data"]["matches_release"] is None  # no published hash on record
    assert t["lambada"]["counts"]["passages"] == 12
    assert t["enwik8"]["counts"]["bytes"] == 12 and t["text8"]["counts"]["characters"] == 12
    # Word counts used for normalization are those of the original (limited) split.
    ptb12 = "".join((data_dir / "ptb" / "ptb.valid.txt").read_text().splitlines(True)[:12])
    assert t["ptb"]["counts"]["words"] == len(ptb12.split()) + 12
    assert report["protocol"]["stride"] == N_CTX // 2 and report["protocol"]["windows"] == "overlapping"
    # Every perplexity (and bits) row shows the stride it was scored with, as does the JSON.
    for task, result in t.items():
        want = {"lambada": N_CTX, "cbt-cn": None, "cbt-ne": None, "hellaswag": None}.get(task, N_CTX // 2)
        assert result.get("stride") == want, task
        for metric in result["metrics"]:
            shown = str(want) if metric.startswith(("ppl", "bits")) else "-"
            assert f"| {task} | {metric} | {_fmt(result['metrics'][metric])} | {shown} |" in printed, (task, metric)
    assert "| lambada | acc_last_token |" in printed and t["lambada"]["footnote"] in printed
    assert len(report["protocol"]["devices"]) == len(jax.local_devices()) == 8  # batch sharded over all
    assert "paper (no matching size)" in printed


def test_full_bytes_split_and_paper_column(scorer, data_dir):
    res = tasks.TASKS["text8"].run(scorer, Options(data_dir, split="test"))
    assert res["counts"]["characters"] == len((data_dir / "text8" / "text8").read_bytes()) - len((data_dir / "text8" / "text8").read_bytes()) * 95 // 100
    report = {"model": {"paper_size": "117M"}, "protocol": {"limit": None},
              "tasks": {"text8": {"metrics": {"bits_per_char": 1.5}, "paper": {"bits_per_char": 1.17},
                                  "data": {"matches_release": False}}}}
    table = render_table(report, compare_paper=True)
    assert "paper (117M)" in table and "1.1700" in table and "1.5000" in table
    assert "(data files that differ from the released ones: text8)" in table


def test_paper_size_matches_released_shapes():
    from gpt2_jax.config import get_model_config

    assert [paper_size(get_model_config(s)) for s in ("tiny", "small", "medium", "large", "xl")] == [
        None, "small", "medium", "large", "xl"]


def test_lm1b_sentences_per_word(scorer):
    sents = ["The dog did n't bark .", "`` Yes , '' she said ."]
    res = tasks.score_sentences(scorer, sents, stride=64, desc="lm1b")
    assert res["counts"]["words"] == 6 + 1 + 7 + 1
    assert math.isclose(res["metrics"]["ppl_word"], math.exp(res["nll"] / 15))


# --- bad input -------------------------------------------------------------------------------------


def _run_main(args, capsys):
    rc = cli.main(args)
    err = capsys.readouterr().err
    return rc, err


def test_unknown_task_lists_valid_ones(capsys):
    rc, err = _run_main(["--model", "x", "--task", "wikitext2,squad", "--data-dir", "."], capsys)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: unknown task squad; valid tasks: webtext,")


def test_model_dir_that_is_not_one(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    rc, err = _run_main(["--model", str(tmp_path), "--task", "ptb", "--data-dir", "."], capsys)
    assert rc == 1 and err.count("\n") == 1 and "is not a gpt2_jax checkpoint" in err
    rc, err = _run_main(["--model", str(tmp_path / "nope"), "--task", "ptb", "--data-dir", "."], capsys)
    assert rc == 1 and err.count("\n") == 1 and "not a directory" in err


def test_missing_data_file_says_where_to_get_it(hf_dir, tmp_path, capsys):
    rc, err = _run_main(["--model", str(hf_dir), "--task", "wikitext103", "--data-dir", str(tmp_path)], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert f"{tmp_path}/wikitext103/wiki.test.tokens not found" in err
    assert "download https://wikitext.smerity.com/wikitext-103-v1.zip" in err


def test_jsonl_line_without_text(hf_dir, tmp_path, capsys):
    (tmp_path / "webtext").mkdir()
    (tmp_path / "webtext" / "webtext.test.jsonl").write_text('{"text": "fine"}\n{"id": 2, "length": 3}\n')
    rc, err = _run_main(["--model", str(hf_dir), "--task", "webtext", "--data-dir", str(tmp_path)], capsys)
    assert rc == 1 and err.count("\n") == 1 and 'webtext.test.jsonl:2: line has no "text" string' in err


def test_lm1b_without_the_test_shard_is_refused(hf_dir, tmp_path, capsys):
    """The TFDS catalog's lm1b test split merges all 50 held-out shards: never used in its place."""
    rc, err = _run_main(["--model", str(hf_dir), "--task", "lm1b", "--data-dir", str(tmp_path),
                         "--cache-dir", str(tmp_path / "cache")], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("error: lm1b: the test set is news.en.heldout-00000-of-00050 alone")
    assert "extract heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050 and put it at " \
           f"{tmp_path}/lm1b/news.en.heldout-00000-of-00050" in err


def test_lm1b_reads_only_the_test_shard_of_a_tfds_download(scorer, tmp_path):
    """A TFDS catalog build of lm1b leaves its archive extracted in the cache: the test shard is read
    from there, and the other 49 held-out shards beside it are not."""
    heldout = (tmp_path / "cache" / "tfds_catalog" / "downloads" / "extracted" / "TAR_GZ.statmt.lm1b"
               / "1-billion-word-language-modeling-benchmark-r13output" / "heldout-monolingual.tokenized.shuffled")
    heldout.mkdir(parents=True)
    (heldout / "news.en.heldout-00000-of-00050").write_text("The deal closed .\nShares rose 2 % .\n")
    (heldout / "news.en.heldout-00001-of-00050").write_text("Not the test set .\n" * 5)
    res = tasks.TASKS["lm1b"].run(scorer, Options(tmp_path / "data", cache_dir=tmp_path / "cache"))
    assert res["data"]["file"] == str(heldout / "news.en.heldout-00000-of-00050")
    assert res["counts"]["sentences"] == 2 and res["counts"]["words"] == 4 + 5 + 2


def test_cli_subprocess_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.eval", "--model", str(tmp_path), "--task", "nope",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: unknown task nope") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_webtext_on_a_prepared_data_set(hf_dir, shared_data, tmp_path, capsys):
    from gpt2_jax.data import SplitTokens, eval_batches, prepare

    out = tmp_path / "r.json"
    rc = cli.main(["--model", str(hf_dir), "--task", "webtext", "--dataset", "tiny_shakespeare", "--limit", "2",
                   "--data-dir", str(shared_data), "--cache-dir", str(tmp_path / "cache"), "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())["tasks"]["webtext"]
    store = prepare("tiny_shakespeare", cache_dir=tmp_path / "cache", manual_dir=shared_data, progress=False)
    batches = list(eval_batches(store, "validation", seq_len=N_CTX, batch_size=8, stride=N_CTX // 2, max_batches=2))
    targets = np.concatenate([b["tokens"][:, 1:][b["mask"] > 0] for b in batches])
    assert res["counts"]["tokens"] == len(targets) == 2 * 8 * N_CTX // 2 + N_CTX // 2
    assert res["counts"]["bytes"] == len(get_tokenizer().decode_bytes(targets.tolist()))
    assert math.isfinite(res["metrics"]["ppl_byte"]) and len(SplitTokens(store, "validation")) > len(targets)


@pytest.mark.slow
def test_make_train_then_make_eval_every_task(data_dir, tmp_path):
    """A model trained by `make train` (tiny, shrunk to a few steps) evaluated by `make eval` on
    every task, from shared data and test-made files in the original formats."""
    import os

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GPT2_JAX_CACHE_DIR": str(tmp_path / "cache"), "GPT2_JAX_DATA_DIR": str(data_dir)}
    run = tmp_path / "run"
    train_args = f"steps=2 batch_size=4 eval_every=0 eval_batches=1 sample_tokens=4 warmup_steps=1 n_layer=2 n_embd=64 n_head=4 run_dir={run}"
    proc = subprocess.run(["make", "-s", "train", "SIZE=tiny", f"ARGS={train_args}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "eval.json"
    all_tasks = "webtext,wikitext2,wikitext103,ptb,lambada,cbt-cn,cbt-ne,enwik8,text8,lm1b,hellaswag"
    proc = subprocess.run(["make", "-s", "eval", f"MODEL={run}", f"TASKS={all_tasks}", "SPLIT=valid",
                           f"EVAL_ARGS=--limit 4 --compare paper --output {out}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["model"]["kind"] == "gpt2_jax" and report["model"]["config"]["n_embd"] == 64
    assert list(report["tasks"]) == all_tasks.split(",")
    for task, result in report["tasks"].items():
        assert all(v is not None and math.isfinite(v) for v in result["metrics"].values()), task
        assert f"{task} " in proc.stdout
