"""Token stores: each split of a TFDS data set tokenized once into packed uint16 shards.

Layout of a store directory:
  {split}-{i:05d}.bin   GPT-2 token ids, little-endian uint16, documents each followed by <|endoftext|>
  {split}-{i:05d}.json  the shard's record: document range, token count, SHA-256, tokenizer hash
  manifest.json         written last: splits, shards, token counts, source, tokenizer hash

Every file is written to a temporary name and renamed into place, and a shard's .json is written
after its .bin, so a crash leaves either finished shards (kept by the next run) or temporary files
(deleted by it). A store is complete exactly when manifest.json exists.
"""

from __future__ import annotations

import concurrent.futures
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

from gpt2_jax import files, tokenizer
from gpt2_jax.data.sources import DataError, build, decode_text, resolve_dirs, warn

FORMAT = "gpt2_jax.tokens.v1"
MANIFEST = "manifest.json"
DTYPE = np.dtype("<u2")
# Shards of about this much text, so that workers balance and a crash loses little work.
SHARD_TEXT_BYTES = 64 << 20
_READ_CHUNK = 64
SMALL_CORPUS_BYTES = 32 << 20


def _write_json(path: Path, obj: Any) -> None:
    files.write_json(path, obj, indent=1)


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
    bin_path = Path(task["bin"])
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
    bin_path = Path(task["bin"])
    meta = bin_path.with_suffix(".json")
    if not meta.is_file() or not bin_path.is_file():
        return None
    try:
        record = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (record.get("tokenizer_hash") != task["tokenizer_hash"] or record.get("source_id") != task["source_id"]
            or record.get("documents") != [task["start"], task["stop"]]
            or bin_path.stat().st_size != record.get("tokens", -1) * DTYPE.itemsize):
        return None
    return record


def _check_tokenizer(path: Path, found: str | None) -> None:
    if found != tokenizer.tokenizer_hash():
        raise DataError(
            f"{path}: written by tokenizer {found}, not the current one ({tokenizer.tokenizer_hash()}); "
            "move or delete that token store (nothing was changed)"
        )


