"""TFDS builders for the text corpora, written in ArrayRecord format without TensorFlow.

Every builder yields documents {"text", "source", "replaced_bytes"}: the text decoded from UTF-8
with each invalid byte replaced by U+FFFD, the file it came from, and how many bytes were replaced.
Raw files are found offline in a manual directory (one folder per data set under
$GPT2_JAX_DATA_DIR, or `--manual-dir`) and downloaded from their real URLs otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import lzma
import os
import re
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from gpt2_jax import storage

DATA_DIR_ENV = "GPT2_JAX_DATA_DIR"
CACHE_DIR_ENV = "GPT2_JAX_CACHE_DIR"
# TFDS builds are local (ArrayRecord files are written in place): with a gs:// or s3:// cache dir
# they go here, and only the token stores go to the bucket.
BUILD_DIR_ENV = "GPT2_JAX_BUILD_DIR"
# Set to 1 to never try the network: missing files are reported at once.
OFFLINE_ENV = "GPT2_JAX_OFFLINE"
DEFAULT_CACHE_DIR = Path("~/.cache/gpt2_jax")

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# OpenAI's gpt-2-output-dataset release (the azureedge CDN named in its README was retired; the
# same blobs are served from the storage account behind it).
WEBTEXT_URL = "https://openaipublic.blob.core.windows.net/gpt-2/output-dataset/v1/webtext.{split}.jsonl"
# The OpenWebText corpus (Gokaslan & Cohen 2019), Zenodo record 3834942.
OPENWEBTEXT_URL = "https://zenodo.org/records/3834942/files/openwebtext.tar.xz"
# FineWeb-Edu (Lozhkov, Ben Allal, von Werra, Wolf 2024) on the Hugging Face Hub; its 10B-token sample.
FINEWEB_EDU_URL = "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu"

BUILTIN = ("tiny_shakespeare", "openwebtext", "webtext", "fineweb_edu", "text_files")
CATALOG_PREFIX = "tfds:"

_INVALID_BYTE = re.compile("[\udc80-\udcff]")


class DataError(RuntimeError):
    """Bad data or a missing file: the message is one line that names the file."""


def decode_text(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode with every invalid byte replaced by U+FFFD; returns (text, bytes replaced)."""
    # surrogateescape maps each undecodable byte to one lone surrogate U+DC80..U+DCFF, which valid
    # UTF-8 can never produce, so counting them counts exactly the invalid bytes.
    text, n = _INVALID_BYTE.subn("\ufffd", raw.decode("utf-8", errors="surrogateescape"))
    return text, n


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic held-out choice: the first 8 bytes of sha256(key) below fraction * 2^64."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < fraction * 2.0**64


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "source": tfds.features.Text(),
        "replaced_bytes": tfds.features.Scalar(dtype=np.int64),
    })


def _example(raw: bytes, source: str, replaced: int = 0) -> dict[str, Any]:
    text, n = decode_text(raw)  # counted per document; prepare reports them per file
    n += replaced
    return {"text": text, "source": source, "replaced_bytes": n}


def _missing_files_error(name: str, files: list[Path], urls: list[str], manual_root: Path | None) -> DataError:
    root = str(manual_root) if manual_root else "DIR"
    names = " ".join(f.name for f in files)
    return DataError(
        f"{name}: {names} not found in {root}/{name}/ and cannot be downloaded (offline or {OFFLINE_ENV} set): "
        f"download {' '.join(urls)} into {root}/{name}/ and set {DATA_DIR_ENV}={root} (or pass --manual-dir {root})"
    )


def _reachable(url: str, timeout: float = 10.0) -> bool:
    """A quick HEAD request, so that offline machines fail at once instead of after TFDS's retries."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception:  # any network failure means "not reachable"
        return False


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: a manual directory and the list of files it should hold."""

    VERSION = tfds.core.Version("1.0.0")
    manual_only = False  # True: files only come from the manual directory, never downloaded

    def __init__(self, *, manual_dir: Path | None, **kwargs):
        self.manual = Path(manual_dir) if manual_dir is not None else None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Documents stay in reading order (files sorted by name): the loader shuffles windows, and
        # TFDS's shuffle by key would make the order depend on where the files live.
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features(),
                                     disable_shuffling=True)

    def required_files(self) -> tuple[list[Path], list[str]]:
        """(manual files that are missing, URLs that would replace them)."""
        return [], []

    def missing_error(self, missing: list[Path], urls: list[str], manual_root: Path | None) -> DataError:
        """The one-line error for files that are neither in the manual directory nor downloadable."""
        return _missing_files_error(self.name, missing, urls, manual_root)

    def description(self) -> dict[str, Any]:
        """What the data came from, for the token store's manifest (no machine-specific paths)."""
        return {}


