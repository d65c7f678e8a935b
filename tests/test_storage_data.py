"""Token stores on object stores: prepared to gs:// (and s3://), read back with ranged reads only."""

import os

# Read when gcsfs is imported (the `gcs` fixture imports it before it sets its environment):
# without it gcsfs probes the emulator over gRPC for a minute per bucket.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import numpy as np
import pytest

from gpt2_jax import storage
from gpt2_jax.data import (
    DataError,
    SplitTokens,
    TrainLoader,
    eval_batches,
    prepare,
    sources,
)
from gpt2_jax.data import __main__ as cli
from gpt2_jax.train import TrainConfig, load_data

# One Grain read thread and small batches: the GCS emulator serves one request at a time.
LOADER = {"seq_len": 32, "batch_size": 3, "seed": 5, "num_threads": 1}


@pytest.fixture(scope="module")
def env(shared_data, tmp_path_factory):
    """Offline, from the shared data; TFDS builds for URL cache dirs share the local cache's."""
    local = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(sources.OFFLINE_ENV, "1")
        mp.setenv(sources.DATA_DIR_ENV, str(shared_data))
        mp.setenv(sources.BUILD_DIR_ENV, str(local))
        mp.delenv(sources.CACHE_DIR_ENV, raising=False)
        yield local


@pytest.fixture(scope="module")
def local_store(env):
    return prepare("tiny_shakespeare", cache_dir=env, workers=1, progress=False)


class Uploads:
    """The objects written to a store, in order (every whole-file write is one of these calls)."""

    def __init__(self, monkeypatch):
        self.names = []
        for fn, target in (("upload", 1), ("write_bytes", 0)):  # upload(local, p), write_bytes(p, data)
            original = getattr(storage, fn)

            def record(*args, original=original, target=target):
                self.names.append(storage.path(args[target]).name)
                return original(*args)

            monkeypatch.setattr(storage, fn, record)


@pytest.fixture(scope="module")
def gcs_store(env, gcs, local_store):
    """tiny_shakespeare prepared to a bucket, with the names of the objects in upload order."""
    cache = gcs.bucket() + "/cache"
    with pytest.MonkeyPatch.context() as mp:
        uploads = Uploads(mp)
        store = prepare("tiny_shakespeare", cache_dir=cache, workers=1, progress=False)
    return store, uploads.names


def listing(store):
    return sorted(storage.file_sizes(store))


def take(loader, n):
    return np.stack([next(loader) for _ in range(n)])


def test_prepare_uploads_shards_then_manifest(gcs_store, local_store):
    store, names = gcs_store
    assert storage.is_url(store) and str(store).endswith("/cache/tokens/tiny_shakespeare")
    local_files = sorted(p.name for p in local_store.iterdir())
    assert listing(store) == local_files
    assert sorted(names) == local_files and names[-1] == "manifest.json"
    for split in ("train", "validation", "test"):
        assert names.index(f"{split}-00000.bin") < names.index(f"{split}-00000.json")
    assert storage.file_sizes(store) == storage.file_sizes(local_store)
    assert (store / "manifest.json").read_text() == (local_store / "manifest.json").read_text()


def test_prepare_is_idempotent_and_resumes_on_a_bucket(gcs_store, monkeypatch, capsys):
    store, _ = gcs_store
    cache = str(store).rsplit("/tokens/", 1)[0]
    uploads = Uploads(monkeypatch)
    assert cli.main(["prepare", "--dataset", "tiny_shakespeare", "--cache-dir", cache, "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(store)
    assert uploads.names == []
    # A crash after the train shard's tokens were uploaded, before its record and the manifest.
    storage.remove(store / "manifest.json")
    storage.remove(store / "train-00000.json")
    assert prepare("tiny_shakespeare", cache_dir=cache, workers=1, progress=False) == store
    assert uploads.names == ["train-00000.bin", "train-00000.json", "manifest.json"]


def test_remote_reads_equal_local_reads(gcs_store, local_store):
    store, _ = gcs_store
    for split in ("train", "validation"):
        remote, local = SplitTokens(store, split), SplitTokens(local_store, split)
        assert remote.remote and not local.remote and len(remote) == len(local)
        assert remote.fingerprint == local.fingerprint
        np.testing.assert_array_equal(remote.read(0, len(remote)), local.read(0, len(local)))
        starts = [0, 7, 8, 1000, len(local) - 40]
        np.testing.assert_array_equal(remote.gather(starts, 40), local.gather(starts, 40))
    np.testing.assert_array_equal(take(TrainLoader(store, **LOADER), 4), take(TrainLoader(local_store, **LOADER), 4))
    kw = {"seq_len": 64, "batch_size": 4, "stride": 48}
    for a, b in zip(eval_batches(store, **kw), eval_batches(local_store, **kw), strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


def test_resume_on_a_bucket_is_exact(gcs_store):
    store, _ = gcs_store
    k, n = 3, 4
    full = take(TrainLoader(store, **LOADER), k + n)
    loader = TrainLoader(store, **LOADER)
    take(loader, k)
    state = loader.get_state()
    again = TrainLoader(store, **LOADER)
    again.set_state(state)
    np.testing.assert_array_equal(take(again, n), full[k:])


def test_loader_reads_only_its_windows(gcs_store, monkeypatch):
    store, _ = gcs_store
    fs, _ = storage.fs_path(store)
    fetched = []
    original = type(fs)._cat_file

    async def counted(self, path, start=None, end=None, **kw):
        data = await original(self, path, start=start, end=end, **kw)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(type(fs), "_cat_file", counted)
    loader = TrainLoader(store, **{**LOADER, "seq_len": 64, "batch_size": 4})
    take(loader, 5)
    shard_bytes = storage.size(store / "train-00000.bin")
    window_bytes = 65 * 2
    # Grain reads ahead: at most prefetch batches more than were taken, each window one ranged read
    # (or fewer, where windows touch).
    assert fetched and max(fetched) <= 4 * window_bytes
    assert sum(fetched) <= (5 + 8) * 4 * window_bytes < shard_bytes / 20


def test_s3_round_trip(env, s3, local_store):
    store = prepare("tiny_shakespeare", cache_dir=s3.bucket() + "/c", workers=1, progress=False)
    assert str(store).startswith("s3://") and listing(store) == sorted(p.name for p in local_store.iterdir())
    np.testing.assert_array_equal(store_read := SplitTokens(store, "validation").read(0, 500),
                                  SplitTokens(local_store, "validation").read(0, 500))
    assert store_read.dtype == np.int32
    np.testing.assert_array_equal(take(TrainLoader(store, **LOADER), 2), take(TrainLoader(local_store, **LOADER), 2))


def test_training_data_from_a_store_location(gcs_store, local_store):
    store, _ = gcs_store
    tcfg = TrainConfig(dataset=str(store), batch_size=4, seed=3, eval_batches=2)
    train, val = load_data(tcfg, 32, 4)
    local_train, local_val = load_data(TrainConfig(dataset=str(local_store), batch_size=4, seed=3, eval_batches=2), 32, 4)
    np.testing.assert_array_equal(take(train, 2), take(local_train, 2))
    assert len(val) == len(local_val) == 2
    np.testing.assert_array_equal(val[1]["tokens"], local_val[1]["tokens"])


def test_missing_store_url_is_one_line_error(gcs):
    missing = gcs.bucket() + "/tokens/nothing"
    for call in (lambda: prepare(missing), lambda: TrainLoader(missing, seq_len=8, batch_size=2, seed=0)):
        with pytest.raises(DataError) as e:
            call()
        assert "\n" not in str(e.value) and f"{missing}/manifest.json: no such file" in str(e.value)
