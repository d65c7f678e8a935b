"""TFDS builders for the large web corpora, read a piece at a time: OpenWebText from its .tar.xz
archives, FineWeb and FineWeb-Edu from their parquet files. Documents are those of `builders` (text, source,
replaced bytes), and validation holds out by hash (`builders.in_validation`).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import tarfile
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds

from gpt2_jax.data.builders import DATA_DIR_ENV, Builder, DataError, example, in_validation
from gpt2_jax.errors import one_line


def _read_tar(fileobj, name: str, path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular files in a streamed .tar.xz, in archive order."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|xz") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()
    except (EOFError, tarfile.TarError, lzma.LZMAError) as e:
        raise DataError(f"{path}: truncated or damaged archive at {name} ({e})") from e


class OpenWebText(Builder, skip_registration=True):
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
        return [(self.manual or Path()) / self.ARCHIVE], [self.url]

    def description(self):
        layout, files = self._layout()
        return {"url": self.url, "layout": layout, "files": len(files),
                "validation_fraction": self.validation_fraction,
                "validation": "subsets (or .txt files) whose sha256(name) falls below the fraction"}

    def _split_generators(self, dl_manager):
        layout, files = self._layout()
        if layout == "missing":
            layout, files = "archive", [Path(dl_manager.download(self.url))]
        return {split: self._generate_examples(layout, files, split == "validation")
                for split in ("train", "validation")}

    def _generate_examples(self, layout, files, validation):
        count = 0
        for key, raw, source in self._documents(layout, files, validation):
            count += 1
            yield key, example(raw, source)
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


class FinewebSample(Builder, skip_registration=True):
    """A 10B-token sample of a FineWeb data set: the released parquet files `sample/10BT/*.parquet`, `text` column.

    Files are read with pyarrow a row group at a time, and its text in batches of rows, so no file
    is ever whole in memory. Validation holds out the documents whose `id` (the released
    `<urn:uuid:...>`; file and row where a file has none) hashes below a fraction: which documents
    are held out does not depend on which files are present or in what order they are read.
    Online downloads are not attempted (tens of GB from the Hub; its record in `sources.SOURCES`
    says so): the files come from the manual directory. `FinewebEdu` and `Fineweb` differ only in
    their name and Hub repository: both releases share the `id` and `text` columns read here.
    """

    name = "fineweb_sample"  # each data set's own below
    REPO = ""  # its Hugging Face Hub dataset repository
    TITLE = ""  # its name in messages
    SAMPLE = "sample/10BT"
    BATCH_ROWS = 1024  # rows of text decoded at a time

    def __init__(self, *, validation_fraction: float = 0.001, **kwargs):
        if not 0.0 < validation_fraction < 1.0:
            raise DataError(f"{self.name}: validation_fraction must be in (0, 1), got {validation_fraction}")
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
        return [(self.manual or Path(self.name)) / self.SAMPLE / "*.parquet"], [f"{self.url}/tree/main/{self.SAMPLE}"]

    def missing_error(self, missing, urls, manual_root):
        root = str(manual_root) if manual_root else "DIR"
        where = f"{root}/{self.name}/{self.SAMPLE}/"
        return DataError(
            f"{self.name}: no .parquet files in {where}: download the {self.SAMPLE}/*.parquet files of "
            f"{self.REPO} ({urls[0]}) into {where} and set {DATA_DIR_ENV}={root} (or pass --manual-dir {root})"
        )

    def description(self):
        return {"url": self.url, "sample": self.SAMPLE, "files": len(self._files()),
                "validation_fraction": self.validation_fraction,
                "validation": "documents whose sha256(id) falls below the fraction"}

    def check(self):
        for path in self._files():  # each file's footer and schema: no row is read
            self._open(path)

    def _split_generators(self, dl_manager):
        files = self._files()
        return {split: self._generate_examples(files, split == "validation") for split in ("train", "validation")}

    def _generate_examples(self, files, validation):
        count = 0
        for path in files:
            for row, raw in self._rows(path, validation):
                count += 1
                yield f"{path.name}:{row}", example(raw, f"{path}:{row}")
        if count == 0:
            raise DataError(f"{files[0].parent}: no {'validation' if validation else 'training'} documents "
                            f"(validation_fraction={self.validation_fraction}, {len(files)} file(s))")

    @classmethod
    def _open(cls, path: Path):
        """`path` as a `pyarrow.parquet.ParquetFile` with a string column `text`; else a one-line DataError."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable parquet file ({one_line(e)})") from e
        names = f.schema_arrow.names
        if "text" not in names:
            raise DataError(f"{path}: no column 'text' (has: {', '.join(names)}); expected {cls.TITLE}'s "
                            "released schema, with the documents in a string column 'text'")
        kind = f.schema_arrow.field("text").type
        if not any(is_kind(kind) for is_kind in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                                  pa.types.is_large_binary)):
            raise DataError(f"{path}: column 'text' holds {kind} values, expected a string column "
                            f"({cls.TITLE}'s released schema)")
        return f

    def _rows(self, path: Path, validation: bool) -> Iterator[tuple[int, bytes]]:
        """(row, UTF-8 bytes) of the non-empty texts of one split in one file, in file order."""
        import pyarrow as pa

        f = self._open(path)
        has_ids = "id" in f.schema_arrow.names
        try:
            start = 0
            for group in range(f.num_row_groups):
                n = f.metadata.row_group(group).num_rows
                ids = f.read_row_group(group, columns=["id"]).column("id").to_pylist() if has_ids else [None] * n
                wanted = [in_validation(str(i) if i is not None else f"{path.name}:{start + k}",
                                        self.validation_fraction) == validation for k, i in enumerate(ids)]
                if any(wanted):
                    row = start
                    for batch in f.iter_batches(batch_size=self.BATCH_ROWS, row_groups=[group], columns=["text"]):
                        texts = batch.column(0)
                        # Read as bytes: invalid UTF-8 is replaced (and counted) by `example`, not refused here.
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
            raise DataError(f"{path}: not a readable parquet file ({one_line(e)})") from e


class FinewebEdu(FinewebSample, skip_registration=True):
    """FineWeb-Edu's 10B-token sample (HuggingFaceFW/fineweb-edu, `sample/10BT/*.parquet`)."""

    name = "fineweb_edu"
    REPO = "HuggingFaceFW/fineweb-edu"
    TITLE = "FineWeb-Edu"


class Fineweb(FinewebSample, skip_registration=True):
    """FineWeb's 10B-token sample (HuggingFaceFW/fineweb, `sample/10BT/*.parquet`): the data of llm.c's
    GPT-2 reproduction and of modded-nanogpt's speedrun."""

    name = "fineweb"
    REPO = "HuggingFaceFW/fineweb"
    TITLE = "FineWeb"
