"""The tasks scored by accuracy: LAMBADA and the Children's Book Test (Radford et al. 2019, Table 3)
and HellaSwag (which postdates the paper). Each reads its data set in the original distribution
format, applies its protocol (written beside its code) and returns its figures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_jax import jsonl
from gpt2_jax.eval.common import EvalError, EvalTask, Options, encode, read_jsonl_texts, read_text
from gpt2_jax.eval.detokenize import moses_detokenize
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer


# ---------------------------------------------------------------------------------------------
LAMBADA_PROTOCOL = (
    "LAMBADA. Protocol: OpenAI's detokenized test set (5,153 passages); the target is the last "
    'space-separated word. Context = <|endoftext|> + passage without " word", target = BPE(" word"),'
    " scored in one window (the longest context that fits). The paper's own protocol is unpublished "
    "and published figures differ by protocol, so three variants are reported. last_token: only the"
    " passage's final BPE token; accuracy = it is the argmax, perplexity = exp(mean NLL of that "
    "token). whole_word (lm-evaluation-harness's lambada_openai): greedy decoding must reproduce ALL"
    " the word's BPE tokens, i.e. each is the argmax given the context and the word's earlier "
    "tokens; perplexity = exp(mean over passages of the word's NLL). whole_word_stopword_filter "
    "(paper section 3.3): as whole_word, but the word's first token is the argmax over the tokens "
    "that are not a stop word (the function words of gpt2_jax.eval.accuracy.LAMBADA_STOP_WORDS, each as one"
    " space-prefixed token, lower case or capitalized; the paper's list is unpublished)."
)
LAMBADA_FOOTNOTE = (
    "lambada: the paper's protocol is unpublished; its figures stand beside the last-token variant, "
    "the one whose published reproduction comes closest. Published figures for the 117M model: last"
    " BPE token 46.89% (openai/gpt-2 issue #131); whole word 32.56% and 40.06 ppl with "
    "lm-evaluation-harness's lambada_openai (EleutherAI/lm-evaluation-harness issue #2159; for the "
    "1542M model 10.63 ppl against the paper's 8.63, issue #911); whole word with a stop-word filter"
    " about 31% (huggingface/transformers issue #491, on a differently preprocessed text). The paper "
    "credits its filter for the 1542M model's 63.24% (52.66% without it)."
)

# Our list of English function words for the stop-word filter (the paper does not publish its own):
# articles and determiners, pronouns, forms of be/have/do, modal verbs, prepositions,
# conjunctions and a few function adverbs. LAMBADA's targets are mostly content words.
LAMBADA_STOP_WORDS = frozenset("""
    a an the this that these those some any no every each all both either neither another other such
    much many more most few several
    i me my mine myself you your yours yourself he him his himself she her hers herself it its itself
    we us our ours ourselves they them their theirs themselves who whom whose which what
    am is are was were be been being have has had having do does did doing
    will would shall should can could may might must
    of in on at by for with about against between into through during before after above below to from
    up down out off over under around across along behind beside near toward towards upon within
    without onto
    and but or nor so yet if because as until while than though although unless whether since when
    where why how then there here
    not only own same too very just now also even still ever never always
