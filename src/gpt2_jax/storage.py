"""Paths that may be object-store URLs: `gs://bucket/key` and `s3://bucket/key` beside local paths.

Every place that takes a path from a user (run_dir=, init_from=, --model, --output, --cache-dir, a
token store) goes through `path()`: a local path stays a `pathlib.Path`; a URL becomes an
`etils.epath.Path` (the path type Orbax uses), backed by fsspec with gcsfs (`gpt2_jax[gcs]`) or
s3fs (`gpt2_jax[s3]`). Both types share what the project needs of pathlib (`/`, `name`, `exists`,
`is_dir`, `iterdir`, `glob`, `read_text`, `mkdir`, ...).

What object stores lack, and what this module does instead:
- no rename: a whole-file write (`files.write_bytes` and friends) is one upload of the final object,
  which a store makes visible only once complete, so readers never see half a file;
- no append: files that grow (metrics.jsonl, logs, the config history) are rewritten whole, by their
  writers (`gpt2_jax.metrics`, `gpt2_jax.run_dir`);
- no file locks: `create_new` is the store's create-if-absent precondition (`ifGenerationMatch=0`
  on GCS, `If-None-Match: *` on S3), on which the run-directory lock is built;
- no memory map: `read_ranges` fetches byte ranges concurrently (token stores read only the windows
  they need);
- no quick failure: the clients retry a failed request for about a minute, so the first request to
  a store (`probe`) is bounded and an unreachable store is reported in seconds.

Credentials are the libraries' own: Application Default Credentials for GCS (the VM's service account
on a TPU pod), the usual AWS variables or profile for S3. `STORAGE_EMULATOR_HOST` (gcsfs),
`TENSORSTORE_GCS_HTTP_URL` (tensorstore) and `AWS_ENDPOINT_URL` (s3fs, tensorstore) point them at a
local emulator, which is how the tests run offline.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import tempfile
from pathlib import Path
from typing import Any, Union

from gpt2_jax.errors import one_line

SCHEMES = {"gs": "gcs", "s3": "s3"}  # URL scheme -> the gpt2_jax extra that provides it
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

AnyPath = Union[Path, Any]  # pathlib.Path or etils.epath.Path


# How long the first request to a store may take (`probe`): gcsfs and s3fs retry a failed request
# for about a minute, which is how long an unreachable store used to take to report.
PROBE_TIMEOUT_S = 6.0


class StorageError(RuntimeError):
    """A path or URL that cannot be used (unknown scheme, missing extra); the message is one line."""


class Unreachable(StorageError):
    """A store that did not answer (`probe`); `why` says how, in a few words."""

    def __init__(self, url: str, why: str):
        super().__init__(f"{url}: could not be reached ({why})")
        self.why = why


def scheme(p: str | os.PathLike) -> str | None:
    """The URL scheme of `p` ('gs', 's3'), or None for a local path."""
    m = _URL.match(os.fspath(p))
    return m.group(1).lower() if m else None


def is_url(p: Any) -> bool:
    return p is not None and not isinstance(p, Path) and scheme(str(p)) is not None


def _check_scheme(s: str, p: str) -> None:
    if s not in SCHEMES:
        raise StorageError(f"{p}: unsupported URL scheme {s}:// (gpt2_jax reads local paths, gs:// and s3://)")
    module = {"gs": "gcsfs", "s3": "s3fs"}[s]
    try:
        __import__(module)
    except ImportError:
        raise StorageError(f"{p}: {s}:// paths need {module}: pip install 'gpt2_jax[{SCHEMES[s]}]'") from None


def path(p: str | os.PathLike) -> AnyPath:
    """`p` as a path object: `pathlib.Path` (absolute) for a local path, `epath.Path` for a URL."""
    if not isinstance(p, Path) and is_url(p):
        from etils import epath

        text = str(p)
        _check_scheme(scheme(text), text)
        _no_listing_cache(text)
        return epath.Path(text.rstrip("/") if text.count("/") > 3 else text)
    return Path(p).absolute()


def _no_listing_cache(url: str) -> None:
    """Make the filesystem behind `epath.Path(url)` list afresh.

    fsspec caches directory listings per filesystem object; Orbax's tensorstore writes and other hosts
    change a bucket behind its back, so a cached listing would hide new checkpoints. etils.epath (the
    path type Orbax uses too) makes one fsspec filesystem per scheme, with no way to pass options, so
    its listing cache is turned off here, on that object, as the project resolves a URL (the
    filesystem, and its credentials, are made then rather than at its first request); fsspec's
    global configuration is left alone. A path that etils serves through TensorFlow's gfile (when
    TensorFlow is installed) has no listing cache to turn off.
    """
    from etils.epath import backend

    fs = backend.fsspec_backend.fs(url)
    if fs.dircache.use_listings_cache:
        fs.dircache.use_listings_cache = False
        fs.dircache.clear()


def fs_path(p: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; the filesystem keeps no listing cache."""
    import fsspec

    text = str(p)
    _check_scheme(scheme(text), text)
    fs, inner = fsspec.core.url_to_fs(text, use_listings_cache=False)
    return fs, inner


