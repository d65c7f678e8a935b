"""Token stores: each split of a TFDS data set tokenized once into packed uint16 shards.

Layout of a store directory:
  {split}-{i:05d}.bin   GPT-2 token ids, little-endian uint16, documents each followed by <|endoftext|>
  {split}-{i:05d}.json  the shard's record: document range, token count, SHA-256, tokenizer hash
  manifest.json         written last: splits, shards, token counts, source, tokenizer hash

Every file is written to a temporary name and renamed into place, and a shard's .json is written
after its .bin, so a crash leaves either finished shards (kept by the next run) or temporary files
(deleted by it). A store is complete exactly when manifest.json exists.

A store may live on an object store (a gs:// or s3:// cache dir; `gpt2_jax.storage`): each file is
then one upload, in the same order, and readers fetch only the byte ranges of the windows they
need (no memory map, never a whole shard). A finished store can be named by its location instead
of a data set name (`prepare("gs://bucket/cache/tokens/tiny_shakespeare")`), which is how the hosts
of a pod train on a store prepared once.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import hashlib
import json
import multiprocessing
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt2_jax import files, storage, tokenizer
from gpt2_jax.data.builders import DataError, decode_text
from gpt2_jax.data.sources import CATALOG_PREFIX, build, build_dir, resolve_dirs
from gpt2_jax.errors import warn

FORMAT = "gpt2_jax.tokens.v1"
MANIFEST = "manifest.json"
DTYPE = np.dtype("<u2")
# Shards of about this much text, so that workers balance and a crash loses little work.
SHARD_TEXT_BYTES = 64 << 20
_READ_CHUNK = 64
SMALL_CORPUS_BYTES = 32 << 20


def _write_json(path, obj: Any) -> None:
    files.write_json(path, obj, indent=1)


def _read_json(path) -> Any:
    """The JSON in `path`; None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def named_store(dataset: str):
    """The token store `dataset` names by its location, or None when it names a data set.

    A location is a gs:// or s3:// URL or a path with a slash (./store, /data/tokens/x); data set
    names (tiny_shakespeare, tfds:NAME/CONFIG) have none.
    """
    if storage.is_url(dataset):
        return storage.path(dataset)
    if not dataset.startswith(CATALOG_PREFIX) and ("/" in dataset or os.sep in dataset):
        return Path(dataset).expanduser().absolute()
    return None


def _store_name(builder, feature: str, description: dict) -> str:
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", description["dataset"])
    if builder.builder_config is not None:
        name += f"-{builder.builder_config.name}"
    if feature != "text":
        name += f"-{feature}"
    return name

# One data source per worker process, opened on first use.
_SOURCES: dict[tuple[str, str], Any] = {}


def _data_source(tfds_dir: str, split: str):
    import tensorflow_datasets as tfds

    key = (tfds_dir, split)
    if key not in _SOURCES:
        _SOURCES[key] = tfds.builder_from_directory(tfds_dir).as_data_source(split)
    return _SOURCES[key]


