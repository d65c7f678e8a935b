"""Zero-shot task prompts from the GPT-2 paper (Radford et al. 2019, section 3) and their metrics.

* summarize: the article's start, its tail cut to fit the context, then `\nTL;DR:`; 100 tokens from
  top-k sampling with k = 2; the first 3 generated sentences are the summary; ROUGE-1, ROUGE-2 and
  ROUGE-Lsum F1 and their mean R-AVG (the paper's CNN and Daily Mail setup, Table 4).
* translate: example pairs `english sentence = french sentence`, one per line, then
  `source sentence =`; greedy decoding, the first generated sentence is the translation; BLEU.
* qa: example pairs `Q: question` / `A: answer`, then `Q: question` / `A:` (optionally after a
  document); greedy decoding, the first line is the answer; exact match after SQuAD's normalization
  (lower case, no punctuation, no articles). For Natural Questions-style records.
* coqa: CoQA's own JSON file. Each question's prompt is its story, that dialogue's earlier turns as
  `Q:`/`A:` lines, then `Q: question` / `A:`; greedy decoding to the end of the line; CoQA's official
  F1 (and exact match) over its reference answers.

jsonl records (one JSON object per line): summarize {"article", "summary"?}; translate
{"source", "target"?}; qa {"question", "answer" or "answers"?, "context"?}. References are optional;
metrics are reported when every scored record has one. For translate and qa the first `shots`
records are the in-context examples (and need their reference).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2_jax import files, jsonl
from gpt2_jax.tokenizer import get_tokenizer


class TaskError(ValueError):
    """A task file or setting that cannot be used."""


# --------------------------------------------------------------------------------------------
# Prompt formats

TLDR = "\nTL;DR:"


def summarize_prompt(article: str) -> str:
    return f"{article.strip()}{TLDR}"


def translate_prompt(examples: Sequence[tuple[str, str]], source: str) -> str:
    lines = [f"{src.strip()} = {tgt.strip()}" for src, tgt in examples]
    return "\n".join([*lines, f"{source.strip()} ="])


def qa_prompt(examples: Sequence[tuple[str, str]], question: str, context: str | None = None) -> str:
    parts = [context.strip() + "\n\n"] if context else []
    parts += [f"Q: {q.strip()}\nA: {a.strip()}\n\n" for q, a in examples]
    parts.append(f"Q: {question.strip()}\nA:")
    return "".join(parts)


def coqa_prompt(story: str, history: Sequence[tuple[str, str]], question: str) -> str:
    """The story, a blank line, the dialogue's earlier turns as `Q:`/`A:` lines, then `Q: ...\nA:`."""
    turns = [f"Q: {q.strip()}\nA: {a.strip()}\n" for q, a in history]
    return f"{story.strip()}\n\n" + "".join(turns) + f"Q: {question.strip()}\nA:"


def summarize_tokens(article: str, room: int) -> list[int]:
    """The summarize prompt in at most `room` tokens: the article's first tokens (its tail cut where it
    does not fit), then `\nTL;DR:` always. The two parts encode apart exactly as together: BPE never
    merges across the newline."""
    enc = get_tokenizer()
    suffix = enc.encode_ordinary(TLDR)
    if room <= len(suffix):
        raise TaskError(f"the context leaves {room} tokens for the prompt: no room for an article before {TLDR!r}")
    return enc.encode_ordinary(article.strip())[: room - len(suffix)] + suffix


def fit_dropping_oldest(make: Callable[[Sequence[tuple[str, str]]], str], pairs: Sequence[tuple[str, str]],
                        room: int) -> list[int]:
    """Tokens of `make(pairs[k:])` for the smallest k that fits `room` (the oldest pairs go first);
    still too long without any pair: all of it, for the Generator's --truncate to handle."""
    enc = get_tokenizer()
    for start in range(len(pairs) + 1):
        tokens = enc.encode_ordinary(make(pairs[start:]))
        if len(tokens) <= room:
            break
    return tokens


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


def line_from_generation(text: str) -> str:
    """The generated text up to the end of its first line (decoding stopped there)."""
    return text.split("\n")[0].strip()


@functools.lru_cache(maxsize=1)
def newline_ids() -> tuple[int, ...]:
    """Every token whose bytes hold a newline: decoding "to the end of the line" stops at any of them."""
    enc = get_tokenizer()
    return tuple(i for i in range(enc.n_vocab) if b"\n" in enc.decode_single_token_bytes(i))