def probe(p: AnyPath, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether file `p` (a URL) exists, asked once with a bound: a store that does not answer within
    `timeout` seconds, or fails to, raises `Unreachable` (the request is cancelled, not left retrying)."""
    from fsspec.asyn import sync
    from fsspec.exceptions import FSTimeoutError

    fs, inner = fs_path(p)
    try:
        info = sync(fs.loop, fs._info, inner, timeout=timeout)
    except FileNotFoundError:
        return False
    except FSTimeoutError as e:
        raise Unreachable(str(p), f"no answer within {timeout:g} s") from e
    except Exception as e:  # whatever the client raises (connection, credentials, HTTP): one line
        raise Unreachable(str(p), one_line(e)) from e
    return info.get("type") == "file"


def join(p: AnyPath, *parts: str) -> AnyPath:
    return path(p).joinpath(*parts) if not is_url(p) else path(posixpath.join(str(p), *parts))


# -- whole objects ------------------------------------------------------------------------------


def write_bytes(p: AnyPath, data: bytes) -> None:
    """Write `p` whole on an object store: one upload, visible only when complete (local files go
    through `files.atomic_path`)."""
    fs, inner = fs_path(p)
    fs.pipe_file(inner, bytes(data))


def create_new(p: AnyPath, data: bytes) -> bool:
    """Create `p` holding `data` only if it does not exist; False if it does. Atomic on local disks
    (O_EXCL) and on object stores (their create-if-absent precondition)."""
    if not is_url(p):
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    fs, inner = fs_path(p)
    try:
        fs.pipe_file(inner, bytes(data), mode="create")
    except FileExistsError:
        return False
    except OSError as e:  # s3fs reports the failed precondition (412) as a generic error
        if "412" in str(e) or "PreconditionFailed" in str(e):
            return False
        raise
    return True


def remove(p: AnyPath) -> None:
    """Delete a file or object if it exists."""
    if is_url(p):
        fs, inner = fs_path(p)
        try:
            fs.rm_file(inner)
        except FileNotFoundError:
            pass
    else:
        Path(p).unlink(missing_ok=True)


def rmtree(p: AnyPath) -> None:
    """Delete a directory (or every object under a prefix); nothing if it does not exist."""
    if is_url(p):
        fs, inner = fs_path(p)
        try:
            fs.rm(inner, recursive=True)
        except FileNotFoundError:
            pass
    else:
        import shutil

        shutil.rmtree(p, ignore_errors=True)


def move(src: AnyPath, dst: AnyPath) -> None:
    """Rename a file or directory; on an object store, a copy then a delete (not atomic)."""
    if is_url(src):
        fs, inner = fs_path(src)
        fs.mv(inner, fs_path(dst)[1], recursive=True)
    else:
        os.replace(src, dst)


def size(p: AnyPath) -> int:
    """Bytes in file `p`; -1 if it does not exist."""
    if is_url(p):
        fs, inner = fs_path(p)
        try:
            return int(fs.size(inner))
        except FileNotFoundError:
            return -1
    try:
        return os.stat(p).st_size
    except FileNotFoundError:
        return -1


def tree_bytes(p: AnyPath) -> int:
    """Bytes in all files under directory `p`."""
    if is_url(p):
        fs, inner = fs_path(p)
        return int(fs.du(inner, total=True)) if fs.exists(inner) else 0
    total = 0
    for root, _, names in os.walk(p):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def upload(local: str | os.PathLike, p: AnyPath) -> None:
    """Copy local file `local` to `p` (one object per file)."""
    fs, inner = fs_path(p)
    fs.put_file(os.fspath(local), inner)


@contextlib.contextmanager
def local_copy(p: AnyPath):
    """A local temporary copy of directory `p` (for readers that need local files: safetensors,
    torch), removed afterwards."""
    fs, inner = fs_path(p)
    with tempfile.TemporaryDirectory(prefix="gpt2_jax-download-") as tmp:
        fs.get(inner.rstrip("/") + "/", tmp + "/", recursive=True)
        yield Path(tmp)


def read_ranges(files: list, starts: list[int], stops: list[int]) -> list[bytes]:
    """Bytes [starts[i], stops[i]) of files[i] (URLs on one object store), all fetched concurrently."""
    if not files:
        return []
    inner = {f: fs_path(f)[1] for f in set(map(str, files))}
    fs = fs_path(str(files[0]))[0]
    return fs.cat_ranges([inner[str(f)] for f in files], list(starts), list(stops))


def file_sizes(p: AnyPath) -> dict[str, int]:
    """{name: bytes} of the files directly in directory `p` (one listing on an object store)."""
    if is_url(p):
        fs, inner = fs_path(p)
        try:  # listed afresh: this filesystem keeps no listing cache (fs_path)
            entries = fs.ls(inner, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e["size"]) for e in entries if e.get("type") == "file"}
    try:
        return {e.name: e.stat().st_size for e in os.scandir(p) if e.is_file()}
    except FileNotFoundError:
        return {}
