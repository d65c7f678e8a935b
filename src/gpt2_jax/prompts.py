"""Zero-shot task prompts from the GPT-2 paper (Radford et al. 2019, section 3) and their metrics.

* summarize: the article followed by `TL;DR:`; 100 tokens from top-k sampling with k = 2; the first
  3 generated sentences are the summary; ROUGE-1/2/L F1 (the paper's CNN and Daily Mail setup).
* translate: example pairs `english sentence = french sentence`, one per line, then
  `source sentence =`; greedy decoding, the first generated sentence is the translation; BLEU.
* qa: example pairs `Q: question` / `A: answer`, then `Q: question` / `A:` (optionally after a
  document, as for CoQA); greedy decoding, the first line is the answer; exact match after SQuAD's
  normalization (lower case, no punctuation, no articles).

jsonl records (one JSON object per line): summarize {"article", "summary"?}; translate
{"source", "target"?}; qa {"question", "answer" or "answers"?, "context"?}. References are optional;
metrics are reported when every scored record has one. For translate and qa the first `shots`
records are the in-context examples (and need their reference).
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2_jax import files, jsonl
from gpt2_jax.tokenizer import get_tokenizer


class TaskError(ValueError):
    """A task file or setting that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    input_field: str
    reference_field: str
    sampling: dict[str, Any]  # SamplingConfig defaults from the paper
    default_shots: int


TASKS: dict[str, Task] = {
    # "generate 100 tokens with Top-k random sampling (Fan et al., 2018) with k = 2"
    "summarize": Task("summarize", "article", "summary", dict(max_new_tokens=100, top_k=2, greedy=False), 0),
    # "we sample from the model with greedy decoding"; the paper does not give the number of pairs.
    "translate": Task("translate", "source", "target", dict(max_new_tokens=64, greedy=True), 5),
    "qa": Task("qa", "question", "answers", dict(max_new_tokens=32, greedy=True), 5),
}


# --------------------------------------------------------------------------------------------
# Prompt formats


def summarize_prompt(article: str) -> str:
    return f"{article.strip()}\nTL;DR:"


def translate_prompt(examples: Sequence[tuple[str, str]], source: str) -> str:
    lines = [f"{src.strip()} = {tgt.strip()}" for src, tgt in examples]
    return "\n".join([*lines, f"{source.strip()} ="])


def qa_prompt(examples: Sequence[tuple[str, str]], question: str, context: str | None = None) -> str:
    parts = [context.strip() + "\n\n"] if context else []
    parts += [f"Q: {q.strip()}\nA: {a.strip()}\n\n" for q, a in examples]
    parts.append(f"Q: {question.strip()}\nA:")
    return "".join(parts)


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def sentences(text: str) -> list[str]:
    """Split text into sentences at ., ! or ? followed by white space (closing quotes kept)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def summary_from_generation(text: str) -> str:
    """The paper's summary: the first 3 generated sentences."""
    text = text.split("<|endoftext|>")[0]
    return " ".join(sentences(" ".join(text.split()))[:3])


def translation_from_generation(text: str) -> str:
    """The first generated sentence, on the first line."""
    line = text.strip().split("\n")[0]
    found = sentences(line)
    return found[0] if found else ""


def answer_from_generation(text: str) -> str:
    return text.strip().split("\n")[0].strip()