class TinyShakespeare(_Builder, skip_registration=True):
    """Tiny Shakespeare (char-rnn), split 90/5/5 by characters exactly as TFDS's catalog builder."""

    name = "tiny_shakespeare"

    def required_files(self):
        path = self.manual / "input.txt" if self.manual else Path("input.txt")
        if self.manual and path.is_file():
            return [], []
        return [path], [TINY_SHAKESPEARE_URL]

    def description(self):
        return {"url": TINY_SHAKESPEARE_URL, "split": "characters [0, 90%) train, [90%, 95%) validation, rest test"}

    def _split_generators(self, dl_manager):
        # With manual_dir set, TFDS's DownloadManager uses manual_dir/input.txt instead of the URL
        # because checksums.tsv (beside this module) registers its name and SHA-256, which it checks.
        path = Path(dl_manager.download(TINY_SHAKESPEARE_URL))
        text, n = decode_text(path.read_bytes())
        # TFDS's catalog builder: i = int(len(text) * 0.9) characters for train, then half of the rest.
        i = int(len(text) * 0.9)
        train, rest = text[:i], text[i:]
        j = int(len(rest) * 0.5)
        parts = {"train": train, "validation": rest[:j], "test": rest[j:]}
        return {
            split: self._generate_examples(split, part, path.name, n if split == "train" else 0)
            for split, part in parts.items()
        }

    def _generate_examples(self, split, text, source, replaced):
        yield split, {"text": text, "source": f"{source}[{split}]", "replaced_bytes": replaced}


