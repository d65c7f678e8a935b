"""The tasks scored by perplexity or bits (Radford et al. 2019, Table 3): WebText, WikiText-2 and
-103, PTB, enwik8 and text8, the One Billion Word benchmark. Each reads its data set in the original
distribution format, applies the paper's protocol (written beside its code) and returns its figures.
Every document starts with `<|endoftext|>`, the token that separated documents in GPT-2's training
data, so its first real token is scored too.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from gpt2_jax.data import DataError, catalog_download, eval_batches, prepare
from gpt2_jax.eval.common import LN2, MAX_FILE_BYTES, EvalError, EvalTask, Options, encode, ppl, read_jsonl_texts, read_text
from gpt2_jax.eval.detokenize import count_words, moses_detokenize
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer


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
    seqs = [np.array([EOT_ID, *encode(t)], np.int32) for t in texts]
    scored = scorer.score_sequences(seqs, stride=stride, desc=desc)
    nll = -sum(float(lp.sum()) for lp, _ in scored)
    n_tokens = sum(len(lp) for lp, _ in scored)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "metrics": {
            "ppl_token": ppl(nll, n_tokens),
            "ppl_byte": ppl(nll, n_bytes),
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
            "ppl_token": ppl(nll, n_tokens),
            "ppl_byte": ppl(nll, n_bytes),
            "bits_per_byte": nll / n_bytes / LN2 if n_bytes else float("nan"),
        },
        "counts": {"tokens": n_tokens, "bytes": n_bytes, "batches": len(batches)},
        "nll": nll,
        "stride": stride,
        "data": {"store": str(store), "dataset": dataset, "split": "validation"},
    }


def run_webtext(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    if opts.dataset is not None:
        return score_prepared(scorer, opts.dataset, stride=opts.stride_for(scorer), limit=opts.limit,
                              cache_dir=opts.cache_dir, manual_dir=opts.data_dir)
    path = task.resolve(opts)
    texts = read_jsonl_texts(path, task.name, opts.limit)
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
    seq = np.array([EOT_ID, *encode(text)], np.int32)
    (logp, _), = scorer.score_sequences([seq], stride=stride, desc=desc)
    nll, n_tokens, n_words = -float(logp.sum()), len(logp), count_words(original)
    return {
        "metrics": {"ppl_word": ppl(nll, n_words), "ppl_token": ppl(nll, n_tokens)},
        "counts": {"words": n_words, "tokens": n_tokens, "characters": len(text)},
        "nll": nll,
        "stride": stride,
    }


def _first_lines(text: str, limit: int | None) -> str:
    if limit is None:
        return text
    return "".join(text.splitlines(keepends=True)[:limit])


def run_corpus(task: EvalTask, scorer: Scorer, opts: Options, *,
                 detokenize: Callable[[str], str]) -> dict[str, Any]:
    path = task.resolve(opts)
    original = read_text(path, task.name)
    if not original.strip():
        raise EvalError(f"{task.name}: {path} is empty")
    original = _first_lines(original, opts.limit)
    out = score_corpus(scorer, original, detokenize, stride=opts.stride_for(scorer), desc=task.name)
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
    seq = np.array([EOT_ID, *encode(text)], np.int32)
    (logp, _), = scorer.score_sequences([seq], stride=stride, desc=desc)
    nll = -float(logp.sum())
    return {
        "metrics": {"bits_per_byte": nll / len(data) / LN2, "ppl_token": ppl(nll, len(logp))},
        "counts": {"bytes": len(data), "tokens": len(logp)},
        "nll": nll,
        "stride": stride,
    }


def run_bytes(task: EvalTask, scorer: Scorer, opts: Options, *, as_characters: bool = False) -> dict[str, Any]:
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
    seqs = [np.array([EOT_ID, *encode(moses_detokenize(s) + "\n")], np.int32) for s in sentences]
    scored = scorer.score_sequences(seqs, stride=stride, desc=desc)
    nll = -sum(float(lp.sum()) for lp, _ in scored)
    n_tokens = sum(len(lp) for lp, _ in scored)
    n_words = sum(len(s.split()) + 1 for s in sentences)
    return {
        "metrics": {"ppl_word": ppl(nll, n_words), "ppl_token": ppl(nll, n_tokens)},
        "counts": {"sentences": len(sentences), "words": n_words, "tokens": n_tokens},
        "nll": nll,
        "stride": stride,
    }


LM1B_URL = "https://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
LM1B_TEST = "news.en.heldout-00000-of-00050"  # the benchmark's test set (Chelba et al. 2013)
LM1B_DIR = "1-billion-word-language-modeling-benchmark-r13output"  # the archive's top folder
LM1B_HELDOUT = "heldout-monolingual.tokenized.shuffled"


def run_lm1b(task: EvalTask, scorer: Scorer, opts: Options) -> dict[str, Any]:
    local = opts.data_dir / task.data.relpath  # the test set whatever the split
    if local.is_file():
        path = task.resolve(opts)
    else:  # a TFDS catalog build of lm1b keeps the archive it downloaded, extracted
        path = catalog_download(f"{LM1B_DIR}/{LM1B_HELDOUT}/{LM1B_TEST}", cache_dir=opts.cache_dir)
    if path is None:
        raise EvalError(
            f"lm1b: the test set is {LM1B_TEST} alone (the TFDS catalog's lm1b test split merges all 50 "
            f"held-out shards); fetch {LM1B_URL}, extract {LM1B_HELDOUT}/{LM1B_TEST} and put it at {local}"
        )
    sentences = [s for s in read_text(path, "lm1b").split("\n") if s.strip()][: opts.limit]
    if not sentences:
        raise EvalError(f"lm1b: {path} holds no sentences")
    out = score_sentences(scorer, sentences, stride=opts.stride_for(scorer), desc="lm1b")
    out["data"] = {"file": str(path)}
    return out
