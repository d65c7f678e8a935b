"""lm-evaluation-harness adapter (`--model gpt2_jax`): offline, on tasks defined in local YAML files
over local jsonl files; every figure equal to lm-eval's own HF backend on the same random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import lm_eval
from lm_eval.tasks import TaskManager

from gpt2_jax.eval import Scorer, tasks
from gpt2_jax.harness.adapter import GPT2JaxLM
from gpt2_jax.tokenizer import bpe_files_dir, get_tokenizer
from helpers import HELLASWAG_ITEMS, random_hf_gpt2

N_CTX = 64  # short: the long context, the long document and the prompts cross it
TASKS = ("gj_choice", "gj_rolling", "gj_generate")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

DOCUMENTS = ["Hello world. This is a short document.", "Ünïcödé text – with “quotes” and 東京. " * 9,
             "The quick brown fox jumps over the lazy dog. " * 4]
PROMPTS = [{"question": "Q: What is the capital of France?\nA:", "answer": " Paris"},
           {"question": "Once upon a time", "answer": " there"},
           {"question": " ".join(["A long prompt that the context has to cut from the left."] * 8), "answer": " x"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 with the real vocabulary and a GPT-2 tokenizer built from the BPE files, as an
    HF directory both backends load."""
    from transformers import GPT2TokenizerFast

    d = tmp_path_factory.mktemp("hf")
    random_hf_gpt2(d, vocab_size=50257, n_positions=N_CTX, n_embd=40, n_layer=2, n_head=4, seed=5)
    vocab = json.loads((bpe_files_dir() / "encoder.json").read_text())
    merges = [tuple(m.split(" ")) for m in (bpe_files_dir() / "vocab.bpe").read_text().split("\n")[1:] if m]
    GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three tasks in local YAML over local jsonl: multiple choice over HellaSwag items in their
    original schema, rolling log-likelihood of documents, and generation until a stop string."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "choice.jsonl").write_text("".join(json.dumps(x) + "\n" for x in HELLASWAG_ITEMS))
    (d / "rolling.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS))
    (d / "generate.jsonl").write_text("".join(json.dumps(x) + "\n" for x in PROMPTS))

    def task(name, data, body):
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {d / data}\n"
            f"  cache_dir: {d / 'datasets_cache'}\nvalidation_split: validation\n" + body)

    task("gj_choice", "choice.jsonl", 'output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\n'
         'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n')
    task("gj_rolling", "rolling.jsonl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    task("gj_generate", "generate.jsonl", 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
         'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n')
    return d


@pytest.fixture(scope="module")
def results(hf_dir, task_dir):
    """lm_eval.simple_evaluate with the model gpt2_jax and with lm-eval's HF backend (one row per
    batch there: its batches are left-padded without position ids)."""
    env = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        manager = TaskManager(include_path=str(task_dir))
        run = lambda model, args, batch: lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=list(TASKS), task_manager=manager, batch_size=batch, device="cpu",
            log_samples=True)
        return {"gpt2_jax": run("gpt2_jax", f"model={hf_dir}", 4), "hf": run("hf", f"pretrained={hf_dir},dtype=float32", 1)}
    finally:
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _responses(result, task):
    return [s["filtered_resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_every_figure_equals_lm_eval_hf_backend(results):
    ours, hf = results["gpt2_jax"], results["hf"]
    for (a, b) in zip(_responses(ours, "gj_choice"), _responses(hf, "gj_choice")):
        np.testing.assert_allclose([ll for ll, _ in a], [ll for ll, _ in b], rtol=1e-6)
        assert [g for _, g in a] == [g for _, g in b]
    np.testing.assert_allclose(_responses(ours, "gj_rolling"), _responses(hf, "gj_rolling"), rtol=1e-6)
    assert _responses(ours, "gj_generate") == _responses(hf, "gj_generate")
    assert len({r[0] for r in _responses(ours, "gj_generate")}) > 1  # not one continuation for all
    for task in TASKS:
        for metric, value in ours["results"][task].items():
            if isinstance(value, float):
                assert value == pytest.approx(hf["results"][task][metric], rel=1e-6), (task, metric)
    assert ours["results"]["gj_choice"]["sample_len"] == len(HELLASWAG_ITEMS)


def test_multiple_choice_equals_the_hellaswag_task(results, hf_dir):
    """lm-eval's acc and acc_bytes through the adapter are our HellaSwag task's acc_sum and
    acc_per_byte on the same items (same protocol: ctx + " " + ending, no <|endoftext|>)."""
    from gpt2_jax import weights

    scorer = Scorer(*weights.load(hf_dir))
    items = [tasks.HellaSwagItem(x["ctx"], tuple(x["endings"]), int(x["label"])) for x in HELLASWAG_ITEMS]
    ours = tasks.score_hellaswag(scorer, items)["metrics"]
    harness = results["gpt2_jax"]["results"]["gj_choice"]
    assert harness["acc,none"] * 100 == ours["acc_sum"] and harness["acc_bytes,none"] * 100 == ours["acc_per_byte"]
    lls = [np.array([ll for ll, _ in r]) for r in _responses(results["gpt2_jax"], "gj_choice")]
    for ll, (total, _) in zip(lls, tasks.hellaswag_loglikelihoods(scorer, items)):
        np.testing.assert_allclose(ll, total, rtol=1e-6)


def test_generate_until_cuts_at_the_stop_strings(hf_dir):
    lm = GPT2JaxLM(model=str(hf_dir), batch_size=2)
    request = lambda ctx, **kw: SimpleNamespace(args=(ctx, {"max_gen_toks": 10, **kw}))
    (full,) = lm.generate_until([request("Once upon a time")])
    assert len(get_tokenizer().encode(full)) >= 9
    stop = full[4:7]
    cut = lm.generate_until([request("Once upon a time", until=[stop]), request("Once upon a time", until=stop),
                             request("Hello", until=["zzz"]), request("Once upon a time", until=["qqq", stop])])
    assert cut[0] == cut[1] == cut[3] == full.split(stop)[0] != full
    assert cut[2] == lm.generate_until([request("Hello")])[0]


def test_lm_eval_command_line(hf_dir, task_dir, results, tmp_path):
    """`python -m gpt2_jax.harness --model gpt2_jax --model_args model=PATH --tasks ...`: lm-eval's
    command line with the model registered; its results file holds the in-process figures."""
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.harness", "--model", "gpt2_jax", "--model_args", f"model={hf_dir}",
         "--tasks", "gj_choice,gj_rolling", "--include_path", str(task_dir), "--batch_size", "4",
         "--output_path", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "out").rglob("results_*.json")
    figures = json.loads(out.read_text())["results"]
    for task in ("gj_choice", "gj_rolling"):
        want = results["gpt2_jax"]["results"][task]
        assert {k: v for k, v in figures[task].items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in want.items() if isinstance(v, float)}, rel=1e-6)  # 1 device there, 8 here
    assert f"gpt2_jax ({{'model': '{hf_dir}'}})" in proc.stdout and "|gj_choice" in proc.stdout  # lm-eval's table


def test_a_model_that_is_not_one_is_one_line(tmp_path, task_dir):
    """Checked before lm-eval reads a task: the only line on stderr names the model= given."""
    nowhere = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.harness", "--model", "gpt2_jax", "--model_args", f"model={nowhere}",
         "--tasks", "gj_choice", "--include_path", str(task_dir)],
        capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: --model_args model={nowhere}: {nowhere} does not exist (a checkpoint, run directory, HF directory or random:SIZE)"]