def _iter_jsonl(path: Path, field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            line, bad = decode_text(line)  # invalid bytes inside a JSON string become U+FFFD
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON line ({e})") from e
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: no field {field!r} (has: {keys}); choose one with --field")
            value = record[field]
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string")
            if value:
                # Lone surrogates from escapes such as "\ud800" are not text: each of their 3
                # bytes is replaced like any other invalid byte.
                raw = value.encode("utf-8", errors="surrogatepass")
                yield f"{path.name}:{lineno}", _example(raw, f"{path}:{lineno}", bad)


class WebText(_Builder, skip_registration=True):
    """OpenAI's public WebText samples (gpt-2-output-dataset): 250K train, 5K valid, 5K test documents."""

    name = "webtext"
    FILES = {"train": "webtext.train.jsonl", "validation": "webtext.valid.jsonl", "test": "webtext.test.jsonl"}

    def _files(self) -> dict[str, Path]:
        return {s: (self.manual or Path()) / f for s, f in self.FILES.items()}

    def required_files(self):
        missing = [p for p in self._files().values() if not (self.manual and p.is_file())]
        urls = [WEBTEXT_URL.format(split=p.name.split(".")[1]) for p in missing]
        return missing, urls

    def description(self):
        return {"url": WEBTEXT_URL, "field": "text"}

    def _split_generators(self, dl_manager):
        # OpenAI publishes no checksums for these files, so none is registered: a manual copy is
        # used as is, and otherwise the file is downloaded.
        paths = {}
        for split, path in self._files().items():
            if self.manual and path.is_file():
                paths[split] = path
            else:
                paths[split] = Path(dl_manager.download(WEBTEXT_URL.format(split=path.name.split(".")[1])))
        return {split: self._generate_examples(path) for split, path in paths.items()}

    def _generate_examples(self, path):
        yield from _iter_jsonl(path, "text")


def _read_tar(fileobj, name: str, path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular files in a streamed .tar.xz, in archive order."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|xz") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()
    except (EOFError, tarfile.TarError, lzma.LZMAError) as e:
        raise DataError(f"{path}: truncated or damaged archive at {name} ({e})") from e


class OpenWebText(_Builder, skip_registration=True):
    """OpenWebText: the original archive of subset tarballs, its subset .xz files, or extracted .txt files.

    Validation holds out whole subsets (or .txt files) whose name hashes below a fraction, so the
    split does not depend on reading order and needs one pass per split.
    """

    name = "openwebtext"
    ARCHIVE = "openwebtext.tar.xz"

    def __init__(self, *, validation_fraction: float = 0.0005, **kwargs):
        if not 0.0 < validation_fraction < 1.0:
            raise DataError(f"openwebtext: validation_fraction must be in (0, 1), got {validation_fraction}")
        self.validation_fraction = validation_fraction
        config = tfds.core.BuilderConfig(name=f"val{validation_fraction:g}")
        super().__init__(config=config, **kwargs)

    def _layout(self) -> tuple[str, list[Path]]:
        if self.manual and (self.manual / self.ARCHIVE).is_file():
            return "archive", [self.manual / self.ARCHIVE]
        if self.manual and self.manual.is_dir():
            subsets = sorted(self.manual.rglob("*.xz"))
            if subsets:
                return "subsets", subsets
            txts = sorted(self.manual.rglob("*.txt"))
            if txts:
                return "txt", txts
        return "missing", []

    def required_files(self):
        layout, _ = self._layout()
        if layout != "missing":
            return [], []
        return [(self.manual or Path()) / self.ARCHIVE], [OPENWEBTEXT_URL]

    def description(self):
        layout, files = self._layout()
        return {"url": OPENWEBTEXT_URL, "layout": layout, "files": len(files),
                "validation_fraction": self.validation_fraction,
                "validation": "subsets (or .txt files) whose sha256(name) falls below the fraction"}

    def _split_generators(self, dl_manager):
        layout, files = self._layout()
        if layout == "missing":
            layout, files = "archive", [Path(dl_manager.download(OPENWEBTEXT_URL))]
        return {split: self._generate_examples(layout, files, split == "validation")
                for split in ("train", "validation")}

    def _generate_examples(self, layout, files, validation):
        count = 0
        for key, raw, source in self._documents(layout, files, validation):
            count += 1
            yield key, _example(raw, source)
        if count == 0:
            raise DataError(
                f"{files[0].parent}: no {'validation' if validation else 'training'} documents "
                f"(validation_fraction={self.validation_fraction}, {len(files)} file(s))"
            )

    def _documents(self, layout, files, validation):
        def wanted(unit: str) -> bool:
            return in_validation(unit, self.validation_fraction) == validation

        if layout == "txt":
            for path in files:
                unit = str(path.relative_to(self.manual))
                if wanted(unit):
                    yield unit, path.read_bytes(), str(path)
            return
        if layout == "subsets":
            for path in files:
                if wanted(path.name):
                    with open(path, "rb") as f:
                        for member, raw in _read_tar(f, path.name, path):
                            yield f"{path.name}/{member}", raw, f"{path}:{member}"
            return
        (archive,) = files
        try:
            with open(archive, "rb") as f, tarfile.open(fileobj=f, mode="r|xz") as outer:
                for sub in outer:
                    subset = Path(sub.name).name
                    if not sub.isfile() or not subset.endswith(".xz") or not wanted(subset):
                        continue
                    for member, raw in _read_tar(outer.extractfile(sub), subset, archive):
                        yield f"{subset}/{member}", raw, f"{archive}:{subset}/{member}"
        except (EOFError, tarfile.TarError, lzma.LZMAError) as e:
            raise DataError(f"{archive}: truncated or damaged archive ({e})") from e


class FinewebEdu(_Builder, skip_registration=True):
    """FineWeb-Edu's 10B-token sample: the released parquet files `sample/10BT/*.parquet`, `text` column.

    Files are read with pyarrow a row group at a time, and its text in batches of rows, so no file
    is ever whole in memory. Validation holds out the documents whose `id` (the released
    `<urn:uuid:...>`; file and row where a file has none) hashes below a fraction: which documents
    are held out does not depend on which files are present or in what order they are read.
    Online downloads are not attempted (tens of GB from the Hub): the files come from the manual
    directory.
    """

    name = "fineweb_edu"
    SAMPLE = "sample/10BT"
    BATCH_ROWS = 1024  # rows of text decoded at a time
    manual_only = True

    def __init__(self, *, validation_fraction: float = 0.001, **kwargs):
        if not 0.0 < validation_fraction < 1.0:
            raise DataError(f"fineweb_edu: validation_fraction must be in (0, 1), got {validation_fraction}")
        self.validation_fraction = validation_fraction
        # The config name pins the files (names and sizes): more files downloaded make a new build.
        stamp = hashlib.sha256(json.dumps([[p.name, p.stat().st_size] for p in self._files(kwargs.get("manual_dir"))])
                               .encode()).hexdigest()[:12]
        super().__init__(config=tfds.core.BuilderConfig(name=f"val{validation_fraction:g}-{stamp}"), **kwargs)

    def _files(self, manual=None) -> list[Path]:
        root = Path(manual) if manual is not None else self.manual
        return sorted((root / self.SAMPLE).glob("*.parquet")) if root is not None else []

    def required_files(self):
        if self._files():
            return [], []
        return [(self.manual or Path(self.name)) / self.SAMPLE / "*.parquet"], [f"{FINEWEB_EDU_URL}/tree/main/{self.SAMPLE}"]

    def missing_error(self, missing, urls, manual_root):
        root = str(manual_root) if manual_root else "DIR"
        where = f"{root}/{self.name}/{self.SAMPLE}/"
        return DataError(
            f"fineweb_edu: no .parquet files in {where}: download the {self.SAMPLE}/*.parquet files of "
            f"HuggingFaceFW/fineweb-edu ({urls[0]}) into {where} and set {DATA_DIR_ENV}={root} (or pass --manual-dir {root})"
        )

    def description(self):
        return {"url": FINEWEB_EDU_URL, "sample": self.SAMPLE, "files": len(self._files()),
                "validation_fraction": self.validation_fraction,
                "validation": "documents whose sha256(id) falls below the fraction"}

    def _split_generators(self, dl_manager):
        files = self._files()
        return {split: self._generate_examples(files, split == "validation") for split in ("train", "validation")}

    def _generate_examples(self, files, validation):
        count = 0
        for path in files:
            for row, raw in self._rows(path, validation):
                count += 1
                yield f"{path.name}:{row}", _example(raw, f"{path}:{row}")
        if count == 0:
            raise DataError(f"{files[0].parent}: no {'validation' if validation else 'training'} documents "
                            f"(validation_fraction={self.validation_fraction}, {len(files)} file(s))")

    def _rows(self, path: Path, validation: bool) -> Iterator[tuple[int, bytes]]:
        """(row, UTF-8 bytes) of the non-empty texts of one split in one file, in file order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(path)
            names = f.schema_arrow.names
            if "text" not in names:
                raise DataError(f"{path}: no column 'text' (has: {', '.join(names)})")
            start = 0
            for group in range(f.num_row_groups):
                n = f.metadata.row_group(group).num_rows
                ids = f.read_row_group(group, columns=["id"]).column("id").to_pylist() if "id" in names else [None] * n
                wanted = [in_validation(str(i) if i is not None else f"{path.name}:{start + k}",
                                        self.validation_fraction) == validation for k, i in enumerate(ids)]
                if any(wanted):
                    row = start
                    for batch in f.iter_batches(batch_size=self.BATCH_ROWS, row_groups=[group], columns=["text"]):
                        texts = batch.column(0)
                        # Read as bytes: invalid UTF-8 is replaced (and counted) by _example, not refused here.
                        if pa.types.is_large_string(texts.type):
                            texts = texts.view(pa.large_binary())
                        elif pa.types.is_string(texts.type):
                            texts = texts.view(pa.binary())
                        for raw in texts.to_pylist():
                            if wanted[row - start] and raw:
                                yield row, raw
                            row += 1
                start += n
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable parquet file ({_first_line(e)})") from e


class TextFiles(_Builder, skip_registration=True):
    """Local .txt files (one document each) and .jsonl files (one document per line, field `field`)."""

    name = "text_files"

    def __init__(self, *, files: str | None = None, field: str = "text", validation_files: str | None = None,
                 validation_fraction: float = 0.01, **kwargs):
        if not files:
            raise DataError("text_files: pass --files GLOB (the .txt/.jsonl files to read)")
        self.train_files = self._glob(files)
        self.validation_files = self._glob(validation_files) if validation_files else None
        if not 0.0 <= validation_fraction < 1.0:
            raise DataError(f"text_files: validation_fraction must be in [0, 1), got {validation_fraction}")
        self.field, self.validation_fraction = field, validation_fraction
        self.patterns = (files, validation_files)
        # The config name pins the exact inputs: a changed file (size or mtime) makes a new build.
        stamp = hashlib.sha256(json.dumps([self._stamp(self.train_files), self._stamp(self.validation_files),
                                           field, validation_fraction]).encode()).hexdigest()[:12]
        super().__init__(config=tfds.core.BuilderConfig(name=stamp), **kwargs)

    @staticmethod
    def _glob(pattern: str) -> list[Path]:
        import glob

        paths = sorted(Path(p).absolute() for p in glob.glob(os.path.expanduser(pattern), recursive=True))
        paths = [p for p in paths if p.is_file()]
        bad = [p for p in paths if p.suffix not in (".txt", ".jsonl")]
        if bad:
            raise DataError(f"{bad[0]}: text_files reads only .txt and .jsonl files")
        if not paths:
            raise DataError(f"text_files: no .txt/.jsonl file matches {pattern!r}")
        return paths

    @staticmethod
    def _stamp(paths):
        if paths is None:
            return None
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]

    def description(self):
        return {"files": self.patterns[0], "validation_files": self.patterns[1], "field": self.field,
                "validation_fraction": None if self.validation_files else self.validation_fraction,
                "inputs": self._stamp(self.train_files) + (self._stamp(self.validation_files) or [])}

    def _split_generators(self, dl_manager):
        if self.validation_files is not None:
            return {"train": self._generate_examples(self.train_files, None),
                    "validation": self._generate_examples(self.validation_files, None)}
        splits = {"train": self._generate_examples(self.train_files, False)}
        if self.validation_fraction > 0:
            splits["validation"] = self._generate_examples(self.train_files, True)
        return splits

    def _documents(self, paths):
        for path in paths:
            if path.suffix == ".jsonl":
                yield from _iter_jsonl(path, self.field)
            else:
                try:
                    raw = path.read_bytes()
                except OSError as e:
                    raise DataError(f"{path}: cannot read ({e.strerror})") from e
                if raw:
                    yield path.name, _example(raw, str(path))

    def _generate_examples(self, paths, validation):
        count = 0
        for key, example in self._documents(paths):
            if validation is not None and in_validation(key, self.validation_fraction) != validation:
                continue
            count += 1
            yield example["source"], example
        if count == 0:
            names = " ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
            what = "validation" if validation else "training"
            if validation:
                raise DataError(f"{names}: no document fell into the validation split "
                                f"(validation_fraction={self.validation_fraction}); pass --validation-files "
                                "or a larger --validation-fraction")
            raise DataError(f"{names}: empty corpus (no non-empty {what} documents)")


SOURCES = {"tiny_shakespeare": TinyShakespeare, "openwebtext": OpenWebText, "webtext": WebText,
           "fineweb_edu": FinewebEdu, "text_files": TextFiles}
OPTIONS = {"tiny_shakespeare": (), "webtext": (), "openwebtext": ("validation_fraction",),
           "fineweb_edu": ("validation_fraction",),
           "text_files": ("files", "field", "validation_files", "validation_fraction")}


def resolve_dirs(cache_dir=None, manual_dir=None) -> tuple[storage.AnyPath, Path | None]:
    """(cache dir, manual root): flags first, then $GPT2_JAX_CACHE_DIR / $GPT2_JAX_DATA_DIR. The
    cache dir may be a gs:// or s3:// URL (`storage.path`)."""
    cache = cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    cache = storage.path(cache) if storage.is_url(cache) else Path(cache).expanduser().absolute()
    manual = manual_dir or os.environ.get(DATA_DIR_ENV) or None
    return cache, (Path(manual).expanduser().absolute() if manual else None)


def build_dir(cache) -> Path:
    """Where TFDS builds go: the cache dir when it is local, else $GPT2_JAX_BUILD_DIR or ~/.cache/gpt2_jax."""
    if not storage.is_url(cache):
        return Path(cache)
    return Path(os.environ.get(BUILD_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser().absolute()


def catalog_download(relpath: str, *, cache_dir=None) -> Path | None:
    """The file `relpath` inside an archive that a TFDS catalog build (`tfds:NAME`) downloaded and
    extracted under the cache directory (`resolve_dirs`), or None where there is none. Reads the
    file system only: no TFDS data set is built and TensorFlow is not needed."""
    cache, _ = resolve_dirs(cache_dir)
    extracted = build_dir(cache) / "tfds_catalog" / "downloads" / "extracted"
    found = sorted(p for p in extracted.glob(f"*/{relpath}") if p.is_file()) if extracted.is_dir() else []
    return found[0] if found else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def build(dataset: str, *, cache_dir: Path, manual_root: Path | None, **options) -> tuple[tfds.core.DatasetBuilder, str, dict]:
    """Build (once) the TFDS data set; returns (builder, feature key, description of the source)."""
    if dataset.startswith(CATALOG_PREFIX):
        return _catalog(dataset[len(CATALOG_PREFIX):], cache_dir=cache_dir, manual_root=manual_root, **options)
    if dataset not in SOURCES:
        raise DataError(f"unknown data set {dataset!r}; valid: {', '.join(BUILTIN)}, or tfds:NAME for the TFDS catalog")
    unknown = sorted(set(options) - set(OPTIONS[dataset]))
    if unknown:
        takes = ", ".join(f"--{o.replace('_', '-')}" for o in OPTIONS[dataset]) or "none"
        raise DataError(f"{dataset} does not take --{unknown[0].replace('_', '-')} (its options: {takes})")
    manual = manual_root / dataset if manual_root else None
    builder = SOURCES[dataset](manual_dir=manual, data_dir=str(cache_dir / "tfds"), file_format="array_record",
                               **options)
    if not builder.is_prepared():
        missing, urls = builder.required_files()
        offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
        if missing and (builder.manual_only or offline or not all(_reachable(u) for u in urls)):
            raise builder.missing_error(missing, urls, manual_root)
        _download_and_prepare(builder, manual)
    return builder, "text", {"dataset": dataset, **builder.description()}


@contextlib.contextmanager
def _building(builder):
    """Hold the build of `builder` (an flock beside its version folders) and remove the temporary
    `incomplete.*` folders TFDS left there when a build was killed: with the lock held, no live build
    owns one."""
    parent = Path(os.fspath(builder.data_path)).parent
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / ".build.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            for stale in sorted(parent.glob("incomplete.*")):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                    warn(f"removed {stale}, left by a build that did not finish")
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _download_and_prepare(builder, manual: Path | None) -> None:
    # TFDS's stacked progress bars interleave with errors; prepare shows its own bar.
    tfds.disable_progress_bar()
    print(f"building {builder.name} with TFDS in {builder.data_path} ...", file=sys.stderr)
    config = tfds.download.DownloadConfig(manual_dir=str(manual) if manual else None)
    with _building(builder):
        if builder.is_prepared():  # another process built it while this one waited
            return
        try:
            builder.download_and_prepare(download_config=config)
        except DataError:
            raise
        except Exception as e:  # TFDS raises many types (checksums, network, I/O); keep one line
            raise DataError(f"{builder.name}: building the TFDS data set failed: {_first_line(e)}") from e


def _catalog(spec: str, *, cache_dir: Path, manual_root: Path | None, feature: str = "text", **options):
    if options:
        raise DataError(f"tfds:{spec}: unsupported option(s) {', '.join(options)}; catalog data sets take --feature")
    name = spec.split("/")[0]
    try:
        # A directory of its own: catalog names (tiny_shakespeare) collide with our builders'.
        builder = tfds.builder(spec, data_dir=str(cache_dir / "tfds_catalog"), file_format="array_record")
    except Exception as e:
        raise DataError(f"tfds:{spec}: not a TFDS catalog data set ({_first_line(e)})") from e
    if not builder.is_prepared():
        if importlib.util.find_spec("tensorflow") is None:
            raise DataError(f"tfds:{spec}: TFDS catalog builders need TensorFlow: pip install 'gpt2_jax[tf]'")
        _download_and_prepare(builder, manual_root / name if manual_root else None)
    features = builder.info.features
    texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)] if hasattr(features, "items") else []
    if feature not in texts:
        raise DataError(f"tfds:{spec}: no text feature {feature!r} (text features: {', '.join(texts) or 'none'}); "
                        "choose one with --feature")
    return builder, feature, {"dataset": f"tfds:{spec}", "tfds_version": str(builder.version), "feature": feature}