# --------------------------------------------------------------------------------------------
# Metrics


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-Lsum F1 (x100) with Porter stemming, via Google's
    `rouge-score`, and R-AVG, their mean (the paper's Table 4). ROUGE-Lsum takes the longest common
    subsequence per sentence (`sentences`, one per line), as CNN/Daily Mail summaries are scored."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score("\n".join(sentences(ref)), "\n".join(sentences(pred)))
        for k in kinds:
            totals[k] += scores[k].fmeasure
    n = max(1, len(predictions))
    out = {k: 100.0 * v / n for k, v in totals.items()}
    out["r_avg"] = sum(out.values()) / len(kinds)
    return out


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU with sacrebleu's standard 13a tokenization."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization, which CoQA's evaluation uses too: lower case, drop punctuation
    and the articles a/an/the, collapse white space."""
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


def word_f1(reference: str, prediction: str) -> float:
    """F1 of the normalized words two answers share (counted with multiplicity); two empty answers
    (CoQA's "unknown" normalizes to a word, an empty string to none) agree fully."""
    ref, pred = normalize_answer(reference).split(), normalize_answer(prediction).split()
    if not ref or not pred:
        return float(ref == pred)
    shared = sum((collections.Counter(ref) & collections.Counter(pred)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def coqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """CoQA's official F1 and exact match (x100), averaged over questions. With n > 1 reference
    answers a prediction is scored against each n - 1 of them (its best match among them) and the n
    scores are averaged, as human performance is measured; with one, against that one."""
    f1 = em = 0.0
    for pred, golds in zip(predictions, answers, strict=True):
        pools = [golds[:i] + golds[i + 1:] for i in range(len(golds))] if len(golds) > 1 else [golds]
        f1 += sum(max(word_f1(g, pred) for g in pool) for pool in pools) / len(pools)
        em += sum(max(float(normalize_answer(g) == normalize_answer(pred)) for g in pool) for pool in pools) / len(pools)
    n = max(1, len(predictions))
    return {"f1": 100.0 * f1 / n, "exact_match": 100.0 * em / n}


# --------------------------------------------------------------------------------------------
# Files


def _check_text(rec: dict, key: str, where: str, *, required: bool) -> None:
    if key not in rec:
        if required:
            raise TaskError(f"{where}: missing field {key!r}")
        return
    if not isinstance(rec[key], str) or not rec[key].strip():
        raise TaskError(f"{where}: field {key!r} must be a non-empty string")


def read_jsonl(path: str | Path, task: str) -> list[dict[str, Any]]:
    """Read and check a jsonl task's file (one JSON object per line, blank lines skipped)."""
    t = _task(task)
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


def _text_of(item: Any, where: str) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("input_text"), str):
        raise TaskError(f'{where}: expected an object with an "input_text" string')
    return item["input_text"]


def read_coqa(path: str | Path) -> list[dict[str, Any]]:
    """One record per question of a CoQA file ({"data": [{"id", "story", "questions", "answers",
    "additional_answers"?}]}, turns matched by "turn_id"): id, turn_id, story, history (the earlier
    turns' question and answer), question, answers (the answer, then the additional ones)."""
    doc = jsonl.read_document(path, TaskError, "CoQA file")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise TaskError(f'{path}: not a CoQA file (expected an object with a "data" list)')
    records = []
    for k, dialog in enumerate(doc["data"]):
        where = f"{path}: data[{k}]"
        if not isinstance(dialog, dict):
            raise TaskError(f"{where}: expected an object")
        story, questions, answers = dialog.get("story"), dialog.get("questions"), dialog.get("answers")
        if not isinstance(story, str) or not story.strip():
            raise TaskError(f'{where}: "story" must be a non-empty string')
        if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
            raise TaskError(f'{where}: "questions" and "answers" must be lists of the same length')
        extra = dialog.get("additional_answers", {})
        if not isinstance(extra, dict) or not all(isinstance(v, list) and len(v) == len(questions) for v in extra.values()):
            raise TaskError(f'{where}: "additional_answers" must map names to lists of one answer per question')
        history: list[tuple[str, str]] = []
        for i, (q, a) in enumerate(zip(questions, answers)):
            turn = q.get("turn_id") if isinstance(q, dict) else None
            if any(isinstance(x, dict) and x.get("turn_id") != turn for x in [a, *(v[i] for v in extra.values())]):
                raise TaskError(f"{where}: answer {i} belongs to another turn than question {i} (turn_id)")
            question = _text_of(q, f"{where}: questions[{i}]")
            golds = [_text_of(a, f"{where}: answers[{i}]")]
            golds += [_text_of(v[i], f"{where}: additional_answers[{name!r}][{i}]") for name, v in extra.items()]
            records.append({"id": dialog.get("id", str(k)), "turn_id": turn, "story": story, "history": list(history),
                            "question": question, "answers": golds})
            history.append((question, golds[0]))
    if not records:
        raise TaskError(f"{path} holds no questions")
    return records


# --------------------------------------------------------------------------------------------
# The tasks


@dataclasses.dataclass(frozen=True)
class Task:
    """One zero-shot generation task and every fact about it."""

    name: str
    input_field: str  # the field every record has
    reference_field: str  # where a record's reference answer(s) are
    sampling: dict[str, Any]  # SamplingConfig defaults from the paper
    default_shots: int  # in-context examples taken from the first records (0: the task takes none)
    read: Callable[[str | Path], list[dict[str, Any]]]  # input file -> checked records
    prompt: Callable[[dict, Sequence[dict], int], list[int]]  # (record, examples, room) -> prompt tokens
    postprocess: Callable[[str], str]  # generated text -> prediction
    metric: Callable[[Sequence[str], Sequence[Any]], dict[str, float]]  # (predictions, references)
    stop_at_newline: bool = False  # decoding ends with the line
    prompt_only: tuple[str, ...] = ()  # record fields left out of the predictions file


TASKS: dict[str, Task] = {t.name: t for t in (
    # "generate 100 tokens with Top-k random sampling (Fan et al., 2018) with k = 2"
    Task("summarize", "article", "summary", dict(max_new_tokens=100, top_k=2, greedy=False), 0,
         functools.partial(read_jsonl, task="summarize"),
         lambda rec, examples, room: summarize_tokens(rec["article"], room),
         summary_from_generation, rouge),
    # "we sample from the model with greedy decoding"; the paper does not give the number of pairs.
    Task("translate", "source", "target", dict(max_new_tokens=64, greedy=True), 5,
         functools.partial(read_jsonl, task="translate"),
         lambda rec, examples, room: fit_dropping_oldest(
             lambda pairs: translate_prompt(pairs, rec["source"]), [(e["source"], e["target"]) for e in examples], room),
         translation_from_generation, bleu),
    Task("qa", "question", "answers", dict(max_new_tokens=32, greedy=True), 5,
         functools.partial(read_jsonl, task="qa"),
         lambda rec, examples, room: fit_dropping_oldest(
             lambda pairs: qa_prompt(pairs, rec["question"], rec.get("context")),
             [(e["question"], e["answers"][0]) for e in examples], room),
         answer_from_generation, exact_match),
    # "conditioned on a document from the associated dataset, the history of the associated dialogue,
    # and a final token A:"; greedy decoding; F1. When the dialogue does not fit, its oldest turns go.
    Task("coqa", "question", "answers", dict(max_new_tokens=32, greedy=True), 0, read_coqa,
         lambda rec, examples, room: fit_dropping_oldest(
             lambda turns: coqa_prompt(rec["story"], turns, rec["question"]), rec["history"], room),
         line_from_generation, coqa_scores, stop_at_newline=True, prompt_only=("story", "history")),
)}


def _task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


def read_records(path: str | Path, task: str) -> list[dict[str, Any]]:
    """Read and check a task's input file (jsonl, or CoQA's JSON for coqa)."""
    return _task(task).read(path)


def task_prompts(task: str, records: Sequence[dict], examples: Sequence[dict], room: int) -> list[list[int]]:
    """Token prompts for `records` in at most `room` tokens where the task's format can make them fit."""
    t = _task(task)
    return [t.prompt(rec, examples, room) for rec in records]


def score(task: str, predictions: Sequence[str], records: Sequence[dict]) -> dict[str, float] | None:
    """The task's metric, or None when some record has no reference."""
    ref = _task(task).reference_field
    if not all(ref in r for r in records):
        return None
    return TASKS[task].metric(predictions, [r[ref] for r in records])


def run_task(gen, task: str, records: list[dict], sampling, *, shots: int | None = None, limit: int | None = None,
             batch_size: int = 8, seed: int = 0, truncate: str = "error", output: str | None = None) -> dict[str, Any]:
    """Generate and score a task over records; optionally write predictions as jsonl (atomically)."""
    t = _task(task)
    shots = t.default_shots if shots is None else shots
    if shots < 0 or (t.default_shots == 0 and shots):
        raise TaskError(f"--shots must be >= 0, and {task} takes no in-context examples (the paper's setup)")
    if shots >= len(records):
        raise TaskError(f"--shots {shots} leaves no records to score ({len(records)} in the file)")
    examples, scored = records[:shots], records[shots:]
    if any(t.reference_field not in r for r in examples):
        raise TaskError(f"in-context examples (the first {shots} records) need the field {t.reference_field!r}")
    if limit is not None:
        if limit < 1:
            raise TaskError("--limit must be positive")
        scored = scored[:limit]
    if t.stop_at_newline:
        sampling = dataclasses.replace(sampling, stop_ids=newline_ids())
    room = gen.config.n_ctx - sampling.max_new_tokens
    prompts = task_prompts(task, scored, examples, room)
    enc = get_tokenizer()
    predictions, generations = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc=task, unit="batch", file=sys.stderr):
        result = gen.generate_tokens(prompts[i:i + batch_size], sampling, seed=seed + i, truncate=truncate)
        for row in result.rows():
            text = enc.decode(row)
            generations.append(text)
            predictions.append(t.postprocess(text))
    metrics = score(task, predictions, scored)
    if output is not None:
        lines = [
            json.dumps({**{k: v for k, v in rec.items() if k not in t.prompt_only}, "prediction": pred,
                        "generation": gen_text}, ensure_ascii=False)
            for rec, pred, gen_text in zip(scored, predictions, generations)
        ]
        files.write_text(output, "\n".join(lines) + "\n")
    sampling_report = {k: v for k, v in dataclasses.asdict(sampling).items() if k != "stop_ids"}
    if sampling.stop_ids:
        sampling_report["stop"] = "end of line"
    return {"task": task, "records": len(scored), "shots": shots, "sampling": sampling_report, "metrics": metrics}
