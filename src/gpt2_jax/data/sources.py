"""The data sources by name: one record per built-in source, where raw files and caches live, and
building a source's TFDS data set once.

A data set is named by its record's name in `SOURCES` (its builders are in `builders` and
`webcorpora`) or as tfds:NAME[/CONFIG] for a data set of TFDS's own catalog. Builds are written in
ArrayRecord format, without TensorFlow, under the cache directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import tensorflow_datasets as tfds

from gpt2_jax import storage
from gpt2_jax.data.builders import DATA_DIR_ENV, OFFLINE_ENV, DataError, TextFiles, TinyShakespeare, WebText
from gpt2_jax.data.webcorpora import Fineweb, FinewebEdu, OpenWebText
from gpt2_jax.errors import one_line, warn

CACHE_DIR_ENV = "GPT2_JAX_CACHE_DIR"
# TFDS builds are local (ArrayRecord files are written in place): with a gs:// or s3:// cache dir
# they go here, and only the token stores go to the bucket.
BUILD_DIR_ENV = "GPT2_JAX_BUILD_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/gpt2_jax")
CATALOG_PREFIX = "tfds:"

__all__ = ["BUILD_DIR_ENV", "CACHE_DIR_ENV", "DATA_DIR_ENV", "OFFLINE_ENV", "SOURCES", "DataError", "Source",
           "build", "build_dir", "catalog_download", "resolve_dirs", "source"]


@dataclasses.dataclass(frozen=True)
class Source:
    """A built-in data source: everything this package keeps about it, under its name."""

    name: str  # the --dataset name, and its folder in the manual directory
    builder: type  # its TFDS builder (a `builders.Builder`), given `url`
    options: tuple[str, ...]  # the keyword options (`--flag`s of `prepare`) the builder takes
    url: str | None  # where its raw files are published (None: the user's own files)
    downloads: bool  # whether missing raw files are downloaded, or only read from the manual directory


SOURCES = (
    Source("tiny_shakespeare", TinyShakespeare, (),
           "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt", downloads=True),
    # The OpenWebText corpus (Gokaslan & Cohen 2019), Zenodo record 3834942.
    Source("openwebtext", OpenWebText, ("validation_fraction",),
           "https://zenodo.org/records/3834942/files/openwebtext.tar.xz", downloads=True),
    # OpenAI's gpt-2-output-dataset release (the azureedge CDN named in its README was retired; the
    # same blobs are served from the storage account behind it).
    Source("webtext", WebText, (),
           "https://openaipublic.blob.core.windows.net/gpt-2/output-dataset/v1/webtext.{split}.jsonl", downloads=True),
    # FineWeb-Edu (Lozhkov, Ben Allal, von Werra, Wolf 2024) on the Hugging Face Hub; its 10B-token
    # sample is tens of GB, never downloaded here.
    Source("fineweb_edu", FinewebEdu, ("validation_fraction",),
           "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu", downloads=False),
    # FineWeb (Penedo et al. 2024), the corpus FineWeb-Edu was filtered from; its 10B-token sample
    # (the same parquet layout, read the same way) is what modded-nanogpt's speedrun trains on.
    Source("fineweb", Fineweb, ("validation_fraction",),
           "https://huggingface.co/datasets/HuggingFaceFW/fineweb", downloads=False),
    Source("text_files", TextFiles, ("files", "field", "validation_files", "validation_fraction"), None,
           downloads=False),
)


def source(name: str) -> Source:
    """The record of built-in data source `name`; a one-line DataError listing them if there is none."""
    for s in SOURCES:
        if s.name == name:
            return s
    raise DataError(f"unknown data set {name!r}; valid: {', '.join(s.name for s in SOURCES)}, "
                    "or tfds:NAME for the TFDS catalog")


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


def _reachable(url: str, timeout: float = 10.0) -> bool:
    """A quick HEAD request, so that offline machines fail at once instead of after TFDS's retries."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception:  # any network failure means "not reachable"
        return False