def _tokenize_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: tokenize records [start, stop) of one split into `bin_path`; returns the shard record."""
    enc = tokenizer.get_tokenizer()
    source = _data_source(task["tfds_dir"], task["split"])
    bin_path = storage.path(task["bin"])
    digest, n_tokens, n_bytes, replaced = hashlib.sha256(), 0, 0, Counter()
    eot = np.array([tokenizer.EOT_ID], DTYPE)
    with files.atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
        for lo in range(task["start"], task["stop"], _READ_CHUNK):
            records = source.__getitems__(list(range(lo, min(lo + _READ_CHUNK, task["stop"]))))
            for i, record in enumerate(records, lo):
                raw = record[task["feature"]]
                if not isinstance(raw, bytes):
                    raw = str(raw).encode("utf-8", errors="surrogateescape")
                text, bad = decode_text(raw)
                bad += int(record.get("replaced_bytes", 0))
                if bad:
                    src = record.get("source", b"")
                    replaced[src.decode() if isinstance(src, bytes) else f"{task['split']}[{i}]"] += bad
                ids = np.asarray(enc.encode_ordinary(text), DTYPE)
                for chunk in (ids, eot):
                    data = chunk.tobytes()
                    f.write(data)
                    digest.update(data)
                n_tokens += len(ids) + 1
                n_bytes += len(raw)
    record = {
        "file": bin_path.name, "split": task["split"], "documents": [task["start"], task["stop"]],
        "tokens": n_tokens, "text_bytes": n_bytes, "sha256": digest.hexdigest(),
        "replaced_bytes": dict(sorted(replaced.items())), "tokenizer_hash": task["tokenizer_hash"],
        "source_id": task["source_id"],
    }
    _write_json(bin_path.with_suffix(".json"), record)
    return record


def _finished(task: dict[str, Any]) -> dict[str, Any] | None:
    """The shard's record if an earlier run finished exactly this shard, else None."""
    bin_path = storage.path(task["bin"])
    record = _read_json(bin_path.with_suffix(".json"))
    if not isinstance(record, dict):
        return None
    if (record.get("tokenizer_hash") != task["tokenizer_hash"] or record.get("source_id") != task["source_id"]
            or record.get("documents") != [task["start"], task["stop"]]
            or storage.size(bin_path) != record.get("tokens", -1) * DTYPE.itemsize):
        return None
    return record


def _check_tokenizer(path, found: str | None) -> None:
    if found != tokenizer.tokenizer_hash():
        raise DataError(
            f"{path}: written by tokenizer {found}, not the current one ({tokenizer.tokenizer_hash()}); "
            "move or delete that token store (nothing was changed)"
        )


def prepare(dataset: str, *, cache_dir=None, manual_dir=None, workers: int | None = None,
            docs_per_shard: int | None = None, progress: bool = True, **options):
    """Build (idempotently) the token store of `dataset` and return its directory.

    `dataset` is a data source's name (`sources.SOURCES`: tiny_shakespeare, openwebtext, webtext,
    fineweb_edu, fineweb, text_files) or tfds:NAME[/CONFIG], or the location of a finished store
    (`named_store`), returned as is. Options: text_files takes files, field, validation_files,
    validation_fraction; openwebtext, fineweb_edu and fineweb take validation_fraction; tfds:NAME takes
    feature. `workers` tokenizer processes (default: one per CPU, or this process alone for under
    32 MiB of text).

    Returns a `pathlib.Path`, or an `epath.Path` (`storage.path`) when the cache dir is a gs:// or
    s3:// URL: the TFDS build then stays local (`sources.build_dir`) and the store goes to the bucket.
    """
    named = named_store(dataset)
    if named is not None:
        load_manifest(named)
        return named
    cache, manual_root = resolve_dirs(cache_dir, manual_dir)
    builder, feature, description = build(dataset, cache_dir=build_dir(cache), manual_root=manual_root, **options)
    store = storage.join(cache, "tokens", _store_name(builder, feature, description))
    source_id = _source_id(builder, feature)
    names = _open_store(store)
    if _is_current(store, source_id):
        return store
    if not storage.is_url(store):  # an upload leaves no temporary object behind
        for tmp in [store / n for n in names if fnmatch.fnmatch(n, "*.tmp-*")]:
            tmp.unlink()  # left by a crashed run
    tasks = _shard_tasks(builder, feature, store, source_id, docs_per_shard)
    records = _tokenize_all(tasks, store, source_id, workers, progress)
    manifest = _manifest(tasks, records, description, source_id)
    _remove_other_shards(store, manifest)
    _write_json(store / MANIFEST, manifest)
    _warn_replaced(manifest)
    return store


def _source_id(builder, feature: str) -> dict[str, Any]:
    """What a store was tokenized from: the TFDS build and feature, with each split's size."""
    splits = builder.info.splits
    return {"tfds_name": builder.name, "tfds_config": builder.builder_config.name if builder.builder_config else None,
            "tfds_version": str(builder.version), "feature": feature,
            "num_examples": {n: int(s.num_examples) for n, s in splits.items()},
            "num_bytes": {n: int(s.num_bytes) for n, s in splits.items()}}


