"""TFDS builders for the small text corpora, written in ArrayRecord format without TensorFlow, and
what every builder shares.

Every builder yields documents {"text", "source", "replaced_bytes"}: the text decoded from UTF-8
with each invalid byte replaced by U+FFFD, the file it came from, and how many bytes were replaced.
Raw files are found offline in a manual directory (one folder per data set under
$GPT2_JAX_DATA_DIR, or `--manual-dir`) and downloaded from their real URLs otherwise; a builder is
given the URL of its source's record (`sources.SOURCES`). The large web corpora's builders are in
`webcorpora`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

# The manual directory (read by `sources.resolve_dirs`), named in the errors for missing files.
DATA_DIR_ENV = "GPT2_JAX_DATA_DIR"
# Set to 1 to never try the network: missing files are reported at once.
OFFLINE_ENV = "GPT2_JAX_OFFLINE"

_INVALID_BYTE = re.compile("[\udc80-\udcff]")


class DataError(RuntimeError):
    """Bad data or a missing file: the message is one line that names the file."""


def decode_text(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode with every invalid byte replaced by U+FFFD; returns (text, bytes replaced)."""
    # surrogateescape maps each undecodable byte to one lone surrogate U+DC80..U+DCFF, which valid
    # UTF-8 can never produce, so counting them counts exactly the invalid bytes.
    text, n = _INVALID_BYTE.subn("\ufffd", raw.decode("utf-8", errors="surrogateescape"))
    return text, n


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic held-out choice: the first 8 bytes of sha256(key) below fraction * 2^64."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < fraction * 2.0**64


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "source": tfds.features.Text(),
        "replaced_bytes": tfds.features.Scalar(dtype=np.int64),
    })


def example(raw: bytes, source: str, replaced: int = 0) -> dict[str, Any]:
    """A document as every builder yields it, from its raw bytes and where they came from."""
    text, n = decode_text(raw)  # counted per document; prepare reports them per file
    n += replaced
    return {"text": text, "source": source, "replaced_bytes": n}


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: the source's URL, a manual directory and the list of files it should hold."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, url: str | None, manual_dir: Path | None, **kwargs):
        self.url = url
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

    def check(self) -> None:
        """Refuse raw files that cannot be used before a build starts, with a one-line DataError (a
        build that fails midway also leaves nothing, but only after the time it took)."""

    def missing_error(self, missing: list[Path], urls: list[str], manual_root: Path | None) -> DataError:
        """The one-line error for files that are neither in the manual directory nor downloadable."""
        root = str(manual_root) if manual_root else "DIR"
        names = " ".join(f.name for f in missing)
        return DataError(
            f"{self.name}: {names} not found in {root}/{self.name}/ and cannot be downloaded (offline or {OFFLINE_ENV} "
            f"set): download {' '.join(urls)} into {root}/{self.name}/ and set {DATA_DIR_ENV}={root} (or pass "
            f"--manual-dir {root})"
        )

    def description(self) -> dict[str, Any]:
        """What the data came from, for the token store's manifest (no machine-specific paths)."""
        return {}


class TinyShakespeare(Builder, skip_registration=True):
    """Tiny Shakespeare (char-rnn), split 90/5/5 by characters exactly as TFDS's catalog builder."""

    name = "tiny_shakespeare"

    def required_files(self):
        path = self.manual / "input.txt" if self.manual else Path("input.txt")
        if self.manual and path.is_file():
            return [], []
        return [path], [self.url]

    def description(self):
        return {"url": self.url, "split": "characters [0, 90%) train, [90%, 95%) validation, rest test"}

    def _split_generators(self, dl_manager):
        # With manual_dir set, TFDS's DownloadManager uses manual_dir/input.txt instead of the URL
        # because checksums.tsv (beside this module) registers its name and SHA-256, which it checks.
        path = Path(dl_manager.download(self.url))
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
                yield f"{path.name}:{lineno}", example(raw, f"{path}:{lineno}", bad)


class WebText(Builder, skip_registration=True):
    """OpenAI's public WebText samples (gpt-2-output-dataset): 250K train, 5K valid, 5K test documents."""

    name = "webtext"
    FILES = {"train": "webtext.train.jsonl", "validation": "webtext.valid.jsonl", "test": "webtext.test.jsonl"}

    def _files(self) -> dict[str, Path]:
        return {s: (self.manual or Path()) / f for s, f in self.FILES.items()}

    def required_files(self):
        missing = [p for p in self._files().values() if not (self.manual and p.is_file())]
        urls = [self.url.format(split=p.name.split(".")[1]) for p in missing]
        return missing, urls

    def description(self):
        return {"url": self.url, "field": "text"}

    def _split_generators(self, dl_manager):
        # OpenAI publishes no checksums for these files, so none is registered: a manual copy is
        # used as is, and otherwise the file is downloaded.
        paths = {}
        for split, path in self._files().items():
            if self.manual and path.is_file():
                paths[split] = path
            else:
                paths[split] = Path(dl_manager.download(self.url.format(split=path.name.split(".")[1])))
        return {split: self._generate_examples(path) for split, path in paths.items()}

    def _generate_examples(self, path):
        yield from _iter_jsonl(path, "text")



class TextFiles(Builder, skip_registration=True):
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
                    yield path.name, example(raw, str(path))

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