# --------------------------------------------------------------------------------------------
# Metrics


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (x100), Porter stemming, via Google's `rouge-score`."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for k in totals:
            totals[k] += scores[k].fmeasure
    n = max(1, len(predictions))
    return {k: 100.0 * v / n for k, v in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU with sacrebleu's standard 13a tokenization."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, drop punctuation and articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Percentage of predictions equal to one of their answers after `normalize_answer`."""
    hits = sum(
        any(normalize_answer(p) == normalize_answer(a) for a in golds)
        for p, golds in zip(predictions, answers, strict=True)
    )
    return {"exact_match": 100.0 * hits / max(1, len(predictions))}


# --------------------------------------------------------------------------------------------
# Files and running a task


def _check_text(rec: dict, key: str, where: str, *, required: bool) -> None:
    if key not in rec:
        if required:
            raise TaskError(f"{where}: missing field {key!r}")
        return
    if not isinstance(rec[key], str) or not rec[key].strip():
        raise TaskError(f"{where}: field {key!r} must be a non-empty string")


def read_jsonl(path: str | Path, task: str) -> list[dict[str, Any]]:
    """Read and check a task's jsonl file (one JSON object per line, blank lines skipped)."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    t = TASKS[task]
    records = []
    for where, rec in jsonl.read_objects(path, TaskError):
        _check_text(rec, t.input_field, where, required=True)
        if task == "qa":
            _check_text(rec, "context", where, required=False)
            if "answer" in rec:
                _check_text(rec, "answer", where, required=True)
                rec = {**rec, "answers": [rec["answer"]]}
            elif "answers" in rec:
                ans = rec["answers"]
                if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans):
                    raise TaskError(f"{where}: field 'answers' must be a non-empty list of strings")
        else:
            _check_text(rec, t.reference_field, where, required=False)
        records.append(rec)
    if not records:
        raise TaskError(f"{path} holds no records")
    return records


def _prompt_text(task: str, rec: dict, examples: list[tuple[str, str]]) -> str:
    if task == "summarize":
        return summarize_prompt(rec["article"])
    if task == "translate":
        return translate_prompt(examples, rec["source"])
    return qa_prompt(examples, rec["question"], rec.get("context"))


def _example_pair(task: str, rec: dict) -> tuple[str, str]:
    return (rec["source"], rec["target"]) if task == "translate" else (rec["question"], rec["answers"][0])


def task_prompts(task: str, records: Sequence[dict], examples: Sequence[dict], room: int) -> list[list[int]]:
    """Token prompts for `records`; the oldest in-context examples are dropped until one fits `room`."""
    enc = get_tokenizer()
    pairs = [_example_pair(task, r) for r in examples]
    out = []
    for rec in records:
        for start in range(len(pairs) + 1):
            tokens = enc.encode_ordinary(_prompt_text(task, rec, pairs[start:]))
            if len(tokens) <= room:
                break
        out.append(tokens)  # still too long without examples: Generator applies --truncate
    return out


def postprocess(task: str, text: str) -> str:
    if task == "summarize":
        return summary_from_generation(text)
    if task == "translate":
        return translation_from_generation(text)
    return answer_from_generation(text)


def score(task: str, predictions: Sequence[str], records: Sequence[dict]) -> dict[str, float] | None:
    """The task's metric, or None when some record has no reference."""
    if task == "qa":
        if not all("answers" in r for r in records):
            return None
        return exact_match(predictions, [r["answers"] for r in records])
    ref = TASKS[task].reference_field
    if not all(ref in r for r in records):
        return None
    refs = [r[ref] for r in records]
    return rouge(predictions, refs) if task == "summarize" else bleu(predictions, refs)


def run_task(gen, task: str, records: list[dict], sampling, *, shots: int | None = None, limit: int | None = None,
             batch_size: int = 8, seed: int = 0, truncate: str = "error", output: str | None = None) -> dict[str, Any]:
    """Generate and score a task over records; optionally write predictions as jsonl (atomically)."""
    t = TASKS[task]
    shots = t.default_shots if shots is None else shots
    if shots < 0 or (task == "summarize" and shots):
        raise TaskError("--shots must be >= 0, and summarize takes no examples (the paper's setup is zero-shot)")
    if shots >= len(records):
        raise TaskError(f"--shots {shots} leaves no records to score ({len(records)} in the file)")
    examples, scored = records[:shots], records[shots:]
    need = "answers" if task == "qa" else t.reference_field
    if any(need not in r for r in examples):
        raise TaskError(f"in-context examples (the first {shots} records) need the field {need!r}")
    if limit is not None:
        if limit < 1:
            raise TaskError("--limit must be positive")
        scored = scored[:limit]
    room = gen.config.n_ctx - sampling.max_new_tokens
    prompts = task_prompts(task, scored, examples, room)
    enc = get_tokenizer()
    predictions, generations = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc=task, unit="batch", file=sys.stderr):
        result = gen.generate_tokens(prompts[i:i + batch_size], sampling, seed=seed + i, truncate=truncate)
        for row in result.rows():
            text = enc.decode(row)
            generations.append(text)
            predictions.append(postprocess(task, text))
    metrics = score(task, predictions, scored)
    if output is not None:
        lines = [
            json.dumps({**rec, "prediction": pred, "generation": gen_text}, ensure_ascii=False)
            for rec, pred, gen_text in zip(scored, predictions, generations)
        ]
        files.write_text(output, "\n".join(lines) + "\n")
    return {"task": task, "records": len(scored), "shots": shots, "sampling": dataclasses.asdict(sampling),
            "metrics": metrics}