def _open_store(store) -> list[str]:
    """The names of the files already in `store` (made if missing), after checking that their shard
    records were written by the current tokenizer."""
    if not storage.is_url(store):  # object stores have no directories
        store.mkdir(parents=True, exist_ok=True)
    else:
        _manifest_exists(store)  # the first contact with the bucket: a bounded one
    names = sorted(storage.file_sizes(store))  # one listing, on a disk or a bucket
    for meta in [store / n for n in names if n.endswith(".json")]:
        found = _read_json(meta)
        if isinstance(found, dict):
            _check_tokenizer(meta, found.get("tokenizer_hash"))
    return names


def _is_current(store, source_id: dict[str, Any]) -> bool:
    """Whether `store` is finished from exactly `source_id`; a manifest of other data is removed (the
    store is rebuilt, and must not look complete meanwhile)."""
    manifest_path = store / MANIFEST
    if not _manifest_exists(store):
        return False
    manifest = _read_json(manifest_path)
    if isinstance(manifest, dict) and manifest.get("source_id") == source_id:
        _warn_replaced(manifest)
        return True
    storage.remove(manifest_path)  # the TFDS data changed under this store, or damaged by hand
    return False


def _shard_tasks(builder, feature: str, store, source_id: dict[str, Any], docs_per_shard: int | None) -> list[dict]:
    """One task per shard: a range of documents of a split, about SHARD_TEXT_BYTES of text each."""
    tasks, tok_hash = [], tokenizer.tokenizer_hash()
    for split, n_docs in sorted(source_id["num_examples"].items()):
        per = docs_per_shard or max(1, -(-n_docs * SHARD_TEXT_BYTES // max(1, source_id["num_bytes"][split])))
        per = min(per, max(n_docs, 1))
        for i, start in enumerate(range(0, n_docs, per)):
            tasks.append({"tfds_dir": str(builder.data_path), "split": split, "feature": feature,
                          "start": start, "stop": min(start + per, n_docs), "bin": str(store / f"{split}-{i:05d}.bin"),
                          "tokenizer_hash": tok_hash, "source_id": source_id})
    return tasks


def _tokenize_all(tasks: list[dict], store, source_id: dict[str, Any], workers: int | None,
                  progress: bool) -> dict[str, dict]:
    """{shard file: record} of every task: kept from an earlier run where it finished that shard,
    else tokenized here or by `workers` processes."""
    records = {t["bin"]: _finished(t) for t in tasks}
    todo = [t for t in tasks if records[t["bin"]] is None]
    if workers is None:
        # Starting worker processes costs seconds: small corpora are tokenized in this process.
        todo_bytes = sum(source_id["num_bytes"][t["split"]] * (t["stop"] - t["start"])
                         // max(1, source_id["num_examples"][t["split"]]) for t in todo)
        workers = (os.cpu_count() or 1) if todo_bytes > SMALL_CORPUS_BYTES else 1
    workers = max(1, min(workers, len(todo) or 1))
    with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"tokenize {store.name}", unit="shard",
              disable=not progress) as bar:
        if workers == 1:
            for t in todo:
                records[t["bin"]] = _tokenize_shard(t)
                bar.update()
            return records
        # forkserver: workers fork from a clean server that imported this module once (plain
        # fork is unsafe in a process running JAX/Grain threads; spawn re-imports TFDS per worker).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["gpt2_jax.data._forkserver"])
        try:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = {pool.submit(_tokenize_shard, t): t for t in todo}
                for fut in concurrent.futures.as_completed(futures):
                    records[futures[fut]["bin"]] = fut.result()
                    bar.update()
        except concurrent.futures.process.BrokenProcessPool as e:
            # Killed for memory, or a __main__ that worker processes cannot import (python -c, stdin).
            raise DataError(f"{store}: a tokenizer worker process died ({e}); finished shards are kept, "
                            "rerun (with --workers 1 to tokenize in this process)") from e
    return records


def _manifest(tasks: list[dict], records: dict[str, dict], description: dict, source_id: dict) -> dict[str, Any]:
    """The store's manifest: its splits' shards and totals, the source, invalid bytes per file."""
    manifest = {"format": FORMAT, "dtype": "uint16", "eot_id": tokenizer.EOT_ID,
                "tokenizer_hash": tokenizer.tokenizer_hash(), "source": description, "source_id": source_id,
                "splits": {}}
    replaced_total: Counter = Counter()
    for split, n_docs in sorted(source_id["num_examples"].items()):
        shards = [records[t["bin"]] for t in tasks if t["split"] == split]
        for s in shards:
            replaced_total.update(s["replaced_bytes"])
        manifest["splits"][split] = {
            "documents": n_docs, "tokens": sum(s["tokens"] for s in shards),
            "text_bytes": sum(s["text_bytes"] for s in shards),
            "shards": [{k: s[k] for k in ("file", "documents", "tokens", "sha256")} for s in shards],
        }
    manifest["replaced_bytes"] = dict(sorted(replaced_total.items()))
    return manifest


def _remove_other_shards(store, manifest: dict[str, Any]) -> None:
    """Delete the shard files of an earlier, different build that `manifest` does not list."""
    listed = {s["file"] for sp in manifest["splits"].values() for s in sp["shards"]}
    for name in fnmatch.filter(storage.file_sizes(store), "*-[0-9][0-9][0-9][0-9][0-9].*"):
        if name.rsplit(".", 1)[0] + ".bin" not in listed:
            storage.remove(store / name)


def _warn_replaced(manifest: dict[str, Any], shown: int = 5) -> None:
    """Report invalid UTF-8 (replaced by U+FFFD) per file: the first few, then a total."""
    replaced = manifest.get("replaced_bytes", {})
    for source, n in list(replaced.items())[:shown]:
        warn(f"warning: {source}: {n} invalid UTF-8 bytes replaced with U+FFFD")
    if len(replaced) > shown:
        warn(f"warning: {sum(replaced.values())} invalid UTF-8 bytes replaced in {len(replaced)} documents in all "
             f"(the manifest lists them)")


def report(store) -> list[str]:
    """Human-readable summary lines of a finished store (token counts, replaced bytes)."""
    manifest = load_manifest(store)
    lines = [f"{store}"]
    for split, s in manifest["splits"].items():
        lines.append(f"  {split:<10} {s['documents']:>10,} documents {s['tokens']:>14,} tokens "
                     f"({s['text_bytes']:,} bytes of text, {len(s['shards'])} shard(s))")
    return lines


def _manifest_exists(store) -> bool:
    """Whether `store` has its manifest. On an object store this is the first request, bounded in time
    (`storage.probe`): a store that cannot be reached is a one-line error naming it, in seconds."""
    path = storage.path(store) / MANIFEST
    if not storage.is_url(path):
        return path.is_file()
    try:
        return storage.probe(path)
    except storage.Unreachable as e:
        raise DataError(f"{store}: the token store could not be reached ({e.why}); check the URL, the network "
                        "and the credentials") from e


def load_manifest(store) -> dict[str, Any]:
    """The manifest of a complete store, after checking its format and tokenizer."""
    path = storage.path(store) / MANIFEST
    if not _manifest_exists(store):
        raise DataError(f"{path}: no such file; {store} is not a finished token store (run `python -m gpt2_jax.data prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    _check_tokenizer(path, manifest.get("tokenizer_hash"))
    return manifest


class SplitTokens:
    """One split of a store as a read-only token sequence: memory-mapped shards on a local disk,
    ranged reads of the shards' objects on an object store."""

    def __init__(self, store, split: str):
        self.store = storage.path(store)
        manifest = load_manifest(self.store)
        if split not in manifest["splits"]:
            raise DataError(f"{self.store / MANIFEST}: no split {split!r} (has: {', '.join(manifest['splits'])})")
        self.split = split
        self.remote = storage.is_url(self.store)
        sizes = storage.file_sizes(self.store) if self.remote else None  # one listing, not a request per shard
        self.shards, lengths = [], []  # memory maps, or the URLs of the shards' objects
        for s in manifest["splits"][split]["shards"]:
            path = self.store / s["file"]
            if self.remote:
                size = sizes.get(s["file"], -1)
            else:
                size = path.stat().st_size if path.is_file() else -1
            if size != s["tokens"] * DTYPE.itemsize:
                raise DataError(f"{path}: expected {s['tokens'] * DTYPE.itemsize} bytes, found {size}")
            if s["tokens"]:
                self.shards.append(str(path) if self.remote else np.memmap(path, dtype=DTYPE, mode="r"))
                lengths.append(s["tokens"])
        self.offsets = np.cumsum([0] + lengths)
        self.fingerprint = hashlib.sha256(
            json.dumps(manifest["splits"][split]["shards"], sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard, first, end) token offsets within shards that make up tokens [start, stop)."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        out = []
        while start < stop:
            lo = start - int(self.offsets[i])
            hi = min(stop, int(self.offsets[i + 1])) - int(self.offsets[i])
            out.append((i, lo, hi))
            start += hi - lo
            i += 1
        return out

    def _fetch(self, pieces: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """The tokens of each (shard, first, end) piece of a remote store, in one concurrent batch of
        ranged reads; overlapping and touching pieces share one read (consecutive windows share a
        token, and sequential eval windows touch)."""
        merged: list[list[int]] = []  # [shard, first, end] per read
        where = [0] * len(pieces)
        for k in sorted(range(len(pieces)), key=pieces.__getitem__):
            shard, lo, hi = pieces[k]
            if merged and merged[-1][0] == shard and lo <= merged[-1][2]:
                merged[-1][2] = max(merged[-1][2], hi)
            else:
                merged.append([shard, lo, hi])
            where[k] = len(merged) - 1
        blobs = storage.read_ranges([self.shards[m[0]] for m in merged], [m[1] * DTYPE.itemsize for m in merged],
                                         [m[2] * DTYPE.itemsize for m in merged])
        arrays = []
        for (shard, lo, hi), blob in zip(merged, blobs):
            if len(blob) != (hi - lo) * DTYPE.itemsize:
                raise DataError(f"{self.shards[shard]}: read {len(blob)} bytes at {lo * DTYPE.itemsize}, expected "
                                f"{(hi - lo) * DTYPE.itemsize} (the object changed since the store was opened?)")
            arrays.append(np.frombuffer(blob, DTYPE))
        return [arrays[w][lo - merged[w][1]:hi - merged[w][1]] for w, (_, lo, hi) in zip(where, pieces)]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int32 (crossing shard boundaries where needed)."""
        pieces = self._pieces(start, stop)
        parts = self._fetch(pieces) if self.remote else [self.shards[i][lo:hi] for i, lo, hi in pieces]
        if not parts:
            return np.zeros(0, np.int32)
        return np.concatenate(parts).astype(np.int32) if len(parts) > 1 else parts[0].astype(np.int32)

    def gather(self, starts, length: int) -> np.ndarray:
        """int32 [len(starts), length]: tokens [s, s + length) for each start (one gather per shard,
        or one batch of ranged reads on an object store)."""
        starts = np.asarray(starts, np.int64)
        out = np.empty((len(starts), length), np.int32)
        if self.remote:
            rows = [self._pieces(int(s), int(s) + length) for s in starts]
            parts = iter(self._fetch([p for row in rows for p in row]))
            for r, row in enumerate(rows):
                out[r] = np.concatenate([next(parts) for _ in row])
            return out
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        inside = starts + length <= self.offsets[np.minimum(shard + 1, len(self.shards))]
        span = np.arange(length)
        for s in np.unique(shard[inside]):
            rows = np.nonzero(inside & (shard == s))[0]
            out[rows] = self.shards[s][(starts[rows] - self.offsets[s])[:, None] + span]
        for r in np.nonzero(~inside)[0]:  # across a shard end
            out[r] = self.read(int(starts[r]), int(starts[r]) + length)
        return out