def build(dataset: str, *, cache_dir: Path, manual_root: Path | None, **options) -> tuple[tfds.core.DatasetBuilder, str, dict]:
    """Build (once) the TFDS data set; returns (builder, feature key, description of the source)."""
    if dataset.startswith(CATALOG_PREFIX):
        return _catalog(dataset[len(CATALOG_PREFIX):], cache_dir=cache_dir, manual_root=manual_root, **options)
    src = source(dataset)
    unknown = sorted(set(options) - set(src.options))
    if unknown:
        takes = ", ".join(f"--{o.replace('_', '-')}" for o in src.options) or "none"
        raise DataError(f"{dataset} does not take --{unknown[0].replace('_', '-')} (its options: {takes})")
    manual = manual_root / dataset if manual_root else None
    builder = src.builder(url=src.url, manual_dir=manual, data_dir=str(cache_dir / "tfds"),
                          file_format="array_record", **options)
    if not builder.is_prepared():
        missing, urls = builder.required_files()
        offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
        if missing and (not src.downloads or offline or not all(_reachable(u) for u in urls)):
            raise builder.missing_error(missing, urls, manual_root)
        builder.check()
        _download_and_prepare(builder, manual)
    return builder, "text", {"dataset": dataset, **builder.description()}


def _lock(parent: Path) -> tuple[int, bool]:
    """An exclusive flock on `parent/.build.lock`: (its descriptor, whether this process created the
    file). A failed first build deletes the file it created (`_building`): a process that waited
    on a deleted file locks the new one instead."""
    path = parent / ".build.lock"
    while True:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd, created = os.open(path, os.O_RDWR), False
        except FileNotFoundError:  # removed meanwhile by a failed first build: make it again
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)


def _new_dirs(*paths: Path) -> list[Path]:
    """The folders among `paths` and their ancestors that do not exist yet, deepest first."""
    return sorted({d for p in paths for d in (p, *p.parents) if not d.exists()}, key=lambda d: len(d.parts),
                  reverse=True)


def _remove_empty_folders(d: Path) -> None:
    """Remove `d` and the folders in it that hold no file (TFDS makes `downloads/extracted` up front)."""
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [d]:
        with contextlib.suppress(OSError):  # not empty: a concurrent build's files
            sub.rmdir()


@contextlib.contextmanager
def _building(builder, more: tuple[Path, ...] = ()):
    """Hold the build of `builder` (an flock on `.build.lock` beside its version folders) and remove the
    temporary `incomplete.*` folders TFDS left there when a build was killed: with the lock held, no
    live build owns one.

    A build that fails leaves the cache as it found it: the lock file it created, and the folders it
    made for the build and for `more` (TFDS's download folders) where they hold no file, are removed;
    a lock file or folder that an earlier or concurrent build made stays.
    """
    parent = Path(os.fspath(builder.data_path)).parent
    new = _new_dirs(parent, *more)
    fd, created = _lock(parent)
    try:
        for stale in sorted(parent.glob("incomplete.*")):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                warn(f"warning: removed {stale}, left by a build that did not finish")
        yield
    except BaseException:
        if created:
            os.remove(parent / ".build.lock")
        for d in new:
            _remove_empty_folders(d)
        raise
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _download_and_prepare(builder, manual: Path | None) -> None:
    # TFDS's stacked progress bars interleave with errors; prepare shows its own bar.
    tfds.disable_progress_bar()
    print(f"building {builder.name} with TFDS in {builder.data_path} ...", file=sys.stderr)
    config = tfds.download.DownloadConfig(manual_dir=str(manual) if manual else None)
    with _building(builder, (Path(os.fspath(builder.data_dir_root)) / "downloads" / "extracted",)):
        if builder.is_prepared():  # another process built it while this one waited
            return
        try:
            builder.download_and_prepare(download_config=config)
        except DataError:
            raise
        except Exception as e:  # TFDS raises many types (checksums, network, I/O); keep one line
            # whole: TFDS names the file first and what is wrong with it after (a wrong checksum)
            raise DataError(f"{builder.name}: building the TFDS data set failed: {one_line(e, limit=1000)}") from e


def _catalog(spec: str, *, cache_dir: Path, manual_root: Path | None, feature: str = "text", **options):
    if options:
        raise DataError(f"tfds:{spec}: unsupported option(s) {', '.join(options)}; catalog data sets take --feature")
    name = spec.split("/")[0]
    try:
        # A directory of its own: catalog names (tiny_shakespeare) collide with our builders'.
        builder = tfds.builder(spec, data_dir=str(cache_dir / "tfds_catalog"), file_format="array_record")
    except Exception as e:
        raise DataError(f"tfds:{spec}: not a TFDS catalog data set ({one_line(e)})") from e
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
