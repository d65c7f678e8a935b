"""Data pipeline: TFDS sources -> token stores -> Grain loaders (issue 4)."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from gpt2_jax import tokenizer
from gpt2_jax.data import DataError, SplitTokens, TrainLoader, eval_batches, eval_windows, load_manifest, prepare
from gpt2_jax.data import __main__ as cli
from gpt2_jax.data import builders, sources

EOT = tokenizer.EOT_ID
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Never touch the network: a missing file must be reported at once.
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")


def encode_docs(docs):
    enc = tokenizer.get_tokenizer()
    out = []
    for d in docs:
        out += enc.encode_ordinary(d) + [EOT]
    return np.array(out, np.int32)


def store_tokens(store, split):
    t = SplitTokens(store, split)
    return t.read(0, len(t))


def file_hashes(store):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(store).iterdir())}


def tiny_shakespeare_splits(shared_data):
    """The 90/5/5 split by characters, computed here the way TFDS's catalog builder does it."""
    text = (shared_data / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    i = int(len(text) * 0.9)
    rest = text[i:]
    j = int(len(rest) * 0.5)
    return {"train": text[:i], "validation": rest[:j], "test": rest[j:]}


@pytest.fixture(scope="module")
def ts_store(tmp_path_factory, shared_data):
    """tiny_shakespeare prepared through the CLI, offline, from the shared file via TFDS's manual dir."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "GPT2_JAX_OFFLINE": "1", "GPT2_JAX_DATA_DIR": str(shared_data)}
    cmd = [sys.executable, "-m", "gpt2_jax.data", "prepare", "--dataset", "tiny_shakespeare",
           "--cache-dir", str(cache), "--workers", "1", "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return cache / "tokens" / "tiny_shakespeare", out.stdout


def test_tiny_shakespeare_counts_equal_direct_tokenization(ts_store, shared_data):
    store, stdout = ts_store
    manifest = load_manifest(store)
    for split, text in tiny_shakespeare_splits(shared_data).items():
        expected = encode_docs([text])
        np.testing.assert_array_equal(store_tokens(store, split), expected)
        assert manifest["splits"][split]["tokens"] == len(expected)
        assert f"{len(expected):,} tokens" in stdout  # the CLI prints each split's count
    assert manifest["tokenizer_hash"] == tokenizer.tokenizer_hash()
    assert manifest["source"]["url"] == sources.source("tiny_shakespeare").url


def test_tiny_shakespeare_checksum_is_registered():
    # TFDS uses manual_dir/input.txt only for a URL whose name and checksum are registered.
    lines = (Path(sources.__file__).parent / "checksums.tsv").read_text().splitlines()
    url, size, sha, name = lines[0].split("\t")
    assert (url, size, name) == (sources.source("tiny_shakespeare").url, "1115394", "input.txt")
    assert sha == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_each_source_is_one_record(tmp_path):
    names = [s.name for s in sources.SOURCES]
    assert names == ["tiny_shakespeare", "openwebtext", "webtext", "fineweb_edu", "fineweb", "text_files"]
    assert all(s.builder.name == s.name for s in sources.SOURCES)
    with pytest.raises(DataError) as e:
        prepare("nope", cache_dir=tmp_path)
    assert str(e.value) == f"unknown data set 'nope'; valid: {', '.join(names)}, or tfds:NAME for the TFDS catalog"
    with pytest.raises(DataError) as e:
        prepare("openwebtext", cache_dir=tmp_path, files="x")
    assert str(e.value) == "openwebtext does not take --files (its options: --validation-fraction)"
    assert not tmp_path.joinpath("tfds").exists()


@pytest.fixture(scope="module")
def paragraphs(shared_data):
    text = (shared_data / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p]


def write_corpus(d: Path, paragraphs):
    """A jsonl file, a .txt file with invalid UTF-8, a second jsonl; returns the train documents in order."""
    d.mkdir(parents=True, exist_ok=True)
    a = paragraphs[:40]
    (d / "a.jsonl").write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(a)))
    raw = b"caf\xe9 \xff\xfe bytes\n" + paragraphs[40].encode()
    (d / "b.txt").write_bytes(raw)
    c = paragraphs[41:60]
    lines = [json.dumps({"text": p}).encode() for p in c]
    lines[2] = b'{"text": "na\xefve \\ud800 ' + json.dumps(paragraphs[43][:50])[1:-1].encode() + b'"}'  # raw bad byte, lone surrogate
    (d / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    c[2] = "na\ufffdve " + "\ufffd" * 3 + " " + paragraphs[43][:50]
    b_text = raw.decode("utf-8", errors="replace")  # 3 invalid bytes, each alone -> 3 x U+FFFD
    return a + [b_text] + c


def test_text_files_equals_direct_tokenization_and_reports_bad_bytes(tmp_path, paragraphs, capfd):
    train_docs = write_corpus(tmp_path / "corpus", paragraphs)
    val = paragraphs[60:70]
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in val))
    store = prepare("text_files", cache_dir=tmp_path / "cache", files=str(tmp_path / "corpus" / "*"),
                    validation_files=str(tmp_path / "val" / "*.jsonl"), workers=2, docs_per_shard=7, progress=False)
    np.testing.assert_array_equal(store_tokens(store, "train"), encode_docs(train_docs))
    np.testing.assert_array_equal(store_tokens(store, "validation"), encode_docs(val))
    manifest = load_manifest(store)
    assert len(manifest["splits"]["train"]["shards"]) == 9  # 60 documents, 7 per shard
    # One batch holding a whole epoch: windows that cross shard ends are read correctly too.
    expected = encode_docs(train_docs)
    loader = TrainLoader(store, seq_len=16, batch_size=(len(expected) - 1) // 16, seed=0)
    windows = Counter(tuple(expected[w * 16:w * 16 + 17]) for w in range((len(expected) - 1) // 16))
    assert Counter(map(tuple, next(loader))) == windows
    assert manifest["splits"]["train"]["tokens"] == len(encode_docs(train_docs))
    assert manifest["replaced_bytes"] == {str(tmp_path / "corpus" / "b.txt"): 3,
                                          f"{tmp_path / 'corpus' / 'c.jsonl'}:3": 4}
    err = capfd.readouterr().err
    assert f"warning: {tmp_path / 'corpus' / 'b.txt'}: 3 invalid UTF-8 bytes replaced with U+FFFD" in err
    assert f"warning: {tmp_path / 'corpus' / 'c.jsonl'}:3: 4 invalid UTF-8 bytes replaced with U+FFFD" in err


def test_text_files_held_out_split_partitions_documents(tmp_path, paragraphs):
    docs = paragraphs[:80]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in docs))
    store = prepare("text_files", cache_dir=tmp_path / "cache", files=str(tmp_path / "d.jsonl"), field="body",
                    validation_fraction=0.2, workers=1, progress=False)
    held = [builders.in_validation(f"d.jsonl:{i + 1}", 0.2) for i in range(len(docs))]
    assert 0 < sum(held) < len(docs)
    np.testing.assert_array_equal(store_tokens(store, "train"), encode_docs([d for d, h in zip(docs, held) if not h]))
    np.testing.assert_array_equal(store_tokens(store, "validation"), encode_docs([d for d, h in zip(docs, held) if h]))


def test_decode_text_counts_each_invalid_byte():
    assert builders.decode_text("héllo".encode()) == ("héllo", 0)
    assert builders.decode_text(b"a\xffb\xe2\x82") == ("a\ufffdb\ufffd\ufffd", 3)


def test_webtext_from_manual_dir(tmp_path, paragraphs):
    manual = tmp_path / "data" / "webtext"
    manual.mkdir(parents=True)
    parts = {"train": paragraphs[:12], "valid": paragraphs[12:15], "test": paragraphs[15:17]}
    for name, docs in parts.items():
        lines = [json.dumps({"id": i, "ended": True, "length": 1, "text": d}) for i, d in enumerate(docs)]
        (manual / f"webtext.{name}.jsonl").write_text("\n".join(lines) + "\n")
    store = prepare("webtext", cache_dir=tmp_path / "cache", manual_dir=tmp_path / "data", workers=1, progress=False)
    for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
        np.testing.assert_array_equal(store_tokens(store, split), encode_docs(parts[name]))


def _tar_xz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def openwebtext_archive(path: Path, paragraphs, n_subsets=6, per_subset=3):
    """The original layout: openwebtext.tar.xz of openwebtext/urlsf_subsetNN-K_data.xz (each a tar.xz of .txt)."""
    subsets, docs = {}, {}
    for s in range(n_subsets):
        name = f"urlsf_subset00-{s + 1}_data.xz"
        files = {f"{s:03d}{k:04d}-doc.txt": paragraphs[s * per_subset + k].encode() for k in range(per_subset)}
        subsets[f"openwebtext/{name}"] = _tar_xz(files)
        docs[name] = [v.decode() for v in files.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tar_xz(subsets))
    return docs


@pytest.mark.parametrize("layout", ["archive", "subsets", "txt"])
def test_openwebtext_layouts_with_held_out_subsets(tmp_path, paragraphs, layout):
    manual = tmp_path / "data" / "openwebtext"
    archive = tmp_path / "openwebtext.tar.xz"
    docs = openwebtext_archive(archive, paragraphs)
    if layout == "archive":
        manual.mkdir(parents=True)
        archive.rename(manual / archive.name)
    else:  # the archive extracted once (subset tarballs), or completely (.txt files)
        with tarfile.open(archive) as tar:
            tar.extractall(manual, filter="data")
        if layout == "txt":
            for sub in sorted(manual.rglob("*.xz")):
                with tarfile.open(sub) as tar:
                    tar.extractall(manual / "txt" / sub.name.removesuffix("_data.xz"), filter="data")
                sub.unlink()
    store = prepare("openwebtext", cache_dir=tmp_path / "cache", manual_dir=tmp_path / "data",
                    validation_fraction=0.4, workers=1, progress=False)
    if layout == "txt":  # held out file by file, by the path inside the manual directory
        docs = {str(p.relative_to(manual)): [p.read_text()] for p in sorted(manual.rglob("*.txt"))}
    held = {name: builders.in_validation(name, 0.4) for name in docs}
    assert 0 < sum(held.values()) < len(docs)
    for split, want in (("train", False), ("validation", True)):
        expected = [d for name in docs if held[name] == want for d in docs[name]]
        np.testing.assert_array_equal(store_tokens(store, split), encode_docs(expected))


def write_fineweb_parquet(path: Path, texts: list, *, row_group_size: int, first_id: int = 0, edu: bool = True) -> list[str]:
    """A parquet file in FineWeb-Edu's released schema, or with `edu=False` FineWeb's (no `score`
    and `int_score`; a `date`), `text` a string column possibly holding invalid UTF-8 as the files
    could; returns the ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(texts)
    ids = [f"<urn:uuid:{first_id + i:08d}-0000-4000-8000-000000000000>" for i in range(n)]
    raw = [t if isinstance(t, bytes) else t.encode() for t in texts]
    columns = {
        "text": pa.array(raw, pa.binary()).view(pa.string()),  # no UTF-8 check, as a writer of bad bytes did
        "id": pa.array(ids, pa.string()),
        "dump": pa.array(["CC-MAIN-2024-10"] * n, pa.string()),
        "url": pa.array([f"https://example.org/{first_id + i}" for i in range(n)], pa.string()),
        "file_path": pa.array(["s3://commoncrawl/crawl-data/x.warc.gz"] * n, pa.string()),
        "language": pa.array(["en"] * n, pa.string()),
        "language_score": pa.array([0.97] * n, pa.float64()),
        "token_count": pa.array([len(r) // 4 for r in raw], pa.int64()),
    }
    if edu:
        columns.update(score=pa.array([3.1] * n, pa.float64()), int_score=pa.array([3] * n, pa.int64()))
    else:
        columns["date"] = pa.array(["2024-03-01T12:00:00Z"] * n, pa.string())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    assert pq.ParquetFile(path).num_row_groups > 1
    return ids


def fineweb_corpus(manual: Path, paragraphs, name: str = "fineweb_edu"):
    """Two files of sample/10BT of data set `name` (fineweb_edu or fineweb, in its release's schema)
    with several row groups, a non-UTF-8 row and an empty row; returns [(id, expected text)] of the
    non-empty documents in file order."""
    sample = manual / name / "sample" / "10BT"
    first = paragraphs[:23] + [b"caf\xe9 \xff na\xc3\xafve", ""] + paragraphs[23:30]
    second = paragraphs[30:45]
    docs = []
    for file, texts, start in (("000_00000.parquet", first, 0), ("001_00000.parquet", second, 100)):
        ids = write_fineweb_parquet(sample / file, texts, row_group_size=7, first_id=start, edu=name == "fineweb_edu")
        docs += [(i, t if isinstance(t, str) else t.decode("utf-8", errors="replace")) for i, t in zip(ids, texts) if t]
    return docs


def assert_held_out(store, docs, fraction: float) -> None:
    """The store's splits are `docs` (id, text) in order, those whose id is held out in validation."""
    held = [builders.in_validation(i, fraction) for i, _ in docs]
    assert 0 < sum(held) < len(docs)
    for split, want in (("train", False), ("validation", True)):
        np.testing.assert_array_equal(store_tokens(store, split), encode_docs([t for (_, t), h in zip(docs, held) if h == want]))


def test_fineweb_edu_from_parquet_with_held_out_documents(tmp_path, paragraphs, monkeypatch, capfd):
    import pyarrow.parquet as pq

    docs = fineweb_corpus(tmp_path / "data", paragraphs)

    def whole_file(*_, **__):
        raise AssertionError("a whole parquet file was read at once")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    kw = dict(cache_dir=tmp_path / "cache", manual_dir=tmp_path / "data", validation_fraction=0.3, docs_per_shard=6,
              progress=False)
    store = prepare("fineweb_edu", workers=2, **kw)
    assert_held_out(store, docs, 0.3)
    manifest = load_manifest(store)
    bad = tmp_path / "data" / "fineweb_edu" / "sample" / "10BT" / "000_00000.parquet"
    assert manifest["replaced_bytes"] == {f"{bad}:23": 2}
    assert f"warning: {bad}:23: 2 invalid UTF-8 bytes replaced with U+FFFD" in capfd.readouterr().err
    assert manifest["source"]["files"] == 2 and manifest["source"]["validation_fraction"] == 0.3
    # Resumes like the other data sets: a crash that lost the manifest and a shard redoes only that shard.
    before = file_hashes(store)
    stamp = (store / "train-00000.bin").stat().st_mtime_ns
    (store / "manifest.json").unlink()
    (store / "train-00001.bin").unlink()
    assert prepare("fineweb_edu", workers=1, **kw) == store
    assert file_hashes(store) == before and (store / "train-00000.bin").stat().st_mtime_ns == stamp
    # Another file downloaded later is a new build, not the old one silently reused.
    write_fineweb_parquet(bad.parent / "002_00000.parquet", paragraphs[45:50], row_group_size=2, first_id=200)
    assert load_manifest(prepare("fineweb_edu", workers=1, **kw))["source"]["files"] == 3


def test_fineweb_from_parquet_with_held_out_documents(tmp_path, paragraphs):
    """`fineweb` (FineWeb's sample-10BT, in FineWeb's released schema) is read as fineweb_edu is: the
    same documents in file order, the same held-out ids, from its own folder."""
    docs = fineweb_corpus(tmp_path / "data", paragraphs, "fineweb")
    kw = dict(cache_dir=tmp_path / "cache", manual_dir=tmp_path / "data", validation_fraction=0.3, docs_per_shard=6,
              progress=False)
    store = prepare("fineweb", workers=1, **kw)
    assert_held_out(store, docs, 0.3)
    manifest = load_manifest(store)
    assert manifest["source"]["url"] == "https://huggingface.co/datasets/HuggingFaceFW/fineweb"
    assert manifest["source"]["files"] == 2 and manifest["source"]["validation_fraction"] == 0.3
    assert "fineweb_edu" not in str(store) and not (tmp_path / "data" / "fineweb_edu").exists()


# --- bad inputs: one-line errors naming the file; nothing already prepared is lost ------------------


@pytest.fixture
def good_store(tmp_path, paragraphs):
    write_corpus(tmp_path / "corpus", paragraphs)
    cache = tmp_path / "cache"
    store = prepare("text_files", cache_dir=cache, files=str(tmp_path / "corpus" / "*"), validation_fraction=0.1,
                    workers=1, docs_per_shard=20, progress=False)
    return cache, store, file_hashes(store)


def run_cli(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    return rc, errors


def test_bad_inputs_give_one_line_errors_and_keep_prepared_data(tmp_path, good_store, capsys, monkeypatch):
    cache, store, before = good_store
    cases = []
    # Missing manual directory.
    cases.append((["--dataset", "tiny_shakespeare", "--manual-dir", str(tmp_path / "nowhere")],
                  f"{tmp_path / 'nowhere'}/tiny_shakespeare/"))
    # A manual file that is not the registered one (TFDS checks size and SHA-256).
    (tmp_path / "other" / "tiny_shakespeare").mkdir(parents=True)
    (tmp_path / "other" / "tiny_shakespeare" / "input.txt").write_text("not Shakespeare\n")
    cases.append((["--dataset", "tiny_shakespeare", "--manual-dir", str(tmp_path / "other")], "wrong checksum"))
    # An option the data set does not take.
    cases.append((["--dataset", "tiny_shakespeare", "--field", "body"], "tiny_shakespeare does not take --field"))
    # Empty corpus.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_bytes(b"")
    cases.append((["--dataset", "text_files", "--files", str(tmp_path / "empty" / "*.txt")], "e.txt: empty corpus"))
    # A glob matching nothing.
    cases.append((["--dataset", "text_files", "--files", str(tmp_path / "none" / "*")], "no .txt/.jsonl file matches"))
    # A jsonl line without the field.
    (tmp_path / "nofield").mkdir()
    (tmp_path / "nofield" / "n.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    cases.append((["--dataset", "text_files", "--files", str(tmp_path / "nofield" / "n.jsonl")],
                  f"{tmp_path / 'nofield' / 'n.jsonl'}:2: no field 'text'"))
    # A truncated archive.
    archive = tmp_path / "data" / "openwebtext" / "openwebtext.tar.xz"
    openwebtext_archive(archive, ["x" * 5000 + str(i) for i in range(20)])
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    cases.append((["--dataset", "openwebtext", "--manual-dir", str(tmp_path / "data"), "--validation-fraction", "0.5"],
                  f"{archive}: truncated or damaged archive"))
    # FineWeb-Edu without its parquet files, and with one that is not parquet.
    cases.append((["--dataset", "fineweb_edu", "--manual-dir", str(tmp_path / "nowhere")],
                  f"fineweb_edu: no .parquet files in {tmp_path / 'nowhere'}/fineweb_edu/sample/10BT/: download the "
                  "sample/10BT/*.parquet files of HuggingFaceFW/fineweb-edu"))
    cases.append((["--dataset", "fineweb", "--manual-dir", str(tmp_path / "nowhere")],
                  f"fineweb: no .parquet files in {tmp_path / 'nowhere'}/fineweb/sample/10BT/: download the "
                  "sample/10BT/*.parquet files of HuggingFaceFW/fineweb (https://huggingface.co/datasets/HuggingFaceFW/fineweb/"))
    (tmp_path / "fw" / "fineweb_edu" / "sample" / "10BT").mkdir(parents=True)
    (tmp_path / "fw" / "fineweb_edu" / "sample" / "10BT" / "000_00000.parquet").write_bytes(b"PAR1 cut short")
    cases.append((["--dataset", "fineweb_edu", "--manual-dir", str(tmp_path / "fw")],
                  f"{tmp_path / 'fw'}/fineweb_edu/sample/10BT/000_00000.parquet: not a readable parquet file"))
    for argv, needle in cases:
        rc, errors = run_cli(["prepare", *argv, "--cache-dir", str(cache), "--quiet"], capsys)
        assert rc == 1 and len(errors) == 1 and needle in errors[0], (argv, errors)
        assert file_hashes(store) == before
    # A store written by another tokenizer: refused by prepare and by the loaders, and kept as is.
    monkeypatch.setattr(tokenizer, "tokenizer_hash", lambda: "0123456789abcdef")
    rc, errors = run_cli(["prepare", "--dataset", "text_files", "--files", str(tmp_path / "corpus" / "*"),
                          "--validation-fraction", "0.1", "--cache-dir", str(cache), "--quiet"], capsys)
    assert rc == 1 and len(errors) == 1 and "written by tokenizer" in errors[0] and str(store) in errors[0]
    with pytest.raises(DataError, match="manifest.json: written by tokenizer"):
        TrainLoader(store, seq_len=8, batch_size=2, seed=0)
    assert file_hashes(store) == before


def tree(root: Path):
    """Every file and folder under `root`, with each file's size and time (folders' times change as
    entries come and go)."""
    return sorted((str(p.relative_to(root)), None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns))
                  for p in root.rglob("*"))


def test_a_failed_first_build_leaves_the_cache_as_it_was(tmp_path, capsys):
    (tmp_path / "n.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    argv = ["prepare", "--dataset", "text_files", "--files", str(tmp_path / "n.jsonl"), "--quiet"]
    cache = tmp_path / "cache"
    rc, errors = run_cli([*argv, "--cache-dir", str(cache)], capsys)
    assert rc == 1 and len(errors) == 1 and "n.jsonl:2: no field 'text'" in errors[0]
    assert not cache.exists()  # failed midway: the folders and the lock file it made are gone
    # What an earlier build left in the same places (its lock file, a download) stays.
    src = sources.source("text_files")
    builder = src.builder(url=src.url, manual_dir=None, data_dir=str(cache / "tfds"), files=str(tmp_path / "n.jsonl"))
    parent = Path(builder.data_path).parent
    parent.mkdir(parents=True)
    (parent / ".build.lock").write_bytes(b"")
    (cache / "tfds" / "downloads").mkdir()
    (cache / "tfds" / "downloads" / "kept.txt").write_text("kept")
    before = tree(cache)
    rc, errors = run_cli([*argv, "--cache-dir", str(cache)], capsys)
    assert rc == 1 and len(errors) == 1 and "n.jsonl:2: no field 'text'" in errors[0]
    assert tree(cache) == before


def test_a_build_waiting_on_a_failed_first_build_takes_over(tmp_path):
    class Builder:  # what `_building` reads of a TFDS builder
        data_path = tmp_path / "tfds" / "x" / "1.0.0"

    lock = tmp_path / "tfds" / "x" / ".build.lock"
    held = []

    def second():
        with sources._building(Builder):
            held.append(lock.exists())  # the lock file it holds is the one there, not a deleted one

    with pytest.raises(RuntimeError, match="failed"):
        with sources._building(Builder):
            waiting = threading.Thread(target=second)
            waiting.start()
            time.sleep(0.5)  # it opened the lock file and waits on it
            assert not held
            raise RuntimeError("failed")
    waiting.join(30)
    assert held == [True] and lock.exists()


def test_catalog_without_tensorflow_says_so(tmp_path, monkeypatch):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda n, *a: None if n == "tensorflow" else real(n, *a))
    with pytest.raises(DataError, match=r"tfds:tiny_shakespeare: TFDS catalog builders need TensorFlow: pip install"):
        prepare("tfds:tiny_shakespeare", cache_dir=tmp_path, progress=False)


def test_prepare_is_idempotent_and_redoes_only_missing_shards(good_store):
    cache, store, before = good_store
    stamps = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    again = prepare("text_files", cache_dir=cache, files=str(store.parents[2] / "corpus" / "*"),
                    validation_fraction=0.1, workers=1, docs_per_shard=20, progress=False)
    assert again == store and {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == stamps
    # A crash after two shards: no manifest, a half-written temporary file, one shard missing.
    (store / "manifest.json").unlink()
    (store / "train-00001.bin").unlink()
    (store / "train-00002.bin.tmp-999").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="not a finished token store"):
        SplitTokens(store, "train")
    prepare("text_files", cache_dir=cache, files=str(store.parents[2] / "corpus" / "*"), validation_fraction=0.1,
            workers=1, docs_per_shard=20, progress=False)
    assert file_hashes(store) == before
    assert (store / "train-00000.bin").stat().st_mtime_ns == stamps["train-00000.bin"]  # not redone


# --- loaders ---------------------------------------------------------------------------------------


def take(loader, n):
    return np.stack([next(loader) for _ in range(n)])


def test_train_batches_are_store_windows_and_deterministic(ts_store):
    store, _ = ts_store
    tokens = store_tokens(store, "train")
    a = take(TrainLoader(store, seq_len=32, batch_size=5, seed=1), 4)
    assert a.dtype == np.int32 and a.shape == (4, 5, 33)
    windows = {tokens[w * 32:w * 32 + 33].tobytes() for w in range((len(tokens) - 1) // 32)}
    assert all(row.tobytes() in windows for row in a.reshape(-1, 33))
    np.testing.assert_array_equal(a, take(TrainLoader(store, seq_len=32, batch_size=5, seed=1), 4))
    b = take(TrainLoader(store, seq_len=32, batch_size=5, seed=2), 4)
    assert not np.array_equal(a, b)
    assert sorted(map(tuple, a.reshape(-1, 33))) != sorted(map(tuple, b.reshape(-1, 33)))


def test_resume_in_new_process_is_bit_identical(ts_store, tmp_path):
    store, _ = ts_store
    k, n = 3, 4
    full = take(TrainLoader(store, seq_len=16, batch_size=3, seed=7), k + n)
    loader = TrainLoader(store, seq_len=16, batch_size=3, seed=7)
    take(loader, k)
    # Saved as the checkpoint module does (Orbax JSON), restored in a fresh interpreter.
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(tmp_path / "state", args=ocp.args.JsonSave(loader.get_state()))
    script = (
        "import sys, numpy as np, orbax.checkpoint as ocp\n"
        "from gpt2_jax.data import TrainLoader\n"
        "loader = TrainLoader(sys.argv[1], seq_len=16, batch_size=3, seed=7)\n"
        "state = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(sys.argv[2], args=ocp.args.JsonRestore())\n"
        "loader.set_state(state)\n"
        f"np.save(sys.argv[3], np.stack([next(loader) for _ in range({n})]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(store), str(tmp_path / "state"), str(tmp_path / "b.npy")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), full[k:])


def test_set_state_refuses_other_settings(ts_store):
    store, _ = ts_store
    state = TrainLoader(store, seq_len=16, batch_size=3, seed=7).get_state()
    with pytest.raises(DataError, match="seed"):
        TrainLoader(store, seq_len=16, batch_size=3, seed=8).set_state(state)


def shards(store, n, steps, **kw):
    """[steps, n, rows, seq_len + 1]: each of n processes' rows of the first `steps` global batches."""
    loaders = [TrainLoader(store, shard_index=i, shard_count=n, **kw) for i in range(n)]
    return np.stack([take(loader, steps) for loader in loaders], axis=1)


def test_processes_rows_are_the_one_process_batch(ts_store):
    """For 1, 2 and 4 processes, process i reads rows [i*B/n, (i+1)*B/n) of the same global batch:
    joined in process order they are the one-process batch, across an epoch boundary too."""
    store, _ = ts_store
    kw = dict(split="validation", seq_len=64, batch_size=12, seed=3)
    steps = -(-TrainLoader(store, **kw).windows_per_epoch // 12) + 2  # into the second epoch
    one = take(TrainLoader(store, **kw), steps)
    for n in (1, 2, 4):
        got = shards(store, n, steps, **kw)
        assert got.shape == (steps, n, 12 // n, 65)
        np.testing.assert_array_equal(got.reshape(one.shape), one)


def test_processes_read_disjoint_rows_that_cover_the_split(ts_store):
    store, _ = ts_store
    seq_len, batch = 64, 16
    tokens = store_tokens(store, "validation")
    every = Counter(tuple(tokens[w * seq_len:w * seq_len + seq_len + 1]) for w in range((len(tokens) - 1) // seq_len))
    n = len(every)
    got = shards(store, 2, -(-n // batch), split="validation", seq_len=seq_len, batch_size=batch, seed=3)
    epoch = got.reshape(-1, seq_len + 1)[:n]  # the first epoch, rows in process order within each step
    process = np.arange(n) % batch // (batch // 2)
    seen = [Counter(map(tuple, epoch[process == i])) for i in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert seen[0] + seen[1] == every


def test_state_saved_on_two_processes_continues_on_one_and_four(ts_store):
    """The state is the same on every process and holds no process count: saved by 2 processes
    after k batches, a loader on 1 or 4 processes goes on with the very next global batches."""
    store, _ = ts_store
    kw = dict(split="validation", seq_len=32, batch_size=8, seed=11)
    k, m = 5, 4
    one = take(TrainLoader(store, **kw), k + m)
    two = [TrainLoader(store, shard_index=i, shard_count=2, **kw) for i in range(2)]
    for loader in two:
        take(loader, k)
    states = [loader.get_state() for loader in two]
    assert states[0] == states[1] and "shard_count" not in states[0]["loader"]
    for n in (1, 4):
        loaders = [TrainLoader(store, shard_index=i, shard_count=n, **kw) for i in range(n)]
        for loader in loaders:
            loader.set_state(states[0])
        got = np.stack([take(loader, m) for loader in loaders], axis=1)
        np.testing.assert_array_equal(got.reshape(one[k:].shape), one[k:])


def test_earlier_per_process_state_is_refused_unless_one_process(ts_store):
    """A state of the earlier format (per-process batch and shard in its identity): on 2 processes
    it was another data order, refused in one line; on 1 process it was this very stream."""
    store, _ = ts_store
    kw = dict(split="validation", seq_len=32, batch_size=4, seed=11)
    loader = TrainLoader(store, **kw)
    take(loader, 3)
    state = loader.get_state()
    old = {**state, "loader": {**state["loader"], "batch_size": 2, "shard_index": 1, "shard_count": 2}}
    with pytest.raises(DataError, match="saved by 2 processes in the earlier per-process format") as e:
        TrainLoader(store, shard_index=1, shard_count=2, **kw).set_state(old)
    assert "\n" not in str(e.value)
    again = TrainLoader(store, **kw)
    again.set_state({**state, "loader": {**state["loader"], "shard_index": 0, "shard_count": 1}})
    np.testing.assert_array_equal(next(again), next(loader))


def test_batch_that_processes_do_not_divide_is_refused(ts_store):
    store, _ = ts_store
    with pytest.raises(DataError, match="batch_size=6 does not divide over 4 processes"):
        TrainLoader(store, "validation", seq_len=32, batch_size=6, seed=0, shard_index=0, shard_count=4)


def test_every_epoch_is_a_new_permutation_of_the_windows(ts_store):
    store, _ = ts_store
    seq_len, batch = 64, 10
    tokens = store_tokens(store, "validation")
    every = Counter(tuple(tokens[w * seq_len:w * seq_len + seq_len + 1]) for w in range((len(tokens) - 1) // seq_len))
    loader = TrainLoader(store, "validation", seq_len=seq_len, batch_size=batch, seed=5)
    n = loader.windows_per_epoch
    rows = take(loader, -(-3 * n // batch)).reshape(-1, seq_len + 1)
    epochs = [rows[e * n:(e + 1) * n] for e in range(3)]
    assert all(Counter(map(tuple, e)) == every for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_eval_windows_score_every_target_once():
    for n, seq_len, stride in ((1, 4, None), (2, 4, None), (23, 4, None), (24, 5, 2), (100, 7, 3), (9, 8, 1)):
        scored = Counter()
        for start, length, first in eval_windows(n, seq_len, stride):
            assert 1 <= length <= seq_len + 1 and start + length <= n
            scored.update(range(start + first + 1, start + length))
        assert scored == Counter(range(1, n)), (n, seq_len, stride)


@pytest.mark.parametrize("stride", [None, 24])
def test_eval_batches_score_each_token_once_across_processes(ts_store, stride):
    store, _ = ts_store
    tokens = store_tokens(store, "validation")
    seq_len, batch = 32, 8
    targets, n_batches = [], []
    for shard in range(2):
        batches = list(eval_batches(store, seq_len=seq_len, batch_size=batch, stride=stride, shard_index=shard,
                                    shard_count=2))
        n_batches.append(len(batches))
        for b in batches:
            assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (batch, seq_len + 1)
            assert b["mask"].dtype == np.float32 and b["mask"].shape == (batch, seq_len)
            targets += b["tokens"][:, 1:][b["mask"] == 1].tolist()
    assert n_batches[0] == n_batches[1]
    assert Counter(targets) == Counter(tokens[1:].tolist())
    first = next(eval_batches(store, seq_len=seq_len, batch_size=batch, stride=stride, max_batches=1))
    np.testing.assert_array_equal(first["tokens"][0], tokens[:seq_len + 1])
    assert len(list(eval_batches(store, seq_len=seq_len, batch_size=batch, max_batches=2))) == 2


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset", "--manual-dir", "--cache-dir", "--workers", "--docs-per-shard", "--files",
                 "--validation-files", "--field", "--validation-fraction", "--feature", "--quiet"):
        assert flag in out


@pytest.mark.slow
def test_killed_prepare_then_rerun_equals_clean_run(tmp_path, shared_data):
    text = (shared_data / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    chunks = [text[i:i + 40_000] for i in range(0, len(text), 40_000)]
    for k in range(8):  # 8 x 1.1 MB in 28 documents each
        (corpus / f"part{k}.jsonl").write_text("".join(json.dumps({"text": c + str(k)}) + "\n" for c in chunks))
    args = ["--dataset", "text_files", "--files", str(corpus / "*.jsonl"), "--validation-fraction", "0.1",
            "--docs-per-shard", "4", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gpt2_jax.data", "prepare", *args, "--cache-dir", str(killed),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = killed / "tokens"
    try:
        while not list(store.glob("*/train-*.json")):
            assert proc.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (store,) = store.iterdir()
    assert not (store / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in store.glob("train-*.json")}
    with pytest.raises(DataError, match="not a finished token store"):
        TrainLoader(store, seq_len=8, batch_size=2, seed=0)
    assert cli.main(["prepare", *args, "--cache-dir", str(killed), "--workers", "2"]) == 0
    assert cli.main(["prepare", *args, "--cache-dir", str(tmp_path / "clean"), "--workers", "2"]) == 0
    clean = tmp_path / "clean" / "tokens" / store.name
    assert file_hashes(store) == file_hashes(clean)
    assert {name: (store / name).stat().st_mtime_ns for name in done} == done  # finished shards were kept
    assert len(load_manifest(clean)["splits"]["train"]["shards"]) > 40


def test_many_replacements_are_summarized(capsys):
    from gpt2_jax.data import store as store_mod

    store_mod._warn_replaced({"replaced_bytes": {f"doc{i}.txt": 2 for i in range(8)}})
    err = capsys.readouterr().err.splitlines()
    assert err[:5] == [f"warning: doc{i}.txt: 2 invalid UTF-8 bytes replaced with U+FFFD" for i in range(5)]
    assert err[5:] == ["warning: 16 invalid UTF-8 bytes replaced in 8 documents in all (the manifest lists them)"]