def prepare(dataset: str, *, cache_dir=None, manual_dir=None, workers: int | None = None,
            docs_per_shard: int | None = None, progress: bool = True, **options) -> Path:
    """Build (idempotently) the token store of `dataset` and return its directory.

    `dataset` is tiny_shakespeare, openwebtext, webtext, text_files or tfds:NAME[/CONFIG].
    Options: text_files takes files, field, validation_files, validation_fraction; openwebtext
    takes validation_fraction; tfds:NAME takes feature. `workers` tokenizer processes (default:
    one per CPU, or this process alone for under 32 MiB of text).
    """
    cache, manual_root = resolve_dirs(cache_dir, manual_dir)
    builder, feature, description = build(dataset, cache_dir=cache, manual_root=manual_root, **options)
    store = cache / "tokens" / _store_name(builder, feature, description)
    store.mkdir(parents=True, exist_ok=True)
    manifest_path = store / MANIFEST
    tok_hash = tokenizer.tokenizer_hash()
    for meta in sorted(store.glob("*.json")):
        try:
            found = json.loads(meta.read_text()).get("tokenizer_hash")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        _check_tokenizer(meta, found)
    info = builder.info
    splits = {name: int(split.num_examples) for name, split in info.splits.items()}
    source_id = {"tfds_name": builder.name, "tfds_config": builder.builder_config.name if builder.builder_config else None,
                 "tfds_version": str(builder.version), "feature": feature,
                 "num_examples": splits, "num_bytes": {n: int(s.num_bytes) for n, s in info.splits.items()}}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            manifest = {}  # damaged by hand: rebuilt below
        if manifest.get("source_id") == source_id:
            _warn_replaced(manifest)
            return store
        # The TFDS data changed under this store: it is rebuilt, and must not look complete meanwhile.
        manifest_path.unlink()
    for tmp in store.glob("*.tmp-*"):
        tmp.unlink()  # left by a crashed run

    tasks = []
    for split, n_docs in sorted(splits.items()):
        per = docs_per_shard or max(1, -(-n_docs * SHARD_TEXT_BYTES // max(1, int(info.splits[split].num_bytes))))
        per = min(per, max(n_docs, 1))
        for i, start in enumerate(range(0, n_docs, per)):
            tasks.append({"tfds_dir": str(builder.data_path), "split": split, "feature": feature,
                          "start": start, "stop": min(start + per, n_docs), "bin": str(store / f"{split}-{i:05d}.bin"),
                          "tokenizer_hash": tok_hash, "source_id": source_id})
    records = {t["bin"]: _finished(t) for t in tasks}
    todo = [t for t in tasks if records[t["bin"]] is None]
    if workers is None:
        # Starting worker processes costs seconds: small corpora are tokenized in this process.
        todo_bytes = sum(int(info.splits[t["split"]].num_bytes) * (t["stop"] - t["start"]) // max(1, splits[t["split"]])
                         for t in todo)
        workers = (os.cpu_count() or 1) if todo_bytes > SMALL_CORPUS_BYTES else 1
    workers = max(1, min(workers, len(todo) or 1))
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"tokenize {store.name}", unit="shard",
               disable=not progress)
    with bar:
        if workers == 1:
            for t in todo:
                records[t["bin"]] = _tokenize_shard(t)
                bar.update()
        else:
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

    manifest = {"format": FORMAT, "dtype": "uint16", "eot_id": tokenizer.EOT_ID, "tokenizer_hash": tok_hash,
                "source": description, "source_id": source_id, "splits": {}}
    replaced_total: Counter = Counter()
    for split in sorted(splits):
        shards = [records[t["bin"]] for t in tasks if t["split"] == split]
        for s in shards:
            replaced_total.update(s["replaced_bytes"])
        manifest["splits"][split] = {
            "documents": splits[split], "tokens": sum(s["tokens"] for s in shards),
            "text_bytes": sum(s["text_bytes"] for s in shards),
            "shards": [{k: s[k] for k in ("file", "documents", "tokens", "sha256")} for s in shards],
        }
    manifest["replaced_bytes"] = dict(sorted(replaced_total.items()))
    listed = {s["file"] for sp in manifest["splits"].values() for s in sp["shards"]}
    for stale in store.glob("*-[0-9][0-9][0-9][0-9][0-9].*"):
        if stale.with_suffix(".bin").name not in listed:
            stale.unlink()  # shards of an earlier, different build
    _write_json(manifest_path, manifest)
    _warn_replaced(manifest)
    return store


def _warn_replaced(manifest: dict[str, Any], shown: int = 5) -> None:
    """Report invalid UTF-8 (replaced by U+FFFD) per file: the first few, then a total."""
    replaced = manifest.get("replaced_bytes", {})
    for source, n in list(replaced.items())[:shown]:
        warn(f"{source}: {n} invalid UTF-8 bytes replaced with U+FFFD")
    if len(replaced) > shown:
        warn(f"{sum(replaced.values())} invalid UTF-8 bytes replaced in {len(replaced)} documents in all "
             f"(the manifest lists them)")


def report(store: Path) -> list[str]:
    """Human-readable summary lines of a finished store (token counts, replaced bytes)."""
    manifest = load_manifest(store)
    lines = [f"{store}"]
    for split, s in manifest["splits"].items():
        lines.append(f"  {split:<10} {s['documents']:>10,} documents {s['tokens']:>14,} tokens "
                     f"({s['text_bytes']:,} bytes of text, {len(s['shards'])} shard(s))")
    return lines


def load_manifest(store) -> dict[str, Any]:
    """The manifest of a complete store, after checking its format and tokenizer."""
    path = Path(store) / MANIFEST
    if not path.is_file():
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
    """One split of a store as a read-only token sequence over memory-mapped shards."""

    def __init__(self, store, split: str):
        self.store = Path(store)
        manifest = load_manifest(self.store)
        if split not in manifest["splits"]:
            raise DataError(f"{self.store / MANIFEST}: no split {split!r} (has: {', '.join(manifest['splits'])})")
        self.split = split
        self.shards = []
        for s in manifest["splits"][split]["shards"]:
            path = self.store / s["file"]
            size = path.stat().st_size if path.is_file() else -1
            if size != s["tokens"] * DTYPE.itemsize:
                raise DataError(f"{path}: expected {s['tokens'] * DTYPE.itemsize} bytes, found {size}")
            if s["tokens"]:
                self.shards.append(np.memmap(path, dtype=DTYPE, mode="r"))
        self.offsets = np.cumsum([0] + [len(m) for m in self.shards])
        self.fingerprint = hashlib.sha256(
            json.dumps(manifest["splits"][split]["shards"], sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int32 (crossing shard boundaries where needed)."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - int(self.offsets[i])
            hi = min(stop, int(self.offsets[i + 1])) - int(self.offsets[i])
            parts.append(self.shards[i][lo:hi])
            start += hi - lo
            i += 1
        if not parts:
            return np.zeros(0, np.int32)
        return np.concatenate(parts).astype(np.int32) if len(parts) > 1 else parts[0].astype(np.int32)

    def gather(self, starts, length: int) -> np.ndarray:
        """int32 [len(starts), length]: tokens [s, s + length) for each start (one gather per shard)."""
        starts = np.asarray(starts, np.int64)
        out = np.empty((len(starts), length), np.int32)
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        inside = starts + length <= self.offsets[np.minimum(shard + 1, len(self.shards))]
        span = np.arange(length)
        for s in np.unique(shard[inside]):
            rows = np.nonzero(inside & (shard == s))[0]
            out[rows] = self.shards[s][(starts[rows] - self.offsets[s])[:, None] + span]
        for r in np.nonzero(~inside)[0]:  # across a shard end
            out[r] = self.read(int(starts[r]), int(starts[r]) + length)
        return out
