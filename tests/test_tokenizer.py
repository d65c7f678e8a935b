import shutil
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_jax import tokenizer
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer


def test_known_ids():
    enc = get_tokenizer()
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode("hello <|endoftext|>", allowed_special={"<|endoftext|>"}) == [31373, 220, 50256]
    assert enc.eot_token == EOT_ID == 50256 and enc.n_vocab == 50257


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(s):
    enc = get_tokenizer()
    assert enc.decode(enc.encode_ordinary(s)) == s


def test_batch_helpers():
    texts = ["hello world", "", "naïve café 日本語 😀", "<|endoftext|> is text here"]
    ids = tokenizer.encode_batch(texts)
    assert ids == [get_tokenizer().encode_ordinary(t) for t in texts]
    assert tokenizer.decode_batch(ids) == texts
    assert tokenizer.encode_batch(["a<|endoftext|>"], allow_eot=True) == [[64, EOT_ID]]


def test_identical_to_hf_tokenizer_on_wikitext(shared_data, tmp_path):
    from transformers import GPT2TokenizerFast

    # HF reads the same two files itself, under its own file names.
    shutil.copy(tokenizer.bpe_files_dir() / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(tokenizer.bpe_files_dir() / "vocab.bpe", tmp_path / "merges.txt")
    hf = GPT2TokenizerFast.from_pretrained(tmp_path)
    text = (shared_data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    ours = get_tokenizer().encode_ordinary(text)
    assert len(ours) > 200_000
    assert hf(text)["input_ids"] == ours


def test_no_network_access(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent")
    get_tokenizer.cache_clear()
    try:
        assert get_tokenizer().encode("offline") == [2364, 1370]
    finally:
        get_tokenizer.cache_clear()


def test_no_network_in_fresh_process():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise SystemExit('network access attempted')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "from gpt2_jax.tokenizer import get_tokenizer\n"
        "print(get_tokenizer().encode('hello world'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[31373, 995]"


def test_hash_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    shutil.copy(tokenizer.bpe_files_dir() / "vocab.bpe", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_text('{"!": 0}')
    monkeypatch.setenv(tokenizer.BPE_DIR_ENV, str(tmp_path))
    get_tokenizer.cache_clear()
    try:
        with pytest.raises(tokenizer.TokenizerFilesError, match="encoder.json is not OpenAI's file"):
            get_tokenizer()
        (tmp_path / "encoder.json").unlink()
        with pytest.raises(tokenizer.TokenizerFilesError, match="cannot read GPT-2 BPE file"):
            get_tokenizer()
    finally:
        get_tokenizer.cache_clear()
