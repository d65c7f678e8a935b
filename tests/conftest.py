"""Test setup: 8 fake CPU devices, strict rank promotion, the shared data directory."""

import os
from pathlib import Path

import jax
import pytest

# gcsfs reads this when imported (Orbax's path library may import it during collection): no probe of
# GCS's gRPC API for hierarchical-namespace buckets, which the local emulator (`gcs` fixture) lacks.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Must run before JAX initializes its backends: gives 8 CPU devices for sharding tests.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2_JAX_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (read-only in CI): Tiny Shakespeare, LAMBADA, WikiText-2, PTB."""
    assert SHARED_DATA.is_dir(), f"shared data directory {SHARED_DATA} is missing"
    return SHARED_DATA


class ObjectStore:
    """A local object-store server for the tests (GCS: gcp-storage-emulator through
    tests/object_store_server.py; S3: moto's server) and the environment that points gcsfs,
    s3fs and tensorstore at it."""

    def __init__(self, kind: str):
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        if kind == "gs":
            cmd = [sys.executable, str(ROOT / "tests" / "object_store_server.py"), str(port)]
            self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                        # gcsfs's gRPC probe for hierarchical-namespace buckets waits a minute offline.
                        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                        # No credentials to look for (fsspec reads FSSPEC_<PROTOCOL>_<ARG> at import).
                        "FSSPEC_GCS_TOKEN": "anon"}
        else:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
            self.env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
        self.kind, self.url = kind, url
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1)
                break
            except OSError as e:
                if getattr(e, "code", None):  # an HTTP error: the server answers
                    break
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{kind} test server did not start (exit {self.proc.poll()})") from e
                time.sleep(0.2)
        os.environ.update(self.env)
        if kind == "gs":
            import fsspec

            fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # this process imported fsspec already
        self._n = 0

    def bucket(self) -> str:
        """A new empty bucket; returns its URL (gs://NAME or s3://NAME)."""
        import fsspec

        self._n += 1
        name = f"bkt{self._n}-{os.getpid()}"
        fs = fsspec.filesystem(self.kind, **({"token": "anon"} if self.kind == "gs" else {}))
        fs.mkdir(name)
        return f"{self.kind}://{name}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        for k in self.env:
            os.environ.pop(k, None)
        if self.kind == "gs":
            import fsspec

            fsspec.config.conf.get("gcs", {}).pop("token", None)


@pytest.fixture(scope="session")
def gcs():
    """A local GCS API (gcp-storage-emulator with GCS's preconditions); `gcs.bucket()` makes buckets."""
    pytest.importorskip("gcsfs")
    store = ObjectStore("gs")
    yield store
    store.close()


@pytest.fixture(scope="session")
def s3():
    """A local S3 API (moto's server); `s3.bucket()` makes buckets."""
    pytest.importorskip("s3fs")
    store = ObjectStore("s3")
    yield store
    store.close()