""".split())


@functools.lru_cache(maxsize=1)
def lambada_stop_ids() -> frozenset[int]:
    """Token ids of the stop words that are one space-prefixed token (as written, and capitalized):
    the first tokens a filtered prediction may not start with."""
    enc, ids = get_tokenizer(), set()
    for word in LAMBADA_STOP_WORDS:
        for form in (word, word.capitalize()):
            tokens = enc.encode_ordinary(" " + form)
            if len(tokens) == 1:
                ids.add(tokens[0])
    return frozenset(ids)


def lambada_split(text: str) -> tuple[str, str]:
    """(context, " last_word") of a LAMBADA passage."""
    context, sep, word = text.rstrip().rpartition(" ")
    if not sep or not word:
        raise ValueError("a LAMBADA passage needs a context and a last word")
    return context, " " + word


def score_lambada(scorer: Scorer, texts: list[str], *, desc: str = "lambada") -> dict[str, Any]:
    """The three LAMBADA variants of `LAMBADA_PROTOCOL` (accuracy in %)."""
    seqs, firsts = [], []
    for text in texts:
        context, word = lambada_split(text)
        ctx = [EOT_ID, *encode(context)]
        seqs.append(np.array(ctx + encode(word), np.int32))
        firsts.append(len(ctx))
    scored = scorer.score_sequences(seqs, firsts, stride=scorer.n_ctx, desc=desc)
    n, stops = len(texts), lambada_stop_ids()
    whole = [bool(hit.all()) for _, hit in scored]
    # The filtered prediction starts with the argmax over the non-stop tokens. Where the plain argmax
    # is the target's first token that is the same token (unless it is a stop word itself: never
    # predicted); where a stop word beat it, only a second look with stop words excluded can tell.
    first_ok = [bool(hit[0]) and int(seq[f]) not in stops for (_, hit), seq, f in zip(scored, seqs, firsts)]
    recheck = [i for i, (_, hit) in enumerate(scored)
               if not hit[0] and hit[1:].all() and int(seqs[i][firsts[i]]) not in stops]
    if recheck:
        # The same window as above (it ends at the passage's end), cut after the word's first token.
        starts = [max(0, len(seqs[i]) - 1 - scorer.n_ctx) for i in recheck]
        again = scorer.score_sequences(
            [seqs[i][lo : firsts[i] + 1] for i, lo in zip(recheck, starts)],
            [firsts[i] - lo for i, lo in zip(recheck, starts)],
            stride=scorer.n_ctx, desc=f"{desc} (stop-word filter)", exclude=stops,
        )
        for i, (_, hit) in zip(recheck, again):
            first_ok[i] = bool(hit[0])
    filtered = [ok and bool(hit[1:].all()) for ok, (_, hit) in zip(first_ok, scored)]
    word_nll = [-float(lp.sum()) for lp, _ in scored]
    last_nll = [-float(lp[-1]) for lp, _ in scored]
    return {
        "metrics": {
            "acc_last_token": 100.0 * sum(bool(hit[-1]) for _, hit in scored) / n,
            "ppl_last_token": math.exp(sum(last_nll) / n),
            "acc_whole_word": 100.0 * sum(whole) / n,
            "ppl_whole_word": math.exp(sum(word_nll) / n),
            "acc_whole_word_stopword_filter": 100.0 * sum(filtered) / n,
        },
        "counts": {"passages": n, "target_tokens": sum(len(lp) for lp, _ in scored),
                   "stop_word_tokens": len(stops), "rescored_with_filter": len(recheck)},
        "stride": scorer.n_ctx,
        "correct": {"last_token": [bool(hit[-1]) for _, hit in scored], "whole_word": whole,
                    "whole_word_stopword_filter": filtered},
    }


def run_lambada(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = task.resolve(opts)  # the test set whatever the split (the file name has no {split})
    texts = read_jsonl_texts(path, task.name, opts.limit)
    for i, t in enumerate(texts, 1):
        if " " not in t.strip():
            raise EvalError(f"lambada: {path}:{i}: passage has no last word to predict")
    out = score_lambada(scorer, texts)
    out["data"] = {"file": str(path), "split": "test"}
    return out


# ---------------------------------------------------------------------------------------------
CBT_PROTOCOL = (
    "Children's Book Test (CN: common nouns, NE: named entities). Protocol (paper 3.2): for each of"
    " the 10 candidates, fill the query's blank with it and compute the log-probability of the "
    'whole completed query sentence given the 20 context sentences; predict the candidate with the '
    'highest total. Text is detokenized (PTB quotes, punctuation) and starts with <|endoftext|>; if'
    ' it does not fit the context, the oldest context tokens are dropped.'
)


@dataclasses.dataclass(frozen=True)
class CBTQuestion:
    context: list[str]
    query: str
    answer: str
    candidates: list[str]


# The Children's Book Test marks the word to fill in its 21st sentence with this literal string.
CBT_BLANK = "XXXXX"


def parse_cbt(text: str, source: str = "cbt") -> list[CBTQuestion]:
    """Questions of a CBT file: numbered lines 1-20 of story, line 21 `query\\tanswer\\t\\tc1|...|c10`."""
    out, context = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        num, _, rest = line.partition(" ")
        if not num.isdigit():
            raise EvalError(f"{source}:{lineno}: CBT lines start with a sentence number")
        if "\t" not in rest:
            context.append(rest)
            continue
        fields = rest.split("\t")
        if len(fields) != 4:
            raise EvalError(f"{source}:{lineno}: query line needs query, answer, (empty), candidates")
        query, answer, _, cands = fields
        candidates = [c for c in cands.split("|") if c]
        if CBT_BLANK not in query or answer not in candidates or not context:
            raise EvalError(f"{source}:{lineno}: malformed CBT question (no {CBT_BLANK}, answer not a candidate, or no story)")
        out.append(CBTQuestion(context, query, answer, candidates))
        context = []
    return out


def score_cbt(scorer: Scorer, questions: list[CBTQuestion], *, desc: str) -> dict[str, Any]:
    seqs, firsts = [], []
    for q in questions:
        ctx = [EOT_ID, *encode(moses_detokenize(" ".join(q.context)))]
        for c in q.candidates:
            sentence = encode(" " + moses_detokenize(q.query.replace(CBT_BLANK, c)))
            if len(sentence) > scorer.n_ctx:
                raise EvalError(f"{desc}: a query sentence of {len(sentence)} tokens does not fit n_ctx={scorer.n_ctx}")
            seq = ctx + sentence
            keep = seq[-(scorer.n_ctx + 1):]
            seqs.append(np.array(keep, np.int32))
            firsts.append(len(keep) - len(sentence))
    scored = scorer.score_sequences(seqs, firsts, stride=scorer.n_ctx, desc=desc)
    correct, k = 0, 0
    for q in questions:
        totals = [float(scored[k + j][0].sum()) for j in range(len(q.candidates))]
        correct += q.candidates[int(np.argmax(totals))] == q.answer
        k += len(q.candidates)
    n = len(questions)
    return {"metrics": {"acc": 100.0 * correct / n}, "counts": {"questions": n, "candidates": k}}


def run_cbt(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = task.resolve(opts)
    questions = parse_cbt(read_text(path, task.name), str(path))[: opts.limit]
    if not questions:
        raise EvalError(f"{task.name}: {path} holds no questions")
    out = score_cbt(scorer, questions, desc=task.name)
    out["data"] = {"file": str(path)}
    return out


# ---------------------------------------------------------------------------------------------
HELLASWAG_PROTOCOL = (
    "HellaSwag (Zellers et al. 2019). Protocol: the 10,042 validation items of hellaswag_val.jsonl in its"
    " original schema (ctx, endings, label), as the published GPT-2 reproductions score them: each of the"
    ' 4 endings is a continuation of the context, BPE(ctx) + BPE(" " + ending), with no <|endoftext|> '
    "prefix, the context cut from the left where the row would not fit n_ctx; the ending's log-"
    "probability is summed over its tokens. The prediction is the ending with the highest score, by one"
    " of three rules: acc_sum, the summed log-probability (lm-evaluation-harness's acc); acc_per_byte, the"
    " sum divided by the ending's length in UTF-8 bytes without its leading space (lm-evaluation-harness's"
    " acc_bytes; its acc_norm divides by characters, which differ only where an ending holds non-ASCII "
    "text); acc_per_token, the mean log-probability per token of the ending (the acc_norm of llm.c and "
    "of the 'Let's reproduce GPT-2 (124M)' lecture code). lm-evaluation-harness's own hellaswag task "
    "scores a preprocessed text (activity label prefixed, bracketed WikiHow artifacts removed), so its "
    "figures are not these."
)
HELLASWAG_FOOTNOTE = (
    "hellaswag: HellaSwag postdates the GPT-2 paper. Beside acc_sum and acc_per_token stand the figures"
    " published for OpenAI's released weights under this protocol on all 10,042 validation items: "
    "28.59% and 29.55% for the 124M model, 38.42% and 48.93% for the 1558M one (karpathy/build-nanogpt "
    "and karpathy/llm.c, hellaswag.py, where they are called acc and acc_norm). The same source gives "
    "lm-evaluation-harness's figures on its preprocessed text: acc 28.92%, acc_norm 31.14% (124M)."
)


@dataclasses.dataclass(frozen=True)
class HellaSwagItem:
    ctx: str
    endings: tuple[str, ...]
    label: int


def read_hellaswag(path: Path, limit: int | None = None) -> list[HellaSwagItem]:
    """The items of a HellaSwag jsonl file in its original schema (`ctx`, `endings`, `label`)."""
    items = []
    for where, record in jsonl.read_objects(path, EvalError, "data file"):
        if limit is not None and len(items) >= limit:
            break
        ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
        if not isinstance(ctx, str) or not (isinstance(endings, list) and endings and all(isinstance(e, str) for e in endings)):
            raise EvalError(f'hellaswag: {where}: an item needs "ctx" (a string) and "endings" (a list of strings)')
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise EvalError(f'hellaswag: {where}: "label" must be the index of the right ending (0-{len(endings) - 1}), '
                            f"got {label!r} (the test set's labels are not public: use hellaswag_val.jsonl)")
        items.append(HellaSwagItem(ctx, tuple(endings), label))
    if not items:
        raise EvalError(f"hellaswag: {path} holds no items")
    return items


def hellaswag_loglikelihoods(scorer: Scorer, items: list[HellaSwagItem], *, desc: str = "hellaswag"
                             ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item, (summed log-probability of each ending given the context, its number of tokens)."""
    seqs, firsts = [], []
    for item in items:
        ctx = encode(item.ctx) or [EOT_ID]  # an empty context is conditioned on <|endoftext|>
        for ending in item.endings:
            seqs.append(np.array(ctx + encode(" " + ending), np.int32))
            firsts.append(len(ctx))
    scored = iter(scorer.score_sequences(seqs, firsts, stride=scorer.n_ctx, desc=desc))
    out = []
    for item in items:
        logps = [lp for lp, _ in (next(scored) for _ in item.endings)]
        out.append((np.array([float(lp.sum()) for lp in logps]), np.array([len(lp) for lp in logps])))
    return out


def score_hellaswag(scorer: Scorer, items: list[HellaSwagItem], *, desc: str = "hellaswag") -> dict[str, Any]:
    """The three HellaSwag accuracies of `HELLASWAG_PROTOCOL` (in %)."""
    correct = {"acc_sum": 0, "acc_per_byte": 0, "acc_per_token": 0}
    for item, (total, n_tokens) in zip(items, hellaswag_loglikelihoods(scorer, items, desc=desc)):
        n_bytes = np.array([max(1, len(e.encode("utf-8"))) for e in item.endings])
        for rule, score in (("acc_sum", total), ("acc_per_byte", total / n_bytes), ("acc_per_token", total / n_tokens)):
            correct[rule] += int(np.argmax(score)) == item.label
    n = len(items)
    return {"metrics": {rule: 100.0 * c / n for rule, c in correct.items()},
            "counts": {"items": n, "endings": sum(len(item.endings) for item in items)}}


def run_hellaswag(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = task.resolve(opts)  # the validation set whatever the split (the test set has no labels)
    out = score_hellaswag(scorer, read_hellaswag(path, opts.limit))
    out["data"] = {"file": str(path), "split": "validation"}
    return out
